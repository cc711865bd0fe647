//! The audit log: an append-only record of the security- and cost-relevant actions taken
//! through the API (sign-ins and their failures, keys, accounts, uploads and deletions,
//! tasks, evaluations, exports and downloads), each with its actor, the client's address,
//! the target, the outcome and the request id.
//!
//! Entries are written by one middleware ([`track`]) around the routes listed in
//! [`action_of`], after the handler has answered, so an action is recorded with how it
//! ended (a refused or failed attempt too) and no handler can forget to record it. The
//! actor comes from the authentication extractor, which fills the request's [`AuditNote`];
//! handlers that know more (the name a failed sign-in tried, the id of what they created, what
//! an account change changed) add it to the same note. The entry is durable before the
//! answer leaves. Nothing in the API edits or deletes an entry; a sweep removes those older
//! than `audit_retention_days` (0: keep forever).

use std::sync::{Arc, Mutex};

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{Extensions, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::Response;
use time::OffsetDateTime;

use crate::error::Error;
use crate::http::AppState;
use crate::store::{AuditQuery, AuditRecord, Store};

/// The audit log's service.
pub struct Audit {
    store: Store,
    retention_days: u64,
}

impl Audit {
    pub fn new(store: Store, retention_days: u64) -> Arc<Audit> {
        Arc::new(Audit {
            store,
            retention_days,
        })
    }

    /// Appends an entry (durably). A failure is logged, not returned: the action it
    /// describes has already happened.
    pub async fn record(&self, entry: AuditRecord) {
        if let Err(e) = self.store.append_audit(&entry).await {
            tracing::error!(error = %e, action = %entry.action, "could not write the audit log");
        }
    }

    /// Entries matching `query`, newest first.
    pub async fn list(&self, query: AuditQuery) -> Result<Vec<AuditRecord>, Error> {
        Ok(self.store.list_audit(query).await?)
    }

    /// Removes the entries older than the retention period; returns how many.
    pub async fn sweep(&self) -> Result<usize, Error> {
        if self.retention_days == 0 {
            return Ok(0);
        }
        let cutoff = OffsetDateTime::now_utc() - time::Duration::days(self.retention_days as i64);
        Ok(self.store.prune_audit(cutoff).await?)
    }
}

/// What the handler learned about an audited request, filled while it runs.
#[derive(Debug, Default, Clone)]
pub struct Note {
    pub actor_id: Option<String>,
    pub actor_name: Option<String>,
    pub api_key_id: Option<String>,
    /// The object the request acted on, when the path does not name it (a created one).
    pub target_id: Option<String>,
    /// What changed, in a few words (an account change: `role=admin`, `disabled=true`, …).
    pub detail: Option<String>,
}

/// The request's note (an extension the middleware inserts on audited routes; handlers
/// take it as an extractor, and on other routes get a detached one that nobody reads).
#[derive(Clone, Default)]
pub struct AuditNote(Arc<Mutex<Note>>);

impl AuditNote {
    pub fn edit(&self, f: impl FnOnce(&mut Note)) {
        // A poisoned lock only means a handler panicked while writing: the note is plain data.
        let mut note = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut note);
    }

    fn take(&self) -> Note {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Notes the authenticated caller (the authentication extractor calls this).
    pub fn set_actor(parts: &Parts, user_id: &str, username: &str, api_key_id: Option<&str>) {
        if let Some(note) = parts.extensions.get::<AuditNote>() {
            note.edit(|n| {
                n.actor_id = Some(user_id.to_string());
                n.actor_name = Some(username.to_string());
                n.api_key_id = api_key_id.map(str::to_string);
            });
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AuditNote {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<AuditNote>()
            .cloned()
            .unwrap_or_default())
    }
}

/// The audited routes: method, route pattern, action, kind of target.
#[rustfmt::skip]
pub const AUDITED: &[(&str, &str, &str, &str)] = &[
    ("POST", "/api/auth/login", "auth.login", "user"),
    ("POST", "/api/auth/logout", "auth.logout", "user"),
    ("POST", "/api/auth/register", "auth.register", "user"),
    ("POST", "/api/auth/password", "auth.password_change", "user"),
    ("PATCH", "/api/auth/me", "auth.profile", "user"),
    ("POST", "/api/auth/me/email", "auth.email_confirm", "user"),
    ("POST", "/api/auth/password-reset", "auth.password_reset_request", "user"),
    ("POST", "/api/auth/password-reset/confirm", "auth.password_reset", "user"),
    ("DELETE", "/api/auth/sessions", "auth.sessions_end", "session"),
    ("DELETE", "/api/auth/sessions/{id}", "auth.session_end", "session"),
    ("PATCH", "/api/admin/users/{id}", "user.update", "user"),
    ("DELETE", "/api/admin/users/{id}", "user.delete", "user"),
    ("POST", "/api/keys", "key.create", "api_key"),
    ("DELETE", "/api/keys/{id}", "key.revoke", "api_key"),
    ("POST", "/api/files/datasets", "dataset.upload", "dataset"),
    ("POST", "/v1/files", "dataset.upload", "dataset"),
    ("DELETE", "/api/files/datasets/{id}", "dataset.delete", "dataset"),
    ("DELETE", "/v1/files/{file_id}", "dataset.delete", "dataset"),
    ("GET", "/api/files/datasets/{id}/download", "dataset.download", "dataset"),
    ("POST", "/api/files/models", "model.upload", "model"),
    ("POST", "/api/files/models/adapters", "model.upload", "model"),
    ("DELETE", "/api/files/models/{id}", "model.delete", "model"),
    ("GET", "/api/files/models/{id}/download", "model.download", "model"),
    ("POST", "/api/models/pulls", "model.pull", "model"),
    ("POST", "/api/files/models/{id}/export", "export.create", "model"),
    ("POST", "/api/exports/{id}/cancel", "export.cancel", "export"),
    ("GET", "/api/exports/{id}/files/{name}", "export.download", "export"),
    ("POST", "/api/tasks", "task.create", "task"),
    ("POST", "/v1/fine_tuning/jobs", "task.create", "task"),
    ("POST", "/api/templates/{id}/tasks", "task.create", "template"),
    ("POST", "/api/tasks/{id}/clone", "task.clone", "task"),
    ("POST", "/api/tasks/{id}/cancel", "task.cancel", "task"),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel", "task.cancel", "task"),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/pause", "task.pause", "task"),
    ("POST", "/api/tasks/{id}/resume", "task.resume", "task"),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/resume", "task.resume", "task"),
    ("POST", "/api/tasks/{id}/priority", "task.priority", "task"),
    ("DELETE", "/api/tasks/{id}", "task.delete", "task"),
    ("POST", "/api/templates", "template.create", "template"),
    ("DELETE", "/api/templates/{id}", "template.delete", "template"),
    ("POST", "/api/evaluations", "evaluation.create", "evaluation"),
    ("POST", "/api/evaluations/{id}/cancel", "evaluation.cancel", "evaluation"),
    ("POST", "/api/webhooks", "webhook.create", "webhook"),
    ("PATCH", "/api/webhooks/{id}", "webhook.update", "webhook"),
    ("DELETE", "/api/webhooks/{id}", "webhook.delete", "webhook"),
    ("GET", "/api/admin/backup", "backup.download", "server"),
    ("GET", "/api/users/me/export", "account.export", "user"),
];

/// `(action, kind of target)` of an audited route; `None` for the others.
pub fn action_of(method: &Method, route: &str) -> Option<(&'static str, &'static str)> {
    AUDITED
        .iter()
        .find(|(m, r, _, _)| *m == method.as_str() && *r == route)
        .map(|&(_, _, action, target)| (action, target))
}

/// The value of the route's first path parameter (`/api/tasks/{id}/cancel` and
/// `/api/tasks/abc/cancel` → `abc`).
fn first_param(route: &str, path: &str) -> Option<String> {
    route
        .split('/')
        .zip(path.split('/'))
        .find(|(r, _)| r.starts_with('{'))
        .map(|(_, p)| p.to_string())
        .filter(|p| !p.is_empty())
}

/// The client's address: the peer, or the first `X-Forwarded-For` hop when the server is
/// configured to trust a reverse proxy.
pub fn client_addr(trust_forwarded_for: bool, headers: &HeaderMap, ext: &Extensions) -> String {
    if trust_forwarded_for
        && let Some(first) = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    {
        return first.to_string();
    }
    ext.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|ci| ci.0.ip().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

/// The middleware: records the audited routes' requests once answered.
pub async fn track(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    let Some((action, target_type)) = route.as_deref().and_then(|r| action_of(req.method(), r))
    else {
        return next.run(req).await;
    };
    let note = AuditNote::default();
    req.extensions_mut().insert(note.clone());
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let path_target = route.as_deref().and_then(|r| first_param(r, &path));
    let client = client_addr(
        state.config.trust_forwarded_for,
        req.headers(),
        req.extensions(),
    );
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let resp = next.run(req).await;
    let status = resp.status();
    let n = note.take();
    let outcome = if status.is_success() || status.is_redirection() {
        "success"
    } else if status.as_u16() == 401 || status.as_u16() == 403 {
        "denied"
    } else {
        "failure"
    };
    state
        .audit
        .record(AuditRecord {
            id: crate::store::new_id(),
            at: OffsetDateTime::now_utc(),
            actor_id: n.actor_id,
            actor_name: n.actor_name,
            api_key_id: n.api_key_id,
            action: action.to_string(),
            target_type: target_type.to_string(),
            target_id: path_target.or(n.target_id),
            detail: n.detail,
            outcome: outcome.to_string(),
            status: status.as_u16(),
            client,
            request_id,
            method,
            path,
        })
        .await;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_is_the_first_path_parameter() {
        assert_eq!(
            first_param("/api/tasks/{id}/cancel", "/api/tasks/abc/cancel").as_deref(),
            Some("abc")
        );
        assert_eq!(
            first_param(
                "/api/exports/{id}/files/{name}",
                "/api/exports/e1/files/x.gguf"
            )
            .as_deref(),
            Some("e1")
        );
        assert_eq!(first_param("/api/tasks", "/api/tasks"), None);
    }

    fn entry(action: &str, at: OffsetDateTime) -> AuditRecord {
        AuditRecord {
            id: crate::store::new_id(),
            at,
            actor_id: Some("u1".into()),
            actor_name: Some("alice".into()),
            api_key_id: None,
            action: action.into(),
            target_type: "dataset".into(),
            target_id: Some("d1".into()),
            detail: None,
            outcome: "success".into(),
            status: 200,
            client: "127.0.0.1".into(),
            request_id: None,
            method: "DELETE".into(),
            path: "/api/files/datasets/d1".into(),
        }
    }

    #[tokio::test]
    async fn the_sweep_removes_only_entries_past_retention() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let now = OffsetDateTime::now_utc();
        // Written in time order, as the middleware writes them.
        for days in [400, 40, 31] {
            let e = entry("dataset.delete", now - time::Duration::days(days));
            store.append_audit(&e).await.unwrap();
        }
        let recent = entry("dataset.upload", now - time::Duration::days(29));
        store.append_audit(&recent).await.unwrap();
        store
            .append_audit(&entry("dataset.delete", now))
            .await
            .unwrap();
        let all = || AuditQuery {
            limit: 100,
            ..AuditQuery::default()
        };
        // Retention 0 keeps everything.
        assert_eq!(Audit::new(store.clone(), 0).sweep().await.unwrap(), 0);
        assert_eq!(store.list_audit(all()).await.unwrap().len(), 5);
        let audit = Audit::new(store.clone(), 30);
        assert_eq!(audit.sweep().await.unwrap(), 3);
        let left = store.list_audit(all()).await.unwrap();
        assert_eq!(left.len(), 2);
        assert_eq!(left[1], recent);
        assert_eq!(audit.sweep().await.unwrap(), 0);
        // Filters: an action prefix, an exact action.
        let q = |action: &str| AuditQuery {
            action: Some(action.into()),
            ..all()
        };
        assert_eq!(store.list_audit(q("dataset.")).await.unwrap().len(), 2);
        assert_eq!(
            store.list_audit(q("dataset.delete")).await.unwrap().len(),
            1
        );
        assert_eq!(store.list_audit(q("dataset")).await.unwrap().len(), 0);
    }

    #[test]
    fn every_audited_route_exists_in_the_api() {
        // The table names routes by their pattern: a renamed route would silently stop being
        // audited, so each must be in the OpenAPI document with its method.
        let (_, doc) = crate::http::api(1 << 20);
        let doc = serde_json::to_value(&doc).unwrap_or_default();
        for (method, route, action, _) in AUDITED {
            assert!(
                doc["paths"][route][method.to_lowercase()].is_object(),
                "{method} {route} ({action}) is not a route"
            );
        }
    }
}
