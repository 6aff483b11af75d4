//! `kvq chat`: an interactive, streaming, multi-turn conversation using the model's chat
//! template. An empty line or end of input quits.

use clap::Args;
use std::io::{BufRead, Write};
use std::time::Instant;

use kvq::chat::ChatMessage;
use kvq::KvqError;

use super::args::{EngineArgs, SamplingArgs};
use super::loading::load_pipeline;

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// A system prompt opening the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run(a: ChatArgs) -> Result<(), KvqError> {
    let mut pipe = load_pipeline(&a.engine)?;
    pipe.generation.sampling = a.sampling.params();
    let mut history: Vec<ChatMessage> = a
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s))
        .collect();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut out = std::io::stdout();
    loop {
        print!("> ");
        let _ = out.flush();
        let Some(Ok(line)) = lines.next() else { break };
        let line = line.trim().to_string();
        if line.is_empty() {
            break;
        }
        history.push(ChatMessage::new("user", &line));
        let start = Instant::now();
        let reply = pipe.chat(&history, &mut |t| {
            let _ = write!(out, "{t}");
            let _ = out.flush();
        })?;
        println!();
        eprintln!(
            "[{} tokens, {:.1} tokens/s]",
            reply.token_ids.len(),
            reply.token_ids.len() as f64 / start.elapsed().as_secs_f64()
        );
        history.push(ChatMessage::new("assistant", &reply.text));
    }
    Ok(())
}
