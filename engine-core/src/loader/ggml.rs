//! ggml tensor types: how many elements a block holds, how many bytes it takes, and dequantization
//! of the block formats kvq reads to f32.
//!
//! The sizes cover the types common in GGUF model files, so the raw bytes of any of them can be
//! sliced out (a later fused kernel can consume them as they are). Dequantization follows ggml's
//! reference `dequantize_row_*` exactly, element order included, because a weight that is off by
//! one nibble position still "works" and only shows up as a worse perplexity.

use half::{bf16, f16};

use crate::error::KvqError;

/// A ggml tensor type, as stored in a GGUF tensor directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    /// 32 elements: f16 scale `d`, 16 bytes of 4-bit codes; `x = (q - 8) * d`.
    Q4_0,
    /// 32 elements: f16 scale `d`, f16 minimum `m`, 16 bytes of 4-bit codes; `x = q * d + m`.
    Q4_1,
    Q5_0,
    Q5_1,
    /// 32 elements: f16 scale `d`, 32 signed bytes; `x = q * d`.
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

/// (type, ggml id, name, elements per block, bytes per block) — ggml's `type_traits` table.
const TABLE: &[(GgmlType, u32, &str, u64, u64)] = &[
    (GgmlType::F32, 0, "F32", 1, 4),
    (GgmlType::F16, 1, "F16", 1, 2),
    (GgmlType::Q4_0, 2, "Q4_0", 32, 18),
    (GgmlType::Q4_1, 3, "Q4_1", 32, 20),
    (GgmlType::Q5_0, 6, "Q5_0", 32, 22),
    (GgmlType::Q5_1, 7, "Q5_1", 32, 24),
    (GgmlType::Q8_0, 8, "Q8_0", 32, 34),
    (GgmlType::Q2K, 10, "Q2_K", 256, 84),
    (GgmlType::Q3K, 11, "Q3_K", 256, 110),
    (GgmlType::Q4K, 12, "Q4_K", 256, 144),
    (GgmlType::Q5K, 13, "Q5_K", 256, 176),
    (GgmlType::Q6K, 14, "Q6_K", 256, 210),
    (GgmlType::Q8K, 15, "Q8_K", 256, 292),
    (GgmlType::BF16, 30, "BF16", 1, 2),
];

impl GgmlType {
    /// The type with ggml id `id`, if kvq knows its block layout.
    pub fn from_id(id: u32) -> Option<Self> {
        TABLE.iter().find(|e| e.1 == id).map(|e| e.0)
    }

    fn entry(self) -> &'static (GgmlType, u32, &'static str, u64, u64) {
        TABLE
            .iter()
            .find(|e| e.0 == self)
            .expect("every variant is in TABLE")
    }

    /// ggml's numeric id.
    pub fn id(self) -> u32 {
        self.entry().1
    }

    /// ggml's name (`Q4_1`, `Q6_K`, …).
    pub fn name(self) -> &'static str {
        self.entry().2
    }

    /// Elements per block (1 for plain float types).
    pub fn block_elems(self) -> u64 {
        self.entry().3
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        self.entry().4
    }

    /// Whether [`dequantize`] handles this type.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q8_0
        )
    }

    /// Bytes that `n` elements take, or `None` when `n` is not a whole number of blocks or the
    /// size overflows.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        if n % self.block_elems() != 0 {
            return None;
        }
        (n / self.block_elems()).checked_mul(self.block_bytes())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.id())
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `src` (whole blocks of `ty`) into `dst`, which must hold exactly the elements those
/// blocks encode.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), KvqError> {
    if !ty.can_dequantize() {
        return Err(KvqError::InvalidArgument(format!(
            "dequantizing ggml type {ty} is not supported"
        )));
    }
    let expected = ty.bytes_for(dst.len() as u64);
    if expected != Some(src.len() as u64) {
        return Err(KvqError::InvalidArgument(format!(
            "dequantize {}: {} bytes for {} elements (expected {:?})",
            ty.name(),
            src.len(),
            dst.len(),
            expected
        )));
    }
    let bytes = ty.block_bytes() as usize;
    let elems = ty.block_elems() as usize;
    let blocks = src.chunks_exact(bytes).zip(dst.chunks_exact_mut(elems));
    match ty {
        GgmlType::F32 => {
            blocks.for_each(|(b, o)| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => blocks.for_each(|(b, o)| o[0] = f16_at(b, 0)),
        GgmlType::BF16 => {
            blocks.for_each(|(b, o)| o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32())
        }
        GgmlType::Q4_0 => blocks.for_each(|(b, o)| {
            let d = f16_at(b, 0);
            // Low nibbles are elements 0..16, high nibbles 16..32 (not interleaved).
            for (j, &q) in b[2..18].iter().enumerate() {
                o[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
            }
        }),
        GgmlType::Q4_1 => blocks.for_each(|(b, o)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            for (j, &q) in b[4..20].iter().enumerate() {
                o[j] = (q & 0x0F) as f32 * d + m;
                o[j + 16] = (q >> 4) as f32 * d + m;
            }
        }),
        GgmlType::Q8_0 => blocks.for_each(|(b, o)| {
            let d = f16_at(b, 0);
            for (j, &q) in b[2..34].iter().enumerate() {
                o[j] = q as i8 as f32 * d;
            }
        }),
        _ => unreachable!("checked by can_dequantize"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    fn deq(ty: GgmlType, src: &[u8], n: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; n];
        dequantize(ty, src, &mut out).unwrap();
        out
    }

    #[test]
    fn table_matches_ggml_ids_and_sizes() {
        for &(ty, id, name, _, _) in TABLE {
            assert_eq!(GgmlType::from_id(id), Some(ty));
            assert_eq!(ty.name(), name);
        }
        assert_eq!(GgmlType::from_id(4), None, "Q4_2 was removed from ggml");
        assert_eq!(GgmlType::Q4_1.bytes_for(64), Some(40));
        assert_eq!(GgmlType::Q4_1.bytes_for(33), None);
        assert_eq!(GgmlType::Q6K.bytes_for(512), Some(420));
        assert_eq!(
            GgmlType::F32.bytes_for(u64::MAX),
            None,
            "overflow is caught"
        );
    }

    #[test]
    fn q4_0_known_block() {
        // qs[j] = low nibble j, high nibble 15 - j; d = 0.5.
        let mut b = h(0.5).to_vec();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let out = deq(GgmlType::Q4_0, &b, 32);
        for j in 0..16 {
            assert_eq!(out[j], (j as f32 - 8.0) * 0.5, "element {j}");
            assert_eq!(out[j + 16], (7.0 - j as f32) * 0.5, "element {}", j + 16);
        }
    }

    #[test]
    fn q4_1_known_block() {
        let mut b = h(0.25).to_vec();
        b.extend(h(-1.0));
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let out = deq(GgmlType::Q4_1, &b, 32);
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.25 - 1.0);
            assert_eq!(out[j + 16], (15 - j) as f32 * 0.25 - 1.0);
        }
    }

    #[test]
    fn q8_0_known_blocks() {
        let mut b = Vec::new();
        for d in [2.0f32, -0.125] {
            b.extend(h(d));
            b.extend((0..32).map(|j: i32| (j * 8 - 128) as i8 as u8));
        }
        let out = deq(GgmlType::Q8_0, &b, 64);
        for j in 0..32 {
            let q = (j as i32 * 8 - 128) as f32;
            assert_eq!((out[j], out[32 + j]), (q * 2.0, q * -0.125), "element {j}");
        }
    }

    #[test]
    fn float_types() {
        let f32s: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(deq(GgmlType::F32, &f32s, 2), vec![1.5, -2.0]);
        let f16s: Vec<u8> = [h(0.1), h(-3.0)].concat();
        assert_eq!(
            deq(GgmlType::F16, &f16s, 2),
            vec![f16::from_f32(0.1).to_f32(), -3.0]
        );
        let bf16s: Vec<u8> = [bf16::from_f32(1.0e20), bf16::from_f32(-0.5)]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(
            deq(GgmlType::BF16, &bf16s, 2),
            vec![bf16::from_f32(1.0e20).to_f32(), -0.5]
        );
    }

    #[test]
    fn wrong_lengths_and_unsupported_types_are_errors() {
        let mut out = vec![0.0; 32];
        let err = dequantize(GgmlType::Q4_0, &[0; 17], &mut out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("17 bytes for 32 elements"), "{err}");
        let err = dequantize(GgmlType::Q6K, &[0; 210], &mut vec![0.0; 256])
            .unwrap_err()
            .to_string();
        assert!(err.contains("Q6_K (14) is not supported"), "{err}");
    }
}
