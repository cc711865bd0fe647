//! `/api/admin/*`: accounts and counts, for administrators only.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ErrorBody, Json, Path};
use super::extract::AdminUser;
use super::views::{Message, UserView};
use crate::accounts::{AccountChange, Stats};
use crate::error::Result;
use crate::store::Role;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_users))
        .routes(routes!(get_user, update_user, delete_user))
        .routes(routes!(stats))
}

#[derive(Serialize, ToSchema)]
pub struct UserList {
    users: Vec<UserView>,
}

/// Every account, oldest first.
#[utoipa::path(get, path = "/api/admin/users", tag = "admin",
    responses((status = 200, description = "The accounts", body = UserList),
              (status = 403, description = "Not an administrator", body = ErrorBody)))]
async fn list_users(state: AppState, _admin: AdminUser) -> Result<Json<UserList>> {
    let users = state.accounts.list().await?;
    Ok(Json(UserList {
        users: users.iter().map(UserView::from).collect(),
    }))
}

/// One account.
#[utoipa::path(get, path = "/api/admin/users/{id}", tag = "admin",
    params(("id" = String, Path, description = "The user's id")),
    responses((status = 200, description = "The account", body = UserView),
              (status = 403, description = "Not an administrator", body = ErrorBody),
              (status = 404, description = "No such user", body = ErrorBody)))]
async fn get_user(
    state: AppState,
    _admin: AdminUser,
    Path(id): Path<String>,
) -> Result<Json<UserView>> {
    Ok(Json(UserView::from(&state.accounts.get(&id).await?)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    role: Option<Role>,
    /// Disabling ends the account's sessions.
    disabled: Option<bool>,
    /// A new password (for a user who forgot theirs): their sessions end.
    password: Option<String>,
}

/// Changes an account's role, disabled state or password. The last active administrator
/// cannot be demoted or disabled.
#[utoipa::path(patch, path = "/api/admin/users/{id}", tag = "admin",
    params(("id" = String, Path, description = "The user's id")),
    request_body = UpdateBody,
    responses((status = 200, description = "The account as it is now", body = UserView),
              (status = 404, description = "No such user", body = ErrorBody),
              (status = 409, description = "The last active administrator", body = ErrorBody),
              (status = 422, description = "A weak password or an unknown field", body = ErrorBody)))]
async fn update_user(
    state: AppState,
    AdminUser(admin): AdminUser,
    note: crate::audit::AuditNote,
    Path(id): Path<String>,
    Json(body): Json<UpdateBody>,
) -> Result<Json<UserView>> {
    // What the change is, for the audit log (never the password itself).
    let mut changed = Vec::new();
    if let Some(r) = body.role {
        changed.push(format!("role={}", r.as_str()));
    }
    if let Some(d) = body.disabled {
        changed.push(format!("disabled={d}"));
    }
    if body.password.is_some() {
        changed.push("password reset".to_string());
    }
    note.edit(|n| n.detail = Some(changed.join(", ")));
    let user = state
        .accounts
        .update(
            &admin.user,
            &id,
            AccountChange {
                role: body.role,
                disabled: body.disabled,
                password: body.password,
            },
        )
        .await?;
    Ok(Json(UserView::from(&user)))
}

/// Deletes an account with its tasks, models, datasets, conversations and keys (refused
/// while one of its tasks is queued or running).
#[utoipa::path(delete, path = "/api/admin/users/{id}", tag = "admin",
    params(("id" = String, Path, description = "The user's id")),
    responses((status = 200, description = "Deleted", body = Message),
              (status = 404, description = "No such user", body = ErrorBody),
              (status = 409, description = "The last administrator, or active tasks", body = ErrorBody)))]
async fn delete_user(
    state: AppState,
    AdminUser(admin): AdminUser,
    Path(id): Path<String>,
) -> Result<Json<Message>> {
    let user = state.accounts.delete(&admin.user, &id).await?;
    Ok(Json(Message::new(format!(
        "deleted user {}",
        user.username
    ))))
}

/// Counts of users, tasks by status, datasets and models.
#[utoipa::path(get, path = "/api/admin/stats", tag = "admin",
    responses((status = 200, description = "The counts", body = Stats),
              (status = 403, description = "Not an administrator", body = ErrorBody)))]
async fn stats(state: AppState, _admin: AdminUser) -> Result<Json<Stats>> {
    Ok(Json(state.accounts.stats().await?))
}
