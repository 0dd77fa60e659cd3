//! The score of a regressor.

use tch::Tensor;

use super::{per_sample_scalar, Score};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Increase,
    Decrease,
    Maintain(f64),
}

/// The score of a regressor whose output is `(N, 1)` or `(N,)`.
///
/// As tf-keras-vis's `RegressionScore` family:
/// - [`increase`](RegressionScore::increase): `output` — what raises the value;
/// - [`decrease`](RegressionScore::decrease): `-output` — what lowers it;
/// - [`maintain`](RegressionScore::maintain): `abs(1 / (output - target + 1e-7))`
///   — what keeps it at `target`.
///
/// ```
/// use tch::Tensor;
/// use tch_vis::scores::{RegressionScore, Score};
/// # fn main() -> tch_vis::Result<()> {
/// let out = Tensor::from_slice(&[2.5f32, 5.0]).view([2, 1]);
/// let v = RegressionScore::maintain(4.5)?.score(&out)?; // |1 / (x - 4.5 + 1e-7)|
/// assert!((v.double_value(&[0]) - 0.5).abs() < 1e-5);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RegressionScore {
    mode: Mode,
    name: String,
}

impl RegressionScore {
    /// Explains what increases the output.
    pub fn increase() -> Self {
        RegressionScore {
            mode: Mode::Increase,
            name: "regression:increase".into(),
        }
    }

    /// Explains what decreases the output.
    pub fn decrease() -> Self {
        RegressionScore {
            mode: Mode::Decrease,
            name: "regression:decrease".into(),
        }
    }

    /// Explains what keeps the output at `target`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for a non-finite target.
    pub fn maintain(target: f64) -> Result<Self> {
        if !target.is_finite() {
            return Err(Error::InvalidValue {
                what: "regression target",
                value: target.to_string(),
            });
        }
        Ok(RegressionScore {
            mode: Mode::Maintain(target),
            name: format!("regression:maintain={target}"),
        })
    }
}

impl Score for RegressionScore {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, output: &Tensor) -> Result<Tensor> {
        let out = per_sample_scalar(output, "regression score output")?;
        Ok(match self.mode {
            Mode::Increase => out,
            Mode::Decrease => out.f_neg()?,
            Mode::Maintain(target) => out
                .f_sub_scalar(target)?
                .f_add_scalar(1e-7)?
                .f_reciprocal()?
                .f_abs()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_targets_are_rejected() {
        for t in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(matches!(
                RegressionScore::maintain(t).unwrap_err(),
                Error::InvalidValue {
                    what: "regression target",
                    ..
                }
            ));
        }
    }

    #[test]
    fn increase_and_decrease_are_the_signed_output() {
        let out = Tensor::from_slice(&[1.5f32, -2.0]).view([2, 1]);
        let up = RegressionScore::increase().score(&out).unwrap();
        let down = RegressionScore::decrease().score(&out).unwrap();
        assert_eq!(Vec::<f32>::try_from(&up).unwrap(), vec![1.5, -2.0]);
        assert_eq!(Vec::<f32>::try_from(&down).unwrap(), vec![-1.5, 2.0]);
        let wide = Tensor::from_slice(&[0f32; 4]).view([2, 2]);
        assert!(matches!(
            RegressionScore::increase().score(&wide).unwrap_err(),
            Error::Shape { .. }
        ));
    }
}
