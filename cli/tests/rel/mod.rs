//! Shared pieces of the reliability tests of the real `ckptstore` binary
//! against the real daemon (`qemu:///system`): chains and pre-states,
//! running and killing the binary, putting a domain's checkpoints back into
//! a pre-state through the library, the invariant check after a recovery,
//! and a seeded random generator.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use chrono::DateTime;
use ckptstore::testing::render_checkpoint;
use ckptstore::testing::{plan, same_content, Step};
use ckptstore::{Backend, BackendErrorKind, Chain, Checkpoint, CheckpointDef, LibvirtBackend};
use uuid::Uuid;

use crate::support::SYSTEM_URI;

/// The binary under test (built with the test's cargo features).
pub const BIN: &str = env!("CARGO_BIN_EXE_ckptstore");

pub const VM_UUID: &str = "93a5c045-6457-2c09-e56c-927cdf34e178";

pub fn disk_id(i: usize) -> String {
    Uuid::from_u128(0xd15c_0000 + i as u128).to_string()
}

pub fn ckpt_id(i: usize) -> String {
    Uuid::from_u128(0xc4e0_0000 + i as u128).to_string()
}

/// A line of `n` hourly checkpoints of `domain` over disks with `targets`.
pub fn chain(domain: &str, n: usize, targets: &[&str]) -> Chain {
    Chain {
        scope: None,
        vm_id: Uuid::parse_str(VM_UUID).unwrap(),
        domain: Some(domain.to_string()),
        disks: targets
            .iter()
            .enumerate()
            .map(|(i, t)| (disk_id(i), t.to_string()))
            .collect(),
        checkpoints: (0..n)
            .map(|i| Checkpoint {
                id: ckpt_id(i),
                parent: i.checked_sub(1).map(ckpt_id),
                created: DateTime::from_timestamp(1_700_000_000 + i as i64 * 3600, 0).unwrap(),
                description: Some(format!("backup {i}")),
                disks: (0..targets.len()).map(disk_id).collect(),
            })
            .collect(),
    }
}

/// The libvirt definitions of a chain, parent first.
pub fn defs(c: &Chain) -> Vec<CheckpointDef> {
    c.clone().validate().unwrap().defs()
}

/// Write `c` as JSON into `dir/name`; returns the path as a string.
pub fn write_chain(dir: &Path, name: &str, c: &Chain) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec(c).unwrap()).unwrap();
    path.display().to_string()
}

/// What libvirt holds for a domain before a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pre {
    /// No checkpoint at all.
    Empty,
    /// The first half of the target.
    Prefix,
    /// Every checkpoint of the target, every fourth with other content.
    Conflicting,
    /// The first half of the target plus a branch of checkpoints the
    /// target does not have.
    Extra,
}

pub const PRES: [Pre; 4] = [Pre::Empty, Pre::Prefix, Pre::Conflicting, Pre::Extra];

/// The pre-state `pre` of `target` (a linear chain of at least 4).
pub fn pre_state(pre: Pre, target: &[CheckpointDef]) -> Vec<CheckpointDef> {
    let n = target.len();
    match pre {
        Pre::Empty => Vec::new(),
        Pre::Prefix => target[..n.div_ceil(2)].to_vec(),
        Pre::Conflicting => {
            let mut v = target.to_vec();
            for d in v.iter_mut().skip(1).step_by(4) {
                d.creation_time += 1;
                d.description = Some("stale <definition> & ]]>".into());
            }
            v
        }
        Pre::Extra => {
            let mut v = target[..n.div_ceil(2)].to_vec();
            let fork = v[1.min(v.len() - 1)].name.clone();
            let extras = (n / 10).max(2);
            for i in 0..extras {
                let name = format!("extra-{i}");
                let parent = if i == 0 {
                    fork.clone()
                } else {
                    format!("extra-{}", i - 1)
                };
                let mut d = v[0].clone();
                d.name.clone_from(&name);
                d.parent = Some(parent);
                d.creation_time = 1_800_000_000 + i as i64;
                d.description = None;
                d.disks = d
                    .disks
                    .keys()
                    .map(|t| (t.clone(), name.clone()))
                    .collect::<BTreeMap<_, _>>();
                v.push(d);
            }
            v
        }
    }
}

/// A libvirt call that may meet a daemon being restarted: retried for up
/// to 60 s while libvirt is unreachable or the connection was lost.
pub fn retry<T>(what: &str, mut f: impl FnMut() -> Result<T, ckptstore::BackendError>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(e)
                if matches!(
                    e.kind,
                    BackendErrorKind::Unreachable | BackendErrorKind::ConnectionLost
                ) && start.elapsed() < Duration::from_secs(60) =>
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("{what}: {e:?}"),
        }
    }
}

/// The domain's checkpoints as libvirt has them.
pub fn list(backend: &LibvirtBackend, domain: &str) -> Vec<CheckpointDef> {
    retry("list", || backend.list(domain))
}

/// Put the domain's checkpoints into exactly `pre` through the library
/// (deletes are metadata only and cost ~1 ms; a redefine ~30 ms).
/// Returns the number of libvirt calls made.
pub fn reset(backend: &LibvirtBackend, domain: &str, pre: &[CheckpointDef]) -> usize {
    let current = list(backend, domain);
    let p = plan(&current, pre);
    for step in &p.steps {
        match step {
            Step::Delete { before } => {
                retry("delete", || match backend.delete(domain, &before.name) {
                    Err(e) if e.kind == BackendErrorKind::NoCheckpoint => Ok(()),
                    r => r,
                });
            }
            Step::Redefine { def, .. } => retry("redefine", || {
                backend.redefine(domain, &render_checkpoint(def), false)
            }),
        }
    }
    let now = list(backend, domain);
    assert!(
        same_content(&now, pre),
        "reset of {domain} failed: {now:#?}"
    );
    p.steps.len()
}

/// One finished run of the binary.
#[derive(Debug)]
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Out {
    /// The exit code; `None` when a signal ended the process.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The signal that ended the process, if any.
    pub fn signal(&self) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        self.status.signal()
    }

    /// stdout as the one JSON document of `--json`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// The exit code, or a panic with the whole output when it is not `want`.
    pub fn expect(self, want: i32, what: &str) -> Out {
        assert_eq!(self.code(), Some(want), "{what}: {self:#?}");
        self
    }
}

/// `ckptstore --db DB --connect qemu:///system ARGS...`, not yet started,
/// with the bitmap check off (`CKPTSTORE_BITMAPS=ignore`): these tests
/// drive the metadata loop over blank images, where a redefine on a
/// shut-off domain never looks at the bitmaps. [`command_checked`] keeps
/// the command's default.
pub fn command(db: &Path, args: &[&str]) -> Command {
    let mut cmd = command_checked(db, args);
    cmd.env("CKPTSTORE_BITMAPS", "ignore");
    cmd
}

/// `ckptstore --db DB --connect qemu:///system ARGS...` with the command's
/// own bitmap policy (`degrade` unless ARGS say otherwise).
pub fn command_checked(db: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--db")
        .arg(db)
        .args(["--connect", SYSTEM_URI])
        .args(args);
    cmd.env_remove("FAILPOINTS")
        .env_remove("RUST_LOG")
        .env_remove("CKPTSTORE_DB")
        .env_remove("CKPTSTORE_BITMAPS")
        .env_remove("LIBVIRT_DEFAULT_URI");
    // An abort (failpoints builds) may leave a core file: not in the tree.
    cmd.current_dir(
        db.ancestors()
            .skip(1)
            .find(|d| d.is_dir())
            .unwrap_or(Path::new("/")),
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Run `cmd` to its end.
pub fn run_cmd(mut cmd: Command) -> Out {
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    finish(&mut child, start)
}

/// Run `ckptstore --db DB --connect qemu:///system ARGS...` to its end.
pub fn run(db: &Path, args: &[&str]) -> Out {
    run_cmd(command(db, args))
}

/// As [`run`], with the command's own bitmap policy.
pub fn run_checked(db: &Path, args: &[&str]) -> Out {
    run_cmd(command_checked(db, args))
}

/// A running `ckptstore`.
pub struct Running {
    pub child: Child,
    pub started: Instant,
}

impl Running {
    pub fn spawn(mut cmd: Command) -> Running {
        let started = Instant::now();
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        Running { child, started }
    }

    /// SIGKILL it (by its pid, through the child handle) at `at` after its
    /// start, unless it has ended by then; then collect its output.
    pub fn kill_at(mut self, at: Duration) -> (Out, bool) {
        let deadline = self.started + at;
        let mut killed = false;
        loop {
            if self.child.try_wait().unwrap().is_some() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                killed = self.child.kill().is_ok();
                break;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(2)));
        }
        let out = finish(&mut self.child, self.started);
        // A kill that raced with the end of the process did nothing.
        let killed = killed && out.signal() == Some(9);
        (out, killed)
    }

    /// Has it ended? (It is not reaped: [`Running::wait`] still collects it.)
    pub fn ended(&self) -> bool {
        let pid = self.child.id();
        // A zombie has ended too.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(_) => true,
        }
    }

    /// Wait for the end.
    pub fn wait(mut self) -> Out {
        finish(&mut self.child, self.started)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Never leave a child behind when a test fails (by its handle).
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn finish(child: &mut Child, start: Instant) -> Out {
    let mut stdout = String::new();
    let mut stderr = String::new();
    // Outputs are small: read them after the end.
    let status = child.wait().unwrap();
    let elapsed = start.elapsed();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut stdout).unwrap();
    }
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr).unwrap();
    }
    Out {
        status,
        stdout,
        stderr,
        elapsed,
    }
}

/// `PRAGMA integrity_check` of the journal, from a connection of its own.
pub fn integrity(db: &Path) -> String {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(30)).unwrap();
    let rows: Vec<String> = c
        .prepare("PRAGMA integrity_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    rows.join("; ")
}

/// Where libvirt ended after a recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Landed {
    /// Exactly the transaction's target.
    Target,
    /// Exactly the before-image.
    Before,
}

/// The invariant: libvirt's checkpoints equal the target or the exact
/// before-image (by content), `status` shows nothing incomplete for the
/// domain, and the journal passes `PRAGMA integrity_check`.
pub fn check_invariant(
    backend: &LibvirtBackend,
    db: &Path,
    domain: &str,
    target: &[CheckpointDef],
    before: &[CheckpointDef],
    ctx: &str,
) -> Landed {
    let now = list(backend, domain);
    let landed = if same_content(&now, target) {
        Landed::Target
    } else if same_content(&now, before) {
        Landed::Before
    } else {
        let names: Vec<&str> = now.iter().map(|d| d.name.as_str()).collect();
        panic!(
            "{ctx}: PARTIAL STATE: libvirt has {} checkpoints, neither the target ({}) nor the before-image ({}): {names:?}",
            now.len(),
            target.len(),
            before.len()
        );
    };
    let status = run(db, &["status", "--domain", domain, "--json"])
        .expect(0, ctx)
        .json();
    assert_eq!(
        status["incomplete"],
        serde_json::json!([]),
        "{ctx}: status shows an incomplete transaction"
    );
    assert_eq!(integrity(db), "ok", "{ctx}: journal integrity");
    landed
}

/// The newest transaction of `domain` in the journal, from `history --json`.
pub fn last_txn(db: &Path, domain: &str) -> Option<serde_json::Value> {
    let h = run(
        db,
        &["history", "--domain", domain, "--limit", "1", "--json"],
    )
    .expect(0, "history")
    .json();
    h["transactions"]
        .as_array()
        .and_then(|t| t.first().cloned())
}
