//! `smgate key mint|list|revoke`, offline.

use super::{offline_store, zid, CliError};
use crate::auth::{self, KeyRecord, KeySubject, Role};
use crate::clock;
use crate::config::Config;
use crate::store::GroupCommit;

/// Which keys `key list` shows: all, or one account's or one machine's.
pub type KeyFilter = Option<KeySubject>;

/// The subject of `--account ZID` or `--machine SLUG [--role ROLE]` (at most one is given;
/// `None` when neither is).
pub fn subject(
    account: Option<&str>,
    machine: Option<&str>,
    role: Option<&str>,
) -> Result<Option<KeySubject>, CliError> {
    match (account, machine) {
        (Some(z), None) => Ok(Some(KeySubject::Account { zid: zid(z)? })),
        (None, Some(slug)) => {
            let role = match role {
                Some(r) => Role::parse(r).ok_or_else(|| {
                    CliError::Usage(format!("role `{r}` is not viewer, operator or admin"))
                })?,
                None => Role::Viewer,
            };
            // Not a slug: no machine has it (the answer `key mint` gives an unknown machine).
            let slug = auth::Slug::parse(slug)
                .ok_or_else(|| CliError::Missing("no such account or machine".into()))?;
            Ok(Some(KeySubject::Machine { slug, role }))
        }
        _ => Ok(None),
    }
}

/// Mints a key for `subject` and prints it once. Machine keys are logged on the machine's
/// chain, as the HTTP API logs them.
pub async fn key_mint(
    config: &Config,
    subject: Option<KeySubject>,
    name: String,
    expires_in_days: Option<u32>,
) -> Result<(), CliError> {
    let subject =
        subject.ok_or_else(|| CliError::Usage("give --account ZID or --machine SLUG".into()))?;
    let writer = GroupCommit::start(offline_store(config)?);
    let ttl = expires_in_days.map(|d| i64::from(d) * 86_400_000);
    let minted = writer
        .write(move |txn| -> Result<_, CliError> {
            if !auth::subject_exists(txn, &subject)? {
                return Err(CliError::Missing("no such account or machine".into()));
            }
            let now = clock::now_ms();
            let expires = ttl.map(|t| now + t);
            Ok(match subject {
                KeySubject::Machine { slug, role } => {
                    crate::machines::mint_key(txn, &slug, role, &name, expires, "cli", now)?
                }
                account => auth::mint_key(txn, account, &name, expires, now)?,
            })
        })
        .await;
    writer.shutdown().await;
    let (raw, record) = minted?;
    println!("id {}\nkey {raw}\n(shown once; store it now)", record.id);
    Ok(())
}

/// Lists keys (never the raw keys: only id, name, hint, dates).
pub fn key_list(config: &Config, wanted: KeyFilter) -> Result<(), CliError> {
    let store = offline_store(config)?;
    let keys = store.view(|txn| {
        auth::list_keys(txn, |s| match (&wanted, s) {
            (None, _) => true,
            (Some(KeySubject::Account { zid: a }), KeySubject::Account { zid: b }) => a == b,
            (Some(KeySubject::Machine { slug: a, .. }), KeySubject::Machine { slug: b, .. }) => {
                a == b
            }
            _ => false,
        })
    })?;
    println!(
        "{:<36}  {:<24}  {:<12}  {:<16}  {:<20}  status",
        "id", "subject", "name", "hint", "created"
    );
    for k in keys {
        let subject = match &k.subject {
            KeySubject::Account { zid } => format!("account {zid}"),
            KeySubject::Machine { slug, role } => format!("{slug} ({})", role.as_str()),
        };
        let status = if k.revoked_ms.is_some() {
            "revoked"
        } else if k.is_live(clock::now_ms()) {
            "active"
        } else {
            "expired"
        };
        println!(
            "{:<36}  {:<24}  {:<12}  {:<16}  {:<20}  {status}",
            k.id,
            subject,
            k.name,
            k.hint,
            clock::rfc3339(k.created_ms)
        );
    }
    Ok(())
}

/// Revokes a key by id; machine keys are logged on the machine's chain.
pub async fn key_revoke(config: &Config, id: String) -> Result<(), CliError> {
    let writer = GroupCommit::start(offline_store(config)?);
    let record = writer
        .write(move |txn| match auth::key_by_id_in(txn, &id)? {
            Some(KeyRecord {
                subject: KeySubject::Machine { slug, .. },
                ..
            }) => crate::machines::revoke_key(txn, &slug, &id, "cli", clock::now_ms()),
            _ => auth::revoke_key(txn, &id, |_| true, clock::now_ms()),
        })
        .await;
    writer.shutdown().await;
    match record? {
        Some(k) => {
            println!("revoked {}", k.id);
            Ok(())
        }
        None => Err(CliError::Missing("no key with that id".into())),
    }
}
