//! What a caller asks for and what comes back.

use serde::Serialize;

use crate::sampling::SamplingParams;

/// One generation request, already tokenized.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Tokens that end generation besides the model's EOS.
    pub stop_ids: Vec<u32>,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence or stop token.
    Stop,
    /// `max_new_tokens` or the session length was reached.
    Length,
    /// The caller cancelled it.
    Cancelled,
}

/// A finished request.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
}

/// One step's news for one request, for streaming.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    /// Index of the request in submission order.
    pub request: usize,
    pub token: u32,
    /// Text that became printable with this token (may be empty mid-character).
    pub text: String,
    pub finished: Option<FinishReason>,
}
