//! A real backup client next to ckptstore: virtnbdbackup 1.9.15 (Debian
//! 12's, installed by `tests/support/virtnbdbackup.sh`) making full and
//! incremental backups of a running TCG domain with two qcow2 disks through
//! libvirt checkpoints and persistent bitmaps, and virtnbdrestore putting
//! them back for `qemu-img compare`.
//!
//! What the harness does, and why:
//! - Data goes into a disk through QEMU's block layer (`qemu-io` over the
//!   HMP monitor), so the bitmaps record it: the domain sits in its firmware
//!   and writes nothing itself. Every write is 1 MiB at a 1 MiB slot of its
//!   own with a pattern of its own, so each backup's size is known exactly
//!   and each restored image can be checked for every write ever made.
//! - virtnbdbackup keeps copies of its checkpoints (`-C DIR/*.xml`) and
//!   redefines lost ones itself. Each backup gets a fresh, empty copy
//!   folder, removed afterwards: libvirt's metadata is only what libvirt
//!   (and ckptstore) hold, as on a host that lost those copies.
//! - NBD traffic stays on this machine: virtnbdbackup and virtnbdrestore
//!   use a unix socket (`-f`) in the scenario's folder, never TCP.
//! - A running QEMU caches qcow2 metadata: reading its image from outside
//!   (`qemu-img -U`) sees stale tables. Comparisons pause the domain and
//!   flush each disk through the monitor first.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ckptstore::{CheckpointDef, LibvirtBackend};
use virt::connect::Connect;
use virt::sys;

use crate::rel;
use crate::support::{self, TestDomain};

/// The prefix of virtnbdbackup's checkpoint names: `virtnbdbackup.0`, ...
pub const PREFIX: &str = "virtnbdbackup";
/// Disks per domain.
pub const DISKS: usize = 2;
/// Bytes of one write (a multiple of the bitmaps' 64 KiB granularity).
const WRITE: u64 = 1 << 20;
/// Slots of [`WRITE`] bytes on a 64 MiB disk (`support::create_image`).
const SLOTS: u64 = 64;

static SCENARIOS: AtomicU64 = AtomicU64::new(0);
static BACKUPS: AtomicU64 = AtomicU64::new(0);
static RESTORES: AtomicU64 = AtomicU64::new(0);
static COMPARED: AtomicU64 = AtomicU64::new(0);
static MILLIS: AtomicU64 = AtomicU64::new(0);
static DELETED: AtomicU64 = AtomicU64::new(0);
static RECREATED: AtomicU64 = AtomicU64::new(0);

/// A checkpoint name of virtnbdbackup's.
pub fn ckpt(n: usize) -> String {
    format!("{PREFIX}.{n}")
}

/// The level of a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// A new chain: virtnbdbackup deletes every checkpoint of its own (for
    /// real, bitmaps included) and makes `virtnbdbackup.0`.
    Full,
    /// The next checkpoint of the chain, from the last one the backup
    /// folder names.
    Inc,
}

/// One write made through the monitor.
#[derive(Debug, Clone, Copy)]
struct Write {
    disk: usize,
    pattern: u8,
    offset: u64,
}

/// A running TCG domain with two 64 MiB qcow2 disks, a folder for its
/// backups, and what was written into it.
pub struct Vm {
    /// The domain and its images (destroyed, undefined and removed on drop).
    pub dom: TestDomain,
    conn: Connect,
    backend: LibvirtBackend,
    /// Its XML (with its UUID), to re-create it when it is transient.
    xml: String,
    transient: bool,
    work: tempfile::TempDir,
    writes: Vec<Write>,
    /// Bytes written into each disk since the last backup.
    dirty: [u64; DISKS],
    next_slot: [u64; DISKS],
    /// The current backup folder (one chain) and its number.
    set: Option<PathBuf>,
    sets: usize,
    /// Checkpoints in the current backup folder.
    chain: Vec<String>,
    restores: usize,
    backups: u64,
    compared: u64,
    started: Instant,
}

impl Vm {
    /// Define and start a domain; a transient one is made by undefining the
    /// running domain before it has any checkpoint.
    pub fn start(tag: &str, transient: bool) -> Vm {
        let conn = support::system();
        let dom = TestDomain::define(&conn, tag, DISKS);
        let xml = dom
            .domain()
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
            .expect("domain XML");
        dom.start();
        if transient {
            dom.domain()
                .undefine()
                .expect("undefine the running domain");
            assert!(!dom.domain().is_persistent().unwrap());
        }
        let live = dom.domain().xml_desc(0).unwrap();
        for i in 0..DISKS {
            assert!(
                live.contains(&format!("<alias name='virtio-disk{i}'/>")),
                "disk {i} of {} has no alias virtio-disk{i}: {live}",
                dom.name
            );
        }
        let work = tempfile::Builder::new()
            .prefix("vnb-")
            .tempdir()
            .expect("temp dir");
        Vm {
            dom,
            conn,
            backend: LibvirtBackend::connect(support::SYSTEM_URI).expect("libvirt"),
            xml,
            transient,
            work,
            writes: Vec::new(),
            dirty: [0; DISKS],
            next_slot: [1; DISKS],
            set: None,
            sets: 0,
            chain: Vec::new(),
            restores: 0,
            backups: 0,
            compared: 0,
            started: Instant::now(),
        }
    }

    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.dom.name
    }

    /// A folder for this scenario's files.
    pub fn work(&self) -> &Path {
        self.work.path()
    }

    /// Run an HMP command; its reply must be empty (HMP reports errors as
    /// text with exit status 0).
    fn hmp(&self, cmd: &str) {
        let out = run(Command::new("virsh")
            .args(["-c", support::SYSTEM_URI, "qemu-monitor-command"])
            .arg(self.name())
            .arg("--hmp")
            .arg(cmd));
        let reply = String::from_utf8_lossy(&out.stdout);
        assert!(
            reply.trim().is_empty(),
            "HMP `{cmd}` on {}: {reply}",
            self.name()
        );
    }

    fn qemu_io(&self, disk: usize, cmd: &str) {
        self.hmp(&format!(
            "qemu-io -d /machine/peripheral/virtio-disk{disk}/virtio-backend \"{cmd}\""
        ));
    }

    /// Write 1 MiB of a new pattern into each disk, at a slot not written
    /// before, through QEMU's block layer (the bitmaps record it).
    pub fn write_each_disk(&mut self) {
        for disk in 0..DISKS {
            let slot = self.next_slot[disk];
            assert!(slot < SLOTS, "disk {disk} is full of test writes");
            self.next_slot[disk] += 1;
            let pattern = 0x20 + (self.writes.len() % 0xd0) as u8;
            let offset = slot * WRITE;
            self.qemu_io(disk, &format!("write -P {pattern:#x} {offset} {WRITE}"));
            self.writes.push(Write {
                disk,
                pattern,
                offset,
            });
            self.dirty[disk] += WRITE;
        }
    }

    /// libvirt's checkpoints of the domain, parents first.
    pub fn checkpoints(&self) -> Vec<CheckpointDef> {
        rel::list(&self.backend, self.name())
    }

    /// libvirt's checkpoint names, parents first.
    pub fn names(&self) -> Vec<String> {
        self.checkpoints().into_iter().map(|d| d.name).collect()
    }

    /// One checkpoint as libvirt has it.
    pub fn checkpoint(&self, name: &str) -> CheckpointDef {
        self.checkpoints()
            .into_iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("{}: no checkpoint {name} in libvirt", self.name()))
    }

    /// The parent libvirt gives a checkpoint.
    pub fn parent(&self, name: &str) -> Option<String> {
        self.checkpoint(name).parent
    }

    /// The persistent bitmaps QEMU holds for disk `disk`'s image.
    pub fn bitmaps(&self, disk: usize) -> Vec<String> {
        let out = run(Command::new("virsh")
            .args(["-c", support::SYSTEM_URI, "qemu-monitor-command"])
            .arg(self.name())
            .arg(r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#));
        let reply: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("QMP reply is JSON");
        let image = self.dom.images[disk].display().to_string();
        let node = reply["return"]
            .as_array()
            .expect("QMP return list")
            .iter()
            .find(|n| n["drv"] == "qcow2" && n["file"] == image.as_str())
            .unwrap_or_else(|| panic!("no qcow2 node for {image}"));
        let mut names: Vec<String> = node["dirty-bitmaps"]
            .as_array()
            .map(|b| {
                b.iter()
                    .filter(|b| b["persistent"] == true)
                    .map(|b| b["name"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// A backup with virtnbdbackup, which must succeed: a full one into a
    /// new folder, an incremental one into the current folder. Checks the
    /// checkpoint it made and the size of each disk's data (a full holds
    /// every write made so far, an incremental exactly those since the
    /// last backup). Returns the new checkpoint's name.
    pub fn backup(&mut self, level: Level) -> String {
        let set = match level {
            Level::Full => {
                self.sets += 1;
                self.chain.clear();
                let set = self.work().join(format!("backup-{}", self.sets));
                self.set = Some(set.clone());
                set
            }
            Level::Inc => self.set.clone().expect("a full backup first"),
        };
        let name = ckpt(self.chain.len());
        // An empty folder for its checkpoint copies: it cannot repair
        // libvirt's metadata itself.
        let copies = self.work().join(format!("copies-{}", self.backups));
        let scratch = self.work().join("scratch");
        std::fs::create_dir_all(&scratch).unwrap();
        let level_arg = match level {
            Level::Full => "full",
            Level::Inc => "inc",
        };
        let start = Instant::now();
        let out = Command::new("virtnbdbackup")
            .args(["-U", support::SYSTEM_URI, "-d"])
            .arg(self.name())
            .args(["-l", level_arg, "-o"])
            .arg(&set)
            .arg("-C")
            .arg(&copies)
            .arg("-S")
            .arg(&scratch)
            .arg("-f")
            .arg(self.work().join("nbd.sock"))
            .arg("-n")
            .output()
            .expect("run virtnbdbackup (tests/support/virtnbdbackup.sh installs it)");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{}: virtnbdbackup -l {level_arg} (checkpoint {name}) failed with {}: {}",
            self.name(),
            out.status,
            errors(&log)
        );
        // It saved a copy of the new checkpoint: removed, as lost.
        assert!(
            copies.join(format!("{name}.xml")).is_file(),
            "virtnbdbackup saved no copy of {name}"
        );
        std::fs::remove_dir_all(&copies).unwrap();
        // It ends by aborting libvirt's backup job, which ends (and removes
        // its scratch files) a moment later; a next backup started before
        // that would meet "an active backup operation".
        self.wait_no_job();
        assert_eq!(
            std::fs::read_dir(&scratch).unwrap().count(),
            0,
            "virtnbdbackup left scratch files"
        );
        let listed: Vec<String> = serde_json::from_slice(
            &std::fs::read(set.join(format!("{}.cpt", self.name()))).unwrap(),
        )
        .unwrap();
        let parent = self.chain.last().cloned();
        self.chain.push(name.clone());
        assert_eq!(listed, self.chain, "the backup folder's checkpoint list");
        for disk in 0..DISKS {
            let target = &self.dom.targets[disk];
            let file = match level {
                Level::Full => set.join(format!("{target}.full.data")),
                Level::Inc => set.join(format!("{target}.inc.{name}.data")),
            };
            let meta = stream_meta(&file);
            let want = match level {
                Level::Full => self.writes.iter().filter(|w| w.disk == disk).count() as u64 * WRITE,
                Level::Inc => self.dirty[disk],
            };
            assert_eq!(
                meta["dataSize"],
                want,
                "{}: {level_arg} backup {name} of {target} saved the wrong amount of data: {meta}",
                self.name()
            );
            assert_eq!(meta["checkpointName"], name.as_str());
            if level == Level::Inc {
                assert_eq!(meta["parentCheckpoint"], parent.as_deref().unwrap());
            }
        }
        self.dirty = [0; DISKS];
        self.backups += 1;
        eprintln!(
            "{}: {level_arg} backup {name} in {} ms",
            self.name(),
            start.elapsed().as_millis()
        );
        name
    }

    /// Wait until the domain runs no job (30 s at most).
    fn wait_no_job(&self) {
        let dom = self.dom.domain();
        let start = Instant::now();
        loop {
            let job = dom.job_info().expect("domain job info").r#type;
            if job == sys::VIR_DOMAIN_JOB_NONE as i32 {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{}: a job of type {job} still runs 30 s after the backup",
                self.name()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The next incremental backup must work, and libvirt must hang its
    /// checkpoint off `leaf`.
    pub fn next_backup_hangs_off(&mut self, leaf: &str) -> String {
        self.write_each_disk();
        let next = self.backup(Level::Inc);
        assert_eq!(
            self.parent(&next).as_deref(),
            Some(leaf),
            "{}: the parent of {next}",
            self.name()
        );
        next
    }

    /// Restore the current backup folder with virtnbdrestore, check every
    /// write in each restored disk, and `qemu-img compare` each with the
    /// live disk (paused, its caches flushed).
    pub fn restore_and_compare(&mut self) {
        let set = self.set.clone().expect("a backup first");
        self.restores += 1;
        let out_dir = self.work().join(format!("restore-{}", self.restores));
        run(Command::new("virtnbdrestore")
            .arg("-i")
            .arg(&set)
            .arg("-o")
            .arg(&out_dir)
            .arg("-n")
            .arg("-f")
            .arg(self.work().join("restore.sock"))
            .arg("-L")
            .arg(self.work().join(format!("restore-{}.log", self.restores))));
        let restored: Vec<PathBuf> = self
            .dom
            .images
            .iter()
            .map(|img| out_dir.join(img.file_name().unwrap()))
            .collect();
        for (disk, image) in restored.iter().enumerate() {
            let mut cmd = Command::new("qemu-io");
            cmd.args(["-r", "-f", "qcow2"]);
            let mine: Vec<&Write> = self.writes.iter().filter(|w| w.disk == disk).collect();
            for w in &mine {
                cmd.arg("-c")
                    .arg(format!("read -P {:#x} {} {WRITE}", w.pattern, w.offset));
            }
            let out = run(cmd.arg(image));
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                !text.contains("verification failed")
                    && text.matches(&format!("read {WRITE}/{WRITE} bytes")).count() == mine.len(),
                "{}: restored {} lacks a write: {text}",
                self.name(),
                image.display()
            );
        }
        let dom = self.dom.domain();
        dom.suspend().expect("pause the domain");
        let resume = Resume(dom);
        for disk in 0..DISKS {
            self.qemu_io(disk, "flush");
        }
        for (live, image) in self.dom.images.iter().zip(&restored) {
            let out = Command::new("qemu-img")
                .args(["compare", "-U", "-f", "qcow2", "-F", "qcow2"])
                .arg(image)
                .arg(live)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: restored {} differs from the disk: {}{}",
                self.name(),
                image.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            self.compared += 1;
        }
        drop(resume);
        std::fs::remove_dir_all(&out_dir).unwrap();
    }

    /// Lose libvirt's checkpoint metadata: `virsh checkpoint-delete
    /// --metadata` of each, leaf first. The bitmaps stay in the images.
    pub fn delete_metadata(&self) {
        let before = self.names();
        for name in before.iter().rev() {
            run(Command::new("virsh")
                .args(["-c", support::SYSTEM_URI, "checkpoint-delete"])
                .arg(self.name())
                .arg(name)
                .arg("--metadata"));
        }
        self.assert_lost(&before);
        DELETED.fetch_add(1, Ordering::SeqCst);
    }

    /// Stop the persistent domain (QEMU writes the bitmaps it holds into
    /// the images as it closes them), run `f`, and start it again.
    pub fn while_stopped<T>(&self, f: impl FnOnce() -> T) -> T {
        assert!(!self.transient, "a transient domain stopped is gone");
        self.dom.domain().destroy().expect("destroy");
        let out = f();
        self.dom.domain().create().expect("start the domain again");
        out
    }

    /// Lose libvirt's checkpoint metadata the other way: destroy the
    /// transient domain (libvirt forgets it and its checkpoints) and
    /// create it again from its XML.
    pub fn recreate(&self) {
        assert!(self.transient, "only a transient domain loses its metadata");
        let before = self.names();
        self.dom.domain().destroy().expect("destroy");
        let gone = self.conn.lookup_domain_by_name(self.name());
        assert!(gone.is_err(), "the transient domain outlived destroy");
        self.conn
            .create_domain_xml(&self.xml, 0)
            .expect("re-create the transient domain");
        self.assert_lost(&before);
        RECREATED.fetch_add(1, Ordering::SeqCst);
    }

    fn assert_lost(&self, before: &[String]) {
        assert!(!before.is_empty(), "no checkpoint to lose");
        assert_eq!(self.names(), Vec::<String>::new(), "metadata still there");
        for disk in 0..DISKS {
            let bitmaps = self.bitmaps(disk);
            for name in before {
                assert!(
                    bitmaps.contains(name),
                    "bitmap {name} of disk {disk} went with the metadata: {bitmaps:?}"
                );
            }
        }
    }

    /// Does libvirt accept each checkpoint again, as it stores it, with
    /// `REDEFINE_VALIDATE` (its bitmap present and consistent on every
    /// disk)? Parents first, so the current checkpoint ends at the leaf.
    /// Returns the refused ones with libvirt's message.
    pub fn failing_validation(&self) -> Vec<(String, String)> {
        let mut refused = Vec::new();
        for name in self.names() {
            let xml = run(Command::new("virsh")
                .args(["-c", support::SYSTEM_URI, "checkpoint-dumpxml"])
                .arg(self.name())
                .arg(&name))
            .stdout;
            let file = self.work().join("validate.xml");
            std::fs::write(&file, xml).unwrap();
            let out = Command::new("virsh")
                .args(["-c", support::SYSTEM_URI, "checkpoint-create"])
                .arg(self.name())
                .arg(&file)
                .args(["--redefine", "--redefine-validate"])
                .output()
                .unwrap();
            if !out.status.success() {
                refused.push((
                    name,
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ));
            }
        }
        refused
    }

    /// Count what this scenario ran and print it, with the totals of the
    /// scenarios of this process so far.
    pub fn report(&self, scenario: &str) {
        let ms = self.started.elapsed().as_millis() as u64;
        let n = SCENARIOS.fetch_add(1, Ordering::SeqCst) + 1;
        let b = BACKUPS.fetch_add(self.backups, Ordering::SeqCst) + self.backups;
        let r = RESTORES.fetch_add(self.restores as u64, Ordering::SeqCst) + self.restores as u64;
        let c = COMPARED.fetch_add(self.compared, Ordering::SeqCst) + self.compared;
        let t = MILLIS.fetch_add(ms, Ordering::SeqCst) + ms;
        println!(
            "backup_client: {scenario}: {} backups, {} restores, {} disks compared, {:.1} s",
            self.backups,
            self.restores,
            self.compared,
            ms as f64 / 1000.0
        );
        println!(
            "backup_client: so far {n} scenarios, {b} backups, {r} restores, {c} disks compared (qemu-img compare identical), metadata lost by deletes {} and by re-creating {}, {:.1} s of scenarios",
            DELETED.load(Ordering::SeqCst),
            RECREATED.load(Ordering::SeqCst),
            t as f64 / 1000.0
        );
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.transient {
            if let Ok(dom) = self.conn.lookup_domain_by_name(&self.dom.name) {
                let _ = dom.destroy();
            }
            // A backup job writes a transient domain's configuration into
            // libvirt's config folder (libvirt 11.3), and the next daemon
            // start brings it back as a persistent domain. Define it, so
            // that TestDomain's undefine removes that file.
            if let Err(e) = self.conn.define_domain_xml(&self.xml) {
                eprintln!("cannot define {} to undefine it: {e}", self.dom.name);
            }
        }
    }
}

/// Resumes a paused domain whatever happens.
struct Resume(virt::domain::Domain);

impl Drop for Resume {
    fn drop(&mut self) {
        if let Err(e) = self.0.resume() {
            eprintln!("cannot resume the domain: {e}");
        }
    }
}

/// Run a command that must succeed.
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The ERROR and CRITICAL lines of a virtnbdbackup log, else its end.
fn errors(log: &str) -> String {
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains(" CRITICAL "))
        .collect();
    if bad.is_empty() {
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    } else {
        bad.join("\n")
    }
}

/// The metadata frame that opens a virtnbdbackup stream file:
/// `meta <start:16 hex> <length:16 hex>\r\n` and a JSON document.
fn stream_meta(file: &Path) -> serde_json::Value {
    use std::io::Read;
    let mut head = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(64 * 1024).read_to_end(&mut head))
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let bad = || panic!("{}: no meta frame at its start", file.display());
    let Some(eol) = head.windows(2).position(|w| w == b"\r\n") else {
        bad()
    };
    let line = String::from_utf8_lossy(&head[..eol]).into_owned();
    let fields: Vec<&str> = line.split(' ').collect();
    let [kind, _start, len] = fields[..] else {
        bad()
    };
    let Ok(len) = usize::from_str_radix(len, 16) else {
        bad()
    };
    if kind != "meta" || head.len() < eol + 2 + len {
        bad()
    }
    serde_json::from_slice(&head[eol + 2..eol + 2 + len]).unwrap()
}

/// `ckptstore --json ARGS...` against qemu:///system with journal `db`; the
/// exit code must be `want`.
pub fn ckptstore(db: &Path, args: &[&str], want: i32) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let what = format!("ckptstore {}", args.join(" "));
    rel::run_checked(db, &all).expect(want, &what).json()
}

/// Checkpoint names from a JSON list.
pub fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}
