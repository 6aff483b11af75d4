//! `kvq bench generate`: prefill and decode speed of every KV policy on one prompt, optionally
//! side by side with llama.cpp (through `bench/llamacpp_generate.py`) in the same run; the
//! other `kvq bench` subcommands live in their own modules.

use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::time::Instant;

use kvq::engine::{Engine, Request, TokenEvent};
use kvq::sampling::SamplingParams;
use kvq::KvqError;

use super::args::EngineArgs;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Prefill and greedy decode tokens/s per KV policy (prompt cut from a text file).
    Generate(Box<GenerateBenchArgs>),
    /// GPU paged decode-attention time per KV policy (a build with `--features cuda`).
    Attention(super::bench_attention::AttentionBenchArgs),
    /// Serving throughput and TTFT/TPOT/ITL per KV policy on a ShareGPT-shaped workload of
    /// random prompts, through the async engine (closed loop or Poisson arrivals).
    Throughput(Box<super::bench_throughput::ThroughputBenchArgs>),
}

#[derive(Args, Debug)]
pub struct GenerateBenchArgs {
    /// Configurations as BACKEND:POLICY, comma-separated (default: pytorch 0, 8, 4, 42 and
    /// turbomind 0, 8, 4).
    #[arg(long = "configs", value_delimiter = ',')]
    pub configs: Vec<String>,
    /// The prompt is the first --prompt-tokens tokens of this text.
    #[arg(long, default_value = "texts/gpl-3.0.txt")]
    pub text: PathBuf,
    #[arg(long = "prompt-tokens", default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens generated per run (greedy, EOS ignored, so always this many).
    #[arg(long = "new-tokens", default_value_t = 128)]
    pub new_tokens: usize,
    /// Timed runs per configuration (after one warm-up run); medians are reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// CPU threads (default: RAYON_NUM_THREADS, else every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also run bench/llamacpp_generate.py with this Python (one that has llama-cpp-python)
    /// on the same model, prompt and thread count.
    #[arg(long = "llama-cpp-python")]
    pub llama_cpp_python: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

const DEFAULT_CONFIGS: [&str; 7] = [
    "pytorch:0",
    "pytorch:8",
    "pytorch:4",
    "pytorch:42",
    "turbomind:0",
    "turbomind:8",
    "turbomind:4",
];

pub fn run(a: BenchArgs) -> Result<(), KvqError> {
    match a.command {
        BenchCommand::Generate(g) => generate(*g),
        BenchCommand::Attention(b) => super::bench_attention::run(b),
        BenchCommand::Throughput(t) => super::bench_throughput::run(*t),
    }
}

/// One configuration's results.
#[derive(Debug)]
struct Row {
    backend: String,
    policy: Option<u32>,
    codec: String,
    bits_per_element: f64,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    prefill_tok_s_all: Vec<f64>,
    decode_tok_s_all: Vec<f64>,
    first_tokens: Vec<u32>,
}

impl Row {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "backend": self.backend,
            "policy": self.policy,
            "codec": self.codec,
            "bits_per_element": self.bits_per_element,
            "prefill_tok_s": self.prefill_tok_s,
            "decode_tok_s": self.decode_tok_s,
            "prefill_tok_s_all": self.prefill_tok_s_all,
            "decode_tok_s_all": self.decode_tok_s_all,
            "first_tokens": self.first_tokens,
        })
    }
}

/// Timings of one generation.
struct RunTimes {
    /// Seconds from submitting the request to the first generated token.
    ttft: f64,
    /// Seconds from the first to the last generated token.
    decode: f64,
    tokens: Vec<u32>,
}

fn generate(a: GenerateBenchArgs) -> Result<(), KvqError> {
    if let Some(n) = a.threads {
        kvq::ops::init_threads(n)?;
    }
    if a.runs == 0 || a.new_tokens < 2 || a.prompt_tokens == 0 {
        return Err(KvqError::InvalidArgument(
            "--runs must be ≥ 1, --new-tokens ≥ 2 and --prompt-tokens ≥ 1".into(),
        ));
    }
    let mut base = a.engine.load()?;
    // One sequence with room for the prompt and the answer: a small cache, whatever the
    // memory, so every policy runs on the same number of blocks' worth of tokens.
    let need = a.prompt_tokens + a.new_tokens + 1;
    if a.engine.session_len.is_none() {
        // (At least two blocks: the planner refuses a one-block cache.)
        base.engine.session_len = need
            .next_multiple_of(base.engine.block_size)
            .max(2 * base.engine.block_size);
    }
    if a.engine.max_batch_size.is_none() {
        base.engine.max_batch_size = 1;
    }
    let (_, configs) = super::config_list::parse_configs(&base, &a.configs, &DEFAULT_CONFIGS)?;
    let threads = kvq::ops::num_threads();
    let mut engines = configs
        .iter()
        .map(|c| Engine::load(c, &mut |_| {}))
        .collect::<Result<Vec<_>, _>>()?;
    let prompt = prompt_ids(&engines[0], &a.text, a.prompt_tokens)?;
    let mut llama = match &a.llama_cpp_python {
        Some(py) => Some(LlamaCpp::spawn(py, &a, &base.model.path, threads)?),
        None => None,
    };
    if let Some(l) = &llama {
        if l.info["prompt_fingerprint"].as_str() != Some(&fingerprint(&prompt)) {
            eprintln!(
                "warning: llama.cpp tokenized the prompt differently (fingerprint {} vs {})",
                l.info["prompt_fingerprint"],
                fingerprint(&prompt)
            );
        }
    }
    if !a.json {
        eprintln!(
            "kvq bench generate: {} prompt tokens from {}, {} new tokens (greedy, EOS ignored), \
             {threads} threads; {} rounds after a warm-up round, each running every \
             configuration{} once; medians",
            a.prompt_tokens,
            a.text.display(),
            a.new_tokens,
            a.runs,
            if llama.is_some() {
                " and llama.cpp"
            } else {
                ""
            },
        );
    }
    // Rounds interleave the configurations (and llama.cpp), so a burst of load from other
    // processes hits all of them rather than one.
    let mut times: Vec<Vec<RunTimes>> = (0..engines.len()).map(|_| Vec::new()).collect();
    let mut llama_runs = Vec::new();
    for round in 0..=a.runs {
        if !a.json {
            eprint!(
                "\rround {round}/{}{}",
                a.runs,
                if round == 0 {
                    " (warm-up)"
                } else {
                    "          "
                }
            );
        }
        // Each round starts one configuration later, so none always runs right after
        // llama.cpp (or first after a pause).
        let n = engines.len();
        for j in 0..n {
            let c = (round + j) % n;
            let run = time_generation(&mut engines[c], &prompt, a.new_tokens)?;
            if round > 0 {
                times[c].push(run);
            }
        }
        if let Some(l) = &mut llama {
            let run = l.run()?;
            if round > 0 {
                llama_runs.push(run);
            }
        }
    }
    if !a.json {
        eprintln!();
    }
    let rows: Vec<Row> = engines
        .iter()
        .zip(&times)
        .map(|(engine, times)| {
            let prefill: Vec<f64> = times
                .iter()
                .map(|t| a.prompt_tokens as f64 / t.ttft)
                .collect();
            let decode: Vec<f64> = times
                .iter()
                .map(|t| (a.new_tokens - 1) as f64 / t.decode)
                .collect();
            Row {
                backend: engine.resolved.backend.name().to_string(),
                policy: engine.resolved.codec.policy(),
                codec: engine.resolved.codec_name(),
                bits_per_element: engine.resolved.bits_per_element(),
                prefill_tok_s: median(&prefill),
                decode_tok_s: median(&decode),
                prefill_tok_s_all: prefill,
                decode_tok_s_all: decode,
                first_tokens: times[0].tokens.iter().take(16).copied().collect(),
            }
        })
        .collect();
    let llama = llama.map(|l| {
        let get = |k: &str| -> Vec<f64> {
            llama_runs
                .iter()
                .map(|r| r[k].as_f64().unwrap_or(f64::NAN))
                .collect()
        };
        let (prefill, decode) = (get("prefill_tok_s"), get("decode_tok_s"));
        let mut j = l.info.clone();
        j["runs"] = a.runs.into();
        j["prefill_tok_s"] = median(&prefill).into();
        j["decode_tok_s"] = median(&decode).into();
        j["prefill_tok_s_all"] = prefill.into();
        j["decode_tok_s_all"] = decode.into();
        j["first_tokens"] = llama_runs
            .first()
            .map_or(serde_json::Value::Null, |r| r["first_tokens"].clone());
        j.as_object_mut().map(|o| o.remove("ready"));
        j
    });
    if a.json {
        let j = serde_json::json!({
            "model": base.model.path,
            "text": a.text.display().to_string(),
            "prompt_tokens": a.prompt_tokens,
            "new_tokens": a.new_tokens,
            "runs": a.runs,
            "threads": threads,
            "prompt_fingerprint": fingerprint(&prompt),
            "kvq": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
            "llama_cpp": llama,
        });
        println!("{}", serde_json::to_string_pretty(&j).expect("json"));
        return Ok(());
    }
    println!("{}", header());
    for r in &rows {
        // Against the fp16 (policy 0) row of the same backend, if measured.
        let fp16 = rows
            .iter()
            .find(|f| f.backend == r.backend && f.policy == Some(0));
        println!("{}", format_row(r, fp16));
    }
    if let Some(l) = &llama {
        let (p, d) = (
            l["prefill_tok_s"].as_f64().unwrap_or(f64::NAN),
            l["decode_tok_s"].as_f64().unwrap_or(f64::NAN),
        );
        println!(
            "{:<10} {:>6} {:<12} {:>6} {:>13.1} {:>13.1}",
            "llama.cpp", "f16", "(reference)", "16.00", p, d
        );
        println!();
        println!("kvq / llama.cpp ({threads} threads):");
        for r in &rows {
            println!(
                "  {:<10} {:<12} prefill {:>5.2}x   decode {:>5.2}x",
                r.backend,
                r.codec,
                r.prefill_tok_s / p,
                r.decode_tok_s / d
            );
        }
    }
    Ok(())
}

/// `bench/llamacpp_generate.py --serve`, timing one llama.cpp run per request.
struct LlamaCpp {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    /// The script's first line: version, prompt fingerprint, ...
    info: serde_json::Value,
}

impl LlamaCpp {
    fn spawn(
        python: &Path,
        a: &GenerateBenchArgs,
        model: &str,
        threads: usize,
    ) -> Result<Self, KvqError> {
        use std::process::{Command, Stdio};
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/llamacpp_generate.py");
        let mut child = Command::new(python)
            .arg(&script)
            .args(["--model", model])
            .arg("--text")
            .arg(&a.text)
            .args(["--prompt-tokens", &a.prompt_tokens.to_string()])
            .args(["--new-tokens", &a.new_tokens.to_string()])
            .args(["--threads", &threads.to_string()])
            .arg("--serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|source| KvqError::Io {
                path: python.display().to_string(),
                source,
            })?;
        let stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut me = Self {
            child,
            stdout,
            info: serde_json::Value::Null,
        };
        me.info = me.read_line()?;
        Ok(me)
    }

    fn read_line(&mut self) -> Result<serde_json::Value, KvqError> {
        use std::io::BufRead;
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .map_err(|source| KvqError::Io {
                path: "bench/llamacpp_generate.py".into(),
                source,
            })?;
        if n == 0 {
            return Err(KvqError::InvalidArgument(
                "bench/llamacpp_generate.py exited early (is llama-cpp-python installed?)".into(),
            ));
        }
        serde_json::from_str(&line).map_err(|e| {
            KvqError::InvalidArgument(format!(
                "bench/llamacpp_generate.py printed `{}`: {e}",
                line.trim()
            ))
        })
    }

    fn run(&mut self) -> Result<serde_json::Value, KvqError> {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("piped");
        writeln!(stdin, "run")
            .and_then(|_| stdin.flush())
            .map_err(|source| KvqError::Io {
                path: "bench/llamacpp_generate.py".into(),
                source,
            })?;
        self.read_line()
    }
}

impl Drop for LlamaCpp {
    fn drop(&mut self) {
        use std::io::Write;
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = writeln!(stdin, "quit");
        }
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Times one request of `new_tokens` greedy tokens after `prompt`.
fn time_generation(
    engine: &mut Engine,
    prompt: &[u32],
    new_tokens: usize,
) -> Result<RunTimes, KvqError> {
    let req = Request {
        prompt: prompt.to_vec(),
        params: SamplingParams {
            max_new_tokens: new_tokens,
            ignore_eos: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let start = Instant::now();
    let mut first = None;
    let mut last = start;
    let mut tokens = Vec::with_capacity(new_tokens);
    engine.generate(vec![req], &mut |e: &TokenEvent| {
        let now = Instant::now();
        first.get_or_insert(now);
        last = now;
        tokens.push(e.token);
    })?;
    if tokens.len() != new_tokens {
        return Err(KvqError::InvalidArgument(format!(
            "generated {} tokens instead of {new_tokens} (session too short?)",
            tokens.len()
        )));
    }
    let first = first.expect("at least one token");
    Ok(RunTimes {
        ttft: (first - start).as_secs_f64(),
        decode: (last - first).as_secs_f64(),
        tokens,
    })
}

/// The first `n` tokens of `text` (no BOS, no template).
fn prompt_ids(engine: &Engine, text: &Path, n: usize) -> Result<Vec<u32>, KvqError> {
    let s = std::fs::read_to_string(text).map_err(|source| KvqError::Io {
        path: text.display().to_string(),
        source,
    })?;
    let mut ids = engine.tokenizer.encode(&s, false)?;
    if ids.len() < n {
        return Err(KvqError::InvalidArgument(format!(
            "{} has {} tokens, fewer than --prompt-tokens {n}",
            text.display(),
            ids.len()
        )));
    }
    ids.truncate(n);
    Ok(ids)
}

/// FNV-1a (64-bit) of the ids as decimal numbers joined by commas, as the llama.cpp script
/// prints it, to check both engines ran the same prompt.
fn fingerprint(ids: &[u32]) -> String {
    let text = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn header() -> String {
    format!(
        "{:<10} {:>6} {:<12} {:>6} {:>13} {:>13} {:>10}",
        "backend", "policy", "codec", "bits", "prefill tok/s", "decode tok/s", "vs fp16"
    )
}

/// One table row; `fp16` is the same backend's policy-0 row (decode ratio), if measured.
fn format_row(r: &Row, fp16: Option<&Row>) -> String {
    let rel = fp16.map_or("-".to_string(), |f| {
        format!("{:.2}x", r.decode_tok_s / f.decode_tok_s)
    });
    format!(
        "{:<10} {:>6} {:<12} {:>6.2} {:>13.1} {:>13.1} {:>10}",
        r.backend,
        r.policy.map_or("-".into(), |p| p.to_string()),
        r.codec,
        r.bits_per_element,
        r.prefill_tok_s,
        r.decode_tok_s,
        rel
    )
}
