//! Layers: what `ci store show|ls|cat|diff|export` say, over HTTP. A layer
//! is a digest, a unique prefix, a ref, or a URL-encoded `//pkg:name` (the
//! latest output of that task in `?workspace=`, or in the only workspace).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use strata_store::{ChangeRow, Digest, Entry, Kind, LayerStats, Lineage, Listed, RelPath, Store};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use utoipa::{IntoParams, ToSchema};

use super::{blocking, ApiPath, ApiQuery, AppState, ChannelWriter};
use crate::error::{ApiError, ApiResult, ErrorBody};

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LayerQuery {
    /// The workspace whose `//pkg:name` is meant (default: the only one served).
    pub workspace: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TreeQuery {
    pub workspace: Option<String>,
    /// List everything below, not only the directory's own entries (at most 100,000).
    #[serde(default)]
    pub recursive: bool,
}

const TREE_MAX: usize = 100_000;

/// Resolves a layer as the API takes it.
fn resolve(state: &AppState, store: &Store, spec: &str, ws: Option<&str>) -> ApiResult<Digest> {
    if spec.starts_with("//") {
        let label = super::workspaces::path_label(spec)?;
        let confs = state.mgr.workspaces();
        let conf = match ws {
            Some(name) => state.mgr.workspace(name)?,
            None if confs.len() == 1 => confs.values().next().ok_or_else(|| ApiError::not_found("No workspace"))?,
            None => {
                return Err(ApiError::bad_request(format!(
                    "`{spec}` is a label, and this server serves several workspaces; add `?workspace=NAME`"
                )))
            }
        };
        let key = strata_engine::workspace_label_key(Some(&conf.root), &label.to_string());
        return match store.label(&key)? {
            Some(e) => Ok(e.layer),
            None => Err(ApiError::not_found(format!(
                "`{label}` has no output in workspace `{}` yet; build it first",
                conf.name
            ))),
        };
    }
    if spec.is_empty() || spec.len() > 256 || spec.bytes().any(|b| b.is_ascii_control()) {
        return Err(ApiError::bad_request(format!(
            "`{}` is not a layer: give a digest, a unique prefix (8+ hex), a ref or `//pkg:name`",
            spec.escape_debug()
        )));
    }
    Ok(store.resolve(spec)?)
}

/// A path inside a layer, from a URL: relative, no `..`, no NUL.
fn layer_path(text: &str) -> ApiResult<RelPath> {
    if text.starts_with('/') {
        return Err(ApiError::bad_request(format!(
            "`{}` is an absolute path; give a path inside the layer",
            text.escape_debug()
        )));
    }
    if text.split('/').any(|c| c == "..") || text.contains('\0') {
        return Err(ApiError::bad_request(format!(
            "`{}` leaves the layer or holds a NUL; give a path inside it",
            text.escape_debug()
        )));
    }
    RelPath::parse(text.as_bytes()).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn lookup(store: &Store, root: &Digest, path: &RelPath, spec: &str) -> ApiResult<Entry> {
    store
        .lookup(root, path)?
        .ok_or_else(|| ApiError::not_found(format!("Layer `{spec}` has no path `{path}`")))
}

/// What `ci store show` says of a layer.
#[derive(Serialize, ToSchema)]
pub struct LayerShow {
    pub layer: Digest,
    pub stats: LayerStats,
    /// `None` for a tree never recorded as a layer.
    pub created: Option<u64>,
    pub lineage: Option<Lineage>,
    pub refs: Vec<String>,
}

#[utoipa::path(get, path = "/api/v1/layers/{layer}", tag = "layers",
    params(("layer" = String, Path, description = "A digest, unique prefix, ref, or URL-encoded `//pkg:name`"), LayerQuery),
    responses((status = 200, body = LayerShow), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn show_layer(
    State(state): State<AppState>,
    ApiPath(spec): ApiPath<String>,
    ApiQuery(q): ApiQuery<LayerQuery>,
) -> ApiResult<Json<LayerShow>> {
    let st = state.clone();
    blocking(move || {
        let store = &st.store;
        let digest = resolve(&st, store, &spec, q.workspace.as_deref())?;
        let record = store.layer(&digest)?;
        let stats = match &record {
            Some(r) => r.stats,
            None => store.stats(&digest)?,
        };
        let refs = store
            .refs()?
            .into_iter()
            .filter(|(_, d)| *d == digest)
            .map(|(n, _)| n)
            .collect();
        Ok(Json(LayerShow {
            layer: digest,
            stats,
            created: record.map(|r| r.created),
            lineage: store.lineage(&digest)?,
            refs,
        }))
    })
    .await
}

#[derive(Serialize, ToSchema)]
pub struct Listing {
    pub layer: Digest,
    pub path: String,
    pub entries: Vec<Listed>,
    /// Whether the listing stopped at its limit.
    pub truncated: bool,
}

#[utoipa::path(get, path = "/api/v1/layers/{layer}/tree", tag = "layers",
    params(("layer" = String, Path, description = "A digest, unique prefix, ref, or URL-encoded `//pkg:name`"), TreeQuery),
    responses((status = 200, body = Listing), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn tree_root(
    state: State<AppState>,
    ApiPath(spec): ApiPath<String>,
    q: ApiQuery<TreeQuery>,
) -> ApiResult<Json<Listing>> {
    list(state, spec, String::new(), q).await
}

#[utoipa::path(get, path = "/api/v1/layers/{layer}/tree/{path}", tag = "layers",
    params(("layer" = String, Path, description = "A digest, unique prefix, ref, or URL-encoded `//pkg:name`"),
        ("path" = String, Path, description = "A path inside the layer"), TreeQuery),
    responses((status = 200, body = Listing), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn tree(
    state: State<AppState>,
    ApiPath((spec, path)): ApiPath<(String, String)>,
    q: ApiQuery<TreeQuery>,
) -> ApiResult<Json<Listing>> {
    list(state, spec, path, q).await
}

async fn list(
    State(state): State<AppState>,
    spec: String,
    path: String,
    ApiQuery(q): ApiQuery<TreeQuery>,
) -> ApiResult<Json<Listing>> {
    let rel = layer_path(&path)?;
    let st = state.clone();
    blocking(move || {
        let store = &st.store;
        let root = resolve(&st, store, &spec, q.workspace.as_deref())?;
        let entry = lookup(store, &root, &rel, &spec)?;
        let mut entries = Vec::new();
        let mut truncated = false;
        match &entry {
            Entry::Dir { digest } => {
                walk(store, digest, "", q.recursive, &mut entries, &mut truncated)?
            }
            other => entries.push(Listed::new(rel.to_string(), other)),
        }
        Ok(Json(Listing {
            layer: root,
            path: rel.to_string(),
            entries,
            truncated,
        }))
    })
    .await
}

fn walk(
    store: &Store,
    tree: &Digest,
    prefix: &str,
    recursive: bool,
    out: &mut Vec<Listed>,
    truncated: &mut bool,
) -> ApiResult<()> {
    for (name, entry) in store.tree(tree)?.entries() {
        if out.len() >= TREE_MAX {
            *truncated = true;
            return Ok(());
        }
        let name = format!("{prefix}{name}");
        out.push(Listed::new(name.clone(), entry));
        if let (true, Entry::Dir { digest }) = (recursive, entry) {
            walk(store, digest, &format!("{name}/"), true, out, truncated)?;
        }
    }
    Ok(())
}

/// A byte range of `size` bytes from a `Range` header: `Ok(None)` for the
/// whole file (no header, or one we do not take, such as several ranges).
fn parse_range(headers: &HeaderMap, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(v) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let Some(spec) = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().strip_prefix("bytes="))
    else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = match (a.is_empty(), b.is_empty()) {
        (true, false) => {
            let n: u64 = b.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size)
        }
        (false, _) => {
            let s: u64 = a.parse().map_err(|_| ())?;
            let e = if b.is_empty() {
                size
            } else {
                let e: u64 = b.parse().map_err(|_| ())?;
                if e < s {
                    return Err(());
                }
                e.saturating_add(1).min(size)
            };
            (s, e)
        }
        (true, true) => return Err(()),
    };
    if start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

#[utoipa::path(get, path = "/api/v1/layers/{layer}/file/{path}", tag = "layers",
    params(("layer" = String, Path, description = "A digest, unique prefix, ref, or URL-encoded `//pkg:name`"),
        ("path" = String, Path, description = "A file inside the layer"),
        ("Range" = Option<String>, Header, description = "One byte range: `bytes=0-99`, `bytes=100-`, `bytes=-100`"),
        LayerQuery),
    responses((status = 200, description = "The file's bytes", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 206, description = "The requested range", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 416, body = ErrorBody)))]
pub async fn file(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath((spec, path)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<LayerQuery>,
) -> ApiResult<Response> {
    let rel = layer_path(&path)?;
    let st = state.clone();
    let (digest, size, name) = blocking(move || {
        let store = &st.store;
        let root = resolve(&st, store, &spec, q.workspace.as_deref())?;
        match lookup(store, &root, &rel, &spec)? {
            Entry::File { digest, size, .. } => Ok((digest, size, rel.to_string())),
            other => Err(ApiError::bad_request(format!(
                "`{rel}` is a {}, not a file; list it with `/tree/{rel}`",
                match other.kind() {
                    Kind::Dir => "directory",
                    Kind::Symlink => "symlink",
                    Kind::File => "file",
                }
            ))),
        }
    })
    .await?;
    let range = parse_range(&headers, size).map_err(|()| {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            format!(
                "The range is not within the file's {size} bytes; ask for `bytes=0-{}`",
                size.saturating_sub(1)
            ),
        )
    })?;
    let (start, end) = range.unwrap_or((0, size));
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || {
        let blob = match store.blob(&digest) {
            Ok(b) => b,
            Err(e) => {
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                return;
            }
        };
        let mut pos = start;
        let mut buf = vec![0u8; 256 << 10];
        while pos < end {
            let want = ((end - pos) as usize).min(buf.len());
            match blob.read_at(&mut buf[..want], pos) {
                Ok(0) => break,
                Ok(n) => {
                    pos += n as u64;
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
    });
    let mut res = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    *res.status_mut() = if range.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    if range.is_some() {
        if let Ok(v) =
            HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end.saturating_sub(1)))
        {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    let base = name.rsplit('/').next().unwrap_or("file");
    let safe: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{safe}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(res)
}

#[derive(Serialize, ToSchema)]
pub struct LayerDiff {
    pub from: Digest,
    pub to: Digest,
    pub changes: Vec<ChangeRow>,
}

#[utoipa::path(get, path = "/api/v1/layers/{layer}/diff/{other}", tag = "layers",
    params(("layer" = String, Path, description = "The old side"), ("other" = String, Path, description = "The new side"), LayerQuery),
    responses((status = 200, body = LayerDiff), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn diff(
    State(state): State<AppState>,
    ApiPath((a, b)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<LayerQuery>,
) -> ApiResult<Json<LayerDiff>> {
    let st = state.clone();
    blocking(move || {
        let store = &st.store;
        let from = resolve(&st, store, &a, q.workspace.as_deref())?;
        let to = resolve(&st, store, &b, q.workspace.as_deref())?;
        let changes = store
            .diff(&from, &to)?
            .into_iter()
            .map(ChangeRow::from)
            .collect();
        Ok(Json(LayerDiff { from, to, changes }))
    })
    .await
}

#[utoipa::path(get, path = "/api/v1/layers/{layer}/archive", tag = "layers",
    params(("layer" = String, Path, description = "A digest, unique prefix, ref, or URL-encoded `//pkg:name`"), LayerQuery),
    responses((status = 200, description = "The layer as a deterministic tar compressed with zstd (`ci store import` takes it)",
        body = Vec<u8>, content_type = "application/zstd"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn archive(
    State(state): State<AppState>,
    ApiPath(spec): ApiPath<String>,
    ApiQuery(q): ApiQuery<LayerQuery>,
) -> ApiResult<Response> {
    let st = state.clone();
    let digest = blocking(move || resolve(&st, &st.store, &spec, q.workspace.as_deref())).await?;
    // The root tree must be there before we answer 200.
    let store = state.store.clone();
    blocking(move || store.tree(&digest).map(drop).map_err(ApiError::from)).await?;
    let (tx, rx) = mpsc::channel(8);
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter::new(tx);
        // A failure mid-stream ends the body early: the archive's zstd
        // checksum makes a cut one fail to import, never import half.
        if store.export(&digest, &mut w).is_ok() {
            let _ = std::io::Write::flush(&mut w);
        }
    });
    let mut res = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/zstd"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{}.tar.zst\"",
        digest.short()
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(res.into_response())
}
