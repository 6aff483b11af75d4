//! Launcher of the split-K paged decode attention (`decode.cu`).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::cache::GpuCache;
use crate::device::GpuContext;
use crate::spec::{check_decode_layout, plan_splits, DecodePlan, KernelKind, Specialization};
use crate::window::RecentPart;
use crate::KernelError;

/// Threads per CTA of `kvq_decode_split` (`DEC_WARPS` · 32).
const SPLIT_THREADS: u32 = 128;
/// Threads of `kvq_decode_reduce` (RED_WAYS × the V head dim in decode.cu).
const REDUCE_THREADS: u32 = 512;

/// One decode step's inputs, all on the device.
#[derive(Debug)]
pub struct DecodeBatch<'a> {
    /// `[batch, num_heads, head_dim_k]` queries (post-RoPE, model domain).
    pub q: &'a CudaSlice<f32>,
    /// `[batch, max_blocks]` block ids.
    pub block_tables: &'a CudaSlice<i32>,
    pub max_blocks: usize,
    /// `[batch]` tokens in the cache per sequence (this step's included); each ≤ `max_context`.
    pub context_lens: &'a CudaSlice<i32>,
    pub batch: usize,
    /// The largest context length of the batch (host copy; sizes the split-K grid).
    pub max_context: usize,
    pub num_heads: usize,
    /// Softmax scale, normally `1/√head_dim`.
    pub scale: f32,
    /// The recent window's tokens, attended as one more partial (`context_lens` then counts
    /// only the tokens read through the codec).
    pub recent: Option<RecentPart<'a>>,
}

/// Scratch of the split-K partial results, grown on demand and reused.
#[derive(Debug, Default)]
pub struct DecodeWorkspace {
    part_o: Option<CudaSlice<f32>>,
    part_ml: Option<CudaSlice<f32>>,
}

fn ensure(
    gpu: &GpuContext,
    slot: &mut Option<CudaSlice<f32>>,
    len: usize,
) -> Result<(), KernelError> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = Some(
            gpu.stream()
                .alloc_zeros::<f32>(len.max(1))
                .map_err(|e| KernelError::driver("allocating decode workspace", e))?,
        );
    }
    Ok(())
}

/// `out[b, h, :] = softmax(q[b, h]·Kᵀ·scale)·V` over the first `context_lens[b]` cached tokens of
/// `layer`, for one query token per sequence. `out` is `[batch, num_heads, head_dim_v]` f32.
pub fn decode_attention(
    cache: &GpuCache,
    layer: usize,
    batch: &DecodeBatch<'_>,
    out: &mut CudaSlice<f32>,
    ws: &mut DecodeWorkspace,
) -> Result<DecodePlan, KernelError> {
    let gpu: &Arc<GpuContext> = cache.gpu();
    let layout = cache.layout();
    let kv_heads = layout.num_kv_heads;
    let (dk, dv) = (cache.spec().head_dim_k, cache.spec().head_dim_v);
    if batch.num_heads == 0 || batch.num_heads % kv_heads != 0 {
        return Err(KernelError::InvalidArgument(format!(
            "{} query heads do not group over {kv_heads} KV heads",
            batch.num_heads
        )));
    }
    let spec = Specialization {
        group: batch.num_heads / kv_heads,
        ..*cache.spec()
    };
    spec.check_decode()?;
    check_decode_layout(&spec, layout)?;
    if spec.codec.is_float()
        && spec.dtype == engine_core::KvDtype::Bf16
        && gpu.arch() == "compute_75"
    {
        return Err(KernelError::Unsupported(
            "a bf16 cache needs bf16 tensor cores (compute capability 8.0 or newer)".into(),
        ));
    }
    let (n, h) = (batch.batch, batch.num_heads);
    if layer >= layout.num_layers {
        return Err(KernelError::InvalidArgument(format!(
            "layer {layer} of a {}-layer cache",
            layout.num_layers
        )));
    }
    if batch.q.len() < n * h * dk
        || out.len() < n * h * dv
        || batch.block_tables.len() < n * batch.max_blocks
        || batch.context_lens.len() < n
    {
        return Err(KernelError::InvalidArgument(format!(
            "decode of {n} sequences × {h} heads: q {} (need {}), out {} (need {}), block tables {} (need {}), \
             context lens {} (need {n})",
            batch.q.len(),
            n * h * dk,
            out.len(),
            n * h * dv,
            batch.block_tables.len(),
            n * batch.max_blocks,
            batch.context_lens.len()
        )));
    }
    if batch.max_context > batch.max_blocks * layout.block_size {
        return Err(KernelError::InvalidArgument(format!(
            "max context {} exceeds {} blocks of {} tokens",
            batch.max_context, batch.max_blocks, layout.block_size
        )));
    }
    if n == 0 {
        return Ok(DecodePlan {
            splits: 0,
            tokens_per_split: 0,
        });
    }
    let plan = plan_splits(
        gpu.sm_count(),
        spec.decode_tuning().ctas_per_sm,
        n,
        kv_heads,
        batch.max_context.max(1),
        layout.block_size,
    );
    // The codec's splits, then the window's partial when there is one.
    let partials = plan.splits + usize::from(batch.recent.is_some());
    ensure(gpu, &mut ws.part_o, n * h * partials * dv)?;
    ensure(gpu, &mut ws.part_ml, n * h * partials * 2)?;
    let (part_o, part_ml) = (
        ws.part_o.as_mut().expect("allocated"),
        ws.part_ml.as_mut().expect("allocated"),
    );

    let split_fn = gpu.function(KernelKind::Decode, &spec, "kvq_decode_split")?;
    let reduce_fn = gpu.function(KernelKind::Decode, &spec, "kvq_decode_reduce")?;
    let params = cache.params();
    let layer_i = layer as i32;
    let bt_stride = batch.max_blocks as i32;
    let kv_i = kv_heads as i32;
    let tps = plan.tokens_per_split as i32;
    let splits = partials as i32;
    let qk_scale = batch.scale * std::f32::consts::LOG2_E;
    let stream = gpu.stream().clone();
    {
        let mut b = stream.launch_builder(&split_fn);
        b.arg(batch.q)
            .arg(cache.device_bytes())
            .arg(&params)
            .arg(&layer_i)
            .arg(batch.block_tables)
            .arg(&bt_stride)
            .arg(batch.context_lens)
            .arg(&kv_i)
            .arg(&tps)
            .arg(&qk_scale)
            .arg(&mut *part_o)
            .arg(&mut *part_ml)
            .arg(&splits);
        let cfg = LaunchConfig {
            grid_dim: (kv_heads as u32, plan.splits as u32, n as u32),
            block_dim: (SPLIT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types and order match `kvq_decode_split`; buffer sizes were checked
        // above, the layout's alignment by `check_decode_layout`.
        unsafe { b.launch(cfg) }
            .map_err(|e| KernelError::driver("launching kvq_decode_split", e))?;
    }
    if let Some(recent) = &batch.recent {
        recent.launch(
            gpu,
            &spec,
            batch.q,
            (layer, kv_heads, n),
            qk_scale,
            (&mut *part_o, &mut *part_ml),
            partials,
        )?;
    }
    {
        let mut b = stream.launch_builder(&reduce_fn);
        b.arg(&*part_o).arg(&*part_ml).arg(&splits).arg(&mut *out);
        let cfg = LaunchConfig {
            grid_dim: ((n * h) as u32, 1, 1),
            block_dim: (REDUCE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `kvq_decode_reduce`; the partials hold `n·h·splits` rows.
        unsafe { b.launch(cfg) }
            .map_err(|e| KernelError::driver("launching kvq_decode_reduce", e))?;
    }
    Ok(plan)
}
