//! Paged attention on the CPU, reading packed K/V bytes through the codec, with an online
//! softmax so no score matrix and no dequantized cache is built.
//!
//! Work is split per (sequence, KV head), by chunks of query rows (prefill) and by fixed
//! ranges of cached tokens whose softmax states are merged afterwards (so that one decode row
//! over three KV heads still uses every thread); the split never depends on the batch, so a
//! row's result does not either.
//! Each task walks its tokens a tile at a time: the tile's K and V are decoded once into small
//! f32 buffers and shared by every query row of the GQA group that may see them (causal), the
//! way the GPU kernel shares a KV tile among a group's query heads; scores, exponentials and
//! the weighted sum of V then run as vector loops (AVX2 when the CPU has it).

use std::ops::Range;

use rayon::prelude::*;

use crate::ops::simd::{Lanes, Portable};

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
    /// The recent window, when the cache keeps one: each row reads its last `window` tokens
    /// from here instead of through the codec.
    pub recent: Option<RecentTail<'a>>,
}

/// A sequence's recent tokens at the model dtype (see [`crate::cache::RecentWindow`]): K rows
/// `[tokens][kv_heads][dk]` and V rows likewise, for positions from `first`, in the domain the
/// codec's sides decode to.
#[derive(Debug, Clone, Copy)]
pub struct RecentTail<'a> {
    pub window: usize,
    pub first: usize,
    pub kv_heads: usize,
    pub k: &'a [f32],
    pub v: &'a [f32],
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
    attention_with(cache, layer, q, batch, out, None)
}

/// [`paged_attention`] with the vector kernels chosen (`Some(false)`: portable; `None`: the
/// best this CPU runs).
fn attention_with(
    cache: &PagedKvCache,
    layer: usize,
    q: &[f32],
    batch: &AttentionBatch<'_>,
    out: &mut [f32],
    use_avx2: Option<bool>,
) -> Result<(), KvqError> {
    if layer >= cache.num_layers() {
        return Err(KvqError::InvalidArgument(format!(
            "attention over layer {layer} of a cache of {} layers",
            cache.num_layers()
        )));
    }
    let codec = cache.codec_of(layer).as_ref();
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
    // Every query row mapped into the K domain and scaled once, not once per task (a row's
    // token pieces would each rotate it again).
    let k_domain = codec.k_domain();
    let mut qd = q[..rows * heads * dk].to_vec();
    qd.par_chunks_mut(dk * heads * 16).for_each(|c| {
        for r in c.chunks_exact_mut(dk) {
            k_domain.forward(r);
            r.iter_mut().for_each(|x| *x *= batch.scale);
        }
    });
    let tasks = plan_tasks(batch, kv_heads);
    let avx2 = use_avx2.unwrap_or_else(crate::ops::simd::has_avx2);
    let partials: Vec<Partial> = tasks
        .par_iter()
        .map(|t| {
            let g = GroupQuery {
                q: &qd,
                seq: &batch.seqs[t.seq],
                kvh: t.kvh,
                heads,
                group,
            };
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
                return unsafe { attend_task_avx2(cache, layer, &g, t) };
            }
            let _ = avx2;
            attend_task::<Portable>(cache, layer, &g, t)
        })
        .collect();
    // Merge the token splits of each (sequence, head, rows) and write the normalized output.
    let v_domain = codec.v_domain();
    let mut i = 0;
    while i < tasks.len() {
        let t = &tasks[i];
        let mut j = i + 1;
        while j < tasks.len() && tasks[j].same_rows(t) {
            j += 1;
        }
        let mut merged = partials[i].clone();
        for p in &partials[i + 1..j] {
            merged.merge(p, dv);
        }
        let seq = &batch.seqs[t.seq];
        for (r, (acc, &l)) in merged.acc.chunks_exact(dv).zip(&merged.l).enumerate() {
            let (pos, g) = (t.rows.start + r / group, r % group);
            let h = t.kvh * group + g;
            let o = &mut out[((seq.q_start + pos) * heads + h) * dv..][..dv];
            let inv = 1.0 / l;
            o.iter_mut().zip(acc).for_each(|(o, a)| *o = a * inv);
            v_domain.inverse(o);
        }
        i = j;
    }
    Ok(())
}

/// Tokens decoded and scored together: one K tile and one V tile of this many tokens.
const TILE: usize = 32;
/// Query positions per task when a sequence brings many (prefill).
const ROW_CHUNK: usize = 32;
/// Cached tokens per task: the context is cut at fixed multiples of this, and the pieces'
/// softmax states merged in order, so that even one decode row keeps every thread busy.
const SPLIT: usize = 256;

/// One unit of parallel work: some query positions of one sequence and KV head, against a
/// range of its cached tokens.
#[derive(Debug, Clone)]
struct Task {
    seq: usize,
    kvh: usize,
    /// Query positions (indices into the sequence's rows of this step).
    rows: Range<usize>,
    /// Cached tokens scored by this task (a later row may see more than an earlier one).
    tokens: Range<usize>,
}

impl Task {
    fn same_rows(&self, o: &Task) -> bool {
        (self.seq, self.kvh, &self.rows) == (o.seq, o.kvh, &o.rows)
    }
}

/// Splits the batch into tasks: each sequence's query positions into chunks of
/// [`ROW_CHUNK`], and the tokens each chunk sees into pieces at multiples of [`SPLIT`]. Token
/// pieces of the same rows are adjacent, in token order.
///
/// The boundaries depend only on token positions, never on the batch, the chunking of a
/// prompt or the thread count, and a row's arithmetic does not depend on which other rows
/// share its task: every row gets bit-identical results however it is batched.
fn plan_tasks(batch: &AttentionBatch<'_>, kv_heads: usize) -> Vec<Task> {
    let mut tasks = Vec::new();
    for (s, seq) in batch.seqs.iter().enumerate() {
        let first_pos = seq.context_len - seq.q_len;
        for kvh in 0..kv_heads {
            for r0 in (0..seq.q_len).step_by(ROW_CHUNK) {
                let r1 = (r0 + ROW_CHUNK).min(seq.q_len);
                let visible = first_pos + r1;
                for t0 in (0..visible).step_by(SPLIT) {
                    tasks.push(Task {
                        seq: s,
                        kvh,
                        rows: r0..r1,
                        tokens: t0..(t0 + SPLIT).min(visible),
                    });
                }
            }
        }
    }
    tasks
}

/// The query rows of one GQA group of one sequence.
struct GroupQuery<'a> {
    /// Every query row of the batch, already in the K domain and scaled.
    q: &'a [f32],
    seq: &'a SeqSlice<'a>,
    kvh: usize,
    heads: usize,
    group: usize,
}

/// Online-softmax state of some query rows over some tokens: running max `m`, sum of
/// `exp(s − m)` `l`, and `Σ exp(s − m) · V` `acc` (`[rows, dv]`, in the V domain).
#[derive(Debug, Clone)]
struct Partial {
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
}

impl Partial {
    /// Adds the state of the same rows over other tokens.
    fn merge(&mut self, o: &Partial, dv: usize) {
        for r in 0..self.m.len() {
            let m = self.m[r].max(o.m[r]);
            if m == f32::NEG_INFINITY {
                continue; // neither saw a token
            }
            let weight = |x: f32| {
                if x == f32::NEG_INFINITY {
                    0.0
                } else {
                    (x - m).exp()
                }
            };
            let (a, b) = (weight(self.m[r]), weight(o.m[r]));
            self.l[r] = self.l[r] * a + o.l[r] * b;
            let acc = &mut self.acc[r * dv..][..dv];
            for (x, y) in acc.iter_mut().zip(&o.acc[r * dv..][..dv]) {
                *x = *x * a + y * b;
            }
            self.m[r] = m;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_task_avx2(
    cache: &PagedKvCache,
    layer: usize,
    g: &GroupQuery<'_>,
    t: &Task,
) -> Partial {
    attend_task::<crate::ops::simd::Avx2>(cache, layer, g, t)
}

/// Online-softmax attention of one task's query rows over its tokens, a tile at a time: the
/// tile's K and V are decoded once (one codec call per token) for every row of the group,
/// then scored and accumulated with the vector kernels of `L`.
#[inline(always)]
fn attend_task<L: Lanes>(
    cache: &PagedKvCache,
    layer: usize,
    g: &GroupQuery<'_>,
    t: &Task,
) -> Partial {
    let codec = cache.codec_of(layer).as_ref();
    let (dk, dv) = (codec.head_dim_k(), codec.head_dim_v());
    let (seq, group) = (g.seq, g.group);
    let first_pos = seq.context_len - seq.q_len;
    let n = t.rows.len() * group;
    // The group's query heads of one position are adjacent: row r of the task is query head
    // `kvh · group + r % group` of position `rows.start + r / group`.
    let q_row = |r: usize| {
        let (i, j) = (t.rows.start + r / group, r % group);
        &g.q[((seq.q_start + i) * g.heads + g.kvh * group + j) * dk..][..dk]
    };
    let row_pos: Vec<usize> = (0..n)
        .map(|r| first_pos + t.rows.start + r / group)
        .collect();
    let mut m = vec![f32::NEG_INFINITY; n];
    let mut l = vec![0f32; n];
    let mut acc = vec![0f32; n * dv];
    let mut kt = vec![0f32; TILE * dk];
    let mut vt = vec![0f32; TILE * dv];
    let mut s = [0f32; TILE];
    let mut exact = (Vec::new(), Vec::new());
    let block_size = cache.block_size();
    // No row of the task sees past its last position.
    let end = t.tokens.end.min(first_pos + t.rows.end);
    let mut t0 = t.tokens.start;
    while t0 < end {
        let t1 = (t0 + TILE).min(end);
        // One codec call per run of the tile's tokens that share a block.
        let mut j = 0;
        while j < t1 - t0 {
            let (blk, off) = ((t0 + j) / block_size, (t0 + j) % block_size);
            let count = (block_size - off).min(t1 - t0 - j);
            let block = seq.block_table.blocks[blk] as usize;
            let [kd, km, vd, vm] = cache.kv_run_in_block(layer, block, off, count, g.kvh);
            codec.decode_k_run(kd, km, &mut kt[j * dk..][..count * dk]);
            codec.decode_v_run(vd, vm, &mut vt[j * dv..][..count * dv]);
            j += count;
        }
        for (r, &pos) in row_pos.iter().enumerate() {
            if pos < t0 {
                continue; // causal: this row sees nothing of the tile
            }
            let cnt = (pos + 1).min(t1) - t0;
            let s = &mut s[..cnt];
            let (kr, vr) = match &seq.recent {
                Some(x) if pos + 1 < t0 + cnt + x.window => {
                    with_recent(x, g.kvh, (t0, cnt, pos), (&kt, &vt), &mut exact)
                }
                _ => (&kt[..cnt * dk], &vt[..cnt * dv]),
            };
            // SAFETY: `L`'s features are enabled here (see `attend_task_avx2`).
            unsafe { L::dots(q_row(r), kr, s) };
            let tile_max = unsafe { L::max(s) };
            let m_new = m[r].max(tile_max);
            let correction = if m[r] == f32::NEG_INFINITY {
                0.0
            } else {
                (m[r] - m_new).exp()
            };
            let sum = unsafe { L::exp_sub_sum(s, m_new) };
            l[r] = l[r] * correction + sum;
            unsafe { L::scale_accumulate(&mut acc[r * dv..][..dv], correction, s, vr) };
            m[r] = m_new;
        }
        t0 = t1;
    }
    Partial { m, l, acc }
}

/// The `cnt` decoded tokens from `t0` that the row at `pos` sees, with those in
/// `(pos - window, pos]` taken from the recent tail instead (`buf` holds the result).
fn with_recent<'a>(
    x: &RecentTail<'_>,
    kvh: usize,
    (t0, cnt, pos): (usize, usize, usize),
    (kt, vt): (&[f32], &[f32]),
    buf: &'a mut (Vec<f32>, Vec<f32>),
) -> (&'a [f32], &'a [f32]) {
    let (dk, dv) = (kt.len() / TILE, vt.len() / TILE);
    buf.0.clear();
    buf.0.extend_from_slice(&kt[..cnt * dk]);
    buf.1.clear();
    buf.1.extend_from_slice(&vt[..cnt * dv]);
    for tok in (pos + 1).saturating_sub(x.window).max(t0).max(x.first)..t0 + cnt {
        let (i, j) = ((tok - x.first) * x.kv_heads + kvh, tok - t0);
        buf.0[j * dk..][..dk].copy_from_slice(&x.k[i * dk..][..dk]);
        buf.1[j * dv..][..dv].copy_from_slice(&x.v[i * dv..][..dv]);
    }
    (&buf.0[..], &buf.1[..])
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cache::{BlockPool, BlockTable, CacheLayout};
    use crate::codec::{float_codec, KvCodec};
    use crate::testing::{fresh_seed, gaussian, poisoned, rng, AttentionProblem};
    use crate::KvDtype;

    /// A cache holding `seqs` sequences of the given lengths (random K/V, f32 so decoding is
    /// exact), with shuffled block tables.
    struct Setup {
        cache: PagedKvCache,
        lens: Vec<usize>,
        tables: Vec<BlockTable>,
        k: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
    }

    const BLOCK: usize = 16;

    fn setup(seed: u64, lens: &[usize], kv_heads: usize, dk: usize, dv: usize) -> Setup {
        let codec: Arc<dyn KvCodec> = Arc::new(float_codec(dk, dv, KvDtype::F32));
        setup_with(seed, lens, kv_heads, codec)
    }

    /// [`setup`] with any codec.
    fn setup_with(seed: u64, lens: &[usize], kv_heads: usize, codec: Arc<dyn KvCodec>) -> Setup {
        let (dk, dv) = (codec.head_dim_k(), codec.head_dim_v());
        let blocks: usize = lens.iter().map(|&n| n.div_ceil(BLOCK)).sum::<usize>() + 2;
        let layout =
            CacheLayout::token_major(codec.k_bytes(), codec.v_bytes(), 2, kv_heads, BLOCK, 64);
        let mut cache = PagedKvCache::new(layout, codec, blocks);
        let mut pool = BlockPool::new(blocks);
        let mut r = rng(seed);
        let (mut tables, mut ks, mut vs) = (vec![], vec![], vec![]);
        for &n in lens {
            let mut t = BlockTable::default();
            t.reserve(&mut pool, n, BLOCK).unwrap();
            t.blocks.reverse();
            let slots: Vec<usize> = (0..n).map(|p| t.slot(p, BLOCK)).collect();
            let k = gaussian(&mut r, n * kv_heads * dk);
            let v = gaussian(&mut r, n * kv_heads * dv);
            cache.write(1, &k, &v, &slots).unwrap();
            tables.push(t);
            ks.push(k);
            vs.push(v);
        }
        Setup {
            cache,
            lens: lens.to_vec(),
            tables,
            k: ks,
            v: vs,
        }
    }

    fn run(
        st: &Setup,
        seqs: &[(usize, usize)],
        q: &[f32],
        heads: usize,
        dv: usize,
        avx2: Option<bool>,
    ) -> Vec<f32> {
        run_with_recent(st, seqs, q, (heads, dv), avx2, None)
    }

    /// [`run`] with a recent tail for every sequence.
    fn run_with_recent(
        st: &Setup,
        seqs: &[(usize, usize)],
        q: &[f32],
        (heads, dv): (usize, usize),
        avx2: Option<bool>,
        recent: Option<RecentTail<'_>>,
    ) -> Vec<f32> {
        // (sequence, query rows ending the sequence)
        let mut q_start = 0;
        let slices: Vec<SeqSlice<'_>> = seqs
            .iter()
            .map(|&(s, q_len)| {
                let sl = SeqSlice {
                    q_start,
                    q_len,
                    context_len: st.lens[s],
                    block_table: &st.tables[s],
                    recent,
                };
                q_start += q_len;
                sl
            })
            .collect();
        let batch = AttentionBatch {
            seqs: slices,
            num_heads: heads,
            scale: 0.125,
        };
        let mut out = poisoned(q_start * heads * dv);
        attention_with(&st.cache, 1, q, &batch, &mut out, avx2).unwrap();
        out
    }

    /// Dense f64 attention of the last `q_rows` positions of the setup's first sequence.
    fn dense_want(
        st: &Setup,
        q: &[f32],
        (heads, kv_heads): (usize, usize),
        q_rows: usize,
        d: usize,
    ) -> Vec<f32> {
        let p = AttentionProblem {
            heads,
            kv_heads,
            tokens: st.lens[0],
            block_size: BLOCK,
            q: q.to_vec(),
            k: st.k[0].clone(),
            v: st.v[0].clone(),
            q_rows,
        };
        p.dense_reference(&st.k[0], &st.v[0], d, d)
    }

    /// Prefill rows over several row chunks and token splits, against dense f64 attention.
    #[test]
    fn long_prefill_matches_dense_reference_with_both_kernels() {
        let seed = fresh_seed("cpu attention long prefill");
        let (heads, kv_heads, d, tokens, q_rows) = (6, 2, 64, 3 * SPLIT + 45, ROW_CHUNK * 2 + 7);
        let st = setup(seed, &[tokens], kv_heads, d, d);
        let q = gaussian(&mut rng(seed ^ 1), q_rows * heads * d);
        let want = dense_want(&st, &q, (heads, kv_heads), q_rows, d);
        let mut kernels = vec![Some(false)];
        if crate::ops::simd::has_avx2() {
            kernels.push(Some(true));
        }
        for avx2 in kernels {
            let got = run(&st, &[(0, q_rows)], &q, heads, d, avx2);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 2e-4 * (1.0 + w.abs()),
                    "avx2 {avx2:?}: output {i}: {g} vs {w} (seed {seed})"
                );
            }
        }
    }

    /// With a recent tail covering the context, attention over a lossy cache (f16, plain
    /// and Hadamard-rotated) reads every token from the tail and matches dense attention over
    /// the exact K/V; without it the cache's rounding shows.
    #[test]
    fn recent_tail_replaces_the_decoded_tokens() {
        use crate::codec::{Domain, FloatSide, KvPair, Rotated};
        use crate::ops::hadamard::wht_normalized;
        let seed = fresh_seed("cpu attention recent tail");
        let (heads, kv_heads, d, tokens, q_rows) = (6, 2, 64, SPLIT + 45, 40);
        let f16 = || FloatSide {
            dim: d,
            dtype: KvDtype::F16,
        };
        let rotated = || Rotated {
            inner: f16(),
            dtype: KvDtype::F16,
        };
        let codecs: [Arc<dyn KvCodec>; 2] = [
            Arc::new(KvPair::new("f16", None, Arc::new(f16()), Arc::new(f16()))),
            Arc::new(KvPair::new(
                "f16r",
                None,
                Arc::new(rotated()),
                Arc::new(rotated()),
            )),
        ];
        for codec in codecs {
            let name = codec.name().to_string();
            let st = setup_with(seed, &[tokens], kv_heads, codec.clone());
            let q: Vec<f32> = gaussian(&mut rng(seed ^ 1), q_rows * heads * d)
                .iter()
                .map(|x| 4.0 * x)
                .collect();
            let want = dense_want(&st, &q, (heads, kv_heads), q_rows, d);
            // the tail holds values in the domain the codec decodes to
            let domain = |x: &[f32], dom: Domain| {
                let mut x = x.to_vec();
                if dom == Domain::Hadamard {
                    x.chunks_exact_mut(d).for_each(wht_normalized);
                }
                x
            };
            let (tk, tv) = (
                domain(&st.k[0], codec.k_domain()),
                domain(&st.v[0], codec.v_domain()),
            );
            let tail = RecentTail {
                window: tokens,
                first: 0,
                kv_heads,
                k: &tk,
                v: &tv,
            };
            let mut worst = [0f32; 2];
            for (i, recent) in [None, Some(tail)].into_iter().enumerate() {
                let got = run_with_recent(&st, &[(0, q_rows)], &q, (heads, d), None, recent);
                for (g, w) in got.iter().zip(&want) {
                    assert!(g.is_finite(), "{name}: output {g}");
                    worst[i] = worst[i].max((g - w).abs() / (1.0 + w.abs()));
                }
            }
            assert!(
                worst[1] <= 2e-5,
                "{name}: recent tail off by {} (seed {seed})",
                worst[1]
            );
            assert!(
                worst[0] > 10.0 * worst[1],
                "{name}: the f16 cache alone is as close ({} vs {}): the test tests nothing",
                worst[0],
                worst[1]
            );
        }
    }

    /// A row's output is bit-identical alone, in a batch, and inside a prefill chunk.
    #[test]
    fn rows_are_batch_invariant() {
        let seed = fresh_seed("cpu attention batch invariance");
        let (heads, kv_heads, d) = (9, 3, 64);
        let lens = [SPLIT * 2 + 10, 40, SPLIT + 3];
        let st = setup(seed, &lens, kv_heads, d, d);
        let mut r = rng(seed ^ 7);
        let chunk = 50;
        let q_chunk = gaussian(&mut r, chunk * heads * d);
        let last = &q_chunk[(chunk - 1) * heads * d..];
        let alone = run(&st, &[(0, 1)], last, heads, d, None);
        let q_other = gaussian(&mut r, 2 * heads * d);
        let mut q_batch = q_other[..heads * d].to_vec();
        q_batch.extend_from_slice(last);
        q_batch.extend_from_slice(&q_other[heads * d..]);
        let batched = run(&st, &[(1, 1), (0, 1), (2, 1)], &q_batch, heads, d, None);
        assert_eq!(
            alone,
            batched[heads * d..2 * heads * d],
            "decode row alone vs batched"
        );
        let prefill = run(&st, &[(0, chunk)], &q_chunk, heads, d, None);
        assert_eq!(
            alone,
            prefill[(chunk - 1) * heads * d..],
            "decode row vs prefill chunk"
        );
    }
}
