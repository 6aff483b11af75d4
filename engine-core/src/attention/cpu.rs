//! Paged attention on the CPU, reading packed K/V bytes through the codec (fused score and
//! accumulate), with an online softmax so no score matrix and no dequantized cache is built.
//!
//! One pass per (sequence, KV head): each cached token is read once and scored against every
//! query row of the GQA group that may see it (causal), the way the GPU kernel shares a KV
//! tile among a group's query heads.

use rayon::prelude::*;

use crate::cache::{BlockTable, PagedKvCache};
use crate::error::KvqError;

/// One sequence's part of a batch.
#[derive(Debug, Clone)]
pub struct SeqSlice<'a> {
    /// First row of this sequence in the batch's query tensor.
    pub q_start: usize,
    /// Query tokens of this step (1 for decode, the chunk length for prefill).
    pub q_len: usize,
    /// Tokens in the cache for this sequence, including this step's (already written).
    pub context_len: usize,
    pub block_table: &'a BlockTable,
}

/// A batch of sequences for one attention call.
#[derive(Debug, Clone)]
pub struct AttentionBatch<'a> {
    pub seqs: Vec<SeqSlice<'a>>,
    pub num_heads: usize,
    /// Softmax scale, normally `1/√head_dim`.
    pub scale: f32,
}

/// `out = softmax(q·Kᵀ·scale + causal mask)·V` for every query row of the batch.
///
/// `q` is `[rows, num_heads, head_dim_k]` in the model domain; `out` is
/// `[rows, num_heads, head_dim_v]`. Query row `i` of a sequence sits at absolute position
/// `context_len − q_len + i` and sees tokens `0..=position`.
pub fn paged_attention(
    cache: &PagedKvCache,
    layer: usize,
    q: &[f32],
    batch: &AttentionBatch<'_>,
    out: &mut [f32],
) -> Result<(), KvqError> {
    let codec = cache.codec().as_ref();
    let (dk, dv) = (codec.head_dim_k(), codec.head_dim_v());
    let heads = batch.num_heads;
    let kv_heads = cache.layout().num_kv_heads;
    if heads % kv_heads != 0 {
        return Err(KvqError::InvalidArgument(format!(
            "{heads} query heads do not group over {kv_heads} KV heads"
        )));
    }
    let rows: usize = batch
        .seqs
        .iter()
        .map(|s| s.q_start + s.q_len)
        .max()
        .unwrap_or(0);
    if q.len() < rows * heads * dk || out.len() < rows * heads * dv {
        return Err(KvqError::InvalidArgument(format!(
            "attention: q has {} values and out {}, {rows} rows need {} and {}",
            q.len(),
            out.len(),
            rows * heads * dk,
            rows * heads * dv
        )));
    }
    let group = heads / kv_heads;
    let block_size = cache.block_size();

    for seq in &batch.seqs {
        if seq.q_len > seq.context_len
            || seq.context_len > seq.block_table.blocks.len() * block_size
        {
            return Err(KvqError::InvalidArgument(format!(
                "sequence with {} query tokens and context {} over {} blocks",
                seq.q_len,
                seq.context_len,
                seq.block_table.blocks.len()
            )));
        }
    }
    // One task per (sequence, KV head): each reads its cached tokens once for the whole group.
    let tasks: Vec<(usize, usize)> = (0..batch.seqs.len())
        .flat_map(|s| (0..kv_heads).map(move |h| (s, h)))
        .collect();
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(s, kvh)| {
            let g = GroupQuery {
                q,
                seq: &batch.seqs[s],
                kvh,
                heads,
                group,
                scale: batch.scale,
            };
            attend_group(cache, layer, &g)
        })
        .collect();
    for (&(s, kvh), res) in tasks.iter().zip(&results) {
        let seq = &batch.seqs[s];
        for i in 0..seq.q_len {
            for g in 0..group {
                let h = kvh * group + g;
                out[((seq.q_start + i) * heads + h) * dv..][..dv]
                    .copy_from_slice(&res[(i * group + g) * dv..][..dv]);
            }
        }
    }
    Ok(())
}

/// The query rows of one GQA group of one sequence.
struct GroupQuery<'a> {
    q: &'a [f32],
    seq: &'a SeqSlice<'a>,
    kvh: usize,
    heads: usize,
    group: usize,
    scale: f32,
}

/// Online-softmax attention of one group's query rows over one sequence's cached tokens;
/// returns `[q_len, group, dv]` in the model domain.
fn attend_group(cache: &PagedKvCache, layer: usize, g: &GroupQuery<'_>) -> Vec<f32> {
    let codec = cache.codec().as_ref();
    let (dk, dv) = (codec.head_dim_k(), codec.head_dim_v());
    let (k_domain, v_domain) = (codec.k_domain(), codec.v_domain());
    let (seq, group) = (g.seq, g.group);
    let first_pos = seq.context_len - seq.q_len;
    let n = seq.q_len * group;
    // Query rows of this group, mapped into the K domain once.
    let mut qs = vec![0f32; n * dk];
    for i in 0..seq.q_len {
        for j in 0..group {
            let h = g.kvh * group + j;
            let src = ((seq.q_start + i) * g.heads + h) * dk;
            let dst = &mut qs[(i * group + j) * dk..][..dk];
            dst.copy_from_slice(&g.q[src..src + dk]);
            k_domain.forward(dst);
        }
    }
    let mut max = vec![f32::NEG_INFINITY; n];
    let mut sum = vec![0f32; n];
    let mut acc = vec![0f32; n * dv];
    let block_size = cache.block_size();
    for t in 0..seq.context_len {
        let slot = seq.block_table.slot(t, block_size);
        let (kd, km) = cache.k_entry(layer, slot, g.kvh);
        let (vd, vm) = cache.v_entry(layer, slot, g.kvh);
        // Rows that may see token t: query positions ≥ t.
        let first_row = t.saturating_sub(first_pos);
        for r in first_row * group..n {
            let s = codec.score_k(&qs[r * dk..][..dk], kd, km) * g.scale;
            let m_new = max[r].max(s);
            let correction = (max[r] - m_new).exp();
            let p = (s - m_new).exp();
            max[r] = m_new;
            sum[r] = sum[r] * correction + p;
            let a = &mut acc[r * dv..][..dv];
            if correction != 1.0 {
                a.iter_mut().for_each(|x| *x *= correction);
            }
            codec.accumulate_v(p, vd, vm, a);
        }
    }
    for r in 0..n {
        let inv = 1.0 / sum[r];
        let o = &mut acc[r * dv..][..dv];
        o.iter_mut().for_each(|x| *x *= inv);
        v_domain.inverse(o);
    }
    acc
}
