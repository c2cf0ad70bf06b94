//! The in-process part of a sync before the first libvirt call: validate a
//! chain, order it parent first, build its definitions and render every
//! redefine XML — for 1,000 and 10,000 checkpoints × 16 disks (the cost
//! must grow linearly: t(10k)/t(1k) ≈ 10), with 5,000 and 20,000 to show
//! the slope once the working set no longer fits in the CPU caches.
//! Run with `cargo bench --bench chain`.

use std::hint::black_box;
use std::time::Duration;

use chrono::DateTime;
use ckptstore::testing::render_checkpoint;
use ckptstore::{Chain, Checkpoint};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use uuid::Uuid;

const DISKS: usize = 16;

/// A linear chain of `n` checkpoints over 16 disks, handed over newest
/// first (as a manager's `ORDER BY creation_date DESC` would), so the
/// topological sort has real work to do.
fn chain(n: usize) -> Chain {
    let disk = |i: usize| Uuid::from_u128(0xd15c_0000 + i as u128).to_string();
    let ckpt = |i: usize| Uuid::from_u128(0xc4e0_0000_0000 + i as u128).to_string();
    let targets = (0..DISKS).map(|i| (disk(i), format!("vd{}", (b'a' + i as u8) as char)));
    Chain {
        scope: None,
        vm_id: Uuid::from_u128(0x93a5_c045),
        domain: Some("bench".into()),
        disks: targets.collect(),
        checkpoints: (0..n)
            .rev()
            .map(|i| Checkpoint {
                id: ckpt(i),
                parent: i.checked_sub(1).map(ckpt),
                created: DateTime::from_timestamp(1_600_000_000 + i as i64 * 3600, 0).unwrap(),
                description: Some(format!("nightly backup {i}")),
                disks: (0..DISKS).map(disk).collect(),
            })
            .collect(),
    }
}

/// What `Store::sync` computes before it talks to libvirt (and later the
/// steps' XML): validation, order, definitions, one XML per checkpoint.
fn prepare(chain: Chain) -> usize {
    let valid = chain.validate().unwrap();
    valid
        .defs()
        .iter()
        .map(|d| render_checkpoint(d).len())
        .sum()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("validate+order+render x16 disks");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    for n in [1_000, 5_000, 10_000, 20_000] {
        let input = chain(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &input, |b, input| {
            b.iter_batched(
                || input.clone(),
                |c| black_box(prepare(c)),
                BatchSize::LargeInput,
            );
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
