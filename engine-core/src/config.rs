//! `EngineConfig`: the TOML file a user writes, with LMDeploy's key names. Unknown keys are
//! errors; values are range-checked by [`EngineConfig::validate`]. Backend-specific rules
//! (which policy runs where) belong to the backends' `validate`.

use serde::{Deserialize, Serialize};
use std::path::Path;

pub use crate::cache_section::{CacheSection, EdgeLayers, SideKind};
use crate::codec::registered_codec_names;
use crate::dtype::KvDtype;
use crate::error::{ConfigError, KvqError};

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub engine: EngineSection,
    /// Separate K and V codecs; replaces `quant_policy` (see [`CacheSection`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSection>,
    /// Present only when speculative decoding is wanted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speculative: Option<SpeculativeSection>,
}

/// `[model]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A GGUF file or an HF directory (config.json, *.safetensors, tokenizer.json).
    pub path: String,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: "models/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
        }
    }
}

/// `[engine]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// `"pytorch"` or `"turbomind"` (or any registered backend).
    pub backend: String,
    pub quant_policy: QuantPolicy,
    /// `"auto"`, `"cpu"`, `"cuda"` or `"cuda:N"`.
    pub device: String,
    /// Model and metadata dtype: `"auto"` takes the model's own (f16 for GGUF).
    pub dtype: DtypeChoice,
    /// Fraction of free memory given to the KV cache, as in LMDeploy; in (0, 1].
    pub cache_max_entry_count: f64,
    /// Explicit KV-cache budget in GiB; overrides the fraction when set.
    pub cache_memory_gib: Option<f64>,
    /// Tokens per cache block; a power of two.
    pub block_size: usize,
    pub max_batch_size: usize,
    /// Longest prompt plus generation, in tokens.
    pub session_len: usize,
    /// Tensor-parallel degree.
    pub tp: usize,
    /// Each sequence's most recent tokens kept at the model dtype next to the quantized cache:
    /// every position reads its last `recent_window` tokens from there instead of through the
    /// codec (the previous tokens carry most of a low-bit codec's loss). 0 turns it off.
    pub recent_window: usize,
    /// Reuse the cache blocks of a prompt prefix an earlier request computed (LMDeploy's and
    /// vLLM's automatic prefix caching): full blocks are indexed by their token prefix and
    /// kept, when no request holds them, until their room is needed.
    pub enable_prefix_caching: bool,
}

impl Default for EngineSection {
    fn default() -> Self {
        Self {
            backend: "pytorch".into(),
            quant_policy: QuantPolicy::Number(0),
            device: "auto".into(),
            dtype: DtypeChoice::Auto,
            cache_max_entry_count: 0.8,
            cache_memory_gib: None,
            block_size: 64,
            max_batch_size: 128,
            session_len: 8192,
            tp: 1,
            recent_window: 0,
            enable_prefix_caching: false,
        }
    }
}

/// Largest `engine.recent_window`.
pub const MAX_RECENT_WINDOW: usize = 256;

/// `[speculative]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeculativeSection {
    /// Only `"ngram"` (prompt lookup) exists.
    pub method: String,
    pub num_speculative_tokens: usize,
}

/// `quant_policy`: LMDeploy's number or a codec name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum QuantPolicy {
    Number(i64),
    Name(String),
}

impl std::fmt::Display for QuantPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuantPolicy::Number(n) => write!(f, "{n}"),
            QuantPolicy::Name(s) => write!(f, "{s}"),
        }
    }
}

/// A built-in policy, or a codec found by name in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodecChoice {
    /// Policy 0: unquantized cache.
    None,
    /// Policy 8.
    Int8,
    /// Policy 4.
    Int4,
    /// Policy 42.
    TurboQuant,
    /// A codec registered through `inventory`.
    Registered(String),
    /// Separate K and V sides from `[cache]`.
    Sides(CacheSection),
}

/// LMDeploy's policy names and numbers for the built-ins.
pub const BUILTIN_POLICIES: [(&str, i64); 4] =
    [("none", 0), ("int8", 8), ("int4", 4), ("turbo_quant", 42)];

impl CodecChoice {
    pub fn policy_number(&self) -> Option<u32> {
        match self {
            CodecChoice::None => Some(0),
            CodecChoice::Int8 => Some(8),
            CodecChoice::Int4 => Some(4),
            CodecChoice::TurboQuant => Some(42),
            CodecChoice::Registered(_) | CodecChoice::Sides(_) => None,
        }
    }

    pub fn name(&self) -> String {
        match self {
            CodecChoice::None => "none".into(),
            CodecChoice::Int8 => "int8".into(),
            CodecChoice::Int4 => "int4".into(),
            CodecChoice::TurboQuant => "turbo_quant".into(),
            CodecChoice::Registered(s) => s.clone(),
            CodecChoice::Sides(c) => c.codec_name(),
        }
    }
}

/// Every accepted `quant_policy` value, for error messages.
pub fn valid_policy_values() -> Vec<String> {
    let mut v: Vec<String> = BUILTIN_POLICIES
        .iter()
        .map(|(n, p)| format!("{p} (\"{n}\")"))
        .collect();
    v.extend(
        registered_codec_names()
            .into_iter()
            .filter(|n| !BUILTIN_POLICIES.iter().any(|(b, _)| b == n))
            .map(|n| format!("\"{n}\"")),
    );
    v
}

impl QuantPolicy {
    /// Resolves to a built-in policy or a registered codec name.
    pub fn resolve(&self) -> Result<CodecChoice, ConfigError> {
        let unknown = || ConfigError::UnknownPolicy {
            given: self.to_string(),
            valid: valid_policy_values(),
        };
        let by_number = |n: i64| match n {
            0 => Some(CodecChoice::None),
            8 => Some(CodecChoice::Int8),
            4 => Some(CodecChoice::Int4),
            42 => Some(CodecChoice::TurboQuant),
            _ => None,
        };
        match self {
            QuantPolicy::Number(n) => by_number(*n).ok_or_else(unknown),
            QuantPolicy::Name(s) => {
                if let Some((_, n)) = BUILTIN_POLICIES.iter().find(|(b, _)| b == s) {
                    return Ok(by_number(*n).expect("built-in"));
                }
                if let Ok(n) = s.parse::<i64>() {
                    return by_number(n).ok_or_else(unknown);
                }
                if crate::codec::CodecRegistration::find(s).is_some() {
                    Ok(CodecChoice::Registered(s.clone()))
                } else {
                    Err(unknown())
                }
            }
        }
    }
}

/// `dtype = "auto" | "float16" | "bfloat16" | "float32"`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DtypeChoice {
    #[default]
    Auto,
    #[serde(alias = "f16", alias = "half")]
    Float16,
    #[serde(alias = "bf16")]
    Bfloat16,
    #[serde(alias = "f32")]
    Float32,
}

impl DtypeChoice {
    /// The dtype to use for a model whose own dtype is `model_dtype`.
    pub fn resolve(self, model_dtype: KvDtype) -> KvDtype {
        match self {
            DtypeChoice::Auto => model_dtype,
            DtypeChoice::Float16 => KvDtype::F16,
            DtypeChoice::Bfloat16 => KvDtype::Bf16,
            DtypeChoice::Float32 => KvDtype::F32,
        }
    }
}

/// Where the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl EngineConfig {
    /// Parses TOML text; unknown keys and wrong types are errors that name the key.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let cfg: EngineConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and validates a TOML file.
    pub fn from_toml_file(path: &Path) -> Result<Self, KvqError> {
        let text = std::fs::read_to_string(path).map_err(|source| KvqError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self::from_toml_str(&text).map_err(|e| match e {
            ConfigError::Parse(m) => ConfigError::Parse(format!("{}: {m}", path.display())),
            other => other,
        })?)
    }

    /// Refuses `tp > 1` where a model is about to run on the CPU: tensor parallelism splits
    /// the model over GPUs (`device = "cuda"` or `"cuda:N"`, GPUs N .. N + tp), and a
    /// rank-sized cache under a whole CPU model would fail on its first write.
    pub fn check_tp_runs(&self) -> Result<(), ConfigError> {
        let tp = self.engine.tp;
        if tp > 1 && !matches!(self.device()?, DeviceChoice::Cuda(_)) {
            return Err(ConfigError::Unsupported {
                backend: self.engine.backend.clone(),
                reason: format!(
                    "tp = {tp} splits the model over {tp} GPUs: set device = \"cuda\" \
                     (the CPU runs tp = 1)"
                ),
            });
        }
        Ok(())
    }

    /// Checks every value against its range; backend rules come later, in the backend.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let e = &self.engine;
        let out_of_range = |key, value: String, expected: &str| ConfigError::OutOfRange {
            key,
            value,
            expected: expected.into(),
        };
        if !(e.cache_max_entry_count > 0.0 && e.cache_max_entry_count <= 1.0) {
            return Err(out_of_range(
                "engine.cache_max_entry_count",
                e.cache_max_entry_count.to_string(),
                "must be in (0, 1]",
            ));
        }
        if let Some(g) = e.cache_memory_gib {
            if !(g > 0.0 && g.is_finite()) {
                return Err(out_of_range(
                    "engine.cache_memory_gib",
                    g.to_string(),
                    "must be a positive number of GiB",
                ));
            }
        }
        if e.block_size == 0 || !e.block_size.is_power_of_two() {
            return Err(out_of_range(
                "engine.block_size",
                e.block_size.to_string(),
                "must be a power of two, e.g. 16, 32 or 64",
            ));
        }
        for (key, v) in [
            ("engine.max_batch_size", e.max_batch_size),
            ("engine.session_len", e.session_len),
            ("engine.tp", e.tp),
        ] {
            if v == 0 {
                return Err(out_of_range(key, "0".into(), "must be at least 1"));
            }
        }
        self.device()?;
        e.quant_policy.resolve()?;
        if self.cache.is_some() && e.quant_policy.resolve()? != CodecChoice::None {
            return Err(ConfigError::Parse(format!(
                "`engine.quant_policy = {}` and a [cache] section both choose the KV codec; \
                 keep one of them ([cache] needs quant_policy 0 or no quant_policy)",
                e.quant_policy
            )));
        }
        if e.recent_window > MAX_RECENT_WINDOW {
            return Err(out_of_range(
                "engine.recent_window",
                e.recent_window.to_string(),
                &format!("must be at most {MAX_RECENT_WINDOW} tokens"),
            ));
        }
        if e.recent_window > 0 && e.enable_prefix_caching {
            return Err(ConfigError::Parse(format!(
                "engine.recent_window = {} cannot be combined with engine.enable_prefix_caching: \
                 a shared prefix's tokens were never in this request's window",
                e.recent_window
            )));
        }
        if e.recent_window > 0 && self.speculative.is_some() {
            return Err(ConfigError::Parse(format!(
                "engine.recent_window = {} cannot be combined with speculative decoding yet",
                e.recent_window
            )));
        }
        if let Some(s) = &self.speculative {
            if s.method != "ngram" {
                return Err(out_of_range(
                    "speculative.method",
                    format!("\"{}\"", s.method),
                    "the only method is \"ngram\" (prompt lookup)",
                ));
            }
            if s.num_speculative_tokens == 0 || s.num_speculative_tokens > 16 {
                return Err(out_of_range(
                    "speculative.num_speculative_tokens",
                    s.num_speculative_tokens.to_string(),
                    "must be in 1..=16",
                ));
            }
        }
        Ok(())
    }

    /// The resolved codec choice (valid after [`EngineConfig::validate`]): `[cache]` when
    /// present, otherwise `quant_policy`.
    pub fn codec_choice(&self) -> Result<CodecChoice, ConfigError> {
        match &self.cache {
            Some(c) => Ok(CodecChoice::Sides(c.clone())),
            None => self.engine.quant_policy.resolve(),
        }
    }

    /// Parses `engine.device`.
    pub fn device(&self) -> Result<DeviceChoice, ConfigError> {
        let d = self.engine.device.as_str();
        let bad = || ConfigError::OutOfRange {
            key: "engine.device",
            value: format!("\"{d}\""),
            expected: "one of \"auto\", \"cpu\", \"cuda\", \"cuda:N\"".into(),
        };
        match d {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => d
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(bad),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
[model]
path = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
[engine]
backend = "pytorch"
quant_policy = 42
device = "auto"
cache_max_entry_count = 0.8
block_size = 64
max_batch_size = 128
session_len = 8192
tp = 1
[speculative]
method = "ngram"
num_speculative_tokens = 4
"#;

    #[test]
    fn parses_the_documented_example() {
        let c = EngineConfig::from_toml_str(FULL).unwrap();
        assert_eq!(c.engine.quant_policy, QuantPolicy::Number(42));
        assert_eq!(c.codec_choice().unwrap(), CodecChoice::TurboQuant);
        assert_eq!(c.speculative.unwrap().num_speculative_tokens, 4);
    }

    #[test]
    fn defaults_fill_missing_keys() {
        let c = EngineConfig::from_toml_str("").unwrap();
        assert_eq!(c.engine.block_size, 64);
        assert_eq!(c.codec_choice().unwrap(), CodecChoice::None);
    }

    #[test]
    fn prefix_caching_parses_and_refuses_a_recent_window() {
        let on = "[engine]\nenable_prefix_caching = true\n";
        assert!(
            EngineConfig::from_toml_str(on)
                .unwrap()
                .engine
                .enable_prefix_caching
        );
        let err = EngineConfig::from_toml_str(&format!("{on}recent_window = 16\n")).unwrap_err();
        assert!(err.to_string().contains("enable_prefix_caching"), "{err}");
    }

    #[test]
    fn unknown_key_is_rejected_and_named() {
        let err = EngineConfig::from_toml_str("[engine]\nquant_polcy = 8\n").unwrap_err();
        assert!(err.to_string().contains("quant_polcy"), "{err}");
        let err = EngineConfig::from_toml_str("[engin]\n").unwrap_err();
        assert!(err.to_string().contains("engin"), "{err}");
    }

    #[test]
    fn policy_names_and_numbers_resolve() {
        for (text, want) in [
            ("8", CodecChoice::Int8),
            ("\"int4\"", CodecChoice::Int4),
            ("\"turbo_quant\"", CodecChoice::TurboQuant),
            ("\"none\"", CodecChoice::None),
            ("\"42\"", CodecChoice::TurboQuant),
        ] {
            let c =
                EngineConfig::from_toml_str(&format!("[engine]\nquant_policy = {text}\n")).unwrap();
            assert_eq!(c.codec_choice().unwrap(), want);
        }
    }

    #[test]
    fn unknown_policy_lists_the_valid_ones() {
        for text in ["3", "\"int3\""] {
            let err = EngineConfig::from_toml_str(&format!("[engine]\nquant_policy = {text}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("unknown quant_policy"), "{err}");
            for valid in [
                "0 (\"none\")",
                "8 (\"int8\")",
                "4 (\"int4\")",
                "42 (\"turbo_quant\")",
            ] {
                assert!(err.contains(valid), "{err} lacks {valid}");
            }
        }
    }

    #[test]
    fn out_of_range_values_are_rejected_with_the_rule() {
        let cases = [
            ("cache_max_entry_count = 0.0", "(0, 1]"),
            ("cache_max_entry_count = 1.5", "(0, 1]"),
            ("cache_max_entry_count = -0.1", "(0, 1]"),
            ("block_size = 0", "power of two"),
            ("block_size = 48", "power of two"),
            ("tp = 0", "at least 1"),
            ("device = \"tpu\"", "cuda:N"),
            ("recent_window = 257", "at most 256"),
        ];
        for (line, needle) in cases {
            let err = EngineConfig::from_toml_str(&format!("[engine]\n{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{line}: {err}");
        }
        assert!(EngineConfig::from_toml_str("[engine]\ncache_max_entry_count = 1.0\n").is_ok());
    }

    #[test]
    fn recent_window_is_refused_with_speculative_decoding() {
        for device in ["cpu", "cuda"] {
            let ok = EngineConfig::from_toml_str(&format!(
                "[engine]\nrecent_window = 4\ndevice = \"{device}\"\n"
            ))
            .unwrap();
            assert_eq!(ok.engine.recent_window, 4);
        }
        let err = EngineConfig::from_toml_str(
            "[engine]\nrecent_window = 4\n[speculative]\nmethod = \"ngram\"\nnum_speculative_tokens = 2\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("speculative"), "{err}");
    }

    #[test]
    fn wrong_type_is_a_parse_error_not_a_panic() {
        let err = EngineConfig::from_toml_str("[engine]\nblock_size = \"big\"\n").unwrap_err();
        assert!(matches!(err, ConfigError::Parse(_)), "{err}");
    }

    #[test]
    fn speculative_method_is_checked() {
        let err = EngineConfig::from_toml_str(
            "[speculative]\nmethod = \"eagle\"\nnum_speculative_tokens = 2\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("ngram"), "{err}");
    }

    #[test]
    fn cache_section_selects_sides() {
        let c = EngineConfig::from_toml_str("[cache]\nk = \"int4\"\nv = \"lm3\"\nrotate = true\n")
            .unwrap();
        let want = CacheSection {
            k: SideKind::Int4,
            v: SideKind::Lm3,
            rotate: true,
            edge: None,
        };
        assert_eq!(c.codec_choice().unwrap(), CodecChoice::Sides(want));
        assert_eq!(c.codec_choice().unwrap().name(), "k:int4r+v:lm3");
        let c = EngineConfig::from_toml_str(
            "[cache]\nk = \"int4\"\nv = \"lm2u\"\nrotate = true\n[cache.edge]\nlast = 2\nk = \"int8\"\nv = \"int8\"\n",
        )
        .unwrap();
        assert_eq!(
            c.codec_choice().unwrap().name(),
            "k:int4r+v:lm2u|edge0/2:k:int8r+v:int8r"
        );
        // rotate defaults to false; quant_policy 0 alongside is fine.
        let c = EngineConfig::from_toml_str(
            "[engine]\nquant_policy = 0\n[cache]\nk = \"tq3s\"\nv = \"lm2\"\n",
        )
        .unwrap();
        assert_eq!(c.codec_choice().unwrap().name(), "k:tq3s+v:lm2");
    }

    #[test]
    fn bad_cache_sections_are_errors_that_name_the_problem() {
        let cases = [
            ("[cache]\nk = \"int3\"\nv = \"int4\"\n", "int3"),
            ("[cache]\nk = \"int4\"\n", "missing field `v`"),
            (
                "[cache]\nk = \"int4\"\nv = \"int4\"\nrotat = true\n",
                "rotat",
            ),
            (
                "[cache]\nk = \"int4\"\nv = \"int4\"\nrotate = \"yes\"\n",
                "rotate",
            ),
            ("[cache]\nk = 4\nv = \"int4\"\n", "k"),
            (
                "[engine]\nquant_policy = 42\n[cache]\nk = \"int4\"\nv = \"int4\"\n",
                "both choose the KV codec",
            ),
            (
                "[cache]\nk = \"int4\"\nv = \"int4\"\n[cache.edge]\nfirst = 1\nk = \"int8\"\n",
                "missing field `v`",
            ),
            (
                "[cache]\nk = \"int4\"\nv = \"int4\"\n[cache.edge]\nfirts = 1\nk = \"int8\"\nv = \"int8\"\n",
                "firts",
            ),
        ];
        for (text, needle) in cases {
            let err = EngineConfig::from_toml_str(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn device_strings_parse() {
        let mut c = EngineConfig::default();
        c.engine.device = "cuda:1".into();
        assert_eq!(c.device().unwrap(), DeviceChoice::Cuda(1));
    }
}
