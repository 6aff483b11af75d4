//! One GPU: its context and stream, and the kernels compiled for it (NVRTC, cached per
//! process and on disk by source hash and architecture).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};

use crate::nvrtc::ptx_for;
use crate::spec::{KernelKind, Specialization};
use crate::KernelError;

/// A CUDA device with one stream; every launch of this crate runs on that stream.
#[derive(Debug)]
pub struct GpuContext {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: &'static str,
    sm_count: usize,
    modules: Mutex<HashMap<(KernelKind, Specialization), Arc<CudaModule>>>,
}

/// True when the CUDA driver library can be loaded (no call is made into it).
pub fn driver_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

fn arch_of(major: i32, minor: i32) -> Result<&'static str, KernelError> {
    Ok(match (major, minor) {
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (m, _) if m >= 10 => "compute_90",
        _ => {
            return Err(KernelError::Unsupported(format!(
                "compute capability {major}.{minor}: kvq's kernels need 7.5 or newer"
            )))
        }
    })
}

impl GpuContext {
    /// Opens device `ordinal`. Every missing piece (driver, NVRTC, device) is a typed error.
    pub fn new(ordinal: usize) -> Result<Arc<Self>, KernelError> {
        if !driver_available() {
            return Err(KernelError::LibraryMissing("libcuda"));
        }
        if !crate::nvrtc::nvrtc_available() {
            return Err(KernelError::LibraryMissing("libnvrtc"));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| KernelError::NoDevice {
            ordinal,
            reason: format!("{e:?}"),
        })?;
        // One stream: the per-buffer event tracking for multi-stream use is only overhead.
        // SAFETY: no other stream of this context touches our buffers.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| KernelError::driver("compute capability", e))?;
        let sm_count =
            ctx.attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| KernelError::driver("multiprocessor count", e))? as usize;
        let stream = ctx.default_stream();
        Ok(Arc::new(Self {
            arch: arch_of(major, minor)?,
            ctx,
            stream,
            sm_count,
            modules: Mutex::new(HashMap::new()),
        }))
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// The NVRTC architecture the kernels are compiled for (`compute_90` on an H100/H200).
    pub fn arch(&self) -> &'static str {
        self.arch
    }
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }
    /// Device name, for reports.
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown GPU".into())
    }

    /// The function `name` of kernel `kind` specialised for `spec`, compiled on first use.
    pub fn function(
        &self,
        kind: KernelKind,
        spec: &Specialization,
        name: &str,
    ) -> Result<CudaFunction, KernelError> {
        let module = {
            let mut modules = self.modules.lock().expect("module cache lock");
            match modules.get(&(kind, *spec)) {
                Some(m) => m.clone(),
                None => {
                    let ptx = ptx_for(&spec.source(kind), self.arch)?;
                    let m = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                        .map_err(|e| {
                            KernelError::driver(format!("loading module {}", kind.name()), e)
                        })?;
                    modules.insert((kind, *spec), m.clone());
                    m
                }
            }
        };
        module
            .load_function(name)
            .map_err(|e| KernelError::driver(format!("loading function {name}"), e))
    }

    /// Waits for the stream and reports any asynchronous error of earlier launches.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.stream
            .synchronize()
            .map_err(|e| KernelError::driver("stream synchronize", e))
    }
}
