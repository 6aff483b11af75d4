//! Properties both TurboMind codecs share: the error bound, the packing bijection, exact
//! constant vectors, and the engine-wide codec checks.

use engine_core::codec::{KvCodec, SideCodec};
use engine_core::dtype::KvDtype;
use engine_core::testing::{
    check_fused_forms, check_non_finite_input_gives_finite_output, fresh_seed,
};
use proptest::prelude::*;

use super::int4::{pack_group, unpack_group, GROUP};
use super::quant::{Params, TmQuantizer};
use super::{int4_codec, int8_codec, TmInt4Side, TmInt8Side};

const DTYPES: [KvDtype; 3] = [KvDtype::F16, KvDtype::Bf16, KvDtype::F32];

/// Powers of two and non-powers of two, all multiples of 8 (int4's group).
const DIMS: [usize; 6] = [64, 128, 96, 80, 8, 24];

fn side(bits: u32, dim: usize, dtype: KvDtype) -> Box<dyn SideCodec> {
    match bits {
        8 => Box::new(TmInt8Side::new(dim, dtype)),
        _ => Box::new(TmInt4Side::new(dim, dtype)),
    }
}

fn encode(side: &dyn SideCodec, x: &[f32]) -> (Vec<u8>, Vec<u8>) {
    let b = side.bytes();
    let (mut data, mut meta) = (vec![0u8; b.data], vec![0u8; b.meta]);
    side.encode(x, &mut data, &mut meta);
    (data, meta)
}

/// Unit roundoff `u` of T: one rounding to T has relative error at most `u`.
fn unit_roundoff(t: KvDtype) -> f32 {
    match t {
        KvDtype::F16 => 2f32.powi(-11),
        KvDtype::Bf16 => 2f32.powi(-8),
        KvDtype::F32 => 2f32.powi(-24),
    }
}

/// Smallest positive subnormal of T: the absolute error of one rounding below T's normal range.
fn min_subnormal(t: KvDtype) -> f32 {
    match t {
        KvDtype::F16 => 2f32.powi(-24),
        KvDtype::Bf16 => 2f32.powi(-133),
        KvDtype::F32 => f32::from_bits(1),
    }
}

/// Smallest positive normal of T.
fn min_normal(t: KvDtype) -> f32 {
    match t {
        KvDtype::F16 => 2f32.powi(-14),
        KvDtype::Bf16 | KvDtype::F32 => f32::MIN_POSITIVE,
    }
}

/// A sound per-element bound on `|x̂ − x|` for TurboMind's quantizer computing in T.
///
/// With `L = 2^bits − 1`, `u` T's unit roundoff and `γ = u + 2^-22` (a T rounding after at
/// most two f32 roundings), for a vector whose scale is a normal number of T:
/// - `s = T((mx − mn)·f32(1/L)) = (mx − mn)/L·(1 + ε₁)`, `|ε₁| ≤ γ`;
/// - `i = T(f32(1/s)) = (1 + ε₂)/s`, and the two T operations give
///   `v = T(T(x_T − mn)·i) = v*(1 + ε₂)(1 + ε₃)(1 + ε₄)` with `v* = (x_T − mn)/s ≤ L/(1 + ε₁)`,
///   so `|v − v*| ≤ 3.04·γ·L`;
/// - `q = clamp(rne(v), 0, L)` adds at most ½ plus the overshoot `v* − L ≤ 1.004·γ·L` that the
///   clamp removes: `|q − v*| ≤ ½ + 4.05·γ·L`;
/// - `x̂ = f32(q·s + mn)`, so `|x̂ − x_T| ≤ s/2 + 4.05·γ·L·s + 2^-24|x̂|`, and `L·s ≤ (1 + γ)(mx − mn)`;
/// - the input itself is rounded to T first: `|x − x_T| ≤ u·|x|`.
///
/// Total: `s/2 + 4.1·γ·(mx − mn) + u·|x| + 2^-23·max|x_T|`, plus a few subnormal roundings of T
/// (absolute `min_subnormal` each) for elements near `mn` or near zero. In f16 the γ term is
/// about half a step for int8 and 1/30 of a step for int4; in bf16 about four int8 steps: that
/// is what TurboMind's T arithmetic costs.
fn error_bound(t: KvDtype, scale: f32, mn: f32, mx: f32, max_abs: f32, x: f32) -> f32 {
    let u = unit_roundoff(t);
    let gamma = u + 2f32.powi(-22);
    scale / 2.0
        + 4.1 * gamma * (mx - mn)
        + u * x.abs()
        + 2f32.powi(-23) * max_abs
        + 4.0 * min_subnormal(t)
}

fn vector(max_dim: usize) -> impl Strategy<Value = Vec<f32>> {
    (
        prop::collection::vec(-1.0f32..1.0, max_dim),
        -6i32..=8,
        -2.0f32..2.0,
    )
        .prop_map(|(m, k, offset)| {
            let mag = 2f32.powi(k);
            m.into_iter().map(|v| (v + offset) * mag).collect()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trip_error_is_within_the_derived_bound(
        bits in prop::sample::select(vec![4u32, 8]),
        dim in prop::sample::select(DIMS.to_vec()),
        dtype in prop::sample::select(DTYPES.to_vec()),
        x in vector(128),
    ) {
        let x = &x[..dim];
        let side = side(bits, dim, dtype);
        let (data, meta) = encode(side.as_ref(), x);
        let p = Params::load(dtype, &meta);
        let xt: Vec<f32> = x.iter().map(|&v| dtype.round(v)).collect();
        let mn = xt.iter().cloned().fold(f32::INFINITY, f32::min);
        let mx = xt.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let max_abs = mn.abs().max(mx.abs());
        prop_assert_eq!(p.zero, mn);
        prop_assume!(p.scale >= min_normal(dtype));
        let mut out = vec![f32::NAN; dim];
        side.decode(&data, &meta, &mut out);
        for (i, (&a, &b)) in out.iter().zip(x).enumerate() {
            let bound = error_bound(dtype, p.scale, mn, mx, max_abs, b);
            prop_assert!(a.is_finite());
            prop_assert!((a - b).abs() <= bound, "element {}: {} vs {} (err {}, bound {}, scale {})",
                i, a, b, (a - b).abs(), bound, p.scale);
        }
    }

    #[test]
    fn int4_packing_is_a_bijection(
        dim in prop::sample::select(DIMS.to_vec()),
        codes in prop::collection::vec(0u8..16, 128),
        bytes in prop::collection::vec(any::<u8>(), 64),
    ) {
        let codes = &codes[..dim];
        let packed: Vec<u8> = codes
            .chunks_exact(GROUP)
            .flat_map(|g| pack_group(g.try_into().unwrap()))
            .collect();
        prop_assert_eq!(packed.len(), dim / 2);
        let unpacked: Vec<u8> = packed
            .chunks_exact(4)
            .flat_map(|w| unpack_group(w.try_into().unwrap()))
            .collect();
        prop_assert_eq!(&unpacked[..], codes);
        // And the other way round: every byte pattern is some codes' packing.
        let bytes = &bytes[..dim / 2];
        let repacked: Vec<u8> = bytes
            .chunks_exact(4)
            .flat_map(|w| pack_group(unpack_group(w.try_into().unwrap())))
            .collect();
        prop_assert_eq!(&repacked[..], bytes);
    }

    #[test]
    fn int4_decode_reads_the_packed_codes(
        dim in prop::sample::select(DIMS.to_vec()),
        dtype in prop::sample::select(DTYPES.to_vec()),
        x in vector(128),
    ) {
        let side = TmInt4Side::new(dim, dtype);
        let (data, meta) = encode(&side, &x[..dim]);
        let p = Params::load(dtype, &meta);
        let codes: Vec<u8> = data.chunks_exact(4).flat_map(|w| unpack_group(w.try_into().unwrap())).collect();
        let mut out = vec![f32::NAN; dim];
        side.decode(&data, &meta, &mut out);
        for (&o, &c) in out.iter().zip(&codes) {
            prop_assert_eq!(o, p.decode(c));
        }
    }

    #[test]
    fn constant_vectors_decode_exactly_without_nan(
        bits in prop::sample::select(vec![4u32, 8]),
        dim in prop::sample::select(DIMS.to_vec()),
        dtype in prop::sample::select(DTYPES.to_vec()),
        c in prop_oneof![any::<f32>(), -100.0f32..100.0, Just(0.0f32), Just(f32::NAN)],
    ) {
        let side = side(bits, dim, dtype);
        let (data, meta) = encode(side.as_ref(), &vec![c; dim]);
        let p = Params::load(dtype, &meta);
        prop_assert_eq!(p.scale, 0.0);
        prop_assert!(data.iter().all(|&b| b == 0), "codes {:?}", data);
        let want = TmQuantizer { bits, dtype }.to_model_dtype(c);
        let mut out = vec![f32::NAN; dim];
        side.decode(&data, &meta, &mut out);
        for &o in &out {
            prop_assert_eq!(o, want, "constant {}", c);
        }
    }
}

#[test]
fn representable_constants_decode_to_themselves() {
    for dtype in DTYPES {
        for c in [
            0.0f32,
            -0.0,
            1.0,
            -3.25,
            1024.0,
            65504.0,
            -65504.0,
            2f32.powi(-24),
        ] {
            if dtype.round(c) != c {
                continue;
            }
            for bits in [4, 8] {
                let side = side(bits, 64, dtype);
                let (data, meta) = encode(side.as_ref(), &[c; 64]);
                let mut out = vec![f32::NAN; 64];
                side.decode(&data, &meta, &mut out);
                assert!(
                    out.iter().all(|&o| o == c),
                    "{dtype:?} int{bits} constant {c}: {out:?}"
                );
            }
        }
    }
}

#[test]
fn engine_codec_checks_pass_for_every_dim_and_dtype() {
    let seed = fresh_seed("turbomind codec checks");
    for dtype in DTYPES {
        for dim in DIMS {
            for codec in [int8_codec(dim, dim, dtype), int4_codec(dim, dim, dtype)] {
                check_fused_forms(&codec, seed);
                check_non_finite_input_gives_finite_output(&codec);
            }
        }
    }
    // int8 encodes any head dim, and K and V may differ.
    let odd = int8_codec(100, 36, KvDtype::F16);
    check_fused_forms(&odd, seed);
    check_non_finite_input_gives_finite_output(&odd);
}

#[test]
fn codecs_report_policy_name_and_bytes() {
    let c = int8_codec(128, 128, KvDtype::F16);
    assert_eq!((c.name(), c.policy()), ("int8", Some(8)));
    assert_eq!((c.k_bytes().data, c.k_bytes().meta), (128, 4));
    let c = int4_codec(128, 64, KvDtype::Bf16);
    assert_eq!((c.name(), c.policy()), ("int4", Some(4)));
    assert_eq!(
        (c.k_bytes().data, c.v_bytes().data, c.v_bytes().meta),
        (64, 32, 4)
    );
    // Reference §4.1: TurboMind int4 at D = 128 is 4.25 bits per element (no alignment).
    assert_eq!(c.head_dim_k(), 128);
    assert_eq!(int4_codec(128, 128, KvDtype::F16).bits_per_element(), 4.25);
    assert_eq!(int8_codec(128, 128, KvDtype::F16).bits_per_element(), 8.25);
}
