//! From image files to model inputs: the model sidecar (`M.json`) and
//! decoding, luma, resizing and normalisation.
//!
//! # The plain pipeline (a sidecar without `resize`)
//! 1. decode (format guessed from the bytes, not the extension; JPEGs with
//!    libjpeg-turbo's decoder, other formats with the `image` crate) to
//!    RGB: alpha dropped, palette expanded, EXIF orientation ignored;
//!    8-bit samples divided by 255 and 16-bit by 65535 in `f32`
//!    (float images are taken as they are);
//! 2. when the sidecar says `channels: 1`, luma `0.299 R + 0.587 G + 0.114 B`
//!    in `f32`, evaluated left to right;
//! 3. a bilinear resize to `input_size`, only when the size differs, with
//!    libtorch's `upsample_bilinear2d` (`align_corners = false`, no
//!    antialiasing) — exactly `torch.nn.functional.interpolate(x, size,
//!    mode="bilinear")` as PyTorch computes it on more than one thread
//!    (libtorch picks between two kernels by the thread count; 8-bit images
//!    are resized from their bytes with that choice on every thread);
//! 4. `(x - mean) / std` per channel, in `f32`.
//!
//! # The torchvision pipeline (a sidecar with `resize`)
//! For models trained with torchvision's `Resize` + `CenterCrop` recipe, the
//! keys `resize`, `interpolation`, `antialias` and `crop` (see [`Sidecar`])
//! reproduce `torchvision.transforms.v2` applied to the decoded uint8 RGB
//! tensor:
//! 1. decode as above, to 8-bit RGB (16-bit samples rounded to 8 bits);
//! 2. `channels: 1`: torchvision's `Grayscale` *first*, on the uint8 pixels
//!    (`0.2989 R + 0.587 G + 0.114 B` in `f32`, truncated to uint8), as in
//!    the usual `Compose([Grayscale(), Resize(..), ...])`;
//! 3. `Resize` in uint8 with the libtorch kernels torchvision calls on the
//!    CPU (`_upsample_bilinear2d_aa`, `upsample_bilinear2d`,
//!    `_upsample_bicubic2d_aa`, `upsample_bicubic2d` on uint8, which round
//!    and clamp to 0..255 themselves), output size by torchvision's rule
//!    ([`Resize::output_size`]), skipped when the size does not change.
//!    For RGB with antialiasing (the usual recipe) tch-vis runs the same
//!    algorithm itself and computes only the pixels the crop keeps: the
//!    same per-axis int16 weights and integer sums, so the same bytes (a
//!    test compares it with libtorch's kernels over 1,500 random sizes and
//!    windows), 1.8–2.4× faster for `Resize(256)` + `CenterCrop(224)`;
//! 4. `CenterCrop` to `input_size` ([`center_crop_window`]: Python's
//!    round-half-to-even offsets, zero padding when the crop is larger);
//! 5. `ToDtype(float32, scale=True)` (`x × (1 / 255)`), then `Normalize`.
//!
//! On PNGs (where every decoder reads the same pixels) the result is
//! bit-identical to torchvision 0.26 on the same CPU, for bilinear and
//! bicubic, with and without antialiasing, at every aspect ratio tested
//! (down to 1000 × 20); tch-vis promises one uint8 step per value and
//! 0.05 of a step on average. (On a CPU without AVX2, torchvision resizes
//! bilinear in float and rounds, while libtorch's generic uint8 kernel is
//! used here: expect rare one-step differences there.)
//!
//! JPEGs are decoded by libjpeg-turbo's decoder (the copy mozjpeg ships,
//! built from source), with libjpeg's defaults as PIL and torchvision's
//! `decode_jpeg` use them: the islow IDCT, fancy chroma upsampling and its
//! fixed-point YCbCr conversion. The pixels are bit-identical to both on
//! every kind of JPEG tested (4:2:0, 4:2:2, 4:4:4, progressive, grayscale,
//! restart markers, quality 50 to 100, sizes down to 9 × 7), and so is the
//! whole torchvision recipe on them. A file that ends before its image
//! does is an error, as in PIL and torchvision. CMYK and YCCK JPEGs are
//! decoded to CMYK by libjpeg and converted to RGB as PIL converts them
//! (Adobe's inverted polarity, PIL's fixed-point rounding), which is also
//! what torchvision's `decode_jpeg` gives: bit-identical to both on the
//! CMYK (4:4:4, subsampled) and YCCK goldens.
//!
//! [`Preprocessor::fast_jpeg`] (`--fast-jpeg`) decodes with zune-jpeg
//! instead (through the `image` crate), which upsamples chroma with other
//! rounding: on 4:2:0 JPEGs of quality 90 the pixels differ by up to 4
//! uint8 steps, 0.26 to 0.36 on average (about 75-80 % of the values are
//! equal; 4:4:4 and grayscale 0.005 to 0.02), and a truncated JPEG
//! decodes, its missing part filled. It is faster than libjpeg-turbo built
//! without SIMD, which is how `mozjpeg-sys` builds it where `nasm` is
//! missing at build time (see BENCHMARKS.md for the figures).
//!
//! Large JPEGs can be decoded at 1/2, 1/4 or 1/8 of their size in the DCT
//! domain (libjpeg's scaled IDCT), opt-in with [`Preprocessor::jpeg_draft`]
//! (`--jpeg-draft` on the command line): the scale PIL's `draft` picks
//! for the resize's output size, which leaves the resize a downscale in
//! both axes, and PIL's `draft` pixels, bit for bit. On 3000 × 2000
//! photos of quality 90 (one thread, ms per image, `profile_stages
//! --recipe torchvision`) decode + resize went from 38–46 + 2.0
//! (libjpeg-turbo without SIMD; zune-jpeg 28–29 + 2.0–3.3) to 17–18 + 0.7. The inputs are then close
//! to, not equal to, torchvision's: on a 1600 × 1200 JPEG of quality 90,
//! 0.52 uint8 steps on average (max 19) from the full decode with
//! `resize`/`crop`; 1.14 (max 86) without resize keys, whose resize
//! without antialiasing aliases the full decode's fine texture.
//!
//! Decoding is memory-limited ([`Preprocessor::limits`]): a file or image
//! whose dimensions, file size, decode buffers, 8-bit RGB copy or float
//! planes exceed the limits is an [`Error::Image`], not an out-of-memory
//! abort.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{ColorType, DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::heatmap::MapRegion;

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
    /// torchvision's `Resize`: the shorter side to `S` (`"resize": S`), or
    /// an exact size (`"resize": [h, w]`). Its presence switches to the
    /// torchvision pipeline (see the module documentation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<Resize>,
    /// The resize filter (default bilinear); only with `resize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpolation: Option<Interpolation>,
    /// Whether a downscale is antialiased (default `true`, as torchvision);
    /// only with `resize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub antialias: Option<bool>,
    /// torchvision's `CenterCrop` `[h, w]` after the resize (read from `S`
    /// and `[S]` too, a square); must equal `input_size`. Only with
    /// `resize`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crop_size"
    )]
    pub crop: Option<[usize; 2]>,
}

/// The `resize` key of a sidecar: torchvision's `Resize(size)`. Read from
/// `S` or `[S]` (the shorter side, as torchvision reads `Resize(S)` and
/// `Resize([S])`) or `[h, w]`; written as `S` or `[h, w]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, try_from = "serde_json::Value")]
pub enum Resize {
    /// `"resize": S`: the shorter side becomes `S`, the longer one
    /// `floor(S × long / short)` (torchvision's rule, aspect kept).
    ShorterSide(usize),
    /// `"resize": [h, w]`: exactly this height and width.
    Exact([usize; 2]),
}

impl Resize {
    /// The `(height, width)` torchvision's `Resize` gives an image of
    /// `(height, width)`.
    ///
    /// ```
    /// use tch_vis::preprocess::Resize;
    /// assert_eq!(Resize::ShorterSide(256).output_size(480, 640), (256, 341));
    /// assert_eq!(Resize::ShorterSide(256).output_size(1000, 20), (12800, 256));
    /// assert_eq!(Resize::Exact([224, 200]).output_size(480, 640), (224, 200));
    /// ```
    pub fn output_size(self, height: usize, width: usize) -> (usize, usize) {
        match self {
            Resize::Exact([h, w]) => (h, w),
            Resize::ShorterSide(s) => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                // Python's `int(s * long / short)`: an exact product, one
                // correctly rounded division in f64, then truncation.
                let new_long = (s as f64 * long as f64 / short.max(1) as f64) as usize;
                if width <= height {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        }
    }
}

impl TryFrom<serde_json::Value> for Resize {
    type Error = String;

    fn try_from(v: serde_json::Value) -> std::result::Result<Self, String> {
        match sizes(&v).as_deref() {
            Some(&[s]) => Ok(Resize::ShorterSide(s)),
            Some(&[h, w]) => Ok(Resize::Exact([h, w])),
            _ => Err(format!(
                "resize is S or [S] (the shorter side, aspect kept) or [h, w] (an exact size), positive integers; got {v}"
            )),
        }
    }
}

/// `S` as `[S]`, or a list of one or two positive integers; `None` for
/// anything else.
fn sizes(v: &serde_json::Value) -> Option<Vec<usize>> {
    let one = |v: &serde_json::Value| v.as_u64().filter(|&n| n > 0).map(|n| n as usize);
    match v {
        serde_json::Value::Array(items) if (1..=2).contains(&items.len()) => {
            items.iter().map(one).collect()
        }
        v => one(v).map(|n| vec![n]),
    }
}

/// The `crop` key: `S`, `[S]` (a square, as torchvision's `CenterCrop`
/// reads them) or `[h, w]`.
fn crop_size<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<[usize; 2]>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    if v.is_null() {
        return Ok(None);
    }
    match sizes(&v).as_deref() {
        Some(&[s]) => Ok(Some([s, s])),
        Some(&[h, w]) => Ok(Some([h, w])),
        _ => Err(serde::de::Error::custom(format!(
            "crop is S or [S] (a square) or [h, w], positive integers; got {v}"
        ))),
    }
}

/// The keys tch-vis reads from a sidecar; see [`Sidecar::from_json`] for the
/// others.
const SIDECAR_KEYS: [&str; 9] = [
    "input_size",
    "channels",
    "mean",
    "std",
    "labels",
    "resize",
    "interpolation",
    "antialias",
    "crop",
];

/// A top-level key of a sidecar's JSON that is not one tch-vis reads but
/// is a near miss of one — one edit (letter added, dropped or changed,
/// upper or lower case aside) from a key of up to six letters, two from a
/// longer one: `"label"`, `"means"`, `"interpolaton"`, `"Input_Size"` — as
/// the reason for refusing it: such a key would otherwise be ignored, and
/// the model fed other inputs than the sidecar's author meant. Other keys
/// (a model's name, its source, notes; `"size"`, `"layers"`, `"drop"`) are left
/// alone.
fn misspelt_key(text: &str) -> Option<String> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str(text) else {
        return None;
    };
    map.keys().find_map(|key| {
        if SIDECAR_KEYS.contains(&key.as_str()) {
            return None;
        }
        let key_lower = key.to_ascii_lowercase();
        let near = SIDECAR_KEYS.iter().find(|known| {
            // Short keys: one edit, the first letter kept ("drop" is
            // no "crop").
            if known.len() <= 6 {
                edits(&key_lower, known) <= 1 && key_lower.chars().next() == known.chars().next()
            } else {
                edits(&key_lower, known) <= 2
            }
        })?;
        Some(format!(
            "unknown key \"{key}\" (did you mean \"{near}\"? the keys are {})",
            SIDECAR_KEYS.join(", ")
        ))
    })
}

/// The Levenshtein distance between two short strings (by `char`).
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The resize filter of the `interpolation` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    /// Bilinear (torchvision's default).
    #[default]
    Bilinear,
    /// Bicubic (`a = -0.75`, as torchvision and PIL).
    Bicubic,
}

/// Where a centre crop of `crop` pixels takes its values from an axis of
/// `size` pixels, as torchvision's `CenterCrop`: `(source start, target
/// start, length)`. A crop larger than the axis pads it with zeros,
/// `(crop − size) / 2` (rounded down) before; a smaller one starts at
/// `round((size − crop) / 2)`, halves rounded to even as Python does.
///
/// ```
/// use tch_vis::preprocess::center_crop_window;
/// assert_eq!(center_crop_window(256, 224), (16, 0, 224));
/// assert_eq!(center_crop_window(257, 224), (16, 0, 224)); // 16.5 -> 16
/// assert_eq!(center_crop_window(259, 224), (18, 0, 224)); // 17.5 -> 18
/// assert_eq!(center_crop_window(221, 224), (0, 1, 221));
/// ```
pub fn center_crop_window(size: usize, crop: usize) -> (usize, usize, usize) {
    if crop > size {
        (0, (crop - size) / 2, size)
    } else {
        let d = size - crop;
        let half = d / 2;
        // d / 2 has a fraction of .5 when d is odd: round half to even.
        let top = if d % 2 == 1 && half % 2 == 1 {
            half + 1
        } else {
            half
        };
        (top, 0, crop)
    }
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
        // A misspelt key first: it is also why a required one is missing
        // (`"means"` for `"mean"`).
        if let Some(reason) = misspelt_key(text) {
            return Err(Error::Sidecar {
                path: path.to_path_buf(),
                reason,
            });
        }
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
        self.validate_resize()
    }

    fn validate_resize(&self) -> std::result::Result<(), String> {
        let Some(resize) = self.resize else {
            let mut extra = Vec::new();
            if self.interpolation.is_some() {
                extra.push("interpolation");
            }
            if self.antialias.is_some() {
                extra.push("antialias");
            }
            if self.crop.is_some() {
                extra.push("crop");
            }
            if !extra.is_empty() {
                return Err(format!("{} apply only with resize", extra.join(", ")));
            }
            return Ok(());
        };
        let ok = |v: usize| v > 0 && v <= 1 << 16;
        match resize {
            Resize::ShorterSide(s) if !ok(s) => {
                return Err(format!(
                    "resize must be a positive size up to 65536, got {s}"
                ))
            }
            Resize::Exact([h, w]) if !ok(h) || !ok(w) => {
                return Err(format!(
                    "resize must be two positive sizes up to 65536, got [{h}, {w}]"
                ))
            }
            _ => {}
        }
        let [h, w] = self.input_size;
        match (self.crop, resize) {
            (Some([ch, cw]), _) if [ch, cw] != self.input_size => Err(format!(
                "crop must equal input_size [{h}, {w}], got [{ch}, {cw}]"
            )),
            (None, Resize::ShorterSide(s)) => Err(format!(
                "resize {s} keeps the aspect ratio, so the size varies with the image: \
                 add \"crop\": [{h}, {w}] (the input_size)"
            )),
            (None, Resize::Exact([rh, rw])) if [rh, rw] != self.input_size => Err(format!(
                "resize [{rh}, {rw}] without crop must equal input_size [{h}, {w}]"
            )),
            _ => Ok(()),
        }
    }

    /// The resize filter: `interpolation`, bilinear when absent.
    pub fn interpolation(&self) -> Interpolation {
        self.interpolation.unwrap_or_default()
    }

    /// Whether downscaling is antialiased: `antialias`, `true` when absent.
    pub fn antialias(&self) -> bool {
        self.antialias.unwrap_or(true)
    }

    /// `[H, W]` as `i64`, for tensor shapes.
    pub fn size_i64(&self) -> [i64; 2] {
        [self.input_size[0] as i64, self.input_size[1] as i64]
    }
}

/// The image as the model saw it before normalisation: at the model's
/// input size, after any resize and crop (for overlays).
#[derive(Debug)]
pub enum InputImage {
    /// The crop's 8-bit values, `(H, W, C)` uint8, contiguous: what the
    /// torchvision recipe (a sidecar with `resize`) resizes and crops.
    /// Value `v` stands for `v × (1/255)` in float32, as
    /// [`InputImage::to_planes`] gives it.
    Bytes(Tensor),
    /// `(C, H, W)` float32 in `[0, 1]`, contiguous: the plain recipe
    /// resizes in float.
    Planes(Tensor),
}

impl InputImage {
    /// The image as `(C, H, W)` float32 planes in `[0, 1]`: the planes
    /// themselves, or the bytes times `1/255` in float32 (torchvision's
    /// `ToDtype(float32, scale=True)`), the values the model's input was
    /// normalised from.
    ///
    /// # Errors
    /// [`Error::Shape`] for bytes that are not `(H, W, C)` uint8 on the
    /// CPU; [`Error::Torch`] if a tensor operation fails.
    pub fn to_planes(&self) -> Result<Tensor> {
        match self {
            InputImage::Planes(t) => Ok(t.shallow_clone()),
            InputImage::Bytes(t) => {
                let (bytes, [h, w, c]) = crop_bytes(t)?;
                let image =
                    Tensor::f_empty([c as i64, h as i64, w as i64], (Kind::Float, Device::Cpu))?;
                // SAFETY: `image` is a new contiguous float32 CPU tensor of
                // c × h × w values that nothing else refers to yet.
                unsafe {
                    let planes =
                        std::slice::from_raw_parts_mut(image.data_ptr() as *mut f32, c * h * w);
                    planes_from_bytes(bytes, c, planes);
                }
                Ok(image)
            }
        }
    }
}

/// The bytes of a contiguous `(H, W, C)` uint8 CPU crop, and its
/// `[H, W, C]`.
fn crop_bytes(t: &Tensor) -> Result<(&[u8], [usize; 3])> {
    let size = t.size();
    if size.len() != 3
        || t.f_kind().ok() != Some(Kind::Uint8)
        || t.device() != Device::Cpu
        || !t.is_contiguous()
    {
        return Err(Error::shape(
            "an image's bytes",
            "a contiguous (H, W, C) uint8 CPU tensor",
            &size,
        ));
    }
    let dims = [size[0] as usize, size[1] as usize, size[2] as usize];
    let n = dims.iter().product::<usize>();
    if n == 0 {
        return Ok((&[], dims));
    }
    // SAFETY: `t` is a contiguous uint8 CPU tensor of n bytes (checked
    // above) that lives as long as the borrow of `t`.
    Ok((
        unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, n) },
        dims,
    ))
}

/// One image, ready for the model.
#[derive(Debug)]
pub struct Prepared {
    /// The model input `(C, H, W)`, float32, normalised: one image, so
    /// `input.unsqueeze(0)` is the `(1, C, H, W)` batch a model takes.
    pub input: Tensor,
    /// The resized (and cropped) image before normalisation (for overlays
    /// at the model's input size): the crop's bytes for the torchvision
    /// recipe, float planes for the plain one.
    pub image: InputImage,
    /// The decoded image's `(width, height)` before resizing.
    pub original_size: (u32, u32),
    /// The decoded image at full resolution as 8-bit RGB, kept when
    /// [`Preprocessor::keep_original`] is on (for overlays on the original,
    /// see [`crate::heatmap::overlay_original_png`]); `None` otherwise.
    pub original: Option<RgbImage>,
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
    keep_original: bool,
    jpeg_draft: bool,
    fast_jpeg: bool,
}

impl Preprocessor {
    /// A preprocessor with the default decode limits (16384 pixels per side,
    /// 512 MiB of decode buffers).
    pub fn new(sidecar: Sidecar) -> Self {
        Preprocessor {
            sidecar,
            max_dimension: 16384,
            max_alloc: 512 << 20,
            keep_original: false,
            jpeg_draft: false,
            fast_jpeg: false,
        }
    }

    /// Decodes JPEGs with zune-jpeg (through the `image` crate) instead of
    /// libjpeg-turbo's decoder. Off by default: libjpeg-turbo's pixels are
    /// the ones PIL and torchvision decode, bit for bit, while zune-jpeg
    /// upsamples the chroma of 4:2:0 and 4:2:2 JPEGs with other rounding
    /// (0.2–0.4 uint8 steps on average on the goldens, up to 4), and
    /// decodes a truncated JPEG, its missing part filled. zune-jpeg is
    /// faster where libjpeg-turbo was built without its SIMD code (no
    /// `nasm` at build time); see the module docs for measured figures.
    /// CMYK and YCCK JPEGs are decoded by libjpeg-turbo either way
    /// (zune-jpeg's were up to 9 steps off on a subsampled one).
    ///
    /// A program built with `panic = "abort"` always decodes with zune-jpeg
    /// (libjpeg's errors reach tch-vis as unwinding panics, which would
    /// abort it), and without [`Preprocessor::jpeg_draft`].
    pub fn fast_jpeg(mut self, on: bool) -> Self {
        self.fast_jpeg = on;
        self
    }

    /// Decodes JPEGs at 1/2, 1/4 or 1/8 of their size in the DCT domain
    /// (libjpeg's scaled decoding) as PIL's `draft("RGB", (w, h))` does for
    /// the size the resize makes, `(w, h)`: the torchvision resize's output
    /// size with `resize` keys, else `input_size`. PIL takes the largest
    /// scale 1/k with k ≤ min(W / w, H / h) (whole divisions), so the
    /// smaller image is still at least that size, and the pixels are PIL's
    /// draft pixels, bit for bit. Off by default: the inputs are then close
    /// to, not equal to, torchvision's (the DCT scaling is another low-pass filter
    /// than the antialiased resize; see the module docs for measured
    /// distances), and far cheaper to make from large photos (CMYK and YCCK
    /// ones too, as PIL's `draft` scales them). Other formats,
    /// JPEGs too small to scale, and a
    /// [`Preprocessor::keep_original`] preprocessor (whose original must be
    /// full size) decode as usual. With [`Preprocessor::fast_jpeg`] too,
    /// the scaled decoding is still libjpeg's (zune-jpeg has none).
    pub fn jpeg_draft(mut self, on: bool) -> Self {
        self.jpeg_draft = on;
        self
    }

    /// Sets the decode limits: the largest width or height, and the most
    /// bytes one buffer may take: the file read, the decoder's buffers, the
    /// image as 8-bit RGB, the float planes of a 16-bit or float image, and
    /// the resize of the torchvision pipeline. A file or image over them
    /// is an [`Error::Image`] (before decoding, where the size is known).
    pub fn limits(mut self, max_dimension: u32, max_alloc: u64) -> Self {
        self.max_dimension = max_dimension;
        self.max_alloc = max_alloc;
        self
    }

    /// Keeps the decoded image at full resolution in
    /// [`Prepared::original`] (off by default: it costs a copy of the
    /// decoded pixels for as long as the [`Prepared`] lives).
    pub fn keep_original(mut self, keep: bool) -> Self {
        self.keep_original = keep;
        self
    }

    /// The sidecar.
    pub fn sidecar(&self) -> &Sidecar {
        &self.sidecar
    }

    /// Where the model input (and so a map at the input size) lies on an
    /// original image of `(width, height)`: the whole image, or with
    /// `resize` and `crop` the window the centre crop kept, in the
    /// original's pixel units (for [`crate::heatmap::overlay_original`]).
    ///
    /// ```
    /// use tch_vis::preprocess::{Preprocessor, Sidecar};
    /// let s = Sidecar::from_json(
    ///     r#"{"input_size": [224, 224], "channels": 3, "mean": [0, 0, 0],
    ///         "std": [1, 1, 1], "resize": 256, "crop": [224, 224]}"#,
    ///     "m.json",
    /// ).unwrap();
    /// let r = Preprocessor::new(s).map_region((512, 256));
    /// // 512 x 256 -> 512 x 256 (no change), crop 224 from (144, 16).
    /// assert_eq!((r.x0, r.y0, r.x1, r.y1), (144.0, 16.0, 368.0, 240.0));
    /// ```
    pub fn map_region(&self, (width, height): (u32, u32)) -> MapRegion {
        let Some(resize) = self.sidecar.resize else {
            return MapRegion::whole(width, height);
        };
        let (w, h) = (width as usize, height as usize);
        let (nh, nw) = resize.output_size(h, w);
        let [ch, cw] = self.sidecar.input_size;
        let axis = |size: usize, new: usize, crop: usize| {
            let (src, dst, _) = center_crop_window(new, crop);
            let scale = size as f64 / new.max(1) as f64;
            let lo = (src as f64 - dst as f64) * scale;
            (lo, lo + crop as f64 * scale)
        };
        let (y0, y1) = axis(h, nh, ch);
        let (x0, x1) = axis(w, nw, cw);
        MapRegion { x0, y0, x1, y1 }
    }

    /// Reads and prepares an image file.
    ///
    /// # Errors
    /// [`Error::Image`] when the file cannot be read or decoded (unknown
    /// format, truncated data, over the limits); [`Error::Torch`] if a
    /// tensor operation fails.
    pub fn load(&self, path: impl AsRef<Path>) -> Result<Prepared> {
        self.load_to(path.as_ref(), InputTo::New)
    }

    /// As [`Preprocessor::load`], with the model input written into `dest`,
    /// a `(C, H, W)` float32 CPU tensor of the sidecar's size (for example a
    /// row of a batch, contiguous or in channels-last order), instead of a
    /// new tensor; the returned [`Prepared::input`] is `dest` itself. The
    /// same values as [`Preprocessor::load`], bit for bit, without a tensor
    /// per image to copy into the batch afterwards.
    ///
    /// # Errors
    /// As [`Preprocessor::load`]; [`Error::Shape`] when `dest` is not a
    /// float32 CPU tensor of the input's shape.
    pub fn load_into(&self, path: impl AsRef<Path>, dest: &Tensor) -> Result<Prepared> {
        let path = path.as_ref();
        let [h, w] = self.sidecar.size_i64();
        let want = [self.sidecar.channels as i64, h, w];
        if dest.size() != want
            || dest.f_kind().ok() != Some(Kind::Float)
            || dest.device() != Device::Cpu
        {
            return Err(Error::shape(
                "the destination of an input",
                format!("a float32 CPU tensor {want:?}"),
                &dest.size(),
            ));
        }
        self.load_to(path, InputTo::Into(dest))
    }

    /// Whether [`Preprocessor::load_bytes_into`] serves this sidecar: a
    /// torchvision recipe (`resize` key), whose input is a function of the
    /// crop's bytes, with one mean and std per channel.
    pub(crate) fn has_byte_inputs(&self) -> bool {
        self.sidecar.resize.is_some() && self.stats_per_channel()
    }

    /// Whether the sidecar has one mean and one std per channel (a sidecar
    /// built by hand is not validated: libtorch's normalisation reports
    /// the mismatch).
    fn stats_per_channel(&self) -> bool {
        let s = &self.sidecar;
        s.mean.len() == s.channels && s.std.len() == s.channels
    }

    /// For a torchvision recipe ([`Preprocessor::has_byte_inputs`]): as
    /// [`Preprocessor::load`], with the crop's 8-bit values written into
    /// `dest`, a contiguous `(H, W, C)` uint8 CPU tensor (a row of a pinned
    /// batch), instead of the normalised input, which
    /// [`ByteNormaliser`] computes from a batch of them on the device; the returned [`Prepared::input`] is `dest` itself.
    pub(crate) fn load_bytes_into(&self, path: &Path, dest: &Tensor) -> Result<Prepared> {
        let [h, w] = self.sidecar.size_i64();
        let want = [h, w, self.sidecar.channels as i64];
        if !self.has_byte_inputs()
            || dest.size() != want
            || dest.f_kind().ok() != Some(Kind::Uint8)
            || dest.device() != Device::Cpu
            || !dest.is_contiguous()
        {
            return Err(Error::shape(
                "the destination of an input's bytes",
                format!("a contiguous uint8 CPU tensor {want:?} (torchvision recipe)"),
                &dest.size(),
            ));
        }
        self.load_to(path, InputTo::Bytes(dest))
    }

    /// The normalisation of batches of crops from
    /// [`Preprocessor::load_bytes_into`] on `device`.
    ///
    /// # Errors
    /// [`Error::Torch`] when the constants cannot be put on the device.
    pub(crate) fn byte_normaliser(&self, device: Device) -> Result<ByteNormaliser> {
        let c = self.sidecar.channels as i64;
        let t = |v: &[f32]| -> Result<Tensor> {
            Ok(Tensor::f_from_slice(v)?
                .f_view([1, c, 1, 1])?
                .f_to_device(device)?)
        };
        Ok(ByteNormaliser {
            mean: t(&self.sidecar.mean)?,
            std: t(&self.sidecar.std)?,
        })
    }

    /// Reads, decodes and prepares the image file at `path`, with the input
    /// written as `to` says.
    fn load_to(&self, path: &Path, to: InputTo) -> Result<Prepared> {
        let bytes = self.read_file(path)?;
        let img = self.decode(&bytes, path)?;
        self.prepare_image_into(img, path, to)
    }

    /// The decoded image at `path` as 8-bit RGB: what
    /// [`Prepared::original`] holds, read again (for an original the batch
    /// engine did not keep, see [`Preprocessor::original_keep_max`]).
    pub(crate) fn load_original(&self, path: &Path) -> Result<RgbImage> {
        let bytes = self.read_file(path)?;
        Ok(rgb8(self.decode(&bytes, path)?))
    }

    /// The most bytes of a decoded original the batch engine keeps with its
    /// image until the image is written: an eighth of the allocation limit
    /// (64 MiB by default, a 4,600 × 4,600 photo). A batch of larger ones
    /// held at once took gigabytes (eight 12,000² JPEGs, 7 GB); theirs are
    /// decoded again by the writer that draws over them.
    pub(crate) fn original_keep_max(&self) -> usize {
        usize::try_from(self.max_alloc / 8).unwrap_or(usize::MAX)
    }

    /// The bytes of the file at `path`; a file larger than the allocation
    /// limit is an error, not read into memory.
    fn read_file(&self, path: &Path) -> Result<Vec<u8>> {
        use std::io::Read;
        let err = |reason: String| Error::Image {
            path: path.to_path_buf(),
            reason,
        };
        let mut file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
        let len = file.metadata().map_err(|e| err(e.to_string()))?.len();
        if len > self.max_alloc {
            return Err(err(format!(
                "the file is {len} bytes, more than the {} byte limit",
                self.max_alloc
            )));
        }
        // As `std::fs::read`: one byte more than the size, for the read
        // that finds the end.
        let mut bytes = Vec::with_capacity(len as usize + 1);
        file.read_to_end(&mut bytes)
            .map_err(|e| err(e.to_string()))?;
        Ok(bytes)
    }

    /// Prepares an encoded image held in memory; `path` names it in errors.
    ///
    /// # Errors
    /// As [`Preprocessor::load`].
    pub fn prepare_bytes(&self, bytes: &[u8], path: impl AsRef<Path>) -> Result<Prepared> {
        let path = path.as_ref();
        let img = self.decode(bytes, path)?;
        self.prepare_image(img, path)
    }

    /// Prepares a decoded image; `path` names it in errors.
    ///
    /// # Errors
    /// [`Error::Image`] when the torchvision resize would exceed the
    /// allocation limit; [`Error::Torch`] if a tensor operation fails.
    pub fn prepare_image(&self, img: DynamicImage, path: impl AsRef<Path>) -> Result<Prepared> {
        self.prepare_image_into(img, path.as_ref(), InputTo::New)
    }

    /// [`Preprocessor::prepare_image`], with the input written as `to`
    /// says (a destination checked by the caller).
    fn prepare_image_into(&self, img: DynamicImage, path: &Path, to: InputTo) -> Result<Prepared> {
        let original_size = (img.width(), img.height());
        let (image, original) = self.resize_image(img, path)?;
        let input = match to {
            InputTo::New => self.normalise_into(&image, None)?,
            InputTo::Into(dest) => self.normalise_into(&image, Some(dest))?,
            InputTo::Bytes(row) => {
                let InputImage::Bytes(hwc) = &image else {
                    return Err(Error::Internal {
                        what: "an input's bytes asked of a recipe without resize".into(),
                    });
                };
                row.shallow_clone().f_copy_(hwc)?;
                row.shallow_clone()
            }
        };
        Ok(Prepared {
            input,
            image,
            original_size,
            original,
        })
    }

    /// The resize stage of [`Preprocessor::prepare_image`]: the decoded
    /// image at the model's input size (what [`Prepared::image`] holds: the
    /// crop's bytes for the torchvision recipe, `(C, H, W)` float32 planes
    /// in `[0, 1]` for the plain one), and the decoded image as 8-bit RGB
    /// when [`Preprocessor::keep_original`] is on.
    ///
    /// # Errors
    /// As [`Preprocessor::prepare_image`].
    pub fn resize_image(
        &self,
        img: DynamicImage,
        path: impl AsRef<Path>,
    ) -> Result<(InputImage, Option<RgbImage>)> {
        if self.sidecar.resize.is_some() {
            let rgb = rgb8(img);
            let image = InputImage::Bytes(self.torchvision(&rgb, path.as_ref())?);
            return Ok((image, self.keep(rgb)));
        }
        let original_size = (img.width(), img.height());
        if let DynamicImage::ImageLuma8(_)
        | DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageRgb8(_)
        | DynamicImage::ImageRgba8(_) = img
        {
            // 8-bit images (nearly all): the same values as `to_planes`, with
            // the conversion done by libtorch's vectorised kernels on the
            // bytes, and no float copy of the whole image in Rust.
            let rgb = rgb8(img);
            let [th, tw] = self.sidecar.input_size;
            let c = self.sidecar.channels;
            let same = (rgb.height() as usize, rgb.width() as usize) == (th, tw);
            let image =
                Tensor::f_empty([c as i64, th as i64, tw as i64], (Kind::Float, Device::Cpu))?;
            let written = match (same, c) {
                // SAFETY: `image` is a new contiguous float32 CPU tensor of
                // c × th × tw values that nothing else refers to yet.
                (false, 1 | 3) => unsafe {
                    let out =
                        std::slice::from_raw_parts_mut(image.data_ptr() as *mut f32, c * th * tw);
                    bilinear_from_bytes(&rgb, c, th, tw, out)
                },
                _ => false,
            };
            let image = if written {
                image
            } else {
                self.resize_tensor(self.planes_8bit(&rgb)?)?
            };
            return Ok((InputImage::Planes(image), self.keep(rgb)));
        }
        // 16-bit and float images: float planes of the whole image (the
        // one copy of it, within the limit), then the resize.
        let c = self.sidecar.channels;
        let (w, h) = (original_size.0 as usize, original_size.1 as usize);
        let need = (c * h * w * 4) as u64;
        if need > self.max_alloc {
            return Err(Error::Image {
                path: path.as_ref().to_path_buf(),
                reason: format!(
                    "a {w}x{h} image of {:?} needs {need} bytes as float planes, more than the {} byte limit",
                    img.color(),
                    self.max_alloc
                ),
            });
        }
        let x = Tensor::f_empty(
            [1, c as i64, h as i64, w as i64],
            (Kind::Float, Device::Cpu),
        )?;
        // SAFETY: `x` is a new contiguous float32 CPU tensor of c × h × w
        // values that nothing else refers to yet.
        fill_planes(&img, c, unsafe {
            std::slice::from_raw_parts_mut(x.data_ptr() as *mut f32, c * h * w)
        });
        Ok((
            InputImage::Planes(self.resize_tensor(x)?),
            self.keep_original.then(|| rgb8(img)),
        ))
    }

    /// The decoded image when [`Preprocessor::keep_original`] is on; else
    /// its pixels' buffer goes back to the thread, for the next image to
    /// be decoded into.
    fn keep(&self, rgb: RgbImage) -> Option<RgbImage> {
        if self.keep_original {
            return Some(rgb);
        }
        let raw = rgb.into_raw();
        SPARE_PIXELS.with_borrow_mut(|spare| {
            if raw.capacity() > spare.capacity() && raw.capacity() <= SPARE_MAX {
                *spare = raw;
            }
        });
        None
    }

    /// `(1, C, H, W)` float `[0, 1]` planes of 8-bit RGB: `v / 255` in
    /// float32, and for one channel the luma of those, as [`to_planes`].
    fn planes_8bit(&self, rgb: &RgbImage) -> Result<Tensor> {
        let (w, h) = (i64::from(rgb.width()), i64::from(rgb.height()));
        if self.sidecar.channels == 1 {
            let luma: Vec<f32> = rgb
                .as_raw()
                .chunks_exact(3)
                .map(|p| {
                    let [r, g, b] = [p[0], p[1], p[2]].map(|v| f32::from(v) / 255.0);
                    0.299f32 * r + 0.587f32 * g + 0.114f32 * b
                })
                .collect();
            return Ok(Tensor::f_from_slice(&luma)?.f_view([1, 1, h, w])?);
        }
        // Bytes to float in one pass, in the bytes' own (H, W, C) order:
        // `x / 255` is IEEE division in float32, as in Rust. The result is
        // `(1, 3, H, W)` with channels-last strides, which libtorch's
        // bilinear resize takes as it is (the same values as from planar
        // input; tested bit for bit).
        Ok(Tensor::f_from_slice(rgb.as_raw())?
            .f_view([1, h, w, 3])?
            .f_div_scalar(255.0)?
            .f_permute([0, 3, 1, 2])?)
    }

    /// The plain bilinear resize of `(1, C, H, W)` planes to `input_size`,
    /// when the size differs; returns `(C, H, W)`.
    fn resize_tensor(&self, x: Tensor) -> Result<Tensor> {
        let c = self.sidecar.channels as i64;
        let size = x.size();
        let [th, tw] = self.sidecar.size_i64();
        let x = if (size[2], size[3]) == (th, tw) {
            x
        } else {
            x.f_upsample_bilinear2d([th, tw], false, None, None)?
        };
        // Planar at the (small) input size, whatever the input's layout.
        Ok(x.f_contiguous()?.f_view([c, th, tw])?)
    }

    /// The normalisation stage: `(image - mean) / std` per channel of a
    /// `(C, H, W)` image in `[0, 1]`.
    ///
    /// # Errors
    /// [`Error::Torch`] when the image does not have the sidecar's channels.
    pub fn normalise(&self, image: &Tensor) -> Result<Tensor> {
        let c = self.sidecar.channels as i64;
        let mean = Tensor::f_from_slice(&self.sidecar.mean)?.f_view([c, 1, 1])?;
        let std = Tensor::f_from_slice(&self.sidecar.std)?.f_view([c, 1, 1])?;
        Ok(image.f_sub(&mean)?.f_div(&std)?)
    }

    /// The normalisation stage of an image from [`Preprocessor::resize_image`]
    /// (or [`Prepared::image`]): the model input `(C, H, W)`, float32, the
    /// same bits as [`Preprocessor::normalise`] of its
    /// [`InputImage::to_planes`], for bytes in one pass over them.
    ///
    /// # Errors
    /// As [`Preprocessor::normalise`]; [`Error::Shape`] for bytes that are
    /// not `(H, W, C)` uint8 on the CPU.
    pub fn normalise_image(&self, image: &InputImage) -> Result<Tensor> {
        self.normalise_into(image, None)
    }

    /// [`Preprocessor::normalise`] of an image, into `dest` when given (a
    /// float32 CPU tensor of the image's `(C, H, W)` shape, checked by
    /// `load_into`), else into a new tensor. A crop's bytes are normalised
    /// in one pass by [`normalise_bytes`] (the same IEEE operations on the
    /// same `[0, 1]` values as for planes),
    /// when the destination is contiguous or a channels-last row; planes as
    /// [`Preprocessor::normalise_planes_into`] says.
    fn normalise_into(&self, image: &InputImage, dest: Option<&Tensor>) -> Result<Tensor> {
        let InputImage::Bytes(t) = image else {
            return self.normalise_planes_into(&image.to_planes()?, dest);
        };
        let (bytes, [h, w, c]) = crop_bytes(t)?;
        if self.stats_per_channel() && c == self.sidecar.channels {
            let out = match dest {
                Some(d) => d.shallow_clone(),
                None => {
                    Tensor::f_empty([c as i64, h as i64, w as i64], (Kind::Float, Device::Cpu))?
                }
            };
            if let Some(order) = Order::of(&out, c, h * w) {
                // SAFETY: `out` is a float32 CPU tensor of c × h × w values
                // laid out as `order` says (a new one, or a destination of
                // the image's shape), which nothing else reads or writes
                // while this thread fills it, and which does not overlap
                // the crop's bytes.
                unsafe {
                    let o = std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, c * h * w);
                    normalise_bytes(bytes, c, order, o, &self.sidecar);
                }
                return Ok(out);
            }
        }
        self.normalise_planes_into(&image.to_planes()?, dest)
    }

    /// [`Preprocessor::normalise`] of `(C, H, W)` planes, into `dest` when
    /// given, else into a new tensor: in one pass over the planes by
    /// [`normalise_planes`] (the same IEEE operations as libtorch's) when
    /// the destination is contiguous or a channels-last row, else by
    /// libtorch and a copy. (In place on a channels-last row, libtorch's
    /// subtraction and division broadcast over the innermost three values:
    /// slower than two passes over contiguous planes and a copy.)
    fn normalise_planes_into(&self, image: &Tensor, dest: Option<&Tensor>) -> Result<Tensor> {
        let c = self.sidecar.channels;
        let n = image.numel() / c.max(1);
        let planar = self.stats_per_channel()
            && image.f_kind().ok() == Some(Kind::Float)
            && image.device() == Device::Cpu
            && image.is_contiguous()
            && image.size().len() == 3;
        if planar {
            let out = match dest {
                Some(d) => d.shallow_clone(),
                None => Tensor::f_empty(image.size().as_slice(), (Kind::Float, Device::Cpu))?,
            };
            if let Some(order) = Order::of(&out, c, n) {
                // SAFETY: `image` is a contiguous float32 CPU tensor of
                // c × n values and `out` a float32 CPU tensor of c × n values
                // laid out as `order` says (a new one, or a destination of
                // the image's shape), which nothing else reads or writes
                // while this thread fills it; the two do not overlap (a new
                // image, and a new tensor or a row).
                unsafe {
                    let planes = std::slice::from_raw_parts(image.data_ptr() as *const f32, c * n);
                    let o = std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, c * n);
                    normalise_planes(planes, c, order, o, &self.sidecar);
                }
                return Ok(out);
            }
        }
        let input = self.normalise(image)?;
        let Some(dest) = dest else {
            return Ok(input);
        };
        let mut d = dest.shallow_clone();
        d.f_copy_(&input)?;
        Ok(d)
    }

    /// Prepares planar `[0, 1]` pixels `(C, height, width)` (C = the
    /// sidecar's channels) of an already decoded image, with the plain
    /// bilinear resize to `input_size` (the sidecar's `resize` keys do not
    /// apply here: they work on 8-bit pixels).
    ///
    /// # Errors
    /// [`Error::Shape`] when `pixels` has the wrong length; [`Error::Torch`]
    /// if a tensor operation fails.
    pub fn prepare_planes(&self, pixels: Vec<f32>, original_size: (u32, u32)) -> Result<Prepared> {
        let image = self.resize_planes(pixels, original_size)?;
        let input = self.normalise(&image)?;
        Ok(Prepared {
            input,
            image: InputImage::Planes(image),
            original_size,
            original: None,
        })
    }

    fn resize_planes(&self, pixels: Vec<f32>, (width, height): (u32, u32)) -> Result<Tensor> {
        let c = self.sidecar.channels as i64;
        let (w, h) = (i64::from(width), i64::from(height));
        if pixels.len() as i64 != c * h * w {
            return Err(Error::shape(
                "image pixels",
                format!("{c} x {h} x {w} values"),
                &[pixels.len() as i64],
            ));
        }
        self.resize_tensor(Tensor::f_from_slice(&pixels)?.f_view([1, c, h, w])?)
    }

    /// The torchvision pipeline on 8-bit RGB up to the crop: its bytes,
    /// `(H, W, C)` uint8, contiguous.
    fn torchvision(&self, rgb: &RgbImage, path: &Path) -> Result<Tensor> {
        let s = &self.sidecar;
        let Some(resize) = s.resize else {
            return Err(Error::InvalidValue {
                what: "sidecar",
                value: "no resize key".into(),
            });
        };
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let c = s.channels;
        let (nh, nw) = resize.output_size(h, w);
        if (nh as u64) * (nw as u64) * (c as u64) > self.max_alloc {
            return Err(Error::Image {
                path: path.to_path_buf(),
                reason: format!(
                    "resizing {w}x{h} to {nw}x{nh} needs more than the {} byte limit",
                    self.max_alloc
                ),
            });
        }
        let raw = rgb.as_raw();
        if raw.len() != h * w * 3 {
            return Err(Error::Image {
                path: path.to_path_buf(),
                reason: format!("{} bytes for a {w}x{h} RGB image", raw.len()),
            });
        }
        let [th, tw] = s.input_size;
        if c == 3 && s.antialias() && (nh, nw) != (h, w) && th <= nh && tw <= nw {
            // The crop's pixels of the resize and nothing else, straight
            // into the result (the same bytes as libtorch's kernels below).
            let (top, _, _) = center_crop_window(nh, th);
            let (left, _, _) = center_crop_window(nw, tw);
            let out = Tensor::f_empty([th as i64, tw as i64, 3], (Kind::Uint8, Device::Cpu))?;
            // SAFETY: `out` is a new contiguous uint8 tensor of th × tw × 3
            // bytes, not shared with anything until it is returned.
            let bytes =
                unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut u8, th * tw * 3) };
            let done = crate::aa_resize::resize_window(
                raw,
                (h, w, 3),
                (nh, nw),
                (top..top + th, left..left + tw),
                s.interpolation(),
                bytes,
            );
            if done {
                return Ok(out);
            }
        }
        // (1, 3, H, W) over the interleaved bytes, without a copy
        // (channels-last strides, as `pil_to_tensor` makes; libtorch's
        // kernels give the same values for either layout).
        // SAFETY: `raw` holds exactly h × w × 3 bytes (checked above) and
        // outlives `x` and every view of it: all of them are dropped before
        // this function returns, whose results are new buffers.
        let x = unsafe {
            Tensor::f_from_blob(
                raw.as_ptr(),
                &[1, h as i64, w as i64, 3],
                &[(h * w * 3) as i64, (w * 3) as i64, 3, 1],
                Kind::Uint8,
                Device::Cpu,
            )?
        }
        .f_permute([0, 3, 1, 2])?;
        let x = if c == 1 { grayscale_u8(&x)? } else { x };
        let x = if (nh, nw) == (h, w) {
            x
        } else {
            resize_u8(&x, [nh as i64, nw as i64], s.interpolation(), s.antialias())?
        };
        let x = center_crop(&x, s.input_size)?;
        // The crop's bytes in (H, W, C) order, in memory of their own: with
        // no resize, and a crop that keeps whole rows, `contiguous` returns
        // a view of `raw`, which the caller may free.
        let hwc = x.f_permute([0, 2, 3, 1])?.f_contiguous()?;
        drop(x);
        let at = hwc.data_ptr() as usize;
        let raw_at = raw.as_ptr() as usize;
        let hwc = if (raw_at..raw_at + raw.len()).contains(&at) {
            hwc.f_detach_copy()?
        } else {
            hwc
        };
        if hwc.numel() != th * tw * c || hwc.f_kind().ok() != Some(Kind::Uint8) {
            return Err(Error::Internal {
                what: format!(
                    "the crop has {} values, expected {}",
                    hwc.numel(),
                    th * tw * c
                ),
            });
        }
        Ok(hwc.f_view([th as i64, tw as i64, c as i64])?)
    }

    /// Decodes an encoded image (format guessed from the bytes) within the
    /// limits.
    ///
    /// A decoder that panics on a file (a bug of the decoder's, on crafted
    /// or corrupt data) fails that file with an [`Error::Image`] as well:
    /// in a folder run it is recorded as failed and the run goes on, so one
    /// such file cannot end every run over its folder.
    ///
    /// # Errors
    /// [`Error::Image`] for an empty file, an unknown format, corrupt data,
    /// an image over the limits, or a decoder that panicked.
    pub fn decode(&self, bytes: &[u8], path: impl AsRef<Path>) -> Result<DynamicImage> {
        let path = path.as_ref();
        // Nothing the closure touches is left half-made by a panic: at
        // worst the thread's spare pixel buffer is dropped.
        let img = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.decode_unguarded(bytes, path).map_err(|e| match e {
                Error::Image { path, reason } => Error::Image {
                    path,
                    reason: plain_reason(reason),
                },
                e => e,
            })
        }))
        .unwrap_or_else(|payload| {
            Err(Error::Image {
                path: path.to_path_buf(),
                reason: format!(
                    "the decoder failed: {}",
                    crate::error::message_line(panic_message(payload.as_ref()))
                ),
            })
        })?;
        // (Checked before decoding where the decoder tells the size first.)
        self.check_rgb_size(img.width() as usize, img.height() as usize)
            .map_err(|reason| Error::Image {
                path: path.to_path_buf(),
                reason,
            })?;
        Ok(img)
    }

    /// A `w` × `h` image within the limits, before it is decoded: its
    /// sides ([`Preprocessor::check_sides`]) and its 8-bit RGB copy
    /// ([`Preprocessor::check_rgb_size`]).
    pub(crate) fn check_size(&self, w: usize, h: usize) -> std::result::Result<(), String> {
        self.check_sides(w, h)?;
        self.check_rgb_size(w, h)
    }

    /// The largest width or height.
    fn check_sides(&self, w: usize, h: usize) -> std::result::Result<(), String> {
        if w.max(h) > self.max_dimension as usize {
            return Err(format!(
                "a {w}x{h} image is larger than the limit of {} pixels per side",
                self.max_dimension
            ));
        }
        Ok(())
    }

    /// The allocation limit, in bytes.
    pub(crate) fn max_alloc(&self) -> u64 {
        self.max_alloc
    }

    /// A JPEG stream inside another format (a JPEG-compressed TIFF's strip
    /// or tile) by libjpeg, as [`Preprocessor::decode`] decodes a JPEG
    /// file; `None` with [`Preprocessor::fast_jpeg`] (zune-jpeg's path
    /// then takes the whole file), or where libjpeg cannot run (a program
    /// built with `panic = "abort"`: its errors unwind).
    pub(crate) fn decode_jpeg_chunk(
        &self,
        bytes: &[u8],
    ) -> std::result::Result<Option<DynamicImage>, String> {
        if cfg!(panic = "unwind") {
            self.decode_libjpeg(bytes, false)
        } else {
            Ok(None)
        }
    }

    /// Every image is taken as 8-bit RGB on its way (grey, palette and
    /// alpha images too, at three bytes a pixel): that copy within the
    /// allocation limit.
    fn check_rgb_size(&self, w: usize, h: usize) -> std::result::Result<(), String> {
        let need = (w as u64) * (h as u64) * 3;
        if need > self.max_alloc {
            return Err(format!(
                "a {w}x{h} image needs {need} bytes as 8-bit RGB, more than the {} byte limit",
                self.max_alloc
            ));
        }
        Ok(())
    }

    /// [`Preprocessor::decode`] without its guard against a decoder's panic.
    fn decode_unguarded(&self, bytes: &[u8], path: &Path) -> Result<DynamicImage> {
        #[cfg(test)]
        if bytes.starts_with(tests::DECODER_PANIC) {
            panic!("a decoder's bug\nsecond line");
        }
        let err = |reason: String| Error::Image {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.is_empty() {
            return Err(err("empty file".into()));
        }
        let draft = self.jpeg_draft && !self.keep_original;
        // libjpeg's errors unwind (see `decode_libjpeg`): not where a panic
        // aborts. (CMYK and YCCK JPEGs by libjpeg with `fast_jpeg` too:
        // zune-jpeg's chroma upsampling is further off on them.)
        if cfg!(panic = "unwind")
            && bytes.starts_with(&[0xFF, 0xD8, 0xFF])
            && (draft || !self.fast_jpeg || frame(bytes).is_some_and(|f| f.components == 4))
        {
            if let Some(img) = self.decode_libjpeg(bytes, draft).map_err(err)? {
                return Ok(img);
            }
        }
        let mut reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| err(e.to_string()))?;
        let format = reader.format();
        match format {
            None => return Err(err("not a recognised image format".into())),
            Some(image::ImageFormat::Tiff) => {
                if let Some(img) = crate::layouts::tiff(self, bytes).map_err(err)? {
                    return Ok(img);
                }
            }
            Some(_) => {}
        }
        let mut limits = Limits::default();
        limits.max_image_width = Some(self.max_dimension);
        limits.max_image_height = Some(self.max_dimension);
        limits.max_alloc = Some(self.max_alloc);
        reader.limits(limits.clone());
        // `ImageReader::decode`, step by step: its limits (the pixels'
        // bytes reserved, the rest left to the decoder), then 8-bit RGB
        // (JPEG photos, most PNGs) into the thread's spare buffer instead
        // of a new zeroed one.
        let mut decoder = reader.into_decoder().map_err(|e| err(e.to_string()))?;
        let (w, h) = decoder.dimensions();
        self.check_rgb_size(w as usize, h as usize).map_err(err)?;
        limits
            .reserve(decoder.total_bytes())
            .map_err(|e| err(e.to_string()))?;
        decoder.set_limits(limits).map_err(|e| err(e.to_string()))?;
        let mut img = if decoder.color_type() == ColorType::Rgb8 {
            let (w, h) = decoder.dimensions();
            // Within the allocation limit (reserved above), so it fits.
            let n = decoder.total_bytes() as usize;
            let mut buf = spare_pixels(n);
            decoder
                .read_image(&mut buf)
                .map_err(|e| err(e.to_string()))?;
            let rgb = RgbImage::from_raw(w, h, buf)
                .ok_or_else(|| err(format!("{n} bytes for a {w}x{h} RGB image")))?;
            DynamicImage::ImageRgb8(rgb)
        } else {
            DynamicImage::from_decoder(decoder).map_err(|e| err(e.to_string()))?
        };
        if img.width() == 0 || img.height() == 0 {
            return Err(err("image has no pixels".into()));
        }
        if format == Some(image::ImageFormat::Bmp) {
            crate::layouts::bmp_16bit_as_pil(bytes, &mut img);
        }
        Ok(img)
    }
}

impl Preprocessor {
    /// A JPEG decoded by libjpeg-turbo's decoder (mozjpeg's copy of it),
    /// with its defaults, as PIL and torchvision decode it: the islow
    /// IDCT, fancy chroma upsampling, its YCbCr conversion; CMYK and YCCK
    /// JPEGs to CMYK by libjpeg, then to RGB as PIL converts them
    /// ([`cmyk_to_rgb`]). A file that ends before its image does is an error, as in
    /// PIL and torchvision (libjpeg itself would fill the rest with grey);
    /// other corrupt data is libjpeg's fatal error, or decoded as libjpeg
    /// decodes it.
    ///
    /// With `draft`, at the scale [`Preprocessor::jpeg_draft`] picks, by
    /// libjpeg's scaled IDCT, as PIL's `draft` decodes at that scale; where
    /// no scale fits, as without.
    fn decode_libjpeg(
        &self,
        bytes: &[u8],
        draft: bool,
    ) -> std::result::Result<Option<DynamicImage>, String> {
        use mozjpeg::{ColorSpace, Decompress, NO_MARKERS};
        let mut source = WatchedBytes { bytes, eof: false };
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut jpeg = Decompress::with_markers(NO_MARKERS)
                .from_reader(&mut source)
                .map_err(|e| e.to_string())?;
            let (w, h) = jpeg.size();
            self.check_sides(w, h)?;
            let (gray, cmyk) = match jpeg.color_space() {
                ColorSpace::JCS_GRAYSCALE => (true, false),
                ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => (false, true),
                _ => (false, false),
            };
            let k = if draft { self.draft_scale(w, h) } else { 1 };
            if k == 1 && self.fast_jpeg && !cmyk {
                // A draft asked for, but no scale fits: zune-jpeg decodes.
                return Ok(None);
            }
            let (w, h) = (w.div_ceil(k), h.div_ceil(k));
            self.check_rgb_size(w, h)?;
            let n = w * h * if gray { 1 } else { 3 };
            // A progressive JPEG keeps every DCT coefficient until its last
            // scan: 64 of 2 bytes per block of each component.
            let coefficients: u64 = if frame(bytes).is_some_and(|f| f.progressive) {
                jpeg.components()
                    .iter()
                    .map(|c| u64::from(c.width_in_blocks) * u64::from(c.height_in_blocks) * 128)
                    .sum()
            } else {
                0
            };
            let need = n as u64 + coefficients;
            if need > self.max_alloc {
                return Err(format!(
                    "a {w}x{h} image needs {need} bytes to decode, more than the limit of {}",
                    self.max_alloc
                ));
            }
            if k > 1 {
                jpeg.scale((8 / k) as u8);
            }
            let mut started = if gray {
                jpeg.grayscale()
            } else if cmyk {
                // (libjpeg converts YCCK to CMYK.)
                jpeg.to_colorspace(ColorSpace::JCS_CMYK)
            } else {
                jpeg.rgb()
            }
            .map_err(|e| e.to_string())?;
            if (started.width(), started.height()) != (w, h) {
                return Err(format!(
                    "libjpeg decodes {}x{} at 1/{k}, not {w}x{h}",
                    started.width(),
                    started.height()
                ));
            }
            let buf = if cmyk {
                // A row of CMYK at a time, converted into the RGB rows.
                let mut buf = spare_pixels(n);
                let mut row = vec![0u8; 4 * w];
                for rgb in buf.chunks_exact_mut(3 * w) {
                    let got = started
                        .read_scanlines_into(&mut row)
                        .map_err(|e| e.to_string())?
                        .len();
                    if got != row.len() {
                        return Err(format!(
                            "libjpeg decoded {got} of a row's {} bytes",
                            row.len()
                        ));
                    }
                    cmyk_to_rgb(&row, rgb);
                }
                buf
            } else {
                // Into the spare buffer's capacity, not zeroed first
                // (libjpeg writes every byte, or fails).
                let mut buf = spare_capacity(n);
                let got = started
                    .read_scanlines_into_uninit(&mut buf.spare_capacity_mut()[..n])
                    .map_err(|e| e.to_string())?
                    .len();
                if got != n {
                    return Err(format!("libjpeg decoded {got} of the image's {n} bytes"));
                }
                // SAFETY: the call above initialised the first `got == n`
                // bytes of the capacity (it returns them as initialised).
                unsafe { buf.set_len(n) };
                buf
            };
            started.finish().map_err(|e| e.to_string())?;
            let (w, h) = (w as u32, h as u32);
            let img = if gray {
                image::GrayImage::from_raw(w, h, buf).map(DynamicImage::ImageLuma8)
            } else {
                RgbImage::from_raw(w, h, buf).map(DynamicImage::ImageRgb8)
            };
            img.map(Some)
                .ok_or_else(|| format!("{n} bytes for a {w}x{h} image"))
        }));
        let decoded = decoded.unwrap_or_else(|payload| {
            let what = panic_message(payload.as_ref());
            Err(crate::error::message_line(
                what.strip_prefix("libjpeg fatal error: ").unwrap_or(what),
            )
            .to_string())
        });
        if source.eof {
            if self.fast_jpeg {
                // As zune-jpeg, which decodes the rest of `fast_jpeg`'s
                // JPEGs, takes it: from the start.
                return Ok(None);
            }
            return Err("the file ends before its image does (a truncated JPEG)".into());
        }
        match decoded {
            Ok(Some(img)) if img.width() == 0 || img.height() == 0 => {
                Err("image has no pixels".into())
            }
            other => other,
        }
    }

    /// The scale 1/k of [`Preprocessor::jpeg_draft`] for a `w` × `h` JPEG,
    /// as PIL's `draft` picks it for the size the resize makes (the
    /// torchvision resize's output size with `resize` keys, else
    /// `input_size`): the largest k of 8, 4, 2 and 1 not above
    /// `min(w / tw, h / th)`, in whole divisions.
    fn draft_scale(&self, w: usize, h: usize) -> usize {
        let (th, tw) = match self.sidecar.resize {
            Some(r) => r.output_size(h, w),
            None => (self.sidecar.input_size[0], self.sidecar.input_size[1]),
        };
        let most = (w / tw.max(1)).min(h / th.max(1));
        [8, 4, 2].into_iter().find(|&k| k <= most).unwrap_or(1)
    }
}

/// The message a panic carries (`panic!`'s text, or a `String` payload as
/// `resume_unwind` passes libjpeg's), or "no message".
/// A decoder's message in plain words where it is not: the PNG decoder's
/// chunk types by name (it prints their Rust structure), a file cut short
/// said so (the reader's "failed to fill whole buffer"), a bare "Decode
/// Error" as corrupt data.
fn plain_reason(mut reason: String) -> String {
    const CHUNK: &str = "ChunkType { type: ";
    while let Some(at) = reason.find(CHUNK) {
        let rest = &reason[at + CHUNK.len()..];
        let Some(end) = rest.find(" }") else { break };
        let name = rest[..end].split(',').next().unwrap_or_default();
        reason = format!("{}{name}{}", &reason[..at], &rest[end + 2..]);
    }
    const EOF: &str = "failed to fill whole buffer";
    if reason.ends_with(EOF) {
        reason = format!(
            "{}the file ends before its image does (truncated data)",
            &reason[..reason.len() - EOF.len()]
        );
    }
    if reason.ends_with("Decode Error") {
        reason = format!("{}corrupt data", &reason[..reason.len() - 12]);
    }
    reason
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

/// What a JPEG's frame header (its SOF marker) says: whether the frame is
/// progressive (SOF2, or SOF10 arithmetic), how many components it has, and
/// the first three's ids and sampling factors (`0x11` for none).
struct Frame {
    progressive: bool,
    components: u8,
    specs: [(u8, u8); 3],
}

/// Whether a JPEG holds RGB as it is: three components named `R`, `G`, `B`
/// (which libjpeg decodes without a colour transform), none subsampled.
/// What libtiff decodes alike with its colour handling off, as it does for
/// JPEG-compressed RGB TIFFs.
pub(crate) fn jpeg_is_plain_rgb(bytes: &[u8]) -> bool {
    frame(bytes)
        .is_some_and(|f| f.components == 3 && f.specs == [(b'R', 0x11), (b'G', 0x11), (b'B', 0x11)])
}

/// A JPEG's [`Frame`], the markers before it walked by their lengths;
/// `None` where the walk fails (libjpeg then judges the file).
fn frame(bytes: &[u8]) -> Option<Frame> {
    let mut at = 2;
    while at + 4 <= bytes.len() {
        if bytes[at] != 0xFF {
            return None;
        }
        match bytes[at + 1] {
            // Length, precision, height and width, then the count.
            m @ (0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF) => {
                let components = *bytes.get(at + 9)?;
                // Then per component: its id, sampling factors, table.
                let spec = |k: usize| -> (u8, u8) {
                    let at = at + 10 + 3 * k;
                    match (bytes.get(at), bytes.get(at + 1)) {
                        (Some(&id), Some(&sampling)) if k < usize::from(components) => {
                            (id, sampling)
                        }
                        _ => (0, 0),
                    }
                };
                return Some(Frame {
                    progressive: matches!(m, 0xC2 | 0xCA),
                    components,
                    specs: [spec(0), spec(1), spec(2)],
                });
            }
            0xDA => return None,
            // Fill bytes before a marker.
            0xFF => at += 1,
            _ => at += 2 + usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]])),
        }
    }
    None
}

/// The bytes of a file as libjpeg reads them, noting whether it asked for
/// more than there is: libjpeg's sign of a truncated file (it then makes
/// up an end marker and warns).
struct WatchedBytes<'a> {
    bytes: &'a [u8],
    eof: bool,
}

impl std::io::Read for WatchedBytes<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = std::io::Read::read(&mut self.bytes, out)?;
        self.eof |= n == 0 && !out.is_empty();
        Ok(n)
    }
}

impl std::io::BufRead for WatchedBytes<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.eof |= self.bytes.is_empty();
        Ok(self.bytes)
    }

    fn consume(&mut self, n: usize) {
        self.bytes = &self.bytes[n.min(self.bytes.len())..];
    }
}

/// One row of CMYK pixels as libjpeg decodes CMYK and YCCK JPEGs, in
/// Adobe's polarity (0 is full ink: PIL reads them as `"CMYK;I"`, always),
/// to RGB as PIL's `convert("RGB")` makes it: with `k` the black byte as
/// decoded (PIL's `255 - K`) and `ink` a channel's complement (PIL's C, M
/// or Y), `k - (ink × k / 255)`, the division in PIL's fixed-point
/// rounding (`t = ink × k + 128`, `((t >> 8) + t) >> 8`). torchvision's
/// `decode_jpeg` gives the same bytes (the CMYK and YCCK goldens hold
/// both).
pub(crate) fn cmyk_to_rgb(cmyk: &[u8], rgb: &mut [u8]) {
    for (out, px) in rgb.chunks_exact_mut(3).zip(cmyk.chunks_exact(4)) {
        let k = u32::from(px[3]);
        for (o, &v) in out.iter_mut().zip(&px[..3]) {
            let t = (255 - u32::from(v)) * k + 128;
            // (At most k: the rounded product of k and ink / 255 <= 1.)
            *o = k.saturating_sub(((t >> 8) + t) >> 8) as u8;
        }
    }
}

thread_local! {
    /// A decoded image's pixels, handed back once the image is resized:
    /// the next 8-bit RGB image of the thread is decoded into them (no
    /// new, zeroed buffer per image).
    static SPARE_PIXELS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The thread's spare pixel buffer, `n` bytes long: bytes a previous image
/// wrote (kept, to be overwritten by the decoder), or zeroed where the
/// buffer grows.
fn spare_pixels(n: usize) -> Vec<u8> {
    let mut buf = SPARE_PIXELS.with_borrow_mut(std::mem::take);
    if buf.len() >= n {
        buf.truncate(n);
    } else {
        buf.resize(n, 0);
    }
    buf
}

/// The thread's spare pixel buffer, emptied, with room for `n` bytes: for a
/// decoder that writes into uninitialised memory (no zeroing).
fn spare_capacity(n: usize) -> Vec<u8> {
    let mut buf = SPARE_PIXELS.with_borrow_mut(std::mem::take);
    buf.clear();
    buf.reserve(n);
    buf
}

/// The largest buffer a thread keeps for its next image (a 4K photo's
/// 25 MB fits): a run's memory does not stay at its largest image's size
/// times the decode threads.
const SPARE_MAX: usize = 32 << 20;

/// `img.into_rgb8()` with the same bytes, for the 8-bit layouts by a plain
/// loop (gray repeated, alpha dropped): the `image` crate converts them
/// through float colour transforms, ~0.45 ms for a 400 × 400 PNG.
fn rgb8(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let bytes: Vec<u8> = match &img {
        DynamicImage::ImageRgb8(_) => return img.into_rgb8(),
        DynamicImage::ImageLuma8(g) => g.as_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA8(g) => g
            .as_raw()
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        DynamicImage::ImageRgba8(c) => c
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        _ => return img.into_rgb8(),
    };
    RgbImage::from_raw(w, h, bytes).unwrap_or_else(|| img.into_rgb8())
}

/// torchvision's `Grayscale` on a uint8 `(1, 3, H, W)` tensor:
/// `0.2989 R + 0.587 G + 0.114 B` in float32, truncated back to uint8 (as
/// torchvision does: no rounding).
fn grayscale_u8(x: &Tensor) -> Result<Tensor> {
    let r = x.f_select(1, 0)?;
    let g = x.f_select(1, 1)?;
    let b = x.f_select(1, 2)?;
    let l = r
        .f_mul_scalar(0.2989)?
        .f_add(&g.f_mul_scalar(0.587)?)?
        .f_add(&b.f_mul_scalar(0.114)?)?;
    Ok(l.f_to_kind(Kind::Uint8)?.f_unsqueeze(1)?)
}

/// The model inputs of a batch of crops from
/// [`Preprocessor::load_bytes_into`], computed where the crops are (on the
/// GPU, for a CUDA model): [`Preprocessor::byte_normaliser`].
pub(crate) struct ByteNormaliser {
    /// `(1, C, 1, 1)` float32 on the device.
    mean: Tensor,
    std: Tensor,
}

impl ByteNormaliser {
    /// The same normaliser, sharing its constants.
    pub(crate) fn shallow_clone(&self) -> ByteNormaliser {
        ByteNormaliser {
            mean: self.mean.shallow_clone(),
            std: self.std.shallow_clone(),
        }
    }

    /// `(N, H, W, C)` uint8 crops to `(N, C, H, W)` float32 inputs,
    /// contiguous, on their device: the same bits as
    /// [`Preprocessor::load`] (`v × (1/255)`, then `(v − mean) / std`, each
    /// an IEEE float32 operation, on a CPU as on CUDA: libtorch divides by
    /// a tensor, never by the reciprocal).
    pub(crate) fn normalise(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_permute([0, 3, 1, 2])?
            .f_to_kind(Kind::Float)?
            .f_mul_scalar(f64::from(SCALE_8BIT))?
            .f_sub(&self.mean)?
            .f_div(&self.std)?
            .f_contiguous()?)
    }
}

/// Where [`Preprocessor::load`] and its kin put the model input.
#[derive(Clone, Copy)]
enum InputTo<'a> {
    /// A new tensor.
    New,
    /// A given `(C, H, W)` float32 CPU tensor.
    Into(&'a Tensor),
    /// Not the input but the crop's bytes, into a given contiguous
    /// `(H, W, C)` uint8 CPU tensor (torchvision recipe only).
    Bytes(&'a Tensor),
}

/// The memory order of a `(C, H, W)` tensor that [`normalise_planes`] can
/// write to directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    /// Contiguous planes.
    Planes,
    /// Interleaved `(H, W, C)` values (a channels-last batch row).
    Interleaved,
}

impl Order {
    /// The order of `t`, `(C, H, W)` with `n = H × W`, or `None` for other
    /// strides.
    fn of(t: &Tensor, c: usize, n: usize) -> Option<Self> {
        let (c, n) = (c as i64, n as i64);
        let size = t.size();
        if size.len() != 3 || size[0] != c || size[1] * size[2] != n {
            return None;
        }
        if t.is_contiguous() {
            Some(Order::Planes)
        } else if t.stride() == [1, size[2] * c, c] {
            Some(Order::Interleaved)
        } else {
            None
        }
    }
}

/// `1/255` rounded to float32: the factor of torchvision's
/// `ToDtype(float32, scale=True)` on uint8 (libtorch's
/// `x.to(float32).mul_(1 / 255)`), by which every 8-bit value `v` of a
/// torchvision-recipe crop stands for `v × SCALE_8BIT`.
pub(crate) const SCALE_8BIT: f32 = (1.0f64 / 255.0) as f32;

/// torchvision's `ToDtype(float32, scale=True)` on `n` pixels of
/// interleaved `(H, W, C)` bytes: planar `(C, H, W)` values
/// `v × (1/255 in float32)` — what libtorch's `x.to(float32).mul_(1 / 255)`
/// computes — in one pass.
fn planes_from_bytes(bytes: &[u8], c: usize, image: &mut [f32]) {
    with_avx2!(
        planes_from_bytes_avx2(bytes, c, image),
        else planes_from_bytes_generic(bytes, c, image)
    )
}

/// [`planes_from_bytes`] compiled for AVX2 (the crate's baseline is SSE2):
/// the same operations, 2.5× faster for a 224² crop (0.052 → 0.020 ms).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn planes_from_bytes_avx2(bytes: &[u8], c: usize, image: &mut [f32]) {
    planes_from_bytes_generic(bytes, c, image);
}

#[inline(always)]
fn planes_from_bytes_generic(bytes: &[u8], c: usize, image: &mut [f32]) {
    let k = SCALE_8BIT;
    let n = image.len() / c;
    for (p, px) in bytes.chunks_exact(c).take(n).enumerate() {
        for (ch, &v) in px.iter().enumerate() {
            image[ch * n + p] = f32::from(v) * k;
        }
    }
}

/// torchvision's `Normalize` of `(C, H, W)` planes: `(v − mean) / std` per
/// channel, the same IEEE float32 operations as libtorch's kernels, into
/// `out` in `order` (planes, or interleaved for a channels-last row).
fn normalise_planes(image: &[f32], c: usize, order: Order, out: &mut [f32], s: &Sidecar) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            if c == 3 && order == Order::Interleaved {
                // SAFETY: the CPU supports AVX2 (checked just above).
                unsafe { interleave_rgb_avx2(image, out, s) };
                return;
            }
            if order == Order::Planes {
                // SAFETY: the CPU supports AVX2 (checked just above).
                unsafe { normalise_planes_avx2(image, c, out, s) };
                return;
            }
        }
    }
    let n = image.len() / c;
    for ch in 0..c {
        let (m, d) = (s.mean[ch], s.std[ch]);
        let plane = &image[ch * n..(ch + 1) * n];
        match order {
            Order::Planes => {
                for (o, &v) in out[ch * n..(ch + 1) * n].iter_mut().zip(plane) {
                    *o = (v - m) / d;
                }
            }
            Order::Interleaved => {
                for (o, &v) in out[ch..].iter_mut().step_by(c).zip(plane) {
                    *o = (v - m) / d;
                }
            }
        }
    }
}

/// [`normalise_planes`] into contiguous planes, eight values a step with
/// AVX2 (the same subtraction and division per value; the crate's SSE2
/// baseline did four, 6.7% of a plain-recipe saliency run's CPU), streamed
/// where the planes are 32-byte aligned (a batch row); the last values of
/// each plane one at a time.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn normalise_planes_avx2(image: &[f32], c: usize, out: &mut [f32], s: &Sidecar) {
    use std::arch::x86_64::*;
    let n = image.len() / c.max(1);
    let streaming = (out.as_ptr() as usize).is_multiple_of(32) && n.is_multiple_of(8);
    for ch in 0..c {
        let (m, d) = (s.mean[ch], s.std[ch]);
        let plane = &image[ch * n..(ch + 1) * n];
        let dest = &mut out[ch * n..(ch + 1) * n];
        let body = n - n % 8;
        let (vm, vd) = (_mm256_set1_ps(m), _mm256_set1_ps(d));
        let mut i = 0;
        while i < body {
            // SAFETY (loads, stores): i + 8 <= n, within both planes.
            let v = _mm256_loadu_ps(plane.as_ptr().add(i));
            let v = _mm256_div_ps(_mm256_sub_ps(v, vm), vd);
            store_ps(dest.as_mut_ptr().add(i), v, streaming);
            i += 8;
        }
        for (o, &v) in dest[body..].iter_mut().zip(&plane[body..]) {
            *o = (v - m) / d;
        }
    }
    end_streaming(streaming);
}

/// [`normalise_planes`] of three planes into an interleaved row, compiled
/// for AVX2: eight pixels a step, each plane's eight values normalised in
/// one register (the same subtraction and division per value) and the
/// three registers interleaved into 24 values by lane permutes and blends,
/// streamed to an aligned row; the last pixels one at a time.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn interleave_rgb_avx2(image: &[f32], out: &mut [f32], s: &Sidecar) {
    use std::arch::x86_64::*;
    let n = image.len() / 3;
    let (r, gb) = image.split_at(n);
    let (g, b) = gb.split_at(n);
    let (m, d) = (&s.mean[..3], &s.std[..3]);
    let n = n.min(out.len() / 3);
    let vm = [0, 1, 2].map(|ch| _mm256_set1_ps(m[ch]));
    let vd = [0, 1, 2].map(|ch| _mm256_set1_ps(d[ch]));
    // Of a step's 24 values, output register q's lane j holds value
    // 8q + j: channel (8q + j) mod 3 of the step's pixel (8q + j) / 3, the
    // lane each plane's register is permuted from.
    let idx = |q: usize| -> __m256i {
        let l: [i32; 8] = std::array::from_fn(|j| (((8 * q + j) / 3) % 8) as i32);
        _mm256_loadu_si256(l.as_ptr().cast())
    };
    let (i0, i1, i2) = (idx(0), idx(1), idx(2));
    let (src, dst) = ([r.as_ptr(), g.as_ptr(), b.as_ptr()], out.as_mut_ptr());
    // A row of a batch (32-byte aligned: every step's 96 bytes are) is
    // written with streamed stores, around the cache: it is read next by
    // the model, after the whole batch.
    let streaming = (dst as usize).is_multiple_of(32);
    let mut p = 0;
    while p + 8 <= n {
        let [vr, vg, vb] = [0, 1, 2].map(|ch| {
            _mm256_div_ps(
                _mm256_sub_ps(_mm256_loadu_ps(src[ch].add(p)), vm[ch]),
                vd[ch],
            )
        });
        // Lanes by channel: q = 0 holds r g b r g b r g, q = 1 b r g b r g b
        // r, q = 2 g b r g b r g b. Blend masks: the lanes of r, then of g
        // (b takes the rest).
        let pick = |i: __m256i| {
            (
                _mm256_permutevar8x32_ps(vr, i),
                _mm256_permutevar8x32_ps(vg, i),
                _mm256_permutevar8x32_ps(vb, i),
            )
        };
        let (r0, g0, b0) = pick(i0);
        let o0 = _mm256_blend_ps::<0b0100_1001>(_mm256_blend_ps::<0b1001_0010>(b0, g0), r0);
        let (r1, g1, b1) = pick(i1);
        let o1 = _mm256_blend_ps::<0b1001_0010>(_mm256_blend_ps::<0b0010_0100>(b1, g1), r1);
        let (r2, g2, b2) = pick(i2);
        let o2 = _mm256_blend_ps::<0b0010_0100>(_mm256_blend_ps::<0b0100_1001>(b2, g2), r2);
        let at = dst.add(3 * p);
        store_ps(at, o0, streaming);
        store_ps(at.add(8), o1, streaming);
        store_ps(at.add(16), o2, streaming);
        p += 8;
    }
    end_streaming(streaming);
    for q in p..n {
        let o = &mut out[3 * q..3 * q + 3];
        o[0] = (r[q] - m[0]) / d[0];
        o[1] = (g[q] - m[1]) / d[1];
        o[2] = (b[q] - m[2]) / d[2];
    }
}

/// [`normalise_planes`] of the `[0, 1]` values of interleaved `(H, W, C)`
/// bytes (`v × (1/255)` in float32, as [`planes_from_bytes`] makes them):
/// every byte value's result is computed once per channel, with the same
/// IEEE operations, and each value is then a table lookup, into `out` in
/// `order`. RGB goes through a vector kernel where the CPU has AVX2 (the
/// same operations, eight values at a time), and the tables do the last
/// few pixels (none for most sizes): [`normalise_rgb_bytes_avx2`] into a
/// channels-last row (0.085–0.10 → 0.034–0.046 ms for a 224² crop in a
/// batch run), [`normalise_rgb_planes_avx2`] into a contiguous one (the
/// tables' 7.1% of a trivial-model saliency run's CPU → 3.2%).
fn normalise_bytes(bytes: &[u8], c: usize, order: Order, out: &mut [f32], s: &Sidecar) {
    // Pixels done by a vector kernel (all but the last few, or none).
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if c == 3 && std::arch::is_x86_feature_detected!("avx2") {
            // The planes' length, and the pixels there are bytes for.
            let n = out.len() / 3;
            let px = n.min(bytes.len() / 3);
            match order {
                Order::Interleaved => {
                    done = px - px % 8;
                    // SAFETY: the CPU supports AVX2 (checked just above);
                    // both slices hold `3 × done` values, a multiple of 24.
                    unsafe {
                        normalise_rgb_bytes_avx2(&bytes[..3 * done], &mut out[..3 * done], s);
                    }
                }
                Order::Planes => {
                    done = px - px % 16;
                    // SAFETY: the CPU supports AVX2 (checked just above);
                    // `bytes` holds at least `3 × done` values and `out`
                    // three planes of `n`, with `done <= n` a multiple of
                    // 16.
                    unsafe {
                        normalise_rgb_planes_avx2(bytes, out, n, done, s);
                    }
                }
            }
        }
    }
    let n = out.len() / c.max(1);
    if done == n {
        return;
    }
    let k = SCALE_8BIT;
    let tables: Vec<[f32; 256]> = (0..c)
        .map(|ch| {
            let (m, d) = (s.mean[ch], s.std[ch]);
            std::array::from_fn(|v| (f32::from(v as u8) * k - m) / d)
        })
        .collect();
    let (px_bytes, px_out) = (&bytes[c * done..], &mut out[c * done..]);
    match order {
        Order::Interleaved if c == 3 => {
            let [r, g, b] = [&tables[0], &tables[1], &tables[2]];
            for (o, px) in px_out.chunks_exact_mut(3).zip(px_bytes.chunks_exact(3)) {
                o[0] = r[usize::from(px[0])];
                o[1] = g[usize::from(px[1])];
                o[2] = b[usize::from(px[2])];
            }
        }
        Order::Interleaved => {
            for (o, px) in px_out.chunks_exact_mut(c).zip(px_bytes.chunks_exact(c)) {
                for ((o, &v), t) in o.iter_mut().zip(px).zip(&tables) {
                    *o = t[usize::from(v)];
                }
            }
        }
        Order::Planes => {
            for (ch, t) in tables.iter().enumerate() {
                let plane = &mut out[ch * n + done..(ch + 1) * n];
                for (o, px) in plane.iter_mut().zip(px_bytes.chunks_exact(c)) {
                    *o = t[usize::from(px[ch])];
                }
            }
        }
    }
}

/// [`normalise_bytes`] of the first `done` pixels of interleaved RGB bytes
/// into three contiguous planes of `n` values (a contiguous batch row),
/// sixteen pixels at a time: the 48 bytes split into their channels by
/// byte shuffles, each value widened to float and put through the tables'
/// operations, `(v × (1/255) − mean) / std`, as separate IEEE
/// multiplication, subtraction and division (the same bits as the tables).
/// Stores are streamed around the cache where the planes are 32-byte
/// aligned, as [`normalise_rgb_bytes_avx2`]'s are.
///
/// # Safety
/// The CPU must support AVX2; `bytes` holds at least `3 × done` values,
/// `out` at least `3 × n`, and `done <= n` is a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn normalise_rgb_planes_avx2(
    bytes: &[u8],
    out: &mut [f32],
    n: usize,
    done: usize,
    s: &Sidecar,
) {
    use std::arch::x86_64::*;
    debug_assert!(done <= n && done.is_multiple_of(16));
    debug_assert!(bytes.len() >= 3 * done && out.len() >= 3 * n);
    // masks[ch][part]: the shuffle taking channel ch of pixels 0..16 out
    // of the part-th 16 bytes of 48 (-1, which clears a lane, elsewhere).
    let masks: [[__m128i; 3]; 3] = std::array::from_fn(|ch| {
        std::array::from_fn(|part| {
            let lanes: [i8; 16] = std::array::from_fn(|p| {
                let at = 3 * p + ch;
                if at / 16 == part {
                    (at % 16) as i8
                } else {
                    -1
                }
            });
            _mm_loadu_si128(lanes.as_ptr().cast())
        })
    });
    let k = _mm256_set1_ps(SCALE_8BIT);
    let m: [__m256; 3] = std::array::from_fn(|ch| _mm256_set1_ps(s.mean[ch]));
    let d: [__m256; 3] = std::array::from_fn(|ch| _mm256_set1_ps(s.std[ch]));
    let dst = out.as_mut_ptr();
    let streaming =
        (dst as usize).is_multiple_of(32) && (n * std::mem::size_of::<f32>()).is_multiple_of(32);
    let src = bytes.as_ptr();
    let mut p = 0;
    while p < done {
        let parts = [
            _mm_loadu_si128(src.add(3 * p).cast()),
            _mm_loadu_si128(src.add(3 * p + 16).cast()),
            _mm_loadu_si128(src.add(3 * p + 32).cast()),
        ];
        for ch in 0..3 {
            let v = _mm_or_si128(
                _mm_or_si128(
                    _mm_shuffle_epi8(parts[0], masks[ch][0]),
                    _mm_shuffle_epi8(parts[1], masks[ch][1]),
                ),
                _mm_shuffle_epi8(parts[2], masks[ch][2]),
            );
            let halves = [
                _mm256_cvtepu8_epi32(v),
                _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(v)),
            ];
            for (h, words) in halves.into_iter().enumerate() {
                let x = _mm256_mul_ps(_mm256_cvtepi32_ps(words), k);
                let x = _mm256_div_ps(_mm256_sub_ps(x, m[ch]), d[ch]);
                store_ps(dst.add(ch * n + p + 8 * h), x, streaming);
            }
        }
        p += 16;
    }
    end_streaming(streaming);
}

/// [`normalise_bytes`] of interleaved RGB bytes into a channels-last row,
/// eight pixels (24 values) at a time: each value widened to float and
/// put through the tables' operations, `(v × (1/255) − mean) / std`, as
/// separate IEEE multiplication, subtraction and division (the same bits
/// as the tables), with the means and deviations in the lanes' channel
/// order. Into a 32-byte aligned row (a batch's rows are), the stores
/// bypass the caches: the row is read next by the model, after the whole
/// batch, from memory either way.
///
/// # Safety
/// The CPU must support AVX2; `bytes` and `out` hold the same number of
/// values, a multiple of 24.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn normalise_rgb_bytes_avx2(bytes: &[u8], out: &mut [f32], s: &Sidecar) {
    use std::arch::x86_64::*;
    debug_assert!(bytes.len() == out.len() && out.len().is_multiple_of(24));
    let k = _mm256_set1_ps(SCALE_8BIT);
    // Lane j of the q-th eight values holds channel (8q + j) mod 3.
    let lanes = |v: &[f32]| -> [[f32; 8]; 3] {
        std::array::from_fn(|q| std::array::from_fn(|j| v[(8 * q + j) % 3]))
    };
    let (mean, std) = (lanes(&s.mean[..3]), lanes(&s.std[..3]));
    let m = mean.map(|v| _mm256_loadu_ps(v.as_ptr()));
    let d = std.map(|v| _mm256_loadu_ps(v.as_ptr()));
    let streaming = (out.as_ptr() as usize).is_multiple_of(32);
    let (src, dst) = (bytes.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i < out.len() {
        let lo = _mm_loadu_si128(src.add(i).cast());
        let hi = _mm_loadl_epi64(src.add(i + 16).cast());
        let words = [
            _mm256_cvtepu8_epi32(lo),
            _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(lo)),
            _mm256_cvtepu8_epi32(hi),
        ];
        for q in 0..3 {
            let v = _mm256_mul_ps(_mm256_cvtepi32_ps(words[q]), k);
            let v = _mm256_div_ps(_mm256_sub_ps(v, m[q]), d[q]);
            store_ps(dst.add(i + 8 * q), v, streaming);
        }
        i += 24;
    }
    end_streaming(streaming);
}

/// Stores eight floats at `at`, streamed around the cache (`at` 32-byte
/// aligned) or plainly: the row writers' store.
///
/// # Safety
/// The CPU must support AVX2; `at` holds eight floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store_ps(at: *mut f32, v: std::arch::x86_64::__m256, streaming: bool) {
    use std::arch::x86_64::*;
    if streaming {
        _mm256_stream_ps(at, v);
    } else {
        _mm256_storeu_ps(at, v);
    }
}

/// After a row writer's streamed stores: orders them before whatever hands
/// the row on.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn end_streaming(streaming: bool) {
    if streaming {
        std::arch::x86_64::_mm_sfence();
    }
}

/// libtorch's float bilinear resize (`upsample_bilinear2d`,
/// `align_corners = false`, no antialiasing) of the `[0, 1]` planes of
/// 8-bit RGB (`v / 255`, or for one channel the luma of those, as
/// [`Preprocessor::planes_8bit`] makes them), computed from the bytes the
/// interpolation reads instead of from a float copy of the whole image:
/// planar `(C, th, tw)` into `out` (C × th × tw values), the same bits as
/// libtorch's kernels. `false`, with nothing written, on a CPU without FMA
/// (or `out` of another length): the caller resizes with libtorch.
///
/// libtorch has two kernels with different operation orders and picks one
/// by the output size and the calling thread's thread count (its
/// `upsample_bilinear2d_kernel_impl_float`): the channels-last kernel when
/// `th + tw <= 128`, or on one thread for three channels, summing the four
/// weighted taps in one chain; the generic kernel otherwise, interpolating
/// along the width and then the height. This follows libtorch on more than
/// one thread (as PyTorch usually runs), whatever the calling thread's
/// count: the bits do not depend on the thread a decode runs on. Fused
/// multiply-adds are where libtorch's compiled kernels have them (found by
/// comparing bits; `the_8bit_fast_path_equals_the_planes_path_bit_for_bit`).
fn bilinear_from_bytes(rgb: &RgbImage, c: usize, th: usize, tw: usize, out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let planar_rgb = c == 3 && th + tw > 128 && tw >= 8 && out.len() == c * th * tw;
        if planar_rgb
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { bilinear_rgb_avx2(rgb, th, tw, out) };
            return true;
        }
        if std::is_x86_feature_detected!("fma") && out.len() == c * th * tw {
            // SAFETY: the CPU has FMA (checked just above).
            unsafe { bilinear_from_bytes_fma(rgb, c, th, tw, out) };
            return true;
        }
    }
    let _ = (rgb, c, th, tw, out);
    false
}

/// [`bilinear_from_bytes`] compiled with hardware fused multiply-adds
/// (`mul_add` is one instruction here, a library call elsewhere).
///
/// # Safety
/// The CPU must support FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn bilinear_from_bytes_fma(rgb: &RgbImage, c: usize, th: usize, tw: usize, out: &mut [f32]) {
    let w = rgb.width() as usize;
    let raw = rgb.as_raw();
    // v / 255 in float32 for each byte value: the same IEEE division.
    let scaled: [f32; 256] = std::array::from_fn(|v| f32::from(v as u8) / 255.0);
    let (ys, xs) = (linear_taps(rgb.height() as usize, th), linear_taps(w, tw));
    let channels_last = th + tw <= 128;
    let plane = th * tw;
    // The `[0, 1]` value of channel `ch` (or the luma, for one channel) of
    // the pixel at byte offset `i` of a row.
    let value = |row: &[u8], i: usize, ch: usize| -> f32 {
        if c == 1 {
            // The luma of `planes_8bit`, without fused operations.
            0.299f32 * scaled[usize::from(row[i])]
                + 0.587f32 * scaled[usize::from(row[i + 1])]
                + 0.114f32 * scaled[usize::from(row[i + 2])]
        } else {
            scaled[usize::from(row[i + ch])]
        }
    };
    for (oy, &(y0, y1, h0, h1)) in ys.iter().enumerate() {
        let r0 = &raw[y0 * w * 3..(y0 + 1) * w * 3];
        let r1 = &raw[y1 * w * 3..(y1 + 1) * w * 3];
        for ch in 0..c {
            let dst = &mut out[ch * plane + oy * tw..ch * plane + (oy + 1) * tw];
            for (o, &(x0, x1, w0, w1)) in dst.iter_mut().zip(&xs) {
                let (i0, i1) = (x0 * 3, x1 * 3);
                let (a, b) = (value(r0, i0, ch), value(r0, i1, ch));
                let (p, q) = (value(r1, i0, ch), value(r1, i1, ch));
                *o = if channels_last {
                    let (w00, w01, w10, w11) = (h0 * w0, h0 * w1, h1 * w0, h1 * w1);
                    q.mul_add(w11, p.mul_add(w10, a.mul_add(w00, b * w01)))
                } else {
                    h0.mul_add(w0.mul_add(a, w1 * b), h1 * w0.mul_add(p, w1 * q))
                };
            }
        }
    }
}

/// [`bilinear_from_bytes_fma`] for RGB into planes (outputs over 128 rows
/// plus columns, at least 8 wide), eight output columns at a time (the
/// last eight when the width is not a multiple: some columns are computed
/// twice, to the same values): per output row, the
/// four source pixels of each column are copied as 4-byte words (RGB and
/// one byte more) into four rows of words by scalar loads, then each
/// channel is taken from them with a shift and a mask, made `v / 255` (a
/// multiplication by the float reciprocal and one fused correction: the
/// same float as the division for every byte value, tested) and
/// interpolated with the same fused operations as the scalar loop, lane
/// by lane.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bilinear_rgb_avx2(rgb: &RgbImage, th: usize, tw: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let raw = rgb.as_raw();
    let (ys, xs) = (linear_taps(h, th), linear_taps(w, tw));
    let plane = th * tw;
    assert!(raw.len() == h * w * 3 && out.len() == 3 * plane && tw >= 8);
    let w0: Vec<f32> = xs.iter().map(|t| t.2).collect();
    let w1: Vec<f32> = xs.iter().map(|t| t.3).collect();
    let offsets: Vec<(usize, usize)> = xs.iter().map(|t| (t.0 * 3, t.1 * 3)).collect();
    // The four words of each column: a, b from the upper row, p, q from
    // the lower (x0 and x1 in each).
    let mut words = vec![0u32; 4 * tw];
    let word = |row: &[u8], i: usize| -> u32 {
        match row.get(i..i + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            // The image's last pixel: three bytes.
            None => u32::from_le_bytes([row[i], row[i + 1], row[i + 2], 0]),
        }
    };
    let reciprocal = _mm256_set1_ps(1.0 / 255.0);
    let n255 = _mm256_set1_ps(255.0);
    let low = _mm256_set1_epi32(0xff);
    // The first column of each group of eight.
    let groups: Vec<usize> = (0..tw.div_ceil(8)).map(|g| (8 * g).min(tw - 8)).collect();
    for (oy, &(y0, y1, h0, h1)) in ys.iter().enumerate() {
        // Rows from their start to the image's end: a word may take the
        // next row's first byte, never past the buffer.
        let (r0, r1) = (&raw[y0 * w * 3..], &raw[y1 * w * 3..]);
        if y1 + 1 < h {
            // Every word of these rows lies inside the image (y0 ≤ y1):
            // unchecked reads.
            let (p0, p1, out) = (r0.as_ptr(), r1.as_ptr(), words.as_mut_ptr());
            for (x, &(i0, i1)) in offsets.iter().enumerate() {
                *out.add(x) = p0.add(i0).cast::<u32>().read_unaligned();
                *out.add(tw + x) = p0.add(i1).cast::<u32>().read_unaligned();
                *out.add(2 * tw + x) = p1.add(i0).cast::<u32>().read_unaligned();
                *out.add(3 * tw + x) = p1.add(i1).cast::<u32>().read_unaligned();
            }
        } else {
            for (x, &(i0, i1)) in offsets.iter().enumerate() {
                words[x] = word(r0, i0);
                words[tw + x] = word(r0, i1);
                words[2 * tw + x] = word(r1, i0);
                words[3 * tw + x] = word(r1, i1);
            }
        }
        let (vh0, vh1) = (_mm256_set1_ps(h0), _mm256_set1_ps(h1));
        for &x in &groups {
            // No closures here: they would not inherit the target features.
            let mut t = [_mm256_setzero_si256(); 4];
            for (k, t) in t.iter_mut().enumerate() {
                *t = _mm256_loadu_si256(words.as_ptr().add(k * tw + x).cast());
            }
            let (vw0, vw1) = (
                _mm256_loadu_ps(w0.as_ptr().add(x)),
                _mm256_loadu_ps(w1.as_ptr().add(x)),
            );
            for ch in 0..3 {
                let shift = _mm_cvtsi32_si128(8 * ch as i32);
                let mut v = [_mm256_setzero_ps(); 4];
                for (v, &t) in v.iter_mut().zip(&t) {
                    let f = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(t, shift), low));
                    // f / 255: f × (1/255), corrected by its fused residual.
                    let q0 = _mm256_mul_ps(f, reciprocal);
                    let e = _mm256_fnmadd_ps(q0, n255, f);
                    *v = _mm256_fmadd_ps(e, reciprocal, q0);
                }
                let [a, b, p, q] = v;
                // h0·(w0·a + w1·b) + h1·(w0·p + w1·q), fused as the scalar loop.
                let top = _mm256_fmadd_ps(vw0, a, _mm256_mul_ps(vw1, b));
                let bottom = _mm256_mul_ps(vh1, _mm256_fmadd_ps(vw0, p, _mm256_mul_ps(vw1, q)));
                let o = _mm256_fmadd_ps(vh0, top, bottom);
                _mm256_storeu_ps(out.as_mut_ptr().add(ch * plane + oy * tw + x), o);
            }
        }
    }
}

/// libtorch's source taps of a linear resize from `n_in` to `n_out`
/// samples (`align_corners = false`): `(i0, i1, λ0, λ1)` per output
/// sample, from `scale × (o + 0.5) − 0.5` in float32 (a fused
/// multiply-add, as compiled there), clamped at 0.
fn linear_taps(n_in: usize, n_out: usize) -> Vec<(usize, usize, f32, f32)> {
    if n_in == n_out {
        return (0..n_out).map(|i| (i, i, 1.0, 0.0)).collect();
    }
    let scale = n_in as f32 / n_out as f32;
    (0..n_out)
        .map(|o| {
            let src = scale.mul_add(o as f32 + 0.5, -0.5).max(0.0);
            let i0 = (src.floor() as usize).min(n_in - 1);
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            let i1 = if i0 < n_in - 1 { i0 + 1 } else { i0 };
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// torchvision's `Resize` on a uint8 `(1, C, H, W)` tensor: libtorch's
/// uint8 kernels (`align_corners = false`), the ones torchvision calls on
/// the CPU.
fn resize_u8(x: &Tensor, size: [i64; 2], filter: Interpolation, antialias: bool) -> Result<Tensor> {
    Ok(match (filter, antialias) {
        (Interpolation::Bilinear, true) => {
            x.f_internal_upsample_bilinear2d_aa(size, false, None, None)?
        }
        (Interpolation::Bilinear, false) => x.f_upsample_bilinear2d(size, false, None, None)?,
        (Interpolation::Bicubic, true) => {
            x.f_internal_upsample_bicubic2d_aa(size, false, None, None)?
        }
        (Interpolation::Bicubic, false) => x.f_upsample_bicubic2d(size, false, None, None)?,
    })
}

/// torchvision's `CenterCrop` on `(1, C, H, W)`: see [`center_crop_window`].
fn center_crop(x: &Tensor, [ch, cw]: [usize; 2]) -> Result<Tensor> {
    let size = x.size();
    let (h, w) = (size[2] as usize, size[3] as usize);
    if (h, w) == (ch, cw) {
        return Ok(x.shallow_clone());
    }
    let (sy, dy, ly) = center_crop_window(h, ch);
    let (sx, dx, lx) = center_crop_window(w, cw);
    let src = x
        .f_narrow(2, sy as i64, ly as i64)?
        .f_narrow(3, sx as i64, lx as i64)?;
    if (ly, lx) == (ch, cw) {
        return Ok(src);
    }
    let out = Tensor::f_zeros(
        [size[0], size[1], ch as i64, cw as i64],
        (x.kind(), x.device()),
    )?;
    let mut window = out
        .f_narrow(2, dy as i64, ly as i64)?
        .f_narrow(3, dx as i64, lx as i64)?;
    window.f_copy_(&src)?;
    Ok(out)
}

/// Planar `[0, 1]` pixels `(C, H, W)` of a decoded image: RGB for `channels`
/// 3, luma for 1.
pub fn to_planes(img: &DynamicImage, channels: usize) -> Vec<f32> {
    let n = img.width() as usize * img.height() as usize;
    let mut planes = vec![0f32; channels * n];
    fill_planes(img, channels, &mut planes);
    planes
}

/// [`to_planes`] into `out` (`channels × W × H` values), pixel by pixel
/// from the image's own samples: 8-bit by `v / 255`, 16-bit by
/// `v / 65535`, float as they are; grey repeated, alpha dropped; for one
/// channel the luma `0.299 R + 0.587 G + 0.114 B` of those, in float32.
/// Nothing the size of the image is allocated (other layouts than these go
/// through one float RGB copy).
fn fill_planes(img: &DynamicImage, channels: usize, out: &mut [f32]) {
    fn fill<T: Copy>(
        raw: &[T],
        step: usize,
        grey: bool,
        f: impl Fn(T) -> f32,
        channels: usize,
        out: &mut [f32],
    ) {
        let n = out.len() / channels;
        for (i, p) in raw.chunks_exact(step).take(n).enumerate() {
            let rgb = if grey {
                let v = f(p[0]);
                [v, v, v]
            } else {
                [f(p[0]), f(p[1]), f(p[2])]
            };
            if channels == 1 {
                out[i] = 0.299f32 * rgb[0] + 0.587f32 * rgb[1] + 0.114f32 * rgb[2];
            } else {
                out[i] = rgb[0];
                out[n + i] = rgb[1];
                out[2 * n + i] = rgb[2];
            }
        }
    }
    let u8f = |v: u8| f32::from(v) / 255.0;
    let u16f = |v: u16| f32::from(v) / 65535.0;
    match img {
        DynamicImage::ImageLuma8(i) => fill(i.as_raw(), 1, true, u8f, channels, out),
        DynamicImage::ImageLumaA8(i) => fill(i.as_raw(), 2, true, u8f, channels, out),
        DynamicImage::ImageRgb8(i) => fill(i.as_raw(), 3, false, u8f, channels, out),
        DynamicImage::ImageRgba8(i) => fill(i.as_raw(), 4, false, u8f, channels, out),
        DynamicImage::ImageLuma16(i) => fill(i.as_raw(), 1, true, u16f, channels, out),
        DynamicImage::ImageLumaA16(i) => fill(i.as_raw(), 2, true, u16f, channels, out),
        DynamicImage::ImageRgb16(i) => fill(i.as_raw(), 3, false, u16f, channels, out),
        DynamicImage::ImageRgba16(i) => fill(i.as_raw(), 4, false, u16f, channels, out),
        DynamicImage::ImageRgb32F(i) => fill(i.as_raw(), 3, false, |v| v, channels, out),
        DynamicImage::ImageRgba32F(i) => fill(i.as_raw(), 4, false, |v| v, channels, out),
        _ => fill(img.to_rgb32f().as_raw(), 3, false, |v| v, channels, out),
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

    #[test]
    fn rgb8_gives_the_image_crates_bytes() {
        // Every value, with alpha and odd sizes; 16-bit goes to the crate.
        let (w, h) = (37u32, 29u32);
        let v = |i: u32| ((i * 97 + 13) % 256) as u8;
        let imgs = [
            DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, y| {
                image::Luma([v(x + w * y)])
            })),
            DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_fn(w, h, |x, y| {
                image::LumaA([v(x + w * y), v(3 * x + y)])
            })),
            DynamicImage::ImageRgba8(image::RgbaImage::from_fn(w, h, |x, y| {
                image::Rgba([v(x), v(y + 7), v(x * y), v(x + y)])
            })),
            DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([v(x), v(y), v(x ^ y)])
            })),
            DynamicImage::ImageLuma16(image::ImageBuffer::from_fn(w, h, |x, y| {
                image::Luma([(x * 1000 + y) as u16])
            })),
        ];
        for img in imgs {
            let want = img.clone().into_rgb8();
            assert_eq!(rgb8(img.clone()), want, "{:?}", img.color());
        }
    }

    /// Three planes into an interleaved row: every value's bits equal
    /// the scalar `(v − mean) / std` of its channel, at every pixel count
    /// around the kernel's eight-pixel steps, for ordinary, signed, huge,
    /// infinite and NaN values, with the ImageNet statistics.
    #[test]
    fn planes_interleave_into_a_row_with_scalar_bits() {
        let mut s = sidecar(3, [1, 1]);
        s.mean = vec![0.485, 0.456, 0.406];
        s.std = vec![0.229, 0.224, 0.225];
        let special = [f32::NAN, f32::INFINITY, -0.0, 3.4e38, -1e-30];
        for n in [1usize, 7, 8, 9, 15, 16, 17, 23, 24, 25, 483, 224 * 224] {
            let image: Vec<f32> = (0..3 * n)
                .map(|i| match i % 97 {
                    k @ 0..5 => special[k],
                    _ => ((i * 7919) % 1000) as f32 / 997.0 - 0.25,
                })
                .collect();
            let mut out = vec![7.0f32; 3 * n + 5];
            normalise_planes(&image, 3, Order::Interleaved, &mut out[..3 * n], &s);
            for p in 0..n {
                for ch in 0..3 {
                    let want = (image[ch * n + p] - s.mean[ch]) / s.std[ch];
                    let got = out[3 * p + ch];
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "n {n} pixel {p} channel {ch}"
                    );
                }
            }
            assert!(
                out[3 * n..].iter().all(|&v| v == 7.0),
                "n {n}: wrote past the row"
            );
        }
    }

    fn sidecar(channels: usize, size: [usize; 2]) -> Sidecar {
        Sidecar {
            input_size: size,
            channels,
            mean: vec![0.5; channels],
            std: vec![0.25; channels],
            labels: None,
            resize: None,
            interpolation: None,
            antialias: None,
            crop: None,
        }
    }

    /// `resize` and `crop` are read in each of torchvision's spellings, a
    /// wrong one is named with the spellings; a near miss of a key is
    /// refused with the key it misses, other extra keys are left alone.
    #[test]
    fn sidecar_sizes_in_torchvision_spellings_and_near_miss_keys() {
        let with = |extra: &str| {
            Sidecar::from_json(
                &format!(
                    r#"{{"input_size": [224, 224], "channels": 1, "mean": [0], "std": [1]{extra}}}"#
                ),
                "m.json",
            )
        };
        for (extra, resize, crop) in [
            (
                r#", "resize": 256, "crop": 224"#,
                Resize::ShorterSide(256),
                [224, 224],
            ),
            (
                r#", "resize": [256], "crop": [224]"#,
                Resize::ShorterSide(256),
                [224, 224],
            ),
            (
                r#", "resize": [256, 300], "crop": [224, 224]"#,
                Resize::Exact([256, 300]),
                [224, 224],
            ),
        ] {
            let s = with(extra).unwrap();
            assert_eq!((s.resize, s.crop), (Some(resize), Some(crop)), "{extra}");
            // Written in the first spellings, read back the same.
            let again = Sidecar::from_json(&serde_json::to_string(&s).unwrap(), "m.json").unwrap();
            assert_eq!(again, s, "{extra}");
        }
        for (extra, says) in [
            (r#", "resize": "256", "crop": 224"#, "resize is S or [S]"),
            (
                r#", "resize": [256, 256, 3], "crop": 224"#,
                "resize is S or [S]",
            ),
            (r#", "resize": [0], "crop": 224"#, "resize is S or [S]"),
            (r#", "resize": 256, "crop": [224, 0]"#, "crop is S or [S]"),
            (r#", "resize": 256, "crop": 224.5"#, "crop is S or [S]"),
            (
                r#", "label": ["a"]"#,
                r#"unknown key "label" (did you mean "labels"?"#,
            ),
            (r#", "means": [0]"#, r#"did you mean "mean"?"#),
            (r#", "STD": [1]"#, r#"did you mean "std"?"#),
            (
                r#", "resize": 256, "crop": 224, "interpolaton": "bicubic""#,
                r#"did you mean "interpolation"?"#,
            ),
            (r#", "Input_Sise": [1, 1]"#, r#"did you mean "input_size"?"#),
        ] {
            match with(extra) {
                Err(Error::Sidecar { reason, .. }) => {
                    assert!(reason.contains(says), "{extra}: {reason}")
                }
                other => panic!("{extra}: {other:?}"),
            }
        }
        // A misspelt key in place of a required one: named, not "missing
        // field".
        match Sidecar::from_json(
            r#"{"input_size": [8, 8], "channels": 1, "means": [0], "std": [1]}"#,
            "m.json",
        ) {
            Err(Error::Sidecar { reason, .. }) => {
                assert!(
                    reason.contains(r#"unknown key "means" (did you mean "mean"?"#),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        let kept = with(
            r#", "name": "m", "id": 3, "size": 224, "layers": 18, "drop": 0.1, "source": "torchvision", "crop": null"#,
        );
        assert_eq!(kept.unwrap().resize, None);
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
            // The torchvision keys: crop must equal input_size, resize S needs
            // a crop, the other keys need resize, sizes are positive.
            r#"{"input_size": [4, 4], "channels": 1, "mean": [0], "std": [1], "resize": 8, "crop": [4, 5]}"#,
            r#"{"input_size": [4, 4], "channels": 1, "mean": [0], "std": [1], "resize": 8}"#,
            r#"{"input_size": [4, 4], "channels": 1, "mean": [0], "std": [1], "resize": [4, 5]}"#,
            r#"{"input_size": [4, 4], "channels": 1, "mean": [0], "std": [1], "crop": [4, 4]}"#,
            r#"{"input_size": [4, 4], "channels": 1, "mean": [0], "std": [1], "antialias": false}"#,
            r#"{"input_size": [4, 4], "channels": 1, "mean": [0], "std": [1], "resize": 0, "crop": [4, 4]}"#,
            r#"{"input_size": [4, 4], "channels": 1, "mean": [0], "std": [1], "resize": 8, "crop": [4, 4], "interpolation": "nearest"}"#,
            r#"{"input_size": [4, 4], "channels": 1, "mean": [0], "std": [1], "resize": -8, "crop": [4, 4]}"#,
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
        assert_eq!(ok.resize, None);
        let tv = Sidecar::from_json(
            r#"{"input_size": [4, 4], "channels": 1, "mean": [0], "std": [1],
                "resize": 8, "crop": [4, 4], "interpolation": "bicubic"}"#,
            "m.json",
        )
        .unwrap();
        assert_eq!(tv.resize, Some(Resize::ShorterSide(8)));
        assert_eq!(tv.interpolation(), Interpolation::Bicubic);
        assert!(tv.antialias());
        let exact = Sidecar::from_json(
            r#"{"input_size": [4, 5], "channels": 1, "mean": [0], "std": [1], "resize": [4, 5], "antialias": false}"#,
            "m.json",
        )
        .unwrap();
        assert_eq!(exact.resize, Some(Resize::Exact([4, 5])));
        assert!(!exact.antialias());
        // Without the keys the JSON written back is the old form.
        assert!(!serde_json::to_string(&ok).unwrap().contains("resize"));
    }

    #[test]
    fn the_8bit_fast_path_equals_the_planes_path_bit_for_bit() {
        let noise = |w: u32, h: u32| {
            let mut img = image::RgbImage::new(w, h);
            let mut state = 12345u32;
            for p in img.pixels_mut() {
                for v in p.0.iter_mut() {
                    state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                    *v = (state >> 24) as u8;
                }
            }
            DynamicImage::ImageRgb8(img)
        };
        let cases = [
            ((37, 23), 3, [16, 20]),
            ((37, 23), 1, [16, 20]),
            ((37, 23), 3, [23, 37]),
            ((37, 23), 1, [40, 50]),
            ((37, 23), 3, [40, 50]),
            ((640, 480), 3, [224, 224]),
            ((640, 480), 3, [300, 500]),
            ((333, 1001), 3, [224, 224]),
            ((333, 1001), 1, [224, 224]),
            ((29, 31), 3, [32, 32]),
            ((29, 31), 1, [32, 32]),
            ((37, 1000), 3, [64, 64]),
            ((77, 100), 3, [224, 224]),
            ((77, 100), 1, [96, 128]),
            ((300, 224), 3, [224, 224]),
            ((1, 1), 3, [8, 8]),
            ((2000, 3), 3, [60, 60]),
            ((3, 2000), 1, [224, 224]),
            // Either side of libtorch's kernel threshold (height + width 128).
            ((50, 41), 3, [64, 65]),
            ((50, 41), 3, [65, 63]),
            // The vector loop's last, overlapping group of eight columns, and the
            // image's last pixel read by it (3 bytes left, not a word).
            ((31, 17), 3, [100, 101]),
            ((640, 480), 3, [97, 250]),
            // Under 8 columns: the scalar loop.
            ((640, 480), 3, [200, 5]),
        ];
        // The fast path gives libtorch's bits on several threads, and the
        // same bits on one thread (where libtorch would pick its other
        // kernel for colour images larger than 128 in height + width).
        let threads = tch::get_num_threads();
        for ((w, h), channels, size) in cases {
            let img = noise(w, h);
            let pre = Preprocessor::new(sidecar(channels, size));
            tch::set_num_threads(threads.max(2));
            let fast = bits(&pre.prepare_image(img.clone(), "x.png").unwrap().input);
            let slow = pre
                .prepare_planes(to_planes(&img, channels), (w, h))
                .unwrap();
            assert!(fast == bits(&slow.input), "{w}x{h} {channels} {size:?}");
            tch::set_num_threads(1);
            let one = bits(&pre.prepare_image(img.clone(), "x.png").unwrap().input);
            assert!(one == fast, "{w}x{h} {channels} {size:?} on one thread");
        }
        tch::set_num_threads(threads);
    }

    /// The torchvision recipe's one pass over the cropped bytes gives the
    /// bits of libtorch's `to(float32) * (1/255)` and `(x − mean) / std`
    /// (the path it replaced), for gray and colour, bilinear and bicubic,
    /// with and without antialiasing, an image already at the size (no
    /// resize: the crop is a view of the decoded bytes) and one smaller
    /// than the crop (padding).
    #[test]
    fn torchvision_one_pass_equals_libtorch_ops_bit_for_bit() {
        let noise = |w: u32, h: u32, seed: u32| {
            let mut img = image::RgbImage::new(w, h);
            let mut state = seed;
            for p in img.pixels_mut() {
                for v in p.0.iter_mut() {
                    state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                    *v = (state >> 24) as u8;
                }
            }
            img
        };
        let cases = [
            (
                (640, 480),
                3,
                Resize::ShorterSide(256),
                Interpolation::Bilinear,
                true,
            ),
            (
                (480, 640),
                1,
                Resize::ShorterSide(256),
                Interpolation::Bilinear,
                true,
            ),
            (
                (333, 1001),
                3,
                Resize::Exact([224, 224]),
                Interpolation::Bicubic,
                true,
            ),
            (
                (300, 200),
                3,
                Resize::Exact([230, 240]),
                Interpolation::Bilinear,
                false,
            ),
            (
                (224, 224),
                3,
                Resize::Exact([224, 224]),
                Interpolation::Bilinear,
                true,
            ),
            (
                (100, 90),
                3,
                Resize::Exact([90, 100]),
                Interpolation::Bilinear,
                true,
            ),
        ];
        for (k, ((w, h), channels, resize, filter, aa)) in cases.into_iter().enumerate() {
            let side = Sidecar {
                input_size: [224, 224],
                channels,
                mean: [0.485, 0.456, 0.406][..channels].to_vec(),
                std: [0.229, 0.224, 0.225][..channels].to_vec(),
                labels: None,
                resize: Some(resize),
                interpolation: Some(filter),
                antialias: Some(aa),
                crop: Some([224, 224]),
            };
            let rgb = noise(w, h, 7 + k as u32);
            let pre = Preprocessor::new(side.clone());
            let got = pre
                .prepare_image(DynamicImage::ImageRgb8(rgb.clone()), "x.png")
                .unwrap();
            // The libtorch path.
            let x = Tensor::from_slice(rgb.as_raw())
                .view([1, i64::from(h), i64::from(w), 3])
                .permute([0, 3, 1, 2]);
            let x = if channels == 1 {
                grayscale_u8(&x).unwrap()
            } else {
                x
            };
            let (nh, nw) = resize.output_size(h as usize, w as usize);
            let x = if (nh, nw) == (h as usize, w as usize) {
                x
            } else {
                resize_u8(&x, [nh as i64, nw as i64], filter, aa).unwrap()
            };
            let x = center_crop(&x, [224, 224]).unwrap();
            let image = x
                .to_kind(Kind::Float)
                .f_mul_scalar(1.0 / 255.0)
                .unwrap()
                .contiguous()
                .view([channels as i64, 224, 224]);
            let input = pre.normalise(&image).unwrap();
            assert_eq!(
                bits(&got.image.to_planes().unwrap()),
                bits(&image),
                "case {k}: image"
            );
            assert_eq!(bits(&got.input), bits(&input), "case {k}: input");
            // The torchvision recipe keeps the crop's bytes themselves.
            let InputImage::Bytes(crop) = &got.image else {
                panic!("case {k}: {:?}", got.image)
            };
            let want_crop = x
                .permute([0, 2, 3, 1])
                .contiguous()
                .view([224, 224, channels as i64]);
            assert!(crop.equal(&want_crop), "case {k}: bytes");
            assert_eq!(crop.size(), vec![224, 224, channels as i64]);
            let (only, _) = pre
                .resize_image(DynamicImage::ImageRgb8(rgb), "x.png")
                .unwrap();
            assert_eq!(
                bits(&only.to_planes().unwrap()),
                bits(&image),
                "case {k}: resize_image"
            );
        }
    }

    /// A sidecar built by hand with the wrong number of means is an error
    /// of the normalisation, not a panic of the one-pass conversion.
    #[test]
    fn torchvision_recipe_with_a_bad_hand_built_sidecar_is_an_error() {
        let mut side = sidecar(3, [8, 8]);
        side.resize = Some(Resize::Exact([8, 8]));
        side.crop = Some([8, 8]);
        side.mean = vec![0.5, 0.5];
        let img = DynamicImage::ImageRgb8(image::RgbImage::new(12, 10));
        let got = Preprocessor::new(side).prepare_image(img, "x.png");
        assert!(matches!(got, Err(Error::Torch(_))), "{got:?}");
    }

    #[test]
    fn torchvision_sizes_and_crops() {
        // int(S * long / short), truncated; the shorter side is S.
        assert_eq!(Resize::ShorterSide(256).output_size(480, 640), (256, 341));
        assert_eq!(Resize::ShorterSide(256).output_size(640, 480), (341, 256));
        assert_eq!(Resize::ShorterSide(224).output_size(3, 1000), (224, 74666));
        assert_eq!(Resize::ShorterSide(7).output_size(7, 7), (7, 7));
        assert_eq!(center_crop_window(10, 10), (0, 0, 10));
        assert_eq!(center_crop_window(11, 10), (0, 0, 10)); // 0.5 -> 0
        assert_eq!(center_crop_window(13, 10), (2, 0, 10)); // 1.5 -> 2
        assert_eq!(center_crop_window(7, 10), (0, 1, 7)); // pad 1 before, 2 after
    }

    /// A photo-like colour PNG in `dir` (odd size, every byte value used).
    fn photo_png(dir: &Path) -> std::path::PathBuf {
        let img = image::RgbImage::from_fn(61, 47, |x, y| {
            image::Rgb([(x * 7 + y * 3) as u8, (x * y) as u8, (255 - x * 4) as u8])
        });
        let path = dir.join("x.png");
        img.save(&path).unwrap();
        path
    }

    /// Images decoded into the thread's spare buffer (which holds the
    /// previous image's bytes) equal their decoders' own decoding into a
    /// new buffer: libjpeg-turbo's for JPEGs by default, the image crate's
    /// for PNGs and for JPEGs with `fast_jpeg`, also for a JPEG cut short
    /// there (whose missing part zune-jpeg must write, not leave as the
    /// previous image's bytes). A JPEG cut short is an error by default (as
    /// in PIL and torchvision), and so is a PNG cut short.
    #[test]
    fn decoding_into_a_used_buffer_gives_the_image_crates_pixels() {
        let photo = image::RgbImage::from_fn(96, 80, |x, y| {
            image::Rgb([(x * 5 + y) as u8, (x ^ y) as u8, (200 - y) as u8])
        });
        let mut jpeg = Vec::new();
        image::DynamicImage::ImageRgb8(photo.clone())
            .write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
            .unwrap();
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(photo)
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let white = image::RgbImage::from_pixel(120, 90, image::Rgb([255, 255, 255]));
        let pre = Preprocessor::new(
            Sidecar::from_json(
                r#"{"input_size": [32, 32], "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize": 32, "crop": [32, 32]}"#,
                "m.json",
            )
            .unwrap(),
        );
        let cut = jpeg.len() / 2;
        let libjpeg = |bytes: &[u8]| {
            let mut d = mozjpeg::Decompress::new_mem(bytes).unwrap().rgb().unwrap();
            let (w, h) = (d.width() as u32, d.height() as u32);
            let px: Vec<u8> = d.read_scanlines().unwrap();
            image::RgbImage::from_raw(w, h, px).unwrap()
        };
        let fast = pre.clone().fast_jpeg(true);
        for (pre, bytes, want) in [
            (&pre, &jpeg[..], libjpeg(&jpeg)),
            (
                &pre,
                &png[..],
                image::load_from_memory(&png).unwrap().into_rgb8(),
            ),
            (
                &fast,
                &jpeg[..],
                image::load_from_memory(&jpeg).unwrap().into_rgb8(),
            ),
            (
                &fast,
                &jpeg[..cut],
                image::load_from_memory(&jpeg[..cut]).unwrap().into_rgb8(),
            ),
        ] {
            // The spare buffer now holds a white image's bytes.
            pre.prepare_image(image::DynamicImage::ImageRgb8(white.clone()), "w.png")
                .unwrap();
            pre.keep(white.clone());
            let got = pre.decode(bytes, "x").unwrap().into_rgb8();
            assert_eq!(got, want, "{} bytes", bytes.len());
        }
        assert_ne!(
            libjpeg(&jpeg),
            image::load_from_memory(&jpeg).unwrap().into_rgb8()
        );
        let e = pre.decode(&jpeg[..cut], "x").unwrap_err();
        assert!(e.to_string().contains("a truncated JPEG"), "{e}");
        let e = pre.decode(&png[..png.len() / 2], "x").unwrap_err();
        assert!(matches!(e, Error::Image { .. }), "{e}");
    }

    /// The bits of a float tensor's values, in logical order.
    fn bits(t: &Tensor) -> Vec<u32> {
        let v = Vec::<f32>::try_from(&t.contiguous().reshape([-1])).unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn inputs_written_into_batch_rows_equal_new_ones_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = photo_png(dir.path());
        let sidecars = [
            // Plain stretch, colour and gray; torchvision recipes, colour
            // and gray, bilinear and bicubic.
            r#"{"input_size": [24, 20], "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}"#,
            r#"{"input_size": [24, 20], "channels": 1, "mean": [0.5], "std": [0.25]}"#,
            r#"{"input_size": [24, 20], "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize": 26, "crop": [24, 20]}"#,
            r#"{"input_size": [24, 20], "channels": 1, "mean": [0.5], "std": [0.25], "resize": 30, "interpolation": "bicubic", "crop": [24, 20]}"#,
            // Rows of 483 pixels: the vector normalisation's last values
            // and, in row 1, a row not aligned to 32 bytes.
            r#"{"input_size": [23, 21], "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize": 26, "crop": [23, 21]}"#,
            // The same rows for the plain stretch's float planes.
            r#"{"input_size": [23, 21], "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}"#,
        ];
        for json in sidecars {
            let s = Sidecar::from_json(json, "m.json").unwrap();
            let pre = Preprocessor::new(s.clone());
            let want = pre.load(&path).unwrap();
            // The one-pass normalisation is libtorch's, bit for bit.
            assert_eq!(
                bits(&want.input),
                bits(&pre.normalise(&want.image.to_planes().unwrap()).unwrap()),
                "{json}"
            );
            let c = s.channels as i64;
            let [h, w] = s.size_i64();
            // A batch of two in either memory order; the image goes to row 1.
            for channels_last in [false, true] {
                let batch = if channels_last {
                    Tensor::full([2, h, w, c], f64::NAN, (Kind::Float, Device::Cpu))
                        .permute([0, 3, 1, 2])
                } else {
                    Tensor::full([2, c, h, w], f64::NAN, (Kind::Float, Device::Cpu))
                };
                let row = batch.get(1);
                let got = pre.load_into(&path, &row).unwrap();
                assert_eq!(
                    bits(&got.input),
                    bits(&want.input),
                    "{json} {channels_last}"
                );
                assert_eq!(
                    bits(&batch.get(1)),
                    bits(&want.input),
                    "{json} {channels_last}"
                );
                assert_eq!(
                    bits(&got.image.to_planes().unwrap()),
                    bits(&want.image.to_planes().unwrap()),
                    "{json} {channels_last}"
                );
                // Row 0 untouched.
                assert!(bool::try_from(batch.get(0).isnan().all()).unwrap());
            }
            // A destination of another shape is refused.
            let wrong = Tensor::zeros([c, h, w + 1], (Kind::Float, Device::Cpu));
            let e = pre.load_into(&path, &wrong).unwrap_err();
            assert!(matches!(e, Error::Shape { .. }), "{e}");
        }
    }

    /// The byte rows of a CUDA batch: the crop's bytes in the row, and the
    /// batch normalised afterwards (here on the CPU; the GPU runs the same
    /// libtorch operations, checked on CUDA by the engine's tests) equal
    /// `load`'s input bit for bit; a plain recipe has no byte rows.
    #[test]
    fn byte_rows_normalised_in_a_batch_equal_new_inputs_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = photo_png(dir.path());
        for json in [
            r#"{"input_size": [24, 20], "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize": 26, "crop": [24, 20]}"#,
            r#"{"input_size": [24, 20], "channels": 1, "mean": [0.5], "std": [0.25], "resize": 30, "interpolation": "bicubic", "crop": [24, 20]}"#,
        ] {
            let s = Sidecar::from_json(json, "m.json").unwrap();
            let pre = Preprocessor::new(s.clone());
            assert!(pre.has_byte_inputs());
            let want = pre.load(&path).unwrap();
            let c = s.channels as i64;
            let batch = Tensor::full([2, 24, 20, c], 255, (Kind::Uint8, Device::Cpu));
            let got = pre.load_bytes_into(&path, &batch.get(1)).unwrap();
            assert_eq!(
                bits(&got.image.to_planes().unwrap()),
                bits(&want.image.to_planes().unwrap()),
                "{json}"
            );
            let x = pre
                .byte_normaliser(Device::Cpu)
                .unwrap()
                .normalise(&batch)
                .unwrap();
            assert_eq!(x.size(), vec![2, c, 24, 20]);
            assert!(x.is_contiguous());
            assert_eq!(bits(&x.get(1)), bits(&want.input), "{json}");
            // Row 0 untouched: all 255, normalised.
            let white = Tensor::ones([c, 24, 20], (Kind::Float, Device::Cpu));
            assert_eq!(bits(&x.get(0)), bits(&pre.normalise(&white).unwrap()));
            // A float or planar destination is refused.
            for wrong in [
                Tensor::zeros([24, 20, c], (Kind::Float, Device::Cpu)),
                Tensor::zeros([c, 24, 20], (Kind::Uint8, Device::Cpu)),
            ] {
                let e = pre.load_bytes_into(&path, &wrong).unwrap_err();
                assert!(matches!(e, Error::Shape { .. }), "{e}");
            }
        }
        let plain = Preprocessor::new(
            Sidecar::from_json(
                r#"{"input_size": [24, 20], "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}"#,
                "m.json",
            )
            .unwrap(),
        );
        assert!(!plain.has_byte_inputs());
        let row = Tensor::zeros([24, 20, 3], (Kind::Uint8, Device::Cpu));
        let e = plain.load_bytes_into(&path, &row).unwrap_err();
        assert!(matches!(e, Error::Shape { .. }), "{e}");
    }

    #[test]
    fn torchvision_pipeline_pads_keeps_the_original_and_limits_the_resize() {
        let s = Sidecar::from_json(
            r#"{"input_size": [4, 6], "channels": 3, "mean": [0, 0, 0], "std": [1, 1, 1],
                "resize": [2, 2], "crop": [4, 6]}"#,
            "m.json",
        )
        .unwrap();
        let img =
            DynamicImage::ImageRgb8(image::RgbImage::from_pixel(3, 5, image::Rgb([255, 0, 51])));
        let p = Preprocessor::new(s.clone())
            .keep_original(true)
            .prepare_image(img.clone(), "x.png")
            .unwrap();
        assert_eq!(p.input.size(), vec![3, 4, 6]);
        assert_eq!(p.original.as_ref().map(|o| o.dimensions()), Some((3, 5)));
        // The 2 x 2 image sits at rows 1-2, columns 2-3; zeros around it.
        let image = p.image.to_planes().unwrap();
        let r = Vec::<f32>::try_from(&image.get(0).reshape([-1])).unwrap();
        let ones: Vec<usize> = (0..24).filter(|&i| r[i] == 1.0).collect();
        assert_eq!(ones, vec![8, 9, 14, 15]);
        let b = image.get(2).double_value(&[1, 2]);
        assert!((b - 0.2).abs() < 1e-6, "{b}");
        // A resize far past the allocation limit is an image error.
        let big = Sidecar::from_json(
            r#"{"input_size": [4, 4], "channels": 3, "mean": [0, 0, 0], "std": [1, 1, 1],
                "resize": 60000, "crop": [4, 4]}"#,
            "m.json",
        )
        .unwrap();
        let e = Preprocessor::new(big)
            .prepare_image(img, "x.png")
            .unwrap_err();
        assert!(matches!(e, Error::Image { .. }), "{e}");
    }

    /// The normalisation of 8-bit RGB gives the tables' bits, `(v × (1/255)
    /// − mean) / std` in IEEE float32, for every byte value of every
    /// channel, into planes and channels-last (the vector kernels, then the
    /// tables for the last pixels).
    #[test]
    fn normalised_bytes_are_the_tables_bits_for_every_value() {
        let stats = [
            ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
            ([0.0, 0.1234567, -2.5], [1.0 / 3.0, 3e-5, 7.77]),
            (
                [0.48145466, 0.4578275, 0.40821073],
                [0.26862954, 0.2613026, 0.2757771],
            ),
        ];
        // 259 pixels (all 256 values in every channel, shifted per
        // channel, and a tail the tables do).
        let n = 259;
        let bytes: Vec<u8> = (0..3 * n).map(|i| ((i % 3) * 85 + i / 3) as u8).collect();
        for (mean, std) in stats {
            let json = format!(
                r#"{{"input_size": [1, {n}], "channels": 3, "mean": {mean:?}, "std": {std:?}}}"#
            );
            let s = Sidecar::from_json(&json, "m.json").unwrap();
            let want = |ch: usize, v: u8| (f32::from(v) * SCALE_8BIT - s.mean[ch]) / s.std[ch];
            for order in [Order::Planes, Order::Interleaved] {
                let mut out = vec![f32::NAN; 3 * n];
                normalise_bytes(&bytes, 3, order, &mut out, &s);
                for p in 0..n {
                    for ch in 0..3 {
                        let at = match order {
                            Order::Planes => ch * n + p,
                            Order::Interleaved => 3 * p + ch,
                        };
                        let v = bytes[3 * p + ch];
                        assert_eq!(
                            out[at].to_bits(),
                            want(ch, v).to_bits(),
                            "{json} {order:?} channel {ch} byte {v}"
                        );
                    }
                }
            }
        }
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

    /// Bytes on which [`Preprocessor::decode`] panics in this crate's unit
    /// tests, as a decoder with a bug would.
    pub(super) const DECODER_PANIC: &[u8] = b"tch-vis test: the decoder panics";

    #[test]
    fn a_decoders_panic_is_the_files_image_error() {
        let pre = Preprocessor::new(sidecar(3, [8, 8]));
        for result in [
            pre.decode(DECODER_PANIC, "bad.jpg").map(|_| ()),
            pre.prepare_bytes(DECODER_PANIC, "bad.jpg").map(|_| ()),
        ] {
            match result {
                Err(Error::Image { path, reason }) => {
                    assert_eq!(path, Path::new("bad.jpg"));
                    assert_eq!(reason, "the decoder failed: a decoder's bug");
                }
                other => panic!("{other:?}"),
            }
        }
        // The thread decodes on as before.
        let mut png = Vec::new();
        RgbImage::new(5, 4)
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert_eq!(pre.decode(&png, "ok.png").unwrap().width(), 5);
    }

    /// `to_planes` reads each layout's samples directly: the values of the
    /// conversion it replaced (the image crate's 8 or 16-bit RGB, then
    /// `v / 255` or `v / 65535`; float RGB as it is), bit for bit.
    #[test]
    fn planes_of_every_layout_equal_the_rgb_conversion() {
        let (w, h) = (7u32, 5u32);
        let v = |i: u32| (i * 7919 + 13) % 65536;
        let imgs = [
            DynamicImage::ImageLuma8(image::ImageBuffer::from_fn(w, h, |x, y| {
                image::Luma([v(x + w * y) as u8])
            })),
            DynamicImage::ImageLumaA8(image::ImageBuffer::from_fn(w, h, |x, y| {
                image::LumaA([v(x + w * y) as u8, v(x) as u8])
            })),
            DynamicImage::ImageRgba8(image::ImageBuffer::from_fn(w, h, |x, y| {
                image::Rgba([v(x) as u8, v(y + 3) as u8, v(x * y) as u8, 9])
            })),
            DynamicImage::ImageLuma16(image::ImageBuffer::from_fn(w, h, |x, y| {
                image::Luma([v(x + w * y) as u16])
            })),
            DynamicImage::ImageLumaA16(image::ImageBuffer::from_fn(w, h, |x, y| {
                image::LumaA([v(x + w * y) as u16, 3])
            })),
            DynamicImage::ImageRgb16(image::ImageBuffer::from_fn(w, h, |x, y| {
                image::Rgb([v(x) as u16, v(y + 11) as u16, v(x * y + 5) as u16])
            })),
            DynamicImage::ImageRgba16(image::ImageBuffer::from_fn(w, h, |x, y| {
                image::Rgba([v(x + 1) as u16, v(y) as u16, v(x + y) as u16, 0])
            })),
            DynamicImage::ImageRgb32F(image::ImageBuffer::from_fn(w, h, |x, y| {
                image::Rgb([x as f32 / 7.0, y as f32 / 3.0, 0.1])
            })),
        ];
        for img in &imgs {
            let rgb: Vec<f32> = match img.color().bytes_per_pixel() / img.color().channel_count() {
                1 => img
                    .to_rgb8()
                    .into_raw()
                    .into_iter()
                    .map(|v| f32::from(v) / 255.0)
                    .collect(),
                2 => img
                    .to_rgb16()
                    .into_raw()
                    .into_iter()
                    .map(|v| f32::from(v) / 65535.0)
                    .collect(),
                _ => img.to_rgb32f().into_raw(),
            };
            let n = (w * h) as usize;
            for channels in [1, 3] {
                let want: Vec<u32> = if channels == 1 {
                    rgb.chunks_exact(3)
                        .map(|p| (0.299f32 * p[0] + 0.587f32 * p[1] + 0.114f32 * p[2]).to_bits())
                        .collect()
                } else {
                    (0..3)
                        .flat_map(|c| (0..n).map(move |i| (c, i)))
                        .map(|(c, i)| rgb[3 * i + c].to_bits())
                        .collect()
                };
                let got: Vec<u32> = to_planes(img, channels)
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                assert_eq!(got, want, "{:?}, {channels} channels", img.color());
            }
        }
    }

    /// The allocation limit counts a file's bytes (not read past it), the
    /// image as 8-bit RGB (a grey image's three bytes a pixel) and the
    /// float planes of a 16-bit image, not only the decoder's buffers; an
    /// image within them is prepared.
    #[test]
    fn the_limit_counts_the_file_the_rgb_copy_and_float_planes() {
        let dir = std::env::temp_dir().join(format!("tch-vis-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = |img: DynamicImage| {
            let mut b = Vec::new();
            img.write_to(&mut Cursor::new(&mut b), image::ImageFormat::Png)
                .unwrap();
            b
        };
        let limit = 1 << 20;
        let pre = Preprocessor::new(sidecar(3, [8, 8])).limits(4096, limit);
        let reason = |r: Result<Prepared>| match r {
            Err(Error::Image { reason, .. }) => reason,
            other => panic!("{:?}", other.map(|p| p.original_size)),
        };
        // 16-bit grey 400 x 400: 320 KB decoded, 1.9 MB as float planes.
        let gray16 = png(DynamicImage::ImageLuma16(image::ImageBuffer::from_fn(
            400,
            400,
            |x, y| image::Luma([(x * 160 + y) as u16]),
        )));
        let r = reason(pre.prepare_bytes(&gray16, "g16.png"));
        assert!(r.contains("as float planes"), "{r}");
        // 8-bit grey 700 x 700: 490 KB decoded, 1.47 MB as RGB.
        let gray8 = png(DynamicImage::ImageLuma8(image::GrayImage::new(700, 700)));
        let r = reason(pre.prepare_bytes(&gray8, "g8.png"));
        assert!(r.contains("as 8-bit RGB"), "{r}");
        // Within: 16-bit grey 200 x 200 (480 KB of planes), 8-bit grey
        // 500 x 500 (750 KB as RGB).
        let small16 = png(DynamicImage::ImageLuma16(image::ImageBuffer::from_fn(
            200,
            200,
            |x, y| image::Luma([(x * 300 + y) as u16]),
        )));
        assert_eq!(
            pre.prepare_bytes(&small16, "s16.png")
                .unwrap()
                .original_size,
            (200, 200)
        );
        let small8 = png(DynamicImage::ImageLuma8(image::GrayImage::new(500, 500)));
        assert_eq!(
            pre.prepare_bytes(&small8, "s8.png").unwrap().original_size,
            (500, 500)
        );
        // A file over the limit (a small PNG and 2 MB after it) is not read;
        // the same PNG alone is.
        let mut big = small8.clone();
        big.resize(small8.len() + (2 << 20), 0);
        std::fs::write(dir.join("big.png"), &big).unwrap();
        std::fs::write(dir.join("small.png"), &small8).unwrap();
        let r = reason(pre.load(dir.join("big.png")));
        assert!(
            r.starts_with(&format!("the file is {} bytes", big.len())),
            "{r}"
        );
        assert_eq!(
            pre.load(dir.join("small.png")).unwrap().original_size,
            (500, 500)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn decoder_messages_in_plain_words() {
        assert_eq!(
            plain_reason(
                "Format error decoding Png: CRC error: expected 0x1 have 0x2 while decoding ChunkType { type: IDAT, critical: true, private: false, reserved: false, safecopy: false } chunk.".into()
            ),
            "Format error decoding Png: CRC error: expected 0x1 have 0x2 while decoding IDAT chunk."
        );
        assert_eq!(
            plain_reason("TIFF: failed to fill whole buffer".into()),
            "TIFF: the file ends before its image does (truncated data)"
        );
        assert_eq!(plain_reason("Decode Error".into()), "corrupt data");
        assert_eq!(plain_reason("empty file".into()), "empty file");
        // A real truncated PNG, through `decode`.
        let mut png = Vec::new();
        DynamicImage::ImageRgb8(RgbImage::new(64, 64))
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let pre = Preprocessor::new(sidecar(3, [8, 8]));
        for cut in [png.len() / 2, png.len() - 20] {
            let e = pre.decode(&png[..cut], "cut.png").unwrap_err();
            let text = e.to_string();
            assert!(!text.contains("ChunkType {"), "{text}");
            assert!(!text.contains("failed to fill"), "{text}");
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
