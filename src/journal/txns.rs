//! A transaction's life in the journal: its intent recorded ([`Journal::begin`],
//! or at once as committed when nothing was to do), its state transitions,
//! its end (the committed chain, pruned history) and its owner (taken over,
//! still owning).

use std::sync::LazyLock;

use rusqlite::{named_params, params, Connection};
use uuid::Uuid;

use super::counters::count_finished;
use super::docs::{self, Doc};
use super::queries::open_txn;
use super::steps::insert_steps;
use super::types::{FINISHED_STATES, OPEN_STATES};
use super::{now, Journal, JournalError, Result, Sql};
use super::{Begin, NewTxn, StepPhase, TxnEvent, TxnKind, TxnState};
use crate::chain::{Chain, CheckpointDef};
use crate::owner::Owner;

const INSERT_TXN: &str = "INSERT INTO txns (id, domain, kind, state, \
     owner_pid, owner_boot_id, owner_start, started_at, updated_at, finished_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9)";

const TXN_STATE: &str = "SELECT state FROM txns WHERE id = ?1";

const TXN_DOMAIN_KIND: &str = "SELECT domain, kind FROM txns WHERE id = ?1";

const SET_STATE: &str = "UPDATE txns SET state = :state, updated_at = :now, \
     error = COALESCE(:error, error) WHERE id = :id";

const SET_FINISHED: &str =
    "UPDATE txns SET state = :state, updated_at = :now, finished_at = :now WHERE id = :id";

static PRUNE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "DELETE FROM txns WHERE domain = :domain AND {finished} AND rowid NOT IN \
         (SELECT rowid FROM txns WHERE domain = :domain AND {finished} \
          ORDER BY rowid DESC LIMIT :keep)",
        finished = *FINISHED_STATES
    )
});

static TAKE_OVER: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE txns SET owner_pid = :new_pid, owner_boot_id = :new_boot_id, \
         owner_start = :new_start, updated_at = :now \
         WHERE id = :id AND owner_pid = :pid AND owner_boot_id = :boot_id \
         AND owner_start = :start AND {}",
        *OPEN_STATES
    )
});

static STILL_OWNS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT owner_pid = :pid AND owner_boot_id = :boot_id AND owner_start = :start \
         AND {} AS owns FROM txns WHERE id = :id",
        *OPEN_STATES
    )
});

impl Journal {
    /// Record a new transaction and its apply steps durably, unless the
    /// domain already has an open one (then nothing is written and the open
    /// one is returned).
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn begin(&self, t: NewTxn<'_>) -> Result<Begin> {
        self.write(|tx| {
            if let Some(open) = open_txn(tx, t.domain)? {
                return Ok(Begin::Open(Box::new(open)));
            }
            insert_txn(tx, &t, TxnState::Applying, &now())?;
            insert_steps(tx, t.id, StepPhase::Apply, 0, t.steps)?;
            Ok(Begin::Started)
        })
    }

    /// Record a transaction that needed no libvirt call as committed at
    /// once (counted as committed), and make its target the domain's
    /// committed chain.
    ///
    /// # Errors
    ///
    /// SQLite errors; [`Begin::Open`] semantics as [`Journal::begin`].
    pub fn record_unchanged(&self, t: NewTxn<'_>, keep: usize) -> Result<Begin> {
        self.write(|tx| {
            if let Some(open) = open_txn(tx, t.domain)? {
                return Ok(Begin::Open(Box::new(open)));
            }
            let ts = now();
            insert_txn(tx, &t, TxnState::Committed, &ts)?;
            let id = t.id.to_string();
            commit_target(tx, &id, t.domain, t.kind, &ts)?;
            count_finished(tx, &id, &ts)?;
            prune(tx, t.domain, keep)?;
            Ok(Begin::Started)
        })
    }

    /// Move a transaction to its next state (and record an error, if any).
    ///
    /// # Errors
    ///
    /// [`JournalError::Decode`] when the transition is not allowed from the
    /// stored state; SQLite errors.
    pub fn transition(&self, txn: Uuid, event: TxnEvent, error: Option<&str>) -> Result<TxnState> {
        self.write(|tx| {
            let id = txn.to_string();
            let state = txn_state(tx, &id)?;
            let next = state
                .next(event)
                .ok_or_else(|| not_allowed("transition", event, state))?;
            tx.exec(
                SET_STATE,
                named_params! {":id": id, ":state": next, ":now": now(), ":error": error},
            )?;
            Ok(next)
        })
    }

    /// Close a transaction: `Commit` makes its target the domain's committed
    /// chain; `FinishRollback` leaves the committed chain as it was. The
    /// domain's counter of its kind and outcome goes up by one. History
    /// beyond `keep` finished transactions of the domain is pruned.
    ///
    /// # Errors
    ///
    /// As [`Journal::transition`].
    pub fn finish(&self, txn: Uuid, event: TxnEvent, keep: usize) -> Result<TxnState> {
        self.finish_applied(txn, event, keep, None, None)
    }

    /// [`Journal::finish`], recording first what the transaction applied
    /// when it differs from the target it began with (checkpoints that
    /// appeared meanwhile were kept): with `Commit`, that becomes the
    /// domain's committed chain's definitions, and `chain` (the chain that
    /// describes them, if the transaction had one) its chain, so that an
    /// export shows what libvirt holds.
    ///
    /// # Errors
    ///
    /// As [`Journal::transition`].
    pub fn finish_applied(
        &self,
        txn: Uuid,
        event: TxnEvent,
        keep: usize,
        applied: Option<&[CheckpointDef]>,
        chain: Option<&Chain>,
    ) -> Result<TxnState> {
        self.write(|tx| {
            let id = txn.to_string();
            if let Some(defs) = applied {
                docs::put_defs(tx, &id, Doc::Target, defs)?;
                docs::put_chain(tx, &id, chain)?;
            }
            let state = txn_state(tx, &id)?;
            let next = state
                .next(event)
                .filter(|s| !s.is_open())
                .ok_or_else(|| not_allowed("finish", event, state))?;
            let ts = now();
            tx.exec(
                SET_FINISHED,
                named_params! {":id": id, ":state": next, ":now": ts},
            )?;
            let (domain, kind): (String, TxnKind) = tx.one(TXN_DOMAIN_KIND, [&id], |r| {
                Ok((r.get("domain")?, r.get("kind")?))
            })?;
            if next == TxnState::Committed {
                commit_target(tx, &id, &domain, kind, &ts)?;
            }
            count_finished(tx, &id, &ts)?;
            prune(tx, &domain, keep)?;
            Ok(next)
        })
    }

    /// Hand an open transaction to a new owner, if it still has the owner
    /// the caller saw (compare-and-set: two recoverers cannot both win).
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn take_over(&self, txn: Uuid, seen: &Owner, new: &Owner) -> Result<bool> {
        let n = self.conn().exec(
            &TAKE_OVER,
            named_params! {
                ":id": txn.to_string(),
                ":pid": seen.pid,
                ":boot_id": seen.boot_id,
                ":start": seen.start as i64,
                ":new_pid": new.pid,
                ":new_boot_id": new.boot_id,
                ":new_start": new.start as i64,
                ":now": now(),
            },
        )?;
        Ok(n == 1)
    }

    /// Does `owner` still own open transaction `txn`? (A cheap read: the
    /// engine asks before every libvirt call, so that an owner whose
    /// transaction was taken over stops.)
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn still_owns(&self, txn: Uuid, owner: &Owner) -> Result<bool> {
        let owns = self.conn().first(
            &STILL_OWNS,
            named_params! {
                ":id": txn.to_string(),
                ":pid": owner.pid,
                ":boot_id": owner.boot_id,
                ":start": owner.start as i64,
            },
            |r| r.get("owns"),
        )?;
        Ok(owns.unwrap_or(false))
    }
}

fn txn_state(conn: &Connection, id: &str) -> Result<TxnState> {
    conn.first(TXN_STATE, [id], |r| r.get("state"))?
        .ok_or_else(|| JournalError::decode("transaction", format!("{id} does not exist")))
}

fn not_allowed(what: &str, event: TxnEvent, state: TxnState) -> JournalError {
    JournalError::decode(
        what,
        format!("{event:?} is not allowed in state {}", state.as_str()),
    )
}

/// Insert a transaction row in `state` (a finished one gets `finished_at`),
/// then its documents, each written in pieces (`docs`): a long chain's are
/// megabytes.
fn insert_txn(conn: &Connection, t: &NewTxn<'_>, state: TxnState, ts: &str) -> Result<()> {
    let id = t.id.to_string();
    conn.exec(
        INSERT_TXN,
        params![
            id,
            t.domain,
            t.kind,
            state,
            t.owner.pid,
            t.owner.boot_id,
            t.owner.start as i64,
            ts,
            (!state.is_open()).then_some(ts),
        ],
    )?;
    docs::put_chain(conn, &id, t.chain)?;
    docs::put_defs(conn, &id, Doc::Target, t.target)?;
    docs::put_defs(conn, &id, Doc::Before, t.before)
}

/// Make a transaction's target its domain's committed chain. An `ensure`
/// makes one checkpoint usable and leaves the committed chain as it is.
fn commit_target(conn: &Connection, id: &str, domain: &str, kind: TxnKind, ts: &str) -> Result<()> {
    if kind == TxnKind::Ensure {
        return Ok(());
    }
    docs::commit(conn, domain, id, ts)
}

/// Keep the newest `keep` finished transactions of a domain; open ones are
/// never pruned.
fn prune(conn: &Connection, domain: &str, keep: usize) -> Result<()> {
    conn.exec(
        &PRUNE,
        named_params! {":domain": domain, ":keep": keep as i64},
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_moves_only_by_its_transitions_and_ends_once() {
        let dir = tempfile::tempdir().unwrap();
        let (j, txn) = super::super::tests::journal_with_txn(dir.path());
        let e = j.finish(txn, TxnEvent::FinishRollback, 10).unwrap_err();
        assert_eq!(
            e.to_string(),
            "journal holds an unreadable value: finish: FinishRollback is not allowed in state applying"
        );
        assert_eq!(
            j.transition(txn, TxnEvent::BeginRollback, Some("refused"))
                .unwrap(),
            TxnState::RollingBack
        );
        assert_eq!(
            j.finish(txn, TxnEvent::FinishRollback, 10).unwrap(),
            TxnState::RolledBack
        );
        let t = j.txn(txn).unwrap();
        assert_eq!(t.state, TxnState::RolledBack);
        assert_eq!(t.error.as_deref(), Some("refused"));
        assert!(t.finished_at.is_some());
        assert!(
            j.committed("d").unwrap().is_none(),
            "a rollback commits nothing"
        );
        assert!(j.transition(txn, TxnEvent::Commit, None).is_err());
        let missing = Uuid::new_v4();
        assert_eq!(
            j.transition(missing, TxnEvent::Commit, None)
                .unwrap_err()
                .to_string(),
            format!("journal holds an unreadable value: transaction: {missing} does not exist")
        );
    }

    #[test]
    fn only_the_owner_seen_is_taken_over_and_only_while_open() {
        let dir = tempfile::tempdir().unwrap();
        let (j, txn) = super::super::tests::journal_with_txn(dir.path());
        let old = j.txn(txn).unwrap().owner;
        let new = Owner {
            pid: 2,
            boot_id: "test".into(),
            start: 2,
        };
        assert!(j.still_owns(txn, &old).unwrap());
        assert!(!j.take_over(txn, &new, &new).unwrap(), "not the owner seen");
        assert!(j.take_over(txn, &old, &new).unwrap());
        assert!(!j.take_over(txn, &old, &new).unwrap(), "the second loses");
        assert!(!j.still_owns(txn, &old).unwrap() && j.still_owns(txn, &new).unwrap());
        j.finish(txn, TxnEvent::Commit, 10).unwrap();
        assert!(
            !j.still_owns(txn, &new).unwrap(),
            "a finished one is owned by none"
        );
        assert!(!j.take_over(txn, &new, &old).unwrap());
        assert!(!j.still_owns(Uuid::new_v4(), &new).unwrap());
    }
}
