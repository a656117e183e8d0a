//! Server-Sent Events: a run's every event (resumable with `Last-Event-ID`),
//! the global feed of state changes, and logs that follow a running task.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use utoipa::IntoParams;

use super::{ApiPath, ApiQuery, AppState};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::hub::{ClientGuard, Live};

/// One message of an event stream, as its fields.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct SseMessage {
    /// The event's sequence number in its run (absent on `end`, `hello`, `lagged`).
    pub id: Option<String>,
    /// Its kind: `run_queued`, `run_started`, `task_started`, `task_log`,
    /// `task_finished`, `note`, `run_finished`, `end`; on the feed also `hello`, `lagged`.
    pub event: String,
    /// The event as JSON.
    pub data: String,
}

/// Events read from the store per step of a replay.
const REPLAY_PAGE: usize = 1024;

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Start after this sequence number (as `Last-Event-ID`, which wins when both are given).
    #[param(minimum = 0)]
    pub after: Option<u64>,
    /// `false`: leave out `task_log` events (a view that shows states only);
    /// their sequence numbers are skipped, so resuming stays exact.
    pub logs: Option<bool>,
}

/// The fields of a stored event that routing needs.
#[derive(Deserialize)]
struct Peek {
    event: String,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    line: Option<String>,
}

fn peek(json: &[u8]) -> Option<Peek> {
    serde_json::from_slice(json).ok()
}

type Tx = mpsc::Sender<Result<SseEvent, Infallible>>;

fn sse_event(seq: u64, name: &str, json: &str) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default()
        .id(seq.to_string())
        .event(name)
        .data(json))
}

#[utoipa::path(get, path = "/api/v1/runs/{id}/events", tag = "events",
    params(("id" = String, Path, description = "A run id, a unique prefix, or `latest`"),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event"),
        EventsQuery),
    responses((status = 200, description = "`text/event-stream`: every event of the run, each with \
        `id:` its sequence number and `event:` its kind; an ended run replays from the store and \
        closes with an `end` event", body = SseMessage, content_type = "text/event-stream"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn run_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> ApiResult<Response> {
    let from = match headers.get("last-event-id") {
        Some(v) => {
            let text = v.to_str().unwrap_or("");
            let n: u64 = text.trim().parse().map_err(|_| {
                ApiError::bad_request(format!(
                    "`Last-Event-ID` is `{}`; it must be the `id` of an event of this run",
                    text.escape_debug()
                ))
            })?;
            n.saturating_add(1)
        }
        None => q.after.map_or(0, |a| a.saturating_add(1)),
    };
    let run = super::runs::load_run(&state, id).await?;
    let (tx, rx) = mpsc::channel(256);
    let guard = ClientGuard::new(state.hub.clone());
    tokio::spawn(async move {
        let _guard = guard;
        stream_run(&state, &run.id, from, q.logs.unwrap_or(true), &tx).await;
    });
    Ok(Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// Replays what the store holds from `from`, then follows the live run.
async fn stream_run(state: &AppState, run: &str, mut from: u64, logs: bool, tx: &Tx) {
    let sub = state.hub.subscribe(run);
    let Some(mut rx) = sub.rx else {
        // Ended (or not run here): the store has all of it.
        if replay(state, run, &mut from, u64::MAX, logs, tx).await {
            let _ = tx.send(end_event(from)).await;
        }
        return;
    };
    if !replay(state, run, &mut from, sub.next, logs, tx).await {
        return;
    }
    loop {
        let item = tokio::select! {
            item = rx.recv() => item,
            _ = state.shutdown.cancelled() => return,
            _ = tx.closed() => return,
        };
        match item {
            Ok(Live::Event(r)) => {
                if r.seq < from {
                    continue;
                }
                from = r.seq + 1;
                if !logs && &*r.name == "task_log" {
                    continue;
                }
                if tx.send(sse_event(r.seq, &r.name, &r.json)).await.is_err() {
                    return;
                }
            }
            Ok(Live::End) | Err(broadcast::error::RecvError::Closed) => {
                // Anything recorded after the last event we saw is in the store.
                if replay(state, run, &mut from, u64::MAX, logs, tx).await {
                    let _ = tx.send(end_event(from)).await;
                }
                return;
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Fell behind the channel: the store has what was missed
                // (and more; what the channel still holds is then skipped).
                if !replay(state, run, &mut from, u64::MAX, logs, tx).await {
                    return;
                }
            }
        }
    }
}

fn end_event(next: u64) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default()
        .event("end")
        .data(format!("{{\"next\":{next}}}")))
}

/// Up to `limit` stored events of `run` from `from` on, read off the async
/// threads; a store that cannot be read gives none (the stream ends).
async fn page(state: &AppState, run: &str, from: u64, limit: usize) -> Vec<(u64, Vec<u8>)> {
    let store = state.store.clone();
    let run = run.to_owned();
    tokio::task::spawn_blocking(move || store.events(&run, from, limit))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
}

/// Sends stored events with `from <= seq < upto`; `false` when the client left.
async fn replay(
    state: &AppState,
    run: &str,
    from: &mut u64,
    upto: u64,
    logs: bool,
    tx: &Tx,
) -> bool {
    while *from < upto {
        let page = page(state, run, *from, REPLAY_PAGE).await;
        if page.is_empty() {
            return true;
        }
        for (seq, bytes) in page {
            if seq >= upto {
                return true;
            }
            let json = String::from_utf8_lossy(&bytes);
            let name = peek(&bytes).map_or_else(|| "event".to_owned(), |p| p.event);
            *from = seq + 1;
            if !logs && name == "task_log" {
                continue;
            }
            if tx.send(sse_event(seq, &name, &json)).await.is_err() {
                return false;
            }
        }
    }
    true
}

#[utoipa::path(get, path = "/api/v1/events", tag = "events",
    responses((status = 200, description = "`text/event-stream`: every run's and task's state \
        changes (no log lines), live; `data` is `{\"run\", \"seq\", \"data\": <the run's event>}`",
        body = SseMessage, content_type = "text/event-stream")))]
pub async fn feed(State(state): State<AppState>) -> Response {
    let mut feed = state.hub.feed();
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(256);
    let guard = ClientGuard::new(state.hub.clone());
    tokio::spawn(async move {
        let _guard = guard;
        let hello = SseEvent::default().event("hello").data("{}");
        if tx.send(Ok(hello)).await.is_err() {
            return;
        }
        loop {
            let item = tokio::select! {
                item = feed.recv() => item,
                _ = state.shutdown.cancelled() => return,
                _ = tx.closed() => return,
            };
            let ev = match item {
                Ok(r) => SseEvent::default().event(&*r.name).data(format!(
                    "{{\"run\":{},\"seq\":{},\"data\":{}}}",
                    serde_json::Value::String(r.run.to_string()),
                    r.seq,
                    r.json
                )),
                // A client this far behind refetches what it shows.
                Err(broadcast::error::RecvError::Lagged(n)) => SseEvent::default()
                    .event("lagged")
                    .data(format!("{{\"missed\":{n}}}")),
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// The log of a task that has not ended, from the run's stored events,
/// and whether it has ended since.
pub async fn log_so_far(state: &AppState, run: &str, label: &str) -> ApiResult<(Vec<u8>, bool)> {
    let store = state.store.clone();
    let (run, label) = (run.to_owned(), label.to_owned());
    tokio::task::spawn_blocking(move || -> ApiResult<(Vec<u8>, bool)> {
        let needle = json_label(&label);
        let mut out = Vec::new();
        let mut done = false;
        let mut from = 0;
        loop {
            let page = store.events(&run, from, REPLAY_PAGE)?;
            let Some(last) = page.last().map(|(s, _)| *s) else {
                break;
            };
            for (_, bytes) in &page {
                append_log(bytes, &label, &needle, &mut out, &mut done);
            }
            from = last + 1;
        }
        Ok((out, done))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

/// Adds a `task_log` line of `label` to `out`; notes its `task_finished`.
/// `needle` is the label as JSON (`"\"//pkg:name\""`), made once by the caller.
fn append_log(bytes: &[u8], label: &str, needle: &[u8], out: &mut Vec<u8>, done: &mut bool) {
    // Cheap filter before decoding: most events are not this task's.
    if !contains(bytes, needle) {
        return;
    }
    let Some(p) = peek(bytes) else { return };
    if p.label.as_deref() != Some(label) {
        return;
    }
    match p.event.as_str() {
        "task_log" => {
            if let Some(line) = p.line {
                out.extend_from_slice(line.as_bytes());
                out.push(b'\n');
            }
        }
        "task_finished" => *done = true,
        _ => {}
    }
}

/// A label as it appears in an event's JSON, to filter events by.
fn json_label(label: &str) -> Vec<u8> {
    serde_json::to_vec(label).unwrap_or_default()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// Streams a running task's log from byte `offset` until the task ends.
pub async fn follow_log(state: AppState, run: String, label: String, offset: u64) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let guard = ClientGuard::new(state.hub.clone());
    tokio::spawn(async move {
        let _guard = guard;
        let needle = json_label(&label);
        let mut sent: u64 = 0;
        let send = |chunk: Vec<u8>, sent: &mut u64| {
            // Skip what lies before `offset`.
            let start = offset.saturating_sub(*sent).min(chunk.len() as u64) as usize;
            *sent += chunk.len() as u64;
            chunk[start..].to_vec()
        };
        let sub = state.hub.subscribe(&run);
        let upto = if sub.rx.is_some() { sub.next } else { u64::MAX };
        let mut from = 0u64;
        let mut done = false;
        while from < upto {
            let page = page(&state, &run, from, REPLAY_PAGE).await;
            if page.is_empty() {
                break;
            }
            let mut chunk = Vec::new();
            for (seq, bytes) in &page {
                if *seq >= upto {
                    break;
                }
                append_log(bytes, &label, &needle, &mut chunk, &mut done);
                from = seq + 1;
            }
            let out = send(chunk, &mut sent);
            if !out.is_empty() && tx.send(Ok(Bytes::from(out))).await.is_err() {
                return;
            }
        }
        let Some(mut rx) = sub.rx else { return };
        while !done {
            let item = tokio::select! {
                item = rx.recv() => item,
                _ = state.shutdown.cancelled() => return,
                _ = tx.closed() => return,
            };
            match item {
                Ok(Live::Event(r)) if r.seq >= from => {
                    from = r.seq + 1;
                    let mut chunk = Vec::new();
                    append_log(r.json.as_bytes(), &label, &needle, &mut chunk, &mut done);
                    let out = send(chunk, &mut sent);
                    if !out.is_empty() && tx.send(Ok(Bytes::from(out))).await.is_err() {
                        return;
                    }
                }
                Ok(Live::Event(_)) => {}
                Ok(Live::End) | Err(broadcast::error::RecvError::Closed) => return,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let page = page(&state, &run, from, usize::MAX).await;
                    let mut chunk = Vec::new();
                    for (seq, bytes) in &page {
                        append_log(bytes, &label, &needle, &mut chunk, &mut done);
                        from = seq + 1;
                    }
                    let out = send(chunk, &mut sent);
                    if !out.is_empty() && tx.send(Ok(Bytes::from(out))).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut res = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

#[allow(dead_code)]
fn _assert_send(_: Arc<AppState>) {}
