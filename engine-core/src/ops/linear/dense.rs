//! The f32 GEMM call.

use gemm::{gemm, Parallelism};

/// `y[r · y_stride + j] = Σ_i x[r, i] · w[j, i]` for `rows` rows of `x` (`[rows, k]`) and the
/// `n` rows of `w` (`[n, k]`). `y` starts at the first output and must reach element
/// `(rows − 1) · y_stride + n − 1`.
pub fn gemm_into(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    y: &mut [f32],
    y_stride: usize,
) {
    assert!(
        x.len() >= rows * k && w.len() >= n * k,
        "gemm operand shapes"
    );
    assert!(n <= y_stride, "gemm output stride");
    assert!(
        rows == 0 || y.len() >= (rows - 1) * y_stride + n,
        "gemm output shape"
    );
    let threads = rayon::current_num_threads();
    let par = if rows * n * k > 1 << 16 && threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // dst m=rows × n (row stride y_stride), lhs x (rows × k, row-major), rhs wᵀ (k × n) read
    // from w with column stride k.
    // SAFETY: the pointers cover the asserted shapes and the strides stay inside them.
    unsafe {
        gemm(
            rows,
            n,
            k,
            y.as_mut_ptr(),
            1,
            y_stride as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
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
