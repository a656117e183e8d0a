//! A `BUILD.star` from bytes, loaded as `ci graph` loads it: an error or a
//! workspace, never a panic, an abort, or more than the load's limits (the
//! runner's `-rss_limit_mb` and `-timeout` turn those into crashes).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: strata_engine::CountingAlloc = strata_engine::CountingAlloc;

/// One workspace for the process; each input overwrites its `BUILD.star`.
/// Small limits keep an input that runs into them short.
fn workspace() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("strata-fuzz-load")
            .tempdir()
            .expect("a temporary directory")
            .keep();
        std::fs::write(
            dir.join("ci.toml"),
            "[build]\nexecutor = \"host\"\n[load]\nmax_steps = 1000000\nmax_heap_mib = 256\n",
        )
        .expect("ci.toml");
        std::fs::create_dir_all(dir.join("src")).expect("src/");
        std::fs::write(dir.join("lib.star"), "def double(x):\n    return x + x\n")
            .expect("lib.star");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let root = workspace();
    std::fs::write(root.join("BUILD.star"), data).expect("BUILD.star");
    let loader = strata_engine::Loader::new(root.clone());
    if let Err(e) = loader.load() {
        // Every error displays (a Display that panics is a crash too).
        let _ = e.to_string();
    }
});
