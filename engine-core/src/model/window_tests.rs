//! The recent window through the model: it changes what a lossy cache gives, a window
//! covering the whole sequence gives the exact cache's logits, and chunked prefill plus decode
//! steps give what one pass gives (the ring carries the window across calls).

use std::sync::{Arc, Mutex};

use super::hf_dir_tests::{random_weights, tiny_spec, CpuF32Backend, InMemory};
use super::{load_llama, LlamaModel, LogitsFor, SeqInput};
use crate::backend::AttentionBackend;
use crate::cache::{BlockPool, BlockTable, PagedKvCache, RecentWindow};
use crate::codec::{float_codec, KvCodec};
use crate::testing::{fresh_seed, rng};
use crate::KvDtype;
use rand::Rng;

/// Logits of every position of `tokens`, fed in `chunks`, over a cache in `cache_dtype`, with
/// an f32 recent window of `window` tokens (0: none).
fn logits(
    model: &LlamaModel,
    tokens: &[u32],
    chunks: &[usize],
    cache_dtype: KvDtype,
    window: usize,
) -> Vec<f32> {
    let s = &model.spec;
    let codec: Arc<dyn KvCodec> = Arc::new(float_codec(s.head_dim_k, s.head_dim_v, cache_dtype));
    let block = 16;
    let blocks = BlockTable::blocks_for(tokens.len(), block);
    let layout = CpuF32Backend.cache_layout(codec.as_ref(), s.num_layers, s.num_kv_heads, block);
    let mut cache = PagedKvCache::new(layout, codec, blocks);
    let mut table = BlockTable::default();
    table
        .reserve(&mut BlockPool::new(blocks), tokens.len(), block)
        .unwrap();
    let dims = (s.head_dim_k, s.head_dim_v);
    let win = (window > 0).then(|| {
        Mutex::new(RecentWindow::new(
            window,
            s.num_layers,
            s.num_kv_heads,
            dims,
            KvDtype::F32,
        ))
    });
    let mut out = Vec::new();
    let mut start = 0;
    for &n in chunks {
        let seq = SeqInput {
            tokens: &tokens[start..start + n],
            start_pos: start,
            block_table: &table,
            window: win.as_ref(),
        };
        out.extend(
            model
                .forward(&CpuF32Backend, &mut cache, &[seq], LogitsFor::AllTokens)
                .unwrap(),
        );
        start += n;
    }
    assert_eq!(start, tokens.len());
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn recent_window_reads_exact_values_across_chunks() {
    let seed = fresh_seed("recent window model");
    let spec = tiny_spec(true);
    let model = load_llama(&InMemory(random_weights(&spec, seed)), &spec).unwrap();
    let mut r = rng(seed);
    let tokens: Vec<u32> = (0..50).map(|_| r.random_range(3..96)).collect();
    let one = [tokens.len()];
    let exact = logits(&model, &tokens, &one, KvDtype::F32, 0);
    let lossy = logits(&model, &tokens, &one, KvDtype::F16, 0);
    assert!(exact.iter().all(|x| x.is_finite()));
    // A window over the whole sequence reads every token exactly.
    let covered = logits(&model, &tokens, &one, KvDtype::F16, tokens.len());
    assert!(
        max_diff(&covered, &exact) < 1e-4,
        "full window vs exact cache (seed {seed})"
    );
    // A short window changes what the f16 cache gives ...
    let windowed = logits(&model, &tokens, &one, KvDtype::F16, 3);
    let change = max_diff(&windowed, &lossy);
    assert!(
        change > 1e-4,
        "window of 3 changed the logits by only {change} (seed {seed})"
    );
    // ... and chunks plus decode steps (the ring across calls) give the same as one pass.
    let chunked = logits(&model, &tokens, &[20, 1, 2, 17, 1, 1, 8], KvDtype::F16, 3);
    let d = max_diff(&chunked, &windowed);
    assert!(
        d < 1e-4 * change.max(1.0),
        "chunked vs one pass: {d} (seed {seed})"
    );
}
