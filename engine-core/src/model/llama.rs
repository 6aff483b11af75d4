//! One forward step of a Llama-family model over a batch of sequences.

use crate::attention::{AttentionBatch, SeqSlice};
use crate::backend::AttentionBackend;
use crate::cache::{BlockTable, PagedKvCache};
use crate::error::KvqError;
use crate::model_spec::ModelSpec;
use crate::ops::linear::Linear;
use crate::ops::norm::{rms_norm, rms_norm_to};
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

/// A Llama-family model in f32.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    pub spec: ModelSpec,
    /// `[vocab, hidden]`; `None` when tied to the output head.
    embed: Option<Vec<f32>>,
    layers: Vec<LlamaLayer>,
    final_norm: Vec<f32>,
    lm_head: Linear,
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
}

/// Which rows get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// The last token of each sequence (generation).
    LastToken,
    /// Every token (teacher-forced evaluation, speculative verification).
    AllTokens,
}

impl LlamaModel {
    pub fn new(
        spec: ModelSpec,
        embed: Vec<f32>,
        layers: Vec<LlamaLayer>,
        final_norm: Vec<f32>,
        lm_head: Option<Linear>,
    ) -> Self {
        let rope = Rope::new(
            spec.head_dim_k,
            spec.rope_theta,
            spec.max_position_embeddings.max(1),
        );
        let (embed, lm_head) = match lm_head {
            Some(head) => (Some(embed), head),
            None => (None, Linear::new(embed, spec.vocab_size, spec.hidden_size)),
        };
        Self {
            spec,
            embed,
            layers,
            final_norm,
            lm_head,
            rope,
        }
    }

    fn embedding(&self, token: u32) -> &[f32] {
        let h = self.spec.hidden_size;
        let table = self.embed.as_deref().unwrap_or(&self.lm_head.weight);
        &table[token as usize * h..][..h]
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
        let s = &self.spec;
        let (hd, heads, kvh) = (s.hidden_size, s.num_heads, s.num_kv_heads);
        let (dk, dv) = (s.head_dim_k, s.head_dim_v);
        let block_size = cache.block_size();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut x = Vec::new();
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
                x.extend_from_slice(self.embedding(t));
            }
        }
        let rows = positions.len();
        let batch = AttentionBatch {
            seqs: slices,
            num_heads: heads,
            scale: 1.0 / (dk as f32).sqrt(),
        };
        let mut attn = vec![0f32; rows * heads * dv];
        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm_to(&x, &layer.attn_norm, s.rms_norm_eps);
            let mut q = layer.wq.forward(&h);
            let mut k = layer.wk.forward(&h);
            let v = layer.wv.forward(&h);
            for (r, &pos) in positions.iter().enumerate() {
                self.rope.apply(&mut q[r * heads * dk..][..heads * dk], pos);
                self.rope.apply(&mut k[r * kvh * dk..][..kvh * dk], pos);
            }
            backend.write_kv(cache, l, &k, &v, &slots)?;
            backend.attend(cache, l, &q, &batch, &mut attn)?;
            add_assign(&mut x, &layer.wo.forward(&attn));
            let h = rms_norm_to(&x, &layer.ffn_norm, s.rms_norm_eps);
            let mut gate = layer.w_gate.forward(&h);
            silu_mul(&mut gate, &layer.w_up.forward(&h));
            add_assign(&mut x, &layer.w_down.forward(&gate));
        }
        let mut last = match which {
            LogitsFor::AllTokens => x,
            LogitsFor::LastToken => batch
                .seqs
                .iter()
                .flat_map(|q| x[(q.q_start + q.q_len - 1) * hd..][..hd].iter().copied())
                .collect(),
        };
        rms_norm(&mut last, &self.final_norm, s.rms_norm_eps);
        Ok(self.lm_head.forward(&last))
    }
}
