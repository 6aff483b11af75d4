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

/// With prefix caching, prompts behind a shared system prompt reuse its blocks and still give
/// what they give without the cache, alone and batched (every prompt here is long enough to
/// take the prompt product path, so the shared K/V are the bytes each would write itself).
#[test]
fn prefix_caching_keeps_every_answer() {
    let Some(model) = default_model() else { return };
    let mut plain = engine(&model, 0.05, 16);
    let system = "You are a careful assistant. Answer briefly and precisely, and never make \
                  up facts you are not sure of. Use plain words, short sentences and no lists \
                  unless the question asks for one. ";
    let reqs: Vec<Request> = requests(&plain)
        .into_iter()
        .zip(PROMPTS)
        .map(|(mut r, p)| {
            r.prompt = plain
                .tokenizer
                .encode(&format!("{system}{p}"), false)
                .unwrap();
            r
        })
        .collect();
    assert!(reqs.iter().all(|r| r.prompt.len() >= 32));
    let want: Vec<GenerationOutput> = reqs
        .iter()
        .map(|r| {
            plain
                .generate(vec![r.clone()], &mut |_| {})
                .unwrap()
                .remove(0)
        })
        .collect();
    let mut c = EngineConfig::default();
    c.model.path = model.display().to_string();
    c.engine.quant_policy = QuantPolicy::Number(8);
    c.engine.cache_memory_gib = Some(0.05);
    c.engine.block_size = 16;
    c.engine.enable_prefix_caching = true;
    let mut e = Engine::load(&c, &mut |_| {}).unwrap();
    let one_by_one: Vec<GenerationOutput> = reqs
        .iter()
        .map(|r| e.generate(vec![r.clone()], &mut |_| {}).unwrap().remove(0))
        .collect();
    assert_same(&want, &one_by_one);
    // Every request after the first found the system prompt's full blocks.
    assert!(e.prefix_hit_tokens() >= 9 * 32, "{}", e.prefix_hit_tokens());
    let together = e.generate(reqs, &mut |_| {}).unwrap();
    assert_same(&want, &together);
    assert_eq!(e.free_blocks(), e.plan.num_blocks, "blocks leaked");
}
