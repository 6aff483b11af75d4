//! Byte layout of a cache block. Backends decide it (LMDeploy's two engines differ); the cache,
//! the planner, the CPU attention and the GPU kernels all address bytes through it.

use crate::codec::SideBytes;

/// Where one of the four per-token arrays (K codes, V codes, K metadata, V metadata) sits
/// inside one layer's share of a block: `offset + head·head_stride + token·token_stride`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionLayout {
    pub offset: usize,
    pub head_stride: usize,
    pub token_stride: usize,
    /// Bytes of one (token, head) entry.
    pub entry_bytes: usize,
}

impl RegionLayout {
    #[inline]
    pub fn at(&self, head: usize, token: usize) -> std::ops::Range<usize> {
        let start = self.offset + head * self.head_stride + token * self.token_stride;
        start..start + self.entry_bytes
    }
}

/// How layers share the cache memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerPlacement {
    /// One pool per layer, `[num_layers][num_blocks][layer_bytes]` (LMDeploy's PyTorch engine).
    LayerMajor,
    /// A block spans every layer, `[num_blocks][num_layers][layer_bytes]` (TurboMind).
    BlockMajor,
}

/// The full layout of a block for one codec, model shape and block size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheLayout {
    pub block_size: usize,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub k: SideBytes,
    pub v: SideBytes,
    pub k_data: RegionLayout,
    pub v_data: RegionLayout,
    pub k_meta: RegionLayout,
    pub v_meta: RegionLayout,
    /// Bytes one layer's share of one block takes, padding included.
    pub layer_bytes: usize,
    /// Of `layer_bytes`, how many are alignment padding.
    pub layer_padding: usize,
    pub placement: LayerPlacement,
}

impl CacheLayout {
    /// Bytes of one block over all layers.
    pub fn block_bytes(&self) -> usize {
        self.layer_bytes * self.num_layers
    }

    /// Bytes of one block over all layers that are padding.
    pub fn block_padding(&self) -> usize {
        self.layer_padding * self.num_layers
    }

    /// Payload bytes of one token over all layers and heads (no padding).
    pub fn bytes_per_token(&self) -> usize {
        self.num_layers * self.num_kv_heads * (self.k.total() + self.v.total())
    }

    /// Byte offset of `layer`'s share of `block` in a cache of `num_blocks` blocks.
    #[inline]
    pub fn layer_block_base(&self, layer: usize, block: usize, num_blocks: usize) -> usize {
        match self.placement {
            LayerPlacement::LayerMajor => (layer * num_blocks + block) * self.layer_bytes,
            LayerPlacement::BlockMajor => (block * self.num_layers + layer) * self.layer_bytes,
        }
    }

    /// Token-major layout `[B, H, bytes]` per region, each region padded to `align` bytes, in
    /// the order K, V, K meta, V meta (LMDeploy's PyTorch engine uses `align = 256`).
    pub fn token_major(
        k: SideBytes,
        v: SideBytes,
        num_layers: usize,
        num_kv_heads: usize,
        block_size: usize,
        align: usize,
    ) -> Self {
        let mut offset = 0;
        let mut padding = 0;
        let mut region = |entry_bytes: usize| {
            let r = RegionLayout {
                offset,
                head_stride: entry_bytes,
                token_stride: entry_bytes * num_kv_heads,
                entry_bytes,
            };
            let raw = entry_bytes * num_kv_heads * block_size;
            let padded = raw.div_ceil(align) * align;
            padding += padded - raw;
            offset += padded;
            r
        };
        let k_data = region(k.data);
        let v_data = region(v.data);
        let k_meta = region(k.meta);
        let v_meta = region(v.meta);
        Self {
            block_size,
            num_layers,
            num_kv_heads,
            k,
            v,
            k_data,
            v_data,
            k_meta,
            v_meta,
            layer_bytes: offset,
            layer_padding: padding,
            placement: LayerPlacement::LayerMajor,
        }
    }

    /// Head-major layout with a data region then a params region (TurboMind's `block.h`):
    /// `[h][K: B×data][V: B×data]` for every head, then `[h][Kp: B×meta][Vp: B×meta]`.
    pub fn head_major_with_params(
        k: SideBytes,
        v: SideBytes,
        num_layers: usize,
        num_kv_heads: usize,
        block_size: usize,
    ) -> Self {
        let data_head = block_size * (k.data + v.data);
        let meta_head = block_size * (k.meta + v.meta);
        let params_base = num_kv_heads * data_head;
        let r = |offset, head_stride, entry_bytes| RegionLayout {
            offset,
            head_stride,
            token_stride: entry_bytes,
            entry_bytes,
        };
        Self {
            block_size,
            num_layers,
            num_kv_heads,
            k,
            v,
            k_data: r(0, data_head, k.data),
            v_data: r(block_size * k.data, data_head, v.data),
            k_meta: r(params_base, meta_head, k.meta),
            v_meta: r(params_base + block_size * k.meta, meta_head, v.meta),
            layer_bytes: num_kv_heads * (data_head + meta_head),
            layer_padding: 0,
            placement: LayerPlacement::BlockMajor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sides(d: usize, meta: usize) -> SideBytes {
        SideBytes { data: d, meta }
    }

    /// Reference §4.1 example: H=8, D=128, B=64, one layer.
    #[test]
    fn token_major_matches_lmdeploy_block_sizes() {
        let cases = [
            (sides(256, 0), sides(256, 0), 262144),
            (sides(128, 4), sides(128, 4), 135168),
            (sides(64, 4), sides(64, 4), 69632),
            (sides(64, 4), sides(32, 2), 52224),
        ];
        for (k, v, want) in cases {
            let l = CacheLayout::token_major(k, v, 1, 8, 64, 256);
            assert_eq!(l.block_bytes(), want);
        }
    }

    #[test]
    fn regions_tile_the_block_without_overlap() {
        for l in [
            CacheLayout::token_major(sides(32, 4), sides(16, 2), 2, 3, 16, 256),
            CacheLayout::head_major_with_params(sides(32, 4), sides(32, 4), 2, 3, 16),
        ] {
            let mut used = vec![false; l.layer_bytes];
            for region in [l.k_data, l.v_data, l.k_meta, l.v_meta] {
                for h in 0..l.num_kv_heads {
                    for t in 0..l.block_size {
                        for b in region.at(h, t) {
                            assert!(!used[b], "byte {b} used twice");
                            used[b] = true;
                        }
                    }
                }
            }
            let covered = used.iter().filter(|u| **u).count();
            assert_eq!(covered + l.layer_padding, l.layer_bytes);
        }
    }

    #[test]
    fn turbomind_offsets_follow_block_h() {
        // tok_data = 64, tok_param = 4, L = 64, H = 2
        let l = CacheLayout::head_major_with_params(sides(64, 4), sides(64, 4), 1, 2, 64);
        assert_eq!(l.k_data.at(1, 3).start, 2 * 64 * 64 + 3 * 64);
        assert_eq!(l.v_data.at(1, 3).start, 2 * 64 * 64 + 64 * 64 + 3 * 64);
        let params = 2 * 2 * 64 * 64;
        assert_eq!(l.k_meta.at(1, 3).start, params + 2 * 64 * 4 + 3 * 4);
        assert_eq!(
            l.v_meta.at(1, 3).start,
            params + 2 * 64 * 4 + 64 * 4 + 3 * 4
        );
    }
}
