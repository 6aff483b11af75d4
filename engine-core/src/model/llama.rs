//! One forward step of a Llama-family model over a batch of sequences.

use std::sync::{Mutex, MutexGuard};

use crate::attention::{AttentionBatch, RecentTail, SeqSlice};
use crate::backend::AttentionBackend;
use crate::cache::{BlockTable, PagedKvCache, RecentWindow};
use crate::error::KvqError;
use crate::model_spec::ModelSpec;
use crate::ops::linear::{Linear, Path};
use crate::ops::norm::rms_norm;
use crate::ops::rope::Rope;
use crate::ops::{add_assign, silu_mul};

/// Weights of one transformer block.
#[derive(Debug, Clone)]
pub struct LlamaLayer {
    pub attn_norm: Vec<f32>,
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Linear,
    pub w_up: Linear,
    pub w_down: Linear,
}

/// A Llama-family model: f32 activations, matrices in f32 or in the file's block format.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    pub spec: ModelSpec,
    /// `[vocab, hidden]`; also the output head when `lm_head` is `None` (tied).
    embed: Linear,
    layers: Vec<LlamaLayer>,
    final_norm: Vec<f32>,
    lm_head: Option<Linear>,
    rope: Rope,
}

/// One sequence's tokens for this step.
#[derive(Debug, Clone)]
pub struct SeqInput<'a> {
    /// New tokens (the whole prompt chunk for prefill, one token for decode).
    pub tokens: &'a [u32],
    /// Position of `tokens[0]` (tokens already in the cache).
    pub start_pos: usize,
    /// Blocks holding positions `0..start_pos + tokens.len()` (reserved by the caller).
    pub block_table: &'a BlockTable,
    /// The sequence's recent window when the engine keeps one (`engine.recent_window`): it
    /// must end at `start_pos` (or be cleared for a recompute from 0) and ends after this
    /// chunk once the pass is done.
    pub window: Option<&'a Mutex<RecentWindow>>,
}

/// Which rows get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// The last token of each sequence (generation).
    LastToken,
    /// Every token (teacher-forced evaluation).
    AllTokens,
}

/// Locks every sequence's recent window for the pass; a window that does not end where its
/// chunk starts is cleared when the chunk starts at 0 (a recompute) and an error otherwise.
pub fn lock_windows<'a>(
    seqs: &'a [SeqInput<'_>],
) -> Result<Vec<Option<MutexGuard<'a, RecentWindow>>>, KvqError> {
    seqs.iter()
        .map(|seq| {
            let Some(w) = seq.window else { return Ok(None) };
            let mut w = w.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if w.end() != seq.start_pos {
                if seq.start_pos != 0 {
                    return Err(KvqError::InvalidArgument(format!(
                        "recent window ends at position {} but the chunk starts at {}",
                        w.end(),
                        seq.start_pos
                    )));
                }
                w.clear();
            }
            Ok(Some(w))
        })
        .collect()
}

/// Checks that sequence `i` has at least `logit_rows[i]` ≥ 1 tokens, for every sequence.
pub fn check_logit_rows(seqs: &[SeqInput<'_>], logit_rows: &[usize]) -> Result<(), KvqError> {
    if logit_rows.len() != seqs.len()
        || seqs
            .iter()
            .zip(logit_rows)
            .any(|(s, &n)| n == 0 || n > s.tokens.len())
    {
        return Err(KvqError::InvalidArgument(format!(
            "logit rows {logit_rows:?} do not fit {} sequences of {:?} tokens",
            seqs.len(),
            seqs.iter().map(|s| s.tokens.len()).collect::<Vec<_>>()
        )));
    }
    Ok(())
}

impl LogitsFor {
    /// How many trailing tokens of each sequence get logits.
    pub fn rows(self, seqs: &[SeqInput<'_>]) -> Vec<usize> {
        match self {
            LogitsFor::LastToken => vec![1; seqs.len()],
            LogitsFor::AllTokens => seqs.iter().map(|s| s.tokens.len()).collect(),
        }
    }
}

impl LlamaModel {
    /// A model with an f32 embedding table (`[vocab, hidden]`); `lm_head` `None` ties the
    /// output head to it.
    pub fn new(
        spec: ModelSpec,
        embed: Vec<f32>,
        layers: Vec<LlamaLayer>,
        final_norm: Vec<f32>,
        lm_head: Option<Linear>,
    ) -> Self {
        let embed = Linear::new(embed, spec.vocab_size, spec.hidden_size);
        Self::from_linears(spec, embed, layers, final_norm, lm_head)
    }

    /// Like [`LlamaModel::new`] with the embedding table in any [`Linear`] format (a
    /// quantized one is dequantized a row per lookup and, when tied, used quantized as the
    /// output head).
    pub fn from_linears(
        spec: ModelSpec,
        embed: Linear,
        layers: Vec<LlamaLayer>,
        final_norm: Vec<f32>,
        lm_head: Option<Linear>,
    ) -> Self {
        assert_eq!(
            (embed.out_dim, embed.in_dim),
            (spec.vocab_size, spec.hidden_size),
            "embedding shape"
        );
        let rope = Rope::new(
            spec.head_dim_k,
            spec.rope_theta,
            spec.max_position_embeddings.max(1),
        );
        Self {
            spec,
            embed,
            layers,
            final_norm,
            lm_head,
            rope,
        }
    }

    /// The output head (the embedding table when tied).
    pub fn lm_head(&self) -> &Linear {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The embedding table.
    pub fn embeddings(&self) -> &Linear {
        &self.embed
    }

    pub fn layers(&self) -> &[LlamaLayer] {
        &self.layers
    }

    /// The final RMSNorm's weight.
    pub fn final_norm(&self) -> &[f32] {
        &self.final_norm
    }

    /// The rotary embedding tables the forward pass uses.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Runs the model on `seqs`, writing their K/V into `cache` and returning logits
    /// (`[rows, vocab]`, rows as `which` says, sequences in order).
    pub fn forward(
        &self,
        backend: &dyn AttentionBackend,
        cache: &mut PagedKvCache,
        seqs: &[SeqInput<'_>],
        which: LogitsFor,
    ) -> Result<Vec<f32>, KvqError> {
        self.forward_with(backend, cache, seqs, which, Path::Auto, Path::Auto)
    }

    /// Like [`LlamaModel::forward`] with the product path of the layers' matrices and of the
    /// output head chosen (quantized weights only). The scheduler fixes them so that a row's
    /// result does not depend on how many other rows share the call.
    pub fn forward_with(
        &self,
        backend: &dyn AttentionBackend,
        cache: &mut PagedKvCache,
        seqs: &[SeqInput<'_>],
        which: LogitsFor,
        layers: Path,
        head: Path,
    ) -> Result<Vec<f32>, KvqError> {
        self.forward_rows(backend, cache, seqs, &which.rows(seqs), layers, head)
    }

    /// Like [`LlamaModel::forward_with`], with logits for the last `logit_rows[i]` tokens of
    /// sequence `i` (speculative verification scores the last token and every draft after
    /// it); rows are sequences in order, each sequence's positions in order.
    pub fn forward_rows(
        &self,
        backend: &dyn AttentionBackend,
        cache: &mut PagedKvCache,
        seqs: &[SeqInput<'_>],
        logit_rows: &[usize],
        layers: Path,
        head: Path,
    ) -> Result<Vec<f32>, KvqError> {
        check_logit_rows(seqs, logit_rows)?;
        let paths = (layers, head);
        if rayon::current_thread_index().is_some() {
            return self.forward_in_pool(backend, cache, seqs, logit_rows, paths);
        }
        // Run the whole pass on a pool thread: the hundreds of parallel kernels of one step
        // then fork and join inside the pool, instead of each one waking the pool from outside
        // and putting this thread to sleep until it is done.
        rayon::scope(|_| self.forward_in_pool(backend, cache, seqs, logit_rows, paths))
    }

    fn forward_in_pool(
        &self,
        backend: &dyn AttentionBackend,
        cache: &mut PagedKvCache,
        seqs: &[SeqInput<'_>],
        logit_rows: &[usize],
        (path, head): (Path, Path),
    ) -> Result<Vec<f32>, KvqError> {
        let s = &self.spec;
        let (hd, heads, kvh) = (s.hidden_size, s.num_heads, s.num_kv_heads);
        let (dk, dv) = (s.head_dim_k, s.head_dim_v);
        let block_size = cache.block_size();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut tokens = Vec::new();
        let mut slices = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let end = seq.start_pos + seq.tokens.len();
            if end > self.rope.max_positions() {
                return Err(KvqError::InvalidArgument(format!(
                    "position {end} exceeds the model's context of {} tokens",
                    self.rope.max_positions()
                )));
            }
            if end > seq.block_table.blocks.len() * block_size {
                return Err(KvqError::InvalidArgument(format!(
                    "{end} tokens need more than the {} blocks reserved",
                    seq.block_table.blocks.len()
                )));
            }
            slices.push(SeqSlice {
                q_start: positions.len(),
                q_len: seq.tokens.len(),
                context_len: end,
                block_table: seq.block_table,
                recent: None,
            });
            for (i, &t) in seq.tokens.iter().enumerate() {
                if t as usize >= s.vocab_size {
                    return Err(KvqError::InvalidArgument(format!(
                        "token id {t} outside the vocabulary of {}",
                        s.vocab_size
                    )));
                }
                let pos = seq.start_pos + i;
                positions.push(pos);
                slots.push(seq.block_table.slot(pos, block_size));
                tokens.push(t);
            }
        }
        let rows = positions.len();
        let mut windows = lock_windows(seqs)?;
        let mut tails = vec![(Vec::new(), Vec::new()); seqs.len()];
        let batch = AttentionBatch {
            seqs: slices,
            num_heads: heads,
            scale: 1.0 / (dk as f32).sqrt(),
        };
        let mut x = vec![0f32; rows * hd];
        for (xr, &t) in x.chunks_exact_mut(hd).zip(&tokens) {
            self.embed.row_into(t as usize, xr);
        }
        // Every activation buffer once per call, reused by all layers.
        let ff = s.intermediate_size;
        let mut h = vec![0f32; rows * hd];
        let mut q = vec![0f32; rows * heads * dk];
        let mut k = vec![0f32; rows * kvh * dk];
        let mut v = vec![0f32; rows * kvh * dv];
        let mut attn = vec![0f32; rows * heads * dv];
        let mut o = vec![0f32; rows * hd];
        let mut gate = vec![0f32; rows * ff];
        let mut up = vec![0f32; rows * ff];
        for (l, layer) in self.layers.iter().enumerate() {
            h.copy_from_slice(&x);
            rms_norm(&mut h, &layer.attn_norm, s.rms_norm_eps);
            Linear::forward_many(
                &[&layer.wq, &layer.wk, &layer.wv],
                &h,
                &mut [&mut q, &mut k, &mut v],
                path,
            );
            for (r, &pos) in positions.iter().enumerate() {
                self.rope.apply(&mut q[r * heads * dk..][..heads * dk], pos);
                self.rope.apply(&mut k[r * kvh * dk..][..kvh * dk], pos);
            }
            backend.write_kv(cache, l, &k, &v, &slots)?;
            if windows.iter().any(Option::is_some) {
                let codec = cache.codec_of(l).clone();
                let mut firsts = vec![0; seqs.len()];
                for (i, w) in windows.iter().enumerate() {
                    if let Some(w) = w {
                        let sl = &batch.seqs[i];
                        let (r0, r1) = (sl.q_start * kvh, (sl.q_start + sl.q_len) * kvh);
                        let (tk, tv) = &mut tails[i];
                        let chunk = (&k[r0 * dk..r1 * dk], &v[r0 * dv..r1 * dv]);
                        firsts[i] = w.tail(l, seqs[i].start_pos, chunk, codec.as_ref(), (tk, tv));
                    }
                }
                let layer_batch = AttentionBatch {
                    seqs: batch
                        .seqs
                        .iter()
                        .enumerate()
                        .map(|(i, sl)| SeqSlice {
                            recent: windows[i].as_ref().map(|w| RecentTail {
                                window: w.len(),
                                first: firsts[i],
                                kv_heads: kvh,
                                k: &tails[i].0,
                                v: &tails[i].1,
                            }),
                            ..sl.clone()
                        })
                        .collect(),
                    num_heads: batch.num_heads,
                    scale: batch.scale,
                };
                backend.attend(cache, l, &q, &layer_batch, &mut attn)?;
                for (i, w) in windows.iter_mut().enumerate() {
                    if let Some(w) = w {
                        w.keep(l, firsts[i], (&tails[i].0, &tails[i].1));
                    }
                }
            } else {
                backend.attend(cache, l, &q, &batch, &mut attn)?;
            }
            layer.wo.forward_into_with(&attn, &mut o, path);
            add_assign(&mut x, &o);
            h.copy_from_slice(&x);
            rms_norm(&mut h, &layer.ffn_norm, s.rms_norm_eps);
            Linear::forward_many(
                &[&layer.w_gate, &layer.w_up],
                &h,
                &mut [&mut gate, &mut up],
                path,
            );
            silu_mul(&mut gate, &up);
            layer.w_down.forward_into_with(&gate, &mut o, path);
            add_assign(&mut x, &o);
        }
        for (w, seq) in windows.iter_mut().zip(seqs) {
            if let Some(w) = w {
                w.advance(seq.tokens.len());
            }
        }
        let mut last = if batch
            .seqs
            .iter()
            .zip(logit_rows)
            .all(|(q, &n)| n == q.q_len)
        {
            x
        } else {
            batch
                .seqs
                .iter()
                .zip(logit_rows)
                .flat_map(|(q, &n)| {
                    x[(q.q_start + q.q_len - n) * hd..][..n * hd]
                        .iter()
                        .copied()
                })
                .collect()
        };
        rms_norm(&mut last, &self.final_norm, s.rms_norm_eps);
        let out_head = self.lm_head();
        let mut logits = vec![0f32; last.len() / hd * out_head.out_dim];
        out_head.forward_into_with(&last, &mut logits, head);
        Ok(logits)
    }
}
