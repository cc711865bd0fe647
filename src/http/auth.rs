//! `/api/auth/*` and `/api/keys`.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ErrorBody, Json, Path};
use super::extract::{ClientAddr, CurrentUser, cookie};
use super::views::{KeyView, Message, UserView};
use crate::auth::Session;
use crate::error::{Error, Kind, Result};

const REFRESH_COOKIE: &str = "ferrotune_refresh";

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(register))
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(logout))
        .routes(routes!(me))
        .routes(routes!(change_password))
        .routes(routes!(create_key, list_keys))
        .routes(routes!(revoke_key))
}

#[derive(Deserialize, ToSchema)]
pub struct RegisterBody {
    /// 3 to 20 of `[A-Za-z0-9_-]`.
    username: String,
    email: String,
    /// At least 8 characters.
    password: String,
}

#[derive(Serialize, ToSchema)]
pub struct Registered {
    message: String,
    user_id: String,
    /// The first account ever registered is `admin`.
    role: String,
}

/// Registers an account (throttled per client address).
#[utoipa::path(post, path = "/api/auth/register", tag = "auth", security(()),
    request_body = RegisterBody,
    responses((status = 201, description = "Created", body = Registered),
              (status = 409, description = "Username or email taken", body = ErrorBody),
              (status = 422, description = "Invalid username, email or password", body = ErrorBody),
              (status = 429, description = "Too many registrations from this address", body = ErrorBody)))]
async fn register(
    state: AppState,
    ClientAddr(client): ClientAddr,
    note: crate::audit::AuditNote,
    Json(body): Json<RegisterBody>,
) -> Result<(StatusCode, Json<Registered>)> {
    note.edit(|n| n.actor_name = Some(body.username.clone()));
    let user = state
        .accounts
        .register(
            &body.username,
            &body.email,
            &body.password,
            None,
            Some(&client),
        )
        .await?;
    note.edit(|n| {
        n.actor_id = Some(user.user_id.clone());
        n.target_id = Some(user.user_id.clone());
    });
    Ok((
        StatusCode::CREATED,
        Json(Registered {
            message: "account created".into(),
            user_id: user.user_id,
            role: user.role.as_str().into(),
        }),
    ))
}

#[derive(Deserialize, ToSchema)]
pub struct LoginBody {
    username_or_email: String,
    password: String,
    /// A refresh token that lives longer (`remember_me_ttl_secs`).
    #[serde(default)]
    remember_me: bool,
}

#[derive(Serialize, ToSchema)]
pub struct Tokens {
    access_token: String,
    /// `bearer`.
    token_type: &'static str,
    /// Seconds the access token lives.
    expires_in: u64,
    /// Also set as an HttpOnly cookie (`Path=/api/auth`).
    refresh_token: String,
    refresh_expires_in: u64,
    user: SignedIn,
}

#[derive(Serialize, ToSchema)]
pub struct SignedIn {
    user_id: String,
    username: String,
    email: String,
    role: String,
}

/// Signs in. The same answer for an unknown account and a wrong password.
#[utoipa::path(post, path = "/api/auth/login", tag = "auth", security(()),
    request_body = LoginBody,
    responses((status = 200, description = "Signed in", body = Tokens),
              (status = 401, description = "Wrong credentials, or the account is disabled", body = ErrorBody),
              (status = 429, description = "Too many attempts (Retry-After)", body = ErrorBody)))]
async fn login(
    state: AppState,
    ClientAddr(client): ClientAddr,
    note: crate::audit::AuditNote,
    Json(body): Json<LoginBody>,
) -> Result<Response> {
    // The name tried, for the audit log (a failed attempt has no user).
    note.edit(|n| n.actor_name = Some(body.username_or_email.clone()));
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
    note.edit(|n| {
        n.actor_id = Some(session.user.user_id.clone());
        n.actor_name = Some(session.user.username.clone());
        n.target_id = Some(session.user.user_id.clone());
    });
    Ok(session_response(&state, session))
}

#[derive(Deserialize, Default, ToSchema)]
pub struct RefreshBody {
    /// Else the `ferrotune_refresh` cookie.
    refresh_token: Option<String>,
}

/// New tokens for a refresh token (which stops working; presenting it again later ends the
/// whole session).
#[utoipa::path(post, path = "/api/auth/refresh", tag = "auth", security(()),
    request_body(content = RefreshBody, description = "Optional: the cookie works too"),
    responses((status = 200, description = "New tokens", body = Tokens),
              (status = 401, description = "Invalid, expired or reused refresh token", body = ErrorBody)))]
async fn refresh(state: AppState, headers: HeaderMap, body: axum::body::Bytes) -> Result<Response> {
    let token = refresh_token_from(&headers, &body)?
        .ok_or_else(|| Error::unauthenticated("no refresh token in the body or cookie"))?;
    let session = state.auth.refresh(&token).await?;
    Ok(session_response(&state, session))
}

/// Ends the caller's session and that of the refresh token given (their access tokens stop
/// at once).
#[utoipa::path(post, path = "/api/auth/logout", tag = "auth",
    request_body(content = RefreshBody, description = "Optional"),
    responses((status = 200, description = "Signed out", body = Message),
              (status = 401, description = "No or bad credentials", body = ErrorBody)))]
async fn logout(
    state: AppState,
    CurrentUser(p): CurrentUser,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response> {
    let token = refresh_token_from(&headers, &body)?;
    state.auth.logout(&p, token.as_deref()).await?;
    let mut response = Json(Message::new("signed out")).into_response();
    set_cookie(&state, &mut response, "", 0);
    Ok(response)
}

/// The caller's account.
#[utoipa::path(get, path = "/api/auth/me", tag = "auth",
    responses((status = 200, description = "The account", body = UserView),
              (status = 401, description = "No or bad credentials", body = ErrorBody)))]
async fn me(CurrentUser(p): CurrentUser) -> Json<UserView> {
    Json(UserView::from(&p.user))
}

#[derive(Deserialize, ToSchema)]
pub struct PasswordBody {
    current_password: String,
    new_password: String,
}

/// Changes the caller's password (not with an API key) and answers like a login; every
/// other session ends.
#[utoipa::path(post, path = "/api/auth/password", tag = "auth",
    request_body = PasswordBody,
    responses((status = 200, description = "Changed: a new session", body = Tokens),
              (status = 403, description = "Called with an API key", body = ErrorBody),
              (status = 422, description = "Wrong current password or a weak new one", body = ErrorBody),
              (status = 429, description = "Too many wrong current passwords", body = ErrorBody)))]
async fn change_password(
    state: AppState,
    CurrentUser(p): CurrentUser,
    ClientAddr(client): ClientAddr,
    Json(body): Json<PasswordBody>,
) -> Result<Response> {
    if p.api_key_id.is_some() {
        return Err(Error::new(
            Kind::Forbidden,
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
        let parsed: RefreshBody = serde_json::from_slice(body)
            .map_err(|e| Error::new(Kind::BadRequest, "malformed_body", e.to_string()))?;
        parsed.refresh_token.filter(|t| !t.is_empty())
    };
    Ok(from_body.or_else(|| cookie(headers, REFRESH_COOKIE).map(str::to_string)))
}

fn session_response(state: &AppState, session: Session) -> Response {
    let body = Tokens {
        access_token: session.access_token,
        token_type: "bearer",
        expires_in: session.expires_in,
        refresh_token: session.refresh_token.clone(),
        refresh_expires_in: session.refresh_expires_in,
        user: SignedIn {
            user_id: session.user.user_id.clone(),
            username: session.user.username.clone(),
            email: session.user.email.clone(),
            role: session.user.role.as_str().into(),
        },
    };
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

#[derive(Deserialize, ToSchema)]
pub struct CreateKeyBody {
    /// 1 to 64 characters.
    name: String,
}

#[derive(Serialize, ToSchema)]
pub struct NewKey {
    #[serde(flatten)]
    key: KeyView,
    /// The secret (`ft-…`): shown this once.
    #[serde(rename = "key")]
    secret: String,
    message: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct KeyList {
    keys: Vec<KeyView>,
}

/// Creates an API key — with a password-backed session only: a key that could mint keys
/// would outlive its own revocation.
#[utoipa::path(post, path = "/api/keys", tag = "auth",
    request_body = CreateKeyBody,
    responses((status = 201, description = "Created; the secret is in `key`", body = NewKey),
              (status = 403, description = "Called with an API key", body = ErrorBody),
              (status = 422, description = "Invalid name", body = ErrorBody)))]
async fn create_key(
    state: AppState,
    CurrentUser(p): CurrentUser,
    note: crate::audit::AuditNote,
    Json(body): Json<CreateKeyBody>,
) -> Result<Response> {
    if p.api_key_id.is_some() {
        return Err(Error::new(
            Kind::Forbidden,
            "api_key_not_allowed",
            "an API key cannot create API keys: sign in with the password",
        ));
    }
    let (key, secret) = state
        .auth
        .create_api_key(&p.user.user_id, &body.name)
        .await?;
    note.edit(|n| {
        n.target_id = Some(key.key_id.clone());
        n.detail = Some(key.name.clone());
    });
    let view = NewKey {
        key: KeyView::from(&key),
        secret,
        message: "store this key now: it is not shown again",
    };
    let mut response = (StatusCode::CREATED, Json(view)).into_response();
    no_store(&mut response);
    Ok(response)
}

/// The caller's API keys (no secrets).
#[utoipa::path(get, path = "/api/keys", tag = "auth",
    responses((status = 200, description = "The keys", body = KeyList),
              (status = 401, description = "No or bad credentials", body = ErrorBody)))]
async fn list_keys(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<KeyList>> {
    let keys = state.auth.api_keys(&p.user.user_id).await?;
    Ok(Json(KeyList {
        keys: keys.iter().map(KeyView::from).collect(),
    }))
}

/// Revokes one of the caller's API keys; it stops working at once.
#[utoipa::path(delete, path = "/api/keys/{id}", tag = "auth",
    params(("id" = String, Path, description = "The key's id")),
    responses((status = 200, description = "Revoked", body = Message),
              (status = 404, description = "No such key of yours", body = ErrorBody)))]
async fn revoke_key(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Message>> {
    state.auth.revoke_api_key(&p.user.user_id, &id).await?;
    Ok(Json(Message::new("API key revoked")))
}
