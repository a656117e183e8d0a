//! The remote cache from the command line: `--remote-cache` for builds, and
//! `ci store push|pull LAYER URL` to move one layer by hand.

use std::sync::Arc;

use clap::Args;
use strata_engine::model::Settings;
use strata_remote::{Mode, RemoteCache, Timeouts};
use strata_store::{ActionCache, Store};

use crate::usage;

#[derive(Args, Clone, Debug, Default)]
pub struct CacheArgs {
    /// Share results through this remote cache: `http://HOST:PORT` (a `ci serve`)
    /// or `webdav+http://HOST/PATH` (any WebDAV server) [default: `[cache] remote`
    /// in ci.toml]
    #[arg(long, value_name = "URL", env = "CI_REMOTE_CACHE")]
    pub remote_cache: Option<String>,
    /// `read`: only look results up (for untrusted builds); `write`: also send what
    /// this build makes [default: `write` when `CI_TOKEN` is set, else `read`]
    #[arg(long, value_name = "MODE", env = "CI_REMOTE_CACHE_MODE")]
    pub remote_cache_mode: Option<String>,
}

fn token() -> Option<String> {
    std::env::var("CI_TOKEN").ok().filter(|t| !t.is_empty())
}

fn parse_mode(s: &str, from: &str) -> anyhow::Result<Mode> {
    match s {
        "read" => Ok(Mode::Read),
        "write" => Ok(Mode::Write),
        other => Err(usage(format!(
            "Unknown remote cache mode `{other}` ({from}); use `read` or `write`"
        ))),
    }
}

/// The remote cache a build uses, if any: flags, then `ci.toml`.
pub fn open(
    args: &CacheArgs,
    settings: &Settings,
    store: &Store,
) -> anyhow::Result<Option<Arc<RemoteCache>>> {
    let Some(url) = args
        .remote_cache
        .clone()
        .filter(|u| !u.is_empty())
        .or_else(|| settings.remote_cache.clone())
    else {
        return Ok(None);
    };
    let mode = match (&args.remote_cache_mode, &settings.remote_cache_mode) {
        (Some(m), _) => parse_mode(m, "--remote-cache-mode")?,
        (None, Some(m)) => parse_mode(m, "`[cache] mode` in ci.toml")?,
        (None, None) if token().is_some() => Mode::Write,
        (None, None) => Mode::Read,
    };
    let backend = strata_remote::connect(&url, token(), Timeouts::from_env()).map_err(usage)?;
    Ok(Some(Arc::new(RemoteCache::new(
        store.clone(),
        backend,
        mode,
    ))))
}

/// Ends a build's use of the cache: waits for its uploads, says what it did.
pub fn finish(cache: &RemoteCache) {
    if let Some(line) = cache.finish() {
        eprintln!("{line}");
    }
}

fn backend(url: &str) -> anyhow::Result<Box<dyn strata_remote::Backend>> {
    strata_remote::connect(url, token(), Timeouts::from_env()).map_err(usage)
}

fn failed(url: &str, e: strata_remote::RemoteError) -> anyhow::Error {
    match e {
        strata_remote::RemoteError::Denied(m) | strata_remote::RemoteError::Refused(m) => {
            usage(format!("{url}: {m}"))
        }
        e => anyhow::anyhow!("{url}: {e}"),
    }
}

/// `ci store push LAYER URL`.
pub fn push(
    store: &Store,
    spec: &str,
    url: &str,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let layer = store.resolve(spec)?;
    let b = backend(url)?;
    let sent = b.send(store, &[layer], &[]).map_err(|e| failed(url, e))?;
    writeln!(
        out,
        "pushed {} to {url}: {} objects sent ({}), {} there already",
        layer,
        sent.objects,
        human(sent.bytes),
        sent.present
    )?;
    Ok(())
}

/// `ci store pull LAYER URL`.
pub fn pull(
    store: &Store,
    spec: &str,
    url: &str,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let b = backend(url)?;
    let layer = b.resolve(spec).map_err(|e| failed(url, e))?;
    let got = b.pull(store, &[layer]).map_err(|e| failed(url, e))?;
    store.sync()?;
    writeln!(
        out,
        "pulled {layer} from {url}: {} objects received ({}), {} new",
        got.objects,
        human(got.bytes),
        got.new
    )?;
    Ok(())
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}
