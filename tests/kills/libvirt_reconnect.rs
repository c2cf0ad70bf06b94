//! A connection the daemon drops (`virt-admin client-disconnect`, so the
//! shared daemon keeps running): the call that finds out reports
//! `ConnectionLost` (outcome unknown) and the next call reconnects. It
//! counts this process's connections, so it holds the daemon exclusively.

use testkit::support;

use std::process::Command;

use ckptstore::testing::render_checkpoint;
use ckptstore::{Backend, BackendErrorKind as K, CheckpointDef, LibvirtBackend};
use support::TestDomain;

fn virt_admin(args: &[&str]) -> String {
    let out = Command::new("virt-admin")
        .args(args)
        .output()
        .expect("virt-admin (libvirt-clients)");
    assert!(
        out.status.success(),
        "virt-admin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The daemon's ids of this process's client connections.
fn our_clients() -> Vec<String> {
    let pid = std::process::id().to_string();
    virt_admin(&["srv-clients-list", "libvirtd"])
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .next()
                .filter(|id| id.chars().all(|c| c.is_ascii_digit()))
        })
        .filter(|id| {
            virt_admin(&["client-info", "libvirtd", id])
                .lines()
                .any(|l| {
                    l.starts_with("unix_process_id")
                        && l.split_whitespace().last() == Some(pid.as_str())
                })
        })
        .map(String::from)
        .collect()
}

#[test]
fn a_dropped_connection_is_lost_then_reopened() {
    // Alone in this process: another test's connections would count as ours.
    let _daemon = testkit::daemon::exclusive();
    let dom = TestDomain::define(&support::system(), "reconnect", 1);
    let others = our_clients();
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    assert!(backend.list(&dom.name).unwrap().is_empty());
    let mine: Vec<String> = our_clients()
        .into_iter()
        .filter(|c| !others.contains(c))
        .collect();
    assert_eq!(mine.len(), 1, "the backend holds one connection");
    virt_admin(&["client-disconnect", "libvirtd", &mine[0]]);

    // The client learns of it on its next call: outcome unknown.
    let e = backend.list(&dom.name).unwrap_err();
    assert_eq!(e.kind, K::ConnectionLost, "{e:?}");
    assert!(e.is_outcome_unknown());
    assert_eq!(e.code, 38, "{e:?}");

    // The next call opens a new connection to the same URI.
    let c1 = CheckpointDef {
        name: "c1".into(),
        parent: None,
        creation_time: 1,
        description: None,
        disks: [("vda".to_string(), "c1".to_string())].into(),
    };
    backend
        .redefine(&dom.name, &render_checkpoint(&c1), false)
        .unwrap();
    assert_eq!(backend.list(&dom.name).unwrap(), vec![c1]);
    let now: Vec<String> = our_clients()
        .into_iter()
        .filter(|c| !others.contains(c))
        .collect();
    assert_eq!(now.len(), 1);
    assert_ne!(now, mine);
}
