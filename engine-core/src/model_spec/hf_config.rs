//! `ModelSpec` from a Hugging Face `config.json`.

use serde::Deserialize;
use std::path::Path;

use super::{AttentionKind, ModelSpec};
use crate::dtype::KvDtype;
use crate::error::KvqError;

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    hidden_size: usize,
    #[serde(default)]
    intermediate_size: Option<usize>,
    vocab_size: usize,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    rope_theta: Option<f32>,
    #[serde(default)]
    rms_norm_eps: Option<f32>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default)]
    torch_dtype: Option<String>,
    // Multi-head latent attention (DeepSeek-V2/V3).
    #[serde(default)]
    kv_lora_rank: Option<usize>,
    #[serde(default)]
    qk_nope_head_dim: Option<usize>,
    #[serde(default)]
    qk_rope_head_dim: Option<usize>,
    #[serde(default)]
    v_head_dim: Option<usize>,
}

pub(super) fn from_config_json(path: &Path) -> Result<ModelSpec, KvqError> {
    let text = std::fs::read_to_string(path).map_err(|source| KvqError::Io {
        path: path.display().to_string(),
        source,
    })?;
    from_config_json_text(&text, &path.display().to_string())
}

pub(super) fn from_config_json_text(text: &str, origin: &str) -> Result<ModelSpec, KvqError> {
    let c: HfConfig = serde_json::from_str(text).map_err(|e| KvqError::Model {
        path: origin.to_string(),
        reason: format!("not a usable config.json: {e}"),
    })?;
    let num_kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
    let default_head_dim = c
        .hidden_size
        .checked_div(c.num_attention_heads)
        .unwrap_or(0);
    let (attention, head_dim_k, head_dim_v) = match c.kv_lora_rank {
        Some(_) => {
            let rope = c.qk_rope_head_dim.unwrap_or(0);
            let nope = c.qk_nope_head_dim.unwrap_or(0);
            (
                AttentionKind::Mla,
                nope + rope,
                c.v_head_dim.unwrap_or(nope),
            )
        }
        None => {
            let d = c.head_dim.unwrap_or(default_head_dim);
            (
                ModelSpec::attention_kind_for(c.num_attention_heads, num_kv_heads),
                d,
                d,
            )
        }
    };
    let dtype = match c.torch_dtype.as_deref() {
        Some("bfloat16") => KvDtype::Bf16,
        Some("float32") => KvDtype::F32,
        _ => KvDtype::F16,
    };
    let architecture = c
        .model_type
        .or_else(|| c.architectures.first().cloned())
        .unwrap_or_else(|| "unknown".into());
    ModelSpec {
        architecture,
        num_layers: c.num_hidden_layers,
        num_heads: c.num_attention_heads,
        num_kv_heads,
        head_dim_k,
        head_dim_v,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size.unwrap_or(0),
        vocab_size: c.vocab_size,
        max_position_embeddings: c.max_position_embeddings.unwrap_or(2048),
        rope_theta: c.rope_theta.unwrap_or(10000.0),
        rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
        tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
        attention,
        dtype,
    }
    .check(origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama",
      "hidden_size":576,"intermediate_size":1536,"num_attention_heads":9,"num_hidden_layers":30,
      "num_key_value_heads":3,"vocab_size":49152,"max_position_embeddings":8192,
      "rope_theta":100000,"rms_norm_eps":1e-05,"tie_word_embeddings":true,"torch_dtype":"bfloat16"}"#;

    #[test]
    fn reads_a_llama_config() {
        let s = from_config_json_text(SMOLLM2, "config.json").unwrap();
        assert_eq!(
            (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim_k),
            (30, 9, 3, 64)
        );
        assert_eq!(s.attention, AttentionKind::Gqa);
        assert_eq!(s.dtype, KvDtype::Bf16);
        assert!(s.tie_word_embeddings);
    }

    #[test]
    fn missing_field_names_file_and_field() {
        let err = from_config_json_text(r#"{"hidden_size": 8}"#, "x/config.json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x/config.json") && err.contains("num_hidden_layers"),
            "{err}"
        );
    }

    #[test]
    fn heads_must_group() {
        let bad = SMOLLM2.replace("\"num_key_value_heads\":3", "\"num_key_value_heads\":4");
        let err = from_config_json_text(&bad, "c").unwrap_err().to_string();
        assert!(err.contains("multiple"), "{err}");
    }
}
