//! `ci serve`: the master process (crate `strata-server`), and
//! `ci serve token create|ls|revoke`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use strata_server::{AuthMode, Config, Server};

use crate::{usage, Ctx, Outcome};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServeArgs {
    #[command(subcommand)]
    command: Option<ServeCommand>,
    /// Workspaces to serve: directories inside them [default: the current one]
    workspaces: Vec<PathBuf>,
    /// Where to listen
    #[arg(long, default_value = "127.0.0.1:8420", value_name = "ADDR")]
    listen: String,
    /// `writes`: reads are open, changes need a write token; `all`: every API
    /// request needs a token
    #[arg(long, default_value = "writes", value_name = "WHAT")]
    auth: String,
    /// Runs of one workspace at once; more wait in its queue
    #[arg(long, default_value_t = 2, value_name = "N")]
    max_runs: usize,
    /// Commands at once per run [default: `jobs` in ci.toml, else the number of cores]
    #[arg(short, long)]
    jobs: Option<usize>,
    /// Keep the store under this size (e.g. `50G`, `500M`) by evicting remote-cache
    /// entries, least recently used first [default: no limit]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    cache_max_size: Option<u64>,
}

/// `123`, `10K`, `500M`, `50G`, `1T` (powers of 1024; a trailing `B` or `iB` is fine).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("`{s}`: the unit must be K, M, G or T")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size; write e.g. `50G` or `500M`"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("`{s}`: give a size above 0"));
    }
    Ok((n * (1u64 << shift) as f64) as u64)
}

#[derive(Subcommand)]
enum ServeCommand {
    /// Manage the bearer tokens of this store's server
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a token and print it (once: the store keeps only its hash)
    Create {
        name: String,
        /// The token may read (under `--auth all`) but never change anything
        #[arg(long)]
        read_only: bool,
    },
    /// List the tokens (names, never the tokens)
    Ls,
    /// Revoke a token: it stops working at once, also on a running server
    Revoke { name: String },
}

pub fn run(args: ServeArgs, ctx: &Ctx) -> anyhow::Result<Outcome> {
    if let Some(ServeCommand::Token { command }) = args.command {
        return token(command, ctx);
    }
    let auth = match args.auth.as_str() {
        "writes" => AuthMode::Writes,
        "all" => AuthMode::All,
        other => {
            return Err(usage(format!(
                "Unknown `--auth` `{other}`; use `writes` or `all`"
            )))
        }
    };
    if args.jobs == Some(0) {
        return Err(usage("`--jobs` is 0; give at least 1"));
    }
    if args.max_runs == 0 {
        return Err(usage("`--max-runs` is 0; give at least 1"));
    }
    let dirs = if args.workspaces.is_empty() {
        vec![std::env::current_dir().context("Cannot read the current directory")?]
    } else {
        args.workspaces.clone()
    };
    let store = ctx.open_write()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("Cannot start the async runtime")?;
    rt.block_on(async move {
        let docker = crate::docker::connect().await;
        let config = Config {
            listen: args.listen.clone(),
            workspaces: dirs,
            auth,
            max_runs: args.max_runs,
            jobs: args
                .jobs
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
            docker,
            load_cache: dirs::cache_dir().map(|d| d.join("strata").join("loads")),
            cache_max_size: args.cache_max_size,
        };
        let server = Server::bind(store, config).await?;
        if let Some(addr) = server.local_addr() {
            // Tests and scripts read this line to find a server started on port 0.
            let _ = writeln!(std::io::stderr(), "Serving on http://{addr}");
        }
        server.serve(stop_signal()).await?;
        let _ = writeln!(std::io::stderr(), "Stopped");
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(Outcome::Clean)
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
    let _ = writeln!(std::io::stderr(), "Stopping: cancelling running runs…");
}

fn token(cmd: TokenCommand, ctx: &Ctx) -> anyhow::Result<Outcome> {
    let root = match ctx.url()? {
        strata_store::StoreUrl::Local(p) => p,
        strata_store::StoreUrl::Memory => {
            return Err(usage(
                "Tokens need an on-disk store; `memory://` keeps none",
            ))
        }
    };
    if !root.join("FORMAT").exists() {
        // No server can own a store that does not exist yet: make it, so a
        // token can be made before the first `ci serve`.
        drop(ctx.open_write()?);
    }
    match cmd {
        TokenCommand::Create { name, read_only } => {
            let token = strata_server::auth::create(&root, &name, read_only).map_err(server_err)?;
            if ctx.json {
                println!(
                    "{}",
                    serde_json::json!({"name": name, "read_only": read_only, "token": token})
                );
            } else {
                println!("{token}");
                ctx.summary(&format!(
                    "Token `{name}`{} created; it is shown only now: keep it somewhere safe",
                    if read_only { " (read-only)" } else { "" }
                ));
            }
        }
        TokenCommand::Ls => {
            let tokens = strata_server::auth::list(&root).map_err(server_err)?;
            if ctx.json {
                let rows: Vec<_> = tokens
                    .iter()
                    .map(|t| serde_json::json!({"name": t.name, "read_only": t.read_only, "created": t.created}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for t in tokens {
                    println!(
                        "{:<24} {:<10} {}",
                        t.name,
                        if t.read_only { "read-only" } else { "write" },
                        crate::output::utc_time(t.created)
                    );
                }
            }
        }
        TokenCommand::Revoke { name } => {
            strata_server::auth::revoke(&root, &name).map_err(server_err)?;
            ctx.summary(&format!("Token `{name}` revoked"));
        }
    }
    Ok(Outcome::Clean)
}

fn server_err(e: strata_server::ServerError) -> anyhow::Error {
    if e.is_user_error() {
        usage(e.to_string())
    } else {
        anyhow::Error::new(e)
    }
}
