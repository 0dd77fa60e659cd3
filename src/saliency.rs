//! Vanilla saliency and SmoothGrad.
//!
//! - Vanilla saliency (Simonyan et al., 2013, "Deep Inside Convolutional
//!   Networks"): the gradient of the score with respect to the input.
//! - SmoothGrad (Smilkov et al., 2017, "SmoothGrad: removing noise by adding
//!   noise"): the gradient averaged over noisy copies of the input.
//!
//! Exact semantics, as tf-keras-vis's `Saliency`, adapted to PyTorch's
//! channels-first layout:
//! - with `smooth_samples = S > 0`, for each sample `s` Gaussian noise with
//!   `σ = smooth_noise × (max − min)` of *that image's* input tensor is
//!   added, `|gradient|` is taken, and the `S` results are averaged;
//!   with `S = 0` the plain `|gradient|` is used;
//! - the map is the maximum over the channel axis (dim 1, for inputs of rank
//!   ≥ 3) of that, then normalised per image to
//!   `(m − min) / (max − min + 1e-7)`;
//! - [`SaliencyMaps::gradients`] also gives the *signed* gradient averaged
//!   over the same samples (the plain gradient when `S = 0`), which neither
//!   tf-keras-vis nor captum returns.
//!
//! Noise is drawn on the CPU from a counter-based generator (SplitMix64 and
//! Box–Muller, with tch-vis's own logarithm, sine and cosine) keyed by
//! `(seed, key of the image, sample)`, so it is the same on every device
//! and C library, for every batch size and chunking, and for every order
//! in which images are processed. By default an image's key is its
//! index in the batch; [`Saliency::compute_keyed`] takes keys from the
//! caller (the command line uses a hash of the image's relative path, so
//! sharded and resumed runs give the same maps). This differs from
//! tf-keras-vis and captum, whose noise comes from the framework's global
//! generator.
//!
//! Samples are processed one at a time, so memory stays that of one
//! gradient pass of the batch whatever `S` is.

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::scores::Score;

/// Saliency maps, their gradients and scores, as returned by
/// [`Saliency::compute`]. All tensors are detached and on the device of the
/// inputs given.
#[derive(Debug)]
pub struct SaliencyMaps {
    /// One normalised map per input: `(N, H, W)` for an `(N, C, H, W)` input
    /// (the input's own shape for inputs of rank ≤ 2), values in `[0, 1)`.
    pub maps: Vec<Tensor>,
    /// One signed gradient per input, same shape as the input: averaged over
    /// the SmoothGrad samples, or the plain gradient without SmoothGrad.
    pub gradients: Vec<Tensor>,
    /// One `[N]` tensor per model output: the scores of the inputs as given
    /// (without noise).
    pub scores: Vec<Tensor>,
    /// One entry per model output: the class each sample's score took, for
    /// class scores ([`Score::classes`]); with SmoothGrad, a `predicted`
    /// class is chosen once on the input as given and held fixed over the
    /// noisy samples.
    pub classes: Vec<Option<Vec<usize>>>,
}

/// Vanilla saliency and SmoothGrad on a [`Model`].
///
/// ```no_run
/// use tch::{Device, Kind, Tensor};
/// use tch_vis::{saliency::Saliency, scores::{CategoricalScore, Score}, Model};
/// # fn main() -> tch_vis::Result<()> {
/// let model = Model::load("models/digits_cnn.pt", Device::Cpu)?;
/// let x = Tensor::randn([4, 1, 32, 32], (Kind::Float, Device::Cpu));
/// let score = CategoricalScore::new(3)?;
/// let out = Saliency::new(&model)
///     .smooth_samples(20)
///     .smooth_noise(0.2)
///     .seed(7)
///     .compute(&[x], &[&score as &dyn Score])?;
/// assert_eq!(out.maps[0].size(), vec![4, 32, 32]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Saliency<'a> {
    model: &'a Model,
    smooth_samples: usize,
    smooth_noise: f64,
    seed: u64,
}

impl<'a> Saliency<'a> {
    /// Vanilla saliency on `model` (no SmoothGrad, noise level 0.2, seed 0).
    pub fn new(model: &'a Model) -> Self {
        Saliency {
            model,
            smooth_samples: 0,
            smooth_noise: 0.2,
            seed: 0,
        }
    }

    /// The number of SmoothGrad samples (0: vanilla saliency).
    pub fn smooth_samples(mut self, n: usize) -> Self {
        self.smooth_samples = n;
        self
    }

    /// The noise level: σ = `f` × (max − min) of each image's input.
    pub fn smooth_noise(mut self, f: f64) -> Self {
        self.smooth_noise = f;
        self
    }

    /// The seed of the SmoothGrad noise.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Computes the maps of `inputs` for `scores` (one score per model
    /// output). Image `n` of the batch uses noise key `n`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for a negative or non-finite noise level; the
    /// errors of [`Model::gradients`].
    pub fn compute(&self, inputs: &[Tensor], scores: &[&dyn Score]) -> Result<SaliencyMaps> {
        let batch = match inputs.first() {
            Some(x) => x.size().first().copied().unwrap_or(1).max(0) as u64,
            None => 0,
        };
        let keys: Vec<u64> = (0..batch).collect();
        self.compute_keyed(inputs, scores, &keys)
    }

    /// As [`Saliency::compute`], with the noise key of every image of the
    /// batch given (one per sample of dim 0).
    ///
    /// # Errors
    /// [`Error::BatchMismatch`] when `keys` does not have one key per image;
    /// otherwise as [`Saliency::compute`].
    pub fn compute_keyed(
        &self,
        inputs: &[Tensor],
        scores: &[&dyn Score],
        keys: &[u64],
    ) -> Result<SaliencyMaps> {
        self.check_noise()?;
        if self.smooth_samples == 0 {
            let plain = self.model.gradients(inputs, scores)?;
            let maps = plain
                .inputs
                .iter()
                .map(abs_normalized_map)
                .collect::<Result<Vec<_>>>()?;
            let classes = scores
                .iter()
                .zip(&plain.outputs)
                .map(|(s, o)| s.classes(o))
                .collect::<Result<Vec<_>>>()?;
            return Ok(SaliencyMaps {
                maps,
                gradients: plain.inputs,
                scores: plain.scores,
                classes,
            });
        }
        let clean = self.clean(inputs, scores)?;
        let fixed_refs = crate::scores::fixed_or_given(&clean.fixed, scores);
        let scores = fixed_refs.as_slice();
        for x in inputs {
            let n = x.size().first().copied().unwrap_or(0);
            if usize::try_from(n).unwrap_or(0) != keys.len() {
                return Err(Error::BatchMismatch {
                    what: "noise keys",
                    expected: usize::try_from(n).unwrap_or(0),
                    got: keys.len(),
                });
            }
        }
        let sigmas = inputs
            .iter()
            .map(|x| self.sigmas(x))
            .collect::<Result<Vec<_>>>()?;
        let mut abs_sum: Vec<Option<Tensor>> = inputs.iter().map(|_| None).collect();
        let mut signed_sum: Vec<Option<Tensor>> = inputs.iter().map(|_| None).collect();
        for s in 0..self.smooth_samples {
            let noisy = inputs
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    let noise = gaussian_like(x, self.seed, i as u64, s as u64, keys)?;
                    Ok(x.f_detach()?.f_add(&noise.f_mul(&sigmas[i])?)?)
                })
                .collect::<Result<Vec<_>>>()?;
            let g = self.model.gradients(&noisy, scores)?;
            for (i, grad) in g.inputs.into_iter().enumerate() {
                accumulate(&mut abs_sum[i], &mut signed_sum[i], grad)?;
            }
        }
        let count = self.smooth_samples as f64;
        let mut maps = Vec::with_capacity(inputs.len());
        let mut gradients = Vec::with_capacity(inputs.len());
        for (a, s) in abs_sum.into_iter().zip(signed_sum) {
            let (Some(a), Some(s)) = (a, s) else {
                return Err(Error::Empty {
                    what: "smoothgrad samples",
                });
            };
            maps.push(normalized_map(&a.f_div_scalar(count)?)?);
            gradients.push(s.f_div_scalar(count)?);
        }
        Ok(SaliencyMaps {
            maps,
            gradients,
            scores: clean.scores,
            classes: clean.classes,
        })
    }

    /// SmoothGrad of a padded batch `x` (`(B, ...)`, the model's one input)
    /// whose first `images` rows are images (keys `keys`) and the rest
    /// padding: the noisy samples [`Saliency::compute_keyed`] gives each
    /// image, packed `B` to a model call (image by image, sample by
    /// sample; the last call padded with zeros), so a batch of `n` images
    /// takes `⌈n × samples / B⌉` calls instead of `samples`, every call has
    /// `B` rows, and each image's sums run in the same order. Each row is
    /// scored as its image's clean output fixes it. Padding rows get zero
    /// maps and gradients. (The batch engine's SmoothGrad.)
    pub(crate) fn smooth_packed(
        &self,
        x: &Tensor,
        keys: &[u64],
        images: usize,
        scores: &[&dyn Score],
    ) -> Result<SaliencyMaps> {
        self.check_noise()?;
        let b = x.size().first().copied().unwrap_or(0);
        if keys.len() != b as usize {
            return Err(Error::BatchMismatch {
                what: "noise keys",
                expected: b as usize,
                got: keys.len(),
            });
        }
        let clean_pass = self.clean(&[x.shallow_clone()], scores)?;
        let sigmas = self.sigmas(x)?;
        let clean = x.f_detach()?;
        let images = images.min(b as usize);
        let samples = self.smooth_samples as u64;
        let items: Vec<(usize, u64)> = (0..images)
            .flat_map(|i| (0..samples).map(move |s| (i, s)))
            .collect();
        let mut abs_sum: Vec<Option<Tensor>> = (0..images).map(|_| None).collect();
        let mut signed_sum: Vec<Option<Tensor>> = (0..images).map(|_| None).collect();
        for chunk in items.chunks(b.max(1) as usize) {
            let mut rows = Vec::with_capacity(b as usize);
            let mut owner = Vec::with_capacity(b as usize);
            for &(i, s) in chunk {
                let xi = clean.f_narrow(0, i as i64, 1)?;
                let noise = gaussian_like(&xi, self.seed, 0, s, &keys[i..=i])?;
                let sigma = sigmas.f_narrow(0, i as i64, 1)?;
                rows.push(xi.f_add(&noise.f_mul(&sigma)?)?);
                owner.push(i as i64);
            }
            let pad = b - chunk.len() as i64;
            if pad > 0 {
                let mut shape = x.size();
                shape[0] = pad;
                rows.push(Tensor::f_zeros(
                    shape.as_slice(),
                    (x.f_kind()?, x.device()),
                )?);
                owner.extend(std::iter::repeat_n(0, pad as usize));
            }
            let noisy = Tensor::f_cat(&rows, 0)?;
            drop(rows);
            // Each row's score fixed as its image's clean output fixes it.
            let index = Tensor::f_from_slice(&owner)?;
            let fixed = scores
                .iter()
                .zip(&clean_pass.outputs)
                .enumerate()
                .map(|(o, (score, out))| {
                    let rows_out = out.f_index_select(0, &index.f_to_device(out.device())?)?;
                    score
                        .fixed_on(&rows_out)
                        .map_err(|e| score_error(o, *score, e))
                })
                .collect::<Result<Vec<_>>>()?;
            let refs = crate::scores::fixed_or_given(&fixed, scores);
            let g = self.model.gradients(&[noisy], &refs)?;
            let grad = g
                .inputs
                .into_iter()
                .next()
                .ok_or(Error::Empty { what: "gradients" })?;
            for (r, &(i, _)) in chunk.iter().enumerate() {
                accumulate(
                    &mut abs_sum[i],
                    &mut signed_sum[i],
                    grad.f_narrow(0, r as i64, 1)?,
                )?;
            }
        }
        // Each image's mean, then zero rows for the padding.
        let count = self.smooth_samples as f64;
        let mean = |sums: Vec<Option<Tensor>>| -> Result<Tensor> {
            let mut rows = sums
                .into_iter()
                .map(|t| {
                    Ok(t.ok_or(Error::Empty {
                        what: "smoothgrad samples",
                    })?
                    .f_div_scalar(count)?)
                })
                .collect::<Result<Vec<_>>>()?;
            if (images as i64) < b {
                let mut shape = x.size();
                shape[0] = b - images as i64;
                let kind = match rows.first() {
                    Some(r) => r.f_kind()?,
                    None => x.f_kind()?,
                };
                rows.push(Tensor::f_zeros(shape.as_slice(), (kind, x.device()))?);
            }
            Ok(Tensor::f_cat(&rows, 0)?)
        };
        Ok(SaliencyMaps {
            maps: vec![normalized_map(&mean(abs_sum)?)?],
            gradients: vec![mean(signed_sum)?],
            scores: clean_pass.scores,
            classes: clean_pass.classes,
        })
    }

    /// From one forward pass without gradient on the inputs as given: the
    /// outputs, the scores, the classes they take, and the scores with
    /// their classes fixed ([`Score::fixed_on`]) for the noisy samples.
    fn clean(&self, inputs: &[Tensor], scores: &[&dyn Score]) -> Result<Clean> {
        let device = inputs.first().map_or(Device::Cpu, Tensor::device);
        clean_pass(self.model.forward(inputs)?, device, scores)
    }

    /// [`Error::InvalidValue`] for a negative or non-finite noise level.
    fn check_noise(&self) -> Result<()> {
        check_noise(self.smooth_noise)
    }

    /// σ per image, shaped to broadcast over the input: `(N, 1, ..., 1)`.
    fn sigmas(&self, x: &Tensor) -> Result<Tensor> {
        sigmas(x, self.smooth_noise)
    }
}

/// SmoothGrad's noise for the methods that average over noisy copies of
/// their input (CAMs and Integrated Gradients on the command line): the
/// sample `s` of the image with key `k` is the one SmoothGrad's batch
/// engine draws for it ([`Saliency::smooth_packed`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Noise {
    /// Noisy copies per image (0: none).
    pub(crate) samples: usize,
    /// σ = `level` × (max − min) of each image's input.
    pub(crate) level: f64,
    /// The seed of the noise.
    pub(crate) seed: u64,
}

impl Noise {
    /// `samples` copies, σ = `level` × (max − min), from `seed`.
    pub(crate) const fn new(samples: usize, level: f64, seed: u64) -> Self {
        Noise {
            samples,
            level,
            seed,
        }
    }

    /// The noisy copy `sample` of the batch `x` (`(N, ...)`), row `n` with
    /// the noise of key `keys[n]`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for a bad level, [`Error::BatchMismatch`]
    /// when `keys` does not have a key per row, or a libtorch error.
    pub(crate) fn copy(&self, x: &Tensor, keys: &[u64], sample: usize) -> Result<Tensor> {
        check_noise(self.level)?;
        let rows = usize::try_from(x.size().first().copied().unwrap_or(0)).unwrap_or(0);
        if rows != keys.len() {
            return Err(Error::BatchMismatch {
                what: "noise keys",
                expected: rows,
                got: keys.len(),
            });
        }
        let noise = gaussian_like(x, self.seed, 0, sample as u64, keys)?;
        Ok(x.f_detach()?
            .f_add(&noise.f_mul(&sigmas(x, self.level)?)?)?)
    }
}

/// [`Error::InvalidValue`] for a negative or non-finite noise level.
fn check_noise(level: f64) -> Result<()> {
    if !level.is_finite() || level < 0.0 {
        return Err(Error::InvalidValue {
            what: "smooth noise",
            value: level.to_string(),
        });
    }
    Ok(())
}

/// σ = `level` × (max − min) per image, shaped to broadcast over the
/// input: `(N, 1, ..., 1)`.
fn sigmas(x: &Tensor, level: f64) -> Result<Tensor> {
    let size = x.size();
    let n = size.first().copied().unwrap_or(1);
    let flat = x.f_detach()?.f_reshape([n, -1])?;
    let range = flat
        .f_amax(1, false)?
        .f_sub(&flat.f_amin(1, false)?)?
        .f_mul_scalar(level)?;
    let mut shape = vec![n];
    shape.extend(std::iter::repeat_n(1, size.len().saturating_sub(1)));
    Ok(range.f_reshape(shape)?)
}

/// From the outputs of the clean inputs (on `device`): the scores, the
/// classes they take, and the scores with their classes fixed
/// ([`Score::fixed_on`]) for noisy copies of the inputs.
pub(crate) fn clean_pass(
    outputs: Vec<Tensor>,
    device: Device,
    scores: &[&dyn Score],
) -> Result<Clean> {
    if outputs.len() != scores.len() {
        return Err(Error::ScoreCount {
            outputs: outputs.len(),
            scores: scores.len(),
        });
    }
    let _guard = tch::no_grad_guard();
    let mut values = Vec::with_capacity(scores.len());
    let mut classes = Vec::with_capacity(scores.len());
    let mut fixed = Vec::with_capacity(scores.len());
    for (index, (out, score)) in outputs.iter().zip(scores).enumerate() {
        let v = crate::scores::evaluate(*score, out).map_err(|e| score_error(index, *score, e))?;
        values.push(v.f_to_device(device)?);
        classes.push(
            score
                .classes(out)
                .map_err(|e| score_error(index, *score, e))?,
        );
        fixed.push(
            score
                .fixed_on(out)
                .map_err(|e| score_error(index, *score, e))?,
        );
    }
    Ok(Clean {
        outputs,
        scores: values,
        classes,
        fixed,
    })
}

/// What a forward pass on the clean inputs gives SmoothGrad.
pub(crate) struct Clean {
    /// The model's outputs.
    pub(crate) outputs: Vec<Tensor>,
    /// The scores, one `[N]` tensor per output.
    pub(crate) scores: Vec<Tensor>,
    /// The classes the scores take, per output.
    pub(crate) classes: Vec<Option<Vec<usize>>>,
    /// The scores with their classes fixed, where a score fixes them.
    pub(crate) fixed: Vec<Option<Box<dyn Score + Send + Sync>>>,
}

/// A score's error, with the output index as context.
fn score_error(index: usize, score: &dyn Score, e: Error) -> Error {
    Error::Score {
        index,
        name: score.name().to_string(),
        source: Box::new(e),
    }
}

/// Adds a SmoothGrad sample's gradient to the running sums of `|g|` and
/// `g` (the first sample starts them).
fn accumulate(
    abs_sum: &mut Option<Tensor>,
    signed_sum: &mut Option<Tensor>,
    g: Tensor,
) -> Result<()> {
    let abs = g.f_abs()?;
    *abs_sum = Some(match abs_sum.take() {
        None => abs,
        Some(acc) => acc.f_add(&abs)?,
    });
    *signed_sum = Some(match signed_sum.take() {
        None => g,
        Some(acc) => acc.f_add(&g)?,
    });
    Ok(())
}

/// Max over channels (dim 1, for rank ≥ 3) of a non-negative gradient
/// magnitude, then `(m − min) / (max − min + 1e-7)` per image.
///
/// # Errors
/// [`Error::Shape`] for a 0-d tensor; [`Error::Torch`] if an op fails.
pub fn normalized_map(magnitude: &Tensor) -> Result<Tensor> {
    let size = magnitude.size();
    if size.is_empty() {
        return Err(Error::shape("gradient", "(N, ...)", &size));
    }
    let m = if size.len() >= 3 {
        magnitude.f_amax(1, false)?
    } else {
        magnitude.shallow_clone()
    };
    normalize_per_sample(&m)
}

/// [`normalized_map`] of `|g|`. A float32 `(N, C, H, W)` CPU gradient,
/// contiguous or channels-last, is mapped in one pass over it and one over
/// the map ([`fused_abs_map`]: the same values bit for bit, a quarter of
/// the time of libtorch's five passes and three new tensors); anything else
/// by libtorch.
///
/// # Errors
/// As [`normalized_map`].
pub(crate) fn abs_normalized_map(g: &Tensor) -> Result<Tensor> {
    match fused_abs_map(g)? {
        Some(map) => Ok(map),
        None => normalized_map(&g.f_abs()?),
    }
}

/// The strides of a float32 `(N, C, H, W)` CPU tensor that
/// [`fused_abs_map`] reads: `Some(true)` channels-last, `Some(false)`
/// contiguous.
fn fused_layout(g: &Tensor) -> Option<bool> {
    let size = g.size();
    if g.device() != Device::Cpu || g.kind() != Kind::Float || size.len() != 4 {
        return None;
    }
    let [_, c, h, w] = [size[0], size[1], size[2], size[3]];
    if g.is_contiguous() {
        Some(false)
    } else if g.stride() == [h * w * c, 1, w * c, c] {
        Some(true)
    } else {
        None
    }
}

/// `normalized_map(|g|)` of a gradient laid out as [`fused_layout`] says,
/// in Rust: per pixel the largest `|value|` over the channels, then per
/// image `(m − min) / ((max − min) + 1e-7)` with libtorch's IEEE float32
/// operations (its true division, and the scalar rounded to float32).
/// `None` for other layouts, and for a gradient holding a NaN (libtorch's
/// maximum propagates it; this pass would not).
fn fused_abs_map(g: &Tensor) -> Result<Option<Tensor>> {
    let Some(channels_last) = fused_layout(g) else {
        return Ok(None);
    };
    let size = g.size();
    let [n, c, h, w] = [0, 1, 2, 3].map(|i| size[i] as usize);
    let hw = h * w;
    if n * c * hw == 0 {
        return Ok(None);
    }
    let map = Tensor::f_empty([n as i64, h as i64, w as i64], (Kind::Float, Device::Cpu))?;
    // SAFETY: `g` is a float32 CPU tensor of n × c × h × w values in one
    // dense block (contiguous or channels-last, checked by `fused_layout`),
    // alive for this function; `map` is a new contiguous float32 tensor of
    // n × h × w values that nothing else refers to yet.
    let (grad, out) = unsafe {
        (
            std::slice::from_raw_parts(g.data_ptr() as *const f32, n * c * hw),
            std::slice::from_raw_parts_mut(map.data_ptr() as *mut f32, n * hw),
        )
    };
    let finite = with_avx2!(
        abs_maps_avx2(grad, c, hw, channels_last, out),
        else abs_maps(grad, c, hw, channels_last, out)
    );
    Ok(finite.then_some(map))
}

/// [`abs_maps`] compiled for AVX2 (the crate's baseline is SSE2).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn abs_maps_avx2(
    grad: &[f32],
    c: usize,
    hw: usize,
    channels_last: bool,
    out: &mut [f32],
) -> bool {
    abs_maps(grad, c, hw, channels_last, out)
}

/// The maps of [`fused_abs_map`] into `out`, one `hw` slice per image of
/// `c × hw` gradient values; `false` (with `out` partly written) at the
/// first image holding a NaN. Worked on the values' bits: for the
/// non-negative floats that `|v|` gives, the order of their bit patterns
/// as integers is the order of their values (+0 lowest; `v & 0x7fffffff`
/// is `|v|`), so the channel maximum, the image's minimum and maximum are
/// integer `max`/`min`s, exact and vectorisable, and a NaN shows as a
/// maximum above infinity's bits.
#[inline(always)]
fn abs_maps(grad: &[f32], c: usize, hw: usize, channels_last: bool, out: &mut [f32]) -> bool {
    const ABS: u32 = 0x7fff_ffff;
    const INF: u32 = 0x7f80_0000;
    let eps = 1e-7f64 as f32;
    for (image, m) in grad.chunks_exact(c * hw).zip(out.chunks_exact_mut(hw)) {
        let bits = |v: f32| v.to_bits() & ABS;
        let max = |a: u32, b: u32| if a > b { a } else { b };
        let min = |a: u32, b: u32| if a < b { a } else { b };
        let (lo, hi) = if !channels_last && c == 3 {
            // Colour planes: the channel maximum, the image's minimum and
            // maximum in one pass over the three planes.
            let (p0, rest) = image.split_at(hw);
            let (p1, p2) = rest.split_at(hw);
            let mut range = (u32::MAX, 0u32);
            for (((o, &a), &b), &c) in m.iter_mut().zip(p0).zip(p1).zip(p2) {
                let v = max(max(bits(a), bits(b)), bits(c));
                *o = f32::from_bits(v);
                range = (min(range.0, v), max(range.1, v));
            }
            range
        } else {
            fold_abs_map(image, c, hw, channels_last, m)
        };
        if hi > INF {
            return false;
        }
        let (lo, hi) = (f32::from_bits(lo), f32::from_bits(hi));
        let span = (hi - lo) + eps;
        for v in m.iter_mut() {
            *v = (*v - lo) / span;
        }
    }
    true
}

/// The channel maximum of `|v|` of one image's `c × hw` gradient values
/// into `m`, as bits (see [`abs_maps`]), and the bits of its minimum and
/// maximum.
#[inline(always)]
fn fold_abs_map(
    image: &[f32],
    c: usize,
    hw: usize,
    channels_last: bool,
    m: &mut [f32],
) -> (u32, u32) {
    const ABS: u32 = 0x7fff_ffff;
    let bits = |v: f32| v.to_bits() & ABS;
    let max = |a: u32, b: u32| if a > b { a } else { b };
    if !channels_last {
        for (o, &x) in m.iter_mut().zip(&image[..hw]) {
            *o = f32::from_bits(bits(x));
        }
        for plane in image.chunks_exact(hw).skip(1) {
            for (o, &x) in m.iter_mut().zip(plane) {
                *o = f32::from_bits(max(o.to_bits(), bits(x)));
            }
        }
    } else if c == 3 {
        for (o, px) in m.iter_mut().zip(image.chunks_exact(3)) {
            *o = f32::from_bits(max(max(bits(px[0]), bits(px[1])), bits(px[2])));
        }
    } else {
        for (o, px) in m.iter_mut().zip(image.chunks_exact(c)) {
            *o = f32::from_bits(px.iter().fold(0, |a, &x| max(a, bits(x))));
        }
    }
    m.iter().fold((u32::MAX, 0u32), |(lo, hi), &v| {
        let b = v.to_bits();
        (if b < lo { b } else { lo }, if b > hi { b } else { hi })
    })
}

/// `(m − min) / (max − min + 1e-7)` with min and max over every axis but
/// the first (tf-keras-vis's `normalize`).
///
/// # Errors
/// [`Error::Torch`] if an op fails.
pub fn normalize_per_sample(m: &Tensor) -> Result<Tensor> {
    let size = m.size();
    let n = size.first().copied().unwrap_or(1);
    let mut bshape = vec![n];
    bshape.extend(std::iter::repeat_n(1, size.len().saturating_sub(1)));
    let flat = m.f_reshape([n, -1])?;
    let min = flat.f_amin(1, false)?.f_reshape(bshape.as_slice())?;
    let max = flat.f_amax(1, false)?.f_reshape(bshape.as_slice())?;
    Ok(m.f_sub(&min)?
        .f_div(&max.f_sub(&min)?.f_add_scalar(1e-7)?)?)
}

/// Standard normal noise shaped like `x` (`(N, ...)`), image `n` drawn from
/// the stream `(seed, input, keys[n], sample)`.
fn gaussian_like(x: &Tensor, seed: u64, input: u64, sample: u64, keys: &[u64]) -> Result<Tensor> {
    let size = x.size();
    let per: usize = size
        .iter()
        .skip(1)
        .map(|&d| usize::try_from(d).unwrap_or(0))
        .product();
    let n = usize::try_from(size.first().copied().unwrap_or(0)).unwrap_or(0);
    if n != keys.len() {
        return Err(Error::BatchMismatch {
            what: "noise keys",
            expected: n,
            got: keys.len(),
        });
    }
    // Written in place: the values straight into the tensor's memory.
    let noise = Tensor::f_empty(size.as_slice(), (Kind::Float, Device::Cpu))?;
    // SAFETY: `noise` is a new contiguous float32 CPU tensor of n × per
    // values that nothing else refers to; the slice ends with this block.
    let data = unsafe { std::slice::from_raw_parts_mut(noise.data_ptr() as *mut f32, n * per) };
    // One independent stream per image: filled in parallel, same values
    // whatever the number of threads.
    use rayon::prelude::*;
    data.par_chunks_mut(per.max(1))
        .zip(keys.par_iter())
        .for_each(|(chunk, &key)| {
            let mut rng = SplitMix64::new(mix(&[seed, input, key, sample]));
            fill_normal(&mut rng, chunk);
        });
    Ok(noise
        .f_to_device(x.device())?
        .f_to_kind(match x.f_kind()? {
            Kind::Double => Kind::Double,
            _ => Kind::Float,
        })?)
}

pub(crate) fn mix(parts: &[u64]) -> u64 {
    let mut h = 0x243F_6A88_85A3_08D3u64;
    for &p in parts {
        h = SplitMix64::new(h ^ p).next_u64();
    }
    h
}

/// SplitMix64 (Steele, Lea and Flood, 2014).
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    pub(crate) fn next_open(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// Standard normal values into `out`: Box–Muller on pairs of uniforms
/// `(u1, u2)` drawn in turn from `rng`, `r = sqrt(−2 ln u1)`, then
/// `r cos(2π u2)` and `r sin(2π u2)`, in f64 and rounded to f32.
///
/// The logarithm, sine and cosine are tch-vis's own ([`box_muller`]) rather
/// than the C library's: plain arithmetic that the compiler vectorises, so
/// the noise of a 224 × 224 × 3 image takes 0.67 ms on one core here
/// instead of 2.5 ms (the uniforms' 0.16 ms included), and is the same
/// bits under every C library. They are within a few units in the
/// last place of f64, so the f32 values are the library functions' except
/// where one lies within that of an f32 rounding boundary (none of the
/// 2,000,000 values of the unit test; one f32 step where it happens).
fn fill_normal(rng: &mut SplitMix64, out: &mut [f32]) {
    /// Pairs drawn, then transformed, at a time.
    const BLOCK: usize = 256;
    let mut u1 = [0f64; BLOCK];
    let mut u2 = [0f64; BLOCK];
    for chunk in out.chunks_mut(2 * BLOCK) {
        let pairs = chunk.len().div_ceil(2);
        for k in 0..pairs {
            u1[k] = rng.next_open();
            u2[k] = rng.next_open();
        }
        let mut pair = [0f32; 2 * BLOCK];
        box_muller_block(&u1[..pairs], &u2[..pairs], &mut pair[..2 * pairs]);
        chunk.copy_from_slice(&pair[..chunk.len()]);
    }
}

/// [`box_muller`] over `u1` and `u2` into `out` (two values a pair),
/// compiled for AVX2 where the CPU has it (four lanes instead of SSE2's
/// two; no FMA, so the same bits).
fn box_muller_block(u1: &[f64], u2: &[f64], out: &mut [f32]) {
    with_avx2!(
        box_muller_block_avx2(u1, u2, out),
        else box_muller_each(u1, u2, out)
    )
}

/// [`box_muller_each`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn box_muller_block_avx2(u1: &[f64], u2: &[f64], out: &mut [f32]) {
    box_muller_each(u1, u2, out);
}

#[inline(always)]
fn box_muller_each(u1: &[f64], u2: &[f64], out: &mut [f32]) {
    for ((o, &a), &b) in out.chunks_exact_mut(2).zip(u1).zip(u2) {
        let (c, s) = box_muller(a, b);
        o[0] = c;
        o[1] = s;
    }
}

/// `(r cos 2πu2, r sin 2πu2)` with `r = sqrt(−2 ln u1)`, for `u1` in
/// (0, 1] (normal, positive floats) and `u2` in [0, 1]; branch-free.
///
/// - `ln u1`: `u1 = 2^e m` with `m` in [√½, √2), `s = (m − 1) / (m + 1)`
///   (`m − 1` exact), `ln m = 2 atanh s` from its series to `s^23` (`|s|
///   < 0.172`: the next term is below 1e-19), plus `e ln 2`.
/// - `2πu2` is reduced in `u2`'s units, exactly: `u2 = q/4 + f` with `q`
///   the nearest quarter and `|f| ≤ 1/8`; `x = 2πf` is within ±π/4, where
///   the Taylor series of sine to `x^17` and of cosine to `x^16` are within
///   1e-17, and `q` picks the signs and which is which.
#[inline(always)]
fn box_muller(u1: f64, u2: f64) -> (f32, f32) {
    /// `1 / (2k + 1)`, k = 1..=11.
    const ATANH: [f64; 11] = [
        1.0 / 3.0,
        1.0 / 5.0,
        1.0 / 7.0,
        1.0 / 9.0,
        1.0 / 11.0,
        1.0 / 13.0,
        1.0 / 15.0,
        1.0 / 17.0,
        1.0 / 19.0,
        1.0 / 21.0,
        1.0 / 23.0,
    ];
    /// `(−1)^k / (2k + 1)!`, k = 1..=8.
    const SIN: [f64; 8] = [
        -1.0 / 6.0,
        1.0 / 120.0,
        -1.0 / 5_040.0,
        1.0 / 362_880.0,
        -1.0 / 39_916_800.0,
        1.0 / 6_227_020_800.0,
        -1.0 / 1_307_674_368_000.0,
        1.0 / 355_687_428_096_000.0,
    ];
    /// `(−1)^k / (2k)!`, k = 1..=8.
    const COS: [f64; 8] = [
        -1.0 / 2.0,
        1.0 / 24.0,
        -1.0 / 720.0,
        1.0 / 40_320.0,
        -1.0 / 3_628_800.0,
        1.0 / 479_001_600.0,
        -1.0 / 87_178_291_200.0,
        1.0 / 20_922_789_888_000.0,
    ];
    // 2^52: integers below it, added to it, are its last mantissa bits
    // (and come back exactly by subtracting it). Conversions between
    // floats and integers this way stay in 64-bit lanes, which AVX2 has
    // no conversion instructions for.
    const TWO52: f64 = 4_503_599_627_370_496.0;
    // ln u1.
    let bits = u1.to_bits();
    let mantissa = bits & 0x000f_ffff_ffff_ffff;
    let high = mantissa > 0x0006_a09e_667f_3bcc;
    // m in [√½, √2): the exponent of [1, 2), or of [½, 1) above √2.
    let m = f64::from_bits(
        mantissa
            | if high {
                0x3fe0_0000_0000_0000
            } else {
                0x3ff0_0000_0000_0000
            },
    );
    let field = f64::from_bits(TWO52.to_bits() | (bits >> 52)) - TWO52;
    let e = field - 1023.0 + if high { 1.0 } else { 0.0 };
    let s = (m - 1.0) / (m + 1.0);
    let z = s * s;
    let mut series = ATANH[10];
    for &c in ATANH[..10].iter().rev() {
        series = series * z + c;
    }
    let ln = e * std::f64::consts::LN_2 + 2.0 * (s + s * (z * series));
    let r = (-2.0 * ln).sqrt();
    // cos and sin of 2π u2: the nearest quarter q (4 u2 rounded to an
    // integer by adding 2^52, exactly, ties to even).
    let rounded = u2 * 4.0 + TWO52;
    let q = rounded.to_bits();
    let x = (u2 - (rounded - TWO52) * 0.25) * std::f64::consts::TAU;
    let x2 = x * x;
    let mut sin = SIN[7];
    let mut cos = COS[7];
    for k in (0..7).rev() {
        sin = sin * x2 + SIN[k];
        cos = cos * x2 + COS[k];
    }
    let sin = x + x * (x2 * sin);
    let cos = 1.0 + x2 * cos;
    // Quarter q: (cos, sin) of x + qπ/2.
    let (c, s) = if q & 1 == 0 { (cos, sin) } else { (-sin, cos) };
    let (c, s) = if q & 2 == 0 { (c, s) } else { (-c, -s) };
    ((r * c) as f32, (r * s) as f32)
}

/// A stable 64-bit key for a name (FNV-1a), for [`Saliency::compute_keyed`];
/// never 0, which marks padding rows in the batch engine.
pub fn key_for(name: &str) -> u64 {
    // 0 marks a batch's padding rows (see `batch::Method::compute`).
    crate::io::Fnv::of(name.as_bytes()).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn normalisation_is_per_sample_min_max() {
        let g = Tensor::from_slice(&[1f32, 3., 2., 5., 0., 0., 0., 4.]).view([2, 1, 2, 2]);
        let m = normalized_map(&g).unwrap();
        assert_eq!(m.size(), vec![2, 2, 2]);
        let v = Vec::<f32>::try_from(&m.reshape([-1])).unwrap();
        let want = [0.0, 0.5, 0.25, 1.0, 0.0, 0.0, 0.0, 1.0];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
    }

    #[test]
    fn channel_max_comes_first() {
        // channels [1, 0] and [0, 2]: max over channels = [1, 2] -> [0, 1].
        let g = Tensor::from_slice(&[1f32, 0., 0., 2.]).view([1, 2, 1, 2]);
        let v = Vec::<f32>::try_from(&normalized_map(&g).unwrap().reshape([-1])).unwrap();
        assert!(v[0].abs() < 1e-6 && (v[1] - 1.0).abs() < 1e-6, "{v:?}");
    }

    /// The one-pass map of a CPU gradient is libtorch's `normalized_map` of
    /// `|g|` bit for bit, contiguous and channels-last, for 1, 3 and 4
    /// channels, with ties, a constant image and signed zeros; a gradient
    /// with a NaN, and other layouts, take libtorch's path (NaN kept).
    #[test]
    fn fused_map_equals_libtorch_bit_for_bit() {
        let bits = |t: &Tensor| {
            let v = Vec::<f32>::try_from(&t.contiguous().reshape([-1])).unwrap();
            v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>()
        };
        for c in [1, 3, 4] {
            let g = Tensor::randn([3, c, 9, 11], (Kind::Float, Device::Cpu)) * 1e-3;
            // Image 1 constant (a zero span); image 2 with ties and -0.
            let _ = g.get(1).fill_(-0.25);
            let _ = g.get(2).narrow(2, 0, 4).fill_(-0.0);
            let _ = g.get(2).narrow(2, 4, 2).fill_(0.5);
            for channels_last in [false, true] {
                let x = if channels_last {
                    g.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
                } else {
                    g.shallow_clone()
                };
                // One channel: channels-last is contiguous.
                assert_eq!(fused_layout(&x), Some(channels_last && c > 1));
                let want = normalized_map(&x.abs()).unwrap();
                let got = fused_abs_map(&x).unwrap().expect("fused");
                assert_eq!(got.size(), vec![3, 9, 11]);
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "c {c}, channels-last {channels_last}"
                );
                assert_eq!(bits(&abs_normalized_map(&x).unwrap()), bits(&want));
            }
        }
        // A NaN: libtorch's path, NaN propagated as before.
        let g = Tensor::randn([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        let _ = g.get(0).get(1).get(2).get(3).fill_(f64::NAN);
        assert!(fused_abs_map(&g).unwrap().is_none());
        let got = abs_normalized_map(&g).unwrap();
        let want = normalized_map(&g.abs()).unwrap();
        assert!(got.get(0).isnan().all().int64_value(&[]) == 1);
        assert_eq!(bits(&got), bits(&want));
        // A transposed view: not read in place.
        assert_eq!(fused_layout(&g.transpose(2, 3)), None);
    }

    /// tch-vis's Box–Muller against the C library's logarithm, sine and
    /// cosine on the same uniforms: 2,000,000 values, each the same f32
    /// or (where one lies at an f32 rounding boundary) one step off.
    #[test]
    fn noise_is_the_c_librarys_box_muller_to_the_f32() {
        let n = 2_000_000;
        let mut got = vec![0f32; n];
        fill_normal(&mut SplitMix64::new(7), &mut got);
        let mut rng = SplitMix64::new(7);
        let mut differ = 0;
        for pair in got.chunks(2) {
            let u1 = rng.next_open();
            let u2 = rng.next_open();
            let r = (-2.0 * u1.ln()).sqrt();
            let t = std::f64::consts::TAU * u2;
            for (g, w) in pair
                .iter()
                .zip([(r * t.cos()) as f32, (r * t.sin()) as f32])
            {
                if g.to_bits() != w.to_bits() {
                    differ += 1;
                    assert!(
                        (g.to_bits() as i64 - w.to_bits() as i64).abs() <= 1,
                        "{g} against {w} ({u1}, {u2})"
                    );
                }
            }
        }
        assert!(differ <= 2, "{differ} of {n} values differ by one step");
        // The AVX2 build of the loop gives the baseline build's bits.
        let mut rng = SplitMix64::new(3);
        let u: Vec<f64> = (0..2000).map(|_| rng.next_open()).collect();
        let (mut a, mut b) = (vec![0f32; 2000], vec![0f32; 2000]);
        box_muller_block(&u[..1000], &u[1000..], &mut a);
        box_muller_each(&u[..1000], &u[1000..], &mut b);
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        // The ends of the ranges: u1 = 1 gives 0; the smallest u1 the
        // generator draws, 2^-53, gives r = sqrt(106 ln 2).
        assert_eq!(box_muller(1.0, 0.3), (0.0, 0.0));
        let r = (106.0 * std::f64::consts::LN_2).sqrt();
        for u2 in [
            0.0,
            0.125,
            0.25,
            0.375,
            0.5,
            0.625,
            0.75,
            0.875,
            1.0,
            1e-9,
            1.0 - 1e-9,
        ] {
            let t = std::f64::consts::TAU * u2;
            let (c, s) = box_muller(2f64.powi(-53), u2);
            let (wc, ws) = ((r * t.cos()) as f32, (r * t.sin()) as f32);
            assert!(
                (c - wc).abs() <= 1e-6 && (s - ws).abs() <= 1e-6,
                "{u2}: {c} {s} against {wc} {ws}"
            );
        }
    }

    /// An image's noise key: FNV-1a of its name (pinned: resumed runs'
    /// noise depends on it).
    #[test]
    fn keys_are_fnv1a_of_the_name() {
        assert_eq!(key_for("img_001.png"), 12_138_184_581_704_668_813);
    }

    #[test]
    fn noise_is_keyed_and_standard() {
        let x = Tensor::zeros([2, 1, 50, 40], (Kind::Float, Device::Cpu));
        let a = gaussian_like(&x, 1, 0, 0, &[10, 11]).unwrap();
        let b = gaussian_like(&x.narrow(0, 1, 1), 1, 0, 0, &[11]).unwrap();
        assert!(
            a.narrow(0, 1, 1).equal(&b),
            "image noise depends on its key only"
        );
        let mean = a.mean(Kind::Float).double_value(&[]);
        let std = a.std(true).double_value(&[]);
        assert!(
            mean.abs() < 0.05 && (std - 1.0).abs() < 0.05,
            "{mean} {std}"
        );
        let c = gaussian_like(&x, 2, 0, 0, &[10, 11]).unwrap();
        assert!(!a.equal(&c));
    }
}
