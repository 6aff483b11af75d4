//! kvq: LLM inference with online KV-cache quantization (int8, int4 and TurboQuant, as in
//! LMDeploy), as a library and the `kvq` command.
//!
//! This facade re-exports the engine and links both attention backends, so that their
//! `inventory` registrations are present in any program that uses kvq.

pub use engine_core::*;

mod pipeline;
pub use pipeline::{GenerationConfig, Pipeline};

pub mod server;

// Linked for their registrations (a crate nothing references is dropped by the linker).
use backend_pytorchlike as _;
use backend_turbomind as _;
// With the `cuda` feature it registers the `device = "cuda"` model runner.
use kernels as _;

/// The attention backends this build registers.
pub fn backends() -> Vec<&'static str> {
    engine_core::backend::registered_backend_names()
}
