//! `scores.csv` and the per-worker row journals it is merged from, through
//! the `csv` crate.
//!
//! A journal has the columns of `scores.csv` plus two: `error` (empty for a
//! done image, the reason for a failed one) and `end`, always `.`. A worker
//! appends to its own journal only, so no two processes ever write one file.
//! A line cut short by a crash lacks the `end` field (or has a shorter
//! record) and is ignored, and its image is recomputed by the next run.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use crate::error::{Error, Result};

/// The end marker of a complete journal record.
pub(crate) const END: &str = ".";

/// Rows by relative path (sorted in byte order), each with the fields after
/// `path`; failures by relative path with the reason.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct State {
    pub(crate) rows: BTreeMap<String, Vec<String>>,
    pub(crate) failed: BTreeMap<String, String>,
}

/// The header of `scores.csv`: `path`, `score_K` for every output, then
/// `class_K,label_K` for every output whose score takes a class.
pub(crate) fn header(outputs: usize, class_outputs: &[bool], columns: &[String]) -> Vec<String> {
    let mut h = vec!["path".to_string()];
    h.extend((0..outputs).map(|k| format!("score_{k}")));
    for (k, has) in class_outputs.iter().enumerate() {
        if *has {
            h.push(format!("class_{k}"));
            h.push(format!("label_{k}"));
        }
    }
    h.extend(columns.iter().cloned());
    h
}

/// The journal header: the `scores.csv` header plus `error` and `end`.
pub(crate) fn journal_header(header: &[String]) -> Vec<String> {
    let mut h = header.to_vec();
    h.push("error".into());
    h.push("end".into());
    h
}

/// The header of an existing `scores.csv`, if there is one.
pub(crate) fn read_header(path: &Path) -> Result<Option<Vec<String>>> {
    let mut reader = match csv::ReaderBuilder::new().flexible(true).from_path(path) {
        Ok(r) => r,
        Err(e) => {
            if let csv::ErrorKind::Io(io) = e.kind() {
                if io.kind() == std::io::ErrorKind::NotFound {
                    return Ok(None);
                }
            }
            return Err(Error::io(path, std::io::Error::other(e.to_string())));
        }
    };
    match reader.headers() {
        Ok(h) => Ok(Some(h.iter().map(str::to_string).collect())),
        Err(e) => Err(Error::io(path, std::io::Error::other(e.to_string()))),
    }
}

/// Reads the rows of a `scores.csv` whose header is `header`; rows with
/// another number of fields are dropped (their images are recomputed).
/// Returns `None` when the file is missing or has another header.
pub(crate) fn read_table(path: &Path, header: &[String]) -> Result<Option<State>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(bytes.as_slice());
    match reader.headers() {
        Ok(h) if h.iter().eq(header.iter().map(String::as_str)) => {}
        _ => return Ok(None),
    }
    let mut state = State::default();
    for record in reader.records() {
        let Ok(r) = record else { break };
        if r.len() != header.len() || r.get(0).is_none_or(str::is_empty) {
            continue;
        }
        let mut fields = r.iter().map(str::to_string);
        let path = fields.next().unwrap_or_default();
        state.rows.insert(path, fields.collect());
    }
    Ok(Some(state))
}

/// Replays the complete records of a journal onto `state` (adding the
/// paths it touched to `touched`), if its header is `header`'s journal
/// header. A journal of other columns is left out, and its columns
/// returned (without the journal's own `error` and `end`); an empty or
/// unreadable one is left out as holding no rows.
pub(crate) fn replay_journal(
    bytes: &[u8],
    header: &[String],
    state: &mut State,
    touched: &mut HashSet<String>,
) -> Option<Vec<String>> {
    let want = journal_header(header);
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(bytes);
    match reader.headers() {
        Ok(h) if h.iter().eq(want.iter().map(String::as_str)) => {}
        Ok(h) if h.len() > 2 && h.iter().rev().take(2).eq(["end", "error"]) => {
            return Some(h.iter().take(h.len() - 2).map(str::to_string).collect());
        }
        _ => return None,
    }
    for record in reader.records() {
        let Ok(r) = record else { break };
        if r.len() != want.len() || r.get(want.len() - 1) != Some(END) {
            continue;
        }
        let Some(path) = r.get(0).filter(|p| !p.is_empty()) else {
            continue;
        };
        let error = r.get(want.len() - 2).unwrap_or_default();
        touched.insert(path.to_string());
        if error.is_empty() {
            let values = r
                .iter()
                .skip(1)
                .take(header.len() - 1)
                .map(str::to_string)
                .collect();
            state.failed.remove(path);
            state.rows.insert(path.to_string(), values);
        } else {
            state.rows.remove(path);
            state.failed.insert(path.to_string(), error.to_string());
        }
    }
    None
}

/// The bytes of `scores.csv` for `rows`.
pub(crate) fn render(header: &[String], rows: &BTreeMap<String, Vec<String>>) -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::with_capacity(64 * (rows.len() + 1)));
    let csv_err = |e: csv::Error| Error::Internal {
        what: format!("cannot render scores.csv: {e}"),
    };
    w.write_record(header).map_err(csv_err)?;
    for (path, values) in rows {
        w.write_field(path).map_err(csv_err)?;
        w.write_record(values).map_err(csv_err)?;
    }
    w.into_inner().map_err(|e| Error::Internal {
        what: format!("cannot render scores.csv: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h() -> Vec<String> {
        header(2, &[true, false], &[])
    }

    #[test]
    fn header_has_classes_after_scores() {
        assert_eq!(
            h(),
            ["path", "score_0", "score_1", "class_0", "label_0"].map(String::from)
        );
    }

    #[test]
    fn journals_replay_in_order_and_skip_torn_lines() {
        let mut j = csv::Writer::from_writer(Vec::new());
        j.write_record(journal_header(&h())).unwrap();
        j.write_record(["a,\"odd\".png", "0.5", "1", "3", "three", "", END])
            .unwrap();
        j.write_record(["b.png", "", "", "", "", "cannot decode", END])
            .unwrap();
        j.write_record(["c.png", "0.1", "2", "1", "one", "", END])
            .unwrap();
        let mut bytes = j.into_inner().unwrap();
        // A torn last line: the end marker never made it.
        bytes.extend_from_slice(b"d.png,0.2,3,1,one,,");
        let mut state = State::default();
        state.rows.insert("b.png".into(), vec!["9".into(); 4]);
        let mut touched = HashSet::new();
        replay_journal(&bytes, &h(), &mut state, &mut touched);
        assert_eq!(state.rows.len(), 2);
        assert_eq!(state.rows["a,\"odd\".png"], ["0.5", "1", "3", "three"]);
        assert_eq!(state.failed["b.png"], "cannot decode");
        assert!(!touched.contains("d.png"));
        // Another header: ignored.
        let mut other = State::default();
        replay_journal(&bytes, &header(1, &[false], &[]), &mut other, &mut touched);
        assert_eq!(other, State::default());
        let text = String::from_utf8(render(&h(), &state.rows).unwrap()).unwrap();
        assert_eq!(
            text,
            "path,score_0,score_1,class_0,label_0\n\"a,\"\"odd\"\".png\",0.5,1,3,three\nc.png,0.1,2,1,one\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("scores.csv");
        std::fs::write(&p, &text).unwrap();
        assert_eq!(read_table(&p, &h()).unwrap().unwrap().rows, state.rows);
        assert!(read_table(&p, &header(1, &[false], &[])).unwrap().is_none());
        assert_eq!(read_header(&p).unwrap().unwrap(), h());
        assert!(read_header(&dir.path().join("none.csv")).unwrap().is_none());
    }
}
