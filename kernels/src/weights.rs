//! The host side of uploading weights: f32 matrices rounded to the f16 the GPU runner keeps.
//! An 8B model is eight billion conversions, so they run in parallel chunks through `half`'s
//! vector conversion (F16C where the CPU has it; serial and scalar, they and the copies around
//! them took over a minute per load). Both round to nearest even, as
//! [`engine_core::dtype::f32_to_f16_bits`] does: the tests hold them to it bit for bit.

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use rayon::prelude::*;

use crate::KernelError;

/// Values converted per parallel task.
const CHUNK: usize = 1 << 16;

/// f16's largest finite value.
const F16_MAX: f32 = 65504.0;

/// The f16 bits of `parts` laid end to end (e.g. the Q, K and V projections stacked into one
/// matrix), rounded to nearest even. A weight that is not finite or beyond f16's range is an
/// error, not an infinity.
pub fn f16_bits_stacked(parts: &[&[f32]]) -> Result<Vec<u16>, KernelError> {
    let mut bits = vec![0u16; parts.iter().map(|p| p.len()).sum()];
    let mut rest = bits.as_mut_slice();
    let mut pieces = Vec::with_capacity(parts.len());
    for part in parts {
        let (head, tail) = rest.split_at_mut(part.len());
        pieces.push((*part, head));
        rest = tail;
    }
    pieces.into_par_iter().try_for_each(|(src, dst)| {
        src.par_chunks(CHUNK)
            .zip(dst.par_chunks_mut(CHUNK))
            .try_for_each(|(src, dst)| {
                if let Some(x) = src.iter().find(|x| !x.is_finite() || x.abs() > F16_MAX) {
                    return Err(KernelError::Unsupported(format!(
                        "weight {x} does not fit f16 (the GPU runner keeps weights in f16)"
                    )));
                }
                dst.reinterpret_cast_mut::<half::f16>()
                    .convert_from_f32_slice(src);
                Ok(())
            })
    })?;
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine_core::dtype::f32_to_f16_bits;
    use engine_core::testing::{fresh_seed, gaussian, rng};

    /// Parts of odd lengths (one empty, one over a chunk) give the serial conversion of their
    /// concatenation, bit for bit, across f16's range (subnormals to near its maximum).
    #[test]
    fn stacked_parts_convert_as_one_serial_pass() {
        let seed = fresh_seed("f16 weights");
        let mut r = rng(seed);
        let lens = [3, 0, CHUNK + 17, 2 * CHUNK - 1];
        let parts: Vec<Vec<f32>> = lens
            .iter()
            .map(|&n| {
                let g = gaussian(&mut r, n);
                // Magnitudes from 2^-30 to 2^13 (times |g| ≤ ~5).
                g.iter()
                    .enumerate()
                    .map(|(i, x)| x * 2f32.powi((i % 44) as i32 - 30))
                    .collect()
            })
            .collect();
        let slices: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
        let got = f16_bits_stacked(&slices).unwrap();
        let want: Vec<u16> = parts
            .iter()
            .flatten()
            .map(|&x| f32_to_f16_bits(x))
            .collect();
        assert_eq!(got.len(), lens.iter().sum::<usize>());
        assert!(got == want, "seed {seed}");
    }

    #[test]
    fn weights_outside_f16_are_refused() {
        for bad in [f32::NAN, f32::INFINITY, -70000.0, 65505.0] {
            let mut w = vec![0.5f32; CHUNK + 9];
            w[CHUNK + 3] = bad;
            let e = f16_bits_stacked(&[&[1.0], &w]).unwrap_err().to_string();
            assert!(e.contains("does not fit f16"), "{bad}: {e}");
        }
        assert_eq!(
            f16_bits_stacked(&[&[65504.0, -0.0]]).unwrap(),
            [0x7BFF, 0x8000]
        );
    }
}
