//! The Sylvester (natural-order) Walsh–Hadamard transform, `H[i][j] = (-1)^popcount(i & j)`,
//! normalised by `1/√d` so that it is orthonormal and its own inverse.

/// True when `d` is a power of two (the only sizes the transform exists for).
pub fn is_power_of_two(d: usize) -> bool {
    d != 0 && d & (d - 1) == 0
}

/// In-place fast transform `x ← (H/√d)·x` in O(d log d).
///
/// # Panics
/// If `x.len()` is not a power of two; callers validate head dims before building a codec.
pub fn wht_normalized(x: &mut [f32]) {
    let n = x.len();
    assert!(
        is_power_of_two(n),
        "Hadamard transform needs a power-of-two length, got {n}"
    );
    let mut h = 1;
    while h < n {
        // Butterflies over slice halves (no index arithmetic, vectorizable once h ≥ 4).
        for block in x.chunks_exact_mut(2 * h) {
            let (lo, hi) = block.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                (*a, *b) = (*a + *b, *a - *b);
            }
        }
        h *= 2;
    }
    let s = 1.0 / (n as f32).sqrt();
    x.iter_mut().for_each(|v| *v *= s);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(x: &[f32]) -> Vec<f32> {
        let n = x.len();
        (0..n)
            .map(|i| {
                let s: f64 = (0..n)
                    .map(|j| {
                        let sign = if (i & j).count_ones() % 2 == 0 {
                            1.0
                        } else {
                            -1.0
                        };
                        sign * x[j] as f64
                    })
                    .sum();
                (s / (n as f64).sqrt()) as f32
            })
            .collect()
    }

    #[test]
    fn matches_dense_sylvester_matrix_and_is_involution() {
        let x: Vec<f32> = (0..16).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
        let mut y = x.clone();
        wht_normalized(&mut y);
        for (a, b) in y.iter().zip(dense(&x)) {
            assert!((a - b).abs() < 1e-5);
        }
        wht_normalized(&mut y);
        for (a, b) in y.iter().zip(&x) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn reference_worked_example_rotation() {
        // Reference §7.4: x of §3.7 rotated.
        let mut x = [0.50f32, -1.25, 0.75, 2.00, -0.10, 0.30, -2.50, 1.10];
        wht_normalized(&mut x);
        let want = [
            0.28284, -1.23744, -0.67175, 2.19203, 1.13137, 1.59099, -1.80312, -0.07071,
        ];
        for (a, b) in x.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}
