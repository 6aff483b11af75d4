//! `kvq check-config` on fixture model configs: the plan it prints and the configs it refuses.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn kvq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvq"))
        .args(args)
        .output()
        .expect("run kvq")
}

fn plan_json(backend: &str, policy: &str) -> serde_json::Value {
    let model = fixture("smollm2-135m-config.json");
    let out = kvq(&[
        "check-config",
        "--model",
        &model,
        "--backend",
        backend,
        "--quant-policy",
        policy,
        "--budget-gib",
        "4",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn smollm2_block_ratios_match_the_byte_arithmetic() {
    // (policy, ratio without padding, bytes per token per layer per head)
    let cases = [("8", 1.882, 136), ("4", 3.556, 72), ("42", 4.741, 54)];
    for backend in ["pytorch", "turbomind"] {
        for (policy, want, bytes) in cases {
            if backend == "turbomind" && policy == "42" {
                continue;
            }
            let j = plan_json(backend, policy);
            let plan = &j["plan"];
            let unpadded = plan["ratio_to_fp16_unpadded"].as_f64().unwrap();
            let padded = plan["ratio_to_fp16"].as_f64().unwrap();
            assert!(
                (unpadded - want).abs() < 2e-3,
                "{backend} {policy}: {unpadded}"
            );
            // Padding can only cost capacity, and the planner must say how much.
            assert!(
                padded <= unpadded + 1e-9 && padded > 0.97 * unpadded,
                "{padded}"
            );
            let padding = j["block_padding"].as_u64().unwrap();
            assert_eq!(padding == 0, (padded - unpadded).abs() < 1e-9, "{j}");
            assert_eq!(j["bytes_per_token_per_layer_per_head"]["total"], bytes);
            let blocks = plan["num_blocks"].as_u64().unwrap();
            let fp16_blocks = plan["fp16_num_blocks"].as_u64().unwrap();
            let got = blocks as f64 / fp16_blocks as f64;
            assert!(
                (got - padded).abs() < 0.01,
                "block count ratio {got} vs {padded}"
            );
        }
    }
}

#[test]
fn text_output_names_backend_codec_and_capacity() {
    let model = fixture("smollm2-135m-config.json");
    let out = kvq(&[
        "check-config",
        "--model",
        &model,
        "--quant-policy",
        "int4",
        "--budget-gib",
        "1",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in [
        "backend      pytorch",
        "codec        int4 (quant_policy 4)",
        "blocks",
        "ratio",
    ] {
        assert!(text.contains(needle), "{text}");
    }
}

#[test]
fn every_invalid_config_exits_non_zero_with_the_reason() {
    let smol = fixture("smollm2-135m-config.json");
    let dsv2 = fixture("deepseek-v2-lite-config.json");
    let h96 = fixture("head96-config.json");
    let dir = std::env::temp_dir().join(format!("kvq-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec_toml = dir.join("spec.toml");
    std::fs::write(&spec_toml, format!("[model]\npath = {smol:?}\n[engine]\nquant_policy = 42\n[speculative]\nmethod = \"ngram\"\nnum_speculative_tokens = 2\n")).unwrap();
    let typo_toml = dir.join("typo.toml");
    std::fs::write(&typo_toml, "[engine]\nblok_size = 64\n").unwrap();
    let spec_toml = spec_toml.display().to_string();
    let typo_toml = typo_toml.display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--model",
                &smol,
                "--backend",
                "turbomind",
                "--quant-policy",
                "42",
            ],
            "pytorch",
        ),
        (vec!["--model", &dsv2, "--quant-policy", "42"], "MLA"),
        (vec![&spec_toml], "speculative"),
        (
            vec!["--model", &h96, "--quant-policy", "42"],
            "power of two",
        ),
        (
            vec!["--model", &smol, "--quant-policy", "int3"],
            "valid values",
        ),
        (
            vec!["--model", &smol, "--cache-max-entry-count", "1.5"],
            "(0, 1]",
        ),
        (vec!["--model", &smol, "--block-size", "0"], "power of two"),
        (vec!["--model", &smol, "--block-size", "48"], "power of two"),
        (vec![&typo_toml], "blok_size"),
        (
            vec!["--model", "/nonexistent/model.gguf"],
            "/nonexistent/model.gguf",
        ),
    ];
    for (args, needle) in cases {
        let mut full = vec!["check-config"];
        full.extend(args.iter().copied());
        let out = kvq(&full);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{full:?} succeeded");
        assert!(err.contains(needle), "{full:?}: {err}");
    }
}

/// `--kv-k/--kv-v/--kv-rotate` build a [cache] codec whose asymmetric sizes reach the plan;
/// incomplete or conflicting flags are refused with the reason.
#[test]
fn cache_side_flags_plan_asymmetric_sizes_or_are_refused() {
    let model = fixture("smollm2-135m-config.json");
    let out = kvq(&[
        "check-config",
        "--model",
        &model,
        "--kv-k",
        "int4",
        "--kv-v",
        "lm3",
        "--kv-rotate",
        "--budget-gib",
        "4",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    // K 32 + 4, V 24 + 2 bytes per token per layer per head at D = 64.
    assert_eq!(j["bytes_per_token_per_layer_per_head"]["total"], 62, "{j}");
    let text = j.to_string();
    assert!(text.contains("k:int4r+v:lm3"), "{text}");
    for (args, needle) in [
        (vec!["--kv-k", "int4"], "give both --kv-k and --kv-v"),
        (vec!["--kv-k", "int4", "--kv-v", "lm5"], "lm5"),
        (
            vec!["--kv-k", "int4", "--kv-v", "lm3", "--quant-policy", "8"],
            "both choose the KV codec",
        ),
        (
            vec!["--kv-k", "lm4", "--kv-v", "lm3", "--device", "cuda"],
            "no GPU kernel",
        ),
        (
            vec!["--kv-k", "lm4", "--kv-v", "lm3", "--backend", "turbomind"],
            "only the pytorch backend",
        ),
    ] {
        let mut full = vec!["check-config", "--model", &model];
        full.extend(args.iter().copied());
        let out = kvq(&full);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
