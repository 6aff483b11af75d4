//! CUDA kernels for kvq: CUDA C sources (`src/cuda/*.cu`) compiled at run time by NVRTC (no
//! nvcc at build time), cached per process and on disk by source hash and architecture, and
//! their typed launchers.
//!
//! - [`spec`]: which codec, dtype and shape a kernel is specialised for, and the flattened cache
//!   layout the kernels address bytes with (pure data, always built);
//! - [`tp`]: tensor parallelism, the per-rank weight split (always built) and, with `cuda`,
//!   the NCCL all-reduce over the ranks' devices;
//! - [`weights`]: weights rounded to f16 on the host, in parallel, for the upload (always
//!   built);
//! - with the `cuda` feature: [`device::GpuContext`] (context, stream, module cache),
//!   [`cache::GpuCache`] (the paged cache in device memory, same bytes as
//!   `engine_core::cache::PagedKvCache`, with the quantize-and-store launcher),
//!   [`decode::decode_attention`] (split-K paged decode attention), [`blas`] (cuBLAS GEMMs),
//!   [`runner::GpuLlama`] (the Llama forward pass on the GPU, registered with the engine as
//!   the `device = "cuda"` runner), [`window`] (the recent window's device rings) and
//!   [`timing`].
//!
//! The `cuda` feature builds on machines without CUDA: the libraries are loaded at run time,
//! and their absence is a [`KernelError`], never a panic.

mod error;
pub mod nvrtc;
pub mod spec;
/// Tensor parallelism over the GPUs of one host: the Megatron split of each layer's weights
/// (host side, always built, so it is tested without a GPU) and, with `cuda`, the NCCL
/// communicators whose all-reduce joins the ranks' partial sums.
pub mod tp;
pub mod weights;

#[cfg(feature = "cuda")]
pub mod blas;
#[cfg(feature = "cuda")]
pub mod cache;
#[cfg(feature = "cuda")]
pub mod decode;
#[cfg(feature = "cuda")]
pub mod device;
#[cfg(feature = "cuda")]
pub mod runner;
#[cfg(feature = "cuda")]
pub mod timing;
#[cfg(feature = "cuda")]
pub mod window;

/// The CUDA bindings the launchers take buffers of.
#[cfg(feature = "cuda")]
pub use cudarc;
pub use error::KernelError;
pub use spec::{GpuCodec, KernelKind, Specialization};

/// GPU architectures the kernels are compiled and checked for (NVRTC 13 dropped Volta).
pub const SUPPORTED_ARCHS: [&str; 4] = ["compute_75", "compute_80", "compute_89", "compute_90"];
