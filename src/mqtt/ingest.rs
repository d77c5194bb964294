//! Applying a batch of MQTT messages inside one write transaction.
//!
//! Each message becomes one of: one statechart step (`instances::send_event`, with its
//! `transition` row), a dead letter, or — for a redelivery of a message already committed — a
//! duplicate that changes nothing. Every non-duplicate QoS 1 or 2 message also records
//! `(client id, packet id) → SHA-256(topic ‖ 0x00 ‖ payload) ‖ batch tag` in [`INFLIGHT`], in
//! the same transaction, which is what lets a redelivery after a crash be recognised (module
//! doc of `mqtt`, "What an ack means"). Entries are removed by [`forget`] when the sender can
//! no longer redeliver them (the tag tells that delivery from a later one reusing the packet
//! id), so the table holds about one window per client.
//!
//! Per-message failures never fail the batch: `send_event` and `create_instance` write nothing
//! when they fail, so the message is dead-lettered and the batch goes on. Only store errors
//! abort the batch; the caller then retries it with every message marked as redelivered.

use std::sync::Arc;

use bytes::Bytes;
use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::topic;
use crate::auth::Slug;
use crate::chart::{ErrorKind, Event};
use crate::instances::{self, Charts, InstanceError};
use crate::store::{self, StoreError};

/// (client id, packet id) → SHA-256(topic ‖ 0x00 ‖ payload) ‖ tag (u64 LE) of the batch that
/// committed the message, for deliveries whose PUBACK the broker has not confirmed yet.
pub const INFLIGHT: TableDefinition<(&str, u16), &[u8]> = TableDefinition::new("mqtt_inflight");
/// (machine slug or "" for the gateway, n) → [`DeadLetter`].
pub const DEAD_LETTERS: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("mqtt_dead_letters");
/// machine slug or "" → the next dead-letter number.
pub const DEAD_LETTER_NEXT: TableDefinition<&str, u64> =
    TableDefinition::new("mqtt_dead_letter_next");
/// Key in `store::META` of the birth sequence (bdSeq) of the ingest connection.
const BIRTH_KEY: &str = "mqtt_bd_seq";
/// The 41st byte of an [`INFLIGHT`] value of a QoS 2 delivery not yet released by PUBREL.
const QOS2_PENDING: u8 = 2;
/// Bytes of a dead letter's payload that are kept.
pub const KEPT_PAYLOAD: usize = 1024;

/// The authorizers' `auth` for MQTT messages, and the log's actor.
pub fn auth() -> Value {
    json!({"sub": "mqtt", "role": "operator"})
}
pub const ACTOR: &str = "mqtt";

pub struct Message {
    /// The MQTT client id the message came from: with the packet id, the key of its
    /// [`INFLIGHT`] entry.
    pub client: Arc<str>,
    /// Topic and payload are fixed at [`Message::new`]: the hash and data are derived from them.
    topic: String,
    payload: Bytes,
    pub pkid: u16,
    pub dup: bool,
    /// [`content_hash`] of topic and payload.
    hash: [u8; 32],
    /// The payload as event data, or why it cannot be: (dead-letter reason, message).
    data: Result<Value, (&'static str, String)>,
    /// Dead-lettered whatever it says ([`Message::refused`]).
    refused: bool,
    /// Published at QoS 2 ([`Message::exactly_once`]).
    qos2: bool,
}

/// What it takes to build a message again: a batch whose commit failed is applied again,
/// every message as a redelivery, and the dedup table decides.
#[derive(Clone)]
pub struct Raw {
    client: Arc<str>,
    topic: String,
    payload: Bytes,
    pkid: u16,
    refused: Option<(&'static str, String)>,
    qos2: bool,
}

impl Raw {
    pub fn redelivery(self, max_payload: usize) -> Message {
        let (client, topic, payload, pkid) = (self.client, self.topic, self.payload, self.pkid);
        let m = match self.refused {
            Some(why) => Message::refused(client, topic, payload, pkid, true, why),
            None => Message::new(client, topic, payload, pkid, true, max_payload),
        };
        Message {
            qos2: self.qos2,
            ..m
        }
    }
}

impl Message {
    /// A received message, with the work that needs no transaction done here, before the
    /// batch reaches the writer thread: the content hash, the size check and the JSON parse.
    pub fn new(
        client: Arc<str>,
        topic: String,
        payload: Bytes,
        pkid: u16,
        dup: bool,
        max_payload: usize,
    ) -> Message {
        let hash = content_hash(&topic, &payload);
        let data = event_data(&payload, max_payload);
        Message {
            client,
            topic,
            payload,
            pkid,
            dup,
            hash,
            data,
            refused: false,
            qos2: false,
        }
    }

    /// Marks a QoS 2 publish. Until its PUBREL, its entry answers every PUBLISH of the session
    /// with the same packet id as this message, DUP flag or not (MQTT 3.1.1 §4.3.3, 5.0
    /// §4.3.3): a client resends a QoS 2 message after a reconnect, and paho-mqtt, for one,
    /// sometimes does so without DUP.
    pub fn exactly_once(mut self) -> Message {
        self.qos2 = true;
        self
    }

    pub fn raw(&self) -> Raw {
        Raw {
            client: self.client.clone(),
            topic: self.topic.clone(),
            payload: self.payload.clone(),
            pkid: self.pkid,
            refused: match &self.data {
                Err(why) if self.refused => Some(why.clone()),
                _ => None,
            },
            qos2: self.qos2,
        }
    }

    /// A message that is dead-lettered whatever its topic and payload say, for `reason`
    /// (a publish the sender's key does not allow, say); it still takes its packet id's entry,
    /// so that a redelivery is not filed twice.
    pub fn refused(
        client: Arc<str>,
        topic: String,
        payload: Bytes,
        pkid: u16,
        dup: bool,
        (reason, message): (&'static str, String),
    ) -> Message {
        Message {
            data: Err((reason, message)),
            refused: true,
            ..Message::new(client, topic, payload, pkid, dup, usize::MAX)
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }
}

/// A payload as event data: a JSON object, or `{}` for an empty (or blank) payload.
fn event_data(payload: &[u8], max_payload: usize) -> Result<Value, (&'static str, String)> {
    if payload.len() > max_payload {
        return Err((
            "oversize",
            format!(
                "the payload is {} bytes; the limit is {max_payload}",
                payload.len()
            ),
        ));
    }
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    match serde_json::from_slice::<Value>(payload) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(("invalid_json", "the payload must be a JSON object".into())),
        Err(e) => Err((
            "invalid_json",
            format!("the payload is not valid JSON: {e}"),
        )),
    }
}

pub struct Rules {
    pub prefix: String,
    pub client_id: String,
    pub max_payload: usize,
    pub dead_letter_cap: u64,
}

pub enum Outcome {
    /// A committed step: what is published and run after the commit (the rest of the step's
    /// result is dropped on the writer thread, so that batches waiting for their acks hold
    /// no more than this).
    Applied {
        machine: String,
        instance: String,
        view: Value,
        effects: Vec<crate::chart::Effect>,
    },
    /// A redelivery of the message committed by the batch with this tag: acked, not applied.
    Duplicate(u64),
    Dead(&'static str),
}

impl Outcome {
    /// The tag of the [`INFLIGHT`] entry that this message's PUBACK settles: `tag` of the
    /// batch, or the original batch's for a duplicate. None for QoS 0 (no packet id).
    pub fn entry_tag(&self, pkid: u16, tag: u64) -> Option<u64> {
        match self {
            _ if pkid == 0 => None,
            Outcome::Duplicate(t) => Some(*t),
            _ => Some(tag),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub topic: String,
    /// The first [`KEPT_PAYLOAD`] bytes.
    pub payload: Vec<u8>,
    pub payload_len: u64,
    pub reason: String,
    pub message: String,
    pub ts_ms: i64,
}

pub fn content_hash(topic: &str, payload: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(topic.as_bytes());
    h.update([0u8]);
    h.update(payload);
    h.finalize().into()
}

/// Applies `batch` in `txn`, in order; one outcome per message. `tag` names this batch in the
/// [`INFLIGHT`] entries it writes (unique per batch; a random number will do). Messages with
/// packet id 0 (QoS 0) are never redelivered and leave no entry. Each message's event data is
/// taken: a batch is applied once (a retry builds its messages again).
///
/// Most of the cost of a step is B-tree pages: with thousands of instances, the messages of a
/// batch address instance rows (and history runs) all over their tables. So the rows the batch
/// addresses are read ahead in key order, each instance is stepped in memory, and its row is
/// written once, after its last step, with the rows of the batch in key order (likewise the
/// history runs): each leaf is read and copied once per batch, not once per message. The
/// batch is applied in segments (normally the whole batch is one): for each, the messages are
/// planned (their instances and charts loaded), then stepped and written in message order,
/// then the instance rows are written. The outcome and every row written are the same as
/// applying one message after the other. A message that needs the tables in between (its
/// instance must be created or cannot be prepared, or its packet id already occurs in the
/// segment) ends the segment and is applied alone.
pub fn apply(
    txn: &WriteTransaction,
    charts: &Charts,
    rules: &Rules,
    batch: &mut [Message],
    tag: u64,
    now_ms: i64,
) -> Result<Vec<Outcome>, StoreError> {
    let mut out = Vec::with_capacity(batch.len());
    // Only this function touches INFLIGHT inside the batch, so it stays open for the whole
    // batch instead of being opened twice per message.
    let inflight = txn.open_table(INFLIGHT)?;
    // The instance and log tables likewise stay open for the whole batch.
    let mut w = Writing {
        txn,
        rules,
        inflight,
        steps: instances::Steps::open(txn)?,
        entry: [0u8; 41],
        now_ms,
        read_ahead: Default::default(),
    };
    w.steps.defer_runs();
    w.read_ahead(batch)?;
    w.entry[32..40].copy_from_slice(&tag.to_le_bytes());
    w.entry[40] = QOS2_PENDING;
    let mut machines = Machines::default();
    let mut segment = Segment::default();
    let auth = auth();
    for i in 0..batch.len() {
        let m = &mut batch[i];
        // A packet id met twice: the later delivery must see the entry the earlier one writes.
        if m.pkid != 0 && !segment.pkids.insert((m.client.clone(), m.pkid)) {
            segment.flush(&mut w, batch, &auth, &mut out)?;
            segment
                .pkids
                .insert((batch[i].client.clone(), batch[i].pkid));
        }
        let m = &mut batch[i];
        if (m.dup || m.qos2) && m.pkid != 0 {
            let seen = w.inflight.get((&*m.client, m.pkid))?.and_then(|v| {
                let v = v.value();
                let pending_qos2 = m.qos2 && v.get(40) == Some(&QOS2_PENDING);
                let same = m.dup && v.len() >= 32 && v[..32] == m.hash;
                (pending_qos2 || same).then(|| stored_tag(v))
            });
            if let Some(original) = seen {
                segment.plan.push((i, Planned::Duplicate(original)));
                continue;
            }
        }
        if let Some(planned) = segment.plan(&mut w, charts, &mut machines, m)? {
            segment.plan.push((i, planned));
            continue;
        }
        // Applied alone, after everything before it.
        segment.flush(&mut w, batch, &auth, &mut out)?;
        let m = &mut batch[i];
        let outcome = match route(txn, &mut w.steps, charts, rules, &mut machines, m, now_ms)? {
            Ok(o) => o,
            Err(refusal) => w.refuse(m, refusal)?,
        };
        w.settle(m, outcome, &mut out)?;
    }
    segment.flush(&mut w, batch, &auth, &mut out)?;
    w.steps.finish()?;
    Ok(out)
}

/// The open tables and fixed inputs of one [`apply`].
struct Writing<'a, 'txn> {
    txn: &'txn WriteTransaction,
    rules: &'a Rules,
    inflight: redb::Table<'txn, (&'static str, u16), &'static [u8]>,
    steps: instances::Steps<'txn>,
    /// The [`INFLIGHT`] value being built: hash ‖ tag.
    entry: [u8; 41],
    now_ms: i64,
    /// The instance rows the batch addresses, read in key order before it is applied; each
    /// is taken by the first segment that steps its instance.
    read_ahead: std::collections::HashMap<(String, String), instances::Instance>,
}

impl Writing<'_, '_> {
    /// Reads the rows of the instances that `batch` addresses, in key order: the batch's
    /// messages address instances in no order, and one pass along the table reads each leaf
    /// once instead of once per message.
    fn read_ahead(&mut self, batch: &[Message]) -> Result<(), StoreError> {
        let keys: std::collections::BTreeSet<(Slug, &str)> = batch
            .iter()
            .filter_map(|m| topic::parse(&self.rules.prefix, &m.topic).ok())
            .map(|t| (t.machine, t.instance))
            .collect();
        for (machine, slug) in keys {
            if let Some(instance) = self.steps.instance(&machine, slug)? {
                self.read_ahead
                    .insert((machine.to_string(), slug.to_owned()), instance);
            }
        }
        Ok(())
    }

    /// Files `m` as a dead letter.
    fn refuse(
        &mut self,
        m: &Message,
        (machine, reason, message): Refusal,
    ) -> Result<Outcome, StoreError> {
        dead_letter(
            self.txn,
            self.rules,
            machine,
            m,
            reason,
            &message,
            self.now_ms,
        )?;
        Ok(Outcome::Dead(reason))
    }

    /// Records `m`'s delivery in [`INFLIGHT`] (unless it is a duplicate) and its outcome.
    fn settle(
        &mut self,
        m: &Message,
        outcome: Outcome,
        out: &mut Vec<Outcome>,
    ) -> Result<(), StoreError> {
        if m.pkid != 0 && !matches!(outcome, Outcome::Duplicate(_)) {
            self.entry[..32].copy_from_slice(&m.hash);
            // QoS 1 entries are hash ‖ tag; QoS 2 ones carry a marker until their PUBREL.
            let len = if m.qos2 { 41 } else { 40 };
            self.inflight
                .insert((&*m.client, m.pkid), &self.entry[..len])?;
        }
        out.push(outcome);
        Ok(())
    }
}

/// What one message of a segment does.
enum Planned {
    Duplicate(u64),
    Refused(Refusal),
    /// An event for this run.
    Step(usize, Event),
}

/// One instance's events in a segment.
struct Run {
    instance: instances::Instance,
    prepared: instances::Prepared,
    /// A step was recorded: the instance row is to be written.
    stepped: bool,
}

/// Messages planned but not yet written (see [`apply`]).
#[derive(Default)]
struct Segment {
    /// (message index, plan), in message order.
    plan: Vec<(usize, Planned)>,
    runs: Vec<Run>,
    /// (machine, instance) → index in `runs`.
    index: std::collections::HashMap<(String, String), usize>,
    pkids: std::collections::HashSet<(Arc<str>, u16)>,
}

impl Segment {
    /// Plans `m` (not a duplicate); None when it must be applied alone.
    fn plan(
        &mut self,
        w: &mut Writing,
        charts: &Charts,
        machines: &mut Machines,
        m: &mut Message,
    ) -> Result<Option<Planned>, StoreError> {
        let t = match parse(w.txn, &w.rules.prefix, machines, &m.topic)? {
            Ok(t) => t,
            Err(refusal) => return Ok(Some(Planned::Refused(refusal))),
        };
        if let Err((reason, message)) = &m.data {
            let refusal = (t.machine.to_string(), *reason, message.clone());
            return Ok(Some(Planned::Refused(refusal)));
        }
        let key = (t.machine.to_string(), t.instance.to_owned());
        let run = match self.index.get(&key) {
            Some(&r) => r,
            None => {
                let instance = match w.read_ahead.remove(&key) {
                    Some(i) => i,
                    None => match w.steps.instance(&t.machine, t.instance)? {
                        Some(i) => i,
                        None => return Ok(None),
                    },
                };
                let Ok(prepared) = w.steps.prepare(charts, &instance) else {
                    return Ok(None);
                };
                self.runs.push(Run {
                    instance,
                    prepared,
                    stepped: false,
                });
                self.index.insert(key, self.runs.len() - 1);
                self.runs.len() - 1
            }
        };
        let data = std::mem::replace(&mut m.data, Ok(Value::Null)).unwrap_or_default();
        Ok(Some(Planned::Step(run, Event::new(t.event, data))))
    }

    /// Steps and writes every planned message, in order, then the stepped instances' rows;
    /// empties `self`.
    fn flush(
        &mut self,
        w: &mut Writing,
        batch: &[Message],
        auth: &Value,
        out: &mut Vec<Outcome>,
    ) -> Result<(), StoreError> {
        for (i, planned) in self.plan.drain(..) {
            let m = &batch[i];
            let outcome = match planned {
                Planned::Duplicate(t) => Outcome::Duplicate(t),
                Planned::Refused(refusal) => w.refuse(m, refusal)?,
                Planned::Step(r, event) => {
                    let run = &mut self.runs[r];
                    let recorded = (run.prepared)
                        .step(event, auth, ACTOR, w.now_ms)
                        .and_then(|s| w.steps.record_unwritten(&mut run.instance, s, w.now_ms));
                    run.stepped |= recorded.is_ok();
                    let machine = run.instance.machine.clone();
                    match recorded {
                        Ok((view, effects)) => Outcome::Applied {
                            machine,
                            instance: run.instance.slug.clone(),
                            view,
                            effects,
                        },
                        Err(e) => {
                            let (reason, message) = refusal(e)?;
                            w.refuse(m, (machine, reason, message))?
                        }
                    }
                }
            };
            w.settle(m, outcome, out)?;
        }
        // Each stepped instance's row once, in key order: one pass along the table.
        let mut stepped: Vec<&instances::Instance> = (self.runs.iter())
            .filter(|r| r.stepped)
            .map(|r| &r.instance)
            .collect();
        stepped.sort_unstable_by(|a, b| (&a.machine, &a.slug).cmp(&(&b.machine, &b.slug)));
        for instance in stepped {
            w.steps.put(instance)?;
        }
        w.steps.write_deferred()?;
        self.runs.clear();
        self.index.clear();
        self.pkids.clear();
        Ok(())
    }
}

/// One batch transaction as the batcher runs it: [`apply`] the messages, then [`forget`] the
/// entries that arrived with them. In that order: an entry to forget can belong to the first
/// copy of a message whose resent copy (after a reconnect) is in this very batch, and that copy
/// must still find its entry.
pub fn apply_then_forget(
    txn: &WriteTransaction,
    charts: &Charts,
    rules: &Rules,
    batch: &mut [Message],
    tag: u64,
    settled: &[Forget],
    now_ms: i64,
) -> Result<Vec<Outcome>, StoreError> {
    let outcomes = apply(txn, charts, rules, batch, tag, now_ms)?;
    forget(txn, settled)?;
    Ok(outcomes)
}

/// [`INFLIGHT`] entries that are no longer needed.
#[derive(Debug, Clone)]
pub enum Forget {
    /// The delivery of (client, packet id) committed by the batch with this tag: the sender
    /// will not send it again (tag 0: whichever delivery the entry holds).
    Delivery(Arc<str>, u16, u64),
    /// Every entry of a client that started a clean session: it resends nothing.
    Client(Arc<str>),
}

/// Which machines exist, looked up once per batch: machines are not created or deleted
/// inside an MQTT batch (the batch is one request of the group commit, run alone).
#[derive(Default)]
struct Machines {
    known: std::collections::HashMap<String, bool>,
}

impl Machines {
    fn exists(&mut self, txn: &WriteTransaction, slug: &str) -> Result<bool, StoreError> {
        if let Some(&e) = self.known.get(slug) {
            return Ok(e);
        }
        let e = txn.open_table(store::MACHINES)?.get(slug)?.is_some();
        self.known.insert(slug.to_owned(), e);
        Ok(e)
    }
}

/// The batch tag of an [`INFLIGHT`] value (0 for entries written before tags existed).
fn stored_tag(v: &[u8]) -> u64 {
    v.get(32..40)
        .and_then(|t| t.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// Removes [`INFLIGHT`] entries. An entry since rewritten by a later delivery of the same packet
/// id (another tag) stays: that later message may still be redelivered.
pub fn forget(txn: &WriteTransaction, settled: &[Forget]) -> Result<(), StoreError> {
    if settled.is_empty() {
        return Ok(());
    }
    let mut t = txn.open_table(INFLIGHT)?;
    for f in settled {
        match f {
            Forget::Delivery(client, pkid, tag) => {
                let same = t
                    .get((&**client, *pkid))?
                    .is_some_and(|v| *tag == 0 || stored_tag(v.value()) == *tag);
                if same {
                    t.remove((&**client, *pkid))?;
                }
            }
            Forget::Client(client) => {
                t.retain_in::<(&str, u16), _>((&**client, 0)..=(&**client, u16::MAX), |_, _| {
                    false
                })?;
            }
        }
    }
    Ok(())
}

/// (machine to file the dead letter under, reason code, message).
type Refusal = (String, &'static str, String);

fn route(
    txn: &WriteTransaction,
    steps: &mut instances::Steps,
    charts: &Charts,
    rules: &Rules,
    machines: &mut Machines,
    m: &mut Message,
    now_ms: i64,
) -> Result<Result<Outcome, Refusal>, StoreError> {
    let t = match parse(txn, &rules.prefix, machines, &m.topic)? {
        Ok(t) => t,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let refuse = |reason, message: String| Ok(Err((t.machine.to_string(), reason, message)));
    let data = match std::mem::replace(&mut m.data, Ok(Value::Null)) {
        Ok(data) => data,
        Err((reason, message)) => return refuse(reason, message),
    };
    let auth = auth();
    let event = Event::new(t.event, data);
    let refused = |e| refusal(e).map(|(r, msg)| Err((t.machine.to_string(), r, msg)));
    // The common case first: the instance exists. `send_event` writes nothing when it fails,
    // so a missing instance costs one failed lookup before it is created.
    let sent = match send(steps, charts, &t, event.clone(), &auth, now_ms) {
        Err(InstanceError::NotFound(_)) if steps.instance(&t.machine, t.instance)?.is_none() => {
            let meta: instances::ChartMeta =
                match txn.open_table(instances::CHARTS)?.get(t.machine.as_str())? {
                    Some(v) => store::decode(v.value())?,
                    None => Default::default(),
                };
            if !meta.auto_create_instances {
                return refuse(
                    "unknown_instance",
                    format!(
                        "no instance `{}`, and the machine does not auto-create instances",
                        t.instance
                    ),
                );
            }
            if let Err(e) = steps.create_instance(
                charts,
                &t.machine,
                t.instance,
                Value::Null,
                None,
                &auth,
                ACTOR,
                now_ms,
            ) {
                return refused(e);
            }
            send(steps, charts, &t, event, &auth, now_ms)
        }
        other => other,
    };
    match sent {
        Ok(sent) => Ok(Ok(Outcome::Applied {
            machine: t.machine.to_string(),
            instance: sent.instance.slug,
            view: sent.view,
            effects: sent.effects,
        })),
        Err(e) => refused(e),
    }
}

/// The device topic of a message to a machine on this gateway, or why it is not one.
fn parse<'t>(
    txn: &WriteTransaction,
    prefix: &str,
    machines: &mut Machines,
    topic: &'t str,
) -> Result<Result<topic::DeviceTopic<'t>, Refusal>, StoreError> {
    let t = match topic::parse(prefix, topic) {
        Ok(t) => t,
        Err(u) => {
            let machine = u
                .machine
                .filter(|s| machines.exists(txn, s).unwrap_or(false))
                .map(String::from)
                .unwrap_or_default();
            return Ok(Err((machine, "unknown_topic", u.why.into())));
        }
    };
    if !machines.exists(txn, &t.machine)? {
        return Ok(Err((
            String::new(),
            "unknown_machine",
            format!("no machine `{}` on this gateway", t.machine),
        )));
    }
    Ok(Ok(t))
}

fn send(
    steps: &mut instances::Steps,
    charts: &Charts,
    t: &topic::DeviceTopic,
    event: Event,
    auth: &Value,
    now_ms: i64,
) -> Result<instances::Sent, InstanceError> {
    steps.send_event(charts, &t.machine, t.instance, event, auth, ACTOR, now_ms)
}

/// The dead-letter reason of a failed step; store errors abort the batch instead.
fn refusal(e: InstanceError) -> Result<(&'static str, String), StoreError> {
    let reason = match &e {
        InstanceError::Store(s) => return Err(s.clone()),
        InstanceError::Rejected(_) | InstanceError::MissingScope(_) => "rejected_by_authorizer",
        InstanceError::NotFound(_) => "unknown_instance",
        InstanceError::Conflict(_) => "instance_paused",
        InstanceError::Invalid { .. } => "invalid_event",
        InstanceError::NoMigrationPath(_) => "transition_failed",
        InstanceError::Chart(c) if c.kind == ErrorKind::Input => "invalid_event",
        InstanceError::Chart(_) => "transition_failed",
    };
    Ok((reason, e.to_string()))
}

fn dead_letter(
    txn: &WriteTransaction,
    rules: &Rules,
    machine: String,
    m: &Message,
    reason: &'static str,
    message: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    let mut next = txn.open_table(DEAD_LETTER_NEXT)?;
    let n = next.get(machine.as_str())?.map(|v| v.value()).unwrap_or(0);
    next.insert(machine.as_str(), n + 1)?;
    let letter = DeadLetter {
        topic: m.topic.chars().take(512).collect(),
        payload: m.payload[..m.payload.len().min(KEPT_PAYLOAD)].to_vec(),
        payload_len: m.payload.len() as u64,
        reason: reason.into(),
        message: message.chars().take(512).collect(),
        ts_ms: now_ms,
    };
    let mut t = txn.open_table(DEAD_LETTERS)?;
    t.insert((machine.as_str(), n), store::encode(&letter).as_slice())?;
    if n >= rules.dead_letter_cap {
        // Drop everything at or below the window (the cap may have been lowered).
        let floor = n + 1 - rules.dead_letter_cap;
        let old: Vec<u64> = t
            .range((machine.as_str(), 0)..(machine.as_str(), floor))?
            .map(|e| e.map(|(k, _)| k.value().1))
            .collect::<Result<_, _>>()?;
        for k in old {
            t.remove((machine.as_str(), k))?;
        }
    }
    Ok(())
}

/// Dead letters of `machine` ("" for the gateway's own), newest first, at most `limit`,
/// with their numbers.
pub fn dead_letters(
    txn: &ReadTransaction,
    machine: &str,
    limit: usize,
) -> Result<Vec<(u64, DeadLetter)>, StoreError> {
    let t = match txn.open_table(DEAD_LETTERS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for e in t.range((machine, 0)..=(machine, u64::MAX))?.rev() {
        let (k, v) = e?;
        out.push((k.value().1, store::decode(v.value())?));
        if out.len() == limit {
            break;
        }
    }
    Ok(out)
}

/// Takes the next birth sequence number (bdSeq) and stores it.
pub fn next_birth(txn: &WriteTransaction) -> Result<u64, StoreError> {
    let mut meta = txn.open_table(store::META)?;
    let n = match meta.get(BIRTH_KEY)? {
        Some(v) => store::decode::<u64>(v.value())? + 1,
        None => 1,
    };
    meta.insert(BIRTH_KEY, store::encode(&n).as_slice())?;
    // Create this module's tables on first start, so readers never meet a missing one.
    txn.open_table(INFLIGHT)?;
    txn.open_table(DEAD_LETTERS)?;
    txn.open_table(DEAD_LETTER_NEXT)?;
    Ok(n)
}

/// Every instance's public view, for republishing after a reconnect: (machine, instance,
/// view), in key order after `after`, at most `limit`.
pub fn states_after(
    txn: &ReadTransaction,
    charts: &Charts,
    after: Option<(&str, &str)>,
    limit: usize,
) -> Result<Vec<(String, String, Value)>, StoreError> {
    let t = txn.open_table(instances::INSTANCES)?;
    let mut out = Vec::new();
    let range = match after {
        Some(k) => t.range(k..)?,
        None => t.range(("", "")..)?,
    };
    for e in range {
        let (k, v) = e?;
        let (m, s) = k.value();
        if after == Some((m, s)) {
            continue;
        }
        if let Some(view) = public_view(txn, charts, m, v.value())? {
            out.push((m.to_owned(), s.to_owned(), view));
        }
        if out.len() == limit {
            break;
        }
    }
    Ok(out)
}

/// The public view of a stored instance row of `machine`; None when its version, chart or
/// state cannot be read (such an instance has no state to publish).
fn public_view(
    txn: &ReadTransaction,
    charts: &Charts,
    machine: &str,
    row: &[u8],
) -> Result<Option<Value>, StoreError> {
    let inst = instances::history::decode_instance(row)?;
    let Some(version) = instances::version(txn, machine, &inst.version_id)? else {
        return Ok(None);
    };
    let Ok(chart) = charts.get(&version) else {
        return Ok(None);
    };
    let Ok(state) = serde_json::from_slice::<crate::chart::InstanceState>(&inst.state) else {
        return Ok(None);
    };
    Ok(Some(instances::public_view(&chart, &state, inst.ts_ms)))
}

/// Calls `f` with (machine, instance, public view) of every instance, or of `machine`'s only,
/// in key order: the retained states a new subscription receives.
pub fn for_each_state(
    txn: &ReadTransaction,
    charts: &Charts,
    machine: Option<&str>,
    mut f: impl FnMut(&str, &str, &Value),
) -> Result<(), StoreError> {
    let t = txn.open_table(instances::INSTANCES)?;
    let range = match machine {
        Some(m) => t.range((m, "")..)?,
        None => t.range(("", "")..)?,
    };
    for e in range {
        let (k, v) = e?;
        let (m, s) = k.value();
        if machine.is_some_and(|want| want != m) {
            break;
        }
        if let Some(view) = public_view(txn, charts, m, v.value())? {
            f(m, s, &view);
        }
    }
    Ok(())
}

/// Whether `client` has dedup entries (a clean session then removes them before its CONNACK).
pub fn has_entries(txn: &ReadTransaction, client: &str) -> Result<bool, StoreError> {
    let t = match txn.open_table(INFLIGHT) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let found = t.range((client, 0)..=(client, u16::MAX))?.next().is_some();
    Ok(found)
}
