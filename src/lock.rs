//! Per-domain kernel locks: who is working on a domain right now.
//!
//! A writer (a `sync`, a recovery, an import, a validation that redefines)
//! holds an exclusive `flock(2)` on the domain's lock file, in a folder
//! beside the journal (`journal.db.locks/`), from before it first reads
//! libvirt until its transaction is finished. The kernel releases the lock
//! when the holder closes it or dies, however it dies, so:
//!
//! - two writers of one domain exclude each other, whether they are threads
//!   of one process (each lock is its own open file description) or
//!   processes in different pid namespaces (containers) that share the
//!   journal's folder;
//! - a held lock proves a live owner, where a pid, read through another
//!   namespace's `/proc`, proves nothing.
//!
//! Liveness is probed by taking the lock shared for an instant; a writer
//! that meets a probe retries for [`ACQUIRE_PATIENCE`] before it answers
//! busy. A forked child that does not `exec` shares its parent's locks
//! (the files are opened close-on-exec).

use std::fs::{DirBuilder, File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a writer retries a lock that is held for a moment (a liveness
/// probe) before it answers busy.
pub const ACQUIRE_PATIENCE: Duration = Duration::from_millis(200);

/// The lock folder of one journal.
#[derive(Debug, Clone)]
pub(crate) struct Locks {
    dir: PathBuf,
}

/// An exclusive lock on one domain; released when dropped (or when the
/// process dies).
#[derive(Debug)]
pub(crate) struct DomainLock {
    _file: File,
}

impl Locks {
    /// The lock folder of the journal at `journal` (not created yet).
    pub(crate) fn beside(journal: &Path) -> Locks {
        let mut dir = journal.as_os_str().to_owned();
        dir.push(".locks");
        Locks { dir: dir.into() }
    }

    fn file(&self, domain: &str) -> PathBuf {
        self.dir.join(file_name(domain))
    }

    /// Take the domain's lock, waiting at most [`ACQUIRE_PATIENCE`] for a
    /// probe to let go. `Ok(None)`: a live writer holds it.
    pub(crate) fn try_lock(&self, domain: &str) -> io::Result<Option<DomainLock>> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.file(domain))?;
        let started = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Some(DomainLock { _file: file })),
                Err(TryLockError::WouldBlock) if started.elapsed() < ACQUIRE_PATIENCE => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(TryLockError::WouldBlock) => return Ok(None),
                Err(TryLockError::Error(e)) => return Err(e),
            }
        }
    }

    /// Does a live writer hold the domain's lock right now? Never blocks;
    /// a lock file that does not exist (or cannot be opened) is not held.
    pub(crate) fn is_held(&self, domain: &str) -> bool {
        let Ok(file) = File::open(self.file(domain)) else {
            return false;
        };
        match file.try_lock_shared() {
            Ok(()) => {
                let _ = file.unlock();
                false
            }
            Err(TryLockError::WouldBlock) => true,
            Err(TryLockError::Error(_)) => false,
        }
    }
}

/// The lock file's name for a domain key: the key itself when it is short
/// and made of plain characters, otherwise a stable hash of its bytes (the
/// same in every build, so that processes of different versions agree).
fn file_name(domain: &str) -> String {
    let plain = !domain.is_empty()
        && domain.len() <= 128
        && !domain.starts_with('.')
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if plain {
        format!("{domain}.lock")
    } else {
        format!(
            "h-{:016x}{:016x}.lock",
            fnv1a(domain.as_bytes(), 0xcbf2_9ce4_8422_2325),
            fnv1a(domain.as_bytes(), 0x6c62_272e_07bb_0142)
        )
    }
}

/// 64-bit FNV-1a from a given offset basis.
fn fnv1a(bytes: &[u8], basis: u64) -> u64 {
    bytes.iter().fold(basis, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_per_domain_even_within_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let locks = Locks::beside(&dir.path().join("j.db"));
        assert!(!locks.is_held("vm"));
        let held = locks.try_lock("vm").unwrap().expect("free");
        assert!(locks.is_held("vm"));
        assert!(
            locks.try_lock("vm").unwrap().is_none(),
            "held by another open"
        );
        assert!(locks.try_lock("other").unwrap().is_some());
        drop(held);
        assert!(!locks.is_held("vm"));
        assert!(locks.try_lock("vm").unwrap().is_some());
    }

    #[test]
    fn names_are_plain_or_a_stable_hash() {
        assert_eq!(file_name("fedora-1.x"), "fedora-1.x.lock");
        assert_eq!(
            file_name("93a5c045-6457-2c09-e56c-927cdf34e178"),
            "93a5c045-6457-2c09-e56c-927cdf34e178.lock"
        );
        for odd in [".hidden", "with space", "ünï", "a/b", &"x".repeat(200)] {
            let n = file_name(odd);
            assert!(n.starts_with("h-") && n.len() == 39, "{odd}: {n}");
        }
        assert_ne!(file_name("with space"), file_name("with  space"));
        // Fixed values: every build must name the same file.
        assert_eq!(fnv1a(b"", 0xcbf2_9ce4_8422_2325), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a", 0xcbf2_9ce4_8422_2325), 0xaf63_dc4c_8601_ec8c);
    }
}
