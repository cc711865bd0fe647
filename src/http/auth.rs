//! `/api/auth/*` and `/api/keys`.

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;

use super::AppState;
use super::error::{Json, Path};
use super::extract::{ClientAddr, CurrentUser, cookie};
use crate::auth::Session;
use crate::error::{Error, Result};
use crate::store::{ApiKey, User};

const REFRESH_COOKIE: &str = "ferrotune_refresh";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/auth/register", post(register))
        .route("/api/auth/login", post(login))
        .route("/api/auth/refresh", post(refresh))
        .route("/api/auth/logout", post(logout))
        .route("/api/auth/me", get(me))
        .route("/api/auth/password", post(change_password))
        .route("/api/keys", post(create_key).get(list_keys))
        .route("/api/keys/{id}", delete(revoke_key))
}

/// What clients see of a user.
#[derive(Serialize)]
pub struct UserView {
    pub user_id: String,
    pub username: String,
    pub email: String,
    pub role: &'static str,
    pub disabled: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

impl From<&User> for UserView {
    fn from(u: &User) -> Self {
        UserView {
            user_id: u.user_id.clone(),
            username: u.username.clone(),
            email: u.email.clone(),
            role: u.role.as_str(),
            disabled: u.disabled,
            created_at: u.created_at,
        }
    }
}

#[derive(Deserialize)]
struct RegisterBody {
    username: String,
    email: String,
    password: String,
}

async fn register(
    state: AppState,
    ClientAddr(client): ClientAddr,
    Json(body): Json<RegisterBody>,
) -> Result<(StatusCode, Json<serde_json::Value>)> {
    let user = state
        .auth
        .register(
            &body.username,
            &body.email,
            &body.password,
            None,
            Some(&client),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "message": "account created",
            "user_id": user.user_id,
            "role": user.role.as_str(),
        })),
    ))
}

#[derive(Deserialize)]
struct LoginBody {
    username_or_email: String,
    password: String,
    #[serde(default)]
    remember_me: bool,
}

async fn login(
    state: AppState,
    ClientAddr(client): ClientAddr,
    Json(body): Json<LoginBody>,
) -> Result<Response> {
    let session = state
        .auth
        .login(
            &body.username_or_email,
            &body.password,
            body.remember_me,
            &client,
        )
        .await?;
    tracing::info!(user_id = %session.user.user_id, client = %client, "signed in");
    Ok(session_response(&state, session))
}

#[derive(Deserialize, Default)]
struct RefreshBody {
    refresh_token: Option<String>,
}

async fn refresh(state: AppState, headers: HeaderMap, body: axum::body::Bytes) -> Result<Response> {
    let token = refresh_token_from(&headers, &body)?
        .ok_or_else(|| Error::unauthenticated("no refresh token in the body or cookie"))?;
    let session = state.auth.refresh(&token).await?;
    Ok(session_response(&state, session))
}

async fn logout(
    state: AppState,
    CurrentUser(p): CurrentUser,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response> {
    let token = refresh_token_from(&headers, &body)?;
    state.auth.logout(&p, token.as_deref()).await?;
    let mut response = Json(json!({"message": "signed out"})).into_response();
    set_cookie(&state, &mut response, "", 0);
    Ok(response)
}

async fn me(CurrentUser(p): CurrentUser) -> Json<UserView> {
    Json(UserView::from(&p.user))
}

#[derive(Deserialize)]
struct PasswordBody {
    current_password: String,
    new_password: String,
}

/// Changes the caller's password (not with an API key: a key must not be able to take over
/// the account) and answers like a login, with a new session for this client.
async fn change_password(
    state: AppState,
    CurrentUser(p): CurrentUser,
    ClientAddr(client): ClientAddr,
    Json(body): Json<PasswordBody>,
) -> Result<Response> {
    if p.api_key_id.is_some() {
        return Err(Error::new(
            crate::error::Kind::Forbidden,
            "api_key_not_allowed",
            "an API key cannot change the account password: sign in with the password",
        ));
    }
    let session = state
        .auth
        .change_password(&p.user, &body.current_password, &body.new_password, &client)
        .await?;
    Ok(session_response(&state, session))
}

/// The refresh token from a JSON body `{refresh_token}` (which may be empty), else the cookie.
fn refresh_token_from(headers: &HeaderMap, body: &[u8]) -> Result<Option<String>> {
    let from_body = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let parsed: RefreshBody = serde_json::from_slice(body).map_err(|e| {
            Error::new(
                crate::error::Kind::BadRequest,
                "malformed_body",
                e.to_string(),
            )
        })?;
        parsed.refresh_token.filter(|t| !t.is_empty())
    };
    Ok(from_body.or_else(|| cookie(headers, REFRESH_COOKIE).map(str::to_string)))
}

fn session_response(state: &AppState, session: Session) -> Response {
    let body = json!({
        "access_token": session.access_token,
        "token_type": "bearer",
        "expires_in": session.expires_in,
        "refresh_token": session.refresh_token,
        "refresh_expires_in": session.refresh_expires_in,
        "user": {
            "user_id": session.user.user_id,
            "username": session.user.username,
            "email": session.user.email,
            "role": session.user.role.as_str(),
        },
    });
    let mut response = Json(body).into_response();
    no_store(&mut response);
    set_cookie(
        state,
        &mut response,
        &session.refresh_token,
        session.refresh_expires_in,
    );
    response
}

/// Answers that carry secrets (tokens, a new API key) must not be kept by any cache.
fn no_store(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

fn set_cookie(state: &AppState, response: &mut Response, value: &str, max_age: u64) {
    let secure = if state.config.cookie_secure {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{REFRESH_COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/api/auth; Max-Age={max_age}{secure}"
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
}

// ---- API keys ----------------------------------------------------------------------------

#[derive(Serialize)]
struct KeyView {
    key_id: String,
    name: String,
    prefix: String,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
}

impl From<&ApiKey> for KeyView {
    fn from(k: &ApiKey) -> Self {
        KeyView {
            key_id: k.key_id.clone(),
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            created_at: k.created_at,
        }
    }
}

#[derive(Deserialize)]
struct CreateKeyBody {
    name: String,
}

/// Creates an API key — with a password-backed session only: a key that could mint keys
/// would outlive its own revocation.
async fn create_key(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Json(body): Json<CreateKeyBody>,
) -> Result<Response> {
    if p.api_key_id.is_some() {
        return Err(Error::new(
            crate::error::Kind::Forbidden,
            "api_key_not_allowed",
            "an API key cannot create API keys: sign in with the password",
        ));
    }
    let (key, secret) = state
        .auth
        .create_api_key(&p.user.user_id, &body.name)
        .await?;
    let mut view = serde_json::to_value(KeyView::from(&key)).map_err(Error::internal)?;
    view["key"] = json!(secret);
    view["message"] = json!("store this key now: it is not shown again");
    let mut response = (StatusCode::CREATED, Json(view)).into_response();
    no_store(&mut response);
    Ok(response)
}

async fn list_keys(
    state: AppState,
    CurrentUser(p): CurrentUser,
) -> Result<Json<serde_json::Value>> {
    let keys: Vec<KeyView> = state
        .store
        .api_keys_of()
        .list(&p.user.user_id)
        .await?
        .iter()
        .map(KeyView::from)
        .collect();
    Ok(Json(json!({ "keys": keys })))
}

async fn revoke_key(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>> {
    state
        .store
        .delete_api_key(&p.user.user_id, &id)
        .await?
        .ok_or_else(|| Error::not_found("API key"))?;
    Ok(Json(json!({"message": "API key revoked"})))
}
