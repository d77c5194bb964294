//! `smgate hub import <hub.redb>`: copies an embedded hub's file into the PostgreSQL store.
//!
//! Nothing is copied on trust. Each log goes through the checks and the compare-and-set
//! commit of an ingest ([`super::store_checked`]) as one batch: its rows `0..size` with the
//! file's last checkpoint, whose signature is checked under the gateway's verifier key. So the
//! database gets only what verifies, a log the database already has (a second import, or a
//! gateway that pushed there since) is a repeated batch that changes nothing, and a log that
//! conflicts with the database's copy is refused, with its evidence kept as for an ingest.
//!
//! Enrolments: a gateway the database does not know gets the file's record (its token hash
//! too, so the gateway keeps its token); one it knows keeps the database's. Conflicts the file
//! kept are copied with their times and counts, once. A log is read into memory whole, one log
//! at a time; each statement may take up to [`IMPORT_TIMEOUT_MS`]. The file keeps only each
//! log's last checkpoint, so that one is what the database gets (no older ones), and a log's
//! "last ingest" time becomes the time of its import.

use std::path::Path;

use super::embedded::Embedded;
use super::pg::Pg;
use super::{check, store_checked, Enrollment, HubError, HubStore, Refusal, Stored};
use crate::sync::{Batch, WIRE_VERSION};

/// Most milliseconds one statement of an import may take (a log is one insert).
pub const IMPORT_TIMEOUT_MS: u64 = 600_000;

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Gateways enrolled from the file, and gateways the database already had.
    pub enrolled: usize,
    pub kept: usize,
    /// Logs that verified, and the rows of them the database did not have yet.
    pub logs: usize,
    pub rows: u64,
    /// Conflicts the file kept, copied (a second import copies none again, but counts them).
    pub conflicts: usize,
    /// Logs the database refused: `gateway/machine: why`.
    pub refused: Vec<String>,
}

/// Imports `file` into `pg` (see the module doc). Fails before writing anything when the
/// file is missing or held by a running hub, or the database has no hub schema.
pub async fn import(file: &Path, pg: &Pg) -> Result<Report, HubError> {
    let src = Embedded::open_existing(file)?;
    pg.require_schema().await?;
    let mut report = Report::default();
    let enrolled = src.enrollments("", usize::MAX).await.map_err(store)?;
    for record in &enrolled {
        match pg.enrollment(&record.gateway_id).await.map_err(store)? {
            Some(_) => report.kept += 1,
            None => {
                pg.enroll(record).await.map_err(store)?;
                report.enrolled += 1;
            }
        }
    }
    let logs = tokio::task::block_in_place(|| src.all_logs()).map_err(store)?;
    for log in &logs {
        let record = match enrolled.iter().find(|e| e.gateway_id == log.gateway_id) {
            Some(e) => e.clone(),
            None => pg
                .enrollment(&log.gateway_id)
                .await
                .map_err(store)?
                .ok_or_else(|| unenrolled(file, log))?,
        };
        copy_log(&src, pg, &record, log, &mut report).await?;
    }
    let gateways: std::collections::BTreeSet<&str> = (logs.iter().map(|l| &l.gateway_id))
        .chain(enrolled.iter().map(|e| &e.gateway_id))
        .map(String::as_str)
        .collect();
    for gw in gateways {
        for c in src.conflicts(gw, 0, usize::MAX).await.map_err(store)? {
            pg.copy_conflict(gw, &c).await.map_err(store)?;
            report.conflicts += 1;
        }
    }
    Ok(report)
}

fn store(f: super::Fault) -> HubError {
    HubError::Store(f.0)
}

fn unenrolled(file: &Path, log: &Stored) -> HubError {
    HubError::Invalid(format!(
        "{}/{}: the gateway is enrolled neither in the `enrolled/` directory beside {} nor in \
         the database; enrol it (`smgate hub enroll`) and import again",
        log.gateway_id,
        log.slug,
        file.display()
    ))
}

/// Checks and stores one log as one batch; a refusal is reported, not an error.
async fn copy_log(
    src: &Embedded,
    pg: &Pg,
    record: &Enrollment,
    log: &Stored,
    report: &mut Report,
) -> Result<(), HubError> {
    let (gw, slug) = (log.gateway_id.as_str(), log.slug.as_str());
    let rows = src.rows(gw, slug, 0, log.size).await.map_err(store)?;
    if rows.len() as u64 != log.size {
        return Err(HubError::Store(format!(
            "{gw}/{slug}: the file holds {} of its {} rows",
            rows.len(),
            log.size
        )));
    }
    let batch = Batch {
        version: WIRE_VERSION,
        gateway_id: gw.to_owned(),
        verifier_key: record.verifier_key.clone(),
        machine: slug.to_owned(),
        genesis_zeqond: log.genesis_zeqond,
        first_seq: 0,
        rows,
        checkpoint: log.checkpoint.clone(),
        proof_from: 0,
        consistency: Vec::new(),
        head_size: log.head_size,
    };
    let checked = match check::parse(record, &batch) {
        Ok((cp, _)) => store_checked(pg, gw, &batch, &cp).await,
        Err(refusal) => Err((refusal, Default::default())),
    };
    match checked {
        Ok(outcome) => {
            report.logs += 1;
            report.rows += outcome.fresh_rows;
            Ok(())
        }
        Err((Refusal::Unavailable(why), _)) => Err(HubError::Store(format!("{gw}/{slug}: {why}"))),
        Err((refusal, _)) => {
            report
                .refused
                .push(format!("{gw}/{slug}: {}", why(&refusal)));
            Ok(())
        }
    }
}

fn why(r: &Refusal) -> String {
    match r {
        Refusal::Unauthorized(why) => (*why).to_owned(),
        Refusal::BadRequest(why) | Refusal::Unavailable(why) => why.clone(),
        Refusal::Conflict(e) => format!("{} at seq {}: {}", e.kind, e.at, e.message),
    }
}
