//! # tch-vis
//!
//! The *scores* of [tf-keras-vis] for PyTorch models, through [`tch`]
//! (Rust bindings to libtorch). A score says *what* to explain in a model's
//! output — class 20 of a classifier, the "true" side of a binary classifier,
//! "increase the value" of a regressor. tch-vis evaluates scores on
//! [`tch::Tensor`] with autograd, loads TorchScript models exported from
//! PyTorch, and returns the scores and their gradients with respect to the
//! inputs, on CPU or CUDA.
//!
//! | module | what |
//! |---|---|
//! | [`scores`] | the [`Score`](scores::Score) trait and the tf-keras-vis scores, plus predicted, segmentation and contrastive scores |
//! | [`Model`] | a TorchScript model: load, forward, [`gradients`](Model::gradients) |
//! | [`saliency`] | vanilla saliency and SmoothGrad maps |
//! | [`batch`] | batch jobs over image files: engine, methods, output folder |
//! | [`cam`] | class activation maps: Grad-CAM, Grad-CAM++, Layer-CAM, Score-CAM, Faster-Score-CAM |
//! | [`integrated_gradients`] | Integrated Gradients attributions, with captum's integration rules |
//! | [`maximize`] | activation maximization: the input a score likes best |
//! | [`preprocess`] | the model sidecar (`M.json`) and image decoding into model inputs |
//! | [`heatmap`] | colour maps and overlays for saliency maps |
//! | [`gallery`] | a static HTML gallery of a run's maps, scores and failures |
//! | [`DeviceSpec`] | `auto`, `cpu`, `cuda`, `cuda:N` |
//!
//! ```no_run
//! use tch::{Device, Kind, Tensor};
//! use tch_vis::Model;
//! use tch_vis::scores::{CategoricalScore, Score};
//! # fn main() -> tch_vis::Result<()> {
//! let model = Model::load("models/digits_cnn.pt", Device::cuda_if_available())?;
//! let x = Tensor::randn([8, 1, 32, 32], (Kind::Float, Device::Cpu));
//! let outputs = model.forward(&[x.shallow_clone()])?; // no graph
//! let score = CategoricalScore::new(3)?;              // class 3 of every sample
//! let values = score.score(&outputs[0])?;             // [8]
//! let g = model.gradients(&[x], &[&score as &dyn Score])?;
//! println!("{:?} {:?}", values.size(), g.inputs[0].size()); // [8] [8, 1, 32, 32]
//! # Ok(()) }
//! ```
//!
//! [tf-keras-vis]: https://github.com/keisen/tf-keras-vis
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

/// `$avx2`, a call of an `unsafe` function compiled for AVX2
/// (`#[target_feature(enable = "avx2")]`) whose only precondition is the
/// CPU's support, where the CPU has AVX2 (and `where $when` holds);
/// `$other` elsewhere (the crate's baseline is SSE2).
macro_rules! with_avx2 {
    ($(where $when:expr,)? $avx2:expr, else $other:expr $(,)?) => {{
        #[cfg(target_arch = "x86_64")]
        let result = if $($when &&)? std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above), the
            // function's only precondition.
            unsafe {
                $avx2
            }
        } else {
            $other
        };
        #[cfg(not(target_arch = "x86_64"))]
        let result = $other;
        result
    }};
}

mod aa_resize;
pub mod batch;
pub mod cam;
mod deflate;
mod device;
mod error;
pub mod gallery;
mod grad;
pub mod heatmap;
pub mod integrated_gradients;
pub mod io;
mod ivalue;
mod layouts;
pub mod maximize;
mod model;
pub mod preprocess;
pub mod saliency;
pub mod scores;

/// The README's examples, compiled as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// `serde_json`, whose `Value` [`batch::FolderSink`] takes (its settings
/// and report), re-exported so that a batch script needs no dependency of
/// its own to build one.
pub use serde_json;

pub use device::{device_name, DeviceSpec};
pub use error::{message_line, Error, Result};
pub use model::{CamForm, Gradients, Model, Precision};
