//! TorchScript models: loading, forward passes and score gradients.

use std::path::{Path, PathBuf};

use tch::{CModule, Device, IValue, Kind, Tensor};

use crate::error::{Error, Result};
use crate::grad::GradMode;
use crate::ivalue;
use crate::scores::{self, Score};

/// Scores and their input gradients, as returned by [`Model::gradients`].
///
/// Every tensor is detached from the graph.
#[derive(Debug)]
pub struct Gradients {
    /// One `[batch]` tensor per model output: the value of that output's score.
    pub scores: Vec<Tensor>,
    /// One tensor per model input: d(objective)/d(input), where the objective
    /// is the sum over outputs and samples of all scores. Same shape, dtype
    /// and device as the input given.
    pub inputs: Vec<Tensor>,
    /// The model's outputs, flattened in order (on the model's device).
    pub outputs: Vec<Tensor>,
}

/// A TorchScript model, ready to explain.
///
/// Loading puts the module in eval mode (call [`Model::train`] for training
/// mode) and sets every parameter to not require a gradient, so no weight
/// gradient is ever computed or accumulated: only input gradients are.
///
/// Inputs on another device than the model's are moved to the model's device
/// for the forward pass; gradients are returned on the input's own device.
///
/// ```no_run
/// use tch::{Device, Kind, Tensor};
/// use tch_vis::Model;
/// use tch_vis::scores::{CategoricalScore, Score};
/// # fn main() -> tch_vis::Result<()> {
/// let model = Model::load("models/digits_cnn.pt", Device::Cpu)?;
/// let x = Tensor::randn([4, 1, 32, 32], (Kind::Float, Device::Cpu));
/// let score = CategoricalScore::new(3)?;
/// let g = model.gradients(&[x], &[&score as &dyn Score])?;
/// assert_eq!(g.scores[0].size(), vec![4]);
/// assert_eq!(g.inputs[0].size(), vec![4, 1, 32, 32]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Model {
    module: CModule,
    device: Device,
    source: PathBuf,
    precision: Precision,
    /// Whether `forward_features` and `forward_head` exist (looked up once).
    cam_methods: std::sync::OnceLock<bool>,
}

/// The floating-point precision a model computes in.
///
/// - `Fp32`: float32 throughout (the default).
/// - `Fp16`, `Bf16`: the weights and floating inputs are converted to
///   float16 / bfloat16. (Autocast was tried: on ResNet-50 it gave the same
///   maps and speed, and libtch reaches it only through deprecated calls
///   that print a warning on every use.)
///
/// Gradients come back in the input's own dtype and scores as float32.
/// Half precision is meant for CUDA, where it roughly doubles throughput;
/// on a CPU it is slow. Maps agree with float32 less well where a score
/// saturates (a softmax probability near 1 has a gradient near the
/// half-precision rounding of `1 - p`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// float32 (the default).
    #[default]
    Fp32,
    /// float16 weights and activations.
    Fp16,
    /// bfloat16 weights and activations.
    Bf16,
}

impl Precision {
    /// The tensor kind of this precision.
    pub fn kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Fp16 => Kind::Half,
            Precision::Bf16 => Kind::BFloat16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fp32" | "float32" | "f32" => Ok(Precision::Fp32),
            "fp16" | "float16" | "f16" | "half" => Ok(Precision::Fp16),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(Error::InvalidValue {
                what: "precision (expected fp32, fp16 or bf16)",
                value: s.to_string(),
            }),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        })
    }
}

impl Model {
    /// Loads a TorchScript file onto `device`.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be opened; [`Error::NotTorchScript`]
    /// if it is a model or weights file of another kind (a `torch.save`
    /// checkpoint, a `torch.export` archive, ONNX, safetensors, Keras);
    /// [`Error::ModelLoad`] if it is no TorchScript archive otherwise, or
    /// cannot be placed on `device`.
    pub fn load(path: impl AsRef<Path>, device: Device) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory"),
            ));
        }
        let module = CModule::load_on_device(path, device).map_err(|source| {
            let format =
                file_ends(path).and_then(|(head, tail, len)| other_format(&head, &tail, len));
            load_error(path, source, format)
        })?;
        Self::from_module(module, device, path.to_path_buf())
    }

    /// Loads a TorchScript archive held in memory onto `device`.
    ///
    /// # Errors
    /// As [`Model::load`].
    pub fn load_from_bytes(bytes: &[u8], device: Device) -> Result<Self> {
        let source = PathBuf::from("<bytes>");
        let mut reader = std::io::Cursor::new(bytes);
        let module = CModule::load_data_on_device(&mut reader, device).map_err(|e| {
            let head = &bytes[..bytes.len().min(HEAD_BYTES)];
            let tail = &bytes[bytes.len().saturating_sub(TAIL_BYTES)..];
            load_error(&source, e, other_format(head, tail, bytes.len() as u64))
        })?;
        Self::from_module(module, device, source)
    }

    fn from_module(mut module: CModule, device: Device, source: PathBuf) -> Result<Self> {
        module.f_set_eval()?;
        for (_, p) in module.named_parameters()? {
            let _ = p.f_set_requires_grad(false)?;
        }
        Ok(Model {
            module,
            device,
            source,
            precision: Precision::Fp32,
            cam_methods: std::sync::OnceLock::new(),
        })
    }

    /// Converts the model's weights to `precision` (see [`Precision`]).
    ///
    /// # Errors
    /// [`Error::Torch`] if libtorch cannot convert the parameters.
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        if precision == self.precision {
            return Ok(());
        }
        let kind = precision.kind();
        for (_, p) in self.module.named_parameters()? {
            if is_floating(p.f_kind()?) {
                // Probe the conversion with a fallible call before the
                // module-wide one, which cannot report errors.
                let _ = p.f_to_kind(kind)?;
            }
        }
        self.module.to(self.device, kind, false);
        for (_, p) in self.module.named_parameters()? {
            let _ = p.f_set_requires_grad(false)?;
        }
        self.precision = precision;
        Ok(())
    }

    /// Whether the module holds any parameters (a frozen module's weights
    /// are constants of its code instead).
    pub(crate) fn has_parameters(&self) -> bool {
        self.module.named_parameters().is_ok_and(|p| !p.is_empty())
    }

    /// The precision the model computes in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Moves an input to the model's device and precision.
    fn prepare(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.f_to_device(self.device)?;
        if self.precision != Precision::Fp32 && is_floating(x.f_kind()?) {
            Ok(x.f_to_kind(self.precision.kind())?)
        } else {
            Ok(x)
        }
    }

    /// The device the model lives on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Where the model was loaded from (`<bytes>` for [`Model::load_from_bytes`]).
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Puts the model in training mode (dropout active, batch-norm statistics
    /// from the batch). Parameters stay frozen.
    ///
    /// # Errors
    /// [`Error::Torch`] if libtorch refuses.
    pub fn train(&mut self) -> Result<()> {
        Ok(self.module.f_set_train()?)
    }

    /// Puts the model back in eval mode (the default after loading).
    ///
    /// # Errors
    /// [`Error::Torch`] if libtorch refuses.
    pub fn eval(&mut self) -> Result<()> {
        Ok(self.module.f_set_eval()?)
    }

    /// Runs the model without building a graph (no gradient), and returns
    /// its outputs flattened in order: a tensor, or the tensors of a tuple,
    /// list or dict (recursively).
    ///
    /// # Errors
    /// [`Error::InputCount`] for a wrong number of inputs,
    /// [`Error::UnsupportedOutput`] when the model returns something else
    /// than tensors, [`Error::Torch`] when the forward pass fails.
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(self
            .forward_named(inputs)?
            .into_iter()
            .map(|(_, t)| t)
            .collect())
    }

    /// As [`Model::forward`], with each output's name: its position (`"0"`,
    /// `"1"`), its dict key, or a dotted path for nested containers.
    ///
    /// # Errors
    /// As [`Model::forward`].
    pub fn forward_named(&self, inputs: &[Tensor]) -> Result<Vec<(String, Tensor)>> {
        let _mode = GradMode::set(false);
        let inputs = inputs
            .iter()
            .map(|x| self.prepare(x))
            .collect::<Result<Vec<_>>>()?;
        self.run(&inputs)
    }

    fn run(&self, inputs: &[Tensor]) -> Result<Vec<(String, Tensor)>> {
        let args: Vec<IValue> = inputs
            .iter()
            .map(|t| IValue::Tensor(t.shallow_clone()))
            .collect();
        let _executor = self.executor()?;
        let value = self
            .module
            .forward_is(&args)
            .map_err(|e| forward_error(e, inputs.len()))?;
        ivalue::flatten(value)
    }

    /// Scores the model's outputs and takes the gradient of their sum with
    /// respect to every input, in one forward and one backward pass.
    ///
    /// `scores[k]` scores output `k`; the objective is the sum over outputs
    /// and samples of the score values, and `inputs[i]` of the result is
    /// d(objective)/d(`inputs[i]`). Inputs need not require a gradient, and
    /// neither they nor their `.grad` are changed. Autograd is enabled for the
    /// call even inside a no-grad region. An input that does not reach the
    /// objective (or is not floating point) gets a zero gradient.
    ///
    /// # Errors
    /// [`Error::ScoreCount`] when `scores.len()` differs from the number of
    /// outputs; [`Error::Score`] (with the output index) when a score does not
    /// fit its output or does not return one value per sample; the errors of
    /// [`Model::forward`].
    pub fn gradients(&self, inputs: &[Tensor], scores: &[&dyn Score]) -> Result<Gradients> {
        let _mode = GradMode::set(true);
        let leaves = inputs
            .iter()
            .map(|x| {
                let leaf = self.prepare(&x.f_detach()?)?;
                if is_floating(leaf.f_kind()?) {
                    Ok(leaf.f_set_requires_grad(true)?)
                } else {
                    Ok(leaf)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let outputs: Vec<Tensor> = self.run(&leaves)?.into_iter().map(|(_, t)| t).collect();
        if outputs.len() != scores.len() {
            return Err(Error::ScoreCount {
                outputs: outputs.len(),
                scores: scores.len(),
            });
        }
        let values = scores::evaluate_each(&outputs, scores)?;
        let mut objective: Option<Tensor> = None;
        for v in &values {
            let s = v.f_sum(None::<Kind>)?;
            objective = Some(match objective {
                None => s,
                Some(acc) => acc.f_add(&s)?,
            });
        }
        let differentiable: Vec<usize> = (0..leaves.len())
            .filter(|&i| leaves[i].requires_grad())
            .collect();
        let mut grads: Vec<Option<Tensor>> = (0..leaves.len()).map(|_| None).collect();
        if let Some(objective) = objective.filter(|o| o.requires_grad()) {
            if !differentiable.is_empty() {
                let wrt: Vec<&Tensor> = differentiable.iter().map(|&i| &leaves[i]).collect();
                let got = Tensor::f_run_backward(&[&objective], &wrt, false, false)?;
                for (&i, g) in differentiable.iter().zip(got) {
                    if g.defined() {
                        grads[i] = Some(g);
                    }
                }
            }
        }
        let inputs_grad = inputs
            .iter()
            .zip(grads)
            .map(|(x, g)| match g {
                Some(g) => Ok(g.f_to_device(x.device())?.f_to_kind(x.f_kind()?)?),
                None => Ok(x.f_zeros_like()?),
            })
            .collect::<Result<Vec<_>>>()?;
        let scores = values
            .iter()
            .map(|v| {
                let v = v.f_detach()?;
                if self.precision == Precision::Fp32 {
                    Ok(v)
                } else {
                    Ok(v.f_to_kind(Kind::Float)?)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let outputs = outputs
            .iter()
            .map(|o| o.f_detach())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Gradients {
            scores,
            inputs: inputs_grad,
            outputs,
        })
    }
}

/// The TorchScript method that gives the feature maps of the CAM convention.
pub(crate) const FEATURES_METHOD: &str = "forward_features";
/// The TorchScript method that maps the feature maps to the outputs.
pub(crate) const HEAD_METHOD: &str = "forward_head";
/// The dict key of the feature maps in the second CAM form.
pub const FEATURES_KEY: &str = "features";

/// The two forms of the CAM convention (see [`crate::cam`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CamForm {
    /// Methods `forward_features(x) -> A` and `forward_head(A) -> outputs`:
    /// the trunk runs without a graph and gradients flow through the head
    /// only.
    Methods,
    /// `forward(x)` returns a dict whose entry `"features"` is `A`
    /// `(N, K, h, w)` and whose other entries, in order, are the outputs.
    /// `A` may be any intermediate tensor, also one that the outputs reach
    /// by other paths too (a layer inside a residual block); gradient
    /// methods run the forward pass with a graph from the input and
    /// backpropagate from the scores to `A`, not through the trunk.
    Dict,
}

impl Model {
    /// Whether the TorchScript module has a method called `name`.
    ///
    /// The method is looked up, not run: it is called with no arguments,
    /// which libtorch rejects before running anything when the method takes
    /// arguments (a method that takes none would run once).
    pub fn has_method(&self, name: &str) -> bool {
        match self.module.method_is::<IValue>(name, &[]) {
            Ok(_) => true,
            Err(e) => !is_missing_method(&e),
        }
    }

    /// Whether the model has both CAM methods (`forward_features` and
    /// `forward_head`); looked up once.
    pub(crate) fn has_cam_methods(&self) -> bool {
        *self
            .cam_methods
            .get_or_init(|| self.has_method(FEATURES_METHOD) && self.has_method(HEAD_METHOD))
    }

    /// Which form of the CAM convention the model follows. A model with
    /// `forward_features` and `forward_head` is [`CamForm::Methods`] without
    /// running anything; otherwise `x` `(N, C, H, W)` is run through
    /// `forward` once, and a dict with a `(N, K, h, w)` entry `"features"`
    /// and at least one other entry makes it [`CamForm::Dict`].
    ///
    /// ```no_run
    /// use tch::{Device, Kind, Tensor};
    /// use tch_vis::{CamForm, Model};
    /// # fn main() -> tch_vis::Result<()> {
    /// // scripts/export_cam_model.py torchvision resnet18 --layer layer4.1.conv2 --out r18_inner.pt
    /// let model = Model::load("r18_inner.pt", Device::Cpu)?;
    /// let x = Tensor::zeros([1, 3, 224, 224], (Kind::Float, Device::Cpu));
    /// assert_eq!(model.cam_form(&x)?, CamForm::Dict);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::NotCamModel`] for a model of neither form; the errors of
    /// [`Model::forward`].
    pub fn cam_form(&self, x: &Tensor) -> Result<CamForm> {
        if self.has_cam_methods() {
            return Ok(CamForm::Methods);
        }
        self.dict_pass(x, false).map(|_| CamForm::Dict)
    }

    /// The outputs of the CAM convention for `x`, without a graph: the
    /// model's outputs for the methods form, the entries other than
    /// `"features"` for the dict form.
    pub(crate) fn cam_outputs(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        if self.has_cam_methods() {
            return self.forward(&[x.shallow_clone()]);
        }
        Ok(self.dict_pass(x, false)?.1)
    }

    /// The feature maps `A` and the outputs of `x` in either CAM form. With
    /// `graph`, the scores of the outputs can be backpropagated to `A`: for
    /// the methods form `A` is a leaf that requires grad and only the head
    /// records a graph; for the dict form the forward pass records one from
    /// the input (see [`Model::dict_pass`]).
    pub(crate) fn cam_pass(&self, x: &Tensor, graph: bool) -> Result<(Tensor, Vec<Tensor>)> {
        if !self.has_cam_methods() {
            return self.dict_pass(x, graph);
        }
        let a = self.features(x)?;
        let a = if graph {
            a.f_detach()?.f_set_requires_grad(true)?
        } else {
            a
        };
        let _mode = GradMode::set(graph);
        let outputs = self.run_head(&a)?.into_iter().map(|(_, t)| t).collect();
        Ok((a, outputs))
    }

    /// The dict form's forward pass: `(A, outputs)`. With `graph`, the
    /// input is made a leaf that requires grad so that a graph reaches `A`
    /// and the outputs; without, nothing is recorded.
    ///
    /// # Errors
    /// [`Error::NotCamModel`] when `forward` returns no `"features"`
    /// entry; [`Error::Shape`] when it is not `(N, K, h, w)`;
    /// [`Error::InvalidValue`] when, with `graph`, it does not depend on
    /// the input.
    pub(crate) fn dict_pass(&self, x: &Tensor, graph: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let _mode = GradMode::set(graph);
        let batch = x.size().first().copied().unwrap_or(0);
        let mut x = self.prepare(x)?;
        if graph {
            x = x.f_detach()?.f_set_requires_grad(true)?;
        }
        let (a, outputs) = self.split_features(self.run(&[x])?, batch)?;
        if graph && !a.requires_grad() {
            return Err(Error::InvalidValue {
                what: "\"features\" entry of the model's dict (it does not depend on the input, so no gradient reaches it)",
                value: format!("{:?}", a.size()),
            });
        }
        Ok((a, outputs))
    }

    /// Takes the `"features"` entry out of a forward pass's named outputs:
    /// `(A, the other outputs in order)`.
    fn split_features(
        &self,
        mut named: Vec<(String, Tensor)>,
        batch: i64,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let Some(at) = named.iter().position(|(n, _)| n == FEATURES_KEY) else {
            return Err(self.not_cam_model());
        };
        let (_, a) = named.remove(at);
        let size = a.size();
        if size.len() != 4 || size[0] != batch {
            return Err(Error::shape(
                format!("the \"{FEATURES_KEY}\" entry of the model's dict"),
                format!("(N, K, h, w) with N = {batch}"),
                &size,
            ));
        }
        if named.is_empty() {
            return Err(Error::UnsupportedOutput {
                kind: format!("a dict with only the \"{FEATURES_KEY}\" entry (no output to score)"),
            });
        }
        Ok((a, named.into_iter().map(|(_, t)| t).collect()))
    }

    fn not_cam_model(&self) -> Error {
        Error::NotCamModel {
            path: self.source.clone(),
            missing: [FEATURES_METHOD, HEAD_METHOD]
                .into_iter()
                .filter(|m| !self.has_method(m))
                .collect(),
        }
    }

    /// Checks that the model follows the CAM convention: methods
    /// `forward_features(x) -> A` (the feature maps `(N, K, h, w)` of the
    /// target layer) and `forward_head(A) -> outputs`, with
    /// `forward(x) == forward_head(forward_features(x))`.
    /// `scripts/export_cam_model.py` exports such models. This looks the
    /// methods up without running anything, so it knows only
    /// [`CamForm::Methods`]; [`Model::cam_form`] runs the model to find the
    /// dict form too.
    ///
    /// # Errors
    /// [`Error::NotCamModel`] naming the missing methods.
    pub fn check_cam(&self) -> Result<()> {
        if self.has_cam_methods() {
            Ok(())
        } else {
            Err(self.not_cam_model())
        }
    }

    /// The feature maps `forward_features(x)`, `(N, K, h, w)`, computed
    /// without a graph, on the model's device and in its precision; for a
    /// model of the dict form ([`CamForm::Dict`]), the `"features"` entry
    /// of `forward(x)`.
    ///
    /// # Errors
    /// [`Error::NotCamModel`] when the model follows neither form;
    /// [`Error::Shape`] when the features are not an `(N, K, h, w)` tensor
    /// with the input's batch size; [`Error::Torch`] when it fails.
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        if !self.has_cam_methods() {
            return Ok(self.dict_pass(x, false)?.0);
        }
        let _mode = GradMode::set(false);
        let x = self.prepare(x)?;
        let batch = x.size().first().copied();
        let _executor = self.executor()?;
        let value = self
            .module
            .method_is(FEATURES_METHOD, &[IValue::Tensor(x)])
            .map_err(|e| self.method_error(e, FEATURES_METHOD))?;
        let a = match value {
            IValue::Tensor(t) => t,
            other => {
                return Err(Error::UnsupportedOutput {
                    kind: format!("{FEATURES_METHOD} returned {}", ivalue::kind_name(&other)),
                })
            }
        };
        let size = a.size();
        if size.len() != 4 || size.first().copied() != batch {
            return Err(Error::shape(
                format!("{FEATURES_METHOD} output"),
                format!("(N, K, h, w) with N = {}", batch.unwrap_or(0)),
                &size,
            ));
        }
        Ok(a)
    }

    /// The outputs `forward_head(a)` of feature maps `a` (as given by
    /// [`Model::features`]), flattened in order as by [`Model::forward`],
    /// computed without a graph.
    ///
    /// # Errors
    /// [`Error::NotCamModel`] when the model has no `forward_head`;
    /// [`Error::UnsupportedOutput`] and [`Error::Torch`] as
    /// [`Model::forward`].
    pub fn head(&self, a: &Tensor) -> Result<Vec<Tensor>> {
        let _mode = GradMode::set(false);
        Ok(self.run_head(a)?.into_iter().map(|(_, t)| t).collect())
    }

    /// `forward_head(a)` in the current grad mode (a graph is built when
    /// autograd is on and `a` requires grad).
    pub(crate) fn run_head(&self, a: &Tensor) -> Result<Vec<(String, Tensor)>> {
        let _executor = self.executor()?;
        let value = self
            .module
            .method_is(HEAD_METHOD, &[IValue::Tensor(a.shallow_clone())])
            .map_err(|e| self.method_error(e, HEAD_METHOD))?;
        ivalue::flatten(value)
    }

    /// Sets how TorchScript's graph executor runs this model's methods on
    /// the calling thread until the returned guard is dropped (a
    /// per-thread setting in libtorch, restored to what it was): on a CPU
    /// without its profiling run and optimisation passes, which cost the
    /// first calls ~50 ms on a trivial model and ~100 ms on resnet18, for
    /// no measured gain after them (there is no fusion on CPUs); on CUDA
    /// with them (fusions).
    fn executor(&self) -> Result<ExecutorMode> {
        ExecutorMode::set(self.device.is_cuda())
    }

    fn method_error(&self, e: tch::TchError, method: &'static str) -> Error {
        if is_missing_method(&e) {
            Error::NotCamModel {
                path: self.source.clone(),
                missing: vec![method],
            }
        } else {
            Error::Torch(e)
        }
    }
}

/// Whether libtorch's error says that a method does not exist.
fn is_missing_method(e: &tch::TchError) -> bool {
    let text = match e {
        tch::TchError::Torch(msg) => msg.as_str(),
        _ => return false,
    };
    text.lines()
        .next()
        .is_some_and(|l| l.contains("is not defined"))
}

fn is_floating(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

/// The calling thread's TorchScript graph-executor setting, set for a
/// call and restored when dropped ([`Model`]'s methods change it for their
/// own calls only: a program's other modules on the thread keep its own).
struct ExecutorMode {
    before: bool,
}

// libtorch's getter, which tch does not wrap: a C++ function without
// arguments returning `bool` (called as C calls it), exported by
// libtorch_cpu under its Itanium-ABI name (Linux, macOS).
#[cfg(not(target_env = "msvc"))]
extern "C" {
    #[link_name = "_ZN5torch3jit24getGraphExecutorOptimizeEv"]
    fn torch_jit_get_graph_executor_optimize() -> bool;
}

/// Elsewhere the setting is taken to be libtorch's default.
#[cfg(target_env = "msvc")]
unsafe fn torch_jit_get_graph_executor_optimize() -> bool {
    true
}

impl ExecutorMode {
    fn set(optimize: bool) -> Result<ExecutorMode> {
        // SAFETY: reads a thread-local flag; no arguments, no side effects.
        let before = unsafe { torch_jit_get_graph_executor_optimize() };
        tch::jit::f_set_graph_executor_optimize(optimize)?;
        Ok(ExecutorMode { before })
    }
}

impl Drop for ExecutorMode {
    fn drop(&mut self) {
        let _ = tch::jit::f_set_graph_executor_optimize(self.before);
    }
}

/// Maps libtorch's argument-count messages to [`Error::InputCount`].
fn forward_error(e: tch::TchError, got: usize) -> Error {
    let text = match &e {
        tch::TchError::Torch(msg) => msg.trim_start().to_string(),
        other => other.to_string(),
    };
    let first = text.lines().next().unwrap_or_default();
    let lower = first.to_lowercase();
    if !lower.contains("forward") {
        return Error::Torch(e);
    }
    let declared = first
        .split_once("Declaration: ")
        .and_then(|(_, d)| Declaration::parse(d));
    let expected = if let Some(d) = &declared {
        let required = d.params.iter().filter(|(_, _, default)| !default).count();
        match d.params.len() {
            all if all == required => all.to_string(),
            all => format!("{required} to {all}"),
        }
    } else if let Some(n) = lower
        .split("expected at most ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<usize>().ok())
    {
        // libtorch counts `self` among the arguments.
        n.saturating_sub(1).to_string()
    } else if lower.contains("missing value for argument") {
        format!("more than {got}")
    } else {
        return Error::Torch(e);
    };
    Error::InputCount {
        expected,
        got,
        declaration: declared.map(|d| d.describe()).unwrap_or_default(),
    }
}

/// A TorchScript method's declaration, as libtorch prints it in its
/// argument errors: `forward(__torch__.M self, Tensor x, float t=1.) -> Tensor`.
struct Declaration<'a> {
    /// (type, name, has a default) of each parameter after `self`.
    params: Vec<(&'a str, &'a str, bool)>,
    returns: &'a str,
}

impl<'a> Declaration<'a> {
    fn parse(text: &'a str) -> Option<Self> {
        let open = text.find('(')?;
        // The closing parenthesis of the parameter list: types nest
        // brackets and parentheses (`Tuple[Tensor, Tensor]`).
        let mut depth = 0usize;
        let mut close = None;
        let mut cuts = vec![open];
        let mut quote = None;
        let mut escaped = false;
        for (i, ch) in text.char_indices().skip_while(|&(i, _)| i <= open) {
            // Default values may be strings holding commas and brackets.
            if let Some(q) = quote {
                match ch {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    _ if ch == q => quote = None,
                    _ => {}
                }
                continue;
            }
            match ch {
                '"' | '\'' => quote = Some(ch),
                '(' | '[' => depth += 1,
                ')' | ']' if depth > 0 => depth -= 1,
                ')' => {
                    close = Some(i);
                    break;
                }
                ',' if depth == 0 => cuts.push(i),
                _ => {}
            }
        }
        let close = close?;
        cuts.push(close);
        let params = cuts
            .windows(2)
            .map(|w| text[w[0] + 1..w[1]].trim())
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (decl, default) = p.split_once('=').map_or((p, false), |(d, _)| (d, true));
                let (ty, name) = decl.trim().rsplit_once(' ').unwrap_or(("", decl.trim()));
                (ty.trim(), name, default)
            })
            .collect::<Vec<_>>();
        let (first, rest) = params.split_first()?;
        if first.1 != "self" {
            return None;
        }
        let returns = text[close + 1..]
            .trim()
            .strip_prefix("->")
            .map_or("", str::trim);
        Some(Self {
            params: rest.to_vec(),
            returns,
        })
    }

    /// `forward(Tensor x, float temperature) -> Tensor`, then what tch-vis
    /// cannot pass: parameters that are not tensors.
    fn describe(&self) -> String {
        let list = self
            .params
            .iter()
            .map(|(ty, name, default)| format!("{ty} {name}{}", if *default { "=…" } else { "" }))
            .collect::<Vec<_>>()
            .join(", ");
        let mut text = format!("forward({list})");
        if !self.returns.is_empty() {
            text.push_str(&format!(" -> {}", self.returns));
        }
        let other: Vec<_> = self
            .params
            .iter()
            .filter(|(ty, _, default)| *ty != "Tensor" && !default)
            .map(|(ty, name, _)| format!("{name} is a {ty}"))
            .collect();
        if !other.is_empty() {
            text.push_str(&format!(
                " ({}, and only tensors are passed: export a module whose forward takes \
                 the input tensors alone, the other values fixed inside it)",
                other.join(", ")
            ));
        }
        text
    }
}

/// The error of a model that libtorch failed to load from `path`: named
/// as the other `format` it is ([`other_format`]), else libtorch's.
fn load_error(path: &Path, source: tch::TchError, format: Option<&'static str>) -> Error {
    match format {
        Some(format) => Error::NotTorchScript {
            path: path.to_path_buf(),
            format,
        },
        None => Error::ModelLoad {
            path: path.to_path_buf(),
            source,
        },
    }
}

/// How much of a model file's start [`other_format`] reads.
const HEAD_BYTES: usize = 64;

/// How much of a model file's end [`other_format`] reads: a zip archive's
/// central directory, which lists its entries, of up to some 60,000 tensors.
const TAIL_BYTES: usize = 4 << 20;

/// The first [`HEAD_BYTES`] and last [`TAIL_BYTES`] bytes of a file, and its
/// length; `None` if it cannot be read.
fn file_ends(path: &Path) -> Option<(Vec<u8>, Vec<u8>, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let mut head = Vec::new();
    (&mut f)
        .take(HEAD_BYTES as u64)
        .read_to_end(&mut head)
        .ok()?;
    f.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES as u64)))
        .ok()?;
    let mut tail = Vec::new();
    f.take(TAIL_BYTES as u64).read_to_end(&mut tail).ok()?;
    Some((head, tail, len))
}

/// What a file that libtorch could not load as TorchScript is, when it is
/// one of the model or weights formats users mistake for it, from its first
/// bytes (`head`), its last (`tail`, where a whole zip archive keeps its
/// central directory, the list of its entries' names) and its length.
/// `None` for anything else, a TorchScript archive among them (a damaged or
/// truncated one, or one for a device that is missing): only a zip archive
/// with its end record is judged by its names.
fn other_format(head: &[u8], tail: &[u8], len: u64) -> Option<&'static str> {
    if len == 0 {
        return Some("an empty file (0 bytes)");
    }
    let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    if head.starts_with(b"PK\x03\x04") && has(tail, b"PK\x05\x06") {
        // TorchScript: `code/`, `constants.pkl`; torch.save: `data.pkl`
        // only; torch.export: `archive_format` and `models/`; Keras 3:
        // `model.weights.h5`.
        return if has(tail, b"/code/") || has(tail, b"constants.pkl") {
            None
        } else if has(tail, b"archive_format") || has(tail, b"/models/") {
            Some("a torch.export archive (ExportedProgram, .pt2)")
        } else if has(tail, b"data.pkl") {
            Some("a torch.save checkpoint (a state_dict or a pickled nn.Module)")
        } else if has(tail, b"model.weights.h5") {
            Some("a Keras model archive (.keras)")
        } else {
            None
        };
    }
    // torch.save's legacy format: the pickled magic number 0x1950a86a20f9469cfc6c.
    if head.starts_with(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19") {
        return Some("a torch.save checkpoint in the legacy (non-zip) format");
    }
    if head.starts_with(b"\x89HDF\r\n\x1a\n") {
        return Some("an HDF5 file (as Keras saves models and weights)");
    }
    // safetensors: a little-endian u64 header length, then the JSON header.
    if let Some(n) = head.first_chunk::<8>().map(|b| u64::from_le_bytes(*b)) {
        if head.get(8) == Some(&b'{') && n.checked_add(8).is_some_and(|end| end <= len) {
            return Some("a safetensors file (tensors only, no model code)");
        }
    }
    // A sidecar (M.json) given for its model (M.pt).
    if head.trim_ascii_start().starts_with(b"{") {
        return Some("a JSON file (a model's sidecar is M.json beside M.pt: --model takes M.pt)");
    }
    // ONNX: a ModelProto, whose first fields are ir_version (field 1, a
    // varint) and producer_name (field 2), as exporters write them.
    if head.first() == Some(&0x08)
        && head.get(2) == Some(&0x12)
        && [&b"pytorch"[..], b"onnx", b"tf2onnx", b"keras2onnx"]
            .iter()
            .any(|p| has(head, p))
    {
        return Some("an ONNX model");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declarations_are_read_with_nested_types_and_defaults() {
        let d = Declaration::parse(
            "forward(__torch__.M self, Tensor x, Tuple[Tensor, Tensor] pair, Dict[str, Tensor] d, \
             float t=1.) -> (Tensor, Tensor)",
        )
        .unwrap();
        assert_eq!(
            d.params,
            [
                ("Tensor", "x", false),
                ("Tuple[Tensor, Tensor]", "pair", false),
                ("Dict[str, Tensor]", "d", false),
                ("float", "t", true),
            ]
        );
        assert_eq!(d.returns, "(Tensor, Tensor)");
        // Values of other types are named; defaults need nothing.
        assert_eq!(
            d.describe(),
            "forward(Tensor x, Tuple[Tensor, Tensor] pair, Dict[str, Tensor] d, float t=…) -> \
             (Tensor, Tensor) (pair is a Tuple[Tensor, Tensor], d is a Dict[str, Tensor], and only \
             tensors are passed: export a module whose forward takes the input tensors alone, \
             the other values fixed inside it)"
        );
        // Defaults holding commas, brackets and quotes.
        let d = Declaration::parse(
            "forward(__torch__.M self, Tensor x, str s=\"a, b)\", int[2] size=[1, 2], \
             str t='it\\'s (x', Optional[Tensor] m=None) -> Tensor",
        )
        .unwrap();
        assert_eq!(
            d.params,
            [
                ("Tensor", "x", false),
                ("str", "s", true),
                ("int[2]", "size", true),
                ("str", "t", true),
                ("Optional[Tensor]", "m", true),
            ]
        );
        assert_eq!(d.returns, "Tensor");
        let plain = Declaration::parse("forward(__torch__.N self, Tensor x) -> Tensor").unwrap();
        assert_eq!(plain.describe(), "forward(Tensor x) -> Tensor");
        // Not a method's declaration: nothing is made up.
        assert!(Declaration::parse("forward(Tensor x) -> Tensor").is_none());
        assert!(Declaration::parse("forward(__torch__.N self, Tensor x").is_none());
    }

    fn optimize() -> bool {
        // SAFETY: as in `ExecutorMode::set`.
        unsafe { torch_jit_get_graph_executor_optimize() }
    }

    #[test]
    fn calls_leave_the_threads_executor_setting_as_it_was() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/digits_cnn.pt");
        let model = Model::load(path, Device::Cpu).unwrap();
        let x = Tensor::zeros([2, 1, 32, 32], (Kind::Float, Device::Cpu));
        for before in [false, true] {
            tch::jit::set_graph_executor_optimize(before);
            {
                let _on_cpu = model.executor().unwrap();
                assert!(!optimize(), "a CPU model runs without the passes");
            }
            assert_eq!(optimize(), before);
            model.forward(&[x.shallow_clone()]).unwrap();
            assert_eq!(optimize(), before, "after forward");
        }
    }
}
