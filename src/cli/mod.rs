//! Command-line interface: one module per subcommand, flags shared through [`args`].

mod args;
mod bench;
mod bench_attention;
mod bench_throughput;
mod chat;
mod check_config;
mod config_list;
mod eval;
mod generate;
mod loading;
mod qk_study;
mod serve;
mod sweep_chart;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "kvq",
    version,
    about = "LLM inference with a quantized KV cache"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config against its model's metadata and print the resolved cache plan.
    CheckConfig(check_config::CheckConfigArgs),
    /// Generate text for one or more prompts.
    Generate(generate::GenerateArgs),
    /// Accuracy of every KV policy against the fp16 cache on a text (teacher-forced).
    Eval(eval::EvalArgs),
    /// Chat interactively with the model (multi-turn, streaming).
    Chat(chat::ChatArgs),
    /// Speed benchmarks.
    Bench(bench::BenchArgs),
    /// Serve the OpenAI-compatible API (`kvq serve [api_server] [MODEL]`).
    Serve(serve::ServeArgs),
}

/// Parses the command line and runs it; errors go to stderr with a non-zero exit.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig(a) => check_config::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
