//! Kernel timing with CUDA events: warm-up runs first, then each timed run between two events
//! on the stream; the caller takes the median.

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;

use crate::device::GpuContext;
use crate::KernelError;

/// Runs `f(i)` `warmup` times untimed, then `iters` times each between two events; returns the
/// milliseconds of each timed run.
pub fn time_runs(
    gpu: &Arc<GpuContext>,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut(usize) -> Result<(), KernelError>,
) -> Result<Vec<f32>, KernelError> {
    for i in 0..warmup {
        f(i)?;
    }
    gpu.synchronize()?;
    let ev = || {
        gpu.context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| KernelError::driver("creating event", e))
    };
    let mut pairs = Vec::with_capacity(iters);
    for i in 0..iters {
        let (start, end) = (ev()?, ev()?);
        start
            .record(gpu.stream())
            .map_err(|e| KernelError::driver("recording event", e))?;
        f(warmup + i)?;
        end.record(gpu.stream())
            .map_err(|e| KernelError::driver("recording event", e))?;
        pairs.push((start, end));
    }
    gpu.synchronize()?;
    pairs
        .iter()
        .map(|(s, e)| {
            s.elapsed_ms(e)
                .map_err(|e| KernelError::driver("event elapsed time", e))
        })
        .collect()
}

/// Median of a sample (NaN-free).
pub fn median(xs: &[f32]) -> f32 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f32::NAN;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}
