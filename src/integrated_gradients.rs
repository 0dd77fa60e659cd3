//! Integrated Gradients (Sundararajan, Taly and Yan, 2017, "Axiomatic
//! Attribution for Deep Networks").
//!
//! For an input `x`, a baseline `x'` and a score `F` (the sum of the scores
//! of every model output, per sample), the attribution of input element `i`
//! is
//!
//! ```text
//! IG_i(x) = (x_i − x'_i) · ∫₀¹ ∂F(x' + α (x − x')) / ∂x_i dα
//!         ≈ (x_i − x'_i) · Σ_k w_k ∂F(x' + α_k (x − x')) / ∂x_i
//! ```
//!
//! with the nodes `α_k` and weights `w_k` of an integration [`Rule`].
//! Completeness says `Σ_i IG_i(x) = F(x) − F(x')`; what the quadrature
//! misses of it is [`Attributions::delta`].
//!
//! Exact semantics, as captum's `IntegratedGradients(model).attribute(x,
//! baselines, target, n_steps, method)` with `multiply_by_inputs=True`:
//! - the path points are `x' + α_k (x − x')`, evaluated in the input's dtype;
//! - the gradients of a pass are weighted by `w_k` (as float32) and summed
//!   over the steps, then multiplied by `x − x'`;
//! - a class that the score picks from the output itself (the predicted
//!   class) is fixed on the clean input `x`, as captum's target is the argmax
//!   of `model(x)`, and held for every step of the path;
//! - `delta[n] = Σ_i IG_i(x_n) − (F(x_n) − F(x'_n))`, as captum's
//!   `compute_convergence_delta`.
//!
//! Unlike captum, scores are any [`Score`] (one per model output, summed),
//! and the steps run in passes of at most `internal_batch_size` rows (path
//! points), so memory stays that of one gradient pass of that many rows for
//! any batch size and step count. A bound below the batch size runs one step
//! of the whole batch per pass (as captum does).

use std::str::FromStr;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::preprocess::Sidecar;
use crate::scores::{self, Score};

/// The most steps an integration takes (as `--steps` on the command
/// line): Gauss-Legendre's nodes cost `steps²` to compute.
pub const MAX_STEPS: usize = 100_000;

/// How the path integral is approximated: the nodes `α_k` in `[0, 1]` and
/// their weights `w_k`, with `n` steps.
///
/// | rule | `α_k`, `k = 0..n` | `w_k` |
/// |---|---|---|
/// | [`GaussLegendre`](Rule::GaussLegendre) (default) | `(1 + x_k) / 2`, `x_k` the Gauss–Legendre nodes on `[−1, 1]` | half the Gauss–Legendre weights |
/// | [`RiemannLeft`](Rule::RiemannLeft) | `k / n` | `1 / n` |
/// | [`RiemannRight`](Rule::RiemannRight) | `(k + 1) / n` | `1 / n` |
/// | [`RiemannMiddle`](Rule::RiemannMiddle) | `(k + ½) / n` | `1 / n` |
/// | [`RiemannTrapezoid`](Rule::RiemannTrapezoid) | `k / (n − 1)` | `1 / n`, halved at both ends |
///
/// These are captum's rules, value for value: the Riemann nodes come from a
/// float32 `linspace` as captum's `torch.linspace(...).tolist()` do, and the
/// trapezoid weights are captum's (they sum to `(n − 1) / n`, not 1, so
/// trapezoid attributions are `(n − 1) / n` of the integral's; the other
/// rules' weights sum to 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rule {
    /// Gauss–Legendre quadrature (captum's default `gausslegendre`).
    #[default]
    GaussLegendre,
    /// Left Riemann sum (`riemann_left`).
    RiemannLeft,
    /// Right Riemann sum (`riemann_right`).
    RiemannRight,
    /// Midpoint Riemann sum (`riemann_middle`).
    RiemannMiddle,
    /// Trapezoid rule (`riemann_trapezoid`).
    RiemannTrapezoid,
}

impl Rule {
    /// Every rule, in the order of the table above.
    pub const ALL: [Rule; 5] = [
        Rule::GaussLegendre,
        Rule::RiemannLeft,
        Rule::RiemannRight,
        Rule::RiemannMiddle,
        Rule::RiemannTrapezoid,
    ];

    /// The rule's name, as captum spells it (`gausslegendre`,
    /// `riemann_left`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Rule::GaussLegendre => "gausslegendre",
            Rule::RiemannLeft => "riemann_left",
            Rule::RiemannRight => "riemann_right",
            Rule::RiemannMiddle => "riemann_middle",
            Rule::RiemannTrapezoid => "riemann_trapezoid",
        }
    }

    /// The smallest number of steps the rule takes (2 for the trapezoid
    /// rule, 1 for the others).
    pub fn min_steps(self) -> usize {
        match self {
            Rule::RiemannTrapezoid => 2,
            _ => 1,
        }
    }

    /// Whether the rule takes `steps` steps: [`Rule::min_steps`] to
    /// [`MAX_STEPS`].
    ///
    /// # Errors
    /// [`Error::InvalidValue`] otherwise.
    pub fn check_steps(self, steps: usize) -> Result<()> {
        if steps < self.min_steps() || steps > MAX_STEPS {
            return Err(Error::InvalidValue {
                what: "integrated gradients steps (1 to 100000, at least 2 for riemann_trapezoid)",
                value: steps.to_string(),
            });
        }
        Ok(())
    }

    /// The nodes `α_k` and weights `w_k` for `steps` steps, in increasing
    /// order of `α`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] when `steps` is below [`Rule::min_steps`]
    /// or above [`MAX_STEPS`];
    /// [`Error::Torch`] if the float32 `linspace` fails.
    pub fn nodes(self, steps: usize) -> Result<(Vec<f64>, Vec<f64>)> {
        self.check_steps(steps)?;
        let n = steps as f64;
        let steps_i = i64::try_from(steps).map_err(|_| Error::InvalidValue {
            what: "integrated gradients steps",
            value: steps.to_string(),
        })?;
        let linspace = |a: f64, b: f64| -> Result<Vec<f64>> {
            let t = Tensor::f_linspace(a, b, steps_i, (Kind::Float, Device::Cpu))?;
            Ok(Vec::<f32>::try_from(&t)?
                .into_iter()
                .map(f64::from)
                .collect())
        };
        let uniform = vec![1.0 / n; steps];
        Ok(match self {
            Rule::GaussLegendre => {
                let (x, w) = gauss_legendre(steps);
                (
                    x.iter().map(|x| 0.5 * (1.0 + x)).collect(),
                    w.iter().map(|w| 0.5 * w).collect(),
                )
            }
            Rule::RiemannLeft => (linspace(0.0, 1.0 - 1.0 / n)?, uniform),
            Rule::RiemannRight => (linspace(1.0 / n, 1.0)?, uniform),
            Rule::RiemannMiddle => (linspace(1.0 / (2.0 * n), 1.0 - 1.0 / (2.0 * n))?, uniform),
            Rule::RiemannTrapezoid => {
                let mut w = uniform;
                w[0] /= 2.0;
                w[steps - 1] /= 2.0;
                (linspace(0.0, 1.0)?, w)
            }
        })
    }
}

impl FromStr for Rule {
    type Err = Error;

    /// Parses captum's names (`gausslegendre`, `riemann_left`,
    /// `riemann_right`, `riemann_middle`, `riemann_trapezoid`); `-` may stand
    /// for `_`, `gauss-legendre` for `gausslegendre`, case is ignored.
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase().replace('-', "_");
        match t.as_str() {
            "gausslegendre" | "gauss_legendre" => Ok(Rule::GaussLegendre),
            "riemann_left" => Ok(Rule::RiemannLeft),
            "riemann_right" => Ok(Rule::RiemannRight),
            "riemann_middle" => Ok(Rule::RiemannMiddle),
            "riemann_trapezoid" => Ok(Rule::RiemannTrapezoid),
            _ => Err(Error::InvalidValue {
                what: "integration rule (expected gausslegendre, riemann_left, riemann_right, riemann_middle or riemann_trapezoid)",
                value: s.to_string(),
            }),
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The Gauss–Legendre nodes (increasing) and weights on `[−1, 1]`, by
/// Newton's method on the Legendre polynomial `P_n` (the values agree with
/// numpy's `leggauss` to a few units in the last place of an `f64`).
fn gauss_legendre(n: usize) -> (Vec<f64>, Vec<f64>) {
    let nf = n as f64;
    let mut nodes = vec![0.0; n];
    let mut weights = vec![0.0; n];
    // P_n and its derivative at x, by the three-term recurrence.
    let legendre = |x: f64| -> (f64, f64) {
        let (mut p0, mut p1) = (1.0f64, x);
        if n == 0 {
            return (1.0, 0.0);
        }
        for k in 2..=n {
            let kf = k as f64;
            let p2 = ((2.0 * kf - 1.0) * x * p1 - (kf - 1.0) * p0) / kf;
            p0 = p1;
            p1 = p2;
        }
        let dp = nf * (x * p1 - p0) / (x * x - 1.0);
        (p1, dp)
    };
    for i in 0..n.div_ceil(2) {
        // The i-th largest root, from Tricomi's first guess.
        let mut x = (std::f64::consts::PI * (i as f64 + 0.75) / (nf + 0.5)).cos();
        for _ in 0..100 {
            let (p, dp) = legendre(x);
            let dx = p / dp;
            x -= dx;
            if dx.abs() <= 1e-16 {
                break;
            }
        }
        let (_, dp) = legendre(x);
        let w = 2.0 / ((1.0 - x * x) * dp * dp);
        nodes[n - 1 - i] = x;
        weights[n - 1 - i] = w;
        nodes[i] = -x;
        weights[i] = w;
    }
    if n % 2 == 1 {
        nodes[n / 2] = 0.0;
    }
    (nodes, weights)
}

/// The point the path starts from.
///
/// Baselines are in the model's input space. Most models take a normalised
/// image `(pixel − mean) / std`, so the all-zero input [`Baseline::Zero`] is
/// the *mean* image there, not black; [`Baseline::black`] gives black.
#[derive(Debug, Default)]
pub enum Baseline {
    /// The all-zero model input (the default, and captum's `baselines=0`).
    #[default]
    Zero,
    /// Every element equal to this value.
    Constant(f64),
    /// A blurred copy of each input: a separable Gaussian of standard
    /// deviation `sigma` pixels over the last two axes (height and width),
    /// each channel on its own, kernel radius `⌈3σ⌉` (weights normalised to
    /// sum to 1), the image's border pixels repeated outside it. Inputs must
    /// be `(N, C, H, W)`.
    Blur {
        /// Standard deviation of the Gaussian, in pixels (finite, > 0).
        sigma: f64,
    },
    /// A tensor given by the caller that broadcasts to the input's shape:
    /// `(N, C, H, W)`, `(C, H, W)`, `(C, 1, 1)`, ...
    Tensor(Tensor),
}

impl Baseline {
    /// Black in image space (every pixel 0 before normalisation): the model
    /// input `(0 − mean) / std` per channel, a `(C, 1, 1)` tensor. Note that
    /// this is *not* the zero model input: with the sidecar's normalisation
    /// zero is the mean image and black is `−mean / std`.
    ///
    /// # Errors
    /// As [`Baseline::image_value`].
    pub fn black(sidecar: &Sidecar) -> Result<Self> {
        Self::image_value(sidecar, 0.0)
    }

    /// Every pixel equal to `value` in image space (`0` black, `1` white),
    /// as the model input `(value − mean) / std` per channel, a `(C, 1, 1)`
    /// tensor.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for a non-finite value; [`Error::Sidecar`]
    /// for a sidecar that fails [`Sidecar::validate`].
    pub fn image_value(sidecar: &Sidecar, value: f64) -> Result<Self> {
        if !value.is_finite() {
            return Err(Error::InvalidValue {
                what: "baseline pixel value",
                value: value.to_string(),
            });
        }
        sidecar.validate().map_err(|reason| Error::Sidecar {
            path: "<sidecar>".into(),
            reason,
        })?;
        let c = sidecar.channels as i64;
        let v: Vec<f32> = sidecar
            .mean
            .iter()
            .zip(&sidecar.std)
            .map(|(m, s)| ((value as f32) - m) / s)
            .collect();
        Ok(Baseline::Tensor(
            Tensor::f_from_slice(&v)?.f_view([c, 1, 1])?,
        ))
    }

    /// The baseline for input `x`: a tensor of `x`'s shape, dtype and
    /// device.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for a non-finite constant or a bad `sigma`;
    /// [`Error::Shape`] when a caller's tensor does not broadcast to `x`, or
    /// when blurring an input that is not `(N, C, H, W)`.
    pub fn resolve(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.f_detach()?;
        match self {
            Baseline::Zero => Ok(x.f_zeros_like()?),
            Baseline::Constant(v) => {
                if !v.is_finite() {
                    return Err(Error::InvalidValue {
                        what: "baseline constant",
                        value: v.to_string(),
                    });
                }
                Ok(x.f_full_like(*v)?)
            }
            Baseline::Blur { sigma } => gaussian_blur(&x, *sigma),
            Baseline::Tensor(t) => {
                let size = x.size();
                let b = t
                    .f_detach()?
                    .f_to_device(x.device())?
                    .f_to_kind(x.f_kind()?)?;
                let b = b.f_broadcast_to(size.as_slice()).map_err(|_| {
                    Error::shape(
                        "baseline",
                        format!("a shape that broadcasts to the input's {size:?}"),
                        &t.size(),
                    )
                })?;
                Ok(b.f_contiguous()?)
            }
        }
    }
}

/// A separable Gaussian blur of `(N, C, H, W)` over H and W, per channel,
/// border pixels repeated; see [`Baseline::Blur`].
fn gaussian_blur(x: &Tensor, sigma: f64) -> Result<Tensor> {
    if !sigma.is_finite() || sigma <= 0.0 || sigma > 1e4 {
        return Err(Error::InvalidValue {
            what: "blur sigma (finite, > 0, at most 10000 pixels)",
            value: sigma.to_string(),
        });
    }
    let size = x.size();
    let &[n, c, h, w] = size.as_slice() else {
        return Err(Error::shape("input to blur", "(N, C, H, W)", &size));
    };
    let radius = (3.0 * sigma).ceil() as i64;
    let taps: Vec<f64> = (-radius..=radius)
        .map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f64 = taps.iter().sum();
    let taps: Vec<f64> = taps.iter().map(|t| t / total).collect();
    let k = 2 * radius + 1;
    let kernel = Tensor::f_from_slice(&taps)?
        .f_to_kind(x.f_kind()?)?
        .f_to_device(x.device())?;
    let flat = x.f_reshape([n * c, 1, h, w])?;
    // Rows, then columns; replicate padding repeats the border pixels.
    let padded = flat.f_pad([0, 0, radius, radius], "replicate", None)?;
    let rows = padded.f_conv2d(
        &kernel.f_view([1, 1, k, 1])?,
        None::<Tensor>,
        [1, 1],
        [0, 0],
        [1, 1],
        1,
    )?;
    let padded = rows.f_pad([radius, radius, 0, 0], "replicate", None)?;
    let both = padded.f_conv2d(
        &kernel.f_view([1, 1, 1, k])?,
        None::<Tensor>,
        [1, 1],
        [0, 0],
        [1, 1],
        1,
    )?;
    Ok(both.f_reshape([n, c, h, w])?)
}

/// Integrated Gradients attributions, as returned by
/// [`IntegratedGradients::attribute`]. Every tensor is detached and on the
/// input's device.
#[derive(Debug)]
pub struct Attributions {
    /// The attributions, same shape and dtype as the input.
    pub attributions: Tensor,
    /// `[N]`: the sum of each sample's attributions minus
    /// `F(x) − F(baseline)`, where `F` is the sum of the scores of every
    /// output. Near zero when the steps suffice.
    pub delta: Tensor,
    /// One `[N]` tensor per model output: that output's score at the input.
    pub scores: Vec<Tensor>,
    /// One entry per model output: the class each sample was scored on, for
    /// class scores (categorical, predicted); `None` for the others.
    pub classes: Vec<Option<Vec<usize>>>,
}

/// Integrated Gradients on a [`Model`], with chainable options.
///
/// ```no_run
/// use tch::{Device, Kind, Tensor};
/// use tch_vis::integrated_gradients::{Baseline, IntegratedGradients, Rule};
/// use tch_vis::scores::{PredictedScore, Score};
/// use tch_vis::Model;
/// # fn main() -> tch_vis::Result<()> {
/// let model = Model::load("models/digits_cnn.pt", Device::Cpu)?;
/// let x = Tensor::randn([4, 1, 32, 32], (Kind::Float, Device::Cpu));
/// let score = PredictedScore::new();
/// let ig = IntegratedGradients::new(&model)
///     .steps(50)
///     .rule(Rule::GaussLegendre)
///     .baseline(Baseline::Zero)
///     .internal_batch_size(64)
///     .attribute(&x, &[&score as &dyn Score])?;
/// assert_eq!(ig.attributions.size(), vec![4, 1, 32, 32]);
/// assert_eq!(ig.delta.size(), vec![4]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct IntegratedGradients<'a> {
    model: &'a Model,
    steps: usize,
    rule: Rule,
    baseline: Baseline,
    internal_batch_size: Option<usize>,
}

impl<'a> IntegratedGradients<'a> {
    /// Integrated Gradients on `model`: 50 steps, Gauss–Legendre, the
    /// all-zero baseline, every step in one pass.
    pub fn new(model: &'a Model) -> Self {
        IntegratedGradients {
            model,
            steps: 50,
            rule: Rule::GaussLegendre,
            baseline: Baseline::Zero,
            internal_batch_size: None,
        }
    }

    /// The number of steps (path points) per sample (captum's `n_steps`).
    pub fn steps(mut self, steps: usize) -> Self {
        self.steps = steps;
        self
    }

    /// The integration rule (captum's `method`).
    pub fn rule(mut self, rule: Rule) -> Self {
        self.rule = rule;
        self
    }

    /// The baseline (captum's `baselines`).
    pub fn baseline(mut self, baseline: Baseline) -> Self {
        self.baseline = baseline;
        self
    }

    /// At most `rows` path points per forward/backward pass (captum's
    /// `internal_batch_size`): each pass runs `max(1, rows / N)` steps of
    /// the whole batch of `N`. Without it, every step runs in one pass.
    pub fn internal_batch_size(mut self, rows: usize) -> Self {
        self.internal_batch_size = Some(rows);
        self
    }

    /// The attributions of input `x` (`(N, ...)`, the model's one input) for
    /// `scores` (one per model output).
    ///
    /// `x` is not changed, nor is its `.grad`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] for too few steps or an internal batch size
    /// of 0; [`Error::Shape`] for a 0-d input or a baseline that does not
    /// fit it; [`Error::ScoreCount`] when `scores` does not have one score
    /// per output; [`Error::Score`] when a score does not fit its output;
    /// the errors of [`Model::gradients`].
    pub fn attribute(&self, x: &Tensor, scores: &[&dyn Score]) -> Result<Attributions> {
        if self.internal_batch_size == Some(0) {
            return Err(Error::InvalidValue {
                what: "internal batch size",
                value: "0".into(),
            });
        }
        let (alphas, weights) = self.rule.nodes(self.steps)?;
        let size = x.size();
        let n = match size.first() {
            Some(&n) if n > 0 => n,
            _ => return Err(Error::shape("input", "(N, ...) with N > 0", &size)),
        };
        let x = x.f_detach()?;
        let baseline = self.baseline.resolve(&x)?;

        // Scores on the clean input; classes picked from the output are fixed
        // here for the whole path.
        let outputs = self.model.forward(&[x.shallow_clone()])?;
        if outputs.len() != scores.len() {
            return Err(Error::ScoreCount {
                outputs: outputs.len(),
                scores: scores.len(),
            });
        }
        let mut owned: Vec<Option<Box<dyn Score + Send + Sync>>> = Vec::new();
        for (index, (score, out)) in scores.iter().zip(&outputs).enumerate() {
            owned.push(
                score
                    .fixed_on(out)
                    .map_err(|e| score_error(index, *score, e))?,
            );
        }
        let active = crate::scores::fixed_or_given(&owned, scores);
        let classes = active
            .iter()
            .zip(&outputs)
            .enumerate()
            .map(|(i, (s, o))| s.classes(o).map_err(|e| score_error(i, *s, e)))
            .collect::<Result<Vec<_>>>()?;
        let at_input = evaluate_all(&active, &outputs, x.device())?;
        let at_baseline = evaluate_all(
            &active,
            &self.model.forward(&[baseline.shallow_clone()])?,
            x.device(),
        )?;

        // The path, in passes of `per_pass` steps of the whole batch.
        let rows = self
            .internal_batch_size
            .map_or(self.steps, |b| b / (n as usize).max(1));
        let per_pass = rows.clamp(1, self.steps);
        let diff = x.f_sub(&baseline)?;
        let tiled: Vec<Tiled> = active.iter().map(|s| Tiled { inner: *s, n }).collect();
        let tiled_refs: Vec<&dyn Score> = tiled.iter().map(|t| t as &dyn Score).collect();
        let rest: Vec<i64> = size[1..].to_vec();
        let mut total: Option<Tensor> = None;
        for (a_chunk, w_chunk) in alphas.chunks(per_pass).zip(weights.chunks(per_pass)) {
            let k = a_chunk.len() as i64;
            let points = a_chunk
                .iter()
                .map(|&a| baseline.f_add(&diff.f_mul_scalar(a)?))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let scaled = Tensor::f_cat(&points, 0)?;
            drop(points);
            let g = self.model.gradients(&[scaled], &tiled_refs)?;
            let grad = &g.inputs[0];
            let w: Vec<f32> = w_chunk.iter().map(|&w| w as f32).collect();
            let w = Tensor::f_from_slice(&w)?
                .f_to_device(grad.device())?
                .f_view([k, 1])?;
            let mut shape = vec![k, n];
            shape.extend(&rest);
            let part = grad
                .f_contiguous()?
                .f_view([k, -1])?
                .f_mul(&w)?
                .f_reshape(shape.as_slice())?
                .f_sum_dim_intlist(0, false, None::<Kind>)?;
            total = Some(match total {
                None => part,
                Some(t) => t.f_add(&part)?,
            });
        }
        let Some(total) = total else {
            return Err(Error::Empty {
                what: "integration steps",
            });
        };
        let attributions = total.f_mul(&diff)?.f_to_kind(x.f_kind()?)?;

        // F = the sum of every output's score, per sample.
        let f = |v: &[Tensor]| -> Result<Tensor> {
            let mut acc = Tensor::f_zeros([n], (Kind::Float, x.device()))?;
            for t in v {
                acc = acc.f_add(&t.f_to_kind(Kind::Float)?)?;
            }
            Ok(acc)
        };
        let delta = attributions
            .f_reshape([n, -1])?
            .f_sum_dim_intlist(1, false, None::<Kind>)?
            .f_to_kind(Kind::Float)?
            .f_sub(&f(&at_input)?.f_sub(&f(&at_baseline)?)?)?;
        Ok(Attributions {
            attributions,
            delta,
            scores: at_input,
            classes,
        })
    }
}

fn score_error(index: usize, score: &dyn Score, e: Error) -> Error {
    Error::Score {
        index,
        name: score.name().to_string(),
        source: Box::new(e),
    }
}

/// Each score on its output, without gradient, on `device`.
fn evaluate_all(scores: &[&dyn Score], outputs: &[Tensor], device: Device) -> Result<Vec<Tensor>> {
    let _guard = tch::no_grad_guard();
    scores
        .iter()
        .zip(outputs)
        .enumerate()
        .map(|(i, (s, o))| {
            let v = scores::evaluate(*s, o).map_err(|e| score_error(i, *s, e))?;
            Ok(v.f_to_device(device)?)
        })
        .collect()
}

/// A score on a batch of `k` path points of `n` samples each, stacked along
/// dim 0: the inner score on each block of `n` rows, so that per-sample
/// scores (a class per sample) apply to every step.
struct Tiled<'s> {
    inner: &'s dyn Score,
    n: i64,
}

impl Score for Tiled<'_> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn score(&self, output: &Tensor) -> Result<Tensor> {
        let rows = scores::batch_size(output)?;
        if rows == self.n {
            return scores::evaluate(self.inner, output);
        }
        if self.n <= 0 || rows % self.n != 0 {
            return Err(Error::BatchMismatch {
                what: "path points",
                expected: usize::try_from(self.n).unwrap_or(0),
                got: usize::try_from(rows).unwrap_or(0),
            });
        }
        let parts = (0..rows / self.n)
            .map(|j| scores::evaluate(self.inner, &output.f_narrow(0, j * self.n, self.n)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::f_cat(&parts, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauss_legendre_matches_known_values() {
        // n = 2: ±1/√3, weights 1; n = 3: 0, ±√(3/5), weights 8/9, 5/9.
        let (x, w) = gauss_legendre(2);
        let r = 1.0 / 3f64.sqrt();
        assert!(
            (x[0] + r).abs() < 1e-15 && (x[1] - r).abs() < 1e-15,
            "{x:?}"
        );
        assert!(
            (w[0] - 1.0).abs() < 1e-14 && (w[1] - 1.0).abs() < 1e-14,
            "{w:?}"
        );
        let (x, w) = gauss_legendre(3);
        let r = 0.6f64.sqrt();
        assert!((x[0] + r).abs() < 1e-15 && x[1] == 0.0 && (x[2] - r).abs() < 1e-15);
        assert!((w[1] - 8.0 / 9.0).abs() < 1e-14 && (w[0] - 5.0 / 9.0).abs() < 1e-14);
        for n in [1, 4, 7, 50, 200] {
            let (x, w) = gauss_legendre(n);
            assert!((w.iter().sum::<f64>() - 2.0).abs() < 1e-12, "n {n}");
            assert!(x.windows(2).all(|p| p[0] < p[1]), "n {n}: increasing");
            // Exact for x^(2n-1) and x^(2n-2): ∫ x^2 = 2/3 for n >= 2.
            if n >= 2 {
                let m2: f64 = x.iter().zip(&w).map(|(x, w)| w * x * x).sum();
                assert!((m2 - 2.0 / 3.0).abs() < 1e-12, "n {n}: {m2}");
            }
        }
    }

    #[test]
    fn riemann_nodes_and_weights() {
        let (a, w) = Rule::RiemannLeft.nodes(4).unwrap();
        assert_eq!(a, vec![0.0, 0.25, 0.5, 0.75]);
        assert_eq!(w, vec![0.25; 4]);
        let (a, _) = Rule::RiemannRight.nodes(4).unwrap();
        assert_eq!(a, vec![0.25, 0.5, 0.75, 1.0]);
        let (a, _) = Rule::RiemannMiddle.nodes(4).unwrap();
        assert_eq!(a, vec![0.125, 0.375, 0.625, 0.875]);
        let (a, w) = Rule::RiemannTrapezoid.nodes(5).unwrap();
        assert_eq!(a, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(w, vec![0.1, 0.2, 0.2, 0.2, 0.1]);
        assert!(matches!(
            Rule::RiemannTrapezoid.nodes(1),
            Err(Error::InvalidValue { .. })
        ));
        assert!(matches!(
            Rule::GaussLegendre.nodes(0),
            Err(Error::InvalidValue { .. })
        ));
    }

    #[test]
    fn rules_parse_by_captum_name() {
        for rule in Rule::ALL {
            assert_eq!(rule.name().parse::<Rule>().unwrap(), rule);
            assert_eq!(rule.to_string(), rule.name());
        }
        assert_eq!("Riemann-Left".parse::<Rule>().unwrap(), Rule::RiemannLeft);
        assert_eq!(
            "gauss-legendre".parse::<Rule>().unwrap(),
            Rule::GaussLegendre
        );
        assert!(matches!(
            "simpson".parse::<Rule>(),
            Err(Error::InvalidValue { value, .. }) if value == "simpson"
        ));
    }

    #[test]
    fn blur_keeps_constants_and_spreads_a_spike() {
        let c = Tensor::full([1, 2, 5, 7], 3.0, (Kind::Float, Device::Cpu));
        let b = gaussian_blur(&c, 1.5).unwrap();
        assert!((b - 3.0).abs().max().double_value(&[]) < 1e-6);
        let mut v = vec![0f32; 49];
        v[24] = 1.0;
        let spike = Tensor::from_slice(&v).view([1, 1, 7, 7]);
        let b = gaussian_blur(&spike, 1.0).unwrap();
        // The centre keeps g(0)² of the mass, g the normalised 1-d taps.
        let g: Vec<f64> = (-3..=3)
            .map(|i: i32| (-(i * i) as f64 / 2.0).exp())
            .collect();
        let g0 = 1.0 / g.iter().sum::<f64>();
        assert!((b.double_value(&[0, 0, 3, 3]) - g0 * g0).abs() < 1e-6);
        assert!((b.sum(Kind::Float).double_value(&[]) - 1.0).abs() < 1e-5);
        assert!(matches!(
            gaussian_blur(&spike, 0.0),
            Err(Error::InvalidValue { .. })
        ));
        assert!(matches!(
            gaussian_blur(&spike.view([7, 7]), 1.0),
            Err(Error::Shape { .. })
        ));
    }

    #[test]
    fn baselines_resolve_to_the_input_shape() {
        let x = Tensor::ones([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        let side = Sidecar {
            input_size: [4, 5],
            channels: 3,
            mean: vec![0.5, 0.25, 0.0],
            std: vec![0.5, 0.25, 2.0],
            labels: None,
            resize: None,
            interpolation: None,
            antialias: None,
            crop: None,
        };
        let b = Baseline::black(&side).unwrap().resolve(&x).unwrap();
        assert_eq!(b.size(), vec![2, 3, 4, 5]);
        assert_eq!(b.double_value(&[1, 0, 3, 4]), -1.0);
        assert_eq!(b.double_value(&[0, 1, 0, 0]), -1.0);
        assert_eq!(b.double_value(&[0, 2, 0, 0]), 0.0);
        let c = Baseline::Constant(0.5).resolve(&x).unwrap();
        assert_eq!(c.double_value(&[1, 2, 3, 4]), 0.5);
        let bad = Baseline::Tensor(Tensor::zeros([2], (Kind::Float, Device::Cpu)));
        assert!(matches!(bad.resolve(&x), Err(Error::Shape { .. })));
        assert!(matches!(
            Baseline::Constant(f64::NAN).resolve(&x),
            Err(Error::InvalidValue { .. })
        ));
    }
}
