//! The [`KvCodec`] trait: how one token of one KV head is stored in the paged cache, and how
//! attention reads it back without materialising a dequantized cache.

mod float;
mod registry;
mod run;
mod side;

pub use float::{float_codec, FloatSide};
pub use registry::{registered_codec_names, CodecBuildParams, CodecRegistration};
pub use run::{decode_entries, EntryRun};
pub use side::{KvPair, Rotated, SideCodec};

use crate::dtype::KvDtype;

/// Bytes one token of one KV head takes on one side (K or V) of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SideBytes {
    /// Packed codes (or raw values for an unquantized cache).
    pub data: usize,
    /// Per-token metadata: scales, zero points, norms.
    pub meta: usize,
}

impl SideBytes {
    pub fn total(self) -> usize {
        self.data + self.meta
    }
}

/// The coordinate system a side of the cache is stored in.
///
/// A codec that rotates its inputs (TurboQuant) stores K and V in the rotated domain; attention
/// then rotates the query once before scoring and rotates the output back once at the end, which
/// is exact because the rotation is orthonormal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Domain {
    /// Values are stored as the model produced them.
    Identity,
    /// Values are multiplied by the normalised Sylvester Walsh–Hadamard matrix `H/√d` first.
    Hadamard,
}

impl Domain {
    /// Maps a model-domain vector into this domain, in place.
    pub fn forward(self, x: &mut [f32]) {
        if self == Domain::Hadamard {
            crate::ops::hadamard::wht_normalized(x);
        }
    }

    /// Maps a vector of this domain back to the model domain, in place (`H/√d` is its own
    /// inverse).
    pub fn inverse(self, x: &mut [f32]) {
        self.forward(x)
    }
}

/// A KV-cache codec: encodes one (token, KV head) vector into packed bytes plus metadata and
/// reads it back, for K and for V.
///
/// Conventions every implementation follows:
/// - `encode_*` takes the vector in the model domain (post-RoPE for K) and applies the side's
///   [`Domain`] itself;
/// - `decode_*`, `score_k` and `accumulate_v` work in the side's domain: `score_k` expects a
///   query already mapped by [`KvCodec::k_domain`], and `accumulate_v` adds into an output in
///   [`KvCodec::v_domain`] that the caller maps back once;
/// - `data` and `meta` are exactly [`SideBytes::data`] and [`SideBytes::meta`] long;
/// - non-finite input never panics; each codec documents what it stores for it.
pub trait KvCodec: Send + Sync + std::fmt::Debug {
    /// The name a config selects it by (`quant_policy = "<name>"`).
    fn name(&self) -> &str;
    /// LMDeploy's `quant_policy` number for built-in codecs.
    fn policy(&self) -> Option<u32> {
        None
    }
    fn head_dim_k(&self) -> usize;
    fn head_dim_v(&self) -> usize;
    fn k_bytes(&self) -> SideBytes;
    fn v_bytes(&self) -> SideBytes;
    fn k_domain(&self) -> Domain {
        Domain::Identity
    }
    fn v_domain(&self) -> Domain {
        Domain::Identity
    }

    fn encode_k(&self, x: &[f32], data: &mut [u8], meta: &mut [u8]);
    fn encode_v(&self, x: &[f32], data: &mut [u8], meta: &mut [u8]);
    fn decode_k(&self, data: &[u8], meta: &[u8], out: &mut [f32]);
    fn decode_v(&self, data: &[u8], meta: &[u8], out: &mut [f32]);

    /// [`decode_k`](Self::decode_k) of every entry of a run (adjacent tokens of one cache
    /// block) into consecutive rows of `out`; attention's hot path. Override with a fused loop.
    fn decode_k_run(&self, data: EntryRun<'_>, meta: EntryRun<'_>, out: &mut [f32]) {
        decode_entries(self.head_dim_k(), data, meta, out, |d, m, o| {
            self.decode_k(d, m, o)
        })
    }

    /// [`decode_v`](Self::decode_v) of every entry of a run; see [`Self::decode_k_run`].
    fn decode_v_run(&self, data: EntryRun<'_>, meta: EntryRun<'_>, out: &mut [f32]) {
        decode_entries(self.head_dim_v(), data, meta, out, |d, m, o| {
            self.decode_v(d, m, o)
        })
    }

    /// `⟨q, K̂⟩` for a query in the K domain, read straight from the packed bytes.
    ///
    /// The default decodes into a temporary; built-in codecs override it with a fused form.
    fn score_k(&self, q: &[f32], data: &[u8], meta: &[u8]) -> f32 {
        let mut k = vec![0.0; self.head_dim_k()];
        self.decode_k(data, meta, &mut k);
        dot(q, &k)
    }

    /// `out += p · V̂` in the V domain, read straight from the packed bytes.
    fn accumulate_v(&self, p: f32, data: &[u8], meta: &[u8], out: &mut [f32]) {
        let mut v = vec![0.0; self.head_dim_v()];
        self.decode_v(data, meta, &mut v);
        for (o, x) in out.iter_mut().zip(&v) {
            *o += p * x;
        }
    }

    /// Name of the GPU kernel family that implements this codec, if any. A codec without one
    /// runs on the CPU only, and backends refuse `device = "cuda"` for it at validation time.
    ///
    /// A built-in family (`pt_int8`, `turbo_quant`, …) or `k:<side>+v:<side>` (the `kernels`
    /// crate's `GpuCodec` parses both).
    fn gpu_kernel(&self) -> Option<String> {
        None
    }

    /// Bits per cached element, metadata included, averaged over K and V.
    fn bits_per_element(&self) -> f64 {
        let bits = 8 * (self.k_bytes().total() + self.v_bytes().total());
        bits as f64 / (self.head_dim_k() + self.head_dim_v()) as f64
    }
}

/// Decodes K and maps it back to the model domain (for tests and diagnostics).
pub fn decode_k_model_domain(codec: &dyn KvCodec, data: &[u8], meta: &[u8], out: &mut [f32]) {
    codec.decode_k(data, meta, out);
    codec.k_domain().inverse(out);
}

/// Decodes V and maps it back to the model domain (for tests and diagnostics).
pub fn decode_v_model_domain(codec: &dyn KvCodec, data: &[u8], meta: &[u8], out: &mut [f32]) {
    codec.decode_v(data, meta, out);
    codec.v_domain().inverse(out);
}

/// Plain dot product in f32.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Stores the f16/bf16/f32 metadata of one token, `values` in order.
pub fn store_meta(dtype: KvDtype, values: &[f32], meta: &mut [u8]) {
    for (i, &v) in values.iter().enumerate() {
        dtype.store_at(v, meta, i);
    }
}
