//! The journal's large documents, written and copied in pieces: a
//! transaction's chain, target and before-image (`txn_docs`), and a
//! domain's committed chain (the last columns of `domains`).
//!
//! A document of a 10,000-checkpoint chain is megabytes of JSON. Bound as
//! a value, SQLite would copy it, build the row's record around it (a second
//! copy), and load it again each time the row changed. Instead a row is
//! inserted with a zeroblob of the document's length, which SQLite stores
//! without expanding it when it is the row's last column, and the JSON is
//! then serialised straight into the row through incremental blob I/O, a
//! piece at a time; a commit copies the target into `domains` the same way.
//! Neither SQLite nor ckptstore holds a document whole while writing it.
//! (Reading one back still loads it: `json`.)

use std::io::{self, Write};

use rusqlite::blob::{Blob, ZeroBlob};
use rusqlite::{named_params, Connection, MAIN_DB};
use serde::Serialize;

use super::{JournalError, Result, Sql};
use crate::chain::{Chain, CheckpointDef};

/// Bytes moved per blob write or read.
const PIECE: usize = 64 * 1024;

/// Which document of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Doc {
    /// The chain as given (absent for an import).
    Chain,
    /// The definitions the transaction aims at, parent first.
    Target,
    /// libvirt's checkpoints when the transaction was planned.
    Before,
}

impl Doc {
    fn name(self) -> &'static str {
        match self {
            Doc::Chain => "chain",
            Doc::Target => "target",
            Doc::Before => "before",
        }
    }
}

const INSERT_DOC: &str = "INSERT INTO txn_docs (txn_id, name, items, json) \
     VALUES (:txn, :name, :items, :json)";

const DELETE_DOC: &str = "DELETE FROM txn_docs WHERE txn_id = :txn AND name = :name";

const DOC_ROW: &str =
    "SELECT rowid AS row, items FROM txn_docs WHERE txn_id = :txn AND name = :name";

const DELETE_COMMITTED: &str = "DELETE FROM domains WHERE domain = :domain";

const INSERT_COMMITTED: &str = "INSERT INTO domains \
     (domain, txn_id, committed_at, checkpoints, chain_json, defs_json) \
     VALUES (:domain, :txn, :now, :checkpoints, :chain, :defs)";

/// The chain, replacing the one the transaction had; `None` leaves it
/// without one.
pub(super) fn put_chain(conn: &Connection, txn: &str, chain: Option<&Chain>) -> Result<()> {
    let name = Doc::Chain.name();
    conn.exec(DELETE_DOC, named_params! {":txn": txn, ":name": name})?;
    match chain {
        Some(chain) => put(conn, txn, Doc::Chain, None, chain),
        None => Ok(()),
    }
}

/// Definitions (the target or the before-image), replacing the ones the
/// transaction had.
pub(super) fn put_defs(
    conn: &Connection,
    txn: &str,
    doc: Doc,
    defs: &[CheckpointDef],
) -> Result<()> {
    conn.exec(DELETE_DOC, named_params! {":txn": txn, ":name": doc.name()})?;
    put(conn, txn, doc, Some(defs.len()), defs)
}

fn put<T: Serialize + ?Sized>(
    conn: &Connection,
    txn: &str,
    doc: Doc,
    items: Option<usize>,
    value: &T,
) -> Result<()> {
    let len = zeroblob(json_len(value))?;
    conn.exec(
        INSERT_DOC,
        named_params! {
            ":txn": txn,
            ":name": doc.name(),
            ":items": items.map(|n| n as i64),
            ":json": len,
        },
    )?;
    let row = conn.last_insert_rowid();
    let blob = open(conn, "txn_docs", "json", row, false)?;
    let mut out = Pieces::new(blob);
    let written = serde_json::to_writer(&mut out, value);
    out.finish(written.map_err(io::Error::from))
}

/// Make transaction `txn`'s target (and chain) `domain`'s committed chain:
/// the row is replaced, its documents copied in pieces.
pub(super) fn commit(conn: &Connection, domain: &str, txn: &str, now: &str) -> Result<()> {
    let (target, checkpoints) = doc_row(conn, txn, Doc::Target)?
        .ok_or_else(|| JournalError::decode("transaction", format!("{txn} has no target")))?;
    let chain = doc_row(conn, txn, Doc::Chain)?.map(|(row, _)| row);
    let target = open(conn, "txn_docs", "json", target, true)?;
    let chain = chain
        .map(|row| open(conn, "txn_docs", "json", row, true))
        .transpose()?;
    conn.exec(DELETE_COMMITTED, named_params! {":domain": domain})?;
    conn.exec(
        INSERT_COMMITTED,
        named_params! {
            ":domain": domain,
            ":txn": txn,
            ":now": now,
            ":checkpoints": checkpoints.unwrap_or(0),
            ":chain": chain.as_ref().map(|b| zeroblob(b.len())).transpose()?,
            ":defs": zeroblob(target.len())?,
        },
    )?;
    let row = conn.last_insert_rowid();
    copy(target, open(conn, "domains", "defs_json", row, false)?)?;
    if let Some(chain) = chain {
        copy(chain, open(conn, "domains", "chain_json", row, false)?)?;
    }
    Ok(())
}

fn doc_row(conn: &Connection, txn: &str, doc: Doc) -> Result<Option<(i64, Option<i64>)>> {
    conn.first(
        DOC_ROW,
        named_params! {":txn": txn, ":name": doc.name()},
        |r| Ok((r.get("row")?, r.get("items")?)),
    )
}

fn open<'c>(
    conn: &'c Connection,
    table: &'static str,
    column: &'static str,
    row: i64,
    read_only: bool,
) -> Result<Blob<'c>> {
    conn.blob_open(MAIN_DB, table, column, row, read_only)
        .map_err(|e| JournalError::sqlite("incremental blob I/O (open)", e))
}

fn copy(from: Blob<'_>, mut to: Blob<'_>) -> Result<()> {
    let mut buf = vec![0u8; PIECE];
    let mut at = 0;
    while at < from.len() {
        let n = PIECE.min(from.len() - at);
        from.read_at_exact(&mut buf[..n], at)
            .and_then(|()| to.write_at(&buf[..n], at))
            .map_err(|e| JournalError::sqlite("incremental blob I/O (copy)", e))?;
        at += n;
    }
    Ok(())
}

fn zeroblob(len: usize) -> Result<ZeroBlob> {
    i32::try_from(len)
        .map(ZeroBlob)
        .map_err(|_| JournalError::decode("document", format!("{len} bytes is too long")))
}

/// The bytes of `value`'s JSON, counted without keeping them.
fn json_len<T: Serialize + ?Sized>(value: &T) -> usize {
    let mut n = Count(0);
    // Serialising plain data structures cannot fail.
    let _ = serde_json::to_writer(&mut n, value);
    n.0
}

struct Count(usize);

impl Write for Count {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A writer into a blob, a piece at a time; SQLite's error is kept as it
/// came (a full disk is [`JournalError::Full`], not an I/O error).
struct Pieces<'c> {
    blob: Blob<'c>,
    buf: Vec<u8>,
    at: usize,
    failed: Option<rusqlite::Error>,
}

impl<'c> Pieces<'c> {
    fn new(blob: Blob<'c>) -> Self {
        Pieces {
            blob,
            buf: Vec::with_capacity(PIECE),
            at: 0,
            failed: None,
        }
    }

    fn put(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.blob.write_at(&self.buf, self.at) {
            let msg = e.to_string();
            self.failed = Some(e);
            return Err(io::Error::other(msg));
        }
        self.at += self.buf.len();
        self.buf.clear();
        Ok(())
    }

    /// The outcome of the serialisation, with the last piece written; the
    /// document must fill the zeroblob exactly.
    fn finish(mut self, written: io::Result<()>) -> Result<()> {
        let flushed = written.and_then(|()| self.put());
        if let Some(e) = self.failed.take() {
            return Err(JournalError::sqlite("incremental blob I/O (write)", e));
        }
        flushed.map_err(|e| JournalError::io(format!("writing a journal document: {e}")))?;
        if self.at != self.blob.len() {
            return Err(JournalError::decode(
                "document",
                format!("{} bytes written into {}", self.at, self.blob.len()),
            ));
        }
        Ok(())
    }
}

impl Write for Pieces<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > PIECE {
            self.put()?;
        }
        if data.len() >= PIECE {
            self.buf.extend_from_slice(data);
            self.put()?;
        } else {
            self.buf.extend_from_slice(data);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.put()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use uuid::Uuid;

    use super::super::{Journal, TxnEvent};
    use crate::chain::CheckpointDef;

    /// `n` definitions on 4 disks: about 250 bytes of JSON each.
    fn defs(n: usize, tag: &str) -> Vec<CheckpointDef> {
        (0..n)
            .map(|i| CheckpointDef {
                name: format!("{tag}-{i:05}"),
                parent: i.checked_sub(1).map(|p| format!("{tag}-{p:05}")),
                creation_time: 1_700_000_000 + i as i64,
                description: Some(format!("nightly \"{i}\" ü")),
                disks: ["vda", "vdb", "vdc", "vdd"]
                    .iter()
                    .map(|t| (t.to_string(), format!("{tag}-{i:05}")))
                    .collect::<BTreeMap<_, _>>(),
            })
            .collect()
    }

    fn begin(j: &Journal, target: &[CheckpointDef], before: &[CheckpointDef]) -> Uuid {
        super::super::tests::begin(j, target, before, &[])
    }

    #[test]
    fn documents_of_many_pieces_read_back_and_commit_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("journal.db")).unwrap();
        // Several 64 KiB pieces each, and not a multiple of one.
        let (target, before) = (defs(1_500, "t"), defs(700, "b"));
        let id = begin(&j, &target, &before);
        let t = j.txn(id).unwrap();
        assert_eq!((t.target, t.before), (target.clone(), before));
        // What a commit records as applied replaces the target, and is what
        // `domains` then holds.
        let applied = defs(1_501, "a");
        j.finish_applied(id, TxnEvent::Commit, 10, Some(&applied), None)
            .unwrap();
        assert_eq!(j.txn(id).unwrap().target, applied);
        let c = j.committed("d").unwrap().unwrap();
        assert_eq!((c.defs, c.txn), (applied, id));
        assert_eq!(
            j.metrics_snapshot().unwrap().committed[0].checkpoints,
            1_501
        );
        // A later commit replaces the domain's row whole.
        let next = begin(&j, &target, &[]);
        j.finish(next, TxnEvent::Commit, 10).unwrap();
        assert_eq!(j.committed("d").unwrap().unwrap().defs, target);
        assert_eq!(j.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn pruned_history_takes_its_documents_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("journal.db")).unwrap();
        for _ in 0..3 {
            let id = begin(&j, &defs(3, "t"), &[]);
            j.finish(id, TxnEvent::Commit, 1).unwrap();
        }
        let docs: i64 = j
            .conn()
            .query_row("SELECT count(*) FROM txn_docs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            docs, 2,
            "the one transaction kept: its target and before-image"
        );
        assert!(j.committed("d").unwrap().is_some());
    }
}
