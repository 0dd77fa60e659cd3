//! Colour maps and heatmap overlays for saliency maps.
//!
//! The colour map is matplotlib's `jet` (the one tf-keras-vis's examples
//! use), evaluated exactly from matplotlib's piecewise-linear segment data.
//! An overlay blends it over the image: `alpha × jet(m) + (1 − alpha) ×
//! image`, at the image's own size, rounded to 8-bit RGB.

use std::io::Cursor;

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};

use crate::error::{Error, Result};

/// A colour map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Colormap {
    /// matplotlib's `jet`: dark blue (0) → cyan → yellow → dark red (1).
    #[default]
    Jet,
}

// matplotlib `_jet_data`: (x, y) knots per channel.
const JET_R: &[(f32, f32)] = &[
    (0.0, 0.0),
    (0.35, 0.0),
    (0.66, 1.0),
    (0.89, 1.0),
    (1.0, 0.5),
];
const JET_G: &[(f32, f32)] = &[
    (0.0, 0.0),
    (0.125, 0.0),
    (0.375, 1.0),
    (0.64, 1.0),
    (0.91, 0.0),
    (1.0, 0.0),
];
const JET_B: &[(f32, f32)] = &[
    (0.0, 0.5),
    (0.11, 1.0),
    (0.34, 1.0),
    (0.65, 0.0),
    (1.0, 0.0),
];

fn piecewise(knots: &[(f32, f32)], x: f32) -> f32 {
    let mut prev = (0.0f32, knots.first().map_or(0.0, |k| k.1));
    for &(kx, ky) in knots {
        if x <= kx {
            let span = kx - prev.0;
            if span <= 0.0 {
                return ky;
            }
            return prev.1 + (ky - prev.1) * (x - prev.0) / span;
        }
        prev = (kx, ky);
    }
    prev.1
}

impl Colormap {
    /// The colour of `v` (clamped to `[0, 1]`; NaN is 0) as `[0, 1]` RGB.
    pub fn rgb(self, v: f32) -> [f32; 3] {
        let v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
        match self {
            Colormap::Jet => [
                piecewise(JET_R, v),
                piecewise(JET_G, v),
                piecewise(JET_B, v),
            ],
        }
    }
}

/// Blends `map` (`height × width` values in `[0, 1]`) coloured with `cmap`
/// over `image` (planar `(C, height, width)` values in `[0, 1]`, C = 1 for
/// gray or 3 for RGB): `alpha × colour + (1 − alpha) × image`. Returns
/// interleaved 8-bit RGB.
///
/// # Errors
/// [`Error::Shape`] when the lengths do not match the size.
pub fn overlay(
    image: &[f32],
    channels: usize,
    width: usize,
    height: usize,
    map: &[f32],
    cmap: Colormap,
    alpha: f32,
) -> Result<Vec<u8>> {
    let n = width * height;
    if map.len() != n || image.len() != channels * n || !(channels == 1 || channels == 3) {
        return Err(Error::shape(
            "overlay image and map",
            format!(
                "{channels} x {height} x {width} image (C = 1 or 3) and {height} x {width} map"
            ),
            &[image.len() as i64, map.len() as i64],
        ));
    }
    let to_u8 = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    let mut out = Vec::with_capacity(3 * n);
    for (i, &m) in map.iter().enumerate() {
        let colour = cmap.rgb(m);
        for (c, col) in colour.iter().enumerate() {
            let px = if channels == 1 {
                image[i]
            } else {
                image[c * n + i]
            };
            out.push(to_u8(alpha * col + (1.0 - alpha) * px));
        }
    }
    Ok(out)
}

/// Encodes interleaved 8-bit RGB as a PNG (fast compression).
///
/// # Errors
/// [`Error::Image`] when encoding fails (for example a wrong length).
pub fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    PngEncoder::new_with_quality(
        Cursor::new(&mut bytes),
        CompressionType::Fast,
        FilterType::Adaptive,
    )
    .write_image(rgb, width, height, ExtendedColorType::Rgb8)
    .map_err(|e| Error::Image {
        path: "<png>".into(),
        reason: e.to_string(),
    })?;
    Ok(bytes)
}

/// [`overlay`] with jet at alpha 0.5, encoded as a PNG.
///
/// # Errors
/// As [`overlay`] and [`encode_png`].
pub fn overlay_png(
    image: &[f32],
    channels: usize,
    width: usize,
    height: usize,
    map: &[f32],
) -> Result<Vec<u8>> {
    let rgb = overlay(image, channels, width, height, map, Colormap::Jet, 0.5)?;
    encode_png(
        &rgb,
        u32::try_from(width).unwrap_or(u32::MAX),
        u32::try_from(height).unwrap_or(u32::MAX),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jet_matches_matplotlib_at_the_knots() {
        let jet = Colormap::Jet;
        assert_eq!(jet.rgb(0.0), [0.0, 0.0, 0.5]);
        assert_eq!(jet.rgb(1.0), [0.5, 0.0, 0.0]);
        let mid = jet.rgb(0.5);
        // matplotlib: jet(0.5) ≈ (0.4838, 1.0, 0.4838) on its 256-entry LUT.
        assert!((mid[0] - 0.4839).abs() < 0.01 && mid[1] == 1.0, "{mid:?}");
        assert_eq!(jet.rgb(f32::NAN), jet.rgb(0.0));
        assert_eq!(jet.rgb(7.0), jet.rgb(1.0));
    }

    #[test]
    fn overlay_blends_and_checks_sizes() {
        let rgb = overlay(&[1.0, 0.0], 1, 2, 1, &[0.0, 1.0], Colormap::Jet, 0.5).unwrap();
        // 0.5*[0,0,.5] + 0.5*1 = [.5,.5,.75]; 0.5*[.5,0,0] + 0 = [.25,0,0]
        assert_eq!(rgb, vec![128, 128, 191, 64, 0, 0]);
        assert!(overlay(&[1.0], 1, 2, 1, &[0.0, 1.0], Colormap::Jet, 0.5).is_err());
        let png = overlay_png(&[0.5; 6], 3, 2, 1, &[0.2, 0.8]).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}
