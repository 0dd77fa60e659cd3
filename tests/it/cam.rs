//! Class activation maps: parity with pytorch-grad-cam 1.5.7 (maps) and
//! captum's LayerGradCam (raw Grad-CAM maps), from goldens written by
//! `scripts/make_cam_goldens.py`; invariances (Score-CAM chunking, the
//! caller's tensors, Faster-Score-CAM with every channel) and errors.

use serde::Deserialize;
use tch::{Device, Kind, Tensor};
use tch_vis::cam::{Cam, CamForm, CamMethod, CamResize, ScoreCamWeights};
use tch_vis::scores::{CategoricalScore, InactiveScore, PredictedScore, RegressionScore, Score};
use tch_vis::{Error, Model};

use crate::util::{assert_close, devices, golden_manifest, npy, repo, Target};

#[derive(Deserialize)]
struct Manifest {
    grad_cam: String,
    atol: f64,
    models: Vec<ModelEntry>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct ModelEntry {
    name: String,
    model: String,
    optional: bool,
    input: String,
    /// `"methods"` (forward_features / forward_head) or `"dict"`.
    form: String,
}

#[derive(Deserialize)]
struct Case {
    model: String,
    method: String,
    target: Target,
    classes: Vec<usize>,
    map: String,
    raw: Option<String>,
    score: String,
}

fn manifest() -> Manifest {
    golden_manifest(
        "tests/golden/cam/manifest.json",
        "scripts/make_cam_goldens.py",
    )
}

fn golden(rel: &str) -> Tensor {
    npy(repo("tests/golden/cam").join(rel))
}

/// Runs every case of one model on `device`; returns the largest |diff| of
/// the maps per (method, target), or `None` when an optional model file is
/// absent.
fn parity(name: &str, device: Device) -> Option<Vec<(String, f64)>> {
    let m = manifest();
    let entry = m.models.iter().find(|e| e.name == name).unwrap();
    let path = repo(&entry.model);
    if entry.optional && !path.exists() {
        eprintln!(
            "skipped: {} is absent (45 MB, git-ignored; run scripts/make_cam_goldens.py to write it)",
            entry.model
        );
        return None;
    }
    let model = Model::load(&path, device).unwrap();
    let x = golden(&entry.input).to_device(device);
    let form = model.cam_form(&x).unwrap();
    match entry.form.as_str() {
        "dict" => {
            assert_eq!(form, CamForm::Dict, "{name}");
            assert!(
                Cam::check(&model).is_err(),
                "{name}: Cam::check knows the methods only"
            );
        }
        _ => {
            assert_eq!(form, CamForm::Methods, "{name}");
            Cam::check(&model).unwrap();
        }
    }
    let mut report = Vec::new();
    for case in m.cases.iter().filter(|c| c.model == name) {
        let method: CamMethod = case.method.parse().unwrap();
        let score = case.target.score();
        let score = score.as_ref();
        let what = format!(
            "{name} {} {:?} on {device:?}",
            case.method,
            case.target.name()
        );
        let got = Cam::new(&model, method).compute(&x, &[score]).unwrap();
        let want = golden(&case.map);
        assert_close(&format!("{what}: map"), &got.maps, &want, 0.0, m.atol);
        let diff = max_abs_diff(&got.maps, &want);
        if let Some(raw) = &case.raw {
            // captum's raw map: relu(Σ_k mean(g_k) A_k), unscaled.
            let want_raw = golden(raw);
            let scale = want_raw.abs().max().double_value(&[]).max(1e-30);
            assert_close(
                &format!("{what}: raw"),
                &got.raw,
                &want_raw,
                1e-4,
                1e-5 * scale,
            );
        }
        assert_close(
            &format!("{what}: score"),
            &got.scores[0],
            &golden(&case.score),
            1e-5,
            1e-6,
        );
        assert_eq!(
            got.classes,
            vec![Some(case.classes.clone())],
            "{what}: classes"
        );
        report.push((format!("{} {}", case.method, case.target.name()), diff));
    }
    assert!(!report.is_empty(), "no cases for {name}");
    Some(report)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_device(Device::Cpu).to_kind(Kind::Double);
    let b = b.to_device(Device::Cpu).to_kind(Kind::Double);
    (a - b).abs().max().double_value(&[])
}

fn run_parity(name: &str) {
    for device in devices() {
        if let Some(report) = parity(name, device) {
            for (case, diff) in report {
                eprintln!("parity {name} {case} {device:?}: max |diff| {diff:.2e}");
            }
        }
    }
}

#[test]
fn parity_digits_cnn() {
    run_parity("digits_cnn");
}

#[test]
fn parity_digits_rgb() {
    run_parity("digits_rgb");
}

#[test]
fn parity_resnet_narrow() {
    run_parity("resnet_narrow");
}

/// The dict form (forward returns {"features", "output"}) at a layer
/// inside a residual block, which no forward_features / forward_head split
/// can express: pytorch-grad-cam hooked at `layer4[1].conv2`.
#[test]
fn parity_resnet_narrow_inner() {
    run_parity("resnet_narrow_inner");
}

#[test]
fn parity_resnet18() {
    run_parity("resnet18");
}

#[test]
fn manifest_covers_every_method_and_target_on_each_model() {
    let m = manifest();
    for model in [
        "digits_cnn",
        "digits_rgb",
        "resnet_narrow",
        "resnet_narrow_inner",
        "resnet18",
    ] {
        for method in ["gradcam", "gradcam++", "layercam", "scorecam"] {
            for target in ["categorical", "predicted"] {
                assert!(
                    m.cases.iter().any(|c| c.model == model
                        && c.method == method
                        && c.target.name() == target),
                    "no golden for {model} {method} {target}"
                );
            }
        }
    }
    assert_eq!(m.grad_cam, "1.5.7");
}

fn digits_input() -> Tensor {
    let m = manifest();
    let entry = m.models.iter().find(|e| e.name == "digits_cnn").unwrap();
    golden(&entry.input)
}

#[test]
fn a_model_without_the_cam_methods_is_a_typed_error() {
    let model = Model::load(repo("models/digits_dense.pt"), Device::Cpu).unwrap();
    assert!(!model.has_method("forward_features"));
    assert!(model.has_method("forward"));
    let e = Cam::check(&model).unwrap_err();
    match &e {
        Error::NotCamModel { path, missing } => {
            assert!(path.ends_with("digits_dense.pt"));
            assert_eq!(missing, &vec!["forward_features", "forward_head"]);
        }
        other => panic!("expected NotCamModel, got {other:?}"),
    }
    assert!(e.to_string().contains("scripts/export_cam_model.py"), "{e}");
    let x = Tensor::zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu));
    let s = CategoricalScore::new(1).unwrap();
    let e = Cam::new(&model, CamMethod::GradCam)
        .compute(&x, &[&s as &dyn Score])
        .unwrap_err();
    assert!(matches!(e, Error::NotCamModel { .. }), "{e:?}");
}

/// Models whose forward returns a dict that does not fit the dict form:
/// each is a typed error, found by `Model::cam_form` before any image.
#[test]
fn dict_models_that_do_not_fit_the_dict_form_are_typed_errors() {
    let load = |name: &str| {
        Model::load(repo(&format!("tests/models/dict_{name}.pt")), Device::Cpu).unwrap()
    };
    let x = Tensor::rand([2, 3, 16, 16], (Kind::Float, Device::Cpu));
    let s = CategoricalScore::new(1).unwrap();
    let scores = [&s as &dyn Score];

    // No "features" entry: neither form.
    let m = load("no_features");
    let e = m.cam_form(&x).unwrap_err();
    match &e {
        Error::NotCamModel { missing, .. } => {
            assert_eq!(missing, &vec!["forward_features", "forward_head"])
        }
        other => panic!("expected NotCamModel, got {other:?}"),
    }
    assert!(e.to_string().contains("\"features\""), "{e}");
    let e = Cam::new(&m, CamMethod::LayerCam)
        .compute(&x, &scores)
        .unwrap_err();
    assert!(matches!(e, Error::NotCamModel { .. }), "{e:?}");

    // Features that are not (N, K, h, w).
    let e = load("flat_features").cam_form(&x).unwrap_err();
    assert!(
        matches!(&e, Error::Shape { got, .. } if got == &vec![2, 4]),
        "{e:?}"
    );

    // Nothing to score beside the features.
    let e = load("only_features").cam_form(&x).unwrap_err();
    assert!(matches!(e, Error::UnsupportedOutput { .. }), "{e:?}");

    // Features detached from the input: no gradient can reach them, so
    // the gradient methods refuse; Score-CAM needs none and runs.
    let m = load("detached");
    assert_eq!(m.cam_form(&x).unwrap(), CamForm::Dict);
    assert_eq!(m.features(&x).unwrap().size(), vec![2, 4, 16, 16]);
    for method in [
        CamMethod::GradCam,
        CamMethod::GradCamPlusPlus,
        CamMethod::LayerCam,
    ] {
        let e = Cam::new(&m, method).compute(&x, &scores).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidValue { what, .. } if what.contains("does not depend on the input")),
            "{method:?}: {e:?}"
        );
    }
    let maps = Cam::new(&m, CamMethod::ScoreCam)
        .compute(&x, &scores)
        .unwrap()
        .maps;
    assert_eq!(maps.size(), vec![2, 16, 16]);
}

#[test]
fn bad_inputs_and_options_are_typed_errors() {
    let model = Model::load(repo("models/digits_cnn.pt"), Device::Cpu).unwrap();
    let s = CategoricalScore::new(1).unwrap();
    let flat = Tensor::zeros([1, 32, 32], (Kind::Float, Device::Cpu));
    let e = Cam::new(&model, CamMethod::GradCam)
        .compute(&flat, &[&s as &dyn Score])
        .unwrap_err();
    assert!(
        matches!(e, Error::Shape { ref got, .. } if got == &vec![1, 32, 32]),
        "{e:?}"
    );
    let x = digits_input();
    let e = Cam::new(&model, CamMethod::ScoreCam)
        .score_cam_batch(0)
        .compute(&x, &[&s as &dyn Score])
        .unwrap_err();
    assert!(matches!(e, Error::InvalidValue { .. }), "{e:?}");
    let e = Cam::new(&model, CamMethod::FasterScoreCam)
        .max_n(0)
        .compute(&x, &[&s as &dyn Score])
        .unwrap_err();
    assert!(matches!(e, Error::InvalidValue { .. }), "{e:?}");
    let big = CategoricalScore::new(10).unwrap();
    let e = Cam::new(&model, CamMethod::GradCam)
        .compute(&x, &[&big as &dyn Score])
        .unwrap_err();
    assert!(
        matches!(&e, Error::Score { index: 0, source, .. }
            if matches!(**source, Error::IndexOutOfRange { index: 10, num_classes: 10 })),
        "{e:?}"
    );
    let e = Cam::new(&model, CamMethod::GradCam)
        .compute(&x, &[&s as &dyn Score, &s as &dyn Score])
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::ScoreCount {
                outputs: 1,
                scores: 2
            }
        ),
        "{e:?}"
    );
}

#[test]
fn score_cam_chunk_size_does_not_change_the_maps() {
    let model = Model::load(repo("models/digits_rgb.pt"), Device::Cpu).unwrap();
    let m = manifest();
    let entry = m.models.iter().find(|e| e.name == "digits_rgb").unwrap();
    let x = golden(&entry.input);
    let s = PredictedScore::new();
    let whole = Cam::new(&model, CamMethod::ScoreCam)
        .score_cam_batch(1000)
        .compute(&x, &[&s as &dyn Score])
        .unwrap();
    // 1: one image per pass (the batch of 3 is split); 7: groups of two
    // channels (6 rows) with a ragged last group; 3: one channel per pass.
    for batch in [1, 3, 7] {
        let chunked = Cam::new(&model, CamMethod::ScoreCam)
            .score_cam_batch(batch)
            .compute(&x, &[&s as &dyn Score])
            .unwrap();
        assert_close(
            &format!("batch {batch}: map"),
            &chunked.maps,
            &whole.maps,
            0.0,
            1e-6,
        );
        assert_close(
            &format!("batch {batch}: raw"),
            &chunked.raw,
            &whole.raw,
            1e-5,
            1e-7,
        );
    }
}

#[test]
fn faster_score_cam_with_every_channel_is_score_cam() {
    let model = Model::load(repo("models/digits_cnn.pt"), Device::Cpu).unwrap();
    let x = digits_input();
    let s = CategoricalScore::new(vec![1, 3, 4]).unwrap();
    let score = Cam::new(&model, CamMethod::ScoreCam)
        .compute(&x, &[&s as &dyn Score])
        .unwrap();
    // digits_cnn's features have K = 32 channels; 32 and more keep them all.
    for n in [32, 100] {
        let faster = Cam::new(&model, CamMethod::FasterScoreCam)
            .max_n(n)
            .compute(&x, &[&s as &dyn Score])
            .unwrap();
        assert!(faster.maps.equal(&score.maps), "max_n {n}: maps differ");
        assert!(faster.raw.equal(&score.raw), "max_n {n}: raw differs");
    }
    // Fewer channels: a different map, still scaled to [0, 1).
    let few = Cam::new(&model, CamMethod::FasterScoreCam)
        .max_n(4)
        .compute(&x, &[&s as &dyn Score])
        .unwrap();
    assert!(!few.maps.equal(&score.maps));
    assert!(few.maps.max().double_value(&[]) < 1.0);
    assert!(few.maps.min().double_value(&[]) >= 0.0);
}

#[test]
fn the_callers_tensors_are_left_untouched() {
    for device in devices() {
        let model = Model::load(repo("models/digits_cnn.pt"), device).unwrap();
        let x = digits_input().to_device(device).set_requires_grad(true);
        let before = x.detach().copy();
        let s = PredictedScore::new();
        for method in CamMethod::ALL {
            let out = Cam::new(&model, method)
                .compute(&x, &[&s as &dyn Score])
                .unwrap();
            assert_eq!(out.maps.size(), vec![3, 32, 32]);
            assert_eq!(out.raw.size(), vec![3, 8, 8]);
            assert_eq!(out.maps.device(), device);
            assert_eq!(out.maps.kind(), Kind::Float);
            assert!(!out.maps.requires_grad());
        }
        assert!(x.detach().equal(&before), "input changed");
        assert!(!x.grad().defined(), "input .grad was set");
    }
}

#[test]
fn multi_output_models_take_one_score_per_output() {
    // digits_multi: (class logits (N, 10), value (N, 1)). With the second
    // output inactive, the maps are those of the class score alone; the
    // regression score adds to the objective and changes them.
    let model = Model::load(repo("models/digits_multi.pt"), Device::Cpu).unwrap();
    Cam::check(&model).unwrap();
    let x = digits_input();
    let c = CategoricalScore::new(3).unwrap();
    let inactive = InactiveScore::new();
    let up = RegressionScore::increase();
    for method in CamMethod::ALL {
        let a = Cam::new(&model, method)
            .compute(&x, &[&c as &dyn Score, &inactive as &dyn Score])
            .unwrap();
        assert_eq!(a.scores.len(), 2);
        assert_eq!(a.scores[1].size(), vec![3]);
        assert_eq!(a.classes[0], Some(vec![3, 3, 3]));
        assert_eq!(a.classes[1], None);
        let b = Cam::new(&model, method)
            .compute(&x, &[&c as &dyn Score, &up as &dyn Score])
            .unwrap();
        assert!(!a.raw.equal(&b.raw), "{method}: regression score ignored");
    }
}

#[test]
fn tf_keras_vis_options_change_what_they_say() {
    let model = Model::load(repo("models/digits_cnn.pt"), Device::Cpu).unwrap();
    let x = digits_input();
    let s = PredictedScore::new();
    let base = Cam::new(&model, CamMethod::GradCam)
        .compute(&x, &[&s as &dyn Score])
        .unwrap();
    // The resize convention changes the maps, not the raw map.
    let corners = Cam::new(&model, CamMethod::GradCam)
        .resize(CamResize::AlignCorners)
        .compute(&x, &[&s as &dyn Score])
        .unwrap();
    assert!(corners.raw.equal(&base.raw));
    assert!(!corners.maps.equal(&base.maps));
    // Score-CAM weights as a softmax over classes: other maps.
    let a = Cam::new(&model, CamMethod::ScoreCam)
        .compute(&x, &[&s as &dyn Score])
        .unwrap();
    let b = Cam::new(&model, CamMethod::ScoreCam)
        .score_cam_weights(ScoreCamWeights::ClassSoftmax)
        .compute(&x, &[&s as &dyn Score])
        .unwrap();
    assert!(!a.raw.equal(&b.raw));
    let tkv = Cam::new(&model, CamMethod::GradCamPlusPlus)
        .tf_keras_vis()
        .compute(&x, &[&s as &dyn Score])
        .unwrap();
    assert_eq!(tkv.maps.size(), vec![3, 32, 32]);
}

/// `CamMapMethod::smooth`: each image's map is the mean of the maps of its
/// noisy copies, scored on the clean image's class (a `predicted` class
/// does not move with the noise), with the clean image's scores; noise 0
/// gives the plain maps, and an image's maps do not depend on the batch
/// it comes in.
#[test]
fn smoothed_maps_average_noisy_copies_on_the_clean_class() {
    use tch_vis::batch::{CamMapMethod, Method};
    use tch_vis::scores::ScoreSpec;
    let model = Model::load(repo("models/digits_cnn.pt"), Device::Cpu).unwrap();
    let x = digits_input();
    let n = x.size()[0] as usize;
    let keys: Vec<u64> = (1..=n as u64).map(|k| k * 1000 + 7).collect();
    let spec = vec![ScoreSpec::Predicted];
    let plain = CamMapMethod::new(CamMethod::GradCam, &spec).unwrap();
    let base = plain.compute(&model, &x, &keys).unwrap();
    let still = CamMapMethod::new(CamMethod::GradCam, &spec)
        .unwrap()
        .smooth(3, 0.0, 1);
    let r = still.compute(&model, &x, &keys).unwrap();
    assert_close(
        "noise 0",
        &r.arrays[0].values,
        &base.arrays[0].values,
        1e-6,
        1e-6,
    );
    let noisy = CamMapMethod::new(CamMethod::GradCam, &spec)
        .unwrap()
        .smooth(4, 0.5, 1);
    let r = noisy.compute(&model, &x, &keys).unwrap();
    assert_eq!(r.classes, base.classes, "the clean classes");
    assert_close("clean scores", &r.scores[0], &base.scores[0], 0.0, 0.0);
    let moved = (&r.arrays[0].values - &base.arrays[0].values)
        .abs()
        .max()
        .double_value(&[]);
    assert!(moved > 0.01, "noise moved the maps by {moved}");
    let (lo, hi) = (
        r.arrays[0].values.min().double_value(&[]),
        r.arrays[0].values.max().double_value(&[]),
    );
    assert!((0.0..=1.0).contains(&lo) && hi <= 1.0 + 1e-6, "{lo} {hi}");
    // Image 1 alone, in a batch of one: the same noise, so the same map
    // (to 1e-5: convolutions of another batch size sum in another order).
    let one = noisy
        .compute(&model, &x.narrow(0, 1, 1), &keys[1..2])
        .unwrap();
    assert_close(
        "batch of one",
        &one.arrays[0].values.get(0),
        &r.arrays[0].values.get(1),
        1e-5,
        1e-5,
    );
}
