//! The batch job: checks before the first image, then a pipeline.
//!
//! ```text
//!  producer thread            compute (this thread)         writer threads      collector thread
//!  rayon: read+decode+resize  stack, to device, forward /   heatmap PNG, npy,   rows of scores.csv,
//!  one batch at a time   ──►  gradients, back to CPU   ──►  atomic writes  ──►  progress, failures,
//!  (bounded channel, 2)       (bounded channel)             (all cores)         periodic flush
//! ```
//!
//! Memory is bounded by the channel capacities, whatever the folder size. A
//! row enters `scores.csv` only after every file of its image is written, so
//! after a crash a rerun recomputes exactly the images that are incomplete.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};
use tch_vis::io::{self, Entry, Shard};
use tch_vis::preprocess::{self, Prepared, Preprocessor, Sidecar};
use tch_vis::saliency::{key_for, Saliency};
use tch_vis::scores::{CategoricalScore, PredictedScore, Score, ScoreSpec};
use tch_vis::{device_name, DeviceSpec, Model, Precision};

use crate::table::{self, Existing, Rows};

/// Which subcommand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Scores, gradients and maps.
    Saliency,
    /// Scores only.
    Scores,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Saliency => "saliency",
            Mode::Scores => "scores",
        }
    }
}

/// A validated command line.
#[derive(Debug)]
pub struct Job {
    pub mode: Mode,
    pub model: PathBuf,
    pub images: PathBuf,
    pub out: PathBuf,
    pub specs: Vec<ScoreSpec>,
    pub device: DeviceSpec,
    pub precision: Precision,
    pub batch_size: usize,
    pub shard: Shard,
    pub shard_source: String,
    pub overwrite: bool,
    pub strict: bool,
    pub smooth_samples: usize,
    pub smooth_noise: f64,
    pub seed: u64,
    pub save_npy: bool,
}

/// A job whose every pre-image check passed.
pub struct Ready {
    job: Job,
    device: Device,
    model: Model,
    sidecar: Sidecar,
    specs: Vec<ScoreSpec>,
    entries: Vec<Entry>,
    rows: Rows,
    /// libtorch threads of the compute thread.
    compute_threads: usize,
}

/// How a run ended.
pub struct Outcome {
    /// Inputs that failed.
    pub failed: usize,
    /// Why the run stopped early, if it did.
    pub fatal: Option<String>,
}

fn lib<T>(r: tch_vis::Result<T>) -> anyhow::Result<T> {
    r.map_err(|e| anyhow!(e.summary()))
}

/// Everything that can be checked before the first image. Any error here
/// means exit status 2, and nothing has been written.
pub fn prepare(job: Job) -> anyhow::Result<Ready> {
    let device = lib(job.device.resolve())?;
    let images_meta = std::fs::metadata(&job.images)
        .with_context(|| format!("cannot read image folder {}", job.images.display()))?;
    if !images_meta.is_dir() {
        bail!("image folder {} is not a directory", job.images.display());
    }
    std::fs::read_dir(&job.images)
        .with_context(|| format!("cannot read image folder {}", job.images.display()))?;
    if let Ok(m) = std::fs::metadata(&job.out) {
        if !m.is_dir() {
            bail!("output {} exists and is not a directory", job.out.display());
        }
    }
    let model_meta = std::fs::metadata(&job.model)
        .with_context(|| format!("cannot read model {}", job.model.display()))?;
    if model_meta.is_dir() {
        bail!(
            "model {} is a directory, not a TorchScript file",
            job.model.display()
        );
    }
    std::fs::File::open(&job.model)
        .with_context(|| format!("cannot read model {}", job.model.display()))?;
    let sidecar_path = Sidecar::path_for_model(&job.model);
    let sidecar = Sidecar::load(&sidecar_path).map_err(|e| match e {
        tch_vis::Error::Io { source, .. } => anyhow!(
            "cannot read model sidecar {}: {source} (the sidecar M.json beside M.pt gives input_size, channels, mean and std)",
            sidecar_path.display()
        ),
        other => anyhow!(other.summary()),
    })?;
    let mut model = lib(Model::load(&job.model, device))?;
    lib(model.set_precision(job.precision))?;
    if device.is_cuda() {
        // Batches are padded to one fixed shape: let cuDNN pick the fastest
        // algorithm for it once.
        tch::Cuda::cudnn_set_benchmark(true);
    }

    // Probe the model with one zero image of the sidecar's size.
    let [h, w] = sidecar.size_i64();
    let c = sidecar.channels as i64;
    let probe = Tensor::f_zeros([1, c, h, w], (Kind::Float, device))?;
    let outputs = model.forward(&[probe.shallow_clone()]).map_err(|e| {
        anyhow!(
            "the model fails on a (1, {c}, {h}, {w}) input as its sidecar describes: {}",
            e.summary()
        )
    })?;
    let specs = if job.specs.is_empty() {
        if outputs.len() != 1 {
            bail!(
                "the model has {} outputs: give one --score per output, in order",
                outputs.len()
            );
        }
        vec![ScoreSpec::Predicted]
    } else {
        job.specs.clone()
    };
    if specs.len() != outputs.len() {
        bail!(
            "the model has {} output{} but {} --score {} given (one per output, in order)",
            outputs.len(),
            if outputs.len() == 1 { "" } else { "s" },
            specs.len(),
            if specs.len() == 1 { "was" } else { "were" }
        );
    }
    for (k, (spec, out)) in specs.iter().zip(&outputs).enumerate() {
        spec.check(&out.size()).map_err(|e| {
            anyhow!(
                "--score {spec} does not fit output {k} of shape {:?}: {}",
                out.size(),
                e.summary()
            )
        })?;
    }
    let boxed = specs
        .iter()
        .map(ScoreSpec::to_score)
        .collect::<tch_vis::Result<Vec<_>>>()
        .map_err(|e| anyhow!(e.summary()))?;
    let refs: Vec<&dyn Score> = boxed.iter().map(|b| b.as_ref() as &dyn Score).collect();
    if job.mode == Mode::Saliency {
        // On CUDA, probe at the real batch shape: a batch that does not fit
        // in GPU memory is found here (exit 2, nothing written), and cuDNN
        // picks its algorithms for that shape before the first image.
        let full = if device.is_cuda() {
            Tensor::f_zeros([job.batch_size as i64, c, h, w], (Kind::Float, device))?
        } else {
            probe.shallow_clone()
        };
        model.gradients(&[full], &refs).map_err(|e| {
            anyhow!(
                "cannot take gradients of the scores on a probe input: {}",
                e.summary()
            )
        })?;
    }
    let compute_threads = compute_threads(job.mode, device, &model, &probe, &refs);

    let entries = lib(io::walk(&job.images, std::slice::from_ref(&job.out)))?;
    let csv = job.out.join("scores.csv");
    let rows = match table::read(&csv, outputs.len())
        .with_context(|| format!("cannot read {}", csv.display()))?
    {
        Existing::None => Rows::new(),
        Existing::Rows(r) => r,
        Existing::Mismatch(_) if job.overwrite => Rows::new(),
        Existing::Mismatch(h) => bail!(
            "{} has header {h:?} but this model has {} output(s); use another --out or --overwrite",
            csv.display(),
            outputs.len()
        ),
    };
    Ok(Ready {
        job,
        device,
        model,
        sidecar,
        specs,
        entries,
        rows,
        compute_threads,
    })
}

fn output_path(out: &Path, rel: &str, suffix: &str) -> PathBuf {
    out.join(format!("{rel}{suffix}"))
}

/// What flows from the compute thread to the writers.
struct WriteJob {
    rel: String,
    /// The resized image `(C, H, W)` in [0, 1], on the CPU.
    image: Tensor,
    map: Vec<f32>,
    grad: Option<Vec<f32>>,
    values: Vec<String>,
}

/// What flows to the collector.
enum Event {
    Done { rel: String, values: Vec<String> },
    Failed { rel: String, error: String },
    Fatal(String),
}

/// Results of the collector.
struct Collected {
    rows: Rows,
    processed: usize,
    failed: BTreeMap<String, String>,
    fatal: Option<String>,
}

/// Where the pipeline's time went (seconds, summed over the run): the
/// profile that says which stage bounds the throughput.
#[derive(Default)]
struct Timings {
    /// Wall time of decoding batches (the decode pool, all threads busy).
    decode: AtomicU64,
    /// The compute thread waiting for a decoded batch.
    wait_decode: AtomicU64,
    /// The compute thread running batches (stack, model, maps, copies).
    compute: AtomicU64,
    /// The compute thread blocked on a full writer queue.
    wait_write: AtomicU64,
    /// Writer threads encoding and writing files (summed over threads).
    write: AtomicU64,
}

impl Timings {
    fn add(slot: &AtomicU64, since: Instant) {
        slot.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn json(&self) -> serde_json::Value {
        let s = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 * 1e-9;
        serde_json::json!({
            "decode": s(&self.decode),
            "compute_wait_decode": s(&self.wait_decode),
            "compute": s(&self.compute),
            "compute_wait_write": s(&self.wait_write),
            "write_all_threads": s(&self.write),
        })
    }
}

/// Runs the job. Errors returned here mean exit status 1.
pub fn execute(ready: Ready) -> anyhow::Result<Outcome> {
    let start = Instant::now();
    let Ready {
        job,
        device,
        model,
        sidecar,
        specs,
        entries,
        mut rows,
        compute_threads,
    } = ready;
    std::fs::create_dir_all(&job.out)
        .with_context(|| format!("cannot create output folder {}", job.out.display()))?;
    io::remove_stale_temps(&job.out);

    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    let mut skipped = 0usize;
    let mut pending = Vec::new();
    let mut selected = 0usize;
    for (i, e) in entries.iter().enumerate() {
        if !job.shard.contains(i) {
            continue;
        }
        selected += 1;
        if let Some(p) = &e.problem {
            rows.remove(&e.rel);
            failed.insert(e.rel.clone(), p.clone());
        } else if !job.overwrite && is_done(&job, &rows, &e.rel) {
            skipped += 1;
        } else {
            pending.push(e.clone());
        }
    }

    let total = pending.len();
    let timings = Timings::default();
    let collected = run_pipeline(
        &job,
        device,
        &model,
        &sidecar,
        &specs,
        pending,
        rows,
        &timings,
        compute_threads,
    )?;
    failed.extend(collected.failed);
    let csv = job.out.join("scores.csv");
    let csv_result = io::write_atomic(&csv, table::render(specs.len(), &collected.rows).as_bytes());
    let mut fatal = collected.fatal;
    if let Err(e) = csv_result {
        fatal.get_or_insert(e.summary());
    }
    let seconds = start.elapsed().as_secs_f64();
    let ips = if seconds > 0.0 {
        collected.processed as f64 / seconds
    } else {
        0.0
    };
    let report = serde_json::json!({
        "command": job.mode.name(),
        "processed": collected.processed,
        "skipped": skipped,
        "failed": failed.iter().map(|(p, e)| serde_json::json!({"path": p, "error": e})).collect::<Vec<_>>(),
        "device": device_name(device),
        "seconds": seconds,
        "images_per_second": ips,
        "timings_seconds": timings.json(),
        "compute_threads": compute_threads,
        "model": job.model.display().to_string(),
        "images": job.images.display().to_string(),
        "out": job.out.display().to_string(),
        "scores": specs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "input_size": sidecar.input_size,
        "channels": sidecar.channels,
        "batch_size": job.batch_size,
        "smooth_samples": job.smooth_samples,
        "smooth_noise": job.smooth_noise,
        "precision": job.precision.to_string(),
        "seed": job.seed,
        "save_npy": job.save_npy,
        "overwrite": job.overwrite,
        "shard": job.shard.to_string(),
        "shard_source": job.shard_source,
        "files_found": entries.len(),
        "files_in_shard": selected,
        "to_process": total,
        "rows_in_scores_csv": collected.rows.len(),
        "error": fatal,
        "tch_vis_version": env!("CARGO_PKG_VERSION"),
    });
    let text = serde_json::to_string_pretty(&report).unwrap_or_else(|_| "{}".into());
    if let Err(e) = io::write_atomic(&job.out.join("report.json"), text.as_bytes()) {
        fatal.get_or_insert(e.summary());
    }
    let summary = format!(
        "tch-vis {}: {} processed, {} skipped, {} failed in {:.1} s ({:.1} images/s on {}); outputs in {} (scores.csv, report.json{})",
        job.mode.name(),
        collected.processed,
        skipped,
        failed.len(),
        seconds,
        ips,
        device_name(device),
        job.out.display(),
        if job.mode == Mode::Saliency { ", REL.saliency.png/.npy" } else { "" }
    );
    {
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), "{summary}");
    }
    Ok(Outcome {
        failed: failed.len(),
        fatal,
    })
}

fn is_done(job: &Job, rows: &Rows, rel: &str) -> bool {
    if !rows.contains_key(rel) {
        return false;
    }
    match job.mode {
        Mode::Scores => true,
        Mode::Saliency => {
            let exists = |s: &str| output_path(&job.out, rel, s).is_file();
            exists(".saliency.png")
                && exists(".saliency.npy")
                && (!job.save_npy || exists(".grad.npy"))
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// On a CPU, a model that needs under 2 ms an image does not bound the run:
/// decoding and writing each image do. Its compute thread then runs libtorch
/// on one thread, which leaves the cores to those stages and spares them
/// OpenMP's spin-waiting between operations (twice the images/s for
/// digits_cnn on 2 cores; resnet18, at ~50 ms an image, keeps every core).
fn compute_threads(
    mode: Mode,
    device: Device,
    model: &Model,
    probe: &Tensor,
    scores: &[&dyn Score],
) -> usize {
    if device != Device::Cpu || cores() == 1 {
        return cores();
    }
    let Ok(one) = probe.f_narrow(0, 0, 1) else {
        return cores();
    };
    let t = Instant::now();
    let ran = match mode {
        Mode::Saliency => model.gradients(&[one], scores).is_ok(),
        Mode::Scores => model.forward(&[one]).is_ok(),
    };
    if ran && t.elapsed() < Duration::from_millis(2) {
        1
    } else {
        cores()
    }
}

#[allow(clippy::too_many_arguments)]
fn run_pipeline(
    job: &Job,
    device: Device,
    model: &Model,
    sidecar: &Sidecar,
    specs: &[ScoreSpec],
    pending: Vec<Entry>,
    rows: Rows,
    timings: &Timings,
    compute_threads: usize,
) -> anyhow::Result<Collected> {
    let total = pending.len();
    let pre = Preprocessor::new(sidecar.clone());
    let abort = AtomicBool::new(false);
    let (tx_batch, rx_batch) = bounded::<Decoded>(2);
    let (tx_write, rx_write) = bounded::<WriteJob>(job.batch_size.max(16) * 2);
    let (tx_event, rx_event) = unbounded::<Event>();
    // Writing (PNG encoding, .npy, two renames per image) is per-image work
    // that can outweigh a small model: as many writers as cores; they block
    // on I/O part of the time.
    let writers = cores().clamp(2, 16);

    // One decode pool whose threads keep libtorch single-threaded (their
    // tensors are small), so they do not fight the compute thread's
    // OpenMP team; the compute thread uses every core.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cores())
        .thread_name(|i| format!("tch-vis-decode-{i}"))
        .start_handler(|_| tch::set_num_threads(1))
        .build()
        .context("cannot start the decode threads")?;
    tch::set_num_threads(i32::try_from(compute_threads).unwrap_or(1));
    let collected = std::thread::scope(|s| {
        // Producer: decode one batch at a time with rayon, keep 2 queued.
        let pre = &pre;
        let abort_ref = &abort;
        s.spawn(move || {
            for chunk in pending.chunks(job.batch_size) {
                if abort_ref.load(Ordering::Relaxed) {
                    break;
                }
                let t = Instant::now();
                let batch: Vec<_> = pool.install(|| {
                    chunk
                        .par_iter()
                        .map(|e| (e.clone(), pre.load(&e.path)))
                        .collect()
                });
                let decoded = assemble(batch, job.batch_size, device);
                Timings::add(&timings.decode, t);
                if tx_batch.send(decoded).is_err() {
                    break;
                }
            }
        });
        // Writers.
        for _ in 0..writers {
            let rx = rx_write.clone();
            let tx = tx_event.clone();
            let sidecar = &sidecar;
            let abort = &abort;
            s.spawn(move || writer(job, sidecar, rx, tx, abort, timings));
        }
        drop(rx_write);
        // Collector.
        let rx_ev = rx_event;
        let collector = s.spawn(move || collect(job, total, rows, specs.len(), rx_ev));

        // Compute.
        let tx_ev = tx_event;
        let mut waiting = Instant::now();
        for batch in rx_batch.iter() {
            Timings::add(&timings.wait_decode, waiting);
            if abort.load(Ordering::Relaxed) {
                break;
            }
            let Decoded { ok, failed, x } = batch;
            for (rel, error) in failed {
                let _ = tx_ev.send(Event::Failed { rel, error });
            }
            let x = match x {
                None => {
                    waiting = Instant::now();
                    continue;
                }
                Some(Err(e)) => Err(e),
                Some(Ok(x)) => Ok(x),
            };
            let t = Instant::now();
            let result = x.and_then(|x| {
                compute_batch(
                    job, device, model, sidecar, specs, ok, x, &tx_write, &tx_ev, timings,
                )
            });
            Timings::add(&timings.compute, t);
            waiting = Instant::now();
            if let Err(e) = result {
                abort.store(true, Ordering::Relaxed);
                let _ = tx_ev.send(Event::Fatal(format!("{e:#}")));
                break;
            }
        }
        abort.store(true, Ordering::Relaxed);
        drop(rx_batch);
        drop(tx_write);
        drop(tx_ev);
        collector.join()
    });
    collected.map_err(|_| anyhow!("internal error: the collector thread panicked"))
}

/// A decoded batch, ready for the compute thread.
struct Decoded {
    /// Images that decoded, in order.
    ok: Vec<(String, Prepared)>,
    /// Files that did not, with the reason.
    failed: Vec<(String, String)>,
    /// The model input of `ok`, padded to the batch size, on the model's
    /// device; `None` when nothing decoded.
    x: Option<anyhow::Result<Tensor>>,
}

/// Splits a decoded chunk and stacks its images into one model input, off
/// the compute thread.
fn assemble(
    batch: Vec<(Entry, tch_vis::Result<Prepared>)>,
    batch_size: usize,
    device: Device,
) -> Decoded {
    let mut ok = Vec::with_capacity(batch.len());
    let mut failed = Vec::new();
    for (entry, prepared) in batch {
        match prepared {
            Ok(p) => ok.push((entry.rel, p)),
            Err(e) => failed.push((entry.rel, e.summary())),
        }
    }
    let x = (!ok.is_empty()).then(|| {
        let inputs: Vec<&Tensor> = ok.iter().map(|(_, p)| &p.input).collect();
        padded_batch(&inputs, batch_size, device)
    });
    Decoded { ok, failed, x }
}

/// Every model call has exactly `batch_size` rows (a short batch is padded
/// with zero images whose results are dropped), so an image's results do
/// not depend on how many images share its batch: a resumed or sharded run
/// gives the same bytes as one uninterrupted run.
fn padded_batch(inputs: &[&Tensor], batch_size: usize, device: Device) -> anyhow::Result<Tensor> {
    let n = inputs.len();
    let x = lib(preprocess::stack(inputs))?;
    let x = if n < batch_size {
        let mut shape = x.size();
        shape[0] = (batch_size - n) as i64;
        let pad = Tensor::f_zeros(shape.as_slice(), (x.kind(), x.device()))?;
        Tensor::f_cat(&[x, pad], 0)?
    } else {
        x
    };
    // On a GPU, the copy happens here, off the compute thread: it waits for
    // the kernels already queued, while the compute thread prepares the
    // next launch. (Pinned memory would need `pin_memory(device)`, which
    // libtorch now warns about on every call.)
    Ok(x.f_to_device(device)?)
}

#[allow(clippy::too_many_arguments)]
fn compute_batch(
    job: &Job,
    device: Device,
    model: &Model,
    sidecar: &Sidecar,
    specs: &[ScoreSpec],
    ok: Vec<(String, Prepared)>,
    x: Tensor,
    tx_write: &Sender<WriteJob>,
    tx_ev: &Sender<Event>,
    timings: &Timings,
) -> anyhow::Result<()> {
    let n = ok.len();
    let x = x.f_to_device(device)?;
    let to_strings = |scores: &[Tensor]| -> anyhow::Result<Vec<Vec<String>>> {
        let mut per_image = vec![Vec::with_capacity(scores.len()); n];
        for t in scores {
            let v = Vec::<f32>::try_from(
                &t.f_narrow(0, 0, n as i64)?
                    .f_to_device(Device::Cpu)?
                    .f_to_kind(Kind::Float)?
                    .f_reshape([-1])?,
            )?;
            if v.len() != n {
                bail!("a score returned {} values for {n} images", v.len());
            }
            for (i, x) in v.into_iter().enumerate() {
                per_image[i].push(x.to_string());
            }
        }
        Ok(per_image)
    };
    match job.mode {
        Mode::Scores => {
            let outputs = lib(model.forward(&[x]))?;
            let boxed: Vec<Box<dyn Score + Send + Sync>> =
                lib(specs.iter().map(ScoreSpec::to_score).collect())?;
            let values = {
                let _g = tch::no_grad_guard();
                outputs
                    .iter()
                    .zip(&boxed)
                    .map(|(o, s)| lib(tch_vis::scores::evaluate(s.as_ref(), o)))
                    .collect::<anyhow::Result<Vec<_>>>()?
            };
            for ((rel, _), values) in ok.into_iter().zip(to_strings(&values)?) {
                let _ = tx_ev.send(Event::Done { rel, values });
            }
        }
        Mode::Saliency => {
            let mut keys: Vec<u64> = ok.iter().map(|(rel, _)| key_for(rel)).collect();
            keys.resize(job.batch_size.max(n), 0);
            // With SmoothGrad, `predicted` is each image's class on the clean
            // input, held fixed over the noisy samples.
            let needs_classes = job.smooth_samples > 0 && specs.contains(&ScoreSpec::Predicted);
            let clean = if needs_classes {
                Some(lib(model.forward(&[x.shallow_clone()]))?)
            } else {
                None
            };
            let mut boxed: Vec<Box<dyn Score + Send + Sync>> = Vec::with_capacity(specs.len());
            for (k, spec) in specs.iter().enumerate() {
                match (&clean, spec) {
                    (Some(outs), ScoreSpec::Predicted) => {
                        let out = outs
                            .get(k)
                            .ok_or_else(|| anyhow!("the model returned too few outputs"))?;
                        let classes = lib(PredictedScore::new().classes(out))?;
                        boxed.push(Box::new(lib(CategoricalScore::new(classes))?));
                    }
                    _ => boxed.push(lib(spec.to_score())?),
                }
            }
            let refs: Vec<&dyn Score> = boxed.iter().map(|b| b.as_ref() as &dyn Score).collect();
            let res = lib(Saliency::new(model)
                .smooth_samples(job.smooth_samples)
                .smooth_noise(job.smooth_noise)
                .seed(job.seed)
                .compute_keyed(&[x], &refs, &keys))?;
            let values = to_strings(&res.scores)?;
            let flat = |t: &Tensor| -> anyhow::Result<Vec<f32>> {
                Ok(Vec::<f32>::try_from(
                    &t.f_narrow(0, 0, n as i64)?
                        .f_to_device(Device::Cpu)?
                        .f_to_kind(Kind::Float)?
                        .f_contiguous()?
                        .f_reshape([-1])?,
                )?)
            };
            let map_t = res.maps.first().ok_or_else(|| anyhow!("no saliency map"))?;
            let maps = flat(map_t)?;
            let grads = if job.save_npy {
                let g = res
                    .gradients
                    .first()
                    .ok_or_else(|| anyhow!("no gradient"))?;
                Some(flat(g)?)
            } else {
                None
            };
            let [h, w] = sidecar.input_size;
            let c = sidecar.channels;
            let hw = h * w;
            if maps.len() != n * hw {
                bail!(
                    "saliency maps have {} values, expected {n} x {h} x {w}",
                    maps.len()
                );
            }
            for (i, ((rel, p), values)) in ok.into_iter().zip(values).enumerate() {
                let job = WriteJob {
                    rel,
                    image: p.image,
                    map: maps[i * hw..(i + 1) * hw].to_vec(),
                    grad: grads
                        .as_ref()
                        .map(|g| g[i * c * hw..(i + 1) * c * hw].to_vec()),
                    values,
                };
                let t = Instant::now();
                let sent = tx_write.send(job);
                Timings::add(&timings.wait_write, t);
                if sent.is_err() {
                    bail!("the writer threads stopped");
                }
            }
        }
    }
    Ok(())
}

fn writer(
    job: &Job,
    sidecar: &Sidecar,
    rx: Receiver<WriteJob>,
    tx: Sender<Event>,
    abort: &AtomicBool,
    timings: &Timings,
) {
    tch::set_num_threads(1);
    let [h, w] = sidecar.input_size;
    let c = sidecar.channels;
    for item in rx.iter() {
        let t = Instant::now();
        let result = (|| -> tch_vis::Result<()> {
            let map = Tensor::f_from_slice(&item.map)?.f_view([h as i64, w as i64])?;
            io::write_npy_atomic(&output_path(&job.out, &item.rel, ".saliency.npy"), &map)?;
            if let Some(g) = &item.grad {
                let g = Tensor::f_from_slice(g)?.f_view([c as i64, h as i64, w as i64])?;
                io::write_npy_atomic(&output_path(&job.out, &item.rel, ".grad.npy"), &g)?;
            }
            let image = Vec::<f32>::try_from(&item.image.f_contiguous()?.f_reshape([-1])?)?;
            let png = tch_vis::heatmap::overlay_png(&image, c, w, h, &item.map)?;
            io::write_atomic(&output_path(&job.out, &item.rel, ".saliency.png"), &png)
        })();
        Timings::add(&timings.write, t);
        let event = match result {
            Ok(()) => Event::Done {
                rel: item.rel,
                values: item.values,
            },
            Err(e) => {
                abort.store(true, Ordering::Relaxed);
                Event::Fatal(format!(
                    "cannot write outputs of {}: {}",
                    item.rel,
                    e.summary()
                ))
            }
        };
        if tx.send(event).is_err() {
            break;
        }
    }
}

/// Progress on a terminal (a bar) or in logs (a line every 10 s).
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines { last: Instant, start: Instant },
    Quiet,
}

impl Progress {
    fn new(total: usize) -> Self {
        if total == 0 {
            return Progress::Quiet;
        }
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} images ({per_sec}, eta {eta})",
            ) {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(200));
            Progress::Bar(bar)
        } else {
            let now = Instant::now();
            Progress::Lines {
                last: now,
                start: now,
            }
        }
    }

    fn update(&mut self, done: usize, total: usize) {
        match self {
            Progress::Bar(b) => b.set_position(done as u64),
            Progress::Lines { last, start } => {
                if last.elapsed() >= Duration::from_secs(10) {
                    *last = Instant::now();
                    let secs = start.elapsed().as_secs_f64().max(1e-9);
                    eprintln!(
                        "tch-vis: {done}/{total} images ({:.1} images/s)",
                        done as f64 / secs
                    );
                }
            }
            Progress::Quiet => {}
        }
    }

    fn finish(self) {
        if let Progress::Bar(b) = self {
            b.finish_and_clear();
        }
    }
}

fn collect(
    job: &Job,
    total: usize,
    mut rows: Rows,
    outputs: usize,
    rx: Receiver<Event>,
) -> Collected {
    let csv = job.out.join("scores.csv");
    let mut processed = 0;
    let mut failed = BTreeMap::new();
    let mut fatal = None;
    let mut progress = Progress::new(total);
    let mut last_flush = Instant::now();
    let mut dirty = false;
    for event in rx.iter() {
        match event {
            Event::Done { rel, values } => {
                rows.insert(rel, values);
                processed += 1;
                dirty = true;
            }
            Event::Failed { rel, error } => {
                if rows.remove(&rel).is_some() {
                    dirty = true;
                }
                failed.insert(rel, error);
            }
            Event::Fatal(e) => {
                fatal.get_or_insert(e);
            }
        }
        progress.update(processed + failed.len(), total);
        if dirty && last_flush.elapsed() >= Duration::from_secs(2) {
            if io::write_atomic(&csv, table::render(outputs, &rows).as_bytes()).is_ok() {
                dirty = false;
            }
            last_flush = Instant::now();
        }
    }
    progress.finish();
    Collected {
        rows,
        processed,
        failed,
        fatal,
    }
}
