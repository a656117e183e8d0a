//! A real `ci serve` for tests: started on 127.0.0.1 at a free port (the
//! kernel picks it: `--listen 127.0.0.1:0`), with this environment's store,
//! and an HTTP client for it. Its stderr is kept, and shown when a test fails.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::Env;

/// A running `ci serve`. Killed (SIGKILL) on drop if still running.
pub struct Server {
    child: Option<Child>,
    pub url: String,
    log: Arc<Mutex<String>>,
    agent: ureq::Agent,
}

/// An answer: status, headers we look at, body.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "answer {} is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

impl Server {
    /// Starts `ci serve` for `workspaces` (paths relative to the env's
    /// workspace) with extra arguments, and waits until it listens.
    pub fn start(env: &Env, workspaces: &[&str], extra: &[&str]) -> Server {
        Server::start_env(env, workspaces, extra, &[])
    }

    pub fn start_env(
        env: &Env,
        workspaces: &[&str],
        extra: &[&str],
        vars: &[(&str, &str)],
    ) -> Server {
        let mut args: Vec<String> = vec!["serve".into(), "--listen".into(), "127.0.0.1:0".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(workspaces.iter().map(|s| s.to_string()));
        let mut cmd = env.command(&args);
        cmd.envs(vars.iter().copied());
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start ci serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("Serving on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(url.trim().to_owned());
                    }
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "ci serve did not start listening; its stderr:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        Server {
            child: Some(child),
            url,
            log,
            agent: agent(),
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    fn reply(
        &self,
        what: &str,
        res: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Reply {
        let mut res = res.unwrap_or_else(|e| panic!("{what}: {e}\nserver log:\n{}", self.log()));
        let status = res.status().as_u16();
        let headers = res
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let mut body = Vec::new();
        res.body_mut()
            .as_reader()
            .read_to_end(&mut body)
            .unwrap_or_else(|e| panic!("{what}: reading the body: {e}"));
        Reply {
            status,
            headers,
            body,
        }
    }

    pub fn get(&self, path: &str) -> Reply {
        self.get_with(path, &[])
    }

    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = self.agent.get(format!("{}{path}", self.url));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.reply(&format!("GET {path}"), req.call())
    }

    /// POSTs JSON with an optional bearer token.
    pub fn post(&self, path: &str, body: &Value, token: Option<&str>) -> Reply {
        let mut req = self.agent.post(format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        self.reply(&format!("POST {path}"), req.send_json(body))
    }

    /// POSTs raw bytes with headers.
    pub fn post_raw(&self, path: &str, body: &[u8], headers: &[(&str, &str)]) -> Reply {
        let mut req = self.agent.post(format!("{}{path}", self.url));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.reply(&format!("POST {path}"), req.send(body))
    }

    /// Waits until run `id` has ended; returns its record.
    pub fn wait_run(&self, id: &str) -> Value {
        let events = self.events(id, None);
        assert!(
            events.last().is_some_and(|e| e.name == "end"),
            "the event stream of {id} did not end with `end`; server log:\n{}",
            self.log()
        );
        self.get(&format!("/api/v1/runs/{id}")).json()
    }

    /// Every event of run `id` (after `last_id`), read until the stream ends.
    pub fn events(&self, id: &str, last_id: Option<u64>) -> Vec<Sse> {
        let mut stream = self.stream(id, last_id);
        let mut out = Vec::new();
        while let Some(e) = stream.next() {
            let end = e.name == "end";
            out.push(e);
            if end {
                break;
            }
        }
        out
    }

    /// Opens the event stream of run `id`.
    pub fn stream(&self, id: &str, last_id: Option<u64>) -> SseStream {
        let mut req = self
            .agent
            .get(format!("{}/api/v1/runs/{id}/events", self.url));
        if let Some(l) = last_id {
            req = req.header("Last-Event-ID", l.to_string());
        }
        let res = req
            .call()
            .unwrap_or_else(|e| panic!("GET events of {id}: {e}"));
        assert_eq!(res.status().as_u16(), 200, "GET events of {id}");
        SseStream::new(Box::new(res.into_body().into_reader()))
    }

    /// Opens the global feed.
    pub fn feed(&self) -> SseStream {
        let res = self
            .agent
            .get(format!("{}/api/v1/events", self.url))
            .call()
            .expect("GET /api/v1/events");
        SseStream::new(Box::new(res.into_body().into_reader()))
    }

    /// SIGTERM, then waits for the process; returns its exit code.
    pub fn stop(mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().ok().and_then(|s| s.code())
    }

    /// SIGKILL, then waits.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One server-sent event.
#[derive(Clone, Debug)]
pub struct Sse {
    pub id: Option<u64>,
    pub name: String,
    pub data: String,
}

impl Sse {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }
}

/// A parser of `text/event-stream` over a blocking reader.
pub struct SseStream {
    reader: BufReader<Box<dyn Read + Send>>,
}

impl SseStream {
    /// A stream over any reader (a test's own connection).
    pub fn new_for_tests(reader: impl Read + Send + 'static) -> SseStream {
        SseStream::new(Box::new(reader))
    }

    fn new(reader: Box<dyn Read + Send>) -> SseStream {
        SseStream {
            reader: BufReader::new(reader),
        }
    }

    /// The next event (comments and keep-alives skipped); `None` at the end.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Sse> {
        let (mut id, mut name, mut data) = (None, String::from("message"), Vec::<String>::new());
        let mut any = false;
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if any {
                    return Some(Sse {
                        id,
                        name,
                        data: data.join("\n"),
                    });
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            any = true;
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => id = value.parse().ok(),
                "event" => name = value.to_owned(),
                "data" => data.push(value.to_owned()),
                _ => {}
            }
        }
    }
}
