//! Draw the README's CAM figure (`docs/cams.png`, written to `out/cams.png`
//! unless `--out` says otherwise): for a few bundled digits,
//! the input, then vanilla saliency, Grad-CAM, Grad-CAM++, Layer-CAM and
//! Score-CAM of the predicted class, side by side (one image per row).
//!
//! Every map is the library's own output at the model's input size (32 × 32),
//! blended over the input with the heatmap module's jet overlay at alpha 0.5,
//! then enlarged with nearest-neighbour so its pixels stay visible.
//!
//! ```text
//! cargo run --release --example cam_figure
//! cargo run --release --example cam_figure -- --out docs/cams.png
//! cargo run --release --example cam_figure -- --out /tmp/cams.png --scale 4
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tch::{Device, Kind, Tensor};
use tch_vis::cam::{Cam, CamMethod};
use tch_vis::heatmap::{self, Colormap};
use tch_vis::preprocess::{self, Preprocessor, Sidecar};
use tch_vis::saliency::Saliency;
use tch_vis::scores::{PredictedScore, Score};
use tch_vis::Model;

/// The images of the figure, relative to `--images`.
const IMAGES: [&str; 6] = [
    "gray/0/heldout_0036.png",
    "gray/2/heldout_0057.png",
    "gray/3/heldout_0023.png",
    "gray/4/heldout_0041.png",
    "gray/7/heldout_0043.png",
    "gray/9/heldout_0069.png",
];

/// The CAM columns, after the input and saliency columns.
const CAMS: [CamMethod; 4] = [
    CamMethod::GradCam,
    CamMethod::GradCamPlusPlus,
    CamMethod::LayerCam,
    CamMethod::ScoreCam,
];

/// Writes a grid of saliency and CAM overlays for bundled digits.
#[derive(Parser)]
struct Args {
    /// A model that follows the CAM convention (forward_features /
    /// forward_head), with its sidecar beside it.
    #[arg(long, default_value = "models/digits_cnn.pt")]
    model: PathBuf,
    /// The folder the image paths are relative to.
    #[arg(long, default_value = "examples/images")]
    images: PathBuf,
    /// Where to write the PNG (the README's figure: docs/cams.png).
    #[arg(long, default_value = "out/cams.png")]
    out: PathBuf,
    /// Nearest-neighbour enlargement of each tile.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=32))]
    scale: u32,
    /// White pixels between tiles.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=64))]
    gap: u32,
}

/// A tile: interleaved 8-bit RGB, `size × size`.
type Tile = Vec<u8>;

fn main() -> Result<()> {
    let args = Args::parse();
    let model = Model::load(&args.model, Device::Cpu)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let pre = Preprocessor::new(Sidecar::for_model(&args.model)?);
    let [h, w] = pre.sidecar().input_size;
    if h != w {
        bail!("the figure wants square inputs, the sidecar says {h} x {w}");
    }
    let channels = pre.sidecar().channels;
    // Either form of the CAM convention (methods or a dict from forward).
    let probe = Tensor::zeros(
        [1, channels as i64, h as i64, w as i64],
        (Kind::Float, Device::Cpu),
    );
    model.cam_form(&probe)?;

    let mut inputs = Vec::new();
    let mut pictures = Vec::new();
    for rel in IMAGES {
        let p = pre.load(args.images.join(rel))?;
        pictures.push(planes(&p.image.to_planes()?)?);
        inputs.push(p.input);
    }
    let x = preprocess::stack(&inputs.iter().collect::<Vec<_>>())?;
    let score = PredictedScore::new();
    let scores = [&score as &dyn Score];

    // Columns of maps, each `(N, H, W)` in [0, 1].
    let saliency = Saliency::new(&model).compute(&[x.shallow_clone()], &scores)?;
    if let Some(Some(classes)) = saliency.classes.first() {
        println!("predicted classes: {classes:?}");
    }
    let mut columns = vec![saliency.maps[0].shallow_clone()];
    for method in CAMS {
        columns.push(Cam::new(&model, method).compute(&x, &scores)?.maps);
    }

    // How much of each map lies on the strokes: its mass on the pixels
    // brighter than 0.5 (a third of a digit image), as a share of its total.
    let names = ["saliency"]
        .into_iter()
        .chain(CAMS.map(CamMethod::name))
        .collect::<Vec<_>>();
    let mut rows: Vec<Vec<Tile>> = Vec::new();
    let mut shares = vec![Vec::new(); columns.len()];
    for (n, picture) in pictures.iter().enumerate() {
        let mut row = vec![gray_or_rgb(picture, channels)];
        for (c, maps) in columns.iter().enumerate() {
            let map = planes(&maps.f_get(n as i64)?)?;
            shares[c].push(stroke_share(picture, channels, &map));
            row.push(heatmap::overlay(
                picture,
                channels,
                w,
                h,
                &map,
                Colormap::Jet,
                0.5,
            )?);
        }
        rows.push(row);
    }
    let strokes: f32 = pictures
        .iter()
        .map(|p| stroke_share(p, channels, &vec![1.0; p.len() / channels]))
        .sum::<f32>()
        / pictures.len() as f32;
    println!("map mass on the strokes (a uniform map: {strokes:.2}):");
    for (name, s) in names.iter().zip(&shares) {
        let each: Vec<String> = s.iter().map(|v| format!("{v:.2}")).collect();
        let mean = s.iter().sum::<f32>() / s.len() as f32;
        println!(
            "  {name:<10} mean {mean:.2}  per image [{}]",
            each.join(", ")
        );
    }
    let (rgb, width, height) = compose(&rows, w, args.scale as usize, args.gap as usize);
    let png = heatmap::encode_png(&rgb, u32::try_from(width)?, u32::try_from(height)?)?;
    write(&args.out, &png)?;
    println!(
        "{}: {} x {} pixels, {} bytes; columns: input, saliency, {}",
        args.out.display(),
        width,
        height,
        png.len(),
        CAMS.map(CamMethod::name).join(", ")
    );
    Ok(())
}

/// A tensor's values, in order, as `f32`.
fn planes(t: &Tensor) -> Result<Vec<f32>> {
    Ok(Vec::<f32>::try_from(&t.f_reshape([-1])?)?)
}

/// The share of `map`'s mass on the pixels of `picture` (planar, `channels`
/// planes) whose mean over channels is above 0.5.
fn stroke_share(picture: &[f32], channels: usize, map: &[f32]) -> f32 {
    let n = map.len();
    let (mut on, mut all) = (0.0f32, 0.0f32);
    for (i, &m) in map.iter().enumerate() {
        let v: f32 = (0..channels).map(|k| picture[k * n + i]).sum::<f32>() / channels as f32;
        if v > 0.5 {
            on += m;
        }
        all += m;
    }
    if all > 0.0 {
        on / all
    } else {
        0.0
    }
}

/// The input itself as a tile: gray repeated to RGB, or planar RGB
/// interleaved.
fn gray_or_rgb(picture: &[f32], channels: usize) -> Tile {
    let n = picture.len() / channels.max(1);
    let to_u8 = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    (0..n)
        .flat_map(|i| {
            let c = |k: usize| to_u8(picture[if channels == 3 { k * n + i } else { i }]);
            [c(0), c(1), c(2)]
        })
        .collect()
}

/// Lays `rows` of `size × size` tiles on a white canvas, each enlarged
/// `scale` times, `gap` pixels apart and around. Returns RGB, width, height.
fn compose(rows: &[Vec<Tile>], size: usize, scale: usize, gap: usize) -> (Vec<u8>, usize, usize) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let cell = size * scale;
    let width = cols * cell + (cols + 1) * gap;
    let height = rows.len() * cell + (rows.len() + 1) * gap;
    let mut rgb = vec![255u8; width * height * 3];
    for (r, row) in rows.iter().enumerate() {
        for (c, tile) in row.iter().enumerate() {
            let (x0, y0) = (gap + c * (cell + gap), gap + r * (cell + gap));
            for y in 0..cell {
                for x in 0..cell {
                    let src = 3 * ((y / scale) * size + x / scale);
                    let dst = 3 * ((y0 + y) * width + x0 + x);
                    rgb[dst..dst + 3].copy_from_slice(&tile[src..src + 3]);
                }
            }
        }
    }
    (rgb, width, height)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}
