//! One HTTP client for every backend: timeouts that turn a stalled server
//! into an error, the token, and counts of requests and bytes.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ureq::http::Response;
use ureq::typestate::{WithBody, WithoutBody};
use ureq::{Body, RequestBuilder, SendBody};

use crate::RemoteError;

/// How long the client waits, for every request of a remote cache.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// To open a connection.
    pub connect: Duration,
    /// For the answer's first byte, and then between any two reads or
    /// writes: a server that stops sending mid-transfer is abandoned after
    /// this long.
    pub stall: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(3),
            stall: Duration::from_secs(20),
        }
    }
}

impl Timeouts {
    /// The defaults, or `CI_REMOTE_TIMEOUT` seconds for both.
    pub fn from_env() -> Timeouts {
        match std::env::var("CI_REMOTE_TIMEOUT")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| *s > 0.0)
        {
            Some(s) => Timeouts {
                connect: Duration::from_secs_f64(s),
                stall: Duration::from_secs_f64(s),
            },
            None => Timeouts::default(),
        }
    }
}

/// Requests and bytes, as a build's summary and the benchmark show them.
#[derive(Default, Debug)]
pub struct Traffic {
    pub requests: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

pub(crate) struct Http {
    pub(crate) base: String,
    agent: ureq::Agent,
    token: Option<String>,
    pub(crate) traffic: Traffic,
}

impl Http {
    pub(crate) fn new(base: &str, token: Option<String>, t: Timeouts) -> Http {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(t.connect))
            .timeout_recv_response(Some(t.stall))
            .timeout_per_read(Some(t.stall))
            .timeout_per_write(Some(t.stall))
            .max_idle_connections_per_host(16)
            .build()
            .into();
        Http {
            base: base.trim_end_matches('/').to_owned(),
            agent,
            token,
            traffic: Traffic::default(),
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn auth<B>(&self, req: RequestBuilder<B>) -> RequestBuilder<B> {
        self.traffic.requests.fetch_add(1, Ordering::Relaxed);
        match &self.token {
            Some(t) => req.header("Authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    pub(crate) fn get(&self, path: &str) -> RequestBuilder<WithoutBody> {
        self.auth(self.agent.get(self.url(path)))
    }

    pub(crate) fn head(&self, path: &str) -> RequestBuilder<WithoutBody> {
        self.auth(self.agent.head(self.url(path)))
    }

    pub(crate) fn post(&self, path: &str) -> RequestBuilder<WithBody> {
        self.auth(self.agent.post(self.url(path)))
    }

    pub(crate) fn put(&self, path: &str) -> RequestBuilder<WithBody> {
        self.auth(self.agent.put(self.url(path)))
    }

    /// Sends `body` (counted) and checks the status: 2xx and 404 are
    /// answers; anything else is an error.
    pub(crate) fn send(
        &self,
        what: &str,
        req: RequestBuilder<WithBody>,
        body: &[u8],
    ) -> Result<Response<Body>, RemoteError> {
        self.traffic
            .bytes_sent
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        self.check(what, req.send(body))
    }

    /// Streams `body` (counted as it goes).
    pub(crate) fn send_stream(
        &self,
        what: &str,
        req: RequestBuilder<WithBody>,
        body: &mut dyn Read,
    ) -> Result<Response<Body>, RemoteError> {
        let mut counted = Counted {
            inner: body,
            n: &self.traffic.bytes_sent,
        };
        self.check(what, req.send(SendBody::from_reader(&mut counted)))
    }

    pub(crate) fn call(
        &self,
        what: &str,
        req: RequestBuilder<WithoutBody>,
    ) -> Result<Response<Body>, RemoteError> {
        self.check(what, req.call())
    }

    fn check(
        &self,
        what: &str,
        res: Result<Response<Body>, ureq::Error>,
    ) -> Result<Response<Body>, RemoteError> {
        let res = res.map_err(|e| RemoteError::Unreachable(format!("{what}: {e}")))?;
        let status = res.status().as_u16();
        if status < 300 || status == 404 {
            return Ok(res);
        }
        let mut body = String::new();
        let _ = res
            .into_body()
            .into_with_config()
            .limit(64 << 10)
            .reader()
            .read_to_string(&mut body);
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or(body);
        let message = crate::clip(message.trim(), 300);
        match status {
            401 | 403 => Err(RemoteError::Denied(format!(
                "{what}: {status} {message} (the token comes from `CI_TOKEN`)"
            ))),
            400..=499 => Err(RemoteError::Refused(format!("{what}: {status} {message}"))),
            _ => Err(RemoteError::Unreachable(format!(
                "{what}: the server answered {status} {message}"
            ))),
        }
    }

    /// The body as a reader that counts what it yields.
    pub(crate) fn reader(&self, res: Response<Body>) -> impl Read + '_ {
        Counted {
            inner: res.into_body().into_reader(),
            n: &self.traffic.bytes_received,
        }
    }

    /// A small body (JSON, digest lists), read whole.
    pub(crate) fn read_small(
        &self,
        what: &str,
        res: Response<Body>,
    ) -> Result<Vec<u8>, RemoteError> {
        let mut out = Vec::new();
        res.into_body()
            .into_with_config()
            .limit(256 << 20)
            .reader()
            .read_to_end(&mut out)
            .map_err(|e| RemoteError::Unreachable(format!("{what}: {e}")))?;
        self.traffic
            .bytes_received
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(out)
    }
}

struct Counted<'a, R> {
    inner: R,
    n: &'a AtomicU64,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}
