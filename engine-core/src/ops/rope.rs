//! Rotary position embedding in the "rotate half" (GPT-NeoX / HF Llama) arrangement: element
//! `i` of a head pairs with element `i + d/2`. GGUF files store Q/K rows permuted for
//! llama.cpp's interleaved arrangement; the loader undoes that, so K reaches the cache in the
//! same element order as in LMDeploy (which matters for int4 packing and the Hadamard
//! rotation, neither of which is permutation invariant).

/// Precomputed cos/sin per (position, frequency).
#[derive(Debug, Clone)]
pub struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
    max_pos: usize,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f32, max_pos: usize) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for i in 0..half {
                let inv_freq = (theta as f64).powf(-(2.0 * i as f64) / head_dim as f64);
                let a = p as f64 * inv_freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self {
            half,
            cos,
            sin,
            max_pos,
        }
    }

    pub fn max_positions(&self) -> usize {
        self.max_pos
    }

    /// The tables as `[max_positions, head_dim / 2]` cosines and sines (for device copies, so
    /// a device rotates by exactly the same angles).
    pub fn tables(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    /// Rotates every head of one token (`x` = `[heads, head_dim]`) for position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let (c, s) = (
            &self.cos[pos * self.half..][..self.half],
            &self.sin[pos * self.half..][..self.half],
        );
        for head in x.chunks_mut(2 * self.half) {
            let (a, b) = head.split_at_mut(self.half);
            for i in 0..self.half {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * c[i] - x1 * s[i];
                b[i] = x1 * c[i] + x0 * s[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_norm_is_kept() {
        let r = Rope::new(8, 10000.0, 16);
        let x0: Vec<f32> = (0..16).map(|i| i as f32 - 5.0).collect();
        let mut x = x0.clone();
        r.apply(&mut x, 0);
        assert_eq!(x, x0);
        r.apply(&mut x, 7);
        let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((n(&x[..8]) - n(&x0[..8])).abs() < 1e-3);
    }

    #[test]
    fn scores_depend_only_on_relative_position() {
        let r = Rope::new(8, 100.0, 64);
        let q0: Vec<f32> = (0..8).map(|i| (i as f32).sin()).collect();
        let k0: Vec<f32> = (0..8).map(|i| (i as f32 * 0.7).cos()).collect();
        let score = |pq, pk| {
            let (mut q, mut k) = (q0.clone(), k0.clone());
            r.apply(&mut q, pq);
            r.apply(&mut k, pk);
            q.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>()
        };
        assert!((score(10, 3) - score(40, 33)).abs() < 1e-4);
    }
}
