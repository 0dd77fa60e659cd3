//! Activation maximization: the input that a score likes best (Erhan,
//! Bengio, Courville and Vincent, 2009, "Visualizing Higher-Layer Features
//! of a Deep Network"; Simonyan, Vedaldi and Zisserman, 2013, "Deep Inside
//! Convolutional Networks").
//!
//! Gradient ascent on the input, as tf-keras-vis's `ActivationMaximization`
//! does, with its defaults except where the last column says:
//!
//! | | tch-vis default | tf-keras-vis default |
//! |---|---|---|
//! | seed input | uniform in `[0, 255)`, seeded, per sample | `tf.random.uniform(shape, 0, 255)` |
//! | input modifiers | [`Jitter`](InputModifier::Jitter) 4 px, [`Rotate2D`](InputModifier::Rotate2D) 1°, on a copy the model sees | the same, applied to the input itself |
//! | regularizers | [`TotalVariation2D`](Regularizer::TotalVariation2D) 1.0, [`Norm`](Regularizer::Norm) 0.3, p = 1 | `TotalVariation2D(weight=1.0)`, `Norm(weight=0.3, p=1)` |
//! | steps | 200 | 200 |
//! | optimizer | [`RmsProp`]: lr 1.0, ρ 0.999, ε 1e-7 inside the square root | `tf.optimizers.RMSprop(1.0, 0.999)` |
//! | input range | `(0, 255)`, clipped after every step | `input_range=(0, 255)`, the result clipped |
//!
//! **The variable.** As in tf-keras-vis, the optimised variable `v` holds
//! pixel values in the input range `(low, high)` = `(0, 255)` by default, so
//! that the step size, the jitter and the regularizer weights above mean
//! what they mean there. The image is `v` itself, or `v` upsampled
//! bilinearly when [`ActivationMaximization::resolution`] asks for a coarser
//! variable. The model sees `((image − low) / (high − low) − mean) / std`
//! per channel, with `mean` and `std` from the model's sidecar
//! ([`ActivationMaximization::sidecar`]; 0 and 1 without one).
//! [`Maximized::inputs`] is the final image in the model's input space: fed
//! to the model, it gives [`Maximized::scores`].
//!
//! **Each step**, for steps `0..steps`:
//! 1. each input modifier draws its random change: a jitter one shift
//!    `(dy, dx)` in `[−j, j)` for the whole batch, a rotation one angle in
//!    `[−d, d)` degrees;
//! 2. the model sees the image with those changes; the loss per sample is
//!    `−Σ_k score_k` (of the changed image) `+ Σ_r regularizer_r(image)`, and
//!    its gradient `g` with respect to `v` is taken through the changes and
//!    the upsampling;
//! 3. RMSprop: `ms ← ρ ms + (1 − ρ) g²`, `v ← v − lr · g / √(ms + ε)`, with
//!    `ms` starting at 0;
//! 4. `v` is clipped to the input range.
//!
//! **Where this departs from tf-keras-vis, and why.** tf-keras-vis applies
//! the modifiers to the input itself, so 200 rolls and 200 bilinear
//! rotations accumulate: the image drifts (its jitter draws from `[−4, 4)`
//! average −0.5 px a step) and is resampled 200 times, which blurs it. On
//! the bundled digits classifier the score rose for about 100 steps and
//! then fell as the image moved away under the optimizer, and the result
//! was a flat grey the model did not take for the class. Seeing a modified
//! copy (the model must like the image under every small shift and turn)
//! keeps what the optimizer builds in place. Clipping every step keeps `v`
//! a valid image throughout, so the final clip changes nothing the
//! optimizer relied on. [`ActivationMaximization::accumulate_modifiers`]
//! and [`ActivationMaximization::clip_each_step`] restore tf-keras-vis's
//! behaviour.
//!
//! **The optimizer** is written out on tensors rather than taken from
//! `torch.optim.RMSprop`, because the two differ: TensorFlow's RMSprop
//! kernel (what tf-keras-vis's default runs) divides by `√(ms + ε)`, PyTorch
//! by `√ms + ε`, and PyTorch's defaults are lr 0.01, α 0.99. With ε inside
//! the root, a gradient far below `√ε` (a saturated softmax, a pixel the
//! score does not see) moves `v` by about `g / √ε` instead of being
//! normalised up to a full step, so flat regions are not filled with
//! amplified noise.
//!
//! **Randomness** (the seed input, jitters and angles) comes from a
//! counter-based generator on the CPU keyed by the seed, the sample index
//! and the step: the same seed gives the same result for every batch
//! composition, and on the CPU the same bytes. Where tf-keras-vis shares one
//! seed input across a batch unless one is given, every sample here gets its
//! own.
//!
//! A score that picks its class from the output (the predicted class) is
//! fixed on the seed input's output.

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::grad::GradMode;
use crate::model::Model;
use crate::preprocess::Sidecar;
use crate::saliency::{mix, SplitMix64};
use crate::scores::{self, Score};

/// An input modifier: changes the optimised input before each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InputModifier {
    /// Rolls the height and width axes (wrapping around) by a random
    /// `(dy, dx)`, each drawn from `[−jitter, jitter)`, the same for the whole
    /// batch (tf-keras-vis's `Jitter`). See [`jitter`].
    Jitter {
        /// The largest shift, in pixels.
        jitter: i64,
    },
    /// Rotates the image about its centre by a random angle drawn from
    /// `[−degree, degree)` degrees (tf-keras-vis's `Rotate2D`). See
    /// [`rotate2d`].
    Rotate2D {
        /// The largest angle, in degrees.
        degree: f64,
    },
}

/// A regularizer: a per-sample penalty on the optimised input, added to the
/// loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Regularizer {
    /// `weight × TV(v) / (C·H·W)` with the anisotropic total variation
    /// `TV(v) = Σ |v[c, i+1, j] − v[c, i, j]| + Σ |v[c, i, j+1] − v[c, i, j]|`
    /// (tf-keras-vis's `TotalVariation2D`, over `tf.image.total_variation`).
    TotalVariation2D {
        /// The weight.
        weight: f64,
    },
    /// `weight × ‖v‖_p / (C·H·W)^(1/p)`, the p-norm of each flattened
    /// sample (tf-keras-vis's `Norm`).
    Norm {
        /// The weight.
        weight: f64,
        /// The order of the norm (≥ 1).
        p: f64,
    },
}

impl Regularizer {
    /// The penalty of each sample of `v` (`(N, C, H, W)`), a `[N]` tensor
    /// that keeps `v`'s graph.
    ///
    /// # Errors
    /// [`Error::Shape`] when `v` is not `(N, C, H, W)`;
    /// [`Error::InvalidValue`] for a non-finite weight or `p < 1`.
    pub fn value(&self, v: &Tensor) -> Result<Tensor> {
        let size = v.size();
        let &[n, c, h, w] = size.as_slice() else {
            return Err(Error::shape("input to regularize", "(N, C, H, W)", &size));
        };
        let elements = (c * h * w) as f64;
        match *self {
            Regularizer::TotalVariation2D { weight } => {
                check_finite("total variation weight", weight)?;
                let dy = v
                    .f_narrow(2, 1, h - 1)?
                    .f_sub(&v.f_narrow(2, 0, h - 1)?)?
                    .f_abs()?
                    .f_reshape([n, -1])?
                    .f_sum_dim_intlist(1, false, None::<Kind>)?;
                let dx = v
                    .f_narrow(3, 1, w - 1)?
                    .f_sub(&v.f_narrow(3, 0, w - 1)?)?
                    .f_abs()?
                    .f_reshape([n, -1])?
                    .f_sum_dim_intlist(1, false, None::<Kind>)?;
                Ok(dy.f_add(&dx)?.f_mul_scalar(weight / elements)?)
            }
            Regularizer::Norm { weight, p } => {
                check_finite("norm weight", weight)?;
                if !p.is_finite() || p < 1.0 {
                    return Err(Error::InvalidValue {
                        what: "norm order p (finite, at least 1)",
                        value: p.to_string(),
                    });
                }
                let norm =
                    v.f_reshape([n, -1])?
                        .f_norm_scalaropt_dim(p, [1i64].as_slice(), false)?;
                Ok(norm.f_mul_scalar(weight / elements.powf(1.0 / p))?)
            }
        }
    }
}

fn check_finite(what: &'static str, v: f64) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Error::InvalidValue {
            what,
            value: v.to_string(),
        })
    }
}

/// Rolls `x` (`(N, C, H, W)`) by `dy` rows down and `dx` columns right,
/// wrapping around: `out[.., i, j] = x[.., (i − dy) mod H, (j − dx) mod W]`
/// (`tf.roll` on the spatial axes).
///
/// # Errors
/// [`Error::Shape`] when `x` is not `(N, C, H, W)`.
pub fn jitter(x: &Tensor, dy: i64, dx: i64) -> Result<Tensor> {
    let size = x.size();
    if size.len() != 4 {
        return Err(Error::shape("input to jitter", "(N, C, H, W)", &size));
    }
    Ok(x.f_roll([dy, dx], [2, 3])?)
}

/// Rotates `x` (`(N, C, H, W)`) by `degrees` counter-clockwise as displayed
/// (row 0 at the top), about the centre `((H − 1) / 2, (W − 1) / 2)`,
/// keeping the size: output pixel `(i, j)` takes the bilinear interpolation
/// of `x` at
///
/// ```text
/// col = cos θ (j − cx) − sin θ (i − cy) + cx
/// row = sin θ (j − cx) + cos θ (i − cy) + cy
/// ```
///
/// with positions outside the image reflected about its edges (scipy's
/// `ndimage.rotate(..., reshape=False, order=1, mode="reflect")`, which
/// tf-keras-vis's `Rotate2D` uses).
///
/// # Errors
/// [`Error::Shape`] when `x` is not `(N, C, H, W)`; [`Error::InvalidValue`]
/// for a non-finite angle.
pub fn rotate2d(x: &Tensor, degrees: f64) -> Result<Tensor> {
    let size = x.size();
    let &[n, _, h, w] = size.as_slice() else {
        return Err(Error::shape("input to rotate", "(N, C, H, W)", &size));
    };
    check_finite("rotation angle", degrees)?;
    let (sin, cos) = degrees.to_radians().sin_cos();
    let (cy, cx) = ((h - 1) as f64 / 2.0, (w - 1) as f64 / 2.0);
    let mut grid = Vec::with_capacity((h * w * 2) as usize);
    for i in 0..h {
        for j in 0..w {
            let (dy, dx) = (i as f64 - cy, j as f64 - cx);
            let col = cos * dx - sin * dy + cx;
            let row = sin * dx + cos * dy + cy;
            // grid_sample's coordinates with align_corners = false: pixel
            // centres at (2k + 1) / size − 1, edges at ±1.
            grid.push(((2.0 * col + 1.0) / w as f64 - 1.0) as f32);
            grid.push(((2.0 * row + 1.0) / h as f64 - 1.0) as f32);
        }
    }
    let grid = Tensor::f_from_slice(&grid)?
        .f_view([1, h, w, 2])?
        .f_to_device(x.device())?
        .f_to_kind(x.f_kind()?)?
        .f_expand([n, h, w, 2], false)?;
    // Bilinear (0), reflection padding (2), align_corners = false.
    Ok(x.f_grid_sampler_2d(&grid, 0, 2, false)?)
}

/// RMSprop as TensorFlow's kernel computes it (what tf-keras-vis's default
/// optimizer runs): `ms ← ρ ms + (1 − ρ) g²`, `v ← v − lr · g / √(ms + ε)`,
/// `ms` starting at zero. The default is tf-keras-vis's: lr 1.0, ρ 0.999,
/// ε 1e-7.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmsProp {
    /// The step size (in units of the input range, 0..255 by default).
    pub learning_rate: f64,
    /// The decay of the mean square.
    pub rho: f64,
    /// Added to the mean square inside the square root.
    pub epsilon: f64,
}

impl Default for RmsProp {
    fn default() -> Self {
        RmsProp {
            learning_rate: 1.0,
            rho: 0.999,
            epsilon: 1e-7,
        }
    }
}

impl RmsProp {
    /// One descent step: updates the mean square `ms` and returns the new
    /// `v`.
    ///
    /// # Errors
    /// [`Error::Torch`] if an op fails (mismatched shapes).
    pub fn step(&self, v: &Tensor, grad: &Tensor, ms: &mut Tensor) -> Result<Tensor> {
        let new_ms = ms
            .f_mul_scalar(self.rho)?
            .f_add(&grad.f_square()?.f_mul_scalar(1.0 - self.rho)?)?;
        let denom = new_ms.f_add_scalar(self.epsilon)?.f_sqrt()?;
        let out = v.f_sub(&grad.f_div(&denom)?.f_mul_scalar(self.learning_rate)?)?;
        *ms = new_ms;
        Ok(out)
    }

    fn validate(&self) -> Result<()> {
        let ok = self.learning_rate.is_finite()
            && self.learning_rate > 0.0
            && (0.0..1.0).contains(&self.rho)
            && self.epsilon.is_finite()
            && self.epsilon > 0.0;
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidValue {
                what: "rmsprop settings (learning rate > 0, 0 <= rho < 1, epsilon > 0)",
                value: format!("{self:?}"),
            })
        }
    }
}

/// The result of [`ActivationMaximization::maximize`]. Tensors are detached,
/// on the model's device.
#[derive(Debug)]
pub struct Maximized {
    /// `(N, C, H, W)`, float32: the result in the model's input space. Fed
    /// to the model, it gives [`Maximized::scores`].
    pub inputs: Tensor,
    /// `(N, C, H, W)`, float32 in `[0, 1]`: the same result as an image,
    /// `(v − low) / (high − low)` (that is `inputs × std + mean`).
    pub images: Tensor,
    /// One `[N]` tensor per model output: the final scores of
    /// [`Maximized::inputs`].
    pub scores: Vec<Tensor>,
    /// The score per step and sample (`curve[step][n]`, the sum over
    /// outputs) of the image the model saw at that step (with the input
    /// modifiers' changes, before the step's update).
    pub curve: Vec<Vec<f32>>,
}

/// Activation maximization on a [`Model`], with tf-keras-vis's defaults
/// (see the [module docs](self)).
///
/// ```no_run
/// use tch::Device;
/// use tch_vis::maximize::ActivationMaximization;
/// use tch_vis::preprocess::Sidecar;
/// use tch_vis::scores::{CategoricalScore, Score};
/// use tch_vis::Model;
/// # fn main() -> tch_vis::Result<()> {
/// let model = Model::load("models/digits_cnn.pt", Device::Cpu)?;
/// let sidecar = Sidecar::for_model("models/digits_cnn.pt")?;
/// let score = CategoricalScore::new((0..10).collect::<Vec<_>>())?; // one image per class
/// let out = ActivationMaximization::new(&model, [1, 32, 32])
///     .sidecar(&sidecar)
///     .seed(7)
///     .maximize(&[&score as &dyn Score])?;
/// assert_eq!(out.inputs.size(), vec![10, 1, 32, 32]);
/// assert_eq!(out.curve.len(), 200);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ActivationMaximization<'a> {
    model: &'a Model,
    shape: Vec<i64>,
    mean: Vec<f32>,
    std: Vec<f32>,
    samples: Option<usize>,
    steps: usize,
    seed: u64,
    input_range: (f64, f64),
    input_modifiers: Vec<InputModifier>,
    regularizers: Vec<Regularizer>,
    optimizer: RmsProp,
    clip_each_step: bool,
    accumulate_modifiers: bool,
    resolution: Option<(i64, i64)>,
}

impl<'a> ActivationMaximization<'a> {
    /// Activation maximization on `model`, whose input is one sample of
    /// shape `input_shape` = `[C, H, W]`, with the defaults of the module
    /// docs, seed 0, and the model taking `v / 255` (no normalisation) until
    /// [`ActivationMaximization::sidecar`] or
    /// [`ActivationMaximization::normalization`] says otherwise.
    pub fn new(model: &'a Model, input_shape: [usize; 3]) -> Self {
        let shape: Vec<i64> = input_shape.iter().map(|&d| d as i64).collect();
        ActivationMaximization {
            model,
            mean: vec![0.0; input_shape[0]],
            std: vec![1.0; input_shape[0]],
            shape,
            samples: None,
            steps: 200,
            seed: 0,
            input_range: (0.0, 255.0),
            input_modifiers: vec![
                InputModifier::Jitter { jitter: 4 },
                InputModifier::Rotate2D { degree: 1.0 },
            ],
            regularizers: vec![
                Regularizer::TotalVariation2D { weight: 1.0 },
                Regularizer::Norm {
                    weight: 0.3,
                    p: 1.0,
                },
            ],
            optimizer: RmsProp::default(),
            clip_each_step: true,
            accumulate_modifiers: false,
            resolution: None,
        }
    }

    /// Takes the input shape and the normalisation from a model sidecar:
    /// the model sees `(pixel − mean) / std` of pixels in `[0, 1]`.
    pub fn sidecar(mut self, sidecar: &Sidecar) -> Self {
        self.shape = vec![
            sidecar.channels as i64,
            sidecar.input_size[0] as i64,
            sidecar.input_size[1] as i64,
        ];
        self.mean = sidecar.mean.clone();
        self.std = sidecar.std.clone();
        self
    }

    /// Sets the per-channel normalisation the model expects of `[0, 1]`
    /// pixels.
    pub fn normalization(mut self, mean: Vec<f32>, std: Vec<f32>) -> Self {
        self.mean = mean;
        self.std = std;
        self
    }

    /// The number of samples (images) to make. By default it is the number
    /// of per-sample values of the first score that has them (a
    /// `CategoricalScore` of 10 classes makes 10 images), else 1.
    pub fn samples(mut self, n: usize) -> Self {
        self.samples = Some(n);
        self
    }

    /// The number of gradient steps (default 200).
    pub fn steps(mut self, steps: usize) -> Self {
        self.steps = steps;
        self
    }

    /// The seed of the seed input, jitters and angles (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The range of the optimised pixel values (default `(0, 255)`); the
    /// result is clipped to it.
    pub fn input_range(mut self, low: f64, high: f64) -> Self {
        self.input_range = (low, high);
        self
    }

    /// The input modifiers, applied in order before each step (default:
    /// jitter 4, rotation 1°).
    pub fn input_modifiers(mut self, modifiers: Vec<InputModifier>) -> Self {
        self.input_modifiers = modifiers;
        self
    }

    /// The regularizers (default: total variation 1.0, L1 norm 0.3).
    pub fn regularizers(mut self, regularizers: Vec<Regularizer>) -> Self {
        self.regularizers = regularizers;
        self
    }

    /// The optimizer settings (default: lr 1.0, ρ 0.999, ε 1e-7).
    pub fn optimizer(mut self, optimizer: RmsProp) -> Self {
        self.optimizer = optimizer;
        self
    }

    /// Whether to clip `v` to the input range after every step (default:
    /// yes; tf-keras-vis only clips the result).
    pub fn clip_each_step(mut self, clip: bool) -> Self {
        self.clip_each_step = clip;
        self
    }

    /// Whether the input modifiers change `v` itself, accumulating over the
    /// steps as tf-keras-vis's do (default: no — the model sees a modified
    /// copy and the gradient flows back through the modifier).
    pub fn accumulate_modifiers(mut self, accumulate: bool) -> Self {
        self.accumulate_modifiers = accumulate;
        self
    }

    /// Optimises `v` at `height × width` pixels, upsampled bilinearly
    /// (`align_corners = false`) to the model's input size before the
    /// modifiers, regularizers and model (default: at the input size). A
    /// coarse resolution is a prior for smooth images.
    pub fn resolution(mut self, height: usize, width: usize) -> Self {
        self.resolution = Some((height as i64, width as i64));
        self
    }

    /// The number of samples for `scores` (see
    /// [`ActivationMaximization::samples`]).
    fn sample_count(&self, scores: &[&dyn Score]) -> Result<usize> {
        if let Some(n) = self.samples {
            return Ok(n);
        }
        // Ask each score how many classes it takes for a batch of one: a
        // per-sample list reports a batch mismatch naming its length.
        let probe = Tensor::f_zeros([1, 1], (Kind::Float, Device::Cpu))?;
        for s in scores {
            if let Err(Error::BatchMismatch { got, .. }) = s.classes(&probe) {
                return Ok(got);
            }
        }
        Ok(1)
    }

    fn validate(&self) -> Result<(i64, i64, i64)> {
        let &[c, h, w] = self.shape.as_slice() else {
            return Err(Error::shape("input shape", "[C, H, W]", &self.shape));
        };
        if c <= 0 || h <= 1 || w <= 1 {
            return Err(Error::shape(
                "input shape",
                "[C, H, W] with C >= 1, H >= 2, W >= 2",
                &self.shape,
            ));
        }
        let cu = c as usize;
        if self.mean.len() != cu || self.std.len() != cu {
            return Err(Error::BatchMismatch {
                what: "mean and std values (one per channel)",
                expected: cu,
                got: self.mean.len().min(self.std.len()),
            });
        }
        if let Some(s) = self.std.iter().find(|s| !s.is_finite() || **s == 0.0) {
            return Err(Error::InvalidValue {
                what: "normalisation std",
                value: s.to_string(),
            });
        }
        if let Some(m) = self.mean.iter().find(|m| !m.is_finite()) {
            return Err(Error::InvalidValue {
                what: "normalisation mean",
                value: m.to_string(),
            });
        }
        let (low, high) = self.input_range;
        if !(low.is_finite() && high.is_finite() && low < high) {
            return Err(Error::InvalidValue {
                what: "input range (finite, low < high)",
                value: format!("({low}, {high})"),
            });
        }
        for m in &self.input_modifiers {
            match *m {
                InputModifier::Jitter { jitter } if !(0..=1 << 20).contains(&jitter) => {
                    return Err(Error::InvalidValue {
                        what: "jitter (pixels, 0 or more)",
                        value: jitter.to_string(),
                    })
                }
                InputModifier::Rotate2D { degree } if !degree.is_finite() || degree < 0.0 => {
                    return Err(Error::InvalidValue {
                        what: "rotation (degrees, 0 or more)",
                        value: degree.to_string(),
                    })
                }
                _ => {}
            }
        }
        if let Some((rh, rw)) = self.resolution {
            if rh <= 1 || rw <= 1 || rh > h || rw > w {
                return Err(Error::shape(
                    "resolution",
                    format!("[h, w] with 2 <= h <= {h}, 2 <= w <= {w}"),
                    &[rh, rw],
                ));
            }
        }
        self.optimizer.validate()?;
        Ok((c, h, w))
    }

    /// Maximizes `scores` (one per model output; [`crate::scores::InactiveScore`]
    /// for outputs not maximised).
    ///
    /// # Errors
    /// [`Error::Shape`] for an input shape that is not `[C, H, W]`;
    /// [`Error::InvalidValue`] for a bad setting (range, modifier,
    /// regularizer, optimizer, normalisation); [`Error::Empty`] for 0
    /// samples; [`Error::ScoreCount`] and [`Error::Score`] when the scores do
    /// not fit the outputs; the errors of [`Model::gradients`].
    pub fn maximize(&self, scores: &[&dyn Score]) -> Result<Maximized> {
        let (c, h, w) = self.validate()?;
        let (vh, vw) = self.resolution.unwrap_or((h, w));
        let n = self.sample_count(scores)?;
        if n == 0 {
            return Err(Error::Empty { what: "samples" });
        }
        let ni = n as i64;
        let device = self.model.device();
        let (low, high) = self.input_range;
        let per = (c * vh * vw) as usize;

        // The seed input: uniform in [low, high), one stream per sample.
        let mut data = vec![0f32; per * n];
        for (k, chunk) in data.chunks_mut(per).enumerate() {
            let mut rng = SplitMix64::new(mix(&[self.seed, SEED_STREAM, k as u64]));
            for v in chunk {
                *v = (low + (high - low) * (1.0 - rng.next_open())) as f32;
            }
        }
        let mut v = Tensor::f_from_slice(&data)?
            .f_view([ni, c, vh, vw])?
            .f_to_device(device)?;
        drop(data);

        // The image at the input size: v itself, or v upsampled.
        let upsample = |v: &Tensor| -> Result<Tensor> {
            if (vh, vw) == (h, w) {
                Ok(v.shallow_clone())
            } else {
                Ok(v.f_upsample_bilinear2d([h, w], false, None, None)?)
            }
        };
        // model input = image * scale + shift, per channel.
        let span = high - low;
        let scale: Vec<f32> = self
            .std
            .iter()
            .map(|s| (1.0 / (span * f64::from(*s))) as f32)
            .collect();
        let shift: Vec<f32> = self
            .mean
            .iter()
            .zip(&self.std)
            .map(|(m, s)| ((-low / span - f64::from(*m)) / f64::from(*s)) as f32)
            .collect();
        let scale = Tensor::f_from_slice(&scale)?
            .f_view([1, c, 1, 1])?
            .f_to_device(device)?;
        let shift = Tensor::f_from_slice(&shift)?
            .f_view([1, c, 1, 1])?
            .f_to_device(device)?;
        let to_model = |img: &Tensor| -> Result<Tensor> { Ok(img.f_mul(&scale)?.f_add(&shift)?) };

        // Classes picked from the output are fixed on the seed input.
        let seed_outputs = {
            let _mode = GradMode::set(false);
            self.model.forward(&[to_model(&upsample(&v)?)?])?
        };
        if seed_outputs.len() != scores.len() {
            return Err(Error::ScoreCount {
                outputs: seed_outputs.len(),
                scores: scores.len(),
            });
        }
        let mut owned: Vec<Option<Box<dyn Score + Send + Sync>>> = Vec::new();
        for (index, (s, o)) in scores.iter().zip(&seed_outputs).enumerate() {
            owned.push(s.fixed_on(o).map_err(|e| Error::Score {
                index,
                name: s.name().to_string(),
                source: Box::new(e),
            })?);
        }
        let active = crate::scores::fixed_or_given(&owned, scores);
        drop(seed_outputs);

        let mut ms = v.f_zeros_like()?;
        let mut curve = Vec::with_capacity(self.steps);
        for step in 0..self.steps {
            let mut rng = SplitMix64::new(mix(&[self.seed, MODIFIER_STREAM, step as u64]));
            let draws: Vec<Draw> = self
                .input_modifiers
                .iter()
                .map(|m| Draw::new(m, &mut rng))
                .collect();
            if self.accumulate_modifiers {
                for d in &draws {
                    v = d.apply(&v)?;
                }
            }
            let (grad, values) = self.step_gradient(&v, &draws, &active, &upsample, &to_model)?;
            let mut total = Tensor::f_zeros([ni], (Kind::Float, device))?;
            for s in &values {
                total = total.f_add(&s.f_to_device(device)?.f_to_kind(Kind::Float)?)?;
            }
            curve.push(Vec::<f32>::try_from(&total.f_to_device(Device::Cpu)?)?);
            v = self.optimizer.step(&v, &grad, &mut ms)?;
            if self.clip_each_step {
                v = v.f_clamp(low, high)?;
            }
        }

        let image = upsample(&v)?.f_clamp(low, high)?;
        let inputs = to_model(&image)?;
        let outputs = self.model.forward(&[inputs.shallow_clone()])?;
        let scores = {
            let _guard = tch::no_grad_guard();
            active
                .iter()
                .zip(&outputs)
                .enumerate()
                .map(|(index, (s, o))| {
                    scores::evaluate(*s, o).map_err(|e| Error::Score {
                        index,
                        name: s.name().to_string(),
                        source: Box::new(e),
                    })
                })
                .collect::<Result<Vec<_>>>()?
        };
        let images = image.f_sub_scalar(low)?.f_div_scalar(span)?;
        Ok(Maximized {
            inputs,
            images,
            scores,
            curve,
        })
    }

    /// The gradient of the loss `−Σ scores + Σ regularizers` with respect to
    /// `v`, and the score values. The model's input gradient comes back
    /// through the model input's affine map, the modifiers (unless they
    /// accumulate) and the upsampling by one vector–Jacobian product.
    fn step_gradient(
        &self,
        v: &Tensor,
        draws: &[Draw],
        scores: &[&dyn Score],
        upsample: &dyn Fn(&Tensor) -> Result<Tensor>,
        to_model: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let _mode = GradMode::set(true);
        let leaf = v.f_detach()?.f_set_requires_grad(true)?;
        let image = upsample(&leaf)?;
        let mut seen = image.shallow_clone();
        if !self.accumulate_modifiers {
            for d in draws {
                seen = d.apply(&seen)?;
            }
        }
        let x = to_model(&seen)?;
        let g = self.model.gradients(&[x.f_detach()?], scores)?;
        // Σ (x · ∂S/∂x) has the gradient Jᵀ ∂S/∂x with respect to the leaf.
        let mut loss = x
            .f_mul(&g.inputs[0].f_detach()?)?
            .f_sum(None::<Kind>)?
            .f_neg()?;
        for r in &self.regularizers {
            loss = loss.f_add(&r.value(&image)?.f_sum(None::<Kind>)?)?;
        }
        let grads = Tensor::f_run_backward(&[&loss], &[&leaf], false, false)?;
        let grad = match grads.into_iter().next() {
            Some(t) if t.defined() => t,
            _ => v.f_zeros_like()?,
        };
        Ok((grad, g.scores))
    }
}

/// One step's random draw for one input modifier.
enum Draw {
    Shift(i64, i64),
    Angle(f64),
    Nothing,
}

impl Draw {
    fn new(m: &InputModifier, rng: &mut SplitMix64) -> Self {
        match *m {
            InputModifier::Jitter { jitter: j } if j > 0 => {
                let span = 2 * j as u64;
                let dy = (rng.next_u64() % span) as i64 - j;
                let dx = (rng.next_u64() % span) as i64 - j;
                Draw::Shift(dy, dx)
            }
            InputModifier::Rotate2D { degree } if degree > 0.0 => {
                Draw::Angle(degree * (2.0 * (1.0 - rng.next_open()) - 1.0))
            }
            _ => Draw::Nothing,
        }
    }

    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match *self {
            Draw::Shift(dy, dx) => jitter(x, dy, dx),
            Draw::Angle(a) => rotate2d(x, a),
            Draw::Nothing => Ok(x.shallow_clone()),
        }
    }
}

/// Stream keys of the generator, so the seed input and the modifiers never
/// share draws.
const SEED_STREAM: u64 = 0x5EED;
const MODIFIER_STREAM: u64 = 0x0D1F;

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: [i64; 4]) -> Tensor {
        Tensor::from_slice(v).view(shape)
    }

    fn values(x: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(&x.reshape([-1])).unwrap()
    }

    #[test]
    fn total_variation_by_hand() {
        // One 1x2x3 sample [[1, 2, 4], [0, 0, 1]]: vertical |0-1|+|0-2|+|1-4|
        // = 6, horizontal 1+2+0+1 = 4, TV 10, over 6 elements, weight 3: 5.
        let x = t(&[1., 2., 4., 0., 0., 1.], [1, 1, 2, 3]);
        let tv = Regularizer::TotalVariation2D { weight: 3.0 }
            .value(&x)
            .unwrap();
        assert_eq!(values(&tv), vec![5.0]);
        // Per sample, over channels: a second sample, two channels of
        // constants 1 and 7: TV 0.
        let y = Tensor::cat(
            &[
                Tensor::ones([1, 1, 2, 3], (Kind::Float, Device::Cpu)),
                Tensor::full([1, 1, 2, 3], 7.0, (Kind::Float, Device::Cpu)),
            ],
            1,
        );
        let tv = Regularizer::TotalVariation2D { weight: 1.0 }
            .value(&y)
            .unwrap();
        assert_eq!(values(&tv), vec![0.0]);
    }

    #[test]
    fn norms_by_hand() {
        // [3, -4, 0, 0]: L1 = 7 over 4 elements; L2 = 5 over √4.
        let x = t(&[3., -4., 0., 0.], [1, 1, 2, 2]);
        let l1 = Regularizer::Norm {
            weight: 0.5,
            p: 1.0,
        }
        .value(&x)
        .unwrap();
        assert_eq!(values(&l1), vec![0.875]);
        let l2 = Regularizer::Norm {
            weight: 2.0,
            p: 2.0,
        }
        .value(&x)
        .unwrap();
        assert_eq!(values(&l2), vec![5.0]);
        assert!(matches!(
            Regularizer::Norm {
                weight: 1.0,
                p: 0.5
            }
            .value(&x),
            Err(Error::InvalidValue { .. })
        ));
        assert!(matches!(
            Regularizer::Norm {
                weight: 1.0,
                p: 1.0
            }
            .value(&x.view([4])),
            Err(Error::Shape { .. })
        ));
    }

    #[test]
    fn jitter_rolls_with_wrap_around() {
        // 2x3 image 0..6, one row down and one column left:
        // out[i][j] = x[(i-1) mod 2][(j+1) mod 3].
        let x = t(&[0., 1., 2., 3., 4., 5.], [1, 1, 2, 3]);
        let y = jitter(&x, 1, -1).unwrap();
        assert_eq!(values(&y), vec![4., 5., 3., 1., 2., 0.]);
        assert!(matches!(
            jitter(&x.view([2, 3]), 1, 1),
            Err(Error::Shape { .. })
        ));
    }

    #[test]
    fn rotation_by_hand() {
        // 3x3 image 0..9 turned 90° counter-clockwise: the right column
        // becomes the top row.
        let x = t(&[0., 1., 2., 3., 4., 5., 6., 7., 8.], [1, 1, 3, 3]);
        let y = values(&rotate2d(&x, 90.0).unwrap());
        let want = [2., 5., 8., 1., 4., 7., 0., 3., 6.];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{y:?}");
        }
        // 0° is the identity; the centre of an odd image never moves.
        let same = values(&rotate2d(&x, 0.0).unwrap());
        assert_eq!(same, values(&x));
        let r = 0.5f64.sqrt();
        let y45 = rotate2d(&x, 45.0).unwrap();
        assert!((y45.double_value(&[0, 0, 1, 1]) - 4.0).abs() < 1e-5);
        // Top middle (i 0, j 1) samples col 1 + r, row 1 − r: bilinear
        // between rows 0, 1 and columns 1, 2 of x[r][c] = 3r + c.
        let want = 3.0 * (1.0 - r) + (1.0 + r);
        assert!((y45.double_value(&[0, 0, 0, 1]) - want).abs() < 1e-5);
        // Non-square: 180° reverses a 2x4 image.
        let z = t(&[0., 1., 2., 3., 4., 5., 6., 7.], [1, 1, 2, 4]);
        let y = values(&rotate2d(&z, 180.0).unwrap());
        for (a, b) in y.iter().zip([7., 6., 5., 4., 3., 2., 1., 0.]) {
            assert!((a - b).abs() < 1e-5, "{y:?}");
        }
        // Outside the image, positions reflect about its edges: at 45° the
        // top-left output samples row 1 − √2 ≈ −0.41, column 1, which
        // reflects inside the first row's half pixel: x[0][1] = 1.
        assert!((y45.double_value(&[0, 0, 0, 0]) - 1.0).abs() < 1e-5);
    }

    #[test]
    fn rmsprop_puts_epsilon_inside_the_root() {
        // g = 2, ms 0: ms' = 0.001 * 4 = 0.004; step = 2 / √(0.004 + 1e-7).
        let v = Tensor::from_slice(&[1.0f64]);
        let g = Tensor::from_slice(&[2.0f64]);
        let mut ms = Tensor::from_slice(&[0.0f64]);
        let out = RmsProp::default().step(&v, &g, &mut ms).unwrap();
        let want = 1.0 - 2.0 / (0.004f64 + 1e-7).sqrt();
        assert!((out.double_value(&[0]) - want).abs() < 1e-12);
        assert!((ms.double_value(&[0]) - 0.004).abs() < 1e-15);
    }
}
