//! How well a K codec preserves attention scores on a real model: the queries and keys of every
//! layer and head are captured while the model reads a text with an f32 cache, then each K
//! codec's estimate `q·k̂` (its fused `score_k`, in its own domain) is compared with the exact
//! `q·k` over causal (query, key) pairs. The bias (mean error) and the spread (standard
//! deviation) of the error, both relative to the spread of the exact scores, say whether a
//! residual-sign or QJL correction buys unbiasedness at the price of variance.

use std::sync::Mutex;

use serde::Serialize;

use crate::attention::AttentionBatch;
use crate::backend::{AttentionBackend, Capabilities};
use crate::cache::{BlockPool, BlockTable, CacheLayout, PagedKvCache};
use crate::codec::{float_codec, KvCodec};
use crate::config::EngineConfig;
use crate::error::{ConfigError, KvqError};
use crate::model::{LlamaModel, LogitsFor, SeqInput};
use crate::model_spec::ModelSpec;
use crate::KvDtype;

/// Queries and keys of one forward pass, per layer: `q[l]` is `[tokens, heads, dim]`, `k[l]`
/// `[tokens, kv_heads, dim]`, both post-RoPE in the model domain.
#[derive(Debug, Default, Clone)]
pub struct CapturedQk {
    pub q: Vec<Vec<f32>>,
    pub k: Vec<Vec<f32>>,
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
}

impl CapturedQk {
    pub fn tokens(&self) -> usize {
        self.k
            .first()
            .map_or(0, |k| k.len() / (self.kv_heads * self.dim))
    }
}

/// An attention backend that records what the model hands to the cache and to attention,
/// and otherwise does what `inner` does.
struct Recorder<'a> {
    inner: &'a dyn AttentionBackend,
    seen: Mutex<CapturedQk>,
}

impl AttentionBackend for Recorder<'_> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn validate(&self, spec: &ModelSpec, cfg: &EngineConfig) -> Result<(), ConfigError> {
        self.inner.validate(spec, cfg)
    }
    fn build_codec(
        &self,
        spec: &ModelSpec,
        cfg: &EngineConfig,
    ) -> Result<std::sync::Arc<dyn KvCodec>, ConfigError> {
        self.inner.build_codec(spec, cfg)
    }
    fn cache_layout(
        &self,
        codec: &dyn KvCodec,
        num_layers: usize,
        num_kv_heads: usize,
        block_size: usize,
    ) -> CacheLayout {
        self.inner
            .cache_layout(codec, num_layers, num_kv_heads, block_size)
    }
    fn write_kv(
        &self,
        cache: &mut PagedKvCache,
        layer: usize,
        k: &[f32],
        v: &[f32],
        slots: &[usize],
    ) -> Result<(), KvqError> {
        let mut seen = self.seen.lock().expect("recorder lock");
        seen.k.push(k.to_vec());
        debug_assert_eq!(seen.k.len(), layer + 1);
        drop(seen);
        self.inner.write_kv(cache, layer, k, v, slots)
    }
    fn attend(
        &self,
        cache: &PagedKvCache,
        layer: usize,
        q: &[f32],
        batch: &AttentionBatch<'_>,
        out: &mut [f32],
    ) -> Result<(), KvqError> {
        self.seen.lock().expect("recorder lock").q.push(q.to_vec());
        self.inner.attend(cache, layer, q, batch, out)
    }
}

/// Runs `model` over `tokens` in one pass with an f32 cache through `backend` and returns the
/// queries and keys of every layer.
pub fn capture_qk(
    model: &LlamaModel,
    backend: &dyn AttentionBackend,
    tokens: &[u32],
) -> Result<CapturedQk, KvqError> {
    let s = &model.spec;
    let codec = float_codec(s.head_dim_k, s.head_dim_v, KvDtype::F32);
    let block = 64;
    let layout = backend.cache_layout(&codec, s.num_layers, s.num_kv_heads, block);
    let blocks = BlockTable::blocks_for(tokens.len(), block);
    let mut cache = PagedKvCache::new(layout, std::sync::Arc::new(codec), blocks);
    let mut pool = BlockPool::new(blocks);
    let mut table = BlockTable::default();
    table.reserve(&mut pool, tokens.len(), block)?;
    let recorder = Recorder {
        inner: backend,
        seen: Mutex::new(CapturedQk {
            heads: s.num_heads,
            kv_heads: s.num_kv_heads,
            dim: s.head_dim_k,
            ..Default::default()
        }),
    };
    let seq = SeqInput {
        tokens,
        start_pos: 0,
        block_table: &table,
        window: None,
    };
    model.forward(&recorder, &mut cache, &[seq], LogitsFor::LastToken)?;
    Ok(recorder.seen.into_inner().expect("recorder lock"))
}

/// Error statistics of one codec's score estimates.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreError {
    pub codec: String,
    pub bits_per_element: f64,
    /// Mean of `q·k̂ − q·k` over the pairs, divided by the standard deviation of `q·k`.
    pub relative_bias: f64,
    /// Standard deviation of `q·k̂ − q·k`, divided by the standard deviation of `q·k`.
    pub relative_spread: f64,
    /// The mean error divided by its standard error as if the pairs were independent. They
    /// are not (each key meets many queries), so this overstates the evidence; a small value
    /// still means no detectable bias.
    pub bias_z: f64,
    pub pairs: usize,
}

/// Scores every `query_stride`-th query position against every key it may see (causal), for
/// each layer and query head, exactly and through `codec`'s K side.
pub fn score_error(
    qk: &CapturedQk,
    codec: &dyn KvCodec,
    query_stride: usize,
) -> Result<ScoreError, KvqError> {
    if codec.head_dim_k() != qk.dim {
        return Err(KvqError::InvalidArgument(format!(
            "codec `{}` has K dim {}, the captured keys {}",
            codec.name(),
            codec.head_dim_k(),
            qk.dim
        )));
    }
    let (d, n, group) = (qk.dim, qk.tokens(), qk.heads / qk.kv_heads);
    let kb = codec.k_bytes();
    let (mut sum_e, mut sum_e2, mut sum_x, mut sum_x2, mut pairs) = (0f64, 0f64, 0f64, 0f64, 0);
    for (q_layer, k_layer) in qk.q.iter().zip(&qk.k) {
        // Every key of the layer encoded once.
        let mut data = vec![0u8; n * qk.kv_heads * kb.data];
        let mut meta = vec![0u8; n * qk.kv_heads * kb.meta];
        for e in 0..n * qk.kv_heads {
            codec.encode_k(
                &k_layer[e * d..][..d],
                &mut data[e * kb.data..][..kb.data],
                &mut meta[e * kb.meta..][..kb.meta],
            );
        }
        for i in (0..n).step_by(query_stride.max(1)) {
            for h in 0..qk.heads {
                let kvh = h / group;
                let q = &q_layer[(i * qk.heads + h) * d..][..d];
                let mut q_rot = q.to_vec();
                codec.k_domain().forward(&mut q_rot);
                for j in 0..=i {
                    let e = j * qk.kv_heads + kvh;
                    let exact: f64 = q
                        .iter()
                        .zip(&k_layer[e * d..][..d])
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum();
                    let est = codec.score_k(
                        &q_rot,
                        &data[e * kb.data..][..kb.data],
                        &meta[e * kb.meta..][..kb.meta],
                    ) as f64;
                    let err = est - exact;
                    sum_e += err;
                    sum_e2 += err * err;
                    sum_x += exact;
                    sum_x2 += exact * exact;
                    pairs += 1;
                }
            }
        }
    }
    let p = pairs.max(1) as f64;
    let (mean_e, mean_x) = (sum_e / p, sum_x / p);
    let sd_e = (sum_e2 / p - mean_e * mean_e).max(0.0).sqrt();
    let sd_x = (sum_x2 / p - mean_x * mean_x).max(f64::MIN_POSITIVE).sqrt();
    Ok(ScoreError {
        codec: codec.name().to_string(),
        bits_per_element: codec.k_bytes().total() as f64 * 8.0 / codec.head_dim_k() as f64,
        relative_bias: mean_e / sd_x,
        relative_spread: sd_e / sd_x,
        bias_z: if sd_e > 0.0 {
            mean_e / (sd_e / p.sqrt())
        } else {
            0.0
        },
        pairs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::hf_dir_tests::{random_weights, tiny_spec, CpuF32Backend, InMemory};
    use crate::model::load_llama;

    /// The recorder sees every layer's queries and keys; an f32 K side scores exactly and a
    /// coarse one (f16 here) shows a small, nonzero spread.
    #[test]
    fn captured_scores_are_exact_through_an_exact_codec() {
        let spec = tiny_spec(true);
        let model = load_llama(&InMemory(random_weights(&spec, 3)), &spec).unwrap();
        let tokens: Vec<u32> = (0..40).map(|i| 3 + (i * 7) % 90).collect();
        let qk = capture_qk(&model, &CpuF32Backend, &tokens).unwrap();
        assert_eq!((qk.q.len(), qk.k.len()), (spec.num_layers, spec.num_layers));
        assert_eq!(qk.tokens(), tokens.len());
        let exact = float_codec(spec.head_dim_k, spec.head_dim_v, KvDtype::F32);
        let e = score_error(&qk, &exact, 3).unwrap();
        assert!(e.pairs > 0);
        assert!(
            e.relative_spread < 1e-6 && e.relative_bias.abs() < 1e-6,
            "{e:?}"
        );
        let half = float_codec(spec.head_dim_k, spec.head_dim_v, KvDtype::F16);
        let e = score_error(&qk, &half, 3).unwrap();
        assert!(e.relative_spread > 0.0 && e.relative_spread < 1e-2, "{e:?}");
        assert!(e.relative_spread.is_finite() && e.relative_bias.is_finite());
    }
}
