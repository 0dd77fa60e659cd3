//! The score of a binary classifier.

use tch::Tensor;

use super::{batch_size, per_sample, per_sample_scalar, Score};
use crate::error::{Error, Result};

/// Which side of a binary classifier to explain: one value for every
/// sample, or one per sample.
///
/// Built from a `bool`, a `Vec<bool>`, an array or a slice. Only `bool` is
/// accepted (tf-keras-vis takes any truthy value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryValues(Vec<bool>);

impl From<bool> for BinaryValues {
    fn from(b: bool) -> Self {
        BinaryValues(vec![b])
    }
}

impl From<Vec<bool>> for BinaryValues {
    fn from(v: Vec<bool>) -> Self {
        BinaryValues(v)
    }
}

impl From<&[bool]> for BinaryValues {
    fn from(v: &[bool]) -> Self {
        BinaryValues(v.to_vec())
    }
}

impl<const K: usize> From<[bool; K]> for BinaryValues {
    fn from(v: [bool; K]) -> Self {
        BinaryValues(v.to_vec())
    }
}

/// The score of a binary classifier whose output is `(N, 1)` or `(N,)`, as
/// tf-keras-vis's `BinaryScore`: `true` gives `output`, `false` gives
/// `-output`.
///
/// ```
/// use tch::Tensor;
/// use tch_vis::scores::{BinaryScore, Score};
/// # fn main() -> tch_vis::Result<()> {
/// let out = Tensor::from_slice(&[0.9f32, 0.2]).view([2, 1]);
/// let v = BinaryScore::new(vec![true, false])?.score(&out)?;
/// assert_eq!(Vec::<f32>::try_from(&v).unwrap(), vec![0.9, -0.2]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct BinaryScore {
    values: Vec<bool>,
    name: String,
}

impl BinaryScore {
    /// A binary score for `values` (one, or one per sample).
    ///
    /// # Errors
    /// [`Error::Empty`] for an empty list. The list length is checked against
    /// the batch in [`Score::score`] ([`Error::BatchMismatch`]).
    pub fn new(values: impl Into<BinaryValues>) -> Result<Self> {
        let values = values.into().0;
        if values.is_empty() {
            return Err(Error::Empty {
                what: "binary values",
            });
        }
        let name = format!("binary{values:?}");
        Ok(BinaryScore { values, name })
    }

    /// The values as given.
    pub fn values(&self) -> &[bool] {
        &self.values
    }
}

impl Score for BinaryScore {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, output: &Tensor) -> Result<Tensor> {
        let batch = usize::try_from(batch_size(output)?).unwrap_or(0);
        let out = per_sample_scalar(output, "binary score output")?;
        let values = per_sample(&self.values, batch, "binary values")?;
        if values.iter().all(|&v| v) {
            return Ok(out);
        }
        if values.iter().all(|&v| !v) {
            return Ok(out.f_neg()?);
        }
        let signs: Vec<f32> = values.iter().map(|&v| if v { 1.0 } else { -1.0 }).collect();
        let signs = Tensor::f_from_slice(&signs)?
            .f_to_device(output.device())?
            .f_to_kind(output.f_kind()?)?;
        Ok(out.f_mul(&signs)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_other_than_n_by_1_are_rejected() {
        let out = Tensor::from_slice(&[0f32; 4]).view([2, 2]);
        let e = BinaryScore::new(true).unwrap().score(&out).unwrap_err();
        assert!(matches!(e, Error::Shape { ref got, .. } if got == &[2, 2]));
        let flat = Tensor::from_slice(&[0.5f32, -1.0]);
        let v = BinaryScore::new(false).unwrap().score(&flat).unwrap();
        assert_eq!(Vec::<f32>::try_from(&v).unwrap(), vec![-0.5, 1.0]);
        let e = BinaryScore::new(vec![true; 3])
            .unwrap()
            .score(&flat)
            .unwrap_err();
        assert!(matches!(
            e,
            Error::BatchMismatch {
                expected: 2,
                got: 3,
                ..
            }
        ));
    }
}
