//! Small vector kernels with an AVX2 path chosen at run time and a portable fallback: f16
//! conversion of packed arrays, and the dot/axpy/exp loops of the CPU attention.
//!
//! The attention loops are written once, generic over [`Lanes`], and instantiated inside a
//! `#[target_feature]` function for AVX2 (everything below it is `#[inline(always)]`, so the
//! intrinsics inline into it) and as plain Rust for other CPUs.

use half::f16;

/// Whether the AVX2 + FMA + F16C paths run on this CPU.
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Little-endian f16 values in `src` (`2 · dst.len()` bytes) to f32.
pub fn f16_to_f32(src: &[u8], dst: &mut [f32]) {
    assert!(src.len() >= 2 * dst.len(), "f16 source too short");
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2/F16C checked; lengths asserted above.
        unsafe { x86::f16_to_f32(src, dst) };
        return;
    }
    for (o, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
    }
}

/// f32 values to little-endian f16 in `dst` (`2 · src.len()` bytes), rounding to nearest even
/// (as [`half::f16::from_f32`]).
pub fn f32_to_f16(src: &[f32], dst: &mut [u8]) {
    assert!(dst.len() >= 2 * src.len(), "f16 destination too short");
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2/F16C checked; lengths asserted above.
        unsafe { x86::f32_to_f16(src, dst) };
        return;
    }
    for (x, b) in src.iter().zip(dst.chunks_exact_mut(2)) {
        b.copy_from_slice(&f16::from_f32(*x).to_le_bytes());
    }
}

/// The vector operations the attention loops need.
///
/// # Safety
/// Implementations may require CPU features; callers instantiate them only where those are
/// enabled (see the module doc).
pub unsafe trait Lanes {
    /// `Σ a·b`.
    ///
    /// # Safety
    /// The implementation's CPU features must be available.
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32;
    /// `out[j] = q · k[j]` for the rows of `k` (`out.len()` rows of `q.len()` values).
    ///
    /// # Safety
    /// The implementation's CPU features must be available.
    unsafe fn dots(q: &[f32], k: &[f32], out: &mut [f32]) {
        let d = q.len();
        for (j, o) in out.iter_mut().enumerate() {
            *o = Self::dot(q, &k[j * d..][..d]);
        }
    }
    /// `acc = acc · c + Σ_j p[j] · v[j]` over the rows of `v` (`p.len()` rows of `acc.len()`).
    ///
    /// # Safety
    /// The implementation's CPU features must be available.
    unsafe fn scale_accumulate(acc: &mut [f32], c: f32, p: &[f32], v: &[f32]);
    /// `x[j] = exp(x[j] − m)`; returns `Σ x[j]`.
    ///
    /// # Safety
    /// The implementation's CPU features must be available.
    unsafe fn exp_sub_sum(x: &mut [f32], m: f32) -> f32;
    /// The largest element (−∞ for none; NaN elements are skipped).
    ///
    /// # Safety
    /// The implementation's CPU features must be available.
    unsafe fn max(x: &[f32]) -> f32 {
        x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
    }
}

/// Plain Rust, any CPU.
pub struct Portable;

unsafe impl Lanes for Portable {
    #[inline(always)]
    unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        // Eight independent partial sums (vectorizable, and shorter dependency chains).
        let mut s = [0f32; 8];
        let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
        let tail: f32 = ac
            .remainder()
            .iter()
            .zip(bc.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (x, y) in ac.zip(bc) {
            for j in 0..8 {
                s[j] += x[j] * y[j];
            }
        }
        s.iter().sum::<f32>() + tail
    }

    #[inline(always)]
    unsafe fn scale_accumulate(acc: &mut [f32], c: f32, p: &[f32], v: &[f32]) {
        let d = acc.len();
        if c != 1.0 {
            acc.iter_mut().for_each(|a| *a *= c);
        }
        for (j, &pj) in p.iter().enumerate() {
            for (a, &x) in acc.iter_mut().zip(&v[j * d..][..d]) {
                *a += pj * x;
            }
        }
    }

    #[inline(always)]
    unsafe fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
        let mut s = 0f32;
        for v in x.iter_mut() {
            *v = (*v - m).exp();
            s += *v;
        }
        s
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::Avx2;

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::Lanes;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn f16_to_f32(src: &[u8], dst: &mut [f32]) {
        let n = dst.len();
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm_loadu_si128(src.as_ptr().add(2 * i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
        while i < n {
            let b = src.as_ptr().add(2 * i) as *const u16;
            dst[i] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(b.read_unaligned() as i32)));
            i += 1;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn f32_to_f16(src: &[f32], dst: &mut [u8]) {
        let n = src.len();
        let mut i = 0;
        while i + 8 <= n {
            let h =
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src.as_ptr().add(i)));
            _mm_storeu_si128(dst.as_mut_ptr().add(2 * i) as *mut __m128i, h);
            i += 8;
        }
        while i < n {
            let h = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(src[i]));
            let v = _mm_extract_epi16::<0>(h) as u16;
            dst[2 * i..2 * i + 2].copy_from_slice(&v.to_le_bytes());
            i += 1;
        }
    }

    /// AVX2 + FMA; only instantiate inside `#[target_feature(enable = "avx2,fma")]`.
    pub struct Avx2;

    /// The sum of the eight lanes.
    #[inline(always)]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let h = _mm_add_ss(h, _mm_movehdup_ps(h));
        _mm_cvtss_f32(h)
    }

    /// `exp(x)` per lane: Cody–Waite range reduction to `r ∈ [−ln2/2, ln2/2]` and a degree-6
    /// polynomial (relative error ≈ 2 ulp); inputs below −87.3 give 0, NaN stays NaN.
    #[inline(always)]
    unsafe fn exp256(x: __m256) -> __m256 {
        let x = _mm256_min_ps(x, _mm256_set1_ps(88.0));
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.3));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.166_666_65));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        let r2 = _mm256_mul_ps(r, r);
        p = _mm256_fmadd_ps(p, r2, r);
        p = _mm256_add_ps(p, _mm256_set1_ps(1.0));
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
        _mm256_andnot_ps(underflow, y)
    }

    unsafe impl Lanes for Avx2 {
        #[inline(always)]
        unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
            let n = a.len().min(b.len());
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i + 16 <= n {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
                s1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i + 8)),
                    _mm256_loadu_ps(pb.add(i + 8)),
                    s1,
                );
                i += 16;
            }
            if i + 8 <= n {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
                i += 8;
            }
            let mut s = hsum(_mm256_add_ps(s0, s1));
            while i < n {
                s += a[i] * b[i];
                i += 1;
            }
            s
        }

        /// Four rows at a time: four independent accumulators and one combined reduction.
        #[inline(always)]
        unsafe fn dots(q: &[f32], k: &[f32], out: &mut [f32]) {
            let d = q.len();
            let m = out.len();
            assert!(k.len() >= m * d);
            if d % 8 != 0 {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = Self::dot(q, &k[j * d..][..d]);
                }
                return;
            }
            let (pq, pk) = (q.as_ptr(), k.as_ptr());
            let mut j = 0;
            while j + 4 <= m {
                let r = pk.add(j * d);
                let mut a = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i < d {
                    let qv = _mm256_loadu_ps(pq.add(i));
                    for (t, at) in a.iter_mut().enumerate() {
                        *at = _mm256_fmadd_ps(qv, _mm256_loadu_ps(r.add(t * d + i)), *at);
                    }
                    i += 8;
                }
                // Reduce the four accumulators to four sums in one register.
                let h01 = _mm256_hadd_ps(a[0], a[1]);
                let h23 = _mm256_hadd_ps(a[2], a[3]);
                let h = _mm256_hadd_ps(h01, h23);
                let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
                _mm_storeu_ps(out.as_mut_ptr().add(j), s);
                j += 4;
            }
            while j < m {
                out[j] = Self::dot(q, &k[j * d..][..d]);
                j += 1;
            }
        }

        #[inline(always)]
        unsafe fn max(x: &[f32]) -> f32 {
            let n = x.len();
            let px = x.as_ptr();
            let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut i = 0;
            while i + 8 <= n {
                // max(v, m) returns m where v is NaN: NaN is skipped, as in the fold.
                m = _mm256_max_ps(_mm256_loadu_ps(px.add(i)), m);
                i += 8;
            }
            let h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_max_ss(h, _mm_movehdup_ps(h));
            let mut r = _mm_cvtss_f32(h);
            while i < n {
                r = r.max(x[i]);
                i += 1;
            }
            r
        }

        #[inline(always)]
        unsafe fn scale_accumulate(acc: &mut [f32], c: f32, p: &[f32], v: &[f32]) {
            let d = acc.len();
            assert!(v.len() >= p.len() * d);
            let (pa, pv) = (acc.as_mut_ptr(), v.as_ptr());
            let cv = _mm256_set1_ps(c);
            let mut i = 0;
            // 64 columns at a time in eight registers, rows of v outermost: independent FMA
            // chains, one broadcast per row.
            while i + 64 <= d {
                let mut a = [_mm256_setzero_ps(); 8];
                for (k, ak) in a.iter_mut().enumerate() {
                    *ak = _mm256_mul_ps(_mm256_loadu_ps(pa.add(i + 8 * k)), cv);
                }
                for (j, &pj) in p.iter().enumerate() {
                    let b = _mm256_set1_ps(pj);
                    let row = pv.add(j * d + i);
                    for (k, ak) in a.iter_mut().enumerate() {
                        *ak = _mm256_fmadd_ps(b, _mm256_loadu_ps(row.add(8 * k)), *ak);
                    }
                }
                for (k, ak) in a.iter().enumerate() {
                    _mm256_storeu_ps(pa.add(i + 8 * k), *ak);
                }
                i += 64;
            }
            // Eight columns at a time, two chains over alternate rows.
            while i + 8 <= d {
                let mut a0 = _mm256_mul_ps(_mm256_loadu_ps(pa.add(i)), cv);
                let mut a1 = _mm256_setzero_ps();
                let mut j = 0;
                while j + 2 <= p.len() {
                    a0 = _mm256_fmadd_ps(
                        _mm256_set1_ps(p[j]),
                        _mm256_loadu_ps(pv.add(j * d + i)),
                        a0,
                    );
                    a1 = _mm256_fmadd_ps(
                        _mm256_set1_ps(p[j + 1]),
                        _mm256_loadu_ps(pv.add((j + 1) * d + i)),
                        a1,
                    );
                    j += 2;
                }
                if j < p.len() {
                    a0 = _mm256_fmadd_ps(
                        _mm256_set1_ps(p[j]),
                        _mm256_loadu_ps(pv.add(j * d + i)),
                        a0,
                    );
                }
                _mm256_storeu_ps(pa.add(i), _mm256_add_ps(a0, a1));
                i += 8;
            }
            while i < d {
                let mut a = acc[i] * c;
                for (j, &pj) in p.iter().enumerate() {
                    a += pj * v[j * d + i];
                }
                acc[i] = a;
                i += 1;
            }
        }

        #[inline(always)]
        unsafe fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
            let n = x.len();
            let px = x.as_mut_ptr();
            let mv = _mm256_set1_ps(m);
            let mut s = _mm256_setzero_ps();
            let mut i = 0;
            while i + 8 <= n {
                let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(px.add(i)), mv));
                _mm256_storeu_ps(px.add(i), e);
                s = _mm256_add_ps(s, e);
                i += 8;
            }
            let mut total = hsum(s);
            if i < n {
                // The tail through the same polynomial, so every score uses one exp.
                let mut buf = [f32::NEG_INFINITY; 8];
                buf[..n - i].copy_from_slice(&x[i..]);
                let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), mv));
                _mm256_storeu_ps(buf.as_mut_ptr(), e);
                x[i..].copy_from_slice(&buf[..n - i]);
                total += buf[..n - i].iter().sum::<f32>();
            }
            total
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fresh_seed, gaussian, poisoned, rng};

    #[test]
    fn f16_conversions_match_half() {
        let seed = fresh_seed("simd f16");
        let mut r = rng(seed);
        let mut x = gaussian(&mut r, 77);
        x.iter_mut().step_by(3).for_each(|v| *v *= 1e4);
        x[5] = 1e6;
        x[6] = 1e-7;
        x[7] = -0.0;
        let mut bytes = vec![0u8; 2 * x.len()];
        f32_to_f16(&x, &mut bytes);
        for (i, v) in x.iter().enumerate() {
            let want = f16::from_f32(*v).to_le_bytes();
            assert_eq!(&bytes[2 * i..2 * i + 2], &want, "element {i} = {v}");
        }
        let mut back = poisoned(x.len());
        f16_to_f32(&bytes, &mut back);
        for (i, v) in x.iter().enumerate() {
            assert_eq!(back[i].to_bits(), f16::from_f32(*v).to_f32().to_bits());
        }
    }

    #[inline(always)]
    fn check_lanes<L: Lanes>(seed: u64) {
        let mut r = rng(seed);
        for d in [1usize, 7, 8, 16, 64, 65, 128] {
            let q = gaussian(&mut r, d);
            let k = gaussian(&mut r, 9 * d);
            let mut got = poisoned(9);
            // SAFETY: instantiated only where the features exist (see callers).
            unsafe { L::dots(&q, &k, &mut got) };
            for j in 0..9 {
                let want: f64 = (0..d).map(|i| q[i] as f64 * k[j * d + i] as f64).sum();
                assert!(
                    (got[j] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "d {d}"
                );
            }
            let mut acc = gaussian(&mut r, d);
            let p = gaussian(&mut r, 9);
            let want: Vec<f64> = (0..d)
                .map(|i| {
                    acc[i] as f64 * 0.5
                        + (0..9)
                            .map(|j| p[j] as f64 * k[j * d + i] as f64)
                            .sum::<f64>()
                })
                .collect();
            unsafe { L::scale_accumulate(&mut acc, 0.5, &p, &k) };
            for i in 0..d {
                assert!((acc[i] as f64 - want[i]).abs() < 1e-4 * (1.0 + want[i].abs()));
            }
        }
        for n in [0usize, 1, 7, 8, 9, 33] {
            let mut v = gaussian(&mut r, n);
            if n > 2 {
                v[1] = f32::NAN;
            }
            let want = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            assert_eq!(unsafe { L::max(&v) }, want, "max of {n}");
        }
        let mut x: Vec<f32> = (0..203).map(|i| -90.0 + i as f32 * 0.45).collect();
        x[3] = f32::NEG_INFINITY;
        let orig = x.clone();
        let s = unsafe { L::exp_sub_sum(&mut x, 1.5) };
        let mut total = 0f64;
        for (i, (&e, &o)) in x.iter().zip(&orig).enumerate() {
            let want = ((o - 1.5) as f64).exp();
            total += want;
            assert!(
                (e as f64 - want).abs() <= 4e-7 * want + 1e-37,
                "exp({}) = {e}, want {want} (element {i})",
                o - 1.5
            );
        }
        assert!((s as f64 - total).abs() < 1e-5 * total);
    }

    #[test]
    fn portable_lanes_are_right() {
        check_lanes::<Portable>(fresh_seed("simd portable"));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_lanes_are_right() {
        if !has_avx2() {
            eprintln!("skipping: no AVX2");
            return;
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run(seed: u64) {
            check_lanes::<Avx2>(seed)
        }
        // SAFETY: checked above.
        unsafe { run(fresh_seed("simd avx2")) }
    }
}
