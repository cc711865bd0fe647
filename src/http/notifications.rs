//! `GET /api/notifications`: the caller's notices as they happen, as server-sent events — the
//! same events their webhooks get (`task.*`, `evaluation.*`, `export.*`; administrators'
//! `alert.*` too). The web UI holds this stream for its browser notifications.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::ErrorBody;
use super::extract::CurrentUser;
use crate::error::Result;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(stream))
}

/// The caller's notices as they happen: each an event named after it (`task.succeeded`, …)
/// whose data is `{"type", "timestamp", "data"}` like a webhook's body. An event `lagged`
/// (data: how many were missed) says the reader fell behind: re-read what it shows.
#[utoipa::path(get, path = "/api/notifications", tag = "auth",
    responses((status = 200, description = "text/event-stream: the caller's notices", content_type = "text/event-stream", body = String),
              (status = 401, description = "No or bad credentials", body = ErrorBody)))]
async fn stream(
    state: AppState,
    CurrentUser(p): CurrentUser,
) -> Result<Sse<impl Stream<Item = std::result::Result<Event, Infallible>>>> {
    let rx = state.notices.subscribe();
    let user_id = p.user.user_id.clone();
    let events = futures_util::stream::unfold((rx, user_id), |(mut rx, user_id)| async move {
        loop {
            match rx.recv().await {
                Ok(n) if n.owner == user_id => {
                    let body = serde_json::json!({
                        "type": n.event,
                        "timestamp": time::OffsetDateTime::now_utc()
                            .format(&time::format_description::well_known::Rfc3339)
                            .unwrap_or_default(),
                        "data": n.data,
                    });
                    let event = Event::default().event(&n.event).data(body.to_string());
                    return Some((Ok(event), (rx, user_id)));
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(missed)) => {
                    let event = Event::default().event("lagged").data(missed.to_string());
                    return Some((Ok(event), (rx, user_id)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
