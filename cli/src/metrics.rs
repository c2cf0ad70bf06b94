//! `ckptstore metrics`: the journal's figures in Prometheus' text format on
//! stdout (the `Metrics` document with `--json`), or written atomically for
//! node_exporter's textfile collector (`--textfile PATH`): a temporary file
//! in PATH's folder (a name the collector ignores: it reads `*.prom`), the
//! text, mode 0644, fsync, rename over PATH, fsync of the folder. A reader
//! sees the old file or the new one, never half of one.

use std::fs::{File, OpenOptions, Permissions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ckptstore::{ErrorKind, Metrics, Store};

use super::exit::Fail;
use super::output::Out;

/// Print the metrics, or write them to `textfile` (then only `--json`
/// prints, the document).
pub fn run(store: &Store, textfile: Option<&Path>, out: &Out) -> anyhow::Result<()> {
    let metrics = store.metrics()?;
    match textfile {
        None => out.emit(&metrics, || metrics.to_prometheus()),
        Some(path) => {
            write_textfile(path, &metrics)?;
            if out.json() {
                out.emit(&metrics, String::new)?;
            }
            Ok(())
        }
    }
}

/// Write the text atomically over `path` (see the module documentation).
fn write_textfile(path: &Path, metrics: &Metrics) -> anyhow::Result<()> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        Fail::of(
            ErrorKind::BadInput,
            format!("cannot write the metrics to {}: {what}{e}", path.display()),
            "check that the folder exists and is writable and that the path is a file's \
             (node_exporter reads *.prom files in --collector.textfile.directory); nothing was changed",
        )
    };
    let name = path
        .file_name()
        .ok_or_else(|| fail("", &"the path names no file"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if path.is_dir() {
        return Err(fail("", &"it is a directory").into());
    }
    let tmp = Temp(dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    )));
    let mut file = create_new(&tmp.0).map_err(|e| fail("a temporary file in its folder: ", &e))?;
    file.write_all(metrics.to_prometheus().as_bytes())
        .map_err(|e| fail("write: ", &e))?;
    file.set_permissions(Permissions::from_mode(0o644))
        .map_err(|e| fail("chmod: ", &e))?;
    file.sync_all().map_err(|e| fail("fsync: ", &e))?;
    drop(file);
    std::fs::rename(&tmp.0, path).map_err(|e| fail("rename: ", &e))?;
    std::mem::forget(tmp);
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail("fsync of its folder: ", &e))?;
    Ok(())
}

/// A new file, never an existing one (nor a symlink's target): one left by
/// a killed run with the same pid is removed first.
fn create_new(path: &Path) -> std::io::Result<File> {
    let open = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(path)
    };
    match open() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(path)?;
            open()
        }
        other => other,
    }
}

/// The temporary file, removed unless it was renamed.
struct Temp(PathBuf);

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
