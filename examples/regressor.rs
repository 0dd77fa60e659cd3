//! Explain a regressor (the digit's value): what increases it, what
//! decreases it, and what keeps it at a target.
//!
//! ```text
//! cargo run --release --example regressor
//! ```

mod common;

use anyhow::Result;
use tch_vis::scores::{RegressionScore, Score};

fn main() -> Result<()> {
    let (model, x) = common::load("models/digits_regressor.pt", &common::DIGITS)?;
    let modes = [
        RegressionScore::increase(),
        RegressionScore::decrease(),
        RegressionScore::maintain(5.0)?,
    ];
    for score in &modes {
        let g = model.gradients(&[x.shallow_clone()], &[score as &dyn Score])?;
        println!(
            "{}: {:?}",
            score.name(),
            Vec::<f32>::try_from(&g.scores[0])?
        );
        for (i, line) in common::describe(&g.inputs[0])?.iter().enumerate() {
            println!("  sample {i}: {line}");
        }
    }
    Ok(())
}
