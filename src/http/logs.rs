//! `/api/admin/logs`: the server's log files (see `crate::logs`), newest first, filtered, for
//! administrators.

use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ErrorBody, Json, Query};
use super::extract::AdminUser;
use crate::error::{Error, Result};
use crate::logs::{LogPage, LogQuery};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(read))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogParams {
    /// This level and more severe: `trace`, `debug`, `info`, `warn` or `error`.
    level: Option<String>,
    /// Entries whose target (the module that logged) starts with this, e.g.
    /// `ferrotune::training`.
    target: Option<String>,
    /// One request's entries (its `x-request-id`, also in the audit log).
    request_id: Option<String>,
    /// Text anywhere in the entry (any case).
    q: Option<String>,
    /// An RFC 3339 time: entries written before it (the previous page's `next_until`).
    until: Option<String>,
    /// At most this many (1–1000, default 200).
    limit: Option<usize>,
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// The server's log, newest first, across its rotated files. Written by the server when
/// `log_file` is on (the default), in `log_dir`.
#[utoipa::path(get, path = "/api/admin/logs", tag = "admin", params(LogParams),
    responses((status = 200, description = "Entries, newest first", body = LogPage),
              (status = 403, description = "Not an administrator", body = ErrorBody),
              (status = 422, description = "A bad filter: it is named", body = ErrorBody)))]
async fn read(
    state: AppState,
    _admin: AdminUser,
    Query(p): Query<LogParams>,
) -> Result<Json<LogPage>> {
    let limit = p.limit.unwrap_or(200);
    if !(1..=crate::logs::MAX_ENTRIES).contains(&limit) {
        return Err(Error::invalid("limit: expected 1 to 1000"));
    }
    let level = match non_empty(p.level) {
        None => None,
        Some(l) => Some(crate::logs::level_rank(&l).ok_or_else(|| {
            Error::invalid(format!(
                "level: expected trace, debug, info, warn or error, got {l:?}"
            ))
        })?),
    };
    // Written the way the log writes its times (UTC, microseconds), so they compare as text.
    let until = match non_empty(p.until) {
        None => None,
        Some(s) => {
            let t = OffsetDateTime::parse(&s, &Rfc3339).map_err(|_| {
                Error::invalid(format!("until: expected an RFC 3339 time, got {s:?}"))
            })?;
            let t = t.to_offset(time::UtcOffset::UTC);
            Some(format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
                t.microsecond()
            ))
        }
    };
    let query = LogQuery {
        level,
        target: non_empty(p.target),
        request_id: non_empty(p.request_id),
        text: non_empty(p.q),
        until,
        limit,
    };
    let rotation = state.config.server_log();
    let page = tokio::task::spawn_blocking(move || crate::logs::read(&rotation, &query))
        .await
        .map_err(Error::internal)??;
    Ok(Json(page))
}
