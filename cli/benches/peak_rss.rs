//! Peak memory of a 10,000-checkpoint sync, journal on the real disk
//! (`/var/tmp`):
//!
//! - through the library on the fake backend, 4 and 16 disks, each case in
//!   a child process of its own; the peak is the kernel's `VmHWM`
//!   (`/proc/self/status`), reset between phases through
//!   `/proc/self/clear_refs`. The fake holds its own copy of every
//!   checkpoint (libvirtd's share, in real life), and it is counted;
//! - the `ckptstore sync` command against `qemu:///system` (a shut-off
//!   domain with 4 disks whose images hold every checkpoint's bitmap, read
//!   by the default check; 5 to 15 minutes of libvirt calls), measured by
//!   `/usr/bin/time -v`. Skipped when the daemon does not answer.
//!
//! Run with `cargo bench --bench peak_rss`.

use testkit::support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use chrono::DateTime;
use ckptstore::FakeBackend;
use ckptstore::{BitmapPolicy, Chain, Checkpoint, Store, StoreOptions};
use testkit::sim::FakeImages;
use uuid::Uuid;

const CHECKPOINTS: usize = 10_000;
const CASE: &str = "CKPTSTORE_RSS_DISKS";
const CHECKED: &str = "CKPTSTORE_RSS_CHECKED";

/// `VmHWM` and `VmRSS` in KiB.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Make the peak the current size again.
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn chain(domain: &str, disks: usize) -> Chain {
    let disk = |i: usize| Uuid::from_u128(0xd15c_0000 + i as u128).to_string();
    let ckpt = |i: usize| Uuid::from_u128(0xc4e0_0000_0000 + i as u128).to_string();
    Chain {
        scope: None,
        vm_id: Uuid::from_u128(0x93a5_c045),
        domain: Some(domain.into()),
        disks: (0..disks)
            .map(|i| (disk(i), format!("vd{}", (b'a' + i as u8) as char)))
            .collect(),
        checkpoints: (0..CHECKPOINTS)
            .map(|i| Checkpoint {
                id: ckpt(i),
                parent: i.checked_sub(1).map(ckpt),
                created: DateTime::from_timestamp(1_600_000_000 + i as i64 * 3600, 0).unwrap(),
                description: Some(format!("nightly backup {i}")),
                disks: (0..disks).map(disk).collect(),
            })
            .collect(),
    }
}

/// One case, in this (child) process: prints one Markdown row per phase.
/// With `checked`, the sync checks every bitmap first (the default policy,
/// `degrade`) in images that hold them all (the fake's, read through the
/// image-reader seam as the qcow2 reader reads a shut-off domain's);
/// without, the bitmap policy is `ignore`.
fn case(disks: usize, checked: bool) {
    let (_, start) = memory();
    let chain = chain("rss", disks);
    let targets: Vec<String> = chain.disks.values().cloned().collect();
    let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
    let fake = Arc::new(FakeBackend::new());
    fake.define_domain(
        "rss",
        "93a5c045-6457-2c09-e56c-927cdf34e178",
        &targets,
        false,
    );
    let mut opts = StoreOptions {
        bitmaps: BitmapPolicy::Ignore,
        ..StoreOptions::default()
    };
    if checked {
        for c in &chain.checkpoints {
            for t in &targets {
                fake.add_bitmap("rss", t, &c.id);
            }
        }
        opts.bitmaps = BitmapPolicy::Degrade;
        opts.seams.images = Some(Arc::new(FakeImages(fake.clone())));
    }
    let checks = if checked { "degrade" } else { "ignore" };
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = Store::open_with(dir.path().join("journal.db"), opts).unwrap();
    let fake = &*fake;
    let (_, ready) = memory();
    let row = |phase: &str, secs: f64| {
        let (peak, now) = memory();
        println!(
            "| {CHECKPOINTS} × {disks} | {phase}, bitmaps {checks} | {:.1} | {:.1} | {:.1} | {:.1} | {secs:.1} |",
            mib(start),
            mib(ready),
            mib(peak),
            mib(now)
        );
    };
    reset_peak();
    let t = Instant::now();
    let r = store.sync(fake, chain.clone()).unwrap();
    assert_eq!(r.redefined.len(), CHECKPOINTS);
    assert!(r.degraded.is_empty() && r.unverified.is_empty() || !checked);
    row("sync into an empty domain", t.elapsed().as_secs_f64());
    // For a heap profile of the sync alone:
    // CKPTSTORE_RSS_DISKS=4 CKPTSTORE_RSS_SYNC_ONLY=1 heaptrack target/release/deps/peak_rss-*
    if std::env::var_os("CKPTSTORE_RSS_SYNC_ONLY").is_some() {
        return;
    }
    reset_peak();
    let t = Instant::now();
    let r = store.sync(fake, chain).unwrap();
    assert!(r.redefined.is_empty());
    row("no-op re-sync", t.elapsed().as_secs_f64());
}

/// `ckptstore sync` under `/usr/bin/time -v`: (peak RSS KiB, seconds, stdout).
fn timed_cli(args: &[&str]) -> (u64, f64, String) {
    // CKPTSTORE_RSS_WRAP=heaptrack: a heap profile of the command too.
    let mut cmd = Command::new("/usr/bin/time");
    cmd.arg("-v");
    if let Some(wrap) = std::env::var_os("CKPTSTORE_RSS_WRAP") {
        cmd.arg(wrap);
    }
    let out = cmd
        .arg(env!("CARGO_BIN_EXE_ckptstore"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ckptstore {args:?}: {err}");
    let field = |name: &str| {
        err.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map_or("", str::trim)
    };
    let peak = field("Maximum resident set size (kbytes):")
        .parse()
        .unwrap();
    // h:mm:ss or m:ss.cc
    let secs = field("Elapsed (wall clock) time (h:mm:ss or m:ss):")
        .split(':')
        .fold(0.0, |acc, part| {
            acc * 60.0 + part.parse::<f64>().unwrap_or(0.0)
        });
    (
        peak,
        secs,
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

/// The command on a shut-off `qemu:///system` domain with 4 disks.
fn cli_case() {
    virt::error::clear_error_callback();
    if virt::connect::Connect::open(Some(support::SYSTEM_URI)).is_err()
        || !Path::new("/usr/bin/time").exists()
    {
        println!("| {CHECKPOINTS} × 4 | `ckptstore sync` on qemu:///system | skipped: no daemon or no /usr/bin/time | | | | |");
        return;
    }
    let dom = support::TestDomain::define(&support::system(), "rss-cli", 4);
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let file = dir.path().join("chain.json");
    let chain = chain(&dom.name, 4);
    // The images hold every checkpoint's bitmap, and the command checks
    // them all (the default policy, degrade) with the qcow2 reader.
    let names: Vec<String> = chain.checkpoints.iter().map(|c| c.id.clone()).collect();
    for image in &dom.images {
        testkit::qemu::add_bitmaps(image, &names);
    }
    std::fs::write(&file, serde_json::to_vec(&chain).unwrap()).unwrap();
    let db = dir.path().join("journal.db");
    let args = [
        "--db",
        db.to_str().unwrap(),
        "--connect",
        support::SYSTEM_URI,
        "sync",
        "--chain",
        file.to_str().unwrap(),
    ];
    for phase in [
        "`ckptstore sync` into an empty domain, bitmaps degrade",
        "`ckptstore sync`, no-op re-sync, bitmaps degrade",
    ] {
        let (peak, secs, out) = timed_cli(&args);
        eprintln!("{out}");
        // Every checkpoint redefined (or already there) whole: no disk degraded.
        assert!(
            out.contains("10000 redefined") || out.contains("10000 unchanged"),
            "{out}"
        );
        assert!(
            !out.contains("degraded:") && !out.contains("unverified"),
            "{out}"
        );
        println!(
            "| {CHECKPOINTS} × 4 | {phase} (qemu:///system) | | | {:.1} | | {secs:.1} |",
            mib(peak)
        );
    }
}

fn main() {
    if let Ok(disks) = std::env::var(CASE) {
        case(disks.parse().unwrap(), std::env::var_os(CHECKED).is_some());
        return;
    }
    println!(
        "| checkpoints × disks | phase | RSS at start MiB | RSS with chain and fake MiB | peak (VmHWM) MiB \
         | RSS after MiB | seconds |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    // CKPTSTORE_RSS_ONLY=cli: the command's rows alone.
    let library = std::env::var("CKPTSTORE_RSS_ONLY").map_or(true, |v| v != "cli");
    for (disks, checked) in [(4, false), (4, true), (16, false), (16, true)] {
        if !library {
            break;
        }
        let me = std::env::current_exe().unwrap();
        let mut cmd = Command::new(me);
        cmd.env(CASE, disks.to_string());
        if checked {
            cmd.env(CHECKED, "1");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    cli_case();
}
