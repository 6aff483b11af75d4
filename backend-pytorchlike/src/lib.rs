//! The `pytorch` attention backend of kvq: LMDeploy's PyTorch engine semantics for the KV
//! cache. Policies 0 (model dtype), 8 and 4 (asymmetric per-token int8/int4 with a float zero
//! point, half-split int4 packing), 42 (TurboQuant: Hadamard rotation, 3-bit Lloyd–Max + sign
//! for K, 2-bit Lloyd–Max for V), and any codec registered by name.
//!
//! Linking this crate registers the backend under the name `"pytorch"`; a binary that selects
//! backends by name must reference it (`use backend_pytorchlike as _;`) so the registration
//! is kept.

pub mod backend;
pub mod codecs;
pub mod validate;

pub use backend::{codec_for, PytorchBackend};
