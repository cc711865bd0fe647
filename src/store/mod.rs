//! The embedded store: sled trees of JSON records behind a typed API.
//!
//! Key layout
//! - `users`: `user_id` → [`User`]; unique indexes `users_by_name` (lower-case username → id)
//!   and `users_by_email` (lower-case email → id), kept consistent in one transaction.
//! - owned collections ([`Owned`]): `owner_id \0 object_id` → record, so one owner's objects
//!   are a prefix scan, plus `<tree>.ids`: `object_id` → `owner_id` for lookups by id alone.
//! - `refresh_tokens`: SHA-256 of the token → [`RefreshToken`].
//! - `api_key_hashes`: SHA-256 of the key → `owner_id \0 key_id`.
//! - `meta`: schema version and one-off flags.
//!
//! Every write method flushes before it returns, so a write that was answered with 2xx
//! survives `kill -9` right after.

mod records;

use std::marker::PhantomData;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

pub use records::*;

/// The schema version this build writes. Older stores are migrated at open.
pub const SCHEMA_VERSION: u64 = 1;

const META_SCHEMA: &[u8] = b"schema_version";
const META_FIRST_USER: &[u8] = b"first_user_created";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique field is taken: the name of the field.
    #[error("{0} already exists")]
    Conflict(&'static str),
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store record could not be decoded: {0}")]
    Codec(#[from] serde_json::Error),
    #[error("store: {0}")]
    Other(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        }
    }
}

/// A time-ordered, opaque id (UUID v7 without dashes): lexical order is creation order.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(value)?)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    Ok(serde_json::from_slice(bytes)?)
}

fn owned_key(owner: &str, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(owner.len() + 1 + id.len());
    key.extend_from_slice(owner.as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

fn owner_prefix(owner: &str) -> Vec<u8> {
    let mut key = owner.as_bytes().to_vec();
    key.push(0);
    key
}

/// A record that belongs to one user.
pub trait OwnedRecord: Serialize + DeserializeOwned {
    fn id(&self) -> &str;
    fn owner(&self) -> &str;
}

/// A typed collection of owned records (see the module docs for its key layout).
pub struct Owned<T> {
    db: sled::Db,
    tree: sled::Tree,
    ids: sled::Tree,
    _record: PhantomData<fn() -> T>,
}

impl<T: OwnedRecord> Owned<T> {
    fn open(db: &sled::Db, name: &str) -> Result<Self> {
        Ok(Owned {
            db: db.clone(),
            tree: db.open_tree(name)?,
            ids: db.open_tree(format!("{name}.ids"))?,
            _record: PhantomData,
        })
    }

    /// The owner's object, or `None` when it does not exist or belongs to someone else.
    pub fn get(&self, owner: &str, id: &str) -> Result<Option<T>> {
        self.tree
            .get(owned_key(owner, id))?
            .map(|v| decode(&v))
            .transpose()
    }

    /// The object with this id, whoever owns it (admin views, internal lookups).
    pub fn get_any(&self, id: &str) -> Result<Option<T>> {
        match self.ids.get(id.as_bytes())? {
            Some(owner) => self.get(&String::from_utf8_lossy(&owner), id),
            None => Ok(None),
        }
    }

    /// One owner's objects, newest first.
    pub fn list(&self, owner: &str) -> Result<Vec<T>> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(owner_prefix(owner)).rev() {
            let (_, v) = item?;
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    /// Every object of every owner, in key order.
    pub fn list_all(&self) -> Result<Vec<T>> {
        self.tree.iter().values().map(|v| decode(&v?)).collect()
    }

    pub fn count(&self) -> usize {
        self.tree.len()
    }

    /// Inserts or replaces the record, durably.
    pub async fn put(&self, record: &T) -> Result<()> {
        let key = owned_key(record.owner(), record.id());
        let value = encode(record)?;
        (&self.tree, &self.ids).transaction(|(tree, ids)| {
            tree.insert(key.as_slice(), value.as_slice())?;
            ids.insert(record.id().as_bytes(), record.owner().as_bytes())?;
            Ok::<_, ConflictableTransactionError<StoreError>>(())
        })?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Removes the owner's record, durably; `None` when there was none.
    pub async fn remove(&self, owner: &str, id: &str) -> Result<Option<T>> {
        let key = owned_key(owner, id);
        let old = (&self.tree, &self.ids).transaction(|(tree, ids)| {
            let old = tree.remove(key.as_slice())?;
            if old.is_some() {
                ids.remove(id.as_bytes())?;
            }
            Ok::<_, ConflictableTransactionError<StoreError>>(old)
        })?;
        self.db.flush_async().await?;
        old.map(|v| decode(&v)).transpose()
    }
}

/// The store. Cheap to clone (sled handles are reference counted).
#[derive(Clone)]
pub struct Store {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    meta: sled::Tree,
    users: sled::Tree,
    users_by_name: sled::Tree,
    users_by_email: sled::Tree,
    refresh_tokens: sled::Tree,
    api_key_hashes: sled::Tree,
    api_keys: Owned<ApiKey>,
    datasets: Owned<Dataset>,
    tasks: Owned<Task>,
    models: Owned<ModelRecord>,
    chat_sessions: Owned<ChatSession>,
    task_metrics: sled::Tree,
}

/// A migration from version `N` (its index + 1... see [`MIGRATIONS`]) to the next.
type Migration = fn(&sled::Db) -> Result<()>;

/// `MIGRATIONS[i]` upgrades a store at version `i + 1` to `i + 2`. Records are self-describing
/// JSON with `#[serde(default)]` for added fields, so most changes need no entry here.
const MIGRATIONS: &[Migration] = &[];

impl Store {
    /// Opens (or creates) the store in `dir`, migrating an older schema.
    pub fn open(dir: &Path) -> Result<Store> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    StoreError::Other(format!(
                        "the store at {} is in use by another ferrotune process",
                        dir.display()
                    ))
                }
                other => StoreError::Sled(other),
            })?;
        let meta = db.open_tree("meta")?;
        migrate(&db, &meta)?;
        let inner = Inner {
            meta,
            users: db.open_tree("users")?,
            users_by_name: db.open_tree("users_by_name")?,
            users_by_email: db.open_tree("users_by_email")?,
            refresh_tokens: db.open_tree("refresh_tokens")?,
            api_key_hashes: db.open_tree("api_key_hashes")?,
            api_keys: Owned::open(&db, "api_keys")?,
            datasets: Owned::open(&db, "datasets")?,
            tasks: Owned::open(&db, "tasks")?,
            models: Owned::open(&db, "models")?,
            chat_sessions: Owned::open(&db, "chat_sessions")?,
            task_metrics: db.open_tree("task_metrics")?,
            db,
        };
        Ok(Store {
            inner: std::sync::Arc::new(inner),
        })
    }

    pub fn schema_version(&self) -> Result<u64> {
        read_version(&self.inner.meta)
    }

    pub fn datasets(&self) -> &Owned<Dataset> {
        &self.inner.datasets
    }

    pub fn tasks(&self) -> &Owned<Task> {
        &self.inner.tasks
    }

    pub fn models(&self) -> &Owned<ModelRecord> {
        &self.inner.models
    }

    pub fn chat_sessions(&self) -> &Owned<ChatSession> {
        &self.inner.chat_sessions
    }

    /// Appends a loss-curve point (not flushed: points are cheap to lose, the task is not).
    pub fn add_metric(&self, task_id: &str, point: &MetricPoint) -> Result<()> {
        let mut key = owner_prefix(task_id);
        key.extend_from_slice(&point.step.to_be_bytes());
        self.inner.task_metrics.insert(key, encode(point)?)?;
        Ok(())
    }

    /// A task's loss-curve points, by step.
    pub fn metrics(&self, task_id: &str) -> Result<Vec<MetricPoint>> {
        self.inner
            .task_metrics
            .scan_prefix(owner_prefix(task_id))
            .values()
            .map(|v| decode(&v?))
            .collect()
    }

    pub fn remove_metrics(&self, task_id: &str) -> Result<()> {
        for key in self
            .inner
            .task_metrics
            .scan_prefix(owner_prefix(task_id))
            .keys()
        {
            self.inner.task_metrics.remove(key?)?;
        }
        Ok(())
    }

    pub fn api_keys_of(&self) -> &Owned<ApiKey> {
        &self.inner.api_keys
    }

    pub async fn flush(&self) -> Result<()> {
        self.inner.db.flush_async().await?;
        Ok(())
    }

    // ---- users -------------------------------------------------------------------------

    /// Creates a user, keeping username and email unique (case-insensitively). With
    /// `role: None` the very first account ever created becomes admin, every later one a user.
    pub async fn create_user(&self, user: User, role: Option<Role>) -> Result<User> {
        let i = &self.inner;
        let name_key = user.username.to_lowercase();
        let email_key = user.email.to_lowercase();
        let user = (&i.users, &i.users_by_name, &i.users_by_email, &i.meta).transaction(
            |(users, by_name, by_email, meta)| {
                if by_name.get(name_key.as_bytes())?.is_some() {
                    return Err(ConflictableTransactionError::Abort(StoreError::Conflict(
                        "username",
                    )));
                }
                if by_email.get(email_key.as_bytes())?.is_some() {
                    return Err(ConflictableTransactionError::Abort(StoreError::Conflict(
                        "email",
                    )));
                }
                let first = meta.get(META_FIRST_USER)?.is_none();
                let mut user = user.clone();
                user.role = role.unwrap_or(if first { Role::Admin } else { Role::User });
                if first {
                    meta.insert(META_FIRST_USER, b"1".as_slice())?;
                }
                let value = encode(&user).map_err(ConflictableTransactionError::Abort)?;
                users.insert(user.user_id.as_bytes(), value)?;
                by_name.insert(name_key.as_bytes(), user.user_id.as_bytes())?;
                by_email.insert(email_key.as_bytes(), user.user_id.as_bytes())?;
                Ok(user)
            },
        )?;
        self.flush().await?;
        Ok(user)
    }

    pub fn user(&self, user_id: &str) -> Result<Option<User>> {
        self.inner
            .users
            .get(user_id.as_bytes())?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Looks a user up by username or email, case-insensitively.
    pub fn user_by_login(&self, username_or_email: &str) -> Result<Option<User>> {
        let key = username_or_email.trim().to_lowercase();
        let id = match self.inner.users_by_name.get(key.as_bytes())? {
            Some(id) => Some(id),
            None => self.inner.users_by_email.get(key.as_bytes())?,
        };
        match id {
            Some(id) => self.user(&String::from_utf8_lossy(&id)),
            None => Ok(None),
        }
    }

    /// Every user, oldest first.
    pub fn users(&self) -> Result<Vec<User>> {
        self.inner
            .users
            .iter()
            .values()
            .map(|v| decode(&v?))
            .collect()
    }

    pub fn user_count(&self) -> usize {
        self.inner.users.len()
    }

    /// Replaces a user's record. Username and email are immutable here (their indexes are not
    /// touched), so only role, disabled and similar fields may change.
    pub async fn update_user(&self, user: &User) -> Result<()> {
        let value = encode(user)?;
        self.inner.users.insert(user.user_id.as_bytes(), value)?;
        self.flush().await
    }

    /// Removes a user, their indexes, refresh tokens, API keys and dataset records. The
    /// caller removes the user's files.
    pub async fn delete_user(&self, user_id: &str) -> Result<Option<User>> {
        let i = &self.inner;
        let Some(user) = self.user(user_id)? else {
            return Ok(None);
        };
        (&i.users, &i.users_by_name, &i.users_by_email).transaction(
            |(users, by_name, by_email)| {
                users.remove(user.user_id.as_bytes())?;
                by_name.remove(user.username.to_lowercase().as_bytes())?;
                by_email.remove(user.email.to_lowercase().as_bytes())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            },
        )?;
        for key in self.api_keys_of().list(user_id)? {
            self.delete_api_key(user_id, &key.key_id).await?;
        }
        for ds in self.datasets().list(user_id)? {
            self.datasets().remove(user_id, &ds.file_id).await?;
        }
        for s in self.chat_sessions().list(user_id)? {
            self.chat_sessions().remove(user_id, &s.session_id).await?;
        }
        self.revoke_refresh_where(|t| t.user_id == user_id)?;
        self.flush().await?;
        Ok(Some(user))
    }

    // ---- refresh tokens ----------------------------------------------------------------

    pub async fn put_refresh_token(&self, hash: &[u8], token: &RefreshToken) -> Result<()> {
        self.inner.refresh_tokens.insert(hash, encode(token)?)?;
        self.flush().await
    }

    pub fn refresh_token(&self, hash: &[u8]) -> Result<Option<RefreshToken>> {
        self.inner
            .refresh_tokens
            .get(hash)?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Atomically replaces `old` with `new` (compare-and-swap), so one refresh token is
    /// rotated once even under concurrent requests. Returns false when it changed meanwhile.
    pub async fn swap_refresh_token(
        &self,
        hash: &[u8],
        old: &RefreshToken,
        new: &RefreshToken,
    ) -> Result<bool> {
        let swapped = self
            .inner
            .refresh_tokens
            .compare_and_swap(hash, Some(encode(old)?), Some(encode(new)?))?
            .is_ok();
        self.flush().await?;
        Ok(swapped)
    }

    pub async fn remove_refresh_token(&self, hash: &[u8]) -> Result<()> {
        self.inner.refresh_tokens.remove(hash)?;
        self.flush().await
    }

    /// Removes every refresh token matching `pred`; returns how many. Not flushed: callers
    /// flush (or it is a best-effort sweep).
    pub fn revoke_refresh_where(&self, pred: impl Fn(&RefreshToken) -> bool) -> Result<usize> {
        let mut n = 0;
        for item in self.inner.refresh_tokens.iter() {
            let (k, v) = item?;
            let Ok(token) = decode::<RefreshToken>(&v) else {
                self.inner.refresh_tokens.remove(k)?;
                continue;
            };
            if pred(&token) {
                self.inner.refresh_tokens.remove(k)?;
                n += 1;
            }
        }
        Ok(n)
    }

    // ---- API keys ----------------------------------------------------------------------

    pub async fn create_api_key(&self, key: &ApiKey, hash: &[u8]) -> Result<()> {
        let i = &self.inner;
        let record = encode(key)?;
        let key_path = owned_key(&key.owner, &key.key_id);
        (&i.api_keys.tree, &i.api_keys.ids, &i.api_key_hashes).transaction(
            |(tree, ids, hashes)| {
                tree.insert(key_path.as_slice(), record.as_slice())?;
                ids.insert(key.key_id.as_bytes(), key.owner.as_bytes())?;
                hashes.insert(hash, key_path.as_slice())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            },
        )?;
        self.flush().await
    }

    /// The API key whose secret hashes to `hash`.
    pub fn api_key_by_hash(&self, hash: &[u8]) -> Result<Option<ApiKey>> {
        let Some(path) = self.inner.api_key_hashes.get(hash)? else {
            return Ok(None);
        };
        self.inner
            .api_keys
            .tree
            .get(path)?
            .map(|v| decode(&v))
            .transpose()
    }

    pub async fn delete_api_key(&self, owner: &str, key_id: &str) -> Result<Option<ApiKey>> {
        let i = &self.inner;
        let key_path = owned_key(owner, key_id);
        let Some(key) = i.api_keys.get(owner, key_id)? else {
            return Ok(None);
        };
        (&i.api_keys.tree, &i.api_keys.ids, &i.api_key_hashes).transaction(
            |(tree, ids, hashes)| {
                tree.remove(key_path.as_slice())?;
                ids.remove(key_id.as_bytes())?;
                hashes.remove(key.secret_hash.as_slice())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            },
        )?;
        self.flush().await?;
        Ok(Some(key))
    }
}

fn read_version(meta: &sled::Tree) -> Result<u64> {
    match meta.get(META_SCHEMA)? {
        None => Ok(0),
        Some(v) => {
            let bytes: [u8; 8] = v
                .as_ref()
                .try_into()
                .map_err(|_| StoreError::Other("corrupt schema version".into()))?;
            Ok(u64::from_be_bytes(bytes))
        }
    }
}

fn migrate(db: &sled::Db, meta: &sled::Tree) -> Result<()> {
    let mut version = read_version(meta)?;
    if version == 0 {
        // A new store starts at the current version.
        meta.insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
        db.flush()?;
        return Ok(());
    }
    if version > SCHEMA_VERSION {
        return Err(StoreError::Other(format!(
            "the store has schema version {version}, newer than this build's {SCHEMA_VERSION}; \
             use a newer ferrotune"
        )));
    }
    while version < SCHEMA_VERSION {
        let step = MIGRATIONS
            .get((version - 1) as usize)
            .ok_or_else(|| StoreError::Other(format!("no migration from version {version}")))?;
        step(db)?;
        version += 1;
        meta.insert(META_SCHEMA, &version.to_be_bytes())?;
        db.flush()?;
        tracing::info!(version, "store migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, email: &str) -> User {
        User::new(name.into(), email.into(), "hash".into())
    }

    #[tokio::test]
    async fn unique_indexes_and_first_admin() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store
            .create_user(user("Alice", "a@x.io"), None)
            .await
            .unwrap();
        assert_eq!(a.role, Role::Admin);
        let b = store
            .create_user(user("bob", "b@x.io"), None)
            .await
            .unwrap();
        assert_eq!(b.role, Role::User);
        assert!(matches!(
            store.create_user(user("ALICE", "c@x.io"), None).await,
            Err(StoreError::Conflict("username"))
        ));
        assert!(matches!(
            store.create_user(user("carol", "B@X.io"), None).await,
            Err(StoreError::Conflict("email"))
        ));
        assert_eq!(store.user_count(), 2);
        assert_eq!(
            store.user_by_login("alice").unwrap().unwrap().user_id,
            a.user_id
        );
        assert_eq!(
            store.user_by_login("A@X.IO").unwrap().unwrap().user_id,
            a.user_id
        );
        // Deleting every user does not make the next one admin again.
        store.delete_user(&a.user_id).await.unwrap();
        store.delete_user(&b.user_id).await.unwrap();
        let c = store
            .create_user(user("alice", "a@x.io"), None)
            .await
            .unwrap();
        assert_eq!(
            c.role,
            Role::User,
            "name and email are free again, admin is not"
        );
    }

    #[tokio::test]
    async fn owned_records_are_scoped_by_owner() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut d1 = Dataset::example("u1");
        d1.file_id = new_id();
        let mut d2 = Dataset::example("u2");
        d2.file_id = new_id();
        let mut d3 = Dataset::example("u1");
        d3.file_id = new_id();
        for d in [&d1, &d2, &d3] {
            store.datasets().put(d).await.unwrap();
        }
        let mine: Vec<_> = store.datasets().list("u1").unwrap();
        assert_eq!(mine.len(), 2);
        assert_eq!(mine[0].file_id, d3.file_id, "newest first");
        assert!(store.datasets().get("u2", &d1.file_id).unwrap().is_none());
        assert_eq!(
            store
                .datasets()
                .get_any(&d1.file_id)
                .unwrap()
                .unwrap()
                .owner,
            "u1"
        );
        assert!(
            store
                .datasets()
                .remove("u2", &d1.file_id)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .datasets()
                .remove("u1", &d1.file_id)
                .await
                .unwrap()
                .is_some()
        );
        assert!(store.datasets().get_any(&d1.file_id).unwrap().is_none());
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
            store
                .inner
                .meta
                .insert(META_SCHEMA, &(SCHEMA_VERSION + 1).to_be_bytes())
                .unwrap();
            store.inner.db.flush().unwrap();
        }
        let err = Store::open(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap();
        assert!(err.contains("newer"), "{err}");
    }
}
