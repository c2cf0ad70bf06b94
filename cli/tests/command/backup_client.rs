//! ckptstore next to a real backup client it was not written with:
//! virtnbdbackup 1.9.15, Debian 12's, making full and incremental backups
//! of a running TCG domain with two qcow2 disks through libvirt checkpoints
//! and persistent bitmaps (harness in `tests/vnb/mod.rs`).
//!
//! Each scenario ends with an incremental backup that must work, whose
//! checkpoint libvirt must hang off the chain's leaf, and a virtnbdrestore
//! of the whole chain that must equal each live disk (`qemu-img compare`)
//! and hold every write ever made.
//!
//! `CKPTSTORE_VNB_SEED` replays the choices of
//! `resync_killed_then_recovered`: how the metadata is lost and when
//! `sync --domain` is killed.

use crate::rel;
use crate::vnb;

use std::time::Duration;

use vnb::{ckpt, ckptstore, names, Level, Vm};

/// A full backup and two incrementals, data written before each; libvirt
/// chains their checkpoints `virtnbdbackup.0` ← `.1` ← `.2`.
fn three_backups(vm: &mut Vm) {
    vm.write_each_disk();
    assert_eq!(vm.backup(Level::Full), ckpt(0));
    assert_eq!(vm.parent(&ckpt(0)), None);
    vm.next_backup_hangs_off(&ckpt(0));
    vm.next_backup_hangs_off(&ckpt(1));
    assert_eq!(vm.names(), [ckpt(0), ckpt(1), ckpt(2)]);
}

/// The journal adopts libvirt's checkpoints as they are now.
fn import(vm: &Vm, db: &std::path::Path) {
    let r = ckptstore(db, &["import", "--domain", vm.name()], 0);
    assert_eq!(r["outcome"], "unchanged", "{r}");
    assert_eq!(names(&r["unchanged"]), vm.names(), "{r}");
}

/// How libvirt loses a domain's checkpoint metadata.
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// `virsh checkpoint-delete --metadata` of each.
    Deletes,
    /// The transient domain destroyed and created again from its XML.
    Recreate,
}

impl Loss {
    fn apply(self, vm: &Vm) {
        match self {
            Loss::Deletes => vm.delete_metadata(),
            Loss::Recreate => vm.recreate(),
        }
    }
}

/// Lose the metadata, then `ckptstore sync --domain D` puts every
/// checkpoint back exactly as libvirt had it, parents included.
fn lose_and_resync(vm: &Vm, db: &std::path::Path, loss: Loss) {
    let before = vm.checkpoints();
    loss.apply(vm);
    let r = ckptstore(db, &["sync", "--domain", vm.name()], 0);
    assert_eq!(r["outcome"], "committed", "{r}");
    let all: Vec<String> = before.iter().map(|d| d.name.clone()).collect();
    assert_eq!(names(&r["redefined"]), all, "{r}");
    assert_eq!(names(&r["deleted"]), Vec::<String>::new(), "{r}");
    assert_eq!(vm.checkpoints(), before, "after sync --domain ({loss:?})");
}

#[test]
fn full_and_incrementals() {
    let mut vm = Vm::start("vnb-chain", false);
    three_backups(&mut vm);
    vm.restore_and_compare();
    // ckptstore's three-way check agrees with the client's chain.
    let db = vm.work().join("journal.db");
    import(&vm, &db);
    let v = ckptstore(&db, &["validate", "--domain", vm.name()], 0);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["leaf"], ckpt(2).as_str(), "{v}");
    assert_eq!(v["usable"], ckpt(2).as_str(), "{v}");
    // And leaves the chain as the client needs it.
    vm.next_backup_hangs_off(&ckpt(2));
    vm.restore_and_compare();
    vm.report("full + incrementals, import, validate");
}

#[test]
fn metadata_deleted_then_resynced() {
    let mut vm = Vm::start("vnb-deleted", false);
    three_backups(&mut vm);
    let db = vm.work().join("journal.db");
    import(&vm, &db);
    lose_and_resync(&vm, &db, Loss::Deletes);
    vm.next_backup_hangs_off(&ckpt(2));
    vm.restore_and_compare();
    vm.report("metadata-only deletes, sync --domain");
}

#[test]
fn transient_recreated_then_resynced() {
    let mut vm = Vm::start("vnb-transient", true);
    three_backups(&mut vm);
    let db = vm.work().join("journal.db");
    import(&vm, &db);
    lose_and_resync(&vm, &db, Loss::Recreate);
    vm.next_backup_hangs_off(&ckpt(2));
    vm.restore_and_compare();
    // An agent that imports after each backup: a second round.
    import(&vm, &db);
    lose_and_resync(&vm, &db, Loss::Recreate);
    vm.next_backup_hangs_off(&ckpt(3));
    vm.restore_and_compare();
    vm.report("transient domain re-created twice, sync --domain");
}

/// Rounds of [`resync_killed_then_recovered`].
const KILL_ROUNDS: usize = 3;

/// `sync --domain` SIGKILLed (by its pid) at a seeded moment while it
/// redefines, then `ckptstore recover` finishes it; three rounds, each
/// losing the metadata one way or the other (seeded), each followed by a
/// backup that must hang off the leaf and an `import` of the longer chain.
#[test]
fn resync_killed_then_recovered() {
    let seed = testkit::rng::seed("CKPTSTORE_VNB_SEED");
    println!("backup_client: seed {seed} (CKPTSTORE_VNB_SEED={seed} replays the choices)");
    let mut rng = testkit::rng::Rng::new(seed);
    let mut vm = Vm::start("vnb-killed", true);
    three_backups(&mut vm);
    let db = vm.work().join("journal.db");
    import(&vm, &db);
    // One whole re-apply measures how long one lasts here.
    let before = vm.checkpoints();
    vm.delete_metadata();
    let timed =
        rel::run_checked(&db, &["sync", "--domain", vm.name(), "--json"]).expect(0, "timed sync");
    assert_eq!(timed.json()["outcome"], "committed");
    assert_eq!(vm.checkpoints(), before);
    let span = timed.elapsed.max(Duration::from_millis(20));
    let mut tries = 0;
    for round in 0..KILL_ROUNDS {
        let before = vm.checkpoints();
        let loss = if rng.probability(0.5) {
            Loss::Deletes
        } else {
            Loss::Recreate
        };
        loss.apply(&vm);
        let (at, open, attempts) = kill_resync_inside(&vm, &db, &mut rng, span, seed);
        tries += attempts;
        assert_eq!(open.len(), 1, "{open:?}");
        assert_eq!(open[0]["owner_alive"], false, "{open:?}");
        println!(
            "backup_client: round {round}: metadata lost by {loss:?}; sync --domain killed at {} ms (attempt {attempts}), {}/{} steps recorded, libvirt had {} of {} checkpoints",
            at.as_millis(),
            open[0]["done"],
            open[0]["total"],
            vm.names().len(),
            before.len()
        );
        let r = ckptstore(&db, &["recover", "--domain", vm.name()], 0);
        assert_eq!(r["recovered"][0]["outcome"], "committed", "{r}");
        assert_eq!(r["left_open"], serde_json::json!([]), "{r}");
        assert_eq!(vm.checkpoints(), before, "seed {seed}: after recover");
        let leaf = before.last().unwrap().name.clone();
        vm.next_backup_hangs_off(&leaf);
        import(&vm, &db);
    }
    vm.restore_and_compare();
    println!("backup_client: {KILL_ROUNDS} syncs killed mid-transaction in {tries} attempts");
    vm.report("sync --domain SIGKILLed, recover (3 rounds)");
}

/// Run `sync --domain` and SIGKILL it (by its pid) at a seeded moment
/// within `span` until one dies with its transaction open (not before its
/// intent, not after its end); a run that got through is undone by deleting
/// the metadata again. Returns the moment, the open transaction's status
/// and the attempts it took.
fn kill_resync_inside(
    vm: &Vm,
    db: &std::path::Path,
    rng: &mut testkit::rng::Rng,
    span: Duration,
    seed: u64,
) -> (Duration, Vec<serde_json::Value>, usize) {
    // Kill at a seeded moment within a whole run until one dies with
    // its transaction open (not before its intent, not after its end);
    // a run that got through is undone by deleting the metadata again.
    let mut attempts = 0;
    let (at, open) = loop {
        attempts += 1;
        assert!(
            attempts <= 60,
            "seed {seed}: no kill landed inside sync --domain in 60 attempts"
        );
        if !vm.names().is_empty() {
            vm.delete_metadata();
        }
        let at = rng.millis(0, span.as_millis() as u64);
        let cmd = rel::command_checked(db, &["sync", "--domain", vm.name(), "--json"]);
        let (out, killed) = rel::Running::spawn(cmd).kill_at(at);
        if !killed {
            out.expect(0, "sync --domain that outran its kill");
            continue;
        }
        let status = ckptstore(db, &["status", "--domain", vm.name()], 0);
        let open = status["incomplete"].as_array().unwrap().clone();
        if open.is_empty() {
            // Died before its intent: libvirt is untouched.
            assert_eq!(vm.names(), Vec::<String>::new(), "seed {seed}");
            continue;
        }
        break (at, open);
    };
    (at, open, attempts)
}

/// `sync --domain` SIGKILLed while it redefines, then the backup tool
/// starts a new chain before `recover` (a full backup: virtnbdbackup
/// deletes its checkpoints for real, bitmaps too, and makes a new
/// `virtnbdbackup.0`). The recovery must keep the new base as libvirt made
/// it and report it as foreign, leave no checkpoint of the old chain (their
/// bitmaps are gone), and the next incremental must hang off the new base.
/// (Without this, the recovery redefined the old `.0` over the new one and
/// `.1`, `.2` without bitmaps.) The old chain's bitmaps the lost metadata
/// hid from virtnbdbackup's deletes are then removed by `reclaim --apply`. The old chain's bitmaps the lost metadata
/// hid from virtnbdbackup's deletes are then removed by `reclaim --apply`.
#[test]
fn a_new_chain_between_a_kill_and_recover_is_kept() {
    let seed = testkit::rng::seed("CKPTSTORE_VNB_SEED");
    println!("backup_client: seed {seed} (CKPTSTORE_VNB_SEED={seed} replays the choices)");
    let mut rng = testkit::rng::Rng::new(seed);
    let mut vm = Vm::start("vnb-between", false);
    three_backups(&mut vm);
    let db = vm.work().join("journal.db");
    import(&vm, &db);
    let before = vm.checkpoints();
    vm.delete_metadata();
    let timed =
        rel::run_checked(&db, &["sync", "--domain", vm.name(), "--json"]).expect(0, "timed sync");
    assert_eq!(timed.json()["outcome"], "committed");
    assert_eq!(vm.checkpoints(), before);
    let span = timed.elapsed.max(Duration::from_millis(20));
    let (at, open, attempts) = kill_resync_inside(&vm, &db, &mut rng, span, seed);
    println!(
        "backup_client: sync --domain killed at {} ms (attempt {attempts}), {}/{} steps recorded, libvirt had {:?}; a full backup starts a new chain",
        at.as_millis(),
        open[0]["done"],
        open[0]["total"],
        vm.names()
    );
    vm.write_each_disk();
    assert_eq!(vm.backup(Level::Full), ckpt(0));
    let base = vm.checkpoint(&ckpt(0));
    let r = ckptstore(&db, &["recover", "--domain", vm.name()], 0);
    println!("backup_client: recover after a new chain: {r}");
    assert_eq!(names(&r["recovered"][0]["foreign"]), [ckpt(0)], "{r}");
    assert_eq!(r["left_open"], serde_json::json!([]), "{r}");
    assert_eq!(
        vm.checkpoints(),
        [base],
        "seed {seed}: recover must keep only the new base: {r}"
    );
    let refused = vm.failing_validation();
    assert!(
        refused.is_empty(),
        "seed {seed}: REDEFINE_VALIDATE refuses {refused:?}"
    );
    // The journal's committed chain is what was applied: the new base.
    let status = ckptstore(&db, &["status", "--domain", vm.name()], 0);
    assert_eq!(status["domains"][0]["checkpoints"], 1, "{status}");
    assert_eq!(status["domains"][0]["leaf"], ckpt(0), "{status}");
    // The old chain's bitmaps that libvirt no longer named when the new
    // chain began (the metadata was lost, and the killed sync had not put
    // all of it back) were beyond virtnbdbackup's real deletes: they stay,
    // and its next incremental would fail ("Bitmap already exists").
    // `reclaim --apply` removes them; QEMU holds a bitmap made while it runs
    // only in memory, so the domain is stopped for it.
    let stale: Vec<String> = vm
        .bitmaps(0)
        .into_iter()
        .filter(|b| *b != ckpt(0))
        .collect();
    let r = vm.while_stopped(|| ckptstore(&db, &["reclaim", "--domain", vm.name(), "--apply"], 0));
    println!("backup_client: reclaim after recover ({stale:?} left by the old chain): {r}");
    let mut removed: Vec<String> = r["orphans"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["target"] == "vda")
        .map(|o| o["bitmap"].as_str().unwrap().to_string())
        .collect();
    removed.sort();
    assert_eq!(removed, stale, "{r}");
    for disk in 0..vnb::DISKS {
        assert_eq!(vm.bitmaps(disk), [ckpt(0)], "after reclaim: {r}");
    }
    assert_eq!(
        vm.checkpoint(&ckpt(0)),
        vm.checkpoints()[0],
        "reclaim must keep the base: {r}"
    );
    vm.next_backup_hangs_off(&ckpt(0));
    vm.restore_and_compare();
    vm.report("sync --domain SIGKILLed, a new chain, recover, reclaim");
}

/// A backup made after the journal's last `import`, then `sync --domain`:
/// the newer checkpoint is adopted (kept, and joined to the committed
/// chain), and the next backup hangs off it. (A re-apply that made libvirt
/// exactly the stale chain deleted `virtnbdbackup.2` and left its bitmaps
/// as orphans; the next incremental failed: "Checkpoint 'virtnbdbackup.2'
/// for incremental backup of disk 'vda' not found".)
#[test]
fn stale_journal_newer_backup() {
    let mut vm = Vm::start("vnb-newer", false);
    vm.write_each_disk();
    vm.backup(Level::Full);
    vm.next_backup_hangs_off(&ckpt(0));
    let db = vm.work().join("journal.db");
    import(&vm, &db);
    // A backup the journal has not seen.
    vm.next_backup_hangs_off(&ckpt(1));
    let before = vm.checkpoints();
    let r = ckptstore(&db, &["sync", "--domain", vm.name()], 0);
    println!("backup_client: sync --domain with a newer backup: {r}");
    assert_eq!(names(&r["adopted"]), [ckpt(2)], "{r}");
    assert_eq!(r["libvirt_calls"], 0, "{r}");
    assert_eq!(
        vm.checkpoints(),
        before,
        "sync --domain must keep the newer checkpoint {}: {r}",
        ckpt(2)
    );
    vm.next_backup_hangs_off(&ckpt(2));
    vm.restore_and_compare();
    vm.report("stale journal: a backup after the last import, sync --domain");
}

/// The backup tool started a new chain (virtnbdbackup deleted its
/// checkpoints and their bitmaps for real, then a full backup made a new
/// `virtnbdbackup.0`), then `sync --domain` with the journal's old chain:
/// the new base must be kept as libvirt made it, no checkpoint may be left
/// that libvirt's `REDEFINE_VALIDATE` refuses, and the next backup must
/// hang off the new base. (A re-apply that made libvirt exactly the stale
/// chain replaced the new `virtnbdbackup.0` with the old one and redefined
/// `.1` and `.2`, whose bitmaps no longer existed; the next incremental
/// failed: "domain moment virtnbdbackup.1 already exists".)
#[test]
fn stale_journal_new_chain() {
    let mut vm = Vm::start("vnb-newchain", false);
    three_backups(&mut vm);
    let db = vm.work().join("journal.db");
    import(&vm, &db);
    vm.write_each_disk();
    assert_eq!(vm.backup(Level::Full), ckpt(0));
    assert_eq!(vm.names(), [ckpt(0)]);
    for disk in 0..vnb::DISKS {
        assert_eq!(vm.bitmaps(disk), [ckpt(0)], "the old chain's bitmaps");
    }
    let base = vm.checkpoint(&ckpt(0));
    let r = ckptstore(&db, &["sync", "--domain", vm.name()], 0);
    println!("backup_client: sync --domain after a new chain: {r}");
    assert_eq!(names(&r["foreign"]), [ckpt(0)], "{r}");
    assert_eq!(r["libvirt_calls"], 0, "{r}");
    assert_eq!(
        vm.checkpoint(&ckpt(0)),
        base,
        "sync --domain must keep the new base as libvirt made it: {r}"
    );
    let refused = vm.failing_validation();
    assert!(
        refused.is_empty(),
        "checkpoints libvirt's REDEFINE_VALIDATE refuses after sync --domain: {refused:?}"
    );
    vm.next_backup_hangs_off(&ckpt(0));
    vm.restore_and_compare();
    vm.report("stale journal: a new chain, sync --domain");
}
