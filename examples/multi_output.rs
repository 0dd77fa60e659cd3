//! Explain a model with two outputs (class logits and a value): one score
//! per output, summed into one objective; `InactiveScore` switches an
//! output off.
//!
//! ```text
//! cargo run --release --example multi_output
//! ```

mod common;

use anyhow::Result;
use tch_vis::scores::{CategoricalScore, InactiveScore, RegressionScore, Score};

fn main() -> Result<()> {
    let (model, x) = common::load("models/digits_multi.pt", &common::DIGITS)?;
    let outputs = model.forward_named(&[x.shallow_clone()])?;
    for (name, t) in &outputs {
        println!("output {name}: {:?}", t.size());
    }
    let class = CategoricalScore::new(vec![0, 3, 7, 8])?.softmax();
    let value = RegressionScore::increase();
    let off = InactiveScore::new();
    let cases: [(&str, [&dyn Score; 2]); 3] = [
        ("class + value", [&class, &value]),
        ("class only", [&class, &off]),
        ("value only", [&off, &value]),
    ];
    for (label, scores) in cases {
        let g = model.gradients(&[x.shallow_clone()], &scores)?;
        println!(
            "{label}: scores {:?} / {:?}",
            Vec::<f32>::try_from(&g.scores[0])?,
            Vec::<f32>::try_from(&g.scores[1])?
        );
        for (i, line) in common::describe(&g.inputs[0])?.iter().enumerate() {
            println!("  sample {i}: {line}");
        }
    }
    Ok(())
}
