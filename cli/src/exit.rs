//! The way out: every failure becomes one exit code and one line on stderr,
//! `ckptstore: <what happened> — <what to do>`.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | the operation failed and was rolled back |
//! | 2 | bad input or usage; nothing changed anywhere |
//! | 3 | busy: a live process holds this domain |
//! | 4 | libvirt unreachable, or domain not found (and other libvirt failures) |
//! | 5 | journal unusable |
//!
//! The code is chosen from the library's error predicates
//! (`is_bad_input`, `is_busy`, ...), never from message text.

use std::fmt;
use std::process::ExitCode;

use ckptstore::journal::JournalError;
use ckptstore::{BackendError, BackendErrorKind, Error};
use serde_json::json;

use super::output::Out;
use super::Invocation;

pub const ROLLED_BACK: u8 = 1;
/// `validate` found problems (the same code as a rolled-back operation).
pub const FINDINGS: u8 = 1;
pub const BAD_INPUT: u8 = 2;
pub const BUSY: u8 = 3;
pub const LIBVIRT: u8 = 4;
pub const JOURNAL: u8 = 5;

/// A failure the command line itself detects, with its exit code and what
/// the user should do.
#[derive(Debug)]
pub struct Fail {
    code: u8,
    what: String,
    todo: String,
}

impl Fail {
    /// Input that cannot be used: nothing was changed.
    pub fn bad_input(what: String) -> Fail {
        Fail {
            code: BAD_INPUT,
            what,
            todo: "fix the chain (its form: `ckptstore sync --help`); nothing was changed".into(),
        }
    }

    /// The journal cannot be used.
    pub fn journal(what: String, todo: &str) -> Fail {
        Fail {
            code: JOURNAL,
            what,
            todo: todo.into(),
        }
    }

    /// Any other failure with an explicit code.
    pub fn new(code: u8, what: String, todo: &str) -> Fail {
        Fail {
            code,
            what,
            todo: todo.into(),
        }
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for Fail {}

/// A clap parse result that is not a command to run: `--help` and
/// `--version` (exit 0) or a usage error (exit 2, one line).
pub fn usage(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind as K;
    match e.kind() {
        K::DisplayHelp | K::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        K::DisplayHelpOnMissingArgumentOrSubcommand | K::MissingSubcommand => {
            eprintln!("ckptstore: no command given — run `ckptstore --help` for the commands, or `ckptstore demo` to see one run");
            ExitCode::from(BAD_INPUT)
        }
        _ => {
            let text = e.render().to_string();
            let what: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(|l| l.trim().trim_start_matches("error: "))
                .filter(|l| !l.is_empty())
                .collect();
            let mut line = String::new();
            for part in what {
                if !line.is_empty() {
                    line.push_str(if line.ends_with(':') { " " } else { "; " });
                }
                line.push_str(part);
            }
            eprintln!(
                "ckptstore: {line} — run `{}` for usage; nothing was changed",
                help_command()
            );
            ExitCode::from(BAD_INPUT)
        }
    }
}

/// `ckptstore [COMMAND] --help` for the command the arguments name.
fn help_command() -> String {
    use clap::CommandFactory;
    let cli = super::Cli::command();
    let names: Vec<String> = cli
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    match std::env::args().skip(1).find(|a| names.contains(a)) {
        Some(cmd) => format!("ckptstore {cmd} --help"),
        None => "ckptstore --help".into(),
    }
}

/// Report a failed command: one line on stderr, the JSON failure document
/// on stdout in JSON mode, and the exit code.
pub fn fail(e: &anyhow::Error, inv: &Invocation, out: &Out) -> ExitCode {
    let f = classify(e, inv);
    let what = f.what.replace('\n', " ");
    if out.json() {
        let _ = out.failure(json!({"exit_code": f.code, "message": what, "hint": f.todo}));
    }
    eprintln!("ckptstore: {what} — {}", f.todo);
    ExitCode::from(f.code)
}

fn classify(e: &anyhow::Error, inv: &Invocation) -> Fail {
    for cause in e.chain() {
        if let Some(f) = cause.downcast_ref::<Fail>() {
            return Fail {
                code: f.code,
                what: f.what.clone(),
                todo: f.todo.clone(),
            };
        }
        if let Some(err) = cause.downcast_ref::<Error>() {
            return store_error(err, inv);
        }
        if let Some(err) = cause.downcast_ref::<BackendError>() {
            return backend_error(err, None, inv);
        }
    }
    Fail::new(
        ROLLED_BACK,
        format!("{e:#}"),
        "see the message above; run with -v for details",
    )
}

/// The exit code and the JSON `error` object of a library error, as a
/// failing command would report it.
pub fn error_doc(e: &Error, inv: &Invocation) -> (u8, serde_json::Value) {
    let f = store_error(e, inv);
    let what = f.what.replace('\n', " ");
    (
        f.code,
        json!({"exit_code": f.code, "message": what, "hint": f.todo}),
    )
}

fn store_error(e: &Error, inv: &Invocation) -> Fail {
    let what = e.to_string();
    match e {
        Error::Journal(j) => journal_error(j, inv),
        Error::UnknownTarget { .. } => Fail::new(
            BAD_INPUT,
            what,
            "update the chain's disk map to the domain's current disk targets; nothing was changed",
        ),
        Error::NoCommittedChain { domain } => Fail::new(
            BAD_INPUT,
            what,
            &format!(
                "run `ckptstore sync --chain FILE` or `ckptstore import --domain {domain}` first; nothing was changed"
            ),
        ),
        e if e.is_bad_input() => Fail::bad_input(what),
        Error::Busy { .. } | Error::TakenOver { .. } => {
            Fail::new(BUSY, what, "wait for that process to finish (see `ckptstore status`), then retry")
        }
        Error::Diverged { domain, .. } => Fail::new(
            BUSY,
            what,
            &format!(
                "another tool is changing these checkpoints: stop it, then run `ckptstore recover --domain {domain}`"
            ),
        ),
        e if e.is_rolled_back() => {
            Fail::new(ROLLED_BACK, what, "libvirt's checkpoints are as they were before; fix the cause and retry")
        }
        Error::Refused { domain, .. } => Fail::new(
            LIBVIRT,
            what,
            &format!("run `ckptstore recover --domain {domain}` once libvirt accepts the calls again"),
        ),
        Error::Backend { source, txn, domain, .. } => {
            let mut f = backend_error(source, *txn, inv);
            match (source.kind, txn) {
                (BackendErrorKind::NoDomain, None) => f.what = format!("libvirt at {} has no domain {domain}", inv.uri),
                (BackendErrorKind::Unreachable, None) => {}
                _ => f.what = what,
            }
            f
        }
        _ => Fail::new(ROLLED_BACK, what, "run with -v for details"),
    }
}

fn backend_error(e: &BackendError, txn: Option<uuid::Uuid>, inv: &Invocation) -> Fail {
    let todo = match (e.kind, txn) {
        (_, Some(_)) => "the transaction is left open: run `ckptstore recover` once libvirt answers again".to_string(),
        (BackendErrorKind::NoDomain, None) => {
            format!("check the domain's name or UUID (`virsh -c {} list --all`) and --connect", inv.uri)
        }
        (BackendErrorKind::Unreachable | BackendErrorKind::ConnectionLost, None) => {
            "check that libvirtd runs and answers there (choose it with --connect or LIBVIRT_DEFAULT_URI), then retry"
                .to_string()
        }
        _ => "nothing was changed; check libvirt's log, then retry".to_string(),
    };
    Fail {
        code: LIBVIRT,
        what: e.to_string(),
        todo,
    }
}

fn journal_error(e: &JournalError, inv: &Invocation) -> Fail {
    let msg = e.to_string();
    let what = format!(
        "journal {} {}",
        inv.db.display(),
        msg.strip_prefix("journal ").unwrap_or(&msg)
    );
    let todo = match e {
        JournalError::Corrupt { .. } | JournalError::Decode { .. } => {
            "move it aside (keep it for a post-mortem) and run `ckptstore import --domain D` for each domain to rebuild it"
        }
        JournalError::NewerSchema { .. } => {
            "use the newer ckptstore that wrote it; the file was left untouched"
        }
        JournalError::ReadOnly { .. } | JournalError::Io { .. } => {
            "make the file and its folder writable by this user, or pass --db PATH"
        }
        JournalError::Full { .. } => "free space on the journal's file system, then retry",
        JournalError::Locked { .. } => "another process holds the journal's lock: retry when it is done",
        _ => "check the journal file, or pass --db PATH to use another",
    };
    Fail::journal(what, todo)
}
