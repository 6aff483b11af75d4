//! The recent window through the model: it changes what a lossy cache gives, a window
//! covering the whole sequence gives the exact cache's logits, and chunked prefill plus decode
//! steps give what one pass gives (the ring carries the window across calls).

use super::hf_dir_tests::{logits_in_chunks, max_abs_diff, random_weights, tiny_spec, InMemory};
use super::load_llama;
use crate::testing::{fresh_seed, rng};
use crate::KvDtype;
use rand::Rng;

#[test]
fn recent_window_reads_exact_values_across_chunks() {
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
    // ... and chunks plus decode steps (the ring across calls) give the same as one pass.
    let chunked = logits_in_chunks(&model, &tokens, &[20, 1, 2, 17, 1, 1, 8], KvDtype::F16, 3);
    let d = max_abs_diff(&chunked, &windowed);
    assert!(
        d < 1e-4 * change.max(1.0),
        "chunked vs one pass: {d} (seed {seed})"
    );
}
