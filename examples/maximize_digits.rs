//! The README's activation-maximization figure: what each digit class looks
//! like to `models/digits_cnn.pt`. Top row: a held-out example of each digit
//! from `examples/images/gray`; bottom row: the input that maximises that
//! class, made by `ActivationMaximization` in one batch of ten, shown in
//! image space (`x × std + mean`, clipped to [0, 1]). Both rows are enlarged
//! with nearest-neighbour so the pixels stay visible.
//!
//! The settings that make digits a person can read, rather than patterns
//! the model merely accepts (each is a flag; `--plain` runs the library's
//! defaults with `CategoricalScore` instead):
//! - the score is `½ log p_c + ½ (log p_c − mean_j log p_j)`. The model
//!   outputs softmax probabilities, whose gradient vanishes as `p_c` nears
//!   0 or 1; `log p_c − mean_j log p_j` equals the centred logit
//!   `z_c − mean_j z_j`, which keeps adding evidence for the class, and the
//!   log-probability half keeps the other classes down;
//! - `v` is 8 × 8 pixels upsampled bilinearly to 32 × 32, as the digits the
//!   model was trained on were made;
//! - total variation 0.05 (the upsampling already smooths), L1 norm 0.1
//!   (a dark background with few bright strokes), rotations up to 5°,
//!   RMSprop learning rate 2 for 300 steps.
//!
//! ```text
//! cargo run --release --example maximize_digits -- --out docs/maximize.png
//! cargo run --release --example maximize_digits -- --plain
//! ```

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use tch::{Device, Kind, Tensor};
use tch_vis::maximize::{ActivationMaximization, InputModifier, Regularizer, RmsProp};
use tch_vis::preprocess::{Preprocessor, Sidecar};
use tch_vis::scores::{CategoricalScore, FnScore, Score};
use tch_vis::Model;

#[derive(Parser)]
struct Args {
    /// TorchScript model (its sidecar `M.json` beside it).
    #[arg(long, default_value = "models/digits_cnn.pt")]
    model: String,
    /// Where to write the figure (the README's: docs/maximize.png).
    #[arg(long, default_value = "out/maximize.png")]
    out: String,
    /// Seed of the seed input, jitters and rotations.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Gradient steps (default 300; with `--plain`, the library's 200).
    #[arg(long)]
    steps: Option<usize>,
    /// Enlargement factor of the figure.
    #[arg(long, default_value_t = 6)]
    scale: u32,
    /// Side of the optimised variable, upsampled to the input size.
    #[arg(long, default_value_t = 8)]
    resolution: usize,
    /// Total-variation weight.
    #[arg(long, default_value_t = 0.05)]
    tv: f64,
    /// L1-norm weight.
    #[arg(long, default_value_t = 0.1)]
    norm: f64,
    /// Largest rotation, in degrees.
    #[arg(long, default_value_t = 5.0)]
    rotate: f64,
    /// RMSprop learning rate.
    #[arg(long, default_value_t = 2.0)]
    lr: f64,
    /// The library's defaults and `CategoricalScore` (the class
    /// probability), for comparison; ignores the settings above but
    /// `--steps`, whose default is then the library's.
    #[arg(long)]
    plain: bool,
}

const PAD: u32 = 4;

fn main() -> Result<()> {
    let args = Args::parse();
    let model = Model::load(&args.model, Device::Cpu)?;
    let sidecar = Sidecar::for_model(&args.model)?;
    let classes: Vec<usize> = (0..10).collect();
    let probability = CategoricalScore::new(classes.clone())?;
    let index =
        Tensor::from_slice(&classes.iter().map(|&c| c as i64).collect::<Vec<_>>()).view([-1, 1]);
    let evidence = FnScore::new("evidence", move |p: &Tensor| -> tch_vis::Result<Tensor> {
        let logp = p.f_clamp_min(1e-30)?.f_log()?;
        let own = logp
            .f_gather(1, &index.f_to_device(p.device())?, false)?
            .f_view([-1])?;
        let mean = logp.f_mean_dim(1, false, None::<Kind>)?;
        Ok(own.f_mul_scalar(2.0)?.f_sub(&mean)?.f_mul_scalar(0.5)?)
    });

    let am = ActivationMaximization::new(&model, [1, 32, 32])
        .sidecar(&sidecar)
        .samples(classes.len())
        .seed(args.seed);
    // The library's step count for `--plain` unless given.
    let am = match args.steps {
        Some(n) => am.steps(n),
        None if args.plain => am,
        None => am.steps(300),
    };
    let (am, score): (_, &dyn Score) = if args.plain {
        (am, &probability)
    } else {
        let am = am
            .resolution(args.resolution, args.resolution)
            .regularizers(vec![
                Regularizer::TotalVariation2D { weight: args.tv },
                Regularizer::Norm {
                    weight: args.norm,
                    p: 1.0,
                },
            ])
            .input_modifiers(vec![
                InputModifier::Jitter { jitter: 4 },
                InputModifier::Rotate2D {
                    degree: args.rotate,
                },
            ])
            .optimizer(RmsProp {
                learning_rate: args.lr,
                ..RmsProp::default()
            });
        (am, &evidence)
    };
    let start = Instant::now();
    let out = am.maximize(&[score])?;
    let seconds = start.elapsed().as_secs_f64();

    let probs = &model.forward(&[out.inputs.shallow_clone()])?[0];
    let argmax = Vec::<i64>::try_from(&probs.f_argmax(1, false)?)?;
    let p = Vec::<f32>::try_from(&probability.score(probs)?)?;
    println!(
        "maximised in {seconds:.2} s ({} steps, 10 images)",
        out.curve.len()
    );
    for &c in &classes {
        let curve: Vec<f32> = out.curve.iter().map(|s| s[c]).collect();
        let at = |i: usize| curve.get(i).copied().unwrap_or(f32::NAN);
        println!(
            "class {c}: p {:.4}, argmax {}, score at steps 0 / 25% / 50% / last: {:.3} {:.3} {:.3} {:.3}",
            p[c],
            argmax[c],
            at(0),
            at(curve.len() / 4),
            at(curve.len() / 2),
            at(curve.len().saturating_sub(1)),
        );
    }

    // A held-out example of each class: the first file of its folder.
    let pre = Preprocessor::new(sidecar);
    let mut examples = Vec::new();
    for c in &classes {
        let dir = format!("examples/images/gray/{c}");
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| dir.clone())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        let first = names.first().with_context(|| format!("{dir} is empty"))?;
        examples.push(pre.load(first)?.image.to_planes()?);
    }

    let rows = [examples, (0..10).map(|i| out.images.get(i)).collect()];
    let (h, w) = (32 * args.scale, 32 * args.scale);
    let width = 10 * (w + PAD) + PAD;
    let height = 2 * (h + PAD) + PAD;
    let mut rgb = vec![255u8; (width * height * 3) as usize];
    for (r, row) in rows.iter().enumerate() {
        for (i, img) in row.iter().enumerate() {
            let (x0, y0) = (PAD + i as u32 * (w + PAD), PAD + r as u32 * (h + PAD));
            paste(&mut rgb, width, x0, y0, img, args.scale)?;
        }
    }
    let png = tch_vis::heatmap::encode_png(&rgb, width, height)?;
    std::fs::write(&args.out, png).with_context(|| args.out.clone())?;
    println!("wrote {} ({width}x{height})", args.out);
    Ok(())
}

/// Draws a `(1, 32, 32)` image in [0, 1], enlarged `scale` times.
fn paste(rgb: &mut [u8], width: u32, x0: u32, y0: u32, img: &Tensor, scale: u32) -> Result<()> {
    let v = Vec::<f32>::try_from(&img.reshape([-1]))?;
    for y in 0..32 * scale {
        for x in 0..32 * scale {
            let p = v[((y / scale) * 32 + x / scale) as usize];
            let b = (p.clamp(0.0, 1.0) * 255.0).round() as u8;
            let o = (((y0 + y) * width + x0 + x) * 3) as usize;
            rgb[o..o + 3].copy_from_slice(&[b, b, b]);
        }
    }
    Ok(())
}
