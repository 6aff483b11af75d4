//! The global codec registry, built on `inventory`: a crate adds a codec with one
//! `inventory::submit!` of a [`CodecRegistration`] and a config selects it by name.

use super::KvCodec;
use crate::dtype::KvDtype;
use crate::error::ConfigError;

/// What a codec is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodecBuildParams {
    pub head_dim_k: usize,
    pub head_dim_v: usize,
    /// Model dtype: the metadata type, as in LMDeploy.
    pub dtype: KvDtype,
}

/// A codec announced to the engine. Backends that accept registered codecs (the pytorch
/// backend) look names up here.
pub struct CodecRegistration {
    /// Name used in TOML (`quant_policy = "<name>"`).
    pub name: &'static str,
    /// One line for listings and `kvq check-config`.
    pub description: &'static str,
    /// Builds the codec, or explains why these dimensions are not supported.
    pub build: fn(&CodecBuildParams) -> Result<Box<dyn KvCodec>, ConfigError>,
}

inventory::collect!(CodecRegistration);

impl CodecRegistration {
    /// Finds a registered codec by name.
    pub fn find(name: &str) -> Option<&'static CodecRegistration> {
        inventory::iter::<CodecRegistration>
            .into_iter()
            .find(|r| r.name == name)
    }
}

/// Names of every registered codec, sorted.
pub fn registered_codec_names() -> Vec<&'static str> {
    let mut names: Vec<_> = inventory::iter::<CodecRegistration>
        .into_iter()
        .map(|r| r.name)
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}
