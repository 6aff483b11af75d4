//! One side (K or V) of a codec. Most codecs quantize K and V the same way, or pair two
//! different quantizers (TurboQuant: 3-bit + sign for K, 2-bit for V); [`KvPair`] builds a
//! [`KvCodec`] from any two sides, and [`Rotated`] puts any side behind a Hadamard rotation.

use std::sync::Arc;

use super::{decode_entries, dot, Domain, EntryRun, KvCodec, SideBytes};
use crate::dtype::KvDtype;

/// How one vector (one token, one KV head) of K or of V is stored.
///
/// `encode` takes the model-domain vector and applies [`SideCodec::domain`] itself; `decode`,
/// `dot` and `axpy` work in that domain.
pub trait SideCodec: Send + Sync + std::fmt::Debug {
    /// Elements per vector.
    fn dim(&self) -> usize;
    fn bytes(&self) -> SideBytes;
    fn domain(&self) -> Domain {
        Domain::Identity
    }
    fn encode(&self, x: &[f32], data: &mut [u8], meta: &mut [u8]);
    fn decode(&self, data: &[u8], meta: &[u8], out: &mut [f32]);

    /// Decodes every entry of a run (adjacent tokens of one block) into consecutive
    /// [`dim`](Self::dim)-element rows of `out`. Attention calls this once per run; codecs
    /// override it with one fused loop so that short heads do not pay a call and a metadata
    /// load per token. It must give exactly what [`decode`](Self::decode) gives per entry.
    fn decode_run(&self, data: EntryRun<'_>, meta: EntryRun<'_>, out: &mut [f32]) {
        decode_entries(self.dim(), data, meta, out, |d, m, o| self.decode(d, m, o))
    }

    /// `⟨q, x̂⟩` straight from the packed bytes; override with a fused form.
    fn dot(&self, q: &[f32], data: &[u8], meta: &[u8]) -> f32 {
        let mut x = vec![0.0; self.dim()];
        self.decode(data, meta, &mut x);
        dot(q, &x)
    }

    /// `out += p · x̂` straight from the packed bytes; override with a fused form.
    fn axpy(&self, p: f32, data: &[u8], meta: &[u8], out: &mut [f32]) {
        let mut x = vec![0.0; self.dim()];
        self.decode(data, meta, &mut x);
        out.iter_mut().zip(&x).for_each(|(o, v)| *o += p * v);
    }
}

/// A [`KvCodec`] made of a K side and a V side.
#[derive(Debug, Clone)]
pub struct KvPair {
    pub name: String,
    pub policy: Option<u32>,
    pub k: Arc<dyn SideCodec>,
    pub v: Arc<dyn SideCodec>,
    /// GPU kernel family, when one exists.
    pub gpu_kernel: Option<String>,
}

impl KvPair {
    /// The same quantizer for K and V.
    pub fn symmetric(name: &str, policy: Option<u32>, side: Arc<dyn SideCodec>) -> Self {
        Self::new(name, policy, side.clone(), side)
    }

    pub fn new(
        name: &str,
        policy: Option<u32>,
        k: Arc<dyn SideCodec>,
        v: Arc<dyn SideCodec>,
    ) -> Self {
        Self {
            name: name.to_string(),
            policy,
            k,
            v,
            gpu_kernel: None,
        }
    }
}

impl KvCodec for KvPair {
    fn name(&self) -> &str {
        &self.name
    }
    fn policy(&self) -> Option<u32> {
        self.policy
    }
    fn head_dim_k(&self) -> usize {
        self.k.dim()
    }
    fn head_dim_v(&self) -> usize {
        self.v.dim()
    }
    fn k_bytes(&self) -> SideBytes {
        self.k.bytes()
    }
    fn v_bytes(&self) -> SideBytes {
        self.v.bytes()
    }
    fn k_domain(&self) -> Domain {
        self.k.domain()
    }
    fn v_domain(&self) -> Domain {
        self.v.domain()
    }
    fn encode_k(&self, x: &[f32], data: &mut [u8], meta: &mut [u8]) {
        self.k.encode(x, data, meta)
    }
    fn encode_v(&self, x: &[f32], data: &mut [u8], meta: &mut [u8]) {
        self.v.encode(x, data, meta)
    }
    fn decode_k(&self, data: &[u8], meta: &[u8], out: &mut [f32]) {
        self.k.decode(data, meta, out)
    }
    fn decode_v(&self, data: &[u8], meta: &[u8], out: &mut [f32]) {
        self.v.decode(data, meta, out)
    }
    fn decode_k_run(&self, data: EntryRun<'_>, meta: EntryRun<'_>, out: &mut [f32]) {
        self.k.decode_run(data, meta, out)
    }
    fn decode_v_run(&self, data: EntryRun<'_>, meta: EntryRun<'_>, out: &mut [f32]) {
        self.v.decode_run(data, meta, out)
    }
    fn score_k(&self, q: &[f32], data: &[u8], meta: &[u8]) -> f32 {
        self.k.dot(q, data, meta)
    }
    fn accumulate_v(&self, p: f32, data: &[u8], meta: &[u8], out: &mut [f32]) {
        self.v.axpy(p, data, meta, out)
    }
    fn gpu_kernel(&self) -> Option<String> {
        self.gpu_kernel.clone()
    }
}

/// Any side codec behind the normalised Walsh–Hadamard rotation: the input is rotated and
/// rounded to the model dtype (as LMDeploy's rotation returns the input dtype), then encoded.
/// The dimension must be a power of two.
///
/// Non-finite input is sanitized *before* rotating (NaN → 0, ±inf → ± the dtype's largest
/// value): one NaN rotated by a Hadamard matrix would spread to every coordinate.
#[derive(Debug, Clone)]
pub struct Rotated<S> {
    pub inner: S,
    pub dtype: KvDtype,
}

impl<S: SideCodec> SideCodec for Rotated<S> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn bytes(&self) -> SideBytes {
        self.inner.bytes()
    }
    fn domain(&self) -> Domain {
        Domain::Hadamard
    }
    fn encode(&self, x: &[f32], data: &mut [u8], meta: &mut [u8]) {
        let mut y: Vec<f32> = x
            .iter()
            .map(|&v| crate::dtype::sanitize(v, self.dtype))
            .collect();
        crate::ops::hadamard::wht_normalized(&mut y);
        y.iter_mut().for_each(|v| *v = self.dtype.round(*v));
        self.inner.encode(&y, data, meta)
    }
    fn decode(&self, data: &[u8], meta: &[u8], out: &mut [f32]) {
        self.inner.decode(data, meta, out)
    }
    fn decode_run(&self, data: EntryRun<'_>, meta: EntryRun<'_>, out: &mut [f32]) {
        self.inner.decode_run(data, meta, out)
    }
    fn dot(&self, q: &[f32], data: &[u8], meta: &[u8]) -> f32 {
        self.inner.dot(q, data, meta)
    }
    fn axpy(&self, p: f32, data: &[u8], meta: &[u8], out: &mut [f32]) {
        self.inner.axpy(p, data, meta, out)
    }
}
