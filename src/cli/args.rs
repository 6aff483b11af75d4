//! Engine flags with LMDeploy's spelling; each overrides the same key of the TOML file.

use clap::Args;
use std::path::PathBuf;

use kvq::config::{CacheSection, DtypeChoice, QuantPolicy, SideKind, SpeculativeSection};
use kvq::{EngineConfig, KvqError};

#[derive(Args, Debug, Clone, Default)]
pub struct EngineArgs {
    /// TOML config file; flags below override its keys.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model: a GGUF file, an HF directory, or an HF config.json (metadata only).
    #[arg(long = "model", alias = "model-path")]
    pub model: Option<String>,
    /// "pytorch" or "turbomind".
    #[arg(long)]
    pub backend: Option<String>,
    /// 0, 4, 8, 42, or a codec name ("none", "int8", "int4", "turbo_quant", a plugin's).
    #[arg(long = "quant-policy")]
    pub quant_policy: Option<String>,
    /// "auto", "cpu", "cuda" or "cuda:N".
    #[arg(long)]
    pub device: Option<String>,
    /// "auto", "float16", "bfloat16" or "float32".
    #[arg(long)]
    pub dtype: Option<String>,
    /// Fraction of free memory for the KV cache, in (0, 1].
    #[arg(long = "cache-max-entry-count")]
    pub cache_max_entry_count: Option<f64>,
    /// Explicit KV-cache budget in GiB.
    #[arg(long = "cache-memory-gib")]
    pub cache_memory_gib: Option<f64>,
    /// Tokens per cache block (a power of two).
    #[arg(long = "block-size", alias = "cache-block-seq-len")]
    pub block_size: Option<usize>,
    #[arg(long = "max-batch-size")]
    pub max_batch_size: Option<usize>,
    #[arg(long = "session-len")]
    pub session_len: Option<usize>,
    #[arg(long)]
    pub tp: Option<usize>,
    /// Keep each sequence's last N tokens at the model dtype beside the quantized cache; every
    /// position reads them instead of the codec's bytes (engine.recent_window).
    #[arg(long = "recent-window")]
    pub recent_window: Option<usize>,
    /// Reuse the cache blocks of prompt prefixes earlier requests computed
    /// (engine.enable_prefix_caching).
    #[arg(long = "enable-prefix-caching")]
    pub enable_prefix_caching: bool,
    /// Speculative decoding with n-gram (prompt lookup) drafts: draft tokens verified per
    /// decoding request and step (1..=16; 0 turns off a `[speculative]` section of the
    /// config). Outputs are unchanged; acceptance is reported. Not with pytorch policy 42.
    #[arg(
        long = "speculative-num-draft-tokens",
        alias = "speculative-num-tokens",
        alias = "num-speculative-tokens"
    )]
    pub speculative_num_draft_tokens: Option<usize>,
    /// K side of a [cache] codec: fp16, int8, int4, tq3s, lm2, lm3, lm4, tqprod3.
    #[arg(long = "kv-k")]
    pub kv_k: Option<String>,
    /// V side of a [cache] codec (same names as --kv-k).
    #[arg(long = "kv-v")]
    pub kv_v: Option<String>,
    /// Store int8/int4 sides in the Hadamard domain ([cache] rotate = true).
    #[arg(long = "kv-rotate")]
    pub kv_rotate: bool,
}

impl EngineArgs {
    /// The config file (or the defaults) with every given flag applied, validated.
    pub fn load(&self) -> Result<EngineConfig, KvqError> {
        let mut cfg = match &self.config {
            Some(p) => EngineConfig::from_toml_file(p)?,
            None => EngineConfig::default(),
        };
        let e = &mut cfg.engine;
        if let Some(m) = &self.model {
            cfg.model.path = m.clone();
        }
        if let Some(b) = &self.backend {
            e.backend = b.clone();
        }
        if let Some(p) = &self.quant_policy {
            e.quant_policy = match p.parse::<i64>() {
                Ok(n) => QuantPolicy::Number(n),
                Err(_) => QuantPolicy::Name(p.clone()),
            };
        }
        if let Some(d) = &self.device {
            e.device = d.clone();
        }
        if let Some(d) = &self.dtype {
            e.dtype = parse_dtype(d)?;
        }
        if let Some(v) = self.cache_max_entry_count {
            e.cache_max_entry_count = v;
        }
        if let Some(v) = self.cache_memory_gib {
            e.cache_memory_gib = Some(v);
        }
        if let Some(v) = self.block_size {
            e.block_size = v;
        }
        if let Some(v) = self.max_batch_size {
            e.max_batch_size = v;
        }
        if let Some(v) = self.session_len {
            e.session_len = v;
        }
        if let Some(v) = self.tp {
            e.tp = v;
        }
        if let Some(v) = self.recent_window {
            e.recent_window = v;
        }
        if self.enable_prefix_caching {
            e.enable_prefix_caching = true;
        }
        match self.speculative_num_draft_tokens {
            Some(0) => cfg.speculative = None,
            Some(n) => {
                cfg.speculative = Some(SpeculativeSection {
                    method: "ngram".into(),
                    num_speculative_tokens: n,
                })
            }
            None => {}
        }
        apply_cache_flags(
            &mut cfg,
            self.kv_k.as_deref(),
            self.kv_v.as_deref(),
            self.kv_rotate,
        )?;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `--kv-k`, `--kv-v`, `--kv-rotate` over the file's [cache] section (a new section needs
/// both sides).
pub fn apply_cache_flags(
    cfg: &mut EngineConfig,
    k: Option<&str>,
    v: Option<&str>,
    rotate: bool,
) -> Result<(), KvqError> {
    if k.is_none() && v.is_none() && !rotate {
        return Ok(());
    }
    let side = |key: &'static str, s: &str| {
        SideKind::parse(s).map_err(|expected| kvq::ConfigError::OutOfRange {
            key,
            value: format!("\"{s}\""),
            expected,
        })
    };
    let k = k.map(|s| side("--kv-k", s)).transpose()?;
    let v = v.map(|s| side("--kv-v", s)).transpose()?;
    let cache = match (cfg.cache.take(), k, v) {
        (Some(c), k, v) => CacheSection {
            k: k.unwrap_or(c.k),
            v: v.unwrap_or(c.v),
            rotate: c.rotate || rotate,
            edge: c.edge,
        },
        (None, Some(k), Some(v)) => CacheSection {
            k,
            v,
            rotate,
            edge: None,
        },
        (None, _, _) => return Err(KvqError::InvalidArgument(
            "--kv-k, --kv-v and --kv-rotate build a [cache] codec: give both --kv-k and --kv-v \
                 (or a config file with a [cache] section)"
                .into(),
        )),
    };
    cfg.cache = Some(cache);
    Ok(())
}

fn parse_dtype(s: &str) -> Result<DtypeChoice, KvqError> {
    toml::Value::String(s.to_string()).try_into().map_err(|_| {
        kvq::ConfigError::OutOfRange {
            key: "engine.dtype",
            value: format!("\"{s}\""),
            expected: "one of \"auto\", \"float16\", \"bfloat16\", \"float32\"".into(),
        }
        .into()
    })
}

/// Sampling flags shared by `generate` and `chat`.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    #[arg(long = "max-new-tokens", default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long = "top-k", default_value_t = 0)]
    pub top_k: usize,
    #[arg(long = "top-p", default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long = "repetition-penalty", default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Subtracted from the logit of every token already generated (-2 to 2).
    #[arg(
        long = "presence-penalty",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub presence_penalty: f32,
    /// Subtracted from a generated token's logit once per time it was generated (-2 to 2).
    #[arg(
        long = "frequency-penalty",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub frequency_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating past the end-of-sequence token, up to --max-new-tokens.
    #[arg(long = "ignore-eos")]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    pub fn params(&self) -> kvq::sampling::SamplingParams {
        kvq::sampling::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logprobs: None,
            prompt_logprobs: None,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
            ignore_eos: self.ignore_eos,
        }
    }
}
