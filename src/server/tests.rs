//! The server's routes against the real engine (SmolLM2-135M-Instruct, int8 cache), in
//! process: response shapes, streaming, stop strings, usage, and every error status and shape.

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tower::ServiceExt;

use engine_core::config::QuantPolicy;
use engine_core::engine::{Engine, EngineHandle};
use engine_core::EngineConfig;

use super::{router, ServerConfig};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

/// One engine for every test of this module (None when the model is absent).
fn engine() -> Option<EngineHandle> {
    static ENGINE: OnceLock<Option<EngineHandle>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let path = engine_core::testing::default_model()?;
            let mut c = EngineConfig::default();
            c.model.path = path.display().to_string();
            c.engine.quant_policy = QuantPolicy::Number(8);
            c.engine.cache_memory_gib = Some(0.05);
            c.engine.session_len = 512;
            let engine = Engine::load(&c, &mut |_| {}).unwrap();
            Some(EngineHandle::spawn(engine).unwrap())
        })
        .clone()
}

fn app(keys: &[&str]) -> Option<Router> {
    Some(router(
        Arc::new(engine()?),
        ServerConfig {
            model_name: MODEL.into(),
            api_keys: keys.iter().map(|k| k.to_string()).collect(),
        },
    ))
}

/// Sends a request; returns the status, the content type and the body text.
async fn send(
    app: &Router,
    method: Method,
    uri: &str,
    body: &str,
    key: Option<&str>,
) -> (StatusCode, String, String) {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(k) = key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let ctype = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
        .await
        .unwrap();
    (status, ctype, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn post(app: &Router, uri: &str, body: Value) -> (StatusCode, Value) {
    let (status, _, text) = send(app, Method::POST, uri, &body.to_string(), None).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Posts a streamed request; checks a 200 and returns the JSON chunks of its SSE body.
async fn post_stream(app: &Router, uri: &str, body: Value) -> Vec<Value> {
    let (status, ctype, sse) = send(app, Method::POST, uri, &body.to_string(), None).await;
    assert_eq!(status, StatusCode::OK, "{sse}");
    assert!(ctype.starts_with("text/event-stream"), "{ctype}");
    sse_chunks(&sse)
}

/// The JSON chunks of an SSE body, checking it ends with `data: [DONE]`.
fn sse_chunks(body: &str) -> Vec<Value> {
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{body}");
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").expect("data line")).unwrap())
        .collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `base` with the fields of `extra` added (or replaced).
fn with(mut base: Value, extra: Value) -> Value {
    base.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    base
}

fn chat_body(extra: Value) -> Value {
    let base = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 12,
        "temperature": 0,
    });
    with(base, extra)
}

#[test]
fn chat_completion_whole_and_streamed_agree() {
    let Some(app) = app(&[]) else { return };
    rt().block_on(async {
        let (status, whole) = post(&app, "/v1/chat/completions", chat_body(json!({}))).await;
        assert_eq!(status, StatusCode::OK, "{whole}");
        assert_eq!(whole["object"], "chat.completion");
        assert_eq!(whole["model"], MODEL);
        let choice = &whole["choices"][0];
        assert_eq!(choice["message"]["role"], "assistant");
        let text = choice["message"]["content"].as_str().unwrap();
        assert!(text.contains("Paris"), "{text:?}");
        let usage = &whole["usage"];
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(
                usage["prompt_tokens"].as_u64().unwrap()
                    + usage["completion_tokens"].as_u64().unwrap()
            )
        );

        let body = chat_body(json!({"stream": true, "stream_options": {"include_usage": true}}));
        let chunks = post_stream(&app, "/v1/chat/completions", body).await;
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"));
        let streamed: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(streamed, text, "greedy: streamed and whole agree");
        let n = chunks.len();
        assert_eq!(
            chunks[n - 2]["choices"][0]["finish_reason"],
            choice["finish_reason"]
        );
        assert_eq!(chunks[n - 1]["choices"], json!([]));
        assert_eq!(chunks[n - 1]["usage"], *usage);
    });
}

#[test]
fn completions_honour_stop_strings_and_token_prompts() {
    let Some(app) = app(&[]) else { return };
    rt().block_on(async {
        let body = |extra: Value| {
            let base = json!({"model": MODEL, "prompt": "The capital of France is",
                "max_tokens": 10, "temperature": 0});
            with(base, extra)
        };
        let (status, full) = post(&app, "/v1/completions", body(json!({}))).await;
        assert_eq!(status, StatusCode::OK, "{full}");
        assert_eq!(full["object"], "text_completion");
        let text = full["choices"][0]["text"].as_str().unwrap().to_string();
        // Stop at the second word of the answer.
        let stop = text.split(' ').nth(2).expect("three words");
        let (_, cut) = post(
            &app,
            "/v1/completions",
            body(json!({"stop": [format!(" {stop}")]})),
        )
        .await;
        let at = text.find(&format!(" {stop}")).unwrap();
        assert_eq!(
            cut["choices"][0]["text"],
            text[..at],
            "stop {stop:?} in {text:?}"
        );
        assert_eq!(cut["choices"][0]["finish_reason"], "stop");

        let stream = body(json!({"stream": true, "stop": format!(" {stop}")}));
        let streamed: String = post_stream(&app, "/v1/completions", stream)
            .await
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(streamed, text[..at]);

        let (status, ids) = post(
            &app,
            "/v1/completions",
            body(json!({"prompt": [504, 3575, 282]})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{ids}");
        assert_eq!(ids["usage"]["prompt_tokens"], 3);
    });
}

/// Checks one token's chat log-probabilities: `top` alternatives, most likely first, none
/// above 0, the token's own no more likely than the best; returns the token's text.
fn check_chat_logprob(entry: &Value, top: usize) -> String {
    let lp = entry["logprob"].as_f64().unwrap();
    let token = entry["token"].as_str().unwrap().to_string();
    assert_eq!(entry["bytes"], json!(token.as_bytes()));
    let tops: Vec<f64> = entry["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["logprob"].as_f64().unwrap())
        .collect();
    assert_eq!(tops.len(), top, "{entry}");
    assert!(lp <= 0.0 && tops.iter().all(|&t| t <= 0.0), "{entry}");
    assert!(tops.windows(2).all(|w| w[0] >= w[1]), "{entry}");
    assert!(
        tops.first().is_none_or(|&best| lp <= best + 1e-6),
        "{entry}"
    );
    token
}

#[test]
fn chat_choices_and_logprobs_whole_and_streamed() {
    let Some(app) = app(&[]) else { return };
    rt().block_on(async {
        let chat = "/v1/chat/completions";
        let body = chat_body(json!({"n": 3, "logprobs": true, "top_logprobs": 2}));
        let (status, whole) = post(&app, chat, body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{whole}");
        let choices = whole["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 3);
        let mut tokens = 0;
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], i);
            // Greedy: every choice is the same answer.
            assert_eq!(c["message"], choices[0]["message"]);
            let content = c["logprobs"]["content"].as_array().unwrap();
            let text: String = content.iter().map(|e| check_chat_logprob(e, 2)).collect();
            // A stop token that ended the answer has an entry but no text.
            let answer = c["message"]["content"].as_str().unwrap();
            assert!(text.starts_with(answer), "{text:?} / {answer:?}");
            // A greedy token is the most likely one.
            for e in content {
                assert_eq!(e["logprob"], e["top_logprobs"][0]["logprob"], "{e}");
            }
            tokens += content.len();
        }
        let usage = &whole["usage"];
        assert_eq!(
            usage["completion_tokens"], tokens,
            "an entry per completion token"
        );

        let stream = json!({"stream": true, "stream_options": {"include_usage": true}});
        let chunks = post_stream(&app, chat, with(body, stream)).await;
        for (i, c) in choices.iter().enumerate() {
            let mine: Vec<&Value> = chunks
                .iter()
                .flat_map(|c| c["choices"].as_array().unwrap())
                .filter(|c| c["index"] == i)
                .collect();
            let text: String = mine
                .iter()
                .filter_map(|c| c["delta"]["content"].as_str())
                .collect();
            assert_eq!(text, c["message"]["content"].as_str().unwrap());
            let content: Vec<Value> = mine
                .iter()
                .filter_map(|c| c["logprobs"]["content"].as_array())
                .flatten()
                .cloned()
                .collect();
            assert_eq!(content, *c["logprobs"]["content"].as_array().unwrap());
            let reasons: Vec<&Value> = mine
                .iter()
                .map(|c| &c["finish_reason"])
                .filter(|r| !r.is_null())
                .collect();
            assert_eq!(reasons, vec![&c["finish_reason"]]);
        }
        assert_eq!(chunks.last().unwrap()["usage"], *usage);

        // Sampled choices differ by seed, and a seed repeats them.
        let sampled = chat_body(
            json!({"n": 4, "temperature": 1.5, "seed": 11, "max_tokens": 16,
            "presence_penalty": 0.5, "frequency_penalty": 0.5}),
        );
        let (status, a) = post(&app, chat, sampled.clone()).await;
        assert_eq!(status, StatusCode::OK, "{a}");
        let (_, b) = post(&app, chat, sampled).await;
        let texts = |v: &Value| -> Vec<String> {
            v["choices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["message"]["content"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(texts(&a), texts(&b));
        let mut distinct = texts(&a);
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() > 1, "{:?}", texts(&a));
        assert!(a["choices"][0]["logprobs"].is_null());
    });
}

#[test]
fn completions_logprobs_line_up_with_the_text() {
    let Some(app) = app(&[]) else { return };
    rt().block_on(async {
        let body = json!({"model": MODEL, "prompt": "The capital of France is",
            "max_tokens": 10, "temperature": 0, "logprobs": 3});
        let (status, whole) = post(&app, "/v1/completions", body.clone()).await;
        assert_eq!(status, StatusCode::OK, "{whole}");
        let c = &whole["choices"][0];
        let lp = &c["logprobs"];
        let tokens: Vec<&str> = lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert!(tokens.concat().starts_with(c["text"].as_str().unwrap()));
        assert_eq!(whole["usage"]["completion_tokens"], tokens.len());
        let n = tokens.len();
        let offsets: Vec<u64> = lp["text_offset"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_u64().unwrap())
            .collect();
        let mut at = 0;
        for (t, &o) in tokens.iter().zip(&offsets) {
            assert_eq!(o, at);
            at += t.chars().count() as u64;
        }
        assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n);
        let tops = lp["top_logprobs"].as_array().unwrap();
        assert_eq!(tops.len(), n);
        for ((top, t), l) in tops
            .iter()
            .zip(&tokens)
            .zip(lp["token_logprobs"].as_array().unwrap())
        {
            let top = top.as_object().unwrap();
            assert!(!top.is_empty() && top.len() <= 3, "{top:?}");
            // Greedy: the token is its own most likely alternative.
            assert_eq!(top.get(*t), Some(l), "{t:?} in {top:?}");
        }

        let mut stream = body;
        stream["stream"] = json!(true);
        let chunks = post_stream(&app, "/v1/completions", stream).await;
        let streamed: Vec<Value> = chunks
            .iter()
            .map(|c| &c["choices"][0]["logprobs"])
            .filter(|l| !l.is_null())
            .flat_map(|l| l["text_offset"].as_array().unwrap().clone())
            .collect();
        assert_eq!(streamed, lp["text_offset"].as_array().unwrap().clone());
    });
}

/// Several prompts in one completions request: choice `c` answers prompt `c / n`, each as
/// the prompt alone gets it, whole and streamed; usage counts every prompt once.
#[test]
fn completions_take_several_prompts() {
    let Some(app) = app(&[]) else { return };
    rt().block_on(async {
        let prompts = ["The capital of France is", "The capital of Italy is"];
        let body = |prompt: Value, extra: Value| {
            let base = json!({"model": MODEL, "prompt": prompt, "max_tokens": 6,
                "temperature": 0, "n": 2});
            with(base, extra)
        };
        let mut alone = Vec::new();
        let mut prompt_tokens = 0;
        for p in prompts {
            let (status, one) =
                post(&app, "/v1/completions", body(json!(p), json!({"n": 1}))).await;
            assert_eq!(status, StatusCode::OK, "{one}");
            alone.push(one["choices"][0]["text"].as_str().unwrap().to_string());
            prompt_tokens += one["usage"]["prompt_tokens"].as_u64().unwrap();
        }
        assert_ne!(alone[0], alone[1]);
        let (status, both) = post(&app, "/v1/completions", body(json!(prompts), json!({}))).await;
        assert_eq!(status, StatusCode::OK, "{both}");
        let texts: Vec<&str> = both["choices"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                assert_eq!(c["index"], i);
                c["text"].as_str().unwrap()
            })
            .collect();
        assert_eq!(texts, [&alone[0], &alone[0], &alone[1], &alone[1]]);
        assert_eq!(both["usage"]["prompt_tokens"], prompt_tokens);

        let stream = json!({"stream": true, "stream_options": {"include_usage": true}});
        let chunks = post_stream(&app, "/v1/completions", body(json!(prompts), stream)).await;
        let mut streamed = vec![String::new(); 4];
        for c in chunks.iter().flat_map(|c| c["choices"].as_array().unwrap()) {
            streamed[c["index"].as_u64().unwrap() as usize] += c["text"].as_str().unwrap();
        }
        assert_eq!(streamed, texts);
        assert_eq!(chunks.last().unwrap()["usage"], both["usage"]);
    });
}

/// `best_of` returns the `n` of its candidates with the highest total log-probability, best
/// first: the same candidates `n = best_of` returns (same seeds), ranked.
#[test]
fn completions_best_of_keeps_the_most_likely_candidates() {
    let Some(app) = app(&[]) else { return };
    rt().block_on(async {
        let body = |extra: Value| {
            let base = json!({"model": MODEL, "prompt": "My favourite colour is",
                "max_tokens": 8, "temperature": 1.2, "seed": 3});
            with(base, extra)
        };
        let (status, all) = post(
            &app,
            "/v1/completions",
            body(json!({"n": 4, "logprobs": 0})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{all}");
        let mut ranked: Vec<(f64, String)> = all["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let total = c["logprobs"]["token_logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|l| l.as_f64().unwrap())
                    .sum();
                (total, c["text"].as_str().unwrap().to_string())
            })
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        assert!(
            ranked[0].0 > ranked[3].0,
            "the candidates differ: {ranked:?}"
        );
        let (status, best) =
            post(&app, "/v1/completions", body(json!({"n": 2, "best_of": 4}))).await;
        assert_eq!(status, StatusCode::OK, "{best}");
        let texts: Vec<&str> = best["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                assert!(c["logprobs"].is_null(), "{c}");
                c["text"].as_str().unwrap()
            })
            .collect();
        assert_eq!(texts, [&ranked[0].1, &ranked[1].1]);
        // Every candidate's tokens count.
        assert_eq!(best["usage"], all["usage"]);

        for (extra, what) in [
            (json!({"n": 2, "best_of": 1}), "best_of below n"),
            (json!({"best_of": 17}), "best_of above 16"),
            (json!({"best_of": 2, "stream": true}), "streamed best_of"),
        ] {
            let (status, e) = post(&app, "/v1/completions", body(extra)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {e}");
            assert_eq!(e["error"]["param"], "best_of", "{what}");
        }
    });
}

/// `echo` with `logprobs` scores the prompt, as evaluation harnesses use it: the first token
/// unscored, every other one scored as it would be were it generated.
#[test]
fn completions_echo_scores_the_prompt() {
    let (Some(app), Some(engine)) = (app(&[]), engine()) else {
        return;
    };
    rt().block_on(async {
        let tok = engine.tokenizer();
        let context = "The capital of France is";
        let ids = tok.encode(context, true).unwrap();
        let body = |prompt: Value, echo: bool| {
            json!({"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0,
                "logprobs": 1, "echo": echo})
        };
        let (status, first) = post(&app, "/v1/completions", body(json!(ids), false)).await;
        assert_eq!(status, StatusCode::OK, "{first}");
        let next = first["choices"][0]["logprobs"]["tokens"][0]
            .as_str()
            .unwrap()
            .to_string();
        let next_lp = first["choices"][0]["logprobs"]["token_logprobs"][0]
            .as_f64()
            .unwrap();
        // The context and its greedy continuation, as tokens.
        let scored = tok.encode(&format!("{context}{next}"), true).unwrap();
        assert_eq!(
            scored.len(),
            ids.len() + 1,
            "{next:?} is one token after the context"
        );
        assert_eq!(scored[..ids.len()], ids[..]);

        let (status, echoed) = post(&app, "/v1/completions", body(json!(scored), true)).await;
        assert_eq!(status, StatusCode::OK, "{echoed}");
        let c = &echoed["choices"][0];
        assert!(
            c["text"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{context}{next}")),
            "{c}"
        );
        let lp = &c["logprobs"];
        let n = scored.len() + 1;
        for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            assert_eq!(lp[key].as_array().unwrap().len(), n, "{key}: {lp}");
        }
        assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
        let logprobs: Vec<f64> = lp["token_logprobs"].as_array().unwrap()[1..]
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!(
            logprobs.iter().all(|&l| l <= 0.0 && l > -100.0),
            "{logprobs:?}"
        );
        // The continuation scored as a prompt token has the probability it was generated with.
        let as_prompt = logprobs[scored.len() - 2];
        assert!(
            (as_prompt - next_lp).abs() < 2e-3,
            "{as_prompt} vs {next_lp}"
        );
        let text: String = lp["tokens"].as_array().unwrap()[..scored.len()]
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(text, format!("{context}{next}"));

        // Streamed, the echo comes first, and the chunks add up to the whole answer.
        let mut stream = body(json!(scored), true);
        stream["stream"] = json!(true);
        let chunks = post_stream(&app, "/v1/completions", stream).await;
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(text, c["text"].as_str().unwrap());
        for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            let streamed: Vec<Value> = chunks
                .iter()
                .map(|c| &c["choices"][0]["logprobs"])
                .filter(|l| !l.is_null())
                .flat_map(|l| l[key].as_array().unwrap().clone())
                .collect();
            assert_eq!(streamed, *lp[key].as_array().unwrap(), "{key}");
        }
    });
}

/// Asserts an OpenAI-shaped error with `status`; returns its `error` object.
fn assert_error(status: StatusCode, ctype: &str, body: &str, want: StatusCode) -> Value {
    assert_eq!(status, want, "{body}");
    assert!(ctype.starts_with("application/json"), "{ctype}: {body}");
    let v: Value = serde_json::from_str(body).unwrap();
    let e = v["error"].clone();
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
    e
}

#[test]
fn every_error_is_json_with_its_status() {
    let Some(app) = app(&[]) else { return };
    rt().block_on(async {
        let chat = "/v1/chat/completions";
        let cases: Vec<(&str, String, StatusCode, Option<&str>)> = vec![
            (chat, "{\"model\": ".into(), StatusCode::BAD_REQUEST, None),
            (
                chat,
                json!({"model": MODEL}).to_string(),
                StatusCode::BAD_REQUEST,
                Some("messages"),
            ),
            (
                chat,
                json!({"messages": []}).to_string(),
                StatusCode::BAD_REQUEST,
                Some("model"),
            ),
            (
                chat,
                chat_body(json!({"model": "gpt-4"})).to_string(),
                StatusCode::NOT_FOUND,
                Some("model"),
            ),
            (
                chat,
                chat_body(json!({"n": 17})).to_string(),
                StatusCode::BAD_REQUEST,
                Some("n"),
            ),
            (
                chat,
                chat_body(json!({"top_logprobs": 2})).to_string(),
                StatusCode::BAD_REQUEST,
                Some("top_logprobs"),
            ),
            (
                chat,
                chat_body(json!({"presence_penalty": 3})).to_string(),
                StatusCode::BAD_REQUEST,
                Some("presence_penalty"),
            ),
            (
                chat,
                chat_body(json!({"temperature": 3})).to_string(),
                StatusCode::BAD_REQUEST,
                Some("temperature"),
            ),
            (
                chat,
                chat_body(json!({"top_p": 1.5})).to_string(),
                StatusCode::BAD_REQUEST,
                Some("top_p"),
            ),
            (
                chat,
                chat_body(json!({"max_tokens": 0})).to_string(),
                StatusCode::BAD_REQUEST,
                Some("max_tokens"),
            ),
            (
                chat,
                chat_body(json!({"messages": "hi"})).to_string(),
                StatusCode::BAD_REQUEST,
                None,
            ),
            (
                chat,
                chat_body(json!({"messages": [{"role": "user", "content": "word ".repeat(600)}]}))
                    .to_string(),
                StatusCode::BAD_REQUEST,
                Some("messages"),
            ),
            (
                "/v1/completions",
                json!({"model": MODEL, "prompt": [1, 999999]}).to_string(),
                StatusCode::BAD_REQUEST,
                Some("prompt"),
            ),
        ];
        for (uri, body, want, param) in cases {
            let (status, ctype, text) = send(&app, Method::POST, uri, &body, None).await;
            let e = assert_error(status, &ctype, &text, want);
            if let Some(p) = param {
                assert_eq!(e["param"], p, "{body}: {text}");
            }
        }
        let (status, ctype, text) = send(
            &app,
            Method::POST,
            chat,
            &chat_body(json!({"messages": [{"role": "user", "content": "word ".repeat(600)}]}))
                .to_string(),
            None,
        )
        .await;
        let e = assert_error(status, &ctype, &text, StatusCode::BAD_REQUEST);
        assert_eq!(e["code"], "context_length_exceeded");
        let (status, ctype, text) = send(&app, Method::GET, "/v1/nothing", "", None).await;
        assert_error(status, &ctype, &text, StatusCode::NOT_FOUND);
        let (status, ctype, text) = send(&app, Method::GET, chat, "", None).await;
        assert_error(status, &ctype, &text, StatusCode::METHOD_NOT_ALLOWED);
    });
}

#[test]
fn api_keys_guard_the_v1_routes() {
    let Some(app) = app(&["sk-a", "sk-b"]) else {
        return;
    };
    rt().block_on(async {
        for key in [None, Some("sk-wrong")] {
            let (status, ctype, text) = send(&app, Method::GET, "/v1/models", "", key).await;
            let e = assert_error(status, &ctype, &text, StatusCode::UNAUTHORIZED);
            assert_eq!(e["code"], "invalid_api_key");
        }
        let (status, _, text) = send(&app, Method::GET, "/v1/models", "", Some("sk-b")).await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["data"][0]["id"], MODEL);
        // Health needs no key and reports the cache.
        let (status, _, text) = send(&app, Method::GET, "/health", "", None).await;
        assert_eq!(status, StatusCode::OK);
        let h: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(h["status"], "ok");
        assert!(h["total_blocks"].as_u64().unwrap() > 0);
        assert!(h["free_blocks"].as_u64().unwrap() <= h["total_blocks"].as_u64().unwrap());
        let spec = &h["speculative"];
        assert!(spec["accepted"].as_u64().unwrap() <= spec["drafted"].as_u64().unwrap());
        assert!((0.0..=1.0).contains(&spec["acceptance_rate"].as_f64().unwrap()));
    });
}
