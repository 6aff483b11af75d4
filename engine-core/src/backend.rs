//! The [`AttentionBackend`] trait and its registry. A backend decides which codecs it runs,
//! how their blocks are laid out, and where attention runs; the engine only talks to it
//! through this trait, and finds it by name in the registry.

use std::sync::Arc;

use crate::attention::{paged_attention, AttentionBatch};
use crate::cache::{CacheLayout, PagedKvCache};
use crate::codec::KvCodec;
use crate::config::{CodecChoice, DeviceChoice, EngineConfig};
use crate::error::{ConfigError, KvqError};
use crate::model_spec::ModelSpec;

/// What a backend can do, for listings and error messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Capabilities {
    /// Built-in policies, as LMDeploy numbers.
    pub policies: Vec<u32>,
    /// Whether codecs registered through `inventory` can be selected by name.
    pub registered_codecs: bool,
    /// Devices attention runs on.
    pub devices: Vec<&'static str>,
}

/// An attention implementation over a paged, possibly quantized cache.
///
/// `write_kv` and `attend` default to the CPU reference; a backend with device kernels
/// overrides them for device-resident caches.
pub trait AttentionBackend: Send + Sync {
    /// The name a config selects it by (`backend = "<name>"`).
    fn name(&self) -> &'static str;

    fn capabilities(&self) -> Capabilities;

    /// Checks that this backend can run `cfg` on a model of shape `spec`; the error says what
    /// to change.
    fn validate(&self, spec: &ModelSpec, cfg: &EngineConfig) -> Result<(), ConfigError>;

    /// Builds the codec `cfg` selects, for `spec`'s head dims and dtype.
    fn build_codec(
        &self,
        spec: &ModelSpec,
        cfg: &EngineConfig,
    ) -> Result<Arc<dyn KvCodec>, ConfigError>;

    /// The byte layout of one block for `codec`.
    fn cache_layout(
        &self,
        codec: &dyn KvCodec,
        num_layers: usize,
        num_kv_heads: usize,
        block_size: usize,
    ) -> CacheLayout;

    /// Quantizes and stores new K/V of one layer (`[tokens, kv_heads, dim]`) at `slots`.
    fn write_kv(
        &self,
        cache: &mut PagedKvCache,
        layer: usize,
        k: &[f32],
        v: &[f32],
        slots: &[usize],
    ) -> Result<(), KvqError> {
        cache.write(layer, k, v, slots)
    }

    /// Attention of `q` (`[rows, heads, dim]`) over the cache, into `out`.
    fn attend(
        &self,
        cache: &PagedKvCache,
        layer: usize,
        q: &[f32],
        batch: &AttentionBatch<'_>,
        out: &mut [f32],
    ) -> Result<(), KvqError> {
        paged_attention(cache, layer, q, batch, out)
    }
}

/// A backend announced to the engine.
pub struct BackendRegistration {
    pub name: &'static str,
    pub build: fn() -> Box<dyn AttentionBackend>,
}

inventory::collect!(BackendRegistration);

/// Names of every registered backend, sorted.
pub fn registered_backend_names() -> Vec<&'static str> {
    let mut v: Vec<_> = inventory::iter::<BackendRegistration>
        .into_iter()
        .map(|r| r.name)
        .collect();
    v.sort_unstable();
    v
}

/// Builds the backend a config names.
pub fn backend_by_name(name: &str) -> Result<Box<dyn AttentionBackend>, ConfigError> {
    inventory::iter::<BackendRegistration>
        .into_iter()
        .find(|r| r.name == name)
        .map(|r| (r.build)())
        .ok_or_else(|| ConfigError::UnknownBackend {
            given: name.to_string(),
            valid: registered_backend_names()
                .into_iter()
                .map(String::from)
                .collect(),
        })
}

/// Devices the engine can run a model on in this build: the CPU, and each device with a
/// registered runner (`cuda` with the `cuda` feature).
pub fn available_devices() -> Vec<&'static str> {
    let mut v = vec!["cpu"];
    v.extend(
        inventory::iter::<crate::model::DeviceRunnerRegistration>
            .into_iter()
            .map(|r| r.device),
    );
    v
}

/// Rules every backend shares: the model must be something the engine can cache, the
/// dtype/device must be available.
pub fn validate_common(
    backend: &str,
    spec: &ModelSpec,
    cfg: &EngineConfig,
) -> Result<(), ConfigError> {
    cfg.validate()?;
    let unsupported = |reason: String| ConfigError::Unsupported {
        backend: backend.to_string(),
        reason,
    };
    // Each rank holds whole KV heads (so whole query groups) and an equal slice of the MLP.
    let tp = cfg.engine.tp;
    for (count, what) in [
        (spec.num_kv_heads, "KV heads"),
        (spec.intermediate_size, "MLP rows (intermediate_size)"),
    ] {
        if count % tp != 0 {
            return Err(unsupported(format!(
                "tp = {tp} does not divide the model's {count} {what}"
            )));
        }
    }
    if let DeviceChoice::Cuda(_) = cfg.device()? {
        if crate::model::device_runner_factory("cuda").is_none() {
            return Err(unsupported(
                "device = \"cuda\" needs a build with the `cuda` feature and a CUDA GPU; use device = \"cpu\" or \"auto\"".into(),
            ));
        }
    }
    Ok(())
}

/// Builds the codec `choice` names from the registry, or explains what exists.
pub fn build_registered_codec(
    name: &str,
    spec: &ModelSpec,
    dtype: crate::KvDtype,
) -> Result<Box<dyn KvCodec>, ConfigError> {
    let reg =
        crate::codec::CodecRegistration::find(name).ok_or_else(|| ConfigError::UnknownPolicy {
            given: name.to_string(),
            valid: crate::config::valid_policy_values(),
        })?;
    (reg.build)(&crate::codec::CodecBuildParams {
        head_dim_k: spec.head_dim_k,
        head_dim_v: spec.head_dim_v,
        dtype,
    })
}

/// The codec choice with its policy number, for messages.
pub fn describe_choice(choice: &CodecChoice) -> String {
    match choice.policy_number() {
        Some(p) => format!("quant_policy {p} (\"{}\")", choice.name()),
        None => format!("codec \"{}\"", choice.name()),
    }
}
