//! Accounts: registration, the administrators' view of every account, and an account's
//! whole life — role and disabling (ending its sessions), password resets, deletion with its
//! cascade — under the rule that the service always keeps an active administrator.

use std::sync::Arc;

use time::OffsetDateTime;

use crate::auth::Auth;
use crate::datasets::Datasets;
use crate::error::{Error, Result};
use crate::models::Registry;
use crate::store::{Role, Store, TaskStatus, User};
use crate::training::Training;

/// What an administrator may change of an account.
#[derive(Debug, Clone, Default)]
pub struct AccountChange {
    pub role: Option<Role>,
    pub disabled: Option<bool>,
    /// A new password (for a user who forgot theirs): their sessions end.
    pub password: Option<String>,
}

/// Counts for the administrators' dashboard.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct Stats {
    pub tasks: TaskCounts,
    pub models: ModelCounts,
    pub users: UserCounts,
    pub datasets: DatasetCounts,
}

#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct TaskCounts {
    pub total: usize,
    pub queued: usize,
    pub running: usize,
    pub completed: usize,
    pub failed: usize,
    pub cancelled: usize,
}

#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct ModelCounts {
    /// Base models in the models folder.
    pub base: usize,
    /// Models users trained.
    pub trained: usize,
}

#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct UserCounts {
    pub total: usize,
    pub admins: usize,
    pub disabled: usize,
}

#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct DatasetCounts {
    pub total: usize,
    pub bytes: u64,
    pub rows: u64,
}

pub struct Accounts {
    store: Store,
    auth: Arc<Auth>,
    training: Arc<Training>,
    datasets: Datasets,
    models: Arc<Registry>,
    /// Changes that could leave no active administrator run one at a time, so two
    /// administrators demoting each other at once cannot both succeed.
    admin_changes: tokio::sync::Mutex<()>,
}

impl Accounts {
    pub fn new(
        store: Store,
        auth: Arc<Auth>,
        training: Arc<Training>,
        datasets: Datasets,
        models: Arc<Registry>,
    ) -> Arc<Accounts> {
        Arc::new(Accounts {
            store,
            auth,
            training,
            datasets,
            models,
            admin_changes: tokio::sync::Mutex::new(()),
        })
    }

    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// Registers an account (the first one ever is the administrator). `client`: the
    /// caller's address, throttled; `None` from the command line.
    pub async fn register(
        &self,
        username: &str,
        email: &str,
        password: &str,
        role: Option<Role>,
        client: Option<&str>,
    ) -> Result<User> {
        self.auth
            .register(username, email, password, role, client)
            .await
    }

    /// Every account, oldest first.
    pub async fn list(&self) -> Result<Vec<User>> {
        Ok(self.store.users().await?)
    }

    pub async fn get(&self, user_id: &str) -> Result<User> {
        self.store
            .user(user_id)
            .await?
            .ok_or_else(|| Error::not_found("user"))
    }

    /// True when `user` is the last enabled admin.
    async fn is_last_admin(&self, user: &User) -> Result<bool> {
        if user.role != Role::Admin || user.disabled {
            return Ok(false);
        }
        let others = self
            .store
            .users()
            .await?
            .iter()
            .filter(|u| u.role == Role::Admin && !u.disabled && u.user_id != user.user_id)
            .count();
        Ok(others == 0)
    }

    fn last_admin() -> Error {
        Error::conflict(
            "last_admin",
            "this is the last active administrator; promote another account first",
        )
    }

    /// Changes an account's role, disabled state or password. Disabling ends its sessions;
    /// a new password ends them too. The last active administrator cannot be demoted or
    /// disabled (409).
    pub async fn update(&self, admin: &User, user_id: &str, change: AccountChange) -> Result<User> {
        if let Some(pw) = &change.password {
            crate::auth::validate_password(pw)?;
        }
        let _one_at_a_time = self.admin_changes.lock().await;
        let user = self.get(user_id).await?;
        let demotes = change.role == Some(Role::User) || change.disabled == Some(true);
        if demotes && self.is_last_admin(&user).await? {
            return Err(Self::last_admin());
        }
        let (role, disabled) = (change.role, change.disabled);
        let mut user = self
            .store
            .modify_user(user_id, move |u| {
                if let Some(role) = role {
                    u.role = role;
                }
                if let Some(disabled) = disabled {
                    u.disabled = disabled;
                }
                u.updated_at = OffsetDateTime::now_utc();
            })
            .await?
            .ok_or_else(|| Error::not_found("user"))?;
        if user.disabled {
            // Their access tokens stop at the next request (checked per request); their
            // sessions end for good.
            let uid = user.user_id.clone();
            self.store
                .revoke_refresh_where(move |t| t.user_id == uid)
                .await?;
        }
        if let Some(pw) = &change.password {
            user = self.auth.set_password(user, pw).await?;
            tracing::info!(admin = %admin.user_id, user_id = %user.user_id, "password reset by an administrator");
        }
        tracing::info!(admin = %admin.user_id, user_id = %user.user_id, role = user.role.as_str(), disabled = user.disabled, "account updated");
        Ok(user)
    }

    /// Deletes an account and everything of it: tasks (refused while one is queued or
    /// running), trained models, datasets, chat sessions, keys and sessions — records and
    /// files. Runs under the owner's lock (no task or dataset deletion of theirs
    /// interleaves) and the administrators' lock (the last administrator stays).
    pub async fn delete(&self, admin: &User, user_id: &str) -> Result<User> {
        let _one_at_a_time = self.admin_changes.lock().await;
        let user = self.get(user_id).await?;
        if self.is_last_admin(&user).await? {
            return Err(Self::last_admin());
        }
        let _owner = self.training.owners().lock(user_id).await;
        self.training.delete_all_of(user_id).await?;
        self.models.remove_owner(user_id).await?;
        self.store.delete_user(user_id).await?;
        self.datasets.remove_owner_files(user_id).await;
        tracing::info!(admin = %admin.user_id, user_id, "account deleted");
        Ok(user)
    }

    /// Counts of users, tasks by status, datasets and models.
    pub async fn stats(&self) -> Result<Stats> {
        let users = self.store.users().await?;
        let datasets = self.store.datasets().list_all().await?;
        let tasks = self.training.list_all().await?;
        let by_status = |st: TaskStatus| tasks.iter().filter(|t| t.status == st).count();
        Ok(Stats {
            tasks: TaskCounts {
                total: tasks.len(),
                queued: by_status(TaskStatus::Queued),
                running: by_status(TaskStatus::Running),
                completed: by_status(TaskStatus::Completed),
                failed: by_status(TaskStatus::Failed),
                cancelled: by_status(TaskStatus::Cancelled),
            },
            models: ModelCounts {
                base: self.models.base_models().await?.len(),
                trained: self.models.all_trained().await?.len(),
            },
            users: UserCounts {
                total: users.len(),
                admins: users.iter().filter(|u| u.role == Role::Admin).count(),
                disabled: users.iter().filter(|u| u.disabled).count(),
            },
            datasets: DatasetCounts {
                total: datasets.len(),
                bytes: datasets.iter().map(|d| d.size).sum(),
                rows: datasets.iter().map(|d| d.num_rows).sum(),
            },
        })
    }
}
