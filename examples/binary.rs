//! Explain a binary classifier ("is this a 0?"): the true side for every
//! sample, then one side per sample.
//!
//! ```text
//! cargo run --release --example binary
//! ```

mod common;

use anyhow::Result;
use tch_vis::scores::{BinaryScore, Score};

fn main() -> Result<()> {
    let (model, x) = common::load("models/digits_binary.pt", &common::DIGITS)?;
    let is_zero = BinaryScore::new(true)?;
    let g = model.gradients(&[x.shallow_clone()], &[&is_zero as &dyn Score])?;
    println!("P(digit is 0): {:?}", Vec::<f32>::try_from(&g.scores[0])?);
    for (i, line) in common::describe(&g.inputs[0])?.iter().enumerate() {
        println!("  sample {i}: {line}");
    }
    // The first image is a 0 (explain "true"); the others are not ("false").
    let sides = BinaryScore::new(vec![true, false, false, false])?;
    let g = model.gradients(&[x], &[&sides as &dyn Score])?;
    println!("signed scores: {:?}", Vec::<f32>::try_from(&g.scores[0])?);
    Ok(())
}
