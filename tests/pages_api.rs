//! Machine pages (spec 001) over real TLS: every route and its codes, limits, the proof digest
//! against an independent computation, the public site's caching, encoding and sandbox
//! headers, 413 without buffering, the CLI, and SIGKILL during publishes.

mod common;

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{call, cli, Gw};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MANY: &[(&str, &str)] = &[
    ("SMGATE_LIMITS_SPINUP_PER_MINUTE_PER_IP", "100000"),
    ("SMGATE_LIMITS_WRITES_PER_MINUTE_PER_MACHINE", "10000000"),
    ("SMGATE_LIMITS_READS_PER_MINUTE_PER_MACHINE", "10000000"),
];

const PAGE_CSP: &str =
    "sandbox allow-scripts allow-forms allow-popups; default-src 'self' 'unsafe-inline' data:; connect-src 'self'";

fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// spec 001's digest, written out here independently of the gateway's code.
fn digest(slug: &str, page: &str, html: &str, version: u64, owner: &str) -> String {
    sha_hex(
        format!(
            "{slug}|{page}|{}|{version}|{owner}",
            sha_hex(html.as_bytes())
        )
        .as_bytes(),
    )
}

fn api(slug: &str, rest: &str) -> String {
    format!("/api/state-machines/{slug}/pages{rest}")
}

async fn machine(gw: &Gw, slug: &str, public: bool) -> String {
    let (s, b, _) = call(
        &gw.client(),
        Method::POST,
        &gw.url("/api/chain/state-machines"),
        Some(&gw.owner_key),
        Some(json!({"slug": slug, "is_public": public})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    b["api_key"].as_str().unwrap().to_string()
}

async fn machine_key(gw: &Gw, slug: &str, scope: &str) -> String {
    let (s, b, _) = call(
        &gw.client(),
        Method::POST,
        &gw.url(&format!("/api/chain/{slug}/api-keys")),
        Some(&gw.owner_key),
        Some(json!({"name": scope, "scope": scope})),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    b["api_key"].as_str().unwrap().to_string()
}

async fn publish(
    gw: &Gw,
    key: &str,
    slug: &str,
    page: &str,
    title: &str,
    html: &str,
) -> (u16, Value) {
    let body = json!({"title": title, "html": html, "agentZid": "ZEQ-agent-1"});
    let (s, b, _) = call(
        &gw.client(),
        Method::POST,
        &gw.url(&api(slug, &format!("/{page}/publish"))),
        Some(key),
        Some(body),
    )
    .await;
    (s, b)
}

async fn rows(gw: &Gw, slug: &str) -> Vec<Value> {
    let url = gw.url(&format!(
        "/api/chain/state-machines/{slug}/explore?from=0&to=10000"
    ));
    let (s, b, _) = call(&gw.client(), Method::GET, &url, Some(&gw.owner_key), None).await;
    assert_eq!(s, 200, "{b}");
    b["rows"].as_array().unwrap().clone()
}

/// A client that does not follow redirects and sends only the headers it is given.
fn raw_client(gw: &Gw) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&gw.cert_pem()).unwrap())
        .tls_built_in_root_certs(false)
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_read_history_and_log_rows() {
    let gw = Gw::start(MANY);
    let c = gw.client();
    machine(&gw, "fleet", false).await;
    let v1 = "<!doctype html><h1>hello</h1>";
    let v2 = "<!doctype html><h1>hello again</h1>";
    let (s, b) = publish(&gw, &gw.owner_key, "fleet", "hello", "My Page", v1).await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(b["ok"], true);
    assert_eq!(b["version"], 1);
    assert_eq!(b["url"], "/s/fleet/p/hello/");
    assert_eq!(b["htmlSha256"], sha_hex(v1.as_bytes()).as_str());
    assert_eq!(
        b["proof_digest"],
        digest("fleet", "hello", v1, 1, &gw.owner_zid).as_str()
    );
    let (s, b2) = publish(&gw, &gw.owner_key, "fleet", "hello", "My Page 2", v2).await;
    assert_eq!((s, b2["version"].as_u64()), (201, Some(2)), "{b2}");
    assert_eq!(
        b2["proof_digest"],
        digest("fleet", "hello", v2, 2, &gw.owner_zid).as_str()
    );

    // Reads are public: no key, on a private machine.
    let (s, list, _) = call(&c, Method::GET, &gw.url(&api("fleet", "")), None, None).await;
    assert_eq!(s, 200, "{list}");
    assert_eq!(list["count"], 1);
    assert_eq!(list["pages"][0]["pageSlug"], "hello");
    assert_eq!(list["pages"][0]["version"], 2);
    assert_eq!(list["pages"][0]["title"], "My Page 2");
    let (s, one, _) = call(
        &c,
        Method::GET,
        &gw.url(&api("fleet", "/hello")),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200, "{one}");
    assert_eq!(one["page"]["html"], v2);
    assert_eq!(one["page"]["version"], 2);
    assert_eq!(one["page"]["agentZid"], "ZEQ-agent-1");
    assert_eq!(one["page"]["proof_digest"], b2["proof_digest"]);
    assert_eq!(one["page"]["pythonScript"], Value::Null);
    let (s, h, _) = call(
        &c,
        Method::GET,
        &gw.url(&api("fleet", "/hello/history")),
        None,
        None,
    )
    .await;
    assert_eq!(s, 200, "{h}");
    assert_eq!(
        (h["latestVersion"].as_u64(), h["liveVersion"].as_u64()),
        (Some(2), Some(2))
    );
    let versions: Vec<(u64, bool)> = h["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["version"].as_u64().unwrap(), v["live"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        versions,
        [(2, true), (1, false)],
        "publish flips the previous version off"
    );
    assert!(
        !h.to_string().contains("hello again"),
        "history carries no HTML"
    );

    // The log has one deploy_published row per publish, with hashes and title, not the HTML.
    let all = rows(&gw, "fleet").await;
    let deploys: Vec<&Value> = all
        .iter()
        .filter(|r| r["type"] == "deploy_published")
        .collect();
    assert_eq!(deploys.len(), 2);
    let p = &deploys[1]["payload"];
    assert_eq!(p["slug"], "fleet");
    assert_eq!(p["pageSlug"], "hello");
    assert_eq!(p["version"], 2);
    assert_eq!(p["html_sha256"], sha_hex(v2.as_bytes()).as_str());
    assert_eq!(p["proof_digest"], b2["proof_digest"]);
    assert_eq!(p["title"], "My Page 2");
    assert_eq!(deploys[1]["seq"], b2["row"]["seq"]);
    assert_eq!(deploys[1]["hash"], b2["row"]["hash"]);
    assert!(
        !serde_json::to_string(&all).unwrap().contains("<h1>"),
        "no HTML in the log"
    );

    // pythonScript is stored and returned as given.
    let py = "import os\nos.system('rm -rf /')  # never executed\n";
    let body = json!({"title": "t", "html": "<p>py</p>", "agentZid": "ZEQ123", "pythonScript": py});
    let (s, b, _) = call(
        &c,
        Method::POST,
        &gw.url(&api("fleet", "/py/publish")),
        Some(&gw.owner_key),
        Some(body),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let (_, one, _) = call(&c, Method::GET, &gw.url(&api("fleet", "/py")), None, None).await;
    assert_eq!(one["page"]["pythonScript"], py);
    assert_eq!(one["page"]["hasPythonScript"], true);

    // Unknown machine, unknown page, bad page slug.
    let (s, b, _) = call(&c, Method::GET, &gw.url(&api("nope", "")), None, None).await;
    assert_eq!((s, b["error"].as_str()), (404, Some("machine_not_found")));
    let (s, b, _) = call(
        &c,
        Method::GET,
        &gw.url(&api("fleet", "/missing")),
        None,
        None,
    )
    .await;
    assert_eq!((s, b["error"].as_str()), (404, Some("page_not_found")));
    let (s, b, _) = call(
        &c,
        Method::GET,
        &gw.url(&api("fleet", "/missing/history")),
        None,
        None,
    )
    .await;
    assert_eq!((s, b["error"].as_str()), (404, Some("page_not_found")));
    let (s, b, _) = call(
        &c,
        Method::GET,
        &gw.url(&api("fleet", "/Bad_Slug")),
        None,
        None,
    )
    .await;
    assert_eq!((s, b["error"].as_str()), (400, Some("invalid_page_slug")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublish_and_rollback_make_new_versions_and_rows() {
    let gw = Gw::start(MANY);
    let c = gw.client();
    let admin = machine(&gw, "rb", true).await;
    let (a, b) = ("<p>first</p>", "<p>second</p>");
    assert_eq!(publish(&gw, &admin, "rb", "home", "A", a).await.0, 201);
    assert_eq!(publish(&gw, &admin, "rb", "home", "B", b).await.0, 201);
    let k = Some(gw.owner_key.as_str());

    let (s, u, _) = call(
        &c,
        Method::POST,
        &gw.url(&api("rb", "/home/unpublish")),
        k,
        None,
    )
    .await;
    assert_eq!(s, 200, "{u}");
    assert_eq!(
        (u["version"].as_u64(), u["page"]["live"].as_bool()),
        (Some(2), Some(false))
    );
    let (s, e, _) = call(&c, Method::GET, &gw.url(&api("rb", "/home")), None, None).await;
    assert_eq!((s, e["error"].as_str()), (404, Some("page_not_found")));
    let res = raw_client(&gw)
        .get(gw.url("/s/rb/p/home/"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let (s, e, _) = call(
        &c,
        Method::POST,
        &gw.url(&api("rb", "/home/unpublish")),
        k,
        None,
    )
    .await;
    assert_eq!((s, e["error"].as_str()), (409, Some("page_not_published")));
    let (_, list, _) = call(&c, Method::GET, &gw.url(&api("rb", "")), None, None).await;
    assert_eq!(
        list["count"], 0,
        "anonymous callers see published pages only: {list}"
    );
    let (_, list, _) = call(&c, Method::GET, &gw.url(&api("rb", "")), k, None).await;
    assert_eq!(
        (list["count"].as_u64(), list["pages"][0]["live"].as_bool()),
        (Some(1), Some(false))
    );

    // Rollback re-publishes version 1's content as version 3, with version 3's digest.
    let (s, r, _) = call(
        &c,
        Method::POST,
        &gw.url(&api("rb", "/home/rollback")),
        k,
        Some(json!({"version": 1})),
    )
    .await;
    assert_eq!(s, 201, "{r}");
    assert_eq!(r["version"], 3);
    assert_eq!(r["htmlSha256"], sha_hex(a.as_bytes()).as_str());
    assert_eq!(
        r["proof_digest"],
        digest("rb", "home", a, 3, &gw.owner_zid).as_str()
    );
    assert_eq!(r["page"]["title"], "A");
    assert_eq!(r["page"]["rolledBackFrom"], 1);
    let res = raw_client(&gw)
        .get(gw.url("/s/rb/p/home/"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), a);

    for (body, status, code) in [
        (json!({"version": 99}), 404, "version_not_found"),
        (json!({"version": 0}), 400, "invalid_version"),
        (json!({"version": "1"}), 400, "invalid_version"),
        (json!({}), 400, "invalid_version"),
    ] {
        let (s, e, _) = call(
            &c,
            Method::POST,
            &gw.url(&api("rb", "/home/rollback")),
            k,
            Some(body.clone()),
        )
        .await;
        assert_eq!(
            (s, e["error"].as_str()),
            (status, Some(code)),
            "{body}: {e}"
        );
        assert_eq!(e["ok"], false);
    }
    let (s, e, _) = call(
        &c,
        Method::POST,
        &gw.url(&api("rb", "/nope/rollback")),
        k,
        Some(json!({"version": 1})),
    )
    .await;
    assert_eq!((s, e["error"].as_str()), (404, Some("page_not_found")));
    let (s, e, _) = call(
        &c,
        Method::POST,
        &gw.url(&api("rb", "/nope/unpublish")),
        k,
        None,
    )
    .await;
    assert_eq!((s, e["error"].as_str()), (404, Some("page_not_found")));

    let (_, h, _) = call(
        &c,
        Method::GET,
        &gw.url(&api("rb", "/home/history")),
        None,
        None,
    )
    .await;
    let got: Vec<u64> = h["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(got, [3, 2, 1]);
    let kinds: Vec<String> = rows(&gw, "rb")
        .await
        .iter()
        .map(|r| r["type"].as_str().unwrap().to_string())
        .skip(2)
        .collect();
    assert_eq!(
        kinds,
        [
            "deploy_published",
            "deploy_published",
            "page_unpublished",
            "page_rolled_back"
        ]
    );
    let all = rows(&gw, "rb").await;
    assert_eq!(
        all[4]["payload"]["version"], 2,
        "unpublish row names the version taken offline"
    );
    assert_eq!(all[5]["payload"]["from_version"], 1);
    assert_eq!(all[5]["payload"]["proof_digest"], r["proof_digest"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_validation_auth_and_limits() {
    let gw = Gw::start(MANY);
    let c = gw.client();
    machine(&gw, "val", true).await;
    machine(&gw, "other", true).await;
    let k = Some(gw.owner_key.as_str());
    let url = gw.url(&api("val", "/p/publish"));
    let ok = json!({"title": "T", "html": "<p>x</p>", "agentZid": "ZEQ123"});
    let with = |patch: Value| {
        let mut b = ok.clone();
        for (key, v) in patch.as_object().unwrap() {
            b[key] = v.clone();
        }
        b
    };
    let mb2 = 2 * 1024 * 1024;
    for (body, status, code) in [
        (with(json!({"title": ""})), 400, "invalid_title"),
        (
            with(json!({"title": "t".repeat(201)})),
            400,
            "invalid_title",
        ),
        (with(json!({"title": 7})), 400, "invalid_title"),
        (
            json!({"html": "<p>x</p>", "agentZid": "ZEQ123"}),
            400,
            "invalid_title",
        ),
        (with(json!({"html": ""})), 400, "invalid_html"),
        (with(json!({"html": ["x"]})), 400, "invalid_html"),
        (
            json!({"title": "T", "agentZid": "ZEQ123"}),
            400,
            "invalid_html",
        ),
        (with(json!({"agentZid": "ZEQ12"})), 400, "invalid_agent_zid"),
        (
            with(json!({"agentZid": "zeq12345"})),
            400,
            "invalid_agent_zid",
        ),
        (
            with(json!({"agentZid": format!("ZEQ{}", "1".repeat(29))})),
            400,
            "invalid_agent_zid",
        ),
        (
            with(json!({"agentZid": "ZEQ12_45"})),
            400,
            "invalid_agent_zid",
        ),
        (
            json!({"title": "T", "html": "<p>x</p>"}),
            400,
            "invalid_agent_zid",
        ),
        (
            with(json!({"pythonScript": 12})),
            400,
            "invalid_python_script",
        ),
        (
            with(json!({"pythonScript": "p".repeat(256 * 1024 + 1)})),
            413,
            "payload_too_large",
        ),
        (
            with(json!({"html": "h".repeat(mb2 + 1)})),
            413,
            "payload_too_large",
        ),
        (json!([1, 2]), 400, "invalid_body"),
    ] {
        let (s, e, _) = call(&c, Method::POST, &url, k, Some(body.clone())).await;
        assert_eq!(
            (s, e["error"].as_str()),
            (status, Some(code)),
            "{}: {e}",
            &body.to_string()[..body.to_string().len().min(80)]
        );
        assert_eq!(e["ok"], false);
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Exactly at the limits is fine.
    let big = with(
        json!({"title": "é".repeat(200), "html": "h".repeat(mb2), "pythonScript": "p".repeat(256 * 1024),
        "agentZid": format!("ZEQ{}", "a".repeat(28))}),
    );
    let (s, b, _) = call(&c, Method::POST, &url, k, Some(big)).await;
    assert_eq!((s, b["version"].as_u64()), (201, Some(1)), "{b}");
    let (s, e, _) = call(
        &c,
        Method::POST,
        &gw.url(&api("val", "/Bad/publish")),
        k,
        Some(ok.clone()),
    )
    .await;
    assert_eq!((s, e["error"].as_str()), (400, Some("invalid_page_slug")));
    let (s, e, _) = call(
        &c,
        Method::POST,
        &gw.url(&api("val", &format!("/{}/publish", "a".repeat(65)))),
        k,
        Some(ok.clone()),
    )
    .await;
    assert_eq!((s, e["error"].as_str()), (400, Some("invalid_page_slug")));
    let (s, e, _) = call(
        &c,
        Method::POST,
        &gw.url(&api("val", "/p/frobnicate")),
        k,
        Some(ok.clone()),
    )
    .await;
    assert_eq!((s, e["error"].as_str()), (404, Some("not_found")));

    // Who may write: owner, operator and admin keys of this machine; not viewers, anonymous
    // callers, or keys of another machine.
    let viewer = machine_key(&gw, "val", "viewer").await;
    let operator = machine_key(&gw, "val", "operator").await;
    let other_admin = machine_key(&gw, "other", "admin").await;
    let (s, e, _) = call(&c, Method::POST, &url, None, Some(ok.clone())).await;
    assert_eq!((s, e["error"].as_str()), (401, Some("unauthorized")));
    let (s, e, _) = call(
        &c,
        Method::POST,
        &url,
        Some("zsm_notakey"),
        Some(ok.clone()),
    )
    .await;
    assert_eq!((s, e["error"].as_str()), (401, Some("unauthorized")));
    let (s, e, _) = call(&c, Method::POST, &url, Some(&viewer), Some(ok.clone())).await;
    assert_eq!((s, e["error"].as_str()), (403, Some("forbidden")));
    let (s, e, _) = call(&c, Method::POST, &url, Some(&other_admin), Some(ok.clone())).await;
    assert_eq!(
        (s, e["error"].as_str()),
        (403, Some("forbidden")),
        "a public machine is visible, but not writable: {e}"
    );
    let (s, e, _) = call(
        &c,
        Method::POST,
        &gw.url(&api("nope", "/p/publish")),
        k,
        Some(ok.clone()),
    )
    .await;
    assert_eq!((s, e["error"].as_str()), (404, Some("machine_not_found")));
    for action in ["unpublish", "rollback"] {
        let u = gw.url(&api("val", &format!("/p/{action}")));
        let (s, _, _) = call(
            &c,
            Method::POST,
            &u,
            Some(&viewer),
            Some(json!({"version": 1})),
        )
        .await;
        assert_eq!(s, 403, "{action}");
        let (s, _, _) = call(&c, Method::POST, &u, None, Some(json!({"version": 1}))).await;
        assert_eq!(s, 401, "{action}");
    }
    let (s, b, _) = call(&c, Method::POST, &url, Some(&operator), Some(ok.clone())).await;
    assert_eq!((s, b["version"].as_u64()), (201, Some(2)), "{b}");
    let (s, _, _) = call(
        &c,
        Method::POST,
        &gw.url(&api("val", "/p/rollback")),
        Some(&operator),
        Some(json!({"version": 1})),
    )
    .await;
    assert_eq!(s, 201);
    let (s, _, _) = call(
        &c,
        Method::POST,
        &gw.url(&api("val", "/p/unpublish")),
        Some(&operator),
        None,
    )
    .await;
    assert_eq!(s, 200);
}

async fn tls(gw: &Gw) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&gw.cert_pem()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap()
}

async fn read_head(stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("an answer before the body ends")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_bodies_get_413_before_they_are_sent() {
    let gw = Gw::start(MANY);
    machine(&gw, "big", false).await;
    let head = |extra: &str| {
        format!(
            "POST /api/state-machines/big/pages/p/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\n{extra}\r\n",
            gw.owner_key
        )
    };
    // A declared 100 MB body: refused from the header alone, after 1 KiB was sent.
    let mut s = tls(&gw).await;
    s.write_all(head("Content-Length: 104857600\r\n").as_bytes())
        .await
        .unwrap();
    s.write_all(&[b' '; 1024]).await.unwrap();
    let answer = read_head(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    // A chunked body with no declared length: refused once it passes the limit, while the
    // client is still sending (the body never ends).
    let mut s = tls(&gw).await;
    s.write_all(head("Transfer-Encoding: chunked\r\n").as_bytes())
        .await
        .unwrap();
    let chunk = vec![b' '; 256 * 1024];
    let started = Instant::now();
    for _ in 0..24 {
        s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(&chunk).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    let answer = read_head(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // Nothing was published.
    let (s, _, _) = call(
        &gw.client(),
        Method::GET,
        &gw.url(&api("big", "/p/history")),
        None,
        None,
    )
    .await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_site_caches_compresses_and_sandboxes() {
    let gw = Gw::start(MANY);
    machine(&gw, "site", false).await;
    machine(&gw, "empty", false).await;
    machine(&gw, "open", true).await;
    let html = format!(
        "<!doctype html><title>t</title>{}",
        "<p>compressible line of text</p>\n".repeat(500)
    );
    let (s, b) = publish(&gw, &gw.owner_key, "site", "home", "Home <&>", &html).await;
    assert_eq!(s, 201, "{b}");
    let c = raw_client(&gw);
    let url = gw.url("/s/site/p/home/");
    let etag = format!("\"{}\"", sha_hex(html.as_bytes()));

    let res = c.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let h = res.headers().clone();
    assert_eq!(h["etag"], etag.as_str());
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["vary"], "Accept-Encoding");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["content-security-policy"], PAGE_CSP);
    assert!(h.get("content-encoding").is_none());
    assert_eq!(res.text().await.unwrap(), html);

    let res = c
        .get(&url)
        .header("accept-encoding", "gzip, deflate, br")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["content-encoding"], "br");
    assert_eq!(res.headers()["etag"], etag.as_str());
    let body = res.bytes().await.unwrap();
    assert!(body.len() < html.len() / 5);
    let mut out = String::new();
    brotli::Decompressor::new(&body[..], 4096)
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, html);

    let res = c
        .get(&url)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["content-encoding"], "gzip");
    let body = res.bytes().await.unwrap();
    let mut out = String::new();
    flate2::read::GzDecoder::new(&body[..])
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out, html);
    let res = c
        .get(&url)
        .header("accept-encoding", "br;q=0, gzip;q=0")
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("content-encoding").is_none());

    // Conditional GET.
    let res = c
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 304);
    assert_eq!(res.headers()["etag"], etag.as_str());
    assert_eq!(res.headers()["vary"], "Accept-Encoding");
    assert!(res.bytes().await.unwrap().is_empty());
    let res = c
        .get(&url)
        .header("if-none-match", "\"stale\", W/".to_string() + etag.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 304);
    let res = c
        .get(&url)
        .header("if-none-match", "\"stale\"")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // HEAD: the GET's headers, no body.
    let res = c
        .head(&url)
        .header("accept-encoding", "br")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["etag"], etag.as_str());
    assert_eq!(res.headers()["content-encoding"], "br");
    assert_eq!(res.headers()["content-security-policy"], PAGE_CSP);
    assert!(res.bytes().await.unwrap().is_empty());
    let res = c.head(&url).send().await.unwrap();
    assert_eq!(
        res.headers()["content-length"],
        html.len().to_string().as_str()
    );
    let h1 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&gw.cert_pem()).unwrap())
        .tls_built_in_root_certs(false)
        .use_rustls_tls()
        .http1_only()
        .build()
        .unwrap();
    for _ in 0..2 {
        // Twice on one HTTP/1.1 connection: a HEAD answer that carried a body would corrupt the next.
        let res = h1.head(&url).send().await.unwrap();
        assert_eq!(res.version(), reqwest::Version::HTTP_11);
        assert_eq!(
            res.headers()["content-length"],
            html.len().to_string().as_str()
        );
        assert!(res.bytes().await.unwrap().is_empty());
    }
    assert_eq!(
        h1.get(&url).send().await.unwrap().text().await.unwrap(),
        html
    );

    // Without the trailing slash: a permanent redirect to the slash form, query kept.
    let res = c.get(gw.url("/s/site/p/home")).send().await.unwrap();
    assert_eq!(res.status(), 308);
    assert_eq!(res.headers()["location"], "/s/site/p/home/");
    let res = c.get(gw.url("/s/site/p/home?x=1")).send().await.unwrap();
    assert_eq!(res.headers()["location"], "/s/site/p/home/?x=1");
    let res = c.get(gw.url("/s/site")).send().await.unwrap();
    assert_eq!(
        (
            res.status().as_u16(),
            res.headers()["location"].to_str().unwrap()
        ),
        (308, "/s/site/")
    );

    // A new publish changes the ETag at once (no-cache: browsers revalidate).
    let (s, _) = publish(&gw, &gw.owner_key, "site", "home", "Home 2", "<p>v2</p>").await;
    assert_eq!(s, 201);
    let res = c
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "<p>v2</p>");

    // The index lists published pages, escaped.
    let res = c.get(gw.url("/s/site/")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .starts_with("default-src 'none'"));
    let text = res.text().await.unwrap();
    assert!(text.contains("<a href=\"p/home/\">Home 2</a>"), "{text}");
    let (s, _) = publish(&gw, &gw.owner_key, "site", "esc", "A <b>&</b>", "<p>x</p>").await;
    assert_eq!(s, 201);
    let text = c
        .get(gw.url("/s/site/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("A &lt;b&gt;&amp;&lt;/b&gt;"), "{text}");

    // Sites that do not exist: unknown machines, private machines without published pages,
    // unknown pages, bad slugs. A public machine has a site even when empty.
    for path in [
        "/s/nope/",
        "/s/empty/",
        "/s/site/p/nope/",
        "/s/site/p/Bad/",
        "/s/BAD/p/home/",
        "/s/empty/state.json",
        "/s/site/x/y",
    ] {
        let res = c.get(gw.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 404, "{path}");
    }
    let res = c.get(gw.url("/s/open/")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = c.post(gw.url("/s/site/p/home/")).send().await.unwrap();
    assert_eq!(res.status(), 404);

    // state.json answers an opaque origin, without credentials.
    let res = c
        .get(gw.url("/s/site/state.json"))
        .header("origin", "null")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["access-control-allow-origin"], "*");
    assert!(res
        .headers()
        .get("access-control-allow-credentials")
        .is_none());
    let v: Value = res.json().await.unwrap();
    assert_eq!(v, json!({"slug": "site", "instances": []}));

    // With an instance, state.json shows its public view: context.public and nothing else.
    let def = json!({"id": "lamp", "initial": "off",
        "context": {"public": {"count": 0}, "secret": "s3cret"},
        "states": {"off": {"on": {"FLIP": {"target": "on"}}}, "on": {"tags": ["lit"]}}});
    let (s, b, _) = call(
        &c,
        Method::POST,
        &gw.url("/machines/site/v"),
        Some(&gw.owner_key),
        Some(json!({"definition": def, "clientInfo": "v1", "makeCurrent": true})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, b, _) = call(
        &c,
        Method::POST,
        &gw.url("/machines/site"),
        Some(&gw.owner_key),
        Some(json!({"slug": "lamp-1", "context": {"public": {"count": 7}, "secret": "s3cret"}})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let (s, b, _) = call(
        &c,
        Method::POST,
        &gw.url("/machines/site/i/lamp-1/events"),
        Some(&gw.owner_key),
        Some(json!({"event": "FLIP"})),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let text = c
        .get(gw.url("/s/site/state.json"))
        .header("origin", "null")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("s3cret"), "private context leaked: {text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let list = v["instances"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["instance"], "lamp-1");
    assert_eq!(list[0]["state"], "on");
    assert_eq!(list[0]["publicContext"], json!({"count": 7}));
    assert_eq!(list[0]["tags"], json!(["lit"]));
    assert_eq!(list[0]["done"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_site_deploy_publishes_a_file() {
    let gw = Gw::start(MANY);
    let operator = {
        machine(&gw, "cli", false).await;
        machine_key(&gw, "cli", "operator").await
    };
    let file = gw.dir.path().join("index.html");
    std::fs::write(&file, "<!doctype html><h1>from the CLI</h1>\n").unwrap();
    let url = format!("https://{}", gw.addr);
    let data = gw.data();
    let (file_s, data_s) = (
        file.to_str().unwrap().to_string(),
        data.to_str().unwrap().to_string(),
    );
    let owner_key = gw.owner_key.clone();
    let run = move |args: Vec<String>, key: Option<String>| {
        let mut cmd = std::process::Command::new(common::BIN);
        cmd.arg("--data")
            .arg(&data_s)
            .args(&args)
            .env_remove("SMGATE_KEY");
        if let Some(k) = key {
            cmd.env("SMGATE_KEY", k);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let args = |extra: &[&str]| {
        let mut a: Vec<String> = ["site", "deploy", "cli", "home", &file_s, "--url", &url]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let (run1, args1, owner1) = (
        run.clone(),
        args(&["--title", "From the CLI"]),
        owner_key.clone(),
    );
    let (ok, out, err) = tokio::task::spawn_blocking(move || run1(args1, Some(owner1)))
        .await
        .unwrap();
    assert!(ok, "{out}{err}");
    assert!(out.contains("published cli/home version 1"), "{out}");
    let html = "<!doctype html><h1>from the CLI</h1>\n";
    assert!(
        out.contains(&digest("cli", "home", html, 1, &gw.owner_zid)),
        "{out}"
    );
    assert!(out.contains("/s/cli/p/home/"), "{out}");
    let res = raw_client(&gw)
        .get(gw.url("/s/cli/p/home/"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), html);
    let (_, one, _) = call(
        &gw.client(),
        Method::GET,
        &gw.url(&api("cli", "/home")),
        None,
        None,
    )
    .await;
    assert_eq!(
        (
            one["page"]["title"].as_str(),
            one["page"]["agentZid"].as_str()
        ),
        (Some("From the CLI"), Some(gw.owner_zid.as_str()))
    );

    // --key and an operator machine key, --agent-zid, the default title (file stem).
    let (run2, args2) = (
        run.clone(),
        args(&["--key", &operator, "--agent-zid", "ZEQ-cli-agent"]),
    );
    let (ok, out, err) = tokio::task::spawn_blocking(move || run2(args2, None))
        .await
        .unwrap();
    assert!(ok && out.contains("version 2"), "{out}{err}");
    let (_, one, _) = call(
        &gw.client(),
        Method::GET,
        &gw.url(&api("cli", "/home")),
        None,
        None,
    )
    .await;
    assert_eq!(
        (
            one["page"]["title"].as_str(),
            one["page"]["agentZid"].as_str()
        ),
        (Some("index"), Some("ZEQ-cli-agent"))
    );
    // Refusals come back with the gateway's code.
    let (run3, args3) = (run.clone(), args(&["--agent-zid", "bad"]));
    let (ok, _, err) = tokio::task::spawn_blocking(move || run3(args3, Some(owner_key)))
        .await
        .unwrap();
    assert!(!ok && err.contains("400 invalid_agent_zid"), "{err}");
    let (run4, args4) = (run, args(&["--key", "zsm_wrong"]));
    let (ok, _, err) = tokio::task::spawn_blocking(move || run4(args4, None))
        .await
        .unwrap();
    assert!(!ok && err.contains("401"), "{err}");
}

/// SIGKILL while publishes are in flight: after a restart every answered publish is there
/// with its content, versions run 1..n without gaps, and the live version is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_publishes_loses_no_answered_version() {
    let mut gw = Gw::start(MANY);
    machine(&gw, "crash", true).await;
    let (client, base, key) = (gw.client(), gw.url(""), gw.owner_key.clone());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..6 {
        let (client, base, key, stop) = (client.clone(), base.clone(), key.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut answered = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                // Pages of a few sizes, some repeated content (content-addressed blobs).
                let html = format!(
                    "<p>worker {w} publish {}</p>{}",
                    n % 7,
                    "x".repeat((n % 3) * 40_000)
                );
                let body =
                    json!({"title": format!("w{w} n{n}"), "html": html, "agentZid": "ZEQ-crash"});
                let res = client
                    .post(format!("{base}{}", api("crash", &format!("/w{w}/publish"))))
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status() == 201 => {
                        let v: Value = r.json().await.unwrap_or(Value::Null);
                        if let Some(version) = v["version"].as_u64() {
                            answered.push((version, sha_hex(html.as_bytes())));
                        }
                    }
                    Ok(r) => panic!("unexpected {}", r.status()),
                    Err(_) => break, // the gateway died under us
                }
            }
            answered
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gw.kill();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = Vec::new();
    for w in workers {
        answered.push(w.await.unwrap());
    }
    assert!(
        answered.iter().map(Vec::len).sum::<usize>() > 6,
        "too few publishes to mean anything"
    );

    gw.spawn();
    let c = gw.client();
    let raw = raw_client(&gw);
    for (w, got) in answered.iter().enumerate() {
        let (s, h, _) = call(
            &c,
            Method::GET,
            &gw.url(&api("crash", &format!("/w{w}/history"))),
            None,
            None,
        )
        .await;
        if got.is_empty() && s == 404 {
            continue;
        }
        assert_eq!(s, 200, "{h}");
        let versions = h["versions"].as_array().unwrap();
        let latest = h["latestVersion"].as_u64().unwrap();
        let numbers: Vec<u64> = versions
            .iter()
            .map(|v| v["version"].as_u64().unwrap())
            .collect();
        assert_eq!(
            numbers,
            (1..=latest).rev().collect::<Vec<_>>(),
            "versions have no gaps"
        );
        assert_eq!(h["liveVersion"].as_u64(), Some(latest));
        for (version, sha) in got {
            let stored = &versions[(latest - version) as usize];
            assert_eq!(
                stored["htmlSha256"].as_str(),
                Some(sha.as_str()),
                "answered v{version} of w{w}"
            );
        }
        assert!(latest >= got.last().map_or(0, |g| g.0));
        // The live one is served, with its content.
        let res = raw
            .get(gw.url(&format!("/s/crash/p/w{w}/")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let body = res.bytes().await.unwrap();
        assert_eq!(sha_hex(&body), versions[0]["htmlSha256"].as_str().unwrap());
        // Every answered version can be brought back and served.
        if let Some((version, sha)) = got.first() {
            let (s, r, _) = call(
                &c,
                Method::POST,
                &gw.url(&api("crash", &format!("/w{w}/rollback"))),
                Some(&gw.owner_key),
                Some(json!({"version": version})),
            )
            .await;
            assert_eq!(s, 201, "{r}");
            let body = raw
                .get(gw.url(&format!("/s/crash/p/w{w}/")))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(&sha_hex(&body), sha);
        }
    }
    // The log still verifies end to end.
    assert!(gw.stop().success());
    let (ok, out, err) = cli(&gw.data(), &["verify"]);
    assert!(ok, "{out}{err}");
}
