//! A codec from outside the backend crates, selected by name from TOML, runs attention.

use engine_core::plan::ResolvedConfig;
use engine_core::testing;
use kvq_integration_tests::{config, fixture_spec};

#[test]
fn fp8_plugin_is_selected_by_name_and_runs_attention() {
    let spec = fixture_spec("smollm2-135m-config.json");
    let cfg = config("[engine]\nbackend = \"pytorch\"\nquant_policy = \"fp8_e4m3\"\n");
    let r = ResolvedConfig::new(&spec, &cfg).unwrap();
    assert_eq!(r.codec.name(), "fp8_e4m3");
    let fp16_cfg = config("[engine]\nbackend = \"pytorch\"\nquant_policy = 0\n");
    let fp16 = ResolvedConfig::new(&spec, &fp16_cfg).unwrap().codec;

    let seed = testing::fresh_seed("fp8 plugin attention");
    testing::check_attention_matches_decoded_reference(r.backend.as_ref(), r.codec.clone(), seed);
    let (min, mean) =
        testing::attention_cosine_vs_fp16(r.backend.as_ref(), r.codec.clone(), fp16, seed);
    eprintln!("fp8_e4m3 attention cosine vs fp16: min {min:.5}, mean {mean:.5}");
    assert!(min >= 0.995 && mean >= 0.998, "min {min}, mean {mean}");
}

#[test]
fn planner_sizes_plugin_blocks_from_its_bytes() {
    let spec = fixture_spec("smollm2-135m-config.json");
    let cfg = config("[engine]\nquant_policy = \"fp8_e4m3\"\n");
    let r = ResolvedConfig::new(&spec, &cfg).unwrap();
    let t = r.token_bytes();
    assert_eq!((t.k_data, t.k_meta, t.v_data, t.v_meta), (64, 2, 64, 2));
}
