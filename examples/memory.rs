//! Memory check: many `Model::gradients` calls must not grow the process.
//!
//! Runs `--warmup` calls, records the peak resident set (VmHWM), runs
//! `--calls` more, and prints the growth of the peak. The target is under 5%.
//!
//! ```text
//! cargo run --release --example memory -- --calls 10000
//! ```

use anyhow::{Context, Result};
use clap::Parser;
use tch::{Device, Kind, Tensor};
use tch_vis::scores::{CategoricalScore, Score};
use tch_vis::Model;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "models/digits_cnn.pt")]
    model: String,
    #[arg(long, default_value_t = 32)]
    batch: i64,
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    #[arg(long, default_value_t = 10_000)]
    calls: usize,
}

/// Peak and current resident set size in kB, from /proc/self/status.
fn rss_kb() -> Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} not in /proc/self/status"))?;
        Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let model = Model::load(&args.model, Device::Cpu)?;
    let score = CategoricalScore::new(3)?;
    let x = Tensor::randn([args.batch, 1, 32, 32], (Kind::Float, Device::Cpu));
    let mut checksum = 0.0;
    for _ in 0..args.warmup {
        let g = model.gradients(&[x.shallow_clone()], &[&score as &dyn Score])?;
        checksum += g.scores[0].double_value(&[0]);
    }
    let (peak0, rss0) = rss_kb()?;
    let t = std::time::Instant::now();
    for _ in 0..args.calls {
        let g = model.gradients(&[x.shallow_clone()], &[&score as &dyn Score])?;
        checksum += g.scores[0].double_value(&[0]);
    }
    let (peak1, rss1) = rss_kb()?;
    let growth = (peak1 as f64 - peak0 as f64) / peak0 as f64 * 100.0;
    println!(
        "memory {} batch {}: {} calls in {:.1} s; peak RSS after warm-up {} kB, after {} kB: growth {:.2}% (target < 5%); RSS {} -> {} kB (checksum {checksum:.3})",
        args.model,
        args.batch,
        args.calls,
        t.elapsed().as_secs_f64(),
        peak0,
        peak1,
        growth,
        rss0,
        rss1
    );
    if growth >= 5.0 {
        anyhow::bail!("peak RSS grew {growth:.2}% (limit 5%)");
    }
    Ok(())
}
