//! Parity with PyTorch: outputs, scores and input gradients of every bundled
//! model and every score kind, against goldens written by
//! `scripts/make_goldens.py` (torch 2.11.0, float32).
//!
//! Tolerances come from `tests/golden/manifest.json`: rtol 1e-5, atol 1e-5
//! on outputs and scores (logits near zero move by ~1e-6 with the thread
//! count, which changes libtorch's summation order), atol 1e-6 on gradients.

use serde::Deserialize;
use tch::{Device, Tensor};
use tch_vis::scores::{BinaryScore, CategoricalScore, InactiveScore, RegressionScore, Score};
use tch_vis::Model;

use crate::util::{assert_close, devices, max_rel_diff, npy, repo};

#[derive(Deserialize)]
struct Manifest {
    torch: String,
    rtol: f64,
    atol: f64,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    model: String,
    inputs: Vec<String>,
    scores: Vec<Spec>,
    outputs: Vec<String>,
    score_values: Vec<String>,
    grads: Vec<String>,
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Spec {
    Categorical { indices: Vec<usize> },
    Binary { values: Vec<bool> },
    Regression { mode: String, target: Option<f64> },
    Inactive,
}

fn build(spec: &Spec) -> Box<dyn Score> {
    match spec {
        Spec::Categorical { indices } => Box::new(CategoricalScore::new(indices.clone()).unwrap()),
        Spec::Binary { values } => Box::new(BinaryScore::new(values.clone()).unwrap()),
        Spec::Regression { mode, target } => Box::new(match mode.as_str() {
            "increase" => RegressionScore::increase(),
            "decrease" => RegressionScore::decrease(),
            "maintain" => RegressionScore::maintain(target.unwrap()).unwrap(),
            other => panic!("unknown regression mode {other}"),
        }),
        Spec::Inactive => Box::new(InactiveScore::new()),
    }
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(repo("tests/golden/manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn run_case(case: &Case, m: &Manifest, device: Device) {
    let dir = repo(&format!("tests/golden/{}", case.name));
    let model = Model::load(repo(&case.model), device).unwrap();
    let inputs: Vec<Tensor> = case.inputs.iter().map(|f| npy(dir.join(f))).collect();
    let scores: Vec<Box<dyn Score>> = case.scores.iter().map(build).collect();
    let refs: Vec<&dyn Score> = scores.iter().map(|s| s.as_ref()).collect();
    let what = |part: &str, i: usize| format!("{} on {device:?}: {part} {i}", case.name);

    let outputs = model.forward(&inputs).unwrap();
    assert_eq!(
        outputs.len(),
        case.outputs.len(),
        "{}: output count",
        case.name
    );
    for (i, (o, f)) in outputs.iter().zip(&case.outputs).enumerate() {
        assert_close(&what("output", i), o, &npy(dir.join(f)), m.rtol, m.atol);
    }
    let g = model.gradients(&inputs, &refs).unwrap();
    for (i, (s, f)) in g.scores.iter().zip(&case.score_values).enumerate() {
        assert_close(&what("score", i), s, &npy(dir.join(f)), m.rtol, m.atol);
        // The score on a plain forward's output is the same value.
        let again = refs[i].score(&outputs[i]).unwrap();
        assert_close(
            &what("score on forward output", i),
            &again,
            &npy(dir.join(f)),
            m.rtol,
            m.atol,
        );
    }
    assert_eq!(g.inputs.len(), case.grads.len());
    for (i, (gi, f)) in g.inputs.iter().zip(&case.grads).enumerate() {
        assert_eq!(gi.kind(), inputs[i].kind(), "gradient dtype");
        let want = npy(dir.join(f));
        // Gradients are held tighter than raw outputs: atol 1e-6.
        assert_close(&what("grad", i), gi, &want, m.rtol, m.atol.min(1e-6));
        // Relative to the gradient's own scale (values below 1e-3 of the
        // largest one count at that floor).
        let floor = want.abs().max().double_value(&[]) * 1e-3;
        println!(
            "parity {} {device:?} grad {i}: max |diff| {:.2e}, max rel diff {:.2e}",
            case.name,
            (gi.to_device(Device::Cpu) - &want)
                .abs()
                .max()
                .double_value(&[]),
            max_rel_diff(gi, &want, floor.max(1e-30)),
        );
    }
}

#[test]
fn every_case_matches_pytorch() {
    let m = manifest();
    assert_eq!(m.torch, "2.11.0");
    assert!(m.rtol <= 1e-5, "tolerance must stay at most 1e-5 relative");
    assert!(
        m.cases.len() >= 15,
        "expected the full golden set, got {}",
        m.cases.len()
    );
    for device in devices() {
        for case in &m.cases {
            run_case(case, &m, device);
        }
    }
}

#[test]
fn goldens_cover_every_model_and_score_kind() {
    let m = manifest();
    for model in [
        "digits_cnn",
        "digits_binary",
        "digits_regressor",
        "digits_multi",
        "digits_dense",
        "digits_rgb",
    ] {
        assert!(
            m.cases.iter().any(|c| c.model.contains(model)),
            "no golden for {model}"
        );
    }
    let has = |pred: &dyn Fn(&Spec) -> bool| m.cases.iter().flat_map(|c| &c.scores).any(pred);
    assert!(has(
        &|s| matches!(s, Spec::Categorical { indices } if indices.len() == 1)
    ));
    assert!(has(
        &|s| matches!(s, Spec::Categorical { indices } if indices.len() > 1)
    ));
    assert!(has(
        &|s| matches!(s, Spec::Binary { values } if values.contains(&false))
    ));
    assert!(has(&|s| matches!(s, Spec::Inactive)));
    for mode in ["increase", "decrease", "maintain"] {
        assert!(
            has(&|s| matches!(s, Spec::Regression { mode: m, .. } if m == mode)),
            "{mode}"
        );
    }
}
