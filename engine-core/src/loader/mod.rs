//! Loading what a model file holds beyond its shape: tensor data (raw or dequantized) and the
//! tokenizer. [`crate::model_spec`] reads only headers; this module reads the payload.

pub mod ggml;
pub mod gguf_tensors;
pub mod tokenizer;

#[cfg(test)]
mod smollm2_tests;

pub use ggml::GgmlType;
pub use gguf_tensors::{GgufTensors, RawTensor};
pub use tokenizer::Tokenizer;
