//! Webhook deliveries: `POST /hooks/{ws}/{name}`. A delivery whose
//! signature checks out becomes the webhook source's output layer and
//! starts a run of everything downstream of it (and of the git sources that
//! name it in `on`). A bad or missing signature is 401 and starts nothing.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use strata_engine::{HookKind, Label, Pattern, TaskKind, Trigger};

use super::runs::Accepted;
use super::{ApiPath, AppState};
use crate::auth::constant_eq;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::runs::Submit;

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Checks `sha256=<hex>` (the prefix optional) against the body's HMAC-SHA256.
fn hmac_ok(secret: &[u8], body: &[u8], signature: &str) -> bool {
    let hex_sig = signature
        .trim()
        .strip_prefix("sha256=")
        .unwrap_or(signature.trim());
    let Ok(given) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&given).is_ok()
}

/// Whether a delivery is authentic for a webhook of `kind` with `secret`.
pub fn authentic(kind: HookKind, secret: &[u8], headers: &HeaderMap, body: &[u8]) -> bool {
    match kind {
        HookKind::Github => {
            header(headers, "x-hub-signature-256").is_some_and(|sig| hmac_ok(secret, body, sig))
        }
        HookKind::Gitlab => {
            header(headers, "x-gitlab-token").is_some_and(|t| constant_eq(t.as_bytes(), secret))
        }
        HookKind::Generic => {
            header(headers, "x-signature-256").is_some_and(|sig| hmac_ok(secret, body, sig))
        }
    }
}

/// The event name and delivery id a provider sends.
fn event_and_delivery(kind: HookKind, headers: &HeaderMap) -> (String, String) {
    let (e, d) = match kind {
        HookKind::Github => ("x-github-event", "x-github-delivery"),
        HookKind::Gitlab => ("x-gitlab-event", "x-gitlab-event-uuid"),
        HookKind::Generic => ("x-event", "x-delivery"),
    };
    let clean = |v: Option<&str>| -> String {
        v.unwrap_or("")
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect()
    };
    (clean(header(headers, e)), clean(header(headers, d)))
}

#[utoipa::path(post, path = "/hooks/{ws}/{name}", tag = "sources",
    params(("ws" = String, Path, description = "The workspace's name"),
        ("name" = String, Path, description = "The webhook's name in the root package, or its URL-encoded label"),
        ("X-Hub-Signature-256" = Option<String>, Header, description = "GitHub: `sha256=` HMAC-SHA256 of the body"),
        ("X-Gitlab-Token" = Option<String>, Header, description = "GitLab: the shared secret"),
        ("X-Signature-256" = Option<String>, Header, description = "Generic: HMAC-SHA256 of the body, hex")),
    request_body(content = String, description = "The delivery, stored as `payload.json`", content_type = "application/json"),
    responses((status = 202, body = Accepted), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn deliver(
    State(state): State<AppState>,
    ApiPath((ws, name)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    let label_text = if name.starts_with("//") {
        name.clone()
    } else {
        format!("//:{name}")
    };
    let label = super::workspaces::path_label(&label_text)?;
    let mgr = state.mgr.clone();
    let ws2 = ws.clone();
    let model =
        tokio::task::spawn_blocking(move || mgr.load(&ws2, &[Pattern::Recursive(String::new())]))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
    let hook = match model.tasks.get(&label).map(|t| &t.kind) {
        Some(TaskKind::Webhook(h)) => h.clone(),
        Some(_) => {
            return Err(ApiError::not_found(format!(
                "`{label}` in workspace `{ws}` is not a webhook"
            )))
        }
        None => {
            return Err(ApiError::not_found(format!(
                "Workspace `{ws}` has no webhook `{label}`"
            )))
        }
    };
    let Some(secret) = std::env::var_os(&hook.secret_env).filter(|s| !s.is_empty()) else {
        return Err(ApiError::unavailable(format!(
            "The server has no secret for `{label}`: set `{}` in its environment and restart it",
            hook.secret_env
        )));
    };
    let secret = std::os::unix::ffi::OsStrExt::as_bytes(secret.as_os_str()).to_vec();
    if !authentic(hook.kind, &secret, &headers, &body) {
        return Err(ApiError::unauthorized(format!(
            "The delivery's signature does not match the secret of `{label}`; nothing was started"
        )));
    }
    let (event, delivery) = event_and_delivery(hook.kind, &headers);
    // The hook's cone, and the cones of the git sources it re-resolves.
    let mut fired: Vec<Label> = vec![label.clone()];
    for (l, t) in &model.tasks {
        if let TaskKind::GitSource(g) = &t.kind {
            if g.on.as_ref() == Some(&label) {
                fired.push(l.clone());
            }
        }
    }
    let graph = strata_engine::Graph::new(&model);
    let targets: Vec<String> = graph
        .downstream(&fired)
        .into_iter()
        .map(|l| l.to_string())
        .collect();
    let mut files = BTreeMap::new();
    files.insert("payload.json".to_owned(), body.to_vec());
    files.insert("event".to_owned(), event.clone().into_bytes());
    files.insert("delivery".to_owned(), delivery.clone().into_bytes());
    let mut s = Submit::new(
        Some(ws.clone()),
        targets,
        Trigger {
            kind: "webhook".into(),
            source: Some(label.to_string()),
            detail: Some(if delivery.is_empty() { event } else { delivery }),
            by: None,
        },
    );
    s.dedup = Some(format!("{ws}\0{label}\0{}", blake3::hash(&body).to_hex()));
    s.payloads.insert(label.to_string(), files);
    let mgr = state.mgr.clone();
    let handle = tokio::runtime::Handle::current();
    let id = tokio::task::spawn_blocking(move || {
        let _g = handle.enter();
        mgr.submit(s)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            url: format!("/api/v1/runs/{id}"),
            events: format!("/api/v1/runs/{id}/events"),
            id,
        }),
    ))
}
