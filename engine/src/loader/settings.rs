//! `ci.toml`: workspace settings.
//!
//! ```toml
//! [build]
//! jobs = 4            # tasks at once (default: cores)
//! executor = "host"   # default executor: "host" or "docker"
//! store = ".ci/store" # store directory, relative to the workspace root
//! inputs = "mount"    # inputs as FUSE views ("mount", the default where FUSE
//!                     # works) or copies checked out per task ("copy")
//! ```
//!
//! and, at the top level, `name = "..."` (the workspace's name under `ci serve`), and
//! `[server] url = "http://..."` (the `ci serve` that commands go through).
//! `[cache] remote = "http://..."`, `mode = "read"|"write"` and `fetch = "all"|"needed"`
//! (the remote cache).
//! `[load] max_steps = N` and `max_heap_mib = N`: the limits of evaluating
//! `BUILD.star` files (`limits.rs`).

use std::fs;
use std::num::NonZeroU64;
use std::path::Path;

use serde::Deserialize;

use crate::error::LoadError;
use crate::model::{Location, Settings};

use super::limits::LoadLimits;
use super::WORKSPACE_FILE;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CiToml {
    /// The workspace's name under `ci serve` (default: its directory's name).
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    build: Settings,
    #[serde(default)]
    server: ServerToml,
    #[serde(default)]
    cache: CacheToml,
    #[serde(default)]
    load: LoadToml,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LoadToml {
    /// Starlark steps (loop iterations and calls) a load may take.
    #[serde(default)]
    max_steps: Option<NonZeroU64>,
    /// MiB a load's evaluation may hold.
    #[serde(default)]
    max_heap_mib: Option<NonZeroU64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CacheToml {
    /// The remote cache: `http://HOST:PORT` (`ci serve`) or `webdav+http://…`.
    #[serde(default)]
    remote: Option<String>,
    /// `read` (look up only) or `write`.
    #[serde(default)]
    mode: Option<String>,
    /// `all` (a hit brings its output) or `needed` (only what is read here).
    #[serde(default)]
    fetch: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServerToml {
    /// The `ci serve` that commands of this workspace go through.
    #[serde(default)]
    url: Option<String>,
}

/// Reads and checks `root/ci.toml`. Unknown tables and keys are refused, so a typo is
/// an error rather than a setting silently ignored.
pub fn read_settings(root: &Path) -> Result<Settings, LoadError> {
    read_settings_text(root).map(|(settings, _, _)| settings)
}

/// [`read_settings`], with the load limits and the text read (the load
/// cache keeps its digest).
pub(crate) fn read_settings_text(root: &Path) -> Result<(Settings, LoadLimits, String), LoadError> {
    let path = root.join(WORKSPACE_FILE);
    if !super::pipeline_file(root, WORKSPACE_FILE)? {
        return Err(LoadError::Io {
            path,
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    let bytes = fs::read(&path).map_err(|source| LoadError::Io { path, source })?;
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            // Located at the first byte that is not UTF-8.
            let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let (line, col) = line_col(&String::from_utf8_lossy(valid), valid.len());
            return Err(LoadError::Settings {
                location: Location {
                    file: WORKSPACE_FILE.to_owned(),
                    line,
                    col,
                },
                message: "The file is not valid UTF-8 here; save it as UTF-8".to_owned(),
            });
        }
    };
    let (settings, limits) = parse(&text)?;
    Ok((settings, limits, text))
}

#[cfg(test)]
fn parse_settings(text: &str) -> Result<Settings, LoadError> {
    parse(text).map(|(settings, _)| settings)
}

fn parse(text: &str) -> Result<(Settings, LoadLimits), LoadError> {
    match toml::from_str::<CiToml>(text) {
        Ok(file) => {
            let default = LoadLimits::default();
            let limits = LoadLimits {
                max_steps: file
                    .load
                    .max_steps
                    .map_or(default.max_steps, NonZeroU64::get),
                max_heap_mib: file
                    .load
                    .max_heap_mib
                    .map_or(default.max_heap_mib, NonZeroU64::get),
            };
            let settings = Settings {
                name: file.name,
                server_url: file.server.url,
                remote_cache: file.cache.remote,
                remote_cache_mode: file.cache.mode,
                remote_cache_fetch: file.cache.fetch,
                ..file.build
            };
            Ok((settings, limits))
        }
        Err(e) => {
            let (line, col) = match e.span() {
                Some(span) => line_col(text, span.start),
                None => (1, 1),
            };
            Err(LoadError::Settings {
                location: Location {
                    file: WORKSPACE_FILE.to_owned(),
                    line,
                    col,
                },
                message: capitalized(e.message().trim_end_matches('\n').trim_end_matches('.')),
            })
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_col(text: &str, offset: usize) -> (u32, u32) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() as u32 + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() as u32 + 1;
    (line, col)
}

fn capitalized(message: &str) -> String {
    let mut chars = message.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Executor;

    #[test]
    fn reads_build_table() {
        let s =
            parse_settings("[build]\njobs = 3\nexecutor = \"docker\"\nstore = \"s\"\n").unwrap();
        assert_eq!(s.jobs.map(|j| j.get()), Some(3));
        assert_eq!(s.executor, Some(Executor::Docker));
        assert_eq!(s.store.as_deref(), Some("s"));
        assert_eq!(parse_settings("").unwrap(), Settings::default());
    }

    #[test]
    fn locates_errors() {
        let e = parse_settings("[build]\njobz = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("ci.toml:2:1: "), "{e}");
        let e = parse_settings("[build]\nexecutor = \"k8s\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("ci.toml:2:"), "{e}");
    }

    #[test]
    fn reads_load_limits() {
        let (_, limits) = parse("[load]\nmax_steps = 7\nmax_heap_mib = 9\n").unwrap();
        assert_eq!(limits.max_steps, 7);
        assert_eq!(limits.max_heap_mib, 9);
        assert_eq!(parse("").unwrap().1, LoadLimits::default());
        let e = parse_settings("[load]\nmax_steps = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("ci.toml:2:"), "{e}");
    }
}
