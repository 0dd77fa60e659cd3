//! The Rust side of `scripts/bench_cam.sh`: class activation maps over a list
//! of image files with the library's batch engine (decode pool, padded
//! batches, compute, writer threads), writing one heatmap PNG per image
//! (jet at alpha 0.5 over the resized and cropped input), as a folder job
//! does. Prints one line:
//!
//! ```text
//! rust-cam METHOD: N images in S s: X images/s (prepare P s)
//! ```
//!
//! `S` is the time of the run itself; `P`, the checks before it (loading
//! the model's methods and one probe batch), is reported apart.
//!
//! ```text
//! cargo run --release --example bench_cam -- --model bench-data/resnet18_cam.pt \
//!     --images bench-data/cam-images --list files.txt --method gradcam --out /tmp/cams
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tch::Device;
use tch_vis::batch::{CamMapMethod, Engine, ImageResult, Sink};
use tch_vis::cam::CamMethod;
use tch_vis::io::Entry;
use tch_vis::preprocess::Sidecar;
use tch_vis::scores::PredictedScore;
use tch_vis::{heatmap, Error, Model};

/// Runs one CAM method over image files and reports images per second.
#[derive(Parser)]
struct Args {
    /// A model with forward_features / forward_head, its sidecar beside it.
    #[arg(long)]
    model: PathBuf,
    /// The folder the listed paths are relative to.
    #[arg(long)]
    images: PathBuf,
    /// A text file with one relative image path a line.
    #[arg(long)]
    list: PathBuf,
    /// gradcam, gradcam++, layercam, scorecam or fasterscorecam.
    #[arg(long)]
    method: CamMethod,
    /// Where the heatmap PNGs go (`REL.png`).
    #[arg(long)]
    out: PathBuf,
    /// Images per model batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Masked inputs per Score-CAM forward pass.
    #[arg(long, default_value_t = 64)]
    score_cam_batch: usize,
    /// Channels Faster-Score-CAM keeps.
    #[arg(long, default_value_t = 10)]
    max_n: usize,
    /// Hand the model channels-last (NHWC) batches
    /// (`Engine::channels_last`), not the engine's contiguous default.
    #[arg(long)]
    channels_last: bool,
}

/// Writes `OUT/REL.png`: the heatmap over the image as the model saw it.
struct PngSink {
    out: PathBuf,
    channels: usize,
    size: [usize; 2],
}

impl Sink for PngSink {
    fn image(&self, r: ImageResult) -> tch_vis::Result<()> {
        let heat = r
            .arrays
            .first()
            .and_then(|a| a.heat.as_ref())
            .ok_or(Error::Empty { what: "CAM map" })?;
        let map = Vec::<f32>::try_from(&heat.f_contiguous()?.f_reshape([-1])?)?;
        let image = Vec::<f32>::try_from(&r.image.to_planes()?.f_reshape([-1])?)?;
        let [h, w] = self.size;
        let png = heatmap::overlay_png(&image, self.channels, w, h, &map)?;
        let path = self.out.join(format!("{}.png", r.rel));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::write(&path, png).map_err(|e| Error::io(&path, e))
    }

    fn failed(&self, rel: &str, error: &str) -> tch_vis::Result<()> {
        eprintln!("bench_cam: {rel}: {error}");
        Ok(())
    }
}

fn entries(images: &Path, list: &Path) -> Result<Vec<Entry>> {
    let text =
        std::fs::read_to_string(list).with_context(|| format!("reading {}", list.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|rel| Entry {
            rel: rel.to_string(),
            path: images.join(rel),
            problem: None,
        })
        .collect())
}

fn main() -> Result<()> {
    // As the tch-vis binary: its allocator settings,
    tch_vis::batch::tune_malloc();
    let args = Args::parse();
    let inputs = entries(&args.images, &args.list)?;
    if inputs.is_empty() {
        bail!("{} lists no images", args.list.display());
    }
    let t = Instant::now();
    let model = Model::load(&args.model, Device::Cpu)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let sidecar = Sidecar::for_model(&args.model)?;
    // and, as it does, libtorch's OpenMP team sleeping at its barriers
    // for a light model only (a heavy one runs faster with it spinning).
    if tch_vis::batch::passive_openmp_pays(&model, &sidecar)? {
        let _failed = tch_vis::batch::restart_with_passive_openmp(false);
    }
    let [h, w] = sidecar.size_i64();
    let probe = tch::Tensor::zeros(
        [1, sidecar.channels as i64, h, w],
        (tch::Kind::Float, Device::Cpu),
    );
    // Either form of the CAM convention (methods or a dict from forward).
    model.cam_form(&probe)?;
    let job = CamMapMethod::from_scores(args.method, vec![Box::new(PredictedScore::new())])
        .score_cam_batch(args.score_cam_batch)
        .max_n(args.max_n);
    let sink = PngSink {
        out: args.out.clone(),
        channels: sidecar.channels,
        size: sidecar.input_size,
    };
    let engine = Engine::new(&model, sidecar, &job)
        .batch_size(args.batch_size)
        .channels_last(args.channels_last);
    engine.prepare()?;
    let prepare = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let summary = engine.run(&inputs, &sink)?;
    let secs = t.elapsed().as_secs_f64();
    if let Some(e) = summary.fatal {
        return Err(e.into());
    }
    if !summary.failed.is_empty() {
        bail!("{} of {} images failed", summary.failed.len(), inputs.len());
    }
    println!(
        "rust-cam {}: {} images in {secs:.2} s: {:.3} images/s (prepare {prepare:.2} s)",
        args.method,
        summary.processed,
        summary.processed as f64 / secs
    );
    let t = &summary.timings;
    eprintln!(
        "timings: decode {:.2} s, wait decode {:.2} s, compute {:.2} s (method {:.2} s), wait write {:.2} s, write {:.2} s",
        t.decode, t.compute_wait_decode, t.compute, t.compute_method, t.compute_wait_write, t.write_all_threads
    );
    Ok(())
}
