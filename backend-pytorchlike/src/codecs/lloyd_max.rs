//! The Lloyd–Max codebooks of policy 42 (reference §5.3): optimal scalar quantizers of a
//! standard normal, tabulated at σ = 1 and scaled by σ = 1/√D, the Gaussian approximation of a
//! coordinate of a random unit vector of dimension D.

/// 2-bit centroids (V side).
pub const C2: [f32; 4] = [-1.510_417_6, -0.452_780_8, 0.452_780_8, 1.510_417_6];
/// 2-bit decision boundaries (midpoints of the centroids).
pub const B2: [f32; 3] = [-0.981_599_2, 0.0, 0.981_599_2];
/// 3-bit centroids (K side).
pub const C3: [f32; 8] = [
    -2.151_945_6,
    -1.343_909_3,
    -0.756_005_2,
    -0.245_094_2,
    0.245_094_2,
    0.756_005_2,
    1.343_909_3,
    2.151_945_6,
];
/// 3-bit decision boundaries (midpoints of the centroids).
pub const B3: [f32; 7] = [
    -1.747_927_4,
    -1.049_957_3,
    -0.500_549_7,
    0.0,
    0.500_549_7,
    1.049_957_3,
    1.747_927_4,
];

/// A codebook scaled for unit vectors of one dimension: `N` centroids, `B = N − 1` boundaries.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaledCodebook<const N: usize, const B: usize> {
    pub centroids: [f32; N],
    pub bounds: [f32; B],
}

impl<const N: usize, const B: usize> ScaledCodebook<N, B> {
    /// `centroids · σ` and `bounds · σ` with `σ = 1/√dim`.
    pub fn new(centroids: &[f32; N], bounds: &[f32; B], dim: usize) -> Self {
        let sigma = (1.0 / (dim as f64).sqrt()) as f32;
        Self {
            centroids: centroids.map(|c| c * sigma),
            bounds: bounds.map(|b| b * sigma),
        }
    }

    /// The bin of `u`: how many boundaries it lies strictly above (a value on a boundary goes
    /// to the lower bin, as `torch.searchsorted(..., side='left')`).
    #[inline]
    pub fn index(&self, u: f32) -> u8 {
        self.bounds.iter().filter(|&&b| u > b).count() as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_are_centroid_midpoints() {
        for (b, c) in [(&B2[..], &C2[..]), (&B3[..], &C3[..])] {
            for (i, &bi) in b.iter().enumerate() {
                assert!((bi - (c[i] + c[i + 1]) / 2.0).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn index_is_strict_at_boundaries() {
        let book = ScaledCodebook::new(&C3, &B3, 1);
        assert_eq!(book.index(0.0), 3);
        assert_eq!(book.index(f32::MIN_POSITIVE), 4);
        assert_eq!(book.index(B3[6]), 6);
        assert_eq!(book.index(-10.0), 0);
        assert_eq!(book.index(10.0), 7);
    }
}
