//! Errors from the CUDA layer.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum KernelError {
    /// The binary was built without the `cuda` feature.
    #[error("kvq was built without CUDA support; rebuild with `--features cuda`")]
    NotBuilt,
    /// A CUDA library could not be loaded at run time.
    #[error("CUDA library {0} not found; install the CUDA driver/toolkit or add its lib directory to LD_LIBRARY_PATH")]
    LibraryMissing(&'static str),
    /// The driver loaded but there is no usable GPU (or the ordinal is out of range).
    #[error("no CUDA device {ordinal}: {reason}")]
    NoDevice { ordinal: usize, reason: String },
    /// NVRTC rejected a kernel source.
    #[error("NVRTC failed to compile kernel `{name}` for {arch}:\n{log}")]
    Compile {
        name: String,
        arch: String,
        log: String,
    },
    #[error("kernel cache {path}: {source}")]
    Cache {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A CUDA driver call failed; names the operation.
    #[error("CUDA error in {op}: {reason}")]
    Driver { op: String, reason: String },
    /// The codec, shape or layout has no GPU kernel; says what would work.
    #[error("not supported on the GPU: {0}")]
    Unsupported(String),
    /// A caller broke an API contract (buffer length, shape).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl KernelError {
    /// Wraps a driver error with the operation that failed.
    pub fn driver(op: impl Into<String>, err: impl std::fmt::Debug) -> Self {
        KernelError::Driver {
            op: op.into(),
            reason: format!("{err:?}"),
        }
    }
}
