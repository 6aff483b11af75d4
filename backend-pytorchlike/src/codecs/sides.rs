//! `[cache]` codecs: a K side and a V side chosen separately (see
//! `engine_core::config::CacheSection` for the names and their bits per element).

use std::sync::Arc;

use engine_core::codec::{FloatSide, KvPair, Rotated, SideCodec};
use engine_core::config::{CacheSection, SideKind};
use engine_core::KvDtype;

use super::lloyd_max_side::LloydMaxSide;
use super::tq_prod::TqProdSide;
use super::{Int4Side, Int8Side, LloydMax2Side, Qjl4Side};

fn rotated<S: SideCodec + 'static>(inner: S, dtype: KvDtype) -> Arc<dyn SideCodec> {
    Arc::new(Rotated { inner, dtype })
}

/// One side of dimension `dim`. The caller has checked the dimension (even for `int4`, a
/// power of two for every rotated side, ≥ 8 for `tqprod3`).
pub fn build_side(kind: SideKind, rotate: bool, dim: usize, dtype: KvDtype) -> Arc<dyn SideCodec> {
    match (kind, rotate) {
        (SideKind::Fp16, _) => Arc::new(FloatSide { dim, dtype }),
        (SideKind::Int8, false) => Arc::new(Int8Side::new(dim, dtype)),
        (SideKind::Int8, true) => rotated(Int8Side::new(dim, dtype), dtype),
        (SideKind::Int4, false) => Arc::new(Int4Side::new(dim, dtype)),
        (SideKind::Int4, true) => rotated(Int4Side::new(dim, dtype), dtype),
        (SideKind::Tq3s, _) => rotated(Qjl4Side::new(dim, dtype), dtype),
        (SideKind::Lm2, _) => rotated(LloydMax2Side::new(dim, dtype), dtype),
        (SideKind::Lm3, _) => rotated(LloydMaxSide::new(dim, 3, dtype), dtype),
        (SideKind::Lm4, _) => rotated(LloydMaxSide::new(dim, 4, dtype), dtype),
        (SideKind::Lm2u, _) => rotated(LloydMax2Side::unshrunk(dim, dtype), dtype),
        (SideKind::Lm3u, _) => rotated(LloydMaxSide::unshrunk(dim, 3, dtype), dtype),
        (SideKind::Lm4u, _) => rotated(LloydMaxSide::unshrunk(dim, 4, dtype), dtype),
        (SideKind::Tqprod3, _) => rotated(TqProdSide::new(dim, dtype), dtype),
    }
}

/// The GPU kernel side of `kind` on the K side (`is_k`) or the V side, if one exists: the
/// fp16 and integer sides (rotated or not), TurboQuant's 3-bit + sign K, the 2-bit V and the
/// 4-bit Lloyd–Max sides.
fn gpu_side(kind: SideKind, rotate: bool, is_k: bool) -> Option<&'static str> {
    Some(match (kind, rotate, is_k) {
        (SideKind::Fp16, _, _) => "float",
        (SideKind::Int8, false, _) => "pt_int8",
        (SideKind::Int8, true, _) => "pt_int8r",
        (SideKind::Int4, false, _) => "pt_int4",
        (SideKind::Int4, true, _) => "pt_int4r",
        (SideKind::Tq3s, _, true) => "tq3s",
        (SideKind::Lm2, _, false) => "lm2",
        (SideKind::Lm2u, _, false) => "lm2u",
        (SideKind::Lm4, _, _) => "lm4",
        (SideKind::Lm4u, _, _) => "lm4u",
        _ => return None,
    })
}

/// The codec of a `[cache]` section, named e.g. `k:int4r+v:lm3`. It has a GPU kernel
/// (`k:<side>+v:<side>`) when both of its sides have one.
pub fn sides_codec(
    c: &CacheSection,
    head_dim_k: usize,
    head_dim_v: usize,
    dtype: KvDtype,
) -> KvPair {
    let mut pair = KvPair::new(
        &c.main_section().codec_name(),
        None,
        build_side(c.k, c.rotate, head_dim_k, dtype),
        build_side(c.v, c.rotate, head_dim_v, dtype),
    );
    if let (Some(k), Some(v)) = (
        gpu_side(c.k, c.rotate, true),
        gpu_side(c.v, c.rotate, false),
    ) {
        pair.gpu_kernel = Some(format!("k:{k}+v:{v}"));
    }
    pair
}
