//! The torchvision pipeline of the sidecar keys `resize`, `interpolation`,
//! `antialias` and `crop` against torchvision 0.26's `transforms.v2` (goldens
//! written by `scripts/make_preprocess_goldens.py` on PNGs, which every
//! decoder reads alike): within one uint8 step per value and 0.05 of a step
//! on average. Also how far our JPEG decoder is from torchvision's
//! `decode_jpeg` and PIL's.

use std::collections::BTreeMap;

use serde::Deserialize;
use tch::{Kind, Tensor};
use tch_vis::preprocess::{Preprocessor, Sidecar};

use crate::util::{golden_manifest, npy, repo, Mutator};

#[derive(Deserialize)]
struct Manifest {
    torchvision: String,
    cpu_capability: String,
    max_steps: f64,
    mean_steps: f64,
    cases: Vec<Case>,
    jpegs: Vec<Jpeg>,
    drafts: Vec<Draft>,
    layouts: Vec<Layout>,
}

#[derive(Deserialize)]
struct Layout {
    image: String,
    mode: String,
    pil: String,
}

#[derive(Deserialize)]
struct Draft {
    image: String,
    scale: usize,
    pil: String,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    image: String,
    sidecar: serde_json::Value,
    expected: String,
}

#[derive(Deserialize)]
struct Jpeg {
    name: String,
    image: String,
    torchvision: String,
    pil: String,
}

fn manifest() -> Manifest {
    golden_manifest(
        "tests/golden/transforms/manifest.json",
        "scripts/make_preprocess_goldens.py",
    )
}

/// `|got - want|` in uint8 steps: input-space differences times `std × 255`.
fn steps(got: &Tensor, want: &Tensor, std: &[f32]) -> Tensor {
    let c = std.len() as i64;
    let scale = Tensor::from_slice(std)
        .view([c, 1, 1])
        .to_kind(Kind::Double)
        * 255.0;
    (got.to_kind(Kind::Double) - want.to_kind(Kind::Double)).abs() * scale
}

#[test]
fn sidecar_resize_matches_torchvision_v2() {
    let m = manifest();
    let dir = repo("tests/golden/transforms");
    assert!(!m.cases.is_empty());
    // (interpolation, antialias) -> (cases, worst max, worst mean)
    let mut table: BTreeMap<String, (usize, f64, f64)> = BTreeMap::new();
    let mut failures = Vec::new();
    for case in &m.cases {
        let sidecar = Sidecar::from_json(&case.sidecar.to_string(), &case.name).unwrap();
        let pre = Preprocessor::new(sidecar.clone()).keep_original(true);
        let p = pre.load(dir.join(&case.image)).unwrap();
        let want = npy(dir.join(&case.expected));
        assert_eq!(p.input.size(), want.size(), "{}: shape", case.name);
        assert_eq!(p.input.kind(), Kind::Float, "{}", case.name);
        let d = steps(&p.input, &want, &sidecar.std);
        let (max, mean) = (d.max().double_value(&[]), d.mean(None).double_value(&[]));
        // One step, with room for the float32 rounding of (x - mean) / std.
        if max > m.max_steps + 1e-3 || mean > m.mean_steps {
            failures.push(format!(
                "{}: max {max:.4} steps, mean {mean:.4} steps",
                case.name
            ));
        }
        // The overlay image is the same pixels before normalisation.
        let back = &p.input * Tensor::from_slice(&sidecar.std).view([-1, 1, 1])
            + Tensor::from_slice(&sidecar.mean).view([-1, 1, 1]);
        assert!(
            back.allclose(&p.image.to_planes().unwrap(), 1e-5, 1e-5, false),
            "{}",
            case.name
        );
        let original = p.original.as_ref().unwrap();
        assert_eq!(original.dimensions(), p.original_size, "{}", case.name);
        let s = &case.sidecar;
        let key = format!(
            "{} antialias={}",
            s["interpolation"].as_str().unwrap(),
            s["antialias"]
        );
        let e = table.entry(key).or_insert((0, 0.0, 0.0));
        *e = (e.0 + 1, e.1.max(max), e.2.max(mean));
        println!("{:<48} max {max:.3} mean {mean:.4} steps", case.name);
    }
    println!(
        "torchvision {} (reference CPU capability {}):",
        m.torchvision, m.cpu_capability
    );
    for (k, (n, max, mean)) in &table {
        println!("  {k:<28} {n:>2} cases: max {max:.3}, worst mean {mean:.4} uint8 steps");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A colour sidecar of input size `h` × `w` that leaves values as they
/// are (mean 0, std 1).
fn rgb_sidecar(h: usize, w: usize) -> Sidecar {
    Sidecar::from_json(
        &format!(
            r#"{{"input_size": [{h}, {w}], "channels": 3, "mean": [0, 0, 0], "std": [1, 1, 1]}}"#
        ),
        "s.json",
    )
    .unwrap()
}

/// Our JPEG decoding against torchvision's `decode_jpeg` and PIL's (both
/// libjpeg-turbo) on 4:2:0 JPEGs of quality 90: by default (libjpeg-turbo's
/// decoder, as mozjpeg ships it) bit-identical; with `fast_jpeg` (zune-jpeg,
/// whose chroma upsampling rounds otherwise) within the measured distance
/// and a little room, to catch a decoder change. CMYK and YCCK JPEGs
/// (converted to RGB as PIL does) are bit-identical either way: libjpeg
/// decodes them with `fast_jpeg` too.
#[test]
fn jpeg_decoder_distance() {
    let m = manifest();
    let dir = repo("tests/golden/transforms");
    assert!(
        m.jpegs
            .iter()
            .filter(|j| j.name.starts_with("cmyk"))
            .count()
            == 2
    );
    assert!(m.jpegs.iter().any(|j| j.name.starts_with("ycck")));
    let pre = Preprocessor::new(rgb_sidecar(8, 8));
    for j in &m.jpegs {
        let bytes = std::fs::read(dir.join(&j.image)).unwrap();
        let four = j.name.starts_with("cmyk") || j.name.starts_with("ycck");
        let (zune_max, zune_mean) = if four { (0.0, 0.0) } else { (6.0, 0.6) };
        for (decoder, pre, max_bound, mean_bound) in [
            ("libjpeg", pre.clone(), 0.0, 0.0),
            ("zune", pre.clone().fast_jpeg(true), zune_max, zune_mean),
        ] {
            let ours = pre.decode(&bytes, &j.image).unwrap().into_rgb8();
            let (w, h) = ours.dimensions();
            let ours = Tensor::from_slice(ours.as_raw())
                .view([h as i64, w as i64, 3])
                .to_kind(Kind::Double);
            for (who, file) in [("torchvision", &j.torchvision), ("PIL", &j.pil)] {
                let theirs = npy(dir.join(file)).to_kind(Kind::Double);
                let d = (&ours - &theirs).abs();
                let (max, mean) = (d.max().double_value(&[]), d.mean(None).double_value(&[]));
                let exact = d.eq(0.0).to_kind(Kind::Double).mean(None).double_value(&[]);
                println!(
                    "{}: {decoder} vs {who}: max {max} mean {mean:.3} uint8 steps, {:.1}% equal",
                    j.name,
                    100.0 * exact
                );
                assert!(
                    max <= max_bound && mean <= mean_bound,
                    "{}: {decoder} vs {who}: max {max}, mean {mean}",
                    j.name
                );
            }
        }
    }
}

/// TIFF layouts the `image` crate refuses (palette of 1, 2, 4 and 8-bit
/// indices in both byte orders, grey with alpha) or converts otherwise
/// (CMYK with black ink, where its float conversion was a step off;
/// JPEG-compressed RGB and grey, which it decodes with zune-jpeg), and
/// 16-bit BMPs (5-6-5 and 5-5-5, which it rounds where PIL truncates),
/// decode to PIL's `convert("RGB")` bit for bit.
#[test]
fn image_layouts_decode_as_pil() {
    let m = manifest();
    let dir = repo("tests/golden/transforms");
    let modes: Vec<&str> = m.layouts.iter().map(|l| l.mode.as_str()).collect();
    for mode in ["P", "LA", "CMYK", "RGB;16", "RGB;15", "RGB;jpeg", "L;jpeg"] {
        assert!(modes.contains(&mode), "no {mode} image among the goldens");
    }
    let pre = Preprocessor::new(rgb_sidecar(8, 8));
    for l in &m.layouts {
        let bytes = std::fs::read(dir.join(&l.image)).unwrap();
        let got = pre.decode(&bytes, &l.image).unwrap().into_rgb8();
        let want = npy(dir.join(&l.pil));
        let (h, w) = (want.size()[0], want.size()[1]);
        assert_eq!(
            (i64::from(got.height()), i64::from(got.width())),
            (h, w),
            "{}",
            l.image
        );
        let got = Tensor::from_slice(got.as_raw()).view([h, w, 3]);
        let d = (got.to_kind(Kind::Int) - want.to_kind(Kind::Int)).abs();
        assert_eq!(
            d.max().int64_value(&[]),
            0,
            "{} ({}): {} values differ from PIL",
            l.image,
            l.mode,
            d.gt(0).sum(Kind::Int64).int64_value(&[])
        );
    }
}

/// `jpeg_draft` decodes at 1/2, 1/4 and 1/8 scale with libjpeg's scaled
/// IDCT, bit-identical to PIL's `draft`: each golden is PIL's
/// `draft("RGB", (W // k, H // k))`, and a sidecar of that input size picks
/// the same scale, as PIL does (a size one pixel larger, the next scale
/// down).
#[test]
fn jpeg_draft_equals_pils_draft() {
    let m = manifest();
    let dir = repo("tests/golden/transforms");
    assert_eq!(m.drafts.len(), 9);
    for d in &m.drafts {
        let bytes = std::fs::read(dir.join(&d.image)).unwrap();
        let want = npy(dir.join(&d.pil));
        let (h, w) = (want.size()[0], want.size()[1]);
        let full = image::load_from_memory(&bytes).unwrap();
        let (fw, fh) = (full.width() as usize, full.height() as usize);
        let size = |dh: usize, dw: usize| rgb_sidecar(fh / d.scale + dh, fw / d.scale + dw);
        // One pixel wider than PIL's size for this scale: the next scale.
        let wider = Preprocessor::new(size(0, 1)).jpeg_draft(true);
        let got = wider.decode(&bytes, &d.image).unwrap();
        assert_eq!(
            got.width() as usize,
            fw.div_ceil(d.scale / 2),
            "{} at 1/{}: one pixel more",
            d.image,
            d.scale
        );
        let sidecar = size(0, 0);
        for fast in [false, true] {
            let pre = Preprocessor::new(sidecar.clone())
                .jpeg_draft(true)
                .fast_jpeg(fast);
            let got = pre.decode(&bytes, &d.image).unwrap().into_rgb8();
            assert_eq!(
                (i64::from(got.height()), i64::from(got.width())),
                (h, w),
                "{} at 1/{}",
                d.image,
                d.scale
            );
            let got = Tensor::from_slice(got.as_raw()).view([h, w, 3]);
            assert!(got.equal(&want), "{} at 1/{}", d.image, d.scale);
        }
    }
}

/// The decode limit counts what libjpeg holds for a progressive JPEG (every
/// DCT coefficient until the last scan), not only the output pixels: a
/// limit between the two refuses the progressive file and takes a baseline
/// one of the same size. A truncated JPEG fails by default and with
/// `jpeg_draft`, and decodes with `fast_jpeg` (with `jpeg_draft` too).
#[test]
fn jpeg_limits_count_coefficients_and_truncation_follows_the_decoder() {
    let dir = repo("tests/golden/transforms/images");
    let progressive = std::fs::read(dir.join("q85_420_prog_97x133.jpg")).unwrap();
    let baseline = std::fs::read(dir.join("photo_87x131.jpg")).unwrap();
    let sidecar = rgb_sidecar(24, 26);
    // 97 x 133 x 3 = 38,703 bytes of pixels; 347 blocks of coefficients
    // (4:2:0) = 44,416 bytes more.
    let tight = Preprocessor::new(sidecar.clone()).limits(16384, 50_000);
    let e = tight.decode(&progressive, "p.jpg").unwrap_err();
    assert!(e.to_string().contains("83119 bytes to decode"), "{e}");
    tight.decode(&baseline, "b.jpg").unwrap();
    Preprocessor::new(sidecar.clone())
        .limits(16384, 83_119)
        .decode(&progressive, "p.jpg")
        .unwrap();
    let cut = &large_jpeg()[..200_000];
    let big = rgb_sidecar(100, 100);
    for (draft, fast, decodes) in [
        (false, false, false),
        (true, false, false),
        (false, true, true),
        (true, true, true),
    ] {
        let pre = Preprocessor::new(big.clone())
            .jpeg_draft(draft)
            .fast_jpeg(fast);
        let got = pre.decode(cut, "cut.jpg");
        assert_eq!(got.is_ok(), decodes, "draft {draft}, fast {fast}");
        if let Err(e) = got {
            assert!(e.to_string().contains("a truncated JPEG"), "{e}");
        }
    }
}

/// A 1600 × 1200 photo-like JPEG (smooth shading, edges, fine texture),
/// quality 90.
fn large_jpeg() -> Vec<u8> {
    let (w, h) = (1600u32, 1200u32);
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
        let disc = ((fx - 0.4).powi(2) + (fy - 0.5).powi(2)).sqrt() < 0.25;
        let texture = ((x as f32 * 0.21).sin() * (y as f32 * 0.17).cos() * 20.0) as i32;
        let base = [
            (40.0 + 180.0 * fx) as i32,
            (60.0 + 120.0 * fy) as i32,
            if disc { 220 } else { 50 },
        ];
        image::Rgb(base.map(|v| (v + texture).clamp(0, 255) as u8))
    });
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
        .encode_image(&img)
        .unwrap();
    bytes
}

/// `jpeg_draft` decodes a large JPEG at a DCT scale that keeps the resize a
/// downscale, with inputs close to the full decode's; PNGs, small JPEGs
/// and a preprocessor that keeps the original are decoded as before.
#[test]
fn jpeg_draft_decodes_large_jpegs_smaller_and_close() {
    let tv = Sidecar::from_json(
        r#"{"input_size": [224, 224], "channels": 3, "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "resize": 256, "crop": [224, 224]}"#,
        "s.json",
    )
    .unwrap();
    let plain = Sidecar::from_json(
        r#"{"input_size": [224, 224], "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}"#,
        "s.json",
    )
    .unwrap();
    let jpeg = large_jpeg();
    // Resize(256) of 1600 x 1200 needs 341 x 256: 1/4 gives 400 x 300 (1/8,
    // 200 x 150, is too small). The plain recipe needs 224 x 224: also 1/4.
    // Measured: torchvision recipe max 17, mean 0.49 uint8 steps; plain
    // recipe max 82, mean 0.97 (its bilinear resize without antialiasing
    // aliases the fine texture of the full decode, which the DCT scaling
    // filters out first).
    for (sidecar, want_size, max_bound, mean_bound) in
        [(tv, (400, 300), 30.0, 1.0), (plain, (400, 300), 120.0, 2.0)]
    {
        let full = Preprocessor::new(sidecar.clone());
        let draft = Preprocessor::new(sidecar.clone()).jpeg_draft(true);
        let a = full.prepare_bytes(&jpeg, "big.jpg").unwrap();
        let b = draft.prepare_bytes(&jpeg, "big.jpg").unwrap();
        assert_eq!(a.original_size, (1600, 1200));
        assert_eq!(b.original_size, want_size);
        let (a_img, b_img) = (a.image.to_planes().unwrap(), b.image.to_planes().unwrap());
        let d = (a_img.to_kind(Kind::Double) - b_img.to_kind(Kind::Double)).abs() * 255.0;
        let (max, mean) = (d.max().double_value(&[]), d.mean(None).double_value(&[]));
        println!("draft vs full decode: max {max:.2} mean {mean:.3} uint8 steps");
        assert!(
            max <= max_bound && mean <= mean_bound,
            "max {max}, mean {mean}"
        );
        // Keeping the original turns the draft off.
        let kept = Preprocessor::new(sidecar.clone())
            .jpeg_draft(true)
            .keep_original(true)
            .prepare_bytes(&jpeg, "big.jpg")
            .unwrap();
        assert_eq!(kept.original_size, (1600, 1200));
        assert!(kept.image.to_planes().unwrap().equal(&a_img));
    }
    // A PNG of the same picture, and a JPEG too small to scale: as before.
    let png = {
        let img = image::load_from_memory(&jpeg).unwrap();
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    };
    let small = std::fs::read(repo("examples/images/rgb/1/heldout_0093.png")).unwrap();
    let sidecar = Sidecar::for_model(repo("models/digits_rgb.pt")).unwrap();
    for (bytes, name) in [(&png, "big.png"), (&small, "small.png")] {
        let a = Preprocessor::new(sidecar.clone())
            .prepare_bytes(bytes, name)
            .unwrap();
        let b = Preprocessor::new(sidecar.clone())
            .jpeg_draft(true)
            .prepare_bytes(bytes, name)
            .unwrap();
        assert!(a.input.equal(&b.input), "{name}");
    }
}

/// Corrupt files of every format tch-vis decodes (bits flipped, bytes
/// replaced, among them JPEG's 0xFF marker byte, the file cut short) are
/// each a whole input of the sidecar's shape or an [`Error::Image`], never
/// a panic or another error: 300 seeded mutations of each of nine encoded
/// images, through plain, torchvision-recipe and JPEG-draft preprocessors.
#[test]
fn corrupt_images_of_every_format_are_image_errors() {
    use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, Rgb, RgbImage};
    use std::io::Cursor;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use tch_vis::Error;
    let photo = RgbImage::from_fn(53, 37, |x, y| {
        let v = x * 31 + y * 17 + (x * y) % 23;
        Rgb([
            (v % 256) as u8,
            ((v * 3) % 256) as u8,
            ((x ^ y) * 9 % 256) as u8,
        ])
    });
    let deep = ImageBuffer::from_fn(40, 30, |x, y| Luma([((x * 2000 + y * 13) % 65536) as u16]));
    let encode = |img: DynamicImage, format: ImageFormat| {
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
        bytes
    };
    let rgb = DynamicImage::ImageRgb8(photo);
    let seeds = [
        ("png", encode(rgb.clone(), ImageFormat::Png)),
        (
            "rgba png",
            encode(DynamicImage::ImageRgba8(rgb.to_rgba8()), ImageFormat::Png),
        ),
        (
            "16-bit png",
            encode(DynamicImage::ImageLuma16(deep), ImageFormat::Png),
        ),
        ("jpeg", encode(rgb.clone(), ImageFormat::Jpeg)),
        (
            "gray jpeg",
            encode(DynamicImage::ImageLuma8(rgb.to_luma8()), ImageFormat::Jpeg),
        ),
        ("bmp", encode(rgb.clone(), ImageFormat::Bmp)),
        ("gif", encode(rgb.clone(), ImageFormat::Gif)),
        ("tiff", encode(rgb.clone(), ImageFormat::Tiff)),
        ("webp", encode(rgb, ImageFormat::WebP)),
    ];
    let recipe = |json: &str| Sidecar::from_json(json, "m.json").unwrap();
    let pres = [
        Preprocessor::new(recipe(
            r#"{"input_size": [32, 32], "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}"#,
        )),
        Preprocessor::new(recipe(
            r#"{"input_size": [32, 32], "channels": 3, "mean": [0.5, 0.5, 0.5],
                "std": [0.25, 0.25, 0.25], "resize": 36, "interpolation": "bicubic",
                "antialias": true, "crop": [32, 32]}"#,
        )),
        Preprocessor::new(recipe(
            r#"{"input_size": [8, 8], "channels": 1, "mean": [0.5], "std": [0.25]}"#,
        ))
        .jpeg_draft(true)
        .keep_original(true),
    ];
    let mut mutator = Mutator::new(0x9e37_79b9_7f4a_7c15, [0x00, 0xFF, 0x7F, 0x80]);
    let mut outcomes = [0usize; 2];
    for (name, seed) in &seeds {
        assert!(pres[0].prepare_bytes(seed, "seed").is_ok(), "{name}");
        for k in 0..300 {
            let (bytes, how) = mutator.mutate(seed);
            let pre = &pres[k % pres.len()];
            let [h, w] = pre.sidecar().input_size;
            let c = pre.sidecar().channels as i64;
            match catch_unwind(AssertUnwindSafe(|| pre.prepare_bytes(&bytes, "x"))) {
                Ok(Ok(p)) => {
                    assert_eq!(p.input.size(), [c, h as i64, w as i64], "{name} #{k}");
                    outcomes[0] += 1;
                }
                Ok(Err(Error::Image { .. })) => outcomes[1] += 1,
                Ok(Err(e)) => panic!("{name} #{k} (mutation {how}): not an image error: {e}"),
                Err(_) => panic!("{name} #{k} (mutation {how}): the decoder panicked"),
            }
        }
    }
    // Both outcomes occur: the mutations reach the decoders' checks and
    // leave some images decodable.
    assert!(outcomes.iter().all(|&n| n > 100), "{outcomes:?}");
}
