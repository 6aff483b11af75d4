//! `kvq bench attention`: GPU paged decode-attention time of every KV policy, with the
//! effective bandwidth (KV bytes read / time) and the speedup over the fp16 paged kernel, at the
//! shapes of TARGETS.md. `bench/peer_sdpa.py` times PyTorch's SDPA (cuDNN, flash) on a
//! contiguous bf16 cache of the same shapes; pass its JSON with `--peer` to print the ratio.
//!
//! Every cache is written by the GPU quantize-and-store kernel from random normal K/V, block
//! tables are shuffled, and each timed run reads a different layer when one layer would fit in
//! L2, so no timing is of zeros or of the cache hierarchy.

use clap::Args;
use std::path::PathBuf;

use kvq::KvqError;

#[derive(Args, Debug)]
pub struct AttentionBenchArgs {
    /// Shapes as QHEADS/KVHEADS/HEADDIM/BATCH/CONTEXT, comma-separated (default: 32/8/128/32/32768,
    /// 32/8/128/1/32768, 9/3/64/32/32768).
    #[arg(long = "shapes", value_delimiter = ',')]
    pub shapes: Vec<String>,
    /// Configurations as BACKEND:POLICY or pytorch:k=SIDE,v=SIDE[,rotate], comma-separated
    /// (default: pytorch 0, 8, 4, 42 and turbomind 8, 4).
    #[arg(long = "configs", value_delimiter = ',')]
    pub configs: Vec<String>,
    /// Cache dtype: f16 or bf16.
    #[arg(long, default_value = "f16")]
    pub dtype: String,
    #[arg(long = "block-size", default_value_t = 64)]
    pub block_size: usize,
    /// Untimed runs before timing.
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 50)]
    pub iters: usize,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// JSON written by `bench/peer_sdpa.py --json`, to print the time relative to cuDNN.
    #[arg(long)]
    pub peer: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// One decode-attention shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub batch: usize,
    pub context: usize,
}

impl Shape {
    fn parse(s: &str) -> Result<Self, KvqError> {
        let v: Vec<usize> = s
            .split('/')
            .map(|x| x.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad_shape(s))?;
        match v[..] {
            [q_heads, kv_heads, head_dim, batch, context]
                if q_heads > 0 && kv_heads > 0 && head_dim > 0 && batch > 0 && context > 0 =>
            {
                Ok(Self {
                    q_heads,
                    kv_heads,
                    head_dim,
                    batch,
                    context,
                })
            }
            _ => Err(bad_shape(s)),
        }
    }
}

fn bad_shape(s: &str) -> KvqError {
    KvqError::InvalidArgument(format!(
        "shape \"{s}\": expected QHEADS/KVHEADS/HEADDIM/BATCH/CONTEXT, e.g. 32/8/128/32/32768"
    ))
}

pub const DEFAULT_SHAPES: [&str; 3] = ["32/8/128/32/32768", "32/8/128/1/32768", "9/3/64/32/32768"];
pub const DEFAULT_CONFIGS: [&str; 6] = [
    "pytorch:0",
    "pytorch:8",
    "pytorch:4",
    "pytorch:42",
    "turbomind:8",
    "turbomind:4",
];

pub fn run(a: AttentionBenchArgs) -> Result<(), KvqError> {
    let shapes = if a.shapes.is_empty() {
        DEFAULT_SHAPES
            .iter()
            .map(|s| Shape::parse(s))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        a.shapes
            .iter()
            .map(|s| Shape::parse(s))
            .collect::<Result<Vec<_>, _>>()?
    };
    let (specs, configs) = super::config_list::parse_configs(
        &kvq::EngineConfig::default(),
        &a.configs,
        &DEFAULT_CONFIGS,
    )?;
    if a.iters == 0 {
        return Err(KvqError::InvalidArgument(
            "--iters must be at least 1".into(),
        ));
    }
    imp::run(&a, &shapes, &specs, &configs)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;

    pub fn run(
        _: &AttentionBenchArgs,
        _: &[Shape],
        _: &[String],
        _: &[kvq::EngineConfig],
    ) -> Result<(), KvqError> {
        Err(KvqError::InvalidArgument(
            kernels::KernelError::NotBuilt.to_string(),
        ))
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use std::sync::Arc;

    use kernels::cache::{fill_normal, GpuCache};
    use kernels::cudarc::driver::CudaSlice;
    use kernels::decode::{decode_attention, DecodeBatch, DecodeWorkspace};
    use kernels::device::GpuContext;
    use kernels::timing::{median, time_runs};
    use kernels::KernelError;
    use kvq::cache::CacheLayout;
    use kvq::codec::{float_codec, KvCodec};
    use kvq::config::CodecChoice;
    use kvq::{AttentionBackend, EngineConfig, KvDtype};

    fn gpu_err(e: KernelError) -> KvqError {
        KvqError::InvalidArgument(format!("GPU: {e}"))
    }

    /// The codec and layout of one `--configs` entry (`spec` names it in errors).
    fn config(
        spec: &str,
        cfg: &EngineConfig,
        d: usize,
        dtype: KvDtype,
        kv_heads: usize,
        layers: usize,
        bs: usize,
    ) -> Result<(Arc<dyn KvCodec>, CacheLayout), KvqError> {
        use backend_pytorchlike::codecs as pt;
        let choice = cfg
            .codec_choice()
            .map_err(|e| KvqError::InvalidArgument(format!("config \"{spec}\": {e}")))?;
        let backend = cfg.engine.backend.as_str();
        let codec: Arc<dyn KvCodec> = match (backend, choice) {
            ("pytorch" | "turbomind", CodecChoice::None) => Arc::new(float_codec(d, d, dtype)),
            ("pytorch", CodecChoice::Int8) => Arc::new(pt::int8_codec(d, d, dtype)),
            ("pytorch", CodecChoice::Int4) => Arc::new(pt::int4_codec(d, d, dtype)),
            ("pytorch", CodecChoice::TurboQuant) => Arc::new(pt::turbo_quant_codec(d, d, dtype)),
            ("turbomind", CodecChoice::Int8) => {
                Arc::new(backend_turbomind::int8_codec(d, d, dtype))
            }
            ("turbomind", CodecChoice::Int4) => {
                Arc::new(backend_turbomind::int4_codec(d, d, dtype))
            }
            ("pytorch", CodecChoice::Sides(section)) if section.edge.is_none() => {
                Arc::new(pt::sides_codec(&section, d, d, dtype))
            }
            _ => {
                return Err(KvqError::InvalidArgument(format!(
                    "config \"{spec}\": GPU configs are pytorch:0/8/4/42, turbomind:0/8/4 and \
                     pytorch:k=SIDE,v=SIDE[,rotate] (no edge layers)"
                )))
            }
        };
        let layout = if backend == "turbomind" {
            backend_turbomind::TurbomindBackend.cache_layout(codec.as_ref(), layers, kv_heads, bs)
        } else {
            backend_pytorchlike::PytorchBackend.cache_layout(codec.as_ref(), layers, kv_heads, bs)
        };
        Ok((codec, layout))
    }

    /// One measured configuration.
    struct Row {
        config: String,
        codec: String,
        bytes_per_token: usize,
        layers: usize,
        splits: usize,
        median_ms: f64,
        min_ms: f64,
        max_ms: f64,
        gbps: f64,
    }

    /// A small xorshift for the block permutation (no dependency on `rand` in the binary).
    fn shuffle(v: &mut [i32], mut s: u64) {
        for i in (1..v.len()).rev() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            v.swap(i, (s % (i as u64 + 1)) as usize);
        }
    }

    fn bench_one(
        gpu: &Arc<GpuContext>,
        a: &AttentionBenchArgs,
        shape: &Shape,
        spec: &str,
        cfg: &EngineConfig,
        dtype: KvDtype,
        seed: u64,
    ) -> Result<Row, KvqError> {
        let bs = a.block_size;
        let d = shape.head_dim;
        let blocks_per_seq = shape.context.div_ceil(bs);
        let num_blocks = shape.batch * blocks_per_seq;
        let (codec, probe) = config(spec, cfg, d, dtype, shape.kv_heads, 1, bs)?;
        // Enough layers that the bytes the timed runs cycle through are ≥ 512 MiB (10× L2).
        let layer_bytes = probe.block_bytes() * num_blocks;
        let layers = (512usize << 20).div_ceil(layer_bytes.max(1)).clamp(1, 8);
        let (_, layout) = config(spec, cfg, d, dtype, shape.kv_heads, layers, bs)?;
        let mut cache = GpuCache::new(gpu, layout.clone(), codec.as_ref(), dtype, num_blocks)
            .map_err(gpu_err)?;

        // Shuffled block tables, shared by every layer.
        let mut ids: Vec<i32> = (0..num_blocks as i32).collect();
        shuffle(&mut ids, seed | 1);
        let tokens = shape.batch * shape.context;
        let slot_of = |t: usize| -> i32 {
            let (s, pos) = (t / shape.context, t % shape.context);
            ids[s * blocks_per_seq + pos / bs] * bs as i32 + (pos % bs) as i32
        };
        // Fill every layer through the store kernel, in chunks of new tokens.
        let chunk = (1usize << 26) / (shape.kv_heads * d).max(1);
        let chunk = chunk.clamp(1, tokens);
        let st = gpu.stream();
        let mut k: CudaSlice<f32> = st
            .alloc_zeros(chunk * shape.kv_heads * d)
            .map_err(|e| gpu_err(KernelError::driver("alloc", e)))?;
        let mut v: CudaSlice<f32> = st
            .alloc_zeros(chunk * shape.kv_heads * d)
            .map_err(|e| gpu_err(KernelError::driver("alloc", e)))?;
        let mut n_chunk = 0u64;
        for layer in 0..layers {
            let mut t0 = 0;
            while t0 < tokens {
                let n = chunk.min(tokens - t0);
                let slots: Vec<i32> = (t0..t0 + n).map(slot_of).collect();
                let sd = st
                    .clone_htod(&slots)
                    .map_err(|e| gpu_err(KernelError::driver("upload", e)))?;
                fill_normal(gpu, &mut k, seed ^ (2 * n_chunk + 1)).map_err(gpu_err)?;
                fill_normal(gpu, &mut v, seed ^ (2 * n_chunk + 2)).map_err(gpu_err)?;
                cache.store(layer, &k, &v, &sd, n).map_err(gpu_err)?;
                n_chunk += 1;
                t0 += n;
            }
        }
        drop((k, v));
        let bt = st
            .clone_htod(&ids)
            .map_err(|e| gpu_err(KernelError::driver("upload", e)))?;
        let ctx = st
            .clone_htod(&vec![shape.context as i32; shape.batch])
            .map_err(|e| gpu_err(KernelError::driver("upload", e)))?;
        let mut q: CudaSlice<f32> = st
            .alloc_zeros(shape.batch * shape.q_heads * d)
            .map_err(|e| gpu_err(KernelError::driver("alloc", e)))?;
        fill_normal(gpu, &mut q, seed ^ 0xabcdef).map_err(gpu_err)?;
        let mut out: CudaSlice<f32> = st
            .clone_htod(&vec![f32::NAN; shape.batch * shape.q_heads * d])
            .map_err(|e| gpu_err(KernelError::driver("alloc", e)))?;
        let mut ws = DecodeWorkspace::default();
        let batch = DecodeBatch {
            q: &q,
            block_tables: &bt,
            max_blocks: blocks_per_seq,
            context_lens: &ctx,
            batch: shape.batch,
            max_context: shape.context,
            num_heads: shape.q_heads,
            scale: 1.0 / (d as f32).sqrt(),
            recent: None,
        };
        let mut splits = 0;
        let times = time_runs(gpu, a.warmup, a.iters, |i| {
            splits = decode_attention(&cache, i % layers, &batch, &mut out, &mut ws)?.splits;
            Ok(())
        })
        .map_err(gpu_err)?;
        let host = st
            .clone_dtoh(&out)
            .map_err(|e| gpu_err(KernelError::driver("download", e)))?;
        if let Some(i) = host.iter().position(|x| !x.is_finite()) {
            return Err(KvqError::InvalidArgument(format!(
                "{spec}: decode output {i} is {} (not finite)",
                host[i]
            )));
        }
        let bytes_per_token = shape.kv_heads * (codec.k_bytes().total() + codec.v_bytes().total());
        let read = (tokens * bytes_per_token) as f64;
        let med = median(&times) as f64;
        Ok(Row {
            config: spec.to_string(),
            codec: codec.name().to_string(),
            bytes_per_token,
            layers,
            splits,
            median_ms: med,
            min_ms: times.iter().copied().fold(f32::INFINITY, f32::min) as f64,
            max_ms: times.iter().copied().fold(0.0, f32::max) as f64,
            gbps: read / (med * 1e-3) / 1e9,
        })
    }

    /// cuDNN's (and flash's) time for `shape` from the peer JSON, if present.
    fn peer_times(peer: &Option<serde_json::Value>, s: &Shape) -> (Option<f64>, Option<f64>) {
        let Some(p) = peer else { return (None, None) };
        let rows = p["shapes"].as_array().cloned().unwrap_or_default();
        for r in rows {
            let eq = |k: &str, v: usize| r[k].as_u64() == Some(v as u64);
            if eq("q_heads", s.q_heads)
                && eq("kv_heads", s.kv_heads)
                && eq("head_dim", s.head_dim)
                && eq("batch", s.batch)
                && eq("context", s.context)
            {
                return (r["cudnn_ms"].as_f64(), r["flash_ms"].as_f64());
            }
        }
        (None, None)
    }

    pub fn run(
        a: &AttentionBenchArgs,
        shapes: &[Shape],
        specs: &[String],
        configs: &[EngineConfig],
    ) -> Result<(), KvqError> {
        let dtype = match a.dtype.as_str() {
            "f16" | "float16" | "fp16" => KvDtype::F16,
            "bf16" | "bfloat16" => KvDtype::Bf16,
            other => {
                return Err(KvqError::InvalidArgument(format!(
                    "--dtype {other}: expected f16 or bf16"
                )))
            }
        };
        let peer = match &a.peer {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| KvqError::Io {
                    path: p.display().to_string(),
                    source: e,
                })?;
                Some(
                    serde_json::from_str::<serde_json::Value>(&text)
                        .map_err(|e| KvqError::InvalidArgument(format!("{}: {e}", p.display())))?,
                )
            }
            None => None,
        };
        let gpu = GpuContext::new(a.device).map_err(gpu_err)?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        if !a.json {
            eprintln!(
                "kvq bench attention on {} ({} SMs, {}): {dtype:?} cache, block size {}, median of {} runs after {} warm-up; seed {seed}",
                gpu.name(),
                gpu.sm_count(),
                gpu.arch(),
                a.block_size,
                a.iters,
                a.warmup
            );
        }
        let mut all = Vec::new();
        for shape in shapes {
            let (cudnn, flash) = peer_times(&peer, shape);
            if !a.json {
                println!(
                    "\n{}/{} heads, D={}, batch {}, context {}{}{}",
                    shape.q_heads,
                    shape.kv_heads,
                    shape.head_dim,
                    shape.batch,
                    shape.context,
                    cudnn
                        .map(|t| format!("; cuDNN bf16 {t:.3} ms"))
                        .unwrap_or_default(),
                    flash
                        .map(|t| format!(", flash bf16 {t:.3} ms"))
                        .unwrap_or_default()
                );
                println!(
                    "{:<13} {:<12} {:>9} {:>6} {:>6} {:>10} {:>10} {:>9} {:>8} {:>8}",
                    "config",
                    "codec",
                    "B/token",
                    "layers",
                    "splits",
                    "median ms",
                    "min ms",
                    "GB/s",
                    "vs fp16",
                    "vs cuDNN"
                );
            }
            let mut fp16_ms = None;
            for (i, (spec, cfg)) in specs.iter().zip(configs).enumerate() {
                let row = bench_one(
                    &gpu,
                    a,
                    shape,
                    spec,
                    cfg,
                    dtype,
                    seed.wrapping_add(i as u64 * 7919),
                )?;
                if row.config.ends_with(":0") && fp16_ms.is_none() {
                    fp16_ms = Some(row.median_ms);
                }
                let vs_fp16 = fp16_ms.map(|f| f / row.median_ms);
                let vs_cudnn = cudnn.map(|c| row.median_ms / c);
                if !a.json {
                    println!(
                        "{:<13} {:<12} {:>9} {:>6} {:>6} {:>10.4} {:>10.4} {:>9.0} {:>8} {:>8}",
                        row.config,
                        row.codec,
                        row.bytes_per_token,
                        row.layers,
                        row.splits,
                        row.median_ms,
                        row.min_ms,
                        row.gbps,
                        vs_fp16
                            .map(|x| format!("{x:.2}x"))
                            .unwrap_or_else(|| "-".into()),
                        vs_cudnn
                            .map(|x| format!("{x:.3}x"))
                            .unwrap_or_else(|| "-".into()),
                    );
                }
                all.push(serde_json::json!({
                    "q_heads": shape.q_heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
                    "batch": shape.batch, "context": shape.context,
                    "config": row.config, "codec": row.codec, "bytes_per_token": row.bytes_per_token,
                    "layers": row.layers, "splits": row.splits,
                    "median_ms": row.median_ms, "min_ms": row.min_ms, "max_ms": row.max_ms,
                    "gbps": row.gbps, "speedup_vs_fp16": vs_fp16, "time_vs_cudnn": vs_cudnn,
                    "cudnn_ms": cudnn, "flash_ms": flash,
                }));
            }
        }
        if a.json {
            println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
        }
        Ok(())
    }
}
