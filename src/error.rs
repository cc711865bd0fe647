//! The domain's error: what went wrong, in the caller's terms, plus a stable machine code.
//! The HTTP layer maps each [`Kind`] to one status (see `http::error`); nothing below HTTP
//! knows about statuses.

use std::fmt;

use crate::store::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Malformed request (400).
    BadRequest,
    /// No or bad credentials (401).
    Unauthenticated,
    /// Authenticated but not allowed (403).
    Forbidden,
    /// Missing, or not the caller's (404).
    NotFound,
    /// Conflicts with the current state (409).
    Conflict,
    /// Too large (413).
    TooLarge,
    /// Well-formed but invalid content (422).
    Invalid,
    /// Throttled (429).
    Throttled,
    /// Not ready yet, or too busy (503).
    Unavailable,
    /// The disk is full (507).
    InsufficientStorage,
    /// A fault of ours (500); the message is logged, not shown.
    Internal,
}

#[derive(Debug)]
pub struct Error {
    pub kind: Kind,
    /// Machine-readable code, e.g. `username_taken`.
    pub code: &'static str,
    /// Human-readable message shown to the client (except for `Internal`).
    pub message: String,
    /// For `Throttled`: seconds until a retry may succeed.
    pub retry_after: Option<u64>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, code: &'static str, message: impl Into<String>) -> Error {
        Error {
            kind,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Error {
        Error::new(Kind::BadRequest, "bad_request", message)
    }

    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(Kind::Invalid, "invalid", message)
    }

    pub fn not_found(what: &str) -> Error {
        Error::new(Kind::NotFound, "not_found", format!("{what} not found"))
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Error {
        Error::new(Kind::Conflict, code, message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Error {
        Error::new(Kind::Unauthenticated, "unauthenticated", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Error {
        Error::new(Kind::Forbidden, "forbidden", message)
    }

    pub fn throttled(retry_after: u64) -> Error {
        Error {
            retry_after: Some(retry_after),
            ..Error::new(
                Kind::Throttled,
                "too_many_attempts",
                format!("too many failed attempts; try again in {retry_after} s"),
            )
        }
    }

    pub fn internal(message: impl fmt::Display) -> Error {
        Error::new(Kind::Internal, "internal", message.to_string())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for Error {}

impl Error {
    /// The disk (or the quota) is full: nothing was kept.
    pub fn disk_full() -> Error {
        Error::new(
            Kind::InsufficientStorage,
            "disk_full",
            "the server's disk is full; nothing was saved — free some space or ask an administrator",
        )
    }
}

/// Whether an I/O error means the disk (or the user's quota) is full.
pub fn io_is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || matches!(
            e.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        )
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        if e.is_disk_full() {
            tracing::error!(error = %e, "the store cannot write: disk full");
            return Error::disk_full();
        }
        match e {
            StoreError::Conflict(field) => {
                Error::conflict("conflict", format!("{field} already exists"))
            }
            other => Error::internal(other),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        if io_is_disk_full(&e) {
            tracing::error!(error = %e, "disk full");
            return Error::disk_full();
        }
        Error::internal(format!("i/o: {e}"))
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::internal(format!("background task: {e}"))
    }
}
