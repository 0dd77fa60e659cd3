//! Helpers shared by the integration tests.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use tch::{Device, Kind, Tensor};
use tch_vis::scores::{CategoricalScore, PredictedScore, Score};

/// A path inside the repository.
pub fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Reads the golden manifest at `rel` (inside the repository); a missing
/// one is a failure that names the script writing it.
pub fn golden_manifest<T: DeserializeOwned>(rel: &str, script: &str) -> T {
    let path = repo(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run {script} to write it)", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What a golden case explains: a fixed class, or each image's argmax.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Target {
    Categorical { index: usize },
    Predicted,
}

impl Target {
    /// The score of this target.
    pub fn score(&self) -> Box<dyn Score> {
        match self {
            Target::Categorical { index } => Box::new(CategoricalScore::new(*index).unwrap()),
            Target::Predicted => Box::new(PredictedScore::new()),
        }
    }

    /// `categorical` or `predicted`.
    pub fn name(&self) -> &'static str {
        match self {
            Target::Categorical { .. } => "categorical",
            Target::Predicted => "predicted",
        }
    }
}

/// Reads a `.npy` file written by numpy.
pub fn npy(path: impl AsRef<Path>) -> Tensor {
    let path = path.as_ref();
    Tensor::read_npy(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Asserts `|got - want| <= atol + rtol * |want|` everywhere, printing the
/// worst element on failure.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, rtol: f64, atol: f64) {
    assert_eq!(
        got.size(),
        want.size(),
        "{what}: shape\n  expected: {:?}\n       got: {:?}",
        want.size(),
        got.size()
    );
    let got = got.to_device(Device::Cpu).to_kind(Kind::Double);
    let want = want.to_device(Device::Cpu).to_kind(Kind::Double);
    let diff = (&got - &want).abs();
    let allowed = want.abs() * rtol + atol;
    let excess = &diff - &allowed;
    let worst = excess.flatten(0, -1).argmax(0, false).int64_value(&[]);
    let worst_excess = excess.flatten(0, -1).double_value(&[worst]);
    if worst_excess > 0.0 {
        panic!(
            "{what}: not close (rtol {rtol:e}, atol {atol:e}) at flat index {worst}\n  expected: {}\n       got: {}\n  max |diff|: {:e}",
            want.flatten(0, -1).double_value(&[worst]),
            got.flatten(0, -1).double_value(&[worst]),
            diff.max().double_value(&[]),
        );
    }
}

/// The largest relative difference `|got - want| / max(|want|, floor)`.
pub fn max_rel_diff(got: &Tensor, want: &Tensor, floor: f64) -> f64 {
    let got = got.to_device(Device::Cpu).to_kind(Kind::Double);
    let want = want.to_device(Device::Cpu).to_kind(Kind::Double);
    let denom = want.abs().clamp_min(floor);
    ((&got - &want).abs() / denom).max().double_value(&[])
}

/// Every device to test on: the CPU, and CUDA when present (tests print
/// "skipped: no CUDA" otherwise, so they never pass silently on CUDA).
pub fn devices() -> Vec<Device> {
    // IEEE float32 on CUDA (no TF32 in cuDNN/cuBLAS), as the CLI does; must
    // be set before the first CUDA call of the process.
    if std::env::var_os("NVIDIA_TF32_OVERRIDE").is_none() {
        std::env::set_var("NVIDIA_TF32_OVERRIDE", "0");
    }
    let mut v = vec![Device::Cpu];
    if tch::Cuda::is_available() {
        v.push(Device::Cuda(0));
    } else {
        eprintln!("skipped on CUDA: no CUDA");
    }
    v
}

/// Accepts a gradient (or attributions, the input-weighted gradients of
/// Integrated Gradients) that differs from PyTorch's only where a
/// max-pool window held equal values, and panics otherwise; `what` names
/// the values. Flat regions of an upscaled digit give windows whose values
/// are equal up to the last bit, so which one is the maximum (and takes the
/// whole gradient of the window) depends on the order the platform sums
/// in: on an AVX-512 machine, on CUDA there, and with libtorch's kernels
/// held to plain C++ here (`ATEN_CPU_CAPABILITY=default`),
/// rgb/4/heldout_0087_w48h40.png moved gradient between neighbouring
/// pixels (43 of 1024 values, up to 0.0034 against a maximum of 0.079).
/// Moving a window's gradient to an equal neighbour keeps the gradient's
/// sum (the same convolution weights carry it; and the attributions' sum,
/// the neighbours' inputs being equal in a flat region) and its size, and
/// stays local, while a wrong class, input or formula changes all three:
/// the sum within 1e-5 × Σ|g| + atol, Σ|g| within `l1_rtol` of itself, at
/// most `max_off` of the values off (a tenth and 1e-3 for one gradient;
/// Integrated Gradients' fifty path points each have ties of their own:
/// with libtorch's plain C++ kernels, 990 of 6,144 attributions of two RGB
/// digits moved, their sum by 3e-8 of 171, and on a 16-core H100 host's
/// CPU 1,084 moved, their sum by 7e-7 of ~180 and Σ|a| by 0.30, 1.7e-3 of
/// itself: a quarter and 5e-3 there).
pub fn max_pool_tie(
    what: &str,
    got: &Tensor,
    want: &Tensor,
    rtol: f64,
    atol: f64,
    max_off: f64,
    l1_rtol: f64,
) {
    let got = got.to_device(Device::Cpu).to_kind(Kind::Double);
    let want = want.to_device(Device::Cpu).to_kind(Kind::Double);
    let sum = |t: &Tensor| t.sum(Kind::Double).double_value(&[]);
    let l1 = |t: &Tensor| t.abs().sum(Kind::Double).double_value(&[]);
    let off = (&got - &want)
        .abs()
        .gt_tensor(&(want.abs() * rtol + atol))
        .sum(Kind::Int64)
        .int64_value(&[]);
    let n = want.numel() as i64;
    let (ds, dl1) = ((sum(&got) - sum(&want)).abs(), (l1(&got) - l1(&want)).abs());
    let gdiff = (&got - &want).abs().max().double_value(&[]);
    println!(
        "{what}: gradient moved across a max-pool tie ({off} of {n} values off, \
         max |diff| {gdiff:.2e}; sum off by {ds:.1e}, sum of |g| by {dl1:.1e} of {:.3e})",
        l1(&want)
    );
    assert!(
        off as f64 <= max_off * n as f64
            && ds <= 1e-5 * l1(&want) + atol
            && dl1 <= l1_rtol * l1(&want),
        "{what}: max |diff| {gdiff} (rtol {rtol:e}, atol {atol:e}), \
         {off} of {n} values off, sum off by {ds:e}, sum of |g| off by {dl1:e}: \
         not a max-pool tie"
    );
}

/// Seeded corruptions of a file's bytes, the same on every run: each
/// [`Mutator::mutate`] picks one kind (a bit flipped, a byte replaced by a
/// random value or by one of `marks`, the file cut short) and applies it
/// one to eight times.
pub struct Mutator {
    state: u64,
    marks: [u8; 4],
}

impl Mutator {
    /// A xorshift generator from `seed` (not 0); `marks` are the bytes
    /// that mean something in the format (JPEG's 0xFF, a digit).
    pub fn new(seed: u64, marks: [u8; 4]) -> Self {
        Mutator { state: seed, marks }
    }

    fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    /// A corrupted copy of `bytes` (not empty) and the kind of corruption
    /// (0 flips, 1 random bytes, 2 marks, 3 cut), for messages.
    pub fn mutate(&mut self, bytes: &[u8]) -> (Vec<u8>, u64) {
        let mut out = bytes.to_vec();
        let how = self.next() % 4;
        for _ in 0..1 + self.next() % 8 {
            let i = (self.next() % out.len() as u64) as usize;
            match how {
                0 => out[i] ^= 1 << (self.next() % 8),
                1 => out[i] = self.next() as u8,
                2 => out[i] = self.marks[(self.next() % 4) as usize],
                _ => out.truncate(i.max(1)),
            }
        }
        (out, how)
    }
}
