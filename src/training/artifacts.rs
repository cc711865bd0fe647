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
    /// The run, portable: `train.yaml`, `dataset_info.json` and the data, with paths relative
    /// to the bundle's folder, for `llamafactory-cli train train.yaml` anywhere.
    Bundle,
}

impl Artifact {
    pub fn parse(name: &str) -> Option<Artifact> {
        match name {
            "adapter" | "model" => Some(Artifact::Adapter),
            "logs" => Some(Artifact::Logs),
            "bundle" => Some(Artifact::Bundle),
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
            Artifact::Bundle => "bundle".into(),
            Artifact::Checkpoint(n) => format!("checkpoint-{n}"),
        }
    }
}

/// What an archive entry holds: a file on disk, or bytes made for the archive.
pub enum Source {
    File(PathBuf),
    Data(Vec<u8>),
}

/// The bundle's entries: the run's arguments with every path made relative to the bundle
/// (the dataset in `data/`, the output in `output/`), LlamaFactory's `dataset_info.json`
/// naming the data file, the data itself and a README. The base model is named by its hub
/// id when it was pulled from a hub (any machine can fetch it); otherwise by its path on
/// this server, which the README says to change.
fn bundle(task: &Task) -> Result<Vec<(Source, PathBuf)>> {
    use serde_json::json;
    if task.spec.evaluation.is_some() {
        return Err(Error::not_found(
            "artifact (an evaluation has no training run to bundle)",
        ));
    }
    let prefix = PathBuf::from(format!("{}-bundle", task.task_id));
    let data = Path::new(&task.paths.dataset_file);
    let ext = data
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("json")
        .to_string();
    let data_name = format!("data.{ext}");
    let mut paths = task.paths.clone();
    paths.dataset_file = data_name.clone();
    // A validation set travels as data/validation.<ext>.
    let validation = paths.validation.as_mut().map(|v| {
        let source = PathBuf::from(&v.file);
        let ext = source
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("json")
            .to_string();
        v.file = format!("validation.{ext}");
        (source, v.file.clone())
    });
    let mut args = crate::training::supervisor::run_args(task);
    args.remove("resume_from_checkpoint");
    let hub = crate::models::hub::source_of(Path::new(&task.paths.model_dir));
    let model = match &hub {
        Some(source) => source.repo.clone(),
        None => task.paths.model_dir.clone(),
    };
    args.insert("model_name_or_path".into(), json!(model));
    if let Some(source) = &hub {
        args.insert("model_revision".into(), json!(source.commit));
    }
    args.insert("dataset_dir".into(), json!("data"));
    args.insert("output_dir".into(), json!("output"));
    if let Some(stage) = task.spec.deepspeed {
        args.insert(
            "deepspeed".into(),
            json!(crate::training::spec::deepspeed_config_name(stage)),
        );
    }
    let mut info = serde_json::to_vec_pretty(&crate::training::spec::dataset_info(&paths))
        .map_err(Error::internal)?;
    info.push(b'\n');
    let yaml = crate::training::spec::to_yaml(&args);
    let model_note = if hub.is_some() {
        format!(
            "The base model is {model} from the Hugging Face hub, at the commit it was trained from."
        )
    } else {
        format!(
            "The base model is the folder {model} on the server it was trained on: change\n\
             model_name_or_path in train.yaml to the model's folder (or hub id) on this machine."
        )
    };
    let readme = format!(
        "ferrotune task {id} ({name}), as a LlamaFactory 0.9.5 run.\n\n\
         Train it with:\n\n    cd {dir}\n    llamafactory-cli train train.yaml\n\n\
         {model_note}\nThe data are in data/ (described by data/dataset_info.json); the result \
         goes to output/.\n",
        id = task.task_id,
        name = task.spec.name,
        dir = prefix.display(),
    );
    let mut files = vec![
        (Source::Data(readme.into_bytes()), prefix.join("README.txt")),
        (Source::Data(yaml.into_bytes()), prefix.join("train.yaml")),
        (
            Source::Data(info),
            prefix.join("data").join("dataset_info.json"),
        ),
        (
            Source::File(data.to_path_buf()),
            prefix.join("data").join(&data_name),
        ),
    ];
    if let Some((source, name)) = validation {
        files.push((Source::File(source), prefix.join("data").join(name)));
    }
    if let Some(stage) = task.spec.deepspeed {
        let name = crate::training::spec::deepspeed_config_name(stage);
        let config = serde_json::to_vec_pretty(&crate::training::spec::deepspeed_config(stage))
            .map_err(Error::internal)?;
        files.push((Source::Data(config), prefix.join(name)));
    }
    if !data.is_file() {
        return Err(Error::not_found(
            "artifact (the task's dataset file is gone)",
        ));
    }
    Ok(files)
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
        Artifact::Bundle => return Err(Error::internal("a bundle is made, not listed")),
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
    let files = match artifact {
        Artifact::Bundle => bundle(task)?,
        _ => entries(task, artifact)?
            .into_iter()
            .map(|(path, name)| (Source::File(path), name))
            .collect(),
    };
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
    let files = files
        .into_iter()
        .map(|(path, name)| (Source::File(path), name))
        .collect();
    Ok((format!("{safe}.tar.gz"), tar_gz(files)))
}

/// Streams `files` (path on disk, path in the archive) as a `.tar.gz`, built on the blocking
/// pool while it is sent.
fn tar_gz(files: Vec<(Source, PathBuf)>) -> ReceiverStream<std::io::Result<Bytes>> {
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
            for (source, name) in &files {
                match source {
                    Source::File(path) => tar.append_path_with_name(path, name)?,
                    Source::Data(bytes) => {
                        let mut header = tar::Header::new_gnu();
                        header.set_size(bytes.len() as u64);
                        header.set_mode(0o644);
                        header.set_mtime(
                            std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_secs()),
                        );
                        header.set_cksum();
                        tar.append_data(&mut header, name, &bytes[..])?;
                    }
                }
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
