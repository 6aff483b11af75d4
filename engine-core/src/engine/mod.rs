//! The engine: a loaded model, its tokenizer, a paged KV cache sized by the memory planner, and
//! a scheduler that batches requests over it.

mod detok;
mod load;
mod request;
mod scheduler;

pub use detok::IncrementalDecoder;
pub use load::{available_memory_bytes, load_model, Engine, LoadStage};
pub use request::{FinishReason, GenerationOutput, Request, TokenEvent};
pub use scheduler::{Scheduler, StepStats};
