//! The Llama-family forward pass (RMSNorm, RoPE, GQA, SwiGLU, tied embeddings) running its
//! attention through an [`crate::AttentionBackend`] over the paged cache, with weights from a
//! GGUF file or an HF directory's safetensors.

mod llama;
mod random;
mod runner;
mod safetensors;
mod weights;

#[cfg(test)]
pub(crate) mod hf_dir_tests;
#[cfg(test)]
mod window_tests;

pub use self::safetensors::{hf_tensor_name, SafetensorsWeights, SAFETENSORS_INDEX};
pub use llama::{check_logit_rows, lock_windows, LlamaLayer, LlamaModel, LogitsFor, SeqInput};
pub use random::{
    check_fits_in_memory, layers_from, model_shape, parameter_count, random_llama,
    random_llama_for, weight_bytes, MODEL_SHAPES,
};
pub use runner::{
    device_runner_factory, DeviceRunner, DeviceRunnerRegistration, DeviceRunnerRequest, ForwardPass,
};
pub use weights::{
    load_gguf_llama, load_llama, unpermute_rows, HostWeights, LlamaTensor, WeightSource,
};
