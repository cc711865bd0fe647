//! Request extractors: who is calling ([`CurrentUser`], [`AdminUser`]) and from where
//! ([`ClientAddr`]).

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;

use super::AppState;
use crate::auth::Principal;
use crate::error::Error;

/// The authenticated caller, from `Authorization: Bearer <JWT or API key>`.
pub struct CurrentUser(pub Principal);

impl FromRequestParts<AppState> for CurrentUser {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| Error::unauthenticated("missing bearer token"))?;
        let value = value
            .to_str()
            .map_err(|_| Error::unauthenticated("malformed authorization header"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::unauthenticated("expected 'Authorization: Bearer <token>'"))?;
        let principal = state.auth.authenticate(token).await?;
        crate::audit::AuditNote::set_actor(
            parts,
            &principal.user.user_id,
            &principal.user.username,
            principal.api_key_id.as_deref(),
        );
        Ok(CurrentUser(principal))
    }
}

/// An authenticated caller with role `admin` (403 for anyone else).
pub struct AdminUser(pub Principal);

impl FromRequestParts<AppState> for AdminUser {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        let CurrentUser(p) = CurrentUser::from_request_parts(parts, state).await?;
        if !p.is_admin() {
            return Err(Error::forbidden("administrator role required"));
        }
        Ok(AdminUser(p))
    }
}

/// The client's address: the peer, or the first `X-Forwarded-For` hop when configured to
/// trust a reverse proxy.
pub struct ClientAddr(pub String);

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        Ok(ClientAddr(crate::audit::client_addr(
            state.config.trust_forwarded_for,
            &parts.headers,
            &parts.extensions,
        )))
    }
}

/// The value of one cookie from the request, if present.
pub fn cookie<'a>(parts: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    parts
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}
