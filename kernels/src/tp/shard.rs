//! The host-side split of a Llama layer's weights for one rank of a
//! tensor-parallel group (Megatron style, see [`crate::tp`]), as f32 row-major `[out, in]`
//! matrices ready to upload to that rank's device.
//!
//! Column-parallel matrices keep whole output rows, so a rank's product is exactly the
//! full product's rows for its heads; row-parallel matrices keep whole columns of the rank's
//! inputs, so a rank's product is a partial sum that an all-reduce completes. Quantized
//! weights are dequantized only where the rank's share lies (rows in parallel chunks): a rank
//! never holds more than its share in f32.

use std::ops::Range;

use engine_core::model::LlamaLayer;
use engine_core::ops::linear::Linear;
use engine_core::ModelSpec;
use rayon::prelude::*;

use crate::KernelError;

/// Rank `rank` of a tensor-parallel group of `size` ranks (one GPU each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    rank: usize,
    size: usize,
}

impl Shard {
    /// Rank `rank` of `size`; `size` must be at least 1 and `rank` below it.
    pub fn new(rank: usize, size: usize) -> Result<Self, KernelError> {
        if size == 0 {
            return Err(KernelError::InvalidArgument(
                "a tensor-parallel group needs at least 1 rank, got 0".into(),
            ));
        }
        if rank >= size {
            return Err(KernelError::InvalidArgument(format!(
                "rank {rank} is outside a tensor-parallel group of {size} (ranks 0..{size})"
            )));
        }
        Ok(Self { rank, size })
    }

    /// Every rank of a group of `size`, in order.
    pub fn all(size: usize) -> Result<Vec<Self>, KernelError> {
        Shard::new(0, size)?;
        Ok((0..size).map(|rank| Self { rank, size }).collect())
    }

    pub fn rank(self) -> usize {
        self.rank
    }

    pub fn size(self) -> usize {
        self.size
    }

    /// This rank's equal part `[r·total/n, (r+1)·total/n)` of `total` items, or `None` when
    /// `n` does not divide `total`.
    pub fn even_part(self, total: usize) -> Option<Range<usize>> {
        (total % self.size == 0).then(|| {
            let part = total / self.size;
            self.rank * part..(self.rank + 1) * part
        })
    }
}

/// An f32 matrix, `rows × cols` row-major: a rank's slice of a weight matrix `[out, in]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostMatrix {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl HostMatrix {
    /// The whole of `w` in f32.
    pub fn from_linear(w: &Linear) -> Self {
        Self::rows_of(w, 0..w.out_dim)
    }

    /// Rows `rows` of `w` (a column-parallel shard), dequantizing only those.
    ///
    /// # Panics
    /// When `rows` reaches past `w.out_dim`.
    pub fn rows_of(w: &Linear, rows: Range<usize>) -> Self {
        let cols = w.in_dim;
        let mut data = vec![0f32; rows.len() * cols];
        w.dequantize_rows(rows.clone(), &mut data);
        Self {
            data,
            rows: rows.len(),
            cols,
        }
    }

    /// Columns `cols` of every row of `w` (a row-parallel shard).
    ///
    /// # Panics
    /// When `cols` reaches past `w.in_dim`.
    pub fn cols_of(w: &Linear, cols: Range<usize>) -> Self {
        assert!(cols.end <= w.in_dim, "columns {cols:?} of {}", w.in_dim);
        let mut data = vec![0f32; w.out_dim * cols.len()];
        if !cols.is_empty() {
            data.par_chunks_exact_mut(cols.len())
                .enumerate()
                .for_each_init(
                    || vec![0f32; w.in_dim],
                    |row, (i, out)| {
                        w.row_into(i, row);
                        out.copy_from_slice(&row[cols.clone()]);
                    },
                );
        }
        Self {
            data,
            rows: w.out_dim,
            cols: cols.len(),
        }
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..][..self.cols]
    }
}

/// What one rank owns of every layer: its query heads, KV heads and intermediate rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSplit {
    pub shard: Shard,
    /// Query heads `[r·H/n, (r+1)·H/n)`.
    pub heads: Range<usize>,
    /// KV heads `[r·KV/n, (r+1)·KV/n)`: exactly those the rank's query heads read (GQA maps
    /// query head `h` to KV head `h / (H/KV)`).
    pub kv_heads: Range<usize>,
    /// Intermediate (MLP) rows `[r·ff/n, (r+1)·ff/n)`.
    pub ff: Range<usize>,
    pub head_dim_k: usize,
    pub head_dim_v: usize,
}

impl LayerSplit {
    /// The split of `spec` for `shard`; the group size must divide the query heads, the KV
    /// heads and the intermediate size, so that every rank does the same work.
    pub fn new(spec: &ModelSpec, shard: Shard) -> Result<Self, KernelError> {
        let dims = [
            ("num_heads", spec.num_heads),
            ("num_kv_heads", spec.num_kv_heads),
            ("intermediate_size", spec.intermediate_size),
        ];
        let parts: Vec<_> = dims.iter().map(|&(_, d)| shard.even_part(d)).collect();
        if let [Some(heads), Some(kv_heads), Some(ff)] = parts.as_slice() {
            return Ok(Self {
                shard,
                heads: heads.clone(),
                kv_heads: kv_heads.clone(),
                ff: ff.clone(),
                head_dim_k: spec.head_dim_k,
                head_dim_v: spec.head_dim_v,
            });
        }
        let bad: Vec<String> = dims
            .iter()
            .zip(&parts)
            .filter(|(_, p)| p.is_none())
            .map(|((name, d), _)| format!("{name} {d}"))
            .collect();
        Err(KernelError::InvalidArgument(format!(
            "tensor-parallel size {} does not divide {} (it must divide num_heads {}, \
             num_kv_heads {} and intermediate_size {} so every rank gets an equal share)",
            shard.size(),
            bad.join(", "),
            spec.num_heads,
            spec.num_kv_heads,
            spec.intermediate_size
        )))
    }

    /// Bytes of the f16 weights this rank uploads for `spec`: its share of every layer's
    /// matrices, the whole embedding table, and on rank 0 an untied output head (norms and
    /// RoPE tables are not counted: they are a few MB).
    pub fn f16_weight_bytes(&self, spec: &ModelSpec) -> u64 {
        let h = spec.hidden_size as u64;
        let qkv = (self.q_rows().len() + self.k_rows().len() + self.v_rows().len()) as u64;
        let per_layer = qkv * h + h * self.o_cols().len() as u64 + 3 * self.ff.len() as u64 * h;
        let table = spec.vocab_size as u64 * h;
        let head = if self.shard.rank() == 0 && !spec.tie_word_embeddings {
            table
        } else {
            0
        };
        2 * (per_layer * spec.num_layers as u64 + table + head)
    }

    /// Rows of `wq` (and columns of the attention output the rank computes): its query heads.
    pub fn q_rows(&self) -> Range<usize> {
        scale(&self.heads, self.head_dim_k)
    }

    /// Rows of `wk`: its KV heads.
    pub fn k_rows(&self) -> Range<usize> {
        scale(&self.kv_heads, self.head_dim_k)
    }

    /// Rows of `wv`: its KV heads.
    pub fn v_rows(&self) -> Range<usize> {
        scale(&self.kv_heads, self.head_dim_v)
    }

    /// Columns of `wo`: the attention outputs of its query heads.
    pub fn o_cols(&self) -> Range<usize> {
        scale(&self.heads, self.head_dim_v)
    }
}

fn scale(r: &Range<usize>, by: usize) -> Range<usize> {
    r.start * by..r.end * by
}

/// One rank's matrices of a layer. The norms are not split: every rank uses the layer's own.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerShard {
    pub split: LayerSplit,
    /// Column-parallel: `[heads·head_dim_k, hidden]`.
    pub wq: HostMatrix,
    /// Column-parallel: `[kv_heads·head_dim_k, hidden]`.
    pub wk: HostMatrix,
    /// Column-parallel: `[kv_heads·head_dim_v, hidden]`.
    pub wv: HostMatrix,
    /// Row-parallel: `[hidden, heads·head_dim_v]`.
    pub wo: HostMatrix,
    /// Column-parallel: `[ff/n, hidden]`.
    pub w_gate: HostMatrix,
    /// Column-parallel: `[ff/n, hidden]`.
    pub w_up: HostMatrix,
    /// Row-parallel: `[hidden, ff/n]`.
    pub w_down: HostMatrix,
}

/// Rank `shard`'s part of `layer`, a layer of a model of `spec`. Errors when the group size
/// does not divide the heads or the intermediate size, or a matrix is not the shape `spec`
/// gives it.
pub fn shard_layer(
    layer: &LlamaLayer,
    spec: &ModelSpec,
    shard: Shard,
) -> Result<LayerShard, KernelError> {
    let split = LayerSplit::new(spec, shard)?;
    let (h, ff) = (spec.hidden_size, spec.intermediate_size);
    let (q, o) = (
        spec.num_heads * spec.head_dim_k,
        spec.num_heads * spec.head_dim_v,
    );
    let (k, v) = (
        spec.num_kv_heads * spec.head_dim_k,
        spec.num_kv_heads * spec.head_dim_v,
    );
    let expect = [
        ("wq", &layer.wq, q, h),
        ("wk", &layer.wk, k, h),
        ("wv", &layer.wv, v, h),
        ("wo", &layer.wo, h, o),
        ("w_gate", &layer.w_gate, ff, h),
        ("w_up", &layer.w_up, ff, h),
        ("w_down", &layer.w_down, h, ff),
    ];
    for (name, w, out, inp) in expect {
        if (w.out_dim, w.in_dim) != (out, inp) {
            return Err(KernelError::InvalidArgument(format!(
                "layer matrix {name} is [{}, {}], the model spec makes it [{out}, {inp}]",
                w.out_dim, w.in_dim
            )));
        }
    }
    Ok(LayerShard {
        wq: HostMatrix::rows_of(&layer.wq, split.q_rows()),
        wk: HostMatrix::rows_of(&layer.wk, split.k_rows()),
        wv: HostMatrix::rows_of(&layer.wv, split.v_rows()),
        wo: HostMatrix::cols_of(&layer.wo, split.o_cols()),
        w_gate: HostMatrix::rows_of(&layer.w_gate, split.ff.clone()),
        w_up: HostMatrix::rows_of(&layer.w_up, split.ff.clone()),
        w_down: HostMatrix::cols_of(&layer.w_down, split.ff.clone()),
        split,
    })
}
