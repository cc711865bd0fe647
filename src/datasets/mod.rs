//! Datasets: uploads streamed to disk, validated, recorded; list, preview, download, delete.
//!
//! Files live at `<data_dir>/datasets/<owner>/<file_id>.<ext>`; an upload is written to
//! `<data_dir>/tmp/` first and renamed into place only once it is complete and valid, so a
//! failed upload leaves nothing behind.

pub mod format;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Kind, Result};
use crate::store::{Dataset, Store, new_id};
use format::InspectError;

/// The most rows a preview returns.
pub const MAX_PREVIEW_ROWS: usize = 500;

#[derive(Clone)]
pub struct Datasets {
    store: Store,
    dir: PathBuf,
    tmp: PathBuf,
    max_bytes: u64,
}

/// Removes a file on drop unless disarmed: no half-written upload survives an error or a
/// dropped connection.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep
            && let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove a temporary upload");
        }
    }
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

    /// Streams an upload to disk, validates it, and records it for `owner`.
    pub async fn upload<S>(&self, owner: &str, client_name: &str, mut body: S) -> Result<Dataset>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        let filename = sanitize_filename(client_name);
        let file_id = new_id();
        let mut temp = TempFile {
            path: self.tmp.join(format!("upload-{file_id}")),
            keep: false,
        };
        let mut file = tokio::fs::File::create(&temp.path).await?;
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

        let inspect_path = temp.path.clone();
        let hint = filename.clone();
        let summary =
            tokio::task::spawn_blocking(move || format::inspect(&inspect_path, Some(&hint)))
                .await?
                .map_err(|e| match e {
                    InspectError::Invalid(f) => {
                        Error::new(Kind::Invalid, "invalid_dataset", f.to_string())
                    }
                    InspectError::Io(e) => Error::from(e),
                })?;

        let owner_dir = self.dir.join(owner);
        tokio::fs::create_dir_all(&owner_dir).await?;
        let final_path = owner_dir.join(format!("{file_id}.{}", summary.container.extension()));
        tokio::fs::rename(&temp.path, &final_path).await?;
        temp.path = final_path.clone();

        let dataset = Dataset {
            file_id,
            owner: owner.to_string(),
            filename,
            file_path: final_path.to_string_lossy().into_owned(),
            size,
            format: summary.format,
            container: summary.container,
            num_rows: summary.num_rows,
            columns: summary.columns,
            created_at: OffsetDateTime::now_utc(),
        };
        // If recording fails, the guard removes the renamed file too.
        self.store.datasets().put(&dataset).await?;
        temp.keep = true;
        tracing::info!(file_id = %dataset.file_id, owner, size, format = %dataset.format, rows = dataset.num_rows, "dataset uploaded");
        Ok(dataset)
    }

    pub async fn list(&self, owner: &str) -> Result<Vec<Dataset>> {
        Ok(self.store.datasets().list(owner).await?)
    }

    /// The owner's dataset; another user's is "not found".
    pub async fn get(&self, owner: &str, file_id: &str) -> Result<Dataset> {
        self.store
            .datasets()
            .get(owner, file_id)
            .await?
            .ok_or_else(|| Error::not_found("dataset"))
    }

    /// The first `limit` records (at most [`MAX_PREVIEW_ROWS`]).
    pub async fn preview(&self, dataset: &Dataset, limit: usize) -> Result<Vec<serde_json::Value>> {
        let path = PathBuf::from(&dataset.file_path);
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

    /// Deletes the record, then the file.
    pub async fn delete(&self, owner: &str, file_id: &str) -> Result<Dataset> {
        let dataset = self
            .store
            .datasets()
            .remove(owner, file_id)
            .await?
            .ok_or_else(|| Error::not_found("dataset"))?;
        remove_file_logged(Path::new(&dataset.file_path)).await;
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
