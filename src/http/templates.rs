//! `/api/templates`: training templates — a task's settings kept under a name, to start new
//! tasks from.

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ErrorBody, Json, Path};
use super::extract::CurrentUser;
use super::tasks::{Created, visible_task};
use super::views::Message;
use crate::error::{Error, Result};
use crate::store::TaskTemplate;
use crate::training::Training;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(remove))
        .routes(routes!(start))
}

#[derive(Serialize, ToSchema)]
pub struct TemplateView {
    template_id: String,
    name: String,
    /// Task settings (a `POST /api/tasks` body without name and datasets).
    #[schema(value_type = Object)]
    settings: Map<String, Value>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
}

impl From<TaskTemplate> for TemplateView {
    fn from(t: TaskTemplate) -> Self {
        TemplateView {
            template_id: t.template_id,
            name: t.name,
            settings: t.settings,
            created_at: t.created_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct TemplateList {
    templates: Vec<TemplateView>,
}

/// The caller's templates, by name.
#[utoipa::path(get, path = "/api/templates", tag = "tasks",
    responses((status = 200, description = "Templates", body = TemplateList)))]
async fn list(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<TemplateList>> {
    let templates = state.training.templates(&p.user.user_id).await?;
    Ok(Json(TemplateList {
        templates: templates.into_iter().map(TemplateView::from).collect(),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTemplate {
    /// 1–100 characters, unique among yours.
    name: String,
    /// The settings, as a `POST /api/tasks` body (name and datasets are dropped)...
    #[schema(value_type = Option<Object>)]
    settings: Option<Map<String, Value>>,
    /// ...or the settings of this task of yours.
    task_id: Option<String>,
}

/// Saves settings (given, or a task's) as a named template.
#[utoipa::path(post, path = "/api/templates", tag = "tasks",
    request_body = NewTemplate,
    responses((status = 201, description = "Saved", body = TemplateView),
              (status = 404, description = "No such task of yours", body = ErrorBody),
              (status = 409, description = "A template of yours has that name", body = ErrorBody),
              (status = 422, description = "A bad setting: it is named", body = ErrorBody)))]
async fn create(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Json(body): Json<NewTemplate>,
) -> Result<(StatusCode, Json<TemplateView>)> {
    let settings = match (body.settings, body.task_id) {
        (Some(s), None) => s,
        (None, Some(id)) => Training::settings_of(&visible_task(&state, &p, &id).await?)?,
        _ => {
            return Err(Error::bad_request(
                "give either `settings` or `task_id` (whose settings to keep)",
            ));
        }
    };
    let template = state
        .training
        .save_template(&p.user.user_id, &body.name, settings)
        .await?;
    Ok((StatusCode::CREATED, Json(template.into())))
}

/// Deletes a template (tasks started from it keep their settings).
#[utoipa::path(delete, path = "/api/templates/{id}", tag = "tasks",
    params(("id" = String, Path, description = "The template's id")),
    responses((status = 200, description = "Deleted", body = Message),
              (status = 404, description = "No such template of yours", body = ErrorBody)))]
async fn remove(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Message>> {
    state.training.delete_template(&p.user.user_id, &id).await?;
    Ok(Json(Message::new("template deleted")))
}

/// Queues a task from a template: the body (`name`, `dataset_id`, anything to change) goes
/// over the template's settings.
#[utoipa::path(post, path = "/api/templates/{id}/tasks", tag = "tasks",
    params(("id" = String, Path, description = "The template's id")),
    request_body(content = Object, description = "`{name, dataset_id, …}`: task fields over the template's"),
    responses((status = 201, description = "Queued", body = Created),
              (status = 404, description = "No such template of yours", body = ErrorBody),
              (status = 422, description = "A bad value: the field is named", body = ErrorBody)))]
async fn start(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    Json(fields): Json<Map<String, Value>>,
) -> Result<(StatusCode, Json<Created>)> {
    let task = state
        .training
        .submit_from_template(&p.user.user_id, &id, fields)
        .await?;
    Ok((StatusCode::CREATED, Json(Created::of(&state, task))))
}
