//! `kvq bench throughput` as a process: a tiny closed-loop and a tiny Poisson run report
//! every configuration with sane figures, and bad arguments are refused.

use std::process::{Command, Output};

fn model() -> Option<String> {
    engine_core::testing::default_model().map(|p| p.display().to_string())
}

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvq"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["bench", "throughput"])
        .args(args)
        .output()
        .expect("run kvq bench throughput")
}

/// Checks one configuration's figures: everything completed, rates positive, p50 ≤ p99.
fn check_row(r: &serde_json::Value, num_prompts: u64) {
    assert_eq!(r["completed"].as_u64(), Some(num_prompts), "{r}");
    for k in [
        "requests_per_s",
        "input_tok_s",
        "output_tok_s",
        "duration_s",
    ] {
        assert!(r[k].as_f64().is_some_and(|v| v > 0.0), "{k}: {r}");
    }
    for k in ["ttft_ms", "tpot_ms", "itl_ms"] {
        let s = &r[k];
        let (mean, p50, p99) = (
            s["mean"].as_f64().unwrap(),
            s["p50"].as_f64().unwrap(),
            s["p99"].as_f64().unwrap(),
        );
        assert!(mean >= 0.0 && p50 >= 0.0 && p50 <= p99, "{k}: {s}");
        assert!(s["count"].as_u64().unwrap() > 0, "{k}: {s}");
    }
    assert!(r["ttft_ms"]["p50"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["num_blocks"].as_u64().unwrap() >= 2);
    assert!(r["peak_running"].as_u64().unwrap() >= 1);
    assert!(r["preemptions"].as_u64().is_some());
}

#[test]
fn a_closed_loop_run_reports_every_configuration() {
    let Some(model) = model() else { return };
    let out = bench(&[
        "--model",
        &model,
        "--configs",
        "pytorch:0,turbomind:8",
        "--num-prompts",
        "6",
        "--concurrency",
        "3",
        "--length-scale",
        "0.05",
        "--session-len",
        "128",
        "--cache-memory-gib",
        "0.01",
        "--speculative-num-draft-tokens",
        "3",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(j["num_prompts"].as_u64(), Some(6));
    assert_eq!(j["mode"]["concurrency"].as_u64(), Some(3));
    let rows = j["configs"].as_array().expect("configs");
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
    // Outputs ignore EOS: every row generated exactly the drawn output tokens.
    let output_tokens = j["output_tokens"].as_f64().unwrap();
    for r in rows {
        check_row(r, 6);
        let generated = r["output_tok_s"].as_f64().unwrap() * r["duration_s"].as_f64().unwrap();
        assert!(
            (generated - output_tokens).abs() < 1e-6 * output_tokens + 1e-6,
            "{r}"
        );
        assert_eq!(r["speculative"]["num_draft_tokens"].as_u64(), Some(3));
        assert!(r["speculative"]["drafted"].as_u64().unwrap() > 0, "{r}");
    }
    // int8 holds more tokens in the same budget.
    assert!(rows[1]["token_capacity"].as_u64() > rows[0]["token_capacity"].as_u64());
}

#[test]
fn a_poisson_run_prints_a_table() {
    let Some(model) = model() else { return };
    let out = bench(&[
        "--model",
        &model,
        "--configs",
        "pytorch:4",
        "--num-prompts",
        "4",
        "--request-rate",
        "20",
        "--length-scale",
        "0.05",
        "--session-len",
        "128",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Poisson arrivals at 20 requests/s"), "{text}");
    for col in [
        "req/s",
        "out tok/s",
        "TTFT ms mean/p50/p99",
        "ITL ms",
        "preempt",
    ] {
        assert!(text.contains(col), "{col} in {text}");
    }
    let row = text.lines().last().unwrap();
    assert!(row.starts_with("pytorch") && row.contains("int4"), "{row}");
}

#[test]
fn bad_arguments_are_refused() {
    let out = bench(&["--num-prompts", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--num-prompts"));
    let out = bench(&["--concurrency", "2", "--request-rate", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
    let out = bench(&["--request-rate", "-1"]);
    assert!(!out.status.success());
    let out = bench(&["--configs", "pytorch"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("BACKEND:POLICY"));
    if model().is_some() {
        // Refused before any configuration runs.
        let out = bench(&[
            "--configs",
            "pytorch:0,pytorch:42",
            "--speculative-num-draft-tokens",
            "2",
        ]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("pytorch:42") && err.contains("speculative"),
            "{err}"
        );
        assert!(!err.contains("pytorch:0:"), "nothing ran: {err}");
    }
}

#[test]
fn random_weights_of_a_shape_run_and_a_shape_too_big_is_refused() {
    let out = bench(&[
        "--model-shape",
        "smollm2-135m",
        "--random-weights",
        "--configs",
        "turbomind:4",
        "--num-prompts",
        "3",
        "--length-scale",
        "0.03",
        "--session-len",
        "128",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert!(
        j["model"].as_str().unwrap().contains("random weights"),
        "{j}"
    );
    check_row(&j["configs"][0], 3);
    // Llama 3 8B's f32 weights (29.9 GiB) are refused here unless the machine has the
    // memory for them.
    let available = kvq::engine::available_memory_bytes();
    if available / 4 * 3 < 32_200_000_000 {
        let out = bench(&["--model-shape", "llama3-8b", "--random-weights"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("29.9 GiB") && err.contains("--model-shape"),
            "{err}"
        );
    }
    // For a GPU the host holds them in f16: Llama 3 70B's 131.4 GiB.
    if available / 4 * 3 < 141_200_000_000 {
        let args = ["--model-shape", "llama3-70b", "--random-weights"];
        let out = bench(&[&args[..], &["--device", "cuda", "--tp", "2"]].concat());
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("random f16 weights") && err.contains("131.4 GiB"),
            "{err}"
        );
    }
    let out = bench(&["--model-shape", "llama3-8b"]);
    assert!(
        !out.status.success(),
        "--model-shape needs --random-weights"
    );
}
