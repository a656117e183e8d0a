//! An archive from bytes imported into a temporary on-disk store: imported
//! or refused, never a panic, and a refused archive leaves nothing behind (no
//! layer, no blob, nothing staged). Bytes that are not a zstd frame are
//! compressed first, so that the tar reader sees them as they are.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use strata_store::{ArchiveLimits, ImportOptions, OpenMode, Store, StoreUrl};

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

fn store() -> &'static (PathBuf, Store) {
    static STORE: OnceLock<(PathBuf, Store)> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("strata-fuzz-import")
            .tempdir()
            .expect("a temporary directory")
            .keep();
        let store = Store::open(&StoreUrl::Local(dir.clone()), OpenMode::Write, &mut |_| {})
            .expect("a new store");
        (dir, store)
    })
}

/// Files under `dir`, recursively (0 when it does not exist).
fn files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => files(&e.path()),
            _ => 1,
        })
        .sum()
}

fuzz_target!(|data: &[u8]| {
    let (root, store) = store();
    let input = if data.starts_with(&ZSTD_MAGIC) {
        data.to_vec()
    } else {
        zstd::encode_all(data, 1).expect("zstd in memory")
    };
    let limits = ArchiveLimits {
        max_total_bytes: 4 << 20,
        ..ArchiveLimits::default()
    };
    let layers = store.layers().expect("layers").len();
    let blobs = files(&root.join("blobs"));
    match store.import_limited(&mut &input[..], "fuzz", &ImportOptions::default(), &limits) {
        Ok(report) => {
            assert!(store.layer(&report.layer).expect("layer").is_some());
        }
        Err(e) => {
            let _ = e.to_string();
            assert_eq!(store.layers().expect("layers").len(), layers, "{e}");
            assert_eq!(files(&root.join("blobs")), blobs, "a blob left by: {e}");
            assert_eq!(files(&root.join("tmp")), 0, "staged files left by: {e}");
        }
    }
});
