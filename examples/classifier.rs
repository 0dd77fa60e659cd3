//! Explain a 10-class classifier: the score of each image's own digit and of
//! a fixed class, with their input gradients.
//!
//! ```text
//! cargo run --release --example classifier
//! ```

mod common;

use anyhow::Result;
use tch_vis::scores::{CategoricalScore, PredictedScore, Score};

fn main() -> Result<()> {
    let (model, x) = common::load("models/digits_cnn.pt", &common::DIGITS)?;
    let probs = &model.forward(&[x.shallow_clone()])?[0];
    let predicted = PredictedScore::new();
    println!("predicted classes: {:?}", predicted.classes(probs)?);

    // The true digits of the samples, one index per sample.
    let truth = CategoricalScore::new(vec![0, 3, 7, 8])?;
    let g = model.gradients(&[x.shallow_clone()], &[&truth as &dyn Score])?;
    println!("P(true class): {:?}", Vec::<f32>::try_from(&g.scores[0])?);
    for (i, line) in common::describe(&g.inputs[0])?.iter().enumerate() {
        println!("  sample {i}: {line}");
    }

    // One class for every sample: why would each image be a 3?
    let three = CategoricalScore::new(3)?;
    let g = model.gradients(&[x], &[&three as &dyn Score])?;
    println!("P(3): {:?}", Vec::<f32>::try_from(&g.scores[0])?);
    Ok(())
}
