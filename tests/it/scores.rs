//! The library surface exactly as the README documents it, and each
//! validation rule of the scores.

use tch::{Device, Kind, Tensor};
use tch_vis::scores::{
    BinaryScore, CategoricalScore, ClassAxis, ContrastiveScore, FnScore, InactiveScore,
    PredictedScore, RegressionScore, Score, SegmentationScore,
};
use tch_vis::{Error, Model};

use crate::util::{assert_close, repo};

fn digits(n: i64) -> Tensor {
    tch::manual_seed(7);
    Tensor::randn([n, 1, 32, 32], (Kind::Float, Device::Cpu))
}

#[test]
fn contract_snippet_compiles_and_holds() -> tch_vis::Result<()> {
    let x = digits(3);
    let model = Model::load(repo("models/digits_cnn.pt"), Device::Cpu)?;
    let outputs: Vec<Tensor> = model.forward(&[x.shallow_clone()])?;
    let s = CategoricalScore::new(3)?;
    let _list = CategoricalScore::new(vec![3, 5, 7])?;
    let v: Tensor = s.score(&outputs[0])?;
    assert_eq!(v.size(), vec![3]);
    let g = model.gradients(&[x.shallow_clone()], &[&s as &dyn Score])?;
    assert_eq!(g.scores.len(), 1);
    assert_eq!(g.scores[0].size(), vec![3]);
    assert_eq!(g.inputs.len(), 1);
    assert_eq!(g.inputs[0].size(), x.size());
    assert_eq!(g.inputs[0].kind(), x.kind());
    assert_eq!(g.inputs[0].device(), x.device());
    assert_close("score value", &g.scores[0], &v, 1e-6, 0.0);
    let _b: BinaryScore = BinaryScore::new(true)?;
    let _bl: BinaryScore = BinaryScore::new(vec![true, false])?;
    let _r: RegressionScore = RegressionScore::increase();
    let _d: RegressionScore = RegressionScore::decrease();
    let _m: RegressionScore = RegressionScore::maintain(1.5)?;
    let _i: InactiveScore = InactiveScore::new();
    Ok(())
}

#[test]
fn categorical_on_a_dense_output_averages_height_and_width() {
    let model = Model::load(repo("models/digits_dense.pt"), Device::Cpu).unwrap();
    let x = digits(2);
    let out = &model.forward(&[x]).unwrap()[0];
    assert_eq!(out.size(), vec![2, 11, 32, 32]);
    let v = CategoricalScore::new(vec![4, 9])
        .unwrap()
        .score(out)
        .unwrap();
    let want = Tensor::stack(
        &[
            out.get(0).get(4).mean(Kind::Float),
            out.get(1).get(9).mean(Kind::Float),
        ],
        0,
    );
    assert_close("dense categorical", &v, &want, 1e-6, 1e-7);
    let e = CategoricalScore::new(11).unwrap().score(out).unwrap_err();
    assert!(
        matches!(
            e,
            Error::IndexOutOfRange {
                index: 11,
                num_classes: 11
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("11 classes"), "{e}");
}

#[test]
fn categorical_list_length_must_equal_the_batch() {
    let out = Tensor::zeros([4, 10], (Kind::Float, Device::Cpu));
    for bad in [vec![1, 2], vec![1, 2, 3, 4, 5]] {
        let n = bad.len();
        let e = CategoricalScore::new(bad).unwrap().score(&out).unwrap_err();
        assert!(
            matches!(e, Error::BatchMismatch { expected: 4, got, .. } if got == n),
            "{e}"
        );
    }
    assert!(matches!(
        CategoricalScore::new(Vec::new()),
        Err(Error::Empty { .. })
    ));
    assert!(matches!(
        BinaryScore::new(Vec::new()),
        Err(Error::Empty { .. })
    ));
}

#[test]
fn binary_needs_one_value_per_sample_output() {
    let e = BinaryScore::new(true)
        .unwrap()
        .score(&Tensor::zeros([4, 10], (Kind::Float, Device::Cpu)))
        .unwrap_err();
    assert!(
        matches!(e, Error::Shape { ref got, .. } if got == &[4, 10]),
        "{e}"
    );
    let out = Tensor::from_slice(&[0.25f32, 0.75, 0.5]).view([3, 1]);
    let e = BinaryScore::new(vec![true, false])
        .unwrap()
        .score(&out)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::BatchMismatch {
                expected: 3,
                got: 2,
                ..
            }
        ),
        "{e}"
    );
    let v = BinaryScore::new(vec![true, false, true])
        .unwrap()
        .score(&out)
        .unwrap();
    assert_eq!(Vec::<f32>::try_from(&v).unwrap(), vec![0.25, -0.75, 0.5]);
}

#[test]
fn regression_maintain_is_the_inverse_distance() {
    // |1 / (x - t + 1e-7)| for x = 3, t = 1 -> 0.5; x = 0.5 -> 2.
    let out = Tensor::from_slice(&[3.0f32, 0.5]).view([2, 1]);
    let v = RegressionScore::maintain(1.0).unwrap().score(&out).unwrap();
    assert_close(
        "maintain",
        &v,
        &Tensor::from_slice(&[0.5f32, 2.0]),
        1e-6,
        0.0,
    );
    assert!(matches!(
        RegressionScore::maintain(f64::NAN),
        Err(Error::InvalidValue { .. })
    ));
}

#[test]
fn beyond_tf_keras_vis_scores() {
    let logits = Tensor::from_slice(&[1.0f32, 3.0, 0.0, 2.0, 1.0, 5.0]).view([2, 3]);
    // Softmax then class 1.
    let p = CategoricalScore::new(1)
        .unwrap()
        .softmax()
        .score(&logits)
        .unwrap();
    let want = logits.softmax(1, Kind::Float).select(1, 1);
    assert_close("softmax", &p, &want, 1e-6, 0.0);
    // Predicted: argmax per sample, classes 1 and 2.
    assert_eq!(PredictedScore::new().classes(&logits).unwrap(), vec![1, 2]);
    // Contrastive: class 1 minus class 0.
    let c = ContrastiveScore::new(1, 0).unwrap().score(&logits).unwrap();
    assert_eq!(Vec::<f32>::try_from(&c).unwrap(), vec![2.0, -1.0]);
    assert!(matches!(
        ContrastiveScore::new(2, 2),
        Err(Error::InvalidValue { .. })
    ));
    // Channels last: (N, C) is the same either way.
    let last = CategoricalScore::new(2)
        .unwrap()
        .class_axis(ClassAxis::ChannelsLast);
    assert_eq!(
        Vec::<f32>::try_from(&last.score(&logits).unwrap()).unwrap(),
        vec![0.0, 5.0]
    );
    // Segmentation on a dense output, with a per-sample mask.
    let out = Tensor::arange(2 * 2 * 2 * 2, (Kind::Float, Device::Cpu)).view([2, 2, 2, 2]);
    let mask = Tensor::from_slice(&[1.0f32, 0., 0., 0., 0., 0., 0., 1.]).view([2, 2, 2]);
    let s = SegmentationScore::new(1, &mask)
        .unwrap()
        .score(&out)
        .unwrap();
    // Sample 0, class 1 = [4, 5, 6, 7] -> picks 4; sample 1, class 1 = [12..16) -> picks 15.
    assert_eq!(Vec::<f32>::try_from(&s).unwrap(), vec![4.0, 15.0]);
    let wrong = Tensor::ones([3, 3], (Kind::Float, Device::Cpu));
    let e = SegmentationScore::new(1, &wrong)
        .unwrap()
        .score(&out)
        .unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    // A named closure.
    let f = FnScore::new("first", |o: &Tensor| o.f_select(1, 0));
    assert_eq!(f.name(), "first");
    assert_eq!(
        Vec::<f32>::try_from(&f.score(&logits).unwrap()).unwrap(),
        vec![1.0, 2.0]
    );
}

#[test]
fn predicted_score_gradient_equals_the_categorical_one() {
    let model = Model::load(repo("models/digits_cnn.pt"), Device::Cpu).unwrap();
    let x = digits(4);
    let out = &model.forward(&[x.shallow_clone()]).unwrap()[0];
    let classes = PredictedScore::new().classes(out).unwrap();
    let by_class = CategoricalScore::new(classes).unwrap();
    let a = model
        .gradients(
            &[x.shallow_clone()],
            &[&PredictedScore::new() as &dyn Score],
        )
        .unwrap();
    let b = model.gradients(&[x], &[&by_class as &dyn Score]).unwrap();
    assert_close("grad", &a.inputs[0], &b.inputs[0], 0.0, 0.0);
}
