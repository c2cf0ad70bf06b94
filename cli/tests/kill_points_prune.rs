//! `prune` killed at every crash point in the real binary (the failpoints
//! build, as `kill_points.rs`), against the real daemon: a shut-off domain
//! with two qcow2 disks and five checkpoints whose bitmaps are in the
//! images; `prune --keep 2 --apply` removes six bitmaps with `qemu-img` and
//! deletes three checkpoints' metadata. After each death a clean `recover`
//! (resume, or `--rollback`) must leave the three oldest checkpoints and
//! their bitmaps gone and the two newest in place — or, for a rollback
//! before any removal, everything as it was; nothing left open.
//!
//! Run: `cargo test -p ckptstore-cli --features failpoints --test kill_points_prune -- --nocapture`.

mod rel;
use testkit::{qemu, support};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ckptstore::{Backend, LibvirtBackend, CRASH_POINTS};
use support::{TestDomain, SYSTEM_URI};

/// `FAILPOINTS` that lets `k - 1` passes of `point` go and kills at the k-th.
fn spec(point: &str, k: u32) -> String {
    if k == 1 {
        format!("{point}=panic")
    } else {
        format!("{point}={}*off->panic", k - 1)
    }
}

fn names(backend: &LibvirtBackend, dom: &TestDomain) -> Vec<String> {
    backend
        .list(&dom.name)
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect()
}

fn bitmaps(dom: &TestDomain) -> Vec<Vec<String>> {
    dom.images
        .iter()
        .map(|p| {
            let mut v: Vec<String> = qemu::info_bitmaps(&qemu::info(p))
                .into_iter()
                .map(|b| b.0)
                .collect();
            v.sort();
            v
        })
        .collect()
}

/// A fresh journal holding the synced chain, every bitmap in the images.
fn reset(dom: &TestDomain, backend: &LibvirtBackend, dir: &Path, run: u32) -> PathBuf {
    let all: Vec<String> = (0..5).map(rel::ckpt_id).collect();
    for (i, image) in dom.images.iter().enumerate() {
        for b in &all {
            if !bitmaps(dom)[i].contains(b) {
                support::add_bitmap(image, b);
            }
        }
    }
    for n in names(backend, dom) {
        backend.delete(&dom.name, &n).unwrap();
    }
    let db = dir.join(format!("journal-{run}.db"));
    let file = rel::write_chain(
        dir,
        "chain.json",
        &rel::chain(&dom.name, 5, &["vda", "vdb"]),
    );
    rel::run_checked(&db, &["sync", "--chain", &file]).expect(0, "sync");
    db
}

#[test]
fn every_crash_point_of_prune_then_recover_on_qemu() {
    let dom = TestDomain::define(&support::system(), "killprune", 2);
    let backend = LibvirtBackend::connect(SYSTEM_URI).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("ckptstore-killprune-")
        .tempdir()
        .unwrap();
    let all: Vec<String> = (0..5).map(rel::ckpt_id).collect();
    let mut runs = 0;
    let mut landed: BTreeMap<&str, u32> = BTreeMap::new();
    for rollback in [false, true] {
        let mut deaths = BTreeMap::new();
        for &point in CRASH_POINTS {
            let mut k = 1;
            loop {
                runs += 1;
                let db = reset(&dom, &backend, dir.path(), runs);
                let mut cmd = rel::command_checked(
                    &db,
                    &["prune", "--domain", &dom.name, "--keep", "2", "--apply"],
                );
                let fp = spec(point, k);
                cmd.env("FAILPOINTS", &fp);
                let out = rel::run_cmd(cmd);
                if out.signal() != Some(libc::SIGABRT) {
                    assert_eq!(out.code(), Some(0), "{fp}: {out:#?}");
                    assert_eq!(names(&backend, &dom), all[3..]);
                    deaths.insert(point, k - 1);
                    break;
                }
                let mut args = vec!["recover", "--domain", &dom.name, "--json"];
                if rollback {
                    args.push("--rollback");
                }
                let rec = rel::run_checked(&db, &args).expect(0, "recover");
                assert_eq!(rec.json()["left_open"], serde_json::json!([]), "{rec:#?}");
                let ctx = format!("prune killed by {fp}, recover (rollback: {rollback})");
                let left = names(&backend, &dom);
                let what = if left == all {
                    assert!(rollback, "{ctx}: resume must finish");
                    assert_eq!(bitmaps(&dom), vec![all.clone(); 2], "{ctx}");
                    "unchanged"
                } else {
                    assert_eq!(left, all[3..], "{ctx}");
                    assert_eq!(bitmaps(&dom), vec![all[3..].to_vec(); 2], "{ctx}");
                    let st = rel::run(&db, &["status", "--domain", &dom.name, "--json"])
                        .expect(0, "status")
                        .json();
                    assert_eq!(st["domains"][0]["checkpoints"], 2, "{ctx}");
                    "pruned"
                };
                assert_eq!(rel::integrity(&db), "ok", "{ctx}");
                *landed.entry(what).or_default() += 1;
                k += 1;
            }
        }
        println!(
            "kill points: prune, then recover (rollback: {rollback}): deaths per point {deaths:?}"
        );
    }
    println!("kill points: prune: {runs} runs, after recover {landed:?}");
    assert!(landed.get("pruned").copied().unwrap_or(0) > 20);
}
