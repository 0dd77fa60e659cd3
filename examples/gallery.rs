//! Write the gallery of a finished run: `OUT/index.html` from the run's
//! `scores.csv`, `report.json` and map PNGs.
//!
//! ```text
//! tch-vis saliency --model models/digits_cnn.pt --images examples/images --out out/demo
//! cargo run --release --example gallery -- out/demo --title "digits: saliency"
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use tch_vis::gallery::{read_run, Gallery, DEFAULT_PAGE_SIZE};

/// Writes OUT/index.html, a static gallery of a run's maps and scores.
#[derive(Parser)]
struct Args {
    /// The run's output folder.
    out: PathBuf,
    /// The page's title (default: the folder's name).
    #[arg(long)]
    title: Option<String>,
    /// Images per page.
    #[arg(long, default_value_t = DEFAULT_PAGE_SIZE)]
    page_size: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let run = read_run(&args.out).with_context(|| format!("reading {}", args.out.display()))?;
    let title = args.title.unwrap_or_else(|| {
        args.out
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "tch-vis".into())
    });
    let failed = run.items.iter().filter(|i| i.error.is_some()).count();
    let files = Gallery::new()
        .title(title)
        .score_names(run.score_names)
        .page_size(args.page_size)
        .write(&args.out, &run.items)?;
    println!(
        "{}: {} images ({failed} failed), {} pages",
        files.index.display(),
        run.items.len(),
        files.pages.len()
    );
    Ok(())
}
