//! Bearer tokens. A token is shown once, when it is made; the store keeps
//! only its BLAKE3 hash, in `<store>/serve/tokens.json`, so `ci serve token
//! create` works while a server runs (the server re-reads the file when it
//! changes). No token ever enters a log or an error message.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use axum::http::HeaderMap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ServerError};

/// What the file keeps of one token.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenRecord {
    pub name: String,
    /// BLAKE3 of the token's text, hex.
    pub hash: String,
    /// Read-only tokens may read (with `--auth all`) but never change anything.
    pub read_only: bool,
    /// Seconds since the epoch.
    pub created: u64,
}

#[derive(Default, Serialize, Deserialize)]
struct TokenFile {
    tokens: Vec<TokenRecord>,
}

/// Who is asking: the name of a valid token and whether it may write.
#[derive(Clone, Debug)]
pub struct Caller {
    pub name: String,
    pub read_only: bool,
}

/// Where a store keeps what `ci serve` adds beside it.
pub fn serve_dir(store_root: &Path) -> PathBuf {
    store_root.join("serve")
}

fn token_path(store_root: &Path) -> PathBuf {
    serve_dir(store_root).join("tokens.json")
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ServerError {
    let path = path.to_owned();
    move |source| ServerError::Io {
        action,
        path,
        source,
    }
}

fn read_file(path: &Path) -> Result<TokenFile, ServerError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| ServerError::TokenFile {
            path: path.to_owned(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenFile::default()),
        Err(e) => Err(io("read", path)(e)),
    }
}

/// Writes `bytes` to `path` whole, durably, through a rename, readable by
/// its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ServerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("write", &tmp))?;
    f.write_all(bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("replace", path))
}

fn write_file(path: &Path, file: &TokenFile) -> Result<(), ServerError> {
    write_private(path, &serde_json::to_vec_pretty(file).unwrap_or_default())
}

/// Changes the token file under an exclusive lock (two `token create` at
/// once both land).
fn update<T>(
    store_root: &Path,
    f: impl FnOnce(&mut TokenFile) -> Result<T, ServerError>,
) -> Result<T, ServerError> {
    let path = token_path(store_root);
    let dir = serve_dir(store_root);
    std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    let lock_path = dir.join("tokens.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io("open", &lock_path))?;
    lock.lock().map_err(io("lock", &lock_path))?;
    let mut file = read_file(&path)?;
    let out = f(&mut file)?;
    write_file(&path, &file)?;
    Ok(out)
}

pub fn hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Makes a token: returns its text (shown once) and what is stored of it.
pub fn create(store_root: &Path, name: &str, read_only: bool) -> Result<String, ServerError> {
    if !valid_name(name) {
        return Err(ServerError::BadTokenName(name.to_owned()));
    }
    let token = format!("strata_{}", hex::encode(random32("a token")?));
    let record = TokenRecord {
        name: name.to_owned(),
        hash: hash(&token),
        read_only,
        created: now_secs(),
    };
    update(store_root, |file| {
        if file.tokens.iter().any(|t| t.name == name) {
            return Err(ServerError::DuplicateToken(name.to_owned()));
        }
        file.tokens.push(record);
        Ok(())
    })?;
    Ok(token)
}

pub fn list(store_root: &Path) -> Result<Vec<TokenRecord>, ServerError> {
    Ok(read_file(&token_path(store_root))?.tokens)
}

pub fn revoke(store_root: &Path, name: &str) -> Result<(), ServerError> {
    update(store_root, |file| {
        let before = file.tokens.len();
        file.tokens.retain(|t| t.name != name);
        if file.tokens.len() == before {
            return Err(ServerError::UnknownToken(name.to_owned()));
        }
        Ok(())
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Which requests need a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// Reads are open; writes need a write token.
    Writes,
    /// Every request under `/api` needs a token; writes a write token.
    All,
}

/// The server's view of the token file, re-read when it changes.
pub struct Tokens {
    path: Option<PathBuf>,
    mode: AuthMode,
    cache: Mutex<Cached>,
    /// The hash of this server's local token (see [`write_local_token`]).
    local: Mutex<Option<String>>,
}

/// The name under which the local token acts.
pub const LOCAL: &str = "local";

/// Makes this server's local token and writes it to `<store>/serve/local-token`,
/// readable by the store's owner only: whoever may write the store directory
/// may already do anything to it, so a plain `ci build` on a store a server
/// owns goes through the server with this token. Returns its hash.
pub fn write_local_token(store_root: &Path) -> Result<String, ServerError> {
    let token = format!("strata_local_{}", hex::encode(random32("the local token")?));
    write_private(&serve_dir(store_root).join("local-token"), token.as_bytes())?;
    Ok(hash(&token))
}

/// 32 random bytes from the operating system.
fn random32(what: &'static str) -> Result<[u8; 32], ServerError> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| ServerError::Io {
        action: "draw random bytes for",
        path: PathBuf::from(what),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(raw)
}

/// The local token of the server that owns the store at `store_root`.
pub fn read_local_token(store_root: &Path) -> Option<String> {
    std::fs::read_to_string(serve_dir(store_root).join("local-token"))
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

#[derive(Default)]
struct Cached {
    stamp: Option<(SystemTime, u64, u64)>,
    tokens: Arc<Vec<TokenRecord>>,
}

impl Tokens {
    pub fn new(store_root: Option<&Path>, mode: AuthMode) -> Tokens {
        Tokens {
            path: store_root.map(token_path),
            mode,
            cache: Mutex::new(Cached::default()),
            local: Mutex::new(None),
        }
    }

    /// Accepts `hash` as the local token's (a write token named `local`).
    pub fn set_local(&self, hash: String) {
        *self.local.lock() = Some(hash);
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    fn current(&self) -> Arc<Vec<TokenRecord>> {
        let Some(path) = &self.path else {
            return Arc::default();
        };
        let stamp = std::fs::metadata(path).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                m.len(),
                m.ino(),
            )
        });
        let mut cache = self.cache.lock();
        if cache.stamp != stamp || stamp.is_none() {
            // A file that cannot be read holds no valid token: refuse, never open up.
            cache.tokens = Arc::new(read_file(path).map(|f| f.tokens).unwrap_or_default());
            cache.stamp = stamp;
        }
        cache.tokens.clone()
    }

    /// The caller named by `Authorization: Bearer …`, if any. A header that is
    /// there but wrong is an error (401), never taken as anonymous.
    pub fn caller(&self, headers: &HeaderMap) -> Result<Option<Caller>, ApiError> {
        let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
            return Ok(None);
        };
        let bad = || {
            ApiError::unauthorized(
                "The `Authorization` header is not a valid bearer token; send `Authorization: Bearer <token>` with a token from `ci serve token create`",
            )
        };
        let text = value.to_str().map_err(|_| bad())?;
        let token = text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
            .ok_or_else(bad)?
            .trim();
        let h = hash(token);
        if self
            .local
            .lock()
            .as_ref()
            .is_some_and(|l| constant_eq(l.as_bytes(), h.as_bytes()))
        {
            return Ok(Some(Caller {
                name: LOCAL.to_owned(),
                read_only: false,
            }));
        }
        let tokens = self.current();
        // Compare hashes: equal-length digests, so the time taken says nothing
        // of how much of a guess was right.
        let found = tokens
            .iter()
            .find(|t| constant_eq(t.hash.as_bytes(), h.as_bytes()));
        match found {
            Some(t) => Ok(Some(Caller {
                name: t.name.clone(),
                read_only: t.read_only,
            })),
            None => Err(bad()),
        }
    }

    /// Checks a request that reads.
    pub fn check_read(&self, headers: &HeaderMap) -> Result<Option<Caller>, ApiError> {
        let caller = self.caller(headers)?;
        if self.mode == AuthMode::All && caller.is_none() {
            return Err(ApiError::unauthorized(
                "This server needs a token for reads too (`--auth all`); send `Authorization: Bearer <token>`",
            ));
        }
        Ok(caller)
    }

    /// Checks a request that changes something: it needs a write token.
    pub fn check_write(&self, headers: &HeaderMap) -> Result<Caller, ApiError> {
        match self.caller(headers)? {
            None => Err(ApiError::unauthorized(
                "Changing anything needs a token; send `Authorization: Bearer <token>` with a token from `ci serve token create NAME`",
            )),
            Some(c) if c.read_only => Err(ApiError::forbidden(format!(
                "Token `{}` is read-only; use a token made without `--read-only`",
                c.name
            ))),
            Some(c) => Ok(c),
        }
    }
}

pub fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
