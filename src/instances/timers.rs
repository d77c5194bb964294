//! The timer task: fires `after` and delayed `send` timers when they come due.
//!
//! Timers live in the instance states and in the `DUE` index, both in redb, so they survive
//! restarts; on boot the first pass fires everything that came due while the gateway was off.
//! Each pass takes up to 256 due-index entries in one write transaction. An entry is a lower
//! bound of its instance's deadline (`instances` module doc), so the pass first reads each
//! instance's real deadline: entries that came up early move to it, and the instances really
//! due fire in the order of their deadlines ([`fire_pass`]). Between
//! passes the task sleeps until the earliest deadline or the next commit (which may have added
//! an earlier one), whichever comes first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{due, earliest_due, Charts, InstanceError, Sent, Steps};
use crate::clock;
use crate::store::{GroupCommit, Store};

/// What the timer task uses of the running gateway.
pub struct Deps {
    pub store: Arc<Store>,
    pub writer: GroupCommit,
    pub charts: Arc<Charts>,
    /// Counts the timers fired (read by `/metrics`).
    pub fired: Arc<AtomicU64>,
    /// Called with each pass's committed steps, after the commit (the MQTT state publisher).
    pub on_commit: OnCommit,
}

/// What the timer task calls with the steps of each pass, after their commit.
pub type OnCommit = Box<dyn Fn(&[Sent]) + Send + Sync>;

const PASS: usize = 256;

pub async fn run(deps: Deps, mut shutdown: watch::Receiver<bool>) {
    let mut commits = deps.writer.subscribe();
    loop {
        let now = clock::now_ms();
        let batch = match deps.store.view(|txn| due(txn, now, PASS)) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "timer scan failed");
                Vec::new()
            }
        };
        if !batch.is_empty() {
            let charts = deps.charts.clone();
            let fired = deps
                .writer
                .write(move |txn| -> Result<Vec<Sent>, InstanceError> {
                    let mut steps = Steps::open(txn)?;
                    let truncated = batch.len() == PASS;
                    let fired = fire_pass(&mut steps, &charts, batch, truncated, now)?;
                    steps.finish()?;
                    Ok(fired)
                })
                .await;
            match fired {
                Ok(fired) => {
                    deps.fired.fetch_add(fired.len() as u64, Ordering::Relaxed);
                    (deps.on_commit)(&fired);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "firing timers failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let wait = match deps.store.view(earliest_due) {
            Ok(Some(d)) => Duration::from_millis((d - clock::now_ms()).clamp(0, 60_000) as u64),
            _ => Duration::from_secs(60),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = commits.changed() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One timer pass over `batch`: the earliest due-index entries `(entry time, machine,
/// instance)` at or before `now_ms`, in index order; `truncated` when more entries remained
/// beyond the last one. Fires the instances whose deadline has come, in deadline order, and
/// moves or drops every other entry. When the batch was truncated, only deadlines up to its
/// last entry time fire: a later one could come after the deadline of an instance whose entry
/// did not make the batch, so it moves and fires in a later pass, in order.
pub fn fire_pass(
    steps: &mut Steps,
    charts: &Charts,
    batch: Vec<(i64, String, String)>,
    truncated: bool,
    now_ms: i64,
) -> Result<Vec<Sent>, InstanceError> {
    let bound = match batch.last() {
        Some((last, _, _)) if truncated => *last,
        _ => now_ms,
    };
    let mut firing = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (entry, m, s) in batch {
        let want = steps.next_due(&m, &s)?;
        match want {
            Some(d) if d <= bound && seen.insert((m.clone(), s.clone())) => {
                firing.push((d, entry, m, s))
            }
            _ => steps.move_due(entry, &m, &s, want)?,
        }
    }
    firing.sort();
    let mut fired = Vec::new();
    for (_, entry, m, s) in firing {
        match steps.fire_due(charts, &m, &s, now_ms) {
            Ok(Some(sent)) => fired.push(sent),
            Ok(None) => {}
            // Nothing of this instance was written; park its timers.
            Err(InstanceError::Store(e)) => return Err(e.into()),
            Err(e) => {
                tracing::warn!(machine = %m, instance = %s, error = %e, "timer failed; parked until the next event");
                steps.park_timers(&m, &s)?;
            }
        }
        steps.reindex_due(entry, &m, &s)?;
    }
    Ok(fired)
}
