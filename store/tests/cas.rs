//! Bazel's CAS and action entries in the store (`cas.rs`), on every
//! backend: digests are checked before anything is stored, an entry is
//! refused or dropped when an object it names is missing, GC keeps or
//! sweeps them by `keep_cache`, `verify` reports a bad SHA-256 row, and an
//! on-disk store opened again still has them.

mod common;

use std::io::Write;

use common::*;
use strata_store::{
    Batch, BazelActionKind, CasDigest, Committed, DigestFunction, Family, GcOptions, OpenMode,
    Store, StoreUrl,
};

fn sha(bytes: &[u8]) -> CasDigest {
    CasDigest::of(DigestFunction::Sha256, bytes)
}

fn stored(c: Committed) -> strata_store::Digest {
    match c {
        Committed::Stored { blob, .. } => blob,
        other => panic!("not stored: {other:?}"),
    }
}

macro_rules! each_backend {
    ($($test:ident),* $(,)?) => {
        mod memory { $(#[test] fn $test() { super::$test(crate::common::memory) })* }
        mod rocksdb { $(#[test] fn $test() { super::$test(crate::common::rocksdb) })* }
    };
}

each_backend!(
    uploads_are_checked,
    entries_need_their_objects,
    gc_keeps_or_sweeps_by_keep_cache,
    verify_reports_bad_rows
);

fn uploads_are_checked(backend: Backend) {
    let s = backend();
    let body = b"hello bazel".to_vec();
    // Streamed, the right digest: stored under its BLAKE3 digest.
    let mut w = s.cas_writer(DigestFunction::Sha256).unwrap();
    w.write_all(&body).unwrap();
    let blob = stored(w.commit(&s, &sha(&body), Some(body.len() as u64)).unwrap());
    assert_eq!(blob, strata_store::Digest::of(&body));
    assert_eq!(s.cas_blob(&sha(&body)).unwrap(), Some(blob));
    assert_eq!(
        s.cas_blob(&CasDigest::of(DigestFunction::Blake3, &body))
            .unwrap(),
        Some(blob)
    );
    // The wrong digest or size: nothing stored.
    let other = b"other bytes".to_vec();
    let mut w = s.cas_writer(DigestFunction::Sha256).unwrap();
    w.write_all(&other).unwrap();
    let c = w.commit(&s, &sha(b"not these"), None).unwrap();
    assert!(matches!(c, Committed::Mismatch { got, .. } if got == sha(&other)));
    let mut w = s.cas_writer(DigestFunction::Blake3).unwrap();
    w.write_all(&other).unwrap();
    let d = CasDigest::of(DigestFunction::Blake3, &other);
    assert!(matches!(
        w.commit(&s, &d, Some(3)).unwrap(),
        Committed::Mismatch { .. }
    ));
    assert_eq!(s.cas_blob(&sha(&other)).unwrap(), None);
    assert!(!s
        .blobs()
        .contains(&strata_store::Digest::of(&other))
        .unwrap());
    // A batch: each item on its own.
    let done = s
        .put_cas(&[(sha(b"one"), b"one"), (sha(b"two"), b"three")])
        .unwrap();
    assert!(matches!(done[0], Committed::Stored { .. }));
    assert!(matches!(done[1], Committed::Mismatch { .. }));
    assert_eq!(s.usage().unwrap().sha256, 2);
}

fn entries_need_their_objects(backend: Backend) {
    let s = backend();
    let key = sha(b"action");
    let out = sha(b"output");
    let refused = s
        .put_bazel_action(&key, BazelActionKind::Result, vec![out], b"result".to_vec())
        .unwrap();
    assert_eq!(refused, Err(out));
    assert_eq!(s.bazel_action(&key).unwrap(), None);
    s.put_cas(&[(out, b"output")]).unwrap();
    s.put_bazel_action(&key, BazelActionKind::Result, vec![out], b"result".to_vec())
        .unwrap()
        .unwrap();
    let a = s.bazel_action(&key).unwrap().expect("a complete entry");
    assert_eq!(
        (a.kind, a.refs, a.bytes),
        (BazelActionKind::Result, vec![out], b"result".to_vec())
    );
    assert_eq!(s.usage().unwrap().bazel_actions, 1);
    // Its object gone (by hand, as a crash of an older version might leave
    // it): the lookup is a miss and the entry is dropped.
    s.blobs()
        .delete(&strata_store::Digest::of(b"output"))
        .unwrap();
    assert_eq!(s.bazel_action(&key).unwrap(), None);
    assert_eq!(s.usage().unwrap().bazel_actions, 0);
}

fn gc_keeps_or_sweeps_by_keep_cache(backend: Backend) {
    let s = backend();
    let key = sha(b"action");
    let out = sha(b"output");
    s.put_cas(&[(out, b"output"), (sha(b"loose"), b"loose")])
        .unwrap();
    s.put_bazel_action(&key, BazelActionKind::Result, vec![out], Vec::new())
        .unwrap()
        .unwrap();
    let opaque = stored(
        s.put_cas(&[(CasDigest::of(DigestFunction::Blake3, b"ccache"), b"ccache")])
            .unwrap()[0],
    );
    let okey = sha(b"ccache key");
    s.put_bazel_action(
        &okey,
        BazelActionKind::Opaque,
        vec![CasDigest::new(DigestFunction::Blake3, *opaque.as_bytes())],
        Vec::new(),
    )
    .unwrap()
    .unwrap();
    let keep = GcOptions {
        keep_cache: true,
        ..GcOptions::default()
    };
    let r = s.gc(&keep).unwrap();
    assert_eq!(r.blobs_freed, 0, "{r:?}");
    assert!(s.bazel_action(&key).unwrap().is_some());
    assert!(s.bazel_action(&okey).unwrap().is_some());
    assert!(s.verify().unwrap().problems.is_empty());
    let r = s.gc(&GcOptions::default()).unwrap();
    assert_eq!(r.blobs_freed, 3, "{r:?}");
    let u = s.usage().unwrap();
    assert_eq!((u.blobs, u.sha256, u.bazel_actions), (0, 0, 0), "{u:?}");
    assert!(s.verify().unwrap().problems.is_empty());
}

fn verify_reports_bad_rows(backend: Backend) {
    let s = backend();
    s.put_cas(&[(sha(b"good"), b"good")]).unwrap();
    assert!(s.verify().unwrap().problems.is_empty());
    let mut b = Batch::new();
    // A row whose blob hashes to something else, one whose blob is missing,
    // and an undecodable entry.
    b.put(
        Family::Sha256,
        sha(b"liar").hash.to_vec(),
        strata_store::Digest::of(b"good").as_bytes().to_vec(),
    );
    b.put(
        Family::Sha256,
        sha(b"gone").hash.to_vec(),
        strata_store::Digest::of(b"gone").as_bytes().to_vec(),
    );
    b.put(Family::BazelActions, vec![1u8; 33], b"junk".to_vec());
    s.meta().write(b).unwrap();
    let problems = s.verify().unwrap().problems;
    let whats: Vec<&str> = problems.iter().map(|p| p.what.as_str()).collect();
    assert!(whats.contains(&"wrong sha256"), "{problems:?}");
    assert!(whats.contains(&"missing blob"), "{problems:?}");
    assert!(whats.contains(&"corrupt record"), "{problems:?}");
}

#[test]
fn an_on_disk_store_keeps_them_across_opens() {
    let dir = tempfile::tempdir().unwrap();
    let url = StoreUrl::Local(dir.path().join("store"));
    let key = sha(b"action");
    {
        let s = Store::open(&url, OpenMode::Write, &mut |m| panic!("{m}")).unwrap();
        s.put_cas(&[(sha(b"output"), b"output")]).unwrap();
        s.put_bazel_action(
            &key,
            BazelActionKind::Result,
            vec![sha(b"output")],
            b"r".to_vec(),
        )
        .unwrap()
        .unwrap();
        s.sync().unwrap();
    }
    let s = Store::open(&url, OpenMode::Write, &mut |m| panic!("{m}")).unwrap();
    assert_eq!(
        s.bazel_action(&key).unwrap().map(|a| a.bytes),
        Some(b"r".to_vec())
    );
}
