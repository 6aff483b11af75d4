//! HF model directories: safetensors weights in f32/f16/bf16, sharded or not, every error a
//! user can hit, and (when `models/SmolLM2-135M-Instruct.Q4_1.gguf` is present) the GGUF model
//! exported to an HF directory giving the same logits through `load_model`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ::safetensors::tensor::TensorView;
use ::safetensors::Dtype;

use super::safetensors::expected_shape;
use super::{
    hf_tensor_name, load_gguf_llama, load_llama, HostWeights, LlamaModel, LlamaTensor, LogitsFor,
    SafetensorsWeights, SeqInput, WeightSource, SAFETENSORS_INDEX,
};
use crate::backend::{AttentionBackend, Capabilities};
use crate::cache::{BlockPool, BlockTable, CacheLayout, PagedKvCache, RecentWindow};
use crate::codec::{float_codec, KvCodec};
use crate::config::EngineConfig;
use crate::dtype::KvDtype;
use crate::engine::{load_model, load_model_for, LoadStage};
use crate::error::{ConfigError, KvqError};
use crate::loader::{GgmlType, Tokenizer};
use crate::model_spec::ModelSpec;
use crate::testing::{gaussian, rng};

/// A fresh directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(label: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kvq-hf-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tiny Llama: 2 layers, hidden 64, 4 heads of 16, 2 KV heads, vocab 96.
fn tiny_config(tied: bool) -> String {
    format!(
        r#"{{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":64,
        "intermediate_size":128,"num_attention_heads":4,"num_hidden_layers":2,
        "num_key_value_heads":2,"vocab_size":96,"max_position_embeddings":128,
        "rope_theta":10000.0,"rms_norm_eps":1e-05,"tie_word_embeddings":{tied},
        "torch_dtype":"float32"}}"#
    )
}

pub(crate) fn tiny_spec(tied: bool) -> ModelSpec {
    ModelSpec::from_config_json_str(&tiny_config(tied), "config.json").unwrap()
}

/// Every tensor a model of `spec` has (the output head only when untied), in load order.
fn all_tensors(spec: &ModelSpec) -> Vec<LlamaTensor> {
    let mut ts = vec![LlamaTensor::Embed, LlamaTensor::FinalNorm];
    if !spec.tie_word_embeddings {
        ts.push(LlamaTensor::LmHead);
    }
    for l in 0..spec.num_layers {
        ts.extend([
            LlamaTensor::AttnNorm(l),
            LlamaTensor::Q(l),
            LlamaTensor::K(l),
            LlamaTensor::V(l),
            LlamaTensor::O(l),
            LlamaTensor::FfnNorm(l),
            LlamaTensor::Gate(l),
            LlamaTensor::Up(l),
            LlamaTensor::Down(l),
        ]);
    }
    ts
}

/// One tensor to write: HF name, shape, f32 values.
pub(crate) type Entry = (String, Vec<usize>, Vec<f32>);

/// Random weights for `spec` (norm weights near 1, matrices small).
pub(crate) fn random_weights(spec: &ModelSpec, seed: u64) -> Vec<Entry> {
    let mut r = rng(seed);
    all_tensors(spec)
        .into_iter()
        .map(|t| {
            let shape = expected_shape(t, spec);
            let n = shape.iter().product();
            let norm = shape.len() == 1;
            let vals = gaussian(&mut r, n)
                .into_iter()
                .map(|x| if norm { 1.0 + 0.1 * x } else { 0.2 * x })
                .collect();
            (hf_tensor_name(t), shape, vals)
        })
        .collect()
}

/// Little-endian bytes of `vals` as `dtype` (F32, F16 or BF16).
fn encode(vals: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => vals.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => vals
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::BF16 => vals
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        other => panic!("no encoder for {other:?}"),
    }
}

/// `vals` as stored in `dtype` and read back.
fn rounded(vals: &[f32], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F32 => vals.to_vec(),
        Dtype::F16 => vals
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect(),
        Dtype::BF16 => vals
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect(),
        other => panic!("no rounding for {other:?}"),
    }
}

/// Writes `(name, dtype, shape, bytes)` tensors as one safetensors file.
fn write_raw(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    ::safetensors::serialize_to_file(views, None, path).unwrap();
}

/// Writes `entries` as one safetensors file in `dtype`.
fn write_safetensors(path: &Path, entries: &[Entry], dtype: Dtype) {
    let raw: Vec<_> = entries
        .iter()
        .map(|(name, shape, vals)| (name.clone(), dtype, shape.clone(), encode(vals, dtype)))
        .collect();
    write_raw(path, &raw);
}

/// Writes `entries` as `shards` safetensors files plus `model.safetensors.index.json`.
fn write_sharded(dir: &Path, entries: &[Entry], dtype: Dtype, shards: usize) {
    let per = entries.len().div_ceil(shards);
    let mut map = serde_json::Map::new();
    for (i, chunk) in entries.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
        write_safetensors(&dir.join(&file), chunk, dtype);
        for (name, _, _) in chunk {
            map.insert(name.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join(SAFETENSORS_INDEX), index.to_string()).unwrap();
}

/// A word-level `tokenizer.json` whose vocabulary is the ids 0..96 spelled as "t0", "t1", ….
pub(crate) fn write_tiny_tokenizer(dir: &Path) {
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..96).map(|i| (format!("t{i}"), i.into())).collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "t1", "eos_token": {"content": "t2"}, "chat_template": "{{ x }}"}"#,
    )
    .unwrap();
}

/// A complete tiny HF directory (config, tokenizer, one f32 safetensors file).
fn tiny_dir(label: &str, tied: bool) -> (TempDir, Vec<Entry>) {
    let dir = TempDir::new(label);
    let spec = tiny_spec(tied);
    let entries = random_weights(&spec, 7);
    std::fs::write(dir.join("config.json"), tiny_config(tied)).unwrap();
    write_tiny_tokenizer(dir.path());
    write_safetensors(&dir.join("model.safetensors"), &entries, Dtype::F32);
    (dir, entries)
}

/// The weights as a [`WeightSource`] without any file, to build the reference model.
pub(crate) struct InMemory(pub(crate) Vec<Entry>);

impl WeightSource for InMemory {
    fn tensor(&self, t: LlamaTensor, _spec: &ModelSpec) -> Result<Option<Vec<f32>>, KvqError> {
        let name = hf_tensor_name(t);
        Ok(self
            .0
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, _, v)| v.clone()))
    }
    fn origin(&self) -> &str {
        "memory"
    }
}

/// Attention on the CPU reference over an f32 cache, for running the forward pass here.
pub(crate) struct CpuF32Backend;

impl AttentionBackend for CpuF32Backend {
    fn name(&self) -> &'static str {
        "test-cpu-f32"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            policies: vec![0],
            registered_codecs: false,
            devices: vec!["cpu"],
        }
    }
    fn validate(&self, _spec: &ModelSpec, _cfg: &EngineConfig) -> Result<(), ConfigError> {
        Ok(())
    }
    fn build_codec(
        &self,
        spec: &ModelSpec,
        _cfg: &EngineConfig,
    ) -> Result<Arc<dyn KvCodec>, ConfigError> {
        Ok(Arc::new(float_codec(
            spec.head_dim_k,
            spec.head_dim_v,
            KvDtype::F32,
        )))
    }
    fn cache_layout(
        &self,
        codec: &dyn KvCodec,
        num_layers: usize,
        num_kv_heads: usize,
        block_size: usize,
    ) -> CacheLayout {
        CacheLayout::token_major(
            codec.k_bytes(),
            codec.v_bytes(),
            num_layers,
            num_kv_heads,
            block_size,
            256,
        )
    }
}

/// Logits (`[tokens, vocab]`) of every position of `tokens`, one pass over an f32 cache.
fn logits(model: &LlamaModel, tokens: &[u32]) -> Vec<f32> {
    logits_in_chunks(model, tokens, &[tokens.len()], KvDtype::F32, 0)
}

/// Logits of every position of `tokens`, fed in `chunks`, over a cache in `cache_dtype`, with
/// an f32 recent window of `window` tokens (0: none).
pub(crate) fn logits_in_chunks(
    model: &LlamaModel,
    tokens: &[u32],
    chunks: &[usize],
    cache_dtype: KvDtype,
    window: usize,
) -> Vec<f32> {
    let s = &model.spec;
    let codec: Arc<dyn KvCodec> = Arc::new(float_codec(s.head_dim_k, s.head_dim_v, cache_dtype));
    let block = 16;
    let blocks = BlockTable::blocks_for(tokens.len(), block);
    let layout = CpuF32Backend.cache_layout(codec.as_ref(), s.num_layers, s.num_kv_heads, block);
    let mut cache = PagedKvCache::new(layout, codec, blocks);
    let mut table = BlockTable::default();
    table
        .reserve(&mut BlockPool::new(blocks), tokens.len(), block)
        .unwrap();
    let dims = (s.head_dim_k, s.head_dim_v);
    let win = (window > 0).then(|| {
        let w = RecentWindow::new(window, s.num_layers, s.num_kv_heads, dims, KvDtype::F32);
        std::sync::Mutex::new(w)
    });
    let mut out = Vec::new();
    let mut start = 0;
    for &n in chunks {
        let seq = SeqInput {
            tokens: &tokens[start..start + n],
            start_pos: start,
            block_table: &table,
            window: win.as_ref(),
        };
        out.extend(
            model
                .forward(&CpuF32Backend, &mut cache, &[seq], LogitsFor::AllTokens)
                .unwrap(),
        );
        start += n;
    }
    assert_eq!(start, tokens.len(), "chunks cover the tokens");
    out
}

pub(crate) fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn err_text<T>(r: Result<T, KvqError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// Each dtype round-trips every tensor (rounded to the dtype) and loads into a model whose
/// logits match one built from the same rounded values in memory.
#[test]
fn tiny_llama_round_trips_in_f32_f16_and_bf16() {
    let spec = tiny_spec(false);
    let entries = random_weights(&spec, 11);
    let tokens = [3u32, 17, 95, 0, 42, 42, 8];
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let dir = TempDir::new("dtypes");
        let file = dir.join("model.safetensors");
        write_safetensors(&file, &entries, dtype);
        let w = SafetensorsWeights::open_dir(dir.path()).unwrap();
        assert_eq!(w.origin(), dir.path().display().to_string());
        assert_eq!(w.names().len(), entries.len());
        let expected: Vec<Entry> = entries
            .iter()
            .map(|(n, s, v)| (n.clone(), s.clone(), rounded(v, dtype)))
            .collect();
        for t in all_tensors(&spec) {
            let got = w.tensor(t, &spec).unwrap().unwrap();
            let want = InMemory(expected.clone())
                .tensor(t, &spec)
                .unwrap()
                .unwrap();
            assert_eq!(got, want, "{dtype:?} {t:?}");
        }
        if dtype != Dtype::F32 {
            assert_ne!(expected[0].2, entries[0].2, "{dtype:?} should round");
        }
        let model = load_llama(&w, &spec).unwrap();
        let reference = load_llama(&InMemory(expected), &spec).unwrap();
        let (a, b) = (logits(&model, &tokens), logits(&reference, &tokens));
        assert_eq!(a.len(), tokens.len() * spec.vocab_size);
        assert!(a.iter().all(|x| x.is_finite()));
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{dtype:?}");
        // Kept in 16 bits (for a GPU runner), the matrices hold the same values in half the
        // bytes, and the model computes the same logits.
        let kept = load_llama(&w.keeping_16bit(), &spec).unwrap();
        let (stored, bytes) = match dtype {
            Dtype::F16 => (GgmlType::F16, 2),
            Dtype::BF16 => (GgmlType::BF16, 2),
            _ => (GgmlType::F32, 4),
        };
        let pairs = [
            (&kept.layers()[1].wk, &model.layers()[1].wk),
            (&kept.layers()[0].w_down, &model.layers()[0].w_down),
            (kept.embeddings(), model.embeddings()),
        ];
        for (k, m) in pairs {
            assert_eq!(k.ggml_type(), stored, "{dtype:?}");
            assert_eq!(k.weight_bytes(), k.out_dim * k.in_dim * bytes, "{dtype:?}");
            assert_eq!(k.to_f32(), m.to_f32(), "{dtype:?}");
        }
        let c = logits(&kept, &tokens);
        assert!(
            max_abs_diff(&a, &c) <= 1e-5,
            "{dtype:?}: {}",
            max_abs_diff(&a, &c)
        );
    }
}

#[test]
fn sharded_checkpoint_loads_through_its_index() {
    let spec = tiny_spec(false);
    let entries = random_weights(&spec, 12);
    let dir = TempDir::new("sharded");
    write_sharded(dir.path(), &entries, Dtype::BF16, 3);
    // A stray file beside the shards is not part of the checkpoint.
    std::fs::write(dir.join("extra.safetensors"), b"not a safetensors file").unwrap();
    let w = SafetensorsWeights::open_dir(dir.path()).unwrap();
    for (name, _, vals) in &entries {
        let (got, _) = w.to_f32(name).unwrap().unwrap();
        assert_eq!(got, rounded(vals, Dtype::BF16), "{name}");
    }
    load_llama(&w, &spec).unwrap();
}

#[test]
fn output_head_is_tied_when_absent_or_when_config_says_so() {
    let tokens = [5u32, 6, 7];
    // Absent: tied to the embeddings.
    let spec = tiny_spec(true);
    let entries = random_weights(&spec, 13);
    assert!(!entries.iter().any(|(n, _, _)| n == "lm_head.weight"));
    let dir = TempDir::new("tied");
    write_safetensors(&dir.join("model.safetensors"), &entries, Dtype::F32);
    let w = SafetensorsWeights::open_dir(dir.path()).unwrap();
    assert_eq!(w.tensor(LlamaTensor::LmHead, &spec).unwrap(), None);
    let tied = load_llama(&w, &spec).unwrap();
    let untied_spec = ModelSpec {
        tie_word_embeddings: false,
        ..spec.clone()
    };
    assert_eq!(w.tensor(LlamaTensor::LmHead, &untied_spec).unwrap(), None);

    // Present but the config ties it: the embeddings are the head.
    let mut with_head = entries.clone();
    let embed = entries[0].clone();
    assert_eq!(embed.0, "model.embed_tokens.weight");
    with_head.push((
        "lm_head.weight".into(),
        embed.1.clone(),
        vec![9.0; embed.2.len()],
    ));
    let dir2 = TempDir::new("tied-with-head");
    write_safetensors(&dir2.join("model.safetensors"), &with_head, Dtype::F32);
    let w2 = SafetensorsWeights::open_dir(dir2.path()).unwrap();
    assert_eq!(w2.tensor(LlamaTensor::LmHead, &spec).unwrap(), None);
    let tied2 = load_llama(&w2, &spec).unwrap();
    assert_eq!(logits(&tied, &tokens), logits(&tied2, &tokens));
    // Untied, the file's head is used.
    let untied = load_llama(&w2, &untied_spec).unwrap();
    assert!(max_abs_diff(&logits(&tied, &tokens), &logits(&untied, &tokens)) > 1.0);
}

#[test]
fn missing_tensor_names_tensor_and_file() {
    let spec = tiny_spec(false);
    let mut entries = random_weights(&spec, 14);
    entries.retain(|(n, _, _)| n != "model.layers.1.mlp.down_proj.weight");
    let dir = TempDir::new("missing");
    let file = dir.join("model.safetensors");
    write_safetensors(&file, &entries, Dtype::F32);
    let w = SafetensorsWeights::open_dir(dir.path()).unwrap();
    let err = err_text(load_llama(&w, &spec));
    assert!(
        err.contains("model.layers.1.mlp.down_proj.weight")
            && err.contains("missing")
            && err.contains(&file.display().to_string()),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_tensor_file_and_shapes() {
    let spec = tiny_spec(false);
    let mut entries = random_weights(&spec, 15);
    // Transposed: the right number of elements, the wrong shape.
    let k = entries
        .iter_mut()
        .find(|(n, _, _)| n == "model.layers.0.self_attn.k_proj.weight")
        .unwrap();
    assert_eq!(k.1, vec![32, 64]);
    k.1 = vec![64, 32];
    let dir = TempDir::new("shape");
    let file = dir.join("model.safetensors");
    write_safetensors(&file, &entries, Dtype::F32);
    let w = SafetensorsWeights::open_dir(dir.path()).unwrap();
    let err = err_text(load_llama(&w, &spec));
    assert!(
        err.contains("model.layers.0.self_attn.k_proj.weight")
            && err.contains("[64, 32]")
            && err.contains("[32, 64]")
            && err.contains(&file.display().to_string()),
        "{err}"
    );

    // A config that disagrees with the file (vocab 100 instead of 96).
    let other = ModelSpec {
        vocab_size: 100,
        ..spec
    };
    let dir2 = TempDir::new("shape-vocab");
    write_safetensors(
        &dir2.join("model.safetensors"),
        &random_weights(&tiny_spec(false), 15),
        Dtype::F32,
    );
    let w2 = SafetensorsWeights::open_dir(dir2.path()).unwrap();
    let err = err_text(load_llama(&w2, &other));
    assert!(
        err.contains("model.embed_tokens.weight") && err.contains("[96, 64]"),
        "{err}"
    );
}

#[test]
fn unsupported_dtypes_are_refused_by_name() {
    let spec = tiny_spec(false);
    for dtype in [Dtype::I8, Dtype::F8_E4M3, Dtype::F64] {
        let entries = random_weights(&spec, 16);
        let raw: Vec<_> = entries
            .iter()
            .map(|(name, shape, vals)| {
                if name == "model.layers.1.self_attn.o_proj.weight" {
                    let bytes = vec![1u8; vals.len() * dtype.bitsize() / 8];
                    (name.clone(), dtype, shape.clone(), bytes)
                } else {
                    (
                        name.clone(),
                        Dtype::F32,
                        shape.clone(),
                        encode(vals, Dtype::F32),
                    )
                }
            })
            .collect();
        let dir = TempDir::new("dtype");
        let file = dir.join("model.safetensors");
        write_raw(&file, &raw);
        let w = SafetensorsWeights::open_dir(dir.path()).unwrap();
        let err = err_text(load_llama(&w, &spec));
        assert!(
            err.contains("model.layers.1.self_attn.o_proj.weight")
                && err.contains(&format!("{dtype:?}"))
                && err.contains("F32, F16 and BF16")
                && err.contains(&file.display().to_string()),
            "{err}"
        );
    }
}

#[test]
fn truncated_or_corrupt_files_are_errors_naming_the_file() {
    let spec = tiny_spec(false);
    let entries = random_weights(&spec, 17);
    let good = TempDir::new("good");
    write_safetensors(&good.join("model.safetensors"), &entries, Dtype::F32);
    let bytes = std::fs::read(good.join("model.safetensors")).unwrap();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("short", bytes[..5].to_vec()),
        ("mid-header", bytes[..header_end / 2].to_vec()),
        ("mid-data", bytes[..bytes.len() - 100].to_vec()),
        ("extra-bytes", [bytes.as_slice(), &[0u8; 4]].concat()),
        ("huge-header-len", {
            let mut b = bytes.clone();
            b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
            b
        }),
        ("not-json", {
            let mut b = bytes.clone();
            b[8] = b'#';
            b
        }),
    ];
    for (what, data) in cases {
        let dir = TempDir::new("corrupt");
        let file = dir.join("model.safetensors");
        std::fs::write(&file, data).unwrap();
        let err = err_text(SafetensorsWeights::open_dir(dir.path()));
        assert!(
            err.contains(&file.display().to_string())
                && err.contains("not a valid safetensors file"),
            "{what}: {err}"
        );
    }
}

#[test]
fn directory_errors_name_the_directory_and_the_problem() {
    let no_weights = TempDir::new("no-weights");
    let err = err_text(SafetensorsWeights::open_dir(no_weights.path()));
    assert!(
        err.contains(&no_weights.path().display().to_string()) && err.contains("no *.safetensors"),
        "{err}"
    );
    std::fs::write(no_weights.join("pytorch_model.bin"), b"").unwrap();
    let err = err_text(SafetensorsWeights::open_dir(no_weights.path()));
    assert!(err.contains(".bin"), "{err}");

    // The index names a shard that is not there.
    let spec = tiny_spec(false);
    let dir = TempDir::new("lost-shard");
    write_sharded(dir.path(), &random_weights(&spec, 18), Dtype::F32, 2);
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = err_text(SafetensorsWeights::open_dir(dir.path()));
    assert!(
        err.contains(SAFETENSORS_INDEX) && err.contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
    std::fs::write(dir.join(SAFETENSORS_INDEX), "{\"weight_map\": 3}").unwrap();
    let err = err_text(SafetensorsWeights::open_dir(dir.path()));
    assert!(
        err.contains(SAFETENSORS_INDEX) && err.contains("weight_map"),
        "{err}"
    );
}

#[test]
fn load_model_reads_an_hf_directory() {
    let (dir, entries) = tiny_dir("load-model", false);
    let mut stages = Vec::new();
    let (spec, model, tokenizer) = load_model(dir.path(), &mut |s| stages.push(s)).unwrap();
    assert_eq!(spec, tiny_spec(false));
    assert_eq!(
        stages,
        [
            LoadStage::ReadingHeader,
            LoadStage::LoadingWeights,
            LoadStage::LoadingTokenizer
        ]
    );
    assert_eq!(tokenizer.encode("t5 t17 t95", false).unwrap(), [5, 17, 95]);
    assert_eq!((tokenizer.bos_id(), tokenizer.eos_id()), (Some(1), Some(2)));
    assert_eq!(tokenizer.chat_template(), Some("{{ x }}"));
    let reference = load_llama(&InMemory(entries.clone()), &spec).unwrap();
    let tokens = [5u32, 17, 95];
    assert_eq!(logits(&model, &tokens), logits(&reference, &tokens));
    // An F16 checkpoint for a GPU runner: its matrices stay 16-bit; the same model.
    write_safetensors(&dir.join("model.safetensors"), &entries, Dtype::F16);
    let load = |half| load_model_for(dir.path(), half, &mut |_| {}).unwrap().1;
    let (widened, kept) = (load(HostWeights::F32), load(HostWeights::Half));
    assert_eq!(widened.layers()[0].wq.ggml_type(), GgmlType::F32);
    assert_eq!(kept.layers()[0].wq.ggml_type(), GgmlType::F16);
    assert_eq!(kept.lm_head().to_f32(), widened.lm_head().to_f32());
    let (a, b) = (logits(&widened, &tokens), logits(&kept, &tokens));
    assert!(max_abs_diff(&a, &b) <= 1e-5, "{}", max_abs_diff(&a, &b));
}

#[test]
fn load_model_errors_for_hf_directories() {
    let load = |p: &Path| err_text(load_model(p, &mut |_| {}));

    let (dir, _) = tiny_dir("no-config", false);
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let err = load(dir.path());
    assert!(
        err.contains(&dir.path().display().to_string()) && err.contains("without config.json"),
        "{err}"
    );

    let (dir, _) = tiny_dir("no-tokenizer", false);
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let err = load(dir.path());
    assert!(err.contains("without tokenizer.json"), "{err}");

    let (dir, _) = tiny_dir("no-safetensors", false);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = load(dir.path());
    assert!(
        err.contains(&dir.path().display().to_string()) && err.contains("no *.safetensors"),
        "{err}"
    );

    let (dir, _) = tiny_dir("bad-config", false);
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": 64}").unwrap();
    let err = load(dir.path());
    assert!(
        err.contains("config.json") && err.contains("num_hidden_layers"),
        "{err}"
    );

    let (dir, _) = tiny_dir("arch", false);
    let qwen = tiny_config(false).replace("\"llama\"", "\"qwen2\"");
    std::fs::write(dir.join("config.json"), qwen).unwrap();
    let err = load(dir.path());
    assert!(
        err.contains("config.json") && err.contains("`qwen2` is not supported"),
        "{err}"
    );

    let (dir, _) = tiny_dir("truncated", false);
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = load(dir.path());
    assert!(
        err.contains(&file.display().to_string()) && err.contains("not a valid safetensors"),
        "{err}"
    );

    // The config's shapes disagree with the weights.
    let (dir, _) = tiny_dir("config-mismatch", false);
    let wider = tiny_config(false).replace("\"intermediate_size\":128", "\"intermediate_size\":96");
    std::fs::write(dir.join("config.json"), wider).unwrap();
    let err = load(dir.path());
    assert!(
        err.contains("model.layers.0.mlp.gate_proj.weight")
            && err.contains("[128, 64]")
            && err.contains("[96, 64]"),
        "{err}"
    );
}

/// The GGUF model, exported to an HF directory (f32 safetensors in two shards with HF names, the
/// fixture config.json, tokenizer.json), loads through `load_model` with the same spec,
/// tokenizer and logits.
#[test]
fn smollm2_exported_to_hf_dir_gives_the_gguf_logits() {
    let Some(gguf) = crate::testing::default_model() else {
        return;
    };
    let (gguf_spec, _quantized, tensors) = load_gguf_llama(&gguf).unwrap();
    let gguf_tok = Tokenizer::from_gguf(tensors.gguf(), &gguf.display().to_string()).unwrap();

    let dir = TempDir::new("smollm2");
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/smollm2-135m-config.json");
    std::fs::copy(&fixture, dir.join("config.json")).unwrap();
    let hf_spec = ModelSpec::from_path(dir.path()).unwrap();
    assert!(hf_spec.tie_word_embeddings);
    assert_eq!(
        hf_spec,
        ModelSpec {
            dtype: hf_spec.dtype,
            ..gguf_spec.clone()
        }
    );

    let entries: Vec<Entry> = all_tensors(&hf_spec)
        .into_iter()
        .map(|t| {
            let vals = tensors.tensor(t, &gguf_spec).unwrap().unwrap();
            (hf_tensor_name(t), expected_shape(t, &hf_spec), vals)
        })
        .collect();
    assert_eq!(
        tensors.tensor(LlamaTensor::LmHead, &gguf_spec).unwrap(),
        None
    );
    write_sharded(dir.path(), &entries, Dtype::F32, 2);
    drop(entries);
    gguf_tok
        .inner()
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
    let token = |id: Option<u32>| id.and_then(|i| gguf_tok.id_to_token(i));
    let tok_config = serde_json::json!({
        "bos_token": token(gguf_tok.bos_id()),
        "eos_token": token(gguf_tok.eos_id()),
        "chat_template": gguf_tok.chat_template(),
    });
    std::fs::write(dir.join("tokenizer_config.json"), tok_config.to_string()).unwrap();

    let (spec, model, tok) = load_model(dir.path(), &mut |_| {}).unwrap();
    assert_eq!(spec, hf_spec);
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.chat_template()),
        (
            gguf_tok.bos_id(),
            gguf_tok.eos_id(),
            gguf_tok.chat_template()
        )
    );
    let prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n";
    let tokens = tok.encode(prompt, false).unwrap();
    assert_eq!(tokens, gguf_tok.encode(prompt, false).unwrap());
    assert!(tokens.len() > 8);

    // The exported weights are the GGUF's dequantized to f32, so compare with the GGUF read
    // through the f32 path (the default `linear`), not its quantized matmuls.
    struct F32Only<'a>(&'a crate::loader::GgufTensors);
    impl WeightSource for F32Only<'_> {
        fn tensor(&self, t: LlamaTensor, spec: &ModelSpec) -> Result<Option<Vec<f32>>, KvqError> {
            self.0.tensor(t, spec)
        }
        fn origin(&self) -> &str {
            WeightSource::origin(self.0)
        }
    }
    let gguf_f32 = load_llama(&F32Only(&tensors), &gguf_spec).unwrap();
    let (a, b) = (logits(&gguf_f32, &tokens), logits(&model, &tokens));
    assert_eq!(a.len(), tokens.len() * spec.vocab_size);
    let diff = max_abs_diff(&a, &b);
    assert!(diff < 1e-4, "max |logit difference| {diff}");
}
