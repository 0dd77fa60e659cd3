//! The pipeline: decode pool, padded batches, compute, writers, collector.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

use super::cuda_rt::{self, CopyStream};
use super::{BatchResult, ImageArray, ImageResult, Method, Sink};
use crate::error::{Error, Result};
use crate::io::Entry;
use crate::model::{Model, Precision};
use crate::preprocess::{self, ByteNormaliser, Prepared, Preprocessor, Sidecar};
use crate::saliency::key_for;

/// What [`Engine::prepare`] found out about the model and method, before
/// the first image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The number of model outputs (one score each).
    pub outputs: usize,
    /// Per output: whether its score takes a class (categorical,
    /// predicted), so a class column belongs to it.
    pub class_outputs: Vec<bool>,
    /// The method's per-image value columns ([`super::BatchResult::columns`]).
    pub columns: Vec<String>,
    /// Per output of the model's forward pass on the probe input (its
    /// entries in order, for a model that returns several), the size of
    /// its class axis (dim 1; 1 for an `(N,)` output).
    pub output_classes: Vec<usize>,
    /// libtorch threads of the compute thread.
    pub compute_threads: usize,
    /// Whether batches reach the model in channels-last memory order
    /// ([`Engine::channels_last`]).
    pub channels_last: bool,
    /// The device the model runs on.
    pub device: Device,
}

/// Progress of a run, as the progress callback receives it.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Images done.
    pub done: usize,
    /// Inputs failed.
    pub failed: usize,
    /// Inputs in this run.
    pub total: usize,
    /// Time since the run started.
    pub elapsed: Duration,
}

/// Where a run's time went, in seconds summed over the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Timings {
    /// Decoding batches (wall time of the decode pool).
    pub decode: f64,
    /// The compute thread waiting for a decoded batch.
    pub compute_wait_decode: f64,
    /// The compute thread running batches (model, method, copies).
    pub compute: f64,
    /// The part of `compute` in [`Method::compute`] until the device had
    /// finished it (the model and the method's own work; on CUDA also the
    /// copies of its results to the host, which the device makes
    /// asynchronously); the rest is copying results to the host (CPU) and
    /// handing them to the writers.
    pub compute_method: f64,
    /// The part of `compute_method` in which the compute thread waited for
    /// the device to finish a batch (CUDA; 0 on a CPU). The rest of
    /// `compute_method` is the host's own share: queueing the batch's
    /// kernels and copies (the model, the autograd engine, the method).
    pub compute_wait_device: f64,
    /// The compute thread blocked on a full writer queue.
    pub compute_wait_write: f64,
    /// Writer threads in the sink (summed over threads).
    pub write_all_threads: f64,
}

/// How a run ended.
#[derive(Debug)]
pub struct Summary {
    /// Images whose results the sink took.
    pub processed: usize,
    /// Inputs that failed, with the reason, in input order.
    pub failed: Vec<(String, String)>,
    /// Why the run stopped early, if it did (the sink failed, the model
    /// failed on a batch).
    pub fatal: Option<Error>,
    /// Wall time of the run.
    pub seconds: f64,
    /// Images per second once the first batch's worth was done: the images
    /// after it over the time from then to the last one, which leaves out
    /// the run's start (threads, the first batch's decoding and compute)
    /// and shows the rate a long run settles at. `None` for a run of one
    /// batch or less.
    pub steady_images_per_second: Option<f64>,
    /// Where the time went.
    pub timings: Timings,
}

#[derive(Default)]
struct Clock {
    decode: AtomicU64,
    wait_decode: AtomicU64,
    compute: AtomicU64,
    method: AtomicU64,
    wait_device: AtomicU64,
    wait_write: AtomicU64,
    write: AtomicU64,
}

impl Clock {
    fn add(slot: &AtomicU64, since: Instant) {
        slot.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn timings(&self) -> Timings {
        let s = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 * 1e-9;
        Timings {
            decode: s(&self.decode),
            compute_wait_decode: s(&self.wait_decode),
            compute: s(&self.compute),
            compute_method: s(&self.method),
            compute_wait_device: s(&self.wait_device),
            compute_wait_write: s(&self.wait_write),
            write_all_threads: s(&self.write),
        }
    }
}

type Callback<'a> = Box<dyn Fn(&Progress) + Send + Sync + 'a>;

/// Runs a [`Method`] over input files in batches and hands each image's
/// results to a [`Sink`] (see the [module docs](super)).
pub struct Engine<'a> {
    model: &'a Model,
    pre: Preprocessor,
    method: &'a dyn Method,
    batch_size: usize,
    decode_threads: usize,
    writer_threads: usize,
    progress: Option<Callback<'a>>,
    compute_threads: OnceLock<usize>,
    channels_last: bool,
    cancel: Option<&'a AtomicBool>,
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// libtorch threads of the compute thread for a model on `device` whose
/// input has `input_values` values (C × H × W). On a CPU, a model on small
/// inputs (up to 64 × 64 × 3 values) is quick per image, and decoding and
/// writing bound the run: its compute thread runs libtorch on one thread,
/// which leaves the cores to those stages and spares them OpenMP's
/// spin-waiting (twice the images/s for the bundled digits CNN on 2 cores).
/// Larger inputs get every core. The rule depends on the input size only,
/// never on timings, so a run's bytes do not depend on the machine's load
/// (the thread count changes libtorch's summation order).
///
/// With more than one thread, libtorch's OpenMP team shares the cores with
/// the decode and writer threads. GNU OpenMP then spins at every barrier
/// unless `OMP_WAIT_POLICY=PASSIVE` is in the environment when the process
/// starts (libgomp reads it once, at load): on 2 cores a trivial 224 × 224
/// saliency run went from 340–370 to 460 images/s with it, with the same
/// bytes. The `tch-vis` binary sets it for such runs on a light model
/// ([`passive_openmp_pays`], [`restart_with_passive_openmp`]) unless they
/// are on one image file or fewer than 1,000 listed images (the restart's
/// second load of libtorch would cost more); a heavy model runs faster
/// with the team spinning. A program of your own can do the same or be
/// started with it.
///
/// A model on CUDA gets one thread: its compute thread only queues kernels
/// and copies results back, so an OpenMP team would only take cores from
/// the decode and writer threads (and the restart above is not needed).
pub fn compute_threads(device: Device, input_values: usize) -> usize {
    if device.is_cuda() || input_values <= 64 * 64 * 3 {
        1
    } else {
        cores()
    }
}

/// glibc malloc settings for batch runs, each unless the environment sets
/// it (`MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`, `MALLOC_MMAP_MAX_`,
/// `MALLOC_TRIM_THRESHOLD_`):
///
/// - one arena per core (at least two). Each thread that allocates
///   otherwise gets an arena of its own (up to 8 per core), and the decode
///   threads' per-image tensors, freed by the compute and writer threads,
///   fragment them: on 2 cores a 224² saliency run's anonymous memory grew
///   from 420 to 960 MiB over 10,000 images with the default, and stayed
///   within 435–770 MiB with two. Fewer arenas than cores would make the
///   decode and writer threads (one of each per core) queue for the
///   arena locks;
/// - every block from the heap, none from a mapping of its own, and freed
///   memory kept (no trimming): otherwise each batch's tensors are fresh
///   mappings, or a trimmed heap, whose pages the kernel faults in and
///   zeroes again at every batch. On a trivial model that was a fifth of
///   the system time of a saliency run (4.5 → 4.1 ms of CPU per image); on
///   resnet18 on the CPU, whose activations are blocks of up to a few
///   hundred MB, 2.7 million page faults and 10% of the CPU over 600
///   images (21.1 → 24.1 images/s without them). The process keeps the
///   memory of its largest batch until it exits, as a batch job needs it
///   again at the next batch. The compute thread (the main thread in the
///   `tch-vis` binary) allocates from glibc's main heap, which has no size
///   limit; other threads' heaps are at most 64 MiB, and their larger
///   blocks are still mapped.
///
/// glibc only; elsewhere it does nothing. Call it first thing in `main` of
/// an executable that runs batch jobs, before any thread exists (the
/// `tch-vis` binary does). It changes the allocator of the whole process,
/// so the library never calls it on its own.
///
/// ```no_run
/// // First thing in `main`:
/// tch_vis::batch::tune_malloc();
/// // ... then load a model and run an `Engine`.
/// ```
pub fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::ffi::c_int;
        extern "C" {
            fn mallopt(param: c_int, value: c_int) -> c_int;
        }
        const M_TRIM_THRESHOLD: c_int = -1;
        const M_MMAP_THRESHOLD: c_int = -3;
        const M_MMAP_MAX: c_int = -4;
        const M_ARENA_MAX: c_int = -8;
        let arenas = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .clamp(2, 1024) as c_int;
        for (env, param, value) in [
            ("MALLOC_ARENA_MAX", M_ARENA_MAX, arenas),
            (
                "MALLOC_MMAP_THRESHOLD_",
                M_MMAP_THRESHOLD,
                HEAP_BLOCKS as c_int,
            ),
            // No mappings for the heaps' blocks (glibc still maps a block
            // that no heap of its arena can hold).
            ("MALLOC_MMAP_MAX_", M_MMAP_MAX, 0),
            // -1 is glibc's "never trim" (mallopt(3)).
            ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, -1),
        ] {
            if std::env::var_os(env).is_none() {
                // SAFETY: mallopt only sets an allocator parameter,
                // under glibc's own lock; it reads and writes no memory of
                // ours.
                unsafe {
                    mallopt(param, value);
                }
            }
        }
    }
}

/// [`tune_malloc`]'s mmap threshold: what blocks would be fresh mappings
/// where the environment allows glibc mappings (`MALLOC_MMAP_MAX_`).
const HEAP_BLOCKS: usize = 32 << 20;

/// The largest model input [`huge_pages_pay`] asks huge pages for.
const HUGE_PAGE_INPUTS: usize = 64 << 20;

/// The memory this process may still take, where the system says: the
/// kernel's `MemAvailable` (which counts reclaimable page cache) and free
/// swap. `None` elsewhere. A cgroup's limit is not read: its usage counts
/// page cache as well, which would refuse batches that fit.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = |key: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(key))?;
        let v = line[key.len()..].trim().trim_end_matches("kB").trim();
        v.parse::<u64>().ok().map(|v| v * 1024)
    };
    Some(kb("MemAvailable:")? + kb("SwapFree:").unwrap_or(0))
}

/// `bytes` for a message: MB under a GB, else GB.
fn size_text(bytes: u64) -> String {
    if bytes < 1_000_000_000 {
        format!("{:.1} MB", bytes as f64 / 1e6)
    } else {
        format!("{:.1} GB", bytes as f64 / 1e9)
    }
}

/// Refuses a result of `method` with fewer than `rows` rows (images) in
/// one of its tensors, or fewer classes than rows for a class output.
fn check_rows(method: &str, res: &BatchResult, rows: usize) -> Result<()> {
    let arrays = res.arrays.iter().flat_map(|a| {
        std::iter::once((a.name.as_str(), &a.values))
            .chain(a.heat.iter().map(|h| (a.name.as_str(), h)))
    });
    let tensors = res
        .scores
        .iter()
        .map(|t| ("scores", t))
        .chain(res.columns.iter().map(|(name, t)| (name.as_str(), t)))
        .chain(arrays);
    let expected = || format!("({rows}, ...): one row per image of the batch");
    for (name, t) in tensors {
        let size = if t.defined() { t.size() } else { Vec::new() };
        if size.first().is_none_or(|&r| r < rows as i64) {
            return Err(Error::shape(
                format!("{method}'s {name}"),
                expected(),
                &size,
            ));
        }
    }
    for classes in res.classes.iter().flatten() {
        if classes.len() < rows {
            return Err(Error::shape(
                format!("{method}'s classes"),
                expected(),
                &[classes.len() as i64],
            ));
        }
    }
    Ok(())
}

/// The largest batch size an [`Engine`] takes.
pub const MAX_BATCH_SIZE: usize = 65536;

/// A second probe batch ([`Engine::prepare`]) over this time is the last.
const SLOW_PROBE: Duration = Duration::from_secs(2);

/// A model's forward pass on one image below this time leaves a CPU run
/// to the decode and writer threads (see [`passive_openmp_pays`]).
const LIGHT_MODEL: Duration = Duration::from_millis(2);

/// Whether a batch job that runs `model` on `sidecar`'s inputs should put
/// libtorch's OpenMP team to sleep at its barriers
/// (`OMP_WAIT_POLICY=PASSIVE`, see [`restart_with_passive_openmp`]) rather
/// than let it spin, libgomp's default.
///
/// Only a CPU run whose compute thread gets more than one thread
/// ([`compute_threads`]) has a team to share the cores with the decode and
/// writer threads. Then it depends on the model: a model whose forward pass
/// on one image takes under 2 ms leaves the run to decoding and writing,
/// and the team's spinning takes their cores (a trivial 224 × 224 model's
/// saliency run over 1,000 images on 2 cores: 441–515 images/s spinning,
/// 562–639 sleeping, 4 alternating rounds);
/// every real network at 224 × 224 takes longer (mobilenet_v3_small ~10 ms,
/// resnet18 ~45 ms on 2 cores), keeps the cores busy with its own work,
/// and runs faster spinning, as waking a sleeping team at each of the
/// forward pass's parallel regions costs more than it saves (resnet18
/// Grad-CAM: +11% images/s, faster in 8 of 8 alternating runs;
/// mobilenet_v3_small Grad-CAM +12%, 3 of 4).
///
/// `false` without running anything when `OMP_WAIT_POLICY` is set
/// already (by the user, or in the process the restart started). Otherwise
/// it times the model's forward pass on a zero image: light as soon as one
/// pass takes under 2 ms, heavy when the second (after TorchScript's
/// profiling run) takes over 20 ms, else the third decides. The answer
/// changes speed only, never results: the thread count, which decides
/// libtorch's summation order, does not depend on it.
///
/// # Errors
/// What [`Model::forward`] returns when the model fails on a
/// `(1, C, H, W)` zero input.
pub fn passive_openmp_pays(model: &Model, sidecar: &Sidecar) -> Result<bool> {
    // The policy is chosen already (by the user, or by the restart): no
    // model to time.
    if std::env::var_os("OMP_WAIT_POLICY").is_some() {
        return Ok(false);
    }
    let device = model.device();
    let [h, w] = sidecar.size_i64();
    let c = sidecar.channels as i64;
    if compute_threads(device, (c * h * w) as usize) <= 1 {
        return Ok(false);
    }
    let _mode = crate::grad::GradMode::set(false);
    let x = Tensor::f_zeros([1, c, h, w], (Kind::Float, device))?;
    for call in 0..3 {
        let t = Instant::now();
        model.forward(&[x.shallow_clone()])?;
        let took = t.elapsed();
        if took < LIGHT_MODEL {
            return Ok(true);
        }
        // Past the profiling run, ten times the bound is no light model:
        // a heavy one is not run a third time.
        if call > 0 && took >= 10 * LIGHT_MODEL {
            return Ok(false);
        }
    }
    Ok(false)
}

/// Starts the running program again, with the same arguments, standard
/// streams and process id, and `OMP_WAIT_POLICY=PASSIVE` in its environment,
/// unless the variable is set already (by the user, or by this restart).
/// libgomp reads it only when it is loaded, so a running process cannot
/// change it; see [`compute_threads`] for what it is worth. Call it first
/// thing in `main` of an executable, before reading input (standard input
/// is handed on unread) or starting threads. The restart costs one more
/// load of libtorch (~0.4 s).
///
/// With `huge_pages` (see [`huge_pages_pay`]) the restarted process also
/// asks for transparent huge pages, where the kernel gives them to memory
/// that asks (`/sys/kernel/mm/transparent_hugepage/enabled` at `madvise`
/// or `always`): under libtorch's CPU blocks of 2 MiB and more
/// (`THP_MEM_ALLOC_ENABLE=1`, libtorch's own switch, unless the
/// environment sets it) and under glibc's heaps (`glibc.malloc.hugetlb=1`
/// added to `GLIBC_TUNABLES` unless that names `glibc.malloc.hugetlb`
/// already). Both are read only when a process starts. Not where the
/// kernel gives no huge pages on request (`never` in
/// `/sys/kernel/mm/transparent_hugepage/enabled`, or no such file).
///
/// Returns `None` when the variable was already set, `Some(error)` when
/// the restart failed (the program can go on with the default policy); on
/// success it does not return.
pub fn restart_with_passive_openmp(huge_pages: bool) -> Option<std::io::Error> {
    if std::env::var_os("OMP_WAIT_POLICY").is_some() {
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => return Some(e),
        };
        let mut command = std::process::Command::new(exe);
        command
            .args(std::env::args_os().skip(1))
            .env("OMP_WAIT_POLICY", "PASSIVE");
        if huge_pages && huge_pages_on_request() {
            if std::env::var_os(THP_MEM_ALLOC).is_none() {
                command.env(THP_MEM_ALLOC, "1");
            }
            if let Some(tunables) = huge_page_heap_tunables(std::env::var_os(GLIBC_TUNABLES)) {
                command.env(GLIBC_TUNABLES, tunables);
            }
        }
        Some(command.exec())
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Whether a light model's CPU batch job, restarted by
/// [`restart_with_passive_openmp`], should ask for transparent huge pages:
/// when each model call's float32 input (`rows` × `input_values` values)
/// is at most 64 MiB.
///
/// Then the pages of the blocks that [`tune_malloc`]'s glibc reuses are
/// faulted in once and every later pass over a batch's megabytes misses
/// the TLB far less often, with the same bytes out: a trivial 224 × 224
/// model's saliency run over 5,000 images at batch 32 on 2 cores went from
/// 1,546 to 1,595 images/s with libtorch's blocks on huge pages (CPU 7.10
/// → 6.78 s) and to 1,635 with glibc's heaps as well (6.65 s; alternating
/// runs), for more peak resident memory (4% over 5,000 images; 841 against
/// 738 MiB over 100,000, flat). At batch 64 (38.5 MB inputs) they gained
/// 5% (1,659 → 1,739 images/s and 1,586 → 1,682 in two reads), at 96
/// 1.5%; at 128 the reads disagreed (−2%, +3%), at 256 more so (−18%,
/// +13%), and resnet18 on the CPU (a heavy model, which is not restarted)
/// lost 4% with them. Larger inputs ask for none.
pub fn huge_pages_pay(rows: usize, input_values: usize) -> bool {
    rows.saturating_mul(input_values).saturating_mul(4) <= HUGE_PAGE_INPUTS
}

/// Whether the kernel gives transparent huge pages to memory that asks
/// for them: `always` or `madvise` in
/// `/sys/kernel/mm/transparent_hugepage/enabled`. Elsewhere (`never`, or a
/// kernel without them, where libtorch would warn that its request failed)
/// the restart asks for none.
#[cfg(unix)]
fn huge_pages_on_request() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| s.contains("[always]") || s.contains("[madvise]"))
}

/// libtorch's switch for transparent huge pages under its CPU blocks of
/// 2 MiB and more, read at its first CPU allocation.
#[cfg(unix)]
const THP_MEM_ALLOC: &str = "THP_MEM_ALLOC_ENABLE";

/// glibc's settings variable, read once when a program starts.
#[cfg(unix)]
const GLIBC_TUNABLES: &str = "GLIBC_TUNABLES";

/// `GLIBC_TUNABLES` for a restarted process: `current` with
/// `glibc.malloc.hugetlb=1` added, or `None` (left as it is) where it names
/// that setting already.
#[cfg(unix)]
fn huge_page_heap_tunables(current: Option<std::ffi::OsString>) -> Option<std::ffi::OsString> {
    const HUGETLB: &str = "glibc.malloc.hugetlb";
    let current = current.unwrap_or_default();
    let text = current.to_string_lossy();
    if text
        .split(':')
        .any(|t| t.split('=').next() == Some(HUGETLB))
    {
        return None;
    }
    let mut out = current.clone();
    if !text.is_empty() {
        out.push(":");
    }
    out.push(format!("{HUGETLB}=1"));
    Some(out)
}

impl<'a> Engine<'a> {
    /// An engine for `model`, preprocessing as `sidecar` says, computing
    /// `method`; batches of 32, one decode and one writer thread per core.
    pub fn new(model: &'a Model, sidecar: Sidecar, method: &'a dyn Method) -> Self {
        Engine {
            model,
            pre: Preprocessor::new(sidecar),
            method,
            batch_size: 32,
            decode_threads: cores(),
            writer_threads: cores().clamp(2, 16),
            progress: None,
            compute_threads: OnceLock::new(),
            channels_last: false,
            cancel: None,
        }
    }

    /// Hands the model its batches in channels-last memory order (NHWC
    /// strides, the same `(N, C, H, W)` shape) instead of the usual
    /// contiguous order (the default). On a CPU, libtorch's oneDNN
    /// convolutions run faster on NHWC data (a torchvision resnet18 forward
    /// pass at batch 8 on 2 cores took 0.27 s instead of 0.33 s, and a
    /// Grad-CAM job ran 12–20% more images/s), but they sum in another
    /// order, so results are PyTorch's for a channels-last input, not for
    /// the contiguous tensor a PyTorch pipeline makes: on a torchvision
    /// resnet18 at 224², saliency maps moved by up to 6e-4 and Integrated
    /// Gradients by up to 3.6e-3 of the largest attribution (30 times the
    /// tolerance against captum), where ReLUs and max-pools at the path's
    /// small inputs tip the other way. Gray inputs have one byte order for
    /// both.
    pub fn channels_last(mut self, on: bool) -> Self {
        self.channels_last = on;
        self
    }

    fn uses_channels_last(&self) -> bool {
        self.channels_last && self.pre.sidecar().channels > 1
    }

    /// The kind of a CUDA batch's float rows when the model computes in
    /// fp16 or bf16 and the method sees its input only through the model's
    /// cast ([`Method::input_through_model_only`]): the rows hold the
    /// values rounded to the model's precision, half the upload of float32.
    fn rounded_rows(&self) -> Option<Kind> {
        let precision = self.model.precision();
        (self.model.device().is_cuda()
            && precision != Precision::Fp32
            && self.method.input_through_model_only())
        .then(|| precision.kind())
    }

    /// Images per model call (at least 1; [`Engine::prepare`] and
    /// [`Engine::run`] refuse more than [`MAX_BATCH_SIZE`]).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// Threads decoding images (at least 1).
    pub fn decode_threads(mut self, n: usize) -> Self {
        self.decode_threads = n.max(1);
        self
    }

    /// Threads calling [`Sink::image`] (at least 1).
    pub fn writer_threads(mut self, n: usize) -> Self {
        self.writer_threads = n.max(1);
        self
    }

    /// Replaces the preprocessor (decode limits, options).
    pub fn preprocessor(mut self, pre: Preprocessor) -> Self {
        self.pre = pre;
        self
    }

    /// Calls `f` from a collector thread as images complete.
    pub fn on_progress(mut self, f: impl Fn(&Progress) + Send + Sync + 'a) -> Self {
        self.progress = Some(Box::new(f));
        self
    }

    /// Stops a run once `flag` is true: no batch is decoded or computed
    /// after that, the batch being computed is finished and its images go
    /// to the sink, and the run returns with [`Error::Cancelled`] in
    /// [`Summary::fatal`]. What the sink took is complete, so a rerun that
    /// skips done images does the rest. The `tch-vis` binary raises it on
    /// the first SIGINT, SIGTERM or SIGHUP (Ctrl-C, Slurm's and Kubernetes'
    /// stop signal, a closed terminal) and still writes `scores.csv` and
    /// `report.json`.
    ///
    /// ```no_run
    /// # use std::sync::atomic::AtomicBool;
    /// # use tch_vis::batch::{Engine, SaliencyMethod};
    /// # use tch_vis::preprocess::Sidecar;
    /// # use tch_vis::Model;
    /// # fn main() -> tch_vis::Result<()> {
    /// let model = Model::load("models/digits_cnn.pt", tch::Device::Cpu)?;
    /// let sidecar = Sidecar::for_model("models/digits_cnn.pt")?;
    /// let method = SaliencyMethod::new(&[])?;
    /// let stop = AtomicBool::new(false); // raised by another thread to stop
    /// let engine = Engine::new(&model, sidecar, &method).cancel_on(&stop);
    /// # Ok(())
    /// # }
    /// ```
    pub fn cancel_on(mut self, flag: &'a AtomicBool) -> Self {
        self.cancel = Some(flag);
        self
    }

    /// The preprocessing in use.
    pub fn sidecar(&self) -> &Sidecar {
        self.pre.sidecar()
    }

    /// Everything that can be checked before the first image: the model
    /// runs on one zero image of the sidecar's size, the method fits its
    /// outputs ([`Method::check`]) and computes on it; on CUDA the method
    /// runs on a whole zero batch, so a batch that does not fit in memory
    /// is found here, three times (twice when the second takes over two
    /// seconds), so that TorchScript's optimisation of the model's methods
    /// and cuDNN's algorithm search are done before the first image (on an
    /// H100, Grad-CAM on resnet50 ran 12% more images/s after its
    /// start-up). Also picks the compute threads.
    ///
    /// # Errors
    /// [`Error::Sidecar`] for a sidecar [`Sidecar::validate`] refuses;
    /// [`Error::InvalidValue`] for a batch size over [`MAX_BATCH_SIZE`];
    /// [`Error::Probe`] when the model or the method fails on the probe
    /// (a method's result with fewer rows than the probe batch included),
    /// or on a CPU when the batch cannot be allocated, with the cause; the
    /// method's own check errors as they are.
    pub fn prepare(&self) -> Result<Layout> {
        self.pre
            .sidecar()
            .validate()
            .map_err(|reason| Error::Sidecar {
                path: "<sidecar>".into(),
                reason,
            })?;
        self.check_batch(true)?;
        let device = self.model.device();
        let sidecar = self.pre.sidecar();
        let [h, w] = sidecar.size_i64();
        let c = sidecar.channels as i64;
        let probe = Tensor::f_zeros([1, c, h, w], (Kind::Float, device))?;
        let outputs = self.model.forward(&[probe.shallow_clone()]).map_err(|e| {
            let mut what =
                format!("the model fails on a (1, {c}, {h}, {w}) input as its sidecar describes");
            if self.model.precision() != Precision::Fp32 && !self.model.has_parameters() {
                what.push_str(
                    " (its weights are constants, as in a frozen model, and keep the \
                         precision it was saved in: use fp32, or export it unfrozen)",
                );
            }
            Error::Probe {
                what,
                source: Box::new(e),
            }
        })?;
        self.method.check(self.model, &probe, &outputs)?;
        let output_classes = outputs
            .iter()
            .map(|o| o.size().get(1).copied().unwrap_or(1).max(1) as usize)
            .collect();
        if device.is_cuda() {
            // Batches are padded to one fixed shape: let cuDNN pick the
            // fastest algorithm for it once, here.
            tch::Cuda::cudnn_set_benchmark(true);
        }
        let rows = if device.is_cuda() { self.batch_size } else { 1 };
        let x = Tensor::f_zeros([rows as i64, c, h, w], (Kind::Float, device))?;
        let keys = vec![0u64; rows];
        // On CUDA the probe batch runs three times, so that what happens
        // once happens here rather than in the run's first batches:
        // cuDNN's algorithm search and the caching allocator's growth (the
        // first time), TorchScript's optimisation of each method's graph
        // (at its second call, after a profiling run). A method that calls
        // the model many times a batch (SmoothGrad, Integrated Gradients)
        // has done all that within its first probes: a second probe over
        // two seconds ends them.
        let run_probe = || {
            let t = Instant::now();
            let result = self
                .method
                .probe(self.model, &x, &keys)
                .map_err(|e| Error::Probe {
                    what: format!("{} fails on a probe input", self.method.name()),
                    source: Box::new(e),
                })?;
            Ok::<_, Error>((result, t.elapsed()))
        };
        let (mut result, _) = run_probe()?;
        check_rows(self.method.name(), &result, rows).map_err(|e| Error::Probe {
            what: format!("{} fails on a probe input", self.method.name()),
            source: Box::new(e),
        })?;
        if device.is_cuda() {
            let (second, took) = run_probe()?;
            result = second;
            if took <= SLOW_PROBE {
                result = run_probe()?.0;
            }
        }

        let threads = compute_threads(device, (c * h * w) as usize);
        let _ = self.compute_threads.set(threads);
        Ok(Layout {
            outputs: result.scores.len(),
            class_outputs: result.classes.iter().map(Option::is_some).collect(),
            columns: result.columns.iter().map(|(n, _)| n.clone()).collect(),
            output_classes,
            compute_threads: threads,
            channels_last: self.uses_channels_last(),
            device,
        })
    }

    /// Refuses a batch size over [`MAX_BATCH_SIZE`] and, with `memory`
    /// on a CPU, a batch (the one the decode threads write into) that this
    /// machine cannot give: here rather than by the first batch. The memory
    /// the kernel says is available is checked too: with overcommit on,
    /// the allocation itself succeeds whatever its size.
    fn check_batch(&self, memory: bool) -> Result<()> {
        let n = self.batch_size;
        if n > MAX_BATCH_SIZE {
            return Err(Error::InvalidValue {
                what: "batch size (1 to 65536)",
                value: n.to_string(),
            });
        }
        let device = self.model.device();
        if device.is_cuda() || !memory {
            return Ok(());
        }
        let sidecar = self.pre.sidecar();
        let [h, w] = sidecar.size_i64();
        let c = sidecar.channels as i64;
        let bytes = n as u64 * (c * h * w * 4) as u64;
        let what = || {
            format!(
                "a batch of {n} inputs of {c} × {h} × {w} float32 values ({}) cannot be allocated: use a smaller batch size",
                size_text(bytes)
            )
        };
        if let Some(free) = available_memory().filter(|&free| bytes > free) {
            return Err(Error::Probe {
                what: what(),
                source: Box::new(Error::InvalidValue {
                    what: "batch size",
                    value: format!("{n} for {} of available memory", size_text(free)),
                }),
            });
        }
        let _batch = Tensor::f_empty([n as i64, c, h, w], (Kind::Float, device)).map_err(|e| {
            Error::Probe {
                what: what(),
                source: Box::new(e.into()),
            }
        })?;
        Ok(())
    }

    /// Runs over `inputs` (in the order given), handing each image to
    /// `sink`. Inputs with a [`problem`](Entry::problem) or that do not
    /// decode are reported to [`Sink::failed`] and the run goes on. A
    /// failure of the model or the sink stops the run: it is returned in
    /// [`Summary::fatal`], after the images already done were handed over.
    ///
    /// # Errors
    /// [`Error::Io`] when the engine's threads cannot be started; the
    /// batch size errors of [`Engine::prepare`], before any image (the
    /// memory check only where `prepare` did not run: memory taken since
    /// then fails the run's first batch instead, not a run whose sink has
    /// begun).
    pub fn run(&self, inputs: &[Entry], sink: &dyn Sink) -> Result<Summary> {
        self.check_batch(self.compute_threads.get().is_none())?;
        let start = Instant::now();
        let clock = Clock::default();
        let mut failed = Vec::new();
        let mut pending = Vec::with_capacity(inputs.len());
        for e in inputs {
            match &e.problem {
                Some(p) => failed.push((e.rel.clone(), p.clone())),
                None => pending.push(e),
            }
        }
        let total = inputs.len();
        let mut fatal = None;
        for (rel, why) in &failed {
            if let Err(e) = sink.failed(rel, why) {
                fatal = Some(e);
                break;
            }
        }
        let done = AtomicUsize::new(0);
        let n_failed = AtomicUsize::new(failed.len());
        let collected = if fatal.is_none() {
            self.pipeline(pending, sink, &clock, &done, &n_failed, total, start)?
        } else {
            Collected::default()
        };
        failed.extend(collected.failed);
        // Input order, as the caller gave it (memory in the failures only).
        if !failed.is_empty() {
            let mut by_rel: std::collections::HashMap<String, String> = failed.drain(..).collect();
            for e in inputs {
                if let Some(why) = by_rel.remove(&e.rel) {
                    failed.push((e.rel.clone(), why));
                }
            }
        }
        Ok(Summary {
            processed: collected.processed,
            failed,
            fatal: fatal.or(collected.fatal),
            seconds: start.elapsed().as_secs_f64(),
            steady_images_per_second: collected.steady,
            timings: clock.timings(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn pipeline(
        &self,
        pending: Vec<&Entry>,
        sink: &dyn Sink,
        clock: &Clock,
        done: &AtomicUsize,
        n_failed: &AtomicUsize,
        total: usize,
        start: Instant,
    ) -> Result<Collected> {
        let device = self.model.device();
        let batch_size = self.batch_size;
        let abort = AtomicBool::new(false);
        let (tx_batch, rx_batch) = bounded::<Decoded>(2);
        // Host batches handed back by the compute thread once their batch
        // is done (pinned ones for a CUDA model; see `Staging`).
        let (tx_free, rx_free) = unbounded::<Buf>();
        let (tx_write, rx_write) = bounded::<ImageResult>(batch_size.max(16) * 2);
        let (tx_event, rx_event) = unbounded::<Event>();
        // One decode pool whose threads keep libtorch single-threaded
        // (their tensors are small), so they do not fight the compute
        // thread's OpenMP team.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.decode_threads)
            .thread_name(|i| format!("tch-vis-decode-{i}"))
            .start_handler(move |_| {
                set_torch_threads(1);
                if device.is_cuda() {
                    yield_to_compute();
                }
            })
            .build()
            .map_err(|e| Error::io("<decode threads>", std::io::Error::other(e.to_string())))?;
        let threads = *self.compute_threads.get_or_init(cores);
        set_torch_threads(threads);
        let pre = &self.pre;
        let abort = &abort;
        let cancelled = || self.cancel.is_some_and(|c| c.load(Ordering::Relaxed));
        let producer_cancelled = &AtomicBool::new(false);
        let channels_last = self.uses_channels_last();
        let rounded = self.rounded_rows();
        std::thread::scope(|s| {
            // Producer: decode one batch at a time with rayon, keep 2 queued.
            s.spawn(move || {
                name_thread(c"tch-vis-produce");
                let mut staging =
                    Staging::new(device, pre, batch_size, channels_last).rounded(rounded);
                for chunk in pending.chunks(batch_size) {
                    if abort.load(Ordering::Relaxed) {
                        break;
                    }
                    if cancelled() {
                        // Images are left: the compute loop reports the
                        // cancel even if it sees no batch after it.
                        producer_cancelled.store(true, Ordering::Relaxed);
                        break;
                    }
                    let t = Instant::now();
                    let buf = staging.take(&rx_free);
                    let rows = staging.rows(buf.as_ref().map(|b| &b.host), chunk.len());
                    let row_kind = staging.kind();
                    let batch: Vec<_> = pool.install(|| {
                        chunk
                            .par_iter()
                            .zip(rows.into_par_iter())
                            .map(|(e, row)| {
                                // Each decode thread writes its own image's
                                // input into its row of the batch.
                                let (p, staged) = load_row(pre, &e.path, row, row_kind);
                                ((*e).clone(), p, staged)
                            })
                            .collect()
                    });
                    let decoded = staging.assemble(batch, batch_size, buf);
                    Clock::add(&clock.decode, t);
                    if tx_batch.send(decoded).is_err() {
                        break;
                    }
                }
            });
            // Writers.
            for _ in 0..self.writer_threads {
                let rx = rx_write.clone();
                let tx = tx_event.clone();
                s.spawn(move || {
                    name_thread(c"tch-vis-write");
                    set_torch_threads(1);
                    if device.is_cuda() {
                        yield_to_compute();
                    }
                    for item in rx.iter() {
                        let t = Instant::now();
                        let result = sink.image(item);
                        Clock::add(&clock.write, t);
                        let event = match result {
                            Ok(()) => Event::Done,
                            Err(e) => {
                                abort.store(true, Ordering::Relaxed);
                                Event::Fatal(e)
                            }
                        };
                        if tx.send(event).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(rx_write);
            let progress = self.progress.as_deref();
            let collector = s.spawn(move || {
                name_thread(c"tch-vis-collect");
                collect(rx_event, progress, done, n_failed, total, start, batch_size)
            });

            // Compute, on this thread. On CUDA a batch's results are handed
            // out while the device computes the next one (see `Flight`),
            // and with events (see `Queued`) the next one is queued before
            // this thread waits for the batch before it.
            let tx_ev = tx_event;
            // Events with the queue overlap, where the runtime is found
            // (each sets its device as the current one of this thread).
            let events = match device {
                Device::Cuda(i) => cuda_rt::Overlap::get().queue && cuda_rt::use_device(i),
                _ => false,
            };
            let mut in_flight: Option<Queued> = None;
            let mut waiting = Instant::now();
            // No batch computed yet (see `first_batch_hint`).
            let mut first = true;
            let mut cancel_reported = false;
            for batch in rx_batch.iter() {
                Clock::add(&clock.wait_decode, waiting);
                if abort.load(Ordering::Relaxed) {
                    break;
                }
                // `staging` before `x` in the pattern: bindings drop in
                // reverse order, so on an unwind the upload (which waits
                // for its copy) goes before its buffer.
                let Decoded {
                    ok,
                    failed,
                    staging,
                    x,
                } = batch;
                // Cancelled: nothing more is computed, the batch in flight
                // is still handed out below. The sink failed: nothing more
                // goes to it, the batch in flight included.
                let cancel = cancelled();
                let mut sink_failed = false;
                if cancel {
                    cancel_reported = true;
                    let _ = tx_ev.send(Event::Fatal(Error::Cancelled));
                } else {
                    for (rel, error) in failed {
                        if let Err(e) = sink.failed(&rel, &error) {
                            let _ = tx_ev.send(Event::Fatal(e));
                            sink_failed = true;
                            break;
                        }
                        let _ = tx_ev.send(Event::Failed { rel, error });
                    }
                }
                if cancel || sink_failed {
                    // The upload goes first (it waits for its copy), then
                    // its buffer.
                    drop(x);
                    drop(staging);
                    if sink_failed {
                        in_flight = None;
                    }
                    break;
                }
                let Some(x) = x else {
                    // Nothing was read from the buffer.
                    if let Some(buf) = staging {
                        let _ = tx_free.send(buf);
                    }
                    waiting = Instant::now();
                    continue;
                };
                let t = Instant::now();
                let started = x.and_then(Upload::into_input).and_then(|x| {
                    self.start_batch(ok, &x)
                        .map_err(|e| self.first_batch_hint(e, first))
                });
                first = false;
                let mut method = t.elapsed();
                // The part of `method` waiting for the device.
                let mut device_wait = Duration::ZERO;
                let result = if let Device::Cuda(i) = device {
                    // Kernels and copies run asynchronously: this batch is
                    // queued, with the event of its end.
                    let ended = started.and_then(|flight| {
                        let end = match events {
                            true => cuda_rt::Event::on_default_stream(i).transpose()?,
                            false => None,
                        };
                        Ok((end, flight))
                    });
                    // (`staging` stays out of the closure: on an error it
                    // must outlive the device's work, below.)
                    let (queued, mut unqueued) = match ended {
                        Ok((end, flight)) => (
                            Ok(Queued {
                                end: cuda_rt::Awaited::new(end),
                                flight,
                                staging,
                            }),
                            None,
                        ),
                        Err(e) => (Err(e), staging),
                    };
                    // The previous batch: wait for its end (the time is
                    // the method's), then its results out to the writers
                    // while this one runs.
                    let handed = match in_flight.take() {
                        Some(prev) => {
                            let t = Instant::now();
                            let ended = prev.wait();
                            device_wait += t.elapsed();
                            ended.and_then(|(flight, buf)| {
                                // Its upload is done: the buffer is free.
                                if let Some(buf) = buf {
                                    let _ = tx_free.send(buf);
                                }
                                self.hand_out(flight, &tx_write, clock)
                            })
                        }
                        None => Ok(()),
                    };
                    match (handed, queued) {
                        (Ok(()), Ok(mut queued)) => {
                            let mut synced = Ok(());
                            if queued.end.get().is_none() {
                                // Without events, the whole device, now.
                                let t = Instant::now();
                                synced = cuda_rt::synchronize_device(i);
                                device_wait += t.elapsed();
                                let buf = queued.staging.take();
                                if synced.is_ok() {
                                    if let Some(buf) = buf {
                                        let _ = tx_free.send(buf);
                                    }
                                } else {
                                    // A device error: its work on the
                                    // buffer may not have ended.
                                    std::mem::forget(buf);
                                }
                            }
                            if synced.is_ok() {
                                in_flight = Some(queued);
                            }
                            synced
                        }
                        (handed, queued) => {
                            // A failure ends the run: this batch's upload
                            // may still read its buffer (libtorch's host
                            // allocator does not know of that copy), so
                            // the device finishes before the buffer goes;
                            // where it cannot (a sticky device error), the
                            // buffer is never freed.
                            let synced = cuda_rt::device_synchronize(i).is_ok();
                            let keep = |buf: Option<Buf>| {
                                if synced {
                                    drop(buf);
                                } else {
                                    std::mem::forget(buf);
                                }
                            };
                            keep(unqueued.take());
                            let queued = queued.map(|mut q| keep(q.staging.take()));
                            handed.and(queued)
                        }
                    }
                } else {
                    started.and_then(|flight| {
                        // The buffer serves the next batch but one unless a
                        // result is a view of it (a method that returns its
                        // input): fresh memory is paged in anew, a fault
                        // every 4 KiB.
                        let free = staging.filter(|buf| !flight.views(&buf.host));
                        let handed = self.hand_out(flight, &tx_write, clock);
                        if let Some(buf) = free {
                            let _ = tx_free.send(buf);
                        }
                        handed
                    })
                };
                method += device_wait;
                clock
                    .method
                    .fetch_add(method.as_nanos() as u64, Ordering::Relaxed);
                clock
                    .wait_device
                    .fetch_add(device_wait.as_nanos() as u64, Ordering::Relaxed);
                Clock::add(&clock.compute, t);
                waiting = Instant::now();
                if let Err(e) = result {
                    let _ = tx_ev.send(Event::Fatal(e));
                    break;
                }
            }
            // The producer stopped for the cancel before this loop saw a
            // batch after it.
            if producer_cancelled.load(Ordering::Relaxed)
                && !cancel_reported
                && !abort.load(Ordering::Relaxed)
            {
                let _ = tx_ev.send(Event::Fatal(Error::Cancelled));
            }
            // The last batch's results (or, after the model failed on a
            // batch, those of the batch before); none after the sink failed.
            if let (Some(prev), false) = (in_flight.take(), abort.load(Ordering::Relaxed)) {
                let t = Instant::now();
                let handed = prev
                    .wait()
                    .and_then(|(flight, _)| self.hand_out(flight, &tx_write, clock));
                if let Err(e) = handed {
                    let _ = tx_ev.send(Event::Fatal(e));
                }
                Clock::add(&clock.compute, t);
            }
            abort.store(true, Ordering::Relaxed);
            drop(rx_batch);
            // Unblocks a producer waiting for a pinned buffer.
            drop(tx_free);
            drop(tx_write);
            drop(tx_ev);
            collector.join().map_err(|_| Error::Internal {
                what: "the collector thread panicked".into(),
            })
        })
    }

    /// The error of the run's `first` computed batch, with a hint where the
    /// model ran on the probe's one input but fails on a whole batch (on a
    /// CPU; on CUDA the probe is a whole batch): most often a model traced
    /// at a fixed batch size.
    fn first_batch_hint(&self, e: Error, first: bool) -> Error {
        if !first || self.batch_size == 1 || self.model.device().is_cuda() {
            return e;
        }
        // libtorch's shape errors, from the model or a score on its
        // outputs, as a fixed batch size gives (not memory, say), and
        // tch-vis's own shape checks where what came back has one row
        // (feature maps, a method's results): a model traced at batch 1.
        // Other checks of tch-vis say what is wrong themselves.
        let one_row = matches!(&e, Error::Shape { got, .. } if got.first() == Some(&1));
        if !one_row && !matches!(e, Error::Torch(_) | Error::Score { .. }) {
            return e;
        }
        let text = e.to_string().to_lowercase();
        if !one_row
            && !["shape", "size", "mat1 and mat2", "dimension"]
                .iter()
                .any(|w| text.contains(w))
        {
            return e;
        }
        Error::Context {
            context: format!(
                "the model ran on a batch of 1 before the run but fails on its first batch of {}: \
                 a model traced (torch.jit.trace) at a fixed batch size runs only at that size, \
                 so use a batch size of 1 (for Integrated Gradients, an internal batch size of 1 \
                 too), or export the model with torch.jit.script",
                self.batch_size
            ),
            source: Box::new(e),
        }
    }

    /// Computes a batch, and starts copying its results to the host:
    /// on CUDA asynchronously, into pinned memory (valid once the device
    /// is synchronised), on a CPU at once.
    fn start_batch(&self, ok: Vec<(Entry, Prepared)>, x: &Tensor) -> Result<Flight> {
        let n = ok.len();
        let mut keys: Vec<u64> = ok.iter().map(|(e, _)| key_for(&e.rel)).collect();
        keys.resize(self.batch_size.max(n), 0);
        let res = self.method.compute(self.model, x, &keys)?;
        check_rows(self.method.name(), &res, n)?;
        let to_host = |t: &Tensor| -> Result<Tensor> {
            let t = t.f_narrow(0, 0, n as i64)?.f_to_kind(Kind::Float)?;
            if t.device().is_cuda() {
                // A non-blocking copy from the device lands in pinned
                // memory (libtorch's `_to_copy`), from its caching host
                // allocator: no pageable staging copy, nothing waits.
                Ok(t.f_contiguous()?
                    .f_to_device_(Device::Cpu, Kind::Float, true, false)?)
            } else {
                Ok(t.f_contiguous()?)
            }
        };
        let scores = res.scores.iter().map(to_host).collect::<Result<_>>()?;
        let columns = res
            .columns
            .iter()
            .map(|(name, t)| Ok((name.clone(), to_host(t)?)))
            .collect::<Result<_>>()?;
        let arrays = res
            .arrays
            .iter()
            .map(|a| {
                let values = to_host(&a.values)?;
                // A heatmap that is the values themselves (saliency, CAM
                // maps) comes back once.
                let heat = match &a.heat {
                    Some(h) if same_tensor(h, &a.values) => Some(values.shallow_clone()),
                    Some(h) => Some(to_host(h)?),
                    None => None,
                };
                Ok((a.name.clone(), values, heat))
            })
            .collect::<Result<_>>()?;
        Ok(Flight {
            ok,
            scores,
            classes: res.classes,
            columns,
            arrays,
        })
    }

    /// Hands a batch whose results are on the host to the writers, image
    /// by image.
    fn hand_out(
        &self,
        flight: Flight,
        tx_write: &Sender<ImageResult>,
        clock: &Clock,
    ) -> Result<()> {
        let Flight {
            ok,
            scores,
            classes,
            columns,
            arrays,
        } = flight;
        let n = ok.len();
        let values_of = |t: &Tensor, what: &'static str| -> Result<Vec<f32>> {
            let v = Vec::<f32>::try_from(&t.f_reshape([-1])?)?;
            if v.len() != n {
                return Err(Error::BatchMismatch {
                    what,
                    expected: n,
                    got: v.len(),
                });
            }
            Ok(v)
        };
        let scores = scores
            .iter()
            .map(|t| values_of(t, "score values"))
            .collect::<Result<Vec<_>>>()?;
        let columns = columns
            .iter()
            .map(|(name, t)| Ok((name.clone(), values_of(t, "per-image values")?)))
            .collect::<Result<Vec<_>>>()?;
        for (i, (entry, p)) in ok.into_iter().enumerate() {
            let i64i = i as i64;
            let per_image = arrays
                .iter()
                .map(|(name, values, heat)| {
                    Ok(ImageArray {
                        name: name.clone(),
                        values: values.f_get(i64i)?,
                        heat: heat.as_ref().map(|h| h.f_get(i64i)).transpose()?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let item = ImageResult {
                rel: entry.rel,
                path: entry.path,
                scores: scores.iter().map(|s| s[i]).collect(),
                classes: classes
                    .iter()
                    .map(|c| c.as_ref().and_then(|c| c.get(i).copied()))
                    .collect(),
                arrays: per_image,
                columns: columns.iter().map(|(k, v)| (k.clone(), v[i])).collect(),
                image: p.image,
                original_size: p.original_size,
                original: p.original,
            };
            let t = Instant::now();
            let sent = tx_write.send(item);
            Clock::add(&clock.wait_write, t);
            if sent.is_err() {
                return Err(Error::Internal {
                    what: "the writer threads stopped".into(),
                });
            }
        }
        Ok(())
    }
}

/// A batch queued on a CUDA device. With the queue overlap on
/// ([`cuda_rt::Overlap`]), its end is an event on stream 0 after the
/// copies of its results to the host; the compute thread then queues the
/// next batch before it waits for this one, so the device goes from batch
/// to batch without waiting for the host, whose share of a batch
/// (queueing the next one's kernels, handing this one out) varies with the
/// load of the decode and writer threads. Without events, `end` is `None`
/// and the device was synchronised already. Dropped unfinished (a run that
/// stops), it waits for the end (`end` is dropped first): the buffer it was
/// uploaded from goes back to the caching allocators.
struct Queued {
    end: cuda_rt::Awaited,
    flight: Flight,
    /// The buffer the batch was uploaded from, free after the end.
    staging: Option<Buf>,
}

impl Queued {
    /// Waits for the batch's end: its results, on the host, and the buffer
    /// it was uploaded from.
    fn wait(mut self) -> Result<(Flight, Option<Buf>)> {
        if let Err(e) = self.end.synchronize() {
            // The device failed (a sticky error): whether its work on the
            // buffer has ended is unknown, so the buffer is never freed.
            std::mem::forget(self.staging.take());
            return Err(e);
        }
        Ok((self.flight, self.staging))
    }
}

/// A computed batch whose results are on their way to the host: on CUDA
/// the compute thread starts the next batch before handing these out, so
/// the device never waits for the host's share of a batch (copying
/// results, splitting them, queueing them for the writers). Its copies
/// are complete once the device has been synchronised after them.
struct Flight {
    ok: Vec<(Entry, Prepared)>,
    /// Per output, `(n,)` float32 host scores.
    scores: Vec<Tensor>,
    classes: Vec<Option<Vec<usize>>>,
    /// Per-image value columns, `(n,)` float32 on the host.
    columns: Vec<(String, Tensor)>,
    /// Per array: name, values and heatmap on the host, `(n, ...)`.
    arrays: Vec<(String, Tensor, Option<Tensor>)>,
}

impl Flight {
    /// Whether a result is a view of (or into) the host buffer `buf`.
    fn views(&self, buf: &Tensor) -> bool {
        let lo = buf.data_ptr() as usize;
        let hi = lo + buf.numel() * buf.kind().elt_size_in_bytes();
        let inside = |t: &Tensor| (lo..hi).contains(&(t.data_ptr() as usize));
        self.scores.iter().any(inside)
            || self.columns.iter().any(|(_, t)| inside(t))
            || self
                .arrays
                .iter()
                .any(|(_, v, h)| inside(v) || h.as_ref().is_some_and(inside))
    }
}

/// Sets the calling thread's libtorch intra-op thread count to `n`, for
/// good. libtorch sets a thread's count lazily, at its first parallel
/// operation, to the count last set by *any* thread: a decode thread that
/// set 1 when it started took the compute thread's 2 at its first
/// operation whenever the compute thread had set it in between. Which of
/// libtorch's float bilinear kernels runs depends on the count, so the
/// inputs' last bits depended on that race (a one-image run and a
/// four-image run of the same image once wrote different maps). Starting
/// the lazy initialisation first makes the setting stick.
pub(crate) fn set_torch_threads(n: usize) {
    let _ = tch::get_num_threads();
    tch::set_num_threads(i32::try_from(n).unwrap_or(1));
}

/// Lowers the calling thread's scheduling priority (nice +10, Linux),
/// for the decode and writer threads of a CUDA run. There the compute
/// thread launches the model's kernels one by one and competes for the
/// cores with a decode and a writer thread per core; when it waits for a
/// core, so does the GPU. With this, a resnet50 fp16 saliency run at batch
/// 64 on an H100 with 16 cores took 28 ms a batch on the compute thread
/// instead of 35 (the model alone: 18 ms), and ran 1,830 instead of 1,630
/// images/s after its start-up. The others still get every core the
/// compute thread leaves idle.
fn yield_to_compute() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on this thread's own id only changes its nice
    // value (failure is harmless).
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}

/// Names the calling thread for the operating system (`top -H`, `perf`,
/// `/proc/PID/task/*/comm`; 15 bytes at most), so that a run's time can
/// be told apart by thread (`scripts/thread_cpu.py`).
fn name_thread(name: &std::ffi::CStr) {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_NAME reads the NUL-terminated name and renames only
    // the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr());
    }
    #[cfg(not(target_os = "linux"))]
    let _ = name;
}

/// Whether `a` and `b` view the same elements (a shallow clone).
fn same_tensor(a: &Tensor, b: &Tensor) -> bool {
    a.data_ptr() == b.data_ptr()
        && a.size() == b.size()
        && a.stride() == b.stride()
        && a.kind() == b.kind()
        && a.device() == b.device()
}

/// What flows to the collector.
enum Event {
    Done,
    Failed { rel: String, error: String },
    Fatal(Error),
}

#[derive(Default)]
struct Collected {
    processed: usize,
    failed: Vec<(String, String)>,
    fatal: Option<Error>,
    steady: Option<f64>,
}

#[allow(clippy::too_many_arguments)]
fn collect(
    rx: Receiver<Event>,
    progress: Option<&(dyn Fn(&Progress) + Send + Sync)>,
    done: &AtomicUsize,
    n_failed: &AtomicUsize,
    total: usize,
    start: Instant,
    batch_size: usize,
) -> Collected {
    let mut out = Collected::default();
    // When the first batch's worth of images was done, and the last image.
    let (mut first_batch, mut last) = (None, None);
    for event in rx.iter() {
        match event {
            Event::Done => {
                out.processed += 1;
                done.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                if out.processed == batch_size {
                    first_batch = Some(now);
                }
                last = Some(now);
            }
            Event::Failed { rel, error } => {
                out.failed.push((rel, error));
                n_failed.fetch_add(1, Ordering::Relaxed);
            }
            Event::Fatal(e) => {
                // The first failure; a failure that comes after a cancel
                // (a writer's, of an earlier batch) is the one to tell.
                let cancelled = matches!(out.fatal, Some(Error::Cancelled));
                if out.fatal.is_none() || (cancelled && !matches!(e, Error::Cancelled)) {
                    out.fatal = Some(e);
                }
            }
        }
        if let Some(f) = progress {
            f(&Progress {
                done: done.load(Ordering::Relaxed),
                failed: n_failed.load(Ordering::Relaxed),
                total,
                elapsed: start.elapsed(),
            });
        }
    }
    if let (Some(t0), Some(t1)) = (first_batch, last) {
        let span = t1.duration_since(t0).as_secs_f64();
        if out.processed > batch_size && span > 0.0 {
            out.steady = Some((out.processed - batch_size) as f64 / span);
        }
    }
    out
}

/// A decoded batch, ready for the compute thread.
struct Decoded {
    /// Images that decoded, in order.
    ok: Vec<(Entry, Prepared)>,
    /// Files that did not, with the reason.
    failed: Vec<(String, String)>,
    /// The model input of `ok`, padded to the batch size, on its way to
    /// the model's device; `None` when nothing decoded.
    x: Option<Result<Upload>>,
    /// The buffer `x` was uploaded from, to be handed back to the producer
    /// when the batch is done.
    staging: Option<Buf>,
}

/// A batch's model input on its way to the device.
enum Upload {
    /// On a CPU, or queued on the device's stream 0: ready to use.
    Ready(Tensor),
    /// Being copied on the copy stream.
    Copying {
        copy: Copying,
        finish: Finish,
        /// The images in the batch (the rest is padding).
        n: usize,
    },
}

/// A copy to the device tensor `raw` on the copy stream, which ends at
/// `done`. Dropped before the input was made (a run that stops), it waits
/// for the copy (`done` is dropped first): the caching allocator may hand
/// `raw`'s memory out again at once, and the pinned rows it copies from go
/// back to the producer.
struct Copying {
    done: cuda_rt::Awaited,
    raw: Tensor,
}

/// What makes the model input of a batch copied to the device.
enum Finish {
    /// Float rows (maybe rounded, maybe channels-last): widened to float32.
    Float { channels_last: bool },
    /// Byte rows: normalised, and the pad rows zeroed.
    Bytes(ByteNormaliser),
}

impl Upload {
    /// The model input. For a batch still being copied, the work the
    /// calling thread queues on stream 0 from now on waits for the copy
    /// (the thread does not): call it on the compute thread, right before
    /// the batch's kernels.
    fn into_input(self) -> Result<Tensor> {
        let (mut copy, finish, n) = match self {
            Upload::Ready(x) => return Ok(x),
            Upload::Copying { copy, finish, n } => (copy, finish, n),
        };
        if let Some(done) = copy.done.get() {
            done.wait_on_default_stream()?;
        }
        // Stream 0 now waits for the copy: `raw` may go whenever.
        copy.done.release();
        let raw = copy.raw.shallow_clone();
        match finish {
            Finish::Float { channels_last } => float_input(raw, channels_last),
            Finish::Bytes(norm) => byte_input(&raw, n, &norm),
        }
    }
}

/// A staging buffer: host rows (pinned for a CUDA model) and, when the
/// engine has a copy stream, the device buffer of the same layout that
/// they are copied into.
struct Buf {
    host: Tensor,
    dev: Option<Tensor>,
}

/// Host batches that the decode threads write each image's input into,
/// row by row ([`Preprocessor::load_into`]): no tensor per image, no
/// stacking pass on the producer. For a CUDA model they are page-locked
/// (pinned), and the batch goes to the GPU with one asynchronous copy: no
/// pageable staging copy in the CUDA driver, and the compute thread never
/// waits for an upload. With a torchvision recipe the rows hold the crops'
/// 8-bit values instead, normalised on the device
/// ([`Preprocessor::load_bytes_into`]): a quarter of the upload, and no
/// normalisation on the decode threads. Float rows for a method that sees
/// its input only through a half-precision model's cast hold the values
/// rounded to the model's precision ([`Engine::rounded_rows`]): half the
/// upload, widened to float32 on the device, the same bits in the model.
/// With the copy overlap on ([`cuda_rt::Overlap`]), each pinned
/// buffer has a device twin that it is copied into on a copy stream of the
/// engine's own, while the GPU computes the batch before: the compute
/// thread makes stream 0 wait for the copy, and the widening or
/// normalisation runs there. Without it the copy is queued on stream 0
/// behind the previous batch's kernels.
/// A pinned buffer (and its twin) is reused only
/// once the batch uploaded from it has ended on the device, and at most
/// `max` exist: the two batches in the channel, the one the device
/// computes, the one before it (until its end, when batches are queued
/// ahead) and the one being decoded. On a CPU the buffer is the batch
/// itself, which a method's results may view: each batch gets a new one.
struct Staging {
    device: Device,
    /// `(N, C, H, W)`, or `(N, H, W, C)` for channels-last or byte rows.
    shape: [i64; 4],
    channels_last: bool,
    /// Byte rows: the normalisation on the device.
    bytes: Option<ByteNormaliser>,
    /// Float rows rounded to fp16 or bf16 (never with byte rows).
    rounded: Option<Kind>,
    made: usize,
    /// The copy stream of a CUDA model, where the runtime is found and the
    /// overlap is on ([`cuda_rt::Overlap`]).
    copy: Option<CopyStream>,
    /// The most buffers that exist on CUDA.
    max: usize,
    /// Device twins not yet given to a buffer (see [`Staging::twin`]).
    twins: Vec<Tensor>,
}

impl Staging {
    fn new(device: Device, pre: &Preprocessor, batch_size: usize, channels_last: bool) -> Self {
        let sidecar = pre.sidecar();
        let [h, w] = sidecar.size_i64();
        let (n, c) = (batch_size as i64, sidecar.channels as i64);
        // Byte rows for a CUDA model fed by a torchvision recipe (whose
        // constants on the device cannot be had: float rows).
        let bytes = (device.is_cuda() && !channels_last && pre.has_byte_inputs())
            .then(|| pre.byte_normaliser(device).ok())
            .flatten();
        let shape = if channels_last || bytes.is_some() {
            [n, h, w, c]
        } else {
            [n, c, h, w]
        };
        Staging {
            device,
            shape,
            channels_last,
            bytes,
            rounded: None,
            made: 0,
            copy: match device {
                Device::Cuda(i) if cuda_rt::Overlap::get().copy => CopyStream::new(i),
                _ => None,
            },
            max: if cuda_rt::Overlap::get().queue { 5 } else { 4 },
            twins: Vec::new(),
        }
    }

    /// Float rows rounded to `kind` (fp16 or bf16), unless the rows hold
    /// bytes.
    fn rounded(mut self, kind: Option<Kind>) -> Self {
        if self.bytes.is_none() {
            self.rounded = kind;
        }
        self
    }

    /// The kind of the buffers' values.
    fn kind(&self) -> Kind {
        match (&self.bytes, self.rounded) {
            (Some(_), _) => Kind::Uint8,
            (None, Some(kind)) => kind,
            (None, None) => Kind::Float,
        }
    }

    /// A free buffer: one handed back, else a new one (on CUDA while fewer
    /// than `max` exist, else the next one handed back). `None` when the
    /// memory cannot be had (the batch then takes the stacking path).
    fn take(&mut self, free: &Receiver<Buf>) -> Option<Buf> {
        if let Ok(buf) = free.try_recv() {
            return Some(buf);
        }
        if !self.device.is_cuda() {
            let host = Tensor::f_empty(self.shape, (self.kind(), Device::Cpu)).ok()?;
            return Some(Buf { host, dev: None });
        }
        if self.made < self.max {
            let host = Tensor::f_zeros(self.shape, (self.kind(), Device::Cpu))
                .and_then(|t| t.f_internal_pin_memory(self.device))
                .ok()?;
            let dev = self.twin();
            self.made += 1;
            return Some(Buf { host, dev });
        }
        free.recv().ok()
    }

    /// The device twin of a new buffer; `None` without a copy stream (or
    /// without the memory), and the buffer then goes up on stream 0.
    ///
    /// The first call makes all `max` twins, then waits for the device.
    /// libtorch's caching allocator hands out memory that stream-0 work
    /// queued earlier may still use (the work of a tensor freed on the host
    /// meanwhile): safe for stream 0, which runs in order, but the copy
    /// stream does not wait for stream 0, and a copy into such memory could
    /// land before that work wrote it. Twins were once made while the
    /// device computed batches, the likely cause of an H100 fp32 run that
    /// wrote two batches' maps of other images (Pearson r 0.25 against a
    /// run without the overlaps). Made before the first batch and waited
    /// for, the twins are the copy stream's alone for the whole run.
    fn twin(&mut self) -> Option<Tensor> {
        let Device::Cuda(i) = self.device else {
            return None;
        };
        self.copy.as_ref()?;
        if self.made == 0 {
            let made: Option<Vec<Tensor>> = (0..self.max)
                .map(|_| Tensor::f_empty(self.shape, (self.kind(), self.device)).ok())
                .collect();
            self.twins = made.unwrap_or_default();
            tch::Cuda::synchronize(i as i64);
        }
        self.twins.pop()
    }

    /// Row views of a buffer for the first `n` images, or `None`s without
    /// one: `(C, H, W)` float rows (a view of an `(H, W, C)` row in
    /// channels-last order), or `(H, W, C)` byte rows.
    fn rows(&self, buf: Option<&Tensor>, n: usize) -> Vec<Option<Tensor>> {
        (0..n).map(|i| self.row(buf?, i).ok()).collect()
    }

    /// The view of row `i` of `buf` that an image's input is written into
    /// (and that its [`Prepared::input`] then is).
    fn row(&self, buf: &Tensor, i: usize) -> Result<Tensor> {
        let row = buf.f_select(0, i as i64)?;
        if self.channels_last && self.bytes.is_none() {
            // The (C, H, W) view of the (H, W, C) row: the input is
            // written in the buffer's order.
            Ok(row.f_permute([2, 0, 1])?)
        } else {
            Ok(row)
        }
    }

    /// Splits a decoded chunk and makes its model input, off the compute
    /// thread: from the buffer `buf` when every image that decoded is in
    /// its row (the rows of files that failed are closed up), else by
    /// stacking the images' inputs.
    fn assemble(
        &self,
        batch: Vec<(Entry, Result<Prepared>, bool)>,
        batch_size: usize,
        buf: Option<Buf>,
    ) -> Decoded {
        let mut ok = Vec::with_capacity(batch.len());
        let mut failed = Vec::new();
        let mut all_staged = true;
        let mut moved = Ok(());
        for (i, (entry, prepared, staged)) in batch.into_iter().enumerate() {
            match prepared {
                Ok(mut p) => {
                    all_staged &= staged;
                    if let (Some(buf), true, true) = (&buf, staged, i != ok.len()) {
                        // A row above was a file that failed: move this
                        // image's row up. Its input is then the new row (a
                        // later image's row may take the old one's place,
                        // and the stacking path reads the inputs).
                        moved = moved.and_then(|()| {
                            move_row(&buf.host, i, ok.len())?;
                            p.input = self.row(&buf.host, ok.len())?;
                            Ok(())
                        });
                    }
                    ok.push((entry, p));
                }
                Err(e) => failed.push((entry.rel, e.summary())),
            }
        }
        let x =
            (!ok.is_empty()).then(|| self.input(&ok, buf.as_ref(), all_staged, moved, batch_size));
        Decoded {
            ok,
            failed,
            x,
            staging: buf,
        }
    }

    /// The model input of the decoded images `ok`, on its way to the
    /// device: `buf` uploaded when every one is in its row (`all_staged`,
    /// the rows closed up as `moved` says), else their inputs stacked.
    fn input(
        &self,
        ok: &[(Entry, Prepared)],
        buf: Option<&Buf>,
        all_staged: bool,
        moved: Result<()>,
        batch_size: usize,
    ) -> Result<Upload> {
        let n = ok.len();
        if let Some(b) = buf {
            if let Some(norm) = &self.bytes {
                // A byte batch has no other way up.
                moved?;
                if !all_staged {
                    return Err(Error::Internal {
                        what: "an image missing from a byte batch".into(),
                    });
                }
                if let Some(up) = self.copy_up(b, n, Finish::Bytes(norm.shallow_clone())) {
                    return up;
                }
                return upload_bytes(&b.host, n, self.device, norm).map(Upload::Ready);
            }
            if let (true, Ok(())) = (all_staged, moved) {
                let finish = Finish::Float {
                    channels_last: self.channels_last,
                };
                if let Some(up) = self.copy_up(b, n, finish) {
                    return up;
                }
                if let Ok(x) = upload_staged(&b.host, n, self.device, self.channels_last) {
                    return Ok(Upload::Ready(x));
                }
            }
        }
        // Pinned memory is not in use (or a row could not be written).
        let inputs: Vec<&Tensor> = ok.iter().map(|(_, p)| &p.input).collect();
        let x = padded_batch(&inputs, batch_size, self.device, self.channels_last)?;
        // Rounded rows widened (the model input is float32).
        Ok(Upload::Ready(x.f_to_kind(Kind::Float)?))
    }

    /// Starts copying `buf`, whose first `n` rows hold the batch, into its
    /// device twin on the copy stream (float rows get their pad rows
    /// zeroed first, byte rows on the device); `None` without a copy
    /// stream or a twin.
    fn copy_up(&self, buf: &Buf, n: usize, finish: Finish) -> Option<Result<Upload>> {
        let (stream, dev) = (self.copy.as_ref()?, buf.dev.as_ref()?);
        let start = || {
            if let Finish::Float { .. } = finish {
                zero_rows_from(&buf.host, n)?;
            }
            let done = stream.upload(&buf.host, dev)?;
            Ok(Upload::Copying {
                copy: Copying {
                    done: cuda_rt::Awaited::new(Some(done)),
                    raw: dev.shallow_clone(),
                },
                finish,
                n,
            })
        };
        Some(start())
    }
}

/// Decodes one image into its row (of bytes, of the input, or of the
/// input rounded to `kind`), when it has one; whether it is there.
fn load_row(
    pre: &Preprocessor,
    path: &std::path::Path,
    row: Option<Tensor>,
    kind: Kind,
) -> (Result<Prepared>, bool) {
    // Large originals are not held through the batch: the writer decodes
    // them again (see `Preprocessor::original_keep_max`).
    let light = |p: Result<Prepared>| {
        p.map(|mut p| {
            if p.original
                .as_ref()
                .is_some_and(|o| o.as_raw().len() > pre.original_keep_max())
            {
                p.original = None;
            }
            p
        })
    };
    match row {
        Some(row) => {
            let p = match kind {
                Kind::Uint8 => pre.load_bytes_into(path, &row),
                Kind::Float => pre.load_into(path, &row),
                _ => load_rounded(pre, path, &row),
            };
            let ok = p.is_ok();
            (light(p), ok)
        }
        None => (light(pre.load(path)), false),
    }
}

/// [`Preprocessor::load_into`] a float32 input of this thread's own, then
/// into the fp16 or bf16 `row` by libtorch's conversion, which rounds to
/// nearest even as the device's does; the returned input is `row`.
fn load_rounded(pre: &Preprocessor, path: &std::path::Path, row: &Tensor) -> Result<Prepared> {
    thread_local! {
        static INPUT: std::cell::RefCell<Option<Tensor>> = const { std::cell::RefCell::new(None) };
    }
    INPUT.with(|cell| {
        let mut cell = cell.borrow_mut();
        let size = row.size();
        let input = match cell.take() {
            Some(t) if t.size() == size => t,
            _ => Tensor::f_empty(size.as_slice(), (Kind::Float, Device::Cpu))?,
        };
        let result = pre.load_into(path, &input).and_then(|mut p| {
            row.shallow_clone().f_copy_(&input)?;
            p.input = row.shallow_clone();
            Ok(p)
        });
        *cell = Some(input);
        result
    })
}

/// Copies row `from` of a staging buffer to row `to`.
fn move_row(buf: &Tensor, from: usize, to: usize) -> Result<()> {
    let mut dst = buf.f_select(0, to as i64)?;
    dst.f_copy_(&buf.f_select(0, from as i64)?)?;
    Ok(())
}

/// Zeroes the pad rows of a staging buffer whose first `n` rows hold the
/// batch, and starts its asynchronous copy to `device` (rows rounded to
/// fp16 or bf16 are then widened to float32 there).
fn upload_staged(buf: &Tensor, n: usize, device: Device, channels_last: bool) -> Result<Tensor> {
    zero_rows_from(buf, n)?;
    let rows = buf.f_to_device_(device, buf.kind(), true, false)?;
    float_input(rows, channels_last)
}

/// The model input of a batch's float rows on its device: `(N, C, H, W)`
/// (a view of `(N, H, W, C)` rows in channels-last order), widened to
/// float32 when the rows are rounded (`to_kind` of a float32 tensor is the
/// tensor itself).
fn float_input(rows: Tensor, channels_last: bool) -> Result<Tensor> {
    let x = if channels_last {
        rows.f_permute([0, 3, 1, 2])?
    } else {
        rows
    };
    Ok(x.f_to_kind(Kind::Float)?)
}

/// Starts the asynchronous copy of a byte buffer whose first `n` rows hold
/// the batch to `device`, and its normalisation there; the pad rows are
/// zero model inputs, as in every batch.
fn upload_bytes(buf: &Tensor, n: usize, device: Device, norm: &ByteNormaliser) -> Result<Tensor> {
    let rows = buf.f_to_device_(device, Kind::Uint8, true, false)?;
    byte_input(&rows, n, norm)
}

/// The model input of a batch's byte rows on their device, whose first `n`
/// rows hold the batch: normalised, with the pad rows zero model inputs.
fn byte_input(rows: &Tensor, n: usize, norm: &ByteNormaliser) -> Result<Tensor> {
    let x = norm.normalise(rows)?;
    zero_rows_from(&x, n)?;
    Ok(x)
}

/// Zeroes the rows of `t` from row `n` on (a batch's padding).
fn zero_rows_from(t: &Tensor, n: usize) -> Result<()> {
    let rows = t.size()[0];
    if (n as i64) < rows {
        let mut pad = t.f_narrow(0, n as i64, rows - n as i64)?;
        let _ = pad.f_zero_()?;
    }
    Ok(())
}

/// Stacks `inputs` and pads them with zero images to `batch_size` rows
/// (see the module docs for why), in channels-last memory order when
/// `channels_last` (one copy either way), then copies the batch to
/// `device`. On a GPU the copy happens here, off the compute thread.
fn padded_batch(
    inputs: &[&Tensor],
    batch_size: usize,
    device: Device,
    channels_last: bool,
) -> Result<Tensor> {
    let n = inputs.len();
    let x = if channels_last {
        // (H, W, C) views stacked into a contiguous (N, H, W, C) batch.
        let hwc = inputs
            .iter()
            .map(|t| t.f_permute([1, 2, 0]))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Tensor::f_stack(&hwc, 0)?.f_to_kind(Kind::Float)?
    } else {
        preprocess::stack(inputs)?
    };
    let x = if n < batch_size {
        let mut shape = x.size();
        shape[0] = (batch_size - n) as i64;
        let pad = Tensor::f_zeros(shape.as_slice(), (x.kind(), x.device()))?;
        Tensor::f_cat(&[x, pad], 0)?
    } else {
        x
    };
    let x = if channels_last {
        // The same (N, C, H, W) shape, with NHWC strides.
        x.f_permute([0, 3, 1, 2])?
    } else {
        x
    };
    Ok(x.f_to_device(device)?)
}

#[cfg(test)]
mod tests {
    /// Huge pages pay up to batches of 64 MiB of float32 inputs.
    #[test]
    fn huge_pages_pay_for_batches_the_heap_reuses() {
        use super::huge_pages_pay;
        assert!(huge_pages_pay(32, 3 * 224 * 224));
        assert!(huge_pages_pay(64, 3 * 224 * 224));
        assert!(huge_pages_pay(1, 16 << 20));
        assert!(!huge_pages_pay(1, (16 << 20) + 1));
        assert!(!huge_pages_pay(128, 3 * 224 * 224));
        assert!(!huge_pages_pay(usize::MAX, 2));
    }

    /// The restart adds glibc's huge-page heaps to the user's tunables,
    /// and leaves a `glibc.malloc.hugetlb` of theirs as it is.
    #[cfg(unix)]
    #[test]
    fn the_restart_adds_huge_page_heaps_to_glibc_tunables() {
        use std::ffi::OsString;
        let add = |v: Option<&str>| super::huge_page_heap_tunables(v.map(OsString::from));
        let some = |v: &str| Some(OsString::from(v));
        assert_eq!(add(None), some("glibc.malloc.hugetlb=1"));
        assert_eq!(add(Some("")), some("glibc.malloc.hugetlb=1"));
        assert_eq!(
            add(Some("glibc.malloc.arena_max=2")),
            some("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
        );
        assert_eq!(add(Some("glibc.malloc.hugetlb=0")), None);
        assert_eq!(
            add(Some("glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=2")),
            None
        );
        // A longer name that starts the same is another setting.
        assert_eq!(
            add(Some("glibc.malloc.hugetlbx=1")),
            some("glibc.malloc.hugetlbx=1:glibc.malloc.hugetlb=1")
        );
    }

    /// A thread's libtorch thread count, once set with `set_torch_threads`,
    /// survives another thread setting its own afterwards (with a bare
    /// `tch::set_num_threads` it would become the other thread's at its
    /// first operation).
    #[test]
    fn a_threads_libtorch_thread_count_sticks() {
        use std::sync::{Arc, Barrier};
        let barrier = Arc::new(Barrier::new(2));
        let theirs = barrier.clone();
        let decode = std::thread::spawn(move || {
            super::set_torch_threads(1);
            theirs.wait(); // the other thread sets 3 now
            theirs.wait();
            let x = tch::Tensor::ones([64], (tch::Kind::Float, tch::Device::Cpu));
            let _ = x.sum(tch::Kind::Float);
            tch::get_num_threads()
        });
        barrier.wait();
        let before = tch::get_num_threads();
        super::set_torch_threads(3);
        barrier.wait();
        let got = decode.join().unwrap();
        super::set_torch_threads(usize::try_from(before).unwrap_or(1));
        assert_eq!(got, 1);
    }

    use super::*;

    /// The pinned path's row copies, closed-up holes, pad rows and memory
    /// order give the batch the stacking path gives (here on the CPU, where
    /// the buffer is not pinned and the copy is synchronous; the layout
    /// logic is the same); rows rounded to fp16 or bf16 give that batch
    /// rounded, widened to float32.
    #[test]
    fn staged_rows_give_the_stacked_batch() {
        for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
            staged_rows_of_kind(kind);
        }
    }

    fn staged_rows_of_kind(kind: Kind) {
        let rounded = |t: Tensor| t.to_kind(kind).to_kind(Kind::Float);
        let (bs, c, h, w) = (4usize, 3i64, 5i64, 6i64);
        let sidecar = Sidecar::from_json(
            r#"{"input_size": [5, 6], "channels": 3, "mean": [0, 0, 0], "std": [1, 1, 1]}"#,
            "m.json",
        )
        .unwrap();
        let pre = Preprocessor::new(sidecar);
        for channels_last in [false, true] {
            let staging = Staging::new(Device::Cpu, &pre, bs, channels_last)
                .rounded((kind != Kind::Float).then_some(kind));
            assert_eq!(staging.kind(), kind);
            for n in [1usize, 3, 4] {
                let inputs: Vec<Tensor> = (0..n)
                    .map(|i| Tensor::randn([c, h, w], (Kind::Float, Device::Cpu)) + i as f64)
                    .collect();
                // A reused buffer: stale values in every row.
                let buf = Tensor::full(staging.shape, 7.0, (kind, Device::Cpu));
                let rows = staging.rows(Some(&buf), n);
                for (mut row, x) in rows.into_iter().map(Option::unwrap).zip(&inputs) {
                    row.f_copy_(x).unwrap();
                }
                let got = upload_staged(&buf, n, Device::Cpu, channels_last).unwrap();
                if kind == Kind::Float && !channels_last {
                    // On a CPU the batch is the buffer itself, no copy.
                    assert!(same_tensor(&got, &buf));
                }
                let refs: Vec<&Tensor> = inputs.iter().collect();
                let want = rounded(padded_batch(&refs, bs, Device::Cpu, channels_last).unwrap());
                assert_eq!(got.kind(), Kind::Float);
                assert_eq!(got.size(), want.size());
                assert_eq!(got.stride(), want.stride(), "memory order");
                assert!(
                    got.equal(&want),
                    "n {n}, channels_last {channels_last}, {kind:?}"
                );
                // Row 0 failed to decode: the others move up.
                if n > 1 {
                    let buf = Tensor::full(staging.shape, 7.0, (kind, Device::Cpu));
                    let rows = staging.rows(Some(&buf), n);
                    let mut batch = Vec::new();
                    for (i, (mut row, x)) in rows
                        .into_iter()
                        .map(Option::unwrap)
                        .zip(&inputs)
                        .enumerate()
                    {
                        let entry = Entry {
                            rel: format!("{i}.png"),
                            path: format!("{i}.png").into(),
                            problem: None,
                        };
                        if i == 0 {
                            batch.push((entry, Err(Error::Internal { what: "x".into() }), false));
                            continue;
                        }
                        row.f_copy_(x).unwrap();
                        let p = Prepared {
                            input: row,
                            image: crate::preprocess::InputImage::Planes(x.shallow_clone()),
                            original_size: (6, 5),
                            original: None,
                        };
                        batch.push((entry, Ok(p), true));
                    }
                    let d = staging.assemble(
                        batch,
                        bs,
                        Some(Buf {
                            host: buf,
                            dev: None,
                        }),
                    );
                    assert_eq!(d.ok.len(), n - 1);
                    assert_eq!(d.failed.len(), 1);
                    let got = d.x.unwrap().and_then(Upload::into_input).unwrap();
                    let refs: Vec<&Tensor> = inputs[1..].iter().collect();
                    let want =
                        rounded(padded_batch(&refs, bs, Device::Cpu, channels_last).unwrap());
                    assert!(
                        got.equal(&want),
                        "hole: n {n}, channels_last {channels_last}, {kind:?}"
                    );
                    // Each image's input is its own row still (the path
                    // that stacks them, when the buffer cannot go up).
                    for ((_, p), x) in d.ok.iter().zip(&inputs[1..]) {
                        let x = rounded(x.shallow_clone());
                        assert!(p.input.to_kind(Kind::Float).equal(&x), "n {n}, {kind:?}");
                    }
                }
            }
        }
    }

    /// A batch copied whole into its device twin (the copy overlap) is
    /// finished into the input the stream-0 upload makes of its buffer:
    /// float rows (plain or channels-last, float32 or rounded) widened in
    /// the same memory order, byte rows normalised with the pad rows zeroed.
    /// Here on the CPU, with the twin a copy of the buffer and no event.
    #[test]
    fn copied_batches_finish_into_the_uploaded_input() {
        let (bs, n) = (4usize, 3usize);
        let json = r#"{"input_size": [5, 6], "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize": 6, "crop": [5, 6]}"#;
        let pre = Preprocessor::new(Sidecar::from_json(json, "m.json").unwrap());
        let copied = |raw: Tensor, finish: Finish| {
            let copy = Copying {
                done: cuda_rt::Awaited::new(None),
                raw,
            };
            Upload::Copying { copy, finish, n }.into_input().unwrap()
        };
        for kind in [Kind::Float, Kind::Half, Kind::BFloat16] {
            for channels_last in [false, true] {
                let shape: [i64; 4] = if channels_last {
                    [bs as i64, 5, 6, 3]
                } else {
                    [bs as i64, 3, 5, 6]
                };
                // Stale values in the pad row.
                let buf = Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_kind(kind);
                let want = upload_staged(&buf, n, Device::Cpu, channels_last).unwrap();
                // `copy_up` zeroes the pad rows, then copies.
                zero_rows_from(&buf, n).unwrap();
                let got = copied(buf.copy(), Finish::Float { channels_last });
                assert_eq!(got.kind(), Kind::Float);
                assert_eq!(got.stride(), want.stride(), "{kind:?}, {channels_last}");
                assert!(got.equal(&want), "{kind:?}, channels_last {channels_last}");
            }
        }
        let norm = pre.byte_normaliser(Device::Cpu).unwrap();
        let buf = Tensor::randint(256, [bs as i64, 5, 6, 3], (Kind::Uint8, Device::Cpu));
        let want = upload_bytes(&buf, n, Device::Cpu, &norm).unwrap();
        let got = copied(buf.copy(), Finish::Bytes(norm.shallow_clone()));
        assert_eq!(got.size(), [bs as i64, 3, 5, 6]);
        assert!(got.equal(&want));
        let pad = got.narrow(0, n as i64, (bs - n) as i64);
        assert_eq!(pad.abs().sum(Kind::Double).double_value(&[]), 0.0);
    }

    /// A decode thread's rounded row holds `Preprocessor::load`'s input
    /// rounded to the row's kind, for images of two sizes in turn (the
    /// thread's float32 input is reused) and in a channels-last view; a
    /// file that fails is an error and leaves the next image's row right.
    #[test]
    fn rounded_rows_hold_the_rounded_input() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for (i, (w, h)) in [(40u32, 30u32), (13, 57)].into_iter().enumerate() {
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([(x * 37 + y) as u8, (y * 11 + i as u32) as u8, (x ^ y) as u8])
            });
            let path = dir.path().join(format!("{i}.png"));
            img.save(&path).unwrap();
            paths.push(path);
        }
        let broken = dir.path().join("broken.png");
        std::fs::write(&broken, b"not an image").unwrap();
        let sidecar = Sidecar::from_json(
            r#"{"input_size": [9, 11], "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}"#,
            "m.json",
        )
        .unwrap();
        let pre = Preprocessor::new(sidecar);
        for kind in [Kind::Half, Kind::BFloat16] {
            for channels_last in [false, true] {
                let staging = Staging::new(Device::Cpu, &pre, 2, channels_last).rounded(Some(kind));
                let buf = Tensor::zeros(staging.shape, (kind, Device::Cpu));
                for path in [&paths[0], &broken, &paths[1], &paths[0]] {
                    let row = staging.rows(Some(&buf), 1).pop().flatten().unwrap();
                    let (p, staged) = load_row(&pre, path, Some(row.shallow_clone()), kind);
                    if path == &broken {
                        assert!(matches!(p, Err(Error::Image { .. })), "{p:?}");
                        assert!(!staged);
                        continue;
                    }
                    assert!(staged);
                    let want = pre.load(path).unwrap().input.to_kind(kind);
                    assert!(row.equal(&want), "{path:?} {kind:?} {channels_last}");
                    assert!(p.unwrap().input.equal(&want));
                }
            }
        }
    }

    /// A device twin is the copy stream's alone: stream-0 work queued
    /// before the twin was made, into memory freed on the host meanwhile
    /// (which the caching allocator may hand to the twin), cannot
    /// overwrite an upload into it. Without CUDA there is nothing to
    /// check: no twin is made.
    #[test]
    fn stream_0_work_from_before_a_twin_cannot_overwrite_its_upload() {
        let json = r#"{"input_size": [224, 224], "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}"#;
        let pre = Preprocessor::new(Sidecar::from_json(json, "m.json").unwrap());
        let (_tx, free) = unbounded::<Buf>();
        if !tch::Cuda::is_available() {
            let mut staging = Staging::new(Device::Cpu, &pre, 8, false);
            assert!(staging.take(&free).unwrap().dev.is_none());
            return;
        }
        let device = Device::Cuda(0);
        let mut staging = Staging::new(device, &pre, 8, false);
        staging.copy = CopyStream::new(0);
        assert!(staging.copy.is_some(), "CUDA without a copy stream");
        // Long stream-0 work, then a write of 7s into a buffer of a twin's
        // size, freed on the host before the device gets to it.
        let a = Tensor::randn([4096, 4096], (Kind::Float, device));
        let mut acc = a.shallow_clone();
        for _ in 0..30 {
            acc = acc.matmul(&a).tanh();
        }
        let stale = Tensor::empty(staging.shape, (Kind::Float, device));
        let _ = stale.shallow_clone().fill_(7.0);
        drop(stale);
        let bufs: Vec<Buf> = (0..staging.max)
            .map(|_| staging.take(&free).unwrap())
            .collect();
        for (i, buf) in bufs.iter().enumerate() {
            let dev = buf.dev.as_ref().expect("a twin");
            let _ = buf.host.shallow_clone().fill_(i as f64);
            let copy = staging.copy.as_ref().unwrap();
            copy.upload(&buf.host, dev)
                .unwrap()
                .wait_on_default_stream()
                .unwrap();
            let back = dev.to_device(Device::Cpu);
            assert_eq!(back.min().double_value(&[]), i as f64, "twin {i}");
            assert_eq!(back.max().double_value(&[]), i as f64, "twin {i}");
        }
        drop(acc);
    }

    #[test]
    fn same_tensor_means_a_shallow_clone() {
        let a = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
        assert!(same_tensor(&a, &a.shallow_clone()));
        assert!(!same_tensor(&a, &a.copy()));
        assert!(!same_tensor(&a, &a.view([3, 2])));
    }
}
