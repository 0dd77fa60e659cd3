//! Saliency and SmoothGrad through the library, on the bundled digits CNN,
//! and the batch engine's seams.

use std::sync::Mutex;

use tch::{Device, Kind, Tensor};
use tch_vis::batch::{Engine, ImageResult, SaliencyMethod, Sink};
use tch_vis::preprocess::Sidecar;
use tch_vis::saliency::Saliency;
use tch_vis::scores::{CategoricalScore, PredictedScore, Score, ScoreSpec};
use tch_vis::Model;

use crate::util::repo;

fn digits() -> Model {
    Model::load(repo("models/digits_cnn.pt"), Device::Cpu).unwrap()
}

/// Seeded inputs in the model's normalised range.
/// The bundled digits model's sidecar.
fn digits_sidecar() -> Sidecar {
    Sidecar::for_model(repo("models/digits_cnn.pt")).unwrap()
}

/// The bundled gray sample images, as the engine takes them.
fn gray_inputs() -> Vec<tch_vis::io::Entry> {
    tch_vis::io::walk(&repo("examples/images/gray"), &[]).unwrap()
}

/// What the folder-sink tests start from: the digits model and sidecar,
/// the gray samples, saliency of the predicted class, a temporary folder.
struct FolderJob {
    model: Model,
    sidecar: Sidecar,
    inputs: Vec<tch_vis::io::Entry>,
    saliency: SaliencyMethod,
    dir: tempfile::TempDir,
}

impl FolderJob {
    fn new() -> Self {
        FolderJob {
            model: digits(),
            sidecar: digits_sidecar(),
            inputs: gray_inputs(),
            saliency: SaliencyMethod::new(&[ScoreSpec::Predicted]).unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// An engine of the saliency method over the model.
    fn engine(&self, batch: usize) -> Engine<'_> {
        Engine::new(&self.model, self.sidecar.clone(), &self.saliency).batch_size(batch)
    }
}

fn inputs(n: i64) -> Tensor {
    tch::manual_seed(5);
    Tensor::randn([n, 1, 32, 32], (Kind::Float, Device::Cpu))
}

/// With noise 0, every SmoothGrad sample is the clean input: the average
/// of |gradient| is |gradient|, so the maps are vanilla saliency's, to
/// float rounding of the average (1e-6).
#[test]
fn smoothgrad_without_noise_is_vanilla_saliency() {
    let model = digits();
    let x = inputs(4);
    let s = CategoricalScore::new(3).unwrap();
    let vanilla = Saliency::new(&model)
        .compute(&[x.shallow_clone()], &[&s as &dyn Score])
        .unwrap();
    let smooth = Saliency::new(&model)
        .smooth_samples(3)
        .smooth_noise(0.0)
        .compute(&[x], &[&s as &dyn Score])
        .unwrap();
    crate::util::assert_close("maps", &smooth.maps[0], &vanilla.maps[0], 0.0, 1e-6);
    crate::util::assert_close(
        "gradients",
        &smooth.gradients[0],
        &vanilla.gradients[0],
        1e-5,
        1e-9,
    );
    assert!(smooth.scores[0].equal(&vanilla.scores[0]));
}

/// An image's SmoothGrad map depends on its key and the seed, not on the
/// batch it shares or how the batch is cut.
#[test]
fn smoothgrad_does_not_depend_on_batching() {
    let model = digits();
    let x = inputs(6);
    let s = PredictedScore::new();
    let sal = Saliency::new(&model).smooth_samples(4).seed(9);
    let keys: Vec<u64> = (100..106).collect();
    let whole = sal
        .compute_keyed(&[x.shallow_clone()], &[&s as &dyn Score], &keys)
        .unwrap();
    for (start, len) in [(0, 2), (2, 3), (5, 1)] {
        let part = sal
            .compute_keyed(
                &[x.narrow(0, start, len)],
                &[&s as &dyn Score],
                &keys[start as usize..(start + len) as usize],
            )
            .unwrap();
        crate::util::assert_close(
            "chunked maps",
            &part.maps[0],
            &whole.maps[0].narrow(0, start, len),
            0.0,
            1e-6,
        );
    }
}

/// The caller's tensors keep their values, grad flag and `.grad`.
#[test]
fn saliency_leaves_the_callers_tensors_untouched() {
    let model = digits();
    let x = inputs(2).set_requires_grad(true);
    let before = x.detach().copy();
    let s = CategoricalScore::new(1).unwrap();
    Saliency::new(&model)
        .smooth_samples(2)
        .compute(&[x.shallow_clone()], &[&s as &dyn Score])
        .unwrap();
    assert!(x.detach().equal(&before));
    assert!(x.requires_grad());
    assert!(!x.grad().defined());
}

/// With SmoothGrad, `predicted` takes each image's class on the clean
/// input and keeps it over the noisy samples: with noise strong enough to
/// change the argmax, the maps equal those of `categorical` with the clean
/// classes, and the classes reported are the clean ones.
#[test]
fn predicted_stays_fixed_across_smoothgrad_samples() {
    let model = digits();
    let x = inputs(5);
    let clean = PredictedScore::new()
        .classes(&model.forward(&[x.shallow_clone()]).unwrap()[0])
        .unwrap();
    let sal = Saliency::new(&model)
        .smooth_samples(3)
        .smooth_noise(1.0)
        .seed(2);
    let p = PredictedScore::new();
    let got = sal
        .compute(&[x.shallow_clone()], &[&p as &dyn Score])
        .unwrap();
    let fixed = CategoricalScore::new(clean.clone()).unwrap();
    let want = sal
        .compute(&[x.shallow_clone()], &[&fixed as &dyn Score])
        .unwrap();
    assert!(
        got.maps[0].equal(&want.maps[0]),
        "predicted moved with the noise"
    );
    assert_eq!(got.classes[0].as_deref(), Some(clean.as_slice()));
    // The noise does move the argmax of some samples: the test has teeth.
    let noisy = &x + Tensor::randn([5, 1, 32, 32], (Kind::Float, Device::Cpu)) * 4.0;
    let moved = PredictedScore::new()
        .classes(&model.forward(&[noisy]).unwrap()[0])
        .unwrap();
    assert_ne!(moved, clean);
}

/// One image's path, scores and first array, as [`Collect`] keeps them.
type Kept = (String, Vec<f32>, Tensor);

/// A sink that keeps results in memory.
#[derive(Default)]
struct Collect(Mutex<Vec<Kept>>, Mutex<Vec<(String, String)>>);

impl Sink for Collect {
    fn image(&self, r: ImageResult) -> tch_vis::Result<()> {
        let map = r.arrays[0].values.shallow_clone();
        self.0.lock().unwrap().push((r.rel, r.scores, map));
        Ok(())
    }

    fn failed(&self, rel: &str, error: &str) -> tch_vis::Result<()> {
        self.1.lock().unwrap().push((rel.into(), error.into()));
        Ok(())
    }
}

/// Runs `engine` over `inputs` into a [`Collect`] sink: the run ends
/// without a fatal error and processes `processed` images. Returns the
/// images' results sorted by path, and the failures.
fn run_sorted(
    engine: &Engine,
    inputs: &[tch_vis::io::Entry],
    processed: usize,
) -> (Vec<Kept>, Vec<(String, String)>) {
    let sink = Collect::default();
    let summary = engine.run(inputs, &sink).unwrap();
    assert!(summary.fatal.is_none());
    assert_eq!(summary.processed, processed);
    let mut got = sink.0.into_inner().unwrap();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    (got, sink.1.into_inner().unwrap())
}

/// The engine hands every image to the sink once, with the same map
/// whatever the batch size, and reports inputs that do not decode.
#[test]
fn engine_results_do_not_depend_on_batch_size() {
    let model = digits();
    let sidecar = digits_sidecar();
    let method = SaliencyMethod::new(&[ScoreSpec::Predicted])
        .unwrap()
        .smooth(2, 0.2, 1);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("zz_broken.png"), b"not an image").unwrap();
    let mut inputs = tch_vis::io::walk(&repo("examples/images"), &[]).unwrap();
    inputs.extend(tch_vis::io::walk(dir.path(), &[]).unwrap());
    let mut runs = Vec::new();
    for batch in [1, 5, 32] {
        let engine = Engine::new(&model, sidecar.clone(), &method).batch_size(batch);
        let layout = engine.prepare().unwrap();
        assert_eq!(
            (layout.outputs, layout.class_outputs.clone()),
            (1, vec![true])
        );
        let (got, failed) = run_sorted(&engine, &inputs, 24);
        assert_eq!(failed.len(), 1);
        runs.push(got);
    }
    // Another batch size is another model call shape, where libtorch may
    // sum in another order: scores agree to 1e-6, maps to 1e-5, except
    // where the softmax saturates (p > 0.9999) and the map's normalisation
    // magnifies the last digits of a ~1e-7 gradient (2e-2, as the CLI's
    // golden check allows).
    for other in &runs[1..] {
        for (a, b) in runs[0].iter().zip(other) {
            assert_eq!(a.0, b.0);
            assert!(
                (a.1[0] - b.1[0]).abs() <= 1e-6,
                "{}: {:?} vs {:?}",
                a.0,
                a.1,
                b.1
            );
            let atol = if a.1[0] > 0.9999 { 2e-2 } else { 1e-5 };
            crate::util::assert_close(&a.0, &b.2, &a.2, 0.0, atol);
        }
    }
}

/// The steady rate: images after the first batch's worth over the time
/// from then to the last one; none for a run of one batch. The compute
/// thread's time splits into nested parts, and a CPU model never waits
/// for a device.
#[test]
fn engine_reports_a_steady_rate_past_the_first_batch() {
    let model = digits();
    let sidecar = digits_sidecar();
    let method = SaliencyMethod::new(&[ScoreSpec::Predicted]).unwrap();
    let inputs = gray_inputs();
    let n = inputs.len();
    assert!(n > 4, "{n} images");
    for (batch, some) in [(4, true), (n, false)] {
        let engine = Engine::new(&model, sidecar.clone(), &method).batch_size(batch);
        engine.prepare().unwrap();
        let summary = engine.run(&inputs, &Collect::default()).unwrap();
        assert_eq!(summary.processed, n);
        match summary.steady_images_per_second {
            Some(r) => {
                assert!(some, "batch {batch}: a rate for one batch");
                assert!(r.is_finite() && r > 0.0, "batch {batch}: {r}");
                // Its images over less than the whole run's time.
                let floor = (n - batch) as f64 / summary.seconds;
                assert!(r >= floor, "batch {batch}: {r} < {floor}");
            }
            None => assert!(!some, "batch {batch}: no rate"),
        }
        let t = summary.timings;
        assert!(t.compute_method > 0.0, "{t:?}");
        assert!(t.compute_method <= t.compute, "{t:?}");
        assert_eq!(t.compute_wait_device, 0.0, "{t:?}");
    }
}

/// SmoothGrad's probe (one sample, as cheap as vanilla saliency) stands in
/// for its compute: the same scores, classes, arrays and shapes on the
/// engine's all-padding probe batch.
#[test]
fn smoothgrad_probe_has_the_layout_of_its_compute() {
    use tch_vis::batch::Method;
    let model = digits();
    let x = Tensor::zeros([3, 1, 32, 32], (Kind::Float, Device::Cpu));
    let keys = [0u64; 3];
    let method = SaliencyMethod::new(&[ScoreSpec::Predicted])
        .unwrap()
        .smooth(25, 0.2, 1)
        .save_gradients(true);
    let probe = method.probe(&model, &x, &keys).unwrap();
    let full = method.compute(&model, &x, &keys).unwrap();
    let shapes = |r: &tch_vis::batch::BatchResult| {
        (
            r.scores.iter().map(Tensor::size).collect::<Vec<_>>(),
            r.classes.clone(),
            r.arrays
                .iter()
                .map(|a| {
                    (
                        a.name.clone(),
                        a.values.size(),
                        a.heat.as_ref().map(Tensor::size),
                    )
                })
                .collect::<Vec<_>>(),
            r.columns
                .iter()
                .map(|(n, t)| (n.clone(), t.size()))
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(shapes(&probe), shapes(&full));
    assert_eq!(probe.arrays.len(), 2);
}

/// A method that raises a cancel flag when it computes its first batch
/// (not the probe), once, and counts its batches.
struct CancelAtFirst<'a> {
    inner: SaliencyMethod,
    stop: &'a std::sync::atomic::AtomicBool,
    batches: std::sync::atomic::AtomicUsize,
}

impl tch_vis::batch::Method for CancelAtFirst<'_> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn arrays(&self) -> Vec<(String, bool)> {
        self.inner.arrays()
    }

    fn compute(
        &self,
        model: &tch_vis::Model,
        x: &Tensor,
        keys: &[u64],
    ) -> tch_vis::Result<tch_vis::batch::BatchResult> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.batches.fetch_add(1, Relaxed) == 0 {
            self.stop.store(true, Relaxed);
        }
        self.inner.compute(model, x, keys)
    }

    fn probe(
        &self,
        model: &tch_vis::Model,
        x: &Tensor,
        keys: &[u64],
    ) -> tch_vis::Result<tch_vis::batch::BatchResult> {
        self.inner.compute(model, x, keys)
    }
}

/// `Engine::cancel_on`: once the flag is up, no further batch is computed;
/// the batch in progress reaches the sink whole (on CUDA, where it is
/// still queued on the device when the next one arrives), and the run ends
/// with `Error::Cancelled`.
#[test]
fn engine_stops_after_the_batch_in_progress_once_cancelled() {
    use std::sync::atomic::Ordering::Relaxed;
    let sidecar = digits_sidecar();
    let inputs = tch_vis::io::walk(&repo("examples/images"), &[]).unwrap();
    for device in crate::util::devices() {
        let model = Model::load(repo("models/digits_cnn.pt"), device).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let method = CancelAtFirst {
            inner: SaliencyMethod::new(&[ScoreSpec::Predicted]).unwrap(),
            stop: &stop,
            batches: Default::default(),
        };
        let engine = Engine::new(&model, sidecar.clone(), &method)
            .batch_size(3)
            .cancel_on(&stop);
        engine.prepare().unwrap();
        let sink = Collect::default();
        let summary = engine.run(&inputs, &sink).unwrap();
        assert!(
            matches!(summary.fatal, Some(tch_vis::Error::Cancelled)),
            "{device:?}: {:?}",
            summary.fatal
        );
        // The one batch computed, whole, and nothing after it.
        assert_eq!(method.batches.load(Relaxed), 1, "{device:?}");
        assert_eq!(summary.processed, 3, "{device:?}");
        let got = sink.0.into_inner().unwrap();
        let mut rels: Vec<_> = got.iter().map(|k| k.0.clone()).collect();
        rels.sort();
        let first: Vec<_> = inputs[..3].iter().map(|e| e.rel.clone()).collect();
        assert_eq!(rels, first, "{device:?}");
        // Lowered, the same engine does them all.
        stop.store(false, Relaxed);
        let all = engine.run(&inputs, &Collect::default()).unwrap();
        assert!(all.fatal.is_none(), "{device:?}");
        assert_eq!(all.processed, inputs.len(), "{device:?}");
    }
}

/// Methods built from score objects (`from_scores`) run through the
/// engine as their specification twins do, with the same maps; a wrong
/// number of score objects is `ScoreCount` before the first image.
#[test]
fn engine_runs_methods_built_from_score_objects() {
    let model = digits();
    let sidecar = digits_sidecar();
    let inputs = gray_inputs();
    let by_spec = SaliencyMethod::new(&[ScoreSpec::Categorical(vec![3])]).unwrap();
    let by_object = SaliencyMethod::from_scores(vec![Box::new(CategoricalScore::new(3).unwrap())]);
    let mut runs = Vec::new();
    for method in [&by_spec, &by_object] {
        let engine = Engine::new(&model, sidecar.clone(), method).batch_size(4);
        engine.prepare().unwrap();
        runs.push(run_sorted(&engine, &inputs, inputs.len()).0);
    }
    for (a, b) in runs[0].iter().zip(&runs[1]) {
        assert_eq!((&a.0, &a.1), (&b.0, &b.1));
        crate::util::assert_close(&a.0, &b.2, &a.2, 0.0, 0.0);
    }
    let two = SaliencyMethod::from_scores(vec![
        Box::new(PredictedScore::new()),
        Box::new(PredictedScore::new()),
    ]);
    let err = Engine::new(&model, sidecar, &two).prepare().unwrap_err();
    assert!(
        matches!(
            err,
            tch_vis::Error::ScoreCount {
                outputs: 1,
                scores: 2
            }
        ),
        "{err:?}"
    );
}

/// On a CPU, a batch larger than the machine can allocate is refused by
/// `prepare`, before the first image, with its size in the message (here
/// 65,536 inputs of 3 × 2048 × 2048, 3.3 TB, through a model that takes any
/// size); the same engine with a batch that fits prepares.
#[test]
fn a_batch_the_machine_cannot_allocate_is_refused_before_the_first_image() {
    let model = Model::load(repo("tests/models/avgpool_rgb.pt"), Device::Cpu).unwrap();
    let sidecar = Sidecar::from_json(
        r#"{"input_size": [2048, 2048], "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}"#,
        "big.json",
    )
    .unwrap();
    let method = SaliencyMethod::new(&[ScoreSpec::Predicted]).unwrap();
    let err = Engine::new(&model, sidecar.clone(), &method)
        .batch_size(65536)
        .prepare()
        .unwrap_err();
    match &err {
        tch_vis::Error::Probe { what, .. } => assert!(
            what.contains("a batch of 65536 inputs of 3 × 2048 × 2048")
                && what.contains("3298.5 GB"),
            "{err}"
        ),
        _ => panic!("{err:?}"),
    }
    Engine::new(&model, sidecar, &method)
        .batch_size(2)
        .prepare()
        .unwrap();
}

/// Channels-last batches (opt-in) give the results of contiguous ones to
/// float rounding: the same classes, scores within 1e-5 and maps within
/// 1e-5, for saliency, Grad-CAM and Score-CAM (whose masked inputs follow
/// the input's memory order) on the bundled RGB digits model. The default
/// is contiguous at every size, as PyTorch's own tensors are: a colour
/// model at 96 × 96 on a CPU gets contiguous batches unless asked.
#[test]
fn channels_last_batches_match_contiguous_ones() {
    use tch_vis::batch::{CamMapMethod, Method};
    use tch_vis::cam::CamMethod;
    let path = repo("models/digits_rgb.pt");
    let model = Model::load(&path, Device::Cpu).unwrap();
    let sidecar = Sidecar::for_model(&path).unwrap();
    let big = repo("tests/models/avgpool_rgb.pt");
    let big_model = Model::load(&big, Device::Cpu).unwrap();
    let big_sidecar = Sidecar::for_model(&big).unwrap();
    assert_eq!(big_sidecar.input_size, [96, 96]);
    let saliency_big = SaliencyMethod::new(&[ScoreSpec::Predicted]).unwrap();
    let engine = Engine::new(&big_model, big_sidecar.clone(), &saliency_big);
    assert!(!engine.prepare().unwrap().channels_last);
    let engine = Engine::new(&big_model, big_sidecar, &saliency_big).channels_last(true);
    assert!(engine.prepare().unwrap().channels_last);
    let inputs = tch_vis::io::walk(&repo("examples/images/rgb"), &[]).unwrap();
    let saliency = SaliencyMethod::new(&[ScoreSpec::Predicted]).unwrap();
    let cam = CamMapMethod::new(CamMethod::GradCam, &[ScoreSpec::Predicted]).unwrap();
    let score_cam = CamMapMethod::new(CamMethod::ScoreCam, &[ScoreSpec::Predicted]).unwrap();
    for (method, map_tol) in [
        (&saliency as &dyn Method, 1e-5),
        (&cam, 1e-5),
        (&score_cam, 1e-5),
    ] {
        let mut runs = Vec::new();
        for on in [false, true] {
            let engine = Engine::new(&model, sidecar.clone(), method)
                .batch_size(8)
                .channels_last(on);
            assert_eq!(engine.prepare().unwrap().channels_last, on);
            runs.push(run_sorted(&engine, &inputs, inputs.len()).0);
        }
        for (a, b) in runs[0].iter().zip(&runs[1]) {
            assert_eq!(a.0, b.0);
            let (sa, sb) = (a.1[0], b.1[0]);
            assert!(
                (sa - sb).abs() <= 1e-5 * sa.abs().max(1.0),
                "{}: {sa} vs {sb}",
                a.0
            );
            if method.name() == "saliency" && a.0.ends_with("_w48h40.png") {
                // Upscaled flat areas: the model's max-pool ties fall on
                // other pixels when the convolutions sum in another order
                // (as between batch sizes; see the CLI golden check), so
                // the gradient's largest pixel, and the normalised map
                // with it, move. Scores agree (above).
                continue;
            }
            crate::util::assert_close(&a.0, &b.2, &a.2, 0.0, map_tol);
        }
    }
}

/// The preprocessing of every bundled sample equals PyTorch's (the inputs
/// of the CLI goldens), bit for bit.
#[test]
fn preprocessing_matches_the_cli_goldens() {
    let dir = repo("tests/golden/preprocess");
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let items: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let pre = tch_vis::preprocess::Preprocessor::new(
        Sidecar::for_model(repo("models/digits_cnn.pt")).unwrap(),
    );
    for item in &items {
        let rel = item["path"].as_str().unwrap();
        let got = pre.load(repo("examples/images").join(rel)).unwrap().input;
        let want = crate::util::npy(dir.join(item["input"].as_str().unwrap()));
        crate::util::assert_close(rel, &got.unsqueeze(0), &want, 0.0, 0.0);
    }
}

/// Score-CAM, Integrated Gradients and SmoothGrad skip a batch's padding rows (key 0,
/// last): pad rows filled with NaN give zero results, not NaN; the real
/// row's results are those of the same batch padded with zeros, bit for
/// bit, and those of the image alone to float rounding (the trunk's
/// kernels may sum differently for 1 row than for 4).
#[test]
fn score_cam_ig_and_smoothgrad_skip_padding_rows() {
    use tch_vis::batch::{CamMapMethod, IgMethod, Method, SaliencyMethod};
    use tch_vis::cam::CamMethod;
    use tch_vis::saliency::key_for;
    let model = Model::load(repo("models/digits_rgb.pt"), Device::Cpu).unwrap();
    let pre = tch_vis::preprocess::Preprocessor::new(
        Sidecar::for_model(repo("models/digits_rgb.pt")).unwrap(),
    );
    let image = pre
        .load(repo("examples/images/rgb/3/heldout_0091.png"))
        .unwrap()
        .input
        .unsqueeze(0);
    let pad = Tensor::full([3, 3, 32, 32], f64::NAN, (Kind::Float, Device::Cpu));
    let batch = Tensor::cat(&[&image, &pad], 0);
    let zero_padded = Tensor::cat(&[&image, &pad.zeros_like()], 0);
    let keys = [key_for("rgb/3/a.png"), 0, 0, 0];
    let methods: Vec<Box<dyn Method>> = vec![
        Box::new(CamMapMethod::new(CamMethod::ScoreCam, &[ScoreSpec::Predicted]).unwrap()),
        Box::new(CamMapMethod::new(CamMethod::FasterScoreCam, &[ScoreSpec::Predicted]).unwrap()),
        Box::new(IgMethod::new(&[ScoreSpec::Predicted]).unwrap().steps(8)),
        Box::new(
            SaliencyMethod::new(&[ScoreSpec::Predicted])
                .unwrap()
                .smooth(5, 0.2, 7),
        ),
    ];
    for m in &methods {
        let padded = m.compute(&model, &batch, &keys).unwrap();
        let zeros = m.compute(&model, &zero_padded, &keys).unwrap();
        let alone = m.compute(&model, &image, &keys[..1]).unwrap();
        let (got, want) = (&padded.arrays[0].values, &zeros.arrays[0].values);
        assert_eq!(got.size()[0], 4, "{}", m.name());
        assert!(
            got.narrow(0, 1, 3).eq(0.0).all().int64_value(&[]) == 1,
            "{}: padding rows were computed",
            m.name()
        );
        assert!(
            got.equal(want),
            "{}: the image's result depends on the padding",
            m.name()
        );
        assert!(
            got.narrow(0, 0, 1)
                .allclose(&alone.arrays[0].values, 1e-5, 1e-6, false),
            "{}: the image alone gives another result",
            m.name()
        );
        assert_eq!(
            padded.classes[0].as_ref().map(|c| c[0]),
            alone.classes[0].as_ref().map(|c| c[0]),
            "{}",
            m.name()
        );
    }
}

#[test]
fn openmp_sleeps_only_for_light_models_on_every_core() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pays = |rel: &str| {
        let path = repo(rel);
        let model = Model::load(&path, Device::Cpu).unwrap();
        tch_vis::batch::passive_openmp_pays(&model, &Sidecar::for_model(&path).unwrap()).unwrap()
    };
    // A global average pool on 96 x 96 colour images: microseconds a
    // forward pass, the run is decoding and writing (unless the policy is
    // chosen already in this process's environment).
    let chosen = std::env::var_os("OMP_WAIT_POLICY").is_some();
    assert_eq!(pays("tests/models/avgpool_rgb.pt"), cores > 1 && !chosen);
    // ~8 GFLOP a forward pass: tens of milliseconds on any CPU.
    assert!(!pays("tests/models/conv_rgb_heavy.pt"));
    // 32 x 32 gray inputs: one compute thread, no team to put to sleep.
    assert!(!pays("models/digits_cnn.pt"));
}

/// A method that returns its batch: the model input each image got, with
/// each row's sum as its score.
struct Echo;

/// [`Echo`], saying that its results depend on the input only through the
/// model's cast to its precision.
struct EchoThroughModel;

impl tch_vis::batch::Method for EchoThroughModel {
    fn name(&self) -> &str {
        "echo"
    }

    fn arrays(&self) -> Vec<(String, bool)> {
        Echo.arrays()
    }

    fn compute(
        &self,
        model: &Model,
        x: &Tensor,
        keys: &[u64],
    ) -> tch_vis::Result<tch_vis::batch::BatchResult> {
        Echo.compute(model, x, keys)
    }

    fn input_through_model_only(&self) -> bool {
        true
    }
}

/// 11 PNGs of four sizes and a file that is not an image, in `dir`.
fn mixed_pngs(dir: &std::path::Path) -> Vec<tch_vis::io::Entry> {
    std::fs::write(dir.join("a_broken.png"), b"not an image").unwrap();
    for (i, (w, h)) in [(120, 97), (96, 96), (61, 140), (300, 200)]
        .into_iter()
        .cycle()
        .take(11)
        .enumerate()
    {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let v = (x * 7 + y * 3 + i as u32 * 29) as u8;
            image::Rgb([v, (x * y) as u8, 255 - v])
        });
        img.save(dir.join(format!("img_{i:02}.png"))).unwrap();
    }
    let inputs = tch_vis::io::walk(dir, &[]).unwrap();
    assert_eq!(inputs.len(), 12);
    inputs
}

/// The bits of a float32 tensor's values.
fn bits(t: &Tensor) -> Vec<u32> {
    let v = Vec::<f32>::try_from(&t.contiguous().reshape([-1])).unwrap();
    v.iter().map(|x| x.to_bits()).collect()
}

/// On CUDA, a model in fp16 or bf16 gets a plain recipe's batch uploaded
/// rounded to its precision when the method sees the input only through
/// the model: each image's input is `Preprocessor::load`'s, rounded and
/// widened to float32, bit for bit (the same bits the model's own cast
/// gives). A method that does not say so, and every CPU run, get the
/// float32 input itself.
#[test]
fn half_precision_batches_round_only_for_methods_that_allow_it() {
    use tch_vis::preprocess::Preprocessor;
    use tch_vis::Precision;
    let dir = tempfile::tempdir().unwrap();
    let inputs = mixed_pngs(dir.path());
    let json = r#"{"input_size": [96, 96], "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}"#;
    let sidecar = Sidecar::from_json(json, "m.json").unwrap();
    let pre = Preprocessor::new(sidecar.clone());
    for device in crate::util::devices() {
        for precision in [Precision::Fp16, Precision::Bf16] {
            let mut model = Model::load(repo("tests/models/avgpool_rgb.pt"), device).unwrap();
            model.set_precision(precision).unwrap();
            let methods: [&dyn tch_vis::batch::Method; 2] = [&Echo, &EchoThroughModel];
            for (m, method) in methods.into_iter().enumerate() {
                // 6 batches of 2: the staging buffers are reused.
                let engine = Engine::new(&model, sidecar.clone(), method).batch_size(2);
                engine.prepare().unwrap();
                let (got, failed) = run_sorted(&engine, &inputs, 11);
                assert_eq!(failed.len(), 1);
                for (rel, _, x) in &got {
                    let mut want = pre.load(dir.path().join(rel)).unwrap().input;
                    if device.is_cuda() && m == 1 {
                        want = want.to_kind(precision.kind()).to_kind(Kind::Float);
                    }
                    assert_eq!(x.kind(), Kind::Float);
                    assert_eq!(
                        bits(x),
                        bits(&want),
                        "{rel} on {device:?}, {precision}, method {m}"
                    );
                }
            }
        }
    }
}

impl tch_vis::batch::Method for Echo {
    fn name(&self) -> &str {
        "echo"
    }

    fn arrays(&self) -> Vec<(String, bool)> {
        vec![("input".to_string(), false)]
    }

    fn compute(
        &self,
        _model: &Model,
        x: &Tensor,
        _keys: &[u64],
    ) -> tch_vis::Result<tch_vis::batch::BatchResult> {
        Ok(tch_vis::batch::BatchResult {
            scores: vec![x.f_sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float)?],
            classes: vec![None],
            arrays: vec![tch_vis::batch::BatchArray {
                name: "input".into(),
                values: x.shallow_clone(),
                heat: None,
            }],
            columns: Vec::new(),
        })
    }
}

/// Each image's row of a batch is the input `Preprocessor::load` makes
/// of it, bit for bit, on every device: on a CPU written by the decode
/// threads into the batch (in channels-last order for colour inputs over
/// 64 × 64), on CUDA from pinned rows (the torchvision recipe's crops as
/// bytes, normalised on the GPU), uploaded on the engine's copy stream
/// and brought back while the next batch runs. A file that fails to
/// decode leaves no hole: the rows after it close up. Batches of 5 over
/// 12 images, the last one padded, and of 2: more batches than the
/// engine's staging buffers, each reused while the device computes from
/// another and the batch before it is still queued.
#[test]
fn engine_batches_hold_each_images_input_bit_for_bit() {
    use tch_vis::preprocess::Preprocessor;
    let dir = tempfile::tempdir().unwrap();
    let inputs = mixed_pngs(dir.path());
    for device in crate::util::devices() {
        for (file, json) in [
            (
                "tests/models/avgpool_rgb.pt",
                r#"{"input_size": [96, 96], "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize": 100, "crop": [96, 96]}"#,
            ),
            (
                "tests/models/avgpool_rgb.pt",
                r#"{"input_size": [96, 96], "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}"#,
            ),
            (
                "models/digits_cnn.pt",
                r#"{"input_size": [32, 32], "channels": 1, "mean": [0.5], "std": [0.25], "resize": 36, "interpolation": "bicubic", "crop": [32, 32]}"#,
            ),
        ] {
            let model = Model::load(repo(file), device).unwrap();
            let sidecar = Sidecar::from_json(json, "m.json").unwrap();
            let pre = Preprocessor::new(sidecar.clone());
            for batch in [5, 2] {
                let engine = Engine::new(&model, sidecar.clone(), &Echo).batch_size(batch);
                engine.prepare().unwrap();
                let (got, failed) = run_sorted(&engine, &inputs, 11);
                assert_eq!(failed.len(), 1, "{json}");
                assert_eq!(failed[0].0, "a_broken.png");
                for (rel, score, x) in &got {
                    let want = pre.load(dir.path().join(rel)).unwrap().input;
                    assert_eq!(x.device(), Device::Cpu);
                    assert_eq!(
                        bits(x),
                        bits(&want),
                        "{rel} on {device:?}, batch {batch}: {json}"
                    );
                    let sum = want.sum(Kind::Double).double_value(&[]) as f32;
                    assert!(
                        (score[0] - sum).abs() <= 1e-4 * sum.abs().max(1.0),
                        "{rel} on {device:?}: score {} vs {sum}",
                        score[0]
                    );
                }
            }
        }
    }
}

/// A list of classes (one per sample) is refused by every batch method
/// when it is made, saying why, not by the engine's one-row probe.
#[test]
fn batch_methods_refuse_a_list_of_classes() {
    use tch_vis::batch::{CamMapMethod, IgMethod, ScoresMethod};
    use tch_vis::cam::CamMethod;
    let list = [ScoreSpec::Categorical(vec![1, 2])];
    let errors = [
        SaliencyMethod::new(&list).map(|_| ()).unwrap_err(),
        ScoresMethod::new(&list).map(|_| ()).unwrap_err(),
        CamMapMethod::new(CamMethod::GradCam, &list)
            .map(|_| ())
            .unwrap_err(),
        IgMethod::new(&list).map(|_| ()).unwrap_err(),
    ];
    for e in errors {
        match &e {
            tch_vis::Error::ScoreSpec { spec, reason } => {
                assert_eq!(spec, "categorical:1,2");
                assert!(reason.contains("one class to every image"), "{e}");
            }
            other => panic!("{other}"),
        }
    }
    assert!(SaliencyMethod::new(&[ScoreSpec::Categorical(vec![2])]).is_ok());
}

/// An output folder's record of what its results were made with, across
/// workers of different commands: the last worker to finish writes the
/// union into report.json (a worker of another command that began and
/// finished meanwhile included), a worker whose settings conflict with one
/// that began after it opened the folder is refused at `begin`, and after
/// `overwrite` with other values the other commands' sections are marked
/// stale, so that their reruns are refused.
#[test]
fn the_folder_record_of_settings_joins_workers_and_marks_overwritten_sections() {
    use serde_json::json;
    use tch_vis::batch::{FolderSink, ScoresMethod};
    let model = Model::load(repo("models/digits_cnn.pt"), Device::Cpu).unwrap();
    let sidecar = digits_sidecar();
    let saliency = SaliencyMethod::new(&[ScoreSpec::Predicted]).unwrap();
    let scores = ScoresMethod::new(&[ScoreSpec::Predicted]).unwrap();
    let salient = Engine::new(&model, sidecar.clone(), &saliency)
        .prepare()
        .unwrap();
    let scored = Engine::new(&model, sidecar.clone(), &scores)
        .prepare()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let shared = |score: &str| json!({"model": "m1", "score": [score]});
    let with_maps = |score: &str, samples: u64| {
        let mut v = shared(score);
        v["saliency"] = json!({"smooth_samples": samples});
        v
    };
    let sink = |layout, method: &dyn tch_vis::batch::Method, settings, overwrite| {
        FolderSink::open(&out, layout, method, &sidecar, overwrite)
            .and_then(|s| s.settings(settings, Some("saliency")))
    };
    let record = || -> serde_json::Value {
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
        r["results_settings"].clone()
    };
    // A scores worker begins; a saliency worker begins and finishes while
    // it runs; the scores worker, last, records both.
    let a = sink(&scored, &scores, shared("predicted"), false).unwrap();
    a.begin().unwrap();
    let b = sink(&salient, &saliency, with_maps("predicted", 0), false).unwrap();
    b.begin().unwrap();
    assert!(!b.finish(json!({})).unwrap().last);
    assert!(a.finish(json!({})).unwrap().last);
    assert_eq!(record(), with_maps("predicted", 0));
    assert!(!out.join(".tch-vis").exists());
    // Another SmoothGrad setting is refused at open.
    let refused = sink(&salient, &saliency, with_maps("predicted", 8), false);
    assert!(matches!(
        refused,
        Err(tch_vis::Error::OutputMismatch { .. })
    ));
    // Two workers that opened the folder before either began: the second
    // to begin is refused.
    let c = sink(&salient, &saliency, with_maps("predicted", 0), false).unwrap();
    let d = sink(&scored, &scores, shared("predicted"), false).unwrap();
    let e = sink(&salient, &saliency, with_maps("predicted", 0), false).unwrap();
    // (`e` agrees with the record; a worker of other scores opened too.)
    let f = FolderSink::open(&out, &scored, &scores, &sidecar, true)
        .and_then(|s| s.settings(shared("categorical:3"), None))
        .unwrap();
    c.begin().unwrap();
    // While `c` writes maps of the predicted class, an overwrite with
    // another score would mix the two: refused until `c` is done.
    assert!(matches!(
        f.begin(),
        Err(tch_vis::Error::OutputMismatch { .. })
    ));
    c.finish(json!({})).unwrap();
    f.begin().unwrap();
    // `f` overwrote with another score: the saliency section is stale, and
    // `d`, which agreed with the record at open, no longer does.
    assert!(matches!(
        d.begin(),
        Err(tch_vis::Error::OutputMismatch { .. })
    ));
    assert!(matches!(
        e.begin(),
        Err(tch_vis::Error::OutputMismatch { .. })
    ));
    f.finish(json!({})).unwrap();
    let r = record();
    assert_eq!(r["score"], json!(["categorical:3"]));
    assert!(r["saliency"].as_str().unwrap().starts_with("stale"), "{r}");
    assert!(matches!(
        sink(&salient, &saliency, with_maps("categorical:3", 0), false),
        Err(tch_vis::Error::OutputMismatch { .. })
    ));
}

/// An `overwrite` run that changes only its own command's section leaves
/// the other commands' sections as they are; one that changes a shared
/// value marks them stale; and overwriting replaces an unreadable record.
#[test]
fn overwriting_ones_own_section_leaves_the_others() {
    use serde_json::json;
    use tch_vis::batch::FolderSink;
    let model = Model::load(repo("models/digits_cnn.pt"), Device::Cpu).unwrap();
    let sidecar = digits_sidecar();
    let saliency = SaliencyMethod::new(&[ScoreSpec::Predicted]).unwrap();
    let layout = Engine::new(&model, sidecar.clone(), &saliency)
        .prepare()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = |settings: serde_json::Value, section: &str, overwrite: bool| {
        let sink = FolderSink::open(&out, &layout, &saliency, &sidecar, overwrite)
            .and_then(|s| s.settings(settings, Some(section)))?;
        sink.begin()?;
        sink.finish(json!({}))?;
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
        Ok::<_, tch_vis::Error>(r["results_settings"].clone())
    };
    let both =
        |a: u64, b: &str| json!({"model": "m", "saliency": {"samples": a}, "cam": {"method": b}});
    let only = |key: &str, v: serde_json::Value| {
        let mut m = json!({"model": "m"});
        m[key] = v;
        m
    };
    run(only("saliency", json!({"samples": 0})), "saliency", false).unwrap();
    run(only("cam", json!({"method": "gradcam"})), "cam", false).unwrap();
    // cam overwrites with another method: saliency's maps stay valid.
    let r = run(only("cam", json!({"method": "layercam"})), "cam", true).unwrap();
    assert_eq!(r, both(0, "layercam"));
    run(only("saliency", json!({"samples": 0})), "saliency", false).unwrap();
    // Another model, overwritten by saliency: cam's maps are stale.
    let r = run(
        json!({"model": "m2", "saliency": {"samples": 0}}),
        "saliency",
        true,
    )
    .unwrap();
    assert!(r["cam"].as_str().unwrap().starts_with("stale"), "{r}");
    let e = run(
        json!({"model": "m2", "cam": {"method": "layercam"}}),
        "cam",
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("rerun cam with --overwrite"), "{e}");
    // An unreadable record: refused, unless overwriting.
    std::fs::create_dir_all(out.join(".tch-vis/settings")).unwrap();
    std::fs::write(out.join(".tch-vis/settings/0-host-1.json"), b"garbage").unwrap();
    assert!(run(only("saliency", json!({"samples": 0})), "saliency", false).is_err());
    run(
        json!({"model": "m2", "saliency": {"samples": 0}}),
        "saliency",
        true,
    )
    .unwrap();
}

/// A sink opened without settings keeps the folder's record of them in
/// `report.json` (it used to drop it, and a CLI rerun with other settings
/// was then taken); an overwriting one without settings drops it, as its
/// results' settings are unknown.
#[test]
fn a_sink_without_settings_keeps_the_folders_record() {
    use serde_json::json;
    use tch_vis::batch::FolderSink;
    let model = digits();
    let sidecar = digits_sidecar();
    let method = SaliencyMethod::new(&[ScoreSpec::Predicted]).unwrap();
    let engine = Engine::new(&model, sidecar.clone(), &method).batch_size(4);
    let layout = engine.prepare().unwrap();
    let inputs = gray_inputs();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let settings = json!({"model": "m1", "saliency": {"smooth_samples": 0}});
    let run = |sink: FolderSink, entries: &[tch_vis::io::Entry]| {
        sink.begin().unwrap();
        let summary = engine.run(entries, &sink).unwrap();
        assert!(summary.fatal.is_none());
        sink.finish(json!({})).unwrap();
    };
    let record = || -> serde_json::Value {
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
        r["results_settings"].clone()
    };
    let open = |overwrite| FolderSink::open(&out, &layout, &method, &sidecar, overwrite).unwrap();
    run(
        open(false)
            .settings(settings.clone(), Some("saliency"))
            .unwrap(),
        &inputs[..2],
    );
    assert_eq!(record(), settings);
    run(open(false), &inputs[2..]);
    assert_eq!(record(), settings);
    let other = json!({"model": "m1", "saliency": {"smooth_samples": 8}});
    assert!(matches!(
        open(false).settings(other.clone(), Some("saliency")),
        Err(tch_vis::Error::OutputMismatch { .. })
    ));
    run(open(true), &inputs[..1]);
    assert_eq!(record(), serde_json::Value::Null);
    open(false).settings(other, Some("saliency")).unwrap();
}

/// A folder sink takes no result before `begin` (which marks the worker
/// active, so that no other worker folds its journal away): the run stops
/// at its first batch with `Error::InvalidValue` naming the call, and no
/// map is written.
#[test]
fn a_folder_sink_refuses_results_before_begin() {
    use tch_vis::batch::FolderSink;
    let job = FolderJob::new();
    let out = job.dir.path().join("out");
    let engine = job.engine(2);
    let layout = engine.prepare().unwrap();
    let sink = FolderSink::open(&out, &layout, &job.saliency, &job.sidecar, false).unwrap();
    let summary = engine.run(&job.inputs[..3], &sink).unwrap();
    assert_eq!(summary.processed, 0);
    match summary.fatal {
        Some(tch_vis::Error::InvalidValue { what, value }) => {
            assert_eq!(what, "use of FolderSink");
            assert!(value.contains("before FolderSink::begin"), "{value}");
        }
        other => panic!("{other:?}"),
    }
    let maps = tch_vis::io::walk(&out, &[]).map_or(0, |files| {
        files.iter().filter(|e| e.rel.ends_with(".npy")).count()
    });
    assert_eq!(maps, 0);
}

/// Originals over an eighth of the allocation limit are not held through
/// the batch: the folder sink decodes them again for its overlays over the
/// original, to the same PNG bytes as a kept original. (The digits' 2–3 KB
/// originals, under a 16 KiB limit.)
#[test]
fn large_originals_are_decoded_again_for_their_overlay() {
    use tch_vis::batch::FolderSink;
    use tch_vis::preprocess::Preprocessor;
    let job = FolderJob::new();
    let FolderJob {
        sidecar,
        inputs,
        saliency,
        dir,
        ..
    } = &job;
    let kept: Vec<bool> = [u64::from(512u32 << 20), 16 << 10]
        .iter()
        .enumerate()
        .map(|(k, &limit)| {
            let out = dir.path().join(format!("out{k}"));
            let pre = Preprocessor::new(sidecar.clone())
                .keep_original(true)
                .limits(16384, limit);
            // What the engine hands the sink: the original or not.
            struct Held(Mutex<Vec<bool>>);
            impl Sink for Held {
                fn image(&self, r: ImageResult) -> tch_vis::Result<()> {
                    self.0.lock().unwrap().push(r.original.is_some());
                    Ok(())
                }
                fn failed(&self, _: &str, _: &str) -> tch_vis::Result<()> {
                    Ok(())
                }
            }
            let engine = job.engine(4).preprocessor(pre.clone());
            let layout = engine.prepare().unwrap();
            let held = Held(Mutex::new(Vec::new()));
            assert!(engine.run(inputs, &held).unwrap().fatal.is_none());
            let sink = FolderSink::open(&out, &layout, saliency, sidecar, false)
                .unwrap()
                .overlay_original(pre);
            sink.begin().unwrap();
            let summary = engine.run(inputs, &sink).unwrap();
            assert!(summary.fatal.is_none(), "{:?}", summary.fatal);
            assert_eq!(summary.processed, inputs.len());
            let held = held.0.into_inner().unwrap();
            assert_eq!(held.len(), inputs.len());
            held.iter().all(|&h| h)
        })
        .collect();
    assert_eq!(kept, [true, false], "originals kept under each limit");
    for e in inputs {
        let png = |k: usize| {
            std::fs::read(dir.path().join(format!("out{k}/{}.saliency.png", e.rel))).unwrap()
        };
        let (a, b) = (png(0), png(1));
        assert!(a == b, "{}: the overlays differ", e.rel);
        // At the original's size.
        let img = image::load_from_memory(&a).unwrap();
        let original = image::open(&e.path).unwrap();
        assert_eq!(
            (img.width(), img.height()),
            (original.width(), original.height()),
            "{}",
            e.rel
        );
    }
}

/// The journal of an unfinished run with other columns (saliency's rows,
/// then Integrated Gradients, which adds `ig_delta`) is refused at open
/// and kept: a later run used to compact it away with its rows. An
/// overwriting run takes the folder, journal and all.
#[test]
fn an_unfinished_run_of_other_columns_is_refused_and_kept() {
    use tch_vis::batch::{FolderSink, IgMethod};
    let job = FolderJob::new();
    let FolderJob {
        model,
        sidecar,
        inputs,
        saliency,
        dir,
    } = &job;
    let out = dir.path().join("out");
    let engine = job.engine(2);
    let layout = engine.prepare().unwrap();
    let sink = FolderSink::open(&out, &layout, saliency, sidecar, false).unwrap();
    sink.begin().unwrap();
    assert!(engine.run(&inputs[..3], &sink).unwrap().fatal.is_none());
    // Killed before `finish`: its rows are in its journal only (and the
    // marker of a dead process does not count as active).
    drop(sink);
    std::fs::remove_dir_all(out.join(".tch-vis/active")).unwrap();
    let journals = || std::fs::read_dir(out.join(".tch-vis/rows")).map_or(0, |r| r.count());
    assert_eq!(journals(), 1);
    let ig = IgMethod::new(&[ScoreSpec::Predicted]).unwrap().steps(2);
    let ig_layout = Engine::new(model, sidecar.clone(), &ig).prepare().unwrap();
    match FolderSink::open(&out, &ig_layout, &ig, sidecar, false) {
        Err(tch_vis::Error::OutputMismatch { reason, .. }) => {
            assert!(reason.contains("holds rows of another run"), "{reason}")
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert_eq!(journals(), 1);
    // The saliency run resumes where it stopped, its three rows kept.
    let again = FolderSink::open(&out, &layout, saliency, sidecar, false).unwrap();
    assert_eq!(inputs.iter().filter(|e| again.is_done(&e.rel)).count(), 3);
    // Overwriting, Integrated Gradients takes the folder.
    let sink = FolderSink::open(&out, &ig_layout, &ig, sidecar, true).unwrap();
    sink.begin().unwrap();
    let ig_engine = Engine::new(model, sidecar.clone(), &ig);
    assert!(ig_engine.run(&inputs[..1], &sink).unwrap().fatal.is_none());
    assert_eq!(
        sink.finish(serde_json::json!({}))
            .unwrap()
            .merged
            .rows
            .len(),
        1
    );
    assert_eq!(journals(), 0);
    let csv = std::fs::read_to_string(out.join("scores.csv")).unwrap();
    assert!(
        csv.starts_with("path,score_0,class_0,label_0,ig_delta\n"),
        "{csv}"
    );
}

/// A batch size over `MAX_BATCH_SIZE` is `InvalidValue` from `prepare`
/// and from `run` (which used to abort the process allocating it, or
/// panic sizing a channel), before any image reaches the sink.
#[test]
fn batch_sizes_over_the_maximum_are_refused() {
    use tch_vis::batch::MAX_BATCH_SIZE;
    let model = digits();
    let sidecar = digits_sidecar();
    let method = SaliencyMethod::new(&[ScoreSpec::Predicted]).unwrap();
    let inputs = gray_inputs();
    for n in [MAX_BATCH_SIZE + 1, 100_000_000, usize::MAX] {
        let engine = Engine::new(&model, sidecar.clone(), &method).batch_size(n);
        let err = engine.prepare().unwrap_err();
        assert!(
            matches!(err, tch_vis::Error::InvalidValue { .. })
                && err.to_string().contains(&n.to_string()),
            "{err:?}"
        );
        let sink = Collect::default();
        let err = engine.run(&inputs, &sink).unwrap_err();
        assert!(
            matches!(err, tch_vis::Error::InvalidValue { .. }),
            "{err:?}"
        );
        assert!(sink.0.into_inner().unwrap().is_empty());
    }
}

/// A method whose results have fewer rows than the batch has images.
struct Rows {
    inner: SaliencyMethod,
    probe_rows: i64,
    compute_rows: i64,
}

impl Rows {
    fn cut(
        res: tch_vis::Result<tch_vis::batch::BatchResult>,
        rows: i64,
    ) -> tch_vis::Result<tch_vis::batch::BatchResult> {
        let mut res = res?;
        for a in &mut res.arrays {
            a.values = a.values.narrow(0, 0, rows);
            a.heat = a.heat.as_ref().map(|h| h.narrow(0, 0, rows));
        }
        Ok(res)
    }
}

impl tch_vis::batch::Method for Rows {
    fn name(&self) -> &str {
        "rows"
    }

    fn arrays(&self) -> Vec<(String, bool)> {
        self.inner.arrays()
    }

    fn compute(
        &self,
        model: &Model,
        x: &Tensor,
        keys: &[u64],
    ) -> tch_vis::Result<tch_vis::batch::BatchResult> {
        Self::cut(self.inner.compute(model, x, keys), self.compute_rows)
    }

    fn probe(
        &self,
        model: &Model,
        x: &Tensor,
        keys: &[u64],
    ) -> tch_vis::Result<tch_vis::batch::BatchResult> {
        Self::cut(self.inner.compute(model, x, keys), self.probe_rows)
    }
}

/// A method's result with too few rows is a `Shape` error naming the
/// method: from `prepare` for the probe, and as the run's fatal error for
/// a batch, without the hint about models traced at a fixed batch size
/// unless it has the one row such a model gives.
#[test]
fn a_method_result_with_too_few_rows_is_a_shape_error() {
    let model = digits();
    let sidecar = digits_sidecar();
    let inputs = gray_inputs();
    let method = |probe_rows, compute_rows| Rows {
        inner: SaliencyMethod::new(&[ScoreSpec::Predicted]).unwrap(),
        probe_rows,
        compute_rows,
    };
    let none = method(0, 3);
    let err = Engine::new(&model, sidecar.clone(), &none)
        .prepare()
        .unwrap_err();
    match &err {
        tch_vis::Error::Probe { source, .. } => {
            assert!(matches!(**source, tch_vis::Error::Shape { .. }), "{err:?}")
        }
        _ => panic!("{err:?}"),
    }
    let two = method(1, 2);
    let engine = Engine::new(&model, sidecar.clone(), &two).batch_size(3);
    engine.prepare().unwrap();
    let sink = Collect::default();
    let summary = engine.run(&inputs, &sink).unwrap();
    let fatal = summary.fatal.expect("a fatal error");
    assert!(matches!(fatal, tch_vis::Error::Shape { .. }), "{fatal:?}");
    let text = fatal.to_string();
    assert!(
        text.contains("rows's saliency") && !text.contains("traced"),
        "{text}"
    );
    assert!(sink.0.into_inner().unwrap().is_empty());
    // One row for a batch of 3, as a model traced at batch 1 gives: the
    // hint.
    let one = method(1, 1);
    let engine = Engine::new(&model, sidecar, &one).batch_size(3);
    let fatal = engine
        .run(&inputs, &Collect::default())
        .unwrap()
        .fatal
        .expect("a fatal error");
    assert!(fatal.to_string().contains("traced"), "{fatal}");
}

/// A run that begins while another of other settings is writing into the
/// folder backs out (nothing of it left): here an overwriting run, whose
/// first check takes any record, against a worker of another host still
/// at work with another score. The same worker's file without its marker
/// (a finished or killed run, whose results are recomputed) is taken.
/// `begin` makes the journal at once, so a run of other columns is refused
/// by a run killed before its first row.
#[test]
fn a_run_that_begins_beside_one_of_other_settings_backs_out() {
    use serde_json::json;
    use tch_vis::batch::{FolderSink, IgMethod};
    let model = digits();
    let sidecar = digits_sidecar();
    let method = SaliencyMethod::new(&[ScoreSpec::Predicted]).unwrap();
    let layout = Engine::new(&model, sidecar.clone(), &method)
        .prepare()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let journal = out.join(".tch-vis");
    std::fs::create_dir_all(journal.join("settings")).unwrap();
    std::fs::create_dir_all(journal.join("active")).unwrap();
    let other = "00000000000000000001-otherhost-4242";
    std::fs::write(
        journal.join("settings").join(format!("{other}.json")),
        json!({"model": "m1", "score": ["categorical:3"]}).to_string(),
    )
    .unwrap();
    std::fs::write(journal.join("active").join(other), b"").unwrap();
    let sink = FolderSink::open(&out, &layout, &method, &sidecar, true)
        .unwrap()
        .settings(json!({"model": "m1", "score": ["predicted"]}), None)
        .unwrap();
    match sink.begin() {
        Err(tch_vis::Error::OutputMismatch { reason, .. }) => {
            assert!(
                reason.contains("another run is writing into it"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    let left = |sub: &str| std::fs::read_dir(journal.join(sub)).unwrap().count();
    assert_eq!((left("settings"), left("active")), (1, 1));
    assert!(!journal.join("rows").exists());
    // Its marker gone, the other worker's settings are recomputed over.
    std::fs::remove_file(journal.join("active").join(other)).unwrap();
    sink.begin().unwrap();
    // Killed before its first row: its journal holds the header.
    drop(sink);
    std::fs::remove_dir_all(journal.join("active")).unwrap();
    let ig = IgMethod::new(&[ScoreSpec::Predicted]).unwrap().steps(2);
    let ig_layout = Engine::new(&model, sidecar.clone(), &ig).prepare().unwrap();
    assert!(matches!(
        FolderSink::open(&out, &ig_layout, &ig, &sidecar, false),
        Err(tch_vis::Error::OutputMismatch { .. })
    ));
}
