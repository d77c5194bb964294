//! The embedded broker: rumqttd on its own threads (it runs its own runtimes), plain MQTT 3.1.1
//! on `mqtt.listen`. Sessions and retained messages live in memory only, so the gateway
//! republishes every retained state after it connects.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use super::MqttConfig;

/// Starts the broker and returns once it accepts connections.
pub fn start(cfg: &MqttConfig) -> Result<SocketAddr, String> {
    let mut addr = cfg.listen;
    if addr.port() == 0 {
        // rumqttd does not report the port it bound; find a free one first. Another process
        // could take it in between, which the connect check below would then report.
        let probe = TcpListener::bind(addr).map_err(|e| format!("cannot bind {addr}: {e}"))?;
        addr = probe.local_addr().map_err(|e| e.to_string())?;
    } else {
        // Report a taken address at start, not only in rumqttd's log.
        drop(TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?);
    }
    let server = ServerSettings {
        name: "smgate-mqtt".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: cfg.max_packet_bytes,
            max_inflight_count: cfg.inflight as usize,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            // Per-filter in-memory logs: small segments keep the broker's RSS small.
            max_segment_size: (cfg.max_packet_bytes * 4).max(1 << 20),
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    std::thread::Builder::new()
        .name("smgate-mqtt-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|e| format!("cannot start the broker thread: {e}"))?;
    // Ready once the address is taken: a probe connection would make rumqttd log an error.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpListener::bind(addr).is_err_and(|e| e.kind() == std::io::ErrorKind::AddrInUse) {
            return Ok(addr);
        }
        if Instant::now() > deadline {
            return Err(format!("the embedded broker did not listen on {addr}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
