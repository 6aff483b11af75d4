//! Error types. Every user-facing failure is a value with a message a user can act on.

use thiserror::Error;

/// A configuration that cannot run: a bad key or value, or a combination a backend rejects.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ConfigError {
    /// The TOML text does not parse, or has a key that does not exist.
    #[error("invalid config: {0}")]
    Parse(String),
    /// A key's value is outside what it accepts.
    #[error("invalid value for `{key}`: {value} ({expected})")]
    OutOfRange {
        key: &'static str,
        value: String,
        expected: String,
    },
    /// A quant policy or codec name that nothing provides.
    #[error("unknown quant_policy `{given}`; valid values: {}", valid.join(", "))]
    UnknownPolicy { given: String, valid: Vec<String> },
    /// A backend that is not registered.
    #[error("unknown backend `{given}`; valid backends: {}", valid.join(", "))]
    UnknownBackend { given: String, valid: Vec<String> },
    /// A combination of backend, codec, model and options that the backend refuses.
    #[error("{backend} backend: {reason}")]
    Unsupported { backend: String, reason: String },
}

/// Any error the engine reports.
#[derive(Debug, Error)]
pub enum KvqError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A model file that cannot be read or understood; names the file and the problem.
    #[error("model file {path}: {reason}")]
    Model { path: String, reason: String },
    /// The paged cache has no free block left for a request.
    #[error("out of KV cache blocks: {0}")]
    OutOfBlocks(String),
    /// A caller broke an API contract (wrong buffer length, unknown block, …).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The engine failed while running a request (a failed step fails every request in it).
    #[error("engine: {0}")]
    Engine(String),
    /// A device (GPU) that cannot be used, or a failure on it; names the device and the cause.
    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },
    /// The engine's thread has stopped; nothing more can be submitted.
    #[error("the engine has stopped")]
    EngineStopped,
    #[error("io error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = KvqError> = std::result::Result<T, E>;
