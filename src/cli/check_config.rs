//! `kvq check-config`: validates a config against its model's metadata (no weights are
//! loaded) and prints the resolved backend, codec, bytes per token and block plan.

use clap::Args;
use std::path::Path;

use kvq::cache::MemoryPlan;
use kvq::plan::ResolvedConfig;
use kvq::{KvqError, ModelSpec};

use super::args::EngineArgs;

#[derive(Args, Debug)]
pub struct CheckConfigArgs {
    /// The TOML config to check (same as --config).
    pub config_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Memory budget in GiB to plan the cache for.
    #[arg(long = "budget-gib")]
    pub budget_gib: Option<f64>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(mut a: CheckConfigArgs) -> Result<(), KvqError> {
    if a.config_file.is_some() {
        a.engine.config = a.config_file.take();
    }
    let cfg = a.engine.load()?;
    let spec = ModelSpec::from_path(Path::new(&cfg.model.path))?;
    let resolved = ResolvedConfig::new(&spec, &cfg)?;
    let budget = a
        .budget_gib
        .or(cfg.engine.cache_memory_gib)
        .map(|g| {
            if g > 0.0 && g.is_finite() {
                Ok((g * (1u64 << 30) as f64) as u64)
            } else {
                Err(KvqError::Config(kvq::ConfigError::OutOfRange {
                    key: "--budget-gib",
                    value: g.to_string(),
                    expected: "must be a positive number of GiB".into(),
                }))
            }
        })
        .transpose()?;
    let plan = budget.map(|b| resolved.plan(b, &cfg));
    if a.json {
        let j = serde_json::json!({
            "model": cfg.model.path,
            "spec": spec,
            "backend": resolved.backend.name(),
            "codec": resolved.codec_name(),
            "policy": resolved.codec.policy(),
            "bytes_per_token_per_layer_per_head": resolved.token_bytes(),
            "block_bytes": resolved.block_bytes(),
            "block_padding": resolved.block_padding(),
            "bits_per_element": resolved.bits_per_element(),
            "recent_window": {
                "tokens": resolved.recent_window,
                "bytes_per_sequence": resolved.recent_window_bytes(),
                "bits_per_element_at_session_len": resolved.bits_at(cfg.engine.session_len),
            },
            "layer_groups": resolved.layer_groups().iter().map(|g| serde_json::json!({
                "layers": [g.layers.start, g.layers.end],
                "codec": g.codec.name(),
                "bits_per_element": g.codec.bits_per_element(),
                "block_bytes": g.layout.block_bytes(),
            })).collect::<Vec<_>>(),
            "plan": plan,
        });
        println!("{}", serde_json::to_string_pretty(&j).expect("json"));
        return Ok(());
    }
    print_text(
        &cfg.model.path,
        &spec,
        &resolved,
        plan.as_ref(),
        cfg.engine.session_len,
    );
    Ok(())
}

fn print_text(
    model: &str,
    spec: &ModelSpec,
    r: &ResolvedConfig,
    plan: Option<&MemoryPlan>,
    session_len: usize,
) {
    let t = r.token_bytes();
    println!("config OK");
    println!("model        {model}");
    println!(
        "shape        {} layers, {} heads, {} KV heads, head_dim {}/{} ({:?})",
        spec.num_layers,
        spec.num_heads,
        spec.num_kv_heads,
        spec.head_dim_k,
        spec.head_dim_v,
        spec.attention
    );
    println!("backend      {}", r.backend.name());
    let policy = r
        .codec
        .policy()
        .map(|p| format!(" (quant_policy {p})"))
        .unwrap_or_default();
    println!("codec        {}{policy}", r.codec_name());
    println!(
        "per token, per layer, per KV head: K {} + {} meta, V {} + {} meta = {} bytes (fp16: {}), {:.3} bits/element",
        t.k_data, t.k_meta, t.v_data, t.v_meta, t.total, t.fp16_total, t.bits_per_element
    );
    let groups = r.layer_groups();
    if groups.len() > 1 {
        for g in &groups {
            let (k, v) = (g.layout.k, g.layout.v);
            println!(
                "layers       {:>2}..{:<2} {}: K {} + {} meta, V {} + {} meta bytes, {:.3} bits/element",
                g.layers.start,
                g.layers.end,
                g.codec.name(),
                k.data,
                k.meta,
                v.data,
                v.meta,
                g.codec.bits_per_element()
            );
        }
    }
    println!(
        "block        {} tokens, {} bytes over {} layers ({} bytes alignment padding)",
        r.layout.block_size,
        r.block_bytes(),
        r.layout.num_layers,
        r.block_padding()
    );
    if r.recent_window > 0 {
        println!(
            "window       last {} tokens per sequence at the model dtype: {} bytes each; \
             {:.3} bits/element at session_len {}",
            r.recent_window,
            r.recent_window_bytes(),
            r.bits_at(session_len),
            session_len
        );
    }
    if let Some(p) = plan {
        println!(
            "budget       {:.3} GiB for the cache ({} bytes)",
            p.cache_bytes as f64 / (1u64 << 30) as f64,
            p.cache_bytes
        );
        println!(
            "blocks       {} ({} tokens); fp16 cache: {} blocks",
            p.num_blocks, p.token_capacity, p.fp16_num_blocks
        );
        println!(
            "ratio        {:.3}x the fp16 cache ({:.3}x without padding)",
            p.ratio_to_fp16, p.ratio_to_fp16_unpadded
        );
    }
}
