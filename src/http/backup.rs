//! Backups of the running server (`/api/admin/backup`) and a user's own data export
//! (`/api/users/me/export`): `.tar.gz` archives streamed as they are written (see
//! [`crate::backup`]).

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::ErrorBody;
use super::extract::{AdminUser, CurrentUser};
use crate::error::{Error, Result};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(backup))
        .routes(routes!(personal_export))
}

/// A gzip-compressed tar download named `name`.
fn archive_response(stream: crate::backup::ArchiveStream, name: &str) -> Response {
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/gzip"),
    );
    if let Ok(v) = HeaderValue::from_str(&super::datasets::content_disposition(name)) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    response
}

fn stamp() -> String {
    time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]-[hour][minute][second]"
        ))
        .unwrap_or_default()
}

/// A consistent backup of the whole server: every store record at one point in time (no
/// write runs while they are copied), then the data dir's files as they are (a running
/// task's files may be caught mid-write), and a manifest with their checksums.
/// `ferrotune restore FILE` restores it into an empty data dir.
#[utoipa::path(get, path = "/api/admin/backup", tag = "admin",
    responses((status = 200, description = "The archive (.tar.gz)", content_type = "application/gzip", body = Vec<u8>),
              (status = 403, description = "Not an administrator", body = ErrorBody)))]
async fn backup(state: AppState, _admin: AdminUser) -> Result<Response> {
    let stream = state
        .backups
        .stream()
        .await
        .map_err(|e| Error::internal(format!("backup: {e:#}")))?;
    Ok(archive_response(
        stream,
        &format!("ferrotune-backup-{}.tar.gz", stamp()),
    ))
}

/// Everything the server keeps of the caller, as JSON files in a `.tar.gz`: the profile
/// (without the password hash), API keys (without their secrets), datasets with their
/// files, tasks with their loss curves and events, models, exports, conversations and task
/// templates.
#[utoipa::path(get, path = "/api/users/me/export", tag = "auth",
    responses((status = 200, description = "The archive (.tar.gz)", content_type = "application/gzip", body = Vec<u8>),
              (status = 401, description = "No or bad credentials", body = ErrorBody)))]
async fn personal_export(state: AppState, CurrentUser(p): CurrentUser) -> Result<Response> {
    let stream = state
        .backups
        .personal_export(&p.user.user_id)
        .await
        .map_err(|e| Error::internal(format!("export: {e:#}")))?;
    Ok(archive_response(
        stream,
        &format!("ferrotune-{}-{}.tar.gz", p.user.username, stamp()),
    ))
}
