//! `ci serve`: the master process of Strata. One process owns the store (as
//! its one writer) and serves one or more workspaces over HTTP:
//!
//! - [`api`]: REST + JSON under `/api/v1`, Server-Sent Events, an OpenAPI
//!   document generated from the handlers' types, `/healthz`, `/metrics`;
//! - [`runs`]: the run manager (a queue per workspace, the engine driven
//!   for each run, cancellation);
//! - [`hub`]: every event numbered, stored and fanned out;
//! - [`auth`]: bearer tokens, stored hashed beside the store;
//! - [`sources`]: timers, polled git refs and watched directories that
//!   start runs; webhooks are an endpoint of [`api`].
//!
//! Architecture invariant: the server holds no state that is not in the
//! store or derivable from it. Runs are recorded when accepted; a run left
//! unfinished by a dead server is marked `interrupted` by the next one.

pub mod api;
pub mod auth;
pub mod bazel;
pub mod cache;
pub mod error;
pub mod hub;
pub mod metrics;
pub mod runs;
pub mod sources;
pub mod ui;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use strata_engine::exec::Executor;
use strata_engine::Loader;
use strata_store::Store;
use tokio_util::sync::CancellationToken;

pub use auth::AuthMode;
pub use error::ServerError;
use runs::WorkspaceConf;

/// How to serve.
pub struct Config {
    pub listen: String,
    /// Workspace directories (any directory inside a workspace).
    pub workspaces: Vec<PathBuf>,
    pub auth: AuthMode,
    /// Runs of one workspace at once; more wait in its queue.
    pub max_runs: usize,
    /// Commands at once per run, unless the run or its workspace says.
    pub jobs: usize,
    pub docker: Option<Arc<dyn Executor>>,
    /// Where loads are cached (`~/.cache/strata/loads`).
    pub load_cache: Option<PathBuf>,
    /// Keep the store under this many bytes by evicting cache entries,
    /// least recently used first (`--cache-max-size`).
    pub cache_max_size: Option<u64>,
}

/// A server bound to its address, not yet serving.
pub struct Server {
    listener: tokio::net::TcpListener,
    state: api::AppState,
    address_file: Option<PathBuf>,
}

/// Names the workspaces: `name` in `ci.toml`, else the directory's name.
pub fn name_workspaces(dirs: &[PathBuf]) -> Result<BTreeMap<String, WorkspaceConf>, ServerError> {
    let mut out = BTreeMap::new();
    for dir in dirs {
        let loader = Loader::discover(dir).map_err(|source| ServerError::Workspace {
            dir: dir.clone(),
            source,
        })?;
        let root =
            std::fs::canonicalize(loader.root()).unwrap_or_else(|_| loader.root().to_owned());
        let settings = strata_engine::loader::read_settings(&root).map_err(|source| {
            ServerError::Workspace {
                dir: dir.clone(),
                source,
            }
        })?;
        let name = settings.name.clone().unwrap_or_else(|| {
            root.file_name()
                .map_or_else(|| "root".to_owned(), |n| n.to_string_lossy().into_owned())
        });
        if out.contains_key(&name) {
            return Err(ServerError::DuplicateWorkspace(name));
        }
        out.insert(name.clone(), WorkspaceConf { name, root });
    }
    Ok(out)
}

impl Server {
    /// Binds, marks runs a dead server left as interrupted, starts the
    /// sources, and writes the address into the store directory (so a
    /// plain `ci build` on this store finds the server).
    pub async fn bind(store: Store, config: Config) -> Result<Server, ServerError> {
        let workspaces = name_workspaces(&config.workspaces)?;
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .map_err(|source| ServerError::Listen {
                addr: config.listen.clone(),
                source,
            })?;
        let hub = hub::Hub::new(store.clone());
        let mgr = runs::Manager::new(
            store.clone(),
            hub.clone(),
            workspaces,
            config.max_runs,
            config.docker,
            config.load_cache,
            config.jobs,
        );
        let marked = mgr.mark_interrupted()?;
        for id in &marked {
            eprintln!(
                "note: run {id} was left unfinished by a stopped process; marked interrupted"
            );
        }
        store.sync()?;
        let shutdown = CancellationToken::new();
        sources::start(&mgr, &shutdown)?;
        let tokens = Arc::new(auth::Tokens::new(store.root(), config.auth));
        if let Some(root) = store.root() {
            tokens.set_local(auth::write_local_token(root)?);
        }
        let cache = Arc::new(cache::CacheState::new(config.cache_max_size));
        let metrics = metrics::Metrics::new();
        metrics.register(|r| cache.register(r));
        let state = api::AppState {
            mgr,
            hub,
            tokens,
            store: store.clone(),
            metrics: Arc::new(metrics),
            shutdown,
            run_cache: Default::default(),
            cache,
        };
        cache::evict::start(&state);
        let address_file = store.root().map(|r| auth::serve_dir(r).join("address"));
        if let (Some(path), Ok(addr)) = (&address_file, listener.local_addr()) {
            let _ = std::fs::create_dir_all(path.parent().unwrap_or(std::path::Path::new(".")));
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, format!("http://{addr}\n{}\n", std::process::id())).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
        Ok(Server {
            listener,
            state,
            address_file,
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `stop` completes; then stops accepting, cancels the
    /// running runs (recorded as cancelled, their processes and mounts
    /// cleaned up) and returns.
    pub async fn serve(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let state = self.state.clone();
        let app = api::router(self.state.clone());
        let shutdown = state.shutdown.clone();
        let graceful = async move {
            stop.await;
            // Live streams end, so the graceful shutdown does not wait on them.
            shutdown.cancel();
        };
        let addr = self
            .listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let result = axum::serve(self.listener, app)
            .with_graceful_shutdown(graceful)
            .await
            .map_err(|source| ServerError::Listen { addr, source });
        state.mgr.shutdown().await;
        let _ = state.store.sync();
        if let Some(p) = &self.address_file {
            let _ = std::fs::remove_file(p);
            if let Some(dir) = p.parent() {
                let _ = std::fs::remove_file(dir.join("local-token"));
            }
        }
        result
    }
}

/// The server that owns the store at `store_root`, if one wrote its address
/// there and its process is alive: `http://host:port`.
pub fn running_server(store_root: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(auth::serve_dir(store_root).join("address")).ok()?;
    let mut lines = text.lines();
    let url = lines.next()?.trim().to_owned();
    let pid: i32 = lines.next()?.trim().parse().ok()?;
    // SAFETY: kill(pid, 0) only checks that the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    alive.then_some(url)
}
