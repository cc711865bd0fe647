//! The HTTP server: axum router, shared state, middleware, the OpenAPI document, graceful
//! shutdown.
//!
//! Handlers are thin: an extractor (who calls, what they sent), one call to a service, a
//! typed view. Every route is registered through `utoipa_axum`'s `routes!` with its
//! `#[utoipa::path]`, so the document at `/openapi.json` covers every route by construction
//! (`openapi::tests` guards it).

mod admin;
mod audit;
mod auth;
mod backup;
mod chat;
mod datasets;
pub mod error;
mod evaluations;
mod exports;
mod extract;
mod fine_tuning;
mod logs;
mod metrics;
mod models;
mod notifications;
mod openai;
pub mod openapi;
mod system;
mod tasks;
mod templates;
pub mod ui;
mod views;
mod webhooks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, Request, header};
use serde_json::json;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use utoipa_axum::router::OpenApiRouter;

use crate::accounts::Accounts;
use crate::auth::Auth;
use crate::chat::{Chat, GenerationLimits, Sessions};
use crate::config::Config;
use crate::datasets::Datasets;
use crate::error::{Error, Kind};
use crate::locks::OwnerLocks;
use crate::models::Registry;
use crate::pyenv::{EnvTracker, PyEnv};
use crate::store::Store;
use crate::training::Training;

/// Everything a handler may need: the services. Cheap to clone. (The store is not here:
/// handlers reach data only through the services.)
#[derive(Clone)]
pub struct AppState(Arc<App>);

pub struct App {
    pub config: Config,
    pub auth: Arc<Auth>,
    pub accounts: Arc<Accounts>,
    pub datasets: Datasets,
    pub training: Arc<Training>,
    pub models: Arc<Registry>,
    pub chat: Arc<Chat>,
    /// Hub pulls started from the API ("Add model").
    pub pulls: Arc<crate::models::pulls::Pulls>,
    /// Exports of users' models (merged safetensors, GGUF).
    pub exports: Arc<crate::models::exports::Exports>,
    /// Progress of the default model's pull at start, for `/api/system/status`.
    pub model_pull: std::sync::RwLock<PullStatus>,
    /// What `/metrics` serves.
    pub metrics: metrics::Metrics,
    /// The audit log.
    pub audit: Arc<crate::audit::Audit>,
    /// E-mail through the configured relay, if any.
    pub mailer: Option<Arc<crate::mail::Mailer>>,
    /// Each user's disk use (walked at most once a minute).
    pub usage: Arc<crate::usage::DiskUsage>,
    /// What happens to users' tasks, evaluations and exports (webhooks listen).
    pub notices: crate::notify::Notices,
    pub webhooks: Arc<crate::webhooks::Webhooks>,
    /// Operators' alerts (thresholds checked periodically).
    pub alerts: Arc<crate::alerts::Alerts>,
    /// Backups of the whole server, and users' own data exports.
    pub backups: crate::backup::Backups,
}

/// What the server is doing about its default model.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct PullStatus {
    /// `idle`, `pulling`, `done` or `failed`.
    pub state: String,
    pub model: String,
    pub message: String,
}

impl std::ops::Deref for AppState {
    type Target = App;
    fn deref(&self) -> &App {
        &self.0
    }
}

impl FromRequestParts<AppState> for AppState {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(_: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        Ok(state.clone())
    }
}

impl AppState {
    /// Sets up every service over `store` for `config` (whose directories must be absolute;
    /// see [`absolute_dirs`]).
    pub fn new(config: Config, store: Store) -> anyhow::Result<AppState> {
        let mailer = crate::mail::Mailer::from_config(&config)?;
        let auth = Auth::new(store.clone(), &config, mailer.clone())?;
        let audit = crate::audit::Audit::new(store.clone(), config.audit_retention_days);
        let backups = crate::backup::Backups::new(store.clone(), config.data_dir.clone());
        let datasets = Datasets::new(
            store.clone(),
            config.datasets_dir(),
            config.tmp_dir(),
            config.max_upload_bytes,
        )?;
        let models = Registry::new(config.models_dir.clone(), &config.data_dir, store.clone());
        let notices = crate::notify::Notices::default();
        let exports =
            crate::models::exports::Exports::new(store.clone(), models.clone(), notices.clone());
        let env = EnvTracker::new(PyEnv::locate(Some(&config.python_env_dir)));
        let owners = Arc::new(OwnerLocks::new());
        let training = Training::new(
            store.clone(),
            &config,
            env,
            datasets.clone(),
            models.clone(),
            owners,
            notices.clone(),
        );
        let accounts = Accounts::new(
            store.clone(),
            auth.clone(),
            training.clone(),
            datasets.clone(),
            models.clone(),
        );
        let engine =
            crate::inference::Engine::with_registry(models.clone(), config.engine_options());
        let limits = GenerationLimits::new(
            config.max_concurrent_generations,
            config.max_generations_per_user,
        );
        let metrics = metrics::Metrics::new(engine.metrics());
        let chat = Chat::new(engine, models.clone(), limits, Sessions::new(store.clone()));
        let pulls = crate::models::pulls::Pulls::new(models.clone(), config.hub());
        let webhooks = crate::webhooks::Webhooks::new(
            store.clone(),
            crate::webhooks::Policy {
                max_attempts: config.webhook_max_attempts.max(1),
                retry_base: Duration::from_millis(config.webhook_retry_base_ms),
                timeout: Duration::from_secs(config.webhook_timeout_secs.max(1)),
                allow_private: config.webhook_allow_private_addresses,
            },
        )?;
        let alerts = crate::alerts::Alerts::new(
            crate::alerts::Thresholds {
                disk_free_percent: config.alert_disk_free_percent,
                memory_percent: config.alert_memory_percent,
                gpu_temperature_c: config.alert_gpu_temperature_c,
                gpu_memory_percent: config.alert_gpu_memory_percent,
                worker_silent_secs: config.alert_worker_silent_secs,
                every: Duration::from_secs(config.alert_check_secs.max(1)),
                dirs: vec![
                    ("data".into(), config.data_dir.clone()),
                    ("models".into(), config.models_dir.clone()),
                ],
            },
            Some(training.clone()),
            store.clone(),
            notices.clone(),
        );
        Ok(AppState(Arc::new(App {
            mailer,
            usage: crate::usage::DiskUsage::new(store.clone()),
            alerts,
            audit,
            notices,
            webhooks,
            backups,
            exports,
            metrics,
            pulls,
            config,
            auth,
            accounts,
            datasets,
            training,
            models,
            chat,
            model_pull: std::sync::RwLock::new(PullStatus {
                state: "idle".into(),
                ..PullStatus::default()
            }),
        })))
    }

    /// Opens the store in the data dir and sets up every service.
    pub fn open(config: Config) -> anyhow::Result<(AppState, Store)> {
        std::fs::create_dir_all(&config.data_dir)?;
        let store = Store::open(&config.store_dir())?;
        Ok((AppState::new(config, store.clone())?, store))
    }
}

/// Makes the configured directories absolute, so recorded paths stay valid whatever the
/// working directory of a later process.
pub fn absolute_dirs(config: &mut Config) -> std::io::Result<()> {
    config.data_dir = std::path::absolute(&config.data_dir)?;
    config.models_dir = std::path::absolute(&config.models_dir)?;
    Ok(())
}

/// Every documented route (all of them) and the OpenAPI document they make.
pub fn api(max_upload_bytes: u64) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(openapi::base())
        .merge(system::router())
        .merge(metrics::router())
        .merge(auth::router())
        .merge(datasets::router(max_upload_bytes))
        .merge(admin::router())
        .merge(audit::router())
        .merge(logs::router())
        .merge(webhooks::router())
        .merge(notifications::router())
        .merge(backup::router())
        .merge(tasks::router())
        .merge(templates::router())
        .merge(models::router(max_upload_bytes))
        .merge(exports::router())
        .merge(evaluations::router())
        .merge(chat::router())
        .merge(openai::router())
        .merge(fine_tuning::router(max_upload_bytes))
        .split_for_parts()
}

pub fn router(state: AppState) -> Router {
    let x_request_id = HeaderName::from_static("x-request-id");
    let ui_source = ui::Source::from_env();
    let (routes, doc) = api(state.config.max_upload_bytes);
    let doc = Arc::new(doc);
    let api = routes
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { axum::Json(doc.as_ref().clone()) }
            }),
        )
        .layer(axum::middleware::map_response(openai::errors_on_v1))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::audit::track,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .fallback(move |req: axum::extract::Request| ui_or_not_found(ui_source.clone(), req))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.max_json_bytes));

    let trace = tower_http::trace::TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| req.uri().path().to_string());
        let id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        tracing::info_span!("request", method = %req.method(), route = %route, request_id = %id)
    });

    let mut app = api
        // Browsers must take every answer for the type it says it is.
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(trace)
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid));
    if let Some(cors) = cors_layer(&state.config.cors_origins) {
        app = app.layer(cors);
    }
    app.with_state(state)
}

fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let base = CorsLayer::new()
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .max_age(Duration::from_secs(3600));
    if origins.iter().any(|o| o == "*") {
        return Some(base.allow_origin(AllowOrigin::any()));
    }
    let list: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| match HeaderValue::from_str(o) {
            Ok(v) => Some(v),
            Err(_) => {
                tracing::warn!(origin = %o, "ignoring an invalid CORS origin");
                None
            }
        })
        .collect();
    Some(base.allow_origin(list).allow_credentials(true))
}

/// The web UI for page and asset requests; the JSON 404 for everything else.
async fn ui_or_not_found(
    source: ui::Source,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if req.uri().path().starts_with("/v1/") {
        return openai::unknown_v1_route(req.method(), req.uri().path());
    }
    ui::serve(source, req, not_found().into_response()).await
}

fn not_found() -> Error {
    Error::new(Kind::NotFound, "no_route", "no such route")
}

async fn method_not_allowed() -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    (
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        axum::Json(json!({"error": "method not allowed", "code": "method_not_allowed"})),
    )
}

/// Serves until SIGTERM or Ctrl-C, then drains in-flight requests and flushes the store.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let (state, store) = tokio::task::block_in_place(|| AppState::open(config))?;
    let listener = tokio::net::TcpListener::bind(state.config.bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", state.config.bind))?;
    let addr = listener.local_addr()?;

    let sweeper = {
        let auth = state.auth.clone();
        let audit = state.audit.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(3600));
            loop {
                tick.tick().await;
                match auth.sweep_expired().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "expired refresh tokens swept"),
                    Err(e) => tracing::warn!(error = %e, "refresh token sweep failed"),
                }
                match audit.sweep().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "audit entries past retention swept"),
                    Err(e) => tracing::warn!(error = %e, "audit retention sweep failed"),
                }
            }
        })
    };

    // Listening before recovery, so the tasks and exports it marks failed reach webhooks.
    let deliverer = state.webhooks.spawn(&state.notices);
    if let Some(mailer) = &state.mailer {
        mailer.spawn_notices(store.clone(), &state.notices);
    }
    state.training.recover().await?;
    state.exports.recover().await?;
    let background = state.training.spawn_background();
    let watcher = state.alerts.spawn();
    if state.config.auto_setup && !state.training.env().is_ready() {
        let env = state.training.env().clone();
        tokio::spawn(async move { env.ensure().await });
    }
    spawn_default_model_pull(&state).await;

    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    tracing::info!(
        startup_ms = started.elapsed().as_millis() as u64,
        "listening on http://{addr}"
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    sweeper.abort();
    deliverer.abort();
    watcher.abort();
    for task in background {
        task.abort();
    }
    store.flush().await?;
    tracing::info!("stopped");
    Ok(())
}

/// Pulls the configured default model in the background when the models dir has none, so a
/// fresh install can chat and train without a manual step.
async fn spawn_default_model_pull(state: &AppState) {
    let name = state.config.default_model.trim().to_string();
    if name.is_empty() {
        return;
    }
    let models_dir = state.config.models_dir.clone();
    match state.models.base_models().await {
        Ok(models) if !models.is_empty() => return,
        Err(e) => {
            tracing::warn!(dir = %models_dir.display(), error = %e, "cannot read the models dir");
            return;
        }
        _ => {}
    }
    let state = state.clone();
    tokio::spawn(async move {
        let set = |st: &str, msg: &str| {
            if let Ok(mut s) = state.model_pull.write() {
                s.state = st.into();
                s.model = name.clone();
                s.message = msg.into();
            }
        };
        set("pulling", "starting");
        tracing::info!(model = %name, dir = %models_dir.display(), "no base model yet: pulling the default model");
        let progress = |line: &str| {
            tracing::info!(target: "ferrotune::models", "{line}");
            if let Ok(mut s) = state.model_pull.write() {
                s.message = line.to_string();
            }
        };
        let pulled = if name.contains('/') {
            // A hub id: huggingface_hub comes with the training environment.
            let env = state.training.env();
            let ready = env.ready_signal();
            while !env.is_ready() {
                if env.status().state == crate::pyenv::EnvState::Failed {
                    break;
                }
                progress("waiting for the training environment (its huggingface_hub downloads)");
                let _ = tokio::time::timeout(Duration::from_secs(2), ready.notified()).await;
            }
            match crate::models::hub::HubRef::parse(&name) {
                Ok(r) => crate::models::hub::pull(
                    &models_dir,
                    &r,
                    None,
                    &env.env().python(),
                    &state.config.hub(),
                    |p| {
                        if let crate::models::hub::Progress::Note(line) = &p {
                            progress(line);
                        } else if let crate::models::hub::Progress::File { name, .. } = &p {
                            progress(&format!("{name}: checksum ok"));
                        }
                    },
                )
                .await
                .map_err(anyhow::Error::from),
                Err(e) => Err(anyhow::Error::from(e)),
            }
        } else {
            let python = std::path::PathBuf::from(crate::pyenv::BUILD_PYTHON);
            crate::models::pull(&models_dir, &name, &python, progress).await
        };
        match pulled {
            Ok(m) => {
                state.models.invalidate();
                set("done", &format!("{} ready", m.name));
                tracing::info!(model = %m.name, "default model ready");
            }
            Err(e) => {
                set("failed", &format!("{e:#}"));
                tracing::error!(model = %name, error = %format!("{e:#}"), "pulling the default model failed");
            }
        }
    });
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
