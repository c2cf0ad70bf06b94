//! Shared pieces of the crash simulations: chains, journals in a temporary
//! folder, stores that crash (panic) at the N-th crash point, a seeded
//! random simulation.

pub mod history;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use chrono::DateTime;
use ckptstore::testing::same_content;
use ckptstore::testing::{DiskChain, ImageError, ImageReader, Layer, LayerBitmap};
use ckptstore::testing::{FakeBackend, Fault, Op, Phase};
use ckptstore::testing::{ImageEditError, ImageEditor, Removed};
use ckptstore::Owner;
use ckptstore::{
    BackendErrorKind, BitmapPolicy, Chain, Checkpoint, CheckpointDef, Policy, Store, StoreOptions,
};
use uuid::Uuid;

pub const DOMAIN: &str = "sim-domain";
pub const VM_UUID: &str = "93a5c045-6457-2c09-e56c-927cdf34e178";

/// The payload of a simulated crash.
pub struct SimCrash;

/// Silence the panic messages of simulated crashes (only those).
pub fn quiet_crashes() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<SimCrash>().is_none() {
                default(info);
            }
        }));
    });
}

/// Run `f`; `None` when it died at a simulated crash point.
pub fn run_crashing<T>(f: impl FnOnce() -> T) -> Option<T> {
    quiet_crashes();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(p) if p.downcast_ref::<SimCrash>().is_some() => None,
        Err(p) => std::panic::resume_unwind(p),
    }
}

pub fn disk_id(i: usize) -> String {
    Uuid::from_u128(0xd15c_0000 + i as u128).to_string()
}

pub fn ckpt_id(i: usize) -> String {
    Uuid::from_u128(0xc4e0_0000 + i as u128).to_string()
}

/// A linear chain c0 <- c1 <- ... of `n` checkpoints over `disks` disks.
pub fn linear_chain(n: usize, disks: usize) -> Chain {
    tree_chain(&(0..n).map(|i| i.checked_sub(1)).collect::<Vec<_>>(), disks)
}

/// A chain whose checkpoint i has parent `parents[i]` (an index).
pub fn tree_chain(parents: &[Option<usize>], disks: usize) -> Chain {
    let targets = ["sda", "sdb", "sdc", "sdd"];
    Chain {
        scope: None,
        vm_id: Uuid::parse_str(VM_UUID).unwrap(),
        domain: Some(DOMAIN.into()),
        disks: (0..disks)
            .map(|i| (disk_id(i), targets[i].to_string()))
            .collect(),
        checkpoints: parents
            .iter()
            .enumerate()
            .map(|(i, p)| Checkpoint {
                id: ckpt_id(i),
                parent: p.map(ckpt_id),
                created: DateTime::from_timestamp(1_600_000_000 + i as i64 * 3600, 0).unwrap(),
                description: Some(format!("checkpoint {i} <& ]]>")),
                disks: (0..disks).map(disk_id).collect(),
            })
            .collect(),
    }
}

pub fn extra_def(name: &str, parent: Option<&str>, t: i64) -> CheckpointDef {
    CheckpointDef {
        name: name.into(),
        parent: parent.map(Into::into),
        creation_time: t,
        description: None,
        disks: BTreeMap::from([("sda".to_string(), name.to_string())]),
    }
}

pub fn fake_list(fake: &FakeBackend) -> Vec<CheckpointDef> {
    fake.peek(DOMAIN)
}

/// A counter of crash points passed.
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A journal file in a fresh temporary folder (on tmpfs when there is one).
pub struct TempJournal {
    pub dir: tempfile::TempDir,
}

impl Default for TempJournal {
    fn default() -> Self {
        Self::new()
    }
}

impl TempJournal {
    pub fn new() -> TempJournal {
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        };
        TempJournal { dir: dir.unwrap() }
    }

    pub fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("journal.db")
    }

    fn options(owner: u32, hook: Option<ckptstore::testing::Hook>) -> StoreOptions {
        StoreOptions {
            seams: ckptstore::testing::Seams {
                owner: Some(Owner {
                    pid: owner,
                    boot_id: "simulation".into(),
                    start: u64::from(owner),
                }),
                // Every simulated process other than the caller is dead.
                liveness: Some(Arc::new(|_| false)),
                hook,
                ..Default::default()
            },
            reconnect_attempts: 3,
            reconnect_delay: Duration::ZERO,
            ..StoreOptions::default()
        }
    }

    /// A store acting as simulated process `owner` that reads a shut-off
    /// domain's images from the fake (its bitmaps per disk), with a bitmap
    /// policy.
    pub fn store_with_images(
        &self,
        owner: u32,
        fake: &Arc<FakeBackend>,
        bitmaps: BitmapPolicy,
    ) -> Store {
        let mut opts = Self::options(owner, None);
        opts.seams.images = Some(Arc::new(FakeImages(fake.clone())));
        opts.seams.editor = Some(Arc::new(FakeImages(fake.clone())));
        opts.bitmaps = bitmaps;
        Store::open_with(self.path(), opts).unwrap()
    }

    /// [`TempJournal::store_with_images`] (policy `degrade`) that removes
    /// bitmaps from the fake's images too, with a crash hook.
    fn store_on_images(
        &self,
        owner: u32,
        fake: &Arc<FakeBackend>,
        hook: Option<ckptstore::testing::Hook>,
    ) -> Store {
        let mut opts = Self::options(owner, hook);
        opts.seams.images = Some(Arc::new(FakeImages(fake.clone())));
        opts.seams.editor = Some(Arc::new(FakeImages(fake.clone())));
        Store::open_with(self.path(), opts).unwrap()
    }

    /// A store on the fake's images that counts the crash points it passes.
    pub fn store_with_images_counting(
        &self,
        owner: u32,
        fake: &Arc<FakeBackend>,
    ) -> (Store, Counter) {
        let c = Counter::default();
        let c2 = c.clone();
        let hook: ckptstore::testing::Hook = Arc::new(move |_| {
            c2.0.fetch_add(1, Ordering::SeqCst);
        });
        (self.store_on_images(owner, fake, Some(hook)), c)
    }

    /// A store on the fake's images whose process dies at its `k`-th crash
    /// point (1-based).
    pub fn store_with_images_crashing_at(
        &self,
        owner: u32,
        fake: &Arc<FakeBackend>,
        k: u64,
    ) -> Store {
        self.store_on_images(owner, fake, Some(crash_at(k)))
    }

    /// A store acting as simulated process `owner`.
    pub fn store(&self, owner: u32) -> Store {
        Store::open_with(self.path(), Self::options(owner, None)).unwrap()
    }

    /// A store that counts the crash points it passes.
    pub fn store_counting(&self, owner: u32) -> (Store, Counter) {
        let c = Counter::default();
        let c2 = c.clone();
        let hook: ckptstore::testing::Hook = Arc::new(move |_| {
            c2.0.fetch_add(1, Ordering::SeqCst);
        });
        (
            Store::open_with(self.path(), Self::options(owner, Some(hook))).unwrap(),
            c,
        )
    }

    /// A store whose process dies at its `k`-th crash point (1-based).
    pub fn store_crashing_at(&self, owner: u32, k: u64) -> Store {
        Store::open_with(self.path(), Self::options(owner, Some(crash_at(k)))).unwrap()
    }
}

/// A crash hook that dies (panics with [`SimCrash`]) at its `k`-th point.
fn crash_at(k: u64) -> ckptstore::testing::Hook {
    let seen = Arc::new(AtomicU64::new(0));
    Arc::new(move |_| {
        if seen.fetch_add(1, Ordering::SeqCst) + 1 == k {
            std::panic::panic_any(SimCrash);
        }
    })
}

pub use crate::rng::Rng;

/// The fake's bitmaps as images: the disk image `/fake/<domain>/<target>.qcow2`
/// of a fake domain is one qcow2 layer holding the fake's bitmaps of that
/// disk, each consistent, recording and not in use (what a cleanly shut
/// off QEMU leaves).
pub struct FakeImages(pub Arc<FakeBackend>);

impl ImageReader for FakeImages {
    fn read_chain(&self, path: &std::path::Path) -> Result<DiskChain, ImageError> {
        let unreadable = || ImageError::Unreadable {
            path: path.to_path_buf(),
            reason: "not a fake image".into(),
        };
        let rest = path.strip_prefix("/fake").map_err(|_| unreadable())?;
        let mut parts = rest.iter().map(|p| p.to_string_lossy().into_owned());
        let (Some(domain), Some(file), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(unreadable());
        };
        let target = file.strip_suffix(".qcow2").ok_or_else(unreadable)?;
        Ok(DiskChain {
            layers: vec![Layer {
                path: path.to_path_buf(),
                bitmaps_consistent: true,
                bitmaps: self
                    .0
                    .bitmaps(&domain, target)
                    .into_iter()
                    .map(|name| LayerBitmap {
                        name,
                        in_use: false,
                        auto: true,
                    })
                    .collect(),
            }],
            unfollowed: None,
        })
    }
}

/// The domain and disk target of a fake image path
/// (`/fake/<domain>/<target>.qcow2`).
fn fake_disk(path: &std::path::Path) -> Option<(String, String)> {
    let rest = path.strip_prefix("/fake").ok()?;
    let mut parts = rest.iter().map(|p| p.to_string_lossy().into_owned());
    let (Some(domain), Some(file), None) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    Some((domain, file.strip_suffix(".qcow2")?.to_string()))
}

/// `qemu-img bitmap --remove` on the fake's images: refused, as QEMU's
/// image lock refuses it, while the domain runs or another process holds
/// the image ([`FakeBackend::hold_image`]).
impl ImageEditor for FakeImages {
    fn remove_bitmap(
        &self,
        image: &std::path::Path,
        bitmap: &str,
    ) -> Result<Removed, ImageEditError> {
        self.check_writable(image)?;
        let (domain, target) = fake_disk(image).expect("checked");
        if !self.0.bitmaps(&domain, &target).iter().any(|b| b == bitmap) {
            return Ok(Removed::AlreadyGone);
        }
        self.0.remove_bitmap(&domain, &target, bitmap);
        Ok(Removed::Removed)
    }

    fn check_writable(&self, image: &std::path::Path) -> Result<(), ImageEditError> {
        let Some((domain, target)) = fake_disk(image) else {
            return Err(ImageEditError::Failed {
                image: image.to_path_buf(),
                message: "not a fake image".into(),
            });
        };
        if self.0.image_in_use(&domain, &target) {
            return Err(ImageEditError::InUse {
                image: image.to_path_buf(),
                message: format!(
                    "Could not open '{}': Failed to get \"write\" lock",
                    image.display()
                ),
            });
        }
        Ok(())
    }
}

/// The seed of the random simulation: `CKPTSTORE_SIM_SEED`, or a fresh one.
pub fn seed_from_env() -> u64 {
    crate::rng::seed("CKPTSTORE_SIM_SEED")
}

/// Random chains (lines and trees), pre-states, faults, refusals and
/// crashes, from one seed. Panics (with the seed) when the invariant breaks.
pub fn random_simulation(seed: u64, rounds: u64) -> String {
    let mut rng = Rng::new(seed);
    let mut stats: BTreeMap<&str, u64> = BTreeMap::new();
    for round in 0..rounds {
        let label = format!("seed {seed} round {round}");
        let n = 1 + rng.below(8) as usize;
        let parents: Vec<Option<usize>> = (0..n)
            .map(|i| match i {
                0 => None,
                _ if rng.chance(20) => Some(rng.below(i as u64) as usize),
                _ => Some(i - 1),
            })
            .collect();
        let chain = tree_chain(&parents, 1 + rng.below(3) as usize);
        let target = chain.clone().validate().unwrap().defs();
        // Pre-state: a random subset of the target (closed under parents),
        // some of it stale, plus random extras.
        let mut before: Vec<CheckpointDef> = Vec::new();
        for d in &target {
            let parent_in = d
                .parent
                .as_ref()
                .is_none_or(|p| before.iter().any(|b| &b.name == p));
            if parent_in && rng.chance(60) {
                let mut d = d.clone();
                if rng.chance(20) {
                    d.creation_time += 7;
                }
                before.push(d);
            }
        }
        for x in 0..rng.below(3) {
            let parent = if before.is_empty() || rng.chance(20) {
                None
            } else {
                Some(before[rng.below(before.len() as u64) as usize].name.clone())
            };
            before.push(extra_def(
                &format!("x{x}"),
                parent.as_deref(),
                9_000 + x as i64,
            ));
        }
        let fake = FakeBackend::new();
        fake.define_domain(DOMAIN, VM_UUID, &["sda", "sdb", "sdc"], false);
        fake.set_checkpoints(DOMAIN, before.clone());
        // Daemon restarts come from a generator of their own, so that the
        // rest of a seed's choices stay what they were.
        let mut restarts = Rng::new(seed ^ (round + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
        if restarts.chance(20) {
            fake.restart();
            *stats.entry("restarts").or_default() += 1;
        }
        let start = fake.current(DOMAIN);
        let refuse = rng.chance(15) && !target.is_empty();
        if refuse {
            // libvirt refuses a definition it finds invalid, never one it
            // holds already (it accepted that one).
            let victim = &target[rng.below(target.len() as u64) as usize];
            if !before.contains(victim) {
                fake.refuse_def(DOMAIN, victim);
            }
        }
        if rng.chance(30) {
            fake.inject(Fault {
                op: None,
                nth: 1 + rng.below(12),
                phase: if rng.chance(50) {
                    Phase::AfterEffect
                } else {
                    Phase::BeforeEffect
                },
                kind: BackendErrorKind::ConnectionLost,
                forever: rng.chance(20),
            });
            *stats.entry("connection_faults").or_default() += 1;
        }
        let j = TempJournal::new();
        let crash_at = if rng.chance(60) {
            Some(1 + rng.below(40))
        } else {
            None
        };
        let s1 = match crash_at {
            Some(k) => j.store_crashing_at(1, k),
            None => j.store(1),
        };
        let res = run_crashing(|| s1.sync(&fake, chain.clone()));
        drop(s1);
        let mut restarted_after_end = None;
        if res.is_none() && restarts.chance(30) {
            // The host rebooted with the process: libvirt recomputes its
            // current checkpoint (where it stays if the transaction had
            // ended).
            let ended = j.store(9).status(None).unwrap().incomplete.is_empty();
            fake.restart();
            if ended {
                restarted_after_end = Some(fake.current(DOMAIN));
            }
            *stats.entry("restarts_after_crash").or_default() += 1;
        }
        match &res {
            None => *stats.entry("crashed").or_default() += 1,
            Some(Ok(_)) => {
                *stats.entry("committed_directly").or_default() += 1;
                assert!(
                    same_content(&fake_list(&fake), &target),
                    "{label}: sync returned Ok but libvirt differs"
                );
            }
            Some(Err(e)) if e.is_rolled_back() => {
                *stats.entry("rolled_back_directly").or_default() += 1;
                assert!(
                    same_content(&fake_list(&fake), &before),
                    "{label}: rolled back but libvirt differs"
                );
            }
            Some(Err(_)) => *stats.entry("left_open").or_default() += 1,
        }
        let policy = if rng.chance(50) {
            Policy::Resume
        } else {
            Policy::Rollback
        };
        if rng.chance(40) {
            let s2 = j.store_crashing_at(2, 1 + rng.below(30));
            let r = run_crashing(|| s2.recover(&fake, policy, None));
            if r.is_none() {
                *stats.entry("crashed_in_recovery").or_default() += 1;
            }
        }
        // The daemon is back and healthy; recover for good.
        fake.clear_faults();
        let s3 = j.store(3);
        match s3.recover(&fake, policy, None) {
            Ok(r) if r.failed.is_empty() => {}
            Ok(r) => panic!("{label}: final recovery failed: {:?}", r.failed),
            Err(e) => panic!("{label}: final recovery failed: {e}"),
        }
        let now = fake_list(&fake);
        let at_target = same_content(&now, &target);
        assert!(
            at_target || same_content(&now, &before),
            "{label}: neither target nor before-image: {now:#?}"
        );
        assert!(
            s3.status(None).unwrap().incomplete.is_empty(),
            "{label}: still incomplete"
        );
        assert_eq!(s3.journal().integrity_check().unwrap(), "ok", "{label}");
        let calls = fake.calls(Op::Redefine) + fake.calls(Op::Delete);
        let want = restarted_after_end.unwrap_or_else(|| {
            history::expected_current(&before, &target, &start, at_target, calls)
        });
        assert_eq!(fake.current(DOMAIN), want, "{label}: current");
        *stats
            .entry(if at_target {
                "ended_at_target"
            } else {
                "ended_at_before_image"
            })
            .or_default() += 1;
    }
    format!("{rounds} rounds, {stats:?}")
}
