//! The paged KV cache: where each (layer, block, token, head) lives in bytes, the pool that
//! hands out blocks, and the memory planner that turns a byte budget into a block count.

pub mod block_pool;
pub mod layout;
pub mod paged;
pub mod planner;
pub mod prefix_cache;
pub mod recent_window;

pub use block_pool::{BlockPool, BlockTable};
pub use layout::{CacheLayout, LayerPlacement, RegionLayout};
pub use paged::{LayerGroup, PagedKvCache};
pub use planner::MemoryPlan;
pub use prefix_cache::PrefixKey;
pub use recent_window::RecentWindow;
