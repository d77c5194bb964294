//! The timer task: fires `after` and delayed `send` timers when they come due.
//!
//! Timers live in the instance states and in the `DUE` index, both in redb, so they survive
//! restarts; on boot the first pass fires everything that came due while the gateway was off.
//! Each pass fires up to 256 due instances in one write transaction, in due order. Between
//! passes the task sleeps until the earliest deadline or the next commit (which may have added
//! an earlier one), whichever comes first.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{due, earliest_due, InstanceError, Steps};
use crate::clock;
use crate::server::Gateway;

const PASS: usize = 256;

pub async fn run(gw: Arc<Gateway>, mut shutdown: watch::Receiver<bool>) {
    let mut commits = gw.writer.subscribe();
    loop {
        let now = clock::now_ms();
        let batch = match gw.store.view(|txn| due(txn, now, PASS)) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "timer scan failed");
                Vec::new()
            }
        };
        if !batch.is_empty() {
            let charts = gw.charts.clone();
            let fired = gw
                .writer
                .write(move |txn| -> Result<Vec<super::Sent>, InstanceError> {
                    let mut steps = Steps::open(txn)?;
                    let mut fired = Vec::new();
                    for (d, m, s) in batch {
                        match steps.fire_due(&charts, &m, &s, now) {
                            Ok(Some(sent)) => fired.push(sent),
                            Ok(None) => steps.drop_stale_due(d, &m, &s)?,
                            // Nothing of this instance was written; park its timers.
                            Err(InstanceError::Store(e)) => return Err(e.into()),
                            Err(e) => {
                                tracing::warn!(machine = %m, instance = %s, error = %e, "timer failed; parked until the next event");
                                steps.park_timers(&m, &s)?;
                            }
                        }
                    }
                    steps.finish()?;
                    Ok(fired)
                })
                .await;
            match fired {
                Ok(fired) => {
                    gw.timers_fired
                        .fetch_add(fired.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    gw.mqtt.committed_all(&fired);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "firing timers failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let wait = match gw.store.view(earliest_due) {
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
