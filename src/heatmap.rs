//! Colour maps and heatmap overlays for saliency maps.
//!
//! The colour map is matplotlib's `jet` (the one tf-keras-vis's examples
//! use), as matplotlib evaluates it: a 256-entry table sampled from its
//! piecewise-linear segment data, indexed by `floor(v × 256)`. An overlay
//! blends it over the image: `alpha × jet(m) + (1 − alpha) × image`, rounded
//! to 8-bit RGB, either at the model's input size ([`overlay_png`]) or on the
//! original image at full resolution, the map upsampled bilinearly
//! ([`overlay_original_png`]).

use std::io::Cursor;
use std::sync::OnceLock;

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder, RgbImage};

use crate::error::{Error, Result};
use crate::preprocess::SCALE_8BIT;

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

/// Entries of the colour lookup table, as matplotlib's colour maps.
pub const LUT_SIZE: usize = 256;

impl Colormap {
    /// The colour of `v` (clamped to `[0, 1]`; NaN is 0) as `[0, 1]` RGB,
    /// as matplotlib computes it: entry `floor(v × 256)` (255 for 1) of the
    /// 256-entry table sampled from the segment data.
    pub fn rgb(self, v: f32) -> [f32; 3] {
        self.table()[lut_index(v)]
    }

    /// The exact piecewise-linear colour at `v` in `[0, 1]`.
    fn exact(self, v: f32) -> [f32; 3] {
        match self {
            Colormap::Jet => [
                piecewise(JET_R, v),
                piecewise(JET_G, v),
                piecewise(JET_B, v),
            ],
        }
    }

    /// The 256-entry table: entry `i` is the colour at `i / 255`.
    pub fn table(self) -> &'static [[f32; 3]; LUT_SIZE] {
        static JET: OnceLock<[[f32; 3]; LUT_SIZE]> = OnceLock::new();
        match self {
            Colormap::Jet => JET.get_or_init(|| {
                let mut t = [[0f32; 3]; LUT_SIZE];
                for (i, e) in t.iter_mut().enumerate() {
                    *e = Colormap::Jet.exact(i as f32 / (LUT_SIZE - 1) as f32);
                }
                t
            }),
        }
    }
}

/// matplotlib's table index of `v`: `floor(v × N)` clamped to `[0, N − 1]`,
/// NaN to 0.
#[inline]
fn lut_index(v: f32) -> usize {
    let x = v * LUT_SIZE as f32;
    if x >= (LUT_SIZE - 1) as f32 {
        LUT_SIZE - 1
    } else if x > 0.0 {
        x as usize
    } else {
        0
    }
}

/// A blend table: for each colour-table entry, `alpha × colour × 255` per
/// channel, so a pixel costs a lookup and one multiply-add per channel.
struct Blend {
    /// `alpha × colour` per entry, `[r, g, b, 0]`: 16 bytes an entry, so
    /// the vector kernel loads an entry whole.
    lut: [[f32; 4]; LUT_SIZE],
    keep: f32,
}

impl Blend {
    fn new(cmap: Colormap, alpha: f32) -> Self {
        let mut lut = [[0f32; 4]; LUT_SIZE];
        for (d, s) in lut.iter_mut().zip(cmap.table()) {
            *d = [alpha * s[0], alpha * s[1], alpha * s[2], 0.0];
        }
        Blend {
            lut,
            keep: 1.0 - alpha,
        }
    }

    /// `alpha × colour + (1 − alpha) × px`, px in `[0, 1]`, to 8 bits.
    #[inline]
    fn px(&self, m: f32, px: [f32; 3]) -> [u8; 3] {
        let c = &self.lut[lut_index(m)];
        [
            to_u8(c[0] + self.keep * px[0]),
            to_u8(c[1] + self.keep * px[1]),
            to_u8(c[2] + self.keep * px[2]),
        ]
    }
}

/// A blended value in `[0, 1]` (clamped; NaN is 0) to 8 bits:
/// `(v × 255).round()` without the libm call: for the non-negative values
/// here `floor(x + 0.5)` is the same (the sum is exact except within 2^-25
/// of 0.5).
#[inline(always)]
fn to_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0 + 0.5) as u8
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
    let mut out = Vec::new();
    overlay_into(image, channels, width, height, map, cmap, alpha, &mut out)?;
    Ok(out)
}

/// [`overlay`] into `out` (its contents replaced), so a caller can reuse
/// one buffer for every image.
///
/// # Errors
/// As [`overlay`].
#[allow(clippy::too_many_arguments)]
pub fn overlay_into(
    image: &[f32],
    channels: usize,
    width: usize,
    height: usize,
    map: &[f32],
    cmap: Colormap,
    alpha: f32,
    out: &mut Vec<u8>,
) -> Result<()> {
    let n = overlay_buffer(image.len(), channels, width, height, map.len(), out)?;
    let blend = Blend::new(cmap, alpha);
    if channels == 1 {
        let px = out.chunks_exact_mut(3).zip(map);
        for ((o, &m), &v) in px.zip(image) {
            o.copy_from_slice(&blend.px(m, [v, v, v]));
        }
    } else {
        let (r, gb) = image.split_at(n);
        let (g, b) = gb.split_at(n);
        blend_rgb(&blend, map, [r, g, b], out);
    }
    Ok(())
}

/// The pixels of an overlay of `width × height`, once the image's
/// `values` (planes or bytes) and the map's fit that size and 1 or 3
/// channels; `out` then holds 3 bytes a pixel. The blends write every
/// byte, so only new room is zeroed.
fn overlay_buffer(
    values: usize,
    channels: usize,
    width: usize,
    height: usize,
    map: usize,
    out: &mut Vec<u8>,
) -> Result<usize> {
    let n = width * height;
    if map != n || values != channels * n || !(channels == 1 || channels == 3) {
        return Err(Error::shape(
            "overlay image and map",
            format!(
                "{channels} x {height} x {width} image (C = 1 or 3) and {height} x {width} map"
            ),
            &[values as i64, map as i64],
        ));
    }
    out.truncate(3 * n);
    out.resize(3 * n, 0);
    Ok(n)
}

/// [`overlay_into`] of an image given as interleaved `(height, width, C)`
/// bytes (C = 1 or 3), byte `v` standing for `v × (1/255)` in float32 (as
/// [`crate::preprocess::InputImage::to_planes`] converts them): the same
/// output bytes as [`overlay_into`] of those planes, without making them.
///
/// # Errors
/// As [`overlay`].
#[allow(clippy::too_many_arguments)]
pub fn overlay_bytes_into(
    bytes: &[u8],
    channels: usize,
    width: usize,
    height: usize,
    map: &[f32],
    cmap: Colormap,
    alpha: f32,
    out: &mut Vec<u8>,
) -> Result<()> {
    overlay_buffer(bytes.len(), channels, width, height, map.len(), out)?;
    let blend = Blend::new(cmap, alpha);
    // `(1 − alpha) × v × (1/255)` for every byte value: the product
    // `Blend::px` forms from the planes' value.
    let k = SCALE_8BIT;
    let kept: [f32; 256] = std::array::from_fn(|v| blend.keep * (f32::from(v as u8) * k));
    blend_bytes(&blend, &kept, map, bytes, channels, out);
    Ok(())
}

/// [`overlay_bytes_into`] encoded as a PNG, as [`overlay_png`].
///
/// # Errors
/// As [`overlay_png`].
pub fn overlay_bytes_png(
    bytes: &[u8],
    channels: usize,
    width: usize,
    height: usize,
    map: &[f32],
) -> Result<Vec<u8>> {
    overlay_bytes_png_as(bytes, channels, width, height, map, PngCompression::Fast)
}

/// [`overlay_bytes_png`] compressed as `compression` says.
pub(crate) fn overlay_bytes_png_as(
    bytes: &[u8],
    channels: usize,
    width: usize,
    height: usize,
    map: &[f32],
    compression: PngCompression,
) -> Result<Vec<u8>> {
    with_blend_buffer(|rgb| {
        overlay_bytes_into(bytes, channels, width, height, map, Colormap::Jet, 0.5, rgb)?;
        encode_png_as(rgb, side(width), side(height), compression)
    })
}

/// Runs `f` with the thread's buffer for blended pixels, kept between
/// calls: a writer thread blends an image into the previous image's
/// buffer instead of zeroing a new one (150 KB at 224²).
fn with_blend_buffer<T>(f: impl FnOnce(&mut Vec<u8>) -> Result<T>) -> Result<T> {
    thread_local! {
        static RGB: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let mut rgb = RGB.with_borrow_mut(std::mem::take);
    let out = f(&mut rgb);
    RGB.with_borrow_mut(|kept| *kept = rgb);
    out
}

/// A side of an image as the PNG encoder takes it.
fn side(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// The blend of [`overlay_bytes_into`] (lengths checked by it), compiled
/// for AVX2 where the CPU has it.
fn blend_bytes(
    blend: &Blend,
    kept: &[f32; 256],
    map: &[f32],
    bytes: &[u8],
    c: usize,
    out: &mut [u8],
) {
    with_avx2!(
        blend_bytes_avx2(blend, kept, map, bytes, c, out),
        else blend_bytes_generic(blend, kept, map, bytes, c, out)
    )
}

/// The table-independent AVX2 parts of the blends, eight pixels at a time:
/// the colour-table indices of `lut_index` and the interleaved RGB store.
#[cfg(target_arch = "x86_64")]
struct Pixels8 {
    scale: std::arch::x86_64::__m256,
    top_f: std::arch::x86_64::__m256,
    top_i: std::arch::x86_64::__m256i,
    zero: std::arch::x86_64::__m256,
    interleave: std::arch::x86_64::__m256i,
}

#[cfg(target_arch = "x86_64")]
impl Pixels8 {
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn new() -> Self {
        use std::arch::x86_64::*;
        let z = -1i8;
        Pixels8 {
            scale: _mm256_set1_ps(LUT_SIZE as f32),
            top_f: _mm256_set1_ps((LUT_SIZE - 1) as f32),
            top_i: _mm256_set1_epi32((LUT_SIZE - 1) as i32),
            zero: _mm256_setzero_ps(),
            // Per 128-bit half [r0-3 g0-3 b0-3 b0-3] to 12 bytes of RGB.
            interleave: _mm256_setr_epi8(
                0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11, z, z, z, z, 0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7,
                11, z, z, z, z,
            ),
        }
    }

    /// `lut_index` of eight map values at `map` (x >= 255 → 255; x > 0 →
    /// trunc(x); else, NaN too, 0).
    ///
    /// # Safety
    /// The CPU must support AVX2; `map` points at eight values.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn indices(&self, map: *const f32) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        let x = _mm256_mul_ps(_mm256_loadu_ps(map), self.scale);
        let at_top = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(x, self.top_f));
        let positive = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(x, self.zero));
        let idx = _mm256_and_si256(_mm256_cvttps_epi32(x), positive);
        _mm256_blendv_epi8(idx, self.top_i, at_top)
    }

    /// Eight pixels' channel values (each in `0..=255`) packed to bytes
    /// (nothing saturates), then one shuffle per 128-bit half: 12 bytes of
    /// RGB at the start of each half.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn interleaved(
        &self,
        [r, g, b]: [std::arch::x86_64::__m256i; 3],
    ) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        let rg = _mm256_packus_epi32(r, g);
        let bb = _mm256_packus_epi32(b, b);
        _mm256_shuffle_epi8(_mm256_packus_epi16(rg, bb), self.interleave)
    }

    /// Eight pixels' channel values (each in `0..=255`) as 24 bytes of
    /// interleaved RGB ([`Pixels8::interleaved`]) at the start of `out`.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn store(&self, q: [std::arch::x86_64::__m256i; 3], out: &mut [u8]) {
        use std::arch::x86_64::*;
        let rgb = self.interleaved(q);
        let mut px = [0u8; 32];
        _mm256_storeu_si256(px.as_mut_ptr().cast(), rgb);
        out[..12].copy_from_slice(&px[..12]);
        out[12..24].copy_from_slice(&px[16..28]);
    }

    /// [`Pixels8::store`] into the first 24 bytes of `out`, which the
    /// caller writes on from byte 24 afterwards (the pixels after these):
    /// where `out` has 32 bytes, the 24 bytes are made contiguous in the
    /// register and stored whole with 8 bytes of no meaning after them,
    /// instead of going through memory twice.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn store_ahead(&self, q: [std::arch::x86_64::__m256i; 3], out: &mut [u8]) {
        use std::arch::x86_64::*;
        if out.len() < 32 {
            self.store(q, out);
            return;
        }
        // Dwords 0-2 (pixels 0-3) and 4-6 (pixels 4-7) side by side.
        let packed = _mm256_permutevar8x32_epi32(
            self.interleaved(q),
            _mm256_setr_epi32(0, 1, 2, 4, 5, 6, 7, 7),
        );
        _mm256_storeu_si256(out.as_mut_ptr().cast(), packed);
    }
}

/// The AVX2 arithmetic both blends share, eight pixels at a time: the
/// colours of the map values ([`Pixels8`] indices into the blend's
/// table), the blend of a colour and a pixel value to `0..=255`; the same
/// IEEE operations in the same order (no FMA) as [`Blend::px`].
#[cfg(target_arch = "x86_64")]
struct Lanes {
    lut: *const f32,
    px: Pixels8,
    zero: std::arch::x86_64::__m256,
    one: std::arch::x86_64::__m256,
    keep: std::arch::x86_64::__m256,
    c255: std::arch::x86_64::__m256,
    half: std::arch::x86_64::__m256,
}

#[cfg(target_arch = "x86_64")]
impl Lanes {
    /// # Safety
    /// The CPU must support AVX2; `blend` outlives the lanes (they keep a
    /// pointer to its table).
    #[target_feature(enable = "avx2")]
    unsafe fn new(blend: &Blend) -> Self {
        use std::arch::x86_64::*;
        Lanes {
            lut: blend.lut.as_ptr().cast::<f32>(),
            px: Pixels8::new(),
            zero: _mm256_setzero_ps(),
            one: _mm256_set1_ps(1.0),
            keep: _mm256_set1_ps(blend.keep),
            c255: _mm256_set1_ps(255.0),
            half: _mm256_set1_ps(0.5),
        }
    }

    /// The colours of eight map values at `map`, channel by channel: their
    /// [`Pixels8::indices`], then the table's entries ([`entries`]).
    ///
    /// # Safety
    /// The CPU must support AVX2; `map` points at eight values.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn colours(&self, map: *const f32) -> [std::arch::x86_64::__m256; 3] {
        entries(self.lut, self.px.indices(map))
    }

    /// `clamp(colour + keep × px, 0, 1) × 255 + 0.5`, truncated. (max_ps
    /// returns its second operand, 0, for a NaN, which gives 0 as `NaN as
    /// u8` does.)
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn blend(
        &self,
        colour: std::arch::x86_64::__m256,
        px: std::arch::x86_64::__m256,
    ) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        let v = _mm256_add_ps(colour, _mm256_mul_ps(self.keep, px));
        let v = _mm256_min_ps(_mm256_max_ps(v, self.zero), self.one);
        _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(v, self.c255), self.half))
    }
}

/// The first three values of the eight 16-byte entries of `table` at
/// indices `idx` (each below 256, the table's length), channel by channel:
/// the entries loaded whole, two per register, and transposed (this CPU
/// family's gathers cost more than eight loads and seven shuffles). The
/// values are moved as bits: a table of integers works the same.
///
/// # Safety
/// The CPU must support AVX2; `table` holds 256 entries of 4 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn entries(
    table: *const f32,
    idx: std::arch::x86_64::__m256i,
) -> [std::arch::x86_64::__m256; 3] {
    use std::arch::x86_64::*;
    let mut at = [0i32; 8];
    _mm256_storeu_si256(at.as_mut_ptr().cast(), _mm256_slli_epi32::<2>(idx));
    // (No closures here: they would not inherit AVX2.)
    let a0 = _mm256_loadu2_m128(table.add(at[4] as usize), table.add(at[0] as usize));
    let a1 = _mm256_loadu2_m128(table.add(at[5] as usize), table.add(at[1] as usize));
    let a2 = _mm256_loadu2_m128(table.add(at[6] as usize), table.add(at[2] as usize));
    let a3 = _mm256_loadu2_m128(table.add(at[7] as usize), table.add(at[3] as usize));
    // Pixels k and k + 4 in one register: [r g b 0 | r g b 0].
    let rg01 = _mm256_unpacklo_ps(a0, a1); // r0 r1 g0 g1 | r4 r5 g4 g5
    let rg23 = _mm256_unpacklo_ps(a2, a3);
    let b01 = _mm256_unpackhi_ps(a0, a1); // b0 b1 0 0 | b4 b5 0 0
    let b23 = _mm256_unpackhi_ps(a2, a3);
    [
        _mm256_shuffle_ps::<0x44>(rg01, rg23),
        _mm256_shuffle_ps::<0xee>(rg01, rg23),
        _mm256_shuffle_ps::<0x44>(b01, b23),
    ]
}

/// The channels of the eight RGB pixels at `src` (24 bytes), each as eight
/// `i32`: the first 16 bytes and the last 8 loaded, each channel's bytes
/// picked out of both by two byte shuffles, then widened.
///
/// # Safety
/// The CPU must support AVX2; `src` points at 24 readable bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn channels8(src: *const u8) -> [std::arch::x86_64::__m256i; 3] {
    use std::arch::x86_64::*;
    const Z: i8 = -1;
    // From the first 16 bytes (pixels 0-4 and part of 5), and the last 8.
    const FROM_LO: [[i8; 16]; 3] = [
        [0, 3, 6, 9, 12, 15, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z],
        [1, 4, 7, 10, 13, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z],
        [2, 5, 8, 11, 14, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z, Z],
    ];
    const FROM_HI: [[i8; 16]; 3] = [
        [Z, Z, Z, Z, Z, Z, 2, 5, Z, Z, Z, Z, Z, Z, Z, Z],
        [Z, Z, Z, Z, Z, 0, 3, 6, Z, Z, Z, Z, Z, Z, Z, Z],
        [Z, Z, Z, Z, Z, 1, 4, 7, Z, Z, Z, Z, Z, Z, Z, Z],
    ];
    let lo = _mm_loadu_si128(src.cast());
    let hi = _mm_loadl_epi64(src.add(16).cast());
    let mut out = [_mm256_setzero_si256(); 3];
    for (ch, out) in out.iter_mut().enumerate() {
        let v8 = _mm_or_si128(
            _mm_shuffle_epi8(lo, _mm_loadu_si128(FROM_LO[ch].as_ptr().cast())),
            _mm_shuffle_epi8(hi, _mm_loadu_si128(FROM_HI[ch].as_ptr().cast())),
        );
        *out = _mm256_cvtepu8_epi32(v8);
    }
    out
}

/// [`blend_bytes_generic`] eight RGB pixels at a time with AVX2
/// intrinsics: the colours and the blend of [`Lanes`], each channel's
/// eight bytes picked out of the pixels' 24 by two byte shuffles, then
/// `keep × (v × (1/255))`, the two products of the `kept` table, and the
/// same add, clamp, scale and truncation (no FMA), so the bytes are the
/// scalar loop's. Gray images, and the last `n % 8` pixels, take the
/// scalar loop.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn blend_bytes_avx2(
    blend: &Blend,
    kept: &[f32; 256],
    map: &[f32],
    bytes: &[u8],
    c: usize,
    out: &mut [u8],
) {
    use std::arch::x86_64::*;
    let n = map.len().min(out.len() / 3).min(bytes.len() / c.max(1));
    if c != 3 {
        blend_bytes_generic(blend, kept, map, bytes, c, out);
        return;
    }
    let body = n - n % 8;
    let lanes = Lanes::new(blend);
    let k = _mm256_set1_ps(SCALE_8BIT);
    let mut i = 0;
    while i < body {
        // SAFETY (loads): i + 8 <= n, so the map's 8 values and the 24
        // bytes at 3i are within their slices.
        let colours = lanes.colours(map.as_ptr().add(i));
        let px = channels8(bytes.as_ptr().add(3 * i));
        let mut q = [_mm256_setzero_si256(); 3];
        for (ch, q) in q.iter_mut().enumerate() {
            let v = _mm256_mul_ps(_mm256_cvtepi32_ps(px[ch]), k);
            *q = lanes.blend(colours[ch], v);
        }
        // The pixels after these are written next (the last `n % 8` by
        // the loop below).
        lanes.px.store_ahead(q, &mut out[3 * i..3 * n]);
        i += 8;
    }
    blend_bytes_generic(
        blend,
        kept,
        &map[body..n],
        &bytes[3 * body..3 * n],
        3,
        &mut out[3 * body..3 * n],
    );
}

#[inline(always)]
fn blend_bytes_generic(
    blend: &Blend,
    kept: &[f32; 256],
    map: &[f32],
    bytes: &[u8],
    c: usize,
    out: &mut [u8],
) {
    let px = out.chunks_exact_mut(3).zip(map);
    if c == 3 {
        for ((o, &m), v) in px.zip(bytes.chunks_exact(3)) {
            let col = &blend.lut[lut_index(m)];
            o[0] = to_u8(col[0] + kept[usize::from(v[0])]);
            o[1] = to_u8(col[1] + kept[usize::from(v[1])]);
            o[2] = to_u8(col[2] + kept[usize::from(v[2])]);
        }
    } else {
        for ((o, &m), &v) in px.zip(bytes) {
            let col = &blend.lut[lut_index(m)];
            let g = kept[usize::from(v)];
            o[0] = to_u8(col[0] + g);
            o[1] = to_u8(col[1] + g);
            o[2] = to_u8(col[2] + g);
        }
    }
}

/// The RGB case of [`overlay_into`]: the same arithmetic, compiled for
/// AVX2 where the CPU has it (the crate's baseline is SSE2), which lets the
/// compiler vectorise the lookups and conversions. No FMA: Rust never fuses
/// `a * b + c`, so the bytes are those of the baseline build.
fn blend_rgb(blend: &Blend, map: &[f32], planes: [&[f32]; 3], out: &mut [u8]) {
    with_avx2!(
        blend_rgb_avx2(blend, map, planes, out),
        else blend_rgb_generic(blend, map, planes, out)
    )
}

/// The pixels a blend covers: as many as the map, every plane and the
/// output all hold.
#[inline(always)]
fn pixels(map: &[f32], [r, g, b]: [&[f32]; 3], out: &[u8]) -> usize {
    map.len()
        .min(r.len())
        .min(g.len())
        .min(b.len())
        .min(out.len() / 3)
}

/// [`blend_rgb_generic`] eight pixels at a time with AVX2 intrinsics: the
/// table index as `lut_index` computes it, the three colours read from
/// the table ([`Lanes::colours`]), then the same multiply, add, clamp,
/// scale and truncation, one IEEE operation each in the same order (no
/// FMA), so the bytes are the scalar loop's. The last `n % 8` pixels take the scalar loop.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn blend_rgb_avx2(blend: &Blend, map: &[f32], planes: [&[f32]; 3], out: &mut [u8]) {
    use std::arch::x86_64::*;
    let [r, g, b] = planes;
    let n = pixels(map, planes, out);
    let body = n - n % 8;
    let lanes = Lanes::new(blend);
    let mut i = 0;
    while i < body {
        // SAFETY (loads): i + 8 <= n, within every slice.
        let colours = lanes.colours(map.as_ptr().add(i));
        let mut q = [_mm256_setzero_si256(); 3];
        for (c, plane) in [r, g, b].iter().enumerate() {
            q[c] = lanes.blend(colours[c], _mm256_loadu_ps(plane.as_ptr().add(i)));
        }
        lanes.px.store_ahead(q, &mut out[3 * i..3 * n]);
        i += 8;
    }
    blend_rgb_generic(
        blend,
        &map[body..n],
        [&r[body..n], &g[body..n], &b[body..n]],
        &mut out[3 * body..3 * n],
    );
}

#[inline(always)]
fn blend_rgb_generic(blend: &Blend, map: &[f32], planes: [&[f32]; 3], out: &mut [u8]) {
    let n = pixels(map, planes, out);
    let [r, g, b] = planes;
    let (map, r, g, b) = (&map[..n], &r[..n], &g[..n], &b[..n]);
    let out = &mut out[..3 * n];
    for i in 0..n {
        let px = blend.px(map[i], [r[i], g[i], b[i]]);
        out[3 * i] = px[0];
        out[3 * i + 1] = px[1];
        out[3 * i + 2] = px[2];
    }
}

/// For [`encode_png_with`]: the image crate's compression closest to
/// [`encode_png`]'s, fdeflate's fast mode (same code, same sizes;
/// [`encode_png`] has its own writer, 2–3× faster: see
/// [`PngCompression::Fast`]). Measured on 200 heatmap overlays of photos
/// at 224 × 224 (one core, `examples/profile_stages.rs`): 0.33 ms and
/// 25.8 KB per image, against 0.97 ms / 32.8 KB for zlib level 1, 6.3 ms /
/// 24.0 KB for the default level and 0.04 ms / 151 KB uncompressed.
pub const PNG_COMPRESSION: CompressionType = CompressionType::Fast;

/// The PNG filter of [`encode_png`] (and for [`encode_png_with`]): Up on
/// every row. On the same overlays (`examples/profile_stages.rs`, three
/// runs of its sweep): 0.16 ms and 28.4 KB per image, against 0.18–0.20 ms
/// and 19.2 KB for Paeth (the filter until 2026-11-28), 0.20–0.24 ms /
/// 32.8 KB for Sub and 0.33–0.38 ms / 17.9 KB for adaptive filtering
/// (which tries every filter on every row). In whole trivial-model saliency runs (5,000
/// images, 2 cores, four alternating runs each) Up took 2% less CPU than
/// Paeth (6.26 s against 6.39 s) for 1.8% more images/s; its 9 KB more
/// per PNG are 4% more bytes beside the map's 196 KB `.npy`.
pub const PNG_FILTER: FilterType = FilterType::Up;

/// How heatmap PNGs are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum PngCompression {
    /// The Up filter ([`PNG_FILTER`]) and fdeflate's fixed Huffman code for
    /// filtered rows, four bytes per two table lookups, zeros in runs of
    /// whole eight-byte groups coded as matches: 66–126 KB per 224 × 224
    /// overlay of a photo (as fdeflate's fast mode, [`PNG_COMPRESSION`],
    /// makes them) in 0.08–0.09 ms instead of 0.22–0.25; 26–29 KB for
    /// smooth pictures under a flat map (3 KB more than fdeflate). Where
    /// that would be larger than storing the rows (noise), they are
    /// stored.
    #[default]
    Fast,
    /// Stored, unfiltered: ~151 KB per 224 × 224 overlay, and no time spent
    /// compressing (0.04 ms against 0.08–0.10 per image; a trivial-model
    /// saliency run on 2 cores took 1.7% less CPU, 1.5% more images/s, 10%
    /// and 12% when `Fast` was fdeflate's fast mode).
    None,
}

impl std::str::FromStr for PngCompression {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fast" => Ok(PngCompression::Fast),
            "none" => Ok(PngCompression::None),
            _ => Err(Error::InvalidValue {
                what: "PNG compression (fast or none)",
                value: s.to_string(),
            }),
        }
    }
}

/// Encodes interleaved 8-bit RGB as a PNG compressed as `compression` says.
///
/// # Errors
/// [`Error::Encode`] when encoding fails (for example a wrong length).
pub fn encode_png_as(
    rgb: &[u8],
    width: u32,
    height: u32,
    compression: PngCompression,
) -> Result<Vec<u8>> {
    match compression {
        PngCompression::Fast => encode_png(rgb, width, height),
        PngCompression::None => encode_png_with(
            rgb,
            width,
            height,
            CompressionType::Uncompressed,
            FilterType::NoFilter,
        ),
    }
}

/// Encodes interleaved 8-bit RGB as a PNG as [`PngCompression::Fast`]
/// says.
///
/// # Errors
/// [`Error::Encode`] when encoding fails (for example a wrong length).
pub fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
    match crate::deflate::encode_rgb_png(rgb, width, height)? {
        Some(png) => Ok(png),
        // Larger compressed than stored (noise).
        None => encode_png_as(rgb, width, height, PngCompression::None),
    }
}

/// Encodes interleaved 8-bit RGB as a PNG with the given compression and
/// filter.
///
/// # Errors
/// [`Error::Encode`] when encoding fails (for example a wrong length).
pub fn encode_png_with(
    rgb: &[u8],
    width: u32,
    height: u32,
    compression: CompressionType,
    filter: FilterType,
) -> Result<Vec<u8>> {
    // Up filtering plus fast deflate lands near a fifth of the raw size on
    // photo overlays (28 of 151 KB at 224²): a third is reserved, so the
    // buffer rarely regrows. Stored, every byte is there, with a filter
    // byte per row and a few bytes per 64 KB block.
    let reserve = if compression == CompressionType::Uncompressed {
        rgb.len() + height as usize + rgb.len() / 8192 + 1024
    } else {
        rgb.len() / 3 + 1024
    };
    let mut bytes = Vec::with_capacity(reserve);
    PngEncoder::new_with_quality(Cursor::new(&mut bytes), compression, filter)
        .write_image(rgb, width, height, ExtendedColorType::Rgb8)
        .map_err(|e| Error::Encode {
            what: "a heatmap PNG",
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
    overlay_png_as(image, channels, width, height, map, PngCompression::Fast)
}

/// [`overlay_png`] from tensors as the library gives them: `image` a
/// `(C, H, W)` picture in `[0, 1]` (C = 1 or 3; an image result's
/// [`crate::preprocess::InputImage::to_planes`]), `map` an `(H, W)` (or
/// `(1, H, W)`) map in `[0, 1]` (a saliency map, a CAM), of any float kind,
/// on any device.
///
/// ```no_run
/// use tch::Device;
/// use tch_vis::preprocess::{Preprocessor, Sidecar};
/// use tch_vis::saliency::Saliency;
/// use tch_vis::scores::{PredictedScore, Score};
/// use tch_vis::{heatmap, Model};
/// # fn main() -> tch_vis::Result<()> {
/// let model = Model::load("models/digits_rgb.pt", Device::Cpu)?;
/// let pre = Preprocessor::new(Sidecar::for_model("models/digits_rgb.pt")?);
/// let x = pre.load("examples/images/rgb/1/heldout_0093.png")?;
/// let predicted = PredictedScore::new();
/// let maps = Saliency::new(&model).compute(&[x.input.f_unsqueeze(0)?], &[&predicted as &dyn Score])?;
/// let png = heatmap::overlay_tensor_png(&x.image.to_planes()?, &maps.maps[0].f_get(0)?)?;
/// std::fs::write("heldout_0093.saliency.png", png).unwrap();
/// # Ok(()) }
/// ```
///
/// # Errors
/// [`Error::Shape`] when `image` is not `(C, H, W)` or `map` does not
/// match its `H × W`; [`Error::Torch`] if a tensor cannot be read;
/// [`Error::Encode`] as [`overlay_png`].
pub fn overlay_tensor_png(image: &tch::Tensor, map: &tch::Tensor) -> Result<Vec<u8>> {
    let size = image.size();
    let &[c, h, w] = size.as_slice() else {
        return Err(Error::shape("overlay image", "(C, H, W)", &size));
    };
    let msize = map.size();
    if !(msize == [h, w] || msize == [1, h, w]) {
        return Err(Error::shape(
            "overlay map",
            format!("({h}, {w}) to match the image"),
            &msize,
        ));
    }
    let values = |t: &tch::Tensor| -> Result<Vec<f32>> {
        let t = t
            .f_to_device(tch::Device::Cpu)?
            .f_to_kind(tch::Kind::Float)?
            .f_contiguous()?
            .f_view([-1])?;
        Ok(Vec::<f32>::try_from(&t)?)
    };
    let (c, h, w) = (c as usize, h as usize, w as usize);
    overlay_png(&values(image)?, c, w, h, &values(map)?)
}

/// [`overlay_png`] compressed as `compression` says.
pub(crate) fn overlay_png_as(
    image: &[f32],
    channels: usize,
    width: usize,
    height: usize,
    map: &[f32],
    compression: PngCompression,
) -> Result<Vec<u8>> {
    with_blend_buffer(|rgb| {
        overlay_into(image, channels, width, height, map, Colormap::Jet, 0.5, rgb)?;
        encode_png_as(rgb, side(width), side(height), compression)
    })
}

/// Where a map lies on the original image, in the original's pixel units
/// (edges, not centres): the whole image, or the window a centre crop kept
/// (see [`crate::preprocess::Preprocessor::map_region`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MapRegion {
    /// Left edge.
    pub x0: f64,
    /// Top edge.
    pub y0: f64,
    /// Right edge.
    pub x1: f64,
    /// Bottom edge.
    pub y1: f64,
}

impl MapRegion {
    /// The whole of a `width × height` image.
    pub fn whole(width: u32, height: u32) -> Self {
        MapRegion {
            x0: 0.0,
            y0: 0.0,
            x1: f64::from(width),
            y1: f64::from(height),
        }
    }
}

/// Bilinear sampling positions along one axis: for each of `out` pixels of
/// the original, the two map indices and the weight of the second, or `None`
/// outside the region. Pixel centres map as `align_corners = false` does.
fn axis_taps(out: usize, lo: f64, hi: f64, n: usize) -> Vec<Option<(usize, usize, f32)>> {
    let span = hi - lo;
    (0..out)
        .map(|i| {
            let c = i as f64 + 0.5;
            if n == 0 || span <= 0.0 || c < lo || c >= hi {
                return None;
            }
            let u = ((c - lo) / span * n as f64 - 0.5).clamp(0.0, (n - 1) as f64);
            let i0 = u.floor() as usize;
            let i1 = (i0 + 1).min(n - 1);
            Some((i0, i1, (u - i0 as f64) as f32))
        })
        .collect()
}

/// Upsamples `map` (`height × width`) bilinearly onto the pixels of an
/// `out_width × out_height` image where it covers `region`, blends it
/// coloured with `cmap` over `original` (`alpha × colour + (1 − alpha) ×
/// pixel`), and leaves the pixels outside the region as they are.
///
/// # Errors
/// [`Error::Shape`] when `map` does not hold `width × height` values or the
/// original image is empty.
pub fn overlay_original(
    original: &RgbImage,
    map: &[f32],
    width: usize,
    height: usize,
    region: MapRegion,
    cmap: Colormap,
    alpha: f32,
) -> Result<RgbImage> {
    overlay_original_with(original, map, (width, height), region, cmap, alpha, true)
}

/// [`overlay_original`], with the vector kernel where the CPU has it when
/// `simd`, with the scalar loop only otherwise.
fn overlay_original_with(
    original: &RgbImage,
    map: &[f32],
    (width, height): (usize, usize),
    region: MapRegion,
    cmap: Colormap,
    alpha: f32,
    simd: bool,
) -> Result<RgbImage> {
    let (ow, oh) = original.dimensions();
    if map.len() != width * height || width == 0 || height == 0 || ow == 0 || oh == 0 {
        return Err(Error::shape(
            "overlay map and original image",
            format!("a non-empty {height} x {width} map and a non-empty image"),
            &[map.len() as i64, i64::from(oh), i64::from(ow)],
        ));
    }
    let xs = axis_taps(ow as usize, region.x0, region.x1, width);
    let ys = axis_taps(oh as usize, region.y0, region.y1, height);
    // Fixed point, 8 fractional bits: the colour part `alpha × colour × 255`
    // per table entry and the image part `(1 − alpha) × v` per byte value,
    // so a pixel is two lookups, an add and a shift per channel (within one
    // step of the float blend of `overlay`).
    let alpha = alpha.clamp(0.0, 1.0);
    // `[r, g, b, 0]`: 16 bytes an entry, for the vector kernel.
    let mut colour = [[0u32; 4]; LUT_SIZE];
    for (d, c) in colour.iter_mut().zip(cmap.table()) {
        let [r, g, b] = c.map(|v| (alpha * v * 255.0 * 256.0).round() as u32);
        *d = [r, g, b, 0];
    }
    let mut keep = [0u32; 256];
    for (v, k) in keep.iter_mut().enumerate() {
        *k = ((1.0 - alpha) * v as f32 * 256.0).round() as u32;
    }
    let mut out = original.clone();
    // The columns the map covers: one run (pixel centres inside the
    // region), their taps.
    let first = xs.iter().position(Option::is_some).unwrap_or(0);
    let taps: Vec<(usize, usize, f32)> = xs[first..].iter().map_while(|t| *t).collect();
    let vector = simd.then(|| OverlayLanes::new(&keep, alpha)).flatten();
    let row_len = 3 * ow as usize;
    let mut row = vec![0f32; width];
    let mut values = vec![0f32; taps.len()];
    for (y, line) in out.chunks_exact_mut(row_len).enumerate() {
        let Some((y0, y1, wy)) = ys[y] else { continue };
        // The map row at this height, interpolated once per output row,
        // then at each column of the run.
        let (a, b) = (&map[y0 * width..][..width], &map[y1 * width..][..width]);
        for ((r, &a), &b) in row.iter_mut().zip(a).zip(b) {
            *r = a + (b - a) * wy;
        }
        for (m, &(x0, x1, wx)) in values.iter_mut().zip(&taps) {
            *m = row[x0] + (row[x1] - row[x0]) * wx;
        }
        let line = &mut line[3 * first..3 * (first + taps.len())];
        let done = vector
            .as_ref()
            .map_or(0, |v| v.blend(&colour, &values, line));
        for (px, &m) in line[3 * done..].chunks_exact_mut(3).zip(&values[done..]) {
            let c = &colour[lut_index(m)];
            for (p, c) in px.iter_mut().zip(c) {
                *p = ((c + keep[usize::from(*p)] + 128) >> 8).min(255) as u8;
            }
        }
    }
    Ok(out)
}

/// The vector kernel of [`overlay_original`] (AVX2), when the CPU has it
/// and its arithmetic gives the scalar tables: the colour part read from
/// the 16-byte `[r, g, b, 0]` entries, the image part
/// `round((1 − alpha) × v × 256)` computed in float (checked against the
/// table for all 256 byte values when made).
struct OverlayLanes {
    #[cfg(target_arch = "x86_64")]
    px: Pixels8,
    keep: f32,
}

impl OverlayLanes {
    fn new(keep: &[u32; 256], alpha: f32) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            if !std::arch::is_x86_feature_detected!("avx2") {
                return None;
            }
            let k = 1.0 - alpha;
            // The kernel's `trunc(k × v × 256 + 0.5)` (the same IEEE
            // operations): for these non-negative values, `round`.
            let exact = keep
                .iter()
                .enumerate()
                .all(|(v, &want)| (k * v as f32 * 256.0 + 0.5) as u32 == want);
            // SAFETY: AVX2 is available (checked above).
            exact.then(|| OverlayLanes {
                px: unsafe { Pixels8::new() },
                keep: k,
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (keep, alpha);
            None
        }
    }

    /// Blends the first multiple of eight pixels of `line` (RGB bytes, one
    /// pixel per value of `values`) in place with `colour`'s entries;
    /// returns how many.
    fn blend(&self, colour: &[[u32; 4]; LUT_SIZE], values: &[f32], line: &mut [u8]) -> usize {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: the CPU has AVX2 (`new` checked it).
            unsafe { self.blend_avx2(colour, values, line) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (colour, values, line);
            0
        }
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn blend_avx2(
        &self,
        colour: &[[u32; 4]; LUT_SIZE],
        values: &[f32],
        line: &mut [u8],
    ) -> usize {
        use std::arch::x86_64::*;
        let n = values.len().min(line.len() / 3);
        let body = n - n % 8;
        let k = _mm256_set1_ps(self.keep);
        let (c256, half) = (_mm256_set1_ps(256.0), _mm256_set1_ps(0.5));
        let (round, top) = (_mm256_set1_epi32(128), _mm256_set1_epi32(255));
        let table = colour.as_ptr().cast::<f32>();
        let mut i = 0;
        while i < body {
            // SAFETY (loads): i + 8 <= n: eight values, 24 bytes.
            let colours = entries(table, self.px.indices(values.as_ptr().add(i)));
            let px = channels8(line.as_ptr().add(3 * i));
            let mut q = [_mm256_setzero_si256(); 3];
            for (ch, q) in q.iter_mut().enumerate() {
                let f = _mm256_cvtepi32_ps(px[ch]);
                let keep = _mm256_cvttps_epi32(_mm256_add_ps(
                    _mm256_mul_ps(_mm256_mul_ps(k, f), c256),
                    half,
                ));
                let sum = _mm256_add_epi32(_mm256_castps_si256(colours[ch]), keep);
                *q = _mm256_min_epu32(_mm256_srli_epi32::<8>(_mm256_add_epi32(sum, round)), top);
            }
            self.px.store(q, &mut line[3 * i..3 * i + 24]);
            i += 8;
        }
        body
    }
}

/// [`overlay_original`] over the whole image with jet at alpha 0.5, as a
/// PNG: the map of an image drawn on the image at its full resolution.
///
/// # Errors
/// As [`overlay_original`] and [`encode_png`].
pub fn overlay_original_png(
    original: &RgbImage,
    map: &[f32],
    width: usize,
    height: usize,
) -> Result<Vec<u8>> {
    let (ow, oh) = original.dimensions();
    overlay_original_region_png(original, map, width, height, MapRegion::whole(ow, oh))
}

/// [`overlay_original_png`] for a map that covers `region` of the original
/// (a centre crop), as given by
/// [`crate::preprocess::Preprocessor::map_region`].
///
/// # Errors
/// As [`overlay_original`] and [`encode_png`].
pub fn overlay_original_region_png(
    original: &RgbImage,
    map: &[f32],
    width: usize,
    height: usize,
    region: MapRegion,
) -> Result<Vec<u8>> {
    overlay_original_region_png_as(original, map, width, height, region, PngCompression::Fast)
}

/// [`overlay_original_region_png`] compressed as `compression` says.
pub(crate) fn overlay_original_region_png_as(
    original: &RgbImage,
    map: &[f32],
    width: usize,
    height: usize,
    region: MapRegion,
    compression: PngCompression,
) -> Result<Vec<u8>> {
    let rgb = overlay_original(original, map, width, height, region, Colormap::Jet, 0.5)?;
    encode_png_as(rgb.as_raw(), rgb.width(), rgb.height(), compression)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tensor form makes the slices' PNG, from `(C, H, W)` and `(H, W)`
    /// or `(1, H, W)` in other kinds, and names a shape that does not fit.
    #[test]
    fn overlays_from_tensors_equal_overlays_from_slices() {
        use tch::{Kind, Tensor};
        let (c, h, w) = (3usize, 5usize, 7usize);
        let image: Vec<f32> = (0..c * h * w).map(|i| (i % 17) as f32 / 16.0).collect();
        let map: Vec<f32> = (0..h * w).map(|i| (i % 11) as f32 / 10.0).collect();
        let want = overlay_png(&image, c, w, h, &map).unwrap();
        let t_image = Tensor::from_slice(&image).view([c as i64, h as i64, w as i64]);
        let t_map = Tensor::from_slice(&map).view([h as i64, w as i64]);
        assert_eq!(overlay_tensor_png(&t_image, &t_map).unwrap(), want);
        assert_eq!(
            overlay_tensor_png(&t_image.to_kind(Kind::Double), &t_map.unsqueeze(0)).unwrap(),
            want
        );
        for (image, map) in [
            (t_image.view([-1]), t_map.shallow_clone()),
            (t_image.shallow_clone(), t_map.transpose(0, 1)),
        ] {
            let e = overlay_tensor_png(&image, &map).unwrap_err();
            assert!(matches!(e, Error::Shape { .. }), "{e}");
        }
    }

    /// The dispatched RGB blend (AVX2 where the CPU has it) writes the bytes
    /// of the baseline loop and of the per-pixel formula, values outside
    /// [0, 1] and NaN included.
    #[test]
    fn rgb_blend_paths_agree_byte_for_byte() {
        let n = 4099;
        let f = |i: usize, k: f32| (i as f32 * k).sin() * 0.7 + 0.5;
        let mut map: Vec<f32> = (0..n).map(|i| f(i, 0.37)).collect();
        // Every edge of the table index and of the clamp, in each of the
        // eight lanes and in the scalar tail.
        let edges = [
            f32::NAN,
            -3.0,
            7.0,
            0.0,
            -0.0,
            1.0,
            255.0 / 256.0,
            254.999 / 256.0,
            1.0 / 256.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN_POSITIVE,
        ];
        for (k, &e) in edges.iter().enumerate() {
            map[7 + 9 * k] = e;
            map[n - 1 - k] = e;
        }
        let mut planes: Vec<Vec<f32>> = [0.11f32, 0.23, 0.05]
            .iter()
            .map(|&k| (0..n).map(|i| f(i, k)).collect())
            .collect();
        for (c, plane) in planes.iter_mut().enumerate() {
            for (k, &e) in edges.iter().enumerate() {
                plane[200 + 11 * k + c] = e;
            }
        }
        let blend = Blend::new(Colormap::Jet, 0.4);
        let refs = [&planes[0][..], &planes[1][..], &planes[2][..]];
        let mut dispatched = vec![0u8; 3 * n];
        blend_rgb(&blend, &map, refs, &mut dispatched);
        let mut generic = vec![0u8; 3 * n];
        blend_rgb_generic(&blend, &map, refs, &mut generic);
        assert_eq!(dispatched, generic);
        for i in 0..n {
            let want = blend.px(map[i], [planes[0][i], planes[1][i], planes[2][i]]);
            assert_eq!(&dispatched[3 * i..3 * i + 3], &want[..], "pixel {i}");
        }
        // Into a longer buffer, for a tail of 3 pixels and of none: the same
        // bytes, and nothing written past the last pixel (the vector loop
        // stores 8 bytes ahead of its pixels).
        for m in [n, n - 3] {
            let refs = [&planes[0][..m], &planes[1][..m], &planes[2][..m]];
            let mut longer = vec![0xabu8; 3 * m + 16];
            blend_rgb(&blend, &map[..m], refs, &mut longer);
            assert_eq!(&longer[..3 * m], &dispatched[..3 * m]);
            assert!(longer[3 * m..].iter().all(|&b| b == 0xab), "{m} pixels");
            let bytes: Vec<u8> = (0..3 * m).map(|i| (i * 7 % 256) as u8).collect();
            let kept: [f32; 256] =
                std::array::from_fn(|v| blend.keep * (f32::from(v as u8) * SCALE_8BIT));
            let mut want = vec![0u8; 3 * m];
            blend_bytes_generic(&blend, &kept, &map[..m], &bytes, 3, &mut want);
            let mut longer = vec![0xabu8; 3 * m + 16];
            blend_bytes(&blend, &kept, &map[..m], &bytes, 3, &mut longer);
            assert_eq!(&longer[..3 * m], &want[..], "{m} pixels from bytes");
            assert!(
                longer[3 * m..].iter().all(|&b| b == 0xab),
                "{m} pixels from bytes"
            );
        }
    }

    /// Overlays from an image's bytes are those from its `[0, 1]` planes
    /// (`v × (1/255)` in float32), byte for byte, in colour and in gray,
    /// every byte value and every edge of the map included; wrong lengths
    /// are shape errors.
    #[test]
    fn byte_overlays_equal_plane_overlays() {
        let (w, h) = (67, 31);
        let n = w * h;
        let k = (1.0f64 / 255.0) as f32;
        let mut map: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.37).sin() + 1.0) / 2.0)
            .collect();
        for (j, e) in [f32::NAN, -1.0, 2.0, 0.0, 1.0, 255.0 / 256.0]
            .into_iter()
            .enumerate()
        {
            map[5 + 13 * j] = e;
        }
        for c in [1, 3] {
            let bytes: Vec<u8> = (0..n * c).map(|i| (i * 7 % 256) as u8).collect();
            let mut planes = vec![0f32; n * c];
            for (i, &v) in bytes.iter().enumerate() {
                planes[(i % c) * n + i / c] = f32::from(v) * k;
            }
            let mut want = Vec::new();
            overlay_into(&planes, c, w, h, &map, Colormap::Jet, 0.4, &mut want).unwrap();
            let mut got = vec![9u8; 5];
            overlay_bytes_into(&bytes, c, w, h, &map, Colormap::Jet, 0.4, &mut got).unwrap();
            assert_eq!(got, want, "{c} channels");
            // A reused buffer, longer and full of other bytes.
            for mut used in [vec![0xa5u8; 3 * n], vec![0x5au8; 3 * n + 7]] {
                overlay_bytes_into(&bytes, c, w, h, &map, Colormap::Jet, 0.4, &mut used).unwrap();
                assert_eq!(used, want, "{c} channels, a used buffer");
                overlay_into(&planes, c, w, h, &map, Colormap::Jet, 0.4, &mut used).unwrap();
                assert_eq!(used, want, "{c} channels, planes, a used buffer");
            }
            let mut generic = vec![0u8; 3 * n];
            let blend = Blend::new(Colormap::Jet, 0.4);
            let kept: [f32; 256] = std::array::from_fn(|v| blend.keep * (f32::from(v as u8) * k));
            blend_bytes_generic(&blend, &kept, &map, &bytes, c, &mut generic);
            assert_eq!(generic, want, "{c} channels, baseline loop");
            assert_eq!(
                overlay_bytes_png(&bytes, c, w, h, &map).unwrap(),
                overlay_png(&planes, c, w, h, &map).unwrap()
            );
            let short =
                overlay_bytes_into(&bytes[1..], c, w, h, &map, Colormap::Jet, 0.4, &mut got);
            assert!(matches!(short, Err(Error::Shape { .. })), "{short:?}");
        }
    }

    #[test]
    fn jet_matches_matplotlib() {
        let jet = Colormap::Jet;
        assert_eq!(jet.rgb(0.0), [0.0, 0.0, 0.5]);
        assert_eq!(jet.rgb(1.0), [0.5, 0.0, 0.0]);
        // matplotlib 3.11: cm.jet(0.5) = (0.4901960784313725, 1.0,
        // 0.4775458570524984), cm.jet(0.25) = (0.0, 0.503921568627451, 1.0):
        // entries 128 and 64 of its 256-entry table.
        let close = |a: [f32; 3], b: [f64; 3]| {
            a.iter()
                .zip(b)
                .all(|(x, y)| (f64::from(*x) - y).abs() < 1e-6)
        };
        assert!(close(
            jet.rgb(0.5),
            [0.4901960784313725, 1.0, 0.4775458570524984]
        ));
        assert!(close(jet.rgb(0.25), [0.0, 0.503921568627451, 1.0]));
        assert_eq!(jet.rgb(0.999), jet.rgb(1.0));
        assert_eq!(jet.rgb(f32::NAN), jet.rgb(0.0));
        assert_eq!(jet.rgb(7.0), jet.rgb(1.0));
        assert_eq!(jet.rgb(-1.0), jet.rgb(0.0));
    }

    #[test]
    fn overlay_original_upsamples_the_map_and_keeps_outside_pixels() {
        let original = RgbImage::from_pixel(8, 4, image::Rgb([255, 255, 255]));
        // A 1 x 2 map: 0 on the left, 1 on the right.
        let out = overlay_original(
            &original,
            &[0.0, 1.0],
            2,
            1,
            MapRegion::whole(8, 4),
            Colormap::Jet,
            0.5,
        )
        .unwrap();
        // Columns 0-1 are clamped to the left value, 6-7 to the right one.
        assert_eq!(out.get_pixel(0, 0).0, [128, 128, 191]);
        assert_eq!(out.get_pixel(7, 3).0, [191, 128, 128]);
        // Column 3: centre 3.5 -> map x = 3.5 / 8 * 2 - 0.5 = 0.375.
        let m = 0.375f32;
        let c = Colormap::Jet.rgb(m);
        let want = c.map(|v| ((0.5 * v + 0.5) * 255.0).round() as u8);
        assert_eq!(out.get_pixel(3, 1).0, want);
        // A region covering the middle half: the outer columns are untouched.
        let region = MapRegion {
            x0: 2.0,
            y0: 0.0,
            x1: 6.0,
            y1: 4.0,
        };
        let out =
            overlay_original(&original, &[0.0, 1.0], 2, 1, region, Colormap::Jet, 0.5).unwrap();
        assert_eq!(out.get_pixel(1, 0).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(6, 0).0, [255, 255, 255]);
        assert_eq!(out.get_pixel(2, 0).0, [128, 128, 191]);
        assert!(overlay_original(&original, &[0.0], 2, 1, region, Colormap::Jet, 0.5).is_err());
        let png = overlay_original_png(&original, &[0.2, 0.8], 2, 1).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }

    /// The vector kernel of the overlay on the original writes the scalar
    /// loop's bytes: a map with values outside [0, 1] and NaN, regions
    /// cutting the image at odd columns, alphas whose image part the
    /// kernel computes (and 0.3, whatever path it takes).
    #[test]
    fn overlay_original_paths_agree_byte_for_byte() {
        let (ow, oh) = (203u32, 37u32);
        let original = RgbImage::from_fn(ow, oh, |x, y| {
            image::Rgb([(x * 7 + y) as u8, (x ^ (3 * y)) as u8, (x * y + 11) as u8])
        });
        let (w, h) = (13, 5);
        let mut map: Vec<f32> = (0..w * h)
            .map(|i| (i as f32 * 0.61).sin() * 0.8 + 0.5)
            .collect();
        map[3] = f32::NAN;
        map[17] = -2.0;
        map[30] = 4.0;
        map[44] = 1.0;
        let regions = [
            MapRegion::whole(ow, oh),
            MapRegion {
                x0: 10.3,
                y0: 2.0,
                x1: 190.7,
                y1: 35.5,
            },
            MapRegion {
                x0: 5.0,
                y0: 0.0,
                x1: 11.0,
                y1: 37.0,
            },
        ];
        for region in regions {
            for alpha in [0.5, 0.3, 0.0, 1.0, 0.77] {
                let run = |simd| {
                    overlay_original_with(
                        &original,
                        &map,
                        (w, h),
                        region,
                        Colormap::Jet,
                        alpha,
                        simd,
                    )
                    .unwrap()
                };
                let (vector, scalar) = (run(true), run(false));
                let differ = vector
                    .as_raw()
                    .iter()
                    .zip(scalar.as_raw())
                    .filter(|(a, b)| a != b)
                    .count();
                assert_eq!(differ, 0, "{region:?} alpha {alpha}");
            }
        }
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
