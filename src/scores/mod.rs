//! Scores: *what* to explain in a model's output.
//!
//! A score maps one model output to one value per sample, a `[batch]` tensor,
//! built with autograd so that its gradient with respect to the model's inputs
//! can be taken. These follow tf-keras-vis's `tf_keras_vis.utils.scores`,
//! adapted to PyTorch layouts: the class axis is dim 1 (`(N, C)` or
//! `(N, C, H, W)`), unless a score is asked to use the last axis.
//!
//! | score | value for sample `n` |
//! |---|---|
//! | [`CategoricalScore`] | `output[n, c_n, ...]`, averaged over the axes after the class axis |
//! | [`BinaryScore`] | `output[n]` for `true`, `-output[n]` for `false` |
//! | [`RegressionScore`] | `output[n]`, `-output[n]`, or `abs(1 / (output[n] - target + 1e-7))` |
//! | [`InactiveScore`] | `output[n] * 0` (keeps an output connected; no gradient) |
//! | [`PredictedScore`] | the categorical score of each sample's argmax class |
//! | [`SegmentationScore`] | class `c` averaged inside a spatial mask |
//! | [`ContrastiveScore`] | class `a` minus class `b` |
//!
//! Any closure `Fn(&Tensor) -> R` is a score too, where `R` is a `Tensor`, a
//! `Vec<Tensor>` of one scalar per sample, or a `Result` of either; wrap it in
//! [`FnScore`] to give it a name.
//!
//! ```
//! use tch::Tensor;
//! use tch_vis::scores::{CategoricalScore, Score};
//! # fn main() -> tch_vis::Result<()> {
//! let output = Tensor::from_slice(&[0.1f32, 0.7, 0.2, 0.6, 0.3, 0.1]).view([2, 3]);
//! let score = CategoricalScore::new(vec![1, 0])?;
//! let values = score.score(&output)?; // [0.7, 0.6]
//! assert_eq!(values.size(), vec![2]);
//! # Ok(()) }
//! ```

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

mod binary;
mod categorical;
mod inactive;
mod regression;
mod spec;

pub use binary::{BinaryScore, BinaryValues};
pub use categorical::{
    CategoricalScore, ClassAxis, ClassIndices, ContrastiveScore, PredictedScore, SegmentationScore,
};
pub use inactive::InactiveScore;
pub use regression::RegressionScore;
pub use spec::ScoreSpec;

/// A score: maps a model output to one value per sample.
///
/// Implementations return a `[batch]` tensor that stays connected to the
/// output's autograd graph. [`crate::Model::gradients`] checks the shape of
/// the result, so an implementation may leave that to it.
pub trait Score {
    /// A short name, used in error messages and reports.
    fn name(&self) -> &str;

    /// The score of `output`, one value per sample (shape `[batch]`).
    ///
    /// # Errors
    /// Implementations return [`Error::Shape`], [`Error::IndexOutOfRange`] or
    /// [`Error::BatchMismatch`] when the output does not fit the score, and
    /// [`Error::Torch`] when a libtorch operation fails.
    fn score(&self, output: &Tensor) -> Result<Tensor>;

    /// For a score that picks its class from the output itself (such as
    /// [`PredictedScore`]): the same score with each sample's class fixed as
    /// chosen on `output`, so that it stays fixed on other inputs (noisy
    /// SmoothGrad samples, Integrated Gradients' path, masked Score-CAM
    /// inputs). `None` (the default) for scores that do not depend on the
    /// output to pick what they score.
    ///
    /// # Errors
    /// As [`Score::score`].
    fn fixed_on(&self, output: &Tensor) -> Result<Option<Box<dyn Score + Send + Sync>>> {
        let _ = output;
        Ok(None)
    }

    /// The class index this score takes for each sample of `output`, for
    /// class scores (categorical, predicted); `None` (the default) for the
    /// others.
    ///
    /// # Errors
    /// As [`Score::score`].
    fn classes(&self, output: &Tensor) -> Result<Option<Vec<usize>>> {
        let _ = output;
        Ok(None)
    }
}

/// What a score closure may return: a `[batch]` tensor, one scalar tensor per
/// sample, or a `Result` of either.
pub trait IntoScoreValue {
    /// Converts into a tensor (its shape is checked by the caller).
    ///
    /// # Errors
    /// [`Error::Empty`] for an empty list; [`Error::Torch`] if stacking fails.
    fn into_score_value(self) -> Result<Tensor>;
}

impl IntoScoreValue for Tensor {
    fn into_score_value(self) -> Result<Tensor> {
        Ok(self)
    }
}

impl IntoScoreValue for Vec<Tensor> {
    fn into_score_value(self) -> Result<Tensor> {
        if self.is_empty() {
            return Err(Error::Empty {
                what: "score values",
            });
        }
        let flat = self
            .iter()
            .map(|t| t.f_reshape([-1]))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Tensor::f_cat(&flat, 0)?)
    }
}

impl<T: IntoScoreValue, E: Into<Error>> IntoScoreValue for std::result::Result<T, E> {
    fn into_score_value(self) -> Result<Tensor> {
        self.map_err(Into::into)
            .and_then(IntoScoreValue::into_score_value)
    }
}

impl<F, R> Score for F
where
    F: Fn(&Tensor) -> R,
    R: IntoScoreValue,
{
    fn name(&self) -> &str {
        "closure"
    }

    fn score(&self, output: &Tensor) -> Result<Tensor> {
        self(output).into_score_value()
    }
}

/// A closure with a name.
///
/// ```
/// use tch::Tensor;
/// use tch_vis::scores::{FnScore, Score};
/// # fn main() -> tch_vis::Result<()> {
/// // The mean of each sample's output, as a named score.
/// let s = FnScore::new("mean", |o: &Tensor| o.f_mean_dim(1, false, None));
/// let v = s.score(&Tensor::ones([3, 4], (tch::Kind::Float, tch::Device::Cpu)))?;
/// assert_eq!(s.name(), "mean");
/// assert_eq!(v.size(), vec![3]);
/// # Ok(()) }
/// ```
pub struct FnScore<F> {
    name: String,
    f: F,
}

impl<F, R> FnScore<F>
where
    F: Fn(&Tensor) -> R,
    R: IntoScoreValue,
{
    /// Names `f`.
    pub fn new(name: impl Into<String>, f: F) -> Self {
        FnScore {
            name: name.into(),
            f,
        }
    }
}

impl<F, R> Score for FnScore<F>
where
    F: Fn(&Tensor) -> R,
    R: IntoScoreValue,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, output: &Tensor) -> Result<Tensor> {
        (self.f)(output).into_score_value()
    }
}

/// Evaluates `score` on `output` and checks that the result holds one value
/// per sample: shape `[batch]` (a scalar is accepted for a batch of one, and a
/// `[batch, 1]` result is flattened).
///
/// # Errors
/// The score's own error, or [`Error::Shape`] when the result is not `[batch]`.
pub fn evaluate(score: &dyn Score, output: &Tensor) -> Result<Tensor> {
    let batch = batch_size(output)?;
    let value = score.score(output)?;
    let size = value.size();
    let ok = match size.as_slice() {
        [n] => *n == batch,
        [] => batch == 1,
        [n, 1] => *n == batch,
        _ => false,
    };
    if !ok {
        return Err(Error::shape(
            format!("result of score {:?}", score.name()),
            format!("[{batch}] (one value per sample)"),
            &size,
        ));
    }
    if size.len() == 1 {
        Ok(value)
    } else {
        Ok(value.f_reshape([batch])?)
    }
}

/// Each score on its output ([`evaluate`]), a failure wrapped in
/// [`Error::Score`] with the output's index.
/// Each score fixed on its output where [`Score::fixed_on`] gave one, else
/// the score as given.
pub(crate) fn fixed_or_given<'s>(
    fixed: &'s [Option<Box<dyn Score + Send + Sync>>],
    scores: &[&'s dyn Score],
) -> Vec<&'s dyn Score> {
    fixed
        .iter()
        .zip(scores)
        .map(|(f, s)| match f {
            Some(f) => f.as_ref() as &dyn Score,
            None => *s,
        })
        .collect()
}

pub(crate) fn evaluate_each(outputs: &[Tensor], scores: &[&dyn Score]) -> Result<Vec<Tensor>> {
    outputs
        .iter()
        .zip(scores)
        .enumerate()
        .map(|(index, (out, score))| {
            evaluate(*score, out).map_err(|e| Error::Score {
                index,
                name: score.name().to_string(),
                source: Box::new(e),
            })
        })
        .collect()
}

/// The batch size (dim 0) of an output; an error for a 0-d tensor.
pub(crate) fn batch_size(output: &Tensor) -> Result<i64> {
    match output.size().first() {
        Some(n) => Ok(*n),
        None => Err(Error::shape("model output", "(N, ...)", &[])),
    }
}

/// Reshapes a one-value-per-sample output `(N, 1, ..., 1)` or `(N,)` to `[N]`.
pub(crate) fn per_sample_scalar(output: &Tensor, what: &str) -> Result<Tensor> {
    let size = output.size();
    let ok = !size.is_empty() && size[1..].iter().all(|&d| d == 1);
    if !ok {
        return Err(Error::shape(what, "(N, 1) or (N,)", &size));
    }
    Ok(output.f_reshape([size[0]])?)
}

/// Reduces `(N, ...)` to `[N]` by a mean over every axis after the first.
pub(crate) fn mean_per_sample(t: &Tensor) -> Result<Tensor> {
    let size = t.size();
    match size.len() {
        0 => Err(Error::shape("score value", "(N, ...)", &size)),
        1 => Ok(t.shallow_clone()),
        // Explicit sizes, not -1: an empty batch has no -1 to infer.
        _ => Ok(t
            .f_reshape([size[0], size[1..].iter().product()])?
            .f_mean_dim(1, false, None::<Kind>)?),
    }
}

/// Expands one value or one per sample to exactly `batch` values.
pub(crate) fn per_sample<T: Copy>(
    values: &[T],
    batch: usize,
    what: &'static str,
) -> Result<Vec<T>> {
    match values {
        [] => Err(Error::Empty { what }),
        [v] => Ok(vec![*v; batch]),
        vs if vs.len() == batch => Ok(vs.to_vec()),
        vs => Err(Error::BatchMismatch {
            what,
            expected: batch,
            got: vs.len(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn closure_results_are_checked_for_batch_size() {
        let out = Tensor::ones([3, 2], (Kind::Float, Device::Cpu));
        let bad = |o: &Tensor| o.f_sum(None::<Kind>);
        let e = evaluate(&bad, &out).unwrap_err();
        assert!(
            matches!(e, Error::Shape { ref got, .. } if got.is_empty()),
            "{e}"
        );
        let good = |o: &Tensor| -> Vec<Tensor> { (0..3).map(|i| o.get(i).sum(None)).collect() };
        let v = evaluate(&good, &out).unwrap();
        assert_eq!(Vec::<f32>::try_from(&v).unwrap(), vec![2.0, 2.0, 2.0]);
    }

    #[test]
    fn per_sample_broadcasts_or_checks_length() {
        assert_eq!(per_sample(&[4], 3, "x").unwrap(), vec![4, 4, 4]);
        assert_eq!(per_sample(&[1, 2, 3], 3, "x").unwrap(), vec![1, 2, 3]);
        let e = per_sample(&[1, 2], 3, "x").unwrap_err();
        assert!(matches!(
            e,
            Error::BatchMismatch {
                expected: 3,
                got: 2,
                ..
            }
        ));
        assert!(matches!(
            per_sample::<u8>(&[], 3, "x").unwrap_err(),
            Error::Empty { .. }
        ));
    }
}
