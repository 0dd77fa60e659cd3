//! libtorch's antialiased resize of 8-bit images (`_upsample_bilinear2d_aa`
//! and `_upsample_bicubic2d_aa` on a CPU `uint8` tensor, what torchvision's
//! `Resize` runs), bit for bit, on interleaved `(H, W, C)` bytes, computing
//! only a window of the output: a centre crop's pixels, nothing else.
//!
//! libtorch's algorithm (`UpSampleKernel.cpp`, PIL's): each axis gets, per
//! output index, a range of input indices and their filter weights, computed
//! in `f64` and normalised to sum 1, then scaled to `i16` at the largest
//! precision `p` under which the axis's largest weight still fits; an output
//! value is `clamp((2^(p−1) + Σ wᵢ·xᵢ) >> p, 0, 255)`, summed in `i32`. The
//! width is resized first, into bytes, then the height. Integer sums do not
//! depend on their order, so any kernel that computes the same weights gives
//! the same bytes; the tests compare against libtorch's operators.

use std::ops::Range;

use crate::preprocess::Interpolation;

/// One axis: for each output index of a window, its first input index and
/// its `i16` weights (`taps` per output, zero past its own count).
#[derive(Debug, Default)]
struct Axis {
    /// What the axis was made for: `(input, output, window, interpolation)`.
    key: Option<(usize, usize, Range<usize>, Interpolation)>,
    first: Vec<usize>,
    count: Vec<usize>,
    weights: Vec<i16>,
    taps: usize,
    precision: u32,
    /// Scratch of [`Axis::set`], kept for the next one.
    kept: Vec<f64>,
    w: Vec<f64>,
    /// When the axis was last used ([`Axes::get`]).
    used: u64,
}

/// The axes a thread made last, reused for images of sizes seen recently:
/// folders of photos mix a few sizes (landscape and portrait of one camera,
/// ImageNet's 500 × 375 and 375 × 500), and remaking an axis cost 1% of a
/// trivial-model saliency run's CPU where sizes changed from image to image.
#[derive(Debug, Default)]
struct Axes {
    list: Vec<Axis>,
    clock: u64,
}

impl Axes {
    /// Axes kept per thread (the least recently used is remade).
    const KEPT: usize = 8;

    /// The index of the axis for these arguments ([`Axis::set`]): one
    /// kept, or the least recently used one remade. The axis just returned
    /// is never remade by the next call.
    fn get(
        &mut self,
        input: usize,
        output: usize,
        window: Range<usize>,
        interpolation: Interpolation,
    ) -> usize {
        self.clock += 1;
        let key = (input, output, window, interpolation);
        let i = match self.list.iter().position(|a| a.key.as_ref() == Some(&key)) {
            Some(i) => i,
            None => {
                let i = if self.list.len() < Self::KEPT {
                    self.list.push(Axis::default());
                    self.list.len() - 1
                } else {
                    (0..self.list.len())
                        .min_by_key(|&i| self.list[i].used)
                        .unwrap_or(0)
                };
                let (input, output, window, interpolation) = key;
                self.list[i].set(input, output, window, interpolation);
                i
            }
        };
        self.list[i].used = self.clock;
        i
    }
}

/// The filter of `interpolation` (libtorch's `aa_filter`: the triangle, or
/// Keys' cubic with `a = −0.5` as PIL has it), in libtorch's operation order.
fn filter(interpolation: Interpolation, x: f64) -> f64 {
    let x = x.abs();
    match interpolation {
        Interpolation::Bilinear => {
            if x < 1.0 {
                1.0 - x
            } else {
                0.0
            }
        }
        Interpolation::Bicubic => {
            let a = -0.5;
            if x < 1.0 {
                ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
            } else {
                0.0
            }
        }
    }
}

impl Axis {
    /// Makes this the axis of `input` values resized to `output` (no
    /// `align_corners`, no scale factor), kept for the outputs in `window`,
    /// as libtorch's `_compute_index_ranges_int16_weights` makes it (the
    /// precision is the whole axis's). Its buffers are reused, and nothing
    /// is computed when it is that axis already (images of one size).
    fn set(
        &mut self,
        input: usize,
        output: usize,
        window: Range<usize>,
        interpolation: Interpolation,
    ) {
        let key = (input, output, window.clone(), interpolation);
        if self.key.as_ref() == Some(&key) {
            return;
        }
        self.key = None;
        let interp_size = match interpolation {
            Interpolation::Bilinear => 2.0,
            Interpolation::Bicubic => 4.0,
        };
        let scale = input as f64 / output as f64;
        let support = if scale >= 1.0 {
            (interp_size * 0.5) * scale
        } else {
            interp_size * 0.5
        };
        let max_taps = support.ceil() as usize * 2 + 1;
        let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
        let mut wt_max = 0.0f64;
        let (first, count, kept, w) = (
            &mut self.first,
            &mut self.count,
            &mut self.kept,
            &mut self.w,
        );
        first.clear();
        count.clear();
        kept.clear();
        w.clear();
        w.resize(max_taps, 0.0);
        for i in 0..output {
            let center = scale * (i as f64 + 0.5);
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xsize = (((center + support + 0.5) as i64).min(input as i64) - xmin)
                .clamp(0, max_taps as i64) as usize;
            let mut total = 0.0;
            for (j, wj) in w.iter_mut().enumerate().take(xsize) {
                *wj = filter(
                    interpolation,
                    ((j as i64 + xmin) as f64 - center + 0.5) * invscale,
                );
                total += *wj;
            }
            if total != 0.0 {
                for wj in &mut w[..xsize] {
                    *wj /= total;
                    wt_max = wt_max.max(*wj);
                }
            }
            if window.contains(&i) {
                first.push(xmin as usize);
                count.push(xsize);
                kept.extend_from_slice(&w[..xsize]);
                kept.extend(std::iter::repeat_n(0.0, max_taps - xsize));
            }
        }
        let mut precision = 0u32;
        while precision < 22 {
            let next = (0.5 + wt_max * f64::from(1u32 << (precision + 1))) as i32;
            if next >= 1 << 15 {
                break;
            }
            precision += 1;
        }
        // Whole groups of four taps, for the vector kernels.
        let taps = max_taps.div_ceil(4) * 4;
        self.weights.clear();
        self.weights.resize(window.len() * taps, 0);
        for (o, row) in kept.chunks(max_taps).enumerate() {
            for (k, &v) in row.iter().enumerate() {
                let v = v * f64::from(1u32 << precision);
                self.weights[o * taps + k] = if v < 0.0 {
                    (-0.5 + v) as i32
                } else {
                    (0.5 + v) as i32
                } as i16;
            }
        }
        self.taps = taps;
        self.precision = precision;
        self.key = Some(key);
    }

    /// The input indices the window's outputs read.
    fn span(&self) -> Range<usize> {
        let lo = self.first.iter().copied().min().unwrap_or(0);
        let hi = (0..self.first.len())
            .map(|o| self.first[o] + self.count[o])
            .max()
            .unwrap_or(0);
        lo..hi.max(lo)
    }

    fn weights(&self, o: usize) -> &[i16] {
        &self.weights[o * self.taps..(o + 1) * self.taps]
    }
}

/// `clamp((2^(p−1) + sum) >> p, 0, 255)`.
fn settle(sum: i32, precision: u32) -> u8 {
    ((sum + (1 << (precision - 1))) >> precision).clamp(0, 255) as u8
}

/// Writes the window `rows` × `cols` of `src` (`(h, w, c)` bytes) resized
/// to `(nh, nw)` as libtorch's antialiased kernels resize it into `out`, as
/// `(rows, cols, c)` bytes. `false` (and nothing written) when the window is
/// not inside the resized image or `out` is not its size.
pub(crate) fn resize_window(
    src: &[u8],
    (h, w, c): (usize, usize, usize),
    (nh, nw): (usize, usize),
    (rows, cols): (Range<usize>, Range<usize>),
    interpolation: Interpolation,
    out: &mut [u8],
) -> bool {
    resize_window_with(
        src,
        (h, w, c),
        (nh, nw),
        (rows, cols),
        interpolation,
        true,
        out,
    )
}

/// [`resize_window`], with the vector kernels where the CPU has them when
/// `simd`, with the scalar ones only otherwise.
fn resize_window_with(
    src: &[u8],
    (h, w, c): (usize, usize, usize),
    (nh, nw): (usize, usize),
    (rows, cols): (Range<usize>, Range<usize>),
    interpolation: Interpolation,
    simd: bool,
    out: &mut [u8],
) -> bool {
    if src.len() != h * w * c
        || h == 0
        || w == 0
        || c == 0
        || rows.end > nh
        || cols.end > nw
        || rows.is_empty()
        || cols.is_empty()
        || out.len() != rows.len() * cols.len() * c
    {
        return false;
    }
    AXES.with_borrow_mut(|axes| {
        let down = (nh != h).then(|| axes.get(h, nh, rows.clone(), interpolation));
        let across = (nw != w).then(|| axes.get(w, nw, cols.clone(), interpolation));
        let down = down.map(|i| &axes.list[i]);
        // The input rows the height's pass reads.
        let span = down.map_or(rows.clone(), Axis::span);
        let stride = cols.len() * c;
        MID.with_borrow_mut(|mid| {
            // The width first, into those rows (or into `out` when the height
            // is kept).
            let to: &mut [u8] = if down.is_some() {
                // Every byte is written below: grown, never cleared.
                let need = span.len() * stride;
                if mid.len() < need {
                    mid.resize(need, 0);
                }
                &mut mid[..need]
            } else {
                out
            };
            match across {
                None => {
                    for (y, row) in span.clone().zip(to.chunks_exact_mut(stride)) {
                        row.copy_from_slice(&src[(y * w + cols.start) * c..(y * w + cols.end) * c]);
                    }
                }
                Some(i) => horizontal(src, w * c, c, span.clone(), &axes.list[i], to, simd),
            }
            if let Some(down) = down {
                vertical(
                    &mid[..span.len() * stride],
                    stride,
                    span.start,
                    down,
                    out,
                    simd,
                );
            }
        });
    });
    true
}

thread_local! {
    /// The width's output, kept between images of a thread.
    static MID: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The axes of a thread's recent images ([`Axes`]).
    static AXES: std::cell::RefCell<Axes> = std::cell::RefCell::new(Default::default());
}

/// The width's pass over `rows` of `src` (rows of `stride` bytes, `c`
/// values a pixel) into `out` (rows of the window's pixels).
fn horizontal(
    src: &[u8],
    stride: usize,
    c: usize,
    rows: Range<usize>,
    axis: &Axis,
    out: &mut [u8],
    simd: bool,
) {
    with_avx2!(
        where simd && c == 3,
        avx2::horizontal_rgb(src, stride, rows, axis, out),
        else horizontal_scalar(src, stride, c, rows, axis, out)
    )
}

fn horizontal_scalar(
    src: &[u8],
    stride: usize,
    c: usize,
    rows: Range<usize>,
    axis: &Axis,
    out: &mut [u8],
) {
    let width = axis.first.len() * c;
    for (y, out) in rows.zip(out.chunks_exact_mut(width)) {
        let row = &src[y * stride..(y + 1) * stride];
        for (o, px) in out.chunks_exact_mut(c).enumerate() {
            let x0 = axis.first[o];
            let w = axis.weights(o);
            for (ch, v) in px.iter_mut().enumerate() {
                let mut sum = 0i32;
                for k in 0..axis.count[o] {
                    sum += i32::from(w[k]) * i32::from(row[(x0 + k) * c + ch]);
                }
                *v = settle(sum, axis.precision);
            }
        }
    }
}

/// The height's pass: `mid` holds rows `mid_first..` of the width's
/// output, `stride` bytes each.
fn vertical(mid: &[u8], stride: usize, mid_first: usize, axis: &Axis, out: &mut [u8], simd: bool) {
    with_avx2!(
        where simd,
        avx2::vertical(mid, stride, mid_first, axis, out),
        else for (o, row) in out.chunks_exact_mut(stride).enumerate() {
            vertical_scalar(mid, stride, mid_first, axis, o, row, 0);
        }
    )
}

/// Bytes `from..` of output row `o`.
fn vertical_scalar(
    mid: &[u8],
    stride: usize,
    mid_first: usize,
    axis: &Axis,
    o: usize,
    row: &mut [u8],
    from: usize,
) {
    let y0 = axis.first[o] - mid_first;
    let w = axis.weights(o);
    for (b, v) in row.iter_mut().enumerate().skip(from) {
        let mut sum = 0i32;
        for k in 0..axis.count[o] {
            sum += i32::from(w[k]) * i32::from(mid[(y0 + k) * stride + b]);
        }
        *v = settle(sum, axis.precision);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::Axis;

    /// The width's pass for RGB, four rows and four outputs at a time
    /// (outputs under 4 wide: the scalar kernel). Two rows share a
    /// register, one in each lane: per output and group of four taps, the
    /// 16 bytes from the group's first pixel, shuffled twice into
    /// `(tap, tap + 1)` pairs per channel widened to `i16` (taps 0–1, then
    /// 2–3), multiplied by the pairs' weights and summed in `i32` (`madd`)
    /// onto the rounding term. Four outputs' sums are then shifted, packed
    /// to bytes and squeezed to 12 bytes of RGB a row. The last four
    /// outputs overlap the group before when the width is not a multiple of
    /// four (those outputs are computed twice, to the same bytes).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn horizontal_rgb(
        src: &[u8],
        stride: usize,
        rows: Range<usize>,
        axis: &Axis,
        out: &mut [u8],
    ) {
        let n = axis.first.len();
        if n < 4 {
            super::horizontal_scalar(src, stride, 3, rows, axis, out);
            return;
        }
        let groups = axis.taps / 4;
        // The weights of each output's groups: (w0, w1) and (w2, w3) as
        // `i16` pairs.
        let mut pairs = Vec::with_capacity(2 * n * groups);
        for o in 0..n {
            let w = axis.weights(o);
            for g in 0..groups {
                for k in [0, 2] {
                    pairs.push(
                        (i32::from(w[4 * g + k]) & 0xffff) | (i32::from(w[4 * g + k + 1]) << 16),
                    );
                }
            }
        }
        // The groups each output reads, and how far past a row's start the
        // last one's 16 bytes reach.
        let used: Vec<usize> = axis.count.iter().map(|&k| k.div_ceil(4).max(1)).collect();
        let reach = (0..n)
            .map(|o| (axis.first[o] + 4 * used[o] - 4) * 3 + 16)
            .max()
            .unwrap_or(0);
        let z = -1i8;
        let taps01 = _mm256_setr_epi8(
            0, z, 3, z, 1, z, 4, z, 2, z, 5, z, z, z, z, z, //
            0, z, 3, z, 1, z, 4, z, 2, z, 5, z, z, z, z, z,
        );
        let taps23 = _mm256_setr_epi8(
            6, z, 9, z, 7, z, 10, z, 8, z, 11, z, z, z, z, z, //
            6, z, 9, z, 7, z, 10, z, 8, z, 11, z, z, z, z, z,
        );
        // Four outputs' [r g b x] bytes to their 12 bytes of RGB, per lane.
        let squeeze = _mm256_setr_epi8(
            0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, z, z, z, z, //
            0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, z, z, z, z,
        );
        let init = _mm256_set1_epi32(1 << (axis.precision - 1));
        let shift = _mm_cvtsi32_si128(axis.precision as i32);
        let width = n * 3;
        assert!(out.len() >= rows.len() * width && pairs.len() == 2 * n * groups);
        // The first output of each group of four.
        let starts: Vec<usize> = (0..n.div_ceil(4)).map(|q| (4 * q).min(n - 4)).collect();
        let (sp, op) = (src.as_ptr(), out.as_mut_ptr());
        let mut y = rows.start;
        while y < rows.end {
            // Up to four rows, none whose reads would pass the image's end.
            let mut block = (rows.end - y).min(4);
            while block > 0 && (y + block - 1) * stride + reach > src.len() {
                block -= 1;
            }
            if block == 0 {
                // The image's last bytes within 16 of a read: one row,
                // checked.
                let o_row = &mut out[(y - rows.start) * width..(y - rows.start + 1) * width];
                super::horizontal_scalar(src, stride, 3, y..y + 1, axis, o_row);
                y += 1;
                continue;
            }
            // Under four rows left: the missing ones read row `y` again and
            // are not stored.
            let mut from = [0; 4];
            for (r, from) in from.iter_mut().enumerate().take(block) {
                *from = r * stride;
            }
            let o_at = op.add((y - rows.start) * width);
            for &o0 in &starts {
                // Each output's sums of rows 0 | 1 and rows 2 | 3.
                let mut per = [[init; 2]; 4];
                for (j, per) in per.iter_mut().enumerate() {
                    let o = o0 + j;
                    let base = sp.add(y * stride + axis.first[o] * 3);
                    let ks = pairs.as_ptr().add(2 * o * groups);
                    let mut acc = [init; 2];
                    for g in 0..*used.get_unchecked(o) {
                        let k01 = _mm256_set1_epi32(*ks.add(2 * g));
                        let k23 = _mm256_set1_epi32(*ks.add(2 * g + 1));
                        let at = base.add(12 * g);
                        for (h, acc) in acc.iter_mut().enumerate() {
                            let px = _mm256_loadu2_m128i(
                                at.add(from[2 * h + 1]).cast(),
                                at.add(from[2 * h]).cast(),
                            );
                            let a = _mm256_madd_epi16(_mm256_shuffle_epi8(px, taps01), k01);
                            let b = _mm256_madd_epi16(_mm256_shuffle_epi8(px, taps23), k23);
                            *acc = _mm256_add_epi32(*acc, _mm256_add_epi32(a, b));
                        }
                    }
                    *per = [
                        _mm256_sra_epi32(acc[0], shift),
                        _mm256_sra_epi32(acc[1], shift),
                    ];
                }
                // (No closure: it would not inherit the target feature.)
                let sums = [
                    [per[0][0], per[1][0], per[2][0], per[3][0]],
                    [per[0][1], per[1][1], per[2][1], per[3][1]],
                ];
                for (h, outs) in sums.iter().enumerate() {
                    // Outputs 0-1 and 2-3 packed to i16, then to bytes:
                    // per lane (one row each), four [r g b x] pixels.
                    let lo = _mm256_packs_epi32(outs[0], outs[1]);
                    let hi = _mm256_packs_epi32(outs[2], outs[3]);
                    let v = _mm256_shuffle_epi8(_mm256_packus_epi16(lo, hi), squeeze);
                    for (lane, r) in [(0, 2 * h), (1, 2 * h + 1)] {
                        if r >= block {
                            continue;
                        }
                        let v = if lane == 0 {
                            _mm256_castsi256_si128(v)
                        } else {
                            _mm256_extracti128_si256::<1>(v)
                        };
                        // 12 bytes: eight, then four (a 16-byte store would
                        // reach past the row's end at the last outputs).
                        let at = o_at.add(r * width + o0 * 3);
                        _mm_storel_epi64(at.cast(), v);
                        at.add(8)
                            .cast::<i32>()
                            .write_unaligned(_mm_extract_epi32::<2>(v));
                    }
                }
            }
            y += block;
        }
    }

    /// The height's pass: 32 bytes of an output row at a time, input rows
    /// taken in pairs, their bytes interleaved and widened to `i16` pairs,
    /// multiplied by the pair's weights and summed in `i32`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn vertical(
        mid: &[u8],
        stride: usize,
        mid_first: usize,
        axis: &Axis,
        out: &mut [u8],
    ) {
        let zero = _mm256_setzero_si256();
        let init = _mm256_set1_epi32(1 << (axis.precision - 1));
        let shift = _mm_cvtsi32_si128(axis.precision as i32);
        let whole = stride / 32 * 32;
        for (o, row) in out.chunks_exact_mut(stride).enumerate() {
            let y0 = axis.first[o] - mid_first;
            let w = axis.weights(o);
            let count = axis.count[o];
            let mut b = 0;
            while b < whole {
                let mut acc = [init; 4];
                let mut k = 0;
                while k < count {
                    let a = _mm256_loadu_si256(mid.as_ptr().add((y0 + k) * stride + b).cast());
                    // An odd last tap pairs with itself, weighted 0.
                    let (next, wn) = if k + 1 < count {
                        (
                            _mm256_loadu_si256(mid.as_ptr().add((y0 + k + 1) * stride + b).cast()),
                            w[k + 1],
                        )
                    } else {
                        (a, 0)
                    };
                    let pair =
                        _mm256_set1_epi32((i32::from(w[k]) & 0xffff) | (i32::from(wn) << 16));
                    let lo = _mm256_unpacklo_epi8(a, next);
                    let hi = _mm256_unpackhi_epi8(a, next);
                    // Bytes 0–3, 4–7, 8–11, 12–15 of each lane, as i16 pairs.
                    let parts = [
                        _mm256_unpacklo_epi8(lo, zero),
                        _mm256_unpackhi_epi8(lo, zero),
                        _mm256_unpacklo_epi8(hi, zero),
                        _mm256_unpackhi_epi8(hi, zero),
                    ];
                    for (acc, part) in acc.iter_mut().zip(parts) {
                        *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(part, pair));
                    }
                    k += 2;
                }
                for acc in &mut acc {
                    *acc = _mm256_sra_epi32(*acc, shift);
                }
                let v = _mm256_packus_epi16(
                    _mm256_packs_epi32(acc[0], acc[1]),
                    _mm256_packs_epi32(acc[2], acc[3]),
                );
                _mm256_storeu_si256(row.as_mut_ptr().add(b).cast(), v);
                b += 32;
            }
            super::vertical_scalar(mid, stride, mid_first, axis, o, row, whole);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    /// libtorch's resize of `(h, w, c)` bytes, cropped to the window.
    fn libtorch(
        src: &[u8],
        (h, w, c): (usize, usize, usize),
        (nh, nw): (usize, usize),
        rows: Range<usize>,
        cols: Range<usize>,
        interpolation: Interpolation,
    ) -> Vec<u8> {
        let x = Tensor::from_slice(src)
            .view([1, h as i64, w as i64, c as i64])
            .permute([0, 3, 1, 2]);
        let size = [nh as i64, nw as i64];
        let y = match interpolation {
            Interpolation::Bilinear => x.internal_upsample_bilinear2d_aa(size, false, None, None),
            Interpolation::Bicubic => x.internal_upsample_bicubic2d_aa(size, false, None, None),
        };
        let y = y
            .narrow(2, rows.start as i64, rows.len() as i64)
            .narrow(3, cols.start as i64, cols.len() as i64)
            .permute([0, 2, 3, 1])
            .contiguous();
        Vec::<u8>::try_from(y.flatten(0, -1)).unwrap()
    }

    /// Random bytes of an `(h, w, c)` image resized by both kernels (vector
    /// and scalar) and by libtorch: asserts the same bytes, returns how many.
    fn compare(
        (h, w, c): (usize, usize, usize),
        (nh, nw): (usize, usize),
        (rows, cols): (Range<usize>, Range<usize>),
        interpolation: Interpolation,
    ) -> usize {
        let n = (h * w * c) as i64;
        let src =
            Vec::<u8>::try_from(Tensor::randint(256, [n], (Kind::Uint8, Device::Cpu))).unwrap();
        let window = (rows.clone(), cols.clone());
        let want = libtorch(&src, (h, w, c), (nh, nw), rows, cols, interpolation);
        for simd in [true, false] {
            let mut got = vec![0; want.len()];
            let done = resize_window_with(
                &src,
                (h, w, c),
                (nh, nw),
                window.clone(),
                interpolation,
                simd,
                &mut got,
            );
            let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert!(
                done && differ == 0,
                "{h}x{w}x{c} -> {nh}x{nw} {window:?} {interpolation:?} simd {simd}: {differ} differ"
            );
        }
        2 * want.len()
    }

    #[test]
    fn windows_of_the_resize_equal_libtorch_bit_for_bit() {
        tch::manual_seed(11);
        let sizes = [
            ((480, 640), (256, 341), (16..240, 58..282)),
            ((640, 480), (341, 256), (58..282, 16..240)),
            ((480, 640), (224, 224), (0..224, 0..224)),
            ((37, 53), (224, 224), (0..224, 0..224)),
            ((300, 7), (256, 6), (3..250, 0..6)),
            ((7, 300), (224, 224), (1..223, 100..101)),
            ((1, 640), (224, 224), (0..224, 0..224)),
            ((333, 1), (17, 3), (0..17, 0..3)),
            ((256, 256), (224, 224), (0..224, 0..224)),
            ((224, 300), (224, 256), (0..224, 16..240)),
            ((300, 224), (256, 224), (16..240, 0..224)),
            ((1000, 999), (41, 1003), (0..41, 500..1003)),
            ((64, 64), (64, 65), (0..64, 0..65)),
        ];
        let mut compared = 0;
        for ((h, w), (nh, nw), (rows, cols)) in sizes {
            for c in [3, 1, 4] {
                for interpolation in [Interpolation::Bilinear, Interpolation::Bicubic] {
                    let window = (rows.clone(), cols.clone());
                    compared += compare((h, w, c), (nh, nw), window, interpolation);
                }
            }
        }
        assert!(compared > 1_000_000);
    }

    #[test]
    fn random_sizes_and_windows_equal_libtorch_bit_for_bit() {
        tch::manual_seed(12);
        let next =
            |n: i64| Tensor::randint(n, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]) as usize;
        for _ in 0..RANDOM_CASES {
            let (h, w) = (1 + next(700), 1 + next(700));
            let (nh, nw) = (1 + next(400), 1 + next(400));
            let (r0, c0) = (next(nh as i64), next(nw as i64));
            let rows = r0..r0 + 1 + next((nh - r0) as i64);
            let cols = c0..c0 + 1 + next((nw - c0) as i64);
            let interpolation = if next(2) == 0 {
                Interpolation::Bilinear
            } else {
                Interpolation::Bicubic
            };
            let c = [1, 3, 3][next(3)];
            compare((h, w, c), (nh, nw), (rows, cols), interpolation);
        }
    }

    const RANDOM_CASES: usize = 40;

    /// The axes kept between a thread's images (`AXES`) are made anew when
    /// the size, the output, the window or the filter changes, and reused
    /// otherwise (each `compare` resizes twice: the second reuses both).
    #[test]
    fn axes_kept_between_images_follow_every_change() {
        tch::manual_seed(13);
        let (bilinear, bicubic) = (Interpolation::Bilinear, Interpolation::Bicubic);
        let sequence = [
            ((480, 640), (256, 341), (16..240, 58..282), bilinear),
            ((480, 640), (256, 341), (16..240, 58..282), bilinear),
            ((480, 640), (256, 341), (0..224, 0..224), bilinear),
            ((480, 641), (256, 341), (0..224, 0..224), bilinear),
            ((480, 641), (256, 341), (0..224, 0..224), bicubic),
            ((481, 641), (256, 341), (0..224, 0..224), bicubic),
            ((481, 641), (257, 341), (0..224, 0..224), bicubic),
            ((481, 641), (257, 342), (0..224, 0..224), bicubic),
            ((480, 640), (256, 341), (16..240, 58..282), bilinear),
        ];
        for ((h, w), size, window, interpolation) in sequence {
            compare((h, w, 3), size, window, interpolation);
        }
    }

    /// More sizes than a thread keeps axes for, in turn, twice: every
    /// remade axis (the least recently used) is right, and so is every
    /// kept one; a square image uses one axis for both sides.
    #[test]
    fn axes_remade_past_the_kept_ones_stay_exact() {
        tch::manual_seed(17);
        let bilinear = Interpolation::Bilinear;
        for _ in 0..2 {
            for k in 0..Axes::KEPT + 3 {
                let (h, w) = (40 + 7 * k, 90 - 5 * k);
                compare((h, w, 3), (24, 24), (0..24, 0..24), bilinear);
            }
            compare((50, 50, 3), (20, 20), (2..18, 2..18), bilinear);
        }
    }

    #[test]
    fn a_window_outside_the_resized_image_writes_nothing() {
        let src = vec![0u8; 10 * 10 * 3];
        let mut out = vec![7u8; 5 * 5 * 3];
        let bilinear = Interpolation::Bilinear;
        // (source size, window): rows past the output, no columns, a source
        // of another size than its bytes, a window of another size than out.
        for (size, window) in [
            ((10, 10, 3), (0..6, 0..5)),
            ((10, 10, 3), (0..5, 2..2)),
            ((10, 9, 3), (0..5, 0..5)),
            ((10, 10, 3), (0..5, 0..4)),
        ] {
            assert!(!resize_window(
                &src,
                size,
                (5, 5),
                window,
                bilinear,
                &mut out
            ));
        }
        assert!(out.iter().all(|&v| v == 7));
        let all = (0..5, 0..5);
        assert!(resize_window(
            &src,
            (10, 10, 3),
            (5, 5),
            all,
            bilinear,
            &mut out
        ));
        assert!(out.iter().all(|&v| v == 0));
    }
}
