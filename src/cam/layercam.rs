//! Layer-CAM (Jiang et al., 2021, "LayerCAM: Exploring Hierarchical Class
//! Activation Maps for Localization").

use tch::{Kind, Tensor};

use crate::error::Result;

/// `Σ_k relu(g_k) ⊙ A_k`: element-wise positive gradients as weights;
/// `(N, h, w)` before ReLU.
pub(super) fn cam(a: &Tensor, g: &Tensor) -> Result<Tensor> {
    Ok(g.f_relu()?
        .f_mul(a)?
        .f_sum_dim_intlist(1, false, None::<Kind>)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_gradients_are_dropped_per_position() {
        // A = [[1, 2], [3, 4]], g = [[1, -1], [2, 0.5]]:
        // cam = [1*1 + 3*2, 0*2 + 4*0.5] = [7, 2].
        let a = Tensor::from_slice(&[1f32, 2., 3., 4.]).view([1, 2, 1, 2]);
        let g = Tensor::from_slice(&[1f32, -1., 2., 0.5]).view([1, 2, 1, 2]);
        let v = Vec::<f32>::try_from(cam(&a, &g).unwrap().reshape([-1])).unwrap();
        assert_eq!(v, vec![7.0, 2.0]);
    }
}
