//! MQTT 3.1.1 and 5 packets on the server side, decoded and encoded by rumqttc's public codecs
//! (`rumqttc::mqttbytes::v4`, `rumqttc::v5::mqttbytes::v5`), and mapped to the few shapes the
//! server works with ([`In`], [`Out`]), so that the connection logic is written once for both
//! protocol versions.
//!
//! Two things are done here by hand, both on the frame level, not the packet encoding:
//! - which codec reads a connection is decided by the CONNECT's protocol level (the byte after
//!   the protocol name), since rumqttc's v4 reader takes a level-5 CONNECT for its own and then
//!   misreads its properties;
//! - a v5 DISCONNECT with remaining length 0 (reason "normal", as `mosquitto_pub -V 5` sends
//!   it) is valid MQTT 5 (§3.14.2.1) but rumqttc's v5 reader refuses it, so it is recognised
//!   from its two bytes.
//!
//! A relayed MQTT 5 publish keeps its properties ([`Origin`]): they are forwarded unaltered to
//! MQTT 5 subscribers (5.0 §3.3.2.3), but for the Message Expiry Interval, which counts down
//! while the message waits, and the topic alias and subscription identifiers, which belong to
//! one connection.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

pub use rumqttc::mqttbytes::QoS;

/// The protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    V4,
    V5,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the packet is larger than the {0}-byte limit")]
    TooLarge(usize),
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("unsupported protocol level {0} (MQTT 3.1.1 is level 4, MQTT 5 is level 5)")]
    Protocol(u8),
}

/// A Will or a PUBLISH: what the server relays or applies.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Who published a relayed message, and its properties; None for the gateway's own.
    pub origin: Option<Arc<Origin>>,
}

/// Where a relayed message came from, and what it carries beside topic and payload.
#[derive(Debug)]
pub struct Origin {
    /// The publisher's session (the MQTT 5 No Local option compares it).
    pub session: Arc<str>,
    /// When the server received it (its Message Expiry Interval counts from here).
    pub at: Instant,
    /// Its MQTT 5 properties, without topic alias and subscription identifiers.
    pub props: Option<v5::PublishProperties>,
}

impl Origin {
    pub fn new(session: Arc<str>, props: Option<v5::PublishProperties>) -> Origin {
        Origin {
            session,
            at: Instant::now(),
            props: props.map(|p| v5::PublishProperties {
                topic_alias: None,
                subscription_identifiers: Vec::new(),
                ..p
            }),
        }
    }

    /// Whether its Message Expiry Interval has passed at `now` (it is then not delivered).
    fn expired(&self, now: Instant) -> bool {
        let interval = self.props.as_ref().and_then(|p| p.message_expiry_interval);
        interval.is_some_and(|i| i > 0 && self.waited(now) >= u64::from(i))
    }

    /// The properties to send at `now`: the expiry interval less the seconds waited (5.0
    /// §3.3.2.3.3).
    fn props_at(&self, now: Instant) -> Option<v5::PublishProperties> {
        let mut p = self.props.clone()?;
        if let Some(i) = p.message_expiry_interval {
            let left = u64::from(i).saturating_sub(self.waited(now));
            p.message_expiry_interval = Some(left as u32);
        }
        Some(p)
    }

    /// Whole seconds since the server received the message.
    fn waited(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.at).as_secs()
    }
}

impl Message {
    /// Whether its MQTT 5 Message Expiry Interval has passed (it is then not delivered).
    pub fn expired(&self, now: Instant) -> bool {
        self.origin.as_ref().is_some_and(|o| o.expired(now))
    }
}

/// One filter of a SUBSCRIBE, with its MQTT 5 options (3.1.1: the defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    pub filter: String,
    pub qos: QoS,
    /// Not delivered what the subscriber's own session publishes.
    pub no_local: bool,
    /// Live deliveries keep the publisher's retain flag (otherwise 0).
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

impl Subscription {
    pub fn new(filter: &str, qos: QoS) -> Subscription {
        Subscription {
            filter: filter.to_owned(),
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: RetainHandling::OnSubscribe,
        }
    }
}

/// When a subscription receives the retained messages it matches (5.0 §3.8.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainHandling {
    OnSubscribe,
    /// Only when the subscription did not exist before.
    OnNewSubscription,
    Never,
}

#[derive(Debug)]
pub struct Connect {
    pub proto: Proto,
    pub client_id: String,
    /// 3.1.1 clean session; MQTT 5 clean start.
    pub clean: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub will: Option<Message>,
    /// MQTT 5: the Will's properties, forwarded with it.
    pub will_props: Option<v5::PublishProperties>,
    /// MQTT 5: the Will Delay Interval in seconds (0 for 3.1.1 and when absent).
    pub will_delay: u32,
    /// MQTT 5: the session outlives the connection (Session Expiry Interval > 0).
    pub session_expiry: u32,
    /// MQTT 5: the most QoS > 0 publishes the client takes at once (Receive Maximum).
    pub receive_maximum: Option<u16>,
    /// MQTT 5: the largest packet the client takes.
    pub max_packet: Option<u32>,
}

/// A packet from a client, after CONNECT.
#[derive(Debug)]
pub enum In {
    Publish {
        message: Message,
        pkid: u16,
        dup: bool,
        /// MQTT 5 topic alias: refused (we announce no aliases).
        alias: bool,
        /// MQTT 5 properties.
        props: Option<v5::PublishProperties>,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<Subscription>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    /// `will`: MQTT 5 "disconnect with Will message".
    Disconnect {
        will: bool,
    },
    /// A packet a client must not send (CONNACK, SUBACK, a second CONNECT, AUTH).
    Unexpected(&'static str),
}

/// Reasons carried by acks and refusals; each maps to a 3.1.1 code where 3.1.1 has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Success,
    NotAuthorized,
    PayloadFormatInvalid,
    TopicFilterInvalid,
    BadUserNamePassword,
    ServerUnavailable,
    ClientIdentifierNotValid,
    // Disconnect reasons (MQTT 5 only; 3.1.1 just closes).
    MalformedPacket,
    ProtocolError,
    PacketTooLarge,
    ReceiveMaximumExceeded,
    KeepAliveTimeout,
    SessionTakenOver,
    ServerShuttingDown,
    AdministrativeAction,
    QuotaExceeded,
    TopicAliasInvalid,
    SharedSubscriptionsNotSupported,
}

/// A packet to a client.
#[derive(Debug, Clone)]
pub enum Out {
    ConnAck {
        reason: Reason,
        session_present: bool,
        receive_maximum: u16,
        max_packet: u32,
        /// MQTT 5: the client id the server chose for a client that sent none.
        assigned_id: Option<String>,
    },
    PubAck(u16, Reason),
    PubRec(u16, Reason),
    PubRel(u16),
    PubComp(u16),
    /// A delivery; `dup` when it is sent again to a resumed session (3.1.1 §4.4).
    Publish {
        message: Message,
        pkid: u16,
        dup: bool,
    },
    /// Per filter: the granted QoS, or why it was refused.
    SubAck {
        pkid: u16,
        granted: Vec<Result<QoS, Reason>>,
    },
    /// Per filter: whether a subscription existed.
    UnsubAck {
        pkid: u16,
        found: Vec<bool>,
    },
    PingResp,
    Disconnect(Reason),
}

/// The protocol level of the CONNECT at the start of `buf`: `Ok(None)` while the frame is
/// incomplete. Only the frame is read here (fixed header, protocol name, level).
pub fn connect_level(buf: &[u8], max: usize) -> Result<Option<u8>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first >> 4 != 1 {
        return Err(DecodeError::Malformed(
            "the first packet of a connection must be CONNECT".into(),
        ));
    }
    // Remaining length: up to four bytes of 7 bits.
    let (mut len, mut shift, mut i) = (0usize, 0, 1);
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= ((b & 0x7f) as usize) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err(DecodeError::Malformed("bad remaining length".into()));
        }
    }
    if len + i > max {
        return Err(DecodeError::TooLarge(max));
    }
    // Protocol name: a 2-byte length, then "MQTT" (or "MQIsdp" for 3.1), then the level.
    let (Some(&hi), Some(&lo)) = (buf.get(i), buf.get(i + 1)) else {
        return Ok(None);
    };
    let name_len = u16::from_be_bytes([hi, lo]) as usize;
    match buf.get(i + 2 + name_len) {
        Some(&level) => Ok(Some(level)),
        None if len < 2 + name_len + 1 => Err(DecodeError::Malformed("short CONNECT".into())),
        None => Ok(None),
    }
}

fn malformed(e: impl std::fmt::Display) -> DecodeError {
    DecodeError::Malformed(e.to_string())
}

/// Reads one CONNECT; `Ok(None)` while incomplete.
pub fn read_connect(buf: &mut BytesMut, max: usize) -> Result<Option<Connect>, DecodeError> {
    let Some(level) = connect_level(buf, max)? else {
        return Ok(None);
    };
    match level {
        4 => match v4::Packet::read(buf, max) {
            Ok(v4::Packet::Connect(c)) => Ok(Some(Connect {
                proto: Proto::V4,
                client_id: c.client_id,
                clean: c.clean_session,
                keep_alive: c.keep_alive,
                username: c.login.as_ref().map(|l| l.username.clone()),
                password: c.login.map(|l| l.password),
                will: c.last_will.map(|w| Message {
                    topic: w.topic,
                    payload: w.message,
                    qos: w.qos,
                    retain: w.retain,
                    origin: None,
                }),
                will_props: None,
                will_delay: 0,
                session_expiry: 0,
                receive_maximum: None,
                max_packet: None,
            })),
            Ok(_) => Err(malformed("expected CONNECT")),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(malformed(e)),
        },
        5 => match v5::Packet::read(buf, Some(max as u32)) {
            Ok(v5::Packet::Connect(c, will, login)) => {
                let props = c.properties.unwrap_or_default();
                let will_props = will.as_ref().and_then(|w| w.properties.clone());
                let will_delay = will_props
                    .as_ref()
                    .and_then(|p| p.delay_interval)
                    .unwrap_or(0);
                Ok(Some(Connect {
                    proto: Proto::V5,
                    client_id: c.client_id,
                    clean: c.clean_start,
                    keep_alive: c.keep_alive,
                    username: login.as_ref().map(|l| l.username.clone()),
                    password: login.map(|l| l.password),
                    will: will.map(|w| Message {
                        topic: String::from_utf8_lossy(&w.topic).into_owned(),
                        payload: w.message,
                        qos: v4_qos(w.qos),
                        retain: w.retain,
                        origin: None,
                    }),
                    will_props: will_props.map(|p| v5::PublishProperties {
                        payload_format_indicator: p.payload_format_indicator,
                        message_expiry_interval: p.message_expiry_interval,
                        response_topic: p.response_topic,
                        correlation_data: p.correlation_data,
                        user_properties: p.user_properties,
                        content_type: p.content_type,
                        ..Default::default()
                    }),
                    will_delay,
                    session_expiry: props.session_expiry_interval.unwrap_or(0),
                    receive_maximum: props.receive_maximum,
                    max_packet: props.max_packet_size,
                }))
            }
            Ok(_) => Err(malformed("expected CONNECT")),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(malformed(e)),
        },
        other => Err(DecodeError::Protocol(other)),
    }
}

fn subscription(f: v5::Filter) -> Subscription {
    Subscription {
        qos: v4_qos(f.qos),
        no_local: f.nolocal,
        retain_as_published: f.preserve_retain,
        retain_handling: match f.retain_forward_rule {
            v5::RetainForwardRule::OnEverySubscribe => RetainHandling::OnSubscribe,
            v5::RetainForwardRule::OnNewSubscribe => RetainHandling::OnNewSubscription,
            v5::RetainForwardRule::Never => RetainHandling::Never,
        },
        filter: f.path,
    }
}

fn v4_qos(q: rumqttc::v5::mqttbytes::QoS) -> QoS {
    match q {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::v5::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn v5_qos(q: QoS) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// Reads one packet after CONNECT; `Ok(None)` while incomplete.
pub fn read(proto: Proto, buf: &mut BytesMut, max: usize) -> Result<Option<In>, DecodeError> {
    if buf.is_empty() {
        return Ok(None);
    }
    match proto {
        Proto::V4 => match v4::Packet::read(buf, max) {
            Ok(p) => Ok(Some(from_v4(p))),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_)) => {
                Err(DecodeError::TooLarge(max))
            }
            Err(e) => Err(malformed(e)),
        },
        Proto::V5 => {
            if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] == 0 {
                let _ = buf.split_to(2);
                return Ok(Some(In::Disconnect { will: false }));
            }
            match v5::Packet::read(buf, Some(max as u32)) {
                Ok(p) => Ok(Some(from_v5(p))),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(rumqttc::v5::mqttbytes::Error::PayloadSizeLimitExceeded { .. }) => {
                    Err(DecodeError::TooLarge(max))
                }
                Err(e) => Err(malformed(e)),
            }
        }
    }
}

/// A payload in an allocation of its own. The codec hands out a slice of the connection's read
/// buffer, and a message waiting for its commit would keep that whole buffer alive: the next
/// read then needs a new one, so a connection with 32 messages in flight held up to 32 read
/// buffers of 4 KiB (docs/performance.md, "Where the memory goes at saturation"). A copy of a
/// heartbeat's few dozen bytes lets the buffer be reused in place.
fn own(payload: Bytes) -> Bytes {
    Bytes::copy_from_slice(&payload)
}

fn from_v4(p: v4::Packet) -> In {
    match p {
        v4::Packet::Publish(p) => In::Publish {
            message: Message {
                topic: p.topic,
                payload: own(p.payload),
                qos: p.qos,
                retain: p.retain,
                origin: None,
            },
            pkid: p.pkid,
            dup: p.dup,
            alias: false,
            props: None,
        },
        v4::Packet::PubAck(a) => In::PubAck(a.pkid),
        v4::Packet::PubRec(a) => In::PubRec(a.pkid),
        v4::Packet::PubRel(a) => In::PubRel(a.pkid),
        v4::Packet::PubComp(a) => In::PubComp(a.pkid),
        v4::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .iter()
                .map(|f| Subscription::new(&f.path, f.qos))
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => In::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => In::PingReq,
        v4::Packet::Disconnect => In::Disconnect { will: false },
        v4::Packet::Connect(_) => In::Unexpected("CONNECT"),
        _ => In::Unexpected("a server-to-client packet"),
    }
}

fn from_v5(p: v5::Packet) -> In {
    match p {
        v5::Packet::Publish(p) => {
            let alias = p
                .properties
                .as_ref()
                .is_some_and(|pr| pr.topic_alias.is_some());
            In::Publish {
                message: Message {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: own(p.payload),
                    qos: v4_qos(p.qos),
                    retain: p.retain,
                    origin: None,
                },
                pkid: p.pkid,
                dup: p.dup,
                alias,
                props: p.properties,
            }
        }
        v5::Packet::PubAck(a) => In::PubAck(a.pkid),
        v5::Packet::PubRec(a) => In::PubRec(a.pkid),
        v5::Packet::PubRel(a) => In::PubRel(a.pkid),
        v5::Packet::PubComp(a) => In::PubComp(a.pkid),
        v5::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(subscription).collect(),
        },
        v5::Packet::Unsubscribe(u) => In::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => In::PingReq,
        v5::Packet::Disconnect(d) => In::Disconnect {
            will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage,
        },
        v5::Packet::Connect(..) => In::Unexpected("CONNECT"),
        v5::Packet::Auth(_) => In::Unexpected("AUTH"),
        _ => In::Unexpected("a server-to-client packet"),
    }
}

/// Appends `out` to `buf`. Encoding our own packets cannot fail but for size, which callers
/// check against the client's limit before; an error drops the packet.
pub fn write(proto: Proto, out: &Out, buf: &mut BytesMut) {
    let r = match proto {
        Proto::V4 => to_v4(out).map(|p| p.write(buf, usize::MAX).map(|_| ()).map_err(malformed)),
        Proto::V5 => to_v5(out).map(|p| p.write(buf, None).map(|_| ()).map_err(malformed)),
    };
    if let Some(Err(e)) = r {
        tracing::warn!(error = %e, "MQTT packet not encoded");
    }
}

/// The encoded size of a PUBLISH, at most (to check a client's Maximum Packet Size).
pub fn publish_size(proto: Proto, message: &Message) -> usize {
    // Fixed header (at most 5) + topic (2 + len) + packet id (2), and for MQTT 5 the
    // properties' length (at most 4) and the properties.
    let base = 5 + 2 + message.topic.len() + 2 + message.payload.len();
    match (
        proto,
        message.origin.as_ref().and_then(|o| o.props.as_ref()),
    ) {
        (Proto::V4, _) => base,
        (Proto::V5, None) => base + 1,
        (Proto::V5, Some(p)) => base + 4 + props_size(p),
    }
}

/// The encoded size of publish properties (each: one identifier byte and its value).
fn props_size(p: &v5::PublishProperties) -> usize {
    let string = |s: &Option<String>| s.as_ref().map_or(0, |s| 3 + s.len());
    p.payload_format_indicator.map_or(0, |_| 2)
        + p.message_expiry_interval.map_or(0, |_| 5)
        + string(&p.response_topic)
        + p.correlation_data.as_ref().map_or(0, |d| 3 + d.len())
        + string(&p.content_type)
        + p.user_properties
            .iter()
            .map(|(k, v)| 5 + k.len() + v.len())
            .sum::<usize>()
}

fn to_v4(out: &Out) -> Option<v4::Packet> {
    Some(match out {
        Out::ConnAck {
            reason,
            session_present,
            ..
        } => v4::Packet::ConnAck(v4::ConnAck::new(
            match reason {
                Reason::Success => v4::ConnectReturnCode::Success,
                Reason::BadUserNamePassword => v4::ConnectReturnCode::BadUserNamePassword,
                Reason::ServerUnavailable | Reason::ServerShuttingDown | Reason::QuotaExceeded => {
                    v4::ConnectReturnCode::ServiceUnavailable
                }
                Reason::ClientIdentifierNotValid => v4::ConnectReturnCode::BadClientId,
                _ => v4::ConnectReturnCode::NotAuthorized,
            },
            *session_present,
        )),
        // 3.1.1 has no refusal in PUBACK: the message is acked (and dead-lettered).
        Out::PubAck(pkid, _) => v4::Packet::PubAck(v4::PubAck::new(*pkid)),
        Out::PubRec(pkid, _) => v4::Packet::PubRec(v4::PubRec::new(*pkid)),
        Out::PubRel(pkid) => v4::Packet::PubRel(v4::PubRel::new(*pkid)),
        Out::PubComp(pkid) => v4::Packet::PubComp(v4::PubComp::new(*pkid)),
        Out::Publish { message, pkid, dup } => v4::Packet::Publish(v4::Publish {
            dup: *dup,
            qos: message.qos,
            retain: message.retain,
            topic: message.topic.clone(),
            pkid: *pkid,
            payload: message.payload.clone(),
        }),
        Out::SubAck { pkid, granted, .. } => v4::Packet::SubAck(v4::SubAck::new(
            *pkid,
            granted
                .iter()
                .map(|g| match g {
                    Ok(q) => v4::SubscribeReasonCode::Success(*q),
                    Err(_) => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Out::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(*pkid)),
        Out::PingResp => v4::Packet::PingResp,
        // 3.1.1 has no server DISCONNECT: the connection is just closed.
        Out::Disconnect(_) => return None,
    })
}

/// The MQTT 5 CONNACK reason code of a refusal (or success).
fn connack_code(reason: Reason) -> v5::ConnectReturnCode {
    use v5::ConnectReturnCode as C;
    match reason {
        Reason::Success => C::Success,
        Reason::BadUserNamePassword => C::BadUserNamePassword,
        Reason::ServerUnavailable => C::ServerUnavailable,
        Reason::ServerShuttingDown => C::ServerUnavailable,
        Reason::QuotaExceeded => C::QuotaExceeded,
        Reason::ClientIdentifierNotValid => C::ClientIdentifierNotValid,
        Reason::MalformedPacket => C::MalformedPacket,
        Reason::PacketTooLarge => C::PacketTooLarge,
        _ => C::NotAuthorized,
    }
}

fn to_v5(out: &Out) -> Option<v5::Packet> {
    Some(match out {
        Out::ConnAck {
            reason,
            session_present,
            receive_maximum,
            max_packet,
            assigned_id,
        } => v5::Packet::ConnAck(v5::ConnAck {
            session_present: *session_present,
            code: connack_code(*reason),
            properties: (*reason == Reason::Success).then(|| v5::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: Some(*receive_maximum),
                max_qos: None,
                retain_available: Some(1),
                max_packet_size: Some(*max_packet),
                assigned_client_identifier: assigned_id.clone(),
                topic_alias_max: Some(0),
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: Some(1),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            }),
        }),
        Out::PubAck(pkid, reason) => {
            let mut a = v5::PubAck::new(*pkid, None);
            a.reason = match reason {
                Reason::NotAuthorized => v5::PubAckReason::NotAuthorized,
                Reason::PayloadFormatInvalid => v5::PubAckReason::PayloadFormatInvalid,
                _ => v5::PubAckReason::Success,
            };
            v5::Packet::PubAck(a)
        }
        Out::PubRec(pkid, reason) => {
            let mut a = v5::PubRec::new(*pkid, None);
            a.reason = match reason {
                Reason::NotAuthorized => v5::PubRecReason::NotAuthorized,
                Reason::PayloadFormatInvalid => v5::PubRecReason::PayloadFormatInvalid,
                _ => v5::PubRecReason::Success,
            };
            v5::Packet::PubRec(a)
        }
        Out::PubRel(pkid) => v5::Packet::PubRel(v5::PubRel::new(*pkid, None)),
        Out::PubComp(pkid) => v5::Packet::PubComp(v5::PubComp::new(*pkid, None)),
        Out::Publish { message, pkid, dup } => v5::Packet::Publish(v5::Publish {
            dup: *dup,
            qos: v5_qos(message.qos),
            retain: message.retain,
            topic: Bytes::copy_from_slice(message.topic.as_bytes()),
            pkid: *pkid,
            payload: message.payload.clone(),
            properties: message
                .origin
                .as_ref()
                .and_then(|o| o.props_at(Instant::now())),
        }),
        Out::SubAck { pkid, granted } => v5::Packet::SubAck(v5::SubAck {
            pkid: *pkid,
            return_codes: granted
                .iter()
                .map(|g| match g {
                    Ok(q) => v5::SubscribeReasonCode::Success(v5_qos(*q)),
                    Err(Reason::TopicFilterInvalid) => v5::SubscribeReasonCode::TopicFilterInvalid,
                    Err(Reason::SharedSubscriptionsNotSupported) => {
                        v5::SubscribeReasonCode::SharedSubscriptionsNotSupported
                    }
                    Err(_) => v5::SubscribeReasonCode::NotAuthorized,
                })
                .collect(),
            properties: None,
        }),
        Out::UnsubAck { pkid, found } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid: *pkid,
            reasons: found
                .iter()
                .map(|f| match f {
                    true => v5::UnsubAckReason::Success,
                    false => v5::UnsubAckReason::NoSubscriptionExisted,
                })
                .collect(),
            properties: None,
        }),
        Out::PingResp => v5::Packet::PingResp(v5::PingResp),
        Out::Disconnect(reason) => {
            use v5::DisconnectReasonCode as D;
            v5::Packet::Disconnect(v5::Disconnect::new(match reason {
                Reason::MalformedPacket => D::MalformedPacket,
                Reason::ProtocolError => D::ProtocolError,
                Reason::PacketTooLarge => D::PacketTooLarge,
                Reason::ReceiveMaximumExceeded => D::ReceiveMaximumExceeded,
                Reason::KeepAliveTimeout => D::KeepAliveTimeout,
                Reason::SessionTakenOver => D::SessionTakenOver,
                Reason::ServerShuttingDown => D::ServerShuttingDown,
                Reason::NotAuthorized => D::NotAuthorized,
                Reason::QuotaExceeded => D::QuotaExceeded,
                Reason::TopicAliasInvalid => D::TopicAliasInvalid,
                Reason::PayloadFormatInvalid => D::PayloadFormatInvalid,
                Reason::TopicFilterInvalid => D::TopicFilterInvalid,
                _ => D::AdministrativeAction,
            }))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v5_connect_is_read_by_the_v5_codec_and_a_v4_connect_by_the_v4_codec() {
        let mut buf = BytesMut::new();
        let mut c = v5::Connect {
            keep_alive: 30,
            client_id: "dev-1".into(),
            clean_start: false,
            properties: Some(v5::ConnectProperties {
                session_expiry_interval: Some(3600),
                receive_maximum: Some(20),
                ..v5::ConnectProperties::new()
            }),
        };
        v5::Packet::Connect(c.clone(), None, Some(v5::Login::new("m", "zsm_x")))
            .write(&mut buf, None)
            .unwrap();
        let read = read_connect(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(read.proto, Proto::V5);
        assert_eq!(read.client_id, "dev-1");
        assert_eq!(read.password.as_deref(), Some("zsm_x"));
        assert_eq!(read.session_expiry, 3600);
        assert_eq!(read.receive_maximum, Some(20));
        assert!(buf.is_empty());

        c.client_id = "dev-2".into();
        let mut v4c = v4::Connect::new("dev-2");
        v4c.set_login("m", "zeq_ak_y");
        v4::Packet::Connect(v4c).write(&mut buf, 1024).unwrap();
        // Incomplete frames wait for more bytes.
        let mut head = buf.split_to(5);
        assert!(read_connect(&mut head, 1024).unwrap().is_none());
        head.unsplit(buf);
        let read = read_connect(&mut head, 1024).unwrap().unwrap();
        assert_eq!(read.proto, Proto::V4);
        assert_eq!(read.password.as_deref(), Some("zeq_ak_y"));
    }

    #[test]
    fn the_first_packet_must_be_a_connect_within_the_size_limit() {
        let mut buf = BytesMut::from(&[0xC0u8, 0][..]); // PINGREQ
        assert!(matches!(
            read_connect(&mut buf, 1024),
            Err(DecodeError::Malformed(_))
        ));
        let mut big = BytesMut::new();
        let mut c = v4::Connect::new("x".repeat(2000));
        c.keep_alive = 5;
        v4::Packet::Connect(c).write(&mut big, 1 << 20).unwrap();
        assert!(matches!(
            read_connect(&mut big, 1024),
            Err(DecodeError::TooLarge(1024))
        ));
        let mut mqtt31 = BytesMut::from(&b"\x10\x0e\x00\x06MQIsdp\x03\x02\x00\x3c\x00\x00"[..]);
        assert!(matches!(
            read_connect(&mut mqtt31, 1024),
            Err(DecodeError::Protocol(3))
        ));
    }

    #[test]
    fn a_v5_disconnect_without_a_reason_code_is_a_normal_disconnect() {
        let mut buf = BytesMut::from(&[0xE0u8, 0][..]);
        assert!(matches!(
            read(Proto::V5, &mut buf, 1024),
            Ok(Some(In::Disconnect { will: false }))
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn refusals_keep_their_meaning_in_both_versions() {
        let refuse = Out::ConnAck {
            reason: Reason::NotAuthorized,
            session_present: false,
            receive_maximum: 10,
            max_packet: 1024,
            assigned_id: None,
        };
        let mut buf = BytesMut::new();
        write(Proto::V4, &refuse, &mut buf);
        assert_eq!(&buf[..], &[0x20, 2, 0, 5]);
        buf.clear();
        write(Proto::V5, &refuse, &mut buf);
        assert_eq!(&buf[..4], &[0x20, 3, 0, 0x87]);
        buf.clear();
        write(Proto::V5, &Out::PubAck(7, Reason::NotAuthorized), &mut buf);
        match v5::Packet::read(&mut buf, None).unwrap() {
            v5::Packet::PubAck(a) => {
                assert_eq!(a.pkid, 7);
                assert_eq!(a.reason, v5::PubAckReason::NotAuthorized);
            }
            other => panic!("{other:?}"),
        }
    }
}
