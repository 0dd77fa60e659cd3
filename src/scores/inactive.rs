//! A score that contributes nothing.

use tch::Tensor;

use super::{mean_per_sample, Score};
use crate::error::Result;

/// `output * 0`, reduced to `[batch]`, as tf-keras-vis's `InactiveScore`.
///
/// Use it for the outputs of a multi-output model that should not be
/// explained: it keeps them connected to the graph but adds no gradient.
#[derive(Debug, Clone, Copy, Default)]
pub struct InactiveScore;

impl InactiveScore {
    /// The inactive score.
    pub fn new() -> Self {
        InactiveScore
    }
}

impl Score for InactiveScore {
    fn name(&self) -> &str {
        "inactive"
    }

    fn score(&self, output: &Tensor) -> Result<Tensor> {
        mean_per_sample(&output.f_mul_scalar(0.0)?)
    }
}
