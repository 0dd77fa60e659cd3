//! Image layouts the `image` crate refuses or decodes unlike PIL, read as
//! PIL reads them.
//!
//! TIFF, through the `tiff` crate:
//! - palette images (1, 2, 4 or 8 bits per index): each index through the
//!   file's colour map, whose 16-bit entries PIL keeps the high byte of;
//! - grey with alpha (8 or 16 bits): the grey kept, the alpha dropped by
//!   the conversion to RGB as for PNG's grey with alpha;
//! - 8-bit CMYK: PIL's conversion to RGB (`cmyk2rgb`, as for CMYK JPEGs);
//! - JPEG-compressed 8-bit RGB (components `R`, `G`, `B`, as libtiff and
//!   PIL write them) and grey: each strip or tile by libjpeg, as libtiff
//!   decodes them for PIL.
//!
//! Every other TIFF goes to the `image` crate as before.
//!
//! BMP: 16-bit pixels (5-6-5 and 5-5-5, the layouts PIL reads) widened to
//! 8 bits as PIL widens them, `v × 255 / max` truncated (the `image` crate
//! rounds).

use std::io::Cursor;

use image::{DynamicImage, GrayAlphaImage, ImageBuffer, LumaA, RgbImage};
use tiff::decoder::{Decoder, DecodingResult, Limits};
use tiff::tags::{PhotometricInterpretation, PlanarConfiguration, Tag};
use tiff::ColorType;

use crate::preprocess::Preprocessor;

/// The first image of a TIFF whose layout this module decodes, or `None`
/// for the `image` crate to decode (or refuse) it. Images over `pre`'s
/// limits are errors.
pub(crate) fn tiff(pre: &Preprocessor, bytes: &[u8]) -> Result<Option<DynamicImage>, String> {
    let limits = || {
        let mut l = Limits::default();
        let cap = usize::try_from(pre.max_alloc()).unwrap_or(usize::MAX);
        l.decoding_buffer_size = cap;
        l.intermediate_buffer_size = l.intermediate_buffer_size.min(cap);
        l
    };
    // Not a TIFF the `tiff` crate opens: the `image` crate says why.
    let Ok(mut decoder) = Decoder::new(Cursor::new(bytes)) else {
        return Ok(None);
    };
    decoder = decoder.with_limits(limits());
    let tag = |d: &mut Decoder<_>, t| d.find_tag_unsigned::<u32>(t).ok().flatten();
    let photometric = tag(&mut decoder, Tag::PhotometricInterpretation);
    let samples = tag(&mut decoder, Tag::SamplesPerPixel).unwrap_or(1);
    let planar = tag(&mut decoder, Tag::PlanarConfiguration)
        .is_some_and(|p| p == PlanarConfiguration::Planar.to_u16() as u32);
    let compression = tag(&mut decoder, Tag::Compression).unwrap_or(1);
    if compression == 7 {
        // JPEG-compressed strips or tiles of RGB or grey, as libtiff (and
        // so PIL) decodes them: each a JPEG of its own, its tables from the
        // JPEGTables tag, through libjpeg.
        let rgb = PhotometricInterpretation::RGB.to_u16() as u32;
        let grey = PhotometricInterpretation::BlackIsZero.to_u16() as u32;
        let channels = match (photometric, samples) {
            (Some(p), 3) if p == rgb => 3,
            (Some(p), 1) if p == grey => 1,
            _ => return Ok(None),
        };
        if planar || bits_per_sample(&mut decoder) != 8 {
            return Ok(None);
        }
        return jpeg_chunks(pre, &mut decoder, bytes, channels);
    }
    let kind = match (photometric, samples) {
        (Some(p), 1) if p == PhotometricInterpretation::RGBPalette.to_u16() as u32 => Kind::Palette,
        (Some(p), 2) if p == PhotometricInterpretation::BlackIsZero.to_u16() as u32 => {
            Kind::GreyAlpha
        }
        (Some(p), 4) if p == PhotometricInterpretation::CMYK.to_u16() as u32 => Kind::Cmyk,
        _ => return Ok(None),
    };
    if planar && samples > 1 {
        return Ok(None);
    }
    let (w, h) = checked_size(pre, &mut decoder)?;
    let (w_us, h_us) = (w as usize, h as usize);
    match kind {
        Kind::Palette => {
            let bits = bits_per_sample(&mut decoder);
            if !matches!(bits, 1 | 2 | 4 | 8) {
                return Err(format!("palette TIFF with {bits} bits per index"));
            }
            let map = decoder
                .get_tag_u16_vec(Tag::ColorMap)
                .map_err(|e| format!("palette TIFF without a usable colour map: {e}"))?;
            let entries = 1usize << bits;
            if map.len() != 3 * entries {
                return Err(format!(
                    "the colour map has {} values, {} expected for {bits}-bit indices",
                    map.len(),
                    3 * entries
                ));
            }
            // The indices, read as grey of the same depth from a copy whose
            // photometric interpretation says so.
            let mut grey = bytes.to_vec();
            set_photometric_grey(&mut grey).ok_or("cannot read the TIFF's first directory")?;
            let mut d = Decoder::new(Cursor::new(&grey[..]))
                .map_err(tiff_error)?
                .with_limits(limits());
            let DecodingResult::U8(packed) = d.read_image().map_err(tiff_error)? else {
                return Err("palette indices are not bytes".into());
            };
            let row = (w_us * bits as usize).div_ceil(8);
            if packed.len() < row * h_us {
                return Err("palette TIFF with fewer indices than pixels".into());
            }
            let mut rgb = vec![0u8; w_us * h_us * 3];
            let per_byte = 8 / bits as usize;
            let mask = (1u16 << bits) - 1;
            for (y, out) in rgb.chunks_exact_mut(w_us * 3).enumerate() {
                let src = &packed[y * row..(y + 1) * row];
                for (x, px) in out.chunks_exact_mut(3).enumerate() {
                    let byte = u16::from(src[x / per_byte]);
                    let shift = 8 - bits as usize * (x % per_byte + 1);
                    let i = usize::from((byte >> shift) & mask);
                    for (c, v) in px.iter_mut().enumerate() {
                        *v = (map[c * entries + i] >> 8) as u8;
                    }
                }
            }
            Ok(Some(DynamicImage::ImageRgb8(
                RgbImage::from_raw(w, h, rgb).ok_or("palette TIFF buffer")?,
            )))
        }
        Kind::GreyAlpha => {
            let n = w_us * h_us * 2;
            match decoder.read_image().map_err(tiff_error)? {
                DecodingResult::U8(v) if v.len() >= n && bits_per_sample(&mut decoder) == 8 => {
                    let img = GrayAlphaImage::from_raw(w, h, v[..n].to_vec());
                    Ok(Some(DynamicImage::ImageLumaA8(
                        img.ok_or("grey and alpha TIFF buffer")?,
                    )))
                }
                DecodingResult::U16(v) if v.len() >= n => {
                    let img: Option<ImageBuffer<LumaA<u16>, Vec<u16>>> =
                        ImageBuffer::from_raw(w, h, v[..n].to_vec());
                    Ok(Some(DynamicImage::ImageLumaA16(
                        img.ok_or("grey and alpha TIFF buffer")?,
                    )))
                }
                _ => Ok(None),
            }
        }
        Kind::Cmyk => {
            if decoder.colortype().map_err(tiff_error)? != ColorType::CMYK(8) {
                return Ok(None);
            }
            let n = w_us * h_us * 4;
            let DecodingResult::U8(mut cmyk) = decoder.read_image().map_err(tiff_error)? else {
                return Ok(None);
            };
            if cmyk.len() < n {
                return Err("CMYK TIFF with fewer samples than pixels".into());
            }
            // PIL's conversion takes inverted bytes as JPEG's Adobe CMYK
            // holds them.
            cmyk.truncate(n);
            for v in &mut cmyk {
                *v = 255 - *v;
            }
            let mut rgb = vec![0u8; w_us * h_us * 3];
            crate::preprocess::cmyk_to_rgb(&cmyk, &mut rgb);
            Ok(Some(DynamicImage::ImageRgb8(
                RgbImage::from_raw(w, h, rgb).ok_or("CMYK TIFF buffer")?,
            )))
        }
    }
}

/// The image of a JPEG-compressed TIFF (8-bit RGB or grey, chunky), each
/// strip or tile decoded by libjpeg ([`Preprocessor::decode_jpeg_chunk`];
/// the JPEGTables tag's tables put before its scans) and copied into place,
/// cut at the image's edges. `None` when libjpeg declines (the fast decoder
/// asked for: the `image` crate's path).
fn jpeg_chunks(
    pre: &Preprocessor,
    decoder: &mut Decoder<Cursor<&[u8]>>,
    bytes: &[u8],
    channels: usize,
) -> Result<Option<DynamicImage>, String> {
    let (w, h) = checked_size(pre, decoder)?;
    let (w, h) = (w as usize, h as usize);
    let unsigned = |d: &mut Decoder<Cursor<&[u8]>>, t| {
        d.find_tag_unsigned::<u64>(t)
            .ok()
            .flatten()
            .and_then(|v| usize::try_from(v).ok())
    };
    // Tiles where the file has them, else strips of RowsPerStrip rows.
    let (cw, ch, offsets, counts) = match unsigned(decoder, Tag::TileWidth) {
        Some(tw) => (
            tw,
            unsigned(decoder, Tag::TileLength).ok_or("TIFF: tiles without a TileLength")?,
            Tag::TileOffsets,
            Tag::TileByteCounts,
        ),
        None => (
            w,
            unsigned(decoder, Tag::RowsPerStrip).unwrap_or(h).min(h),
            Tag::StripOffsets,
            Tag::StripByteCounts,
        ),
    };
    if cw == 0 || ch == 0 {
        return Err("TIFF: chunks of no pixels".into());
    }
    let offsets = decoder.get_tag_u64_vec(offsets).map_err(tiff_error)?;
    let counts = decoder.get_tag_u64_vec(counts).map_err(tiff_error)?;
    let across = w.div_ceil(cw);
    let chunks = across * h.div_ceil(ch);
    if offsets.len() < chunks || counts.len() < chunks {
        return Err(format!(
            "TIFF: {} chunk offsets and {} sizes for {chunks} chunks",
            offsets.len(),
            counts.len()
        ));
    }
    let tables = decoder
        .find_tag(Tag::JPEGTables)
        .ok()
        .flatten()
        .and_then(|v| v.into_u8_vec().ok())
        .filter(|t| t.len() >= 4 && t.starts_with(&[0xFF, 0xD8]) && t.ends_with(&[0xFF, 0xD9]));
    let mut out = vec![0u8; w * h * channels];
    let mut stream = Vec::new();
    for i in 0..chunks {
        let at = usize::try_from(offsets[i]).map_err(|e| e.to_string())?;
        let n = usize::try_from(counts[i]).map_err(|e| e.to_string())?;
        let chunk = at
            .checked_add(n)
            .and_then(|end| bytes.get(at..end))
            .ok_or("TIFF: the file ends before its image does (truncated data)")?;
        let data = match &tables {
            Some(t) if chunk.starts_with(&[0xFF, 0xD8]) => {
                // The tables without their end marker, then the chunk
                // without its start marker.
                stream.clear();
                stream.extend_from_slice(&t[..t.len() - 2]);
                stream.extend_from_slice(&chunk[2..]);
                &stream[..]
            }
            _ => chunk,
        };
        // libtiff turns libjpeg's colour handling off for RGB: a chunk
        // libjpeg would transform (YCbCr, subsampled) goes to the `image`
        // crate's path, as before.
        if channels == 3 && !crate::preprocess::jpeg_is_plain_rgb(data) {
            return Ok(None);
        }
        let Some(img) = pre.decode_jpeg_chunk(data)? else {
            return Ok(None);
        };
        let (x0, y0) = ((i % across) * cw, (i / across) * ch);
        let (rw, rh) = (cw.min(w - x0), ch.min(h - y0));
        if (img.width() as usize) < rw || (img.height() as usize) < rh {
            return Err(format!(
                "TIFF: a JPEG chunk of {}x{} for {rw}x{rh} pixels",
                img.width(),
                img.height()
            ));
        }
        let (pixels, c) = match (&img, channels) {
            (DynamicImage::ImageRgb8(p), 3) => (p.as_raw(), 3),
            (DynamicImage::ImageLuma8(p), 1) => (p.as_raw(), 1),
            _ => return Err("TIFF: a JPEG chunk of other channels than the image's".into()),
        };
        let stride = img.width() as usize * c;
        for y in 0..rh {
            let src = &pixels[y * stride..y * stride + rw * c];
            let o = ((y0 + y) * w + x0) * c;
            out[o..o + rw * c].copy_from_slice(src);
        }
    }
    let (w, h) = (w as u32, h as u32);
    let img = if channels == 3 {
        RgbImage::from_raw(w, h, out).map(DynamicImage::ImageRgb8)
    } else {
        image::GrayImage::from_raw(w, h, out).map(DynamicImage::ImageLuma8)
    };
    img.map(Some)
        .ok_or_else(|| "TIFF: JPEG chunks' buffer".into())
}

/// The image's width and height, refused when empty or over `pre`'s
/// limits ([`Preprocessor::check_size`]), before decoding.
fn checked_size(
    pre: &Preprocessor,
    decoder: &mut Decoder<Cursor<&[u8]>>,
) -> Result<(u32, u32), String> {
    let (w, h) = decoder.dimensions().map_err(tiff_error)?;
    if w == 0 || h == 0 {
        return Err("image has no pixels".into());
    }
    pre.check_size(w as usize, h as usize)?;
    Ok((w, h))
}

enum Kind {
    Palette,
    GreyAlpha,
    Cmyk,
}

/// The first sample's bits (the tag holds one value per sample; 1 when
/// absent, as TIFF defaults it).
fn bits_per_sample(d: &mut Decoder<Cursor<&[u8]>>) -> u32 {
    d.find_tag_unsigned_vec::<u32>(Tag::BitsPerSample)
        .ok()
        .flatten()
        .and_then(|v| v.first().copied())
        .unwrap_or(1)
}

/// Rewrites the first directory's photometric interpretation to
/// BlackIsZero (grey), in classic TIFF and BigTIFF; `None` where the
/// directory or the entry cannot be read.
fn set_photometric_grey(bytes: &mut [u8]) -> Option<()> {
    let le = match bytes.get(..2)? {
        b"II" => true,
        b"MM" => false,
        _ => return None,
    };
    let read = |b: &[u8], at: usize, n: usize| -> Option<u64> {
        let s = b.get(at..at.checked_add(n)?)?;
        Some(if le {
            s.iter().rev().fold(0, |a, &v| (a << 8) | u64::from(v))
        } else {
            s.iter().fold(0, |a, &v| (a << 8) | u64::from(v))
        })
    };
    let big = read(bytes, 2, 2)? == 43;
    let (ifd, count_len, entry_len, value_at) = if big {
        (read(bytes, 8, 8)?, 8, 20, 12)
    } else {
        (read(bytes, 4, 4)?, 2, 12, 8)
    };
    let ifd = usize::try_from(ifd).ok()?;
    let count = usize::try_from(read(bytes, ifd, count_len)?).ok()?;
    for i in 0..count {
        let e = ifd + count_len + i * entry_len;
        if read(bytes, e, 2)? != u64::from(Tag::PhotometricInterpretation.to_u16()) {
            continue;
        }
        let width = match read(bytes, e + 2, 2)? {
            3 => 2, // SHORT
            4 => 4, // LONG
            _ => return None,
        };
        let value = PhotometricInterpretation::BlackIsZero.to_u16() as u64;
        let at = e + value_at;
        let slot = bytes.get_mut(at..at + width)?;
        for (k, b) in slot.iter_mut().enumerate() {
            let shift = if le { 8 * k } else { 8 * (width - 1 - k) };
            *b = (value >> shift) as u8;
        }
        return Some(());
    }
    None
}

/// A `tiff` crate error as a file's decode error.
fn tiff_error(e: tiff::TiffError) -> String {
    format!("TIFF: {e}")
}

/// Rewrites the channels of a 16-bit BMP's decoded pixels (8-bit RGB or
/// RGBA from the `image` crate, `round(v × 255 / max)`) to PIL's
/// `v × 255 / max` truncated, for the bit fields PIL reads: 5-6-5 and
/// 5-5-5 (also the layout of 16-bit BMPs without bit fields). Other BMPs
/// are left as they are.
pub(crate) fn bmp_16bit_as_pil(bytes: &[u8], img: &mut DynamicImage) {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    let (Some(header), Some(bits), Some(compression)) = (
        u32_at(14),
        bytes.get(28..30).map(|b| u16::from_le_bytes([b[0], b[1]])),
        u32_at(30),
    ) else {
        return;
    };
    if !bytes.starts_with(b"BM") || header < 40 || bits != 16 {
        return;
    }
    const BI_RGB: u32 = 0;
    const BI_BITFIELDS: u32 = 3;
    // The masks follow a 40-byte header, and sit at the same place in the
    // longer ones.
    let masks = match compression {
        BI_RGB => [0x7c00, 0x3e0, 0x1f],
        BI_BITFIELDS => match (u32_at(54), u32_at(58), u32_at(62)) {
            (Some(r), Some(g), Some(b)) => [r, g, b],
            _ => return,
        },
        _ => return,
    };
    let lens: [u32; 3] = match masks {
        [0xf800, 0x7e0, 0x1f] => [5, 6, 5],
        [0x7c00, 0x3e0, 0x1f] => [5, 5, 5],
        _ => return,
    };
    // From each rounded byte back to the field's value, then PIL's byte.
    let table = |len: u32| {
        let max = (1u32 << len) - 1;
        let mut t: [u8; 256] = std::array::from_fn(|b| b as u8);
        for v in 0..=max {
            t[((v * 255 + max / 2) / max) as usize] = (v * 255 / max) as u8;
        }
        t
    };
    let tables = lens.map(table);
    let (pixels, step) = match img {
        DynamicImage::ImageRgb8(i) => (&mut **i, 3),
        DynamicImage::ImageRgba8(i) => (&mut **i, 4),
        _ => return,
    };
    for px in pixels.chunks_exact_mut(step) {
        for (v, t) in px.iter_mut().zip(&tables) {
            *v = t[usize::from(*v)];
        }
    }
}
