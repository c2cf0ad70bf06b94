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
//! The code is the library's: `ErrorKind::exit_code` of the error's kind,
//! one table for the command and the Python module, never a guess from
//! message text.

use std::fmt;
use std::process::ExitCode;

use ckptstore::{BackendError, BackendErrorKind, Error, ErrorDoc, ErrorKind};
use serde_json::Value;

use super::output::Out;
use super::Invocation;

/// `validate` found problems (the same code as a rolled-back operation).
pub const FINDINGS: u8 = ErrorKind::Findings.exit_code();
pub const BAD_INPUT: u8 = ErrorKind::BadInput.exit_code();
pub const LIBVIRT: u8 = ErrorKind::Unreachable.exit_code();

/// A failure the command line itself detects (or a library failure with
/// the report that comes with it), with its kind, what happened and what
/// the user should do.
#[derive(Debug)]
pub struct Fail {
    kind: ErrorKind,
    what: String,
    todo: String,
    /// The command's report, printed with the error in JSON mode.
    report: Option<Value>,
}

impl Fail {
    /// Input that cannot be used: nothing was changed.
    pub fn bad_input(what: String) -> Fail {
        Fail::of(
            ErrorKind::BadInput,
            what,
            "fix the chain (its form: `ckptstore sync --help`); nothing was changed",
        )
    }

    /// The journal cannot be used.
    pub fn journal(what: String, todo: &str) -> Fail {
        Fail::of(ErrorKind::Journal, what, todo)
    }

    /// A failure of a kind.
    pub fn of(kind: ErrorKind, what: String, todo: &str) -> Fail {
        Fail {
            kind,
            what,
            todo: todo.into(),
            report: None,
        }
    }

    /// A failure with an explicit exit code (one of the kinds' codes).
    pub fn new(code: u8, what: String, todo: &str) -> Fail {
        let kind = [
            ErrorKind::Findings,
            ErrorKind::BadInput,
            ErrorKind::Busy,
            ErrorKind::Unreachable,
            ErrorKind::Journal,
        ]
        .into_iter()
        .find(|k| k.exit_code() == code)
        .unwrap_or(ErrorKind::Unreachable);
        Fail::of(kind, what, todo)
    }

    /// The command's report goes with the error (JSON mode prints both).
    pub fn with_report(mut self, report: &impl serde::Serialize) -> Fail {
        self.report = serde_json::to_value(report).ok();
        self
    }

    /// A failure from a recover report's error document.
    pub fn from_doc(doc: &ErrorDoc, what: String) -> Fail {
        Fail::of(doc.kind, what, &doc.hint)
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
    let doc = ErrorDoc::new(f.kind, f.what, f.todo);
    if out.json() {
        let _ = out.failure(f.report, &doc);
    }
    eprintln!("ckptstore: {} — {}", doc.message, doc.hint);
    ExitCode::from(doc.exit_code)
}

fn classify(e: &anyhow::Error, inv: &Invocation) -> Fail {
    for cause in e.chain() {
        if let Some(f) = cause.downcast_ref::<Fail>() {
            return Fail {
                kind: f.kind,
                what: f.what.clone(),
                todo: f.todo.clone(),
                report: f.report.clone(),
            };
        }
        if let Some(err) = cause.downcast_ref::<Error>() {
            return store_error(err, inv);
        }
        if let Some(err) = cause.downcast_ref::<BackendError>() {
            return Fail::of(
                ErrorKind::Unreachable,
                err.to_string(),
                "check libvirt's log, then retry",
            );
        }
    }
    Fail::of(
        ErrorKind::Unreachable,
        format!("{e:#}"),
        "see the message above; run with -v for details",
    )
}

/// A library error as the command reports it: the library's kind and hint,
/// with the journal's path and the URI in the message where they help.
fn store_error(e: &Error, inv: &Invocation) -> Fail {
    let mut f = Fail::of(e.kind(), e.to_string(), &e.hint());
    match e {
        Error::Journal(j) => {
            let msg = j.to_string();
            f.what = format!(
                "journal {} {}",
                inv.db.display(),
                msg.strip_prefix("journal ").unwrap_or(&msg)
            );
        }
        Error::Backend {
            source,
            txn: None,
            domain,
            ..
        } => match source.kind {
            BackendErrorKind::NoDomain => {
                f.what = format!("libvirt at {} has no domain {domain}", inv.uri);
                f.todo = format!(
                    "check the domain's name or UUID (`virsh -c {} list --all`) and --connect",
                    inv.uri
                );
            }
            BackendErrorKind::Unreachable => f.what = source.to_string(),
            _ => {}
        },
        Error::Refused { .. } => {
            if let Some(r) = e.report() {
                f = f.with_report(r);
            }
        }
        _ => {}
    }
    f
}
