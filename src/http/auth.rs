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
        .routes(routes!(me, update_me))
        .routes(routes!(confirm_email))
        .routes(routes!(request_password_reset))
        .routes(routes!(reset_password))
        .routes(routes!(list_sessions, end_other_sessions))
        .routes(routes!(end_session))
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
    display_name: Option<String>,
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
    headers: HeaderMap,
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
            user_agent(&headers),
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
async fn refresh(
    state: AppState,
    ClientAddr(client): ClientAddr,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response> {
    let token = refresh_token_from(&headers, &body)?
        .ok_or_else(|| Error::unauthenticated("no refresh token in the body or cookie"))?;
    let session = state.auth.refresh(&token, &client).await?;
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
    responses((status = 200, description = "The account", body = Profile),
              (status = 401, description = "No or bad credentials", body = ErrorBody)))]
async fn me(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<Profile>> {
    Ok(Json(profile(&state, &p.user).await?))
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
    headers: HeaderMap,
    Json(body): Json<PasswordBody>,
) -> Result<Response> {
    no_api_key(&p, "change the account password")?;
    let session = state
        .auth
        .change_password(
            &p.user,
            &body.current_password,
            &body.new_password,
            &client,
            user_agent(&headers),
        )
        .await?;
    Ok(session_response(&state, session))
}

fn user_agent(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
}

fn no_api_key(p: &crate::auth::Principal, what: &str) -> Result<()> {
    if p.api_key_id.is_some() {
        return Err(Error::new(
            Kind::Forbidden,
            "api_key_not_allowed",
            format!("an API key cannot {what}: sign in with the password"),
        ));
    }
    Ok(())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileBody {
    /// The name shown for the account (at most 64 characters; empty: the username).
    display_name: Option<String>,
    /// A new e-mail address (it signs in too): needs `current_password`. With a mail relay
    /// configured, a code is sent to it and the address changes once the code comes back
    /// (`POST /api/auth/me/email`).
    email: Option<String>,
    current_password: Option<String>,
    /// Notices also sent by e-mail when a relay is configured, chosen like a webhook's
    /// events (`task.*`, `task.failed`, …; administrators `alert.*`); `[]` for none.
    email_events: Option<Vec<String>>,
}

/// The caller's account, with what the account page edits.
#[derive(Serialize, ToSchema)]
pub struct Profile {
    #[serde(flatten)]
    user: UserView,
    /// The notices also sent by e-mail.
    email_events: Vec<String>,
    /// A new address waiting for its confirmation code.
    pending_email: Option<String>,
    /// Whether this server sends e-mail.
    mail: bool,
}

async fn profile(state: &AppState, user: &crate::store::User) -> Result<Profile> {
    Ok(Profile {
        user: UserView::from(user),
        email_events: user.email_events.clone(),
        pending_email: state.auth.pending_email(&user.user_id).await?,
        mail: state.auth.mail_enabled(),
    })
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfirmEmailBody {
    /// The code sent to the new address.
    code: String,
}

/// Confirms a new e-mail address with the code sent to it; the address changes then.
#[utoipa::path(post, path = "/api/auth/me/email", tag = "auth",
    request_body = ConfirmEmailBody,
    responses((status = 200, description = "Changed", body = Profile),
              (status = 403, description = "Called with an API key", body = ErrorBody),
              (status = 409, description = "Another account took that e-mail meanwhile", body = ErrorBody),
              (status = 422, description = "A wrong or expired code", body = ErrorBody),
              (status = 503, description = "This server sends no e-mail", body = ErrorBody)))]
async fn confirm_email(
    state: AppState,
    CurrentUser(p): CurrentUser,
    ClientAddr(client): ClientAddr,
    note: crate::audit::AuditNote,
    Json(body): Json<ConfirmEmailBody>,
) -> Result<Json<Profile>> {
    no_api_key(&p, "change the account's e-mail")?;
    note.edit(|n| n.target_id = Some(p.user.user_id.clone()));
    let user = state
        .auth
        .confirm_email(&p.user, &body.code, &client)
        .await?;
    Ok(Json(profile(&state, &user).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetRequestBody {
    email: String,
}

/// Sends a password-reset code to the account with this e-mail, if there is one (the answer
/// is the same either way). Needs a mail relay (`smtp_url`).
#[utoipa::path(post, path = "/api/auth/password-reset", tag = "auth", security(()),
    request_body = ResetRequestBody,
    responses((status = 202, description = "If an account has this address, a code is on its way", body = Message),
              (status = 429, description = "Too many requests from this address", body = ErrorBody),
              (status = 503, description = "This server sends no e-mail", body = ErrorBody)))]
async fn request_password_reset(
    state: AppState,
    ClientAddr(client): ClientAddr,
    note: crate::audit::AuditNote,
    Json(body): Json<ResetRequestBody>,
) -> Result<(StatusCode, Json<Message>)> {
    note.edit(|n| n.actor_name = Some(body.email.trim().to_string()));
    state
        .auth
        .request_password_reset(&body.email, &client)
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Message::new(
            "if an account has this address, a code is on its way to it",
        )),
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetBody {
    email: String,
    /// The code from the e-mail.
    code: String,
    /// At least 8 characters.
    new_password: String,
}

/// Sets a new password with the code from the e-mail; every session of the account ends.
#[utoipa::path(post, path = "/api/auth/password-reset/confirm", tag = "auth", security(()),
    request_body = ResetBody,
    responses((status = 200, description = "The password is changed: sign in with it", body = Message),
              (status = 422, description = "A wrong or expired code, or a weak password", body = ErrorBody),
              (status = 429, description = "Too many wrong codes from this address", body = ErrorBody),
              (status = 503, description = "This server sends no e-mail", body = ErrorBody)))]
async fn reset_password(
    state: AppState,
    ClientAddr(client): ClientAddr,
    note: crate::audit::AuditNote,
    Json(body): Json<ResetBody>,
) -> Result<Json<Message>> {
    note.edit(|n| n.actor_name = Some(body.email.trim().to_string()));
    let user = state
        .auth
        .reset_password(&body.email, &body.code, &body.new_password, &client)
        .await?;
    note.edit(|n| {
        n.actor_id = Some(user.user_id.clone());
        n.actor_name = Some(user.username.clone());
        n.target_id = Some(user.user_id.clone());
    });
    Ok(Json(Message::new(
        "the password is changed and every session ended: sign in with it",
    )))
}

/// Changes the caller's profile: display name, and e-mail (with the current password; not
/// with an API key).
#[utoipa::path(patch, path = "/api/auth/me", tag = "auth",
    request_body = ProfileBody,
    responses((status = 200, description = "The account as it is now", body = Profile),
              (status = 403, description = "An e-mail change with an API key", body = ErrorBody),
              (status = 409, description = "Another account has that e-mail", body = ErrorBody),
              (status = 422, description = "A bad value, or a missing or wrong current password", body = ErrorBody),
              (status = 429, description = "Too many wrong current passwords", body = ErrorBody),
              (status = 503, description = "The confirmation e-mail could not be sent", body = ErrorBody)))]
async fn update_me(
    state: AppState,
    CurrentUser(p): CurrentUser,
    ClientAddr(client): ClientAddr,
    note: crate::audit::AuditNote,
    Json(body): Json<ProfileBody>,
) -> Result<Json<Profile>> {
    if body.email.is_some() {
        no_api_key(&p, "change the account's e-mail")?;
    }
    let mut changed = Vec::new();
    if body.display_name.is_some() {
        changed.push("display_name");
    }
    if body.email.is_some() {
        changed.push("email");
    }
    if body.email_events.is_some() {
        changed.push("email_events");
    }
    note.edit(|n| {
        n.target_id = Some(p.user.user_id.clone());
        n.detail = Some(changed.join(", "));
    });
    let user = state
        .auth
        .update_profile(
            &p.user,
            crate::auth::ProfileChange {
                display_name: body.display_name,
                email: body.email,
                current_password: body.current_password,
                email_events: body.email_events,
            },
            &client,
        )
        .await?;
    Ok(Json(profile(&state, &user).await?))
}

/// One of the caller's login sessions (a browser or program signed in with the password).
#[derive(Serialize, ToSchema)]
pub struct SessionView {
    session_id: String,
    /// The session the request was made with.
    current: bool,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    signed_in_at: time::OffsetDateTime,
    /// Its latest token refresh (or the sign-in).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    last_active_at: time::OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    expires_at: time::OffsetDateTime,
    /// The client address of the sign-in, then of its latest refresh.
    client: Option<String>,
    user_agent: Option<String>,
}

/// A sign-in, from the audit log.
#[derive(Serialize, ToSchema)]
pub struct SignInView {
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    at: time::OffsetDateTime,
    client: String,
}

#[derive(Serialize, ToSchema)]
pub struct SessionList {
    /// Newest sign-in first.
    sessions: Vec<SessionView>,
    /// The account's latest successful sign-ins (address, time), newest first.
    recent_sign_ins: Vec<SignInView>,
    /// The sign-in before the current one, if any: when the account was last used.
    last_login: Option<SignInView>,
}

fn unix_time(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// The caller's login sessions and recent sign-ins.
#[utoipa::path(get, path = "/api/auth/sessions", tag = "auth",
    responses((status = 200, description = "Sessions and sign-ins", body = SessionList),
              (status = 401, description = "No or bad credentials", body = ErrorBody)))]
async fn list_sessions(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<SessionList>> {
    let sessions = state.auth.sessions(&p.user.user_id).await?;
    let sign_ins = state
        .audit
        .list(crate::store::AuditQuery {
            actor_id: Some(p.user.user_id.clone()),
            action: Some("auth.login".into()),
            outcome: Some("success".into()),
            limit: 10,
            ..Default::default()
        })
        .await?;
    let recent_sign_ins: Vec<SignInView> = sign_ins
        .into_iter()
        .map(|e| SignInView {
            at: e.at,
            client: e.client,
        })
        .collect();
    // The current session's own sign-in is the newest; the one before it is "last login".
    let current_at = sessions
        .iter()
        .find(|s| p.session_id.as_deref() == Some(s.session_id.as_str()))
        .map(|s| s.signed_in_at.unwrap_or(s.created_at));
    let mine = current_at.and_then(|c| {
        recent_sign_ins
            .iter()
            .position(|s| (s.at.unix_timestamp() - c).abs() <= 2)
    });
    let last_login = recent_sign_ins
        .get(mine.map_or(0, |i| i + 1))
        .map(|s| SignInView {
            at: s.at,
            client: s.client.clone(),
        });
    Ok(Json(SessionList {
        sessions: sessions
            .into_iter()
            .map(|s| SessionView {
                current: p.session_id.as_deref() == Some(s.session_id.as_str()),
                signed_in_at: unix_time(s.signed_in_at.unwrap_or(s.created_at)),
                last_active_at: unix_time(s.created_at),
                expires_at: unix_time(s.expires_at),
                client: s.client,
                user_agent: s.user_agent,
                session_id: s.session_id,
            })
            .collect(),
        recent_sign_ins,
        last_login,
    }))
}

#[derive(Serialize, ToSchema)]
pub struct Ended {
    /// How many sessions ended.
    ended: usize,
}

/// Signs out every other device: ends all of the caller's sessions but the current one.
#[utoipa::path(delete, path = "/api/auth/sessions", tag = "auth",
    responses((status = 200, description = "Ended", body = Ended),
              (status = 403, description = "Called with an API key", body = ErrorBody)))]
async fn end_other_sessions(state: AppState, CurrentUser(p): CurrentUser) -> Result<Json<Ended>> {
    no_api_key(&p, "end sessions")?;
    let ended = state
        .auth
        .end_sessions(&p.user.user_id, None, p.session_id.as_deref())
        .await?;
    Ok(Json(Ended { ended }))
}

/// Ends one of the caller's sessions (the current one too: that signs out).
#[utoipa::path(delete, path = "/api/auth/sessions/{id}", tag = "auth",
    params(("id" = String, Path, description = "The session's id")),
    responses((status = 200, description = "Ended", body = Ended),
              (status = 403, description = "Called with an API key", body = ErrorBody),
              (status = 404, description = "No such session of the caller's", body = ErrorBody)))]
async fn end_session(
    state: AppState,
    CurrentUser(p): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<Ended>> {
    no_api_key(&p, "end sessions")?;
    let ended = state
        .auth
        .end_sessions(&p.user.user_id, Some(&id), None)
        .await?;
    if ended == 0 {
        return Err(Error::not_found("session"));
    }
    Ok(Json(Ended { ended }))
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
            display_name: session.user.display_name.clone(),
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
