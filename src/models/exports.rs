//! Export jobs: a user asks for one of their models as a merged safetensors folder or a GGUF
//! ([`super::export`]); the job waits its turn (one export runs at a time: it reads and
//! writes whole models), reports progress in its store record, can be cancelled, and on
//! success registers the files as a new model of the user's — served by chat like any full
//! fine-tune, downloadable file by file.
//!
//! The files are written into a hidden folder beside the owner's models and renamed into
//! place when complete, so a failed or cancelled export leaves nothing behind. An export
//! running when the server stops is marked failed at the next start ([`Exports::recover`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::Semaphore;

use super::Registry;
use super::export::{ExportFormat, ExportSource, Quantization};
use crate::error::{Error, Kind, Result};
use crate::store::{ExportRecord, ExportStatus, ModelKind, ModelRecord, Store, new_id};

/// What a client asks for.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// `gguf` (default) or `safetensors`.
    #[serde(default = "default_format")]
    pub format: ExportFormat,
    /// GGUF: `f16`, `q8_0` (default), `q4_0`, `q4_k_m`, `f32`; safetensors: `f16` (default),
    /// `bf16`, `f32`.
    pub quantization: Option<Quantization>,
    /// The new model's name (default: the source's name and the quantization).
    pub name: Option<String>,
}

fn default_format() -> ExportFormat {
    ExportFormat::Gguf
}

pub struct Exports {
    store: Store,
    registry: Arc<Registry>,
    /// One export at a time.
    slot: Semaphore,
    /// Cancel flags of the exports not finished.
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// `export.queued|started|succeeded|failed|cancelled`, for webhooks.
    notices: crate::notify::Notices,
}

impl Exports {
    pub fn new(
        store: Store,
        registry: Arc<Registry>,
        notices: crate::notify::Notices,
    ) -> Arc<Exports> {
        Arc::new(Exports {
            notices,
            store,
            registry,
            slot: Semaphore::new(1),
            cancels: Mutex::new(HashMap::new()),
        })
    }

    fn cancels(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AtomicBool>>> {
        self.cancels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the exports a stopped server left unfinished as failed, and removes their
    /// partial files.
    pub async fn recover(&self) -> Result<()> {
        for e in self.store.exports().list_all().await? {
            if e.status.is_finished() {
                continue;
            }
            self.finish(&e.owner, &e.export_id, |r| {
                r.status = ExportStatus::Failed;
                r.error = Some("the server stopped during the export; start it again".into());
            })
            .await?;
            if let Some(dir) = self.partial_dir(&e.owner, &e.export_id) {
                let _ = tokio::fs::remove_dir_all(dir).await;
            }
        }
        Ok(())
    }

    fn partial_dir(&self, owner: &str, export_id: &str) -> Option<PathBuf> {
        self.registry
            .trained_dir()
            .map(|d| d.join(owner).join(format!(".export-{export_id}")))
    }

    async fn finish(
        &self,
        owner: &str,
        id: &str,
        change: impl Fn(&mut ExportRecord) + Send + 'static,
    ) -> Result<Option<ExportRecord>> {
        let record = self
            .store
            .exports()
            .update(owner, id, move |r| {
                change(r);
                r.finished_at = Some(OffsetDateTime::now_utc());
                true
            })
            .await?;
        if let Some(r) = &record {
            self.notify(r);
        }
        Ok(record)
    }

    /// Publishes the export's status as a notice.
    fn notify(&self, r: &ExportRecord) {
        let what = match r.status {
            ExportStatus::Queued => "queued",
            ExportStatus::Running => "started",
            ExportStatus::Succeeded => "succeeded",
            ExportStatus::Failed => "failed",
            ExportStatus::Cancelled => "cancelled",
        };
        let mut data = serde_json::json!({
            "export_id": r.export_id,
            "name": r.name,
            "source_model_id": r.source_model_id,
            "status": what,
        });
        if let Some(e) = &r.error {
            data["error"] = e.clone().into();
        }
        if let Some(m) = &r.model_id {
            data["model_id"] = m.clone().into();
        }
        self.notices.send(&r.owner, &format!("export.{what}"), data);
    }

    /// The owner's exports, newest first.
    pub async fn list(&self, owner: &str) -> Result<Vec<ExportRecord>> {
        let mut v = self.store.exports().list(owner).await?;
        v.sort_by_key(|e| std::cmp::Reverse(e.created_at));
        Ok(v)
    }

    pub async fn get(&self, owner: &str, id: &str) -> Result<ExportRecord> {
        self.store
            .exports()
            .get(owner, id)
            .await?
            .ok_or_else(|| Error::not_found("export"))
    }

    /// Asks a queued or running export to stop; a finished one is a conflict.
    pub async fn cancel(&self, owner: &str, id: &str) -> Result<ExportRecord> {
        let record = self.get(owner, id).await?;
        if record.status.is_finished() {
            return Err(Error::conflict(
                "export_finished",
                format!("the export has {} already", status_word(record.status)),
            ));
        }
        if let Some(flag) = self.cancels().get(id) {
            flag.store(true, Ordering::Relaxed);
        }
        Ok(record)
    }

    /// Checks the request against the model, records the export as queued and starts it.
    pub async fn start(
        self: &Arc<Self>,
        owner: &str,
        model_id: &str,
        req: ExportRequest,
    ) -> Result<ExportRecord> {
        let quant = req.quantization.unwrap_or(match req.format {
            ExportFormat::Gguf => Quantization::Q8_0,
            ExportFormat::Safetensors => Quantization::F16,
        });
        quant.check(req.format).map_err(Error::invalid)?;
        let name = match req.name.as_deref().map(crate::text::clean_name) {
            Some(n) if n.is_empty() || n.len() > 100 => {
                return Err(Error::invalid("name: 1 to 100 characters"));
            }
            Some(n) => Some(n),
            None => None,
        };
        let model = self.registry.trained_model(owner, model_id).await?;
        let source = self.source(&model, req.format).await?;
        let name = name.unwrap_or_else(|| format!("{}-{}", model.name, quant.name()));
        let record = ExportRecord {
            export_id: new_id(),
            owner: owner.to_string(),
            source_model_id: model.model_id.clone(),
            source_name: model.name.clone(),
            format: req.format,
            quantization: quant,
            name: name.clone(),
            status: ExportStatus::Queued,
            progress: 0.0,
            message: "waiting for the export before it".into(),
            error: None,
            model_id: None,
            report: None,
            created_at: OffsetDateTime::now_utc(),
            finished_at: None,
        };
        self.store.exports().put(&record).await?;
        self.notify(&record);
        let flag = Arc::new(AtomicBool::new(false));
        self.cancels()
            .insert(record.export_id.clone(), flag.clone());
        let this = self.clone();
        let (owner, id) = (owner.to_string(), record.export_id.clone());
        let src = ExportSource { name, ..source };
        tokio::spawn(async move {
            let outcome = this.run(&owner, &id, &model, src, flag).await;
            this.cancels().remove(&id);
            if let Err(e) = outcome {
                tracing::warn!(export = %id, error = %e.message, "export failed");
                let message = e.message.clone();
                if let Err(f) = this
                    .finish(&owner, &id, move |r| {
                        r.status = ExportStatus::Failed;
                        r.error = Some(message.clone());
                    })
                    .await
                {
                    tracing::error!(export = %id, error = %f.message, "could not record that an export failed");
                }
            }
        });
        Ok(record)
    }

    /// What the model's export reads; refused here (422) when it cannot be exported so.
    async fn source(&self, model: &ModelRecord, format: ExportFormat) -> Result<ExportSource> {
        let unprocessable = |m: String| Error::new(Kind::Invalid, "not_exportable", m);
        let base = self
            .registry
            .find_base(&model.base_model)
            .await?
            .ok_or_else(|| {
                unprocessable(format!(
                    "the model's base model `{}` is no longer in the models folder",
                    model.base_model
                ))
            })?;
        let dir = PathBuf::from(&model.model_path);
        let (adapter, full) = match model.kind {
            ModelKind::Adapter => (Some(dir), None),
            _ => {
                let has_weights = tokio::fs::try_exists(dir.join("config.json"))
                    .await
                    .unwrap_or(false);
                if !has_weights {
                    return Err(unprocessable(
                        "the model has no Hugging Face weights (it is a GGUF export): export \
                         the model it came from"
                            .into(),
                    ));
                }
                (None, Some(dir))
            }
        };
        if adapter.is_some() && base.hf_dir.is_none() {
            return Err(unprocessable(format!(
                "the base model `{}` has no Hugging Face weights to merge the adapter into",
                base.name
            )));
        }
        if format == ExportFormat::Gguf && base.gguf.is_none() {
            return Err(unprocessable(format!(
                "a GGUF export takes its tokenizer and architecture from the base model's \
                 GGUF, and `{}` has none: export safetensors",
                base.name
            )));
        }
        Ok(ExportSource {
            base,
            adapter,
            full,
            name: String::new(),
            system: model.system.clone(),
        })
    }

    async fn run(
        self: &Arc<Self>,
        owner: &str,
        id: &str,
        model: &ModelRecord,
        src: ExportSource,
        cancel: Arc<AtomicBool>,
    ) -> Result<()> {
        let _permit = self
            .slot
            .acquire()
            .await
            .map_err(|_| Error::internal("the export queue is closed"))?;
        if cancel.load(Ordering::Relaxed) {
            self.finish(owner, id, |r| r.status = ExportStatus::Cancelled)
                .await?;
            return Ok(());
        }
        let Some(record) = self
            .store
            .exports()
            .update(owner, id, |r| {
                r.status = ExportStatus::Running;
                r.message = "starting".into();
                true
            })
            .await?
        else {
            return Ok(()); // removed meanwhile (account deleted)
        };
        self.notify(&record);
        let partial = self
            .partial_dir(owner, id)
            .ok_or_else(|| Error::internal("no trained-models folder"))?;
        let _ = tokio::fs::remove_dir_all(&partial).await;
        tokio::fs::create_dir_all(&partial).await?;

        let (format, quant) = (record.format, record.quantization);
        let store = self.store.clone();
        let (o, i) = (owner.to_string(), id.to_string());
        let out = partial.clone();
        let flag = cancel.clone();
        let handle = tokio::runtime::Handle::current();
        let result = tokio::task::spawn_blocking(move || {
            let last = Mutex::new(Instant::now() - Duration::from_secs(10));
            let progress = |f: f64, what: &str| {
                if flag.load(Ordering::Relaxed) {
                    return false;
                }
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                if last.elapsed() >= Duration::from_millis(500) || f >= 1.0 {
                    *last = Instant::now();
                    let what = what.to_string();
                    // Progress is advisory: a failed write is retried at the next step.
                    let _ = handle.block_on(store.exports().update(&o, &i, move |r| {
                        // Never over a finished record.
                        if r.status != ExportStatus::Running {
                            return false;
                        }
                        r.progress = f;
                        r.message = what.clone();
                        true
                    }));
                }
                true
            };
            super::export::export(&src, format, quant, &out, &progress)
        })
        .await?;

        let report = match result {
            Ok(report) => report,
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&partial).await;
                if cancel.load(Ordering::Relaxed) {
                    self.finish(owner, id, |r| {
                        r.status = ExportStatus::Cancelled;
                        r.message = "cancelled".into();
                    })
                    .await?;
                    return Ok(());
                }
                return Err(Error::internal(format!("{e:#}")));
            }
        };

        // Register the files as the owner's model.
        let trained_dir = self
            .registry
            .trained_dir()
            .ok_or_else(|| Error::internal("no trained-models folder"))?;
        let model_id = new_id();
        let dir = trained_dir.join(owner).join(&model_id);
        tokio::fs::rename(&partial, &dir).await?;
        let size = report.files.iter().map(|f| f.size).sum();
        let registered = ModelRecord {
            model_id: model_id.clone(),
            owner: owner.to_string(),
            name: record.name.clone(),
            model_path: dir.to_string_lossy().into_owned(),
            kind: ModelKind::Full,
            base_model: model.base_model.clone(),
            task_id: model.task_id.clone(),
            size,
            created_at: OffsetDateTime::now_utc(),
            template: model.template.clone(),
            system: model.system.clone(),
        };
        if let Err(e) = self.registry.put_trained(&registered).await {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(e);
        }
        let done = self
            .finish(owner, id, move |r| {
                r.status = ExportStatus::Succeeded;
                r.progress = 1.0;
                r.message = "done".into();
                r.model_id = Some(model_id.clone());
                r.report = Some(report.clone());
            })
            .await?;
        if done.is_none() {
            // The account went while the export ran: take its model away too.
            let _ = self
                .registry
                .delete_trained(owner, &registered.model_id)
                .await;
        } else {
            tracing::info!(export = %id, model = %registered.model_id, "export registered");
        }
        Ok(())
    }

    /// A file of a succeeded export: its path (the export's model folder must still exist).
    pub async fn file(&self, owner: &str, id: &str, name: &str) -> Result<PathBuf> {
        let record = self.get(owner, id).await?;
        let (Some(model_id), Some(report)) = (&record.model_id, &record.report) else {
            return Err(Error::conflict(
                "export_not_ready",
                "the export has not succeeded (yet)",
            ));
        };
        if !report.files.iter().any(|f| f.name == name) {
            return Err(Error::not_found("file"));
        }
        let model = self.registry.trained_model(owner, model_id).await?;
        Ok(PathBuf::from(model.model_path).join(name))
    }
}

fn status_word(s: ExportStatus) -> &'static str {
    match s {
        ExportStatus::Succeeded => "succeeded",
        ExportStatus::Failed => "failed",
        ExportStatus::Cancelled => "been cancelled",
        ExportStatus::Queued | ExportStatus::Running => "not finished",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, status: ExportStatus) -> ExportRecord {
        ExportRecord {
            export_id: id.into(),
            owner: "u1".into(),
            source_model_id: "m1".into(),
            source_name: "arith".into(),
            format: ExportFormat::Gguf,
            quantization: Quantization::Q8_0,
            name: "arith-q8_0".into(),
            status,
            progress: 0.4,
            message: "quantising".into(),
            error: None,
            model_id: None,
            report: None,
            created_at: OffsetDateTime::now_utc(),
            finished_at: None,
        }
    }

    /// A server that stopped during an export finds it failed (with the reason) at its next
    /// start, its partial folder gone; finished exports are left as they were; a finished
    /// export cannot be cancelled; another user's is not found.
    #[tokio::test]
    async fn unfinished_exports_fail_at_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let registry = Registry::new(dir.path().join("models"), dir.path(), store.clone());
        let exports = Exports::new(store.clone(), registry, Default::default());
        for (id, status) in [
            ("e1", ExportStatus::Running),
            ("e2", ExportStatus::Queued),
            ("e3", ExportStatus::Succeeded),
        ] {
            store.exports().put(&record(id, status)).await.unwrap();
        }
        let partial = exports.partial_dir("u1", "e1").unwrap();
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::write(partial.join("x.gguf.partial"), b"half").unwrap();

        exports.recover().await.unwrap();
        for id in ["e1", "e2"] {
            let r = exports.get("u1", id).await.unwrap();
            assert_eq!(r.status, ExportStatus::Failed);
            assert!(r.error.unwrap().contains("server stopped"));
            assert!(r.finished_at.is_some());
        }
        assert!(!partial.exists(), "the partial files are removed");
        let done = exports.get("u1", "e3").await.unwrap();
        assert_eq!(done.status, ExportStatus::Succeeded);
        assert!(
            done.finished_at.is_none(),
            "a finished export is not touched"
        );

        let e = exports.cancel("u1", "e1").await.unwrap_err();
        assert_eq!(e.code, "export_finished");
        assert_eq!(
            exports.get("u2", "e1").await.unwrap_err().kind,
            Kind::NotFound
        );
        assert_eq!(exports.list("u1").await.unwrap().len(), 3);
    }
}
