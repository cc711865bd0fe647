//! Accounts and credentials: argon2id passwords, JWT access tokens, rotating refresh tokens,
//! API keys and login throttling. Nothing here knows about HTTP.

mod throttle;

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::config::Config;
use crate::error::{Error, Kind, Result};
use crate::store::{ApiKey, RefreshToken, Role, Store, StoreError, User, new_id};

pub use throttle::Throttle;

/// Prefix of API key secrets; a bearer token with it is an API key, not a JWT.
pub const API_KEY_PREFIX: &str = "ft-";
/// Passwords longer than this are refused (bounds the hashing work a request can cause).
const MAX_PASSWORD_LEN: usize = 1024;
/// A rotated refresh token presented again within this many seconds is treated as a benign
/// race (two tabs refreshing at once); later, as theft: the whole family is revoked.
const REUSE_GRACE_SECS: i64 = 30;

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
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.user.role == Role::Admin
    }
}

pub struct Auth {
    store: Store,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    access_ttl: u64,
    refresh_ttl: u64,
    remember_ttl: u64,
    max_failures: u32,
    max_failures_per_ip: u32,
    throttle: Throttle,
}

impl Auth {
    /// Sets up authentication, loading (or creating, mode 0600) the signing secret.
    pub fn new(store: Store, config: &Config) -> anyhow::Result<Arc<Auth>> {
        let secret = if config.jwt_secret.is_empty() {
            load_or_create_secret(&config.jwt_secret_path())?
        } else {
            config.jwt_secret.as_bytes().to_vec()
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Arc::new(Auth {
            store,
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            validation,
            access_ttl: config.access_token_ttl_secs,
            refresh_ttl: config.refresh_token_ttl_secs,
            remember_ttl: config.remember_me_ttl_secs,
            max_failures: config.login_max_failures,
            max_failures_per_ip: config.login_max_failures_per_ip,
            throttle: Throttle::new(Duration::from_secs(config.login_window_secs)),
        }))
    }

    // ---- accounts ----------------------------------------------------------------------

    /// Registers an account. `role: None` makes the first account ever admin.
    pub async fn register(
        &self,
        username: &str,
        email: &str,
        password: &str,
        role: Option<Role>,
    ) -> Result<User> {
        validate_username(username)?;
        let email = validate_email(email)?;
        validate_password(password)?;
        // Fail fast on a taken name before spending a hash on it; the store re-checks
        // atomically.
        if self.store.user_by_login(username)?.is_some() {
            return Err(taken("username"));
        }
        if self.store.user_by_login(&email)?.is_some() {
            return Err(taken("email"));
        }
        let hash = hash_password(password.to_string()).await?;
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

    /// Checks credentials (with throttling per account and per client address) and opens a
    /// session.
    pub async fn login(
        &self,
        login: &str,
        password: &str,
        remember: bool,
        client: &str,
    ) -> Result<Session> {
        let account_key = format!("user:{}", login.trim().to_lowercase());
        let ip_key = format!("ip:{client}");
        if let Some(wait) = self
            .throttle
            .locked(&account_key)
            .max(self.throttle.locked(&ip_key))
        {
            return Err(Error::throttled(wait));
        }
        let user = self.store.user_by_login(login)?;
        let hash = match &user {
            Some(u) => u.password_hash.clone(),
            // Same work for an unknown account, so timing does not tell which names exist.
            None => dummy_hash().to_string(),
        };
        let ok = verify_password(password.to_string(), hash).await?;
        let user = match (user, ok) {
            (Some(user), true) => user,
            _ => {
                let locked_account = self.throttle.fail(&account_key, self.max_failures);
                let locked_ip = self.throttle.fail(&ip_key, self.max_failures_per_ip);
                if locked_account || locked_ip {
                    tracing::warn!(login = %login, client = %client, "login throttled");
                }
                return Err(Error::new(
                    Kind::Unauthenticated,
                    "invalid_credentials",
                    "invalid username/email or password",
                ));
            }
        };
        if user.disabled {
            return Err(Error::new(
                Kind::Unauthenticated,
                "account_disabled",
                "this account is disabled",
            ));
        }
        self.throttle.clear(&account_key);
        self.open_session(user, remember, new_id()).await
    }

    async fn open_session(&self, user: User, remember: bool, family: String) -> Result<Session> {
        let access_token = self.access_token(&user)?;
        let ttl = if remember {
            self.remember_ttl
        } else {
            self.refresh_ttl
        };
        let refresh_token = random_secret();
        let record = RefreshToken {
            user_id: user.user_id.clone(),
            family,
            expires_at: now() + ttl as i64,
            remember,
            rotated_at: None,
        };
        self.store
            .put_refresh_token(&sha256(&refresh_token), &record)
            .await?;
        Ok(Session {
            user,
            access_token,
            expires_in: self.access_ttl,
            refresh_token,
            refresh_expires_in: ttl,
        })
    }

    fn access_token(&self, user: &User) -> Result<String> {
        let iat = now();
        let claims = Claims {
            sub: user.user_id.clone(),
            role: user.role,
            iat,
            exp: iat + self.access_ttl as i64,
            typ: "access".into(),
            ver: user.token_version,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| Error::internal(format!("signing a token: {e}")))
    }

    /// Exchanges a refresh token for a new access token and a new refresh token (the old
    /// one stops working). Reuse of an old token revokes every token of its login.
    pub async fn refresh(&self, refresh_token: &str) -> Result<Session> {
        let invalid = || Error::unauthenticated("invalid or expired refresh token");
        let hash = sha256(refresh_token);
        let record = self.store.refresh_token(&hash)?.ok_or_else(invalid)?;
        let now = now();
        if record.expires_at <= now {
            self.store.remove_refresh_token(&hash).await?;
            return Err(invalid());
        }
        if let Some(rotated) = record.rotated_at {
            if now - rotated > REUSE_GRACE_SECS {
                let n = self
                    .store
                    .revoke_refresh_where(|t| t.family == record.family)?;
                self.store.flush().await?;
                tracing::warn!(user_id = %record.user_id, revoked = n, "refresh token reuse: session revoked");
            }
            return Err(invalid());
        }
        let user = self.active_user(&record.user_id)?;
        let rotated = RefreshToken {
            rotated_at: Some(now),
            ..record.clone()
        };
        if !self
            .store
            .swap_refresh_token(&hash, &record, &rotated)
            .await?
        {
            return Err(invalid());
        }
        self.open_session(user, record.remember, record.family)
            .await
    }

    /// Ends the session the refresh token belongs to (every token rotated from its login).
    pub async fn logout(&self, user_id: &str, refresh_token: Option<&str>) -> Result<()> {
        let Some(token) = refresh_token else {
            return Ok(());
        };
        if let Some(record) = self.store.refresh_token(&sha256(token))?
            && record.user_id == user_id
        {
            self.store
                .revoke_refresh_where(|t| t.family == record.family)?;
            self.store.flush().await?;
        }
        Ok(())
    }

    /// Removes expired refresh tokens; returns how many.
    pub fn sweep_expired(&self) -> Result<usize> {
        let now = now();
        Ok(self.store.revoke_refresh_where(|t| t.expires_at <= now)?)
    }

    /// Who a bearer token (JWT access token or API key) belongs to.
    pub fn authenticate(&self, bearer: &str) -> Result<Principal> {
        let invalid = || Error::unauthenticated("invalid or expired token");
        if bearer.starts_with(API_KEY_PREFIX) {
            let key = self
                .store
                .api_key_by_hash(&sha256(bearer))?
                .ok_or_else(invalid)?;
            let user = self.active_user(&key.owner)?;
            return Ok(Principal {
                user,
                api_key_id: Some(key.key_id),
            });
        }
        let data = jsonwebtoken::decode::<Claims>(bearer, &self.decoding, &self.validation)
            .map_err(|_| invalid())?;
        if data.claims.typ != "access" {
            return Err(invalid());
        }
        let user = self.active_user(&data.claims.sub)?;
        if data.claims.ver != user.token_version {
            return Err(invalid());
        }
        Ok(Principal {
            user,
            api_key_id: None,
        })
    }

    /// Gives `user` a new password (validated, hashed) and ends their sessions: refresh
    /// tokens are revoked and access tokens issued before now are refused. Saves the record.
    pub async fn set_password(&self, mut user: User, new: &str) -> Result<User> {
        validate_password(new)?;
        user.password_hash = hash_password(new.to_string()).await?;
        user.token_version += 1;
        user.updated_at = OffsetDateTime::now_utc();
        self.store.update_user(&user).await?;
        let uid = user.user_id.clone();
        self.store.revoke_refresh_where(|t| t.user_id == uid)?;
        self.store.flush().await?;
        Ok(user)
    }

    /// Changes a signed-in user's password after checking the current one (throttled like a
    /// login). Every other session ends: refresh tokens are revoked and access tokens issued
    /// before now are refused. Returns a fresh session for the caller.
    pub async fn change_password(
        &self,
        user: &User,
        current: &str,
        new: &str,
        client: &str,
    ) -> Result<Session> {
        let account_key = format!("user:{}", user.username.to_lowercase());
        if let Some(wait) = self.throttle.locked(&account_key) {
            return Err(Error::throttled(wait));
        }
        if !verify_password(current.to_string(), user.password_hash.clone()).await? {
            self.throttle.fail(&account_key, self.max_failures);
            tracing::warn!(user_id = %user.user_id, client = %client, "password change: wrong current password");
            return Err(Error::new(
                Kind::Invalid,
                "wrong_password",
                "the current password is not correct",
            ));
        }
        validate_password(new)?;
        if new == current {
            return Err(Error::new(
                Kind::Invalid,
                "same_password",
                "the new password must differ from the current one",
            ));
        }
        // Re-read: the record may have changed (role, disabled) since the request began.
        let fresh = self
            .set_password(self.active_user(&user.user_id)?, new)
            .await?;
        tracing::info!(user_id = %fresh.user_id, client = %client, "password changed; other sessions ended");
        self.open_session(fresh, false, new_id()).await
    }

    /// The user, if they still exist and are not disabled. Checked on every request, so
    /// disabling or deleting an account ends its tokens at once.
    fn active_user(&self, user_id: &str) -> Result<User> {
        match self.store.user(user_id)? {
            Some(u) if !u.disabled => Ok(u),
            Some(_) => Err(Error::new(
                Kind::Unauthenticated,
                "account_disabled",
                "this account is disabled",
            )),
            None => Err(Error::unauthenticated("invalid or expired token")),
        }
    }

    // ---- API keys ----------------------------------------------------------------------

    /// Creates an API key; returns the record and the secret, which is never shown again.
    pub async fn create_api_key(&self, owner: &str, name: &str) -> Result<(ApiKey, String)> {
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 64 {
            return Err(Error::invalid("name must be 1 to 64 characters"));
        }
        let secret = format!("{API_KEY_PREFIX}{}", random_secret());
        let hash = sha256(&secret);
        let key = ApiKey {
            key_id: new_id(),
            owner: owner.to_string(),
            name: name.to_string(),
            prefix: secret.chars().take(10).collect(),
            secret_hash: hash.to_vec(),
            created_at: OffsetDateTime::now_utc(),
        };
        self.store.create_api_key(&key, &hash).await?;
        Ok((key, secret))
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

/// argon2id (the crate's defaults: m=19 MiB, t=2, p=1), on the blocking pool.
pub async fn hash_password(password: String) -> Result<String> {
    tokio::task::spawn_blocking(move || hash_password_blocking(&password)).await?
}

fn hash_password_blocking(password: &str) -> Result<String> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::internal(format!("hashing a password: {e}")))
}

async fn verify_password(password: String, hash: String) -> Result<bool> {
    tokio::task::spawn_blocking(move || {
        let Ok(parsed) = PasswordHash::new(&hash) else {
            return false;
        };
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
    .await
    .map_err(Error::from)
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        hash_password_blocking(&random_secret()).unwrap_or_else(|_| String::from("$argon2id$"))
    })
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
    fn hashes_are_argon2id_and_verify() {
        let h = hash_password_blocking("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        let parsed = PasswordHash::new(&h).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .is_ok()
        );
        assert!(
            Argon2::default()
                .verify_password(b"wrong horse", &parsed)
                .is_err()
        );
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
