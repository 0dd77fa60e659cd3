//! Grad-CAM (Selvaraju et al., 2017, "Grad-CAM: Visual Explanations from
//! Deep Networks via Gradient-based Localization").

use tch::{Kind, Tensor};

use crate::error::Result;

/// `Σ_k w_k A_k` with `w_k = mean_ij ∂S/∂A_kij`: the map before ReLU,
/// `(N, h, w)`, from feature maps `a` and their gradients `g`, `(N, K, h, w)`.
pub(super) fn cam(a: &Tensor, g: &Tensor) -> Result<Tensor> {
    let w = g.f_mean_dim(&[2i64, 3][..], true, None::<Kind>)?;
    Ok(a.f_mul(&w)?.f_sum_dim_intlist(1, false, None::<Kind>)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn weights_are_the_mean_gradient_of_each_channel() {
        // Two channels of 1x2: A = [[1, 2], [3, 4]], g = [[1, 3], [-1, -1]]:
        // w = [2, -1], cam = 2 * [1, 2] - [3, 4] = [-1, 0].
        let a = Tensor::from_slice(&[1f32, 2., 3., 4.]).view([1, 2, 1, 2]);
        let g = Tensor::from_slice(&[1f32, 3., -1., -1.]).view([1, 2, 1, 2]);
        let c = cam(&a, &g).unwrap();
        assert_eq!(c.size(), vec![1, 1, 2]);
        let v = Vec::<f32>::try_from(c.reshape([-1]).to_device(Device::Cpu)).unwrap();
        assert_eq!(v, vec![-1.0, 0.0]);
    }
}
