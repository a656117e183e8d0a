//! The pack on a real store: what a receiver takes, and everything it refuses
//! without leaving anything visible.

use strata_remote::pack::{Kind, PackError, PackReader, PackWriter, Receiver};
use strata_store::{Digest, Entry, Name, Store, Tree};

/// A store holding one layer: a directory with two files and a subdirectory.
fn layer() -> (Store, Digest) {
    let store = Store::memory();
    let a = store.put_blob(b"hello\n").unwrap();
    let b = store.put_blob(&vec![7u8; 300_000]).unwrap();
    let sub = Tree::from_entries(vec![(
        Name::new("b.bin").unwrap(),
        Entry::File {
            digest: b,
            size: 300_000,
            executable: false,
        },
    )])
    .unwrap();
    let root = Tree::from_entries(vec![
        (
            Name::new("a.txt").unwrap(),
            Entry::File {
                digest: a,
                size: 6,
                executable: true,
            },
        ),
        (
            Name::new("sub").unwrap(),
            Entry::Dir {
                digest: sub.digest(),
            },
        ),
    ])
    .unwrap();
    let root_digest = root.digest();
    store.put_trees([sub, root]).unwrap();
    store.record_layer(&root_digest, None).unwrap();
    (store, root_digest)
}

/// Every object of `root` in `from`, as a pack, with `edit` applied to each
/// frame's bytes first.
fn pack_of(from: &Store, root: &Digest, edit: impl Fn(Kind, &mut Vec<u8>)) -> Vec<u8> {
    let closure = from.closure(&[*root]).unwrap();
    let mut w = PackWriter::new(Vec::new()).unwrap();
    for (d, _) in &closure.blobs {
        let mut bytes = from.read_blob(d).unwrap();
        edit(Kind::Blob, &mut bytes);
        w.record(Kind::Blob, d, &bytes).unwrap();
    }
    for (d, bytes) in &closure.trees {
        let mut bytes = bytes.clone();
        edit(Kind::Tree, &mut bytes);
        w.record(Kind::Tree, d, &bytes).unwrap();
    }
    w.record(Kind::Layer, root, &[]).unwrap();
    w.finish().unwrap()
}

fn receive(into: &Store, pack: &[u8]) -> Result<(), PackError> {
    let mut rx = Receiver::new(into);
    let mut r = PackReader::new(pack)?;
    rx.read(&mut r)?;
    rx.commit().map(drop)
}

#[test]
fn a_pack_brings_a_whole_layer() {
    let (a, root) = layer();
    let b = Store::memory();
    receive(&b, &pack_of(&a, &root, |_, _| {})).unwrap();
    assert_eq!(b.first_missing(&[root]).unwrap(), None);
    assert!(b.layer(&root).unwrap().is_some(), "recorded as a layer");
    assert!(b.verify().unwrap().problems.is_empty());
}

#[test]
fn a_changed_byte_is_refused_naming_the_object() {
    let (a, root) = layer();
    for kind in [Kind::Blob, Kind::Tree] {
        let b = Store::memory();
        let pack = pack_of(&a, &root, |k, bytes| {
            if k == kind {
                bytes[0] ^= 1;
            }
        });
        let err = receive(&b, &pack).unwrap_err();
        assert!(err.mismatched().is_some(), "{kind:?}: {err}");
        assert!(
            !b.has_tree(&root).unwrap(),
            "nothing of the layer is visible"
        );
        assert!(b.verify().unwrap().problems.is_empty());
    }
}

#[test]
fn a_cut_pack_is_refused_whole() {
    let (a, root) = layer();
    let pack = pack_of(&a, &root, |_, _| {});
    // Cut the decompressed stream before its end frame, and recompress.
    let raw = zstd_decode(&pack);
    for cut in [raw.len() - 1, raw.len() - 41, raw.len() / 2, 8] {
        let b = Store::memory();
        let err = receive(&b, &zstd_encode(&raw[..cut])).unwrap_err();
        assert!(
            matches!(err, PackError::Truncated(_)),
            "cut at {cut}: {err}"
        );
        assert!(!b.has_tree(&root).unwrap());
    }
    // A cut in the compressed bytes.
    let b = Store::memory();
    assert!(receive(&b, &pack[..pack.len() / 2]).is_err());
    assert!(!b.has_tree(&root).unwrap());
}

#[test]
fn a_tree_naming_what_is_not_there_is_refused() {
    let (a, root) = layer();
    let b = Store::memory();
    // Trees only, no blobs.
    let closure = a.closure(&[root]).unwrap();
    let mut w = PackWriter::new(Vec::new()).unwrap();
    for (d, bytes) in &closure.trees {
        w.record(Kind::Tree, d, bytes).unwrap();
    }
    let err = receive(&b, &w.finish().unwrap()).unwrap_err();
    assert!(matches!(err, PackError::Incomplete { .. }), "{err}");
    assert!(!b.has_tree(&root).unwrap());
}

#[test]
fn not_a_pack() {
    let b = Store::memory();
    assert!(matches!(
        receive(&b, &zstd_encode(b"GET / HTTP/1.1")),
        Err(PackError::NotAPack)
    ));
    assert!(receive(&b, b"plain bytes").is_err());
}

fn zstd_decode(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut zstd_reader(b), &mut out).unwrap();
    out
}

fn zstd_reader(b: &[u8]) -> impl std::io::Read + '_ {
    zstd::stream::read::Decoder::new(b).unwrap()
}

fn zstd_encode(b: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(b, 1).unwrap()
}
