//! Sub-byte packing used by the PyTorch engine: codes are split across the head dim rather than
//! paired with their neighbours, so a kernel reads one contiguous byte run per split and finds
//! element `j` of every split in the same byte (reference §2.4, §5.4, §5.5).

/// Half-split nibbles: byte `j` holds code `j` in the low nibble and code `j + D/2` in the high
/// nibble. `codes.len()` must be even and every code below 16.
pub fn pack_nibbles_half_split(codes: &[u8], out: &mut [u8]) {
    let half = codes.len() / 2;
    for (j, byte) in out[..half].iter_mut().enumerate() {
        *byte = (codes[j] & 0xF) | (codes[j + half] << 4);
    }
}

/// Code `d` of a half-split row of `dim` codes.
#[inline]
pub fn nibble_half_split(packed: &[u8], dim: usize, d: usize) -> u8 {
    let half = dim / 2;
    (packed[d % half] >> (4 * (d / half))) & 0xF
}

/// Quarter-split 2-bit codes: byte `j` holds codes `j`, `j + D/4`, `j + D/2`, `j + 3D/4` from
/// the lowest bit pair up. `codes.len()` must be a multiple of 4 and every code below 4.
pub fn pack_crumbs_quarter_split(codes: &[u8], out: &mut [u8]) {
    let quarter = codes.len() / 4;
    for (j, byte) in out[..quarter].iter_mut().enumerate() {
        *byte = (0..4).fold(0u8, |b, k| b | ((codes[j + k * quarter] & 3) << (2 * k)));
    }
}

/// Code `d` of a quarter-split row of `dim` 2-bit codes.
#[inline]
pub fn crumb_quarter_split(packed: &[u8], dim: usize, d: usize) -> u8 {
    let quarter = dim / 4;
    (packed[d % quarter] >> (2 * (d / quarter))) & 3
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn nibble_packing_is_a_bijection(codes in (1usize..=64).prop_flat_map(|h| prop::collection::vec(0u8..16, 2 * h))) {
            let mut packed = vec![0u8; codes.len() / 2];
            pack_nibbles_half_split(&codes, &mut packed);
            let back: Vec<u8> = (0..codes.len()).map(|d| nibble_half_split(&packed, codes.len(), d)).collect();
            prop_assert_eq!(back, codes);
        }

        #[test]
        fn crumb_packing_is_a_bijection(codes in (1usize..=32).prop_flat_map(|q| prop::collection::vec(0u8..4, 4 * q))) {
            let mut packed = vec![0u8; codes.len() / 4];
            pack_crumbs_quarter_split(&codes, &mut packed);
            let back: Vec<u8> = (0..codes.len()).map(|d| crumb_quarter_split(&packed, codes.len(), d)).collect();
            prop_assert_eq!(back, codes);
        }
    }

    #[test]
    fn layouts_match_the_reference_examples() {
        // Reference §3.7 (int4) and §7.4 (V side of policy 42).
        let mut b = [0u8; 4];
        pack_nibbles_half_split(&[10, 4, 11, 15, 8, 9, 0, 12], &mut b);
        assert_eq!(b, [0x8a, 0x94, 0x0b, 0xcf]);
        let mut b = [0u8; 2];
        pack_crumbs_quarter_split(&[2, 1, 1, 3, 2, 3, 0, 1], &mut b);
        assert_eq!(b, [0x26, 0x7d]);
    }
}

/// Packs `bits`-bit codes as a little-endian bit stream: code `j` occupies bits
/// `j·bits .. (j+1)·bits` of `out` (LSB first). `out` holds `⌈codes·bits/8⌉` bytes.
pub fn pack_bits(codes: &[u8], bits: u32, out: &mut [u8]) {
    out.fill(0);
    for (j, &c) in codes.iter().enumerate() {
        let at = j * bits as usize;
        let word = (c as u16) << (at % 8);
        out[at / 8] |= word as u8;
        if at % 8 + bits as usize > 8 {
            out[at / 8 + 1] |= (word >> 8) as u8;
        }
    }
}

/// Code `j` of a stream written by [`pack_bits`].
#[inline]
pub fn unpack_bits(packed: &[u8], bits: u32, j: usize) -> u8 {
    let at = j * bits as usize;
    let lo = packed[at / 8] as u16;
    let hi = if at % 8 + bits as usize > 8 {
        (packed[at / 8 + 1] as u16) << 8
    } else {
        0
    };
    (((lo | hi) >> (at % 8)) & ((1u16 << bits) - 1)) as u8
}

#[cfg(test)]
mod bit_stream_tests {
    use super::*;
    use engine_core::testing::{fresh_seed, rng};
    use rand::Rng;

    /// Packing then unpacking returns every code, for every width and length used.
    #[test]
    fn bit_stream_is_bijective() {
        let mut r = rng(fresh_seed("pack_bits"));
        for bits in 1..=4u32 {
            for dim in [8usize, 64, 128] {
                let codes: Vec<u8> = (0..dim).map(|_| r.random_range(0..1u8 << bits)).collect();
                let mut out = vec![0xAAu8; (dim * bits as usize).div_ceil(8)];
                pack_bits(&codes, bits, &mut out);
                let back: Vec<u8> = (0..dim).map(|j| unpack_bits(&out, bits, j)).collect();
                assert_eq!(back, codes, "bits {bits} dim {dim}");
            }
        }
        // Known layout: 3-bit codes 1..=8 (mod 8) fill 3 bytes LSB first.
        let mut out = [0u8; 3];
        pack_bits(&[1, 2, 3, 4, 5, 6, 7, 0], 3, &mut out);
        assert_eq!(out, [0b1101_0001, 0b0101_1000, 0b0001_1111]);
    }
}
