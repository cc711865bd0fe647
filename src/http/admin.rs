//! `/api/admin/*`: accounts and counts, for administrators only.

use axum::Router;
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::auth::UserView;
use super::error::{Json, Path};
use super::extract::AdminUser;
use crate::error::{Error, Result};
use crate::store::{Role, User};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/admin/users", get(list_users))
        .route(
            "/api/admin/users/{id}",
            get(get_user).patch(update_user).delete(delete_user),
        )
        .route("/api/admin/stats", get(stats))
}

async fn list_users(state: AppState, _admin: AdminUser) -> Result<Json<serde_json::Value>> {
    let users: Vec<UserView> = state
        .store
        .users()
        .await?
        .iter()
        .map(UserView::from)
        .collect();
    Ok(Json(json!({ "users": users })))
}

async fn get_user(
    state: AppState,
    _admin: AdminUser,
    Path(id): Path<String>,
) -> Result<Json<UserView>> {
    let user = state
        .store
        .user(&id)
        .await?
        .ok_or_else(|| Error::not_found("user"))?;
    Ok(Json(UserView::from(&user)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    role: Option<Role>,
    disabled: Option<bool>,
    /// A new password (for a user who forgot theirs): their sessions end.
    password: Option<String>,
}

/// True when `user` is the last enabled admin, so removing their powers would leave the
/// service without one.
async fn is_last_admin(state: &AppState, user: &User) -> Result<bool> {
    if user.role != Role::Admin || user.disabled {
        return Ok(false);
    }
    let others = state
        .store
        .users()
        .await?
        .iter()
        .filter(|u| u.role == Role::Admin && !u.disabled && u.user_id != user.user_id)
        .count();
    Ok(others == 0)
}

async fn update_user(
    state: AppState,
    AdminUser(admin): AdminUser,
    Path(id): Path<String>,
    Json(body): Json<UpdateBody>,
) -> Result<Json<UserView>> {
    let mut user = state
        .store
        .user(&id)
        .await?
        .ok_or_else(|| Error::not_found("user"))?;
    if let Some(pw) = &body.password {
        crate::auth::validate_password(pw)?;
    }
    let demotes = body.role == Some(Role::User) || body.disabled == Some(true);
    if demotes && is_last_admin(&state, &user).await? {
        return Err(Error::conflict(
            "last_admin",
            "this is the last active administrator; promote another account first",
        ));
    }
    if let Some(role) = body.role {
        user.role = role;
    }
    if let Some(disabled) = body.disabled {
        user.disabled = disabled;
    }
    user.updated_at = time::OffsetDateTime::now_utc();
    state.store.update_user(&user).await?;
    if user.disabled {
        // Their access tokens stop at the next request (checked per request); end their
        // refresh tokens too.
        let uid = user.user_id.clone();
        state
            .store
            .revoke_refresh_where(move |t| t.user_id == uid)
            .await?;
    }
    if let Some(pw) = &body.password {
        user = state.auth.set_password(user, pw).await?;
        tracing::info!(admin = %admin.user.user_id, user_id = %user.user_id, "password reset by an administrator");
    }
    tracing::info!(admin = %admin.user.user_id, user_id = %user.user_id, role = user.role.as_str(), disabled = user.disabled, "account updated");
    Ok(Json(UserView::from(&user)))
}

async fn delete_user(
    state: AppState,
    AdminUser(admin): AdminUser,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>> {
    let user = state
        .store
        .user(&id)
        .await?
        .ok_or_else(|| Error::not_found("user"))?;
    if is_last_admin(&state, &user).await? {
        return Err(Error::conflict(
            "last_admin",
            "this is the last active administrator; promote another account first",
        ));
    }
    let tasks = state.store.tasks().list(&id).await?;
    if tasks.iter().any(|t| t.status.is_active()) {
        return Err(Error::conflict(
            "user_has_active_tasks",
            "the user has queued or running tasks; cancel them first",
        ));
    }
    for t in &tasks {
        state.trainer.delete(&id, &t.task_id).await?;
    }
    for m in state.store.models().list(&id).await? {
        state.store.models().remove(&id, &m.model_id).await?;
    }
    let _ = tokio::fs::remove_dir_all(state.config.data_dir.join("models").join(&id)).await;
    state.store.delete_user(&id).await?;
    state.datasets.remove_owner_files(&id).await;
    tracing::info!(admin = %admin.user.user_id, user_id = %id, "account deleted");
    Ok(Json(
        json!({"message": format!("deleted user {}", user.username)}),
    ))
}

async fn stats(state: AppState, _admin: AdminUser) -> Result<Json<serde_json::Value>> {
    let users = state.store.users().await?;
    let datasets = state.store.datasets().list_all().await?;
    let tasks = state.store.tasks().list_all().await?;
    let by_status = |st: crate::store::TaskStatus| tasks.iter().filter(|t| t.status == st).count();
    let base_models = crate::models::list_base_models(&state.config.models_dir)
        .map(|m| m.len())
        .unwrap_or(0);
    Ok(Json(json!({
        "tasks": {
            "total": tasks.len(),
            "queued": by_status(crate::store::TaskStatus::Queued),
            "running": by_status(crate::store::TaskStatus::Running),
            "completed": by_status(crate::store::TaskStatus::Completed),
            "failed": by_status(crate::store::TaskStatus::Failed),
            "cancelled": by_status(crate::store::TaskStatus::Cancelled),
        },
        "models": {
            "base": base_models,
            "trained": state.store.models().count(),
        },
        "users": {
            "total": users.len(),
            "admins": users.iter().filter(|u| u.role == Role::Admin).count(),
            "disabled": users.iter().filter(|u| u.disabled).count(),
        },
        "datasets": {
            "total": datasets.len(),
            "bytes": datasets.iter().map(|d| d.size).sum::<u64>(),
            "rows": datasets.iter().map(|d| d.num_rows).sum::<u64>(),
        },
    })))
}
