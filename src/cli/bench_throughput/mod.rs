//! `kvq bench throughput`: serving throughput and latency per KV policy, in the manner of
//! LMDeploy's `profile_throughput.py`. A seeded workload of requests (ShareGPT-shaped lengths,
//! random token ids, EOS ignored so every output has its drawn length) is sent through the
//! async engine handle `kvq serve` uses, either closed-loop (`--concurrency C` requests in
//! flight) or open-loop (Poisson arrivals at `--request-rate R`); every token event is
//! timestamped. With a fixed `--cache-memory-gib`, the fp16 cache holds fewer sequences than
//! the quantized ones, which shows up as preemptions, fewer sequences running at once and
//! lower throughput.

mod metrics;
mod workload;

use clap::Args;
use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kvq::engine::{available_memory_bytes, Engine, EngineEvent, EngineHandle, EngineInfo, Request};
use kvq::loader::Tokenizer;
use kvq::model::{check_fits_in_memory, model_shape, random_llama_for, HostWeights};
use kvq::plan::ResolvedConfig;
use kvq::sampling::SamplingParams;
use kvq::{EngineConfig, KvqError, ModelSpec};

use super::args::EngineArgs;
use metrics::{latencies, RequestTrace, Summary};
use workload::{draw_jobs, poisson_arrivals, Job, LengthDistribution};

#[derive(Args, Debug)]
#[command(
    after_help = "Workload: prompt and output lengths are log-normal with means \
    161.31 and 337.99 tokens (ShareGPT's averages as published with vLLM) and shape sigma \
    (--length-sigma, default 1.0, a modelling choice), multiplied by --length-scale, at least \
    1, the prompt clipped to half of --session-len and prompt + output to --session-len. \
    Prompt ids are uniform over [100, vocab). Outputs ignore EOS, so each request generates \
    exactly its drawn length. TTFT: submit to first token; TPOT: (last - first token) / \
    (tokens - 1); ITL: every gap between consecutive token events (tokens verified together \
    by speculative decoding arrive together, gap 0)."
)]
pub struct ThroughputBenchArgs {
    /// Configurations as BACKEND:POLICY, comma-separated (default: pytorch 0, 8, 4, 42).
    #[arg(long = "configs", value_delimiter = ',')]
    pub configs: Vec<String>,
    /// Requests per configuration.
    #[arg(long = "num-prompts", default_value_t = 64)]
    pub num_prompts: usize,
    /// Seed of the lengths, prompts and arrival times (the same for every configuration).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Closed loop: this many requests in flight, a new one sent as one finishes (default:
    /// all of them at once unless --request-rate is given).
    #[arg(long, conflicts_with = "request_rate")]
    pub concurrency: Option<usize>,
    /// Open loop: requests arrive as a Poisson process of this many per second.
    #[arg(long = "request-rate")]
    pub request_rate: Option<f64>,
    /// Mean prompt length before scaling (tokens).
    #[arg(long = "input-mean", default_value_t = workload::SHAREGPT_INPUT_MEAN)]
    pub input_mean: f64,
    /// Mean output length before scaling (tokens).
    #[arg(long = "output-mean", default_value_t = workload::SHAREGPT_OUTPUT_MEAN)]
    pub output_mean: f64,
    /// Log-normal shape of both lengths.
    #[arg(long = "length-sigma", default_value_t = workload::DEFAULT_SIGMA)]
    pub length_sigma: f64,
    /// Multiplies every drawn length (e.g. 0.25 for a CPU-sized run of the same shape).
    #[arg(long = "length-scale", default_value_t = 1.0)]
    pub length_scale: f64,
    /// Every prompt starts with the same this many random tokens (a shared system prompt)
    /// before its drawn length; measure prefix caching with `,prefix-caching` in --configs.
    #[arg(long = "prefix-len", default_value_t = 0)]
    pub prefix_len: usize,
    /// CPU threads (default: RAYON_NUM_THREADS, else every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Instead of --model, a model of this shape ("llama3-8b", "llama3-70b", "smollm2-135m")
    /// with seeded random weights, f32 for the CPU and f16 for a GPU (needs --random-weights);
    /// refused when the weights would not fit in memory.
    #[arg(long = "model-shape", requires = "random_weights")]
    pub model_shape: Option<String>,
    /// Random weights (seeded by --seed) of --model-shape.
    #[arg(long = "random-weights", requires = "model_shape")]
    pub random_weights: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Builds the engine of one configuration: the model file, or random weights of a shape.
fn build_engine(cfg: &EngineConfig, a: &ThroughputBenchArgs) -> Result<Engine, KvqError> {
    let Some(shape) = &a.model_shape else {
        return Engine::load(cfg, &mut |_| {});
    };
    let spec = model_shape(shape)?;
    let host = HostWeights::for_device(cfg.device()?);
    check_fits_in_memory(&spec, available_memory_bytes(), host)?;
    let model = random_llama_for(&spec, a.seed, host)?;
    let tokenizer = Tokenizer::synthetic(spec.vocab_size)?;
    Engine::from_model(cfg, spec, model, tokenizer)
}

const DEFAULT_CONFIGS: [&str; 4] = ["pytorch:0", "pytorch:8", "pytorch:4", "pytorch:42"];

/// Session length when neither the config nor --session-len sets one below the default.
const DEFAULT_SESSION_LEN: usize = 2048;

/// One configuration's results.
#[derive(Debug, serde::Serialize)]
struct Row {
    backend: String,
    policy: Option<u32>,
    codec: String,
    tp: usize,
    num_blocks: usize,
    block_size: usize,
    token_capacity: usize,
    ratio_to_fp16: f64,
    session_len: usize,
    completed: usize,
    duration_s: f64,
    requests_per_s: f64,
    input_tok_s: f64,
    output_tok_s: f64,
    ttft_ms: Summary,
    tpot_ms: Summary,
    itl_ms: Summary,
    preemptions: u64,
    /// Prompt tokens found in the prefix cache (with `,prefix-caching`).
    prefix_hit_tokens: u64,
    /// Most requests running at once (sampled at every token event).
    peak_running: usize,
    speculative: Speculative,
}

#[derive(Debug, serde::Serialize)]
struct Speculative {
    num_draft_tokens: usize,
    drafted: u64,
    accepted: u64,
    acceptance_rate: f64,
}

pub fn run(a: ThroughputBenchArgs) -> Result<(), KvqError> {
    if let Some(n) = a.threads {
        kvq::ops::init_threads(n)?;
    }
    if a.num_prompts == 0 || a.concurrency == Some(0) {
        return Err(KvqError::InvalidArgument(
            "--num-prompts and --concurrency must be at least 1".into(),
        ));
    }
    if let Some(r) = a.request_rate {
        if !(r > 0.0 && r.is_finite()) {
            return Err(KvqError::InvalidArgument(format!(
                "--request-rate must be a positive number, got {r}"
            )));
        }
    }
    let mut base = a.engine.load()?;
    if let Some(shape) = &a.model_shape {
        // Refuse before any configuration is built.
        let host = HostWeights::for_device(base.device()?);
        check_fits_in_memory(&model_shape(shape)?, available_memory_bytes(), host)?;
    }
    if a.engine.session_len.is_none() {
        base.engine.session_len = base.engine.session_len.min(DEFAULT_SESSION_LEN);
    }
    let (specs, configs) = super::config_list::parse_configs(&base, &a.configs, &DEFAULT_CONFIGS)?;
    // Refuse a configuration its backend cannot run (e.g. speculation with pytorch policy
    // 42) before any of them runs.
    let spec = match &a.model_shape {
        Some(shape) => model_shape(shape)?,
        None => ModelSpec::from_path(std::path::Path::new(&base.model.path))?,
    };
    for (name, cfg) in specs.iter().zip(&configs) {
        ResolvedConfig::new(&spec, cfg)
            .map_err(|e| KvqError::InvalidArgument(format!("--configs {name}: {e}")))?;
    }
    let dist = LengthDistribution {
        input_mean: a.input_mean,
        output_mean: a.output_mean,
        sigma: a.length_sigma,
        scale: a.length_scale,
        session_len: base.engine.session_len,
        prefix_len: a.prefix_len,
    };
    let mut jobs: Option<Vec<Job>> = None;
    let mut rows = Vec::new();
    for (spec, cfg) in specs.iter().zip(&configs) {
        let engine = build_engine(cfg, &a)?;
        let jobs = match &jobs {
            Some(j) => j,
            None => jobs.insert(draw_jobs(
                &dist,
                a.num_prompts,
                engine.spec.vocab_size,
                a.seed,
            )?),
        };
        if !a.json {
            eprintln!("{spec}: {}", engine.summary());
        }
        let row = run_config(engine, jobs, &a)?;
        if !a.json {
            // Each result as soon as it is measured, so a long run interrupted keeps them.
            eprintln!("{spec}: {}", serde_json::to_string(&row).expect("json"));
        }
        rows.push(row);
    }
    let jobs = jobs.expect("at least one configuration");
    let input_total: usize = jobs.iter().map(|j| j.prompt.len()).sum();
    let output_total: usize = jobs.iter().map(|j| j.output_len).sum();
    let (mode, mode_text) = match a.request_rate {
        Some(r) => (
            serde_json::json!({ "request_rate": r }),
            format!("Poisson arrivals at {r} requests/s"),
        ),
        None => {
            let c = a.concurrency.unwrap_or(a.num_prompts);
            (
                serde_json::json!({ "concurrency": c }),
                format!("closed loop of {c} in flight"),
            )
        }
    };
    if a.json {
        let j = serde_json::json!({
            "model": a.model_shape.as_ref().map_or(base.model.path.clone(), |s| {
                format!("{s} (random weights, seed {})", a.seed)
            }),
            "num_prompts": a.num_prompts,
            "seed": a.seed,
            "mode": mode,
            "threads": kvq::ops::num_threads(),
            "cache_memory_gib": base.engine.cache_memory_gib,
            "distribution": dist,
            "input_tokens": input_total,
            "output_tokens": output_total,
            "configs": rows,
        });
        println!("{}", serde_json::to_string_pretty(&j).expect("json"));
        return Ok(());
    }
    println!(
        "kvq bench throughput: {} requests ({input_total} prompt + {output_total} output tokens, \
         seed {}), {mode_text}, {} threads, cache budget {}",
        a.num_prompts,
        a.seed,
        kvq::ops::num_threads(),
        base.engine
            .cache_memory_gib
            .map_or("planned from free memory".to_string(), |g| format!(
                "{g} GiB"
            )),
    );
    print_table(&rows);
    Ok(())
}

/// Runs the workload on one engine (after a short warm-up request) and measures it.
fn run_config(engine: Engine, jobs: &[Job], a: &ThroughputBenchArgs) -> Result<Row, KvqError> {
    let session_len = engine.limits().session_len;
    if let Some(j) = jobs
        .iter()
        .find(|j| j.prompt.len() + j.output_len > session_len)
    {
        return Err(KvqError::InvalidArgument(format!(
            "a request of {} + {} tokens does not fit this cache's session of {session_len} \
             tokens; give the cache more memory (--cache-memory-gib) or lower --session-len",
            j.prompt.len(),
            j.output_len
        )));
    }
    let handle = EngineHandle::spawn(engine)?;
    let info = handle.info().clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|source| KvqError::Io {
            path: "tokio runtime".into(),
            source,
        })?;
    let row = runtime.block_on(async {
        let warm = Job {
            prompt: jobs[0].prompt.iter().take(8).copied().collect(),
            output_len: 2,
        };
        run_one(&handle, &warm, &Cell::new(0)).await?;
        let before = handle.stats();
        let peak = Cell::new(0);
        let start = Instant::now();
        let traces = match a.request_rate {
            Some(rate) => open_loop(&handle, jobs, rate, a.seed, &peak).await?,
            None => closed_loop(&handle, jobs, a.concurrency.unwrap_or(jobs.len()), &peak).await?,
        };
        let end = traces
            .iter()
            .filter_map(|t| t.tokens.last().copied())
            .max()
            .unwrap_or(start);
        let after = handle.stats();
        Ok(summarize(
            &info,
            jobs,
            &traces,
            end - start,
            before,
            after,
            peak.get(),
        ))
    });
    // The next configuration's engine needs this one's memory (a 70B model's weights).
    if !handle.shutdown(ENGINE_STOP_TIMEOUT) {
        eprintln!("warning: the engine thread did not stop within {ENGINE_STOP_TIMEOUT:?}");
    }
    row
}

/// How long a finished configuration's engine may take to stop and free its memory.
const ENGINE_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// Submits one request and records when each of its tokens arrived.
async fn run_one(
    handle: &EngineHandle,
    job: &Job,
    peak: &Cell<usize>,
) -> Result<RequestTrace, KvqError> {
    let req = Request {
        prompt: job.prompt.clone(),
        params: SamplingParams {
            max_new_tokens: job.output_len,
            ignore_eos: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let submitted = Instant::now();
    let mut stream = handle.submit(req).await?;
    let mut tokens = Vec::with_capacity(job.output_len);
    while let Some(ev) = stream.next().await {
        match ev? {
            EngineEvent::Token(_) => {
                tokens.push(Instant::now());
                peak.set(peak.get().max(handle.stats().running));
            }
            EngineEvent::Finished(out) => {
                if out.completion_tokens != job.output_len {
                    return Err(KvqError::Engine(format!(
                        "a request generated {} tokens instead of {}",
                        out.completion_tokens, job.output_len
                    )));
                }
                break;
            }
        }
    }
    Ok(RequestTrace {
        submitted,
        tokens,
        prompt_len: job.prompt.len(),
    })
}

/// `concurrency` workers, each sending the next request as soon as its previous one ends.
async fn closed_loop(
    handle: &EngineHandle,
    jobs: &[Job],
    concurrency: usize,
    peak: &Cell<usize>,
) -> Result<Vec<RequestTrace>, KvqError> {
    let next = Cell::new(0usize);
    let traces = RefCell::new(Vec::with_capacity(jobs.len()));
    let worker = || async {
        loop {
            let i = next.get();
            if i >= jobs.len() {
                return Ok::<(), KvqError>(());
            }
            next.set(i + 1);
            let t = run_one(handle, &jobs[i], peak).await?;
            traces.borrow_mut().push(t);
        }
    };
    let workers: Vec<_> = (0..concurrency.min(jobs.len())).map(|_| worker()).collect();
    for r in futures::future::join_all(workers).await {
        r?;
    }
    Ok(traces.into_inner())
}

/// Every request sent at its Poisson arrival time, however many are in flight.
async fn open_loop(
    handle: &EngineHandle,
    jobs: &[Job],
    rate: f64,
    seed: u64,
    peak: &Cell<usize>,
) -> Result<Vec<RequestTrace>, KvqError> {
    let start = tokio::time::Instant::now();
    let arrivals = poisson_arrivals(jobs.len(), rate, seed);
    let tasks = jobs.iter().zip(arrivals).map(|(job, at)| async move {
        tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
        run_one(handle, job, peak).await
    });
    futures::future::join_all(tasks).await.into_iter().collect()
}

fn summarize(
    info: &EngineInfo,
    jobs: &[Job],
    traces: &[RequestTrace],
    duration: Duration,
    before: kvq::engine::EngineStats,
    after: kvq::engine::EngineStats,
    peak_running: usize,
) -> Row {
    let secs = duration.as_secs_f64().max(1e-9);
    let (ttft, tpot, itl) = latencies(traces);
    let input: usize = traces.iter().map(|t| t.prompt_len).sum();
    let output: usize = traces.iter().map(|t| t.tokens.len()).sum();
    let drafted = after.spec_drafted - before.spec_drafted;
    let accepted = after.spec_accepted - before.spec_accepted;
    Row {
        backend: info.backend.clone(),
        policy: info.policy,
        codec: info.codec.clone(),
        tp: info.tp,
        num_blocks: info.num_blocks,
        block_size: info.block_size,
        token_capacity: info.token_capacity,
        ratio_to_fp16: info.ratio_to_fp16,
        session_len: info.session_len,
        completed: traces.len().min(jobs.len()),
        duration_s: secs,
        requests_per_s: traces.len() as f64 / secs,
        input_tok_s: input as f64 / secs,
        output_tok_s: output as f64 / secs,
        ttft_ms: ttft,
        tpot_ms: tpot,
        itl_ms: itl,
        preemptions: after.preemptions - before.preemptions,
        prefix_hit_tokens: after.prefix_hit_tokens - before.prefix_hit_tokens,
        peak_running,
        speculative: Speculative {
            num_draft_tokens: info.num_speculative_tokens,
            drafted,
            accepted,
            acceptance_rate: if drafted == 0 {
                0.0
            } else {
                accepted as f64 / drafted as f64
            },
        },
    }
}

/// The results as a table: one line per configuration.
fn print_table(rows: &[Row]) {
    println!(
        "{:<10} {:>6} {:<12} {:>3} {:>7} {:>9} {:>6} {:>8} {:>9} {:>9} {:>22} {:>22} {:>22} {:>5} {:>7} {:>10} {:>11}",
        "backend", "policy", "codec", "tp", "blocks", "tokens", "x fp16", "req/s", "in tok/s",
        "out tok/s", "TTFT ms mean/p50/p99", "TPOT ms mean/p50/p99", "ITL ms mean/p50/p99",
        "peak", "preempt", "prefix hit", "spec acc"
    );
    let lat = |s: &Summary| format!("{:.0}/{:.0}/{:.0}", s.mean, s.p50, s.p99);
    for r in rows {
        let spec = if r.speculative.num_draft_tokens == 0 {
            "-".to_string()
        } else {
            format!(
                "{}/{} {:.0}%",
                r.speculative.accepted,
                r.speculative.drafted,
                100.0 * r.speculative.acceptance_rate
            )
        };
        println!(
            "{:<10} {:>6} {:<12} {:>3} {:>7} {:>9} {:>6.2} {:>8.2} {:>9.1} {:>9.1} {:>22} {:>22} {:>22} {:>5} {:>7} {:>10} {:>11}",
            r.backend,
            r.policy.map_or("-".into(), |p| p.to_string()),
            r.codec,
            r.tp,
            r.num_blocks,
            r.token_capacity,
            r.ratio_to_fp16,
            r.requests_per_s,
            r.input_tok_s,
            r.output_tok_s,
            lat(&r.ttft_ms),
            lat(&r.tpot_ms),
            lat(&r.itl_ms),
            r.peak_running,
            r.preemptions,
            r.prefix_hit_tokens,
            spec
        );
    }
}
