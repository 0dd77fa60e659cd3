//! Command-line flags (clap derive) and their validation into a [`Job`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tch_vis::cam::CamMethod;
use tch_vis::heatmap::PngCompression;
use tch_vis::integrated_gradients::Rule;
use tch_vis::io::Shard;
use tch_vis::scores::ScoreSpec;
use tch_vis::{DeviceSpec, Precision};

use crate::run::{Images, Job, Mode, Smooth};

const ABOUT: &str = "tf-keras-vis scores for TorchScript models: saliency maps and SmoothGrad, class activation maps, Integrated Gradients and activation maximization, over folders of images";

const AFTER: &str = "\
Exit status: 0 the run finished (also when some inputs failed; see report.json),
1 the run failed while processing or was interrupted, or --strict and some
inputs failed, 2 bad usage or a problem found before the first image (flags,
SPECs that do not fit the model, unreadable model/sidecar/DIR, CUDA
unavailable); nothing is written.
A first SIGINT, SIGTERM or SIGHUP (Ctrl-C, Slurm, Kubernetes, a closed terminal)
ends a folder run cleanly: the batch in progress is finished and scores.csv and
report.json are written; a second one ends it at once (a signal ignored at
start, as under nohup, stays ignored). A rerun does what is missing.";

/// The footer of `maximize`, which runs no folder.
const AFTER_MAXIMIZE: &str = "\
Exit status: 0 done, 1 the optimisation failed, 2 bad usage or a problem found
before the first step (flags, a SPEC that does not fit the model, an
unreadable model or sidecar, CUDA unavailable); nothing is written.";

/// tch-vis: explain what a TorchScript model sees in your images.
#[derive(Debug, Parser)]
#[command(name = "tch-vis", version, about = ABOUT, after_help = AFTER)]
pub struct Cli {
    /// What to compute.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Scores, input gradients and saliency maps (vanilla or SmoothGrad) for
    /// every image under DIR: REL.saliency.png, REL.saliency.npy
    /// [REL.grad.npy], scores.csv and report.json under OUT.
    #[command(after_help = AFTER, allow_negative_numbers = true)]
    Saliency(SaliencyArgs),
    /// Scores only (one forward pass, no gradients): scores.csv and
    /// report.json under OUT.
    #[command(after_help = AFTER, allow_negative_numbers = true)]
    Scores(CommonArgs),
    /// Class activation maps (Grad-CAM, Grad-CAM++, Layer-CAM, Score-CAM,
    /// Faster-Score-CAM) of models exported with forward_features and
    /// forward_head, or whose forward returns a dict with the feature maps
    /// under "features" (scripts/export_cam_model.py, --layer for the dict
    /// form; --freeze runs faster on CPUs): REL.cam.png, REL.cam.npy,
    /// scores.csv and report.json under OUT.
    #[command(after_help = AFTER, allow_negative_numbers = true)]
    Cam(CamArgs),
    /// Integrated Gradients: REL.ig.npy (C, H, W) attributions, REL.ig.png,
    /// scores.csv (with each image's convergence delta) and report.json.
    #[command(name = "integrated-gradients", after_help = AFTER, allow_negative_numbers = true)]
    IntegratedGradients(IgArgs),
    /// Activation maximization: for each sample, the model input that
    /// maximises the score (OUT/maximize_K.npy in the model's input space,
    /// OUT/maximize_K.png in image space, report.json with the score curve).
    #[command(after_help = AFTER_MAXIMIZE, allow_negative_numbers = true)]
    Maximize(MaximizeArgs),
}

/// Flags of `tch-vis cam`.
#[derive(Debug, Args)]
pub struct CamArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// gradcam | gradcam++ | layercam | scorecam | fasterscorecam (case,
    /// '-' and '_' ignored: grad-cam, Grad_CAM++ and gradcampp name them
    /// too).
    #[arg(long, value_name = "METHOD", value_parser = parse_from_str::<CamMethod>)]
    pub method: CamMethod,

    /// Score-CAM: masked inputs scored per model call (bounds memory).
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub cam_batch: u32,

    /// Faster-Score-CAM: channels kept (the N of largest spatial std).
    #[arg(long, value_name = "N", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_n: u32,

    /// tf-keras-vis's variants instead of pytorch-grad-cam's (Grad-CAM++
    /// alpha normalisation, Score-CAM softmax over classes, corner-aligned
    /// resize).
    #[arg(long)]
    pub tf_keras_vis: bool,

    #[command(flatten)]
    pub smooth: SmoothArgs,

    #[command(flatten)]
    pub overlay: OverlayArgs,
}

/// Flags of `tch-vis integrated-gradients`.
#[derive(Debug, Args)]
pub struct IgArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Steps along the path from the baseline to the input.
    #[arg(long, value_name = "N", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=100000))]
    pub steps: u32,

    /// Integration rule: gausslegendre, riemann_left, riemann_right,
    /// riemann_middle or riemann_trapezoid.
    #[arg(long, value_name = "RULE", default_value = "gausslegendre",
          value_parser = parse_from_str::<Rule>)]
    pub rule: Rule,

    /// Baseline: zero (the all-zero model input), black (black in image
    /// space: -mean/std of the sidecar), blur[:SIGMA] (a Gaussian blur of
    /// the input, SIGMA pixels, default 5), or a number (every model input
    /// value).
    #[arg(long, value_name = "B", default_value = "zero", value_parser = parse_baseline)]
    pub baseline: BaselineArg,

    /// Most rows per model call (path points of one image: images are
    /// integrated one at a time); bounds memory. Default: all the steps of
    /// an image in one call.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub internal_batch_size: Option<u32>,

    #[command(flatten)]
    pub smooth: SmoothArgs,

    #[command(flatten)]
    pub overlay: OverlayArgs,
}

/// `--baseline`, parsed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BaselineArg {
    Zero,
    Black,
    Blur(f64),
    Constant(f64),
}

/// Flags of `tch-vis maximize`.
#[derive(Debug, Args)]
pub struct MaximizeArgs {
    /// TorchScript model file M.pt, with its sidecar M.json.
    #[arg(long, value_name = "M.pt")]
    pub model: PathBuf,

    /// Output folder.
    #[arg(long, value_name = "OUT")]
    pub out: PathBuf,

    /// Score of one model output, repeatable, one per output in order;
    /// categorical:I,J,... makes one image per listed class; inactive for
    /// outputs not maximised.
    #[arg(long = "score", value_name = "SPEC", value_parser = parse_spec, required = true)]
    pub scores: Vec<ScoreSpec>,

    /// Gradient-ascent steps.
    #[arg(long, value_name = "N", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(1..=100000))]
    pub steps: u32,

    /// Seed of the random seed input (the same seed gives the same bytes
    /// on the CPU).
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,

    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, value_name = "DEVICE", default_value = "auto", value_parser = parse_device)]
    pub device: DeviceSpec,

    /// Weight of the total-variation regularizer (smoothness).
    #[arg(long, value_name = "W", default_value_t = 1.0, value_parser = parse_weight)]
    pub tv: f64,

    /// Weight of the L1-norm regularizer (small values).
    #[arg(long, value_name = "W", default_value_t = 0.3, value_parser = parse_weight)]
    pub norm: f64,

    /// Largest random rotation per step, in degrees (input modifier).
    #[arg(long, value_name = "DEG", default_value_t = 1.0, value_parser = parse_weight)]
    pub rotate: f64,

    /// Random jitter per step, in pixels (input modifier).
    #[arg(long, value_name = "PX", default_value_t = 4)]
    pub jitter: u32,

    /// RMSprop learning rate (on pixels in 0..255).
    #[arg(long, value_name = "F", default_value_t = 1.0, value_parser = parse_rate)]
    pub lr: f64,

    /// Optimise the image at H x W (or N x N) and upsample it bilinearly to
    /// the model's input size: coarser shapes, fewer high-frequency
    /// patterns (8 suits the 32 x 32 digits models).
    #[arg(long, value_name = "N|HxW", value_parser = parse_resolution)]
    pub resolution: Option<(usize, usize)>,

    /// Ascend log(score) instead of the score (for probability outputs,
    /// whose gradient vanishes as the softmax saturates; the maximiser is
    /// the same). The report's final scores are the scores themselves.
    #[arg(long)]
    pub log: bool,
}

/// Flags of both subcommands.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// TorchScript model file M.pt; its preprocessing is read from the
    /// sidecar M.json beside it ({"input_size": [H, W], "channels": 1|3,
    /// "mean": [...], "std": [...], "labels": [...]}).
    #[arg(long, value_name = "M.pt")]
    pub model: PathBuf,

    /// Folder of images, walked recursively in sorted order (relative path,
    /// byte order), or a single image file. Files that are not decodable
    /// images are recorded as failed in report.json and the run goes on.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "images_from",
        conflicts_with = "images_from"
    )]
    pub images: Option<PathBuf>,

    /// A file listing image paths, one per line ('-' for standard input,
    /// e.g. find ... | tch-vis saliency --images-from - ...). Outputs are
    /// named by the paths relative to --root; sorting, shards and reruns
    /// work as for a folder.
    #[arg(long, value_name = "FILE")]
    pub images_from: Option<PathBuf>,

    /// With --images-from: the folder output names are relative to
    /// (default: the deepest folder holding every listed file).
    #[arg(long, value_name = "DIR", requires = "images_from")]
    pub root: Option<PathBuf>,

    /// Output folder; outputs mirror each image's relative path REL.
    #[arg(long, value_name = "OUT")]
    pub out: PathBuf,

    /// Score of one model output, repeatable, one per output in order:
    /// categorical:I (class I of every image), binary:true|false|1|0,
    /// regression:increase, regression:decrease, regression:maintain=T,
    /// inactive (keeps an output connected, no gradient), predicted (each
    /// image's argmax class). Default for a single-output model: predicted.
    #[arg(long = "score", value_name = "SPEC", value_parser = parse_spec)]
    pub scores: Vec<ScoreSpec>,

    /// Device: auto (CUDA if available, else CPU), cpu, cuda or cuda:N.
    #[arg(long, value_name = "DEVICE", default_value = "auto", value_parser = parse_device)]
    pub device: DeviceSpec,

    /// Compute precision: fp32, or fp16 / bf16 (model weights and inputs
    /// in half precision, for CUDA; scores and maps agree with fp32 less
    /// well where a softmax saturates). On CUDA, fp32 is IEEE float32:
    /// tch-vis sets NVIDIA_TF32_OVERRIDE=0 unless it is already set (set it
    /// to 1 to let cuDNN use TF32 as PyTorch does by default).
    #[arg(long, value_name = "P", default_value = "fp32", value_parser = parse_precision)]
    pub precision: Precision,

    /// Images per model batch (integrated-gradients: images decoded and
    /// written together, each integrated on its own, see
    /// --internal-batch-size). At most the number of files found: a
    /// smaller input is one batch of its own size.
    #[arg(long, value_name = "N", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub batch_size: u32,

    /// Process only the files whose index in the sorted list of ALL files
    /// found (decodable or not) is K modulo N, K from 0. Without it, taken
    /// from SLURM_ARRAY_TASK_ID (minus SLURM_ARRAY_TASK_MIN) and
    /// SLURM_ARRAY_TASK_COUNT, or from JOB_COMPLETION_INDEX (Kubernetes
    /// Indexed Job) with --shard-count, when set.
    #[arg(long, value_name = "K/N", value_parser = parse_shard)]
    pub shard: Option<Shard>,

    /// Number of shards N when the shard index comes from the environment
    /// (JOB_COMPLETION_INDEX; overrides SLURM_ARRAY_TASK_COUNT).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub shard_count: Option<u32>,

    /// Recompute every image, even those whose outputs exist.
    #[arg(long)]
    pub overwrite: bool,

    /// Exit with status 1 if any input failed (the run still finishes).
    #[arg(long)]
    pub strict: bool,

    /// Decode JPEGs at 1/2, 1/4 or 1/8 of their size in the DCT domain, as
    /// PIL's draft mode does for the size the resize makes (the same scale
    /// and pixels): about twice as fast on large photos, with inputs close
    /// to, not equal to, torchvision's. Not with --overlay original.
    #[arg(long)]
    pub jpeg_draft: bool,

    /// Decode JPEGs with zune-jpeg instead of libjpeg-turbo's decoder:
    /// faster where libjpeg-turbo was built without its SIMD code, but its
    /// chroma upsampling rounds otherwise, so pixels of 4:2:0 and 4:2:2
    /// JPEGs differ from PIL's and torchvision's (0.2-0.4 uint8 steps on
    /// average, up to 4), and a truncated JPEG decodes instead of failing.
    /// By default JPEGs decode bit for bit as in PIL and torchvision
    #[arg(long)]
    pub fast_jpeg: bool,

    /// Hand the model channels-last (NHWC) batches: on a CPU, convolutions
    /// run 10-20% faster, but they sum in another order, so results are
    /// PyTorch's for a channels-last input rather than for the contiguous
    /// tensor a PyTorch pipeline makes (saliency maps ~1e-4 apart on a
    /// resnet18, Integrated Gradients up to 4e-3 of the largest value;
    /// scores move by float rounding). Default: contiguous
    #[arg(long)]
    pub channels_last: bool,
}

/// Flags of `tch-vis saliency`.
#[derive(Debug, Args)]
pub struct SaliencyArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    #[command(flatten)]
    pub smooth: SmoothArgs,

    /// Also write REL.grad.npy: the signed input gradient (C, H, W), float32,
    /// averaged over the SmoothGrad samples.
    #[arg(long)]
    pub save_npy: bool,

    #[command(flatten)]
    pub overlay: OverlayArgs,
}

/// SmoothGrad's noise, for saliency, the CAMs and Integrated Gradients.
#[derive(Debug, Args)]
pub struct SmoothArgs {
    /// SmoothGrad samples per image (0: none). For each sample, Gaussian
    /// noise with sigma = F x (max - min) of the image's input is added;
    /// saliency averages |gradient| over the samples, cam and
    /// integrated-gradients average their maps and attributions (each
    /// sample scored on the clean image's class)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub smooth_samples: u32,

    /// SmoothGrad noise level F (sigma = F x (max - min) of each input);
    /// needs --smooth-samples.
    #[arg(long, value_name = "F", default_value_t = 0.2, value_parser = parse_noise,
          requires = "smooth_samples")]
    pub smooth_noise: f64,

    /// Seed of the SmoothGrad noise. An image's noise depends only on the
    /// seed and its relative path, so batches, shards and reruns agree.
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
}

impl SmoothArgs {
    fn settings(&self) -> Smooth {
        Smooth {
            samples: self.smooth_samples as usize,
            noise: self.smooth_noise,
            seed: self.seed,
        }
    }
}

/// Where heatmap PNGs are drawn.
#[derive(Debug, Args)]
pub struct OverlayArgs {
    /// What REL.*.png heatmaps are drawn over: input (the image as the
    /// model saw it, at the model's input size; fast and small) or original
    /// (the original image at its own resolution, the map upsampled onto
    /// the part the model saw).
    #[arg(long, value_name = "WHERE", default_value = "input", value_parser = ["input", "original"])]
    pub overlay: String,

    /// How REL.*.png heatmaps are compressed: fast (Up filter and a fixed
    /// Huffman code: 66-126 KB per 224 x 224 overlay of a photo, 26-29 KB
    /// of a smooth picture, ~0.1 ms each) or none (stored, ~151 KB: on 2
    /// cores a trivial-model saliency run took 1.7% less CPU). The pixels
    /// are the same
    #[arg(long, value_name = "HOW", default_value = "fast", value_parser = parse_from_str::<PngCompression>)]
    pub png_compression: PngCompression,
}

impl OverlayArgs {
    fn settings(&self) -> (bool, PngCompression) {
        (self.overlay == "original", self.png_compression)
    }
}

fn parse_from_str<T: std::str::FromStr>(s: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    s.parse::<T>().map_err(|e| e.to_string())
}

fn parse_weight(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a finite number >= 0")),
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a finite number > 0")),
    }
}

fn parse_resolution(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("{s:?} is not N or HxW with sizes >= 2");
    let (h, w) = match s.trim().split_once(['x', 'X']) {
        Some((h, w)) => (h.trim().parse::<usize>(), w.trim().parse::<usize>()),
        None => (s.trim().parse::<usize>(), s.trim().parse::<usize>()),
    };
    match (h, w) {
        (Ok(h), Ok(w)) if h >= 2 && w >= 2 => Ok((h, w)),
        _ => Err(bad()),
    }
}

fn parse_baseline(s: &str) -> Result<BaselineArg, String> {
    let t = s.trim().to_ascii_lowercase();
    let bad = || format!("{s:?} is not zero, black, blur[:SIGMA] or a number");
    match t.as_str() {
        "zero" => Ok(BaselineArg::Zero),
        "black" => Ok(BaselineArg::Black),
        "blur" => Ok(BaselineArg::Blur(5.0)),
        _ => {
            if let Some(sigma) = t.strip_prefix("blur:") {
                match sigma.parse::<f64>() {
                    Ok(v) if v.is_finite() && v > 0.0 => Ok(BaselineArg::Blur(v)),
                    _ => Err(bad()),
                }
            } else {
                match t.parse::<f64>() {
                    Ok(v) if v.is_finite() => Ok(BaselineArg::Constant(v)),
                    _ => Err(bad()),
                }
            }
        }
    }
}

fn parse_spec(s: &str) -> Result<ScoreSpec, String> {
    s.parse::<ScoreSpec>().map_err(|e| e.to_string())
}

fn parse_precision(s: &str) -> Result<Precision, String> {
    s.parse::<Precision>().map_err(|e| e.to_string())
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    s.parse::<DeviceSpec>().map_err(|e| e.to_string())
}

fn parse_shard(s: &str) -> Result<Shard, String> {
    s.parse::<Shard>().map_err(|e| e.to_string())
}

fn parse_noise(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 0.0 => Ok(f),
        _ => Err(format!("{s:?} is not a finite number >= 0")),
    }
}

/// Where the shard came from, for the report.
fn shard_from_env(
    flag: Option<Shard>,
    count: Option<u32>,
    var: &dyn Fn(&str) -> Option<String>,
) -> Result<(Shard, String), String> {
    if let Some(s) = flag {
        return Ok((s, "--shard".into()));
    }
    let num = |name: &str| -> Result<Option<usize>, String> {
        match var(name) {
            None => Ok(None),
            Some(v) if v.trim().is_empty() => Ok(None),
            Some(v) => v
                .trim()
                .parse::<usize>()
                .map(Some)
                .map_err(|_| format!("{name}={v:?} is not a non-negative integer")),
        }
    };
    let count = count.map(|c| c as usize);
    if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
        let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let n = match count.or(num("SLURM_ARRAY_TASK_COUNT")?) {
            Some(n) => n,
            None => {
                return Err(
                    "SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; pass --shard-count N or --shard K/N".into(),
                )
            }
        };
        let k = id.checked_sub(min).ok_or_else(|| {
            format!("SLURM_ARRAY_TASK_ID={id} is below SLURM_ARRAY_TASK_MIN={min}")
        })?;
        let s = Shard::new(k, n).map_err(|e| format!("shard from Slurm: {e}"))?;
        return Ok((s, "slurm".into()));
    }
    if let Some(k) = num("JOB_COMPLETION_INDEX")? {
        let Some(n) = count else {
            return Err(
                "JOB_COMPLETION_INDEX is set: pass --shard-count N (the Indexed Job's completions) or --shard K/N".into(),
            );
        };
        let s = Shard::new(k, n).map_err(|e| format!("shard from JOB_COMPLETION_INDEX: {e}"))?;
        return Ok((s, "kubernetes".into()));
    }
    if let Some(n) = count {
        return Err(format!(
            "--shard-count {n} needs a shard index from SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX"
        ));
    }
    Ok((Shard::all(), "none".into()))
}

/// What the command line asks for.
pub enum Request {
    /// A batch job over a folder.
    Batch(Job),
    /// Activation maximization.
    Maximize(MaximizeArgs),
}

impl Cli {
    /// Validates the flags into a request.
    pub fn into_request(self) -> Result<Request, String> {
        let (mode, common, (overlay, png_compression)) = match self.command {
            Command::Saliency(a) => (
                Mode::Saliency {
                    smooth: a.smooth.settings(),
                    save_npy: a.save_npy,
                },
                a.common,
                a.overlay.settings(),
            ),
            Command::Scores(c) => (Mode::Scores, c, (false, PngCompression::Fast)),
            Command::Cam(a) => (
                Mode::Cam {
                    method: a.method,
                    cam_batch: a.cam_batch as usize,
                    max_n: a.max_n as usize,
                    tf_keras_vis: a.tf_keras_vis,
                    smooth: a.smooth.settings(),
                },
                a.common,
                a.overlay.settings(),
            ),
            Command::IntegratedGradients(a) => (
                Mode::Ig {
                    steps: a.steps as usize,
                    rule: a.rule,
                    baseline: a.baseline,
                    internal_batch_size: a.internal_batch_size.map(|n| n as usize),
                    smooth: a.smooth.settings(),
                },
                a.common,
                a.overlay.settings(),
            ),
            Command::Maximize(a) => return Ok(Request::Maximize(a)),
        };
        for spec in &common.scores {
            if let ScoreSpec::Categorical(v) = spec {
                if v.len() != 1 {
                    return Err(format!(
                        "invalid score \"{spec}\": the command line applies one class to every image (categorical:I)"
                    ));
                }
            }
        }
        if common.jpeg_draft && overlay {
            return Err(
                "--jpeg-draft decodes JPEGs smaller than they are, and --overlay original draws on them at full size: use one or the other".into(),
            );
        }
        if common.root.is_some() && common.images_from.is_none() {
            return Err(
                "--root names the folder of an --images-from list; it needs --images-from".into(),
            );
        }
        let (shard, shard_source) = shard_from_env(common.shard, common.shard_count, &|name| {
            std::env::var(name).ok()
        })?;
        Ok(Request::Batch(Job {
            mode,
            model: common.model,
            images: match (common.images, common.images_from) {
                (_, Some(list)) => Images::List {
                    list,
                    root: common.root,
                },
                (Some(path), None) => Images::Path(path),
                (None, None) => return Err("--images DIR or --images-from FILE is required".into()),
            },
            out: common.out,
            specs: common.scores,
            device: common.device,
            precision: common.precision,
            batch_size: common.batch_size as usize,
            shard,
            shard_source,
            overwrite: common.overwrite,
            strict: common.strict,
            overlay_original: overlay,
            png_compression,
            jpeg_draft: common.jpeg_draft,
            fast_jpeg: common.fast_jpeg,
            channels_last: common.channels_last,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    #[test]
    fn shard_comes_from_flag_then_slurm_then_kubernetes() {
        let flag = Some(Shard::new(1, 2).unwrap());
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert_eq!(
            shard_from_env(flag, None, &slurm).unwrap().0,
            Shard::new(1, 2).unwrap()
        );
        assert_eq!(
            shard_from_env(None, None, &slurm).unwrap().0,
            Shard::new(3, 4).unwrap()
        );
        let slurm1 = env(&[
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert_eq!(
            shard_from_env(None, None, &slurm1).unwrap().0,
            Shard::new(3, 4).unwrap()
        );
        let k8s = env(&[("JOB_COMPLETION_INDEX", "2")]);
        assert_eq!(
            shard_from_env(None, Some(3), &k8s).unwrap().0,
            Shard::new(2, 3).unwrap()
        );
        assert!(shard_from_env(None, None, &k8s).is_err());
        assert!(shard_from_env(None, Some(2), &k8s).is_err()); // 2 of 2
        assert!(shard_from_env(None, Some(2), &env(&[])).is_err());
        assert_eq!(
            shard_from_env(None, None, &env(&[])).unwrap().0,
            Shard::all()
        );
    }
}
