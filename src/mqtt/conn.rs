//! One MQTT connection: CONNECT and authentication, then one task that reads packets, hands
//! ingest publishes to the batcher, writes acks in arrival order once their commit is durable,
//! and delivers what the router queued for it.
//!
//! - **Acks in arrival order.** Every QoS 1/2 publish (and PUBREL) takes the next slot of an
//!   ack queue; a relayed one's ack is ready at once, an ingest one's when the batcher
//!   releases it after the commit. Acks leave from the front of the queue only, so a relayed
//!   publish's ack never overtakes an ingest ack that was due before it (3.1.1 §4.6).
//! - **Bounded.** At most `mqtt.receive_maximum` ingest acks wait per connection (announced as
//!   Receive Maximum to MQTT 5 clients); at the bound the socket is not read, so TCP pushes
//!   back on the device. A full batcher queue does the same for all of them.
//! - **Ends.** A DISCONNECT ends the connection quietly; anything else (a lost socket, a
//!   keepalive that expired after 1.5 periods, a malformed packet, a takeover, a revoked key)
//!   publishes the client's Will, through the same path as its publishes (so a Will on an
//!   ingest topic is applied as an event); an MQTT 5 Will Delay Interval holds it back
//!   (`Server::delay_will`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::codec::{self, DecodeError, In, Message, Origin, Out, Proto, QoS, Reason};
use super::ingest::{self, Forget};
use super::router::{Grant, Link};
use super::server::{Parked, Reply, Server, Will, Work};
use crate::auth::Access;

type PublishProps = rumqttc::v5::mqttbytes::v5::PublishProperties;

/// How long a write to a client may take before the client counts as gone (one that never
/// reads its socket).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve<S>(server: Arc<Server>, mut io: S, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max = server.cfg.max_packet_bytes;
    let mut rbuf = BytesMut::with_capacity(4096);
    let timeout = Duration::from_secs(server.cfg.connect_timeout_secs.max(1));
    let connect = match tokio::time::timeout(timeout, read_connect(&mut io, &mut rbuf, max)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "MQTT connection refused before CONNECT");
            server.shared.connect_refused("malformed");
            return;
        }
        Err(_) => {
            server.shared.connect_refused("connect_timeout");
            return;
        }
    };
    let proto = connect.proto;
    let Some((grant, subject, client_id)) = admit(&server, &mut io, &connect).await else {
        return;
    };
    let session: Arc<str> = format!("{subject}|{client_id}").into();
    let link = Arc::new(Link::new(Arc::new(grant), connect.clean));
    // 3.1.1: clean session 0 keeps the session. MQTT 5: clean start 0 resumes one; it
    // outlives this connection when its expiry interval is not 0.
    let persistent = match proto {
        Proto::V4 => !connect.clean,
        Proto::V5 => connect.session_expiry > 0,
    };
    let lifetime = session_lifetime(&connect, &server.cfg);
    let (present, parked) = match server.open_session(&session, &link).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "MQTT session not opened");
            server.close_session(&session, &link, false, Default::default());
            server.shared.connect_refused("store_unavailable");
            let _ = send(&mut io, proto, &[refuse(Reason::ServerUnavailable)]).await;
            return;
        }
    };
    let receive_maximum = server.cfg.receive_maximum;
    let connack = Out::ConnAck {
        reason: Reason::Success,
        session_present: present,
        receive_maximum,
        max_packet: max as u32,
        // MQTT 5 tells a client without a client id the one it got (5.0 §3.2.2.3.7).
        assigned_id: connect.client_id.is_empty().then(|| client_id.clone()),
    };
    if send(&mut io, proto, &[connack]).await.is_err() {
        server.close_session(&session, &link, persistent, parked);
        return;
    }
    server.shared.connects.fetch_add(1, Ordering::Relaxed);
    server.connections.fetch_add(1, Ordering::Relaxed);
    let mut c = Conn {
        server: server.clone(),
        proto,
        session: session.clone(),
        link: link.clone(),
        acks: Acks::default(),
        waiting: 0,
        qos2: HashMap::new(),
        out_inflight: HashMap::new(),
        keep_unacked: persistent,
        sent: 0,
        next_pkid: 1,
        out_window: server
            .cfg
            .inflight
            .min(connect.receive_maximum.unwrap_or(u16::MAX))
            .max(1) as usize,
        client_max_packet: connect.max_packet.map_or(usize::MAX, |m| m as usize),
        window: parked.window,
        window_cap: receive_maximum as usize,
        wbuf: BytesMut::with_capacity(1024),
    };
    c.resend(parked.unacked);
    let keep_alive =
        (connect.keep_alive > 0).then(|| Duration::from_millis(connect.keep_alive as u64 * 1500));
    let end = c.run(&mut io, &mut rbuf, keep_alive).await;
    // What can still be said to the client (acks released meanwhile, the reason of a close).
    c.take_done();
    c.acks.drain_ready(&mut c.wbuf, proto);
    if let Some(reason) = end.reason() {
        codec::write(proto, &Out::Disconnect(reason), &mut c.wbuf);
    }
    if !c.wbuf.is_empty() {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, io.write_all(&c.wbuf)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
    if end.publishes_will() {
        let props = connect.will_props;
        if let Some(will) = connect.will.and_then(|w| c.will(w, props)) {
            match will_delay(connect.will_delay, persistent, lifetime) {
                Some(delay) => server.delay_will(&session, &link, delay, will),
                None => server.publish_will(will).await,
            }
        }
    }
    let parked = match persistent {
        true => c.park(lifetime),
        false => Parked::default(),
    };
    server.close_session(&session, &link, persistent, parked);
    server.connections.fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(%peer, client = %client_id, ?end, "MQTT connection closed");
}

/// The CONNACK that refuses a connection.
fn refuse(reason: Reason) -> Out {
    Out::ConnAck {
        reason,
        session_present: false,
        receive_maximum: 0,
        max_packet: 0,
        assigned_id: None,
    }
}

/// Authenticates a CONNECT and settles its client id: (grant, key subject, client id), or
/// None after the refusal is sent.
async fn admit<S>(
    server: &Server,
    io: &mut S,
    connect: &codec::Connect,
) -> Option<(Grant, String, String)>
where
    S: AsyncWrite + Unpin,
{
    let proto = connect.proto;
    let (grant, subject) = match server.authenticate(connect.password.as_deref()) {
        Ok(g) => g,
        Err(reason) => {
            server.shared.connect_refused(match reason {
                Reason::ServerUnavailable => "store_unavailable",
                _ => "not_authorized",
            });
            let _ = send(io, proto, &[refuse(reason)]).await;
            return None;
        }
    };
    let client_id = if connect.client_id.is_empty() {
        if !connect.clean && proto == Proto::V4 {
            server.shared.connect_refused("client_id");
            let _ = send(io, proto, &[refuse(Reason::ClientIdentifierNotValid)]).await;
            return None;
        }
        format!("smgate-{}", uuid::Uuid::new_v4().simple())
    } else {
        connect.client_id.clone()
    };
    Some((grant, subject, client_id))
}

/// How long a persistent session outlives its connection: the MQTT 5 client's Session Expiry
/// Interval (0xFFFFFFFF: no end), or `mqtt.session_expiry_secs` for 3.1.1 (0: no end).
fn session_lifetime(connect: &codec::Connect, cfg: &super::MqttConfig) -> Option<Duration> {
    let secs = match connect.proto {
        Proto::V5 if connect.session_expiry == u32::MAX => return None,
        Proto::V5 => connect.session_expiry as u64,
        Proto::V4 if cfg.session_expiry_secs == 0 => return None,
        Proto::V4 => cfg.session_expiry_secs,
    };
    Some(Duration::from_secs(secs))
}

async fn read_connect<S: AsyncRead + Unpin>(
    io: &mut S,
    rbuf: &mut BytesMut,
    max: usize,
) -> Result<codec::Connect, DecodeError> {
    loop {
        if let Some(c) = codec::read_connect(rbuf, max)? {
            return Ok(c);
        }
        match io.read_buf(rbuf).await {
            Ok(0) | Err(_) => return Err(DecodeError::Malformed("closed before CONNECT".into())),
            Ok(_) => {}
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(io: &mut S, proto: Proto, out: &[Out]) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    for o in out {
        codec::write(proto, o, &mut buf);
    }
    match tokio::time::timeout(WRITE_TIMEOUT, io.write_all(&buf)).await {
        Ok(r) => r?,
        Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
    }
    io.flush().await
}

#[derive(Debug)]
enum End {
    /// DISCONNECT from the client; `will`: MQTT 5 "disconnect with Will message".
    Disconnect {
        will: bool,
    },
    Lost,
    KeepAlive,
    Protocol(Reason),
    Kicked(Reason),
    Shutdown,
}

impl End {
    /// The MQTT 5 DISCONNECT reason the server sends, if it sends one.
    fn reason(&self) -> Option<Reason> {
        match self {
            End::Disconnect { .. } | End::Lost => None,
            End::KeepAlive => Some(Reason::KeepAliveTimeout),
            End::Protocol(r) | End::Kicked(r) => Some(*r),
            End::Shutdown => Some(Reason::ServerShuttingDown),
        }
    }

    fn publishes_will(&self) -> bool {
        !matches!(
            self,
            End::Disconnect { will: false } | End::Shutdown | End::Kicked(Reason::NotAuthorized)
        )
    }
}

/// Acks in arrival order (module doc): slot `base + i` is `q[i]`, `None` while it waits.
#[derive(Default)]
struct Acks {
    base: u64,
    q: VecDeque<Option<Out>>,
}

impl Acks {
    fn ready(&mut self, out: Out) {
        self.q.push_back(Some(out));
    }

    fn wait(&mut self) -> u64 {
        self.q.push_back(None);
        self.base + self.q.len() as u64 - 1
    }

    fn fill(&mut self, slot: u64, out: Out) {
        if let Some(s) = slot
            .checked_sub(self.base)
            .and_then(|i| self.q.get_mut(i as usize))
        {
            *s = Some(out);
        }
    }

    fn drain_ready(&mut self, buf: &mut BytesMut, proto: Proto) {
        while let Some(Some(_)) = self.q.front() {
            if let Some(Some(out)) = self.q.pop_front() {
                codec::write(proto, &out, buf);
            }
            self.base += 1;
        }
    }
}

enum Qos2 {
    /// A relayed message, delivered on its first PUBLISH.
    Relayed,
    /// An ingest message committed by the batch with this tag.
    Committed(u64),
}

struct Conn {
    server: Arc<Server>,
    proto: Proto,
    session: Arc<str>,
    link: Arc<Link>,
    acks: Acks,
    /// Ingest acks (and PUBCOMPs) waiting for their commit.
    waiting: usize,
    /// QoS 2 packet ids received and not yet released by PUBREL.
    qos2: HashMap<u16, Qos2>,
    /// QoS 1 deliveries to this client not yet acked, by packet id, with their order: a
    /// persistent session sends them again when the client comes back.
    out_inflight: HashMap<u16, (u64, Option<Message>)>,
    /// Whether unacked deliveries are kept for a later connection (a persistent session);
    /// otherwise only their packet ids are.
    keep_unacked: bool,
    /// Deliveries made so far (their order in `out_inflight`).
    sent: u64,
    next_pkid: u16,
    out_window: usize,
    client_max_packet: usize,
    /// The latest committed QoS 1 deliveries of this session, (packet id, tag), oldest first:
    /// the ones the client may still redeliver (module doc of `mqtt`).
    window: VecDeque<(u16, u64)>,
    window_cap: usize,
    wbuf: BytesMut,
}

enum Event {
    Read(std::io::Result<usize>),
    Wake,
    KeepAlive,
    Shutdown,
}

impl Conn {
    async fn run<S>(&mut self, io: &mut S, rbuf: &mut BytesMut, keep_alive: Option<Duration>) -> End
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let max = self.server.cfg.max_packet_bytes;
        let receive_maximum = self.server.cfg.receive_maximum as usize;
        let mut shutdown = self.server.shutdown.clone();
        let mut last_in = Instant::now();
        let mut paused = false;
        // Packets that arrived with the CONNECT.
        if !rbuf.is_empty() {
            if let Some(end) = self.handle_input(rbuf, max).await {
                return end;
            }
        }
        loop {
            self.take_done();
            self.acks.drain_ready(&mut self.wbuf, self.proto);
            self.deliver();
            if !self.wbuf.is_empty() {
                match tokio::time::timeout(WRITE_TIMEOUT, io.write_all(&self.wbuf)).await {
                    Ok(Ok(())) => self.wbuf.clear(),
                    _ => return End::Lost,
                }
            }
            if let Some(r) = self.link.kicked() {
                return End::Kicked(r);
            }
            if *shutdown.borrow() {
                return End::Shutdown;
            }
            let can_read = self.waiting < receive_maximum;
            // Not reading: the device's packets (its PINGREQs too) wait in the socket, so its
            // keepalive is not timed, and runs again from when reading resumes.
            if !can_read {
                paused = true;
            } else if std::mem::take(&mut paused) {
                last_in = Instant::now();
            }
            let ka_deadline = keep_alive.filter(|_| can_read).map(|k| last_in + k);
            let event = tokio::select! {
                biased;
                _ = shutdown.changed() => Event::Shutdown,
                _ = self.link.wake.notified() => Event::Wake,
                r = io.read_buf(rbuf), if can_read => Event::Read(r),
                _ = sleep_until(ka_deadline) => Event::KeepAlive,
            };
            match event {
                Event::Wake => {}
                Event::Shutdown => {
                    // Acks of what was read are released by the batcher's last commit.
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while self.waiting > 0 && Instant::now() < deadline {
                        self.take_done();
                        if self.waiting == 0 {
                            break;
                        }
                        let _ = tokio::time::timeout_at(deadline, self.link.wake.notified()).await;
                    }
                    // What is queued for this client goes too: the gateway's `offline` status.
                    self.deliver();
                    return End::Shutdown;
                }
                Event::KeepAlive => return End::KeepAlive,
                Event::Read(Ok(0)) | Event::Read(Err(_)) => return End::Lost,
                Event::Read(Ok(_)) => {
                    last_in = Instant::now();
                    if let Some(end) = self.handle_input(rbuf, max).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Handles every complete packet in `rbuf`.
    async fn handle_input(&mut self, rbuf: &mut BytesMut, max: usize) -> Option<End> {
        loop {
            let packet = match codec::read(self.proto, rbuf, max) {
                Ok(Some(p)) => p,
                Ok(None) => {
                    rbuf.reserve(4096);
                    return None;
                }
                Err(DecodeError::TooLarge(_)) => {
                    return Some(End::Protocol(Reason::PacketTooLarge))
                }
                Err(_) => return Some(End::Protocol(Reason::MalformedPacket)),
            };
            if let Some(end) = self.handle(packet).await {
                return Some(end);
            }
        }
    }

    async fn handle(&mut self, packet: In) -> Option<End> {
        match packet {
            In::Publish {
                message,
                pkid,
                dup,
                alias,
                props,
            } => {
                if alias {
                    return Some(End::Protocol(Reason::TopicAliasInvalid));
                }
                if !valid_topic(&message.topic) {
                    return Some(End::Protocol(Reason::ProtocolError));
                }
                self.publish(message, pkid, dup, props).await;
            }
            In::PubRel(pkid) => match self.qos2.remove(&pkid) {
                Some(Qos2::Relayed) => self.acks.ready(Out::PubComp(pkid)),
                committed => {
                    // The entry goes before PUBCOMP: the client may reuse the id after it.
                    let tag = match committed {
                        Some(Qos2::Committed(t)) => t,
                        _ => 0,
                    };
                    let slot = self.acks.wait();
                    self.waiting += 1;
                    let reply = self.reply(slot, pkid, QoS::ExactlyOnce);
                    let forget = Forget::Delivery(self.session.clone(), pkid, tag);
                    if self
                        .server
                        .work
                        .send(Work::Release(forget, reply))
                        .await
                        .is_err()
                    {
                        return Some(End::Shutdown);
                    }
                }
            },
            In::PubAck(pkid) => {
                self.out_inflight.remove(&pkid);
            }
            // Deliveries go at QoS 1 at most; a client that answers otherwise is answered
            // as the protocol asks and otherwise ignored.
            In::PubRec(pkid) => {
                self.out_inflight.remove(&pkid);
                codec::write(self.proto, &Out::PubRel(pkid), &mut self.wbuf);
            }
            In::PubComp(_) => {}
            In::Subscribe { pkid, filters } => {
                let qos = match self.server.cfg.state_qos {
                    0 => QoS::AtMostOnce,
                    _ => QoS::AtLeastOnce,
                };
                let granted =
                    self.server
                        .router
                        .subscribe(&self.session, &self.link, &filters, qos);
                if granted.iter().any(|g| g.is_err()) {
                    self.server
                        .shared
                        .subscriptions_refused
                        .fetch_add(1, Ordering::Relaxed);
                }
                // Written now, so the SUBACK leaves before the retained messages it brings.
                codec::write(self.proto, &Out::SubAck { pkid, granted }, &mut self.wbuf);
            }
            In::Unsubscribe { pkid, filters } => {
                let found = self.server.router.unsubscribe(&self.session, &filters);
                codec::write(self.proto, &Out::UnsubAck { pkid, found }, &mut self.wbuf);
            }
            In::PingReq => codec::write(self.proto, &Out::PingResp, &mut self.wbuf),
            In::Disconnect { will } => return Some(End::Disconnect { will }),
            In::Unexpected(what) => {
                tracing::debug!(what, "unexpected MQTT packet from a client");
                return Some(End::Protocol(Reason::ProtocolError));
            }
        }
        None
    }

    fn reply(&self, slot: u64, pkid: u16, qos: QoS) -> Reply {
        Reply {
            link: self.link.clone(),
            slot,
            pkid,
            qos,
        }
    }

    /// Whether `topic` is under the gateway's prefix (an ingest topic, or one that will be
    /// dead-lettered as unknown): those are never relayed.
    fn is_ingest(&self, topic: &str) -> bool {
        topic
            .strip_prefix(&self.server.cfg.topic_prefix)
            .is_some_and(|r| r.starts_with('/'))
    }

    /// The ingest message for a publish on `topic`, refused when this client may not publish
    /// to the topic's machine.
    fn ingest_message(&self, m: Message, pkid: u16, dup: bool) -> ingest::Message {
        let grant: &Grant = &self.link.grant;
        let allowed = match grant.machine_level(&m.topic) {
            Some(machine) => grant.access(&self.server.store, machine) >= Access::Operator,
            // `<prefix>/$gateway/…` is the gateway's own.
            None => false,
        };
        if allowed {
            return ingest::Message::new(
                self.session.clone(),
                m.topic,
                m.payload,
                pkid,
                dup,
                self.server.cfg.max_payload_bytes,
            );
        }
        self.server
            .shared
            .publishes_refused
            .fetch_add(1, Ordering::Relaxed);
        let why = format!(
            "this client's key may not publish to `{}`",
            m.topic.chars().take(200).collect::<String>()
        );
        ingest::Message::refused(
            self.session.clone(),
            m.topic,
            m.payload,
            pkid,
            dup,
            ("not_authorized", why),
        )
    }

    async fn publish(&mut self, m: Message, pkid: u16, dup: bool, props: Option<PublishProps>) {
        let qos = m.qos;
        if !self.is_ingest(&m.topic) {
            // Relayed: acked on receipt, not persisted.
            let m = self.stamped(m, props);
            match qos {
                QoS::AtMostOnce => self.relay(m),
                QoS::AtLeastOnce => {
                    self.relay(m);
                    self.acks.ready(Out::PubAck(pkid, Reason::Success));
                }
                QoS::ExactlyOnce => {
                    if !self.qos2.contains_key(&pkid) {
                        self.relay(m);
                        self.qos2.insert(pkid, Qos2::Relayed);
                    }
                    self.acks.ready(Out::PubRec(pkid, Reason::Success));
                }
            }
            return;
        }
        let work = match qos {
            QoS::AtMostOnce => Work::Publish(self.ingest_message(m, 0, false), None),
            _ => {
                let slot = self.acks.wait();
                self.waiting += 1;
                let reply = self.reply(slot, pkid, qos);
                // A QoS 2 publish whose PUBREL has not arrived is the same message (4.3.3),
                // in this connection or an earlier one of the session: its entry says so.
                let m = self.ingest_message(m, pkid, dup);
                let m = if qos == QoS::ExactlyOnce {
                    m.exactly_once()
                } else {
                    m
                };
                Work::Publish(m, Some(reply))
            }
        };
        // Waits while the batcher's queue is full: the flood pushes back through TCP.
        let _ = self.server.work.send(work).await;
    }

    /// `m` with its origin: this session, and its MQTT 5 properties.
    fn stamped(&self, m: Message, props: Option<PublishProps>) -> Message {
        let origin = Origin::new(self.session.clone(), props);
        Message {
            origin: Some(Arc::new(origin)),
            ..m
        }
    }

    fn relay(&self, m: Message) {
        self.server.relay(m);
    }

    /// Takes the acks the batcher released, and records what their commits wrote.
    fn take_done(&mut self) {
        let done = match self.link.done.lock() {
            Ok(mut d) if !d.is_empty() => std::mem::take(&mut *d),
            _ => return,
        };
        for (slot, out, settled) in done {
            self.acks.fill(slot, out);
            self.waiting = self.waiting.saturating_sub(1);
            let Some(s) = settled else { continue };
            if s.qos2 {
                self.qos2.insert(s.pkid, Qos2::Committed(s.tag));
            } else if s.new_entry {
                self.window.push_back((s.pkid, s.tag));
                if self.window.len() > self.window_cap {
                    if let Some((pkid, tag)) = self.window.pop_front() {
                        // Best effort: an entry left behind is overwritten when its packet id
                        // comes round again.
                        let f = Forget::Delivery(self.session.clone(), pkid, tag);
                        let _ = self.server.work.try_send(Work::Forget(f));
                    }
                }
            }
        }
    }

    /// Writes queued deliveries while the client's window has room.
    fn deliver(&mut self) {
        loop {
            if self.out_inflight.len() >= self.out_window {
                return;
            }
            let next = self.link.outq.lock().ok().and_then(|mut q| q.pop());
            let Some(m) = next else { return };
            if codec::publish_size(self.proto, &m) > self.client_max_packet
                || m.expired(std::time::Instant::now())
            {
                continue;
            }
            let pkid = if m.qos == QoS::AtMostOnce {
                0
            } else {
                let pkid = self.free_pkid();
                self.sent += 1;
                let kept = self.keep_unacked.then(|| m.clone());
                self.out_inflight.insert(pkid, (self.sent, kept));
                pkid
            };
            let out = Out::Publish {
                message: m,
                pkid,
                dup: false,
            };
            codec::write(self.proto, &out, &mut self.wbuf);
        }
    }

    /// Sends again, with their packet ids and DUP, the deliveries that the session's last
    /// connection did not see acked, as far as the client's window goes; the rest are queued
    /// as new deliveries.
    fn resend(&mut self, unacked: Vec<(u16, Message)>) {
        let mut rest = Vec::new();
        for (pkid, m) in unacked {
            if self.out_inflight.len() >= self.out_window || self.out_inflight.contains_key(&pkid) {
                rest.push(m);
                continue;
            }
            if codec::publish_size(self.proto, &m) > self.client_max_packet {
                continue;
            }
            self.sent += 1;
            let kept = self.keep_unacked.then(|| m.clone());
            self.out_inflight.insert(pkid, (self.sent, kept));
            let out = Out::Publish {
                message: m,
                pkid,
                dup: true,
            };
            codec::write(self.proto, &out, &mut self.wbuf);
        }
        self.server.router.requeue(&self.link, rest);
    }

    /// What the session keeps when this connection ends, for `lifetime` (None: until smgate
    /// stops).
    fn park(&mut self, lifetime: Option<Duration>) -> Parked {
        let mut unacked: Vec<(u64, u16, Message)> = self
            .out_inflight
            .drain()
            .filter_map(|(pkid, (n, m))| Some((n, pkid, m?)))
            .collect();
        unacked.sort_by_key(|(n, _, _)| *n);
        Parked {
            window: std::mem::take(&mut self.window),
            unacked: unacked.into_iter().map(|(_, p, m)| (p, m)).collect(),
            expires: lifetime.map(|d| std::time::Instant::now() + d),
        }
    }

    fn free_pkid(&mut self) -> u16 {
        loop {
            let p = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.out_inflight.contains_key(&p) {
                return p;
            }
        }
    }

    /// The client's Will as if the client had published it (applied or relayed); None for a
    /// topic a client may not publish to.
    fn will(&self, will: Message, props: Option<PublishProps>) -> Option<Will> {
        if !valid_topic(&will.topic) {
            return None;
        }
        Some(match self.is_ingest(&will.topic) {
            true => Will::Apply(self.ingest_message(will, 0, false)),
            false => Will::Relay(self.stamped(will, props)),
        })
    }
}

/// How long a Will waits (MQTT 5 Will Delay Interval): None to publish it now. It waits no
/// longer than its session lasts: a session that ends with the connection publishes it at
/// once (5.0 §3.1.2.5).
fn will_delay(secs: u32, persistent: bool, lifetime: Option<Duration>) -> Option<Duration> {
    if secs == 0 || !persistent {
        return None;
    }
    let delay = Duration::from_secs(secs as u64);
    Some(lifetime.map_or(delay, |l| l.min(delay))).filter(|d| !d.is_zero())
}

/// A topic a client may publish to: not empty, no wildcards.
fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && rumqttc::mqttbytes::valid_topic(topic)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
