//! `POST /v1/completions` and `POST /v1/chat/completions`, whole or streamed as server-sent
//! events (`data: {chunk}` lines, then `data: [DONE]`). A streamed request lives as long as
//! its response body: a client that disconnects drops the body, which cancels the request.
//! `n` choices are `n` engine requests (seeds `seed`, `seed + 1`, …) answered as one.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};

use engine_core::chat::apply_chat_template;
use engine_core::engine::{
    AsyncEngine, EngineEvent, EventResult, EventStream, GenerationOutput, Request, TokenEvent,
};
use engine_core::sampling::TokenLogprobs;

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
    let prompts = req.prompts()?;
    let mut generation = req
        .sampling
        .check(COMPLETIONS_DEFAULT_MAX_TOKENS, req.logprobs()?)?;
    let echo = req.echo();
    if echo {
        generation.params.prompt_logprobs = generation.params.logprobs;
    }
    let best_of = req.best_of(&generation)?;
    let tok = s.engine.tokenizer();
    let vocab = s.engine.info().vocab_size;
    let prompts = prompts
        .into_iter()
        .map(|prompt| match prompt {
            Prompt::Text(text) => Ok(Prompted {
                ids: tok.encode(&text, true)?,
                text,
            }),
            Prompt::Tokens(ids) => {
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(ApiError::invalid_param(
                        "prompt",
                        format!("token id {bad} is outside the vocabulary of {vocab}"),
                    ));
                }
                let text = tok.decode(&ids)?;
                Ok(Prompted { ids, text })
            }
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let kind = Kind::Completion { echo };
    run(&s, prompts, "prompt", generation, kind, best_of).await
}

pub async fn chat(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    s.check_model(&req.model)?;
    let messages = req.messages()?;
    // Without a limit a reply may fill the session.
    let generation = req.sampling.check(usize::MAX, req.logprobs()?)?;
    let tok = s.engine.tokenizer();
    let text = apply_chat_template(tok, &messages)?;
    let prompt = Prompted {
        ids: tok.encode(&text, true)?,
        text,
    };
    let n = generation.n;
    run(&s, vec![prompt], "messages", generation, Kind::Chat, n).await
}

/// One prompt of a request: the tokens the engine runs and its text (what `echo` returns).
struct Prompted {
    ids: Vec<u32>,
    text: String,
}

/// Submits `candidates` engine requests per prompt (seeds `seed`, `seed + 1`, …), keeps the
/// best `n` of each prompt's (all of them when `candidates == n`) so that choice `c` answers
/// prompt `c / n`, and answers whole or as a stream.
async fn run(
    s: &AppState,
    prompts: Vec<Prompted>,
    param: &str,
    mut g: Generation,
    kind: Kind,
    candidates: usize,
) -> Result<Response, ApiError> {
    let session_len = s.engine.info().session_len;
    if let Some(long) = prompts.iter().find(|p| p.ids.len() >= session_len) {
        return Err(ApiError::invalid_param(
            param,
            format!(
                "This model's maximum context length is {session_len} tokens, and the prompt \
                 has {} tokens (at least one more must fit to generate).",
                long.ids.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    // Ranking candidates needs their log-probabilities.
    let logprobs_wanted = g.params.logprobs.is_some();
    if candidates > g.n {
        g.params.logprobs.get_or_insert(0);
    }
    let mut choices = Vec::with_capacity(prompts.len() * candidates);
    for (c, prompt) in (0..prompts.len() * candidates).map(|c| (c, &prompts[c / candidates])) {
        let mut params = g.params.clone();
        params.seed = params.seed.wrapping_add((c % candidates) as u64);
        // Dropping the streams already submitted (on an error here) cancels them.
        choices.push(
            s.engine
                .submit(Request {
                    prompt: prompt.ids.clone(),
                    params,
                    stop: g.stop.clone(),
                    ..Default::default()
                })
                .await?,
        );
    }
    let reply = Reply {
        id: format!("{}-{}", kind.id_prefix(), random_id()),
        kind,
        created: super::unix_time(),
        model: s.model.clone(),
        include_usage: g.include_usage,
        engine: s.engine.clone(),
        prompts,
        n: g.n,
    };
    if g.stream {
        Ok(sse(choices, reply).into_response())
    } else {
        let outs = futures::future::try_join_all(choices.into_iter().map(output)).await?;
        // Usage counts every candidate generated, as OpenAI's does.
        let usage = outs.iter().fold(reply.prompt_usage(), |u, o| u.add(o));
        let mut outs = best_of_each(outs, candidates, reply.n);
        if !logprobs_wanted {
            outs.iter_mut().for_each(|o| o.logprobs = None);
        }
        Ok(Json(reply.whole(&outs, usage)).into_response())
    }
}

/// The `n` outputs of each run of `candidates` (one prompt's) with the highest total
/// log-probability, best first (as vLLM ranks `best_of`); all of them, in order, when
/// `candidates == n`.
fn best_of_each(outs: Vec<GenerationOutput>, candidates: usize, n: usize) -> Vec<GenerationOutput> {
    if candidates == n {
        return outs;
    }
    let total = |o: &GenerationOutput| -> f64 {
        let lps = o.logprobs.as_deref().unwrap_or_default();
        lps.iter().map(|l| f64::from(l.logprob)).sum()
    };
    let mut outs = outs.into_iter();
    let mut best = Vec::new();
    loop {
        let mut group: Vec<GenerationOutput> = outs.by_ref().take(candidates).collect();
        if group.is_empty() {
            return best;
        }
        group.sort_by(|a, b| total(b).total_cmp(&total(a)));
        best.extend(group.into_iter().take(n));
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

/// The response as server-sent events: (chat) a first chunk per choice with the role, a chunk
/// per piece of text (per token when log-probabilities are asked for), a last chunk per
/// choice with its finish reason, (if asked) a usage chunk once every choice has finished,
/// then `[DONE]`.
fn sse(
    choices: Vec<EventStream>,
    reply: Reply,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let n = choices.len();
    let reply = Arc::new(reply);
    let progress = Arc::new(Mutex::new(StreamProgress {
        text_offsets: vec![0; n],
        echoed: vec![false; n],
        usage: reply.prompt_usage(),
    }));
    let head: Vec<Value> = (0..n).filter_map(|i| reply.first_chunk(i)).collect();
    let (r, p) = (reply.clone(), progress.clone());
    let body = stream::select_all(
        choices
            .into_iter()
            .enumerate()
            .map(|(i, events)| events.map(move |e| (i, e))),
    )
    .flat_map(move |(i, e)| stream::iter(r.chunks(i, e, &p)));
    let usage = stream::once(async move {
        let usage = progress.lock().map(|p| p.usage);
        match usage {
            Ok(u) if reply.include_usage => Some(reply.usage_chunk(u)),
            _ => None,
        }
    })
    .filter_map(|c| async move { c });
    let data = |v: Value| Event::default().data(v.to_string());
    let all = stream::iter(head)
        .chain(body)
        .chain(usage)
        .map(data)
        .chain(stream::once(async { Event::default().data("[DONE]") }))
        .map(Ok);
    Sse::new(all).keep_alive(KeepAlive::default())
}

/// What a stream has seen so far: where each completion choice's text has got to (for
/// `text_offset`) and the usage so far (the prompts, the choices that have finished).
struct StreamProgress {
    text_offsets: Vec<usize>,
    /// Whether each choice has sent its echo of the prompt (with its first token).
    echoed: Vec<bool>,
    usage: Usage,
}

/// Token counts of a response: each prompt once, the completions of every choice summed.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
}

impl Usage {
    fn add(self, out: &GenerationOutput) -> Self {
        Self {
            completion_tokens: self.completion_tokens + out.completion_tokens,
            ..self
        }
    }

    fn json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `echo`: the prompt goes before each choice's text (and its tokens before the
    /// log-probabilities).
    Completion {
        echo: bool,
    },
    Chat,
}

impl Kind {
    fn id_prefix(&self) -> &'static str {
        match self {
            Kind::Completion { .. } => "cmpl",
            Kind::Chat => "chatcmpl",
        }
    }

    fn is_chat(&self) -> bool {
        matches!(self, Kind::Chat)
    }
}

/// What every chunk of one response repeats, and the engine whose tokenizer spells tokens.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: Arc<str>,
    include_usage: bool,
    engine: Arc<dyn AsyncEngine>,
    prompts: Vec<Prompted>,
    /// Choices per prompt.
    n: usize,
}

/// OpenAI's stand-in for a log-probability of minus infinity (JSON has no infinities).
const LOGPROB_FLOOR: f32 = -9999.0;

impl Reply {
    /// The usage before any choice has finished: every prompt's tokens.
    fn prompt_usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompts.iter().map(|p| p.ids.len()).sum(),
            completion_tokens: 0,
        }
    }

    /// The non-streamed body.
    fn whole(&self, outs: &[GenerationOutput], usage: Usage) -> Value {
        let choices: Vec<Value> = outs
            .iter()
            .enumerate()
            .map(|(index, out)| {
                let reason = out.finish_reason.as_str();
                match &self.kind {
                    Kind::Chat => json!({
                        "index": index,
                        "message": {"role": "assistant", "content": out.text},
                        "logprobs": out.logprobs.as_ref().map_or(Value::Null, |lp| self.chat_logprobs(lp)),
                        "finish_reason": reason,
                    }),
                    Kind::Completion { echo } => {
                        let prompt = echo.then(|| &self.prompts[index / self.n]);
                        let text = prompt.map_or("", |p| &p.text).to_string() + &out.text;
                        let logprobs = out.logprobs.as_ref().map_or(Value::Null, |lp| {
                            let mut entries = Vec::new();
                            if let Some(p) = prompt {
                                let scored = out.prompt_logprobs.as_deref().unwrap_or_default();
                                entries = prompt_entries(p, scored);
                            }
                            entries.extend(lp.iter().map(Entry::Scored));
                            self.completion_logprobs(&entries, &mut 0)
                        });
                        json!({
                            "index": index,
                            "text": text,
                            "logprobs": logprobs,
                            "finish_reason": reason,
                        })
                    }
                }
            })
            .collect();
        json!({
            "id": self.id,
            "object": match self.kind {
                Kind::Chat => "chat.completion",
                Kind::Completion { .. } => "text_completion",
            },
            "created": self.created,
            "model": &*self.model,
            "choices": choices,
            "usage": usage.json(),
        })
    }

    /// A chunk with `choices` (and `"usage": null` when usage comes at the end).
    fn chunk(&self, choices: Value) -> Value {
        let mut c = json!({
            "id": self.id,
            "object": match self.kind {
                Kind::Chat => "chat.completion.chunk",
                Kind::Completion { .. } => "text_completion",
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

    fn usage_chunk(&self, usage: Usage) -> Value {
        let mut u = self.chunk(json!([]));
        u["usage"] = usage.json();
        u
    }

    /// Choice `index` of a chunk carrying `text` (and its tokens' log-probabilities).
    fn choice(
        &self,
        index: usize,
        text: Option<&str>,
        finish_reason: Option<&str>,
        logprobs: Value,
    ) -> Value {
        match self.kind {
            Kind::Chat => json!([{
                "index": index,
                "delta": text.map_or(json!({}), |t| json!({"content": t})),
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }]),
            Kind::Completion { .. } => json!([{
                "index": index,
                "text": text.unwrap_or(""),
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }]),
        }
    }

    /// Chat streams open each choice with the assistant's role.
    fn first_chunk(&self, index: usize) -> Option<Value> {
        self.kind.is_chat().then(|| {
            self.chunk(json!([{
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": null,
                "finish_reason": null,
            }]))
        })
    }

    /// The chunks one engine event of choice `index` becomes.
    fn chunks(
        &self,
        index: usize,
        event: EventResult,
        progress: &Mutex<StreamProgress>,
    ) -> Vec<Value> {
        let Ok(mut progress) = progress.lock() else {
            return vec![ApiError::internal("stream state poisoned").body()];
        };
        match event {
            Ok(EngineEvent::Token(t)) => {
                let mut chunks = Vec::new();
                if self.kind == (Kind::Completion { echo: true }) && !progress.echoed[index] {
                    chunks.push(self.echo_chunk(index, &t, &mut progress));
                }
                chunks.extend(self.token_chunk(index, &t, &mut progress));
                chunks
            }
            Ok(EngineEvent::Finished(out)) => {
                progress.usage = progress.usage.add(&out);
                let reason = out.finish_reason.as_str();
                vec![self.chunk(self.choice(index, None, Some(reason), Value::Null))]
            }
            // Headers are sent: the error goes in the stream, as OpenAI-compatible servers do.
            Err(e) => vec![ApiError::from(e).body()],
        }
    }

    /// The echo of choice `index`'s prompt, sent with its first token (whose event carries
    /// the prompt's log-probabilities).
    fn echo_chunk(&self, index: usize, first: &TokenEvent, progress: &mut StreamProgress) -> Value {
        progress.echoed[index] = true;
        let prompt = &self.prompts[index / self.n];
        // Offsets matter only with log-probabilities; the echo's start the choice's count.
        let logprobs = match (&first.logprobs, &first.prompt_logprobs) {
            (Some(_), Some(scored)) => {
                let entries = prompt_entries(prompt, scored);
                self.completion_logprobs(&entries, &mut progress.text_offsets[index])
            }
            _ => Value::Null,
        };
        self.chunk(self.choice(index, Some(&prompt.text), None, logprobs))
    }

    /// The chunk a generated token becomes: its text and, when asked for, its
    /// log-probabilities (sent even while its text is held back); none for held-back text
    /// without them.
    fn token_chunk(
        &self,
        index: usize,
        t: &TokenEvent,
        progress: &mut StreamProgress,
    ) -> Option<Value> {
        let Some(lp) = &t.logprobs else {
            return (!t.text.is_empty())
                .then(|| self.chunk(self.choice(index, Some(&t.text), None, Value::Null)));
        };
        let logprobs = match self.kind {
            Kind::Chat => self.chat_logprobs(std::slice::from_ref(lp)),
            Kind::Completion { .. } => {
                let offset = &mut progress.text_offsets[index];
                self.completion_logprobs(&[Entry::Scored(lp)], offset)
            }
        };
        Some(self.chunk(self.choice(index, Some(&t.text), None, logprobs)))
    }

    /// How the tokenizer spells one token (special tokens included).
    fn token_text(&self, id: u32) -> String {
        self.engine
            .tokenizer()
            .decode_with(&[id], false)
            .unwrap_or_default()
    }

    /// Chat's log-probabilities: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
    fn chat_logprobs(&self, lps: &[TokenLogprobs]) -> Value {
        let entry = |id: u32, lp: f32| {
            let text = self.token_text(id);
            json!({"token": text, "logprob": lp.max(LOGPROB_FLOOR), "bytes": text.as_bytes()})
        };
        let content: Vec<Value> = lps
            .iter()
            .map(|lp| {
                let mut e = entry(lp.token, lp.logprob);
                e["top_logprobs"] = lp.top.iter().map(|&(id, l)| entry(id, l)).collect();
                e
            })
            .collect();
        json!({"content": content, "refusal": null})
    }

    /// The completions API's log-probabilities: parallel lists `tokens`, `token_logprobs`,
    /// `top_logprobs` (null where a token was not scored) and `text_offset`, counted in
    /// characters from `offset`, which is moved past the entries' text.
    fn completion_logprobs(&self, entries: &[Entry<'_>], offset: &mut usize) -> Value {
        let (mut tokens, mut token_logprobs, mut tops, mut offsets) =
            (vec![], vec![], vec![], vec![]);
        for entry in entries {
            let (id, scored) = match *entry {
                Entry::Scored(lp) => (lp.token, Some(lp)),
                Entry::Unscored(id) => (id, None),
            };
            let text = self.token_text(id);
            offsets.push(*offset);
            *offset += text.chars().count();
            tokens.push(text);
            token_logprobs.push(scored.map(|lp| lp.logprob.max(LOGPROB_FLOOR)));
            tops.push(scored.map(|lp| {
                lp.top
                    .iter()
                    .map(|&(id, l)| (self.token_text(id), json!(l.max(LOGPROB_FLOOR))))
                    .collect::<serde_json::Map<String, Value>>()
            }));
        }
        json!({
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": tops,
            "text_offset": offsets,
        })
    }
}

/// An echoed prompt's log-probability entries: its first token unscored (nothing before it to
/// score it), then the scored ones.
fn prompt_entries<'a>(prompt: &Prompted, scored: &'a [TokenLogprobs]) -> Vec<Entry<'a>> {
    let first = prompt.ids.first().map(|&id| Entry::Unscored(id));
    first
        .into_iter()
        .chain(scored.iter().map(Entry::Scored))
        .collect()
}

/// One token of a completion's log-probabilities: scored, or the echoed prompt's first token
/// (nothing before it to score it).
enum Entry<'a> {
    Scored(&'a TokenLogprobs),
    Unscored(u32),
}

/// 24 random hex digits.
fn random_id() -> String {
    format!("{:024x}", rand::random::<u128>() >> 32)
}
