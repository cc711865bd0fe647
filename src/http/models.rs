//! `/api/files/models…` and `/api/models/available`: base models and the models users
//! trained.

use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ErrorBody, Json, Path, Query};
use super::extract::{AdminUser, CurrentUser};
use super::tasks::gzip_download;
use super::views::{Message, ModelView};
use crate::error::{Error, Kind, Result};
use crate::store::ModelKind;

pub fn router(max_upload: u64) -> OpenApiRouter<AppState> {
    let body_limit =
        usize::try_from(max_upload + super::datasets::MULTIPART_OVERHEAD).unwrap_or(usize::MAX);
    OpenApiRouter::new()
        .routes(routes!(upload_adapter))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .routes(routes!(list_models, register_model))
        .routes(routes!(model_detail, delete_model))
        .routes(routes!(download_model))
        .routes(routes!(available_models))
        .routes(routes!(list_pulls, start_pull))
        .routes(routes!(get_pull))
}

/// The adapter upload form.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AdapterForm {
    /// A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) packed as
    /// `.zip` or `.tar.gz`.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// The model's name (default: the archive's name).
    name: Option<String>,
    /// The base model it was trained on (default: the adapter's `base_model_name_or_path`,
    /// matched by name, by the last part of a hub id or path, or by the hub repository a base
    /// model was pulled from).
    base_model: Option<String>,
}

/// Bring your own adapter: uploads a PEFT LoRA adapter, checks it against its base model
/// exactly as chat will load it, and registers it as one of the caller's models (chat,
/// download and delete like a trained one).
#[utoipa::path(post, path = "/api/files/models/adapters", tag = "models",
    request_body(content = AdapterForm, content_type = "multipart/form-data"),
    responses((status = 201, description = "Registered", body = ModelView),
              (status = 400, description = "Not multipart, or no `file` field", body = ErrorBody),
              (status = 413, description = "Larger than `max_upload_bytes`", body = ErrorBody),
              (status = 422, description = "Not an archive, not a PEFT LoRA adapter, an unknown base model, or an adapter that does not fit its base (the code says which)", body = ErrorBody),
              (status = 507, description = "The server's disk is full; nothing was kept", body = ErrorBody)))]
async fn upload_adapter(
    state: AppState,
    CurrentUser(p): CurrentUser,
    multipart: std::result::Result<
        axum::extract::Multipart,
        axum::extract::multipart::MultipartRejection,
    >,
) -> Result<(axum::http::StatusCode, Json<ModelView>)> {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let max = state.datasets.max_bytes();
    let mut multipart = super::datasets::form(multipart)?;
    let tmp_dir = state.config.tmp_dir();
    tokio::fs::create_dir_all(&tmp_dir).await?;
    let archive = tempfile::Builder::new()
        .prefix("adapter-")
        .tempfile_in(&tmp_dir)?
        .into_temp_path();
    let (mut name, mut base_model, mut file_name) = (None, None, None);
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| super::datasets::multipart_error(e, max))?
    {
        match field.name() {
            Some("file") => {
                file_name = Some(field.file_name().unwrap_or("adapter").to_string());
                let mut f = tokio::fs::File::create(&archive).await?;
                let mut written = 0u64;
                while let Some(chunk) = field.next().await {
                    let chunk = chunk.map_err(|e| super::datasets::multipart_error(e, max))?;
                    written += chunk.len() as u64;
                    if written > max {
                        return Err(crate::datasets::too_large(max));
                    }
                    f.write_all(&chunk).await?;
                }
                f.flush().await?;
            }
            Some(key @ ("name" | "base_model")) => {
                let key = key.to_string();
                let text = field
                    .text()
                    .await
                    .map_err(|e| super::datasets::multipart_error(e, max))?;
                let text = Some(text).filter(|t| !t.trim().is_empty());
                if key == "name" {
                    name = text;
                } else {
                    base_model = text;
                }
            }
            _ => {}
        }
    }
    let file_name = file_name.ok_or_else(|| Error::bad_request("no `file` field in the form"))?;
    let record = state
        .models
        .import_adapter(
            &p.user.user_id,
            crate::models::adapters::AdapterUpload {
                archive: archive.to_path_buf(),
                file_name,
                name,
                base_model,
                max_bytes: max,
            },
        )
        .await?;
    tracing::info!(user = %p.user.username, model_id = %record.model_id, base = %record.base_model, "adapter uploaded");
    Ok((
        axum::http::StatusCode::CREATED,
        Json(ModelView::trained(&state, &record)),
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartPull {
    /// The hub model id, `organisation/name`, optionally `@revision` (a branch, tag or
    /// commit), e.g. `Qwen/Qwen2.5-0.5B-Instruct`.
    repo: String,
    /// The revision, when `repo` does not name one (default: the default branch).
    revision: Option<String>,
    /// The base model's name (default: the repository's name).
    name: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct PullList {
    pulls: Vec<crate::models::pulls::HubPull>,
}

/// Pulls a model from the configured Hugging Face–compatible hub (administrators): only the
/// files a model needs (safetensors, config, tokenizer), resumable, every file checked
/// against the hub's checksums, renamed into the models folder when complete. Runs in the
/// background: follow it with `GET /api/models/pulls/{id}`.
#[utoipa::path(post, path = "/api/models/pulls", tag = "models", request_body = StartPull,
    responses((status = 202, description = "Started", body = crate::models::pulls::HubPull),
              (status = 403, description = "Not an administrator", body = ErrorBody),
              (status = 409, description = "The name is another model's, or a pull of it is running", body = ErrorBody),
              (status = 422, description = "Not a hub id, or a bad name", body = ErrorBody),
              (status = 503, description = "The training environment (which has the hub client) is not ready", body = ErrorBody)))]
async fn start_pull(
    state: AppState,
    AdminUser(admin): AdminUser,
    Json(body): Json<StartPull>,
) -> Result<(axum::http::StatusCode, Json<crate::models::pulls::HubPull>)> {
    let env = state.training.env();
    if !env.is_ready() {
        return Err(Error::new(
            Kind::Unavailable,
            "environment_not_ready",
            "hub pulls use the training environment's huggingface_hub, which is not installed \
             yet (see /api/system/status)",
        ));
    }
    let pull = state
        .pulls
        .start(
            &body.repo,
            body.revision.as_deref(),
            body.name.as_deref(),
            env.env().python(),
            &admin.user.username,
        )
        .await?;
    tracing::info!(admin = %admin.user.username, repo = %pull.repo, model = %pull.name, "hub pull started");
    Ok((axum::http::StatusCode::ACCEPTED, Json(pull)))
}

/// The hub pulls since the server started, newest first (administrators).
#[utoipa::path(get, path = "/api/models/pulls", tag = "models",
    responses((status = 200, description = "The pulls", body = PullList),
              (status = 403, description = "Not an administrator", body = ErrorBody)))]
async fn list_pulls(state: AppState, _admin: AdminUser) -> Result<Json<PullList>> {
    Ok(Json(PullList {
        pulls: state.pulls.all(),
    }))
}

/// One hub pull: its state, files and bytes so far, and why it failed.
#[utoipa::path(get, path = "/api/models/pulls/{id}", tag = "models",
    params(("id" = String, Path, description = "The pull's id")),
    responses((status = 200, description = "The pull", body = crate::models::pulls::HubPull),
              (status = 403, description = "Not an administrator", body = ErrorBody),
              (status = 404, description = "No such pull", body = ErrorBody)))]
async fn get_pull(
    state: AppState,
    _admin: AdminUser,
    Path(id): Path<String>,
) -> Result<Json<crate::models::pulls::HubPull>> {
    Ok(Json(state.pulls.get(&id)?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct KindQuery {
    /// Only models of this kind: `base`, `adapter` or `full`.
    kind: Option<ModelKind>,
}

#[derive(Serialize, ToSchema)]
pub struct ModelList {
    models: Vec<ModelView>,
}

/// Every model of the caller's, with `kind`: the base models (folders in the models dir) and
/// the models they trained.
async fn all_models(state: &AppState, owner: &str) -> Result<Vec<ModelView>> {
    let mut models: Vec<ModelView> = state
        .models
        .base_models()
        .await?
        .iter()
        .map(|m| ModelView::base(state, m))
        .collect();
    let trained = state.models.trained(owner).await?;
    let warnings = template_warnings(state, &trained).await?;
    models.extend(trained.iter().zip(warnings).map(|(m, w)| {
        let mut v = ModelView::trained(state, m);
        v.template_warning = w;
        v
    }));
    Ok(models)
}

/// For each trained model, whether its training template and the chat template chat will
/// use differ (the base's for an adapter, its own folder's for a full fine-tune). Reads the
/// templates on the blocking pool, each base once.
async fn template_warnings(
    state: &AppState,
    trained: &[crate::store::ModelRecord],
) -> Result<Vec<Option<String>>> {
    let registry = state.models.clone();
    let jobs: Vec<(Option<String>, ModelKind, String, String)> = trained
        .iter()
        .map(|m| {
            (
                m.template.clone(),
                m.kind,
                m.base_model.clone(),
                m.model_path.clone(),
            )
        })
        .collect();
    Ok(tokio::task::spawn_blocking(move || {
        let mut bases: std::collections::HashMap<String, Option<String>> = Default::default();
        jobs.into_iter()
            .map(|(template, kind, base, path)| {
                let template = template?;
                let chat_template = if kind == ModelKind::Adapter {
                    bases
                        .entry(base.clone())
                        .or_insert_with(|| {
                            let b = registry.find_base_blocking(&base).ok().flatten()?;
                            crate::models::templates::chat_template_of(
                                b.hf_dir.as_deref().unwrap_or(&b.path),
                            )
                        })
                        .clone()
                } else {
                    crate::models::templates::chat_template_of(std::path::Path::new(&path))
                };
                crate::models::templates::mismatch(&template, chat_template.as_deref())
            })
            .collect()
    })
    .await?)
}

/// Base models and the caller's trained models (`?kind=` to filter).
#[utoipa::path(get, path = "/api/files/models", tag = "models", params(KindQuery),
    responses((status = 200, description = "The models", body = ModelList),
              (status = 400, description = "An unknown kind", body = ErrorBody)))]
async fn list_models(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Query(q): Query<KindQuery>,
) -> Result<Json<ModelList>> {
    let models = all_models(&state, &p.user.user_id)
        .await?
        .into_iter()
        .filter(|m| q.kind.is_none_or(|k| m.kind == k))
        .collect();
    Ok(Json(ModelList { models }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterModel {
    /// The model folder's absolute path on the server (config.json with safetensors
    /// weights, or a `.gguf`; a Hugging Face cache snapshot works as it is).
    path: String,
    /// The base model's name (default: the folder's name).
    name: Option<String>,
}

/// Registers a model folder already on the server as a base model (administrators): a
/// symbolic link in the models folder. Chat quantises it at load like any base model.
#[utoipa::path(post, path = "/api/files/models", tag = "models", request_body = RegisterModel,
    responses((status = 201, description = "Registered", body = ModelView),
              (status = 403, description = "Not an administrator", body = ErrorBody),
              (status = 409, description = "The name is taken, or the folder is in the models folder", body = ErrorBody),
              (status = 422, description = "No folder, no model in it, or a bad name", body = ErrorBody)))]
async fn register_model(
    state: AppState,
    AdminUser(admin): AdminUser,
    Json(body): Json<RegisterModel>,
) -> Result<(axum::http::StatusCode, Json<ModelView>)> {
    let m = state
        .models
        .register_folder(&body.path, body.name.as_deref())
        .await?;
    tracing::info!(admin = %admin.user.username, model = %m.name, "base model registered");
    Ok((
        axum::http::StatusCode::CREATED,
        Json(ModelView::base(&state, &m)),
    ))
}

/// One model: a trained model of the caller's by id, or a base model by name.
#[utoipa::path(get, path = "/api/files/models/{id}", tag = "models",
    params(("id" = String, Path, description = "A trained model's id or a base model's name")),
    responses((status = 200, description = "The model", body = ModelView),
              (status = 404, description = "No such model", body = ErrorBody)))]
async fn model_detail(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<ModelView>> {
    match state.models.trained_model(&p.user.user_id, &id).await {
        Ok(m) => {
            let mut v = ModelView::trained(&state, &m);
            v.template_warning = template_warnings(&state, std::slice::from_ref(&m))
                .await?
                .pop()
                .flatten();
            return Ok(Json(v));
        }
        Err(e) if e.kind != Kind::NotFound => return Err(e),
        Err(_) => {}
    }
    state
        .models
        .base_models()
        .await?
        .iter()
        .find(|m| m.name == id)
        .map(|m| Json(ModelView::base(&state, m)))
        .ok_or_else(|| Error::not_found("model"))
}

/// Removes one of the caller's trained models (its record and files). Base models are
/// folders in the models dir: remove the folder to remove one.
#[utoipa::path(delete, path = "/api/files/models/{id}", tag = "models",
    params(("id" = String, Path, description = "A trained model's id")),
    responses((status = 200, description = "Removed", body = Message),
              (status = 403, description = "A base model", body = ErrorBody),
              (status = 404, description = "No such model of yours", body = ErrorBody)))]
async fn delete_model(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Message>> {
    match state.models.delete_trained(&p.user.user_id, &id).await {
        Ok(m) => Ok(Json(Message::new(format!("removed model {}", m.name)))),
        Err(e) if e.kind == Kind::NotFound => {
            if state.models.find_base(&id).await?.is_some() {
                Err(Error::forbidden(
                    "base models are folders in the models dir; remove the folder to remove one",
                ))
            } else {
                Err(e)
            }
        }
        Err(e) => Err(e),
    }
}

/// One of the caller's trained models as a `.tar.gz` (kept after its task is deleted or its
/// outputs expire). Base models are folders on the server and are not offered.
#[utoipa::path(get, path = "/api/files/models/{id}/download", tag = "models",
    params(("id" = String, Path, description = "A trained model's id")),
    responses((status = 200, description = "The model's files", content_type = "application/gzip", body = Vec<u8>),
              (status = 404, description = "No such model of yours", body = ErrorBody)))]
async fn download_model(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Response> {
    let (filename, stream) = state.models.archive(&p.user.user_id, &id).await?;
    Ok(gzip_download(filename, stream))
}

/// The models the caller can chat with.
#[utoipa::path(get, path = "/api/models/available", tag = "models",
    responses((status = 200, description = "The models", body = ModelList)))]
async fn available_models(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<ModelList>> {
    let models = all_models(&state, &p.user.user_id).await?;
    Ok(Json(ModelList { models }))
}
