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

const EDGE: &str = "[cache]\nk = \"int4\"\nv = \"lm2u\"\nrotate = true\n[cache.edge]\n";

#[test]
fn edge_layers_split_the_cache_into_groups_and_weight_the_bits() {
    let spec = fixture_spec(SMOL);
    let n = spec.num_layers;
    let r = ResolvedConfig::new(
        &spec,
        &config(&format!(
            "{EDGE}first = 1\nlast = 2\nk = \"int8\"\nv = \"int8\"\n"
        )),
    )
    .unwrap();
    let groups = r.layer_groups();
    let ranges: Vec<_> = groups.iter().map(|g| g.layers.clone()).collect();
    assert_eq!(ranges, [0..1, 1..n - 2, n - 2..n]);
    let names: Vec<_> = groups.iter().map(|g| g.codec.name().to_string()).collect();
    assert_eq!(
        names,
        ["k:int8r+v:int8r", "k:int4r+v:lm2u", "k:int8r+v:int8r"]
    );
    assert_eq!(r.codec_name(), "k:int4r+v:lm2u|edge1/2:k:int8r+v:int8r");
    let (edge, main) = (
        groups[0].codec.bits_per_element(),
        r.codec.bits_per_element(),
    );
    let want = (3.0 * edge + (n - 3) as f64 * main) / n as f64;
    assert!((r.bits_per_element() - want).abs() < 1e-9);
    assert_eq!(
        r.block_bytes(),
        groups.iter().map(|g| g.layout.block_bytes()).sum::<usize>()
    );
    let plan = r.plan_exact(1 << 26);
    assert_eq!(plan.num_blocks, (1 << 26) / r.block_bytes());
    assert_eq!(r.new_cache(2).as_bytes().len(), 2 * r.block_bytes());
    // Only first layers: two groups.
    let r = ResolvedConfig::new(
        &spec,
        &config(&format!("{EDGE}first = 2\nk = \"fp16\"\nv = \"fp16\"\n")),
    )
    .unwrap();
    assert_eq!(r.layer_groups().len(), 2);
}

#[test]
fn bad_edge_layers_are_refused_with_the_rule() {
    let cases = [
        (
            format!("{EDGE}k = \"int8\"\nv = \"int8\"\n"),
            "at least one edge layer",
        ),
        (
            format!("{EDGE}first = 20\nlast = 10\nk = \"int8\"\nv = \"int8\"\n"),
            "fewer edge layers",
        ),
        (
            format!("[engine]\ndevice = \"cuda\"\n{EDGE}first = 1\nk = \"int8\"\nv = \"int8\"\n"),
            "device = \"cpu\"",
        ),
    ];
    for (toml, needle) in cases {
        let err = reject(SMOL, &toml);
        assert!(err.contains(needle), "{toml}: {err}");
    }
    let err = reject(
        SMOL,
        &format!(
            "[engine]\nbackend = \"turbomind\"\n{EDGE}first = 1\nk = \"int8\"\nv = \"int8\"\n"
        ),
    );
    assert!(err.contains("pytorch"), "{err}");
}
