//! `GET /metrics`: the Prometheus text exposition of the engine's serving metrics (queue
//! depth, batch, tokens, time to first token, adapter cache) and of HTTP latency by route,
//! through `prometheus-client`. Admins only (a session or an admin's API key as a bearer
//! token: Prometheus's `authorization` setting).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::ErrorBody;
use super::extract::AdminUser;
use crate::error::{Error, Result};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
    status: u16,
}

/// What `/metrics` serves: a registry built once at start.
pub struct Metrics {
    registry: Registry,
    http: Family<RouteLabels, Histogram, fn() -> Histogram>,
}

impl Metrics {
    pub fn new(engine: &crate::inference::EngineMetrics) -> Metrics {
        let mut registry = Registry::with_prefix("ferrotune");
        engine.register(&mut registry);
        let http: Family<RouteLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 16)));
        registry.register(
            "http_request_duration_seconds",
            "HTTP request duration by method, route and status (streams: until the headers)",
            http.clone(),
        );
        Metrics { registry, http }
    }

    fn encode(&self) -> Result<String> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .map_err(|e| Error::internal(format!("cannot encode the metrics: {e}")))?;
        Ok(out)
    }
}

/// Times every request that matched a route (unmatched paths are not labelled, so a scan of
/// random paths cannot grow the label set).
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    let method = req.method().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    if let Some(route) = route {
        let labels = RouteLabels {
            method,
            route,
            status: response.status().as_u16(),
        };
        state
            .metrics
            .http
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
    }
    response
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(metrics))
}

/// Prometheus metrics (text exposition format): `ferrotune_queue_depth`,
/// `ferrotune_active_sequences`, `ferrotune_kv_cache_reserved_bytes`,
/// `ferrotune_kv_cache_bytes_per_token`, `ferrotune_batch_sequences`, `ferrotune_batch_rows`,
/// `ferrotune_step_seconds`, `ferrotune_tokens_generated_total`,
/// `ferrotune_time_to_first_token_seconds`, `ferrotune_adapter_cache_{hits,misses,evictions}_total`,
/// `ferrotune_prefix_cache_{hits,tokens}_total`, `ferrotune_http_request_duration_seconds`.
/// Admins only.
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses(
        (status = 200, description = "The metrics", content_type = "text/plain", body = String),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody)))]
async fn metrics(state: AppState, _admin: AdminUser) -> Result<Response> {
    let text = state.metrics.encode()?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
