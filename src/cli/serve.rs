//! `kvq serve` (also `kvq serve api_server`, LMDeploy's spelling): the OpenAI-compatible
//! server on the async engine.

use std::sync::Arc;

use clap::Args;

use kvq::engine::EngineHandle;
use kvq::server::{self, ServerConfig, DEFAULT_PORT};
use kvq::KvqError;

use super::args::EngineArgs;
use super::loading::load_engine;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// `api_server` (optional, as in `lmdeploy serve api_server`), then optionally the model
    /// path (instead of --model).
    #[arg(value_name = "ARGS", num_args = 0..=2)]
    pub positional: Vec<String>,
    /// Address to listen on.
    #[arg(long = "server-name", default_value = "127.0.0.1")]
    pub server_name: String,
    /// Port to listen on (0 picks a free one; the address is printed).
    #[arg(long = "server-port", default_value_t = DEFAULT_PORT)]
    pub server_port: u16,
    /// Accepted API keys; when given, requests need `Authorization: Bearer <key>`.
    #[arg(long = "api-keys", num_args = 1..)]
    pub api_keys: Vec<String>,
    /// The model id clients name (default: the model file's stem or directory name).
    #[arg(long = "model-name")]
    pub model_name: Option<String>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run(mut a: ServeArgs) -> Result<(), KvqError> {
    let mut positional = a.positional.clone();
    if positional.first().is_some_and(|p| p == "api_server") {
        positional.remove(0);
    }
    match positional.as_slice() {
        [] => {}
        [model] if a.engine.model.is_none() => a.engine.model = Some(model.clone()),
        [_] => {
            return Err(KvqError::InvalidArgument(
                "give the model either as an argument or with --model, not both".into(),
            ))
        }
        _ => {
            return Err(KvqError::InvalidArgument(format!(
            "unexpected arguments {positional:?}; usage: kvq serve [api_server] [MODEL] [OPTIONS]"
        )))
        }
    }
    let engine = load_engine(&a.engine)?;
    let model_name = a
        .model_name
        .clone()
        .unwrap_or_else(|| server::model_name_for(&engine.config.model.path));
    let handle = EngineHandle::spawn(engine)?;
    let app = server::router(
        Arc::new(handle),
        ServerConfig {
            model_name: model_name.clone(),
            api_keys: a.api_keys.clone(),
        },
    );
    let io = |source| KvqError::Io {
        path: format!("{}:{}", a.server_name, a.server_port),
        source,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(io)?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((a.server_name.as_str(), a.server_port))
            .await
            .map_err(io)?;
        let addr = listener.local_addr().map_err(io)?;
        eprintln!(
            "kvq: serving `{model_name}` on http://{addr} (OpenAI API under /v1{}); Ctrl-C stops",
            if a.api_keys.is_empty() {
                ""
            } else {
                ", API key required"
            }
        );
        server::serve(listener, app, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(io)
    })
}
