//! Scores named as text, as the command line takes them: `ScoreSpec`.

use std::fmt;
use std::str::FromStr;

use super::{BinaryScore, CategoricalScore, InactiveScore, PredictedScore, RegressionScore, Score};
use crate::error::{Error, Result};

/// A score as a user names it on the command line.
///
/// | text | score |
/// |---|---|
/// | `categorical:I` | [`CategoricalScore`] of class `I` for every sample |
/// | `categorical:I,J,...` | [`CategoricalScore`] with one class per sample |
/// | `binary:true`, `binary:false` (also `1`, `0`) | [`BinaryScore`] |
/// | `regression:increase`, `regression:decrease`, `regression:maintain=T` | [`RegressionScore`] |
/// | `inactive` | [`InactiveScore`] |
/// | `predicted` | [`PredictedScore`]: each sample's own argmax class |
///
/// Kinds and words are case-insensitive; surrounding spaces are ignored.
///
/// ```
/// use tch_vis::scores::ScoreSpec;
/// # fn main() -> tch_vis::Result<()> {
/// let spec: ScoreSpec = "categorical:3".parse()?;
/// assert_eq!(spec, ScoreSpec::Categorical(vec![3]));
/// spec.check(&[1, 10])?;          // fits an (N, 10) output
/// assert!(spec.check(&[1, 2]).is_err()); // class 3 of 2 classes
/// let score = spec.to_score()?;   // Box<dyn Score + Send + Sync>
/// assert_eq!(score.name(), "categorical:3");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum ScoreSpec {
    /// `categorical:I` or `categorical:I,J,...`.
    Categorical(Vec<usize>),
    /// `binary:true|false|1|0`.
    Binary(bool),
    /// `regression:increase`.
    Increase,
    /// `regression:decrease`.
    Decrease,
    /// `regression:maintain=T`.
    Maintain(f64),
    /// `inactive`.
    Inactive,
    /// `predicted`.
    Predicted,
}

fn bad(spec: &str, reason: impl Into<String>) -> Error {
    Error::ScoreSpec {
        spec: spec.to_string(),
        reason: reason.into(),
    }
}

const FORMS: &str = "expected categorical:I, binary:true|false, regression:increase|decrease|maintain=T, inactive or predicted";

impl FromStr for ScoreSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let text = s.trim();
        let (kind, arg) = match text.split_once(':') {
            Some((k, a)) => (k.trim().to_ascii_lowercase(), Some(a.trim())),
            None => (text.to_ascii_lowercase(), None),
        };
        match (kind.as_str(), arg) {
            ("categorical", Some(a)) => {
                if a.is_empty() {
                    return Err(bad(s, "missing class index after `categorical:`"));
                }
                let indices = a
                    .split(',')
                    .map(|i| {
                        i.trim().parse::<usize>().map_err(|_| {
                            bad(
                                s,
                                format!("class index {:?} is not a non-negative integer", i.trim()),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(ScoreSpec::Categorical(indices))
            }
            ("categorical", None) => Err(bad(s, "missing class index (categorical:I)")),
            ("binary", Some(a)) => match a.to_ascii_lowercase().as_str() {
                "true" | "1" => Ok(ScoreSpec::Binary(true)),
                "false" | "0" => Ok(ScoreSpec::Binary(false)),
                other => Err(bad(
                    s,
                    format!("binary value {other:?} is not true, false, 1 or 0"),
                )),
            },
            ("binary", None) => Err(bad(s, "missing value (binary:true or binary:false)")),
            ("regression", Some(a)) => {
                let lower = a.to_ascii_lowercase();
                match lower.as_str() {
                    "increase" => Ok(ScoreSpec::Increase),
                    "decrease" => Ok(ScoreSpec::Decrease),
                    m => match m.strip_prefix("maintain=") {
                        Some(t) => {
                            let target = t.trim().parse::<f64>().map_err(|_| {
                                bad(s, format!("target {:?} is not a number", t.trim()))
                            })?;
                            if !target.is_finite() {
                                return Err(bad(s, format!("target {target} is not finite")));
                            }
                            Ok(ScoreSpec::Maintain(target))
                        }
                        None => Err(bad(
                            s,
                            "expected regression:increase, regression:decrease or regression:maintain=T",
                        )),
                    },
                }
            }
            ("regression", None) => Err(bad(
                s,
                "missing mode (regression:increase, regression:decrease or regression:maintain=T)",
            )),
            ("inactive", None) => Ok(ScoreSpec::Inactive),
            ("predicted", None) => Ok(ScoreSpec::Predicted),
            ("inactive" | "predicted", Some(_)) => {
                Err(bad(s, format!("`{kind}` takes no argument")))
            }
            _ => Err(bad(s, FORMS)),
        }
    }
}

impl fmt::Display for ScoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScoreSpec::Categorical(v) => {
                let list: Vec<String> = v.iter().map(ToString::to_string).collect();
                write!(f, "categorical:{}", list.join(","))
            }
            ScoreSpec::Binary(b) => write!(f, "binary:{b}"),
            ScoreSpec::Increase => f.write_str("regression:increase"),
            ScoreSpec::Decrease => f.write_str("regression:decrease"),
            ScoreSpec::Maintain(t) => write!(f, "regression:maintain={t}"),
            ScoreSpec::Inactive => f.write_str("inactive"),
            ScoreSpec::Predicted => f.write_str("predicted"),
        }
    }
}

impl ScoreSpec {
    /// The score this names.
    ///
    /// # Errors
    /// [`Error::Empty`] for an empty class list (the parser never makes one).
    pub fn to_score(&self) -> Result<Box<dyn Score + Send + Sync>> {
        Ok(match self {
            ScoreSpec::Categorical(v) => Box::new(CategoricalScore::new(v.clone())?),
            ScoreSpec::Binary(b) => Box::new(BinaryScore::new(*b)?),
            ScoreSpec::Increase => Box::new(RegressionScore::increase()),
            ScoreSpec::Decrease => Box::new(RegressionScore::decrease()),
            ScoreSpec::Maintain(t) => Box::new(RegressionScore::maintain(*t)?),
            ScoreSpec::Inactive => Box::new(InactiveScore::new()),
            ScoreSpec::Predicted => Box::new(PredictedScore::new()),
        })
    }

    /// Checks `specs` against a model's `outputs`: one specification per
    /// output, each fitting its output ([`ScoreSpec::check`]).
    ///
    /// # Errors
    /// [`Error::ScoreCount`] for another number of specifications;
    /// [`Error::Score`] (with the output index) for one that does not fit.
    pub fn check_outputs(specs: &[ScoreSpec], outputs: &[tch::Tensor]) -> Result<()> {
        if outputs.len() != specs.len() {
            return Err(Error::ScoreCount {
                outputs: outputs.len(),
                scores: specs.len(),
            });
        }
        for (index, (spec, out)) in specs.iter().zip(outputs).enumerate() {
            spec.check(&out.size()).map_err(|e| Error::Score {
                index,
                name: spec.to_string(),
                source: Box::new(e),
            })?;
        }
        Ok(())
    }

    /// Checks that this score fits a model output of shape `shape` (the
    /// batch size, dim 0, is not checked), so that a mismatch is found
    /// before any data is processed.
    ///
    /// - `categorical` and `predicted` need a class axis (rank ≥ 2), and
    ///   every class index must be smaller than `shape[1]`;
    /// - `binary` and `regression` need `(N, 1)` or `(N,)`;
    /// - `inactive` fits any output with a batch axis.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for a class index ≥ the number of classes;
    /// [`Error::Shape`] for an output the score cannot use.
    pub fn check(&self, shape: &[i64]) -> Result<()> {
        let scalar = |what: &str| -> Result<()> {
            match shape {
                [_] | [_, 1] => Ok(()),
                _ => Err(Error::shape(
                    format!("{what} score output"),
                    "(N, 1) or (N,)",
                    shape,
                )),
            }
        };
        // What a class score expects, and what fits an output without a
        // class axis.
        let with_classes = |what: &str, expected: &str| {
            let hint = if shape.len() == 1 {
                " (an (N,) output has no class axis: a regression or binary score fits it)"
            } else {
                ""
            };
            Error::shape(what, format!("{expected}{hint}"), shape)
        };
        match self {
            ScoreSpec::Categorical(indices) => {
                let classes = match shape {
                    [_, c, ..] => usize::try_from(*c).unwrap_or(0),
                    _ => {
                        return Err(with_classes(
                            "categorical score output",
                            "(N, C) or (N, C, ...)",
                        ))
                    }
                };
                match indices.iter().find(|&&i| i >= classes) {
                    Some(&index) => Err(Error::IndexOutOfRange {
                        index,
                        num_classes: classes,
                    }),
                    None => Ok(()),
                }
            }
            ScoreSpec::Predicted => match shape {
                [_, c, ..] if *c > 0 => Ok(()),
                _ => Err(with_classes(
                    "predicted score output",
                    "(N, C) or (N, C, ...) with C > 0",
                )),
            },
            ScoreSpec::Binary(_) => scalar("binary"),
            ScoreSpec::Increase | ScoreSpec::Decrease | ScoreSpec::Maintain(_) => {
                scalar("regression")
            }
            ScoreSpec::Inactive => match shape {
                [] => Err(Error::shape("inactive score output", "(N, ...)", shape)),
                _ => Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let cases: &[(&str, ScoreSpec)] = &[
            ("categorical:3", ScoreSpec::Categorical(vec![3])),
            ("categorical: 1, 2", ScoreSpec::Categorical(vec![1, 2])),
            ("binary:true", ScoreSpec::Binary(true)),
            ("binary:1", ScoreSpec::Binary(true)),
            ("binary:FALSE", ScoreSpec::Binary(false)),
            ("binary:0", ScoreSpec::Binary(false)),
            ("regression:increase", ScoreSpec::Increase),
            ("regression:decrease", ScoreSpec::Decrease),
            ("regression:maintain=4.5", ScoreSpec::Maintain(4.5)),
            ("regression:maintain=-1e3", ScoreSpec::Maintain(-1000.0)),
            ("inactive", ScoreSpec::Inactive),
            (" predicted ", ScoreSpec::Predicted),
        ];
        for (text, want) in cases {
            assert_eq!(&text.parse::<ScoreSpec>().unwrap(), want, "{text}");
            // Display round-trips.
            assert_eq!(&want.to_string().parse::<ScoreSpec>().unwrap(), want);
        }
    }

    #[test]
    fn rejects_bad_forms_with_a_typed_error() {
        for bad in [
            "",
            "categorical",
            "categorical:",
            "categorical:-1",
            "categorical:x",
            "categorical:1,,2",
            "binary",
            "binary:yes",
            "binary:2",
            "regression",
            "regression:up",
            "regression:maintain=",
            "regression:maintain=nan",
            "regression:maintain=inf",
            "inactive:1",
            "predicted:3",
            "softmax",
        ] {
            let e = bad.parse::<ScoreSpec>().unwrap_err();
            assert!(
                matches!(e, Error::ScoreSpec { ref spec, .. } if spec == bad),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn checks_against_output_shapes() {
        let c3 = ScoreSpec::Categorical(vec![3]);
        c3.check(&[1, 10]).unwrap();
        c3.check(&[1, 10, 32, 32]).unwrap();
        assert!(matches!(
            c3.check(&[1, 3]).unwrap_err(),
            Error::IndexOutOfRange {
                index: 3,
                num_classes: 3
            }
        ));
        assert!(matches!(c3.check(&[1]).unwrap_err(), Error::Shape { .. }));
        let b = ScoreSpec::Binary(true);
        b.check(&[1, 1]).unwrap();
        b.check(&[4]).unwrap();
        assert!(matches!(
            b.check(&[1, 10]).unwrap_err(),
            Error::Shape { .. }
        ));
        assert!(matches!(
            ScoreSpec::Increase.check(&[1, 2]).unwrap_err(),
            Error::Shape { .. }
        ));
        ScoreSpec::Predicted.check(&[2, 10]).unwrap();
        // An (N,) output is named for what fits it; (N, 0) is not.
        let fits = "a regression or binary score fits it";
        assert!(ScoreSpec::Predicted
            .check(&[2])
            .unwrap_err()
            .to_string()
            .contains(fits));
        assert!(c3.check(&[2]).unwrap_err().to_string().contains(fits));
        assert!(!ScoreSpec::Predicted
            .check(&[2, 0])
            .unwrap_err()
            .to_string()
            .contains(fits));
        ScoreSpec::Inactive.check(&[2, 7, 3]).unwrap();
    }

    #[test]
    fn builds_scores() {
        for text in [
            "categorical:1",
            "binary:false",
            "regression:maintain=2",
            "inactive",
            "predicted",
        ] {
            let spec: ScoreSpec = text.parse().unwrap();
            assert!(!spec.to_score().unwrap().name().is_empty());
        }
    }
}
