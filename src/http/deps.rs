//! What each API area uses of the running gateway. Every area's routes get their own struct
//! ([`MachinesDeps`], [`ChainDeps`], …) holding only the pieces that area reads, plus the
//! [`Common`] part that every area shares; [`Api`] gathers them for the router and the
//! listener. `server::start` is the one place that builds them, from the same pieces it hands
//! to the background tasks.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::ApiError;
use crate::agents::Agents;
use crate::auth::{self, AuthError, Principal, RateLimiter, Slug};
use crate::clock;
use crate::config::HttpConfig;
use crate::gateway::Identity;
use crate::instances::Charts;
use crate::machines;
use crate::metrics::Metrics;
use crate::store::{GroupCommit, Store};
use crate::sync::client::{SyncState, UpstreamConfig};
use crate::tls::Acceptor;

/// What every area uses: the store (reads, and resolving a caller's key) and the request
/// counters (a refusal for rate is counted wherever it happens).
pub struct Common {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
}

impl Common {
    /// Resolves the bearer token of a request.
    pub fn principal(&self, bearer: Option<&str>) -> Result<Principal, AuthError> {
        let now = clock::now_ms();
        // Store errors surface through `view` so that a read during a reopen is retried.
        self.store
            .view(|txn| match auth::resolve(txn, bearer, now) {
                Err(AuthError::Store(e)) => Err(e),
                other => Ok(other),
            })?
    }

    pub fn rate_limited(&self, retry_after: u64) -> ApiError {
        self.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
        ApiError::rate_limited(retry_after)
    }
}

/// The per-machine request limits. One bucket per machine whichever area a request is for,
/// so the areas share one `MachineLimits`.
pub struct MachineLimits {
    /// Writes per machine.
    pub write: RateLimiter<Slug>,
    /// Reads per machine by callers other than its owner.
    pub read: RateLimiter<Slug>,
}

/// The console's sign-in (`console.rs`).
pub struct ConsoleDeps {
    pub common: Arc<Common>,
    pub writer: GroupCommit,
}

/// Spec 000: machines and their keys (`machines.rs`).
pub struct MachinesDeps {
    pub common: Arc<Common>,
    pub writer: GroupCommit,
    pub max_json_bytes: u64,
    pub spinup_limit: RateLimiter<IpAddr>,
    pub defaults: machines::Defaults,
    /// A revoked key's MQTT connections are closed through it.
    pub mqtt: Arc<crate::mqtt::Shared>,
}

/// The machine's log: events, reads, proofs, checkpoints (`chain.rs`).
pub struct ChainDeps {
    pub common: Arc<Common>,
    pub writer: GroupCommit,
    pub max_json_bytes: u64,
    pub limits: Arc<MachineLimits>,
    /// Signs checkpoints.
    pub identity: Arc<Identity>,
}

/// Spec 001: pages and the public site (`pages.rs`).
pub struct PagesDeps {
    pub common: Arc<Common>,
    pub writer: GroupCommit,
    pub max_json_bytes: u64,
    pub limits: Arc<MachineLimits>,
    /// `state.json` shows the public state of the machine's instances.
    pub charts: Arc<Charts>,
}

/// Specs 002/003: versions and instances (`instances.rs`, and their live view in `rt.rs`).
pub struct InstancesDeps {
    pub common: Arc<Common>,
    pub writer: GroupCommit,
    pub limits: Arc<MachineLimits>,
    /// Compiled statecharts by version id (shared with the timer task and MQTT).
    pub charts: Arc<Charts>,
    /// Committed steps reach the MQTT state publisher through it.
    pub mqtt: Arc<crate::mqtt::Shared>,
}

/// Spec 004: agent runs, the tally, BYOK credentials (`agents.rs`).
pub struct AgentsDeps {
    pub common: Arc<Common>,
    pub writer: GroupCommit,
    pub max_json_bytes: u64,
    /// A spawn may create the caller's default machine.
    pub defaults: machines::Defaults,
    /// Config, the credential sealing key, ticker counters (shared with the ticker).
    pub agents: Arc<Agents>,
}

/// The upstream sync's status (`sync.rs`).
pub struct SyncDeps {
    pub common: Arc<Common>,
    pub upstream: UpstreamConfig,
    pub identity: Arc<Identity>,
    /// Shared with the sync task.
    pub state: Arc<SyncState>,
}

/// Health, `/metrics`, the gateway's identity, the console's files (`ops.rs`).
pub struct OpsDeps {
    pub common: Arc<Common>,
    pub identity: Arc<Identity>,
    pub region: String,
    pub started: Instant,
    pub started_ms: i64,
    /// Its counters are in `/metrics`.
    pub writer: GroupCommit,
    /// Timers fired by the timer task (a counter it shares for `/metrics`).
    pub timers_fired: Arc<AtomicU64>,
    /// The ticker's counters, for `/metrics`.
    pub agents: Arc<Agents>,
    /// MQTT counters, for `/metrics`.
    pub mqtt: Arc<crate::mqtt::Shared>,
    /// Upstream sync status, for `/api/gateway`.
    pub sync: Arc<SyncState>,
}

/// The HTTP API of one running gateway: each area's part, and what the listener uses.
pub struct Api {
    pub http: HttpConfig,
    pub tls: Arc<Acceptor>,
    pub common: Arc<Common>,
    pub machines: Arc<MachinesDeps>,
    pub chain: Arc<ChainDeps>,
    pub pages: Arc<PagesDeps>,
    pub instances: Arc<InstancesDeps>,
    pub agents: Arc<AgentsDeps>,
    pub sync: Arc<SyncDeps>,
    pub ops: Arc<OpsDeps>,
    pub console: Arc<ConsoleDeps>,
}
