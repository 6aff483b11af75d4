//! Reading Llama weights from a GGUF file (or, through [`WeightSource`], any other container)
//! into the model's tensors: f32 norms, and matrices in f32 or kept in the file's ggml block
//! format.

use std::path::Path;

use super::llama::{LlamaLayer, LlamaModel};
use crate::config::DeviceChoice;
use crate::error::KvqError;
use crate::loader::GgufTensors;
use crate::model_spec::ModelSpec;
use crate::ops::linear::quant::QuantFormat;
use crate::ops::linear::Linear;

/// The precision the host keeps a model's matrices in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostWeights {
    /// f32 (quantized GGUF blocks stay blocks): the CPU's matmuls run on f32.
    F32,
    /// 16 bits: an HF checkpoint's f16/bf16 matrices as stored, a random model's in f16. For a
    /// GPU runner, which reads each weight once at upload (its f16 copy), so an 8B model takes
    /// 16 GB of host memory instead of 32 (and a 70B one fits a host with 256 GB).
    Half,
}

impl HostWeights {
    /// What a model run on `device` needs: 16 bits for a GPU, f32 for the CPU.
    pub fn for_device(device: DeviceChoice) -> Self {
        match device {
            DeviceChoice::Cuda(_) => Self::Half,
            DeviceChoice::Auto | DeviceChoice::Cpu => Self::F32,
        }
    }

    /// Host bytes per weight of an f32 or f16 matrix.
    pub fn bytes_per_weight(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::Half => 2,
        }
    }
}

/// Logical Llama tensors, independent of a file format's naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlamaTensor {
    Embed,
    FinalNorm,
    LmHead,
    AttnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    O(usize),
    FfnNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

/// A container of model weights.
pub trait WeightSource {
    /// The tensor as f32, row-major with the output dimension first (`[out, in]`), with Q and K
    /// rows in the HF ("rotate half") order; `Ok(None)` when the file does not have it.
    fn tensor(&self, t: LlamaTensor, spec: &ModelSpec) -> Result<Option<Vec<f32>>, KvqError>;
    /// Names the file in errors.
    fn origin(&self) -> &str;

    /// The tensor as a `[out_dim, in_dim]` matrix for the matmuls (same row order as
    /// [`WeightSource::tensor`]); `Ok(None)` when the file does not have it. The default builds
    /// an f32 [`Linear`] from [`WeightSource::tensor`]; a source whose weights are quantized
    /// overrides it to keep them quantized.
    fn linear(
        &self,
        t: LlamaTensor,
        spec: &ModelSpec,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Option<Linear>, KvqError> {
        f32_linear(self, t, spec, out_dim, in_dim, &format!("{t:?}"))
    }
}

/// `t` read through [`WeightSource::tensor`] as an f32 `[out_dim, in_dim]` matrix; `shown` names
/// the tensor in the shape error.
pub(super) fn f32_linear<S: WeightSource + ?Sized>(
    src: &S,
    t: LlamaTensor,
    spec: &ModelSpec,
    out_dim: usize,
    in_dim: usize,
    shown: &str,
) -> Result<Option<Linear>, KvqError> {
    let Some(w) = src.tensor(t, spec)? else {
        return Ok(None);
    };
    if w.len() != out_dim * in_dim {
        return Err(KvqError::Model {
            path: src.origin().to_string(),
            reason: format!(
                "tensor {shown} has {} elements, expected [{out_dim}, {in_dim}]",
                w.len()
            ),
        });
    }
    Ok(Some(Linear::new(w, out_dim, in_dim)))
}

impl LlamaTensor {
    fn gguf_name(self) -> String {
        match self {
            LlamaTensor::Embed => "token_embd.weight".into(),
            LlamaTensor::FinalNorm => "output_norm.weight".into(),
            LlamaTensor::LmHead => "output.weight".into(),
            LlamaTensor::AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
            LlamaTensor::Q(l) => format!("blk.{l}.attn_q.weight"),
            LlamaTensor::K(l) => format!("blk.{l}.attn_k.weight"),
            LlamaTensor::V(l) => format!("blk.{l}.attn_v.weight"),
            LlamaTensor::O(l) => format!("blk.{l}.attn_output.weight"),
            LlamaTensor::FfnNorm(l) => format!("blk.{l}.ffn_norm.weight"),
            LlamaTensor::Gate(l) => format!("blk.{l}.ffn_gate.weight"),
            LlamaTensor::Up(l) => format!("blk.{l}.ffn_up.weight"),
            LlamaTensor::Down(l) => format!("blk.{l}.ffn_down.weight"),
        }
    }
}

/// Undoes llama.cpp's conversion permutation of Q/K rows: within each head, GGUF row `2p + s`
/// holds HF row `s·d/2 + p`.
pub fn unpermute_rows(w: &[f32], heads: usize, head_dim: usize, in_dim: usize) -> Vec<f32> {
    unpermute_row_chunks(w, heads, head_dim, in_dim)
}

/// [`unpermute_rows`] over rows of `row_len` elements of any type (f32 weights, or the bytes
/// of a quantized row, whose blocks stay together).
fn unpermute_row_chunks<T: Copy + Default>(
    w: &[T],
    heads: usize,
    head_dim: usize,
    row_len: usize,
) -> Vec<T> {
    let mut out = vec![T::default(); w.len()];
    let half = head_dim / 2;
    for h in 0..heads {
        for p in 0..half {
            for s in 0..2 {
                let src = (h * head_dim + 2 * p + s) * row_len;
                let dst = (h * head_dim + s * half + p) * row_len;
                out[dst..dst + row_len].copy_from_slice(&w[src..src + row_len]);
            }
        }
    }
    out
}

impl WeightSource for GgufTensors {
    fn tensor(&self, t: LlamaTensor, spec: &ModelSpec) -> Result<Option<Vec<f32>>, KvqError> {
        let name = t.gguf_name();
        if !self.contains(&name) {
            return Ok(None);
        }
        let w = self.to_f32(&name)?;
        Ok(Some(match t {
            LlamaTensor::Q(_) => {
                unpermute_rows(&w, spec.num_heads, spec.head_dim_k, spec.hidden_size)
            }
            LlamaTensor::K(_) => {
                unpermute_rows(&w, spec.num_kv_heads, spec.head_dim_k, spec.hidden_size)
            }
            _ => w,
        }))
    }
    fn origin(&self) -> &str {
        GgufTensors::origin(self)
    }

    /// Q4_0, Q4_1 and Q8_0 matrices stay in their block format (Q/K rows un-permuted whole);
    /// other types are dequantized.
    fn linear(
        &self,
        t: LlamaTensor,
        spec: &ModelSpec,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Option<Linear>, KvqError> {
        let name = t.gguf_name();
        if !self.contains(&name) {
            return Ok(None);
        }
        let raw = self.raw(&name)?;
        if QuantFormat::from_ggml(raw.ggml_type).is_none() {
            return f32_linear(self, t, spec, out_dim, in_dim, &format!("`{name}`"));
        }
        if raw.dims != [in_dim as u64, out_dim as u64] {
            return Err(KvqError::Model {
                path: self.origin().to_string(),
                reason: format!(
                    "tensor `{name}` has dimensions {:?}, expected [{in_dim}, {out_dim}]",
                    raw.dims
                ),
            });
        }
        let heads = match t {
            LlamaTensor::Q(_) => Some(spec.num_heads),
            LlamaTensor::K(_) => Some(spec.num_kv_heads),
            _ => None,
        };
        let permuted;
        let data = match heads {
            Some(h) => {
                permuted = unpermute_row_bytes(raw.data, h, spec.head_dim_k, out_dim);
                &permuted[..]
            }
            None => raw.data,
        };
        Linear::quantized(raw.ggml_type, data, out_dim, in_dim)
            .map(Some)
            .map_err(|e| KvqError::Model {
                path: self.origin().to_string(),
                reason: format!("tensor `{name}`: {e}"),
            })
    }
}

/// [`unpermute_rows`] on rows of any encoding: `data` holds `rows` equal-sized rows, moved
/// whole (a quantized row's blocks stay together).
fn unpermute_row_bytes(data: &[u8], heads: usize, head_dim: usize, rows: usize) -> Vec<u8> {
    unpermute_row_chunks(data, heads, head_dim, data.len() / rows)
}

/// Builds the model from any weight source, checking every shape.
pub fn load_llama(src: &dyn WeightSource, spec: &ModelSpec) -> Result<LlamaModel, KvqError> {
    let missing = |t: LlamaTensor| KvqError::Model {
        path: src.origin().to_string(),
        reason: format!("tensor {t:?} is missing"),
    };
    let get = |t: LlamaTensor, len: usize| -> Result<Vec<f32>, KvqError> {
        let w = src.tensor(t, spec)?.ok_or_else(|| missing(t))?;
        if w.len() != len {
            return Err(KvqError::Model {
                path: src.origin().to_string(),
                reason: format!("tensor {t:?} has {} elements, expected {len}", w.len()),
            });
        }
        Ok(w)
    };
    let lin = |t: LlamaTensor, out: usize, inp: usize| -> Result<Linear, KvqError> {
        let l = src.linear(t, spec, out, inp)?.ok_or_else(|| missing(t))?;
        if (l.out_dim, l.in_dim) != (out, inp) {
            return Err(KvqError::Model {
                path: src.origin().to_string(),
                reason: format!(
                    "tensor {t:?} is [{}, {}], expected [{out}, {inp}]",
                    l.out_dim, l.in_dim
                ),
            });
        }
        Ok(l)
    };
    let (h, ff) = (spec.hidden_size, spec.intermediate_size);
    let (qd, kd, vd) = (
        spec.num_heads * spec.head_dim_k,
        spec.num_kv_heads * spec.head_dim_k,
        spec.num_kv_heads * spec.head_dim_v,
    );
    let mut layers = Vec::with_capacity(spec.num_layers);
    for l in 0..spec.num_layers {
        layers.push(LlamaLayer {
            attn_norm: get(LlamaTensor::AttnNorm(l), h)?,
            wq: lin(LlamaTensor::Q(l), qd, h)?,
            wk: lin(LlamaTensor::K(l), kd, h)?,
            wv: lin(LlamaTensor::V(l), vd, h)?,
            wo: lin(LlamaTensor::O(l), h, spec.num_heads * spec.head_dim_v)?,
            ffn_norm: get(LlamaTensor::FfnNorm(l), h)?,
            w_gate: lin(LlamaTensor::Gate(l), ff, h)?,
            w_up: lin(LlamaTensor::Up(l), ff, h)?,
            w_down: lin(LlamaTensor::Down(l), h, ff)?,
        });
    }
    // The embedding table stays in the file's format too (lookups dequantize one row); when
    // the head is tied it is also the output matrix.
    let embed = lin(LlamaTensor::Embed, spec.vocab_size, h)?;
    let lm_head = match src.linear(LlamaTensor::LmHead, spec, spec.vocab_size, h)? {
        Some(w) if (w.out_dim, w.in_dim) == (spec.vocab_size, h) => Some(w),
        Some(w) => {
            return Err(KvqError::Model {
                path: src.origin().to_string(),
                reason: format!(
                    "output head has {} elements, expected {}",
                    w.out_dim * w.in_dim,
                    spec.vocab_size * h
                ),
            })
        }
        None => None,
    };
    Ok(LlamaModel::from_linears(
        spec.clone(),
        embed,
        layers,
        get(LlamaTensor::FinalNorm, h)?,
        lm_head,
    ))
}

/// Opens a GGUF file and loads its Llama model.
pub fn load_gguf_llama(path: &Path) -> Result<(ModelSpec, LlamaModel, GgufTensors), KvqError> {
    let tensors = GgufTensors::open(path)?;
    let spec =
        crate::model_spec::gguf::spec_from_gguf(tensors.gguf(), &path.display().to_string())?;
    let model = load_llama(&tensors, &spec)?;
    Ok((spec, model, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // HF rows of one head of dim 4: [a0, a1, b0, b1]; llama.cpp stores [a0, b0, a1, b1].
        let gguf = vec![0.0, 2.0, 1.0, 3.0];
        assert_eq!(unpermute_rows(&gguf, 1, 4, 1), vec![0.0, 1.0, 2.0, 3.0]);
    }
}
