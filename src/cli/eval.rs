//! `kvq eval`: teacher-forced accuracy of every policy and backend against the fp16 cache on
//! one window of a text file.

use clap::Args;
use std::path::PathBuf;

use kvq::config::QuantPolicy;
use kvq::engine::load_model;
use kvq::eval::{evaluate, EvalRow};
use kvq::{EngineConfig, KvqError};

use super::args::EngineArgs;

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
    /// Configurations as BACKEND:POLICY (default: every built-in policy on both backends).
    #[arg(long = "configs", value_delimiter = ',')]
    pub configs: Vec<String>,
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
    let reference = with(&base, "pytorch", QuantPolicy::Number(0));
    let specs: Vec<String> = if a.configs.is_empty() {
        DEFAULT_CONFIGS.iter().map(|s| s.to_string()).collect()
    } else {
        a.configs.clone()
    };
    let configs = specs
        .iter()
        .map(|s| parse_config(&base, s))
        .collect::<Result<Vec<_>, _>>()?;
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
    c
}

fn parse_config(base: &EngineConfig, s: &str) -> Result<EngineConfig, KvqError> {
    let (backend, policy) = s.split_once(':').ok_or_else(|| {
        KvqError::InvalidArgument(format!("--configs entry `{s}` is not BACKEND:POLICY"))
    })?;
    let policy = match policy.parse::<i64>() {
        Ok(n) => QuantPolicy::Number(n),
        Err(_) => QuantPolicy::Name(policy.to_string()),
    };
    let c = with(base, backend, policy);
    c.validate()?;
    Ok(c)
}

fn header() -> String {
    format!(
        "{:<10} {:<12} {:>6} {:>9} {:>10} {:>10} {:>10} {:>8}",
        "backend", "codec", "bits", "KV B/tok", "ppl", "mean KLD", "p99 KLD", "top-1"
    )
}

fn format_row(r: &EvalRow) -> String {
    format!(
        "{:<10} {:<12} {:>6.3} {:>9} {:>10.4} {:>10.5} {:>10.5} {:>7.2}%",
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
