//! The native cache protocol (`/api/v1/cache`), the server side of
//! `strata_remote::native`: bulk "which are missing", packs both ways, and
//! action entries that are answered only when every object they name is
//! here. Formats: docs/FORMAT.md, "Remote cache".

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use strata_remote::native::{Refusal, UploadReport};
use strata_remote::pack::{
    decode_digests, encode_digests, Kind, PackError, PackReader, PackWriter, Receiver,
};
use strata_store::{ActionEntry, Digest, Family, Store};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{CacheState, Outcome, Protocol};
use crate::api::{blocking, ApiPath, ApiQuery, AppState, ChannelWriter};
use crate::error::{ApiError, ErrorBody};

type ApiResult<T> = Result<T, ApiError>;

fn parse_key(hex: &str) -> ApiResult<Digest> {
    let bytes = hex::decode(hex)
        .ok()
        .filter(|b| b.len() == 32)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "`{}` is not an action key: write 64 hex digits",
                hex.chars().take(80).collect::<String>()
            ))
        })?;
    Digest::from_slice(&bytes).ok_or_else(|| ApiError::bad_request("bad key"))
}

fn parse_digests(body: &[u8]) -> ApiResult<Vec<Digest>> {
    decode_digests(body).ok_or_else(|| {
        ApiError::bad_request(format!(
            "The body is {} bytes: send digests as 32 raw bytes each, back to back",
            body.len()
        ))
    })
}

/// Trees by digest, with their encoded bytes.
type Trees = Vec<(Digest, Vec<u8>)>;

/// An entry whose every object is stored, with the trees of its layers;
/// `None` when it is absent or incomplete (an incomplete one is dropped:
/// it can never be answered).
fn complete_entry(
    store: &Store,
    key: &Digest,
) -> strata_store::Result<Option<(ActionEntry, Trees)>> {
    let Some(entry) = store.action(key)? else {
        return Ok(None);
    };
    let closure = match store.closure(&entry.layers) {
        Ok(c) => c,
        Err(strata_store::Error::MissingTree(_)) => return drop_entry(store, key),
        Err(e) => return Err(e),
    };
    for d in closure.blobs.iter().map(|(d, _)| d).chain(&entry.blobs) {
        if !store.blobs().contains(d)? {
            return drop_entry(store, key);
        }
    }
    Ok(Some((entry, closure.trees)))
}

fn drop_entry<T>(store: &Store, key: &Digest) -> strata_store::Result<Option<T>> {
    eprintln!(
        "warning: action entry {} names an object that is gone; dropped",
        key.short()
    );
    let mut b = strata_store::Batch::new();
    b.delete(Family::Actions, key.as_bytes().to_vec());
    store.meta().write(b)?;
    Ok(None)
}

/// A pack written on a blocking thread and streamed as the body.
fn pack_response(
    write: impl FnOnce(&mut PackWriter<ChannelWriter>) -> std::io::Result<()> + Send + 'static,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(8);
    tokio::task::spawn_blocking(move || {
        let w = ChannelWriter::new(tx);
        // A failure mid-stream ends the body without the end frame: the
        // client refuses the pack whole.
        if let Ok(mut pack) = PackWriter::new(w) {
            if write(&mut pack).is_ok() {
                if let Ok(mut w) = pack.finish() {
                    let _ = std::io::Write::flush(&mut w);
                }
            }
        }
    });
    let mut res = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/zstd"),
    );
    res
}

/// What a lookup sends beside the entry.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LookupQuery {
    /// Send the trees of the entry's layers (default); `false` for a client
    /// that fetches layers only when it reads them (the entry is still
    /// answered only when the server holds all of it).
    pub trees: Option<bool>,
}

#[utoipa::path(get, path = "/api/v1/cache/actions/{key}", tag = "cache",
    params(("key" = String, Path, description = "The action key, 64 hex digits"), LookupQuery),
    responses((status = 200, description = "A pack (docs/FORMAT.md): the entry, then every tree of its layers (none with `trees=false`)",
        body = Vec<u8>, content_type = "application/zstd"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn lookup(
    State(state): State<AppState>,
    ApiPath(key): ApiPath<String>,
    ApiQuery(q): ApiQuery<LookupQuery>,
) -> ApiResult<Response> {
    let key = parse_key(&key)?;
    let store = state.store.clone();
    let found = blocking(move || complete_entry(&store, &key).map_err(ApiError::from)).await?;
    let with_trees = q.trees.unwrap_or(true);
    let cache = state.cache.clone();
    let Some((entry, trees)) = found else {
        cache.count(Protocol::Strata, Outcome::Miss);
        return Err(ApiError::not_found(format!(
            "No action {} in the cache",
            key.short()
        )));
    };
    cache.count(Protocol::Strata, Outcome::Hit);
    cache.touch(Family::Actions, key.as_bytes());
    let json = serde_json::to_vec(&entry).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(pack_response(move |pack| {
        pack.record(Kind::Action, &key, &json)?;
        for (d, bytes) in trees.iter().filter(|_| with_trees) {
            pack.record(Kind::Tree, d, bytes)?;
        }
        let (n, bytes) = pack.written();
        cache.moved(Protocol::Strata, false, n - 1, bytes - json.len() as u64);
        Ok(())
    }))
}

#[utoipa::path(post, path = "/api/v1/cache/missing", tag = "cache",
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "Digests, 32 raw bytes each"),
    responses((status = 200, description = "The digests of those the server holds neither as a blob nor as a tree",
        body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 400, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn missing(State(state): State<AppState>, body: Bytes) -> ApiResult<Response> {
    let digests = parse_digests(&body)?;
    let store = state.store.clone();
    let missing = blocking(move || {
        let mut out = Vec::new();
        for d in digests {
            if !store.blobs().contains(&d)? && !store.has_tree(&d)? {
                out.push(d);
            }
        }
        Ok(out)
    })
    .await?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        encode_digests(&missing),
    )
        .into_response())
}

#[utoipa::path(post, path = "/api/v1/cache/fetch", tag = "cache",
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "Digests of blobs or trees, 32 raw bytes each"),
    responses((status = 200, description = "A pack of those objects", body = Vec<u8>, content_type = "application/zstd"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn fetch(State(state): State<AppState>, body: Bytes) -> ApiResult<Response> {
    let digests = parse_digests(&body)?;
    let store = state.store.clone();
    // Each is a blob or a tree; know which (and that all are here) before 200.
    let kinds = blocking(move || {
        let mut out = Vec::with_capacity(digests.len());
        for d in digests {
            if store.blobs().contains(&d)? {
                out.push((d, Kind::Blob));
            } else if store.has_tree(&d)? {
                out.push((d, Kind::Tree));
            } else {
                return Err(ApiError::not_found(format!("No object {d} here")));
            }
        }
        Ok(out)
    })
    .await?;
    let store = state.store.clone();
    let cache = state.cache.clone();
    Ok(pack_response(move |pack| {
        for (d, kind) in &kinds {
            match kind {
                Kind::Tree => {
                    let bytes = store
                        .meta()
                        .get(Family::Trees, d.as_bytes())
                        .map_err(std::io::Error::other)?
                        .ok_or_else(|| std::io::Error::other("tree gone"))?;
                    pack.record(Kind::Tree, d, &bytes)?;
                }
                _ => pack.blobs_from(&store, std::slice::from_ref(d))?,
            }
        }
        let (n, bytes) = pack.written();
        cache.moved(Protocol::Strata, false, n, bytes);
        Ok(())
    }))
}

#[utoipa::path(post, path = "/api/v1/cache/trees", tag = "cache",
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "Root tree digests (layers), 32 raw bytes each"),
    responses((status = 200, description = "A pack of every tree under those roots", body = Vec<u8>, content_type = "application/zstd"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn trees(State(state): State<AppState>, body: Bytes) -> ApiResult<Response> {
    let roots = parse_digests(&body)?;
    let store = state.store.clone();
    let closure = blocking(move || match store.closure(&roots) {
        Err(strata_store::Error::MissingTree(d)) => {
            Err(ApiError::not_found(format!("No layer or tree {d} here")))
        }
        r => r.map_err(ApiError::from),
    })
    .await?;
    let cache = state.cache.clone();
    Ok(pack_response(move |pack| {
        for (d, bytes) in &closure.trees {
            pack.record(Kind::Tree, d, bytes)?;
        }
        let (n, bytes) = pack.written();
        cache.moved(Protocol::Strata, false, n, bytes);
        Ok(())
    }))
}

#[utoipa::path(post, path = "/api/v1/cache/upload", tag = "cache",
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "A pack: blobs, trees (each after those it names), layers, action entries"),
    responses((status = 200, description = "What was stored and which entries were refused", body = UploadReportDoc),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn upload(State(state): State<AppState>, body: Body) -> ApiResult<Response> {
    let stream = body
        .into_data_stream()
        .map_err(|e| std::io::Error::other(e.to_string()));
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let store = state.store.clone();
    let cache = state.cache.clone();
    let report = blocking(move || receive(&store, &cache, reader)).await?;
    state.cache.uploaded();
    Ok(axum::Json(report).into_response())
}

fn receive(
    store: &Store,
    cache: &CacheState,
    reader: impl std::io::Read,
) -> ApiResult<UploadReport> {
    let refused = |e: PackError| {
        cache.count(Protocol::Strata, Outcome::Refused);
        match e {
            PackError::Store(e) => ApiError::from(e),
            PackError::Io(e) => ApiError::bad_request(format!("The upload was cut short: {e}")),
            e => ApiError::bad_request(format!(
                "The upload was refused: {e}; nothing of it is visible"
            )),
        }
    };
    let mut rx = Receiver::new(store);
    let mut pack = PackReader::new(reader).map_err(refused)?;
    rx.read(&mut pack).map_err(refused)?;
    let (received, actions) = rx.commit().map_err(refused)?;
    cache.moved(Protocol::Strata, true, received.objects, received.bytes);
    let mut report = UploadReport {
        received,
        ..Default::default()
    };
    for (key, entry) in actions {
        let mut gone = store.first_missing(&entry.layers)?;
        for b in &entry.blobs {
            if gone.is_none() && !store.blobs().contains(b)? {
                gone = Some(*b);
            }
        }
        match gone {
            Some(d) => {
                cache.count(Protocol::Strata, Outcome::Refused);
                report.refused.push(Refusal {
                    key: key.to_hex(),
                    reason: format!("it names {d}, which neither the upload nor the server holds"),
                });
            }
            None => {
                store.put_action(&key, &entry)?;
                cache.count(Protocol::Strata, Outcome::Stored);
                cache.touch(Family::Actions, key.as_bytes());
                report.stored.push(key.to_hex());
            }
        }
    }
    store.sync()?;
    Ok(report)
}

/// The OpenAPI shape of [`UploadReport`].
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct UploadReportDoc {
    /// `{objects, bytes, new}`: what the pack held and how much was new.
    received: serde_json::Value,
    /// Action keys stored.
    stored: Vec<String>,
    /// `{key, reason}` for each entry refused.
    refused: Vec<serde_json::Value>,
}

/// Digest lists may be long (a layer of 100,000 files is 3.2 MB of them).
pub const LIST_LIMIT: usize = 64 << 20;

pub fn routes() -> axum::Router<AppState> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/cache/actions/{key}", get(lookup))
        .route("/cache/missing", post(missing))
        .route("/cache/fetch", post(fetch))
        .route("/cache/trees", post(trees))
        .layer(axum::extract::DefaultBodyLimit::max(LIST_LIMIT))
        .merge(
            axum::Router::new()
                .route("/cache/upload", post(upload))
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
}

/// Whether a POST to `path` only reads (the bulk queries).
pub fn is_read(path: &str) -> bool {
    ["/cache/missing", "/cache/fetch", "/cache/trees"]
        .iter()
        .any(|p| path.ends_with(p))
}
