//! The turbomind attention backend of kvq: LMDeploy TurboMind's KV-cache quantization
//! (quant_policy 0, 8 and 4) and its cache block layout.
//!
//! TurboMind quantizes each (token, KV head) vector asymmetrically with `[scale, min]` params in
//! the model dtype, computes in that dtype, rounds codes half to even and packs int4 in an
//! interleaved nibble order; its caches are therefore not interchangeable with the pytorch
//! backend's. The backend registers itself under the name `"turbomind"`; a binary must
//! reference this crate (`use backend_turbomind as _;`) for the registration to be linked.

mod backend;
pub mod codecs;

pub use backend::{TurbomindBackend, GPU_HEAD_DIMS, NAME};
pub use codecs::{int4_codec, int8_codec, TmInt4Side, TmInt8Side};
