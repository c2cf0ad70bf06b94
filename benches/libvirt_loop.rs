//! The whole redefine loop against the real daemon (`qemu:///system`), next
//! to what agents do today, both sides in the same run on the same daemon,
//! A/B order alternating between runs to cancel drift. Shut-off domains,
//! 4 qcow2 disks each; the journal lives on the real disk (`/var/tmp`).
//!
//! - S1 journal overhead: `Store::sync` into an empty domain vs the bare
//!   loop of the same redefine calls (same XML, rendered beforehand).
//! - S2 no-op re-sync: `Store::sync` when libvirt already matches vs
//!   redefining everything.
//! - S3 resume: a sync killed after its 180th of 200 steps, then `recover`,
//!   vs wipe-and-redo (vdsm/ovirt-engine) and lookup-and-skip
//!   (virtnbdbackup).
//! - S4 host restart: `Store::resync_many` of 32 domains × 25 checkpoints
//!   with 2 and 4 workers vs serially (1 worker).
//! - S5 validate: `ckptstore::validate` of 200 checkpoints × 4 disks
//!   (journal vs libvirt vs qcow2 bitmaps) reading the images in-process vs
//!   the same validation running `qemu-img info` per image.
//!
//! Run with `cargo bench --bench libvirt_loop` (as root, with
//! `bash tests/support/libvirt.sh start` done). Environment:
//! `CKPTSTORE_BENCH_RUNS` (default 7), `CKPTSTORE_BENCH_ONLY` (e.g. `S1,S3`),
//! `CKPTSTORE_BENCH_DIR` (journal folder, default `/var/tmp`).

#[path = "support/qemu_img_reader.rs"]
mod qemu_img_reader;
use testkit::support;

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::DateTime;
use ckptstore::testing::render_checkpoint;
use ckptstore::testing::same_content;
use ckptstore::testing::Hook;
use ckptstore::testing::{validate_with, DiskChain, ImageError, ImageReader, Qcow2Reader};
use ckptstore::DomainInfo;
use ckptstore::Owner;
use ckptstore::{
    Backend, BackendError, BackendErrorKind, Chain, Checkpoint, CheckpointDef, LibvirtBackend,
    Policy, Store,
};
use ckptstore::{Outcome, StoreOptions, SyncReport};
use qemu_img_reader::QemuImgReader;
use support::TestDomain;
use uuid::Uuid;

const DISKS: usize = 4;

// ---------------------------------------------------------------------------
// Counting every libvirt call, and the time spent in it.

#[derive(Clone, Copy)]
enum Op {
    List,
    Redefine,
    Delete,
    Info,
    Lookup,
}

/// Calls and nanoseconds per operation.
#[derive(Default)]
struct Tally {
    calls: [AtomicU64; 5],
    nanos: [AtomicU64; 5],
}

impl Tally {
    fn add(&self, op: Op, d: Duration) {
        self.calls[op as usize].fetch_add(1, Ordering::Relaxed);
        self.nanos[op as usize].fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    fn calls(&self, op: Op) -> u64 {
        self.calls[op as usize].load(Ordering::Relaxed)
    }

    fn total_calls(&self) -> u64 {
        self.calls.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn libvirt_time(&self) -> Duration {
        Duration::from_nanos(self.nanos.iter().map(|c| c.load(Ordering::Relaxed)).sum())
    }
}

/// A [`Backend`] that counts and times every call of the one it wraps.
struct Counted<'a> {
    inner: &'a LibvirtBackend,
    tally: Tally,
}

impl<'a> Counted<'a> {
    fn new(inner: &'a LibvirtBackend) -> Self {
        Counted {
            inner,
            tally: Tally::default(),
        }
    }

    fn timed<T>(&self, op: Op, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.tally.add(op, t.elapsed());
        r
    }

    /// Look one checkpoint up by name (what lookup-and-skip does).
    fn lookup(&self, domain: &str, name: &str) -> Result<CheckpointDef, BackendError> {
        self.timed(Op::Lookup, || self.inner.checkpoint(domain, name))
    }
}

impl Backend for Counted<'_> {
    fn list(&self, domain: &str) -> Result<Vec<CheckpointDef>, BackendError> {
        self.timed(Op::List, || self.inner.list(domain))
    }

    fn redefine(&self, domain: &str, xml: &str, validate: bool) -> Result<(), BackendError> {
        self.timed(Op::Redefine, || self.inner.redefine(domain, xml, validate))
    }

    fn delete(&self, domain: &str, name: &str) -> Result<(), BackendError> {
        self.timed(Op::Delete, || self.inner.delete(domain, name))
    }

    fn domain_info(&self, domain: &str) -> Result<DomainInfo, BackendError> {
        self.timed(Op::Info, || self.inner.domain_info(domain))
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

// ---------------------------------------------------------------------------
// CPU time of libvirtd, of this process and of the whole machine.

/// `/proc` counts CPU time in USER_HZ ticks, 100 per second on x86-64.
fn ticks_per_sec() -> f64 {
    100.0
}

fn proc_cpu(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime), counted from the state field (3).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// (busy, total) ticks summed over every CPU.
fn machine_cpu() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

fn libvirtd_pid() -> Option<String> {
    let dir = std::env::var("CKPTSTORE_LIBVIRT_DIR")
        .unwrap_or_else(|_| "/var/tmp/ckptstore-libvirtd".into());
    let pid = std::fs::read_to_string(Path::new(&dir).join("libvirtd.pid"))
        .ok()?
        .trim()
        .to_string();
    (std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()?
        .trim()
        == "libvirtd")
        .then_some(pid)
}

#[derive(Clone)]
struct Cpu {
    daemon_pid: Option<String>,
    daemon: Option<u64>,
    me: Option<u64>,
    machine: Option<(u64, u64)>,
}

fn cpu_now() -> Cpu {
    let daemon_pid = libvirtd_pid();
    Cpu {
        daemon: daemon_pid.as_deref().and_then(proc_cpu),
        daemon_pid,
        me: proc_cpu("self"),
        machine: machine_cpu(),
    }
}

// ---------------------------------------------------------------------------
// One measured run of one side.

#[derive(Clone, Default)]
struct Sample {
    wall: Duration,
    in_libvirt: Duration,
    redefine: u64,
    delete: u64,
    list: u64,
    other: u64,
    /// libvirtd CPU seconds during the run (every client's calls).
    daemon_cpu: Option<f64>,
    /// This process's CPU seconds.
    my_cpu: Option<f64>,
    /// Share of the machine's CPUs busy (all processes), 0..1.
    machine_busy: Option<f64>,
    /// CPUs used on average by every other process (other builds and test
    /// suites on this shared machine).
    others: Option<f64>,
    /// Did libvirt end where it should?
    correct: bool,
    /// The daemon was restarted during the run (other test suites on this
    /// machine restart it): the run does not count.
    restarted: bool,
}

/// Time `f` (which makes its calls through `b`), with CPU use.
fn measure(b: &Counted<'_>, f: impl FnOnce() -> bool) -> Sample {
    let c0 = cpu_now();
    let t = Instant::now();
    let correct = f();
    let wall = t.elapsed();
    let c1 = cpu_now();
    let secs = |a: Option<u64>, b: Option<u64>| Some(b?.checked_sub(a?)? as f64 / ticks_per_sec());
    let busy = match (c0.machine, c1.machine) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => Some((b1 - b0) as f64 / (t1 - t0) as f64),
        _ => None,
    };
    let (daemon_cpu, my_cpu) = (secs(c0.daemon, c1.daemon), secs(c0.me, c1.me));
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let others = match (busy, daemon_cpu, my_cpu) {
        (Some(b), Some(d), Some(m)) => {
            Some(((b * cpus * wall.as_secs_f64() - d - m) / wall.as_secs_f64()).max(0.0))
        }
        _ => None,
    };
    let t = &b.tally;
    Sample {
        wall,
        in_libvirt: t.libvirt_time(),
        redefine: t.calls(Op::Redefine),
        delete: t.calls(Op::Delete),
        list: t.calls(Op::List),
        other: t.total_calls() - t.calls(Op::Redefine) - t.calls(Op::Delete) - t.calls(Op::List),
        daemon_cpu,
        my_cpu,
        machine_busy: busy,
        others,
        correct,
        restarted: c0.daemon_pid.is_none() || c0.daemon_pid != c1.daemon_pid,
    }
}

/// Wait until `qemu:///system` answers again.
fn wait_for_daemon() {
    for _ in 0..240 {
        if virt::connect::Connect::open(Some(support::SYSTEM_URI)).is_ok()
            && libvirtd_pid().is_some()
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("libvirtd did not come back within 2 minutes");
}

/// Run `f` (set-up included); when it fails because the daemon went away
/// (other test suites on this machine restart it), wait for the daemon and
/// run it again.
fn retry<T>(mut f: impl FnMut() -> T) -> T {
    for attempt in 1.. {
        match catch_unwind(AssertUnwindSafe(&mut f)) {
            Ok(v) => return v,
            Err(p) if attempt < 5 && p.downcast_ref::<Crash>().is_none() => {
                eprintln!(
                    "failed ({}); waiting for libvirtd and running it again",
                    panic_text(&p)
                );
                wait_for_daemon();
            }
            Err(p) => std::panic::resume_unwind(p),
        }
    }
    unreachable!()
}

/// One measured run (set-up included), run again when the daemon failed or
/// was restarted under it.
fn steady(mut run: impl FnMut() -> Sample) -> Sample {
    for _ in 0..5 {
        let s = retry(&mut run);
        if !s.restarted {
            return s;
        }
        eprintln!("libvirtd was restarted during the run; running it again");
        wait_for_daemon();
    }
    panic!("libvirtd keeps restarting")
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(ToString::to_string))
        .unwrap_or_default()
}

/// The runs of one side of a comparison.
struct Side {
    label: String,
    runs: Vec<Sample>,
}

impl Side {
    fn new(label: impl Into<String>) -> Side {
        Side {
            label: label.into(),
            runs: Vec::new(),
        }
    }

    fn median_by(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        let mut v: Vec<f64> = self.runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
        }
    }

    fn ms(&self) -> f64 {
        self.median_by(|s| s.wall.as_secs_f64() * 1e3)
    }

    fn range(&self) -> (f64, f64) {
        let v: Vec<f64> = self
            .runs
            .iter()
            .map(|s| s.wall.as_secs_f64() * 1e3)
            .collect();
        (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(0.0, f64::max),
        )
    }

    /// Calls of the median run (they are the same in every run; when not,
    /// the range is shown).
    fn calls(&self, f: impl Fn(&Sample) -> u64) -> String {
        let v: BTreeSet<u64> = self.runs.iter().map(f).collect();
        match (v.first(), v.last()) {
            (Some(a), Some(b)) if a == b => a.to_string(),
            (Some(a), Some(b)) => format!("{a}–{b}"),
            _ => "–".into(),
        }
    }

    /// Median of the run-by-run ratios this / other (runs paired in the
    /// order they were made, so slow drift of the machine cancels).
    fn paired(&self, other: &Side) -> f64 {
        let ratios = Side {
            label: String::new(),
            runs: self
                .runs
                .iter()
                .zip(&other.runs)
                .map(|(a, b)| Sample {
                    wall: a.wall.div_f64(b.wall.as_secs_f64()),
                    ..Sample::default()
                })
                .collect(),
        };
        ratios.median_by(|s| s.wall.as_secs_f64())
    }

    fn row(&self, scenario: &str, ratio: &str) {
        let (lo, hi) = self.range();
        // Calls that overlap (workers) leave no time outside libvirt to tell.
        let outside = if self.runs.iter().any(|s| s.in_libvirt > s.wall) {
            "n/a".to_string()
        } else {
            format!(
                "{:.1}",
                self.median_by(|s| (s.wall.saturating_sub(s.in_libvirt)).as_secs_f64() * 1e3)
            )
        };
        let opt = |f: &dyn Fn(&Sample) -> Option<f64>| {
            let v: Vec<f64> = self.runs.iter().filter_map(f).collect();
            if v.len() == self.runs.len() {
                format!("{:.2}", self.median_by(|s| f(s).unwrap_or(f64::NAN)))
            } else {
                "n/a".into()
            }
        };
        println!(
            "| {scenario} | {} | {:.1} | {:.1}–{:.1} | {} | {} | {} | {} | {outside} | {} | {} | {} | {} | {} | {ratio} |",
            self.label,
            self.ms(),
            lo,
            hi,
            self.calls(|s| s.redefine),
            self.calls(|s| s.delete),
            self.calls(|s| s.list),
            self.calls(|s| s.other),
            opt(&|s| s.daemon_cpu),
            opt(&|s| s.my_cpu),
            opt(&|s| s.machine_busy.map(|b| b * 100.0)),
            opt(&|s| s.others),
            if self.runs.iter().all(|s| s.correct) { "yes" } else { "NO" },
        );
    }
}

fn header() {
    println!(
        "| scenario | side | median ms | min–max ms | redefine | delete | list | other calls | ms outside libvirt \
         | libvirtd CPU s | bench CPU s | machine busy % | other load (CPUs) | correct | ratio |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|");
}

// ---------------------------------------------------------------------------
// Chains and domains.

fn disk_id(i: usize) -> String {
    Uuid::from_u128(0xd15c_0000 + i as u128).to_string()
}

/// A linear chain of `n` checkpoints over the domain's 4 disks.
fn chain(dom: &TestDomain, n: usize) -> Chain {
    let ckpt = |i: usize| Uuid::from_u128(0xc4e0_0000_0000 + i as u128).to_string();
    Chain {
        scope: None,
        vm_id: Uuid::parse_str(&dom.uuid).unwrap(),
        domain: Some(dom.name.clone()),
        disks: dom
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| (disk_id(i), t.clone()))
            .collect(),
        checkpoints: (0..n)
            .map(|i| Checkpoint {
                id: ckpt(i),
                parent: i.checked_sub(1).map(ckpt),
                created: DateTime::from_timestamp(1_700_000_000 + i as i64 * 3600, 0).unwrap(),
                description: Some(format!("backup {i}")),
                disks: (0..dom.targets.len()).map(disk_id).collect(),
            })
            .collect(),
    }
}

fn defs(chain: &Chain) -> Vec<CheckpointDef> {
    chain.clone().validate().unwrap().defs()
}

/// Delete every checkpoint of the domain, children first (not measured).
fn wipe(b: &LibvirtBackend, domain: &str) {
    for d in b.list(domain).unwrap().iter().rev() {
        b.delete(domain, &d.name).unwrap();
    }
}

/// Redefine `xmls` in order (set-up, not measured).
fn redefine_all(b: &dyn Backend, domain: &str, xmls: &[String]) {
    for x in xmls {
        b.redefine(domain, x, false).unwrap();
    }
}

fn at(b: &LibvirtBackend, domain: &str, goal: &[CheckpointDef]) -> bool {
    same_content(&b.list(domain).unwrap(), goal)
}

// ---------------------------------------------------------------------------
// Simulated crashes.

struct Crash;

fn quiet_crashes() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload().downcast_ref::<Crash>().is_none() {
            default(info);
        }
    }));
}

/// An owner from another boot: dead by `Owner::is_alive`.
fn dead_owner() -> Owner {
    Owner {
        pid: std::process::id(),
        boot_id: "boot-before-the-crash".into(),
        start: 1,
    }
}

/// A store that dies (panics) right after recording its `k`-th step.
fn store_crashing_after(path: &Path, k: u64) -> Store {
    let seen = Arc::new(AtomicU64::new(0));
    let hook: Hook = Arc::new(move |point| {
        if point == "step.recorded" && seen.fetch_add(1, Ordering::SeqCst) + 1 == k {
            std::panic::panic_any(Crash);
        }
    });
    let opts = StoreOptions {
        seams: ckptstore::testing::Seams {
            owner: Some(dead_owner()),
            hook: Some(hook),
            ..Default::default()
        },
        ..StoreOptions::default()
    };
    Store::open_with(path, opts).unwrap()
}

// ---------------------------------------------------------------------------
// Scenarios.

struct Ctx {
    backend: LibvirtBackend,
    runs: usize,
    dir: tempfile::TempDir,
}

impl Ctx {
    fn journal(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn counted(&self) -> Counted<'_> {
        Counted::new(&self.backend)
    }
}

/// S1 and S2 on one domain of 200 checkpoints; leaves it synced.
fn s1_s2(ctx: &Ctx, dom: &TestDomain) {
    let chain = chain(dom, 200);
    let target = defs(&chain);
    let xmls: Vec<String> = target.iter().map(render_checkpoint).collect();
    let store = Store::open(ctx.journal("s1.db")).unwrap();
    let b = &ctx.backend;
    let name = dom.name.as_str();

    let mut sync = Side::new("`Store::sync`, empty domain");
    let mut bare = Side::new("bare redefine loop, no journal");
    for run in 0..ctx.runs {
        for side in if run % 2 == 0 { [0, 1] } else { [1, 0] } {
            let sample = steady(|| {
                // A run cut short by a daemon restart may have left its
                // transaction open: finish it first (not measured).
                store.recover(b, Policy::Rollback, None).unwrap();
                wipe(b, name);
                let c = ctx.counted();
                let mut sample = if side == 0 {
                    measure(&c, || {
                        let r: SyncReport = store.sync(&c, chain.clone()).unwrap();
                        r.redefined.len() == 200
                    })
                } else {
                    measure(&c, || {
                        redefine_all(&c, name, &xmls);
                        true
                    })
                };
                sample.correct &= at(b, name, &target);
                sample
            });
            [&mut sync, &mut bare][side].runs.push(sample);
        }
        eprintln!(
            "S1 run {} of {}: sync {:.0} ms, bare {:.0} ms",
            run + 1,
            ctx.runs,
            last_ms(&sync),
            last_ms(&bare)
        );
    }
    let ratio = format!(
        "{:.3}× the bare loop (paired: {:.3}×)",
        sync.ms() / bare.ms(),
        sync.paired(&bare)
    );
    sync.row("S1 journal overhead (200 × 4)", &ratio);
    bare.row("S1 journal overhead (200 × 4)", "");

    // S2: libvirt already matches.
    let mut noop = Side::new("`Store::sync`, libvirt matches");
    let mut again = Side::new("redefine all 200 again");
    for run in 0..ctx.runs {
        for side in if run % 2 == 0 { [0, 1] } else { [1, 0] } {
            let sample = steady(|| {
                if !at(b, name, &target) {
                    wipe(b, name);
                    redefine_all(b, name, &xmls);
                }
                let c = ctx.counted();
                if side == 0 {
                    measure(&c, || {
                        let r = store.sync(&c, chain.clone()).unwrap();
                        r.redefined.is_empty() && r.libvirt_calls == 0
                    })
                } else {
                    measure(&c, || {
                        redefine_all(&c, name, &xmls);
                        true
                    })
                }
            });
            [&mut noop, &mut again][side].runs.push(sample);
        }
        eprintln!(
            "S2 run {} of {}: no-op {:.0} ms, redefine all {:.0} ms",
            run + 1,
            ctx.runs,
            last_ms(&noop),
            last_ms(&again)
        );
    }
    noop.row(
        "S2 no-op re-sync",
        &format!("{:.0}× faster than redefining all", again.ms() / noop.ms()),
    );
    again.row("S2 no-op re-sync", "");
}

fn last_ms(s: &Side) -> f64 {
    s.runs
        .last()
        .map_or(f64::NAN, |r| r.wall.as_secs_f64() * 1e3)
}

/// Leave libvirt as a sync killed after its 180th step left it: wipe, put
/// `pre` there, then run a sync that crashes; its transaction stays open in
/// a new `journal`.
fn crash_at_180(ctx: &Ctx, dom: &TestDomain, chain: &Chain, journal: &Path, pre: Option<&str>) {
    wipe(&ctx.backend, &dom.name);
    if let Some(xml) = pre {
        ctx.backend.redefine(&dom.name, xml, false).unwrap();
    }
    for f in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{f}", journal.display()));
    }
    let crashing = store_crashing_after(journal, 180);
    let r = catch_unwind(AssertUnwindSafe(|| {
        crashing.sync(&ctx.backend, chain.clone())
    }));
    assert!(r.is_err(), "the sync was meant to crash");
}

/// Wipe, put `pre` there, redefine the first 180 checkpoints.
fn first_180(ctx: &Ctx, dom: &TestDomain, xmls: &[String], pre: Option<&str>) {
    wipe(&ctx.backend, &dom.name);
    if let Some(xml) = pre {
        ctx.backend.redefine(&dom.name, xml, false).unwrap();
    }
    redefine_all(&ctx.backend, &dom.name, &xmls[..180]);
}

/// S3 on one domain of 200 checkpoints; then once with a stale checkpoint.
fn s3(ctx: &Ctx, dom: &TestDomain) {
    let chain = chain(dom, 200);
    let target = defs(&chain);
    let xmls: Vec<String> = target.iter().map(render_checkpoint).collect();
    let b = &ctx.backend;
    let name = dom.name.as_str();
    let journal = ctx.journal("s3.db");

    // One run of one side; `pre` is a checkpoint libvirt holds before the
    // (crashed) transaction started.
    let one = |side: usize, pre: Option<&str>| {
        steady(|| {
            let c = ctx.counted();
            let mut sample = match side {
                0 => {
                    crash_at_180(ctx, dom, &chain, &journal, pre);
                    let store = Store::open(&journal).unwrap();
                    assert_eq!(store.journal().incomplete(None).unwrap().len(), 1);
                    let s = measure(&c, || {
                        let r = store.recover(&c, Policy::Resume, None).unwrap().recovered;
                        r.len() == 1 && r[0].outcome == Outcome::Committed
                    });
                    assert!(store.journal().incomplete(None).unwrap().is_empty());
                    s
                }
                1 => {
                    first_180(ctx, dom, &xmls, pre);
                    measure(&c, || {
                        wipe_and_redo(&c, name, &xmls);
                        true
                    })
                }
                _ => {
                    first_180(ctx, dom, &xmls, pre);
                    measure(&c, || {
                        lookup_and_skip(&c, name, &target, &xmls);
                        true
                    })
                }
            };
            sample.correct &= at(b, name, &target);
            sample
        })
    };

    let mut sides = [
        Side::new("`Store::recover` after a crash at step 180"),
        Side::new("wipe-and-redo (vdsm, ovirt-engine)"),
        Side::new("lookup-and-skip (virtnbdbackup)"),
    ];
    for run in 0..ctx.runs {
        let mut order = [0, 1, 2];
        order.rotate_left(run % 3);
        for side in order {
            let sample = one(side, None);
            sides[side].runs.push(sample);
        }
        eprintln!(
            "S3 run {} of {}: recover {:.0} ms, wipe-and-redo {:.0} ms, lookup-and-skip {:.0} ms",
            run + 1,
            ctx.runs,
            last_ms(&sides[0]),
            last_ms(&sides[1]),
            last_ms(&sides[2])
        );
    }
    let faster = |o: &Side| {
        format!(
            "`recover` {:.2}× faster (paired: {:.2}×)",
            o.ms() / sides[0].ms(),
            o.paired(&sides[0])
        )
    };
    sides[0].row("S3 resume at 180 of 200", "");
    sides[1].row("S3 resume at 180 of 200", &faster(&sides[1]));
    sides[2].row("S3 resume at 180 of 200", &faster(&sides[2]));

    // Once more with a stale definition of a checkpoint still to do (c190,
    // left by an earlier chain as a root with another creation time).
    let mut stale = target[190].clone();
    stale.parent = None;
    stale.creation_time -= 86_400;
    let stale_xml = render_checkpoint(&stale);
    let mut sides = [
        Side::new("`Store::recover`, stale c190 present"),
        Side::new("wipe-and-redo, stale c190 present"),
        Side::new("lookup-and-skip, stale c190 present"),
    ];
    for (side, s) in sides.iter_mut().enumerate() {
        s.runs.push(one(side, Some(&stale_xml)));
        s.row("S3b stale checkpoint (1 run)", "");
    }
}

/// What vdsm and ovirt-engine do: delete every checkpoint libvirt has,
/// children first, then redefine the whole chain.
fn wipe_and_redo(b: &Counted<'_>, domain: &str, xmls: &[String]) {
    for d in b.list(domain).unwrap().iter().rev() {
        b.delete(domain, &d.name).unwrap();
    }
    redefine_all(b, domain, xmls);
}

/// What virtnbdbackup does: look each checkpoint up by name and redefine
/// only those libvirt does not have, without comparing content.
fn lookup_and_skip(b: &Counted<'_>, domain: &str, target: &[CheckpointDef], xmls: &[String]) {
    for (d, x) in target.iter().zip(xmls) {
        match b.lookup(domain, &d.name) {
            Ok(_) => {}
            Err(e) if e.kind == BackendErrorKind::NoCheckpoint => {
                b.redefine(domain, x, false).unwrap();
            }
            Err(e) => panic!("lookup of {}: {e}", d.name),
        }
    }
}

/// S4: 32 domains × 25 checkpoints re-applied after a "host restart"
/// (libvirt's metadata gone, the journal's committed chains intact).
fn s4(ctx: &Ctx) {
    let doms: Vec<TestDomain> = (0..32)
        .map(|_| TestDomain::define(&support::system(), "s4", DISKS))
        .collect();
    let names: Vec<String> = doms.iter().map(|d| d.name.clone()).collect();
    let journal = ctx.journal("s4.db");
    let workers = [1, 2, 4];
    let stores: Vec<Store> = workers
        .iter()
        .map(|&workers| {
            Store::open_with(
                &journal,
                StoreOptions {
                    workers,
                    ..StoreOptions::default()
                },
            )
            .unwrap()
        })
        .collect();
    let targets: Vec<Vec<CheckpointDef>> = doms.iter().map(|d| defs(&chain(d, 25))).collect();
    // Commit each domain's chain once (set-up).
    for d in &doms {
        retry(|| stores[2].sync(&ctx.backend, chain(d, 25)).unwrap());
    }
    let mut sides: Vec<Side> = workers
        .iter()
        .map(|w| match w {
            1 => Side::new("`resync_many`, workers = 1 (serial)"),
            w => Side::new(format!("`resync_many`, workers = {w}")),
        })
        .collect();
    for run in 0..ctx.runs {
        let mut order: Vec<usize> = (0..stores.len()).collect();
        order.rotate_left(run % stores.len());
        for i in order {
            let sample = steady(|| {
                stores[i]
                    .recover(&ctx.backend, Policy::Rollback, None)
                    .unwrap();
                for n in &names {
                    wipe(&ctx.backend, n);
                }
                let c = ctx.counted();
                let mut s = measure(&c, || {
                    let r = stores[i].resync_many(&c, &names);
                    r.iter()
                        .all(|r| r.as_ref().is_ok_and(|r| r.redefined.len() == 25))
                });
                s.correct &= names
                    .iter()
                    .zip(&targets)
                    .all(|(n, t)| at(&ctx.backend, n, t));
                s
            });
            sides[i].runs.push(sample);
        }
        let times: Vec<String> = sides
            .iter()
            .map(|s| format!("{:.0} ms", last_ms(s)))
            .collect();
        eprintln!(
            "S4 run {} of {}: workers 1/2/4: {}",
            run + 1,
            ctx.runs,
            times.join(", ")
        );
    }
    let serial = &sides[0];
    serial.row("S4 host restart (32 × 25 × 4)", "");
    for s in &sides[1..] {
        let ratio = format!(
            "{:.2}× faster than serial (paired: {:.2}×)",
            serial.ms() / s.ms(),
            1.0 / s.paired(serial)
        );
        s.row("S4 host restart (32 × 25 × 4)", &ratio);
    }
    // Does parallelism make each call slower (the daemon's CPUs are full)?
    println!();
    for s in &sides {
        let per_call = s.median_by(|x| x.in_libvirt.as_secs_f64() * 1e3 / x.redefine.max(1) as f64);
        let cpu =
            s.median_by(|x| x.daemon_cpu.unwrap_or(f64::NAN) * 1e3 / x.redefine.max(1) as f64);
        println!(
            "S4 {}: {per_call:.1} ms per libvirt call (time in calls / redefines), \
             {cpu:.1} ms libvirtd CPU per redefine",
            s.label
        );
    }
    drop(doms);
}

// S5 --------------------------------------------------------------------------

/// An [`ImageReader`] that adds up the time spent reading images.
struct TimedReader<'a> {
    inner: &'a dyn ImageReader,
    nanos: AtomicU64,
}

impl ImageReader for TimedReader<'_> {
    fn read_chain(&self, path: &Path) -> Result<DiskChain, ImageError> {
        let t = Instant::now();
        let r = self.inner.read_chain(path);
        self.nanos
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r
    }
}

/// S5 on the S1 domain (libvirt and the journal hold its 200 checkpoints):
/// give every image the 200 bitmaps, then `validate` with the in-process
/// reader and with `qemu-img info` per image.
fn s5(ctx: &Ctx, dom: &TestDomain) {
    let target = defs(&chain(dom, 200));
    let b = &ctx.backend;
    retry(|| assert!(at(b, &dom.name, &target)));
    let first = &dom.images[0];
    for d in &target {
        support::add_bitmap(first, &d.name);
    }
    for image in &dom.images[1..] {
        std::fs::copy(first, image).unwrap();
    }
    let store = Store::open(ctx.journal("s1.db")).unwrap();
    let mut sides = [
        Side::new("`validate`, qcow2 bitmap directories read in-process"),
        Side::new("`validate_with`, `qemu-img info --backing-chain` per image"),
    ];
    let mut images: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for run in 0..ctx.runs * 2 {
        for side in if run % 2 == 0 { [0, 1] } else { [1, 0] } {
            let reader: &dyn ImageReader = if side == 0 {
                &Qcow2Reader
            } else {
                &QemuImgReader
            };
            let mut img = 0.0;
            let sample = steady(|| {
                let timed = TimedReader {
                    inner: reader,
                    nanos: AtomicU64::new(0),
                };
                let c = ctx.counted();
                let s = measure(&c, || {
                    let r = validate_with(&store, &c, &dom.name, &timed).unwrap();
                    r.ok && r.checkpoints == 200 && r.images_read == DISKS
                });
                img = timed.nanos.load(Ordering::Relaxed) as f64 / 1e6;
                s
            });
            sides[side].runs.push(sample);
            images[side].push(img);
        }
    }
    let ratio = format!("{:.1}× faster than qemu-img", sides[1].ms() / sides[0].ms());
    sides[0].row("S5 validate (200 × 4), whole check", &ratio);
    sides[1].row("S5 validate (200 × 4), whole check", "");
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (f, q) = (med(&mut images[0]), med(&mut images[1]));
    println!(
        "| S5 validate, images only | time in the reader: in-process vs `qemu-img info` | {f:.2} vs {q:.1} \
         | | | | | | | | | | | yes | {:.0}× faster than qemu-img |",
        q / f
    );
}

fn main() {
    quiet_crashes();
    let runs: usize = std::env::var("CKPTSTORE_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(7);
    let only = std::env::var("CKPTSTORE_BENCH_ONLY").unwrap_or_else(|_| "S1,S2,S3,S4,S5".into());
    let want = |s: &str| only.split(',').any(|o| o.trim().eq_ignore_ascii_case(s));
    let base = std::env::var("CKPTSTORE_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let ctx = Ctx {
        backend: LibvirtBackend::connect(support::SYSTEM_URI).unwrap(),
        runs,
        dir: tempfile::Builder::new()
            .prefix("ckptstore-bench-")
            .tempdir_in(&base)
            .unwrap(),
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    println!(
        "libvirt_loop: {} UTC, {} CPUs ({cpu}), journal in {}, {runs} runs per side, medians",
        chrono::Utc::now().format("%Y-%m-%d %H:%M"),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        base,
    );
    println!();
    header();
    if want("S1") || want("S2") || want("S5") {
        let dom = TestDomain::define(&support::system(), "s1", DISKS);
        // Real bitmaps for every checkpoint: S1 measures the sync with its
        // bitmap check on (the images read before the intent).
        for c in &chain(&dom, 200).checkpoints {
            dom.add_bitmap_everywhere(&c.id);
        }
        if want("S1") || want("S2") {
            s1_s2(&ctx, &dom);
        } else {
            let store = Store::open(ctx.journal("s1.db")).unwrap();
            retry(|| store.sync(&ctx.backend, chain(&dom, 200)).unwrap());
        }
        if want("S5") {
            s5(&ctx, &dom);
        }
    }
    if want("S3") {
        let dom = TestDomain::define(&support::system(), "s3", DISKS);
        s3(&ctx, &dom);
    }
    if want("S4") {
        s4(&ctx);
    }
}
