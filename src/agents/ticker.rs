//! The ticker: ticks every live run once per Zeqond (777 ms).
//!
//! At each Zeqond boundary it reads the live runs (the `LIVE` index, so runs resume after a
//! restart), asks the models of BYOK runs concurrently (bounded by the BYOK timeout, and never
//! past the Zeqond), and submits one write holding that Zeqond's ticks of all machines. Inside
//! the write each run is ticked on its own: a run that has ended, already ticked this Zeqond
//! (for instance by `POST tick`), or whose payer cannot pay writes nothing and is skipped. The
//! Zeqond is taken from the clock inside the write transaction, so if a commit is late the
//! tick counts for the Zeqond it lands in, and the next pass skips it: a late gateway leaves a
//! gap, never a double tick. A pass that returns after the next boundary (its commit waited on
//! a slow disk) is followed at once by the next Zeqond's pass, not by a sleep. A spawn whose
//! commit lands after the next Zeqond's pass wakes the ticker for an extra pass, so its run
//! does not miss that Zeqond.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{read, tick, AgentError, Enrichment};
use crate::clock::{self, ZEQOND_MS};
use crate::store::{GroupCommit, Store};

/// What the ticker uses of the running gateway.
#[derive(Clone)]
pub struct Deps {
    pub store: Arc<Store>,
    pub writer: GroupCommit,
    /// The runs' model calls, and the counters and claims the ticker shares with the API.
    pub agents: Arc<super::Agents>,
}

/// A run due this Zeqond and what its model call needs.
struct Due {
    id: String,
    byok: bool,
    credential: Option<super::byok::Credential>,
    problem: String,
    best: Option<Vec<&'static str>>,
}

/// Runs whose last tick is before Zeqond `z`.
fn due(deps: &Deps, z: u64) -> Vec<Due> {
    let claimed: Vec<String> = match deps.agents.claims.lock() {
        Ok(c) => c
            .iter()
            .filter(|(_, zc)| **zc == z)
            .map(|(id, _)| id.clone())
            .collect(),
        Err(_) => Vec::new(),
    };
    let scan = deps.store.view(|txn| {
        let mut out = Vec::new();
        for id in read::live(txn)? {
            if claimed.contains(&id) {
                continue;
            }
            let Some(run) = read::run(txn, &id)? else {
                continue;
            };
            if run.last_tick_zeqond.is_some_and(|l| l >= z) {
                continue;
            }
            let cred = match &run.credential_id {
                Some(c) => super::byok::credential(txn, c)?,
                None => None,
            };
            let best = run.search.best.as_ref().map(|b| b.genotype.operators());
            out.push(Due {
                id,
                byok: run.credential_id.is_some(),
                credential: cred,
                problem: run.problem,
                best,
            });
        }
        Ok(out)
    });
    scan.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "ticker: cannot read live runs");
        Vec::new()
    })
}

/// Ticks the runs due at the current Zeqond once; returns that Zeqond.
pub async fn pass(deps: &Deps) -> u64 {
    let z = clock::zeqond(clock::now_ms());
    let runs = due(deps, z);
    tracing::debug!(zeqond = z, due = runs.len(), "ticker: pass");
    if runs.is_empty() {
        return z;
    }
    // BYOK runs ask their models concurrently; the rest need no wait.
    let asks = runs.into_iter().map(|d| {
        let agents = deps.agents.clone();
        async move {
            if !d.byok {
                return (d.id, Enrichment::default());
            }
            let e = agents
                .enrich(d.credential.as_ref(), &d.problem, d.best.as_deref())
                .await;
            (d.id, e)
        }
    });
    let work: Vec<(String, Enrichment)> = futures_util::future::join_all(asks).await;
    let outcome = deps
        .writer
        .write(move |txn| -> Result<(usize, usize), AgentError> {
            let now = clock::now_ms();
            let (mut ticked, mut skipped) = (0, 0);
            for (id, enrichment) in work {
                match tick(txn, &id, "ticker", "ticker", enrichment, now) {
                    Ok(_) => ticked += 1,
                    // A store error breaks the whole batch; anything else wrote nothing.
                    Err(AgentError::Store(e)) => return Err(e.into()),
                    Err(e) => {
                        tracing::debug!(run = %id, error = %e, "ticker: skipped");
                        skipped += 1
                    }
                }
            }
            Ok((ticked, skipped))
        })
        .await;
    match outcome {
        Ok((ticked, skipped)) => {
            deps.agents
                .ticked
                .fetch_add(ticked as u64, Ordering::Relaxed);
            deps.agents
                .skipped
                .fetch_add(skipped as u64, Ordering::Relaxed);
        }
        Err(e) => tracing::warn!(error = %e, "ticker: the Zeqond's ticks were not committed"),
    }
    z
}

/// Milliseconds until the next Zeqond boundary.
fn until_next_zeqond() -> u64 {
    let now = clock::now_ms().max(0);
    (ZEQOND_MS - now % ZEQOND_MS) as u64
}

pub async fn run(deps: Deps, mut shutdown: watch::Receiver<bool>) {
    // Data directories made before agents existed lack their tables; opening them for write
    // creates them (and is a no-op otherwise).
    if let Err(e) = deps.writer.write(super::create_tables).await {
        tracing::warn!(error = %e, "ticker: cannot create the agent tables");
    }
    loop {
        let passed = pass(&deps).await;
        // A pass whose commit overran the boundary (a slow fsync on a busy disk) returns in
        // the next Zeqond: pass that one now instead of sleeping through it.
        if clock::zeqond(clock::now_ms()) > passed {
            deps.agents.overruns.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        // A millisecond past the boundary, so the clock inside the write reads the new Zeqond.
        let wait = Duration::from_millis(until_next_zeqond() + 1);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // A pass in the same Zeqond only ticks runs that have not ticked in it yet.
            _ = deps.agents.wake.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}
