//! The output folder sink: per-image files, `scores.csv` and reports, safe
//! for many concurrent workers.
//!
//! What each worker writes, and what it relies on:
//! - every output file under a temporary name in its final directory, then
//!   renamed over the final name (rename within a directory is atomic on
//!   local file systems and on NFS and Lustre);
//! - its rows to a journal of its own, `OUT/.tch-vis/rows/ID.csv` (ID =
//!   start time, host and process id), appended only after all of an
//!   image's files are in place. No file is ever written by two
//!   processes, so neither `O_APPEND` atomicity nor locks are needed;
//! - `scores.csv`, rebuilt from all journals (and the rows of an older
//!   `scores.csv` that no journal mentions), written under a temporary
//!   name and renamed, at the end of every run (a merge costs the whole
//!   folder, so it is never done per image or per minute: during a run the
//!   rows are in the journals, and a crashed run's rows are merged by the
//!   next run). After the rename the worker checks that no journal grew since it read
//!   them, and merges again if one did; so the last rename always includes
//!   every finished worker's rows. This relies on close-to-open
//!   consistency (a file closed by one host is read whole by a host that
//!   opens it afterwards), which NFS and Lustre give;
//! - its report to `OUT/.tch-vis/reports/ID.json`, and `report.json` with
//!   this run's figures plus a combined view of all workers' reports.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use super::table::{self, State, END};
use super::{ImageResult, Layout, Method, Sink};
use crate::error::{Error, Result};
use crate::heatmap::{self, PngCompression};
use crate::io::{self, Replace};
use crate::preprocess::{InputImage, Preprocessor, Sidecar};

/// The folder, under an output folder, holding the row journals and
/// per-worker reports.
pub const JOURNAL_DIR: &str = ".tch-vis";

/// The rows of an output folder after a merge.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Merged {
    /// The `scores.csv` header.
    pub header: Vec<String>,
    /// Rows by relative path (byte order): the fields after `path`.
    pub rows: BTreeMap<String, Vec<String>>,
    /// Failed inputs by relative path, with the reason.
    pub failed: BTreeMap<String, String>,
}

/// How [`FolderSink::finish`] left the folder.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// The merged rows and failures of every worker.
    pub merged: Merged,
    /// Whether no other worker was active: this worker's view is final.
    pub last: bool,
}

struct Journal {
    writer: csv::Writer<BufWriter<fs::File>>,
}

/// An output folder: `REL.NAME.npy` (and `REL.NAME.png` heatmaps over the
/// image) for every array of the method, `scores.csv`, `report.json`.
/// Any number of workers may write into one folder at once: each writes
/// its files under temporary names renamed into place and its rows to a
/// journal of its own under [`JOURNAL_DIR`], and `scores.csv` is merged
/// from every journal at the end of each run.
pub struct FolderSink {
    out: PathBuf,
    header: Vec<String>,
    arrays: Vec<(String, bool)>,
    class_outputs: Vec<bool>,
    labels: Option<Vec<String>>,
    channels: usize,
    size: [usize; 2],
    id: String,
    done: HashSet<String>,
    journal: Mutex<Option<Journal>>,
    original: Option<Preprocessor>,
    overwrite: bool,
    /// This run's own settings (what [`FolderSink::settings`] was given).
    new_settings: Option<Settings>,
    /// The key of this run's own section in them.
    section: Option<String>,
    /// The record last written into `report.json` (see `record_settings`).
    settings_written: Mutex<Option<Settings>>,
    /// The inputs last written into `report.json` under [`INPUTS_KEY`].
    inputs_written: Mutex<Vec<Recorded>>,
    /// Heatmaps written with no value of 0.5 or more (see `faint_maps`).
    faint: std::sync::atomic::AtomicUsize,
    /// Whether [`FolderSink::begin`] succeeded: no image is taken before.
    begun: std::sync::atomic::AtomicBool,
    png: PngCompression,
    /// The part of the input this worker covers, when not all of it.
    shard: Option<crate::io::Shard>,
    /// What the input is ([`FolderSink::input`]).
    input: String,
    /// What was found in it ([`FolderSink::input_listing`]).
    listing: String,
    /// The folder the input is part of ([`FolderSink::input_within`]).
    within: String,
}

/// The folder, under [`JOURNAL_DIR`], recording what an output folder's
/// results depend on ([`FolderSink::settings`]) while runs are active or
/// after one was killed: one file per worker (`ID.json`, as the row
/// journals, so that no file is written by two processes), their union
/// the record; once the last worker has finished, `report.json` holds it
/// under [`SETTINGS_KEY`].
pub const SETTINGS_DIR: &str = "settings";

/// The folder, under [`JOURNAL_DIR`], that marks a change of a folder's
/// settings by overwriting runs until they have covered all of the input:
/// one file per worker (`ID`) of a [`Mark`]. While the marks of a command
/// do not yet cover the input with `done` parts of one set of settings,
/// the folder holds results of both settings, and runs that do not
/// overwrite are refused: of that command, and of every command where a
/// setting all commands share (the model, the scores) changed. They would
/// keep the old settings' results beside the new ones.
const CHANGING_DIR: &str = "changing";

/// The folder, under [`JOURNAL_DIR`], of the inputs whose runs wrote into
/// an output folder since its last finished run: one file per input
/// (named by a hash of it), holding a [`Recorded`]: a folder (an input
/// given a [`FolderSink::input_listing`]), or a part of one
/// ([`FolderSink::input_within`]). Folded into `report.json` under
/// [`INPUTS_KEY`] by the last worker.
const INPUTS_DIR: &str = "inputs";

/// The key of `report.json` that lists the inputs whose runs wrote
/// results into the folder (see [`INPUTS_DIR`]). An overwriting run that
/// changes the settings marks each of them that it does not redo as still
/// to be redone (their results keep the old settings), so that runs that
/// do not overwrite are refused until a run over each has overwritten it.
const INPUTS_KEY: &str = "results_inputs";

/// A mark of [`CHANGING_DIR`], one line each in its file: its command's
/// section (`""` for `scores`), the part of the input its worker covers
/// (`K/N`, `""` for all of it), whether the
/// change touches settings all commands share (`shared`), whether the
/// worker did all of its part (`done`), the worker's settings (compact
/// JSON), and its input ([`FolderSink::input`]). Parts count together
/// only under the same settings and input.
struct Mark {
    id: String,
    command: String,
    part: String,
    shared: bool,
    done: bool,
    settings: String,
    input: String,
    /// For a mark of another input that is part of a folder: that folder.
    within: String,
}

/// What the id of a mark of another input ([`INPUTS_KEY`]) has after the
/// id of the worker that made it, before a hash of the input.
const OTHER_INPUT: &str = "+input-";

impl Mark {
    /// Whether this marks another input than its run's ([`INPUTS_KEY`]):
    /// never done, it holds the run's settings and the other input.
    fn of_another_input(&self) -> bool {
        self.id.contains(OTHER_INPUT)
    }

    fn text(&self) -> String {
        format!(
            "{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
            self.command,
            self.part,
            if self.shared { "shared" } else { "" },
            if self.done { "done" } else { "" },
            self.settings,
            self.input.replace('\n', " "),
            self.within.replace('\n', " ")
        )
    }

    fn parse(id: String, text: &str) -> Mark {
        let mut lines = text.lines().map(str::trim);
        let mut next = || lines.next().unwrap_or("").to_string();
        let (command, part, shared, done, settings, input, within) =
            (next(), next(), next(), next(), next(), next(), next());
        Mark {
            id,
            command,
            part,
            shared: shared == "shared",
            done: done == "done",
            settings,
            input,
            within,
        }
    }
}

/// Whether the input is clean after a change recorded by `marks` (one
/// command's, in the order their runs began): every index of the input
/// was last touched by a mark that is done, of a part of the input
/// (`K/N` or `""`) under `input`, with `settings`. A mark of another input
/// (or a part that does not parse) touches every index and makes none clean;
/// a stopped run's mark makes the indices of its part unclean until a
/// later run does them. Past 65,536 residues, nothing counts as clean.
fn clean(marks: &[&Mark], settings: &str, input: &str) -> bool {
    // Each mark's part, parsed once (`None`: touches every index).
    let parts: Vec<Option<crate::io::Shard>> = marks
        .iter()
        .map(|m| match m.part.as_str() {
            _ if m.input != input => None,
            "" => Some(crate::io::Shard { index: 0, count: 1 }),
            p => p.parse().ok(),
        })
        .collect();
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let Some(l) = parts.iter().flatten().try_fold(1usize, |l, s| {
        let l = l / gcd(l, s.count) * s.count;
        (l <= 1 << 16).then_some(l)
    }) else {
        return false;
    };
    (0..l).all(|r| {
        let last = marks
            .iter()
            .zip(&parts)
            .rev()
            .find(|(_, p)| p.is_none_or(|s| s.contains(r)));
        last.is_some_and(|(m, p)| m.done && m.settings == settings && p.is_some())
    })
}

/// An input recorded in [`INPUTS_DIR`] and under [`INPUTS_KEY`]: a folder
/// (`within` empty), or a part of one, such as a list of its files, with
/// that folder ([`FolderSink::input_within`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Recorded {
    input: String,
    within: String,
}

impl Recorded {
    /// Its file in [`INPUTS_DIR`]: the input, then the folder.
    fn text(&self) -> String {
        format!("{}\n{}", self.input, self.within)
    }

    fn parse(text: &str) -> Recorded {
        let (input, within) = text.split_once('\n').unwrap_or((text, ""));
        Recorded {
            input: input.to_string(),
            within: within.to_string(),
        }
    }

    /// As `report.json` lists it: a folder's path, or `{"input", "within"}`.
    fn json(&self) -> serde_json::Value {
        if self.within.is_empty() {
            self.input.clone().into()
        } else {
            serde_json::json!({"input": self.input, "within": self.within})
        }
    }

    fn from_json(v: &serde_json::Value) -> Option<Recorded> {
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        match v {
            serde_json::Value::String(input) => Some(Recorded {
                input: input.clone(),
                within: String::new(),
            }),
            _ => Some(Recorded {
                input: field("input")?,
                within: field("within")?,
            }),
        }
    }
}

/// `record` without the key `section` (a command's own map settings; `""`
/// for none): the settings all commands share.
fn without_section(record: &Settings, section: &str) -> Settings {
    record
        .iter()
        .filter(|(k, _)| k.as_str() != section)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The input of a mark without its listing ([`FolderSink::input_listing`],
/// after a tab).
fn place(input: &str) -> &str {
    input.split('\t').next().unwrap_or(input)
}

/// The key of `report.json` that records what the folder's results depend
/// on ([`FolderSink::settings`]).
pub const SETTINGS_KEY: &str = "results_settings";

type Settings = serde_json::Map<String, serde_json::Value>;

/// The first key whose values differ, down into objects on both sides
/// (`saliency.smooth_samples`); keys on one side only do not count, at
/// any depth (a later version's new setting, another command's section).
fn differs(
    old: &Settings,
    new: &Settings,
) -> Option<(String, serde_json::Value, serde_json::Value)> {
    new.iter().find_map(|(k, v)| match (old.get(k)?, v) {
        (serde_json::Value::Object(o), serde_json::Value::Object(n)) => {
            let (sub, a, b) = differs(o, n)?;
            Some((format!("{k}.{sub}"), a, b))
        }
        (o, v) => (o != v).then(|| (k.clone(), o.clone(), v.clone())),
    })
}

/// What a section of the record (a command's map settings) reads once
/// an `--overwrite` run changed the shared settings its maps were made
/// with.
const STALE: &str = "stale: an --overwrite run changed the settings these maps were made with";

/// The record after a run with `new`, whose own section (its command's
/// map settings) is `section`: the union. After `overwrite` with another
/// value of a shared key (not `section`), the other sections of `record`
/// are marked [`STALE`], so that a rerun of those commands is refused
/// rather than keep maps of the old settings.
fn merge_settings(
    mut record: Settings,
    new: &Settings,
    overwrite: bool,
    section: Option<&str>,
) -> Settings {
    let shared_changed = new
        .iter()
        .any(|(k, v)| Some(k.as_str()) != section && record.get(k).is_some_and(|o| o != v));
    if overwrite && shared_changed {
        for (k, v) in record.iter_mut() {
            if !new.contains_key(k) && v.is_object() {
                *v = STALE.into();
            }
        }
    }
    record.extend(new.iter().map(|(k, v)| (k.clone(), v.clone())));
    record
}

/// Writes `record` as worker `id`'s settings file.
fn write_settings(out: &Path, id: &str, record: &Settings) -> Result<()> {
    let text = serde_json::to_vec_pretty(record).map_err(|e| Error::Internal {
        what: format!("cannot write the settings: {e}"),
    })?;
    io::write_atomic(&settings_path(out, id), &text)
}

/// Worker `id`'s settings file in `out`.
fn settings_path(out: &Path, id: &str) -> PathBuf {
    out.join(JOURNAL_DIR)
        .join(SETTINGS_DIR)
        .join(format!("{id}.json"))
}

/// The files of `dir` ending in `.ext`, sorted (by worker id, which
/// begins with the start time); none where `dir` does not exist.
fn files_in(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let read = match fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut v: Vec<PathBuf> = read
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    Ok(v)
}

/// The workers' settings files of a folder, oldest worker first (ids
/// begin with the start time), with their contents; an unreadable one is
/// an error naming it.
fn settings_files(out: &Path) -> Result<Vec<(PathBuf, Settings)>> {
    let paths = files_in(&out.join(JOURNAL_DIR).join(SETTINGS_DIR), "json")?;
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            // Removed by a finishing worker meanwhile: folded into its report.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(&path, e)),
        };
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(serde_json::Value::Object(record)) => files.push((path, record)),
            _ => {
                return Err(Error::OutputMismatch {
                    path,
                    reason: "is not a JSON object; use --overwrite to recompute the folder".into(),
                })
            }
        }
    }
    Ok(files)
}

/// Whether every key of `part` is in `whole` with the same value.
fn is_within(part: &Settings, whole: &Settings) -> bool {
    part.iter().all(|(k, v)| whole.get(k) == Some(v))
}

fn now_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:020}-{}-{}", io::host_name(), std::process::id())
}

/// What [`FolderSink::read_state`] returns.
type FolderState = (Merged, Vec<(PathBuf, u64)>, Vec<(PathBuf, Vec<String>)>);

impl FolderSink {
    /// Opens `out` for a run of `method` with `layout` (from
    /// [`super::Engine::prepare`]); reads what earlier runs left, writes
    /// nothing. With `overwrite`, earlier results count as not done.
    ///
    /// # Errors
    /// [`Error::OutputMismatch`] when `out` is not a directory, or its
    /// `scores.csv` or the journal of an unfinished run has other columns
    /// than this run's (unless `overwrite`); [`Error::Io`] when it cannot
    /// be read.
    pub fn open(
        out: impl AsRef<Path>,
        layout: &Layout,
        method: &dyn Method,
        sidecar: &Sidecar,
        overwrite: bool,
    ) -> Result<Self> {
        let out = out.as_ref().to_path_buf();
        match fs::metadata(&out) {
            Ok(m) if !m.is_dir() => {
                return Err(Error::OutputMismatch {
                    path: out,
                    reason: "exists and is not a directory".into(),
                })
            }
            // A file on its path, say: named here, not a file inside.
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&out, e)),
            _ => {}
        }
        let header = table::header(layout.outputs, &layout.class_outputs, &layout.columns);
        let csv_path = out.join("scores.csv");
        if let Some(h) = table::read_header(&csv_path)? {
            if h != header && !overwrite {
                return Err(Error::OutputMismatch {
                    path: csv_path,
                    reason: format!(
                        "has columns {:?} but this run writes {:?}; use another output folder or --overwrite",
                        h.join(","),
                        header.join(",")
                    ),
                });
            }
        }
        let mut sink = FolderSink {
            out,
            header,
            arrays: method.arrays(),
            class_outputs: layout.class_outputs.clone(),
            labels: sidecar.labels.clone(),
            channels: sidecar.channels,
            size: sidecar.input_size,
            id: now_id(),
            done: HashSet::new(),
            journal: Mutex::new(None),
            original: None,
            overwrite,
            new_settings: None,
            section: None,
            settings_written: Mutex::new(None),
            inputs_written: Mutex::new(Vec::new()),
            faint: Default::default(),
            begun: Default::default(),
            png: PngCompression::Fast,
            shard: None,
            input: String::new(),
            listing: String::new(),
            within: String::new(),
        };
        if !overwrite {
            let (merged, _, foreign) = sink.read_state()?;
            if let Some((path, columns)) = foreign.into_iter().next() {
                return Err(Error::OutputMismatch {
                    path,
                    reason: format!(
                        "holds rows of another run that scores.csv cannot take with this run's: columns {:?} (a run at work, one stopped before it finished, or one beside a run of other columns), where this run writes {:?}; use another output folder, or --overwrite to recompute the folder",
                        columns.join(","),
                        sink.header.join(",")
                    ),
                });
            }
            sink.done = merged.rows.into_keys().collect();
        }
        Ok(sink)
    }

    /// Marks this worker active in the folder (so that no other worker
    /// compacts the journals while it runs), after removing what dead
    /// processes of this host left: temporary files and their markers.
    /// Call it after every check passed, before the first image (the sink
    /// refuses results before it: [`Error::InvalidValue`]). Where it
    /// fails, nothing it wrote stays.
    ///
    /// # Errors
    /// [`Error::OutputMismatch`] when the folder's record, or the record of
    /// a worker that began meanwhile, has other settings
    /// ([`FolderSink::settings`]); [`Error::Io`] when the folder cannot be
    /// written.
    pub fn begin(&self) -> Result<()> {
        self.begin_writing().inspect_err(|_| self.back_out())?;
        self.begun.store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Refuses an image before [`FolderSink::begin`]: without its marker
    /// and journal header, other workers could fold this one's rows away
    /// or miss its settings.
    fn check_begun(&self) -> Result<()> {
        if self.begun.load(std::sync::atomic::Ordering::Acquire) {
            Ok(())
        } else {
            Err(Error::InvalidValue {
                what: "use of FolderSink",
                value: "a result before FolderSink::begin (call it after every check, before the engine runs)".into(),
            })
        }
    }

    fn begin_writing(&self) -> Result<()> {
        io::remove_stale_temps(&self.out);
        self.remove_dead_markers();
        let active = self.out.join(JOURNAL_DIR).join("active");
        if let Some(new) = &self.new_settings {
            // The record as other workers may have left it since `open`:
            // checked again, and joined with this run's.
            // (Overwriting, an unreadable record is replaced.)
            let record = if self.overwrite {
                self.read_settings().unwrap_or_default()
            } else {
                self.check_changing()?;
                let record = self.read_settings()?;
                self.check_settings(&record, new)?;
                record
            };
            // Overwriting with settings other than the last finished
            // run's, or while a change of this command's is under way:
            // the folder is marked until the change covers the input.
            if self.overwrite {
                let reported = self.reported_settings();
                // A change of a key other commands share (the model, the
                // scores...): the rows of scores.csv change too.
                let own = self.section.as_deref().unwrap_or("");
                let shared = |r: &Settings| without_section(r, own);
                // Against the record with the settings files too (`record`):
                // runs that never finished leave no report, only those.
                let before = [&reported, &record];
                let shared_changed = before
                    .iter()
                    .any(|r| differs(&shared(r), &shared(new)).is_some());
                let command = own.to_string();
                let settings = serde_json::Value::Object(new.clone()).to_string();
                let changed = shared_changed || before.iter().any(|r| differs(r, new).is_some());
                if changed {
                    // The results that other inputs' runs wrote into the
                    // folder keep the old settings: each of those inputs
                    // is marked as to be redone, by a run over it.
                    for other in self.recorded_inputs() {
                        if self.covers(&other.input, &other.within) {
                            continue;
                        }
                        let hash = io::Fnv::of(other.input.as_bytes());
                        let mark = Mark {
                            id: format!("{}{OTHER_INPUT}{hash:016x}", self.id),
                            command: command.clone(),
                            part: String::new(),
                            shared: shared_changed,
                            done: false,
                            settings: settings.clone(),
                            input: other.input,
                            within: other.within,
                        };
                        io::write_atomic(&self.changing_path(&mark.id), mark.text().as_bytes())?;
                    }
                }
                if changed || self.changing_marks().iter().any(|m| m.command == command) {
                    let mark = Mark {
                        id: self.id.clone(),
                        command,
                        part: self.part(),
                        shared: shared_changed,
                        done: false,
                        settings,
                        input: if self.listing.is_empty() {
                            self.input.clone()
                        } else {
                            format!("{}\t{}", self.input, self.listing)
                        },
                        within: self.within.clone(),
                    };
                    io::write_atomic(&self.changing_path(&self.id), mark.text().as_bytes())?;
                }
            }
            let merged = merge_settings(record, new, self.overwrite, self.section.as_deref());
            write_settings(&self.out, &self.id, &merged)?;
        }
        if let Some(own) = self.recorded_self() {
            io::write_atomic(&self.input_path(&own.input), own.text().as_bytes())?;
        }
        io::write_atomic(&active.join(&self.id), b"")?;
        if let Some(new) = &self.new_settings {
            self.check_concurrent(new)?;
        }
        // The journal, with its header, before the first output file: a
        // run of other columns that opens the folder after this one was
        // killed finds it (and is refused) even if no row made it in.
        self.with_journal(|_| Ok(()))
    }

    /// After a failed `begin`: no run, so no marker nor record of it. (Its
    /// folders stay: another worker beginning at the same time may be
    /// about to write into them; an empty journal holds no rows.)
    fn back_out(&self) {
        let _ = fs::remove_file(self.out.join(JOURNAL_DIR).join("active").join(&self.id));
        let _ = fs::remove_file(settings_path(&self.out, &self.id));
        let _ = fs::remove_file(self.changing_path(&self.id));
        if let Some(own) = self.recorded_self() {
            let _ = fs::remove_file(self.input_path(&own.input));
        }
        for m in self.changing_marks() {
            if m.id.starts_with(&format!("{}{OTHER_INPUT}", self.id)) {
                let _ = fs::remove_file(self.changing_path(&m.id));
            }
        }
    }

    /// Worker `id`'s mark in [`CHANGING_DIR`].
    fn changing_path(&self, id: &str) -> PathBuf {
        self.out.join(JOURNAL_DIR).join(CHANGING_DIR).join(id)
    }

    /// Whether this run's input is a folder (an input given a listing).
    fn over_a_folder(&self) -> bool {
        !self.input.is_empty() && !self.listing.is_empty()
    }

    /// This run's input as [`INPUTS_DIR`] records it: a folder, or a part
    /// of one; `None` for inputs of neither kind.
    fn recorded_self(&self) -> Option<Recorded> {
        if self.over_a_folder() {
            Some(Recorded {
                input: self.input.clone(),
                within: String::new(),
            })
        } else if !self.input.is_empty() && !self.within.is_empty() {
            Some(Recorded {
                input: self.input.clone(),
                within: self.within.clone(),
            })
        } else {
            None
        }
    }

    /// Whether this run, done, redid what `input` (a part of `within`,
    /// where not empty) holds: the same input, or a folder that it is part
    /// of.
    fn covers(&self, input: &str, within: &str) -> bool {
        place(input) == place(&self.input)
            || (!within.is_empty() && self.over_a_folder() && within == place(&self.input))
    }

    /// Input `input`'s file in [`INPUTS_DIR`].
    fn input_path(&self, input: &str) -> PathBuf {
        self.out
            .join(JOURNAL_DIR)
            .join(INPUTS_DIR)
            .join(format!("{:016x}", io::Fnv::of(input.as_bytes())))
    }

    /// The inputs whose runs wrote into the folder: those the last
    /// finished run's report lists, and those of runs since (sorted).
    fn recorded_inputs(&self) -> Vec<Recorded> {
        let mut inputs: Vec<Recorded> = self
            .report()
            .and_then(|r| match r.get(INPUTS_KEY) {
                Some(serde_json::Value::Array(a)) => {
                    Some(a.iter().filter_map(Recorded::from_json).collect())
                }
                _ => None,
            })
            .unwrap_or_default();
        if let Ok(read) = fs::read_dir(self.out.join(JOURNAL_DIR).join(INPUTS_DIR)) {
            for e in read.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.contains(io::TEMP_MARK) {
                    continue;
                }
                if let Ok(text) = fs::read_to_string(e.path()) {
                    inputs.push(Recorded::parse(&text));
                }
            }
        }
        inputs.sort();
        inputs.dedup();
        inputs
    }

    /// The part of the input this worker covers, as a mark holds it.
    fn part(&self) -> String {
        self.shard.map(|s| s.to_string()).unwrap_or_default()
    }

    /// The marks of [`CHANGING_DIR`] but this worker's own.
    fn changing_marks(&self) -> Vec<Mark> {
        let Ok(read) = fs::read_dir(self.out.join(JOURNAL_DIR).join(CHANGING_DIR)) else {
            return Vec::new();
        };
        let mut marks: Vec<Mark> = read
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|id| *id != self.id && !id.contains(io::TEMP_MARK))
            .map(|id| {
                let text = fs::read_to_string(self.changing_path(&id)).unwrap_or_default();
                Mark::parse(id, &text)
            })
            .collect();
        marks.sort_by(|a, b| a.id.cmp(&b.id));
        marks
    }

    /// Refuses a run that does not overwrite while a change of its
    /// command's settings, or of settings all commands share, has not
    /// covered the input ([`CHANGING_DIR`]).
    fn check_changing(&self) -> Result<()> {
        let own = self.section.as_deref().unwrap_or("");
        let marks = self.changing_marks();
        let Some(mark) = marks.iter().find(|m| m.command == own || m.shared) else {
            return Ok(());
        };
        let command = if mark.command.is_empty() {
            "scores"
        } else {
            mark.command.as_str()
        };
        // The marks of that command, one value of each picked: sorted,
        // without repeats.
        let of_command = |pick: &dyn Fn(&Mark) -> Option<&str>| -> Vec<&str> {
            let mut v: Vec<&str> = marks
                .iter()
                .filter(|m| m.command == mark.command)
                .filter_map(pick)
                .collect();
            v.sort();
            v.dedup();
            v
        };
        // The inputs of that command's overwriting runs, each with the
        // parts of it done so far.
        let inputs = of_command(&|m| (!m.of_another_input()).then(|| place(&m.input)));
        let unfinished: Vec<String> = inputs
            .iter()
            .map(|&input| {
                let done = of_command(&|m| {
                    let part = if m.part.is_empty() { "all" } else { &m.part };
                    (m.done && place(&m.input) == input).then_some(part)
                });
                match done.as_slice() {
                    [] => input.to_string(),
                    done => format!("{input} (done so far: {})", done.join(", ")),
                }
            })
            .collect();
        let unfinished = if unfinished.is_empty() {
            String::new()
        } else {
            format!(" over {}", unfinished.join("; "))
        };
        // Inputs marked by a run over another one (see [`INPUTS_KEY`]).
        let others = of_command(&|m| m.of_another_input().then_some(m.input.as_str()));
        let others = if others.is_empty() {
            String::new()
        } else {
            format!(
                "; the results that runs over {} wrote into it keep the old settings until a run over it (or over the folder a list is of) overwrites them",
                others.join(", ")
            )
        };
        Err(Error::OutputMismatch {
            path: self.out.clone(),
            reason: format!(
                "an --overwrite {command} run with other settings has not covered all of the input{unfinished} (a run stopped before its last image, one is still running, or a shard is still to run, or it ran over another input than earlier runs), so the folder holds results of both settings{others}: rerun {command} with --overwrite for the rest (or remove {} to take the folder as it is)", self.out.join(JOURNAL_DIR).join(CHANGING_DIR).display()
            ),
        })
    }

    /// After this overwriting run did all of its part: its mark says so,
    /// and once every index of the input was last done by a finished run
    /// of this run's settings and input ([`clean`]), every mark of its
    /// command and input goes, with those of other listings of the same
    /// input (files since added or removed), which the covering runs came
    /// after. (Marks of another input stay until runs of that input clean
    /// it.)
    fn clear_changing(&self) -> Result<()> {
        let own = self.changing_path(&self.id);
        let Ok(text) = fs::read_to_string(&own) else {
            return Ok(());
        };
        let mut mine = Mark::parse(self.id.clone(), &text);
        mine.done = true;
        io::write_atomic(&own, mine.text().as_bytes())?;
        let marks = self.changing_marks();
        let mut ours: Vec<&Mark> = marks
            .iter()
            .filter(|m| m.command == mine.command && self.covers(&m.input, &m.within))
            .collect();
        ours.push(&mine);
        ours.sort_by(|a, b| a.id.cmp(&b.id));
        if clean(&ours, &mine.settings, &mine.input) {
            for m in ours {
                let _ = fs::remove_file(self.changing_path(&m.id));
            }
        }
        Ok(())
    }

    /// After this overwriting run did all of its input: the marks of other
    /// commands' changes of shared settings over the same input, to this
    /// run's values of them, refuse only their own command from now on.
    /// This run redid every image's rows and its own command's maps with
    /// those values; the other commands' maps stay mixed (their sections
    /// of the record were marked stale when the change began).
    fn unshare_marks(&self) -> Result<()> {
        let Some(new) = &self.new_settings else {
            return Ok(());
        };
        let own = self.section.as_deref().unwrap_or("");
        let ours = without_section(new, own);
        for mut m in self.changing_marks() {
            if !m.shared || m.command == own || !self.covers(&m.input, &m.within) {
                continue;
            }
            let Ok(serde_json::Value::Object(theirs)) =
                serde_json::from_str::<serde_json::Value>(&m.settings)
            else {
                continue;
            };
            if differs(&without_section(&theirs, &m.command), &ours).is_none() {
                m.shared = false;
                io::write_atomic(&self.changing_path(&m.id), m.text().as_bytes())?;
            }
        }
        Ok(())
    }

    /// Removes the markers of this host's dead processes.
    fn remove_dead_markers(&self) {
        if let Ok(read) = fs::read_dir(self.out.join(JOURNAL_DIR).join("active")) {
            for e in read.flatten() {
                if is_dead_local(&e.file_name().to_string_lossy()) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }

    /// Whether worker `id`'s marker says it is at work (markers of this
    /// host's dead processes do not).
    fn at_work(&self, id: &str) -> bool {
        self.out.join(JOURNAL_DIR).join("active").join(id).exists() && !is_dead_local(id)
    }

    /// Two runs of other settings that begin at once both pass the check
    /// of `begin` before either has written its settings file: each looks
    /// again once its own file is written, and backs out on a conflict
    /// (both may; then neither writes anything). Overwriting, only the
    /// settings of workers still running count: the others' results are
    /// recomputed.
    fn check_concurrent(&self, new: &Settings) -> Result<()> {
        let own = settings_path(&self.out, &self.id);
        // (Overwriting, an unreadable record is replaced: not a conflict.)
        let files = match settings_files(&self.out) {
            Err(_) if self.overwrite => Vec::new(),
            files => files?,
        };
        for (path, file) in files {
            if path == own {
                continue;
            }
            if self.overwrite && !self.at_work(&worker_of(&path)) {
                continue;
            }
            if let Some((key, was, now)) = differs(&file, new) {
                return Err(Error::OutputMismatch {
                    path: self.out.clone(),
                    reason: format!(
                        "another run is writing into it with {key} {was}, and this run has {key} {now}: let it finish, or use another output folder"
                    ),
                });
            }
        }
        Ok(())
    }

    /// What this run's results depend on, as a JSON object: for example
    /// its model, sidecar and scores, and under the command's name the
    /// settings of its maps. A folder whose earlier results were made with
    /// another value of one of these keys is refused (unless the sink was
    /// opened with `overwrite`): a rerun would keep those results as done,
    /// beside new ones of other settings. Keys on one side only do not
    /// conflict (a `scores` run, then a `saliency` run of the same model
    /// and scores); [`FolderSink::begin`] records the union. `section`
    /// names the key of this run's own maps' settings: an `overwrite` run
    /// that changes another key marks the other commands' sections stale,
    /// and their reruns are refused until they overwrite too. A folder of
    /// runs that recorded nothing is taken as it is.
    ///
    /// # Errors
    /// [`Error::OutputMismatch`] naming the first key whose values differ;
    /// [`Error::Io`] when the folder's record cannot be read.
    pub fn settings(mut self, settings: serde_json::Value, section: Option<&str>) -> Result<Self> {
        let serde_json::Value::Object(new) = settings else {
            return Err(Error::Internal {
                what: "the settings of a folder sink must be a JSON object".into(),
            });
        };
        self.section = section.map(str::to_string);
        if !self.overwrite {
            // (A mixed folder first: its record names one side only.)
            self.check_changing()?;
            let record = self.read_settings()?;
            self.check_settings(&record, &new)?;
        }
        self.new_settings = Some(new);
        Ok(self)
    }

    /// Puts the folder's record, joined with this run's settings, into
    /// `report` (under [`SETTINGS_KEY`]).
    ///
    /// A sink without settings keeps the folder's record as it is, unless
    /// it overwrites (its results' settings are then unknown).
    fn record_settings(&self, report: &mut serde_json::Map<String, serde_json::Value>) {
        let mut inputs = self.recorded_inputs();
        if let Some(own) = self.recorded_self() {
            if !inputs.contains(&own) {
                inputs.push(own);
                inputs.sort();
            }
        }
        if !inputs.is_empty() {
            let listed: Vec<serde_json::Value> = inputs.iter().map(Recorded::json).collect();
            report.insert(INPUTS_KEY.into(), listed.into());
        }
        *self
            .inputs_written
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = inputs;
        // (A settings file that cannot be read: the record as the last
        // finished run left it.)
        let record = self
            .read_settings()
            .unwrap_or_else(|_| self.reported_settings());
        let record = match &self.new_settings {
            Some(new) => merge_settings(record, new, false, self.section.as_deref()),
            None if self.overwrite || record.is_empty() => return,
            None => record,
        };
        report.insert(SETTINGS_KEY.into(), record.clone().into());
        *self
            .settings_written
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(record);
    }

    /// The folder's record of what its results were made with: the last
    /// finished run's report, joined with the files of the workers that
    /// ran since (active or killed), in the order they began.
    fn read_settings(&self) -> Result<Settings> {
        let mut record = self.reported_settings();
        for (_, file) in settings_files(&self.out)? {
            record.extend(file);
        }
        Ok(record)
    }

    /// The record as the last finished run left it in `report.json`.
    fn reported_settings(&self) -> Settings {
        match self
            .report()
            .and_then(|mut r| r.get_mut(SETTINGS_KEY).map(serde_json::Value::take))
        {
            Some(serde_json::Value::Object(record)) => record,
            _ => Settings::new(),
        }
    }

    /// Refuses `new` where `record` has another value of one of its keys.
    fn check_settings(&self, record: &Settings, new: &Settings) -> Result<()> {
        let Some((key, was, now)) = differs(record, new) else {
            return Ok(());
        };
        if was.as_str() == Some(STALE) {
            return Err(Error::OutputMismatch {
                path: self.out.clone(),
                reason: format!(
                    "holds {key} maps made with other settings than the folder's now (an --overwrite run changed them): rerun {key} with --overwrite"
                ),
            });
        }
        let short = |v: &serde_json::Value| {
            let text = v.to_string();
            match text.char_indices().nth(120) {
                Some((cut, _)) => format!("{}…", &text[..cut]),
                None => text,
            }
        };
        Err(Error::OutputMismatch {
            path: self.out.clone(),
            reason: format!(
                "holds results made with {key} {}, and this run has {key} {}: use another output folder, or --overwrite to recompute them",
                short(&was),
                short(&now)
            ),
        })
    }

    /// Draws heatmaps over the original image, at its own resolution,
    /// instead of the resized one: the map is upsampled onto the part of
    /// the original the model saw (all of it, or the centre crop of a
    /// `resize` + `crop` sidecar). The engine's preprocessor keeps the
    /// originals ([`Preprocessor::keep_original`]) up to an eighth of its
    /// allocation limit; an image that comes without its original (a
    /// larger one) is decoded again here with `pre`, which also says
    /// where the map lies on it.
    pub fn overlay_original(mut self, pre: Preprocessor) -> Self {
        self.original = Some(pre);
        self
    }

    /// How the heatmap PNGs are compressed (default
    /// [`PngCompression::Fast`]).
    pub fn png_compression(mut self, compression: PngCompression) -> Self {
        self.png = compression;
        self
    }

    /// The part of the input this worker covers (`--shard K/N`), where it
    /// is not all of it. Overwriting runs that change the folder's settings
    /// mark the folder (`.tch-vis/changing/`) until the parts they finished
    /// (a part is finished when [`FolderSink::finish`]'s report has no
    /// `error`) cover the input under one set of settings; meanwhile runs
    /// that do not overwrite are refused. Without a shard a run covers all
    /// of its input ([`FolderSink::input`]).
    pub fn shard(mut self, shard: crate::io::Shard) -> Self {
        self.shard = (shard.count > 1).then_some(shard);
        self
    }

    /// What the input is, for the marks of [`FolderSink::shard`]: for
    /// example its folder, or a list and its names. Parts count together,
    /// and clear each other's marks, only when their runs had the same
    /// input: a run over a subfolder or a list into the same output folder
    /// covers none of the folder's.
    pub fn input(mut self, input: impl Into<String>) -> Self {
        self.input = input.into();
        self.listing.clear();
        self
    }

    /// What [`FolderSink::input`] held when this run listed it, for
    /// example the number of files and a digest of their names. Parts
    /// count together only over the same listing (a file added between two
    /// shards' runs moves the indices after it, so the shards would leave
    /// some images undone); a run that covers the input with the current
    /// listing clears the marks of earlier listings.
    ///
    /// An input given a listing is taken for a folder, and recorded as one
    /// of the inputs the output folder holds results of (`results_inputs`
    /// in `report.json`):
    /// an overwriting run over another input that changes the settings
    /// marks it as still to be redone.
    pub fn input_listing(mut self, listing: impl Into<String>) -> Self {
        self.listing = listing.into().replace(['\t', '\n'], " ");
        self
    }

    /// The folder that [`FolderSink::input`] is part of, where it is not a
    /// folder itself: a list of the folder's files, or one of them. Such an
    /// input is recorded with its folder (`results_inputs` in
    /// `report.json`), and a run over that folder ([`FolderSink::input`]
    /// with a listing) redoes it: an overwriting run of other settings over
    /// anything else marks it as still to be redone, a run over the folder
    /// does not.
    pub fn input_within(mut self, folder: impl Into<String>) -> Self {
        self.within = folder.into().replace('\n', " ");
        self
    }

    /// How many heatmaps this sink wrote whose largest value is under
    /// 0.5: maps normalised as `(m − min) / (max − min + 1e-7)` (saliency,
    /// Integrated Gradients) whose range was under 1e-7, as a score that
    /// saturates gives (a softmax probability near 0 or 1 has near-zero
    /// gradients), or a CAM that is constant (most often zero)
    /// everywhere. Their PNGs are all or nearly all the colour map's low
    /// end.
    pub fn faint_maps(&self) -> usize {
        self.faint.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The output folder.
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// This worker's id (start time, host, process id).
    pub fn worker_id(&self) -> &str {
        &self.id
    }

    /// Whether an earlier run finished `rel`: its row is in `scores.csv` or
    /// a journal, and every file of the method exists.
    pub fn is_done(&self, rel: &str) -> bool {
        self.done.contains(rel)
            && self.arrays.iter().all(|(name, heat)| {
                self.file(rel, &format!(".{name}.npy")).is_file()
                    && (!heat || self.file(rel, &format!(".{name}.png")).is_file())
            })
    }

    fn file(&self, rel: &str, suffix: &str) -> PathBuf {
        self.out.join(format!("{rel}{suffix}"))
    }

    fn journals(&self) -> Result<Vec<PathBuf>> {
        files_in(&self.out.join(JOURNAL_DIR).join("rows"), "csv")
    }

    /// The merged state, the journal lengths it was read at, and the
    /// journals of other columns (an unfinished run of another job), with
    /// their columns. Those are not merged, and not removed by a
    /// compaction unless this sink overwrites: their rows are another
    /// run's to merge.
    fn read_state(&self) -> Result<FolderState> {
        let mut state = State::default();
        let mut touched = HashSet::new();
        let mut seen = Vec::new();
        let mut foreign = Vec::new();
        for j in self.journals()? {
            let bytes = match fs::read(&j) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&j, e)),
            };
            let len = bytes.len() as u64;
            match table::replay_journal(&bytes, &self.header, &mut state, &mut touched) {
                Some(columns) if !self.overwrite => foreign.push((j, columns)),
                _ => seen.push((j, len)),
            }
        }
        if let Some(base) = table::read_table(&self.out.join("scores.csv"), &self.header)? {
            for (path, values) in base.rows {
                if !touched.contains(&path) {
                    state.rows.insert(path, values);
                }
            }
        }
        // Failures of journals folded away earlier live on in report.json.
        for (path, error) in self.folded_failures() {
            if !touched.contains(&path) && !state.rows.contains_key(&path) {
                state.failed.insert(path, error);
            }
        }
        Ok((
            Merged {
                header: self.header.clone(),
                rows: state.rows,
                failed: state.failed,
            },
            seen,
            foreign,
        ))
    }

    /// The folder's `report.json`, if it has a readable one.
    fn report(&self) -> Option<serde_json::Value> {
        let bytes = fs::read(self.out.join("report.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn folded_failures(&self) -> Vec<(String, String)> {
        let Some(v) = self.report() else {
            return Vec::new();
        };
        v.get("failed_in_folder")
            .and_then(|f| f.as_array())
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| {
                        Some((
                            i.get("path")?.as_str()?.to_string(),
                            i.get("error")?.as_str()?.to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Rebuilds `scores.csv` from every journal, until no journal changed
    /// during the merge (see the module docs). Returns the merged rows.
    ///
    /// # Errors
    /// [`Error::Io`] when a journal cannot be read or `scores.csv` written.
    pub fn merge(&self) -> Result<Merged> {
        Ok(self.merge_seen()?.0)
    }

    #[allow(clippy::type_complexity)]
    fn merge_seen(&self) -> Result<(Merged, Vec<(PathBuf, u64)>)> {
        self.flush()?;
        let csv_path = self.out.join("scores.csv");
        let mut last = (Merged::default(), Vec::new());
        for _ in 0..20 {
            let (merged, seen, foreign) = self.read_state()?;
            io::write_atomic(&csv_path, &table::render(&self.header, &merged.rows)?)?;
            let grew = seen
                .iter()
                .any(|(p, len)| fs::metadata(p).map_or(true, |m| m.len() != *len));
            let new = self.journals()?.len() != seen.len() + foreign.len();
            last = (merged, seen);
            if !grew && !new {
                break;
            }
        }
        Ok(last)
    }

    fn flush(&self) -> Result<()> {
        let mut guard = self.journal.lock().map_err(|_| poisoned())?;
        if let Some(j) = guard.as_mut() {
            j.writer
                .flush()
                .map_err(|e| Error::io(self.journal_path(), e))?;
        }
        Ok(())
    }

    fn journal_path(&self) -> PathBuf {
        self.out
            .join(JOURNAL_DIR)
            .join("rows")
            .join(format!("{}.csv", self.id))
    }

    /// Calls `f` with this worker's journal, made (with its header, on
    /// disk at once) the first time.
    fn with_journal(&self, f: impl FnOnce(&mut Journal) -> Result<()>) -> Result<()> {
        let path = self.journal_path();
        let mut guard = self.journal.lock().map_err(|_| poisoned())?;
        if guard.is_none() {
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            let file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            let mut writer = csv::Writer::from_writer(BufWriter::new(file));
            writer
                .write_record(table::journal_header(&self.header))
                .map_err(|e| csv_io(&path, e))?;
            writer.flush().map_err(|e| Error::io(&path, e))?;
            *guard = Some(Journal { writer });
        }
        let Some(j) = guard.as_mut() else {
            return Err(poisoned());
        };
        f(j)
    }

    fn append(&self, record: &[String]) -> Result<()> {
        let path = self.journal_path();
        self.with_journal(|j| {
            j.writer
                .write_record(record)
                .map_err(|e| csv_io(&path, e))?;
            // Every row reaches the file at once (one small write): after a
            // crash, only images whose row was not yet appended are redone.
            j.writer.flush().map_err(|e| Error::io(&path, e))
        })
    }

    fn label(&self, class: usize) -> String {
        self.labels
            .as_ref()
            .and_then(|l| l.get(class))
            .cloned()
            .unwrap_or_default()
    }

    fn write_files(&self, r: &ImageResult, original: Option<&image::RgbImage>) -> Result<()> {
        let [h, w] = self.size;
        for a in &r.arrays {
            // Only this worker writes an image's files (see `Replace`).
            let npy = self.file(&r.rel, &format!(".{}.npy", a.name));
            io::write_npy(&npy, &a.values, Replace::SetAside)?;
            if let Some(heat) = &a.heat {
                let mut faint = false;
                let png = with_values(heat, |map: &[f32]| {
                    faint = is_faint(map);
                    match (&self.original, original) {
                        (Some(pre), Some(original)) => heatmap::overlay_original_region_png_as(
                            original,
                            map,
                            w,
                            h,
                            pre.map_region(r.original_size),
                            self.png,
                        ),
                        _ => match &r.image {
                            InputImage::Bytes(t) => with_values(t, |bytes| {
                                heatmap::overlay_bytes_png_as(
                                    bytes,
                                    self.channels,
                                    w,
                                    h,
                                    map,
                                    self.png,
                                )
                            }),
                            InputImage::Planes(t) => with_values(t, |image| {
                                heatmap::overlay_png_as(image, self.channels, w, h, map, self.png)
                            }),
                        },
                    }
                })?;
                let path = self.file(&r.rel, &format!(".{}.png", a.name));
                io::write_bytes(&path, &png, Replace::SetAside)?;
                if faint {
                    self.faint
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Ends the run: flushes this worker's journal, merges `scores.csv`,
    /// and writes this worker's report and `report.json` (the fields of
    /// `report`, plus `workers`: the reports of every worker that wrote
    /// into the folder, and `rows_in_scores_csv`). `report` holds this
    /// run's figures, as the command line writes them: `processed`,
    /// `skipped`, and `failed` as `[{"path": REL, "error": ...}]`, from
    /// which `workers` counts the failures and `failed_in_folder` lists
    /// the folder's (the [module example](super) builds it from a
    /// [`super::Summary`]). Returns the merged rows,
    /// and whether this worker was the last one active in the folder (the
    /// one whose view of the folder is final, to write summaries such as a
    /// gallery).
    ///
    /// # Errors
    /// [`Error::Io`] when a file cannot be written.
    pub fn finish(&self, report: serde_json::Value) -> Result<Finished> {
        // The old files that reruns set aside, removed before the report.
        io::wait_removals();
        let complete = self.overwrite && report.get("error").is_none_or(serde_json::Value::is_null);
        if complete {
            self.clear_changing()?;
            if self.part().is_empty() {
                self.unshare_marks()?;
            }
        }
        let merged = self.merge()?;
        let mut report = match report {
            serde_json::Value::Object(m) => m,
            other => {
                let mut m = serde_json::Map::new();
                m.insert("report".into(), other);
                m
            }
        };
        report.insert("worker".into(), self.id.clone().into());
        self.record_settings(&mut report);
        let dir = self.out.join(JOURNAL_DIR);
        let own = serde_json::to_vec_pretty(&report).map_err(|e| Error::Internal {
            what: e.to_string(),
        })?;
        io::write_atomic(&dir.join("reports").join(format!("{}.json", self.id)), &own)?;
        // Report and summary first, marker last: a worker that then finds
        // no other marker writes after every other worker has written.
        self.write_summary(&mut report, &merged)?;
        let _ = fs::remove_file(dir.join("active").join(&self.id));
        if self.others_active() {
            return Ok(Finished {
                merged,
                last: false,
            });
        }
        // The last worker merges and folds again: a worker may have
        // finished since this one's merge and listing (or begun, and
        // recorded its settings).
        let (merged, seen) = self.merge_seen()?;
        self.record_settings(&mut report);
        let report_files = self.write_summary(&mut report, &merged)?;
        if complete && self.part().is_empty() {
            self.drop_superseded_settings();
        }
        self.compact(&seen, &report_files);
        Ok(Finished { merged, last: true })
    }

    /// After an overwriting run of all of its input finished: the settings
    /// files of stopped workers that differ from the record written only
    /// in what this run recomputed (its command's section, the settings
    /// all commands share) go. This run redid their images; kept, they
    /// would lay their old values over the record for good (a run killed
    /// before the first finished one, then an `--overwrite` with another
    /// score: every later rerun was refused).
    fn drop_superseded_settings(&self) {
        let (Some(new), Some(written)) = (
            self.new_settings.as_ref(),
            self.settings_written
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        ) else {
            return;
        };
        let own = settings_path(&self.out, &self.id);
        for (path, file) in settings_files(&self.out).unwrap_or_default() {
            if path == own || self.at_work(&worker_of(&path)) {
                continue;
            }
            if file
                .iter()
                .all(|(k, v)| new.contains_key(k) || written.get(k) == Some(v))
            {
                let _ = fs::remove_file(path);
            }
        }
    }

    /// Writes `report.json`: `report` plus `workers` (every per-worker
    /// report in the folder, and those folded into `report.json` before),
    /// the row count, the classes and the folder's failures. Returns the
    /// per-worker report files it read.
    fn write_summary(
        &self,
        report: &mut serde_json::Map<String, serde_json::Value>,
        merged: &Merged,
    ) -> Result<Vec<PathBuf>> {
        let reports = self.out.join(JOURNAL_DIR).join("reports");
        // Workers of earlier runs, folded into report.json by a compaction.
        let mut workers: Vec<serde_json::Value> = fs::read(self.out.join("report.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("workers").and_then(|w| w.as_array()).cloned())
            .unwrap_or_default();
        let mut report_files: Vec<PathBuf> = Vec::new();
        if let Ok(read) = fs::read_dir(&reports) {
            let mut paths: Vec<PathBuf> = read.flatten().map(|e| e.path()).collect();
            paths.sort();
            for p in paths {
                let Ok(bytes) = fs::read(&p) else { continue };
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                    continue;
                };
                report_files.push(p);
                let pick = |k: &str| v.get(k).cloned().unwrap_or(serde_json::Value::Null);
                workers.retain(|w| w.get("worker") != v.get("worker"));
                workers.push(serde_json::json!({
                    "worker": pick("worker"),
                    "command": pick("command"),
                    "shard": pick("shard"),
                    "device": pick("device"),
                    "processed": pick("processed"),
                    "skipped": pick("skipped"),
                    "failed": v.get("failed").and_then(|f| f.as_array()).map_or(0, Vec::len),
                    "seconds": pick("seconds"),
                    "images_per_second": pick("images_per_second"),
                    "error": pick("error"),
                }));
            }
        }
        report.insert("rows_in_scores_csv".into(), merged.rows.len().into());
        report.insert("classes".into(), class_counts(merged).into());
        report.insert(
            "failed_in_folder".into(),
            merged
                .failed
                .iter()
                .map(|(p, e)| serde_json::json!({"path": p, "error": e}))
                .collect::<Vec<_>>()
                .into(),
        );
        report.insert("workers".into(), workers.into());
        let text = serde_json::to_vec_pretty(&report).map_err(|e| Error::Internal {
            what: e.to_string(),
        })?;
        io::write_atomic(&self.out.join("report.json"), &text)?;
        Ok(report_files)
    }

    /// Whether another worker's marker is in the folder (markers of this
    /// host's dead processes do not count).
    fn others_active(&self) -> bool {
        let active = self.out.join(JOURNAL_DIR).join("active");
        fs::read_dir(active).is_ok_and(|r| {
            r.flatten()
                .any(|e| !is_dead_local(&e.file_name().to_string_lossy()))
        })
    }

    /// For the last worker: removes the journals of its final merge (all
    /// their rows are in `scores.csv`, renamed before) and the per-worker
    /// reports (folded into `report.json`), leaving only the folder's
    /// results. A journal that grew since it was merged, the journal and
    /// the marker of a worker that started meanwhile, are kept.
    fn compact(&self, seen: &[(PathBuf, u64)], reports: &[PathBuf]) {
        for (p, len) in seen {
            // The journal of a worker that began after this one's last
            // look at the markers (it makes its journal at `begin`, right
            // after its marker) stays: it may not have grown yet.
            if self.at_work(&worker_of(p)) {
                continue;
            }
            if fs::metadata(p).is_ok_and(|m| m.len() == *len) {
                let _ = fs::remove_file(p);
            }
        }
        for p in reports {
            let _ = fs::remove_file(p);
        }
        self.remove_dead_markers();
        // `report.json` holds the settings now (see `finish`): the files
        // within what it got go (a worker that began since may have
        // recorded more).
        let written = self
            .settings_written
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(written) = written.as_ref() {
            for (path, file) in settings_files(&self.out).unwrap_or_default() {
                if is_within(&file, written) {
                    let _ = fs::remove_file(path);
                }
            }
        }
        // The inputs it lists go too.
        let inputs = self
            .inputs_written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for input in inputs {
            let path = self.input_path(&input.input);
            if fs::read_to_string(&path).is_ok_and(|text| text == input.text()) {
                let _ = fs::remove_file(path);
            }
        }
        let dir = self.out.join(JOURNAL_DIR);
        for sub in [
            "rows",
            "reports",
            "active",
            SETTINGS_DIR,
            CHANGING_DIR,
            INPUTS_DIR,
        ] {
            let _ = fs::remove_dir(dir.join(sub));
        }
        let _ = fs::remove_dir(&dir);
    }
}

/// For every `class_K` column of the folder's rows: how many images took
/// each class, with its label (`[{"output": K, "class": C, "label": L,
/// "images": N}, ...]`, by output then class).
fn class_counts(merged: &Merged) -> Vec<serde_json::Value> {
    let mut counts: BTreeMap<(usize, usize), (String, usize)> = BTreeMap::new();
    for (c, name) in merged.header.iter().enumerate().skip(1) {
        let Some(k) = name
            .strip_prefix("class_")
            .and_then(|k| k.parse::<usize>().ok())
        else {
            continue;
        };
        let label_col = merged
            .header
            .iter()
            .position(|h| *h == format!("label_{k}"));
        for values in merged.rows.values() {
            let Some(class) = values.get(c - 1).and_then(|v| v.parse::<usize>().ok()) else {
                continue;
            };
            let label = label_col
                .and_then(|l| values.get(l - 1))
                .cloned()
                .unwrap_or_default();
            let entry = counts.entry((k, class)).or_insert((label, 0));
            entry.1 += 1;
        }
    }
    counts
        .into_iter()
        .map(|((k, class), (label, n))| {
            serde_json::json!({"output": k, "class": class, "label": label, "images": n})
        })
        .collect()
}

/// The worker id a journal or settings file is named by (`ID.csv`,
/// `ID.json`).
fn worker_of(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether a worker id (`TIME-HOST-PID`) names a process of this host
/// that no longer runs.
fn is_dead_local(id: &str) -> bool {
    let mut parts = id.rsplitn(2, '-');
    let (Some(pid), Some(rest)) = (parts.next(), parts.next()) else {
        return false;
    };
    let Some((_, host)) = rest.split_once('-') else {
        return false;
    };
    host == io::host_name()
        && pid
            .parse::<u32>()
            .is_ok_and(|p| p != std::process::id() && !Path::new(&format!("/proc/{p}")).exists())
}

fn poisoned() -> Error {
    Error::Internal {
        what: "a journal lock was poisoned".into(),
    }
}

fn csv_io(path: &Path, e: csv::Error) -> Error {
    Error::io(path, std::io::Error::other(e.to_string()))
}

impl Sink for FolderSink {
    fn image(&self, r: ImageResult) -> Result<()> {
        self.check_begun()?;
        // An original the engine did not keep (a large one) is decoded
        // again here, for the overlays that draw over it.
        let reloaded = match (&self.original, &r.original) {
            (Some(pre), None) if r.arrays.iter().any(|a| a.heat.is_some()) => {
                Some(pre.load_original(&r.path).map_err(|e| {
                    e.context(format!(
                        "cannot decode {} again for its overlay (did it change during the run?)",
                        r.rel
                    ))
                })?)
            }
            _ => None,
        };
        self.write_files(&r, reloaded.as_ref().or(r.original.as_ref()))
            .map_err(|e| e.context(format!("cannot write the outputs of {}", r.rel)))?;
        let mut record = Vec::with_capacity(self.header.len() + 2);
        record.push(r.rel.clone());
        record.extend(r.scores.iter().map(ToString::to_string));
        for (k, has) in self.class_outputs.iter().enumerate() {
            if *has {
                match r.classes.get(k).copied().flatten() {
                    Some(c) => {
                        record.push(c.to_string());
                        record.push(self.label(c));
                    }
                    None => {
                        record.push(String::new());
                        record.push(String::new());
                    }
                }
            }
        }
        record.extend(r.columns.iter().map(|(_, v)| v.to_string()));
        record.push(String::new());
        record.push(END.into());
        self.append(&record)
    }

    fn failed(&self, rel: &str, error: &str) -> Result<()> {
        self.check_begun()?;
        let mut record = vec![rel.to_string()];
        record.extend(std::iter::repeat_n(String::new(), self.header.len() - 1));
        // A reason is never empty: an empty one would read as a done row.
        record.push(if error.is_empty() { "failed" } else { error }.to_string());
        record.push(END.into());
        self.append(&record)
    }
}

/// Whether a heatmap is faint: values, none of them 0.5 or more (nor NaN).
/// Scanned in blocks of 64 without a branch per value, so the scan
/// vectorises (a value-by-value early exit took 2.2% of a trivial-model
/// saliency run's CPU, where every map was faint).
fn is_faint(map: &[f32]) -> bool {
    !map.is_empty()
        && map
            .chunks(64)
            .all(|block| block.iter().fold(true, |faint, &v| faint & (v < 0.5)))
}

/// Calls `f` with the values of `t` as `T` (float32 values, uint8 bytes)
/// on the CPU, borrowed from the tensor when it is already a contiguous CPU
/// tensor of that kind (the engine's maps and images are), copied
/// otherwise.
fn with_values<T: tch::kind::Element, R>(
    t: &tch::Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let t = t
        .f_to_device(tch::Device::Cpu)?
        .f_to_kind(T::KIND)?
        .f_contiguous()?;
    let n = t.numel();
    if n == 0 {
        return f(&[]);
    }
    // SAFETY: `t` is a contiguous CPU tensor of `n` values of `T`'s kind
    // (made so just above), alive until this function returns, and nothing
    // writes to the results the writers read.
    let values = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, n) };
    f(values)
}

#[cfg(test)]
mod tests {
    use super::{clean, is_faint, Mark};

    fn mark(id: &str, part: &str, done: bool, settings: &str, input: &str) -> Mark {
        Mark {
            id: id.into(),
            command: "saliency".into(),
            part: part.into(),
            shared: false,
            done,
            settings: settings.into(),
            input: input.into(),
            within: String::new(),
        }
    }

    #[test]
    fn the_input_is_clean_once_its_last_runs_cover_it_with_one_setting() {
        let is_clean = |marks: &[Mark]| clean(&marks.iter().collect::<Vec<_>>(), "B", "in");
        let m =
            |id: &str, part: &str, done: bool, settings: &str| mark(id, part, done, settings, "in");
        assert!(is_clean(&[m("1", "", true, "B")]));
        assert!(is_clean(&[
            m("1", "0/2", true, "B"),
            m("2", "1/2", true, "B")
        ]));
        assert!(is_clean(&[
            m("1", "0/4", true, "B"),
            m("2", "2/4", true, "B"),
            m("3", "1/2", true, "B")
        ]));
        // A stopped run of all the input, then shards that cover it.
        assert!(is_clean(&[
            m("1", "", false, "B"),
            m("2", "0/2", true, "B"),
            m("3", "1/2", true, "B")
        ]));
        assert!(!is_clean(&[m("1", "0/2", true, "B")]));
        assert!(!is_clean(&[
            m("1", "0/3", true, "B"),
            m("2", "1/3", true, "B")
        ]));
        // A later run with other settings over a done part, finished or not.
        assert!(!is_clean(&[
            m("1", "0/2", true, "B"),
            m("2", "0/2", true, "A"),
            m("3", "1/2", true, "B")
        ]));
        assert!(!is_clean(&[
            m("1", "0/2", true, "B"),
            m("2", "0/2", false, "C"),
            m("3", "1/2", true, "B")
        ]));
        // A part that does not parse, or another input, touches everything
        // and covers nothing.
        assert!(!is_clean(&[
            m("1", "", true, "B"),
            m("2", "list", true, "B")
        ]));
        assert!(!is_clean(&[
            m("1", "0/2", true, "B"),
            mark("2", "1/2", true, "B", "other")
        ]));
        assert!(is_clean(&[
            mark("1", "", true, "B", "other"),
            m("2", "", true, "B")
        ]));
        assert!(!is_clean(&[]));
        // Another listing of the same input: as another input.
        let listed = |l: &str| format!("in\t{l}");
        let clean_listed =
            |marks: &[Mark]| clean(&marks.iter().collect::<Vec<_>>(), "B", &listed("30"));
        assert!(!clean_listed(&[
            mark("1", "0/2", true, "B", &listed("29")),
            mark("2", "1/2", true, "B", &listed("30"))
        ]));
        assert!(clean_listed(&[
            mark("1", "0/2", true, "B", &listed("29")),
            mark("2", "1/2", true, "B", &listed("30")),
            mark("3", "0/2", true, "B", &listed("30"))
        ]));
        assert_eq!(super::place(&listed("30")), "in");
        assert_eq!(super::place("in"), "in");
    }

    #[test]
    fn a_map_is_faint_without_a_value_of_half_or_more() {
        let mut map = vec![0.49f32; 1000];
        assert!(is_faint(&map));
        assert!(!is_faint(&[]));
        // One value at 0.5, or a NaN, anywhere (in a full block or the
        // last, partial one) makes it readable.
        for at in [0, 63, 64, 999] {
            for v in [0.5, 1.0, f32::NAN] {
                map[at] = v;
                assert!(!is_faint(&map), "{v} at {at}");
                map[at] = 0.49;
            }
        }
    }
}
