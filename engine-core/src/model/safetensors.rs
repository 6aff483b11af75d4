//! Llama weights from a Hugging Face model directory: `config.json` beside one or more
//! `*.safetensors` files (a sharded checkpoint lists its shards in
//! `model.safetensors.index.json`). Every file is memory-mapped and its header checked when the
//! directory is opened; a tensor is converted to f32 (from f32, f16 or bf16) when it is asked for,
//! or, for a GPU runner, an F16/BF16 matrix is kept in 16 bits
//! ([`SafetensorsWeights::keeping_16bit`]).
//!
//! HF stores Q/K rows in the "rotate half" order the forward pass uses, so unlike GGUF nothing is
//! permuted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ::safetensors::tensor::{Metadata, TensorInfo};
use ::safetensors::{Dtype, SafeTensors};
use rayon::prelude::*;

use super::weights::{f32_linear, LlamaTensor, WeightSource};
use crate::error::KvqError;
use crate::loader::GgmlType;
use crate::model_spec::ModelSpec;
use crate::ops::linear::Linear;

/// The index file of a sharded checkpoint.
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// The HF (`LlamaForCausalLM`) name of a tensor.
pub fn hf_tensor_name(t: LlamaTensor) -> String {
    let layer = |l: usize, rest: &str| format!("model.layers.{l}.{rest}");
    match t {
        LlamaTensor::Embed => "model.embed_tokens.weight".into(),
        LlamaTensor::FinalNorm => "model.norm.weight".into(),
        LlamaTensor::LmHead => "lm_head.weight".into(),
        LlamaTensor::AttnNorm(l) => layer(l, "input_layernorm.weight"),
        LlamaTensor::Q(l) => layer(l, "self_attn.q_proj.weight"),
        LlamaTensor::K(l) => layer(l, "self_attn.k_proj.weight"),
        LlamaTensor::V(l) => layer(l, "self_attn.v_proj.weight"),
        LlamaTensor::O(l) => layer(l, "self_attn.o_proj.weight"),
        LlamaTensor::FfnNorm(l) => layer(l, "post_attention_layernorm.weight"),
        LlamaTensor::Gate(l) => layer(l, "mlp.gate_proj.weight"),
        LlamaTensor::Up(l) => layer(l, "mlp.up_proj.weight"),
        LlamaTensor::Down(l) => layer(l, "mlp.down_proj.weight"),
    }
}

/// The shape (`[out, in]`, or `[n]` for norms) `spec` asks of a tensor.
pub(super) fn expected_shape(t: LlamaTensor, spec: &ModelSpec) -> Vec<usize> {
    let h = spec.hidden_size;
    let (q, k, v) = (
        spec.num_heads * spec.head_dim_k,
        spec.num_kv_heads * spec.head_dim_k,
        spec.num_kv_heads * spec.head_dim_v,
    );
    match t {
        LlamaTensor::Embed | LlamaTensor::LmHead => vec![spec.vocab_size, h],
        LlamaTensor::FinalNorm | LlamaTensor::AttnNorm(_) | LlamaTensor::FfnNorm(_) => vec![h],
        LlamaTensor::Q(_) => vec![q, h],
        LlamaTensor::K(_) => vec![k, h],
        LlamaTensor::V(_) => vec![v, h],
        LlamaTensor::O(_) => vec![h, spec.num_heads * spec.head_dim_v],
        LlamaTensor::Gate(_) | LlamaTensor::Up(_) => vec![spec.intermediate_size, h],
        LlamaTensor::Down(_) => vec![h, spec.intermediate_size],
    }
}

/// A tensor's values as f32 (row-major) and its shape.
pub type F32Tensor = (Vec<f32>, Vec<usize>);

/// One mapped `.safetensors` file and its parsed header.
struct Shard {
    path: String,
    map: memmap2::Mmap,
    /// Where the data section starts (after the 8-byte length and the JSON header).
    data_start: usize,
    metadata: Metadata,
}

/// The tensors of a set of safetensors files, looked up by HF name.
pub struct SafetensorsWeights {
    origin: String,
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`.
    by_name: HashMap<String, usize>,
    /// Matrices stored as F16/BF16 stay 16-bit ([`SafetensorsWeights::keeping_16bit`]).
    keep_16bit: bool,
}

fn model_err(path: impl std::fmt::Display, reason: impl Into<String>) -> KvqError {
    KvqError::Model {
        path: path.to_string(),
        reason: reason.into(),
    }
}

impl SafetensorsWeights {
    /// Opens the weights of an HF model directory: the shards `model.safetensors.index.json`
    /// lists, else every `*.safetensors` file in it.
    pub fn open_dir(dir: &Path) -> Result<Self, KvqError> {
        let origin = dir.display().to_string();
        let index = dir.join(SAFETENSORS_INDEX);
        let files = if index.is_file() {
            shards_from_index(dir, &index)?
        } else {
            let entries = std::fs::read_dir(dir).map_err(|source| KvqError::Io {
                path: origin.clone(),
                source,
            })?;
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            files.sort();
            files
        };
        if files.is_empty() {
            let has_bin = dir.join("pytorch_model.bin").is_file()
                || dir.join("pytorch_model.bin.index.json").is_file();
            return Err(model_err(
                &origin,
                if has_bin {
                    "has PyTorch .bin weights but no *.safetensors files; only safetensors \
                     weights can be loaded (convert them first)"
                } else {
                    "has no *.safetensors files (an HF model directory needs config.json, its \
                     weights as *.safetensors and tokenizer.json)"
                },
            ));
        }
        Self::open_files(&files, &origin)
    }

    /// Opens the given safetensors files as one set of weights; `origin` names the set in
    /// errors. A tensor present in several files is taken from the first.
    pub fn open_files(files: &[PathBuf], origin: &str) -> Result<Self, KvqError> {
        let mut shards = Vec::with_capacity(files.len());
        let mut by_name = HashMap::new();
        for path in files {
            let shard = open_shard(path)?;
            let i = shards.len();
            for name in shard.metadata.offset_keys() {
                by_name.entry(name).or_insert(i);
            }
            shards.push(shard);
        }
        Ok(Self {
            origin: origin.to_string(),
            shards,
            by_name,
            keep_16bit: false,
        })
    }

    /// Keeps F16 and BF16 matrices in 16 bits instead of widening them to f32: half the host
    /// memory, for a GPU runner that reads each weight once at upload (the CPU's matmuls are
    /// faster on f32). Norms are small and stay f32.
    pub fn keeping_16bit(mut self) -> Self {
        self.keep_16bit = true;
        self
    }

    /// `t` as a 16-bit [`Linear`] when it is stored as F16 or BF16 with the shape `spec`
    /// implies; `None` otherwise (the f32 path then reads it, or reports what is wrong).
    fn half_linear(
        &self,
        t: LlamaTensor,
        spec: &ModelSpec,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Option<Linear>, KvqError> {
        if t == LlamaTensor::LmHead && spec.tie_word_embeddings {
            return Ok(None);
        }
        let Some((_, info, bytes)) = self.locate(&hf_tensor_name(t)) else {
            return Ok(None);
        };
        let ty = match info.dtype {
            Dtype::F16 => GgmlType::F16,
            Dtype::BF16 => GgmlType::BF16,
            _ => return Ok(None),
        };
        if info.shape != expected_shape(t, spec) || info.shape != [out_dim, in_dim] {
            return Ok(None);
        }
        let mut bits = vec![0u16; bytes.len() / 2];
        bits.par_chunks_mut(CONVERT_CHUNK)
            .zip(bytes.par_chunks(2 * CONVERT_CHUNK))
            .for_each(|(dst, src)| {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = u16::from_le_bytes([s[0], s[1]]);
                }
            });
        Linear::half(ty, bits, out_dim, in_dim).map(Some)
    }

    /// Whether any file holds a tensor of that name.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Names of all tensors, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The file holding `name`, its header entry and its bytes.
    fn locate(&self, name: &str) -> Option<(&Shard, &TensorInfo, &[u8])> {
        let shard = &self.shards[*self.by_name.get(name)?];
        let info = shard.metadata.info(name)?;
        let (start, end) = info.data_offsets;
        // The crate checked at open that the offsets tile the data section exactly.
        let bytes = shard
            .map
            .get(shard.data_start + start..shard.data_start + end)?;
        Some((shard, info, bytes))
    }

    /// The tensor `name` as f32 in storage (row-major) order, with its shape; `Ok(None)` when no
    /// file has it.
    pub fn to_f32(&self, name: &str) -> Result<Option<F32Tensor>, KvqError> {
        if !self.contains(name) {
            return Ok(None);
        }
        let (shard, info, bytes) = self.locate(name).ok_or_else(|| {
            model_err(
                &self.origin,
                format!("tensor `{name}` lies outside its file's data"),
            )
        })?;
        let data = convert(info.dtype, bytes).ok_or_else(|| {
            model_err(
                &shard.path,
                format!(
                    "tensor `{name}` has dtype {:?}; only F32, F16 and BF16 weights are supported",
                    info.dtype
                ),
            )
        })?;
        Ok(Some((data, info.shape.clone())))
    }
}

/// The shard files an index's `weight_map` names, each once, in name order.
fn shards_from_index(dir: &Path, index: &Path) -> Result<Vec<PathBuf>, KvqError> {
    let text = std::fs::read_to_string(index).map_err(|source| KvqError::Io {
        path: index.display().to_string(),
        source,
    })?;
    let bad = |reason: String| model_err(index.display(), reason);
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = json["weight_map"]
        .as_object()
        .ok_or_else(|| bad("has no `weight_map` object".into()))?;
    let mut names = map
        .iter()
        .map(|(tensor, file)| {
            file.as_str()
                .ok_or_else(|| bad(format!("`weight_map` entry `{tensor}` is not a file name")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(bad(format!(
                    "lists shard `{name}`, which is not in {}",
                    dir.display()
                )))
            }
        })
        .collect()
}

/// Maps `path` and parses its header (which the crate checks against the file's size).
fn open_shard(path: &Path) -> Result<Shard, KvqError> {
    let origin = path.display().to_string();
    let io = |source| KvqError::Io {
        path: origin.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the map is read-only and private to this process. Like every mmap-based model
    // loader we rely on the file not being truncated or rewritten while it is mapped; the header
    // is checked against the mapped length below and every slice is bounds-checked.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
        model_err(
            &origin,
            format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        )
    })?;
    Ok(Shard {
        path: origin,
        map,
        data_start: 8 + header_len,
        metadata,
    })
}

/// Elements per parallel chunk when reading a tensor: large enough that scheduling costs nothing.
const CONVERT_CHUNK: usize = 1 << 16;

/// Little-endian `bytes` of `dtype` as f32; `None` for a dtype other than F32, F16 or BF16.
fn convert(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let (size, one): (usize, fn(&[u8]) -> f32) = match dtype {
        Dtype::F32 => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Dtype::F16 => (2, |b| {
            half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
        }),
        Dtype::BF16 => (2, |b| {
            half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
        }),
        _ => return None,
    };
    let mut out = vec![0f32; bytes.len() / size];
    out.par_chunks_mut(CONVERT_CHUNK)
        .zip(bytes.par_chunks(CONVERT_CHUNK * size))
        .for_each(|(dst, src)| {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(size)) {
                *d = one(s);
            }
        });
    Some(out)
}

impl WeightSource for SafetensorsWeights {
    fn tensor(&self, t: LlamaTensor, spec: &ModelSpec) -> Result<Option<Vec<f32>>, KvqError> {
        if t == LlamaTensor::LmHead && spec.tie_word_embeddings {
            return Ok(None);
        }
        let name = hf_tensor_name(t);
        let Some((data, shape)) = self.to_f32(&name)? else {
            if t == LlamaTensor::LmHead {
                return Ok(None); // no output head: tied to the embeddings
            }
            let files = if self.shards.len() == 1 {
                self.shards[0].path.clone()
            } else {
                format!("any of its {} safetensors files", self.shards.len())
            };
            return Err(model_err(
                &self.origin,
                format!("tensor `{name}` is missing (not in {files})"),
            ));
        };
        let expected = expected_shape(t, spec);
        if shape != expected {
            let path = self.locate(&name).map_or(&self.origin, |(s, _, _)| &s.path);
            return Err(model_err(
                path,
                format!(
                    "tensor `{name}` has shape {shape:?}, but config.json implies {expected:?}"
                ),
            ));
        }
        Ok(Some(data))
    }

    fn origin(&self) -> &str {
        &self.origin
    }

    fn linear(
        &self,
        t: LlamaTensor,
        spec: &ModelSpec,
        out_dim: usize,
        in_dim: usize,
    ) -> Result<Option<Linear>, KvqError> {
        if self.keep_16bit {
            if let Some(l) = self.half_linear(t, spec, out_dim, in_dim)? {
                return Ok(Some(l));
            }
        }
        f32_linear(self, t, spec, out_dim, in_dim, &format!("{t:?}"))
    }
}
