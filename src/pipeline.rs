//! `Pipeline`: the library entry point, in the manner of LMDeploy's `pipeline`. It runs on the
//! async engine ([`EngineHandle`]): its calls submit requests and block until they finish, so
//! they must not be made from inside an async runtime's worker (use the handle there).

use std::path::Path;

use futures::stream::{self, StreamExt};

use engine_core::chat::{apply_chat_template, ChatMessage};
use engine_core::engine::{
    Engine, EngineEvent, EngineHandle, EngineInfo, GenerationOutput, LoadStage, Request,
};
use engine_core::sampling::SamplingParams;
use engine_core::{EngineConfig, KvqError};

/// Generation settings of a pipeline call.
#[derive(Debug, Clone, Default)]
pub struct GenerationConfig {
    pub sampling: SamplingParams,
    /// Send prompts as they are instead of wrapping each in the model's chat template as one
    /// user turn.
    pub raw_prompt: bool,
    /// Stop strings: generation ends before the first one in the text.
    pub stop: Vec<String>,
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
    engine: EngineHandle,
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
        Self::from_engine(Engine::load(&config, progress)?)
    }

    /// A pipeline over a loaded engine (moved onto its own thread).
    pub fn from_engine(engine: Engine) -> Result<Self, KvqError> {
        Ok(Self {
            engine: EngineHandle::spawn(engine)?,
            generation: GenerationConfig::default(),
        })
    }

    /// The async engine underneath, for submitting requests directly.
    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    /// The cache plan and limits the engine runs with.
    pub fn info(&self) -> &EngineInfo {
        self.engine.info()
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
        self.run(requests, on_text)
    }

    /// Continues a conversation: the reply to `messages`, streamed through `on_text`.
    pub fn chat(
        &mut self,
        messages: &[ChatMessage],
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerationOutput, KvqError> {
        let req = self.request(&self.render(messages)?)?;
        let mut out = self.run(vec![req], &mut |_, text| on_text(text))?;
        Ok(out.pop().expect("one request, one output"))
    }

    /// The model's chat template applied to `messages`, with the assistant turn opened.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, KvqError> {
        apply_chat_template(self.engine.tokenizer(), messages)
    }

    fn request(&self, text: &str) -> Result<Request, KvqError> {
        Ok(Request {
            prompt: self.engine.tokenizer().encode(text, true)?,
            params: self.generation.sampling.clone(),
            stop: self.generation.stop.clone(),
            ..Default::default()
        })
    }

    /// Submits `requests` together and waits for all of them, passing text on as it comes.
    fn run(
        &self,
        requests: Vec<Request>,
        on_text: &mut dyn FnMut(usize, &str),
    ) -> Result<Vec<GenerationOutput>, KvqError> {
        futures::executor::block_on(async {
            let mut streams = Vec::with_capacity(requests.len());
            for (i, r) in requests.into_iter().enumerate() {
                // An error drops the streams already made, which cancels their requests.
                let s = self.engine.submit(r).await?;
                streams.push(s.map(move |event| (i, event)));
            }
            let mut outputs: Vec<Option<GenerationOutput>> = vec![None; streams.len()];
            let mut events = stream::select_all(streams);
            while let Some((i, event)) = events.next().await {
                match event? {
                    EngineEvent::Token(t) => on_text(i, &t.text),
                    EngineEvent::Finished(out) => outputs[i] = Some(out),
                }
            }
            outputs
                .into_iter()
                .map(|o| o.ok_or_else(|| KvqError::Engine("a request ended unfinished".into())))
                .collect()
        })
    }
}
