//! Hostile input to the library: each gets a typed error, never a panic,
//! and leaves libvirt (the fake) and the journal as they were. Plus bounded
//! fuzzing of the chain parser and the libvirt XML parsers.

use testkit::sim;

use std::collections::BTreeMap;

use ckptstore::testing::JournalOptions;
use ckptstore::testing::{parse_checkpoint, parse_domain, render_checkpoint};
use ckptstore::testing::{FakeBackend, Op};
use ckptstore::MAX_CHECKPOINTS;
use ckptstore::{Chain, ChainError, Error, Store, StoreOptions};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use sim::*;

fn fake() -> FakeBackend {
    let f = FakeBackend::new();
    f.define_domain(DOMAIN, VM_UUID, &["sda", "sdb"], false);
    f
}

/// libvirt and the journal are exactly as before.
fn assert_untouched(f: &FakeBackend, store: &Store) {
    assert_eq!(
        f.calls(Op::Redefine) + f.calls(Op::Delete),
        0,
        "libvirt was changed"
    );
    assert!(
        store.history(DOMAIN, 10).unwrap().transactions.is_empty(),
        "the journal was written"
    );
    assert!(store.status(None).unwrap().domains.is_empty());
}

/// Which [`ChainError`] a case expects.
type KindCheck = fn(&ChainError) -> bool;

#[test]
fn structurally_bad_chains_are_refused_by_name() {
    let f = fake();
    let store = TempJournal::new().store(1);
    let cases: Vec<(Chain, KindCheck)> = vec![
        (
            {
                let mut c = linear_chain(3, 1);
                c.checkpoints[2].id = c.checkpoints[0].id.clone();
                c
            },
            |e| matches!(e, ChainError::Duplicate(_)),
        ),
        (
            {
                let mut c = linear_chain(3, 1);
                c.checkpoints[1].parent = Some(ckpt_id(77));
                c
            },
            |e| matches!(e, ChainError::UnknownParent { .. }),
        ),
        (
            {
                let mut c = linear_chain(3, 1);
                c.checkpoints[0].parent = Some(ckpt_id(2));
                c
            },
            |e| matches!(e, ChainError::Cycle(_)),
        ),
        (
            {
                let mut c = linear_chain(1, 1);
                c.checkpoints[0].parent = Some(ckpt_id(0));
                c
            },
            |e| matches!(e, ChainError::Cycle(_)),
        ),
        (
            {
                let mut c = linear_chain(2, 1);
                c.checkpoints[1].disks = vec![disk_id(5)];
                c
            },
            |e| matches!(e, ChainError::NoDisks(_)),
        ),
        (
            {
                let mut c = linear_chain(1, 1);
                c.disks.insert(disk_id(0), "../../etc/passwd".into());
                c
            },
            |e| matches!(e, ChainError::BadTarget { .. }),
        ),
        (
            {
                let mut c = linear_chain(1, 1);
                c.disks.insert(disk_id(0), "sda'/><disk name='sdb".into());
                c
            },
            |e| matches!(e, ChainError::BadTarget { .. }),
        ),
        (
            Chain {
                domain: Some("../../run/evil".into()),
                ..linear_chain(1, 1)
            },
            |e| matches!(e, ChainError::BadDomain(_)),
        ),
        (
            Chain {
                domain: Some(String::new()),
                ..linear_chain(1, 1)
            },
            |e| matches!(e, ChainError::BadDomain(_)),
        ),
        (
            {
                let mut c = linear_chain(1, 1);
                c.checkpoints[0].created = chrono::DateTime::from_timestamp(0, 0).unwrap();
                c
            },
            |e| matches!(e, ChainError::BadTime(_)),
        ),
    ];
    for (chain, kind) in cases.into_iter().chain(bad_names()) {
        match store.sync(&f, chain) {
            Err(Error::Chain(e)) => assert!(kind(&e), "unexpected error kind: {e}"),
            other => panic!("expected a chain error, got {other:?}"),
        }
    }
    assert_untouched(&f, &store);
}

/// A chain whose checkpoint 1 is named `name` (its child follows).
fn renamed(name: &str) -> Chain {
    let mut c = linear_chain(3, 1);
    let old = c.checkpoints[1].id.clone();
    for cp in &mut c.checkpoints {
        if cp.id == old {
            cp.id = name.to_string();
        }
        if cp.parent.as_deref() == Some(old.as_str()) {
            cp.parent = Some(name.to_string());
        }
    }
    c
}

/// Names libvirt would refuse as a checkpoint's, or QEMU as a bitmap's;
/// disk ids that are empty.
fn bad_names() -> Vec<(Chain, KindCheck)> {
    let bad_id: KindCheck = |e| matches!(e, ChainError::BadId { .. });
    let mut cases: Vec<(Chain, KindCheck)> = [
        "",
        "../../etc",
        ".hidden",
        "a/b",
        "two words",
        "line\nbreak",
        "nul\0byte",
        "<x/>",
        "quote'",
        "amp&amp;",
        "caf\u{e9}",
    ]
    .iter()
    .map(|n| (renamed(n), bad_id))
    .collect();
    cases.push((renamed(&"n".repeat(1024)), bad_id));
    let mut empty_in_map = linear_chain(1, 1);
    empty_in_map.disks.insert(String::new(), "sdb".into());
    cases.push((empty_in_map, |e| matches!(e, ChainError::EmptyDiskId)));
    let mut empty_in_checkpoint = linear_chain(1, 1);
    empty_in_checkpoint.checkpoints[0].disks.push(String::new());
    cases.push((empty_in_checkpoint, |e| {
        matches!(e, ChainError::EmptyDiskId)
    }));
    cases
}

#[test]
fn names_libvirt_or_qemu_would_refuse_say_why() {
    let e = renamed("a/b").validate().unwrap_err();
    assert_eq!(
        e.to_string(),
        "checkpoint id \"a/b\" is not a valid checkpoint name: it contains '/'; \
         libvirt accepts only letters, digits, '_', '-' and '.' (not first)"
    );
    let e = renamed(&"n".repeat(1024)).validate().unwrap_err();
    assert!(
        e.to_string()
            .ends_with("it is longer than 1023 bytes, QEMU's limit for a bitmap name"),
        "{e}"
    );
    let e = renamed(".x").validate().unwrap_err();
    assert!(
        e.to_string()
            .ends_with("it starts with '.', which libvirt refuses"),
        "{e}"
    );
}

/// Backup tools name their checkpoints as they like; any name libvirt
/// takes is a checkpoint id, and any non-empty string a disk id.
#[test]
fn names_of_real_backup_tools_sync() {
    for names in [
        vec!["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2"],
        vec!["one-31-0", "one-31-1", "one-31-2"],
        vec!["nightly-20261130", "nightly-20261201", "_x.y-z"],
    ] {
        let f = fake();
        let store = TempJournal::new().store(1);
        let mut c = linear_chain(3, 2);
        c.disks = BTreeMap::from([("disk-a".into(), "sda".into()), ("0".into(), "sdb".into())]);
        for (i, cp) in c.checkpoints.iter_mut().enumerate() {
            cp.id = names[i].to_string();
            cp.parent = i.checked_sub(1).map(|p| names[p].to_string());
            cp.disks = vec!["disk-a".into(), "0".into()];
        }
        let long = "n".repeat(1023);
        c.checkpoints[2].id = long.clone();
        store.sync(&f, c.clone()).unwrap();
        let listed: Vec<String> = f.peek(DOMAIN).into_iter().map(|d| d.name).collect();
        assert_eq!(
            listed,
            vec![names[0].to_string(), names[1].to_string(), long]
        );
        // Each disk's bitmap is named after the checkpoint.
        let last = f.peek(DOMAIN).pop().unwrap();
        assert!(last.disks.values().all(|b| *b == last.name));
        // Again: nothing to do.
        assert_eq!(store.sync(&f, c).unwrap().libvirt_calls, 0);
    }
}

#[test]
fn a_hundred_thousand_checkpoints_are_refused_before_anything_is_done() {
    let f = fake();
    let store = TempJournal::new().store(1);
    let chain = linear_chain(100_000, 1);
    let err = store.sync(&f, chain).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Chain(ChainError::TooLarge {
                count: 100_000,
                max: MAX_CHECKPOINTS
            })
        ),
        "{err}"
    );
    assert_untouched(&f, &store);
}

#[test]
fn malformed_json_and_wrong_types_are_serde_errors() {
    for bad in [
        "",
        "{",
        "[]",
        r#"{"vm_id": 5, "disks": {}, "checkpoints": []}"#,
        r#"{"vm_id": "not-a-uuid", "disks": {}, "checkpoints": []}"#,
        r#"{"vm_id": "93a5c045-6457-2c09-e56c-927cdf34e178", "disks": {"x": 5}, "checkpoints": []}"#,
        r#"{"vm_id": "93a5c045-6457-2c09-e56c-927cdf34e178", "disks": {}, "checkpoints": [{"id": 7, "created": "2020-01-01T00:00:00Z", "disks": []}]}"#,
        r#"{"vm_id": "93a5c045-6457-2c09-e56c-927cdf34e178", "disks": {}, "checkpoints": [], "surprise": 1}"#,
        r#"{"vm_id": "93a5c045-6457-2c09-e56c-927cdf34e178", "disks": {}, "checkpoints": [{"id": "7b1e2a8c-0c1f-4a0e-9a52-2f6f3b7d9c10", "created": "yesterday", "disks": []}]}"#,
    ] {
        assert!(
            serde_json::from_str::<Chain>(bad).is_err(),
            "accepted: {bad}"
        );
    }
}

#[test]
fn descriptions_with_markup_come_out_escaped() {
    let f = fake();
    let store = TempJournal::new().store(1);
    let mut chain = linear_chain(2, 1);
    let evil = "]]></description><domain type='kvm'><name>evil</name></domain><description>&amp; <![CDATA[x]]>";
    chain.checkpoints[1].description = Some(evil.into());
    store.sync(&f, chain.clone()).unwrap();
    // The XML sent to libvirt parses back to exactly the same text.
    let def = chain.validate().unwrap().defs().pop().unwrap();
    let xml = render_checkpoint(&def);
    assert!(
        !xml.contains("<domain ") && !xml.contains("</domain>") && !xml.contains("<![CDATA"),
        "{xml}"
    );
    assert_eq!(
        parse_checkpoint(&xml).unwrap().description.as_deref(),
        Some(evil)
    );
    assert_eq!(f.peek(DOMAIN)[1].description.as_deref(), Some(evil));
}

#[test]
fn a_full_journal_changes_nothing_in_libvirt() {
    let f = fake();
    let j = TempJournal::new();
    drop(j.store(1)); // create and migrate
    let pages: u64 = {
        let c = rusqlite::Connection::open(j.path()).unwrap();
        c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap()
    };
    let store = Store::open_with(
        j.path(),
        StoreOptions {
            journal: JournalOptions {
                max_page_count: Some(pages),
                ..JournalOptions::default()
            },
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let err = store.sync(&f, linear_chain(200, 2)).unwrap_err();
    assert!(err.is_journal(), "{err}");
    assert!(err.to_string().contains("full"), "{err}");
    assert_eq!(
        f.calls(Op::Redefine) + f.calls(Op::Delete),
        0,
        "no libvirt call without a committed intent"
    );
    assert_eq!(store.journal().integrity_check().unwrap(), "ok");
}

/// A bounded fuzz run: the count of executions is printed; set
/// `CKPTSTORE_FUZZ_CASES` for a longer run, `CKPTSTORE_FUZZ_SEED` to replay.
fn runner(default_cases: u32) -> (TestRunner, u64, u32) {
    let cases = std::env::var("CKPTSTORE_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_cases);
    let seed = std::env::var("CKPTSTORE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(seed_from_env);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    (
        TestRunner::new_with_rng(
            Config {
                cases,
                failure_persistence: None,
                ..Config::default()
            },
            rng,
        ),
        seed,
        cases,
    )
}

fn mutate(base: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut v = base.to_vec();
    for &(pos, byte, how) in edits {
        if v.is_empty() {
            v.push(byte);
            continue;
        }
        let i = pos % v.len();
        match how % 4 {
            0 => v[i] = byte,
            1 => v.insert(i, byte),
            2 => {
                v.remove(i);
            }
            _ => v.truncate(i),
        }
    }
    v
}

#[test]
fn fuzz_the_chain_parser_and_validation() {
    let base = serde_json::to_vec(&linear_chain(4, 2)).unwrap();
    let (mut runner, seed, cases) = runner(100_000);
    println!("chain fuzz: seed {seed}, {cases} cases");
    let runs = std::sync::atomic::AtomicU32::new(0);
    let started = std::time::Instant::now();
    runner
        .run(
            &proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..12),
            |edits| {
                runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let input = mutate(&base, &edits);
                if let Ok(s) = std::str::from_utf8(&input) {
                    if let Ok(chain) = serde_json::from_str::<Chain>(s) {
                        if let Ok(v) = chain.validate() {
                            for d in v.defs() {
                                prop_assert_eq!(
                                    parse_checkpoint(&render_checkpoint(&d)).unwrap(),
                                    d
                                );
                            }
                        }
                    }
                }
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("chain fuzz failed (seed {seed}): {e}"));
    println!(
        "chain fuzz: {} executions in {} ms, 0 panics",
        runs.into_inner(),
        started.elapsed().as_millis()
    );
}

#[test]
fn fuzz_the_libvirt_xml_parsers() {
    let ckpt = render_checkpoint(&ckptstore::CheckpointDef {
        name: "c2".into(),
        parent: Some("c1".into()),
        creation_time: 1_700_000_000,
        description: Some("d & <e>".into()),
        disks: BTreeMap::from([("vda".into(), "c2".into()), ("vdb".into(), "c2".into())]),
    });
    let dom = "<domain type='qemu'><name>d</name><uuid>93a5c045-6457-2c09-e56c-927cdf34e178</uuid><devices>\
               <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/a.qcow2'/>\
               <backingStore type='file'><source file='/b.qcow2'/><backingStore/></backingStore>\
               <target dev='vda'/></disk></devices></domain>";
    let (mut runner, seed, cases) = runner(100_000);
    println!("xml fuzz: seed {seed}, {cases} cases per parser");
    let runs = std::sync::atomic::AtomicU32::new(0);
    let started = std::time::Instant::now();
    runner
        .run(
            &proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..12),
            |edits| {
                runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let c = mutate(ckpt.as_bytes(), &edits);
                let d = mutate(dom.as_bytes(), &edits);
                let _ = parse_checkpoint(&String::from_utf8_lossy(&c));
                let _ = parse_domain(&String::from_utf8_lossy(&d), false);
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("xml fuzz failed (seed {seed}): {e}"));
    println!(
        "xml fuzz: {} executions of each parser in {} ms, 0 panics",
        runs.into_inner(),
        started.elapsed().as_millis()
    );
}
