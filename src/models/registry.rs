//! The models a server knows: the base models in the models folder, and the models users
//! trained (registered records with their files under `<data_dir>/models/<owner>/<id>/`).
//!
//! This is the only code that knows either layout. Discovery of the models folder is cached:
//! it is walked again (every model folder read and sized) only when the folder or one of its
//! model folders changed — a model added, removed, renamed into place, or its files copied in
//! after its folder was made. That is looked at (one directory listing and one `stat` per
//! model folder) at most every [`RECHECK`], off the async runtime: a chat request never walks
//! and sizes every model folder.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use time::OffsetDateTime;

use super::BaseModel;
use crate::error::{Error, Kind, Result};
use crate::store::{ModelKind, ModelRecord, Store, new_id};

/// How long the cached list is trusted before the folder's modification time is looked at.
const RECHECK: Duration = Duration::from_secs(2);

/// What a model id (or name, or path) names, ready for the engine.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The id as the client gave it (echoed in answers).
    pub id: String,
    /// The base model whose weights serve it.
    pub base: BaseModel,
    /// The LoRA adapter's folder, for an adapter.
    pub adapter: Option<PathBuf>,
    pub kind: ModelKind,
    /// The system prompt a trained model was trained with: chat's default.
    pub system: Option<String>,
}

/// How a model was trained, recorded with it.
#[derive(Debug, Clone, Default)]
pub struct TrainedWith {
    /// The task that trained it.
    pub task_id: String,
    /// The LlamaFactory template.
    pub template: Option<String>,
    pub system: Option<String>,
}

struct Cache {
    models: Arc<Vec<BaseModel>>,
    /// The folders' modification times when they were walked.
    stamp: Option<Stamp>,
    checked: Option<Instant>,
}

/// The models folder's modification time and each entry's (name, modification time).
type Stamp = (Option<SystemTime>, Vec<(String, Option<SystemTime>)>);

pub struct Registry {
    models_dir: PathBuf,
    /// `<data_dir>/models`: trained models, one folder per owner; with the store, for a
    /// server (the command line and the Python engine have neither).
    trained_dir: Option<PathBuf>,
    store: Option<Store>,
    cache: Mutex<Cache>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// What changes when a model is added, removed, or its files are copied in. `None` when the
/// folder cannot be read (then it is walked every time, and says why).
fn stamp(dir: &Path) -> Option<Stamp> {
    let mut entries: Vec<(String, Option<SystemTime>)> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                modified(&e.path()),
            )
        })
        .collect();
    entries.sort();
    Some((modified(dir), entries))
}

impl Registry {
    /// A server's registry: base models in `models_dir`, trained models in the store and
    /// under `<data_dir>/models`.
    pub fn new(models_dir: PathBuf, data_dir: &Path, store: Store) -> Arc<Registry> {
        Arc::new(Registry {
            models_dir,
            trained_dir: Some(data_dir.join("models")),
            store: Some(store),
            cache: Mutex::new(Cache {
                models: Arc::new(Vec::new()),
                stamp: None,
                checked: None,
            }),
        })
    }

    /// Base models only (the command line, the Python engine).
    pub fn local(models_dir: PathBuf) -> Arc<Registry> {
        Arc::new(Registry {
            models_dir,
            trained_dir: None,
            store: None,
            cache: Mutex::new(Cache {
                models: Arc::new(Vec::new()),
                stamp: None,
                checked: None,
            }),
        })
    }

    pub fn models_dir(&self) -> &Path {
        &self.models_dir
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the cached list (after a pull wrote a new model).
    pub fn invalidate(&self) {
        let mut c = self.cache();
        c.checked = None;
        c.stamp = None;
    }

    /// The base models (cached; walks the folder when it changed). Blocking: for threads
    /// where blocking is allowed (the engine's, the blocking pool).
    pub fn base_models_blocking(&self) -> std::io::Result<Arc<Vec<BaseModel>>> {
        self.base_models_checked(false)
    }

    /// The base models; `fresh`: look whether the folder changed even within [`RECHECK`].
    fn base_models_checked(&self, fresh: bool) -> std::io::Result<Arc<Vec<BaseModel>>> {
        if !fresh {
            let c = self.cache();
            if c.checked.is_some_and(|t| t.elapsed() < RECHECK) {
                return Ok(c.models.clone());
            }
        }
        let stamp = stamp(&self.models_dir);
        {
            let mut c = self.cache();
            if c.checked.is_some() && stamp.is_some() && c.stamp == stamp {
                c.checked = Some(Instant::now());
                return Ok(c.models.clone());
            }
        }
        let models = Arc::new(super::list_base_models(&self.models_dir)?);
        let mut c = self.cache();
        c.models = models.clone();
        c.stamp = stamp;
        c.checked = Some(Instant::now());
        Ok(models)
    }

    /// The base models, off the async runtime.
    pub async fn base_models(self: &Arc<Self>) -> Result<Arc<Vec<BaseModel>>> {
        let this = self.clone();
        Ok(tokio::task::spawn_blocking(move || this.base_models_blocking()).await??)
    }

    /// The base model called `name`: its folder name (exact, else ignoring case) or a
    /// catalogue name (`smollm2-135m-instruct`). A name the cached list lacks is looked for
    /// again at once (a model copied in a moment ago is found). Blocking, like
    /// [`Registry::base_models_blocking`].
    pub fn find_base_blocking(&self, name: &str) -> std::io::Result<Option<BaseModel>> {
        if let Some(m) = find_in(&self.base_models_checked(false)?, name) {
            return Ok(Some(m));
        }
        Ok(find_in(&self.base_models_checked(true)?, name))
    }

    /// Registers a model folder already on the server (seed 000's `POST /api/files/models`)
    /// as a base model called `name` (default: the folder's name): a symbolic link in the
    /// models folder, which discovery follows. The folder must hold a model (config.json with
    /// safetensors, or a GGUF); the name must be free.
    pub async fn register_folder(
        self: &Arc<Self>,
        path: &str,
        name: Option<&str>,
    ) -> Result<BaseModel> {
        let this = self.clone();
        let path = PathBuf::from(path);
        let name = name.map(crate::text::clean_name);
        tokio::task::spawn_blocking(move || this.register_folder_blocking(&path, name)).await?
    }

    fn register_folder_blocking(&self, path: &Path, name: Option<String>) -> Result<BaseModel> {
        if !path.is_absolute() {
            return Err(Error::invalid(
                "path: give the model folder's absolute path on the server",
            ));
        }
        let dir = path
            .canonicalize()
            .ok()
            .filter(|d| d.is_dir())
            .ok_or_else(|| Error::invalid("path: no folder there on the server"))?;
        let models = self
            .models_dir
            .canonicalize()
            .unwrap_or_else(|_| self.models_dir.clone());
        if dir.starts_with(&models) {
            return Err(Error::conflict(
                "already_registered",
                "that folder is inside the models folder: it is a base model already",
            ));
        }
        let name = match name {
            Some(n) => n,
            None => dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        if name.is_empty()
            || name.len() > 100
            || name.starts_with('.')
            || name.contains(['/', '\\'])
        {
            return Err(Error::invalid(
                "name: 1 to 100 characters, no slash, not starting with a dot",
            ));
        }
        if super::inspect(&dir, name.clone())?.is_none() {
            return Err(Error::invalid(
                "path: the folder holds no model (config.json with safetensors weights, or a \
                 .gguf file)",
            ));
        }
        std::fs::create_dir_all(&self.models_dir)?;
        let models = self.base_models_checked(true)?;
        if let Some(same) = models
            .iter()
            .find(|b| b.path.canonicalize().is_ok_and(|p| p == dir))
        {
            return Err(Error::conflict(
                "already_registered",
                format!("that folder is the base model `{}` already", same.name),
            ));
        }
        let link = self.models_dir.join(&name);
        if find_in(&models, &name).is_some() || link.symlink_metadata().is_ok() {
            return Err(Error::conflict(
                "name_taken",
                format!("a base model called `{name}` exists already"),
            ));
        }
        // Two registrations of one name at once both pass the check above; the link is the
        // arbiter: the second finds it made.
        if let Err(e) = std::os::unix::fs::symlink(&dir, &link) {
            return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::conflict(
                    "name_taken",
                    format!("a base model called `{name}` exists already"),
                )
            } else {
                e.into()
            });
        }
        self.invalidate();
        let registered = super::inspect(&link, name)?
            .ok_or_else(|| Error::internal("the registered folder vanished"))?;
        Ok(registered)
    }

    pub async fn find_base(self: &Arc<Self>, name: &str) -> Result<Option<BaseModel>> {
        let this = self.clone();
        let name = name.to_string();
        Ok(tokio::task::spawn_blocking(move || this.find_base_blocking(&name)).await??)
    }

    fn store(&self) -> Result<&Store> {
        self.store
            .as_ref()
            .ok_or_else(|| Error::internal("this registry has no store (trained models)"))
    }

    // ---- trained models ----------------------------------------------------------------

    /// The owner's trained models, newest first.
    pub async fn trained(&self, owner: &str) -> Result<Vec<ModelRecord>> {
        Ok(self.store()?.models().list(owner).await?)
    }

    /// One of the owner's trained models; another user's is "not found".
    pub async fn trained_model(&self, owner: &str, id: &str) -> Result<ModelRecord> {
        self.store()?
            .models()
            .get(owner, id)
            .await?
            .ok_or_else(|| Error::not_found("model"))
    }

    /// A trained model by id, whoever owns it (the command line, which has no user).
    pub async fn trained_by_id(&self, id: &str) -> Result<Option<ModelRecord>> {
        Ok(self.store()?.models().get_any(id).await?)
    }

    /// Every trained model (administrators' counts).
    pub async fn all_trained(&self) -> Result<Vec<ModelRecord>> {
        Ok(self.store()?.models().list_all().await?)
    }

    /// Resolves a model id for `owner`: one of their trained models (by `model_id`), else a
    /// base model (by name). Another user's model is "not found".
    pub async fn resolve(self: &Arc<Self>, owner: &str, id: &str) -> Result<Resolved> {
        if self.store.is_some()
            && let Some(m) = self.store()?.models().get(owner, id).await?
        {
            return self.resolve_record(id, &m).await;
        }
        match self.find_base(id).await? {
            Some(base) => Ok(Resolved {
                id: id.to_string(),
                base,
                adapter: None,
                kind: ModelKind::Base,
                system: None,
            }),
            None => Err(Error::new(
                Kind::NotFound,
                "model_not_found",
                format!("the model `{id}` does not exist (see /v1/models)"),
            )),
        }
    }

    async fn resolve_record(self: &Arc<Self>, id: &str, m: &ModelRecord) -> Result<Resolved> {
        if m.kind != ModelKind::Adapter {
            // A full or freeze fine-tune: its own folder holds whole weights, served like a
            // base model of its own (quantised at load).
            let dir = PathBuf::from(&m.model_path);
            let name = m.model_id.clone();
            let base = tokio::task::spawn_blocking(move || super::inspect(&dir, name))
                .await??
                .ok_or_else(|| {
                    Error::new(
                        Kind::NotFound,
                        "model_not_found",
                        format!("the model `{id}` has no weights left on the server"),
                    )
                })?;
            return Ok(Resolved {
                id: id.to_string(),
                base,
                adapter: None,
                kind: m.kind,
                system: m.system.clone(),
            });
        }
        let base = self.find_base(&m.base_model).await?.ok_or_else(|| {
            Error::new(
                Kind::NotFound,
                "model_not_found",
                format!(
                    "the adapter's base model `{}` is no longer in the models folder",
                    m.base_model
                ),
            )
        })?;
        Ok(Resolved {
            id: id.to_string(),
            base,
            adapter: Some(PathBuf::from(&m.model_path)),
            kind: m.kind,
            system: m.system.clone(),
        })
    }

    /// Resolves the original API's `model_path`: a trained model's path as the model lists
    /// show it (relative to the data dir), a base model's (relative to the models folder),
    /// a base model's name, or either as an absolute path.
    pub async fn resolve_path(self: &Arc<Self>, owner: &str, path: &str) -> Result<Resolved> {
        if let Some(trained_dir) = &self.trained_dir
            && let Some(data_dir) = trained_dir.parent()
            && let Some(wanted) = crate::text::resolve_client_path(data_dir, path)
            && let Some(m) = self
                .trained(owner)
                .await?
                .into_iter()
                .find(|m| Path::new(&m.model_path) == wanted)
        {
            return self.resolve_record(&m.model_id, &m).await;
        }
        let wanted = crate::text::resolve_client_path(&self.models_dir, path);
        let base = self
            .base_models()
            .await?
            .iter()
            .find(|b| Some(&b.path) == wanted.as_ref() || b.name == path)
            .cloned();
        match base {
            Some(b) => Ok(Resolved {
                id: b.name.clone(),
                base: b,
                adapter: None,
                kind: ModelKind::Base,
                system: None,
            }),
            None => Err(Error::new(
                Kind::NotFound,
                "model_not_found",
                "model_path: no base model or trained model of yours is at that path",
            )),
        }
    }

    /// Registers a finished task's output as the owner's model. The files directly in
    /// `output_dir` are hard-linked (copied across file systems) into the model's own folder,
    /// so the model outlives the task's outputs (deletion, retention) at no copying cost.
    pub async fn register_trained(
        &self,
        owner: &str,
        name: &str,
        kind: ModelKind,
        base_model: &str,
        output_dir: &Path,
        trained_with: TrainedWith,
    ) -> Result<ModelRecord> {
        let store = self.store()?;
        let trained_dir = self
            .trained_dir
            .as_ref()
            .ok_or_else(|| Error::internal("no trained-models folder"))?;
        let marker = match kind {
            ModelKind::Adapter => "adapter_model.safetensors",
            _ => "config.json",
        };
        if !tokio::fs::try_exists(output_dir.join(marker))
            .await
            .unwrap_or(false)
        {
            return Err(Error::internal(format!(
                "{marker} is missing from {}",
                output_dir.display()
            )));
        }
        let model_id = new_id();
        let dir = trained_dir.join(owner).join(&model_id);
        let size = match link_top_files(output_dir, &dir).await {
            Ok(size) => size,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&dir).await;
                return Err(e);
            }
        };
        let record = ModelRecord {
            model_id,
            owner: owner.to_string(),
            name: name.to_string(),
            model_path: dir.to_string_lossy().into_owned(),
            kind,
            base_model: base_model.to_string(),
            task_id: Some(trained_with.task_id),
            size,
            created_at: OffsetDateTime::now_utc(),
            template: trained_with.template,
            system: trained_with.system,
        };
        if let Err(e) = store.models().put(&record).await {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e.into());
        }
        Ok(record)
    }

    /// `<data_dir>/models`, where users' models live (a server's registry only).
    pub(crate) fn trained_dir(&self) -> Option<&Path> {
        self.trained_dir.as_deref()
    }

    /// Records a user's model whose files are in place.
    pub(crate) async fn put_trained(&self, record: &ModelRecord) -> Result<()> {
        Ok(self.store()?.models().put(record).await?)
    }

    /// One of the owner's trained models as a streamed `.tar.gz`: its file name and bytes.
    pub async fn archive(
        &self,
        owner: &str,
        id: &str,
    ) -> Result<(String, crate::training::artifacts::ArchiveStream)> {
        let model = self.trained_model(owner, id).await?;
        tokio::task::spawn_blocking(move || crate::training::artifacts::model_archive(&model))
            .await?
    }

    /// Removes one of the owner's trained models: its record and its files.
    pub async fn delete_trained(&self, owner: &str, id: &str) -> Result<ModelRecord> {
        let record = self
            .store()?
            .models()
            .remove(owner, id)
            .await?
            .ok_or_else(|| Error::not_found("model"))?;
        self.remove_files(Path::new(&record.model_path)).await;
        Ok(record)
    }

    /// Removes every trained model of a user (account deletion): records and files.
    pub async fn remove_owner(&self, owner: &str) -> Result<()> {
        for m in self.trained(owner).await? {
            self.store()?.models().remove(owner, &m.model_id).await?;
        }
        for e in self.store()?.exports().list(owner).await? {
            self.store()?.exports().remove(owner, &e.export_id).await?;
        }
        if let Some(dir) = &self.trained_dir {
            self.remove_files(&dir.join(owner)).await;
        }
        Ok(())
    }

    async fn remove_files(&self, dir: &Path) {
        // Only ever inside the trained-models folder.
        let inside = self
            .trained_dir
            .as_ref()
            .is_some_and(|root| dir.starts_with(root) && dir != root);
        if !inside {
            tracing::warn!(dir = %dir.display(), "not removing a folder outside the trained models");
            return;
        }
        if let Err(e) = tokio::fs::remove_dir_all(dir).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove a model's files");
        }
    }
}

fn find_in(models: &[BaseModel], name: &str) -> Option<BaseModel> {
    if let Some(m) = models.iter().find(|m| m.name == name) {
        return Some(m.clone());
    }
    let folder = super::catalogue_entry(name).map_or(name, |e| e.folder);
    models
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(folder))
        .cloned()
}

/// Hard-links (or copies, across file systems) the files directly in `from` into `to`;
/// returns their total size.
async fn link_top_files(from: &Path, to: &Path) -> Result<u64> {
    tokio::fs::create_dir_all(to).await?;
    let mut size = 0;
    let mut entries = tokio::fs::read_dir(from).await?;
    while let Some(e) = entries.next_entry().await? {
        let meta = e.metadata().await?;
        if !meta.is_file() {
            continue;
        }
        let target = to.join(e.file_name());
        if tokio::fs::hard_link(e.path(), &target).await.is_err() {
            tokio::fs::copy(e.path(), &target).await?;
        }
        size += meta.len();
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(dir: &Path, name: &str) {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("config.json"), br#"{"model_type": "llama"}"#).unwrap();
    }

    #[tokio::test]
    async fn discovery_is_cached_until_the_folder_changes() {
        let dir = tempfile::tempdir().unwrap();
        model(dir.path(), "A");
        let r = Registry::local(dir.path().to_path_buf());
        assert_eq!(r.base_models().await.unwrap().len(), 1);
        // A change inside a model folder is not a change of the folder: the cache holds.
        std::fs::write(dir.path().join("A").join("extra.bin"), b"x").unwrap();
        let first = r.base_models().await.unwrap();
        let again = r.base_models().await.unwrap();
        assert!(Arc::ptr_eq(&first, &again), "served from the cache");
        // A new model folder is seen once the cache is looked at again.
        model(dir.path(), "B");
        r.invalidate();
        assert_eq!(r.base_models().await.unwrap().len(), 2);
        // A folder made first and filled later (a copy in progress) is seen once filled.
        std::fs::create_dir_all(dir.path().join("C")).unwrap();
        r.invalidate();
        assert_eq!(r.base_models().await.unwrap().len(), 2, "not a model yet");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.path().join("C").join("config.json"), b"{}").unwrap();
        {
            // Past the recheck interval, without an explicit invalidation.
            r.cache().checked = Some(Instant::now() - RECHECK * 2);
        }
        assert_eq!(r.base_models().await.unwrap().len(), 3);
        let found = r.find_base("b").await.unwrap().unwrap();
        assert_eq!(found.name, "B", "names match ignoring case");
        assert!(found.created_at.is_some());
    }

    #[tokio::test]
    async fn a_model_folder_of_links_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::write(blobs.join("cfg"), br#"{"model_type": "llama"}"#).unwrap();
        std::fs::write(blobs.join("w"), b"GGUF-not-really").unwrap();
        let models = dir.path().join("models");
        let snapshot = models.join("Linked");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::os::unix::fs::symlink(blobs.join("cfg"), snapshot.join("config.json")).unwrap();
        std::os::unix::fs::symlink(blobs.join("w"), snapshot.join("model.gguf")).unwrap();
        // The model folder itself may be a link too.
        std::os::unix::fs::symlink(&snapshot, models.join("Alias")).unwrap();
        let r = Registry::local(models);
        let found = r.base_models().await.unwrap();
        let names: Vec<&str> = found.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["Alias", "Linked"]);
        assert!(found[1].gguf.is_some(), "a linked .gguf counts");
        assert!(
            found[1].size > 0,
            "linked files count with their targets' size"
        );
    }
}
