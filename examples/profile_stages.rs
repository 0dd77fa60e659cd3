//! Profile of the per-image stages around the model, on one core: read,
//! decode, resize (to a `(C, H, W)` float image at the input size),
//! normalise, colour map (heatmap blended over the image), PNG encode and
//! npy encode; then PNG compression settings (time and size), and the cost
//! of an overlay on the original image at 1024 × 768.
//!
//! ```text
//! python scripts/make_bench_data.py --out bench-data --n-images 200 --n-digits 0 --no-resnet18
//! cargo run --release --example profile_stages -- --images bench-data/images
//! cargo run --release --example profile_stages -- --images bench-data/images --recipe torchvision
//! ```
//!
//! `--recipe plain` stretches every image to 224 × 224 (a sidecar without
//! `resize`), `torchvision` does `Resize(256)` + `CenterCrop(224)` with
//! antialiasing. The map drawn is the image's first channel, so the colour
//! and PNG stages see photo-like content.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use image::codecs::png::{CompressionType, FilterType};
use tch::Tensor;
use tch_vis::heatmap::{self, Colormap};
use tch_vis::preprocess::{to_planes, InputImage, Preprocessor, Sidecar};

#[derive(Clone, Copy, ValueEnum)]
enum Recipe {
    Plain,
    Torchvision,
}

#[derive(Parser)]
struct Args {
    /// Folder of images (searched recursively).
    #[arg(long)]
    images: PathBuf,
    /// Sidecar recipe.
    #[arg(long, value_enum, default_value = "plain")]
    recipe: Recipe,
    /// Passes over the folder (the first warms the caches and is not timed).
    #[arg(long, default_value_t = 3)]
    passes: usize,
    /// Skip the PNG compression sweep.
    #[arg(long)]
    no_png_sweep: bool,
    /// Decode JPEGs at a DCT scale (`Preprocessor::jpeg_draft`).
    #[arg(long)]
    jpeg_draft: bool,
    /// Decode JPEGs with zune-jpeg (`Preprocessor::fast_jpeg`).
    #[arg(long)]
    fast_jpeg: bool,
}

const STAGES: [&str; 8] = [
    "read",
    "decode",
    "resize",
    "(resize via to_planes + prepare_planes, the previous path)",
    "normalise",
    "colour map",
    "PNG encode",
    "npy encode",
];

fn files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let p = e?.path();
        if p.is_dir() {
            files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

fn sidecar(recipe: Recipe) -> Result<Sidecar> {
    let extra = match recipe {
        Recipe::Plain => "",
        Recipe::Torchvision => r#", "resize": 256, "crop": [224, 224]"#,
    };
    Ok(Sidecar::from_json(
        &format!(
            r#"{{"input_size": [224, 224], "channels": 3, "mean": [0.485, 0.456, 0.406],
                "std": [0.229, 0.224, 0.225]{extra}}}"#
        ),
        "profile.json",
    )?)
}

/// This thread's CPU time (Linux: `/proc/thread-self/schedstat`), so that
/// other processes on a shared machine do not inflate the figures; wall time
/// elsewhere.
#[derive(Clone, Copy)]
struct Instant(std::time::Instant, Option<u64>);

impl Instant {
    fn now() -> Self {
        let cpu = std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok());
        Instant(std::time::Instant::now(), cpu)
    }
    fn elapsed(&self) -> Duration {
        Instant::now() - *self
    }
}

impl std::ops::Sub for Instant {
    type Output = Duration;
    fn sub(self, earlier: Instant) -> Duration {
        match (self.1, earlier.1) {
            (Some(a), Some(b)) => Duration::from_nanos(a.saturating_sub(b)),
            _ => self.0 - earlier.0,
        }
    }
}

fn ms(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e3 / n.max(1) as f64
}

fn main() -> Result<()> {
    let args = Args::parse();
    tch::set_num_threads(1);
    let mut paths = Vec::new();
    files(&args.images, &mut paths)?;
    paths.sort();
    let pre = Preprocessor::new(sidecar(args.recipe)?)
        .jpeg_draft(args.jpeg_draft)
        .fast_jpeg(args.fast_jpeg);
    let npy_dir = tempfile_dir()?;
    let npy_path = npy_dir.join("map.npy");
    let mut totals = [Duration::ZERO; STAGES.len()];
    let mut n = 0;
    let mut overlays = Vec::new();
    let mut rgb = Vec::new();
    for pass in 0..args.passes.max(2) {
        let timed = pass > 0;
        for path in &paths {
            let mut t = [Duration::ZERO; STAGES.len()];
            let mut previous = Duration::ZERO;
            let mut clock = Instant::now();
            let mut lap = |i: usize, clock: &mut Instant| {
                let now = Instant::now();
                t[i] += now - *clock;
                *clock = now;
            };
            let bytes = std::fs::read(path)?;
            lap(0, &mut clock);
            let img = pre.decode(&bytes, path)?;
            lap(1, &mut clock);
            let (image, _) = if matches!(args.recipe, Recipe::Plain) {
                // The previous path, for comparison (not in the total).
                let old = img.clone();
                let restart = Instant::now();
                let (w, h) = (old.width(), old.height());
                std::hint::black_box(pre.prepare_planes(to_planes(&old, 3), (w, h))?);
                previous += Instant::now() - restart;
                clock = Instant::now();
                pre.resize_image(img, path)?
            } else {
                pre.resize_image(img, path)?
            };
            lap(2, &mut clock);
            let _ = std::hint::black_box(pre.normalise_image(&image)?);
            lap(4, &mut clock);
            // The map: the image's first channel (not timed).
            let planes = Vec::<f32>::try_from(&image.to_planes()?.reshape([-1]))?;
            let map = &planes[..224 * 224];
            clock = Instant::now();
            match &image {
                InputImage::Bytes(crop) => {
                    let bytes = Vec::<u8>::try_from(&crop.reshape([-1]))?;
                    heatmap::overlay_bytes_into(
                        &bytes,
                        3,
                        224,
                        224,
                        map,
                        Colormap::Jet,
                        0.5,
                        &mut rgb,
                    )?
                }
                InputImage::Planes(_) => {
                    heatmap::overlay_into(&planes, 3, 224, 224, map, Colormap::Jet, 0.5, &mut rgb)?
                }
            }
            lap(5, &mut clock);
            let png = heatmap::encode_png(&rgb, 224, 224)?;
            lap(6, &mut clock);
            Tensor::from_slice(map)
                .view([224, 224])
                .write_npy(&npy_path)?;
            lap(7, &mut clock);
            std::hint::black_box(png);
            t[3] = previous;
            if timed {
                for (a, b) in totals.iter_mut().zip(t) {
                    *a += b;
                }
                n += 1;
            } else {
                overlays.push(rgb.clone());
            }
        }
    }
    let total: Duration = totals.iter().sum::<Duration>() - totals[3];
    println!(
        "{} images ({}), recipe {}, 1 thread, CPU ms per image:",
        paths.len(),
        args.images.display(),
        match args.recipe {
            Recipe::Plain => "plain (stretch to 224x224)",
            Recipe::Torchvision => "torchvision (Resize 256, CenterCrop 224)",
        },
    );
    for (name, d) in STAGES.iter().zip(totals) {
        if !d.is_zero() {
            println!("  {name:<12} {:>7.3}", ms(d, n));
        }
    }
    println!(
        "  {:<12} {:>7.3}  ({:.0} images/s per core)",
        "total",
        ms(total, n),
        n as f64 / total.as_secs_f64()
    );

    if !args.no_png_sweep {
        println!("PNG settings on {} 224x224 overlays:", overlays.len());
        let settings: [(&str, CompressionType, FilterType); 10] = [
            ("fast+adaptive", CompressionType::Fast, FilterType::Adaptive),
            ("fast+sub", CompressionType::Fast, FilterType::Sub),
            ("fast+paeth", CompressionType::Fast, FilterType::Paeth),
            ("fast+up", CompressionType::Fast, FilterType::Up),
            ("fast+avg", CompressionType::Fast, FilterType::Avg),
            ("fast+none", CompressionType::Fast, FilterType::NoFilter),
            (
                "level1+adaptive",
                CompressionType::Level(1),
                FilterType::Adaptive,
            ),
            (
                "default+adaptive",
                CompressionType::Default,
                FilterType::Adaptive,
            ),
            (
                "level6+adaptive",
                CompressionType::Level(6),
                FilterType::Adaptive,
            ),
            (
                "uncompressed",
                CompressionType::Uncompressed,
                FilterType::NoFilter,
            ),
        ];
        for (name, c, f) in settings {
            let t = Instant::now();
            let mut bytes = 0;
            for rgb in &overlays {
                bytes += heatmap::encode_png_with(rgb, 224, 224, c, f)?.len();
            }
            println!(
                "  {name:<18} {:>7.3} ms  {:>6.1} KB",
                ms(t.elapsed(), overlays.len()),
                bytes as f64 / 1e3 / overlays.len() as f64
            );
        }
    }

    // An overlay on the original at 1024 x 768 (a map at 224 x 224).
    let first = paths
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "jpg"))
        .context("no JPEG")?;
    let big = pre
        .decode(&std::fs::read(first)?, first)?
        .resize_exact(1024, 768, image::imageops::FilterType::Triangle)
        .into_rgb8();
    let map: Vec<f32> = (0..224 * 224).map(|i| (i % 224) as f32 / 223.0).collect();
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(heatmap::overlay_original(
            &big,
            &map,
            224,
            224,
            heatmap::MapRegion::whole(1024, 768),
            Colormap::Jet,
            0.5,
        )?);
    }
    let blend = ms(t.elapsed(), reps);
    let t = Instant::now();
    let mut size = 0;
    for _ in 0..reps {
        size = heatmap::overlay_original_png(&big, &map, 224, 224)?.len();
    }
    println!(
        "overlay on the original 1024x768: upsample+blend {blend:.2} ms, with PNG encode {:.2} ms ({:.0} KB)",
        ms(t.elapsed(), reps),
        size as f64 / 1e3
    );
    let _ = std::fs::remove_dir_all(npy_dir);
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("profile_stages_{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
