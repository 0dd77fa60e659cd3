//! Benchmark: `Model::gradients` against the same work written by hand with
//! tch (`forward_ts` + `Tensor::run_backward`), on one TorchScript file, in
//! one process, interleaved so both see the same machine state. Also prints
//! the model-alone throughput (input gradients per second), the ceiling the
//! CLI pipeline is measured against.
//!
//! ```text
//! cargo run --release --example bench_overhead -- --model models/digits_cnn.pt --batch 32 --size 32 --channels 1
//! ```

use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use tch::{CModule, Kind, Tensor};
use tch_vis::scores::{CategoricalScore, Score};
use tch_vis::{DeviceSpec, Model, Precision};

#[path = "common/timing.rs"]
mod timing;
use timing::{median, sync};

#[derive(Parser)]
struct Args {
    /// TorchScript model.
    #[arg(long)]
    model: String,
    /// Label printed with the results.
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long, default_value_t = 32)]
    batch: i64,
    /// Input height and width.
    #[arg(long, default_value_t = 32)]
    size: i64,
    #[arg(long, default_value_t = 1)]
    channels: i64,
    /// Timed rounds (each round runs both variants once).
    #[arg(long, default_value_t = 50)]
    iters: usize,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// Class scored.
    #[arg(long, default_value_t = 1)]
    class: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = args.device.parse::<DeviceSpec>()?.resolve()?;
    let precision: Precision = args.precision.parse()?;
    if device.is_cuda() {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    let mut model = Model::load(&args.model, device)?;
    model.set_precision(precision)?;
    let mut raw = CModule::load_on_device(&args.model, device)?;
    raw.set_eval();
    if precision != Precision::Fp32 {
        raw.to(device, precision.kind(), false);
    }
    for (_, p) in raw.named_parameters()? {
        let _ = p.set_requires_grad(false);
    }
    let x = Tensor::randn(
        [args.batch, args.channels, args.size, args.size],
        (Kind::Float, device),
    );
    let score = CategoricalScore::new(args.class)?;
    let class = args.class as i64;

    let ours = || -> Result<Tensor> {
        let g = model.gradients(&[x.shallow_clone()], &[&score as &dyn Score])?;
        Ok(g.inputs.into_iter().next().unwrap_or_default())
    };
    let baseline = || -> Result<Tensor> {
        let leaf = x.to_kind(precision.kind()).detach().set_requires_grad(true);
        let out = raw.forward_ts(&[&leaf])?;
        let objective = out.select(1, class).sum(Kind::Float);
        let g = Tensor::run_backward(&[&objective], &[&leaf], false, false);
        Ok(g[0].to_kind(Kind::Float))
    };

    // Same values (the baseline is the definition).
    let (a, b) = (ours()?, baseline()?);
    let diff = (&a - &b).abs().max().double_value(&[]);
    for _ in 0..5 {
        let _ = ours()?;
        let _ = baseline()?;
    }
    sync(device);
    let (mut t_ours, mut t_base) = (Vec::new(), Vec::new());
    for _ in 0..args.iters {
        let t = Instant::now();
        let _g = ours()?;
        sync(device);
        t_ours.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let _g = baseline()?;
        sync(device);
        t_base.push(t.elapsed().as_secs_f64());
    }
    let (mo, mb) = (median(&mut t_ours), median(&mut t_base));
    let label = if args.label.is_empty() {
        args.model.clone()
    } else {
        args.label.clone()
    };
    println!(
        "overhead {label} batch {} {} {}: ours {:.3} ms, baseline {:.3} ms, ratio {:.3} (max |diff| {diff:.1e})",
        args.batch,
        tch_vis::device_name(device),
        precision,
        mo * 1e3,
        mb * 1e3,
        mo / mb
    );
    println!(
        "model-alone {label} batch {} {} {}: {:.1} images/s",
        args.batch,
        tch_vis::device_name(device),
        precision,
        args.batch as f64 / mo
    );
    Ok(())
}
