//! A static HTML gallery of a run: `OUT/index.html` with thumbnails of every
//! image's maps, its scores, class, label and any failure; filtered by path,
//! class and status, sorted by path or by any score, and paged.
//!
//! It needs no server and no network: open `OUT/index.html` from the file
//! system. Scripts and styles are inline; nothing is fetched from elsewhere.
//!
//! # Files
//!
//! | file | holds |
//! |---|---|
//! | `OUT/index.html` | the page, and a compact summary of every item (path, scores, classes, labels, failed or not) for filtering and sorting |
//! | `OUT/gallery/page-00000.js`, ... | the rest of each item (its map links and error text), [`Gallery::page_size`] items per file, loaded by `<script>` tags only for the items on screen |
//!
//! Data files are plain scripts, not JSON, because a page opened from
//! `file://` may not `fetch` local files in Chromium-based browsers, while
//! `<script src>` works everywhere. Each holds one call,
//! `galleryChunk({...})`, whose argument is JSON.
//!
//! With 100,000 images the summary is a few megabytes and a page of 100
//! thumbnails loads one data file (or, sorted by score, the few files its
//! items fall in); thumbnails are `loading="lazy"`.
//!
//! # Rewriting
//!
//! The gallery is written whole from the full item list every time; files
//! appear whole or not at all, data files first and `index.html` last, and
//! data files past the new count (from an earlier, larger run) are removed.
//! Every file carries a token derived from the content, so the page notices
//! data files that belong to another version (written while the page was
//! open, or by two processes at the same moment) and says so instead of
//! showing a mix. The same items always give the same bytes.
//!
//! At the end of a run, build the items from what the output folder's sink
//! returns ([`Run::from_merged`]); for a finished folder, from its files:
//!
//! ```no_run
//! use std::path::Path;
//! use tch_vis::gallery::{read_run, Gallery};
//! # fn main() -> tch_vis::Result<()> {
//! let out = Path::new("out/demo");
//! let run = read_run(out)?; // scores.csv, report.json and the map PNGs found
//! Gallery::new()
//!     .title("digits")
//!     .score_names(run.score_names)
//!     .write(out, &run.items)?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::batch::Merged;
use crate::error::{Error, Result};
use crate::io::write_atomic;

/// The kinds of overlay PNG a run writes beside each image, `REL.KIND.png`,
/// in the order they are shown.
pub const MAP_KINDS: [&str; 3] = ["saliency", "cam", "ig"];

/// The folder under OUT that holds the data files.
pub const DATA_DIR: &str = "gallery";

/// Items per page (and per data file) unless [`Gallery::page_size`] says
/// otherwise.
pub const DEFAULT_PAGE_SIZE: usize = 100;

/// One image of the run, as the gallery shows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GalleryItem {
    /// The image's path relative to the input folder, `/`-joined.
    pub rel: String,
    /// Its maps as `(kind, file)`: the kind (`"saliency"`, `"cam"`, `"ig"`,
    /// or any other word) and the PNG's path relative to OUT, `/`-joined and
    /// not URL-encoded (the gallery encodes each segment).
    pub maps: Vec<(String, String)>,
    /// One score per model output; `NaN` shows as missing.
    pub scores: Vec<f64>,
    /// The class taken for each output, where there is one.
    pub classes: Vec<Option<usize>>,
    /// The label of each output's class, where the model has labels.
    pub labels: Vec<Option<String>>,
    /// Why the image failed, if it did.
    pub error: Option<String>,
}

impl GalleryItem {
    /// An item for `rel` with nothing else known yet.
    pub fn new(rel: impl Into<String>) -> Self {
        GalleryItem {
            rel: rel.into(),
            ..Self::default()
        }
    }

    /// Adds, for each kind in [`MAP_KINDS`], the map `REL.KIND.png` when
    /// that file exists under `out`.
    pub fn find_maps(&mut self, out: &Path) {
        for kind in MAP_KINDS {
            let file = format!("{}.{kind}.png", self.rel);
            if out.join(&file).is_file() {
                self.maps.push((kind.to_string(), file));
            }
        }
    }
}

/// What [`Gallery::write`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GalleryFiles {
    /// `OUT/index.html`.
    pub index: PathBuf,
    /// The data files, `OUT/gallery/page-NNNNN.js`, one per page, in order.
    pub pages: Vec<PathBuf>,
    /// Data files of an earlier, larger gallery that were removed.
    pub removed: usize,
}

/// Writes the gallery of a run; a builder.
///
/// ```
/// # fn main() -> tch_vis::Result<()> {
/// use tch_vis::gallery::{Gallery, GalleryItem};
/// let out = tempfile::tempdir().unwrap();
/// let mut item = GalleryItem::new("a/one.png");
/// item.scores = vec![0.93];
/// item.classes = vec![Some(3)];
/// item.labels = vec![Some("three".into())];
/// let mut bad = GalleryItem::new("b/two.png");
/// bad.error = Some("cannot decode image".into());
/// let files = Gallery::new().page_size(50).write(out.path(), &[item, bad])?;
/// assert!(files.index.ends_with("index.html"));
/// assert_eq!(files.pages.len(), 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gallery {
    title: String,
    score_names: Vec<String>,
    page_size: usize,
}

impl Default for Gallery {
    fn default() -> Self {
        Gallery {
            title: "tch-vis".to_string(),
            score_names: Vec::new(),
            page_size: DEFAULT_PAGE_SIZE,
        }
    }
}

/// The summary embedded in `index.html`: one array per column, one entry per
/// item, items sorted by path.
#[derive(Serialize)]
struct Summary<'a> {
    version: u32,
    token: String,
    title: &'a str,
    page_size: usize,
    data_dir: &'a str,
    score_names: Vec<String>,
    paths: Vec<&'a str>,
    /// `scores[j][i]`: score column `j` of item `i`.
    scores: Vec<Vec<Option<f64>>>,
    /// `classes[j][i]`: class of output `j` of item `i`.
    classes: Vec<Vec<Option<usize>>>,
    /// `labels[j][i]`: index into `label_table`.
    labels: Vec<Vec<Option<usize>>>,
    label_table: Vec<&'a str>,
    /// Indices of the items that failed.
    failed: Vec<usize>,
    /// How many maps the item with the most maps has.
    max_maps: usize,
}

/// One data file's argument.
#[derive(Serialize)]
struct Chunk<'a> {
    token: &'a str,
    page: usize,
    items: Vec<ChunkItem<'a>>,
}

#[derive(Serialize)]
struct ChunkItem<'a> {
    /// `[kind, href]`, the href URL-encoded and relative to OUT.
    maps: Vec<[String; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

impl Gallery {
    /// A gallery titled "tch-vis", [`DEFAULT_PAGE_SIZE`] items a page, score
    /// columns named `score_0`, `score_1`, ...
    pub fn new() -> Self {
        Self::default()
    }

    /// The page's title.
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = title.into();
        self
    }

    /// Names of the score columns, in order (for example the header of
    /// `scores.csv`); columns past these are named `score_K`.
    pub fn score_names(mut self, names: Vec<String>) -> Self {
        self.score_names = names;
        self
    }

    /// Items per page and per data file (at least 1).
    pub fn page_size(mut self, n: usize) -> Self {
        self.page_size = n.max(1);
        self
    }

    /// Writes `OUT/index.html` and `OUT/gallery/page-NNNNN.js` for `items`
    /// (shown sorted by path, whatever their order here), and removes data
    /// files of an earlier, larger gallery.
    ///
    /// # Errors
    /// [`Error::Io`] when a file cannot be written or a stale one removed;
    /// [`Error::Internal`] if the data cannot be encoded as JSON (a bug).
    pub fn write(&self, out: &Path, items: &[GalleryItem]) -> Result<GalleryFiles> {
        let rendered = self.render(items)?;
        let data_dir = out.join(DATA_DIR);
        let mut pages = Vec::with_capacity(rendered.pages.len());
        for (k, text) in rendered.pages.iter().enumerate() {
            let path = data_dir.join(page_file_name(k));
            write_atomic(&path, text.as_bytes())?;
            pages.push(path);
        }
        let index = out.join("index.html");
        write_atomic(&index, rendered.index.as_bytes())?;
        let removed = remove_stale_pages(&data_dir, pages.len())?;
        Ok(GalleryFiles {
            index,
            pages,
            removed,
        })
    }

    /// The text of every file, without writing anything.
    fn render(&self, items: &[GalleryItem]) -> Result<Rendered> {
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by(|&a, &b| items[a].rel.cmp(&items[b].rel));
        let sorted: Vec<&GalleryItem> = order.iter().map(|&i| &items[i]).collect();

        let n_scores = sorted
            .iter()
            .map(|it| it.scores.len())
            .max()
            .unwrap_or(0)
            .max(self.score_names.len());
        let n_classes = sorted
            .iter()
            .map(|it| it.classes.len().max(it.labels.len()))
            .max()
            .unwrap_or(0);
        let score_names = (0..n_scores)
            .map(|j| {
                self.score_names
                    .get(j)
                    .cloned()
                    .unwrap_or_else(|| format!("score_{j}"))
            })
            .collect();

        let mut label_ids: HashMap<&str, usize> = HashMap::new();
        let mut label_table: Vec<&str> = Vec::new();
        let mut labels = vec![Vec::with_capacity(sorted.len()); n_classes];
        let mut scores = vec![Vec::with_capacity(sorted.len()); n_scores];
        let mut classes = vec![Vec::with_capacity(sorted.len()); n_classes];
        let mut failed = Vec::new();
        for (i, it) in sorted.iter().enumerate() {
            for (j, col) in scores.iter_mut().enumerate() {
                col.push(it.scores.get(j).copied().filter(|v| v.is_finite()));
            }
            for (j, col) in classes.iter_mut().enumerate() {
                col.push(it.classes.get(j).copied().flatten());
            }
            for (j, col) in labels.iter_mut().enumerate() {
                col.push(it.labels.get(j).and_then(|l| l.as_deref()).map(|l| {
                    *label_ids.entry(l).or_insert_with(|| {
                        label_table.push(l);
                        label_table.len() - 1
                    })
                }));
            }
            if it.error.is_some() {
                failed.push(i);
            }
        }

        let pages_text: Vec<String> = sorted
            .chunks(self.page_size)
            .map(|chunk| {
                let items: Vec<ChunkItem> = chunk
                    .iter()
                    .map(|it| ChunkItem {
                        maps: it
                            .maps
                            .iter()
                            .map(|(kind, file)| [kind.clone(), encode_href(file)])
                            .collect(),
                        error: it.error.as_deref(),
                    })
                    .collect();
                to_json(&items)
            })
            .collect::<Result<_>>()?;

        let mut summary = Summary {
            version: 1,
            token: String::new(),
            title: &self.title,
            page_size: self.page_size,
            data_dir: DATA_DIR,
            score_names,
            paths: sorted.iter().map(|it| it.rel.as_str()).collect(),
            scores,
            classes,
            labels,
            label_table,
            failed,
            max_maps: sorted.iter().map(|it| it.maps.len()).max().unwrap_or(0),
        };
        // The token: a hash of everything shown, so equal content gives equal
        // bytes and a data file from another version is noticed.
        let mut hash = crate::io::Fnv::new();
        hash.add(to_json(&summary)?.as_bytes());
        for p in &pages_text {
            hash.add(p.as_bytes());
        }
        summary.token = format!("{:016x}", hash.0);

        let pages = pages_text
            .iter()
            .enumerate()
            .map(|(k, items)| {
                // `items` is already JSON; splice it into the chunk object.
                let head = to_json(&Chunk {
                    token: &summary.token,
                    page: k,
                    items: Vec::new(),
                })?;
                let head = head.strip_suffix("[]}").unwrap_or(&head);
                Ok(format!("galleryChunk({head}{items}}});\n"))
            })
            .collect::<Result<_>>()?;
        let index = render_index(&self.title, &to_json(&summary)?);
        Ok(Rendered { index, pages })
    }
}

struct Rendered {
    index: String,
    pages: Vec<String>,
}

/// `page-00007.js`: the data file of page `k` (from 0).
fn page_file_name(k: usize) -> String {
    format!("page-{k:05}.js")
}

/// The page number of a data file name, if it is one.
fn page_number(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("page-")?.strip_suffix(".js")?;
    if digits.len() < 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Removes `page-NNNNN.js` files numbered `count` or more from `dir`.
fn remove_stale_pages(dir: &Path, count: usize) -> Result<usize> {
    let read = match fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut removed = 0;
    for entry in read {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(k) = name.to_str().and_then(page_number) else {
            continue;
        };
        if k >= count {
            match fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                // Removed by a concurrent writer.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(entry.path(), e)),
            }
        }
    }
    Ok(removed)
}

/// JSON that is safe inside a `<script>` element and in any JavaScript
/// source: `<`, `>`, `&`, U+2028 and U+2029 written as `\uXXXX` (they only
/// occur inside strings, where the escape means the same character).
fn to_json<T: Serialize>(value: &T) -> Result<String> {
    let text = serde_json::to_string(value).map_err(|e| Error::Internal {
        what: format!("gallery data: {e}"),
    })?;
    let mut out = String::with_capacity(text.len() + text.len() / 64);
    for c in text.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A relative URL for a `/`-joined relative file path: each segment
/// percent-encoded as UTF-8, keeping only `A-Z a-z 0-9 - . _ ~` (so spaces,
/// `#`, `?`, `%`, `:` and non-ASCII names all survive).
pub fn encode_href(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        for b in segment.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                out.push(char::from(b));
            } else {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// The items of an output folder, ready for [`Gallery::write`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Run {
    /// The score column names of `scores.csv` (`score_0`, ...).
    pub score_names: Vec<String>,
    /// One item per row and per failure, sorted by path, with the maps found
    /// beside them.
    pub items: Vec<GalleryItem>,
}

impl Run {
    /// The items of `merged` (the folder's rows and failures, as a
    /// [`FolderSink`](crate::batch::FolderSink) returns them when it
    /// finishes): for each row its `score_K` columns and, where present,
    /// `class_K` and `label_K` (other columns are ignored); each failure's
    /// reason; and for every image the maps `REL.KIND.png` that exist under
    /// `out` (see [`GalleryItem::find_maps`]). An image both in the rows and
    /// among the failures keeps both.
    pub fn from_merged(out: &Path, merged: &Merged) -> Run {
        let header = &merged.header;
        // (index into a row's fields, K) for every column named PREFIX_K;
        // a row's fields start after `path`, the header's first column.
        let numbered = |prefix: &str| -> Vec<(usize, usize)> {
            header
                .iter()
                .enumerate()
                .skip(1)
                .filter_map(|(c, h)| Some((c - 1, h.strip_prefix(prefix)?.parse().ok()?)))
                .collect()
        };
        let score_cols = numbered("score_");
        let class_cols = numbered("class_");
        let label_cols = numbered("label_");
        let n_classes = class_cols
            .iter()
            .chain(&label_cols)
            .map(|&(_, k)| k + 1)
            .max()
            .unwrap_or(0);

        let mut items: BTreeMap<&str, GalleryItem> = BTreeMap::new();
        for (rel, fields) in &merged.rows {
            let field = |c: usize| fields.get(c).map(|s| s.trim()).unwrap_or("");
            let mut item = GalleryItem::new(rel.clone());
            item.scores = score_cols
                .iter()
                .map(|&(c, _)| field(c).parse::<f64>().unwrap_or(f64::NAN))
                .collect();
            if n_classes > 0 {
                item.classes = vec![None; n_classes];
                item.labels = vec![None; n_classes];
                for &(c, k) in &class_cols {
                    item.classes[k] = field(c).parse().ok();
                }
                for &(c, k) in &label_cols {
                    let l = fields.get(c).map(String::as_str).unwrap_or("");
                    item.labels[k] = (!l.is_empty()).then(|| l.to_string());
                }
            }
            items.insert(rel, item);
        }
        for (rel, error) in &merged.failed {
            items
                .entry(rel)
                .or_insert_with(|| GalleryItem::new(rel.clone()))
                .error = Some(error.clone());
        }
        let mut items: Vec<GalleryItem> = items.into_values().collect();
        for item in &mut items {
            item.find_maps(out);
        }
        Run {
            score_names: score_cols
                .iter()
                .map(|&(c, _)| header[c + 1].clone())
                .collect(),
            items,
        }
    }
}

/// Reads the results in `out` from its files: the rows of `scores.csv` and
/// the `failed` list of `report.json` (`[{"path", "error"}]`), then as
/// [`Run::from_merged`]. A missing file counts as empty. At the end of a run,
/// [`Run::from_merged`] on what the sink returns is the better source: it
/// also holds the failures of other workers still running.
///
/// # Errors
/// [`Error::Io`] when a file exists but cannot be read, `scores.csv` is not
/// CSV or has no `path` first column, or `report.json` is not JSON.
pub fn read_run(out: &Path) -> Result<Run> {
    let mut merged = Merged::default();

    let csv_path = out.join("scores.csv");
    if let Some(text) = read_optional(&csv_path)? {
        let mut reader = csv::ReaderBuilder::new()
            .flexible(true)
            .from_reader(text.as_bytes());
        let bad = |e: csv::Error| invalid(&csv_path, e.to_string());
        merged.header = reader
            .headers()
            .map_err(bad)?
            .iter()
            .map(str::to_string)
            .collect();
        if !merged.header.is_empty() && merged.header[0] != "path" {
            return Err(invalid(
                &csv_path,
                "the first column is not \"path\"".into(),
            ));
        }
        for record in reader.records() {
            let record = record.map_err(bad)?;
            let mut fields = record.iter().map(str::to_string);
            match fields.next() {
                Some(rel) if !rel.is_empty() => {
                    merged.rows.insert(rel, fields.collect());
                }
                _ => {}
            }
        }
    }

    let report_path = out.join("report.json");
    if let Some(text) = read_optional(&report_path)? {
        let report: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| invalid(&report_path, format!("not JSON: {e}")))?;
        let failed = report.get("failed").and_then(|f| f.as_array());
        for entry in failed.into_iter().flatten() {
            let Some(rel) = entry.get("path").and_then(|p| p.as_str()) else {
                continue;
            };
            let error = match entry.get("error") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => "failed".to_string(),
            };
            merged.failed.insert(rel.to_string(), error);
        }
    }
    Ok(Run::from_merged(out, &merged))
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn invalid(path: &Path, why: String) -> Error {
    Error::io(
        path,
        std::io::Error::new(std::io::ErrorKind::InvalidData, why),
    )
}

/// The whole `index.html`.
fn render_index(title: &str, summary_json: &str) -> String {
    let title = escape_html(title);
    let mut html = String::with_capacity(summary_json.len() + 16 * 1024);
    html.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    html.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    let _ = writeln!(html, "<title>{title}</title>");
    html.push_str("<style>\n");
    html.push_str(CSS);
    html.push_str("</style>\n</head>\n<body>\n<header>\n");
    let _ = writeln!(html, "<h1>{title}</h1>");
    html.push_str(CONTROLS);
    html.push_str("</header>\n");
    html.push_str("<noscript><p class=\"notice\">This gallery needs JavaScript.</p></noscript>\n");
    html.push_str("<p id=\"notice\" class=\"notice\" hidden></p>\n");
    html.push_str("<main id=\"grid\"></main>\n");
    html.push_str("<footer><nav class=\"pager\" id=\"pager-bottom\"></nav></footer>\n");
    html.push_str("<script id=\"gallery-data\" type=\"application/json\">");
    html.push_str(summary_json);
    html.push_str("</script>\n<script>\n");
    html.push_str(SCRIPT);
    html.push_str("</script>\n</body>\n</html>\n");
    html
}

const CSS: &str = r##":root { --thumb: 112px; --maps: 1; color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.35 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; background: #f3f4f6; color: #1f2937; }
header { position: sticky; top: 0; z-index: 1; background: #1f2937; color: #f9fafb; padding: 10px 16px; display: flex; flex-wrap: wrap; align-items: center; gap: 8px 16px; box-shadow: 0 1px 4px rgba(0,0,0,.25); }
h1 { font-size: 17px; margin: 0; font-weight: 600; }
#counts { color: #d1d5db; }
#counts .bad { color: #fca5a5; }
.controls { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; margin-left: auto; }
input, select, button { font: inherit; font-size: 13px; border-radius: 5px; border: 1px solid #9ca3af; padding: 3px 7px; background: #fff; color: #111827; }
input[type=search] { width: 220px; }
button { cursor: pointer; min-width: 30px; }
button:disabled { opacity: .45; cursor: default; }
.pager { display: flex; gap: 6px; align-items: center; }
.pager input { width: 64px; text-align: right; }
header .pager { color: #f9fafb; }
footer { padding: 8px 16px 24px; display: flex; justify-content: center; }
.notice { margin: 12px 16px; padding: 8px 12px; background: #fef3c7; border: 1px solid #f59e0b; border-radius: 6px; }
#grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(max(172px, calc(var(--maps) * (var(--thumb) + 6px) + 20px)), 1fr)); gap: 10px; padding: 12px 16px; }
.card { background: #fff; border: 1px solid #e5e7eb; border-radius: 8px; padding: 8px; min-width: 0; box-shadow: 0 1px 2px rgba(0,0,0,.05); }
.card.failed { border-color: #fca5a5; background: #fff7f7; }
.thumbs { display: flex; gap: 6px; justify-content: center; }
.thumbs a { text-decoration: none; }
.thumbs figure { margin: 0; text-align: center; }
.thumbs img, .thumbs .none { display: block; width: var(--thumb); height: var(--thumb); object-fit: contain; image-rendering: pixelated; background: #111827; border-radius: 4px; }
.thumbs .none { display: flex; align-items: center; justify-content: center; color: #9ca3af; background: #f3f4f6; border: 1px dashed #d1d5db; font-size: 12px; }
figcaption { font-size: 11px; color: #6b7280; }
.path { margin-top: 6px; font: 12px/1.3 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; overflow-wrap: anywhere; }
.path .dir { color: #6b7280; }
.meta { margin-top: 3px; font-size: 12px; color: #374151; }
.meta b { font-variant-numeric: tabular-nums; }
.cls { display: inline-block; margin-top: 3px; padding: 0 6px; border-radius: 9px; background: #e0e7ff; color: #3730a3; font-size: 12px; }
.error { margin-top: 4px; color: #b91c1c; font-size: 12px; overflow-wrap: anywhere; }
"##;

const CONTROLS: &str = r##"<span id="counts"></span>
<div class="controls">
<input id="q" type="search" placeholder="filter paths" aria-label="filter paths">
<select id="cls" aria-label="class"></select>
<select id="status" aria-label="status"><option value="all">all images</option><option value="ok">done</option><option value="failed">failed</option></select>
<select id="sort" aria-label="sort"></select>
<nav class="pager" id="pager-top"></nav>
</div>
"##;

const SCRIPT: &str = r##""use strict";
(function () {
  const D = JSON.parse(document.getElementById("gallery-data").textContent);
  const N = D.paths.length;
  const isFailed = new Uint8Array(N);
  for (const i of D.failed) isFailed[i] = 1;
  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  document.documentElement.style.setProperty("--maps", Math.max(1, D.max_maps));

  // Data files: one script element per page of items, loaded when needed.
  const chunks = new Map();
  const loading = new Map();
  let stale = false;
  window.galleryChunk = function (c) {
    if (c.token !== D.token) { stale = true; return; }
    chunks.set(c.page, c.items);
  };
  function pageFile(k) { return D.data_dir + "/page-" + String(k).padStart(5, "0") + ".js"; }
  function loadChunk(k) {
    if (chunks.has(k)) return Promise.resolve();
    if (loading.has(k)) return loading.get(k);
    const p = new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = pageFile(k);
      s.onload = () => chunks.has(k) ? resolve() : reject(new Error(stale
        ? "the gallery was rewritten since this page was opened: reload it"
        : pageFile(k) + " holds no data"));
      s.onerror = () => reject(new Error(pageFile(k) + " is missing: write the gallery again"));
      document.head.appendChild(s);
    });
    loading.set(k, p);
    p.catch(() => loading.delete(k));
    return p;
  }

  // Controls.
  const labelOf = (j, i) => { const l = D.labels[j] ? D.labels[j][i] : null; return l === null || l === undefined ? null : D.label_table[l]; };
  // "class 3 · cat"; the label is left out when it only repeats the number.
  const classText = (j, c, l) => "class " + c + (l && l !== String(c) ? " \u00b7 " + l : "");
  const clsSel = $("cls");
  clsSel.append(new Option("all classes", ""));
  D.classes.forEach((col, j) => {
    const count = new Map(), label = new Map();
    col.forEach((c, i) => { if (c === null) return; count.set(c, (count.get(c) || 0) + 1); if (!label.has(c)) label.set(c, labelOf(j, i)); });
    const keys = [...count.keys()].sort((a, b) => a - b);
    const group = D.classes.length > 1 ? el("optgroup") : clsSel;
    if (D.classes.length > 1) { group.label = "output " + j; clsSel.append(group); }
    for (const c of keys) {
      const l = label.get(c);
      group.append(new Option(classText(j, c, l) + " (" + count.get(c) + ")", j + ":" + c));
    }
  });
  if (D.classes.length === 0) clsSel.hidden = true;
  const sortSel = $("sort");
  sortSel.append(new Option("sort: path", "path"));
  D.score_names.forEach((name, j) => {
    sortSel.append(new Option(name + " \u2193 high first", "s" + j + "d"));
    sortSel.append(new Option(name + " \u2191 low first", "s" + j + "a"));
  });
  if (D.failed.length === 0) $("status").hidden = true;

  const state = { q: "", cls: "", status: "all", sort: "path", page: 1 };
  function readHash() {
    const h = new URLSearchParams(location.hash.slice(1));
    for (const k of Object.keys(state)) if (h.has(k)) state[k] = k === "page" ? (parseInt(h.get(k), 10) || 1) : h.get(k);
    if (![...clsSel.options].some((o) => o.value === state.cls)) state.cls = "";
    if (![...sortSel.options].some((o) => o.value === state.sort)) state.sort = "path";
    if (!["all", "ok", "failed"].includes(state.status)) state.status = "all";
    $("q").value = state.q; clsSel.value = state.cls; sortSel.value = state.sort; $("status").value = state.status;
  }
  function writeHash() {
    const h = new URLSearchParams();
    for (const [k, v] of Object.entries(state)) if (v !== "" && !(k === "page" && v === 1) && !(k === "sort" && v === "path") && !(k === "status" && v === "all")) h.set(k, v);
    const s = h.toString();
    history.replaceState(null, "", s ? "#" + s : location.pathname + location.search);
  }

  // The filtered, sorted list of item indices.
  let lower = null, view = [], viewKey = "";
  function computeView() {
    const key = state.q + "\u0000" + state.cls + "\u0000" + state.status + "\u0000" + state.sort;
    if (key === viewKey) return;
    viewKey = key;
    const q = state.q.toLowerCase();
    if (q && !lower) lower = D.paths.map((p) => p.toLowerCase());
    let cj = -1, cc = -1;
    if (state.cls) { const [a, b] = state.cls.split(":"); cj = +a; cc = +b; }
    const out = [];
    for (let i = 0; i < N; i++) {
      if (q && !lower[i].includes(q)) continue;
      if (state.status === "failed" && !isFailed[i]) continue;
      if (state.status === "ok" && isFailed[i]) continue;
      if (cj >= 0 && D.classes[cj][i] !== cc) continue;
      out.push(i);
    }
    const m = /^s(\d+)([ad])$/.exec(state.sort);
    if (m) {
      const col = D.scores[+m[1]], dir = m[2] === "a" ? 1 : -1;
      out.sort((a, b) => {
        const x = col[a], y = col[b];
        if (x === null || y === null) return (x === null) - (y === null) || a - b;
        return (x - y) * dir || a - b;
      });
    }
    view = out;
  }

  function fmt(v) {
    if (v === null || v === undefined) return "\u2013";
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(3) : v.toFixed(4);
  }

  function card(i, extra) {
    const c = el("div", "card" + (isFailed[i] ? " failed" : ""));
    const thumbs = el("div", "thumbs");
    const maps = extra ? extra.maps : [];
    for (const [kind, href] of maps) {
      const a = el("a"); a.href = href; a.target = "_blank"; a.title = kind + ": " + D.paths[i];
      const fig = el("figure");
      const img = el("img"); img.loading = "lazy"; img.decoding = "async"; img.src = href; img.alt = kind;
      fig.append(img, el("figcaption", "", kind)); a.append(fig); thumbs.append(a);
    }
    if (maps.length === 0) thumbs.append(el("div", "none", isFailed[i] ? "failed" : "no map"));
    // The folder in grey, then the file name; the whole path as a tooltip.
    const path = el("div", "path"), cut = D.paths[i].lastIndexOf("/") + 1;
    path.title = D.paths[i];
    if (cut) path.append(el("span", "dir", D.paths[i].slice(0, cut)), document.createElement("wbr"));
    path.append(D.paths[i].slice(cut));
    c.append(thumbs, path);
    const meta = el("div", "meta");
    D.score_names.forEach((name, j) => {
      if (D.scores[j][i] === null) return;
      if (meta.childNodes.length) meta.append(" \u00b7 ");
      meta.append(name + " "); meta.append(el("b", "", fmt(D.scores[j][i])));
    });
    if (meta.childNodes.length) c.append(meta);
    D.classes.forEach((col, j) => {
      if (col[i] === null) return;
      c.append(el("span", "cls", (D.classes.length > 1 ? j + ": " : "") + classText(j, col[i], labelOf(j, i))), " ");
    });
    if (extra && extra.error) c.append(el("div", "error", extra.error));
    return c;
  }

  function pager(nav, pages) {
    nav.textContent = "";
    const btn = (text, page, title) => {
      const b = el("button", "", text); b.title = title;
      b.disabled = page < 1 || page > pages || page === state.page;
      b.onclick = () => go(page); return b;
    };
    const input = el("input"); input.type = "number"; input.min = 1; input.max = pages; input.value = state.page;
    input.setAttribute("aria-label", "page");
    input.onchange = () => go(Math.min(pages, Math.max(1, parseInt(input.value, 10) || 1)));
    nav.append(btn("\u00ab", 1, "first page"), btn("\u2039", state.page - 1, "previous page"), "page ", input, " of " + pages, btn("\u203a", state.page + 1, "next page"), btn("\u00bb", pages, "last page"));
  }

  let renderSeq = 0;
  function render() {
    computeView();
    const pages = Math.max(1, Math.ceil(view.length / D.page_size));
    state.page = Math.min(Math.max(1, state.page), pages);
    writeHash();
    const counts = $("counts");
    counts.textContent = N + " images";
    if (D.failed.length) { counts.append(" \u00b7 "); counts.append(el("span", "bad", D.failed.length + " failed")); }
    if (view.length !== N) counts.append(" \u00b7 " + view.length + " shown");
    pager($("pager-top"), pages); pager($("pager-bottom"), pages);
    const slice = view.slice((state.page - 1) * D.page_size, state.page * D.page_size);
    const need = [...new Set(slice.map((i) => Math.floor(i / D.page_size)))];
    const seq = ++renderSeq;
    const notice = $("notice");
    Promise.all(need.map(loadChunk)).then(() => {
      if (seq !== renderSeq) return;
      notice.hidden = true;
      return slice.map((i) => chunks.get(Math.floor(i / D.page_size))[i % D.page_size]);
    }, (err) => {
      if (seq !== renderSeq) return;
      notice.textContent = err.message; notice.hidden = false;
      return slice.map((i) => { const ch = chunks.get(Math.floor(i / D.page_size)); return ch ? ch[i % D.page_size] : null; });
    }).then((extras) => {
      if (seq !== renderSeq || !extras) return;
      const grid = $("grid"); grid.textContent = "";
      slice.forEach((i, n) => grid.append(card(i, extras[n])));
      if (slice.length === 0) grid.append(el("p", "", N ? "No image matches." : "No images."));
    });
  }
  function go(page) { state.page = page; render(); window.scrollTo(0, 0); }

  let typing = 0;
  $("q").addEventListener("input", (e) => { clearTimeout(typing); typing = setTimeout(() => { state.q = e.target.value; state.page = 1; render(); }, 150); });
  clsSel.onchange = () => { state.cls = clsSel.value; state.page = 1; render(); };
  $("status").onchange = () => { state.status = $("status").value; state.page = 1; render(); };
  sortSel.onchange = () => { state.sort = sortSel.value; state.page = 1; render(); };
  window.addEventListener("hashchange", () => { readHash(); render(); });
  readHash();
  render();
})();
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hrefs_encode_each_segment() {
        assert_eq!(encode_href("a b/c#d?e%f.png"), "a%20b/c%23d%3Fe%25f.png");
        assert_eq!(encode_href("ü/猫.png"), "%C3%BC/%E7%8C%AB.png");
        assert_eq!(encode_href("x:y/<&>\"'.png"), "x%3Ay/%3C%26%3E%22%27.png");
        assert_eq!(encode_href("plain-name_1.0~.png"), "plain-name_1.0~.png");
    }

    #[test]
    fn json_is_safe_in_a_script_element() {
        let s = to_json(&"</script><!-- & \u{2028}").unwrap();
        assert!(!s.contains('<') && !s.contains('>') && !s.contains('&'));
        let back: String = serde_json::from_str(&s).unwrap();
        assert_eq!(back, "</script><!-- & \u{2028}");
    }

    #[test]
    fn html_escapes_markup_and_quotes() {
        assert_eq!(
            escape_html(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn page_names_round_trip_and_others_are_ignored() {
        assert_eq!(page_file_name(7), "page-00007.js");
        assert_eq!(page_number("page-00007.js"), Some(7));
        assert_eq!(page_number(&page_file_name(123_456)), Some(123_456));
        for other in [
            "page-7.js",
            "page-0000a.js",
            "page-00007.js.saliency.png",
            "x.js",
        ] {
            assert_eq!(page_number(other), None, "{other}");
        }
    }

    #[test]
    fn same_items_give_same_bytes_in_any_order() {
        let items: Vec<GalleryItem> = (0..5)
            .map(|i| {
                let mut it = GalleryItem::new(format!("{i}.png"));
                it.scores = vec![i as f64];
                it
            })
            .collect();
        let mut rev = items.clone();
        rev.reverse();
        let g = Gallery::new().page_size(2);
        let (a, b) = (g.render(&items).unwrap(), g.render(&rev).unwrap());
        assert_eq!(a.index, b.index);
        assert_eq!(a.pages, b.pages);
        assert_eq!(a.pages.len(), 3);
        let mut changed = items.clone();
        changed[0].scores[0] = 9.0;
        assert_ne!(g.render(&changed).unwrap().index, a.index);
    }
}
