//! What a caller asks for and what comes back.

use serde::Serialize;

use crate::sampling::{SamplingParams, TokenLogprobs};

/// One generation request, already tokenized.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Tokens that end generation besides the model's EOS.
    pub stop_ids: Vec<u32>,
    /// Strings that end generation where the generated text first contains one; the answer
    /// stops before it.
    pub stop: Vec<String>,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence or stop token, or a stop string.
    Stop,
    /// `max_new_tokens` or the session length was reached.
    Length,
    /// The caller cancelled it.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI API's spelling (`"stop"`, `"length"`, `"cancelled"`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// A finished request.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationOutput {
    /// The generated text, without a stop string that ended it.
    pub text: String,
    /// Generated tokens, without a stop token that ended it.
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    /// Tokens sampled (`token_ids` plus the stop token, if one ended it).
    pub completion_tokens: usize,
    pub finish_reason: FinishReason,
    /// With `params.logprobs`: one entry per completion token (`token_ids`, then the stop
    /// token that ended generation, if one did).
    pub logprobs: Option<Vec<TokenLogprobs>>,
    /// With `params.prompt_logprobs`: one entry per prompt token after the first.
    pub prompt_logprobs: Option<Vec<TokenLogprobs>>,
}

/// One step's news for one request, for streaming.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    /// The request's id (the index [`crate::engine::Engine::submit`] returned, or the
    /// position in the batch for [`crate::engine::Engine::generate`]).
    pub request: usize,
    pub token: u32,
    /// Text that became printable with this token (may be empty mid-character, or while it
    /// could still be the start of a stop string).
    pub text: String,
    pub finished: Option<FinishReason>,
    /// With `params.logprobs`: the token's log-probability and the top alternatives.
    pub logprobs: Option<TokenLogprobs>,
    /// With `params.prompt_logprobs`, on the first generated token's event: the prompt's
    /// log-probabilities (as in [`GenerationOutput::prompt_logprobs`]), for streaming echo.
    pub prompt_logprobs: Option<Vec<TokenLogprobs>>,
}
