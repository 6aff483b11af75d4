//! The recent window through the model: it changes what a lossy cache gives, and a window
//! covering the whole sequence gives the exact cache's logits. (The ring across calls is held
//! exactly by `cache::recent_window`'s tests; chunking an f16 cache moves logits by rounding
//! flips of the same order as a short window's effect on this tiny model, so a logit
//! comparison across chunkings cannot tell a wrong ring from noise.)

use super::hf_dir_tests::{logits_in_chunks, max_abs_diff, random_weights, tiny_spec, InMemory};
use super::load_llama;
use crate::testing::{fresh_seed, rng};
use crate::KvDtype;
use rand::Rng;

#[test]
fn recent_window_reads_exact_values() {
    let seed = fresh_seed("recent window model");
    let spec = tiny_spec(true);
    let model = load_llama(&InMemory(random_weights(&spec, seed)), &spec).unwrap();
    let mut r = rng(seed);
    let tokens: Vec<u32> = (0..50).map(|_| r.random_range(3..96)).collect();
    let one = [tokens.len()];
    let exact = logits_in_chunks(&model, &tokens, &one, KvDtype::F32, 0);
    let lossy = logits_in_chunks(&model, &tokens, &one, KvDtype::F16, 0);
    assert!(exact.iter().all(|x| x.is_finite()));
    // A window over the whole sequence reads every token exactly.
    let covered = logits_in_chunks(&model, &tokens, &one, KvDtype::F16, tokens.len());
    assert!(
        max_abs_diff(&covered, &exact) < 1e-4,
        "full window vs exact cache (seed {seed})"
    );
    // A short window changes what the f16 cache gives ...
    let windowed = logits_in_chunks(&model, &tokens, &one, KvDtype::F16, 3);
    let change = max_abs_diff(&windowed, &lossy);
    assert!(
        change > 1e-4,
        "window of 3 changed the logits by only {change} (seed {seed})"
    );
}
