//! Hub pulls the server runs for administrators ("Add model"): each one in the background,
//! its progress kept here for the UI to show. The list lives in memory — a pull interrupted
//! by a restart resumes from its partial folder when it is asked for again.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use utoipa::ToSchema;

use super::Registry;
use super::hub::{self, HubError, HubRef, HubSettings, Progress};
use crate::error::{Error, Kind, Result};

/// Pulls kept for showing (finished ones beyond this are forgotten, oldest first).
const KEEP: usize = 50;

/// One pull from the hub.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HubPull {
    pub id: String,
    /// `org/name`.
    pub repo: String,
    /// The revision asked for (none: the default branch).
    pub revision: Option<String>,
    /// The base model's name once it lands.
    pub name: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    /// The commit the revision resolved to, once known.
    pub commit: Option<String>,
    pub files_done: usize,
    pub files_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// The latest progress line.
    pub message: String,
    /// Why it failed.
    pub error: Option<String>,
    /// `not_found`, `gated`, `unauthorized`, `revision`, `no_weights`, `checksum`,
    /// `network`, `taken` or `other`.
    pub error_kind: Option<String>,
    /// Who asked for it.
    pub requested_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: time::OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<time::OffsetDateTime>,
}

pub struct Pulls {
    list: Mutex<Vec<HubPull>>,
    registry: Arc<Registry>,
    settings: HubSettings,
}

impl Pulls {
    pub fn new(registry: Arc<Registry>, settings: HubSettings) -> Arc<Pulls> {
        Arc::new(Pulls {
            list: Mutex::new(Vec::new()),
            registry,
            settings,
        })
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<HubPull>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every pull kept, newest first.
    pub fn all(&self) -> Vec<HubPull> {
        let mut v = self.list().clone();
        v.reverse();
        v
    }

    pub fn get(&self, id: &str) -> Result<HubPull> {
        self.list()
            .iter()
            .find(|p| p.id == id)
            .cloned()
            .ok_or_else(|| Error::not_found("pull"))
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut HubPull)) {
        if let Some(p) = self.list().iter_mut().find(|p| p.id == id) {
            f(p);
        }
    }

    /// Starts pulling `reference` (`org/name[@revision]`; `revision` may name the revision
    /// instead) as base model `name`, with `python` (the training environment's). Checks
    /// what can be checked at once: the reference, the name, a pull of that name running, a
    /// model of that name from elsewhere.
    pub async fn start(
        self: &Arc<Self>,
        reference: &str,
        revision: Option<&str>,
        name: Option<&str>,
        python: PathBuf,
        requested_by: &str,
    ) -> Result<HubPull> {
        let mut r = HubRef::parse(reference).map_err(to_error)?;
        if let Some(rev) = revision.map(str::trim).filter(|r| !r.is_empty()) {
            if r.revision.is_some() {
                return Err(Error::invalid(
                    "revision: give the revision once, in `repo` (`org/name@rev`) or here",
                ));
            }
            r = HubRef::parse(&format!("{}@{rev}", r.repo)).map_err(to_error)?;
        }
        let name = hub::model_name(&r, name).map_err(to_error)?;
        // Same name, from elsewhere: refuse now rather than after the download.
        let (models_dir, r2, n2) = (
            self.registry.models_dir().to_path_buf(),
            r.clone(),
            name.clone(),
        );
        tokio::task::spawn_blocking(move || -> Result<()> {
            let dir = models_dir.join(&n2);
            if dir.symlink_metadata().is_err() {
                return Ok(());
            }
            match hub::source_of(&dir) {
                Some(s) if s.repo.eq_ignore_ascii_case(&r2.repo) => Ok(()),
                _ => Err(Error::conflict(
                    "name_taken",
                    format!("a base model called `{n2}` exists already; choose another name"),
                )),
            }
        })
        .await??;
        let pull = {
            let mut list = self.list();
            if list
                .iter()
                .any(|p| p.state == "running" && p.name.eq_ignore_ascii_case(&name))
            {
                return Err(Error::conflict(
                    "pull_running",
                    format!("a pull of `{name}` is running already"),
                ));
            }
            let pull = HubPull {
                id: uuid::Uuid::now_v7().to_string(),
                repo: r.repo.clone(),
                revision: r.revision.clone(),
                name: name.clone(),
                state: "running".into(),
                commit: None,
                files_done: 0,
                files_total: 0,
                bytes_done: 0,
                bytes_total: 0,
                message: "starting".into(),
                error: None,
                error_kind: None,
                requested_by: requested_by.to_string(),
                started_at: time::OffsetDateTime::now_utc(),
                finished_at: None,
            };
            list.push(pull.clone());
            // Forget the oldest finished pulls beyond KEEP.
            while list.len() > KEEP {
                match list.iter().position(|p| p.state != "running") {
                    Some(i) => {
                        list.remove(i);
                    }
                    None => break,
                }
            }
            pull
        };
        let this = self.clone();
        let id = pull.id.clone();
        tokio::spawn(async move {
            let models_dir = this.registry.models_dir().to_path_buf();
            let completed = std::sync::atomic::AtomicU64::new(0);
            let progress = |p: Progress| {
                this.update(&id, |s| match p {
                    Progress::Plan {
                        commit,
                        files,
                        total,
                    } => {
                        s.commit = Some(commit);
                        s.files_total = files;
                        s.bytes_total = total;
                        s.message = format!("{files} files, {:.1} MB", total as f64 / 1e6);
                    }
                    Progress::Bytes { file, done } => {
                        s.bytes_done = done;
                        s.message = format!("downloading {file}");
                    }
                    Progress::File { name, size, .. } => {
                        s.files_done += 1;
                        s.message = format!("{name}: checksum ok");
                        s.bytes_done =
                            completed.fetch_add(size, std::sync::atomic::Ordering::Relaxed) + size;
                    }
                    Progress::Note(line) => s.message = line,
                })
            };
            let result = hub::pull(
                &models_dir,
                &r,
                Some(&name),
                &python,
                &this.settings,
                progress,
            )
            .await;
            this.registry.invalidate();
            let now = time::OffsetDateTime::now_utc();
            match result {
                Ok(_) => {
                    tracing::info!(repo = %r, model = %name, "hub pull done");
                    this.update(&id, |s| {
                        s.state = "done".into();
                        s.bytes_done = s.bytes_total;
                        s.finished_at = Some(now);
                    });
                }
                Err(e) => {
                    let kind = match &e {
                        HubError::Hub { kind, .. } => kind.clone(),
                        HubError::Taken(_) => "taken".into(),
                        _ => "other".into(),
                    };
                    tracing::warn!(repo = %r, model = %name, error = %format!("{e:#}"), "hub pull failed");
                    this.update(&id, |s| {
                        s.state = "failed".into();
                        s.error = Some(format!("{e:#}"));
                        s.error_kind = Some(kind);
                        s.finished_at = Some(now);
                    });
                }
            }
        });
        Ok(pull)
    }
}

fn to_error(e: HubError) -> Error {
    match e {
        HubError::Invalid(m) => Error::invalid(m),
        HubError::Taken(m) => Error::conflict("name_taken", m),
        HubError::Busy(m) => Error::conflict("pull_running", m),
        HubError::Hub { message, .. } => Error::new(Kind::Unavailable, "hub_failed", message),
        HubError::Other(e) => Error::internal(format!("{e:#}")),
    }
}
