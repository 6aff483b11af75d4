//! Teacher-forced accuracy evaluation of KV-cache codecs against the fp16 cache: the same
//! model reads the same window of text with each configuration, and the next-token
//! distributions are compared position by position.

pub mod agreement;

use serde::Serialize;

use crate::cache::{BlockPool, BlockTable};
use crate::config::{DeviceChoice, EngineConfig};
use crate::error::KvqError;
use crate::model::{device_runner_factory, DeviceRunnerRequest, LlamaModel, LogitsFor, SeqInput};
use crate::ops::linear::Path;
use crate::ops::log_softmax;
use crate::plan::ResolvedConfig;

/// Accuracy of one configuration against the reference.
#[derive(Debug, Clone, Serialize)]
pub struct EvalRow {
    pub backend: String,
    pub codec: String,
    pub policy: Option<u32>,
    pub bits_per_element: f64,
    /// KV bytes per token over all layers and heads (metadata included, no padding).
    pub kv_bytes_per_token: usize,
    pub perplexity: f64,
    pub mean_kld: f64,
    pub p99_kld: f64,
    /// Fraction of positions whose most likely token equals the reference's.
    pub top1_agreement: f64,
    pub positions: usize,
}

/// Logits of every position of `tokens` under `cfg` (`[n, vocab]`), on the device `cfg`
/// names (`auto` is the CPU).
pub fn window_logits(
    model: &LlamaModel,
    cfg: &EngineConfig,
    tokens: &[u32],
) -> Result<(ResolvedConfig, Vec<f32>), KvqError> {
    cfg.check_tp_runs()?;
    let resolved = ResolvedConfig::new(&model.spec, cfg)?;
    let block = cfg.engine.block_size;
    let blocks = BlockTable::blocks_for(tokens.len(), block);
    let mut pool = BlockPool::new(blocks);
    let mut table = BlockTable::default();
    table.reserve(&mut pool, tokens.len(), block)?;
    let window = resolved.new_recent_window().map(std::sync::Mutex::new);
    let seq = SeqInput {
        tokens,
        start_pos: 0,
        block_table: &table,
        window: window.as_ref(),
    };
    let logits = match cfg.device()? {
        DeviceChoice::Auto | DeviceChoice::Cpu => {
            let mut cache = resolved.new_cache(blocks);
            model.forward(
                resolved.backend.as_ref(),
                &mut cache,
                &[seq],
                LogitsFor::AllTokens,
            )?
        }
        DeviceChoice::Cuda(ordinal) => {
            let build = device_runner_factory("cuda").ok_or_else(|| KvqError::Device {
                device: format!("cuda:{ordinal}"),
                reason: "this build has no CUDA support; rebuild with `--features cuda`".into(),
            })?;
            let block_bytes = resolved.block_bytes() as u64;
            let mut device = build(DeviceRunnerRequest {
                model,
                resolved: &resolved,
                config: cfg,
                ordinal,
                plan: &|_| Ok(resolved.plan_exact(blocks as u64 * block_bytes)),
            })?;
            let mut cache = resolved.new_cache(0);
            device.runner.forward_with(
                resolved.backend.as_ref(),
                &mut cache,
                &[seq],
                LogitsFor::AllTokens,
                Path::Auto,
                Path::Auto,
            )?
        }
    };
    Ok((resolved, logits))
}

/// Compares `logits` with the reference's log-probabilities, row by row.
pub fn compare(
    resolved: &ResolvedConfig,
    reference: &[Vec<f32>],
    logits: &[f32],
    tokens: &[u32],
) -> EvalRow {
    let vocab = logits.len() / tokens.len();
    let mut klds = Vec::with_capacity(tokens.len());
    let (mut agree, mut nll) = (0usize, 0f64);
    let n = tokens.len() - 1; // the last position predicts nothing we can score
    for i in 0..n {
        let lp = log_softmax(&logits[i * vocab..(i + 1) * vocab]);
        let rp = &reference[i];
        let kld: f64 = rp
            .iter()
            .zip(&lp)
            .map(|(&r, &q)| {
                let r = r as f64;
                r.exp() * (r - q)
            })
            .sum();
        klds.push(kld.max(0.0));
        if argmax_f64(&lp) == argmax_f32(rp) {
            agree += 1;
        }
        nll -= lp[tokens[i + 1] as usize];
    }
    let mean = klds.iter().sum::<f64>() / n as f64;
    let mut sorted = klds.clone();
    sorted.sort_by(f64::total_cmp);
    let p99 = sorted[((n as f64 * 0.99).ceil() as usize).clamp(1, n) - 1];
    EvalRow {
        backend: resolved.backend.name().to_string(),
        codec: resolved.codec_name(),
        policy: resolved.codec.policy(),
        // the recent window's tokens at the dtype, counted at this context
        bits_per_element: resolved.bits_at(tokens.len()),
        kv_bytes_per_token: resolved.bytes_per_token(),
        perplexity: (nll / n as f64).exp(),
        mean_kld: mean,
        p99_kld: p99,
        top1_agreement: agree as f64 / n as f64,
        positions: n,
    }
}

/// Evaluates every config in `configs` against `reference` (normally the fp16 cache) on
/// `tokens`; `on_row` sees each result as it is ready. The reference itself is the first row.
pub fn evaluate(
    model: &LlamaModel,
    reference: &EngineConfig,
    configs: &[EngineConfig],
    tokens: &[u32],
    on_row: &mut dyn FnMut(&EvalRow),
) -> Result<Vec<EvalRow>, KvqError> {
    if tokens.len() < 2 {
        return Err(KvqError::InvalidArgument(
            "evaluation needs at least 2 tokens".into(),
        ));
    }
    let (ref_resolved, ref_logits) = window_logits(model, reference, tokens)?;
    let vocab = ref_logits.len() / tokens.len();
    // Reference log-probabilities in f32: 4 bytes per entry keeps a 2k-token window < 0.5 GB.
    let ref_lp: Vec<Vec<f32>> = ref_logits
        .chunks(vocab)
        .map(|row| log_softmax(row).into_iter().map(|x| x as f32).collect())
        .collect();
    let mut rows = vec![compare(&ref_resolved, &ref_lp, &ref_logits, tokens)];
    on_row(&rows[0]);
    for cfg in configs {
        let (resolved, logits) = window_logits(model, cfg, tokens)?;
        let row = compare(&resolved, &ref_lp, &logits, tokens);
        on_row(&row);
        rows.push(row);
    }
    Ok(rows)
}

fn argmax_f64(x: &[f64]) -> usize {
    (0..x.len()).fold(0, |b, i| if x[i] > x[b] { i } else { b })
}

fn argmax_f32(x: &[f32]) -> usize {
    (0..x.len()).fold(0, |b, i| if x[i] > x[b] { i } else { b })
}
