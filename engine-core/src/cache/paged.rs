//! The KV cache memory itself: `num_blocks` blocks laid out by a [`CacheLayout`], written and
//! read through the codec that owns the bytes.

use std::sync::Arc;

use super::layout::CacheLayout;
use crate::codec::{EntryRun, KvCodec};
use crate::error::KvqError;

/// From this many tokens on, [`PagedKvCache::write`] encodes in parallel.
const PARALLEL_WRITE_MIN_TOKENS: usize = 16;

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
        for &slot in slots {
            self.check_slot(layer, slot)?;
        }
        if slots.len() >= PARALLEL_WRITE_MIN_TOKENS && rayon::current_num_threads() > 1 {
            self.write_parallel(layer, k, v, slots);
            return Ok(());
        }
        for (i, &slot) in slots.iter().enumerate() {
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

    /// [`PagedKvCache::write`] for many tokens (a prompt): the entries are encoded in parallel
    /// into a staging buffer, then copied to their slots. Codecs write every byte of an entry,
    /// so the result is the same as encoding in place.
    fn write_parallel(&mut self, layer: usize, k: &[f32], v: &[f32], slots: &[usize]) {
        use rayon::prelude::*;
        let h = self.layout.num_kv_heads;
        let codec = self.codec.as_ref();
        let (dk, dv) = (codec.head_dim_k(), codec.head_dim_v());
        let (kb, vb) = (codec.k_bytes(), codec.v_bytes());
        let entry = kb.total() + vb.total();
        let mut stage = vec![0u8; slots.len() * h * entry];
        stage
            .par_chunks_mut(h * entry)
            .enumerate()
            .for_each(|(i, st)| {
                for (head, e) in st.chunks_exact_mut(entry).enumerate() {
                    let row = i * h + head;
                    let (kd, rest) = e.split_at_mut(kb.data);
                    let (km, rest) = rest.split_at_mut(kb.meta);
                    let (vd, vm) = rest.split_at_mut(vb.data);
                    codec.encode_k(&k[row * dk..][..dk], kd, km);
                    codec.encode_v(&v[row * dv..][..dv], vd, vm);
                }
            });
        for (i, &slot) in slots.iter().enumerate() {
            for head in 0..h {
                let e = self.entry(layer, slot, head);
                let src = &stage[(i * h + head) * entry..][..entry];
                let (kd, rest) = src.split_at(kb.data);
                let (km, rest) = rest.split_at(kb.meta);
                let (vd, vm) = rest.split_at(vb.data);
                self.bytes[e.k_data].copy_from_slice(kd);
                self.bytes[e.k_meta].copy_from_slice(km);
                self.bytes[e.v_data].copy_from_slice(vd);
                self.bytes[e.v_meta].copy_from_slice(vm);
            }
        }
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

    /// The K and V (data, meta) entries of `count` adjacent tokens from `tok` of physical block
    /// `block`, for readers that walk a block table themselves (no division by the block size)
    /// and decode a run of tokens per codec call.
    ///
    /// # Panics
    /// If the run leaves the block.
    #[inline(always)]
    pub fn kv_run_in_block(
        &self,
        layer: usize,
        block: usize,
        tok: usize,
        count: usize,
        head: usize,
    ) -> [EntryRun<'_>; 4] {
        let l = &self.layout;
        assert!(tok + count <= l.block_size, "token run leaves the block");
        let base = l.layer_block_base(layer, block, self.num_blocks);
        let at = |r: &super::layout::RegionLayout| {
            let start = base + r.offset + head * r.head_stride + tok * r.token_stride;
            EntryRun::new(&self.bytes[start..], r.token_stride, r.entry_bytes, count)
        };
        [at(&l.k_data), at(&l.k_meta), at(&l.v_data), at(&l.v_meta)]
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::codec::float_codec;
    use crate::testing::{fresh_seed, gaussian, rng};
    use crate::KvDtype;

    /// A prompt written at once (encoded in parallel) leaves the same bytes as its tokens
    /// written one at a time.
    #[test]
    fn parallel_write_equals_token_by_token() {
        let seed = fresh_seed("paged parallel write");
        let mut r = rng(seed);
        let codec: Arc<dyn KvCodec> = Arc::new(float_codec(64, 64, KvDtype::F16));
        let layout = CacheLayout::token_major(codec.k_bytes(), codec.v_bytes(), 2, 3, 16, 64);
        let (mut a, mut b) = (
            PagedKvCache::new(layout.clone(), codec.clone(), 8),
            PagedKvCache::new(layout, codec, 8),
        );
        let n = 3 * PARALLEL_WRITE_MIN_TOKENS + 5;
        let (k, v) = (gaussian(&mut r, n * 3 * 64), gaussian(&mut r, n * 3 * 64));
        let slots: Vec<usize> = (0..n).map(|i| (i * 5 + 3) % (8 * 16)).collect();
        a.write(1, &k, &v, &slots).unwrap();
        for (i, &slot) in slots.iter().enumerate() {
            let row = i * 3 * 64..(i + 1) * 3 * 64;
            b.write(1, &k[row.clone()], &v[row], &[slot]).unwrap();
        }
        assert!(a.as_bytes() == b.as_bytes(), "seed {seed}");
        assert!(a.as_bytes().iter().any(|&x| x != 0));
    }
}
