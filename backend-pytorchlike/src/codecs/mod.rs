//! The pytorch backend's built-in codecs: int8/int4 with PyTorch-engine semantics and
//! TurboQuant (policy 42). Each is a pair of [`engine_core::codec::SideCodec`]s.

pub mod affine;
pub mod int4;
pub mod int8;
pub mod lloyd_max;
pub mod lloyd_max_side;
pub mod packing;
pub mod sides;
pub mod tq_prod;
pub mod turbo_quant;

#[cfg(test)]
pub(crate) mod test_support;

use std::sync::Arc;

use engine_core::codec::{KvPair, SideCodec};
use engine_core::KvDtype;

pub use int4::Int4Side;
pub use int8::Int8Side;
pub use lloyd_max_side::LloydMaxSide;
pub use sides::sides_codec;
pub use tq_prod::TqProdSide;
pub use turbo_quant::{turbo_quant_codec, LloydMax2Side, Qjl4Side};

/// One side per head dim: shared when K and V have the same dim.
fn pair<S: SideCodec + 'static>(
    name: &str,
    policy: u32,
    k: usize,
    v: usize,
    side: impl Fn(usize) -> S,
) -> KvPair {
    if k == v {
        KvPair::symmetric(name, Some(policy), Arc::new(side(k)))
    } else {
        KvPair::new(name, Some(policy), Arc::new(side(k)), Arc::new(side(v)))
    }
}

/// Policy 8.
pub fn int8_codec(head_dim_k: usize, head_dim_v: usize, dtype: KvDtype) -> KvPair {
    let mut c = pair("int8", 8, head_dim_k, head_dim_v, |d| {
        Int8Side::new(d, dtype)
    });
    c.gpu_kernel = Some("pt_int8".into());
    c
}

/// Policy 4.
///
/// # Panics
/// If a head dim is odd.
pub fn int4_codec(head_dim_k: usize, head_dim_v: usize, dtype: KvDtype) -> KvPair {
    let mut c = pair("int4", 4, head_dim_k, head_dim_v, |d| {
        Int4Side::new(d, dtype)
    });
    c.gpu_kernel = Some("pt_int4".into());
    c
}
