//! [`GpuCache`]: the paged KV cache in device memory, byte for byte the layout of
//! `engine_core::cache::PagedKvCache`, so bytes written by either side mean the same thing.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use engine_core::cache::CacheLayout;
use engine_core::codec::KvCodec;
use engine_core::KvDtype;

use crate::device::GpuContext;
use crate::spec::{CacheParams, GpuCodec, KernelKind, Specialization};
use crate::KernelError;

/// Warps per CTA of the store kernel (`STORE_WARPS` in store.cu).
const STORE_WARPS: u32 = 4;

/// Device memory of a paged, possibly quantized KV cache.
#[derive(Debug)]
pub struct GpuCache {
    gpu: Arc<GpuContext>,
    layout: CacheLayout,
    num_blocks: usize,
    spec: Specialization,
    bytes: CudaSlice<u8>,
}

impl GpuCache {
    /// Allocates `num_blocks` zeroed blocks laid out by `layout` for `codec` in `dtype`.
    pub fn new(
        gpu: &Arc<GpuContext>,
        layout: CacheLayout,
        codec: &dyn KvCodec,
        dtype: KvDtype,
        num_blocks: usize,
    ) -> Result<Self, KernelError> {
        let spec = Specialization {
            codec: GpuCodec::of(codec)?,
            dtype,
            head_dim_k: codec.head_dim_k(),
            head_dim_v: codec.head_dim_v(),
            group: 1,
        };
        spec.check_store()?;
        if layout.k != codec.k_bytes() || layout.v != codec.v_bytes() {
            return Err(KernelError::InvalidArgument(format!(
                "layout sized for K {:?} / V {:?} but codec \"{}\" takes {:?} / {:?}",
                layout.k,
                layout.v,
                codec.name(),
                codec.k_bytes(),
                codec.v_bytes()
            )));
        }
        let len = layout.block_bytes() * num_blocks;
        let bytes = gpu
            .stream()
            .alloc_zeros::<u8>(len.max(1))
            .map_err(|e| KernelError::driver(format!("allocating {len} bytes of KV cache"), e))?;
        Ok(Self {
            gpu: gpu.clone(),
            layout,
            num_blocks,
            spec,
            bytes,
        })
    }

    pub fn gpu(&self) -> &Arc<GpuContext> {
        &self.gpu
    }
    pub fn layout(&self) -> &CacheLayout {
        &self.layout
    }
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    pub fn spec(&self) -> &Specialization {
        &self.spec
    }
    pub fn params(&self) -> CacheParams {
        CacheParams::new(&self.layout, self.num_blocks)
    }
    /// Total bytes (every block of every layer).
    pub fn len_bytes(&self) -> usize {
        self.layout.block_bytes() * self.num_blocks
    }
    pub fn device_bytes(&self) -> &CudaSlice<u8> {
        &self.bytes
    }

    /// Copies host bytes (e.g. `PagedKvCache::as_bytes`) into the cache.
    pub fn upload(&mut self, bytes: &[u8]) -> Result<(), KernelError> {
        if bytes.len() != self.len_bytes() {
            return Err(KernelError::InvalidArgument(format!(
                "upload of {} bytes into a cache of {}",
                bytes.len(),
                self.len_bytes()
            )));
        }
        if bytes.is_empty() {
            return Ok(());
        }
        self.gpu
            .stream()
            .memcpy_htod(bytes, &mut self.bytes)
            .map_err(|e| KernelError::driver("cache upload", e))
    }

    /// Copies the whole cache to the host.
    pub fn download(&self) -> Result<Vec<u8>, KernelError> {
        let mut v = self
            .gpu
            .stream()
            .clone_dtoh(&self.bytes)
            .map_err(|e| KernelError::driver("cache download", e))?;
        v.truncate(self.len_bytes());
        Ok(v)
    }

    /// Encodes new tokens of one layer into the cache: `k` is `[tokens, kv_heads, head_dim_k]`,
    /// `v` likewise, `slots[i]` (block · block_size + offset, or negative to skip) where token
    /// `i` goes. One launch for the whole batch.
    pub fn store(
        &mut self,
        layer: usize,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        slots: &CudaSlice<i32>,
        num_tokens: usize,
    ) -> Result<(), KernelError> {
        let h = self.layout.num_kv_heads;
        let (dk, dv) = (self.spec.head_dim_k, self.spec.head_dim_v);
        if layer >= self.layout.num_layers {
            return Err(KernelError::InvalidArgument(format!(
                "layer {layer} of a {}-layer cache",
                self.layout.num_layers
            )));
        }
        if k.len() < num_tokens * h * dk
            || v.len() < num_tokens * h * dv
            || slots.len() < num_tokens
        {
            return Err(KernelError::InvalidArgument(format!(
                "store of {num_tokens} tokens needs k ≥ {}, v ≥ {}, slots ≥ {num_tokens}; got {}, {}, {}",
                num_tokens * h * dk,
                num_tokens * h * dv,
                k.len(),
                v.len(),
                slots.len()
            )));
        }
        if num_tokens == 0 {
            return Ok(());
        }
        let items = (num_tokens * h * 2) as u64;
        let grid = items.div_ceil(STORE_WARPS as u64);
        if grid > i32::MAX as u64 {
            return Err(KernelError::InvalidArgument(format!(
                "{num_tokens} tokens in one store"
            )));
        }
        let f = self
            .gpu
            .function(KernelKind::Store, &self.spec, "kvq_store_kv")?;
        let params = self.params();
        let (nt, nh, l) = (num_tokens as i32, h as i32, layer as i32);
        let stream = self.gpu.stream().clone();
        let mut b = stream.launch_builder(&f);
        b.arg(k)
            .arg(v)
            .arg(slots)
            .arg(&nt)
            .arg(&nh)
            .arg(&l)
            .arg(&mut self.bytes)
            .arg(&params);
        let cfg = LaunchConfig {
            grid_dim: (grid as u32, 1, 1),
            block_dim: (STORE_WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types and order match `kvq_store_kv`; lengths were checked above and
        // every slot is checked against the cache by the caller's block tables (negative = skip).
        unsafe { b.launch(cfg) }.map_err(|e| KernelError::driver("launching kvq_store_kv", e))?;
        Ok(())
    }
}

/// Fills `out` with standard normal values derived from `seed`, on the device.
pub fn fill_normal(
    gpu: &Arc<GpuContext>,
    out: &mut CudaSlice<f32>,
    seed: u64,
) -> Result<(), KernelError> {
    let spec = Specialization {
        codec: GpuCodec::FLOAT,
        dtype: KvDtype::F16,
        head_dim_k: 64,
        head_dim_v: 64,
        group: 1,
    };
    let f = gpu.function(KernelKind::Store, &spec, "kvq_fill_normal")?;
    let n = out.len() as i64;
    let stream = gpu.stream().clone();
    let mut b = stream.launch_builder(&f);
    b.arg(out).arg(&n).arg(&seed);
    let blocks = (n as u64).div_ceil(256).clamp(1, 65_535) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `kvq_fill_normal(float*, i64, u64)`; writes `n` floats of `out`.
    unsafe { b.launch(cfg) }.map_err(|e| KernelError::driver("launching kvq_fill_normal", e))?;
    Ok(())
}
