//! Checks every codec and attention path must pass, shared by the backends' and plugins' test
//! suites so each codec is held to the same references: fresh random seeds (printed, and
//! fixed with `KVQ_TEST_SEED`), outputs poisoned with NaN before each run, NaN never passing.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use crate::attention::{AttentionBatch, SeqSlice};
use crate::backend::AttentionBackend;
use crate::cache::{BlockPool, BlockTable, PagedKvCache};
use crate::codec::{decode_k_model_domain, decode_v_model_domain, dot, EntryRun, KvCodec};

/// The default model (`models/SmolLM2-135M-Instruct.Q4_1.gguf` in the repository), if present.
/// Real-model tests skip with a message when it is absent, unless `KVQ_REQUIRE_MODEL=1` (set
/// by `scripts/test.sh`), where its absence fails the test.
pub fn default_model() -> Option<std::path::PathBuf> {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("KVQ_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
        panic!("{} is missing: run scripts/fetch-model.sh", p.display());
    }
    eprintln!(
        "skipping: {} not found (run scripts/fetch-model.sh)",
        p.display()
    );
    None
}

/// A seed from `KVQ_TEST_SEED`, or a fresh one from the clock; printed so a failure can be
/// replayed.
pub fn fresh_seed(label: &str) -> u64 {
    let seed = std::env::var("KVQ_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t ^ (label.len() as u64).rotate_left(17)
        });
    eprintln!("[{label}] seed {seed} (replay with KVQ_TEST_SEED={seed})");
    seed
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` standard normal values.
pub fn gaussian(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

/// A buffer of `n` NaNs: outputs start poisoned so an unwritten element cannot pass.
pub fn poisoned(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

/// Asserts every value is finite.
pub fn assert_all_finite(xs: &[f32], what: &str) {
    if let Some(i) = xs.iter().position(|x| !x.is_finite()) {
        panic!("{what}: element {i} is {} (not finite)", xs[i]);
    }
}

/// Cosine similarity in f64; NaN input gives NaN, which fails every `>=` bound.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += x as f64 * x as f64;
        bb += y as f64 * y as f64;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// Encodes then decodes K into the model domain.
pub fn round_trip_k(codec: &dyn KvCodec, x: &[f32]) -> Vec<f32> {
    let (mut d, mut m) = side_buffers(codec, true);
    codec.encode_k(x, &mut d, &mut m);
    let mut out = poisoned(codec.head_dim_k());
    decode_k_model_domain(codec, &d, &m, &mut out);
    out
}

/// Encodes then decodes V into the model domain.
pub fn round_trip_v(codec: &dyn KvCodec, x: &[f32]) -> Vec<f32> {
    let (mut d, mut m) = side_buffers(codec, false);
    codec.encode_v(x, &mut d, &mut m);
    let mut out = poisoned(codec.head_dim_v());
    decode_v_model_domain(codec, &d, &m, &mut out);
    out
}

/// Zeroed (data, meta) buffers of the K (`k = true`) or V side.
pub fn side_buffers(codec: &dyn KvCodec, k: bool) -> (Vec<u8>, Vec<u8>) {
    let b = if k { codec.k_bytes() } else { codec.v_bytes() };
    (vec![0u8; b.data], vec![0u8; b.meta])
}

/// The fused `score_k`/`accumulate_v` agree with decode-then-compute on random vectors, and
/// the run decoders with per-entry decode (see [`check_run_decode`]).
pub fn check_fused_forms(codec: &dyn KvCodec, seed: u64) {
    check_run_decode(codec, seed ^ 0x5eed);
    let mut r = rng(seed);
    for _ in 0..32 {
        let (dk, dv) = (codec.head_dim_k(), codec.head_dim_v());
        let (x, q) = (gaussian(&mut r, dk), gaussian(&mut r, dk));
        let (mut d, mut m) = side_buffers(codec, true);
        codec.encode_k(&x, &mut d, &mut m);
        let mut k = poisoned(dk);
        codec.decode_k(&d, &m, &mut k);
        let fused = codec.score_k(&q, &d, &m);
        let plain = dot(&q, &k);
        assert!(
            (fused - plain).abs() <= 1e-4 * (1.0 + plain.abs()),
            "{}: fused score {fused} vs decoded {plain}",
            codec.name()
        );
        let x = gaussian(&mut r, dv);
        let (mut d, mut m) = side_buffers(codec, false);
        codec.encode_v(&x, &mut d, &mut m);
        let mut v = poisoned(dv);
        codec.decode_v(&d, &m, &mut v);
        let mut acc = vec![0.5f32; dv];
        codec.accumulate_v(0.75, &d, &m, &mut acc);
        for (a, vi) in acc.iter().zip(&v) {
            assert!(
                (a - (0.5 + 0.75 * vi)).abs() <= 1e-5 * (1.0 + vi.abs()),
                "{}: accumulate",
                codec.name()
            );
        }
    }
}

/// `decode_k_run`/`decode_v_run` over entries a few bytes apart (as in a token-major block)
/// give exactly the per-entry `decode_k`/`decode_v`, and write nothing past their rows.
pub fn check_run_decode(codec: &dyn KvCodec, seed: u64) {
    let mut r = rng(seed);
    for k in [true, false] {
        let (b, dim) = if k {
            (codec.k_bytes(), codec.head_dim_k())
        } else {
            (codec.v_bytes(), codec.head_dim_v())
        };
        for count in [1usize, 5] {
            let (ds, ms) = (b.data + 3, b.meta + 1);
            let (mut data, mut meta) = (vec![0u8; count * ds], vec![0u8; count * ms]);
            let mut want = poisoned(count * dim);
            for i in 0..count {
                let x = gaussian(&mut r, dim);
                let (d, m) = (&mut data[i * ds..][..b.data], &mut meta[i * ms..][..b.meta]);
                let row = &mut want[i * dim..][..dim];
                if k {
                    codec.encode_k(&x, d, m);
                    codec.decode_k(d, m, row);
                } else {
                    codec.encode_v(&x, d, m);
                    codec.decode_v(d, m, row);
                }
            }
            let (dr, mr) = (
                EntryRun::new(&data, ds, b.data, count),
                EntryRun::new(&meta, ms, b.meta, count),
            );
            let mut got = poisoned(count * dim + 2);
            if k {
                codec.decode_k_run(dr, mr, &mut got);
            } else {
                codec.decode_v_run(dr, mr, &mut got);
            }
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{} {} run of {count}: element {i}: {g} vs {w}",
                    codec.name(),
                    if k { "K" } else { "V" }
                );
            }
            assert!(
                got[count * dim..].iter().all(|v| v.is_nan()),
                "run decode wrote past its rows"
            );
        }
    }
}

/// Non-finite input: encode must not panic and decode must be finite (quantized codecs map
/// NaN to 0 and ±inf to the dtype's largest value).
pub fn check_non_finite_input_gives_finite_output(codec: &dyn KvCodec) {
    let dk = codec.head_dim_k();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x: Vec<f32> = (0..dk).map(|i| (i as f32 * 0.37).sin()).collect();
        x[dk / 3] = bad;
        assert_all_finite(
            &round_trip_k(codec, &x),
            &format!("{} K with {bad}", codec.name()),
        );
        let mut x: Vec<f32> = (0..codec.head_dim_v())
            .map(|i| (i as f32 * 0.37).cos())
            .collect();
        x[0] = bad;
        assert_all_finite(
            &round_trip_v(codec, &x),
            &format!("{} V with {bad}", codec.name()),
        );
    }
}

/// One attention problem: a sequence of `tokens` Gaussian K/V in a cache built by `backend`.
pub struct AttentionProblem {
    pub heads: usize,
    pub kv_heads: usize,
    pub tokens: usize,
    pub block_size: usize,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// Query rows (the last `q_rows` positions: a prefill chunk ending the sequence).
    pub q_rows: usize,
}

impl AttentionProblem {
    pub fn gaussian(
        seed: u64,
        heads: usize,
        kv_heads: usize,
        dk: usize,
        dv: usize,
        tokens: usize,
        q_rows: usize,
    ) -> Self {
        let mut r = rng(seed);
        Self {
            heads,
            kv_heads,
            tokens,
            block_size: 16,
            q: gaussian(&mut r, q_rows * heads * dk),
            k: gaussian(&mut r, tokens * kv_heads * dk),
            v: gaussian(&mut r, tokens * kv_heads * dv),
            q_rows,
        }
    }

    /// Runs paged attention with `codec` laid out by `backend`, blocks shuffled so the table
    /// is not contiguous; returns `[q_rows, heads, dv]`.
    pub fn run(&self, backend: &dyn AttentionBackend, codec: Arc<dyn KvCodec>) -> Vec<f32> {
        let dv = codec.head_dim_v();
        let dk = codec.head_dim_k();
        let blocks = BlockTable::blocks_for(self.tokens, self.block_size) + 3;
        let layout = backend.cache_layout(codec.as_ref(), 2, self.kv_heads, self.block_size);
        let mut cache = PagedKvCache::new(layout, codec, blocks);
        let mut pool = BlockPool::new(blocks);
        // Take a few blocks first so the sequence's blocks are not 0..n.
        let mut other = BlockTable::default();
        other
            .reserve(&mut pool, 2 * self.block_size, self.block_size)
            .unwrap();
        let mut table = BlockTable::default();
        table
            .reserve(&mut pool, self.tokens, self.block_size)
            .unwrap();
        table.blocks.reverse();
        let slots: Vec<usize> = (0..self.tokens)
            .map(|p| table.slot(p, self.block_size))
            .collect();
        // Layer 1, so layer addressing is exercised.
        backend
            .write_kv(&mut cache, 1, &self.k, &self.v, &slots)
            .unwrap();
        let batch = AttentionBatch {
            seqs: vec![SeqSlice {
                recent: None,
                q_start: 0,
                q_len: self.q_rows,
                context_len: self.tokens,
                block_table: &table,
            }],
            num_heads: self.heads,
            scale: 1.0 / (dk as f32).sqrt(),
        };
        let mut out = poisoned(self.q_rows * self.heads * dv);
        backend
            .attend(&cache, 1, &self.q, &batch, &mut out)
            .unwrap();
        assert_all_finite(&out, "attention output");
        out
    }

    /// Dense causal attention in f64 over K/V given in the model domain.
    pub fn dense_reference(&self, k: &[f32], v: &[f32], dk: usize, dv: usize) -> Vec<f32> {
        let group = self.heads / self.kv_heads;
        let scale = 1.0 / (dk as f64).sqrt();
        let mut out = vec![0f32; self.q_rows * self.heads * dv];
        for i in 0..self.q_rows {
            let pos = self.tokens - self.q_rows + i;
            for h in 0..self.heads {
                let kvh = h / group;
                let q = &self.q[(i * self.heads + h) * dk..][..dk];
                let scores: Vec<f64> = (0..=pos)
                    .map(|t| {
                        let kt = &k[(t * self.kv_heads + kvh) * dk..][..dk];
                        q.iter()
                            .zip(kt)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for d in 0..dv {
                    let acc: f64 = (0..=pos)
                        .map(|t| w[t] * v[(t * self.kv_heads + kvh) * dv + d] as f64)
                        .sum();
                    out[(i * self.heads + h) * dv + d] = (acc / z) as f32;
                }
            }
        }
        out
    }

    /// The problem's K and V after a round trip through `codec` (model domain).
    pub fn decoded(&self, codec: &dyn KvCodec) -> (Vec<f32>, Vec<f32>) {
        let (dk, dv) = (codec.head_dim_k(), codec.head_dim_v());
        let k = self
            .k
            .chunks(dk)
            .flat_map(|x| round_trip_k(codec, x))
            .collect();
        let v = self
            .v
            .chunks(dv)
            .flat_map(|x| round_trip_v(codec, x))
            .collect();
        (k, v)
    }

    /// Per (row, head) cosine between two outputs of this problem.
    pub fn cosines(&self, a: &[f32], b: &[f32], dv: usize) -> Vec<f64> {
        a.chunks(dv)
            .zip(b.chunks(dv))
            .map(|(x, y)| cosine(x, y))
            .collect()
    }
}

/// The paged, fused attention over `codec`'s cache equals dense f64 attention over the decoded
/// cache (tight: only f32 accumulation differs), for a GQA prefill chunk.
pub fn check_attention_matches_decoded_reference(
    backend: &dyn AttentionBackend,
    codec: Arc<dyn KvCodec>,
    seed: u64,
) {
    let (dk, dv) = (codec.head_dim_k(), codec.head_dim_v());
    let p = AttentionProblem::gaussian(seed, 6, 2, dk, dv, 100, 7);
    let got = p.run(backend, codec.clone());
    let (k, v) = p.decoded(codec.as_ref());
    let want = p.dense_reference(&k, &v, dk, dv);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 2e-4 * (1.0 + w.abs()),
            "{}: output {i}: paged {g} vs dense-on-decoded {w}",
            codec.name()
        );
    }
}

/// Cosines of attention over `codec`'s cache against the fp16 cache on Gaussian data, 512
/// tokens, decode row plus a short prefill chunk; returns (min, mean).
pub fn attention_cosine_vs_fp16(
    backend: &dyn AttentionBackend,
    codec: Arc<dyn KvCodec>,
    fp16: Arc<dyn KvCodec>,
    seed: u64,
) -> (f64, f64) {
    let (dk, dv) = (codec.head_dim_k(), codec.head_dim_v());
    let p = AttentionProblem::gaussian(seed, 8, 2, dk, dv, 512, 4);
    let a = p.run(backend, codec);
    let b = p.run(backend, fp16);
    let c = p.cosines(&a, &b, dv);
    let min = c.iter().cloned().fold(f64::INFINITY, f64::min);
    let mean = c.iter().sum::<f64>() / c.len() as f64;
    (min, mean)
}
