//! RMSNorm.

/// `x ← x / rms(x) · weight` for each row of `x` (`[rows, weight.len()]`).
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    for row in x.chunks_mut(d) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        row.iter_mut().zip(weight).for_each(|(v, w)| *v *= inv * w);
    }
}

/// RMSNorm into a new buffer, leaving the residual stream untouched.
pub fn rms_norm_to(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let mut out = x.to_vec();
    rms_norm(&mut out, weight, eps);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn normalises_to_unit_rms_then_scales() {
        let mut x = vec![3.0f32, 4.0, 0.0, 0.0];
        super::rms_norm(&mut x, &[1.0, 2.0], 1e-6);
        let r = (12.5f32 + 1e-6).sqrt();
        assert!((x[0] - 3.0 / r).abs() < 1e-6 && (x[1] - 8.0 / r).abs() < 1e-6);
        assert_eq!(&x[2..], &[0.0, 0.0]);
    }
}
