//! Speculative decoding (n-gram drafts) with the real SmolLM2-135M-Instruct model on both
//! backends and their cache policies: a batch decoded with drafts gives token for token what
//! each request gives alone without them, including chat-template prompts whose n-gram
//! continuations are wrong (a mis-verified draft would change the answer), EOS is honoured
//! inside accepted runs, and every block comes back. Skips without the GGUF.

use engine_core::chat::{apply_chat_template, ChatMessage};
use engine_core::config::QuantPolicy;
use engine_core::engine::{Engine, GenerationOutput, Request};
use engine_core::sampling::SamplingParams;
use engine_core::EngineConfig;
use kvq_integration_tests::default_model;

/// Raw prompts: repetition drafts get right, and repetition with a twist they get wrong.
const RAW: [&str; 4] = [
    "the cat sat on the mat. the cat sat on the mat. the cat sat on the mat. the cat",
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    "1, 2, 3, 4, 5, 6, 7, 8,",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
];

/// Chat turns, through the model's template as `kvq generate` sends them.
const CHAT: [&str; 2] = [
    "Repeat after me three times: red apples and green pears.",
    "The capital of France is Paris. What is the capital of Spain?",
];

fn engine(model: &std::path::Path, backend: &str, policy: i64) -> Engine {
    let mut c = EngineConfig::default();
    c.model.path = model.display().to_string();
    c.engine.backend = backend.into();
    c.engine.quant_policy = QuantPolicy::Number(policy);
    c.engine.cache_memory_gib = Some(0.1);
    c.engine.block_size = 16;
    Engine::load(&c, &mut |_| {}).unwrap()
}

fn requests(e: &Engine, ignore_eos: bool) -> Vec<Request> {
    let mut prompts: Vec<Vec<u32>> = RAW
        .iter()
        .map(|p| e.tokenizer.encode(p, false).unwrap())
        .collect();
    for c in CHAT {
        let text = apply_chat_template(&e.tokenizer, &[ChatMessage::new("user", c)]).unwrap();
        prompts.push(e.tokenizer.encode(&text, true).unwrap());
    }
    prompts
        .into_iter()
        .map(|prompt| Request {
            prompt,
            params: SamplingParams {
                max_new_tokens: 24,
                ignore_eos,
                ..Default::default()
            },
            ..Default::default()
        })
        .collect()
}

fn check(backend: &str, policy: i64) {
    let Some(model) = default_model() else { return };
    let mut e = engine(&model, backend, policy);
    for ignore_eos in [true, false] {
        let reqs = requests(&e, ignore_eos);
        let alone: Vec<GenerationOutput> = reqs
            .iter()
            .map(|r| e.generate(vec![r.clone()], &mut |_| {}).unwrap().remove(0))
            .collect();
        e.set_num_speculative_tokens(4);
        let before = e.speculation();
        let together = e.generate(reqs, &mut |_| {}).unwrap();
        e.set_num_speculative_tokens(0);
        assert_eq!(e.free_blocks(), e.plan.num_blocks, "blocks leaked");
        for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(
                a.token_ids, t.token_ids,
                "{backend}:{policy} prompt {i}: plain {:?}, speculative {:?}",
                a.text, t.text
            );
            assert_eq!(a.text, t.text);
            assert_eq!(a.finish_reason, t.finish_reason);
        }
        let s = e.speculation();
        let (drafted, accepted) = (s.drafted - before.drafted, s.accepted - before.accepted);
        println!("{backend}:{policy} ignore_eos {ignore_eos}: {accepted}/{drafted} drafts kept");
        assert!(accepted > 0, "the repeated prompts' drafts are right");
        assert!(
            accepted < drafted,
            "some drafts are wrong and were rejected"
        );
    }
}

#[test]
fn pytorch_fp16_cache() {
    check("pytorch", 0);
}

#[test]
fn pytorch_int8_cache() {
    check("pytorch", 8);
}

#[test]
fn turbomind_fp16_cache() {
    check("turbomind", 0);
}

#[test]
fn turbomind_int8_cache() {
    check("turbomind", 8);
}

#[test]
fn turbomind_int4_cache() {
    check("turbomind", 4);
}
