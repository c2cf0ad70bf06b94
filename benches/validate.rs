//! `validate` of a shut-off `qemu:///system` domain with 200 checkpoints on
//! 4 disks (100 GiB qcow2 images, 200 bitmaps each), reading the images
//! in-process, against the same validation reading each image with
//! `qemu-img info --output=json --backing-chain -U` (same comparison logic,
//! through [`validate_with`]). Needs the daemon
//! (`bash tests/support/libvirt.sh start`). Run with
//! `cargo bench --bench validate`.

#[path = "support/qemu_img_reader.rs"]
mod qemu_img_reader;
use testkit::support;

use std::time::Duration;

use chrono::DateTime;
use ckptstore::testing::{validate_with, ImageReader, Qcow2Reader};
use ckptstore::{validate, Chain, Checkpoint, LibvirtBackend, Store};
use criterion::{criterion_group, criterion_main, Criterion};
use qemu_img_reader::QemuImgReader;
use support::TestDomain;
use uuid::Uuid;

const CHECKPOINTS: usize = 200;
const DISKS: usize = 4;

fn run(args: &[&str]) {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn bench(c: &mut Criterion) {
    let dom = TestDomain::define(&support::system(), "bench-validate", DISKS);
    let names: Vec<String> = (0..CHECKPOINTS)
        .map(|_| Uuid::new_v4().to_string())
        .collect();
    // One 100 GiB image with every bitmap, copied to every disk.
    let first = dom.images[0].to_str().unwrap().to_owned();
    run(&["create", "-q", "-f", "qcow2", &first, "100G"]);
    for name in &names {
        run(&["bitmap", "--add", &first, &name.clone()]);
    }
    for image in &dom.images[1..] {
        std::fs::copy(&dom.images[0], image).unwrap();
    }
    let disk_ids: Vec<String> = (0..DISKS).map(|_| Uuid::new_v4().to_string()).collect();
    let chain = Chain {
        scope: None,
        vm_id: Uuid::new_v4(),
        domain: Some(dom.name.clone()),
        disks: disk_ids
            .iter()
            .cloned()
            .zip(dom.targets.iter().cloned())
            .collect(),
        checkpoints: names
            .iter()
            .enumerate()
            .map(|(i, id)| Checkpoint {
                id: id.clone(),
                parent: i.checked_sub(1).map(|p| names[p].clone()),
                created: DateTime::from_timestamp(1_700_000_000 + 60 * i as i64, 0).unwrap(),
                description: None,
                disks: disk_ids.clone(),
            })
            .collect(),
    };
    let journal = tempfile::tempdir().unwrap();
    let store = Store::open(journal.path().join("journal.db")).unwrap();
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    store.sync(&backend, chain).unwrap();

    let ours = validate(&store, &backend, &dom.name).unwrap();
    let theirs = validate_with(&store, &backend, &dom.name, &QemuImgReader).unwrap();
    assert!(ours.ok, "{ours:#?}");
    assert_eq!(
        (ours.findings, ours.usable),
        (theirs.findings, theirs.usable)
    );
    assert_eq!((ours.checkpoints, ours.images_read), (CHECKPOINTS, DISKS));

    let mut group = c.benchmark_group("validate 200 checkpoints x 4 disks");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("validate (in-process reader)", |b| {
        b.iter(|| validate(&store, &backend, &dom.name).unwrap());
    });
    group.bench_function("validate (qemu-img info per image)", |b| {
        b.iter(|| validate_with(&store, &backend, &dom.name, &QemuImgReader).unwrap());
    });
    group.bench_function("images only: in-process reader", |b| {
        b.iter(|| {
            dom.images
                .iter()
                .map(|i| Qcow2Reader.read_chain(i).unwrap())
                .collect::<Vec<_>>()
        });
    });
    group.bench_function("images only: qemu-img info", |b| {
        b.iter(|| {
            dom.images
                .iter()
                .map(|i| QemuImgReader.read_chain(i).unwrap())
                .collect::<Vec<_>>()
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
