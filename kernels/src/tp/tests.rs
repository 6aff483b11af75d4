//! The tensor-parallel split against the unsplit layer: shards of one rank reproduce the
//! unsplit matrices, column-parallel products concatenate to the full product bit for bit,
//! row-parallel partials sum to it, and a whole attention block and MLP computed per rank and
//! summed match the unsplit ones. Random weights from a fresh seed (printed; replay with
//! `KVQ_TEST_SEED`).

use engine_core::model::{layers_from, LlamaLayer};
use engine_core::ops::linear::Linear;
use engine_core::testing::{fresh_seed, gaussian, rng};
use engine_core::ModelSpec;

use super::shard::{shard_layer, HostMatrix, LayerShard, LayerSplit, Shard};

/// A small GQA shape every tested group size divides (8 heads over 4 KV heads; the V head
/// dim differs from the K one so the two cannot be confused).
fn spec() -> ModelSpec {
    ModelSpec {
        num_layers: 1,
        num_heads: 8,
        num_kv_heads: 4,
        head_dim_k: 16,
        head_dim_v: 8,
        hidden_size: 64,
        intermediate_size: 96,
        vocab_size: 50,
        ..ModelSpec::smollm2_135m()
    }
}

const GROUPS: [usize; 3] = [1, 2, 4];
/// Positions (rows) of the test activations.
const T: usize = 5;

fn random_layer(spec: &ModelSpec, seed: u64) -> LlamaLayer {
    let mut r = rng(seed);
    let matrix = |out: usize, inp: usize| {
        let s = 1.0 / (inp as f32).sqrt();
        let w = gaussian(&mut r, out * inp).iter().map(|x| x * s).collect();
        Linear::new(w, out, inp)
    };
    layers_from(spec, matrix).remove(0)
}

fn shards(layer: &LlamaLayer, spec: &ModelSpec, n: usize) -> Vec<LayerShard> {
    Shard::all(n)
        .unwrap()
        .into_iter()
        .map(|s| shard_layer(layer, spec, s).unwrap())
        .collect()
}

/// `x·Wᵀ` for `x` of `rows × w.cols`: each output one sequential f32 dot product, so equal
/// weight rows give equal bits.
fn product(x: &[f32], w: &HostMatrix) -> Vec<f32> {
    assert_eq!(x.len() % w.cols, 0);
    x.chunks_exact(w.cols)
        .flat_map(|xr| {
            (0..w.rows).map(move |o| xr.iter().zip(w.row(o)).fold(0f32, |s, (a, b)| s + a * b))
        })
        .collect()
}

/// Columns `cols` of `x` (rows of `width`).
fn columns(x: &[f32], width: usize, cols: std::ops::Range<usize>) -> Vec<f32> {
    x.chunks_exact(width)
        .flat_map(|r| r[cols.clone()].iter().copied())
        .collect()
}

/// The per-row concatenation of rank outputs (each `rows × widths[r]`).
fn concat_rows(parts: &[Vec<f32>], rows: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for t in 0..rows {
        for p in parts {
            let w = p.len() / rows;
            out.extend_from_slice(&p[t * w..][..w]);
        }
    }
    out
}

fn sum(parts: &[Vec<f32>]) -> Vec<f32> {
    let mut s = vec![0f32; parts[0].len()];
    for p in parts {
        s.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    s
}

/// Asserts `|got - want| <= tol · scale` element-wise.
fn assert_close(got: &[f32], want: &[f32], tol: f32, scale: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for i in 0..got.len() {
        let err = (got[i] - want[i]).abs();
        assert!(
            err <= tol * scale[i].max(1e-6),
            "{what}: element {i}: {} vs {} (error {err}, bound {})",
            got[i],
            want[i],
            tol * scale[i]
        );
    }
}

/// `Σ|xᵢ·wᵢ|` of each output of `x·Wᵀ`: the scale its rounding error grows with.
fn magnitudes(x: &[f32], w: &HostMatrix) -> Vec<f32> {
    let abs = |v: &[f32]| v.iter().map(|a| a.abs()).collect::<Vec<_>>();
    let wa = HostMatrix {
        data: abs(&w.data),
        ..w.clone()
    };
    product(&abs(x), &wa)
}

/// Causal softmax attention over `T` positions, query head `h` reading KV head
/// `h / (heads / kv_heads)`; `q` is `[T, heads·dk]`, `k` `[T, kv·dk]`, `v` `[T, kv·dv]`.
/// RoPE is left out: it acts on each head alone, so it cannot interact with the split.
fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    kv: usize,
    dk: usize,
    dv: usize,
) -> Vec<f32> {
    let group = heads / kv;
    let scale = 1.0 / (dk as f32).sqrt();
    let mut out = vec![0f32; T * heads * dv];
    for t in 0..T {
        for h in 0..heads {
            let g = h / group;
            let qh = &q[(t * heads + h) * dk..][..dk];
            let scores: Vec<f32> = (0..=t)
                .map(|s| {
                    let kh = &k[(s * kv + g) * dk..][..dk];
                    scale * qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f32>()
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let z: f32 = e.iter().sum();
            let o = &mut out[(t * heads + h) * dv..][..dv];
            for (s, p) in e.iter().enumerate() {
                let vh = &v[(s * kv + g) * dv..][..dv];
                o.iter_mut().zip(vh).for_each(|(a, b)| *a += p / z * b);
            }
        }
    }
    out
}

fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

/// The layer's matrices, in `LayerShard` field order.
fn linears(layer: &LlamaLayer) -> [&Linear; 7] {
    [
        &layer.wq,
        &layer.wk,
        &layer.wv,
        &layer.wo,
        &layer.w_gate,
        &layer.w_up,
        &layer.w_down,
    ]
}

/// The layer's matrices unsplit, in `LayerShard` field order.
fn full(layer: &LlamaLayer) -> [HostMatrix; 7] {
    linears(layer).map(HostMatrix::from_linear)
}

fn parts(s: &LayerShard) -> [&HostMatrix; 7] {
    [&s.wq, &s.wk, &s.wv, &s.wo, &s.w_gate, &s.w_up, &s.w_down]
}

#[test]
fn one_rank_keeps_every_matrix_whole() {
    let spec = spec();
    let layer = random_layer(&spec, fresh_seed("tp one rank"));
    let s = shard_layer(&layer, &spec, Shard::new(0, 1).unwrap()).unwrap();
    for (part, w) in parts(&s).into_iter().zip(linears(&layer)) {
        assert_eq!((part.rows, part.cols), (w.out_dim, w.in_dim));
        assert_eq!(part.data, w.to_f32());
    }
    assert_eq!(s.split.heads, 0..8);
    assert_eq!(s.split.kv_heads, 0..4);
    assert_eq!(s.split.ff, 0..96);
}

/// A quantized (Q8_0) matrix of 37 rows, so shards start and end inside the 8-row groups the
/// packed dequantizer takes whole: row and column shards hold exactly its rows' values.
#[test]
fn quantized_shards_hold_the_dequantized_rows() {
    use engine_core::dtype::f32_to_f16_bits;
    use engine_core::loader::GgmlType;
    let seed = fresh_seed("tp quantized shards");
    let (out, inp) = (37, 64);
    let g = gaussian(&mut rng(seed), out * inp);
    // Q8_0 blocks of 32: an f16 scale, then 32 signed bytes.
    let data: Vec<u8> = g
        .chunks_exact(32)
        .flat_map(|b| {
            let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            let mut block = f32_to_f16_bits(scale).to_le_bytes().to_vec();
            block.extend(b.iter().map(|x| ((x / scale).round() as i8) as u8));
            block
        })
        .collect();
    let w = Linear::quantized(GgmlType::Q8_0, &data, out, inp).unwrap();
    let mut row = vec![f32::NAN; inp];
    let rows: Vec<Vec<f32>> = (0..out)
        .map(|i| {
            w.row_into(i, &mut row);
            row.clone()
        })
        .collect();
    for r in [0..out, 3..29, 9..16, 30..37] {
        let m = HostMatrix::rows_of(&w, r.clone());
        assert_eq!((m.rows, m.cols), (r.len(), inp));
        for (i, want) in r.clone().map(|i| (i, &rows[i])) {
            assert_eq!(
                m.row(i - r.start),
                &want[..],
                "row {i} of {r:?} (seed {seed})"
            );
        }
    }
    for c in [0..inp, 32..64, 5..6] {
        let m = HostMatrix::cols_of(&w, c.clone());
        assert_eq!((m.rows, m.cols), (out, c.len()));
        for (i, want) in rows.iter().enumerate() {
            assert_eq!(
                m.row(i),
                &want[c.clone()],
                "row {i}, columns {c:?} (seed {seed})"
            );
        }
    }
    assert!(rows.iter().flatten().all(|x| x.is_finite()));
}

#[test]
fn column_parallel_shards_concatenate_to_the_full_product_exactly() {
    let spec = spec();
    let seed = fresh_seed("tp column parallel");
    let layer = random_layer(&spec, seed);
    let x = gaussian(&mut rng(seed ^ 1), T * spec.hidden_size);
    let full = full(&layer);
    for n in GROUPS {
        let shards = shards(&layer, &spec, n);
        // wq, wk, wv, w_gate, w_up.
        for m in [0, 1, 2, 4, 5] {
            let per_rank: Vec<_> = shards.iter().map(|s| product(&x, parts(s)[m])).collect();
            assert_eq!(
                concat_rows(&per_rank, T),
                product(&x, &full[m]),
                "matrix {m}, {n} ranks"
            );
        }
    }
}

#[test]
fn row_parallel_partials_sum_to_the_full_product() {
    let spec = spec();
    let seed = fresh_seed("tp row parallel");
    let layer = random_layer(&spec, seed);
    let full = full(&layer);
    let o_width = spec.num_heads * spec.head_dim_v;
    let ff = spec.intermediate_size;
    let x_o = gaussian(&mut rng(seed ^ 2), T * o_width);
    let x_ff = gaussian(&mut rng(seed ^ 3), T * ff);
    for n in GROUPS {
        let shards = shards(&layer, &spec, n);
        let wo: Vec<_> = shards
            .iter()
            .map(|s| product(&columns(&x_o, o_width, s.split.o_cols()), &s.wo))
            .collect();
        let down: Vec<_> = shards
            .iter()
            .map(|s| product(&columns(&x_ff, ff, s.split.ff.clone()), &s.w_down))
            .collect();
        let (want_o, want_down) = (product(&x_o, &full[3]), product(&x_ff, &full[6]));
        let what = format!("wo, {n} ranks");
        assert_close(&sum(&wo), &want_o, 1e-5, &magnitudes(&x_o, &full[3]), &what);
        let what = format!("w_down, {n} ranks");
        let scale = magnitudes(&x_ff, &full[6]);
        assert_close(&sum(&down), &want_down, 1e-5, &scale, &what);
    }
}

#[test]
fn attention_and_mlp_per_rank_sum_to_the_unsplit_block() {
    let spec = spec();
    let seed = fresh_seed("tp attention block");
    let layer = random_layer(&spec, seed);
    let x = gaussian(&mut rng(seed ^ 4), T * spec.hidden_size);
    let [wq, wk, wv, wo, w_gate, w_up, w_down] = full(&layer);
    let (h, kv, dk, dv) = (
        spec.num_heads,
        spec.num_kv_heads,
        spec.head_dim_k,
        spec.head_dim_v,
    );
    let attn = attention(
        &product(&x, &wq),
        &product(&x, &wk),
        &product(&x, &wv),
        h,
        kv,
        dk,
        dv,
    );
    let want_attn = product(&attn, &wo);
    let want_mlp = product(
        &silu_mul(&product(&x, &w_gate), &product(&x, &w_up)),
        &w_down,
    );
    let bound = |y: &[f32]| vec![y.iter().fold(1f32, |m, v| m.max(v.abs())); y.len()];
    for n in GROUPS {
        let shards = shards(&layer, &spec, n);
        let attn_parts: Vec<_> = shards
            .iter()
            .map(|s| {
                let (q, k, v) = (product(&x, &s.wq), product(&x, &s.wk), product(&x, &s.wv));
                let out = attention(&q, &k, &v, h / n, kv / n, dk, dv);
                product(&out, &s.wo)
            })
            .collect();
        let what = format!("attention, {n} ranks");
        assert_close(
            &sum(&attn_parts),
            &want_attn,
            1e-4,
            &bound(&want_attn),
            &what,
        );
        let mlp_parts: Vec<_> = shards
            .iter()
            .map(|s| {
                let act = silu_mul(&product(&x, &s.w_gate), &product(&x, &s.w_up));
                product(&act, &s.w_down)
            })
            .collect();
        let what = format!("MLP, {n} ranks");
        assert_close(&sum(&mlp_parts), &want_mlp, 1e-4, &bound(&want_mlp), &what);
    }
}

#[test]
fn indivisible_groups_are_refused_naming_the_numbers() {
    let spec = spec();
    let layer = random_layer(&spec, fresh_seed("tp indivisible"));
    let err = |spec: &ModelSpec, n: usize| {
        shard_layer(&layer, spec, Shard::new(0, n).unwrap())
            .unwrap_err()
            .to_string()
    };
    let e = err(&spec, 3);
    assert!(
        e.contains("size 3 does not divide num_heads 8, num_kv_heads 4 ("),
        "{e}"
    );
    let e = err(&spec, 8);
    assert!(e.contains("size 8 does not divide num_kv_heads 4 ("), "{e}");
    let odd_ff = ModelSpec {
        intermediate_size: 90,
        ..spec.clone()
    };
    let e = err(&odd_ff, 4);
    assert!(
        e.contains("size 4 does not divide intermediate_size 90 ("),
        "{e}"
    );
}

#[test]
fn bad_ranks_and_shapes_are_refused() {
    let e = Shard::new(0, 0).unwrap_err().to_string();
    assert!(e.contains("at least 1 rank"), "{e}");
    let e = Shard::new(2, 2).unwrap_err().to_string();
    assert!(
        e.contains("rank 2 is outside a tensor-parallel group of 2"),
        "{e}"
    );
    assert!(Shard::all(0).is_err());

    let spec = spec();
    let mut layer = random_layer(&spec, fresh_seed("tp bad shape"));
    layer.wk = Linear::new(vec![0.0; 3 * 64], 3, 64);
    let e = shard_layer(&layer, &spec, Shard::new(0, 2).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("wk is [3, 64], the model spec makes it [64, 64]"),
        "{e}"
    );
}

/// A rank's f16 bytes: at tp = 1 every parameter but the norms, and over tp ranks the layers
/// split exactly while every rank holds the embedding and rank 0 the head.
#[test]
fn rank_weight_bytes_split_the_layers_and_replicate_the_tables() {
    let spec = ModelSpec {
        tie_word_embeddings: false,
        ..spec()
    };
    let norms = (2 * spec.num_layers + 1) * spec.hidden_size;
    let whole = LayerSplit::new(&spec, Shard::new(0, 1).unwrap()).unwrap();
    let all = engine_core::model::parameter_count(&spec) - norms as u64;
    assert_eq!(whole.f16_weight_bytes(&spec), 2 * all);
    let table = 2 * (spec.vocab_size * spec.hidden_size) as u64;
    for n in [2, 4] {
        let bytes: Vec<u64> = Shard::all(n)
            .unwrap()
            .into_iter()
            .map(|s| LayerSplit::new(&spec, s).unwrap().f16_weight_bytes(&spec))
            .collect();
        let layers = 2 * all - 2 * table;
        assert_eq!(bytes[0], layers / n as u64 + 2 * table, "tp {n}");
        assert!(
            bytes[1..].iter().all(|&b| b == layers / n as u64 + table),
            "tp {n}"
        );
    }
}
