//! Whole-output snapshots of the real `ckptstore` binary.
//!
//! A [`Snap`] runs the binary several times and records, for each run, the
//! command line, the exit code, stdout and stderr; [`Snap::check`] compares
//! the record with `tests/snapshots/<name>.txt`. Volatile parts are
//! replaced by stable placeholders first: the test's temporary folder,
//! names given to [`Snap::redact`], random (version 4) UUIDs numbered in
//! order of appearance, timestamps (RFC 3339, and Prometheus'
//! `_timestamp_seconds` values), pids, boot ids, process start times
//! and call durations.
//!
//! `CKPTSTORE_UPDATE_SNAPSHOTS=1 cargo test -p ckptstore-cli --test command cli::`
//! rewrites the files.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use regex::Regex;

pub const BIN: &str = env!("CARGO_BIN_EXE_ckptstore");

/// One recorded run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout parsed as the one JSON document of `--json`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

/// A series of runs of the binary, with their own temporary folder and
/// journal, compared at the end with one snapshot file.
pub struct Snap {
    name: String,
    dir: tempfile::TempDir,
    redactions: Vec<(String, String)>,
    record: String,
}

impl Snap {
    pub fn new(name: &str) -> Snap {
        let dir = tempfile::Builder::new()
            .prefix("ckptstore-cli-")
            .tempdir()
            .expect("temp dir");
        let mut snap = Snap {
            name: name.to_string(),
            dir,
            redactions: Vec::new(),
            record: String::new(),
        };
        let tmp = snap.dir.path().display().to_string();
        snap.redact(&tmp, "[TMP]");
        snap
    }

    /// The test's temporary folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The journal every run uses unless its arguments name another.
    pub fn db(&self) -> PathBuf {
        self.dir.path().join("journal.db")
    }

    /// Replace `text` by `placeholder` in the record.
    pub fn redact(&mut self, text: &str, placeholder: &str) {
        self.redactions
            .push((text.to_string(), placeholder.to_string()));
    }

    /// Write a file in the temporary folder; returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).expect("write test file");
        path
    }

    /// Run `ckptstore --db <journal> ARGS` and record it.
    pub fn run(&mut self, args: &[&str]) -> Run {
        self.run_with(args, None)
    }

    /// As [`Snap::run`], with `stdin` as standard input.
    pub fn run_with(&mut self, args: &[&str], stdin: Option<&str>) -> Run {
        let db = self.db().display().to_string();
        let mut full: Vec<&str> = Vec::new();
        if !args.iter().any(|a| *a == "--db" || a.starts_with("--db=")) {
            full.extend(["--db", &db]);
        }
        full.extend(args);
        let out = run_binary(&full, stdin);
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        let shown: Vec<String> = full.iter().map(|a| quote(a)).collect();
        self.record
            .push_str(&format!("$ ckptstore {}", shown.join(" ")));
        if let Some(input) = stdin {
            self.record
                .push_str(&format!(" <<'EOF'\n{}EOF", with_newline(input)));
        }
        self.record.push_str(&format!(
            "\n[exit {}]\n--- stdout\n{}--- stderr\n{}\n",
            run.code,
            with_newline(&run.stdout),
            with_newline(&run.stderr)
        ));
        run
    }

    /// Compare the record with the snapshot file (or rewrite it when
    /// `CKPTSTORE_UPDATE_SNAPSHOTS=1`).
    pub fn check(self) {
        let actual = redact(&self.record, &self.redactions);
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/snapshots")
            .join(format!("{}.txt", self.name));
        if std::env::var("CKPTSTORE_UPDATE_SNAPSHOTS").is_ok_and(|v| v == "1") {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &actual).unwrap();
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            panic!(
                "no snapshot {} yet; this run gave:\n{actual}\n(CKPTSTORE_UPDATE_SNAPSHOTS=1 writes it)",
                path.display()
            )
        });
        assert!(
            expected == actual,
            "output differs from snapshot {}\n{}\n(CKPTSTORE_UPDATE_SNAPSHOTS=1 rewrites it after review)",
            path.display(),
            diff(&expected, &actual)
        );
    }
}

/// Run the binary with a clean environment for what it reads.
pub fn run_binary(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("CKPTSTORE_DB")
        .env_remove("LIBVIRT_DEFAULT_URI")
        .env_remove("RUST_LOG")
        // The snapshots drive the metadata loop over blank images; the
        // bitmap check has its own tests, with real bitmaps.
        .env("CKPTSTORE_BITMAPS", "ignore")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run ckptstore");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().expect("wait for ckptstore")
}

fn with_newline(s: &str) -> String {
    if s.is_empty() || s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

fn quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@+".contains(c))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Stable placeholders for everything that changes from run to run.
pub fn redact(text: &str, fixed: &[(String, String)]) -> String {
    let mut s = text.to_string();
    // Longest first, so a path is replaced before a prefix of it.
    let mut fixed: Vec<&(String, String)> = fixed.iter().collect();
    fixed.sort_by_key(|(from, _)| std::cmp::Reverse(from.len()));
    for (from, to) in fixed {
        s = s.replace(from.as_str(), to);
    }
    for (pattern, placeholder) in [
        (
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)",
            "[TIME]",
        ),
        (r"\S*/ckptstore-demo-[A-Za-z0-9]+", "[DEMO-TMP]"),
        (r"pid \d+", "pid [PID]"),
        (r"boot [0-9a-f]+", "boot [BOOT]"),
        (r"start \d+\)", "start [START])"),
        (r#""pid": \d+"#, r#""pid": "[PID]""#),
        (r#""boot_id": "[^"]*""#, r#""boot_id": "[BOOT]""#),
        (r#""start": \d+"#, r#""start": "[START]""#),
        (r"ms=[0-9.e-]+", "ms=[MS]"),
        (
            r"(_timestamp_seconds\{[^\n]*\}) -?\d+\.\d{3}\n",
            "$1 [SECONDS]\n",
        ),
    ] {
        s = Regex::new(pattern)
            .unwrap()
            .replace_all(&s, placeholder)
            .into_owned();
    }
    let uuid =
        Regex::new(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}").unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    s = uuid
        .replace_all(&s, |c: &regex::Captures| {
            let n = seen.len() + 1;
            format!("[UUID-{}]", seen.entry(c[0].to_string()).or_insert(n))
        })
        .into_owned();
    s
}

/// A line diff good enough to read a failure: the first differing line
/// with context, and both lengths.
fn diff(expected: &str, actual: &str) -> String {
    let e: Vec<&str> = expected.lines().collect();
    let a: Vec<&str> = actual.lines().collect();
    let first = e
        .iter()
        .zip(&a)
        .position(|(x, y)| x != y)
        .unwrap_or(e.len().min(a.len()));
    let from = first.saturating_sub(3);
    let mut out = format!(
        "first difference at line {} (expected {} lines, got {}):\n",
        first + 1,
        e.len(),
        a.len()
    );
    for (i, line) in e.iter().enumerate().skip(from).take(8) {
        out.push_str(&format!("- {:4} {line}\n", i + 1));
    }
    for (i, line) in a.iter().enumerate().skip(from).take(8) {
        out.push_str(&format!("+ {:4} {line}\n", i + 1));
    }
    out
}
