//! The MQTT tasks of a running gateway.
//!
//! - The **ingest connection** (`clean_session = false`, stable client id, manual acks, Last
//!   Will `offline`) polls its event loop, hands each incoming publish to the batcher, and
//!   writes the acks the batcher releases. Both are bounded here, not by the broker:
//!   - **Reading stops** while [`queue_cap`] publishes wait for the batcher, so the TCP window
//!     closes and the broker keeps the backlog (its job: `max_queued_messages`). The broker's
//!     inflight window does not do this: mosquitto stops a client that never acks at its
//!     `max_inflight_messages`, but keeps sending to one that acks, so devices outrunning the
//!     writer once left hundreds of thousands of publishes queued in the gateway
//!     (docs/performance.md, "Figures from code comments").
//!   - **Acks are written by this task straight to the connection**, all that are ready in one
//!     write and one flush, not through rumqttc's request channel: its event loop takes one
//!     request per poll against a read of up to ten packets, so acks fell behind the reads
//!     and a paused reader could not have written them at all. An ack belongs to the
//!     connection its publish came in on; one for a lost connection is dropped (the broker
//!     redelivers the message to the next one, and the dedup entry acks it there).
//! - The **batcher** takes what has arrived (up to `batch_size`, waiting at most
//!   `batch_wait_ms` for company), applies it in one `GroupCommit::write`, and only after that
//!   commit acks each message and hands the committed steps to the publisher. Up to
//!   `BATCHES_IN_FLIGHT` batches wait for the writer at once (it commits them in order, and
//!   folds those queued together into one transaction), so the broker's inflight window keeps
//!   flowing while one commits and the batch size still follows the load.
//! - **Settling acks**: the ingest task writes its connection's packets in order. Once a
//!   PINGRESP arrives for a PINGREQ written after a PUBACK, the broker has processed that PUBACK
//!   (mosquitto and rumqttd handle one connection's packets in order), will not redeliver the
//!   message and may reuse its packet id. The settled acks travel to the batcher through the
//!   same channel as the publishes, after every publish the connection delivered before the
//!   PINGRESP, and the batcher removes their dedup entries (`ingest::forget`) after applying
//!   the publishes of its batch, in the same transaction. That order matters: after a
//!   reconnect the broker resends an unacked message, and our ack of the first copy may
//!   settle while the resent copy is still on its way to the batcher; the copy must still
//!   find its entry. The ingest task writes a PINGREQ whenever written acks wait for settling
//!   and no ping is outstanding.
//! - The **publisher** has its own connection (so state traffic never delays acks). It drains
//!   the outbox of `Shared` (the latest state per instance, plus emits), publishes states
//!   retained (at `mqtt.state_qos`, 1 by default) and emits at QoS 1, and republishes every
//!   state after each (re)connect. The outbox is a
//!   map keyed by instance, so its memory is bounded by the instance count whatever the load.
//!
//! Shutdown: the batcher finishes and acks its batch, then the ingest connection publishes
//! `offline` and disconnects, and the publisher flushes what is queued.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet,
    PubAck, Publish, QoS, StateError, SubscribeFilter, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;

use super::ingest::{self, Message, Rules};
use super::server::Deps;

mod batcher;
mod link;
mod publisher;
mod receive;

use super::{topic, MqttConfig};
use crate::store::StoreError;
use batcher::{batcher, Batcher, BATCHES_IN_FLIGHT};
use link::{options, parse_url, status_payload, tls_config, will, Backoff};
use publisher::{publisher, publisher_connection};
use receive::Ingest;

/// The external-broker side of a running gateway.
pub struct Running {
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Waits for the tasks to finish after the shutdown signal.
    pub async fn stopped(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Starts the client tasks against the broker at `mqtt.url` (`mode = "external"`).
pub async fn start(deps: Deps, shutdown: watch::Receiver<bool>) -> Result<Running, String> {
    let deps = Arc::new(deps);
    let cfg = deps.cfg.clone();
    let (host, port, secure) = parse_url(cfg.url.as_deref().unwrap_or_default())?;
    let tls = if secure {
        Some(tls_config(&cfg)?)
    } else {
        None
    };
    let client_id = cfg
        .client_id
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("smgate-{}", deps.gateway_id));
    let birth = deps
        .writer
        .write(ingest::next_birth)
        .await
        .map_err(|e: StoreError| e.to_string())?;
    let status = topic::status(&cfg.topic_prefix, &deps.gateway_id);

    let mut opts = options(&cfg, &client_id, &host, port, tls.clone());
    opts.set_clean_session(false)
        .set_manual_acks(true)
        .set_last_will(will(&status, "offline", birth));
    // The request channel carries the subscriptions, the status messages and the DISCONNECT;
    // acks bypass it (module doc).
    let (client, eventloop) = AsyncClient::new(opts, 64);
    let mut pub_opts = options(&cfg, &format!("{client_id}-pub"), &host, port, tls);
    pub_opts.set_clean_session(true);
    let (pub_client, pub_eventloop) = AsyncClient::new(pub_opts, 1024);

    let (in_tx, in_rx) = mpsc::unbounded_channel();
    deps.shared.start_publishing();
    let (republish_tx, republish_rx) = mpsc::unbounded_channel();
    let (batcher_done_tx, batcher_done_rx) = oneshot::channel();
    let (publisher_stop_tx, publisher_stop_rx) = oneshot::channel();
    let (pub_conn_stop_tx, pub_conn_stop_rx) = oneshot::channel();
    let rules = Arc::new(Rules {
        prefix: cfg.topic_prefix.clone(),
        client_id: client_id.clone(),
        max_payload: cfg.max_payload_bytes,
        dead_letter_cap: cfg.dead_letter_cap,
    });
    let (subscribed_tx, _subscribed) = watch::channel(false);
    let acks = Arc::new(Acks::default());
    let ingest = Ingest {
        deps: deps.clone(),
        client: client.clone(),
        acks: acks.clone(),
        status,
        birth,
        subscriptions: topic::subscriptions(&cfg.topic_prefix),
        subscribed: subscribed_tx,
    };
    let tasks = vec![
        tokio::spawn(ingest.run(eventloop, in_tx, batcher_done_rx)),
        tokio::spawn(batcher(
            Batcher {
                deps: deps.clone(),
                rules,
                acks,
            },
            in_rx,
            shutdown,
            (batcher_done_tx, publisher_stop_tx),
        )),
        tokio::spawn(publisher_connection(
            deps.clone(),
            pub_eventloop,
            republish_tx,
            pub_conn_stop_rx,
        )),
        tokio::spawn(publisher(
            deps.clone(),
            pub_client,
            republish_rx,
            publisher_stop_rx,
            pub_conn_stop_tx,
        )),
    ];
    tracing::info!(mode = ?cfg.mode, broker = %format!("{host}:{port}"), client_id = %client_id, bd_seq = birth, "MQTT started");
    Ok(Running { tasks })
}

/// Acks the batcher has released (after the commit), in batch order, for the ingest task to
/// write; and the wake-up it sends when there is something to write or room in the queue.
#[derive(Default)]
struct Acks {
    ready: Mutex<Vec<Ack>>,
    wake: Notify,
}

struct Ack {
    pkid: u16,
    /// The dedup entry this ack settles, if any.
    tag: Option<u64>,
    /// The connection the publish came in on (see [`Ingest::run`]).
    connection: u64,
}

/// Publishes waiting for the batcher at which the ingest task stops reading: enough for every
/// batch in flight to be full, so pausing never starves the writer.
fn queue_cap(batch_size: usize) -> u64 {
    (BATCHES_IN_FLIGHT * batch_size.max(1)) as u64
}

/// What the ingest task hands the batcher, in connection order.
enum Delivery {
    /// A publish and the number of the connection it came in on.
    Publish(Publish, u64),
    /// Acks the broker has processed: `(packet id, batch tag)` entries to forget.
    Settled(Vec<(u16, u64)>),
}
