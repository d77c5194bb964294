//! The ingest connection (module doc of `client`): reads publishes for the batcher, writes
//! the acks it releases, and settles them with PINGREQ/PINGRESP.

use super::*;

pub(super) struct Ingest {
    pub(super) deps: Arc<Deps>,
    pub(super) client: AsyncClient,
    pub(super) acks: Arc<Acks>,
    pub(super) status: String,
    pub(super) birth: u64,
    pub(super) subscriptions: [String; 2],
    pub(super) subscribed: watch::Sender<bool>,
}

/// The ingest connection's state across reconnects.
pub(super) struct Session {
    pub(super) connected: bool,
    /// Numbers the connections (one per CONNACK): an ack is written only on the connection
    /// its publish came in on.
    pub(super) connection: u64,
    pub(super) settle: Settle,
    /// When the broker last sent anything.
    pub(super) heard: tokio::time::Instant,
    pub(super) backoff: Backoff,
    pub(super) keep_alive: Duration,
}

/// What the ingest loop does next.
pub(super) enum Next {
    Event(Result<Event, ConnectionError>),
    /// Acks to write, or room in the queue: go round again.
    Again,
    /// The batcher is done: say goodbye.
    Stop,
}

impl Ingest {
    pub(super) async fn run(
        mut self,
        mut eventloop: EventLoop,
        to_batcher: mpsc::UnboundedSender<Delivery>,
        mut batcher_done: oneshot::Receiver<()>,
    ) {
        let deps = self.deps.clone();
        let queued = &deps.shared.ingest_queued;
        let mut s = Session {
            connected: false,
            connection: 0,
            settle: Settle::default(),
            heard: tokio::time::Instant::now(),
            backoff: Backoff::new(&deps.cfg),
            keep_alive: Duration::from_secs(deps.cfg.keepalive_secs.max(1)),
        };
        loop {
            let event = match self.next(&mut eventloop, &mut s, &mut batcher_done).await {
                Next::Event(e) => e,
                Next::Again => continue,
                Next::Stop => break,
            };
            if let Ok(Event::Incoming(_)) = &event {
                s.heard = tokio::time::Instant::now();
            }
            match event {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let n = queued.fetch_add(1, Ordering::Relaxed) + 1;
                    deps.shared
                        .ingest_queued_peak
                        .fetch_max(n, Ordering::Relaxed);
                    let _ = to_batcher.send(Delivery::Publish(p, s.connection));
                }
                Ok(Event::Outgoing(Outgoing::PingReq)) => {
                    // rumqttc's keepalive: it proves what was written before it, like ours.
                    // MQTT lets a client send PINGREQ at any time; each gets its PINGRESP.
                    eventloop.state.await_pingresp = false;
                    s.settle.probe();
                }
                Ok(Event::Incoming(Packet::PingResp)) => {
                    if let Some((_, settled)) = s.settle.probes.pop_front() {
                        if !settled.is_empty() {
                            let _ = to_batcher.send(Delivery::Settled(settled));
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    self.subscribed.send_replace(true);
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => self.connected(&mut s, ack),
                Ok(_) => {}
                Err(e) => {
                    self.lost(&mut eventloop, &mut s, e).await;
                    tokio::select! {
                        _ = tokio::time::sleep(s.backoff.delay()) => {}
                        _ = &mut batcher_done => break,
                    }
                }
            }
        }
        self.goodbye(&mut eventloop, &mut s).await;
    }

    /// Writes the acks that are ready, then waits for the next event: a packet read or
    /// written, a wake-up, the batcher's end, or the deadline of a silent connection.
    pub(super) async fn next(
        &self,
        eventloop: &mut EventLoop,
        s: &mut Session,
        batcher_done: &mut oneshot::Receiver<()>,
    ) -> Next {
        // Events still buffered in the event loop describe packets already read or
        // written; they go first, so that our own writes keep the wire order of `settle`.
        let idle = eventloop.state.events.is_empty();
        let written = match s.connected && idle {
            true => {
                self.write_acks(eventloop, s.connection, &mut s.settle, s.keep_alive)
                    .await
            }
            false => Ok(()),
        };
        // Stop reading while the batcher is a queue behind: the broker keeps the rest.
        let cap = queue_cap(self.deps.cfg.batch_size);
        let paused = idle && self.deps.shared.ingest_queued.load(Ordering::Relaxed) >= cap;
        // rumqttc pings every keepalive period whatever the traffic, and drops the
        // connection if its previous PINGREQ is unanswered at that moment; under load ours
        // nearly always is, so that check would cut a healthy connection every period. It
        // is cleared as each PINGREQ leaves (`run`), and this deadline stands in for it: a
        // connection that has neither answered a PINGREQ nor sent anything else for a
        // whole keepalive period is dead. A broker with a backlog queues its PINGRESP
        // behind the publishes (half a minute: docs/performance.md, "Figures from code
        // comments"), and each of those shows it alive. Not while paused: the answer may be waiting, unread.
        let dead_at = match paused {
            true => None,
            false => s
                .settle
                .probes
                .front()
                .map(|(at, _)| (*at).max(s.heard) + s.keep_alive),
        };
        match written {
            Err(e) => {
                eventloop.clean();
                Next::Event(Err(e))
            }
            Ok(()) => tokio::select! {
                biased;
                _ = batcher_done => Next::Stop,
                ev = eventloop.poll(), if !paused => Next::Event(ev),
                _ = self.acks.wake.notified() => Next::Again,
                _ = async { tokio::time::sleep_until(dead_at.unwrap_or_else(tokio::time::Instant::now)).await }, if dead_at.is_some() => {
                    // What rumqttc does on an error: drop the network, keep the session state.
                    eventloop.clean();
                    Next::Event(Err(ConnectionError::MqttState(StateError::AwaitPingResp)))
                }
            },
        }
    }

    /// A CONNACK: subscribe and say `online`.
    pub(super) fn connected(&self, s: &mut Session, ack: rumqttc::ConnAck) {
        s.connected = true;
        s.connection += 1;
        s.backoff.reset();
        self.deps.shared.connects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            session_present = ack.session_present,
            bd_seq = self.birth,
            "MQTT ingest connected"
        );
        let filters = self
            .subscriptions
            .iter()
            .map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
        // Never block the event loop: the request channel has room for these.
        if let Err(e) = self.client.try_subscribe_many(filters) {
            tracing::warn!(error = %e, "cannot queue the MQTT subscriptions");
        }
        if let Err(e) = self.client.try_publish(
            &self.status,
            QoS::AtLeastOnce,
            true,
            status_payload("online", self.birth),
        ) {
            tracing::warn!(error = %e, "cannot queue the MQTT birth message");
        }
    }

    /// The connection is gone: forget what it had not settled, and take a new birth number
    /// for the next one's Last Will.
    pub(super) async fn lost(
        &mut self,
        eventloop: &mut EventLoop,
        s: &mut Session,
        e: ConnectionError,
    ) {
        tracing::warn!(error = %e, "MQTT ingest connection lost; reconnecting");
        // Acks not yet answered by a PINGRESP may never have reached the broker: their
        // entries stay. Outgoing events still buffered describe writes on the dead connection.
        s.settle = Settle::default();
        eventloop
            .state
            .events
            .retain(|e| !matches!(e, Event::Outgoing(_)));
        if !s.connected {
            return;
        }
        s.connected = false;
        self.deps
            .shared
            .connection_losses
            .fetch_add(1, Ordering::Relaxed);
        // A new connection is a new birth; its Last Will carries the new number.
        match self.deps.writer.write(ingest::next_birth).await {
            Ok(n) => self.birth = n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot store the MQTT birth sequence");
                self.birth += 1;
            }
        }
        eventloop
            .mqtt_options
            .set_last_will(will(&self.status, "offline", self.birth));
    }

    /// Orderly stop: the batcher has released its last acks. A clean DISCONNECT suppresses
    /// the Last Will, so say `offline` ourselves first.
    pub(super) async fn goodbye(&self, eventloop: &mut EventLoop, s: &mut Session) {
        if !s.connected {
            return;
        }
        let _ = self
            .write_acks(eventloop, s.connection, &mut s.settle, s.keep_alive)
            .await;
        let _ = self.client.try_publish(
            &self.status,
            QoS::AtLeastOnce,
            true,
            status_payload("offline", self.birth),
        );
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while eventloop.poll().await.is_ok() {}
        })
        .await;
    }
}

impl Ingest {
    /// Writes the acks the batcher has released for this connection, and a PINGREQ to settle
    /// them when none is outstanding, with one flush. A connection that takes none of it for a
    /// keepalive period is dead.
    pub(super) async fn write_acks(
        &self,
        eventloop: &mut EventLoop,
        connection: u64,
        settle: &mut Settle,
        keep_alive: Duration,
    ) -> Result<(), ConnectionError> {
        let ready = self
            .acks
            .ready
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default();
        let Some(net) = eventloop.network.as_mut() else {
            return Ok(());
        };
        let write = async {
            let mut wrote = false;
            for a in ready.into_iter().filter(|a| a.connection == connection) {
                net.write(Packet::PubAck(PubAck::new(a.pkid))).await?;
                wrote = true;
                if let Some(tag) = a.tag {
                    settle.written.insert(a.pkid, tag);
                }
            }
            if !settle.written.is_empty() && settle.probes.is_empty() {
                net.write(Packet::PingReq).await?;
                settle.probe();
                wrote = true;
            }
            if wrote {
                net.flush().await?;
            }
            Ok(())
        };
        match tokio::time::timeout(keep_alive, write).await {
            Ok(r) => r.map_err(ConnectionError::MqttState),
            Err(_) => Err(ConnectionError::FlushTimeout),
        }
    }
}

/// The ingest connection's acks on their way to being settled (module doc).
#[derive(Default)]
pub(super) struct Settle {
    /// Acks written since the last PINGREQ left: packet id → entry tag. Only the latest
    /// delivery of a packet id can still have its entry (each commit of a later one rewrote
    /// it), so an earlier ack of the same id is dropped here: while a PINGRESP waits behind a
    /// broker's backlog this holds at most 65,535 acks, where a list held every ack written
    /// meanwhile (docs/performance.md, "Figures from code comments").
    pub(super) written: HashMap<u16, u64>,
    /// One entry per PINGREQ on the wire, oldest first: when it left, and the acks written
    /// before it, which its PINGRESP (answers come in order) proves the broker processed.
    pub(super) probes: VecDeque<(tokio::time::Instant, Vec<(u16, u64)>)>,
}

impl Settle {
    /// A PINGREQ has just been written.
    pub(super) fn probe(&mut self) {
        let written = std::mem::take(&mut self.written).into_iter().collect();
        self.probes
            .push_back((tokio::time::Instant::now(), written));
    }
}

#[cfg(test)]
mod tests {
    use super::Settle;

    #[test]
    fn acks_waiting_for_a_pingresp_keep_the_latest_delivery_of_each_packet_id() {
        let mut settle = Settle::default();
        // Packet id 7 acked three times (three deliveries) before the PINGREQ leaves.
        for (pkid, tag) in [(7, 11), (9, 21), (7, 13), (7, 15)] {
            settle.written.insert(pkid, tag);
        }
        settle.probe();
        settle.written.insert(7, 17);
        settle.probe();
        let mut first = settle.probes[0].1.clone();
        first.sort();
        assert_eq!(first, [(7, 15), (9, 21)]);
        assert_eq!(settle.probes[1].1, [(7, 17)]);
        assert!(settle.written.is_empty());
    }
}
