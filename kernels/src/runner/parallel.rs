//! [`TpLlama`]: the model over the GPUs of a tensor-parallel group, one [`GpuLlama`] rank per
//! device (its heads, its MLP slice and its KV heads' share of the cache), driven by one host
//! thread: every rank's kernels are queued phase by phase and NCCL sums the ranks' block
//! outputs between phases. With `tp = 1` it is one rank and no communicator: the engine's GPU
//! path is this type either way.

use std::collections::BTreeMap;
use std::sync::Arc;

use cudarc::driver::CudaContext;
use engine_core::cache::{CacheLayout, PagedKvCache};
use engine_core::codec::KvCodec;
use engine_core::model::{ForwardPass, LlamaModel, SeqInput};
use engine_core::ops::linear::Path;
use engine_core::{AttentionBackend, KvDtype, KvqError, ModelSpec};

use super::{forward_ranks, GpuLlama};
use crate::cache::GpuCache;
use crate::device::GpuContext;
use crate::tp::{HostMatrix, LayerSplit, Shard, TpGroup};
use crate::KernelError;

/// A Llama model split over `tp` GPUs (Megatron style, `crate::tp`).
pub struct TpLlama {
    /// The whole model's shape (each rank holds its share).
    spec: ModelSpec,
    /// Rank r on GPU `ordinals[r]`; rank 0 computes the logits.
    ranks: Vec<GpuLlama>,
    group: TpGroup,
}

/// Refuses, before any upload, a split whose f16 weights would not fit the GPUs: each GPU's
/// free memory must hold the weights of the ranks placed on it (a model larger than one GPU
/// then says which `tp` it needs, instead of failing an allocation halfway).
fn check_weights_fit(
    spec: &ModelSpec,
    ordinals: &[usize],
    shards: &[Shard],
    gpus: &[Arc<GpuContext>],
) -> Result<(), KernelError> {
    const GIB: f64 = (1u64 << 30) as f64;
    // Per GPU: the bytes of the ranks placed on it, and one of their contexts.
    let mut per_gpu: BTreeMap<usize, (u64, &Arc<GpuContext>)> = BTreeMap::new();
    for ((&o, s), gpu) in ordinals.iter().zip(shards).zip(gpus) {
        per_gpu.entry(o).or_insert((0, gpu)).0 += LayerSplit::new(spec, *s)?.f16_weight_bytes(spec);
    }
    for (o, (need, gpu)) in per_gpu {
        let (free, _total) = gpu
            .context()
            .mem_get_info()
            .map_err(|e| KernelError::driver("querying free memory", e))?;
        if need > free as u64 {
            return Err(KernelError::InvalidArgument(format!(
                "the model's f16 weights need {:.1} GiB on GPU {o} (tp = {}), which has {:.1} \
                 GiB free; split it over more GPUs (a larger tp)",
                need as f64 / GIB,
                ordinals.len(),
                free as f64 / GIB
            )));
        }
    }
    Ok(())
}

impl TpLlama {
    /// Uploads rank r of `ordinals.len()` to GPU `ordinals[r]`, after checking that the
    /// group divides the model's heads and MLP and that the GPUs exist.
    pub fn upload(ordinals: &[usize], model: &LlamaModel) -> Result<Self, KernelError> {
        let shards = Shard::all(ordinals.len())?;
        for &s in &shards {
            LayerSplit::new(&model.spec, s)?;
        }
        if ordinals.len() > 1 {
            let count = CudaContext::device_count()
                .map_err(|e| KernelError::driver("counting GPUs", e))?
                as usize;
            if let Some(&o) = ordinals.iter().find(|&&o| o >= count) {
                return Err(KernelError::NoDevice {
                    ordinal: o,
                    reason: format!(
                        "tp = {} needs GPUs {ordinals:?}; this machine has {count}",
                        ordinals.len()
                    ),
                });
            }
        }
        let gpus = ordinals
            .iter()
            .map(|&o| GpuContext::new(o))
            .collect::<Result<Vec<_>, KernelError>>()?;
        check_weights_fit(&model.spec, ordinals, &shards, &gpus)?;
        let embeddings = HostMatrix::from_linear(model.embeddings());
        let ranks = gpus
            .iter()
            .zip(shards)
            .map(|(gpu, s)| GpuLlama::upload_shard(gpu, model, s, &embeddings))
            .collect::<Result<Vec<_>, KernelError>>()?;
        let group = TpGroup::new(ranks.iter().map(|r| r.gpu().stream().clone()).collect())?;
        Ok(Self {
            spec: model.spec.clone(),
            ranks,
            group,
        })
    }

    pub fn ranks(&self) -> &[GpuLlama] {
        &self.ranks
    }

    /// The least free device memory over the ranks, after their weights: every rank's cache
    /// gets the same number of blocks, what the fullest GPU allows (LMDeploy's rule).
    pub fn min_free_memory(&self) -> Result<u64, KernelError> {
        let mut least = u64::MAX;
        for r in &self.ranks {
            r.gpu().synchronize()?;
            let (free, _total) = r
                .gpu()
                .context()
                .mem_get_info()
                .map_err(|e| KernelError::driver("querying free memory", e))?;
            least = least.min(free as u64);
        }
        Ok(least)
    }

    /// Attaches a cache of `num_blocks` blocks of `layout` (one rank's KV heads) to every rank,
    /// and the recent window's rings when `window` is `(tokens, slots)`.
    pub fn set_caches(
        &mut self,
        layout: &CacheLayout,
        codec: &dyn KvCodec,
        dtype: KvDtype,
        num_blocks: usize,
        window: Option<(usize, usize)>,
    ) -> Result<(), KernelError> {
        for r in &mut self.ranks {
            let cache = GpuCache::new(r.gpu(), layout.clone(), codec, dtype, num_blocks)?;
            r.set_cache(cache)?;
            if let Some((n, slots)) = window {
                r.set_recent_window(n, slots)?;
            }
        }
        Ok(())
    }

    /// The devices, for logs: `"NVIDIA H200"` or `"2 × NVIDIA H200"`.
    pub fn device_names(&self) -> String {
        let first = self.ranks[0].gpu().name();
        match self.ranks.len() {
            1 => first,
            n => format!("{n} × {first}"),
        }
    }

    fn forward_on_device(
        &mut self,
        seqs: &[SeqInput<'_>],
        logit_rows: &[usize],
    ) -> Result<usize, KvqError> {
        let mut ranks: Vec<&mut GpuLlama> = self.ranks.iter_mut().collect();
        forward_ranks(&mut ranks, Some(&self.group), seqs, logit_rows)
    }

    /// Logits of the last `logit_rows[i]` tokens of each sequence `i`, storing their K/V.
    pub fn forward_last_rows(
        &mut self,
        seqs: &[SeqInput<'_>],
        logit_rows: &[usize],
    ) -> Result<Vec<f32>, KvqError> {
        match self.forward_on_device(seqs, logit_rows)? {
            0 => Ok(Vec::new()),
            rows => self.ranks[0].logits_of_last(rows),
        }
    }

    /// Greedy tokens of the last `logit_rows[i]` tokens of each sequence `i`, picked on rank 0.
    pub fn forward_greedy(
        &mut self,
        seqs: &[SeqInput<'_>],
        logit_rows: &[usize],
    ) -> Result<Vec<u32>, KvqError> {
        match self.forward_on_device(seqs, logit_rows)? {
            0 => Ok(Vec::new()),
            rows => self.ranks[0].argmax_last(rows),
        }
    }

    /// The host cache the engine passes only carries the block size; it must be the device
    /// caches', since the block tables index them.
    fn check_block_size(&self, cache: &PagedKvCache) -> Result<(), KvqError> {
        let gpu_bs = self.ranks[0].cache().map(|c| c.layout().block_size);
        if gpu_bs != Some(cache.block_size()) {
            return Err(KvqError::InvalidArgument(format!(
                "host cache block size {} differs from the device cache's {gpu_bs:?}",
                cache.block_size()
            )));
        }
        Ok(())
    }
}

impl ForwardPass for TpLlama {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn forward_rows(
        &mut self,
        _backend: &dyn AttentionBackend,
        cache: &mut PagedKvCache,
        seqs: &[SeqInput<'_>],
        logit_rows: &[usize],
        _layers: Path,
        _head: Path,
    ) -> Result<Vec<f32>, KvqError> {
        self.check_block_size(cache)?;
        self.forward_last_rows(seqs, logit_rows)
    }

    fn forward_rows_greedy(
        &mut self,
        _backend: &dyn AttentionBackend,
        cache: &mut PagedKvCache,
        seqs: &[SeqInput<'_>],
        logit_rows: &[usize],
    ) -> Option<Result<Vec<u32>, KvqError>> {
        Some(
            self.check_block_size(cache)
                .and_then(|()| self.forward_greedy(seqs, logit_rows)),
        )
    }

    /// One GEMM path: results do not depend on how rows are grouped into calls.
    fn path_dependent(&self) -> bool {
        false
    }
}
