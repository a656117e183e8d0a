//! Workspaces: what the server serves, their graphs, and `ci explain` as data.

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use strata_engine::{explain_label, workspace_label_key, Graph, Label, Pattern, TaskKind};
use utoipa::ToSchema;

use super::{ApiPath, AppState};
use crate::error::{ApiError, ApiResult, ErrorBody};

#[derive(Serialize, ToSchema)]
pub struct WorkspaceInfo {
    pub name: String,
    /// The directory holding its `ci.toml`.
    pub root: String,
    /// Its latest run, if any.
    pub latest_run: Option<String>,
    pub latest_state: Option<strata_engine::TaskState>,
}

#[utoipa::path(get, path = "/api/v1/workspaces", tag = "workspaces",
    responses((status = 200, body = [WorkspaceInfo]), (status = 401, body = ErrorBody)))]
pub async fn list_workspaces(State(state): State<AppState>) -> ApiResult<Json<Vec<WorkspaceInfo>>> {
    let store = state.store.clone();
    let confs: Vec<_> = state.mgr.workspaces().values().cloned().collect();
    let rows = tokio::task::spawn_blocking(move || -> ApiResult<Vec<WorkspaceInfo>> {
        // Newest first: the first run seen of a workspace is its latest.
        let ids = store.run_ids()?;
        let mut latest: std::collections::BTreeMap<String, (String, strata_engine::TaskState)> =
            Default::default();
        for id in ids.iter().rev() {
            if latest.len() == confs.len() {
                break;
            }
            if let Ok(r) = strata_engine::RunRecord::load(&store, id) {
                if let Some(ws) = r.workspace {
                    latest.entry(ws).or_insert((r.id, r.state));
                }
            }
        }
        Ok(confs
            .into_iter()
            .map(|c| {
                let l = latest.get(&c.name);
                WorkspaceInfo {
                    latest_run: l.map(|(id, _)| id.clone()),
                    latest_state: l.map(|(_, s)| *s),
                    root: c.root.display().to_string(),
                    name: c.name,
                }
            })
            .collect())
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(rows))
}

/// One edge of the graph: `from` is read by `to`.
#[derive(Serialize, ToSchema)]
pub struct Edge {
    pub from: String,
    pub to: String,
    /// `input` (a dep mounted at `/ci/in/<mount>`), `transform`, `merge_base`,
    /// `merge_side`.
    pub kind: String,
    /// The mount name of an input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
}

/// The model `ci graph --json` prints, with the edges spelled out.
#[derive(Serialize, ToSchema)]
pub struct GraphView {
    pub workspace: String,
    /// Every task, inputs first.
    pub order: Vec<String>,
    /// Tasks by label, in the pipeline model (as `ci graph --json`).
    #[schema(value_type = Object)]
    pub tasks: serde_json::Value,
    #[schema(value_type = Object)]
    pub stages: serde_json::Value,
    pub edges: Vec<Edge>,
    /// Sources by label, with what starts runs from them under this server.
    pub sources: Vec<SourceInfo>,
}

#[derive(Serialize, ToSchema)]
pub struct SourceInfo {
    pub label: String,
    /// `local_source`, `git_source`, `timer` or `webhook`.
    pub kind: String,
    /// What makes it fire here: `watch`, `poll 60s`, `every 600s`, `cron …`,
    /// `POST /hooks/…`, `webhook //:push`; `None` when nothing does.
    pub trigger: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/workspaces/{ws}/graph", tag = "workspaces",
    params(("ws" = String, Path, description = "The workspace's name")),
    responses((status = 200, body = GraphView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn graph(
    State(state): State<AppState>,
    ApiPath(ws): ApiPath<String>,
) -> ApiResult<Json<GraphView>> {
    let mgr = state.mgr.clone();
    let view = tokio::task::spawn_blocking(move || -> ApiResult<GraphView> {
        let model = mgr.load(&ws, &[Pattern::Recursive(String::new())])?;
        let graph = Graph::new(&model);
        let order: Vec<String> = graph.topo_order().iter().map(|l| l.to_string()).collect();
        let mut edges = Vec::new();
        let mut sources = Vec::new();
        for (label, task) in &model.tasks {
            let to = label.to_string();
            for d in &task.deps {
                edges.push(Edge {
                    from: d.label.to_string(),
                    to: to.clone(),
                    kind: "input".into(),
                    mount: Some(d.mount.clone()),
                });
            }
            if let Some(t) = &task.transform {
                edges.push(Edge {
                    from: t.to_string(),
                    to: to.clone(),
                    kind: "transform".into(),
                    mount: None,
                });
            }
            match &task.kind {
                TaskKind::Merge(m) => {
                    edges.push(Edge {
                        from: m.base.to_string(),
                        to: to.clone(),
                        kind: "merge_base".into(),
                        mount: None,
                    });
                    for s in &m.sides {
                        edges.push(Edge {
                            from: s.to_string(),
                            to: to.clone(),
                            kind: "merge_side".into(),
                            mount: None,
                        });
                    }
                }
                TaskKind::LocalSource(s) => sources.push(SourceInfo {
                    label: to.clone(),
                    kind: "local_source".into(),
                    trigger: s.watch.then(|| "watch".to_owned()),
                }),
                TaskKind::GitSource(g) => sources.push(SourceInfo {
                    label: to.clone(),
                    kind: "git_source".into(),
                    trigger: match (&g.on, g.poll_secs) {
                        (Some(on), _) => Some(format!("webhook {on}")),
                        (None, Some(p)) => Some(format!("poll {p}s")),
                        _ => None,
                    },
                }),
                TaskKind::Timer(t) => sources.push(SourceInfo {
                    label: to.clone(),
                    kind: "timer".into(),
                    trigger: Some(match (&t.cron, t.every_secs) {
                        (Some(c), _) => format!("cron {c}"),
                        (None, Some(e)) => format!("every {e}s"),
                        _ => "never".to_owned(),
                    }),
                }),
                TaskKind::Webhook(_) => sources.push(SourceInfo {
                    label: to.clone(),
                    kind: "webhook".into(),
                    trigger: Some(format!("POST /hooks/{ws}/{}", label.name())),
                }),
                TaskKind::Run(_) => {}
            }
        }
        Ok(GraphView {
            workspace: ws,
            order,
            tasks: serde_json::to_value(&model.tasks).unwrap_or_default(),
            stages: serde_json::to_value(&model.stages).unwrap_or_default(),
            edges,
            sources,
        })
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(view))
}

/// Why a task's key changed since its previous action (`ci explain`).
#[derive(Serialize, ToSchema)]
pub struct Explain {
    pub label: String,
    pub key: strata_store::Digest,
    pub output: strata_store::Digest,
    /// The run that produced the latest output.
    pub run: String,
    /// Whether an earlier action with another key is known.
    pub has_previous: bool,
    /// One line per field that changed.
    pub changes: Vec<String>,
    /// The action's preimage, field by field.
    #[schema(value_type = Object)]
    pub preimage: serde_json::Value,
}

/// Parses a label given in a path (URL-decoded), as a 400 naming it.
pub fn path_label(text: &str) -> ApiResult<Label> {
    Label::parse(text, None).map_err(|e| {
        ApiError::bad_request(format!(
            "`{text}` is not a label ({e}); write `//pkg:name`, URL-encoded (`%2F%2Fpkg%3Aname`)"
        ))
    })
}

#[utoipa::path(get, path = "/api/v1/workspaces/{ws}/explain/{label}", tag = "workspaces",
    params(("ws" = String, Path, description = "The workspace's name"),
           ("label" = String, Path, description = "A task label, URL-encoded: `%2F%2Fpkg%3Aname`")),
    responses((status = 200, body = Explain), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn explain(
    State(state): State<AppState>,
    ApiPath((ws, label)): ApiPath<(String, String)>,
) -> ApiResult<Json<Explain>> {
    let conf = state.mgr.workspace(&ws)?.clone();
    let label = path_label(&label)?;
    let store = state.store.clone();
    let out = tokio::task::spawn_blocking(move || -> ApiResult<Explain> {
        let key = workspace_label_key(Some(&conf.root), &label.to_string());
        let Some((p, lines)) = explain_label(&store, &key)? else {
            return Err(ApiError::not_found(format!(
                "`{label}` has not run in workspace `{ws}`; build it first"
            )));
        };
        Ok(Explain {
            label: label.to_string(),
            key: p.key,
            output: p.output,
            run: p.run,
            has_previous: p.previous.is_some(),
            changes: lines,
            preimage: serde_json::to_value(&p.preimage).unwrap_or_default(),
        })
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(out))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PlanQuery {
    /// Targets, comma-separated (default `//...`).
    pub targets: Option<String>,
}

/// What a build would do, before it runs.
#[derive(Serialize, ToSchema)]
pub struct Plan {
    /// By label: whether the task will come from the cache, and if not, why.
    pub tasks: std::collections::BTreeMap<String, strata_engine::Prediction>,
}

#[utoipa::path(get, path = "/api/v1/workspaces/{ws}/plan", tag = "workspaces",
    params(("ws" = String, Path, description = "The workspace's name"), PlanQuery),
    responses((status = 200, body = Plan), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn plan(
    State(state): State<AppState>,
    ApiPath(ws): ApiPath<String>,
    super::ApiQuery(q): super::ApiQuery<PlanQuery>,
) -> ApiResult<Json<Plan>> {
    let targets: Vec<String> = q
        .targets
        .map(|t| {
            t.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let patterns = crate::runs::parse_patterns(&targets)?;
    state.mgr.workspace(&ws)?;
    let mgr = state.mgr.clone();
    let tasks = tokio::task::spawn_blocking(move || mgr.plan(&ws, &patterns))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(Plan { tasks }))
}
