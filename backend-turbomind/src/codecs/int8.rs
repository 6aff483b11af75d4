//! quant_policy 8 with TurboMind semantics: one byte per element in natural order, plus
//! `[scale, min]` in the model dtype per (token, KV head).

use engine_core::codec::{EntryRun, SideBytes, SideCodec};
use engine_core::dtype::KvDtype;
use engine_core::ops::dequant::{affine_rows, Affine, Packing};

use super::quant::{DotAccumulator, Params, TmQuantizer};

/// One side (K or V) of TurboMind's int8 cache. Any head dim can be encoded.
///
/// Non-finite input is [`sanitize`](engine_core::dtype::sanitize)d before quantization: NaN is
/// stored as 0 and ±inf as ±T::MAX (at most ±2^126, see `TmQuantizer::to_model_dtype`), so
/// decode is always finite.
#[derive(Clone, Debug)]
pub struct TmInt8Side {
    dim: usize,
    quantizer: TmQuantizer,
}

impl TmInt8Side {
    pub fn new(dim: usize, dtype: KvDtype) -> Self {
        Self {
            dim,
            quantizer: TmQuantizer { bits: 8, dtype },
        }
    }

    fn params(&self, meta: &[u8]) -> Params {
        Params::load(self.quantizer.dtype, meta)
    }
}

impl SideCodec for TmInt8Side {
    fn dim(&self) -> usize {
        self.dim
    }

    fn bytes(&self) -> SideBytes {
        SideBytes {
            data: self.dim,
            meta: Params::bytes(self.quantizer.dtype),
        }
    }

    fn encode(&self, x: &[f32], data: &mut [u8], meta: &mut [u8]) {
        let params = self
            .quantizer
            .quantize(&x[..self.dim], &mut data[..self.dim]);
        params.store(self.quantizer.dtype, meta);
    }

    fn decode(&self, data: &[u8], meta: &[u8], out: &mut [f32]) {
        let (data, meta) = (&data[..self.dim], EntryRun::single(meta));
        self.decode_run(EntryRun::single(data), meta, out)
    }

    fn decode_run(&self, data: EntryRun<'_>, meta: EntryRun<'_>, out: &mut [f32]) {
        let dtype = self.quantizer.dtype;
        // `Params::decode` (c · scale + zero, two roundings) per element, vectorized.
        affine_rows(
            data,
            Packing::Bytes,
            Affine::MulAdd,
            |i| Params::load(dtype, meta.entry(i)).mul_add(),
            out,
        );
    }

    fn dot(&self, q: &[f32], data: &[u8], meta: &[u8]) -> f32 {
        let (q, data) = (&q[..self.dim], &data[..self.dim]);
        let mut acc = DotAccumulator::default();
        let (q8, data8) = (q.chunks_exact(8), data.chunks_exact(8));
        let (q_rest, data_rest) = (q8.remainder(), data8.remainder());
        for (qg, cg) in q8.zip(data8) {
            acc.add_group(qg, cg.try_into().expect("chunk of 8"));
        }
        let mut sums = acc.finish();
        for (&qi, &c) in q_rest.iter().zip(data_rest) {
            sums.qc += qi * f32::from(c);
            sums.q += qi;
        }
        self.params(meta).dot(sums)
    }

    fn axpy(&self, p: f32, data: &[u8], meta: &[u8], out: &mut [f32]) {
        let (a, b) = self.params(meta).axpy_coefficients(p);
        for (o, &c) in out[..self.dim].iter_mut().zip(data) {
            *o += a * f32::from(c) + b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(side: &TmInt8Side, x: &[f32]) -> (Vec<u8>, Vec<u8>) {
        let b = side.bytes();
        let (mut data, mut meta) = (vec![0u8; b.data], vec![0u8; b.meta]);
        side.encode(x, &mut data, &mut meta);
        (data, meta)
    }

    #[test]
    fn worked_example_codes_and_params() {
        // Reference §3.7's vector; with 255 levels in f16 the codes follow from
        // (x − min)·T(1/T(4.5/255)) rounded in f16, then to even.
        let x = [0.50f32, -1.25, 0.75, 2.00, -0.10, 0.30, -2.50, 1.10];
        let side = TmInt8Side::new(8, KvDtype::F16);
        let (data, meta) = encode(&side, &x);
        let p = Params::load(KvDtype::F16, &meta);
        assert_eq!(p.scale, KvDtype::F16.round(4.5 / 255.0));
        assert_eq!(p.zero, -2.5);
        assert_eq!(data[6], 0);
        assert_eq!(data[3], 255);
        // Every code is the nearest level to within T's precision.
        for (&c, &v) in data.iter().zip(&x) {
            let ideal = (v + 2.5) / p.scale;
            assert!(
                (f32::from(c) - ideal).abs() <= 0.5 + 255.0 * 4.0 / 2048.0,
                "{c} vs {ideal}"
            );
        }
    }

    #[test]
    fn ties_round_to_even() {
        // min 0, max 255: scale = 255·f32(1/255) = 1 exactly, so every x is its own code and
        // x.5 is a tie; TurboMind's cvt.rni rounds it to the even neighbour.
        let x = [0.0f32, 255.0, 0.5, 1.5, 2.5, 253.5, 254.5, 100.0];
        let side = TmInt8Side::new(8, KvDtype::F16);
        let (data, meta) = encode(&side, &x);
        assert_eq!(Params::load(KvDtype::F16, &meta).scale, 1.0);
        assert_eq!(data, [0, 255, 0, 2, 2, 254, 254, 100]);
    }

    #[test]
    fn any_head_dim_round_trips() {
        let x: Vec<f32> = (0..13).map(|i| (i as f32 * 0.7).sin()).collect();
        let side = TmInt8Side::new(13, KvDtype::Bf16);
        let (data, meta) = encode(&side, &x);
        let mut out = vec![f32::NAN; 13];
        side.decode(&data, &meta, &mut out);
        let scale = Params::load(KvDtype::Bf16, &meta).scale;
        for (a, b) in out.iter().zip(&x) {
            // bf16 arithmetic: half a step plus ~4 codes of T rounding (see tests in codecs).
            assert!((a - b).abs() <= 5.0 * scale, "{a} vs {b}");
        }
    }
}
