//! `kvq eval --sweep --svg` as a process: a tiny sweep prints every configuration, marks the
//! Pareto front, and writes a well-formed SVG with every point labelled.

use std::process::Command;

/// Checks that `text` is well-formed XML as far as an SVG writer can get it wrong: every tag
/// closes in order, attribute quotes balance, and no bare `&` or `<` appears in text.
fn assert_well_formed_xml(text: &str) {
    let body = text
        .strip_prefix("<?xml")
        .and_then(|t| t.split_once("?>"))
        .map(|(_, rest)| rest)
        .expect("XML declaration");
    let mut stack: Vec<String> = Vec::new();
    let mut rest = body;
    while let Some(lt) = rest.find('<') {
        let text_part = &rest[..lt];
        assert!(!text_part.contains('>'), "stray > in {text_part:?}");
        for (i, _) in text_part.match_indices('&') {
            let ent = &text_part[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| ent.starts_with(e)),
                "bare & in {text_part:?}"
            );
        }
        let gt = rest[lt..].find('>').expect("unclosed tag") + lt;
        let tag = &rest[lt + 1..gt];
        assert_eq!(
            tag.matches('"').count() % 2,
            0,
            "unbalanced quotes in <{tag}>"
        );
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.trim()),
                "mismatched </{name}>"
            );
        } else if !tag.ends_with('/') {
            let name = tag.split_whitespace().next().expect("tag name");
            stack.push(name.to_string());
        }
        rest = &rest[gt + 1..];
    }
    assert!(rest.trim().is_empty(), "text after the root: {rest:?}");
    assert!(stack.is_empty(), "unclosed tags {stack:?}");
}

#[test]
fn tiny_sweep_prints_the_table_and_writes_a_chart_with_every_point() {
    let Some(model) = engine_core::testing::default_model() else {
        return;
    };
    let svg = std::env::temp_dir().join(format!("kvq-sweep-{}.svg", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_kvq"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["eval", "--model", &model.display().to_string()])
        .args(["--text", "texts/gpl-3.0.txt", "--ctx", "24", "--sweep"])
        .args([
            "--configs",
            "pytorch:4,pytorch:k=int4,v=lm3,rotate,pytorch:k=lm4,v=lm2u",
            "--svg",
        ])
        .arg(&svg)
        .output()
        .expect("run kvq eval");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let labels = ["int4", "k:int4r+v:lm3", "k:lm4+v:lm2u"];
    for l in labels {
        assert!(
            stdout
                .lines()
                .any(|line| line.split_whitespace().nth(1) == Some(l)),
            "no row for {l}:\n{stdout}"
        );
    }
    assert!(stdout.contains("Pareto front"), "{stdout}");
    let text = std::fs::read_to_string(&svg).expect("SVG written");
    std::fs::remove_file(&svg).ok();
    assert_well_formed_xml(&text);
    for l in labels {
        let circle_title = format!("<title>pytorch:{l} ");
        assert!(text.contains(&circle_title), "SVG lacks the point {l}");
        assert!(
            text.contains(&format!(">pytorch:{l}</text>")),
            "SVG lacks the label {l}"
        );
    }
    assert!(text.contains("<polyline"), "Pareto front line");
}

#[test]
fn bad_sweep_entries_are_clear_errors() {
    let Some(model) = engine_core::testing::default_model() else {
        return;
    };
    for (configs, needle) in [
        ("pytorch:k=int3,v=int4", "int3"),
        ("pytorch:k=int4,v=int4,rotat", "unknown item `rotat`"),
        ("pytorch:k=int4", "give both --kv-k and --kv-v"),
        ("turbomind:k=int4,v=int4", "only the pytorch backend"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kvq"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["eval", "--model", &model.display().to_string()])
            .args([
                "--text",
                "texts/gpl-3.0.txt",
                "--ctx",
                "8",
                "--configs",
                configs,
            ])
            .output()
            .expect("run kvq eval");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{configs} accepted");
        assert!(err.contains(needle), "{configs}: {err}");
        assert!(!err.contains("panicked"), "{configs}: {err}");
    }
}
