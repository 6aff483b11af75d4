//! Loading a pipeline from the command line, with a progress bar.

use indicatif::{ProgressBar, ProgressStyle};
use std::time::Duration;

use kvq::engine::LoadStage;
use kvq::{KvqError, Pipeline};

use super::args::EngineArgs;

/// Loads the model the flags and config name, showing each stage, then prints the cache plan.
pub fn load_pipeline(args: &EngineArgs) -> Result<Pipeline, KvqError> {
    let cfg = args.load()?;
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("template"));
    bar.enable_steady_tick(Duration::from_millis(100));
    let path = cfg.model.path.clone();
    let pipe = Pipeline::with_progress(&path, cfg, &mut |stage| {
        bar.set_message(match stage {
            LoadStage::ReadingHeader => format!("reading {path}"),
            LoadStage::LoadingWeights => "loading weights".to_string(),
            LoadStage::LoadingTokenizer => "loading tokenizer".to_string(),
            LoadStage::AllocatingCache => "allocating KV cache".to_string(),
            LoadStage::Ready => "ready".to_string(),
        })
    });
    bar.finish_and_clear();
    let pipe = pipe?;
    let e = pipe.engine();
    eprintln!(
        "kvq: {} backend, KV codec {} ({:.2} bits/element): {} blocks of {} tokens = {} tokens, {:.2}x the fp16 cache",
        e.resolved.backend.name(),
        e.resolved.codec.name(),
        e.resolved.codec.bits_per_element(),
        e.plan.num_blocks,
        e.plan.block_size,
        e.plan.token_capacity,
        e.plan.ratio_to_fp16
    );
    Ok(pipe)
}
