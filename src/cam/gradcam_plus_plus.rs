//! Grad-CAM++ (Chattopadhyay et al., 2018, "Grad-CAM++: Improved Visual
//! Explanations for Deep Convolutional Networks", eq. 19).

use tch::{Kind, Tensor};

use crate::error::Result;

use super::AlphaNorm;

/// `Σ_k w_k A_k` with `w_k = Σ_ij α_kij relu(g_kij)`, where
/// `α = g² / (2 g² + (Σ_ij A_k) g³ + ε)`; `(N, h, w)` before ReLU.
///
/// - [`AlphaNorm::None`]: `ε = 1e-6` and `α = 0` where `g = 0`
///   (pytorch-grad-cam).
/// - [`AlphaNorm::Spatial`]: `ε = 1` where `g² = 0` (else 0), then `α` is
///   divided by its spatial sum (plus 1 where that sum is 0), as
///   tf-keras-vis does.
pub(super) fn cam(a: &Tensor, g: &Tensor, norm: AlphaNorm) -> Result<Tensor> {
    let g2 = g.f_mul(g)?;
    let g3 = g2.f_mul(g)?;
    let sum_a = a.f_sum_dim_intlist(&[2i64, 3][..], true, None::<Kind>)?;
    let denom = g2.f_mul_scalar(2.0)?.f_add(&sum_a.f_mul(&g3)?)?;
    let alpha = match norm {
        AlphaNorm::None => {
            let alpha = g2.f_div(&denom.f_add_scalar(1e-6)?)?;
            let zero = g.f_zeros_like()?;
            alpha.f_where_self(&g.f_ne(0.0)?, &zero)?
        }
        AlphaNorm::Spatial => {
            let denom = denom.f_add(&g2.f_eq(0.0)?.f_to_kind(g2.kind())?)?;
            let alpha = g2.f_div(&denom)?;
            let total = alpha.f_sum_dim_intlist(&[2i64, 3][..], true, None::<Kind>)?;
            let total = total.f_add(&total.f_eq(0.0)?.f_to_kind(total.kind())?)?;
            alpha.f_div(&total)?
        }
    };
    let w = g
        .f_relu()?
        .f_mul(&alpha)?
        .f_sum_dim_intlist(&[2i64, 3][..], true, None::<Kind>)?;
    Ok(a.f_mul(&w)?.f_sum_dim_intlist(1, false, None::<Kind>)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pixel_weights_follow_the_formula() {
        // One channel, one pixel: A = 2, g = 1: α = 1 / (2 + 2 + 1e-6),
        // w = α, cam = 2α. Normalised, α / α = 1: cam = 2.
        let a = Tensor::from_slice(&[2f32]).view([1, 1, 1, 1]);
        let g = Tensor::from_slice(&[1f32]).view([1, 1, 1, 1]);
        let c = cam(&a, &g, AlphaNorm::None)
            .unwrap()
            .double_value(&[0, 0, 0]);
        assert!((c - 2.0 / (4.0 + 1e-6)).abs() < 1e-7, "{c}");
        let c = cam(&a, &g, AlphaNorm::Spatial)
            .unwrap()
            .double_value(&[0, 0, 0]);
        assert!((c - 2.0).abs() < 1e-6, "{c}");
    }

    #[test]
    fn zero_gradients_give_zero_weights() {
        let a = Tensor::from_slice(&[2f32, 1.]).view([1, 1, 1, 2]);
        let g = Tensor::from_slice(&[0f32, 0.]).view([1, 1, 1, 2]);
        for norm in [AlphaNorm::None, AlphaNorm::Spatial] {
            let c = cam(&a, &g, norm).unwrap();
            assert_eq!(c.abs().sum(Kind::Float).double_value(&[]), 0.0);
        }
    }
}
