//! A transaction's steps: appended, marked done (the one commit that does not
//! wait for the disk), marked observed, read back; and the count of libvirt
//! calls, kept in its own small row.

use rusqlite::{params, Connection, TransactionBehavior};
use uuid::Uuid;

use super::{from_json, now, to_json, without_fsync, Journal, JournalError, Result};
use super::{NewStep, StepOp, StepPhase, StepRecord};

impl Journal {
    /// Mark one step done and count its libvirt call.
    ///
    /// This is the one commit that does not wait for the disk: a step's
    /// state is a cache of progress that may lag behind libvirt (recovery
    /// compares libvirt's checkpoints with the target by content), so it is
    /// committed with `synchronous=NORMAL`. A crash of the process loses
    /// nothing; a power loss may lose the last steps marked done, never the
    /// intent (committed durably before the first call) and never a step
    /// older than the last durable commit, which syncs the whole WAL.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn step_done(&self, txn: Uuid, phase: StepPhase, seq: u32) -> Result<()> {
        let mut conn = self.conn();
        without_fsync(&mut conn, |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(JournalError::from_sqlite)?;
            tx.execute(
                "UPDATE steps SET state = 'done' WHERE txn_id = ?1 AND phase = ?2 AND seq = ?3",
                params![txn.to_string(), phase.as_str(), seq],
            )
            .map_err(JournalError::from_sqlite)?;
            count(&tx, txn)?;
            tx.commit().map_err(JournalError::from_sqlite)
        })
    }

    /// Mark steps done that libvirt showed are no longer needed (no call).
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn mark_observed(&self, txn: Uuid, phase: StepPhase, seqs: &[u32]) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(JournalError::from_sqlite)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE steps SET state = 'done' WHERE txn_id = ?1 AND phase = ?2 AND seq = ?3",
                )
                .map_err(JournalError::from_sqlite)?;
            for seq in seqs {
                stmt.execute(params![txn.to_string(), phase.as_str(), seq])
                    .map_err(JournalError::from_sqlite)?;
            }
        }
        tx.commit().map_err(JournalError::from_sqlite)
    }

    /// Count a libvirt call whose step could not be marked done (it failed
    /// or its outcome is unknown).
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn count_call(&self, txn: Uuid) -> Result<()> {
        count(&self.conn(), txn)
    }

    /// Append steps to a phase (recovery found more to do than planned, or a
    /// rollback was planned). Returns the sequence numbers given.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn add_steps(&self, txn: Uuid, phase: StepPhase, steps: &[NewStep]) -> Result<Vec<u32>> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(JournalError::from_sqlite)?;
        let next: u32 = tx
            .query_row(
                "SELECT COALESCE(MAX(seq) + 1, 0) FROM steps WHERE txn_id = ?1 AND phase = ?2",
                params![txn.to_string(), phase.as_str()],
                |r| r.get(0),
            )
            .map_err(JournalError::from_sqlite)?;
        let seqs = insert_steps(&tx, txn, phase, next, steps)?;
        tx.commit().map_err(JournalError::from_sqlite)?;
        Ok(seqs)
    }

    /// A transaction's steps of one phase, in order.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn steps(&self, txn: Uuid, phase: StepPhase) -> Result<Vec<StepRecord>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, op, checkpoint, xml, before_json, state FROM steps \
                 WHERE txn_id = ?1 AND phase = ?2 ORDER BY seq",
            )
            .map_err(JournalError::from_sqlite)?;
        let rows = stmt
            .query_map(params![txn.to_string(), phase.as_str()], |r| {
                Ok((
                    r.get::<_, u32>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })
            .map_err(JournalError::from_sqlite)?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, op, checkpoint, xml, before, state) =
                row.map_err(JournalError::from_sqlite)?;
            let op = match op.as_str() {
                "delete" => StepOp::Delete,
                "redefine" => StepOp::Redefine,
                other => return Err(JournalError::decode("step op", other)),
            };
            let before = before
                .map(|b| from_json("step before-image", &b))
                .transpose()?;
            out.push(StepRecord {
                phase,
                seq,
                step: NewStep {
                    op,
                    checkpoint,
                    xml,
                    before,
                },
                done: state == "done",
            });
        }
        Ok(out)
    }
}

/// Count one libvirt call of a transaction (in its own small row: the
/// transaction's row is left alone).
fn count(conn: &Connection, txn: Uuid) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO txn_progress (txn_id, calls, updated_at) VALUES (?1, 1, ?2) \
         ON CONFLICT(txn_id) DO UPDATE SET calls = calls + 1, updated_at = excluded.updated_at",
    )
    .and_then(|mut stmt| stmt.execute(params![txn.to_string(), now()]))
    .map(|_| ())
    .map_err(JournalError::from_sqlite)
}

pub(super) fn insert_steps(
    conn: &Connection,
    txn: Uuid,
    phase: StepPhase,
    first: u32,
    steps: &[NewStep],
) -> Result<Vec<u32>> {
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO steps (txn_id, phase, seq, op, checkpoint, xml, before_json, state) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending')",
        )
        .map_err(JournalError::from_sqlite)?;
    let mut seqs = Vec::with_capacity(steps.len());
    for (i, s) in steps.iter().enumerate() {
        let seq = first + i as u32;
        let op = match s.op {
            StepOp::Delete => "delete",
            StepOp::Redefine => "redefine",
        };
        stmt.execute(params![
            txn.to_string(),
            phase.as_str(),
            seq,
            op,
            s.checkpoint,
            s.xml,
            s.before.as_ref().map(to_json)
        ])
        .map_err(JournalError::from_sqlite)?;
        seqs.push(seq);
    }
    Ok(seqs)
}

#[cfg(test)]
mod tests {
    use rusqlite::params;

    use super::super::tests::journal_with_txn;
    use super::*;
    use crate::journal::TxnEvent;

    #[test]
    fn steps_are_counted_without_writing_the_transaction_row() {
        let dir = tempfile::tempdir().unwrap();
        let (j, txn) = journal_with_txn(dir.path());
        let row = |j: &Journal| -> (i64, String) {
            j.conn()
                .query_row(
                    "SELECT libvirt_calls, updated_at FROM txns WHERE id = ?1",
                    params![txn.to_string()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap()
        };
        let before = row(&j);
        j.step_done(txn, StepPhase::Apply, 0).unwrap();
        j.count_call(txn).unwrap();
        j.step_done(txn, StepPhase::Apply, 1).unwrap();
        assert_eq!(row(&j), before, "the transaction's row is untouched");
        let t = j.txn(txn).unwrap();
        assert_eq!(t.libvirt_calls, 3);
        assert!(t.updated_at >= before.1);
        assert_eq!(j.incomplete(None).unwrap()[0].libvirt_calls, 3);
        assert_eq!(j.incomplete_summaries(None).unwrap()[0].libvirt_calls, 3);
        assert_eq!(j.incomplete_summaries(None).unwrap()[0].done, 2);
        // A finished transaction keeps its count; pruning takes its progress along.
        j.finish(txn, TxnEvent::Commit, 0).unwrap();
        let n: i64 = j
            .conn()
            .query_row("SELECT COUNT(*) FROM txn_progress", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
    }
}
