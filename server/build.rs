//! Builds the dashboard (`ui/`, with npm and Vite) into `OUT_DIR` and writes
//! the table of its files that `src/ui.rs` embeds.
//!
//! `STRATA_UI_DIST=<dir>` embeds an already built `ui/dist` instead (for
//! machines without Node.js). Without either, the build stops with one line
//! naming the command that builds the dashboard.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ui = manifest.parent().unwrap_or(&manifest).join("ui");
    println!("cargo:rerun-if-env-changed=STRATA_UI_DIST");
    for p in [
        "src",
        "index.html",
        "package.json",
        "package-lock.json",
        "vite.config.ts",
        "public",
    ] {
        println!("cargo:rerun-if-changed={}", ui.join(p).display());
    }
    let dist = match std::env::var_os("STRATA_UI_DIST") {
        Some(d) => PathBuf::from(d),
        None => {
            let dist = out.join("ui-dist");
            build(&ui, &dist);
            dist
        }
    };
    if !dist.join("index.html").is_file() {
        fail(&format!(
            "`{}` holds no index.html; build the dashboard with `cd ui && npm ci && npm run build`",
            dist.display()
        ));
    }
    let mut files = Vec::new();
    walk(&dist, &dist, &mut files);
    files.sort();
    let mut table = String::from("/// The built dashboard: path below its root, bytes.\npub static ASSETS: &[(&str, &[u8])] = &[\n");
    for (rel, abs) in &files {
        table.push_str(&format!(
            "    ({rel:?}, include_bytes!({:?})),\n",
            abs.display().to_string()
        ));
    }
    table.push_str("];\n");
    if let Err(e) = std::fs::write(out.join("ui_assets.rs"), table) {
        fail(&format!("cannot write the dashboard's file table: {e}"));
    }
}

/// `npm ci` when `node_modules` is missing or older than the lock file, then `vite build`.
fn build(ui: &Path, dist: &Path) {
    let npm = std::env::var_os("NPM").unwrap_or_else(|| "npm".into());
    let installed = ui.join("node_modules/.package-lock.json");
    let stale = match (mtime(&installed), mtime(&ui.join("package-lock.json"))) {
        (Some(have), Some(want)) => have < want,
        _ => true,
    };
    if stale {
        run(
            Command::new(&npm)
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(ui),
            "npm ci",
        );
    }
    run(
        Command::new(&npm)
            .args(["run", "--silent", "bundle", "--", "--outDir"])
            .arg(dist)
            .args(["--emptyOutDir", "--logLevel", "warn"])
            .current_dir(ui),
        "npm run bundle",
    );
}

fn run(cmd: &mut Command, what: &str) {
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => fail(&format!("`{what}` in ui/ failed ({s}); run `cd ui && npm ci && npm run build` to see why")),
        Err(e) => fail(&format!(
            "cannot run npm ({e}): the dashboard needs Node.js 20+ and npm (`apt-get install nodejs npm`), or STRATA_UI_DIST=<a built ui/dist>"
        )),
    }
}

fn mtime(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(root, &p, out);
        } else if let Ok(rel) = p.strip_prefix(root) {
            out.push((rel.to_string_lossy().replace('\\', "/"), p.clone()));
        }
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}
