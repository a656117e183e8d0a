//! Export and import of layers as tar + zstd.
//!
//! Export is deterministic: entries in tree order (a directory before its
//! contents), GNU headers, uid/gid 0, the fixed mtime, modes 0755/0644/0777,
//! zstd level 3 single-threaded with a checksum. The same layer gives the same
//! bytes on every machine.
//!
//! Import checks every entry before anything is recorded: blobs are staged and
//! only published once the whole archive has been read and accepted, so a
//! refused archive leaves the store as it was.

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

    /// Reads a zstd-compressed tar from `input` and records it as a layer.
    ///
    /// Refuses the whole archive, recording nothing, when any entry is unsafe
    /// or not representable: `..`, absolute paths, symlinks leading out of the
    /// root, devices and FIFOs, hard links to anything but an earlier file of
    /// the archive, duplicate paths, paths through a file or symlink, and names
    /// the format forbids. `archive` names the input in error messages.
    pub fn import(
        &self,
        input: &mut dyn Read,
        archive: &str,
        opts: &ImportOptions,
    ) -> Result<ImportReport> {
        if let Some(name) = &opts.ref_name {
            check_ref_name(name)?;
        }
        self.check_writable()?;
        let _hold = self.hold();
        let refuse = |entry: &[u8], reason: String| Error::BadArchive {
            archive: archive.to_owned(),
            entry: String::from_utf8_lossy(entry).into_owned(),
            reason,
        };
        let ioerr = |source: io::Error| Error::ArchiveIo {
            archive: archive.to_owned(),
            source,
        };
        let dec = zstd::Decoder::new(input).map_err(ioerr)?;
        let mut ar = tar::Archive::new(dec);
        let mut nodes: HashMap<RelPath, Node> = HashMap::new();
        let mut order: Vec<RelPath> = Vec::new();
        let mut staged: Vec<Box<dyn StagedBlob>> = Vec::new();

        for entry in ar.entries().map_err(ioerr)? {
            let mut entry = entry.map_err(ioerr)?;
            let raw = entry.path_bytes().into_owned();
            let et = entry.header().entry_type();
            if et == tar::EntryType::XGlobalHeader {
                continue; // Archive-wide metadata (e.g. a commit id): nothing to store.
            }
            let path = match entry_path(&raw) {
                Ok(Some(p)) => p,
                Ok(None) if et.is_dir() => continue, // "./": the root itself.
                Ok(None) => {
                    return Err(refuse(&raw, "names the root but is not a directory".into()))
                }
                Err(reason) => return Err(refuse(&raw, reason)),
            };
            // Every ancestor must be (or become) a directory.
            let mut anc = path.parent();
            let mut ancestors = Vec::new();
            while let Some(a) = anc {
                if a.is_root() {
                    break;
                }
                ancestors.push(a.clone());
                anc = a.parent();
            }
            for a in ancestors.iter().rev() {
                match nodes.get(a) {
                    Some(Node::Dir) => {}
                    Some(other) => {
                        return Err(refuse(
                            &raw,
                            format!("lies inside `{a}`, which is a {}", other.what()),
                        ))
                    }
                    None => {
                        nodes.insert(a.clone(), Node::Dir);
                        order.push(a.clone());
                    }
                }
            }
            if let Some(existing) = nodes.get(&path) {
                if !(et.is_dir() && matches!(existing, Node::Dir)) {
                    return Err(refuse(
                        &raw,
                        format!("appears twice (first as a {})", existing.what()),
                    ));
                }
                continue;
            }
            let mode = entry.header().mode().map_err(ioerr)?;
            let node = match et {
                tar::EntryType::Directory => Node::Dir,
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let mut w = self.blobs.writer()?;
                    io::copy(&mut entry, &mut w).map_err(ioerr)?;
                    let blob = w.finish()?;
                    let file = Entry::File {
                        digest: blob.digest(),
                        size: blob.size(),
                        executable: mode & 0o100 != 0,
                    };
                    staged.push(blob);
                    Node::File(file)
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .unwrap_or_default();
                    let target = Target::new(target).map_err(|e| match e {
                        Error::BadName { reason, .. } => refuse(
                            &raw,
                            format!("is a symlink whose target is invalid: {reason}"),
                        ),
                        other => other,
                    })?;
                    Node::Symlink(target)
                }
                tar::EntryType::Link => {
                    let target = entry
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .unwrap_or_default();
                    let target_path = match entry_path(&target) {
                        Ok(Some(p)) => p,
                        _ => {
                            return Err(refuse(
                                &raw,
                                format!(
                                "is a hard link to `{}`, which is not a path inside the archive",
                                String::from_utf8_lossy(&target)
                            ),
                            ))
                        }
                    };
                    match nodes.get(&target_path) {
                        Some(Node::File(f)) => Node::File(f.clone()),
                        _ => {
                            return Err(refuse(
                                &raw,
                                format!("is a hard link to `{target_path}`, which is not an earlier file of the archive"),
                            ))
                        }
                    }
                }
                tar::EntryType::Char => return Err(refuse(&raw, "is a character device".into())),
                tar::EntryType::Block => return Err(refuse(&raw, "is a block device".into())),
                tar::EntryType::Fifo => return Err(refuse(&raw, "is a FIFO".into())),
                tar::EntryType::GNUSparse => {
                    return Err(refuse(
                        &raw,
                        "is a sparse file, which is not supported".into(),
                    ))
                }
                other => {
                    return Err(refuse(
                        &raw,
                        format!(
                            "has the unsupported entry type `{}`",
                            other.as_byte() as char
                        ),
                    ))
                }
            };
            nodes.insert(path.clone(), node);
            order.push(path);
        }

        // Read to the end: that checks the zstd checksum, and refuses data after
        // the end of the tar (zero padding is normal; anything else is not).
        let mut rest = ar.into_inner();
        let mut buf = [0u8; 8192];
        loop {
            let n = rest.read(&mut buf).map_err(ioerr)?;
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
                            &path.to_bytes(),
                            format!(
                                "is a symlink to `{t}`, which leads outside the archive's root"
                            ),
                        ));
                    }
                }
            }
        }

        let mut builder = TreeBuilder::new();
        for path in &order {
            match &nodes[path] {
                Node::Dir => builder.add_dir(path),
                Node::File(e) => builder.add(path, e.clone())?,
                Node::Symlink(target) => builder.add(
                    path,
                    Entry::Symlink {
                        target: target.clone(),
                    },
                )?,
            }
        }
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
fn escapes(nodes: &HashMap<RelPath, Node>, link: &RelPath, target: &Target) -> bool {
    let mut cur: Vec<Name> = link
        .parent()
        .map(|p| p.components().to_vec())
        .unwrap_or_default();
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
                if cur.pop().is_none() {
                    return true;
                }
            }
            name => {
                let Ok(name) = Name::new(name) else {
                    return true;
                };
                cur.push(name);
                if let Some(Node::Symlink(t)) = nodes.get(&RelPath::from_names(cur.clone())) {
                    hops += 1;
                    if hops > MAX_HOPS {
                        return false; // A loop: the kernel stops it with ELOOP.
                    }
                    cur.pop();
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
