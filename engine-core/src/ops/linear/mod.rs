//! Dense layers `y = x·Wᵀ` with `W` stored `[out, in]` row-major (the GGUF/HF layout), in f32,
//! in f16/bf16 or in a ggml block format (`Q4_0`, `Q4_1`, `Q8_0`) as the model file stores it.
//!
//! Quantized weights are used as they are, the way llama.cpp does: for a few rows (decode)
//! each activation row is quantized to 8-bit blocks ([`act`], with a second 8-bit block for the
//! rounding residual) and each output is a sum of exact integer block dot products times a
//! scale ([`quant`]), with an AVX2 kernel chosen at run time and a portable scalar kernel as
//! the reference. For many rows (prefill) the weights are dequantized a tile at a time and
//! multiplied with the f32 GEMM, which is faster there ([`Path::auto`]). 16-bit float weights
//! are kept in 16 bits (an 8B model in 16 GB of host memory, not 32) and always take the tiled
//! path, widened to f32 a tile at a time. Work is split over output rows with rayon.

pub mod act;
mod dense;
pub mod quant;

#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::ops::Range;

use rayon::prelude::*;

use self::act::{ActQ8, QK};
use self::quant::{OutPtr, Packed, QuantFormat, GROUP};
use crate::error::KvqError;
use crate::loader::GgmlType;

/// A weight matrix, f32 or quantized.
#[derive(Debug, Clone)]
pub struct Linear {
    pub out_dim: usize,
    pub in_dim: usize,
    weights: Weights,
}

#[derive(Debug, Clone)]
enum Weights {
    F32(Vec<f32>),
    /// f16 or bf16 (`ty`) bit patterns, row-major.
    Half {
        bits: Vec<u16>,
        ty: GgmlType,
    },
    /// `out_dim` rows of `in_dim / 32` ggml blocks, interleaved by 8 rows ([`Packed`]).
    Quant(Packed),
}

/// The integer dot-product kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Portable Rust; the reference the others are tested against.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
}

impl Kernel {
    /// Whether this CPU can run the kernel.
    pub fn available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            Kernel::Avx2 => crate::ops::simd::has_avx2(),
        }
    }

    /// The fastest kernel this CPU runs.
    pub fn best() -> Self {
        if Kernel::Avx2.available() {
            Kernel::Avx2
        } else {
            Kernel::Scalar
        }
    }
}

/// How a quantized product is computed: [`Path::Auto`] picks by row count; the others fix the
/// path (tests, benchmarks, and callers whose rows must not depend on what shares the call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Integer kernels for few rows, dequantized tiles and GEMM for many.
    Auto,
    /// Quantized activations and integer dot products with this kernel, for any row count.
    Int(Kernel),
    /// Dequantized weight tiles and the f32 GEMM, for any row count.
    Dequant,
}

/// From this many input rows on, quantized weights are dequantized a tile at a time for the
/// f32 GEMM instead of going through the integer kernels ([`Path::auto`]).
pub const DEQUANT_MIN_ROWS: usize = 32;

impl Path {
    /// What [`Path::Auto`] does for `rows` input rows: the integer kernels (AVX2 where the CPU
    /// has it) below [`DEQUANT_MIN_ROWS`], dequantized tiles and the GEMM from there on. The
    /// integer kernels' cost grows with every row (each is two quantized rows, see [`act`]);
    /// dequantizing costs about as much as 20 rows once per call, after which the GEMM is
    /// cheaper per row. On SmolLM2's matrices (one core) the two meet between 16 and 32 rows.
    pub fn auto(rows: usize) -> Path {
        if rows < DEQUANT_MIN_ROWS {
            Path::Int(Kernel::best())
        } else {
            Path::Dequant
        }
    }
}

thread_local! {
    /// Per-thread scratch, taken out for a call and put back, so nested calls cannot clash.
    static ACT: Cell<ActQ8> = Cell::new(ActQ8::default());
    static TILE: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

impl Linear {
    /// An f32 matrix, `[out_dim, in_dim]` row-major.
    pub fn new(weight: Vec<f32>, out_dim: usize, in_dim: usize) -> Self {
        assert_eq!(weight.len(), out_dim * in_dim, "weight shape");
        Self {
            out_dim,
            in_dim,
            weights: Weights::F32(weight),
        }
    }

    /// A matrix of 16-bit floats (`ty` is `F16` or `BF16`), `[out_dim, in_dim]` row-major as
    /// bit patterns, kept in 16 bits.
    pub fn half(
        ty: GgmlType,
        bits: Vec<u16>,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Self, KvqError> {
        if !matches!(ty, GgmlType::F16 | GgmlType::BF16) {
            return Err(KvqError::InvalidArgument(format!(
                "a 16-bit float matrix is F16 or BF16, not {}",
                ty.name()
            )));
        }
        if bits.len() != out_dim * in_dim {
            return Err(KvqError::InvalidArgument(format!(
                "{} matrix [{out_dim}, {in_dim}] needs {} values, got {}",
                ty.name(),
                out_dim * in_dim,
                bits.len()
            )));
        }
        Ok(Self {
            out_dim,
            in_dim,
            weights: Weights::Half { bits, ty },
        })
    }

    /// A matrix kept in ggml block format `ty`: `data` is `out_dim` rows of `in_dim` weights
    /// each, as a GGUF file stores them. Formats without a kernel here are an error (dequantize
    /// them and use [`Linear::new`]).
    pub fn quantized(
        ty: GgmlType,
        data: &[u8],
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Self, KvqError> {
        let format = QuantFormat::from_ggml(ty).ok_or_else(|| {
            KvqError::InvalidArgument(format!("no quantized matmul for ggml type {ty}"))
        })?;
        if in_dim % QK != 0 || in_dim == 0 {
            return Err(KvqError::InvalidArgument(format!(
                "a {} row of {in_dim} weights is not a whole number of {QK}-element blocks",
                ty.name()
            )));
        }
        let expected = out_dim * (in_dim / QK) * format.block_bytes();
        if data.len() != expected {
            return Err(KvqError::InvalidArgument(format!(
                "{} matrix [{out_dim}, {in_dim}] needs {expected} bytes, got {}",
                ty.name(),
                data.len()
            )));
        }
        Ok(Self {
            out_dim,
            in_dim,
            weights: Weights::Quant(Packed::from_ggml(format, data, out_dim, in_dim / QK)),
        })
    }

    /// The storage type (`F32`, or the ggml block format).
    pub fn ggml_type(&self) -> GgmlType {
        match &self.weights {
            Weights::F32(_) => GgmlType::F32,
            Weights::Half { ty, .. } => *ty,
            Weights::Quant(p) => p.format.ggml(),
        }
    }

    /// The f32 weights, when stored in f32.
    pub fn weight_f32(&self) -> Option<&[f32]> {
        match &self.weights {
            Weights::F32(w) => Some(w),
            Weights::Half { .. } | Weights::Quant(_) => None,
        }
    }

    /// Bytes the weights take in memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.weights {
            Weights::F32(w) => w.len() * 4,
            Weights::Half { bits, .. } => bits.len() * 2,
            Weights::Quant(p) => p.len(),
        }
    }

    /// Row `i` of `W` in f32 into `out` (`in_dim` values): an embedding lookup.
    pub fn row_into(&self, i: usize, out: &mut [f32]) {
        assert!(i < self.out_dim, "row {i} of {}", self.out_dim);
        assert_eq!(out.len(), self.in_dim, "row length");
        match &self.weights {
            Weights::F32(w) => out.copy_from_slice(&w[i * self.in_dim..][..self.in_dim]),
            Weights::Half { bits, ty } => widen(*ty, &bits[i * self.in_dim..][..self.in_dim], out),
            Weights::Quant(p) => p.dequantize_row(i, out),
        }
    }

    /// The whole matrix in f32 (`[out_dim, in_dim]`).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out_dim * self.in_dim];
        self.dequantize_rows(0..self.out_dim, &mut w);
        w
    }

    /// Rows `rows` of `W` in f32 into `out` (`rows.len() × in_dim` values), in parallel.
    ///
    /// # Panics
    /// When `rows` reaches past `out_dim` or `out` is shorter.
    pub fn dequantize_rows(&self, rows: Range<usize>, out: &mut [f32]) {
        assert!(
            rows.end <= self.out_dim,
            "rows {rows:?} of {}",
            self.out_dim
        );
        let k = self.in_dim;
        // Chunks of whole groups (when `rows` starts on one) for the packed fast path.
        const CHUNK: usize = 4 * GROUP;
        out[..rows.len() * k]
            .par_chunks_mut(k * CHUNK)
            .enumerate()
            .for_each(|(c, o)| {
                let first = rows.start + c * CHUNK;
                let last = (first + CHUNK).min(rows.end);
                match &self.weights {
                    Weights::F32(w) => o.copy_from_slice(&w[first * k..last * k]),
                    Weights::Half { bits, ty } => widen(*ty, &bits[first * k..last * k], o),
                    Weights::Quant(p) => p.dequantize_rows(first..last, o),
                }
            });
    }

    /// `x` is `[rows, in]`; returns `[rows, out]`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.in_dim;
        let mut y = vec![0f32; rows * self.out_dim];
        self.forward_into(x, &mut y);
        y
    }

    /// Like [`Linear::forward`] into a caller's buffer.
    pub fn forward_into(&self, x: &[f32], y: &mut [f32]) {
        self.forward_into_with(x, y, Path::Auto)
    }

    /// Like [`Linear::forward_into`] along a chosen path (f32 weights ignore it). Panics when
    /// the path's kernel does not run on this CPU.
    pub fn forward_into_with(&self, x: &[f32], y: &mut [f32], path: Path) {
        let rows = x.len() / self.in_dim;
        assert_eq!(x.len(), rows * self.in_dim, "input shape");
        assert_eq!(y.len(), rows * self.out_dim, "output shape");
        if rows == 0 {
            return;
        }
        match &self.weights {
            Weights::F32(w) => {
                dense::gemm_into(x, rows, self.in_dim, w, self.out_dim, y, self.out_dim)
            }
            Weights::Half { .. } => self.forward_dequant(x, y),
            Weights::Quant(packed) => {
                let path = match path {
                    Path::Auto => Path::auto(rows),
                    p => p,
                };
                match path {
                    Path::Int(kernel) => self.forward_int(packed, x, y, kernel),
                    _ => self.forward_dequant(x, y),
                }
            }
        }
    }

    /// Quantized activations, integer dot products, split over output rows.
    fn forward_int(&self, w: &Packed, x: &[f32], y: &mut [f32], kernel: Kernel) {
        let out = OutPtr {
            ptr: y.as_mut_ptr(),
            stride: self.out_dim,
        };
        // SAFETY: `y` is `rows × out_dim` (asserted by the caller) and borrowed mutably here.
        unsafe { int_products(&[(w, out)], x, self.in_dim, kernel) };
    }

    /// Several products of the same input `x` (`[rows, in]`), `outs[k] = x·mats[k]ᵀ`: for
    /// the integer path the input is quantized once and every matrix's rows are split over
    /// the threads in one parallel call (Q, K and V; gate and up).
    pub fn forward_many(mats: &[&Linear], x: &[f32], outs: &mut [&mut [f32]], path: Path) {
        assert_eq!(mats.len(), outs.len(), "one output per matrix");
        let Some(first) = mats.first() else { return };
        let rows = x.len() / first.in_dim;
        let path = match path {
            Path::Auto => Path::auto(rows),
            p => p,
        };
        let packed: Vec<&Packed> = mats
            .iter()
            .filter(|m| m.in_dim == first.in_dim)
            .filter_map(|m| match &m.weights {
                Weights::Quant(p) => Some(p),
                Weights::F32(_) | Weights::Half { .. } => None,
            })
            .collect();
        let Path::Int(kernel) = path else {
            return mats
                .iter()
                .zip(outs.iter_mut())
                .for_each(|(m, y)| m.forward_into_with(x, y, path));
        };
        if packed.len() != mats.len() {
            return mats
                .iter()
                .zip(outs.iter_mut())
                .for_each(|(m, y)| m.forward_into_with(x, y, path));
        }
        assert_eq!(x.len(), rows * first.in_dim, "input shape");
        let targets: Vec<(&Packed, OutPtr)> = mats
            .iter()
            .zip(packed)
            .zip(outs.iter_mut())
            .map(|((m, p), y)| {
                assert_eq!(y.len(), rows * m.out_dim, "output shape");
                let out = OutPtr {
                    ptr: y.as_mut_ptr(),
                    stride: m.out_dim,
                };
                (p, out)
            })
            .collect();
        // SAFETY: every output was checked to be `rows × out_dim` and is borrowed mutably.
        unsafe { int_products(&targets, x, first.in_dim, kernel) };
    }

    /// Dequantized tiles of `W` and the f32 GEMM.
    fn forward_dequant(&self, x: &[f32], y: &mut [f32]) {
        let rows = x.len() / self.in_dim;
        // Tiles of about 4 MiB of f32 weights: big enough for the GEMM, small enough to stay
        // in cache between dequantizing and multiplying.
        let tile = ((4 << 20) / (4 * self.in_dim)).clamp(64, self.out_dim.max(64)) / 32 * 32;
        let mut buf = TILE.with(Cell::take);
        let mut start = 0;
        while start < self.out_dim {
            let end = (start + tile).min(self.out_dim);
            buf.resize((end - start) * self.in_dim, 0.0);
            self.dequantize_rows(start..end, &mut buf);
            dense::gemm_into(
                x,
                rows,
                self.in_dim,
                &buf,
                end - start,
                &mut y[start..],
                self.out_dim,
            );
            start = end;
        }
        TILE.with(|c| c.set(buf));
    }
}

/// `out_k[r, i] = W_k[i] · x̂[r]` for every target `(W_k, out_k)`: `x` quantized once, the
/// rows of every matrix cut into chunks that start on [`GROUP`] boundaries, all chunks run in
/// one parallel call (or here, when the work is too small to be worth a fork).
///
/// # Safety
/// Each `out_k` must be valid for `rows × W_k.rows` writes with its stride, and not accessed
/// by anyone else during the call.
unsafe fn int_products(targets: &[(&Packed, OutPtr)], x: &[f32], in_dim: usize, kernel: Kernel) {
    assert!(kernel.available(), "{kernel:?} does not run on this CPU");
    let mut act = ACT.with(Cell::take);
    match kernel {
        Kernel::Scalar => act.quantize_scalar(x, in_dim),
        Kernel::Avx2 => act.quantize(x, in_dim),
    }
    let run = |k: usize, rows: Range<usize>| {
        let (w, out) = targets[k];
        // SAFETY: each chunk writes columns `rows` of its own output, disjoint from every
        // other chunk's (the caller vouches for the buffers).
        unsafe {
            match kernel {
                Kernel::Scalar => quant::gemv_scalar(w, rows, &act, out),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 => quant::gemv_avx2(w, rows, &act, out),
                #[cfg(not(target_arch = "x86_64"))]
                Kernel::Avx2 => unreachable!("checked by available()"),
            }
        }
    };
    let total: usize = targets.iter().map(|(w, _)| w.rows).sum();
    let threads = rayon::current_num_threads();
    if threads <= 1 || act.rows * total * in_dim < 1 << 15 || total < 2 * GROUP {
        for (k, (w, _)) in targets.iter().enumerate() {
            run(k, 0..w.rows);
        }
    } else {
        // A few chunks per thread balance uneven progress without much scheduling cost.
        let per = total
            .div_ceil(threads * 4)
            .next_multiple_of(GROUP)
            .max(GROUP);
        let chunks: Vec<(usize, Range<usize>)> = targets
            .iter()
            .enumerate()
            .flat_map(|(k, (w, _))| {
                (0..w.rows)
                    .step_by(per)
                    .map(move |s| (k, s..(s + per).min(w.rows)))
            })
            .collect();
        chunks.par_iter().for_each(|(k, r)| run(*k, r.clone()));
    }
    ACT.with(|c| c.set(act));
}

/// 16-bit float bit patterns of `ty` (F16 or BF16) widened to f32 (exactly: every f16 and bf16
/// value is an f32), with `half`'s vector conversion.
fn widen(ty: GgmlType, src: &[u16], out: &mut [f32]) {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    let out = &mut out[..src.len()];
    match ty {
        GgmlType::BF16 => src
            .reinterpret_cast::<half::bf16>()
            .convert_to_f32_slice(out),
        _ => src
            .reinterpret_cast::<half::f16>()
            .convert_to_f32_slice(out),
    }
}
