//! quant_policy 4 with TurboMind semantics: 4-bit codes packed eight to a little-endian 32-bit
//! word in TurboMind's interleaved nibble order, plus `[scale, min]` in the model dtype per
//! (token, KV head).

use engine_core::codec::{EntryRun, SideBytes, SideCodec};
use engine_core::dtype::KvDtype;
use engine_core::ops::dequant::{affine_rows, Affine, Packing};

use super::quant::{DotAccumulator, Params, TmQuantizer};

/// Elements per packed 32-bit word.
pub const GROUP: usize = 8;

/// Nibble slot (0 = least significant) of element `j` of a group. TurboMind's
/// `ConvertKvCache<T, uint4_t>` packs with the byte permute `0x5140`, which puts the even
/// elements in the low half-word and the odd ones in the high half-word:
/// `e0, e2, e4, e6, e1, e3, e5, e7`, LSB first.
#[inline]
const fn nibble_slot(j: usize) -> usize {
    4 * (j & 1) + (j >> 1)
}

/// [`nibble_slot`] of each element of a group, for the vector decoder.
const SLOTS: [u32; GROUP] = {
    let mut s = [0u32; GROUP];
    let mut j = 0;
    while j < GROUP {
        s[j] = nibble_slot(j) as u32;
        j += 1;
    }
    s
};

/// Packs eight 4-bit codes into TurboMind's word: `byte0 = e0 | e2<<4`, `byte1 = e4 | e6<<4`,
/// `byte2 = e1 | e3<<4`, `byte3 = e5 | e7<<4`. Codes above 15 are masked.
#[inline]
pub fn pack_group(codes: [u8; GROUP]) -> [u8; 4] {
    let mut word = 0u32;
    for (j, &c) in codes.iter().enumerate() {
        word |= u32::from(c & 0xF) << (4 * nibble_slot(j));
    }
    word.to_le_bytes()
}

/// Inverse of [`pack_group`].
#[inline]
pub fn unpack_group(bytes: [u8; 4]) -> [u8; GROUP] {
    let word = u32::from_le_bytes(bytes);
    std::array::from_fn(|j| ((word >> (4 * nibble_slot(j))) & 0xF) as u8)
}

/// One side (K or V) of TurboMind's int4 cache. The head dim must be a multiple of 8, the
/// packing group.
///
/// Non-finite input is [`sanitize`](engine_core::dtype::sanitize)d before quantization: NaN is
/// stored as 0 and ±inf as ±T::MAX (at most ±2^126, see `TmQuantizer::to_model_dtype`), so
/// decode is always finite.
#[derive(Clone, Debug)]
pub struct TmInt4Side {
    dim: usize,
    quantizer: TmQuantizer,
}

impl TmInt4Side {
    /// # Panics
    /// If `dim` is not a positive multiple of 8; the backend rejects such models at validation.
    pub fn new(dim: usize, dtype: KvDtype) -> Self {
        assert!(
            dim > 0 && dim % GROUP == 0,
            "TurboMind int4 packs {GROUP} elements per word; head dim {dim} is not a multiple of {GROUP}"
        );
        Self {
            dim,
            quantizer: TmQuantizer { bits: 4, dtype },
        }
    }

    fn params(&self, meta: &[u8]) -> Params {
        Params::load(self.quantizer.dtype, meta)
    }

    /// The codes of each group, in element order.
    fn groups<'a>(&self, data: &'a [u8]) -> impl Iterator<Item = [u8; GROUP]> + 'a {
        data[..self.dim / 2]
            .chunks_exact(4)
            .map(|w| unpack_group(w.try_into().expect("word of 4 bytes")))
    }
}

impl SideCodec for TmInt4Side {
    fn dim(&self) -> usize {
        self.dim
    }

    fn bytes(&self) -> SideBytes {
        SideBytes {
            data: self.dim / 2,
            meta: Params::bytes(self.quantizer.dtype),
        }
    }

    fn encode(&self, x: &[f32], data: &mut [u8], meta: &mut [u8]) {
        let mut codes = vec![0u8; self.dim];
        let params = self.quantizer.quantize(&x[..self.dim], &mut codes);
        for (word, group) in data[..self.dim / 2]
            .chunks_exact_mut(4)
            .zip(codes.chunks_exact(GROUP))
        {
            word.copy_from_slice(&pack_group(group.try_into().expect("group of 8")));
        }
        params.store(self.quantizer.dtype, meta);
    }

    fn decode(&self, data: &[u8], meta: &[u8], out: &mut [f32]) {
        let (data, meta) = (&data[..self.dim / 2], EntryRun::single(meta));
        self.decode_run(EntryRun::single(data), meta, out)
    }

    fn decode_run(&self, data: EntryRun<'_>, meta: EntryRun<'_>, out: &mut [f32]) {
        let dtype = self.quantizer.dtype;
        // `Params::decode` (c · scale + zero, two roundings) per element, vectorized.
        affine_rows(
            data,
            Packing::WordNibbles(SLOTS),
            Affine::MulAdd,
            |i| Params::load(dtype, meta.entry(i)).mul_add(),
            out,
        );
    }

    fn dot(&self, q: &[f32], data: &[u8], meta: &[u8]) -> f32 {
        let mut acc = DotAccumulator::default();
        for (qg, codes) in q[..self.dim].chunks_exact(GROUP).zip(self.groups(data)) {
            acc.add_group(qg, codes);
        }
        self.params(meta).dot(acc.finish())
    }

    fn axpy(&self, p: f32, data: &[u8], meta: &[u8], out: &mut [f32]) {
        let (a, b) = self.params(meta).axpy_coefficients(p);
        for (o, codes) in out[..self.dim]
            .chunks_exact_mut(GROUP)
            .zip(self.groups(data))
        {
            for (o, &c) in o.iter_mut().zip(&codes) {
                *o += a * f32::from(c) + b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(side: &TmInt4Side, x: &[f32]) -> (Vec<u8>, Vec<u8>) {
        let b = side.bytes();
        let (mut data, mut meta) = (vec![0u8; b.data], vec![0u8; b.meta]);
        side.encode(x, &mut data, &mut meta);
        (data, meta)
    }

    /// Reference §3.7: TurboMind INT4 of the worked example, in f16.
    #[test]
    fn worked_example_known_answer() {
        let x = [0.50f32, -1.25, 0.75, 2.00, -0.10, 0.30, -2.50, 1.10];
        let side = TmInt4Side::new(8, KvDtype::F16);
        let (data, meta) = encode(&side, &x);
        assert_eq!(
            unpack_group(data[..4].try_into().unwrap()),
            [10, 4, 11, 15, 8, 9, 0, 12]
        );
        assert_eq!(data, [0xba, 0x08, 0xf4, 0xc9]);
        let p = Params::load(KvDtype::F16, &meta);
        assert_eq!(p.scale, KvDtype::F16.round(0.3));
        assert_eq!(p.zero, KvDtype::F16.round(-2.5));
        assert_eq!(meta.len(), 4);
    }

    #[test]
    fn packing_follows_the_documented_nibble_order() {
        let codes = [0x0, 0x1, 0x2, 0x3, 0x4, 0x5, 0x6, 0x7];
        // byte0 = e0|e2<<4, byte1 = e4|e6<<4, byte2 = e1|e3<<4, byte3 = e5|e7<<4
        assert_eq!(pack_group(codes), [0x20, 0x64, 0x31, 0x75]);
    }

    #[test]
    fn ties_round_to_even() {
        // min 0, max 15: scale = 15·f32(1/15) = 1 exactly in f16, so x.5 is a tie.
        let x = [0.0f32, 15.0, 0.5, 1.5, 2.5, 3.5, 13.5, 14.5];
        let side = TmInt4Side::new(8, KvDtype::F16);
        let (data, meta) = encode(&side, &x);
        assert_eq!(Params::load(KvDtype::F16, &meta).scale, 1.0);
        assert_eq!(
            unpack_group(data[..4].try_into().unwrap()),
            [0, 15, 0, 2, 2, 4, 14, 14]
        );
    }

    #[test]
    #[should_panic(expected = "not a multiple of 8")]
    fn head_dim_must_be_a_multiple_of_eight() {
        TmInt4Side::new(12, KvDtype::F16);
    }
}
