//! A batch script against the library: saliency over the bundled images,
//! written as one JSON line per image (path, class, label, score and
//! statistics of its map) to `out/batch_folder.jsonl`.
//!
//! ```text
//! cargo run --release --example batch_folder
//! ```

use std::io::Write;
use std::sync::Mutex;

use tch_vis::batch::{Engine, ImageResult, SaliencyMethod, Sink};
use tch_vis::{io, preprocess::Sidecar, scores::ScoreSpec, DeviceSpec, Error, Model};

/// A sink of our own: JSON lines, in the order images complete.
struct JsonLines(Mutex<std::fs::File>, Sidecar);

impl Sink for JsonLines {
    fn image(&self, r: ImageResult) -> tch_vis::Result<()> {
        let map = &r.arrays[0].values; // (H, W) saliency, in [0, 1]
        let class = r.classes[0].unwrap_or(0);
        let line = serde_json::json!({
            "path": r.rel, "class": class, "label": self.1.labels.as_ref().map(|l| &l[class]),
            "score": r.scores[0], "map_mean": map.f_mean(None)?.double_value(&[]),
            "hot_fraction": map.f_gt(0.5)?.f_mean(tch::Kind::Float)?.double_value(&[]),
        });
        let mut file = self.0.lock().map_err(|_| Error::Internal {
            what: "lock".into(),
        })?;
        writeln!(file, "{line}").map_err(|e| Error::io("out/batch_folder.jsonl", e))
    }
}

fn main() -> anyhow::Result<()> {
    // The allocator settings of the tch-vis binary (before any thread).
    tch_vis::batch::tune_malloc();
    let model = Model::load("models/digits_cnn.pt", DeviceSpec::Auto.resolve()?)?;
    let sidecar = Sidecar::for_model("models/digits_cnn.pt")?;
    let method = SaliencyMethod::new(&[ScoreSpec::Predicted])?.smooth(10, 0.2, 0);
    let engine = Engine::new(&model, sidecar.clone(), &method).batch_size(8);
    engine.prepare()?;
    std::fs::create_dir_all("out")?;
    let sink = JsonLines(
        Mutex::new(std::fs::File::create("out/batch_folder.jsonl")?),
        sidecar,
    );
    let summary = engine.run(&io::walk("examples/images".as_ref(), &[])?, &sink)?;
    println!(
        "{} images, {} failed: out/batch_folder.jsonl",
        summary.processed,
        summary.failed.len()
    );
    Ok(())
}
