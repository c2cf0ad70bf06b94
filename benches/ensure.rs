//! `ensure` against a bare redefine of one checkpoint, on the real daemon
//! (`qemu:///system`), side by side in one run, A/B order alternating.
//!
//! The domain has two qcow2 disks; its committed chain is c0 ← c1 ← c2,
//! each checkpoint's bitmap on both disks but c2's on vdb (removed with
//! `qemu-img bitmap --remove`). Each round first deletes libvirt's
//! metadata of every checkpoint (not timed), then:
//!
//! - `ensure`: `Store::ensure(c2)`: the committed chain read, the disks'
//!   images read in-process, the intent, one redefine (c2 as a root, on vda
//!   only), the listing that verifies it, the commit;
//! - `bare`: that one redefine, its XML rendered beforehand — what an agent
//!   that already knows the answer does;
//! - `again`: `Store::ensure(c2)` when libvirt already holds it (no call
//!   that changes anything).
//!
//! Cases: a shut-off domain (the images read in-process) and a running one
//! (TCG; libvirt checks the bitmaps: the first `ensure` is refused once by
//! `REDEFINE_VALIDATE` and applied again without vdb; `bare` redefines with
//! `REDEFINE_VALIDATE` too).
//!
//! Run with `cargo bench --bench ensure` (as root, the daemon started by
//! `bash tests/support/libvirt.sh start`); `CKPTSTORE_BENCH_RUNS` sets the
//! rounds (default 21), `CKPTSTORE_BENCH_DIR` the journal's folder
//! (default `/var/tmp`).

use testkit::support;

use std::time::Instant;

use ckptstore::testing::render_checkpoint;
use ckptstore::{Backend, BitmapPolicy, CheckpointDef, LibvirtBackend, Store, StoreOptions};
use support::TestDomain;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn forget(backend: &LibvirtBackend, domain: &str) {
    let mut held = backend.list(domain).unwrap();
    // Children first: libvirt lists parents first.
    held.reverse();
    for d in held {
        backend.delete(domain, &d.name).unwrap();
    }
}

fn case(running: bool, runs: usize, dir: &std::path::Path) {
    let dom = TestDomain::define(&support::system(), "bench-ensure", 2);
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    let names = ["c0", "c1", "c2"];
    let mut parent: Option<String> = None;
    let mut defs = Vec::new();
    for (i, n) in names.iter().enumerate() {
        dom.add_bitmap_everywhere(n);
        let def = CheckpointDef {
            name: (*n).to_string(),
            parent: parent.replace((*n).to_string()),
            creation_time: 1_700_000_000 + i as i64,
            description: None,
            disks: [("vda", *n), ("vdb", *n)]
                .iter()
                .map(|(t, b)| ((*t).to_string(), (*b).to_string()))
                .collect(),
        };
        backend
            .redefine(&dom.name, &render_checkpoint(&def), false)
            .unwrap();
        defs.push(def);
    }
    let journal = tempfile::tempdir_in(dir).unwrap();
    let opts = StoreOptions {
        bitmaps: BitmapPolicy::Degrade,
        ..StoreOptions::default()
    };
    let store = Store::open_with(journal.path().join("journal.db"), opts).unwrap();
    store.import(&backend, &dom.name).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["bitmap", "--remove"])
        .arg(&dom.images[1])
        .arg("c2")
        .output()
        .unwrap();
    assert!(out.status.success());
    if running {
        dom.start();
    }
    let base = CheckpointDef {
        parent: None,
        disks: [("vda".to_string(), "c2".to_string())].into(),
        ..defs[2].clone()
    };
    let xml = render_checkpoint(&base);
    let (mut ensure, mut bare, mut again) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..runs {
        let mut run_ensure = || {
            forget(&backend, &dom.name);
            let t = Instant::now();
            let r = store.ensure(&backend, &dom.name, "c2", None).unwrap();
            ensure.push(ms(t));
            assert!(r.redefined);
            assert_eq!(backend.list(&dom.name).unwrap(), vec![base.clone()]);
            let t = Instant::now();
            let r = store.ensure(&backend, &dom.name, "c2", None).unwrap();
            again.push(ms(t));
            assert_eq!(r.libvirt_calls, 0);
        };
        let mut run_bare = || {
            forget(&backend, &dom.name);
            let t = Instant::now();
            backend.redefine(&dom.name, &xml, running).unwrap();
            bare.push(ms(t));
            assert_eq!(backend.list(&dom.name).unwrap(), vec![base.clone()]);
        };
        if round % 2 == 0 {
            run_ensure();
            run_bare();
        } else {
            run_bare();
            run_ensure();
        }
    }
    let (e, b, a) = (median(ensure), median(bare), median(again));
    println!(
        "{:<9} ensure {e:7.2} ms | bare redefine {b:6.2} ms | ratio {:5.1}x | ensure again (no call) {a:6.2} ms   (median of {runs})",
        if running { "running" } else { "shut off" },
        e / b
    );
}

fn main() {
    let runs = std::env::var("CKPTSTORE_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(21);
    let dir = std::env::var("CKPTSTORE_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    case(false, runs, std::path::Path::new(&dir));
    case(true, runs, std::path::Path::new(&dir));
}
