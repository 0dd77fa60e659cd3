//! From image files to model inputs: the model sidecar (`M.json`) and
//! decoding, luma, resizing and normalisation.
//!
//! The steps, in order (contract §3 "Preprocessing"):
//! 1. decode with the `image` crate (format guessed from the bytes, not the
//!    extension) to RGB: alpha dropped, palette expanded, EXIF orientation
//!    ignored; 8-bit samples divided by 255 and 16-bit by 65535 in `f32`
//!    (float images are taken as they are);
//! 2. when the sidecar says `channels: 1`, luma `0.299 R + 0.587 G + 0.114 B`
//!    in `f32`, evaluated left to right;
//! 3. a bilinear resize to `input_size`, only when the size differs, with
//!    libtorch's `upsample_bilinear2d` (`align_corners = false`, no
//!    antialiasing) — exactly `torch.nn.functional.interpolate(x, size,
//!    mode="bilinear")`;
//! 4. `(x - mean) / std` per channel, in `f32`.
//!
//! Decoding is memory-limited ([`Preprocessor::limits`]): an image whose
//! dimensions or decode buffers exceed the limits is an [`Error::Image`], not
//! an out-of-memory abort.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageReader, Limits};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// The preprocessing a model expects, read from the JSON sidecar `M.json`
/// that sits beside `M.pt`.
///
/// ```json
/// {"input_size": [32, 32], "channels": 1, "mean": [0.3054], "std": [0.3234],
///  "labels": ["0", "1", "2"]}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    /// `[H, W]`: the model's input height and width.
    pub input_size: [usize; 2],
    /// 1 (luma) or 3 (RGB).
    pub channels: usize,
    /// Per-channel mean subtracted from the `[0, 1]` pixels.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation the pixels are divided by.
    pub std: Vec<f32>,
    /// Class names, if the model has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
}

impl Sidecar {
    /// The sidecar path of a model: `M.json` beside `M.pt`.
    pub fn path_for_model(model: impl AsRef<Path>) -> PathBuf {
        model.as_ref().with_extension("json")
    }

    /// Loads and validates the sidecar of `model` (`M.json` beside `M.pt`).
    ///
    /// # Errors
    /// As [`Sidecar::load`].
    pub fn for_model(model: impl AsRef<Path>) -> Result<Self> {
        Self::load(Self::path_for_model(model))
    }

    /// Loads and validates a sidecar file.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read; [`Error::Sidecar`] when it
    /// is not valid JSON of the expected form or fails [`Sidecar::validate`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses and validates sidecar JSON; `path` is used in error messages.
    ///
    /// # Errors
    /// [`Error::Sidecar`] for invalid JSON or an invalid sidecar.
    pub fn from_json(text: &str, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let sidecar: Sidecar = serde_json::from_str(text).map_err(|e| Error::Sidecar {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        sidecar.validate().map_err(|reason| Error::Sidecar {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(sidecar)
    }

    /// Checks the fields: `channels` is 1 or 3, `input_size` is positive,
    /// `mean` and `std` have one finite entry per channel, no `std` is 0.
    ///
    /// # Errors
    /// The reason, as text.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.channels != 1 && self.channels != 3 {
            return Err(format!("channels must be 1 or 3, got {}", self.channels));
        }
        let [h, w] = self.input_size;
        if h == 0 || w == 0 || h > 1 << 16 || w > 1 << 16 {
            return Err(format!(
                "input_size must be two positive sizes up to 65536, got [{h}, {w}]"
            ));
        }
        for (name, v) in [("mean", &self.mean), ("std", &self.std)] {
            if v.len() != self.channels {
                return Err(format!(
                    "{name} must have {} values (one per channel), got {}",
                    self.channels,
                    v.len()
                ));
            }
            if let Some(x) = v.iter().find(|x| !x.is_finite()) {
                return Err(format!("{name} must be finite, got {x}"));
            }
        }
        if self.std.contains(&0.0) {
            return Err("std must not be 0".into());
        }
        Ok(())
    }

    /// `[H, W]` as `i64`, for tensor shapes.
    pub fn size_i64(&self) -> [i64; 2] {
        [self.input_size[0] as i64, self.input_size[1] as i64]
    }
}

/// One image, ready for the model.
#[derive(Debug)]
pub struct Prepared {
    /// The model input `(C, H, W)`, float32, normalised.
    pub input: Tensor,
    /// The resized image `(C, H, W)` in `[0, 1]` before normalisation (for
    /// overlays).
    pub image: Tensor,
    /// The decoded image's `(width, height)` before resizing.
    pub original_size: (u32, u32),
}

/// Turns image files into model inputs as a [`Sidecar`] prescribes.
///
/// ```no_run
/// use tch_vis::preprocess::{Preprocessor, Sidecar};
/// # fn main() -> tch_vis::Result<()> {
/// let pre = Preprocessor::new(Sidecar::for_model("models/digits_cnn.pt")?);
/// let x = pre.load("examples/images/gray/3/heldout_0023.png")?;
/// assert_eq!(x.input.size(), vec![1, 32, 32]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Preprocessor {
    sidecar: Sidecar,
    max_dimension: u32,
    max_alloc: u64,
}

impl Preprocessor {
    /// A preprocessor with the default decode limits (16384 pixels per side,
    /// 512 MiB of decode buffers).
    pub fn new(sidecar: Sidecar) -> Self {
        Preprocessor {
            sidecar,
            max_dimension: 16384,
            max_alloc: 512 << 20,
        }
    }

    /// Sets the decode limits: the largest width or height, and the most
    /// bytes a decoder may allocate.
    pub fn limits(mut self, max_dimension: u32, max_alloc: u64) -> Self {
        self.max_dimension = max_dimension;
        self.max_alloc = max_alloc;
        self
    }

    /// The sidecar.
    pub fn sidecar(&self) -> &Sidecar {
        &self.sidecar
    }

    /// Reads and prepares an image file.
    ///
    /// # Errors
    /// [`Error::Image`] when the file cannot be read or decoded (unknown
    /// format, truncated data, over the limits); [`Error::Torch`] if a
    /// tensor operation fails.
    pub fn load(&self, path: impl AsRef<Path>) -> Result<Prepared> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::Image {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        self.prepare_bytes(&bytes, path)
    }

    /// Prepares an encoded image held in memory; `path` names it in errors.
    ///
    /// # Errors
    /// As [`Preprocessor::load`].
    pub fn prepare_bytes(&self, bytes: &[u8], path: impl AsRef<Path>) -> Result<Prepared> {
        let path = path.as_ref();
        let img = self.decode(bytes, path)?;
        let original_size = (img.width(), img.height());
        let pixels = to_planes(&img, self.sidecar.channels);
        self.prepare_planes(pixels, original_size)
    }

    /// Prepares planar `[0, 1]` pixels `(C, height, width)` (C = the
    /// sidecar's channels) of an already decoded image.
    ///
    /// # Errors
    /// [`Error::Shape`] when `pixels` has the wrong length; [`Error::Torch`]
    /// if a tensor operation fails.
    pub fn prepare_planes(
        &self,
        pixels: Vec<f32>,
        (width, height): (u32, u32),
    ) -> Result<Prepared> {
        let c = self.sidecar.channels as i64;
        let (w, h) = (i64::from(width), i64::from(height));
        if pixels.len() as i64 != c * h * w {
            return Err(Error::shape(
                "image pixels",
                format!("{c} x {h} x {w} values"),
                &[pixels.len() as i64],
            ));
        }
        let x = Tensor::f_from_slice(&pixels)?.f_view([1, c, h, w])?;
        let [th, tw] = self.sidecar.size_i64();
        let x = if (h, w) == (th, tw) {
            x
        } else {
            x.f_upsample_bilinear2d([th, tw], false, None, None)?
        };
        let image = x.f_view([c, th, tw])?;
        let mean = Tensor::f_from_slice(&self.sidecar.mean)?.f_view([c, 1, 1])?;
        let std = Tensor::f_from_slice(&self.sidecar.std)?.f_view([c, 1, 1])?;
        let input = image.f_sub(&mean)?.f_div(&std)?;
        Ok(Prepared {
            input,
            image,
            original_size: (width, height),
        })
    }

    fn decode(&self, bytes: &[u8], path: &Path) -> Result<DynamicImage> {
        let err = |reason: String| Error::Image {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.is_empty() {
            return Err(err("empty file".into()));
        }
        let mut reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| err(e.to_string()))?;
        if reader.format().is_none() {
            return Err(err("not a recognised image format".into()));
        }
        let mut limits = Limits::default();
        limits.max_image_width = Some(self.max_dimension);
        limits.max_image_height = Some(self.max_dimension);
        limits.max_alloc = Some(self.max_alloc);
        reader.limits(limits);
        let img = reader.decode().map_err(|e| err(e.to_string()))?;
        if img.width() == 0 || img.height() == 0 {
            return Err(err("image has no pixels".into()));
        }
        Ok(img)
    }
}

/// Planar `[0, 1]` pixels `(C, H, W)` of a decoded image: RGB for `channels`
/// 3, luma for 1.
pub fn to_planes(img: &DynamicImage, channels: usize) -> Vec<f32> {
    let rgb: Vec<f32> = match img {
        DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageRgb8(_)
        | DynamicImage::ImageRgba8(_) => img
            .to_rgb8()
            .into_raw()
            .into_iter()
            .map(|v| f32::from(v) / 255.0)
            .collect(),
        DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_)
        | DynamicImage::ImageRgb16(_)
        | DynamicImage::ImageRgba16(_) => img
            .to_rgb16()
            .into_raw()
            .into_iter()
            .map(|v| f32::from(v) / 65535.0)
            .collect(),
        _ => img.to_rgb32f().into_raw(),
    };
    let n = rgb.len() / 3;
    if channels == 1 {
        rgb.chunks_exact(3)
            .map(|p| 0.299f32 * p[0] + 0.587f32 * p[1] + 0.114f32 * p[2])
            .collect()
    } else {
        let mut planes = vec![0f32; rgb.len()];
        for (i, p) in rgb.chunks_exact(3).enumerate() {
            planes[i] = p[0];
            planes[n + i] = p[1];
            planes[2 * n + i] = p[2];
        }
        planes
    }
}

/// Stacks prepared `(C, H, W)` inputs into an `N×C×H×W` batch.
///
/// # Errors
/// [`Error::Empty`] for no inputs; [`Error::Torch`] if stacking fails.
pub fn stack(inputs: &[&Tensor]) -> Result<Tensor> {
    if inputs.is_empty() {
        return Err(Error::Empty { what: "inputs" });
    }
    Ok(Tensor::f_stack(inputs, 0)?.f_to_kind(Kind::Float)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar(channels: usize, size: [usize; 2]) -> Sidecar {
        Sidecar {
            input_size: size,
            channels,
            mean: vec![0.5; channels],
            std: vec![0.25; channels],
            labels: None,
        }
    }

    #[test]
    fn sidecar_validation_names_the_problem() {
        let bad = [
            r#"{"input_size": [32, 32], "channels": 2, "mean": [0, 0], "std": [1, 1]}"#,
            r#"{"input_size": [32, 32], "channels": 3, "mean": [0], "std": [1, 1, 1]}"#,
            r#"{"input_size": [32, 32], "channels": 1, "mean": [0], "std": [0]}"#,
            r#"{"input_size": [0, 32], "channels": 1, "mean": [0], "std": [1]}"#,
            r#"{"input_size": [32], "channels": 1, "mean": [0], "std": [1]}"#,
            r#"not json"#,
        ];
        for text in bad {
            assert!(
                matches!(
                    Sidecar::from_json(text, "m.json"),
                    Err(Error::Sidecar { .. })
                ),
                "{text}"
            );
        }
        let ok = Sidecar::from_json(
            r#"{"input_size": [32, 24], "channels": 3, "mean": [0,0,0], "std": [1,1,1], "labels": ["a"]}"#,
            "m.json",
        )
        .unwrap();
        assert_eq!(ok.input_size, [32, 24]);
    }

    #[test]
    fn luma_and_normalisation() {
        let mut img = image::RgbImage::new(2, 1);
        img.put_pixel(0, 0, image::Rgb([255, 0, 0]));
        img.put_pixel(1, 0, image::Rgb([0, 0, 255]));
        let img = DynamicImage::ImageRgb8(img);
        let luma = to_planes(&img, 1);
        assert_eq!(luma, vec![0.299f32, 0.114f32]);
        let rgb = to_planes(&img, 3);
        assert_eq!(rgb, vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
        let pre = Preprocessor::new(sidecar(3, [1, 2]));
        let p = pre.prepare_planes(rgb, (2, 1)).unwrap();
        // (1 - 0.5) / 0.25 = 2, (0 - 0.5) / 0.25 = -2; no resize.
        assert_eq!(
            Vec::<f32>::try_from(&p.input.reshape([-1])).unwrap(),
            vec![2.0, -2.0, -2.0, -2.0, -2.0, 2.0]
        );
    }

    #[test]
    fn sixteen_bit_is_scaled_by_65535() {
        let mut img = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::new(1, 1);
        img.put_pixel(0, 0, image::Luma([65535]));
        let planes = to_planes(&DynamicImage::ImageLuma16(img), 3);
        assert_eq!(planes, vec![1.0, 1.0, 1.0]);
    }

    #[test]
    fn resizes_only_when_needed_and_rejects_garbage() {
        let pre = Preprocessor::new(sidecar(1, [4, 6]));
        let p = pre.prepare_planes(vec![0.5; 2 * 3], (3, 2)).unwrap();
        assert_eq!(p.input.size(), vec![1, 4, 6]);
        assert_eq!(p.original_size, (3, 2));
        for bytes in [&b""[..], b"hello", b"\x89PNG\r\n\x1a\n\0\0"] {
            assert!(matches!(
                pre.prepare_bytes(bytes, "x.png"),
                Err(Error::Image { .. })
            ));
        }
    }

    #[test]
    fn huge_dimensions_are_an_error_not_an_abort() {
        let img = image::GrayImage::new(300, 10);
        let mut png = Vec::new();
        img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let pre = Preprocessor::new(sidecar(1, [8, 8])).limits(256, 1 << 20);
        let e = pre.prepare_bytes(&png, "big.png").unwrap_err();
        assert!(matches!(e, Error::Image { .. }), "{e}");
    }
}
