//! The Llama forward pass on a CUDA GPU: weights in f16, GEMMs through cuBLAS, the dense ops in
//! `model.cu`, K/V stored by the store kernel into a [`GpuCache`] (the device copy of
//! `PagedKvCache`'s layout) and attention by the split-K decode kernel over the same packed
//! bytes. Prefill attention runs through that decode kernel too: each prompt row is one query
//! over the first `position + 1` tokens of its sequence (causal), so every codec's
//! dequantization is the verified one.
//!
//! A [`GpuLlama`] is one tensor-parallel rank (the whole model on one GPU); `pass` runs a
//! forward pass in the phases ranks all-reduce between, and [`TpLlama`] (`parallel`) drives
//! the ranks: the engine's CUDA runner, with `tp = 1` as well.

mod parallel;
mod pass;

pub use parallel::TpLlama;

use std::sync::{Arc, MutexGuard};

use cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use engine_core::cache::RecentWindow;
use engine_core::model::{
    check_logit_rows, lock_windows, DeviceRunner, DeviceRunnerRegistration, DeviceRunnerRequest,
    LlamaModel, LogitsFor, SeqInput,
};
use engine_core::{KvqError, ModelSpec};

use crate::blas::{Blas, GpuMatrix};
use crate::cache::GpuCache;
use crate::decode::DecodeWorkspace;
use crate::device::GpuContext;
use crate::spec::{check_decode_layout, KernelKind, Specialization};
use crate::tp::{shard_layer, HostMatrix, LayerSplit, Shard, TpGroup};
use crate::window::{WindowRings, WindowStep, WIN_ROW_FIELDS};
use crate::KernelError;

/// Threads per CTA of the row kernels (`NORM_THREADS` in model.cu).
const ROW_THREADS: u32 = 256;

/// A layer's weights. Projections of the same input are stacked row-wise so each group is one
/// GEMM: `wqkv` is wq, wk, wv (`[q_dim + k_dim + v_dim, hidden]`), `w_gate_up` is w_gate, w_up
/// (`[2·ff, hidden]`).
struct GpuLayer {
    attn_norm: CudaSlice<f32>,
    wqkv: GpuMatrix,
    wo: GpuMatrix,
    ffn_norm: CudaSlice<f32>,
    w_gate_up: GpuMatrix,
    w_down: GpuMatrix,
}

/// The model's kernels of `model.cu`.
struct ModelFns {
    embed: CudaFunction,
    add_rmsnorm: CudaFunction,
    add: CudaFunction,
    rope: CudaFunction,
    silu_mul: CudaFunction,
    to_f16: CudaFunction,
    argmax: CudaFunction,
}

impl ModelFns {
    fn load(gpu: &GpuContext) -> Result<Self, KernelError> {
        let f = |name| gpu.function(KernelKind::Model, &Specialization::MODEL, name);
        Ok(Self {
            embed: f("kvq_embed")?,
            add_rmsnorm: f("kvq_add_rmsnorm")?,
            add: f("kvq_add")?,
            rope: f("kvq_rope")?,
            silu_mul: f("kvq_silu_mul")?,
            to_f16: f("kvq_to_f16")?,
            argmax: f("kvq_argmax")?,
        })
    }
}

/// Activation buffers for up to `rows` rows, grown on demand.
#[derive(Default)]
struct Acts {
    rows: usize,
    bufs: Option<ActBufs>,
}

struct ActBufs {
    x: CudaSlice<f32>,
    o: CudaSlice<f32>,
    h16: CudaSlice<u16>,
    /// The fused QKV GEMM output, `[rows, q_dim + k_dim + v_dim]`.
    qkv: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    /// The fused gate|up GEMM output, `[rows, 2·ff]`.
    gate_up: CudaSlice<f32>,
    ff16: CudaSlice<u16>,
}

/// The per-step inputs, on the device. Tokens, positions and logit rows, read only by the model
/// kernels, share one upload (`packed`, sliced by the accessors); slots, block tables and
/// context lengths are buffers of their own because `GpuCache::store` and `DecodeBatch` take
/// whole `CudaSlice`s.
struct StepInputs {
    packed: CudaSlice<i32>,
    slots: CudaSlice<i32>,
    block_tables: CudaSlice<i32>,
    /// Per row, the tokens attended through the codec (all but a recent window's).
    context_lens: CudaSlice<i32>,
    /// The recent window's `WinRow`s (window.rs): attended, then kept; None without windows.
    window_rows: Option<CudaSlice<i32>>,
    rows: usize,
    out_rows: usize,
    max_blocks: usize,
    max_context: usize,
}

impl StepInputs {
    fn tokens(&self) -> CudaView<'_, i32> {
        self.packed.slice(..self.rows)
    }
    fn positions(&self) -> CudaView<'_, i32> {
        self.packed.slice(self.rows..2 * self.rows)
    }
    fn logit_rows(&self) -> CudaView<'_, i32> {
        self.packed
            .slice(2 * self.rows..2 * self.rows + self.out_rows)
    }
    /// The window rows each row attends to and the ones the rings keep.
    fn window_rows(&self) -> Option<(CudaView<'_, i32>, CudaView<'_, i32>)> {
        let half = WIN_ROW_FIELDS * self.rows;
        self.window_rows
            .as_ref()
            .map(|w| (w.slice(..half), w.slice(half..2 * half)))
    }
}

/// A step's indices on the host, as [`StepInputs`] holds them on each rank's device.
struct HostStep {
    packed: Vec<i32>,
    slots: Vec<i32>,
    tables: Vec<i32>,
    context_lens: Vec<i32>,
    window_rows: Option<Vec<i32>>,
    rows: usize,
    out_rows: usize,
    max_blocks: usize,
    max_context: usize,
}

impl HostStep {
    fn upload(&self, gpu: &GpuContext) -> Result<StepInputs, KernelError> {
        Ok(StepInputs {
            packed: upload(gpu, &self.packed, "tokens, positions and logit rows")?,
            slots: upload(gpu, &self.slots, "slots")?,
            block_tables: upload(gpu, &self.tables, "block tables")?,
            context_lens: upload(gpu, &self.context_lens, "context lengths")?,
            window_rows: self
                .window_rows
                .as_ref()
                .map(|w| upload(gpu, w, "window rows"))
                .transpose()?,
            rows: self.rows,
            out_rows: self.out_rows,
            max_blocks: self.max_blocks,
            max_context: self.max_context,
        })
    }
}

/// Widths of a row of the attention projections' outputs: the fused QKV GEMM's row is
/// `q + k + v` wide, in that order (what `kvq_rope` splits).
struct ProjDims {
    q: usize,
    k: usize,
    v: usize,
    /// The attention output, `wo`'s input.
    attn: usize,
}

impl ProjDims {
    fn of(s: &ModelSpec) -> Self {
        Self {
            q: s.num_heads * s.head_dim_k,
            k: s.num_kv_heads * s.head_dim_k,
            v: s.num_kv_heads * s.head_dim_v,
            attn: s.num_heads * s.head_dim_v,
        }
    }
}

/// A Llama-family model and its KV cache on one GPU.
pub struct GpuLlama {
    gpu: Arc<GpuContext>,
    blas: Blas,
    /// This rank's shape (all of the model's on one GPU): its query and KV heads, its MLP slice.
    spec: ModelSpec,
    /// Rank 0 (or the only GPU): holds the output head and computes the logits.
    computes_logits: bool,
    embed: GpuMatrix,
    lm_head: Option<GpuMatrix>,
    layers: Vec<GpuLayer>,
    final_norm: CudaSlice<f32>,
    rope_cos: CudaSlice<f32>,
    rope_sin: CudaSlice<f32>,
    max_positions: usize,
    fns: ModelFns,
    cache: Option<GpuCache>,
    /// The recent window's rings (`engine.recent_window`), when on.
    windows: Option<WindowRings>,
    acts: Acts,
    decode_ws: DecodeWorkspace,
    logits: Option<CudaSlice<f32>>,
    argmax: Option<CudaSlice<i32>>,
}

fn upload<T: DeviceRepr + ValidAsZeroBits>(
    gpu: &GpuContext,
    x: &[T],
    what: &str,
) -> Result<CudaSlice<T>, KernelError> {
    if x.is_empty() {
        return zeros(gpu, 1, what);
    }
    gpu.stream()
        .clone_htod(x)
        .map_err(|e| KernelError::driver(format!("uploading {what}"), e))
}

/// Uploads `parts` (name, matrix, expected rows) stacked row-wise as one f16
/// `[Σ rows, in_dim]` matrix, so products of one input with all of them are one GEMM. The shapes
/// are checked: the kernels that split a fused GEMM output rely on them.
fn upload_stacked(
    gpu: &GpuContext,
    in_dim: usize,
    parts: &[(&str, &HostMatrix, usize)],
) -> Result<GpuMatrix, KernelError> {
    for &(name, m, rows) in parts {
        if (m.rows, m.cols) != (rows, in_dim) {
            return Err(KernelError::InvalidArgument(format!(
                "{name} is {}×{}, the model's shape needs {rows}×{in_dim}",
                m.rows, m.cols
            )));
        }
    }
    let out_dim = parts.iter().map(|p| p.2).sum();
    let data: Vec<&[f32]> = parts.iter().map(|p| p.1.data.as_slice()).collect();
    GpuMatrix::upload(gpu, &data, out_dim, in_dim)
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    gpu: &GpuContext,
    n: usize,
    what: &str,
) -> Result<CudaSlice<T>, KernelError> {
    gpu.stream()
        .alloc_zeros::<T>(n.max(1))
        .map_err(|e| KernelError::driver(format!("allocating {what}"), e))
}

fn grid_for(n: usize) -> u32 {
    (n as u64).div_ceil(256).clamp(1, 65_535) as u32
}

fn cfg(grid: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn launched(r: Result<(), cudarc::driver::DriverError>, name: &str) -> Result<(), KernelError> {
    r.map(|_| ())
        .map_err(|e| KernelError::driver(format!("launching {name}"), e))
}

impl GpuLlama {
    /// Uploads `model`'s weights (dequantized to f32 on the host, stored as f16) and its RoPE
    /// tables, and compiles the model kernels. The cache comes later ([`GpuLlama::set_cache`]),
    /// sized from the memory left.
    pub fn upload(gpu: &Arc<GpuContext>, model: &LlamaModel) -> Result<Self, KernelError> {
        let embeddings = HostMatrix::from_linear(model.embeddings());
        Self::upload_shard(gpu, model, Shard::new(0, 1)?, &embeddings)
    }

    /// [`GpuLlama::upload`] of tensor-parallel rank `shard`: its query and KV heads and its
    /// slice of the MLP (`crate::tp::shard`); the embeddings on every rank (a lookup needs no
    /// communication), the output head on rank 0 only, which computes the logits.
    /// `embeddings` is `model.embeddings()` in f32, dequantized once for all ranks.
    pub fn upload_shard(
        gpu: &Arc<GpuContext>,
        model: &LlamaModel,
        shard: Shard,
        embeddings: &HostMatrix,
    ) -> Result<Self, KernelError> {
        let full = &model.spec;
        if full.head_dim_k % 2 != 0 {
            // `kvq_rope` pairs each head's halves and finds v after 2·half-wide q and k heads.
            return Err(KernelError::Unsupported(format!(
                "odd key head dimension {} (rotary embedding needs an even one)",
                full.head_dim_k
            )));
        }
        let split = LayerSplit::new(full, shard)?;
        // This rank's model: its heads and MLP slice; hidden size and vocabulary stay whole.
        let s = ModelSpec {
            num_heads: split.heads.len(),
            num_kv_heads: split.kv_heads.len(),
            intermediate_size: split.ff.len(),
            ..full.clone()
        };
        let (hd, ff) = (s.hidden_size, s.intermediate_size);
        let d = ProjDims::of(&s);
        let m = |in_dim, parts: &[(&str, &HostMatrix, usize)]| upload_stacked(gpu, in_dim, parts);
        let layers = model
            .layers()
            .iter()
            .map(|l| {
                let w = shard_layer(l, full, shard)?;
                Ok(GpuLayer {
                    attn_norm: upload(gpu, &l.attn_norm, "attention norm")?,
                    wqkv: m(
                        hd,
                        &[("wq", &w.wq, d.q), ("wk", &w.wk, d.k), ("wv", &w.wv, d.v)],
                    )?,
                    wo: m(d.attn, &[("wo", &w.wo, hd)])?,
                    ffn_norm: upload(gpu, &l.ffn_norm, "FFN norm")?,
                    w_gate_up: m(hd, &[("w_gate", &w.w_gate, ff), ("w_up", &w.w_up, ff)])?,
                    w_down: m(ff, &[("w_down", &w.w_down, hd)])?,
                })
            })
            .collect::<Result<Vec<_>, KernelError>>()?;
        let vocab = s.vocab_size;
        let embed = m(hd, &[("embeddings", embeddings, vocab)])?;
        let tied = std::ptr::eq(model.lm_head(), model.embeddings());
        let lm_head = if shard.rank() != 0 || tied {
            None
        } else {
            let head = HostMatrix::from_linear(model.lm_head());
            Some(m(hd, &[("lm_head", &head, vocab)])?)
        };
        let (cos, sin) = model.rope().tables();
        Ok(Self {
            blas: Blas::new(gpu)?,
            spec: s,
            computes_logits: shard.rank() == 0,
            embed,
            lm_head,
            layers,
            final_norm: upload(gpu, model.final_norm(), "final norm")?,
            rope_cos: upload(gpu, cos, "RoPE cosines")?,
            rope_sin: upload(gpu, sin, "RoPE sines")?,
            max_positions: model.rope().max_positions(),
            fns: ModelFns::load(gpu)?,
            cache: None,
            windows: None,
            acts: Acts::default(),
            decode_ws: DecodeWorkspace::default(),
            logits: None,
            argmax: None,
            gpu: gpu.clone(),
        })
    }

    /// Attaches the paged cache the forward passes store into and attend over; checks that
    /// the decode kernel covers its codec, layout and this model's GQA group.
    pub fn set_cache(&mut self, cache: GpuCache) -> Result<(), KernelError> {
        let s = &self.spec;
        if s.num_kv_heads == 0 || s.num_heads % s.num_kv_heads != 0 {
            return Err(KernelError::Unsupported(format!(
                "{} query heads over {} KV heads",
                s.num_heads, s.num_kv_heads
            )));
        }
        let spec = Specialization {
            group: s.num_heads / s.num_kv_heads,
            ..*cache.spec()
        };
        spec.check_decode()?;
        check_decode_layout(&spec, cache.layout())?;
        if cache.layout().num_layers != self.layers.len()
            || cache.layout().num_kv_heads != s.num_kv_heads
            || spec.head_dim_k != s.head_dim_k
            || spec.head_dim_v != s.head_dim_v
        {
            return Err(KernelError::InvalidArgument(format!(
                "cache of {} layers × {} KV heads (D {}/{}) for a model of {} × {} (D {}/{})",
                cache.layout().num_layers,
                cache.layout().num_kv_heads,
                spec.head_dim_k,
                spec.head_dim_v,
                self.layers.len(),
                s.num_kv_heads,
                s.head_dim_k,
                s.head_dim_v
            )));
        }
        self.cache = Some(cache);
        Ok(())
    }

    /// Keeps a recent window of `n` tokens for up to `slots` sequences at a time (the
    /// scheduler's `max_batch_size`), beside the attached cache.
    pub fn set_recent_window(&mut self, n: usize, slots: usize) -> Result<(), KernelError> {
        let cache = self.cache.as_ref().ok_or_else(|| {
            KernelError::InvalidArgument("attach the cache before its recent window".into())
        })?;
        self.windows = Some(WindowRings::new(cache, n, slots)?);
        Ok(())
    }

    pub fn gpu(&self) -> &Arc<GpuContext> {
        &self.gpu
    }

    pub fn cache(&self) -> Option<&GpuCache> {
        self.cache.as_ref()
    }

    /// Checks the batch as the CPU forward does and builds its indices on the host (once for
    /// every rank: the ranks' caches and windows have the same shape).
    fn host_step(
        &self,
        seqs: &[SeqInput<'_>],
        windows: &[Option<MutexGuard<'_, RecentWindow>>],
        logit_rows: &[usize],
    ) -> Result<HostStep, KvqError> {
        let s = &self.spec;
        let cache = self
            .cache
            .as_ref()
            .ok_or_else(|| KvqError::InvalidArgument("the GPU model has no cache".into()))?;
        let bs = cache.layout().block_size;
        let bad = KvqError::InvalidArgument;
        let max_blocks = seqs
            .iter()
            .map(|q| q.block_table.blocks.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let (mut tokens, mut positions, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        let (mut tables, mut out_rows) = (Vec::new(), Vec::new());
        let mut step = WindowStep::default();
        check_logit_rows(seqs, logit_rows)?;
        for ((seq, &wanted), window) in seqs.iter().zip(logit_rows).zip(windows) {
            let end = seq.start_pos + seq.tokens.len();
            if end > self.max_positions {
                return Err(bad(format!(
                    "position {end} exceeds the model's context of {} tokens",
                    self.max_positions
                )));
            }
            let blocks = &seq.block_table.blocks;
            if end > blocks.len() * bs {
                return Err(bad(format!(
                    "{end} tokens need more than the {} blocks reserved",
                    blocks.len()
                )));
            }
            if let Some(b) = blocks.iter().find(|&&b| b as usize >= cache.num_blocks()) {
                return Err(bad(format!(
                    "block {b} outside the device cache of {} blocks",
                    cache.num_blocks()
                )));
            }
            let mut row_table: Vec<i32> = blocks.iter().map(|&b| b as i32).collect();
            row_table.resize(max_blocks, 0);
            step.push_chunk(
                (seq.start_pos, seq.tokens.len(), tokens.len()),
                window.as_deref(),
                self.windows.as_ref(),
            )?;
            for (i, &t) in seq.tokens.iter().enumerate() {
                if t as usize >= s.vocab_size {
                    return Err(bad(format!(
                        "token id {t} outside the vocabulary of {}",
                        s.vocab_size
                    )));
                }
                let pos = seq.start_pos + i;
                if i + wanted >= seq.tokens.len() {
                    out_rows.push(tokens.len() as i32);
                }
                tokens.push(t as i32);
                positions.push(pos as i32);
                slots.push(seq.block_table.slot(pos, bs) as i32);
                tables.extend_from_slice(&row_table);
            }
        }
        let max_context = step.codec_context.iter().copied().max().unwrap_or(0) as usize;
        Ok(HostStep {
            rows: tokens.len(),
            out_rows: out_rows.len(),
            // The layout the accessors of `StepInputs` slice.
            packed: [&tokens[..], &positions, &out_rows].concat(),
            slots,
            tables,
            window_rows: step.any().then(|| [&step.attend[..], &step.keep].concat()),
            context_lens: step.codec_context,
            max_blocks,
            max_context,
        })
    }

    fn ensure_acts(&mut self, rows: usize) -> Result<(), KernelError> {
        if self.acts.bufs.is_some() && self.acts.rows >= rows {
            return Ok(());
        }
        let s = &self.spec;
        let n = rows.next_power_of_two().max(16);
        let g = &*self.gpu;
        let (hd, ff) = (s.hidden_size, s.intermediate_size);
        let d = ProjDims::of(s);
        let widest = hd.max(d.attn).max(ff);
        self.acts.bufs = Some(ActBufs {
            x: zeros(g, n * hd, "activations")?,
            o: zeros(g, n * hd, "activations")?,
            h16: zeros(g, n * widest, "activations")?,
            qkv: zeros(g, n * (d.q + d.k + d.v), "fused QKV")?,
            q: zeros(g, n * d.q, "queries")?,
            k: zeros(g, n * d.k, "keys")?,
            v: zeros(g, n * d.v, "values")?,
            attn: zeros(g, n * d.attn, "attention output")?,
            gate_up: zeros(g, n * 2 * ff, "FFN gate and up")?,
            ff16: zeros(g, n * ff, "FFN product")?,
        });
        self.acts.rows = n;
        Ok(())
    }

    /// Logits rows (`[rows, vocab]`, rows as `which` says) of `seqs`, storing their K/V.
    pub fn forward(
        &mut self,
        seqs: &[SeqInput<'_>],
        which: LogitsFor,
    ) -> Result<Vec<f32>, KvqError> {
        match forward_ranks(&mut [self], None, seqs, &which.rows(seqs))? {
            0 => Ok(Vec::new()),
            rows => self.logits_of_last(rows),
        }
    }

    /// The logits rows of the last forward pass (rank 0's, with the output head).
    pub fn logits_of_last(&mut self, rows: usize) -> Result<Vec<f32>, KvqError> {
        let g = self.gpu.clone();
        let n = rows * self.spec.vocab_size;
        let logits = self
            .logits
            .as_ref()
            .filter(|l| l.len() >= n)
            .ok_or_else(|| KvqError::InvalidArgument(format!("no logits for {rows} rows")))?;
        let mut host = g
            .stream()
            .clone_dtoh(&logits.slice(..n))
            .map_err(|e| device_error(&g, KernelError::driver("downloading logits", e)))?;
        host.truncate(n);
        Ok(host)
    }

    /// Greedy tokens (first index of the largest logit) of the rows of the last forward pass,
    /// computed on the device.
    pub fn argmax_last(&mut self, rows: usize) -> Result<Vec<u32>, KvqError> {
        let g = self.gpu.clone();
        let vocab = self.spec.vocab_size;
        let run = |me: &mut Self| -> Result<Vec<u32>, KernelError> {
            let logits = me
                .logits
                .as_ref()
                .filter(|l| l.len() >= rows * vocab)
                .ok_or_else(|| {
                    KernelError::InvalidArgument(format!("no logits for {rows} rows"))
                })?;
            if me.argmax.as_ref().is_none_or(|a| a.len() < rows) {
                me.argmax = Some(zeros(&g, rows.next_power_of_two(), "argmax")?);
            }
            let out = me.argmax.as_mut().expect("allocated");
            let v = vocab as i32;
            let stream = g.stream().clone();
            let mut b = stream.launch_builder(&me.fns.argmax);
            b.arg(logits).arg(&v).arg(&mut *out);
            // SAFETY: matches kvq_argmax; `logits` holds ≥ rows × vocab values, `out` ≥ rows.
            launched(
                unsafe { b.launch(cfg(rows as u32, ROW_THREADS)) }.map(|_| ()),
                "kvq_argmax",
            )?;
            let ids = stream
                .clone_dtoh(&out.slice(..rows))
                .map_err(|e| KernelError::driver("downloading argmax", e))?;
            Ok(ids.into_iter().map(|i| i as u32).collect())
        };
        run(self).map_err(|e| device_error(&g, e))
    }
}

/// One forward pass of `seqs` over tensor-parallel `ranks` (one GPU: a single rank, no group):
/// checks and uploads the inputs to every rank, runs the pass (`pass::run_pass`) and moves
/// the recent windows on. Returns how many logit rows rank 0 holds.
pub(crate) fn forward_ranks(
    ranks: &mut [&mut GpuLlama],
    group: Option<&TpGroup>,
    seqs: &[SeqInput<'_>],
    logit_rows: &[usize],
) -> Result<usize, KvqError> {
    let mut windows = lock_windows(seqs)?;
    let Some(first) = ranks.first() else {
        return Err(KvqError::InvalidArgument("no GPU ranks".into()));
    };
    let step = first.host_step(seqs, &windows, logit_rows)?;
    if step.rows == 0 {
        return Ok(0);
    }
    let mut inps = Vec::with_capacity(ranks.len());
    for r in ranks.iter() {
        let g = &r.gpu;
        let dev = |e| device_error(g, e);
        g.context()
            .bind_to_thread()
            .map_err(|e| dev(KernelError::driver("binding the context", e)))?;
        inps.push(step.upload(g).map_err(dev)?);
    }
    pass::run_pass(ranks, &inps, group).map_err(|e| device_error(&ranks[0].gpu, e))?;
    // The rings hold this pass's positions now (the host windows only track the end).
    for (w, seq) in windows.iter_mut().zip(seqs) {
        if let Some(w) = w {
            w.advance(seq.tokens.len());
        }
    }
    Ok(step.out_rows)
}

fn device_error(gpu: &GpuContext, e: KernelError) -> KvqError {
    KvqError::Device {
        device: gpu.name(),
        reason: e.to_string(),
    }
}

/// Builds the CUDA runner for the engine: uploads the weights to the `tp` GPUs from
/// `req.ordinal` on, plans the cache from the least device memory then free over them,
/// allocates every rank's share.
pub fn build_cuda_runner(req: DeviceRunnerRequest<'_>) -> Result<DeviceRunner, KvqError> {
    let tp = req.config.engine.tp.max(1);
    let ordinals: Vec<usize> = (req.ordinal..req.ordinal + tp).collect();
    let name = match tp {
        1 => format!("cuda:{}", req.ordinal),
        _ => format!("cuda:{}..={}, tp = {tp}", req.ordinal, req.ordinal + tp - 1),
    };
    let dev = |e: KernelError| KvqError::Device {
        device: name.clone(),
        reason: e.to_string(),
    };
    let mut model = TpLlama::upload(&ordinals, req.model).map_err(dev)?;
    let plan = (req.plan)(model.min_free_memory().map_err(dev)?)?;
    let dtype = req.config.engine.dtype.resolve(req.model.spec.dtype);
    let window = (req.resolved.recent_window > 0)
        .then_some((req.resolved.recent_window, req.config.engine.max_batch_size));
    model
        .set_caches(
            &req.resolved.layout,
            req.resolved.codec.as_ref(),
            dtype,
            plan.num_blocks,
            window,
        )
        .map_err(dev)?;
    let device_name = format!("{} ({name})", model.device_names());
    Ok(DeviceRunner {
        runner: Box::new(model),
        plan,
        device_name,
    })
}

inventory::submit! {
    DeviceRunnerRegistration {
        device: "cuda",
        build: build_cuda_runner,
    }
}
