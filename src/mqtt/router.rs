//! Subscriptions, retained messages and each subscriber's queue.
//!
//! - **Matching** uses rumqttc's `matches` and `valid_filter` (`+`, `#`, and no wildcard match
//!   of a topic that starts with `$`). A subscription is checked against the subscriber's
//!   rights once per delivered topic ([`Grant::may_read`]), so a key of one machine that
//!   subscribes to `#` receives only what it may read.
//! - **Retained messages**: the instance states (`<prefix>/<m>/<i>/state`) are not kept here;
//!   a new subscription reads them from redb ([`super::ingest::for_each_state`]), so after a
//!   crash none is stale and their memory is the store's. Other retained messages (the
//!   gateway's status, relayed topics) live in a bounded map (`mqtt.max_retained`).
//! - **Queues**: each connection has an [`Outq`]. A state topic is queued once and its payload
//!   replaced by newer states while it waits (latest wins), so the states waiting for one
//!   subscriber are bounded by the number of instances. Other messages queue in order up to
//!   `mqtt.max_queued_messages`; a subscriber past that bound is disconnected, so that a slow
//!   reader never slows a commit or grows memory without bound.
//! - **Order of a snapshot and live states**: a subscription and its snapshot of the states
//!   are made under the router's lock, and committed states are fanned out under the same
//!   lock after their commit is durable. A state committed before the snapshot is either in
//!   it or fanned out after it (then it is the same or newer), so a subscriber never receives
//!   an older state after a newer one.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rumqttc::mqttbytes::{matches, valid_filter};
use tokio::sync::Notify;

use super::codec::{self, Message, QoS, Reason, RetainHandling, Subscription};
use crate::auth::{Access, Principal};
use crate::store::Store;

/// What one connection may do, with the machines it has asked about cached.
pub struct Grant {
    who: Who,
    prefix: String,
    access: Mutex<HashMap<String, Access>>,
}

enum Who {
    /// `mqtt.allow_anonymous`: a lab device, with every right.
    Anonymous,
    Key(Principal),
}

impl Grant {
    pub fn anonymous(prefix: &str) -> Grant {
        Grant {
            who: Who::Anonymous,
            prefix: prefix.to_owned(),
            access: Default::default(),
        }
    }

    pub fn key(prefix: &str, principal: Principal) -> Grant {
        Grant {
            who: Who::Key(principal),
            prefix: prefix.to_owned(),
            access: Default::default(),
        }
    }

    /// The key id behind this grant (to close its connections when it is revoked).
    pub fn key_id(&self) -> Option<&str> {
        match &self.who {
            Who::Key(Principal::Account { key_id, .. } | Principal::MachineKey { key_id, .. }) => {
                Some(key_id)
            }
            _ => None,
        }
    }

    /// What this client may do on `machine`; unknown machines are `None`.
    pub fn access(&self, store: &Store, machine: &str) -> Access {
        let principal = match &self.who {
            Who::Anonymous => return Access::Owner,
            Who::Key(p) => p,
        };
        if let Ok(cache) = self.access.lock() {
            if let Some(a) = cache.get(machine) {
                return *a;
            }
        }
        // A level that is not a slug names no machine.
        let access = crate::auth::Slug::parse(machine)
            .and_then(|slug| store.view(|txn| crate::machines::get(txn, &slug)).ok())
            .flatten()
            .map_or(Access::None, |m| m.access(principal));
        if let Ok(mut cache) = self.access.lock() {
            // A connection asks about few machines; a client probing many cannot grow this.
            if cache.len() < 1024 {
                cache.insert(machine.to_owned(), access);
            }
        }
        access
    }

    /// The machine level of a topic or filter under the prefix (`None` for other topics and
    /// for the gateway's own `$gateway` level).
    pub fn machine_level<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let machine = rest.split('/').next()?;
        (machine != "$gateway").then_some(machine)
    }

    /// Whether a message on `topic` may be delivered to this client: anything outside the
    /// prefix and the gateway's status; under the prefix, viewer or more on the machine.
    pub fn may_read(&self, store: &Store, topic: &str) -> bool {
        match self.machine_level(topic) {
            None => true,
            Some(m) => self.access(store, m) >= Access::Viewer,
        }
    }

    /// Whether a SUBSCRIBE to `filter` is granted: a filter that names a machine needs viewer
    /// or more on it; one with a wildcard in the machine level is granted and filtered per
    /// message.
    pub fn may_subscribe(&self, store: &Store, filter: &str) -> bool {
        match self.machine_level(filter) {
            Some("+" | "#") | None => true,
            Some(m) => self.access(store, m) >= Access::Viewer,
        }
    }
}

/// A connection as the router and the batcher see it: where its deliveries and acks go.
pub struct Link {
    /// Wakes the connection task: deliveries, acks, or a kick.
    pub wake: Notify,
    pub outq: Mutex<Outq>,
    /// Acks released by the batcher after their commit: (slot, packet to send).
    pub done: Mutex<Vec<(u64, codec::Out, Option<super::server::Settled>)>>,
    /// Set when the connection must close, with the reason.
    pub kick: Mutex<Option<Reason>>,
    pub grant: Arc<Grant>,
    /// The connection started a clean session (3.1.1 clean session, MQTT 5 clean start).
    pub clean_start: bool,
}

impl Link {
    pub fn new(grant: Arc<Grant>, clean_start: bool) -> Link {
        Link {
            wake: Notify::new(),
            outq: Mutex::new(Outq::default()),
            done: Mutex::new(Vec::new()),
            kick: Mutex::new(None),
            grant,
            clean_start,
        }
    }

    pub fn kick(&self, reason: Reason) {
        if let Ok(mut k) = self.kick.lock() {
            k.get_or_insert(reason);
        }
        self.wake.notify_one();
    }

    pub fn kicked(&self) -> Option<Reason> {
        self.kick.lock().ok().and_then(|k| *k)
    }
}

/// Messages waiting for one subscriber (module doc).
#[derive(Default)]
pub struct Outq {
    order: VecDeque<Queued>,
    /// Latest payload of each state topic in `order`.
    states: HashMap<String, Message>,
    /// Messages in `order` that are not states.
    others: usize,
}

enum Queued {
    Message(Message),
    State(String),
}

impl Outq {
    /// Queues `m`; false when the bound for non-state messages is reached.
    fn push(&mut self, m: Message, coalesce: bool, bound: usize) -> bool {
        if coalesce {
            match self.states.get_mut(&m.topic) {
                Some(waiting) => *waiting = m,
                None => {
                    self.order.push_back(Queued::State(m.topic.clone()));
                    self.states.insert(m.topic.clone(), m);
                }
            }
            return true;
        }
        if self.others >= bound {
            return false;
        }
        self.others += 1;
        self.order.push_back(Queued::Message(m));
        true
    }

    pub fn pop(&mut self) -> Option<Message> {
        loop {
            match self.order.pop_front()? {
                Queued::Message(m) => {
                    self.others -= 1;
                    return Some(m);
                }
                Queued::State(t) => {
                    if let Some(m) = self.states.remove(&t) {
                        return Some(m);
                    }
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Puts deliveries that a closed connection sent and never saw acked back at the front,
    /// in their order; a state for which a newer one already waits is left out.
    fn requeue(&mut self, messages: Vec<Message>, is_state: impl Fn(&str) -> bool) {
        for m in messages.into_iter().rev() {
            if self.states.contains_key(&m.topic) {
                continue;
            }
            if is_state(&m.topic) {
                self.order.push_front(Queued::State(m.topic.clone()));
                self.states.insert(m.topic.clone(), m);
            } else {
                self.others += 1;
                self.order.push_front(Queued::Message(m));
            }
        }
    }
}

struct Subscriber {
    link: Arc<Link>,
    /// With their granted QoS, in subscription order.
    filters: Vec<Subscription>,
}

#[derive(Default)]
struct Inner {
    /// By client id.
    subscribers: HashMap<Arc<str>, Subscriber>,
    retained: BTreeMap<String, Message>,
}

pub struct Router {
    inner: Mutex<Inner>,
    store: Arc<Store>,
    charts: Arc<crate::instances::Charts>,
    prefix: String,
    max_queued: usize,
    max_retained: usize,
    shared: Arc<super::Shared>,
}

impl Router {
    pub fn new(
        store: Arc<Store>,
        charts: Arc<crate::instances::Charts>,
        cfg: &super::MqttConfig,
        shared: Arc<super::Shared>,
    ) -> Router {
        Router {
            inner: Default::default(),
            store,
            charts,
            prefix: cfg.topic_prefix.clone(),
            max_queued: cfg.max_queued_messages,
            max_retained: cfg.max_retained,
            shared,
        }
    }

    /// Whether `topic` is an instance's state topic (`<prefix>/<m>/<i>/state`).
    fn is_state(&self, topic: &str) -> bool {
        topic
            .strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('/'))
            .is_some_and(|r| {
                let levels: Vec<&str> = r.split('/').collect();
                levels.len() == 3 && levels[2] == "state" && levels[0] != "$gateway"
            })
    }

    /// Delivers `m` to every matching subscriber that may read it; keeps it when retained.
    /// States coalesce per subscriber (module doc).
    pub fn publish(&self, m: Message) {
        let state = self.is_state(&m.topic);
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if m.retain && !state {
            if m.payload.is_empty() {
                inner.retained.remove(&m.topic);
            } else if inner.retained.len() < self.max_retained
                || inner.retained.contains_key(&m.topic)
            {
                inner.retained.insert(m.topic.clone(), m.clone());
            } else {
                self.shared.retained_refused.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.fan_out(&inner, m, state);
    }

    fn fan_out(&self, inner: &Inner, m: Message, state: bool) {
        for (client, s) in &inner.subscribers {
            let Some((qos, retain_as_published)) = delivery(&m, client, &s.filters) else {
                continue;
            };
            if !s.link.grant.may_read(&self.store, &m.topic) {
                continue;
            }
            let delivered = Message {
                qos: min_qos(qos, m.qos),
                // Live deliveries carry retain 0 (3.1.1 §3.3.1.3), unless the subscription
                // asked for the publisher's flag (MQTT 5 Retain As Published).
                retain: retain_as_published && m.retain,
                ..m.clone()
            };
            let queued = s
                .link
                .outq
                .lock()
                .map(|mut q| q.push(delivered, state, self.max_queued))
                .unwrap_or(false);
            if queued {
                s.link.wake.notify_one();
            } else {
                self.shared
                    .subscribers_dropped
                    .fetch_add(1, Ordering::Relaxed);
                s.link.kick(Reason::QuotaExceeded);
            }
        }
    }

    /// Committed states and emits from the outbox, under one lock.
    pub fn publish_outbox(&self, outbox: super::Outbox, state_qos: QoS) {
        let Ok(inner) = self.inner.lock() else {
            return;
        };
        // Nothing is retained here: with no subscriber there is nothing to do.
        if inner.subscribers.is_empty() {
            return;
        }
        for e in outbox.emits {
            let payload = serde_json::to_vec(&e.data).unwrap_or_default();
            let m = Message {
                topic: super::topic::emit(&self.prefix, &e.machine, &e.instance, &e.name),
                payload: payload.into(),
                qos: QoS::AtLeastOnce,
                retain: false,
                origin: None,
            };
            self.fan_out(&inner, m, false);
        }
        for ((machine, instance), payload) in outbox.states {
            let m = Message {
                topic: super::topic::state(&self.prefix, &machine, &instance),
                payload: payload.into(),
                qos: state_qos,
                retain: true,
                origin: None,
            };
            self.fan_out(&inner, m, true);
        }
    }

    /// Adds `subs` for `client` (replacing a filter it already has), and queues the retained
    /// messages they match, the states read from the store, as each one's Retain Handling
    /// says. Returns the granted QoS per filter, or why it was refused.
    pub fn subscribe(
        &self,
        client: &Arc<str>,
        link: &Arc<Link>,
        subs: &[Subscription],
        state_qos: QoS,
    ) -> Vec<Result<QoS, Reason>> {
        let (granted, added) = self.grant(link, subs);
        if added.is_empty() {
            return granted;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return granted;
        };
        let sub = inner
            .subscribers
            .entry(client.clone())
            .or_insert_with(|| Subscriber {
                link: link.clone(),
                filters: Vec::new(),
            });
        sub.link = link.clone();
        let mut with_retained = Vec::new();
        for s in added {
            let existed = match sub.filters.iter_mut().find(|g| g.filter == s.filter) {
                Some(existing) => {
                    *existing = s.clone();
                    true
                }
                None => {
                    sub.filters.push(s.clone());
                    false
                }
            };
            let send = match s.retain_handling {
                RetainHandling::OnSubscribe => true,
                RetainHandling::OnNewSubscription => !existed,
                RetainHandling::Never => false,
            };
            if send {
                with_retained.push(s);
            }
        }
        let queue = self.retained_for(&mut inner, link, &with_retained, state_qos);
        if let Ok(mut q) = link.outq.lock() {
            for m in queue {
                let state = self.is_state(&m.topic);
                // Retained messages are bounded by `max_retained` and the instances.
                q.push(m, state, usize::MAX);
            }
        }
        link.wake.notify_one();
        granted
    }

    /// Checks each filter of a SUBSCRIBE: the granted QoS per filter or why it is refused,
    /// and the subscriptions to add (with their granted QoS).
    fn grant(
        &self,
        link: &Link,
        subs: &[Subscription],
    ) -> (Vec<Result<QoS, Reason>>, Vec<Subscription>) {
        let mut added = Vec::new();
        let granted = subs
            .iter()
            .map(|s| {
                if s.filter.starts_with("$share/") {
                    // Announced as not available in the CONNACK.
                    Err(Reason::SharedSubscriptionsNotSupported)
                } else if !valid_filter(&s.filter) {
                    Err(Reason::TopicFilterInvalid)
                } else if !link.grant.may_subscribe(&self.store, &s.filter) {
                    Err(Reason::NotAuthorized)
                } else {
                    // QoS 2 deliveries are made at QoS 1.
                    let qos = min_qos(s.qos, QoS::AtLeastOnce);
                    added.push(Subscription { qos, ..s.clone() });
                    Ok(qos)
                }
            })
            .collect();
        (granted, added)
    }

    /// The retained messages that `subs` match and `link` may read (3.1.1 §3.3.1.3: sent with
    /// retain 1): those kept here (the expired ones go), and the states in the store.
    fn retained_for(
        &self,
        inner: &mut Inner,
        link: &Link,
        subs: &[Subscription],
        state_qos: QoS,
    ) -> Vec<Message> {
        let now = std::time::Instant::now();
        inner.retained.retain(|_, m| !m.expired(now));
        let mut queue = Vec::new();
        for s in subs {
            for m in inner.retained.values() {
                if matches(&m.topic, &s.filter) && link.grant.may_read(&self.store, &m.topic) {
                    queue.push(Message {
                        qos: min_qos(s.qos, m.qos),
                        ..m.clone()
                    });
                }
            }
            if self.may_match_states(&s.filter) {
                self.states_for(link, s, min_qos(s.qos, state_qos), &mut queue);
            }
        }
        queue
    }

    /// The instance states, read from the store, that `s` matches and `link` may read.
    fn states_for(&self, link: &Link, s: &Subscription, qos: QoS, queue: &mut Vec<Message>) {
        let f = &s.filter;
        let machine = link
            .grant
            .machine_level(f)
            .filter(|m| !m.contains(['+', '#']));
        let read = self.store.view(|txn| {
            let mut found = Vec::new();
            super::ingest::for_each_state(txn, &self.charts, machine, |m, i, view| {
                let topic = super::topic::state(&self.prefix, m, i);
                if matches(&topic, f) && link.grant.may_read(&self.store, &topic) {
                    found.push(Message {
                        topic,
                        payload: serde_json::to_vec(view).unwrap_or_default().into(),
                        qos,
                        retain: true,
                        origin: None,
                    });
                }
            })?;
            Ok(found)
        });
        match read {
            Ok(found) => queue.extend(found),
            Err(e) => tracing::warn!(error = %e, "cannot read states for a subscription"),
        }
    }

    /// Whether filter `f` can match some `<prefix>/<m>/<i>/state`.
    fn may_match_states(&self, f: &str) -> bool {
        let probe_levels = ["x", "x", "state"];
        let mut levels = f.split('/');
        // The prefix's own levels must match the filter's first levels.
        for p in self.prefix.split('/') {
            match levels.next() {
                Some("#") => return true,
                Some("+") => {}
                Some(l) if l == p => {}
                _ => return false,
            }
        }
        let rest: Vec<&str> = levels.collect();
        for (i, l) in rest.iter().enumerate() {
            match (*l, probe_levels.get(i)) {
                ("#", _) => return true,
                (_, None) => return false,
                ("+", Some(_)) => {}
                (l, Some(&"state")) => {
                    return l == "state" && (rest.len() == 3 || rest[3] == "#");
                }
                (l, Some(_)) => {
                    if l.starts_with('$') {
                        return false;
                    }
                }
            }
        }
        rest.len() == 3
    }

    /// Removes `client`'s subscriptions to `filters`; per filter, whether it existed.
    pub fn unsubscribe(&self, client: &str, filters: &[String]) -> Vec<bool> {
        let mut found = vec![false; filters.len()];
        if let Ok(mut inner) = self.inner.lock() {
            if let Some(s) = inner.subscribers.get_mut(client) {
                for (f, found) in filters.iter().zip(found.iter_mut()) {
                    let before = s.filters.len();
                    s.filters.retain(|s| s.filter != *f);
                    *found = s.filters.len() < before;
                }
            }
        }
        found
    }

    /// Forgets `client`'s subscriptions (a clean session ended, or a new one began).
    pub fn drop_session(&self, client: &str) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.subscribers.remove(client);
        }
    }

    /// Queues for `link` again, at the front, deliveries that an earlier connection of its
    /// session sent and never saw acked.
    pub fn requeue(&self, link: &Link, unacked: Vec<Message>) {
        if unacked.is_empty() {
            return;
        }
        if let Ok(mut q) = link.outq.lock() {
            q.requeue(unacked, |t| self.is_state(t));
        }
        link.wake.notify_one();
    }

    /// Whether `client` has subscriptions kept from an earlier connection; they now deliver
    /// to `link`, which takes over what was queued for them while the client was away.
    pub fn resume(&self, client: &str, link: &Arc<Link>) -> bool {
        let Ok(mut inner) = self.inner.lock() else {
            return false;
        };
        match inner.subscribers.get_mut(client) {
            Some(s) => {
                if !Arc::ptr_eq(&s.link, link) {
                    let waiting = s.link.outq.lock().map(|mut q| std::mem::take(&mut *q));
                    if let (Ok(waiting), Ok(mut q)) = (waiting, link.outq.lock()) {
                        *q = waiting;
                    }
                }
                s.link = link.clone();
                link.wake.notify_one();
                true
            }
            None => false,
        }
    }

    /// Subscribers, and retained messages kept in memory (for `/metrics`).
    pub fn counts(&self) -> (usize, usize) {
        self.inner
            .lock()
            .map(|i| (i.subscribers.len(), i.retained.len()))
            .unwrap_or_default()
    }
}

/// How `m` reaches the subscriber `client` with these subscriptions: once, at the highest QoS
/// of those it matches, with the publisher's retain flag if one of them asks for it; None when
/// none matches, or only No Local ones and `m` is the subscriber's own.
fn delivery(m: &Message, client: &str, subs: &[Subscription]) -> Option<(QoS, bool)> {
    let own = m.origin.as_ref().is_some_and(|o| &*o.session == client);
    subs.iter()
        .filter(|s| !(own && s.no_local) && matches(&m.topic, &s.filter))
        .fold(None, |best, s| {
            Some(match best {
                None => (s.qos, s.retain_as_published),
                Some((q, rap)) => (
                    if (s.qos as u8) > (q as u8) { s.qos } else { q },
                    rap || s.retain_as_published,
                ),
            })
        })
}

pub fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) {
        a
    } else {
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, payload: &str) -> Message {
        Message {
            topic: topic.into(),
            payload: payload.to_owned().into(),
            qos: QoS::AtLeastOnce,
            retain: false,
            origin: None,
        }
    }

    #[test]
    fn overlapping_subscriptions_deliver_once_and_no_local_skips_the_own_session() {
        let sub = |f: &str, qos, no_local, rap| Subscription {
            no_local,
            retain_as_published: rap,
            ..Subscription::new(f, qos)
        };
        let subs = [
            sub("a/#", QoS::AtMostOnce, false, false),
            sub("a/b", QoS::AtLeastOnce, true, true),
        ];
        let mine = Message {
            origin: Some(Arc::new(codec::Origin::new("me".into(), None))),
            ..msg("a/b", "x")
        };
        // Another session's message: the highest QoS, and retain as published from one.
        assert_eq!(
            delivery(&mine, "you", &subs),
            Some((QoS::AtLeastOnce, true))
        );
        // Its own: only the subscription without No Local delivers it.
        assert_eq!(delivery(&mine, "me", &subs), Some((QoS::AtMostOnce, false)));
        assert_eq!(delivery(&mine, "me", &subs[1..]), None);
        // The gateway's own messages have no origin: No Local never applies.
        assert_eq!(
            delivery(&msg("a/b", "x"), "me", &subs[1..]),
            Some((QoS::AtLeastOnce, true))
        );
        assert_eq!(delivery(&msg("c", "x"), "me", &subs), None);
    }

    #[test]
    fn a_waiting_state_is_replaced_by_the_newer_one_and_others_are_bounded() {
        let mut q = Outq::default();
        assert!(q.push(msg("p/m/a/state", "1"), true, 2));
        assert!(q.push(msg("other", "x"), false, 2));
        assert!(q.push(msg("p/m/a/state", "2"), true, 2));
        assert!(q.push(msg("p/m/b/state", "3"), true, 2));
        assert!(q.push(msg("other", "y"), false, 2));
        // A third non-state message is over the bound; states are not counted.
        assert!(!q.push(msg("other", "z"), false, 2));
        assert!(q.push(msg("p/m/c/state", "4"), true, 2));
        let got: Vec<String> = std::iter::from_fn(|| q.pop())
            .map(|m| format!("{}={}", m.topic, String::from_utf8_lossy(&m.payload)))
            .collect();
        assert_eq!(
            got,
            [
                "p/m/a/state=2",
                "other=x",
                "p/m/b/state=3",
                "other=y",
                "p/m/c/state=4"
            ]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn filters_that_can_match_state_topics_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), Default::default()).unwrap();
        let cfg = super::super::MqttConfig::default();
        let r = Router::new(store, Default::default(), &cfg, Default::default());
        for f in [
            "#",
            "smgate/#",
            "smgate/+/+/state",
            "smgate/m/+/state",
            "smgate/m/i/state",
            "+/m/i/#",
            "smgate/m/#",
        ] {
            assert!(r.may_match_states(f), "{f}");
        }
        for f in [
            "smgate/m/i/heartbeat",
            "smgate/+/+",
            "smgate/$gateway/+/state",
            "other/#",
            "smgate/m/i/state/x",
        ] {
            assert!(!r.may_match_states(f), "{f}");
        }
        assert!(r.is_state("smgate/m/i/state"));
        assert!(!r.is_state("smgate/$gateway/i/state"));
        assert!(!r.is_state("smgate/m/i/heartbeat"));
    }
}
