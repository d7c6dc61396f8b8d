//! The report each benchmark binary writes: Markdown for BENCHMARKS.md, JSON for machines.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

/// The flags every benchmark binary takes (flattened into its own): where its report goes
/// and whether the run is a quick smoke run.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// Directory for the Markdown and JSON reports (and any other files of the run).
    #[arg(long, default_value = "bench-out")]
    pub out: std::path::PathBuf,
    /// A short smoke run (seconds instead of minutes); the figures mean little.
    #[arg(long, env = "BENCH_QUICK", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false")]
    pub quick: bool,
}

/// The flags every worker benchmark binary takes (flattened into its own): [`ReportArgs`]
/// and the ONNX Runtime library.
#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// The ONNX Runtime library.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_lib: std::path::PathBuf,
    /// Where the report goes, and whether the run is a quick one.
    #[command(flatten)]
    pub report: ReportArgs,
}

/// A report being written: Markdown text and a JSON object, side by side.
#[derive(Debug, Default)]
pub struct Report {
    markdown: String,
    json: Map<String, Value>,
}

impl Report {
    /// An empty report.
    pub fn new() -> Report {
        Report::default()
    }

    /// Adds a `###` heading.
    pub fn heading(&mut self, text: &str) {
        let _ = write!(self.markdown, "### {text}\n\n");
    }

    /// Adds a paragraph.
    pub fn para(&mut self, text: &str) {
        let _ = write!(self.markdown, "{}\n\n", text.trim_end());
    }

    /// Adds a table; every row should have as many cells as `header`.
    pub fn table(&mut self, header: &[&str], rows: &[Vec<String>]) {
        let line = |cells: &mut dyn Iterator<Item = &str>| {
            let mut s = String::from("|");
            for c in cells {
                let _ = write!(s, " {c} |");
            }
            s.push('\n');
            s
        };
        self.markdown.push_str(&line(&mut header.iter().copied()));
        self.markdown
            .push_str(&line(&mut header.iter().map(|_| "---")));
        for row in rows {
            self.markdown
                .push_str(&line(&mut row.iter().map(String::as_str)));
        }
        self.markdown.push('\n');
    }

    /// Records what every worker benchmark's JSON starts with: the machine, the model and
    /// whether the run was a quick smoke run.
    pub fn set_run(&mut self, model: &Path, quick: bool) {
        self.set("machine", machine());
        self.set("model", model.display().to_string());
        self.set("quick", quick);
    }

    /// Records `value` under `key` in the JSON document.
    pub fn set(&mut self, key: &str, value: impl Serialize) {
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        self.json.insert(key.to_owned(), value);
    }

    /// The Markdown so far.
    pub fn markdown(&self) -> &str {
        &self.markdown
    }

    /// Writes `DIR/NAME.md` and `DIR/NAME.json`.
    pub fn write(&self, dir: &Path, name: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(format!("{name}.md")), &self.markdown)?;
        let json = serde_json::to_string_pretty(&self.json).map_err(std::io::Error::other)?;
        std::fs::write(dir.join(format!("{name}.json")), json + "\n")
    }
}

/// The sentence a quick smoke run's report carries (with a leading space), or nothing.
pub fn quick_note(quick: bool) -> &'static str {
    if quick {
        " **Quick smoke run (BENCH_QUICK=1): figures are not meaningful.**"
    } else {
        ""
    }
}

/// One line about the machine: CPU model and count, memory, kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU", str::trim)
        .to_owned();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {mem_gib:.0} GiB memory, Linux {}",
        kernel.trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_table() {
        let mut r = Report::new();
        r.heading("T");
        r.table(&["a", "b"], &[vec!["1".into(), "2".into()]]);
        assert_eq!(
            r.markdown(),
            "### T\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n"
        );
    }
}
