//! CPU numeric kernels shared by codecs and the model.

pub mod dequant;
pub mod hadamard;
pub mod linear;
pub mod norm;
pub mod rope;
pub mod simd;

/// Threads the CPU kernels use: rayon's global pool, sized by `RAYON_NUM_THREADS` or else one
/// per core (or by [`init_threads`]).
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}

/// Sizes the global pool to `n` threads; only possible before the first parallel call.
pub fn init_threads(n: usize) -> Result<(), crate::KvqError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| crate::KvqError::InvalidArgument(format!("thread pool: {e}")))
}

/// `gate ← silu(gate) · up`, SwiGLU's element-wise part.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// In-place `a += b`.
pub fn add_assign(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
}

/// Log-softmax of one row, in f64 for accuracy (used by evaluation).
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&l| (l as f64 - m).exp()).sum();
    let lz = z.ln() + m;
    logits.iter().map(|&l| l as f64 - lz).collect()
}
