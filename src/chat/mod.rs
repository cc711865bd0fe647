//! Chat: what every way of chatting (HTTP, the CLI, Python) shares above the engine.

pub mod limits;

pub use limits::{GenerationLimits, GenerationPermit};
