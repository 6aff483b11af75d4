//! Loading an engine or a pipeline from the command line, with a progress bar, then printing
//! the cache plan (block count, token capacity, ratio to the fp16 cache).

use indicatif::{ProgressBar, ProgressStyle};
use std::time::Duration;

use kvq::engine::{Engine, LoadStage};
use kvq::{KvqError, Pipeline};

use super::args::EngineArgs;

/// Loads the model the flags and config name, showing each stage, then prints the cache plan.
pub fn load_engine(args: &EngineArgs) -> Result<Engine, KvqError> {
    let cfg = args.load()?;
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("template"));
    bar.enable_steady_tick(Duration::from_millis(100));
    let path = cfg.model.path.clone();
    let engine = Engine::load(&cfg, &mut |stage| {
        bar.set_message(match stage {
            LoadStage::ReadingHeader => format!("reading {path}"),
            LoadStage::LoadingWeights => "loading weights".to_string(),
            LoadStage::LoadingTokenizer => "loading tokenizer".to_string(),
            LoadStage::AllocatingCache => "allocating KV cache".to_string(),
            LoadStage::Ready => "ready".to_string(),
        })
    });
    bar.finish_and_clear();
    let engine = engine?;
    eprintln!(
        "kvq: {}; running on {}",
        engine.summary(),
        engine.device_name()
    );
    Ok(engine)
}

/// [`load_engine`], as a [`Pipeline`].
pub fn load_pipeline(args: &EngineArgs) -> Result<Pipeline, KvqError> {
    Pipeline::from_engine(load_engine(args)?)
}
