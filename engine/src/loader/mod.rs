//! Loading a workspace: `ci.toml` settings and `BUILD.star` packages into a [`Workspace`].
//!
//! The workspace root is the nearest ancestor holding `ci.toml`. A package is a directory
//! holding `BUILD.star`; its path from the root is the package name of its labels.
//! [`Loader::load_patterns`] evaluates only the packages that the requested patterns and
//! their dependencies need (plus the root package, where stages are declared), so asking
//! about one task in a large workspace stays fast. Every result passes
//! [`Workspace::validate`] before it is returned. With [`Loader::with_cache`], a load
//! whose files are all unchanged reuses the model of the last same load (`cache.rs`).
//! Every load is bounded in steps and memory (`limits.rs`, `[load]` in `ci.toml`).

mod builtins;
mod cache;
mod limits;
mod settings;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use starlark::environment::{FrozenModule, Globals, GlobalsBuilder, LibraryExtension, Module};
use starlark::eval::{Evaluator, FileLoader};
use starlark::syntax::{AstModule, Dialect};
use starlark::values::ProvidesStaticType;
use starlark::ErrorKind;

use crate::error::{Invalid, LoadError, ModelError};
use crate::label::{valid_package, valid_segment, Pattern};
use crate::model::{Location, Stage, Task, Workspace};

pub use limits::{CountingAlloc, LoadLimits, DEFAULT_MAX_HEAP_MIB, DEFAULT_MAX_STEPS};
pub use settings::read_settings;

/// The file that makes a directory the workspace root.
pub const WORKSPACE_FILE: &str = "ci.toml";
/// The file that makes a directory a package.
pub const BUILD_FILE: &str = "BUILD.star";

/// Directory names never searched for packages (besides names starting with `.`).
const SKIPPED_DIRS: &[&str] = &["target", "node_modules"];

/// The nearest ancestor of `start` (or `start` itself) that holds `ci.toml`.
pub fn find_root(start: &Path) -> Result<PathBuf, LoadError> {
    let start = if start.is_absolute() {
        start.to_owned()
    } else {
        std::env::current_dir()
            .map_err(|source| LoadError::Io {
                path: start.to_owned(),
                source,
            })?
            .join(start)
    };
    let mut dir = Some(start.as_path());
    while let Some(d) = dir {
        // Anything named ci.toml marks the root; reading it says whether it
        // is a usable file (a directory or a device is an error, not "no ci.toml").
        if fs::symlink_metadata(d.join(WORKSPACE_FILE)).is_ok() {
            return Ok(d.to_owned());
        }
        dir = d.parent();
    }
    Err(LoadError::NoWorkspace { start })
}

/// The largest `BUILD.star`, `.star` or `ci.toml` read.
pub const PIPELINE_FILE_MAX: u64 = 16 << 20;

/// Whether `root/file` is there as a pipeline file: `Ok(false)` when nothing
/// is there; an error (located at the file) when it is something a pipeline
/// cannot be read from — a directory, FIFO, device, socket, a symlink that
/// leads nowhere or in a loop, or a file over [`PIPELINE_FILE_MAX`].
pub(crate) fn pipeline_file(root: &Path, file: &str) -> Result<bool, LoadError> {
    let path = root.join(file);
    let located = |problem: Invalid| -> LoadError {
        ModelError::new(
            Some(Location {
                file: file.to_owned(),
                line: 1,
                col: 1,
            }),
            problem,
        )
        .into()
    };
    let link = match fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(false)
        }
        Err(source) => return Err(LoadError::Io { path, source }),
    };
    let meta = if link.file_type().is_symlink() {
        match fs::metadata(&path) {
            Ok(m) => m,
            Err(_) => {
                return Err(located(Invalid::NotAFile {
                    file: file.to_owned(),
                    what: "a symlink that leads nowhere (or in a loop)",
                }))
            }
        }
    } else {
        link
    };
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(located(Invalid::NotAFile {
            file: file.to_owned(),
            what: "a directory",
        }));
    }
    if !ft.is_file() {
        return Err(located(Invalid::NotAFile {
            file: file.to_owned(),
            what: match strata_store::special_file_kind(ft) {
                "FIFO" => "a FIFO",
                "socket" => "a socket",
                "character device" => "a character device",
                "block device" => "a block device",
                _ => "a special file",
            },
        }));
    }
    if meta.len() > PIPELINE_FILE_MAX {
        return Err(located(Invalid::FileTooLarge {
            file: file.to_owned(),
            bytes: meta.len(),
            max: PIPELINE_FILE_MAX,
        }));
    }
    Ok(true)
}

/// Loads the workspace rooted at one directory. Cheap to keep and reuse: the Starlark
/// globals are built once.
pub struct Loader {
    root: PathBuf,
    globals: Globals,
    cache: Option<PathBuf>,
}

impl Loader {
    /// A loader for the workspace whose root (the directory holding `ci.toml`) is `root`.
    pub fn new(root: impl Into<PathBuf>) -> Loader {
        let globals = GlobalsBuilder::extended_by(&[
            LibraryExtension::Map,
            LibraryExtension::Filter,
            LibraryExtension::Partial,
            LibraryExtension::Json,
            LibraryExtension::Print,
        ])
        .with(builtins::strata_builtins)
        .with(limits::checked_ops)
        .build();
        Loader {
            root: root.into(),
            globals,
            cache: None,
        }
    }

    /// Keeps loads in `dir` and reuses one when nothing it read changed
    /// (see `cache.rs`; `ci` uses `~/.cache/strata/loads`).
    pub fn with_cache(mut self, dir: impl Into<PathBuf>) -> Loader {
        self.cache = Some(dir.into());
        self
    }

    /// A loader for the workspace containing `start` (see [`find_root`]).
    pub fn discover(start: &Path) -> Result<Loader, LoadError> {
        Ok(Loader::new(find_root(start)?))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Loads every package of the workspace.
    pub fn load(&self) -> Result<Workspace, LoadError> {
        self.load_patterns(&[Pattern::Recursive(String::new())])
    }

    /// Loads the packages `patterns` name, the packages their tasks depend on
    /// (transitively), and the root package. The result holds at least every task the
    /// patterns match and everything those need; resolve the patterns themselves with
    /// [`crate::graph::expand`].
    pub fn load_patterns(&self, patterns: &[Pattern]) -> Result<Workspace, LoadError> {
        let entry = self
            .cache
            .as_deref()
            .and_then(|dir| cache::entry_path(dir, self, patterns));
        if let Some(ws) = entry.as_deref().and_then(|p| cache::lookup(p, self)) {
            return Ok(ws);
        }
        let (ws, reads) = self.evaluate_on_big_stack(patterns)?;
        if let Some(path) = entry {
            cache::store(&path, reads, &ws);
        }
        Ok(ws)
    }

    /// [`Loader::evaluate`] on a thread of its own with a large stack:
    /// deeply nested expressions, long `load()` chains and recursive
    /// structures recurse in the parser and evaluator, and on a default
    /// (2 MiB, or 8 MiB main) stack they overflowed and aborted the process —
    /// `ci graph`, or a whole `ci serve`.
    fn evaluate_on_big_stack(
        &self,
        patterns: &[Pattern],
    ) -> Result<(Workspace, cache::Reads), LoadError> {
        const STACK: usize = 512 << 20;
        std::thread::scope(|scope| {
            let worker = std::thread::Builder::new()
                .name("starlark".into())
                .stack_size(STACK)
                .spawn_scoped(scope, || self.evaluate(patterns));
            match worker {
                Ok(handle) => handle.join().unwrap_or_else(|_| {
                    Err(LoadError::Starlark {
                        location: None,
                        message: "Evaluating the pipeline failed unexpectedly".to_owned(),
                    })
                }),
                // No thread to be had: evaluate here, as before.
                Err(_) => self.evaluate(patterns),
            }
        })
    }

    /// Evaluates and validates; also says what was read, for the cache.
    fn evaluate(&self, patterns: &[Pattern]) -> Result<(Workspace, cache::Reads), LoadError> {
        let (settings, limits, settings_text) = settings::read_settings_text(&self.root)?;
        let session = Session {
            loader: self,
            budget: Rc::new(limits::Budget::new(limits)),
            libs: RefCell::new(HashMap::new()),
            loading: RefCell::new(Vec::new()),
            reads: RefCell::new(cache::Reads::default()),
        };
        session
            .reads
            .borrow_mut()
            .file(WORKSPACE_FILE, settings_text.as_bytes());
        let mut queue: BTreeSet<String> = BTreeSet::new();
        if pipeline_file(&self.root, BUILD_FILE)? {
            queue.insert(String::new());
        } else {
            session.reads.borrow_mut().absent(BUILD_FILE);
        }
        for pattern in patterns {
            match pattern {
                Pattern::Target(label) => {
                    if !self.package_exists(label.package())? {
                        return Err(ModelError::new(
                            None,
                            Invalid::UnknownPackage {
                                from: None,
                                label: label.clone(),
                            },
                        )
                        .into());
                    }
                    queue.insert(label.package().to_owned());
                }
                Pattern::Package(package) => {
                    if !self.package_exists(package)? {
                        return Err(
                            ModelError::new(None, Invalid::NoMatch(pattern.to_string())).into()
                        );
                    }
                    queue.insert(package.clone());
                }
                Pattern::Recursive(prefix) => {
                    let found = self.find_packages(prefix)?;
                    queue.extend(found.iter().cloned());
                    session
                        .reads
                        .borrow_mut()
                        .packages
                        .insert(prefix.clone(), found);
                }
            }
        }

        let mut ws = Workspace {
            root: Some(self.root.clone()),
            settings,
            tasks: BTreeMap::new(),
            stages: BTreeMap::new(),
        };
        let mut loaded: BTreeSet<String> = BTreeSet::new();
        while let Some(package) = queue.pop_first() {
            let (tasks, stages) = session.eval_package(&package)?;
            loaded.insert(package);
            ws.stages
                .extend(stages.into_iter().map(|s| (s.name.clone(), s)));
            for task in tasks {
                for input in task.inputs() {
                    let package = input.package();
                    if loaded.contains(package) || queue.contains(package) {
                        continue;
                    }
                    if !self.package_exists(package)? {
                        return Err(ModelError::new(
                            task.location.clone(),
                            Invalid::UnknownPackage {
                                from: Some(task.label.clone()),
                                label: input.clone(),
                            },
                        )
                        .into());
                    }
                    queue.insert(package.to_owned());
                }
                ws.insert_task(task)?;
            }
        }
        ws.validate()?;
        Ok((ws, session.reads.into_inner()))
    }

    fn package_exists(&self, package: &str) -> Result<bool, LoadError> {
        pipeline_file(&self.root, &build_file(package))
    }

    /// The packages at or below `prefix`, sorted. Skips hidden directories, `target/`,
    /// `node_modules/`, nested workspaces (directories with their own `ci.toml`) and
    /// symbolic links.
    pub fn find_packages(&self, prefix: &str) -> Result<Vec<String>, LoadError> {
        let mut found = Vec::new();
        let mut stack: Vec<String> = vec![prefix.to_owned()];
        while let Some(package) = stack.pop() {
            let dir = if package.is_empty() {
                self.root.clone()
            } else {
                self.root.join(&package)
            };
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound && package == prefix => continue,
                Err(source) => return Err(LoadError::Io { path: dir, source }),
            };
            let mut subdirs = Vec::new();
            let mut has_build = false;
            for entry in entries {
                let entry = entry.map_err(|source| LoadError::Io {
                    path: dir.clone(),
                    source,
                })?;
                let file_type = entry.file_type().map_err(|source| LoadError::Io {
                    path: entry.path(),
                    source,
                })?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name == BUILD_FILE {
                    // Anything named BUILD.star must be readable as one.
                    has_build = pipeline_file(&self.root, &build_file(&package))?;
                } else if file_type.is_dir()
                    && !name.starts_with('.')
                    && !SKIPPED_DIRS.contains(&name.as_ref())
                {
                    if entry.path().join(WORKSPACE_FILE).exists() {
                        continue;
                    }
                    subdirs.push(if package.is_empty() {
                        name.into_owned()
                    } else {
                        format!("{package}/{name}")
                    });
                }
            }
            if has_build {
                if !valid_package(&package) {
                    return Err(ModelError::new(None, Invalid::BadPackageDir(package)).into());
                }
                found.push(package);
            }
            subdirs.sort();
            stack.extend(subdirs.into_iter().rev());
        }
        found.sort();
        Ok(found)
    }
}

/// The workspace-relative path of a package's `BUILD.star`.
pub(crate) fn build_file(package: &str) -> String {
    if package.is_empty() {
        BUILD_FILE.to_owned()
    } else {
        format!("{package}/{BUILD_FILE}")
    }
}

/// What the built-ins see while a file is evaluated (`Evaluator::extra`).
#[derive(ProvidesStaticType)]
pub(crate) struct EvalContext {
    /// The package being declared into (for a library: the library's directory).
    pub package: String,
    /// The workspace-relative file being evaluated.
    pub file: String,
    /// False while a library is evaluated by `load()`: declaring is refused then.
    pub is_build: bool,
    pub root: PathBuf,
    pub tasks: RefCell<BTreeMap<String, Task>>,
    pub stages: RefCell<BTreeMap<String, Stage>>,
    /// Workspace directories found to exist (`local_source`), for the cache.
    pub dirs: RefCell<Vec<String>>,
    /// The load's step and heap budget.
    pub budget: Rc<limits::Budget>,
}

/// State of one load: libraries already evaluated, and the chain being loaded (for
/// cycle detection).
struct Session<'l> {
    loader: &'l Loader,
    budget: Rc<limits::Budget>,
    libs: RefCell<HashMap<String, FrozenModule>>,
    loading: RefCell<Vec<String>>,
    /// Every file read, by digest of the very bytes evaluated.
    reads: RefCell<cache::Reads>,
}

type PackageDecls = (Vec<Task>, Vec<Stage>);

impl Session<'_> {
    fn dialect() -> Dialect {
        Dialect {
            enable_f_strings: true,
            ..Dialect::Extended
        }
    }

    fn read(&self, file: &str) -> Result<String, LoadError> {
        let path = self.loader.root.join(file);
        pipeline_file(&self.loader.root, file)?;
        match fs::read_to_string(&path) {
            Ok(text) => {
                self.reads.borrow_mut().file(file, text.as_bytes());
                Ok(text)
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(ModelError::new(
                Some(Location {
                    file: file.to_owned(),
                    line: 1,
                    col: 1,
                }),
                Invalid::NotUtf8(file.to_owned()),
            )
            .into()),
            Err(source) => Err(LoadError::Io { path, source }),
        }
    }

    fn eval_package(&self, package: &str) -> Result<PackageDecls, LoadError> {
        let file = build_file(package);
        let source = self.read(&file)?;
        let mut ast = AstModule::parse(&file, source, &Self::dialect()).map_err(convert_error)?;
        limits::prepare(&mut ast)?;
        let ctx = EvalContext {
            package: package.to_owned(),
            file,
            is_build: true,
            root: self.loader.root.clone(),
            tasks: RefCell::new(BTreeMap::new()),
            stages: RefCell::new(BTreeMap::new()),
            dirs: RefCell::new(Vec::new()),
            budget: self.budget.clone(),
        };
        let libs = LibLoader {
            session: self,
            package: package.to_owned(),
        };
        Module::with_temp_heap(|module| {
            let mut eval = Evaluator::new(&module);
            eval.set_loader(&libs);
            eval.extra = Some(&ctx);
            self.budget.watch(&mut eval);
            let result = eval.eval_module(ast, &self.loader.globals).map(|_| ());
            self.budget.finished(eval.get_total_tick_count());
            result
        })
        .map_err(|e| self.limit_error(e))
        .map_err(convert_error)?;
        self.reads.borrow_mut().dirs.extend(ctx.dirs.into_inner());
        Ok((
            ctx.tasks.into_inner().into_values().collect(),
            ctx.stages.into_inner().into_values().collect(),
        ))
    }

    /// Evaluates (once) the library `load(path)` names, relative to `package`.
    fn load_library(&self, path: &str, package: &str) -> starlark::Result<FrozenModule> {
        let (file, lib_package) = resolve_load(path, package).map_err(native)?;
        if let Some(module) = self.libs.borrow().get(&file) {
            return Ok(module.clone());
        }
        if let Some(from) = self.loading.borrow().iter().position(|f| *f == file) {
            let mut cycle: Vec<String> = self.loading.borrow()[from..].to_vec();
            cycle.push(file.clone());
            return Err(native(Invalid::LoadCycle(cycle)));
        }
        match pipeline_file(&self.loader.root, &file) {
            Ok(_) => {}
            Err(LoadError::Model(m)) => return Err(starlark::Error::new_native(m)),
            Err(LoadError::Io { path, source }) => {
                return Err(starlark::Error::new_native(IoFailure { path, source }))
            }
            Err(other) => {
                return Err(starlark::Error::new_native(IoFailure {
                    path: self.loader.root.join(&file),
                    source: io::Error::other(other.to_string()),
                }))
            }
        }
        let source = match fs::read_to_string(self.loader.root.join(&file)) {
            Ok(source) => source,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Err(native(Invalid::LoadMissing {
                    label: path.to_owned(),
                    file,
                }));
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(starlark::Error::new_native(ModelError::new(
                    Some(Location {
                        file: file.clone(),
                        line: 1,
                        col: 1,
                    }),
                    Invalid::NotUtf8(file),
                )));
            }
            Err(source) => {
                return Err(starlark::Error::new_native(IoFailure {
                    path: self.loader.root.join(&file),
                    source,
                }));
            }
        };
        self.reads.borrow_mut().file(&file, source.as_bytes());
        let mut ast = AstModule::parse(&file, source, &Self::dialect())?;
        limits::prepare(&mut ast).map_err(starlark::Error::new_native)?;
        let ctx = EvalContext {
            package: lib_package.clone(),
            file: file.clone(),
            is_build: false,
            root: self.loader.root.clone(),
            tasks: RefCell::new(BTreeMap::new()),
            stages: RefCell::new(BTreeMap::new()),
            dirs: RefCell::new(Vec::new()),
            budget: self.budget.clone(),
        };
        let libs = LibLoader {
            session: self,
            package: lib_package,
        };
        self.loading.borrow_mut().push(file.clone());
        let result = Module::with_temp_heap(|module| {
            {
                let mut eval = Evaluator::new(&module);
                eval.set_loader(&libs);
                eval.extra = Some(&ctx);
                self.budget.watch(&mut eval);
                let result = eval.eval_module(ast, &self.loader.globals);
                self.budget.finished(eval.get_total_tick_count());
                result.map_err(|e| self.limit_error(e))?;
            }
            module.freeze().map_err(starlark::Error::new_other)
        });
        self.loading.borrow_mut().pop();
        self.reads.borrow_mut().dirs.extend(ctx.dirs.take());
        let module = result?;
        self.libs.borrow_mut().insert(file, module.clone());
        Ok(module)
    }
}

impl Session<'_> {
    /// The error of an evaluation that a limit stopped: the evaluator
    /// reports it as a cancellation, which becomes the limit's own located
    /// error here; any other error is returned as it is.
    fn limit_error(&self, err: starlark::Error) -> starlark::Error {
        let Some((problem, statement)) = self.budget.take_exceeded() else {
            return err;
        };
        if let ErrorKind::Native(e) | ErrorKind::Other(e) = err.kind() {
            if e.downcast_ref::<ModelError>().is_some() {
                return err;
            }
        }
        let location = error_location(&err).or(statement);
        starlark::Error::new_native(ModelError::new(location, problem))
    }
}

struct LibLoader<'s, 'l> {
    session: &'s Session<'l>,
    package: String,
}

impl FileLoader for LibLoader<'_, '_> {
    fn load(&self, path: &str) -> starlark::Result<FrozenModule> {
        self.session.load_library(path, &self.package)
    }
}

/// `//dir:file.star` or `:file.star` → (workspace-relative file, its package).
fn resolve_load(path: &str, package: &str) -> Result<(String, String), Invalid> {
    let bad = || Invalid::BadLoadPath(path.to_owned());
    let (pkg, name) = if let Some(rest) = path.strip_prefix("//") {
        rest.split_once(':').ok_or_else(bad)?
    } else if let Some(name) = path.strip_prefix(':') {
        (package, name)
    } else {
        return Err(bad());
    };
    if !valid_package(pkg) || !valid_segment(name) || !name.ends_with(".star") {
        return Err(bad());
    }
    if name == BUILD_FILE {
        return Err(Invalid::LoadBuildFile(path.to_owned()));
    }
    let file = if pkg.is_empty() {
        name.to_owned()
    } else {
        format!("{pkg}/{name}")
    };
    Ok((file, pkg.to_owned()))
}

/// An I/O failure inside Starlark evaluation, carried through `starlark::Error`.
#[derive(Debug, thiserror::Error)]
#[error("Cannot read `{}`", path.display())]
struct IoFailure {
    path: PathBuf,
    #[source]
    source: io::Error,
}

/// Wraps a model problem so it travels through Starlark and comes back typed.
pub(crate) fn native(problem: Invalid) -> starlark::Error {
    starlark::Error::new_native(ModelError::new(None, problem))
}

pub(crate) fn location_of(span: &starlark::codemap::FileSpan) -> Location {
    let resolved = span.resolve_span();
    Location {
        file: span.filename().to_owned(),
        line: resolved.begin.line as u32 + 1,
        col: resolved.begin.column as u32 + 1,
    }
}

/// Where a Starlark error happened: its span, else its innermost located frame.
fn error_location(err: &starlark::Error) -> Option<Location> {
    err.span().map(location_of).or_else(|| {
        err.call_stack()
            .frames
            .iter()
            .rev()
            .find_map(|f| f.location.as_ref().map(location_of))
    })
}

/// Turns Starlark's error into ours, keeping our own typed problems typed.
fn convert_error(err: starlark::Error) -> LoadError {
    let location = error_location(&err);
    let message = err.without_diagnostic().to_string();
    match err.into_kind() {
        ErrorKind::Native(e) | ErrorKind::Other(e) => {
            let e = match e.downcast::<ModelError>() {
                Ok(mut model) => {
                    if model.location.is_none() {
                        model.location = location;
                    }
                    return LoadError::Model(model);
                }
                Err(e) => e,
            };
            match e.downcast::<IoFailure>() {
                Ok(io) => LoadError::Io {
                    path: io.path,
                    source: io.source,
                },
                Err(_) => LoadError::Starlark { location, message },
            }
        }
        _ => LoadError::Starlark { location, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::label::Label;

    #[test]
    fn resolves_load_paths() {
        assert_eq!(
            resolve_load("//lib:defs.star", "a").unwrap(),
            ("lib/defs.star".to_owned(), "lib".to_owned())
        );
        assert_eq!(
            resolve_load(":x.star", "a/b").unwrap(),
            ("a/b/x.star".to_owned(), "a/b".to_owned())
        );
        assert_eq!(resolve_load("//:x.star", "a").unwrap().0, "x.star");
        for bad in [
            "lib/defs.star",
            "//../x:y.star",
            "//lib:defs.bzl",
            "//lib:../x.star",
            "//lib",
        ] {
            assert!(resolve_load(bad, "").is_err(), "{bad}");
        }
        assert!(matches!(
            resolve_load("//a:BUILD.star", ""),
            Err(Invalid::LoadBuildFile(_))
        ));
    }

    #[test]
    fn labels_keep_packages() {
        let l = Label::parse("//a/b:c", None).unwrap();
        assert_eq!(build_file(l.package()), "a/b/BUILD.star");
        assert_eq!(build_file(""), "BUILD.star");
    }
}
