//! A fixed pool of cache blocks with O(1) allocation and release, and per-sequence block
//! tables. Blocks are reference-counted so that, with prefix caching, sequences can share the
//! blocks of a common prefix; a release of a block nobody holds and foreign ids are errors,
//! so a leak or a bookkeeping bug shows up as a failed call.

use super::prefix_cache::{PrefixCache, PrefixKey};
use crate::error::KvqError;

/// Free-list allocator over block ids `0..num_blocks`, with an optional prefix cache.
#[derive(Debug, Clone)]
pub struct BlockPool {
    free: Vec<u32>,
    /// Sequences holding each block (0: free, or idle in the prefix cache).
    refs: Vec<u32>,
    prefix: Option<PrefixCache>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        assert!(num_blocks <= u32::MAX as usize, "block ids are u32");
        // Reverse so the lowest ids are handed out first (nicer to read in traces).
        Self {
            free: (0..num_blocks as u32).rev().collect(),
            refs: vec![0; num_blocks],
            prefix: None,
        }
    }

    /// A pool that keeps full blocks' contents indexed by their token prefix for reuse.
    pub fn with_prefix_caching(num_blocks: usize, enabled: bool) -> Self {
        Self {
            prefix: enabled.then(PrefixCache::default),
            ..Self::new(num_blocks)
        }
    }

    pub fn caches_prefixes(&self) -> bool {
        self.prefix.is_some()
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks no sequence holds (idle cached blocks included: they are reused on demand).
    pub fn num_free(&self) -> usize {
        self.free.len() + self.prefix.as_ref().map_or(0, PrefixCache::num_idle)
    }

    /// Idle blocks whose cached contents a later request may still reuse.
    pub fn num_cached_idle(&self) -> usize {
        self.prefix.as_ref().map_or(0, PrefixCache::num_idle)
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Takes one free block (evicting the least recently idle cached block when no
    /// uncached one is left), or `None` when the pool is exhausted.
    pub fn allocate(&mut self) -> Option<u32> {
        let id = self
            .free
            .pop()
            .or_else(|| self.prefix.as_mut().and_then(PrefixCache::evict))?;
        self.refs[id as usize] = 1;
        Some(id)
    }

    /// Drops one hold on a block; a block nobody holds goes back to the pool (idle in the
    /// prefix cache when its contents are indexed).
    pub fn release(&mut self, id: u32) -> Result<(), KvqError> {
        match self.refs.get_mut(id as usize) {
            Some(0) => Err(KvqError::InvalidArgument(format!(
                "block {id} released twice"
            ))),
            Some(refs) => {
                *refs -= 1;
                if *refs == 0 {
                    match &mut self.prefix {
                        Some(p) if p.is_cached(id) => p.make_idle(id),
                        _ => self.free.push(id),
                    }
                }
                Ok(())
            }
            None => Err(KvqError::InvalidArgument(format!(
                "block {id} is not in this pool of {} blocks",
                self.num_blocks()
            ))),
        }
    }

    /// Takes a hold on the block cached under `key`, if there is one.
    pub fn share(&mut self, key: PrefixKey) -> Option<u32> {
        let prefix = self.prefix.as_mut()?;
        let id = prefix.lookup(key)?;
        if self.refs[id as usize] == 0 {
            prefix.wake(id);
        }
        self.refs[id as usize] += 1;
        Some(id)
    }

    /// Indexes held block `id`, now full with the tokens `key` stands for (no-op without
    /// prefix caching).
    pub fn register(&mut self, id: u32, key: PrefixKey) {
        if let Some(p) = &mut self.prefix {
            p.insert(key, id);
        }
    }
}

/// The blocks one sequence's tokens live in, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    pub blocks: Vec<u32>,
    /// Tokens written so far.
    pub num_tokens: usize,
}

impl BlockTable {
    /// Blocks needed to hold `num_tokens` tokens.
    pub fn blocks_for(num_tokens: usize, block_size: usize) -> usize {
        num_tokens.div_ceil(block_size)
    }

    /// Grows the table so it can hold `new_len` tokens, taking blocks from `pool`. On failure
    /// nothing is taken (all-or-nothing), so the caller can queue or preempt cleanly.
    pub fn reserve(
        &mut self,
        pool: &mut BlockPool,
        new_len: usize,
        block_size: usize,
    ) -> Result<(), KvqError> {
        let need = Self::blocks_for(new_len, block_size).saturating_sub(self.blocks.len());
        if need > pool.num_free() {
            return Err(KvqError::OutOfBlocks(format!(
                "need {need} more blocks, {} free",
                pool.num_free()
            )));
        }
        for _ in 0..need {
            self.blocks
                .push(pool.allocate().expect("checked free count"));
        }
        Ok(())
    }

    /// Takes, from an empty table, the cached blocks of the longest run of `keys` the pool has
    /// (a common prefix with an earlier sequence); returns how many.
    pub fn share_prefix(&mut self, pool: &mut BlockPool, keys: &[PrefixKey]) -> usize {
        debug_assert!(self.blocks.is_empty(), "sharing starts a table");
        for &key in keys {
            match pool.share(key) {
                Some(id) => self.blocks.push(id),
                None => break,
            }
        }
        self.blocks.len()
    }

    /// Global slot (block id · block_size + offset) of token `pos`.
    pub fn slot(&self, pos: usize, block_size: usize) -> usize {
        self.blocks[pos / block_size] as usize * block_size + pos % block_size
    }

    /// Shrinks the table to the blocks `new_len` tokens need, returning the rest to `pool`
    /// (a sequence whose speculative drafts were rejected gives their blocks back).
    pub fn truncate(
        &mut self,
        pool: &mut BlockPool,
        new_len: usize,
        block_size: usize,
    ) -> Result<(), KvqError> {
        let keep = Self::blocks_for(new_len, block_size);
        while self.blocks.len() > keep {
            pool.release(self.blocks.pop().expect("more than keep"))?;
        }
        self.num_tokens = self.num_tokens.min(new_len);
        Ok(())
    }

    /// Returns every block to `pool`.
    pub fn release_all(&mut self, pool: &mut BlockPool) -> Result<(), KvqError> {
        for id in self.blocks.drain(..) {
            pool.release(id)?;
        }
        self.num_tokens = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn double_free_and_foreign_ids_are_errors() {
        let mut p = BlockPool::new(2);
        let a = p.allocate().unwrap();
        p.release(a).unwrap();
        assert!(p.release(a).unwrap_err().to_string().contains("twice"));
        assert!(p.release(7).is_err());
    }

    #[test]
    fn reserve_is_all_or_nothing() {
        let mut p = BlockPool::new(3);
        let mut t = BlockTable::default();
        t.reserve(&mut p, 64 * 2, 64).unwrap();
        assert_eq!(p.num_free(), 1);
        let mut u = BlockTable::default();
        assert!(u.reserve(&mut p, 64 * 2, 64).is_err());
        assert_eq!(p.num_free(), 1);
        assert!(u.blocks.is_empty());
    }

    #[test]
    fn truncate_returns_the_blocks_past_the_new_length() {
        let mut p = BlockPool::new(4);
        let mut t = BlockTable::default();
        t.reserve(&mut p, 50, 16).unwrap();
        assert_eq!((t.blocks.len(), p.num_free()), (4, 0));
        t.truncate(&mut p, 33, 16).unwrap();
        assert_eq!((t.blocks.len(), p.num_free()), (3, 1));
        t.truncate(&mut p, 40, 16).unwrap(); // growing is reserve's job
        assert_eq!(t.blocks.len(), 3);
        t.truncate(&mut p, 0, 16).unwrap();
        assert_eq!((t.blocks.len(), p.num_free()), (0, 4));
    }

    #[test]
    fn shared_blocks_live_until_their_last_holder_releases_them() {
        let mut p = BlockPool::with_prefix_caching(3, true);
        let key = PrefixKey::chain(None, &[1, 2]);
        let mut a = BlockTable::default();
        a.reserve(&mut p, 4, 2).unwrap();
        p.register(a.blocks[0], key);
        let mut b = BlockTable::default();
        assert_eq!(
            b.share_prefix(&mut p, &[key, PrefixKey::chain(Some(key), &[9, 9])]),
            1
        );
        assert_eq!(b.blocks[0], a.blocks[0]);
        assert_eq!(p.num_free(), 1);
        a.release_all(&mut p).unwrap();
        assert_eq!(p.num_free(), 2, "b still holds the shared block");
        b.release_all(&mut p).unwrap();
        assert_eq!((p.num_free(), p.num_cached_idle()), (3, 1));
        // An idle cached block is shared again, or evicted once nothing else is free.
        let mut c = BlockTable::default();
        assert_eq!(c.share_prefix(&mut p, &[key]), 1);
        c.release_all(&mut p).unwrap();
        let mut d = BlockTable::default();
        d.reserve(&mut p, 6, 2).unwrap();
        assert_eq!((p.num_free(), p.num_cached_idle()), (0, 0));
        assert_eq!(BlockTable::default().share_prefix(&mut p, &[key]), 0);
        assert!(p.release(d.blocks[0]).is_ok() && p.release(d.blocks[0]).is_err());
    }

    proptest! {
        /// Any interleaving of reserves and releases leaves no block leaked or shared.
        #[test]
        fn no_leaks_no_sharing(ops in proptest::collection::vec((0usize..4, 0usize..300), 1..60)) {
            let mut pool = BlockPool::new(16);
            let mut tables = vec![BlockTable::default(); 4];
            for (seq, len) in ops {
                if len % 5 == 0 {
                    tables[seq].release_all(&mut pool).unwrap();
                } else {
                    let _ = tables[seq].reserve(&mut pool, len, 16);
                }
                let mut seen = [false; 16];
                for t in &tables {
                    for &b in &t.blocks {
                        prop_assert!(!seen[b as usize]);
                        seen[b as usize] = true;
                    }
                }
                let held: usize = tables.iter().map(|t| t.blocks.len()).sum();
                prop_assert_eq!(held + pool.num_free(), 16);
            }
            for t in &mut tables {
                t.release_all(&mut pool).unwrap();
            }
            prop_assert_eq!(pool.num_free(), 16);
        }
    }
}
