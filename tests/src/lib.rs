//! Shared helpers for kvq's cross-crate integration tests.

use std::path::PathBuf;

use engine_core::{EngineConfig, ModelSpec};

// Linked for their `inventory` registrations.
use backend_pytorchlike as _;
use backend_turbomind as _;
use fp8_codec as _;

/// Path of a file under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The spec of a fixture `config.json`.
pub fn fixture_spec(name: &str) -> ModelSpec {
    ModelSpec::from_path(&fixture(name)).expect("fixture spec")
}

/// A config from TOML text; panics on invalid text (tests of invalid text parse themselves).
pub fn config(toml: &str) -> EngineConfig {
    EngineConfig::from_toml_str(toml).expect("valid config")
}

/// The default model, if present (see [`engine_core::testing::default_model`]).
pub fn default_model() -> Option<PathBuf> {
    engine_core::testing::default_model()
}

/// Path of a file under `texts/`.
pub fn text(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../texts")
        .join(name)
}
