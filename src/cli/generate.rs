//! `kvq generate`: one or more prompts, batched, streamed when there is one.

use clap::Args;
use std::io::Write;
use std::time::Instant;

use kvq::KvqError;

use super::args::{EngineArgs, SamplingArgs};
use super::loading::load_pipeline;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A prompt; repeat the flag for a batch.
    #[arg(long = "prompt", required = true)]
    pub prompts: Vec<String>,
    /// Send prompts as they are, without the model's chat template.
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run(a: GenerateArgs) -> Result<(), KvqError> {
    let mut pipe = load_pipeline(&a.engine)?;
    pipe.generation.sampling = a.sampling.params();
    pipe.generation.raw_prompt = a.raw;
    let prompts: Vec<&str> = a.prompts.iter().map(String::as_str).collect();
    let single = prompts.len() == 1;
    let start = Instant::now();
    let mut out = std::io::stdout();
    let outputs = pipe.stream(&prompts, &mut |_, text| {
        if single {
            let _ = write!(out, "{text}");
            let _ = out.flush();
        }
    })?;
    let secs = start.elapsed().as_secs_f64();
    if single {
        println!();
    } else {
        for (i, o) in outputs.iter().enumerate() {
            println!("--- [{i}] {}\n{}", prompts[i], o.text);
        }
    }
    let new: usize = outputs.iter().map(|o| o.token_ids.len()).sum();
    let prompt: usize = outputs.iter().map(|o| o.prompt_tokens).sum();
    let reasons: Vec<String> = outputs
        .iter()
        .map(|o| format!("{:?}", o.finish_reason).to_lowercase())
        .collect();
    let stats = pipe.engine().stats();
    let speculation = if pipe.info().num_speculative_tokens > 0 {
        format!(
            "; speculative: {} of {} draft tokens accepted ({:.1}%)",
            stats.spec_accepted,
            stats.spec_drafted,
            100.0 * stats.spec_accepted as f64 / stats.spec_drafted.max(1) as f64
        )
    } else {
        String::new()
    };
    eprintln!(
        "kvq: {prompt} prompt + {new} generated tokens in {secs:.2} s ({:.1} tokens/s generated); finish: {}{speculation}",
        new as f64 / secs,
        reasons.join(", ")
    );
    Ok(())
}
