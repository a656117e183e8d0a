//! The remote cache from the command line: `--remote-cache` for builds, the
//! fetching of layers held only remotely when `ci store` reads them, and
//! `ci store push|pull LAYER URL` to move one layer by hand.

use std::sync::Arc;

use clap::Args;
use strata_engine::model::Settings;
use strata_remote::{Fetch, Mode, RemoteCache, Timeouts};
use strata_store::{ActionCache, Digest, Store};

use crate::{usage, Ctx};

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
    /// `all`: a hit brings every object of its output; `needed`: a hit brings
    /// only its entry, and a layer comes when a task here (or `ci store`) reads it
    /// [default: `[cache] fetch` in ci.toml, else `all`]
    #[arg(long, value_name = "WHAT", env = "CI_REMOTE_FETCH")]
    pub remote_fetch: Option<String>,
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

fn parse_fetch(s: &str, from: &str) -> anyhow::Result<Fetch> {
    match s {
        "all" => Ok(Fetch::All),
        "needed" => Ok(Fetch::Needed),
        other => Err(usage(format!(
            "Unknown remote fetch `{other}` ({from}); use `all` or `needed`"
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
    let fetch = match (&args.remote_fetch, &settings.remote_cache_fetch) {
        (Some(f), _) => parse_fetch(f, "--remote-fetch")?,
        (None, Some(f)) => parse_fetch(f, "`[cache] fetch` in ci.toml")?,
        (None, None) => Fetch::All,
    };
    let backend = strata_remote::connect(&url, token(), Timeouts::from_env()).map_err(usage)?;
    Ok(Some(Arc::new(
        RemoteCache::new(store.clone(), backend, mode).with_fetch(fetch),
    )))
}

/// Where `ci store` fetches layers held only remotely: `--remote-cache` or
/// `CI_REMOTE_CACHE`, else `[cache] remote` of the workspace around.
fn configured(ctx: &Ctx) -> Option<String> {
    ctx.remote_cache
        .clone()
        .or_else(|| std::env::var("CI_REMOTE_CACHE").ok())
        .filter(|u| !u.is_empty())
        .or_else(|| {
            let root = ctx.workspace_root()?;
            strata_engine::loader::read_settings(&root)
                .ok()?
                .remote_cache
        })
}

/// Makes `layers` readable in the local store: those it holds only
/// remotely are fetched (all in one transfer) from the configured cache;
/// with none configured, the error names the layer, where it is held and
/// the command that fetches it.
pub fn ensure_local(ctx: &Ctx, store: &Store, layers: &[Digest]) -> anyhow::Result<()> {
    let mut remote = Vec::new();
    for l in layers {
        if let Some(r) = store.remote_layer(l)? {
            remote.push((*l, r));
        }
    }
    let Some((first, held)) = remote.first().cloned() else {
        return Ok(());
    };
    let Some(url) = configured(ctx) else {
        return Err(usage(format!(
            "Layer {first} is held only at the remote cache `{url}` (a hit of              `--remote-fetch=needed`); fetch it with `ci store pull {first} {url}`, or pass              `--remote-cache URL` (or set `CI_REMOTE_CACHE`) to fetch on use",
            url = held.url
        )));
    };
    let wanted: Vec<Digest> = remote.iter().map(|(l, _)| *l).collect();
    let writer = ctx.open_write()?;
    let b = backend(&url)?;
    let got = b.pull(&writer, &wanted).map_err(|e| failed(&url, e))?;
    writer.forget_remote(&wanted)?;
    writer.sync()?;
    ctx.summary(&format!(
        "fetched {} layers held remotely from {url}: {} objects ({})",
        wanted.len(),
        got.objects,
        human(got.bytes)
    ));
    Ok(())
}

/// The layer held only remotely that `spec` names: its full digest, or a
/// unique prefix of 8+ hex digits.
pub fn remote_match(store: &Store, spec: &str) -> anyhow::Result<Option<Digest>> {
    let spec = spec.to_ascii_lowercase();
    if spec.len() < strata_store::MIN_PREFIX_LEN || !spec.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let found: Vec<Digest> = store
        .remote_layers()?
        .into_iter()
        .map(|(d, _)| d)
        .filter(|d| d.to_hex().starts_with(&spec))
        .collect();
    Ok(match found.len() {
        1 => Some(found[0]),
        _ => None,
    })
}

/// Opens the store for reading and resolves `spec` to a layer that is
/// stored here: one held only remotely is fetched first ([`ensure_local`]).
pub fn readable(ctx: &Ctx, spec: &str) -> anyhow::Result<(Store, Digest)> {
    let store = ctx.open_read()?;
    let layer = ctx.resolve(&store, spec)?;
    if store.remote_layer(&layer)?.is_none() {
        return Ok((store, layer));
    }
    ensure_local(ctx, &store, &[layer])?;
    drop(store);
    Ok((ctx.open_read()?, layer))
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
pub fn push(ctx: &Ctx, spec: &str, url: &str, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let (store, layer) = readable(ctx, spec)?;
    let b = backend(url)?;
    let sent = b.send(&store, &[layer], &[]).map_err(|e| failed(url, e))?;
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
    store.forget_remote(&[layer])?;
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
