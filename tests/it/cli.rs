//! End-to-end tests of the `tch-vis` binary: each builds a temporary tree of
//! images, runs the real binary and checks exit codes, stderr, files and
//! values.

use std::collections::BTreeMap;
use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tch::Tensor;

const BIN: &str = env!("CARGO_BIN_EXE_tch-vis");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model(name: &str) -> String {
    root()
        .join("models")
        .join(format!("{name}.pt"))
        .display()
        .to_string()
}

fn tch_vis<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    tch_vis_env(args, &[])
}

/// Runs the CLI with CUDA hidden (`CUDA_VISIBLE_DEVICES=""`), so that
/// `--device auto` is the CPU on every machine and byte-for-byte comparisons
/// hold (cuDNN's backward kernels are not deterministic); CUDA itself is
/// tested by [`saliency_on_cuda_matches_pytorch_goldens`].
fn tch_vis_env<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    cmd.env("CUDA_VISIBLE_DEVICES", "");
    for k in [
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_MIN",
        "JOB_COMPLETION_INDEX",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_code(o: &Output, code: i32, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}: expected exit {code}, got {:?}\n--- stderr:\n{}\n--- stdout:\n{}",
        o.status.code(),
        stderr(o),
        String::from_utf8_lossy(&o.stdout)
    );
}

/// One line, `tch-vis: error: ...`, no C++ frames or backtrace.
fn assert_one_error_line(o: &Output, what: &str) {
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected one stderr line, got:\n{err}"
    );
    assert!(lines[0].starts_with("tch-vis: error: "), "{what}: {err}");
    for bad in [
        "frame #",
        "Exception raised",
        "backtrace",
        "panicked",
        "stack",
    ] {
        assert!(!err.contains(bad), "{what}: stderr has {bad:?}: {err}");
    }
}

// ---------------------------------------------------------------- images

fn encode(img: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
    bytes
}

/// A digit-like stroke pattern, so gradients are not all zero.
fn gray8(w: u32, h: u32, seed: u32) -> image::GrayImage {
    image::GrayImage::from_fn(w, h, |x, y| {
        let v = ((x * 7 + y * 13 + seed * 31) % 97) as u8;
        image::Luma([if (x + seed) % 5 < 2 { 255 - v } else { v / 3 }])
    })
}

fn png_gray(w: u32, h: u32, seed: u32) -> Vec<u8> {
    encode(
        image::DynamicImage::ImageLuma8(gray8(w, h, seed)),
        image::ImageFormat::Png,
    )
}

fn png_rgb(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 9 + seed) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
    });
    encode(image::DynamicImage::ImageRgb8(img), image::ImageFormat::Png)
}

fn png_rgba(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbaImage::from_fn(w, h, |x, y| {
        image::Rgba([(x * 8) as u8, (y * 8) as u8, 128, (x * y) as u8])
    });
    encode(
        image::DynamicImage::ImageRgba8(img),
        image::ImageFormat::Png,
    )
}

fn png_gray16(w: u32, h: u32) -> Vec<u8> {
    let img = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_fn(w, h, |x, y| {
        image::Luma([(x * 2000 + y * 300) as u16])
    });
    encode(
        image::DynamicImage::ImageLuma16(img),
        image::ImageFormat::Png,
    )
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An 8-bit palette PNG, built by hand (zlib stored blocks).
fn png_palette(w: u32, h: u32) -> Vec<u8> {
    let palette = [0u8, 0, 0, 255, 0, 0, 0, 255, 0, 255, 255, 255];
    let mut raw = Vec::new();
    for y in 0..h {
        raw.push(0); // filter: none
        for x in 0..w {
            raw.push(((x / 4 + y / 4) % 4) as u8);
        }
    }
    let mut z = vec![0x78, 0x01];
    let chunks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, c) in chunks.iter().enumerate() {
        z.push(u8::from(i + 1 == chunks.len()));
        let len = c.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(c);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        png.extend_from_slice(&body);
        png.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 3, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"PLTE", &palette);
    chunk(b"IDAT", &z);
    chunk(b"IEND", &[]);
    png
}

/// A temporary tree of input files.
struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn new() -> Self {
        Tree {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn images(&self) -> PathBuf {
        self.dir.path().join("images")
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn file(&self, rel: &str, bytes: &[u8]) -> &Self {
        let p = self.images().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes).unwrap();
        self
    }

    /// Good images only, in nested folders, non-square.
    fn good(n: u32) -> Self {
        let t = Tree::new();
        for i in 0..n {
            let rel = format!("d{}/img_{i:03}.png", i % 3);
            let (w, h) = if i % 2 == 0 { (28, 24) } else { (32, 32) };
            t.file(&rel, &png_gray(w, h, i));
        }
        t
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `COMMAND --model M --images DIR --out OUT EXTRA...`.
fn folder_args(
    command: &str,
    model: &str,
    images: &Path,
    out: &Path,
    extra: &[&str],
) -> Vec<String> {
    let head = [
        command,
        "--model",
        model,
        "--images",
        s(images),
        "--out",
        s(out),
    ];
    with(owned(&head), extra)
}

/// `saliency --model M --images DIR --out OUT --save-npy EXTRA...`.
fn saliency_args(model: &str, images: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    with(
        folder_args("saliency", model, images, out, &["--save-npy"]),
        extra,
    )
}

/// `scores --model M --images DIR --out OUT --score categorical:1 EXTRA...`.
fn scores_args(model: &str, images: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let score = ["--score", "categorical:1"];
    with(folder_args("scores", model, images, out, &score), extra)
}

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

fn csv_paths(out: &Path) -> Vec<String> {
    fs::read_to_string(out.join("scores.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().to_string())
        .collect()
}

/// Every file under `dir` (relative path → bytes), report.json left out.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                if rel != "report.json" {
                    out.insert(rel, fs::read(&p).unwrap());
                }
            }
        }
    }
    out
}

fn assert_same_tree(a: &Path, b: &Path, what: &str) {
    let (sa, sb) = (snapshot(a), snapshot(b));
    let ka: Vec<_> = sa.keys().collect();
    let kb: Vec<_> = sb.keys().collect();
    assert_eq!(ka, kb, "{what}: file lists differ");
    for (k, v) in &sa {
        assert!(v == &sb[k], "{what}: {k} differs");
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn help_explains_every_flag() {
    let o = tch_vis(&["saliency", "--help"]);
    assert_code(&o, 0, "saliency --help");
    let text = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--model",
        "--images",
        "--out",
        "--score",
        "--device",
        "--batch-size",
        "--smooth-samples",
        "--smooth-noise",
        "--seed",
        "--save-npy",
        "--shard",
        "--overwrite",
        "--strict",
        "categorical:I",
        "SLURM_ARRAY_TASK_ID",
        "JOB_COMPLETION_INDEX",
    ] {
        assert!(text.contains(flag), "saliency --help lacks {flag}:\n{text}");
    }
    let o = tch_vis(&["scores", "--help"]);
    assert_code(&o, 0, "scores --help");
    assert!(!String::from_utf8_lossy(&o.stdout).contains("--save-npy"));
    assert_code(&tch_vis(&["--help"]), 0, "--help");
}

#[test]
fn problems_before_the_first_image_exit_2_with_one_line_and_no_outputs() {
    let t = Tree::good(2);
    let dir = t.dir.path();
    fs::write(dir.join("garbage.pt"), b"not a torchscript archive").unwrap();
    fs::copy(
        root().join("models/digits_cnn.json"),
        dir.join("garbage.json"),
    )
    .unwrap();
    fs::copy(
        root().join("models/digits_cnn.pt"),
        dir.join("nosidecar.pt"),
    )
    .unwrap();
    fs::copy(
        root().join("models/digits_cnn.pt"),
        dir.join("badsidecar.pt"),
    )
    .unwrap();
    fs::write(
        dir.join("badsidecar.json"),
        r#"{"input_size": [32, 32], "channels": 1, "mean": [0.1, 0.2], "std": [1]}"#,
    )
    .unwrap();
    fs::copy(
        root().join("models/digits_cnn.pt"),
        dir.join("wrongchannels.pt"),
    )
    .unwrap();
    fs::copy(
        root().join("models/digits_rgb.json"),
        dir.join("wrongchannels.json"),
    )
    .unwrap();
    let cnn = model("digits_cnn");
    let images = t.images();
    let images = s(&images);
    let out = t.out("out");
    let o = s(&out);
    let g = dir.join("garbage.pt");
    let ns = dir.join("nosidecar.pt");
    let bs = dir.join("badsidecar.pt");
    let wc = dir.join("wrongchannels.pt");
    let multi = model_multi();
    let checkpoint = root()
        .join("tests/models/not_torchscript_state_dict.pt")
        .display()
        .to_string();
    // A model that takes any size, with a sidecar whose batches of 8,192
    // (1.6 TB) no machine allocates, over a folder of as many files (an
    // input of fewer files is one batch of its own size).
    let many = t.out("many");
    fs::create_dir_all(&many).unwrap();
    for i in 0..8192 {
        fs::write(many.join(format!("{i:05}.png")), b"").unwrap();
    }
    fs::copy(
        root().join("tests/models/avgpool_rgb.pt"),
        dir.join("huge.pt"),
    )
    .unwrap();
    fs::write(
        dir.join("huge.json"),
        r#"{"input_size": [4096, 4096], "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}"#,
    )
    .unwrap();
    let huge = dir.join("huge.pt");
    // What a shell glob makes of --images DIR/*.png.
    let globbed = [
        t.images().join("d0/img_000.png"),
        t.images().join("d1/img_001.png"),
    ];
    // Labels that do not fit the 10 classes: too few, and shifted by one.
    let sidecar: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(root().join("models/digits_cnn.json")).unwrap())
            .unwrap();
    for (name, n) in [("fewlabels", 5), ("morelabels", 11)] {
        fs::copy(
            root().join("models/digits_cnn.pt"),
            dir.join(format!("{name}.pt")),
        )
        .unwrap();
        let mut s = sidecar.clone();
        s["labels"] = (0..n).map(|i| format!("c{i}")).collect::<Vec<_>>().into();
        fs::write(dir.join(format!("{name}.json")), s.to_string()).unwrap();
    }
    let (few, more) = (dir.join("fewlabels.pt"), dir.join("morelabels.pt"));
    fs::write(dir.join("empty.pt"), b"").unwrap();
    fs::copy(
        root().join("models/digits_cnn.json"),
        dir.join("empty.json"),
    )
    .unwrap();
    let empty = dir.join("empty.pt");
    let mut cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "unknown flag",
            usage("saliency", &cnn, images, o, &["--bogus"]),
        ),
        (
            "another tool's flag",
            usage("cam", &cnn, images, o, &["--method", "gradcam", "--force"]),
        ),
        ("no subcommand", vec![]),
        (
            "missing --out",
            vec!["saliency", "--model", &cnn, "--images", images],
        ),
        (
            "bad spec",
            usage("saliency", &cnn, images, o, &["--score", "categorical:x"]),
        ),
        (
            "class index = classes",
            usage("saliency", &cnn, images, o, &["--score", "categorical:10"]),
        ),
        (
            "binary on (N, 10)",
            usage("scores", &cnn, images, o, &["--score", "binary:true"]),
        ),
        (
            "two specs, one output",
            usage(
                "saliency",
                &cnn,
                images,
                o,
                &["--score", "predicted", "--score", "inactive"],
            ),
        ),
        (
            "multi-output without specs",
            usage("saliency", &multi, images, o, &[]),
        ),
        (
            "missing model",
            usage("saliency", "/nonexistent/m.pt", images, o, &[]),
        ),
        ("not torchscript", usage("saliency", s(&g), images, o, &[])),
        (
            "a torch.save checkpoint",
            usage("saliency", &checkpoint, images, o, &[]),
        ),
        (
            "a shell glob",
            vec![
                "saliency",
                "--model",
                &cnn,
                "--images",
                s(&globbed[0]),
                s(&globbed[1]),
                "--out",
                o,
            ],
        ),
        (
            "5 labels, 10 classes",
            usage("saliency", s(&few), images, o, &[]),
        ),
        (
            "11 labels, 10 classes",
            usage("scores", s(&more), images, o, &[]),
        ),
        (
            "an empty model file",
            usage("scores", s(&empty), images, o, &[]),
        ),
        (
            "--out is the --images folder",
            usage("saliency", &cnn, images, images, &[]),
        ),
        (
            "a batch larger than memory",
            usage("saliency", s(&huge), s(&many), o, &["--batch-size", "8192"]),
        ),
        ("missing sidecar", usage("saliency", s(&ns), images, o, &[])),
        ("invalid sidecar", usage("saliency", s(&bs), images, o, &[])),
        (
            "sidecar does not fit model",
            usage("saliency", s(&wc), images, o, &[]),
        ),
        (
            "missing DIR",
            usage("saliency", &cnn, "/nonexistent/dir", o, &[]),
        ),
        (
            "missing list of images",
            vec![
                "scores",
                "--model",
                &cnn,
                "--images-from",
                "/nonexistent/list.txt",
                "--out",
                o,
            ],
        ),
        (
            "--root without --images-from",
            usage("scores", &cnn, images, o, &["--root", "/"]),
        ),
        (
            "bad shard",
            usage("scores", &cnn, images, o, &["--shard", "3/3"]),
        ),
        (
            "batch size 0",
            usage("scores", &cnn, images, o, &["--batch-size", "0"]),
        ),
        (
            "--jpeg-draft with --overlay original",
            usage(
                "saliency",
                &cnn,
                images,
                o,
                &["--jpeg-draft", "--overlay", "original"],
            ),
        ),
        (
            "negative noise",
            usage(
                "saliency",
                &cnn,
                images,
                o,
                &["--smooth-samples", "2", "--smooth-noise", "-1"],
            ),
        ),
        (
            "noise without samples",
            usage("saliency", &cnn, images, o, &["--smooth-noise", "0.1"]),
        ),
        (
            "one trapezoid step",
            usage(
                "integrated-gradients",
                &cnn,
                images,
                o,
                &["--steps", "1", "--rule", "riemann_trapezoid"],
            ),
        ),
    ];
    if !tch::Cuda::is_available() {
        cases.push((
            "cuda without CUDA",
            usage("saliency", &cnn, images, o, &["--device", "cuda"]),
        ));
    }
    // Several at a time: most of each run is loading libtorch.
    let results: Vec<Output> = cases
        .chunks(4)
        .flat_map(|group| {
            std::thread::scope(|sc| {
                let handles: Vec<_> = group
                    .iter()
                    .map(|(_, args)| sc.spawn(move || tch_vis(args)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for ((what, _), r) in cases.iter().zip(&results) {
        assert_code(r, 2, what);
        assert_one_error_line(r, what);
        assert!(!out.exists(), "{what}: wrote {}", out.display());
    }
    // A missing model (whose sidecar is missing too) is named, not its sidecar.
    let (i, _) = cases
        .iter()
        .enumerate()
        .find(|(_, (what, _))| *what == "missing model")
        .unwrap();
    let err = String::from_utf8_lossy(&results[i].stderr);
    assert!(
        err.contains("/nonexistent/m.pt") && !err.contains("sidecar"),
        "missing model: {err}"
    );
    // What is wrong, in the words of each.
    for (what, says) in [
        (
            "5 labels, 10 classes",
            "has 5 labels, but the model's output 0 has 10 classes",
        ),
        ("a shell glob", "list files with --images-from FILE"),
        ("negative noise", "is not a finite number >= 0"),
        ("noise without samples", "--smooth-samples"),
        ("one trapezoid step", "at least 2 for riemann_trapezoid): 1"),
        ("unknown flag", "(see tch-vis saliency --help)"),
        (
            "another tool's flag",
            "'--force' found; --overwrite recomputes images whose outputs exist (see tch-vis cam --help)",
        ),
        (
            "11 labels, 10 classes",
            "has 11 labels, but the model's output 0 has 10 classes",
        ),
        ("an empty model file", "is an empty file (0 bytes)"),
        ("multi-output without specs", "(none given)"),
    ] {
        let i = cases.iter().position(|(w, _)| *w == what).unwrap();
        let err = stderr(&results[i]);
        assert!(err.contains(says), "{what}: {err}");
    }
    // A torch.save checkpoint is named as one, with the way to export.
    let (i, _) = cases
        .iter()
        .enumerate()
        .find(|(_, (what, _))| *what == "a torch.save checkpoint")
        .unwrap();
    let err = String::from_utf8_lossy(&results[i].stderr);
    assert!(
        err.contains("is a torch.save checkpoint") && err.contains("torch.jit.trace"),
        "checkpoint: {err}"
    );
    // A count flag without an index, and an index without a count.
    let r = tch_vis_env(
        &usage("scores", &cnn, images, o, &[]),
        &[("JOB_COMPLETION_INDEX", "1")],
    );
    assert_code(&r, 2, "JOB_COMPLETION_INDEX without --shard-count");
    assert_one_error_line(&r, "JOB_COMPLETION_INDEX without --shard-count");
    assert!(!out.exists());
}

fn model_multi() -> String {
    model("digits_multi")
}

/// `SUB --model M --images DIR --out OUT EXTRA...`.
fn usage<'a>(
    sub: &'a str,
    m: &'a str,
    dir: &'a str,
    out: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut v = vec![sub, "--model", m, "--images", dir, "--out", out];
    v.extend_from_slice(extra);
    v
}

/// Bad input never stops the run: each bad file is in report.json `failed`
/// with a reason, good ones (16-bit, gray, RGBA, palette, RGB, non-square)
/// get every output, and --strict turns failures into exit 1.
/// A folder's results record what they were made with: a rerun with another
/// score, model (by content, not path), or SmoothGrad setting is refused
/// before anything is written (exit 2, the differing setting named), where
/// it used to keep the old results as done beside new ones; the same
/// settings, the same model moved, a vanilla rerun with another seed, and
/// another command of the same model and scores are reruns; `--overwrite`
/// starts over.
#[test]
fn a_rerun_with_other_settings_is_refused() {
    let t = Tree::good(6);
    let cnn = model("digits_cnn");
    let out = t.out("out");
    let base = |extra: &[&str]| saliency_args(&cnn, &t.images(), &out, extra);
    let first = run_ok(&base(&[]), "first");
    assert_eq!(first["processed"].as_u64(), Some(6));
    assert_eq!(first["results_settings"]["score"][0], "predicted");
    assert!(!out.join(".tch-vis").exists());
    let refused = |args: Vec<String>, says: &str| {
        let before = snapshot(&out);
        let o = tch_vis(&args);
        assert_code(&o, 2, says);
        assert_one_error_line(&o, says);
        let err = stderr(&o);
        assert!(err.contains(says) && err.contains("--overwrite"), "{err}");
        assert_eq!(snapshot(&out), before, "{says}: the folder changed");
    };
    refused(
        base(&["--score", "categorical:3"]),
        r#"score ["predicted"], and this run has score ["categorical:3"]"#,
    );
    refused(
        base(&["--smooth-samples", "2"]),
        "saliency.smooth_samples 0, and this run has saliency.smooth_samples 2",
    );
    let other = t.out("other.pt");
    fs::copy(root().join("models/digits_binary.pt"), &other).unwrap();
    fs::copy(
        root().join("models/digits_binary.json"),
        t.out("other.json"),
    )
    .unwrap();
    refused(
        saliency_args(s(&other), &t.images(), &out, &["--score", "predicted"]),
        "holds results made with model",
    );
    // Reruns: nothing to do.
    let moved = t.out("moved.pt");
    fs::copy(root().join("models/digits_cnn.pt"), &moved).unwrap();
    fs::copy(root().join("models/digits_cnn.json"), t.out("moved.json")).unwrap();
    for (what, args) in [
        ("same", base(&[])),
        (
            "moved model",
            saliency_args(s(&moved), &t.images(), &out, &[]),
        ),
        ("another seed, no noise", base(&["--seed", "7"])),
    ] {
        assert_eq!(run_ok(&args, what)["skipped"].as_u64(), Some(6), "{what}");
    }
    let scores = owned(&usage("scores", &cnn, s(&t.images()), s(&out), &[]));
    assert_eq!(run_ok(&scores, "scores")["skipped"].as_u64(), Some(6));
    // Starting over with other settings, which the folder then records.
    let over = run_ok(
        &base(&["--score", "categorical:3", "--overwrite"]),
        "overwrite",
    );
    assert_eq!(over["processed"].as_u64(), Some(6));
    assert_eq!(over["results_settings"]["score"][0], "categorical:3");
    refused(
        base(&[]),
        r#"score ["categorical:3"], and this run has score ["predicted"]"#,
    );
    // The same model with torchvision resize keys added to its sidecar:
    // other inputs, refused (an optional key added is a change).
    let resized = t.out("resized.pt");
    fs::copy(root().join("models/digits_cnn.pt"), &resized).unwrap();
    let mut with_resize: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(root().join("models/digits_cnn.json")).unwrap())
            .unwrap();
    with_resize["resize"] = serde_json::json!(36);
    with_resize["crop"] = serde_json::json!([32, 32]);
    fs::write(t.out("resized.json"), with_resize.to_string()).unwrap();
    refused(
        saliency_args(
            s(&resized),
            &t.images(),
            &out,
            &["--score", "categorical:3"],
        ),
        "holds results made with sidecar.antialias null, and this run has sidecar.antialias true",
    );
    // Sidecar floats that JSON does not give back exactly unless read
    // correctly rounded (0.4578275 as float32): the same settings.
    let odd = t.out("odd.pt");
    fs::copy(root().join("models/digits_cnn.pt"), &odd).unwrap();
    let mut sidecar: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(root().join("models/digits_cnn.json")).unwrap())
            .unwrap();
    sidecar["mean"] = serde_json::json!([0.4578275]);
    sidecar["std"] = serde_json::json!([0.2023]);
    fs::write(t.out("odd.json"), sidecar.to_string()).unwrap();
    let odd_out = t.out("odd-out");
    let args = saliency_args(s(&odd), &t.images(), &odd_out, &[]);
    assert_eq!(run_ok(&args, "odd floats")["processed"].as_u64(), Some(6));
    assert_eq!(
        run_ok(&args, "odd floats, again")["skipped"].as_u64(),
        Some(6)
    );
}

/// `maximize` and the folder commands keep out of each other's folders: one
/// `report.json` for both runs would lose one of them. Each refuses the
/// other's folder before writing anything (exit 2).
#[test]
fn maximize_and_folder_runs_keep_their_own_folders() {
    let t = Tree::good(2);
    let cnn = model("digits_cnn");
    let (folder, maximized) = (t.out("folder"), t.out("maximized"));
    run_ok(&saliency_args(&cnn, &t.images(), &folder, &[]), "saliency");
    let maximize = |out: &Path| -> Vec<String> {
        owned(&[
            "maximize",
            "--model",
            &cnn,
            "--out",
            s(out),
            "--score",
            "categorical:1",
            "--steps",
            "2",
        ])
    };
    run_ok(&maximize(&maximized), "maximize");
    for (args, says) in [
        (maximize(&folder), "holds the results of a saliency run"),
        (
            saliency_args(&cnn, &t.images(), &maximized, &[]),
            "holds the results of a maximize run",
        ),
    ] {
        let before = (snapshot(&folder), snapshot(&maximized));
        let o = tch_vis(&args);
        assert_code(&o, 2, says);
        assert!(stderr(&o).contains(says), "{}", stderr(&o));
        assert_eq!((snapshot(&folder), snapshot(&maximized)), before, "{says}");
    }
}

/// A `maximize` rerun with fewer samples removes the earlier run's
/// `maximize_K` files past its own (they would read as this run's), and
/// nothing else.
#[test]
fn a_maximize_rerun_leaves_no_stale_samples() {
    let t = Tree::new();
    let out = t.out("maximized");
    let cnn = model("digits_cnn");
    let args = |spec: &str| -> Vec<String> {
        owned(&[
            "maximize",
            "--model",
            &cnn,
            "--out",
            s(&out),
            "--score",
            spec,
            "--steps",
            "2",
        ])
    };
    run_ok(&args("categorical:3,4,5"), "three samples");
    fs::write(out.join("maximize_01.png"), b"mine").unwrap();
    fs::write(out.join("notes.txt"), b"mine").unwrap();
    run_ok(&args("categorical:3"), "one sample");
    let mut names: Vec<String> = snapshot(&out).into_keys().collect();
    names.sort();
    // (`snapshot` leaves report.json out.)
    assert_eq!(
        names,
        [
            "maximize_0.npy",
            "maximize_0.png",
            "maximize_01.png",
            "notes.txt"
        ]
    );
    assert_eq!(report(&out)["samples"], 1);
}

/// `maximize` notes on stderr the samples whose score fell over the steps
/// (the default regularizers outweigh a regressor's output on its random
/// seed: 5.86 -> 5.40 in 30 steps), naming the sample and the settings to
/// lower; a run whose score rises (a class of the digits CNN) has no note.
#[test]
fn maximize_notes_a_score_that_fell() {
    let t = Tree::new();
    let run = |name: &str, spec: &str| {
        let out = t.out(&format!("maximized-{name}"));
        let args = owned(&[
            "maximize",
            "--model",
            &model(name),
            "--out",
            s(&out),
            "--score",
            spec,
            "--steps",
            "30",
        ]);
        let o = tch_vis(&args);
        assert_code(&o, 0, name);
        let r = report(&out);
        let first = r["curve"][0][0].as_f64().unwrap();
        let last = r["final_scores"][0].as_f64().unwrap();
        (String::from_utf8_lossy(&o.stderr).into_owned(), first, last)
    };
    // From the first step's score to the final image's, as report.json
    // gives it.
    let (err, first, last) = run("digits_regressor", "categorical:0");
    assert!(last < first, "{first} -> {last}");
    assert!(
        err.contains(&format!(
            "note: the score fell over the steps for sample(s) 0 ({first:.4} -> {last:.4})"
        )) && err.contains("--tv 1, --norm 0.3")
            && err.lines().count() == 1,
        "{err}"
    );
    let (err, first, last) = run("digits_cnn", "categorical:2");
    assert!(last > first, "{first} -> {last}");
    assert!(!err.contains("note"), "{err}");
}

/// A model traced at a fixed batch size of one runs the probe (one input)
/// and fails on the run's first batch: exit 1 with one line that says what
/// is likely wrong and what to do; with `--batch-size 1` the run works.
#[test]
fn a_model_traced_at_batch_one_is_named_at_its_first_batch() {
    let t = Tree::new();
    // Five files: a batch of 4 (an input of fewer files is one batch of
    // its own size).
    for i in 0..5 {
        t.file(&format!("d{i}.png"), &png_gray(16, 16, i));
    }
    let model = root()
        .join("tests/models/fixed_batch_1.pt")
        .display()
        .to_string();
    let images = t.images();
    let out = t.out("out");
    let r = tch_vis(&usage(
        "saliency",
        &model,
        s(&images),
        s(&out),
        &["--batch-size", "4"],
    ));
    assert_code(&r, 1, "fixed batch, batch 4");
    assert_one_error_line(&r, "fixed batch, batch 4");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("fails on its first batch of 4")
            && err.contains("traced (torch.jit.trace) at a fixed batch size")
            && err.contains("shapes cannot be multiplied"),
        "{err}"
    );
    let out1 = t.out("out1");
    let r = tch_vis(&usage(
        "saliency",
        &model,
        s(&images),
        s(&out1),
        &["--batch-size", "1"],
    ));
    assert_code(&r, 0, "fixed batch, batch 1");
    assert!(out1.join("d2.png.saliency.npy").is_file());
}

/// An input of fewer files than `--batch-size` is one batch of its own
/// size, not one padded with zero images: from all the files found, so
/// each shard of it batches alike; a larger input keeps the batch size.
#[test]
fn a_small_input_is_one_batch_of_its_size() {
    let t = Tree::good(3);
    let cnn = model("digits_cnn");
    let batch = |out: &Path| report(out)["batch_size"].as_u64().unwrap();
    let out = t.out("default");
    assert_code(
        &tch_vis(&saliency_args(&cnn, &t.images(), &out, &[])),
        0,
        "default",
    );
    assert_eq!(batch(&out), 3);
    assert_eq!(report(&out)["processed"], 3);
    for k in 0..2 {
        let out = t.out(&format!("shard{k}"));
        let shard = format!("{k}/2");
        let r = tch_vis(&saliency_args(
            &cnn,
            &t.images(),
            &out,
            &["--shard", &shard],
        ));
        assert_code(&r, 0, "shard");
        assert_eq!(batch(&out), 3, "shard {shard}");
    }
    let out = t.out("two");
    let r = tch_vis(&saliency_args(
        &cnn,
        &t.images(),
        &out,
        &["--batch-size", "2"],
    ));
    assert_code(&r, 0, "batch 2");
    assert_eq!(batch(&out), 2);
}

#[test]
fn bad_input_corpus_is_recorded_and_the_run_goes_on() {
    let t = Tree::new();
    let good = png_gray(32, 32, 1);
    t.file("ok/gray.png", &good)
        .file("ok/gray16.png", &png_gray16(20, 30))
        .file("ok/rgba.png", &png_rgba(33, 17))
        .file("ok/palette.png", &png_palette(16, 24))
        .file(
            "ok/rgb.jpg",
            &encode(
                image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(40, 48, |x, y| {
                    image::Rgb([(x * 6) as u8, (y * 5) as u8, 90])
                })),
                image::ImageFormat::Jpeg,
            ),
        )
        .file("ok/no_extension", &png_rgb(10, 10, 3))
        .file("ok/has,comma.png", &png_gray(8, 8, 2))
        .file("bad/empty.png", b"")
        .file("bad/notes.txt", b"just some text\n")
        .file("bad/truncated.png", &good[..good.len() / 2])
        .file("bad/fake.jpg", b"\xff\xd8\xff\xe0 not really a jpeg");
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(t.images(), t.images().join("bad/loop")).unwrap();
        std::os::unix::fs::symlink("self_link", t.images().join("bad/self_link")).unwrap();
    }
    let out = t.out("out");
    let (rgb, images) = (model("digits_rgb"), t.images());
    let args = [
        "saliency",
        "--model",
        &rgb,
        "--images",
        s(&images),
        "--out",
        s(&out),
        "--save-npy",
        "--batch-size",
        "4",
    ];
    let o = tch_vis(&args);
    assert_code(&o, 0, "bad inputs");
    let r = report(&out);
    let failed: Vec<String> = r["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            assert!(!f["error"].as_str().unwrap().is_empty());
            f["path"].as_str().unwrap().to_string()
        })
        .collect();
    let mut want = vec![
        "bad/empty.png",
        "bad/fake.jpg",
        "bad/notes.txt",
        "bad/truncated.png",
    ];
    if cfg!(unix) {
        want.extend(["bad/loop", "bad/self_link"]);
        want.sort_unstable();
    }
    assert_eq!(failed, want, "report.json failed: {r:#}");
    assert_eq!(r["processed"], 7);
    let oks = [
        "ok/gray.png",
        "ok/gray16.png",
        "ok/has,comma.png",
        "ok/no_extension",
        "ok/palette.png",
        "ok/rgb.jpg",
        "ok/rgba.png",
    ];
    for rel in oks {
        let map = Tensor::read_npy(out.join(format!("{rel}.saliency.npy"))).unwrap();
        assert_eq!(map.size(), vec![32, 32], "{rel}");
        assert_eq!(map.kind(), tch::Kind::Float);
        let (lo, hi) = (map.min().double_value(&[]), map.max().double_value(&[]));
        assert!(
            lo >= 0.0 && hi <= 1.0 && hi > 0.5,
            "{rel}: map in [{lo}, {hi}]"
        );
        let grad = Tensor::read_npy(out.join(format!("{rel}.grad.npy"))).unwrap();
        assert_eq!(grad.size(), vec![3, 32, 32], "{rel}");
        let png = image::open(out.join(format!("{rel}.saliency.png"))).unwrap();
        assert_eq!((png.width(), png.height()), (32, 32));
        assert!(matches!(png, image::DynamicImage::ImageRgb8(_)));
    }
    let csv = fs::read_to_string(out.join("scores.csv")).unwrap();
    assert!(csv.starts_with("path,score_0,class_0,label_0\n"), "{csv}");
    assert!(csv.contains("\"ok/has,comma.png\","), "{csv}");
    assert_eq!(csv.lines().count(), 1 + oks.len());
    // Nothing half-written is left behind.
    assert!(snapshot(&out).keys().all(|k| !k.contains(".tch-vis-tmp.")));
    // --strict: the run finishes, then exits 1 with one line.
    let mut strict = args.to_vec();
    strict.extend(["--strict", "--overwrite"]);
    let o = tch_vis(&strict);
    assert_code(&o, 1, "--strict with failures");
    assert_one_error_line(&o, "--strict");
    assert_eq!(report(&out)["processed"], 7);
}

/// scores.csv is sorted by path (byte order) and a rerun skips finished
/// work and keeps its rows; --overwrite recomputes.
#[test]
fn rerun_skips_finished_work_and_overwrite_recomputes() {
    let t = Tree::good(7);
    t.file("B_upper.png", &png_gray(32, 32, 9))
        .file("a_lower.png", &png_gray(32, 32, 8));
    let out = t.out("out");
    let (cnn, images) = (model("digits_cnn"), t.images());
    let args = [
        "saliency",
        "--model",
        &cnn,
        "--images",
        s(&images),
        "--out",
        s(&out),
    ];
    assert_code(&tch_vis(&args), 0, "first run");
    let paths = csv_paths(&out);
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted);
    assert_eq!(paths.first().map(String::as_str), Some("B_upper.png"));
    assert_eq!(paths.len(), 9);
    let r = report(&out);
    assert_eq!(
        (r["processed"].as_u64(), r["skipped"].as_u64()),
        (Some(9), Some(0))
    );
    for key in ["device", "seconds", "images_per_second"] {
        assert!(!r[key].is_null(), "report.json lacks {key}");
    }
    let before = snapshot(&out);
    // A new image appears: only it is processed.
    t.file("d9/new.png", &png_gray(30, 31, 5));
    assert_code(&tch_vis(&args), 0, "rerun");
    let r = report(&out);
    assert_eq!(
        (r["processed"].as_u64(), r["skipped"].as_u64()),
        (Some(1), Some(9))
    );
    let after = snapshot(&out);
    for (k, v) in &before {
        // The gallery shows the new image too.
        if k != "scores.csv" && k != "index.html" && !k.starts_with("gallery/") {
            assert!(after[k] == *v, "{k} changed on rerun");
        }
    }
    assert_eq!(csv_paths(&out).len(), 10);
    // A deleted output is recomputed.
    fs::remove_file(out.join("d0/img_000.png.saliency.png")).unwrap();
    assert_code(&tch_vis(&args), 0, "rerun after delete");
    assert_eq!(report(&out)["processed"], 1);
    assert_eq!(snapshot(&out), after);
    let mut ow = args.to_vec();
    ow.push("--overwrite");
    // A reader that has an old file open keeps its bytes.
    let npy = out.join("d0/img_000.png.saliency.npy");
    fs::write(&npy, b"old bytes").unwrap();
    let mut reader = fs::File::open(&npy).unwrap();
    assert_code(&tch_vis(&ow), 0, "overwrite");
    assert_eq!(report(&out)["processed"], 10);
    assert_eq!(snapshot(&out), after, "--overwrite gives the same bytes");
    let mut old = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut old).unwrap();
    assert_eq!(old, b"old bytes");
    // The experimental writer-thread count changes no byte; a bad one is
    // exit 2.
    let one = tch_vis_env(&ow, &[("TCH_VIS_WRITER_THREADS", "1")]);
    assert_code(&one, 0, "one writer thread");
    assert_eq!(
        snapshot(&out),
        after,
        "one writer thread gives the same bytes"
    );
    // Per-image files through temporary names (where a file system has no
    // `O_TMPFILE`) instead of linked into place: the same files and bytes,
    // no temporaries left.
    let temp = tch_vis_env(&ow, &[("TCH_VIS_LINKED_WRITES", "0")]);
    assert_code(&temp, 0, "temporary names");
    assert_eq!(snapshot(&out), after, "temporary names give the same files");
    let bad = tch_vis_env(&ow, &[("TCH_VIS_WRITER_THREADS", "0")]);
    assert_code(&bad, 2, "TCH_VIS_WRITER_THREADS=0");
    assert!(
        stderr(&bad).contains("TCH_VIS_WRITER_THREADS"),
        "{}",
        stderr(&bad)
    );
}

/// `--shard K/N` partitions the sorted list of all files: shards into
/// separate folders do not overlap and their union is the full run; shards
/// run one after another into one folder give the full run's files.
#[test]
fn shards_partition_the_folder_exactly() {
    let t = Tree::good(10);
    t.file("d1/broken.png", b"nope");
    let full = t.out("full");
    let m = model("digits_cnn");
    let base = |out: &Path| saliency_args(&m, &t.images(), out, &["--batch-size", "4"]);
    let run = |out: &Path, extra: &[&str], env: &[(&str, &str)]| {
        let o = tch_vis_env(&with(base(out), extra), env);
        assert_code(&o, 0, &format!("{extra:?} {env:?}"));
    };
    run(&full, &[], &[]);
    let full_rows = csv_paths(&full);
    let mut seen = Vec::new();
    let mut failed = Vec::new();
    for k in 0..3 {
        let out = t.out(&format!("shard{k}"));
        run(&out, &["--shard", &format!("{k}/3")], &[]);
        seen.extend(csv_paths(&out));
        failed.extend(
            report(&out)["failed"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["path"].to_string()),
        );
    }
    let n = seen.len();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), n, "shards overlap");
    assert_eq!(seen, full_rows, "union of shards != full run");
    assert_eq!(failed.len(), 1, "the broken file is in exactly one shard");
    // Sequential shards into one folder, the index taken from Slurm's and
    // Kubernetes' environment variables.
    let same = t.out("same");
    run(
        &same,
        &[],
        &[
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ],
    );
    assert_eq!(report(&same)["shard"], "1/3");
    run(
        &same,
        &["--shard-count", "3"],
        &[("JOB_COMPLETION_INDEX", "0")],
    );
    run(&same, &["--shard", "2/3"], &[]);
    assert_same_tree(&same, &full, "sequential shards vs full run");
}

/// After a kill -9 at some moment, a rerun completes only what is missing
/// and the outputs equal those of an uninterrupted run, byte for byte.
#[test]
fn kill_9_then_rerun_equals_an_uninterrupted_run() {
    let t = Tree::good(90);
    let m = model("digits_cnn");
    let args = |out: &Path| {
        let extra = ["--batch-size", "2", "--smooth-samples", "2", "--seed", "3"];
        saliency_args(&m, &t.images(), out, &extra)
    };
    let whole = t.out("whole");
    assert_code(&tch_vis(&args(&whole)), 0, "uninterrupted");

    let killed = t.out("killed");
    let mut child = spawn(&args(&killed));
    let start = Instant::now();
    loop {
        let n = fs::read_dir(killed.join("d0"))
            .map(|r| r.count())
            .unwrap_or(0);
        if n >= 12 || start.elapsed() > Duration::from_secs(30) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL on unix
    let status = child.wait().unwrap();
    let partial = snapshot(&killed).len();
    let maps = snapshot(&killed)
        .keys()
        .filter(|k| k.ends_with(".saliency.png"))
        .count();
    assert!(
        !status.success() && maps > 0 && maps < 90,
        "the kill must land mid-run: {status}, {maps} of 90 maps written"
    );
    eprintln!(
        "killed after {:?} ({status}), {partial} files",
        start.elapsed()
    );
    let o = tch_vis(&args(&killed));
    assert_code(&o, 0, "resume");
    let r = report(&killed);
    assert_eq!(
        r["processed"].as_u64().unwrap() + r["skipped"].as_u64().unwrap(),
        90
    );
    assert_same_tree(&killed, &whole, "resumed vs uninterrupted");
}

/// An --overwrite run with other settings, killed mid-run, leaves results
/// of both settings: a rerun that does not overwrite is refused (with
/// either settings, and a scores run too, the score being shared), an
/// overwriting run of one shard does not lift that, and once overwriting
/// shards cover the input, a rerun skips everything and the folder equals
/// an uninterrupted run's.
#[test]
fn a_stopped_overwrite_with_other_settings_is_finished_by_overwriting() {
    let t = Tree::good(90);
    let m = model("digits_cnn");
    let args = |out: &Path, class: &str, extra: &[&str]| {
        let score = format!("categorical:{class}");
        let mut a = vec!["--batch-size", "2", "--smooth-samples", "2", "--seed", "3"];
        a.extend_from_slice(&["--score", &score]);
        a.extend_from_slice(extra);
        saliency_args(&m, &t.images(), out, &a)
    };
    let whole = t.out("whole");
    assert_code(&tch_vis(&args(&whole, "1", &[])), 0, "uninterrupted");
    let out = t.out("out");
    assert_code(&tch_vis(&args(&out, "2", &[])), 0, "the first settings");

    kill_after_rows(spawn(&args(&out, "1", &["--overwrite"])), &out, 12);

    for class in ["1", "2"] {
        let o = tch_vis(&args(&out, class, &[]));
        assert_code(&o, 2, "a rerun that does not overwrite");
        assert!(
            stderr(&o).contains("rerun saliency with --overwrite"),
            "{}",
            stderr(&o)
        );
    }
    // The score is shared: the rows a scores run would keep are mixed too.
    let o = tch_vis(&scores_args(&m, &t.images(), &out, &[]));
    assert_code(&o, 2, "scores into the mixed folder");
    assert!(
        stderr(&o).contains("rerun saliency with --overwrite"),
        "{}",
        stderr(&o)
    );
    assert_code(
        &tch_vis(&args(&out, "1", &["--overwrite", "--shard", "0/2"])),
        0,
        "one part",
    );
    let o = tch_vis(&args(&out, "1", &[]));
    assert_code(&o, 2, "the other part still mixed");
    assert!(stderr(&o).contains("done so far: 0/2"), "{}", stderr(&o));
    // The other shard completes the change: the two parts cover the input.
    assert_code(
        &tch_vis(&args(&out, "1", &["--overwrite", "--shard", "1/2"])),
        0,
        "the other part",
    );
    let r = run_ok(&args(&out, "1", &[]), "a rerun");
    assert_eq!(
        (r["processed"].as_u64(), r["skipped"].as_u64()),
        (Some(0), Some(90))
    );
    assert_same_tree(&out, &whole, "finished by overwriting vs uninterrupted");
}

/// Shards of a settings change count together only over the same files:
/// with a file added between the two shards' runs, the indices after it
/// moved, some images were done by neither shard, and plain reruns stay
/// refused until an overwrite covers the new input.
#[test]
fn shards_of_a_change_over_different_files_do_not_cover_the_input() {
    let t = Tree::good(30);
    let m = model("digits_cnn");
    let args = class_args(&m, &t, &["--batch-size", "4"]);
    assert_code(&tch_vis(&args("2", &[])), 0, "the first settings");
    assert_code(
        &tch_vis(&args("1", &["--overwrite", "--shard", "0/2"])),
        0,
        "one part",
    );
    // A file that sorts first: every later index moves by one.
    t.file("a_added.png", &png_gray(30, 30, 99));
    assert_code(
        &tch_vis(&args("1", &["--overwrite", "--shard", "1/2"])),
        0,
        "the other part, over the new files",
    );
    refused_until_overwrite(
        &args("1", &[]),
        "a rerun over a folder neither part covered",
    );
    overwrite_then_rerun_skips(&args("1", &["--overwrite"]), &args("1", &[]), 31);
}

/// An `--overwrite` with other settings over another input (a subfolder)
/// into the same output folder leaves the results of the folder's other
/// input with the old settings: runs that do not overwrite are refused,
/// naming that input, until a run over it overwrites them; then both
/// inputs' plain reruns skip everything. `report.json` lists both inputs.
#[test]
fn an_overwrite_over_another_input_marks_the_folders_other_input() {
    let t = Tree::good(12);
    let m = model("digits_cnn");
    let root = t.images();
    let sub = root.join("d1");
    let out = t.out("out");
    let args = |images: &Path, class: &str, extra: &[&str]| {
        let score = format!("categorical:{class}");
        let mut a = vec!["--batch-size", "4", "--score", &score];
        a.extend_from_slice(extra);
        saliency_args(&m, images, &out, &a)
    };
    assert_code(&tch_vis(&args(&root, "2", &[])), 0, "the folder");
    assert_code(
        &tch_vis(&args(&sub, "1", &["--overwrite"])),
        0,
        "a subfolder with another score",
    );
    let canonical = |p: &Path| fs::canonicalize(p).unwrap().display().to_string();
    for images in [&root, &sub] {
        let e = refused_until_overwrite(&args(images, "1", &[]), "a plain rerun");
        let names = format!("runs over {} wrote", canonical(&root));
        assert!(e.contains(&names), "{e}");
    }
    // The score is shared: a scores run is refused too.
    assert_code(
        &tch_vis(&scores_args(&m, &root, &out, &[])),
        2,
        "scores into the mixed folder",
    );
    // Until a scores run over the folder has overwritten its rows: then
    // scores reruns are accepted, saliency's still refused.
    assert_code(
        &tch_vis(&scores_args(&m, &root, &out, &["--overwrite"])),
        0,
        "scores overwrites the folder's rows",
    );
    let r = run_ok(&scores_args(&m, &root, &out, &[]), "a plain scores run");
    assert_eq!(r["skipped"].as_u64(), Some(12));
    refused_until_overwrite(&args(&root, "1", &[]), "saliency's maps still mixed");
    overwrite_then_rerun_skips(
        &args(&root, "1", &["--overwrite"]),
        &args(&root, "1", &[]),
        12,
    );
    let r = run_ok(&args(&sub, "1", &[]), "a plain rerun of the subfolder");
    assert_eq!(
        (r["processed"].as_u64(), r["skipped"].as_u64()),
        (Some(0), Some(4))
    );
    let mut inputs = vec![canonical(&root), canonical(&sub)];
    inputs.sort();
    assert_eq!(r["results_inputs"], serde_json::json!(inputs));
}

/// A list of some of a folder's files, or one file of it, is a part of that
/// folder: an `--overwrite` with other settings over it marks the folder's
/// other inputs (a list of its other files, the folder) as still to be
/// redone, a rerun of that list or a run over the folder redoes them, and a
/// rerun of the same list alone is not refused.
#[test]
fn an_overwrite_over_a_list_or_one_file_marks_the_rest_of_the_folder() {
    let t = Tree::good(12);
    let m = model("digits_cnn");
    let root = t.images();
    let list = |name: &str, dirs: &[&str]| {
        let path = t.out(name);
        let mut text = String::new();
        for i in 0..12 {
            let rel = format!("d{}/img_{i:03}.png", i % 3);
            if dirs.iter().any(|d| rel.starts_with(d)) {
                text.push_str(&format!("{}\n", root.join(rel).display()));
            }
        }
        fs::write(&path, text).unwrap();
        path
    };
    let (d0, rest) = (list("d0.txt", &["d0"]), list("rest.txt", &["d1", "d2"]));
    let listed_into = |out: &Path, list: &Path, class: &str, extra: &[&str]| {
        let score = format!("categorical:{class}");
        let head = [
            "saliency",
            "--model",
            &m,
            "--images-from",
            s(list),
            "--root",
            s(&root),
            "--out",
            s(out),
            "--score",
            &score,
        ];
        with(owned(&head), extra)
    };
    let out = t.out("out");
    let listed = |list: &Path, class: &str, extra: &[&str]| listed_into(&out, list, class, extra);
    assert_code(&tch_vis(&listed(&rest, "2", &[])), 0, "a list");
    assert_code(
        &tch_vis(&listed(&d0, "1", &["--overwrite"])),
        0,
        "another list",
    );
    let e = refused_until_overwrite(&listed(&rest, "1", &[]), "the first list");
    assert!(
        e.contains("runs over list ") && e.contains("rest.txt"),
        "{e}"
    );
    overwrite_then_rerun_skips(
        &listed(&rest, "1", &["--overwrite"]),
        &listed(&rest, "1", &[]),
        8,
    );
    let r = run_ok(&listed(&d0, "1", &[]), "the other list");
    assert_eq!(r["skipped"].as_u64(), Some(4));
    // A folder of one list's results only: nothing else to mark.
    let alone = t.out("alone");
    let listed = |class: &str, extra: &[&str]| listed_into(&alone, &d0, class, extra);
    assert_code(&tch_vis(&listed("2", &[])), 0, "a list alone");
    assert_code(
        &tch_vis(&listed("1", &["--overwrite"])),
        0,
        "the list again",
    );
    assert_eq!(
        run_ok(&listed("1", &[]), "its rerun")["skipped"].as_u64(),
        Some(4)
    );

    // A list's unfinished overwrite (one shard of two) is named, and a run
    // over its folder finishes it.
    let part = t.out("part");
    let listed = |class: &str, extra: &[&str]| listed_into(&part, &rest, class, extra);
    assert_code(&tch_vis(&listed("2", &[])), 0, "the list");
    let half = ["--overwrite", "--shard", "0/2"];
    assert_code(&tch_vis(&listed("1", &half)), 0, "half of it");
    let e = refused_until_overwrite(&listed("1", &[]), "a list half overwritten");
    assert!(
        e.contains("rest.txt") && e.contains("(done so far: 0/2)"),
        "{e}"
    );
    let whole_folder = |extra: &[&str]| {
        let mut a = vec!["--score", "categorical:1"];
        a.extend_from_slice(extra);
        saliency_args(&m, &root, &part, &a)
    };
    overwrite_then_rerun_skips(&whole_folder(&["--overwrite"]), &whole_folder(&[]), 12);
    assert_eq!(
        run_ok(&listed("1", &[]), "the list")["skipped"].as_u64(),
        Some(8)
    );

    // One file of a folder that a folder run wrote.
    let whole = t.out("whole");
    let folder = |class: &str, extra: &[&str]| {
        let score = format!("categorical:{class}");
        let mut a = vec!["--score", score.as_str()];
        a.extend_from_slice(extra);
        saliency_args(&m, &root.join("d1"), &whole, &a)
    };
    assert_code(&tch_vis(&folder("2", &[])), 0, "the folder");
    let one = |class: &str, extra: &[&str]| {
        let score = format!("categorical:{class}");
        let mut a = vec!["--score", score.as_str()];
        a.extend_from_slice(extra);
        saliency_args(&m, &root.join("d1/img_004.png"), &whole, &a)
    };
    assert_code(&tch_vis(&one("1", &["--overwrite"])), 0, "one file");
    refused_until_overwrite(&folder("1", &[]), "the folder's other files");
    overwrite_then_rerun_skips(&folder("1", &["--overwrite"]), &folder("1", &[]), 4);
    assert_eq!(
        run_ok(&one("1", &[]), "the file")["skipped"].as_u64(),
        Some(1)
    );
}

/// A stopped `--overwrite` with another score (a setting all commands
/// share) refuses plain runs of every command; once another command has
/// overwritten all of the input with that score, its own plain runs are
/// accepted again, and the stopped command's stay refused until it
/// overwrites too.
#[test]
fn another_commands_overwrite_of_all_the_input_lifts_a_shared_mark_for_it() {
    let t = Tree::good(90);
    let m = model("digits_cnn");
    let out = t.out("out");
    let images = t.images();
    let saliency = |class: &str, extra: &[&str]| {
        let score = format!("categorical:{class}");
        let mut a = vec![
            "--batch-size",
            "2",
            "--smooth-samples",
            "2",
            "--score",
            &score,
        ];
        a.extend_from_slice(extra);
        saliency_args(&m, &images, &out, &a)
    };
    let scores = |extra: &[&str]| scores_args(&m, &images, &out, extra);
    assert_code(&tch_vis(&saliency("2", &[])), 0, "the first settings");
    kill_after_rows(spawn(&saliency("1", &["--overwrite"])), &out, 12);
    assert_code(&tch_vis(&scores(&[])), 2, "scores into the mixed folder");
    assert_code(&tch_vis(&scores(&["--overwrite"])), 0, "scores overwrites");
    let r = run_ok(&scores(&[]), "a plain scores rerun");
    assert_eq!(
        (r["processed"].as_u64(), r["skipped"].as_u64()),
        (Some(0), Some(90))
    );
    refused_until_overwrite(&saliency("1", &[]), "saliency's maps are still mixed");
    overwrite_then_rerun_skips(&saliency("1", &["--overwrite"]), &saliency("1", &[]), 90);
}

/// The arguments of a saliency run of `model` over `t`'s images into its
/// `out`, with `fixed` options, as a function of the class scored
/// (`categorical:CLASS`) and further options.
fn class_args<'a>(
    model: &'a str,
    t: &'a Tree,
    fixed: &'a [&'a str],
) -> impl Fn(&str, &[&str]) -> Vec<String> + 'a {
    move |class, extra| {
        let score = format!("categorical:{class}");
        let mut a = fixed.to_vec();
        a.extend_from_slice(&["--score", &score]);
        a.extend_from_slice(extra);
        saliency_args(model, &t.images(), &t.out("out"), &a)
    }
}

/// A saliency run refused (exit 2) because an `--overwrite` has not
/// finished a change of settings; its message.
fn refused_until_overwrite(args: &[String], what: &str) -> String {
    let o = tch_vis(args);
    assert_code(&o, 2, what);
    let e = stderr(&o);
    assert!(e.contains("rerun saliency with --overwrite"), "{what}: {e}");
    e
}

/// An `--overwrite` run that finishes, then a plain rerun that skips all
/// `n` images, with no marks or journals left.
fn overwrite_then_rerun_skips(overwrite: &[String], rerun: &[String], n: u64) {
    assert_code(&tch_vis(overwrite), 0, "overwrite");
    let r = run_ok(rerun, "a plain rerun");
    assert_eq!(
        (r["processed"].as_u64(), r["skipped"].as_u64()),
        (Some(0), Some(n))
    );
    let out = rerun.iter().position(|x| x == "--out").unwrap() + 1;
    assert!(!Path::new(&rerun[out]).join(".tch-vis").exists());
}

/// Kills `child` (a run into `out`) with SIGKILL once its journals hold
/// `rows` lines, and checks that it had not finished.
fn kill_after_rows(mut child: std::process::Child, out: &Path, rows: usize) {
    let journals = out.join(".tch-vis/rows");
    let start = Instant::now();
    loop {
        let n = fs::read_dir(&journals)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| fs::read_to_string(e.path()).map_or(0, |t| t.lines().count()))
            .sum::<usize>();
        if n >= rows || start.elapsed() > Duration::from_secs(30) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    assert!(
        !child.wait().unwrap().success(),
        "the kill must land mid-run"
    );
}

/// A first run killed mid-run, then an --overwrite with another score
/// that finishes: the killed run's settings no longer count, and a plain
/// rerun with the new score skips everything.
#[test]
fn an_overwrite_of_all_the_input_supersedes_a_killed_runs_settings() {
    let t = Tree::good(90);
    let m = model("digits_cnn");
    let args = class_args(&m, &t, &["--batch-size", "2", "--smooth-samples", "2"]);
    kill_after_rows(spawn(&args("2", &[])), &t.out("out"), 12);
    overwrite_then_rerun_skips(&args("1", &["--overwrite"]), &args("1", &[]), 90);
}

/// A first SIGTERM (Slurm's and Kubernetes' stop signal; SIGINT is
/// handled alike) ends a run cleanly: the image in progress is finished,
/// scores.csv holds a row for every image whose maps are written, and
/// report.json says why it stopped; exit 1. A rerun does the rest.
#[test]
fn sigterm_ends_the_run_with_scores_and_report_then_a_rerun_does_the_rest() {
    let t = Tree::good(40);
    let m = model("digits_cnn");
    let out = t.out("stopped");
    let args = |samples: &str| {
        let extra = ["--batch-size", "1", "--smooth-samples", samples];
        saliency_args(&m, &t.images(), &out, &extra)
    };
    let maps = || {
        snapshot(&out)
            .into_iter()
            .filter(|(k, _)| k.ends_with(".saliency.npy"))
            .collect::<Vec<_>>()
    };
    // While the run writes, files come and go (temporaries, journals): the
    // wait only looks for a map's name.
    let any_map = || {
        let mut stack = vec![out.clone()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.to_string_lossy().ends_with(".saliency.npy") {
                    return true;
                }
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(p);
                }
            }
        }
        false
    };
    let child = spawn(&args("300"));
    let start = Instant::now();
    while !any_map() && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on the child's process id.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let o = child.wait_with_output().unwrap();
    assert_code(&o, 1, "SIGTERM");
    assert_one_error_line(&o, "SIGTERM");
    let done = maps();
    let err = stderr(&o);
    let expected = format!("interrupted by SIGTERM after {} of 40 images", done.len());
    assert!(err.contains(&expected), "{err} (expected {expected})");
    assert!(!done.is_empty() && done.len() < 40, "{} maps", done.len());
    // Every map whole, with its heatmap and its row; nothing else.
    for (k, bytes) in &done {
        let npy = Tensor::read_npy(out.join(k)).unwrap();
        assert_eq!(npy.size().len(), 2, "{k}");
        assert!(bytes.len() > 128, "{k}");
        let png = out.join(k.replace(".saliency.npy", ".saliency.png"));
        assert!(png.is_file(), "{}", png.display());
    }
    let rows = csv_paths(&out);
    assert_eq!(rows.len(), done.len());
    let r = report(&out);
    assert_eq!(r["processed"].as_u64(), Some(done.len() as u64));
    assert!(r["error"].as_str().unwrap().contains(&expected));
    assert!(!out.join(".tch-vis").exists(), "journals left behind");
    // The gallery of what is done.
    let gallery = snapshot(&out.join("gallery"));
    assert!(out.join("index.html").is_file() && !gallery.is_empty());
    let pages: String = gallery
        .values()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    for (k, _) in &done {
        let png = k.replace(".saliency.npy", ".saliency.png");
        assert!(pages.contains(&png), "{png} not in the gallery");
    }
    // The rest, with the same settings (other ones would be refused: the
    // folder holds results of these).
    let rest = run_ok(&args("300"), "rerun");
    assert_eq!(rest["skipped"].as_u64(), Some(done.len() as u64));
    assert_eq!(rest["processed"].as_u64(), Some(40 - done.len() as u64));
    assert_eq!(csv_paths(&out).len(), 40);
}

/// A signal the CLI was started with ignored stays ignored, as `nohup`
/// leaves SIGHUP: the run goes on to its end.
#[test]
fn an_ignored_sighup_stays_ignored() {
    use std::os::unix::process::CommandExt;
    let t = Tree::good(8);
    let m = model("digits_cnn");
    let out = t.out("nohup");
    let extra = ["--batch-size", "1", "--smooth-samples", "600"];
    let mut cmd = Command::new(BIN);
    cmd.args(saliency_args(&m, &t.images(), &out, &extra))
        .env("CUDA_VISIBLE_DEVICES", "")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: only signal(2) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    let start = Instant::now();
    while !out.join("d0").exists() && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on the child's process id.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGHUP) }, 0);
    let o = child.wait_with_output().unwrap();
    assert_code(&o, 0, "ignored SIGHUP");
    assert_eq!(report(&out)["processed"].as_u64(), Some(8));
}

/// `scores` writes only scores.csv and report.json, with the same values
/// as `saliency`; a multi-output model gets one column per output.
#[test]
fn scores_subcommand_and_multi_output_models() {
    let t = Tree::good(4);
    let (a, b) = (t.out("sal"), t.out("sc"));
    let cnn = model("digits_cnn");
    let imgs = t.images();
    assert_code(
        &tch_vis(&[
            "saliency",
            "--model",
            &cnn,
            "--images",
            s(&imgs),
            "--out",
            s(&a),
        ]),
        0,
        "saliency",
    );
    assert_code(
        &tch_vis(&[
            "scores",
            "--model",
            &cnn,
            "--images",
            s(&imgs),
            "--out",
            s(&b),
        ]),
        0,
        "scores",
    );
    assert_eq!(
        fs::read(a.join("scores.csv")).unwrap(),
        fs::read(b.join("scores.csv")).unwrap()
    );
    let files: Vec<_> = snapshot(&b).into_keys().collect();
    assert_eq!(files, vec!["scores.csv"]);
    let c = t.out("multi");
    let o = tch_vis(&[
        "saliency",
        "--model",
        &model_multi(),
        "--images",
        s(&imgs),
        "--out",
        s(&c),
        "--score",
        "categorical:3",
        "--score",
        "regression:maintain=3",
    ]);
    assert_code(&o, 0, "multi");
    let csv = fs::read_to_string(c.join("scores.csv")).unwrap();
    assert!(
        csv.starts_with("path,score_0,score_1,class_0,label_0\n"),
        "{csv}"
    );
    assert!(csv.lines().skip(1).all(|l| l.split(',').count() == 5));
}

/// SmoothGrad is reproducible with --seed and changes with it.
#[test]
fn smoothgrad_is_reproducible_with_a_seed() {
    let t = Tree::good(3);
    let m = model("digits_cnn");
    let run = |name: &str, seed: &str| {
        let out = t.out(name);
        let o = tch_vis(&[
            "saliency",
            "--model",
            &m,
            "--images",
            s(&t.images()),
            "--out",
            s(&out),
            "--smooth-samples",
            "4",
            "--smooth-noise",
            "0.3",
            "--seed",
            seed,
            "--save-npy",
        ]);
        assert_code(&o, 0, name);
        snapshot(&out)
    };
    let (a, b, c) = (run("a", "1"), run("b", "1"), run("c", "2"));
    assert_eq!(a, b);
    let k = "d0/img_000.png.grad.npy";
    assert!(a[k] != c[k], "another seed gives other noise");
    assert_eq!(
        a["scores.csv"], c["scores.csv"],
        "scores are of the clean image"
    );
}

/// The CLI matches PyTorch: preprocessing, gradients and maps of every
/// bundled sample image with digits_cnn and `predicted` (goldens written by
/// scripts/make_goldens.py on this project's CPU machine), float32: gradients
/// at rtol 1e-5 / atol 1e-6; maps, which are in [0, 1] and amplify the tiny
/// gradients of saturated softmax outputs, at atol 1e-5 plus what the
/// measured gradient difference explains (another CPU's vector units or
/// thread count sum in another order). The goldens are computed as the CLI
/// computes: row 0 of a padded 32-row batch, on one thread.
#[test]
fn saliency_matches_pytorch_goldens() {
    check_goldens("cpu", 1e-5, 1e-6, 1e-5);
}

/// The same on CUDA (IEEE float32: the CLI turns TF32 off), where cuDNN's
/// kernels sum in another order than the CPU's: gradients at rtol 1e-4 /
/// atol 1e-6. Maps at atol 2e-2: where digits_cnn is 99.9996% sure, the
/// gradient is ~1e-7 and `(m - min) / (max - min + 1e-7)` turns its
/// last-digit differences into visible ones (1.4e-2 was measured on an
/// H200; every other image agrees far closer).
#[test]
fn saliency_on_cuda_matches_pytorch_goldens() {
    if !tch::Cuda::is_available() {
        eprintln!("skipped: no CUDA");
        return;
    }
    check_goldens("cuda", 1e-4, 1e-6, 1e-5);
}

fn check_goldens(device: &str, rtol: f64, atol: f64, map_atol: f64) {
    let manifest = root().join("tests/golden/preprocess/manifest.json");
    let text = fs::read_to_string(&manifest).unwrap_or_else(|e| {
        panic!(
            "{} cannot be read ({e}); run scripts/make_goldens.py",
            manifest.display()
        )
    });
    let items: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cnn = model("digits_cnn");
    let images = root().join("examples/images");
    let args = [
        "saliency",
        "--model",
        &cnn,
        "--images",
        s(&images),
        "--out",
        s(&out),
        "--save-npy",
        "--device",
        device,
    ];
    let o = if device == "cpu" {
        tch_vis(&args)
    } else {
        Command::new(BIN).args(args).output().unwrap()
    };
    assert_code(&o, 0, "golden run");
    let csv = fs::read_to_string(out.join("scores.csv")).unwrap();
    let scores: BTreeMap<&str, f64> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let mut fields = l.split(',');
            let p = fields.next().unwrap();
            (p, fields.next().unwrap().parse().unwrap())
        })
        .collect();
    assert_eq!(scores.len(), items.len());
    let gdir = root().join("tests/golden/preprocess");
    let mut worst = [0.0f64; 2];
    let mut ties = 0;
    for item in &items {
        let rel = item["path"].as_str().unwrap();
        let read = |dir: &Path, name: &str| {
            let t = Tensor::read_npy(dir.join(name)).unwrap();
            assert_eq!(t.kind(), tch::Kind::Float, "{rel} {name}");
            t
        };
        // The signed gradient, against PyTorch's.
        let want = read(&gdir, item["grad"].as_str().unwrap());
        let got = read(&out, &format!("{rel}.grad.npy"));
        assert_eq!(got.size(), want.size(), "{rel} grad");
        let gdiff = (&got - &want).abs().max().double_value(&[]);
        if got.allclose(&want, rtol, atol, false) {
            worst[0] = worst[0].max(gdiff);
        } else {
            crate::util::max_pool_tie(
                &format!("{rel} grad on {device}"),
                &got,
                &want,
                rtol,
                atol,
                0.1,
                1e-3,
            );
            ties += 1;
        }
        // The map `(m - min) / (max - min + 1e-7)` of m = max over channels
        // of |gradient|: a gradient difference d moves it by at most
        // ~3 d / (max - min). Where the softmax saturates, max - min is
        // ~1e-7 and libtorch's summation order (thread count, vector
        // units, cuDNN) shows: the tolerance is map_atol plus what the
        // measured gradient difference explains.
        let m = want.abs().amax([0i64].as_slice(), false);
        let range = (m.max() - m.min()).double_value(&[]);
        let tol = map_atol + 4.0 * gdiff / (range + 1e-7);
        let want = read(&gdir, item["saliency"].as_str().unwrap());
        let got = read(&out, &format!("{rel}.saliency.npy"));
        assert_eq!(got.size(), want.size(), "{rel} map");
        let diff = (&got - &want).abs().max().double_value(&[]);
        worst[1] = worst[1].max(diff);
        assert!(
            diff <= tol,
            "{rel} map on {device}: max |diff| {diff} > {tol:e} (gradient max |diff| {gdiff:e}, range {range:e})"
        );
        let want = item["score"].as_f64().unwrap();
        let got = scores[rel];
        assert!(
            (got - want).abs() <= rtol * want.abs() + 1e-6,
            "{rel}: score {got} vs {want}"
        );
    }
    println!(
        "cli goldens on {device}: {} images, max |diff| grad {:.2e} ({ties} with a max-pool tie, \
         checked apart), saliency map {:.2e}",
        items.len(),
        worst[0],
        worst[1]
    );
    assert!(
        ties * 4 <= items.len(),
        "{ties} of {} images differ by max-pool ties: more than ties explain",
        items.len()
    );
}

/// Starts the CLI as [`tch_vis_env`] does, without waiting.
fn spawn(args: &[String]) -> std::process::Child {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("CUDA_VISIBLE_DEVICES", "")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_ARRAY_TASK_COUNT")
        .env_remove("JOB_COMPLETION_INDEX")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

/// `args` as owned strings.
fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|x| x.to_string()).collect()
}

fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(owned(extra));
    args
}

fn run_ok(args: &[String], what: &str) -> serde_json::Value {
    let o = tch_vis(args);
    assert_code(&o, 0, what);
    let out = args.iter().position(|x| x == "--out").unwrap() + 1;
    report(Path::new(&args[out]))
}

/// Four workers with different shards, at the same time, into one folder:
/// no row or file is lost or clobbered, scores.csv equals a single run's,
/// the journals are folded away, report.json lists every worker, and a
/// rerun without --shard skips everything.
#[test]
fn concurrent_shard_workers_into_one_folder_lose_nothing() {
    let t = Tree::good(120);
    t.file("d1/broken.png", b"nope");
    let m = model("digits_cnn");
    for cmd in ["scores", "saliency"] {
        let base = |out: &Path| {
            let a = saliency_args(&m, &t.images(), out, &["--batch-size", "4"]);
            let mut a: Vec<String> = a.into_iter().filter(|x| x != "--save-npy").collect();
            a[0] = cmd.to_string();
            a
        };
        let single = t.out(&format!("{cmd}-single"));
        run_ok(&base(&single), "single run");
        let shared = t.out(&format!("{cmd}-shared"));
        let workers: Vec<_> = (0..4)
            .map(|k| spawn(&with(base(&shared), &["--shard", &format!("{k}/4")])))
            .collect();
        for (k, w) in workers.into_iter().enumerate() {
            let o = w.wait_with_output().unwrap();
            assert_code(&o, 0, &format!("{cmd} worker {k}"));
        }
        assert_eq!(
            fs::read_to_string(shared.join("scores.csv")).unwrap(),
            fs::read_to_string(single.join("scores.csv")).unwrap(),
            "{cmd}: scores.csv of 4 concurrent shards vs one run"
        );
        assert_eq!(csv_paths(&shared).len(), 120);
        assert_same_tree(&shared, &single, &format!("{cmd}: concurrent shards"));
        assert!(!shared.join(".tch-vis").exists(), "journals folded away");
        let r = report(&shared);
        assert_eq!(r["workers"].as_array().unwrap().len(), 4, "{r}");
        let rerun = run_ok(&base(&shared), "rerun");
        assert_eq!(rerun["processed"], 0, "{cmd}: rerun computed again");
        assert_eq!(rerun["skipped"], 120);
        assert_eq!(rerun["failed"].as_array().unwrap().len(), 1);
    }
}

/// One of two concurrent workers is killed mid-run; the other finishes;
/// a rerun of the killed worker's shard gives the bytes of one
/// uninterrupted run.
#[test]
fn a_killed_concurrent_worker_rerun_equals_an_uninterrupted_run() {
    let t = Tree::good(90);
    let m = model("digits_cnn");
    let args = |out: &Path| {
        let extra = ["--batch-size", "2", "--smooth-samples", "2", "--seed", "3"];
        saliency_args(&m, &t.images(), out, &extra)
    };
    let whole = t.out("whole");
    run_ok(&args(&whole), "uninterrupted");
    let shared = t.out("shared");
    let mut victim = spawn(&with(args(&shared), &["--shard", "0/2"]));
    let other = spawn(&with(args(&shared), &["--shard", "1/2"]));
    let mut rels: Vec<String> = (0..90)
        .map(|i| format!("d{}/img_{i:03}.png", i % 3))
        .collect();
    rels.sort();
    let mine: Vec<&String> = rels.iter().step_by(2).collect();
    let done = |out: &Path| {
        mine.iter()
            .filter(|r| out.join(format!("{r}.saliency.png")).exists())
            .count()
    };
    let start = Instant::now();
    while done(&shared) < 6 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    victim.kill().unwrap();
    let status = victim.wait().unwrap();
    let n = done(&shared);
    assert!(
        !status.success() && n > 0 && n < mine.len(),
        "the kill must land mid-run: {status}, {n} of {} maps",
        mine.len()
    );
    assert_code(&other.wait_with_output().unwrap(), 0, "other worker");
    let r = run_ok(
        &with(args(&shared), &["--shard", "0/2"]),
        "rerun of shard 0",
    );
    assert!(r["processed"].as_u64().unwrap() < 45, "{r}");
    assert_same_tree(&shared, &whole, "killed + rerun vs uninterrupted");
    assert!(!shared.join(".tch-vis").exists());
}

/// The recipe for every GPU of a node (one process per GPU, each with its
/// own shard), run on the CPU with two workers: the same tree as one run.
#[test]
fn all_gpus_recipe_gives_one_runs_outputs() {
    let t = Tree::good(30);
    let m = model("digits_cnn");
    let single = t.out("single");
    run_ok(&saliency_args(&m, &t.images(), &single, &[]), "single");
    let node = t.out("node");
    let o = Command::new("bash")
        .arg(root().join("scripts/all_gpus.sh"))
        .args(saliency_args(&m, &t.images(), &node, &[]))
        .env("TCH_VIS_BIN", BIN)
        .env("TCH_VIS_GPUS", "2")
        .env("TCH_VIS_DEVICE", "cpu")
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .unwrap();
    assert_code(&o, 0, "scripts/all_gpus.sh");
    assert_same_tree(&node, &single, "two workers vs one run");
}

/// scores.csv names the class each image's score took and its label from
/// the sidecar, after the score columns.
#[test]
fn scores_csv_has_class_and_label_columns() {
    let t = Tree::good(3);
    let out = t.out("out");
    let m = model("digits_cnn");
    run_ok(
        &saliency_args(&m, &t.images(), &out, &["--score", "categorical:7"]),
        "run",
    );
    let text = fs::read_to_string(out.join("scores.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("path,score_0,class_0,label_0"));
    for l in lines {
        assert!(l.ends_with(",7,7"), "{l}");
    }
    let r = report(&out);
    assert_eq!(
        r["classes"],
        serde_json::json!([{"output": 0, "class": 7, "label": "7", "images": 3}])
    );
}

fn pearson(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.reshape([-1]).to_kind(tch::Kind::Double);
    let b = b.reshape([-1]).to_kind(tch::Kind::Double);
    let (a, b) = (&a - a.mean(None), &b - b.mean(None));
    let num = (&a * &b).sum(None).double_value(&[]);
    let den = ((&a * &a).sum(None) * (&b * &b).sum(None))
        .sqrt()
        .double_value(&[]);
    num / den.max(1e-30)
}

/// `--precision bf16` runs on the CPU too, and its maps follow fp32's.
#[test]
fn bf16_maps_correlate_with_fp32() {
    let m = model("digits_cnn");
    let images = root().join("examples/images");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("fp32"), dir.path().join("bf16"));
    run_ok(&saliency_args(&m, &images, &a, &[]), "fp32");
    let r = run_ok(
        &saliency_args(&m, &images, &b, &["--precision", "bf16"]),
        "bf16",
    );
    assert_eq!(r["precision"], "bf16");
    // Where the softmax saturates (p > 0.999), the fp32 gradient is near
    // bf16's rounding of 1 - p and the bf16 map is mostly noise: those
    // images are reported, not held to the bound.
    let (mut all, mut unsaturated) = (Vec::new(), Vec::new());
    let text = fs::read_to_string(a.join("scores.csv")).unwrap();
    for line in text.lines().skip(1) {
        let mut fields = line.split(',');
        let rel = fields.next().unwrap();
        let p: f64 = fields.next().unwrap().parse().unwrap();
        let f = |o: &Path| Tensor::read_npy(o.join(format!("{rel}.saliency.npy"))).unwrap();
        let r = pearson(&f(&a), &f(&b));
        all.push(r);
        if p < 0.999 {
            unsaturated.push(r);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!(
        "bf16 vs fp32 maps on CPU: mean Pearson r {:.4} over {} images, {:.4} over the {} with p < 0.999",
        mean(&all),
        all.len(),
        mean(&unsaturated),
        unsaturated.len()
    );
    assert_eq!(all.len(), 24);
    assert!(
        unsaturated.len() >= 5 && mean(&unsaturated) > 0.9,
        "{unsaturated:?}"
    );
}

/// The model on the CPU and its preprocessor, to compare the CLI with the
/// library.
fn model_and_preprocessor(m: &str) -> (tch_vis::Model, tch_vis::preprocess::Preprocessor) {
    let net = tch_vis::Model::load(m, tch::Device::Cpu).unwrap();
    let sidecar = tch_vis::preprocess::Sidecar::for_model(m).unwrap();
    (net, tch_vis::preprocess::Preprocessor::new(sidecar))
}

/// Runs `tch-vis cam --method METHOD --score categorical:CLASS` on the CPU
/// and checks each REL.cam.npy against the library's map of the same
/// preprocessed image (max |diff| ≤ 1e-5) and that REL.cam.png exists;
/// returns `(REL, map)` for every image.
fn cam_matches_library(
    m: &str,
    images: &Path,
    out: &Path,
    method: &str,
    class: usize,
) -> Vec<(String, Tensor)> {
    use tch_vis::cam::{Cam, CamMethod};
    let (net, pre) = model_and_preprocessor(m);
    let spec = format!("categorical:{class}");
    let args: Vec<String> = owned(&[
        "cam",
        "--model",
        m,
        "--images",
        s(images),
        "--out",
        s(out),
        "--method",
        method,
        "--score",
        &spec,
        "--device",
        "cpu",
    ]);
    run_ok(&args, method);
    let score = tch_vis::scores::CategoricalScore::new(class).unwrap();
    let method_enum: CamMethod = method.parse().unwrap();
    csv_paths(out)
        .into_iter()
        .map(|rel| {
            let got = Tensor::read_npy(out.join(format!("{rel}.cam.npy"))).unwrap();
            let x = pre.load(images.join(&rel)).unwrap().input.unsqueeze(0);
            let want = Cam::new(&net, method_enum)
                .compute(&x, &[&score as &dyn tch_vis::scores::Score])
                .unwrap()
                .maps
                .get(0);
            let diff = (&got - &want).abs().max().double_value(&[]);
            assert!(
                diff <= 1e-5,
                "{method} {rel}: CLI vs library max |diff| {diff}"
            );
            assert!(out.join(format!("{rel}.cam.png")).is_file(), "{rel}");
            (rel, got)
        })
        .collect()
}

/// `tch-vis cam`: every method writes REL.cam.npy (H, W) float32 maps in
/// [0, 1] equal to the library's, and REL.cam.png; a model without
/// forward_features / forward_head is bad usage (exit 2, nothing written).
#[test]
fn cam_subcommand_writes_the_librarys_maps() {
    let t = Tree::good(5);
    let m = model("digits_cnn");
    for method in [
        "gradcam",
        "gradcam++",
        "layercam",
        "scorecam",
        "fasterscorecam",
    ] {
        let maps = cam_matches_library(&m, &t.images(), &t.out(method), method, 3);
        assert_eq!(maps.len(), 5, "{method}");
        let (_, got) = maps
            .iter()
            .find(|(rel, _)| rel == "d1/img_001.png")
            .unwrap();
        assert_eq!((got.size(), got.kind()), (vec![32, 32], tch::Kind::Float));
    }
    let out = t.out("dense");
    let o = tch_vis(&[
        "cam",
        "--model",
        &model("digits_dense"),
        "--images",
        s(&t.images()),
        "--out",
        s(&out),
        "--method",
        "gradcam",
    ]);
    assert_code(&o, 2, "model without CAM methods");
    assert_one_error_line(&o, "model without CAM methods");
    assert!(stderr(&o).contains("export_cam_model.py"), "{}", stderr(&o));
    assert!(!out.exists());
}

/// `tch-vis cam` on the dict form of the CAM convention (forward returns
/// {"features", "output"}; here at a layer inside a residual block): the
/// library's maps for every method; a model whose dict has no "features"
/// entry, or nothing else, is bad usage (exit 2, nothing written).
#[test]
fn cam_subcommand_takes_the_dict_form() {
    let t = Tree::good(2);
    let m = root()
        .join("tests/golden/cam/resnet_narrow_inner.pt")
        .display()
        .to_string();
    for method in ["gradcam", "layercam", "fasterscorecam"] {
        let maps = cam_matches_library(&m, &t.images(), &t.out(method), method, 7);
        assert_eq!(maps.len(), 2, "{method}");
        for (rel, got) in maps {
            assert_eq!(got.size(), vec![96, 128], "{method} {rel}");
            assert!(
                got.max().double_value(&[]) > 0.5,
                "{method} {rel}: an empty map"
            );
        }
    }
    for (name, says) in [
        ("no_features", "\"features\""),
        ("only_features", "only the"),
    ] {
        let out = t.out(name);
        let bad = root().join(format!("tests/models/dict_{name}.pt"));
        let o = tch_vis(&[
            "cam",
            "--model",
            s(&bad),
            "--images",
            s(&t.images()),
            "--out",
            s(&out),
            "--method",
            "gradcam",
        ]);
        assert_code(&o, 2, name);
        assert_one_error_line(&o, name);
        assert!(stderr(&o).contains(says), "{name}: {}", stderr(&o));
        assert!(!out.exists(), "{name}");
    }
}

/// A model exported with `scripts/export_cam_model.py --freeze` (batch norms
/// folded into the convolutions, weights as constants): its maps equal its
/// unfrozen twin's within float32 rounding on every method, and half
/// precision, which cannot convert constants, is refused before the first
/// image with a message that says why (exit 2, nothing written).
#[test]
fn frozen_cam_exports_match_their_unfrozen_twin_and_refuse_half_precision() {
    let t = Tree::good(4);
    let images = t.images();
    let dir = root().join("tests/models");
    let plain = dir.join("cam_rgb.pt").display().to_string();
    let frozen = dir.join("cam_rgb_frozen.pt").display().to_string();
    let run = |m: &str, out: &Path, method: &str, extra: &[&str]| {
        let mut args = vec![
            "cam",
            "--model",
            m,
            "--images",
            s(&images),
            "--out",
            s(out),
            "--method",
            method,
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        tch_vis(&args)
    };
    for method in ["gradcam", "gradcam++", "layercam", "scorecam"] {
        let (a, b) = (
            t.out(&format!("{method}-plain")),
            t.out(&format!("{method}-frozen")),
        );
        assert_code(&run(&plain, &a, method, &[]), 0, method);
        assert_code(&run(&frozen, &b, method, &[]), 0, method);
        let mut compared = 0;
        for rel in csv_paths(&a) {
            let x = Tensor::read_npy(a.join(format!("{rel}.cam.npy"))).unwrap();
            let y = Tensor::read_npy(b.join(format!("{rel}.cam.npy"))).unwrap();
            assert_eq!(x.size(), vec![96, 96]);
            let diff = (&x - &y).abs().max().double_value(&[]);
            assert!(
                diff <= 1e-5,
                "{method} {rel}: frozen vs unfrozen max |diff| {diff}"
            );
            compared += 1;
        }
        assert_eq!(compared, 4, "{method}");
    }
    let out = t.out("bf16");
    let o = run(&frozen, &out, "gradcam", &["--precision", "bf16"]);
    assert_code(&o, 2, "frozen model in bf16");
    assert_one_error_line(&o, "frozen model in bf16");
    let err = stderr(&o);
    assert!(
        err.contains("frozen model") && err.contains("RuntimeError"),
        "{err}"
    );
    assert!(!out.exists());
}

/// `tch-vis integrated-gradients`: REL.ig.npy (C, H, W) equal to the
/// library's attributions, and an `ig_delta` column.
#[test]
fn integrated_gradients_subcommand_writes_attributions_and_deltas() {
    use tch_vis::integrated_gradients::IntegratedGradients;
    let t = Tree::good(3);
    let m = model("digits_cnn");
    let out = t.out("ig");
    let args = owned(&usage(
        "integrated-gradients",
        &m,
        s(&t.images()),
        s(&out),
        &["--steps", "16"],
    ));
    run_ok(&args, "ig");
    let text = fs::read_to_string(out.join("scores.csv")).unwrap();
    assert!(
        text.starts_with("path,score_0,class_0,label_0,ig_delta\n"),
        "{text}"
    );
    let (net, pre) = model_and_preprocessor(&m);
    let rel = "d0/img_000.png";
    let x = pre.load(t.images().join(rel)).unwrap().input.unsqueeze(0);
    let p = tch_vis::scores::PredictedScore::new();
    let want = IntegratedGradients::new(&net)
        .steps(16)
        .attribute(&x, &[&p as &dyn tch_vis::scores::Score])
        .unwrap();
    let got = Tensor::read_npy(out.join(format!("{rel}.ig.npy"))).unwrap();
    assert_eq!(got.size(), vec![1, 32, 32]);
    let scale = want.attributions.abs().max().double_value(&[]);
    let diff = (&got - want.attributions.get(0))
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff <= 1e-4 * scale, "max |diff| {diff} (largest {scale})");
    let row = text.lines().find(|l| l.starts_with(rel)).unwrap();
    let delta: f64 = row.rsplit(',').next().unwrap().parse().unwrap();
    assert!(
        (delta - want.delta.double_value(&[0])).abs() < 1e-4,
        "{row}"
    );
}

/// `tch-vis maximize`: one image per listed class, the same seed gives the
/// same bytes, the npy fed to the model gives the reported score, and a
/// class out of range is exit 2 with nothing written.
#[test]
fn maximize_subcommand_is_reproducible_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let m = model("digits_cnn");
    let run = |name: &str| {
        let out = dir.path().join(name);
        let o = tch_vis(&[
            "maximize",
            "--model",
            &m,
            "--out",
            s(&out),
            "--score",
            "categorical:1,7",
            "--steps",
            "30",
            "--seed",
            "4",
        ]);
        assert_code(&o, 0, "maximize");
        out
    };
    let (a, b) = (run("a"), run("b"));
    for k in 0..2 {
        for ext in ["npy", "png"] {
            let f = format!("maximize_{k}.{ext}");
            assert_eq!(
                fs::read(a.join(&f)).unwrap(),
                fs::read(b.join(&f)).unwrap(),
                "{f}"
            );
        }
    }
    assert!(!a.join("maximize_2.npy").exists());
    let r = report(&a);
    let net = tch_vis::Model::load(&m, tch::Device::Cpu).unwrap();
    for (k, class) in [(0usize, 1i64), (1, 7)] {
        let x = Tensor::read_npy(a.join(format!("maximize_{k}.npy"))).unwrap();
        assert_eq!(x.size(), vec![1, 32, 32]);
        let p = net.forward(&[x.unsqueeze(0)]).unwrap()[0].double_value(&[0, class]);
        let reported = r["final_scores"][k].as_f64().unwrap();
        assert!((p - reported).abs() < 1e-5, "{p} vs {reported}");
    }
    let curve = r["curve"].as_array().unwrap();
    assert_eq!(curve.len(), 30);
    // Exit 2, nothing written; a missing model is named as such, not as
    // its missing sidecar.
    let out = dir.path().join("bad");
    for (what, model, score) in [
        ("class out of range", m.as_str(), "categorical:10"),
        ("missing model", "/nonexistent/m.pt", "categorical:1"),
    ] {
        let o = tch_vis(&[
            "maximize",
            "--model",
            model,
            "--out",
            s(&out),
            "--score",
            score,
        ]);
        assert_code(&o, 2, what);
        assert_one_error_line(&o, what);
        assert!(!out.exists(), "{what}");
        let err = stderr(&o);
        if what == "missing model" {
            assert!(err.contains(model) && !err.contains("sidecar"), "{err}");
        }
    }
}

/// `--images FILE` and `--images-from -` (with `--root`) name outputs as a
/// folder run does.
#[test]
fn single_files_and_lists_of_paths() {
    let t = Tree::good(4);
    let m = model("digits_cnn");
    let folder = t.out("folder");
    run_ok(&saliency_args(&m, &t.images(), &folder, &[]), "folder");
    let listed = t.out("listed");
    let mut child = Command::new(BIN)
        .args(
            saliency_args(&m, Path::new("unused"), &listed, &[])
                .iter()
                .map(|a| {
                    if a == "--images" {
                        "--images-from".to_string()
                    } else if a == "unused" {
                        "-".to_string()
                    } else {
                        a.clone()
                    }
                }),
        )
        .args(["--root", s(&t.images())])
        .env("CUDA_VISIBLE_DEVICES", "")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for i in (0..4).rev() {
            writeln!(
                stdin,
                "{}",
                t.images()
                    .join(format!("d{}/img_{i:03}.png", i % 3))
                    .display()
            )
            .unwrap();
        }
    }
    assert_code(&child.wait_with_output().unwrap(), 0, "--images-from -");
    assert_same_tree(&listed, &folder, "list vs folder");
    let single = t.out("single");
    let file = t.images().join("d2/img_002.png");
    run_ok(&saliency_args(&m, &file, &single, &[]), "single file");
    assert_eq!(csv_paths(&single), ["img_002.png"]);
    // A list of paths relative to the list's folder, not to the current
    // directory, with --root that folder: the message says where each was
    // looked for; a --root that does not exist is named as such.
    let list = t.images().join("list.txt");
    fs::write(&list, "d0/img_000.png\n").unwrap();
    let rel = t.out("rel");
    let listed_args = |root: &str| {
        owned(&[
            "scores",
            "--model",
            &m,
            "--images-from",
            s(&list),
            "--root",
            root,
            "--out",
            s(&rel),
        ])
    };
    for (root, says) in [
        (s(&t.images()), "d0/img_000.png, read as "),
        (
            "/nonexistent/root",
            "/nonexistent/root: No such file or directory",
        ),
    ] {
        let a = listed_args(root);
        let o = tch_vis(&a);
        assert_code(&o, 2, root);
        assert_one_error_line(&o, root);
        let err = stderr(&o);
        assert!(err.contains(says), "{root}: {err}");
    }
}

/// Colour inputs over 64 × 64 get every core: the binary restarts once with
/// `OMP_WAIT_POLICY=PASSIVE` (its image list on standard input handed on
/// unread) and hands the model contiguous batches (channels-last ones
/// with `--channels-last`). A policy the user set
/// is kept, with the same outputs; a small model never restarts, nor does a
/// folder of fewer images than the restart pays for.
#[test]
fn large_colour_inputs_restart_with_passive_openmp() {
    let t = Tree::good(4);
    let big = root()
        .join("tests/models/avgpool_rgb.pt")
        .display()
        .to_string();
    let images = t.images();
    let run_with =
        |command: &str, model: &str, out: &Path, policy: Option<&str>, flags: &[&str]| {
            let mut cmd = Command::new(BIN);
            cmd.args([command, "--model", model, "--images-from", "-"])
                .args(flags)
                .args(["--root", s(&images), "--out", s(out), "--device", "cpu"])
                .env("CUDA_VISIBLE_DEVICES", "")
                .env_remove("OMP_WAIT_POLICY")
                .env_remove("GLIBC_TUNABLES")
                .env_remove("THP_MEM_ALLOC_ENABLE")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            if let Some(p) = policy {
                cmd.env("OMP_WAIT_POLICY", p);
            }
            let mut child = cmd.spawn().unwrap();
            {
                use std::io::Write;
                let mut stdin = child.stdin.take().unwrap();
                for i in 0..4 {
                    let path = images.join(format!("d{}/img_{i:03}.png", i % 3));
                    writeln!(stdin, "{}", path.display()).unwrap();
                }
            }
            assert_code(&child.wait_with_output().unwrap(), 0, model);
            report(out)
        };
    let run = |model: &str, out: &Path, policy: Option<&str>| {
        run_with("saliency", model, out, policy, &[])
    };
    let passive = t.out("passive");
    let r = run(&big, &passive, None);
    assert_eq!(r["openmp_wait_policy"], "PASSIVE");
    // Huge pages for libtorch's blocks and glibc's heaps, from the restart
    // on (a batch of 32 inputs is 3.5 MB), where the kernel gives them on
    // request.
    let thp = fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| s.contains("[always]") || s.contains("[madvise]"));
    // A report's huge-page settings: both set where the run asked for huge
    // pages and the kernel gives them, neither elsewhere.
    let huge_pages = |r: &serde_json::Value, asked: bool| {
        let (thp_var, tunables) = if asked && thp {
            (
                serde_json::json!("1"),
                serde_json::json!("glibc.malloc.hugetlb=1"),
            )
        } else {
            (serde_json::Value::Null, serde_json::Value::Null)
        };
        assert_eq!(r["thp_mem_alloc_enable"], thp_var);
        assert_eq!(r["glibc_tunables"], tunables);
    };
    huge_pages(&r, true);
    assert_eq!(r["channels_last"], false);
    assert_eq!(r["processed"], 4);
    let active = t.out("active");
    let r = run(&big, &active, Some("ACTIVE"));
    assert_eq!(r["openmp_wait_policy"], "ACTIVE");
    huge_pages(&r, false);
    assert_same_tree(&passive, &active, "PASSIVE vs ACTIVE");
    // Restarted runs: SmoothGrad's noisy copies and Integrated Gradients'
    // path points are batches of 32 as well; for batches of 1,024 inputs
    // (113 MB) the restart asks for no huge pages.
    let restarted: [(&str, &str, &[&str], bool); 3] = [
        ("saliency", "smooth", &["--smooth-samples", "2"], true),
        ("integrated-gradients", "ig", &["--steps", "4"], true),
        ("saliency", "big-batches", &["--batch-size", "1024"], false),
    ];
    for (command, out, flags, asked) in restarted {
        let r = run_with(command, &big, &t.out(out), None, flags);
        assert_eq!(r["openmp_wait_policy"], "PASSIVE", "{out}");
        huge_pages(&r, asked);
    }
    let nhwc = t.out("nhwc");
    let o = Command::new(BIN)
        .args([
            "saliency",
            "--model",
            &big,
            "--images",
            s(&images),
            "--channels-last",
        ])
        .args(["--out", s(&nhwc), "--device", "cpu", "--save-npy"])
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .unwrap();
    assert_code(&o, 0, "--channels-last");
    assert_eq!(report(&nhwc)["channels_last"], true);
    assert_eq!(report(&nhwc)["processed"], 4);
    // Runs `tch-vis CMD --model M --images IMAGES` on the CPU, with no
    // wait policy given, to its report.
    let direct = |cmd: &str, model: &Path, images: &Path, out: &Path, what: &str| {
        let o = Command::new(BIN)
            .args([cmd, "--model", s(model), "--images", s(images)])
            .args(["--out", s(out), "--device", "cpu"])
            .env("CUDA_VISIBLE_DEVICES", "")
            .env_remove("OMP_WAIT_POLICY")
            .output()
            .unwrap();
        assert_code(&o, 0, what);
        report(out)
    };
    // One image file: no restart (nothing shares the cores), same bytes.
    let one = t.out("one");
    let r = direct(
        "saliency",
        Path::new(&big),
        &images.join("d1/img_001.png"),
        &one,
        "one image",
    );
    assert_eq!(r["openmp_wait_policy"], serde_json::Value::Null);
    assert_eq!(r["processed"], 1);
    for ext in ["saliency.npy", "saliency.png"] {
        assert_eq!(
            fs::read(one.join(format!("img_001.png.{ext}"))).unwrap(),
            fs::read(passive.join(format!("d1/img_001.png.{ext}"))).unwrap(),
            "one image vs the list: {ext}"
        );
    }
    // A folder of fewer images than the restart pays for (1,000): no
    // restart, the same bytes as the list's run.
    let few = t.out("few");
    let r = direct("saliency", Path::new(&big), &images, &few, "a few images");
    assert_eq!(r["openmp_wait_policy"], serde_json::Value::Null);
    assert_eq!(r["channels_last"], false);
    assert_eq!(r["processed"], 4);
    assert_same_tree(
        &passive,
        &few,
        "the list after the restart vs the folder without",
    );
    // A heavy model keeps libgomp's spinning team: no restart.
    let heavy = t.out("heavy");
    let r = direct(
        "scores",
        &root().join("tests/models/conv_rgb_heavy.pt"),
        &images.join("d1"),
        &heavy,
        "heavy model",
    );
    assert_eq!(r["openmp_wait_policy"], serde_json::Value::Null);
    assert!(r["processed"].as_u64().unwrap() >= 1);
    let small = t.out("small");
    let r = run(&model("digits_cnn"), &small, None);
    assert_eq!(r["openmp_wait_policy"], serde_json::Value::Null);
    assert_eq!(
        (r["channels_last"].clone(), r["compute_threads"].clone()),
        (false.into(), 1.into())
    );
}

/// An output folder that cannot be made (under /proc, or below a file) is
/// named, exit 2, nothing written; maps with no value of 0.5 or more (a
/// thresholded 0 that digits_cnn takes for a 0 with p = 1 to float32, so
/// its gradients are under the normalisation's 1e-7) are counted in
/// `report.json` and noted on stderr; so is a folder without files.
#[test]
fn unwritable_outputs_faint_maps_and_empty_folders_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let cnn = model("digits_cnn");
    let images = dir.path().join("images");
    fs::create_dir_all(&images).unwrap();
    let digit = image::open(root().join("examples/images/gray/0/heldout_0036.png"))
        .unwrap()
        .to_luma8();
    let thresholded = image::GrayImage::from_fn(digit.width(), digit.height(), |x, y| {
        image::Luma([if digit.get_pixel(x, y)[0] > 100 {
            255
        } else {
            0
        }])
    });
    thresholded.save(images.join("saturated.png")).unwrap();
    digit.save(images.join("plain.png")).unwrap();
    let file = dir.path().join("afile");
    fs::write(&file, b"x").unwrap();
    for (out, says) in [
        (
            PathBuf::from("/proc/tch-vis-out"),
            "cannot create the output folder",
        ),
        (file.join("sub"), "afile/sub: Not a directory"),
    ] {
        let o = tch_vis(&usage("saliency", &cnn, s(&images), s(&out), &[]));
        assert_code(&o, 2, says);
        assert_one_error_line(&o, says);
        assert!(stderr(&o).contains(says), "{}", stderr(&o));
    }
    assert_eq!(fs::read(&file).unwrap(), b"x");
    let out = dir.path().join("out");
    let o = tch_vis(&usage("saliency", &cnn, s(&images), s(&out), &[]));
    assert_code(&o, 0, "faint");
    assert_eq!(report(&out)["faint_maps"], 1);
    let err = stderr(&o);
    assert!(
        err.contains("1 of 2 maps are faint") && err.contains("logits"),
        "{err}"
    );
    let map = crate::util::npy(out.join("saturated.png.saliency.npy"));
    assert!(map.max().double_value(&[]) < 0.5);
    let empty = dir.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    let out = dir.path().join("out-empty");
    let o = tch_vis(&usage("saliency", &cnn, s(&empty), s(&out), &[]));
    assert_code(&o, 0, "empty folder");
    assert!(
        stderr(&o).contains("no files found under"),
        "{}",
        stderr(&o)
    );
}

/// `cam` and `integrated-gradients` take SmoothGrad's options as
/// `saliency` does: the same seed gives the same bytes, another seed other
/// maps, scores.csv is the clean images' (the plain run's), the report
/// records the noise, and noise 0 gives the plain maps.
#[test]
fn cam_and_integrated_gradients_take_smoothgrads_options() {
    let t = Tree::good(3);
    let m = model("digits_cnn");
    for (sub, extra, array) in [
        ("cam", &["--method", "gradcam"][..], "cam"),
        ("integrated-gradients", &["--steps", "8"][..], "ig"),
    ] {
        let run = |name: &str, noise: &[&str]| {
            let out = t.out(&format!("{array}-{name}"));
            let mut flags = extra.to_vec();
            flags.extend_from_slice(noise);
            let args = owned(&usage(sub, &m, s(&t.images()), s(&out), &flags));
            let r = run_ok(&args, name);
            (snapshot(&out), r)
        };
        let smooth = ["--smooth-samples", "3", "--smooth-noise", "0.3"];
        let (plain, _) = run("plain", &[]);
        let (a, ra) = run("a", &[&smooth[..], &["--seed", "1"]].concat());
        let (b, _) = run("b", &[&smooth[..], &["--seed", "1"]].concat());
        let (c, _) = run("c", &[&smooth[..], &["--seed", "2"]].concat());
        run(
            "z",
            &[
                "--smooth-samples",
                "2",
                "--smooth-noise",
                "0",
                "--seed",
                "1",
            ],
        );
        assert_eq!(a, b, "{sub}: same seed, same bytes");
        let k = format!("d0/img_000.png.{array}.npy");
        assert!(a[&k] != c[&k], "{sub}: another seed gives other noise");
        assert!(a[&k] != plain[&k], "{sub}: the noise changes the map");
        if sub == "cam" {
            assert_eq!(a["scores.csv"], plain["scores.csv"], "clean scores");
        } else {
            // The scores and classes are the clean image's; ig_delta is the
            // mean of the copies' deltas.
            let cut = |csv: &[u8]| -> Vec<String> {
                String::from_utf8(csv.to_vec())
                    .unwrap()
                    .lines()
                    .map(|l| l.rsplit_once(',').unwrap().0.to_string())
                    .collect()
            };
            assert_eq!(cut(&a["scores.csv"]), cut(&plain["scores.csv"]));
        }
        assert_eq!(ra["smooth_samples"], 3, "{sub}");
        assert_eq!(ra["seed"], 1, "{sub}");
        // Noise into a folder made without it (and back) is another
        // result: refused before the first image.
        for (into, noise) in [("plain", &smooth[..]), ("a", &[][..])] {
            let out = t.out(&format!("{array}-{into}"));
            let mut flags = extra.to_vec();
            flags.extend_from_slice(noise);
            let o = tch_vis(&usage(sub, &m, s(&t.images()), s(&out), &flags));
            assert_code(&o, 2, into);
            assert!(stderr(&o).contains("smooth_samples"), "{}", stderr(&o));
        }
        let got = Tensor::read_npy(t.out(&format!("{array}-z")).join(&k)).unwrap();
        let want = Tensor::read_npy(t.out(&format!("{array}-plain")).join(&k)).unwrap();
        let diff = (&got - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        assert!(
            diff <= 1e-6 * scale.max(1.0),
            "{sub}: noise 0, |diff| {diff}"
        );
    }
}

/// `--png-compression none` writes stored PNGs (at least the raw pixels'
/// bytes) whose pixels are the default run's, and says so in the report;
/// another value is bad usage.
#[test]
fn stored_pngs_hold_the_same_pixels() {
    let t = Tree::good(3);
    let m = model("digits_rgb");
    let run = |name: &str, extra: &[&str]| {
        let out = t.out(name);
        let mut flags = vec!["--device", "cpu"];
        flags.extend_from_slice(extra);
        run_ok(
            &owned(&usage("saliency", &m, s(&t.images()), s(&out), &flags)),
            name,
        )
    };
    let fast = run("fast", &[]);
    let none = run("none", &["--png-compression", "none"]);
    assert_eq!(fast["png_compression"], "fast");
    assert_eq!(none["png_compression"], "none");
    for rel in csv_paths(&t.out("fast")) {
        let name = format!("{rel}.saliency.png");
        let (a, b) = (t.out("fast").join(&name), t.out("none").join(&name));
        let (pa, pb) = (
            image::open(&a).unwrap().to_rgb8(),
            image::open(&b).unwrap().to_rgb8(),
        );
        assert_eq!(pa, pb, "{rel}");
        let raw = (pa.width() * pa.height() * 3) as u64;
        assert!(fs::metadata(&b).unwrap().len() >= raw, "{rel}: stored");
        assert!(fs::metadata(&a).unwrap().len() < raw, "{rel}: compressed");
    }
    let out = t.out("bad");
    let o = tch_vis(&usage(
        "saliency",
        &m,
        s(&t.images()),
        s(&out),
        &["--png-compression", "zip"],
    ));
    assert_code(&o, 2, "bad value");
    assert!(!out.exists());
}
