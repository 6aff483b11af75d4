//! Building an [`Engine`] from a config: model, tokenizer, backend, codec, planned cache.

use std::path::Path;

use super::request::{GenerationOutput, Request, TokenEvent};
use super::scheduler::{Scheduler, SchedulerLimits, StepStats};
use crate::cache::{BlockPool, MemoryPlan, PagedKvCache};
use crate::config::{DeviceChoice, EngineConfig};
use crate::error::KvqError;
use crate::loader::{GgufTensors, Tokenizer};
use crate::model::{
    device_runner_factory, load_llama, DeviceRunnerRequest, ForwardPass, HostWeights, LlamaModel,
    SafetensorsWeights,
};
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
    /// The host cache; with a device runner it has no blocks (the K/V lives on the device).
    cache: PagedKvCache,
    pub(super) pool: BlockPool,
    pub(super) sched: Scheduler,
    preempted: u64,
    prefix_hit_tokens: u64,
    /// A device runner that replaces `model` for forward passes, with its device's name.
    device: Option<(Box<dyn ForwardPass>, String)>,
    speculation: SpeculationStats,
}

/// Speculative decoding's counters since loading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpeculationStats {
    /// Draft tokens scored.
    pub drafted: u64,
    /// Drafts kept (equal to the token the sampler picked at their position).
    pub accepted: u64,
}

impl SpeculationStats {
    /// `accepted / drafted`, or 0 before any draft.
    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }
}

/// Prompt tokens one step processes over all sequences (chunked prefill), so a long prompt
/// shares steps with the decoding sequences instead of stalling them.
pub const DEFAULT_MAX_PREFILL_TOKENS: usize = 1024;

/// Loads a model's spec, weights and tokenizer (no cache) from a GGUF file or an HF directory,
/// for the CPU ([`HostWeights::F32`]; see [`load_model_for`]).
pub fn load_model(
    path: &Path,
    progress: &mut dyn FnMut(LoadStage),
) -> Result<(ModelSpec, LlamaModel, Tokenizer), KvqError> {
    load_model_for(path, HostWeights::F32, progress)
}

/// [`load_model`] with a choice of how an HF checkpoint's f16/bf16 matrices are held (GGUF
/// files keep their quantized blocks, and widen 16-bit tensors, either way).
pub fn load_model_for(
    path: &Path,
    host: HostWeights,
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
        return load_hf_dir(path, host, progress);
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
    host: HostWeights,
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
    let mut weights = SafetensorsWeights::open_dir(dir)?;
    if host == HostWeights::Half {
        weights = weights.keeping_16bit();
    }
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
        config.check_tp_runs()?;
        let path = Path::new(&config.model.path);
        if path.exists() {
            // Refuse a bad combination from the metadata alone, before loading any weights.
            ResolvedConfig::new(&ModelSpec::from_path(path)?, config)?;
        }
        let host = HostWeights::for_device(config.device()?);
        let (spec, model, tokenizer) = load_model_for(path, host, progress)?;
        progress(LoadStage::AllocatingCache);
        let engine = Self::from_model(config, spec, model, tokenizer)?;
        progress(LoadStage::Ready);
        Ok(engine)
    }

    /// The device the forward passes run on (`"cpu"` or the GPU's name).
    pub fn device_name(&self) -> &str {
        self.device
            .as_ref()
            .map_or("cpu", |(_, name)| name.as_str())
    }

    /// An engine over a model already built (e.g. [`crate::model::random_llama`]): the
    /// config is resolved against `spec` and the cache planned as [`Engine::load`] does
    /// (`config.model.path` is not read).
    pub fn from_model(
        config: &EngineConfig,
        spec: ModelSpec,
        model: LlamaModel,
        tokenizer: Tokenizer,
    ) -> Result<Self, KvqError> {
        config.validate()?;
        config.check_tp_runs()?;
        let resolved = ResolvedConfig::new(&spec, config)?;
        let engine = match config.device()? {
            // `auto` stays on the CPU: its results are the bit-exact, batch-invariant
            // reference; the GPU is chosen explicitly.
            DeviceChoice::Auto | DeviceChoice::Cpu => {
                let plan = plan_cache(&resolved, config, available_memory_bytes())?;
                Self::from_parts(config.clone(), spec, model, tokenizer, resolved, plan)
            }
            DeviceChoice::Cuda(ordinal) => {
                let build = device_runner_factory("cuda").ok_or_else(|| KvqError::Device {
                    device: format!("cuda:{ordinal}"),
                    reason: "this build has no CUDA support; rebuild with `--features cuda`".into(),
                })?;
                let device = build(DeviceRunnerRequest {
                    model: &model,
                    resolved: &resolved,
                    config,
                    ordinal,
                    plan: &|free| plan_cache(&resolved, config, free),
                })?;
                let mut engine = Self::from_parts(
                    config.clone(),
                    spec,
                    model,
                    tokenizer,
                    resolved,
                    device.plan,
                );
                // The K/V lives on the device: the host cache keeps only the layout.
                engine.cache = engine.resolved.new_cache(0);
                engine.device = Some((device.runner, device.device_name));
                engine
            }
        };
        Ok(engine)
    }

    /// An engine from parts already built (a cache of `plan.num_blocks` blocks is allocated).
    pub fn from_parts(
        config: EngineConfig,
        spec: ModelSpec,
        model: LlamaModel,
        tokenizer: Tokenizer,
        resolved: ResolvedConfig,
        plan: MemoryPlan,
    ) -> Self {
        let cache = resolved.new_cache(plan.num_blocks);
        let pool =
            BlockPool::with_prefix_caching(plan.num_blocks, config.engine.enable_prefix_caching);
        let limits = SchedulerLimits {
            max_batch_size: config.engine.max_batch_size,
            session_len: config
                .engine
                .session_len
                .min(spec.max_position_embeddings)
                .min(plan.num_blocks * cache.block_size()),
            max_prefill_tokens: DEFAULT_MAX_PREFILL_TOKENS,
            num_speculative_tokens: config
                .speculative
                .as_ref()
                .map_or(0, |s| s.num_speculative_tokens),
        };
        let sched = Scheduler::new(limits, tokenizer.eos_id())
            .with_recent_window(resolved.new_recent_window());
        Self {
            spec,
            config,
            model,
            tokenizer,
            resolved,
            plan,
            cache,
            pool,
            sched,
            preempted: 0,
            prefix_hit_tokens: 0,
            device: None,
            speculation: SpeculationStats::default(),
        }
    }

    /// Runs forward passes through `runner` instead of the host model (tests stand in for a
    /// device runner with it).
    #[cfg(test)]
    pub(crate) fn set_runner(&mut self, runner: Box<dyn ForwardPass>, name: &str) {
        self.device = Some((runner, name.to_string()));
    }

    /// The cache plan in one line: backend, codec, block count, token capacity and the
    /// capacity relative to the fp16 cache.
    pub fn summary(&self) -> String {
        format!(
            "{} backend, KV codec {} ({:.2} bits/element): {} blocks of {} tokens = {} tokens, {:.2}x the fp16 cache; session_len {}",
            self.resolved.backend.name(),
            self.resolved.codec_name(),
            self.resolved.bits_per_element(),
            self.plan.num_blocks,
            self.plan.block_size,
            self.plan.token_capacity,
            self.plan.ratio_to_fp16,
            self.limits().session_len,
        )
    }

    /// Blocks not held by any sequence (all of them when no request is active).
    pub fn free_blocks(&self) -> usize {
        self.pool.num_free()
    }

    /// The limits requests run within; `session_len` is the configured one capped by the
    /// model's context and the cache's token capacity.
    pub fn limits(&self) -> SchedulerLimits {
        *self.sched.limits()
    }

    /// Changes the draft tokens verified per decoding sequence and step (n-gram
    /// speculation); 0 turns speculation off. Applies from the next step.
    pub fn set_num_speculative_tokens(&mut self, n: usize) {
        let mut limits = self.limits();
        limits.num_speculative_tokens = n;
        self.sched.set_limits(limits);
    }

    /// Speculative decoding's draft and acceptance counts since loading.
    pub fn speculation(&self) -> SpeculationStats {
        self.speculation
    }

    /// Changes the prompt tokens processed per step (chunked prefill); at least 1.
    pub fn set_max_prefill_tokens(&mut self, n: usize) {
        let mut limits = self.limits();
        limits.max_prefill_tokens = n.max(1);
        self.sched.set_limits(limits);
    }

    /// See `Scheduler::window_slots`.
    #[cfg(test)]
    pub(super) fn window_slots(&self) -> (Vec<usize>, bool) {
        self.sched.window_slots()
    }

    /// Blocks held by active requests; with [`Engine::free_blocks`] it must add up to the
    /// pool.
    #[cfg(test)]
    pub(super) fn held_blocks(&self) -> usize {
        self.sched.held_blocks()
    }

    /// Requests waiting for blocks or a batch slot.
    pub fn num_waiting(&self) -> usize {
        self.sched.num_waiting()
    }

    /// Requests in the running batch.
    pub fn num_running(&self) -> usize {
        self.sched.num_running()
    }

    /// Preemptions (a running request's blocks freed for recomputation) since loading.
    pub fn preemptions(&self) -> u64 {
        self.preempted
    }

    /// Prompt tokens found in the prefix cache instead of computed, since loading.
    pub fn prefix_hit_tokens(&self) -> u64 {
        self.prefix_hit_tokens
    }

    pub fn has_work(&self) -> bool {
        self.sched.has_work()
    }

    /// Queues a request; it joins the running batch at a later [`Engine::step`]. Returns its
    /// id, which its [`TokenEvent`]s and output carry.
    pub fn submit(&mut self, request: Request) -> Result<usize, KvqError> {
        self.sched.submit(request)
    }

    /// Removes a waiting or running request and frees its blocks; whether it was active.
    pub fn cancel(&mut self, id: usize) -> Result<bool, KvqError> {
        self.sched.cancel(id, &mut self.pool)
    }

    /// Cancels every request; returns their ids.
    pub fn cancel_all(&mut self) -> Result<Vec<usize>, KvqError> {
        self.sched.cancel_all(&mut self.pool)
    }

    /// One forward pass over the running batch (admitting and preempting as blocks allow);
    /// the tokens it sampled are appended to `events`.
    pub fn step(&mut self, events: &mut Vec<TokenEvent>) -> Result<StepStats, KvqError> {
        let model: &mut dyn ForwardPass = match &mut self.device {
            Some((runner, _)) => runner.as_mut(),
            None => &mut self.model,
        };
        let stats = self.sched.step(
            model,
            self.resolved.backend.as_ref(),
            &mut self.cache,
            &mut self.pool,
            &self.tokenizer,
            events,
        )?;
        self.preempted += stats.preempted as u64;
        self.prefix_hit_tokens += stats.prefix_hit_tokens as u64;
        self.speculation.drafted += stats.drafted as u64;
        self.speculation.accepted += stats.accepted as u64;
        Ok(stats)
    }

    /// Requests finished since the last call, as (id, output).
    pub fn take_finished(&mut self) -> Vec<(usize, GenerationOutput)> {
        self.sched.take_finished()
    }

    /// Generates for every request, batching them, and returns their outputs in order;
    /// `on_event` sees each token as it comes, with [`TokenEvent::request`] the request's
    /// position in `requests`. The engine must be idle (no request from [`Engine::submit`]
    /// still active).
    pub fn generate(
        &mut self,
        requests: Vec<Request>,
        on_event: &mut dyn FnMut(&TokenEvent),
    ) -> Result<Vec<GenerationOutput>, KvqError> {
        if self.has_work() {
            return Err(KvqError::InvalidArgument(
                "generate needs an idle engine; submitted requests are still active".into(),
            ));
        }
        let mut ids = Vec::with_capacity(requests.len());
        for r in requests {
            match self.submit(r) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    self.cancel_ids(&ids)?;
                    return Err(e);
                }
            }
        }
        let position = |id: usize| ids.iter().position(|&i| i == id);
        let mut outputs: Vec<Option<GenerationOutput>> = vec![None; ids.len()];
        let mut remaining = ids.len();
        let mut events = Vec::new();
        while remaining > 0 {
            events.clear();
            if let Err(e) = self.step(&mut events) {
                self.cancel_ids(&ids)?;
                return Err(e);
            }
            for e in &events {
                if let Some(p) = position(e.request) {
                    on_event(&TokenEvent {
                        request: p,
                        ..e.clone()
                    });
                }
            }
            for (id, out) in self.take_finished() {
                if let Some(p) = position(id) {
                    outputs[p] = Some(out);
                    remaining -= 1;
                }
            }
        }
        Ok(outputs
            .into_iter()
            .map(|o| o.expect("every request finishes"))
            .collect())
    }

    fn cancel_ids(&mut self, ids: &[usize]) -> Result<(), KvqError> {
        for &id in ids {
            self.cancel(id)?;
        }
        Ok(())
    }
}

/// The cache plan: `cache_memory_gib`, else `cache_max_entry_count` of `available` memory
/// (host memory on the CPU, device memory left after the weights on a GPU, as LMDeploy),
/// capped at what `max_batch_size` full sessions can use.
pub fn plan_cache(
    resolved: &ResolvedConfig,
    config: &EngineConfig,
    available: u64,
) -> Result<MemoryPlan, KvqError> {
    let e = &config.engine;
    // Every running sequence's recent window comes out of the same budget.
    let windows = (e.max_batch_size * resolved.recent_window_bytes()) as u64;
    let mut plan = match e.cache_memory_gib {
        Some(g) => resolved.plan_exact(((g * (1u64 << 30) as f64) as u64).saturating_sub(windows)),
        None => {
            let reserved = (windows as f64 / e.cache_max_entry_count) as u64;
            resolved.plan(available.saturating_sub(reserved), config)
        }
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
