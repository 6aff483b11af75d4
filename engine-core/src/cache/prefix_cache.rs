//! Automatic prefix caching (LMDeploy's and vLLM's `enable_prefix_caching`): a full block is
//! indexed by a key of every token from the start of the sequence to its end, so a request
//! whose tokens start like an earlier one's takes those blocks instead of recomputing them. A
//! cached block that no sequence holds stays indexed (idle) until the pool needs a block, the
//! least recently used first.
//!
//! Keys are 128-bit hashes of (the previous block's key, this block's tokens), as vLLM chains
//! its block hashes: equal keys mean equal token prefixes unless two 128-bit hashes collide.
//! The block's bytes are whatever the codec wrote for those tokens at those positions, the same
//! for every sequence of the engine, so sharing is codec-agnostic.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

/// The key of a full block: a hash of every token up to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrefixKey(u128);

impl PrefixKey {
    /// The key of the block holding `tokens` after the block keyed `parent` (`None`: the first).
    pub fn chain(parent: Option<PrefixKey>, tokens: &[u32]) -> Self {
        let half = |salt: u8| {
            let mut h = DefaultHasher::new();
            salt.hash(&mut h);
            parent.hash(&mut h);
            tokens.hash(&mut h);
            h.finish()
        };
        Self((u128::from(half(0)) << 64) | u128::from(half(1)))
    }

    /// Extends `keys` (the keys of `tokens`' first full blocks) to its first `blocks` blocks.
    pub fn extend(keys: &mut Vec<PrefixKey>, tokens: &[u32], block_size: usize, blocks: usize) {
        while keys.len() < blocks {
            let i = keys.len();
            let key = Self::chain(
                keys.last().copied(),
                &tokens[i * block_size..(i + 1) * block_size],
            );
            keys.push(key);
        }
    }
}

/// The index of cached blocks and the order in which idle ones are evicted.
#[derive(Debug, Clone, Default)]
pub struct PrefixCache {
    block_of: HashMap<PrefixKey, u32>,
    key_of: HashMap<u32, PrefixKey>,
    /// Idle cached blocks by when they became idle (oldest first).
    idle: BTreeMap<u64, u32>,
    idle_since: HashMap<u32, u64>,
    clock: u64,
}

impl PrefixCache {
    /// The block cached under `key`, if any.
    pub fn lookup(&self, key: PrefixKey) -> Option<u32> {
        self.block_of.get(&key).copied()
    }

    /// Indexes `block` under `key`, unless the key already has a block or the block a key.
    pub fn insert(&mut self, key: PrefixKey, block: u32) {
        if self.block_of.contains_key(&key) || self.key_of.contains_key(&block) {
            return;
        }
        self.block_of.insert(key, block);
        self.key_of.insert(block, key);
    }

    pub fn is_cached(&self, block: u32) -> bool {
        self.key_of.contains_key(&block)
    }

    pub fn num_idle(&self) -> usize {
        self.idle.len()
    }

    /// Marks a cached block that no sequence holds any more as evictable.
    pub fn make_idle(&mut self, block: u32) {
        self.clock += 1;
        self.idle.insert(self.clock, block);
        self.idle_since.insert(block, self.clock);
    }

    /// Takes an idle block back into use (a sequence shares it again).
    pub fn wake(&mut self, block: u32) {
        if let Some(t) = self.idle_since.remove(&block) {
            self.idle.remove(&t);
        }
    }

    /// Forgets the least recently idle block and returns it for reuse.
    pub fn evict(&mut self) -> Option<u32> {
        let (_, block) = self.idle.pop_first()?;
        self.idle_since.remove(&block);
        if let Some(key) = self.key_of.remove(&block) {
            self.block_of.remove(&key);
        }
        Some(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_every_earlier_token() {
        let a = PrefixKey::chain(None, &[1, 2]);
        assert_eq!(a, PrefixKey::chain(None, &[1, 2]));
        assert_ne!(a, PrefixKey::chain(None, &[2, 1]));
        let b = PrefixKey::chain(Some(a), &[3, 4]);
        assert_ne!(
            b,
            PrefixKey::chain(Some(PrefixKey::chain(None, &[1, 5])), &[3, 4])
        );
        assert_ne!(b, PrefixKey::chain(None, &[3, 4]));
        let mut keys = vec![a];
        PrefixKey::extend(&mut keys, &[1, 2, 3, 4, 5], 2, 2);
        assert_eq!(keys, vec![a, b]);
    }

    #[test]
    fn idle_blocks_are_evicted_oldest_first_and_forgotten() {
        let mut c = PrefixCache::default();
        let (k1, k2) = (PrefixKey::chain(None, &[1]), PrefixKey::chain(None, &[2]));
        c.insert(k1, 7);
        c.insert(k2, 8);
        c.insert(k2, 9); // the key already has a block
        assert_eq!((c.lookup(k1), c.lookup(k2)), (Some(7), Some(8)));
        c.make_idle(8);
        c.make_idle(7);
        c.wake(8);
        assert_eq!(c.num_idle(), 1);
        assert_eq!(c.evict(), Some(7));
        assert_eq!((c.lookup(k1), c.is_cached(7)), (None, false));
        assert_eq!(c.evict(), None);
        assert_eq!(c.lookup(k2), Some(8));
    }
}
