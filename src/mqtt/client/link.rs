//! Reaching the broker: the URL, the connection options and Last Will, TLS, and the
//! jittered backoff between attempts.

use super::*;

pub(super) fn options(
    cfg: &MqttConfig,
    id: &str,
    host: &str,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> MqttOptions {
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(cfg.keepalive_secs.max(1)))
        .set_max_packet_size(cfg.max_packet_bytes, cfg.max_packet_bytes)
        .set_inflight(cfg.inflight);
    if let Some(u) = &cfg.username {
        o.set_credentials(u.clone(), cfg.password.clone().unwrap_or_default());
    }
    if let Some(tls) = tls {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    }
    o
}

pub(super) fn will(status_topic: &str, status: &str, birth: u64) -> LastWill {
    LastWill::new(
        status_topic,
        status_payload(status, birth),
        QoS::AtLeastOnce,
        true,
    )
}

pub(super) fn status_payload(status: &str, birth: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"status": status, "bdSeq": birth})).unwrap_or_default()
}

/// `mqtt://host[:port]` or `mqtts://host[:port]` → (host, port, tls).
pub(super) fn parse_url(url: &str) -> Result<(String, u16, bool), String> {
    let (rest, secure, default_port) = if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true, 8883)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (r, false, 1883)
    } else {
        return Err(format!(
            "mqtt.url `{url}` must start with mqtt:// or mqtts://"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse()
                .map_err(|_| format!("mqtt.url `{url}`: bad port `{p}`"))?,
        ),
        _ => (rest, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("mqtt.url `{url}` has no host"));
    }
    Ok((host.to_string(), port, secure))
}

/// rustls with the ring provider, trusting only `ca_file`, with an optional client certificate.
pub(super) fn tls_config(cfg: &MqttConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let ca = cfg
        .ca_file
        .as_ref()
        .ok_or("mqtts:// needs mqtt.ca_file (PEM CA certificates of the broker)")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
        roots
            .add(cert.map_err(|e| format!("{}: {e}", ca.display()))?)
            .map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let config = match (&cfg.client_cert, &cfg.client_key) {
        (Some(c), Some(k)) => {
            let chain = CertificateDer::pem_file_iter(c)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", c.display()))?;
            let key =
                PrivateKeyDer::from_pem_file(k).map_err(|e| format!("{}: {e}", k.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| e.to_string())?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Exponential backoff with full jitter in its upper half.
pub(super) struct Backoff {
    pub(super) min: u64,
    pub(super) max: u64,
    pub(super) next: u64,
}

impl Backoff {
    pub(super) fn new(cfg: &MqttConfig) -> Backoff {
        let min = cfg.reconnect_min_ms.max(1);
        Backoff {
            min,
            max: cfg.reconnect_max_ms.max(min),
            next: min,
        }
    }

    pub(super) fn reset(&mut self) {
        self.next = self.min;
    }

    pub(super) fn delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = (uuid::Uuid::new_v4().as_u128() % (base as u128 / 2 + 1)) as u64;
        Duration::from_millis(base / 2 + jitter)
    }
}
