//! CUDA kernels for kvq: CUDA C sources compiled at run time by NVRTC (no nvcc at build time),
//! cached per process and on disk by source hash and architecture.
//!
//! Everything that calls CUDA is behind the `cuda` feature, which builds on machines without
//! CUDA: the libraries are loaded at run time, and their absence is a [`KernelError`], never a
//! panic.

mod error;
pub mod nvrtc;

pub use error::KernelError;

/// GPU architectures the kernels are compiled and checked for (NVRTC 13 dropped Volta).
pub const SUPPORTED_ARCHS: [&str; 4] = ["compute_75", "compute_80", "compute_89", "compute_90"];
