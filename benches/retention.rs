//! Retention: the management system drops old checkpoints from a long
//! chain, and `Store::sync` makes libvirt follow. libvirt's metadata delete
//! re-parents the children itself, so dropping the oldest checkpoint should
//! cost one delete, not a redefine of everything after it.
//!
//! Cases, on a line of `N` checkpoints (default 1,000):
//! - `oldest 1`: the oldest checkpoint goes (daily retention);
//! - `oldest 10`: the ten oldest go at once;
//! - `middle`: the checkpoint in the middle goes (its child takes its
//!   parent);
//! - `old side`: an old side checkpoint hanging off the root goes.
//!
//! Each case runs on the fake backend (calls counted by the fake; the time
//! of the whole `sync`, journal included, and of `plan::plan` alone) and,
//! for `oldest 1`, on the real daemon: `qemu:///system`, a shut-off domain
//! whose qcow2 image holds a real bitmap per checkpoint, made by
//! `qemu-img bitmap --add`. Every run also checks that libvirt ends with
//! the target, and that a backup's next checkpoint would hang off the leaf
//! (the fake's current checkpoint).
//!
//! The file uses only APIs the store had before issue 14, so the same bench
//! measures the planner before and after. Run with
//! `cargo bench --bench retention`; `CKPTSTORE_BENCH_N` sets the chain
//! length, `CKPTSTORE_BENCH_RUNS` the runs per case (default 5; 3 on the
//! daemon), `CKPTSTORE_BENCH_REAL=0` skips the daemon.

use testkit::support;

use std::time::{Duration, Instant};

use chrono::DateTime;
use ckptstore::testing::leaf_of;
use ckptstore::testing::render_checkpoint;
use ckptstore::testing::{plan, same_content};
use ckptstore::testing::{FakeBackend, Op};
use ckptstore::{Backend, Chain, Checkpoint, CheckpointDef, LibvirtBackend, Store};
use support::TestDomain;
use uuid::Uuid;

const DOMAIN: &str = "retention";
const UUID: &str = "93a5c045-6457-2c09-e56c-927cdf34e178";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn ckpt(i: usize) -> String {
    Uuid::from_u128(0xc4e0_0000 + i as u128).to_string()
}

/// A chain of the checkpoints `(index, parent index)` on the first disk.
fn chain(nodes: &[(usize, Option<usize>)], target: &str) -> Chain {
    let disk = Uuid::from_u128(0xd15c_0000).to_string();
    Chain {
        scope: None,
        vm_id: Uuid::parse_str(UUID).unwrap(),
        domain: Some(DOMAIN.into()),
        disks: [(disk.clone(), target.to_string())].into(),
        checkpoints: nodes
            .iter()
            .map(|&(i, p)| Checkpoint {
                id: ckpt(i),
                parent: p.map(ckpt),
                created: DateTime::from_timestamp(1_600_000_000 + i as i64 * 86_400, 0).unwrap(),
                description: Some(format!("nightly backup {i}")),
                disks: vec![disk.clone()],
            })
            .collect(),
    }
}

fn line(n: usize) -> Vec<(usize, Option<usize>)> {
    (0..n).map(|i| (i, i.checked_sub(1))).collect()
}

/// Checkpoints as `(index, parent index)`.
type Nodes = Vec<(usize, Option<usize>)>;

/// Before and after of each case.
fn cases(n: usize) -> Vec<(&'static str, Nodes, Nodes)> {
    let oldest = |k: usize| {
        let mut v: Vec<_> = line(n).split_off(k);
        v[0].1 = None;
        v
    };
    let mid = n / 2;
    let mut middle = line(n);
    middle.remove(mid);
    middle[mid].1 = Some(mid - 1);
    // The side checkpoint `n` hangs off the root and is older than c1.
    let mut side = line(n);
    side.insert(1, (n, Some(0)));
    vec![
        ("oldest 1", line(n), oldest(1)),
        ("oldest 10", line(n), oldest(10)),
        ("middle", line(n), middle),
        ("old side", side, line(n)),
    ]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Row {
    case: &'static str,
    backend: &'static str,
    n: usize,
    deletes: u64,
    redefines: u64,
    sync: Duration,
    plan: Option<Duration>,
    leaf_current: Option<bool>,
}

fn fake_case(
    n: usize,
    runs: usize,
    case: &'static str,
    before: &[(usize, Option<usize>)],
    after: &[(usize, Option<usize>)],
) -> Row {
    let pre = side_aware(before, n);
    let target_chain = side_chain(after, n);
    let target = target_chain.clone().validate().unwrap().defs();
    let (mut syncs, mut plans) = (Vec::new(), Vec::new());
    let (mut deletes, mut redefines, mut leaf_current) = (0, 0, true);
    for _ in 0..runs {
        let fake = FakeBackend::new();
        fake.define_domain(DOMAIN, UUID, &["vda"], false);
        fake.set_checkpoints(DOMAIN, pre.clone());
        let listing = fake.peek(DOMAIN);
        let t = Instant::now();
        let p = plan(&listing, &target);
        plans.push(t.elapsed());
        drop(p);
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let store = Store::open(dir.path().join("journal.db")).unwrap();
        fake.reset_calls();
        let t = Instant::now();
        store.sync(&fake, target_chain.clone()).unwrap();
        syncs.push(t.elapsed());
        deletes = fake.calls(Op::Delete);
        redefines = fake.calls(Op::Redefine);
        assert!(same_content(&fake.peek(DOMAIN), &target), "{case}");
        leaf_current &= fake.current(DOMAIN) == leaf_of(&target).map(|d| d.name.clone());
    }
    Row {
        case,
        backend: "fake",
        n,
        deletes,
        redefines,
        sync: median(syncs),
        plan: Some(median(plans)),
        leaf_current: Some(leaf_current),
    }
}

/// The definitions of `nodes`, the side checkpoint (index `n`) dated
/// between c0 and c1.
fn side_aware(nodes: &[(usize, Option<usize>)], n: usize) -> Vec<CheckpointDef> {
    side_chain(nodes, n).validate().unwrap().defs()
}

fn side_chain(nodes: &[(usize, Option<usize>)], n: usize) -> Chain {
    let mut c = chain(nodes, "vda");
    for cp in &mut c.checkpoints {
        if cp.id == ckpt(n) {
            cp.created = DateTime::from_timestamp(1_600_000_000 + 3600, 0).unwrap();
        }
    }
    c
}

/// Oldest 1 on the real daemon: the domain holds the line (redefined once,
/// bitmaps in the image), each run syncs the line without c0, then puts c0
/// and c1's parent back with two bare redefines.
fn real_case(n: usize, runs: usize) -> Row {
    let conn = support::system();
    let dom = TestDomain::define(&conn, "bench-retention", 1);
    let t = Instant::now();
    for i in 0..n {
        dom.add_bitmap(0, &ckpt(i).clone());
    }
    println!(
        "real: {n} bitmaps added with qemu-img in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    let mut full = chain(&line(n), "vda");
    full.domain = Some(dom.name.clone());
    let full_defs = full.clone().validate().unwrap().defs();
    let t = Instant::now();
    for d in &full_defs {
        backend
            .redefine(&dom.name, &render_checkpoint(d), false)
            .unwrap();
    }
    println!(
        "real: {n} checkpoints redefined in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut kept = line(n).split_off(1);
    kept[0].1 = None;
    let mut target_chain = chain(&kept, "vda");
    target_chain.domain = Some(dom.name.clone());
    let target = target_chain.clone().validate().unwrap().defs();
    let (mut syncs, mut deletes, mut redefines) = (Vec::new(), 0, 0);
    for run in 0..runs {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let store = Store::open(dir.path().join("journal.db")).unwrap();
        let t = Instant::now();
        let r = store.sync(&backend, target_chain.clone()).unwrap();
        syncs.push(t.elapsed());
        deletes = r.deleted.len() as u64;
        redefines = r.redefined.len() as u64;
        assert!(same_content(&backend.list(&dom.name).unwrap(), &target));
        println!(
            "real: run {run}: {} calls in {:.1} ms",
            r.libvirt_calls,
            ms(syncs[run])
        );
        for d in &full_defs[..2] {
            backend
                .redefine(&dom.name, &render_checkpoint(d), false)
                .unwrap();
        }
        assert!(same_content(&backend.list(&dom.name).unwrap(), &full_defs));
    }
    Row {
        case: "oldest 1",
        backend: "qemu:///system",
        n,
        deletes,
        redefines,
        sync: median(syncs),
        plan: None,
        leaf_current: None,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; there is nothing to filter.
    let n = env("CKPTSTORE_BENCH_N", 1000);
    let runs = env("CKPTSTORE_BENCH_RUNS", 5);
    let mut rows = Vec::new();
    for size in [n, n * 10] {
        for (case, before, after) in cases(size) {
            rows.push(fake_case(size, runs, case, &before, &after));
        }
    }
    if env("CKPTSTORE_BENCH_REAL", 1) != 0 {
        rows.push(real_case(n, env("CKPTSTORE_BENCH_RUNS", 3).min(3)));
    }
    println!();
    println!("| case | backend | checkpoints | deletes | redefines | sync ms (median) | plan ms | leaf current |");
    println!("|---|---|---:|---:|---:|---:|---:|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {} | {} |",
            r.case,
            r.backend,
            r.n,
            r.deletes,
            r.redefines,
            ms(r.sync),
            r.plan.map_or(String::new(), |p| format!("{:.2}", ms(p))),
            r.leaf_current
                .map_or("", |ok| if ok { "yes" } else { "NO" }),
        );
    }
}
