//! Class scores: categorical, predicted, segmentation and contrastive.

use tch::{Kind, Tensor};

use super::{mean_per_sample, per_sample, Score};
use crate::error::{Error, Result};

/// Which axis of an output holds the classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClassAxis {
    /// Dim 1: `(N, C)` or `(N, C, H, W)`, PyTorch's layout (the default).
    #[default]
    ChannelsFirst,
    /// The last axis: `(N, C)` or `(N, H, W, C)`, as in models exported from
    /// TF/Keras-style layouts (tf-keras-vis's own convention).
    ChannelsLast,
}

/// Class indices: one index for every sample, or one per sample.
///
/// Built from a `usize`, a `Vec<usize>`, an array or a slice, so that
/// `CategoricalScore::new(3)` and `CategoricalScore::new(vec![3, 5, 7])` both
/// work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassIndices(Vec<usize>);

impl ClassIndices {
    /// The indices as given.
    pub fn as_slice(&self) -> &[usize] {
        &self.0
    }
}

impl From<usize> for ClassIndices {
    fn from(i: usize) -> Self {
        ClassIndices(vec![i])
    }
}

impl From<Vec<usize>> for ClassIndices {
    fn from(v: Vec<usize>) -> Self {
        ClassIndices(v)
    }
}

impl From<&[usize]> for ClassIndices {
    fn from(v: &[usize]) -> Self {
        ClassIndices(v.to_vec())
    }
}

impl<const K: usize> From<[usize; K]> for ClassIndices {
    fn from(v: [usize; K]) -> Self {
        ClassIndices(v.to_vec())
    }
}

/// Moves the class axis to dim 1 and checks the output has one.
fn class_major(output: &Tensor, axis: ClassAxis, what: &str) -> Result<Tensor> {
    let size = output.size();
    if size.len() < 2 {
        return Err(Error::shape(what, "(N, C) or (N, C, ...)", &size));
    }
    match axis {
        ClassAxis::ChannelsFirst => Ok(output.shallow_clone()),
        ClassAxis::ChannelsLast => Ok(output.f_movedim(&[-1i64][..], &[1i64][..])?),
    }
}

fn check_index(index: usize, num_classes: i64) -> Result<i64> {
    let num_classes = usize::try_from(num_classes).unwrap_or(0);
    if index >= num_classes {
        return Err(Error::IndexOutOfRange { index, num_classes });
    }
    // `index < num_classes <= i64::MAX`, so the conversion cannot fail.
    Ok(i64::try_from(index).unwrap_or(i64::MAX))
}

/// `[N]`: sample `n`'s class `idx[n]`, averaged over the axes after dim 1.
/// `output` is class-major `(N, C, ...)`.
fn gather_classes(output: &Tensor, idx: &[usize]) -> Result<Tensor> {
    let size = output.size();
    let (n, c) = (size[0], size[1]);
    if let [one] = idx {
        // One class for every sample: a plain slice. No index tensor, so no
        // host-to-device copy that would wait for the GPU to catch up.
        let picked = output.f_select(1, check_index(*one, c)?)?;
        return mean_per_sample(&picked);
    }
    let batch = usize::try_from(n).unwrap_or(0);
    let idx = per_sample(idx, batch, "class indices")?;
    let idx = idx
        .iter()
        .map(|&i| check_index(i, c))
        .collect::<Result<Vec<i64>>>()?;
    let index = Tensor::f_from_slice(&idx)?.f_to_device(output.device())?;
    gather_index(output, &index)
}

/// As [`gather_classes`], with the classes as an `[N]` int64 tensor on the
/// output's device (already known to be in range).
fn gather_index(output: &Tensor, index: &Tensor) -> Result<Tensor> {
    let size = output.size();
    let (n, c) = (size[0], size[1]);
    // Explicit sizes, not -1: an empty batch has no -1 to infer.
    let flat = output.f_reshape([n, c, size[2..].iter().product()])?;
    let rest = flat.size()[2];
    let index = index.f_view([n, 1, 1])?.f_expand([n, 1, rest], false)?;
    let picked = flat.f_gather(1, &index, false)?.f_reshape([n, rest])?;
    mean_per_sample(&picked)
}

/// The score of one class per sample, as tf-keras-vis's `CategoricalScore`.
///
/// For an output `(N, C)` the value of sample `n` is `output[n, c_n]`; for
/// `(N, C, H, W)` (or any rank above 2) it is `output[n, c_n]` averaged over
/// the remaining axes. One index is broadcast to every sample; a list must
/// have exactly one index per sample (tf-keras-vis silently truncates a
/// longer list; tch-vis does not).
///
/// ```
/// use tch::Tensor;
/// use tch_vis::scores::{CategoricalScore, Score};
/// # fn main() -> tch_vis::Result<()> {
/// let logits = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
/// let s = CategoricalScore::new(1)?.softmax();
/// let p = s.score(&logits)?; // softmax probability of class 1 per sample
/// assert!((p.double_value(&[0]) - 0.7310586).abs() < 1e-6);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct CategoricalScore {
    indices: Vec<usize>,
    softmax: bool,
    axis: ClassAxis,
    name: String,
}

impl CategoricalScore {
    /// A score for class `indices` (one index, or one per sample).
    ///
    /// # Errors
    /// [`Error::Empty`] for an empty list. Indices are checked against the
    /// output in [`Score::score`] ([`Error::IndexOutOfRange`],
    /// [`Error::BatchMismatch`]).
    pub fn new(indices: impl Into<ClassIndices>) -> Result<Self> {
        let indices = indices.into().0;
        if indices.is_empty() {
            return Err(Error::Empty {
                what: "class indices",
            });
        }
        // As a specification spells it (`categorical:1,2`).
        let list: Vec<String> = indices.iter().map(ToString::to_string).collect();
        let name = format!("categorical:{}", list.join(","));
        Ok(CategoricalScore {
            indices,
            softmax: false,
            axis: ClassAxis::ChannelsFirst,
            name,
        })
    }

    /// Applies a softmax over the class axis first, for models that return
    /// logits (pytorch-grad-cam's `ClassifierOutputSoftmaxTarget`).
    pub fn softmax(mut self) -> Self {
        self.softmax = true;
        self
    }

    /// Uses `axis` as the class axis (default: dim 1).
    pub fn class_axis(mut self, axis: ClassAxis) -> Self {
        self.axis = axis;
        self
    }

    /// The class indices as given.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }
}

impl Score for CategoricalScore {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, output: &Tensor) -> Result<Tensor> {
        let out = class_major(output, self.axis, "categorical score output")?;
        let out = if self.softmax {
            out.f_softmax(1, None::<Kind>)?
        } else {
            out
        };
        gather_classes(&out, &self.indices)
    }

    fn classes(&self, output: &Tensor) -> Result<Option<Vec<usize>>> {
        let batch = usize::try_from(super::batch_size(output)?).unwrap_or(0);
        super::per_sample(&self.indices, batch, "class indices").map(Some)
    }
}

/// The categorical score of each sample's own top class.
///
/// The class of sample `n` is the argmax over the class axis of its output
/// (averaged over any spatial axes first); the argmax is taken without
/// gradient, the score itself keeps it. This is what pytorch-grad-cam does
/// when no target is given.
#[derive(Debug, Clone, Copy, Default)]
pub struct PredictedScore {
    axis: ClassAxis,
}

impl PredictedScore {
    /// A predicted-class score on dim 1.
    pub fn new() -> Self {
        PredictedScore::default()
    }

    /// Uses `axis` as the class axis (default: dim 1).
    pub fn class_axis(mut self, axis: ClassAxis) -> Self {
        self.axis = axis;
        self
    }

    /// The predicted class of each sample of `output` (no gradient).
    ///
    /// # Errors
    /// [`Error::Shape`] for an output without a class axis.
    pub fn classes(&self, output: &Tensor) -> Result<Vec<usize>> {
        let out = class_major(output, self.axis, "predicted score output")?;
        let avg = argmax_classes(&out)?;
        let classes = Vec::<i64>::try_from(&avg)?;
        Ok(classes
            .into_iter()
            .map(|c| usize::try_from(c).unwrap_or(0))
            .collect())
    }
}

impl Score for PredictedScore {
    fn name(&self) -> &str {
        "predicted"
    }

    fn score(&self, output: &Tensor) -> Result<Tensor> {
        let out = class_major(output, self.axis, "predicted score output")?;
        // The classes stay on the output's device: no round trip to the host.
        let classes = argmax_classes(&out)?;
        gather_index(&out, &classes)
    }

    fn fixed_on(&self, output: &Tensor) -> Result<Option<Box<dyn Score + Send + Sync>>> {
        let classes = PredictedScore::classes(self, output)?;
        let fixed = CategoricalScore::new(classes)?.class_axis(self.axis);
        Ok(Some(Box::new(fixed)))
    }

    fn classes(&self, output: &Tensor) -> Result<Option<Vec<usize>>> {
        PredictedScore::classes(self, output).map(Some)
    }
}

/// `[N]` int64: each sample's argmax class of a class-major output, after
/// averaging any spatial axes; computed without gradient.
fn argmax_classes(out: &Tensor) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let size = out.size();
    Ok(out
        .f_detach()?
        .f_reshape([size[0], size[1], size[2..].iter().product()])?
        .f_mean_dim(2, false, None::<Kind>)?
        .f_argmax(1, false)?)
}

/// A class averaged inside a spatial mask, for dense outputs `(N, C, H, W)`
/// (pytorch-grad-cam's `SemanticSegmentationTarget`).
///
/// The value of sample `n` is `sum(output[n, c] * mask) / sum(mask)`, where
/// `mask` is `(H, W)` (shared) or `(N, H, W)` (one per sample), of weights
/// (usually 0 and 1).
#[derive(Debug)]
pub struct SegmentationScore {
    class: usize,
    mask: Tensor,
}

impl SegmentationScore {
    /// Class `class` inside `mask` (`(H, W)` or `(N, H, W)`).
    ///
    /// # Errors
    /// [`Error::Shape`] if the mask is not 2-D or 3-D; [`Error::InvalidValue`]
    /// if its weights sum to zero (the average would be undefined).
    pub fn new(class: usize, mask: &Tensor) -> Result<Self> {
        let size = mask.size();
        if !(2..=3).contains(&size.len()) {
            return Err(Error::shape(
                "segmentation mask",
                "(H, W) or (N, H, W)",
                &size,
            ));
        }
        let mask = mask.f_detach()?.f_to_kind(Kind::Float)?;
        let total = mask.f_sum(None::<Kind>)?.f_double_value(&[])?;
        if total == 0.0 || !total.is_finite() {
            return Err(Error::InvalidValue {
                what: "segmentation mask",
                value: format!("weights sum to {total}"),
            });
        }
        Ok(SegmentationScore { class, mask })
    }
}

impl Score for SegmentationScore {
    fn name(&self) -> &str {
        "segmentation"
    }

    fn score(&self, output: &Tensor) -> Result<Tensor> {
        let size = output.size();
        if size.len() != 4 {
            return Err(Error::shape(
                "segmentation score output",
                "(N, C, H, W)",
                &size,
            ));
        }
        let (n, c, h, w) = (size[0], size[1], size[2], size[3]);
        let class = check_index(self.class, c)?;
        let msize = self.mask.size();
        let spatial_ok = msize[msize.len() - 2..] == [h, w];
        let batch_ok = msize.len() == 2 || msize[0] == n;
        if !spatial_ok || !batch_ok {
            return Err(Error::shape(
                "segmentation mask",
                format!("({h}, {w}) or ({n}, {h}, {w})"),
                &msize,
            ));
        }
        let mask = self
            .mask
            .f_to_device(output.device())?
            .f_to_kind(output.f_kind()?)?
            .f_expand([n, h, w], false)?;
        let plane = output.f_select(1, class)?;
        let num =
            (plane * &mask)
                .f_reshape([n, h * w])?
                .f_sum_dim_intlist(1, false, None::<Kind>)?;
        let den = mask
            .f_reshape([n, h * w])?
            .f_sum_dim_intlist(1, false, None::<Kind>)?;
        Ok(num.f_div(&den)?)
    }
}

/// Class `a` minus class `b`, per sample, averaged over any spatial axes
/// ("why `a` rather than `b`"; pytorch-grad-cam's `ClassifierOutputReST`
/// family).
#[derive(Debug, Clone)]
pub struct ContrastiveScore {
    a: usize,
    b: usize,
    axis: ClassAxis,
}

impl ContrastiveScore {
    /// `output[:, a] - output[:, b]`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] when `a == b` (the score would be zero).
    pub fn new(a: usize, b: usize) -> Result<Self> {
        if a == b {
            return Err(Error::InvalidValue {
                what: "contrastive classes",
                value: format!("{a} and {b} are the same class"),
            });
        }
        Ok(ContrastiveScore {
            a,
            b,
            axis: ClassAxis::ChannelsFirst,
        })
    }

    /// Uses `axis` as the class axis (default: dim 1).
    pub fn class_axis(mut self, axis: ClassAxis) -> Self {
        self.axis = axis;
        self
    }
}

impl Score for ContrastiveScore {
    fn name(&self) -> &str {
        "contrastive"
    }

    fn score(&self, output: &Tensor) -> Result<Tensor> {
        let out = class_major(output, self.axis, "contrastive score output")?;
        let a = gather_classes(&out, &[self.a])?;
        let b = gather_classes(&out, &[self.b])?;
        Ok(a.f_sub(&b)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn t(v: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).view(shape)
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t).unwrap()
    }

    #[test]
    fn one_index_is_broadcast_and_a_list_is_per_sample() {
        let out = t(&[0., 1., 2., 10., 11., 12.], &[2, 3]);
        assert_eq!(
            vals(&CategoricalScore::new(2).unwrap().score(&out).unwrap()),
            [2., 12.]
        );
        let s = CategoricalScore::new(vec![0, 1]).unwrap();
        assert_eq!(vals(&s.score(&out).unwrap()), [0., 11.]);
    }

    #[test]
    fn spatial_axes_are_averaged() {
        // (N=1, C=2, H=1, W=2): class 1 holds [4, 6] -> mean 5.
        let out = t(&[1., 2., 4., 6.], &[1, 2, 1, 2]);
        assert_eq!(
            vals(&CategoricalScore::new(1).unwrap().score(&out).unwrap()),
            [5.]
        );
    }

    #[test]
    fn channels_last_uses_the_last_axis() {
        // (N=1, H=1, W=2, C=2): class 0 holds [1, 3] -> 2.
        let out = t(&[1., 2., 3., 4.], &[1, 1, 2, 2]);
        let s = CategoricalScore::new(0)
            .unwrap()
            .class_axis(ClassAxis::ChannelsLast);
        assert_eq!(vals(&s.score(&out).unwrap()), [2.]);
    }

    #[test]
    fn validation_errors_name_both_values() {
        let out = t(&[0.; 6], &[2, 3]);
        let e = CategoricalScore::new(3).unwrap().score(&out).unwrap_err();
        assert!(matches!(
            e,
            Error::IndexOutOfRange {
                index: 3,
                num_classes: 3
            }
        ));
        let e = CategoricalScore::new(vec![0, 1, 2])
            .unwrap()
            .score(&out)
            .unwrap_err();
        assert!(matches!(
            e,
            Error::BatchMismatch {
                expected: 2,
                got: 3,
                ..
            }
        ));
        assert!(matches!(
            CategoricalScore::new(Vec::<usize>::new()).unwrap_err(),
            Error::Empty { .. }
        ));
        let e = CategoricalScore::new(0)
            .unwrap()
            .score(&t(&[1., 2.], &[2]))
            .unwrap_err();
        assert!(matches!(e, Error::Shape { .. }));
    }

    #[test]
    fn predicted_takes_each_samples_argmax() {
        let out = t(&[0., 5., 1., 9., 2., 3.], &[2, 3]);
        let p = PredictedScore::new();
        assert_eq!(p.classes(&out).unwrap(), [1, 0]);
        assert_eq!(vals(&p.score(&out).unwrap()), [5., 9.]);
    }

    #[test]
    fn segmentation_averages_inside_the_mask() {
        // (1, 2, 2, 2); class 1 plane [[1, 2], [3, 4]]; mask picks 2 and 4 -> 3.
        let out = t(&[0., 0., 0., 0., 1., 2., 3., 4.], &[1, 2, 2, 2]);
        let mask = t(&[0., 1., 0., 1.], &[2, 2]);
        let s = SegmentationScore::new(1, &mask).unwrap();
        assert_eq!(vals(&s.score(&out).unwrap()), [3.]);
        let zero = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
        assert!(matches!(
            SegmentationScore::new(1, &zero).unwrap_err(),
            Error::InvalidValue { .. }
        ));
    }

    #[test]
    fn contrastive_is_a_minus_b() {
        let out = t(&[1., 4., 2., 8.], &[2, 2]);
        let s = ContrastiveScore::new(1, 0).unwrap();
        assert_eq!(vals(&s.score(&out).unwrap()), [3., 6.]);
    }
}
