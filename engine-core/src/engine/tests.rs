//! The scheduler and the async engine on a tiny random Llama (2 layers, vocab 96) with an f32
//! cache: preemption by recompute gives what each request gives alone, cancellation and
//! random traffic leave every block free, batch and prefill limits hold, stop strings end
//! generation, and dropping a stream cancels its request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::Rng;

use super::{Engine, EngineEvent, EngineHandle, FinishReason, GenerationOutput, Request};
use crate::backend::AttentionBackend;
use crate::codec::{float_codec, KvCodec};
use crate::config::EngineConfig;
use crate::dtype::KvDtype;
use crate::error::KvqError;
use crate::loader::Tokenizer;
use crate::model::hf_dir_tests::{
    random_weights, tiny_spec, write_tiny_tokenizer, CpuF32Backend, InMemory, TempDir,
};
use crate::model::load_llama;
use crate::plan::ResolvedConfig;
use crate::sampling::SamplingParams;
use crate::testing::rng;

/// A tiny engine with `num_blocks` blocks of `block_size` tokens.
fn tiny_engine(num_blocks: usize, block_size: usize, max_batch_size: usize) -> Engine {
    tiny_engine_with(num_blocks, block_size, max_batch_size, KvDtype::F32, 0)
}

/// A tiny engine of `num_blocks` blocks of 16 tokens with prefix caching on.
fn tiny_engine_caching_prefixes(num_blocks: usize, cache_dtype: KvDtype) -> Engine {
    let mut config = EngineConfig::default();
    config.engine.enable_prefix_caching = true;
    tiny_engine_from(num_blocks, 16, 8, cache_dtype, 0, config)
}

/// [`tiny_engine`] with the cache in `cache_dtype` and an f32 recent window of `window`.
fn tiny_engine_with(
    num_blocks: usize,
    block_size: usize,
    max_batch_size: usize,
    cache_dtype: KvDtype,
    window: usize,
) -> Engine {
    let config = EngineConfig::default();
    tiny_engine_from(
        num_blocks,
        block_size,
        max_batch_size,
        cache_dtype,
        window,
        config,
    )
}

/// [`tiny_engine_with`] from `config` (its `[engine]` block size and batch size are set here).
fn tiny_engine_from(
    num_blocks: usize,
    block_size: usize,
    max_batch_size: usize,
    cache_dtype: KvDtype,
    window: usize,
    mut config: EngineConfig,
) -> Engine {
    let spec = tiny_spec(true);
    let model = load_llama(&InMemory(random_weights(&spec, 7)), &spec).unwrap();
    let dir = TempDir::new("engine");
    write_tiny_tokenizer(dir.path());
    let tokenizer = Tokenizer::from_path(dir.path()).unwrap();
    let codec: Arc<dyn KvCodec> =
        Arc::new(float_codec(spec.head_dim_k, spec.head_dim_v, cache_dtype));
    let layout = CpuF32Backend.cache_layout(
        codec.as_ref(),
        spec.num_layers,
        spec.num_kv_heads,
        block_size,
    );
    let resolved = ResolvedConfig {
        backend: Box::new(CpuF32Backend),
        codec,
        layout: layout.clone(),
        fp16_layout: layout,
        edge: None,
        recent_window: window,
        dtype: KvDtype::F32,
    };
    let plan = resolved.plan_exact((num_blocks * resolved.layout.block_bytes()) as u64);
    assert_eq!(plan.num_blocks, num_blocks);
    config.engine.block_size = block_size;
    config.engine.max_batch_size = max_batch_size;
    Engine::from_parts(config, spec, model, tokenizer, resolved, plan)
}

/// Greedy, EOS ignored, so a request always generates `new_tokens`.
fn request(seed: u64, prompt_len: usize, new_tokens: usize) -> Request {
    let mut r = rng(seed);
    Request {
        prompt: (0..prompt_len).map(|_| r.random_range(3..96)).collect(),
        params: SamplingParams {
            max_new_tokens: new_tokens,
            ignore_eos: true,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Every block is either free or held by an active request.
fn assert_accounted(e: &Engine) {
    assert_eq!(
        e.free_blocks() + e.held_blocks(),
        e.plan.num_blocks,
        "blocks leaked or double counted"
    );
}

/// With a recent window, each running request holds one in its own device slot below
/// `max_batch_size` (a GPU keeps that many rings), and no waiting request holds one.
fn assert_window_slots(e: &Engine) {
    let (mut slots, waiting_holds) = e.window_slots();
    assert!(!waiting_holds, "a preempted request kept its window");
    let running = slots.len();
    slots.sort_unstable();
    slots.dedup();
    assert_eq!(
        slots.len(),
        running,
        "two running requests share a window slot"
    );
    assert!(
        slots.iter().all(|&s| s < e.config.engine.max_batch_size),
        "{slots:?}"
    );
}

fn alone(e: &mut Engine, r: &Request) -> GenerationOutput {
    e.generate(vec![r.clone()], &mut |_| {}).unwrap().remove(0)
}

#[test]
fn preemption_recomputes_and_gives_what_each_request_gives_alone() {
    // 6 blocks of 16 tokens; each request grows to 60 tokens (4 blocks), so three are
    // admitted and must preempt each other as they grow.
    preemption_matches_alone(tiny_engine(6, 16, 8));
}

/// The same with a lossy (f16) cache and a recent window: a recompute rebuilds the window, so
/// every request still gets what it gets alone.
#[test]
fn preemption_rebuilds_the_recent_window() {
    preemption_matches_alone(tiny_engine_with(6, 16, 8, KvDtype::F16, 3));
}

fn preemption_matches_alone(mut e: Engine) {
    let reqs: Vec<Request> = (0..4).map(|i| request(i, 20, 40)).collect();
    let expected: Vec<GenerationOutput> = reqs.iter().map(|r| alone(&mut e, r)).collect();
    assert_eq!(e.preemptions(), 0, "a request alone fits");
    let ids: Vec<usize> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    let mut outputs = vec![None; ids.len()];
    let mut events = Vec::new();
    for _ in 0..1000 {
        if !e.has_work() {
            break;
        }
        e.step(&mut events).unwrap();
        assert_accounted(&e);
        assert_window_slots(&e);
        for (id, out) in e.take_finished() {
            outputs[ids.iter().position(|&i| i == id).unwrap()] = Some(out);
        }
    }
    assert!(e.preemptions() > 0, "the cache was meant to run out");
    for (i, (out, exp)) in outputs.iter().zip(&expected).enumerate() {
        let out = out.as_ref().expect("finished");
        assert_eq!(out.token_ids, exp.token_ids, "request {i}");
        assert_eq!(out.text, exp.text, "request {i}");
        assert_eq!(out.finish_reason, FinishReason::Length);
    }
    // Events carried every token once, despite the recomputation.
    for (i, id) in ids.iter().enumerate() {
        let tokens: Vec<u32> = events
            .iter()
            .filter(|ev| ev.request == *id)
            .map(|ev| ev.token)
            .collect();
        assert_eq!(tokens, expected[i].token_ids, "events of request {i}");
    }
    assert_eq!(e.free_blocks(), e.plan.num_blocks);
}

#[test]
fn cancelling_waiting_and_running_requests_frees_their_blocks() {
    let mut e = tiny_engine(8, 16, 2);
    let ids: Vec<usize> = (0..4)
        .map(|i| e.submit(request(i, 10, 30)).unwrap())
        .collect();
    let mut events = Vec::new();
    for _ in 0..3 {
        e.step(&mut events).unwrap();
    }
    assert_eq!(e.num_running(), 2, "max_batch_size");
    assert_eq!(e.num_waiting(), 2);
    assert!(e.free_blocks() < e.plan.num_blocks);
    assert!(e.cancel(ids[0]).unwrap(), "running");
    assert!(e.cancel(ids[3]).unwrap(), "waiting");
    assert!(!e.cancel(ids[3]).unwrap(), "already gone");
    assert!(!e.cancel(999).unwrap(), "never existed");
    assert_accounted(&e);
    events.clear();
    while e.has_work() {
        e.step(&mut events).unwrap();
        assert_accounted(&e);
    }
    let done: Vec<usize> = e.take_finished().into_iter().map(|(id, _)| id).collect();
    assert_eq!(done, vec![ids[1], ids[2]]);
    assert!(events
        .iter()
        .all(|ev| ev.request != ids[0] && ev.request != ids[3]));
    assert_eq!(e.free_blocks(), e.plan.num_blocks);
}

#[test]
fn random_traffic_with_cancellations_leaves_every_block_free() {
    let mut e = tiny_engine(10, 8, 4);
    let mut r = rng(42);
    let mut active: Vec<usize> = Vec::new();
    let mut events = Vec::new();
    for i in 0..300u64 {
        match r.random_range(0..10) {
            0..=2 => {
                let req = request(i, r.random_range(1..40), r.random_range(1..40));
                active.push(e.submit(req).unwrap());
            }
            3 if !active.is_empty() => {
                let id = active.swap_remove(r.random_range(0..active.len()));
                e.cancel(id).unwrap();
            }
            _ => {
                e.step(&mut events).unwrap();
                for (id, _) in e.take_finished() {
                    active.retain(|&a| a != id);
                }
            }
        }
        assert_accounted(&e);
    }
    while e.has_work() {
        e.step(&mut events).unwrap();
    }
    assert!(e.preemptions() > 0, "the traffic was meant to preempt");
    assert_eq!(e.free_blocks(), e.plan.num_blocks);
}

#[test]
fn first_come_first_served() {
    let mut e = tiny_engine(8, 16, 1);
    let a = e.submit(request(1, 5, 3)).unwrap();
    let b = e.submit(request(2, 5, 3)).unwrap();
    let mut events = Vec::new();
    while e.has_work() {
        e.step(&mut events).unwrap();
    }
    let order: Vec<usize> = events.iter().map(|ev| ev.request).collect();
    assert_eq!(order, vec![a, a, a, b, b, b]);
}

#[test]
fn chunked_prefill_caps_prompt_tokens_per_step_and_keeps_the_answer() {
    let mut e = tiny_engine(8, 16, 4);
    let req = request(3, 50, 5);
    let whole = alone(&mut e, &req);
    e.set_max_prefill_tokens(16);
    let id = e.submit(req).unwrap();
    let mut events = Vec::new();
    let mut steps = 0;
    while e.has_work() {
        let stats = e.step(&mut events).unwrap();
        assert!(stats.prefill_tokens <= 16, "{stats:?}");
        steps += 1;
    }
    assert_eq!(
        steps,
        4 + 4,
        "50 prompt tokens in 4 chunks, then 4 decode steps"
    );
    let (done, out) = e.take_finished().remove(0);
    assert_eq!(done, id);
    assert_eq!(out.token_ids, whole.token_ids);
}

#[test]
fn stop_strings_end_generation_and_are_trimmed() {
    let mut e = tiny_engine(8, 16, 4);
    let mut req = request(5, 6, 20);
    let full = alone(&mut e, &req);
    // The text of the 6th generated token, with its leading space.
    let stop = format!(" {}", e.tokenizer.id_to_token(full.token_ids[5]).unwrap());
    let at = full.text.find(&stop).unwrap();
    req.stop = vec![stop.clone()];
    let mut streamed = String::new();
    let out = e
        .generate(vec![req], &mut |ev| streamed.push_str(&ev.text))
        .unwrap()
        .remove(0);
    assert_eq!(
        out.text,
        &full.text[..at],
        "stop {stop:?} in {:?}",
        full.text
    );
    assert_eq!(streamed, out.text, "the stream never shows the stop string");
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert!(out.token_ids.len() <= 6);
    assert_eq!(out.completion_tokens, out.token_ids.len());
    assert_eq!(e.free_blocks(), e.plan.num_blocks);
}

#[test]
fn session_len_is_capped_by_the_cache_and_a_long_prompt_is_refused() {
    let mut e = tiny_engine(4, 16, 4);
    assert_eq!(e.limits().session_len, 64, "4 blocks of 16 tokens");
    let err = e.submit(request(1, 64, 1)).unwrap_err();
    assert!(
        matches!(&err, KvqError::InvalidArgument(m) if m.contains("session_len 64")),
        "{err}"
    );
    // A request that would outgrow the cache stops at the session length instead.
    let out = alone(&mut e, &request(1, 40, 100));
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(out.prompt_tokens + out.completion_tokens, 64);
}

/// Waits (bounded) until the engine thread reports every block free and nothing running.
fn wait_idle(h: &EngineHandle) -> super::EngineStats {
    let start = Instant::now();
    loop {
        let s = h.stats();
        if (s.free_blocks == s.total_blocks && s.running == 0 && s.waiting == 0)
            || start.elapsed() > Duration::from_secs(20)
        {
            return s;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_async_engine_streams_tokens_then_the_output() {
    let mut e = tiny_engine(12, 16, 8);
    let reqs: Vec<Request> = (0..6).map(|i| request(i, 12, 10)).collect();
    let expected: Vec<GenerationOutput> = reqs.iter().map(|r| alone(&mut e, r)).collect();
    let h = EngineHandle::spawn(e).unwrap();
    let outs = futures::executor::block_on(async {
        let streams = futures::future::join_all(reqs.iter().map(|r| h.submit(r.clone()))).await;
        futures::future::join_all(streams.into_iter().map(|s| async {
            let mut s = s.unwrap();
            let mut tokens = Vec::new();
            let mut text = String::new();
            while let Some(ev) = s.next().await {
                match ev.unwrap() {
                    EngineEvent::Token(t) => {
                        tokens.push(t.token);
                        text.push_str(&t.text);
                    }
                    EngineEvent::Finished(out) => return (tokens, text, out),
                }
            }
            panic!("stream ended without its output");
        }))
        .await
    });
    for ((tokens, text, out), exp) in outs.iter().zip(&expected) {
        assert_eq!(&out.token_ids, &exp.token_ids);
        assert_eq!(tokens, &exp.token_ids);
        assert_eq!(text, &exp.text);
    }
    let s = wait_idle(&h);
    assert_eq!(s.free_blocks, s.total_blocks);
    assert!(s.alive);
}

#[test]
fn dropping_a_stream_cancels_its_request_and_frees_its_blocks() {
    let h = EngineHandle::spawn(tiny_engine(12, 16, 8)).unwrap();
    futures::executor::block_on(async {
        let mut long = h.submit(request(1, 30, 90)).await.unwrap();
        let waiting = h.submit(request(2, 30, 90)).await.unwrap();
        for _ in 0..3 {
            assert!(matches!(
                long.next().await.unwrap().unwrap(),
                EngineEvent::Token(_)
            ));
        }
        assert!(h.stats().free_blocks < h.stats().total_blocks);
        drop(long);
        waiting.cancel();
    });
    let s = wait_idle(&h);
    assert_eq!((s.free_blocks, s.running, s.waiting), (12, 0, 0));
    // The engine goes on serving.
    let out = futures::executor::block_on(async {
        h.submit(request(3, 5, 4)).await.unwrap().output().await
    })
    .unwrap();
    assert_eq!(out.completion_tokens, 4);
}

/// `shutdown` waits for the engine thread only once no other handle is left, and then it
/// ends (the engine dropped with it).
#[test]
fn shutdown_waits_for_the_last_handle() {
    use std::time::Duration;
    let h = EngineHandle::spawn(tiny_engine(12, 16, 8)).unwrap();
    let other = h.clone();
    assert!(
        !h.shutdown(Duration::from_millis(30)),
        "another handle keeps it"
    );
    let out = futures::executor::block_on(async {
        other.submit(request(1, 5, 3)).await.unwrap().output().await
    })
    .unwrap();
    assert_eq!(out.completion_tokens, 3);
    assert!(other.stats().alive);
    assert!(other.shutdown(Duration::from_secs(20)));
}

#[test]
fn invalid_requests_are_refused_at_submit() {
    let h = EngineHandle::spawn(tiny_engine(4, 16, 8)).unwrap();
    let submit = |r: Request| futures::executor::block_on(h.submit(r)).map(|_| ());
    let e = submit(Request::default()).unwrap_err();
    assert!(e.to_string().contains("empty prompt"), "{e}");
    let e = submit(request(1, 64, 1)).unwrap_err();
    assert!(e.to_string().contains("session_len"), "{e}");
    let mut bad = request(1, 4, 1);
    bad.params.top_p = 0.0;
    let e = submit(bad).unwrap_err();
    assert!(e.to_string().contains("top_p"), "{e}");
    assert_eq!(h.stats().free_blocks, 4);
}

/// Runs `reqs` together step by step, checking block accounting after every step; returns
/// the outputs in order and, per request, the tokens each step emitted.
fn run_batch(e: &mut Engine, reqs: &[Request]) -> (Vec<GenerationOutput>, Vec<Vec<Vec<u32>>>) {
    let ids: Vec<usize> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    let mut outputs = vec![None; ids.len()];
    let mut steps = vec![Vec::new(); ids.len()];
    let mut events = Vec::new();
    while e.has_work() {
        events.clear();
        e.step(&mut events).unwrap();
        assert_accounted(e);
        for (k, id) in ids.iter().enumerate() {
            let run: Vec<u32> = events
                .iter()
                .filter(|ev| ev.request == *id)
                .map(|ev| ev.token)
                .collect();
            if !run.is_empty() {
                steps[k].push(run);
            }
        }
        for (id, out) in e.take_finished() {
            outputs[ids.iter().position(|&i| i == id).unwrap()] = Some(out);
        }
    }
    assert_eq!(
        e.free_blocks(),
        e.plan.num_blocks,
        "every block free at the end"
    );
    (outputs.into_iter().map(Option::unwrap).collect(), steps)
}

/// Prompts where n-gram drafts are often right (a repeated phrase) and often wrong (random
/// tokens, whose n-grams recur by chance with other continuations).
fn speculation_prompts() -> Vec<Request> {
    let mut reqs: Vec<Request> = (0..3)
        .map(|i| request(100 + i, 12 + 7 * i as usize, 40))
        .collect();
    let phrase = [10u32, 20, 30, 40, 50, 60];
    let mut rep = request(200, 1, 40);
    rep.prompt = phrase.iter().cycle().take(30).copied().collect();
    reqs.push(rep);
    let mut short = request(201, 1, 40);
    short.prompt = vec![7, 8, 7, 8, 7];
    reqs.push(short);
    reqs
}

#[test]
fn speculation_gives_the_tokens_of_plain_decoding_and_counts_acceptance() {
    let reqs = speculation_prompts();
    let mut plain = tiny_engine(40, 16, 8);
    let expected: Vec<GenerationOutput> = reqs.iter().map(|r| alone(&mut plain, r)).collect();
    assert_eq!(
        plain.speculation(),
        Default::default(),
        "speculation is off by default"
    );
    for k in [1, 4, 7] {
        let mut e = tiny_engine(40, 16, 8);
        e.set_num_speculative_tokens(k);
        let (outs, steps) = run_batch(&mut e, &reqs);
        for (i, (out, exp)) in outs.iter().zip(&expected).enumerate() {
            assert_eq!(out.token_ids, exp.token_ids, "k {k}, request {i}");
            assert_eq!(out.text, exp.text, "k {k}, request {i}");
            assert_eq!(out.finish_reason, exp.finish_reason);
            let streamed: Vec<u32> = steps[i].iter().flatten().copied().collect();
            assert_eq!(streamed, exp.token_ids, "events of request {i}");
            assert!(
                steps[i].iter().all(|s| s.len() <= k + 1),
                "at most k drafts + 1"
            );
        }
        let s = e.speculation();
        // Wrong drafts were scored and rejected, right ones kept, and the steps that kept
        // drafts emitted several tokens.
        assert!(s.accepted > 0 && s.accepted < s.drafted, "k {k}: {s:?}");
        let extra: usize = steps.iter().flatten().map(|s| s.len() - 1).sum();
        assert_eq!(
            extra as u64, s.accepted,
            "each kept draft is one extra token of a step"
        );
        println!("k {k}: {s:?}, rate {:.2}", s.acceptance_rate());
    }
}

#[test]
fn speculation_keeps_sampled_outputs_with_the_same_seed() {
    let mut reqs = speculation_prompts();
    for (i, r) in reqs.iter_mut().enumerate() {
        r.params.temperature = 0.7;
        r.params.top_k = 5;
        r.params.repetition_penalty = 1.1;
        r.params.seed = 11 + i as u64;
    }
    let mut plain = tiny_engine(40, 16, 8);
    let expected: Vec<GenerationOutput> = reqs.iter().map(|r| alone(&mut plain, r)).collect();
    let mut e = tiny_engine(40, 16, 8);
    e.set_num_speculative_tokens(4);
    let (outs, _) = run_batch(&mut e, &reqs);
    for (i, (out, exp)) in outs.iter().zip(&expected).enumerate() {
        assert_eq!(out.token_ids, exp.token_ids, "request {i}");
    }
    assert!(e.speculation().drafted > 0);
}

#[test]
fn rejected_drafts_give_their_blocks_back() {
    // Blocks of 4 tokens: 7 drafts span two blocks past the last token.
    let mut e = tiny_engine(64, 4, 4);
    e.set_num_speculative_tokens(7);
    let reqs = speculation_prompts();
    let ids: Vec<usize> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    let mut events = Vec::new();
    let mut saw_rejection = false;
    while e.has_work() {
        let stats = e.step(&mut events).unwrap();
        assert_accounted(&e);
        saw_rejection |= stats.accepted < stats.drafted;
        // Between steps no sequence holds blocks past its tokens and the one after them
        // (what admission reserves): rejected drafts' blocks went back.
        for (tokens, blocks) in e.sched.running_lengths() {
            assert!(
                blocks <= (tokens + 1).div_ceil(4),
                "{blocks} blocks for {tokens} tokens"
            );
        }
        e.take_finished();
    }
    assert!(saw_rejection);
    assert_eq!(ids.len(), 5);
    assert_eq!(e.free_blocks(), e.plan.num_blocks);
}

/// A token emitted inside an accepted run (not the first of a multi-token step) that does
/// not occur earlier in the output: where stopping on it must cut the run.
fn token_inside_an_accepted_run(steps: &[Vec<u32>]) -> Option<(usize, u32)> {
    let mut at = 0;
    let mut seen = std::collections::HashSet::new();
    for s in steps {
        for (j, &t) in s.iter().enumerate() {
            if j > 0 && !seen.contains(&t) {
                return Some((at, t));
            }
            seen.insert(t);
            at += 1;
        }
    }
    None
}

#[test]
fn stop_tokens_stop_strings_and_max_new_tokens_end_an_accepted_run() {
    let reqs = speculation_prompts();
    let mut spec = tiny_engine(40, 16, 8);
    spec.set_num_speculative_tokens(6);
    let (outs, steps) = run_batch(&mut spec, &reqs);
    let mut plain = tiny_engine(40, 16, 8);
    let mut checked = 0;
    for (i, r) in reqs.iter().enumerate() {
        let Some((at, token)) = token_inside_an_accepted_run(&steps[i]) else {
            continue;
        };
        // A stop token in the middle of an accepted run ends generation there.
        let mut stop = r.clone();
        stop.stop_ids = vec![token];
        let exp = alone(&mut plain, &stop);
        let (got, got_steps) = run_batch(&mut spec, std::slice::from_ref(&stop));
        assert_eq!(got[0].token_ids, exp.token_ids, "request {i}");
        assert_eq!(got[0].token_ids, outs[i].token_ids[..at], "request {i}");
        assert_eq!(got[0].finish_reason, FinishReason::Stop);
        assert_eq!(got[0].completion_tokens, at + 1);
        let streamed: Vec<u32> = got_steps[0].iter().flatten().copied().collect();
        assert_eq!(
            streamed,
            outs[i].token_ids[..=at],
            "nothing after the stop token"
        );
        // So does a stop string made of that token's text: the answer is the one plain
        // decoding gives, cut before it.
        let mut stop_text = r.clone();
        stop_text.stop = vec![format!(" {}", spec.tokenizer.id_to_token(token).unwrap())];
        let exp = alone(&mut plain, &stop_text);
        let (got, _) = run_batch(&mut spec, std::slice::from_ref(&stop_text));
        assert_eq!(got[0].token_ids, exp.token_ids, "request {i}");
        assert_eq!(got[0].text, exp.text, "request {i}");
        assert_eq!(got[0].finish_reason, FinishReason::Stop);
        assert!(got[0].token_ids.len() <= at + 1);
        // So does max_new_tokens.
        let mut short = r.clone();
        short.params.max_new_tokens = at + 1;
        let (got, _) = run_batch(&mut spec, std::slice::from_ref(&short));
        assert_eq!(got[0].token_ids, outs[i].token_ids[..=at], "request {i}");
        assert_eq!(got[0].finish_reason, FinishReason::Length);
        checked += 1;
    }
    assert!(checked >= 2, "accepted runs to cut: {checked}");
}

#[test]
fn speculation_near_the_session_length_stops_there() {
    let mut e = tiny_engine(4, 16, 4);
    let mut plain = tiny_engine(4, 16, 4);
    let mut r = request(1, 1, 100);
    r.prompt = [1u32, 2, 3, 4].iter().cycle().take(41).copied().collect();
    let exp = alone(&mut plain, &r);
    e.set_num_speculative_tokens(16);
    let (got, _) = run_batch(&mut e, std::slice::from_ref(&r));
    assert_eq!(got[0].token_ids, exp.token_ids);
    assert_eq!(got[0].prompt_tokens + got[0].completion_tokens, 64);
    assert_eq!(got[0].finish_reason, FinishReason::Length);
}

/// A runner that picks greedy tokens itself (as the GPU runner does on the device), has one
/// product path, and counts the calls that returned tokens rather than logits.
struct PicksGreedy {
    model: crate::model::LlamaModel,
    greedy_calls: Arc<std::sync::atomic::AtomicUsize>,
}

impl crate::model::ForwardPass for PicksGreedy {
    fn spec(&self) -> &crate::ModelSpec {
        &self.model.spec
    }

    fn forward_rows(
        &mut self,
        backend: &dyn AttentionBackend,
        cache: &mut crate::cache::PagedKvCache,
        seqs: &[crate::model::SeqInput<'_>],
        logit_rows: &[usize],
        _layers: crate::ops::linear::Path,
        _head: crate::ops::linear::Path,
    ) -> Result<Vec<f32>, KvqError> {
        let int = crate::ops::linear::Path::Int(crate::ops::linear::Kernel::best());
        self.model
            .forward_rows(backend, cache, seqs, logit_rows, int, int)
    }

    fn forward_rows_greedy(
        &mut self,
        backend: &dyn AttentionBackend,
        cache: &mut crate::cache::PagedKvCache,
        seqs: &[crate::model::SeqInput<'_>],
        logit_rows: &[usize],
    ) -> Option<Result<Vec<u32>, KvqError>> {
        self.greedy_calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let int = crate::ops::linear::Path::Int(crate::ops::linear::Kernel::best());
        let vocab = self.model.spec.vocab_size;
        Some(
            self.forward_rows(backend, cache, seqs, logit_rows, int, int)
                .map(|l| l.chunks_exact(vocab).map(crate::sampling::argmax).collect()),
        )
    }

    fn path_dependent(&self) -> bool {
        false
    }
}

#[test]
fn a_runner_that_picks_greedy_tokens_gives_the_host_samplers_tokens() {
    let sampled = |seed| {
        let mut r = request(seed, 9, 6);
        r.params.temperature = 0.8;
        r.params.seed = seed;
        r
    };
    let greedy: Vec<Request> = (0..3)
        .map(|i| request(40 + i, 5 + 7 * i as usize, 6))
        .collect();
    let mixed = vec![greedy[0].clone(), sampled(7), greedy[2].clone()];
    let mut host = tiny_engine(64, 4, 8);
    let mut picks = tiny_engine(64, 4, 8);
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let spec = tiny_spec(true);
    let runner = PicksGreedy {
        model: load_llama(&InMemory(random_weights(&spec, 7)), &spec).unwrap(),
        greedy_calls: calls.clone(),
    };
    picks.set_runner(Box::new(runner), "greedy-picking test runner");
    let count = || calls.load(std::sync::atomic::Ordering::Relaxed);
    for reqs in [&greedy, &mixed, &vec![sampled(8), sampled(9)]] {
        let before = count();
        let want = host.generate(reqs.clone(), &mut |_| {}).unwrap();
        let got = picks.generate(reqs.clone(), &mut |_| {}).unwrap();
        let ids =
            |o: &[GenerationOutput]| o.iter().map(|g| g.token_ids.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&got), ids(&want));
        let all_greedy = reqs.iter().all(|r| r.params.temperature == 0.0);
        assert_eq!(
            count() > before,
            all_greedy,
            "greedy calls only for all-greedy batches"
        );
        assert_accounted(&picks);
    }
}

#[test]
fn tensor_parallel_configs_are_refused_on_the_cpu() {
    let spec = tiny_spec(true);
    let model = load_llama(&InMemory(random_weights(&spec, 7)), &spec).unwrap();
    let dir = TempDir::new("engine-tp");
    write_tiny_tokenizer(dir.path());
    let tokenizer = Tokenizer::from_path(dir.path()).unwrap();
    let mut config = EngineConfig::default();
    config.engine.tp = 2;
    let err = Engine::from_model(&config, spec, model, tokenizer)
        .err()
        .expect("tp = 2 refused")
        .to_string();
    assert!(
        err.contains("tp = 2") && err.contains("device = \"cuda\""),
        "{err}"
    );
}

/// Log-probabilities ride along without changing the tokens: one per generated token (the
/// same in the events and the output), the greedy token the most likely of its top list, and
/// a preempted request reports the same ones as when it runs alone.
#[test]
fn logprobs_follow_every_generated_token() {
    let mut e = tiny_engine(6, 16, 8);
    let plain: Vec<Request> = (0..3).map(|i| request(60 + i, 20, 40)).collect();
    let with_lp: Vec<Request> = plain
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.params.logprobs = Some(3);
            r
        })
        .collect();
    let want: Vec<GenerationOutput> = with_lp.iter().map(|r| alone(&mut e, r)).collect();
    let mut streamed = vec![Vec::new(); 3];
    // Three requests of 60 tokens in 6 blocks of 16: they preempt each other.
    let got = e
        .generate(with_lp.clone(), &mut |ev| {
            streamed[ev.request].push(ev.logprobs.clone().expect("asked for logprobs"))
        })
        .unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let lps = g.logprobs.as_ref().expect("output logprobs");
        assert_eq!(g.token_ids, alone(&mut e, &plain[i]).token_ids);
        assert_eq!(g.token_ids, w.token_ids);
        assert_eq!(lps.len(), g.completion_tokens);
        assert_eq!(&streamed[i], lps);
        for (lp, w) in lps.iter().zip(w.logprobs.as_ref().unwrap()) {
            assert!((lp.logprob - w.logprob).abs() < 1e-4, "{lp:?} vs {w:?}");
        }
        for (lp, &t) in lps.iter().zip(&g.token_ids) {
            assert_eq!(lp.token, t);
            assert_eq!(lp.top.len(), 3);
            assert_eq!(
                lp.top[0].1, lp.logprob,
                "greedy takes the most likely token"
            );
            assert!(lp.logprob.is_finite() && lp.logprob <= 0.0);
            assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
        }
    }
    assert!(plain.iter().all(|r| alone(&mut e, r).logprobs.is_none()));
    assert_accounted(&e);
}

/// Prompt log-probabilities equal the log-softmax of a one-pass teacher-forced forward over
/// the prompt, with chunked prefill and with requests preempting each other mid-prompt.
#[test]
fn prompt_logprobs_match_a_teacher_forced_pass() {
    use crate::model::hf_dir_tests::logits_in_chunks;
    use crate::sampling::TokenLogprobs;
    let spec = tiny_spec(true);
    let model = load_llama(&InMemory(random_weights(&spec, 7)), &spec).unwrap();
    let mut e = tiny_engine(6, 16, 8);
    e.set_max_prefill_tokens(16);
    let reqs: Vec<Request> = [(70, 30), (71, 45), (72, 20)]
        .into_iter()
        .map(|(seed, len)| {
            let mut r = request(seed, len, 12);
            r.params.prompt_logprobs = Some(2);
            r
        })
        .collect();
    // The first token's event carries the prompt's log-probabilities, later ones none.
    let mut on_events = vec![Vec::new(); reqs.len()];
    let outs = e
        .generate(reqs.clone(), &mut |ev| {
            on_events[ev.request].push(ev.prompt_logprobs.clone())
        })
        .unwrap();
    for ((r, out), events) in reqs.iter().zip(&outs).zip(&on_events) {
        let got = out
            .prompt_logprobs
            .as_ref()
            .expect("asked for prompt logprobs");
        assert_eq!(events[0].as_ref(), Some(got));
        assert!(events[1..].iter().all(Option::is_none));
        assert_eq!(got.len(), r.prompt.len() - 1);
        let reference = logits_in_chunks(&model, &r.prompt, &[r.prompt.len()], KvDtype::F32, 0);
        let vocab = spec.vocab_size;
        for (i, lp) in got.iter().enumerate() {
            let row = &reference[i * vocab..(i + 1) * vocab];
            let want = TokenLogprobs::from_logits(row, r.prompt[i + 1], 2);
            assert_eq!(lp.token, r.prompt[i + 1]);
            assert!(
                (lp.logprob - want.logprob).abs() < 1e-4,
                "{i}: {lp:?} vs {want:?}"
            );
            assert_eq!(lp.top.len(), 2);
            for (a, b) in lp.top.iter().zip(&want.top) {
                assert!((a.1 - b.1).abs() < 1e-4, "{i}: {lp:?} vs {want:?}");
            }
        }
        // The generated tokens are what the request gets without prompt scoring.
        let mut plain = r.clone();
        plain.params.prompt_logprobs = None;
        let alone = alone(&mut e, &plain);
        assert_eq!(out.token_ids, alone.token_ids);
        assert!(alone.prompt_logprobs.is_none());
    }
    assert!(
        e.preemptions() > 0,
        "the cache was meant to force preemption"
    );
    assert_accounted(&e);
}

/// Requests of prompts that share a prefix of `shared` tokens, then 3 tokens of their own.
fn requests_sharing_a_prefix(shared: usize, count: u64, new_tokens: usize) -> Vec<Request> {
    let prefix = request(90, shared, new_tokens).prompt;
    (0..count)
        .map(|i| {
            let mut r = request(100 + i, 3, new_tokens);
            r.prompt = [prefix.clone(), r.prompt].concat();
            r
        })
        .collect()
}

/// Runs `reqs` one after another; returns the outputs and the prompt tokens computed.
fn one_by_one(e: &mut Engine, reqs: &[Request]) -> (Vec<GenerationOutput>, usize) {
    let mut prefilled = 0;
    let outs = reqs
        .iter()
        .map(|r| {
            let id = e.submit(r.clone()).unwrap();
            let mut events = Vec::new();
            loop {
                prefilled += e.step(&mut events).unwrap().prefill_tokens;
                if let Some((_, out)) = e.take_finished().into_iter().find(|(i, _)| *i == id) {
                    return out;
                }
            }
        })
        .collect();
    (outs, prefilled)
}

/// With prefix caching a request whose prompt starts like an earlier one's computes only the
/// blocks after the common full blocks, and gets the same tokens as without the cache (f32
/// weights: every path computes the same K/V), over an f32 and an f16 cache.
#[test]
fn prefix_caching_skips_shared_blocks_and_keeps_the_tokens() {
    for dtype in [KvDtype::F32, KvDtype::F16] {
        let reqs = requests_sharing_a_prefix(40, 3, 8);
        let (want, plain_prefill) = one_by_one(&mut tiny_engine_with(12, 16, 8, dtype, 0), &reqs);
        let mut e = tiny_engine_caching_prefixes(12, dtype);
        let (got, cached_prefill) = one_by_one(&mut e, &reqs);
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.token_ids, w.token_ids, "{dtype:?}");
        }
        // 43-token prompts: the first computes all of them, the others skip two full blocks.
        assert_eq!(plain_prefill, 3 * 43);
        assert_eq!(cached_prefill, 43 + 2 * (43 - 32));
        assert_eq!(e.prefix_hit_tokens(), 2 * 32);
        // 51 tokens each, 50 with K/V: the two shared blocks stay cached, and each request's
        // own full third block too.
        assert_eq!(e.pool.num_cached_idle(), 2 + 3);
        assert_accounted(&e);
    }
}

/// Concurrent requests sharing a prefix in a cache too small for all of them: shared blocks,
/// preemption and eviction of idle cached blocks leave every block accounted for, and each
/// request gets the tokens it gets alone without the cache.
#[test]
fn prefix_caching_survives_preemption_and_eviction() {
    let mut e = tiny_engine_caching_prefixes(8, KvDtype::F32);
    let mut plain = tiny_engine(8, 16, 8);
    let mut reqs = requests_sharing_a_prefix(33, 4, 30);
    reqs.extend(requests_sharing_a_prefix(20, 2, 30));
    let want: Vec<_> = reqs
        .iter()
        .map(|r| alone(&mut plain, r).token_ids)
        .collect();
    for round in 0..2 {
        let got = e.generate(reqs.clone(), &mut |_| {}).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(&g.token_ids, w, "round {round} request {i}");
        }
        assert_accounted(&e);
    }
    assert!(
        e.preemptions() > 0,
        "the cache was meant to force preemption"
    );
    assert_eq!(e.free_blocks(), 8);
}
