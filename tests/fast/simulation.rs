//! Crash simulation on the fake backend.
//!
//! `every_crash_point` enumerates every named crash point of one `sync`
//! (the process dies between any two journal writes or libvirt calls), then
//! every crash point of the recovery that follows (a second crash), for
//! chains of 1 to 6 checkpoints, the pre-states empty, prefix, conflicting
//! and extra, with and without a step that libvirt refuses, and both
//! recovery policies. After each, a final recovery must leave libvirt equal
//! to the target or the before-image, nothing incomplete, and
//! `PRAGMA integrity_check` = ok.
//!
//! `seeded_random_simulation` runs random chains, trees, pre-states, faults
//! and crashes from a printed seed; `CKPTSTORE_SIM_SEED=N` replays one.

use testkit::sim;

use std::collections::BTreeMap;

use ckptstore::testing::same_content;
use ckptstore::Backend;
use ckptstore::FakeBackend;
use ckptstore::Policy;
use sim::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pre {
    Empty,
    Prefix,
    Conflicting,
    Extra,
}

const PRES: [Pre; 4] = [Pre::Empty, Pre::Prefix, Pre::Conflicting, Pre::Extra];

fn pre_state(pre: Pre, target: &[ckptstore::CheckpointDef]) -> Vec<ckptstore::CheckpointDef> {
    let n = target.len();
    match pre {
        Pre::Empty => Vec::new(),
        Pre::Prefix => target[..n.div_ceil(2)].to_vec(),
        Pre::Conflicting => {
            let mut v = target.to_vec();
            let i = n / 2;
            v[i].creation_time += 1000;
            v[i].description = Some("stale".into());
            v
        }
        Pre::Extra => {
            let mut v = target[..n.div_ceil(2)].to_vec();
            let root = v[0].name.clone();
            v.push(extra_def("x1", Some(&root), 5_000));
            v.push(extra_def("x2", Some("x1"), 5_001));
            v
        }
    }
}

struct Case {
    n: usize,
    pre: Pre,
    refuse: bool,
    policy: Policy,
}

impl Case {
    fn label(&self) -> String {
        format!(
            "n={} pre={:?} refuse={} policy={:?}",
            self.n, self.pre, self.refuse, self.policy
        )
    }

    /// A refusal needs a content-changing redefine to refuse.
    fn makes_sense(&self) -> bool {
        let target = linear_chain(self.n, 2).validate().unwrap().defs();
        let p = ckptstore::testing::plan(&pre_state(self.pre, &target), &target);
        !self.refuse
            || p.steps
                .iter()
                .any(|s| matches!(s, ckptstore::testing::Step::Redefine { forced: false, .. }))
    }

    /// A fresh world: fake libvirt in the pre-state, the fault armed.
    fn world(&self) -> (FakeBackend, ckptstore::Chain, Vec<ckptstore::CheckpointDef>) {
        let chain = linear_chain(self.n, 2);
        let target = chain.clone().validate().unwrap().defs();
        let fake = FakeBackend::new();
        fake.define_domain(DOMAIN, VM_UUID, &["sda", "sdb"], false);
        let before = pre_state(self.pre, &target);
        fake.set_checkpoints(DOMAIN, before.clone());
        if self.refuse {
            // libvirt refuses the plan's last content-changing redefine.
            let p = ckptstore::testing::plan(&before, &target);
            let victim = p.steps.iter().rev().find_map(|s| match s {
                ckptstore::testing::Step::Redefine {
                    def, forced: false, ..
                } => Some(def.clone()),
                _ => None,
            });
            fake.refuse_def(DOMAIN, &victim.expect("a refusal case has a redefine"));
        }
        (fake, chain, before)
    }
}

#[test]
fn every_crash_point() {
    let mut scenarios = 0u64;
    let mut first_crashes = 0u64;
    let mut second_crashes = 0u64;
    let mut outcomes: BTreeMap<&str, u64> = BTreeMap::new();
    for n in 1..=6 {
        for pre in PRES {
            for refuse in [false, true] {
                for policy in [Policy::Resume, Policy::Rollback] {
                    let case = Case {
                        n,
                        pre,
                        refuse,
                        policy,
                    };
                    if !case.makes_sense() {
                        continue;
                    }
                    // Count the crash points of one uninterrupted sync.
                    let (fake, chain, before) = case.world();
                    let target = chain.clone().validate().unwrap().defs();
                    let j = TempJournal::new();
                    let (store, points) = j.store_counting(1);
                    let res = store.sync(&fake, chain.clone());
                    assert_eq!(res.is_ok(), !refuse, "{}: {res:?}", case.label());
                    let expect = if refuse { &before } else { &target };
                    assert!(
                        same_content(&fake_list(&fake), expect),
                        "{}: no-crash run",
                        case.label()
                    );
                    let total = points.count();
                    drop(store);
                    for k in 1..=total {
                        // Crash at the k-th point of the sync.
                        let (fake, chain, before) = case.world();
                        let j = TempJournal::new();
                        let crashed = j.store_crashing_at(100, k);
                        let r = run_crashing(|| crashed.sync(&fake, chain.clone()));
                        assert!(
                            r.is_none(),
                            "{}: sync did not reach point {k}",
                            case.label()
                        );
                        drop(crashed);
                        first_crashes += 1;
                        // Count the points of the recovery that follows.
                        let (rec, rpoints) = j.store_counting(200);
                        let out = rec.recover(&fake, case.policy, None);
                        let rtotal = rpoints.count();
                        let o = check_invariant(&case.label(), &j, &fake, &target, &before, out);
                        *outcomes.entry(o).or_default() += 1;
                        scenarios += 1;
                        drop(rec);
                        for r2 in 1..=rtotal {
                            // Crash at k, then again at the r2-th point of
                            // the recovery, then recover for good.
                            let (fake, chain, before) = case.world();
                            let j = TempJournal::new();
                            let crashed = j.store_crashing_at(100, k);
                            assert!(run_crashing(|| crashed.sync(&fake, chain.clone())).is_none());
                            drop(crashed);
                            let rec = j.store_crashing_at(200, r2);
                            let r = run_crashing(|| rec.recover(&fake, case.policy, None));
                            assert!(
                                r.is_none(),
                                "{}: recovery did not reach point {r2}",
                                case.label()
                            );
                            drop(rec);
                            second_crashes += 1;
                            let fin = j.store(300);
                            let out = fin.recover(&fake, case.policy, None);
                            let o =
                                check_invariant(&case.label(), &j, &fake, &target, &before, out);
                            *outcomes.entry(o).or_default() += 1;
                            scenarios += 1;
                        }
                    }
                }
            }
        }
    }
    println!(
        "crash simulation: {scenarios} scenarios ({first_crashes} first crashes, {second_crashes} second crashes \
         during recovery); outcomes {outcomes:?}"
    );
    assert!(scenarios > 1000);
}

/// After the final recovery: libvirt equals the target (committed) or the
/// before-image (rolled back), nothing is incomplete, the journal is sound.
fn check_invariant(
    label: &str,
    j: &TempJournal,
    fake: &FakeBackend,
    target: &[ckptstore::CheckpointDef],
    before: &[ckptstore::CheckpointDef],
    out: ckptstore::Result<ckptstore::RecoverReport>,
) -> &'static str {
    let store = j.store(900);
    let status = store.status(None).unwrap();
    let now = fake_list(fake);
    let at_target = same_content(&now, target);
    let at_before = same_content(&now, before);
    match out {
        Ok(r) if r.failed.is_empty() => {}
        Ok(r) => panic!("{label}: recovery failed: {:?}", r.failed),
        Err(e) => panic!("{label}: recovery failed: {e}"),
    }
    assert!(
        status.incomplete.is_empty(),
        "{label}: still incomplete: {:?}",
        status.incomplete
    );
    assert!(
        at_target || at_before,
        "{label}: libvirt is neither target nor before-image: {now:#?}"
    );
    assert_eq!(store.journal().integrity_check().unwrap(), "ok", "{label}");
    if at_target {
        // The committed chain is the target, and a backup's next checkpoint
        // would hang off the leaf.
        let committed = store.committed(DOMAIN).unwrap().expect("committed chain");
        assert!(
            same_content(&committed.defs, target),
            "{label}: journal's committed chain differs"
        );
        assert_eq!(
            fake.current(DOMAIN).as_deref(),
            Some(target.last().unwrap().name.as_str()),
            "{label}: current"
        );
        "committed"
    } else {
        // A rollback puts the current checkpoint back where the
        // transaction assumed it was: the before-image's newest leaf.
        assert_eq!(
            fake.current(DOMAIN),
            ckptstore::testing::leaf_of(before).map(|d| d.name.clone()),
            "{label}: current after the rollback"
        );
        "rolled_back"
    }
}

#[test]
fn seeded_random_simulation() {
    let seed = seed_from_env();
    let rounds: u64 = std::env::var("CKPTSTORE_SIM_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    println!(
        "random simulation: seed {seed} (replay with CKPTSTORE_SIM_SEED={seed}), {rounds} rounds"
    );
    let stats = random_simulation(seed, rounds);
    println!("random simulation: {stats}");
}

/// Random histories of one domain (see `sim::history`): after every sync,
/// rollback, restart, backup and crash, libvirt's current checkpoint is
/// where ARCHITECTURE.md says.
#[test]
fn seeded_random_histories() {
    let seed = seed_from_env();
    let histories: u64 = std::env::var("CKPTSTORE_SIM_HISTORIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    println!(
        "random histories: seed {seed} (replay with CKPTSTORE_SIM_SEED={seed}), {histories} histories"
    );
    let stats = sim::history::random_histories(seed, histories, 12);
    println!("random histories: {stats}");
}

/// Every tree of up to 5 checkpoints (any checkpoint may be a root), synced
/// from nothing and from a half synced before (with libvirt's current
/// checkpoint where that sync left it, or where a daemon restart puts it):
/// libvirt's current checkpoint must end on the leaf, so that a backup's new
/// checkpoint hangs off it — also when the sync crashed at any point and
/// was resumed.
#[test]
fn tree_syncs_leave_the_leaf_current() {
    let mut cases = 0u64;
    let mut calls_over_content = BTreeMap::<u64, u64>::new();
    for n in 1..=5usize {
        // parents[i] in {None, 0..i}: (i + 1) choices for checkpoint i.
        let shapes: usize = (1..=n).product();
        for mut code in 0..shapes {
            let parents: Vec<Option<usize>> = (0..n)
                .map(|i| {
                    let choice = code % (i + 1);
                    code /= i + 1;
                    choice.checked_sub(1)
                })
                .collect();
            let chain = tree_chain(&parents, 1);
            let target = chain.clone().validate().unwrap().defs();
            let leaf = ckptstore::testing::leaf_of(&target).unwrap().name.clone();
            // Checkpoints 0..n/2 are closed under parents (a parent has a
            // smaller index): the half synced before.
            let half = tree_chain(&parents[..n / 2], 1);
            for (from_half, restart) in [(false, false), (true, false), (true, true)] {
                if !from_half && restart {
                    continue;
                }
                let label = format!("parents {parents:?} from_half={from_half} restart={restart}");
                let world = || {
                    let fake = FakeBackend::new();
                    fake.define_domain(DOMAIN, VM_UUID, &["sda"], false);
                    let j = TempJournal::new();
                    if from_half {
                        j.store(1).sync(&fake, half.clone()).unwrap();
                    }
                    if restart {
                        fake.restart();
                    }
                    fake.reset_calls();
                    (fake, j)
                };
                let (fake, j) = world();
                let before = fake_list(&fake);
                let (store, points) = j.store_counting(2);
                let r = store.sync(&fake, chain.clone()).unwrap();
                assert_eq!(
                    fake.current(DOMAIN).as_deref(),
                    Some(leaf.as_str()),
                    "{label}: current"
                );
                assert!(r.warnings.is_empty(), "{label}: {:?}", r.warnings);
                // Calls beyond the redefines content needs (no deletes here).
                let content = target.iter().filter(|d| !before.contains(d)).count() as u64;
                *calls_over_content
                    .entry(r.libvirt_calls - content)
                    .or_default() += 1;
                cases += 1;
                for k in 1..=points.count() {
                    let (fake, j) = world();
                    let crashed = j.store_crashing_at(3, k);
                    assert!(run_crashing(|| crashed.sync(&fake, chain.clone())).is_none());
                    drop(crashed);
                    j.store(4).recover(&fake, Policy::Resume, None).unwrap();
                    assert!(
                        same_content(&fake_list(&fake), &target),
                        "{label} crash {k}: not at target"
                    );
                    assert_eq!(
                        fake.current(DOMAIN).as_deref(),
                        Some(leaf.as_str()),
                        "{label} crash {k}: current"
                    );
                    cases += 1;
                }
            }
        }
    }
    println!(
        "tree syncs: {cases} cases end with the leaf current; syncs by calls beyond the content's \
         redefines: {calls_over_content:?}"
    );
}

/// What a backup between a crash and the recovery does to libvirt.
#[derive(Debug, Clone, Copy)]
enum Backup {
    /// An incremental: a new checkpoint under libvirt's current one, which
    /// it becomes.
    Next,
    /// A new chain, as virtnbdbackup's full backup makes one: every
    /// checkpoint deleted for real (bitmaps too), then the first name of
    /// the chain made again, newer.
    NewChain,
}

/// A backup that runs between a crash and the recovery makes a checkpoint
/// the transaction never knew. At every crash point of a sync, for both
/// policies and both kinds of backup: the recovery keeps the backup's
/// checkpoint as libvirt made it, reports it as foreign, leaves no
/// checkpoint below a reused name, and otherwise ends at the target or the
/// before-image.
#[test]
fn a_backup_between_the_crash_and_the_recovery_is_kept() {
    let mut scenarios = 0u64;
    let mut reported = 0u64;
    for backup in [Backup::Next, Backup::NewChain] {
        for n in 1..=5 {
            for pre in PRES {
                for policy in [Policy::Resume, Policy::Rollback] {
                    let case = Case {
                        n,
                        pre,
                        refuse: false,
                        policy,
                    };
                    let (fake, chain, _) = case.world();
                    let j = TempJournal::new();
                    let (store, points) = j.store_counting(1);
                    store.sync(&fake, chain).unwrap();
                    let total = points.count();
                    drop(store);
                    for k in 1..=total {
                        let label = format!("{} {backup:?} after a crash at {k}", case.label());
                        reported += backup_then_recover(&case, backup, k, &label);
                        scenarios += 1;
                    }
                }
            }
        }
    }
    println!("a backup during the crash: {scenarios} scenarios, {reported} recoveries reported it as foreign");
    assert!(scenarios > 300 && reported > 250);
}

/// One scenario: crash at point `k`, the backup, the recovery, the checks.
/// Returns how many recoveries reported the backup's checkpoint.
fn backup_then_recover(case: &Case, backup: Backup, k: u64, label: &str) -> u64 {
    let (fake, chain, before) = case.world();
    let target = chain.clone().validate().unwrap().defs();
    let j = TempJournal::new();
    let crashed = j.store_crashing_at(100, k);
    assert!(run_crashing(|| crashed.sync(&fake, chain.clone())).is_none());
    drop(crashed);
    fake.set_running(DOMAIN, true);
    let name = match backup {
        Backup::Next => "backup.1".to_string(),
        Backup::NewChain => {
            for d in fake_list(&fake).iter().rev() {
                fake.delete(DOMAIN, &d.name).unwrap();
                for t in ["sda", "sdb"] {
                    fake.remove_bitmap(DOMAIN, t, &d.name);
                }
            }
            ckpt_id(0)
        }
    };
    fake.create(DOMAIN, &name, 9_000_000_000).unwrap();
    let made = fake_list(&fake)
        .into_iter()
        .find(|d| d.name == name)
        .unwrap();
    let out = j.store(200).recover(&fake, case.policy, None).unwrap();
    assert!(out.failed.is_empty(), "{label}: {:?}", out.failed);
    let now = fake_list(&fake);
    let kept = now
        .iter()
        .find(|d| d.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("{label}: the backup's checkpoint was deleted"));
    assert_eq!(
        (kept.creation_time, &kept.disks),
        (made.creation_time, &made.disks),
        "{label}: the backup's checkpoint changed"
    );
    assert!(fake.bitmaps(DOMAIN, "sda").contains(&name), "{label}");
    let rest: Vec<_> = now.into_iter().filter(|d| d.name != name).collect();
    match backup {
        Backup::Next => assert!(
            same_content(&rest, &target) || same_content(&rest, &before),
            "{label}: libvirt is neither target nor before-image: {rest:#?}"
        ),
        // Everything of the old chain hung off the reused name.
        Backup::NewChain => assert!(rest.is_empty(), "{label}: {rest:#?}"),
    }
    // Whatever the transaction deleted, the newcomer hangs off a
    // checkpoint libvirt still has.
    if let Some(p) = &kept.parent {
        assert!(rest.iter().any(|d| &d.name == p), "{label}: parent {p}");
    }
    for r in &out.recovered {
        assert_eq!(r.foreign, std::slice::from_ref(&name), "{label}");
        if r.outcome == ckptstore::Outcome::Committed {
            // The committed chain is what was applied, the newcomer kept.
            let committed = j.store(901).committed(DOMAIN).unwrap().unwrap();
            assert!(
                same_content(&committed.defs, &fake_list(&fake)),
                "{label}: committed {:#?}",
                committed.defs
            );
            // And the exported chain describes it: a sync of it changes
            // nothing, the newcomer kept.
            let exported = j.store(902).export(&fake, DOMAIN).unwrap();
            assert!(
                same_content(
                    &exported.clone().validate().unwrap().defs(),
                    &fake_list(&fake)
                ),
                "{label}: exported {:#?}",
                exported.checkpoints
            );
        }
    }
    assert!(j.store(900).status(None).unwrap().incomplete.is_empty());
    out.recovered.len() as u64
}
