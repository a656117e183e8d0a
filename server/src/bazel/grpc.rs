//! The Remote Execution API's cache services over gRPC (tonic): what
//! `bazel --remote_cache=grpc://host:port` and other REAPI clients use.
//!
//! - `Capabilities`: cache only (no execution), digest functions SHA256 and
//!   BLAKE3, action-cache updates enabled, zstd for ByteStream and batches.
//! - `ContentAddressableStorage`: `FindMissingBlobs`, `BatchUpdateBlobs`
//!   (each blob checked against its digest on its own), `BatchReadBlobs`,
//!   `GetTree`; chunking (split/splice) is not offered.
//! - `ByteStream`: `Read` and `Write` of `blobs/…` and
//!   `compressed-blobs/zstd/…`, streamed both ways; `QueryWriteStatus`
//!   (writes are not resumable: a blob is whole or absent).
//! - `ActionCache`: `UpdateActionResult` refuses a result naming an object
//!   that is not stored (FAILED_PRECONDITION); `GetActionResult` answers
//!   only a result whose every object is still stored.
//!
//! Writes need a write token in the `authorization` metadata
//! (`Bearer <token>`): none is UNAUTHENTICATED, a read-only one
//! PERMISSION_DENIED. Reads need a token only under `--auth all`.

use std::io::{Read, Write};

use axum::http::StatusCode;
use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::build::bazel::semver::SemVer;
use bazel_remote_apis::google::bytestream as bs;
use bazel_remote_apis::google::rpc::Status as RpcStatus;
use prost::Message;
use reapi::action_cache_server::{ActionCache, ActionCacheServer};
use reapi::capabilities_server::{Capabilities, CapabilitiesServer};
use reapi::content_addressable_storage_server::{
    ContentAddressableStorage, ContentAddressableStorageServer,
};
use reapi::{compressor, digest_function};
use strata_store::{
    BazelAction, BazelActionKind, CasDigest, Committed, DigestFunction, Family, Store,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{function_of, is_empty_blob, parse_digest, result_refs, short, Refusal};
use crate::api::AppState;
use crate::cache::{Outcome, Protocol};
use crate::error::ApiError;

/// Messages up to this size are accepted (a batch of blobs).
const MAX_MESSAGE: usize = 16 << 20;
/// Batches are announced smaller than a message, leaving room for framing.
const MAX_BATCH: i64 = 4 << 20;
/// ByteStream reads are sent in chunks of this size.
const CHUNK: usize = 256 << 10;

/// The REAPI services over the server's store.
#[derive(Clone)]
pub struct Reapi {
    state: AppState,
}

/// The services as one router, to be reached by `content-type`.
pub fn router(state: AppState) -> axum::Router {
    let svc = Reapi { state };
    tonic::service::Routes::new(CapabilitiesServer::new(svc.clone()))
        .add_service(
            ContentAddressableStorageServer::new(svc.clone())
                .max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(ActionCacheServer::new(svc.clone()).max_decoding_message_size(MAX_MESSAGE))
        .add_service(
            bs::byte_stream_server::ByteStreamServer::new(svc)
                .max_decoding_message_size(MAX_MESSAGE),
        )
        .into_axum_router()
}

fn invalid(r: Refusal) -> Status {
    match r {
        Refusal::Invalid(m) => Status::invalid_argument(m),
        Refusal::Missing(d) => Status::failed_precondition(Refusal::Missing(d).to_string()),
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn from_api(e: ApiError) -> Status {
    match e.status {
        StatusCode::UNAUTHORIZED => Status::unauthenticated(e.message),
        StatusCode::FORBIDDEN => Status::permission_denied(e.message),
        s if s.is_client_error() => Status::invalid_argument(e.message),
        _ => Status::internal(e.message),
    }
}

fn rpc_status(code: tonic::Code, message: impl Into<String>) -> Option<RpcStatus> {
    Some(RpcStatus {
        code: code as i32,
        message: message.into(),
        details: Vec::new(),
    })
}

/// Runs store work on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

impl Reapi {
    fn check<T>(&self, req: &Request<T>, write: bool) -> Result<(), Status> {
        let headers = req.metadata().clone().into_headers();
        let t = &self.state.tokens;
        match write {
            true => t.check_write(&headers).map(drop),
            false => t.check_read(&headers).map(drop),
        }
        .map_err(from_api)
    }

    fn store(&self) -> Store {
        self.state.store.clone()
    }
}

/// Reads a whole stored blob named `d`; `None` when it is not stored.
fn read_cas(store: &Store, d: &CasDigest, size: i64) -> Result<Option<Vec<u8>>, Status> {
    if size == 0 {
        return Ok(Some(Vec::new()));
    }
    let Some(blob) = store.cas_blob(d).map_err(internal)? else {
        return Ok(None);
    };
    match store.read_blob(&blob) {
        Ok(b) => Ok(Some(b)),
        Err(strata_store::Error::MissingBlob(_)) => Ok(None),
        Err(e) => Err(internal(e)),
    }
}

#[tonic::async_trait]
impl Capabilities for Reapi {
    async fn get_capabilities(
        &self,
        req: Request<reapi::GetCapabilitiesRequest>,
    ) -> Result<Response<reapi::ServerCapabilities>, Status> {
        self.check(&req, false)?;
        let version = |minor| {
            Some(SemVer {
                major: 2,
                minor,
                patch: 0,
                prerelease: String::new(),
            })
        };
        Ok(Response::new(reapi::ServerCapabilities {
            cache_capabilities: Some(reapi::CacheCapabilities {
                digest_functions: vec![
                    digest_function::Value::Sha256 as i32,
                    digest_function::Value::Blake3 as i32,
                ],
                action_cache_update_capabilities: Some(reapi::ActionCacheUpdateCapabilities {
                    update_enabled: true,
                }),
                max_batch_total_size_bytes: MAX_BATCH,
                symlink_absolute_path_strategy:
                    reapi::symlink_absolute_path_strategy::Value::Allowed as i32,
                supported_compressors: vec![compressor::Value::Zstd as i32],
                supported_batch_update_compressors: vec![compressor::Value::Zstd as i32],
                ..Default::default()
            }),
            execution_capabilities: None,
            deprecated_api_version: None,
            low_api_version: version(0),
            high_api_version: version(3),
        }))
    }
}

#[tonic::async_trait]
impl ContentAddressableStorage for Reapi {
    async fn find_missing_blobs(
        &self,
        req: Request<reapi::FindMissingBlobsRequest>,
    ) -> Result<Response<reapi::FindMissingBlobsResponse>, Status> {
        self.check(&req, false)?;
        let r = req.into_inner();
        let function = function_of(r.digest_function).map_err(invalid)?;
        let store = self.store();
        let missing = blocking(move || {
            let mut missing = Vec::new();
            for d in r.blob_digests {
                if is_empty_blob(&d) {
                    continue;
                }
                let c = parse_digest(function, &d).map_err(invalid)?;
                if store.cas_blob(&c).map_err(internal)?.is_none() {
                    missing.push(d);
                }
            }
            Ok(missing)
        })
        .await?;
        Ok(Response::new(reapi::FindMissingBlobsResponse {
            missing_blob_digests: missing,
        }))
    }

    async fn batch_update_blobs(
        &self,
        req: Request<reapi::BatchUpdateBlobsRequest>,
    ) -> Result<Response<reapi::BatchUpdateBlobsResponse>, Status> {
        self.check(&req, true)?;
        let r = req.into_inner();
        let function = function_of(r.digest_function).map_err(invalid)?;
        let store = self.store();
        let cache = self.state.cache.clone();
        let responses = blocking(move || {
            use reapi::batch_update_blobs_response::Response as Item;
            // Each request gets its own answer; those that parse are stored together.
            let mut out: Vec<Item> = Vec::with_capacity(r.requests.len());
            let mut good: Vec<(usize, CasDigest, Vec<u8>)> = Vec::new();
            for (i, item) in r.requests.into_iter().enumerate() {
                let digest = item.digest.clone().unwrap_or_default();
                let parsed = parse_digest(function, &digest).and_then(|c| {
                    decompress(item.compressor, item.data, digest.size_bytes as u64)
                        .map(|data| (c, data))
                });
                match parsed {
                    Ok((c, data)) => {
                        good.push((i, c, data));
                        out.push(Item {
                            digest: Some(digest),
                            status: None,
                        });
                    }
                    Err(refusal) => out.push(Item {
                        digest: Some(digest),
                        status: rpc_status(tonic::Code::InvalidArgument, refusal.to_string()),
                    }),
                }
            }
            let items: Vec<(CasDigest, &[u8])> =
                good.iter().map(|(_, c, d)| (*c, &d[..])).collect();
            let done = store.put_cas(&items).map_err(internal)?;
            for ((i, c, data), committed) in good.iter().zip(done) {
                out[*i].status = match committed {
                    Committed::Stored { .. } => {
                        cache.moved(Protocol::Reapi, true, 1, data.len() as u64);
                        rpc_status(tonic::Code::Ok, "")
                    }
                    Committed::Mismatch { got, size } => {
                        cache.count(Protocol::Reapi, Outcome::Refused);
                        rpc_status(
                            tonic::Code::InvalidArgument,
                            format!(
                                "The data ({size} bytes) has digest `{got}`, not `{c}`; not stored"
                            ),
                        )
                    }
                };
            }
            Ok(out)
        })
        .await?;
        Ok(Response::new(reapi::BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        req: Request<reapi::BatchReadBlobsRequest>,
    ) -> Result<Response<reapi::BatchReadBlobsResponse>, Status> {
        self.check(&req, false)?;
        let r = req.into_inner();
        let function = function_of(r.digest_function).map_err(invalid)?;
        let zstd_ok = r
            .acceptable_compressors
            .contains(&(compressor::Value::Zstd as i32));
        let store = self.store();
        let cache = self.state.cache.clone();
        let responses = blocking(move || {
            use reapi::batch_read_blobs_response::Response as Item;
            let mut out = Vec::with_capacity(r.digests.len());
            let mut total = 0u64;
            for d in r.digests {
                let c = match parse_digest(function, &d) {
                    Ok(c) => c,
                    Err(refusal) => {
                        out.push(Item {
                            digest: Some(d),
                            status: rpc_status(tonic::Code::InvalidArgument, refusal.to_string()),
                            ..Default::default()
                        });
                        continue;
                    }
                };
                total += d.size_bytes as u64;
                if total > MAX_MESSAGE as u64 {
                    return Err(Status::invalid_argument(format!(
                        "The blobs asked for are over {MAX_MESSAGE} bytes together; read large blobs with ByteStream"
                    )));
                }
                match read_cas(&store, &c, d.size_bytes)? {
                    Some(data) => {
                        cache.moved(Protocol::Reapi, false, 1, data.len() as u64);
                        let (data, comp) = if zstd_ok && data.len() > 64 {
                            let z = zstd::bulk::compress(&data, 1).map_err(internal)?;
                            (z, compressor::Value::Zstd as i32)
                        } else {
                            (data, compressor::Value::Identity as i32)
                        };
                        out.push(Item {
                            digest: Some(d),
                            data,
                            compressor: comp,
                            status: rpc_status(tonic::Code::Ok, ""),
                        });
                    }
                    None => out.push(Item {
                        digest: Some(d),
                        status: rpc_status(tonic::Code::NotFound, format!("`{c}` is not stored")),
                        ..Default::default()
                    }),
                }
            }
            Ok(out)
        })
        .await?;
        Ok(Response::new(reapi::BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = ReceiverStream<Result<reapi::GetTreeResponse, Status>>;

    async fn get_tree(
        &self,
        req: Request<reapi::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        self.check(&req, false)?;
        let r = req.into_inner();
        let function = function_of(r.digest_function).map_err(invalid)?;
        let root = r
            .root_digest
            .ok_or_else(|| Status::invalid_argument("GetTree needs a root digest"))?;
        let root_c = parse_digest(function, &root).map_err(invalid)?;
        let start: usize = match r.page_token.as_str() {
            "" => 0,
            t => t
                .parse()
                .map_err(|_| Status::invalid_argument("Not a page token of this server"))?,
        };
        let page = match r.page_size {
            n if n > 0 => n as usize,
            _ => 1000,
        };
        let store = self.store();
        // Breadth first, every directory once; a missing one is left out
        // (the spec: the part of the tree that is present).
        let dirs = blocking(move || {
            let Some(bytes) = read_cas(&store, &root_c, root.size_bytes)? else {
                return Err(Status::not_found(format!(
                    "The root directory `{root_c}` is not stored"
                )));
            };
            let first = reapi::Directory::decode(&bytes[..]).map_err(|_| {
                Status::invalid_argument(format!("`{root_c}` is not a Directory message"))
            })?;
            let mut seen = std::collections::HashSet::from([root_c]);
            let mut dirs = vec![first];
            let mut i = 0;
            while i < dirs.len() {
                let children: Vec<reapi::Digest> = dirs[i]
                    .directories
                    .iter()
                    .filter_map(|n| n.digest.clone())
                    .collect();
                for d in children {
                    let Ok(c) = parse_digest(function, &d) else {
                        continue;
                    };
                    if !seen.insert(c) {
                        continue;
                    }
                    if let Some(bytes) = read_cas(&store, &c, d.size_bytes)? {
                        if let Ok(dir) = reapi::Directory::decode(&bytes[..]) {
                            dirs.push(dir);
                        }
                    }
                }
                i += 1;
            }
            Ok(dirs)
        })
        .await?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut at = start.min(dirs.len());
            let mut dirs = dirs;
            let rest = dirs.split_off(at);
            let mut rest = rest.into_iter().peekable();
            loop {
                let chunk: Vec<reapi::Directory> = rest.by_ref().take(page).collect();
                at += chunk.len();
                let more = rest.peek().is_some();
                let msg = reapi::GetTreeResponse {
                    directories: chunk,
                    next_page_token: if more { at.to_string() } else { String::new() },
                };
                if tx.send(Ok(msg)).await.is_err() || !more {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn split_blob(
        &self,
        _: Request<reapi::SplitBlobRequest>,
    ) -> Result<Response<reapi::SplitBlobResponse>, Status> {
        Err(Status::unimplemented("Blob splitting is not offered"))
    }

    type GetChunkMappingStream = ReceiverStream<Result<reapi::GetChunkMappingResponse, Status>>;

    async fn get_chunk_mapping(
        &self,
        _: Request<reapi::GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented("Blob chunking is not offered"))
    }

    async fn splice_blob(
        &self,
        _: Request<reapi::SpliceBlobRequest>,
    ) -> Result<Response<reapi::SpliceBlobResponse>, Status> {
        Err(Status::unimplemented("Blob splicing is not offered"))
    }

    async fn register_chunk_mapping(
        &self,
        _: Request<Streaming<reapi::RegisterChunkMappingRequest>>,
    ) -> Result<Response<reapi::RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented("Blob chunking is not offered"))
    }
}

/// Undoes a batch item's compression, refusing more than `size` bytes out.
fn decompress(compressor: i32, data: Vec<u8>, size: u64) -> Result<Vec<u8>, Refusal> {
    match compressor::Value::try_from(compressor) {
        Ok(compressor::Value::Identity) => Ok(data),
        Ok(compressor::Value::Zstd) => {
            let mut out = Vec::new();
            zstd::stream::read::Decoder::new(&data[..])
                .and_then(|d| d.take(size + 1).read_to_end(&mut out))
                .map_err(|e| Refusal::Invalid(format!("The data is not zstd: {e}")))?;
            Ok(out)
        }
        _ => Err(Refusal::Invalid(format!(
            "Compressor {compressor} is not served here; use IDENTITY or ZSTD"
        ))),
    }
}

/// What a ByteStream resource name names.
#[derive(Debug)]
struct Resource {
    digest: CasDigest,
    size: u64,
    compressed: bool,
}

/// Parses `{instance}/[uploads/{uuid}/](blobs|compressed-blobs/zstd)/[{function}/]{hash}/{size}[/…]`.
fn parse_resource(name: &str, upload: bool) -> Result<Resource, Status> {
    let bad =
        |why: &str| Status::invalid_argument(format!("Resource name `{}`: {why}", short(name)));
    let parts: Vec<&str> = name.split('/').collect();
    let at = parts
        .iter()
        .position(|p| *p == "blobs" || *p == "compressed-blobs")
        .ok_or_else(|| bad("no `blobs/` or `compressed-blobs/` part"))?;
    if upload && (at < 2 || parts[at - 2] != "uploads") {
        return Err(bad(
            "an upload is `[instance/]uploads/{uuid}/blobs/{hash}/{size}`",
        ));
    }
    let mut rest = parts[at + 1..].iter().copied();
    let compressed = parts[at] == "compressed-blobs";
    if compressed {
        match rest.next() {
            Some("zstd") => {}
            Some(other) => {
                return Err(bad(&format!(
                    "compressor `{}` is not served here; use `zstd`",
                    short(other)
                )))
            }
            None => return Err(bad("no compressor")),
        }
    }
    let mut next = rest.next().ok_or_else(|| bad("no hash"))?;
    let function = match next {
        "blake3" => {
            next = rest.next().ok_or_else(|| bad("no hash"))?;
            DigestFunction::Blake3
        }
        "sha256" => {
            next = rest.next().ok_or_else(|| bad("no hash"))?;
            DigestFunction::Sha256
        }
        _ => DigestFunction::Sha256,
    };
    let digest =
        CasDigest::parse_hex(function, next).ok_or_else(|| bad("the hash is not 64 hex digits"))?;
    let size = rest
        .next()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| bad("no size, or a size that is not a number"))?;
    Ok(Resource {
        digest,
        size,
        compressed,
    })
}

/// A blob's bytes from an offset, as a reader.
struct BlobAt {
    blob: Box<dyn strata_store::Blob>,
    pos: u64,
}

impl Read for BlobAt {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.blob.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A writer that refuses to take more than `left` bytes (a decompressed
/// upload may not grow past the size it was announced with).
struct Limited<W> {
    inner: W,
    left: u64,
}

impl<W: Write> Write for Limited<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(std::io::Error::other(
                "more bytes than the resource name says",
            ));
        }
        let n = self.inner.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[tonic::async_trait]
impl bs::byte_stream_server::ByteStream for Reapi {
    type ReadStream = ReceiverStream<Result<bs::ReadResponse, Status>>;

    async fn read(
        &self,
        req: Request<bs::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        self.check(&req, false)?;
        let r = req.into_inner();
        let res = parse_resource(&r.resource_name, false)?;
        if r.read_offset < 0 || r.read_limit < 0 {
            return Err(Status::out_of_range("A negative read offset or limit"));
        }
        if res.compressed && r.read_limit != 0 {
            return Err(Status::invalid_argument(
                "A compressed read takes no read limit",
            ));
        }
        let offset = r.read_offset as u64;
        if offset > res.size {
            return Err(Status::out_of_range(format!(
                "Offset {offset} is past the blob's {} bytes",
                res.size
            )));
        }
        let store = self.store();
        let digest = res.digest;
        let blob = blocking(move || {
            if res.size == 0 {
                return Ok(None);
            }
            let blob = store
                .cas_blob(&digest)
                .map_err(internal)?
                .and_then(|d| store.blobs().open(&d).transpose())
                .transpose()
                .map_err(internal)?;
            match blob {
                Some(b) if b.size() == res.size => Ok(Some(b)),
                _ => Err(Status::not_found(format!("`{digest}` is not stored"))),
            }
        })
        .await?;
        let limit = match r.read_limit {
            0 => u64::MAX,
            n => n as u64,
        };
        let (tx, rx) = mpsc::channel(4);
        let cache = self.state.cache.clone();
        tokio::task::spawn_blocking(move || {
            let plain: Box<dyn Read> = match blob {
                Some(blob) => Box::new(BlobAt { blob, pos: offset }.take(limit)),
                None => Box::new(std::io::empty()),
            };
            let mut reader: Box<dyn Read> = if res.compressed {
                match zstd::stream::read::Encoder::new(plain, 1) {
                    Ok(e) => Box::new(e),
                    Err(e) => {
                        let _ = tx.blocking_send(Err(internal(e)));
                        return;
                    }
                }
            } else {
                plain
            };
            let mut buf = vec![0u8; CHUNK];
            let mut sent = 0u64;
            let mut any = false;
            loop {
                match read_full(&mut reader, &mut buf) {
                    Ok(0) if any => break,
                    Ok(n) => {
                        any = true;
                        sent += n as u64;
                        let msg = bs::ReadResponse {
                            data: buf[..n].to_vec(),
                        };
                        if tx.blocking_send(Ok(msg)).is_err() || n == 0 {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(internal(e)));
                        return;
                    }
                }
            }
            cache.moved(Protocol::Reapi, false, 1, sent);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn write(
        &self,
        req: Request<Streaming<bs::WriteRequest>>,
    ) -> Result<Response<bs::WriteResponse>, Status> {
        self.check(&req, true)?;
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("A write with no request"))?;
        let res = parse_resource(&first.resource_name, true)?;
        if first.write_offset != 0 {
            return Err(Status::invalid_argument(
                "Writes are not resumable here; start at offset 0",
            ));
        }
        let done = |received: i64| {
            Response::new(bs::WriteResponse {
                committed_size: if res.compressed {
                    received
                } else {
                    res.size as i64
                },
            })
        };
        // Already stored: the client may stop sending.
        let (store, digest) = (self.store(), res.digest);
        let present = res.size == 0
            || blocking(move || Ok(store.cas_blob(&digest).map_err(internal)?.is_some())).await?;
        if present {
            return Ok(if res.compressed {
                Response::new(bs::WriteResponse { committed_size: -1 })
            } else {
                done(0)
            });
        }

        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
        let store = self.store();
        let (size, compressed) = (res.size, res.compressed);
        let writer = tokio::task::spawn_blocking(move || -> Result<Committed, Status> {
            let w = Limited {
                inner: store.cas_writer(digest.function).map_err(internal)?,
                left: size,
            };
            let bad =
                |e: std::io::Error| Status::invalid_argument(format!("The upload is refused: {e}"));
            let w = if compressed {
                let mut d = zstd::stream::write::Decoder::new(w).map_err(internal)?;
                while let Some(chunk) = rx.blocking_recv() {
                    d.write_all(&chunk).map_err(bad)?;
                }
                d.flush().map_err(bad)?;
                d.into_inner()
            } else {
                let mut w = w;
                while let Some(chunk) = rx.blocking_recv() {
                    w.write_all(&chunk).map_err(bad)?;
                }
                w
            };
            w.inner
                .commit(&store, &digest, Some(size))
                .map_err(internal)
        });

        let mut received: i64 = 0;
        let mut finished = false;
        let mut msg = Some(first);
        while let Some(m) = msg.take() {
            if m.write_offset != received {
                return Err(Status::invalid_argument(format!(
                    "Write offset {} where {received} was expected",
                    m.write_offset
                )));
            }
            received += m.data.len() as i64;
            if tx.send(m.data).await.is_err() {
                break; // the writer failed; its error is the answer
            }
            if m.finish_write {
                finished = true;
                break;
            }
            msg = stream.message().await?;
        }
        drop(tx);
        let committed = writer.await.map_err(internal)??;
        if !finished {
            return Err(Status::invalid_argument(
                "The write ended without `finish_write`; nothing was stored",
            ));
        }
        match committed {
            Committed::Stored { size, .. } => {
                self.state.cache.moved(Protocol::Reapi, true, 1, size);
                Ok(done(received))
            }
            Committed::Mismatch { got, size } => {
                self.state.cache.count(Protocol::Reapi, Outcome::Refused);
                Err(Status::invalid_argument(format!(
                    "The data ({size} bytes) has digest `{got}`, not `{digest}`; not stored"
                )))
            }
        }
    }

    async fn query_write_status(
        &self,
        req: Request<bs::QueryWriteStatusRequest>,
    ) -> Result<Response<bs::QueryWriteStatusResponse>, Status> {
        // It reveals no more than FindMissingBlobs: a read.
        self.check(&req, false)?;
        let res = parse_resource(&req.get_ref().resource_name, true)?;
        let store = self.store();
        let digest = res.digest;
        let present = res.size == 0
            || blocking(move || Ok(store.cas_blob(&digest).map_err(internal)?.is_some())).await?;
        // Writes are not resumable: a blob is whole or not there at all.
        Ok(Response::new(bs::QueryWriteStatusResponse {
            committed_size: if present { res.size as i64 } else { 0 },
            complete: present,
        }))
    }
}

/// Fills `buf` as far as the reader goes; returns how much it put in.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[tonic::async_trait]
impl ActionCache for Reapi {
    async fn get_action_result(
        &self,
        req: Request<reapi::GetActionResultRequest>,
    ) -> Result<Response<reapi::ActionResult>, Status> {
        self.check(&req, false)?;
        let r = req.into_inner();
        let function = function_of(r.digest_function).map_err(invalid)?;
        let action = r
            .action_digest
            .ok_or_else(|| Status::invalid_argument("GetActionResult needs an action digest"))?;
        let key = parse_digest(function, &action).map_err(invalid)?;
        let store = self.store();
        let found = blocking(move || {
            Ok(match store.bazel_action(&key).map_err(internal)? {
                Some(a) if a.kind == BazelActionKind::Result => {
                    reapi::ActionResult::decode(&a.bytes[..]).ok()
                }
                _ => None,
            })
        })
        .await?;
        let cache = &self.state.cache;
        match found {
            Some(result) => {
                cache.count(Protocol::Reapi, Outcome::Hit);
                cache.touch(Family::BazelActions, &BazelAction::row_key(&key));
                Ok(Response::new(result))
            }
            None => {
                cache.count(Protocol::Reapi, Outcome::Miss);
                Err(Status::not_found(format!("No action `{key}` in the cache")))
            }
        }
    }

    async fn update_action_result(
        &self,
        req: Request<reapi::UpdateActionResultRequest>,
    ) -> Result<Response<reapi::ActionResult>, Status> {
        self.check(&req, true)?;
        let r = req.into_inner();
        let function = function_of(r.digest_function).map_err(invalid)?;
        let action = r
            .action_digest
            .ok_or_else(|| Status::invalid_argument("UpdateActionResult needs an action digest"))?;
        let key = parse_digest(function, &action).map_err(invalid)?;
        let result = r
            .action_result
            .ok_or_else(|| Status::invalid_argument("UpdateActionResult needs an action result"))?;
        let store = self.store();
        let bytes = result.encode_to_vec();
        let stored = blocking(move || {
            // No object may be swept between the checks and the entry.
            let _hold = store.hold();
            let refs = match result_refs(&store, function, &result).map_err(internal)? {
                Ok(refs) => refs,
                Err(r) => return Ok(Err(r)),
            };
            Ok(store
                .put_bazel_action(&key, BazelActionKind::Result, refs, bytes)
                .map_err(internal)?
                .map_err(Refusal::Missing)
                .map(|()| result))
        })
        .await?;
        let cache = &self.state.cache;
        match stored {
            Ok(result) => {
                cache.count(Protocol::Reapi, Outcome::Stored);
                cache.touch(Family::BazelActions, &BazelAction::row_key(&key));
                Ok(Response::new(result))
            }
            Err(r) => {
                cache.count(Protocol::Reapi, Outcome::Refused);
                Err(invalid(r))
            }
        }
    }
}
