//! `read_image` against `qemu-img info --output=json` on four images with
//! 200 bitmaps each (64 KiB, 512 B and 2 MiB clusters, and a compressed
//! copy). Run with `cargo bench --bench qcow2`.

use testkit::qemu;

use std::path::{Path, PathBuf};
use std::time::Duration;

use ckptstore::testing::qcow2::read_image;
use criterion::{criterion_group, criterion_main, Criterion};
use qemu::{add_bitmap, create, disable_bitmap, qemu_img, qemu_img_output};

const BITMAPS: usize = 200;

/// Makes the four images in `dir` and returns their labels and paths.
fn images(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let first = dir.join("c64k.qcow2");
    create(&first, "100G", &[]);
    for i in 0..BITMAPS {
        let name = format!("3f2c9a1e-0b7d-4c55-9e61-{i:012}");
        add_bitmap(&first, &name, None);
        if i % 2 == 0 {
            disable_bitmap(&first, &name);
        }
    }
    let mut all = vec![("64K clusters", first.clone())];
    for (label, file, opts) in [
        (
            "512B clusters",
            "c512.qcow2",
            &["-o", "cluster_size=512"][..],
        ),
        ("2M clusters", "c2m.qcow2", &["-o", "cluster_size=2M"][..]),
        ("compressed", "compressed.qcow2", &["-c"][..]),
    ] {
        let path = dir.join(file);
        let mut args = vec!["convert", "--bitmaps", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[first.to_str().unwrap(), path.to_str().unwrap()]);
        qemu_img(&args);
        all.push((label, path));
    }
    for (_, path) in &all {
        assert_eq!(read_image(path).unwrap().bitmaps.len(), BITMAPS);
    }
    all
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let images = images(dir.path());
    let mut group = c.benchmark_group("qcow2 200 bitmaps");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for (label, path) in &images {
        group.bench_function(format!("read_image/{label}"), |b| {
            b.iter(|| read_image(path).unwrap());
        });
        group.bench_function(format!("qemu-img info/{label}"), |b| {
            b.iter(|| {
                let out = qemu_img_output(&["info", "--output=json", "-U", path.to_str().unwrap()]);
                assert!(out.status.success());
                serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
