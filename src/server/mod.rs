//! The OpenAI-compatible HTTP server behind `kvq serve`: `GET /v1/models`,
//! `POST /v1/completions`, `POST /v1/chat/completions` (whole or streamed) and `GET /health`,
//! over any [`AsyncEngine`]. Every error is OpenAI's JSON error shape with its status code;
//! with API keys, the `/v1` routes need `Authorization: Bearer <key>`.

mod completions;
mod error;
mod protocol;

#[cfg(test)]
mod tests;

use std::future::{Future, IntoFuture};
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use engine_core::engine::AsyncEngine;

pub use error::ApiError;

/// The port LMDeploy's `api_server` listens on, and so `kvq serve`.
pub const DEFAULT_PORT: u16 = 23333;

/// What the server answers as, besides the engine.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// The model id of `/v1/models`; requests must name it.
    pub model_name: String,
    /// Accepted API keys; empty means no authentication.
    pub api_keys: Vec<String>,
}

/// The model id for a model path: a GGUF file's stem, or an HF directory's name.
pub fn model_name_for(path: &str) -> String {
    let p = Path::new(path);
    let name = if p.is_dir() {
        p.file_name()
    } else {
        p.file_stem()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string())
}

#[derive(Clone)]
struct AppState {
    engine: Arc<dyn AsyncEngine>,
    model: Arc<str>,
    api_keys: Arc<[String]>,
    created: u64,
}

impl AppState {
    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == &*self.model {
            Ok(())
        } else {
            Err(ApiError::unknown_model(model))
        }
    }
}

fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The server's routes over `engine`.
pub fn router(engine: Arc<dyn AsyncEngine>, config: ServerConfig) -> Router {
    let state = AppState {
        engine,
        model: config.model_name.into(),
        api_keys: config.api_keys.into(),
        created: unix_time(),
    };
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(completions::chat))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/health", get(health))
        .merge(v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Serves `app` on `listener` until `shutdown` completes; requests still in flight then are
/// dropped (which cancels them) rather than awaited.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tokio::select! {
        served = axum::serve(listener, app).into_future() => served,
        () = shutdown => Ok(()),
    }
}

/// With API keys configured, a request needs `Authorization: Bearer <one of them>`.
async fn authenticate(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if s.api_keys.is_empty() {
        return next.run(req).await;
    }
    let key = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match key {
        Some(k) if s.api_keys.iter().any(|a| a == k) => next.run(req).await,
        Some(_) => ApiError::unauthorized("Incorrect API key provided.").into_response(),
        None => ApiError::unauthorized(
            "Missing API key: send the header `Authorization: Bearer <key>`.",
        )
        .into_response(),
    }
}

/// Liveness and the cache's state: free and total blocks, running and waiting requests,
/// preemptions, prompt tokens found in the prefix cache and speculative drafts (scored, kept)
/// so far. 503 once the engine has stopped.
async fn health(State(s): State<AppState>) -> Response {
    let st = s.engine.stats();
    let status = if st.alive {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if st.alive { "ok" } else { "engine stopped" },
        "free_blocks": st.free_blocks,
        "total_blocks": st.total_blocks,
        "running": st.running,
        "waiting": st.waiting,
        "preemptions": st.preemptions,
        "prefix_cache_hit_tokens": st.prefix_hit_tokens,
        "speculative": {
            "drafted": st.spec_drafted,
            "accepted": st.spec_accepted,
            "acceptance_rate": if st.spec_drafted == 0 {
                0.0
            } else {
                st.spec_accepted as f64 / st.spec_drafted as f64
            },
        },
    });
    (status, Json(body)).into_response()
}

async fn models(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": &*s.model,
            "object": "model",
            "created": s.created,
            "owned_by": "kvq",
            "max_model_len": s.engine.info().session_len,
        }],
    }))
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("no route {} {}", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!(
            "method {} is not allowed on {}",
            req.method(),
            req.uri().path()
        ),
    )
}
