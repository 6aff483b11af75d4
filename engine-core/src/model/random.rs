//! Llama models of a named shape with seeded random f32 weights, for serving benchmarks at a
//! real model's size without its weights (the shape, not the values, sets the speed and the
//! KV-cache footprint). The same seed gives the same weights on any machine and thread count.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::llama::{LlamaLayer, LlamaModel};
use crate::error::KvqError;
use crate::model_spec::ModelSpec;
use crate::ops::linear::Linear;

/// Shapes [`model_shape`] knows.
pub const MODEL_SHAPES: [&str; 2] = ["llama3-8b", "smollm2-135m"];

/// Meta-Llama-3-8B's `config.json` (shape only).
const LLAMA3_8B: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
  "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
  "tie_word_embeddings": false, "torch_dtype": "bfloat16"
}"#;

/// The spec of a named shape (see [`MODEL_SHAPES`]).
pub fn model_shape(name: &str) -> Result<ModelSpec, KvqError> {
    match name {
        "llama3-8b" => ModelSpec::from_config_json_str(LLAMA3_8B, "llama3-8b"),
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

/// Bytes the f32 weights of `spec` take.
pub fn f32_weight_bytes(spec: &ModelSpec) -> u64 {
    parameter_count(spec) * 4
}

/// Refuses a shape whose f32 weights would not fit in `available` bytes of memory (with a
/// quarter kept for the cache and activations).
pub fn check_fits_in_memory(spec: &ModelSpec, available: u64) -> Result<(), KvqError> {
    let need = f32_weight_bytes(spec);
    if need > available / 4 * 3 {
        return Err(KvqError::InvalidArgument(format!(
            "random f32 weights of this shape need {:.1} GiB, more than three quarters of the \
             {:.1} GiB of memory available; run it on a machine with more memory (or a GPU \
             runner), or pick a smaller --model-shape",
            need as f64 / (1u64 << 30) as f64,
            available as f64 / (1u64 << 30) as f64
        )));
    }
    Ok(())
}

/// `n` values uniform in ±`scale`, generated in parallel chunks each seeded from
/// (`seed`, `tensor`, chunk), so the values do not depend on the thread count.
fn uniform(n: usize, scale: f32, seed: u64, tensor: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut v = vec![0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let mut rng = StdRng::seed_from_u64(
            seed ^ tensor.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ (c as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9),
        );
        out.iter_mut()
            .for_each(|x| *x = rng.random_range(-scale..=scale));
    });
    v
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
    let spec = spec.clone().check("random weights")?;
    let mut tensor = 0u64;
    let mut matrix = |out: usize, inp: usize| {
        tensor += 1;
        // Uniform on ±a has standard deviation a/√3.
        let a = (3.0 / inp as f32).sqrt();
        Linear::new(uniform(out * inp, a, seed, tensor), out, inp)
    };
    let h = spec.hidden_size;
    let layers = layers_from(&spec, &mut matrix);
    let lm_head = (!spec.tie_word_embeddings).then(|| matrix(spec.vocab_size, h));
    let embed = uniform(spec.vocab_size * h, 1.0, seed, 0);
    Ok(LlamaModel::new(
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
        let e = check_fits_in_memory(&l, 16 << 30).unwrap_err().to_string();
        assert!(e.contains("29.9 GiB") && e.contains("--model-shape"), "{e}");
        check_fits_in_memory(&l, 64 << 30).unwrap();
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
}
