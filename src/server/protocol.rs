//! The OpenAI request bodies this server reads, and their checks: every value out of range
//! or not supported is a 400 naming the field.

use serde::Deserialize;
use serde_json::Value;

use engine_core::chat::ChatMessage;
use engine_core::sampling::{SamplingParams, MAX_TOP_LOGPROBS};

use super::error::ApiError;

/// The most choices (`n`) one request may ask for; each is a request of its own in the engine.
pub const MAX_CHOICES: i64 = 16;

/// The most engine requests (prompts × `n`) one completions request may make.
pub const MAX_PROMPT_CHOICES: usize = 256;

/// Sampling and streaming fields shared by both endpoints (OpenAI's names; `top_k`,
/// `repetition_penalty` and `ignore_eos` are extensions, as in vLLM and LMDeploy).
/// `logprobs` is read by each endpoint (an integer for completions, a flag for chat).
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    pub stop: Option<Value>,
    pub ignore_eos: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    /// A string, an array of one string, or an array of token ids.
    pub prompt: Value,
    pub echo: Option<bool>,
    pub best_of: Option<i64>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<InMessage>,
    pub tools: Option<Value>,
    pub response_format: Option<Value>,
    pub top_logprobs: Option<Value>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// A chat message; `content` is a string or an array of `{"type": "text", "text": ...}`.
#[derive(Debug, Deserialize)]
pub struct InMessage {
    pub role: String,
    pub content: Option<Value>,
}

/// A prompt as the completions endpoint received it.
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// What a request asks the engine for, checked.
#[derive(Debug, Clone)]
pub struct Generation {
    pub params: SamplingParams,
    /// Choices to generate (OpenAI's `n`), each with seed `params.seed + i`.
    pub n: usize,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

impl SamplingFields {
    /// Checks every field; `default_max_tokens` applies when neither `max_tokens` nor
    /// `max_completion_tokens` is given; `logprobs` is what the endpoint read from its own
    /// log-probability fields.
    pub fn check(
        &self,
        default_max_tokens: usize,
        logprobs: Option<usize>,
    ) -> Result<Generation, ApiError> {
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_CHOICES).contains(&n) {
            return Err(ApiError::invalid_param(
                "n",
                format!("n must be between 1 and {MAX_CHOICES}, got {n}"),
            ));
        }
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => Some(("max_completion_tokens", m)),
            (None, Some(m)) => Some(("max_tokens", m)),
            (None, None) => None,
        };
        let max_new_tokens = match max_tokens {
            Some((name, m)) if m < 1 => {
                return Err(ApiError::invalid_param(
                    name,
                    format!("{name} must be at least 1, got {m}"),
                ))
            }
            Some((_, m)) => m as usize,
            None => default_max_tokens,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid_param(
                "temperature",
                format!("temperature must be in [0, 2], got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid_param(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let top_k = match self.top_k.unwrap_or(0) {
            -1 => 0, // vLLM's spelling of "no limit"
            k if k < 0 => {
                return Err(ApiError::invalid_param(
                    "top_k",
                    format!("top_k must be ≥ 0 (0 or -1: no limit), got {k}"),
                ))
            }
            k => k as usize,
        };
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
            return Err(ApiError::invalid_param(
                "repetition_penalty",
                format!("repetition_penalty must be > 0, got {repetition_penalty}"),
            ));
        }
        let mut penalties = [0.0f32; 2];
        for ((name, v), out) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ]
        .into_iter()
        .zip(&mut penalties)
        {
            let v = v.unwrap_or(0.0);
            if !(-2.0..=2.0).contains(&v) {
                return Err(ApiError::invalid_param(
                    name,
                    format!("{name} must be in [-2, 2], got {v}"),
                ));
            }
            *out = v as f32;
        }
        let seed = match self.seed {
            Some(s) => s as u64,
            None => rand::random(),
        };
        Ok(Generation {
            params: SamplingParams {
                temperature: temperature as f32,
                top_k,
                top_p: top_p as f32,
                repetition_penalty: repetition_penalty as f32,
                presence_penalty: penalties[0],
                frequency_penalty: penalties[1],
                logprobs,
                prompt_logprobs: None,
                max_new_tokens,
                seed,
                ignore_eos: self.ignore_eos.unwrap_or(false),
            },
            n: n as usize,
            stop: stop_strings(self.stop.as_ref())?,
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        })
    }
}

/// A count of top log-probabilities in `0..=MAX_TOP_LOGPROBS`, or a 400 naming `param`.
fn top_count(param: &str, v: &Value) -> Result<usize, ApiError> {
    v.as_u64()
        .filter(|&n| n <= MAX_TOP_LOGPROBS as u64)
        .map(|n| n as usize)
        .ok_or_else(|| {
            ApiError::invalid_param(
                param,
                format!("{param} must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {v}"),
            )
        })
}

/// `stop`: null, a string, or an array of strings.
fn stop_strings(stop: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::invalid_param("stop", "stop must be a string or an array of strings");
    let stops = match stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param(
            "stop",
            "stop strings must not be empty",
        ));
    }
    Ok(stops)
}

impl CompletionRequest {
    /// `logprobs`: absent or null (none), or how many top alternatives to report per token.
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match &self.sampling.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => Ok(None),
            Some(v) => top_count("logprobs", v).map(Some),
        }
    }

    /// `echo`: whether each choice's text starts with the prompt (and, with `logprobs`,
    /// its log-probabilities with the prompt's; streamed, in a chunk before the first token's).
    pub fn echo(&self) -> bool {
        self.echo.unwrap_or(false)
    }

    /// `best_of`: candidates generated per prompt, of which the `n` with the highest total
    /// log-probability are returned (at least `n`, at most [`MAX_CHOICES`], not streamed).
    pub fn best_of(&self, g: &Generation) -> Result<usize, ApiError> {
        let Some(best_of) = self.best_of else {
            return Ok(g.n);
        };
        let bad = |m: String| ApiError::invalid_param("best_of", m);
        if best_of < g.n as i64 || best_of > MAX_CHOICES {
            return Err(bad(format!(
                "best_of must be between n ({}) and {MAX_CHOICES}, got {best_of}",
                g.n
            )));
        }
        if g.stream && best_of as usize > g.n {
            return Err(bad("best_of greater than n cannot be streamed".into()));
        }
        Ok(best_of as usize)
    }

    /// The prompts (OpenAI takes a string, an array of strings, an array of token ids or an
    /// array of such arrays), and the checks of fields this server does not implement.
    pub fn prompts(&self) -> Result<Vec<Prompt>, ApiError> {
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid_param("suffix", "suffix is not supported"));
        }
        let bad = |m: &str| ApiError::invalid_param("prompt", m);
        let shapes = "prompt must be a string, an array of strings, an array of token ids or \
                      an array of such arrays";
        let tokens = |items: &[Value]| -> Option<Vec<u32>> {
            items
                .iter()
                .map(|v| v.as_u64().map(|t| t.min(u32::MAX as u64) as u32))
                .collect()
        };
        let prompts = match &self.prompt {
            Value::String(s) => vec![Prompt::Text(s.clone())],
            Value::Array(items) if items.is_empty() => return Err(bad("prompt must not be empty")),
            Value::Array(items) if items.iter().all(Value::is_string) => items
                .iter()
                .map(|v| Prompt::Text(v.as_str().unwrap_or_default().to_string()))
                .collect(),
            Value::Array(items) if items.iter().all(Value::is_array) => items
                .iter()
                .map(|v| match v.as_array().and_then(|a| tokens(a)) {
                    Some(t) if !t.is_empty() => Ok(Prompt::Tokens(t)),
                    _ => Err(bad(
                        "a nested prompt must be a non-empty array of token ids",
                    )),
                })
                .collect::<Result<_, _>>()?,
            Value::Array(items) => vec![Prompt::Tokens(tokens(items).ok_or_else(|| bad(shapes))?)],
            _ => return Err(bad(shapes)),
        };
        let per_prompt = self.sampling.n.max(self.best_of).unwrap_or(1).max(1) as usize;
        let choices = prompts.len() * per_prompt;
        if choices > MAX_PROMPT_CHOICES {
            return Err(bad(&format!(
                "at most {MAX_PROMPT_CHOICES} prompts times n (or best_of) per request, got {choices}"
            )));
        }
        Ok(prompts)
    }
}

impl ChatRequest {
    /// `logprobs` (a flag) and `top_logprobs` (how many alternatives, only with the flag).
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        let top = match &self.top_logprobs {
            None | Some(Value::Null) => None,
            Some(v) => Some(top_count("top_logprobs", v)?),
        };
        match &self.sampling.logprobs {
            Some(Value::Bool(true)) => Ok(Some(top.unwrap_or(0))),
            None | Some(Value::Null) | Some(Value::Bool(false)) => match top {
                None => Ok(None),
                Some(_) => Err(ApiError::invalid_param(
                    "top_logprobs",
                    "top_logprobs needs logprobs set to true",
                )),
            },
            Some(v) => Err(ApiError::invalid_param(
                "logprobs",
                format!("logprobs must be true or false, got {v}"),
            )),
        }
    }

    /// The conversation, and the checks of fields this server does not implement.
    pub fn messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self
            .tools
            .as_ref()
            .is_some_and(|t| !(t.is_null() || t.as_array().is_some_and(Vec::is_empty)))
        {
            return Err(ApiError::invalid_param("tools", "tools are not supported"));
        }
        if let Some(f) = &self.response_format {
            if !(f.is_null() || f.get("type").and_then(Value::as_str) == Some("text")) {
                return Err(ApiError::invalid_param(
                    "response_format",
                    "only the text response format is supported",
                ));
            }
        }
        if self.messages.is_empty() {
            return Err(ApiError::invalid_param(
                "messages",
                "messages must not be empty",
            ));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let param = format!("messages[{i}].content");
                let content = match &m.content {
                    // An assistant turn that only called tools has no content.
                    None | Some(Value::Null) if m.role == "assistant" => String::new(),
                    None | Some(Value::Null) => {
                        return Err(ApiError::invalid_param(
                            &param,
                            format!("a {} message needs content", m.role),
                        ))
                    }
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .map(
                            |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                                (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                                _ => Err(ApiError::invalid_param(
                                    &param,
                                    "only text content parts are supported",
                                )),
                            },
                        )
                        .collect::<Result<Vec<_>, _>>()?
                        .concat(),
                    Some(_) => {
                        return Err(ApiError::invalid_param(
                            &param,
                            "content must be a string or an array of text parts",
                        ))
                    }
                };
                // OpenAI's newer name for the system turn.
                let role = if m.role == "developer" {
                    "system"
                } else {
                    &m.role
                };
                Ok(ChatMessage::new(role, &content))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> SamplingFields {
        serde_json::from_str(json).unwrap()
    }

    fn error(json: &str) -> ApiError {
        fields(json).check(16, None).unwrap_err()
    }

    #[test]
    fn defaults_follow_openai() {
        let g = fields("{}").check(16, None).unwrap();
        assert_eq!(g.n, 1);
        assert_eq!(g.params.logprobs, None);
        assert_eq!(g.params.max_new_tokens, 16);
        assert_eq!(g.params.temperature, 1.0);
        assert!(!g.stream && !g.include_usage && g.stop.is_empty());
        let g = fields(
            r#"{"max_completion_tokens": 3, "max_tokens": 9, "seed": 5, "top_k": -1,
            "stop": "\n", "stream": true, "stream_options": {"include_usage": true},
            "n": 3, "presence_penalty": 0.5, "frequency_penalty": -1}"#,
        )
        .check(16, Some(2))
        .unwrap();
        assert_eq!(g.n, 3);
        assert_eq!(g.params.presence_penalty, 0.5);
        assert_eq!(g.params.frequency_penalty, -1.0);
        assert_eq!(g.params.logprobs, Some(2));
        assert_eq!(g.params.max_new_tokens, 3);
        assert_eq!((g.params.seed, g.params.top_k), (5, 0));
        assert_eq!(g.stop, vec!["\n"]);
        assert!(g.stream && g.include_usage);
    }

    #[test]
    fn bad_values_name_their_field() {
        for (json, param) in [
            (r#"{"n": 0}"#, "n"),
            (r#"{"n": 17}"#, "n"),
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"temperature": 2.5}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"top_k": -3}"#, "top_k"),
            (r#"{"repetition_penalty": 0}"#, "repetition_penalty"),
            (r#"{"presence_penalty": 2.5}"#, "presence_penalty"),
            (r#"{"frequency_penalty": -3}"#, "frequency_penalty"),
            (r#"{"stop": [1]}"#, "stop"),
            (r#"{"stop": ""}"#, "stop"),
        ] {
            let e = error(json);
            assert_eq!(e.param.as_deref(), Some(param), "{json}: {e:?}");
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn each_endpoint_reads_its_logprobs_fields() {
        let completion = |extra: &str| {
            serde_json::from_str::<CompletionRequest>(&format!(
                r#"{{"model": "m", "prompt": "p"{extra}}}"#
            ))
            .unwrap()
            .logprobs()
        };
        assert_eq!(completion("").unwrap(), None);
        assert_eq!(completion(r#", "logprobs": null"#).unwrap(), None);
        assert_eq!(completion(r#", "logprobs": false"#).unwrap(), None);
        assert_eq!(completion(r#", "logprobs": 0"#).unwrap(), Some(0));
        assert_eq!(completion(r#", "logprobs": 5"#).unwrap(), Some(5));
        for bad in [
            r#", "logprobs": 21"#,
            r#", "logprobs": -1"#,
            r#", "logprobs": true"#,
        ] {
            let e = completion(bad).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("logprobs"), "{bad}");
        }
        let chat = |extra: &str| {
            serde_json::from_str::<ChatRequest>(&format!(
                r#"{{"model": "m", "messages": [{{"role": "user", "content": "hi"}}]{extra}}}"#
            ))
            .unwrap()
            .logprobs()
        };
        assert_eq!(chat("").unwrap(), None);
        assert_eq!(chat(r#", "logprobs": false"#).unwrap(), None);
        assert_eq!(chat(r#", "logprobs": true"#).unwrap(), Some(0));
        assert_eq!(
            chat(r#", "logprobs": true, "top_logprobs": 20"#).unwrap(),
            Some(20)
        );
        for (bad, param) in [
            (r#", "top_logprobs": 2"#, "top_logprobs"),
            (r#", "logprobs": true, "top_logprobs": 21"#, "top_logprobs"),
            (r#", "logprobs": 3"#, "logprobs"),
        ] {
            let e = chat(bad).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{bad}");
        }
    }

    #[test]
    fn prompts_and_messages_are_read() {
        let req = |p: &str| -> CompletionRequest {
            serde_json::from_str(&format!(r#"{{"model": "m", "prompt": {p}}}"#)).unwrap()
        };
        let one = |p: &str| match req(p).prompts() {
            Ok(mut v) if v.len() == 1 => v.remove(0),
            other => panic!("{p}: {:?}", other.map(|v| v.len())),
        };
        assert!(matches!(one(r#""hi""#), Prompt::Text(t) if t == "hi"));
        assert!(matches!(one(r#"["hi"]"#), Prompt::Text(_)));
        assert!(matches!(one("[1, 2]"), Prompt::Tokens(t) if t == [1, 2]));
        assert!(matches!(one("[[1, 2]]"), Prompt::Tokens(_)));
        assert_eq!(req(r#"["a", "b"]"#).prompts().unwrap().len(), 2);
        assert_eq!(req("[[1], [2, 3], [4]]").prompts().unwrap().len(), 3);
        for bad in [
            "[]",
            "3",
            "[[]]",
            r#"[1, "a"]"#,
            r#"[[1], "a"]"#,
            "[[1, -2]]",
        ] {
            assert!(req(bad).prompts().is_err(), "{bad}");
        }
        let many = format!("[{}]", vec!["\"a\""; 257].join(", "));
        assert!(req(&many).prompts().is_err());
        let chat: ChatRequest = serde_json::from_str(
            r#"{"model": "m", "messages": [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#,
        )
        .unwrap();
        let m = chat.messages().unwrap();
        assert_eq!(m[0], ChatMessage::new("system", "Be brief."));
        assert_eq!(m[1], ChatMessage::new("user", "ab"));
    }
}
