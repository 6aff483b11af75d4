//! Building an [`Engine`] from a config: model, tokenizer, backend, codec, planned cache.

use std::path::Path;

use super::request::{GenerationOutput, Request, TokenEvent};
use super::scheduler::{Scheduler, SchedulerLimits};
use crate::cache::{BlockPool, MemoryPlan, PagedKvCache};
use crate::config::EngineConfig;
use crate::error::KvqError;
use crate::loader::{GgufTensors, Tokenizer};
use crate::model::{load_llama, LlamaModel, SafetensorsWeights};
use crate::model_spec::{gguf::spec_from_gguf, ModelSpec};
use crate::plan::ResolvedConfig;

/// Loading milestones, for progress bars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadStage {
    ReadingHeader,
    LoadingWeights,
    LoadingTokenizer,
    AllocatingCache,
    Ready,
}

/// A model ready to generate, with its cache.
pub struct Engine {
    pub spec: ModelSpec,
    pub config: EngineConfig,
    pub model: LlamaModel,
    pub tokenizer: Tokenizer,
    pub resolved: ResolvedConfig,
    pub plan: MemoryPlan,
    cache: PagedKvCache,
    pool: BlockPool,
}

/// Loads a model's spec, weights and tokenizer (no cache) from a GGUF file or an HF directory.
pub fn load_model(
    path: &Path,
    progress: &mut dyn FnMut(LoadStage),
) -> Result<(ModelSpec, LlamaModel, Tokenizer), KvqError> {
    let origin = path.display().to_string();
    if !path.exists() {
        return Err(KvqError::Model {
            path: origin,
            reason: "not found (run scripts/fetch-model.sh for the default model)".into(),
        });
    }
    if path.is_dir() {
        return load_hf_dir(path, progress);
    }
    progress(LoadStage::ReadingHeader);
    let tensors = GgufTensors::open(path)?;
    let spec = spec_from_gguf(tensors.gguf(), &origin)?;
    check_architecture(&spec, &origin)?;
    progress(LoadStage::LoadingWeights);
    let model = load_llama(&tensors, &spec)?;
    progress(LoadStage::LoadingTokenizer);
    let tokenizer = Tokenizer::from_gguf(tensors.gguf(), &origin)?;
    Ok((spec, model, tokenizer))
}

/// Refuses an architecture the forward pass does not implement.
fn check_architecture(spec: &ModelSpec, origin: &str) -> Result<(), KvqError> {
    if spec.architecture == "llama" {
        return Ok(());
    }
    Err(KvqError::Model {
        path: origin.to_string(),
        reason: format!(
            "architecture `{}` is not supported (llama is)",
            spec.architecture
        ),
    })
}

/// Loads an HF model directory: `config.json`, `*.safetensors` weights (f32, f16 or bf16) and
/// `tokenizer.json` (with `tokenizer_config.json` for BOS/EOS and the chat template).
fn load_hf_dir(
    dir: &Path,
    progress: &mut dyn FnMut(LoadStage),
) -> Result<(ModelSpec, LlamaModel, Tokenizer), KvqError> {
    for (file, what) in [
        ("config.json", "the model's shape"),
        ("tokenizer.json", "the tokenizer"),
    ] {
        if !dir.join(file).is_file() {
            return Err(KvqError::Model {
                path: dir.display().to_string(),
                reason: format!(
                    "is a directory without {file} ({what}); a model is a GGUF file or an HF \
                     directory with config.json, *.safetensors and tokenizer.json"
                ),
            });
        }
    }
    progress(LoadStage::ReadingHeader);
    let spec = ModelSpec::from_path(dir)?;
    check_architecture(&spec, &dir.join("config.json").display().to_string())?;
    let weights = SafetensorsWeights::open_dir(dir)?;
    progress(LoadStage::LoadingWeights);
    let model = load_llama(&weights, &spec)?;
    drop(weights);
    progress(LoadStage::LoadingTokenizer);
    let tokenizer = Tokenizer::from_path(dir)?;
    Ok((spec, model, tokenizer))
}

/// Memory the OS reports as available (`MemAvailable`), or 4 GiB where it cannot be read.
pub fn available_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(4 << 30)
}

impl Engine {
    /// Loads the model `config.model.path` names and plans its cache.
    pub fn load(
        config: &EngineConfig,
        progress: &mut dyn FnMut(LoadStage),
    ) -> Result<Self, KvqError> {
        config.validate()?;
        let path = Path::new(&config.model.path);
        if path.exists() {
            // Refuse a bad combination from the metadata alone, before loading any weights.
            ResolvedConfig::new(&ModelSpec::from_path(path)?, config)?;
        }
        let (spec, model, tokenizer) = load_model(path, progress)?;
        let resolved = ResolvedConfig::new(&spec, config)?;
        progress(LoadStage::AllocatingCache);
        let plan = plan_cpu_cache(&resolved, config)?;
        let cache = PagedKvCache::new(
            resolved.layout.clone(),
            resolved.codec.clone(),
            plan.num_blocks,
        );
        let pool = BlockPool::new(plan.num_blocks);
        progress(LoadStage::Ready);
        Ok(Self {
            spec,
            config: config.clone(),
            model,
            tokenizer,
            resolved,
            plan,
            cache,
            pool,
        })
    }

    /// Blocks not held by any sequence (all of them between calls).
    pub fn free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    /// Generates for every request, batching them; `on_event` sees each token as it comes.
    pub fn generate(
        &mut self,
        requests: Vec<Request>,
        on_event: &mut dyn FnMut(&TokenEvent),
    ) -> Result<Vec<GenerationOutput>, KvqError> {
        let limits = SchedulerLimits {
            max_batch_size: self.config.engine.max_batch_size,
            session_len: self
                .config
                .engine
                .session_len
                .min(self.spec.max_position_embeddings),
            max_prefill_tokens: 4096,
        };
        let mut sched = Scheduler::new(limits, self.tokenizer.eos_id());
        let n = requests.len();
        for r in requests {
            sched.submit(r)?;
        }
        let mut outputs: Vec<Option<GenerationOutput>> = vec![None; n];
        let mut events = Vec::new();
        while sched.has_work() {
            events.clear();
            sched.step(
                &self.model,
                self.resolved.backend.as_ref(),
                &mut self.cache,
                &mut self.pool,
                &self.tokenizer,
                &mut events,
            )?;
            events.iter().for_each(&mut *on_event);
            for (index, mut ids, prompt_tokens, finish_reason) in sched.take_finished() {
                if finish_reason == super::FinishReason::Stop {
                    ids.pop(); // the stop token itself is not part of the answer
                }
                let text = self.tokenizer.decode_with(&ids, true)?;
                outputs[index] = Some(GenerationOutput {
                    text,
                    token_ids: ids,
                    prompt_tokens,
                    finish_reason,
                });
            }
        }
        Ok(outputs
            .into_iter()
            .map(|o| o.expect("every request finishes"))
            .collect())
    }
}

/// The CPU cache plan: `cache_memory_gib`, else `cache_max_entry_count` of available memory,
/// capped at what `max_batch_size` full sessions can use.
fn plan_cpu_cache(
    resolved: &ResolvedConfig,
    config: &EngineConfig,
) -> Result<MemoryPlan, KvqError> {
    let e = &config.engine;
    let mut plan = match e.cache_memory_gib {
        Some(g) => resolved.plan_exact((g * (1u64 << 30) as f64) as u64),
        None => resolved.plan(available_memory_bytes(), config),
    };
    let most_useful = e.max_batch_size * e.session_len.div_ceil(e.block_size);
    if plan.num_blocks > most_useful {
        plan.num_blocks = most_useful;
        plan.token_capacity = most_useful * e.block_size;
    }
    if plan.num_blocks < 2 {
        return Err(KvqError::OutOfBlocks(format!(
            "a budget of {} bytes holds {} blocks of {} bytes; give the cache more memory",
            plan.cache_bytes, plan.num_blocks, plan.block_bytes
        )));
    }
    Ok(plan)
}
