//! A minimal HTTPS client for the CLI's calls to a running gateway (`smgate site deploy`,
//! [`publish_page`]): one HTTP/1.1 request per connection over rustls, trusting only the given
//! CA certificate (by default the gateway's own self-signed one), never the system roots.

use std::path::Path;
use std::sync::Arc;

use hyper::body::Body;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad URL `{0}`: give https://HOST[:PORT]")]
    Url(String),
    #[error("cannot read the CA certificate {path}: {message}")]
    CaCert { path: String, message: String },
    #[error("cannot connect to {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("HTTP exchange failed: {0}")]
    Http(String),
    /// The gateway answered with an error of the zeq API family.
    #[error("gateway answered {status} {code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("this key cannot see the machine's owner ZID; give --agent-zid")]
    NoOwner,
}

impl ClientError {
    /// The refusal in an answer's `{"error", "message"}` body.
    fn refused(status: u16, body: &Value) -> ClientError {
        let text = |k: &str| body.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        ClientError::Refused {
            status,
            code: text("error").unwrap_or_else(|| "error".into()),
            message: text("message").unwrap_or_else(|| body.to_string()),
        }
    }
}

/// A page version to publish (spec 001).
pub struct Page<'a> {
    pub slug: &'a str,
    pub page: &'a str,
    pub title: String,
    pub html: String,
    /// Stored with the page and returned by the API, never run.
    pub python: Option<String>,
    /// Recorded with the version; `None` asks the gateway for the machine owner's ZID.
    pub agent_zid: Option<String>,
}

/// What the gateway answered to a publish.
pub struct Published {
    pub version: Value,
    pub proof_digest: String,
    /// The page's path on the gateway.
    pub url: String,
}

/// Publishes `page` to the gateway at `base` with `key` (the owner's account key or an
/// operator/admin machine key): `POST /api/state-machines/{slug}/pages/{page}/publish`.
pub async fn publish_page(
    base: &str,
    ca_cert: &Path,
    key: &str,
    page: Page<'_>,
) -> Result<Published, ClientError> {
    let slug = page.slug;
    let agent_zid = match page.agent_zid {
        Some(z) => z,
        None => {
            let path = format!("/api/chain/state-machines/{slug}");
            let (status, body) =
                request(base, ca_cert, http::Method::GET, &path, Some(key), None).await?;
            if status != 200 {
                return Err(ClientError::refused(status, &body));
            }
            body.pointer("/machine/owner_zid")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
                .ok_or(ClientError::NoOwner)?
        }
    };
    let mut request_body =
        serde_json::json!({"title": page.title, "html": page.html, "agentZid": agent_zid});
    if let Some(p) = page.python {
        request_body["pythonScript"] = Value::String(p);
    }
    let path = format!("/api/state-machines/{slug}/pages/{}/publish", page.page);
    let (status, body) = request(
        base,
        ca_cert,
        http::Method::POST,
        &path,
        Some(key),
        Some(&request_body),
    )
    .await?;
    if status != 201 {
        return Err(ClientError::refused(status, &body));
    }
    let text = |k: &str| body[k].as_str().unwrap_or("").to_owned();
    Ok(Published {
        version: body["version"].clone(),
        proof_digest: text("proof_digest"),
        url: text("url"),
    })
}

/// Sends `method path` with an optional JSON body to `base` (`https://host:port`) and returns
/// the status and the body (JSON when it parses, else a string).
pub async fn request(
    base: &str,
    ca_cert: &Path,
    method: http::Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value), ClientError> {
    let uri: http::Uri = base.parse().map_err(|_| ClientError::Url(base.into()))?;
    if uri.scheme_str() != Some("https") {
        return Err(ClientError::Url(base.into()));
    }
    let host = uri.host().ok_or_else(|| ClientError::Url(base.into()))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);

    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ClientError::CaCert {
            path: ca_cert.display().to_string(),
            message: e.to_string(),
        })?;
    for c in certs {
        roots.add(c).map_err(|e| ClientError::CaCert {
            path: ca_cert.display().to_string(),
            message: e.to_string(),
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Http(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(host.clone()).map_err(|_| ClientError::Url(base.into()))?;

    let addr = format!("{host}:{port}");
    let connect_err = |e: std::io::Error| ClientError::Connect {
        addr: addr.clone(),
        message: e.to_string(),
    };
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(connect_err)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(connect_err)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let driver = tokio::spawn(conn);

    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(
            http::header::HOST,
            uri.authority().map(|a| a.as_str()).unwrap_or(&host),
        )
        .header(
            http::header::USER_AGENT,
            concat!("smgate/", env!("CARGO_PKG_VERSION")),
        );
    if let Some(token) = bearer {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let payload = match body {
        Some(v) => {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
            v.to_string()
        }
        None => String::new(),
    };
    let req = req
        .body(payload)
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let status = res.status().as_u16();
    let mut body = res.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        let frame = frame.map_err(|e| ClientError::Http(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            bytes.extend_from_slice(&data);
        }
    }
    driver.abort();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, value))
}
