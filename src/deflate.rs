//! The heatmap PNGs' compression: RGB rows under PNG's Up filter, in one
//! deflate block with a fixed Huffman code for filtered PNG rows (sent in
//! the block's header, so any inflater reads it), four bytes coded per
//! two table lookups; runs of zeros that fill whole eight-byte groups
//! become matches at distance 1, every other byte a literal.
//!
//! fdeflate's compressor, which made these PNGs before (through the image
//! crate), uses the same code, but also folds the zeros at either edge of
//! a run into it: a branch per byte where runs begin and end, and one
//! table lookup per byte. Measured on 224 × 224 overlays written by
//! `tch-vis saliency`, one thread, against fdeflate 0.3.7's compressor on
//! the same rows (a scratch bench), per image:
//!
//! | overlays | fdeflate | here |
//! |---|---|---|
//! | 150 photo crops, resnet18 saliency maps | 0.25 ms, 126.1 KB | 0.09 ms, 126.0 KB |
//! | the same photos, a flat map | 0.22 ms, 65.8 KB | 0.08 ms, 66.4 KB |
//! | 200 smooth synthetic pictures, resnet18 maps | 0.31 ms, 112.3 KB | 0.09 ms, 112.3 KB |
//! | the same pictures, a flat map | 0.19 ms, 25.6 KB | 0.10 ms, 28.6 KB |
//!
//! The same pixels either way (the module's tests decode them with the
//! image crate and inflate the stream with miniz_oxide).

use std::sync::OnceLock;

use crate::error::{Error, Result};

/// The code's lengths, in bits, of the 286 literal/length symbols (0–255
/// bytes, 256 the block's end, 257–285 match lengths): fdeflate's fixed
/// code for filtered PNG rows (fdeflate 0.3.7, `src/tables.rs`,
/// `HUFFMAN_LENGTHS`; MIT OR Apache-2.0, as tch-vis). Codes fitted to
/// overlays instead were 5–7% smaller on noisy maps but 4–10% larger on
/// smooth ones, and no better on photos under a flat map.
const LENGTHS: [u8; 286] = include!("deflate_lengths.in");

/// The most bits a code of [`LENGTHS`] has: two codes and their lengths fit
/// one `u32` of the pair table.
const MAX_BITS: u8 = 12;

/// The code and what [`encode_rgb_png`] writes with it.
struct Code {
    /// Each symbol's code, bit-reversed as deflate sends it, and length.
    code: [u16; 286],
    len: [u8; 286],
    /// For bytes `a` then `b` (index `a | b << 8`): both codes,
    /// `code[a] | code[b] << len[a]`, in bits 0–26, and their summed length
    /// from bit 27.
    pair: Vec<u32>,
    /// The zlib header and the block's header: whole bytes, then the last
    /// `tail_bits` bits in `tail`.
    head: Vec<u8>,
    tail: u64,
    tail_bits: u32,
    /// [`Code::zeros`]'s bits and their count for runs of up to
    /// [`TABLED_RUN`] zeros (index: the run; at most 30 bits each).
    runs: Vec<(u64, u32)>,
}

/// The longest run of zeros [`Code::runs`] holds: a literal and one match.
const TABLED_RUN: usize = 259;

fn code() -> &'static Code {
    static CODE: OnceLock<Code> = OnceLock::new();
    CODE.get_or_init(|| {
        let len = LENGTHS;
        let code = canonical_codes(&len);
        let mut pair = vec![0u32; 1 << 16];
        for (i, p) in pair.iter_mut().enumerate() {
            let (a, b) = (i & 0xff, i >> 8);
            *p = (u32::from(code[a]) | (u32::from(code[b]) << len[a]))
                | ((u32::from(len[a]) + u32::from(len[b])) << 27);
        }
        let (head, tail, tail_bits) = block_header(&len);
        let mut c = Code {
            code,
            len,
            pair,
            head,
            tail,
            tail_bits,
            runs: Vec::new(),
        };
        c.runs = (0..=TABLED_RUN)
            .map(|run| {
                let mut out = [0u8; 16];
                let mut w = Bits::new(&mut out);
                if run > 0 {
                    c.zeros_coded(&mut w, run);
                }
                let n = 8 * w.pos as u32 + w.n;
                (u64::from_le_bytes(out[..8].try_into().unwrap_or([0; 8])), n)
            })
            .collect();
        c
    })
}

/// Deflate's canonical codes for `lengths` (0: no code), bit-reversed.
fn canonical_codes<const N: usize>(lengths: &[u8; N]) -> [u16; N] {
    let mut codes = [0u16; N];
    let mut next = 0u32;
    for bits in 1..=15u8 {
        for (c, _) in codes.iter_mut().zip(lengths).filter(|(_, &l)| l == bits) {
            *c = (next as u16).reverse_bits() >> (16 - bits);
            next += 1;
        }
        next <<= 1;
    }
    codes
}

/// Lengths of an optimal prefix code of at most `limit` bits for symbols
/// counted `freqs` times (package-merge); 0 for a symbol never counted,
/// and 1 for the only one counted. `limit` must leave room for every
/// symbol counted (2^limit of them at most).
fn limited_lengths(freqs: &[u64], limit: u8) -> Vec<u8> {
    let mut leaves: Vec<(u64, usize)> = freqs
        .iter()
        .enumerate()
        .filter(|(_, &f)| f > 0)
        .map(|(s, &f)| (f, s))
        .collect();
    leaves.sort_unstable();
    let mut lengths = vec![0u8; freqs.len()];
    if leaves.len() == 1 {
        lengths[leaves[0].1] = 1;
    }
    if leaves.len() < 2 {
        return lengths;
    }
    debug_assert!(leaves.len() <= 1 << limit);
    // Items: a weight and the leaves it holds (with repeats).
    let single: Vec<(u64, Vec<usize>)> = leaves.iter().map(|&(f, s)| (f, vec![s])).collect();
    let mut list = single.clone();
    for _ in 1..limit {
        let packages = list.chunks_exact(2).map(|p| {
            let mut held = p[0].1.clone();
            held.extend_from_slice(&p[1].1);
            (p[0].0 + p[1].0, held)
        });
        let mut merged: Vec<(u64, Vec<usize>)> = single.iter().cloned().chain(packages).collect();
        // Stable: leaves before packages of the same weight.
        merged.sort_by_key(|item| item.0);
        list = merged;
    }
    for (_, held) in list.iter().take(2 * leaves.len() - 2) {
        for &s in held {
            lengths[s] += 1;
        }
    }
    lengths
}

/// Bits sent least significant first into a buffer with room for the
/// whole stream and 8 bytes more: each [`Bits::put`] stores eight bytes
/// and moves on by the whole bytes it made.
struct Bits<'a> {
    out: &'a mut [u8],
    pos: usize,
    buf: u64,
    n: u32,
}

impl<'a> Bits<'a> {
    fn new(out: &'a mut [u8]) -> Self {
        Bits {
            out,
            pos: 0,
            buf: 0,
            n: 0,
        }
    }

    /// Sends the low `n` bits of `bits` (`n` at most 56, nothing above
    /// them set).
    #[inline(always)]
    fn put(&mut self, bits: u64, n: u32) {
        debug_assert!(n <= 56 && bits >> n == 0);
        self.buf |= bits << self.n;
        self.n += n;
        let at = &mut self.out[self.pos..self.pos + 8];
        at.copy_from_slice(&self.buf.to_le_bytes());
        // At most 63 bits were held, so at most 7 whole bytes leave.
        let bytes = self.n / 8;
        self.pos += bytes as usize;
        self.buf >>= 8 * bytes;
        self.n %= 8;
    }

    /// The number of bytes sent, the last one padded with zeros.
    fn finish(self) -> usize {
        self.pos + usize::from(self.n > 0)
    }
}

/// The zlib header (deflate, 32 KB window, no dictionary, fastest level)
/// and the header of one final dynamic-Huffman block carrying `lengths`
/// and a distance code of one symbol (distance 1) of one bit: whole bytes,
/// then the leftover bits and their count.
fn block_header(lengths: &[u8; 286]) -> (Vec<u8>, u64, u32) {
    // The order deflate sends the code-length code's lengths in.
    const ORDER: [usize; 19] = [
        16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
    ];
    // The 287 lengths sent (the distance code's 1 last), each as its own
    // code-length symbol.
    let sent: Vec<u8> = lengths.iter().copied().chain([1]).collect();
    let mut counts = [0u64; 19];
    for &l in &sent {
        counts[usize::from(l)] += 1;
    }
    let cl_lengths: [u8; 19] = limited_lengths(&counts, 7).try_into().unwrap_or([0; 19]);
    let cl_codes = canonical_codes(&cl_lengths);
    let hclen = ORDER
        .iter()
        .rposition(|&s| cl_lengths[s] > 0)
        .map_or(4, |last| (last + 1).max(4));
    let mut out = [0u8; 512];
    let mut w = Bits::new(&mut out);
    w.put(0x78, 8);
    w.put(0x01, 8);
    w.put(1, 1); // the final block
    w.put(2, 2); // dynamic Huffman codes
    w.put(286 - 257, 5);
    w.put(0, 5); // one distance code
    w.put(hclen as u64 - 4, 4);
    for &s in &ORDER[..hclen] {
        w.put(u64::from(cl_lengths[s]), 3);
    }
    for &l in &sent {
        let s = usize::from(l);
        w.put(u64::from(cl_codes[s]), u32::from(cl_lengths[s]));
    }
    let (tail, tail_bits, whole) = (w.buf, w.n, w.pos);
    (out[..whole].to_vec(), tail, tail_bits)
}

impl Code {
    #[inline(always)]
    fn literal(&self, w: &mut Bits, b: u8) {
        let s = usize::from(b);
        w.put(u64::from(self.code[s]), u32::from(self.len[s]));
    }

    /// `run` zeros as [`Code::zeros_coded`] codes them, from the table for
    /// runs of up to [`TABLED_RUN`].
    #[inline(always)]
    fn zeros(&self, w: &mut Bits, run: usize) {
        match self.runs.get(run) {
            Some(&(bits, n)) => w.put(bits, n),
            None => self.zeros_coded(w, run),
        }
    }

    /// `run` zeros: a literal zero, then the rest as matches at distance 1
    /// (the distance code's one bit, 0, after each length's extra bits),
    /// or as literals where fewer than 3 are left.
    fn zeros_coded(&self, w: &mut Bits, run: usize) {
        // Match lengths from 3: the symbol, its extra bits and the base.
        const BASE: [u16; 29] = [
            3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99,
            115, 131, 163, 195, 227, 258,
        ];
        const EXTRA: [u8; 29] = [
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
        ];
        self.literal(w, 0);
        let mut left = run - 1;
        while left >= 3 {
            let take = if left > 258 && left - 258 < 3 {
                // Leave at least 3 for the last match.
                left - 3
            } else {
                left.min(258)
            };
            let i = BASE
                .iter()
                .rposition(|&b| usize::from(b) <= take)
                .unwrap_or(0);
            let sym = 257 + i;
            w.put(u64::from(self.code[sym]), u32::from(self.len[sym]));
            let extra = take - usize::from(BASE[i]);
            w.put(extra as u64, u32::from(EXTRA[i]) + 1);
            left -= take;
        }
        for _ in 0..left {
            self.literal(w, 0);
        }
    }

    /// The deflate data of `data` (no headers, no end of block).
    fn data(&self, w: &mut Bits, data: &[u8]) {
        const CODES: u32 = (1 << 27) - 1;
        let mut run = 0;
        let mut groups = data.chunks_exact(8);
        for group in &mut groups {
            let v = u64::from_le_bytes(group.try_into().unwrap_or([0; 8]));
            if v == 0 {
                run += 8;
                continue;
            }
            if run > 0 {
                self.zeros(w, run);
                run = 0;
            }
            let e = [
                self.pair[(v & 0xffff) as usize],
                self.pair[((v >> 16) & 0xffff) as usize],
                self.pair[((v >> 32) & 0xffff) as usize],
                self.pair[(v >> 48) as usize],
            ];
            let l = e.map(|e| e >> 27);
            w.put(
                u64::from(e[0] & CODES) | (u64::from(e[1] & CODES) << l[0]),
                l[0] + l[1],
            );
            w.put(
                u64::from(e[2] & CODES) | (u64::from(e[3] & CODES) << l[2]),
                l[2] + l[3],
            );
        }
        if run > 0 {
            self.zeros(w, run);
        }
        for &b in groups.remainder() {
            self.literal(w, b);
        }
    }
}

/// A PNG of interleaved 8-bit RGB, `width` × `height`: every row under the
/// Up filter, compressed as this module says; `None` where that is larger
/// than storing the rows (as for noise), for the caller to store them.
///
/// # Errors
/// [`Error::Encode`] where `rgb` is not `width × height × 3` bytes or a
/// side is 0.
pub(crate) fn encode_rgb_png(rgb: &[u8], width: u32, height: u32) -> Result<Option<Vec<u8>>> {
    let bad = |reason: String| Error::Encode {
        what: "a heatmap PNG",
        reason,
    };
    let row = width as usize * 3;
    if width == 0 || height == 0 || rgb.len() != row * height as usize {
        return Err(bad(format!(
            "{} bytes of RGB for a {width} x {height} PNG",
            rgb.len()
        )));
    }
    SCRATCH.with(|scratch| {
        let (filtered, stream) = &mut *scratch.borrow_mut();
        let png = compress(rgb, row, width, height, filtered, stream);
        // Buffers of large images (`--overlay original`) are not kept.
        for buffer in [filtered, stream] {
            if buffer.capacity() > KEEP {
                *buffer = Vec::new();
            }
        }
        png
    })
}

/// The most bytes of scratch a thread keeps between images.
const KEEP: usize = 4 << 20;

/// [`encode_rgb_png`] with scratch buffers.
fn compress(
    rgb: &[u8],
    row: usize,
    width: u32,
    height: u32,
    filtered: &mut Vec<u8>,
    stream: &mut Vec<u8>,
) -> Result<Option<Vec<u8>>> {
    // The filtered rows: the filter's type (2, Up), then each byte less
    // the one above it (the first row's, less nothing).
    let size = (row + 1) * height as usize;
    filtered.resize(size, 0);
    let mut above: &[u8] = &[];
    for (f, px) in filtered
        .chunks_exact_mut(row + 1)
        .zip(rgb.chunks_exact(row))
    {
        f[0] = 2;
        if above.is_empty() {
            f[1..].copy_from_slice(px);
        } else {
            for ((f, &v), &a) in f[1..].iter_mut().zip(px).zip(above) {
                *f = v.wrapping_sub(a);
            }
        }
        above = px;
    }
    let c = code();
    // At most MAX_BITS bits a byte, the headers, and the writer's 8.
    let bound = size * usize::from(MAX_BITS) / 8 + c.head.len() + 64;
    if stream.len() < bound {
        stream.resize(bound, 0);
    }
    stream[..c.head.len()].copy_from_slice(&c.head);
    let mut w = Bits::new(stream);
    w.pos = c.head.len();
    w.put(c.tail, c.tail_bits);
    c.data(&mut w, filtered);
    w.put(u64::from(c.code[256]), u32::from(c.len[256]));
    let deflated = w.finish();
    // Stored deflate blocks: 5 bytes each per 65,535, and the zlib
    // frame.
    if deflated + 4 > size + 5 * size.div_ceil(65535) + 6 {
        return Ok(None);
    }
    let mut adler = simd_adler32::Adler32::new();
    adler.write(filtered);
    let mut png = Vec::with_capacity(deflated + 4 + 57);
    png.extend_from_slice(b"\x89PNG\r\n\x1a\n");
    let mut ihdr = [0u8; 13];
    ihdr[..4].copy_from_slice(&width.to_be_bytes());
    ihdr[4..8].copy_from_slice(&height.to_be_bytes());
    ihdr[8] = 8; // bits per sample
    ihdr[9] = 2; // RGB
    chunk(&mut png, b"IHDR", &[&ihdr]);
    let adler = adler.finish().to_be_bytes();
    idat(&mut png, &stream[..deflated], &adler, MAX_CHUNK);
    chunk(&mut png, b"IEND", &[]);
    Ok(Some(png))
}

/// The most data bytes [`encode_rgb_png`] puts in one IDAT chunk (PNG
/// allows up to 2³¹ − 1).
const MAX_CHUNK: usize = 1 << 30;

/// Appends the zlib stream `deflated` then `adler` as IDAT chunks of at
/// most `max` bytes each.
fn idat(png: &mut Vec<u8>, deflated: &[u8], adler: &[u8; 4], max: usize) {
    if deflated.len() + adler.len() <= max {
        chunk(png, b"IDAT", &[deflated, adler]);
        return;
    }
    let whole: Vec<u8> = deflated.iter().chain(adler).copied().collect();
    for part in whole.chunks(max) {
        chunk(png, b"IDAT", &[part]);
    }
}

thread_local! {
    /// Each thread's filtered rows and deflate stream, kept between
    /// images (zeroed only where they grow).
    static SCRATCH: std::cell::RefCell<(Vec<u8>, Vec<u8>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Appends a PNG chunk: length, type, the data (in parts) and CRC.
fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    png.extend_from_slice(&(len as u32).to_be_bytes());
    png.extend_from_slice(kind);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    for part in parts {
        png.extend_from_slice(part);
        crc.update(part);
    }
    png.extend_from_slice(&crc.finalize().to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// The lengths make a complete prefix code within the limits, the
    /// optimal one for small cases.
    #[test]
    fn limited_lengths_are_complete_and_optimal() {
        let kraft = |l: &[u8]| -> f64 {
            l.iter()
                .filter(|&&l| l > 0)
                .map(|&l| 0.5f64.powi(i32::from(l)))
                .sum()
        };
        assert_eq!(limited_lengths(&[1, 1, 2, 4], 15), [3, 3, 2, 1]);
        assert_eq!(limited_lengths(&[1, 1, 2, 4], 2), [2, 2, 2, 2]);
        assert_eq!(limited_lengths(&[0, 5, 0], 7), [0, 1, 0]);
        assert_eq!(limited_lengths(&[0, 5, 0, 3], 7), [0, 1, 0, 1]);
        let fib: Vec<u64> = (0..30)
            .scan((1u64, 1u64), |s, _| {
                *s = (s.1, s.0 + s.1);
                Some(s.0)
            })
            .collect();
        let l = limited_lengths(&fib, 7);
        assert!(l.iter().all(|&l| (1..=7).contains(&l)), "{l:?}");
        assert!((kraft(&l) - 1.0).abs() < 1e-12);
        assert!((kraft(&LENGTHS) - 1.0).abs() < 1e-12);
        assert!(LENGTHS.iter().all(|&l| (1..=MAX_BITS).contains(&l)));
    }

    /// The PNG's IDAT stream, inflated by miniz_oxide (which checks the
    /// Adler-32), is the Up-filtered rows; the PNG decodes to the pixels.
    fn round_trip(rgb: &[u8], width: u32, height: u32) -> Option<usize> {
        let png = encode_rgb_png(rgb, width, height).unwrap()?;
        let img = image::load_from_memory_with_format(&png, image::ImageFormat::Png)
            .unwrap()
            .to_rgb8();
        assert_eq!(img.dimensions(), (width, height));
        assert!(img.as_raw() == rgb, "{width} x {height}");
        let idat_len = u32::from_be_bytes(png[33..37].try_into().unwrap()) as usize;
        assert_eq!(&png[37..41], b"IDAT");
        let mut inflated = Vec::new();
        flate2::read::ZlibDecoder::new(&png[41..41 + idat_len])
            .read_to_end(&mut inflated)
            .unwrap();
        let row = width as usize * 3;
        assert_eq!(inflated.len(), (row + 1) * height as usize);
        for (y, f) in inflated.chunks_exact(row + 1).enumerate() {
            assert_eq!(f[0], 2);
            for (x, &v) in f[1..].iter().enumerate() {
                let above = if y == 0 { 0 } else { rgb[(y - 1) * row + x] };
                assert_eq!(v, rgb[y * row + x].wrapping_sub(above));
            }
        }
        Some(png.len())
    }

    #[test]
    fn pngs_decode_to_their_pixels() {
        // Smooth pictures of many sizes (remainders of the eight-byte
        // groups, one row, one column), with runs of zeros of every length
        // from flat stretches.
        let mut seed = 7u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (seed >> 16) as u8
        };
        for (w, h) in [
            (1, 1),
            (1, 9),
            (9, 1),
            (5, 3),
            (17, 11),
            (224, 224),
            (300, 7),
        ] {
            let n = (w * h * 3) as usize;
            let rgb: Vec<u8> = (0..n)
                .map(|i| {
                    let (x, y) = ((i / 3) as u32 % w, (i / 3) as u32 / w);
                    if (x / 13 + y / 5) % 3 == 0 {
                        40
                    } else {
                        (x * 2 + y + (i as u32 % 3) * 50) as u8 / 4 * 4 + next() % 2
                    }
                })
                .collect();
            // Tiny ones are larger than stored, with the code in the header.
            let size = round_trip(&rgb, w, h);
            assert_eq!(size.is_some(), w * h >= 100, "{w} x {h}: {size:?}");
        }
        let mut spots_224 = Vec::new();
        // Long runs: one colour (matches of 258 and the rests after them);
        // rows that differ only in a few bytes.
        // (1300 x 1100: scratch past what a thread keeps, dropped after.)
        for (w, h) in [(224, 224), (86, 3), (87, 3), (1000, 2), (1300, 1100)] {
            let flat = vec![200u8; (w * h * 3) as usize];
            let size = round_trip(&flat, w, h).unwrap();
            // The first row's literals (up to 12 bits a byte), then a
            // literal group and a run a row: ~1% of the raw bytes.
            assert!(
                size < 400 + 5 * w as usize + flat.len() / 100,
                "{w} x {h}: {size} bytes"
            );
            let mut spots = flat.clone();
            for (i, v) in spots.iter_mut().enumerate().step_by(37) {
                *v = (i % 251) as u8;
            }
            round_trip(&spots, w, h).unwrap();
            if (w, h) == (224, 224) {
                spots_224 = spots;
            }
        }
        SCRATCH.with(|s| {
            let s = s.borrow();
            assert!(s.0.capacity() <= KEEP && s.1.capacity() <= KEEP);
        });
        // Noise is larger compressed than stored: None, for the caller to
        // store it.
        let noise: Vec<u8> = (0..224 * 224 * 3).map(|_| next()).collect();
        assert_eq!(round_trip(&noise, 224, 224), None);
        // A stream split over IDAT chunks of 1,000 bytes reads the same.
        let rgb = &spots_224;
        let one = encode_rgb_png(rgb, 224, 224).unwrap().unwrap();
        let (head, tail) = (&one[..33], &one[one.len() - 12..]);
        let len = u32::from_be_bytes(one[33..37].try_into().unwrap()) as usize;
        let zlib = &one[41..41 + len];
        let mut split = head.to_vec();
        let adler: [u8; 4] = zlib[zlib.len() - 4..].try_into().unwrap();
        idat(&mut split, &zlib[..zlib.len() - 4], &adler, 1000);
        split.extend_from_slice(tail);
        assert!(split.len() > one.len() + 12 * (len / 1000 - 1));
        let img = image::load_from_memory_with_format(&split, image::ImageFormat::Png).unwrap();
        assert!(img.to_rgb8().as_raw() == rgb);
        // Wrong lengths and empty sides are errors.
        for (len, w, h) in [(12, 2, 3), (0, 0, 4), (0, 4, 0)] {
            let e = encode_rgb_png(&vec![0; len], w, h).unwrap_err();
            assert!(matches!(e, Error::Encode { .. }), "{e}");
            assert!(
                e.to_string().starts_with("cannot encode a heatmap PNG: "),
                "{e}"
            );
        }
    }
}
