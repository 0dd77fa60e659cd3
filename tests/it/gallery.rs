//! The gallery: its files parse, every link resolves, names are escaped,
//! pages split as they should, reruns leave no stale data, and it renders
//! in headless Chromium when one is installed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;
use tch_vis::gallery::{read_run, Gallery, GalleryItem};

use crate::util::repo;

/// Names a file system allows and HTML, URLs and JSON do not like.
const NASTY: [&str; 8] = [
    "<script>alert(1)</script>.png",
    "a&b \"q\" 'x'.png",
    "sp ace/#hash?.png",
    "100%.png",
    "ü/猫 \u{2028}.png",
    "x:y/</script><b>bold</b>.png",
    "dir/..hidden.png",
    "plain/0.png",
];

/// A 2×2 PNG.
fn dummy_png(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(2, 2, |x, y| image::Rgb([x as u8 * 200, y as u8 * 200, 90]));
    img.save_with_format(path, image::ImageFormat::Png).unwrap();
}

/// An item for `rel` with a saliency map written under `out`.
fn item_with_map(out: &Path, rel: &str, i: usize) -> GalleryItem {
    let file = format!("{rel}.saliency.png");
    dummy_png(&out.join(&file));
    let mut it = GalleryItem::new(rel);
    it.maps = vec![("saliency".into(), file)];
    it.scores = vec![i as f64 / 10.0, -(i as f64)];
    it.classes = vec![Some(i % 3), None];
    it.labels = vec![Some(format!("<label {}> & co", i % 3)), None];
    it
}

/// The summary JSON embedded in `index.html`.
fn summary(out: &Path) -> Value {
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    let open = "<script id=\"gallery-data\" type=\"application/json\">";
    let start = html.find(open).expect("no gallery-data script") + open.len();
    let end = start + html[start..].find("</script>").unwrap();
    serde_json::from_str(&html[start..end]).expect("summary is not JSON")
}

/// The JSON argument of a data file's `galleryChunk(...)` call.
fn page(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    let json = text
        .strip_prefix("galleryChunk(")
        .and_then(|t| t.strip_suffix(");\n"))
        .unwrap_or_else(|| panic!("{} is not one galleryChunk(...) call", path.display()));
    serde_json::from_str(json).expect("data file is not JSON")
}

fn page_files(out: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out.join("gallery"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("page-") && n.ends_with(".js"))
        .collect();
    names.sort();
    names
}

/// Decodes `%XX` escapes.
fn percent_decode(href: &str) -> String {
    let b = href.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            out.push(u8::from_str_radix(&href[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// Every href of every data file, checked to be encoded and to resolve.
fn assert_hrefs_resolve(out: &Path, summary: &Value) -> usize {
    let pages = summary["paths"]
        .as_array()
        .unwrap()
        .len()
        .div_ceil(summary["page_size"].as_u64().unwrap() as usize);
    let mut n = 0;
    for k in 0..pages {
        let p = page(&out.join(format!("gallery/page-{k:05}.js")));
        assert_eq!(p["token"], summary["token"], "page {k}: token");
        for item in p["items"].as_array().unwrap() {
            for map in item["maps"].as_array().unwrap() {
                let href = map[1].as_str().unwrap();
                assert!(
                    href.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._~%/".contains(&b)),
                    "href not encoded: {href}"
                );
                let file = out.join(percent_decode(href));
                assert!(
                    file.is_file(),
                    "href {href} does not resolve: {}",
                    file.display()
                );
                n += 1;
            }
        }
    }
    n
}

#[test]
fn pages_parse_and_every_link_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let mut items: Vec<GalleryItem> = (0..250)
        .map(|i| item_with_map(out, &format!("d{}/img {i:03}.png", i % 7), i))
        .collect();
    items.extend(
        NASTY
            .iter()
            .enumerate()
            .map(|(i, r)| item_with_map(out, r, i)),
    );
    let mut bad = GalleryItem::new("broken/not an image.png");
    bad.error = Some("cannot decode image: <unknown> format".into());
    items.push(bad);
    let n = items.len();

    let files = Gallery::new().page_size(100).write(out, &items).unwrap();
    assert_eq!(files.pages.len(), n.div_ceil(100));
    assert_eq!(page_files(out).len(), n.div_ceil(100));

    let s = summary(out);
    let paths: Vec<&str> = s["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(paths.len(), n);
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted, "paths are in byte order");
    for col in s["scores"].as_array().unwrap() {
        assert_eq!(col.as_array().unwrap().len(), n);
    }
    assert_eq!(s["score_names"], serde_json::json!(["score_0", "score_1"]));
    let failed: Vec<usize> = s["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(paths[failed[0]], "broken/not an image.png");

    // Page k holds items k*100.. in the summary's order, error and all.
    let mut seen = 0;
    for (k, file) in files.pages.iter().enumerate() {
        let p = page(file);
        assert_eq!(p["page"], k);
        let items = p["items"].as_array().unwrap();
        assert_eq!(items.len(), (n - k * 100).min(100), "page {k}");
        for (m, it) in items.iter().enumerate() {
            let i = k * 100 + m;
            if i == failed[0] {
                assert_eq!(it["error"], "cannot decode image: <unknown> format");
                assert_eq!(it["maps"], serde_json::json!([]));
            } else {
                let href = percent_decode(it["maps"][0][1].as_str().unwrap());
                assert_eq!(href, format!("{}.saliency.png", paths[i]));
            }
        }
        seen += items.len();
    }
    assert_eq!(seen, n);
    assert_eq!(assert_hrefs_resolve(out, &s), n - 1);
}

#[test]
fn nasty_names_labels_errors_and_titles_are_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let mut items: Vec<GalleryItem> = NASTY
        .iter()
        .enumerate()
        .map(|(i, r)| item_with_map(out, r, i))
        .collect();
    items[0].error = Some("</script><script>alert('e')</script> & \"more\"".into());
    let title = "run </title><script>alert(\"t\")</script> & co";
    Gallery::new().title(title).write(out, &items).unwrap();

    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    // The page's own two scripts and nothing else.
    assert_eq!(
        html.matches("<script").count(),
        2,
        "script tags in index.html"
    );
    assert_eq!(html.matches("</script>").count(), 2);
    assert!(!html.contains("<b>bold"), "raw markup from a name");
    assert!(
        !html.contains("</title><script>"),
        "raw markup from the title"
    );
    assert_eq!(
        html.matches(
            "run &lt;/title&gt;&lt;script&gt;alert(&quot;t&quot;)&lt;/script&gt; &amp; co"
        )
        .count(),
        2,
        "title escaped in <title> and <h1>"
    );
    assert!(
        !html.contains('\u{2028}'),
        "U+2028 must be escaped in scripts"
    );

    // The JSON gives back the exact names, labels and errors.
    let s = summary(out);
    let mut want: Vec<&str> = NASTY.to_vec();
    want.sort();
    assert_eq!(s["paths"], serde_json::json!(want));
    assert_eq!(s["title"], title);
    let table: Vec<&str> = s["label_table"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(table.contains(&"<label 0> & co"));
    let data = std::fs::read_to_string(out.join("gallery/page-00000.js")).unwrap();
    assert!(!data.contains('<') && !data.contains('>') && !data.contains('&'));
    let p = page(&out.join("gallery/page-00000.js"));
    let errors: Vec<&str> = p["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["error"].as_str())
        .collect();
    assert_eq!(errors, ["</script><script>alert('e')</script> & \"more\""]);
    assert_hrefs_resolve(out, &s);
}

#[test]
fn rewriting_with_fewer_items_removes_stale_pages_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let items: Vec<GalleryItem> = (0..350)
        .map(|i| item_with_map(out, &format!("{i:04}.png"), i))
        .collect();
    // Files of the run that only look alike are kept.
    dummy_png(&out.join("gallery/page-00009.js.saliency.png"));
    std::fs::write(out.join("gallery/page-9.js"), "x").unwrap();

    let g = Gallery::new().page_size(100);
    assert_eq!(g.write(out, &items).unwrap().pages.len(), 4);
    let first = summary(out)["token"].clone();
    let again = g.write(out, &items[..120]).unwrap();
    assert_eq!(again.pages.len(), 2);
    assert_eq!(again.removed, 2);
    assert_eq!(
        page_files(out),
        ["page-00000.js", "page-00001.js", "page-9.js"]
    );
    assert!(out.join("gallery/page-00009.js.saliency.png").is_file());
    let s = summary(out);
    assert_ne!(s["token"], first);
    assert_eq!(s["paths"].as_array().unwrap().len(), 120);
    assert_hrefs_resolve(out, &s);

    // Zero items: an empty gallery, no data files.
    let none = g.write(out, &[]).unwrap();
    assert!(none.pages.is_empty());
    assert_eq!(summary(out)["paths"], serde_json::json!([]));
    assert_eq!(page_files(out), ["page-9.js"]);
    // No temporary files left behind.
    for e in std::fs::read_dir(out.join("gallery")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(!name.contains(tch_vis::io::TEMP_MARK), "{name}");
    }
}

#[test]
fn read_run_merges_rows_failures_and_maps() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    std::fs::write(
        out.join("scores.csv"),
        "path,score_0,score_1,class_0,label_0,class_1,label_1\n\
         \"a,b \"\"q\"\".png\",0.5,-1,3,three,,\n\
         c/d.png,0.25,nan,7,\"sev,en\",1,\n",
    )
    .unwrap();
    std::fs::write(
        out.join("report.json"),
        r#"{"processed": 2, "failed": [{"path": "e.txt", "error": "cannot decode image e.txt: unknown format"}]}"#,
    )
    .unwrap();
    dummy_png(&out.join("a,b \"q\".png.saliency.png"));
    dummy_png(&out.join("c/d.png.saliency.png"));
    dummy_png(&out.join("c/d.png.cam.png"));

    let run = read_run(out).unwrap();
    assert_eq!(run.score_names, ["score_0", "score_1"]);
    let rels: Vec<&str> = run.items.iter().map(|i| i.rel.as_str()).collect();
    assert_eq!(rels, ["a,b \"q\".png", "c/d.png", "e.txt"]);
    let a = &run.items[0];
    assert_eq!(a.scores, [0.5, -1.0]);
    assert_eq!(a.classes, [Some(3), None]);
    assert_eq!(a.labels, [Some("three".to_string()), None]);
    assert_eq!(
        a.maps,
        [(
            "saliency".to_string(),
            "a,b \"q\".png.saliency.png".to_string()
        )]
    );
    let d = &run.items[1];
    assert!(d.scores[1].is_nan());
    assert_eq!(d.classes, [Some(7), Some(1)]);
    assert_eq!(d.labels, [Some("sev,en".to_string()), None]);
    let kinds: Vec<&str> = d.maps.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["saliency", "cam"]);
    let e = &run.items[2];
    assert_eq!(
        e.error.as_deref(),
        Some("cannot decode image e.txt: unknown format")
    );
    assert!(e.maps.is_empty() && e.scores.is_empty());

    Gallery::new()
        .score_names(run.score_names.clone())
        .write(out, &run.items)
        .unwrap();
    let s = summary(out);
    assert_eq!(
        s["scores"][1],
        serde_json::json!([-1.0, null, null]),
        "NaN and missing are null"
    );
    assert_eq!(assert_hrefs_resolve(out, &s), 3);

    // The same from the merged state a sink returns.
    let merged = tch_vis::batch::Merged {
        header: [
            "path", "score_0", "score_1", "class_0", "label_0", "class_1", "label_1",
        ]
        .map(String::from)
        .to_vec(),
        rows: [
            ("a,b \"q\".png", ["0.5", "-1", "3", "three", "", ""]),
            ("c/d.png", ["0.25", "nan", "7", "sev,en", "1", ""]),
        ]
        .into_iter()
        .map(|(p, f)| (p.to_string(), f.map(String::from).to_vec()))
        .collect(),
        failed: [(
            "e.txt".to_string(),
            "cannot decode image e.txt: unknown format".to_string(),
        )]
        .into_iter()
        .collect(),
    };
    let from_merged = tch_vis::gallery::Run::from_merged(out, &merged);
    assert_eq!(
        format!("{from_merged:?}"),
        format!("{run:?}"),
        "NaN != NaN, so compare as text"
    );

    // An empty folder is an empty run; a broken report is an error.
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(read_run(empty.path()).unwrap().items, []);
    std::fs::write(empty.path().join("report.json"), "{not json").unwrap();
    assert!(matches!(
        read_run(empty.path()),
        Err(tch_vis::Error::Io { .. })
    ));
}

#[test]
fn hundred_thousand_items_write_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let items: Vec<GalleryItem> = (0..100_000)
        .map(|i| {
            let rel = format!("class_{}/photo_{i:06}.jpg", i % 10);
            let mut it = GalleryItem::new(rel.clone());
            it.maps = vec![("saliency".into(), format!("{rel}.saliency.png"))];
            it.scores = vec![(i % 997) as f64 / 997.0];
            it.classes = vec![Some(i % 10)];
            it.labels = vec![Some(format!("label {}", i % 10))];
            if i % 1000 == 0 {
                it.error = Some("cannot decode image".into());
            }
            it
        })
        .collect();
    let t = Instant::now();
    let files = Gallery::new().write(out, &items).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let index = std::fs::metadata(&files.index).unwrap().len();
    let page0 = std::fs::metadata(&files.pages[0]).unwrap().len();
    println!(
        "gallery of 100000 items: {secs:.2} s, index.html {:.1} MB, {} data files of ~{} KB",
        index as f64 / 1e6,
        files.pages.len(),
        page0 / 1000
    );
    assert_eq!(files.pages.len(), 1000);
}

/// The headless Chromium binary, if one is installed.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for name in [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

#[test]
fn renders_in_headless_chromium() {
    let Some(browser) = chromium() else {
        println!("skipped: no chromium");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out dir");
    let mut items: Vec<GalleryItem> = NASTY
        .iter()
        .enumerate()
        .map(|(i, r)| item_with_map(&out, r, i))
        .collect();
    items.extend((0..130).map(|i| item_with_map(&out, &format!("num/{i:03}.png"), i)));
    let mut bad = GalleryItem::new("broken.png");
    bad.error = Some("cannot decode <image> & stop".into());
    items.push(bad);
    Gallery::new()
        .page_size(50)
        .title("<b>chromium</b> test")
        .write(&out, &items)
        .unwrap();

    // The screenshot script.
    let png = dir.path().join("shot.png");
    let shot = Command::new(repo("scripts/gallery_screenshot.sh"))
        .arg(&out)
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        shot.status.success(),
        "gallery_screenshot.sh: {}\n{}",
        shot.status,
        String::from_utf8_lossy(&shot.stderr)
    );
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");

    // The DOM after the scripts ran: one card per item of the first page,
    // the names as text (escaped by the serialiser), no injected elements.
    let url = format!(
        "file://{}",
        tch_vis::gallery::encode_href(out.join("index.html").to_str().unwrap())
    );
    let dump = |hash: &str| -> String {
        let profile = tempfile::tempdir().unwrap();
        let o = Command::new(&browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(["--virtual-time-budget=5000", "--dump-dom"])
            .arg(format!("{url}{hash}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let dom = dump("");
    assert_eq!(dom.matches("class=\"card").count(), 50, "cards on page 1");
    // Names are shown as text: the serialiser escapes `<`, `>` and `&`.
    assert!(
        dom.contains("&lt;script&gt;alert(1)&lt;/"),
        "escaped folder shown"
    );
    assert!(dom.contains("a&amp;b \"q\" 'x'.png"), "escaped name shown");
    assert!(!dom.contains("<b>bold</b>"), "no element from a name");
    assert!(dom.contains("of 3"), "3 pages");
    assert!(dom.contains("1 failed"));
    assert!(
        !dom.contains("id=\"notice\" class=\"notice\">"),
        "a notice is shown: {dom}"
    );

    // Sorted by score, highest first: num/129.png (score 12.9) leads, and
    // page 1 draws on several data files.
    let sorted = dump("#sort=s0d");
    let first = sorted.find("class=\"card").unwrap();
    assert!(
        sorted[first..first + 2000].contains("129.png"),
        "highest score first"
    );
    // Filters: class 1 under num/ is 43 of the 130, one page; failed only.
    let class1 = dump("#cls=0:1&q=num/");
    assert_eq!(class1.matches("class=\"card").count(), 43, "class filter");
    assert!(class1.contains("of 1"));
    let failed = dump("#status=failed");
    assert_eq!(failed.matches("class=\"card").count(), 1, "failed filter");
    assert!(failed.contains("cannot decode &lt;image&gt; &amp; stop"));
}
