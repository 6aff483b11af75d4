//! A sequence's most recent positions kept at the model dtype next to the quantized cache:
//! attention reads each position's last `n` tokens from here instead of through the codec.
//! On SmolLM2 the previous few tokens carry most of a low-bit codec's loss (README,
//! `[cache] window`), and `n` tokens per sequence cost almost nothing at long contexts.

use crate::codec::{Domain, KvCodec};
use crate::ops::hadamard::wht_normalized;
use crate::KvDtype;

/// The last `n` positions of one sequence, every layer and KV head, K and V stored in the model
/// dtype in the domain the codec's sides decode to (rotated for a Hadamard-domain side).
#[derive(Debug, Clone)]
pub struct RecentWindow {
    n: usize,
    heads: usize,
    dk: usize,
    dv: usize,
    dtype: KvDtype,
    /// Positions `end - held .. end` are held; position p sits in ring slot p % n.
    end: usize,
    held: usize,
    /// Which of the device's rings holds this window's values when attention runs on a GPU
    /// (given by the scheduler, one per running sequence; the host copy is then unused).
    device_slot: usize,
    layers: usize,
    /// `[layer][slot][head][dk]` and `[layer][slot][head][dv]`, `dtype` bytes per value,
    /// allocated on the first write (a device-side window never writes them).
    k: Vec<u8>,
    v: Vec<u8>,
}

impl RecentWindow {
    pub fn new(
        n: usize,
        layers: usize,
        heads: usize,
        (dk, dv): (usize, usize),
        dtype: KvDtype,
    ) -> Self {
        Self {
            n,
            heads,
            dk,
            dv,
            dtype,
            end: 0,
            held: 0,
            device_slot: 0,
            layers,
            k: Vec::new(),
            v: Vec::new(),
        }
    }

    /// The same window held in device ring `slot`.
    pub fn with_device_slot(mut self, slot: usize) -> Self {
        self.device_slot = slot;
        self
    }

    /// The device ring that holds this window (see [`RecentWindow::with_device_slot`]).
    pub fn device_slot(&self) -> usize {
        self.device_slot
    }

    /// Tokens each position reads from the window.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Bytes a window of these dimensions holds (what the planner reserves per sequence),
    /// without building one.
    pub fn bytes_for(
        n: usize,
        layers: usize,
        heads: usize,
        (dk, dv): (usize, usize),
        dtype: KvDtype,
    ) -> usize {
        layers * n * heads * (dk + dv) * dtype.size_bytes()
    }

    /// Position after the last one held.
    pub fn end(&self) -> usize {
        self.end
    }

    /// Forgets everything (the sequence is recomputed from position 0).
    pub fn clear(&mut self) {
        self.end = 0;
        self.held = 0;
    }

    /// The exact tail for a chunk starting at `start` of `layer`: the held positions
    /// `max(start - n, end - held) .. start` followed by the chunk's own `k`/`v` rows
    /// (`[rows][heads][d]`, in the model domain; rotated here where the codec's side is).
    /// Returns the first position of the tail.
    ///
    /// # Panics
    /// If `start` is not where the window ends (the caller reset it for a recompute).
    pub fn tail(
        &self,
        layer: usize,
        start: usize,
        (k, v): (&[f32], &[f32]),
        codec: &dyn KvCodec,
        out: (&mut Vec<f32>, &mut Vec<f32>),
    ) -> usize {
        assert_eq!(
            start, self.end,
            "recent window ends at {}, chunk starts at {start}",
            self.end
        );
        let first = start - self.held.min(self.n);
        let (ko, vo) = out;
        ko.clear();
        vo.clear();
        for p in first..start {
            self.read(layer, p, ko, vo);
        }
        let dtype = self.dtype;
        // As stored: the dtype's value, rotated where the side is and rounded again, so a
        // position reads the same whether it is in this chunk or in the ring later.
        let exact = |x: &[f32], d: usize, rotated: bool, out: &mut Vec<f32>| {
            let at = out.len();
            out.extend(x.iter().map(|&e| dtype.round(e)));
            if rotated {
                for row in out[at..].chunks_exact_mut(d) {
                    wht_normalized(row);
                    row.iter_mut().for_each(|e| *e = dtype.round(*e));
                }
            }
        };
        exact(k, self.dk, codec.k_domain() == Domain::Hadamard, ko);
        exact(v, self.dv, codec.v_domain() == Domain::Hadamard, vo);
        first
    }

    /// Keeps the last `n` positions of a tail built by [`RecentWindow::tail`] for `layer`
    /// (positions `first ..`); [`RecentWindow::advance`] moves the end once every layer is in.
    pub fn keep(&mut self, layer: usize, first: usize, (k, v): (&[f32], &[f32])) {
        let count = k.len() / (self.heads * self.dk);
        let end = first + count;
        for p in end.saturating_sub(self.n).max(first)..end {
            let i = p - first;
            self.write(
                layer,
                p,
                &k[i * self.heads * self.dk..][..self.heads * self.dk],
                &v[i * self.heads * self.dv..][..self.heads * self.dv],
            );
        }
    }

    /// The chunk of `count` positions is in every layer: the window now ends after it.
    /// A device runner that keeps the values itself calls only this.
    pub fn advance(&mut self, count: usize) {
        self.end += count;
        self.held = (self.held + count).min(self.n);
    }

    fn base(&self, layer: usize, p: usize, d: usize) -> usize {
        ((layer * self.n + p % self.n) * self.heads) * d
    }

    fn read(&self, layer: usize, p: usize, ko: &mut Vec<f32>, vo: &mut Vec<f32>) {
        let (bk, bv) = (self.base(layer, p, self.dk), self.base(layer, p, self.dv));
        ko.extend((0..self.heads * self.dk).map(|i| self.dtype.load_at(&self.k, bk + i)));
        vo.extend((0..self.heads * self.dv).map(|i| self.dtype.load_at(&self.v, bv + i)));
    }

    fn write(&mut self, layer: usize, p: usize, k: &[f32], v: &[f32]) {
        if self.k.is_empty() {
            let b = self.dtype.size_bytes() * self.layers * self.n * self.heads;
            self.k = vec![0; b * self.dk];
            self.v = vec![0; b * self.dv];
        }
        let (bk, bv) = (self.base(layer, p, self.dk), self.base(layer, p, self.dv));
        for (i, &x) in k.iter().enumerate() {
            self.dtype.store_at(x, &mut self.k, bk + i);
        }
        for (i, &x) in v.iter().enumerate() {
            self.dtype.store_at(x, &mut self.v, bv + i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{float_codec, FloatSide, KvPair, Rotated};
    use std::sync::Arc;

    const HEADS: usize = 2;
    const DK: usize = 4;
    const DV: usize = 2;

    /// Distinct, f32-exact values of (position, layer, head, element).
    fn rows(positions: std::ops::Range<usize>, layer: usize, d: usize) -> Vec<f32> {
        positions
            .flat_map(|p| {
                (0..HEADS * d).map(move |i| (p * 100 + layer * 10) as f32 + i as f32 / 8.0)
            })
            .collect()
    }

    /// Chunks of every size pattern through two layers: each tail is exactly the positions
    /// `max(start - n, 0) .. start` from the ring followed by the chunk, and a clear starts over.
    #[test]
    fn tails_hold_the_last_positions_across_chunks() {
        let codec = float_codec(DK, DV, KvDtype::F32);
        let (n, layers) = (3, 2);
        let mut w = RecentWindow::new(n, layers, HEADS, (DK, DV), KvDtype::F32);
        assert_eq!(
            RecentWindow::bytes_for(n, layers, HEADS, (DK, DV), KvDtype::F32),
            2 * 3 * 2 * 6 * 4
        );
        for round in 0..2 {
            let mut start = 0;
            for len in [4, 1, 2, 3, 1, 5] {
                for layer in 0..layers {
                    let chunk = (
                        rows(start..start + len, layer, DK),
                        rows(start..start + len, layer, DV),
                    );
                    let (mut tk, mut tv) = (Vec::new(), Vec::new());
                    let first = w.tail(
                        layer,
                        start,
                        (&chunk.0, &chunk.1),
                        &codec,
                        (&mut tk, &mut tv),
                    );
                    assert_eq!(
                        first,
                        start.saturating_sub(n),
                        "round {round} start {start}"
                    );
                    assert_eq!(tk, rows(first..start + len, layer, DK));
                    assert_eq!(tv, rows(first..start + len, layer, DV));
                    w.keep(layer, first, (&tk, &tv));
                }
                w.advance(len);
                start += len;
                assert_eq!(w.end(), start);
            }
            w.clear();
            assert_eq!(w.end(), 0);
        }
    }

    /// A Hadamard-domain side gets its tail rows rotated, as its decoded values are.
    #[test]
    fn rotated_sides_get_rotated_rows() {
        let side = |d| Rotated {
            inner: FloatSide {
                dim: d,
                dtype: KvDtype::F32,
            },
            dtype: KvDtype::F32,
        };
        let codec = KvPair::new("f32r", None, Arc::new(side(DK)), Arc::new(side(DV)));
        let w = RecentWindow::new(2, 1, HEADS, (DK, DV), KvDtype::F32);
        let (k, v) = (rows(0..1, 0, DK), rows(0..1, 0, DV));
        let (mut tk, mut tv) = (Vec::new(), Vec::new());
        w.tail(0, 0, (&k, &v), &codec, (&mut tk, &mut tv));
        let (mut want_k, mut want_v) = (k.clone(), v.clone());
        want_k.chunks_exact_mut(DK).for_each(wht_normalized);
        want_v.chunks_exact_mut(DV).for_each(wht_normalized);
        assert_eq!((tk, tv), (want_k, want_v));
    }
}
