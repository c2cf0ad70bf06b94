//! The daemon's checkpoint metadata files, read for libvirt's own crash
//! leftovers (`NAME.xml.new`, see [`Leftover`]).
//!
//! Only a local daemon's files can be read, and only when it is certain
//! they are the daemon's: the URI is `qemu:///system` at its default
//! socket; the qemu driver's lock file names a live `libvirtd` or
//! `virtqemud` that runs in this process's mount namespace; the folder is
//! readable (root); and it holds a file for every checkpoint libvirt lists.
//! Anything else is [`LeftoverScan::CannotCheck`] with the reason, never a
//! guess.

use std::collections::BTreeSet;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::uri::redact_uri;
use crate::backend::{Leftover, LeftoverScan, LEFTOVER_QUIET};
use crate::xml::parse_checkpoint;

/// Where the system daemon's qemu driver keeps checkpoint metadata, one
/// folder per domain name.
pub(super) const CHECKPOINT_DIR: &str = "/var/lib/libvirt/qemu/checkpoint";
/// The qemu driver's lock file: the pid of the daemon that runs the driver
/// (`libvirtd`, or `virtqemud` with modular daemons), written at its start.
const DRIVER_PID: &str = "/run/libvirt/qemu/driver.pid";
/// What `virFileRewrite` appends to the file it writes before the rename.
const SUFFIX: &str = ".xml.new";

/// The local daemon whose files this process can read.
#[derive(Debug)]
pub(super) struct Daemon {
    pid: u32,
    /// When its qemu driver started (the lock file's time).
    started: SystemTime,
}

/// Is `uri` the local system qemu daemon at its default socket?
fn is_local_system(uri: &str) -> bool {
    let (head, query) = uri.split_once('?').unwrap_or((uri, ""));
    let custom_socket = query.split('&').any(|p| p.starts_with("socket="));
    !custom_socket && matches!(head, "qemu:///system" | "qemu+unix:///system")
}

/// The daemon behind `uri`, when its files are readable from here;
/// otherwise why not.
pub(super) fn local_daemon(uri: &str) -> Result<Daemon, String> {
    if !is_local_system(uri) {
        return Err(format!(
            "{} is not the local qemu:///system daemon: its metadata files cannot be read from here",
            redact_uri(uri)
        ));
    }
    let text =
        fs::read_to_string(DRIVER_PID).map_err(|e| format!("cannot read {DRIVER_PID}: {e}"))?;
    let pid: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{DRIVER_PID} holds no pid"))?;
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(')')
        .is_none_or(|(_, rest)| matches!(rest.trim_start().chars().next(), Some('Z' | 'X')));
    if zombie || !matches!(comm.trim(), "libvirtd" | "virtqemud") {
        return Err(format!(
            "{DRIVER_PID} names pid {pid}, which is not a running libvirtd or virtqemud"
        ));
    }
    let ours = fs::read_link("/proc/self/ns/mnt")
        .map_err(|e| format!("cannot read this process's mount namespace: {e}"))?;
    let theirs = fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .map_err(|e| format!("cannot read the mount namespace of the daemon (pid {pid}): {e}"))?;
    if ours != theirs {
        return Err(format!(
            "the daemon (pid {pid}) runs in another mount namespace: the files seen here are not its own"
        ));
    }
    let started = fs::metadata(DRIVER_PID)
        .and_then(|m| m.modified())
        .map_err(|e| format!("cannot read the time of {DRIVER_PID}: {e}"))?;
    Ok(Daemon { pid, started })
}

/// A domain or checkpoint name usable as one path component.
fn component(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// The names of the files in the folder `dir`; `None` when there is no
/// folder and libvirt lists no checkpoint (libvirt makes the folder with
/// the domain's first checkpoint).
fn file_names(dir: &Path, listed: &[String]) -> Result<Option<BTreeSet<String>>, String> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound && listed.is_empty() => return Ok(None),
        Err(e) => return Err(cannot_read(dir, &e)),
    };
    entries
        .map(|e| {
            e.map(|e| e.file_name().to_string_lossy().into_owned())
                .map_err(|e| cannot_read(dir, &e))
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

/// The folder must be the one libvirt writes: a file for every checkpoint
/// it lists.
fn is_daemons_folder(
    dir: &Path,
    files: &BTreeSet<String>,
    listed: &[String],
) -> Result<(), String> {
    match listed.iter().find(|n| {
        !files.contains(&format!("{n}.xml")) && !files.contains(&format!("{n}{SUFFIX}"))
    }) {
        Some(missing) => Err(format!(
            "{} has no file for checkpoint {missing}, which libvirt lists: it is not the daemon's folder",
            dir.display()
        )),
        None => Ok(()),
    }
}

/// The checkpoint a file name is the leftover of (libvirt skips names that
/// start with a dot).
fn leftover_name(file: &str) -> Option<&str> {
    file.strip_suffix(SUFFIX)
        .filter(|n| !file.starts_with('.') && !n.is_empty())
}

fn cannot_read(path: &Path, e: &std::io::Error) -> String {
    format!("cannot read {}: {e}", path.display())
}

impl Daemon {
    /// Is a file last modified at `modified` certainly not being written by
    /// this daemon right now?
    fn stale(&self, modified: SystemTime) -> bool {
        modified < self.started
            || SystemTime::now()
                .duration_since(modified)
                .is_ok_and(|age| age >= LEFTOVER_QUIET)
    }

    /// The domain's folder of checkpoint files.
    fn folder(&self, domain: &str) -> Option<PathBuf> {
        component(domain).then(|| Path::new(CHECKPOINT_DIR).join(domain))
    }

    /// The leftovers among the checkpoint files of `domain` (libvirt's
    /// name for it), whose checkpoints libvirt lists as `listed`.
    pub(super) fn scan(&self, domain: &str, listed: &[String]) -> LeftoverScan {
        match self.leftovers(domain, listed) {
            Ok(found) => LeftoverScan::Checked(found),
            Err(why) => LeftoverScan::CannotCheck(why),
        }
    }

    /// [`Daemon::scan`], with the reason it cannot check as the error.
    fn leftovers(&self, domain: &str, listed: &[String]) -> Result<Vec<Leftover>, String> {
        let Some(dir) = self.folder(domain) else {
            return Err(format!("the domain name {domain:?} is not a folder name"));
        };
        let Some(files) = file_names(&dir, listed)? else {
            return Ok(Vec::new());
        };
        is_daemons_folder(&dir, &files, listed)?;
        let mut out = Vec::new();
        for file in &files {
            let Some(name) = leftover_name(file) else {
                continue;
            };
            out.extend(self.read_leftover(name, dir.join(file))?);
        }
        Ok(out)
    }

    /// The leftover of checkpoint `name` at `path`; `None` when it is not
    /// a plain file or is gone (renamed away since the folder was read).
    fn read_leftover(&self, name: &str, path: PathBuf) -> Result<Option<Leftover>, String> {
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(cannot_read(&path, &e)),
        };
        let text = match fs::read(&path) {
            Ok(bytes) => String::from_utf8(bytes).ok(),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(cannot_read(&path, &e)),
        };
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        Ok(Some(Leftover {
            checkpoint: name.to_string(),
            content: text.and_then(|t| parse_checkpoint(&t).ok()),
            stale: self.stale(modified),
            modified,
            path,
        }))
    }

    /// Remove a leftover of `domain` (libvirt's name) found by
    /// [`Daemon::scan`], if it is still the same file and stale. The caller
    /// has checked that libvirt does not list its checkpoint.
    pub(super) fn remove(&self, domain: &str, l: &Leftover) -> Result<(), String> {
        let path = self
            .folder(domain)
            .filter(|_| component(&l.checkpoint))
            .map(|d| d.join(format!("{}{SUFFIX}", l.checkpoint)));
        if path.as_deref() != Some(l.path.as_path()) {
            return Err(format!(
                "{} is not a leftover of domain {domain}'s checkpoints",
                l.path.display()
            ));
        }
        let meta = match fs::symlink_metadata(&l.path) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(cannot_read(&l.path, &e)),
        };
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if !meta.is_file() || modified != l.modified {
            return Err(format!(
                "{} changed since it was found: left alone",
                l.path.display()
            ));
        }
        if !self.stale(modified) {
            return Err(format!(
                "{} was written less than {} s ago by the running daemon (pid {}): left alone",
                l.path.display(),
                LEFTOVER_QUIET.as_secs(),
                self.pid
            ));
        }
        match fs::remove_file(&l.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot remove {}: {e}", l.path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_local_system_daemon_at_its_default_socket() {
        assert!(is_local_system("qemu:///system"));
        assert!(is_local_system("qemu+unix:///system"));
        assert!(is_local_system("qemu:///system?no_verify=1"));
        for uri in [
            "qemu:///session",
            "qemu+ssh://host/system",
            "qemu://host/system",
            "qemu+tcp:///system",
            "qemu+unix:///system?socket=/tmp/other.sock",
            "test:///default",
            "",
        ] {
            assert!(!is_local_system(uri), "{uri}");
        }
        let e = local_daemon("qemu+ssh://root:hunter2@host/system").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn names_that_are_not_one_path_component_are_refused() {
        assert!(component("vm1") && component("c.1"));
        for bad in ["", ".", "..", "a/b", "/etc", "a\0b"] {
            assert!(!component(bad), "{bad:?}");
        }
    }
}
