//! The Llama-family forward pass (RMSNorm, RoPE, GQA, SwiGLU, tied embeddings) running its
//! attention through an [`crate::AttentionBackend`] over the paged cache.

mod llama;
mod weights;

pub use llama::{LlamaLayer, LlamaModel, LogitsFor, SeqInput};
pub use weights::{load_gguf_llama, load_llama, unpermute_rows, LlamaTensor, WeightSource};
