//! Mutation fuzzing of the qcow2 reader: real images made by `qemu-img`,
//! with random bytes, ranges and big-endian fields overwritten (biased
//! towards the header, the extensions and the bitmap directory), written to
//! a file and read with `read_image` and `read_chain`. Nothing may panic,
//! and whatever is accepted must respect QEMU's limits.
//!
//! `CKPTSTORE_FUZZ_CASES` sets the number of cases (default 5000, about
//! 12 s in a debug build); `CKPTSTORE_FUZZ_SEED` replays a seed printed by
//! an earlier run.

use testkit::qemu;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ckptstore::testing::qcow2::{read_chain, read_image, Image};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use qemu::{add_bitmap, create, disable_bitmap};

const DEFAULT_CASES: u32 = 5000;

/// A real image and the byte ranges worth mutating most.
struct Seed {
    name: &'static str,
    bytes: Vec<u8>,
    /// Header and extensions; the bitmap directory; the whole file.
    regions: [(usize, usize); 3],
}

#[derive(Debug, Clone)]
enum Mutation {
    Byte {
        region: usize,
        pos: u32,
        value: u8,
    },
    Fill {
        region: usize,
        pos: u32,
        len: u16,
        value: u8,
    },
    Field {
        region: usize,
        pos: u32,
        width: usize,
        value: u64,
    },
    Truncate {
        pos: u32,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let value = prop_oneof![
        Just(0u64),
        Just(1),
        Just(0x200),
        Just(0x1_0000),
        Just(0xffff),
        Just(0x8000_0000),
        Just(u64::from(u32::MAX)),
        Just(1 << 40),
        Just(u64::MAX),
        any::<u64>(),
    ];
    prop_oneof![
        4 => (0..3usize, any::<u32>(), any::<u8>()).prop_map(|(region, pos, value)| Mutation::Byte { region, pos, value }),
        1 => (0..3usize, any::<u32>(), 1..600u16, any::<u8>())
            .prop_map(|(region, pos, len, value)| Mutation::Fill { region, pos, len, value }),
        3 => (0..2usize, any::<u32>(), prop::sample::select(vec![1usize, 2, 4, 8]), value)
            .prop_map(|(region, pos, width, value)| Mutation::Field { region, pos, width, value }),
        1 => any::<u32>().prop_map(|pos| Mutation::Truncate { pos }),
    ]
}

fn apply(seed: &Seed, mutations: &[Mutation]) -> Vec<u8> {
    let mut bytes = seed.bytes.clone();
    let at = |bytes: &Vec<u8>, region: usize, pos: u32| {
        let (start, end) = seed.regions[region];
        let end = end.min(bytes.len());
        if start >= end {
            return None;
        }
        Some(start + pos as usize % (end - start))
    };
    for m in mutations {
        match *m {
            Mutation::Byte { region, pos, value } => {
                if let Some(i) = at(&bytes, region, pos) {
                    bytes[i] = value;
                }
            }
            Mutation::Fill {
                region,
                pos,
                len,
                value,
            } => {
                if let Some(i) = at(&bytes, region, pos) {
                    let end = (i + usize::from(len)).min(bytes.len());
                    bytes[i..end].fill(value);
                }
            }
            Mutation::Field {
                region,
                pos,
                width,
                value,
            } => {
                if let Some(i) = at(&bytes, region, pos) {
                    let i = i & !(width - 1);
                    let be = value.to_be_bytes();
                    let end = (i + width).min(bytes.len());
                    bytes[i..end].copy_from_slice(&be[8 - width..8 - width + (end - i)]);
                }
            }
            Mutation::Truncate { pos } => {
                let len = pos as usize % (bytes.len() + 1);
                bytes.truncate(len);
            }
        }
    }
    bytes
}

/// The bitmap directory's byte range, found by walking the extensions.
fn directory_range(bytes: &[u8]) -> (usize, usize) {
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
    let mut at = if be32(4) == 2 { 72 } else { be32(100) };
    while at + 8 <= bytes.len() {
        let (kind, len) = (be32(at), be32(at + 4));
        match kind {
            0 => break,
            0x2385_2875 => return (be64(at + 24), be64(at + 24) + be64(at + 16)),
            _ => at += 8 + len.next_multiple_of(8),
        }
    }
    (0, 0)
}

fn seed(name: &'static str, path: &Path) -> Seed {
    let bytes = fs::read(path).unwrap();
    let directory = directory_range(&bytes);
    Seed {
        name,
        regions: [(0, 1024.min(bytes.len())), directory, (0, bytes.len())],
        bytes,
    }
}

fn make_seeds(dir: &Path) -> Vec<Seed> {
    let p = |name: &str| dir.join(name);
    create(&p("base.qcow2"), "16M", &["-o", "cluster_size=512"]);
    add_bitmap(&p("base.qcow2"), "base-1", None);

    create(
        &p("a.qcow2"),
        "16M",
        &["-o", "cluster_size=512", "-b", "base.qcow2", "-F", "qcow2"],
    );
    add_bitmap(&p("a.qcow2"), "one", None);
    add_bitmap(&p("a.qcow2"), "two", Some("1M"));
    add_bitmap(&p("a.qcow2"), "three", Some("512"));
    disable_bitmap(&p("a.qcow2"), "two");

    create(
        &p("b.qcow2"),
        "16M",
        &[
            "-o",
            "cluster_size=512,compat=0.10",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
        ],
    );

    let data = p("c.data");
    create(
        &p("c.qcow2"),
        "16M",
        &[
            "-o",
            &format!("cluster_size=4096,data_file={}", data.display()),
        ],
    );
    add_bitmap(&p("c.qcow2"), &"ü".repeat(200), None);
    add_bitmap(&p("c.qcow2"), "снимок", Some("64K"));

    create(&p("d.qcow2"), "16M", &["-b", "base.qcow2", "-F", "qcow2"]);
    for i in 0..20 {
        add_bitmap(&p("d.qcow2"), &format!("checkpoint-{i:03}"), None);
    }
    let mut seeds = vec![
        seed("512 B clusters", &p("a.qcow2")),
        seed("version 2", &p("b.qcow2")),
    ];
    seeds.push(seed("data file", &p("c.qcow2")));
    seeds.push(seed("64 KiB clusters", &p("d.qcow2")));
    // The first cluster alone: every directory is past the end of the file.
    let mut first = seed("first cluster", &p("d.qcow2"));
    first.bytes.truncate(65536);
    seeds.push(first);
    seeds
}

/// What an accepted image must respect whatever its bytes.
fn check_limits(image: &Image) -> Result<(), TestCaseError> {
    prop_assert!(image.version == 2 || image.version == 3);
    prop_assert!(
        (512..=2 << 20).contains(&image.cluster_size) && image.cluster_size.is_power_of_two()
    );
    prop_assert!(image.bitmaps.len() <= 65535);
    for b in &image.bitmaps {
        prop_assert!(b.granularity.is_power_of_two() && (512..=1 << 31).contains(&b.granularity));
        prop_assert!(!b.raw_name.is_empty() && b.raw_name.len() <= 1023);
    }
    Ok(())
}

fn outcome<T>(r: &Result<T, ckptstore::testing::qcow2::Qcow2Error>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) if e.is_not_qcow2() => "not qcow2",
        Err(e) if e.is_unsupported() => "unsupported",
        Err(e) if e.is_invalid() => "invalid",
        Err(e) if e.is_bad_chain() => "bad chain",
        Err(e) if e.is_io() => "io",
        Err(_) => "other",
    }
}

#[test]
fn mutated_images_never_panic() {
    let cases: u32 = std::env::var("CKPTSTORE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let seed: u64 = std::env::var("CKPTSTORE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("qcow2 fuzz: seed {seed} (replay with CKPTSTORE_FUZZ_SEED={seed}), {cases} cases");

    let dir = tempfile::tempdir().unwrap();
    let seeds = make_seeds(dir.path());
    let base = fs::read(dir.path().join("base.qcow2")).unwrap();
    let intact_top = seeds[0].bytes.clone();
    let (top, base_path) = (dir.path().join("top.qcow2"), dir.path().join("base.qcow2"));

    let mut key = [0u8; 32];
    for chunk in key.chunks_mut(8) {
        chunk.copy_from_slice(&seed.to_le_bytes());
    }
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
    let executions = AtomicU64::new(0);
    let outcomes = Mutex::new(BTreeMap::<String, u64>::new());
    let started = Instant::now();
    let strategy = (
        0..seeds.len(),
        prop::collection::vec(mutation(), 1..6),
        prop::bool::weighted(0.2),
    );
    let result = runner.run(&strategy, |(which, mutations, mutate_base)| {
        let seed = &seeds[which];
        let bytes = apply(seed, &mutations);
        // Either the top image is damaged, or the base below an intact top.
        if mutate_base {
            fs::write(&top, &intact_top).unwrap();
            fs::write(&base_path, &bytes).unwrap();
        } else {
            fs::write(&top, &bytes).unwrap();
            fs::write(&base_path, &base).unwrap();
        }
        let image = read_image(&top);
        let chain = read_chain(&top);
        executions.fetch_add(1, Ordering::Relaxed);
        if let Ok(image) = &image {
            check_limits(image)?;
        }
        if let Ok(chain) = &chain {
            for layer in &chain.layers {
                check_limits(layer)?;
            }
        }
        let mut outcomes = outcomes.lock().unwrap();
        let what = if mutate_base { "base" } else { seed.name };
        let bitmaps = image.as_ref().map_or(0, |i| i.bitmaps.len().min(1));
        *outcomes
            .entry(format!(
                "{what}: image {} (bitmaps: {bitmaps})",
                outcome(&image)
            ))
            .or_default() += 1;
        *outcomes
            .entry(format!("{what}: chain {}", outcome(&chain)))
            .or_default() += 1;
        Ok(())
    });
    let elapsed = started.elapsed();
    println!(
        "qcow2 fuzz: {} executions (each read_image + read_chain) in {:.1} s",
        executions.load(Ordering::Relaxed),
        elapsed.as_secs_f64()
    );
    for (what, n) in outcomes.lock().unwrap().iter() {
        println!("  {what}: {n}");
    }
    if let Err(e) = result {
        panic!("seed {seed}: {e}");
    }
}
