//! Integrated Gradients: parity with captum for every integration rule, on
//! two bundled models, for a fixed class and the predicted class (goldens
//! from `scripts/make_ig_goldens.py`); the analytic integral of a square;
//! internal batch sizes; the caller's tensors; errors.
//!
//! Parity tolerance on the CPU: rtol 1e-5 plus atol 1e-5 × the case's
//! largest |attribution| (values near zero carry the rounding of sums of
//! hundreds of products, which no relative bound can hold, and that
//! rounding depends on the CPU's vector unit: on an AVX-512 machine one
//! digits_cnn value was 7.7e-6 × max off these goldens, made with AVX2
//! kernels, and equal with libtorch held to AVX2); the delta, a difference
//! of two sums of that size, within 1e-5 × Σ|attribution|.

use serde::Deserialize;
use tch::{CModule, Device, Kind, Tensor};
use tch_vis::integrated_gradients::{Baseline, IntegratedGradients, Rule};
use tch_vis::preprocess::Sidecar;
use tch_vis::scores::{CategoricalScore, InactiveScore, PredictedScore, RegressionScore, Score};
use tch_vis::{Error, Model};

use crate::util::{
    assert_close, devices, golden_manifest, max_pool_tie, max_rel_diff, npy, repo, Target,
};

#[derive(Deserialize)]
struct Manifest {
    torch: String,
    rtol: f64,
    atol_scale: f64,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    model: String,
    input: String,
    target: Target,
    classes: Vec<usize>,
    method: String,
    n_steps: usize,
    attributions: String,
    delta: String,
}

fn manifest() -> Manifest {
    golden_manifest(
        "tests/golden_ig/manifest.json",
        "scripts/make_ig_goldens.py",
    )
}

#[test]
fn every_rule_matches_captum() {
    let m = manifest();
    assert_eq!(m.torch, "2.11.0");
    assert!(m.rtol <= 1e-5, "tolerance must stay at most 1e-5 relative");
    assert_eq!(m.cases.len(), 20, "2 models x 2 targets x 5 rules");
    for rule in Rule::ALL {
        for model in ["digits_cnn", "digits_rgb"] {
            for predicted in [false, true] {
                assert!(
                    m.cases.iter().any(|c| c.method == rule.name()
                        && c.model.contains(model)
                        && matches!(c.target, Target::Predicted) == predicted),
                    "no golden for {rule} on {model} (predicted: {predicted})"
                );
            }
        }
    }
    let dir = repo("tests/golden_ig");
    for device in devices() {
        // On CUDA, the command line's bound: rtol 1e-4, atol 1e-4 x max.
        let (rtol, scale, delta_scale) = if device == Device::Cpu {
            (m.rtol, m.atol_scale, 1e-5)
        } else {
            (1e-4, 1e-4, 1e-3)
        };
        for case in &m.cases {
            let model = Model::load(repo(&case.model), device).unwrap();
            let x = npy(dir.join(&case.input));
            let s = case.target.score();
            let rule: Rule = case.method.parse().unwrap();
            let got = IntegratedGradients::new(&model)
                .steps(case.n_steps)
                .rule(rule)
                .attribute(&x.to_device(device), &[s.as_ref()])
                .unwrap();
            assert_eq!(
                got.classes,
                vec![Some(case.classes.clone())],
                "{}",
                case.name
            );
            let want = npy(dir.join(&case.attributions));
            let max = want.abs().max().double_value(&[]);
            let what = format!("{} on {device:?}", case.name);
            let atol = scale * max;
            let cpu = got.attributions.to_device(Device::Cpu);
            if cpu.allclose(&want, rtol, atol, false) {
                assert_close(&what, &got.attributions, &want, rtol, atol);
            } else {
                // The upscaled RGB digits' flat areas (see the function).
                max_pool_tie(&what, &cpu, &want, rtol, atol, 0.25, 5e-3);
            }
            let want_delta = npy(dir.join(&case.delta));
            let mass = want.abs().sum(Kind::Double).double_value(&[]);
            assert_close(
                &format!("{what}: delta"),
                &got.delta,
                &want_delta,
                0.0,
                delta_scale * mass,
            );
            let diff = (got.attributions.to_device(Device::Cpu) - &want)
                .abs()
                .max()
                .double_value(&[]);
            println!(
                "ig parity | {} | {device:?} | max |diff| {diff:.2e} | max rel diff {:.2e} (values above 1e-3 x max) | max |attr| {max:.3e} | delta diff {:.2e}",
                case.name,
                max_rel_diff(&got.attributions, &want, max * 1e-3),
                (got.delta.to_device(Device::Cpu) - &want_delta)
                    .abs()
                    .max()
                    .double_value(&[]),
            );
        }
    }
}

/// Traces `f` into a TorchScript file and loads it as a Model.
fn traced<F>(inputs: &[Tensor], mut f: F, device: Device) -> (Model, tempfile::TempDir)
where
    F: FnMut(&[Tensor]) -> Vec<Tensor>,
{
    let module = CModule::create_by_tracing("M", "forward", inputs, &mut f).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.pt");
    module.save(&path).unwrap();
    (Model::load(&path, device).unwrap(), dir)
}

fn sum_of_squares(x: &Tensor) -> Tensor {
    (x * x).flatten(1, -1).sum_dim_intlist(1, true, Kind::Float)
}

#[test]
fn the_integral_of_a_square_by_hand() {
    // F(x) = Σ x_i², ∂F/∂x_i at α x is 2 α x_i. From the zero baseline:
    // IG_i = x_i · Σ_k w_k 2 α_k x_i. Gauss-Legendre integrates 2α exactly
    // (IG_i = x_i², delta 0); the left Riemann sum gives Σ 2 (k/n) / n =
    // (n − 1) / n; captum's trapezoid weights give (n − 1) / n as well.
    for device in devices() {
        let x = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0, 0.0, -1.5, 2.0, 1.0])
            .view([2, 1, 2, 2])
            .to_device(device);
        let (model, _dir) = traced(
            &[x.shallow_clone()],
            |xs| vec![sum_of_squares(&xs[0])],
            device,
        );
        let s = RegressionScore::increase();
        let squares = &x * &x;
        for (rule, factor) in [
            (Rule::GaussLegendre, 1.0),
            (Rule::RiemannLeft, 0.9),
            (Rule::RiemannRight, 1.1),
            (Rule::RiemannMiddle, 1.0),
            (Rule::RiemannTrapezoid, 0.9),
        ] {
            let got = IntegratedGradients::new(&model)
                .steps(10)
                .rule(rule)
                .attribute(&x, &[&s as &dyn Score])
                .unwrap();
            let what = format!("{rule} on {device:?}");
            assert_close(&what, &got.attributions, &(&squares * factor), 1e-6, 1e-6);
            // F(x) = 14.25 and 7.25; F(0) = 0.
            let want_delta = Tensor::from_slice(&[
                14.25f32 * (factor as f32 - 1.0),
                7.25 * (factor as f32 - 1.0),
            ]);
            assert_close(
                &format!("{what}: delta"),
                &got.delta,
                &want_delta,
                1e-5,
                1e-5,
            );
            assert_close(
                &format!("{what}: score"),
                &got.scores[0],
                &Tensor::from_slice(&[14.25f32, 7.25]),
                1e-6,
                0.0,
            );
            assert_eq!(got.classes, vec![None]);
        }
        // From a constant baseline c: IG_i = (x_i − c)(x_i + c) = x_i² − c².
        let got = IntegratedGradients::new(&model)
            .steps(4)
            .baseline(Baseline::Constant(0.5))
            .attribute(&x, &[&s as &dyn Score])
            .unwrap();
        assert_close(
            "constant baseline",
            &got.attributions,
            &(&squares - 0.25),
            1e-6,
            1e-6,
        );
        assert!(got.delta.abs().max().double_value(&[]) < 1e-5);
    }
}

#[test]
fn internal_batch_size_only_regroups_the_steps() {
    // Passes of 1, 2, 3, ... steps sum the weighted gradients in another
    // order than one pass: equal within float32 rounding, held at rtol 1e-5
    // plus 1e-6 x the largest |attribution| (as the parity test).
    let model = Model::load(repo("models/digits_rgb.pt"), Device::Cpu).unwrap();
    let x = npy(repo("tests/golden_ig/digits_rgb.input.npy"));
    let s = PredictedScore::new();
    let whole = IntegratedGradients::new(&model)
        .steps(24)
        .attribute(&x, &[&s as &dyn Score])
        .unwrap();
    let max = whole.attributions.abs().max().double_value(&[]);
    for rows in [1, 2, 3, 7, 10, 47, 48, 1000] {
        let got = IntegratedGradients::new(&model)
            .steps(24)
            .internal_batch_size(rows)
            .attribute(&x, &[&s as &dyn Score])
            .unwrap();
        let what = format!("internal batch size {rows}");
        assert_close(
            &what,
            &got.attributions,
            &whole.attributions,
            1e-5,
            1e-6 * max,
        );
        assert_close(
            &format!("{what}: delta"),
            &got.delta,
            &whole.delta,
            0.0,
            1e-4,
        );
        assert_eq!(got.classes, whole.classes);
    }
}

#[test]
fn the_callers_tensors_are_left_untouched() {
    let model = Model::load(repo("models/digits_cnn.pt"), Device::Cpu).unwrap();
    let x = npy(repo("tests/golden_ig/digits_cnn.input.npy")).set_requires_grad(true);
    let before = x.detach().copy();
    let base = Tensor::full([1, 32, 32], -0.5, (Kind::Float, Device::Cpu));
    let base_before = base.copy();
    let s = CategoricalScore::new(vec![3, 5, 2]).unwrap();
    let got = IntegratedGradients::new(&model)
        .steps(8)
        .baseline(Baseline::Tensor(base.shallow_clone()))
        .internal_batch_size(6)
        .attribute(&x, &[&s as &dyn Score])
        .unwrap();
    assert!(x.detach().equal(&before), "input changed");
    assert!(!x.grad().defined(), "input .grad was written");
    assert!(base.equal(&base_before), "baseline changed");
    assert!(!got.attributions.requires_grad());
    assert_eq!(got.attributions.size(), x.size());
}

#[test]
fn other_baselines_run_and_black_is_not_zero() {
    let model = Model::load(repo("models/digits_cnn.pt"), Device::Cpu).unwrap();
    let sidecar = Sidecar::for_model(repo("models/digits_cnn.pt")).unwrap();
    let x = npy(repo("tests/golden_ig/digits_cnn.input.npy"));
    let s = PredictedScore::new();
    let black = Baseline::black(&sidecar).unwrap().resolve(&x).unwrap();
    let want = -0.3054f64 / 0.3234;
    assert!((black.double_value(&[0, 0, 0, 0]) - want).abs() < 1e-6);
    for baseline in [
        Baseline::black(&sidecar).unwrap(),
        Baseline::Blur { sigma: 2.0 },
        Baseline::Constant(-1.0),
    ] {
        let what = format!("{baseline:?}");
        let got = IntegratedGradients::new(&model)
            .steps(64)
            .baseline(baseline)
            .attribute(&x, &[&s as &dyn Score])
            .unwrap();
        assert_eq!(got.attributions.size(), x.size(), "{what}");
        // Completeness holds to the quadrature's accuracy.
        let worst = got.delta.abs().max().double_value(&[]);
        assert!(worst < 0.05, "{what}: delta {worst}");
    }
}

#[test]
fn multi_output_models_take_one_score_per_output() {
    let model = Model::load(repo("models/digits_multi.pt"), Device::Cpu).unwrap();
    let x = npy(repo("tests/golden_ig/digits_cnn.input.npy"));
    let c = CategoricalScore::new(3).unwrap();
    let inactive = InactiveScore::new();
    let r = RegressionScore::increase();
    let class_only = IntegratedGradients::new(&model)
        .steps(16)
        .attribute(&x, &[&c as &dyn Score, &inactive])
        .unwrap();
    assert_eq!(class_only.scores.len(), 2);
    assert_eq!(class_only.classes, vec![Some(vec![3, 3, 3]), None]);
    let both = IntegratedGradients::new(&model)
        .steps(16)
        .attribute(&x, &[&c as &dyn Score, &r])
        .unwrap();
    let value = IntegratedGradients::new(&model)
        .steps(16)
        .attribute(&x, &[&inactive as &dyn Score, &r])
        .unwrap();
    // Attributions are linear in the objective: the sum of the parts.
    let max = both.attributions.abs().max().double_value(&[]);
    assert_close(
        "class + value",
        &both.attributions,
        &(&class_only.attributions + &value.attributions),
        1e-4,
        1e-5 * max,
    );
    let e = IntegratedGradients::new(&model)
        .attribute(&x, &[&c as &dyn Score])
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::ScoreCount {
                outputs: 2,
                scores: 1
            }
        ),
        "{e}"
    );
}

#[test]
fn bad_settings_are_typed_errors() {
    let model = Model::load(repo("models/digits_cnn.pt"), Device::Cpu).unwrap();
    let x = npy(repo("tests/golden_ig/digits_cnn.input.npy"));
    let s = CategoricalScore::new(3).unwrap();
    let run = |ig: IntegratedGradients| ig.attribute(&x, &[&s as &dyn Score]).unwrap_err();
    assert!(matches!(
        run(IntegratedGradients::new(&model).steps(0)),
        Error::InvalidValue { .. }
    ));
    assert!(matches!(
        run(IntegratedGradients::new(&model)
            .steps(1)
            .rule(Rule::RiemannTrapezoid)),
        Error::InvalidValue { .. }
    ));
    assert!(matches!(
        run(IntegratedGradients::new(&model).internal_batch_size(0)),
        Error::InvalidValue { .. }
    ));
    assert!(matches!(
        run(
            IntegratedGradients::new(&model).baseline(Baseline::Tensor(Tensor::zeros(
                [5],
                (Kind::Float, Device::Cpu)
            )))
        ),
        Error::Shape { .. }
    ));
    let wrong_class = CategoricalScore::new(10).unwrap();
    let e = IntegratedGradients::new(&model)
        .attribute(&x, &[&wrong_class as &dyn Score])
        .unwrap_err();
    assert!(
        matches!(&e, Error::Score { index: 0, source, .. }
            if matches!(**source, Error::IndexOutOfRange { index: 10, num_classes: 10 })),
        "{e}"
    );
}

/// `IgMethod::smooth` is captum's `NoiseTunnel` (smoothgrad) with
/// SmoothGrad's own noise: for the linear F(x) = Σ x_i, Integrated
/// Gradients from the zero baseline is x itself (any rule whose weights sum
/// to 1), so the smoothed attributions are the mean of the image's noisy
/// copies, which is also SmoothGrad's signed mean gradient of
/// F(x) = Σ x_i² / 2 with the same seed and keys. Scores stay the clean
/// input's; without noise the copies are the input.
#[test]
fn smoothed_attributions_are_the_mean_over_smoothgrads_noisy_copies() {
    use tch_vis::batch::{IgMethod, Method, SaliencyMethod};
    use tch_vis::scores::ScoreSpec;
    tch::manual_seed(5);
    let x = Tensor::randn([3, 2, 5, 4], (Kind::Float, Device::Cpu));
    let keys = [11u64, 22, 33];
    let (linear, _a) = traced(
        &[x.copy()],
        |t| vec![t[0].flatten(1, -1).sum_dim_intlist(1, true, Kind::Float)],
        Device::Cpu,
    );
    let (square, _b) = traced(
        &[x.copy()],
        |t| vec![sum_of_squares(&t[0]) * 0.5],
        Device::Cpu,
    );
    let spec: Vec<ScoreSpec> = vec!["regression:increase".parse().unwrap()];
    let ig = IgMethod::new(&spec).unwrap().steps(4).smooth(5, 0.3, 7);
    let got = ig.compute(&linear, &x, &keys).unwrap();
    let sal = SaliencyMethod::new(&spec)
        .unwrap()
        .smooth(5, 0.3, 7)
        .save_gradients(true);
    let want = sal.compute(&square, &x, &keys).unwrap();
    let attr = &got.arrays[0].values;
    let mean_copy = &want.arrays[1].values;
    assert_eq!(want.arrays[1].name, "grad");
    assert_close("mean of the noisy copies", attr, mean_copy, 1e-5, 1e-5);
    let moved = (attr - &x).abs().max().double_value(&[]);
    assert!(moved > 0.05, "the noise moved the attributions by {moved}");
    let clean = x.flatten(1, -1).sum_dim_intlist(1, false, Kind::Float);
    assert_close("clean scores", &got.scores[0], &clean, 1e-6, 1e-6);
    // The heatmap is that of the mean attributions.
    let heat = got.arrays[0].heat.as_ref().unwrap();
    let want_heat = tch_vis::saliency::normalized_map(&attr.abs()).unwrap();
    assert_close("heatmap", heat, &want_heat, 0.0, 0.0);
    // No noise: every copy is the input.
    let still = IgMethod::new(&spec).unwrap().steps(4).smooth(3, 0.0, 7);
    let r = still.compute(&linear, &x, &keys).unwrap();
    assert_close("noise 0", &r.arrays[0].values, &x, 1e-6, 1e-6);
}
