//! `POST /v1/completions` and `POST /v1/chat/completions`, whole or streamed as server-sent
//! events (`data: {chunk}` lines, then `data: [DONE]`). A streamed request lives as long as
//! its response body: a client that disconnects drops the body, which cancels the request.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};

use engine_core::chat::apply_chat_template;
use engine_core::engine::{EngineEvent, EventResult, EventStream, GenerationOutput, Request};

use super::error::{ApiError, ApiJson};
use super::protocol::{ChatRequest, CompletionRequest, Generation, Prompt};
use super::AppState;

/// Completions' default `max_tokens`, as OpenAI's.
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

pub async fn completions(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    s.check_model(&req.model)?;
    let prompt = req.prompt()?;
    let generation = req.sampling.check(COMPLETIONS_DEFAULT_MAX_TOKENS)?;
    let tok = s.engine.tokenizer();
    let ids = match prompt {
        Prompt::Text(t) => tok.encode(&t, true)?,
        Prompt::Tokens(ids) => {
            let vocab = s.engine.info().vocab_size;
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::invalid_param(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary of {vocab}"),
                ));
            }
            ids
        }
    };
    run(&s, ids, "prompt", generation, Kind::Completion).await
}

pub async fn chat(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    s.check_model(&req.model)?;
    let messages = req.messages()?;
    // Without a limit a reply may fill the session.
    let generation = req.sampling.check(usize::MAX)?;
    let tok = s.engine.tokenizer();
    let ids = tok.encode(&apply_chat_template(tok, &messages)?, true)?;
    run(&s, ids, "messages", generation, Kind::Chat).await
}

/// Submits the prompt and answers whole or as a stream.
async fn run(
    s: &AppState,
    prompt: Vec<u32>,
    param: &str,
    g: Generation,
    kind: Kind,
) -> Result<Response, ApiError> {
    let session_len = s.engine.info().session_len;
    if prompt.len() >= session_len {
        return Err(ApiError::invalid_param(
            param,
            format!(
                "This model's maximum context length is {session_len} tokens, and the prompt \
                 has {} tokens (at least one more must fit to generate).",
                prompt.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let events = s
        .engine
        .submit(Request {
            prompt,
            params: g.params,
            stop: g.stop,
            ..Default::default()
        })
        .await?;
    let reply = Reply {
        kind,
        id: format!("{}-{}", kind.id_prefix(), random_id()),
        created: super::unix_time(),
        model: s.model.clone(),
        include_usage: g.include_usage,
    };
    if g.stream {
        Ok(sse(events, reply).into_response())
    } else {
        let out = output(events).await?;
        Ok(Json(reply.whole(&out)).into_response())
    }
}

/// Waits for the request's output.
async fn output(mut events: EventStream) -> Result<GenerationOutput, ApiError> {
    while let Some(event) = events.next().await {
        if let EngineEvent::Finished(out) = event? {
            return Ok(out);
        }
    }
    Err(ApiError::internal("the request ended without an output"))
}

/// The response as server-sent events: (chat) a first chunk with the role, a chunk per piece
/// of text, a last chunk with the finish reason, (if asked) a usage chunk, then `[DONE]`.
fn sse(events: EventStream, reply: Reply) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let reply = Arc::new(reply);
    let head = reply.first_chunk();
    let r = reply.clone();
    let body = events.flat_map(move |e| stream::iter(r.chunks(e)));
    let data = |v: Value| Event::default().data(v.to_string());
    let all = stream::iter(head.map(data))
        .chain(body.map(data))
        .chain(stream::once(async { Event::default().data("[DONE]") }))
        .map(Ok);
    Sse::new(all).keep_alive(KeepAlive::default())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

impl Kind {
    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        }
    }
}

/// What every chunk of one response repeats.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: Arc<str>,
    include_usage: bool,
}

impl Reply {
    fn usage(out: &GenerationOutput) -> Value {
        json!({
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
        })
    }

    /// The non-streamed body.
    fn whole(&self, out: &GenerationOutput) -> Value {
        let reason = out.finish_reason.as_str();
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": null,
                "finish_reason": reason,
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": out.text,
                "logprobs": null,
                "finish_reason": reason,
            }),
        };
        json!({
            "id": self.id,
            "object": match self.kind {
                Kind::Chat => "chat.completion",
                Kind::Completion => "text_completion",
            },
            "created": self.created,
            "model": &*self.model,
            "choices": [choice],
            "usage": Self::usage(out),
        })
    }

    /// A chunk with `choices` (and `"usage": null` when usage comes at the end).
    fn chunk(&self, choices: Value) -> Value {
        let mut c = json!({
            "id": self.id,
            "object": match self.kind {
                Kind::Chat => "chat.completion.chunk",
                Kind::Completion => "text_completion",
            },
            "created": self.created,
            "model": &*self.model,
            "choices": choices,
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// One choice of a chunk carrying `text`.
    fn choice(&self, text: Option<&str>, finish_reason: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => json!([{
                "index": 0,
                "delta": text.map_or(json!({}), |t| json!({"content": t})),
                "logprobs": null,
                "finish_reason": finish_reason,
            }]),
            Kind::Completion => json!([{
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish_reason,
            }]),
        }
    }

    /// Chat streams open with the assistant's role.
    fn first_chunk(&self) -> Option<Value> {
        (self.kind == Kind::Chat).then(|| {
            self.chunk(json!([{
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": null,
                "finish_reason": null,
            }]))
        })
    }

    /// The chunks one engine event becomes.
    fn chunks(&self, event: EventResult) -> Vec<Value> {
        match event {
            Ok(EngineEvent::Token(t)) if t.text.is_empty() => Vec::new(),
            Ok(EngineEvent::Token(t)) => vec![self.chunk(self.choice(Some(&t.text), None))],
            Ok(EngineEvent::Finished(out)) => {
                let mut v = vec![self.chunk(self.choice(None, Some(out.finish_reason.as_str())))];
                if self.include_usage {
                    let mut u = self.chunk(json!([]));
                    u["usage"] = Self::usage(&out);
                    v.push(u);
                }
                v
            }
            // Headers are sent: the error goes in the stream, as OpenAI-compatible servers do.
            Err(e) => vec![ApiError::from(e).body()],
        }
    }
}

/// 24 random hex digits.
fn random_id() -> String {
    format!("{:024x}", rand::random::<u128>() >> 32)
}
