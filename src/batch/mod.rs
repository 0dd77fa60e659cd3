//! Batch jobs over many images: the engine behind the `tch-vis` command,
//! for Rust programs too.
//!
//! An [`Engine`] runs a [`Method`] (what to compute for a batch: scores,
//! saliency, a CAM, Integrated Gradients, or your own) over a list of input
//! files and hands every image's results to a [`Sink`] (where they go: the
//! command line's output folder, [`FolderSink`], or your own — a JSON-lines
//! file, a database). The library never prints: progress goes to a
//! callback.
//!
//! ```text
//!  producer thread              compute (the calling thread)   writer threads        collector thread
//!  rayon: read+decode+resize,   Method on a padded batch,  ──► Sink::image (files, ──► progress callback,
//!  each image into its row  ──► results back to the CPU        rows), all cores        failures, counts
//!  of the batch (channel, 2)    (bounded channel)
//! ```
//!
//! On CUDA the batch is page-locked (pinned) host memory uploaded
//! asynchronously — for a torchvision recipe the crops' bytes, normalised
//! on the GPU — and a batch's results come back into pinned memory while
//! the GPU runs the next batch.
//!
//! Memory is bounded by the channel capacities, whatever the number of
//! inputs. Every model call has exactly `batch_size` rows: a short batch is
//! padded with zero images whose results are dropped, so an image's results
//! do not depend on which images share its batch, and a resumed or sharded
//! run gives the same bytes as one uninterrupted run.
//!
//! ```no_run
//! use tch::Device;
//! use tch_vis::batch::{Engine, FolderSink, SaliencyMethod};
//! use tch_vis::preprocess::Sidecar;
//! use tch_vis::scores::ScoreSpec;
//! use tch_vis::serde_json::json;
//! use tch_vis::{io, Model};
//! # fn main() -> tch_vis::Result<()> {
//! let model = Model::load("models/digits_cnn.pt", Device::Cpu)?;
//! let sidecar = Sidecar::for_model("models/digits_cnn.pt")?;
//! let method = SaliencyMethod::new(&[ScoreSpec::Predicted])?;
//! let engine = Engine::new(&model, sidecar.clone(), &method).batch_size(16);
//! let layout = engine.prepare()?; // every check before the first image
//! let sink = FolderSink::open("out/maps", &layout, &method, &sidecar, false)?
//!     // What the maps depend on: a rerun with other values is refused.
//!     .settings(json!({"model": "digits_cnn", "score": "predicted"}), None)?;
//! let inputs = io::walk("examples/images".as_ref(), &[])?;
//! let inputs_found = inputs.len();
//! let todo: Vec<_> = inputs.into_iter().filter(|e| !sink.is_done(&e.rel)).collect();
//! sink.begin()?; // after every check, before the first image
//! let summary = engine.run(&todo, &sink)?;
//! // scores.csv and report.json (rows stay in a journal until then), with
//! // this run's figures as the command line reports them.
//! let failed: Vec<_> = summary
//!     .failed
//!     .iter()
//!     .map(|(path, error)| json!({"path": path, "error": error}))
//!     .collect();
//! sink.finish(json!({
//!     "processed": summary.processed,
//!     "skipped": inputs_found - todo.len(),
//!     "failed": failed,
//!     "seconds": summary.seconds,
//! }))?;
//! if let Some(e) = summary.fatal {
//!     return Err(e);
//! }
//! # Ok(()) }
//! ```

mod cuda_rt;
mod engine;
mod folder;
mod methods;
mod table;

pub use engine::{
    compute_threads, huge_pages_pay, passive_openmp_pays, restart_with_passive_openmp, tune_malloc,
    Engine, Layout, Progress, Summary, Timings, MAX_BATCH_SIZE,
};
pub use folder::{Finished, FolderSink, Merged, JOURNAL_DIR};
pub use methods::{CamMapMethod, IgBaseline, IgMethod, SaliencyMethod, ScoresMethod};

use tch::Tensor;

use crate::error::Result;
use crate::model::Model;

/// One array of a batch's results, `(N, ...)` with `N` the padded batch.
#[derive(Debug)]
pub struct BatchArray {
    /// Its name: the file suffix in a [`FolderSink`] (`saliency` →
    /// `REL.saliency.npy`).
    pub name: String,
    /// The values, one row per image of the batch.
    pub values: Tensor,
    /// For arrays that are also shown as a heatmap (`REL.NAME.png`): an
    /// `(N, H, W)` map in `[0, 1]` at the model's input size.
    pub heat: Option<Tensor>,
}

/// What a [`Method`] computes for one batch.
#[derive(Debug)]
pub struct BatchResult {
    /// One `[N]` tensor per model output: that output's score.
    pub scores: Vec<Tensor>,
    /// One entry per model output: the class each image's score took, for
    /// class scores (categorical, predicted).
    pub classes: Vec<Option<Vec<usize>>>,
    /// Arrays to keep per image (maps, gradients, attributions).
    pub arrays: Vec<BatchArray>,
    /// Named per-image values (`[N]` each) for the table after the scores
    /// and classes, such as Integrated Gradients' convergence delta.
    pub columns: Vec<(String, Tensor)>,
}

/// What an engine computes for each batch: the seam where saliency, the
/// CAMs and Integrated Gradients plug in.
///
/// `compute` gets the padded batch `x` (`(B, C, H, W)` on the model's
/// device) and one noise key per row (a stable hash of each image's
/// relative path, never 0; 0 for the padding rows, which come last), and
/// returns results with `B` rows. A method may skip the padding rows' work
/// (Score-CAM does); their results are dropped. The memory of `x` serves
/// a later batch once the results are handed out (unless a result is a
/// view of it): a method that keeps anything of `x` past the call keeps a
/// copy.
pub trait Method: Sync {
    /// The method's name, for reports (`"saliency"`).
    fn name(&self) -> &str;

    /// The arrays it returns per image: `(name, has a heatmap)`. A
    /// [`FolderSink`] writes `REL.NAME.npy`, and `REL.NAME.png` for those
    /// with a heatmap, and treats an image as done when all exist.
    fn arrays(&self) -> Vec<(String, bool)>;

    /// Computes one batch.
    ///
    /// # Errors
    /// Any error of the model or the scores; the engine stops the run.
    fn compute(&self, model: &Model, x: &Tensor, keys: &[u64]) -> Result<BatchResult>;

    /// What [`Engine::prepare`] runs on its zero probe input to
    /// learn the result's layout (outputs, class columns, value columns)
    /// and, on CUDA, that a batch fits in memory. The default is
    /// [`Method::compute`]; a method whose cost does not scale that way
    /// (Score-CAM: one forward pass per channel) may run a cheaper stand-in
    /// with the same layout.
    ///
    /// # Errors
    /// As [`Method::compute`].
    fn probe(&self, model: &Model, x: &Tensor, keys: &[u64]) -> Result<BatchResult> {
        self.compute(model, x, keys)
    }

    /// Checks, before the first image, that the method fits the model,
    /// given a probe input `x` of one zero image and the model's outputs
    /// on it. The default accepts everything; [`Engine::prepare`] then
    /// runs [`Method::compute`] on the probe anyway.
    ///
    /// # Errors
    /// Whatever does not fit, as a typed error.
    fn check(&self, model: &Model, x: &Tensor, outputs: &[Tensor]) -> Result<()> {
        let _ = (model, x, outputs);
        Ok(())
    }

    /// Whether the results depend on `x` only through the model's own
    /// conversion of its inputs to the model's [`Precision`](crate::Precision)
    /// (they enter the model as they are, with no noise, mask or path made
    /// of them in float32 first). For such a method, a CUDA engine whose
    /// model computes in fp16 or bf16 uploads each batch already rounded
    /// to that precision (half the bytes of float32) and widens it on the
    /// device: the model sees the same bits. The default is `false`.
    fn input_through_model_only(&self) -> bool {
        false
    }
}

/// One image's results, as a [`Sink`] receives them (on the CPU).
#[derive(Debug)]
pub struct ImageResult {
    /// The input's relative path (`/`-joined).
    pub rel: String,
    /// The input file.
    pub path: std::path::PathBuf,
    /// One score per model output.
    pub scores: Vec<f32>,
    /// One entry per model output: the class taken, for class scores.
    pub classes: Vec<Option<usize>>,
    /// The arrays of the method, in [`Method::arrays`] order.
    pub arrays: Vec<ImageArray>,
    /// The method's named per-image values ([`BatchResult::columns`]).
    pub columns: Vec<(String, f32)>,
    /// The resized image as the model saw it before normalisation (for
    /// overlays): the crop's bytes for the torchvision recipe, `[0, 1]`
    /// float planes for the plain one.
    pub image: crate::preprocess::InputImage,
    /// The decoded image's `(width, height)`.
    pub original_size: (u32, u32),
    /// The decoded image itself, when the engine's preprocessor keeps it
    /// ([`crate::preprocess::Preprocessor::keep_original`]) and it takes at
    /// most an eighth of the preprocessor's allocation limit as 8-bit RGB
    /// (64 MiB by default): larger ones are not held through the batch
    /// (`None`; decode `path` again for them).
    pub original: Option<image::RgbImage>,
}

/// One array of one image.
#[derive(Debug)]
pub struct ImageArray {
    /// Its name (see [`BatchArray::name`]).
    pub name: String,
    /// The values (one image's slice of [`BatchArray::values`]).
    pub values: Tensor,
    /// The heatmap `(H, W)` in `[0, 1]`, if the array has one.
    pub heat: Option<Tensor>,
}

/// Where an engine's per-image results go. Called from several writer
/// threads at once.
pub trait Sink: Sync {
    /// One image is done: keep its results. An error stops the run.
    ///
    /// # Errors
    /// Whatever keeping the results failed with (a full disk, ...).
    fn image(&self, result: ImageResult) -> Result<()>;

    /// An input could not be read or decoded; the run goes on.
    ///
    /// # Errors
    /// Whatever recording the failure failed with; it stops the run.
    fn failed(&self, rel: &str, error: &str) -> Result<()> {
        let _ = (rel, error);
        Ok(())
    }
}
