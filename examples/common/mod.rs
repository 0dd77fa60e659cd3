//! Shared by the examples: load a bundled model and a few sample images.

use anyhow::Result;
use tch::{Device, Tensor};
use tch_vis::preprocess::{stack, Preprocessor, Sidecar};
use tch_vis::Model;

/// The model at `path` on the best device, and `images` prepared as its
/// sidecar says, stacked into one batch.
pub fn load(path: &str, images: &[&str]) -> Result<(Model, Tensor)> {
    let device = Device::cuda_if_available();
    let model = Model::load(path, device)?;
    let pre = Preprocessor::new(Sidecar::for_model(path)?);
    let prepared = images
        .iter()
        .map(|p| pre.load(p))
        .collect::<tch_vis::Result<Vec<_>>>()?;
    let inputs: Vec<&Tensor> = prepared.iter().map(|p| &p.input).collect();
    Ok((model, stack(&inputs)?))
}

/// Sample images shipped in `examples/images`.
pub const DIGITS: [&str; 4] = [
    "examples/images/gray/0/heldout_0036.png",
    "examples/images/gray/3/heldout_0023.png",
    "examples/images/gray/7/heldout_0043.png",
    "examples/images/gray/8/heldout_0028.png",
];

/// Per-sample mean |gradient| and the share of the total in the top 10% of
/// pixels: how concentrated the explanation is.
pub fn describe(grad: &Tensor) -> Result<Vec<String>> {
    let n = grad.size()[0];
    (0..n)
        .map(|i| {
            let g = grad.f_get(i)?.f_abs()?.f_flatten(0, -1)?;
            let mean = g.f_mean(None::<tch::Kind>)?.f_double_value(&[])?;
            let k = (g.size()[0] / 10).max(1);
            let (top, _) = g.f_topk(k, 0, true, true)?;
            let total = g.f_sum(None::<tch::Kind>)?.f_double_value(&[])?;
            let share = top.f_sum(None::<tch::Kind>)?.f_double_value(&[])? / total.max(1e-30);
            Ok(format!(
                "mean |grad| {mean:.3e}, top-10% share {:.0}%",
                share * 100.0
            ))
        })
        .collect()
}
