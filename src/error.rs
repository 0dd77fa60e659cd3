//! The one error type of tch-vis.

use std::path::PathBuf;

/// Everything that can go wrong in tch-vis.
///
/// Variants carry the values on both sides of a mismatch, so a caller can
/// match on them and a person can read them. Messages are lowercase and have
/// no trailing period. Errors raised inside libtorch keep libtorch's text in
/// [`Error::Torch`]; [`Error::summary`] gives its first line only.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A class index is not smaller than the number of classes of the output.
    #[error(
        "class index {index} is out of range for an output with {num_classes} {}",
        if *num_classes == 1 {
            "class (an (N, 1) output: a binary or regression score fits it)"
        } else {
            "classes"
        }
    )]
    IndexOutOfRange {
        /// The offending class index.
        index: usize,
        /// The size of the class axis of the output.
        num_classes: usize,
    },

    /// A list of per-sample values does not have one entry per sample.
    #[error("{what}: expected {expected} values (one per sample), got {got}")]
    BatchMismatch {
        /// What the values are (for example `"class indices"`).
        what: &'static str,
        /// The batch size of the output.
        expected: usize,
        /// The number of values given.
        got: usize,
    },

    /// A list that must not be empty is empty.
    #[error("{what} must not be empty")]
    Empty {
        /// What the list is (for example `"class indices"`).
        what: &'static str,
    },

    /// A tensor has a shape the operation cannot use.
    #[error("{what}: expected shape {expected}, got {got:?}")]
    Shape {
        /// The tensor in question (for example `"binary score output"`).
        what: String,
        /// A description of the accepted shapes (for example `"(N, 1) or (N,)"`).
        expected: String,
        /// The actual shape.
        got: Vec<i64>,
    },

    /// The number of scores does not match the number of model outputs.
    #[error(
        "the model has {outputs} output{} but {scores} score{} given (one score per output)",
        if *outputs == 1 { "" } else { "s" },
        if *scores == 1 { " was" } else { "s were" }
    )]
    ScoreCount {
        /// Number of outputs of the model.
        outputs: usize,
        /// Number of scores given.
        scores: usize,
    },

    /// The number of inputs does not match what the model's `forward` takes.
    #[error(
        "the model takes {expected} input{} but {got} {} given{}",
        if expected == "1" { "" } else { "s" },
        if *got == 1 { "was" } else { "were" },
        if declaration.is_empty() { String::new() } else { format!(": {declaration}") }
    )]
    InputCount {
        /// Inputs the model's `forward` declares (as text: libtorch does not
        /// always say the exact number, e.g. `"more than 1"`).
        expected: String,
        /// Inputs given.
        got: usize,
        /// The `forward` declaration as libtorch gives it, without `self`
        /// (`forward(Tensor x, float temperature) -> Tensor`), and what
        /// of it tch-vis cannot pass; empty where libtorch did not say.
        declaration: String,
    },

    /// A value passed to a constructor is not allowed.
    #[error("invalid {what}: {value}")]
    InvalidValue {
        /// The parameter (for example `"regression target"`).
        what: &'static str,
        /// The rejected value, as text.
        value: String,
    },

    /// A score function failed; wraps the score's error with its position.
    #[error("score {index} ({name}) on output {index}: {source}")]
    Score {
        /// Index of the output (and of the score).
        index: usize,
        /// The score's name.
        name: String,
        /// What went wrong.
        #[source]
        source: Box<Error>,
    },

    /// A model file could not be loaded.
    #[error("cannot load TorchScript model {}: {}", path.display(), first_line(.source))]
    ModelLoad {
        /// The model file.
        path: PathBuf,
        /// Why.
        #[source]
        source: tch::TchError,
    },

    /// A model file of another kind than TorchScript: a `torch.save`
    /// checkpoint, a `torch.export` archive, ONNX, safetensors, Keras, or a
    /// JSON file (a sidecar).
    #[error(
        "{} is {format}, not a TorchScript archive: tch-vis runs TorchScript models (in PyTorch, torch.jit.script(model) or torch.jit.trace(model, example_input), then .save(\"model.pt\"))",
        path.display()
    )]
    NotTorchScript {
        /// The model file.
        path: PathBuf,
        /// What it is instead.
        format: &'static str,
    },

    /// The model follows neither form of the CAM convention: it lacks the
    /// methods `forward_features(x)` (feature maps `(N, K, h, w)`) and
    /// `forward_head(a)` (the outputs from those maps), and its `forward`
    /// does not return a dict with the feature maps under `"features"`.
    #[error(
        "model {} cannot give class activation maps: it has no {} method, and its forward does not return a dict with the feature maps under \"features\" (export one with scripts/export_cam_model.py)",
        path.display(),
        missing.join(" or ")
    )]
    NotCamModel {
        /// The model file.
        path: PathBuf,
        /// The missing methods (`"forward_features"`, `"forward_head"`).
        missing: Vec<&'static str>,
    },

    /// The model returned something that is not a tensor (or a tuple, list
    /// or dict of tensors).
    #[error(
        "unsupported model output: {kind} (expected tensors, or tuples, lists or dicts of tensors)"
    )]
    UnsupportedOutput {
        /// What was returned (for example `"String"`).
        kind: String,
    },

    /// CUDA was asked for but is not available.
    #[error("CUDA was requested ({requested}) but is not available on this machine")]
    CudaUnavailable {
        /// The device asked for, as text.
        requested: String,
    },

    /// A CUDA device index past the number of devices.
    #[error("CUDA device {index} was requested but only {count} CUDA devices are available")]
    CudaDeviceOutOfRange {
        /// Index asked for.
        index: usize,
        /// Devices present.
        count: usize,
    },

    /// A device specification that cannot be parsed.
    #[error("invalid device {0:?} (expected auto, cpu, cuda or cuda:N)")]
    DeviceSpec(String),

    /// A score specification that cannot be parsed.
    #[error("invalid score {spec:?}: {reason}")]
    ScoreSpec {
        /// The specification given.
        spec: String,
        /// Why it was rejected.
        reason: String,
    },

    /// An image could not be read or decoded.
    #[error("cannot decode image {}: {reason}", path.display())]
    Image {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },

    /// An image could not be encoded (a heatmap PNG given pixels that do
    /// not fit its size).
    #[error("cannot encode {what}: {reason}")]
    Encode {
        /// What was being encoded (`"a heatmap PNG"`).
        what: &'static str,
        /// Why.
        reason: String,
    },

    /// A model sidecar (`M.json`) is missing or invalid.
    #[error("invalid model sidecar {}: {reason}", path.display())]
    Sidecar {
        /// The sidecar file.
        path: PathBuf,
        /// Why.
        reason: String,
    },

    /// A file-system operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The model or a method failed on the probe input run before the
    /// first image of a batch job.
    #[error("{what}: {source}")]
    Probe {
        /// What was probed.
        what: String,
        /// The failure.
        #[source]
        source: Box<Error>,
    },

    /// An output folder holds results that do not fit this run.
    #[error("{}: {reason}", path.display())]
    OutputMismatch {
        /// The file or folder.
        path: PathBuf,
        /// What does not fit, and what to do.
        reason: String,
    },

    /// An error with what was being done when it happened.
    #[error("{context}: {source}")]
    Context {
        /// What was being done.
        context: String,
        /// The failure.
        #[source]
        source: Box<Error>,
    },

    /// A batch run stopped because its cancel flag was raised
    /// ([`crate::batch::Engine::cancel_on`]): the images handed to the sink
    /// before are done, the rest are not.
    #[error("cancelled; a rerun does the rest")]
    Cancelled,

    /// A broken invariant inside tch-vis (a bug).
    #[error("internal error: {what}")]
    Internal {
        /// What went wrong.
        what: String,
    },

    /// An error raised inside libtorch.
    #[error("libtorch: {}", first_line(.0))]
    Torch(#[from] tch::TchError),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The first line of a libtorch message, without the C++ frames that follow.
fn first_line(e: &tch::TchError) -> String {
    let mut line = match e {
        tch::TchError::Torch(msg) => message_line(msg),
        other => message_line(&other.to_string()),
    };
    // libtorch's advice after a file that is no zip archive at all (an
    // image, a text file) speaks of checkpoints and miniz.
    if let Some(cut) = line.find(". This is an internal miniz error") {
        line.truncate(cut);
    }
    line
}

/// The first non-empty line of an error message, cut before libtorch's
/// `(Exception raised from ...` and the C++ frames that follow it: what
/// tch-vis prints for any error. For an error raised inside a TorchScript
/// method, whose first line only says so, the line that names the error
/// (`RuntimeError: ...`, after the traceback).
///
/// ```
/// let text = "shape mismatch (Exception raised from f at a.cpp:1)\nframe #0: g";
/// assert_eq!(tch_vis::message_line(text), "shape mismatch");
/// let text = "The following operation failed in the TorchScript interpreter.\n\
///             Traceback of TorchScript (most recent call last):\n  x = f(y)\n\
///             RuntimeError: expected 2 dims\n";
/// assert_eq!(
///     tch_vis::message_line(text),
///     "TorchScript: RuntimeError: expected 2 dims"
/// );
/// ```
pub fn message_line(text: &str) -> String {
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("unknown error");
    if first.starts_with("The following operation failed in the TorchScript interpreter") {
        if let Some(named) = text.lines().rev().map(str::trim).find(|l| error_name(l)) {
            return format!("TorchScript: {}", cut_frames(named));
        }
    }
    cut_frames(first)
}

fn cut_frames(line: &str) -> String {
    line.split(" (Exception raised from")
        .next()
        .unwrap_or(line)
        .trim_end()
        .to_string()
}

/// Whether a line starts as Python names an exception (`RuntimeError: ...`).
fn error_name(line: &str) -> bool {
    line.split_once(": ").is_some_and(|(name, _)| {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
            && (name.ends_with("Error") || name.ends_with("Exception"))
    })
}

impl Error {
    /// The error inside the wrappers that say where it happened
    /// ([`Error::Score`]: which score; [`Error::Context`]: what was being
    /// done): the typed cause to match on. A class index out of range,
    /// found while [`crate::Model::gradients`] evaluated score 0, is an
    /// `Error::Score` whose root is [`Error::IndexOutOfRange`].
    ///
    /// ```
    /// use tch_vis::Error;
    /// let e = Error::Score {
    ///     index: 0,
    ///     name: "categorical:10".into(),
    ///     source: Box::new(Error::IndexOutOfRange { index: 10, num_classes: 10 }),
    /// };
    /// assert!(matches!(e.root(), Error::IndexOutOfRange { index: 10, .. }));
    /// ```
    pub fn root(&self) -> &Error {
        match self {
            Error::Score { source, .. } | Error::Context { source, .. } => source.root(),
            other => other,
        }
    }

    /// A one-line description, free of libtorch's C++ stack frames.
    pub fn summary(&self) -> String {
        let text = self.to_string();
        text.lines().next().unwrap_or_default().to_string()
    }

    /// Wraps the error with what was being done.
    pub fn context(self, context: impl Into<String>) -> Self {
        Error::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }

    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn shape(what: impl Into<String>, expected: impl Into<String>, got: &[i64]) -> Self {
        Error::Shape {
            what: what.into(),
            expected: expected.into(),
            got: got.to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_errors_keep_only_the_first_line() {
        let e = Error::Torch(tch::TchError::Torch(
            "shape mismatch (Exception raised from foo at bar.cpp:1)\nframe #0: baz".into(),
        ));
        assert_eq!(e.to_string(), "libtorch: shape mismatch");
    }

    #[test]
    fn messages_name_both_sides() {
        let e = Error::IndexOutOfRange {
            index: 10,
            num_classes: 10,
        };
        assert_eq!(
            e.to_string(),
            "class index 10 is out of range for an output with 10 classes"
        );
        let e = Error::IndexOutOfRange {
            index: 3,
            num_classes: 1,
        };
        assert_eq!(
            e.to_string(),
            "class index 3 is out of range for an output with 1 class (an (N, 1) output: a binary or regression score fits it)"
        );
    }
}
