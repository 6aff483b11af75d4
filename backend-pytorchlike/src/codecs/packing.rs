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
