//! The seam between the scheduler and whatever runs the model: [`ForwardPass`] is one step's
//! forward over a batch of sequences, logits back on the host. The CPU Llama forward
//! implements it; a device runner (the `kernels` crate's CUDA runner) keeps weights and the
//! K/V cache in device memory and announces a factory through [`DeviceRunnerRegistration`],
//! so the core never depends on a GPU library.

use super::llama::{LlamaModel, LogitsFor, SeqInput};
use crate::backend::AttentionBackend;
use crate::cache::{MemoryPlan, PagedKvCache};
use crate::config::EngineConfig;
use crate::error::KvqError;
use crate::model_spec::ModelSpec;
use crate::ops::linear::Path;
use crate::plan::ResolvedConfig;

/// One forward step of a model over a batch of sequences.
pub trait ForwardPass: Send {
    /// The model's shape.
    fn spec(&self) -> &ModelSpec;

    /// Runs the model on `seqs`, storing their K/V and returning the logits of the last
    /// `logit_rows[i]` tokens of sequence `i` (`[rows, vocab]`, sequences in order; speculative
    /// verification scores the last token and every draft after it). `layers`/`head` fix the
    /// CPU product paths (see [`LlamaModel::forward_with`]); a device runner has one path and
    /// ignores them. A runner that keeps its own cache (a device runner) takes `cache` only for
    /// its block size; the block tables index its own cache.
    fn forward_rows(
        &mut self,
        backend: &dyn AttentionBackend,
        cache: &mut PagedKvCache,
        seqs: &[SeqInput<'_>],
        logit_rows: &[usize],
        layers: Path,
        head: Path,
    ) -> Result<Vec<f32>, KvqError>;

    /// [`ForwardPass::forward_rows`] followed by greedy selection (the first index of each
    /// row's largest logit), for a pass that can pick the tokens where the logits are: a device
    /// runner then copies back one id per row instead of a vocabulary of floats. `None` (the
    /// default) means it cannot, and the caller samples `forward_rows`'s logits on the host.
    fn forward_rows_greedy(
        &mut self,
        _backend: &dyn AttentionBackend,
        _cache: &mut PagedKvCache,
        _seqs: &[SeqInput<'_>],
        _logit_rows: &[usize],
    ) -> Option<Result<Vec<u32>, KvqError>> {
        None
    }

    /// Whether a row's logits depend on the product [`Path`] its call takes. The CPU forward's
    /// do (its integer and dequantizing kernels round differently), so the scheduler keeps
    /// prompt rows and other rows in separate calls to make every row's result independent of
    /// its batch; a runner with one path answers false and gets one call per step.
    fn path_dependent(&self) -> bool {
        true
    }

    /// [`ForwardPass::forward_rows`] with the rows `which` names.
    fn forward_with(
        &mut self,
        backend: &dyn AttentionBackend,
        cache: &mut PagedKvCache,
        seqs: &[SeqInput<'_>],
        which: LogitsFor,
        layers: Path,
        head: Path,
    ) -> Result<Vec<f32>, KvqError> {
        let rows = which.rows(seqs);
        self.forward_rows(backend, cache, seqs, &rows, layers, head)
    }
}

impl ForwardPass for LlamaModel {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn forward_rows(
        &mut self,
        backend: &dyn AttentionBackend,
        cache: &mut PagedKvCache,
        seqs: &[SeqInput<'_>],
        logit_rows: &[usize],
        layers: Path,
        head: Path,
    ) -> Result<Vec<f32>, KvqError> {
        LlamaModel::forward_rows(self, backend, cache, seqs, logit_rows, layers, head)
    }
}

/// What a device runner factory gets: the host model to upload, the resolved configuration
/// (codec, layout) and a planner that turns the device memory left after the weights into a
/// cache plan.
pub struct DeviceRunnerRequest<'a> {
    pub model: &'a LlamaModel,
    pub resolved: &'a ResolvedConfig,
    pub config: &'a EngineConfig,
    /// The device ordinal (`cuda:N`).
    pub ordinal: usize,
    /// Cache plan from the bytes free on the device after the weights are loaded.
    pub plan: &'a dyn Fn(u64) -> Result<MemoryPlan, KvqError>,
}

/// A runner on a device with the cache plan it allocated.
pub struct DeviceRunner {
    pub runner: Box<dyn ForwardPass>,
    pub plan: MemoryPlan,
    /// The device's name, for logs.
    pub device_name: String,
}

/// A device runner factory announced to the engine (`device = "<device>"`).
pub struct DeviceRunnerRegistration {
    pub device: &'static str,
    pub build: fn(DeviceRunnerRequest<'_>) -> Result<DeviceRunner, KvqError>,
}

inventory::collect!(DeviceRunnerRegistration);

/// The factory registered for `device` (e.g. `"cuda"`), if this build has one.
pub fn device_runner_factory(
    device: &str,
) -> Option<fn(DeviceRunnerRequest<'_>) -> Result<DeviceRunner, KvqError>> {
    inventory::iter::<DeviceRunnerRegistration>
        .into_iter()
        .find(|r| r.device == device)
        .map(|r| r.build)
}
