//! BYOK ("bring your own key"): credentials for an OpenAI-compatible model, sealed at rest,
//! and the call that asks the model for operator chains.
//!
//! # At rest
//! A credential's base URL, key and model are sealed together with ChaCha20-Poly1305. The key
//! is HKDF-SHA256 over the gateway's identity key file (`identity.pk8`, made by `init`, salt
//! `smgate/credentials/v1`), so the database alone does not reveal them; the nonce is random
//! per credential and the credential id and owner are the associated data, so a sealed blob
//! cannot be moved to another credential. The key is never returned by the API.
//!
//! # The call
//! `POST {base_url}/chat/completions` with `temperature: 0`, asking for JSON
//! `{"chains": [["IS01", "SH01"], …]}` of catalog codes. Plain HTTP for `http://` base URLs;
//! `https://` uses rustls with the system CA bundle. The whole exchange has a short timeout
//! (`agents.byok_timeout_ms`); a failure, a timeout or an answer without one valid chain falls
//! back to the deterministic step, and the tick row records why.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Body;
use hyper_util::rt::TokioIo;
use redb::{ReadTransaction, ReadableTable, WriteTransaction};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::catalog::{self, CATALOG};
use super::{AgentError, AgentsConfig, Enrichment, CREDENTIALS};
use crate::auth::Zid;
use crate::store::{self, StoreError};

/// A stored credential: only the owner and the sealed secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credential {
    pub id: String,
    pub owner: Zid,
    pub name: String,
    pub created_ms: i64,
    pub nonce: [u8; NONCE_LEN],
    pub sealed: Vec<u8>,
}

/// What a credential unseals to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Secret {
    pub base_url: String,
    pub api_key: String,
    pub model: String,
}

pub fn credential_in(txn: &WriteTransaction, id: &str) -> Result<Option<Credential>, StoreError> {
    let t = txn.open_table(CREDENTIALS)?;
    let v = t.get(id)?;
    v.map(|v| store::decode(v.value())).transpose()
}

pub fn credential(txn: &ReadTransaction, id: &str) -> Result<Option<Credential>, StoreError> {
    store::get(txn, CREDENTIALS, id)
}

/// The agents' runtime state kept on the gateway: their config, the sealing key and an HTTPS
/// trust store for model calls.
pub struct Agents {
    pub config: AgentsConfig,
    key: LessSafeKey,
    roots: Arc<rustls::RootCertStore>,
    /// Ticks the ticker committed, and ticks it skipped (unpaid, raced, failed).
    pub ticked: std::sync::atomic::AtomicU64,
    pub skipped: std::sync::atomic::AtomicU64,
    /// Passes that returned after the next Zeqond began; the ticker then passes at once.
    pub overruns: std::sync::atomic::AtomicU64,
    /// Zeqonds that a waiting `POST tick` has claimed, by run id: the ticker leaves the run
    /// alone in that Zeqond, so a manual tick is not starved by the ticker.
    pub claims: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Rung after a spawn commits: a spawn whose commit lands after the ticker's pass of the
    /// next Zeqond gets that Zeqond's tick from an extra pass instead of a gap.
    pub wake: tokio::sync::Notify,
}

struct Len(usize);

impl ring::hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl Agents {
    /// Derives the sealing key from `ikm`, the gateway identity file's bytes
    /// (`gateway::identity_secret`).
    pub fn from_secret(config: AgentsConfig, ikm: &[u8]) -> Agents {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"smgate/credentials/v1");
        let mut okm = [0u8; 32];
        // HKDF cannot fail for a 32-byte output.
        let _ = salt
            .extract(ikm)
            .expand(&[b"chacha20-poly1305"], Len(32))
            .and_then(|o| o.fill(&mut okm));
        let key = LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, &okm).unwrap_or_else(|_| unreachable!()),
        );
        let mut roots = rustls::RootCertStore::empty();
        for bundle in [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
        ] {
            use rustls::pki_types::pem::PemObject;
            if let Ok(it) = rustls::pki_types::CertificateDer::pem_file_iter(bundle) {
                for c in it.flatten() {
                    let _ = roots.add(c);
                }
                break;
            }
        }
        Agents {
            config,
            key,
            roots: Arc::new(roots),
            ticked: Default::default(),
            skipped: Default::default(),
            overruns: Default::default(),
            claims: Default::default(),
            wake: Default::default(),
        }
    }

    fn aad(id: &str, owner: &Zid) -> Vec<u8> {
        format!("{id}|{owner}").into_bytes()
    }

    /// Seals `secret` into a new credential.
    pub fn seal(
        &self,
        id: &str,
        owner: &Zid,
        name: &str,
        secret: &Secret,
        now_ms: i64,
    ) -> Credential {
        let mut nonce = [0u8; NONCE_LEN];
        crate::auth::fill_random(&mut nonce);
        let mut sealed = serde_json::to_vec(secret).unwrap_or_default();
        // Sealing in place only fails for inputs longer than ChaCha20 allows (256 GiB).
        let _ = self.key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(Self::aad(id, owner)),
            &mut sealed,
        );
        Credential {
            id: id.to_owned(),
            owner: owner.clone(),
            name: name.to_owned(),
            created_ms: now_ms,
            nonce,
            sealed,
        }
    }

    pub fn unseal(&self, c: &Credential) -> Option<Secret> {
        let mut buf = c.sealed.clone();
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(c.nonce),
                Aad::from(Self::aad(&c.id, &c.owner)),
                &mut buf,
            )
            .ok()?;
        serde_json::from_slice(plain).ok()
    }

    /// Asks the model of credential `id` for chains; never fails: a failure is recorded and
    /// the step stays deterministic.
    pub async fn enrich(
        &self,
        credential: Option<&Credential>,
        problem: &str,
        best: Option<&[&str]>,
    ) -> Enrichment {
        let Some(c) = credential else {
            return fallback("credential_missing".into());
        };
        let Some(secret) = self.unseal(c) else {
            return fallback("credential_unreadable".into());
        };
        let timeout = Duration::from_millis(self.config.byok_timeout_ms);
        match tokio::time::timeout(timeout, self.ask(&secret, problem, best)).await {
            Err(_) => fallback("timeout".into()),
            Ok(Err(reason)) => fallback(reason),
            Ok(Ok(chains)) => {
                let n = chains.len();
                Enrichment {
                    proposals: chains,
                    record: Some(json!({"outcome": "ok", "proposed": n})),
                }
            }
        }
    }

    async fn ask(
        &self,
        secret: &Secret,
        problem: &str,
        best: Option<&[&str]>,
    ) -> Result<Vec<Vec<String>>, String> {
        let codes: Vec<String> = CATALOG
            .iter()
            .map(|o| format!("{} ({}, unit {})", o.code, o.name, o.unit))
            .collect();
        let request = json!({
            "model": secret.model,
            "temperature": 0,
            "max_tokens": 200,
            "messages": [
                {"role": "system", "content": format!(
                    "You choose operator chains for a physics search. A chain is 1 to 3 codes from this catalog \
                     (KO42 is implicit and comes first): the first code is the head, any later code must have unit 1. \
                     Catalog: {}. Answer only JSON: {{\"chains\": [[\"CODE\", ...], ...]}}.", codes.join("; "))},
                {"role": "user", "content": format!("Problem: {problem}\nCurrent best chain: {}", best.map(|b| b.join(" → ")).unwrap_or_else(|| "none".into()))},
            ],
        });
        let (status, body) = post_json(
            &secret.base_url,
            &secret.api_key,
            &request,
            self.roots.clone(),
        )
        .await?;
        if !(200..300).contains(&status) {
            return Err(format!("http_status_{status}"));
        }
        parse_answer(&body).ok_or_else(|| "garbage".to_string())
    }
}

fn fallback(reason: String) -> Enrichment {
    Enrichment {
        proposals: Vec::new(),
        record: Some(json!({"outcome": "fallback", "reason": reason})),
    }
}

/// The chains in a chat-completions answer, if it holds at least one made of catalog codes.
pub fn parse_answer(body: &[u8]) -> Option<Vec<Vec<String>>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let content = v.pointer("/choices/0/message/content")?.as_str()?;
    let trimmed = content
        .trim()
        .trim_start_matches("```json")
        .trim_start_matches("```")
        .trim_end_matches("```")
        .trim();
    let answer: Value = serde_json::from_str(trimmed).ok()?;
    let chains = match &answer {
        Value::Object(o) => match (o.get("chains"), o.get("operators")) {
            (Some(Value::Array(c)), _) => c.clone(),
            (None, Some(ops @ Value::Array(_))) => vec![ops.clone()],
            _ => return None,
        },
        Value::Array(a) if a.iter().all(Value::is_string) => vec![answer.clone()],
        Value::Array(a) => a.clone(),
        _ => return None,
    };
    let valid: Vec<Vec<String>> = chains
        .iter()
        .take(10)
        .filter_map(|c| {
            let codes: Option<Vec<String>> = c
                .as_array()?
                .iter()
                .map(|x| x.as_str().map(str::to_owned))
                .collect();
            let codes = codes?;
            let ok = !codes.is_empty()
                && codes.len() <= 4
                && codes.iter().all(|c| catalog::find(c).is_some());
            ok.then_some(codes)
        })
        .collect();
    (!valid.is_empty()).then_some(valid)
}

/// One HTTP/1.1 POST; returns (status, body).
async fn post_json(
    base: &str,
    key: &str,
    body: &Value,
    roots: Arc<rustls::RootCertStore>,
) -> Result<(u16, Vec<u8>), String> {
    let uri: http::Uri = base
        .trim_end_matches('/')
        .parse()
        .map_err(|_| "bad_base_url".to_string())?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("bad_base_url".into()),
    };
    let host = uri
        .host()
        .ok_or("bad_base_url")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = format!("{}/chat/completions", uri.path().trim_end_matches('/'));
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header(
            http::header::HOST,
            uri.authority().map(|a| a.as_str()).unwrap_or(&host),
        )
        .header(http::header::AUTHORIZATION, format!("Bearer {key}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("smgate/", env!("CARGO_PKG_VERSION")),
        )
        .body(body.to_string())
        .map_err(|_| "bad_request".to_string())?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    if https {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|_| "bad_base_url".to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        exchange(TokioIo::new(tls), req).await
    } else {
        exchange(TokioIo::new(tcp), req).await
    }
}

/// Largest answer read from a model.
const MAX_ANSWER: usize = 256 * 1024;

async fn exchange<IO>(io: IO, req: http::Request<String>) -> Result<(u16, Vec<u8>), String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("http: {e}"))?;
    let driver = tokio::spawn(conn);
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| format!("http: {e}"));
    let res = match res {
        Ok(r) => r,
        Err(e) => {
            driver.abort();
            return Err(e);
        }
    };
    let status = res.status().as_u16();
    let mut body = res.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > MAX_ANSWER {
                driver.abort();
                return Err("answer_too_large".into());
            }
            bytes.extend_from_slice(&data);
        }
    }
    driver.abort();
    Ok((status, bytes))
}

/// Validates and seals a `POST /api/zeq/credentials` body.
pub fn new_credential(
    agents: &Agents,
    owner: &Zid,
    body: &Value,
    now_ms: i64,
) -> Result<Credential, AgentError> {
    let invalid = |code: &'static str, m: &str| AgentError::Invalid {
        code,
        message: m.into(),
    };
    let Value::Object(o) = body else {
        return Err(invalid("invalid_body", "the body must be a JSON object"));
    };
    let base_url = match o.get("base_url").and_then(Value::as_str) {
        Some(u) if u.len() <= 2048 && (u.starts_with("http://") || u.starts_with("https://")) && u.parse::<http::Uri>().is_ok_and(|u| u.host().is_some()) => u.to_owned(),
        _ => return Err(invalid("invalid_base_url", "base_url must be an http:// or https:// URL of an OpenAI-compatible API, e.g. https://api.openai.com/v1")),
    };
    let api_key = match o.get("api_key").and_then(Value::as_str) {
        Some(k) if !k.is_empty() && k.len() <= 4096 && !k.chars().any(char::is_control) => {
            k.to_owned()
        }
        _ => {
            return Err(invalid(
                "invalid_api_key",
                "api_key must be a non-empty string of at most 4096 bytes",
            ))
        }
    };
    let model = match o.get("model") {
        None | Some(Value::Null) => "gpt-4o-mini".to_owned(),
        Some(Value::String(m)) if !m.is_empty() && m.len() <= 200 => m.clone(),
        Some(_) => {
            return Err(invalid(
                "invalid_model",
                "model must be a string of 1–200 bytes",
            ))
        }
    };
    let name = match o.get("name") {
        None | Some(Value::Null) => "credential".to_owned(),
        Some(Value::String(n)) if n.chars().count() <= 100 => n.clone(),
        Some(_) => {
            return Err(invalid(
                "invalid_name",
                "name must be a string of at most 100 characters",
            ))
        }
    };
    let id = uuid::Uuid::new_v4().to_string();
    Ok(agents.seal(
        &id,
        owner,
        &name,
        &Secret {
            base_url,
            api_key,
            model,
        },
        now_ms,
    ))
}

pub fn store_credential(txn: &WriteTransaction, c: &Credential) -> Result<(), StoreError> {
    txn.open_table(CREDENTIALS)?
        .insert(c.id.as_str(), store::encode(c).as_slice())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agents(ikm: &[u8]) -> Agents {
        Agents::from_secret(AgentsConfig::default(), ikm)
    }

    #[test]
    fn sealed_credentials_open_only_with_the_same_identity_and_binding() {
        let a = agents(b"identity-one");
        let owner = Zid::parse("ZEQ00000000001").unwrap();
        let secret = Secret {
            base_url: "http://x".into(),
            api_key: "sk-secret-123".into(),
            model: "m".into(),
        };
        let c = a.seal("id-1", &owner, "n", &secret, 0);
        assert!(
            !c.sealed.windows(6).any(|w| w == b"sk-sec"),
            "the key is not stored in clear"
        );
        assert_eq!(a.unseal(&c), Some(secret));
        assert_eq!(agents(b"identity-two").unseal(&c), None);
        let moved = Credential {
            id: "id-2".into(),
            ..c.clone()
        };
        assert_eq!(a.unseal(&moved), None);
    }

    #[test]
    fn answers_must_name_catalog_operators() {
        let wrap = |content: &str| {
            json!({"choices": [{"message": {"content": content}}]})
                .to_string()
                .into_bytes()
        };
        assert_eq!(
            parse_answer(&wrap(r#"{"chains": [["IS01", "SH01"], ["NOPE"]]}"#)),
            Some(vec![vec!["IS01".to_string(), "SH01".to_string()]])
        );
        assert_eq!(
            parse_answer(&wrap("```json\n[\"GR37\"]\n```")),
            Some(vec![vec!["GR37".to_string()]])
        );
        assert_eq!(parse_answer(&wrap("I think you should use gravity")), None);
        assert_eq!(parse_answer(&wrap(r#"{"chains": [["XX99"]]}"#)), None);
        assert_eq!(parse_answer(b"not json"), None);
    }
}
