//! The other offline commands: `init`, `identity`, `account`, `verify`, `chart`, `bench`, and
//! `site deploy` (a client of a running gateway).

use std::io::Write as _;
use std::path::Path;

use super::{offline_store, print_owner, read, zid, CliError, SiteDeploy};
use crate::config::Config;
use crate::store::GroupCommit;
use crate::{auth, chart, clock, gateway};

/// `smgate init`: makes the data directory and prints the owner key once.
pub async fn init(config: &Config) -> Result<(), CliError> {
    let made = gateway::init(&config.paths(), config.store_options()).await?;
    print_owner(&made);
    Ok(())
}

/// `smgate identity`: the gateway id and note verifier key (what `smgate hub enroll` takes).
pub fn identity(config: &Config) -> Result<(), CliError> {
    let id = gateway::Identity::load(&config.paths().identity())?;
    println!("gateway {}", id.id);
    println!("verifier_key {}", id.verifier_key());
    Ok(())
}

/// `smgate account create`: a fresh ZID and its first key, printed once.
pub async fn account_create(config: &Config, name: String) -> Result<(), CliError> {
    let writer = GroupCommit::start(offline_store(config)?);
    let made = writer
        .write(move |txn| auth::create_account(txn, &name, clock::now_ms()))
        .await;
    writer.shutdown().await;
    let (account, raw) = made?;
    println!(
        "account {}\nkey {raw}\n(shown once; store it now)",
        account.zid
    );
    Ok(())
}

/// `smgate account credit`: adds ZEQ to an account's wallet and prints the balance.
pub async fn account_credit(config: &Config, account: &str, amount: i64) -> Result<(), CliError> {
    let zid = zid(account)?;
    let writer = GroupCommit::start(offline_store(config)?);
    let who = zid.clone();
    let balance = writer
        .write(move |txn| crate::agents::credit(txn, &who, amount))
        .await;
    writer.shutdown().await;
    let balance = balance?.ok_or_else(|| CliError::Missing(format!("no account {zid}")))?;
    println!("account {zid} balance {balance}");
    Ok(())
}

/// `smgate verify`: every machine's log (or `only`'s) against the invariants of
/// `ledger::log`, with progress on a terminal; fails naming the first broken row.
pub fn verify(config: &Config, only: Option<&str>) -> Result<(), CliError> {
    let store = offline_store(config)?;
    let machines = store.view(crate::machines::all)?;
    let selected: Vec<_> = machines
        .iter()
        .filter(|m| only.is_none_or(|s| s == m.slug.as_str()))
        .collect();
    if let Some(s) = only.filter(|_| selected.is_empty()) {
        return Err(CliError::Missing(format!("no machine `{s}`")));
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut total = 0;
    for m in &selected {
        let report = store.view(|txn| {
            crate::ledger::log::verify_machine(txn, &m.slug, |done, all| {
                if tty {
                    eprint!(
                        "\r{}: {done}/{all} rows ({}%)",
                        m.slug,
                        done * 100 / all.max(1)
                    );
                    let _ = std::io::stderr().flush();
                }
            })
        })?;
        if tty {
            eprintln!();
        }
        if let Some((seq, why)) = report.broken {
            return Err(CliError::Broken {
                machine: m.slug.to_string(),
                seq,
                why,
            });
        }
        println!("{}: {} rows ok", m.slug, report.rows);
        total += report.rows;
    }
    println!("verified {} machine(s), {total} rows", selected.len());
    Ok(())
}

/// `smgate chart check`: pure, offline; prints `ok` or the error with its JSON path.
pub fn chart_check(file: &Path) -> Result<(), CliError> {
    chart::check(&read(file)?)?;
    println!("ok");
    Ok(())
}

/// `smgate chart simulate`: one JSON line per input line.
pub fn chart_simulate(file: &Path, events: &Path) -> Result<(), CliError> {
    let lines = chart::simulate(&read(file)?, &read(events)?)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for line in lines {
        writeln!(out, "{line}").map_err(CliError::Output)?;
    }
    out.flush().map_err(CliError::Output)
}

/// `smgate site deploy`: spec 001's publish call with the HTML read from a file.
pub async fn site_deploy(config: &Config, args: SiteDeploy) -> Result<(), CliError> {
    use crate::http::client;
    let html = read(&args.file)?;
    let python = args.python.as_deref().map(read).transpose()?;
    let title = args.title.unwrap_or_else(|| {
        args.file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| args.page.clone())
    });
    let cacert = args.cacert.unwrap_or_else(|| config.cert_path());
    let base = args.url.trim_end_matches('/').to_string();
    let page = client::Page {
        slug: &args.slug,
        page: &args.page,
        title,
        html,
        python,
        agent_zid: args.agent_zid,
    };
    let published = client::publish_page(&base, &cacert, &args.key, page).await?;
    println!(
        "published {}/{} version {}",
        args.slug, args.page, published.version
    );
    println!("proof_digest {}", published.proof_digest);
    println!("url {base}{}", published.url);
    Ok(())
}

/// `smgate bench fill-log`: appends `rows` event rows to `slug`'s log offline, as
/// `POST …/event` would, 10,000 per transaction (to build a sync backlog quickly).
#[cfg(feature = "bench-tools")]
pub async fn fill_log(config: &Config, slug: String, rows: u64) -> Result<(), CliError> {
    use crate::ledger::log::{Entry, LogWriter};
    let slug = auth::Slug::parse(&slug)
        .ok_or_else(|| CliError::Missing(format!("no machine `{slug}`")))?;
    let writer = GroupCommit::start(offline_store(config)?);
    let mut done = 0u64;
    while done < rows {
        let n = (rows - done).min(10_000);
        let (s, first) = (slug.clone(), done);
        let appended = writer
            .write(move |txn| -> Result<(), CliError> {
                let mut log = LogWriter::open(txn)?;
                if log.head(&s)?.is_none() {
                    return Err(CliError::Missing(format!("no machine `{s}`")));
                }
                let now = clock::now_ms();
                for i in first..first + n {
                    let hash = auth::sha256(&i.to_be_bytes());
                    let payload = serde_json::json!({"type": "fill", "payload_hash": crate::ledger::hex::encode(&hash)});
                    log.append(&s, Entry::json("event", "bench", &payload), now)?;
                }
                log.finish()?;
                Ok(())
            })
            .await;
        if let Err(e) = appended {
            writer.shutdown().await;
            return Err(e);
        }
        done += n;
    }
    writer.shutdown().await;
    println!("appended {rows} rows to {slug}");
    Ok(())
}
