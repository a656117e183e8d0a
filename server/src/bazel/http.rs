//! Bazel's HTTP cache protocol (also spoken by ccache's `layout=bazel` and
//! sccache's WebDAV-less HTTP backends): `/cas/{sha256}` holds content,
//! `/ac/{sha256}` action entries.
//!
//! - `GET` answers the bytes (streamed) or 404; `HEAD` says whether they are
//!   here; `PUT` stores them and answers 204.
//! - A `/cas/` upload is streamed into the blob store while it is hashed,
//!   whatever its size, and stored only if its SHA-256 is the one in the
//!   path (else 400, nothing stored).
//! - An `/ac/` upload that decodes as a REAPI `ActionResult` naming at
//!   least one object is an action entry: refused (400) unless every object
//!   it names is stored, and answered only while they all still are. Any
//!   other body (ccache puts its own entries there) is kept as it came, as
//!   an opaque entry whose one object is its own blob.
//!
//! Reads need a token under `--auth all`, writes a write token (401/403
//! with our JSON error body, as everywhere).

use std::io::Write;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use prost::Message;
use strata_store::{
    BazelAction, BazelActionKind, CasDigest, Committed, DigestFunction, Family, Store,
};
use tokio::sync::mpsc;

use super::{names_objects, result_refs, short, Refusal};
use crate::api::{blocking, ApiPath, AppState};
use crate::cache::{Outcome, Protocol};
use crate::error::{ApiError, ApiResult, ErrorBody};

/// An `/ac/` body up to this size is read as a possible `ActionResult`;
/// larger ones are opaque (Bazel's results are a few KiB).
const AC_DECODE_MAX: usize = 16 << 20;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ac/{hash}", get(ac_get).head(ac_head).put(ac_put))
        .route("/cas/{hash}", get(cas_get).head(cas_head).put(cas_put))
}

fn parse(hash: &str) -> ApiResult<CasDigest> {
    CasDigest::parse_hex(DigestFunction::Sha256, hash).ok_or_else(|| {
        ApiError::bad_request(format!(
            "`{}` is not a SHA-256 digest: write 64 hex digits",
            short(hash)
        ))
    })
}

/// The bytes of blob `blob`, streamed from a blocking thread.
fn blob_response(
    store: Store,
    blob: strata_store::Digest,
    size: u64,
    state: &AppState,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let cache = state.cache.clone();
    tokio::task::spawn_blocking(move || {
        let b = match store.blob(&blob) {
            Ok(b) => b,
            Err(e) => {
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                return;
            }
        };
        let mut offset = 0u64;
        let mut buf = vec![0u8; 256 << 10];
        while offset < b.size() {
            match b.read_at(&mut buf, offset) {
                Ok(0) => break,
                Ok(n) => {
                    offset += n as u64;
                    if tx
                        .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
        cache.moved(Protocol::BazelHttp, false, 1, offset);
    });
    let mut res = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    set_length(&mut res, size);
    res
}

fn set_length(res: &mut Response, size: u64) {
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
}

fn stored() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

/// What `/ac/{hash}` holds, complete, with its size.
enum AcHit {
    Inline(Vec<u8>),
    Blob(strata_store::Digest, u64),
}

async fn ac_lookup(state: &AppState, headers: &HeaderMap, hash: &str) -> ApiResult<Option<AcHit>> {
    state.tokens.check_read(headers)?;
    let key = parse(hash)?;
    let store = state.store.clone();
    let hit = blocking(move || {
        let Some(a) = store.bazel_action(&key)? else {
            return Ok(None);
        };
        Ok(Some(match a.kind {
            BazelActionKind::Result => AcHit::Inline(a.bytes),
            BazelActionKind::Opaque => {
                let Some(blob) = a
                    .refs
                    .first()
                    .map(|r| store.cas_blob(r))
                    .transpose()?
                    .flatten()
                else {
                    return Ok(None);
                };
                let size = store.blob(&blob)?.size();
                AcHit::Blob(blob, size)
            }
        }))
    })
    .await?;
    let outcome = if hit.is_some() {
        Outcome::Hit
    } else {
        Outcome::Miss
    };
    state.cache.count(Protocol::BazelHttp, outcome);
    if hit.is_some() {
        state
            .cache
            .touch(Family::BazelActions, &BazelAction::row_key(&key));
    }
    Ok(hit)
}

fn ac_missing(hash: &str) -> ApiError {
    ApiError::not_found(format!("No action `{}` in the cache", short(hash)))
}

#[utoipa::path(get, path = "/ac/{hash}", tag = "bazel",
    params(("hash" = String, Path, pattern = "^[0-9a-fA-F]{64}$", description = "The action's SHA-256, 64 hex digits")),
    responses(
        (status = 200, description = "The entry as it was stored (an ActionResult message, or ccache's bytes)",
            body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "No complete entry", body = ErrorBody)))]
pub async fn ac_get(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(hash): ApiPath<String>,
) -> ApiResult<Response> {
    match ac_lookup(&state, &headers, &hash).await? {
        None => Err(ac_missing(&hash)),
        Some(AcHit::Inline(bytes)) => {
            let mut res = Response::new(Body::from(bytes.clone()));
            set_length(&mut res, bytes.len() as u64);
            Ok(res)
        }
        Some(AcHit::Blob(blob, size)) => Ok(blob_response(state.store.clone(), blob, size, &state)),
    }
}

#[utoipa::path(head, path = "/ac/{hash}", tag = "bazel",
    params(("hash" = String, Path, pattern = "^[0-9a-fA-F]{64}$", description = "The action's SHA-256, 64 hex digits")),
    responses((status = 200, description = "A complete entry is here"),
        (status = 400, description = "Not a digest"), (status = 401, description = "A token is needed"),
        (status = 404, description = "No complete entry")))]
pub async fn ac_head(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(hash): ApiPath<String>,
) -> Response {
    match ac_lookup(&state, &headers, &hash).await {
        Ok(Some(hit)) => {
            let size = match hit {
                AcHit::Inline(b) => b.len() as u64,
                AcHit::Blob(_, s) => s,
            };
            let mut res = StatusCode::OK.into_response();
            set_length(&mut res, size);
            res
        }
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(e) => e.status.into_response(),
    }
}

async fn cas_lookup(
    state: &AppState,
    headers: &HeaderMap,
    hash: &str,
) -> ApiResult<Option<(strata_store::Digest, u64)>> {
    state.tokens.check_read(headers)?;
    let key = parse(hash)?;
    let store = state.store.clone();
    blocking(move || {
        let Some(blob) = store.cas_blob(&key)? else {
            return Ok(None);
        };
        // Gone between the lookup and the open: a miss.
        match store.blobs().open(&blob)? {
            Some(b) => Ok(Some((blob, b.size()))),
            None => Ok(None),
        }
    })
    .await
}

#[utoipa::path(get, path = "/cas/{hash}", tag = "bazel",
    params(("hash" = String, Path, pattern = "^[0-9a-fA-F]{64}$", description = "The content's SHA-256, 64 hex digits")),
    responses((status = 200, description = "The content", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn cas_get(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(hash): ApiPath<String>,
) -> ApiResult<Response> {
    match cas_lookup(&state, &headers, &hash).await? {
        Some((blob, size)) => Ok(blob_response(state.store.clone(), blob, size, &state)),
        None => Err(ApiError::not_found(format!(
            "No content `{}` here",
            short(&hash)
        ))),
    }
}

#[utoipa::path(head, path = "/cas/{hash}", tag = "bazel",
    params(("hash" = String, Path, pattern = "^[0-9a-fA-F]{64}$", description = "The content's SHA-256, 64 hex digits")),
    responses((status = 200, description = "The content is here"),
        (status = 400, description = "Not a digest"), (status = 401, description = "A token is needed"),
        (status = 404, description = "Not here")))]
pub async fn cas_head(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(hash): ApiPath<String>,
) -> Response {
    match cas_lookup(&state, &headers, &hash).await {
        Ok(Some((_, size))) => {
            let mut res = StatusCode::OK.into_response();
            set_length(&mut res, size);
            res
        }
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(e) => e.status.into_response(),
    }
}

/// Streams a request body into a blocking writer made by `open`, keeping
/// the first `keep` bytes in memory too; the writer and what was kept come
/// back once the body ends. A body that breaks off is an error (400).
async fn stage<W: Write + Send + 'static>(
    body: Body,
    keep: usize,
    open: impl FnOnce() -> strata_store::Result<W> + Send + 'static,
) -> ApiResult<(W, Vec<u8>, u64)> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let writer = tokio::task::spawn_blocking(move || -> ApiResult<(W, Vec<u8>, u64)> {
        let mut w = open()?;
        let mut kept = Vec::new();
        let mut total = 0u64;
        while let Some(chunk) = rx.blocking_recv() {
            if kept.len() < keep {
                let room = keep - kept.len();
                kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            total += chunk.len() as u64;
            w.write_all(&chunk)
                .map_err(|e| ApiError::internal(format!("Cannot stage the upload: {e}")))?;
        }
        Ok((w, kept, total))
    });
    let mut stream = body.into_data_stream();
    let mut broken = None;
    while let Some(frame) = stream.next().await {
        match frame {
            Ok(chunk) => {
                if tx.send(chunk).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                broken = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let staged = writer
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    if let Some(e) = broken {
        return Err(ApiError::bad_request(format!(
            "The upload broke off: {e}; nothing was stored"
        )));
    }
    Ok(staged)
}

#[utoipa::path(put, path = "/cas/{hash}", tag = "bazel",
    params(("hash" = String, Path, pattern = "^[0-9a-fA-F]{64}$", description = "The content's SHA-256, 64 hex digits")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "The content; any size, streamed"),
    responses((status = 204, description = "Stored"),
        (status = 400, description = "The body's SHA-256 is not the one in the path; nothing stored", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn cas_put(
    State(state): State<AppState>,
    ApiPath(hash): ApiPath<String>,
    req: Request,
) -> ApiResult<Response> {
    state.tokens.check_write(req.headers())?;
    let key = parse(&hash)?;
    let store = state.store.clone();
    let (writer, _, size) = stage(req.into_body(), 0, move || {
        store.cas_writer(DigestFunction::Sha256)
    })
    .await?;
    let store = state.store.clone();
    let committed = blocking(move || Ok(writer.commit(&store, &key, None)?)).await?;
    match committed {
        Committed::Stored { .. } => {
            state.cache.moved(Protocol::BazelHttp, true, 1, size);
            Ok(stored())
        }
        Committed::Mismatch { got, .. } => {
            state.cache.count(Protocol::BazelHttp, Outcome::Refused);
            Err(ApiError::bad_request(format!(
                "The body's SHA-256 is {}, not {}; nothing was stored",
                got.to_hex(),
                key.to_hex()
            )))
        }
    }
}

#[utoipa::path(put, path = "/ac/{hash}", tag = "bazel",
    params(("hash" = String, Path, pattern = "^[0-9a-fA-F]{64}$", description = "The action's SHA-256, 64 hex digits")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "An ActionResult message (its objects must be stored first), or opaque bytes"),
    responses((status = 204, description = "Stored"),
        (status = 400, description = "An ActionResult naming an object that is not stored; nothing stored", body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn ac_put(
    State(state): State<AppState>,
    ApiPath(hash): ApiPath<String>,
    req: Request,
) -> ApiResult<Response> {
    state.tokens.check_write(req.headers())?;
    let key = parse(&hash)?;
    let store = state.store.clone();
    let (writer, kept, _) = stage(req.into_body(), AC_DECODE_MAX + 1, move || {
        store.cas_writer(DigestFunction::Blake3)
    })
    .await?;
    let store = state.store.clone();
    let outcome = blocking(move || {
        let result = (kept.len() <= AC_DECODE_MAX)
            .then(|| {
                bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult::decode(
                    &kept[..],
                )
                .ok()
            })
            .flatten()
            .filter(names_objects);
        // No object may be swept between the checks and the entry.
        let _hold = store.hold();
        let put = match result {
            Some(result) => {
                drop(writer);
                let refs = match result_refs(&store, DigestFunction::Sha256, &result)? {
                    Ok(refs) => refs,
                    Err(r) => return Ok(Err(r)),
                };
                store.put_bazel_action(&key, BazelActionKind::Result, refs, kept)?
            }
            None => {
                let own = writer.commit_any(&store)?;
                store.put_bazel_action(&key, BazelActionKind::Opaque, vec![own], Vec::new())?
            }
        };
        Ok(put.map_err(Refusal::Missing))
    })
    .await?;
    match outcome {
        Ok(()) => {
            state.cache.count(Protocol::BazelHttp, Outcome::Stored);
            state
                .cache
                .touch(Family::BazelActions, &BazelAction::row_key(&key));
            Ok(stored())
        }
        Err(r) => {
            state.cache.count(Protocol::BazelHttp, Outcome::Refused);
            Err(ApiError::bad_request(format!("{r}; nothing was stored")))
        }
    }
}
