//! `kvq eval --qk-study`: how each K codec's score estimates `q·k̂` err against the exact
//! `q·k` on the queries and keys the model produces on a real text (see
//! `engine_core::qk_study`).

use kvq::plan::ResolvedConfig;
use kvq::qk_study::{capture_qk, score_error, ScoreError};
use kvq::{EngineConfig, KvqError};

use super::eval::EvalArgs;

/// K sides compared by default: LMDeploy's 3-bit + residual sign (`tq3s`), the same 3-bit
/// codes without the sign (`lm3`), 4-bit MSE-only (`lm4`, tq3s's bits), the paper's
/// TurboQuant_prod (2-bit + QJL, `tqprod3`), and rotated/plain int4 for scale.
pub const DEFAULT_SIDES: [&str; 6] = [
    "pytorch:k=tq3s,v=fp16",
    "pytorch:k=lm3,v=fp16",
    "pytorch:k=lm4,v=fp16",
    "pytorch:k=tqprod3,v=fp16",
    "pytorch:k=int4,v=fp16,rotate",
    "pytorch:k=int4,v=fp16",
];

pub fn run(
    a: &EvalArgs,
    model: &kvq::model::LlamaModel,
    tokens: &[u32],
    configs: &[EngineConfig],
) -> Result<(), KvqError> {
    let resolved = configs
        .iter()
        .map(|c| ResolvedConfig::new(&model.spec, c))
        .collect::<Result<Vec<_>, _>>()?;
    let backend = resolved
        .first()
        .ok_or_else(|| KvqError::InvalidArgument("--qk-study needs at least one config".into()))?
        .backend
        .as_ref();
    let qk = capture_qk(model, backend, tokens)?;
    if qk.k.len() != model.spec.num_layers || qk.q.len() != model.spec.num_layers {
        return Err(KvqError::InvalidArgument(format!(
            "captured {} key and {} query tensors for {} layers; the window must be one pass",
            qk.k.len(),
            qk.q.len(),
            model.spec.num_layers
        )));
    }
    let mut rows: Vec<ScoreError> = Vec::new();
    if !a.json {
        eprintln!(
            "kvq eval --qk-study: {} tokens of {} (offset {}), every {}th query against all the keys it sees, {} layers × {} heads",
            tokens.len(),
            a.text.display(),
            a.offset,
            a.query_stride,
            qk.q.len(),
            qk.heads
        );
        println!(
            "{:<24} {:>6} {:>14} {:>16} {:>10} {:>12}",
            "K codec", "K bits", "bias / sd(qk)", "spread / sd(qk)", "bias z", "pairs"
        );
    }
    for r in &resolved {
        let e = score_error(&qk, r.codec.as_ref(), a.query_stride)?;
        if !a.json {
            println!(
                "{:<24} {:>6.3} {:>+14.5} {:>16.5} {:>+10.1} {:>12}",
                e.codec, e.bits_per_element, e.relative_bias, e.relative_spread, e.bias_z, e.pairs
            );
        }
        rows.push(e);
    }
    if a.json {
        let j = serde_json::json!({
            "text": a.text.display().to_string(),
            "ctx": a.ctx,
            "offset": a.offset,
            "query_stride": a.query_stride,
            "rows": rows,
        });
        println!("{}", serde_json::to_string_pretty(&j).expect("json"));
    }
    Ok(())
}
