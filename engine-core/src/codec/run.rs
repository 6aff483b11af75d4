//! Runs of adjacent cache entries. Attention decodes a tile of tokens with one codec call per
//! run of a block's adjacent tokens instead of one per token: at short head dims (64) the
//! per-token dynamic call and metadata load cost as much as decoding the values.

/// `count` entries of `len` bytes each, the `i`-th at `i · stride` in `bytes`: one side's codes
/// (or metadata) for adjacent tokens of one KV head of a cache block.
#[derive(Clone, Copy, Debug)]
pub struct EntryRun<'a> {
    bytes: &'a [u8],
    stride: usize,
    len: usize,
    count: usize,
}

impl<'a> EntryRun<'a> {
    /// # Panics
    /// If `bytes` does not hold `count` entries of `len` bytes `stride` apart.
    pub fn new(bytes: &'a [u8], stride: usize, len: usize, count: usize) -> Self {
        let needed = if count == 0 {
            0
        } else {
            (count - 1) * stride + len
        };
        assert!(
            bytes.len() >= needed,
            "entry run of {count} × {len} bytes every {stride} needs {needed} bytes, got {}",
            bytes.len()
        );
        Self {
            bytes,
            stride,
            len,
            count,
        }
    }

    /// A run of one entry: all of `entry`.
    pub fn single(entry: &'a [u8]) -> Self {
        Self::new(entry, entry.len(), entry.len(), 1)
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Bytes of one entry.
    pub fn entry_len(&self) -> usize {
        self.len
    }

    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Entry `i`.
    ///
    /// # Panics
    /// If `i >= count`.
    #[inline]
    pub fn entry(&self, i: usize) -> &'a [u8] {
        assert!(i < self.count, "entry {i} of a run of {}", self.count);
        &self.bytes[i * self.stride..][..self.len]
    }

    /// The first byte of entry `i`, for vector loops that have checked `i < count` themselves.
    #[inline]
    pub fn entry_ptr(&self, i: usize) -> *const u8 {
        self.entry(i).as_ptr()
    }
}

/// Calls `decode(data entry, meta entry, row)` for every entry of a run, row `i` being
/// `out[i·dim..][..dim]`: the per-entry fallback of the run decoders.
///
/// # Panics
/// If the runs differ in length or `out` is shorter than `count · dim`.
pub fn decode_entries(
    dim: usize,
    data: EntryRun<'_>,
    meta: EntryRun<'_>,
    out: &mut [f32],
    mut decode: impl FnMut(&[u8], &[u8], &mut [f32]),
) {
    let n = data.count();
    assert_eq!(n, meta.count(), "data and meta runs differ in length");
    assert!(
        out.len() >= n * dim,
        "decode output holds fewer than {n} rows"
    );
    for i in 0..n {
        decode(data.entry(i), meta.entry(i), &mut out[i * dim..][..dim]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_stride_apart_and_bounds_are_checked() {
        let bytes: Vec<u8> = (0..10).collect();
        let run = EntryRun::new(&bytes, 4, 2, 3);
        assert_eq!(run.entry(0), [0, 1]);
        assert_eq!(run.entry(2), [8, 9]);
        assert!(std::panic::catch_unwind(|| run.entry(3)).is_err());
        assert!(std::panic::catch_unwind(|| EntryRun::new(&bytes, 4, 3, 3)).is_err());
        let empty = EntryRun::new(&[], 0, 0, 5);
        assert_eq!(empty.entry(4), [] as [u8; 0]);
    }
}
