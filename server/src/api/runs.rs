//! Runs: start (from a workspace or an inline pipeline), list, show,
//! cancel, rerun, and task logs.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use strata_engine::{RunRecord, RunSummary, TaskState, Trigger, Workspace};
use utoipa::{IntoParams, ToSchema};

use super::{ApiJson, ApiPath, ApiQuery, AppState};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::runs::Submit;

/// `POST /api/v1/workspaces/{ws}/runs`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// Labels or patterns (`//pkg:name`, `//pkg:all`, `//...`); empty: `//...`.
    #[serde(default)]
    pub targets: Vec<String>,
    /// Commands run at once (default: the workspace's `jobs`, else the cores).
    #[schema(minimum = 1, maximum = 1024)]
    pub jobs: Option<u32>,
    #[serde(default)]
    pub keep_going: bool,
    /// Re-run cached pure tasks and fail those whose output differs.
    #[serde(default)]
    pub check: bool,
}

/// `POST /api/v1/runs`: a pipeline in the JSON model, no `BUILD.star`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InlineRunRequest {
    /// The pipeline: `{"tasks": {"//:name": {...}}, "stages": {...}, "settings": {...}}`,
    /// the model `ci graph --json` prints.
    #[schema(value_type = Object)]
    pub pipeline: serde_json::Value,
    #[serde(default)]
    pub targets: Vec<String>,
    #[schema(minimum = 1, maximum = 1024)]
    pub jobs: Option<u32>,
    #[serde(default)]
    pub keep_going: bool,
}

/// A run was accepted.
#[derive(Serialize, ToSchema)]
pub struct Accepted {
    pub id: String,
    /// Where its record is.
    pub url: String,
    /// Where its live events are.
    pub events: String,
}

fn accepted(id: String) -> (StatusCode, Json<Accepted>) {
    (
        StatusCode::ACCEPTED,
        Json(Accepted {
            url: format!("/api/v1/runs/{id}"),
            events: format!("/api/v1/runs/{id}/events"),
            id,
        }),
    )
}

fn jobs(j: Option<u32>) -> ApiResult<Option<usize>> {
    match j {
        Some(0) => Err(ApiError::bad_request("`jobs` is 0; give at least 1")),
        Some(n) if n > 1024 => Err(ApiError::bad_request(format!(
            "`jobs` is {n}; give at most 1024"
        ))),
        other => Ok(other.map(|n| n as usize)),
    }
}

/// The caller's name for the run's trigger (a token's name, never the token).
fn caller(state: &AppState, headers: &HeaderMap) -> Option<String> {
    state.tokens.caller(headers).ok().flatten().map(|c| c.name)
}

async fn submit(state: &AppState, s: Submit) -> ApiResult<String> {
    let mgr = state.mgr.clone();
    // Loading evaluates Starlark and reads files: off the async threads. The
    // manager spawns the run on this runtime, so it is entered there.
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let _guard = handle.enter();
        mgr.submit(s)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

#[utoipa::path(post, path = "/api/v1/workspaces/{ws}/runs", tag = "runs",
    params(("ws" = String, Path, description = "The workspace's name")),
    request_body = RunRequest,
    security(("bearer" = [])),
    responses((status = 202, body = Accepted), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody)))]
pub async fn start_run(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(ws): ApiPath<String>,
    ApiJson(req): ApiJson<RunRequest>,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    state.mgr.workspace(&ws)?;
    let mut s = Submit::new(
        Some(ws),
        req.targets,
        Trigger {
            kind: "api".into(),
            by: caller(&state, &headers),
            ..Trigger::default()
        },
    );
    s.jobs = jobs(req.jobs)?;
    s.keep_going = req.keep_going;
    s.check = req.check;
    Ok(accepted(submit(&state, s).await?))
}

#[utoipa::path(post, path = "/api/v1/runs", tag = "runs",
    request_body = InlineRunRequest,
    security(("bearer" = [])),
    responses((status = 202, body = Accepted), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody)))]
pub async fn start_inline_run(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<InlineRunRequest>,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    let model: Workspace = serde_json::from_value(req.pipeline)
        .map_err(|e| ApiError::bad_request(format!("`pipeline`: {e}")))?;
    if model.root.is_some() || model.settings.store.is_some() {
        return Err(ApiError::bad_request(
            "`pipeline.root` and `pipeline.settings.store` are not taken from an inline pipeline; remove them",
        ));
    }
    if model.tasks.values().any(|t| {
        matches!(t.kind, strata_engine::TaskKind::LocalSource(_))
            || matches!(&t.kind, strata_engine::TaskKind::GitSource(g)
            if !g.url.contains("://") && !g.url.contains('@') && !g.url.starts_with('/'))
    }) {
        return Err(ApiError::bad_request(
            "An inline pipeline has no directory: `local_source` and git sources at local paths need a workspace",
        ));
    }
    let mut s = Submit::new(
        None,
        req.targets,
        Trigger {
            kind: "api".into(),
            by: caller(&state, &headers),
            ..Trigger::default()
        },
    );
    s.model = Some(model);
    s.jobs = jobs(req.jobs)?;
    s.keep_going = req.keep_going;
    Ok(accepted(submit(&state, s).await?))
}

/// `POST /api/v1/validate`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateRequest {
    /// A pipeline in the JSON model, as `POST /api/v1/runs` takes it.
    #[schema(value_type = Object)]
    pub pipeline: serde_json::Value,
}

#[derive(Serialize, ToSchema)]
pub struct Valid {
    pub ok: bool,
    /// Tasks in the pipeline.
    pub tasks: usize,
}

#[utoipa::path(post, path = "/api/v1/validate", tag = "runs",
    request_body = ValidateRequest,
    responses((status = 200, body = Valid), (status = 400, description = "What is wrong, naming the task and field", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody)))]
pub async fn validate(ApiJson(req): ApiJson<ValidateRequest>) -> ApiResult<Json<Valid>> {
    let model: Workspace = serde_json::from_value(req.pipeline)
        .map_err(|e| ApiError::bad_request(format!("`pipeline`: {e}")))?;
    model.validate()?;
    Ok(Json(Valid {
        ok: true,
        tasks: model.tasks.len(),
    }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RunFilter {
    /// Only runs of this workspace.
    pub workspace: Option<String>,
    /// Only runs in this state.
    pub state: Option<String>,
    /// Only runs that asked for this target.
    pub target: Option<String>,
    /// Runs older than this id (the `next` of the previous page).
    pub cursor: Option<String>,
    /// At most this many (default 50, at most 500).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// A page of runs, newest first.
#[derive(Serialize, ToSchema)]
pub struct RunPage {
    pub runs: Vec<RunSummary>,
    /// Pass as `cursor` for the next page; `None` on the last.
    pub next: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/runs", tag = "runs", params(RunFilter),
    responses((status = 200, body = RunPage), (status = 400, body = ErrorBody)))]
pub async fn list_runs(
    State(state): State<AppState>,
    ApiQuery(f): ApiQuery<RunFilter>,
) -> ApiResult<Json<RunPage>> {
    let want_state = match &f.state {
        Some(s) => Some(s.parse::<TaskState>().map_err(|_| {
            ApiError::bad_request(format!(
                "`state` is `{s}`; use one of {}",
                TaskState::ALL.map(|t| t.as_str()).join(", ")
            ))
        })?),
        None => None,
    };
    let limit = match f.limit {
        Some(0) => return Err(ApiError::bad_request("`limit` is 0; give 1 to 500")),
        Some(n) => (n as usize).min(500),
        None => 50,
    };
    let store = state.store.clone();
    let page = tokio::task::spawn_blocking(move || -> ApiResult<RunPage> {
        let ids = store.run_ids()?;
        let mut runs = Vec::new();
        let mut next = None;
        for id in ids.iter().rev() {
            if f.cursor.as_deref().is_some_and(|c| id.as_str() >= c) {
                continue;
            }
            let Ok(r) = RunRecord::load(&store, id) else {
                continue;
            };
            if f.workspace
                .as_ref()
                .is_some_and(|w| r.workspace.as_ref() != Some(w))
                || want_state.is_some_and(|s| r.state != s)
                || f.target.as_ref().is_some_and(|t| !r.targets.contains(t))
            {
                continue;
            }
            if runs.len() == limit {
                next = runs.last().map(|r: &RunSummary| r.id.clone());
                break;
            }
            runs.push(r.summary());
        }
        Ok(RunPage { runs, next })
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(page))
}

/// A run id from a path: printable, no `/`.
pub fn check_run_id(id: &str) -> ApiResult<()> {
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::bad_request(format!(
            "`{}` is not a run id",
            id.escape_debug()
        )));
    }
    Ok(())
}

pub async fn load_run(state: &AppState, id: String) -> ApiResult<RunRecord> {
    check_run_id(&id)?;
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || RunRecord::load(&store, &id).map_err(ApiError::from))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
}

#[utoipa::path(get, path = "/api/v1/runs/{id}", tag = "runs",
    params(("id" = String, Path, description = "A run id, a unique prefix, or `latest`")),
    responses((status = 200, body = RunRecord), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_run(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    check_run_id(&id)?;
    if let Some(json) = state.run_cache.get(&id) {
        return Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response());
    }
    // A full id is one point lookup, and the record is served as stored
    // (the engine's JSON), never decoded and encoded again.
    let store = state.store.clone();
    let exact = id.clone();
    let stored = tokio::task::spawn_blocking(move || store.run(&exact))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    let json = match stored {
        Some(entry) => {
            let json = bytes::Bytes::from(entry.record.get().to_owned());
            // An ended run never changes again: keep its answer.
            #[derive(Deserialize)]
            struct StateOnly {
                state: TaskState,
            }
            if entry
                .record
                .decode::<StateOnly>()
                .is_ok_and(|s| s.state.is_final())
            {
                state.run_cache.put(id, json.clone());
            }
            json
        }
        None => bytes::Bytes::from(
            serde_json::to_string(&load_run(&state, id).await?)
                .map_err(|e| ApiError::internal(e.to_string()))?,
        ),
    };
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
}

#[derive(Serialize, ToSchema)]
pub struct Cancelled {
    pub id: String,
    /// Whether the run was still under way (else it had ended already).
    pub cancelled: bool,
}

#[utoipa::path(post, path = "/api/v1/runs/{id}/cancel", tag = "runs",
    params(("id" = String, Path, description = "A run id")),
    security(("bearer" = [])),
    responses((status = 200, body = Cancelled), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn cancel_run(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Cancelled>> {
    let run = load_run(&state, id).await?;
    if state.mgr.cancel(&run.id) {
        return Ok(Json(Cancelled {
            id: run.id,
            cancelled: true,
        }));
    }
    Err(ApiError::conflict(format!(
        "Run `{}` has ended ({}); there is nothing to cancel",
        run.id,
        run.state.as_str()
    )))
}

#[utoipa::path(post, path = "/api/v1/runs/{id}/rerun", tag = "runs",
    params(("id" = String, Path, description = "A run id")),
    security(("bearer" = [])),
    responses((status = 202, body = Accepted), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn rerun_run(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    let run = load_run(&state, id).await?;
    if !run.state.is_final() {
        return Err(ApiError::conflict(format!(
            "Run `{}` is {}; rerun it when it has ended",
            run.id,
            run.state.as_str()
        )));
    }
    let Some(ws) = run.workspace.clone() else {
        return Err(ApiError::conflict(format!(
            "Run `{}` did not come from a workspace this server serves; start it again",
            run.id
        )));
    };
    state.mgr.workspace(&ws)?;
    let mut s = Submit::new(
        Some(ws),
        run.targets.clone(),
        Trigger {
            kind: "rerun".into(),
            detail: Some(run.id.clone()),
            by: caller(&state, &headers),
            ..Trigger::default()
        },
    );
    s.payloads = Default::default();
    s.rerun_of = Some(run);
    Ok(accepted(submit(&state, s).await?))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Start at this byte.
    #[param(minimum = 0)]
    pub offset: Option<u64>,
    /// At most this many bytes (default and most: 8 MiB).
    #[param(minimum = 1)]
    pub limit: Option<u64>,
    /// Stream the log as it grows until the task ends.
    #[serde(default)]
    pub follow: bool,
}

const LOG_PAGE: u64 = 8 << 20;

#[utoipa::path(get, path = "/api/v1/runs/{id}/tasks/{label}/log", tag = "runs",
    params(("id" = String, Path, description = "A run id"),
           ("label" = String, Path, description = "A task label, URL-encoded: `%2F%2Fpkg%3Aname`"),
           LogQuery),
    responses((status = 200, description = "The log's bytes from `offset`; `X-Log-Size` is the size so far and \
        `X-Log-Complete` whether the task has ended", body = String, content_type = "text/plain"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn task_log(
    State(state): State<AppState>,
    ApiPath((id, label)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> ApiResult<Response> {
    let label = super::workspaces::path_label(&label)?.to_string();
    let run = load_run(&state, id).await?;
    let offset = q.offset.unwrap_or(0);
    let limit = match q.limit {
        Some(0) => return Err(ApiError::bad_request("`limit` is 0; give at least 1")),
        Some(n) => n.min(LOG_PAGE),
        None => LOG_PAGE,
    };
    let done_task = run.tasks.get(&label).cloned();
    let live = state.hub.is_live(&run.id);
    if done_task.is_none() && !live {
        return Err(ApiError::not_found(format!(
            "Run `{}` has no task `{label}`; `GET /api/v1/runs/{}` lists its tasks",
            run.id, run.id
        )));
    }
    if let Some(t) = &done_task {
        // Ended: its log is a blob.
        let bytes = match t.log {
            Some(d) => {
                let store = state.store.clone();
                tokio::task::spawn_blocking(move || store.read_blob(&d))
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))??
            }
            None => Vec::new(),
        };
        return Ok(log_page(&bytes, offset, limit, true));
    }
    if q.follow {
        return Ok(super::events::follow_log(state, run.id, label, offset).await);
    }
    let (bytes, complete) = super::events::log_so_far(&state, &run.id, &label).await?;
    Ok(log_page(&bytes, offset, limit, complete))
}

fn log_page(bytes: &[u8], offset: u64, limit: u64, complete: bool) -> Response {
    let size = bytes.len() as u64;
    let start = offset.min(size) as usize;
    let end = (offset.saturating_add(limit)).min(size) as usize;
    let mut res = Response::new(Body::from(bytes[start..end].to_vec()));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert("x-log-size", size.into());
    h.insert(
        "x-log-complete",
        header::HeaderValue::from_static(if complete { "true" } else { "false" }),
    );
    h.insert("x-next-offset", (end as u64).into());
    res.into_response()
}

#[utoipa::path(get, path = "/api/v1/runs/{id}/analysis", tag = "runs",
    params(("id" = String, Path, description = "A run id, a unique prefix, or `latest`")),
    responses((status = 200, body = strata_engine::analyze::Analysis), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn analysis(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<strata_engine::analyze::Analysis>> {
    let run = load_run(&state, id).await?;
    let Some(ws) = run.workspace.clone() else {
        return Err(ApiError::conflict(format!(
            "Run `{}` did not come from a workspace this server serves: there is no graph to analyse it over",
            run.id
        )));
    };
    state.mgr.workspace(&ws)?;
    let mgr = state.mgr.clone();
    let store = state.store.clone();
    let a = tokio::task::spawn_blocking(move || -> ApiResult<_> {
        let model = mgr.load(&ws, &[strata_engine::Pattern::Recursive(String::new())])?;
        let history = RunRecord::list(&store)?;
        Ok(strata_engine::analyze::analyze(&model, &run, &history))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(a))
}
