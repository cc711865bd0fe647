//! A task's outputs as `.tar.gz` archives, produced while they are sent (nothing is
//! written to disk and nothing large is held in memory).

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{Error, Result};
use crate::training::Task;

/// What can be downloaded from a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Artifact {
    /// The final adapter (or model): the files directly in the output folder.
    Adapter,
    /// The log, the events, the job and dataset description.
    Logs,
    /// One `checkpoint-N` folder.
    Checkpoint(u64),
}

impl Artifact {
    pub fn parse(name: &str) -> Option<Artifact> {
        match name {
            "adapter" | "model" => Some(Artifact::Adapter),
            "logs" => Some(Artifact::Logs),
            other => other
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()
                .map(Artifact::Checkpoint),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Artifact::Adapter => "adapter".into(),
            Artifact::Logs => "logs".into(),
            Artifact::Checkpoint(n) => format!("checkpoint-{n}"),
        }
    }
}

/// The files of an artifact: (path on disk, path in the archive).
fn entries(task: &Task, artifact: &Artifact) -> Result<Vec<(PathBuf, PathBuf)>> {
    let out = Path::new(&task.paths.output_dir);
    let task_dir = Path::new(&task.paths.task_dir);
    let prefix = PathBuf::from(artifact.name());
    let mut files = Vec::new();
    match artifact {
        Artifact::Adapter => {
            if task.outputs_removed {
                return Err(Error::not_found(
                    "artifact (outputs removed after the retention period; the registered model keeps its files)",
                ));
            }
            for e in std::fs::read_dir(out)
                .map_err(|_| Error::not_found("artifact"))?
                .flatten()
            {
                if e.path().is_file() {
                    files.push((e.path(), prefix.join(e.file_name())));
                }
            }
        }
        Artifact::Logs => {
            for name in ["train.log", "events.jsonl", "job.json", "dataset_info.json"] {
                let p = task_dir.join(name);
                if p.is_file() {
                    files.push((p, prefix.join(name)));
                }
            }
        }
        Artifact::Checkpoint(_) => {
            let dir = out.join(artifact.name());
            if !dir.is_dir() {
                return Err(Error::not_found("checkpoint"));
            }
            walk(&dir, &prefix, &mut files)?;
        }
    }
    if files.is_empty() {
        return Err(Error::not_found("artifact"));
    }
    Ok(files)
}

fn walk(dir: &Path, prefix: &Path, files: &mut Vec<(PathBuf, PathBuf)>) -> Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        let p = e.path();
        let name = prefix.join(e.file_name());
        if e.file_name() == ".ferrotune" {
            // The engine's quantised-weights cache: made again from the weights on load.
            continue;
        }
        if p.is_dir() {
            walk(&p, &name, files)?;
        } else if p.is_file() {
            files.push((p, name));
        }
    }
    Ok(())
}

/// Sends written bytes to the response in chunks.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

const CHUNK: usize = 256 * 1024;

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}

/// An archive's bytes, produced as they are sent.
pub type ArchiveStream = ReceiverStream<std::io::Result<Bytes>>;

/// The archive's file name and its bytes as a stream.
pub fn archive(task: &Task, artifact: &Artifact) -> Result<(String, ArchiveStream)> {
    let files = entries(task, artifact)?;
    let filename = format!("{}-{}.tar.gz", task.task_id, artifact.name());
    Ok((filename, tar_gz(files)))
}

/// A registered model's files (an adapter's, kept even when its task's outputs are gone) as
/// `<name>/…` in a `.tar.gz`.
pub fn model_archive(model: &crate::store::ModelRecord) -> Result<(String, ArchiveStream)> {
    let dir = Path::new(&model.model_path);
    if !dir.is_dir() {
        return Err(Error::not_found("model files"));
    }
    let safe: String = model
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let safe = if safe.trim_matches('.').is_empty() {
        model.model_id.clone()
    } else {
        safe
    };
    let mut files = Vec::new();
    walk(dir, Path::new(&safe), &mut files)?;
    if files.is_empty() {
        return Err(Error::not_found("model files"));
    }
    Ok((format!("{safe}.tar.gz"), tar_gz(files)))
}

/// Streams `files` (path on disk, path in the archive) as a `.tar.gz`, built on the blocking
/// pool while it is sent.
fn tar_gz(files: Vec<(PathBuf, PathBuf)>) -> ReceiverStream<std::io::Result<Bytes>> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let err_tx = tx.clone();
    tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter {
            tx,
            buf: Vec::new(),
        };
        let gz = flate2::write::GzEncoder::new(writer, flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        let result = (|| -> std::io::Result<()> {
            for (path, name) in &files {
                tar.append_path_with_name(path, name)?;
            }
            let gz = tar.into_inner()?;
            let mut writer = gz.finish()?;
            writer.flush()
        })();
        if let Err(e) = result
            && e.kind() != std::io::ErrorKind::BrokenPipe
        {
            tracing::warn!(error = %e, "building an archive failed");
            let _ = err_tx.blocking_send(Err(e));
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::Artifact;

    #[test]
    fn names() {
        assert_eq!(Artifact::parse("adapter"), Some(Artifact::Adapter));
        assert_eq!(Artifact::parse("logs"), Some(Artifact::Logs));
        assert_eq!(
            Artifact::parse("checkpoint-12"),
            Some(Artifact::Checkpoint(12))
        );
        assert_eq!(Artifact::parse("checkpoint-x"), None);
        assert_eq!(Artifact::parse("../etc"), None);
    }
}
