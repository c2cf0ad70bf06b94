//! A transaction's steps: appended, marked done (the one commit that does not
//! wait for the disk), marked observed, read back; and the count of libvirt
//! calls, kept in its own small row.

use rusqlite::{params, Connection, Row};
use uuid::Uuid;

use super::error::SqlContext;
use super::types::StepState;
use super::{json, now, to_json, Journal, Result, Sql};
use super::{NewStep, StepPhase, StepRecord};

const MARK: &str = "UPDATE steps SET state = ?4 WHERE txn_id = ?1 AND phase = ?2 AND seq = ?3";

/// One more call of a transaction, in its own small row: the transaction's
/// row, which holds the whole chain, is left alone.
const COUNT_CALL: &str = "INSERT INTO txn_progress (txn_id, calls, updated_at) VALUES (?1, 1, ?2) \
     ON CONFLICT(txn_id) DO UPDATE SET calls = calls + 1, updated_at = excluded.updated_at";

const DROP_PENDING: &str =
    "DELETE FROM steps WHERE txn_id = ?1 AND phase = ?2 AND seq = ?3 AND state = ?4";

const NEXT_SEQ: &str =
    "SELECT COALESCE(MAX(seq) + 1, 0) AS next FROM steps WHERE txn_id = ?1 AND phase = ?2";

const INSERT_STEP: &str =
    "INSERT INTO steps (txn_id, phase, seq, op, checkpoint, xml, before_json, state, detail) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

const STEPS: &str =
    "SELECT phase, seq, op, checkpoint, xml, before_json, state, detail FROM steps \
     WHERE txn_id = ?1 AND phase = ?2 ORDER BY seq";

const STEPS_FROM: &str =
    "SELECT phase, seq, op, checkpoint, xml, before_json, state, detail FROM steps \
     WHERE txn_id = ?1 AND phase = ?2 AND seq >= ?3 ORDER BY seq LIMIT ?4";

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
        self.write_progress(|tx| {
            let id = txn.to_string();
            tx.exec(MARK, params![id, phase, seq, StepState::Done])?;
            count(tx, &id)
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
        self.write(|tx| {
            let id = txn.to_string();
            for seq in seqs {
                tx.exec(MARK, params![id, phase, seq, StepState::Done])?;
            }
            Ok(())
        })
    }

    /// Remove pending steps a new plan no longer makes (they were never
    /// called), so that the journal's steps stay the calls in the order they
    /// are made.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn drop_steps(&self, txn: Uuid, phase: StepPhase, seqs: &[u32]) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            let id = txn.to_string();
            for seq in seqs {
                tx.exec(DROP_PENDING, params![id, phase, seq, StepState::Pending])?;
            }
            Ok(())
        })
    }

    /// Count a libvirt call whose step could not be marked done (it failed
    /// or its outcome is unknown).
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn count_call(&self, txn: Uuid) -> Result<()> {
        count(&self.conn(), &txn.to_string())
    }

    /// Append steps to a phase (recovery found more to do than planned, or a
    /// rollback was planned). Returns the sequence numbers given.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn add_steps(&self, txn: Uuid, phase: StepPhase, steps: &[NewStep]) -> Result<Vec<u32>> {
        self.write(|tx| {
            let next = tx.one(NEXT_SEQ, params![txn.to_string(), phase], |r| r.get("next"))?;
            insert_steps(tx, txn, phase, next, steps)
        })
    }

    /// A transaction's steps of one phase, in order.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn steps(&self, txn: Uuid, phase: StepPhase) -> Result<Vec<StepRecord>> {
        self.conn()
            .all(STEPS, params![txn.to_string(), phase], read_step)
    }

    /// At most `limit` steps of a phase from sequence number `from` on, in
    /// order: a long phase read back a batch at a time.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn steps_from(
        &self,
        txn: Uuid,
        phase: StepPhase,
        from: u32,
        limit: usize,
    ) -> Result<Vec<StepRecord>> {
        self.conn().all(
            STEPS_FROM,
            params![txn.to_string(), phase, from, limit as i64],
            read_step,
        )
    }
}

fn count(conn: &Connection, id: &str) -> Result<()> {
    conn.exec(COUNT_CALL, params![id, now()]).map(|_| ())
}

/// Journal `steps` of a phase as pending, numbered from `first`.
pub(super) fn insert_steps(
    conn: &Connection,
    txn: Uuid,
    phase: StepPhase,
    first: u32,
    steps: &[NewStep],
) -> Result<Vec<u32>> {
    let id = txn.to_string();
    let mut stmt = conn.prepare_cached(INSERT_STEP).sql(INSERT_STEP)?;
    let mut seqs = Vec::with_capacity(steps.len());
    for (i, s) in steps.iter().enumerate() {
        let seq = first + i as u32;
        stmt.execute(params![
            id,
            phase,
            seq,
            s.op,
            s.checkpoint,
            s.xml,
            s.before.as_ref().map(to_json),
            StepState::Pending,
            s.detail
        ])
        .sql(INSERT_STEP)?;
        seqs.push(seq);
    }
    Ok(seqs)
}

fn read_step(r: &Row<'_>) -> rusqlite::Result<StepRecord> {
    Ok(StepRecord {
        phase: r.get("phase")?,
        seq: r.get("seq")?,
        step: NewStep {
            op: r.get("op")?,
            checkpoint: r.get("checkpoint")?,
            xml: r.get("xml")?,
            before: json(r, "before_json", "step before-image")?,
            detail: r.get("detail")?,
        },
        done: r.get::<_, StepState>("state")? == StepState::Done,
    })
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
