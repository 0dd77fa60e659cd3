//! `Model`: loading, forward, gradients — on tiny traced models whose
//! derivatives are known, and on the bundled models.

use tch::{CModule, Device, Kind, Tensor};
use tch_vis::scores::{BinaryScore, CategoricalScore, InactiveScore, RegressionScore, Score};
use tch_vis::{Error, Model};

use crate::util::{assert_close, devices, repo, Mutator};

/// Traces `f` over `inputs` into a TorchScript file and loads it as a Model.
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

fn x3() -> Tensor {
    Tensor::from_slice(&[1.0f32, 2.0, 3.0, -1.0, 0.5, 4.0]).view([2, 3])
}

#[test]
fn categorical_gradient_of_a_square_is_twice_the_input() {
    for device in devices() {
        // y = x * x, shape (2, 3); class 1 -> d y[:, 1] / d x[:, 1] = 2 x[:, 1], 0 elsewhere.
        let (model, _dir) = traced(&[x3()], |xs| vec![&xs[0] * &xs[0]], device);
        let x = x3();
        let s = CategoricalScore::new(1).unwrap();
        let g = model
            .gradients(&[x.shallow_clone()], &[&s as &dyn Score])
            .unwrap();
        let want = Tensor::from_slice(&[0.0f32, 4.0, 0.0, 0.0, 1.0, 0.0]).view([2, 3]);
        assert_close("grad", &g.inputs[0], &want, 0.0, 0.0);
        assert_close(
            "score",
            &g.scores[0],
            &Tensor::from_slice(&[4.0f32, 0.25]),
            0.0,
            0.0,
        );
        assert_eq!(
            g.inputs[0].device(),
            Device::Cpu,
            "gradient on the input's device"
        );
    }
}

#[test]
fn two_inputs_each_get_their_gradient() {
    for device in devices() {
        // y = a * b summed per sample, shape (2, 1): dy/da = b, dy/db = a.
        let a = x3();
        let b = x3() + 1.0;
        let (model, _dir) = traced(
            &[a.shallow_clone(), b.shallow_clone()],
            |xs| vec![(&xs[0] * &xs[1]).sum_dim_intlist(1, true, Kind::Float)],
            device,
        );
        let s = RegressionScore::increase();
        let g = model
            .gradients(&[a.shallow_clone(), b.shallow_clone()], &[&s as &dyn Score])
            .unwrap();
        assert_close("d/da", &g.inputs[0], &b, 0.0, 0.0);
        assert_close("d/db", &g.inputs[1], &a, 0.0, 0.0);
        // decrease is the exact negation.
        let d = RegressionScore::decrease();
        let g2 = model
            .gradients(&[a.shallow_clone(), b.shallow_clone()], &[&d as &dyn Score])
            .unwrap();
        assert_close("-d/da", &g2.inputs[0], &(-&b), 0.0, 0.0);
    }
}

#[test]
fn caller_tensors_are_left_untouched() {
    let (model, _dir) = traced(&[x3()], |xs| vec![&xs[0] * &xs[0]], Device::Cpu);
    let x = x3();
    let before = x.copy();
    let s = CategoricalScore::new(0).unwrap();
    let _ = model
        .gradients(&[x.shallow_clone()], &[&s as &dyn Score])
        .unwrap();
    assert!(!x.requires_grad(), "input must not be set to require grad");
    assert!(!x.grad().defined(), "input .grad must stay undefined");
    assert_close("input", &x, &before, 0.0, 0.0);
    // An input that already requires grad keeps an undefined .grad too.
    let y = x3().set_requires_grad(true);
    let _ = model
        .gradients(&[y.shallow_clone()], &[&s as &dyn Score])
        .unwrap();
    assert!(
        !y.grad().defined(),
        ".grad of a requires-grad input must stay undefined"
    );
}

#[test]
fn gradients_work_inside_no_grad_and_forward_builds_no_graph() {
    let (model, _dir) = traced(&[x3()], |xs| vec![&xs[0] * &xs[0]], Device::Cpu);
    let s = CategoricalScore::new(2).unwrap();
    let _guard = tch::no_grad_guard();
    let g = model.gradients(&[x3()], &[&s as &dyn Score]).unwrap();
    let want = Tensor::from_slice(&[0.0f32, 0.0, 6.0, 0.0, 0.0, 8.0]).view([2, 3]);
    assert_close("grad under no_grad", &g.inputs[0], &want, 0.0, 0.0);
    drop(_guard);
    let out = model.forward(&[x3().set_requires_grad(true)]).unwrap();
    assert!(!out[0].requires_grad(), "forward must not build a graph");
}

#[test]
fn inactive_output_contributes_no_gradient() {
    // Gradients are linear in the scores, and the inactive score adds 0:
    // g[cat, inactive] + g[inactive, up] == g[cat, up].
    let model = Model::load(repo("models/digits_multi.pt"), Device::Cpu).unwrap();
    let x = Tensor::randn([3, 1, 32, 32], (Kind::Float, Device::Cpu));
    let cat = CategoricalScore::new(7).unwrap();
    let up = RegressionScore::increase();
    let off = InactiveScore::new();
    let grad =
        |a: &dyn Score, b: &dyn Score| model.gradients(&[x.shallow_clone()], &[a, b]).unwrap();
    let both = grad(&cat, &up);
    let only_cat = grad(&cat, &off);
    let only_up = grad(&off, &up);
    let sum = &only_cat.inputs[0] + &only_up.inputs[0];
    assert_close("linearity", &sum, &both.inputs[0], 1e-5, 1e-7);
    assert_close(
        "inactive score",
        &only_cat.scores[1],
        &Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        0.0,
        0.0,
    );
    let none = grad(&off, &off);
    assert_close(
        "no gradient",
        &none.inputs[0],
        &Tensor::zeros([3, 1, 32, 32], (Kind::Float, Device::Cpu)),
        0.0,
        0.0,
    );
}

#[test]
fn score_count_must_match_outputs() {
    let model = Model::load(repo("models/digits_multi.pt"), Device::Cpu).unwrap();
    let x = Tensor::zeros([2, 1, 32, 32], (Kind::Float, Device::Cpu));
    let s = CategoricalScore::new(0).unwrap();
    let e = model
        .gradients(&[x.shallow_clone()], &[&s as &dyn Score])
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
    assert_eq!(
        e.to_string(),
        "the model has 2 outputs but 1 score was given (one score per output)"
    );
    let e = model
        .gradients(&[x], &[&s as &dyn Score, &s, &s])
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::ScoreCount {
                outputs: 2,
                scores: 3
            }
        ),
        "{e}"
    );
}

#[test]
fn score_errors_carry_the_output_index() {
    let (model, _dir) = traced(&[x3()], |xs| vec![&xs[0] * 1.0], Device::Cpu);
    let s = CategoricalScore::new(7).unwrap();
    let e = model.gradients(&[x3()], &[&s as &dyn Score]).unwrap_err();
    // The typed cause, under the wrapper that says which score.
    assert!(
        matches!(
            e.root(),
            Error::IndexOutOfRange {
                index: 7,
                num_classes: 3
            }
        ),
        "{e}"
    );
    match e {
        Error::Score {
            index: 0, source, ..
        } => assert!(
            matches!(
                *source,
                Error::IndexOutOfRange {
                    index: 7,
                    num_classes: 3
                }
            ),
            "{source}"
        ),
        other => panic!("expected Error::Score, got {other}"),
    }
    let b = BinaryScore::new(true).unwrap();
    let e = model.gradients(&[x3()], &[&b as &dyn Score]).unwrap_err();
    assert!(matches!(e, Error::Score { index: 0, .. }), "{e}");
}

#[test]
fn load_errors_are_typed_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pt");
    assert!(matches!(
        Model::load(&missing, Device::Cpu),
        Err(Error::Io { .. })
    ));
    let junk = dir.path().join("junk.pt");
    std::fs::write(&junk, b"this is not a TorchScript archive").unwrap();
    let e = Model::load(&junk, Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::ModelLoad { .. }), "{e}");
    assert!(!e.to_string().contains("frame #"), "no C++ frames: {e}");
    // libtorch's reason, without its advice about checkpoints and miniz.
    assert!(
        e.to_string()
            .ends_with("failed reading zip archive: failed finding central directory"),
        "{e}"
    );
    assert!(matches!(
        Model::load(dir.path(), Device::Cpu),
        Err(Error::Io { .. })
    ));
    assert!(matches!(
        Model::load_from_bytes(b"PK\x03\x04 truncated zip", Device::Cpu),
        Err(Error::ModelLoad { .. })
    ));
    let bytes = std::fs::read(repo("models/digits_cnn.pt")).unwrap();
    let m = Model::load_from_bytes(&bytes, Device::Cpu).unwrap();
    let out = m
        .forward(&[Tensor::zeros([2, 1, 32, 32], (Kind::Float, Device::Cpu))])
        .unwrap();
    assert_eq!(out[0].size(), vec![2, 10]);
}

/// The model and weights files users mistake for TorchScript are named for
/// what they are (from files and from bytes), with the way to export one;
/// anything else that is not TorchScript, a truncated TorchScript file among
/// them, stays an [`Error::ModelLoad`].
#[test]
fn other_model_formats_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = |name: &str| std::fs::read(repo(&format!("tests/models/{name}"))).unwrap();
    let mut safetensors = Vec::new();
    let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    safetensors.extend_from_slice(&(header.len() as u64).to_le_bytes());
    safetensors.extend_from_slice(header);
    safetensors.extend_from_slice(&[0; 8]);
    // The start of a file from torch.onnx.export.
    let mut onnx = b"\x08\x09\x12\x07pytorch\x1a\x062.11.0:\xce\x02\n\x89\x01\n\x05input".to_vec();
    onnx.extend_from_slice(&[0; 64]);
    let mut hdf5 = b"\x89HDF\r\n\x1a\n".to_vec();
    hdf5.extend_from_slice(&[0; 96]);
    let cases: [(&str, Vec<u8>, &str); 7] = [
        (
            "state_dict.pt",
            fixture("not_torchscript_state_dict.pt"),
            "a torch.save checkpoint",
        ),
        (
            "legacy.pt",
            fixture("not_torchscript_legacy.pt"),
            "legacy (non-zip)",
        ),
        (
            "program.pt2",
            fixture("not_torchscript_export.pt2"),
            "a torch.export archive",
        ),
        ("w.safetensors", safetensors, "a safetensors file"),
        ("m.onnx", onnx, "an ONNX model"),
        ("m.h5", hdf5, "an HDF5 file"),
        (
            "m.json",
            std::fs::read(repo("models/digits_cnn.json")).unwrap(),
            "a JSON file",
        ),
    ];
    for (name, bytes, what) in &cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        for e in [
            Model::load(&path, Device::Cpu).map(|_| ()).unwrap_err(),
            Model::load_from_bytes(bytes, Device::Cpu)
                .map(|_| ())
                .unwrap_err(),
        ] {
            match &e {
                Error::NotTorchScript { format, .. } => {
                    assert!(format.contains(what), "{name}: {e}")
                }
                _ => panic!("{name}: {e}"),
            }
            let text = e.to_string();
            assert!(
                text.contains("torch.jit.script(model)") && !text.contains('\n'),
                "{text}"
            );
        }
    }
    // A TorchScript file cut short (its entry list gone) is no other format,
    // whatever its first entries' names: also when cut after `data.pkl`,
    // before its first `code/` entry (the names of a torch.save archive).
    let ts = std::fs::read(repo("models/digits_cnn.pt")).unwrap();
    let find = |name: &[u8]| ts.windows(name.len()).position(|w| w == name).unwrap();
    let (pickle, code) = (find(b"/data.pkl"), find(b"/code/"));
    assert!(pickle < code, "the archive's order changed");
    for cut in [ts.len() / 4, code - 20, ts.len() - 100] {
        let e = Model::load_from_bytes(&ts[..cut], Device::Cpu)
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(e, Error::ModelLoad { .. }), "cut at {cut}: {e}");
    }
}

/// Corrupt TorchScript files (bits flipped, bytes replaced, the file cut
/// short; 200 seeded mutations of a bundled model) each load as a model
/// that runs, or fail with [`Error::ModelLoad`] without C++ frames in the
/// message: never a panic or an abort.
#[test]
fn corrupt_model_files_are_load_errors() {
    let seed = std::fs::read(repo("models/digits_cnn.pt")).unwrap();
    let mut mutator = Mutator::new(0x2545_f491_4f6c_dd1d, [0x00, 0xFF, b'0', b'9']);
    let x = Tensor::zeros([2, 1, 32, 32], (Kind::Float, Device::Cpu));
    let (mut loaded, mut refused) = (0, 0);
    for k in 0..200 {
        let (bytes, how) = mutator.mutate(&seed);
        match Model::load_from_bytes(&bytes, Device::Cpu) {
            Ok(m) => {
                loaded += 1;
                // Weights changed, or nothing that matters: it still runs,
                // or says why in one line.
                match m.forward(&[x.shallow_clone()]) {
                    Ok(out) => assert_eq!(out[0].size(), vec![2, 10], "#{k}"),
                    Err(e) => {
                        assert!(matches!(e, Error::Torch(_)), "#{k}: {e}");
                        assert!(!e.to_string().contains('\n'), "#{k}: one line: {e}");
                    }
                }
            }
            Err(e) => {
                refused += 1;
                assert!(
                    matches!(e, Error::ModelLoad { .. }),
                    "#{k} (mutation {how}): {e}"
                );
                assert!(
                    !e.to_string().contains("frame #"),
                    "#{k}: no C++ frames: {e}"
                );
            }
        }
    }
    assert!(
        loaded > 20 && refused > 20,
        "{loaded} loaded, {refused} refused"
    );
}

#[test]
fn wrong_inputs_are_errors() {
    let model = Model::load(repo("models/digits_cnn.pt"), Device::Cpu).unwrap();
    let x = Tensor::zeros([2, 1, 32, 32], (Kind::Float, Device::Cpu));
    let e = model
        .forward(&[x.shallow_clone(), x.shallow_clone()])
        .unwrap_err();
    assert!(matches!(e, Error::InputCount { got: 2, .. }), "{e}");
    let e = model.forward(&[]).unwrap_err();
    assert!(matches!(e, Error::InputCount { got: 0, .. }), "{e}");
    // The declaration is named, with what cannot be passed.
    let extra = Model::load(repo("tests/models/extra_argument.pt"), Device::Cpu).unwrap();
    let x = Tensor::zeros([2, 1, 16, 16], (Kind::Float, Device::Cpu));
    let e = extra.forward(&[x.shallow_clone()]).unwrap_err();
    assert!(
        matches!(&e, Error::InputCount { expected, got: 1, declaration }
            if expected == "2" && declaration.starts_with("forward(Tensor x, float temperature) -> Tensor (temperature is a float")),
        "{e}"
    );
    assert!(
        e.to_string()
            .starts_with("the model takes 2 inputs but 1 was given: forward("),
        "{e}"
    );
    // Wrong channel count: libtorch's error, first line only.
    let bad = Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let e = model.forward(&[bad]).unwrap_err();
    assert!(matches!(e, Error::Torch(_)), "{e}");
    assert!(!e.to_string().contains('\n'), "one line: {e}");
}

#[test]
fn multi_output_tuples_flatten_in_order() {
    let model = Model::load(repo("models/digits_multi.pt"), Device::Cpu).unwrap();
    let x = Tensor::zeros([3, 1, 32, 32], (Kind::Float, Device::Cpu));
    let out = model.forward_named(&[x]).unwrap();
    let shapes: Vec<_> = out.iter().map(|(n, t)| (n.clone(), t.size())).collect();
    assert_eq!(
        shapes,
        vec![
            ("0".to_string(), vec![3, 10]),
            ("1".to_string(), vec![3, 1])
        ]
    );
}

#[test]
fn closures_are_scores() {
    let (model, _dir) = traced(&[x3()], |xs| vec![&xs[0] * &xs[0]], Device::Cpu);
    // The score is the sum of each sample's outputs: d/dx = 2x.
    let f = |o: &Tensor| o.f_sum_dim_intlist(1, false, None::<Kind>);
    let g = model.gradients(&[x3()], &[&f as &dyn Score]).unwrap();
    assert_close("grad", &g.inputs[0], &(x3() * 2.0), 0.0, 0.0);
    // A closure returning one value for the whole batch is rejected.
    let bad = |o: &Tensor| o.f_sum(None::<Kind>);
    let e = model.gradients(&[x3()], &[&bad as &dyn Score]).unwrap_err();
    assert!(matches!(e, Error::Score { index: 0, .. }), "{e}");
}

/// A tensor of a dtype tch has no `Kind` for (here `torch.uint16`, made
/// by a TorchScript module) is an error wherever it reaches the library,
/// not a panic: as a score's output, as an input of `gradients`, and in
/// `io::write_npy_atomic`.
#[test]
fn dtypes_tch_does_not_know_are_errors() {
    let maker = Model::load(repo("tests/models/uint16_output.pt"), Device::Cpu).unwrap();
    let x = Tensor::randn([2, 8], (Kind::Float, Device::Cpu));
    let u = maker.forward(&[x]).unwrap().remove(0);
    assert!(u.f_kind().is_err(), "tch learnt uint16: pick another dtype");
    let score = BinaryScore::new(vec![true, false]).unwrap();
    let e = score.score(&u).unwrap_err();
    assert!(matches!(e, Error::Torch(_)), "{e}");
    let model = Model::load(repo("models/digits_cnn.pt"), Device::Cpu).unwrap();
    let s = CategoricalScore::new(1).unwrap();
    let e = model
        .gradients(&[u.shallow_clone()], &[&s as &dyn Score])
        .unwrap_err();
    assert!(matches!(e, Error::Torch(_)), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("u.npy");
    assert!(tch_vis::io::write_npy_atomic(&path, &u).is_err());
    assert!(!path.exists());
}

/// An empty batch gives empty scores and an empty gradient, for every kind
/// of output: `(N, C)` and `(N, C, H, W)` (whose per-sample means had a -1
/// to infer from zero values), and the inactive score.
#[test]
fn an_empty_batch_gives_empty_results() {
    for (path, score) in [
        (
            "models/digits_cnn.pt",
            &CategoricalScore::new(3).unwrap() as &dyn Score,
        ),
        ("models/digits_dense.pt", &CategoricalScore::new(3).unwrap()),
        ("models/digits_cnn.pt", &InactiveScore::new()),
    ] {
        let model = Model::load(repo(path), Device::Cpu).unwrap();
        let x = Tensor::zeros([0, 1, 32, 32], (Kind::Float, Device::Cpu));
        let g = model.gradients(&[x], &[score]).unwrap();
        assert_eq!(g.scores[0].size(), [0], "{path}");
        assert_eq!(g.inputs[0].size(), [0, 1, 32, 32], "{path}");
    }
}
