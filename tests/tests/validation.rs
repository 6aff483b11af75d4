//! The backend split, enforced by `validate` with messages a user can act on.

use engine_core::plan::ResolvedConfig;
use engine_core::EngineConfig;
use kvq_integration_tests::{config, fixture_spec};

fn reject(spec_file: &str, toml: &str) -> String {
    let spec = fixture_spec(spec_file);
    match ResolvedConfig::new(&spec, &config(toml)) {
        Ok(_) => panic!("{toml} on {spec_file} was accepted"),
        Err(e) => e.to_string(),
    }
}

fn accept(spec_file: &str, toml: &str) {
    let spec = fixture_spec(spec_file);
    if let Err(e) = ResolvedConfig::new(&spec, &config(toml)) {
        panic!("{toml} on {spec_file}: {e}");
    }
}

const SMOL: &str = "smollm2-135m-config.json";

#[test]
fn turbomind_rejects_turbo_quant_and_names_the_pytorch_backend() {
    for policy in ["42", "\"turbo_quant\""] {
        let err = reject(
            SMOL,
            &format!("[engine]\nbackend = \"turbomind\"\nquant_policy = {policy}\n"),
        );
        assert!(err.contains("pytorch"), "{err}");
        assert!(
            err.to_lowercase().contains("turboquant") || err.contains("42"),
            "{err}"
        );
    }
}

#[test]
fn pytorch_turbo_quant_rejects_mla_models() {
    let err = reject(
        "deepseek-v2-lite-config.json",
        "[engine]\nquant_policy = 42\n",
    );
    assert!(err.contains("MLA"), "{err}");
}

#[test]
fn pytorch_turbo_quant_rejects_speculative_decoding() {
    let err = reject(
        SMOL,
        "[engine]\nquant_policy = 42\n[speculative]\nmethod = \"ngram\"\nnum_speculative_tokens = 4\n",
    );
    assert!(err.contains("speculative"), "{err}");
}

#[test]
fn pytorch_turbo_quant_rejects_non_power_of_two_head_dims() {
    for (file, dim) in [("head96-config.json", "96"), ("phi-2-config.json", "80")] {
        let err = reject(file, "[engine]\nquant_policy = 42\n");
        assert!(err.contains("power of two") && err.contains(dim), "{err}");
    }
}

#[test]
fn the_same_models_run_other_policies() {
    accept(
        "deepseek-v2-lite-config.json",
        "[engine]\nquant_policy = 8\n",
    );
    accept("head96-config.json", "[engine]\nquant_policy = 4\n");
    accept(SMOL, "[engine]\nquant_policy = 8\n[speculative]\nmethod = \"ngram\"\nnum_speculative_tokens = 4\n");
    for backend in ["pytorch", "turbomind"] {
        for policy in [0, 4, 8] {
            accept(
                SMOL,
                &format!("[engine]\nbackend = \"{backend}\"\nquant_policy = {policy}\n"),
            );
        }
    }
    accept(SMOL, "[engine]\nquant_policy = 42\n");
}

#[test]
fn unknown_policy_or_codec_lists_the_valid_ones() {
    for policy in ["16", "\"int2\""] {
        let err = EngineConfig::from_toml_str(&format!("[engine]\nquant_policy = {policy}\n"))
            .unwrap_err()
            .to_string();
        for valid in [
            "\"none\"",
            "\"int8\"",
            "\"int4\"",
            "\"turbo_quant\"",
            "\"fp8_e4m3\"",
        ] {
            assert!(err.contains(valid), "{err} lacks {valid}");
        }
    }
}

#[test]
fn unknown_backend_lists_the_valid_ones() {
    let err = reject(SMOL, "[engine]\nbackend = \"vllm\"\n");
    assert!(
        err.contains("pytorch") && err.contains("turbomind"),
        "{err}"
    );
}

#[test]
fn plugin_codecs_run_on_pytorch_only() {
    accept(SMOL, "[engine]\nquant_policy = \"fp8_e4m3\"\n");
    let err = reject(
        SMOL,
        "[engine]\nbackend = \"turbomind\"\nquant_policy = \"fp8_e4m3\"\n",
    );
    assert!(err.contains("pytorch"), "{err}");
}

#[test]
fn tp_must_divide_kv_heads() {
    let err = reject(SMOL, "[engine]\ntp = 2\n");
    assert!(
        err.contains("tp = 2") && err.contains("3 KV heads"),
        "{err}"
    );
}
