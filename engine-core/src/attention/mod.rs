//! Attention over the paged cache. The CPU path here is both the engine's CPU implementation
//! and the reference the GPU kernels are checked against.

pub mod cpu;

pub use cpu::{paged_attention, AttentionBatch, RecentTail, SeqSlice};
