//! `/api/files/datasets`.

use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::extract::multipart::{Multipart, MultipartError};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ErrorBody, Json, Path, Query};
use super::extract::CurrentUser;
use super::views::{DatasetView, Message};
use crate::datasets::format::{Container, DatasetFormat, DatasetKind};
use crate::datasets::too_large;
use crate::error::{Error, Kind, Result};

/// Room for the multipart framing and small extra fields around the file itself.
pub(super) const MULTIPART_OVERHEAD: u64 = 1024 * 1024;

pub fn router(max_upload: u64) -> OpenApiRouter<AppState> {
    let body_limit = usize::try_from(max_upload + MULTIPART_OVERHEAD).unwrap_or(usize::MAX);
    OpenApiRouter::new()
        .routes(routes!(upload, list))
        .layer(DefaultBodyLimit::max(body_limit))
        .routes(routes!(detail, remove))
        .routes(routes!(preview))
        .routes(routes!(download))
}

/// The multipart form of an upload, or 400 saying what was expected.
pub(super) fn form(
    multipart: std::result::Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Multipart> {
    multipart.map_err(|e| {
        Error::new(
            Kind::BadRequest,
            "bad_multipart",
            format!(
                "expected multipart/form-data with a `file` field: {}",
                e.body_text()
            ),
        )
    })
}

/// Refuses a body whose declared length is over `max` (plus the multipart framing) before
/// reading any of it.
pub(super) fn refuse_declared_oversize(headers: &HeaderMap, max: u64) -> Result<()> {
    match headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(len) if len > max + MULTIPART_OVERHEAD => Err(too_large(max)),
        _ => Ok(()),
    }
}

pub(super) fn multipart_error(e: MultipartError, max: u64) -> Error {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(max)
    } else {
        Error::new(Kind::BadRequest, "bad_multipart", e.body_text())
    }
}

#[derive(Serialize, ToSchema)]
pub struct Uploaded {
    #[serde(flatten)]
    dataset: DatasetView,
    message: String,
}

/// The upload form: one `file` field.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// JSON array, JSON Lines or CSV; alpaca, sharegpt or OpenAI `messages` records.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
}

/// Uploads a dataset (streamed to disk, validated, recorded).
#[utoipa::path(post, path = "/api/files/datasets", tag = "datasets",
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses((status = 201, description = "Uploaded and valid", body = Uploaded),
              (status = 400, description = "No `file` field, or not multipart", body = ErrorBody),
              (status = 413, description = "Larger than `max_upload_bytes`", body = ErrorBody),
              (status = 422, description = "Not a valid dataset: the first bad record is named", body = ErrorBody),
              (status = 507, description = "The server's disk is full; nothing was kept", body = ErrorBody)))]
async fn upload(
    state: AppState,
    CurrentUser(p): CurrentUser,
    note: crate::audit::AuditNote,
    headers: HeaderMap,
    multipart: std::result::Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<(StatusCode, Json<Uploaded>)> {
    let max = state.datasets.max_bytes();
    refuse_declared_oversize(&headers, max)?;
    let mut multipart = form(multipart)?;
    loop {
        let field = multipart
            .next_field()
            .await
            .map_err(|e| multipart_error(e, max))?
            .ok_or_else(|| Error::bad_request("no `file` field in the form"))?;
        if field.name() != Some("file") {
            continue;
        }
        let client_name = field.file_name().unwrap_or("dataset").to_string();
        let stream = field.map(move |chunk| chunk.map_err(|e| multipart_error(e, max)));
        let dataset = state
            .datasets
            .upload(&p.user.user_id, &client_name, Box::pin(stream))
            .await?;
        note.edit(|n| {
            n.target_id = Some(dataset.file_id.clone());
            n.detail = Some(dataset.filename.clone());
        });
        let message = format!(
            "uploaded {} ({} rows, {})",
            dataset.filename, dataset.num_rows, dataset.format
        );
        return Ok((
            StatusCode::CREATED,
            Json(Uploaded {
                dataset: DatasetView::new(&state, &dataset),
                message,
            }),
        ));
    }
}

#[derive(Serialize, ToSchema)]
pub struct DatasetList {
    files: Vec<DatasetView>,
}

/// The caller's datasets, newest first.
#[utoipa::path(get, path = "/api/files/datasets", tag = "datasets",
    responses((status = 200, description = "The datasets", body = DatasetList),
              (status = 401, description = "No or bad credentials", body = ErrorBody)))]
async fn list(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<DatasetList>> {
    let files = state
        .datasets
        .list(&p.user.user_id)
        .await?
        .iter()
        .map(|d| DatasetView::new(&state, d))
        .collect();
    Ok(Json(DatasetList { files }))
}

/// One of the caller's datasets.
#[utoipa::path(get, path = "/api/files/datasets/{id}", tag = "datasets",
    params(("id" = String, Path, description = "The dataset's file_id")),
    responses((status = 200, description = "The dataset", body = DatasetView),
              (status = 404, description = "No such dataset of yours", body = ErrorBody)))]
async fn detail(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<DatasetView>> {
    let d = state.datasets.get(&p.user.user_id, &id).await?;
    Ok(Json(DatasetView::new(&state, &d)))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PreviewQuery {
    /// Records to return (at most 500; default 10).
    limit: Option<usize>,
}

#[derive(Serialize, ToSchema)]
pub struct Preview {
    format: DatasetFormat,
    /// What it trains (`sft`, `preference`, `kto`, `text`).
    kind: DatasetKind,
    num_rows: u64,
    /// The first records, as JSON objects (CSV rows as alpaca objects).
    #[schema(value_type = Vec<Object>)]
    rows: Vec<serde_json::Value>,
}

/// The first records of a dataset.
#[utoipa::path(get, path = "/api/files/datasets/{id}/preview", tag = "datasets",
    params(("id" = String, Path, description = "The dataset's file_id"), PreviewQuery),
    responses((status = 200, description = "The first records", body = Preview),
              (status = 404, description = "No such dataset of yours", body = ErrorBody)))]
async fn preview(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    Query(q): Query<PreviewQuery>,
) -> Result<Json<Preview>> {
    let d = state.datasets.get(&p.user.user_id, &id).await?;
    let rows = state.datasets.preview(&d, q.limit.unwrap_or(10)).await?;
    Ok(Json(Preview {
        format: d.format,
        kind: d.kind,
        num_rows: d.num_rows,
        rows,
    }))
}

/// The stored file: the bytes as uploaded, or, for shapes LlamaFactory cannot read as they
/// are (OpenAI content parts, tool calls and DPO rows, plain text), the JSON Lines that
/// training reads (its name then ends in `.jsonl`).
#[utoipa::path(get, path = "/api/files/datasets/{id}/download", tag = "datasets",
    params(("id" = String, Path, description = "The dataset's file_id")),
    responses((status = 200, description = "The file (JSON, JSON Lines or CSV)", content_type = "application/octet-stream", body = Vec<u8>),
              (status = 404, description = "No such dataset of yours, or its file is missing", body = ErrorBody)))]
async fn download(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Response> {
    let (d, file) = state.datasets.open(&p.user.user_id, &id).await?;
    let content_type = match d.container {
        Container::Json => "application/json",
        Container::Jsonl => "application/jsonl",
        Container::Csv => "text/csv; charset=utf-8",
    };
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&d.size.to_string()) {
        headers.insert(header::CONTENT_LENGTH, v);
    }
    let name = if d.container == Container::Jsonl
        && !d.filename.to_ascii_lowercase().ends_with(".jsonl")
    {
        format!("{}.jsonl", d.filename)
    } else {
        d.filename.clone()
    };
    if let Ok(v) = HeaderValue::from_str(&content_disposition(&name)) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

/// `attachment` with an ASCII fallback name and the exact UTF-8 name (RFC 6266 / 5987).
pub(crate) fn content_disposition(name: &str) -> String {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

/// Deletes a dataset: its record and its file. Refused while a queued or running task uses
/// it.
#[utoipa::path(delete, path = "/api/files/datasets/{id}", tag = "datasets",
    params(("id" = String, Path, description = "The dataset's file_id")),
    responses((status = 200, description = "Deleted", body = Message),
              (status = 404, description = "No such dataset of yours", body = ErrorBody),
              (status = 409, description = "A queued or running task uses it", body = ErrorBody)))]
async fn remove(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Message>> {
    let d = state.training.delete_dataset(&p.user.user_id, &id).await?;
    Ok(Json(Message::new(format!("deleted {}", d.filename))))
}
