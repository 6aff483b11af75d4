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
    /// `[layer][slot][head][dk]` and `[layer][slot][head][dv]`, `dtype` bytes per value.
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
        let b = dtype.size_bytes();
        Self {
            n,
            heads,
            dk,
            dv,
            dtype,
            end: 0,
            held: 0,
            k: vec![0; layers * n * heads * dk * b],
            v: vec![0; layers * n * heads * dv * b],
        }
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
        let (bk, bv) = (self.base(layer, p, self.dk), self.base(layer, p, self.dv));
        for (i, &x) in k.iter().enumerate() {
            self.dtype.store_at(x, &mut self.k, bk + i);
        }
        for (i, &x) in v.iter().enumerate() {
            self.dtype.store_at(x, &mut self.v, bv + i);
        }
    }
}
