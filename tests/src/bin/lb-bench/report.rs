//! `--write-docs`: the sections' markdown into a docs file, between its markers, and the
//! facts of the machine the figures come from.
//!
//! A section NAME lives in the docs file between two lines of their own:
//!
//! ```text
//! <!-- lb-bench:NAME -->
//! ...replaced on every run...
//! <!-- /lb-bench:NAME -->
//! ```
//!
//! Everything outside the markers, and the marker lines themselves, is kept byte for byte.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

fn start_marker(name: &str) -> String {
    format!("<!-- lb-bench:{name} -->")
}

fn end_marker(name: &str) -> String {
    format!("<!-- /lb-bench:{name} -->")
}

/// A marker line of the docs file.
struct Marker<'a> {
    end: bool,
    name: &'a str,
    /// 1-based, for messages.
    line: usize,
    /// Byte offsets of the line, its newline included.
    from: usize,
    to: usize,
}

/// Every `<!-- lb-bench:NAME -->` and `<!-- /lb-bench:NAME -->` line of `text`.
fn markers(text: &str) -> Vec<Marker<'_>> {
    let mut out = Vec::new();
    let mut from = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let to = from + line.len();
        let l = line.trim();
        if let Some(inner) = l.strip_prefix("<!--").and_then(|l| l.strip_suffix("-->")) {
            let inner = inner.trim();
            let (end, rest) = match inner.strip_prefix('/') {
                Some(rest) => (true, rest),
                None => (false, inner),
            };
            if let Some(name) = rest.strip_prefix("lb-bench:") {
                out.push(Marker {
                    end,
                    name: name.trim(),
                    line: i + 1,
                    from,
                    to,
                });
            }
        }
        from = to;
    }
    out
}

/// `text` with each section's markdown between its markers; `file` names the file in
/// errors.
fn replace_sections(text: &str, sections: &[(&str, String)], file: &str) -> Result<String> {
    let all = markers(text);
    // (start of the replaced span, its end, the new text)
    let mut spans: Vec<(usize, usize, String)> = Vec::new();
    for (k, (name, markdown)) in sections.iter().enumerate() {
        if sections[..k].iter().any(|(n, _)| n == name) {
            bail!("section `{name}` is given twice for {file}");
        }
        let find = |end: bool| -> Result<&Marker> {
            let marker = if end {
                end_marker(name)
            } else {
                start_marker(name)
            };
            let found: Vec<&Marker> = all
                .iter()
                .filter(|m| m.end == end && m.name == *name)
                .collect();
            match found.as_slice() {
                [m] => Ok(m),
                [] => bail!(
                    "section `{name}`: no line `{marker}` in {file} (add `{}` and `{}` where \
                     the section goes)",
                    start_marker(name),
                    end_marker(name)
                ),
                more => bail!(
                    "section `{name}`: `{marker}` appears {} times in {file} (lines {})",
                    more.len(),
                    more.iter()
                        .map(|m| m.line.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        };
        let (start, end) = (find(false)?, find(true)?);
        if end.line < start.line {
            bail!(
                "section `{name}`: its end marker (line {}) comes before its start marker \
                 (line {}) in {file}",
                end.line,
                start.line
            );
        }
        // Any marker inside would be lost with the old text.
        if let Some(inner) = all
            .iter()
            .find(|m| m.line > start.line && m.line < end.line)
        {
            bail!(
                "section `{name}` (lines {}–{}) has another marker inside it in {file}: \
                 line {}, `{}`",
                start.line,
                end.line,
                inner.line,
                if inner.end {
                    end_marker(inner.name)
                } else {
                    start_marker(inner.name)
                }
            );
        }
        // A blank line each side, so the markdown starts and ends its own blocks.
        let body = markdown.trim_matches(|c| c == '\n' || c == '\r');
        let new = if body.is_empty() {
            String::new()
        } else {
            format!("\n{body}\n\n")
        };
        // A start marker on the last line without a newline cannot be: its end follows.
        spans.push((start.to, end.from, new));
    }
    spans.sort_by_key(|s| s.0);
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (from, to, new) in spans {
        out.push_str(&text[at..from]);
        out.push_str(&new);
        at = to;
    }
    out.push_str(&text[at..]);
    Ok(out)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`: a reader
/// sees the old file or the new one, never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.lb-bench-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if let Ok(meta) = fs::metadata(path) {
            f.set_permissions(meta.permissions())?;
        }
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!("writing {}", path.display()))
    })
}

/// In the markdown file at `path`, replaces what is between `<!-- lb-bench:NAME -->` and
/// `<!-- /lb-bench:NAME -->` with each section's markdown. A section whose markers are
/// missing, duplicated, out of order or enclose another marker is an error, and then the
/// file is left as it was.
pub fn write_docs(path: &Path, sections: &[(&str, String)]) -> Result<()> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let new = replace_sections(&text, sections, &path.display().to_string())?;
    if new != text {
        write_atomically(path, new.as_bytes())?;
    }
    Ok(())
}

/// One short markdown paragraph: the CPUs, the memory, the kernel and today's date (UTC).
pub fn machine_facts() -> String {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_secs() / 86_400) as i64)
        .unwrap_or(0);
    facts(
        &read("/proc/cpuinfo"),
        &read("/proc/meminfo"),
        &read("/proc/sys/kernel/osrelease"),
        &iso_date(days),
    )
}

fn facts(cpuinfo: &str, meminfo: &str, osrelease: &str, date: &str) -> String {
    let field = |l: &str, key: &str| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    };
    // x86 says "model name"; arm64 has no model line, so fall back.
    let model = cpuinfo
        .lines()
        .find_map(|l| field(l, "model name").or_else(|| field(l, "Model")))
        .map(|m| m.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "unknown model".to_string());
    let mut cpus = cpuinfo
        .lines()
        .filter(|l| field(l, "processor").is_some())
        .count();
    if cpus == 0 {
        cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    }
    let memory = meminfo
        .lines()
        .find_map(|l| field(l, "MemTotal"))
        .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or("unknown".to_string(), |kib| {
            format!("{:.1} GiB", kib as f64 / (1024.0 * 1024.0))
        });
    let kernel = match osrelease.trim() {
        "" => "unknown",
        k => k,
    };
    format!(
        "Machine: {cpus} CPU{} ({model}), {memory} of memory, Linux {kernel}; measured on \
         {date} (UTC).",
        if cpus == 1 { "" } else { "s" }
    )
}

/// `YYYY-MM-DD` of a day counted from 1970-01-01 (proleptic Gregorian; H. Hinnant's
/// civil_from_days).
fn iso_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const DOC: &str = "# Benchmarks\n\
        \n\
        Intro, kept as it is.\n\
        \n\
        <!-- lb-bench:per-packet -->\n\
        old per-packet table\n\
        <!-- /lb-bench:per-packet -->\n\
        \n\
        Between the sections, kept.\n\
        <!-- lb-bench:failover -->\n\
        <!-- /lb-bench:failover -->\n\
        Trailer without a newline";

    /// A docs file in a fresh temp directory, removed on drop.
    struct Doc(PathBuf);
    impl Doc {
        fn new(name: &str, text: &str) -> Doc {
            let dir = std::env::temp_dir().join(format!("lb-bench-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            let path = dir.join("benchmarks.md");
            fs::write(&path, text).unwrap();
            Doc(path)
        }
        fn text(&self) -> String {
            fs::read_to_string(&self.0).unwrap()
        }
    }
    impl Drop for Doc {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(self.0.parent().unwrap());
        }
    }

    #[test]
    fn replaces_two_sections_and_keeps_the_rest() {
        let doc = Doc::new("docs-two", DOC);
        let sections = [
            (
                "failover",
                "\n| a | b |\n| --- | --- |\n| 1 | 2 |\n".to_string(),
            ),
            ("per-packet", "new per-packet table\n".to_string()),
        ];
        write_docs(&doc.0, &sections).unwrap();
        let expected = "# Benchmarks\n\
            \n\
            Intro, kept as it is.\n\
            \n\
            <!-- lb-bench:per-packet -->\n\
            \n\
            new per-packet table\n\
            \n\
            <!-- /lb-bench:per-packet -->\n\
            \n\
            Between the sections, kept.\n\
            <!-- lb-bench:failover -->\n\
            \n\
            | a | b |\n\
            | --- | --- |\n\
            | 1 | 2 |\n\
            \n\
            <!-- /lb-bench:failover -->\n\
            Trailer without a newline";
        assert_eq!(doc.text(), expected);
        // Again with the same markdown: nothing changes.
        write_docs(&doc.0, &sections).unwrap();
        assert_eq!(doc.text(), expected);
        // No temp file left beside it.
        let dir = doc.0.parent().unwrap();
        assert_eq!(fs::read_dir(dir).unwrap().count(), 1);
        // Empty markdown empties the section.
        write_docs(&doc.0, &[("per-packet", String::new())]).unwrap();
        assert!(doc
            .text()
            .contains("<!-- lb-bench:per-packet -->\n<!-- /lb-bench:per-packet -->\n"));
    }

    #[test]
    fn a_missing_marker_names_the_section_and_the_file() {
        let doc = Doc::new("docs-missing", DOC);
        let err = write_docs(
            &doc.0,
            &[
                ("per-packet", "x".to_string()),
                ("end-to-end", "y".to_string()),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("end-to-end"), "{err}");
        assert!(err.contains(&doc.0.display().to_string()), "{err}");
        assert!(err.contains("<!-- lb-bench:end-to-end -->"), "{err}");
        // Nothing written, not even the sections that were fine.
        assert_eq!(doc.text(), DOC);

        // Only the end marker missing.
        let doc = Doc::new("docs-missing-end", "<!-- lb-bench:a -->\nx\n");
        let err = write_docs(&doc.0, &[("a", "y".into())])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("<!-- /lb-bench:a -->") && err.contains("benchmarks.md"),
            "{err}"
        );
    }

    #[test]
    fn misplaced_markers_are_errors() {
        let cases = [
            (
                "<!-- /lb-bench:a -->\n<!-- lb-bench:a -->\n",
                "comes before its start marker",
            ),
            (
                "<!-- lb-bench:a -->\n<!-- /lb-bench:a -->\n<!-- lb-bench:a -->\n",
                "appears 2 times",
            ),
            (
                "<!-- lb-bench:a -->\n<!-- lb-bench:b -->\n<!-- /lb-bench:a -->\n\
                 <!-- /lb-bench:b -->\n",
                "another marker inside it",
            ),
        ];
        for (text, expected) in cases {
            let doc = Doc::new("docs-misplaced", text);
            let err = write_docs(&doc.0, &[("a", "y".into())])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(expected) && err.contains("section `a`"),
                "{err}"
            );
            assert_eq!(doc.text(), text);
        }
        let doc = Doc::new("docs-twice", DOC);
        let err = write_docs(
            &doc.0,
            &[("failover", "a".into()), ("failover", "b".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("given twice"), "{err}");
    }

    /// `--write-docs` can fill every section `main` writes into the real docs file.
    #[test]
    fn the_docs_have_every_section() {
        let path = crate::docs_dir().join("benchmarks.md");
        let text = fs::read_to_string(&path).unwrap();
        let sections: Vec<(&str, String)> = [
            "machine",
            "per-packet",
            "end-to-end",
            "control-plane",
            "failover",
            "failover-timeline",
            "kubernetes",
            "dns",
            "tls",
        ]
        .iter()
        .map(|name| (*name, format!("{name} figures")))
        .collect();
        let new = replace_sections(&text, &sections, "benchmarks.md").unwrap();
        for (name, body) in &sections {
            assert!(new.contains(body), "{name}");
        }
    }

    #[test]
    fn machine_facts_read_proc() {
        let cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC   7B13 64-Core Processor\n\n\
                       processor\t: 1\nmodel name\t: AMD EPYC   7B13 64-Core Processor\n";
        let meminfo = "MemTotal:       24591452 kB\nMemFree:        1 kB\n";
        assert_eq!(
            facts(cpuinfo, meminfo, "6.1.0-18-amd64\n", "2026-01-02"),
            "Machine: 2 CPUs (AMD EPYC 7B13 64-Core Processor), 23.5 GiB of memory, Linux \
             6.1.0-18-amd64; measured on 2026-01-02 (UTC)."
        );
        let real = machine_facts();
        assert!(
            real.starts_with("Machine: ") && real.contains("Linux "),
            "{real}"
        );
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso_date(0), "1970-01-01");
        assert_eq!(iso_date(19_723), "2024-01-01");
        assert_eq!(iso_date(19_723 + 31 + 28), "2024-02-29");
        assert_eq!(iso_date(11_016), "2000-02-29");
        assert_eq!(iso_date(-1), "1969-12-31");
    }
}
