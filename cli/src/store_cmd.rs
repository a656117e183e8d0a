//! `ci store …`: the store subcommands.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Subcommand;
use serde::Serialize;
use strata_store::blob::BlobReader;
use strata_store::{
    Digest, Entry, Error, GcOptions, ImportOptions, IngestOptions, Kind, RelPath, Store,
};

use crate::output::{human_size, json, mode_string, utc_time};
use crate::remote::{path_segs, seg};
use crate::{usage, Ctx, Outcome};

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Snapshot a directory as a layer and print its digest
    Add {
        dir: PathBuf,
        /// Point this ref at the new layer
        #[arg(long = "ref", value_name = "NAME")]
        ref_name: Option<String>,
        /// Honour .gitignore, .ignore and .ciignore files and leave out .git
        #[arg(long)]
        ignore_files: bool,
        /// Leave out paths matching GLOB (gitignore syntax; repeatable)
        #[arg(long, value_name = "GLOB")]
        exclude: Vec<String>,
        /// Read and hash every file, ignoring the stat cache
        #[arg(long)]
        no_stat_cache: bool,
    },
    /// List a directory of a layer like `ls -l` (or one entry)
    Ls {
        layer: String,
        path: Option<OsString>,
        /// List every entry below PATH
        #[arg(short, long)]
        recursive: bool,
    },
    /// Write a file of a layer to stdout
    Cat { layer: String, path: OsString },
    /// Describe a layer: size, counts, lineage, refs
    Show { layer: String },
    /// List the paths that differ from layer A to layer B
    Diff { a: String, b: String },
    /// Write a layer into a new or empty directory
    Checkout { layer: String, dir: PathBuf },
    /// Write a layer as a deterministic .tar.zst archive
    Export {
        layer: String,
        /// The archive to write, `-` for stdout
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Import a .tar.zst archive as a layer and print its digest
    Import {
        /// The archive to read, `-` for stdin
        file: PathBuf,
        /// Point this ref at the imported layer
        #[arg(long = "ref", value_name = "NAME")]
        ref_name: Option<String>,
        /// Accept symlinks that point outside the layer
        #[arg(long)]
        allow_escaping_symlinks: bool,
    },
    /// Manage refs: named pins of layers
    Ref {
        #[command(subcommand)]
        command: RefCommand,
    },
    /// Delete everything not reachable from refs, recent runs and leases
    Gc {
        /// Keep what the last N runs refer to
        #[arg(long, default_value_t = 10, value_name = "N")]
        keep_runs: usize,
        /// Report what would be freed without deleting anything
        #[arg(long)]
        dry_run: bool,
        /// Keep every action-cache entry and what it names (a cache server's
        /// store: `ci serve --cache-max-size` evicts by last use itself)
        #[arg(long)]
        keep_cache: bool,
    },
    /// Check the index's files and records, re-hash every blob and check
    /// every reference; exit 1 on any problem
    Verify,
    /// Rebuild a damaged index from what is readable, drop the records that
    /// name what was lost, and say what that was
    Repair,
    /// Show how much the store holds
    Du,
    /// Send a layer to a remote cache: only the objects it lacks, checked there
    /// (URL: `http://HOST:PORT` for `ci serve`, `webdav+http://…` for WebDAV)
    Push {
        /// A digest, unique prefix or ref
        layer: String,
        url: String,
    },
    /// Fetch a layer from a remote cache into this store, checking every object
    Pull {
        /// A full digest (a `ci serve` also takes a unique prefix or a ref)
        layer: String,
        url: String,
    },
}

#[derive(Subcommand)]
pub enum RefCommand {
    /// Point NAME at LAYER
    Set { name: String, layer: String },
    /// List refs
    Ls,
    /// Remove a ref
    Rm { name: String },
}

pub fn run(cmd: StoreCommand, ctx: &Ctx) -> anyhow::Result<Outcome> {
    let mut out = BufWriter::new(io::stdout().lock());
    if matches!(
        cmd,
        StoreCommand::Ls { .. }
            | StoreCommand::Cat { .. }
            | StoreCommand::Show { .. }
            | StoreCommand::Diff { .. }
    ) {
        if let Some(remote) = ctx.remote(None)? {
            let outcome = remote_read(ctx, &remote, cmd, &mut out)?;
            out.flush()?;
            return Ok(outcome);
        }
    }
    let outcome = match cmd {
        StoreCommand::Add {
            dir,
            ref_name,
            ignore_files,
            exclude,
            no_stat_cache,
        } => {
            let opts = IngestOptions {
                ignore_files,
                exclude,
                no_stat_cache,
                lineage: None,
                ref_name,
            };
            add(ctx, &dir, &opts, &mut out)?
        }
        StoreCommand::Ls {
            layer,
            path,
            recursive,
        } => ls(ctx, &layer, path.as_deref(), recursive, &mut out)?,
        StoreCommand::Cat { layer, path } => cat(ctx, &layer, &path, &mut out)?,
        StoreCommand::Show { layer } => show(ctx, &layer, &mut out)?,
        StoreCommand::Diff { a, b } => diff(ctx, &a, &b, &mut out)?,
        StoreCommand::Checkout { layer, dir } => checkout(ctx, &layer, &dir, &mut out)?,
        StoreCommand::Export { layer, output } => export(ctx, &layer, &output, &mut out)?,
        StoreCommand::Import {
            file,
            ref_name,
            allow_escaping_symlinks,
        } => {
            let opts = ImportOptions {
                ref_name,
                allow_escaping_symlinks,
            };
            import(ctx, &file, &opts, &mut out)?
        }
        StoreCommand::Ref { command } => refs(ctx, command, &mut out)?,
        StoreCommand::Gc {
            keep_runs,
            dry_run,
            keep_cache,
        } => {
            let opts = GcOptions {
                keep_runs,
                dry_run,
                keep_cache,
            };
            gc(ctx, &opts, &mut out)?
        }
        StoreCommand::Verify => verify(ctx, &mut out)?,
        StoreCommand::Repair => repair(ctx, &mut out)?,
        StoreCommand::Du => du(ctx, &mut out)?,
        StoreCommand::Push { layer, url } => {
            crate::cache_cmd::push(ctx, &layer, &url, &mut out)?;
            Outcome::Clean
        }
        StoreCommand::Pull { layer, url } => {
            crate::cache_cmd::pull(&ctx.open_write()?, &layer, &url, &mut out)?;
            Outcome::Clean
        }
    };
    out.flush()?;
    Ok(outcome)
}

fn add(
    ctx: &Ctx,
    dir: &Path,
    opts: &IngestOptions,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    // Checked here so that a mistyped directory is a usage error, not a store error.
    if let Err(e) = fs::metadata(dir) {
        return Err(anyhow::Error::new(e)
            .context(crate::UsageError(format!("Cannot add `{}`", dir.display()))));
    }
    let store = ctx.open_write()?;
    let start = Instant::now();
    let report = store.ingest(dir, opts)?;
    ctx.summary(&format!(
        "{} files, {}, {} hashed, {} new blobs in {:.2}s",
        report.stats.files,
        human_size(report.stats.bytes),
        report.hashed_files,
        report.new_blobs,
        start.elapsed().as_secs_f64()
    ));
    if ctx.json {
        json(out, &report)?;
    } else {
        writeln!(out, "{}", report.layer)?;
    }
    Ok(Outcome::Clean)
}

/// A layer as the API takes it: `//pkg:name` is URL-encoded whole, with
/// the workspace it belongs to.
fn remote_layer(ctx: &Ctx, layer: &str) -> anyhow::Result<(String, String)> {
    let query = match (layer.starts_with("//"), ctx.workspace_root()) {
        (true, Some(root)) => {
            let root = std::fs::canonicalize(&root).unwrap_or(root);
            let name = strata_engine::loader::read_settings(&root)
                .ok()
                .and_then(|s| s.name)
                .unwrap_or_else(|| {
                    root.file_name()
                        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
                });
            format!("?workspace={}", seg(&name))
        }
        _ => String::new(),
    };
    Ok((seg(layer), query))
}

/// `ci store ls|cat|show|diff` through `ci serve`, printing what the local
/// commands print.
fn remote_read(
    ctx: &Ctx,
    remote: &crate::remote::Remote,
    cmd: StoreCommand,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    match cmd {
        StoreCommand::Ls {
            layer,
            path,
            recursive,
        } => {
            let (l, q) = remote_layer(ctx, &layer)?;
            let path = path
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            let path = path.trim_matches('/');
            let sep = if q.is_empty() { '?' } else { '&' };
            let url = match path.is_empty() {
                true => format!("/api/v1/layers/{l}/tree{q}"),
                false => format!("/api/v1/layers/{l}/tree/{}{q}", path_segs(path)),
            };
            let url = if recursive {
                format!("{url}{sep}recursive=true")
            } else {
                url
            };
            let v = remote.get(&url)?.json()?;
            let rows: Vec<LsRow> = serde_json::from_value(v["entries"].clone())
                .context("The server sent a listing we cannot read")?;
            let rows: Vec<(LsRow, &'static str)> = rows
                .into_iter()
                .map(|r| {
                    let mode = r.mode();
                    (r, mode)
                })
                .collect();
            print_ls(ctx, &rows, out)
        }
        StoreCommand::Cat { layer, path } => {
            let (l, q) = remote_layer(ctx, &layer)?;
            let path = path.to_string_lossy().into_owned();
            let reply = remote.get(&format!(
                "/api/v1/layers/{l}/file/{}{q}",
                path_segs(path.trim_start_matches('/'))
            ))?;
            out.write_all(&reply.body)?;
            Ok(Outcome::Clean)
        }
        StoreCommand::Show { layer } => {
            let (l, q) = remote_layer(ctx, &layer)?;
            let v = remote.get(&format!("/api/v1/layers/{l}{q}"))?.json()?;
            let show: Show =
                serde_json::from_value(v).context("The server sent a layer we cannot read")?;
            print_show(ctx, &show, out)
        }
        StoreCommand::Diff { a, b } => {
            let (la, q) = remote_layer(ctx, &a)?;
            let (lb, _) = remote_layer(ctx, &b)?;
            let v = remote
                .get(&format!("/api/v1/layers/{la}/diff/{lb}{q}"))?
                .json()?;
            let rows: Vec<DiffRow> = serde_json::from_value(v["changes"].clone())
                .context("The server sent a diff we cannot read")?;
            print_diff(ctx, &rows, out)
        }
        _ => Ok(Outcome::Clean),
    }
}

/// One line of `ci store ls`.
type LsRow = strata_store::Listed;

fn ls(
    ctx: &Ctx,
    layer: &str,
    path: Option<&std::ffi::OsStr>,
    recursive: bool,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let (store, root) = crate::cache_cmd::readable(ctx, layer)?;
    let path = RelPath::parse(path.map_or(&[][..], |p| p.as_bytes()))?;
    let entry = lookup(&store, layer, &root, &path)?;
    let mut rows: Vec<(LsRow, &'static str)> = Vec::new();
    match &entry {
        Entry::Dir { digest } => list_dir(&store, digest, "", recursive, &mut rows)?,
        other => rows.push((LsRow::new(path.to_string(), other), mode_string(other))),
    }
    print_ls(ctx, &rows, out)
}

fn print_ls(
    ctx: &Ctx,
    rows: &[(LsRow, &'static str)],
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    if ctx.json {
        let rows: Vec<&LsRow> = rows.iter().map(|(r, _)| r).collect();
        json(out, &rows)?;
        return Ok(Outcome::Clean);
    }
    let width = rows
        .iter()
        .map(|(r, _)| r.size.map_or(1, |s| s.to_string().len()))
        .max()
        .unwrap_or(1);
    for (row, mode) in rows {
        let size = row.size.map_or_else(|| "-".to_owned(), |s| s.to_string());
        write!(out, "{mode} {size:>width$} {}", row.name)?;
        if let Some(target) = &row.target {
            write!(out, " -> {target}")?;
        }
        writeln!(out)?;
    }
    Ok(Outcome::Clean)
}

/// Appends the entries of a tree in name order; with `recursive`, each
/// directory is followed by its contents, named by their path below the listing.
fn list_dir(
    store: &Store,
    tree: &Digest,
    prefix: &str,
    recursive: bool,
    rows: &mut Vec<(LsRow, &'static str)>,
) -> anyhow::Result<()> {
    for (name, entry) in store.tree(tree)?.entries() {
        let name = format!("{prefix}{name}");
        rows.push((LsRow::new(name.clone(), entry), mode_string(entry)));
        if let (true, Entry::Dir { digest }) = (recursive, entry) {
            list_dir(store, digest, &format!("{name}/"), true, rows)?;
        }
    }
    Ok(())
}

fn lookup(store: &Store, layer: &str, root: &Digest, path: &RelPath) -> anyhow::Result<Entry> {
    store.lookup(root, path)?.ok_or_else(|| {
        Error::NoSuchPath {
            layer: layer.to_owned(),
            path: path.to_string(),
        }
        .into()
    })
}

fn cat(
    ctx: &Ctx,
    layer: &str,
    path: &std::ffi::OsStr,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let (store, root) = crate::cache_cmd::readable(ctx, layer)?;
    let path = RelPath::parse(path.as_bytes())?;
    let digest = match lookup(&store, layer, &root, &path)? {
        Entry::File { digest, .. } => digest,
        other => {
            return Err(Error::WrongKind {
                path: path.to_string(),
                what: kind_name(other.kind()),
                expected: "a file",
            }
            .into())
        }
    };
    let blob = store.blob(&digest)?;
    io::copy(&mut BlobReader::new(&*blob), out)
        .with_context(|| format!("Cannot copy `{path}` to stdout"))?;
    Ok(Outcome::Clean)
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::File => "a file",
        Kind::Dir => "a directory",
        Kind::Symlink => "a symlink",
    }
}

/// What `ci store show` says of a layer.
#[derive(Serialize, serde::Deserialize)]
struct Show {
    layer: Digest,
    stats: strata_store::LayerStats,
    /// `None` for a tree never recorded as a layer.
    created: Option<u64>,
    lineage: Option<strata_store::Lineage>,
    refs: Vec<String>,
}

fn show(ctx: &Ctx, layer: &str, out: &mut dyn Write) -> anyhow::Result<Outcome> {
    let (store, digest) = crate::cache_cmd::readable(ctx, layer)?;
    let record = store.layer(&digest)?;
    let stats = match &record {
        Some(r) => r.stats,
        None => store.stats(&digest)?,
    };
    let refs: Vec<String> = store
        .refs()?
        .into_iter()
        .filter(|(_, d)| *d == digest)
        .map(|(name, _)| name)
        .collect();
    let show = Show {
        layer: digest,
        stats,
        created: record.map(|r| r.created),
        lineage: store.lineage(&digest)?,
        refs,
    };
    print_show(ctx, &show, out)
}

fn print_show(ctx: &Ctx, show: &Show, out: &mut dyn Write) -> anyhow::Result<Outcome> {
    let stats = show.stats;
    if ctx.json {
        json(out, show)?;
        return Ok(Outcome::Clean);
    }
    let dash = || "-".to_owned();
    let lineage = show.lineage.as_ref();
    writeln!(out, "layer     {}", show.layer)?;
    writeln!(
        out,
        "size      {} ({} bytes)",
        human_size(stats.bytes),
        stats.bytes
    )?;
    writeln!(out, "files     {}", stats.files)?;
    writeln!(out, "dirs      {}", stats.dirs)?;
    writeln!(out, "symlinks  {}", stats.symlinks)?;
    writeln!(
        out,
        "created   {}",
        show.created
            .map_or_else(|| "- (not recorded as a layer)".to_owned(), utc_time)
    )?;
    let parent = lineage
        .and_then(|l| l.parent)
        .map_or_else(dash, |d| d.to_string());
    writeln!(out, "parent    {parent}")?;
    writeln!(
        out,
        "task      {}",
        lineage.and_then(|l| l.task.clone()).unwrap_or_else(dash)
    )?;
    writeln!(
        out,
        "how       {}",
        lineage.map_or_else(dash, |l| l.how.clone())
    )?;
    let refs = if show.refs.is_empty() {
        dash()
    } else {
        show.refs.join(", ")
    };
    writeln!(out, "refs      {refs}")?;
    Ok(Outcome::Clean)
}

/// One line of `ci store diff`.
type DiffRow = strata_store::ChangeRow;

fn diff(ctx: &Ctx, a: &str, b: &str, out: &mut dyn Write) -> anyhow::Result<Outcome> {
    let store = ctx.open_read()?;
    let (a, b) = (ctx.resolve(&store, a)?, ctx.resolve(&store, b)?);
    let rows: Vec<DiffRow> = store.diff(&a, &b)?.into_iter().map(DiffRow::from).collect();
    print_diff(ctx, &rows, out)
}

fn print_diff(ctx: &Ctx, rows: &[DiffRow], out: &mut dyn Write) -> anyhow::Result<Outcome> {
    if ctx.json {
        json(out, &rows)?;
        return Ok(Outcome::Clean);
    }
    for c in rows {
        // The side that exists after the change, or the removed one.
        let is_dir = c.new_kind.or(c.old_kind) == Some(Kind::Dir);
        writeln!(
            out,
            "{} {}{}",
            c.letter(),
            c.path,
            if is_dir { "/" } else { "" }
        )?;
    }
    Ok(Outcome::Clean)
}

fn checkout(ctx: &Ctx, layer: &str, dir: &Path, out: &mut dyn Write) -> anyhow::Result<Outcome> {
    // Checked here so that a busy destination is a usage error, not a store error.
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(usage(format!(
                    "Cannot check out into `{}`: the directory is not empty; choose a new or empty directory",
                    dir.display()
                )));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(anyhow::Error::new(e).context(crate::UsageError(format!(
                "Cannot check out into `{}`",
                dir.display()
            ))))
        }
    }
    let (store, root) = crate::cache_cmd::readable(ctx, layer)?;
    let start = Instant::now();
    let report = store.checkout(&root, dir)?;
    ctx.summary(&format!(
        "{} files, {} dirs, {} symlinks, {} in {:.2}s",
        report.files,
        report.dirs,
        report.symlinks,
        human_size(report.bytes),
        start.elapsed().as_secs_f64()
    ));
    if ctx.json {
        json(out, &report)?;
    }
    Ok(Outcome::Clean)
}

/// `ci store export LAYER -o PATH`. `-` is stdout. A regular file (or a
/// path where nothing is yet) is replaced atomically: written beside it,
/// synced, renamed over it, keeping its mode. Anything else that exists (a
/// FIFO, a device) is written in place, so a FIFO streams and a device's
/// error (ENOSPC from `/dev/full`) is the command's. Symlinks are followed:
/// the file they lead to is what gets written.
fn export(ctx: &Ctx, layer: &str, output: &Path, out: &mut dyn Write) -> anyhow::Result<Outcome> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// Where writing to `path` lands: symlinks followed (a dangling one to
    /// the path it names), as `open` would.
    fn through_links(path: &Path) -> anyhow::Result<PathBuf> {
        let mut path = path.to_owned();
        for _ in 0..40 {
            match fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = fs::read_link(&path)
                        .with_context(|| format!("Cannot read the symlink `{}`", path.display()))?;
                    path = match path.parent() {
                        Some(dir) => dir.join(target),
                        None => target,
                    };
                }
                _ => return Ok(path),
            }
        }
        Err(usage(format!(
            "`{}` is a loop of symlinks; name a file, or `-` for stdout",
            path.display()
        )))
    }

    let to_stdout = output == Path::new("-");
    if to_stdout && ctx.json {
        return Err(usage(
            "`--json` prints the report on stdout, where `-o -` writes the archive; write the archive to a file",
        ));
    }
    let (store, root) = crate::cache_cmd::readable(ctx, layer)?;
    let shown = output.display();
    let report = if to_stdout {
        store.export(&root, out)?
    } else {
        let target = through_links(output)?;
        let existing = match fs::metadata(&target) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("Cannot inspect `{shown}`")))
            }
        };
        match existing {
            Some(m) if m.is_dir() => {
                return Err(usage(format!(
                    "`{shown}` is a directory; name a file in it, or `-` for stdout"
                )))
            }
            Some(m) if !m.is_file() => {
                // A FIFO or a device: written in place, never replaced.
                let file = fs::OpenOptions::new()
                    .write(true)
                    .open(&target)
                    .with_context(|| format!("Cannot open `{shown}` for writing"))?;
                let mut w = BufWriter::new(file);
                let report = store
                    .export(&root, &mut w)
                    .with_context(|| format!("Cannot export to `{shown}`"))?;
                w.into_inner()
                    .map_err(|e| e.into_error())
                    .with_context(|| format!("Cannot write `{shown}`"))?;
                report
            }
            existing => {
                // Written beside the target and renamed, so the file is never
                // half-written; the name is unique to this process.
                let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
                    return Err(usage(format!(
                        "`{shown}` does not name a file; name a file, or `-` for stdout"
                    )));
                };
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                let mut tmp_name = OsString::from(".");
                tmp_name.push(name);
                tmp_name.push(format!(".{}.tmp", std::process::id()));
                let tmp = dir.join(tmp_name);
                let write = || -> anyhow::Result<_> {
                    let _ = fs::remove_file(&tmp); // Left by a crashed process with our pid.
                    let file = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(&tmp)
                        .with_context(|| format!("Cannot create `{}`", tmp.display()))?;
                    if let Some(m) = &existing {
                        file.set_permissions(fs::Permissions::from_mode(m.mode() & 0o7777))
                            .with_context(|| {
                                format!("Cannot set the mode of `{}`", tmp.display())
                            })?;
                    }
                    let mut w = BufWriter::new(file);
                    let report = store
                        .export(&root, &mut w)
                        .with_context(|| format!("Cannot export to `{}`", tmp.display()))?;
                    let file = w
                        .into_inner()
                        .map_err(|e| e.into_error())
                        .with_context(|| format!("Cannot write `{}`", tmp.display()))?;
                    file.sync_all()
                        .with_context(|| format!("Cannot write `{}`", tmp.display()))?;
                    fs::rename(&tmp, &target).with_context(|| {
                        format!(
                            "Cannot rename `{}` to `{}`",
                            tmp.display(),
                            target.display()
                        )
                    })?;
                    // The rename itself made durable; a failure here loses nothing written.
                    if let Ok(d) = File::open(dir) {
                        let _ = d.sync_all();
                    }
                    Ok(report)
                };
                match write() {
                    Ok(report) => report,
                    Err(e) => {
                        let _ = fs::remove_file(&tmp);
                        return Err(e);
                    }
                }
            }
        }
    };
    ctx.summary(&format!(
        "{} entries, {} written",
        report.entries,
        human_size(report.bytes)
    ));
    if ctx.json {
        json(out, &report)?;
    }
    Ok(Outcome::Clean)
}

fn import(
    ctx: &Ctx,
    file: &Path,
    opts: &ImportOptions,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let (mut input, name): (Box<dyn io::Read>, String) = if file == Path::new("-") {
        (Box::new(io::stdin().lock()), "stdin".to_owned())
    } else {
        match File::open(file) {
            Ok(f) => (Box::new(io::BufReader::new(f)), file.display().to_string()),
            Err(e) => {
                return Err(anyhow::Error::new(e).context(crate::UsageError(format!(
                    "Cannot open archive `{}`",
                    file.display()
                ))))
            }
        }
    };
    let store = ctx.open_write()?;
    let report = store.import(&mut *input, &name, opts)?;
    ctx.summary(&format!(
        "{} files, {}, {} new blobs",
        report.stats.files,
        human_size(report.stats.bytes),
        report.new_blobs
    ));
    if ctx.json {
        json(out, &report)?;
    } else {
        writeln!(out, "{}", report.layer)?;
    }
    Ok(Outcome::Clean)
}

fn refs(ctx: &Ctx, cmd: RefCommand, out: &mut dyn Write) -> anyhow::Result<Outcome> {
    match cmd {
        RefCommand::Set { name, layer } => {
            let store = ctx.open_write()?;
            let digest = ctx.resolve(&store, &layer)?;
            store.set_ref(&name, &digest)?;
        }
        RefCommand::Rm { name } => {
            let store = ctx.open_write()?;
            store.delete_ref(&name)?;
        }
        RefCommand::Ls => {
            #[derive(Serialize)]
            struct Row {
                name: String,
                layer: Digest,
            }
            let store = ctx.open_read()?;
            let refs = store.refs()?;
            if ctx.json {
                let rows: Vec<Row> = refs
                    .into_iter()
                    .map(|(name, layer)| Row { name, layer })
                    .collect();
                json(out, &rows)?;
            } else {
                for (name, digest) in refs {
                    writeln!(out, "{name} {digest}")?;
                }
            }
        }
    }
    Ok(Outcome::Clean)
}

fn gc(ctx: &Ctx, opts: &GcOptions, out: &mut dyn Write) -> anyhow::Result<Outcome> {
    // Reclaiming: the store's reserve is released first, so that GC opens
    // the index on a full disk.
    let store = if opts.dry_run {
        ctx.open_write()?
    } else {
        ctx.open_reclaim()?
    };
    let r = store.gc(opts)?;
    if ctx.json {
        json(out, &r)?;
        return Ok(Outcome::Clean);
    }
    let verb = if opts.dry_run { "would free" } else { "freed" };
    writeln!(
        out,
        "{verb} {} layers, {} trees, {} blobs ({}); {} cached actions and {} runs dropped",
        r.layers_freed,
        r.trees_freed,
        r.blobs_freed,
        human_size(r.bytes_freed),
        r.actions_dropped,
        r.runs_dropped
    )?;
    writeln!(
        out,
        "kept {} blobs ({}) reachable from {} roots",
        r.blobs_kept,
        human_size(r.bytes_kept),
        r.roots
    )?;
    Ok(Outcome::Clean)
}

fn verify(ctx: &Ctx, out: &mut dyn Write) -> anyhow::Result<Outcome> {
    let store = ctx.open_read()?;
    let report = store.verify()?;
    let outcome = if report.problems.is_empty() {
        Outcome::Clean
    } else {
        Outcome::Problems
    };
    if ctx.json {
        json(out, &report)?;
    } else if report.problems.is_empty() {
        write!(
            out,
            "ok: {} blobs, {} trees checked",
            report.blobs_checked, report.trees_checked
        )?;
        match report.held_remotely {
            0 => writeln!(out)?,
            n => writeln!(out, "; {n} layers held remotely (fetched on use)")?,
        }
    } else {
        for p in &report.problems {
            writeln!(out, "{p}")?;
        }
        writeln!(
            out,
            "{} problems found ({} blobs, {} trees checked)",
            report.problems.len(),
            report.blobs_checked,
            report.trees_checked
        )?;
    }
    Ok(outcome)
}

fn repair(ctx: &Ctx, out: &mut dyn Write) -> anyhow::Result<Outcome> {
    let root = match ctx.url()? {
        strata_store::StoreUrl::Local(root) => root,
        strata_store::StoreUrl::Memory => {
            return Err(usage("A memory store has nothing to repair"))
        }
    };
    let mut on_wait = |msg: &str| {
        let _ = writeln!(io::stderr(), "{msg}");
    };
    let report = Store::repair(&root, &mut on_wait)?;
    if ctx.json {
        json(out, &report)?;
        return Ok(Outcome::Clean);
    }
    for t in &report.lost_tables {
        let family = t
            .family
            .as_deref()
            .map_or_else(String::new, |f| format!(" of family `{f}`"));
        let how = if t.set_aside {
            "unreadable, set aside"
        } else {
            "it was missing"
        };
        writeln!(out, "lost: table `{}`{family} ({how})", t.file)?;
    }
    for d in &report.dropped {
        writeln!(out, "{d}")?;
    }
    if report.lost_tables.is_empty() && report.dropped.is_empty() {
        writeln!(out, "repaired: nothing was lost")?;
    } else {
        writeln!(
            out,
            "repaired: {} tables lost, the records above dropped; `ci build` makes again what they held",
            report.lost_tables.len(),
        )?;
    }
    Ok(Outcome::Clean)
}

fn du(ctx: &Ctx, out: &mut dyn Write) -> anyhow::Result<Outcome> {
    let store = ctx.open_read()?;
    let u = store.usage()?;
    if ctx.json {
        json(out, &u)?;
        return Ok(Outcome::Clean);
    }
    writeln!(
        out,
        "blobs    {:>10}  {}",
        u.blobs,
        human_size(u.blob_bytes)
    )?;
    writeln!(
        out,
        "trees    {:>10}  {}",
        u.trees,
        human_size(u.tree_bytes)
    )?;
    writeln!(out, "layers   {:>10}", u.layers)?;
    writeln!(out, "refs     {:>10}", u.refs)?;
    writeln!(out, "runs     {:>10}", u.runs)?;
    writeln!(out, "actions  {:>10}", u.actions)?;
    // Bazel's and REAPI's, when `ci serve` is their cache.
    writeln!(out, "bazel ac {:>10}", u.bazel_actions)?;
    writeln!(out, "sha256   {:>10}", u.sha256)?;
    Ok(Outcome::Clean)
}
