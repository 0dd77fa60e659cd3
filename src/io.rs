//! Files: the sorted recursive walk of an image folder, shards, atomic
//! writes and `.npy` output.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use tch::Tensor;

use crate::error::{Error, Result};

/// One file found under the walked folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The path relative to the folder, `/`-joined (lossy for names that are
    /// not UTF-8).
    pub rel: String,
    /// The full path.
    pub path: PathBuf,
    /// Why this entry cannot be read as a file, when it cannot: a symlink
    /// loop, a dangling link, an unreadable directory, a non-UTF-8 name, a
    /// FIFO or device.
    pub problem: Option<String>,
}

/// What a list of entries holds, as the marks of a settings change record
/// it ([`crate::batch::FolderSink::input_listing`]): how many, and a 64-bit
/// FNV-1a of their relative paths (each followed by a 0xff byte, which no
/// UTF-8 text holds), the same on every platform and release.
pub fn listing(entries: &[Entry]) -> String {
    let mut names = Fnv::new();
    for e in entries {
        names.add(e.rel.as_bytes());
        names.add(&[0xff]);
    }
    format!("{} files, names fnv1a-64 {:016x}", entries.len(), names.0)
}

/// 64-bit FNV-1a.
pub(crate) struct Fnv(pub(crate) u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// The FNV-1a of `bytes` alone.
    pub(crate) fn of(bytes: &[u8]) -> u64 {
        let mut h = Fnv::new();
        h.add(bytes);
        h.0
    }
}

/// Most directory levels followed below the root.
const MAX_DEPTH: usize = 256;

/// Every file under `root`, recursively, sorted by [`Entry::rel`] in byte
/// order. Symlinks are followed; a link back to a directory being walked
/// (a loop), a dangling link, an unreadable subdirectory and anything that
/// is not a regular file is returned as an entry with a
/// [`problem`](Entry::problem), so the walk always ends and a caller can
/// report it. Directories whose canonical path is in `exclude` are skipped
/// (for an output folder inside the input folder).
///
/// # Errors
/// [`Error::Io`] when `root` itself cannot be read or is not a directory.
pub fn walk(root: &Path, exclude: &[PathBuf]) -> Result<Vec<Entry>> {
    let meta = fs::metadata(root).map_err(|e| Error::io(root, e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            root,
            std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    // Fail early if the root itself cannot be listed.
    fs::read_dir(root).map_err(|e| Error::io(root, e))?;
    let exclude: HashSet<PathBuf> = exclude
        .iter()
        .filter_map(|p| fs::canonicalize(p).ok())
        .collect();
    let mut out = Vec::new();
    let mut ancestors = Vec::new();
    visit(root, "", &meta, &exclude, &mut ancestors, &mut out);
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

fn dir_id(meta: &fs::Metadata, path: &Path) -> (u64, u64) {
    #[cfg(unix)]
    {
        let _ = path;
        use std::os::unix::fs::MetadataExt;
        (meta.dev(), meta.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        let canon = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let mut h = 0u64;
        for b in canon.to_string_lossy().bytes() {
            h = h.wrapping_mul(31).wrapping_add(u64::from(b));
        }
        (0, h)
    }
}

fn visit(
    dir: &Path,
    prefix: &str,
    meta: &fs::Metadata,
    exclude: &HashSet<PathBuf>,
    ancestors: &mut Vec<(u64, u64)>,
    out: &mut Vec<Entry>,
) {
    let problem = |out: &mut Vec<Entry>, rel: &str, path: &Path, why: String| {
        out.push(Entry {
            rel: rel.to_string(),
            path: path.to_path_buf(),
            problem: Some(why),
        });
    };
    if ancestors.len() >= MAX_DEPTH {
        problem(
            out,
            prefix,
            dir,
            format!("more than {MAX_DEPTH} directory levels"),
        );
        return;
    }
    let id = dir_id(meta, dir);
    if ancestors.contains(&id) {
        problem(
            out,
            prefix,
            dir,
            "symlink loop: links back to a directory above it".into(),
        );
        return;
    }
    let read = match fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) => {
            problem(out, prefix, dir, format!("cannot read directory: {e}"));
            return;
        }
    };
    ancestors.push(id);
    for item in read {
        let item = match item {
            Ok(i) => i,
            Err(e) => {
                problem(out, prefix, dir, format!("cannot read directory: {e}"));
                continue;
            }
        };
        let path = item.path();
        let name = item.file_name();
        let (name, utf8) = match name.to_str() {
            Some(n) => (n.to_string(), true),
            None => (name.to_string_lossy().into_owned(), false),
        };
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        if !utf8 {
            problem(out, &rel, &path, "file name is not valid UTF-8".into());
            continue;
        }
        // Follows symlinks.
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                let why = if item.file_type().map(|t| t.is_symlink()).unwrap_or(false) {
                    format!("broken or looping symlink: {e}")
                } else {
                    e.to_string()
                };
                problem(out, &rel, &path, why);
                continue;
            }
        };
        if meta.is_dir() {
            if let Ok(canon) = fs::canonicalize(&path) {
                if exclude.contains(&canon) {
                    continue;
                }
            }
            visit(&path, &rel, &meta, exclude, ancestors, out);
        } else if meta.is_file() {
            out.push(Entry {
                rel,
                path,
                problem: None,
            });
        } else {
            problem(out, &rel, &path, "not a regular file".into());
        }
    }
    ancestors.pop();
}

/// Entries for a list of files (a single file, or the lines of a list),
/// named relative to `root` (`/`-joined) and sorted as [`walk`] sorts.
/// `root` defaults to the deepest folder holding every file. Files that
/// cannot be read are entries with a [`problem`](Entry::problem); a name
/// listed twice is kept once. Returns the root used and the entries.
///
/// # Errors
/// [`Error::Empty`] for an empty list; [`Error::InvalidValue`] for a path
/// outside `root`; [`Error::Io`] when the current folder cannot be read.
pub fn list(paths: &[PathBuf], root: Option<&Path>) -> Result<(PathBuf, Vec<Entry>)> {
    if paths.is_empty() {
        return Err(Error::Empty {
            what: "list of images",
        });
    }
    let cwd = std::env::current_dir().map_err(|e| Error::io(".", e))?;
    let absolute = |p: &Path| {
        lexical(&if p.is_absolute() {
            p.to_path_buf()
        } else {
            cwd.join(p)
        })
    };
    let files: Vec<PathBuf> = paths.iter().map(|p| absolute(p)).collect();
    let root = match root {
        Some(r) => {
            let root = absolute(r);
            match fs::metadata(&root) {
                Ok(m) if m.is_dir() => root,
                Ok(_) => {
                    return Err(Error::io(
                        r,
                        std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
                    ))
                }
                Err(e) => return Err(Error::io(r, e)),
            }
        }
        None => {
            let mut common = files[0].parent().map(Path::to_path_buf).unwrap_or_default();
            for f in &files[1..] {
                while !f.starts_with(&common) {
                    if !common.pop() {
                        break;
                    }
                }
            }
            common
        }
    };
    let mut out: Vec<Entry> = Vec::with_capacity(files.len());
    for (given, file) in paths.iter().zip(&files) {
        let Ok(rel) = file.strip_prefix(&root) else {
            // Listed paths are read from the current directory, not from
            // the root: say where this one was looked for.
            let read_as = if given.is_absolute() {
                String::new()
            } else {
                format!(
                    ", read as {} (relative to the current directory)",
                    file.display()
                )
            };
            return Err(Error::InvalidValue {
                what: "image path (not under the root folder)",
                value: format!("{}{read_as}; root {}", given.display(), root.display()),
            });
        };
        let parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let rel = parts.join("/");
        let problem = match fs::metadata(file) {
            Ok(m) if m.is_file() => None,
            Ok(_) => Some("not a regular file".to_string()),
            Err(e) => Some(e.to_string()),
        };
        out.push(Entry {
            rel,
            path: file.clone(),
            problem,
        });
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    out.dedup_by(|a, b| a.rel == b.rel);
    Ok((root, out))
}

/// `path` with `.` and `..` resolved without touching the file system.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// A shard of a sorted list: the items whose index is `index` modulo
/// `count`. Written `K/N`, K from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// K: this shard, `0 <= K < N`.
    pub index: usize,
    /// N: the number of shards, at least 1.
    pub count: usize,
}

impl Shard {
    /// Shard `index` of `count`.
    ///
    /// # Errors
    /// [`Error::InvalidValue`] unless `count >= 1` and `index < count`.
    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 || index >= count {
            return Err(Error::InvalidValue {
                what: "shard (K/N needs N >= 1 and 0 <= K < N)",
                value: format!("{index}/{count}"),
            });
        }
        Ok(Shard { index, count })
    }

    /// The whole list (shard 0 of 1).
    pub fn all() -> Self {
        Shard { index: 0, count: 1 }
    }

    /// Whether the item at `position` of the full list belongs to this shard.
    pub fn contains(&self, position: usize) -> bool {
        position % self.count == self.index
    }
}

impl FromStr for Shard {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidValue {
            what: "shard (expected K/N, e.g. 0/4)",
            value: s.to_string(),
        };
        let (k, n) = s.trim().split_once('/').ok_or_else(bad)?;
        let k = k.trim().parse::<usize>().map_err(|_| bad())?;
        let n = n.trim().parse::<usize>().map_err(|_| bad())?;
        Shard::new(k, n)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The marker in temporary file names (see [`temp_path`]).
pub const TEMP_MARK: &str = ".tch-vis-tmp.";

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// This host's name, as temporary names and worker ids carry it.
pub(crate) fn host_name() -> String {
    host()
}

fn host() -> String {
    // Read once: temp_path runs for every output file.
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(read_host).clone()
}

fn read_host() -> String {
    let name = fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "host".into());
    name.trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A temporary name beside `path`, unique to this process and call:
/// `.NAME.tch-vis-tmp.HOST.PID.N`.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = format!(".{name}{TEMP_MARK}{}.{}.{n}", host(), std::process::id());
    path.with_file_name(tmp)
}

/// Runs `create`, which creates the file `tmp`; when that fails because
/// a folder above it is missing, creates the folders and runs it once
/// more. Trying first costs nothing where the folder exists (nearly every
/// file of a run), against a `stat` per file for looking first (and
/// `create_dir_all` starts with a `mkdir`, which fails on an existing
/// folder only after taking the lock of the folder above).
fn with_parent<T>(
    tmp: &Path,
    mut create: impl FnMut() -> std::io::Result<T>,
) -> std::io::Result<T> {
    match create() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match tmp.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => {
                fs::create_dir_all(parent)?;
                create()
            }
            _ => Err(e),
        },
        other => other,
    }
}

/// How a written temporary file takes its final name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Replace {
    /// Renamed over an existing file: a reader always finds one, the old
    /// or the new (files that other processes read while this one writes:
    /// `scores.csv`, reports).
    Atomic,
    /// For a file that only this call writes (a run's per-image outputs):
    /// an existing file is renamed aside to a temporary name, the new one
    /// renamed into place, and the old one removed later by a background
    /// thread ([`wait_removals`] waits for it). The file is absent for an
    /// instant, never partial; a reader that has the old file open keeps
    /// its bytes; a failed rename puts the old file back.
    /// - Renaming over an existing file makes ext4 (`auto_da_alloc`, on by
    ///   default) write the new file's data out at the rename, in the
    ///   writer's thread, to protect the old contents: an `--overwrite`
    ///   rerun's writers were 6× slower than a fresh run's on an H100
    ///   host's disk (6,000-image runs, 55–78 s of writer time against
    ///   9–11 s), enough to halve the run.
    /// - Removing it in the writer's thread frees its blocks there, and on
    ///   a file system mounted with `discard` (cloud disks often are) each
    ///   freed extent is discarded synchronously in the removing thread:
    ///   an `--overwrite` rerun of 5,000 images on such an ext4 ran at
    ///   1,379–1,483 images/s against a fresh run's 1,798.
    ///
    /// On Linux the new file is written unnamed and linked into place
    /// ([`write_linked`]): nothing there (a fresh run) costs one change to
    /// the folder. Elsewhere, it costs one `lstat`, which does not take the
    /// folder's lock. A folder there is left in place, for the link or
    /// rename to fail on.
    SetAside,
}

/// Gives the temporary file `tmp` its final name `path`, an existing file
/// replaced as `replace` says; a failure leaves no temporary.
fn commit(tmp: &Path, path: &Path, replace: Replace) -> Result<()> {
    let aside = match replace {
        Replace::Atomic => None,
        Replace::SetAside => set_aside(path),
    };
    if let Err(e) = fs::rename(tmp, path) {
        let _ = fs::remove_file(tmp);
        if let Some(old) = &aside {
            let _ = fs::rename(old, path);
        }
        return Err(Error::io(path, e));
    }
    if let Some(old) = aside {
        remove_later(old);
    }
    Ok(())
}

/// For [`Replace::SetAside`]: renames what is at `path` (anything but a
/// folder) to a temporary name of its own, and returns that name.
fn set_aside(path: &Path) -> Option<PathBuf> {
    if fs::symlink_metadata(path).ok()?.is_dir() {
        return None;
    }
    let aside = temp_path(path);
    fs::rename(path, &aside).ok()?;
    Some(aside)
}

/// Work for the thread that removes files set aside.
enum Removal {
    File(PathBuf),
    /// Answered once every file sent before it is removed.
    Flush(std::sync::mpsc::Sender<()>),
}

/// The channel to the removing thread, started on first use (`None` where
/// it could not start: files are then removed at once).
fn remover() -> Option<&'static std::sync::mpsc::Sender<Removal>> {
    static REMOVER: std::sync::OnceLock<Option<std::sync::mpsc::Sender<Removal>>> =
        std::sync::OnceLock::new();
    REMOVER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Removal>();
            std::thread::Builder::new()
                .name("tch-vis-remove".into())
                .spawn(move || {
                    for job in rx {
                        match job {
                            Removal::File(p) => {
                                let _ = fs::remove_file(p);
                            }
                            Removal::Flush(done) => {
                                let _ = done.send(());
                            }
                        }
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

/// Removes `path` on the removing thread (at once where it cannot run).
/// Files still queued when the process dies stay as temporaries, which
/// [`remove_stale_temps`] removes later.
fn remove_later(path: PathBuf) {
    let path = match remover() {
        Some(tx) => match tx.send(Removal::File(path)) {
            Ok(()) => return,
            Err(std::sync::mpsc::SendError(Removal::File(p))) => p,
            Err(_) => return,
        },
        None => path,
    };
    let _ = fs::remove_file(path);
}

/// Waits until the files set aside so far ([`Replace::SetAside`]) are
/// removed: a run calls it before it reports, so that a finished run
/// leaves no temporaries.
pub(crate) fn wait_removals() {
    if let Some(tx) = remover() {
        let (done, wait) = std::sync::mpsc::channel();
        if tx.send(Removal::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

/// Writes `bytes` to `path` so that `path` appears whole or not at all:
/// written to a temporary name in the same directory, then renamed.
/// Parent directories are created.
///
/// # Errors
/// [`Error::Io`] when a directory cannot be created or the file written.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_bytes(path, bytes, Replace::Atomic)
}

/// [`write_atomic`], with an existing file replaced as `replace` says.
pub(crate) fn write_bytes(path: &Path, bytes: &[u8], replace: Replace) -> Result<()> {
    write_parts(path, &[bytes], replace)
}

/// Writes `parts` in turn to `path` as [`write_bytes`] does. Per-image
/// outputs ([`Replace::SetAside`]) are written unnamed and linked into
/// place ([`write_linked`]) where the system allows it.
fn write_parts(path: &Path, parts: &[&[u8]], replace: Replace) -> Result<()> {
    if replace == Replace::SetAside {
        if let Some(written) = write_linked(path, parts) {
            return written;
        }
    }
    write_via_temp(path, replace, |tmp| create_with(tmp, parts))
}

/// [`Replace::SetAside`]'s write without a temporary name: the file is
/// made unnamed in its folder (`O_TMPFILE`), written, then linked to
/// `path` (`linkat` through `/proc/self/fd`); where a file is at `path`
/// already, it is set aside first as [`Replace::SetAside`] says. One change
/// to the folder per file instead of two (a create and a rename), each of
/// which takes the folder's lock: 16 writer threads waited on that lock on
/// a 16-core GPU host. A run killed mid-write leaves nothing behind.
///
/// `None` where the system cannot: nothing was written, and the caller
/// writes through a temporary name. Each refusal counts where it was made:
/// no `/proc` turns it off for the process; a file system without
/// `O_TMPFILE` (NFS, older overlayfs) refuses each file's open, one failed
/// call each; a file system that refused a link is remembered by device,
/// and its later files skip the link. So a process that writes to two file
/// systems keeps linked writes on the one that allows them.
/// `TCH_VIS_LINKED_WRITES=0` in the environment turns it off (for
/// comparisons).
#[cfg(target_os = "linux")]
fn write_linked(path: &Path, parts: &[&[u8]]) -> Option<Result<()>> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = OFF.get_or_init(|| {
        std::env::var_os("TCH_VIS_LINKED_WRITES").is_some_and(|v| v == "0")
            || !Path::new("/proc/self/fd").is_dir()
    });
    if *off {
        return None;
    }
    // Errors that say the system cannot, rather than that this file
    // cannot be written.
    let unsupported = |e: &std::io::Error| {
        matches!(
            e.raw_os_error(),
            Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL | libc::ENOSYS | libc::EXDEV)
        )
    };
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dst = CString::new(path.as_os_str().as_bytes()).ok()?;
    let open = || {
        fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o666)
            .open(folder)
    };
    let mut file = match refused_for_tests(0, with_parent(path, open)) {
        Ok(f) => f,
        Err(e) if unsupported(&e) => return None,
        Err(e) => return Some(Err(Error::io(path, e))),
    };
    if links_refused(&file) {
        return None;
    }
    if let Err(e) = parts.iter().try_for_each(|part| file.write_all(part)) {
        return Some(Err(Error::io(path, e)));
    }
    let src = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    let mut aside = None;
    loop {
        // SAFETY: both paths are NUL-terminated strings that live across
        // the call.
        let linked = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                src.as_ptr(),
                libc::AT_FDCWD,
                dst.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        let linked = match linked {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        };
        let mut e = match refused_for_tests(1, linked) {
            Ok(()) => {
                #[cfg(test)]
                tests::LINKED.with(|n| n.set(n.get() + 1));
                if let Some(old) = aside {
                    remove_later(old);
                }
                return Some(Ok(()));
            }
            Err(e) => e,
        };
        if e.raw_os_error() == Some(libc::EEXIST) && aside.is_none() {
            if let Some(old) = set_aside(path) {
                aside = Some(old);
                continue;
            }
            if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
                // What a rename onto the folder would say.
                e = std::io::Error::from_raw_os_error(libc::EISDIR);
            }
        }
        if let Some(old) = &aside {
            let _ = fs::rename(old, path);
        }
        if unsupported(&e) || e.raw_os_error() == Some(libc::EPERM) {
            refuse_links(&file);
            return None;
        }
        return Some(Err(Error::io(path, e)));
    }
}

/// The devices whose file systems refused [`write_linked`]'s link; kept
/// empty where every link works, so that the usual check is one atomic
/// load.
#[cfg(target_os = "linux")]
static LINKS_REFUSED: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());
#[cfg(target_os = "linux")]
static ANY_LINK_REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The device of the file system `file` is on.
#[cfg(target_os = "linux")]
fn device(file: &fs::File) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    file.metadata().map(|m| m.dev()).ok()
}

/// Whether the file system `file` is on refused a link: one atomic load
/// while none has.
#[cfg(target_os = "linux")]
fn links_refused(file: &fs::File) -> bool {
    ANY_LINK_REFUSED.load(Ordering::Relaxed)
        && device(file).is_some_and(|dev| {
            LINKS_REFUSED
                .lock()
                .is_ok_and(|devices| devices.contains(&dev))
        })
}

/// Remembers that the file system `file` is on refused a link.
#[cfg(target_os = "linux")]
fn refuse_links(file: &fs::File) {
    let Some(dev) = device(file) else { return };
    if let Ok(mut devices) = LINKS_REFUSED.lock() {
        if !devices.contains(&dev) {
            devices.push(dev);
        }
        ANY_LINK_REFUSED.store(true, Ordering::Relaxed);
    }
}

/// Tests: step `step` of [`write_linked`] (0 the unnamed open, 1 the
/// link) fails with the error [`tests::REFUSE`] holds for it, as if the
/// system had refused; elsewhere `result` as it is.
#[cfg(all(target_os = "linux", test))]
fn refused_for_tests<T>(step: usize, result: std::io::Result<T>) -> std::io::Result<T> {
    let errno = tests::REFUSE.with(|r| {
        let mut steps = r.get();
        let errno = std::mem::take(&mut steps[step]);
        r.set(steps);
        errno
    });
    match errno {
        0 => result,
        errno => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

#[cfg(all(target_os = "linux", not(test)))]
#[inline(always)]
fn refused_for_tests<T>(_: usize, result: std::io::Result<T>) -> std::io::Result<T> {
    result
}

#[cfg(not(target_os = "linux"))]
fn write_linked(_: &Path, _: &[&[u8]]) -> Option<Result<()>> {
    None
}

/// Has `write` make the temporary file of `path` ([`temp_path`]), then
/// gives it its name as `replace` says; a failed write leaves no file and
/// the old one as it was.
fn write_via_temp(
    path: &Path,
    replace: Replace,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temp_path(path);
    if let Err(e) = write(&tmp) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    commit(&tmp, path, replace)
}

/// Creates `tmp` (and its folders, when missing) holding `parts` in turn.
fn create_with(tmp: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut f = with_parent(tmp, || fs::File::create(tmp))?;
    parts.iter().try_for_each(|part| f.write_all(part))
}

/// Writes `tensor` as a `.npy` file (dtype and shape kept, the bytes
/// tch's `Tensor::write_npy` writes), atomically as [`write_atomic`].
///
/// # Errors
/// [`Error::Io`] when a directory cannot be created or the file written.
pub fn write_npy_atomic(path: &Path, tensor: &Tensor) -> Result<()> {
    write_npy(path, tensor, Replace::Atomic)
}

/// [`write_npy_atomic`], with an existing file replaced as `replace` says.
pub(crate) fn write_npy(path: &Path, tensor: &Tensor, replace: Replace) -> Result<()> {
    let t = tensor
        .f_contiguous()
        .map_err(|e| Error::io(path, std::io::Error::other(e)))?;
    // A dtype tch does not know (uint16, uint32, ...): tch's writer would
    // panic on it.
    t.f_kind()
        .map_err(|e| Error::io(path, std::io::Error::other(e)))?;
    match npy_header(&t) {
        // The values straight from the tensor's memory.
        Some(header) => write_parts(path, &[&header, tensor_bytes(&t)], replace),
        None => write_via_temp(path, replace, |tmp| {
            with_parent(tmp, || {
                t.write_npy(tmp).map_err(|e| match e {
                    tch::TchError::Io(e) => e,
                    e => std::io::Error::other(e.to_string()),
                })
            })
        }),
    }
}

/// The `.npy` header of a contiguous CPU tensor, byte for byte the one
/// tch's `Tensor::write_npy` writes (format 1.0: magic, version, the
/// header's length in two little-endian bytes, then the dictionary padded
/// with spaces and a newline to a multiple of 16 bytes), so that the values
/// can follow straight from the tensor's memory: tch's writer zeroes a
/// buffer of the values' size and copies them into it first (3% of a
/// 224 × 224 saliency run's CPU time on 2 cores). `None` for another
/// tensor, or a kind tch writes otherwise or not at all.
fn npy_header(t: &Tensor) -> Option<Vec<u8>> {
    use tch::Kind;
    if t.device() != tch::Device::Cpu || !t.is_contiguous() {
        return None;
    }
    let descr = match t.f_kind().ok()? {
        Kind::Half => "f2",
        Kind::Float => "f4",
        Kind::Double => "f8",
        Kind::Int => "i4",
        Kind::Int64 => "i8",
        Kind::Int16 => "i2",
        Kind::Int8 => "i1",
        Kind::Uint8 => "u1",
        _ => return None,
    };
    let shape: String = t.size().iter().map(|d| format!("{d},")).collect();
    let mut dict = format!("{{'descr': '<{descr}', 'fortran_order': False, 'shape': ({shape}), }}");
    const MAGIC: &[u8] = b"\x93NUMPY";
    let pad = 16 - (MAGIC.len() + 5 + dict.len()) % 16;
    dict.extend(std::iter::repeat_n(' ', pad % 16));
    dict.push('\n');
    let len = u16::try_from(dict.len()).ok()?;
    let mut header = Vec::with_capacity(MAGIC.len() + 4 + dict.len());
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&[1, 0]);
    header.extend_from_slice(&len.to_le_bytes());
    header.extend_from_slice(dict.as_bytes());
    Some(header)
}

/// The values of a contiguous CPU tensor ([`npy_header`] checked it), as
/// bytes borrowed from its memory.
fn tensor_bytes(t: &Tensor) -> &[u8] {
    let n = t.numel() * t.f_kind().map_or(0, |k| k.elt_size_in_bytes());
    if n == 0 {
        return &[];
    }
    // SAFETY: `t` is a contiguous CPU tensor whose `n` bytes start at
    // `data_ptr` (its storage offset included); the slice borrows `t`, and
    // nothing writes the results the writers read.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, n) }
}

/// Removes temporary files (see [`temp_path`]) left under `root` by
/// processes of this host that no longer run (after a `kill -9`), so a
/// resumed run leaves the same files as an uninterrupted one. Returns how
/// many were removed. Files of live processes and of other hosts are kept.
pub fn remove_stale_temps(root: &Path) -> usize {
    let me = host();
    let mut removed = 0;
    let mut stack = vec![root.to_path_buf()];
    let mut seen = HashSet::new();
    while let Some(dir) = stack.pop() {
        let Ok(canon) = fs::canonicalize(&dir) else {
            continue;
        };
        if !seen.insert(canon) {
            continue;
        }
        let Ok(read) = fs::read_dir(&dir) else {
            continue;
        };
        for item in read.flatten() {
            let path = item.path();
            let Ok(ft) = item.file_type() else { continue };
            if ft.is_dir() {
                stack.push(path);
                continue;
            }
            let name = item.file_name().to_string_lossy().into_owned();
            let Some((_, tail)) = name.split_once(TEMP_MARK) else {
                continue;
            };
            let mut parts = tail.rsplitn(3, '.');
            let (_n, pid, h) = (parts.next(), parts.next(), parts.next());
            let (Some(pid), Some(h)) = (pid, h) else {
                continue;
            };
            if h != me {
                continue;
            }
            let alive = pid.parse::<u32>().is_ok_and(|p| {
                p == std::process::id() || Path::new(&format!("/proc/{p}")).exists()
            });
            if !alive && fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    /// A listing is its count and FNV-1a of the names, each ended by 0xff
    /// (the value pinned: marks of earlier runs compare against it).
    #[test]
    fn a_listing_is_the_count_and_fnv1a_of_the_names() {
        let entry = |rel: &str| Entry {
            rel: rel.into(),
            path: PathBuf::from(rel),
            problem: None,
        };
        assert_eq!(
            listing(&[entry("a.png"), entry("b/c.jpg")]),
            "2 files, names fnv1a-64 a656236f1bec19e4"
        );
        assert_eq!(listing(&[]), "0 files, names fnv1a-64 cbf29ce484222325");
    }

    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// The error numbers [`write_linked`]'s next unnamed open (`[0]`)
        /// and next link (`[1]`) on this thread fail with, as if the
        /// system had refused them; 0 for none.
        pub(super) static REFUSE: Cell<[i32; 2]> = const { Cell::new([0, 0]) };
        /// Files [`write_linked`] linked into place on this thread.
        pub(super) static LINKED: Cell<usize> = const { Cell::new(0) };
    }

    /// The `.npy` files written from the tensor's memory are tch's, byte
    /// for byte, for every kind tch writes and shapes from a scalar to
    /// 7-D (an empty one, a non-contiguous view, a header with no padding),
    /// and read back as the tensor; a kind tch does not write is an error,
    /// as from tch.
    #[test]
    fn npy_files_are_tchs_byte_for_byte() {
        use tch::{Device, Kind};
        let dir = tempfile::tempdir().unwrap();
        let base = Tensor::arange(2 * 3 * 4 * 5, (Kind::Double, Device::Cpu)) * 0.37 - 11.0;
        // 7 × 1: the dictionary needs no padding but the newline.
        let shapes: [&[i64]; 7] = [
            &[],
            &[7],
            &[0, 3],
            &[224, 224],
            &[3, 4, 10],
            &[2, 3, 4, 5],
            &[1, 1, 1, 1, 1, 1, 1],
        ];
        let kinds = [
            Kind::Half,
            Kind::Float,
            Kind::Double,
            Kind::Int,
            Kind::Int64,
            Kind::Int16,
            Kind::Int8,
            Kind::Uint8,
        ];
        for kind in kinds {
            for shape in shapes {
                let n: i64 = shape.iter().product();
                let t = if n <= 120 {
                    base.narrow(0, 0, n).reshape(shape).to_kind(kind)
                } else {
                    Tensor::rand(shape, (Kind::Float, Device::Cpu)).to_kind(kind)
                };
                for (name, t) in [("c", t.shallow_clone()), ("t", t.transpose(0, -1))] {
                    let ours = dir.path().join(format!("{kind:?}-{shape:?}-{name}.npy"));
                    let theirs = dir.path().join("tch.npy");
                    write_npy(&ours, &t, Replace::Atomic).unwrap();
                    t.contiguous().write_npy(&theirs).unwrap();
                    let (a, b) = (fs::read(&ours).unwrap(), fs::read(&theirs).unwrap());
                    assert_eq!(a, b, "{kind:?} {shape:?} {name}");
                    assert_eq!((a.len() - t.numel() * kind.elt_size_in_bytes()) % 16, 0);
                    let back = Tensor::read_npy(&ours).unwrap();
                    assert_eq!(back.size(), t.size());
                    assert!(back.equal(&t.contiguous()), "{kind:?} {shape:?} {name}");
                }
            }
        }
        let b = Tensor::ones([3], (Kind::Bool, Device::Cpu));
        assert!(matches!(
            write_npy(&dir.path().join("b.npy"), &b, Replace::Atomic),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn shards_parse_and_partition() {
        let s: Shard = "1/3".parse().unwrap();
        assert_eq!(s, Shard { index: 1, count: 3 });
        let picked: Vec<usize> = (0..8).filter(|&i| s.contains(i)).collect();
        assert_eq!(picked, vec![1, 4, 7]);
        for bad in ["3/3", "0/0", "1", "a/2", "-1/2", "1/2/3"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        let mut all: Vec<usize> = (0..4)
            .flat_map(|k| (0..10).filter(move |&i| Shard { index: k, count: 4 }.contains(i)))
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn atomic_writes_leave_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/c.txt");
        write_atomic(&p, b"hello").unwrap();
        write_atomic(&p, b"world").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"world");
        let names: Vec<_> = fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
        let t = Tensor::from_slice(&[1f32, 2., 3., 4.]).view([2, 2]);
        let q = dir.path().join("x.npy");
        write_npy_atomic(&q, &t).unwrap();
        assert!(Tensor::read_npy(&q).unwrap().equal(&t));
        // Missing folders are made for npy files too; a folder that is a
        // file is an I/O error naming the output, and leaves nothing.
        let q = dir.path().join("d/e/x.npy");
        write_npy_atomic(&q, &t).unwrap();
        assert!(Tensor::read_npy(&q).unwrap().equal(&t));
        fs::write(dir.path().join("f"), b"").unwrap();
        for bad in [
            write_atomic(&dir.path().join("f/g/c.txt"), b"x"),
            write_npy_atomic(&dir.path().join("f/x.npy"), &t),
        ] {
            assert!(matches!(bad, Err(Error::Io { .. })), "{bad:?}");
        }
        // a/, x.npy, d/ and f.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 4);
        // Per-image outputs set an existing file aside and remove it later:
        // the new contents, no temporaries once the removals are done, the
        // old bytes for a reader that has the old file open; a folder in the
        // way is an I/O error and is kept; a link is replaced, its target
        // untouched; a hard link elsewhere (a `cp -l` copy of the folder)
        // keeps the old contents.
        let o = dir.path().join("o/img.png");
        let n = dir.path().join("o/img.npy");
        for round in [&b"older and longer"[..], b"new"] {
            write_bytes(&o, round, Replace::SetAside).unwrap();
        }
        write_npy(&n, &(&t + 1), Replace::SetAside).unwrap();
        let mut reader = fs::File::open(&n).unwrap();
        write_npy(&n, &t, Replace::SetAside).unwrap();
        wait_removals();
        assert_eq!(fs::read(&o).unwrap(), b"new");
        assert!(Tensor::read_npy(&n).unwrap().equal(&t));
        let mut old = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut old).unwrap();
        let mut expected = Vec::new();
        (&t + 1).write_npy(dir.path().join("old.npy")).unwrap();
        std::io::Read::read_to_end(
            &mut fs::File::open(dir.path().join("old.npy")).unwrap(),
            &mut expected,
        )
        .unwrap();
        assert_eq!(old, expected, "the open reader's bytes changed");
        assert_eq!(fs::read_dir(o.parent().unwrap()).unwrap().count(), 2);
        fs::create_dir(dir.path().join("o/dir.png")).unwrap();
        let bad = write_bytes(&dir.path().join("o/dir.png"), b"x", Replace::SetAside);
        assert!(matches!(bad, Err(Error::Io { .. })), "{bad:?}");
        assert!(
            format!("{bad:?}").contains("directory"),
            "a folder in the way says so: {bad:?}"
        );
        assert!(dir.path().join("o/dir.png").is_dir());
        assert_eq!(fs::read_dir(o.parent().unwrap()).unwrap().count(), 3);
        let target = dir.path().join("target.png");
        fs::write(&target, b"keep").unwrap();
        let link = dir.path().join("o/link.png");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_bytes(&link, b"map", Replace::SetAside).unwrap();
        let copy = dir.path().join("copy.png");
        fs::hard_link(&o, &copy).unwrap();
        write_bytes(&o, b"newer", Replace::SetAside).unwrap();
        wait_removals();
        assert!(fs::symlink_metadata(&link).unwrap().is_file());
        assert_eq!(fs::read(&link).unwrap(), b"map");
        assert_eq!(fs::read(&target).unwrap(), b"keep");
        assert_eq!(fs::read(&o).unwrap(), b"newer");
        assert_eq!(fs::read(&copy).unwrap(), b"new");
        assert_eq!(fs::read_dir(o.parent().unwrap()).unwrap().count(), 4);
        // Written unnamed and linked into place (Linux), or through a
        // temporary name: the permissions a created file gets either way.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode();
        write_atomic(&dir.path().join("o/atomic.png"), b"a").unwrap();
        write_bytes(&dir.path().join("o/fresh.png"), b"f", Replace::SetAside).unwrap();
        assert_eq!(
            mode(&dir.path().join("o/fresh.png")),
            mode(&dir.path().join("o/atomic.png"))
        );
    }

    #[test]
    fn lists_are_named_from_their_common_folder() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/x.png"), b"").unwrap();
        fs::write(root.join("a/y.png"), b"").unwrap();
        let paths = vec![
            root.join("a/y.png"),
            root.join("a/b/../b/x.png"),
            root.join("a/gone.png"),
            root.join("a/y.png"),
        ];
        let (r, entries) = list(&paths, None).unwrap();
        assert_eq!(r, root.join("a"));
        let rels: Vec<_> = entries.iter().map(|e| e.rel.as_str()).collect();
        assert_eq!(rels, ["b/x.png", "gone.png", "y.png"]);
        assert!(entries[1].problem.is_some() && entries[0].problem.is_none());
        let (_, one) = list(&[root.join("a/b/x.png")], None).unwrap();
        assert_eq!(one[0].rel, "x.png");
        let (_, rooted) = list(&paths[..1], Some(root)).unwrap();
        assert_eq!(rooted[0].rel, "a/y.png");
        assert!(matches!(
            list(&paths[..1], Some(&root.join("a/b"))),
            Err(Error::InvalidValue { .. })
        ));
        assert!(matches!(list(&[], None), Err(Error::Empty { .. })));
    }

    #[cfg(unix)]
    #[test]
    fn walk_is_sorted_and_survives_loops() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("b/c")).unwrap();
        fs::write(root.join("b/c/z.png"), b"").unwrap();
        fs::write(root.join("a.png"), b"").unwrap();
        fs::write(root.join("B.png"), b"").unwrap();
        std::os::unix::fs::symlink(root.join("b"), root.join("b/c/up")).unwrap();
        std::os::unix::fs::symlink("self", root.join("self")).unwrap();
        let entries = walk(root, &[]).unwrap();
        let rels: Vec<_> = entries.iter().map(|e| e.rel.as_str()).collect();
        assert_eq!(rels, vec!["B.png", "a.png", "b/c/up", "b/c/z.png", "self"]);
        assert!(entries[2].problem.is_some() && entries[4].problem.is_some());
        assert!(entries[3].problem.is_none());
        assert!(walk(&root.join("a.png"), &[]).is_err());
        assert!(walk(&root.join("nope"), &[]).is_err());
        let excluded = walk(root, &[root.join("b")]).unwrap();
        assert_eq!(excluded.len(), 3);
    }

    /// A refusal of linked writes counts where it was made: a file system
    /// that refuses the unnamed open does so for that file only, and one
    /// that refuses the link is remembered by device, while another file
    /// system in the same process still links. Every file lands whole,
    /// with no temporaries.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_refused_linked_write_falls_back_where_it_was_refused() {
        let linked = || LINKED.with(Cell::get);
        let names = |d: &Path| {
            let mut n: Vec<_> = fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            n.sort();
            n
        };
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name);
        write_bytes(&at("probe.npy"), b"p", Replace::SetAside).unwrap();
        if linked() == 0 {
            eprintln!("linked writes are off or refused here: nothing to check");
            return;
        }
        // The open refused (as by NFS): this file goes through a temporary
        // name, the next one links again.
        let before = linked();
        REFUSE.with(|r| r.set([libc::EOPNOTSUPP, 0]));
        write_bytes(&at("a.npy"), b"a", Replace::SetAside).unwrap();
        assert_eq!(linked(), before);
        write_bytes(&at("b.npy"), b"b", Replace::SetAside).unwrap();
        assert_eq!(linked(), before + 1);
        assert_eq!(fs::read(at("a.npy")).unwrap(), b"a");
        assert_eq!(names(dir.path()), ["a.npy", "b.npy", "probe.npy"]);
        // The link refused on another file system (its own device): its
        // later files skip the link; this folder's still link.
        let open = |p: &Path| fs::File::open(p).unwrap();
        let Ok(other) = tempfile::tempdir_in("/dev/shm") else {
            return;
        };
        if device(&open(other.path())) == device(&open(dir.path())) {
            return;
        }
        let there = |name: &str| other.path().join(name);
        fs::write(there("c.npy"), b"old").unwrap();
        REFUSE.with(|r| r.set([0, libc::EPERM]));
        write_bytes(&there("c.npy"), b"c", Replace::SetAside).unwrap();
        write_bytes(&there("d.npy"), b"d", Replace::SetAside).unwrap();
        assert_eq!(linked(), before + 1);
        write_bytes(&at("e.npy"), b"e", Replace::SetAside).unwrap();
        assert_eq!(linked(), before + 2);
        wait_removals();
        assert_eq!(fs::read(there("c.npy")).unwrap(), b"c");
        assert_eq!(fs::read(there("d.npy")).unwrap(), b"d");
        assert_eq!(names(other.path()), ["c.npy", "d.npy"]);
        assert!(links_refused(&open(other.path())));
        assert!(!links_refused(&open(dir.path())));
    }
}
