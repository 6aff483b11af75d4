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
}
