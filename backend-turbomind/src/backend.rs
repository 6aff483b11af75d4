//! The turbomind [`AttentionBackend`]: policies 0, 8 and 4 with TurboMind's quantization
//! semantics and its block layout (a data region for every head, then a params region).
//! TurboQuant and plugin codecs belong to the pytorch backend; this one says so at validation.

use std::sync::Arc;

use engine_core::backend::{validate_common, Capabilities};
use engine_core::cache::CacheLayout;
use engine_core::codec::{float_codec, KvCodec};
use engine_core::config::{CodecChoice, DeviceChoice, EngineConfig};
use engine_core::{
    AttentionBackend, AttentionKind, BackendRegistration, ConfigError, KvDtype, ModelSpec,
};

use crate::codecs::{int4, int4_codec, int8_codec};

/// The name a config selects this backend by.
pub const NAME: &str = "turbomind";

/// Head dims TurboMind's CUDA kernels are built for (reference §3.1; 576 is MLA's shared
/// latent). The CPU path takes any head dim its codec can encode.
pub const GPU_HEAD_DIMS: [usize; 5] = [64, 128, 192, 256, 576];

/// TurboMind's engine: fp16/bf16, int8 and int4 caches, attention on the CPU.
#[derive(Debug, Default, Clone, Copy)]
pub struct TurbomindBackend;

inventory::submit! {
    BackendRegistration { name: NAME, build: || Box::new(TurbomindBackend) }
}

fn unsupported(reason: impl Into<String>) -> ConfigError {
    ConfigError::Unsupported {
        backend: NAME.to_string(),
        reason: reason.into(),
    }
}

/// The one place that decides which codecs this backend runs: builds the codec `choice`
/// names for `spec`, or explains what to change.
fn codec_for(
    spec: &ModelSpec,
    choice: &CodecChoice,
    dtype: KvDtype,
) -> Result<Arc<dyn KvCodec>, ConfigError> {
    let (dk, dv) = (spec.head_dim_k, spec.head_dim_v);
    match choice {
        CodecChoice::None => Ok(Arc::new(float_codec(dk, dv, dtype))),
        CodecChoice::Int8 => Ok(Arc::new(int8_codec(dk, dv, dtype))),
        CodecChoice::Int4 => {
            for (key, d) in [("head_dim_k", dk), ("head_dim_v", dv)] {
                if d % int4::GROUP != 0 {
                    return Err(unsupported(format!(
                        "int4 (quant_policy 4) packs {g} elements per 32-bit word as TurboMind does, so the head dim \
                         must be a multiple of {g}, but this model has {key} = {d}; use quant_policy 8 (int8) or 0, \
                         which take any head dim",
                        g = int4::GROUP
                    )));
                }
            }
            Ok(Arc::new(int4_codec(dk, dv, dtype)))
        }
        CodecChoice::TurboQuant => Err(unsupported(
            "quant_policy 42 (TurboQuant) is not implemented by TurboMind (LMDeploy runs it in its PyTorch engine \
             only); the pytorch backend supports TurboQuant: select it with `backend = \"pytorch\"` \
             (`--backend pytorch`), or keep turbomind with quant_policy 8 or 4",
        )),
        CodecChoice::Registered(name) => Err(unsupported(format!(
            "codec \"{name}\" is a registered plugin codec, but turbomind runs only quant_policy none (0), int8 (8) \
             and int4 (4); plugin codecs run on the pytorch backend: select it with `backend = \"pytorch\"`"
        ))),
        CodecChoice::Sides(c) => Err(unsupported(format!(
            "a [cache] section (codec \"{}\") chooses K and V sides separately, which only the pytorch backend \
             runs; select it with `backend = \"pytorch\"`, or use quant_policy 0, 8 or 4 here",
            c.codec_name()
        ))),
    }
}

/// TurboMind's CUDA kernels exist only for [`GPU_HEAD_DIMS`].
fn check_gpu_head_dims(spec: &ModelSpec) -> Result<(), ConfigError> {
    for (key, d) in [
        ("head_dim_k", spec.head_dim_k),
        ("head_dim_v", spec.head_dim_v),
    ] {
        if !GPU_HEAD_DIMS.contains(&d) {
            return Err(unsupported(format!(
                "TurboMind's GPU kernels support head dims {GPU_HEAD_DIMS:?}, but this model has {key} = {d}; \
                 use device = \"cpu\", which takes any head dim"
            )));
        }
    }
    Ok(())
}

impl AttentionBackend for TurbomindBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            policies: vec![0, 8, 4],
            registered_codecs: false,
            devices: engine_core::backend::available_devices(),
        }
    }

    fn validate(&self, spec: &ModelSpec, cfg: &EngineConfig) -> Result<(), ConfigError> {
        validate_common(NAME, spec, cfg)?;
        if spec.attention == AttentionKind::Mla {
            return Err(unsupported(format!(
                "MLA models (architecture `{}`) are not supported: TurboMind caches MLA as one shared 576-dim \
                 latent per token, and this CPU implementation has no MLA attention",
                spec.architecture
            )));
        }
        if let DeviceChoice::Cuda(_) = cfg.device()? {
            check_gpu_head_dims(spec)?;
        }
        self.build_codec(spec, cfg).map(|_| ())
    }

    fn build_codec(
        &self,
        spec: &ModelSpec,
        cfg: &EngineConfig,
    ) -> Result<Arc<dyn KvCodec>, ConfigError> {
        codec_for(
            spec,
            &cfg.codec_choice()?,
            cfg.engine.dtype.resolve(spec.dtype),
        )
    }

    /// TurboMind's `block.h`: per layer, `[h][K: B×data][V: B×data]` for every head, then
    /// `[h][Kp: B×params][Vp: B×params]`, no alignment padding, a block spanning all layers.
    fn cache_layout(
        &self,
        codec: &dyn KvCodec,
        num_layers: usize,
        num_kv_heads: usize,
        block_size: usize,
    ) -> CacheLayout {
        CacheLayout::head_major_with_params(
            codec.k_bytes(),
            codec.v_bytes(),
            num_layers,
            num_kv_heads,
            block_size,
        )
    }
}

#[cfg(test)]
mod tests;
