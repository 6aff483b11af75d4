//! The memory planner: how many blocks a byte budget buys under a layout, and what that is
//! worth against the fp16 cache.

use serde::Serialize;

use super::layout::CacheLayout;

/// The outcome of planning a cache.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryPlan {
    /// Bytes given to the cache (budget × fraction).
    pub cache_bytes: u64,
    pub block_bytes: usize,
    /// Of `block_bytes`, alignment padding.
    pub block_padding: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    /// Tokens the cache holds over all sequences.
    pub token_capacity: usize,
    /// Blocks the fp16 cache of the same backend would get from the same budget.
    pub fp16_num_blocks: usize,
    /// `num_blocks / fp16_num_blocks`, the capacity the codec buys.
    pub ratio_to_fp16: f64,
    /// The ratio if there were no padding (exact byte arithmetic).
    pub ratio_to_fp16_unpadded: f64,
}

impl MemoryPlan {
    /// Plans `budget_bytes · fraction` of memory for a cache whose layer groups have
    /// `layouts` (one for a cache with one codec), comparing with `fp16_layout`.
    pub fn new(
        layouts: &[&CacheLayout],
        fp16_layout: &CacheLayout,
        budget_bytes: u64,
        fraction: f64,
    ) -> Self {
        let cache_bytes = (budget_bytes as f64 * fraction).floor() as u64;
        let sum = |f: fn(&CacheLayout) -> usize| layouts.iter().map(|l| f(l)).sum::<usize>();
        let (block_bytes, per_token) = (
            sum(CacheLayout::block_bytes),
            sum(CacheLayout::bytes_per_token),
        );
        let blocks = |bytes: usize| (cache_bytes / bytes as u64) as usize;
        let (num_blocks, fp16_num_blocks) =
            (blocks(block_bytes), blocks(fp16_layout.block_bytes()));
        let block_size = fp16_layout.block_size;
        Self {
            cache_bytes,
            block_bytes,
            block_padding: sum(CacheLayout::block_padding),
            num_blocks,
            block_size,
            token_capacity: num_blocks * block_size,
            fp16_num_blocks,
            ratio_to_fp16: fp16_layout.block_bytes() as f64 / block_bytes as f64,
            ratio_to_fp16_unpadded: fp16_layout.bytes_per_token() as f64 / per_token as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::SideBytes;

    #[test]
    fn block_count_grows_by_the_byte_ratio() {
        let s = |d, m| SideBytes { data: d, meta: m };
        let fp16 = CacheLayout::token_major(s(128, 0), s(128, 0), 30, 3, 64, 256);
        let int8 = CacheLayout::token_major(s(64, 4), s(64, 4), 30, 3, 64, 256);
        let plan = MemoryPlan::new(&[&int8], &fp16, 1 << 30, 0.5);
        assert_eq!(plan.cache_bytes, 1 << 29);
        assert_eq!(plan.num_blocks, (1usize << 29) / int8.block_bytes());
        assert_eq!(plan.token_capacity, plan.num_blocks * 64);
        assert!(
            (plan.ratio_to_fp16 - 1.882).abs() < 1e-3,
            "{}",
            plan.ratio_to_fp16
        );
    }
}
