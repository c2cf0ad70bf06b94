//! Each domain's last `validate` report (table `validations`, schema 3):
//! `validate` records it, `metrics` reads it back
//! ([`Journal::metrics_snapshot`]). The journal stores the report's JSON as
//! given and never reads inside it.

use rusqlite::named_params;

use super::{now, Journal, Result, Sql};

const RECORD: &str = "INSERT INTO validations (domain, validated_at, report_json) \
     VALUES (:domain, :now, :report) \
     ON CONFLICT(domain) DO UPDATE SET validated_at = excluded.validated_at, \
     report_json = excluded.report_json";

impl Journal {
    /// Keep `report_json` as the domain's last validate report, replacing
    /// the one before, timed now.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn record_validation(&self, domain: &str, report_json: &str) -> Result<()> {
        self.write(|tx| {
            tx.exec(
                RECORD,
                named_params! {":domain": domain, ":now": now(), ":report": report_json},
            )
            .map(|_| ())
        })
    }
}
