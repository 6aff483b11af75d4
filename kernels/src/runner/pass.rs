//! One forward pass of [`GpuLlama`], in the phases a tensor-parallel group all-reduces between:
//! the embedding, then per layer the attention block and the MLP block (each ends with a
//! row-parallel GEMM whose output, `acts.o`, is this rank's partial sum), then the head.
//! [`run_pass`] drives any number of ranks through them; on one GPU it is the whole pass.

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{cfg, grid_for, launched, zeros, GpuLlama, ProjDims, StepInputs, ROW_THREADS};
use crate::decode::{decode_attention, DecodeBatch};
use crate::tp::TpGroup;
use crate::window::RecentPart;
use crate::KernelError;

/// Runs one pass over `ranks` (rank r with inputs `inps[r]`), summing the ranks' block outputs
/// through `group` after every attention and MLP block. With one rank and no group this is the
/// single-GPU pass. Logits end on rank 0.
pub(crate) fn run_pass(
    ranks: &mut [&mut GpuLlama],
    inps: &[StepInputs],
    group: Option<&TpGroup>,
) -> Result<(), KernelError> {
    let rows = inps[0].rows;
    let hidden = ranks[0].spec.hidden_size;
    let reduce = |ranks: &mut [&mut GpuLlama]| -> Result<(), KernelError> {
        match group {
            Some(g) if ranks.len() > 1 => {
                let mut outs: Vec<&mut CudaSlice<f32>> =
                    ranks.iter_mut().map(|r| r.block_output()).collect();
                g.all_reduce_sum_f32(&mut outs, rows * hidden)
            }
            _ => Ok(()),
        }
    };
    for (r, inp) in ranks.iter_mut().zip(inps) {
        r.begin_pass(inp)?;
    }
    for l in 0..ranks[0].layers.len() {
        for (r, inp) in ranks.iter_mut().zip(inps) {
            r.attention_block(l, inp)?;
        }
        reduce(ranks)?;
        for (r, inp) in ranks.iter_mut().zip(inps) {
            r.mlp_block(l, inp)?;
        }
        reduce(ranks)?;
    }
    ranks[0].finish_pass(&inps[0])
}

impl GpuLlama {
    fn bind(&self) -> Result<(), KernelError> {
        self.gpu
            .context()
            .bind_to_thread()
            .map_err(|e| KernelError::driver("binding the context", e))
    }

    /// The buffer every block leaves its (partial) output in, `[rows, hidden]`.
    pub(crate) fn block_output(&mut self) -> &mut CudaSlice<f32> {
        &mut self.acts.bufs.as_mut().expect("a pass has begun").o
    }

    /// Sizes the buffers for `inp` and embeds its tokens into the residual stream.
    fn begin_pass(&mut self, inp: &StepInputs) -> Result<(), KernelError> {
        self.bind()?;
        self.ensure_acts(inp.rows)?;
        let vocab = self.spec.vocab_size;
        if self.computes_logits
            && self
                .logits
                .as_ref()
                .is_none_or(|l| l.len() < inp.out_rows * vocab)
        {
            self.logits = Some(zeros(
                &self.gpu,
                inp.out_rows.next_power_of_two() * vocab,
                "logits",
            )?);
        }
        let a = self.acts.bufs.as_mut().expect("allocated");
        let hd_i = self.spec.hidden_size as i32;
        let tokens = inp.tokens();
        let stream = self.gpu.stream().clone();
        let mut b = stream.launch_builder(&self.fns.embed);
        b.arg(&self.embed.data)
            .arg(&tokens)
            .arg(&mut a.x)
            .arg(&hd_i);
        // SAFETY: matches kvq_embed; `tokens` were checked against the vocabulary.
        launched(
            unsafe { b.launch(cfg(inp.rows as u32, ROW_THREADS)) }.map(|_| ()),
            "kvq_embed",
        )
    }

    /// `x += o` when `add` (the previous block's output), then `out = f16(rmsnorm(x) · w)`, for
    /// every row (`rows`), or only the rows `src` lists (`rows` of them).
    fn add_rmsnorm(
        &mut self,
        add: bool,
        src: Option<&cudarc::driver::CudaView<'_, i32>>,
        w: Norm,
        rows: usize,
    ) -> Result<(), KernelError> {
        let a = self.acts.bufs.as_mut().expect("a pass has begun");
        let w = match w {
            Norm::Attention(l) => &self.layers[l].attn_norm,
            Norm::Mlp(l) => &self.layers[l].ffn_norm,
            Norm::Final => &self.final_norm,
        };
        let (add, hd_i, eps) = (
            i32::from(add),
            self.spec.hidden_size as i32,
            self.spec.rms_norm_eps,
        );
        let null: u64 = 0;
        let stream = self.gpu.stream().clone();
        let mut b = stream.launch_builder(&self.fns.add_rmsnorm);
        b.arg(&mut a.x).arg(&a.o).arg(&add);
        match src {
            Some(v) => b.arg(v),
            None => b.arg(&null),
        };
        b.arg(w).arg(&mut a.h16).arg(&hd_i).arg(&eps);
        // SAFETY: matches kvq_add_rmsnorm; x, o and h16 hold ≥ the pass's rows × hidden values
        // (`ensure_acts`); `src` lists `rows` row indices below the pass's rows.
        launched(
            unsafe { b.launch(cfg(rows as u32, ROW_THREADS)) }.map(|_| ()),
            "kvq_add_rmsnorm",
        )
    }

    /// Layer `l`'s attention: norm, QKV, RoPE, store into the cache, paged attention (with the
    /// recent window), and `wo`, whose output is left in `acts.o`.
    fn attention_block(&mut self, l: usize, inp: &StepInputs) -> Result<(), KernelError> {
        self.bind()?;
        let rows = inp.rows;
        self.add_rmsnorm(l > 0, None, Norm::Attention(l), rows)?;
        let s = &self.spec;
        let (heads, kvh, dk) = (s.num_heads, s.num_kv_heads, s.head_dim_k);
        let d = ProjDims::of(s);
        let stream = self.gpu.stream().clone();
        let a = self.acts.bufs.as_mut().expect("a pass has begun");
        let layer = &self.layers[l];
        let cache = self.cache.as_mut().ok_or_else(|| {
            KernelError::InvalidArgument("the GPU model has no cache attached".into())
        })?;
        self.blas.linear(&a.h16, &layer.wqkv, &mut a.qkv, rows)?;
        {
            let (h_i, kv_i, half_i) = (heads as i32, kvh as i32, (dk / 2) as i32);
            let vd_i = d.v as i32;
            let positions = inp.positions();
            let mut b = stream.launch_builder(&self.fns.rope);
            b.arg(&a.qkv)
                .arg(&mut a.q)
                .arg(&mut a.k)
                .arg(&mut a.v)
                .arg(&positions)
                .arg(&self.rope_cos)
                .arg(&self.rope_sin)
                .arg(&h_i)
                .arg(&kv_i)
                .arg(&half_i)
                .arg(&vd_i);
            // SAFETY: matches kvq_rope; qkv holds ≥ rows × (q + k + v dims) values (the
            // GEMM's checked output) and q, k, v ≥ rows × their dims (`ensure_acts`);
            // positions were checked against the tables.
            launched(
                unsafe { b.launch(cfg(rows as u32, ROW_THREADS)) }.map(|_| ()),
                "kvq_rope",
            )?;
        }
        cache.store(l, &a.k, &a.v, &inp.slots, rows)?;
        let window = inp.window_rows().zip(self.windows.as_mut());
        {
            let batch = DecodeBatch {
                q: &a.q,
                block_tables: &inp.block_tables,
                max_blocks: inp.max_blocks,
                context_lens: &inp.context_lens,
                batch: rows,
                max_context: inp.max_context,
                num_heads: heads,
                scale: 1.0 / (dk as f32).sqrt(),
                recent: window.as_ref().map(|((attend, _), rings)| RecentPart {
                    rings,
                    k_new: &a.k,
                    v_new: &a.v,
                    rows: attend,
                }),
            };
            decode_attention(cache, l, &batch, &mut a.attn, &mut self.decode_ws)?;
        }
        if let Some(((_, keep), rings)) = window {
            rings.keep(cache, l, heads / kvh, (&a.k, &a.v), &keep, rows)?;
        }
        {
            let n = (rows * d.attn) as i64;
            let mut b = stream.launch_builder(&self.fns.to_f16);
            b.arg(&a.attn).arg(&mut a.h16).arg(&n);
            // SAFETY: matches kvq_to_f16; both buffers hold ≥ n values.
            launched(
                unsafe { b.launch(cfg(grid_for(n as usize), 256)) }.map(|_| ()),
                "kvq_to_f16",
            )?;
        }
        self.blas.linear(&a.h16, &layer.wo, &mut a.o, rows)
    }

    /// Layer `l`'s MLP: adds the attention block's output, norm, gate|up, SwiGLU and `w_down`,
    /// whose output is left in `acts.o`.
    fn mlp_block(&mut self, l: usize, inp: &StepInputs) -> Result<(), KernelError> {
        self.bind()?;
        let rows = inp.rows;
        self.add_rmsnorm(true, None, Norm::Mlp(l), rows)?;
        let ff = self.spec.intermediate_size;
        let a = self.acts.bufs.as_mut().expect("a pass has begun");
        let layer = &self.layers[l];
        self.blas
            .linear(&a.h16, &layer.w_gate_up, &mut a.gate_up, rows)?;
        {
            let n = (rows * ff) as i64;
            let ff_i = ff as i32;
            let stream = self.gpu.stream().clone();
            let mut b = stream.launch_builder(&self.fns.silu_mul);
            b.arg(&a.gate_up).arg(&mut a.ff16).arg(&ff_i).arg(&n);
            // SAFETY: matches kvq_silu_mul; gate_up holds ≥ 2n values, ff16 ≥ n.
            launched(
                unsafe { b.launch(cfg(grid_for(n as usize), 256)) }.map(|_| ()),
                "kvq_silu_mul",
            )?;
        }
        self.blas.linear(&a.ff16, &layer.w_down, &mut a.o, rows)
    }

    /// Adds the last block's output, normalizes the logit rows and applies the output head
    /// (logits in `self.logits`); a rank without the head only adds.
    fn finish_pass(&mut self, inp: &StepInputs) -> Result<(), KernelError> {
        self.bind()?;
        if !self.computes_logits {
            return Ok(());
        }
        {
            let a = self.acts.bufs.as_mut().expect("a pass has begun");
            let n = (inp.rows * self.spec.hidden_size) as i64;
            let stream = self.gpu.stream().clone();
            let mut b = stream.launch_builder(&self.fns.add);
            b.arg(&mut a.x).arg(&a.o).arg(&n);
            // SAFETY: matches kvq_add; both buffers hold ≥ n values.
            launched(
                unsafe { b.launch(cfg(grid_for(n as usize), 256)) }.map(|_| ()),
                "kvq_add",
            )?;
        }
        let logit_rows = inp.logit_rows();
        self.add_rmsnorm(false, Some(&logit_rows), Norm::Final, inp.out_rows)?;
        let a = self.acts.bufs.as_ref().expect("a pass has begun");
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = self.logits.as_mut().expect("allocated");
        self.blas.linear(&a.h16, head, logits, inp.out_rows)
    }
}

/// Which RMSNorm weights [`GpuLlama::add_rmsnorm`] applies.
#[derive(Clone, Copy)]
enum Norm {
    Attention(usize),
    Mlp(usize),
    Final,
}
