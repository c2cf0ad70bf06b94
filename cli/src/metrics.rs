//! `ckptstore metrics`: the journal's figures in Prometheus' text format on
//! stdout (the `Metrics` document with `--json`), or written atomically for
//! node_exporter's textfile collector (`--textfile PATH`): a temporary file
//! in PATH's folder (a name the collector ignores: it reads `*.prom`), the
//! text, mode 0644, fsync, rename over PATH, fsync of the folder. A reader
//! sees the old file or the new one, never half of one.

use std::fs::{File, Permissions};
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
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
            format!("cannot write the metrics to {}: {what}: {e}", path.display()),
            "check that the folder exists and is writable and that the path is a file's \
             (node_exporter reads *.prom files in --collector.textfile.directory); nothing was changed",
        )
    };
    let name = path
        .file_name()
        .ok_or_else(|| fail("the path", &"names no file"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if path.is_dir() {
        return Err(fail("the path", &"is a directory").into());
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(|e| fail("a temporary file in its folder", &e))?;
    tmp.write_all(metrics.to_prometheus().as_bytes())
        .map_err(|e| fail("write", &e))?;
    tmp.as_file()
        .set_permissions(Permissions::from_mode(0o644))
        .map_err(|e| fail("chmod", &e))?;
    tmp.as_file().sync_all().map_err(|e| fail("fsync", &e))?;
    tmp.persist(path).map_err(|e| fail("rename", &e.error))?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail("fsync of its folder", &e))?;
    Ok(())
}
