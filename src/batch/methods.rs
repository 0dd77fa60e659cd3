//! The built-in [`Method`]s: scores only, saliency / SmoothGrad, the CAMs
//! and Integrated Gradients (both also averaged over SmoothGrad's noise).

use tch::Tensor;

use super::{BatchArray, BatchResult, Method};
use crate::cam::{AlphaNorm, Cam, CamMethod, CamResize, ScoreCamWeights};
use crate::error::{Error, Result};
use crate::integrated_gradients::{Baseline, IntegratedGradients, Rule};
use crate::model::Model;
use crate::preprocess::Sidecar;
use crate::saliency::{clean_pass, normalized_map, Noise, Saliency};
use crate::scores::{self, Score, ScoreSpec};

/// Scores as a method takes them: parsed specifications (checked against
/// the model's outputs before the first image) or score objects.
pub(crate) struct ScoreSet {
    specs: Vec<ScoreSpec>,
    scores: Vec<Box<dyn Score + Send + Sync>>,
}

impl ScoreSet {
    /// From specifications; none means `predicted` for a one-output model.
    /// A list of classes (one per sample of a batch) is refused: a batch
    /// job applies a score to every image.
    pub(crate) fn from_specs(specs: &[ScoreSpec]) -> Result<Self> {
        if let Some(spec) = specs
            .iter()
            .find(|s| matches!(s, ScoreSpec::Categorical(v) if v.len() != 1))
        {
            return Err(Error::ScoreSpec {
                spec: spec.to_string(),
                reason: "a batch job applies one class to every image (categorical:I); a list of classes, one per sample, fits a batch of your own (Model::gradients), not a folder's images".into(),
            });
        }
        let specs = if specs.is_empty() {
            vec![ScoreSpec::Predicted]
        } else {
            specs.to_vec()
        };
        let scores = specs
            .iter()
            .map(ScoreSpec::to_score)
            .collect::<Result<Vec<_>>>()?;
        Ok(ScoreSet { specs, scores })
    }

    pub(crate) fn from_scores(scores: Vec<Box<dyn Score + Send + Sync>>) -> Self {
        ScoreSet {
            specs: Vec::new(),
            scores,
        }
    }

    pub(crate) fn refs(&self) -> Vec<&dyn Score> {
        self.scores
            .iter()
            .map(|b| b.as_ref() as &dyn Score)
            .collect()
    }

    /// One score per output, and each specification fits its output.
    pub(crate) fn check(&self, outputs: &[Tensor]) -> Result<()> {
        if self.specs.is_empty() {
            // Score objects: only their number can be checked here.
            if outputs.len() != self.scores.len() {
                return Err(Error::ScoreCount {
                    outputs: outputs.len(),
                    scores: self.scores.len(),
                });
            }
            return Ok(());
        }
        ScoreSpec::check_outputs(&self.specs, outputs)
    }

    /// The classes each score takes on `outputs`.
    pub(crate) fn classes(&self, outputs: &[Tensor]) -> Result<Vec<Option<Vec<usize>>>> {
        self.scores
            .iter()
            .zip(outputs)
            .map(|(s, o)| s.classes(o))
            .collect()
    }
}

/// Scores only: one forward pass without gradient, no arrays.
pub struct ScoresMethod {
    scores: ScoreSet,
}

impl ScoresMethod {
    /// Scores from specifications, one per model output (none: `predicted`
    /// for a one-output model).
    ///
    /// # Errors
    /// [`Error::Empty`] for a categorical specification without classes.
    pub fn new(specs: &[ScoreSpec]) -> Result<Self> {
        Ok(ScoresMethod {
            scores: ScoreSet::from_specs(specs)?,
        })
    }

    /// Scores from score objects, one per model output.
    pub fn from_scores(scores: Vec<Box<dyn Score + Send + Sync>>) -> Self {
        ScoresMethod {
            scores: ScoreSet::from_scores(scores),
        }
    }
}

impl Method for ScoresMethod {
    fn name(&self) -> &str {
        "scores"
    }

    fn arrays(&self) -> Vec<(String, bool)> {
        Vec::new()
    }

    fn check(&self, _model: &Model, _x: &Tensor, outputs: &[Tensor]) -> Result<()> {
        self.scores.check(outputs)
    }

    fn input_through_model_only(&self) -> bool {
        true
    }

    fn compute(&self, model: &Model, x: &Tensor, _keys: &[u64]) -> Result<BatchResult> {
        let outputs = model.forward(&[x.shallow_clone()])?;
        self.scores.check(&outputs)?;
        let _guard = tch::no_grad_guard();
        let values = scores::evaluate_each(&outputs, &self.scores.refs())?;
        Ok(BatchResult {
            scores: values,
            classes: self.scores.classes(&outputs)?,
            arrays: Vec::new(),
            columns: Vec::new(),
        })
    }
}

/// Vanilla saliency or SmoothGrad ([`Saliency`]): the array `saliency`
/// (`(H, W)` maps in `[0, 1]`, with a heatmap) and, on request, `grad`
/// (the signed input gradient, `(C, H, W)`).
pub struct SaliencyMethod {
    scores: ScoreSet,
    smooth_samples: usize,
    smooth_noise: f64,
    seed: u64,
    save_gradients: bool,
}

impl SaliencyMethod {
    /// Saliency of scores from specifications, one per model output (none:
    /// `predicted` for a one-output model); vanilla, no gradient array.
    ///
    /// # Errors
    /// [`Error::Empty`] for a categorical specification without classes.
    pub fn new(specs: &[ScoreSpec]) -> Result<Self> {
        Ok(Self::with(ScoreSet::from_specs(specs)?))
    }

    /// Saliency of score objects, one per model output.
    pub fn from_scores(scores: Vec<Box<dyn Score + Send + Sync>>) -> Self {
        Self::with(ScoreSet::from_scores(scores))
    }

    fn with(scores: ScoreSet) -> Self {
        SaliencyMethod {
            scores,
            smooth_samples: 0,
            smooth_noise: 0.2,
            seed: 0,
            save_gradients: false,
        }
    }

    /// SmoothGrad samples (0: vanilla), noise level and seed (see
    /// [`Saliency`]).
    pub fn smooth(mut self, samples: usize, noise: f64, seed: u64) -> Self {
        self.smooth_samples = samples;
        self.smooth_noise = noise;
        self.seed = seed;
        self
    }

    /// Also returns the signed gradient as the array `grad`.
    pub fn save_gradients(mut self, yes: bool) -> Self {
        self.save_gradients = yes;
        self
    }
}

impl Method for SaliencyMethod {
    fn name(&self) -> &str {
        "saliency"
    }

    fn arrays(&self) -> Vec<(String, bool)> {
        let mut a = vec![("saliency".to_string(), true)];
        if self.save_gradients {
            a.push(("grad".to_string(), false));
        }
        a
    }

    fn check(&self, _model: &Model, _x: &Tensor, outputs: &[Tensor]) -> Result<()> {
        self.scores.check(outputs)
    }

    /// Vanilla saliency: SmoothGrad adds its noise in float32.
    fn input_through_model_only(&self) -> bool {
        self.smooth_samples == 0
    }

    /// With SmoothGrad, the images' noisy samples are packed a batch to a
    /// model call (`Saliency::smooth_packed`): padding rows (key 0) cost no
    /// samples and get zero maps, and a short last batch costs only its
    /// images.
    fn compute(&self, model: &Model, x: &Tensor, keys: &[u64]) -> Result<BatchResult> {
        self.run(model, x, keys, self.smooth_samples)
    }

    /// SmoothGrad's probe takes one sample: the same layout, and the same
    /// model call and memory per sample, where all of them would cost as
    /// many passes before the first image (on CUDA the probe runs up to
    /// three times). On 2 cores: start-up 0.25 → 0.024 s for 800 samples of
    /// the digits CNN at batch 1, 1.2 → 0.24 s for 20 samples of resnet18
    /// at batch 8.
    fn probe(&self, model: &Model, x: &Tensor, keys: &[u64]) -> Result<BatchResult> {
        self.run(model, x, keys, self.smooth_samples.min(1))
    }
}

impl SaliencyMethod {
    fn run(&self, model: &Model, x: &Tensor, keys: &[u64], samples: usize) -> Result<BatchResult> {
        let saliency = Saliency::new(model)
            .smooth_samples(samples)
            .smooth_noise(self.smooth_noise)
            .seed(self.seed);
        let refs = self.scores.refs();
        let rows = keys.len();
        let images = images_in(keys);
        // The whole batch at once: vanilla saliency, and the engine's probe
        // (every row padding).
        let res = if samples == 0 || rows != x.size()[0] as usize || images == 0 {
            saliency.compute_keyed(&[x.shallow_clone()], &refs, keys)?
        } else {
            saliency.smooth_packed(x, keys, images, &refs)?
        };
        let map = res.maps.into_iter().next().ok_or(Error::Empty {
            what: "saliency maps",
        })?;
        let mut arrays = vec![BatchArray {
            name: "saliency".into(),
            heat: Some(map.shallow_clone()),
            values: map,
        }];
        if self.save_gradients {
            let g = res
                .gradients
                .into_iter()
                .next()
                .ok_or(Error::Empty { what: "gradients" })?;
            arrays.push(BatchArray {
                name: "grad".into(),
                values: g,
                heat: None,
            });
        }
        Ok(BatchResult {
            scores: res.scores,
            classes: res.classes,
            arrays,
            columns: Vec::new(),
        })
    }
}

/// Class activation maps ([`Cam`]): the array `cam`, `(H, W)` maps in
/// `[0, 1]` at the model's input size, with a heatmap. The model must have
/// `forward_features` and `forward_head` ([`Model::check_cam`]).
pub struct CamMapMethod {
    scores: ScoreSet,
    method: CamMethod,
    score_cam_batch: usize,
    max_n: usize,
    tf_keras_vis: bool,
    noise: Noise,
}

impl CamMapMethod {
    /// `method`'s maps of scores from specifications, one per model output
    /// (none: `predicted` for a one-output model).
    ///
    /// # Errors
    /// [`Error::Empty`] for a categorical specification without classes.
    pub fn new(method: CamMethod, specs: &[ScoreSpec]) -> Result<Self> {
        Ok(Self::with(method, ScoreSet::from_specs(specs)?))
    }

    /// `method`'s maps of score objects, one per model output.
    pub fn from_scores(method: CamMethod, scores: Vec<Box<dyn Score + Send + Sync>>) -> Self {
        Self::with(method, ScoreSet::from_scores(scores))
    }

    fn with(method: CamMethod, scores: ScoreSet) -> Self {
        CamMapMethod {
            scores,
            method,
            score_cam_batch: 64,
            max_n: 10,
            tf_keras_vis: false,
            noise: NO_NOISE,
        }
    }

    /// Masked inputs per Score-CAM forward pass ([`Cam::score_cam_batch`]).
    pub fn score_cam_batch(mut self, n: usize) -> Self {
        self.score_cam_batch = n.max(1);
        self
    }

    /// Channels kept by Faster-Score-CAM ([`Cam::max_n`]).
    pub fn max_n(mut self, n: usize) -> Self {
        self.max_n = n.max(1);
        self
    }

    /// tf-keras-vis's variants instead of pytorch-grad-cam's
    /// ([`Cam::tf_keras_vis`]).
    pub fn tf_keras_vis(mut self, yes: bool) -> Self {
        self.tf_keras_vis = yes;
        self
    }

    /// Each image's map averaged over `samples` noisy copies of its input
    /// (0, the default: the map of the input itself), with SmoothGrad's
    /// noise ([`SaliencyMethod::smooth`]: σ = `noise` × (max − min) of the
    /// image's input, drawn from `seed` and the image's key) and each
    /// copy's class fixed by the clean input (`predicted` keeps the clean
    /// image's class). The maps of the copies are averaged as they are
    /// (each scaled to [0, 1], as pytorch-grad-cam averages its smoothing's
    /// maps); the scores are the clean input's. A negative or non-finite
    /// `noise` fails the first batch.
    pub fn smooth(mut self, samples: usize, noise: f64, seed: u64) -> Self {
        self.noise = Noise::new(samples, noise, seed);
        self
    }

    fn cam<'m>(&self, model: &'m Model) -> Cam<'m> {
        let cam = Cam::new(model, self.method)
            .score_cam_batch(self.score_cam_batch)
            .max_n(self.max_n);
        if self.tf_keras_vis {
            cam.tf_keras_vis()
        } else {
            cam.resize(CamResize::HalfPixel)
                .alpha(AlphaNorm::None)
                .score_cam_weights(ScoreCamWeights::ChannelSoftmax)
        }
    }
}

impl Method for CamMapMethod {
    fn name(&self) -> &str {
        self.method.name()
    }

    fn arrays(&self) -> Vec<(String, bool)> {
        vec![("cam".to_string(), true)]
    }

    /// Either form of the CAM convention; the scores are checked against
    /// the outputs they score (for the dict form, the entries other than
    /// the feature maps).
    fn check(&self, model: &Model, x: &Tensor, outputs: &[Tensor]) -> Result<()> {
        if model.has_cam_methods() {
            self.scores.check(outputs)
        } else {
            // The dict form's outputs (an error for a model of neither form).
            self.scores.check(&model.cam_outputs(x)?)
        }
    }

    /// The gradient CAMs without noise: Score-CAM masks the input in
    /// float32, and noise is added in float32.
    fn input_through_model_only(&self) -> bool {
        self.method.uses_gradients() && self.noise.samples == 0
    }

    /// Score-CAM's probe would take one forward pass per channel (512 on
    /// a resnet18, a minute on a CPU): Grad-CAM has the same layout.
    /// With noise, the probe takes one copy (the same layout).
    fn probe(&self, model: &Model, x: &Tensor, keys: &[u64]) -> Result<BatchResult> {
        if self.method.uses_gradients() {
            return self.run(model, x, keys, self.noise.samples.min(1));
        }
        let grad_cam = CamMapMethod {
            scores: ScoreSet::from_scores(Vec::new()),
            method: CamMethod::GradCam,
            score_cam_batch: self.score_cam_batch,
            max_n: self.max_n,
            tf_keras_vis: self.tf_keras_vis,
            noise: NO_NOISE,
        };
        let res = grad_cam.cam(model).compute(x, &self.scores.refs())?;
        Ok(Self::result(res))
    }

    fn compute(&self, model: &Model, x: &Tensor, keys: &[u64]) -> Result<BatchResult> {
        self.run(model, x, keys, self.noise.samples)
    }
}

impl CamMapMethod {
    fn run(&self, model: &Model, x: &Tensor, keys: &[u64], samples: usize) -> Result<BatchResult> {
        // Padding rows (key 0) come last: Score-CAM skips them.
        let images = images_in(keys);
        let plain = |x: &Tensor, scores: &[&dyn Score]| -> Result<BatchResult> {
            Ok(Self::result(
                self.cam(model).images(images).compute(x, scores)?,
            ))
        };
        let refs = self.scores.refs();
        if samples == 0 {
            return plain(x, &refs);
        }
        let noise = Noise {
            samples,
            ..self.noise
        };
        let clean = clean_pass(model.cam_outputs(x)?, x.device(), &refs)?;
        let fixed = scores::fixed_or_given(&clean.fixed, &refs);
        smoothed(
            x,
            keys,
            &noise,
            (clean.scores, clean.classes),
            &|noisy| plain(noisy, &fixed),
            &|m| Ok(m.shallow_clone()),
        )
    }

    fn result(res: crate::cam::CamMaps) -> BatchResult {
        BatchResult {
            scores: res.scores,
            classes: res.classes,
            arrays: vec![BatchArray {
                name: "cam".into(),
                heat: Some(res.maps.shallow_clone()),
                values: res.maps,
            }],
            columns: Vec::new(),
        }
    }
}

/// Where Integrated Gradients' path starts, as a method keeps it.
#[derive(Debug)]
pub enum IgBaseline {
    /// The all-zero model input (captum's `baselines=0`).
    Zero,
    /// Every element of the model input equal to this value.
    Constant(f64),
    /// A Gaussian blur of each input, `sigma` pixels.
    Blur(f64),
    /// Black in image space: `(0 - mean) / std` of the sidecar, a non-zero
    /// model input.
    Black,
}

/// Integrated Gradients ([`IntegratedGradients`]): the array `ig`,
/// `(C, H, W)` attributions, with a heatmap of their channel-max
/// magnitude (normalised per image as saliency maps are), and the
/// per-image column `ig_delta` (sum of attributions minus
/// F(x) − F(baseline)).
pub struct IgMethod {
    scores: ScoreSet,
    steps: usize,
    rule: Rule,
    start: Start,
    internal_batch_size: Option<usize>,
    noise: Noise,
}

/// An [`IgBaseline`] resolved against the sidecar: black is its
/// per-channel model input (kept as numbers: a tensor is not `Sync`).
#[derive(Debug)]
enum Start {
    Zero,
    Constant(f64),
    Blur(f64),
    PerChannel(Vec<f32>),
}

impl IgMethod {
    /// Integrated Gradients of scores from specifications, one per model
    /// output (none: `predicted` for a one-output model): 50 steps of
    /// Gauss-Legendre from the zero input.
    ///
    /// # Errors
    /// [`Error::Empty`] for a categorical specification without classes.
    pub fn new(specs: &[ScoreSpec]) -> Result<Self> {
        Ok(IgMethod {
            scores: ScoreSet::from_specs(specs)?,
            steps: 50,
            rule: Rule::GaussLegendre,
            start: Start::Zero,
            internal_batch_size: None,
            noise: NO_NOISE,
        })
    }

    /// Steps along the path (checked by [`super::Engine::prepare`]:
    /// [`Rule::check_steps`] says which counts a rule takes).
    pub fn steps(mut self, steps: usize) -> Self {
        self.steps = steps;
        self
    }

    /// The integration rule.
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rule = rule;
        self
    }

    /// The baseline; `sidecar` gives black's model input.
    ///
    /// # Errors
    /// As [`Baseline::black`].
    pub fn baseline(mut self, baseline: IgBaseline, sidecar: &Sidecar) -> Result<Self> {
        self.start = match baseline {
            IgBaseline::Zero => Start::Zero,
            IgBaseline::Constant(v) => Start::Constant(v),
            IgBaseline::Blur(sigma) => Start::Blur(sigma),
            IgBaseline::Black => match Baseline::black(sidecar)? {
                Baseline::Tensor(t) => Start::PerChannel(Vec::<f32>::try_from(
                    &t.f_to_kind(tch::Kind::Float)?.f_reshape([-1])?,
                )?),
                other => {
                    return Err(Error::Internal {
                        what: format!("black baseline resolved to {other:?}"),
                    })
                }
            },
        };
        Ok(self)
    }

    /// Most rows per model call ([`IntegratedGradients::internal_batch_size`]).
    pub fn internal_batch_size(mut self, rows: usize) -> Self {
        self.internal_batch_size = Some(rows.max(1));
        self
    }

    /// Each image's attributions averaged over `samples` noisy copies of
    /// its input (captum's `NoiseTunnel` with `nt_type="smoothgrad"`; 0,
    /// the default: the input itself), with SmoothGrad's noise
    /// ([`SaliencyMethod::smooth`]: σ = `noise` × (max − min) of the
    /// image's input, drawn from `seed` and the image's key), each copy's
    /// class fixed by the clean input, and the baseline as set (a blur
    /// baseline blurs each copy). `ig_delta` is the mean of the copies'
    /// deltas; the scores are the clean input's; the heatmap is that of
    /// the mean attributions. A negative or non-finite `noise` fails the
    /// first batch.
    pub fn smooth(mut self, samples: usize, noise: f64, seed: u64) -> Self {
        self.noise = Noise::new(samples, noise, seed);
        self
    }

    fn baseline_now(&self) -> Result<Baseline> {
        Ok(match &self.start {
            Start::Zero => Baseline::Zero,
            Start::Constant(v) => Baseline::Constant(*v),
            Start::Blur(sigma) => Baseline::Blur { sigma: *sigma },
            Start::PerChannel(v) => {
                Baseline::Tensor(Tensor::f_from_slice(v)?.f_view([v.len() as i64, 1, 1])?)
            }
        })
    }
}

impl Method for IgMethod {
    fn name(&self) -> &str {
        "integrated-gradients"
    }

    fn arrays(&self) -> Vec<(String, bool)> {
        vec![("ig".to_string(), true)]
    }

    /// The scores fit the outputs, and the rule takes the step count
    /// (the probe below runs the rule's fewest steps instead).
    fn check(&self, _model: &Model, _x: &Tensor, outputs: &[Tensor]) -> Result<()> {
        self.rule.check_steps(self.steps)?;
        self.scores.check(outputs)
    }

    /// The probe takes the rule's fewest steps: the layout is the same,
    /// and 50 steps would cost 50 passes before the first image.
    /// With noise, one copy.
    fn probe(&self, model: &Model, x: &Tensor, keys: &[u64]) -> Result<BatchResult> {
        let images = x.size()[0] as usize;
        self.smooth_run(
            model,
            x,
            keys,
            images,
            self.rule.min_steps(),
            self.noise.samples.min(1),
        )
    }

    /// One image at a time (padding rows, key 0, are skipped and get zero
    /// attributions): each image's path runs in passes of at most
    /// `internal_batch_size` of its own steps, so its attributions do not
    /// depend on the rest of the batch, and a short last batch costs only
    /// its images.
    fn compute(&self, model: &Model, x: &Tensor, keys: &[u64]) -> Result<BatchResult> {
        let images = images_in(keys);
        self.smooth_run(model, x, keys, images, self.steps, self.noise.samples)
    }
}

impl IgMethod {
    /// [`IgMethod::run`], averaged over `samples` noisy copies of `x`.
    fn smooth_run(
        &self,
        model: &Model,
        x: &Tensor,
        keys: &[u64],
        images: usize,
        steps: usize,
        samples: usize,
    ) -> Result<BatchResult> {
        if samples == 0 {
            return self.run(model, x, images, steps, None);
        }
        let noise = Noise {
            samples,
            ..self.noise
        };
        let refs = self.scores.refs();
        // Image by image, as the attributions' own scores come without
        // noise (another batch size sums in another order); the padding
        // rows, whose results are dropped, in one pass.
        let (n, real) = (x.size()[0], (images as i64).min(x.size()[0]));
        let mut parts: Vec<(i64, i64)> = (0..real).map(|i| (i, 1)).collect();
        if real < n {
            parts.push((real, n - real));
        }
        let rows = parts
            .into_iter()
            .map(|(i, len)| model.forward(&[x.f_narrow(0, i, len)?]))
            .collect::<Result<Vec<_>>>()?;
        let outputs = (0..rows.first().map_or(0, Vec::len))
            .map(|o| {
                Ok(Tensor::f_cat(
                    &rows.iter().map(|r| &r[o]).collect::<Vec<_>>(),
                    0,
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        let clean = clean_pass(outputs, x.device(), &refs)?;
        smoothed(
            x,
            keys,
            &noise,
            (clean.scores, clean.classes),
            &|noisy| self.run(model, noisy, images, steps, Some(&clean.outputs)),
            &|a| normalized_map(&a.f_abs()?),
        )
    }

    /// Image by image; with `clean` (the outputs of the batch before any
    /// noise), each image's scores fixed on its clean output's row.
    fn run(
        &self,
        model: &Model,
        x: &Tensor,
        images: usize,
        steps: usize,
        clean: Option<&[Tensor]>,
    ) -> Result<BatchResult> {
        let mut ig = IntegratedGradients::new(model)
            .steps(steps)
            .rule(self.rule)
            .baseline(self.baseline_now()?);
        if let Some(rows) = self.internal_batch_size {
            ig = ig.internal_batch_size(rows);
        }
        let rows = x.size()[0];
        let images = (images as i64).min(rows);
        let refs = self.scores.refs();
        let parts = (0..images)
            .map(|i| {
                let xi = x.f_narrow(0, i, 1)?;
                let Some(outputs) = clean else {
                    return ig.attribute(&xi, &refs);
                };
                let fixed = refs
                    .iter()
                    .zip(outputs)
                    .map(|(s, o)| s.fixed_on(&o.f_narrow(0, i, 1)?))
                    .collect::<Result<Vec<_>>>()?;
                ig.attribute(&xi, &scores::fixed_or_given(&fixed, &refs))
            })
            .collect::<Result<Vec<_>>>()?;
        let Some(first) = parts.first() else {
            return Err(Error::Empty { what: "images" });
        };
        let pad = rows - images;
        let stack = |f: &dyn Fn(&crate::integrated_gradients::Attributions) -> &Tensor| {
            pad_rows(parts.iter().map(f).collect(), pad)
        };
        let scores = (0..first.scores.len())
            .map(|o| stack(&|p| &p.scores[o]))
            .collect::<Result<Vec<_>>>()?;
        let classes = join_classes(parts.iter().map(|p| &p.classes).collect(), rows as usize);
        let attributions = stack(&|p| &p.attributions)?;
        let delta = stack(&|p| &p.delta)?;
        let res = crate::integrated_gradients::Attributions {
            attributions,
            delta,
            scores,
            classes,
        };
        let heat = normalized_map(&res.attributions.f_abs()?)?;
        Ok(BatchResult {
            scores: res.scores,
            classes: res.classes,
            arrays: vec![BatchArray {
                name: "ig".into(),
                values: res.attributions,
                heat: Some(heat),
            }],
            columns: vec![("ig_delta".into(), res.delta)],
        })
    }
}

/// `parts` concatenated along dim 0, then `pad` rows of zeros.
fn pad_rows(parts: Vec<&Tensor>, pad: i64) -> Result<Tensor> {
    let t = Tensor::f_cat(&parts, 0)?;
    if pad <= 0 {
        return Ok(t);
    }
    let mut shape = t.size();
    shape[0] = pad;
    let zeros = Tensor::f_zeros(shape.as_slice(), (t.f_kind()?, t.device()))?;
    Ok(Tensor::f_cat(&[t, zeros], 0)?)
}

/// Per-output classes of images computed one at a time, joined and padded
/// with class 0 to `rows`.
fn join_classes(parts: Vec<&Vec<Option<Vec<usize>>>>, rows: usize) -> Vec<Option<Vec<usize>>> {
    let Some(first) = parts.first() else {
        return Vec::new();
    };
    (0..first.len())
        .map(|o| {
            first[o].as_ref().map(|_| {
                let mut c: Vec<usize> = parts
                    .iter()
                    .flat_map(|p| p[o].clone().unwrap_or_default())
                    .collect();
                c.resize(rows, 0);
                c
            })
        })
        .collect()
}

/// No noisy copies.
const NO_NOISE: Noise = Noise::new(0, 0.2, 0);

/// `run`'s results averaged over `noise.samples` noisy copies of the batch
/// `x` ([`Noise::copy`]: an image's copies are SmoothGrad's; `run` scores
/// them on the clean input's classes): every array's values and every
/// column are the means over the copies, each heatmap is `heat` of its
/// array's mean, and the scores and classes are the clean input's, as
/// given. Copies are computed one at a time (the memory of one batch).
fn smoothed(
    x: &Tensor,
    keys: &[u64],
    noise: &Noise,
    (scores, classes): (Vec<Tensor>, Vec<Option<Vec<usize>>>),
    run: &dyn Fn(&Tensor) -> Result<BatchResult>,
    heat: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<BatchResult> {
    let mut sum: Option<BatchResult> = None;
    for s in 0..noise.samples {
        let r = run(&noise.copy(x, keys, s)?)?;
        sum = Some(match sum {
            None => r,
            Some(mut acc) => {
                for (a, b) in acc.arrays.iter_mut().zip(&r.arrays) {
                    a.values = a.values.f_add(&b.values)?;
                }
                for (a, b) in acc.columns.iter_mut().zip(&r.columns) {
                    a.1 = a.1.f_add(&b.1)?;
                }
                acc
            }
        });
    }
    let mut acc = sum.ok_or(Error::Empty {
        what: "smoothgrad samples",
    })?;
    let count = noise.samples as f64;
    for a in &mut acc.arrays {
        a.values = a.values.f_div_scalar(count)?;
        if a.heat.is_some() {
            a.heat = Some(heat(&a.values)?);
        }
    }
    for c in &mut acc.columns {
        c.1 = c.1.f_div_scalar(count)?;
    }
    acc.scores = scores;
    acc.classes = classes;
    Ok(acc)
}

/// The images of a batch's keys: the rows before the padding (key 0, last).
fn images_in(keys: &[u64]) -> usize {
    keys.iter().take_while(|&&k| k != 0).count()
}
