//! Hostile input through the real binary, against the real daemon: each
//! case ends with the documented exit code and one line on stderr
//! (`ckptstore: <what> — <what to do>`), leaves libvirt's checkpoints of a
//! domain that has some exactly as they were, and leaves the journal file
//! byte for byte as it was (library-level cases: tests/fast/hostile.rs).
//!
//! Also: descriptions full of markup reach libvirt escaped and come back
//! exactly; a journal that is corrupt, truncated, from a newer schema,
//! read-only (a read-only bind mount, and `chattr +i`) or on a full file
//! system (a tiny tmpfs); and a bounded, seeded fuzz of the chain input
//! through the binary (`CKPTSTORE_FUZZ_CASES`, `CKPTSTORE_FUZZ_SEED`).

use crate::rel;
use testkit::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ckptstore::{CheckpointDef, LibvirtBackend};
use rel::Out;
use support::{TestDomain, SYSTEM_URI};
use testkit::rng::Rng;

/// A domain with a committed 3-checkpoint chain and its journal.
struct World {
    dom: TestDomain,
    backend: LibvirtBackend,
    dir: tempfile::TempDir,
    db: PathBuf,
    good: ckptstore::Chain,
}

impl World {
    fn new(conn: &virt::connect::Connect, tag: &str) -> World {
        let dom = TestDomain::define(conn, tag, 2);
        let dir = tempfile::Builder::new()
            .prefix("ckptstore-hostile-")
            .tempdir()
            .unwrap();
        let db = dir.path().join("journal.db");
        let good = rel::chain(&dom.name, 3, &["vda", "vdb"]);
        let file = rel::write_chain(dir.path(), "good.json", &good);
        rel::run(&db, &["sync", "--chain", &file]).expect(0, "the first sync");
        World {
            dom,
            backend: LibvirtBackend::connect(SYSTEM_URI).unwrap(),
            dir,
            db,
            good,
        }
    }

    fn libvirt(&self) -> Vec<CheckpointDef> {
        rel::list(&self.backend, &self.dom.name)
    }

    fn file(&self, name: &str, text: impl AsRef<[u8]>) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }
}

/// The journal's content: its file byte for byte, and its write-ahead log
/// (absent or empty when nothing was written; SQLite leaves an empty one
/// behind a connection that could only read).
fn journal_bytes(db: &Path) -> (Vec<u8>, Vec<u8>) {
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    (
        std::fs::read(db).unwrap_or_default(),
        std::fs::read(wal).unwrap_or_default(),
    )
}

/// Run `args` on `db`; it must exit `code` with one line on stderr that
/// contains `says`, and change neither libvirt nor the journal's bytes.
fn refused(
    w: &World,
    db: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
    code: i32,
    says: &str,
) -> Out {
    let before = w.libvirt();
    let bytes = journal_bytes(db);
    let mut cmd = rel::command(db, args);
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        use std::io::Write;
        let mut i = child.stdin.take().unwrap();
        // The process may refuse before reading everything.
        let _ = i.write_all(input);
    }
    let out = child.wait_with_output().unwrap();
    let out = Out {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: std::time::Duration::default(),
    };
    let shown = args
        .iter()
        .map(|a| if a.len() > 80 { "…" } else { a })
        .collect::<Vec<_>>();
    assert_eq!(out.code(), Some(code), "{shown:?}: {}", out.stderr);
    assert_eq!(
        out.stderr.lines().count(),
        1,
        "{shown:?}: one line on stderr: {}",
        out.stderr
    );
    let line = out.stderr.trim_end();
    assert!(
        line.starts_with("ckptstore: ") && line.contains(" — "),
        "{shown:?}: {line}"
    );
    assert!(
        line.contains(says),
        "{shown:?}: {line:?} does not say {says:?}"
    );
    assert!(
        !line.contains("panicked") && !line.contains("RUST_BACKTRACE"),
        "{line}"
    );
    assert_eq!(w.libvirt(), before, "{shown:?}: libvirt was changed");
    assert!(
        journal_bytes(db) == bytes,
        "{shown:?}: the journal was changed"
    );
    println!(
        "hostile: exit {code}: {}",
        line.chars().take(160).collect::<String>()
    );
    out
}

#[test]
fn hostile_chains_change_nothing_on_qemu() {
    let w = World::new(&support::system(), "hostile");
    let name = w.dom.name.clone();
    let db = w.db.clone();
    let good_json = serde_json::to_string(&w.good).unwrap();
    let mut cases = 0;
    let mut case = |args: &[&str], stdin: Option<&[u8]>, code: i32, says: &str| {
        refused(&w, &db, args, stdin, code, says);
        cases += 1;
    };

    // Malformed JSON, with line and column.
    let f = w.file(
        "malformed.json",
        good_json[..good_json.len() / 2].replace(',', ",\n"),
    );
    case(&["sync", "--chain", &f], None, 2, "line ");
    case(
        &["sync", "--chain", "-"],
        Some(b"{\"vm_id\": "),
        2,
        "EOF while parsing",
    );
    case(
        &["sync", "--chain", "-"],
        Some(&[0xff, 0xfe, 0x00, 0x7b]),
        2,
        "valid UTF-8",
    );
    case(&["sync", "--chain", "-"], Some(b""), 2, "not valid");
    // Wrong types.
    for (what, from, to) in [
        (
            "vm_id a number",
            format!("\"vm_id\":\"{}\"", rel::VM_UUID),
            "\"vm_id\":42".to_string(),
        ),
        (
            "disks a list",
            "\"disks\":{".into(),
            "\"disks\":[],\"x\":{".into(),
        ),
        (
            "created a number",
            "\"created\":\"2023-11-14T22:13:20Z\"".into(),
            "\"created\":1700000000".into(),
        ),
        (
            "checkpoints a string",
            "\"checkpoints\":[".into(),
            "\"checkpoints\":\"[\",\"y\":[".into(),
        ),
        ("unknown key", "\"disks\":".into(), "\"disk_map\":".into()),
    ] {
        let text = good_json.replacen(&from, &to, 1);
        assert_ne!(text, good_json, "{what}");
        let f = w.file("wrong.json", text);
        case(&["sync", "--chain", &f], None, 2, "is not valid");
    }
    // Names libvirt or QEMU would refuse: the reason, nothing changed.
    for (bad, why) in [
        ("../../etc/passwd", "it starts with '.'"),
        ("a/b", "it contains '/'"),
        ("<c0>&amp;", "it contains '<'"),
        ("two words", "it contains ' '"),
    ] {
        let mut c = w.good.clone();
        c.checkpoints[0].id = bad.to_string();
        c.checkpoints[1].parent = Some(bad.to_string());
        let f = w.file("badname.json", serde_json::to_vec(&c).unwrap());
        case(&["sync", "--chain", &f], None, 2, why);
    }
    let long = "n".repeat(1024);
    let mut c = w.good.clone();
    c.checkpoints[0].id = long.clone();
    c.checkpoints[1].parent = Some(long);
    let f = w.file("longname.json", serde_json::to_vec(&c).unwrap());
    case(&["sync", "--chain", &f], None, 2, "longer than 1023 bytes");
    // 100,000 checkpoints: refused after parsing, before anything else.
    let huge = rel::chain(&name, 100_000, &["vda"]);
    let f = w.file("huge.json", serde_json::to_vec(&huge).unwrap());
    let t = std::time::Instant::now();
    case(
        &["sync", "--chain", &f],
        None,
        2,
        "100000 checkpoints, more than the limit",
    );
    println!(
        "hostile: the 100,000-checkpoint chain ({} MB) was refused in {} ms",
        std::fs::metadata(&f).unwrap().len() >> 20,
        t.elapsed().as_millis()
    );
    drop(huge);
    // Cycles, duplicates, dangling parents.
    let mut cycle = w.good.clone();
    cycle.checkpoints[0].parent = Some(rel::ckpt_id(2));
    case(
        &[
            "sync",
            "--chain",
            &w.file("cycle.json", serde_json::to_vec(&cycle).unwrap()),
        ],
        None,
        2,
        "cycle",
    );
    let mut selfish = w.good.clone();
    selfish.checkpoints[1].parent = Some(rel::ckpt_id(1));
    case(
        &[
            "sync",
            "--chain",
            &w.file("self.json", serde_json::to_vec(&selfish).unwrap()),
        ],
        None,
        2,
        "cycle",
    );
    let mut dup = w.good.clone();
    dup.checkpoints[2].id = rel::ckpt_id(0);
    case(
        &[
            "sync",
            "--chain",
            &w.file("dup.json", serde_json::to_vec(&dup).unwrap()),
        ],
        None,
        2,
        "more than once",
    );
    let mut dangling = w.good.clone();
    dangling.checkpoints[2].parent = Some(rel::ckpt_id(77));
    case(
        &[
            "sync",
            "--chain",
            &w.file("dangling.json", serde_json::to_vec(&dangling).unwrap()),
        ],
        None,
        2,
        "not in the chain",
    );
    // Names with XML metacharacters or path separators.
    for (what, domain, target) in [
        ("domain with a path", "../../etc/passwd", "vda"),
        ("domain with a slash", "a/b", "vda"),
        ("target with markup", name.as_str(), "vda'/><disk name='vdb"),
        ("target with a path", name.as_str(), "../vda"),
        ("target absolute", name.as_str(), "/dev/vda"),
        ("target with a NUL", name.as_str(), "vd\u{0}a"),
    ] {
        let mut c = w.good.clone();
        c.domain = Some(domain.to_string());
        c.disks.insert(rel::disk_id(0), target.to_string());
        let f = w.file("names.json", serde_json::to_vec(&c).unwrap());
        case(&["sync", "--chain", &f], None, 2, "valid");
        case(&["plan", "--chain", &f], None, 2, "valid");
        let _ = what;
    }
    // A domain name libvirt has never heard of, with markup: exit 4.
    let mut c = w.good.clone();
    c.domain = Some("<domain type='kvm'>&amp;]]>".into());
    case(
        &[
            "sync",
            "--chain",
            &w.file("nodom.json", serde_json::to_vec(&c).unwrap()),
        ],
        None,
        4,
        "has no domain <domain type='kvm'>&amp;]]>",
    );
    case(
        &["import", "--domain", "ckpt-test-no-such-domain"],
        None,
        4,
        "has no domain",
    );
    // A disk target the domain does not have (libvirt itself would not check).
    let mut c = w.good.clone();
    c.disks.insert(rel::disk_id(1), "vdz".into());
    case(
        &[
            "sync",
            "--chain",
            &w.file("vdz.json", serde_json::to_vec(&c).unwrap()),
        ],
        None,
        2,
        "has no disk with target \"vdz\"",
    );
    // A chain for another domain's disks is fine, but not an empty one.
    let empty = format!(
        "{{\"vm_id\":\"{}\",\"domain\":\"{name}\",\"disks\":{{}},\"checkpoints\":[]}}",
        rel::VM_UUID
    );
    case(
        &["sync", "--chain", "-"],
        Some(empty.as_bytes()),
        2,
        "empty",
    );
    println!("hostile: {cases} hostile inputs through the binary: documented exit code, one line, libvirt and journal unchanged");
}

#[test]
fn descriptions_with_markup_come_back_exactly_on_qemu() {
    let w = World::new(&support::system(), "markup");
    let mut c = rel::chain(&w.dom.name, 4, &["vda", "vdb"]);
    let evil = [
        "]]></description><domain type='kvm'><name>evil</name></domain><description>",
        "<![CDATA[ x ]]> &amp; &lt; &#x41; <!-- c --> <?pi?> \"'",
        "<domain>\n  <name>x</name>\n</domain>\n\ttabs & ]]>",
        "unicode: é ✓ 🦀 </disks><disks><disk name='vdz' checkpoint='bitmap'/>",
    ];
    for (cp, e) in c.checkpoints.iter_mut().zip(evil) {
        cp.description = Some(e.to_string());
    }
    let f = w.file("evil.json", serde_json::to_vec(&c).unwrap());
    rel::run(&w.db, &["sync", "--chain", &f]).expect(0, "sync of descriptions with markup");
    for (i, e) in evil.iter().enumerate() {
        let id = rel::ckpt_id(i);
        // Through the library's parser ...
        let def = w.backend.checkpoint(&w.dom.name, &id).unwrap();
        assert_eq!(def.description.as_deref(), Some(*e), "checkpoint {i}");
        assert_eq!(
            def.disks.keys().collect::<Vec<_>>(),
            ["vda", "vdb"],
            "no disk was injected"
        );
        // ... and the raw XML libvirt keeps: one element each, the markup
        // escaped.
        let out = Command::new("virsh")
            .args([
                "-c",
                SYSTEM_URI,
                "checkpoint-dumpxml",
                "--no-domain",
                &w.dom.name,
                &id,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let xml = String::from_utf8(out.stdout).unwrap();
        assert_eq!(xml.matches("<description>").count(), 1, "{xml}");
        assert!(
            !xml.contains("<domain ") && !xml.contains("<domain>") && !xml.contains("<![CDATA["),
            "{xml}"
        );
        assert!(
            !xml.contains("<name>evil") && !xml.contains("<!--"),
            "{xml}"
        );
        assert_eq!(xml.matches("<disk ").count(), 2, "{xml}");
        assert_eq!(ckptstore::testing::parse_checkpoint(&xml).unwrap(), def);
    }
    // Same content: a second sync makes no call.
    let again = rel::run(&w.db, &["sync", "--chain", &f, "--json"])
        .expect(0, "again")
        .json();
    assert_eq!(
        (again["outcome"].as_str(), again["libvirt_calls"].as_u64()),
        (Some("unchanged"), Some(0))
    );
    println!(
        "hostile: {} descriptions with ]]>, <domain>, CDATA, entities and comments came back from libvirt exactly",
        evil.len()
    );
}

/// A sync that would change libvirt, for the journal cases.
fn next_chain(w: &World) -> String {
    w.file(
        "next.json",
        serde_json::to_vec(&rel::chain(&w.dom.name, 40, &["vda", "vdb"])).unwrap(),
    )
}

#[test]
fn unusable_journals_change_nothing_on_qemu() {
    let w = World::new(&support::system(), "journal");
    let next = next_chain(&w);
    let copy = |name: &str| {
        let p = w.dir.path().join(name);
        std::fs::copy(&w.db, &p).unwrap();
        p
    };
    let sync = ["sync", "--chain", next.as_str()];
    let mut cases = 0;

    // Corrupt: random bytes, and a real journal with its pages scribbled on.
    let mut rng = Rng::new(7);
    let noise: Vec<u8> = (0..16384).map(|_| rng.next_u64() as u8).collect();
    let p = w.dir.path().join("noise.db");
    std::fs::write(&p, &noise).unwrap();
    refused(&w, &p, &sync, None, 5, "is corrupt");
    cases += 1;
    let p = copy("scribbled.db");
    let mut bytes = std::fs::read(&p).unwrap();
    let len = bytes.len();
    for b in &mut bytes[4096..len] {
        *b = rng.next_u64() as u8;
    }
    std::fs::write(&p, &bytes).unwrap();
    refused(&w, &p, &sync, None, 5, "is corrupt");
    cases += 1;
    // Truncated: inside the header, and to its first page.
    for (what, keep) in [("header", 50usize), ("first page", 4096)] {
        let p = copy(&format!("truncated-{keep}.db"));
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(keep as u64).unwrap();
        drop(f);
        let out = refused(&w, &p, &sync, None, 5, "journal");
        assert!(
            out.stderr.contains("corrupt") || out.stderr.contains("malformed"),
            "{what}: {}",
            out.stderr
        );
        cases += 1;
    }
    // From a newer schema: the real journal, one version ahead.
    let p = copy("newer.db");
    let newer = ckptstore::testing::SCHEMA_VERSION + 1;
    {
        let c = rusqlite::Connection::open(&p).unwrap();
        c.execute_batch(&format!("PRAGMA user_version = {newer}"))
            .unwrap();
    }
    let says = format!("schema version {newer}");
    for args in [
        &sync[..],
        &["status"],
        &["recover"],
        &["import", "--domain", &w.dom.name],
    ] {
        refused(&w, &p, args, None, 5, &says);
        cases += 1;
    }
    // Read-only: as root, file modes stop nothing, so a read-only bind
    // mount of the journal's folder, and an immutable file.
    let ro = ReadOnlyMount::new(w.dir.path());
    match &ro {
        Some(m) => {
            let p = m.path.join("journal.db");
            refused(&w, &p, &sync, None, 5, "journal");
            cases += 1;
            println!("hostile: journal on a read-only bind mount: exit 5");
        }
        None => println!("hostile: read-only bind mount not permitted here; skipped"),
    }
    drop(ro);
    let p = copy("immutable.db");
    if let Some(_immutable) = Immutable::new(&p) {
        refused(&w, &p, &sync, None, 5, "read-only");
        cases += 1;
        println!("hostile: immutable journal file (chattr +i): exit 5");
    } else {
        println!("hostile: chattr +i not supported here; skipped");
    }
    // A full file system: the journal on a tiny tmpfs filled up.
    match Tmpfs::new(w.dir.path(), 512 * 1024) {
        Some(fs) => {
            let p = fs.path.join("journal.db");
            std::fs::copy(&w.db, &p).unwrap();
            rel::run(&p, &["status"]).expect(0, "status on the tmpfs");
            fill(&fs.path, 48 * 1024);
            refused(&w, &p, &sync, None, 5, "is full");
            cases += 1;
            println!("hostile: journal on a full tmpfs: exit 5");
        }
        None => println!(
            "hostile: tmpfs mount not permitted here; skipped (tests/fast/hostile.rs fills the journal with max_page_count)"
        ),
    }
    // The journal is usable again and still holds the first sync.
    assert_eq!(rel::integrity(&w.db), "ok");
    let st = rel::run(&w.db, &["status", "--json"])
        .expect(0, "status")
        .json();
    assert_eq!(st["domains"][0]["checkpoints"], 3);
    println!(
        "hostile: {cases} unusable journals: exit 5, one line, libvirt and the file unchanged"
    );
}

/// Fill the file system holding `dir` until `leave` bytes or less are free.
fn fill(dir: &Path, leave: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0u8; 4096];
    loop {
        let free = statvfs_free(dir);
        if free <= leave {
            break;
        }
        if f.write_all(&chunk[..(free - leave).min(4096) as usize])
            .is_err()
        {
            break;
        }
    }
    f.sync_all().unwrap();
}

fn statvfs_free(dir: &Path) -> u64 {
    let out = Command::new("stat")
        .args(["-f", "-c", "%a %S"])
        .arg(dir)
        .output()
        .unwrap();
    let s = String::from_utf8(out.stdout).unwrap();
    let v: Vec<u64> = s.split_whitespace().map(|x| x.parse().unwrap()).collect();
    v[0] * v[1]
}

/// A file made immutable (`chattr +i`), mutable again on drop.
struct Immutable(PathBuf);

impl Immutable {
    fn new(p: &Path) -> Option<Immutable> {
        let st = Command::new("chattr")
            .arg("+i")
            .arg(p)
            .stderr(Stdio::null())
            .status();
        st.is_ok_and(|s| s.success())
            .then(|| Immutable(p.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// A read-only bind mount of a folder, unmounted on drop.
struct ReadOnlyMount {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl ReadOnlyMount {
    fn new(src: &Path) -> Option<ReadOnlyMount> {
        let dir = tempfile::Builder::new()
            .prefix("ckptstore-ro-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("ro");
        std::fs::create_dir(&path).unwrap();
        let ok = |args: &[&str]| {
            Command::new("mount")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ok(&[
            "--bind",
            &src.display().to_string(),
            &path.display().to_string(),
        ]) {
            return None;
        }
        let m = ReadOnlyMount { path, _dir: dir };
        ok(&["-o", "remount,bind,ro", &m.path.display().to_string()]).then_some(m)
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

/// A tmpfs of `size` bytes, unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn new(parent: &Path, size: u64) -> Option<Tmpfs> {
        let dir = tempfile::Builder::new()
            .prefix("tmpfs-")
            .tempdir_in(parent)
            .unwrap();
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&path)
            .stderr(Stdio::null())
            .status();
        st.is_ok_and(|s| s.success())
            .then_some(Tmpfs { path, _dir: dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

#[test]
fn fuzz_the_chain_input_through_the_binary_on_qemu() {
    let w = World::new(&support::system(), "fuzz");
    let cases: u32 = std::env::var("CKPTSTORE_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let seed = testkit::rng::seed("CKPTSTORE_FUZZ_SEED");
    println!(
        "cli fuzz: seed {seed} (CKPTSTORE_FUZZ_SEED={seed} replays), {cases} executions of `plan --chain -` (half \
         byte mutations of the JSON, half structural mutations of the chain)"
    );
    let mut rng = Rng::new(seed);
    let good = rel::chain(&w.dom.name, 4, &["vda", "vdb"]);
    let base = serde_json::to_vec(&good).unwrap();
    let before = w.libvirt();
    let bytes = journal_bytes(&w.db);
    let mut codes = std::collections::BTreeMap::new();
    for i in 0..cases {
        let input = if i % 2 == 0 {
            mutate_bytes(&base, &mut rng)
        } else {
            mutate_chain(&good, &mut rng)
        };
        let mut cmd = rel::command(&w.db, &["plan", "--chain", "-"]);
        cmd.stdin(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        {
            use std::io::Write;
            let _ = child.stdin.take().unwrap().write_all(&input);
        }
        let out = child.wait_with_output().unwrap();
        let code = out.status.code();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let ctx = || {
            format!(
                "fuzz case {i} (seed {seed}): input {:?}\nstderr: {stderr}",
                String::from_utf8_lossy(&input)
            )
        };
        assert!(matches!(code, Some(0 | 2 | 4)), "{}", ctx());
        if code != Some(0) {
            assert_eq!(stderr.lines().count(), 1, "{}", ctx());
            assert!(stderr.starts_with("ckptstore: "), "{}", ctx());
        }
        *codes.entry(code.unwrap()).or_insert(0u32) += 1;
    }
    assert_eq!(w.libvirt(), before);
    assert!(journal_bytes(&w.db) == bytes);
    println!("cli fuzz: {cases} executions, exit codes {codes:?}, 0 panics, libvirt and journal unchanged");
}

/// A few byte-level edits of `base`.
fn mutate_bytes(base: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut input = base.to_vec();
    for _ in 0..=rng.below(8) {
        if input.is_empty() {
            break;
        }
        let at = rng.below(input.len() as u64) as usize;
        match rng.below(5) {
            0 => input[at] = rng.next_u64() as u8,
            1 => {
                let bytes = b"{}[]\":,0-e.\\u";
                input.insert(at, bytes[rng.below(bytes.len() as u64) as usize]);
            }
            2 => {
                input.remove(at);
            }
            3 => input.truncate(at),
            _ => {
                // Splice a piece of itself elsewhere.
                let len = rng.below(40) as usize;
                let piece: Vec<u8> = input[at..(at + len).min(input.len())].to_vec();
                let to = rng.below(input.len() as u64) as usize;
                input.splice(to..to, piece);
            }
        }
    }
    input
}

/// A few edits of the chain's structure and values, serialised: most stay
/// well-formed JSON, so validation, the domain lookup and the planner run.
fn mutate_chain(good: &ckptstore::Chain, rng: &mut Rng) -> Vec<u8> {
    let mut c = good.clone();
    let names = [
        "",
        "/",
        "..",
        "<d>",
        "a\u{0}b",
        "ckpt-test-no-such",
        "x".repeat(300).leak(),
    ];
    let targets = ["vda", "vdb", "vdz", "sda", "", "vd", "vd/a", "xvdq", "<t>"];
    for _ in 0..=rng.below(4) {
        let n = c.checkpoints.len() as u64;
        let pick = |rng: &mut Rng| rng.below(n.max(1)) as usize;
        match rng.below(10) {
            0 => c.domain = Some(names[rng.below(names.len() as u64) as usize].to_string()),
            1 => {
                let d = rel::disk_id(rng.below(3) as usize);
                c.disks.insert(
                    d,
                    targets[rng.below(targets.len() as u64) as usize].to_string(),
                );
            }
            2 if n > 0 => {
                let i = pick(rng);
                c.checkpoints[i].parent = Some(rel::ckpt_id(rng.below(n + 2) as usize));
            }
            3 if n > 0 => {
                let i = pick(rng);
                c.checkpoints[i].parent = None;
            }
            4 if n > 0 => {
                let i = pick(rng);
                let dup = c.checkpoints[i].clone();
                c.checkpoints.push(dup);
            }
            5 if n > 0 => {
                let i = pick(rng);
                c.checkpoints.remove(i);
            }
            6 if n > 0 => {
                let i = pick(rng);
                c.checkpoints[i].disks = (0..rng.below(3))
                    .map(|k| rel::disk_id(k as usize + rng.below(2) as usize))
                    .collect();
            }
            7 if n > 0 => {
                let i = pick(rng);
                let t = [0i64, -1, 1, 253_402_300_799, 1_700_000_000][rng.below(5) as usize];
                c.checkpoints[i].created = chrono::DateTime::from_timestamp(t, 0).unwrap();
            }
            8 if n > 0 => {
                let i = pick(rng);
                let d = ["", "]]>", "<domain/>", "\r\n", "\u{7}", "&"][rng.below(6) as usize];
                c.checkpoints[i].description = Some(d.to_string());
            }
            _ => c.checkpoints.reverse(),
        }
    }
    serde_json::to_vec(&c).unwrap()
}
