//! The publisher: its own connection, retained states and emits from the outbox, and every
//! state again after each (re)connect.

use super::*;

pub(super) async fn publisher_connection(
    deps: Arc<Deps>,
    mut eventloop: EventLoop,
    republish: mpsc::UnboundedSender<()>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut backoff = Backoff::new(&deps.cfg);
    loop {
        let event = tokio::select! {
            biased;
            _ = &mut stop => break,
            ev = eventloop.poll() => ev,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                let _ = republish.send(());
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "MQTT publisher connection lost; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.delay()) => {}
                    _ = &mut stop => break,
                }
            }
        }
    }
    // The publisher queued its last messages before the DISCONNECT; requests go out in order.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

pub(super) async fn publisher(
    deps: Arc<Deps>,
    client: AsyncClient,
    mut republish: mpsc::UnboundedReceiver<()>,
    mut stop: oneshot::Receiver<()>,
    connection_stop: oneshot::Sender<()>,
) {
    let prefix = deps.cfg.topic_prefix.clone();
    let qos = match deps.cfg.state_qos {
        0 => QoS::AtMostOnce,
        _ => QoS::AtLeastOnce,
    };
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            Some(()) = republish.recv() => republish_all(&deps, &client, &prefix, qos).await,
            _ = deps.shared.wake.notified() => {
                if !publish(&client, &prefix, qos, deps.shared.take_outbox()).await {
                    // The request channel is closed: the connection task has stopped.
                    break;
                }
            }
        }
    }
    publish(&client, &prefix, qos, deps.shared.take_outbox()).await;
    let _ = client.try_disconnect();
    let _ = connection_stop.send(());
}

/// Publishes one outbox round: emits in commit order, then each instance's latest state.
/// False when the client is gone.
pub(super) async fn publish(
    client: &AsyncClient,
    prefix: &str,
    qos: QoS,
    outbox: super::super::Outbox,
) -> bool {
    for e in outbox.emits {
        let payload = serde_json::to_vec(&e.data).unwrap_or_default();
        let t = topic::emit(prefix, &e.machine, &e.instance, &e.name);
        if client
            .publish(t, QoS::AtLeastOnce, false, payload)
            .await
            .is_err()
        {
            return false;
        }
    }
    for ((machine, instance), payload) in outbox.states {
        let t = topic::state(prefix, &machine, &instance);
        if client.publish(t, qos, true, payload).await.is_err() {
            return false;
        }
    }
    true
}

pub(super) async fn republish_all(deps: &Deps, client: &AsyncClient, prefix: &str, qos: QoS) {
    let mut after: Option<(String, String)> = None;
    let mut n = 0usize;
    loop {
        let page = deps.store.view(|txn| {
            ingest::states_after(
                txn,
                &deps.charts,
                after.as_ref().map(|(m, i)| (m.as_str(), i.as_str())),
                500,
            )
        });
        let page = match page {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read states to republish");
                return;
            }
        };
        let Some(last) = page.last() else { break };
        after = Some((last.0.clone(), last.1.clone()));
        let full = page.len() == 500;
        for (m, i, view) in page {
            n += 1;
            let payload = serde_json::to_vec(&view).unwrap_or_default();
            if client
                .publish(topic::state(prefix, &m, &i), qos, true, payload)
                .await
                .is_err()
            {
                return;
            }
        }
        if !full {
            break;
        }
    }
    tracing::info!(states = n, "MQTT states republished");
}
