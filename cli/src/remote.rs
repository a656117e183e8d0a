//! `ci` as a client of `ci serve`: the same commands, output, `--json` and
//! exit codes as against a local store, through the HTTP API. A 4xx answer
//! is the user's (exit 2), a 5xx or an unreachable server the system's (3).

use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use strata_engine::{Event, RunRecord, Stream, TaskState};
use strata_store::Digest;

use crate::usage;

/// A `ci serve` at a base URL, with the token from `CI_TOKEN`.
pub struct Remote {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

/// An answer that was not an error.
pub struct Reply {
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body).context("The server's answer is not JSON")
    }
}

/// Percent-encodes one path segment (a label, a run id, a path component).
pub fn seg(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes a path inside a layer, keeping its `/`.
pub fn path_segs(path: &str) -> String {
    path.split('/').map(seg).collect::<Vec<_>>().join("/")
}

impl Remote {
    pub fn new(url: &str) -> anyhow::Result<Remote> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(usage(format!(
                "`{url}` is not a server URL; write e.g. `http://127.0.0.1:8420`"
            )));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .build()
            .into();
        let token = std::env::var("CI_TOKEN").ok().filter(|t| !t.is_empty());
        Ok(Remote { base, agent, token })
    }

    /// Uses `token` unless `CI_TOKEN` gave one.
    pub fn with_default_token(mut self, token: Option<String>) -> Remote {
        if self.token.is_none() {
            self.token = token;
        }
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn finish(
        &self,
        what: &str,
        res: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<Reply> {
        let mut res =
            res.with_context(|| format!("Cannot reach `ci serve` at {} ({what})", self.base))?;
        let status = res.status().as_u16();
        let mut body = Vec::new();
        res.body_mut()
            .as_reader()
            .read_to_end(&mut body)
            .with_context(|| format!("Cannot read the answer of {} ({what})", self.base))?;
        if status < 400 {
            return Ok(Reply { body });
        }
        let message = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        if (400..500).contains(&status) {
            let hint = match status {
                401 | 403 => " (the client sends the token in `CI_TOKEN`)",
                _ => "",
            };
            return Err(usage(format!("{message}{hint}")));
        }
        Err(anyhow::anyhow!("The server failed ({status}): {message}"))
    }

    fn auth(
        &self,
        req: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
    ) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        match &self.token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Reply> {
        let req = self.auth(self.agent.get(format!("{}{path}", self.base)));
        self.finish(&format!("GET {path}"), req.call())
    }

    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<Reply> {
        let mut req = self.agent.post(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        self.finish(&format!("POST {path}"), req.send_json(body))
    }

    /// Follows the events of run `id` until it ends, calling `f` for each
    /// engine event; reconnects (with `Last-Event-ID`) when the stream breaks.
    pub fn follow(&self, id: &str, f: &mut dyn FnMut(Event)) -> anyhow::Result<()> {
        let mut last: Option<u64> = None;
        let mut failures = 0;
        loop {
            let mut req = self.auth(self.agent.get(format!(
                "{}/api/v1/runs/{}/events",
                self.base,
                seg(id)
            )));
            if let Some(l) = last {
                req = req.header("Last-Event-ID", l.to_string());
            }
            let res = match req.call() {
                Ok(r) if r.status().as_u16() == 200 => r,
                Ok(r) => {
                    return Err(anyhow::anyhow!(
                        "The server refused the events of run `{id}` ({})",
                        r.status()
                    ))
                }
                Err(e) => {
                    failures += 1;
                    if failures > 10 {
                        return Err(e).with_context(|| format!("Lost `ci serve` at {}", self.base));
                    }
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
            };
            let reader = BufReader::new(res.into_body().into_reader());
            let (mut id_field, mut name, mut data) = (None::<u64>, String::new(), String::new());
            for line in reader.lines() {
                let Ok(line) = line else { break };
                if line.is_empty() {
                    if name == "end" {
                        return Ok(());
                    }
                    if let Some(i) = id_field.take() {
                        last = Some(i);
                    }
                    if let Ok(v) = serde_json::from_str::<Value>(&data) {
                        if let Some(e) = event_from_json(&v) {
                            f(e);
                        }
                    }
                    name.clear();
                    data.clear();
                    continue;
                }
                if let Some(v) = line.strip_prefix("id:") {
                    id_field = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            failures += 1;
            if failures > 10 {
                return Err(anyhow::anyhow!(
                    "The event stream of run `{id}` kept breaking"
                ));
            }
        }
    }

    pub fn run(&self, id: &str) -> anyhow::Result<RunRecord> {
        let reply = self.get(&format!("/api/v1/runs/{}", seg(id)))?;
        serde_json::from_slice(&reply.body).context("The server sent a run record we cannot read")
    }
}

fn digest(v: &Value) -> Option<Digest> {
    v.as_str().and_then(|s| s.parse().ok())
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

fn state(v: &Value) -> TaskState {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(TaskState::Failed)
}

/// An engine event from its JSON (the stream's `data`); `None` for the
/// server's own events (`run_queued`) and anything unknown.
pub fn event_from_json(v: &Value) -> Option<Event> {
    let u = |k: &str| v[k].as_u64().unwrap_or(0);
    Some(match v["event"].as_str()? {
        "run_started" => Event::RunStarted {
            run: text(&v["run"]),
            targets: v["targets"]
                .as_array()
                .map(|a| a.iter().map(text).collect())
                .unwrap_or_default(),
            tasks: u("tasks") as usize,
        },
        "note" => Event::Note {
            message: text(&v["message"]),
        },
        "task_started" => Event::TaskStarted {
            label: text(&v["label"]),
            attempt: u("attempt") as u32,
            executor: text(&v["executor"]),
        },
        "task_log" => Event::TaskLog {
            label: text(&v["label"]),
            stream: if v["stream"] == "stderr" {
                Stream::Stderr
            } else {
                Stream::Stdout
            },
            line: text(&v["line"]),
        },
        "task_finished" => Event::TaskFinished {
            label: text(&v["label"]),
            state: state(&v["state"]),
            cached: v["cached"].as_bool().unwrap_or(false),
            output: digest(&v["output"]),
            duration_ms: u("duration_ms"),
            exit_code: v["exit_code"].as_i64().map(|c| c as i32),
            error: v["error"].as_str().map(str::to_owned),
            key: digest(&v["key"]),
            log: digest(&v["log"]),
            context: v["context"]
                .as_object()
                .map(|m| m.iter().map(|(k, x)| (k.clone(), text(x))).collect())
                .unwrap_or_default(),
            attempts: u("attempts") as u32,
        },
        "run_finished" => Event::RunFinished {
            run: text(&v["run"]),
            state: state(&v["state"]),
            executed: u("executed") as usize,
            cached: u("cached") as usize,
            failed: u("failed") as usize,
            skipped: u("skipped") as usize,
            duration_ms: u("duration_ms"),
        },
        _ => return None,
    })
}

/// Cancels run `id` on the server at the first Ctrl-C or SIGTERM, from a
/// thread of its own; the flag says whether it did.
pub fn cancel_on_interrupt(remote: Arc<Remote>, id: String) -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f2 = flag.clone();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
            }
        });
        f2.store(true, Ordering::SeqCst);
        eprintln!("Interrupted: cancelling run {id} on the server…");
        let _ = remote.post(
            &format!("/api/v1/runs/{}/cancel", seg(&id)),
            &serde_json::json!({}),
        );
    });
    flag
}
