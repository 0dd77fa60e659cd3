//! Benchmark: the cost per image of Integrated Gradients and of activation
//! maximization on any TorchScript classifier, on the CPU (or CUDA), after
//! one warm-up run of each.
//!
//! ```text
//! cargo run --release --example bench_methods -- --model M.pt --size 224 --channels 3
//! ```

use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use tch::{Device, Kind, Tensor};
use tch_vis::integrated_gradients::IntegratedGradients;
use tch_vis::maximize::ActivationMaximization;
use tch_vis::scores::{CategoricalScore, PredictedScore, Score};
use tch_vis::{DeviceSpec, Model};

#[derive(Parser)]
struct Args {
    /// TorchScript classifier.
    #[arg(long)]
    model: String,
    /// Input height and width.
    #[arg(long, default_value_t = 224)]
    size: usize,
    #[arg(long, default_value_t = 3)]
    channels: usize,
    /// Images per Integrated Gradients batch.
    #[arg(long, default_value_t = 1)]
    batch: i64,
    /// Integrated Gradients steps (0: skip).
    #[arg(long, default_value_t = 50)]
    ig_steps: usize,
    /// Path points per forward/backward pass.
    #[arg(long, default_value_t = 50)]
    internal_batch_size: usize,
    /// Activation-maximization steps (0: skip).
    #[arg(long, default_value_t = 200)]
    maximize_steps: usize,
    /// Timed runs of each method.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Maximize without input modifiers and regularizers (to see their
    /// share of the time).
    #[arg(long)]
    bare: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device: Device = args.device.parse::<DeviceSpec>()?.resolve()?;
    let model = Model::load(&args.model, device)?;
    let (c, s) = (args.channels as i64, args.size as i64);
    tch::manual_seed(0);
    let x = Tensor::randn([args.batch, c, s, s], (Kind::Float, device));
    let predicted = PredictedScore::new();
    if args.ig_steps > 0 {
        let ig = IntegratedGradients::new(&model)
            .steps(args.ig_steps)
            .internal_batch_size(args.internal_batch_size);
        ig.attribute(&x, &[&predicted as &dyn Score])?; // warm-up
        let start = Instant::now();
        for _ in 0..args.runs {
            ig.attribute(&x, &[&predicted as &dyn Score])?;
        }
        let per = start.elapsed().as_secs_f64() / (args.runs as f64 * args.batch as f64);
        println!(
        "integrated gradients: {per:.3} s per image ({} steps, internal batch size {}, batch {}, {} threads, {device:?})",
        args.ig_steps,
        args.internal_batch_size,
        args.batch,
        tch::get_num_threads()
    );
    }

    if args.maximize_steps > 0 {
        let score = CategoricalScore::new(1)?;
        let mut am = ActivationMaximization::new(&model, [args.channels, args.size, args.size])
            .steps(args.maximize_steps);
        if args.bare {
            am = am.input_modifiers(vec![]).regularizers(vec![]);
        }
        am.clone().steps(2).maximize(&[&score as &dyn Score])?; // warm-up
        let start = Instant::now();
        for _ in 0..args.runs {
            am.maximize(&[&score as &dyn Score])?;
        }
        let per = start.elapsed().as_secs_f64() / args.runs as f64;
        println!(
            "activation maximization: {per:.3} s per image ({} steps, {} threads, {device:?}{})",
            args.maximize_steps,
            tch::get_num_threads(),
            if args.bare {
                ", no modifiers or regularizers"
            } else {
                ""
            }
        );
    }
    Ok(())
}
