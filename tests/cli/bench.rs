//! `kvq bench generate` as a process: a short run prints JSON with every configuration's
//! speeds, and bad arguments are refused.

use std::process::Command;

fn model() -> Option<String> {
    engine_core::testing::default_model().map(|p| p.display().to_string())
}

#[test]
fn short_run_reports_every_configuration_as_json() {
    let Some(model) = model() else { return };
    let out = Command::new(env!("CARGO_BIN_EXE_kvq"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["bench", "generate", "--model", &model])
        .args([
            "--configs",
            "pytorch:0,turbomind:8",
            "--prompt-tokens",
            "16",
        ])
        .args(["--new-tokens", "5", "--runs", "1", "--json"])
        .output()
        .expect("run kvq bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(
        (j["prompt_tokens"].as_u64(), j["new_tokens"].as_u64()),
        (Some(16), Some(5))
    );
    let rows = j["kvq"].as_array().expect("kvq rows");
    let names: Vec<(&str, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["backend"].as_str().unwrap(),
                r["policy"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(names, [("pytorch", 0), ("turbomind", 8)]);
    for r in rows {
        for k in ["prefill_tok_s", "decode_tok_s"] {
            assert!(r[k].as_f64().is_some_and(|v| v > 0.0), "{k}: {r}");
        }
        // EOS is ignored: every run generates all the tokens asked for.
        assert!(r["first_tokens"].as_array().unwrap().len() == 5, "{r}");
    }
    assert!(j["llama_cpp"].is_null());
}

#[test]
fn bad_arguments_are_refused() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kvq"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["bench", "generate"])
            .args(args)
            .output()
            .expect("run kvq bench")
    };
    let out = run(&["--runs", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--runs"));
    let out = run(&["--configs", "pytorch"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("BACKEND:POLICY"));
}
