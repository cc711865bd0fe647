//! ferrotune: self-hosted LLM fine-tuning and serving in one binary.
//!
//! See ARCHITECTURE.md for the map of the crate.

pub mod accounts;
pub mod alerts;
pub mod audit;
pub mod auth;
pub mod backup;
pub mod chat;
pub mod config;
pub mod datasets;
pub mod error;
pub mod http;
pub mod inference;
pub mod locks;
pub mod logs;
pub mod mail;
pub mod models;
pub mod notify;
pub mod pyenv;
#[cfg(feature = "python")]
mod python;
pub mod store;
pub mod system;
pub mod telemetry;
pub mod text;
pub mod training;
pub mod usage;
pub mod webhooks;
pub mod worker;
