//! The KV cache memory itself: `num_blocks` blocks laid out by a [`CacheLayout`], written and
//! read through the codec that owns the bytes.

use std::sync::Arc;

use super::layout::CacheLayout;
use crate::codec::KvCodec;
use crate::error::KvqError;

/// Host memory of a paged, possibly quantized KV cache. GPU backends keep the same layout in
/// device memory, so bytes written by either side mean the same thing.
#[derive(Debug)]
pub struct PagedKvCache {
    layout: CacheLayout,
    codec: Arc<dyn KvCodec>,
    num_blocks: usize,
    bytes: Vec<u8>,
}

/// The four byte ranges of one (layer, slot, head) entry.
#[derive(Debug, Clone)]
pub struct EntryRanges {
    pub k_data: std::ops::Range<usize>,
    pub k_meta: std::ops::Range<usize>,
    pub v_data: std::ops::Range<usize>,
    pub v_meta: std::ops::Range<usize>,
}

impl PagedKvCache {
    /// Allocates `num_blocks` blocks, zero-filled.
    pub fn new(layout: CacheLayout, codec: Arc<dyn KvCodec>, num_blocks: usize) -> Self {
        let bytes = vec![0u8; layout.block_bytes() * num_blocks];
        Self {
            layout,
            codec,
            num_blocks,
            bytes,
        }
    }

    pub fn layout(&self) -> &CacheLayout {
        &self.layout
    }
    pub fn codec(&self) -> &Arc<dyn KvCodec> {
        &self.codec
    }
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    pub fn block_size(&self) -> usize {
        self.layout.block_size
    }
    /// Raw bytes, for copying to a device or comparing with a kernel's output.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// Byte ranges of the entry for `(layer, slot, head)`; `slot = block · block_size + offset`.
    #[inline]
    pub fn entry(&self, layer: usize, slot: usize, head: usize) -> EntryRanges {
        let l = &self.layout;
        let (block, tok) = (slot / l.block_size, slot % l.block_size);
        let base = l.layer_block_base(layer, block, self.num_blocks);
        let shift = |r: std::ops::Range<usize>| base + r.start..base + r.end;
        EntryRanges {
            k_data: shift(l.k_data.at(head, tok)),
            k_meta: shift(l.k_meta.at(head, tok)),
            v_data: shift(l.v_data.at(head, tok)),
            v_meta: shift(l.v_meta.at(head, tok)),
        }
    }

    fn check_slot(&self, layer: usize, slot: usize) -> Result<(), KvqError> {
        if layer >= self.layout.num_layers || slot >= self.num_blocks * self.layout.block_size {
            return Err(KvqError::InvalidArgument(format!(
                "cache entry (layer {layer}, slot {slot}) outside {} layers × {} slots",
                self.layout.num_layers,
                self.num_blocks * self.layout.block_size
            )));
        }
        Ok(())
    }

    /// Encodes new tokens of one layer: `k` is `[tokens, kv_heads, head_dim_k]`, `v` likewise,
    /// `slots[i]` where token `i` goes.
    pub fn write(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        slots: &[usize],
    ) -> Result<(), KvqError> {
        let h = self.layout.num_kv_heads;
        let (dk, dv) = (self.codec.head_dim_k(), self.codec.head_dim_v());
        if k.len() != slots.len() * h * dk || v.len() != slots.len() * h * dv {
            return Err(KvqError::InvalidArgument(format!(
                "write_kv: {} slots need k of {} and v of {} values, got {} and {}",
                slots.len(),
                slots.len() * h * dk,
                slots.len() * h * dv,
                k.len(),
                v.len()
            )));
        }
        for (i, &slot) in slots.iter().enumerate() {
            self.check_slot(layer, slot)?;
            for head in 0..h {
                let e = self.entry(layer, slot, head);
                let row = i * h + head;
                let (kx, vx) = (&k[row * dk..(row + 1) * dk], &v[row * dv..(row + 1) * dv]);
                let (data, meta) = split_two(&mut self.bytes, e.k_data, e.k_meta);
                self.codec.encode_k(kx, data, meta);
                let (data, meta) = split_two(&mut self.bytes, e.v_data, e.v_meta);
                self.codec.encode_v(vx, data, meta);
            }
        }
        Ok(())
    }

    /// The K (data, meta) bytes of one entry.
    #[inline]
    pub fn k_entry(&self, layer: usize, slot: usize, head: usize) -> (&[u8], &[u8]) {
        let e = self.entry(layer, slot, head);
        (&self.bytes[e.k_data], &self.bytes[e.k_meta])
    }

    /// The V (data, meta) bytes of one entry.
    #[inline]
    pub fn v_entry(&self, layer: usize, slot: usize, head: usize) -> (&[u8], &[u8]) {
        let e = self.entry(layer, slot, head);
        (&self.bytes[e.v_data], &self.bytes[e.v_meta])
    }
}

/// Two disjoint mutable sub-slices of one buffer.
fn split_two(
    buf: &mut [u8],
    a: std::ops::Range<usize>,
    b: std::ops::Range<usize>,
) -> (&mut [u8], &mut [u8]) {
    if a.is_empty() {
        return (&mut [], &mut buf[b]);
    }
    if b.is_empty() {
        return (&mut buf[a], &mut []);
    }
    if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&mut lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&mut hi[..a.end - a.start], &mut lo[b])
    }
}
