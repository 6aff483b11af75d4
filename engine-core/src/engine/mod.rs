//! The engine: a loaded model, its tokenizer, a paged KV cache sized by the memory planner, and
//! a continuous-batching scheduler over it; [`EngineHandle`] runs it on its own thread behind
//! an async API.

mod detok;
mod handle;
mod load;
mod ngram;
mod request;
mod scheduler;
mod stop;

#[cfg(test)]
mod tests;

pub use detok::IncrementalDecoder;
pub use handle::{
    AsyncEngine, EngineEvent, EngineHandle, EngineInfo, EngineStats, EventResult, EventStream,
    RequestStream,
};
pub use load::{
    available_memory_bytes, load_model, load_model_for, plan_cache, Engine, LoadStage,
    SpeculationStats, DEFAULT_MAX_PREFILL_TOKENS,
};
pub use ngram::{propose as propose_ngram_draft, MAX_NGRAM, MIN_NGRAM};
pub use request::{FinishReason, GenerationOutput, Request, TokenEvent};
pub use scheduler::{Scheduler, SchedulerLimits, StepStats};
pub use stop::StopMatcher;
