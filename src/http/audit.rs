//! `/api/audit`: the audit log, read-only (see `crate::audit`). Administrators see every
//! entry; other users see their own actions.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ErrorBody, Json, Query};
use super::extract::CurrentUser;
use crate::error::{Error, Result};
use crate::store::{AuditQuery, AuditRecord};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Administrators: only this user's actions (a user id).
    actor: Option<String>,
    /// An action (`dataset.delete`), or every action of a kind (`dataset.`).
    action: Option<String>,
    /// The id of the object acted on.
    target: Option<String>,
    /// `success`, `denied` or `failure`.
    outcome: Option<String>,
    /// One request's entries (its `x-request-id`).
    request_id: Option<String>,
    /// RFC 3339 times: entries at or after `since`, at or before `until`.
    since: Option<String>,
    until: Option<String>,
    /// Paging: entries older than this id (the previous page's `next`).
    before: Option<String>,
    /// At most this many (1–1000, default 100).
    limit: Option<usize>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    /// Newest first.
    entries: Vec<AuditRecord>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    next: Option<String>,
}

fn time_param(name: &str, v: Option<String>) -> Result<Option<OffsetDateTime>> {
    v.filter(|s| !s.is_empty())
        .map(|s| {
            OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339).map_err(
                |_| Error::invalid(format!("{name}: expected an RFC 3339 time, got {s:?}")),
            )
        })
        .transpose()
}

/// The audit log, newest first, filtered. Entries cannot be changed or removed through the
/// API.
#[utoipa::path(get, path = "/api/audit", tag = "admin", params(AuditParams),
    responses((status = 200, description = "Entries", body = AuditPage),
              (status = 403, description = "Another user's entries asked for by a non-administrator", body = ErrorBody),
              (status = 422, description = "A bad filter: it is named", body = ErrorBody)))]
async fn list(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Query(q): Query<AuditParams>,
) -> Result<Json<AuditPage>> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Error::invalid("limit: expected 1 to 1000"));
    }
    if let Some(o) = &q.outcome
        && !["success", "denied", "failure"].contains(&o.as_str())
    {
        return Err(Error::invalid(
            "outcome: expected success, denied or failure",
        ));
    }
    let actor = match q.actor.filter(|a| !a.is_empty()) {
        Some(a) if !p.is_admin() && a != p.user.user_id => {
            return Err(Error::forbidden(
                "only administrators may read other users' audit entries",
            ));
        }
        Some(a) => Some(a),
        None if p.is_admin() => None,
        None => Some(p.user.user_id.clone()),
    };
    let query = AuditQuery {
        actor_id: actor,
        action: q.action.filter(|a| !a.is_empty()),
        target_id: q.target.filter(|t| !t.is_empty()),
        outcome: q.outcome,
        request_id: q.request_id.filter(|r| !r.is_empty()),
        since: time_param("since", q.since)?,
        until: time_param("until", q.until)?,
        before: q.before.filter(|b| !b.is_empty()),
        limit,
    };
    let entries = state.audit.list(query).await?;
    let next = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.id.clone()))
        .flatten();
    Ok(Json(AuditPage { entries, next }))
}
