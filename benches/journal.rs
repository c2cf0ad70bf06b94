//! The journal's costs on the sync path and at start-up:
//!
//! - one step commit (`Journal::step_done`) next to one durable commit of
//!   the same size (`Journal::count_call`: WAL with `synchronous=FULL`, one
//!   fsync) on the real disk (`/var/tmp`) and on tmpfs (`/dev/shm`);
//! - the incomplete-transaction query (`Journal::incomplete(None)`, and
//!   `Store::status(None)` which adds progress counts and the committed
//!   chains) on a journal holding 10,000 finished transactions vs 100: the
//!   partial index on open states keeps the ratio close to 1;
//! - one whole sync on the fake when a domain keeps 100 vs 2,000 finished
//!   transactions (history pruning).
//!
//! Run with `cargo bench --bench journal`.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::DateTime;
use ckptstore::testing::{Begin, Journal, NewStep, NewTxn, StepOp, StepPhase, TxnKind};
use ckptstore::FakeBackend;
use ckptstore::Owner;
use ckptstore::{Chain, Checkpoint, CheckpointDef, Store, StoreOptions};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use uuid::Uuid;

const DOMAIN: &str = "bench";
const STEPS: u32 = 200;

fn def(i: usize) -> CheckpointDef {
    let name = Uuid::from_u128(0xc4e0_0000 + i as u128).to_string();
    CheckpointDef {
        name: name.clone(),
        parent: i
            .checked_sub(1)
            .map(|p| Uuid::from_u128(0xc4e0_0000 + p as u128).to_string()),
        creation_time: 1_600_000_000 + i as i64,
        description: None,
        disks: (0..4)
            .map(|d| (format!("vd{}", (b'a' + d as u8) as char), name.clone()))
            .collect(),
    }
}

/// A dead process (no process has pid 0).
fn dead_owner() -> Owner {
    Owner {
        pid: 0,
        boot_id: "bench".into(),
        start: 0,
    }
}

/// An open transaction of 200 redefine steps on `domain`, as `sync` journals
/// it before its first libvirt call.
fn begin(journal: &Journal, domain: &str) -> Uuid {
    let target: Vec<CheckpointDef> = (0..STEPS as usize).map(def).collect();
    let steps: Vec<NewStep> = target
        .iter()
        .map(|d| NewStep {
            op: StepOp::Redefine,
            checkpoint: d.name.clone(),
            xml: Some(ckptstore::testing::render_checkpoint(d)),
            before: None,
            detail: None,
        })
        .collect();
    let id = Uuid::new_v4();
    let owner = dead_owner();
    let new = NewTxn {
        id,
        domain,
        kind: TxnKind::Sync,
        chain: None,
        target: &target,
        before: &[],
        owner: &owner,
        steps: &steps,
    };
    assert_eq!(journal.begin(new).unwrap(), Begin::Started);
    id
}

fn step_commit(c: &mut Criterion) {
    let mut group = c.benchmark_group("journal commit");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    for (place, base) in [
        ("disk /var/tmp", "/var/tmp"),
        ("tmpfs /dev/shm", "/dev/shm"),
    ] {
        let dir = tempfile::tempdir_in(base).unwrap();
        let journal = Journal::open(&dir.path().join("journal.db")).unwrap();
        let txn = begin(&journal, DOMAIN);
        let mut seq = 0u32;
        group.bench_function(BenchmarkId::new("step_done", place), |b| {
            b.iter(|| {
                journal.step_done(txn, StepPhase::Apply, seq).unwrap();
                seq = (seq + 1) % STEPS;
            });
        });
        // The same kind of one-row update as a durable commit (what every
        // commit of the journal costs with synchronous=FULL).
        group.bench_function(BenchmarkId::new("count_call", place), |b| {
            b.iter(|| journal.count_call(txn).unwrap());
        });
    }
    group.finish();
}

/// A four-checkpoint window sliding by one per sync: each sync deletes the
/// oldest checkpoint and redefines a new one (two steps).
fn window(domain: &str, k: usize) -> Chain {
    let disk = Uuid::from_u128(0xd15c).to_string();
    let id = |i: usize| Uuid::from_u128(0xc4e0_0000 + i as u128).to_string();
    Chain {
        scope: None,
        vm_id: Uuid::from_u128(0x93a5_c045),
        domain: Some(domain.into()),
        disks: [(disk.clone(), "vda".to_string())].into(),
        checkpoints: (k..k + 4)
            .map(|i| Checkpoint {
                id: id(i),
                parent: (i > k).then(|| id(i - 1)),
                created: DateTime::from_timestamp(1_600_000_000 + i as i64 * 3600, 0).unwrap(),
                description: None,
                disks: vec![disk.clone()],
            })
            .collect(),
    }
}

fn fake(domains: &[String]) -> FakeBackend {
    let fake = FakeBackend::new();
    for (i, d) in domains.iter().enumerate() {
        fake.define_domain(
            d,
            &Uuid::from_u128(0x93a5_0000 + i as u128).to_string(),
            &["vda"],
            false,
        );
    }
    fake
}

/// A journal of 100 domains with `per_domain` finished transactions each
/// (real syncs on the fake), plus one open transaction of a dead owner on
/// another domain: what start-up recovery must find.
fn journal_with_history(dir: &Path, per_domain: usize) -> Store {
    let path = dir.join(format!("history-{per_domain}.db"));
    let opts = StoreOptions {
        history: per_domain,
        ..StoreOptions::default()
    };
    let store = Store::open_with(&path, opts.clone()).unwrap();
    let domains: Vec<String> = (0..100).map(|i| format!("vm{i:03}")).collect();
    let fake = fake(&domains);
    let started = Instant::now();
    for k in 0..per_domain {
        for d in &domains {
            store.sync(&fake, window(d, k)).unwrap();
        }
    }
    begin(store.journal(), "crashed");
    eprintln!(
        "built a journal of {} finished transactions in {:.1?}",
        100 * per_domain,
        started.elapsed()
    );
    drop(store);
    let dead: ckptstore::testing::Liveness = Arc::new(|_| false);
    Store::open_with(
        &path,
        StoreOptions {
            seams: ckptstore::testing::Seams {
                liveness: Some(dead),
                ..Default::default()
            },
            ..opts
        },
    )
    .unwrap()
}

fn incomplete_query(c: &mut Criterion) {
    // Read-only queries: the file sits in the page cache wherever it is, so
    // it is built on tmpfs (10,000 syncs are 30,000 fsyncs on disk).
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let stores: Vec<(usize, Store)> = [1, 100]
        .into_iter()
        .map(|per| (100 * per, journal_with_history(dir.path(), per)))
        .collect();
    let mut group = c.benchmark_group("incomplete query, 100 domains");
    group
        .sample_size(50)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (n, store) in &stores {
        assert_eq!(store.journal().incomplete(None).unwrap().len(), 1);
        assert_eq!(
            store.history("vm000", n + 1).unwrap().transactions.len(),
            n / 100
        );
        let label = format!("{n} finished");
        group.bench_with_input(
            BenchmarkId::new("Journal::incomplete(None)", &label),
            store,
            |b, s| b.iter(|| black_box(s.journal().incomplete(None).unwrap())),
        );
        group.bench_with_input(
            BenchmarkId::new("Store::status(None)", &label),
            store,
            |b, s| b.iter(|| black_box(s.status(None).unwrap())),
        );
    }
    group.finish();
}

/// One whole sync on the fake (tmpfs journal) when the domain keeps 100 vs
/// 2,000 finished transactions: every commit prunes the domain's history,
/// and that query reads each finished row of the domain.
fn history_depth(c: &mut Criterion) {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let domains = vec![DOMAIN.to_string()];
    let mut group = c.benchmark_group("sync on the fake by history kept");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for keep in [100, 2_000] {
        let path = dir.path().join(format!("depth-{keep}.db"));
        let store = Store::open_with(
            &path,
            StoreOptions {
                history: keep,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        let fake = fake(&domains);
        for k in 0..keep {
            store.sync(&fake, window(DOMAIN, k)).unwrap();
        }
        let mut k = keep;
        group.bench_function(BenchmarkId::from_parameter(keep), |b| {
            b.iter(|| {
                store.sync(&fake, window(DOMAIN, k)).unwrap();
                k += 1;
            });
        });
    }
    group.finish();
}

criterion_group!(benches, step_commit, incomplete_query, history_depth);
criterion_main!(benches);
