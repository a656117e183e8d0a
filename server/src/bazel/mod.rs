//! Bazel's cache protocols on `ci serve`'s port, so Bazel, ccache and
//! sccache users can share the server's store:
//!
//! - [`http`]: the HTTP cache protocol, `GET|HEAD|PUT /ac/{sha256}` and
//!   `/cas/{sha256}`, under any path prefix (`--remote_cache=http://host/p/`);
//! - [`grpc`]: the Remote Execution API's cache services (Capabilities,
//!   ContentAddressableStorage, ByteStream, ActionCache) over gRPC, on the
//!   same listener (h2c with prior knowledge, as `grpc://` sends it).
//!
//! Both keep content and entries in the store's `sha256` and
//! `bazel_actions` families (`strata_store::cas`), so an entry Bazel stored
//! over HTTP is a hit over gRPC. The rule both keep: an action entry is
//! refused unless every object it names is stored, and a lookup answers an
//! entry only while every object it names still is.

pub mod grpc;
pub mod http;

use std::collections::HashSet;

use axum::extract::Request;
use axum::http::{header, Uri};
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::Router;
use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use prost::Message;
use strata_store::{CasDigest, DigestFunction, Store};
use tower::ServiceExt;

use crate::api::AppState;

pub use http::routes as http_routes;

/// Wraps the whole router: gRPC requests (`content-type: application/grpc…`)
/// go to the REAPI services, and a Bazel HTTP cache path under a prefix
/// (`/{prefix…}/ac/{hash}`) is routed as `/ac/{hash}`. Both are decided
/// before routing, which a layer of the router itself cannot do.
pub fn around(app: Router, state: AppState) -> Router {
    let grpc = grpc::router(state);
    Router::new()
        .fallback_service(app)
        .layer(axum::middleware::from_fn(
            move |req: Request, next: Next| {
                let grpc = grpc.clone();
                async move {
                    if is_grpc(&req) {
                        return match grpc.oneshot(req).await {
                            Ok(res) => res.into_response(),
                            Err(never) => match never {},
                        };
                    }
                    next.run(strip_prefix(req)).await
                }
            },
        ))
}

fn is_grpc(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// `/a/b/ac/HASH` → `/ac/HASH` (and the same for `cas`); other paths, and
/// everything under `/api/`, are left alone.
fn strip_prefix(mut req: Request) -> Request {
    let path = req.uri().path();
    if path.starts_with("/api/") {
        return req;
    }
    let mut parts = path.rsplitn(3, '/');
    let (Some(hash), Some(kind), Some(prefix)) = (parts.next(), parts.next(), parts.next()) else {
        return req;
    };
    if prefix.is_empty() || !matches!(kind, "ac" | "cas") || hash.len() != 64 {
        return req;
    }
    let new = format!("/{kind}/{hash}");
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = match parts.path_and_query.as_ref().and_then(|p| p.query()) {
        Some(q) => format!("{new}?{q}").parse().ok(),
        None => new.parse().ok(),
    };
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    req
}

/// Why a client's digest or entry is refused.
#[derive(Debug)]
pub enum Refusal {
    /// Malformed: not a digest, not a message.
    Invalid(String),
    /// The entry names an object that is not stored.
    Missing(CasDigest),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Invalid(m) => f.write_str(m),
            Refusal::Missing(d) => write!(
                f,
                "The entry names `{d}`, which is not stored; upload it first"
            ),
        }
    }
}

/// The digest function of a REAPI request: unset means SHA-256 (the only
/// one of the legacy functions with 64-digit hashes that we serve).
pub fn function_of(value: i32) -> Result<DigestFunction, Refusal> {
    use reapi::digest_function::Value;
    match Value::try_from(value) {
        Ok(Value::Unknown | Value::Sha256) => Ok(DigestFunction::Sha256),
        Ok(Value::Blake3) => Ok(DigestFunction::Blake3),
        _ => Err(Refusal::Invalid(format!(
            "Digest function {value} is not served here; use SHA256 or BLAKE3"
        ))),
    }
}

/// A REAPI digest in `function`, checked: 64 hex digits and a size that is
/// not negative.
pub fn parse_digest(function: DigestFunction, d: &reapi::Digest) -> Result<CasDigest, Refusal> {
    if d.size_bytes < 0 {
        return Err(Refusal::Invalid(format!(
            "Digest `{}` has a negative size",
            short(&d.hash)
        )));
    }
    CasDigest::parse_hex(function, &d.hash).ok_or_else(|| {
        Refusal::Invalid(format!(
            "`{}` is not a {} digest: send 64 hex digits",
            short(&d.hash),
            function.name()
        ))
    })
}

/// At most 80 characters of client input, for messages.
pub fn short(s: &str) -> String {
    s.chars().take(80).collect()
}

/// The empty blob is always there: clients (Bazel among them) never
/// upload it.
pub fn is_empty_blob(d: &reapi::Digest) -> bool {
    d.size_bytes == 0
}

/// Whether an `ActionResult` names any object at all (ccache's opaque
/// entries, read as one, name none).
pub fn names_objects(result: &reapi::ActionResult) -> bool {
    !result.output_files.is_empty()
        || !result.output_directories.is_empty()
        || result.stdout_digest.is_some()
        || result.stderr_digest.is_some()
}

/// Every object `result` needs, each checked to be stored: its output
/// files, its output directories' `Tree` messages and every file in them,
/// its stdout and stderr. Empty blobs are left out (always there).
pub fn result_refs(
    store: &Store,
    function: DigestFunction,
    result: &reapi::ActionResult,
) -> Result<Result<Vec<CasDigest>, Refusal>, strata_store::Error> {
    let mut refs: Vec<CasDigest> = Vec::new();
    let mut seen = HashSet::new();
    let mut add = |d: &reapi::Digest, refs: &mut Vec<CasDigest>| -> Result<(), Refusal> {
        if is_empty_blob(d) {
            return Ok(());
        }
        let c = parse_digest(function, d)?;
        if seen.insert(c) {
            refs.push(c);
        }
        Ok(())
    };
    let mut direct = Vec::new();
    for f in &result.output_files {
        direct.extend(f.digest.as_ref());
    }
    direct.extend(result.stdout_digest.as_ref());
    direct.extend(result.stderr_digest.as_ref());
    for d in direct {
        if let Err(r) = add(d, &mut refs) {
            return Ok(Err(r));
        }
    }
    for dir in &result.output_directories {
        let Some(tree_digest) = &dir.tree_digest else {
            return Ok(Err(Refusal::Invalid(format!(
                "Output directory `{}` has no tree digest",
                short(&dir.path)
            ))));
        };
        if let Err(r) = add(tree_digest, &mut refs) {
            return Ok(Err(r));
        }
        if is_empty_blob(tree_digest) {
            continue;
        }
        let td = match parse_digest(function, tree_digest) {
            Ok(d) => d,
            Err(r) => return Ok(Err(r)),
        };
        let Some(blob) = store.cas_blob(&td)? else {
            return Ok(Err(Refusal::Missing(td)));
        };
        let bytes = store.read_blob(&blob)?;
        let Ok(tree) = reapi::Tree::decode(&bytes[..]) else {
            return Ok(Err(Refusal::Invalid(format!(
                "The tree `{td}` of output directory `{}` is not a Tree message",
                short(&dir.path)
            ))));
        };
        for d in tree.root.iter().chain(&tree.children) {
            for f in &d.files {
                if let Some(fd) = &f.digest {
                    if let Err(r) = add(fd, &mut refs) {
                        return Ok(Err(r));
                    }
                }
            }
        }
    }
    for r in &refs {
        if store.cas_blob(r)?.is_none() {
            return Ok(Err(Refusal::Missing(*r)));
        }
    }
    Ok(Ok(refs))
}
