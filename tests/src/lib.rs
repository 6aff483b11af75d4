//! Shared helpers for kvq's cross-crate integration tests.

use std::path::PathBuf;

use engine_core::model::{layers_from, LlamaModel};
use engine_core::ops::linear::Linear;
use engine_core::testing::{gaussian, rng};
use engine_core::{AttentionKind, EngineConfig, ModelSpec};

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

/// SmolLM2-135M's shape with `layers` layers.
pub fn smollm2_shape(layers: usize) -> ModelSpec {
    ModelSpec {
        num_layers: layers,
        attention: AttentionKind::Mha,
        ..ModelSpec::smollm2_135m()
    }
}

/// Random weights: matrices N(0, 1/in), norms near 1, a tied N(0, 0.15²) embedding. `weight`
/// maps every matrix and embedding value: the identity, or a rounding that gives the same
/// model at a lower precision (the norms stay exact, as the GPU runner keeps them in f32).
pub fn random_model(spec: &ModelSpec, seed: u64, weight: fn(f32) -> f32) -> LlamaModel {
    let mut r = rng(seed);
    let mut lin = |out: usize, inp: usize| {
        let s = 1.0 / (inp as f32).sqrt();
        Linear::new(
            gaussian(&mut r, out * inp)
                .into_iter()
                .map(|x| weight(x * s))
                .collect(),
            out,
            inp,
        )
    };
    let hd = spec.hidden_size;
    let layers = layers_from(spec, &mut lin);
    let mut r = rng(seed ^ 0x5eed);
    // Logits of std ≈ 4, so the distributions are peaked but KL divergence is not vacuous.
    let embed = gaussian(&mut r, spec.vocab_size * hd)
        .into_iter()
        .map(|x| weight(0.15 * x))
        .collect();
    let norm: Vec<f32> = gaussian(&mut r, hd).iter().map(|x| 1.0 + 0.1 * x).collect();
    LlamaModel::new(spec.clone(), embed, layers, norm, None)
}

/// Sequences of uniformly random tokens, of the given lengths.
pub fn random_prompts(seed: u64, lens: &[usize], vocab: usize) -> Vec<Vec<u32>> {
    use rand::Rng;
    let mut r = rng(seed);
    lens.iter()
        .map(|&n| (0..n).map(|_| r.random_range(0..vocab as u32)).collect())
        .collect()
}
