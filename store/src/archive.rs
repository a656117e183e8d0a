//! Export and import of layers as tar + zstd.
//!
//! Export is deterministic: entries in tree order (a directory before its
//! contents), GNU headers, uid/gid 0, the fixed mtime, modes 0755/0644/0777,
//! zstd level 3 single-threaded with a checksum. The same layer gives the same
//! bytes on every machine.
//!
//! Import checks every entry before anything is recorded: blobs are staged and
//! only published once the whole archive has been read and accepted, so a
//! refused archive leaves the store as it was. Headers are read here rather
//! than by the `tar` crate's iterator, so that every size is checked against
//! [`ArchiveLimits`] before the bytes are read.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};

use crate::blob::{BlobReader, StagedBlob};
use crate::builder::TreeBuilder;
use crate::records::{check_ref_name, now_secs};
use crate::{
    Batch, Digest, Entry, Error, Family, LayerStats, Lineage, Name, RelPath, Result, Store, Target,
    FIXED_MTIME,
};

/// zstd level of exported archives: part of what makes them reproducible.
const ZSTD_LEVEL: i32 = 3;
/// Symlink hops followed when checking where a symlink leads.
const MAX_HOPS: usize = 40;
/// Size of a tar header and the unit of tar data.
const BLOCK: usize = 512;
/// Longest part of a name from an archive quoted in an error message.
const QUOTE_MAX: usize = 100;

/// What an export wrote.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ExportReport {
    pub entries: u64,
    /// File bytes written (before compression).
    pub bytes: u64,
}

/// How to import.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Point this ref at the imported layer, in the same write.
    pub ref_name: Option<String>,
    /// Accept absolute symlinks and symlinks leading out of the layer's root
    /// (as in a root filesystem). Off by default.
    pub allow_escaping_symlinks: bool,
}

/// How much an import reads and keeps, at most. Each limit is checked
/// before the bytes it bounds are read or kept, so a hostile archive costs at
/// most about these amounts of memory, disk and time before it is refused.
/// The defaults fit any real layer; raise a limit for a trusted archive that
/// needs more. `docs/FORMAT.md` (Archives) states the same limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveLimits {
    /// Longest entry path or link target in bytes, GNU long names and PAX
    /// `path`/`linkpath` included (Linux `PATH_MAX`). Default 4096.
    pub max_path_bytes: u64,
    /// Most components in one entry path. Default 256.
    pub max_depth: u64,
    /// Largest PAX extended header (`x` or `g`) in bytes. Default 1 MiB.
    pub max_extension_bytes: u64,
    /// Most entries: every header of the archive, extension headers
    /// included, and every directory implied by a deeper path. Default
    /// 1,000,000.
    pub max_entries: u64,
    /// Most bytes of data of all headers together (file contents, extension
    /// headers and any data attached to other entries): what staging may
    /// write to disk. Default 64 GiB.
    pub max_total_bytes: u64,
    /// Most bytes of paths and symlink targets the importer keeps in memory
    /// while it checks the archive (each path counted twice, as it is kept
    /// twice). Default 256 MiB.
    pub max_total_path_bytes: u64,
}

impl Default for ArchiveLimits {
    fn default() -> ArchiveLimits {
        ArchiveLimits {
            max_path_bytes: 4096,
            max_depth: 256,
            max_extension_bytes: 1 << 20,
            max_entries: 1_000_000,
            max_total_bytes: 64 << 30,
            max_total_path_bytes: 256 << 20,
        }
    }
}

/// What an import recorded.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ImportReport {
    pub layer: Digest,
    pub stats: LayerStats,
    pub new_blobs: u64,
}

impl Store {
    /// Writes the layer rooted at `layer` to `out` as a zstd-compressed tar.
    pub fn export(&self, layer: &Digest, out: &mut dyn Write) -> Result<ExportReport> {
        let werr = |e: io::Error| Error::io("write the archive", "<output>")(e);
        let mut enc = zstd::Encoder::new(out, ZSTD_LEVEL).map_err(werr)?;
        enc.include_checksum(true).map_err(werr)?;
        let mut tar = tar::Builder::new(enc);
        let mut report = ExportReport::default();
        self.export_tree(&mut tar, layer, &RelPath::root(), &mut report)?;
        let enc = tar.into_inner().map_err(werr)?;
        enc.finish().map_err(werr)?;
        Ok(report)
    }

    fn export_tree<W: Write>(
        &self,
        tar: &mut tar::Builder<W>,
        tree: &Digest,
        at: &RelPath,
        report: &mut ExportReport,
    ) -> Result<()> {
        let werr = |e: io::Error| Error::io("write the archive", "<output>")(e);
        for (name, entry) in self.tree(tree)?.entries() {
            let path = at.join(name.clone());
            let os_path = path.to_path_buf();
            let mut h = tar::Header::new_gnu();
            h.set_mtime(FIXED_MTIME as u64);
            h.set_uid(0);
            h.set_gid(0);
            report.entries += 1;
            match entry {
                Entry::Dir { digest } => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    tar.append_data(&mut h, &os_path, io::empty())
                        .map_err(werr)?;
                    self.export_tree(tar, digest, &path, report)?;
                }
                Entry::Symlink { target } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    tar.append_link(&mut h, &os_path, target.as_os_str())
                        .map_err(werr)?;
                }
                Entry::File {
                    digest,
                    size,
                    executable,
                } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(if *executable { 0o755 } else { 0o644 });
                    h.set_size(*size);
                    let blob = self.blob(digest)?;
                    if blob.size() != *size {
                        return Err(Error::MissingBlob(*digest));
                    }
                    tar.append_data(&mut h, &os_path, BlobReader::new(&*blob))
                        .map_err(werr)?;
                    report.bytes += size;
                }
            }
        }
        Ok(())
    }

    /// Reads a zstd-compressed tar from `input` and records it as a layer,
    /// within the default [`ArchiveLimits`]; see [`Store::import_limited`].
    pub fn import(
        &self,
        input: &mut dyn Read,
        archive: &str,
        opts: &ImportOptions,
    ) -> Result<ImportReport> {
        self.import_limited(input, archive, opts, &ArchiveLimits::default())
    }

    /// Reads a zstd-compressed tar from `input` and records it as a layer.
    ///
    /// Refuses the whole archive with [`Error::BadArchive`], recording
    /// nothing, when any entry is unsafe or not representable: `..`, absolute
    /// paths, symlinks leading out of the root, devices and FIFOs, hard links
    /// to anything but an earlier file of the archive, duplicate paths, paths
    /// through a file or symlink, names the format forbids, or anything over
    /// one of `limits` (the message names the limit). A stream that is not a
    /// well-formed tar in zstd is [`Error::ArchiveIo`]; a store that cannot
    /// stage the files (a full disk) is [`Error::ArchiveStaging`]. Either way
    /// whatever was staged is removed. `archive` names the input in error
    /// messages; names taken from the archive are quoted at most 100 bytes
    /// long.
    pub fn import_limited(
        &self,
        input: &mut dyn Read,
        archive: &str,
        opts: &ImportOptions,
        limits: &ArchiveLimits,
    ) -> Result<ImportReport> {
        if let Some(name) = &opts.ref_name {
            check_ref_name(name)?;
        }
        self.check_writable()?;
        let _hold = self.hold();
        let refuse = |entry: &[u8], reason: String| Error::BadArchive {
            archive: archive.to_owned(),
            entry: quote(entry),
            reason,
        };
        let ioerr = |source: io::Error| Error::ArchiveIo {
            archive: archive.to_owned(),
            source,
        };
        let broken = |what: &str| ioerr(io::Error::new(io::ErrorKind::InvalidData, what));
        let mut dec = zstd::Decoder::new(input).map_err(ioerr)?;
        // Paths as bytes (`a/b`, no `./`), each kept once in `nodes` and
        // once in `order`: what `max_total_path_bytes` bounds.
        let mut nodes: HashMap<Vec<u8>, Node> = HashMap::new();
        let mut order: Vec<Vec<u8>> = Vec::new();
        // Dropped on any error: that removes every staged file.
        let mut staged: Vec<Box<dyn StagedBlob>> = Vec::new();
        let mut entries: u64 = 0;
        let mut data_bytes: u64 = 0;
        let mut path_bytes: u64 = 0;
        let mut ext = Extensions::default();
        let mut block = [0u8; BLOCK];

        // The tar stream, header by header. The `tar` crate's own iterator
        // reads GNU long names and PAX headers whole before anyone can look
        // at their size, so headers are read here, each size checked first.
        loop {
            if !read_block(&mut dec, &mut block).map_err(ioerr)? || block.iter().all(|b| *b == 0) {
                if ext.any() {
                    return Err(broken(
                        "the archive ends after an extension header, before the entry it describes",
                    ));
                }
                break;
            }
            let header = tar::Header::from_byte_slice(&block);
            if !checksum_matches(header).map_err(ioerr)? {
                return Err(broken("a header's checksum does not match its contents"));
            }
            let et = header.entry_type();
            let own_name = header.path_bytes();
            let header_size = header.entry_size().map_err(ioerr)?;
            entries += 1;
            if entries > limits.max_entries {
                return Err(refuse(&own_name, too_many_entries(limits)));
            }
            let mut count_data = |name: &[u8], size: u64| {
                match data_bytes.checked_add(size) {
                Some(total) if total <= limits.max_total_bytes => {
                    data_bytes = total;
                    Ok(())
                }
                _ => Err(refuse(
                    name,
                    format!(
                        "has {size} bytes of data, which takes the archive over the limit of {} bytes (`ArchiveLimits::max_total_bytes`)",
                        limits.max_total_bytes
                    ),
                )),
            }
            };

            match et {
                tar::EntryType::GNULongName | tar::EntryType::GNULongLink => {
                    let is_name = et == tar::EntryType::GNULongName;
                    // The name and the NUL that ends it.
                    if header_size > limits.max_path_bytes.saturating_add(1) {
                        let head = read_head(&mut dec, header_size).map_err(ioerr)?;
                        return Err(Error::BadArchive {
                            archive: archive.to_owned(),
                            entry: quote_len(&head, header_size),
                            reason: format!(
                                "is a GNU long {} of {header_size} bytes, longer than the limit of {} bytes (`ArchiveLimits::max_path_bytes`)",
                                if is_name { "name" } else { "link target" },
                                limits.max_path_bytes
                            ),
                        });
                    }
                    count_data(&own_name, header_size)?;
                    let slot = if is_name {
                        &mut ext.long_name
                    } else {
                        &mut ext.long_link
                    };
                    if slot.is_some() {
                        return Err(broken("two GNU long-name headers describe the same entry"));
                    }
                    let mut data = read_data(&mut dec, header_size).map_err(ioerr)?;
                    if data.last() == Some(&0) {
                        data.pop();
                    }
                    *slot = Some(data);
                    continue;
                }
                tar::EntryType::XHeader | tar::EntryType::XGlobalHeader => {
                    if header_size > limits.max_extension_bytes {
                        return Err(refuse(
                            &own_name,
                            format!(
                                "is a PAX extended header of {header_size} bytes, larger than the limit of {} bytes (`ArchiveLimits::max_extension_bytes`)",
                                limits.max_extension_bytes
                            ),
                        ));
                    }
                    count_data(&own_name, header_size)?;
                    let data = read_data(&mut dec, header_size).map_err(ioerr)?;
                    if et == tar::EntryType::XGlobalHeader {
                        continue; // Archive-wide metadata (e.g. a commit id): nothing to store.
                    }
                    if ext.pax.is_some() {
                        return Err(broken("two PAX extended headers describe the same entry"));
                    }
                    ext.pax = Some(data);
                    continue;
                }
                _ => {}
            }

            let ext = std::mem::take(&mut ext);
            let pax = match &ext.pax {
                Some(data) => Pax::parse(data).map_err(|reason| refuse(&own_name, reason))?,
                None => Pax::default(),
            };
            let raw: &[u8] = match (&ext.long_name, pax.path) {
                (Some(long), _) => long,
                (None, Some(path)) => path,
                (None, None) => &own_name,
            };
            if raw.len() as u64 > limits.max_path_bytes {
                return Err(refuse(
                    raw,
                    format!(
                        "has a path of {} bytes, longer than the limit of {} bytes (`ArchiveLimits::max_path_bytes`)",
                        raw.len(),
                        limits.max_path_bytes
                    ),
                ));
            }
            let size = pax.size.unwrap_or(header_size);
            count_data(raw, size)?;
            let path = match entry_path(raw) {
                Ok(Some(p)) => p,
                Ok(None) if et.is_dir() => {
                    skip_data(&mut dec, size).map_err(ioerr)?;
                    continue; // "./": the root itself.
                }
                Ok(None) => {
                    return Err(refuse(raw, "names the root but is not a directory".into()))
                }
                Err(reason) => return Err(refuse(raw, reason)),
            };
            let depth = path.components().len() as u64;
            if depth > limits.max_depth {
                return Err(refuse(
                    raw,
                    format!(
                        "has a path of {depth} components, deeper than the limit of {} (`ArchiveLimits::max_depth`)",
                        limits.max_depth
                    ),
                ));
            }
            let key = path.to_bytes();
            let mut keep = |bytes: usize| {
                match path_bytes.checked_add(bytes as u64) {
                Some(total) if total <= limits.max_total_path_bytes => {
                    path_bytes = total;
                    Ok(())
                }
                _ => Err(refuse(
                    raw,
                    format!(
                        "takes the paths and link targets of the archive over the limit of {} bytes (`ArchiveLimits::max_total_path_bytes`)",
                        limits.max_total_path_bytes
                    ),
                )),
            }
            };
            // Every ancestor must be (or become) a directory. A known path's
            // ancestors are all known directories, so the walk up stops at
            // the first known one.
            let mut missing = Vec::new();
            let mut end = key.len();
            while let Some(slash) = key[..end].iter().rposition(|b| *b == b'/') {
                match nodes.get(&key[..slash]) {
                    Some(Node::Dir) => break,
                    Some(other) => {
                        return Err(refuse(
                            raw,
                            format!(
                                "lies inside `{}`, which is a {}",
                                quote(&key[..slash]),
                                other.what()
                            ),
                        ))
                    }
                    None => missing.push(slash),
                }
                end = slash;
            }
            for slash in missing.into_iter().rev() {
                entries += 1;
                if entries > limits.max_entries {
                    return Err(refuse(raw, too_many_entries(limits)));
                }
                keep(2 * slash)?;
                nodes.insert(key[..slash].to_vec(), Node::Dir);
                order.push(key[..slash].to_vec());
            }
            if let Some(existing) = nodes.get(&key) {
                if !(et.is_dir() && matches!(existing, Node::Dir)) {
                    return Err(refuse(
                        raw,
                        format!("appears twice (first as a {})", existing.what()),
                    ));
                }
                skip_data(&mut dec, size).map_err(ioerr)?;
                continue;
            }
            if pax.sparse {
                return Err(refuse(
                    raw,
                    "is a sparse file, which is not supported".into(),
                ));
            }
            let link: Option<&[u8]> = match (&ext.long_link, pax.linkpath) {
                (Some(long), _) => Some(long),
                (None, Some(path)) => Some(path),
                (None, None) => None,
            };
            let link = link
                .map(Cow::Borrowed)
                .or_else(|| header.link_name_bytes())
                .unwrap_or_default();
            if link.len() as u64 > limits.max_path_bytes {
                return Err(refuse(
                    raw,
                    format!(
                        "has a link target of {} bytes, longer than the limit of {} bytes (`ArchiveLimits::max_path_bytes`)",
                        link.len(),
                        limits.max_path_bytes
                    ),
                ));
            }
            keep(2 * key.len())?;
            let mode = header.mode().map_err(ioerr)?;
            let node = match et {
                tar::EntryType::Directory => Node::Dir,
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let blob = self.stage_file(&mut dec, size, archive)?;
                    let file = Entry::File {
                        digest: blob.digest(),
                        size: blob.size(),
                        executable: mode & 0o100 != 0,
                    };
                    staged.push(blob);
                    Node::File(file)
                }
                tar::EntryType::Symlink => {
                    let target = Target::new(link.into_owned()).map_err(|e| match e {
                        Error::BadName { reason, .. } => refuse(
                            raw,
                            format!("is a symlink whose target is invalid: {reason}"),
                        ),
                        other => other,
                    })?;
                    keep(target.as_bytes().len())?;
                    Node::Symlink(target)
                }
                tar::EntryType::Link => {
                    let target = match entry_path(&link) {
                        Ok(Some(p)) => p.to_bytes(),
                        _ => {
                            return Err(refuse(
                                raw,
                                format!(
                                "is a hard link to `{}`, which is not a path inside the archive",
                                quote(&link)
                            ),
                            ))
                        }
                    };
                    match nodes.get(&target) {
                        Some(Node::File(f)) => Node::File(f.clone()),
                        _ => {
                            return Err(refuse(
                                raw,
                                format!(
                                    "is a hard link to `{}`, which is not an earlier file of the archive",
                                    quote(&target)
                                ),
                            ))
                        }
                    }
                }
                tar::EntryType::Char => return Err(refuse(raw, "is a character device".into())),
                tar::EntryType::Block => return Err(refuse(raw, "is a block device".into())),
                tar::EntryType::Fifo => return Err(refuse(raw, "is a FIFO".into())),
                tar::EntryType::GNUSparse => {
                    return Err(refuse(
                        raw,
                        "is a sparse file, which is not supported".into(),
                    ))
                }
                other => {
                    return Err(refuse(
                        raw,
                        format!(
                            "has the unsupported entry type `{}`",
                            quote(&[other.as_byte()])
                        ),
                    ))
                }
            };
            if !matches!(node, Node::File(_)) || et == tar::EntryType::Link {
                skip_data(&mut dec, size).map_err(ioerr)?;
            }
            nodes.insert(key.clone(), node);
            order.push(key);
        }

        // Read to the end: that checks the zstd checksum, and refuses data after
        // the end of the tar (zero padding is normal; anything else is not).
        let mut buf = [0u8; 8192];
        loop {
            let n = dec.read(&mut buf).map_err(ioerr)?;
            if n == 0 {
                break;
            }
            if buf[..n].iter().any(|b| *b != 0) {
                return Err(refuse(
                    b"(end of archive)",
                    "is followed by data that is not part of the tar stream".into(),
                ));
            }
        }

        if !opts.allow_escaping_symlinks {
            for path in &order {
                if let Some(Node::Symlink(t)) = nodes.get(path) {
                    if escapes(&nodes, path, t) {
                        return Err(refuse(
                            path,
                            format!(
                                "is a symlink to `{}`, which leads outside the archive's root",
                                quote(t.as_bytes())
                            ),
                        ));
                    }
                }
            }
        }

        let mut builder = TreeBuilder::new();
        for path in &order {
            match &nodes[path] {
                Node::Dir => builder.add_dir(&RelPath::parse(path)?),
                Node::File(e) => builder.add(&RelPath::parse(path)?, e.clone())?,
                Node::Symlink(target) => builder.add(
                    &RelPath::parse(path)?,
                    Entry::Symlink {
                        target: target.clone(),
                    },
                )?,
            }
        }
        drop(nodes);
        drop(order);
        // Accepted: publish the blobs, make them durable, then record.
        let mut new_blobs = 0;
        for blob in staged {
            if !self.blobs.contains(&blob.digest())? {
                new_blobs += 1;
            }
            blob.publish()?;
        }
        if new_blobs > 0 {
            self.blobs.sync()?;
        }
        let stats = builder.stats();
        let mut batch = Batch::new();
        let layer = builder.finish(self, &mut batch)?;
        let lineage = Lineage {
            how: "import".into(),
            created: now_secs(),
            ..Lineage::default()
        };
        self.stage_layer(&mut batch, &layer, stats, Some(&lineage))?;
        if let Some(name) = &opts.ref_name {
            batch.put(
                Family::Refs,
                name.as_bytes().to_vec(),
                layer.as_bytes().to_vec(),
            );
        }
        self.meta.write(batch)?;
        self.meta.sync()?;
        Ok(ImportReport {
            layer,
            stats,
            new_blobs,
        })
    }

    /// Copies the `size` bytes of one file (and the padding after them) from
    /// the tar stream into a staged blob. A read that fails is the archive's
    /// fault ([`Error::ArchiveIo`]); a write that fails (a full disk) is the
    /// store's ([`Error::ArchiveStaging`]). On either, the partial blob is
    /// removed.
    fn stage_file(
        &self,
        r: &mut impl Read,
        size: u64,
        archive: &str,
    ) -> Result<Box<dyn StagedBlob>> {
        let mut w = self.blobs.writer()?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = size;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = match r.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(Error::ArchiveIo {
                        archive: archive.to_owned(),
                        source: io::ErrorKind::UnexpectedEof.into(),
                    })
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::ArchiveIo {
                        archive: archive.to_owned(),
                        source,
                    })
                }
            };
            w.write_all(&buf[..n])
                .map_err(|source| Error::ArchiveStaging {
                    archive: archive.to_owned(),
                    source,
                })?;
            left -= n as u64;
        }
        w.flush().map_err(|source| Error::ArchiveStaging {
            archive: archive.to_owned(),
            source,
        })?;
        skip(r, padding(size)).map_err(|source| Error::ArchiveIo {
            archive: archive.to_owned(),
            source,
        })?;
        w.finish()
    }
}

/// Extension headers read so far for the next entry.
#[derive(Default)]
struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

impl Extensions {
    fn any(&self) -> bool {
        self.long_name.is_some() || self.long_link.is_some() || self.pax.is_some()
    }
}

/// The records of a PAX extended header that change what an entry is.
#[derive(Default)]
struct Pax<'a> {
    path: Option<&'a [u8]>,
    linkpath: Option<&'a [u8]>,
    size: Option<u64>,
    /// A `GNU.sparse.*` record: the entry's data is a sparse map.
    sparse: bool,
}

impl<'a> Pax<'a> {
    /// Refuses malformed records and a record given twice (two readers could
    /// otherwise disagree on which one counts).
    fn parse(data: &'a [u8]) -> std::result::Result<Pax<'a>, String> {
        let mut pax = Pax::default();
        for record in tar::PaxExtensions::new(data) {
            let record = record.map_err(|_| "has a malformed PAX extended header".to_string())?;
            let key = record.key_bytes();
            let value = record.value_bytes();
            let twice = || format!("has the PAX record `{}` twice", quote(key));
            // The guards record the value; they match only on a repeat.
            match key {
                b"path" if pax.path.replace(value).is_some() => return Err(twice()),
                b"linkpath" if pax.linkpath.replace(value).is_some() => return Err(twice()),
                b"size" => {
                    let size = std::str::from_utf8(value)
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                        .ok_or_else(|| format!("has the invalid PAX size `{}`", quote(value)))?;
                    if pax.size.replace(size).is_some() {
                        return Err(twice());
                    }
                }
                k if k.starts_with(b"GNU.sparse.") => pax.sparse = true,
                _ => {}
            }
        }
        Ok(pax)
    }
}

fn too_many_entries(limits: &ArchiveLimits) -> String {
    format!(
        "takes the archive over the limit of {} entries (`ArchiveLimits::max_entries`, which counts extension headers and implied directories)",
        limits.max_entries
    )
}

/// How a name from an archive appears in messages: whole up to 100 bytes,
/// else its first 100 bytes and its length, so that a hostile name cannot
/// make a message large.
fn quote(bytes: &[u8]) -> String {
    quote_len(bytes, bytes.len() as u64)
}

/// [`quote`] for a name of `len` bytes of which only `head` was read.
fn quote_len(head: &[u8], len: u64) -> String {
    if len <= QUOTE_MAX as u64 && head.len() as u64 == len {
        String::from_utf8_lossy(head).into_owned()
    } else {
        let head = &head[..head.len().min(QUOTE_MAX)];
        format!("{}… ({len} bytes)", String::from_utf8_lossy(head))
    }
}

/// Whether a header's stored checksum matches its bytes (the checksum field
/// counted as spaces).
fn checksum_matches(header: &tar::Header) -> io::Result<bool> {
    let bytes = header.as_bytes();
    let sum: u32 = bytes[..148]
        .iter()
        .chain(&bytes[156..])
        .map(|b| u32::from(*b))
        .sum::<u32>()
        + 8 * u32::from(b' ');
    Ok(header.cksum()? == sum)
}

/// Reads one header block; `false` at the end of the input.
fn read_block(r: &mut impl Read, block: &mut [u8; BLOCK]) -> io::Result<bool> {
    let mut n = 0;
    while n < BLOCK {
        match r.read(&mut block[n..]) {
            Ok(0) if n == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Bytes after `size` bytes of data, up to the next header.
fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn skip(r: &mut impl Read, n: u64) -> io::Result<()> {
    if io::copy(&mut r.take(n), &mut io::sink())? < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Skips an entry's data and its padding.
fn skip_data(r: &mut impl Read, size: u64) -> io::Result<()> {
    skip(r, size)?;
    skip(r, padding(size))
}

/// Reads an extension header's data (the caller has checked `size` against
/// its limit) and skips the padding.
fn read_data(r: &mut impl Read, size: u64) -> io::Result<Vec<u8>> {
    let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    r.take(size).read_to_end(&mut data)?;
    if (data.len() as u64) < size {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    skip(r, padding(size))?;
    Ok(data)
}

/// The first bytes of a name too long to read, for the message.
fn read_head(r: &mut impl Read, size: u64) -> io::Result<Vec<u8>> {
    let mut head = Vec::new();
    r.take(size.min(QUOTE_MAX as u64)).read_to_end(&mut head)?;
    Ok(head)
}

enum Node {
    Dir,
    File(Entry),
    Symlink(Target),
}

impl Node {
    fn what(&self) -> &'static str {
        match self {
            Node::Dir => "directory",
            Node::File(_) => "file",
            Node::Symlink(_) => "symlink",
        }
    }
}

/// Checks an entry path. `Ok(None)` for the root (`.`, `./`). A leading `./`
/// and one trailing `/` are accepted; anything else that is not a plain
/// relative path of valid names is refused with the reason.
fn entry_path(raw: &[u8]) -> std::result::Result<Option<RelPath>, String> {
    if raw.is_empty() {
        return Err("has an empty path".into());
    }
    if raw[0] == b'/' {
        return Err("has an absolute path".into());
    }
    let mut s = raw;
    if let Some(rest) = s.strip_prefix(b"./") {
        s = rest;
    } else if s == b"." {
        return Ok(None);
    }
    if let Some(rest) = s.strip_suffix(b"/") {
        s = rest;
    }
    if s.is_empty() {
        return Ok(None);
    }
    let mut names = Vec::new();
    for part in s.split(|b| *b == b'/') {
        if part == b".." {
            return Err("contains `..`".into());
        }
        if part.is_empty() {
            return Err("contains an empty path component (`//`)".into());
        }
        if part == b"." {
            return Err("contains a `.` component".into());
        }
        names.push(Name::new(part).map_err(|e| match e {
            Error::BadName { reason, .. } => format!("has an invalid name: {reason}"),
            other => other.to_string(),
        })?);
    }
    Ok(Some(RelPath::from_names(names)))
}

/// Whether the symlink at `link` with `target` leads outside the root,
/// following the archive's own symlinks on the way (as a kernel would inside
/// a chroot, except that `..` at the root is an escape, not the root).
fn escapes(nodes: &HashMap<Vec<u8>, Node>, link: &[u8], target: &Target) -> bool {
    // The directory reached so far, as a key of `nodes` (`a/b`).
    let mut cur: Vec<u8> = match link.iter().rposition(|b| *b == b'/') {
        Some(slash) => link[..slash].to_vec(),
        None => Vec::new(),
    };
    let mut todo: VecDeque<Vec<u8>> = VecDeque::new();
    let push_front = |todo: &mut VecDeque<Vec<u8>>, t: &[u8]| {
        for part in t.split(|b| *b == b'/').rev() {
            todo.push_front(part.to_vec());
        }
    };
    if target.as_bytes().starts_with(b"/") {
        return true;
    }
    push_front(&mut todo, target.as_bytes());
    let mut hops = 0;
    while let Some(part) = todo.pop_front() {
        match part.as_slice() {
            b"" | b"." => {}
            b".." => {
                if cur.is_empty() {
                    return true;
                }
                let parent = cur.iter().rposition(|b| *b == b'/').unwrap_or(0);
                cur.truncate(parent);
            }
            name => {
                if Name::new(name).is_err() {
                    return true;
                }
                let before = cur.len();
                if !cur.is_empty() {
                    cur.push(b'/');
                }
                cur.extend_from_slice(name);
                if let Some(Node::Symlink(t)) = nodes.get(&cur) {
                    hops += 1;
                    if hops > MAX_HOPS {
                        return false; // A loop: the kernel stops it with ELOOP.
                    }
                    cur.truncate(before);
                    if t.as_bytes().starts_with(b"/") {
                        return true;
                    }
                    push_front(&mut todo, t.as_bytes());
                }
            }
        }
    }
    false
}
