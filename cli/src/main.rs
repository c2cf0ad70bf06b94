//! The `ckptstore` command: arguments (clap), one function per command, and
//! the way out (exit code and one line on stderr, see [`exit`]). A thin
//! layer over the library, in its own package so that the library never
//! compiles the command's dependencies.
//!
//! Every command is a call into the library followed by rendering
//! ([`output`]); nothing here decides anything about chains, libvirt or
//! the journal.

mod demo;
mod exit;
#[cfg(feature = "failpoints")]
mod failpoints;
mod metrics;
mod output;
mod progress;
mod prune;
mod reclaim;

use std::fs::DirBuilder;
use std::io::{IsTerminal, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ckptstore::redact_uri;
use ckptstore::{BitmapPolicy, Chain, LibvirtBackend, Policy, Store, StoreOptions};
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use exit::Fail;
use output::Out;

/// Where the journal lives unless `--db` or `CKPTSTORE_DB` says otherwise.
const DEFAULT_DB: &str = "/var/lib/ckptstore/journal.db";

const ABOUT: &str = "Crash-safe redefinition of libvirt checkpoint chains, journaled in SQLite";

const LONG_ABOUT: &str = "\
Crash-safe redefinition of libvirt checkpoint chains, journaled in SQLite.

ckptstore makes a domain's libvirt checkpoints exactly the chain a management
system keeps, all or nothing: the intent is journaled before the first libvirt
call, so a run killed at any moment is finished or undone by the next
`recover` (or by the next `sync` of that domain).";

const MAIN_AFTER: &str = "\
Exit codes:
  0  success
  1  the operation failed and was rolled back (libvirt is as it was)
  2  bad input or usage (nothing changed anywhere)
  3  busy: a live process holds this domain
  4  libvirt unreachable, or domain not found
  5  journal unusable (corrupt, newer schema, unwritable)

Example:
  $ ckptstore demo                          # the whole story, no daemon needed
  $ ckptstore sync --chain chain.json       # make libvirt match the chain
  $ ckptstore status                        # what is open, what is committed";

const SYNC_AFTER: &str = "\
The chain file (\"-\" reads standard input):
  {
    \"vm_id\": \"93a5c045-6457-2c09-e56c-927cdf34e178\",
    \"domain\": \"fedora\",
    \"disks\": {\"22e5a7d6-5409-482d-bda4-f5939b27aad4\": \"sda\"},
    \"checkpoints\": [
      {\"id\": \"7b1e2a8c-0c1f-4a0e-9a52-2f6f3b7d9c10\", \"parent\": null,
       \"created\": \"2019-03-12T23:52:00Z\", \"description\": \"after OS install\",
       \"disks\": [\"22e5a7d6-5409-482d-bda4-f5939b27aad4\"]}
    ]
  }
`domain` defaults to `vm_id` as the libvirt UUID; `parent` and `description`
may be omitted; checkpoints may come in any order. A checkpoint id is any
libvirt checkpoint name (letters, digits, '_', '-', '.', not first; at most
1023 bytes: `virtnbdbackup.0`, `one-31-2`, a UUID); a disk id is any
non-empty string.

Example:
  $ ckptstore sync --chain chain.json
  domain fedora: committed (transaction 0f9a6d2e-5b8c-4f1e-9d3a-7c2b1e4f6a80)
    1 redefined, 0 deleted, 0 unchanged; 1 libvirt call
  $ ckptstore sync --chain chain.json
  domain fedora: unchanged (transaction 5c3e1b7a-2d4f-4a6b-8e9c-0a1b2c3d4e5f)
    0 redefined, 0 deleted, 1 unchanged; 0 libvirt calls
  $ ckptstore sync --domain fedora          # after the domain was recreated";

const PLAN_AFTER: &str = "\
`--domain D` previews `sync --domain D`, the re-apply of D's committed chain.

Example:
  $ ckptstore plan --chain chain.json
  domain fedora: 2 steps, 1 unchanged
    delete    stale-1
    redefine  7b1e2a8c-0c1f-4a0e-9a52-2f6f3b7d9c10
  $ ckptstore plan --domain fedora";

const EXPORT_AFTER: &str = "\
The chain file `sync --chain` reads, in both output modes. A chain committed
by `sync --chain` comes back as given; one adopted by `import` is described
from libvirt's definitions (vm_id: the domain's UUID; disk ids: the target
names). `sync --chain` of the output changes nothing and makes no libvirt
call while libvirt holds the chain.

Example:
  $ ckptstore export --domain fedora > chain.json
  $ ckptstore sync --chain chain.json
  domain fedora: unchanged (transaction 3c1d…)";

const RECOVER_AFTER: &str = "\
Example:
  $ ckptstore recover
  transaction 0f9a6d2e-5b8c-4f1e-9d3a-7c2b1e4f6a80 on domain fedora: committed (4 libvirt calls)
  $ ckptstore recover --domain fedora --rollback";

const STATUS_AFTER: &str = "\
Example:
  $ ckptstore status
  incomplete transactions:
    0f9a6d2e-5b8c-4f1e-9d3a-7c2b1e4f6a80  domain fedora  sync  applying  4/8 steps  owner pid 4242 dead
  committed chains:
    fedora  8 checkpoints  root 7b1e2a8c-0c1f-4a0e-9a52-2f6f3b7d9c10  leaf 1d2c3b4a-5e6f-4a7b-8c9d-0e1f2a3b4c5d";

const IMPORT_AFTER: &str = "\
Example:
  $ ckptstore import --domain fedora
  domain fedora: imported 8 checkpoints as its committed chain (transaction 5c3e1b7a-2d4f-4a6b-8e9c-0a1b2c3d4e5f)";

const HISTORY_AFTER: &str = "\
Example:
  $ ckptstore history --domain fedora --limit 2
  5c3e1b7a-2d4f-4a6b-8e9c-0a1b2c3d4e5f  2024-05-02T10:00:01.000Z  sync    committed     8 checkpoints  0 libvirt calls
  0f9a6d2e-5b8c-4f1e-9d3a-7c2b1e4f6a80  2024-05-01T09:00:00.000Z  sync    committed     8 checkpoints  8 libvirt calls";

const VALIDATE_AFTER: &str = "\
Compares the journal's committed chain with libvirt's checkpoints, and each checkpoint with the
bitmaps in the domain's qcow2 images (read directly, read-only; a running domain's bitmaps are
checked by libvirt instead, on every disk, changing nothing). Exit 1 when there are findings.

Example:
  $ ckptstore validate --domain fedora
  domain fedora: 2 findings in 3 checkpoints (shut off: images read directly)
    missing_bitmap         checkpoint 1a4b9b0e-5e47-4c39-8d2a-6b1f7f3d2a12 disk vda image /var/lib/libvirt/images/fedora.qcow2: bitmap 1a4b9b0e-5e47-4c39-8d2a-6b1f7f3d2a12 is not in the top image
    orphan_bitmap          checkpoint stray disk vda image /var/lib/libvirt/images/fedora.qcow2: bitmap stray is in the top image but no checkpoint names it for this disk
  usable for an incremental backup: 0f4b9b0e-5e47-4c39-8d2a-6b1f7f3d2a11 (the leaf 1a4b9b0e-5e47-4c39-8d2a-6b1f7f3d2a12 is not)";

const METRICS_AFTER: &str = "\
Prometheus' text format (0.0.4) from the journal alone (libvirt is not asked):
ckptstore_checkpoints, ckptstore_open_transactions{owner_alive},
ckptstore_last_commit_timestamp_seconds, ckptstore_transactions_total{kind,outcome},
ckptstore_validate_findings{kind} and ckptstore_last_validate_timestamp_seconds,
each labelled with the domain. `--json` prints the metrics document instead.

`--textfile PATH` replaces PATH atomically (a temporary file in its folder, renamed
over it), mode 0644, for node_exporter's textfile collector; run it from cron.

Example:
  $ ckptstore metrics --textfile /var/lib/node_exporter/textfile_collector/ckptstore.prom
  $ ckptstore metrics | grep ckptstore_checkpoints
  ckptstore_checkpoints{domain=\"fedora\"} 8";
const ENSURE_AFTER: &str = "\
Makes one checkpoint, the base of the next incremental backup, usable in libvirt: redefined on
exactly the disks whose bitmap is usable, as a root when libvirt lacks its parent. Its definition
comes from the domain's committed chain, or from --chain FILE. Nothing is ever deleted; a second
call makes no libvirt call. Exit 0 even when every disk is full: the per-disk mode is the answer.

Example:
  $ ckptstore ensure --domain fedora --checkpoint 1a4b9b0e-5e47-4c39-8d2a-6b1f7f3d2a12
  domain fedora: checkpoint 1a4b9b0e-5e47-4c39-8d2a-6b1f7f3d2a12 redefined (transaction 6e0c…, 1 libvirt call)
    vda  incremental
    vdb  full: libvirt finds bitmap 1a4b9b0e-5e47-4c39-8d2a-6b1f7f3d2a12 missing or broken";

const DEMO_AFTER: &str = "\
Example:
  $ ckptstore demo
  (a guided run on libvirt's built-in test driver, with a temporary journal:
   sync, a crash in the middle, status, recover, the result)";

/// The `ckptstore` command.
#[derive(Debug, Parser)]
#[command(name = "ckptstore", version, about = ABOUT, long_about = LONG_ABOUT, after_help = MAIN_AFTER)]
pub struct Cli {
    /// The journal file [env: CKPTSTORE_DB]
    #[arg(long, global = true, value_name = "PATH", env = "CKPTSTORE_DB", hide_env = true, default_value = DEFAULT_DB)]
    db: PathBuf,
    /// libvirt URI [env: LIBVIRT_DEFAULT_URI]
    #[arg(
        long,
        global = true,
        value_name = "URI",
        env = "LIBVIRT_DEFAULT_URI",
        hide_env = true,
        default_value = "qemu:///system"
    )]
    connect: String,
    /// Print one JSON document on stdout instead of human output
    #[arg(long, global = true)]
    json: bool,
    /// Bitmaps of the checkpoints a sync defines: degrade (leave a disk whose bitmap is missing or unusable out; a checkpoint with none left is not redefined), strict (refuse, exit 1, nothing changed), ignore (metadata only) [env: CKPTSTORE_BITMAPS]
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "POLICY",
        env = "CKPTSTORE_BITMAPS",
        hide_env = true,
        default_value = "degrade"
    )]
    bitmaps: Bitmaps,
    /// More logs on stderr: -v info, -vv debug, -vvv trace (default: errors only; RUST_LOG works too)
    #[arg(short, long, global = true, action = ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

/// `--bitmaps`: [`ckptstore::BitmapPolicy`] on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Bitmaps {
    Degrade,
    Strict,
    Ignore,
}

impl From<Bitmaps> for BitmapPolicy {
    fn from(b: Bitmaps) -> Self {
        match b {
            Bitmaps::Degrade => BitmapPolicy::Degrade,
            Bitmaps::Strict => BitmapPolicy::Strict,
            Bitmaps::Ignore => BitmapPolicy::Ignore,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a domain's libvirt checkpoints exactly a chain, all or nothing
    #[command(after_help = SYNC_AFTER)]
    Sync(SyncArgs),
    /// Print the steps `sync` would take and every warning; change nothing
    #[command(after_help = PLAN_AFTER)]
    Plan(SyncArgs),
    /// Finish (or undo) every incomplete transaction whose owner is dead
    #[command(after_help = RECOVER_AFTER)]
    Recover(RecoverArgs),
    /// Incomplete transactions and each domain's committed chain
    #[command(after_help = STATUS_AFTER)]
    Status(OptDomain),
    /// Adopt a domain's current libvirt checkpoints as its committed chain
    #[command(after_help = IMPORT_AFTER)]
    Import(DomainArg),
    /// Print a domain's committed chain as a chain file (JSON)
    #[command(after_help = EXPORT_AFTER)]
    Export(DomainArg),
    /// A domain's past transactions, newest first
    #[command(after_help = HISTORY_AFTER)]
    History(HistoryArgs),
    /// Check the journal, libvirt's checkpoints and the qcow2 bitmaps against each other
    #[command(after_help = VALIDATE_AFTER)]
    Validate(DomainArg),
    /// The journal's figures for Prometheus (text on stdout, or a file for node_exporter)
    #[command(after_help = METRICS_AFTER)]
    Metrics(MetricsArgs),
    /// Make one checkpoint, the next incremental backup's base, usable in libvirt
    #[command(after_help = ENSURE_AFTER)]
    Ensure(EnsureArgs),
    /// Find (and with --apply remove) orphan and inconsistent bitmaps and the checkpoints they leave unusable
    #[command(after_help = reclaim::RECLAIM_AFTER)]
    Reclaim(reclaim::ReclaimArgs),
    /// The whole story on libvirt's built-in test driver (no daemon needed)
    #[command(after_help = DEMO_AFTER)]
    Demo,
    /// Delete a domain's oldest checkpoints and their bitmaps (retention); a dry run without --apply
    #[command(after_help = prune::PRUNE_AFTER)]
    Prune(prune::PruneArgs),
}

#[derive(Debug, Args)]
struct SyncArgs {
    #[command(flatten)]
    what: ChainOrDomain,
    /// With --domain: delete the checkpoints libvirt has that the committed chain neither has nor adopts (foreign), within the chain's scope
    #[arg(long, conflicts_with = "chain")]
    prune_foreign: bool,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct ChainOrDomain {
    /// The chain as JSON ("-" reads standard input)
    #[arg(long, value_name = "FILE")]
    chain: Option<PathBuf>,
    /// Re-apply this domain's last committed chain (libvirt name or UUID)
    #[arg(long, value_name = "DOMAIN")]
    domain: Option<String>,
}

#[derive(Debug, Args)]
struct RecoverArgs {
    /// Only this domain's transactions
    #[arg(long, value_name = "DOMAIN")]
    domain: Option<String>,
    /// Restore the before-image instead of finishing
    #[arg(long)]
    rollback: bool,
}

#[derive(Debug, Args)]
struct OptDomain {
    /// Only this domain
    #[arg(long, value_name = "DOMAIN")]
    domain: Option<String>,
}

#[derive(Debug, Args)]
struct DomainArg {
    /// The libvirt domain (name or UUID)
    #[arg(long, value_name = "DOMAIN")]
    domain: String,
}

#[derive(Debug, Args)]
struct EnsureArgs {
    /// The libvirt domain (name or UUID)
    #[arg(long, value_name = "DOMAIN")]
    domain: String,
    /// The checkpoint to make usable
    #[arg(long, value_name = "NAME")]
    checkpoint: String,
    /// Take its definition from this chain (JSON, "-" reads standard input) instead of the committed chain
    #[arg(long, value_name = "FILE")]
    chain: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct HistoryArgs {
    /// The libvirt domain (name or UUID)
    #[arg(long, value_name = "DOMAIN")]
    domain: String,
    /// At most this many transactions
    #[arg(long, value_name = "N", default_value_t = 20)]
    limit: usize,
}

#[derive(Debug, Args)]
struct MetricsArgs {
    /// Write the text to this file atomically (for node_exporter's textfile collector) instead of stdout
    #[arg(long, value_name = "PATH")]
    textfile: Option<PathBuf>,
}

/// What the error messages need to know about the invocation.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The journal path.
    pub db: PathBuf,
    /// The libvirt URI without credentials.
    pub uri: String,
}

/// Parse the arguments, run the command, and turn the result into an exit
/// code with one line on stderr when it failed.
fn main() -> ExitCode {
    #[cfg(feature = "failpoints")]
    let _armed = failpoints::arm();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return exit::usage(e),
    };
    init_logs(cli.verbose);
    let inv = Invocation {
        db: cli.db.clone(),
        uri: redact_uri(&cli.connect),
    };
    let out = Out::new(cli.json);
    match run(cli, &out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit::fail(&e, &inv, &out),
    }
}

fn init_logs(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let filter = match verbose {
        0 => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("error")),
        1 => EnvFilter::new("warn,ckptstore=info"),
        2 => EnvFilter::new("info,ckptstore=debug"),
        _ => EnvFilter::new("debug,ckptstore=trace"),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .init();
}

fn run(cli: Cli, out: &Out) -> anyhow::Result<()> {
    let backend = || LibvirtBackend::new(&cli.connect);
    match cli.command {
        Command::Sync(args) => {
            let prune = args.prune_foreign;
            let report = match (args.what.chain, args.what.domain) {
                (Some(file), _) => {
                    let chain = read_chain(&file)?;
                    let store = open_store(&cli.db, cli.bitmaps, prune)?;
                    store.sync(&backend(), chain)?
                }
                (None, Some(domain)) => {
                    let store = open_store(&cli.db, cli.bitmaps, prune)?;
                    store.resync(&backend(), &domain)?
                }
                (None, None) => unreachable!("clap requires --chain or --domain"),
            };
            out.sync(&report)
        }
        Command::Plan(args) => {
            let prune = args.prune_foreign;
            let report = match (args.what.chain, args.what.domain) {
                (Some(file), _) => {
                    let chain = read_chain(&file)?;
                    open_store(&cli.db, cli.bitmaps, prune)?.plan(&backend(), chain)?
                }
                (None, Some(domain)) => {
                    open_store(&cli.db, cli.bitmaps, prune)?.plan_resync(&backend(), &domain)?
                }
                (None, None) => unreachable!("clap requires --chain or --domain"),
            };
            out.plan(&report)
        }
        Command::Recover(args) => {
            let store = open_store(&cli.db, cli.bitmaps, false)?;
            let policy = if args.rollback {
                Policy::Rollback
            } else {
                Policy::Resume
            };
            let report = store.recover(&backend(), policy, args.domain.as_deref())?;
            // The exit code is the worst of the failures.
            match report.worst() {
                None => out.recover(&report),
                Some(worst) => {
                    if !out.json() {
                        out.recover(&report)?;
                    }
                    let n = report.failed.len();
                    let all = n + report.recovered.len();
                    let what = format!(
                        "recover: {n} of {all} transaction{} failed and stay{} open: {}",
                        output::plural(all as u64),
                        if n == 1 { "s" } else { "" },
                        worst.error.message
                    );
                    Err(Fail::from_doc(&worst.error, what)
                        .with_report(&report)
                        .into())
                }
            }
        }
        Command::Status(args) => {
            let store = open_store(&cli.db, cli.bitmaps, false)?;
            out.status(&store.status(args.domain.as_deref())?)
        }
        Command::Import(args) => {
            let store = open_store(&cli.db, cli.bitmaps, false)?;
            out.import(&store.import(&backend(), &args.domain)?)
        }
        Command::Export(args) => {
            let store = open_store(&cli.db, cli.bitmaps, false)?;
            out.export(&store.export(&backend(), &args.domain)?)
        }
        Command::History(args) => {
            let store = open_store(&cli.db, cli.bitmaps, false)?;
            out.history(&store.history(&args.domain, args.limit)?)
        }
        Command::Validate(args) => {
            let store = open_store(&cli.db, cli.bitmaps, false)?;
            let report = ckptstore::validate(&store, &backend(), &args.domain)?;
            if report.ok {
                return out.validate(&report);
            }
            if !out.json() {
                out.validate(&report)?;
            }
            let n = report.findings.len();
            let d = &report.domain;
            let todo = format!(
                "see the findings above; `ckptstore sync --domain {d}` re-applies the committed chain with its bitmaps checked, \
                 `ckptstore import --domain {d}` adopts libvirt's checkpoints as they are; \
                 a backup may start from the usable checkpoint, or take a full backup"
            );
            Err(Fail::new(
                exit::FINDINGS,
                format!(
                    "domain {d}: validate found {n} problem{}",
                    output::plural(n as u64)
                ),
                &todo,
            )
            .with_report(&report)
            .into())
        }
        Command::Metrics(args) => {
            let store = open_store(&cli.db, cli.bitmaps, false)?;
            metrics::run(&store, args.textfile.as_deref(), out)
        }
        Command::Ensure(args) => {
            let chain = args.chain.as_deref().map(read_chain).transpose()?;
            let store = open_store(&cli.db, cli.bitmaps, false)?;
            out.ensure(&store.ensure(&backend(), &args.domain, &args.checkpoint, chain)?)
        }
        Command::Reclaim(args) => {
            let store = open_store(&cli.db, cli.bitmaps, false)?;
            reclaim::print(out, &store.reclaim(&backend(), &args.domain, args.apply)?)
        }
        Command::Demo => demo::run(out),
        Command::Prune(args) => {
            let retention = args.retention()?;
            let store = open_store(&cli.db, cli.bitmaps, false)?;
            prune::print(
                out,
                &store.prune(&backend(), &args.domain, retention, args.apply)?,
            )
        }
    }
}

/// Read and parse a chain file (`-` = standard input). Parse errors name
/// the line and column.
fn read_chain(file: &Path) -> anyhow::Result<Chain> {
    let (name, text) = if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map_err(|e| {
            Fail::bad_input(format!("cannot read the chain from standard input: {e}"))
        })?;
        ("from standard input".to_string(), text)
    } else {
        let text = std::fs::read_to_string(file).map_err(|e| {
            Fail::new(
                exit::BAD_INPUT,
                format!("cannot read chain file {}: {e}", file.display()),
                "check the path (\"-\" reads standard input); nothing was changed",
            )
        })?;
        (format!("in {}", file.display()), text)
    };
    serde_json::from_str(&text)
        .map_err(|e| Fail::bad_input(format!("the chain {name} is not valid: {e}")).into())
}

/// Open the journal, creating its folder (mode 0700) when it is missing,
/// with a progress bar on stderr when stderr is a terminal.
fn open_store(db: &Path, bitmaps: Bitmaps, prune_foreign: bool) -> anyhow::Result<Store> {
    if let Some(dir) = db
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                Fail::journal(
                    format!("cannot create the journal's folder {}: {e}", dir.display()),
                    "create it (mode 0700) or pass --db PATH",
                )
            })?;
    }
    let opts = StoreOptions {
        progress: progress::bar(),
        bitmaps: bitmaps.into(),
        prune_foreign,
        ..StoreOptions::default()
    };
    Ok(Store::open_with(db, opts)?)
}
