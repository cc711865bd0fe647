//! `/api/files/datasets`.

use axum::Router;
use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::extract::multipart::{Multipart, MultipartError};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;

use super::AppState;
use super::error::{Json, Path, Query};
use super::extract::CurrentUser;
use crate::datasets::format::{Container, DatasetFormat};
use crate::datasets::too_large;
use crate::error::{Error, Kind, Result};
use crate::store::Dataset;

/// Room for the multipart framing and small extra fields around the file itself.
const MULTIPART_OVERHEAD: u64 = 1024 * 1024;

pub fn router(max_upload: u64) -> Router<AppState> {
    let body_limit = usize::try_from(max_upload + MULTIPART_OVERHEAD).unwrap_or(usize::MAX);
    Router::new()
        .route(
            "/api/files/datasets",
            get(list)
                .post(upload)
                .layer(DefaultBodyLimit::max(body_limit)),
        )
        .route("/api/files/datasets/{id}", get(detail).delete(remove))
        .route("/api/files/datasets/{id}/preview", get(preview))
        .route("/api/files/datasets/{id}/download", get(download))
}

#[derive(Serialize)]
struct DatasetView {
    file_id: String,
    filename: String,
    file_path: String,
    size: u64,
    format: DatasetFormat,
    container: Container,
    num_rows: u64,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
}

impl DatasetView {
    fn new(state: &AppState, d: &Dataset) -> Self {
        DatasetView {
            file_id: d.file_id.clone(),
            filename: d.filename.clone(),
            file_path: crate::text::relative_path(&state.config.data_dir, &d.file_path),
            size: d.size,
            format: d.format,
            container: d.container,
            num_rows: d.num_rows,
            created_at: d.created_at,
        }
    }
}

fn multipart_error(e: MultipartError, max: u64) -> Error {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(max)
    } else {
        Error::new(Kind::BadRequest, "bad_multipart", e.body_text())
    }
}

async fn upload(
    state: AppState,
    CurrentUser(p): CurrentUser,
    headers: HeaderMap,
    multipart: std::result::Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>)> {
    let max = state.datasets.max_bytes();
    // Refuse a declared oversize body before reading any of it.
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > max + MULTIPART_OVERHEAD
    {
        return Err(too_large(max));
    }
    let mut multipart = multipart.map_err(|e| {
        Error::new(
            Kind::BadRequest,
            "bad_multipart",
            format!(
                "expected multipart/form-data with a `file` field: {}",
                e.body_text()
            ),
        )
    })?;
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
        let mut body =
            serde_json::to_value(DatasetView::new(&state, &dataset)).map_err(Error::internal)?;
        body["message"] = json!(format!(
            "uploaded {} ({} rows, {})",
            dataset.filename, dataset.num_rows, dataset.format
        ));
        return Ok((StatusCode::CREATED, Json(body)));
    }
}

async fn list(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<serde_json::Value>> {
    let files: Vec<DatasetView> = state
        .datasets
        .list(&p.user.user_id)
        .await?
        .iter()
        .map(|d| DatasetView::new(&state, d))
        .collect();
    Ok(Json(json!({ "files": files })))
}

async fn detail(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<DatasetView>> {
    let d = state.datasets.get(&p.user.user_id, &id).await?;
    Ok(Json(DatasetView::new(&state, &d)))
}

#[derive(Deserialize)]
struct PreviewQuery {
    limit: Option<usize>,
}

async fn preview(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    Query(q): Query<PreviewQuery>,
) -> Result<Json<serde_json::Value>> {
    let d = state.datasets.get(&p.user.user_id, &id).await?;
    let rows = state.datasets.preview(&d, q.limit.unwrap_or(10)).await?;
    Ok(Json(json!({
        "format": d.format,
        "num_rows": d.num_rows,
        "rows": rows,
    })))
}

async fn download(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Response> {
    let d = state.datasets.get(&p.user.user_id, &id).await?;
    let file = tokio::fs::File::open(&d.file_path).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::new(
                Kind::NotFound,
                "file_missing",
                "the dataset's file is missing on disk",
            )
        } else {
            Error::from(e)
        }
    })?;
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
    if let Ok(v) = HeaderValue::from_str(&content_disposition(&d.filename)) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

/// `attachment` with an ASCII fallback name and the exact UTF-8 name (RFC 6266 / 5987).
fn content_disposition(name: &str) -> String {
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

async fn remove(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>> {
    if state.trainer.dataset_in_use(&p.user.user_id, &id).await? {
        return Err(Error::conflict(
            "dataset_in_use",
            "a queued or running task uses this dataset; cancel it first",
        ));
    }
    let d = state.datasets.delete(&p.user.user_id, &id).await?;
    Ok(Json(json!({"message": format!("deleted {}", d.filename)})))
}
