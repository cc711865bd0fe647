//! `/health`, `/api/system/status`, `/api/system/resources`, `/api/system/alerts`.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ErrorBody, Json};
use super::extract::CurrentUser;
use super::{AppState, PullStatus};
use crate::error::Result;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(status))
        .routes(routes!(resources))
        .routes(routes!(alerts))
}

#[derive(Serialize, ToSchema)]
pub struct AlertList {
    /// The alerts that are on, oldest first (see the `alert_*` settings).
    alerts: Vec<crate::alerts::Alert>,
}

/// The operators' alerts that are on: a disk nearly full, memory, GPU temperature or memory
/// past the configured lines, each with its value and line. Administrators' webhooks that ask
/// for `alert.*` get them as they are raised and resolved.
#[utoipa::path(get, path = "/api/system/alerts", tag = "system",
    responses((status = 200, description = "Alerts that are on", body = AlertList),
              (status = 401, description = "No or bad credentials", body = ErrorBody)))]
async fn alerts(state: AppState, _user: CurrentUser) -> Json<AlertList> {
    Json(AlertList {
        alerts: state.alerts.active(),
    })
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok`.
    status: &'static str,
    version: &'static str,
    /// Whether the server sends e-mail (then the sign-in page offers password resets).
    mail: bool,
}

/// Liveness, without credentials.
#[utoipa::path(get, path = "/health", tag = "system", security(()),
    responses((status = 200, description = "The server answers", body = Health)))]
async fn health(state: AppState) -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        mail: state.auth.mail_enabled(),
    })
}

#[derive(Serialize, ToSchema)]
pub struct SystemStatus {
    version: &'static str,
    /// The training environment: `missing`, `installing`, `ready` or `failed`, with the
    /// installer's last lines.
    #[schema(value_type = Object)]
    environment: serde_json::Value,
    /// The base models' names.
    models: Vec<String>,
    /// The default model's pull at first start.
    model_pull: PullStatus,
    limits: Limits,
}

#[derive(Serialize, ToSchema)]
pub struct Limits {
    max_upload_bytes: u64,
    max_generation_tokens: usize,
}

/// The training environment, the base models, the default model's pull, limits.
#[utoipa::path(get, path = "/api/system/status", tag = "system",
    responses((status = 200, description = "What the server is ready for", body = SystemStatus),
              (status = 401, description = "No or bad credentials", body = ErrorBody)))]
async fn status(state: AppState, _user: CurrentUser) -> Result<Json<SystemStatus>> {
    let models = state
        .models
        .base_models()
        .await?
        .iter()
        .map(|m| m.name.clone())
        .collect();
    let pull = state
        .model_pull
        .read()
        .map(|s| s.clone())
        .unwrap_or_default();
    let environment = serde_json::to_value(state.training.env().status()).unwrap_or_default();
    Ok(Json(SystemStatus {
        version: env!("CARGO_PKG_VERSION"),
        environment,
        models,
        model_pull: pull,
        limits: Limits {
            max_upload_bytes: state.config.max_upload_bytes,
            max_generation_tokens: state.config.max_generation_tokens,
        },
    }))
}

#[derive(Serialize, ToSchema)]
pub struct Resources {
    #[schema(value_type = Object)]
    cpu: serde_json::Value,
    #[schema(value_type = Object)]
    memory: serde_json::Value,
    #[schema(value_type = Vec<Object>)]
    gpus: serde_json::Value,
    scheduler: Scheduler,
    running_tasks: Vec<RunningTask>,
    disk: Disk,
}

/// Disk space of the data and models directories, and what users take of it.
#[derive(Serialize, ToSchema)]
pub struct Disk {
    dirs: Vec<DirSpace>,
    /// Each user's share (an administrator sees everyone, largest first; others themselves);
    /// task folders and models from a walk at most half a minute old.
    users: Vec<crate::usage::UserDisk>,
}

#[derive(Serialize, ToSchema)]
pub struct DirSpace {
    /// `data` or `models`.
    name: String,
    total_bytes: u64,
    free_bytes: u64,
    free_percent: f64,
}

#[derive(Serialize, ToSchema)]
pub struct Scheduler {
    /// Training workers at once.
    slots: usize,
    gpu_ids: Vec<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct RunningTask {
    task_id: String,
    /// The worker's process id: administrators only.
    pid: Option<u32>,
    gpu_ids: Vec<u32>,
    rss_bytes: Option<u64>,
    gpu_memory_mib: Option<f64>,
}

/// CPU and memory always; GPUs (utilisation, memory, temperature) where present; the
/// caller's running workers (an administrator's: everyone's) with their memory.
#[utoipa::path(get, path = "/api/system/resources", tag = "system",
    responses((status = 200, description = "The machine and the running workers", body = Resources),
              (status = 401, description = "No or bad credentials", body = ErrorBody)))]
async fn resources(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<Resources>> {
    let cpu = crate::system::cpu(Duration::from_millis(200)).await;
    let dirs = [
        ("data", state.config.data_dir.clone()),
        ("models", state.config.models_dir.clone()),
    ];
    let (gpus, procs, memory, dirs) = tokio::task::spawn_blocking(move || {
        let dirs: Vec<DirSpace> = dirs
            .iter()
            .filter_map(|(name, dir)| {
                // A directory not made yet is on its nearest existing parent's disk.
                dir.ancestors()
                    .find_map(crate::system::disk_space)
                    .map(|d| DirSpace {
                        name: name.to_string(),
                        total_bytes: d.total_bytes,
                        free_bytes: d.free_bytes,
                        free_percent: (d.free_bytes as f64 / d.total_bytes as f64 * 1000.0).round()
                            / 10.0,
                    })
            })
            .collect();
        (
            crate::system::gpus(),
            crate::system::gpu_processes(),
            crate::system::memory(),
            dirs,
        )
    })
    .await?;
    let users: Vec<crate::usage::UserDisk> = state
        .usage
        .per_user()
        .await?
        .into_iter()
        .filter(|u| p.is_admin() || u.user_id == p.user.user_id)
        .collect();
    let mine: HashMap<String, ()> = if p.is_admin() {
        HashMap::new()
    } else {
        state
            .training
            .list(&p.user.user_id)
            .await?
            .into_iter()
            .map(|t| (t.task_id, ()))
            .collect()
    };
    let running_tasks = state
        .training
        .running_workers()
        .into_iter()
        .filter(|(id, _, _)| p.is_admin() || mine.contains_key(id))
        .map(|(task_id, pid, gpu_ids)| RunningTask {
            task_id,
            pid: p.is_admin().then_some(pid),
            gpu_ids,
            rss_bytes: crate::system::process_rss(pid),
            gpu_memory_mib: procs.get(&pid).copied(),
        })
        .collect();
    Ok(Json(Resources {
        cpu: serde_json::to_value(cpu).unwrap_or_default(),
        memory: serde_json::to_value(memory).unwrap_or_default(),
        gpus: serde_json::to_value(gpus).unwrap_or_default(),
        scheduler: Scheduler {
            slots: state.training.max_concurrent(),
            gpu_ids: state.training.gpu_ids().to_vec(),
        },
        running_tasks,
        disk: Disk { dirs, users },
    }))
}
