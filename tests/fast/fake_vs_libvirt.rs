//! The fake as a reference model: seeded random sequences of redefines
//! (good parents, missing ones, self-parents, cycles, replacements),
//! deletes and real creates, applied to the fake and to libvirt's test
//! driver; after every step both must answer alike (result, error kind,
//! code and message) and list the same checkpoints in the same order.
//!
//! `CKPTSTORE_DIFF_SEEDS=n` runs more seeds; a failure prints its seed and
//! step, and `CKPTSTORE_DIFF_SEED=s` replays one seed.

use testkit::support;

use std::collections::BTreeSet;

use ckptstore::testing::render_checkpoint;
use ckptstore::FakeBackend;
use ckptstore::{Backend, BackendError, CheckpointDef, LibvirtBackend};
use support::TestDomain;

use testkit::rng::Rng;

const NAMES: [&str; 7] = ["a", "b", "c", "d", "e", "f", "g"];
const STEPS: usize = 30;

/// What a step returned, in a form both backends can be compared by.
fn outcome<T: std::fmt::Debug>(r: Result<T, BackendError>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(e) => format!("err {:?} {} {}", e.kind, e.code, e.message),
    }
}

fn run_seed(seed: u64) {
    let mut rng = Rng::new(seed);
    let conn = support::test_driver();
    let dom = TestDomain::define(&conn, "diff", 2);
    dom.start();
    let real = LibvirtBackend::connect(support::TEST_URI).unwrap();
    let fake = FakeBackend::new();
    fake.define_domain(&dom.name, &dom.uuid, &["vda", "vdb"], true);
    // Real creates stamp the current time: compare those without it.
    let mut created: BTreeSet<String> = BTreeSet::new();
    let mut fresh = 0;
    let mask = |mut l: Vec<CheckpointDef>, created: &BTreeSet<String>| {
        for d in &mut l {
            if created.contains(&d.name) {
                d.creation_time = 0;
            }
        }
        l
    };
    for step in 0..STEPS {
        let existing: Vec<String> = fake
            .list(&dom.name)
            .unwrap()
            .into_iter()
            .map(|d| d.name)
            .collect();
        let (what, r_fake, r_real) = match rng.index(10) {
            0..=5 => {
                let name = NAMES[rng.index(NAMES.len())].to_string();
                let parent = match rng.index(6) {
                    0 => None,
                    1 => Some("missing".to_string()),
                    2 => Some(name.clone()),
                    _ if existing.is_empty() => None,
                    _ => Some(existing[rng.index(existing.len())].clone()),
                };
                let disks = match rng.index(3) {
                    0 => vec!["vda"],
                    1 => vec!["vdb"],
                    _ => vec!["vda", "vdb"],
                };
                let def = CheckpointDef {
                    name: name.clone(),
                    parent,
                    creation_time: 1_000 + rng.index(100) as i64,
                    description: (rng.index(3) == 0).then(|| format!("step {step}")),
                    disks: disks
                        .iter()
                        .map(|d| (d.to_string(), name.clone()))
                        .collect(),
                };
                let xml = render_checkpoint(&def);
                (
                    format!("redefine {def:?}"),
                    outcome(fake.redefine(&dom.name, &xml, false)),
                    outcome(real.redefine(&dom.name, &xml, false)),
                )
            }
            6..=7 => {
                let name = if existing.is_empty() || rng.index(5) == 0 {
                    "missing".to_string()
                } else {
                    existing[rng.index(existing.len())].clone()
                };
                (
                    format!("delete {name}"),
                    outcome(fake.delete(&dom.name, &name)),
                    outcome(real.delete(&dom.name, &name)),
                )
            }
            _ => {
                fresh += 1;
                let name = format!("new{fresh}");
                created.insert(name.clone());
                let f = fake.create(&dom.name, &name, 0);
                let xml = format!("<domaincheckpoint><name>{name}</name></domaincheckpoint>");
                let r = real.create_checkpoint(&dom.name, &xml).map(|d| d.parent);
                (format!("create {name}"), outcome(f), outcome(r))
            }
        };
        let at = format!("seed {seed}, step {step}: {what}");
        assert_eq!(r_fake, r_real, "{at}");
        let l_fake = mask(fake.list(&dom.name).unwrap(), &created);
        let l_real = mask(real.list(&dom.name).unwrap(), &created);
        assert_eq!(l_fake, l_real, "{at}");
    }
}

#[test]
fn the_fake_answers_like_the_test_driver() {
    if let Some(seed) = std::env::var("CKPTSTORE_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return run_seed(seed);
    }
    let seeds: u64 = std::env::var("CKPTSTORE_DIFF_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    for seed in 1..=seeds {
        run_seed(seed);
    }
}
