//! A study of what a higher-precision recent window would recover: the cache keeps an exact
//! f32 copy of every entry it writes, and the CPU attention reads each position's last
//! `window` tokens from it instead of the codec's bytes. The copy costs memory the planner
//! does not count, so it is for `kvq eval --exact-window`, not for serving.

use crate::codec::{Domain, KvCodec};
use crate::ops::hadamard::wht_normalized;

/// Exact K/V of every (layer, slot, KV head), each in its side's domain (rotated for a
/// Hadamard-domain side, as the attention reads decoded values).
#[derive(Debug)]
pub struct ExactWindow {
    window: usize,
    dk: usize,
    dv: usize,
    heads: usize,
    slots: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl ExactWindow {
    /// Room for `layers × slots × heads` entries of head dims `dk`, `dv`.
    pub fn new(
        window: usize,
        (dk, dv): (usize, usize),
        layers: usize,
        slots: usize,
        heads: usize,
    ) -> Self {
        Self {
            window,
            dk,
            dv,
            heads,
            slots,
            k: vec![0.0; layers * slots * heads * dk],
            v: vec![0.0; layers * slots * heads * dv],
        }
    }

    /// Tokens at the end of each position's context that attention reads exactly.
    pub fn window(&self) -> usize {
        self.window
    }

    fn index(&self, layer: usize, slot: usize, head: usize) -> usize {
        (layer * self.slots + slot) * self.heads + head
    }

    /// Records one entry written through `codec` (the layer's), in the domain its sides
    /// decode to.
    pub fn record(
        &mut self,
        (layer, slot, head): (usize, usize, usize),
        k: &[f32],
        v: &[f32],
        codec: &dyn KvCodec,
    ) {
        let i = self.index(layer, slot, head);
        let (dk, dv) = (self.dk, self.dv);
        let kx = &mut self.k[i * dk..][..dk];
        kx.copy_from_slice(&k[..dk]);
        if codec.k_domain() == Domain::Hadamard {
            wht_normalized(kx);
        }
        let vx = &mut self.v[i * dv..][..dv];
        vx.copy_from_slice(&v[..dv]);
        if codec.v_domain() == Domain::Hadamard {
            wht_normalized(vx);
        }
    }

    pub fn k_at(&self, layer: usize, slot: usize, head: usize) -> &[f32] {
        &self.k[self.index(layer, slot, head) * self.dk..][..self.dk]
    }

    pub fn v_at(&self, layer: usize, slot: usize, head: usize) -> &[f32] {
        &self.v[self.index(layer, slot, head) * self.dv..][..self.dv]
    }
}
