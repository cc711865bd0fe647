//! Exports of users' models: `POST /api/files/models/{id}/export` starts one (merged
//! safetensors, or GGUF + Ollama Modelfile), `/api/exports…` follow, cancel and download them.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ErrorBody, Json, Path};
use super::extract::CurrentUser;
use crate::error::Result;
use crate::models::exports::ExportRequest;
use crate::store::ExportRecord;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(start_export))
        .routes(routes!(list_exports))
        .routes(routes!(get_export))
        .routes(routes!(cancel_export))
        .routes(routes!(download_file))
}

/// Exports one of the caller's trained models (an adapter is merged into its base): a
/// Hugging Face safetensors folder (f32/f16/bf16), or a GGUF file (f32, f16, q8_0, q4_0,
/// q4_k_m) with an Ollama `Modelfile`. A background job (one runs at a time); on success its
/// files are registered as a new model of the caller's (chat with it, download it). A GGUF
/// export of an adapter reports how much of the fine-tune's weight change survives the
/// quantisation, with a warning when a 4-bit export loses much of it.
#[utoipa::path(post, path = "/api/files/models/{id}/export", tag = "models",
    params(("id" = String, Path, description = "A trained model's id")),
    request_body = ExportRequest,
    responses((status = 202, description = "Queued", body = ExportRecord),
              (status = 404, description = "No such model of yours", body = ErrorBody),
              (status = 422, description = "A number type the format does not hold, or a model that cannot be exported so (`not_exportable` says why)", body = ErrorBody)))]
async fn start_export(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    Json(req): Json<ExportRequest>,
) -> Result<(StatusCode, Json<ExportRecord>)> {
    let record = state.exports.start(&p.user.user_id, &id, req).await?;
    tracing::info!(user = %p.user.username, model = %id, export = %record.export_id,
        format = ?record.format, quantization = record.quantization.name(), "export queued");
    Ok((StatusCode::ACCEPTED, Json(record)))
}

/// The caller's exports, newest first.
#[utoipa::path(get, path = "/api/exports", tag = "models",
    responses((status = 200, description = "Exports", body = Vec<ExportRecord>)))]
async fn list_exports(
    state: AppState,
    CurrentUser(p): CurrentUser,
) -> Result<Json<Vec<ExportRecord>>> {
    Ok(Json(state.exports.list(&p.user.user_id).await?))
}

/// One export: status, progress, and when it succeeded the model it registered and its
/// files (sizes, time, retention, warning).
#[utoipa::path(get, path = "/api/exports/{id}", tag = "models",
    params(("id" = String, Path, description = "The export's id")),
    responses((status = 200, description = "The export", body = ExportRecord),
              (status = 404, description = "No such export of yours", body = ErrorBody)))]
async fn get_export(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<ExportRecord>> {
    Ok(Json(state.exports.get(&p.user.user_id, &id).await?))
}

/// Stops a queued or running export (its partial files are removed; it ends `cancelled`).
#[utoipa::path(post, path = "/api/exports/{id}/cancel", tag = "models",
    params(("id" = String, Path, description = "The export's id")),
    responses((status = 202, description = "Cancelling", body = ExportRecord),
              (status = 404, description = "No such export of yours", body = ErrorBody),
              (status = 409, description = "It has finished already", body = ErrorBody)))]
async fn cancel_export(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<ExportRecord>)> {
    let record = state.exports.cancel(&p.user.user_id, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(record)))
}

/// One file of a succeeded export, as it is (the `.gguf`, the `Modelfile`, a safetensors
/// shard…); the whole folder is the model's download (`/api/files/models/{id}/download`).
#[utoipa::path(get, path = "/api/exports/{id}/files/{name}", tag = "models",
    params(("id" = String, Path, description = "The export's id"),
           ("name" = String, Path, description = "A file name from the export's report")),
    responses((status = 200, description = "The file", content_type = "application/octet-stream", body = Vec<u8>),
              (status = 404, description = "No such export or file", body = ErrorBody),
              (status = 409, description = "The export has not succeeded", body = ErrorBody)))]
async fn download_file(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response> {
    let path = state.exports.file(&p.user.user_id, &id, &name).await?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| crate::error::Error::not_found("file"))?;
    let len = file.metadata().await?.len();
    let mut response =
        Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20))
            .into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&len.to_string()) {
        headers.insert(header::CONTENT_LENGTH, v);
    }
    if let Ok(v) = HeaderValue::from_str(&super::datasets::content_disposition(&name)) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}
