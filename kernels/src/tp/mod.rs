//! Tensor parallelism over the GPUs of one host: one process drives `n` devices, each holding
//! a slice of every layer's weights, and NCCL sums the ranks' partial results.
//!
//! The split is Megatron's: in each block the first matrices are split by output rows
//! (column-parallel: `wq`, `wk`, `wv` by heads, `w_gate`, `w_up` by intermediate rows), so
//! every rank computes its own heads or its own slice of the MLP with no communication; the
//! last matrix is split by input columns (row-parallel: `wo`, `w_down`), so each rank's
//! product is a partial sum of the full output and one all-reduce per block completes it.
//! The norms and the embedding table are replicated (a lookup needs no communication); the
//! output head lives on rank 0, which computes the logits.
//!
//! - [`shard`](crate::tp::shard) (always built): the host-side split of a layer's weights for
//!   rank `r` of `n`;
//! - with the `cuda` feature: [`TpGroup`](crate::tp::nccl::TpGroup), the communicators and
//!   the all-reduce the forward pass needs (a group of one rank never touches NCCL). The pass
//!   itself is `crate::runner::TpLlama`.

#[cfg(feature = "cuda")]
pub mod nccl;
pub mod shard;

#[cfg(test)]
mod tests;

#[cfg(feature = "cuda")]
pub use nccl::TpGroup;
pub use shard::{shard_layer, HostMatrix, LayerShard, LayerSplit, Shard};
