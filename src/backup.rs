//! Backups of a data dir, their restore, and a user's own data export.
//!
//! An archive is a `.tar.gz` of
//! - `store.json`: every tree of the store at one point in time ([`Store::snapshot`]: no
//!   write runs while it is copied), keys and values in base64;
//! - `files/…`: every file of the data dir except the store itself, `tmp/` and `cache/` (the
//!   Hugging Face download cache): datasets, task folders, trained and exported models, the
//!   JWT secret. They are read after the snapshot, as they are at that moment: a file a
//!   running task is writing (its log, a checkpoint) may be caught mid-write;
//! - `manifest.json` (last): format and schema versions, the counts per tree, and the size and
//!   SHA-256 of `store.json` and of every file, which a restore checks before it writes
//!   anything.
//!
//! Base models (the models dir) are not in it: they are pulled again. Records keep absolute
//! paths; a restore into another data dir rewrites every path under the old data dir to the
//! new one. Tasks that were running come back without their worker's process id, so the
//! server's start-up recovery marks them failed (`interrupted`, resumable from their last
//! checkpoint) instead of attaching to a process that is not theirs.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::store::{SCHEMA_VERSION, Snapshot, Store};

/// The archive layout this build writes (and the newest it reads).
pub const FORMAT_VERSION: u32 = 1;
const MANIFEST: &str = "manifest.json";
const STORE: &str = "store.json";
const FILES: &str = "files/";
/// Top-level entries of the data dir a backup leaves out: the store (copied from its
/// snapshot), temporary files, the Hugging Face download cache.
const SKIPPED: &[&str] = &["store", "tmp", "cache"];

/// What an archive holds; written last into it, checked first by a restore.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    pub ferrotune_version: String,
    /// The store's schema version.
    pub schema_version: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The data dir backed up (absolute): paths under it are rewritten at restore.
    pub data_dir: String,
    /// Taken from a running server.
    pub online: bool,
    /// Records per store tree.
    pub counts: BTreeMap<String, usize>,
    /// `store.json`.
    pub store: FileEntry,
    /// Every file under `files/`, by its path relative to the data dir.
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// Records in every tree together.
    pub fn records(&self) -> usize {
        self.counts.values().sum()
    }

    /// Bytes of every file together.
    pub fn file_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// `store.json`: tree name → `[key, value]` pairs, base64.
#[derive(Serialize, Deserialize)]
struct StoreDoc {
    trees: BTreeMap<String, Vec<[String; 2]>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---- writing ------------------------------------------------------------------------------

/// A reader that yields exactly `left` bytes of `inner` (zeros after an early end: a file
/// that shrank while it was copied) and hashes what it yields.
struct Exact<R> {
    inner: R,
    left: u64,
    hasher: Sha256,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(self.left as usize);
        let mut n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            buf[..want].fill(0);
            n = want;
        }
        self.hasher.update(&buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

fn header(size: u64, mode: u32, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(mtime);
    h
}

/// The data dir's files a backup takes, by path relative to it, sorted; `skip` (the
/// archive being written, when it is inside) is left out. Symbolic links are not followed.
fn data_files(data_dir: &Path, skip: Option<&Path>) -> anyhow::Result<Vec<(String, PathBuf)>> {
    fn walk(
        dir: &Path,
        rel: &str,
        skip: Option<&Path>,
        out: &mut Vec<(String, PathBuf)>,
    ) -> anyhow::Result<()> {
        let mut entries: Vec<_> = match std::fs::read_dir(dir) {
            Ok(d) => d.collect::<io::Result<_>>()?,
            // A folder removed meanwhile (a task deleted): nothing to copy.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                tracing::warn!(path = %entry.path().display(), "backup: a name that is not UTF-8 is left out");
                continue;
            };
            if rel.is_empty() && SKIPPED.contains(&name.as_str()) {
                continue;
            }
            let path = entry.path();
            if skip.is_some_and(|s| s == path) {
                continue;
            }
            let rel = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let kind = entry.file_type()?;
            if kind.is_dir() {
                walk(&path, &rel, skip, out)?;
            } else if kind.is_file() {
                out.push((rel, path));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(data_dir, "", skip, &mut out)?;
    Ok(out)
}

/// Writes the archive of `snapshot` and `data_dir`'s files to `out`. Blocking.
pub fn write_archive<W: Write>(
    snapshot: &Snapshot,
    data_dir: &Path,
    online: bool,
    skip: Option<&Path>,
    out: W,
) -> anyhow::Result<Manifest> {
    let created_at = OffsetDateTime::now_utc();
    let mtime = created_at.unix_timestamp().max(0) as u64;
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);

    let doc = StoreDoc {
        trees: snapshot
            .trees
            .iter()
            .map(|(name, entries)| {
                let pairs = entries
                    .iter()
                    .map(|(k, v)| [B64.encode(k), B64.encode(v)])
                    .collect();
                (name.clone(), pairs)
            })
            .collect(),
    };
    let store_json = serde_json::to_vec(&doc)?;
    let store = FileEntry {
        path: STORE.into(),
        size: store_json.len() as u64,
        sha256: hex(&Sha256::digest(&store_json)),
    };
    tar.append_data(
        &mut header(store.size, 0o600, mtime),
        STORE,
        store_json.as_slice(),
    )?;

    let mut files = Vec::new();
    for (rel, path) in data_files(data_dir, skip)? {
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            // Removed since the walk (a temporary file of a running task): not part of it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let meta = file.metadata()?;
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            meta.permissions().mode() & 0o777
        };
        let size = meta.len();
        let mut reader = Exact {
            inner: io::BufReader::new(file),
            left: size,
            hasher: Sha256::new(),
        };
        tar.append_data(
            &mut header(size, mode, mtime),
            format!("{FILES}{rel}"),
            &mut reader,
        )
        .with_context(|| format!("archiving {}", path.display()))?;
        files.push(FileEntry {
            path: rel,
            size,
            sha256: hex(&reader.hasher.finalize()),
        });
    }

    let schema_version = snapshot
        .trees
        .get("meta")
        .and_then(|m| m.iter().find(|(k, _)| k.as_slice() == b"schema_version"))
        .and_then(|(_, v)| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(SCHEMA_VERSION);
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        ferrotune_version: env!("CARGO_PKG_VERSION").into(),
        schema_version,
        created_at,
        data_dir: data_dir.to_string_lossy().into_owned(),
        online,
        counts: snapshot.counts(),
        store,
        files,
    };
    let manifest_json = serde_json::to_vec_pretty(&manifest)?;
    tar.append_data(
        &mut header(manifest_json.len() as u64, 0o644, mtime),
        MANIFEST,
        manifest_json.as_slice(),
    )?;
    let mut out = tar.into_inner()?.finish()?;
    out.flush()?;
    Ok(manifest)
}

/// Backs `store` and `data_dir` up into the file `to` (written beside it first, then renamed
/// into place, so `to` is whole or untouched).
pub async fn backup_to_file(
    store: &Store,
    data_dir: &Path,
    online: bool,
    to: &Path,
) -> anyhow::Result<Manifest> {
    let to = std::path::absolute(to)?;
    let snapshot = store.snapshot().await?;
    let data_dir = data_dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let parent = to.parent().unwrap_or(Path::new("/"));
        let tmp = tempfile::Builder::new()
            .prefix(".ferrotune-backup-")
            .tempfile_in(parent)
            .with_context(|| format!("creating a file in {}", parent.display()))?;
        let out = io::BufWriter::with_capacity(1 << 20, tmp.as_file());
        let manifest = write_archive(&snapshot, &data_dir, online, Some(tmp.path()), out)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&to)
            .with_context(|| format!("writing {}", to.display()))?;
        Ok(manifest)
    })
    .await?
}

/// A blocking writer whose bytes go, in chunks, to an async receiver (a response body).
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs `write` on the blocking pool into a channel of chunks for a response body. An error
/// ends the stream with that error (the client sees a broken transfer, never a whole-looking
/// archive).
fn stream_blocking<F>(what: &'static str, write: F) -> mpsc::Receiver<io::Result<Bytes>>
where
    F: FnOnce(&mut dyn Write) -> anyhow::Result<()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::task::spawn_blocking(move || {
        let mut out = io::BufWriter::with_capacity(256 * 1024, ChannelWriter { tx: tx.clone() });
        let result = write(&mut out).and_then(|()| Ok(out.flush()?));
        if let Err(e) = result {
            tracing::error!(error = %format!("{e:#}"), "{what} failed while streaming");
            let _ = tx.blocking_send(Err(io::Error::other(format!("{what} failed: {e:#}"))));
        }
    });
    rx
}

// ---- reading and restoring ----------------------------------------------------------------

/// A relative path of the archive's `files/`, checked to stay inside the data dir.
fn safe_relative(rel: &str) -> anyhow::Result<PathBuf> {
    let path = Path::new(rel);
    let ok = !rel.is_empty()
        && path.components().all(|c| matches!(c, Component::Normal(_)))
        && !SKIPPED.contains(
            &path
                .components()
                .next()
                .map_or("", |c| c.as_os_str().to_str().unwrap_or("")),
        );
    if !ok {
        bail!("the archive holds a file at an unsafe path: {rel}");
    }
    Ok(path.to_path_buf())
}

/// What reading an archive found, checked against its manifest.
struct Read_ {
    manifest: Manifest,
    snapshot: Snapshot,
}

/// Reads an archive, writing its files under `into` (when given), and checks every file and
/// the store against the manifest. Blocking.
fn read_archive(archive: &Path, into: Option<&Path>) -> anyhow::Result<Read_> {
    let file =
        std::fs::File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let gz = flate2::read::GzDecoder::new(io::BufReader::with_capacity(1 << 20, file));
    let mut tar = tar::Archive::new(gz);
    let mut manifest: Option<Vec<u8>> = None;
    let mut store: Option<(Vec<u8>, FileEntry)> = None;
    let mut found: BTreeMap<String, FileEntry> = BTreeMap::new();
    let damaged = |e: io::Error| anyhow::anyhow!("the archive is damaged or not a backup: {e}");
    for entry in tar.entries().map_err(damaged)? {
        let mut entry = entry.map_err(damaged)?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            bail!("the archive holds something other than files: not a ferrotune backup");
        }
        let name = entry
            .path()
            .map_err(damaged)?
            .to_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("the archive holds a name that is not UTF-8"))?;
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        if name == MANIFEST {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(damaged)?;
            manifest = Some(bytes);
        } else if name == STORE {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(damaged)?;
            let e = FileEntry {
                path: STORE.into(),
                size: bytes.len() as u64,
                sha256: hex(&Sha256::digest(&bytes)),
            };
            store = Some((bytes, e));
        } else if let Some(rel) = name.strip_prefix(FILES) {
            let rel_path = safe_relative(rel)?;
            if found.contains_key(rel) {
                bail!("the archive holds {rel} twice");
            }
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut buf = vec![0u8; 1 << 16];
            let mut out = match into {
                Some(dir) => {
                    let path = dir.join(&rel_path);
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    let f = std::fs::File::create(&path)
                        .with_context(|| format!("writing {}", path.display()))?;
                    {
                        use std::os::unix::fs::PermissionsExt;
                        f.set_permissions(std::fs::Permissions::from_mode(mode | 0o600))?;
                    }
                    Some(io::BufWriter::with_capacity(1 << 20, f))
                }
                None => None,
            };
            loop {
                let n = entry.read(&mut buf).map_err(damaged)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                size += n as u64;
                if let Some(out) = out.as_mut() {
                    out.write_all(&buf[..n])?;
                }
            }
            if let Some(out) = out {
                out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            }
            found.insert(
                rel.to_string(),
                FileEntry {
                    path: rel.to_string(),
                    size,
                    sha256: hex(&hasher.finalize()),
                },
            );
        } else {
            bail!("the archive holds an unexpected entry `{name}`: not a ferrotune backup");
        }
    }
    let manifest = manifest.ok_or_else(|| {
        anyhow::anyhow!("the archive has no manifest: it is incomplete or not a ferrotune backup")
    })?;
    let manifest: Manifest =
        serde_json::from_slice(&manifest).context("the archive's manifest cannot be read")?;
    if manifest.format_version > FORMAT_VERSION {
        bail!(
            "the archive's format version {} is newer than this build's {FORMAT_VERSION}: \
             restore it with a newer ferrotune",
            manifest.format_version
        );
    }
    if manifest.schema_version > SCHEMA_VERSION {
        bail!(
            "the archive's store has schema version {}, newer than this build's \
             {SCHEMA_VERSION}: restore it with a newer ferrotune",
            manifest.schema_version
        );
    }
    let (store, store_entry) =
        store.ok_or_else(|| anyhow::anyhow!("the archive holds no store"))?;
    if store_entry != manifest.store {
        bail!("the archive is damaged: the store does not match its checksum");
    }
    for want in &manifest.files {
        match found.get(&want.path) {
            Some(got) if got == want => {}
            Some(_) => bail!(
                "the archive is damaged: {} does not match its checksum",
                want.path
            ),
            None => bail!("the archive is damaged: {} is missing", want.path),
        }
    }
    let listed: BTreeSet<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
    if let Some(extra) = found.keys().find(|k| !listed.contains(k.as_str())) {
        bail!("the archive is damaged: {extra} is not in its manifest");
    }
    let doc: StoreDoc = serde_json::from_slice(&store).context("the store cannot be read")?;
    let mut snapshot = Snapshot::default();
    for (name, pairs) in doc.trees {
        let entries = pairs
            .iter()
            .map(|[k, v]| Ok((B64.decode(k)?, B64.decode(v)?)))
            .collect::<Result<Vec<_>, base64::DecodeError>>()
            .context("the store cannot be read")?;
        snapshot.trees.insert(name, entries);
    }
    if snapshot.counts() != manifest.counts {
        bail!("the archive is damaged: the store's record counts differ from its manifest");
    }
    Ok(Read_ { manifest, snapshot })
}

/// Reads a whole archive and checks it against its manifest, writing nothing.
pub fn verify(archive: &Path) -> anyhow::Result<Manifest> {
    Ok(read_archive(archive, None)?.manifest)
}

/// Rewrites every string of `value` that is `from` or a path under it to the same path
/// under `to`; true when something changed.
fn rewrite_paths(value: &mut Value, from: &str, to: &str) -> bool {
    match value {
        Value::String(s) => {
            let rest = if s == from {
                Some("")
            } else {
                s.strip_prefix(from).filter(|r| r.starts_with('/'))
            };
            match rest {
                Some(rest) => {
                    *s = format!("{to}{rest}");
                    true
                }
                None => false,
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |ch, v| rewrite_paths(v, from, to) | ch),
        Value::Object(map) => map
            .values_mut()
            .fold(false, |ch, v| rewrite_paths(v, from, to) | ch),
        _ => false,
    }
}

/// One store value as a restore writes it: paths under the old data dir moved to the new
/// one, and a running task without its worker's process id (see the module docs).
fn restored_value(tree: &str, bytes: &[u8], from: &str, to: &str) -> anyhow::Result<Vec<u8>> {
    let Ok(mut value) = serde_json::from_slice::<Value>(bytes) else {
        return Ok(bytes.to_vec());
    };
    if !value.is_object() {
        return Ok(bytes.to_vec());
    }
    let mut changed = from != to && rewrite_paths(&mut value, from, to);
    if tree == "tasks" && value["status"] == "running" && !value["pid"].is_null() {
        value["pid"] = Value::Null;
        changed = true;
    }
    Ok(if changed {
        serde_json::to_vec(&value)?
    } else {
        bytes.to_vec()
    })
}

/// What a restore wrote.
#[derive(Debug, Clone)]
pub struct Restored {
    pub manifest: Manifest,
    /// Tasks that were running at backup time (failed as interrupted at the next start).
    pub interrupted_tasks: usize,
}

/// Restores an archive into `data_dir`, which must not exist or be empty. Everything is
/// written into a folder beside it first and renamed into place once complete and checked,
/// so a failed restore leaves nothing behind. Blocking.
pub fn restore(archive: &Path, data_dir: &Path) -> anyhow::Result<Restored> {
    let data_dir = std::path::absolute(data_dir)?;
    let empty = |d: &Path| std::fs::read_dir(d).map(|mut e| e.next().is_none());
    if data_dir.exists() && !empty(&data_dir).unwrap_or(false) {
        bail!(
            "{} is not empty: restore into a new or empty data dir (--data-dir)",
            data_dir.display()
        );
    }
    let parent = data_dir
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no parent folder", data_dir.display()))?;
    std::fs::create_dir_all(parent)?;
    let staging = tempfile::Builder::new()
        .prefix(".ferrotune-restore-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a folder in {}", parent.display()))?;
    let Read_ {
        manifest,
        mut snapshot,
    } = read_archive(archive, Some(staging.path()))?;
    let (from, to) = (
        manifest.data_dir.trim_end_matches('/').to_string(),
        data_dir.to_string_lossy().trim_end_matches('/').to_string(),
    );
    let mut interrupted_tasks = 0;
    for (tree, entries) in snapshot.trees.iter_mut() {
        for (_, value) in entries.iter_mut() {
            if tree == "tasks" && serde_json::from_slice::<Value>(value)?["status"] == "running" {
                interrupted_tasks += 1;
            }
            *value = restored_value(tree, value, &from, &to)?;
        }
    }
    Store::create_from_snapshot(&staging.path().join("store"), &snapshot)?;
    if data_dir.exists() {
        std::fs::remove_dir(&data_dir)
            .with_context(|| format!("replacing the empty {}", data_dir.display()))?;
    }
    let staged = staging.keep();
    if let Err(e) = std::fs::rename(&staged, &data_dir) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(e).with_context(|| format!("moving the restore to {}", data_dir.display()));
    }
    Ok(Restored {
        manifest,
        interrupted_tasks,
    })
}

// ---- the service ---------------------------------------------------------------------------

/// Backups of a running server, and its users' own data exports.
pub struct Backups {
    store: Store,
    data_dir: PathBuf,
}

/// A response body in the making: chunks of an archive.
pub type ArchiveStream = tokio_stream::wrappers::ReceiverStream<io::Result<Bytes>>;

impl Backups {
    pub fn new(store: Store, data_dir: PathBuf) -> Backups {
        Backups { store, data_dir }
    }

    /// A backup archive of the live store and the data dir, streamed as it is written. The
    /// snapshot is taken before this returns (its errors are this call's).
    pub async fn stream(&self) -> anyhow::Result<ArchiveStream> {
        let snapshot = self.store.snapshot().await?;
        let data_dir = self.data_dir.clone();
        let rx = stream_blocking("backup", move |out| {
            write_archive(&snapshot, &data_dir, true, None, out).map(|_| ())
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    /// A `.tar.gz` of `user_id`'s own records as JSON (profile without its password hash,
    /// API keys without their hashes, datasets with their files, tasks with their loss
    /// curves, models, exports, conversations, task templates), streamed.
    pub async fn personal_export(&self, user_id: &str) -> anyhow::Result<ArchiveStream> {
        let s = &self.store;
        let user = s
            .user(user_id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no such user"))?;
        let mut docs: Vec<(String, Value)> = Vec::new();
        docs.push((
            "profile.json".into(),
            serde_json::json!({
                "user_id": user.user_id, "username": user.username, "email": user.email,
                "role": user.role, "disabled": user.disabled,
                "created_at": user.created_at.format(&time::format_description::well_known::Rfc3339)?,
                "updated_at": user.updated_at.format(&time::format_description::well_known::Rfc3339)?,
            }),
        ));
        let keys: Vec<Value> = s
            .api_keys_of()
            .list(user_id)
            .await?
            .into_iter()
            .map(|k| {
                serde_json::json!({"key_id": k.key_id, "name": k.name, "prefix": k.prefix,
                    "created_at": k.created_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()})
            })
            .collect();
        docs.push(("api_keys.json".into(), Value::Array(keys)));
        let datasets = s.datasets().list(user_id).await?;
        let mut files: Vec<(String, PathBuf)> = datasets
            .iter()
            .map(|d| {
                (
                    format!("datasets/{}/{}", d.file_id, d.filename),
                    PathBuf::from(&d.file_path),
                )
            })
            .collect();
        docs.push(("datasets.json".into(), serde_json::to_value(&datasets)?));
        let tasks = s.tasks().list(user_id).await?;
        for t in &tasks {
            let points = s.metrics(&t.task_id).await?;
            if !points.is_empty() {
                docs.push((
                    format!("tasks/{}/metrics.json", t.task_id),
                    serde_json::to_value(points)?,
                ));
            }
            let events = Path::new(t.paths["task_dir"].as_str().unwrap_or("")).join("events.jsonl");
            if t.paths["task_dir"].is_string() {
                files.push((format!("tasks/{}/events.jsonl", t.task_id), events));
            }
        }
        docs.push(("tasks.json".into(), serde_json::to_value(&tasks)?));
        docs.push((
            "models.json".into(),
            serde_json::to_value(s.models().list(user_id).await?)?,
        ));
        docs.push((
            "exports.json".into(),
            serde_json::to_value(s.exports().list(user_id).await?)?,
        ));
        docs.push((
            "chat_sessions.json".into(),
            serde_json::to_value(s.chat_sessions().list(user_id).await?)?,
        ));
        docs.push((
            "task_templates.json".into(),
            serde_json::to_value(s.task_templates().list(user_id).await?)?,
        ));
        let rx = stream_blocking("personal data export", move |out| {
            let mtime = OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
            let gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
            let mut tar = tar::Builder::new(gz);
            for (name, value) in docs {
                let bytes = serde_json::to_vec_pretty(&value)?;
                tar.append_data(
                    &mut header(bytes.len() as u64, 0o644, mtime),
                    name,
                    bytes.as_slice(),
                )?;
            }
            for (name, path) in files {
                let Ok(file) = std::fs::File::open(&path) else {
                    continue; // a task without events yet, a file removed meanwhile
                };
                let size = file.metadata()?.len();
                let mut reader = Exact {
                    inner: io::BufReader::new(file),
                    left: size,
                    hasher: Sha256::new(),
                };
                tar.append_data(&mut header(size, 0o644, mtime), name, &mut reader)?;
            }
            tar.into_inner()?.finish()?;
            Ok(())
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_under_the_old_data_dir_move() {
        let mut v = serde_json::json!({
            "file_path": "/old/data/datasets/a.json",
            "paths": {"task_dir": "/old/data", "model_dir": "/models/m", "x": ["/old/data/t/1"]},
            "near": "/old/database/x",
        });
        assert!(rewrite_paths(&mut v, "/old/data", "/new/d"));
        assert_eq!(v["file_path"], "/new/d/datasets/a.json");
        assert_eq!(v["paths"]["task_dir"], "/new/d");
        assert_eq!(v["paths"]["model_dir"], "/models/m", "outside the data dir");
        assert_eq!(v["paths"]["x"][0], "/new/d/t/1");
        assert_eq!(
            v["near"], "/old/database/x",
            "a prefix of a name is not a folder"
        );
    }

    #[test]
    fn running_tasks_lose_their_pid_and_other_values_stay_byte_for_byte() {
        let task = br#"{"status":"running","pid":42,"p":"/a/b"}"#;
        let out: Value =
            serde_json::from_slice(&restored_value("tasks", task, "/a", "/a").unwrap()).unwrap();
        assert!(out["pid"].is_null());
        assert_eq!(out["p"], "/a/b");
        let done = br#"{"status":"completed","pid":42}"#;
        assert_eq!(
            restored_value("tasks", done, "/a", "/c").unwrap(),
            done.to_vec()
        );
        let raw = b"0190abc\x00def";
        assert_eq!(
            restored_value("users_by_name", raw, "/a", "/c").unwrap(),
            raw.to_vec()
        );
    }

    #[test]
    fn unsafe_archive_paths_are_refused() {
        for bad in ["", "../x", "/etc/passwd", "a/../../b", "store/db", "tmp/x"] {
            assert!(safe_relative(bad).is_err(), "{bad}");
        }
        assert!(safe_relative("datasets/u/a.json").is_ok());
    }

    #[test]
    fn the_exact_reader_pads_a_file_that_shrank() {
        let mut r = Exact {
            inner: &b"abc"[..],
            left: 5,
            hasher: Sha256::new(),
        };
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abc\0\0");
    }
}
