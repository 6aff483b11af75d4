//! Vector loops that turn packed cache codes back into f32 rows, for the codecs' decoders:
//! affine u8 and 4-bit codes, f16 values, and small level tables. Each has an AVX2 path chosen
//! at run time and a scalar one that computes bit for bit the same (no FMA: every product and
//! sum is rounded as written).
//!
//! The affine decoders take a whole [`EntryRun`] (adjacent tokens of one cache block) with a
//! per-row coefficient function, so that a codec decodes a run in one call: at head dim 64 a
//! call and a metadata load per token cost as much as the arithmetic.

use half::f16;

use super::simd::has_avx2;
use crate::codec::EntryRun;

/// Fills `count` rows of `dim` outputs: the AVX2 loop `avx2` first (it returns how many leading
/// elements of every row it did), then `tail(row, from, row_out)` for the rest of each row.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn fill_rows(
    count: usize,
    dim: usize,
    out: &mut [f32],
    avx2: impl FnOnce(&mut [f32]) -> usize,
    tail: impl Fn(usize, usize, &mut [f32]),
) {
    assert!(
        out.len() >= count * dim,
        "decode output holds fewer than {count} rows of {dim}"
    );
    let out = &mut out[..count * dim];
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        done = avx2(out);
    }
    if done < dim {
        for (r, row) in out.chunks_exact_mut(dim).enumerate() {
            tail(r, done, row);
        }
    }
}

/// Little-endian f16 rows to f32: entry `r` of `src` (`2 · dim` bytes) gives
/// `out[r · dim..][..dim]`.
pub fn f16_rows(src: EntryRun<'_>, out: &mut [f32]) {
    let dim = src.entry_len() / 2;
    fill_rows(
        src.count(),
        dim,
        out,
        // SAFETY: AVX2/F16C checked by `fill_rows`; it asserted the output length.
        |o| unsafe { x86::f16_rows(src, o) },
        |r, from, row| {
            let b = src.entry(r);
            for (i, o) in row.iter_mut().enumerate().skip(from) {
                *o = f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32();
            }
        },
    );
}

/// How a row's coefficients `[a, b]` turn a code `c` into a value, each operation rounded as
/// written (no FMA), so that the vector and scalar paths agree bit for bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Affine {
    /// `(c − a) · b`: the PyTorch engine's `(c − zero) · scale`.
    SubMul,
    /// `c · a + b`: TurboMind's `c · scale + min`.
    MulAdd,
}

impl Affine {
    #[inline(always)]
    pub fn apply(self, c: f32, [a, b]: [f32; 2]) -> f32 {
        match self {
            Affine::SubMul => (c - a) * b,
            Affine::MulAdd => c * a + b,
        }
    }
}

/// How the codes of one entry are packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packing {
    /// One u8 code per element.
    Bytes,
    /// 4-bit codes, half split: byte `j` holds element `j` (low nibble) and `j + h` (high),
    /// `h` being the entry's length in bytes.
    HalfSplitNibbles,
    /// 4-bit codes, eight to a little-endian 32-bit word: element `j` of word `w` is
    /// `(word >> 4 · slot[j]) & 15`.
    WordNibbles([u32; 8]),
}

impl Packing {
    /// Elements per entry of `len` bytes.
    pub fn elements(self, len: usize) -> usize {
        match self {
            Packing::Bytes => len,
            Packing::HalfSplitNibbles | Packing::WordNibbles(_) => 2 * len,
        }
    }

    /// Code of element `i` of `entry`.
    #[inline]
    pub fn code(self, entry: &[u8], i: usize) -> u8 {
        let h = entry.len();
        match self {
            Packing::Bytes => entry[i],
            Packing::HalfSplitNibbles if i < h => entry[i] & 15,
            Packing::HalfSplitNibbles => entry[i - h] >> 4,
            Packing::WordNibbles(slot) => {
                let w = u32::from_le_bytes(entry[4 * (i / 8)..][..4].try_into().expect("4 bytes"));
                ((w >> (4 * slot[i % 8])) & 15) as u8
            }
        }
    }
}

/// Affine dequantization of a run: element `i` of entry `r` gives
/// `out[r · dim + i] = form.apply(code_i, coef(r))`, `dim` being [`Packing::elements`] of the
/// entry length. Word-packed entries must be whole words.
pub fn affine_rows(
    codes: EntryRun<'_>,
    packing: Packing,
    form: Affine,
    coef: impl Fn(usize) -> [f32; 2],
    out: &mut [f32],
) {
    if let Packing::WordNibbles(_) = packing {
        assert!(codes.entry_len() % 4 == 0, "entries of whole 32-bit words");
    }
    fill_rows(
        codes.count(),
        packing.elements(codes.entry_len()),
        out,
        // SAFETY: AVX2 checked by `fill_rows`; it asserted the output length.
        |o| unsafe { x86::affine_rows(codes, packing, form, &coef, o) },
        |r, from, row| {
            let (c, e) = (coef(r), codes.entry(r));
            for (i, o) in row.iter_mut().enumerate().skip(from) {
                *o = form.apply(packing.code(e, i) as f32, c);
            }
        },
    );
}

/// Half-split nibbles through the sixteen levels `scale · (base[i] − offset)` (`i` < 8) and
/// `scale · (base[i − 8] + offset)` (`i` ≥ 8), each rounded as written: byte `j` of `packed`
/// gives `out[j]` from its low nibble and `out[j + packed.len()]` from its high nibble.
///
/// The levels are built inside from `base` rather than passed as a table a caller has just
/// written: a table of fresh scalar stores read back as vectors stalls store forwarding.
pub fn lut16_half_split_pm(
    base: &[f32; 8],
    offset: f32,
    scale: f32,
    packed: &[u8],
    out: &mut [f32],
) {
    let h = packed.len();
    assert!(out.len() >= 2 * h, "lut16 output too short");
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 checked; lengths asserted.
        j = unsafe { x86::lut16_half_split_pm(base, offset, scale, packed, out) };
    }
    let level = |i: u8| {
        let b = base[(i & 7) as usize];
        scale * if i & 8 != 0 { b + offset } else { b - offset }
    };
    while j < h {
        out[j] = level(packed[j] & 0x0F);
        out[j + h] = level(packed[j] >> 4);
        j += 1;
    }
}

/// Quarter-split 2-bit codes through the four levels `scale · base[i]`: byte `j` of `packed`
/// gives `out[j + k · packed.len()] = scale · base[(byte >> 2k) & 3]` for `k` in 0..4 (levels
/// built inside, see [`lut16_half_split_pm`]).
pub fn lut4_quarter_split_scaled(base: &[f32; 4], scale: f32, packed: &[u8], out: &mut [f32]) {
    let q = packed.len();
    assert!(out.len() >= 4 * q, "lut4 output too short");
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 checked; lengths asserted.
        j = unsafe { x86::lut4_quarter_split_scaled(base, scale, packed, out) };
    }
    while j < q {
        for k in 0..4 {
            out[j + k * q] = scale * base[((packed[j] >> (2 * k)) & 3) as usize];
        }
        j += 1;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Affine, Packing};
    use crate::codec::EntryRun;

    /// Eight codes at `p` widened to i32 lanes.
    #[inline(always)]
    unsafe fn u8x8(p: *const u8) -> __m256i {
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
    }

    /// Whole groups of eight of every row of [`super::f16_rows`]; returns the elements done
    /// per row. `out` holds `count · dim` values (asserted by the caller).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn f16_rows(src: EntryRun<'_>, out: &mut [f32]) -> usize {
        let dim = src.entry_len() / 2;
        let n = dim / 8 * 8;
        for r in 0..src.count() {
            let (s, d) = (src.entry_ptr(r), out.as_mut_ptr().add(r * dim));
            for i in (0..n).step_by(8) {
                let h = _mm_loadu_si128(s.add(2 * i) as *const __m128i);
                _mm256_storeu_ps(d.add(i), _mm256_cvtph_ps(h));
            }
        }
        n
    }

    /// [`Affine::apply`](super::Affine::apply) on eight lanes.
    #[inline(always)]
    unsafe fn apply(form: Affine, c: __m256, a: __m256, b: __m256) -> __m256 {
        match form {
            Affine::SubMul => _mm256_mul_ps(_mm256_sub_ps(c, a), b),
            Affine::MulAdd => _mm256_add_ps(_mm256_mul_ps(c, a), b),
        }
    }

    /// Whole groups of eight of every row of [`super::affine_rows`] (for half-split nibbles,
    /// every row whose half is a whole number of eight bytes, else none); returns the
    /// elements done per row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn affine_rows(
        codes: EntryRun<'_>,
        packing: Packing,
        form: Affine,
        coef: &impl Fn(usize) -> [f32; 2],
        out: &mut [f32],
    ) -> usize {
        let len = codes.entry_len();
        let dim = packing.elements(len);
        let done = match packing {
            Packing::Bytes => len / 8 * 8,
            Packing::HalfSplitNibbles if len % 8 == 0 => dim,
            Packing::HalfSplitNibbles => return 0,
            Packing::WordNibbles(_) => dim,
        };
        let mask = _mm256_set1_epi32(15);
        let shifts = match packing {
            Packing::WordNibbles(slot) => {
                _mm256_slli_epi32::<2>(_mm256_loadu_si256(slot.as_ptr() as *const __m256i))
            }
            _ => _mm256_setzero_si256(),
        };
        for r in 0..codes.count() {
            let [a, b] = coef(r);
            let (a, b) = (_mm256_set1_ps(a), _mm256_set1_ps(b));
            let (p, d) = (codes.entry_ptr(r), out.as_mut_ptr().add(r * dim));
            let store = |at: usize, x: __m256i| {
                _mm256_storeu_ps(d.add(at), apply(form, _mm256_cvtepi32_ps(x), a, b))
            };
            match packing {
                Packing::Bytes => {
                    for i in (0..done).step_by(8) {
                        store(i, u8x8(p.add(i)));
                    }
                }
                Packing::HalfSplitNibbles => {
                    for j in (0..len).step_by(8) {
                        let x = u8x8(p.add(j));
                        store(j, _mm256_and_si256(x, mask));
                        store(j + len, _mm256_srli_epi32::<4>(x));
                    }
                }
                Packing::WordNibbles(_) => {
                    for w in 0..len / 4 {
                        let word = (p.add(4 * w) as *const i32).read_unaligned();
                        let x = _mm256_srlv_epi32(_mm256_set1_epi32(word), shifts);
                        store(8 * w, _mm256_and_si256(x, mask));
                    }
                }
            }
        }
        done
    }

    /// Sixteen-entry lookup of the 4-bit indices in the i32 lanes of `idx` (higher bits
    /// ignored): two eight-entry permutes, chosen by bit 3.
    #[inline(always)]
    unsafe fn lut16(t0: __m256, t1: __m256, idx: __m256i) -> __m256 {
        let a = _mm256_permutevar8x32_ps(t0, idx);
        let b = _mm256_permutevar8x32_ps(t1, idx);
        _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx)))
    }

    /// Whole groups of eight bytes of [`super::lut16_half_split_pm`]; returns how many bytes
    /// were done.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn lut16_half_split_pm(
        base: &[f32; 8],
        offset: f32,
        scale: f32,
        packed: &[u8],
        out: &mut [f32],
    ) -> usize {
        let h = packed.len();
        let n = h / 8 * 8;
        let (b, o, s) = (
            _mm256_loadu_ps(base.as_ptr()),
            _mm256_set1_ps(offset),
            _mm256_set1_ps(scale),
        );
        let (t0, t1) = (
            _mm256_mul_ps(s, _mm256_sub_ps(b, o)),
            _mm256_mul_ps(s, _mm256_add_ps(b, o)),
        );
        for j in (0..n).step_by(8) {
            let x = u8x8(packed.as_ptr().add(j));
            let lo = lut16(t0, t1, x);
            let hi = lut16(t0, t1, _mm256_srli_epi32::<4>(x));
            _mm256_storeu_ps(out.as_mut_ptr().add(j), lo);
            _mm256_storeu_ps(out.as_mut_ptr().add(j + h), hi);
        }
        n
    }

    /// Whole groups of eight bytes of [`super::lut4_quarter_split_scaled`]; returns how many
    /// bytes were done.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn lut4_quarter_split_scaled(
        base: &[f32; 4],
        scale: f32,
        packed: &[u8],
        out: &mut [f32],
    ) -> usize {
        let q = packed.len();
        let n = q / 8 * 8;
        // The levels twice: a permute reads the low three bits, the third of which belongs to
        // the next code and must not matter.
        let b = _mm_loadu_ps(base.as_ptr());
        let t = _mm256_mul_ps(_mm256_set1_ps(scale), _mm256_set_m128(b, b));
        for j in (0..n).step_by(8) {
            let x = u8x8(packed.as_ptr().add(j));
            let o = out.as_mut_ptr().add(j);
            _mm256_storeu_ps(o, _mm256_permutevar8x32_ps(t, x));
            _mm256_storeu_ps(
                o.add(q),
                _mm256_permutevar8x32_ps(t, _mm256_srli_epi32::<2>(x)),
            );
            _mm256_storeu_ps(
                o.add(2 * q),
                _mm256_permutevar8x32_ps(t, _mm256_srli_epi32::<4>(x)),
            );
            _mm256_storeu_ps(
                o.add(3 * q),
                _mm256_permutevar8x32_ps(t, _mm256_srli_epi32::<6>(x)),
            );
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{fresh_seed, poisoned, rng};
    use rand::Rng;

    /// `rows` entries of `len` random bytes, `len + 5` apart (a strided run, as in a
    /// token-major block), plus a coefficient pair per row.
    fn random_run(r: &mut impl Rng, rows: usize, len: usize) -> (Vec<u8>, Vec<[f32; 2]>) {
        let bytes = (0..rows * (len + 5)).map(|_| r.random()).collect();
        let coef = (0..rows)
            .map(|_| [r.random_range(-3.0f32..3.0), r.random_range(0.001f32..0.2)])
            .collect();
        (bytes, coef)
    }

    /// Runs `decode` on a poisoned output and checks every element bitwise against `want(row,
    /// entry, i)`.
    fn check(
        rows: usize,
        dim: usize,
        decode: impl FnOnce(&mut [f32]),
        want: impl Fn(usize, usize) -> f32,
    ) {
        let mut out = poisoned(rows * dim + 3);
        decode(&mut out);
        for r in 0..rows {
            for i in 0..dim {
                let (got, w) = (out[r * dim + i], want(r, i));
                assert_eq!(
                    got.to_bits(),
                    w.to_bits(),
                    "row {r} element {i}: {got} vs {w}"
                );
            }
        }
        assert!(
            out[rows * dim..].iter().all(|v| v.is_nan()),
            "wrote past the rows"
        );
    }

    #[test]
    fn affine_run_decoders_match_scalar_formulas() {
        let mut r = rng(fresh_seed("dequant affine runs"));
        for rows in [1usize, 3] {
            for len in [3usize, 8, 32, 37, 64] {
                let (bytes, coef) = random_run(&mut r, rows, len);
                let run = EntryRun::new(&bytes, len + 5, len, rows);
                let slot = [0u32, 4, 1, 5, 2, 6, 3, 7];
                let mut packings = vec![Packing::Bytes, Packing::HalfSplitNibbles];
                if len % 4 == 0 {
                    packings.push(Packing::WordNibbles(slot));
                }
                for packing in packings {
                    for form in [Affine::SubMul, Affine::MulAdd] {
                        // The scalar formulas, written out independently of `Packing::code`.
                        let code = |i: usize, j: usize| -> f32 {
                            let e = run.entry(i);
                            (match packing {
                                Packing::Bytes => e[j],
                                Packing::HalfSplitNibbles if j < len => e[j] & 15,
                                Packing::HalfSplitNibbles => e[j - len] >> 4,
                                Packing::WordNibbles(_) => {
                                    let w = u32::from_le_bytes(
                                        e[4 * (j / 8)..][..4].try_into().unwrap(),
                                    );
                                    ((w >> (4 * slot[j % 8])) & 15) as u8
                                }
                            }) as f32
                        };
                        let dim = packing.elements(len);
                        check(
                            rows,
                            dim,
                            |o| affine_rows(run, packing, form, |i| coef[i], o),
                            |i, j| {
                                let [a, b] = coef[i];
                                match form {
                                    Affine::SubMul => (code(i, j) - a) * b,
                                    Affine::MulAdd => code(i, j) * a + b,
                                }
                            },
                        );
                    }
                }
                let f16s: Vec<f32> = (0..len).map(|k| (k as f32 - 9.3) * 0.71).collect();
                let mut hb = vec![0u8; rows * (2 * len + 4)];
                for i in 0..rows {
                    for (k, v) in f16s.iter().enumerate() {
                        let b = f16::from_f32(v * (i + 1) as f32).to_le_bytes();
                        hb[i * (2 * len + 4) + 2 * k..][..2].copy_from_slice(&b);
                    }
                }
                let hrun = EntryRun::new(&hb, 2 * len + 4, 2 * len, rows);
                check(
                    rows,
                    len,
                    |o| f16_rows(hrun, o),
                    |i, j| f16::from_f32(f16s[j] * (i + 1) as f32).to_f32(),
                );
            }
        }
    }

    #[test]
    fn table_decoders_match_scalar_formulas() {
        let mut r = rng(fresh_seed("dequant tables"));
        for n in [0usize, 3, 8, 32, 37, 64] {
            let codes: Vec<u8> = (0..n).map(|_| r.random()).collect();
            let base8: [f32; 8] = std::array::from_fn(|i| i as f32 * 0.37 - 1.3);
            let (off, sc) = (r.random_range(0.0f32..0.1), r.random_range(0.5f32..2.0));
            let level = |i: u8| {
                let b = base8[(i & 7) as usize];
                sc * if i & 8 != 0 { b + off } else { b - off }
            };
            check(
                1,
                2 * n,
                |o| lut16_half_split_pm(&base8, off, sc, &codes, o),
                |_, j| {
                    level(if j < n {
                        codes[j] & 15
                    } else {
                        codes[j - n] >> 4
                    })
                },
            );
            let t4 = [-1.5f32, -0.25, 0.25, 1.5];
            check(
                1,
                4 * n,
                |o| lut4_quarter_split_scaled(&t4, 0.3, &codes, o),
                |_, j| 0.3 * t4[((codes[j % n.max(1)] >> (2 * (j / n.max(1)))) & 3) as usize],
            );
        }
    }
}
