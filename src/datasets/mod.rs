//! Datasets: uploads streamed to disk, validated, recorded; list, preview, download, delete.
//!
//! Files live at `<data_dir>/datasets/<owner>/<file_id>.<ext>`; an upload is written to a
//! temporary file in `<data_dir>/tmp/` first and renamed into place only once it is complete
//! and valid, so a failed upload leaves nothing behind.

pub mod format;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Kind, Result};
use crate::store::{DatasetRecord, Store, new_id};
use format::{Container, DatasetFormat, DatasetKind, InspectError};

/// A dataset that does not read is a 422 naming the first bad record; a failed read an I/O
/// error.
fn inspect_error(e: InspectError) -> Error {
    match e {
        InspectError::Invalid(f) => Error::new(Kind::Invalid, "invalid_dataset", f.to_string()),
        InspectError::Io(e) => Error::from(e),
    }
}

/// The most rows a preview returns.
pub const MAX_PREVIEW_ROWS: usize = 500;

/// An uploaded, validated dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub file_id: String,
    pub owner: String,
    /// The client's file name, sanitised; never used as a path.
    pub filename: String,
    /// Where the file is (absolute; answers show it relative to the data dir).
    pub file_path: PathBuf,
    pub size: u64,
    pub format: DatasetFormat,
    /// What it trains: the stages that fit follow from it.
    pub kind: DatasetKind,
    pub container: Container,
    pub num_rows: u64,
    /// Top-level fields present in the records (CSV: recognised header columns).
    pub columns: Vec<String>,
    pub created_at: OffsetDateTime,
}

impl Dataset {
    /// The typed form of a stored record.
    pub fn from_record(r: DatasetRecord) -> Result<Dataset> {
        let bad = |what: &str, v: &str| {
            Error::internal(format!(
                "dataset {}: unknown {what} `{v}` in the store",
                r.file_id
            ))
        };
        Ok(Dataset {
            format: DatasetFormat::parse(&r.format).ok_or_else(|| bad("format", &r.format))?,
            container: Container::parse(&r.container)
                .ok_or_else(|| bad("container", &r.container))?,
            kind: DatasetKind::parse(&r.kind).ok_or_else(|| bad("kind", &r.kind))?,
            file_id: r.file_id,
            owner: r.owner,
            filename: r.filename,
            file_path: PathBuf::from(r.file_path),
            size: r.size,
            num_rows: r.num_rows,
            columns: r.columns,
            created_at: r.created_at,
        })
    }

    pub fn to_record(&self) -> DatasetRecord {
        DatasetRecord {
            file_id: self.file_id.clone(),
            owner: self.owner.clone(),
            filename: self.filename.clone(),
            file_path: self.file_path.to_string_lossy().into_owned(),
            size: self.size,
            format: self.format.as_str().to_string(),
            container: self.container.extension().to_string(),
            kind: self.kind.as_str().to_string(),
            num_rows: self.num_rows,
            columns: self.columns.clone(),
            created_at: self.created_at,
        }
    }
}

/// Datasets: uploads, their records and files.
#[derive(Clone)]
pub struct Datasets {
    store: Store,
    dir: PathBuf,
    tmp: PathBuf,
    max_bytes: u64,
}

impl Datasets {
    /// `dir` and `tmp` must be absolute and on the same file system (rename moves uploads).
    pub fn new(store: Store, dir: PathBuf, tmp: PathBuf, max_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(&tmp)?;
        // Uploads interrupted by a crash leave temporaries behind; they are never referenced.
        for entry in std::fs::read_dir(&tmp)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with("upload-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Datasets {
            store,
            dir,
            tmp,
            max_bytes,
        })
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Streams an upload to disk, validates it, and records it for `owner`. The upload is
    /// written to a temporary file (removed on any failure or a dropped connection) and
    /// renamed into place only once it is complete and valid.
    pub async fn upload<S>(&self, owner: &str, client_name: &str, mut body: S) -> Result<Dataset>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        let filename = sanitize_filename(client_name);
        let file_id = new_id();
        let tmp_dir = self.tmp.clone();
        let prefix = format!("upload-{file_id}-");
        let temp = tokio::task::spawn_blocking(move || {
            tempfile::Builder::new()
                .prefix(&prefix)
                .tempfile_in(&tmp_dir)
        })
        .await??;
        let mut file = tokio::fs::File::from_std(temp.reopen()?);
        let mut size: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            size += chunk.len() as u64;
            if size > self.max_bytes {
                return Err(too_large(self.max_bytes));
            }
            file.write_all(&chunk).await?;
        }
        file.sync_all().await?;
        drop(file);

        let inspect_path = temp.path().to_path_buf();
        let hint = filename.clone();
        let summary =
            tokio::task::spawn_blocking(move || format::inspect(&inspect_path, Some(&hint)))
                .await?
                .map_err(inspect_error)?;

        // Shapes LlamaFactory cannot read (OpenAI's content parts and tool calls, DPO JSONL,
        // plain text) are stored as the JSON Lines it can: the records the preview shows are
        // the ones training reads.
        let (temp, size) = if summary.rewritten {
            let tmp_dir = self.tmp.clone();
            let prefix = format!("upload-{file_id}-rewritten-");
            let hint = filename.clone();
            tokio::task::spawn_blocking(move || -> Result<_> {
                let out = tempfile::Builder::new()
                    .prefix(&prefix)
                    .tempfile_in(&tmp_dir)?;
                format::rewrite(temp.path(), Some(&hint), out.path()).map_err(inspect_error)?;
                let size = out.as_file().metadata()?.len();
                Ok((out, size))
            })
            .await??
        } else {
            (temp, size)
        };
        let owner_dir = self.dir.join(owner);
        tokio::fs::create_dir_all(&owner_dir).await?;
        let final_path = owner_dir.join(format!("{file_id}.{}", summary.container.extension()));
        let placed = final_path.clone();
        tokio::task::spawn_blocking(move || temp.persist(&placed).map_err(|e| e.error)).await??;

        let dataset = Dataset {
            file_id,
            owner: owner.to_string(),
            filename,
            file_path: final_path.clone(),
            size,
            format: summary.format,
            kind: summary.kind,
            container: summary.container,
            num_rows: summary.num_rows,
            columns: summary.columns,
            created_at: OffsetDateTime::now_utc(),
        };
        if let Err(e) = self.store.datasets().put(&dataset.to_record()).await {
            // Nothing half-written: the file goes with the record that could not be kept.
            remove_file_logged(&final_path).await;
            return Err(e.into());
        }
        tracing::info!(file_id = %dataset.file_id, owner, size, format = %dataset.format, kind = %dataset.kind, rewritten = summary.rewritten, rows = dataset.num_rows, "dataset uploaded");
        Ok(dataset)
    }

    pub async fn list(&self, owner: &str) -> Result<Vec<Dataset>> {
        self.store
            .datasets()
            .list(owner)
            .await?
            .into_iter()
            .map(Dataset::from_record)
            .collect()
    }

    /// The owner's dataset; another user's is "not found".
    pub async fn get(&self, owner: &str, file_id: &str) -> Result<Dataset> {
        let record = self
            .store
            .datasets()
            .get(owner, file_id)
            .await?
            .ok_or_else(|| Error::not_found("dataset"))?;
        Dataset::from_record(record)
    }

    /// The owner's dataset whose file is at `path` (as answers show it, relative to the data
    /// dir, or absolute), if any.
    pub async fn by_path(
        &self,
        owner: &str,
        data_dir: &Path,
        path: &str,
    ) -> Result<Option<Dataset>> {
        let Some(wanted) = crate::text::resolve_client_path(data_dir, path) else {
            return Ok(None);
        };
        Ok(self
            .list(owner)
            .await?
            .into_iter()
            .find(|d| d.file_path == wanted))
    }

    /// The first `limit` records (at most [`MAX_PREVIEW_ROWS`]).
    pub async fn preview(&self, dataset: &Dataset, limit: usize) -> Result<Vec<serde_json::Value>> {
        let path = dataset.file_path.clone();
        let container = dataset.container;
        let limit = limit.min(MAX_PREVIEW_ROWS);
        tokio::task::spawn_blocking(move || format::preview(&path, container, limit))
            .await?
            .map_err(|e| match e {
                InspectError::Invalid(f) => {
                    Error::internal(format!("stored dataset unreadable: {f}"))
                }
                InspectError::Io(e) => Error::from(e),
            })
    }

    /// The dataset and its file, open for reading.
    pub async fn open(&self, owner: &str, file_id: &str) -> Result<(Dataset, tokio::fs::File)> {
        let d = self.get(owner, file_id).await?;
        let file = tokio::fs::File::open(&d.file_path).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::new(
                    Kind::NotFound,
                    "file_missing",
                    "the dataset's file is missing on disk",
                )
            } else {
                Error::from(e)
            }
        })?;
        Ok((d, file))
    }

    /// Deletes the record, then the file. Whether a task still needs the dataset is the
    /// caller's question (`training::Training::delete_dataset` asks it under the owner's
    /// lock).
    pub(crate) async fn delete(&self, owner: &str, file_id: &str) -> Result<Dataset> {
        let record = self
            .store
            .datasets()
            .remove(owner, file_id)
            .await?
            .ok_or_else(|| Error::not_found("dataset"))?;
        let dataset = Dataset::from_record(record)?;
        remove_file_logged(&dataset.file_path).await;
        tracing::info!(file_id = %dataset.file_id, owner, filename = %dataset.filename, "dataset deleted");
        Ok(dataset)
    }

    /// Removes every file of a user (their records are removed with the account).
    pub async fn remove_owner_files(&self, owner: &str) {
        let dir = self.dir.join(owner);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove a user's datasets");
        }
    }
}

async fn remove_file_logged(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "could not remove a dataset file");
    }
}

pub fn too_large(max: u64) -> Error {
    Error::new(
        Kind::TooLarge,
        "too_large",
        format!("the file is larger than the limit of {max} bytes"),
    )
}

/// A display name from the client's file name: its last path component, without control
/// characters, at most 200 bytes. Never used as a path.
pub fn sanitize_filename(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned = crate::text::clean_name(base);
    let cleaned = cleaned.as_str();
    let mut out = String::new();
    for c in cleaned.chars() {
        if out.len() + c.len_utf8() > 200 {
            break;
        }
        out.push(c);
    }
    if out.is_empty() || out == "." || out == ".." {
        "dataset".to_string()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::sanitize_filename;

    #[test]
    fn client_names_are_never_paths() {
        assert_eq!(sanitize_filename("../../etc/passwd"), "passwd");
        assert_eq!(sanitize_filename("C:\\Users\\me\\data.json"), "data.json");
        assert_eq!(sanitize_filename("a\u{0}b\nc.jsonl"), "abc.jsonl");
        assert_eq!(sanitize_filename("evil\u{202E}lmth.json"), "evillmth.json");
        assert_eq!(sanitize_filename(".."), "dataset");
        assert_eq!(sanitize_filename("dir/"), "dataset");
        assert_eq!(sanitize_filename(""), "dataset");
        assert!(sanitize_filename(&"名".repeat(300)).len() <= 200);
    }
}
