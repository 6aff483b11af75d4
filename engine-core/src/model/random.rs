//! Llama models of a named shape with seeded random f32 weights, for serving benchmarks at a
//! real model's size without its weights (the shape, not the values, sets the speed and the
//! KV-cache footprint). The same seed gives the same weights on any machine and thread count,
//! in f32 for the CPU or rounded to f16 for a GPU runner ([`HostWeights`]), which halves the
//! host memory (a 70B shape needs 141 GB in f16).

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::llama::{LlamaLayer, LlamaModel};
use super::weights::HostWeights;
use crate::error::KvqError;
use crate::loader::GgmlType;
use crate::model_spec::ModelSpec;
use crate::ops::linear::Linear;

/// Shapes [`model_shape`] knows.
pub const MODEL_SHAPES: [&str; 3] = ["llama3-8b", "llama3-70b", "smollm2-135m"];

/// Meta-Llama-3-8B's `config.json` (shape only).
const LLAMA3_8B: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
  "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
  "tie_word_embeddings": false, "torch_dtype": "bfloat16"
}"#;

/// Meta-Llama-3-70B's `config.json` (shape only): larger than one 141 GB GPU in f16 with any
/// cache, so it runs with `tp` ≥ 2.
const LLAMA3_70B: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
  "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
  "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
  "tie_word_embeddings": false, "torch_dtype": "bfloat16"
}"#;

/// The spec of a named shape (see [`MODEL_SHAPES`]).
pub fn model_shape(name: &str) -> Result<ModelSpec, KvqError> {
    match name {
        "llama3-8b" => ModelSpec::from_config_json_str(LLAMA3_8B, "llama3-8b"),
        "llama3-70b" => ModelSpec::from_config_json_str(LLAMA3_70B, "llama3-70b"),
        "smollm2-135m" => Ok(ModelSpec::smollm2_135m()),
        _ => Err(KvqError::InvalidArgument(format!(
            "unknown model shape `{name}`; known: {}",
            MODEL_SHAPES.join(", ")
        ))),
    }
}

/// Parameters of a model of `spec` (embedding, layers, final norm, untied head).
pub fn parameter_count(spec: &ModelSpec) -> u64 {
    let (h, f) = (spec.hidden_size as u64, spec.intermediate_size as u64);
    let q = (spec.num_heads * spec.head_dim_k) as u64;
    let kv = (spec.num_kv_heads * (spec.head_dim_k + spec.head_dim_v)) as u64;
    let o = (spec.num_heads * spec.head_dim_v) as u64;
    let layer = h * (q + kv) + o * h + 3 * h * f + 2 * h;
    let embed = spec.vocab_size as u64 * h;
    let head = if spec.tie_word_embeddings { 0 } else { embed };
    embed + head + h + layer * spec.num_layers as u64
}

/// Bytes the weights of `spec` take on the host in `host`'s precision.
pub fn weight_bytes(spec: &ModelSpec, host: HostWeights) -> u64 {
    parameter_count(spec) * host.bytes_per_weight()
}

/// Refuses a shape whose weights (in `host`'s precision) would not fit in `available` bytes
/// of memory (with a quarter kept for the cache and activations).
pub fn check_fits_in_memory(
    spec: &ModelSpec,
    available: u64,
    host: HostWeights,
) -> Result<(), KvqError> {
    let need = weight_bytes(spec, host);
    if need > available / 4 * 3 {
        let (kind, hint) = match host {
            HostWeights::F32 => ("f32", " (or a GPU runner, which holds them in f16)"),
            HostWeights::Half => ("f16", ""),
        };
        return Err(KvqError::InvalidArgument(format!(
            "random {kind} weights of this shape need {:.1} GiB, more than three quarters of \
             the {:.1} GiB of memory available; run it on a machine with more memory{hint}, \
             or pick a smaller --model-shape",
            need as f64 / (1u64 << 30) as f64,
            available as f64 / (1u64 << 30) as f64
        )));
    }
    Ok(())
}

/// Values drawn per parallel chunk.
const CHUNK: usize = 1 << 16;

/// Chunk `c` of tensor `tensor`'s values uniform in ±`scale`, seeded from (`seed`, `tensor`,
/// `c`), so the values do not depend on the thread count.
fn fill_uniform(out: &mut [f32], scale: f32, seed: u64, tensor: u64, c: usize) {
    let mut rng = StdRng::seed_from_u64(
        seed ^ tensor.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ (c as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9),
    );
    out.iter_mut()
        .for_each(|x| *x = rng.random_range(-scale..=scale));
}

/// `n` values uniform in ±`scale`, drawn in parallel chunks ([`fill_uniform`]).
fn uniform(n: usize, scale: f32, seed: u64, tensor: u64) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, out)| fill_uniform(out, scale, seed, tensor, c));
    v
}

/// [`uniform`]'s values rounded to f16 (bit patterns), without an f32 copy of the whole.
fn uniform_f16_bits(n: usize, scale: f32, seed: u64, tensor: u64) -> Vec<u16> {
    let mut v = vec![0u16; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each_init(
        || vec![0f32; CHUNK],
        |buf, (c, out)| {
            let buf = &mut buf[..out.len()];
            fill_uniform(buf, scale, seed, tensor, c);
            out.reinterpret_cast_mut::<half::f16>()
                .convert_from_f32_slice(buf);
        },
    );
    v
}

/// An `[out, inp]` matrix of tensor `tensor`'s uniform values in `host`'s precision.
fn uniform_matrix(
    out: usize,
    inp: usize,
    scale: f32,
    (seed, tensor): (u64, u64),
    host: HostWeights,
) -> Linear {
    match host {
        HostWeights::F32 => Linear::new(uniform(out * inp, scale, seed, tensor), out, inp),
        HostWeights::Half => Linear::half(
            GgmlType::F16,
            uniform_f16_bits(out * inp, scale, seed, tensor),
            out,
            inp,
        )
        .expect("an f16 matrix of its own shape"),
    }
}

/// The layers of `spec` with every matrix from `matrix(out, in)` (in the order q, k, v, o,
/// gate, up, down per layer) and norms of 1: the shapes in one place for every synthetic model.
pub fn layers_from(
    spec: &ModelSpec,
    mut matrix: impl FnMut(usize, usize) -> Linear,
) -> Vec<LlamaLayer> {
    let (h, f) = (spec.hidden_size, spec.intermediate_size);
    let (q, kv_k, kv_v, o) = (
        spec.num_heads * spec.head_dim_k,
        spec.num_kv_heads * spec.head_dim_k,
        spec.num_kv_heads * spec.head_dim_v,
        spec.num_heads * spec.head_dim_v,
    );
    (0..spec.num_layers)
        .map(|_| LlamaLayer {
            attn_norm: vec![1.0; h],
            wq: matrix(q, h),
            wk: matrix(kv_k, h),
            wv: matrix(kv_v, h),
            wo: matrix(h, o),
            ffn_norm: vec![1.0; h],
            w_gate: matrix(f, h),
            w_up: matrix(f, h),
            w_down: matrix(h, f),
        })
        .collect()
}

/// A model of `spec` with seeded random weights: matrices uniform with standard deviation
/// `1/√in` (activations keep their scale through the layers), norms 1, f32.
pub fn random_llama(spec: &ModelSpec, seed: u64) -> Result<LlamaModel, KvqError> {
    random_llama_for(spec, seed, HostWeights::F32)
}

/// [`random_llama`] with its matrices in `host`'s precision ([`HostWeights::Half`]: the same
/// draws rounded to f16).
pub fn random_llama_for(
    spec: &ModelSpec,
    seed: u64,
    host: HostWeights,
) -> Result<LlamaModel, KvqError> {
    let spec = spec.clone().check("random weights")?;
    let mut tensor = 0u64;
    let mut matrix = |out: usize, inp: usize| {
        tensor += 1;
        // Uniform on ±a has standard deviation a/√3.
        let a = (3.0 / inp as f32).sqrt();
        uniform_matrix(out, inp, a, (seed, tensor), host)
    };
    let h = spec.hidden_size;
    let layers = layers_from(&spec, &mut matrix);
    let lm_head = (!spec.tie_word_embeddings).then(|| matrix(spec.vocab_size, h));
    let embed = uniform_matrix(spec.vocab_size, h, 1.0, (seed, 0), host);
    Ok(LlamaModel::from_linears(
        spec.clone(),
        embed,
        layers,
        vec![1.0; h],
        lm_head,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_parameter_counts() {
        let l = model_shape("llama3-8b").unwrap();
        assert_eq!((l.num_layers, l.num_kv_heads, l.head_dim_k), (32, 8, 128));
        // Llama 3 8B has 8.03 billion parameters.
        let n = parameter_count(&l);
        assert!((8_020_000_000..8_040_000_000).contains(&n), "{n}");
        // Llama 3 70B: 70.55 billion.
        let n = parameter_count(&model_shape("llama3-70b").unwrap());
        assert!((70_500_000_000..70_600_000_000).contains(&n), "{n}");
        // SmolLM2-135M: 134.5 million.
        let n = parameter_count(&model_shape("smollm2-135m").unwrap());
        assert!((134_000_000..135_000_000).contains(&n), "{n}");
        assert!(model_shape("gpt-5")
            .unwrap_err()
            .to_string()
            .contains("llama3-8b"));
    }

    #[test]
    fn a_shape_too_big_for_memory_is_refused() {
        let l = model_shape("llama3-8b").unwrap();
        let e = check_fits_in_memory(&l, 16 << 30, HostWeights::F32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("f32 weights") && e.contains("29.9 GiB"), "{e}");
        assert!(
            e.contains("--model-shape") && e.contains("GPU runner"),
            "{e}"
        );
        check_fits_in_memory(&l, 64 << 30, HostWeights::F32).unwrap();
        // In f16 (for a GPU) half the bytes.
        check_fits_in_memory(&l, 32 << 30, HostWeights::Half).unwrap();
        let big = model_shape("llama3-70b").unwrap();
        let e = check_fits_in_memory(&big, 128 << 30, HostWeights::Half)
            .unwrap_err()
            .to_string();
        assert!(e.contains("f16 weights") && e.contains("131.4 GiB"), "{e}");
        check_fits_in_memory(&big, 256 << 30, HostWeights::Half).unwrap();
    }

    #[test]
    fn the_seed_fixes_the_weights_and_the_forward_runs() {
        let mut spec = model_shape("smollm2-135m").unwrap();
        spec.num_layers = 2;
        spec.vocab_size = 512;
        let a = random_llama(&spec, 5).unwrap();
        let b = random_llama(&spec, 5).unwrap();
        let c = random_llama(&spec, 6).unwrap();
        let probe = |m: &LlamaModel| {
            let mut out = vec![f32::NAN; spec.hidden_size];
            m.layers()[1].w_down.forward_into_with(
                &vec![1.0; spec.intermediate_size],
                &mut out,
                crate::ops::linear::Path::Auto,
            );
            out
        };
        assert_eq!(probe(&a), probe(&b));
        assert_ne!(probe(&a), probe(&c));
        assert!(probe(&a).iter().all(|x| x.is_finite()));
    }

    /// The f16 model holds the f32 model's draws rounded to f16, matrix by matrix.
    #[test]
    fn the_f16_model_rounds_the_same_draws() {
        let mut spec = model_shape("smollm2-135m").unwrap();
        spec.num_layers = 1;
        spec.vocab_size = 300;
        let wide = random_llama(&spec, 9).unwrap();
        let half = random_llama_for(&spec, 9, HostWeights::Half).unwrap();
        let (lw, lh) = (&wide.layers()[0], &half.layers()[0]);
        let pairs = [
            (&lw.wq, &lh.wq),
            (&lw.w_down, &lh.w_down),
            (wide.embeddings(), half.embeddings()),
            (wide.lm_head(), half.lm_head()),
        ];
        for (w, h) in pairs {
            assert_eq!(h.ggml_type(), GgmlType::F16);
            let rounded: Vec<f32> = w
                .to_f32()
                .iter()
                .map(|&x| half::f16::from_f32(x).to_f32())
                .collect();
            assert_eq!(h.to_f32(), rounded);
        }
        assert_eq!(
            weight_bytes(&spec, HostWeights::Half) * 2,
            weight_bytes(&spec, HostWeights::F32)
        );
    }
}
