//! `scores.csv`: reading the rows of an earlier run and writing them back.

use std::collections::BTreeMap;
use std::path::Path;

/// Rows by relative path (sorted in byte order), each with its score columns.
pub type Rows = BTreeMap<String, Vec<String>>;

/// The header for `outputs` score columns.
pub fn header(outputs: usize) -> String {
    let mut h = String::from("path");
    for k in 0..outputs {
        h.push_str(&format!(",score_{k}"));
    }
    h
}

fn quote(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_string()
    }
}

/// The whole file for `rows`.
pub fn render(outputs: usize, rows: &Rows) -> String {
    let mut s = header(outputs);
    s.push('\n');
    for (path, values) in rows {
        s.push_str(&quote(path));
        for v in values {
            s.push(',');
            s.push_str(v);
        }
        s.push('\n');
    }
    s
}

/// Splits CSV text into records of fields (RFC 4180 quoting).
fn parse_records(text: &str) -> Vec<Vec<String>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    field.push('"');
                    chars.next();
                } else {
                    quoted = false;
                }
            } else {
                field.push(c);
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            ',' => record.push(std::mem::take(&mut field)),
            '\r' => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
                any = false;
            }
            other => field.push(other),
        }
    }
    if any {
        record.push(field);
        records.push(record);
    }
    records
}

/// What an existing `scores.csv` holds.
pub enum Existing {
    /// No file.
    None,
    /// Rows, with the header matching `outputs` columns.
    Rows(Rows),
    /// A header for another number of outputs.
    Mismatch(String),
}

/// Reads `path` if it exists. Malformed rows (wrong field count) are
/// dropped, so their images are recomputed.
pub fn read(path: &Path, outputs: usize) -> std::io::Result<Existing> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::None),
        Err(e) => return Err(e),
    };
    let mut records = parse_records(&text).into_iter();
    let want = header(outputs);
    match records.next() {
        None => return Ok(Existing::Rows(Rows::new())),
        Some(h) if h.join(",") == want => {}
        Some(h) => return Ok(Existing::Mismatch(h.join(","))),
    }
    let mut rows = Rows::new();
    for mut r in records {
        if r.len() == outputs + 1 && !r[0].is_empty() {
            let values = r.split_off(1);
            rows.insert(r.remove(0), values);
        }
    }
    Ok(Existing::Rows(rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_quoting() {
        let mut rows = Rows::new();
        rows.insert("b/x.png".into(), vec!["0.5".into(), "-1".into()]);
        rows.insert("a,\"odd\".png".into(), vec!["1e-7".into(), "2".into()]);
        let text = render(2, &rows);
        assert!(text.starts_with("path,score_0,score_1\n\"a,\"\"odd\"\".png\",1e-7,2\n"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("scores.csv");
        std::fs::write(&p, &text).unwrap();
        match read(&p, 2).unwrap() {
            Existing::Rows(r) => assert_eq!(r, rows),
            _ => panic!("expected rows"),
        }
        assert!(matches!(read(&p, 1).unwrap(), Existing::Mismatch(_)));
        assert!(matches!(
            read(&dir.path().join("no.csv"), 1).unwrap(),
            Existing::None
        ));
    }
}
