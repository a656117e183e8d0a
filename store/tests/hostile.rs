//! Hostile archives: each is built header by header (name bytes written
//! straight into the GNU header where the `tar` crate would refuse them),
//! compressed with zstd like an export, and must be refused by
//! `Store::import` as a whole: `Error::BadArchive` naming the entry, or
//! `Error::ArchiveIo` for a stream that cannot be read. After each refusal the
//! store holds no new layer, tree, blob or ref, `<root>/tmp/` is empty and
//! `verify` is clean. Every case runs against every backend.
//!
//! Positive controls at the end: what a careful importer must still accept.

mod common;

use std::io::Write;

use common::*;
use strata_store::{ArchiveLimits, BlobStore, Digest, Entry, Error, ImportOptions, RelPath, Store};
use tar::{EntryType, Header};

// ---------------------------------------------------------------------------
// Building raw archives
// ---------------------------------------------------------------------------

/// A tar stream written block by block.
#[derive(Default)]
struct RawTar(Vec<u8>);

fn set_bytes(field: &mut [u8], value: &[u8]) {
    assert!(
        value.len() <= field.len(),
        "{} bytes do not fit in {}",
        value.len(),
        field.len()
    );
    field.fill(0);
    field[..value.len()].copy_from_slice(value);
}

impl RawTar {
    fn new() -> RawTar {
        RawTar::default()
    }

    /// One header with raw name and link bytes (≤ 100 each), then `data`.
    fn entry_with(
        mut self,
        ty: EntryType,
        name: &[u8],
        link: &[u8],
        data: &[u8],
        edit: impl FnOnce(&mut Header),
    ) -> RawTar {
        let mut h = Header::new_gnu();
        h.set_entry_type(ty);
        h.set_size(data.len() as u64);
        h.set_mode(if ty.is_dir() { 0o755 } else { 0o644 });
        h.set_mtime(1);
        h.set_uid(0);
        h.set_gid(0);
        {
            let gnu = h.as_gnu_mut().expect("a GNU header");
            set_bytes(&mut gnu.name, name);
            set_bytes(&mut gnu.linkname, link);
        }
        edit(&mut h);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.data(data)
    }

    fn entry(self, ty: EntryType, name: &[u8], link: &[u8], data: &[u8]) -> RawTar {
        self.entry_with(ty, name, link, data, |_| {})
    }

    /// Data blocks, padded to 512 bytes.
    fn data(mut self, data: &[u8]) -> RawTar {
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    /// A GNU long-name (`L`) member giving the next member's path.
    fn long_name(self, name: &[u8]) -> RawTar {
        let mut data = name.to_vec();
        data.push(0);
        self.entry(EntryType::GNULongName, b"././@LongLink", b"", &data)
    }

    /// A GNU long-link (`K`) member giving the next member's link target.
    fn long_link(self, target: &[u8]) -> RawTar {
        let mut data = target.to_vec();
        data.push(0);
        self.entry(EntryType::GNULongLink, b"././@LongLink", b"", &data)
    }

    /// A PAX extended header (`x`) for the next member.
    fn pax(self, records: &[(&str, &[u8])]) -> RawTar {
        self.pax_of(EntryType::XHeader, records)
    }

    fn pax_of(self, ty: EntryType, records: &[(&str, &[u8])]) -> RawTar {
        let mut data = Vec::new();
        for (key, value) in records {
            // "<len> <key>=<value>\n", where <len> counts itself.
            let body = [b" ", key.as_bytes(), b"=", value, b"\n"].concat();
            let mut len = body.len() + 1;
            while len != body.len() + len.to_string().len() {
                len = body.len() + len.to_string().len();
            }
            data.extend_from_slice(len.to_string().as_bytes());
            data.extend_from_slice(&body);
        }
        self.entry(ty, b"PaxHeaders/entry", b"", &data)
    }

    fn file(self, name: &[u8], data: &[u8]) -> RawTar {
        if name.len() > 100 {
            self.long_name(name)
                .entry(EntryType::Regular, &name[..100], b"", data)
        } else {
            self.entry(EntryType::Regular, name, b"", data)
        }
    }

    fn dir(self, name: &[u8]) -> RawTar {
        self.entry(EntryType::Directory, name, b"", b"")
    }

    fn symlink(self, name: &[u8], target: &[u8]) -> RawTar {
        self.entry(EntryType::Symlink, name, target, b"")
    }

    fn hardlink(self, name: &[u8], target: &[u8]) -> RawTar {
        self.entry(EntryType::Link, name, target, b"")
    }

    fn device(self, ty: EntryType, name: &[u8]) -> RawTar {
        self.entry_with(ty, name, b"", b"", |h| {
            h.set_device_major(8).unwrap();
            h.set_device_minor(1).unwrap();
        })
    }

    fn raw(mut self, bytes: &[u8]) -> RawTar {
        self.0.extend_from_slice(bytes);
        self
    }

    /// The end-of-archive marker: two zero blocks.
    fn finish(self) -> Vec<u8> {
        self.raw(&[0; 1024]).0
    }
}

/// Compresses like an export does: zstd with a content checksum.
fn zst(tar: &[u8]) -> Vec<u8> {
    let mut enc = zstd::Encoder::new(Vec::new(), 3).unwrap();
    enc.include_checksum(true).unwrap();
    enc.write_all(tar).unwrap();
    enc.finish().unwrap()
}

/// A harmless first member, so a refusal also has a staged blob to throw away.
fn ok() -> RawTar {
    RawTar::new()
        .dir(b"fine/")
        .file(b"fine/ok.txt", b"an innocent file before the bad entry\n")
}

// ---------------------------------------------------------------------------
// The check
// ---------------------------------------------------------------------------

enum Expect {
    /// `Error::BadArchive` whose entry is exactly this.
    Entry(String),
    /// A stream that cannot be read: `Error::ArchiveIo` (or `BadArchive`).
    Stream,
}

fn entry(s: impl AsRef<[u8]>) -> Expect {
    Expect::Entry(String::from_utf8_lossy(s.as_ref()).into_owned())
}

/// How a refusal names an entry longer than 100 bytes: its first 100 bytes
/// and its length.
fn quoted_name(name: &[u8]) -> String {
    assert!(name.len() > 100);
    format!(
        "{}… ({} bytes)",
        String::from_utf8_lossy(&name[..100]),
        name.len()
    )
}

fn quoted(name: &[u8]) -> Expect {
    Expect::Entry(quoted_name(name))
}

fn seeded(new: Backend) -> TestStore {
    let t = new();
    let seed = t.ingest_spec(
        &Dir::new()
            .file("seed", "seed")
            .dir("fine", Dir::new().file("ok.txt", "already here\n")),
    );
    t.set_ref("seed", &seed).unwrap();
    t
}

fn refused(case: &str, archive: &[u8], expect: Expect) {
    for new in [memory as Backend, rocksdb] {
        let t = seeded(new);
        let before = t.counts();
        let err = match t.import(&mut &archive[..], case, &ImportOptions::default()) {
            Ok(r) => {
                let listing = snapshot(&t.checkout_new(&r.layer));
                panic!(
                    "[{}] {case}: accepted as layer {}: {listing:#?}",
                    t.kind, r.layer
                )
            }
            Err(e) => e,
        };
        match (&expect, &err) {
            (
                Expect::Entry(want),
                Error::BadArchive {
                    archive,
                    entry: got,
                    ..
                },
            ) => {
                assert_eq!(archive, case, "the error names the archive");
                assert_eq!(
                    got, want,
                    "[{}] {case}: the error names the entry: {err}",
                    t.kind
                );
                assert!(err.to_string().contains(&format!("`{want}`")), "{err}");
                assert!(err.to_string().contains("nothing was imported"), "{err}");
            }
            (Expect::Stream, Error::ArchiveIo { .. } | Error::BadArchive { .. }) => {}
            _ => panic!(
                "[{}] {case}: refused with the wrong error: {}",
                t.kind,
                chain(&err)
            ),
        }
        assert_eq!(
            t.counts(),
            before,
            "[{}] {case}: a refused archive records nothing",
            t.kind
        );
        let left = t.staging_leftovers();
        assert!(
            left.is_empty(),
            "[{}] {case}: left in tmp/: {left:?}",
            t.kind
        );
        t.assert_verified();
    }
}

fn accepted(case: &str, archive: &[u8], opts: &ImportOptions, want: &Dir) -> (TestStore, Digest) {
    let expected = want.build(&Store::memory());
    let mut last = None;
    for new in [memory as Backend, rocksdb] {
        let t = seeded(new);
        let r = t
            .import(&mut &archive[..], case, opts)
            .unwrap_or_else(|e| panic!("[{}] {case}: refused: {}", t.kind, chain(&e)));
        assert_eq!(
            r.layer, expected,
            "[{}] {case}: imported as another tree",
            t.kind
        );
        assert_same(case, &snapshot(&t.checkout_new(&r.layer)), &want.snapshot());
        assert!(t.staging_leftovers().is_empty());
        t.assert_verified();
        last = Some((t, r.layer));
    }
    last.unwrap()
}

// ---------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------

#[test]
fn dot_dot() {
    refused(
        "dot-dot",
        &zst(&ok().file(b"../x", b"escaped").finish()),
        entry("../x"),
    );
}

#[test]
fn dot_dot_inside() {
    let a = ok().dir(b"a/").file(b"a/../../x", b"escaped").finish();
    refused("dot-dot-inside", &zst(&a), entry("a/../../x"));
}

#[test]
fn absolute_path() {
    let a = ok()
        .file(b"/etc/passwd", b"root::0:0::/:/bin/sh\n")
        .finish();
    refused("absolute", &zst(&a), entry("/etc/passwd"));
}

#[test]
fn empty_name() {
    refused(
        "empty-name",
        &zst(&ok().file(b"", b"nameless").finish()),
        entry(""),
    );
}

#[test]
fn empty_component() {
    refused(
        "double-slash",
        &zst(&ok().file(b"a//b", b"x").finish()),
        entry("a//b"),
    );
}

#[test]
fn dot_component() {
    refused(
        "dot-component",
        &zst(&ok().file(b"a/./b", b"x").finish()),
        entry("a/./b"),
    );
}

#[test]
fn root_as_a_file() {
    refused(
        "root-file",
        &zst(&ok().file(b"./", b"x").finish()),
        entry("./"),
    );
}

#[test]
fn component_longer_than_255_bytes() {
    let name = vec![b'x'; 300];
    refused(
        "long-component",
        &zst(&ok().file(&name, b"x").finish()),
        quoted(&name),
    );
}

#[test]
fn gnu_long_name_with_dot_dot() {
    let mut name = vec![b'a'; 120];
    name.extend_from_slice(b"/../../x");
    let a = ok().file(&name, b"escaped").finish();
    refused("gnu-long-name", &zst(&a), quoted(&name));
}

#[test]
fn gnu_long_name_with_nul() {
    let a = ok()
        .long_name(b"a\0b")
        .entry(EntryType::Regular, b"innocent", b"", b"x")
        .finish();
    refused("gnu-long-name-nul", &zst(&a), entry("a\0b"));
}

#[test]
fn pax_path_with_dot_dot() {
    let a = ok()
        .pax(&[("path", b"../pax-escape")])
        .file(b"innocent", b"escaped")
        .finish();
    refused("pax-path", &zst(&a), entry("../pax-escape"));
}

#[test]
fn pax_absolute_path() {
    let a = ok()
        .pax(&[("mtime", b"1"), ("path", b"/etc/cron.d/evil")])
        .file(b"innocent", b"* * * * * root sh\n")
        .finish();
    refused("pax-absolute", &zst(&a), entry("/etc/cron.d/evil"));
}

#[test]
fn pax_linkpath_escaping() {
    let a = ok()
        .pax(&[("linkpath", b"../../etc")])
        .symlink(b"pl", b"ok")
        .finish();
    refused("pax-linkpath", &zst(&a), entry("pl"));
}

#[test]
fn gnu_long_link_escaping() {
    let target = "../".repeat(40) + "etc";
    let a = ok()
        .long_link(target.as_bytes())
        .symlink(b"ll", b"short")
        .finish();
    refused("gnu-long-link", &zst(&a), entry("ll"));
}

// ---------------------------------------------------------------------------
// Symlinks
// ---------------------------------------------------------------------------

#[test]
fn symlink_to_absolute_dir() {
    refused(
        "symlink-etc",
        &zst(&ok().symlink(b"etc", b"/etc").finish()),
        entry("etc"),
    );
}

#[test]
fn symlink_up_and_out() {
    let a = ok().dir(b"sub/").symlink(b"sub/a", b"../..").finish();
    refused("symlink-up-up", &zst(&a), entry("sub/a"));
}

#[test]
fn symlink_chain_escaping() {
    // `d -> .` is harmless; `e -> d/..` resolves to the parent of the root.
    let a = ok().symlink(b"d", b".").symlink(b"e", b"d/..").finish();
    refused("symlink-chain", &zst(&a), entry("e"));
    // The same links in the other order.
    let a = ok().symlink(b"e", b"d/..").symlink(b"d", b".").finish();
    refused("symlink-chain-reversed", &zst(&a), entry("e"));
}

#[test]
fn symlink_chain_through_a_directory_link() {
    let a = ok()
        .dir(b"sub/")
        .symlink(b"s", b"sub")
        .symlink(b"t", b"s/../..")
        .finish();
    refused("symlink-chain-dir", &zst(&a), entry("t"));
}

#[test]
fn symlink_with_empty_target() {
    refused(
        "symlink-empty",
        &zst(&ok().symlink(b"empty", b"").finish()),
        entry("empty"),
    );
}

#[test]
fn file_written_through_a_symlink() {
    let a = ok()
        .dir(b"sub/")
        .symlink(b"l", b"sub")
        .file(b"l/x", b"written through the link")
        .finish();
    refused("write-through-symlink", &zst(&a), entry("l/x"));
}

#[test]
fn file_written_through_an_escaping_symlink() {
    let a = ok()
        .symlink(b"etc", b"/etc")
        .file(b"etc/passwd", b"root::0:0::/:/bin/sh\n")
        .finish();
    refused("write-through-etc", &zst(&a), entry("etc/passwd"));
}

// ---------------------------------------------------------------------------
// Special files and links
// ---------------------------------------------------------------------------

#[test]
fn character_device() {
    let a = ok().device(EntryType::Char, b"dev-null").finish();
    refused("char-device", &zst(&a), entry("dev-null"));
}

#[test]
fn block_device() {
    let a = ok().device(EntryType::Block, b"sda").finish();
    refused("block-device", &zst(&a), entry("sda"));
}

#[test]
fn fifo() {
    let a = ok().entry(EntryType::Fifo, b"pipe", b"", b"").finish();
    refused("fifo", &zst(&a), entry("pipe"));
}

#[test]
fn unknown_entry_type() {
    let a = ok()
        .entry(EntryType::new(b'V'), b"label", b"", b"")
        .finish();
    refused("volume-label", &zst(&a), entry("label"));
}

#[test]
fn gnu_sparse_file() {
    let a = ok()
        .entry_with(EntryType::GNUSparse, b"sparse", b"", &[7u8; 512], |h| {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.sparse[0].set_offset(0);
            gnu.sparse[0].set_length(512);
            gnu.set_real_size(512);
        })
        .finish();
    refused("gnu-sparse", &zst(&a), entry("sparse"));
}

#[test]
fn hard_link_to_an_absolute_path() {
    let a = ok().hardlink(b"h", b"/etc/passwd").finish();
    refused("hardlink-etc", &zst(&a), entry("h"));
}

#[test]
fn hard_link_to_a_later_entry() {
    let a = ok().hardlink(b"h", b"later").file(b"later", b"x").finish();
    refused("hardlink-later", &zst(&a), entry("h"));
}

#[test]
fn hard_link_to_nothing() {
    let a = ok().hardlink(b"h", b"nowhere").finish();
    refused("hardlink-nowhere", &zst(&a), entry("h"));
}

#[test]
fn hard_link_outside() {
    let a = ok().hardlink(b"h", b"../x").finish();
    refused("hardlink-dot-dot", &zst(&a), entry("h"));
}

#[test]
fn hard_link_to_a_directory_or_symlink() {
    let a = ok().dir(b"d/").hardlink(b"h", b"d").finish();
    refused("hardlink-dir", &zst(&a), entry("h"));
    let a = ok().symlink(b"l", b"fine").hardlink(b"h", b"l").finish();
    refused("hardlink-symlink", &zst(&a), entry("h"));
}

// ---------------------------------------------------------------------------
// Clashing paths
// ---------------------------------------------------------------------------

#[test]
fn duplicate_file() {
    let a = ok().file(b"f", b"first").file(b"f", b"second").finish();
    refused("duplicate", &zst(&a), entry("f"));
}

#[test]
fn file_then_directory() {
    let a = ok().file(b"f", b"a file").dir(b"f/").finish();
    refused("file-then-dir", &zst(&a), entry("f/"));
}

#[test]
fn directory_then_file() {
    let a = ok().dir(b"f/").file(b"f", b"a file").finish();
    refused("dir-then-file", &zst(&a), entry("f"));
}

#[test]
fn symlink_then_file() {
    let a = ok().symlink(b"f", b"fine").file(b"f", b"a file").finish();
    refused("symlink-then-file", &zst(&a), entry("f"));
}

#[test]
fn entry_inside_a_file() {
    let a = ok()
        .file(b"f", b"a file")
        .file(b"f/x", b"inside it")
        .finish();
    refused("inside-a-file", &zst(&a), entry("f/x"));
}

// ---------------------------------------------------------------------------
// Broken streams
// ---------------------------------------------------------------------------

fn with_data() -> (Vec<u8>, Vec<u8>) {
    let data = pseudo_random(4096, 11);
    let tar = ok()
        .file(b"data.bin", &data)
        .file(b"after", b"after")
        .finish();
    (tar, data)
}

#[test]
fn truncated_in_file_data() {
    let (tar, _) = with_data();
    // Cut in the middle of `data.bin`'s bytes: a complete zstd frame of a cut tar.
    let start = tar.len() - 1024 - 1024 - 4096;
    let cut = &tar[..start + 2000];
    refused("truncated-tar", &zst(cut), Expect::Stream);
}

#[test]
fn truncated_zstd_stream() {
    let (tar, _) = with_data();
    let z = zst(&tar);
    refused("truncated-zstd", &z[..z.len() / 2], Expect::Stream);
    refused("truncated-zstd-checksum", &z[..z.len() - 2], Expect::Stream);
}

#[test]
fn corrupt_zstd_frame_header() {
    let (tar, _) = with_data();
    let mut z = zst(&tar);
    z[0] ^= 0xff;
    refused("corrupt-zstd-magic", &z, Expect::Stream);
}

#[test]
fn corrupt_zstd_data_caught_by_the_checksum() {
    // Random bytes are stored raw in the frame: flipping one changes the file
    // content without breaking the block structure. Only the frame checksum at
    // the end can tell, so the importer must read the stream to its end.
    let (tar, data) = with_data();
    let mut z = zst(&tar);
    let probe = &data[1000..1064];
    let at = z
        .windows(probe.len())
        .position(|w| w == probe)
        .expect("the random file data appears verbatim in the zstd frame");
    z[at + 10] ^= 0x01;
    let decoded = zstd::stream::Decoder::new(&z[..]).and_then(|mut d| {
        let mut out = Vec::new();
        std::io::copy(&mut d, &mut out).map(|_| out)
    });
    assert!(decoded.is_err(), "zstd itself must notice (checksum)");
    refused("corrupt-zstd-data", &z, Expect::Stream);
}

#[test]
fn not_zstd_at_all() {
    let (tar, _) = with_data();
    refused("plain-tar", &tar, Expect::Stream);
    refused("empty-input", b"", Expect::Stream);
    refused("text", b"this is not an archive\n", Expect::Stream);
}

#[test]
fn bad_header_checksum() {
    let mut tar = ok().file(b"f", b"x").finish();
    let second = 512 * 3; // dir header, file header + 1 data block, then `f`
    tar[second + 148] = b'7'; // corrupt the stored checksum of `f`'s header
    refused("bad-checksum", &zst(&tar), Expect::Stream);
}

#[test]
fn extension_header_describing_nothing() {
    let tar = ok().pax(&[("path", b"x")]).finish();
    refused("dangling-pax", &zst(&tar), Expect::Stream);
    let tar = ok()
        .long_name(b"first")
        .long_name(b"second")
        .file(b"f", b"x")
        .finish();
    refused("two-long-names", &zst(&tar), Expect::Stream);
}

/// Trailing data after the end-of-archive marker, inside the zstd frame.
///
/// Decision: refused. A reader that stops at the marker never reaches the
/// zstd frame checksum (see `corrupt_zstd_data_caught_by_the_checksum`), so
/// the importer must read the decompressed stream to its end anyway; what it
/// finds there must be zeros (the padding GNU tar writes to fill its
/// 10240-byte records, accepted below). Anything else, such as a second
/// archive appended with `cat`, would silently be left out of the layer, and a
/// bad archive is refused whole rather than imported in part.
#[test]
fn trailing_garbage_inside_the_zstd_frame() {
    let tar = ok()
        .raw(&[0; 1024])
        .file(b"hidden", b"after the end-of-archive marker")
        .finish();
    refused("trailing-archive", &zst(&tar), Expect::Stream);
    let mut tar = ok().finish();
    tar.extend_from_slice(b"garbage after the end of the archive");
    refused("trailing-garbage", &zst(&tar), Expect::Stream);
}

/// Bytes after the zstd frame: refused for the same reason.
#[test]
fn trailing_garbage_after_the_zstd_frame() {
    let mut z = zst(&ok().finish());
    z.extend_from_slice(b"garbage after the zstd frame");
    refused("garbage-after-frame", &z, Expect::Stream);
}

// ---------------------------------------------------------------------------
// Limits: refused before the bytes they bound are read or kept
// ---------------------------------------------------------------------------

/// A part of a tar stream made on the fly: bytes, or one byte repeated.
enum Part {
    Bytes(Vec<u8>),
    Repeat(u8, u64),
}

/// A tar stream of any size generated as it is read, never held whole;
/// counts the bytes the importer pulled through the compressor.
struct Lazy {
    parts: std::collections::VecDeque<Part>,
    pulled: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::io::Read for Lazy {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = loop {
            match self.parts.front_mut() {
                None => return Ok(0),
                Some(Part::Bytes(b)) if b.is_empty() => {}
                Some(Part::Repeat(_, 0)) => {}
                Some(Part::Bytes(b)) => {
                    let n = b.len().min(buf.len());
                    buf[..n].copy_from_slice(&b[..n]);
                    b.drain(..n);
                    break n;
                }
                Some(Part::Repeat(byte, left)) => {
                    let n = (*left).min(buf.len() as u64) as usize;
                    buf[..n].fill(*byte);
                    *left -= n as u64;
                    break n;
                }
            }
            self.parts.pop_front();
        };
        self.pulled
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

/// One raw header block (name ≤ 100 bytes) declaring `size` bytes of data.
fn header(ty: EntryType, name: &[u8], size: u64) -> Vec<u8> {
    let mut h = Header::new_gnu();
    h.set_entry_type(ty);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(1);
    set_bytes(&mut h.as_gnu_mut().unwrap().name, name);
    h.set_cksum();
    h.as_bytes().to_vec()
}

fn pad(size: u64) -> Part {
    Part::Repeat(0, (512 - size % 512) % 512)
}

/// Imports the lazily made, zstd-compressed stream into each backend and
/// checks the refusal: the entry named as `want_entry`, the reason naming
/// `limit`, a short message, at most `max_pulled` bytes of the tar read, and
/// the store as it was.
fn refused_lazily(
    case: &str,
    make: impl Fn() -> Vec<Part>,
    limits: &ArchiveLimits,
    want_entry: &str,
    limit: &str,
    max_pulled: u64,
) {
    for new in [memory as Backend, rocksdb] {
        let t = seeded(new);
        let before = t.counts();
        let pulled = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let lazy = Lazy {
            parts: make().into(),
            pulled: pulled.clone(),
        };
        let mut input = zstd::stream::read::Encoder::new(lazy, 1).unwrap();
        let err = match t.import_limited(&mut input, case, &ImportOptions::default(), limits) {
            Ok(r) => panic!("[{}] {case}: accepted as layer {}", t.kind, r.layer),
            Err(e) => e,
        };
        let message = err.to_string();
        match &err {
            Error::BadArchive { entry, reason, .. } => {
                assert_eq!(entry, want_entry, "[{}] {case}: {message}", t.kind);
                assert!(
                    reason.contains(&format!("`ArchiveLimits::{limit}`")),
                    "[{}] {case}: the reason names the limit: {message}",
                    t.kind
                );
            }
            other => panic!("[{}] {case}: wrong error: {}", t.kind, chain(other)),
        }
        assert!(
            message.len() < 500,
            "[{}] {case}: a message of {} bytes",
            t.kind,
            message.len()
        );
        let pulled = pulled.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            pulled <= max_pulled,
            "[{}] {case}: read {pulled} bytes of the tar before refusing",
            t.kind
        );
        assert_eq!(t.counts(), before, "[{}] {case}: nothing recorded", t.kind);
        let left = t.staging_leftovers();
        assert!(
            left.is_empty(),
            "[{}] {case}: left in tmp/: {left:?}",
            t.kind
        );
        t.assert_verified();
    }
}

const GIB_1_5: u64 = 3 << 29;
/// What the compressor reads ahead of the importer, at most (with room).
const READ_AHEAD: u64 = 4 << 20;

#[test]
fn gnu_long_name_of_1_5_gib() {
    let size = GIB_1_5 + 1;
    let make = || {
        vec![
            Part::Bytes(header(EntryType::GNULongName, b"././@LongLink", size)),
            Part::Repeat(b'a', GIB_1_5),
            Part::Bytes(vec![0]),
            pad(size),
            Part::Bytes(header(EntryType::Regular, b"short", 0)),
            Part::Repeat(0, 1024),
        ]
    };
    let want = format!("{}… ({size} bytes)", "a".repeat(100));
    let limits = ArchiveLimits::default();
    refused_lazily(
        "gnu-long-name-huge",
        make,
        &limits,
        &want,
        "max_path_bytes",
        READ_AHEAD,
    );
}

#[test]
fn gnu_long_link_of_1_5_gib() {
    let size = GIB_1_5 + 1;
    let make = || {
        vec![
            Part::Bytes(header(EntryType::GNULongLink, b"././@LongLink", size)),
            Part::Repeat(b'l', GIB_1_5),
            Part::Bytes(vec![0]),
            pad(size),
            Part::Bytes(header(EntryType::Symlink, b"link", 0)),
            Part::Repeat(0, 1024),
        ]
    };
    let want = format!("{}… ({size} bytes)", "l".repeat(100));
    let limits = ArchiveLimits::default();
    refused_lazily(
        "gnu-long-link-huge",
        make,
        &limits,
        &want,
        "max_path_bytes",
        READ_AHEAD,
    );
}

#[test]
fn pax_path_of_1_5_gib() {
    // One record: "<len> path=aaaa…\n", where <len> counts itself.
    let body = GIB_1_5 + " path=\n".len() as u64;
    let len = body + (body + 10).to_string().len() as u64;
    assert_eq!(len.to_string().len(), (body + 10).to_string().len());
    let make = move || {
        vec![
            Part::Bytes(header(EntryType::XHeader, b"PaxHeaders/huge", len)),
            Part::Bytes(format!("{len} path=").into_bytes()),
            Part::Repeat(b'p', GIB_1_5),
            Part::Bytes(b"\n".to_vec()),
            pad(len),
            Part::Bytes(header(EntryType::Regular, b"short", 0)),
            Part::Repeat(0, 1024),
        ]
    };
    let limits = ArchiveLimits::default();
    refused_lazily(
        "pax-path-huge",
        make,
        &limits,
        "PaxHeaders/huge",
        "max_extension_bytes",
        READ_AHEAD,
    );
}

#[test]
fn paths_longer_than_4096_bytes() {
    // In a PAX header well within its own limit.
    let long = vec![b'p'; 5000];
    let a = ok().pax(&[("path", &long)]).file(b"short", b"x").finish();
    refused("pax-path-5000", &zst(&a), quoted(&long));
    // In a GNU long name: refused at the long-name header.
    let long = vec![b'g'; 4097];
    let a = ok().file(&long, b"x").finish();
    refused(
        "gnu-long-name-4097",
        &zst(&a),
        quoted(&[&long[..], b"\0"].concat()),
    );
    // A PAX link target.
    let target = vec![b't'; 4097];
    let a = ok()
        .pax(&[("linkpath", &target)])
        .symlink(b"l", b"x")
        .finish();
    refused("pax-linkpath-4097", &zst(&a), entry("l"));
}

#[test]
fn five_thousand_components() {
    let path = [&b"a/".repeat(4999)[..], b"f"].concat();
    let a = ok().file(&path, b"deep").finish();
    // Refused at the GNU long-name header, whose data ends with a NUL.
    refused(
        "5000-components",
        &zst(&a),
        quoted(&[&path[..], b"\0"].concat()),
    );
}

#[test]
fn deeper_than_the_limit() {
    let path = [&b"d/".repeat(256)[..], b"f"].concat(); // 257 components
    let a = ok().file(&path, b"deep").finish();
    refused("257-components", &zst(&a), quoted(&path));
    let limits = ArchiveLimits::default();
    let t = memory();
    match t.import_limited(
        &mut &zst(&a)[..],
        "deep",
        &ImportOptions::default(),
        &limits,
    ) {
        Err(Error::BadArchive { reason, .. }) => {
            assert!(reason.contains("`ArchiveLimits::max_depth`"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // Raised, the limit lets the same archive in.
    let raised = ArchiveLimits {
        max_depth: 300,
        ..ArchiveLimits::default()
    };
    t.import_limited(
        &mut &zst(&a)[..],
        "deep",
        &ImportOptions::default(),
        &raised,
    )
    .unwrap_or_else(|e| panic!("{}", chain(&e)));
}

#[test]
fn zstd_bomb_one_huge_file() {
    // 1 TiB of zeros declared: over the default total before a byte is staged.
    let size = 1u64 << 40;
    let make = move || {
        vec![
            Part::Bytes(header(EntryType::Regular, b"bomb", size)),
            Part::Repeat(0, size),
            Part::Repeat(0, 1024),
        ]
    };
    let limits = ArchiveLimits::default();
    refused_lazily(
        "bomb-1tib",
        make,
        &limits,
        "bomb",
        "max_total_bytes",
        READ_AHEAD,
    );
}

#[test]
fn zstd_bomb_many_files() {
    // 64 KiB files of zeros, 4,096 of them (256 MiB); a 1 MiB limit stops the
    // import after 16 staged files, which must be removed.
    let make = || {
        let mut parts = Vec::new();
        for i in 0..4096 {
            parts.push(Part::Bytes(header(
                EntryType::Regular,
                format!("f{i}").as_bytes(),
                64 << 10,
            )));
            parts.push(Part::Repeat(0, 64 << 10));
        }
        parts.push(Part::Repeat(0, 1024));
        parts
    };
    let limits = ArchiveLimits {
        max_total_bytes: 1 << 20,
        ..ArchiveLimits::default()
    };
    refused_lazily(
        "bomb-many",
        make,
        &limits,
        "f16",
        "max_total_bytes",
        (1 << 20) + READ_AHEAD,
    );
}

#[test]
fn more_entries_than_the_limit() {
    let limits = ArchiveLimits {
        max_entries: 50,
        ..ArchiveLimits::default()
    };
    let make = || {
        let mut parts = Vec::new();
        for i in 0..1000 {
            parts.push(Part::Bytes(header(
                EntryType::Regular,
                format!("f{i}").as_bytes(),
                0,
            )));
        }
        parts.push(Part::Repeat(0, 1024));
        parts
    };
    refused_lazily("entries", make, &limits, "f50", "max_entries", READ_AHEAD);
    // Implied directories count: one file 60 directories deep.
    let path = [&b"d/".repeat(60)[..], b"f"].concat();
    let make = move || {
        vec![
            Part::Bytes(header(
                EntryType::GNULongName,
                b"././@LongLink",
                path.len() as u64,
            )),
            Part::Bytes(path.clone()),
            pad(path.len() as u64),
            Part::Bytes(header(EntryType::Regular, b"f", 0)),
            Part::Repeat(0, 1024),
        ]
    };
    let want = quoted_name(&[&b"d/".repeat(60)[..], b"f"].concat());
    refused_lazily(
        "implied-dirs",
        make,
        &limits,
        &want,
        "max_entries",
        READ_AHEAD,
    );
}

#[test]
fn more_path_bytes_than_the_limit() {
    let limits = ArchiveLimits {
        max_total_path_bytes: 10_000,
        ..ArchiveLimits::default()
    };
    let make = || {
        let mut parts = Vec::new();
        for i in 0..1000 {
            let name = format!("{i:0>99}");
            parts.push(Part::Bytes(header(EntryType::Regular, name.as_bytes(), 0)));
        }
        parts.push(Part::Repeat(0, 1024));
        parts
    };
    // Each path is kept twice: 198 bytes a file, the 51st is over.
    refused_lazily(
        "path-bytes",
        make,
        &limits,
        &format!("{:0>99}", 50),
        "max_total_path_bytes",
        READ_AHEAD,
    );
}

#[test]
fn pax_records_given_twice() {
    let a = ok()
        .pax(&[("path", b"one"), ("path", b"two")])
        .file(b"short", b"x")
        .finish();
    // Named as its own header names it.
    refused("pax-path-twice", &zst(&a), entry("short"));
    let a = ok()
        .pax(&[("size", b"1"), ("size", b"2")])
        .file(b"short", b"x")
        .finish();
    refused("pax-size-twice", &zst(&a), entry("short"));
}

#[test]
fn pax_sparse_file() {
    let a = ok()
        .pax(&[("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0")])
        .file(b"GNUSparseFile.0/s", &[0; 512])
        .finish();
    refused("pax-sparse", &zst(&a), entry("GNUSparseFile.0/s"));
}

/// A blob store that runs out of room: writes fail with ENOSPC once
/// `room` bytes have been written in all.
struct FullDisk {
    inner: strata_store::blob::memory::MemoryBlobStore,
    room: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

struct FullWriter {
    inner: Box<dyn strata_store::blob::BlobWriter>,
    room: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Write for FullWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self
            .room
            .fetch_sub(buf.len() as i64, std::sync::atomic::Ordering::SeqCst);
        if left < buf.len() as i64 {
            return Err(std::io::Error::from_raw_os_error(libc_enospc()));
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn libc_enospc() -> i32 {
    28 // ENOSPC on Linux
}

impl strata_store::blob::BlobWriter for FullWriter {
    fn finish(self: Box<Self>) -> strata_store::Result<Box<dyn strata_store::blob::StagedBlob>> {
        self.inner.finish()
    }
}

impl strata_store::BlobStore for FullDisk {
    fn writer(&self) -> strata_store::Result<Box<dyn strata_store::blob::BlobWriter>> {
        Ok(Box::new(FullWriter {
            inner: self.inner.writer()?,
            room: self.room.clone(),
        }))
    }
    fn contains(&self, d: &Digest) -> strata_store::Result<bool> {
        self.inner.contains(d)
    }
    fn open(&self, d: &Digest) -> strata_store::Result<Option<Box<dyn strata_store::Blob>>> {
        self.inner.open(d)
    }
    fn file_path(&self, d: &Digest) -> Option<std::path::PathBuf> {
        self.inner.file_path(d)
    }
    fn for_each(
        &self,
        f: &mut dyn FnMut(Digest, u64) -> strata_store::Result<()>,
    ) -> strata_store::Result<()> {
        self.inner.for_each(f)
    }
    fn delete(&self, d: &Digest) -> strata_store::Result<u64> {
        self.inner.delete(d)
    }
    fn sync(&self) -> strata_store::Result<()> {
        self.inner.sync()
    }
    fn put_hashed(&self, d: &Digest, bytes: &[u8]) -> strata_store::Result<bool> {
        self.inner.put_hashed(d, bytes)
    }
}

#[test]
fn disk_full_while_staging() {
    let inner = strata_store::blob::memory::MemoryBlobStore::new();
    let room = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(100_000));
    let store = Store::from_parts(
        std::sync::Arc::new(FullDisk {
            inner: inner.clone(),
            room,
        }),
        std::sync::Arc::new(strata_store::meta::memory::MemoryMetaStore::new()),
    );
    let mut a = ok();
    for i in 0..10 {
        a = a.file(format!("f{i}").as_bytes(), &pseudo_random(30_000, i));
    }
    let a = zst(&a.finish());
    let before = Counts::of(&store);
    match store.import(&mut &a[..], "full", &ImportOptions::default()) {
        Err(Error::ArchiveStaging { archive, source }) => {
            assert_eq!(archive, "full");
            assert_eq!(source.raw_os_error(), Some(28), "{source}");
        }
        Err(e) => panic!("wrong error: {}", chain(&e)),
        Ok(r) => panic!("accepted as {}", r.layer),
    }
    assert_eq!(Counts::of(&store), before, "nothing recorded");
    let mut blobs = 0;
    inner
        .for_each(&mut |_, _| {
            blobs += 1;
            Ok(())
        })
        .unwrap();
    assert_eq!(blobs, 0, "nothing staged was published");
}

// ---------------------------------------------------------------------------
// Positive controls
// ---------------------------------------------------------------------------

#[test]
fn accepts_dot_slash_prefixes_and_implied_directories() {
    let a = RawTar::new()
        .dir(b"./")
        .file(b"./a", b"a")
        .dir(b"./sub/")
        .file(b"./sub/b", b"b")
        .file(b"implied/parents/c", b"c")
        .dir(b"sub") // a directory named twice is fine
        .finish();
    let want = Dir::new()
        .file("a", "a")
        .dir("sub", Dir::new().file("b", "b"))
        .dir(
            "implied",
            Dir::new().dir("parents", Dir::new().file("c", "c")),
        );
    accepted("dot-slash", &zst(&a), &ImportOptions::default(), &want);
}

#[test]
fn accepts_a_hard_link_to_an_earlier_file_as_a_copy() {
    let a = RawTar::new()
        .file(b"f", b"linked bytes")
        .hardlink(b"h", b"f")
        .dir(b"d/")
        .hardlink(b"d/h2", b"./f")
        .finish();
    let want = Dir::new()
        .file("f", "linked bytes")
        .file("h", "linked bytes")
        .dir("d", Dir::new().file("h2", "linked bytes"));
    let (t, layer) = accepted(
        "hardlink-earlier",
        &zst(&a),
        &ImportOptions::default(),
        &want,
    );
    let digest = |p: &str| match t
        .lookup(&layer, &RelPath::parse(p.as_bytes()).unwrap())
        .unwrap()
    {
        Some(Entry::File { digest, .. }) => digest,
        other => panic!("{p}: {other:?}"),
    };
    assert_eq!(
        digest("h"),
        digest("f"),
        "a hard link is a copy with the same digest"
    );
    assert_eq!(digest("d/h2"), digest("f"));
    assert_eq!(t.layer(&layer).unwrap().unwrap().stats.files, 3);
}

#[test]
fn accepts_relative_symlinks_that_stay_inside() {
    let a = RawTar::new()
        .file(b"c", b"c")
        .dir(b"a/")
        .symlink(b"a/b", b"../c")
        .symlink(b"here", b".")
        .symlink(b"a/deep", b"../a/../c")
        .symlink(b"dangling", b"no/such/file")
        .symlink(b"p", b"q") // a loop resolves nowhere, it does not escape
        .symlink(b"q", b"p")
        .finish();
    let want = Dir::new()
        .file("c", "c")
        .dir("a", Dir::new().link("b", "../c").link("deep", "../a/../c"))
        .link("here", ".")
        .link("dangling", "no/such/file")
        .link("p", "q")
        .link("q", "p");
    accepted(
        "symlinks-inside",
        &zst(&a),
        &ImportOptions::default(),
        &want,
    );
}

#[test]
fn accepts_escaping_symlinks_when_allowed() {
    let a = RawTar::new()
        .symlink(b"etc", b"/etc")
        .symlink(b"up", b"../..")
        .finish();
    let want = Dir::new().link("etc", "/etc").link("up", "../..");
    let opts = ImportOptions {
        allow_escaping_symlinks: true,
        ..Default::default()
    };
    accepted("escaping-allowed", &zst(&a), &opts, &want);
}

#[test]
fn accepts_a_pax_size_over_the_header_size_and_the_deepest_path() {
    // The PAX `size` record is the entry's size (the header's is 0 here).
    let deep = [&b"d/".repeat(255)[..], b"f"].concat(); // 256 components
    let a = RawTar::new()
        .pax(&[("size", b"5")])
        .entry_with(EntryType::Regular, b"sized", b"", b"hello", |h| {
            h.set_size(0)
        })
        .file(b"after", b"after")
        .file(&deep, b"deep")
        .finish();
    let mut nested = Dir::new().file("f", "deep");
    for _ in 0..254 {
        nested = Dir::new().dir("d", nested);
    }
    let want = Dir::new()
        .file("sized", "hello")
        .file("after", "after")
        .dir("d", nested);
    accepted("pax-size", &zst(&a), &ImportOptions::default(), &want);
}

#[test]
fn accepts_zero_padding_after_the_end_marker() {
    // GNU tar fills its last 10240-byte record with zeros.
    let mut tar = RawTar::new().file(b"f", b"padded").finish();
    tar.resize(10240, 0);
    let want = Dir::new().file("f", "padded");
    accepted("zero-padding", &zst(&tar), &ImportOptions::default(), &want);
}

#[test]
fn accepts_pax_headers_and_modes() {
    let long = "long/".repeat(30) + "name";
    let a = RawTar::new()
        .pax_of(EntryType::XGlobalHeader, &[("comment", b"made by a test")])
        .pax(&[("mtime", b"1700000000.5"), ("path", long.as_bytes())])
        .file(b"short", b"pax path")
        .entry_with(EntryType::Regular, b"setuid", b"", b"s", |h| {
            h.set_mode(0o4755)
        })
        .entry(EntryType::Continuous, b"contiguous", b"", b"c")
        .finish();
    let mut spec = Dir::new().file("contiguous", "c").exec("setuid", "s");
    // `long/long/…/name`
    let mut nested = Dir::new().file("name", "pax path");
    for _ in 1..30 {
        nested = Dir::new().dir("long", nested);
    }
    spec = spec.dir("long", nested);
    let (t, layer) = accepted("pax-and-modes", &zst(&a), &ImportOptions::default(), &spec);
    let out = t.checkout_new(&layer);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("setuid"))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o755, "no setuid bit survives an import");
}

/// With two bad entries, the refusal names the first in archive order, every
/// time (the same archive gives the same message).
#[test]
fn refusal_names_the_first_bad_entry_in_archive_order() {
    let a = zst(&ok()
        .symlink(b"first", b"/first")
        .symlink(b"second", b"/second")
        .symlink(b"third", b"../third")
        .finish());
    let t = memory();
    let mut named = std::collections::BTreeSet::new();
    for _ in 0..16 {
        match t.import(&mut &a[..], "two-bad", &ImportOptions::default()) {
            Err(Error::BadArchive { entry, .. }) => {
                named.insert(entry);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        named.into_iter().collect::<Vec<_>>(),
        ["first"],
        "the first escaping symlink in archive order, deterministically"
    );
}
