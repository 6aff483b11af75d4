//! `ModelSpec`: the shape of a model as far as the KV cache and attention are concerned, read
//! from a GGUF's metadata or an HF `config.json` without loading any weights.

use serde::Serialize;
use std::path::Path;

use crate::dtype::KvDtype;
use crate::error::KvqError;

pub mod gguf;
mod hf_config;

/// How keys and values are shared between query heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum AttentionKind {
    /// One KV head per query head.
    Mha,
    /// Grouped-query attention: several query heads share a KV head.
    Gqa,
    /// Multi-head latent attention (DeepSeek-V2/V3): K and V come from a compressed latent.
    Mla,
}

/// Model shape and the hyper-parameters the forward pass needs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSpec {
    /// Architecture name as the file states it (`llama`, `deepseek_v2`, …).
    pub architecture: String,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim_k: usize,
    pub head_dim_v: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    pub tie_word_embeddings: bool,
    pub attention: AttentionKind,
    /// The dtype the model's own weights suggest (f16 for GGUF, `torch_dtype` for HF).
    pub dtype: KvDtype,
}

impl ModelSpec {
    /// Reads the spec of a GGUF file or an HF directory (or its `config.json`).
    pub fn from_path(path: &Path) -> Result<Self, KvqError> {
        if path.is_dir() {
            return hf_config::from_config_json(&path.join("config.json"));
        }
        let is_json = path.extension().is_some_and(|e| e == "json");
        if is_json {
            hf_config::from_config_json(path)
        } else {
            gguf::spec_from_gguf_file(path)
        }
    }

    /// Parses the text of an HF `config.json`.
    pub fn from_config_json_str(text: &str, origin: &str) -> Result<Self, KvqError> {
        hf_config::from_config_json_text(text, origin)
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// A SmolLM2-135M-shaped spec (30 layers, 9/3 heads, D = 64), for tests and examples.
    pub fn smollm2_135m() -> Self {
        Self {
            architecture: "llama".into(),
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim_k: 64,
            head_dim_v: 64,
            hidden_size: 576,
            intermediate_size: 1536,
            vocab_size: 49152,
            max_position_embeddings: 8192,
            rope_theta: 100000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            attention: AttentionKind::Gqa,
            dtype: KvDtype::F16,
        }
    }

    pub(crate) fn attention_kind_for(num_heads: usize, num_kv_heads: usize) -> AttentionKind {
        if num_heads == num_kv_heads {
            AttentionKind::Mha
        } else {
            AttentionKind::Gqa
        }
    }

    /// Checks internal consistency (heads divide, dims non-zero).
    pub(crate) fn check(self, origin: &str) -> Result<Self, KvqError> {
        let bad = |reason: String| KvqError::Model {
            path: origin.to_string(),
            reason,
        };
        if self.num_layers == 0 || self.num_heads == 0 || self.num_kv_heads == 0 {
            return Err(bad("layer and head counts must be positive".into()));
        }
        if self.head_dim_k == 0 || self.head_dim_v == 0 {
            return Err(bad("head dims must be positive".into()));
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(bad(format!(
                "{} attention heads are not a multiple of {} KV heads",
                self.num_heads, self.num_kv_heads
            )));
        }
        Ok(self)
    }
}
