//! Security properties of the real binary.
//!
//! - The journal is created 0600 (and its `-wal` and `-shm` files too), and
//!   every folder the command creates for it 0700 — even under `umask 0`.
//! - A libvirt URI with credentials (user and password, secret query
//!   parameters) never reaches stdout or stderr, at any verbosity, in human
//!   or JSON output, whether libvirt answers or not.
//! - The store never passes user text to a shell: `src/` starts no shell,
//!   passes no `-c`, and calls no `system`/`popen`/`exec`.

use crate::rel;
use testkit::support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rel::Running;
use support::TestDomain;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// `ckptstore ARGS` under `umask 0` (through `sh`, in this test only).
fn under_umask_0(db: Option<&Path>, args: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "umask 0; exec \"$0\" \"$@\"", rel::BIN]);
    if let Some(db) = db {
        cmd.arg("--db").arg(db);
    }
    cmd.args(["--connect", support::SYSTEM_URI]).args(args);
    cmd.env_remove("CKPTSTORE_DB").env_remove("FAILPOINTS");
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd
}

#[test]
fn journal_is_0600_and_its_new_folders_0700_even_under_umask_0() {
    let conn = support::system();
    let dom = TestDomain::define(&conn, "modes", 1);
    let tmp = tempfile::Builder::new()
        .prefix("ckptstore-modes-")
        .tempdir()
        .unwrap();
    // Sanity: umask 0 really is in force for what the shell creates.
    let probe = tmp.path().join("probe");
    let st = Command::new("sh")
        .args(["-c", "umask 0; mkdir \"$0\"", &probe.display().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(mode(&probe), 0o777);

    // --db in folders that do not exist yet.
    let db = tmp.path().join("a/b/c/journal.db");
    let out = rel::run_cmd(under_umask_0(Some(&db), &["status"]));
    assert_eq!(out.code(), Some(0), "{out:#?}");
    assert_eq!(mode(&db), 0o600, "journal");
    for dir in ["a", "a/b", "a/b/c"] {
        assert_eq!(mode(&tmp.path().join(dir)), 0o700, "{dir}");
    }
    // The same path through CKPTSTORE_DB (the default path's rule: its
    // folder is created 0700 when missing).
    let env_db = tmp.path().join("env/journal.db");
    let mut cmd = under_umask_0(None, &["status"]);
    cmd.env("CKPTSTORE_DB", &env_db);
    rel::run_cmd(cmd).expect(0, "status with CKPTSTORE_DB");
    assert_eq!(
        (mode(&env_db), mode(env_db.parent().unwrap())),
        (0o600, 0o700)
    );

    // While a sync runs, its -wal and -shm files are 0600 too.
    let chain = rel::chain(&dom.name, 30, &["vda"]);
    let file = rel::write_chain(tmp.path(), "chain.json", &chain);
    let wal = PathBuf::from(format!("{}-wal", db.display()));
    let shm = PathBuf::from(format!("{}-shm", db.display()));
    let mut running = Running::spawn(under_umask_0(Some(&db), &["sync", "--chain", &file]));
    let t = Instant::now();
    while !(wal.exists() && shm.exists()) {
        assert!(
            running.child.try_wait().unwrap().is_none(),
            "the sync ended before its WAL was seen"
        );
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!((mode(&wal), mode(&shm)), (0o600, 0o600), "-wal and -shm");
    let out = running.wait();
    assert_eq!(out.code(), Some(0), "{out:#?}");
    assert_eq!(mode(&db), 0o600);
    println!("security: journal, -wal, -shm 0600 and 3 new folders 0700 under umask 0");
}

#[test]
fn credentials_in_the_uri_never_reach_the_output() {
    let conn = support::system();
    let dom = TestDomain::define(&conn, "creds", 1);
    let tmp = tempfile::Builder::new()
        .prefix("ckptstore-creds-")
        .tempdir()
        .unwrap();
    let db = tmp.path().join("journal.db");
    let chain = rel::chain(&dom.name, 3, &["vda"]);
    let file = rel::write_chain(tmp.path(), "chain.json", &chain);
    let uris = [
        // libvirt answers through this one (the qemu driver ignores the query).
        "qemu:///system?password=secret&authfile=/etc/secret",
        "qemu+ssh://user:secret@127.0.0.1/system?keyfile=/x",
        "qemu+ssh://root:secret@127.0.0.1:1/system?no_tty=1&sshauth=secret",
        "qemu+tcp://user:secret@127.0.0.1:1/system?password=secret",
        "qemu+libssh2://user:secret@127.0.0.1:1/system?known_hosts_verify=ignore",
        // libvirt 11.3 quotes this one's query in its error message.
        "xyz://user:secret@/?password=secret",
        "qemu+unix://user:secret@/system?socket=/nonexistent/sock&token=secret",
    ];
    let mut runs = 0;
    for uri in uris {
        let works = uri.starts_with("qemu:///system");
        for args in [
            &["sync", "--chain", &file][..],
            &["plan", "--chain", &file],
            &["import", "--domain", &dom.name],
            &["sync", "--domain", &dom.name],
            &["recover"],
            &["status"],
            &["history", "--domain", &dom.name],
        ] {
            for extra in [&["-vvv"][..], &["-vvv", "--json"], &[]] {
                let mut cmd = Command::new(rel::BIN);
                cmd.arg("--db")
                    .arg(&db)
                    .args(["--connect", uri])
                    .args(args)
                    .args(extra);
                cmd.env_remove("RUST_LOG").env_remove("LIBVIRT_DEFAULT_URI");
                cmd.stdin(std::process::Stdio::null());
                cmd.stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped());
                let (out, killed) = Running::spawn(cmd).kill_at(Duration::from_secs(30));
                assert!(!killed, "{uri} {args:?}: hung");
                let all = format!("{}{}", out.stdout, out.stderr);
                assert!(
                    !all.contains("secret"),
                    "{uri} {args:?} {extra:?} leaked a credential:\n{all}"
                );
                if works && args[0] == "sync" {
                    assert_eq!(out.code(), Some(0), "{uri} {args:?}: {out:#?}");
                }
                if !works && matches!(args[0], "sync" | "plan" | "import") {
                    assert_eq!(out.code(), Some(4), "{uri} {args:?}: {out:#?}");
                    // The URI is still named, without its credentials.
                    assert!(out.stderr.contains("cannot connect to "), "{out:#?}");
                }
                runs += 1;
            }
        }
    }
    println!(
        "security: {runs} runs with credentials in {} URIs, -vvv included: \"secret\" in no output",
        uris.len()
    );
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn the_store_never_runs_a_shell() {
    // The library's sources and the command's.
    let mut files = Vec::new();
    let cli = Path::new(env!("CARGO_MANIFEST_DIR"));
    sources(&cli.join("src"), &mut files);
    sources(&cli.join("../src"), &mut files);
    assert!(files.len() > 10);
    let shells = [
        "sh", "bash", "dash", "zsh", "ksh", "fish", "busybox", "env", "su", "sudo",
    ];
    let mut spawns = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let name = f.display().to_string();
        for bad in [
            "libc::system",
            "libc::popen",
            "libc::exec",
            "CommandExt",
            ".exec()",
            "\"-c\"",
            "pre_exec",
        ] {
            assert!(!text.contains(bad), "{name} uses {bad}");
        }
        for (i, _) in text.match_indices("Command::new(") {
            let rest = &text[i + "Command::new(".len()..];
            let arg = &rest[..rest.find(')').unwrap()];
            // The program is a literal, never built from input, and no shell.
            assert!(
                arg.starts_with('"') && arg.ends_with('"'),
                "{name}: Command::new({arg}) is not a literal"
            );
            let program = arg.trim_matches('"');
            let base = program.rsplit('/').next().unwrap();
            assert!(!shells.contains(&base), "{name} runs a shell: {program}");
            spawns.push(format!(
                "{}: {program}",
                f.strip_prefix(env!("CARGO_MANIFEST_DIR"))
                    .unwrap()
                    .display()
            ));
        }
    }
    println!(
        "security: {} source files, no shell; processes started: {spawns:?}",
        files.len()
    );
}
