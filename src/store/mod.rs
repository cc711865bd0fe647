//! The embedded store: sled trees of JSON records behind a typed, async API.
//!
//! Key layout
//! - `users`: `user_id` → [`User`]; unique indexes `users_by_name` (lower-case username → id)
//!   and `users_by_email` (lower-case email → id), kept consistent in one transaction.
//! - owned collections ([`Owned`]): `owner_id \0 object_id` → record, so one owner's objects
//!   are a prefix scan, plus `<tree>.ids`: `object_id` → `owner_id` for lookups by id alone.
//! - `refresh_tokens`: SHA-256 of the token → [`RefreshToken`].
//! - `sessions`: session id (a refresh-token family) → [`SessionRecord`]; an access token
//!   names its session, and stops working once the session is gone.
//! - `api_key_hashes`: SHA-256 of the key → `owner_id \0 key_id`.
//! - `audit`: record id (UUID v7: time order) → [`AuditRecord`]; append-only.
//! - `meta`: schema version and one-off flags.
//!
//! Threads. sled's calls block (its transactions wait on a global lock, its reads may wait
//! on I/O), so none of them runs on the async runtime: every method hands its work to
//! tokio's blocking pool. Durability is one [`Flusher`] thread: a write returns only after a
//! flush that began after it, and every writer waiting at that moment shares that one flush.
//! sled 0.34's `flush_async` deadlocks when called concurrently (upstream issue 1308), so it
//! is never used; sled's synchronous `flush` is only ever called by that one thread.
//!
//! Every write method is durable when it returns, so a write answered with 2xx survives
//! `kill -9` right after.

mod records;

use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::oneshot;

pub use records::*;

/// The schema version this build writes. Older stores are migrated at open.
pub const SCHEMA_VERSION: u64 = 1;

const META_SCHEMA: &[u8] = b"schema_version";
const IN_USE: &str = "is in use by another ferrotune process";
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

impl StoreError {
    /// True when another process (a running server) holds the store.
    pub fn is_in_use(&self) -> bool {
        matches!(self, StoreError::Other(m) if m.contains(IN_USE))
    }

    /// True when the store could not write because the disk (or the user's quota) is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Sled(sled::Error::Io(e)) => crate::error::io_is_disk_full(e),
            StoreError::Other(m) => m.contains("No space left on device"),
            _ => false,
        }
    }
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

/// One tree's (key, value) pairs in key order.
pub type TreeEntries = Vec<(Vec<u8>, Vec<u8>)>;

/// Every tree of a store at one point in time ([`Store::snapshot`]): tree name → its
/// (key, value) pairs in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub trees: std::collections::BTreeMap<String, TreeEntries>,
}

impl Snapshot {
    /// Records per tree.
    pub fn counts(&self) -> std::collections::BTreeMap<String, usize> {
        self.trees
            .iter()
            .map(|(n, e)| (n.clone(), e.len()))
            .collect()
    }
}

/// A time-ordered, opaque id (UUID v7 without dashes): lexical order is creation order.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// Which audit entries to list ([`Store::list_audit`]). Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub actor_id: Option<String>,
    /// An action, or a prefix ending in `.` (`dataset.` matches every dataset action).
    pub action: Option<String>,
    pub target_id: Option<String>,
    pub outcome: Option<String>,
    pub request_id: Option<String>,
    pub since: Option<time::OffsetDateTime>,
    pub until: Option<time::OffsetDateTime>,
    /// Only entries older than this id (paging: the last id of the previous page).
    pub before: Option<String>,
    pub limit: usize,
}

impl AuditQuery {
    fn matches(&self, r: &AuditRecord) -> bool {
        let eq = |want: &Option<String>, got: Option<&str>| {
            want.as_deref().is_none_or(|w| got == Some(w))
        };
        let action_ok = self.action.as_deref().is_none_or(|a| {
            if a.ends_with('.') {
                r.action.starts_with(a)
            } else {
                r.action == a
            }
        });
        action_ok
            && eq(&self.actor_id, r.actor_id.as_deref())
            && eq(&self.target_id, r.target_id.as_deref())
            && eq(&self.outcome, Some(&r.outcome))
            && eq(&self.request_id, r.request_id.as_deref())
            && self.until.is_none_or(|u| r.at <= u)
    }
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

/// Runs `f` on tokio's blocking pool: sled may block, the async runtime's threads must not.
async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) => Err(StoreError::Other(format!("store task failed: {e}"))),
    }
}

/// The store's write gate: every write takes it shared around its sled calls, a snapshot
/// ([`Store::snapshot`]) takes it exclusive, so a snapshot sees no write half-done.
type Gate = Arc<std::sync::RwLock<()>>;

/// [`blocking`] for a write: the closure runs holding the write gate shared.
async fn write_blocking<T, F>(gate: &Gate, f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    let gate = gate.clone();
    blocking(move || {
        let _shared = gate.read().unwrap_or_else(|p| p.into_inner());
        f()
    })
    .await
}

// ---- durability ----------------------------------------------------------------------------

type FlushReply = oneshot::Sender<std::result::Result<(), String>>;

/// The one thread that flushes sled to disk. Writers queue a reply channel after their write;
/// the thread takes every queued writer, flushes once, and answers them all: many writes,
/// one flush, each writer answered after a flush that began after its write.
struct Flusher {
    requests: Option<std_mpsc::Sender<FlushReply>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    fn start(db: sled::Db) -> std::io::Result<Flusher> {
        let (tx, rx) = std_mpsc::channel::<FlushReply>();
        let thread = std::thread::Builder::new()
            .name("store-flush".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiting = vec![first];
                    waiting.extend(rx.try_iter());
                    let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "store flush failed");
                    }
                    for reply in waiting {
                        let _ = reply.send(result.clone());
                    }
                }
            })?;
        Ok(Flusher {
            requests: Some(tx),
            thread: Some(thread),
        })
    }

    /// Returns once everything written before the call is on disk.
    async fn durable(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .as_ref()
            .ok_or_else(|| StoreError::Other("the store is closed".into()))?
            .send(tx)
            .map_err(|_| StoreError::Other("the store's flush thread is gone".into()))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Other(format!("flushing the store: {e}"))),
            Err(_) => Err(StoreError::Other("the store's flush thread is gone".into())),
        }
    }
}

impl Drop for Flusher {
    /// Closing the queue ends the thread after its last flush; waiting for it releases its
    /// handle on the database, so the store can be opened again at once.
    fn drop(&mut self) {
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- owned collections ---------------------------------------------------------------------

/// A record that belongs to one user.
pub trait OwnedRecord: Serialize + DeserializeOwned + Send + Sync + 'static {
    fn id(&self) -> &str;
    fn owner(&self) -> &str;
}

/// A typed collection of owned records (see the module docs for its key layout).
pub struct Owned<T> {
    tree: sled::Tree,
    ids: sled::Tree,
    flusher: Arc<Flusher>,
    gate: Gate,
    _record: PhantomData<fn() -> T>,
}

impl<T: OwnedRecord> Owned<T> {
    fn open(db: &sled::Db, name: &str, flusher: Arc<Flusher>, gate: Gate) -> Result<Self> {
        Ok(Owned {
            tree: db.open_tree(name)?,
            ids: db.open_tree(format!("{name}.ids"))?,
            flusher,
            gate,
            _record: PhantomData,
        })
    }

    fn get_blocking(tree: &sled::Tree, owner: &str, id: &str) -> Result<Option<T>> {
        tree.get(owned_key(owner, id))?
            .map(|v| decode(&v))
            .transpose()
    }

    fn list_blocking(tree: &sled::Tree, owner: &str) -> Result<Vec<T>> {
        let mut out = Vec::new();
        for item in tree.scan_prefix(owner_prefix(owner)).rev() {
            let (_, v) = item?;
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    /// The owner's object, or `None` when it does not exist or belongs to someone else.
    pub async fn get(&self, owner: &str, id: &str) -> Result<Option<T>> {
        let tree = self.tree.clone();
        let (owner, id) = (owner.to_string(), id.to_string());
        blocking(move || Self::get_blocking(&tree, &owner, &id)).await
    }

    /// The object with this id, whoever owns it (admin views, internal lookups).
    pub async fn get_any(&self, id: &str) -> Result<Option<T>> {
        let (tree, ids) = (self.tree.clone(), self.ids.clone());
        let id = id.to_string();
        blocking(move || match ids.get(id.as_bytes())? {
            Some(owner) => Self::get_blocking(&tree, &String::from_utf8_lossy(&owner), &id),
            None => Ok(None),
        })
        .await
    }

    /// One owner's objects, newest first.
    pub async fn list(&self, owner: &str) -> Result<Vec<T>> {
        let tree = self.tree.clone();
        let owner = owner.to_string();
        blocking(move || Self::list_blocking(&tree, &owner)).await
    }

    /// Every object of every owner, in key order.
    pub async fn list_all(&self) -> Result<Vec<T>> {
        let tree = self.tree.clone();
        blocking(move || tree.iter().values().map(|v| decode(&v?)).collect()).await
    }

    pub fn count(&self) -> usize {
        // `len` walks the tree in memory without I/O waits on a warm tree, but it is still a
        // scan: callers use it for dashboards, not per request.
        self.tree.len()
    }

    /// Inserts or replaces the record, durably.
    pub async fn put(&self, record: &T) -> Result<()> {
        let key = owned_key(record.owner(), record.id());
        let value = encode(record)?;
        let (id, owner) = (record.id().to_string(), record.owner().to_string());
        let (tree, ids) = (self.tree.clone(), self.ids.clone());
        write_blocking(&self.gate, move || {
            (&tree, &ids).transaction(|(tree, ids)| {
                tree.insert(key.as_slice(), value.as_slice())?;
                ids.insert(id.as_bytes(), owner.as_bytes())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })?;
            Ok(())
        })
        .await?;
        self.flusher.durable().await
    }

    /// Reads the owner's record, lets `change` edit it, and stores the result atomically
    /// (compare-and-swap, retried on a concurrent change). `change` returns `false` to leave
    /// the record as it is. Returns the stored record, or `None` when there is none.
    pub async fn update<F>(&self, owner: &str, id: &str, change: F) -> Result<Option<T>>
    where
        F: FnMut(&mut T) -> bool + Send + 'static,
    {
        Ok(self
            .update_checked(owner, id, change)
            .await?
            .map(|(r, _)| r))
    }

    /// [`Owned::update`], also saying whether `change` changed the record.
    pub async fn update_checked<F>(
        &self,
        owner: &str,
        id: &str,
        change: F,
    ) -> Result<Option<(T, bool)>>
    where
        F: FnMut(&mut T) -> bool + Send + 'static,
    {
        let tree = self.tree.clone();
        let key = owned_key(owner, id);
        let mut change = change;
        let (record, changed) = write_blocking(&self.gate, move || {
            loop {
                let Some(old) = tree.get(&key)? else {
                    return Ok((None, false));
                };
                let mut record: T = decode(&old)?;
                if !change(&mut record) {
                    return Ok((Some(record), false));
                }
                let new = encode(&record)?;
                if tree.compare_and_swap(&key, Some(&old), Some(new))?.is_ok() {
                    return Ok((Some(record), true));
                }
            }
        })
        .await?;
        if changed {
            self.flusher.durable().await?;
        }
        Ok(record.map(|r| (r, changed)))
    }

    /// Removes the owner's record, durably; `None` when there was none.
    pub async fn remove(&self, owner: &str, id: &str) -> Result<Option<T>> {
        let key = owned_key(owner, id);
        let id = id.to_string();
        let (tree, ids) = (self.tree.clone(), self.ids.clone());
        let old = write_blocking(&self.gate, move || {
            Ok((&tree, &ids).transaction(|(tree, ids)| {
                let old = tree.remove(key.as_slice())?;
                if old.is_some() {
                    ids.remove(id.as_bytes())?;
                }
                Ok::<_, ConflictableTransactionError<StoreError>>(old)
            })?)
        })
        .await?;
        if old.is_some() {
            self.flusher.durable().await?;
        }
        old.map(|v| decode(&v)).transpose()
    }
}

// ---- the store -----------------------------------------------------------------------------

/// The store. Cheap to clone (sled handles are reference counted).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    gate: Gate,
    meta: sled::Tree,
    users: sled::Tree,
    users_by_name: sled::Tree,
    users_by_email: sled::Tree,
    refresh_tokens: sled::Tree,
    sessions: sled::Tree,
    api_key_hashes: sled::Tree,
    api_keys: Owned<ApiKey>,
    datasets: Owned<DatasetRecord>,
    tasks: Owned<TaskRecord>,
    models: Owned<ModelRecord>,
    chat_sessions: Owned<ChatSession>,
    task_templates: Owned<TaskTemplate>,
    exports: Owned<ExportRecord>,
    webhooks: Owned<WebhookRecord>,
    webhook_deliveries: Owned<WebhookDelivery>,
    task_metrics: sled::Tree,
    /// `id` (time-ordered) → [`AuditRecord`].
    audit: sled::Tree,
    /// `purpose:user_id` → [`MailCode`].
    mail_codes: sled::Tree,
    flusher: Arc<Flusher>,
}

/// A migration from version `N` (its index + 1... see [`MIGRATIONS`]) to the next.
type Migration = fn(&sled::Db) -> Result<()>;

/// `MIGRATIONS[i]` upgrades a store at version `i + 1` to `i + 2`. Records are self-describing
/// JSON with `#[serde(default)]` for added fields, so most changes need no entry here.
const MIGRATIONS: &[Migration] = &[];

impl Store {
    /// Opens (or creates) the store in `dir`, migrating an older schema. Blocking: call it
    /// before the server runs, or from the blocking pool.
    pub fn open(dir: &Path) -> Result<Store> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| match e {
                // sled reports its lock held by another process as an I/O error whose kind
                // is `WouldBlock` or, wrapped with the path, `Other`.
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("could not acquire lock") =>
                {
                    StoreError::Other(format!("the store at {} {IN_USE}", dir.display()))
                }
                other => StoreError::Sled(other),
            })?;
        let meta = db.open_tree("meta")?;
        migrate(&db, &meta)?;
        let gate = Gate::default();
        let flusher = Arc::new(
            Flusher::start(db.clone())
                .map_err(|e| StoreError::Other(format!("starting the flush thread: {e}")))?,
        );
        let inner = Inner {
            gate: gate.clone(),
            meta,
            users: db.open_tree("users")?,
            users_by_name: db.open_tree("users_by_name")?,
            users_by_email: db.open_tree("users_by_email")?,
            refresh_tokens: db.open_tree("refresh_tokens")?,
            sessions: db.open_tree("sessions")?,
            mail_codes: db.open_tree("mail_codes")?,
            api_key_hashes: db.open_tree("api_key_hashes")?,
            api_keys: Owned::open(&db, "api_keys", flusher.clone(), gate.clone())?,
            datasets: Owned::open(&db, "datasets", flusher.clone(), gate.clone())?,
            tasks: Owned::open(&db, "tasks", flusher.clone(), gate.clone())?,
            models: Owned::open(&db, "models", flusher.clone(), gate.clone())?,
            chat_sessions: Owned::open(&db, "chat_sessions", flusher.clone(), gate.clone())?,
            task_templates: Owned::open(&db, "task_templates", flusher.clone(), gate.clone())?,
            exports: Owned::open(&db, "exports", flusher.clone(), gate.clone())?,
            webhooks: Owned::open(&db, "webhooks", flusher.clone(), gate.clone())?,
            webhook_deliveries: Owned::open(
                &db,
                "webhook_deliveries",
                flusher.clone(),
                gate.clone(),
            )?,
            task_metrics: db.open_tree("task_metrics")?,
            audit: db.open_tree("audit")?,
            flusher,
            db,
        };
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    pub async fn schema_version(&self) -> Result<u64> {
        let meta = self.inner.meta.clone();
        blocking(move || read_version(&meta)).await
    }

    pub fn datasets(&self) -> &Owned<DatasetRecord> {
        &self.inner.datasets
    }

    pub fn tasks(&self) -> &Owned<TaskRecord> {
        &self.inner.tasks
    }

    pub fn models(&self) -> &Owned<ModelRecord> {
        &self.inner.models
    }

    pub fn chat_sessions(&self) -> &Owned<ChatSession> {
        &self.inner.chat_sessions
    }

    pub fn task_templates(&self) -> &Owned<TaskTemplate> {
        &self.inner.task_templates
    }

    pub fn exports(&self) -> &Owned<ExportRecord> {
        &self.inner.exports
    }

    pub fn webhooks(&self) -> &Owned<WebhookRecord> {
        &self.inner.webhooks
    }

    /// Deliveries, owned by their webhook's id.
    pub fn webhook_deliveries(&self) -> &Owned<WebhookDelivery> {
        &self.inner.webhook_deliveries
    }

    pub fn api_keys_of(&self) -> &Owned<ApiKey> {
        &self.inner.api_keys
    }

    // ---- backups -----------------------------------------------------------------------

    /// Every tree's records at one point in time: no write runs while it copies (it holds
    /// the write gate exclusive, which every write takes shared), so indexes and the records
    /// they point to agree, as do records written in one transaction.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let i = self.inner.clone();
        blocking(move || {
            let _exclusive = i.gate.write().unwrap_or_else(|p| p.into_inner());
            let mut trees = std::collections::BTreeMap::new();
            for name in i.db.tree_names() {
                let tree = i.db.open_tree(&name)?;
                let entries = tree
                    .iter()
                    .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                trees.insert(String::from_utf8_lossy(&name).into_owned(), entries);
            }
            Ok(Snapshot { trees })
        })
        .await
    }

    /// Writes `snapshot` as a new store in `dir` (which must hold none), durably. Blocking.
    pub fn create_from_snapshot(dir: &Path, snapshot: &Snapshot) -> Result<()> {
        if dir.exists() && std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_some()) {
            return Err(StoreError::Other(format!(
                "{} is not an empty folder",
                dir.display()
            )));
        }
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        for (name, entries) in &snapshot.trees {
            let tree = db.open_tree(name.as_bytes())?;
            let mut batch = sled::Batch::default();
            for (k, v) in entries {
                batch.insert(k.as_slice(), v.as_slice());
            }
            tree.apply_batch(batch)?;
        }
        db.flush()?;
        Ok(())
    }

    /// Returns once every write made before the call is on disk.
    pub async fn flush(&self) -> Result<()> {
        self.inner.flusher.durable().await
    }

    // ---- audit log ---------------------------------------------------------------------

    /// Appends an entry to the audit log, durably.
    pub async fn append_audit(&self, record: &AuditRecord) -> Result<()> {
        let tree = self.inner.audit.clone();
        let (key, value) = (record.id.clone(), encode(record)?);
        write_blocking(&self.inner.gate, move || {
            tree.insert(key.as_bytes(), value)?;
            Ok(())
        })
        .await?;
        self.inner.flusher.durable().await
    }

    /// Audit entries matching `query`, newest first (at most `query.limit`).
    pub async fn list_audit(&self, query: AuditQuery) -> Result<Vec<AuditRecord>> {
        let tree = self.inner.audit.clone();
        blocking(move || {
            let mut out = Vec::new();
            let iter = match &query.before {
                Some(b) => tree.range(..b.as_bytes().to_vec()),
                None => tree.range::<Vec<u8>, _>(..),
            };
            for item in iter.rev() {
                let (_, v) = item?;
                let r: AuditRecord = decode(&v)?;
                if query.since.is_some_and(|s| r.at < s) {
                    break;
                }
                if query.matches(&r) {
                    out.push(r);
                    if out.len() >= query.limit {
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// Removes the audit entries older than `cutoff` (the retention sweep); returns how many.
    pub async fn prune_audit(&self, cutoff: time::OffsetDateTime) -> Result<usize> {
        let tree = self.inner.audit.clone();
        let removed = write_blocking(&self.inner.gate, move || {
            let mut removed = 0;
            for item in tree.iter() {
                let (k, v) = item?;
                let r: AuditRecord = decode(&v)?;
                if r.at >= cutoff {
                    break;
                }
                tree.remove(k)?;
                removed += 1;
            }
            Ok(removed)
        })
        .await?;
        if removed > 0 {
            self.inner.flusher.durable().await?;
        }
        Ok(removed)
    }

    // ---- metrics -----------------------------------------------------------------------

    /// Appends a loss-curve point (not flushed: points are cheap to lose, the task is not).
    pub async fn add_metric(&self, task_id: &str, point: &MetricPoint) -> Result<()> {
        let mut key = owner_prefix(task_id);
        key.extend_from_slice(&point.step.to_be_bytes());
        let value = encode(point)?;
        let tree = self.inner.task_metrics.clone();
        write_blocking(&self.inner.gate, move || {
            tree.insert(key, value)?;
            Ok(())
        })
        .await
    }

    /// A task's loss-curve points, by step.
    pub async fn metrics(&self, task_id: &str) -> Result<Vec<MetricPoint>> {
        let tree = self.inner.task_metrics.clone();
        let prefix = owner_prefix(task_id);
        blocking(move || {
            tree.scan_prefix(prefix)
                .values()
                .map(|v| decode(&v?))
                .collect()
        })
        .await
    }

    pub async fn remove_metrics(&self, task_id: &str) -> Result<()> {
        let tree = self.inner.task_metrics.clone();
        let prefix = owner_prefix(task_id);
        write_blocking(&self.inner.gate, move || {
            for key in tree.scan_prefix(prefix).keys() {
                tree.remove(key?)?;
            }
            Ok(())
        })
        .await?;
        self.flush().await
    }

    // ---- users -------------------------------------------------------------------------

    /// Creates a user, keeping username and email unique (case-insensitively). With
    /// `role: None` the very first account ever created becomes admin, every later one a user.
    pub async fn create_user(&self, user: User, role: Option<Role>) -> Result<User> {
        let i = self.inner.clone();
        let user = write_blocking(&self.inner.gate, move || {
            let name_key = user.username.to_lowercase();
            let email_key = user.email.to_lowercase();
            Ok(
                (&i.users, &i.users_by_name, &i.users_by_email, &i.meta).transaction(
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
                )?,
            )
        })
        .await?;
        self.flush().await?;
        Ok(user)
    }

    fn user_blocking(users: &sled::Tree, user_id: &str) -> Result<Option<User>> {
        users
            .get(user_id.as_bytes())?
            .map(|v| decode(&v))
            .transpose()
    }

    pub async fn user(&self, user_id: &str) -> Result<Option<User>> {
        let users = self.inner.users.clone();
        let user_id = user_id.to_string();
        blocking(move || Self::user_blocking(&users, &user_id)).await
    }

    /// Looks a user up by username or email, case-insensitively.
    pub async fn user_by_login(&self, username_or_email: &str) -> Result<Option<User>> {
        let i = self.inner.clone();
        let key = username_or_email.trim().to_lowercase();
        blocking(move || {
            let id = match i.users_by_name.get(key.as_bytes())? {
                Some(id) => Some(id),
                None => i.users_by_email.get(key.as_bytes())?,
            };
            match id {
                Some(id) => Self::user_blocking(&i.users, &String::from_utf8_lossy(&id)),
                None => Ok(None),
            }
        })
        .await
    }

    /// Every user, oldest first.
    pub async fn users(&self) -> Result<Vec<User>> {
        let users = self.inner.users.clone();
        blocking(move || users.iter().values().map(|v| decode(&v?)).collect()).await
    }

    pub fn user_count(&self) -> usize {
        self.inner.users.len()
    }

    /// Replaces a user's record. Username and email are immutable here (their indexes are not
    /// touched), so only role, disabled and similar fields may change.
    /// Changes a user's record atomically: `change` runs on the stored record (again, should
    /// a concurrent write intervene) and the result is saved with the e-mail index kept
    /// consistent — an e-mail another account has is `Conflict("email")`. Concurrent changes
    /// of different fields (a password and a display name) both stay. `None`: no such user.
    pub async fn modify_user<F>(&self, user_id: &str, change: F) -> Result<Option<User>>
    where
        F: Fn(&mut User) + Send + 'static,
    {
        let i = self.inner.clone();
        let user_id = user_id.to_string();
        let user = write_blocking(&self.inner.gate, move || {
            Ok(
                (&i.users, &i.users_by_email).transaction(|(users, by_email)| {
                    let Some(raw) = users.get(user_id.as_bytes())? else {
                        return Ok(None);
                    };
                    let old: User = decode(&raw).map_err(ConflictableTransactionError::Abort)?;
                    let mut user = old.clone();
                    change(&mut user);
                    user.user_id = old.user_id.clone();
                    user.username = old.username.clone();
                    let (old_key, new_key) = (old.email.to_lowercase(), user.email.to_lowercase());
                    if old_key != new_key {
                        if by_email.get(new_key.as_bytes())?.is_some() {
                            return Err(ConflictableTransactionError::Abort(StoreError::Conflict(
                                "email",
                            )));
                        }
                        by_email.remove(old_key.as_bytes())?;
                        by_email.insert(new_key.as_bytes(), user.user_id.as_bytes())?;
                    }
                    let value = encode(&user).map_err(ConflictableTransactionError::Abort)?;
                    users.insert(user_id.as_bytes(), value)?;
                    Ok(Some(user))
                })?,
            )
        })
        .await?;
        self.flush().await?;
        Ok(user)
    }

    /// A user's login sessions, newest sign-in first.
    pub async fn user_sessions(&self, user_id: &str) -> Result<Vec<LoginSession>> {
        let sessions = self.inner.sessions.clone();
        let user_id = user_id.to_string();
        blocking(move || {
            let mut out = Vec::new();
            for item in sessions.iter() {
                let (_, v) = item?;
                let s: LoginSession = decode(&v)?;
                if s.user_id == user_id {
                    out.push(s);
                }
            }
            // Ids are time-ordered (UUIDv7): they order sign-ins within one second.
            out.sort_by(|a, b| {
                let key = |s: &LoginSession| {
                    (s.signed_in_at.unwrap_or(s.created_at), s.session_id.clone())
                };
                key(b).cmp(&key(a))
            });
            Ok(out)
        })
        .await
    }

    // ---- codes sent by e-mail -----------------------------------------------------------

    /// Stores a code (replacing the user's earlier one for the same purpose), durably.
    pub async fn put_mail_code(&self, code: &MailCode) -> Result<()> {
        let tree = self.inner.mail_codes.clone();
        let (key, value) = (MailCode::key(&code.purpose, &code.user_id), encode(code)?);
        write_blocking(&self.inner.gate, move || {
            tree.insert(key, value)?;
            Ok(())
        })
        .await?;
        self.flush().await
    }

    /// Takes the user's code for `purpose` if `check` accepts it (removed then, so it works
    /// once); otherwise counts a failed attempt and removes the code once `max_attempts`
    /// have failed. Atomic: concurrent guesses are each counted.
    pub async fn use_mail_code<F>(
        &self,
        purpose: &str,
        user_id: &str,
        max_attempts: u32,
        check: F,
    ) -> Result<Option<MailCode>>
    where
        F: Fn(&MailCode) -> bool + Send + 'static,
    {
        let tree = self.inner.mail_codes.clone();
        let key = MailCode::key(purpose, user_id);
        let taken = write_blocking(&self.inner.gate, move || {
            loop {
                let Some(old) = tree.get(&key)? else {
                    return Ok(None);
                };
                let code: MailCode = decode(&old)?;
                let (next, taken) = if check(&code) {
                    (None, Some(code))
                } else {
                    let attempts = code.attempts + 1;
                    let next = (attempts < max_attempts)
                        .then(|| encode(&MailCode { attempts, ..code }))
                        .transpose()?;
                    (next, None)
                };
                if tree.compare_and_swap(&key, Some(old), next)?.is_ok() {
                    return Ok(taken);
                }
            }
        })
        .await?;
        self.flush().await?;
        Ok(taken)
    }

    /// The user's pending code for `purpose`, if any.
    pub async fn mail_code(&self, purpose: &str, user_id: &str) -> Result<Option<MailCode>> {
        let tree = self.inner.mail_codes.clone();
        let key = MailCode::key(purpose, user_id);
        blocking(move || tree.get(key)?.map(|v| decode(&v)).transpose()).await
    }

    /// Removes login sessions by id (their access tokens stop working).
    pub async fn remove_sessions(&self, ids: Vec<String>) -> Result<()> {
        let sessions = self.inner.sessions.clone();
        write_blocking(&self.inner.gate, move || {
            for id in &ids {
                sessions.remove(id.as_bytes())?;
            }
            Ok(())
        })
        .await?;
        self.flush().await
    }

    /// One login session.
    pub async fn session(&self, session_id: &str) -> Result<Option<LoginSession>> {
        let sessions = self.inner.sessions.clone();
        let session_id = session_id.to_string();
        blocking(move || {
            sessions
                .get(session_id.as_bytes())?
                .map(|v| decode(&v))
                .transpose()
        })
        .await
    }

    /// Removes a user and everything the store keeps of theirs: indexes, login sessions and
    /// refresh tokens, API keys, and their datasets', chat sessions', task templates', models' and tasks'
    /// records with the tasks' metrics. The caller removes the user's files.
    pub async fn delete_user(&self, user_id: &str) -> Result<Option<User>> {
        let i = self.inner.clone();
        let user_id = user_id.to_string();
        let user = write_blocking(&self.inner.gate, move || {
            let Some(user) = Self::user_blocking(&i.users, &user_id)? else {
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
            for key in Owned::<ApiKey>::list_blocking(&i.api_keys.tree, &user_id)? {
                i.api_key_hashes.remove(&key.secret_hash)?;
                i.api_keys.ids.remove(key.key_id.as_bytes())?;
                i.api_keys.tree.remove(owned_key(&user_id, &key.key_id))?;
            }
            for purpose in MailCode::PURPOSES {
                i.mail_codes.remove(MailCode::key(purpose, &user_id))?;
            }
            remove_owned_blocking(&i.datasets, &user_id)?;
            remove_owned_blocking(&i.chat_sessions, &user_id)?;
            remove_owned_blocking(&i.task_templates, &user_id)?;
            remove_owned_blocking(&i.models, &user_id)?;
            for hook in remove_owned_blocking(&i.webhooks, &user_id)? {
                remove_owned_blocking(&i.webhook_deliveries, &hook)?;
            }
            for task_id in remove_owned_blocking(&i.tasks, &user_id)? {
                for key in i.task_metrics.scan_prefix(owner_prefix(&task_id)).keys() {
                    i.task_metrics.remove(key?)?;
                }
            }
            revoke_refresh_blocking(&i, |t| t.user_id == user_id, true)?;
            Ok(Some(user))
        })
        .await?;
        self.flush().await?;
        Ok(user)
    }

    // ---- login sessions and refresh tokens ---------------------------------------------

    /// Records a new login session and its first refresh token, durably.
    pub async fn open_session(
        &self,
        session: &LoginSession,
        hash: &[u8],
        token: &RefreshToken,
    ) -> Result<()> {
        let i = self.inner.clone();
        let (sid, session, hash, token) = (
            session.session_id.clone(),
            encode(session)?,
            hash.to_vec(),
            encode(token)?,
        );
        write_blocking(&self.inner.gate, move || {
            (&i.sessions, &i.refresh_tokens).transaction(|(sessions, tokens)| {
                sessions.insert(sid.as_bytes(), session.as_slice())?;
                tokens.insert(hash.as_slice(), token.as_slice())?;
                Ok::<_, ConflictableTransactionError<StoreError>>(())
            })?;
            Ok(())
        })
        .await?;
        self.flush().await
    }

    /// The user a request's credentials name, and whether its login session still exists,
    /// in one trip to the store.
    pub async fn user_and_session(
        &self,
        user_id: &str,
        session_id: &str,
    ) -> Result<(Option<User>, bool)> {
        let i = self.inner.clone();
        let (user_id, session_id) = (user_id.to_string(), session_id.to_string());
        blocking(move || {
            let user = Self::user_blocking(&i.users, &user_id)?;
            let live = match i.sessions.get(session_id.as_bytes())? {
                Some(v) => decode::<LoginSession>(&v)?.user_id == user_id,
                None => false,
            };
            Ok((user, live))
        })
        .await
    }

    pub async fn refresh_token(&self, hash: &[u8]) -> Result<Option<RefreshToken>> {
        let tokens = self.inner.refresh_tokens.clone();
        let hash = hash.to_vec();
        blocking(move || tokens.get(hash)?.map(|v| decode(&v)).transpose()).await
    }

    /// Atomically marks `old` rotated (`new`) and stores the next token of its session, so a
    /// refresh token is rotated once even under concurrent requests. Returns false when it
    /// changed meanwhile (nothing is written then). The session record is written too: its
    /// expiry follows its newest token (and a family older than session records gets one).
    pub async fn rotate_refresh_token(
        &self,
        hash: &[u8],
        old: &RefreshToken,
        new: &RefreshToken,
        next_hash: &[u8],
        next: &RefreshToken,
        session: &LoginSession,
    ) -> Result<bool> {
        let i = self.inner.clone();
        let (hash, old, new) = (hash.to_vec(), encode(old)?, encode(new)?);
        let (next_hash, next) = (next_hash.to_vec(), encode(next)?);
        let (sid, session) = (session.session_id.clone(), encode(session)?);
        let swapped = write_blocking(&self.inner.gate, move || {
            Ok(
                (&i.refresh_tokens, &i.sessions).transaction(|(tokens, sessions)| {
                    if tokens.get(&hash)?.as_deref() != Some(old.as_slice()) {
                        return Ok(false);
                    }
                    sessions.insert(sid.as_bytes(), session.as_slice())?;
                    tokens.insert(hash.as_slice(), new.as_slice())?;
                    tokens.insert(next_hash.as_slice(), next.as_slice())?;
                    Ok::<_, ConflictableTransactionError<StoreError>>(true)
                })?,
            )
        })
        .await?;
        if swapped {
            self.flush().await?;
        }
        Ok(swapped)
    }

    pub async fn remove_refresh_token(&self, hash: &[u8]) -> Result<()> {
        let tokens = self.inner.refresh_tokens.clone();
        let hash = hash.to_vec();
        write_blocking(&self.inner.gate, move || {
            tokens.remove(hash)?;
            Ok(())
        })
        .await?;
        self.flush().await
    }

    /// Ends every login session (and removes every refresh token) matching `pred`, durably;
    /// returns how many refresh tokens went. Access tokens of those sessions stop working.
    pub async fn revoke_refresh_where<F>(&self, pred: F) -> Result<usize>
    where
        F: Fn(&RefreshToken) -> bool + Send + 'static,
    {
        let i = self.inner.clone();
        let n = write_blocking(&self.inner.gate, move || {
            revoke_refresh_blocking(&i, pred, true)
        })
        .await?;
        self.flush().await?;
        Ok(n)
    }

    /// Removes expired refresh tokens and sessions; returns how many tokens.
    pub async fn sweep_expired(&self, now: i64) -> Result<usize> {
        let i = self.inner.clone();
        let n = write_blocking(&self.inner.gate, move || {
            let n = revoke_refresh_blocking(&i, |t| t.expires_at <= now, false)?;
            for item in i.sessions.iter() {
                let (k, v) = item?;
                if decode::<LoginSession>(&v).map_or(true, |s| s.expires_at <= now) {
                    i.sessions.remove(k)?;
                }
            }
            Ok(n)
        })
        .await?;
        self.flush().await?;
        Ok(n)
    }

    // ---- API keys ----------------------------------------------------------------------

    pub async fn create_api_key(&self, key: &ApiKey, hash: &[u8]) -> Result<()> {
        let i = self.inner.clone();
        let record = encode(key)?;
        let key_path = owned_key(&key.owner, &key.key_id);
        let (key_id, owner, hash) = (key.key_id.clone(), key.owner.clone(), hash.to_vec());
        write_blocking(&self.inner.gate, move || {
            (&i.api_keys.tree, &i.api_keys.ids, &i.api_key_hashes).transaction(
                |(tree, ids, hashes)| {
                    tree.insert(key_path.as_slice(), record.as_slice())?;
                    ids.insert(key_id.as_bytes(), owner.as_bytes())?;
                    hashes.insert(hash.as_slice(), key_path.as_slice())?;
                    Ok::<_, ConflictableTransactionError<StoreError>>(())
                },
            )?;
            Ok(())
        })
        .await?;
        self.flush().await
    }

    /// The API key whose secret hashes to `hash`, with its owner's record, in one trip.
    pub async fn api_key_by_hash(&self, hash: &[u8]) -> Result<Option<(ApiKey, Option<User>)>> {
        let i = self.inner.clone();
        let hash = hash.to_vec();
        // A read: not behind the write gate (a snapshot does not stall sign-ins).
        blocking(move || {
            let Some(path) = i.api_key_hashes.get(hash)? else {
                return Ok(None);
            };
            let Some(key) = i.api_keys.tree.get(path)? else {
                return Ok(None);
            };
            let key: ApiKey = decode(&key)?;
            let user = Self::user_blocking(&i.users, &key.owner)?;
            Ok(Some((key, user)))
        })
        .await
    }

    pub async fn delete_api_key(&self, owner: &str, key_id: &str) -> Result<Option<ApiKey>> {
        let i = self.inner.clone();
        let (owner, key_id) = (owner.to_string(), key_id.to_string());
        let key = write_blocking(&self.inner.gate, move || {
            let key_path = owned_key(&owner, &key_id);
            let Some(key) = Owned::<ApiKey>::get_blocking(&i.api_keys.tree, &owner, &key_id)?
            else {
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
            Ok(Some(key))
        })
        .await?;
        if key.is_some() {
            self.flush().await?;
        }
        Ok(key)
    }
}

/// Removes every record of `owner` from a collection; returns their ids.
fn remove_owned_blocking<T: OwnedRecord>(c: &Owned<T>, owner: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for item in c.tree.scan_prefix(owner_prefix(owner)) {
        let (key, _) = item?;
        let id = String::from_utf8_lossy(&key[owner.len() + 1..]).into_owned();
        c.tree.remove(&key)?;
        c.ids.remove(id.as_bytes())?;
        removed.push(id);
    }
    Ok(removed)
}

/// Removes the refresh tokens matching `pred` and, with `end_sessions`, their login sessions.
fn revoke_refresh_blocking(
    i: &Inner,
    pred: impl Fn(&RefreshToken) -> bool,
    end_sessions: bool,
) -> Result<usize> {
    let mut n = 0;
    for item in i.refresh_tokens.iter() {
        let (k, v) = item?;
        let Ok(token) = decode::<RefreshToken>(&v) else {
            i.refresh_tokens.remove(k)?;
            continue;
        };
        if pred(&token) {
            i.refresh_tokens.remove(k)?;
            if end_sessions {
                i.sessions.remove(token.family.as_bytes())?;
            }
            n += 1;
        }
    }
    Ok(n)
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
    async fn user_changes_are_atomic_and_keep_the_email_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store
            .create_user(user("alice", "a@x.io"), None)
            .await
            .unwrap();
        store
            .create_user(user("bob", "b@x.io"), None)
            .await
            .unwrap();
        // An e-mail another account has is refused, whatever its case; nothing changes.
        let taken = store
            .modify_user(&a.user_id, |u| u.email = "B@x.IO".into())
            .await;
        assert!(
            matches!(taken, Err(StoreError::Conflict("email"))),
            "{taken:?}"
        );
        assert_eq!(
            store.user(&a.user_id).await.unwrap().unwrap().email,
            "a@x.io"
        );
        // A new one moves the index: the old address no longer signs in, the new one does.
        let moved = store
            .modify_user(&a.user_id, |u| u.email = "alice@new.io".into())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(moved.email, "alice@new.io");
        assert!(store.user_by_login("a@x.io").await.unwrap().is_none());
        assert_eq!(
            store
                .user_by_login("ALICE@new.io")
                .await
                .unwrap()
                .unwrap()
                .user_id,
            a.user_id
        );
        store
            .create_user(user("carol", "a@x.io"), None)
            .await
            .unwrap();
        // The id and username are not the closure's to change.
        let same = store
            .modify_user(&a.user_id, |u| {
                u.user_id = "other".into();
                u.username = "mallory".into();
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (same.user_id.as_str(), same.username.as_str()),
            (a.user_id.as_str(), "alice")
        );
        assert!(store.modify_user("nobody", |_| {}).await.unwrap().is_none());
        // Concurrent changes of different fields all stay.
        let mut handles = Vec::new();
        for n in 0..16u64 {
            let (store, id) = (store.clone(), a.user_id.clone());
            handles.push(tokio::spawn(async move {
                if n % 2 == 0 {
                    store.modify_user(&id, |u| u.token_version += 1).await
                } else {
                    store
                        .modify_user(&id, move |u| u.display_name = Some(format!("A{n}")))
                        .await
                }
            }));
        }
        for h in handles {
            h.await.unwrap().unwrap().unwrap();
        }
        let end = store.user(&a.user_id).await.unwrap().unwrap();
        assert_eq!(end.token_version, 8);
        assert!(end.display_name.is_some_and(|d| d.starts_with('A')));
        assert_eq!(end.email, "alice@new.io");
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
            store.user_by_login("alice").await.unwrap().unwrap().user_id,
            a.user_id
        );
        assert_eq!(
            store
                .user_by_login("A@X.IO")
                .await
                .unwrap()
                .unwrap()
                .user_id,
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
        let d1 = DatasetRecord::example("u1");
        let d2 = DatasetRecord::example("u2");
        let d3 = DatasetRecord::example("u1");
        for d in [&d1, &d2, &d3] {
            store.datasets().put(d).await.unwrap();
        }
        let mine: Vec<_> = store.datasets().list("u1").await.unwrap();
        assert_eq!(mine.len(), 2);
        assert_eq!(mine[0].file_id, d3.file_id, "newest first");
        assert!(
            store
                .datasets()
                .get("u2", &d1.file_id)
                .await
                .unwrap()
                .is_none()
        );
        let any = store.datasets().get_any(&d1.file_id).await.unwrap();
        assert_eq!(any.unwrap().owner, "u1");
        let removed = store.datasets().remove("u2", &d1.file_id).await.unwrap();
        assert!(removed.is_none(), "not u2's");
        let removed = store.datasets().remove("u1", &d1.file_id).await.unwrap();
        assert!(removed.is_some());
        assert!(
            store
                .datasets()
                .get_any(&d1.file_id)
                .await
                .unwrap()
                .is_none()
        );
    }

    /// The deadlock of sled 0.34's concurrent `flush_async` (issue 1308) froze the server
    /// under 10–30 parallel writes. Hundreds of concurrent writers of every kind, on a
    /// two-thread runtime like the server's, must all finish, and their data must be on disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hundreds_of_concurrent_writers_all_finish_durably() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut handles = Vec::new();
        for n in 0..300 {
            let store = store.clone();
            handles.push(tokio::spawn(async move {
                let owner = format!("u{}", n % 7);
                match n % 3 {
                    0 => {
                        store
                            .create_user(user(&format!("user{n}"), &format!("{n}@x.io")), None)
                            .await?;
                    }
                    1 => {
                        store
                            .datasets()
                            .put(&DatasetRecord::example(&owner))
                            .await?
                    }
                    _ => {
                        let d = DatasetRecord::example(&owner);
                        store.datasets().put(&d).await?;
                        store.datasets().remove(&owner, &d.file_id).await?;
                    }
                }
                Ok::<_, StoreError>(())
            }));
        }
        let all = async {
            for h in handles {
                h.await.unwrap().unwrap();
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), all)
            .await
            .expect("every writer finished");
        let datasets = store.datasets().list_all().await.unwrap().len();
        assert_eq!(datasets, 100);
        assert_eq!(store.user_count(), 100);
        drop(store);
        // Reopened at once (the flush thread let go of the files), everything is there.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.user_count(), 100);
        assert_eq!(store.datasets().list_all().await.unwrap().len(), 100);
    }

    #[tokio::test]
    async fn update_is_atomic_under_contention() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = DatasetRecord::example("u1");
        store.datasets().put(&d).await.unwrap();
        let mut handles = Vec::new();
        for _ in 0..50 {
            let store = store.clone();
            let id = d.file_id.clone();
            handles.push(tokio::spawn(async move {
                store
                    .datasets()
                    .update("u1", &id, |d| {
                        d.num_rows += 1;
                        true
                    })
                    .await
            }));
        }
        for h in handles {
            h.await.unwrap().unwrap();
        }
        let d = store.datasets().get("u1", &d.file_id).await.unwrap();
        assert_eq!(d.unwrap().num_rows, 51, "no increment lost");
    }

    #[tokio::test]
    async fn sessions_end_with_their_refresh_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let session = LoginSession {
            session_id: "fam".into(),
            user_id: "u1".into(),
            created_at: 0,
            expires_at: i64::MAX,
            signed_in_at: None,
            client: None,
            user_agent: None,
        };
        let token = RefreshToken {
            user_id: "u1".into(),
            family: "fam".into(),
            expires_at: i64::MAX,
            remember: false,
            rotated_at: None,
        };
        store.open_session(&session, b"h1", &token).await.unwrap();
        assert!(store.user_and_session("u1", "fam").await.unwrap().1);
        assert!(
            !store.user_and_session("u2", "fam").await.unwrap().1,
            "another user's session id does not count"
        );
        store
            .revoke_refresh_where(|t| t.family == "fam")
            .await
            .unwrap();
        assert!(!store.user_and_session("u1", "fam").await.unwrap().1);
        assert!(store.refresh_token(b"h1").await.unwrap().is_none());
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .inner
                .meta
                .insert(META_SCHEMA, &(SCHEMA_VERSION + 1).to_be_bytes())
                .unwrap();
            store.inner.meta.flush().unwrap();
        }
        let err = Store::open(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap();
        assert!(err.contains("newer"), "{err}");
    }
}
