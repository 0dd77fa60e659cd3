//! Class activation maps: Grad-CAM, Grad-CAM++, Layer-CAM, Score-CAM and
//! Faster-Score-CAM.
//!
//! A model gives CAMs when its TorchScript file has two more methods beside
//! `forward`: `forward_features(x)`, the feature maps `A` `(N, K, h, w)` of
//! the target layer, and `forward_head(a)`, the outputs computed from them,
//! with `forward(x) == forward_head(forward_features(x))`.
//! `scripts/export_cam_model.py` writes such a model from a torchvision
//! classifier or from a TorchScript file with a known split; see
//! [`Model::check_cam`].
//!
//! A second form ([`CamForm::Dict`]) reaches any layer, also one inside a
//! residual block whose outputs depend on the input by other paths too
//! (which no split into two methods can express): `forward(x)` returns a
//! dict with `A` under `"features"` ([`FEATURES_KEY`]) and the outputs as
//! its other entries, in order (`scripts/export_cam_model.py --layer NODE`
//! writes one from a torchvision model with its feature extractor).
//! [`Model::cam_form`] tells the forms apart.
//!
//! One engine ([`Cam`]) runs every method. For the methods form the
//! features are computed without a graph, `A` becomes a leaf that requires
//! grad, the head runs and the scores (one per model output, summed) are
//! backpropagated to `A` only — never through the trunk. For the dict form
//! the forward pass records a graph from the input, and the scores are
//! backpropagated to `A` only (autograd runs the part of the graph between
//! them; `A` must not be written in place after it is taken). Each method
//! then turns `A` and its gradient `g = ∂S/∂A` into a map `L` `(N, h, w)`:
//!
//! | method | `L` (before ReLU) | tf-keras-vis differs by |
//! |---|---|---|
//! | [`GradCam`](CamMethod::GradCam) | `Σ_k w_k A_k`, `w_k = mean_ij g_kij` | — (same weights) |
//! | [`GradCamPlusPlus`](CamMethod::GradCamPlusPlus) | `Σ_k w_k A_k`, `w_k = Σ_ij α_kij relu(g_kij)`, `α = g² / (2g² + (Σ_ij A_k) g³ + 1e-6)`, `α = 0` where `g = 0` | `α` divided by its spatial sum, `+1` instead of `1e-6` where `g² = 0` ([`AlphaNorm::Spatial`]); its `exp(score)` factor is a positive constant per image and cancels in the scaling |
//! | [`LayerCam`](CamMethod::LayerCam) | `Σ_k relu(g_k) ⊙ A_k` | — |
//! | [`ScoreCam`](CamMethod::ScoreCam) | `Σ_k w_k A_k`, `w = softmax_k(s_k)`, `s_k` = score of `x ⊙ M_k`, `M_k = (up(A_k) − min) / (max − min + 1e-8)`, `up` bilinear with corners aligned | `s_k` scored on the softmax over classes of the outputs, `w = s` (no softmax over channels), `ε = 1e-7` ([`ScoreCamWeights::ClassSoftmax`]) |
//! | [`FasterScoreCam`](CamMethod::FasterScoreCam) | Score-CAM over the `max_n` channels of largest spatial variance of each image (others weigh 0) | tf-keras-vis keeps the union of every image's top channels for the whole batch |
//!
//! The final map, as pytorch-grad-cam 1.5.7 makes it:
//! `relu(L)`, then per image `(m − min) / (max(m − min) + 1e-7)`, bilinear
//! resize to the input's `H × W` with half-pixel centres (OpenCV's
//! `INTER_LINEAR`, PyTorch's `align_corners=False`), then ReLU and the same
//! scaling again, so each map lies in `[0, 1)`. tf-keras-vis resizes with
//! corners aligned (`scipy.ndimage.zoom(order=1)`): [`CamResize::AlignCorners`].
//! [`Cam::tf_keras_vis`] switches all three differences at once.
//!
//! Scores that pick their class from the output (such as
//! [`PredictedScore`](crate::scores::PredictedScore)) are fixed on the
//! clean output first, so Score-CAM's masked inputs are scored for the
//! same class. A multi-output model takes one score per output; the
//! objective is their sum, as in [`Model::gradients`].
//!
//! ```no_run
//! use tch::{Device, Kind, Tensor};
//! use tch_vis::cam::{Cam, CamMethod};
//! use tch_vis::scores::{PredictedScore, Score};
//! use tch_vis::Model;
//! # fn main() -> tch_vis::Result<()> {
//! let model = Model::load("models/digits_cnn.pt", Device::Cpu)?;
//! Cam::check(&model)?; // before any image: has forward_features / forward_head
//! let x = Tensor::randn([4, 1, 32, 32], (Kind::Float, Device::Cpu));
//! let score = PredictedScore::new();
//! let cams = Cam::new(&model, CamMethod::GradCamPlusPlus).compute(&x, &[&score as &dyn Score])?;
//! assert_eq!(cams.maps.size(), vec![4, 32, 32]);
//! println!("classes {:?}", cams.classes[0]);
//! # Ok(()) }
//! ```

use std::fmt;
use std::str::FromStr;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::grad::GradMode;
pub use crate::model::{CamForm, FEATURES_KEY};
use crate::model::{Model, Precision};
use crate::scores::{self, Score};

mod gradcam;
mod gradcam_plus_plus;
mod layercam;
mod scorecam;

/// A CAM method. `FromStr` takes the command line's names:
/// `gradcam`, `gradcam++`, `layercam`, `scorecam`, `fasterscorecam`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CamMethod {
    /// Grad-CAM (Selvaraju et al., 2017): channel weights = mean gradient.
    #[doc(alias = "Gradcam")]
    GradCam,
    /// Grad-CAM++ (Chattopadhyay et al., 2018): weights from positive
    /// gradients with the α of eq. 19.
    #[doc(alias = "GradcamPlusPlus")]
    GradCamPlusPlus,
    /// Layer-CAM (Jiang et al., 2021): element-wise positive gradients.
    #[doc(alias = "Layercam")]
    LayerCam,
    /// Score-CAM (Wang et al., 2020): weights from the scores of the input
    /// masked by each upsampled channel; no gradient.
    #[doc(alias = "Scorecam")]
    ScoreCam,
    /// Score-CAM over the [`Cam::max_n`] channels of largest spatial
    /// variance of each image (tf-keras-vis's `max_N`).
    FasterScoreCam,
}

impl CamMethod {
    /// Every method, in the order of the table above.
    pub const ALL: [CamMethod; 5] = [
        CamMethod::GradCam,
        CamMethod::GradCamPlusPlus,
        CamMethod::LayerCam,
        CamMethod::ScoreCam,
        CamMethod::FasterScoreCam,
    ];

    /// The command line's name (`gradcam`, `gradcam++`, ...).
    pub fn name(self) -> &'static str {
        match self {
            CamMethod::GradCam => "gradcam",
            CamMethod::GradCamPlusPlus => "gradcam++",
            CamMethod::LayerCam => "layercam",
            CamMethod::ScoreCam => "scorecam",
            CamMethod::FasterScoreCam => "fasterscorecam",
        }
    }

    /// Whether the method backpropagates to the feature maps.
    pub fn uses_gradients(self) -> bool {
        matches!(
            self,
            CamMethod::GradCam | CamMethod::GradCamPlusPlus | CamMethod::LayerCam
        )
    }
}

impl FromStr for CamMethod {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let key: String = s
            .trim()
            .to_ascii_lowercase()
            .chars()
            .filter(|c| !matches!(c, '-' | '_'))
            .collect();
        match key.as_str() {
            "gradcam" => Ok(CamMethod::GradCam),
            "gradcam++" | "gradcamplusplus" | "gradcampp" => Ok(CamMethod::GradCamPlusPlus),
            "layercam" => Ok(CamMethod::LayerCam),
            "scorecam" => Ok(CamMethod::ScoreCam),
            "fasterscorecam" => Ok(CamMethod::FasterScoreCam),
            _ => Err(Error::InvalidValue {
                what:
                    "CAM method (expected gradcam, gradcam++, layercam, scorecam or fasterscorecam)",
                value: s.to_string(),
            }),
        }
    }
}

impl fmt::Display for CamMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the map is resized from the feature size to the input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CamResize {
    /// Bilinear with half-pixel centres (`align_corners=False`, OpenCV's
    /// `INTER_LINEAR`), as pytorch-grad-cam (the default).
    #[default]
    HalfPixel,
    /// Bilinear with the corner pixels aligned (`align_corners=True`,
    /// `scipy.ndimage.zoom(order=1)`), as tf-keras-vis.
    AlignCorners,
}

/// The α of Grad-CAM++.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AlphaNorm {
    /// `α = g² / (2g² + (Σ A) g³ + 1e-6)`, zero where `g = 0`, as
    /// pytorch-grad-cam (the default).
    #[default]
    None,
    /// `α` divided by its spatial sum (`+1` where a denominator is 0), as
    /// tf-keras-vis.
    Spatial,
}

/// How Score-CAM turns the scores of masked inputs into channel weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScoreCamWeights {
    /// Scores of the model's outputs, then a softmax over channels; masks
    /// scaled with `ε = 1e-8`, as pytorch-grad-cam (the default).
    #[default]
    ChannelSoftmax,
    /// Scores of the softmax over classes (dim 1) of the outputs, used as
    /// weights directly; masks scaled with `ε = 1e-7`, as tf-keras-vis.
    ClassSoftmax,
}

/// Class activation maps and scores, as returned by [`Cam::compute`]. All
/// tensors are detached, float32, on the device of the input given.
#[derive(Debug)]
pub struct CamMaps {
    /// The maps at the input's size, `(N, H, W)`, each scaled to `[0, 1)`.
    pub maps: Tensor,
    /// The maps at the feature size before any scaling, `(N, h, w)`:
    /// `relu(L)` of the method's formula.
    pub raw: Tensor,
    /// One `[N]` tensor per model output: its score on the input as given.
    pub scores: Vec<Tensor>,
    /// One entry per model output: the class each image was explained for
    /// (for class scores such as categorical and predicted), or `None`.
    pub classes: Vec<Option<Vec<usize>>>,
}

/// Class activation maps on a [`Model`] that follows the CAM convention.
///
/// Options keep tf-keras-vis's names where the meaning is the same
/// (`max_n` for `max_N`); see the [module documentation](self) for every
/// formula.
#[derive(Debug, Clone, Copy)]
pub struct Cam<'a> {
    model: &'a Model,
    method: CamMethod,
    score_cam_batch: usize,
    max_n: usize,
    resize: CamResize,
    alpha: AlphaNorm,
    score_cam_weights: ScoreCamWeights,
    images: Option<usize>,
}

impl<'a> Cam<'a> {
    /// `method` on `model`, with pytorch-grad-cam's conventions, Score-CAM
    /// batches of 64 masked inputs and `max_n` 10.
    pub fn new(model: &'a Model, method: CamMethod) -> Self {
        Cam {
            model,
            method,
            score_cam_batch: 64,
            max_n: 10,
            resize: CamResize::HalfPixel,
            alpha: AlphaNorm::None,
            score_cam_weights: ScoreCamWeights::ChannelSoftmax,
            images: None,
        }
    }

    /// Only the first `n` rows of the input are images; the rest pad a
    /// fixed-size batch, and Score-CAM skips them (their maps are zero).
    pub(crate) fn images(mut self, n: usize) -> Self {
        self.images = Some(n);
        self
    }

    /// Checks, before any image, that `model` has the methods
    /// `forward_features` and `forward_head` ([`CamForm::Methods`]), without
    /// running it. A model of the dict form fails this check: use
    /// [`Model::cam_form`] on an input to accept both forms.
    ///
    /// # Errors
    /// [`Error::NotCamModel`] naming the missing methods.
    pub fn check(model: &Model) -> Result<()> {
        model.check_cam()
    }

    /// The method.
    pub fn method(&self) -> CamMethod {
        self.method
    }

    /// Score-CAM and Faster-Score-CAM: at most `n` masked inputs per forward
    /// pass, all of one image (as pytorch-grad-cam). Memory is bounded by it
    /// whatever the number of channels; the maps do not depend on it.
    pub fn score_cam_batch(mut self, n: usize) -> Self {
        self.score_cam_batch = n;
        self
    }

    /// Faster-Score-CAM: the number of channels kept per image (those of
    /// largest spatial variance). At least the number of channels gives
    /// Score-CAM.
    pub fn max_n(mut self, n: usize) -> Self {
        self.max_n = n;
        self
    }

    /// How the map is resized to the input size.
    pub fn resize(mut self, resize: CamResize) -> Self {
        self.resize = resize;
        self
    }

    /// The α of Grad-CAM++.
    pub fn alpha(mut self, alpha: AlphaNorm) -> Self {
        self.alpha = alpha;
        self
    }

    /// How Score-CAM weighs channels.
    pub fn score_cam_weights(mut self, weights: ScoreCamWeights) -> Self {
        self.score_cam_weights = weights;
        self
    }

    /// tf-keras-vis's conventions: [`CamResize::AlignCorners`],
    /// [`AlphaNorm::Spatial`] and [`ScoreCamWeights::ClassSoftmax`].
    pub fn tf_keras_vis(self) -> Self {
        self.resize(CamResize::AlignCorners)
            .alpha(AlphaNorm::Spatial)
            .score_cam_weights(ScoreCamWeights::ClassSoftmax)
    }

    /// The maps of the images `x` `(N, C, H, W)` for `scores` (one per
    /// model output). `x` is left untouched.
    ///
    /// # Errors
    /// [`Error::NotCamModel`] for a model without the CAM methods;
    /// [`Error::Shape`] when `x` is not `(N, C, H, W)` or the features are
    /// not `(N, K, h, w)`; [`Error::InvalidValue`] for a zero
    /// `score_cam_batch` or `max_n`; [`Error::ScoreCount`] and
    /// [`Error::Score`] as [`Model::gradients`]; [`Error::Torch`] when
    /// libtorch fails.
    pub fn compute(&self, x: &Tensor, scores: &[&dyn Score]) -> Result<CamMaps> {
        let size = x.size();
        if size.len() != 4 {
            return Err(Error::shape("CAM input", "(N, C, H, W)", &size));
        }
        if self.score_cam_batch == 0 {
            return Err(Error::InvalidValue {
                what: "score-cam batch size (must be at least 1)",
                value: "0".into(),
            });
        }
        if self.method == CamMethod::FasterScoreCam && self.max_n == 0 {
            return Err(Error::InvalidValue {
                what: "max_n (must be at least 1)",
                value: "0".into(),
            });
        }
        let (height, width) = (size[2], size[3]);
        let uses_gradients = self.method.uses_gradients();
        // A graph reaches A only for the gradient methods: from A for the
        // methods form, from the input for the dict form; the backward pass
        // below stops at A either way.
        let _mode = GradMode::set(uses_gradients);
        let (a, outputs) = self.model.cam_pass(x, uses_gradients)?;
        check_count(&outputs, scores)?;
        let af = a.f_detach()?.f_to_kind(Kind::Float)?;
        let (fixed, classes) = fix_scores(&outputs, scores)?;
        let fixed = crate::scores::fixed_or_given(&fixed, scores);
        let values = score_outputs(&outputs, &fixed)?;
        let cam = if uses_gradients {
            let g = gradient(&values, &a)?.f_to_kind(Kind::Float)?;
            match self.method {
                CamMethod::GradCam => gradcam::cam(&af, &g)?,
                CamMethod::GradCamPlusPlus => gradcam_plus_plus::cam(&af, &g, self.alpha)?,
                _ => layercam::cam(&af, &g)?,
            }
        } else {
            let xd = x.f_detach()?.f_to_device(self.model.device())?;
            let plan = scorecam::Plan {
                batch: self.score_cam_batch,
                max_n: (self.method == CamMethod::FasterScoreCam).then_some(self.max_n),
                weights: self.score_cam_weights,
            };
            scorecam::cam(
                self.model,
                &xd,
                &af,
                &fixed,
                plan,
                self.images.unwrap_or(size[0] as usize),
            )?
        };
        let _off = GradMode::set(false);
        let raw = cam.f_relu()?;
        let maps = finish(&raw, height, width, self.resize)?;
        let device = x.device();
        let scores = values
            .iter()
            .map(|v| {
                let v = v.f_detach()?;
                let v = if self.model.precision() == Precision::Fp32 {
                    v
                } else {
                    v.f_to_kind(Kind::Float)?
                };
                Ok(v.f_to_device(device)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CamMaps {
            maps: maps.f_to_device(device)?,
            raw: raw.f_to_device(device)?,
            scores,
            classes,
        })
    }
}

/// One score per output.
fn check_count(outputs: &[Tensor], scores: &[&dyn Score]) -> Result<()> {
    if outputs.len() != scores.len() {
        return Err(Error::ScoreCount {
            outputs: outputs.len(),
            scores: scores.len(),
        });
    }
    Ok(())
}

/// A score fixed on its (clean) output, where the score picks its class
/// from the output.
type Fixed = Option<Box<dyn Score + Send + Sync>>;

/// The class each image is explained for, per output (`None` for scores
/// without classes).
type Classes = Vec<Option<Vec<usize>>>;

/// Each score fixed on its output, and the classes it takes there.
fn fix_scores(outputs: &[Tensor], scores: &[&dyn Score]) -> Result<(Vec<Fixed>, Classes)> {
    let mut fixed = Vec::with_capacity(scores.len());
    let mut classes = Vec::with_capacity(scores.len());
    for (index, (out, score)) in outputs.iter().zip(scores).enumerate() {
        let out = out.f_detach()?;
        let context = |e| Error::Score {
            index,
            name: score.name().to_string(),
            source: Box::new(e),
        };
        fixed.push(score.fixed_on(&out).map_err(context)?);
        classes.push(score.classes(&out).map_err(context)?);
    }
    Ok((fixed, classes))
}

/// Each score on its output, with the output index as context.
pub(crate) fn score_outputs(outputs: &[Tensor], scores: &[&dyn Score]) -> Result<Vec<Tensor>> {
    scores::evaluate_each(outputs, scores)
}

/// d(Σ scores)/d(leaf); zeros when the objective does not depend on it.
fn gradient(values: &[Tensor], leaf: &Tensor) -> Result<Tensor> {
    let mut objective: Option<Tensor> = None;
    for v in values {
        let s = v.f_sum(Kind::Float)?;
        objective = Some(match objective {
            None => s,
            Some(acc) => acc.f_add(&s)?,
        });
    }
    match objective.filter(Tensor::requires_grad) {
        Some(objective) => {
            let mut got = Tensor::f_run_backward(&[&objective], &[leaf], false, false)?;
            match got.pop() {
                Some(g) if g.defined() => Ok(g),
                _ => Ok(leaf.f_zeros_like()?),
            }
        }
        None => Ok(leaf.f_zeros_like()?),
    }
}

/// Per-image `(m − min) / (max(m − min) + 1e-7)` of `(N, h, w)`.
fn scale(m: &Tensor) -> Result<Tensor> {
    let n = m.size()[0];
    let flat = m.f_reshape([n, -1])?;
    let shifted = flat.f_sub(&flat.f_amin(1, true)?)?;
    let top = shifted.f_amax(1, true)?.f_add_scalar(1e-7)?;
    Ok(shifted.f_div(&top)?.f_view_as(m)?)
}

/// Scale, resize to `H × W`, ReLU, scale again: `(N, H, W)`.
fn finish(raw: &Tensor, height: i64, width: i64, resize: CamResize) -> Result<Tensor> {
    let scaled = scale(raw)?;
    let resized = scaled
        .f_unsqueeze(1)?
        .f_upsample_bilinear2d(
            [height, width],
            resize == CamResize::AlignCorners,
            None,
            None,
        )?
        .f_squeeze_dim(1)?;
    scale(&resized.f_relu()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn method_names_round_trip() {
        for m in CamMethod::ALL {
            assert_eq!(m.name().parse::<CamMethod>().unwrap(), m);
        }
        assert_eq!(
            "Grad-CAM++".parse::<CamMethod>().unwrap(),
            CamMethod::GradCamPlusPlus
        );
        let e = "gradcam+".parse::<CamMethod>().unwrap_err();
        assert!(matches!(e, Error::InvalidValue { ref value, .. } if value == "gradcam+"));
    }

    #[test]
    fn scale_maps_each_image_to_unit_range() {
        // Image 0: [1, 3] -> [0, 2 / (2 + 1e-7)] (1 in float32, where
        // 2 + 1e-7 rounds to 2); image 1 is constant -> [0, 0].
        let m = Tensor::from_slice(&[1f32, 3., 5., 5.]).view([2, 1, 2]);
        let s = Vec::<f32>::try_from(scale(&m).unwrap().reshape([-1])).unwrap();
        assert_eq!(s, vec![0.0, 1.0, 0.0, 0.0]);
        // A small range is where the 1e-7 shows: [0, 1e-6] -> [0, 1 / 1.1].
        let m = Tensor::from_slice(&[0f32, 1e-6]).view([1, 1, 2]);
        let s = scale(&m).unwrap().double_value(&[0, 0, 1]);
        assert!((s - 1.0 / 1.1).abs() < 1e-6, "{s}");
    }

    #[test]
    fn resize_conventions_differ_only_inside() {
        // A 1x2 map [0, 1] to 1x4: half-pixel centres give
        // [0, 0.25, 0.75, 1]; aligned corners [0, 1/3, 2/3, 1]; both are
        // then scaled by 1 / (1 + 1e-7) twice (close to 1).
        let raw = Tensor::from_slice(&[0f32, 1.]).view([1, 1, 2]);
        let half = finish(&raw, 1, 4, CamResize::HalfPixel).unwrap();
        let corners = finish(&raw, 1, 4, CamResize::AlignCorners).unwrap();
        let h = Vec::<f32>::try_from(half.reshape([-1]).to_device(Device::Cpu)).unwrap();
        let c = Vec::<f32>::try_from(corners.reshape([-1])).unwrap();
        for (got, want) in h.iter().zip([0.0, 0.25, 0.75, 1.0]) {
            assert!((got - want).abs() < 1e-6, "{h:?}");
        }
        for (got, want) in c.iter().zip([0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0]) {
            assert!((got - want).abs() < 1e-6, "{c:?}");
        }
    }
}
