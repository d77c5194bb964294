//! TLS for the HTTPS listener (and MQTT over TLS): rustls with the ring provider, TLS 1.2 and
//! 1.3, ALPN h2 and http/1.1 for HTTPS. The acceptor is swapped whole on SIGHUP, so new connections use the new
//! certificate while open ones keep theirs.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {path}: {message}")]
    Cert { path: String, message: String },
    #[error("cannot read the private key from {path}: {message}")]
    Key { path: String, message: String },
    #[error("certificate and key do not make a TLS configuration: {0}")]
    Config(String),
}

pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert.display().to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert.display().to_string(),
            message: "no CERTIFICATE block found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        message: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The current acceptors (HTTPS, and MQTT over TLS), replaceable at run time.
pub struct Acceptor {
    current: RwLock<(TlsAcceptor, TlsAcceptor)>,
}

/// The HTTPS configuration, and the same certificate without ALPN for MQTT: a rustls server
/// with ALPN protocols refuses a client that offers others (MQTT clients may offer "mqtt").
fn acceptors(cert: &Path, key: &Path) -> Result<(TlsAcceptor, TlsAcceptor), TlsError> {
    let http = server_config(cert, key)?;
    let mut mqtt = http.clone();
    mqtt.alpn_protocols.clear();
    Ok((
        TlsAcceptor::from(Arc::new(http)),
        TlsAcceptor::from(Arc::new(mqtt)),
    ))
}

impl Acceptor {
    pub fn load(cert: &Path, key: &Path) -> Result<Acceptor, TlsError> {
        Ok(Acceptor {
            current: RwLock::new(acceptors(cert, key)?),
        })
    }

    fn pair(&self) -> (TlsAcceptor, TlsAcceptor) {
        match self.current.read() {
            Ok(a) => a.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn get(&self) -> TlsAcceptor {
        self.pair().0
    }

    pub fn get_mqtt(&self) -> TlsAcceptor {
        self.pair().1
    }

    /// Re-reads the files; on error the old certificate stays in use.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        let both = acceptors(cert, key)?;
        match self.current.write() {
            Ok(mut a) => *a = both,
            Err(poisoned) => *poisoned.into_inner() = both,
        }
        Ok(())
    }
}
