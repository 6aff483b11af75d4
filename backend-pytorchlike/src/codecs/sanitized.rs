//! Sanitizes a side's input before anything else sees it. Needed in front of a rotation: one
//! NaN rotated by a Hadamard matrix spreads to every coordinate, so the inner codec could only
//! zero the whole vector; sanitizing first keeps the other elements.

use engine_core::codec::{Domain, SideBytes, SideCodec};
use engine_core::dtype::sanitize;
use engine_core::KvDtype;

/// `inner` fed with NaN → 0 and ±inf → ± the dtype's largest value.
#[derive(Debug, Clone)]
pub struct SanitizedInput<S> {
    pub inner: S,
    pub dtype: KvDtype,
}

impl<S: SideCodec> SideCodec for SanitizedInput<S> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn bytes(&self) -> SideBytes {
        self.inner.bytes()
    }
    fn domain(&self) -> Domain {
        self.inner.domain()
    }
    fn encode(&self, x: &[f32], data: &mut [u8], meta: &mut [u8]) {
        if x.iter().all(|v| v.is_finite()) {
            self.inner.encode(x, data, meta)
        } else {
            let clean: Vec<f32> = x.iter().map(|&v| sanitize(v, self.dtype)).collect();
            self.inner.encode(&clean, data, meta)
        }
    }
    fn decode(&self, data: &[u8], meta: &[u8], out: &mut [f32]) {
        self.inner.decode(data, meta, out)
    }
    fn dot(&self, q: &[f32], data: &[u8], meta: &[u8]) -> f32 {
        self.inner.dot(q, data, meta)
    }
    fn axpy(&self, p: f32, data: &[u8], meta: &[u8], out: &mut [f32]) {
        self.inner.axpy(p, data, meta, out)
    }
}
