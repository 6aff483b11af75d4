//! Resolves a config against a model: the backend, its codec, the block layout, and the
//! memory plan for a budget. This is what `kvq check-config` prints and what the engine
//! allocates from.

use std::sync::Arc;

use serde::Serialize;

use crate::backend::{backend_by_name, AttentionBackend};
use crate::cache::{CacheLayout, LayerGroup, MemoryPlan, PagedKvCache, RecentWindow};
use crate::cache_section::EdgeLayers;
use crate::codec::{float_codec, KvCodec, SideBytes};
use crate::config::{DeviceChoice, EngineConfig};
use crate::error::ConfigError;
use crate::model_spec::ModelSpec;
use crate::KvDtype;

/// A validated configuration with everything derived from it.
pub struct ResolvedConfig {
    pub backend: Box<dyn AttentionBackend>,
    /// The codec of every layer, or with `[cache.edge]` of the layers between the edges.
    pub codec: Arc<dyn KvCodec>,
    /// `codec`'s layout for all the model's layers (block size, heads, per-layer bytes).
    pub layout: CacheLayout,
    /// The same backend's layout for the unquantized cache, for ratios.
    pub fp16_layout: CacheLayout,
    /// `[cache.edge]`: the first and last layers' codec.
    pub edge: Option<EdgeCodec>,
    /// `engine.recent_window`: tokens per sequence kept at `dtype` beside the cache.
    pub recent_window: usize,
    /// The model dtype (the recent window's).
    pub dtype: KvDtype,
}

/// The codec of the layers a `[cache.edge]` override covers.
pub struct EdgeCodec {
    pub layers: EdgeLayers,
    pub codec: Arc<dyn KvCodec>,
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
        let edge = edge_codec(backend.as_ref(), spec, cfg)?;
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
            edge,
            recent_window: cfg.engine.recent_window,
            dtype,
        })
    }

    /// The layer groups of the cache, in layer order: one for a single codec, up to three with
    /// `[cache.edge]` (first layers, the rest, last layers).
    pub fn layer_groups(&self) -> Vec<LayerGroup> {
        let n = self.layout.num_layers;
        let group = |layers: std::ops::Range<usize>, codec: &Arc<dyn KvCodec>| LayerGroup {
            layout: self.backend.cache_layout(
                codec.as_ref(),
                layers.len(),
                self.layout.num_kv_heads,
                self.layout.block_size,
            ),
            layers,
            codec: codec.clone(),
        };
        let Some(edge) = &self.edge else {
            return vec![group(0..n, &self.codec)];
        };
        let [first, main, last] = edge.layers.layer_ranges(n);
        [
            (first, &edge.codec),
            (main, &self.codec),
            (last, &edge.codec),
        ]
        .into_iter()
        .filter(|(r, _)| !r.is_empty())
        .map(|(r, c)| group(r, c))
        .collect()
    }

    /// The configuration's codec name: the codec's, with `[cache.edge]` the full section's
    /// (e.g. `k:lm4+v:lm2u|edge1/1:k:int4+v:int4`).
    pub fn codec_name(&self) -> String {
        let name = match &self.edge {
            None => self.codec.name().to_string(),
            Some(e) => format!(
                "{}|edge{}/{}:{}",
                self.codec.name(),
                e.layers.first,
                e.layers.last,
                e.codec.name()
            ),
        };
        match self.recent_window {
            0 => name,
            n => format!("{name}+w{n}"),
        }
    }

    /// A sequence's recent window (`engine.recent_window`), or `None` when it is off.
    pub fn new_recent_window(&self) -> Option<RecentWindow> {
        let (l, dims) = (&self.layout, self.head_dims());
        (self.recent_window > 0).then(|| {
            RecentWindow::new(
                self.recent_window,
                l.num_layers,
                l.num_kv_heads,
                dims,
                self.dtype,
            )
        })
    }

    /// Bytes one sequence's recent window takes (0 when it is off).
    pub fn recent_window_bytes(&self) -> usize {
        let (l, dims) = (&self.layout, self.head_dims());
        RecentWindow::bytes_for(
            self.recent_window,
            l.num_layers,
            l.num_kv_heads,
            dims,
            self.dtype,
        )
    }

    fn head_dims(&self) -> (usize, usize) {
        (self.codec.head_dim_k(), self.codec.head_dim_v())
    }

    /// Bits per cached element of a sequence of `context` tokens: the codec's for every token
    /// (the cache holds them all) plus the recent window's copies at the dtype.
    pub fn bits_at(&self, context: usize) -> f64 {
        let w = self.recent_window.min(context) as f64;
        let n = context.max(1) as f64;
        let dtype_bits = 8.0 * self.dtype.size_bytes() as f64;
        self.bits_per_element() + w * dtype_bits / n
    }

    /// A zeroed cache of `num_blocks` blocks with this configuration's layer groups.
    pub fn new_cache(&self, num_blocks: usize) -> PagedKvCache {
        PagedKvCache::with_layer_groups(self.layer_groups(), num_blocks)
    }

    /// Bits per cached element, metadata included, averaged over K, V and layers.
    pub fn bits_per_element(&self) -> f64 {
        let groups = self.layer_groups();
        let bits: f64 = groups
            .iter()
            .map(|g| g.codec.bits_per_element() * g.layers.len() as f64)
            .sum();
        bits / self.layout.num_layers as f64
    }

    /// Payload bytes of one token over all layers and KV heads.
    pub fn bytes_per_token(&self) -> usize {
        self.sum_over_groups(CacheLayout::bytes_per_token)
    }

    /// Bytes of one block over all layers, padding included.
    pub fn block_bytes(&self) -> usize {
        self.sum_over_groups(CacheLayout::block_bytes)
    }

    /// Bytes of one block over all layers that are alignment padding.
    pub fn block_padding(&self) -> usize {
        self.sum_over_groups(CacheLayout::block_padding)
    }

    fn sum_over_groups(&self, f: fn(&CacheLayout) -> usize) -> usize {
        self.layer_groups().iter().map(|g| f(&g.layout)).sum()
    }

    /// The memory plan for a budget of `budget_bytes` of free memory.
    pub fn plan(&self, budget_bytes: u64, cfg: &EngineConfig) -> MemoryPlan {
        self.plan_fraction(budget_bytes, cfg.engine.cache_max_entry_count)
    }

    /// The memory plan for exactly `cache_bytes` of cache (an explicit budget).
    pub fn plan_exact(&self, cache_bytes: u64) -> MemoryPlan {
        self.plan_fraction(cache_bytes, 1.0)
    }

    fn plan_fraction(&self, budget_bytes: u64, fraction: f64) -> MemoryPlan {
        let groups = self.layer_groups();
        let layouts: Vec<&CacheLayout> = groups.iter().map(|g| &g.layout).collect();
        MemoryPlan::new(&layouts, &self.fp16_layout, budget_bytes, fraction)
    }

    /// Bytes per token per layer per KV head of the main codec (the layers without an
    /// override); `bits_per_element` is over all layers.
    pub fn token_bytes(&self) -> TokenBytes {
        let (k, v): (SideBytes, SideBytes) = (self.layout.k, self.layout.v);
        TokenBytes {
            k_data: k.data,
            k_meta: k.meta,
            v_data: v.data,
            v_meta: v.meta,
            total: k.total() + v.total(),
            fp16_total: self.fp16_layout.k.total() + self.fp16_layout.v.total(),
            bits_per_element: self.bits_per_element(),
        }
    }
}

/// Builds the `[cache.edge]` codec, validated like a `[cache]` of its own, or explains why the
/// override cannot run.
fn edge_codec(
    backend: &dyn AttentionBackend,
    spec: &ModelSpec,
    cfg: &EngineConfig,
) -> Result<Option<EdgeCodec>, ConfigError> {
    let Some(section) = &cfg.cache else {
        return Ok(None);
    };
    let (Some(layers), Some(edge_section)) = (section.edge, section.edge_section()) else {
        return Ok(None);
    };
    let out_of_range = |expected: String| ConfigError::OutOfRange {
        key: "cache.edge",
        value: format!("first = {}, last = {}", layers.first, layers.last),
        expected,
    };
    if layers.first + layers.last == 0 {
        return Err(out_of_range(
            "at least one edge layer (first or last > 0)".into(),
        ));
    }
    if layers.first + layers.last >= spec.num_layers {
        return Err(out_of_range(format!(
            "fewer edge layers than the model's {} layers, so some keep the main sides",
            spec.num_layers
        )));
    }
    if let DeviceChoice::Cuda(_) = cfg.device()? {
        return Err(ConfigError::Unsupported {
            backend: backend.name().to_string(),
            reason:
                "[cache.edge] per-layer overrides run on the CPU only (the GPU cache has one codec \
                     for every layer); use device = \"cpu\" or drop [cache.edge]"
                    .into(),
        });
    }
    let mut edge_cfg = cfg.clone();
    edge_cfg.cache = Some(edge_section);
    backend.validate(spec, &edge_cfg)?;
    let codec = backend.build_codec(spec, &edge_cfg)?;
    Ok(Some(EdgeCodec { layers, codec }))
}
