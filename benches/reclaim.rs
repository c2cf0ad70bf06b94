//! `reclaim` of orphan bitmaps on a shut-off domain against the loop an
//! operator runs by hand: `qemu-img bitmap --remove IMAGE NAME` per bitmap.
//!
//! On `qemu:///system`: a shut-off domain with one qcow2 disk holding `N`
//! orphan bitmaps (default 200, `CKPTSTORE_BENCH_N`), added with
//! `qemu-img bitmap --add`. Side A: `Store::reclaim(apply)` (the
//! scan, the journaled transaction, one `qemu-img bitmap --remove` per
//! bitmap); side B: the bare `qemu-img` loop. One run per side, A first;
//! each checks that the image ends with no bitmap. Run with
//! `cargo bench --bench reclaim`.

use testkit::support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ckptstore::{LibvirtBackend, Store};
use support::TestDomain;

fn add(image: &Path, names: &[String]) {
    for chunk in names.chunks(50) {
        let st = Command::new("sh")
            .arg("-c")
            .arg(
                chunk
                    .iter()
                    .map(|n| format!("qemu-img bitmap --add '{}' '{n}'", image.display()))
                    .collect::<Vec<_>>()
                    .join(" && "),
            )
            .status()
            .unwrap();
        assert!(st.success());
    }
}

fn count(image: &Path) -> usize {
    ckptstore::read_qcow2(image).unwrap().bitmaps.len()
}

fn main() {
    let n: usize = std::env::var("CKPTSTORE_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let names: Vec<String> = (0..n).map(|i| format!("orphan-{i:04}")).collect();
    let dom = TestDomain::define(&support::system(), "bench-reclaim", 1);
    let image = dom.images[0].clone();
    let journal = tempfile::tempdir().unwrap();
    let store = Store::open(journal.path().join("journal.db")).unwrap();
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();

    add(&image, &names);
    assert_eq!(count(&image), n);
    let t = Instant::now();
    let r = store.reclaim(&backend, &dom.name, true).unwrap();
    let a = t.elapsed();
    assert_eq!(r.orphans.len(), n);
    assert_eq!(count(&image), 0);

    add(&image, &names);
    assert_eq!(count(&image), n);
    let t = Instant::now();
    for name in &names {
        let st = Command::new("qemu-img")
            .args(["bitmap", "--remove"])
            .arg(&image)
            .arg(name)
            .status()
            .unwrap();
        assert!(st.success());
    }
    let b = t.elapsed();
    assert_eq!(count(&image), 0);

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "reclaim of {n} orphan bitmaps: ckptstore reclaim --apply {:.0} ms, qemu-img bitmap --remove loop {:.0} ms, \
         ratio {:.2}x ({} libvirt calls)",
        ms(a),
        ms(b),
        ms(a) / ms(b),
        r.libvirt_calls
    );
}
