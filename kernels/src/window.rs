//! The recent window on the GPU (`engine.recent_window`): every running sequence's last `n`
//! tokens of every layer at the cache dtype, in device rings indexed by the slot the scheduler
//! gave the sequence ([`RecentWindow::device_slot`]). Attention reads a row's last `n` tokens
//! from here (`kvq_decode_recent`, one more split-K partial) and the rest through the codec;
//! `kvq_window_keep` writes each pass's newest rows after the layer's attention.
//!
//! The host [`RecentWindow`] still tracks where each sequence's window ends; its value buffers
//! stay empty on this path.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use engine_core::cache::RecentWindow;
use engine_core::KvqError;

use crate::cache::GpuCache;
use crate::device::GpuContext;
use crate::spec::{KernelKind, Specialization};
use crate::KernelError;

/// Threads of `kvq_decode_recent` (`WIN_WARPS` · 32 in recent.cu).
pub(crate) const RECENT_THREADS: u32 = 128;
/// Threads of `kvq_window_keep`.
const KEEP_THREADS: u32 = 256;
/// `WIN_MAX` in recent.cu: the largest window the kernel's shared memory holds.
pub const MAX_DEVICE_WINDOW: usize = 256;
/// i32 fields of one `WinRow` (recent.cu): slot, chunk start, chunk's first row, position.
pub(crate) const WIN_ROW_FIELDS: usize = 4;

/// The rings of every sequence slot: `[slot][layer][n][kv head][d]` K and V at the cache dtype.
#[derive(Debug)]
pub struct WindowRings {
    n: usize,
    slots: usize,
    layers: usize,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
}

impl WindowRings {
    /// Rings of `n` tokens for `slots` sequences over `cache`'s layers and KV heads.
    pub fn new(cache: &GpuCache, n: usize, slots: usize) -> Result<Self, KernelError> {
        if n == 0 || n > MAX_DEVICE_WINDOW {
            return Err(KernelError::InvalidArgument(format!(
                "recent window of {n} tokens (1 to {MAX_DEVICE_WINDOW})"
            )));
        }
        let l = cache.layout();
        let (dk, dv) = (cache.spec().head_dim_k, cache.spec().head_dim_v);
        let per_token = slots * l.num_layers * n * l.num_kv_heads;
        let alloc = |d: usize| {
            cache
                .gpu()
                .stream()
                .alloc_zeros::<u16>((per_token * d).max(1))
                .map_err(|e| KernelError::driver("allocating the recent-window rings", e))
        };
        Ok(Self {
            n,
            slots,
            layers: l.num_layers,
            k: alloc(dk)?,
            v: alloc(dv)?,
        })
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Launches `kvq_window_keep`: this pass's rows marked in `keep` into their rings. `group`
    /// (query heads per KV head) picks the decode module the attention already compiled.
    #[allow(clippy::too_many_arguments)]
    pub fn keep(
        &mut self,
        cache: &GpuCache,
        layer: usize,
        group: usize,
        fresh: (&CudaSlice<f32>, &CudaSlice<f32>),
        keep: &CudaView<'_, i32>,
        rows: usize,
    ) -> Result<(), KernelError> {
        if rows == 0 {
            return Ok(());
        }
        let gpu: &Arc<GpuContext> = cache.gpu();
        let spec = Specialization {
            group,
            ..*cache.spec()
        };
        let f = gpu.function(KernelKind::Decode, &spec, "kvq_window_keep")?;
        let (n, layers, layer, kvh) = (
            self.n as i32,
            self.layers as i32,
            layer as i32,
            cache.layout().num_kv_heads as i32,
        );
        let stream = gpu.stream().clone();
        let mut b = stream.launch_builder(&f);
        b.arg(fresh.0)
            .arg(fresh.1)
            .arg(&mut self.k)
            .arg(&mut self.v)
            .arg(keep)
            .arg(&n)
            .arg(&layers)
            .arg(&layer)
            .arg(&kvh);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (KEEP_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches kvq_window_keep; `keep` holds `rows` WinRows whose slots were checked
        // against the rings (`WindowStep::plan`), `fresh` holds `rows` K and V rows.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| KernelError::driver("launching kvq_window_keep", e))
    }
}

/// The window's part of one decode launch: the rings, this pass's K/V rows (f32, model domain)
/// and one `WinRow` per query row.
#[derive(Debug)]
pub struct RecentPart<'a> {
    pub rings: &'a WindowRings,
    pub k_new: &'a CudaSlice<f32>,
    pub v_new: &'a CudaSlice<f32>,
    pub rows: &'a CudaView<'a, i32>,
}

impl RecentPart<'_> {
    /// Launches `kvq_decode_recent` into the last of `num_splits` partials.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch(
        &self,
        gpu: &GpuContext,
        spec: &Specialization,
        q: &CudaSlice<f32>,
        (layer, kv_heads, batch): (usize, usize, usize),
        qk_scale: f32,
        part: (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        num_splits: usize,
    ) -> Result<(), KernelError> {
        if self.rows.len() < batch * WIN_ROW_FIELDS {
            return Err(KernelError::InvalidArgument(format!(
                "{} window rows for a batch of {batch}",
                self.rows.len() / WIN_ROW_FIELDS
            )));
        }
        let f = gpu.function(KernelKind::Decode, spec, "kvq_decode_recent")?;
        let r = self.rings;
        let (n, layers, layer, kvh, splits) = (
            r.n as i32,
            r.layers as i32,
            layer as i32,
            kv_heads as i32,
            num_splits as i32,
        );
        let stream = gpu.stream().clone();
        let mut b = stream.launch_builder(&f);
        b.arg(q)
            .arg(self.k_new)
            .arg(self.v_new)
            .arg(&r.k)
            .arg(&r.v)
            .arg(self.rows)
            .arg(&n)
            .arg(&layers)
            .arg(&layer)
            .arg(&kvh)
            .arg(&qk_scale)
            .arg(part.0)
            .arg(part.1)
            .arg(&splits);
        let cfg = LaunchConfig {
            grid_dim: (kv_heads as u32, batch as u32, 1),
            block_dim: (RECENT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches kvq_decode_recent; the caller sized q and the partials for `batch`
        // rows and `num_splits` splits, `rows` was checked above and its slots against the rings.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| KernelError::driver("launching kvq_decode_recent", e))
    }
}

/// One pass's window bookkeeping, built on the host: what each row attends to through the
/// window, which rows the rings keep, and each row's context through the codec.
#[derive(Debug, Default)]
pub struct WindowStep {
    /// A `WinRow` per row (slot -1: no window).
    pub attend: Vec<i32>,
    /// A `WinRow` per row, slot -1 unless the row is among its sequence's last `n` positions.
    pub keep: Vec<i32>,
    /// Per row: tokens attended through the codec (the window covers the rest).
    pub codec_context: Vec<i32>,
}

impl WindowStep {
    /// Appends the rows of a chunk of `len` tokens from position `start`, whose rows start at
    /// `first_row` of the pass; `window` is its sequence's (None: all through the codec).
    pub fn push_chunk(
        &mut self,
        (start, len, first_row): (usize, usize, usize),
        window: Option<&RecentWindow>,
        rings: Option<&WindowRings>,
    ) -> Result<(), KvqError> {
        let slot = match (window, rings) {
            (None, _) => None,
            (Some(w), Some(r)) => {
                if w.len() != r.n || w.device_slot() >= r.slots {
                    return Err(KvqError::InvalidArgument(format!(
                        "recent window of {} tokens in slot {} for device rings of {} tokens × {} slots",
                        w.len(),
                        w.device_slot(),
                        r.n,
                        r.slots
                    )));
                }
                Some(w.device_slot())
            }
            (Some(_), None) => {
                return Err(KvqError::InvalidArgument(
                    "a sequence has a recent window but the GPU runner keeps none \
                     (engine.recent_window is 0)"
                        .into(),
                ))
            }
        };
        let n = rings.map_or(0, |r| r.n);
        for pos in start..start + len {
            let row = |slot: Option<usize>| {
                [
                    slot.map_or(-1, |s| s as i32),
                    start as i32,
                    first_row as i32,
                    pos as i32,
                ]
            };
            self.attend.extend(row(slot));
            self.keep
                .extend(row(slot.filter(|_| pos + n >= start + len)));
            let through_codec = match slot {
                Some(_) => (pos + 1).saturating_sub(n),
                None => pos + 1,
            };
            self.codec_context.push(through_codec as i32);
        }
        Ok(())
    }

    /// Whether any row reads a window.
    pub fn any(&self) -> bool {
        self.attend.chunks_exact(WIN_ROW_FIELDS).any(|r| r[0] >= 0)
    }
}
