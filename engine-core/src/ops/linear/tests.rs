//! Every quantized path (scalar and AVX2 integer kernels, dequantized GEMM, the automatic
//! choice) against dequantize-then-multiply in f64, on random matrices with fresh seeds.
//!
//! Tolerances. The integer path multiplies the weights with the activation rounded to 8-bit
//! blocks plus 8-bit blocks of the residual: the residual of block `b` is at most
//! `d_b / 2 = max_b|x| / 254`, and rounding it moves an element by at most half its own scale,
//! `max_b|x| / 254²`, so an output moves by at most `Σ_b (max_b|x| / 254²) · Σ_{i∈b} |w_i|`
//! (1% slack for the rounding of the scales, plus the f32 rounding of the residual itself,
//! `2⁻²³ · max_b|x|`). On top of that both paths round in f32: a sum of `n` terms is within
//! `n · ε · Σ|w_i x_i|` of exact, with `n` the block terms (integer path) or the length (GEMM).

use rand::Rng;

use super::act::{quantize_block_scalar, ActQ8, QK};
use super::*;
use crate::loader::ggml;
use crate::testing::{fresh_seed, gaussian, poisoned, rng};

const FORMATS: [GgmlType; 3] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0];

/// A random `[out, in]` matrix in `ty`, with scales spread over two orders of magnitude.
fn random_matrix(r: &mut impl Rng, ty: GgmlType, out: usize, inp: usize) -> Vec<u8> {
    let blocks = out * inp / QK;
    let mut data = Vec::with_capacity(blocks * ty.block_bytes() as usize);
    for _ in 0..blocks {
        let d: f32 = r.random_range(0.002..0.2) * if r.random::<bool>() { 1.0 } else { -1.0 };
        data.extend(half::f16::from_f32(d).to_le_bytes());
        match ty {
            GgmlType::Q4_1 => {
                let m: f32 = r.random_range(-1.0..1.0);
                data.extend(half::f16::from_f32(m).to_le_bytes());
                data.extend((0..16).map(|_| r.random::<u8>()));
            }
            GgmlType::Q4_0 => data.extend((0..16).map(|_| r.random::<u8>())),
            // -128 never comes out of ggml's quantizer but is a valid byte; include it.
            GgmlType::Q8_0 => data.extend((0..32).map(|_| r.random::<u8>())),
            _ => unreachable!(),
        }
    }
    data
}

/// Activations with per-block magnitudes from 1e-3 to 1e2 and a few exact zeros.
fn random_activations(r: &mut impl Rng, n: usize) -> Vec<f32> {
    let mut x = gaussian(&mut crate::testing::rng(r.random()), n);
    for b in x.chunks_mut(QK) {
        let scale = 10f32.powf(r.random_range(-3.0..2.0));
        b.iter_mut().for_each(|v| *v *= scale);
        if r.random_range(0..8) == 0 {
            b[r.random_range(0..QK)] = 0.0;
        }
    }
    x
}

/// `Σ w·x` in f64, with the per-output bounds of the module doc for both paths.
struct Reference {
    y: Vec<f64>,
    int_bound: Vec<f64>,
    gemm_bound: Vec<f64>,
}

fn reference(w: &[f32], x: &[f32], out: usize, inp: usize) -> Reference {
    let rows = x.len() / inp;
    let (mut y, mut int_bound, mut gemm_bound) = (vec![], vec![], vec![]);
    let eps = f32::EPSILON as f64;
    let blocks = (inp / QK) as f64;
    for r in 0..rows {
        let xr = &x[r * inp..][..inp];
        for o in 0..out {
            let wr = &w[o * inp..][..inp];
            let (mut s, mut abs, mut act) = (0f64, 0f64, 0f64);
            for (wb, xb) in wr.chunks(QK).zip(xr.chunks(QK)) {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                let wabs: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                act += amax * (1.0 / (254.0 * 254.0) + 1.2e-7) * wabs;
                for (&a, &b) in wb.iter().zip(xb) {
                    s += a as f64 * b as f64;
                    abs += (a as f64 * b as f64).abs();
                }
            }
            y.push(s);
            // The rounded activation's terms are at most |w|·(|x| + d/2).
            int_bound.push(1.01 * act + 4.0 * (2.0 * blocks + 6.0) * eps * (abs + act) + 1e-30);
            gemm_bound.push(2.0 * (inp as f64 + 4.0) * eps * abs + 1e-30);
        }
    }
    Reference {
        y,
        int_bound,
        gemm_bound,
    }
}

fn paths() -> Vec<Path> {
    let mut p = vec![Path::Auto, Path::Dequant, Path::Int(Kernel::Scalar)];
    if Kernel::Avx2.available() {
        p.push(Path::Int(Kernel::Avx2));
    } else {
        eprintln!("AVX2 kernel not tested: this CPU lacks AVX2/FMA/F16C");
    }
    p
}

#[test]
fn every_path_matches_dequantized_reference() {
    let seed = fresh_seed("linear quantized paths");
    let mut r = rng(seed);
    // (rows, out, in): decode rows, a parallel split, prefill sizes, a single block.
    let shapes = [
        (1, 7, 32),
        (1, 300, 256),
        (2, 96, 576),
        (3, 1536, 64),
        (DEQUANT_MIN_ROWS - 1, 64, 128),
        (DEQUANT_MIN_ROWS, 33, 96),
        (37, 257, 160),
    ];
    for ty in FORMATS {
        for &(rows, out, inp) in &shapes {
            let data = random_matrix(&mut r, ty, out, inp);
            let lin = Linear::quantized(ty, &data, out, inp).unwrap();
            let mut w = poisoned(out * inp);
            ggml::dequantize(ty, &data, &mut w).unwrap();
            assert_eq!(lin.to_f32(), w, "{ty}: to_f32");
            let x = random_activations(&mut r, rows * inp);
            let want = reference(&w, &x, out, inp);
            for path in paths() {
                let mut y = poisoned(rows * out);
                lin.forward_into_with(&x, &mut y, path);
                let int = match path {
                    Path::Auto => Path::auto(rows) != Path::Dequant,
                    p => p != Path::Dequant,
                };
                let bound = if int {
                    &want.int_bound
                } else {
                    &want.gemm_bound
                };
                for (i, &g) in y.iter().enumerate() {
                    let err = (g as f64 - want.y[i]).abs();
                    assert!(
                        err <= bound[i],
                        "{ty} {path:?} rows {rows} [{out}, {inp}] output {i}: {g} vs {} \
                         (error {err:e} > bound {:e}; seed {seed})",
                        want.y[i],
                        bound[i]
                    );
                }
            }
        }
    }
}

#[test]
fn avx2_and_scalar_agree_closely() {
    if !Kernel::Avx2.available() {
        eprintln!("skipping: no AVX2");
        return;
    }
    let seed = fresh_seed("linear avx2 vs scalar");
    let mut r = rng(seed);
    for ty in FORMATS {
        let (rows, out, inp) = (3, 130, 1536);
        let data = random_matrix(&mut r, ty, out, inp);
        let lin = Linear::quantized(ty, &data, out, inp).unwrap();
        let x = random_activations(&mut r, rows * inp);
        let (mut a, mut s) = (poisoned(rows * out), poisoned(rows * out));
        lin.forward_into_with(&x, &mut a, Path::Int(Kernel::Avx2));
        lin.forward_into_with(&x, &mut s, Path::Int(Kernel::Scalar));
        // Same exact block sums, different f32 summation order over 48 blocks.
        let scale = s.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (p, q)) in a.iter().zip(&s).enumerate() {
            assert!(
                (p - q).abs() <= 1e-5 * scale,
                "{ty} output {i}: avx2 {p} vs scalar {q} (seed {seed})"
            );
        }
    }
}

#[test]
fn activation_quantization_is_identical_across_kernels_and_bounded() {
    let seed = fresh_seed("q8 activations");
    let mut r = rng(seed);
    let mut x = random_activations(&mut r, 64 * QK);
    // Special blocks: all zero, subnormal, ties, NaN, +inf, huge.
    x[..QK].fill(0.0);
    x[QK..2 * QK].fill(1e-40);
    for (i, v) in x[2 * QK..3 * QK].iter_mut().enumerate() {
        *v = (i as f32 - 16.0) * 0.5; // amax 8 → d = 8/127: many values near ties
    }
    x[3 * QK + 5] = f32::NAN;
    x[4 * QK + 9] = f32::INFINITY;
    x[5 * QK..6 * QK].iter_mut().for_each(|v| *v *= 1e30);
    let mut s = ActQ8::default();
    s.quantize_scalar(&x, x.len());
    let mut a = ActQ8::default();
    a.quantize(&x, x.len());
    assert_eq!(a.qs, s.qs, "codes (seed {seed})");
    for b in 0..s.d.len() {
        let same = |p: f32, q: f32| p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan());
        assert!(
            same(a.d[b], s.d[b]) && same(a.s[b], s.s[b]),
            "block {b} scales"
        );
    }
    // One input row: quantized row 0 holds the codes, row 1 the residual's.
    let nb = x.len() / QK;
    assert_eq!((s.rows, s.blocks), (2, nb));
    assert_eq!((s.d[0], s.d[1]), (0.0, 0.0), "zero and subnormal blocks");
    assert!(s.d[3].is_nan() && s.s[3].is_nan(), "NaN block");
    assert!(s.d[4].is_infinite() && s.s[4].is_nan(), "inf block");
    assert!(
        s.d[nb + 3].is_nan() && s.d[nb + 4].is_nan(),
        "non-finite residuals"
    );
    for (b, xb) in x.chunks(QK).enumerate() {
        if !xb.iter().all(|v| v.is_finite()) {
            continue;
        }
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (row, blk) in [(0, b), (1, nb + b)] {
            let sum: i32 = s.qs[blk * QK..][..QK].iter().map(|&q| q as i32).sum();
            assert_eq!(s.s[blk], s.d[blk] * sum as f32, "row {row} block {b}");
        }
        let (d1, d2) = (s.d[b], s.d[nb + b]);
        assert!(
            d2 <= d1 / 254.0 * 1.0001,
            "block {b}: residual scale {d2} vs {d1}"
        );
        for (i, &v) in xb.iter().enumerate() {
            let (q1, q2) = (s.qs[b * QK + i], s.qs[(nb + b) * QK + i]);
            assert!(q1 > -128 && q2 > -128, "codes stay in ±127");
            if d1 > 0.0 {
                assert!(
                    (v - q1 as f32 * d1).abs() <= 0.5001 * d1,
                    "block {b}[{i}]: {v} vs {q1}·{d1}"
                );
                let e = (v as f64 - q1 as f64 * d1 as f64 - q2 as f64 * d2 as f64).abs();
                assert!(
                    e <= amax as f64 * (1.0 / (254.0 * 254.0) + 1.2e-7),
                    "block {b}[{i}]: {v} vs {q1}·{d1} + {q2}·{d2}"
                );
            }
        }
    }
}

#[test]
fn scalar_block_quantizer_rounds_half_to_even() {
    let mut x = [0f32; QK];
    x[0] = 127.0; // d = 1
    x[1] = 2.5;
    x[2] = -3.5;
    x[3] = 0.5;
    let mut q = [0i8; QK];
    let (d, s) = quantize_block_scalar(&x, &mut q);
    assert_eq!(d, 1.0);
    assert_eq!(&q[..4], &[127, 2, -4, 0]);
    assert_eq!(s, 125.0);
}

#[test]
fn non_finite_activations_give_non_finite_outputs() {
    let seed = fresh_seed("linear non-finite");
    let mut r = rng(seed);
    for ty in FORMATS {
        let lin = Linear::quantized(ty, &random_matrix(&mut r, ty, 8, 64), 8, 64).unwrap();
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = random_activations(&mut r, 64);
            x[40] = bad;
            for path in paths() {
                let mut y = poisoned(8);
                lin.forward_into_with(&x, &mut y, path);
                assert!(
                    y.iter().all(|v| !v.is_finite()),
                    "{ty} {path:?} {bad}: {y:?}"
                );
            }
        }
    }
}

#[test]
fn f32_matches_naive_product() {
    let (rows, inp, out) = (5, 37, 23);
    let w: Vec<f32> = (0..out * inp)
        .map(|i| ((i * 31) % 17) as f32 / 7.0 - 1.0)
        .collect();
    let x: Vec<f32> = (0..rows * inp)
        .map(|i| ((i * 13) % 11) as f32 / 5.0 - 1.0)
        .collect();
    let l = Linear::new(w.clone(), out, inp);
    let mut y = poisoned(rows * out);
    l.forward_into(&x, &mut y);
    for r in 0..rows {
        for o in 0..out {
            let want: f32 = (0..inp).map(|i| x[r * inp + i] * w[o * inp + i]).sum();
            assert!((y[r * out + o] - want).abs() < 1e-4);
        }
    }
    assert_eq!(l.forward(&x), y);
}

#[test]
fn rows_and_metadata() {
    let seed = fresh_seed("linear rows");
    let mut r = rng(seed);
    for ty in FORMATS {
        let data = random_matrix(&mut r, ty, 5, 64);
        let lin = Linear::quantized(ty, &data, 5, 64).unwrap();
        assert_eq!(lin.ggml_type(), ty);
        assert_eq!(lin.weight_bytes(), data.len());
        assert!(lin.weight_f32().is_none());
        let all = lin.to_f32();
        let mut row = poisoned(64);
        lin.row_into(3, &mut row);
        assert_eq!(row, all[3 * 64..4 * 64]);
    }
    let f = Linear::new(vec![1.0, 2.0, 3.0, 4.0], 2, 2);
    let mut row = poisoned(2);
    f.row_into(1, &mut row);
    assert_eq!(row, [3.0, 4.0]);
    assert_eq!(f.ggml_type(), GgmlType::F32);
}

#[test]
fn bad_shapes_and_types_are_errors() {
    let e = Linear::quantized(GgmlType::Q4_1, &[0; 39], 2, 32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs 40 bytes, got 39"), "{e}");
    let e = Linear::quantized(GgmlType::Q8_0, &[0; 34], 1, 30)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a whole number"), "{e}");
    let e = Linear::quantized(GgmlType::Q6K, &[0; 210], 1, 256)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Q6_K"), "{e}");
}

#[test]
fn packing_keeps_every_row() {
    let seed = fresh_seed("linear packing");
    let mut r = rng(seed);
    for ty in FORMATS {
        let fmt = quant::QuantFormat::from_ggml(ty).unwrap();
        for rows in [1, 8, 13, 24, 35] {
            let data = random_matrix(&mut r, ty, rows, 96);
            let packed = quant::Packed::from_ggml(fmt, &data, rows, 3);
            assert_eq!(packed.len(), data.len());
            let rb = packed.row_bytes();
            let mut row = vec![0u8; rb];
            for i in 0..rows {
                packed.row_ggml(i, &mut row);
                assert_eq!(row, data[i * rb..][..rb], "{ty} rows {rows}: row {i}");
            }
        }
    }
}

#[test]
fn forward_many_equals_separate_products() {
    let seed = fresh_seed("linear forward_many");
    let mut r = rng(seed);
    for rows in [1, 3, DEQUANT_MIN_ROWS] {
        let (inp, outs) = (128, [96, 40, 256]);
        let mats: Vec<Linear> = outs
            .iter()
            .zip(FORMATS)
            .map(|(&o, ty)| {
                Linear::quantized(ty, &random_matrix(&mut r, ty, o, inp), o, inp).unwrap()
            })
            .collect();
        let x = random_activations(&mut r, rows * inp);
        for path in paths() {
            let mut ys: Vec<Vec<f32>> = outs.iter().map(|&o| poisoned(rows * o)).collect();
            let mut views: Vec<&mut [f32]> = ys.iter_mut().map(|y| &mut y[..]).collect();
            let refs: Vec<&Linear> = mats.iter().collect();
            Linear::forward_many(&refs, &x, &mut views, path);
            for (m, y) in mats.iter().zip(&ys) {
                let mut want = poisoned(rows * m.out_dim);
                m.forward_into_with(&x, &mut want, path);
                assert_eq!(y, &want, "{path:?} rows {rows} (seed {seed})");
            }
        }
    }
}

/// 16-bit float matrices hold exactly their values widened to f32 and multiply like the f32
/// matrix of those values, for one row (decode) and many (prefill), alone and in
/// `forward_many` beside an f32 matrix; a wrong type or length is an error.
#[test]
fn half_matrices_compute_as_their_f32_values() {
    let seed = fresh_seed("linear half");
    let mut r = rng(seed);
    let (out, inp) = (70, 96);
    for ty in [GgmlType::F16, GgmlType::BF16] {
        let g = gaussian(&mut r, out * inp);
        let bits: Vec<u16> = g
            .iter()
            .map(|&x| match ty {
                GgmlType::F16 => half::f16::from_f32(x).to_bits(),
                _ => half::bf16::from_f32(x).to_bits(),
            })
            .collect();
        let values: Vec<f32> = bits
            .iter()
            .map(|&b| match ty {
                GgmlType::F16 => half::f16::from_bits(b).to_f32(),
                _ => half::bf16::from_bits(b).to_f32(),
            })
            .collect();
        let h = Linear::half(ty, bits, out, inp).unwrap();
        let f = Linear::new(values.clone(), out, inp);
        assert_eq!((h.ggml_type(), h.weight_bytes()), (ty, out * inp * 2));
        assert!(h.weight_f32().is_none());
        assert_eq!(h.to_f32(), values, "{ty:?} (seed {seed})");
        let mut row = poisoned(inp);
        h.row_into(69, &mut row);
        assert_eq!(row, values[69 * inp..]);
        for rows in [1, 7, 300] {
            let x = gaussian(&mut r, rows * inp);
            let want = f.forward(&x);
            let got = h.forward(&x);
            let tol = want.iter().fold(0f32, |m, y| m.max(y.abs())) * 1e-5;
            let worst = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= tol,
                "{ty:?} rows {rows}: {worst} > {tol} (seed {seed})"
            );
            let (mut y_h, mut y_f) = (poisoned(rows * out), poisoned(rows * out));
            Linear::forward_many(&[&h, &f], &x, &mut [&mut y_h, &mut y_f], Path::Auto);
            assert_eq!((y_h, y_f), (got, want), "{ty:?} rows {rows}");
        }
    }
    let e = Linear::half(GgmlType::Q8_0, vec![0; 64], 2, 32).unwrap_err();
    assert!(e.to_string().contains("F16 or BF16"), "{e}");
    let e = Linear::half(GgmlType::F16, vec![0; 63], 2, 32).unwrap_err();
    assert!(e.to_string().contains("needs 64 values, got 63"), "{e}");
}
