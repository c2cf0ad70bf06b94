//! `metrics` on the fake backend: the text is read back by a real parser of
//! Prometheus' text format (`openmetrics-parser`, grammar-based, label
//! values unescaped), and its values are the journal's: the committed
//! chain's size, open transactions by owner liveness, counters that survive
//! history pruning, the last validate's findings going back to 0.

use std::collections::BTreeMap;
use std::sync::Arc;

use openmetrics_parser::prometheus::parse_prometheus;
use openmetrics_parser::{PrometheusType, PrometheusValue};
use testkit::sim::*;

use ckptstore::testing::{validate_with, FakeBackend, Fault, Op, Phase};
use ckptstore::{
    BackendErrorKind, BitmapPolicy, DomainMetrics, FindingKind, Metrics, Outcome, Policy, Store,
    StoreOptions, TxnKind, TxnState,
};

/// A sample: its label set (name → value) and value.
type Samples = BTreeMap<String, Vec<(BTreeMap<String, String>, f64)>>;

/// The text parsed by the parser, every family with HELP and its TYPE, as
/// family name → samples.
fn parse(text: &str) -> (Samples, BTreeMap<String, PrometheusType>) {
    let exp = parse_prometheus(text).unwrap_or_else(|e| panic!("not Prometheus text: {e}\n{text}"));
    let mut samples = Samples::new();
    let mut types = BTreeMap::new();
    for (name, fam) in &exp.families {
        assert!(!fam.help.is_empty(), "{name} has a HELP line");
        types.insert(name.clone(), fam.family_type.clone());
        let out = samples.entry(name.clone()).or_default();
        for s in fam.iter_samples() {
            let set = s.get_labelset().unwrap();
            let labels = set.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let value = match &s.value {
                PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => n.as_f64(),
                PrometheusValue::Counter(c) => c.value.as_f64(),
                other => panic!("{name}: unexpected value {other:?}"),
            };
            out.push((labels, value));
        }
    }
    (samples, types)
}

/// The value of family `name` at exactly these labels.
fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    samples
        .get(name)?
        .iter()
        .find(|(l, _)| *l == want)
        .map(|(_, v)| *v)
}

fn fake_with(domain: &str) -> Arc<FakeBackend> {
    let fake = Arc::new(FakeBackend::new());
    fake.define_domain(domain, VM_UUID, &["sda", "sdb"], false);
    fake
}

fn store(j: &TempJournal, fake: &Arc<FakeBackend>, history: Option<usize>) -> Store {
    let s = j.store_with_images(1, fake, BitmapPolicy::Ignore);
    match history {
        None => s,
        Some(h) => {
            drop(s);
            let mut opts = StoreOptions {
                history: h,
                bitmaps: BitmapPolicy::Ignore,
                ..StoreOptions::default()
            };
            opts.seams.liveness = Some(Arc::new(|_| false));
            Store::open_with(j.path(), opts).unwrap()
        }
    }
}

fn chain_for(domain: &str, n: usize) -> ckptstore::Chain {
    let mut c = linear_chain(n, 2);
    c.domain = Some(domain.to_string());
    c
}

fn only(m: &Metrics) -> &DomainMetrics {
    assert_eq!(m.domains.len(), 1, "{m:?}");
    &m.domains[0]
}

fn count(d: &DomainMetrics, kind: TxnKind, outcome: TxnState) -> u64 {
    d.transactions
        .iter()
        .find(|t| t.kind == kind && t.outcome == outcome)
        .unwrap()
        .count
}

#[test]
fn the_text_parses_and_its_checkpoint_count_is_the_committed_chains() {
    let fake = fake_with(DOMAIN);
    let j = TempJournal::new();
    let store = store(&j, &fake, None);
    let empty = store.metrics().unwrap();
    assert!(empty.domains.is_empty());
    let (samples, types) = parse(&empty.to_prometheus());
    assert_eq!(
        types.len(),
        6,
        "every family has its HELP and TYPE: {types:?}"
    );
    assert!(samples.values().all(Vec::is_empty));

    assert_eq!(
        store.sync(&*fake, chain_for(DOMAIN, 5)).unwrap().outcome,
        Outcome::Committed
    );
    assert_eq!(
        store.sync(&*fake, chain_for(DOMAIN, 5)).unwrap().outcome,
        Outcome::Unchanged
    );
    let m = store.metrics().unwrap();
    let d = only(&m);
    let committed = store.committed(DOMAIN).unwrap().unwrap();
    assert_eq!(d.checkpoints, Some(committed.defs.len() as u64));
    assert_eq!(d.checkpoints, Some(5));
    assert_eq!(
        count(d, TxnKind::Sync, TxnState::Committed),
        2,
        "unchanged counts as committed"
    );
    assert_eq!(d.transactions.len(), 12, "6 kinds × 2 outcomes");
    assert!(d.last_validate.is_none());

    let text = m.to_prometheus();
    let (s, types) = parse(&text);
    assert_eq!(
        types["ckptstore_transactions_total"],
        PrometheusType::Counter
    );
    for g in [
        "ckptstore_checkpoints",
        "ckptstore_open_transactions",
        "ckptstore_last_commit_timestamp_seconds",
        "ckptstore_validate_findings",
        "ckptstore_last_validate_timestamp_seconds",
    ] {
        assert_eq!(types[g], PrometheusType::Gauge, "{g}");
    }
    assert_eq!(
        value(&s, "ckptstore_checkpoints", &[("domain", DOMAIN)]),
        Some(5.0)
    );
    for alive in ["true", "false"] {
        let labels = [("domain", DOMAIN), ("owner_alive", alive)];
        assert_eq!(value(&s, "ckptstore_open_transactions", &labels), Some(0.0));
    }
    let total = |kind: &str, outcome: &str| {
        let labels = [("domain", DOMAIN), ("kind", kind), ("outcome", outcome)];
        value(&s, "ckptstore_transactions_total", &labels)
    };
    assert_eq!(total("sync", "committed"), Some(2.0));
    assert_eq!(total("sync", "rolled_back"), Some(0.0));
    assert_eq!(total("prune", "committed"), Some(0.0));
    assert_eq!(s["ckptstore_transactions_total"].len(), 12);
    // The commit was just now, to the millisecond.
    let at = value(
        &s,
        "ckptstore_last_commit_timestamp_seconds",
        &[("domain", DOMAIN)],
    )
    .unwrap();
    let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    assert!((now - at).abs() < 60.0, "{at} vs now {now}");
    assert!(
        s["ckptstore_validate_findings"].is_empty(),
        "never validated"
    );
    assert!(s["ckptstore_last_validate_timestamp_seconds"].is_empty());

    // The JSON document is the same type, and reads back as itself.
    let json = serde_json::to_string(&m).unwrap();
    let back: Metrics = serde_json::from_str(&json).unwrap();
    assert_eq!(back, m);
}

#[test]
fn counters_never_go_backwards_when_history_is_pruned() {
    let fake = fake_with(DOMAIN);
    let j = TempJournal::new();
    let store = store(&j, &fake, Some(1));
    let mut seen = Vec::new();
    for n in 1..=6 {
        store.sync(&*fake, chain_for(DOMAIN, n)).unwrap();
        let m = store.metrics().unwrap();
        seen.push(count(only(&m), TxnKind::Sync, TxnState::Committed));
    }
    assert_eq!(seen, [1, 2, 3, 4, 5, 6]);
    // A refused redefine: the sync rolls back, and is counted so.
    fake.inject(Fault {
        op: Some(Op::Redefine),
        nth: 1,
        phase: Phase::BeforeEffect,
        kind: BackendErrorKind::InvalidArgument,
        forever: false,
    });
    let e = store.sync(&*fake, chain_for(DOMAIN, 7)).unwrap_err();
    assert!(e.to_string().contains("rolled back"), "{e}");
    let history = store.history(DOMAIN, 100).unwrap();
    assert_eq!(history.transactions.len(), 1, "history = 1 keeps one");
    assert_eq!(history.transactions[0].state, TxnState::RolledBack);
    let m = store.metrics().unwrap();
    let d = only(&m);
    assert_eq!(count(d, TxnKind::Sync, TxnState::Committed), 6);
    assert_eq!(count(d, TxnKind::Sync, TxnState::RolledBack), 1);
    assert_eq!(
        d.checkpoints,
        Some(6),
        "the rollback left the committed chain"
    );
    let (s, _) = parse(&m.to_prometheus());
    let labels = [
        ("domain", DOMAIN),
        ("kind", "sync"),
        ("outcome", "committed"),
    ];
    assert_eq!(
        value(&s, "ckptstore_transactions_total", &labels),
        Some(6.0)
    );
}

#[test]
fn open_transactions_are_told_apart_by_owner_liveness_and_recover_counts() {
    quiet_crashes();
    let fake = fake_with(DOMAIN);
    let j = TempJournal::new();
    let crashing = j.store_crashing_at(7, 4);
    assert!(run_crashing(|| crashing.sync(&*fake, chain_for(DOMAIN, 4))).is_none());
    drop(crashing);
    let store = store(&j, &fake, None);
    let m = store.metrics().unwrap();
    let d = only(&m);
    assert_eq!(
        (
            d.open_transactions.owner_alive,
            d.open_transactions.owner_dead
        ),
        (0, 1)
    );
    assert_eq!(d.checkpoints, None, "nothing committed yet");
    assert_eq!(d.last_commit_at, None);
    let (s, _) = parse(&m.to_prometheus());
    let open = |alive| {
        value(
            &s,
            "ckptstore_open_transactions",
            &[("domain", DOMAIN), ("owner_alive", alive)],
        )
    };
    assert_eq!((open("false"), open("true")), (Some(1.0), Some(0.0)));
    assert!(s["ckptstore_checkpoints"].is_empty());

    let rec = store.recover(&*fake, Policy::Resume, None).unwrap();
    assert_eq!(rec.recovered[0].outcome, Outcome::Committed);
    let m = store.metrics().unwrap();
    let d = only(&m);
    assert_eq!(
        (
            d.open_transactions.owner_alive,
            d.open_transactions.owner_dead
        ),
        (0, 0)
    );
    assert_eq!(count(d, TxnKind::Sync, TxnState::Committed), 1);
    assert_eq!(d.checkpoints, Some(4));
}

#[test]
fn domain_names_are_escaped_and_read_back_as_they_are() {
    for name in ["vm \"prod\" \\ eu", "back\\slash", "a,b=c}{d", "é-ü"] {
        let fake = fake_with(name);
        let j = TempJournal::new();
        let store = store(&j, &fake, None);
        store.sync(&*fake, chain_for(name, 2)).unwrap();
        let text = store.metrics().unwrap().to_prometheus();
        let (s, _) = parse(&text);
        assert_eq!(
            value(&s, "ckptstore_checkpoints", &[("domain", name)]),
            Some(2.0),
            "{name}: {text}"
        );
    }
    // A newline, which no libvirt name holds, is escaped too.
    let m: Metrics = serde_json::from_value(serde_json::json!({"domains": [{
        "domain": "two\nlines \"q\" \\",
        "checkpoints": 3,
        "last_commit_at": "2024-05-01T09:00:00.042Z",
        "open_transactions": {"owner_alive": 0, "owner_dead": 0},
        "transactions": [],
        "last_validate": null
    }]}))
    .unwrap();
    let text = m.to_prometheus();
    assert!(
        text.contains(r#"ckptstore_checkpoints{domain="two\nlines \"q\" \\"} 3"#),
        "{text}"
    );
    let (s, _) = parse(&text);
    let name = "two\nlines \"q\" \\";
    assert_eq!(
        value(&s, "ckptstore_checkpoints", &[("domain", name)]),
        Some(3.0)
    );
    assert_eq!(
        value(
            &s,
            "ckptstore_last_commit_timestamp_seconds",
            &[("domain", name)]
        ),
        Some(1_714_554_000.042)
    );
}

#[test]
fn validate_findings_appear_then_drop_to_zero_after_a_clean_validate() {
    let fake = fake_with(DOMAIN);
    let j = TempJournal::new();
    let store = store(&j, &fake, None);
    store.sync(&*fake, chain_for(DOMAIN, 3)).unwrap();
    let names: Vec<String> = fake.peek(DOMAIN).into_iter().map(|d| d.name).collect();
    for n in &names {
        for disk in ["sda", "sdb"] {
            fake.add_bitmap(DOMAIN, disk, n);
        }
    }
    let images = FakeImages(fake.clone());
    let findings = |store: &Store| {
        let m = store.metrics().unwrap();
        let v = only(&m).last_validate.clone().expect("validated");
        let (s, _) = parse(&m.to_prometheus());
        assert!(value(
            &s,
            "ckptstore_last_validate_timestamp_seconds",
            &[("domain", DOMAIN)]
        )
        .is_some());
        let mut out = BTreeMap::new();
        for kind in FindingKind::ALL {
            let labels = [("domain", DOMAIN), ("kind", kind.as_str())];
            let text = value(&s, "ckptstore_validate_findings", &labels)
                .unwrap_or_else(|| panic!("{kind} is always written"));
            let doc = v.findings.iter().find(|f| f.kind == *kind).unwrap().count;
            assert_eq!(Some(text), Some(doc as f64));
            out.insert(kind.as_str(), doc);
        }
        out
    };
    let r = validate_with(&store, &*fake, DOMAIN, &images).unwrap();
    assert!(r.ok, "{r:?}");
    assert!(findings(&store).values().all(|&n| n == 0));

    // Two bitmaps gone and one stray: the findings show, by kind.
    fake.remove_bitmap(DOMAIN, "sda", &names[1]);
    fake.remove_bitmap(DOMAIN, "sdb", &names[2]);
    fake.add_bitmap(DOMAIN, "sda", "stray");
    let r = validate_with(&store, &*fake, DOMAIN, &images).unwrap();
    assert_eq!(r.findings.len(), 3, "{r:?}");
    let f = findings(&store);
    assert_eq!((f["missing_bitmap"], f["orphan_bitmap"]), (2, 1));
    assert_eq!(f.values().sum::<u64>(), 3);

    // Repaired: every kind back to 0, still written.
    fake.add_bitmap(DOMAIN, "sda", &names[1]);
    fake.add_bitmap(DOMAIN, "sdb", &names[2]);
    fake.remove_bitmap(DOMAIN, "sda", "stray");
    assert!(validate_with(&store, &*fake, DOMAIN, &images).unwrap().ok);
    let f = findings(&store);
    assert_eq!(f.len(), FindingKind::ALL.len());
    assert!(f.values().all(|&n| n == 0), "{f:?}");
}

#[test]
fn a_schema_3_journal_starts_its_counters_from_the_history_it_holds() {
    let j = TempJournal::new();
    {
        let conn = rusqlite::Connection::open(j.path()).unwrap();
        for m in &ckptstore::testing::MIGRATIONS[..3] {
            conn.execute_batch(m.sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 3).unwrap();
        for (i, (kind, state, at)) in [
            ("sync", "committed", "2024-05-01T09:00:00.000Z"),
            ("sync", "committed", "2024-05-02T09:00:00.000Z"),
            ("sync", "rolled_back", "2024-05-03T09:00:00.000Z"),
            ("import", "committed", "2024-05-04T09:00:00.000Z"),
            ("resync", "applying", "2024-05-05T09:00:00.000Z"),
        ]
        .into_iter()
        .enumerate()
        {
            conn.execute(
                "INSERT INTO txns (id, domain, kind, state, target_json, before_json, owner_pid, \
                 owner_boot_id, owner_start, started_at, updated_at, finished_at) \
                 VALUES (?1, 'd', ?2, ?3, '[]', '[]', 1, 'b', 1, ?4, ?4, \
                 CASE WHEN ?3 = 'applying' THEN NULL ELSE ?4 END)",
                [
                    &format!("00000000-0000-0000-0000-00000000000{i}"),
                    kind,
                    state,
                    at,
                ],
            )
            .unwrap();
        }
    }
    let store = j.store(1);
    let m = store.metrics().unwrap();
    let d = only(&m);
    assert_eq!(count(d, TxnKind::Sync, TxnState::Committed), 2);
    assert_eq!(count(d, TxnKind::Sync, TxnState::RolledBack), 1);
    assert_eq!(count(d, TxnKind::Import, TxnState::Committed), 1);
    assert_eq!(
        count(d, TxnKind::Resync, TxnState::Committed),
        0,
        "an open one is not counted"
    );
    assert_eq!(
        d.last_commit_at.as_deref(),
        Some("2024-05-04T09:00:00.000Z")
    );
    assert_eq!(
        (
            d.open_transactions.owner_alive,
            d.open_transactions.owner_dead
        ),
        (0, 1)
    );
}
