//! `prune`: its arguments and its human output (the JSON document is the
//! library's [`PruneReport`]).

use ckptstore::{PruneReport, Retention};
use clap::Args;

use crate::exit::{self, Fail};
use crate::output::{self, Out};

pub const PRUNE_AFTER: &str = "\
Deletes the oldest checkpoints for real, bitmaps included, in one journaled transaction: on a
running domain by libvirt's real delete; on a shut-off one by `qemu-img bitmap --remove` on every
image layer holding the bitmap (an image another process holds open is refused, nothing changed),
then a metadata delete. The committed chain loses them too. The newest checkpoint, the one the
next incremental backup hangs off, is never deleted. Without --apply: a dry run, nothing changed.

Example:
  $ ckptstore prune --domain fedora --keep 2 --apply
  domain fedora: pruned 3 checkpoints, kept 2 (transaction 5c3e1b7a-2d4f-4a6b-8e9c-0a1b2c3d4e5f, 3 libvirt calls)";

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// The libvirt domain (name or UUID)
    #[arg(long, value_name = "DOMAIN")]
    pub domain: String,
    /// Keep the N newest checkpoints (N at least 1)
    #[arg(
        long,
        value_name = "N",
        conflicts_with = "older_than",
        required_unless_present = "older_than"
    )]
    pub keep: Option<usize>,
    /// Delete the checkpoints older than this (like 7d, 12h, 30m; units s, m, h, d, w)
    #[arg(long, value_name = "DURATION", required_unless_present = "keep")]
    pub older_than: Option<String>,
    /// Delete for real (without it: a dry run)
    #[arg(long)]
    pub apply: bool,
}

impl PruneArgs {
    /// The retention rule; a bad duration is bad input (exit 2).
    pub fn retention(&self) -> anyhow::Result<Retention> {
        match (self.keep, &self.older_than) {
            (Some(n), _) => Ok(Retention::Keep(n)),
            (None, Some(text)) => Retention::parse_age(text)
                .map(Retention::OlderThan)
                .ok_or_else(|| {
                    Fail::new(
                        exit::BAD_INPUT,
                        format!("--older-than {text:?} is not a duration"),
                        "give a whole number and a unit (s, m, h, d, w), like 7d, 12h, 30m; nothing was changed",
                    )
                    .into()
                }),
            (None, None) => unreachable!("clap requires --keep or --older-than"),
        }
    }
}

pub fn print(out: &Out, r: &PruneReport) -> anyhow::Result<()> {
    out.emit(r, || {
        let n = r.pruned.len() as u64;
        let k = r.kept.len() as u64;
        let mut s = if r.applied {
            format!(
                "domain {}: pruned {n} checkpoint{}, kept {k} (transaction {}, {} libvirt call{})\n",
                r.domain,
                output::plural(n),
                r.txn.map(|t| t.to_string()).unwrap_or_default(),
                r.libvirt_calls,
                output::plural(r.libvirt_calls)
            )
        } else {
            format!(
                "domain {}: would prune {n} checkpoint{}, keep {k} (dry run: nothing changed; --apply deletes)\n",
                r.domain,
                output::plural(n)
            )
        };
        for p in &r.pruned {
            s.push_str(&format!("  prune {p}\n"));
        }
        for b in &r.bitmaps_removed {
            s.push_str(&format!(
                "  bitmap {} of disk {} in {}\n",
                b.checkpoint,
                b.target,
                b.image.display()
            ));
        }
        output::warnings(&mut s, &r.warnings);
        s
    })
}
