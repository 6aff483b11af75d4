//! Resolves a config against a model: the backend, its codec, the block layout, and the
//! memory plan for a budget. This is what `kvq check-config` prints and what the engine
//! allocates from.

use std::sync::Arc;

use serde::Serialize;

use crate::backend::{backend_by_name, AttentionBackend};
use crate::cache::{CacheLayout, MemoryPlan};
use crate::codec::{float_codec, KvCodec, SideBytes};
use crate::config::EngineConfig;
use crate::error::ConfigError;
use crate::model_spec::ModelSpec;

/// A validated configuration with everything derived from it.
pub struct ResolvedConfig {
    pub backend: Box<dyn AttentionBackend>,
    pub codec: Arc<dyn KvCodec>,
    pub layout: CacheLayout,
    /// The same backend's layout for the unquantized cache, for ratios.
    pub fp16_layout: CacheLayout,
}

/// Bytes per token per layer per KV head, as printed by `check-config`.
#[derive(Debug, Clone, Serialize)]
pub struct TokenBytes {
    pub k_data: usize,
    pub k_meta: usize,
    pub v_data: usize,
    pub v_meta: usize,
    pub total: usize,
    pub fp16_total: usize,
    pub bits_per_element: f64,
}

impl ResolvedConfig {
    /// Validates `cfg` for `spec` with the backend it names and builds codec and layouts.
    pub fn new(spec: &ModelSpec, cfg: &EngineConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let backend = backend_by_name(&cfg.engine.backend)?;
        backend.validate(spec, cfg)?;
        let codec = backend.build_codec(spec, cfg)?;
        let block = cfg.engine.block_size;
        let kv_heads = spec.num_kv_heads / cfg.engine.tp;
        let layout = backend.cache_layout(codec.as_ref(), spec.num_layers, kv_heads, block);
        let dtype = cfg.engine.dtype.resolve(spec.dtype);
        let fp16 = float_codec(spec.head_dim_k, spec.head_dim_v, dtype);
        let fp16_layout = backend.cache_layout(&fp16, spec.num_layers, kv_heads, block);
        Ok(Self {
            backend,
            codec,
            layout,
            fp16_layout,
        })
    }

    /// The memory plan for a budget of `budget_bytes` of free memory.
    pub fn plan(&self, budget_bytes: u64, cfg: &EngineConfig) -> MemoryPlan {
        MemoryPlan::new(
            &self.layout,
            &self.fp16_layout,
            budget_bytes,
            cfg.engine.cache_max_entry_count,
        )
    }

    /// The memory plan for exactly `cache_bytes` of cache (an explicit budget).
    pub fn plan_exact(&self, cache_bytes: u64) -> MemoryPlan {
        MemoryPlan::new(&self.layout, &self.fp16_layout, cache_bytes, 1.0)
    }

    pub fn token_bytes(&self) -> TokenBytes {
        let (k, v): (SideBytes, SideBytes) = (self.layout.k, self.layout.v);
        TokenBytes {
            k_data: k.data,
            k_meta: k.meta,
            v_data: v.data,
            v_meta: v.meta,
            total: k.total() + v.total(),
            fp16_total: self.fp16_layout.k.total() + self.fp16_layout.v.total(),
            bits_per_element: self.codec.bits_per_element(),
        }
    }
}
