//! Dense layers `y = x·Wᵀ` with `W` stored `[out, in]` row-major (the GGUF/HF layout).

use gemm::{gemm, Parallelism};

/// A weight matrix in f32.
#[derive(Debug, Clone)]
pub struct Linear {
    pub out_dim: usize,
    pub in_dim: usize,
    pub weight: Vec<f32>,
}

impl Linear {
    pub fn new(weight: Vec<f32>, out_dim: usize, in_dim: usize) -> Self {
        assert_eq!(weight.len(), out_dim * in_dim, "weight shape");
        Self {
            out_dim,
            in_dim,
            weight,
        }
    }

    /// `x` is `[rows, in]`; returns `[rows, out]`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / self.in_dim;
        let mut y = vec![0f32; rows * self.out_dim];
        self.forward_into(x, &mut y);
        y
    }

    /// Like [`Linear::forward`] into a caller's buffer.
    pub fn forward_into(&self, x: &[f32], y: &mut [f32]) {
        let rows = x.len() / self.in_dim;
        assert_eq!(x.len(), rows * self.in_dim, "input shape");
        assert_eq!(y.len(), rows * self.out_dim, "output shape");
        let threads = rayon::current_num_threads();
        let par = if rows * self.out_dim * self.in_dim > 1 << 16 && threads > 1 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        // y[r, o] = Σ_i x[r, i] · W[o, i]: dst m=rows × n=out, lhs x (rows × in, row-major),
        // rhs Wᵀ (in × out) read from W with column stride `in`.
        // SAFETY: the pointers cover the asserted shapes and the strides stay inside them.
        unsafe {
            gemm(
                rows,
                self.out_dim,
                self.in_dim,
                y.as_mut_ptr(),
                1,
                self.out_dim as isize,
                false,
                x.as_ptr(),
                1,
                self.in_dim as isize,
                self.weight.as_ptr(),
                self.in_dim as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_product() {
        let (rows, inp, out) = (5, 37, 23);
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 31) % 17) as f32 / 7.0 - 1.0)
            .collect();
        let x: Vec<f32> = (0..rows * inp)
            .map(|i| ((i * 13) % 11) as f32 / 5.0 - 1.0)
            .collect();
        let l = Linear::new(w.clone(), out, inp);
        let y = l.forward(&x);
        for r in 0..rows {
            for o in 0..out {
                let want: f32 = (0..inp).map(|i| x[r * inp + i] * w[o * inp + i]).sum();
                assert!((y[r * out + o] - want).abs() < 1e-4);
            }
        }
    }
}
