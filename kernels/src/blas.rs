//! Matrix products of the model through cuBLAS: `y = x · Wᵀ` with x and W in f16, f32
//! accumulation and an f32 result (`cublasGemmEx`).

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{sys, CudaBlas};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use crate::device::GpuContext;
use crate::KernelError;

/// A weight matrix `[out, in]` (row-major, as `engine_core::ops::linear::Linear`) in f16.
#[derive(Debug)]
pub struct GpuMatrix {
    pub data: CudaSlice<u16>,
    pub out_dim: usize,
    pub in_dim: usize,
}

impl GpuMatrix {
    /// Uploads an f32 `[out, in]` matrix given as `parts` stacked row-wise (e.g. Q, K and V
    /// as one matrix), rounded to f16 ([`crate::weights::f16_bits_stacked`]: a weight beyond
    /// f16's range is an error, not an infinity).
    pub fn upload(
        gpu: &GpuContext,
        parts: &[&[f32]],
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Self, KernelError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len != out_dim * in_dim {
            return Err(KernelError::InvalidArgument(format!(
                "matrix of {len} values is not {out_dim}×{in_dim}"
            )));
        }
        let bits = crate::weights::f16_bits_stacked(parts)?;
        let data = gpu
            .stream()
            .clone_htod(&bits)
            .map_err(|e| KernelError::driver("uploading weights", e))?;
        Ok(Self {
            data,
            out_dim,
            in_dim,
        })
    }
}

/// A cuBLAS handle on the context's stream.
#[derive(Debug)]
pub struct Blas {
    blas: CudaBlas,
    gpu: Arc<GpuContext>,
}

/// True when cuBLAS can be loaded (no call is made into it).
pub fn cublas_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { sys::is_culib_present() }
}

impl Blas {
    pub fn new(gpu: &Arc<GpuContext>) -> Result<Self, KernelError> {
        if !cublas_available() {
            return Err(KernelError::LibraryMissing("libcublas"));
        }
        let blas = CudaBlas::new(gpu.stream().clone())
            .map_err(|e| KernelError::driver("creating the cuBLAS handle", e))?;
        Ok(Self {
            blas,
            gpu: gpu.clone(),
        })
    }

    /// `y[rows, out] = x[rows, in] · wᵀ`, x f16, y f32.
    pub fn linear(
        &self,
        x: &CudaSlice<u16>,
        w: &GpuMatrix,
        y: &mut CudaSlice<f32>,
        rows: usize,
    ) -> Result<(), KernelError> {
        let (m, k) = (w.out_dim, w.in_dim);
        if x.len() < rows * k || y.len() < rows * m {
            return Err(KernelError::InvalidArgument(format!(
                "GEMM of {rows} rows × {k} → {m}: x has {}, y {}",
                x.len(),
                y.len()
            )));
        }
        if rows == 0 {
            return Ok(());
        }
        let as_int = |v: usize| {
            i32::try_from(v)
                .map_err(|_| KernelError::InvalidArgument(format!("GEMM dimension {v}")))
        };
        let (mi, ni, ki) = (as_int(m)?, as_int(rows)?, as_int(k)?);
        let stream = self.gpu.stream();
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (a, _ga) = w.data.device_ptr(stream);
        let (b, _gb) = x.device_ptr(stream);
        let (c, _gc) = y.device_ptr_mut(stream);
        // Column-major view: C[m, n] = Aᵀ · B with A = W as [k, m] and B = x as [k, n]; C is
        // y as [m, n], i.e. row-major [rows, out].
        // SAFETY: the pointers are live device buffers of at least the sizes checked above,
        // all on the handle's stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                mi,
                ni,
                ki,
                (&alpha) as *const f32 as *const c_void,
                a as *const c_void,
                sys::cudaDataType_t::CUDA_R_16F,
                ki,
                b as *const c_void,
                sys::cudaDataType_t::CUDA_R_16F,
                ki,
                (&beta) as *const f32 as *const c_void,
                c as *mut c_void,
                sys::cudaDataType_t::CUDA_R_32F,
                mi,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| KernelError::driver("cublasGemmEx", e))
    }
}
