//! `Pipeline`: the library entry point, in the manner of LMDeploy's `pipeline`.

use std::path::Path;

use engine_core::chat::{render_chat, ChatMessage, CHATML_TEMPLATE};
use engine_core::engine::{Engine, GenerationOutput, LoadStage, Request, TokenEvent};
use engine_core::sampling::SamplingParams;
use engine_core::{EngineConfig, KvqError};

/// Generation settings of a pipeline call.
#[derive(Debug, Clone, Default)]
pub struct GenerationConfig {
    pub sampling: SamplingParams,
    /// Send prompts as they are instead of wrapping each in the model's chat template as one
    /// user turn.
    pub raw_prompt: bool,
}

/// A loaded model with its quantized KV cache.
///
/// ```
/// use kvq::{EngineConfig, Pipeline};
///
/// let mut config = EngineConfig::default();
/// config.engine.quant_policy = kvq::config::QuantPolicy::Number(8); // int8 KV cache
/// config.engine.cache_memory_gib = Some(0.25);
/// let mut pipe = Pipeline::new("models/SmolLM2-135M-Instruct.Q4_1.gguf", config)?;
/// let out = pipe.infer(&["What is the capital of France?"])?;
/// assert!(!out[0].token_ids.is_empty());
/// println!("{} ({:?})", out[0].text, out[0].finish_reason);
/// # Ok::<(), kvq::KvqError>(())
/// ```
pub struct Pipeline {
    engine: Engine,
    pub generation: GenerationConfig,
}

impl Pipeline {
    /// Loads `model_path` (overriding `config.model.path`) with `config`.
    pub fn new(model_path: impl AsRef<Path>, config: EngineConfig) -> Result<Self, KvqError> {
        Self::with_progress(model_path, config, &mut |_| {})
    }

    /// Like [`Pipeline::new`], reporting each loading stage.
    pub fn with_progress(
        model_path: impl AsRef<Path>,
        mut config: EngineConfig,
        progress: &mut dyn FnMut(LoadStage),
    ) -> Result<Self, KvqError> {
        config.model.path = model_path.as_ref().display().to_string();
        let engine = Engine::load(&config, progress)?;
        let generation = GenerationConfig {
            sampling: SamplingParams::default(),
            raw_prompt: false,
        };
        Ok(Self { engine, generation })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Generates a reply to every prompt (batched), with [`Pipeline::generation`] settings.
    pub fn infer(&mut self, prompts: &[&str]) -> Result<Vec<GenerationOutput>, KvqError> {
        self.stream(prompts, &mut |_, _| {})
    }

    /// Like [`Pipeline::infer`], calling `on_text(prompt_index, text)` as text arrives.
    pub fn stream(
        &mut self,
        prompts: &[&str],
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<Vec<GenerationOutput>, KvqError> {
        let requests = prompts
            .iter()
            .map(|p| {
                let text = if self.generation.raw_prompt {
                    p.to_string()
                } else {
                    self.render(&[ChatMessage::new("user", p)])?
                };
                self.request(&text)
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.engine
            .generate(requests, &mut |e: &TokenEvent| on_text(e.request, &e.text))
    }

    /// Continues a conversation: the reply to `messages`, streamed through `on_text`.
    pub fn chat(
        &mut self,
        messages: &[ChatMessage],
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerationOutput, KvqError> {
        let req = self.request(&self.render(messages)?)?;
        let mut out = self
            .engine
            .generate(vec![req], &mut |e: &TokenEvent| on_text(&e.text))?;
        Ok(out.pop().expect("one request, one output"))
    }

    /// The model's chat template applied to `messages`, with the assistant turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, KvqError> {
        let tok = &self.engine.tokenizer;
        let name = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
        let template = tok.chat_template().unwrap_or(CHATML_TEMPLATE);
        render_chat(
            template,
            messages,
            true,
            &name(tok.bos_id()),
            &name(tok.eos_id()),
        )
    }

    fn request(&self, text: &str) -> Result<Request, KvqError> {
        Ok(Request {
            prompt: self.engine.tokenizer.encode(text, true)?,
            params: self.generation.sampling.clone(),
            stop_ids: Vec::new(),
        })
    }
}
