//! First-come-first-served batching over the paged cache: admission by free blocks, one
//! forward per step for every running sequence (prompt chunks and single decode tokens
//! together), and preemption by recomputation when blocks run out, so a request is delayed but
//! never lost.

use std::collections::VecDeque;

use super::detok::IncrementalDecoder;
use super::request::{FinishReason, Request, TokenEvent};
use crate::backend::AttentionBackend;
use crate::cache::{BlockPool, BlockTable, PagedKvCache};
use crate::error::KvqError;
use crate::loader::Tokenizer;
use crate::model::{LlamaModel, LogitsFor, SeqInput};
use crate::sampling::Sampler;

/// Limits the scheduler works within.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerLimits {
    pub max_batch_size: usize,
    pub session_len: usize,
    /// Prompt tokens processed per step over all sequences (chunked prefill).
    pub max_prefill_tokens: usize,
}

struct Sequence {
    index: usize,
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose K/V are in the cache.
    cached: usize,
    table: BlockTable,
    sampler: Sampler,
    stop_ids: Vec<u32>,
    detok: IncrementalDecoder,
    finished: Option<FinishReason>,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// Counters of one step, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub preempted: usize,
}

/// Holds waiting and running sequences and advances them one forward pass at a time.
pub struct Scheduler {
    limits: SchedulerLimits,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    finished: Vec<Sequence>,
    eos: Option<u32>,
    next_index: usize,
}

impl Scheduler {
    pub fn new(limits: SchedulerLimits, eos: Option<u32>) -> Self {
        Self {
            limits,
            waiting: VecDeque::new(),
            running: Vec::new(),
            finished: Vec::new(),
            eos,
            next_index: 0,
        }
    }

    /// Queues a request; returns its index. A prompt that cannot fit the session is refused.
    pub fn submit(&mut self, req: Request) -> Result<usize, KvqError> {
        if req.prompt.is_empty() {
            return Err(KvqError::InvalidArgument("empty prompt".into()));
        }
        if req.prompt.len() >= self.limits.session_len {
            return Err(KvqError::InvalidArgument(format!(
                "prompt of {} tokens does not fit session_len {} (it needs room for at least one new token)",
                req.prompt.len(),
                self.limits.session_len
            )));
        }
        req.params.validate().map_err(KvqError::InvalidArgument)?;
        let index = self.next_index;
        self.next_index += 1;
        self.waiting.push_back(Sequence {
            index,
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            cached: 0,
            table: BlockTable::default(),
            sampler: Sampler::new(req.params),
            stop_ids: req.stop_ids,
            detok: IncrementalDecoder::new(),
            finished: None,
        });
        Ok(index)
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Finished sequences as (index, tokens after the prompt, prompt length, reason).
    pub fn take_finished(&mut self) -> Vec<(usize, Vec<u32>, usize, FinishReason)> {
        self.finished
            .drain(..)
            .map(|s| {
                let reason = s.finished.expect("finished");
                (
                    s.index,
                    s.tokens[s.prompt_len..].to_vec(),
                    s.prompt_len,
                    reason,
                )
            })
            .collect()
    }

    /// Admits waiting sequences while blocks and batch slots allow (first come, first served:
    /// a request that does not fit blocks the ones behind it).
    fn admit(&mut self, pool: &mut BlockPool, block_size: usize) {
        while self.running.len() < self.limits.max_batch_size {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            if seq
                .table
                .reserve(pool, seq.tokens.len() + 1, block_size)
                .is_err()
            {
                break;
            }
            let seq = self.waiting.pop_front().expect("front exists");
            self.running.push(seq);
        }
    }

    /// Releases the blocks of the most recently admitted sequence and puts it back at the head
    /// of the queue; it will recompute its K/V when readmitted.
    fn preempt_last(&mut self, pool: &mut BlockPool) -> Result<(), KvqError> {
        let mut seq = self.running.pop().expect("a running sequence");
        seq.table.release_all(pool)?;
        seq.cached = 0;
        self.waiting.push_front(seq);
        Ok(())
    }

    /// Runs one forward pass over the running batch and samples a token for every sequence
    /// whose prompt is fully processed.
    pub fn step(
        &mut self,
        model: &LlamaModel,
        backend: &dyn AttentionBackend,
        cache: &mut PagedKvCache,
        pool: &mut BlockPool,
        tokenizer: &Tokenizer,
        events: &mut Vec<TokenEvent>,
    ) -> Result<StepStats, KvqError> {
        let block_size = cache.block_size();
        let mut stats = StepStats::default();
        self.admit(pool, block_size);
        // Every running sequence needs room for its pending tokens.
        let mut i = 0;
        while i < self.running.len() {
            let need = self.running[i].tokens.len();
            if self.running[i]
                .table
                .reserve(pool, need, block_size)
                .is_ok()
            {
                i += 1;
                continue;
            }
            if self.running.len() == 1 {
                return Err(KvqError::OutOfBlocks(format!(
                    "one sequence of {need} tokens needs more blocks than the cache has ({}); raise cache_max_entry_count or cache_memory_gib",
                    pool.num_blocks()
                )));
            }
            self.preempt_last(pool)?;
            stats.preempted += 1;
        }
        if self.running.is_empty() {
            if let Some(seq) = self.waiting.front() {
                return Err(KvqError::OutOfBlocks(format!(
                    "a prompt of {} tokens needs more blocks than the cache has ({})",
                    seq.tokens.len(),
                    pool.num_blocks()
                )));
            }
            return Ok(stats);
        }
        // Chunked prefill: each sequence contributes its pending tokens within the budget.
        let mut budget = self.limits.max_prefill_tokens.max(1);
        let mut chunks = Vec::with_capacity(self.running.len());
        for seq in &self.running {
            let pending = seq.tokens.len() - seq.cached;
            let take = if pending <= 1 {
                pending
            } else {
                pending.min(budget.max(1))
            };
            if pending > 1 {
                budget = budget.saturating_sub(take);
            }
            chunks.push(take);
        }
        let inputs: Vec<SeqInput<'_>> = self
            .running
            .iter()
            .zip(&chunks)
            .filter(|(_, &n)| n > 0)
            .map(|(s, &n)| SeqInput {
                tokens: &s.tokens[s.cached..s.cached + n],
                start_pos: s.cached,
                block_table: &s.table,
            })
            .collect();
        let logits = model.forward(backend, cache, &inputs, LogitsFor::LastToken)?;
        let vocab = model.spec.vocab_size;
        let mut row = 0;
        for (seq, &n) in self.running.iter_mut().zip(&chunks) {
            if n == 0 {
                continue;
            }
            let was_prefill = n > 1 || seq.cached < seq.prompt_len;
            seq.cached += n;
            let l = &logits[row * vocab..(row + 1) * vocab];
            row += 1;
            if was_prefill {
                stats.prefill_tokens += n;
            } else {
                stats.decode_tokens += 1;
            }
            if seq.cached < seq.tokens.len() {
                continue; // more of the prompt to go
            }
            let token = seq.sampler.sample(l, &seq.tokens);
            seq.tokens.push(token);
            let mut text = seq.detok.push(tokenizer, token)?;
            let stop = Some(token) == self.eos || seq.stop_ids.contains(&token);
            let finished = if stop {
                Some(FinishReason::Stop)
            } else if seq.generated() >= seq.sampler.params().max_new_tokens
                || seq.tokens.len() >= self.limits.session_len
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            if finished.is_some() {
                text.push_str(&seq.detok.flush(tokenizer)?);
            }
            seq.finished = finished;
            events.push(TokenEvent {
                request: seq.index,
                token,
                text,
                finished,
            });
        }
        let (done, still): (Vec<_>, Vec<_>) =
            self.running.drain(..).partition(|s| s.finished.is_some());
        self.running = still;
        for mut seq in done {
            seq.table.release_all(pool)?;
            self.finished.push(seq);
        }
        Ok(stats)
    }
}
