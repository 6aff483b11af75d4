//! `[cache]`: separate codecs for K and V, and a Hadamard rotation for the affine sides.
//!
//! ```toml
//! [cache]
//! k = "int4"      # one of the side names below
//! v = "lm3"
//! rotate = true   # int8/int4 sides are stored in the Walsh–Hadamard domain
//! ```
//!
//! Bits per element include the per-token metadata (f16 for GGUF models), at head dim D:
//!
//! | side | stores | bits (D=64) | bits (D=128) |
//! |---|---|---|---|
//! | `fp16` | the model dtype, unquantized | 16 | 16 |
//! | `int8` | LMDeploy PyTorch affine, 8-bit codes + f16 scale/zero | 8.5 | 8.25 |
//! | `int4` | LMDeploy PyTorch affine, 4-bit codes + f16 scale/zero | 4.5 | 4.25 |
//! | `tq3s` | TurboQuant K of policy 42: 3-bit Lloyd–Max + residual sign + 2 f16 norms | 4.5 | 4.25 |
//! | `lm2` | 2-bit Lloyd–Max of the rotated unit vector + f16 norm (policy 42's V) | 2.25 | 2.125 |
//! | `lm3` | 3-bit Lloyd–Max + f16 norm | 3.25 | 3.125 |
//! | `lm4` | 4-bit Lloyd–Max + f16 norm (TurboQuant's MSE-only 4-bit K) | 4.25 | 4.125 |
//! | `lm2u`, `lm3u`, `lm4u` | the same codes, norm stored as `n/⟨u, ĉ⟩` so that `⟨x̂, x⟩ = ‖x‖²` (no shrinkage) | as lm2–lm4 | as lm2–lm4 |
//! | `tqprod3` | TurboQuant_prod: random-sign rotation, 2-bit Lloyd–Max, 1-bit QJL of the residual + 2 f16 norms | 3.5 | 3.25 |
//!
//! The Lloyd–Max sides (`tq3s`, `lm*`, `tqprod3`) always work in a rotated domain; `rotate`
//! only changes `int8` and `int4` (and is ignored by `fp16`, which is lossless either way).
//!
//! `[cache]` replaces `quant_policy`: a config that sets both (with `quant_policy` other than
//! 0) is an error, so no file silently means two things.
//!
//! `[cache.edge]` keeps the first and last layers at other (higher-precision) sides, which
//! the quantization error of the first and last layers hurts most:
//!
//! ```toml
//! [cache.edge]
//! first = 1       # layers 0..1
//! last = 1        # the final layer
//! k = "int8"
//! v = "int8"      # rotated like the main sides when `rotate = true`
//! ```

use serde::{Deserialize, Serialize};

/// How one side (K or V) of the cache is stored; see the module table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SideKind {
    Fp16,
    Int8,
    Int4,
    Tq3s,
    Lm2,
    Lm3,
    Lm4,
    Lm2u,
    Lm3u,
    Lm4u,
    Tqprod3,
}

impl SideKind {
    pub const ALL: [SideKind; 11] = [
        SideKind::Fp16,
        SideKind::Int8,
        SideKind::Int4,
        SideKind::Tq3s,
        SideKind::Lm2,
        SideKind::Lm3,
        SideKind::Lm4,
        SideKind::Lm2u,
        SideKind::Lm3u,
        SideKind::Lm4u,
        SideKind::Tqprod3,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SideKind::Fp16 => "fp16",
            SideKind::Int8 => "int8",
            SideKind::Int4 => "int4",
            SideKind::Tq3s => "tq3s",
            SideKind::Lm2 => "lm2",
            SideKind::Lm3 => "lm3",
            SideKind::Lm4 => "lm4",
            SideKind::Lm2u => "lm2u",
            SideKind::Lm3u => "lm3u",
            SideKind::Lm4u => "lm4u",
            SideKind::Tqprod3 => "tqprod3",
        }
    }

    /// Parses a side name, or says which names exist.
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown cache side `{s}`; valid sides: {}",
                    Self::ALL.map(|k| k.name()).join(", ")
                )
            })
    }

    /// Whether `rotate = true` changes this side (the Lloyd–Max sides are always rotated).
    pub fn takes_rotate(self) -> bool {
        matches!(self, SideKind::Int8 | SideKind::Int4)
    }

    /// Whether the side needs a power-of-two head dim (for its rotation) once built with
    /// `rotate`.
    pub fn needs_power_of_two(self, rotate: bool) -> bool {
        !matches!(self, SideKind::Fp16) && (rotate || !self.takes_rotate())
    }

    /// The label in codec names: the side name, with `r` when `rotate` applies to it.
    pub fn label(self, rotate: bool) -> String {
        if rotate && self.takes_rotate() {
            format!("{}r", self.name())
        } else {
            self.name().to_string()
        }
    }
}

/// `[cache]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// K side.
    pub k: SideKind,
    /// V side.
    pub v: SideKind,
    /// Store `int8`/`int4` sides in the normalised Walsh–Hadamard domain.
    #[serde(default)]
    pub rotate: bool,
    /// Per-layer override for the first and last layers.
    #[serde(default)]
    pub edge: Option<EdgeLayers>,
}

/// `[cache.edge]`: the sides of the first `first` and last `last` layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeLayers {
    #[serde(default)]
    pub first: usize,
    #[serde(default)]
    pub last: usize,
    pub k: SideKind,
    pub v: SideKind,
}

impl EdgeLayers {
    /// The layers of a `num_layers` model in order: the first edge, the main layers, the last
    /// edge (any may be empty).
    pub fn layer_ranges(&self, num_layers: usize) -> [std::ops::Range<usize>; 3] {
        let last = num_layers.saturating_sub(self.last).max(self.first);
        [0..self.first, self.first..last, last..num_layers]
    }

    /// Whether `layer` of `num_layers` takes the edge sides.
    pub fn covers(&self, layer: usize, num_layers: usize) -> bool {
        !self.layer_ranges(num_layers)[1].contains(&layer)
    }
}

impl CacheSection {
    /// The codec name, e.g. `k:int4r+v:lm3`, or with an edge override
    /// `k:int4r+v:lm2u|edge1/1:k:int8r+v:int8r`.
    pub fn codec_name(&self) -> String {
        let main = self.sides_name(self.k, self.v);
        match &self.edge {
            None => main,
            Some(e) => format!(
                "{main}|edge{}/{}:{}",
                e.first,
                e.last,
                self.sides_name(e.k, e.v)
            ),
        }
    }

    /// The section the edge layers use: the edge sides, same rotation, no further edge.
    pub fn edge_section(&self) -> Option<CacheSection> {
        self.edge.map(|e| CacheSection {
            k: e.k,
            v: e.v,
            rotate: self.rotate,
            edge: None,
        })
    }

    /// The section of the layers without an override.
    pub fn main_section(&self) -> CacheSection {
        CacheSection {
            edge: None,
            ..self.clone()
        }
    }

    fn sides_name(&self, k: SideKind, v: SideKind) -> String {
        format!("k:{}+v:{}", k.label(self.rotate), v.label(self.rotate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_valid_ones() {
        for k in SideKind::ALL {
            assert_eq!(SideKind::parse(k.name()), Ok(k));
        }
        let err = SideKind::parse("int3").unwrap_err();
        assert!(err.contains("int3") && err.contains("lm4") && err.contains("tq3s"));
    }

    #[test]
    fn codec_name_marks_rotated_affine_sides_only() {
        let c = CacheSection {
            k: SideKind::Int4,
            v: SideKind::Lm3,
            rotate: true,
            edge: None,
        };
        assert_eq!(c.codec_name(), "k:int4r+v:lm3");
        let c = CacheSection {
            k: SideKind::Fp16,
            v: SideKind::Int8,
            rotate: false,
            edge: None,
        };
        assert_eq!(c.codec_name(), "k:fp16+v:int8");
        let c = CacheSection {
            k: SideKind::Int4,
            v: SideKind::Lm2u,
            rotate: true,
            edge: Some(EdgeLayers {
                first: 2,
                last: 1,
                k: SideKind::Int8,
                v: SideKind::Lm4,
            }),
        };
        assert_eq!(c.codec_name(), "k:int4r+v:lm2u|edge2/1:k:int8r+v:lm4");
        let e = c.edge.unwrap();
        let covered: Vec<usize> = (0..6).filter(|&l| e.covers(l, 6)).collect();
        assert_eq!(covered, [0, 1, 5]);
    }
}
