//! Evaluations: `POST /api/evaluations` queues one (with its baseline, for a fine-tune),
//! `/api/evaluations…` follow them, list their answers, compare a fine-tune with its base and
//! cancel them. They are tasks of the training queue: their events, logs and deletion are the
//! task routes' (`/api/tasks/{id}/…`).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ErrorBody, Json, Path};
use super::extract::CurrentUser;
use crate::error::{Error, Result};
use crate::training::evaluation::{
    self, Comparison, EvaluationRequest, EvaluationView, Prediction,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(get_one))
        .routes(routes!(predictions))
        .routes(routes!(comparison))
        .routes(routes!(cancel))
}

#[derive(Serialize, ToSchema)]
pub struct Queued {
    /// The evaluation of the model asked for (the candidate, when a baseline comes along).
    evaluation_id: String,
    /// The base model's evaluation on the same rows, when one was queued.
    baseline_id: Option<String>,
    evaluations: Vec<EvaluationView>,
}

fn view(
    t: &crate::training::Task,
    positions: &std::collections::HashMap<String, usize>,
) -> Result<EvaluationView> {
    EvaluationView::new(t, positions).ok_or_else(|| Error::not_found("no such evaluation"))
}

/// Evaluates a model you can chat with (a base model's name, or your adapter's, full or
/// merged model's id) on an uploaded test set (`dataset_id`) or on the rows a training task
/// held out (`task_id`, its `val_size` and seed). It measures BLEU-4 and ROUGE-1/2/L of the
/// greedy answers (Chinese scored by jieba's words), exact match, the references' loss and
/// perplexity, and the generation speed. A fine-tune's base is evaluated on the same rows
/// too (`baseline`, default true) for the before/after view. Queued like a training task.
#[utoipa::path(post, path = "/api/evaluations", tag = "evaluations",
    request_body = EvaluationRequest,
    responses((status = 202, description = "Queued", body = Queued),
              (status = 422, description = "A bad value, an unknown model or dataset, a task that held out no rows, or a GGUF-only model (`not_evaluable`)", body = ErrorBody)))]
async fn create(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Json(body): Json<EvaluationRequest>,
) -> Result<(StatusCode, Json<Queued>)> {
    let tasks = state
        .training
        .submit_evaluation(&p.user.user_id, body)
        .await?;
    let positions = state.training.queue_positions().await?;
    let evaluations = tasks
        .iter()
        .map(|t| view(t, &positions))
        .collect::<Result<Vec<_>>>()?;
    let candidate = evaluations
        .last()
        .ok_or_else(|| Error::internal("no evaluation queued"))?;
    tracing::info!(user = %p.user.username, evaluation = %candidate.evaluation_id, model = %candidate.model, "evaluation queued");
    Ok((
        StatusCode::ACCEPTED,
        Json(Queued {
            evaluation_id: candidate.evaluation_id.clone(),
            baseline_id: (evaluations.len() > 1).then(|| evaluations[0].evaluation_id.clone()),
            evaluations,
        }),
    ))
}

/// Your evaluations, newest first.
#[utoipa::path(get, path = "/api/evaluations", tag = "evaluations",
    responses((status = 200, description = "Evaluations", body = Vec<EvaluationView>)))]
async fn list(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<Vec<EvaluationView>>> {
    let positions = state.training.queue_positions().await?;
    let all = state.training.evaluations(&p.user.user_id).await?;
    Ok(Json(
        all.iter()
            .filter_map(|t| EvaluationView::new(t, &positions))
            .collect(),
    ))
}

/// One evaluation: status, progress and, once it completed, its scores.
#[utoipa::path(get, path = "/api/evaluations/{id}", tag = "evaluations",
    params(("id" = String, Path, description = "The evaluation's id")),
    responses((status = 200, description = "The evaluation", body = EvaluationView),
              (status = 404, description = "No such evaluation of yours", body = ErrorBody)))]
async fn get_one(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<EvaluationView>> {
    let t = state
        .training
        .evaluation(&p.user.user_id, p.is_admin(), &id)
        .await?;
    let positions = state.training.queue_positions().await?;
    Ok(Json(view(&t, &positions)?))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
struct PredictionsQuery {
    /// `jsonl` (default: LlamaFactory's `generated_predictions.jsonl` as a download) or
    /// `json` (an array).
    format: Option<String>,
}

/// A completed evaluation's answers: one `{"prompt", "predict", "label"}` per row.
#[utoipa::path(get, path = "/api/evaluations/{id}/predictions", tag = "evaluations",
    params(("id" = String, Path, description = "The evaluation's id"), PredictionsQuery),
    responses((status = 200, description = "The answers (JSON lines, or a JSON array with `format=json`)", body = Vec<Prediction>),
              (status = 404, description = "No such evaluation of yours", body = ErrorBody),
              (status = 409, description = "It has not completed", body = ErrorBody)))]
async fn predictions(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<PredictionsQuery>,
) -> Result<Response> {
    let t = state
        .training
        .evaluation(&p.user.user_id, p.is_admin(), &id)
        .await?;
    if t.status != crate::training::TaskStatus::Completed {
        return Err(Error::conflict(
            "not_finished",
            format!(
                "the evaluation is {}: its answers come when it completes",
                t.status.as_str()
            ),
        ));
    }
    let dir = t.output_dir().to_path_buf();
    let rows = tokio::task::spawn_blocking(move || evaluation::read_predictions(&dir)).await??;
    match q.format.as_deref() {
        Some("json") => Ok(Json(rows).into_response()),
        None | Some("jsonl") => {
            let mut body = String::new();
            for r in &rows {
                body.push_str(&serde_json::to_string(r).map_err(Error::internal)?);
                body.push('\n');
            }
            let mut response = body.into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-ndjson"),
            );
            if let Ok(v) = HeaderValue::from_str(&super::datasets::content_disposition(&format!(
                "predictions-{id}.jsonl"
            ))) {
                headers.insert(header::CONTENT_DISPOSITION, v);
            }
            Ok(response)
        }
        Some(other) => Err(Error::bad_request(format!(
            "format: `{other}` is not one of jsonl, json"
        ))),
    }
}

/// Before and after: a fine-tune's evaluation and its base's on the same rows — both scores,
/// their difference, and every prompt with its reference and both answers. Either
/// evaluation's id names the pair.
#[utoipa::path(get, path = "/api/evaluations/{id}/comparison", tag = "evaluations",
    params(("id" = String, Path, description = "Either evaluation of the pair")),
    responses((status = 200, description = "Side by side", body = Comparison),
              (status = 404, description = "No such evaluation of yours", body = ErrorBody),
              (status = 409, description = "No baseline was evaluated with it, or one of the two has not completed", body = ErrorBody)))]
async fn comparison(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Comparison>> {
    let t = state
        .training
        .evaluation(&p.user.user_id, p.is_admin(), &id)
        .await?;
    Ok(Json(state.training.comparison(&t).await?))
}

/// Stops a queued or running evaluation (it ends `cancelled`).
#[utoipa::path(post, path = "/api/evaluations/{id}/cancel", tag = "evaluations",
    params(("id" = String, Path, description = "The evaluation's id")),
    responses((status = 202, description = "Cancelling", body = EvaluationView),
              (status = 404, description = "No such evaluation of yours", body = ErrorBody),
              (status = 409, description = "It has finished already", body = ErrorBody)))]
async fn cancel(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<EvaluationView>)> {
    let t = state
        .training
        .evaluation(&p.user.user_id, p.is_admin(), &id)
        .await?;
    state.training.cancel(&t).await?;
    let t = state
        .training
        .evaluation(&p.user.user_id, p.is_admin(), &id)
        .await?;
    let positions = state.training.queue_positions().await?;
    Ok((StatusCode::ACCEPTED, Json(view(&t, &positions)?)))
}
