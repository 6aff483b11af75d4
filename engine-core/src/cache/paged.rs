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
///
/// Layers may be split into groups with different codecs (per-layer overrides keep the first
/// and last layers at a higher precision); each group has its own layout and its own region of
/// the buffer, `num_blocks` blocks long, and a block id means the same tokens in every group.
#[derive(Debug)]
pub struct PagedKvCache {
    groups: Vec<Group>,
    /// Group of each layer.
    layer_group: Vec<usize>,
    /// The group whose layout [`PagedKvCache::layout`] reports: the one with the most layers.
    main: usize,
    num_blocks: usize,
    bytes: Vec<u8>,
}

/// Consecutive layers that share a codec: `layers` is their range, `layout` covers
/// `layers.len()` layers.
#[derive(Debug, Clone)]
pub struct LayerGroup {
    pub layers: std::ops::Range<usize>,
    pub codec: Arc<dyn KvCodec>,
    pub layout: CacheLayout,
}

/// A [`LayerGroup`] placed in the buffer at `base`.
#[derive(Debug)]
struct Group {
    first_layer: usize,
    codec: Arc<dyn KvCodec>,
    layout: CacheLayout,
    base: usize,
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
    /// Allocates `num_blocks` blocks, zero-filled, every layer with `codec`.
    pub fn new(layout: CacheLayout, codec: Arc<dyn KvCodec>, num_blocks: usize) -> Self {
        let layers = 0..layout.num_layers;
        Self::with_layer_groups(
            vec![LayerGroup {
                layers,
                codec,
                layout,
            }],
            num_blocks,
        )
    }

    /// Allocates `num_blocks` blocks, zero-filled, for layer groups that cover layers `0..n`
    /// in order.
    ///
    /// # Panics
    /// If the groups are not consecutive from layer 0, a group's layout does not cover its
    /// layers, or the groups differ in block size or KV heads.
    pub fn with_layer_groups(groups: Vec<LayerGroup>, num_blocks: usize) -> Self {
        let (mut base, mut next_layer, mut layer_group) = (0, 0, Vec::new());
        let first = groups
            .first()
            .expect("at least one layer group")
            .layout
            .clone();
        let mut placed = Vec::with_capacity(groups.len());
        for (i, g) in groups.into_iter().enumerate() {
            assert_eq!(
                g.layers.start, next_layer,
                "layer groups must be consecutive"
            );
            assert_eq!(
                g.layout.num_layers,
                g.layers.len(),
                "group layout covers its layers"
            );
            assert!(
                g.layout.block_size == first.block_size
                    && g.layout.num_kv_heads == first.num_kv_heads,
                "layer groups share block size and KV heads"
            );
            next_layer = g.layers.end;
            layer_group.extend(g.layers.clone().map(|_| i));
            placed.push(Group {
                first_layer: g.layers.start,
                codec: g.codec,
                base,
                layout: g.layout,
            });
            base += placed[i].layout.block_bytes() * num_blocks;
        }
        let main = (0..placed.len())
            .max_by_key(|&i| (placed[i].layout.num_layers, usize::MAX - i))
            .expect("at least one group");
        Self {
            groups: placed,
            layer_group,
            main,
            num_blocks,
            bytes: vec![0u8; base],
        }
    }

    /// The layout of the layers without an override (of every layer when there is none): its
    /// block size and head count hold for every layer, its byte layout for those layers.
    pub fn layout(&self) -> &CacheLayout {
        &self.groups[self.main].layout
    }
    /// The codec of the layers without an override (see [`PagedKvCache::layout`]).
    pub fn codec(&self) -> &Arc<dyn KvCodec> {
        &self.groups[self.main].codec
    }
    /// The codec of `layer`.
    #[inline]
    pub fn codec_of(&self, layer: usize) -> &Arc<dyn KvCodec> {
        &self.groups[self.layer_group[layer]].codec
    }
    /// Whether every layer uses one codec (a device cache supports only that).
    pub fn is_uniform(&self) -> bool {
        self.groups.len() == 1
    }
    pub fn num_layers(&self) -> usize {
        self.layer_group.len()
    }
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    pub fn block_size(&self) -> usize {
        self.layout().block_size
    }

    /// The group of `layer`, its layout and the byte offset of the layer's share of `block`.
    #[inline]
    fn locate(&self, layer: usize, block: usize) -> (&CacheLayout, usize) {
        let g = &self.groups[self.layer_group[layer]];
        let local = layer - g.first_layer;
        let base = g.base + g.layout.layer_block_base(local, block, self.num_blocks);
        (&g.layout, base)
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
        let bs = self.block_size();
        let (block, tok) = (slot / bs, slot % bs);
        let (l, base) = self.locate(layer, block);
        let shift = |r: std::ops::Range<usize>| base + r.start..base + r.end;
        EntryRanges {
            k_data: shift(l.k_data.at(head, tok)),
            k_meta: shift(l.k_meta.at(head, tok)),
            v_data: shift(l.v_data.at(head, tok)),
            v_meta: shift(l.v_meta.at(head, tok)),
        }
    }

    fn check_slot(&self, layer: usize, slot: usize) -> Result<(), KvqError> {
        if layer >= self.num_layers() || slot >= self.num_blocks * self.block_size() {
            return Err(KvqError::InvalidArgument(format!(
                "cache entry (layer {layer}, slot {slot}) outside {} layers × {} slots",
                self.num_layers(),
                self.num_blocks * self.block_size()
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
        self.check_slot(layer, 0)?;
        let h = self.layout().num_kv_heads;
        let codec = self.codec_of(layer).clone();
        let (dk, dv) = (codec.head_dim_k(), codec.head_dim_v());
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
                codec.encode_k(kx, data, meta);
                let (data, meta) = split_two(&mut self.bytes, e.v_data, e.v_meta);
                codec.encode_v(vx, data, meta);
            }
        }
        Ok(())
    }

    /// [`PagedKvCache::write`] for many tokens (a prompt): the entries are encoded in parallel
    /// into a staging buffer, then copied to their slots. Codecs write every byte of an entry,
    /// so the result is the same as encoding in place.
    fn write_parallel(&mut self, layer: usize, k: &[f32], v: &[f32], slots: &[usize]) {
        use rayon::prelude::*;
        let h = self.layout().num_kv_heads;
        let codec = self.codec_of(layer).clone();
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
        let (l, base) = self.locate(layer, block);
        assert!(tok + count <= l.block_size, "token run leaves the block");
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

    /// Layers in groups of different codecs (f32 edges around an f16 middle) each read back
    /// what was written to them, through `entry` and `kv_run_in_block`, with no entry of one
    /// (layer, slot, head) overlapping another's.
    #[test]
    fn layer_groups_keep_their_own_codec_and_bytes() {
        let mut r = rng(fresh_seed("paged layer groups"));
        let (heads, bs, blocks, d) = (2, 4, 3, 8);
        let codec = |dtype| -> Arc<dyn KvCodec> { Arc::new(float_codec(d, d, dtype)) };
        let group = |layers: std::ops::Range<usize>, dtype| {
            let c = codec(dtype);
            let layout =
                CacheLayout::token_major(c.k_bytes(), c.v_bytes(), layers.len(), heads, bs, 16);
            LayerGroup {
                layers,
                codec: c,
                layout,
            }
        };
        let mut cache = PagedKvCache::with_layer_groups(
            vec![
                group(0..1, KvDtype::F32),
                group(1..4, KvDtype::F16),
                group(4..5, KvDtype::F32),
            ],
            blocks,
        );
        assert_eq!((cache.num_layers(), cache.layout().num_layers), (5, 3));
        assert!(!cache.is_uniform());
        let slots: Vec<usize> = (0..blocks * bs).collect();
        let mut written = Vec::new();
        for layer in 0..5 {
            let (k, v) = (
                gaussian(&mut r, slots.len() * heads * d),
                gaussian(&mut r, slots.len() * heads * d),
            );
            cache.write(layer, &k, &v, &slots).unwrap();
            written.push((k, v));
        }
        let mut seen = std::collections::HashSet::new();
        for (layer, (k, v)) in written.iter().enumerate() {
            let dtype = if layer == 0 || layer == 4 {
                KvDtype::F32
            } else {
                KvDtype::F16
            };
            for &slot in &slots {
                for head in 0..heads {
                    let e = cache.entry(layer, slot, head);
                    for range in [e.k_data.clone(), e.v_data.clone()] {
                        assert!(range.clone().all(|b| seen.insert(b)), "entries overlap");
                    }
                    let [kd, km, vd, vm] =
                        cache.kv_run_in_block(layer, slot / bs, slot % bs, 1, head);
                    let (mut kx, mut vx) = (vec![f32::NAN; d], vec![f32::NAN; d]);
                    cache.codec_of(layer).decode_k_run(kd, km, &mut kx);
                    cache.codec_of(layer).decode_v_run(vd, vm, &mut vx);
                    let row = (slot * heads + head) * d;
                    for i in 0..d {
                        assert_eq!(kx[i], dtype.round(k[row + i]), "layer {layer} K");
                        assert_eq!(vx[i], dtype.round(v[row + i]), "layer {layer} V");
                    }
                }
            }
        }
        assert!(
            cache.write(5, &[], &[], &[]).is_err(),
            "a layer past the groups is an error"
        );
    }
}
