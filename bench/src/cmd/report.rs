//! `bench report`: the latest result of every run in `results/` on one dated page
//! (markdown, and the same as HTML), with its table, its figures and the machine it ran on.
//!
//! Runs write `<bench>-<YYYYMMDDTHHMMSSZ>.json` with a markdown table beside it
//! (`.md`) and figures starting with the same stem (`.svg`); the report takes, per bench,
//! the file with the latest stamp.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

use super::apps;
use super::{utc_now, Machine};

/// Options of `bench report`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The results directory to collect (the report is written there too).
    #[arg(long, default_value = "results")]
    pub results: PathBuf,
}

/// The latest run of one bench.
#[derive(Debug, Clone, PartialEq)]
pub struct Latest {
    /// Bench name (`overlay`, `hpl`, ...).
    pub bench: String,
    /// Its stamp (`20261129T190000Z`).
    pub stamp: String,
    /// Its JSON file.
    pub json: PathBuf,
    /// Its markdown table, if any.
    pub md: Option<PathBuf>,
    /// Its figures (file names, relative to the results directory).
    pub svgs: Vec<String>,
}

/// Splits `hpl-20261129T190000Z.json` into ("hpl", "20261129T190000Z").
pub fn split_name(file: &str) -> Option<(&str, &str)> {
    let stem = file.strip_suffix(".json")?;
    let (bench, stamp) = stem.rsplit_once('-')?;
    let ok = stamp.len() == 16
        && stamp.ends_with('Z')
        && stamp.as_bytes().get(8) == Some(&b'T')
        && stamp
            .bytes()
            .enumerate()
            .all(|(i, b)| i == 8 || i == 15 || b.is_ascii_digit());
    (ok && !bench.is_empty() && bench != "report").then_some((bench, stamp))
}

/// The latest run of every bench in `dir`, by bench name.
pub fn collect(dir: &Path) -> anyhow::Result<Vec<Latest>> {
    let names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut latest: BTreeMap<String, String> = BTreeMap::new();
    for n in &names {
        if let Some((b, s)) = split_name(n) {
            let e = latest.entry(b.to_string()).or_default();
            if s > e.as_str() {
                *e = s.to_string();
            }
        }
    }
    let mut out = Vec::new();
    for (bench, stamp) in latest {
        let stem = format!("{bench}-{stamp}");
        let md = dir.join(format!("{stem}.md"));
        let mut svgs: Vec<String> = names
            .iter()
            .filter(|n| n.starts_with(&stem) && n.ends_with(".svg"))
            .cloned()
            .collect();
        svgs.sort();
        out.push(Latest {
            json: dir.join(format!("{stem}.json")),
            md: md.is_file().then_some(md),
            bench,
            stamp,
            svgs,
        });
    }
    Ok(out)
}

fn machine_of(v: &Value) -> String {
    let m = &v["machine"];
    let mut s = format!(
        "{} ({} CPUs, {} GiB), Linux {}",
        m["cpu"].as_str().unwrap_or("?"),
        m["cpus"].as_u64().unwrap_or(0),
        m["mem_gib"].as_f64().unwrap_or(0.0),
        m["kernel"].as_str().unwrap_or("?")
    );
    if let Some(l) = v["load_before"].as_array() {
        let l: Vec<String> = l
            .iter()
            .filter_map(Value::as_f64)
            .map(|x| format!("{x:.2}"))
            .collect();
        let _ = write!(s, "; load average at start {}", l.join(" / "));
    }
    s
}

/// The report's markdown for the runs in `dir`, dated `date`, made on `machine`.
pub fn render(dir: &Path, date: &str, machine: &str) -> anyhow::Result<String> {
    let runs = collect(dir)?;
    let mut s = format!(
        "# mvc benchmark report, {date}\n\nMade on {machine}.\n\nThe latest run of every bench in `{}`; each table gives the raw underlay measured in the same run as its reference.\n\n",
        dir.display()
    );
    if runs.is_empty() {
        s.push_str("No results yet: run `bench overlay`, `bench hpl`, `bench dock`, ... first.\n");
    }
    s.push_str("| bench | run at | machine |\n|---|---|---|\n");
    let mut docs = Vec::new();
    for r in &runs {
        let text = std::fs::read_to_string(&r.json)
            .with_context(|| format!("reading {}", r.json.display()))?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let date = v["date"].as_str().unwrap_or(&r.stamp).to_string();
        let _ = writeln!(s, "| {} | {date} | {} |", r.bench, machine_of(&v));
        docs.push((r, date));
    }
    for (r, date) in docs {
        let _ = write!(s, "\n## {} ({date})\n\n", r.bench);
        match &r.md {
            Some(md) => {
                let t = std::fs::read_to_string(md)
                    .with_context(|| format!("reading {}", md.display()))?;
                s.push_str(t.trim_end());
                s.push('\n');
            }
            None => s.push_str("(no table)\n"),
        }
        for svg in &r.svgs {
            let _ = write!(s, "\n![{svg}]({svg})\n");
        }
        let _ = writeln!(
            s,
            "\nData: `{}`",
            r.json
                .file_name()
                .map_or(String::new(), |n| n.to_string_lossy().into_owned())
        );
    }
    Ok(s)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn inline(s: &str) -> String {
    // `code` spans only; everything else is text.
    let mut out = String::new();
    for (i, part) in esc(s).split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "<code>{part}</code>");
        } else {
            out.push_str(part);
        }
    }
    out
}

fn cells(line: &str) -> Vec<String> {
    let t = line.trim().trim_start_matches('|').trim_end_matches('|');
    t.split('|').map(|c| c.trim().to_string()).collect()
}

/// The markdown subset the runs write (headings, paragraphs, tables, lists, images, code
/// blocks) as an HTML page.
pub fn html(md: &str, title: &str) -> String {
    let mut s = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{}</title>\n<style>body{{font-family:sans-serif;max-width:1300px;margin:auto}}table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}img{{max-width:100%}}</style></head><body>\n",
        esc(title)
    );
    let lines: Vec<&str> = md.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if l.starts_with("```") {
            s.push_str("<pre>");
            i += 1;
            while i < lines.len() && !lines[i].starts_with("```") {
                s.push_str(&esc(lines[i]));
                s.push('\n');
                i += 1;
            }
            s.push_str("</pre>\n");
        } else if l.starts_with('|') {
            s.push_str("<table>\n");
            let mut first = true;
            while i < lines.len() && lines[i].starts_with('|') {
                let c = cells(lines[i]);
                let sep = c
                    .iter()
                    .all(|x| !x.is_empty() && x.chars().all(|ch| matches!(ch, '-' | ':')));
                if !sep {
                    let tag = if first { "th" } else { "td" };
                    s.push_str("<tr>");
                    for x in c {
                        let _ = write!(s, "<{tag}>{}</{tag}>", inline(&x));
                    }
                    s.push_str("</tr>\n");
                    first = false;
                }
                i += 1;
            }
            s.push_str("</table>\n");
            continue;
        } else if let Some(h) = l.strip_prefix('#') {
            let level = 1 + h.chars().take_while(|&c| c == '#').count();
            let text = h.trim_start_matches('#').trim();
            let _ = writeln!(s, "<h{level}>{}</h{level}>", inline(text));
        } else if let Some(rest) = l.strip_prefix("![") {
            if let Some((alt, src)) = rest.split_once("](") {
                let src = src.trim_end_matches(')');
                let _ = writeln!(s, "<p><img src=\"{}\" alt=\"{}\"></p>", esc(src), esc(alt));
            }
        } else if let Some(item) = l.strip_prefix("- ") {
            let _ = writeln!(s, "<ul><li>{}</li></ul>", inline(item));
        } else if !l.trim().is_empty() {
            let _ = writeln!(s, "<p>{}</p>", inline(l));
        }
        i += 1;
    }
    s.push_str("</body></html>\n");
    s
}

/// `bench report`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let (date, stamp) = utc_now();
    let m = Machine::probe();
    let machine = format!("{}, {}", m.line(), apps::load_line(apps::load_avg()));
    let md = render(&args.results, &date, &machine)?;
    let p = args.results.join(format!("report-{stamp}.md"));
    std::fs::write(&p, &md).with_context(|| format!("writing {}", p.display()))?;
    let h = args.results.join(format!("report-{stamp}.html"));
    std::fs::write(&h, html(&md, &format!("mvc benchmark report, {date}")))
        .with_context(|| format!("writing {}", h.display()))?;
    println!("{md}");
    eprintln!("report: {} and {}", p.display(), h.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_into_bench_and_stamp() {
        assert_eq!(
            split_name("hpl-20261129T190000Z.json"),
            Some(("hpl", "20261129T190000Z"))
        );
        assert_eq!(
            split_name("build-time-20261129T190000Z.json"),
            Some(("build-time", "20261129T190000Z"))
        );
        assert_eq!(split_name("report-20261129T190000Z.json"), None);
        assert_eq!(split_name("hpl-2026.json"), None);
        assert_eq!(split_name("hpl-20261129T190000Z.md"), None);
        assert_eq!(split_name("-20261129T190000Z.json"), None);
    }

    #[test]
    fn report_renders_from_sample_results() {
        let d = tempfile::tempdir().unwrap();
        let w = |n: &str, t: &str| std::fs::write(d.path().join(n), t).unwrap();
        let machine = r#""machine":{"cpu":"Test CPU","cpus":2,"mem_gib":4.0,"kernel":"6.1"}"#;
        w(
            "hpl-20261128T100000Z.json",
            &format!(r#"{{"date":"2026-11-28T10:00:00Z",{machine}}}"#),
        );
        w(
            "hpl-20261128T100000Z.md",
            "| old | table |\n|---|---|\n| 1 | 2 |\n",
        );
        w(
            "hpl-20261129T100000Z.json",
            &format!(r#"{{"date":"2026-11-29T10:00:00Z",{machine},"load_before":[1.5,2.0,3.0]}}"#),
        );
        w(
            "hpl-20261129T100000Z.md",
            "| nodes | Gflop/s |\n|---:|---:|\n| 1 | 0.5 |\n",
        );
        w("hpl-20261129T100000Z.svg", "<svg/>");
        w(
            "overlay-20261127T050000Z.json",
            &format!(r#"{{"date":"2026-11-27T05:00:00Z",{machine}}}"#),
        );
        w("notes.txt", "ignored");
        let md = render(d.path(), "2026-11-29T12:00:00Z", "here").unwrap();
        assert!(md.starts_with("# mvc benchmark report, 2026-11-29T12:00:00Z"));
        assert!(md.contains("| hpl | 2026-11-29T10:00:00Z | Test CPU (2 CPUs, 4 GiB), Linux 6.1; load average at start 1.50 / 2.00 / 3.00 |"));
        assert!(md.contains("| 1 | 0.5 |"));
        assert!(!md.contains("old"), "only the latest hpl run: {md}");
        assert!(md.contains("![hpl-20261129T100000Z.svg](hpl-20261129T100000Z.svg)"));
        assert!(md.contains("## overlay (2026-11-27T05:00:00Z)\n\n(no table)"));
        let h = html(&md, "t");
        assert!(h.contains("<th>nodes</th><th>Gflop/s</th>"));
        assert!(h.contains("<td>1</td><td>0.5</td>"));
        assert!(!h.contains("---:"));
        assert!(h.contains("<img src=\"hpl-20261129T100000Z.svg\""));
    }
}
