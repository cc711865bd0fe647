//! Accounts and credentials: argon2id passwords, JWT access tokens bound to a login session,
//! rotating refresh tokens, API keys and throttling. Nothing here knows about HTTP.

pub mod passwords;
mod throttle;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::config::Config;
use crate::error::{Error, Kind, Result};
use crate::store::{ApiKey, LoginSession, RefreshToken, Role, Store, StoreError, User, new_id};

pub use passwords::PasswordPool;
pub use throttle::{Gate, Throttle};

/// Prefix of API key secrets; a bearer token with it is an API key, not a JWT.
pub const API_KEY_PREFIX: &str = "ft-";
/// Passwords longer than this are refused (bounds the hashing work a request can cause).
const MAX_PASSWORD_LEN: usize = 1024;
/// Once an account has had this many attempts in a window from everywhere, attempts from
/// addresses it has not signed in from are paced: one per [`ACCOUNT_PACE`].
const ACCOUNT_PACE: Duration = Duration::from_secs(2);
/// The longest a paced attempt is made to wait before it is refused (429).
const ACCOUNT_PACE_MAX_WAIT: Duration = Duration::from_secs(10);
/// Password checks one client address may have running at once (the others queue).
const CHECKS_PER_ADDRESS: usize = 2;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    role: Role,
    iat: i64,
    exp: i64,
    typ: String,
    /// The user's `token_version` when issued (absent in tokens older than the field: 0).
    #[serde(default)]
    ver: u64,
    /// The login session (refresh-token family) the token belongs to; it works only while
    /// that session exists, so logout and theft detection end it at once.
    #[serde(default)]
    sid: Option<String>,
}

/// What a user may change of their own account.
#[derive(Debug, Clone, Default)]
pub struct ProfileChange {
    pub display_name: Option<String>,
    pub email: Option<String>,
    /// Needed with a new e-mail.
    pub current_password: Option<String>,
    /// Notices also sent by e-mail (empty: none).
    pub email_events: Option<Vec<String>>,
}

/// A `User-Agent` as kept with a session: printable, at most 200 characters.
fn clean_user_agent(ua: &str) -> String {
    ua.chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect::<String>()
        .trim()
        .to_string()
}

/// A fresh sign-in or refresh: the tokens handed to the client.
pub struct Session {
    pub user: User,
    pub access_token: String,
    pub expires_in: u64,
    pub refresh_token: String,
    pub refresh_expires_in: u64,
}

/// The one who makes a request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user: User,
    /// Set when the request was authenticated with an API key.
    pub api_key_id: Option<String>,
    /// The login session of the access token (none for an API key).
    pub session_id: Option<String>,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.user.role == Role::Admin
    }
}

pub struct Auth {
    store: Store,
    passwords: PasswordPool,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    access_ttl: u64,
    refresh_ttl: u64,
    remember_ttl: u64,
    max_failures: u32,
    max_failures_per_ip: u32,
    max_registrations_per_ip: u32,
    /// A rotated refresh token presented again within this many seconds is treated as a
    /// benign race (two tabs refreshing at once); later, as theft: the session ends.
    reuse_grace_secs: i64,
    throttle: Throttle,
    /// Password checks per client address, one after the other past a few.
    per_address: Gate,
    /// The hash checked for unknown accounts, so they cost the same time as known ones.
    dummy_hash: String,
    /// E-mail, when a relay is configured: reset codes and address confirmation.
    mailer: Option<Arc<crate::mail::Mailer>>,
}

/// How long a code sent by e-mail works.
const MAIL_CODE_TTL_SECS: i64 = 15 * 60;
/// Wrong codes before a code stops working.
const MAIL_CODE_ATTEMPTS: u32 = 5;

fn mail_not_configured() -> Error {
    Error::new(
        Kind::Unavailable,
        "mail_not_configured",
        "this server sends no e-mail (no smtp_url is configured): ask an administrator to reset the password",
    )
}

fn bad_code() -> Error {
    Error::new(
        Kind::Invalid,
        "invalid_code",
        "the code is wrong or has expired: ask for a new one",
    )
}

/// An 8-digit code (uniform: 10^8 values drawn by rejection).
fn new_code() -> String {
    loop {
        let n = rand::rngs::OsRng.next_u32();
        if n < 4_200_000_000 {
            return format!("{:08}", n % 100_000_000);
        }
    }
}

fn invalid_credentials() -> Error {
    Error::new(
        Kind::Unauthenticated,
        "invalid_credentials",
        "invalid username/email or password",
    )
}

fn account_disabled() -> Error {
    Error::new(
        Kind::Unauthenticated,
        "account_disabled",
        "this account is disabled",
    )
}

impl Auth {
    /// Sets up authentication, loading (or creating, mode 0600) the signing secret and
    /// starting the password hashing threads.
    pub fn new(
        store: Store,
        config: &Config,
        mailer: Option<Arc<crate::mail::Mailer>>,
    ) -> anyhow::Result<Arc<Auth>> {
        let secret = if config.jwt_secret.is_empty() {
            load_or_create_secret(&config.jwt_secret_path())?
        } else {
            config.jwt_secret.as_bytes().to_vec()
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let dummy_hash = passwords::hash_with(&mut Vec::new(), random_secret().as_bytes())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Arc::new(Auth {
            store,
            passwords: PasswordPool::per_core()?,
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            validation,
            access_ttl: config.access_token_ttl_secs,
            refresh_ttl: config.refresh_token_ttl_secs,
            remember_ttl: config.remember_me_ttl_secs,
            max_failures: config.login_max_failures.max(1),
            max_failures_per_ip: config.login_max_failures_per_ip.max(1),
            max_registrations_per_ip: config.register_max_per_ip.max(1),
            reuse_grace_secs: i64::try_from(config.refresh_reuse_grace_secs).unwrap_or(i64::MAX),
            throttle: Throttle::new(Duration::from_secs(config.login_window_secs)),
            per_address: Gate::new(CHECKS_PER_ADDRESS),
            dummy_hash,
            mailer,
        }))
    }

    /// The password hashing threads (also used by administrators' password resets).
    pub fn passwords(&self) -> &PasswordPool {
        &self.passwords
    }

    // ---- accounts ----------------------------------------------------------------------

    /// Registers an account. `role: None` makes the first account ever admin. `client`, the
    /// caller's address, is throttled (every registration counts); the command line passes
    /// `None`.
    pub async fn register(
        &self,
        username: &str,
        email: &str,
        password: &str,
        role: Option<Role>,
        client: Option<&str>,
    ) -> Result<User> {
        validate_username(username)?;
        let email = validate_email(email)?;
        validate_password(password)?;
        if let Some(client) = client {
            self.throttle
                .reserve(&format!("register:{client}"), self.max_registrations_per_ip)
                .map_err(|wait| {
                    tracing::warn!(client, "registrations throttled");
                    Error {
                        message: format!(
                            "too many accounts registered from this address; try again in {wait} s"
                        ),
                        ..Error::throttled(wait)
                    }
                })?;
        }
        // Fail fast on a taken name before spending a hash on it; the store re-checks
        // atomically.
        if self.store.user_by_login(username).await?.is_some() {
            return Err(taken("username"));
        }
        if self.store.user_by_login(&email).await?.is_some() {
            return Err(taken("email"));
        }
        let hash = self.passwords.hash(password).await?;
        let user = User::new(username.to_string(), email, hash);
        match self.store.create_user(user, role).await {
            Ok(user) => {
                tracing::info!(user_id = %user.user_id, username = %user.username, role = user.role.as_str(), "account created");
                Ok(user)
            }
            Err(StoreError::Conflict(field)) => Err(taken(field)),
            Err(e) => Err(e.into()),
        }
    }

    /// Checks credentials and opens a session. Throttled three ways: per account and address
    /// (every attempt counted before its password is checked; locks that pair for a window),
    /// per address (failures lock the address; its checks run a few at a time, so a burst
    /// cannot outrun the count), and per account from everywhere (paces instead of locking,
    /// and not for addresses the account signed in from recently).
    pub async fn login(
        &self,
        login: &str,
        password: &str,
        remember: bool,
        client: &str,
        user_agent: Option<&str>,
    ) -> Result<Session> {
        let account = login.trim().to_lowercase();
        let pair_key = format!("login:{account}|{client}");
        let ip_key = format!("ip:{client}");
        let account_key = format!("account:{account}");
        if let Some(wait) = self.throttle.locked(&ip_key) {
            return Err(Error::throttled(wait));
        }
        self.throttle
            .reserve(&pair_key, self.max_failures)
            .map_err(Error::throttled)?;
        let _pass = self.per_address.enter(client).await;
        if let Some(wait) = self.throttle.locked(&ip_key) {
            self.throttle.refund(&pair_key);
            return Err(Error::throttled(wait));
        }
        if !self.throttle.is_known(&pair_key) {
            match self.throttle.pace(
                &account_key,
                self.max_failures,
                ACCOUNT_PACE,
                ACCOUNT_PACE_MAX_WAIT,
            ) {
                Ok(wait) if wait.is_zero() => {}
                Ok(wait) => {
                    tracing::info!(login = %login, client = %client, wait_ms = wait.as_millis() as u64, "login paced");
                    tokio::time::sleep(wait).await;
                }
                Err(wait) => {
                    self.throttle.refund(&pair_key);
                    return Err(Error::throttled(wait));
                }
            }
        }
        let user = self.store.user_by_login(login).await?;
        let hash = match &user {
            Some(u) => u.password_hash.as_str(),
            // Same work for an unknown account, so timing does not tell which names exist.
            None => self.dummy_hash.as_str(),
        };
        let ok = self.passwords.verify(password, hash).await?;
        let user = match (user, ok) {
            // A disabled account gets the same answer whatever the password, so the answer
            // confirms no guess.
            (Some(user), _) if user.disabled => return Err(account_disabled()),
            (Some(user), true) => user,
            _ => {
                self.throttle.fail(&ip_key, self.max_failures_per_ip);
                tracing::warn!(login = %login, client = %client, "login failed");
                return Err(invalid_credentials());
            }
        };
        self.throttle.clear(&pair_key);
        self.throttle.mark_known(&pair_key);
        self.open_session(user, remember, client, user_agent).await
    }

    async fn open_session(
        &self,
        user: User,
        remember: bool,
        client: &str,
        user_agent: Option<&str>,
    ) -> Result<Session> {
        let ttl = if remember {
            self.remember_ttl
        } else {
            self.refresh_ttl
        };
        let now = now();
        let session = LoginSession {
            session_id: new_id(),
            user_id: user.user_id.clone(),
            created_at: now,
            expires_at: now + ttl as i64,
            signed_in_at: Some(now),
            client: Some(client.to_string()),
            user_agent: user_agent.map(clean_user_agent).filter(|a| !a.is_empty()),
        };
        let refresh_token = random_secret();
        let record = RefreshToken {
            user_id: user.user_id.clone(),
            family: session.session_id.clone(),
            expires_at: session.expires_at,
            remember,
            rotated_at: None,
        };
        self.store
            .open_session(&session, &sha256(&refresh_token), &record)
            .await?;
        Ok(Session {
            access_token: self.access_token(&user, &session.session_id)?,
            user,
            expires_in: self.access_ttl,
            refresh_token,
            refresh_expires_in: ttl,
        })
    }

    fn access_token(&self, user: &User, session_id: &str) -> Result<String> {
        let iat = now();
        let claims = Claims {
            sub: user.user_id.clone(),
            role: user.role,
            iat,
            exp: iat + self.access_ttl as i64,
            typ: "access".into(),
            ver: user.token_version,
            sid: Some(session_id.to_string()),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| Error::internal(format!("signing a token: {e}")))
    }

    /// Exchanges a refresh token for a new access token and a new refresh token (the old
    /// one stops working). Reuse of an old token ends its whole session.
    pub async fn refresh(&self, refresh_token: &str, client: &str) -> Result<Session> {
        let invalid = || Error::unauthenticated("invalid or expired refresh token");
        let hash = sha256(refresh_token);
        let record = self.store.refresh_token(&hash).await?.ok_or_else(invalid)?;
        let now = now();
        if record.expires_at <= now {
            self.store.remove_refresh_token(&hash).await?;
            return Err(invalid());
        }
        if let Some(rotated) = record.rotated_at {
            if now - rotated >= self.reuse_grace_secs {
                let family = record.family.clone();
                let n = self
                    .store
                    .revoke_refresh_where(move |t| t.family == family)
                    .await?;
                tracing::warn!(user_id = %record.user_id, revoked = n, "refresh token reuse: session revoked");
            }
            return Err(invalid());
        }
        let user = self.active_user(&record.user_id).await?;
        let ttl = if record.remember {
            self.remember_ttl
        } else {
            self.refresh_ttl
        };
        let next_token = random_secret();
        let next = RefreshToken {
            user_id: user.user_id.clone(),
            family: record.family.clone(),
            expires_at: now + ttl as i64,
            remember: record.remember,
            rotated_at: None,
        };
        // The sign-in's time and program stay; the address is the latest one seen.
        let before = self.store.session(&record.family).await?;
        let session = LoginSession {
            session_id: record.family.clone(),
            user_id: user.user_id.clone(),
            created_at: now,
            expires_at: next.expires_at,
            signed_in_at: before
                .as_ref()
                .map(|s| s.signed_in_at.unwrap_or(s.created_at)),
            client: Some(client.to_string()),
            user_agent: before.and_then(|s| s.user_agent),
        };
        let rotated = RefreshToken {
            rotated_at: Some(now),
            ..record.clone()
        };
        if !self
            .store
            .rotate_refresh_token(
                &hash,
                &record,
                &rotated,
                &sha256(&next_token),
                &next,
                &session,
            )
            .await?
        {
            return Err(invalid());
        }
        Ok(Session {
            access_token: self.access_token(&user, &session.session_id)?,
            user,
            expires_in: self.access_ttl,
            refresh_token: next_token,
            refresh_expires_in: ttl,
        })
    }

    /// Ends the caller's session (that of their access token) and the one the refresh token
    /// belongs to, if it is theirs: every refresh token rotated from those logins, and every
    /// access token issued for them, stop working at once.
    pub async fn logout(&self, principal: &Principal, refresh_token: Option<&str>) -> Result<()> {
        let user_id = principal.user.user_id.clone();
        let mut families: Vec<String> = principal.session_id.iter().cloned().collect();
        if let Some(token) = refresh_token
            && let Some(record) = self.store.refresh_token(&sha256(token)).await?
            && record.user_id == user_id
        {
            families.push(record.family);
        }
        if families.is_empty() {
            return Ok(());
        }
        let n = self
            .store
            .revoke_refresh_where(move |t| t.user_id == user_id && families.contains(&t.family))
            .await?;
        tracing::info!(user_id = %principal.user.user_id, tokens = n, "signed out");
        Ok(())
    }

    /// Removes expired refresh tokens and sessions; returns how many tokens.
    pub async fn sweep_expired(&self) -> Result<usize> {
        Ok(self.store.sweep_expired(now()).await?)
    }

    /// Who a bearer token (JWT access token or API key) belongs to.
    pub async fn authenticate(&self, bearer: &str) -> Result<Principal> {
        let invalid = || Error::unauthenticated("invalid or expired token");
        if bearer.starts_with(API_KEY_PREFIX) {
            let (key, user) = self
                .store
                .api_key_by_hash(&sha256(bearer))
                .await?
                .ok_or_else(invalid)?;
            let user = active(user)?;
            return Ok(Principal {
                user,
                api_key_id: Some(key.key_id),
                session_id: None,
            });
        }
        let data = jsonwebtoken::decode::<Claims>(bearer, &self.decoding, &self.validation)
            .map_err(|_| invalid())?;
        let claims = data.claims;
        if claims.typ != "access" {
            return Err(invalid());
        }
        // Tokens from before sessions were recorded carry none: they are refused, and the
        // client refreshes (its refresh token then gets a session).
        let sid = claims.sid.ok_or_else(invalid)?;
        let (user, live) = self.store.user_and_session(&claims.sub, &sid).await?;
        let user = active(user)?;
        if claims.ver != user.token_version || !live {
            return Err(invalid());
        }
        Ok(Principal {
            user,
            api_key_id: None,
            session_id: Some(sid),
        })
    }

    /// Gives `user` a new password (validated, hashed) and ends their sessions: refresh
    /// tokens and sessions are revoked, so every access token stops working. Saves the record.
    pub async fn set_password(&self, user: User, new: &str) -> Result<User> {
        validate_password(new)?;
        let hash = self.passwords.hash(new).await?;
        let user = self
            .store
            .modify_user(&user.user_id, move |u| {
                u.password_hash = hash.clone();
                u.token_version += 1;
                u.updated_at = OffsetDateTime::now_utc();
            })
            .await?
            .ok_or_else(|| Error::not_found("user"))?;
        let uid = user.user_id.clone();
        self.store
            .revoke_refresh_where(move |t| t.user_id == uid)
            .await?;
        Ok(user)
    }

    /// Changes a signed-in user's password after checking the current one. Wrong current
    /// passwords are throttled per account on this route alone (a stolen token must not be
    /// able to lock its owner's login) and per address. Every other session ends. Returns a
    /// fresh session for the caller.
    pub async fn change_password(
        &self,
        user: &User,
        current: &str,
        new: &str,
        client: &str,
        user_agent: Option<&str>,
    ) -> Result<Session> {
        validate_password(new)?;
        if new == current {
            return Err(Error::new(
                Kind::Invalid,
                "same_password",
                "the new password must differ from the current one",
            ));
        }
        self.check_current_password(user, current, client).await?;
        // Re-read: the record may have changed (role, disabled) since the request began.
        let fresh = self
            .set_password(self.active_user(&user.user_id).await?, new)
            .await?;
        tracing::info!(user_id = %fresh.user_id, client = %client, "password changed; other sessions ended");
        self.open_session(fresh, false, client, user_agent).await
    }

    /// Checks a signed-in user's current password, for changes that need it (the password,
    /// the e-mail). Wrong ones are throttled per account on these changes alone (a stolen
    /// token must not be able to lock its owner's login) and per address.
    async fn check_current_password(&self, user: &User, current: &str, client: &str) -> Result<()> {
        let key = format!("password:{}", user.user_id);
        let ip_key = format!("ip:{client}");
        if let Some(wait) = self.throttle.locked(&ip_key) {
            return Err(Error::throttled(wait));
        }
        self.throttle
            .reserve(&key, self.max_failures)
            .map_err(Error::throttled)?;
        let _pass = self.per_address.enter(client).await;
        // The stored hash, not the one the request began with (a change may have landed).
        let stored = self.active_user(&user.user_id).await?;
        if !self
            .passwords
            .verify(current, &stored.password_hash)
            .await?
        {
            self.throttle.fail(&ip_key, self.max_failures_per_ip);
            tracing::warn!(user_id = %user.user_id, client = %client, "wrong current password");
            return Err(Error::new(
                Kind::Invalid,
                "wrong_password",
                "the current password is not correct",
            ));
        }
        self.throttle.clear(&key);
        Ok(())
    }

    /// Changes the caller's own profile: the display name (empty clears it), and the e-mail
    /// (validated, unique, and only with the current password: it signs in). Returns the
    /// account as it is now.
    pub async fn update_profile(
        &self,
        user: &User,
        change: ProfileChange,
        client: &str,
    ) -> Result<User> {
        let display_name = match change.display_name {
            None => None,
            Some(d) => {
                let d = crate::text::clean_name(&d);
                if d.chars().count() > 64 {
                    return Err(Error::invalid("display_name: at most 64 characters"));
                }
                Some((!d.is_empty()).then_some(d))
            }
        };
        let email = match change.email {
            None => None,
            Some(e) => {
                let e = validate_email(&e)?;
                (e != user.email).then_some(e)
            }
        };
        if email.is_some() {
            let current = change.current_password.as_deref().unwrap_or("");
            if current.is_empty() {
                return Err(Error::new(
                    Kind::Invalid,
                    "password_required",
                    "current_password: needed to change the e-mail address",
                ));
            }
            self.check_current_password(user, current, client).await?;
        }
        // With a mail relay, a new address is changed once the code sent to it comes back.
        let email = match (email, self.mailer.clone()) {
            (Some(e), Some(mailer)) => {
                if let Some(other) = self.store.user_by_login(&e).await?
                    && other.user_id != user.user_id
                {
                    return Err(taken("email"));
                }
                let code = new_code();
                self.store
                    .put_mail_code(&crate::store::MailCode {
                        user_id: user.user_id.clone(),
                        purpose: "email_change".into(),
                        hash: sha256(&code).to_vec(),
                        expires_at: now() + MAIL_CODE_TTL_SECS,
                        attempts: 0,
                        new_email: Some(e.clone()),
                    })
                    .await?;
                let body = format!(
                    "To make this the e-mail address of the ferrotune account {}, enter this code on \
                     its account page:\n\n{code}\n\nIt works once, for {} minutes. If you did not \
                     ask for it, ignore this e-mail.\n",
                    user.username,
                    MAIL_CODE_TTL_SECS / 60
                );
                mailer
                    .send(&e, "ferrotune: confirm your e-mail address", body)
                    .await
                    .map_err(|why| {
                        tracing::warn!(user_id = %user.user_id, error = %why, "confirmation e-mail not sent");
                        Error::new(
                            Kind::Unavailable,
                            "mail_failed",
                            "the confirmation e-mail could not be sent; try again later",
                        )
                    })?;
                tracing::info!(user_id = %user.user_id, "e-mail change: confirmation code sent");
                None
            }
            (email, _) => email,
        };
        let events = match change.email_events {
            None => None,
            Some(list) if list.is_empty() => Some(Vec::new()),
            Some(list) => Some(crate::webhooks::check_events(list).map_err(|e| Error {
                message: e.message.replacen("events:", "email_events:", 1),
                ..e
            })?),
        };
        if display_name.is_none() && email.is_none() && events.is_none() {
            return self.active_user(&user.user_id).await;
        }
        let (new_name, new_email, new_events) = (display_name.clone(), email.clone(), events);
        let updated = self
            .store
            .modify_user(&user.user_id, move |u| {
                if let Some(d) = &new_name {
                    u.display_name = d.clone();
                }
                if let Some(e) = &new_email {
                    u.email = e.clone();
                }
                if let Some(ev) = &new_events {
                    u.email_events = ev.clone();
                }
                u.updated_at = OffsetDateTime::now_utc();
            })
            .await
            .map_err(|e| match e {
                StoreError::Conflict(field) => taken(field),
                e => e.into(),
            })?
            .ok_or_else(|| Error::not_found("user"))?;
        tracing::info!(user_id = %updated.user_id, email_changed = email.is_some(), "profile updated");
        Ok(updated)
    }

    /// Whether e-mail can be sent (password resets and address confirmation work).
    pub fn mail_enabled(&self) -> bool {
        self.mailer.is_some()
    }

    /// Sends a password-reset code to the account with this e-mail, if there is one and it is
    /// enabled. Answers the same whether or not there is (the code goes to the address, so
    /// only its owner learns); throttled per address and per account like sign-ins.
    pub async fn request_password_reset(&self, email: &str, client: &str) -> Result<()> {
        let Some(mailer) = self.mailer.clone() else {
            return Err(mail_not_configured());
        };
        let email = email.trim().to_lowercase();
        self.throttle
            .reserve(&format!("reset-ip:{client}"), self.max_failures_per_ip)
            .map_err(Error::throttled)?;
        // One code per account per pace: a flood of requests cannot flood its inbox.
        if self
            .throttle
            .pace(
                &format!("reset:{email}"),
                0,
                ACCOUNT_PACE * 15,
                Duration::ZERO,
            )
            .is_err()
        {
            return Ok(());
        }
        let Some(user) = self.store.user_by_login(&email).await? else {
            tracing::info!(client, "password reset asked for an unknown address");
            return Ok(());
        };
        if user.disabled || !user.email.eq_ignore_ascii_case(&email) {
            return Ok(());
        }
        let code = new_code();
        self.store
            .put_mail_code(&crate::store::MailCode {
                user_id: user.user_id.clone(),
                purpose: "password_reset".into(),
                hash: sha256(&code).to_vec(),
                expires_at: now() + MAIL_CODE_TTL_SECS,
                attempts: 0,
                new_email: None,
            })
            .await?;
        let body = format!(
            "Someone (you, we hope) asked to reset the password of the ferrotune account {}.\n\n\
             Your code: {code}\n\n\
             It works once, for {} minutes. If you did not ask for it, ignore this e-mail: \
             the password stays as it is.\n",
            user.username,
            MAIL_CODE_TTL_SECS / 60
        );
        tracing::info!(user_id = %user.user_id, client, "password reset code sent");
        // The answer does not wait for the relay (its time would tell whether the account
        // exists).
        tokio::spawn(async move {
            mailer
                .send_logged(
                    &user.email,
                    "ferrotune: your password reset code",
                    body,
                    "password_reset",
                )
                .await
        });
        Ok(())
    }

    /// Sets a new password with a code from [`Auth::request_password_reset`]; every session
    /// ends. A code works once; wrong ones count, and after a few the code stops working.
    pub async fn reset_password(
        &self,
        email: &str,
        code: &str,
        new: &str,
        client: &str,
    ) -> Result<User> {
        if self.mailer.is_none() {
            return Err(mail_not_configured());
        }
        validate_password(new)?;
        let ip_key = format!("ip:{client}");
        if let Some(wait) = self.throttle.locked(&ip_key) {
            return Err(Error::throttled(wait));
        }
        let user = self
            .store
            .user_by_login(email.trim())
            .await?
            .filter(|u| u.email.eq_ignore_ascii_case(email.trim()) && !u.disabled);
        let Some(user) = user else {
            self.throttle.fail(&ip_key, self.max_failures_per_ip);
            return Err(bad_code());
        };
        if self
            .take_code("password_reset", &user.user_id, code)
            .await?
            .is_none()
        {
            self.throttle.fail(&ip_key, self.max_failures_per_ip);
            tracing::warn!(user_id = %user.user_id, client, "wrong password reset code");
            return Err(bad_code());
        }
        let user = self.set_password(user, new).await?;
        tracing::info!(user_id = %user.user_id, client, "password reset by e-mail code; sessions ended");
        Ok(user)
    }

    /// The user's unexpired code for `purpose` if `code` is it (used up then); a wrong one is
    /// counted against it.
    async fn take_code(
        &self,
        purpose: &str,
        user_id: &str,
        code: &str,
    ) -> Result<Option<crate::store::MailCode>> {
        let given = sha256(code.trim()).to_vec();
        let now = now();
        Ok(self
            .store
            .use_mail_code(purpose, user_id, MAIL_CODE_ATTEMPTS, move |c| {
                c.expires_at > now && c.hash == given
            })
            .await?)
    }

    /// Confirms a new address with the code sent to it.
    pub async fn confirm_email(&self, user: &User, code: &str, client: &str) -> Result<User> {
        if self.mailer.is_none() {
            return Err(mail_not_configured());
        }
        let key = format!("password:{}", user.user_id);
        self.throttle
            .reserve(&key, self.max_failures)
            .map_err(Error::throttled)?;
        let used = self.take_code("email_change", &user.user_id, code).await?;
        let Some(new_email) = used.and_then(|c| c.new_email) else {
            tracing::warn!(user_id = %user.user_id, client, "wrong e-mail confirmation code");
            return Err(bad_code());
        };
        self.throttle.clear(&key);
        let updated = self
            .store
            .modify_user(&user.user_id, move |u| {
                u.email = new_email.clone();
                u.updated_at = OffsetDateTime::now_utc();
            })
            .await
            .map_err(|e| match e {
                StoreError::Conflict(field) => taken(field),
                e => e.into(),
            })?
            .ok_or_else(|| Error::not_found("user"))?;
        tracing::info!(user_id = %updated.user_id, client, "e-mail address confirmed and changed");
        Ok(updated)
    }

    /// The address waiting for its confirmation code, if any.
    pub async fn pending_email(&self, user_id: &str) -> Result<Option<String>> {
        Ok(self
            .store
            .mail_code("email_change", user_id)
            .await?
            .filter(|c| c.expires_at > now())
            .and_then(|c| c.new_email))
    }

    /// The caller's login sessions, newest first.
    pub async fn sessions(&self, user_id: &str) -> Result<Vec<LoginSession>> {
        let now = now();
        Ok(self
            .store
            .user_sessions(user_id)
            .await?
            .into_iter()
            .filter(|s| s.expires_at > now)
            .collect())
    }

    /// Ends sessions of `user_id`: the one named, or (`None`) every one but `keep`. Their
    /// refresh tokens go and their access tokens stop at once. Returns how many ended.
    pub async fn end_sessions(
        &self,
        user_id: &str,
        only: Option<&str>,
        keep: Option<&str>,
    ) -> Result<usize> {
        let mine: Vec<String> = self
            .store
            .user_sessions(user_id)
            .await?
            .into_iter()
            .map(|s| s.session_id)
            .filter(|id| only.is_none_or(|o| o == id) && keep != Some(id.as_str()))
            .collect();
        if mine.is_empty() {
            return Ok(0);
        }
        let ended = mine.len();
        let (uid, families) = (user_id.to_string(), mine.clone());
        self.store
            .revoke_refresh_where(move |t| t.user_id == uid && families.contains(&t.family))
            .await?;
        // A session whose tokens are all gone already (expired) still ends.
        self.store.remove_sessions(mine).await?;
        tracing::info!(user_id, sessions = ended, "sessions ended");
        Ok(ended)
    }

    /// The user, if they still exist and are not disabled. Checked on every request, so
    /// disabling or deleting an account ends its tokens at once.
    async fn active_user(&self, user_id: &str) -> Result<User> {
        active(self.store.user(user_id).await?)
    }

    // ---- API keys ----------------------------------------------------------------------

    /// Creates an API key; returns the record and the secret, which is never shown again.
    pub async fn create_api_key(&self, owner: &str, name: &str) -> Result<(ApiKey, String)> {
        let name = crate::text::clean_name(name);
        if name.is_empty() || name.chars().count() > 64 {
            return Err(Error::invalid("name must be 1 to 64 characters"));
        }
        let secret = format!("{API_KEY_PREFIX}{}", random_secret());
        let hash = sha256(&secret);
        let key = ApiKey {
            key_id: new_id(),
            owner: owner.to_string(),
            name,
            prefix: secret.chars().take(10).collect(),
            secret_hash: hash.to_vec(),
            created_at: OffsetDateTime::now_utc(),
        };
        self.store.create_api_key(&key, &hash).await?;
        Ok((key, secret))
    }

    /// The owner's API keys (without secrets), newest first.
    pub async fn api_keys(&self, owner: &str) -> Result<Vec<ApiKey>> {
        Ok(self.store.api_keys_of().list(owner).await?)
    }

    /// Revokes one of the owner's API keys; it stops working at once.
    pub async fn revoke_api_key(&self, owner: &str, key_id: &str) -> Result<ApiKey> {
        self.store
            .delete_api_key(owner, key_id)
            .await?
            .ok_or_else(|| Error::not_found("API key"))
    }
}

fn active(user: Option<User>) -> Result<User> {
    match user {
        Some(u) if !u.disabled => Ok(u),
        Some(_) => Err(account_disabled()),
        None => Err(Error::unauthenticated("invalid or expired token")),
    }
}

fn taken(field: &str) -> Error {
    let code = if field == "email" {
        "email_taken"
    } else {
        "username_taken"
    };
    Error::conflict(code, format!("{field} is already registered"))
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

pub fn validate_username(username: &str) -> Result<()> {
    let len = username.chars().count();
    let ok = (3..=20).contains(&len)
        && username
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            Kind::Invalid,
            "invalid_username",
            "username must be 3 to 20 characters of letters, digits, '_' or '-'",
        ))
    }
}

/// Checks an email address's shape and returns it trimmed.
pub fn validate_email(email: &str) -> Result<String> {
    let email = email.trim();
    let bad = || Error::new(Kind::Invalid, "invalid_email", "email address is not valid");
    if email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    let (local, domain) = email.rsplit_once('@').ok_or_else(bad)?;
    let domain_ok = domain.split('.').count() >= 2
        && domain.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        });
    if local.is_empty() || local.len() > 64 || local.contains('@') || !domain_ok {
        return Err(bad());
    }
    Ok(email.to_string())
}

pub fn validate_password(password: &str) -> Result<()> {
    let len = password.chars().count();
    if len < 8 {
        return Err(Error::new(
            Kind::Invalid,
            "weak_password",
            "password must be at least 8 characters",
        ));
    }
    if password.len() > MAX_PASSWORD_LEN {
        return Err(Error::new(
            Kind::Invalid,
            "invalid_password",
            format!("password must be at most {MAX_PASSWORD_LEN} bytes"),
        ));
    }
    Ok(())
}

/// Reads the signing secret, creating a random one (mode 0600) at first start.
fn load_or_create_secret(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Write;
    match std::fs::read(path) {
        Ok(bytes) if bytes.len() >= 32 => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "JWT secret is readable by others; fixing to 0600");
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                }
            }
            return Ok(bytes);
        }
        Ok(_) => anyhow::bail!(
            "{} is too short to be a signing secret (delete it to generate a new one)",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut secret = vec![0u8; 64];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
    file.write_all(&secret)?;
    file.sync_all()?;
    tracing::info!(path = %path.display(), "generated a new JWT signing secret");
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn username_rules() {
        for ok in ["abc", "a_b-c", "A1234567890123456789"] {
            assert!(validate_username(ok).is_ok(), "{ok}");
        }
        for bad in ["ab", "a b", "é名字字", "a/b", "A12345678901234567890", ""] {
            assert!(validate_username(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn email_rules() {
        for ok in ["a@b.co", "first.last+tag@sub.example.org", " x@y.io "] {
            assert!(validate_email(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "a", "a@b", "@b.co", "a@.co", "a@b..co", "a b@c.io", "a@-b.io",
        ] {
            assert!(validate_email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn password_rules() {
        assert!(validate_password("1234567").is_err());
        assert!(validate_password("12345678").is_ok());
        assert!(validate_password(&"x".repeat(2000)).is_err());
    }

    #[test]
    fn secret_file_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt_secret");
        let a = load_or_create_secret(&path).unwrap();
        let b = load_or_create_secret(&path).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }
}
