//! The HTTP API: routes, the shared state, extractors whose rejections are
//! our JSON errors, authentication, request metrics and the OpenAPI document.

mod events;
mod hooks;
mod layers;
mod runs;
mod workspaces;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;

use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use strata_store::Store;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;

use crate::auth::Tokens;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::runs::Manager;

/// What every handler sees.
#[derive(Clone)]
pub struct AppState {
    pub mgr: Arc<Manager>,
    pub hub: Arc<Hub>,
    pub tokens: Arc<Tokens>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the server stops: live streams end.
    pub shutdown: CancellationToken,
    /// The JSON of ended runs (they never change), by id.
    pub run_cache: Arc<RunCache>,
    /// What the remote-cache protocols share (last uses, figures).
    pub cache: Arc<crate::cache::CacheState>,
}

/// A bounded cache of ended runs' records as served: derived from the
/// store, never the only copy of anything.
#[derive(Default)]
pub struct RunCache {
    inner: parking_lot::Mutex<(std::collections::HashMap<String, bytes::Bytes>, usize)>,
}

impl RunCache {
    /// At most this many bytes are kept; past it the cache starts over.
    const MAX_BYTES: usize = 64 << 20;

    pub fn get(&self, id: &str) -> Option<bytes::Bytes> {
        self.inner.lock().0.get(id).cloned()
    }

    pub fn put(&self, id: String, json: bytes::Bytes) {
        let mut g = self.inner.lock();
        if g.1 + json.len() > Self::MAX_BYTES {
            g.0.clear();
            g.1 = 0;
        }
        g.1 += json.len();
        g.0.insert(id, json);
    }
}

/// Request bodies over this are refused with 413.
pub const BODY_LIMIT: usize = 1 << 20;
/// Webhook deliveries may be larger (GitHub sends up to 25 MiB).
pub const HOOK_BODY_LIMIT: usize = 25 << 20;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Strata",
        description = "The API of `ci serve`: workspaces, runs, live events, logs, layers. \
            Everything that changes something needs `Authorization: Bearer <token>`."
    ),
    paths(
        workspaces::list_workspaces,
        workspaces::graph,
        workspaces::explain,
        workspaces::plan,
        runs::start_run,
        runs::start_inline_run,
        runs::validate,
        runs::list_runs,
        runs::get_run,
        runs::cancel_run,
        runs::rerun_run,
        runs::task_log,
        runs::analysis,
        events::run_events,
        events::feed,
        layers::show_layer,
        layers::tree_root,
        layers::tree,
        layers::file,
        layers::diff,
        layers::archive,
        hooks::deliver,
        whoami,
        health,
        metrics_text,
        crate::cache::native::lookup,
        crate::cache::native::missing,
        crate::cache::native::fetch,
        crate::cache::native::trees,
        crate::cache::native::upload,
        crate::bazel::http::ac_get,
        crate::bazel::http::ac_head,
        crate::bazel::http::ac_put,
        crate::bazel::http::cas_get,
        crate::bazel::http::cas_head,
        crate::bazel::http::cas_put,
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/workspaces", get(workspaces::list_workspaces))
        .route("/workspaces/{ws}/graph", get(workspaces::graph))
        .route("/workspaces/{ws}/explain/{label}", get(workspaces::explain))
        .route("/workspaces/{ws}/plan", get(workspaces::plan))
        .route("/workspaces/{ws}/runs", post(runs::start_run))
        .route("/runs", get(runs::list_runs).post(runs::start_inline_run))
        .route("/validate", post(runs::validate))
        .route("/runs/{id}", get(runs::get_run))
        .route("/runs/{id}/cancel", post(runs::cancel_run))
        .route("/runs/{id}/rerun", post(runs::rerun_run))
        .route("/runs/{id}/analysis", get(runs::analysis))
        .route("/runs/{id}/events", get(events::run_events))
        .route("/runs/{id}/tasks/{label}/log", get(runs::task_log))
        .route("/events", get(events::feed))
        .route("/layers/{layer}", get(layers::show_layer))
        .route("/layers/{layer}/tree", get(layers::tree_root))
        .route("/layers/{layer}/tree/{*path}", get(layers::tree))
        .route("/layers/{layer}/file/{*path}", get(layers::file))
        .route("/layers/{layer}/diff/{other}", get(layers::diff))
        .route("/layers/{layer}/archive", get(layers::archive))
        .route("/openapi.json", get(openapi))
        .route("/whoami", get(whoami))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .merge(crate::cache::native::routes())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ));
    let hooks = Router::new()
        .route("/hooks/{ws}/{name}", post(hooks::deliver))
        .layer(axum::extract::DefaultBodyLimit::max(HOOK_BODY_LIMIT));
    let app = Router::new()
        .nest("/api/v1", api)
        .merge(hooks)
        .merge(crate::bazel::http_routes())
        .merge(crate::ui::router())
        .route("/healthz", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .with_state(state.clone());
    crate::bazel::around(app, state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("No such endpoint; `/api/v1/openapi.json` lists them")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "This endpoint does not take that method; `/api/v1/openapi.json` lists what it takes",
    )
}

fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal("The server failed on this request; its log says more").into_response()
}

/// Reads need a token under `--auth all`; everything else needs a write token.
async fn authorize(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    // Validating a pipeline changes nothing: it is a read.
    let path = req.uri().path();
    let reads = matches!(*req.method(), Method::GET | Method::HEAD)
        || path.ends_with("/validate")
        || crate::cache::native::is_read(path);
    let checked = match reads {
        true => state.tokens.check_read(headers).map(drop),
        false => state.tokens.check_write(headers).map(drop),
    };
    match checked {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Times every request by route, and marks answers as not to be sniffed.
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = req.method().to_string();
    let started = Instant::now();
    let mut res = next.run(req).await;
    res.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    state
        .metrics
        .observe_request(&method, &route, res.status().as_u16(), started.elapsed());
    res
}

/// Who the caller is, so a client shows only what it may do.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct WhoAmI {
    /// The token's name; `None` without a token.
    pub name: Option<String>,
    /// `anonymous`, `read` or `write`.
    pub access: String,
    /// `writes` (reads are open) or `all` (reads need a token too).
    pub auth: String,
}

#[utoipa::path(get, path = "/api/v1/whoami", tag = "server",
    responses((status = 200, body = WhoAmI), (status = 401, body = ErrorBody)))]
async fn whoami(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Result<axum::Json<WhoAmI>, ApiError> {
    let caller = state.tokens.caller(&headers)?;
    Ok(axum::Json(WhoAmI {
        access: match &caller {
            None => "anonymous",
            Some(c) if c.read_only => "read",
            Some(_) => "write",
        }
        .to_owned(),
        name: caller.map(|c| c.name),
        auth: match state.tokens.mode() {
            crate::auth::AuthMode::Writes => "writes",
            crate::auth::AuthMode::All => "all",
        }
        .to_owned(),
    }))
}

#[utoipa::path(get, path = "/healthz", tag = "server",
    responses((status = 200, description = "The server answers", body = String, content_type = "text/plain")))]
async fn health() -> &'static str {
    "ok\n"
}

#[utoipa::path(get, path = "/metrics", tag = "server",
    responses((status = 200, description = "Prometheus text format (OpenMetrics)", body = String,
        content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8")))]
async fn metrics_text(State(state): State<AppState>) -> Response {
    let text = state.metrics.render(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn openapi() -> Response {
    let body = ApiDoc::openapi().to_pretty_json().unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `Json`, whose refusals are our JSON errors (400 naming the field, 413, 415).
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => {
                let status = match rejection.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    _ => StatusCode::BAD_REQUEST,
                };
                let message = match status {
                    StatusCode::PAYLOAD_TOO_LARGE => {
                        format!("The body is over the limit of {BODY_LIMIT} bytes")
                    }
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                        "Send the body as JSON with `Content-Type: application/json`".to_owned()
                    }
                    _ => format!(
                        "The body is not what this endpoint takes: {}",
                        rejection.body_text()
                    ),
                };
                Err(ApiError::new(status, message))
            }
        }
    }
}

/// `Query`, refused as a 400 naming the parameter.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(e) => Err(ApiError::bad_request(format!(
                "Bad query parameters: {}",
                e.body_text()
            ))),
        }
    }
}

/// `Path`, refused as a 400.
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(ApiError::bad_request(format!(
                "Bad path: {}",
                e.body_text()
            ))),
        }
    }
}

/// Runs store work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
}

/// Sends what a blocking writer writes down a channel, in chunks.
pub struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    pub fn new(tx: mpsc::Sender<Result<Bytes, Infallible>>) -> ChannelWriter {
        ChannelWriter {
            tx,
            buf: Vec::new(),
        }
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 256 << 10 {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client left"))
    }
}
