//! A fixed pool of cache blocks with O(1) allocation and release, and per-sequence block
//! tables. Double frees and foreign ids are errors, so a leak or a bookkeeping bug shows up
//! as a failed call rather than as two requests sharing a block.

use crate::error::KvqError;

/// Free-list allocator over block ids `0..num_blocks`.
#[derive(Debug, Clone)]
pub struct BlockPool {
    free: Vec<u32>,
    in_use: Vec<bool>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        assert!(num_blocks <= u32::MAX as usize, "block ids are u32");
        // Reverse so the lowest ids are handed out first (nicer to read in traces).
        Self {
            free: (0..num_blocks as u32).rev().collect(),
            in_use: vec![false; num_blocks],
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.in_use.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Takes one free block, or `None` when the pool is exhausted.
    pub fn allocate(&mut self) -> Option<u32> {
        let id = self.free.pop()?;
        self.in_use[id as usize] = true;
        Some(id)
    }

    /// Returns a block to the pool.
    pub fn release(&mut self, id: u32) -> Result<(), KvqError> {
        match self.in_use.get_mut(id as usize) {
            Some(used @ true) => {
                *used = false;
                self.free.push(id);
                Ok(())
            }
            Some(false) => Err(KvqError::InvalidArgument(format!(
                "block {id} released twice"
            ))),
            None => Err(KvqError::InvalidArgument(format!(
                "block {id} is not in this pool of {} blocks",
                self.num_blocks()
            ))),
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
