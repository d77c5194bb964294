//! The batcher: applies what has arrived in one group commit, then releases the acks and
//! hands the committed steps to the publisher.

use super::*;

pub(super) struct Batcher {
    pub(super) deps: Arc<Deps>,
    pub(super) rules: Arc<Rules>,
    pub(super) acks: Arc<Acks>,
}

/// Batches handed to the writer and not yet acked. The broker's inflight window holds every
/// unacked message, so while one batch commits the next must already be on its way to the
/// writer: with one batch at a time the window drains to nothing during each commit and the
/// writer waits for the broker after it. The writer runs requests in the order they arrive
/// (FIFO), so batches commit in order; a failed batch is retried with every message marked as
/// redelivered, which the dedup table decides whatever later batches committed meanwhile.
pub(super) const BATCHES_IN_FLIGHT: usize = 4;

pub(super) async fn batcher(
    b: Batcher,
    mut rx: mpsc::UnboundedReceiver<Delivery>,
    mut shutdown: watch::Receiver<bool>,
    done: (oneshot::Sender<()>, oneshot::Sender<()>),
) {
    let size = b.deps.cfg.batch_size;
    let wait = Duration::from_millis(b.deps.cfg.batch_wait_ms);
    let b = Arc::new(b);
    let mut in_flight: std::collections::VecDeque<JoinHandle<bool>> = Default::default();
    let mut stopping = false;
    let (first_turn, mut previous_turn) = oneshot::channel::<()>();
    let _ = first_turn.send(());
    loop {
        // Reap finished batches in order; a batch that could not commit while stopping ends
        // the loop (it stays unacked, so the broker redelivers it).
        while in_flight.front().is_some_and(|t| t.is_finished()) {
            if let Some(t) = in_flight.pop_front() {
                if !t.await.unwrap_or(false) {
                    stopping = true;
                }
            }
        }
        if stopping {
            break;
        }
        if in_flight.len() >= BATCHES_IN_FLIGHT {
            if let Some(t) = in_flight.pop_front() {
                if !t.await.unwrap_or(false) {
                    break;
                }
            }
            continue;
        }
        let first = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            p = rx.recv() => match p { Some(p) => p, None => break },
            // Wake to reap the oldest batch when nothing arrives.
            Ok(ok) = async { match in_flight.front_mut() { Some(t) => t.await, None => std::future::pending().await } } => {
                in_flight.pop_front();
                if !ok {
                    break;
                }
                continue;
            }
        };
        let (mut batch, mut settled) = (Vec::new(), Vec::new());
        let queued = &b.deps.shared.ingest_queued;
        let add = |d: Delivery, batch: &mut Vec<_>, settled: &mut Vec<(u16, u64)>| match d {
            Delivery::Publish(p, connection) => {
                queued.fetch_sub(1, Ordering::Relaxed);
                batch.push((p, connection));
            }
            Delivery::Settled(mut s) => settled.append(&mut s),
        };
        add(first, &mut batch, &mut settled);
        // Settled acks ride along with whatever batch they arrive in; they do not count.
        while batch.len() < size {
            match rx.try_recv() {
                Ok(d) => add(d, &mut batch, &mut settled),
                Err(_) => break,
            }
        }
        if !batch.is_empty() && batch.len() < size && !wait.is_zero() {
            let deadline = tokio::time::Instant::now() + wait;
            while batch.len() < size {
                tokio::select! {
                    d = rx.recv() => match d {
                        Some(d) => add(d, &mut batch, &mut settled),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        // Room in the queue: a paused ingest task may read again.
        b.acks.wake.notify_one();
        let (b, shutdown) = (b.clone(), shutdown.clone());
        // Acks leave in batch order (rumqttd drops a connection that acks out of order): each
        // batch acks after the previous one has (or has given up).
        let (next_turn, turn) = oneshot::channel();
        let turn = std::mem::replace(&mut previous_turn, turn);
        in_flight.push_back(tokio::spawn(async move {
            let ok = commit_and_ack(&b, batch, settled, &shutdown, turn).await;
            let _ = next_turn.send(());
            ok
        }));
    }
    // Let the batches already with the writer commit and be acked. Messages still queued are
    // not acked: the broker redelivers them to the next session.
    for t in in_flight {
        let _ = t.await;
    }
    let _ = done.0.send(());
    let _ = done.1.send(());
}

/// Applies one batch and acks it after the commit; false when the gateway is stopping and the
/// batch could not be committed (it stays unacked, so the broker redelivers it).
pub(super) async fn commit_and_ack(
    b: &Batcher,
    batch: Vec<(Publish, u64)>,
    settled: Vec<(u16, u64)>,
    shutdown: &watch::Receiver<bool>,
    turn: oneshot::Receiver<()>,
) -> bool {
    let deps = &b.deps;
    let max_payload = b.rules.max_payload;
    let client: Arc<str> = b.rules.client_id.as_str().into();
    let messages: Vec<Message> = batch
        .iter()
        .map(|(p, _)| {
            Message::new(
                client.clone(),
                p.topic.clone(),
                p.payload.clone(),
                // QoS 0 has no packet id and is never redelivered: nothing to remember.
                if p.qos == QoS::AtMostOnce { 0 } else { p.pkid },
                p.dup,
                max_payload,
            )
        })
        .collect();
    let settled: Vec<ingest::Forget> = settled
        .into_iter()
        .map(|(pkid, tag)| ingest::Forget::Delivery(client.clone(), pkid, tag))
        .collect();
    let Some((messages, outcomes, tag)) = super::super::commit_batch(
        &deps.writer,
        &deps.charts,
        &b.rules,
        messages,
        settled,
        shutdown,
    )
    .await
    else {
        return false;
    };
    // The previous batch has acked (or stopped trying); an error means its task is gone.
    let _ = turn.await;
    if let Ok(mut ready) = b.acks.ready.lock() {
        let acks = batch.iter().zip(messages.iter().zip(&outcomes));
        ready.extend(acks.filter(|((p, _), _)| p.qos != QoS::AtMostOnce).map(
            |((p, connection), (m, o))| Ack {
                pkid: p.pkid,
                tag: o.entry_tag(m.pkid, tag),
                connection: *connection,
            },
        ));
    }
    b.acks.wake.notify_one();
    let mut steps = Vec::with_capacity(outcomes.len());
    steps.extend(outcomes.into_iter().filter_map(|o| deps.shared.tally(o)));
    deps.shared
        .applied
        .fetch_add(steps.len() as u64, Ordering::Relaxed);
    // One lock of the outbox per batch.
    deps.shared.committed_steps(
        steps
            .iter()
            .map(|(m, i, v, e)| (m.as_str(), i.as_str(), v, e.as_slice())),
    );
    true
}
