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
/// already fixed on the clean output (one per model output).
///
/// Channel `k` of image `n` gives the mask `M = up(A_k)`, bilinearly
/// resized to `H × W` with corners aligned and scaled to `[0, 1]` by
/// `(M − min) / (max − min + ε)`; the score of the model on `x_n ⊙ M`
/// (summed over outputs) is `s_nk`. Channels are taken in groups of
/// `max(1, batch / N)`, every image of the batch at once, so one forward
/// pass holds at most `max(batch, N)` masked inputs, whatever `K` is; the
/// scores stay on the device.
pub(super) fn cam(
    model: &Model,
    x: &Tensor,
    a: &Tensor,
    scores: &[&dyn Score],
    plan: Plan,
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
    let group = (batch / n.max(1)).max(1);
    let xe = x.f_unsqueeze(1)?; // (N, 1, C, H, W)
    let channels_last = xs[1] > 1 && x.stride()[1] == 1;
    let mut columns = Vec::new();
    let mut k0 = 0;
    while k0 < k {
        let gk = group.min(k - k0);
        let part = a.f_narrow(1, k0, gk)?;
        let up = part.f_upsample_bilinear2d([height, width], true, None, None)?;
        let flat = up.f_reshape([n, gk, -1])?;
        let max = flat.f_amax(2, true)?.f_unsqueeze(-1)?;
        let min = flat.f_amin(2, true)?.f_unsqueeze(-1)?;
        let masks = up
            .f_sub(&min)?
            .f_div(&max.f_sub(&min)?.f_add_scalar(eps)?)?
            .f_to_kind(x.kind())?;
        // (N, gk, C, H, W) -> (gk, N, C, H, W): rows grouped by channel, so
        // each block of N rows is one channel of every image. A
        // channels-last input gives channels-last masked inputs (the same
        // values, NHWC strides), as fast for the model as the input was.
        let masked = if channels_last {
            xe.f_permute([0, 1, 3, 4, 2])?
                .f_mul(&masks.f_unsqueeze(-1)?)?
                .f_transpose(0, 1)?
                .f_contiguous()?
                .f_reshape([gk * n, height, width, xs[1]])?
                .f_permute([0, 3, 1, 2])?
        } else {
            xe.f_mul(&masks.f_unsqueeze(2)?)?
                .f_transpose(0, 1)?
                .f_contiguous()?
                .f_reshape([gk * n, xs[1], height, width])?
        };
        let outputs = forward_in_chunks(model, &masked, batch)?;
        let mut block_scores = Vec::with_capacity(gk as usize);
        for j in 0..gk {
            let block = outputs
                .iter()
                .map(|o| {
                    let o = o.f_narrow(0, j * n, n)?;
                    match plan.weights {
                        ScoreCamWeights::ChannelSoftmax => Ok(o),
                        ScoreCamWeights::ClassSoftmax => class_softmax(&o),
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            let values = score_outputs(&block, scores)?;
            let mut total: Option<Tensor> = None;
            for v in values {
                let v = v.f_to_kind(Kind::Float)?;
                total = Some(match total {
                    None => v,
                    Some(t) => t.f_add(&v)?,
                });
            }
            let total = total.ok_or(Error::Empty { what: "scores" })?;
            block_scores.push(total);
        }
        columns.push(Tensor::f_stack(&block_scores, 1)?);
        k0 += gk;
    }
    let s = Tensor::f_cat(&columns, 1)?; // (N, K)
    let w = match plan.weights {
        ScoreCamWeights::ChannelSoftmax => s.f_softmax(1, Kind::Float)?,
        ScoreCamWeights::ClassSoftmax => s,
    };
    Ok(a.f_mul(&w.f_unsqueeze(-1)?.f_unsqueeze(-1)?)?
        .f_sum_dim_intlist(1, false, None::<Kind>)?)
}

/// The model's outputs on `x`, from forward passes of at most `batch` rows,
/// concatenated per output.
fn forward_in_chunks(model: &Model, x: &Tensor, batch: i64) -> Result<Vec<Tensor>> {
    let rows = x.size()[0];
    let mut parts: Vec<Vec<Tensor>> = Vec::new();
    let mut r0 = 0;
    while r0 < rows {
        let len = batch.min(rows - r0);
        let outs = model.forward(&[x.f_narrow(0, r0, len)?])?;
        if parts.is_empty() {
            parts = outs.into_iter().map(|o| vec![o]).collect();
        } else {
            for (p, o) in parts.iter_mut().zip(outs) {
                p.push(o);
            }
        }
        r0 += len;
    }
    parts
        .iter()
        .map(|p| Ok(Tensor::f_cat(p, 0)?))
        .collect::<Result<Vec<_>>>()
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
