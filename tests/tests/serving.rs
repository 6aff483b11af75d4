//! Continuous batching with the real SmolLM2-135M-Instruct model and an int8 cache: greedy
//! outputs do not depend on the batch a request shares (wide decode batches, prompts
//! prefilled together, preemption and recomputation), and every block comes back.

use engine_core::config::QuantPolicy;
use engine_core::engine::{Engine, GenerationOutput, Request};
use engine_core::sampling::SamplingParams;
use engine_core::EngineConfig;
use kvq_integration_tests::default_model;

const PROMPTS: [&str; 10] = [
    "The capital of France is",
    "A short story about a lighthouse keeper:\n",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
    "Once upon a time, in a small village,",
    "The largest planet in the solar system",
    "To make a cup of tea, first",
    "1, 2, 3, 4,",
    "Shakespeare wrote",
];

fn engine(model: &std::path::Path, cache_gib: f64, block_size: usize) -> Engine {
    let mut c = EngineConfig::default();
    c.model.path = model.display().to_string();
    c.engine.quant_policy = QuantPolicy::Number(8);
    c.engine.cache_memory_gib = Some(cache_gib);
    c.engine.block_size = block_size;
    Engine::load(&c, &mut |_| {}).unwrap()
}

fn requests(e: &Engine) -> Vec<Request> {
    PROMPTS
        .iter()
        .map(|p| Request {
            prompt: e.tokenizer.encode(p, false).unwrap(),
            params: SamplingParams {
                max_new_tokens: 20,
                ignore_eos: true,
                ..Default::default()
            },
            ..Default::default()
        })
        .collect()
}

/// Each request alone, then all together; returns (alone, together).
fn alone_and_together(e: &mut Engine) -> (Vec<GenerationOutput>, Vec<GenerationOutput>) {
    let reqs = requests(e);
    let alone = reqs
        .iter()
        .map(|r| e.generate(vec![r.clone()], &mut |_| {}).unwrap().remove(0))
        .collect();
    let together = e.generate(reqs, &mut |_| {}).unwrap();
    assert_eq!(e.free_blocks(), e.plan.num_blocks, "blocks leaked");
    (alone, together)
}

fn assert_same(alone: &[GenerationOutput], together: &[GenerationOutput]) {
    for (i, (a, t)) in alone.iter().zip(together).enumerate() {
        assert_eq!(
            a.token_ids, t.token_ids,
            "{:?}: alone {:?}, batched {:?}",
            PROMPTS[i], a.text, t.text
        );
        assert_eq!(a.text, t.text);
    }
}

#[test]
fn a_wide_batch_gives_what_each_request_gives_alone() {
    let Some(model) = default_model() else { return };
    let mut e = engine(&model, 0.05, 64);
    let (alone, together) = alone_and_together(&mut e);
    assert_eq!(e.preemptions(), 0);
    assert_same(&alone, &together);
}

#[test]
fn preemption_recomputes_without_changing_any_answer() {
    let Some(model) = default_model() else { return };
    // 8 blocks of 16 tokens: each request grows to about 28 tokens (2 blocks), so ten of them
    // cannot all stay.
    let mut e = engine(&model, 0.0016, 16);
    assert!(e.plan.num_blocks <= 10, "{:?}", e.plan);
    let (alone, together) = alone_and_together(&mut e);
    assert!(e.preemptions() > 0, "the cache was meant to run out");
    assert_same(&alone, &together);
}
