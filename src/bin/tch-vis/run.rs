//! A validated command line, run through the library's batch engine.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tch_vis::batch::{
    huge_pages_pay, passive_openmp_pays, restart_with_passive_openmp, CamMapMethod, Engine,
    FolderSink, IgBaseline, IgMethod, Method, Progress, SaliencyMethod, ScoresMethod,
};
use tch_vis::cam::CamMethod;
use tch_vis::gallery::{self, Gallery};
use tch_vis::heatmap::PngCompression;
use tch_vis::integrated_gradients::Rule;
use tch_vis::io::{self, Shard};
use tch_vis::preprocess::{Preprocessor, Sidecar};
use tch_vis::scores::ScoreSpec;
use tch_vis::{device_name, DeviceSpec, Error, Model, Precision};

use crate::args::BaselineArg;

/// Which batch subcommand, with its own settings.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Scores, gradients and saliency maps.
    Saliency { smooth: Smooth, save_npy: bool },
    /// Scores only.
    Scores,
    /// Class activation maps.
    Cam {
        method: CamMethod,
        cam_batch: usize,
        max_n: usize,
        tf_keras_vis: bool,
        smooth: Smooth,
    },
    /// Integrated Gradients.
    Ig {
        steps: usize,
        rule: Rule,
        baseline: BaselineArg,
        internal_batch_size: Option<usize>,
        smooth: Smooth,
    },
}

impl Mode {
    /// Whether a light model's restart asks for huge pages
    /// ([`huge_pages_pay`]), by the batch's size: for saliency and scores,
    /// whose model calls take one batch (SmoothGrad's too, one noisy copy
    /// of the batch at a time: +4.5% images/s with 4 samples on a trivial
    /// model), and Integrated Gradients, whose path points are batches
    /// (+9.6% images/s at 8 steps in passes of 32 rows, +9.5% with the 8
    /// steps in one pass). The CAMs are left out: unmeasured.
    fn huge_pages_pay(&self, batch_size: usize, input_values: usize) -> bool {
        let measured = match self {
            Mode::Saliency { .. } | Mode::Scores | Mode::Ig { .. } => true,
            Mode::Cam { .. } => false,
        };
        measured && huge_pages_pay(batch_size, input_values)
    }
}

/// SmoothGrad's noise: samples per image (0: none), level and seed.
#[derive(Debug, Clone, Copy)]
pub struct Smooth {
    pub samples: usize,
    pub noise: f64,
    pub seed: u64,
}

impl Smooth {
    /// The report's settings: the level and seed only where noise is drawn.
    fn settings(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("smooth_samples".into(), self.samples.into());
        m.insert("smooth_noise".into(), self.noise.into());
        m.insert("seed".into(), self.seed.into());
        m
    }

    /// A method's settings with the noise's. `smooth_samples` is there
    /// even when 0, so that an output folder's record tells runs with
    /// noise from runs without (a key on one side only is no conflict:
    /// folders from before the option accept either); `results_settings`
    /// drops the level and seed of a run without noise.
    fn added_to(&self, settings: serde_json::Value) -> serde_json::Value {
        match settings {
            serde_json::Value::Object(mut m) => {
                m.extend(self.settings());
                m.into()
            }
            other => other,
        }
    }
}

impl Mode {
    fn name(&self) -> &'static str {
        match self {
            Mode::Saliency { .. } => "saliency",
            Mode::Scores => "scores",
            Mode::Cam { .. } => "cam",
            Mode::Ig { .. } => "integrated-gradients",
        }
    }

    /// The method, and the settings it adds to the report.
    fn method(
        &self,
        specs: &[ScoreSpec],
        sidecar: &Sidecar,
    ) -> tch_vis::Result<(Box<dyn Method>, serde_json::Value)> {
        use serde_json::json;
        Ok(match self {
            Mode::Scores => (Box::new(ScoresMethod::new(specs)?), json!({})),
            Mode::Saliency { smooth, save_npy } => {
                let mut settings = smooth.settings();
                settings.insert("save_npy".into(), (*save_npy).into());
                (
                    Box::new(
                        SaliencyMethod::new(specs)?
                            .smooth(smooth.samples, smooth.noise, smooth.seed)
                            .save_gradients(*save_npy),
                    ),
                    settings.into(),
                )
            }
            Mode::Cam {
                method,
                cam_batch,
                max_n,
                tf_keras_vis,
                smooth,
            } => (
                Box::new(
                    CamMapMethod::new(*method, specs)?
                        .score_cam_batch(*cam_batch)
                        .max_n(*max_n)
                        .tf_keras_vis(*tf_keras_vis)
                        .smooth(smooth.samples, smooth.noise, smooth.seed),
                ),
                smooth.added_to(json!({"method": method.name(), "cam_batch": cam_batch,
                                       "max_n": max_n, "tf_keras_vis": tf_keras_vis})),
            ),
            Mode::Ig {
                steps,
                rule,
                baseline,
                internal_batch_size,
                smooth,
            } => {
                let b = match baseline {
                    BaselineArg::Zero => IgBaseline::Zero,
                    BaselineArg::Black => IgBaseline::Black,
                    BaselineArg::Blur(s) => IgBaseline::Blur(*s),
                    BaselineArg::Constant(v) => IgBaseline::Constant(*v),
                };
                let mut m = IgMethod::new(specs)?
                    .steps(*steps)
                    .rule(*rule)
                    .baseline(b, sidecar)?
                    .smooth(smooth.samples, smooth.noise, smooth.seed);
                if let Some(n) = internal_batch_size {
                    m = m.internal_batch_size(*n);
                }
                (
                    Box::new(m),
                    smooth.added_to(json!({"steps": steps, "rule": rule.name(),
                                           "baseline": format!("{baseline:?}"),
                                           "internal_batch_size": internal_batch_size})),
                )
            }
        })
    }

    fn outputs(&self) -> &'static str {
        match self {
            Mode::Saliency { save_npy: true, .. } => {
                ", REL.saliency.png/.npy, REL.grad.npy, index.html"
            }
            Mode::Saliency { .. } => ", REL.saliency.png/.npy, index.html",
            Mode::Scores => "",
            Mode::Cam { .. } => ", REL.cam.png/.npy, index.html",
            Mode::Ig { .. } => ", REL.ig.png/.npy, index.html",
        }
    }
}

/// Where the images come from.
#[derive(Debug)]
pub enum Images {
    /// A folder (walked) or a single file.
    Path(PathBuf),
    /// A list of paths in a file (`-`: standard input), named relative to
    /// `root`.
    List {
        list: PathBuf,
        root: Option<PathBuf>,
    },
}

impl Images {
    /// The inputs, sorted by relative path, and the root they are named
    /// from.
    fn entries(&self, out: &std::path::Path) -> tch_vis::Result<(PathBuf, Vec<io::Entry>)> {
        match self {
            Images::Path(p) if p.is_file() => io::list(std::slice::from_ref(p), None),
            Images::Path(p) => Ok((p.clone(), io::walk(p, &[out.to_path_buf()])?)),
            Images::List { list, root } => {
                let text = if list.as_os_str() == "-" {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                        .map_err(|e| Error::io("<stdin>", e))?;
                    s
                } else {
                    std::fs::read_to_string(list).map_err(|e| Error::io(list, e))?
                };
                let paths: Vec<PathBuf> = text
                    .lines()
                    .map(|l| l.trim_end_matches('\r'))
                    .filter(|l| !l.trim().is_empty())
                    .map(PathBuf::from)
                    .collect();
                io::list(&paths, root.as_deref())
            }
        }
    }
}

/// What a folder run's results depend on, for [`FolderSink::settings`]: the
/// model's contents (not its path: a moved model is the same model), the
/// sidecar, the score specs, the precision and the JPEG decoding, shared by
/// every command's rows in `scores.csv`; and under the command's name what
/// changes its maps (`method`'s settings for the report, without the
/// batching and file options that do not change a value, and the overlay).
fn results_settings(
    job: &Job,
    sidecar: &Sidecar,
    method: &serde_json::Value,
) -> tch_vis::Result<serde_json::Value> {
    let mut settings = serde_json::json!({
        "model": model_fingerprint(&job.model)?,
        // Every key, the defaults filled in: adding or removing an
        // optional key is a change, not a key on one side only.
        "sidecar": {
            "input_size": sidecar.input_size,
            "channels": sidecar.channels,
            "mean": sidecar.mean,
            "std": sidecar.std,
            "labels": sidecar.labels,
            "resize": sidecar.resize,
            "interpolation": sidecar.resize.map(|_| sidecar.interpolation()),
            "antialias": sidecar.resize.map(|_| sidecar.antialias()),
            "crop": sidecar.crop,
        },
        "score": spec_names(&job.specs),
        "precision": job.precision.to_string(),
        "jpeg_draft": job.jpeg_draft,
        "jpeg_decoder": job.jpeg_decoder(),
        "channels_last": job.channels_last,
    });
    if !matches!(job.mode, Mode::Scores) {
        let mut maps = method.as_object().cloned().unwrap_or_default();
        for knob in ["save_npy", "cam_batch", "internal_batch_size"] {
            maps.remove(knob);
        }
        // Only Faster-Score-CAM keeps max_n channels.
        if maps.get("method").and_then(serde_json::Value::as_str) != Some("fasterscorecam") {
            maps.remove("max_n");
        }
        // A run without noise draws none.
        if maps
            .get("smooth_samples")
            .and_then(serde_json::Value::as_u64)
            == Some(0)
        {
            maps.remove("smooth_noise");
            maps.remove("seed");
        }
        maps.insert(
            "overlay".into(),
            (if job.overlay_original {
                "original"
            } else {
                "input"
            })
            .into(),
        );
        settings[job.mode.name()] = maps.into();
    }
    Ok(settings)
}

/// Sidecar labels that do not fit the class outputs' classes would name
/// classes wrongly in `scores.csv`, or not at all: fewer labels than an
/// output's classes, or more than the largest output's (shifted names),
/// are refused as the sidecar's error. The classes are those of the probe's
/// forward pass ([`Layout::output_classes`]); a model whose `forward` gives
/// other outputs than the run's (the dict form of a CAM model) is not
/// checked.
fn check_labels(
    layout: &tch_vis::batch::Layout,
    sidecar: &Sidecar,
    model_path: &std::path::Path,
) -> tch_vis::Result<()> {
    let Some(labels) = &sidecar.labels else {
        return Ok(());
    };
    if layout.output_classes.len() != layout.class_outputs.len() {
        return Ok(());
    }
    // Per class output, the fewest and most labels that fit it: an
    // (N, 1) output has one class (its argmax) or, named by side, two.
    let fits: Vec<(usize, usize, usize)> = layout
        .output_classes
        .iter()
        .zip(&layout.class_outputs)
        .enumerate()
        .filter(|(_, (_, &is_class))| is_class)
        .map(|(k, (&c, _))| (k, c, if c == 1 { 2 } else { c }))
        .collect();
    let n = labels.len();
    let few = fits.iter().find(|&&(_, least, _)| n < least);
    let most = fits.iter().max_by_key(|&&(_, _, most)| most);
    match few.or(most.filter(|&&(_, _, most)| n > most)) {
        Some(&(k, c, _)) => Err(Error::Sidecar {
            path: Sidecar::path_for_model(model_path),
            reason: if c == 1 {
                format!("has {n} labels, but the model's output {k} is (N, 1): one label, or two (false, true)")
            } else {
                format!("has {n} labels, but the model's output {k} has {c} classes")
            },
        }),
        None => Ok(()),
    }
}

/// The command whose run wrote `out/report.json`, if one did.
pub fn report_command(out: &std::path::Path) -> Option<String> {
    let bytes = std::fs::read(out.join("report.json")).ok()?;
    let report: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(report.get("command")?.as_str()?.to_string())
}

/// The score specs as given, `predicted` when none were.
fn spec_names(specs: &[ScoreSpec]) -> Vec<String> {
    if specs.is_empty() {
        vec!["predicted".to_string()]
    } else {
        specs.iter().map(ToString::to_string).collect()
    }
}

/// A fingerprint of a model file's bytes: their length and a 64-bit hash
/// (FNV-1a's constants over 8-byte words), the same on every platform and
/// release.
fn model_fingerprint(path: &std::path::Path) -> tch_vis::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut hash, mut len) = (0xcbf2_9ce4_8422_2325_u64, 0u64);
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        // Words of 8 bytes (the last one zero-padded); reads return whole
        // words but at the file's end, so the words do not depend on how
        // the file is read.
        let mut filled = n;
        while filled % 8 != 0 {
            match f.read(&mut buf[filled..]).map_err(|e| Error::io(path, e))? {
                0 => break,
                more => filled += more,
            }
        }
        len += filled as u64;
        for word in buf[..filled].chunks(8) {
            let mut w = [0u8; 8];
            w[..word.len()].copy_from_slice(word);
            hash = (hash ^ u64::from_le_bytes(w)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    Ok(format!("{len} bytes, fnv1a-64 {hash:016x}"))
}

/// A validated command line.
#[derive(Debug)]
pub struct Job {
    pub mode: Mode,
    pub model: PathBuf,
    pub images: Images,
    pub out: PathBuf,
    pub specs: Vec<ScoreSpec>,
    pub device: DeviceSpec,
    pub precision: Precision,
    pub batch_size: usize,
    pub shard: Shard,
    pub shard_source: String,
    pub overwrite: bool,
    pub strict: bool,
    pub overlay_original: bool,
    pub png_compression: PngCompression,
    pub jpeg_draft: bool,
    pub fast_jpeg: bool,
    pub channels_last: bool,
}

impl Job {
    /// The decoder of full-size JPEGs, as the settings record and
    /// `report.json` name it.
    fn jpeg_decoder(&self) -> &'static str {
        if self.fast_jpeg {
            "zune-jpeg"
        } else {
            "libjpeg-turbo"
        }
    }
}

/// `TCH_VIS_WRITER_THREADS=N` (experimental, for measuring the writers
/// on a file system where their folder operations contend): N writer
/// threads instead of one per core (2 to 16). The outputs are the same.
fn writer_threads_override() -> Result<Option<usize>, Failure> {
    const VAR: &str = "TCH_VIS_WRITER_THREADS";
    match std::env::var(VAR) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=256).contains(&n) => Ok(Some(n)),
            _ => Err(Failure::Flags(format!(
                "{VAR}={v}: a number of threads from 1 to 256"
            ))),
        },
        Err(e) => Err(Failure::Flags(format!("{VAR}: {e}"))),
    }
}

/// Why the command failed; the exit status comes from the kind.
#[derive(Debug)]
pub enum Failure {
    /// Bad usage or a problem found before the first image: exit 2.
    Usage(Error),
    /// Flags that do not parse: exit 2.
    Flags(String),
    /// The run failed while processing: exit 1.
    Run(Error),
    /// `--strict` and some inputs failed: exit 1.
    Strict { failed: usize, report: PathBuf },
}

impl Failure {
    /// The exit status.
    pub fn code(&self) -> u8 {
        match self {
            Failure::Usage(_) | Failure::Flags(_) => 2,
            Failure::Run(_) | Failure::Strict { .. } => 1,
        }
    }

    /// One line for stderr.
    pub fn message(&self) -> String {
        match self {
            Failure::Usage(e) | Failure::Run(e) => tch_vis::message_line(&e.to_string()),
            Failure::Flags(m) => m.clone(),
            Failure::Strict { failed, report } => format!(
                "{failed} input{} failed (--strict); see {}",
                if *failed == 1 { "" } else { "s" },
                report.display()
            ),
        }
    }
}

fn usage(context: &str) -> impl Fn(Error) -> Failure + '_ {
    move |e| Failure::Usage(e.context(context))
}

/// The inputs from which a light model's run restarts with a sleeping
/// OpenMP team ([`restart_with_passive_openmp`]): the restart loads
/// libtorch again (~0.55 s on 2 cores), the spinning team costs ~0.27 ms an
/// image of a trivial 224 × 224 model's saliency run. Measured wall times,
/// restart against none: 200 images 1.35–1.54 s against 0.79–0.97 s;
/// 1,000 images 1.91–2.02 s against 1.78–2.07 s.
const RESTART_MIN_IMAGES: usize = 1000;

/// Runs the job; `Ok` means exit 0.
pub fn execute(job: Job) -> Result<(), Failure> {
    let start = Instant::now();
    // Everything that can be checked before the first image: exit 2, and
    // nothing written.
    let device = job.device.resolve().map_err(Failure::Usage)?;
    // A maximize run's folder: one report.json for two runs would lose one.
    if report_command(&job.out).as_deref() == Some("maximize") {
        return Err(Failure::Usage(Error::OutputMismatch {
            path: job.out.clone(),
            reason: format!(
                "holds the results of a maximize run (its report.json): give this {} run a folder of its own",
                job.mode.name()
            ),
        }));
    }
    // Maps written among the images would be read as images by a rerun.
    if let Images::Path(dir) = &job.images {
        let same = |a: &std::path::Path, b: &std::path::Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b);
        if dir.is_dir() && same(dir, &job.out) {
            return Err(Failure::Usage(Error::OutputMismatch {
                path: job.out.clone(),
                reason: "is the --images folder, whose next run would read these maps as images: give another output folder".into(),
            }));
        }
    }
    // The model before its sidecar: a missing model is named as such, not
    // as a missing `M.json`.
    let mut model = Model::load(&job.model, device).map_err(Failure::Usage)?;
    let sidecar = Sidecar::for_model(&job.model).map_err(usage(
        "cannot read the model sidecar (M.json beside M.pt gives input_size, channels, mean and std)",
    ))?;
    // One image file: no decode and writer threads to share the cores
    // with, so the restart would only add its ~0.4 s.
    let one_image = matches!(&job.images, Images::Path(p) if p.is_file());
    model.set_precision(job.precision).map_err(Failure::Usage)?;
    // A light model on every core: its OpenMP team sleeps at barriers
    // instead of spinning on the decode and writer threads' cores, from
    // RESTART_MIN_IMAGES inputs on. A list on standard input restarts
    // before it is read (it is handed on unread); a model that fails here
    // fails again, with its message, in `prepare` below.
    let mut listed = None;
    if !one_image && passive_openmp_pays(&model, &sidecar).unwrap_or(false) {
        let stdin = matches!(&job.images, Images::List { list, .. } if list.as_os_str() == "-");
        if !stdin {
            listed = Some(
                job.images
                    .entries(&job.out)
                    .map_err(usage("cannot read the images"))?,
            );
        }
        // This worker's inputs (its shard of them).
        let mine = |e: &[io::Entry]| (0..e.len()).filter(|&i| job.shard.contains(i)).count();
        if listed
            .as_ref()
            .is_none_or(|(_, e)| mine(e) >= RESTART_MIN_IMAGES)
        {
            // Returns only if the restart fails: the run goes on here.
            let _failed = restart_with_passive_openmp(job.mode.huge_pages_pay(
                job.batch_size,
                sidecar.channels * sidecar.input_size[0] * sidecar.input_size[1],
            ));
        }
    }
    let (root, entries) = match listed {
        Some(listed) => listed,
        None => job
            .images
            .entries(&job.out)
            .map_err(usage("cannot read the images"))?,
    };
    // A model call has exactly the batch size's rows (a short batch is
    // padded, so an image's bytes do not depend on its batch): an input of
    // fewer files than that is one batch of its own size, not one padded
    // with zero images (one file at 32 cost 20 times one at 1). Taken from
    // all the files found, so a resumed or sharded run of the same input
    // batches as one uninterrupted run.
    let batch_size = job.batch_size.min(entries.len().max(1));
    let (method, settings) = job
        .mode
        .method(&job.specs, &sidecar)
        .map_err(Failure::Usage)?;
    let bar = ProgressLine::new();
    let pre = Preprocessor::new(sidecar.clone())
        .keep_original(job.overlay_original)
        .jpeg_draft(job.jpeg_draft)
        .fast_jpeg(job.fast_jpeg);
    let raised = Arc::new(AtomicBool::new(false));
    // From here on (past the restart above, whose exec would drop a
    // signal's mark) a first SIGINT, SIGTERM or SIGHUP (unless the process
    // was started with it ignored) ends the run cleanly: before the first
    // image with nothing written, later after the batch in progress, with
    // scores.csv, report.json and the gallery; a second one ends the
    // process at once.
    let stop = Interrupt::install(&raised);
    let mut engine = Engine::new(&model, sidecar.clone(), method.as_ref())
        .preprocessor(pre.clone())
        .batch_size(batch_size)
        .channels_last(job.channels_last)
        .on_progress(|p| bar.update(p))
        .cancel_on(&raised);
    if let Some(n) = writer_threads_override()? {
        engine = engine.writer_threads(n);
    }
    let layout = engine.prepare().map_err(|e| match e {
        Error::ScoreCount { outputs, .. } if job.specs.is_empty() => Failure::Flags(format!(
            "the model has {outputs} outputs: give one --score per output, in order (none given)"
        )),
        e => Failure::Usage(e),
    })?;
    check_labels(&layout, &sidecar, &job.model).map_err(Failure::Usage)?;
    let mut sink = FolderSink::open(&job.out, &layout, method.as_ref(), &sidecar, job.overwrite)
        .and_then(|sink| {
            let section = (!matches!(job.mode, Mode::Scores)).then(|| job.mode.name());
            sink.settings(results_settings(&job, &sidecar, &settings)?, section)
        })
        .map_err(Failure::Usage)?;
    if job.overlay_original {
        sink = sink.overlay_original(pre);
    }
    sink = sink.png_compression(job.png_compression).shard(job.shard);
    // The input as the marks of a settings change compare it: its folder
    // or list file, and the names found in it (FNV-1a of them, stable
    // across builds). Shards count together only over the same names: a
    // file added between two shards' runs moves the indices after it, so
    // the shards would no longer cover the input.
    let canonical =
        |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let listing = io::listing(&entries);
    sink = match &job.images {
        // One file is a part of its folder, as a list of its files is.
        Images::Path(p) if p.is_file() => sink
            .input(format!("file {}", canonical(p).display()))
            .input_within(canonical(&root).display().to_string()),
        Images::Path(_) => sink
            .input(canonical(&root).display().to_string())
            .input_listing(listing),
        // A list's names are its input: runs over another list, even from
        // the same file, never clear its marks.
        Images::List { list, .. } => sink
            .input(format!(
                "list {} under {}: {listing}",
                canonical(list).display(),
                canonical(&root).display(),
            ))
            .input_within(canonical(&root).display().to_string()),
    };

    // The run.
    // The list is moved, not copied: a million entries are ~200 MB.
    let files_found = entries.len();
    let mut pending = Vec::new();
    let (mut selected, mut skipped) = (0usize, 0usize);
    for (i, e) in entries.into_iter().enumerate() {
        if !job.shard.contains(i) {
            continue;
        }
        selected += 1;
        if e.problem.is_none() && !job.overwrite && sink.is_done(&e.rel) {
            skipped += 1;
        } else {
            pending.push(e);
        }
    }
    // Before the first image: a folder that cannot be made or written
    // (a read-only or virtual file system, a file on its path) is named,
    // not the first file of it written, and exits 2.
    if raised.load(Ordering::Relaxed) {
        return Err(Failure::Run(Error::Cancelled.context(format!(
            "interrupted by {} before the first image; nothing was written",
            stop.signal().unwrap_or("a signal")
        ))));
    }
    let made = !job.out.exists();
    std::fs::create_dir_all(&job.out).map_err(|e| {
        Failure::Usage(Error::io(&job.out, e).context("cannot create the output folder"))
    })?;
    sink.begin()
        .inspect_err(|_| {
            // `begin` removes the files it wrote; the output folder goes
            // too if this run made it and nothing else is in it.
            if made {
                let _ = std::fs::remove_dir(&job.out);
            }
        })
        .map_err(|e| match e {
            // Another worker's settings, recorded since `open`: before the
            // first image, nothing of this run written.
            e @ Error::OutputMismatch { .. } => Failure::Usage(e),
            e => Failure::Usage(e.context(format!(
                "cannot write into the output folder {}",
                job.out.display()
            ))),
        })?;
    bar.start(pending.len());
    // Model load, CUDA start, the probe batch (cuDNN's algorithm search).
    let startup_seconds = start.elapsed().as_secs_f64();
    let mut summary = engine.run(&pending, &sink).map_err(Failure::Run)?;
    bar.finish();
    // An interrupted run still gets its gallery (of what is done), below.
    let interrupted = matches!(summary.fatal, Some(Error::Cancelled));
    if let (true, Some(signal)) = (interrupted, stop.signal()) {
        summary.fatal = Some(Error::Cancelled.context(format!(
            "interrupted by {signal} after {} of {} images",
            summary.processed,
            pending.len()
        )));
    }
    let seconds = start.elapsed().as_secs_f64();
    let ips = if seconds > 0.0 {
        summary.processed as f64 / seconds
    } else {
        0.0
    };
    let fatal = summary.fatal.as_ref().map(|e| e.summary());
    let report = serde_json::json!({
        "command": job.mode.name(),
        "processed": summary.processed,
        "skipped": skipped,
        "failed": summary.failed.iter().map(|(p, e)| serde_json::json!({"path": p, "error": e})).collect::<Vec<_>>(),
        "device": device_name(device),
        "seconds": seconds,
        "images_per_second": ips,
        "startup_seconds": startup_seconds,
        "steady_images_per_second": summary.steady_images_per_second,
        "timings_seconds": summary.timings,
        "compute_threads": layout.compute_threads,
        "channels_last": layout.channels_last,
        "openmp_wait_policy": std::env::var("OMP_WAIT_POLICY").ok(),
        "thp_mem_alloc_enable": std::env::var("THP_MEM_ALLOC_ENABLE").ok(),
        "glibc_tunables": std::env::var("GLIBC_TUNABLES").ok(),
        "model": job.model.display().to_string(),
        "images": root.display().to_string(),
        "out": job.out.display().to_string(),
        "scores": spec_names(&job.specs),
        "input_size": sidecar.input_size,
        "channels": sidecar.channels,
        "batch_size": batch_size,
        "precision": job.precision.to_string(),
        "overlay": if job.overlay_original { "original" } else { "input" },
        "png_compression": match job.png_compression {
            PngCompression::None => "none",
            _ => "fast",
        },
        "jpeg_draft": job.jpeg_draft,
        "jpeg_decoder": job.jpeg_decoder(),
        "overwrite": job.overwrite,
        "shard": job.shard.to_string(),
        "shard_source": job.shard_source,
        "files_found": files_found,
        "files_in_shard": selected,
        "to_process": pending.len(),
        "error": fatal,
        "faint_maps": sink.faint_maps(),
        "tch_vis_version": env!("CARGO_PKG_VERSION"),
    });
    let mut report = report;
    if let (Some(r), serde_json::Value::Object(extra)) = (report.as_object_mut(), settings) {
        r.extend(extra);
    }
    let finished = sink.finish(report);
    let fatal = match summary.fatal.take() {
        Some(e) if !interrupted => return Err(Failure::Run(e)),
        other => other,
    };
    let finished = finished.map_err(Failure::Run)?;
    // The gallery of maps, by the last worker to finish (whose view of the
    // folder is complete); `scores` writes no maps and no gallery.
    if finished.last && !matches!(job.mode, Mode::Scores) {
        let run = gallery::Run::from_merged(&job.out, &finished.merged);
        Gallery::new()
            .title(format!(
                "tch-vis {}: {}",
                job.mode.name(),
                job.model
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            ))
            .score_names(run.score_names)
            .write(&job.out, &run.items)
            .map_err(|e| Failure::Run(e.context("cannot write the gallery")))?;
    }
    let _ = writeln!(
        std::io::stdout(),
        "tch-vis {}: {} processed, {} skipped, {} failed in {:.1} s ({:.1} images/s on {}); outputs in {} (scores.csv, report.json{})",
        job.mode.name(),
        summary.processed,
        skipped,
        summary.failed.len(),
        seconds,
        ips,
        device_name(device),
        job.out.display(),
        job.mode.outputs()
    );
    if let Some(note) = faint_note(&job.mode, sink.faint_maps(), summary.processed) {
        let _ = writeln!(std::io::stderr(), "tch-vis: note: {note}");
    }
    if files_found == 0 {
        let _ = match &job.images {
            Images::Path(_) => writeln!(
                std::io::stderr(),
                "tch-vis: note: no files found under {}",
                root.display()
            ),
            Images::List { .. } => {
                writeln!(std::io::stderr(), "tch-vis: note: the list names no files")
            }
        };
    }
    if let Some(e) = fatal {
        return Err(Failure::Run(e));
    }
    if job.strict && !summary.failed.is_empty() {
        return Err(Failure::Strict {
            failed: summary.failed.len(),
            report: job.out.join("report.json"),
        });
    }
    Ok(())
}

/// SIGINT, SIGTERM and SIGHUP during a run: the first raises the engine's
/// cancel flag, a second one gets the signal's default action. A signal
/// the process was started with ignored stays ignored (`nohup`, background
/// jobs of a shell script).
struct Interrupt {
    /// Per signal handled, whether it came.
    came: Vec<(&'static str, Arc<AtomicBool>)>,
}

impl Interrupt {
    /// Installs the handlers, which raise `raised`. A signal whose handlers
    /// cannot be installed keeps its default action.
    fn install(raised: &Arc<AtomicBool>) -> Self {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        use signal_hook::flag;
        let mut came = Vec::new();
        for (name, signal) in [("SIGINT", SIGINT), ("SIGTERM", SIGTERM), ("SIGHUP", SIGHUP)] {
            if ignored(signal) {
                continue;
            }
            let flag = Arc::new(AtomicBool::new(false));
            // The second signal first: it acts only once `raised` is set.
            let installed = flag::register_conditional_default(signal, Arc::clone(raised))
                .and_then(|_| flag::register(signal, Arc::clone(&flag)))
                .and_then(|_| flag::register(signal, Arc::clone(raised)));
            if installed.is_ok() {
                came.push((name, flag));
            }
        }
        Interrupt { came }
    }

    /// The signal that raised the cancel flag, if one came.
    fn signal(&self) -> Option<&'static str> {
        self.came
            .iter()
            .find(|(_, came)| came.load(Ordering::Relaxed))
            .map(|(name, _)| *name)
    }
}

/// Whether `signal` is ignored in this process (as `nohup` leaves SIGHUP).
fn ignored(signal: i32) -> bool {
    // SAFETY: sigaction(2) with a null new action only reads the current
    // one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// What to say of `faint` maps among `processed` images (maps with no
/// value of 0.5 or more, [`tch_vis::batch::FolderSink::faint_maps`]).
fn faint_note(mode: &Mode, faint: usize, processed: usize) -> Option<String> {
    if faint == 0 {
        return None;
    }
    let why = match mode {
        Mode::Cam { .. } => {
            "constant (most often zero) everywhere: no feature map raises the score more in one place than in another"
        }
        _ => {
            "the gradient's range was under the normalisation's 1e-7, as a saturated \
             score gives (a softmax probability near 0 or 1 has near-zero gradients): \
             a model that outputs logits gives readable maps"
        }
    };
    Some(format!(
        "{faint} of {processed} maps are faint (no value of 0.5 or more): {why}"
    ))
}

/// Progress on a terminal (a bar) or in logs (a line every 10 s).
struct ProgressLine {
    state: Mutex<State>,
}

enum State {
    Idle,
    Bar(indicatif::ProgressBar),
    Lines { last: Instant, total: usize },
}

impl ProgressLine {
    fn new() -> Self {
        ProgressLine {
            state: Mutex::new(State::Idle),
        }
    }

    fn start(&self, total: usize) {
        let Ok(mut s) = self.state.lock() else { return };
        if total == 0 {
            return;
        }
        *s = if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} images ({per_sec}, eta {eta})",
            ) {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(200));
            State::Bar(bar)
        } else {
            State::Lines {
                last: Instant::now(),
                total,
            }
        };
    }

    fn update(&self, p: &Progress) {
        let Ok(mut s) = self.state.lock() else { return };
        match &mut *s {
            State::Bar(b) => b.set_position((p.done + p.failed) as u64),
            State::Lines { last, total } => {
                if last.elapsed() >= Duration::from_secs(10) {
                    *last = Instant::now();
                    let secs = p.elapsed.as_secs_f64().max(1e-9);
                    eprintln!(
                        "tch-vis: {}/{total} images ({:.1} images/s)",
                        p.done + p.failed,
                        p.done as f64 / secs
                    );
                }
            }
            State::Idle => {}
        }
    }

    fn finish(&self) {
        if let Ok(mut s) = self.state.lock() {
            if let State::Bar(b) = &*s {
                b.finish_and_clear();
            }
            *s = State::Idle;
        }
    }
}
