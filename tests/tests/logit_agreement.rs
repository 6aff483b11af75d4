//! The tie-aware top-1 measure of `engine_core::eval::agreement` against the rounding it is
//! meant to forgive, on the CPU: the random model of the GPU model test (tests/gpu/model.rs)
//! against the same model with every weight rounded to f16, as the GPU runner stores them (its
//! f16 GEMM activations add rounding of about the same size, which this does not reproduce).

use engine_core::cache::{BlockPool, BlockTable, PagedKvCache};
use engine_core::dtype::{f16_bits_to_f32, f32_to_f16_bits};
use engine_core::eval::agreement::{agreement, F16_EPS};
use engine_core::model::{LlamaModel, LogitsFor, SeqInput};
use engine_core::plan::ResolvedConfig;
use engine_core::testing::fresh_seed;
use engine_core::EngineConfig;
use kvq_integration_tests::{random_model, random_prompts, smollm2_shape};

fn round_f16(x: f32) -> f32 {
    f16_bits_to_f32(f32_to_f16_bits(x))
}

/// Every position's logits of each sequence read as one prompt (fp16 cache).
fn logits(model: &LlamaModel, seqs: &[Vec<u32>]) -> Vec<f32> {
    let cfg = EngineConfig::default();
    let r = ResolvedConfig::new(&model.spec, &cfg).unwrap();
    let bs = cfg.engine.block_size;
    let mut out = Vec::new();
    for s in seqs {
        let blocks = BlockTable::blocks_for(s.len(), bs);
        let mut cache = PagedKvCache::new(r.layout.clone(), r.codec.clone(), blocks);
        let mut table = BlockTable::default();
        table
            .reserve(&mut BlockPool::new(blocks), s.len(), bs)
            .unwrap();
        let seq = SeqInput {
            tokens: s,
            start_pos: 0,
            block_table: &table,
            window: None,
        };
        out.extend(
            model
                .forward(r.backend.as_ref(), &mut cache, &[seq], LogitsFor::AllTokens)
                .unwrap(),
        );
    }
    out
}

/// How far rounding moved the gap between each row's two best reference logits, in units of
/// the tie tolerance: (median, largest).
fn gap_shift_in_tolerances(reference: &[f32], other: &[f32], vocab: usize) -> (f32, f32) {
    let mut shifts: Vec<f32> = reference
        .chunks_exact(vocab)
        .zip(other.chunks_exact(vocab))
        .map(|(r, o)| {
            let mut order: Vec<usize> = (0..vocab).collect();
            order.select_nth_unstable_by(1, |&i, &j| r[j].total_cmp(&r[i]));
            let (a, b) = (order[0], order[1]);
            let moved = ((o[a] - o[b]) - (r[a] - r[b])).abs();
            moved / (F16_EPS * (r[a].abs() + r[b].abs()))
        })
        .collect();
    shifts.sort_by(f32::total_cmp);
    (shifts[shifts.len() / 2], shifts[shifts.len() - 1])
}

/// f16 rounding of the weights passes the GPU test's direct bound (top-1 up to f16 ties
/// ≥ 99.5 %, mean KLD ≤ 1e-3), and the tolerance stays narrow: at most a tenth of the
/// positions are near ties. Measured (2026-11-29, `KVQ_TEST_SEED` 1 to 6): strict top-1
/// 313–316 of 316, up to f16 ties 316 of 316, 8–14 near-tie positions, mean KLD 7e-6–9e-6;
/// rounding moved the top-two gap by a median 0.11–0.15 and at most 0.84 of the tolerance.
#[test]
fn f16_rounded_weights_agree_up_to_f16_ties() {
    let seed = fresh_seed("f16_ties");
    let spec = smollm2_shape(4);
    let vocab = spec.vocab_size;
    let seqs = random_prompts(seed ^ 1, &[198, 118], vocab);
    let exact = logits(&random_model(&spec, seed, std::convert::identity), &seqs);
    let rounded = logits(&random_model(&spec, seed, round_f16), &seqs);
    let a = agreement(&exact, &rounded, vocab).unwrap();
    let (median, max) = gap_shift_in_tolerances(&exact, &rounded, vocab);
    eprintln!(
        "f16 weights vs f32 over {} positions: top-1 {} up to f16 ties, {} strict, {} near-tie \
         positions, mean KLD {:.2e}; top-two gap moved by a median {median:.3} and at most \
         {max:.3} tolerances",
        a.rows,
        a.top1_f16,
        a.top1,
        a.near_ties,
        a.mean_kld()
    );
    assert!(
        a.top1_f16_rate() >= 0.995 && a.mean_kld() <= 1e-3,
        "f16 rounding alone fails the bound: {a:?}"
    );
    assert!(
        a.near_ties * 10 <= a.rows,
        "the tie tolerance forgives {} of {} positions",
        a.near_ties,
        a.rows
    );
}
