//! The engine core of kvq: the [`KvCodec`] and [`AttentionBackend`] traits, their registries,
//! configuration, model metadata, the paged KV cache with its memory planner, and the CPU
//! reference attention that reads quantized blocks without materialising a dequantized cache.
//!
//! The core never names a backend: backends and third-party codecs announce themselves through
//! [`inventory`] (see [`codec::CodecRegistration`] and [`backend::BackendRegistration`]).

pub mod attention;
pub mod backend;
pub mod cache;
pub mod cache_section;
pub mod chat;
pub mod codec;
pub mod config;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod eval;
pub mod loader;
pub mod model;
pub mod model_spec;
pub mod ops;
pub mod plan;
pub mod qk_study;
pub mod sampling;
pub mod testing;

pub use backend::{AttentionBackend, BackendRegistration};
pub use codec::{CodecRegistration, Domain, KvCodec, SideBytes};
pub use config::EngineConfig;
pub use dtype::KvDtype;
pub use error::{ConfigError, KvqError};
pub use model_spec::{AttentionKind, ModelSpec};

/// Re-exported so plugin crates register codecs with the same `inventory` version as the core.
pub use inventory;
