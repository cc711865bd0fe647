//! `/api/webhooks`: a user's webhooks, their delivery logs, test events (see
//! `crate::webhooks`).

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ErrorBody, Json, Path};
use super::extract::CurrentUser;
use super::views::Message;
use crate::error::Result;
use crate::store::{WebhookDelivery, WebhookRecord};
use crate::webhooks::Change;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(get_one, update, delete))
        .routes(routes!(deliveries))
        .routes(routes!(test))
}

/// A webhook as its owner sees it (the secret only once, when it is made).
#[derive(Serialize, ToSchema)]
pub struct WebhookView {
    webhook_id: String,
    url: String,
    events: Vec<String>,
    description: String,
    active: bool,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    created_at: OffsetDateTime,
}

impl From<&WebhookRecord> for WebhookView {
    fn from(h: &WebhookRecord) -> Self {
        WebhookView {
            webhook_id: h.webhook_id.clone(),
            url: h.url.clone(),
            events: h.events.clone(),
            description: h.description.clone(),
            active: h.active,
            created_at: h.created_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct WebhookList {
    webhooks: Vec<WebhookView>,
    /// Every event a webhook may ask for (also `task.*`-style kinds and `*`).
    events: Vec<&'static str>,
}

#[derive(Serialize, ToSchema)]
pub struct NewWebhook {
    #[serde(flatten)]
    webhook: WebhookView,
    /// `whsec_…`: verify each request's `webhook-signature` with it. Shown this once.
    secret: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookBody {
    /// Where to POST events (http or https).
    url: Option<String>,
    /// Event types (`task.succeeded`), kinds (`task.*`) or `*` (the default: all).
    events: Option<Vec<String>>,
    description: Option<String>,
    /// Off: nothing is sent.
    active: Option<bool>,
}

impl From<WebhookBody> for Change {
    fn from(b: WebhookBody) -> Change {
        Change {
            url: b.url,
            events: b.events,
            description: b.description,
            active: b.active,
        }
    }
}

/// The caller's webhooks.
#[utoipa::path(get, path = "/api/webhooks", tag = "auth",
    responses((status = 200, description = "Webhooks and the events they may ask for", body = WebhookList)))]
async fn list(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<WebhookList>> {
    let hooks = state.webhooks.list(&p.user.user_id).await?;
    Ok(Json(WebhookList {
        webhooks: hooks.iter().map(WebhookView::from).collect(),
        events: crate::webhooks::EVENTS.to_vec(),
    }))
}

/// Adds a webhook: the caller's task, evaluation and export events are POSTed to it, signed
/// (Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature`), retried with
/// backoff.
#[utoipa::path(post, path = "/api/webhooks", tag = "auth",
    request_body = WebhookBody,
    responses((status = 201, description = "Created; the secret is shown this once", body = NewWebhook),
              (status = 409, description = "Too many webhooks", body = ErrorBody),
              (status = 422, description = "A bad URL or event: it is named", body = ErrorBody)))]
async fn create(
    state: AppState,
    CurrentUser(p): CurrentUser,
    note: crate::audit::AuditNote,
    Json(body): Json<WebhookBody>,
) -> Result<(StatusCode, Json<NewWebhook>)> {
    let hook = state.webhooks.create(&p.user.user_id, body.into()).await?;
    note.edit(|n| {
        n.target_id = Some(hook.webhook_id.clone());
        // Scheme and host only: some receivers carry a secret in the path.
        n.detail = reqwest::Url::parse(&hook.url)
            .ok()
            .map(|u| format!("{}://{}", u.scheme(), u.host_str().unwrap_or("")));
    });
    Ok((
        StatusCode::CREATED,
        Json(NewWebhook {
            webhook: WebhookView::from(&hook),
            secret: hook.secret.clone(),
        }),
    ))
}

/// One of the caller's webhooks.
#[utoipa::path(get, path = "/api/webhooks/{id}", tag = "auth",
    params(("id" = String, Path, description = "The webhook's id")),
    responses((status = 200, description = "The webhook", body = WebhookView),
              (status = 404, description = "No such webhook of yours", body = ErrorBody)))]
async fn get_one(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<WebhookView>> {
    Ok(Json(WebhookView::from(
        &state.webhooks.get(&p.user.user_id, &id).await?,
    )))
}

/// Changes a webhook's URL, events, description or whether it is on.
#[utoipa::path(patch, path = "/api/webhooks/{id}", tag = "auth",
    params(("id" = String, Path, description = "The webhook's id")),
    request_body = WebhookBody,
    responses((status = 200, description = "Changed", body = WebhookView),
              (status = 404, description = "No such webhook of yours", body = ErrorBody),
              (status = 422, description = "A bad URL or event: it is named", body = ErrorBody)))]
async fn update(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    Json(body): Json<WebhookBody>,
) -> Result<Json<WebhookView>> {
    let hook = state
        .webhooks
        .update(&p.user.user_id, &id, body.into())
        .await?;
    Ok(Json(WebhookView::from(&hook)))
}

/// Deletes a webhook and its delivery log (retries still waiting are dropped).
#[utoipa::path(delete, path = "/api/webhooks/{id}", tag = "auth",
    params(("id" = String, Path, description = "The webhook's id")),
    responses((status = 200, description = "Deleted", body = Message),
              (status = 404, description = "No such webhook of yours", body = ErrorBody)))]
async fn delete(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Message>> {
    state.webhooks.delete(&p.user.user_id, &id).await?;
    Ok(Json(Message::new("webhook deleted")))
}

#[derive(Serialize, ToSchema)]
pub struct DeliveryList {
    /// Newest first (the latest 200 attempts).
    deliveries: Vec<WebhookDelivery>,
}

/// The webhook's delivery log: every attempt with the receiver's status or the error.
#[utoipa::path(get, path = "/api/webhooks/{id}/deliveries", tag = "auth",
    params(("id" = String, Path, description = "The webhook's id")),
    responses((status = 200, description = "Attempts, newest first", body = DeliveryList),
              (status = 404, description = "No such webhook of yours", body = ErrorBody)))]
async fn deliveries(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<DeliveryList>> {
    Ok(Json(DeliveryList {
        deliveries: state.webhooks.deliveries(&p.user.user_id, &id).await?,
    }))
}

/// Sends a `webhook.test` event now and answers with the first attempt (a failed one is
/// retried like any event).
#[utoipa::path(post, path = "/api/webhooks/{id}/test", tag = "auth",
    params(("id" = String, Path, description = "The webhook's id")),
    responses((status = 200, description = "The first attempt: `succeeded`, the receiver's `status` or the `error`", body = WebhookDelivery),
              (status = 404, description = "No such webhook of yours", body = ErrorBody)))]
async fn test(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<WebhookDelivery>> {
    Ok(Json(state.webhooks.test(&p.user.user_id, &id).await?))
}
