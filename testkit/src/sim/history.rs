//! Random histories of one domain on the fake backend: syncs of a chain
//! that changes as a management system's does (retention, new leaves, new
//! branches and roots, edited descriptions), with backups that create
//! checkpoints, daemon restarts, refusals, lost connections, crashes and
//! crashes during recovery. After every transaction libvirt's hidden
//! current checkpoint must be where ARCHITECTURE.md says it ends.

use std::collections::BTreeMap;

use chrono::DateTime;
use ckptstore::testing::leaf_of;
use ckptstore::testing::same_content;
use ckptstore::testing::{FakeBackend, Fault, Op, Phase};
use ckptstore::{BackendErrorKind, Chain, Checkpoint, CheckpointDef, Policy};
use uuid::Uuid;

use super::{ckpt_id, disk_id, run_crashing, Rng, TempJournal, DOMAIN, VM_UUID};

/// The management system's chain: checkpoint index → (parent index,
/// description version; `None` for a checkpoint a backup created).
#[derive(Debug, Clone, Default)]
struct Kept {
    nodes: BTreeMap<usize, (Option<usize>, Option<u64>)>,
    next: usize,
    versions: u64,
}

fn created(i: usize) -> i64 {
    1_600_000_000 + i as i64 * 3600
}

fn index_of(name: &str) -> Option<usize> {
    let id = Uuid::parse_str(name).ok()?.as_u128();
    id.checked_sub(0xc4e0_0000).map(|i| i as usize)
}

impl Kept {
    fn chain(&self) -> Chain {
        let disks = [disk_id(0), disk_id(1)];
        Chain {
            scope: None,
            vm_id: Uuid::parse_str(VM_UUID).unwrap(),
            domain: Some(DOMAIN.into()),
            disks: BTreeMap::from([
                (disks[0].clone(), "sda".into()),
                (disks[1].clone(), "sdb".into()),
            ]),
            checkpoints: self
                .nodes
                .iter()
                .map(|(&i, &(p, v))| Checkpoint {
                    id: ckpt_id(i),
                    parent: p.map(ckpt_id),
                    created: DateTime::from_timestamp(created(i), 0).unwrap(),
                    description: v.map(|v| format!("checkpoint {i} version {v}")),
                    disks: disks.to_vec(),
                })
                .collect(),
        }
    }

    fn childless(&self) -> Vec<usize> {
        self.nodes
            .keys()
            .copied()
            .filter(|i| !self.nodes.values().any(|(p, _)| *p == Some(*i)))
            .collect()
    }

    /// The newest checkpoint without children (indices grow with time).
    fn leaf(&self) -> Option<usize> {
        self.childless().into_iter().max()
    }

    fn add(&mut self, parent: Option<usize>) {
        self.versions += 1;
        self.nodes.insert(self.next, (parent, Some(self.versions)));
        self.next += 1;
    }

    /// Drop a checkpoint; its children move to its parent, as libvirt's
    /// delete does.
    fn drop_one(&mut self, i: usize) {
        if let Some((parent, _)) = self.nodes.remove(&i) {
            for (p, _) in self.nodes.values_mut() {
                if *p == Some(i) {
                    *p = parent;
                }
            }
        }
    }

    fn pick(&self, rng: &mut Rng, from: &[usize]) -> Option<usize> {
        (!from.is_empty()).then(|| from[rng.below(from.len() as u64) as usize])
    }

    /// One change a management system makes between two syncs.
    fn change(&mut self, rng: &mut Rng) -> &'static str {
        let all: Vec<usize> = self.nodes.keys().copied().collect();
        match rng.below(10) {
            // Retention: the oldest checkpoint of the leaf's line goes.
            0 | 1 => {
                let mut at = self.leaf();
                while let Some(p) = at.and_then(|i| self.nodes[&i].0) {
                    at = Some(p);
                }
                match at {
                    Some(root) if self.nodes.len() > 1 => {
                        self.drop_one(root);
                        "retention"
                    }
                    _ => "nothing",
                }
            }
            2 => {
                let middle: Vec<usize> = all
                    .iter()
                    .copied()
                    .filter(|i| {
                        self.nodes[i].0.is_some()
                            && self.nodes.values().any(|(p, _)| *p == Some(*i))
                    })
                    .collect();
                match self.pick(rng, &middle) {
                    Some(i) => {
                        self.drop_one(i);
                        "drop_middle"
                    }
                    None => "nothing",
                }
            }
            3 => {
                let leaf = self.leaf();
                let old: Vec<usize> = self
                    .childless()
                    .into_iter()
                    .filter(|i| Some(*i) != leaf)
                    .collect();
                match self.pick(rng, &old) {
                    Some(i) => {
                        self.drop_one(i);
                        "drop_old_leaf"
                    }
                    None => "nothing",
                }
            }
            4 | 5 => {
                self.add(self.leaf());
                "new_leaf"
            }
            6 => {
                let p = self.pick(rng, &all);
                self.add(p);
                "new_branch"
            }
            7 => {
                self.add(None);
                "new_root"
            }
            8 => match self.pick(rng, &all) {
                Some(i) => {
                    self.versions += 1;
                    let v = self.versions;
                    if let Some(n) = self.nodes.get_mut(&i) {
                        n.1 = Some(v);
                    }
                    "edit"
                }
                None => "nothing",
            },
            _ => "nothing",
        }
    }
}

fn bump(stats: &mut BTreeMap<&'static str, u64>, what: &'static str) {
    *stats.entry(what).or_default() += 1;
}

/// Where the current checkpoint must be after a transaction that started
/// from `before` with the current checkpoint at `start` and made `calls`
/// mutating calls (ARCHITECTURE.md, "Where the current checkpoint ends").
pub fn expected_current(
    before: &[CheckpointDef],
    target: &[CheckpointDef],
    start: &Option<String>,
    at_target: bool,
    calls: u64,
) -> Option<String> {
    if same_content(before, target) || calls == 0 {
        // Nothing to do (or the sync failed before its first call: a lost
        // connection while listing): no call, the current checkpoint stays.
        start.clone()
    } else if at_target {
        leaf_of(target).map(|d| d.name.clone())
    } else {
        leaf_of(before).map(|d| d.name.clone())
    }
}

/// `histories` random histories of `transactions` syncs each, from `seed`.
/// Panics (naming the seed, history and transaction) when libvirt ends
/// neither at the target nor at the before-image, or when its current
/// checkpoint is not where the rule says.
pub fn random_histories(seed: u64, histories: u64, transactions: u64) -> String {
    let mut rng = Rng::new(seed);
    let mut stats: BTreeMap<&str, u64> = BTreeMap::new();
    for h in 0..histories {
        let fake = FakeBackend::new();
        fake.define_domain(DOMAIN, VM_UUID, &["sda", "sdb"], true);
        let j = TempJournal::new();
        let mut kept = Kept::default();
        for _ in 0..=rng.below(5) {
            let p = if kept.nodes.is_empty() || rng.chance(15) {
                None
            } else {
                kept.pick(&mut rng, &kept.nodes.keys().copied().collect::<Vec<_>>())
            };
            kept.add(p);
        }
        let mut owner = 10u32;
        for t in 0..transactions {
            let label = format!("seed {seed} history {h} transaction {t}");
            // Between two syncs: a daemon restart, a backup.
            if rng.chance(20) {
                fake.restart();
                bump(&mut stats, "restarts");
            }
            if t > 0 && rng.chance(30) {
                let name = ckpt_id(kept.next);
                let parent = fake.create(DOMAIN, &name, created(kept.next)).unwrap();
                let parent = parent.as_deref().map(|p| index_of(p).unwrap());
                kept.nodes.insert(kept.next, (parent, None));
                kept.next += 1;
                bump(&mut stats, "backups");
            }
            let mut next = kept.clone();
            if t > 0 {
                for _ in 0..=rng.below(3) {
                    bump(&mut stats, next.change(&mut rng));
                }
            }
            let chain = next.chain();
            let target = chain.clone().validate().unwrap().defs();
            // The chain's checkpoints have their bitmaps, as real ones do
            // (the domain runs: libvirt checks them).
            for d in &target {
                for (t, b) in &d.disks {
                    fake.add_bitmap(DOMAIN, t, b);
                }
            }
            let before = fake.peek(DOMAIN);
            let start = fake.current(DOMAIN);
            fake.reset_calls();
            if rng.chance(12) {
                // libvirt refuses one of this sync's new checkpoints (names
                // are never given twice, so it never holds the refused
                // definition later).
                let new: Vec<&CheckpointDef> = target
                    .iter()
                    .filter(|d| index_of(&d.name).is_some_and(|i| i >= kept.next))
                    .collect();
                if !new.is_empty() {
                    fake.refuse_def(DOMAIN, new[rng.below(new.len() as u64) as usize]);
                    bump(&mut stats, "refusals");
                }
            }
            if rng.chance(15) {
                fake.inject(Fault {
                    op: None,
                    nth: 1 + rng.below(8),
                    phase: if rng.chance(50) {
                        Phase::AfterEffect
                    } else {
                        Phase::BeforeEffect
                    },
                    kind: BackendErrorKind::ConnectionLost,
                    forever: rng.chance(20),
                });
                bump(&mut stats, "connection_faults");
            }
            let policy = if rng.chance(50) {
                Policy::Resume
            } else {
                Policy::Rollback
            };
            owner += 3;
            let mut restarted_after_end = None;
            let s1 = if rng.chance(35) {
                j.store_crashing_at(owner, 1 + rng.below(25))
            } else {
                j.store(owner)
            };
            match run_crashing(|| s1.sync(&fake, chain.clone())) {
                None => {
                    bump(&mut stats, "crashed");
                    if rng.chance(30) {
                        // The host rebooted: libvirt recomputes its current
                        // checkpoint. After the transaction's end (a crash
                        // after its commit), that is where it stays.
                        let ended = j
                            .store(owner + 1)
                            .status(None)
                            .unwrap()
                            .incomplete
                            .is_empty();
                        fake.restart();
                        if ended {
                            restarted_after_end = Some(fake.current(DOMAIN));
                        }
                        bump(&mut stats, "restarts_after_crash");
                    }
                    if rng.chance(30) {
                        let s2 = j.store_crashing_at(owner + 1, 1 + rng.below(20));
                        if run_crashing(|| s2.recover(&fake, policy, None)).is_none() {
                            bump(&mut stats, "crashed_in_recovery");
                        }
                    }
                }
                Some(Ok(r)) => {
                    if !r.warnings.is_empty() {
                        bump(&mut stats, "plan_warnings");
                    }
                }
                Some(Err(_)) => {}
            }
            drop(s1);
            fake.clear_faults();
            let s3 = j.store(owner + 2);
            match s3.recover(&fake, policy, None) {
                Ok(_)
                | Err(ckptstore::Error::Refused {
                    rolled_back: true, ..
                }) => {}
                Err(e) => panic!("{label}: final recovery failed: {e}"),
            }
            assert!(
                s3.status(None).unwrap().incomplete.is_empty(),
                "{label}: still incomplete"
            );
            let now = fake.peek(DOMAIN);
            let at_target = same_content(&now, &target);
            assert!(
                at_target || same_content(&now, &before),
                "{label}: neither target nor before-image: {now:#?}"
            );
            let calls = fake.calls(Op::Redefine) + fake.calls(Op::Delete);
            let want = restarted_after_end
                .unwrap_or_else(|| expected_current(&before, &target, &start, at_target, calls));
            assert_eq!(
                fake.current(DOMAIN),
                want,
                "{label}: current (started at {start:?}, {calls} calls, at_target={at_target})"
            );
            *stats.entry("libvirt_calls").or_default() += calls;
            if same_content(&before, &target) {
                bump(&mut stats, "nothing_to_do");
            } else if at_target {
                bump(&mut stats, "committed");
                kept = next;
            } else {
                bump(&mut stats, "rolled_back");
                // Names and versions are never given twice.
                kept.next = next.next;
                kept.versions = next.versions;
            }
        }
        assert_eq!(j.store(9).journal().integrity_check().unwrap(), "ok");
    }
    format!("{histories} histories of {transactions} transactions, {stats:?}")
}
