//! `kvq eval`: teacher-forced accuracy of every policy and backend against the fp16 cache on
//! one window of a text file.

use clap::Args;
use std::path::PathBuf;

use kvq::config::QuantPolicy;
use kvq::engine::load_model;
use kvq::eval::{evaluate, EvalRow};
use kvq::{EngineConfig, KvqError};

use super::args::EngineArgs;
use super::config_list::parse_configs;
use super::sweep_chart::{pareto_front, render, Point};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The text to evaluate on (UTF-8).
    #[arg(long)]
    pub text: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 2048)]
    pub ctx: usize,
    /// Tokens of the text to skip before the window.
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Configurations, comma-separated: BACKEND:POLICY (e.g. `pytorch:4`) or
    /// BACKEND:k=SIDE,v=SIDE[,rotate] (e.g. `pytorch:k=int4,v=lm3,rotate`). Default: every
    /// built-in policy on both backends, or the sweep set with --sweep.
    #[arg(long = "configs")]
    pub configs: Vec<String>,
    /// Sweep codecs for accuracy per bit: the default configurations become the sweep set,
    /// and the table marks the Pareto front (fewest bits for the mean KLD).
    #[arg(long)]
    pub sweep: bool,
    /// Write a chart of mean KLD (log scale) against bits per element to this SVG file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Instead of the KLD table: capture the model's queries and keys on the window and
    /// report each K codec's bias and spread of q·k̂ against the exact q·k (the residual-sign
    /// and QJL study). `--configs` picks K sides as `pytorch:k=SIDE,v=fp16[,rotate]`.
    #[arg(long)]
    pub qk_study: bool,
    /// With --qk-study: score every this-many-th query position against all keys it sees.
    #[arg(long, default_value_t = 8)]
    pub query_stride: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// The reference (pytorch fp16 cache) is always the first row.
const DEFAULT_CONFIGS: [&str; 6] = [
    "turbomind:0",
    "pytorch:8",
    "turbomind:8",
    "pytorch:4",
    "turbomind:4",
    "pytorch:42",
];

/// `--sweep` without `--configs`: the LMDeploy policies and the [cache] combinations.
const SWEEP_CONFIGS: [&str; 18] = [
    "pytorch:8",
    "pytorch:4",
    "pytorch:42",
    "pytorch:k=int8,v=int8,rotate",
    "pytorch:k=int4,v=int4,rotate",
    "pytorch:k=int8,v=int4,rotate",
    "pytorch:k=lm4,v=lm4",
    "pytorch:k=int4,v=lm3,rotate",
    "pytorch:k=tq3s,v=lm3",
    "pytorch:k=lm4,v=lm3u",
    "pytorch:k=lm4,v=lm2",
    "pytorch:k=lm4,v=lm2u",
    "pytorch:k=int4,v=lm2u,rotate",
    "pytorch:k=tqprod3,v=lm3",
    "pytorch:k=lm4,v=lm2u,window=4",
    "pytorch:k=lm4,v=lm2u,window=16",
    "pytorch:k=lm4,v=lm4,window=16",
    "pytorch:k=int4,v=lm4u,rotate,window=16",
];

pub fn run(a: EvalArgs) -> Result<(), KvqError> {
    let base = a.engine.load()?;
    let (_, model, tokenizer) = load_model(std::path::Path::new(&base.model.path), &mut |_| {})?;
    let text = std::fs::read_to_string(&a.text).map_err(|source| KvqError::Io {
        path: a.text.display().to_string(),
        source,
    })?;
    let all = tokenizer.encode(&text, false)?;
    if all.len() < a.offset + a.ctx {
        return Err(KvqError::InvalidArgument(format!(
            "{} has {} tokens; offset {} + ctx {} do not fit",
            a.text.display(),
            all.len(),
            a.offset,
            a.ctx
        )));
    }
    let tokens = &all[a.offset..a.offset + a.ctx];
    if a.qk_study {
        let (_, configs) = parse_configs(&base, &a.configs, &super::qk_study::DEFAULT_SIDES)?;
        return super::qk_study::run(&a, &model, tokens, &configs);
    }
    let reference = with(&base, "pytorch", QuantPolicy::Number(0));
    let defaults: &[&str] = if a.sweep {
        &SWEEP_CONFIGS
    } else {
        &DEFAULT_CONFIGS
    };
    let (_, configs) = parse_configs(&base, &a.configs, defaults)?;
    if !a.json {
        eprintln!(
            "kvq eval: {} tokens of {} (offset {}), reference: pytorch fp16 cache",
            tokens.len(),
            a.text.display(),
            a.offset
        );
        println!("{}", header());
    }
    let rows = evaluate(&model, &reference, &configs, tokens, &mut |r| {
        if !a.json {
            println!("{}", format_row(r));
        }
    })?;
    let points: Vec<Point> = rows[1..]
        .iter()
        .map(|r| Point {
            label: format!("{}:{}", r.backend, r.codec),
            bits: r.bits_per_element,
            kld: r.mean_kld,
        })
        .collect();
    let front = pareto_front(&points);
    if a.sweep && !a.json {
        println!("\nPareto front (bits/elem, mean KLD):");
        for &i in &front {
            println!(
                "  {:<36} {:>6.3} {:>10.5}",
                points[i].label, points[i].bits, points[i].kld
            );
        }
    }
    if let Some(path) = &a.svg {
        let title = format!(
            "KV-cache codecs: mean KLD vs bits, {} tokens of {}",
            tokens.len(),
            a.text
                .file_name()
                .map(|f| f.to_string_lossy())
                .unwrap_or_default()
        );
        std::fs::write(path, render(&title, &points)).map_err(|source| KvqError::Io {
            path: path.display().to_string(),
            source,
        })?;
        if !a.json {
            eprintln!("kvq eval: chart written to {}", path.display());
        }
    }
    if a.json {
        let j = serde_json::json!({
            "text": a.text.display().to_string(),
            "ctx": a.ctx,
            "offset": a.offset,
            "reference": "pytorch:0",
            "rows": rows[1..],
        });
        println!("{}", serde_json::to_string_pretty(&j).expect("json"));
    }
    Ok(())
}

fn with(base: &EngineConfig, backend: &str, policy: QuantPolicy) -> EngineConfig {
    let mut c = base.clone();
    c.engine.backend = backend.to_string();
    c.engine.quant_policy = policy;
    c.cache = None;
    c
}

fn header() -> String {
    format!(
        "{:<10} {:<16} {:>6} {:>9} {:>10} {:>10} {:>10} {:>8}",
        "backend", "codec", "bits", "KV B/tok", "ppl", "mean KLD", "p99 KLD", "top-1"
    )
}

fn format_row(r: &EvalRow) -> String {
    format!(
        "{:<10} {:<16} {:>6.3} {:>9} {:>10.4} {:>10.5} {:>10.5} {:>7.2}%",
        r.backend,
        r.codec,
        r.bits_per_element,
        r.kv_bytes_per_token,
        r.perplexity,
        r.mean_kld,
        r.p99_kld,
        100.0 * r.top1_agreement
    )
}
