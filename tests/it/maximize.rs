//! Activation maximization on the bundled models: every digit class of
//! digits_cnn is maximised to that class, the score rises, the result fed
//! back gives the reported scores, the same seed gives the same bytes,
//! multi-output models work through `InactiveScore`, and bad settings are
//! typed errors. (Regularizer values, jitter, rotation and the optimizer's
//! update are checked by hand in the module's unit tests.)

use tch::{Device, Kind, Tensor};
use tch_vis::maximize::{ActivationMaximization, InputModifier, Regularizer, RmsProp};
use tch_vis::preprocess::Sidecar;
use tch_vis::scores::{CategoricalScore, FnScore, InactiveScore, PredictedScore, Score};
use tch_vis::{Error, Model};

use crate::util::repo;

fn cnn() -> (Model, Sidecar) {
    let path = repo("models/digits_cnn.pt");
    (
        Model::load(&path, Device::Cpu).unwrap(),
        Sidecar::for_model(&path).unwrap(),
    )
}

/// `½ log p_c + ½ (log p_c − mean_j log p_j)` of a softmax output: the
/// score of the README figure (examples/maximize_digits.rs).
fn evidence(classes: Vec<i64>) -> impl Score {
    let index = Tensor::from_slice(&classes).view([-1, 1]);
    FnScore::new("evidence", move |p: &Tensor| -> tch_vis::Result<Tensor> {
        let logp = p.f_clamp_min(1e-30)?.f_log()?;
        let own = logp.f_gather(1, &index, false)?.f_view([-1])?;
        let mean = logp.f_mean_dim(1, false, None::<Kind>)?;
        Ok(own.f_mul_scalar(2.0)?.f_sub(&mean)?.f_mul_scalar(0.5)?)
    })
}

#[test]
fn every_digit_is_maximised_to_its_class() {
    let (model, sidecar) = cnn();
    let score = evidence((0..10).collect());
    // The README figure's settings.
    let out = ActivationMaximization::new(&model, [1, 32, 32])
        .sidecar(&sidecar)
        .samples(10)
        .steps(300)
        .resolution(8, 8)
        .regularizers(vec![
            Regularizer::TotalVariation2D { weight: 0.05 },
            Regularizer::Norm {
                weight: 0.1,
                p: 1.0,
            },
        ])
        .input_modifiers(vec![
            InputModifier::Jitter { jitter: 4 },
            InputModifier::Rotate2D { degree: 5.0 },
        ])
        .optimizer(RmsProp {
            learning_rate: 2.0,
            ..RmsProp::default()
        })
        .maximize(&[&score as &dyn Score])
        .unwrap();
    assert_eq!(out.inputs.size(), vec![10, 1, 32, 32]);
    let probs = &model.forward(&[out.inputs.shallow_clone()]).unwrap()[0];
    let argmax = Vec::<i64>::try_from(&probs.argmax(1, false)).unwrap();
    assert_eq!(
        argmax,
        (0..10).collect::<Vec<i64>>(),
        "probabilities {probs}"
    );

    // The score rises: the last 20 steps beat the first 5, for every class,
    // and the final score beats the seed's.
    assert_eq!(out.curve.len(), 300);
    let final_scores = Vec::<f32>::try_from(&out.scores[0]).unwrap();
    for c in 0..10 {
        let mean =
            |steps: &[Vec<f32>]| steps.iter().map(|s| s[c]).sum::<f32>() / steps.len() as f32;
        let (early, late) = (mean(&out.curve[..5]), mean(&out.curve[280..]));
        assert!(late > early + 1.0, "class {c}: {early} -> {late}");
        assert!(final_scores[c] > out.curve[0][c], "class {c}");
    }

    // Images are in [0, 1] and are the inputs in image space.
    let images = &out.images;
    assert!(images.min().double_value(&[]) >= 0.0 && images.max().double_value(&[]) <= 1.0);
    let back = (&out.inputs * f64::from(sidecar.std[0])) + f64::from(sidecar.mean[0]);
    assert!((back - images).abs().max().double_value(&[]) < 1e-6);
}

fn quick<'a>(model: &'a Model, sidecar: &Sidecar, seed: u64) -> ActivationMaximization<'a> {
    ActivationMaximization::new(model, [1, 32, 32])
        .sidecar(sidecar)
        .steps(12)
        .seed(seed)
}

#[test]
fn the_same_seed_gives_the_same_bytes() {
    let (model, sidecar) = cnn();
    let score = CategoricalScore::new(vec![3, 1, 4]).unwrap();
    let run = |seed| {
        quick(&model, &sidecar, seed)
            .maximize(&[&score as &dyn Score])
            .unwrap()
    };
    let (a, b, c) = (run(5), run(5), run(6));
    assert_eq!(a.inputs.size(), vec![3, 1, 32, 32], "one image per class");
    assert!(a.inputs.equal(&b.inputs), "same seed, other bytes");
    assert_eq!(a.curve, b.curve);
    assert!(!a.inputs.equal(&c.inputs), "another seed, same bytes");
}

#[test]
fn the_result_fed_back_gives_the_reported_scores() {
    let (model, sidecar) = cnn();
    let score = CategoricalScore::new(vec![2, 7]).unwrap();
    for accumulate in [false, true] {
        let out = quick(&model, &sidecar, 1)
            .accumulate_modifiers(accumulate)
            .clip_each_step(!accumulate)
            .maximize(&[&score as &dyn Score])
            .unwrap();
        let probs = &model.forward(&[out.inputs.shallow_clone()]).unwrap()[0];
        assert!(score.score(probs).unwrap().equal(&out.scores[0]));
        assert_eq!(out.curve.len(), 12);
        assert!(out.curve.iter().all(|s| s.len() == 2));
    }
    // A predicted class is fixed on the seed input.
    let predicted = PredictedScore::new();
    let out = quick(&model, &sidecar, 1)
        .samples(2)
        .maximize(&[&predicted as &dyn Score])
        .unwrap();
    assert_eq!(out.scores[0].size(), vec![2]);
}

#[test]
fn multi_output_models_take_inactive_scores() {
    let model = Model::load(repo("models/digits_multi.pt"), Device::Cpu).unwrap();
    let sidecar = Sidecar::for_model(repo("models/digits_multi.pt")).unwrap();
    let class = CategoricalScore::new(vec![0, 5, 9]).unwrap();
    let off = InactiveScore::new();
    let out = quick(&model, &sidecar, 0)
        .maximize(&[&class as &dyn Score, &off])
        .unwrap();
    assert_eq!(out.inputs.size(), vec![3, 1, 32, 32]);
    assert_eq!(out.scores.len(), 2);
    assert_eq!(Vec::<f32>::try_from(&out.scores[1]).unwrap(), vec![0.0; 3]);
    let e = quick(&model, &sidecar, 0)
        .maximize(&[&class as &dyn Score])
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
    let (model, sidecar) = cnn();
    let s = CategoricalScore::new(3).unwrap();
    let run = |am: ActivationMaximization| am.maximize(&[&s as &dyn Score]).unwrap_err();
    let e = run(quick(&model, &sidecar, 0).input_range(1.0, 1.0));
    assert!(matches!(e, Error::InvalidValue { .. }), "{e}");
    let e = run(ActivationMaximization::new(&model, [1, 1, 32]));
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    let e = run(quick(&model, &sidecar, 0).resolution(64, 8));
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    let e = run(quick(&model, &sidecar, 0).normalization(vec![0.0], vec![0.0]));
    assert!(matches!(e, Error::InvalidValue { .. }), "{e}");
    let e = run(quick(&model, &sidecar, 0).optimizer(RmsProp {
        rho: 1.0,
        ..RmsProp::default()
    }));
    assert!(matches!(e, Error::InvalidValue { .. }), "{e}");
    let e = run(quick(&model, &sidecar, 0).samples(0));
    assert!(matches!(e, Error::Empty { .. }), "{e}");
    let e = run(
        quick(&model, &sidecar, 0).regularizers(vec![Regularizer::Norm {
            weight: 1.0,
            p: 0.0,
        }]),
    );
    assert!(matches!(e, Error::InvalidValue { .. }), "{e}");
    let wrong = CategoricalScore::new(vec![10]).unwrap();
    let e = quick(&model, &sidecar, 0)
        .maximize(&[&wrong as &dyn Score])
        .unwrap_err();
    assert!(
        matches!(&e, Error::Score { index: 0, source, .. }
            if matches!(**source, Error::IndexOutOfRange { index: 10, num_classes: 10 })),
        "{e}"
    );
}
