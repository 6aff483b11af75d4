//! Weight rows kept in ggml block formats, and their dot products with [`ActQ8`] activation
//! rows: a portable scalar reference and an AVX2 kernel per format.
//!
//! Per 32-element block, with `q` the activation codes, `d_a` their scale and `s_a = d_a · Σq`:
//!
//! | format | block bytes | weight | block dot |
//! |---|---|---|---|
//! | `Q4_0` | 18: `d` f16, 16 bytes of nibbles | `(c − 8) · d` | `d · (d_a · Σcq − 8 · s_a)` |
//! | `Q4_1` | 20: `d`, `m` f16, 16 bytes of nibbles | `c · d + m` | `d · d_a · Σcq + m · s_a` |
//! | `Q8_0` | 34: `d` f16, 32 signed bytes | `c · d` | `d · d_a · Σcq` |
//!
//! Nibble order is ggml's: byte `j` holds element `j` in its low nibble and element `j + 16` in
//! its high nibble. `Σcq` is exact in `i32`; only the per-block scaling and the sum over blocks
//! round, so the kernels differ only by the order of f32 additions.
//!
//! In memory ([`Packed`]) rows are interleaved by groups of eight, block by block: the eight
//! rows' scales of block `b` side by side (one vector load), then their codes. The AVX2 kernel
//! computes eight outputs at once, reducing the eight integer block sums into one vector and
//! scaling them with one multiply, which takes about a third of the instructions of one row at
//! a time. The byte count is the same as ggml's; rows beyond the last whole group stay in
//! ggml's row layout.
//!
//! Every input row arrives as two quantized rows (codes and residual codes, see [`super::act`]);
//! the kernels take both against the same unpacked weights and store the sum.

use half::f16;

use super::act::{ActQ8, ActRow, QK};
use crate::loader::{ggml, GgmlType};

/// The ggml block formats a [`super::Linear`] can hold without dequantizing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    Q4_0,
    Q4_1,
    Q8_0,
}

/// Rows interleaved per group.
pub const GROUP: usize = 8;

impl QuantFormat {
    pub fn from_ggml(ty: GgmlType) -> Option<Self> {
        match ty {
            GgmlType::Q4_0 => Some(Self::Q4_0),
            GgmlType::Q4_1 => Some(Self::Q4_1),
            GgmlType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    pub fn ggml(self) -> GgmlType {
        match self {
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q4_1 => GgmlType::Q4_1,
            Self::Q8_0 => GgmlType::Q8_0,
        }
    }

    /// Bytes per block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }

    /// f16 scales per block (`d`, and `m` for Q4_1).
    fn scales(self) -> usize {
        match self {
            Self::Q4_1 => 2,
            _ => 1,
        }
    }

    /// Bytes of codes per block.
    fn code_bytes(self) -> usize {
        self.block_bytes() - 2 * self.scales()
    }

    /// For a packed group: which row of the group each vector lane (and scale slot) holds.
    /// The nibble kernels reduce two rows per register and end with even rows in the low
    /// half, odd rows in the high half.
    pub fn lane_rows(self) -> [usize; GROUP] {
        match self {
            Self::Q4_0 | Self::Q4_1 => [0, 2, 4, 6, 1, 3, 5, 7],
            Self::Q8_0 => [0, 1, 2, 3, 4, 5, 6, 7],
        }
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The reference dot product of one weight row (ggml layout) with one activation row.
pub fn dot_scalar(fmt: QuantFormat, w: &[u8], a: ActRow<'_>) -> f32 {
    let bb = fmt.block_bytes();
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(bb).enumerate() {
        let q = &a.qs[b * QK..][..QK];
        let (da, sa) = (a.d[b], a.s[b]);
        acc += match fmt {
            QuantFormat::Q4_0 | QuantFormat::Q4_1 => {
                let nib = &blk[bb - 16..];
                let mut sumi = 0i32;
                for j in 0..16 {
                    sumi += (nib[j] & 0x0F) as i32 * q[j] as i32;
                    sumi += (nib[j] >> 4) as i32 * q[j + 16] as i32;
                }
                let d = f16_at(blk, 0);
                if fmt == QuantFormat::Q4_0 {
                    d * (da * sumi as f32 - 8.0 * sa)
                } else {
                    d * da * sumi as f32 + f16_at(blk, 2) * sa
                }
            }
            QuantFormat::Q8_0 => {
                let sumi: i32 = blk[2..]
                    .iter()
                    .zip(q)
                    .map(|(&c, &x)| c as i8 as i32 * x as i32)
                    .sum();
                f16_at(blk, 0) * da * sumi as f32
            }
        };
    }
    acc
}

/// A quantized `[rows, blocks · 32]` matrix in the interleaved layout of the module doc.
#[derive(Debug, Clone)]
pub struct Packed {
    pub format: QuantFormat,
    pub rows: usize,
    /// Blocks per row.
    pub blocks: usize,
    data: Vec<u8>,
}

impl Packed {
    /// Packs `rows` ggml rows of `blocks` blocks each (`plain` is exactly that long).
    pub fn from_ggml(format: QuantFormat, plain: &[u8], rows: usize, blocks: usize) -> Self {
        let rb = blocks * format.block_bytes();
        assert_eq!(plain.len(), rows * rb, "packed matrix size");
        let mut data = vec![0u8; plain.len()];
        let groups = rows / GROUP;
        let (ns, cb) = (format.scales(), format.code_bytes());
        let lanes = format.lane_rows();
        for g in 0..groups {
            for b in 0..blocks {
                let dst = &mut data[g * GROUP * rb + b * GROUP * format.block_bytes()..]
                    [..GROUP * format.block_bytes()];
                for (lane, &j) in lanes.iter().enumerate() {
                    let src = &plain[(g * GROUP + j) * rb + b * format.block_bytes()..]
                        [..format.block_bytes()];
                    for s in 0..ns {
                        let at = s * 2 * GROUP + 2 * lane;
                        dst[at..at + 2].copy_from_slice(&src[2 * s..2 * s + 2]);
                    }
                }
                for j in 0..GROUP {
                    let src = &plain[(g * GROUP + j) * rb + b * format.block_bytes()..]
                        [..format.block_bytes()];
                    let at = ns * 2 * GROUP + j * cb;
                    dst[at..at + cb].copy_from_slice(&src[2 * ns..]);
                }
            }
        }
        let tail = groups * GROUP * rb;
        data[tail..].copy_from_slice(&plain[tail..]);
        Self {
            format,
            rows,
            blocks,
            data,
        }
    }

    /// Bytes of one row (and, ×8, of one group).
    pub fn row_bytes(&self) -> usize {
        self.blocks * self.format.block_bytes()
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Row `i` in ggml's layout, into `out` (`row_bytes()` long).
    pub fn row_ggml(&self, i: usize, out: &mut [u8]) {
        let (fmt, rb) = (self.format, self.row_bytes());
        let groups = self.rows / GROUP;
        if i >= groups * GROUP {
            out.copy_from_slice(&self.data[i * rb..][..rb]);
            return;
        }
        let (g, j) = (i / GROUP, i % GROUP);
        let lane = fmt
            .lane_rows()
            .iter()
            .position(|&r| r == j)
            .expect("every row has a lane");
        let (ns, cb, bb) = (fmt.scales(), fmt.code_bytes(), fmt.block_bytes());
        for b in 0..self.blocks {
            let src = &self.data[g * GROUP * rb + b * GROUP * bb..][..GROUP * bb];
            let dst = &mut out[b * bb..][..bb];
            for s in 0..ns {
                let at = s * 2 * GROUP + 2 * lane;
                dst[2 * s..2 * s + 2].copy_from_slice(&src[at..at + 2]);
            }
            dst[2 * ns..].copy_from_slice(&src[ns * 2 * GROUP + j * cb..][..cb]);
        }
    }

    /// Rows `rows` in f32 into `out` (`rows.len()` rows of `blocks · 32`), bit-identical to
    /// [`Packed::dequantize_row`] per row; whole aligned groups take the AVX2 path.
    pub fn dequantize_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let k = self.blocks * QK;
        assert!(out.len() >= rows.len() * k && rows.end <= self.rows);
        let full = self.rows / GROUP * GROUP;
        let avx2 = crate::ops::simd::has_avx2();
        let mut i = rows.start;
        while i < rows.end {
            let o = &mut out[(i - rows.start) * k..];
            #[cfg(target_arch = "x86_64")]
            if avx2 && i % GROUP == 0 && i + GROUP <= rows.end.min(full) {
                // SAFETY: AVX2 checked; `o` holds the group's eight rows (asserted above).
                unsafe { x86::dequantize_group(self, i, o) };
                i += GROUP;
                continue;
            }
            let _ = avx2;
            self.dequantize_row(i, &mut o[..k]);
            i += 1;
        }
    }

    /// Row `i` in f32.
    pub fn dequantize_row(&self, i: usize, out: &mut [f32]) {
        let mut buf = [0u8; 34 * 64];
        let rb = self.row_bytes();
        let mut tmp;
        let row: &mut [u8] = if rb <= buf.len() {
            &mut buf[..rb]
        } else {
            tmp = vec![0u8; rb];
            &mut tmp
        };
        self.row_ggml(i, row);
        ggml::dequantize(self.format.ggml(), row, out).expect("row length checked at packing");
    }
}

/// Where a kernel writes: `y[r · stride + i]` for activation row `r` and weight row `i`.
/// Tasks of one product write disjoint elements through copies of it.
#[derive(Clone, Copy)]
pub struct OutPtr {
    pub ptr: *mut f32,
    pub stride: usize,
}

// SAFETY: an `OutPtr` is only dereferenced at indices the caller assigned to one task.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `y[r, i] = W[i] · x̂[r]` for weight rows `rows` and every input row `r` of `act` (the sum
/// of the dot products with its two quantized rows), with the scalar reference.
///
/// # Safety
/// `out` must be valid for writes at `r · stride + i` for every such `(r, i)`, and no other
/// thread may access those elements during the call.
pub unsafe fn gemv_scalar(w: &Packed, rows: std::ops::Range<usize>, act: &ActQ8, out: OutPtr) {
    let mut row = vec![0u8; w.row_bytes()];
    for i in rows {
        w.row_ggml(i, &mut row);
        for r in 0..act.rows / 2 {
            let main = dot_scalar(w.format, &row, act.row(2 * r));
            let resid = dot_scalar(w.format, &row, act.row(2 * r + 1));
            *out.ptr.add(r * out.stride + i) = main + resid;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::gemv_avx2;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::ops::simd::x86::hsum;
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{ActQ8, ActRow, OutPtr, Packed, QuantFormat, GROUP, QK};

    /// `y[r, i] = W[i] · A[r]` like [`super::gemv_scalar`], with AVX2. `rows` must start on a
    /// group boundary and end on one or at the last row.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `out` as for [`super::gemv_scalar`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemv_avx2(w: &Packed, rows: Range<usize>, act: &ActQ8, out: OutPtr) {
        assert_eq!(w.blocks, act.blocks, "activation length");
        assert!(act.qs.len() >= act.rows * act.blocks * QK);
        assert!(rows.start % GROUP == 0 && rows.end <= w.rows);
        let (fmt, nb, rb) = (w.format, w.blocks, w.row_bytes());
        let lanes = fmt.lane_rows();
        let full = (w.rows / GROUP) * GROUP;
        let store = |y: __m256, r: usize, i: usize| {
            let mut v = [0f32; GROUP];
            _mm256_storeu_ps(v.as_mut_ptr(), y);
            let o = out.ptr.add(r * out.stride + i);
            for (lane, &j) in lanes.iter().enumerate() {
                *o.add(j) = v[lane];
            }
        };
        // Activation rows in tiles that stay in L1 while this task's weight groups pass over
        // them; each input row's two quantized rows share the unpacked weights.
        const ROW_TILE: usize = 16;
        for r0 in (0..act.rows).step_by(ROW_TILE) {
            let r1 = (r0 + ROW_TILE).min(act.rows);
            let mut i = rows.start;
            while i + GROUP <= rows.end.min(full) {
                let g = w.data.as_ptr().add(i * rb);
                for r in (r0..r1).step_by(2) {
                    let (a, b) = (act.row(r), act.row(r + 1));
                    let (ya, yb) = match fmt {
                        QuantFormat::Q4_0 => group_q4_x2::<false>(g, a, b, nb),
                        QuantFormat::Q4_1 => group_q4_x2::<true>(g, a, b, nb),
                        QuantFormat::Q8_0 => group_q8_0_x2(g, a, b, nb),
                    };
                    store(_mm256_add_ps(ya, yb), r / 2, i);
                }
                i += GROUP;
            }
        }
        let mut i = rows.start.max(full);
        // Rows after the last whole group, in ggml's row layout.
        while i < rows.end {
            let row = w.data.as_ptr().add(i * rb);
            for r in (0..act.rows).step_by(2) {
                let dot = |a| match fmt {
                    QuantFormat::Q4_0 => dot_q4_0(row, a, nb),
                    QuantFormat::Q4_1 => dot_q4_1(row, a, nb),
                    QuantFormat::Q8_0 => dot_q8_0(row, a, nb),
                };
                *out.ptr.add(r / 2 * out.stride + i) = dot(act.row(r)) + dot(act.row(r + 1));
            }
            i += 1;
        }
    }

    /// The group of rows `first..first + 8` of `w` in f32 into `out` (eight rows of
    /// `blocks · 32`), with ggml's formulas and rounding: `(c − 8) · d`, `c · d + m`, `c · d`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dequantize_group(w: &Packed, first: usize, out: &mut [f32]) {
        let (fmt, nb, rb) = (w.format, w.blocks, w.row_bytes());
        let k = nb * QK;
        assert!(out.len() >= GROUP * k && first % GROUP == 0 && first + GROUP <= w.rows);
        let g = w.data.as_ptr().add(first * rb);
        let bb = fmt.block_bytes() * GROUP;
        let (ns, cb) = (fmt.scales(), fmt.code_bytes());
        let lanes = fmt.lane_rows();
        let o = out.as_mut_ptr();
        let (mut d, mut m) = ([0f32; GROUP], [0f32; GROUP]);
        for b in 0..nb {
            let blk = g.add(b * bb);
            _mm256_storeu_ps(
                d.as_mut_ptr(),
                _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i)),
            );
            if fmt == QuantFormat::Q4_1 {
                let mv = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i));
                _mm256_storeu_ps(m.as_mut_ptr(), mv);
            }
            for (lane, &j) in lanes.iter().enumerate() {
                let c = blk.add(2 * GROUP * ns + j * cb);
                let dst = o.add(j * k + b * QK);
                let dv = _mm256_set1_ps(d[lane]);
                match fmt {
                    QuantFormat::Q8_0 => {
                        for h in 0..4 {
                            let x = _mm256_cvtepi8_epi32(_mm_loadl_epi64(
                                c.add(8 * h) as *const __m128i
                            ));
                            _mm256_storeu_ps(
                                dst.add(8 * h),
                                _mm256_mul_ps(_mm256_cvtepi32_ps(x), dv),
                            );
                        }
                    }
                    _ => {
                        let mv = _mm256_set1_ps(m[lane]);
                        let eight = _mm256_set1_epi32(8);
                        for h in 0..2 {
                            let x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                c.add(8 * h) as *const __m128i
                            ));
                            let lo = _mm256_and_si256(x, _mm256_set1_epi32(15));
                            let hi = _mm256_srli_epi32::<4>(x);
                            for (at, v) in [(8 * h, lo), (16 + 8 * h, hi)] {
                                let y = if fmt == QuantFormat::Q4_1 {
                                    _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(v), dv), mv)
                                } else {
                                    _mm256_mul_ps(
                                        _mm256_cvtepi32_ps(_mm256_sub_epi32(v, eight)),
                                        dv,
                                    )
                                };
                                _mm256_storeu_ps(dst.add(at), y);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Eight Q4 rows (packed group at `g`) against two activation rows: per block, two weight
    /// rows per 256-bit load (low nibbles against activation elements 0..16 broadcast to both
    /// halves, high nibbles against 16..32), unpacked once for both activation rows; three
    /// horizontal adds reduce the eight rows' integer sums into one vector (lanes in
    /// [`QuantFormat::lane_rows`] order, matching the packed scales), one FMA scales them.
    #[inline(always)]
    unsafe fn group_q4_x2<const MIN: bool>(
        g: *const u8,
        a: ActRow<'_>,
        b2: ActRow<'_>,
        nb: usize,
    ) -> (__m256, __m256) {
        let bb = if MIN { 20 } else { 18 } * GROUP;
        let codes = if MIN { 32 } else { 16 };
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let (mut acc_a, mut offs_a) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut acc_b, mut offs_b) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for b in 0..nb {
            let blk = g.add(b * bb);
            let (qa, qb) = (a.qs.as_ptr().add(b * QK), b2.qs.as_ptr().add(b * QK));
            let q = [half16(qa, 0), half16(qa, 16), half16(qb, 0), half16(qb, 16)];
            let c = blk.add(codes);
            let (a0, b0) = q4_rows_pair(c, 0, mask, ones, q);
            let (a1, b1) = q4_rows_pair(c, 1, mask, ones, q);
            let (ha01, hb01) = (_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(b0, b1));
            let (a2, b2v) = q4_rows_pair(c, 2, mask, ones, q);
            let (a3, b3) = q4_rows_pair(c, 3, mask, ones, q);
            let ha = _mm256_hadd_epi32(ha01, _mm256_hadd_epi32(a2, a3));
            let hb = _mm256_hadd_epi32(hb01, _mm256_hadd_epi32(b2v, b3));
            let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            let o = if MIN {
                _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i))
            } else {
                d
            };
            let (da, sa) = (*a.d.get_unchecked(b), *a.s.get_unchecked(b));
            let (db, sb) = (*b2.d.get_unchecked(b), *b2.s.get_unchecked(b));
            acc_a = _mm256_fmadd_ps(
                _mm256_mul_ps(d, _mm256_set1_ps(da)),
                _mm256_cvtepi32_ps(ha),
                acc_a,
            );
            acc_b = _mm256_fmadd_ps(
                _mm256_mul_ps(d, _mm256_set1_ps(db)),
                _mm256_cvtepi32_ps(hb),
                acc_b,
            );
            offs_a = _mm256_fmadd_ps(o, _mm256_set1_ps(sa), offs_a);
            offs_b = _mm256_fmadd_ps(o, _mm256_set1_ps(sb), offs_b);
        }
        if MIN {
            (_mm256_add_ps(acc_a, offs_a), _mm256_add_ps(acc_b, offs_b))
        } else {
            let eight = _mm256_set1_ps(8.0);
            (
                _mm256_fnmadd_ps(eight, offs_a, acc_a),
                _mm256_fnmadd_ps(eight, offs_b, acc_b),
            )
        }
    }

    /// Sixteen activation codes at `q + at`, in both 128-bit halves.
    #[inline(always)]
    unsafe fn half16(q: *const i8, at: usize) -> __m256i {
        _mm256_broadcastsi128_si256(_mm_loadu_si128(q.add(at) as *const __m128i))
    }

    /// Weight rows `2k` and `2k + 1` of a Q4 group's codes at `c` against two activation rows
    /// (`q` = their elements 0..16 and 16..32, each in both halves): eight i32 partial sums
    /// per activation row, row `2k` in the low half, `2k + 1` in the high half.
    #[inline(always)]
    unsafe fn q4_rows_pair(
        c: *const u8,
        k: usize,
        mask: __m256i,
        ones: __m256i,
        q: [__m256i; 4],
    ) -> (__m256i, __m256i) {
        let x = _mm256_loadu_si256(c.add(32 * k) as *const __m256i);
        let lo = _mm256_and_si256(x, mask);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(x), mask);
        let pa = _mm256_add_epi16(
            _mm256_maddubs_epi16(lo, q[0]),
            _mm256_maddubs_epi16(hi, q[1]),
        );
        let pb = _mm256_add_epi16(
            _mm256_maddubs_epi16(lo, q[2]),
            _mm256_maddubs_epi16(hi, q[3]),
        );
        (_mm256_madd_epi16(pa, ones), _mm256_madd_epi16(pb, ones))
    }

    /// Weight row `k` of a Q8_0 group's codes at `c` against two activation rows: eight i32
    /// partial sums per activation row.
    #[inline(always)]
    unsafe fn q8_row(
        c: *const u8,
        k: usize,
        ones: __m256i,
        qa: __m256i,
        qb: __m256i,
    ) -> (__m256i, __m256i) {
        let x = _mm256_loadu_si256(c.add(32 * k) as *const __m256i);
        // |x| · (q with x's sign): unsigned × signed for maddubs (|x| ≤ 128, |q| ≤ 127).
        let ax = _mm256_sign_epi8(x, x);
        (
            _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(qa, x)), ones),
            _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(qb, x)), ones),
        )
    }

    /// Rows `k` and `k + 1` of a Q8_0 group, horizontally added pairwise per activation row.
    #[inline(always)]
    unsafe fn q8_rows_pair(
        c: *const u8,
        k: usize,
        ones: __m256i,
        qa: __m256i,
        qb: __m256i,
    ) -> (__m256i, __m256i) {
        let (a0, b0) = q8_row(c, k, ones, qa, qb);
        let (a1, b1) = q8_row(c, k + 1, ones, qa, qb);
        (_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(b0, b1))
    }

    /// The four-row sums of [`group_q8_0_x2`]'s two hadd trees, in natural row order.
    #[inline(always)]
    unsafe fn q8_lanes(h0: __m256i, h1: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(h0, h1),
            _mm256_permute2x128_si256::<0x31>(h0, h1),
        ))
    }

    /// Eight Q8_0 rows against two activation rows: one weight row per register, its
    /// absolute value shared; a tree of horizontal adds per activation row (natural lane
    /// order).
    #[inline(always)]
    unsafe fn group_q8_0_x2(
        g: *const u8,
        a: ActRow<'_>,
        b2: ActRow<'_>,
        nb: usize,
    ) -> (__m256, __m256) {
        let bb = 34 * GROUP;
        let ones = _mm256_set1_epi16(1);
        let (mut acc_a, mut acc_b) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for b in 0..nb {
            let blk = g.add(b * bb);
            let qa = _mm256_loadu_si256(a.qs.as_ptr().add(b * QK) as *const __m256i);
            let qb = _mm256_loadu_si256(b2.qs.as_ptr().add(b * QK) as *const __m256i);
            let c = blk.add(16);
            let (a01, b01) = q8_rows_pair(c, 0, ones, qa, qb);
            let (a23, b23) = q8_rows_pair(c, 2, ones, qa, qb);
            let (ha0, hb0) = (_mm256_hadd_epi32(a01, a23), _mm256_hadd_epi32(b01, b23));
            let (a45, b45) = q8_rows_pair(c, 4, ones, qa, qb);
            let (a67, b67) = q8_rows_pair(c, 6, ones, qa, qb);
            let (ha1, hb1) = (_mm256_hadd_epi32(a45, a67), _mm256_hadd_epi32(b45, b67));
            let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            let (da, db) = (*a.d.get_unchecked(b), *b2.d.get_unchecked(b));
            acc_a = _mm256_fmadd_ps(
                _mm256_mul_ps(d, _mm256_set1_ps(da)),
                q8_lanes(ha0, ha1),
                acc_a,
            );
            acc_b = _mm256_fmadd_ps(
                _mm256_mul_ps(d, _mm256_set1_ps(db)),
                q8_lanes(hb0, hb1),
                acc_b,
            );
        }
        (acc_a, acc_b)
    }

    /// The two f16 values at `p` (unaligned) as f32.
    #[inline(always)]
    unsafe fn f16x2(p: *const u8) -> (f32, f32) {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
    }

    #[inline(always)]
    unsafe fn f16x1(p: *const u8) -> f32 {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const u16).read_unaligned() as i32));
        _mm_cvtss_f32(v)
    }

    /// 16 bytes of nibbles as 32 unsigned bytes in element order (low nibbles, then high).
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let lo = _mm_loadu_si128(p as *const __m128i);
        let hi = _mm_srli_epi16::<4>(lo);
        _mm256_and_si256(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(0x0F))
    }

    /// Σ u·s over 32 (unsigned, signed) byte pairs as 8 f32 partial sums.
    #[inline(always)]
    unsafe fn dot_us8(u: __m256i, s: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(u, s);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    /// One Q4_1 row in ggml layout.
    #[inline(always)]
    unsafe fn dot_q4_1(w: *const u8, a: ActRow<'_>, nb: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut offs = 0f32;
        for b in 0..nb {
            let blk = w.add(b * 20);
            let (d, m) = f16x2(blk);
            let (da, sa) = (*a.d.get_unchecked(b), *a.s.get_unchecked(b));
            let q = _mm256_loadu_si256(a.qs.as_ptr().add(b * QK) as *const __m256i);
            let p = dot_us8(nibbles(blk.add(4)), q);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * da), p, acc);
            offs += m * sa;
        }
        hsum(acc) + offs
    }

    /// One Q4_0 row in ggml layout.
    #[inline(always)]
    unsafe fn dot_q4_0(w: *const u8, a: ActRow<'_>, nb: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut offs = 0f32;
        for b in 0..nb {
            let blk = w.add(b * 18);
            let d = f16x1(blk);
            let (da, sa) = (*a.d.get_unchecked(b), *a.s.get_unchecked(b));
            let q = _mm256_loadu_si256(a.qs.as_ptr().add(b * QK) as *const __m256i);
            let p = dot_us8(nibbles(blk.add(2)), q);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * da), p, acc);
            offs += d * sa;
        }
        hsum(acc) - 8.0 * offs
    }

    /// One Q8_0 row in ggml layout.
    #[inline(always)]
    unsafe fn dot_q8_0(w: *const u8, a: ActRow<'_>, nb: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for b in 0..nb {
            let blk = w.add(b * 34);
            let d = f16x1(blk);
            let da = *a.d.get_unchecked(b);
            let q = _mm256_loadu_si256(a.qs.as_ptr().add(b * QK) as *const __m256i);
            let c = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            let p = dot_us8(_mm256_sign_epi8(c, c), _mm256_sign_epi8(q, c));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * da), p, acc);
        }
        hsum(acc)
    }
}
