//! Continuous batching over the paged cache, first come first served: requests join the
//! running batch as soon as blocks and batch slots allow and leave it the step they finish or
//! are cancelled; every step is one forward pass over all running sequences (prompt chunks
//! and single decode tokens together, prompts chunked so long ones do not stall decoding);
//! when blocks run out the most recently admitted sequence is preempted (its blocks freed, its
//! K/V recomputed when it is readmitted), so a request is delayed but never lost.
//!
//! With speculative decoding on, a decoding sequence also feeds n-gram draft tokens after its
//! last token ([`super::ngram`]); the one forward pass scores every draft, the sampler picks
//! each position's token in order, and drafts are kept while they equal what it picked.
//! Because a row's logits do not depend on the other rows of its call and each position is
//! sampled exactly as it would be without drafts (same context, same random draw), the output
//! is token for token what decoding without speculation gives, at any temperature; rejected
//! drafts' cache entries are dropped (the sequence shrinks back and gives up the blocks past
//! its length).

use std::collections::VecDeque;
use std::sync::Mutex;

use super::detok::IncrementalDecoder;
use super::ngram;
use super::request::{FinishReason, GenerationOutput, Request, TokenEvent};
use super::stop::StopMatcher;
use crate::backend::AttentionBackend;
use crate::cache::{BlockPool, BlockTable, PagedKvCache, PrefixKey, RecentWindow};
use crate::error::KvqError;
use crate::loader::Tokenizer;
use crate::model::{ForwardPass, SeqInput};
use crate::ops::linear::{Kernel, Path, DEQUANT_MIN_ROWS};
use crate::sampling::{Sampler, TokenLogprobs};

/// Limits the scheduler works within.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerLimits {
    pub max_batch_size: usize,
    /// Most tokens (prompt + generated) of one sequence; a sequence that reaches it finishes
    /// with [`FinishReason::Length`]. At most the cache's token capacity, so a sequence
    /// running alone always fits.
    pub session_len: usize,
    /// Prompt tokens processed per step over all sequences (chunked prefill).
    pub max_prefill_tokens: usize,
    /// Draft tokens verified per decoding sequence and step (n-gram speculation); 0 is off.
    pub num_speculative_tokens: usize,
}

struct Sequence {
    index: usize,
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose K/V are in the cache.
    cached: usize,
    table: BlockTable,
    /// Prefix-cache keys of the first full blocks of `tokens` (computed as needed).
    block_keys: Vec<PrefixKey>,
    /// Blocks of `table` already indexed in the pool's prefix cache.
    registered: usize,
    /// The recent window (`engine.recent_window`) while running: given on admission, dropped
    /// on preemption (the recompute rebuilds it), so only running sequences hold one, as the
    /// planner reserved.
    window: Option<Mutex<RecentWindow>>,
    sampler: Sampler,
    stop_ids: Vec<u32>,
    stop: StopMatcher,
    detok: IncrementalDecoder,
    /// Text released so far (what the events carried).
    text: String,
    /// Log-probabilities of the generated tokens, when the request asked for them.
    logprobs: Option<Vec<TokenLogprobs>>,
    /// Log-probabilities of prompt tokens `1..=len` (entry `i` from position `i`'s logits),
    /// when the request asked for them.
    prompt_logprobs: Option<Vec<TokenLogprobs>>,
    /// Ended by EOS or a stop id (that token is not part of the answer).
    ended_by_token: bool,
    finished: Option<FinishReason>,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Whether a chunk starting at position `from` must return a logits row per token: the
    /// request wants prompt log-probabilities and some prompt token from `from + 1` on has
    /// none yet.
    fn scores_prompt_from(&self, from: usize) -> bool {
        self.prompt_logprobs
            .as_ref()
            .is_some_and(|lp| lp.len() + 1 < self.prompt_len && from + 1 < self.prompt_len)
    }

    /// With prefix caching, starts an empty table with the cached blocks of this sequence's
    /// longest cached prefix and counts their tokens as computed; at least one token is left
    /// to compute (its logits are needed). A request still to score its prompt takes none:
    /// it needs every prompt row.
    fn share_cached_prefix(&mut self, pool: &mut BlockPool, block_size: usize) -> usize {
        if !pool.caches_prefixes() || !self.table.blocks.is_empty() || self.scores_prompt_from(0) {
            return 0;
        }
        let blocks = (self.tokens.len() - 1) / block_size;
        PrefixKey::extend(&mut self.block_keys, &self.tokens, block_size, blocks);
        let shared = self.table.share_prefix(pool, &self.block_keys[..blocks]);
        self.cached = shared * block_size;
        self.registered = shared;
        self.cached
    }

    /// Indexes the blocks that are now full of computed K/V in the pool's prefix cache.
    fn register_full_blocks(&mut self, pool: &mut BlockPool, block_size: usize) {
        if !pool.caches_prefixes() {
            return;
        }
        let full = self.cached / block_size;
        PrefixKey::extend(&mut self.block_keys, &self.tokens, block_size, full);
        for i in self.registered..full {
            pool.register(self.table.blocks[i], self.block_keys[i]);
        }
        self.registered = self.registered.max(full);
    }

    /// Records the log-probability of the prompt token after position `pos` from that
    /// position's logits, once and in order (a recompute after preemption scores again
    /// positions it already has).
    fn record_prompt_logprob(&mut self, pos: usize, logits: &[f32]) {
        let n = self.sampler.params().prompt_logprobs;
        if let (Some(all), Some(n)) = (&mut self.prompt_logprobs, n) {
            if pos + 1 < self.prompt_len && pos == all.len() {
                all.push(TokenLogprobs::from_logits(logits, self.tokens[pos + 1], n));
            }
        }
    }

    /// Draft tokens this sequence may verify this step: none unless it is decoding (one
    /// pending token after at least one generated), and never so many that the drafts and
    /// the token after them would pass `max_new_tokens` or the session length.
    fn draft_room(&self, limits: &SchedulerLimits) -> usize {
        if limits.num_speculative_tokens == 0
            || self.generated() == 0
            || self.cached + 1 != self.tokens.len()
        {
            return 0;
        }
        let left_new = self.sampler.params().max_new_tokens - self.generated();
        let left_session = limits.session_len.saturating_sub(self.tokens.len());
        limits
            .num_speculative_tokens
            .min(left_new.saturating_sub(1))
            .min(left_session.saturating_sub(1))
    }

    /// Samples the next token from its logits row (or takes the greedy token the device
    /// picked), appends it and works out whether it ends the request (EOS or stop id,
    /// `max_new_tokens`, session length, stop string); returns the event to stream.
    fn push_sampled(
        &mut self,
        row: RowOutput<'_>,
        eos: Option<u32>,
        session_len: usize,
        tokenizer: &Tokenizer,
    ) -> Result<TokenEvent, KvqError> {
        let (token, logprobs) = match row {
            RowOutput::Logits(logits) => {
                let token = self.sampler.sample(logits, &self.tokens, self.prompt_len);
                let logprobs = self
                    .sampler
                    .params()
                    .logprobs
                    .map(|n| TokenLogprobs::from_logits(logits, token, n));
                (token, logprobs)
            }
            // Only plain greedy requests, which want no log-probabilities, come this way.
            RowOutput::Greedy(token) => (token, None),
        };
        self.tokens.push(token);
        let piece = self.detok.push(tokenizer, token)?;
        let eos = Some(token) == eos && !self.sampler.params().ignore_eos;
        let stop = eos || self.stop_ids.contains(&token);
        // A stop token is not part of the text, but it was sampled: its log-probability is
        // reported (as vLLM does), so there is one entry per completion token.
        if let (Some(all), Some(lp)) = (&mut self.logprobs, &logprobs) {
            all.push(lp.clone());
        }
        let mut finished = if stop {
            Some(FinishReason::Stop)
        } else if self.generated() >= self.sampler.params().max_new_tokens
            || self.tokens.len() >= session_len
        {
            Some(FinishReason::Length)
        } else {
            None
        };
        // The stop token's own text is not part of the answer.
        let piece = if stop {
            String::new()
        } else if finished.is_some() {
            piece + &self.detok.flush(tokenizer)?
        } else {
            piece
        };
        let (mut text, hit) = self.stop.push(&piece);
        if hit {
            finished = Some(FinishReason::Stop);
        } else if finished.is_some() {
            text.push_str(&self.stop.flush());
        }
        self.ended_by_token = stop;
        self.finished = finished;
        self.text.push_str(&text);
        Ok(TokenEvent {
            request: self.index,
            token,
            text,
            finished,
            logprobs,
            // The prompt is scored once its prefill is done, which the first token follows.
            prompt_logprobs: if self.generated() == 1 {
                self.prompt_logprobs.clone()
            } else {
                None
            },
        })
    }

    fn output(self) -> (usize, GenerationOutput) {
        let mut ids = self.tokens[self.prompt_len..].to_vec();
        let completion_tokens = ids.len();
        if self.ended_by_token {
            ids.pop();
        }
        let output = GenerationOutput {
            text: self.text,
            token_ids: ids,
            prompt_tokens: self.prompt_len,
            completion_tokens,
            finish_reason: self.finished.expect("finished"),
            logprobs: self.logprobs,
            prompt_logprobs: self.prompt_logprobs,
        };
        (self.index, output)
    }
}

/// Counters of one step, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    pub prefill_tokens: usize,
    /// Sequences that decoded (each emits one token, more when drafts are accepted).
    pub decode_tokens: usize,
    pub preempted: usize,
    /// Speculative draft tokens scored this step.
    pub drafted: usize,
    /// Drafts equal to the token the sampler picked at their position (kept).
    pub accepted: usize,
    /// Tokens of admitted requests found in the prefix cache (not computed).
    pub prefix_hit_tokens: usize,
}

/// Holds waiting and running sequences and advances them one forward pass at a time.
pub struct Scheduler {
    limits: SchedulerLimits,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    finished: Vec<Sequence>,
    eos: Option<u32>,
    next_index: usize,
    /// An empty recent window, cloned for every sequence (`None`: off).
    window: Option<RecentWindow>,
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
            window: None,
        }
    }

    /// Gives every sequence submitted from now on a copy of `window` (empty).
    pub fn with_recent_window(mut self, window: Option<RecentWindow>) -> Self {
        self.window = window;
        self
    }

    pub fn limits(&self) -> &SchedulerLimits {
        &self.limits
    }

    /// Changes the limits; they apply from the next step.
    pub fn set_limits(&mut self, limits: SchedulerLimits) {
        self.limits = limits;
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
        if req.params.max_new_tokens == 0 {
            return Err(KvqError::InvalidArgument(
                "max_new_tokens must be at least 1".into(),
            ));
        }
        let index = self.next_index;
        self.next_index += 1;
        let logprobs = req.params.logprobs.map(|_| Vec::new());
        let prompt_logprobs = req.params.prompt_logprobs.map(|_| Vec::new());
        self.waiting.push_back(Sequence {
            index,
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            cached: 0,
            table: BlockTable::default(),
            block_keys: Vec::new(),
            registered: 0,
            window: None,
            sampler: Sampler::new(req.params),
            stop_ids: req.stop_ids,
            stop: StopMatcher::new(req.stop),
            detok: IncrementalDecoder::new(),
            text: String::new(),
            logprobs,
            prompt_logprobs,
            ended_by_token: false,
            finished: None,
        });
        Ok(index)
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// The device window slots of the running sequences, and whether a waiting one holds a
    /// window (for slot checks).
    #[cfg(test)]
    pub(super) fn window_slots(&self) -> (Vec<usize>, bool) {
        let slot = |s: &Sequence| {
            s.window
                .as_ref()
                .map(|w| w.lock().expect("unpoisoned").device_slot())
        };
        (
            self.running.iter().filter_map(slot).collect(),
            self.waiting.iter().any(|s| s.window.is_some()),
        )
    }

    /// Distinct blocks held by waiting and running sequences (a shared prefix block counts
    /// once), for accounting checks.
    #[cfg(test)]
    pub(super) fn held_blocks(&self) -> usize {
        let held: std::collections::HashSet<u32> = self
            .waiting
            .iter()
            .chain(&self.running)
            .flat_map(|s| s.table.blocks.iter().copied())
            .collect();
        held.len()
    }

    /// Tokens and blocks of each running sequence (for accounting checks).
    #[cfg(test)]
    pub(super) fn running_lengths(&self) -> Vec<(usize, usize)> {
        self.running
            .iter()
            .map(|s| (s.tokens.len(), s.table.blocks.len()))
            .collect()
    }

    /// Removes request `index` wherever it is, returning its blocks to `pool`. Returns whether
    /// it was still there (a finished request whose output was taken is not).
    pub fn cancel(&mut self, index: usize, pool: &mut BlockPool) -> Result<bool, KvqError> {
        if let Some(i) = self.waiting.iter().position(|s| s.index == index) {
            let mut seq = self.waiting.remove(i).expect("position exists");
            seq.table.release_all(pool)?;
            return Ok(true);
        }
        if let Some(i) = self.running.iter().position(|s| s.index == index) {
            let mut seq = self.running.remove(i);
            seq.table.release_all(pool)?;
            return Ok(true);
        }
        if let Some(i) = self.finished.iter().position(|s| s.index == index) {
            self.finished.remove(i);
            return Ok(true);
        }
        Ok(false)
    }

    /// Cancels every request (e.g. after a failed step); returns their indices.
    pub fn cancel_all(&mut self, pool: &mut BlockPool) -> Result<Vec<usize>, KvqError> {
        let mut cancelled = Vec::new();
        for mut seq in self.waiting.drain(..).chain(self.running.drain(..)) {
            seq.table.release_all(pool)?;
            cancelled.push(seq.index);
        }
        cancelled.extend(self.finished.drain(..).map(|s| s.index));
        Ok(cancelled)
    }

    /// Finished requests as (index, output), in the order they finished.
    pub fn take_finished(&mut self) -> Vec<(usize, GenerationOutput)> {
        self.finished.drain(..).map(Sequence::output).collect()
    }

    /// Admits waiting sequences while blocks and batch slots allow (first come, first served:
    /// a request that does not fit blocks the ones behind it); returns the tokens they found
    /// in the prefix cache.
    fn admit(&mut self, pool: &mut BlockPool, block_size: usize) -> Result<usize, KvqError> {
        let mut hits = 0;
        while self.running.len() < self.limits.max_batch_size {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            // A recent window must see every token computed: no sharing with one.
            let shared = match self.window {
                None => seq.share_cached_prefix(pool, block_size),
                Some(_) => 0,
            };
            if seq
                .table
                .reserve(pool, seq.tokens.len() + 1, block_size)
                .is_err()
            {
                // Give shared blocks back: they are taken again when it fits.
                seq.table.release_all(pool)?;
                (seq.cached, seq.registered) = (0, 0);
                break;
            }
            hits += shared;
            let mut seq = self.waiting.pop_front().expect("front exists");
            let slot = self.free_window_slot();
            seq.window = self
                .window
                .clone()
                .map(|w| Mutex::new(w.with_device_slot(slot)));
            self.running.push(seq);
        }
        Ok(hits)
    }

    /// The lowest device window slot no running sequence holds (fewer than `max_batch_size`
    /// sequences run, so it is below that: a device runner keeps that many rings).
    fn free_window_slot(&self) -> usize {
        let held: Vec<usize> = self
            .running
            .iter()
            .filter_map(|s| s.window.as_ref())
            .map(|w| {
                w.lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .device_slot()
            })
            .collect();
        (0..)
            .find(|slot| !held.contains(slot))
            .expect("a free slot")
    }

    /// Releases the blocks of the most recently admitted sequence and puts it back at the head
    /// of the queue; it will recompute its K/V when readmitted.
    fn preempt_last(&mut self, pool: &mut BlockPool) -> Result<(), KvqError> {
        let mut seq = self.running.pop().expect("a running sequence");
        seq.table.release_all(pool)?;
        (seq.cached, seq.registered) = (0, 0);
        seq.window = None;
        self.waiting.push_front(seq);
        Ok(())
    }

    /// Drafts of every running sequence (empty where it does not speculate), appended to its
    /// tokens for this step's pass, with blocks reserved for them. Drafts only use blocks
    /// that are free: a sequence speculates less, never preempts another, for want of room.
    fn propose_drafts(
        &mut self,
        pool: &mut BlockPool,
        block_size: usize,
    ) -> Result<Vec<Vec<u32>>, KvqError> {
        let mut drafts = vec![Vec::new(); self.running.len()];
        for (seq, draft) in self.running.iter_mut().zip(&mut drafts) {
            let room = seq.draft_room(&self.limits);
            if room == 0 {
                continue;
            }
            let mut d = ngram::propose(&seq.tokens, room);
            let fits = (seq.table.blocks.len() + pool.num_free()) * block_size;
            d.truncate(fits.saturating_sub(seq.tokens.len()));
            if d.is_empty() {
                continue;
            }
            seq.table
                .reserve(pool, seq.tokens.len() + d.len(), block_size)?;
            seq.tokens.extend_from_slice(&d);
            *draft = d;
        }
        Ok(drafts)
    }

    /// Runs one forward pass over the running batch and samples a token for every sequence
    /// whose prompt is fully processed.
    pub fn step(
        &mut self,
        model: &mut dyn ForwardPass,
        backend: &dyn AttentionBackend,
        cache: &mut PagedKvCache,
        pool: &mut BlockPool,
        tokenizer: &Tokenizer,
        events: &mut Vec<TokenEvent>,
    ) -> Result<StepStats, KvqError> {
        let block_size = cache.block_size();
        let mut stats = StepStats {
            prefix_hit_tokens: self.admit(pool, block_size)?,
            ..Default::default()
        };
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
        let drafts = self.propose_drafts(pool, block_size)?;
        // Chunked prefill: each sequence contributes its pending tokens within the budget (a
        // prompt that finds it spent waits for the next step; decode tokens and drafts do
        // not count).
        let mut budget = self.limits.max_prefill_tokens.max(1);
        let mut chunks = Vec::with_capacity(self.running.len());
        for (seq, d) in self.running.iter().zip(&drafts) {
            let pending = seq.tokens.len() - seq.cached;
            let take = if pending <= 1 + d.len() {
                pending
            } else {
                pending.min(budget)
            };
            if pending > 1 + d.len() {
                budget -= take;
            }
            chunks.push(take);
        }
        let logits =
            forward_batch_invariant(model, backend, cache, &self.running, &chunks, &drafts)?;
        let mut rows = logits.rows.iter();
        let running = self.running.iter_mut().zip(&chunks).zip(&drafts);
        for (k, ((seq, &n), draft)) in running.enumerate() {
            if n == 0 {
                continue;
            }
            let was_prefill = n > 1 + draft.len() || seq.cached < seq.prompt_len;
            seq.cached += n;
            let rows = rows.next().expect("logits rows per sequence");
            for &(first, from, count) in &logits.prompt_rows[k] {
                for i in 0..count {
                    if let RowOutput::Logits(row) = first.row(&logits, i) {
                        seq.record_prompt_logprob(from + i, row);
                    }
                }
            }
            if was_prefill {
                stats.prefill_tokens += n;
            } else {
                stats.decode_tokens += 1;
            }
            if seq.cached < seq.tokens.len() {
                continue; // more of the prompt to go
            }
            // Take the drafts back out: from here on `tokens` holds only tokens the sampler
            // picked, and position `len - 1 + j` of the pass predicts the (j+1)-th new token.
            let base = seq.tokens.len() - draft.len();
            seq.tokens.truncate(base);
            stats.drafted += draft.len();
            for j in 0..=draft.len() {
                let event = seq.push_sampled(
                    rows.row(&logits, j),
                    self.eos,
                    self.limits.session_len,
                    tokenizer,
                )?;
                let token = event.token;
                events.push(event);
                let kept = j < draft.len() && token == draft[j];
                if kept {
                    stats.accepted += 1;
                }
                if seq.finished.is_some() || !kept {
                    break;
                }
            }
            // K/V are valid up to the token before the newest (the kept drafts'); rejected
            // drafts' entries past that are dropped along with their blocks.
            seq.cached = seq.tokens.len() - 1;
            if !draft.is_empty() {
                seq.table.truncate(pool, seq.cached, block_size)?;
            }
        }
        for seq in &mut self.running {
            seq.register_full_blocks(pool, block_size);
        }
        let (done, still): (Vec<_>, Vec<_>) =
            self.running.drain(..).partition(|s| s.finished.is_some());
        self.running = still;
        for mut seq in done {
            seq.table.release_all(pool)?;
            seq.window = None;
            self.finished.push(seq);
        }
        Ok(stats)
    }
}

/// Where a sequence's logits are: the call (0: long-prompt rows, 1: the others) and its
/// first row there (its last position, or with drafts the position before the first draft,
/// followed by one row per draft).
#[derive(Debug, Clone, Copy)]
struct LogitsRows {
    call: usize,
    row: usize,
}

impl LogitsRows {
    /// The `j`-th of the sequence's rows.
    fn row(self, l: &StepLogits, j: usize) -> RowOutput<'_> {
        let r = self.row + j;
        match &l.calls[self.call] {
            CallOutput::Logits(v) => RowOutput::Logits(&v[r * l.vocab..(r + 1) * l.vocab]),
            CallOutput::Greedy(ids) => RowOutput::Greedy(ids[r]),
        }
    }
}

/// What one forward call returned: logits rows, or, when every sequence in it samples
/// greedily and the runner can pick tokens itself, one token per row.
enum CallOutput {
    Logits(Vec<f32>),
    Greedy(Vec<u32>),
}

/// One row of a [`CallOutput`].
#[derive(Clone, Copy)]
enum RowOutput<'a> {
    Logits(&'a [f32]),
    Greedy(u32),
}

/// The logits of one step: the rows of the two forward calls, per sequence with a chunk
/// where its sampling rows are, and per running sequence the spans of rows it asked for to
/// score its prompt: (first row, position of that row, rows).
struct StepLogits {
    calls: [CallOutput; 2],
    rows: Vec<LogitsRows>,
    prompt_rows: Vec<Vec<(LogitsRows, usize, usize)>>,
    vocab: usize,
}

/// Runs the step's chunks so that no row's result depends on which other rows share the
/// step, and so a request gets the same tokens alone, in any batch, chunked or not, and after
/// a preemption recomputes it. Quantized products differ by path (the dequantizing GEMM keeps
/// activations in f32; the integer kernels quantize each row to 8-bit blocks plus 8-bit
/// residual blocks) and `Path::Auto` picks the path by the call's row count, which batching
/// changes. So the path is fixed by what a row is: the tokens of a prompt of at least
/// [`DEQUANT_MIN_ROWS`] take the path such a prompt gets alone (`Path::auto` for many rows,
/// the dequantizing GEMM), every other row (generated tokens, short prompts) the integer
/// kernels, which treat each row on its own; the output head, one row per sequence, always
/// the integer kernels. When the two paths are the same the step is one call; otherwise a
/// chunk spanning both (a recomputation after preemption) is split, its prompt part running
/// first. A sequence with drafts (always decoding, so in the second call) gets logits for its
/// last token and every draft, each row computed as it would be alone.
fn forward_batch_invariant(
    model: &mut dyn ForwardPass,
    backend: &dyn AttentionBackend,
    cache: &mut PagedKvCache,
    running: &[Sequence],
    chunks: &[usize],
    drafts: &[Vec<u32>],
) -> Result<StepLogits, KvqError> {
    let int = Path::Int(Kernel::best());
    let prompt_path = Path::auto(DEQUANT_MIN_ROWS);
    let split_prompts = prompt_path != int && model.path_dependent();
    let mut inputs: [Vec<SeqInput<'_>>; 2] = [Vec::new(), Vec::new()];
    let mut greedy = [true, true];
    let mut logit_rows: [Vec<usize>; 2] = [Vec::new(), Vec::new()];
    let mut next_row = [0usize; 2];
    let mut last: Vec<Option<LogitsRows>> = vec![None; running.len()];
    let mut prompt_rows = vec![Vec::new(); running.len()];
    for (k, (s, &n)) in running.iter().zip(chunks).enumerate() {
        if n == 0 {
            continue;
        }
        let (start, end) = (s.cached, s.cached + n);
        let split = if split_prompts && s.prompt_len >= DEQUANT_MIN_ROWS {
            s.prompt_len.clamp(start, end)
        } else {
            start
        };
        for (call, (from, to)) in [(start, split), (split, end)].into_iter().enumerate() {
            if to > from {
                let sample_rows = if to == end {
                    (1 + drafts[k].len()).min(to - from)
                } else {
                    1
                };
                let first = LogitsRows {
                    call,
                    row: next_row[call],
                };
                // Scoring a prompt takes every row of its chunk; sampling uses the last ones.
                let rows = if s.scores_prompt_from(from) {
                    prompt_rows[k].push((first, from, to - from));
                    to - from
                } else {
                    sample_rows
                };
                last[k] = Some(LogitsRows {
                    call,
                    row: next_row[call] + rows - sample_rows,
                });
                next_row[call] += rows;
                logit_rows[call].push(rows);
                greedy[call] &= s.sampler.is_plain_greedy();
                inputs[call].push(SeqInput {
                    tokens: &s.tokens[from..to],
                    start_pos: from,
                    block_table: &s.table,
                    window: s.window.as_ref(),
                });
            }
        }
    }
    let mut calls = [
        CallOutput::Logits(Vec::new()),
        CallOutput::Logits(Vec::new()),
    ];
    for (call, layers) in [prompt_path, int].into_iter().enumerate() {
        let (seqs, rows) = (&inputs[call], &logit_rows[call]);
        if seqs.is_empty() {
            continue;
        }
        if greedy[call] {
            if let Some(ids) = model.forward_rows_greedy(backend, cache, seqs, rows) {
                calls[call] = CallOutput::Greedy(ids?);
                continue;
            }
        }
        calls[call] =
            CallOutput::Logits(model.forward_rows(backend, cache, seqs, rows, layers, int)?);
    }
    Ok(StepLogits {
        calls,
        rows: last.into_iter().flatten().collect(),
        prompt_rows,
        vocab: model.spec().vocab_size,
    })
}
