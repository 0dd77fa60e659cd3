//! Score-CAM (Wang et al., 2020, "Score-CAM: Score-Weighted Visual
//! Explanations for Convolutional Neural Networks") and Faster-Score-CAM
//! (tf-keras-vis's `max_N`: only the channels of largest spatial variance).

use tch::{Kind, Tensor};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::scores::Score;

use super::{score_outputs, ScoreCamWeights};

/// How Score-CAM runs: masked inputs per forward pass, channels kept, weights.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    /// At most this many masked inputs per forward pass (at least one image's
    /// worth of rows per pass: see [`cam`]).
    pub batch: usize,
    /// Keep only the `n` channels of largest spatial variance per image.
    pub max_n: Option<usize>,
    /// How scores become channel weights.
    pub weights: ScoreCamWeights,
}

/// The Score-CAM map before ReLU, `(N, h, w)`.
///
/// `x` is the model input `(N, C, H, W)`, `a` the feature maps
/// `(N, K, h, w)` as float32, both on the model's device; `scores` are
/// already fixed on the clean output (one per model output). Only the
/// first `images` rows are scored; the rest (a batch's padding) get a zero
/// map.
///
/// Channel `k` of image `n` gives the mask `M = up(A_k)`, bilinearly
/// resized to `H × W` with corners aligned and scaled to `[0, 1]` by
/// `(M − min) / (max − min + ε)`; the score of the model on `x_n ⊙ M`
/// (summed over outputs) is `s_nk`. As in pytorch-grad-cam, one image at a
/// time: its `K` masked inputs go to the model in chunks of `batch`, so a
/// forward pass holds at most `batch` of them whatever `K` is, the chunks
/// have the same shapes for every image (an image's map does not depend on
/// the rest of its batch), and padding rows cost nothing. The scores stay
/// on the device.
pub(super) fn cam(
    model: &Model,
    x: &Tensor,
    a: &Tensor,
    scores: &[&dyn Score],
    plan: Plan,
    images: usize,
) -> Result<Tensor> {
    let size = a.size();
    let (n, k) = (size[0], size[1]);
    let xs = x.size();
    let (height, width) = (xs[2], xs[3]);
    let a = match plan.max_n {
        Some(m) if (m as i64) < k => top_variance_channels(a, m as i64)?,
        _ => a.shallow_clone(),
    };
    let k = a.size()[1];
    let eps = match plan.weights {
        ScoreCamWeights::ChannelSoftmax => 1e-8,
        ScoreCamWeights::ClassSoftmax => 1e-7,
    };
    let batch = plan.batch.max(1) as i64;
    let channels_last = xs[1] > 1 && x.stride()[1] == 1;
    let images = (images as i64).min(n);
    let mut cams = Vec::with_capacity(n as usize);
    for i in 0..images {
        let ai = a.f_select(0, i)?; // (K, h, w)
        let xi = x.f_select(0, i)?; // (C, H, W)
        let mut chunks = Vec::new();
        let mut k0 = 0;
        while k0 < k {
            let gk = batch.min(k - k0);
            let part = ai.f_narrow(0, k0, gk)?.f_unsqueeze(1)?; // (gk, 1, h, w)
            let up = part
                .f_upsample_bilinear2d([height, width], true, None, None)?
                .f_squeeze_dim(1)?; // (gk, H, W)
            let flat = up.f_reshape([gk, -1])?;
            let max = flat.f_amax(1, true)?.f_unsqueeze(-1)?;
            let min = flat.f_amin(1, true)?.f_unsqueeze(-1)?;
            let masks = up
                .f_sub(&min)?
                .f_div(&max.f_sub(&min)?.f_add_scalar(eps)?)?
                .f_to_kind(x.f_kind()?)?;
            // A channels-last input gives channels-last masked inputs (the
            // same values, NHWC strides), as fast for the model as the
            // input was.
            let masked = if channels_last {
                xi.f_permute([1, 2, 0])?
                    .f_unsqueeze(0)?
                    .f_mul(&masks.f_unsqueeze(-1)?)?
                    .f_permute([0, 3, 1, 2])?
            } else {
                xi.f_unsqueeze(0)?.f_mul(&masks.f_unsqueeze(1)?)?
            };
            let outputs = model
                .cam_outputs(&masked)?
                .into_iter()
                .map(|o| match plan.weights {
                    ScoreCamWeights::ChannelSoftmax => Ok(o),
                    ScoreCamWeights::ClassSoftmax => class_softmax(&o),
                })
                .collect::<Result<Vec<_>>>()?;
            for j in 0..gk {
                chunks.push(image_score(&outputs, j, i, n, scores)?);
            }
            k0 += gk;
        }
        let s = Tensor::f_stack(&chunks, 0)?; // (K,)
        let w = match plan.weights {
            ScoreCamWeights::ChannelSoftmax => s.f_softmax(0, Kind::Float)?,
            ScoreCamWeights::ClassSoftmax => s,
        };
        cams.push(
            ai.f_mul(&w.f_unsqueeze(-1)?.f_unsqueeze(-1)?)?
                .f_sum_dim_intlist(0, false, None::<Kind>)?,
        );
    }
    if images < n {
        let zeros = Tensor::f_zeros([n - images, size[2], size[3]], (a.f_kind()?, a.device()))?;
        cams.extend((0..n - images).map(|r| zeros.get(r)));
    }
    Ok(Tensor::f_stack(&cams, 0)?)
}

/// The scores of image `i` of an `n`-image batch, summed over outputs, on
/// row `j` of `outputs`: the scores are fixed per image (a class each), so
/// row `j` is seen as every image's output and the value of image `i` is
/// kept.
fn image_score(
    outputs: &[Tensor],
    j: i64,
    i: i64,
    n: i64,
    scores: &[&dyn Score],
) -> Result<Tensor> {
    let rows = outputs
        .iter()
        .map(|o| {
            let row = o.f_narrow(0, j, 1)?;
            let mut shape = row.size();
            shape[0] = n;
            Ok(row.f_expand(shape.as_slice(), false)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let values = score_outputs(&rows, scores)?;
    let mut total: Option<Tensor> = None;
    for v in values {
        let v = v.f_to_kind(Kind::Float)?.f_select(0, i)?;
        total = Some(match total {
            None => v,
            Some(t) => t.f_add(&v)?,
        });
    }
    total.ok_or(Error::Empty { what: "scores" })
}

/// Softmax over the class axis (dim 1).
fn class_softmax(o: &Tensor) -> Result<Tensor> {
    if o.dim() < 2 {
        return Err(Error::shape(
            "model output for a class softmax",
            "(N, C, ...)",
            &o.size(),
        ));
    }
    Ok(o.f_softmax(1, Kind::Float)?)
}

/// The `m` channels of each image with the largest spatial variance, in
/// channel order: `(N, m, h, w)`. (tf-keras-vis takes the union of every
/// image's top channels for the whole batch; here each image keeps its own,
/// so an image's map does not depend on the rest of the batch.)
pub(super) fn top_variance_channels(a: &Tensor, m: i64) -> Result<Tensor> {
    let size = a.size();
    let var = a
        .f_reshape([size[0], size[1], -1])?
        .f_var_correction(&[2i64][..], 0i64, false)?;
    let (_, idx) = var.f_topk(m, 1, true, true)?;
    let (idx, _) = idx.f_sort(1, false)?;
    let idx = idx
        .f_view([size[0], m, 1, 1])?
        .f_expand([size[0], m, size[2], size[3]], false)?;
    Ok(a.f_gather(1, &idx, false)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn top_variance_keeps_each_images_own_channels_in_order() {
        // Image 0: channel variances 0, 4, 1 -> top 2 = channels 1, 2.
        // Image 1: channel variances 9, 0, 1 -> top 2 = channels 0, 2.
        let a = Tensor::from_slice(&[
            1f32, 1., 0., 4., 0., 2., // image 0
            0., 6., 5., 5., 0., 2., // image 1
        ])
        .view([2, 3, 1, 2]);
        let t = top_variance_channels(&a, 2).unwrap();
        let v = Vec::<f32>::try_from(t.reshape([-1]).to_device(Device::Cpu)).unwrap();
        assert_eq!(v, vec![0., 4., 0., 2., 0., 6., 0., 2.]);
    }
}
