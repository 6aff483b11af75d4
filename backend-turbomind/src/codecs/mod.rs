//! TurboMind's int8 and int4 KV-cache codecs (reference §3.2–3.3): per (token, KV head)
//! min/max quantization with `[scale, min]` params in the model dtype, arithmetic emulated in
//! that dtype, round-half-to-even codes.

pub mod int4;
pub mod int8;
mod quant;

use std::sync::Arc;

use engine_core::codec::{KvPair, SideCodec};
use engine_core::dtype::KvDtype;

pub use int4::TmInt4Side;
pub use int8::TmInt8Side;

/// Policy 8: TurboMind int8 for K and V.
pub fn int8_codec(head_dim_k: usize, head_dim_v: usize, dtype: KvDtype) -> KvPair {
    let mut c = pair("int8", 8, head_dim_k, head_dim_v, |d| {
        Arc::new(TmInt8Side::new(d, dtype))
    });
    c.gpu_kernel = Some("tm_int8".into());
    c
}

/// Policy 4: TurboMind int4 for K and V.
///
/// # Panics
/// If a head dim is not a multiple of 8 (see [`TmInt4Side::new`]).
pub fn int4_codec(head_dim_k: usize, head_dim_v: usize, dtype: KvDtype) -> KvPair {
    let mut c = pair("int4", 4, head_dim_k, head_dim_v, |d| {
        Arc::new(TmInt4Side::new(d, dtype))
    });
    c.gpu_kernel = Some("tm_int4".into());
    c
}

/// One side shared by K and V when their dims agree (the usual case), two otherwise.
fn pair(
    name: &str,
    policy: u32,
    head_dim_k: usize,
    head_dim_v: usize,
    side: impl Fn(usize) -> Arc<dyn SideCodec>,
) -> KvPair {
    if head_dim_k == head_dim_v {
        KvPair::symmetric(name, Some(policy), side(head_dim_k))
    } else {
        KvPair::new(name, Some(policy), side(head_dim_k), side(head_dim_v))
    }
}

#[cfg(test)]
mod tests;
