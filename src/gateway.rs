//! The gateway's own identity and data directory: Ed25519 key, self-signed TLS certificate,
//! the redb file and the owner account, all made by `init`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::auth::{self, Zid};
use crate::clock;
use crate::ledger::GatewayKey;
use crate::store::{self, GroupCommit, Store, StoreError, StoreOptions, META};

/// Every domain module's tables in a gateway's database, for [`StoreOptions::tables`]: the
/// store creates them in a new database and runs their migrations.
pub const TABLES: &[store::Tables] = &[
    crate::ledger::log::TABLES,
    crate::instances::TABLES,
    crate::pages::TABLES,
    crate::agents::TABLES,
];

/// Where a gateway keeps its files: the data directory, and the TLS files (which the
/// configuration may place elsewhere).
#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Paths {
    pub fn db(&self) -> PathBuf {
        self.dir.join("smgate.redb")
    }

    pub fn identity(&self) -> PathBuf {
        self.dir.join("identity.pk8")
    }

    pub fn is_initialised(&self) -> bool {
        self.db().exists()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is already initialised (it has smgate.redb); nothing was changed")]
    AlreadyInitialised(PathBuf),
    #[error("identity key {0} is not a valid Ed25519 PKCS#8 key")]
    BadIdentity(PathBuf),
    #[error("cannot generate the TLS certificate: {0}")]
    Certificate(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InitError + '_ {
    move |source| InitError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `bytes` to a new file readable only by its owner.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), InitError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io(path))
}

/// The gateway's signing identity (made once by `init`, never rotated silently).
pub struct Identity {
    /// `gw-` and 16 hex digits of SHA-256 of the public key: stable, and safe in note names.
    pub id: String,
    pub key: GatewayKey,
}

impl Identity {
    pub fn load(path: &Path) -> Result<Identity, InitError> {
        let pkcs8 = fs::read(path).map_err(io(path))?;
        let key =
            GatewayKey::from_pkcs8(&pkcs8).map_err(|_| InitError::BadIdentity(path.to_owned()))?;
        let digest = auth::sha256(&key.public_key());
        let id = format!("gw-{}", crate::ledger::hex::encode(&digest[..8]));
        Ok(Identity { id, key })
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.public_key()
    }

    /// The signed-note verifier key `<id>+<key hash>+<base64(0x01 ‖ public key)>`.
    pub fn verifier_key(&self) -> String {
        // The id is `gw-` + hex, always a valid note name.
        self.key.verifier_key(&self.id).unwrap_or_default()
    }
}

/// The identity file's bytes: the keying material of secrets derived from the identity (the
/// agents' credential sealing key).
pub fn identity_secret(paths: &Paths) -> Result<Vec<u8>, InitError> {
    let path = paths.identity();
    fs::read(&path).map_err(io(&path))
}

/// What `init` made; the raw owner key is here once and in `<data>/initial-owner.key`.
pub struct Initialised {
    pub gateway_id: String,
    pub owner: Zid,
    pub owner_key: String,
    pub key_file: PathBuf,
}

/// Writes a self-signed certificate for localhost, the loopback addresses and this host's name,
/// unless both files exist. Used by `init` and by `smgate hub` for its own data directory.
pub fn ensure_tls_files(cert_path: &Path, key_path: &Path) -> Result<(), InitError> {
    if cert_path.exists() && key_path.exists() {
        return Ok(());
    }
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Ok(host) = fs::read_to_string("/etc/hostname") {
        let host = host.trim();
        if !host.is_empty() && host != "localhost" {
            names.push(host.to_string());
        }
    }
    let certified = rcgen::generate_simple_self_signed(names)
        .map_err(|e| InitError::Certificate(e.to_string()))?;
    for p in [cert_path, key_path] {
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
    }
    fs::write(cert_path, certified.cert.pem()).map_err(io(cert_path))?;
    write_private(key_path, certified.key_pair.serialize_pem().as_bytes())
}

/// Creates the data directory, identity, TLS files, database and owner account.
pub async fn init(paths: &Paths, options: StoreOptions) -> Result<Initialised, InitError> {
    let dir = &paths.dir;
    if paths.is_initialised() {
        return Err(InitError::AlreadyInitialised(dir.clone()));
    }
    fs::create_dir_all(dir).map_err(io(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;

    let id_path = paths.identity();
    if !id_path.exists() {
        let pkcs8 = GatewayKey::generate().map_err(|_| InitError::BadIdentity(id_path.clone()))?;
        write_private(&id_path, &pkcs8)?;
    }
    let identity = Identity::load(&id_path)?;

    ensure_tls_files(&paths.cert, &paths.key)?;

    let store = Store::open(&paths.db(), options)?;
    let writer = GroupCommit::start(store);
    let gateway_id = identity.id.clone();
    let (account, owner_key) = writer
        .write(move |txn| -> Result<_, StoreError> {
            let now = clock::now_ms();
            let (account, raw) = auth::create_account(txn, "owner", now)?;
            let mut meta = txn.open_table(META)?;
            meta.insert("owner_zid", store::encode(&account.zid).as_slice())?;
            meta.insert("gateway_id", store::encode(&gateway_id).as_slice())?;
            Ok((account, raw))
        })
        .await?;
    writer.shutdown().await;

    let key_file = dir.join("initial-owner.key");
    write_private(&key_file, format!("{owner_key}\n").as_bytes())?;
    Ok(Initialised {
        gateway_id: identity.id,
        owner: account.zid,
        owner_key,
        key_file,
    })
}
