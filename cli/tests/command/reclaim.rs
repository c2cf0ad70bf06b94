//! `reclaim` as the real binary on `qemu:///system`: a shut-off domain on
//! real qcow2 images with a stray bitmap and a checkpoint whose bitmap is
//! gone; snapshots of the dry run (human and JSON), the apply, and
//! `validate` exit 0 afterwards; exit codes of bad input.

use crate::snap;
use testkit::support;

use std::collections::BTreeMap;
use std::process::Command;

use chrono::DateTime;
use ckptstore::{Chain, Checkpoint};
use snap::Snap;
use support::TestDomain;
use uuid::Uuid;

fn ckpt_id(i: usize) -> String {
    Uuid::from_u128(0xc4e0_0000 + i as u128).to_string()
}

#[test]
fn reclaim_dry_run_then_apply_on_qemu() {
    let conn = support::system();
    let dom = TestDomain::define(&conn, "cli-reclaim", 1);
    let names: Vec<String> = (0..3).map(ckpt_id).collect();
    for n in &names {
        dom.add_bitmap(0, n);
    }
    let chain = Chain {
        scope: None,
        vm_id: Uuid::parse_str("93a5c045-6457-2c09-e56c-927cdf34e178").unwrap(),
        domain: Some(dom.name.clone()),
        disks: BTreeMap::from([("disk-a".to_string(), "vda".to_string())]),
        checkpoints: names
            .iter()
            .enumerate()
            .map(|(i, n)| Checkpoint {
                id: n.clone(),
                parent: i.checked_sub(1).map(ckpt_id),
                created: DateTime::from_timestamp(1_700_000_000 + i as i64 * 3600, 0).unwrap(),
                description: None,
                disks: vec!["disk-a".to_string()],
            })
            .collect(),
    };
    let mut s = Snap::new("reclaim_on_qemu");
    s.redact(&dom.name, "[DOMAIN]");
    s.redact(&dom.images[0].display().to_string(), "[IMAGE]");
    let file = s.write("chain.json", serde_json::to_string_pretty(&chain).unwrap());
    assert_eq!(s.run(&["sync", "--chain", file.to_str().unwrap()]).code, 0);
    // The middle checkpoint's bitmap removed behind the store's back, a
    // stray one added.
    let status = Command::new("qemu-img")
        .args(["bitmap", "--remove"])
        .arg(&dom.images[0])
        .arg(&names[1])
        .status()
        .expect("qemu-img");
    assert!(status.success());
    dom.add_bitmap(0, "stray");
    let r = s.run(&["reclaim", "--domain", &dom.name]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = s.run(&["reclaim", "--domain", &dom.name, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc = r.json();
    assert_eq!(doc["applied"], false);
    assert_eq!(doc["txn"], serde_json::Value::Null);
    assert_eq!(doc["orphans"][0]["bitmap"], "stray");
    assert_eq!(doc["checkpoints"][0]["checkpoint"], names[1].as_str());
    assert_eq!(doc["checkpoints"][0]["action"], "deleted");
    assert_eq!(s.run(&["validate", "--domain", &dom.name]).code, 1);
    let r = s.run(&["reclaim", "--domain", &dom.name, "--apply", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc = r.json();
    assert_eq!(doc["applied"], true);
    assert!(doc["txn"].is_string());
    let r = s.run(&["validate", "--domain", &dom.name]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    // Nothing left: the second apply makes no transaction.
    let r = s.run(&["reclaim", "--domain", &dom.name, "--apply"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Exit codes: an unknown domain 4, a missing --domain 2.
    assert_eq!(
        s.run(&["reclaim", "--domain", "ckptstore-no-such-domain"])
            .code,
        4
    );
    assert_eq!(s.run(&["reclaim"]).code, 2);
    s.check();
}
