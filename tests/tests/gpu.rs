//! GPU kernels against the CPU codecs and the CPU reference attention, on the same bytes.
//!
//! These need a CUDA GPU and are ignored otherwise. On the GPU machine:
//!
//! ```text
//! cargo test --release -p kvq-integration-tests --features cuda --test gpu -- --ignored --nocapture
//! ```
//!
//! Inputs are fresh random values (seeds printed; replay with `KVQ_TEST_SEED`), cache memory
//! starts as random garbage and outputs as NaN, so unwritten or stray bytes cannot pass.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use backend_pytorchlike::codecs::packing::{crumb_quarter_split, nibble_half_split, unpack_bits};
use backend_pytorchlike::PytorchBackend;
use backend_turbomind::codecs::int4::unpack_group;
use backend_turbomind::TurbomindBackend;
use engine_core::attention::{paged_attention, AttentionBatch, SeqSlice};
use engine_core::cache::{BlockTable, CacheLayout, PagedKvCache};
use engine_core::codec::{float_codec, KvCodec};
use engine_core::testing::{fresh_seed, gaussian, rng};
use engine_core::{AttentionBackend, KvDtype};
use kernels::cache::GpuCache;
use kernels::cudarc::driver::{CudaSlice, DeviceRepr};
use kernels::decode::{decode_attention, DecodeBatch, DecodeWorkspace};
use kernels::device::GpuContext;
use kernels::spec::SideKernel;
use kernels::GpuCodec;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore};

fn gpu() -> Arc<GpuContext> {
    GpuContext::new(0).unwrap_or_else(|e| {
        panic!("these tests need a CUDA GPU (they are #[ignore]d elsewhere): {e}")
    })
}

/// A codec and the layout its backend gives it.
struct Case {
    label: String,
    kind: GpuCodec,
    dtype: KvDtype,
    codec: Arc<dyn KvCodec>,
    layout: CacheLayout,
}

/// `kind`'s codec; `tm_layout` picks TurboMind's block layout (forced for its codecs).
fn case(
    kind: GpuCodec,
    tm_layout: bool,
    d: usize,
    dtype: KvDtype,
    layers: usize,
    kv_heads: usize,
    block_size: usize,
) -> Case {
    let codec = codec_of(kind, d, dtype);
    assert_eq!(
        codec
            .gpu_kernel()
            .and_then(|n| GpuCodec::from_kernel_name(&n)),
        Some(kind),
        "{} names its GPU kernel",
        codec.name()
    );
    let tm = tm_layout || matches!(kind, GpuCodec::TM_INT8 | GpuCodec::TM_INT4);
    let layout = if tm {
        TurbomindBackend.cache_layout(codec.as_ref(), layers, kv_heads, block_size)
    } else {
        PytorchBackend.cache_layout(codec.as_ref(), layers, kv_heads, block_size)
    };
    Case {
        label: format!(
            "{}{} {:?} D={d} H={kv_heads} B={block_size}",
            kind.kernel_name(),
            if tm_layout && kind == GpuCodec::FLOAT {
                " (turbomind layout)"
            } else {
                ""
            },
            dtype
        ),
        kind,
        dtype,
        codec,
        layout,
    }
}

/// The codec with GPU kernel `kind`: a built-in policy's, or a `[cache]` sides codec.
fn codec_of(kind: GpuCodec, d: usize, dtype: KvDtype) -> Arc<dyn KvCodec> {
    use backend_pytorchlike::codecs as pt;
    use engine_core::config::{CacheSection, SideKind};
    match kind {
        GpuCodec::FLOAT => Arc::new(float_codec(d, d, dtype)),
        GpuCodec::PT_INT8 => Arc::new(pt::int8_codec(d, d, dtype)),
        GpuCodec::PT_INT4 => Arc::new(pt::int4_codec(d, d, dtype)),
        GpuCodec::TURBO_QUANT => Arc::new(pt::turbo_quant_codec(d, d, dtype)),
        GpuCodec::TM_INT8 => Arc::new(backend_turbomind::int8_codec(d, d, dtype)),
        GpuCodec::TM_INT4 => Arc::new(backend_turbomind::int4_codec(d, d, dtype)),
        _ => {
            let side = |k: SideKernel| match k {
                SideKernel::Float => SideKind::Fp16,
                SideKernel::PtInt8 => SideKind::Int8,
                SideKernel::PtInt4 => SideKind::Int4,
                SideKernel::Tq3s => SideKind::Tq3s,
                SideKernel::Lm2 => SideKind::Lm2,
                SideKernel::Lm2u => SideKind::Lm2u,
                SideKernel::Lm4 => SideKind::Lm4,
                SideKernel::Lm4u => SideKind::Lm4u,
                other => panic!("no [cache] side for {other:?}"),
            };
            let section = CacheSection {
                k: side(kind.k.kind),
                v: side(kind.v.kind),
                rotate: kind.k.rotated || kind.v.rotated,
                edge: None,
            };
            Arc::new(pt::sides_codec(&section, d, d, dtype))
        }
    }
}

/// Every codec at one shape: the built-in policies' and the `[cache]` side combinations the
/// compile check builds, plus policy 0 in TurboMind's layout.
fn all_cases(d: usize, dtype: KvDtype, layers: usize, kv_heads: usize, bs: usize) -> Vec<Case> {
    let mut v: Vec<Case> = GpuCodec::compile_set()
        .into_iter()
        .map(|k| case(k, false, d, dtype, layers, kv_heads, bs))
        .collect();
    v.push(case(GpuCodec::FLOAT, true, d, dtype, layers, kv_heads, bs));
    v
}

fn upload<T: DeviceRepr>(g: &GpuContext, x: &[T]) -> CudaSlice<T> {
    g.stream().clone_htod(x).expect("host to device copy")
}

fn download<T: DeviceRepr + Default + Clone>(g: &GpuContext, x: &CudaSlice<T>) -> Vec<T> {
    g.stream().clone_dtoh(x).expect("device to host copy")
}

/// K/V rows of realistic variety: per-row scale over four decades, an outlier channel, a
/// constant row and a zero row.
fn kv_rows(r: &mut StdRng, rows: usize, d: usize) -> Vec<f32> {
    let mut x = gaussian(r, rows * d);
    for (i, row) in x.chunks_mut(d).enumerate() {
        let scale = 10f32.powf(r.random_range(-2.0..2.0));
        row.iter_mut().for_each(|v| *v *= scale);
        row[i % d] *= 8.0;
        if i == 3 {
            row.fill(1.25);
        }
        if i == 5 {
            row.fill(0.0);
        }
    }
    x
}

/// Elements of one packed row of side `kind`, as codes (a float side: the raw 16-bit values).
fn codes(kind: SideKernel, d: usize, bytes: &[u8]) -> Vec<u32> {
    match kind {
        SideKernel::Float => bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
            .collect(),
        SideKernel::PtInt8 | SideKernel::TmInt8 => bytes.iter().map(|&b| b as u32).collect(),
        SideKernel::PtInt4 | SideKernel::Tq3s => (0..d)
            .map(|i| nibble_half_split(bytes, d, i) as u32)
            .collect(),
        SideKernel::TmInt4 => bytes
            .chunks_exact(4)
            .flat_map(|w| unpack_group([w[0], w[1], w[2], w[3]]))
            .map(u32::from)
            .collect(),
        SideKernel::Lm2 | SideKernel::Lm2u => (0..d)
            .map(|i| crumb_quarter_split(bytes, d, i) as u32)
            .collect(),
        SideKernel::Lm4 | SideKernel::Lm4u => {
            (0..d).map(|i| unpack_bits(bytes, 4, i) as u32).collect()
        }
    }
}

#[derive(Default, Debug)]
struct StoreStats {
    elements: usize,
    exact: usize,
    sign_flips: usize,
    meta_values: usize,
    meta_max_rel: f64,
}

/// Compares one (K or V) entry; panics beyond ±1 code or metadata beyond one rounding step.
#[allow(clippy::too_many_arguments)]
fn compare_entry(
    c: &Case,
    v_side: bool,
    cpu_data: &[u8],
    gpu_data: &[u8],
    cpu_meta: &[u8],
    gpu_meta: &[u8],
    st: &mut StoreStats,
    at: &str,
) {
    let d = if v_side {
        c.codec.head_dim_v()
    } else {
        c.codec.head_dim_k()
    };
    let side = if v_side { c.kind.v.kind } else { c.kind.k.kind };
    let (a, b) = (codes(side, d, cpu_data), codes(side, d, gpu_data));
    for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
        st.elements += 1;
        if x == y {
            st.exact += 1;
            continue;
        }
        let ok = match side {
            SideKernel::Float => false,
            SideKernel::Tq3s => {
                // index within one step; a lone sign flip means a residual within rounding of 0
                let (ix, iy) = ((x & 7) as i32, (y & 7) as i32);
                if ix == iy {
                    st.sign_flips += 1;
                }
                (ix - iy).abs() <= 1
            }
            _ => (x as i64 - y as i64).abs() <= 1,
        };
        assert!(
            ok,
            "{} {at} {} element {i}: cpu code {x:#x}, gpu {y:#x}",
            c.label,
            if v_side { "V" } else { "K" }
        );
    }
    let step = match c.dtype {
        KvDtype::Bf16 => 2f64.powi(-7),
        _ => 2f64.powi(-10),
    };
    for i in 0..cpu_meta.len() / 2 {
        let (x, y) = (
            c.dtype.load_at(cpu_meta, i) as f64,
            c.dtype.load_at(gpu_meta, i) as f64,
        );
        st.meta_values += 1;
        assert!(
            x.is_finite() && y.is_finite(),
            "{} {at}: metadata {x} vs {y}",
            c.label
        );
        let rel = (x - y).abs() / x.abs().max(y.abs()).max(1e-30);
        if x != y {
            st.meta_max_rel = st.meta_max_rel.max(rel);
        }
        assert!(
            rel <= step * 1.0001 || (x - y).abs() < 1e-7,
            "{} {at}: metadata {i} cpu {x} gpu {y} (beyond one rounding step)",
            c.label
        );
    }
}

fn run_store_case(g: &Arc<GpuContext>, c: &Case) {
    let seed = fresh_seed(&format!("gpu store {}", c.label));
    let mut r = rng(seed);
    let (kvh, bs) = (c.layout.num_kv_heads, c.layout.block_size);
    let (dk, dv) = (c.codec.head_dim_k(), c.codec.head_dim_v());
    let num_blocks = 12;
    let mut cpu = PagedKvCache::new(c.layout.clone(), c.codec.clone(), num_blocks);
    r.fill_bytes(cpu.as_bytes_mut());
    let mut gc = GpuCache::new(g, c.layout.clone(), c.codec.as_ref(), c.dtype, num_blocks)
        .expect("gpu cache");
    gc.upload(cpu.as_bytes()).expect("upload");

    // 200 distinct slots, one token that must be skipped (slot -1).
    let mut all: Vec<i32> = (0..(num_blocks * bs) as i32).collect();
    all.shuffle(&mut r);
    let mut slots: Vec<i32> = all[..200].to_vec();
    slots[7] = -1;
    let n = slots.len();
    let k = kv_rows(&mut r, n * kvh, dk);
    let v = kv_rows(&mut r, n * kvh, dv);
    let layer = c.layout.num_layers - 1;
    let keep: Vec<usize> = (0..n).filter(|&i| slots[i] >= 0).collect();
    let pick = |x: &[f32], d: usize| -> Vec<f32> {
        keep.iter()
            .flat_map(|&i| x[i * kvh * d..(i + 1) * kvh * d].iter().copied())
            .collect()
    };
    let cpu_slots: Vec<usize> = keep.iter().map(|&i| slots[i] as usize).collect();
    cpu.write(layer, &pick(&k, dk), &pick(&v, dv), &cpu_slots)
        .expect("cpu write");

    let (kd, vd, sd) = (upload(g, &k), upload(g, &v), upload(g, &slots));
    gc.store(layer, &kd, &vd, &sd, n).expect("gpu store");
    g.synchronize().expect("store ran");
    let gpu_bytes = gc.download().expect("download");

    let mut st = StoreStats::default();
    let (mut cpu_rest, mut gpu_rest) = (cpu.as_bytes().to_vec(), gpu_bytes.clone());
    for &slot in &cpu_slots {
        for h in 0..kvh {
            let e = cpu.entry(layer, slot, h);
            let at = format!("slot {slot} head {h}");
            let b = cpu.as_bytes();
            compare_entry(
                c,
                false,
                &b[e.k_data.clone()],
                &gpu_bytes[e.k_data.clone()],
                &b[e.k_meta.clone()],
                &gpu_bytes[e.k_meta.clone()],
                &mut st,
                &at,
            );
            compare_entry(
                c,
                true,
                &b[e.v_data.clone()],
                &gpu_bytes[e.v_data.clone()],
                &b[e.v_meta.clone()],
                &gpu_bytes[e.v_meta.clone()],
                &mut st,
                &at,
            );
            for range in [e.k_data, e.k_meta, e.v_data, e.v_meta] {
                cpu_rest[range.clone()].fill(0);
                gpu_rest[range].fill(0);
            }
        }
    }
    if let Some(i) = cpu_rest.iter().zip(&gpu_rest).position(|(a, b)| a != b) {
        panic!("{}: byte {i} outside the written entries changed (stray write or skipped slot written)", c.label);
    }
    let exact = st.exact as f64 / st.elements as f64;
    eprintln!(
        "store {:<44} {:>7} codes, {:.5}% exact, {} lone sign flips; {} metadata values, max rel diff {:.2e}",
        c.label,
        st.elements,
        100.0 * exact,
        st.sign_flips,
        st.meta_values,
        st.meta_max_rel
    );
    assert!(
        exact >= 0.999,
        "{}: only {:.4}% of codes exact",
        c.label,
        100.0 * exact
    );
    assert!(
        st.sign_flips * 10_000 <= st.elements,
        "{}: {} sign flips",
        c.label,
        st.sign_flips
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn store_writes_the_cpu_codecs_bytes() {
    let g = gpu();
    for (d, kvh) in [(128, 8), (64, 3)] {
        for dtype in [KvDtype::F16, KvDtype::Bf16] {
            for c in all_cases(d, dtype, 2, kvh, 64) {
                run_store_case(&g, &c);
            }
        }
    }
    // A block size that is not a multiple of the decode tile, and a single layer.
    for c in all_cases(128, KvDtype::F16, 1, 2, 24) {
        run_store_case(&g, &c);
    }
}

/// Decode attention of one batch on the same cache bytes: the GPU kernel and the f32 CPU
/// reference (`engine_core::attention::paged_attention`), both against f64 attention over the
/// decoded cache. Returns the GPU's worst relative L2 error and a description of each
/// (sequence, head) beyond the bound (non-finite output panics at once).
fn run_decode_case(
    g: &Arc<GpuContext>,
    c: &Case,
    num_heads: usize,
    ctx: &[usize],
    u: f64,
) -> (f64, Vec<String>) {
    let seed = fresh_seed(&format!(
        "gpu decode {} heads {num_heads} ctx {ctx:?}",
        c.label
    ));
    let mut r = rng(seed);
    let (kvh, bs) = (c.layout.num_kv_heads, c.layout.block_size);
    let (dk, dv) = (c.codec.head_dim_k(), c.codec.head_dim_v());
    let batch = ctx.len();
    let blocks_per: Vec<usize> = ctx.iter().map(|&n| n.div_ceil(bs)).collect();
    let num_blocks = blocks_per.iter().sum::<usize>() + 3;
    let max_blocks = *blocks_per.iter().max().unwrap();
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(&mut r);
    let mut tables = Vec::new();
    let mut next = 0;
    for &nb in &blocks_per {
        tables.push(BlockTable {
            blocks: ids[next..next + nb].to_vec(),
            num_tokens: 0,
        });
        next += nb;
    }
    let layer = c.layout.num_layers - 1;
    let mut cpu = PagedKvCache::new(c.layout.clone(), c.codec.clone(), num_blocks);
    r.fill_bytes(cpu.as_bytes_mut()); // unwritten slots hold garbage the kernel must mask
    for (s, &n) in ctx.iter().enumerate() {
        let k = kv_rows(&mut r, n * kvh, dk);
        let v = kv_rows(&mut r, n * kvh, dv);
        let slots: Vec<usize> = (0..n).map(|t| tables[s].slot(t, bs)).collect();
        cpu.write(layer, &k, &v, &slots).expect("cpu write");
    }
    let q = gaussian(&mut r, batch * num_heads * dk);
    let scale = 1.0 / (dk as f32).sqrt();
    let seqs: Vec<SeqSlice<'_>> = (0..batch)
        .map(|s| SeqSlice {
            q_start: s,
            q_len: 1,
            context_len: ctx[s],
            block_table: &tables[s],
            recent: None,
        })
        .collect();
    let mut want = vec![f32::NAN; batch * num_heads * dv];
    paged_attention(
        &cpu,
        layer,
        &q,
        &AttentionBatch {
            seqs,
            num_heads,
            scale,
        },
        &mut want,
    )
    .expect("cpu attention");

    let mut gc = GpuCache::new(g, c.layout.clone(), c.codec.as_ref(), c.dtype, num_blocks)
        .expect("gpu cache");
    gc.upload(cpu.as_bytes()).expect("upload");
    let mut bt = vec![0i32; batch * max_blocks];
    for (s, t) in tables.iter().enumerate() {
        for (j, &b) in t.blocks.iter().enumerate() {
            bt[s * max_blocks + j] = b as i32;
        }
    }
    let ctx_i: Vec<i32> = ctx.iter().map(|&n| n as i32).collect();
    let (qd, btd, cd) = (upload(g, &q), upload(g, &bt), upload(g, &ctx_i));
    let mut out = upload(g, &vec![f32::NAN; batch * num_heads * dv]);
    let mut ws = DecodeWorkspace::default();
    let plan = decode_attention(
        &gc,
        layer,
        &DecodeBatch {
            q: &qd,
            block_tables: &btd,
            max_blocks,
            context_lens: &cd,
            batch,
            max_context: *ctx.iter().max().unwrap(),
            num_heads,
            scale,
            recent: None,
        },
        &mut out,
        &mut ws,
    )
    .expect("gpu decode");
    g.synchronize().expect("decode ran");
    let got = download(g, &out);

    let queries = Queries {
        q: &q,
        num_heads,
        scale,
    };
    let (exact, op_bounds) = reference_f64(&cpu, layer, &queries, &tables, ctx, u);
    let rel = |x: &[f32], y: &[f64]| -> f64 {
        let (mut e2, mut n2) = (0f64, 0f64);
        for (&a, &b) in x.iter().zip(y) {
            e2 += (a as f64 - b).powi(2);
            n2 += b * b;
        }
        (e2 / n2.max(1e-300)).sqrt()
    };
    let (mut worst_gpu, mut worst_cpu, mut worst_vs_cpu) = (0f64, 0f64, 0f64);
    let (mut worst_ratio, mut median_bound) = (0f64, Vec::new());
    let mut failures = Vec::new();
    for (s, &n) in ctx.iter().enumerate() {
        for h in 0..num_heads {
            let row = (s * num_heads + h) * dv;
            let (a, b, x) = (
                &want[row..row + dv],
                &got[row..row + dv],
                &exact[row..row + dv],
            );
            assert!(
                b.iter().all(|x| x.is_finite()),
                "{}: seq {s} head {h} has non-finite output",
                c.label
            );
            let (e_gpu, e_cpu) = (rel(b, x), rel(a, x));
            let a64: Vec<f64> = a.iter().map(|&v| v as f64).collect();
            worst_vs_cpu = worst_vs_cpu.max(rel(b, &a64));
            // The error f16 (bf16) operand rounding can cause (first order, worst case over
            // the signs: `reference_f64`), plus f32 accumulation noise (a multiple of the f32
            // CPU reference's own error, at least 1e-5). A wrong code, scale or token changes
            // the output by far more wherever this bound is small (median ~1e-3, see the log).
            let op = op_bounds[s * num_heads + h];
            let bound = op + (32.0 * e_cpu).max(1e-5);
            worst_ratio = f64::max(worst_ratio, e_gpu / bound);
            median_bound.push(op);
            if e_gpu.is_nan() || e_gpu > bound {
                failures.push(format!(
                    "{}: seq {s} (context {n}) head {h}: error vs f64 {e_gpu:.3e} > {bound:.1e} (f32 CPU reference {e_cpu:.2e})\n f64 {:?}\n gpu {:?}",
                    c.label,
                    &x[..8.min(dv)],
                    &b[..8.min(dv)]
                ));
            }
            worst_gpu = worst_gpu.max(e_gpu);
            worst_cpu = worst_cpu.max(e_cpu);
        }
    }
    median_bound.sort_by(f64::total_cmp);
    eprintln!(
        "decode {:<44} heads {num_heads:>2} ctx {:?}: {} splits of {} tokens; worst rel L2 vs f64: gpu {worst_gpu:.2e}, \
         cpu {worst_cpu:.2e}; gpu vs cpu {worst_vs_cpu:.2e}; operand-rounding bound median {:.1e}; worst error/bound {worst_ratio:.3}",
        c.label, ctx, plan.splits, plan.tokens_per_split, median_bound[median_bound.len() / 2]
    );
    (worst_gpu, failures)
}

/// The Walsh–Hadamard transform `H/√d` in f64.
fn wht_f64(x: &mut [f64]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for blk in (0..n).step_by(2 * h) {
            for i in blk..blk + h {
                let (a, b) = (x[i], x[i + h]);
                x[i] = a + b;
                x[i + h] = a - b;
            }
        }
        h *= 2;
    }
    let s = 1.0 / (n as f64).sqrt();
    x.iter_mut().for_each(|v| *v *= s);
}

/// One decode step's queries: `[sequence, head, head_dim]`, and the softmax scale.
#[derive(Clone, Copy)]
struct Queries<'a> {
    q: &'a [f32],
    num_heads: usize,
    scale: f32,
}

/// Decode attention in f64 over the decoded cache (the values the packed bytes stand for), and
/// for each (sequence, head) the first-order relative L2 error that rounding the kernel's
/// tensor-core operands (unit roundoff `u`) can cause:
///   scores: q (and TurboQuant's K centroids) rounded: |δs_t| ≤ 2u·Σ_i |q_i||k_ti|·scale = 2u·S_t,
///           so δp_t ≈ p_t·δs_t and δo = Σ_t δp_t (v_t − o): ‖δo‖ ≤ 2u·Σ_t p_t S_t ‖v_t − o‖;
///   values: the probabilities (and TurboQuant's V centroids) rounded: ‖δo‖ ≤ 2u·Σ_t p_t ‖v_t‖;
/// both over ‖o‖. Integer codes and f16 cache values enter the products exactly.
fn reference_f64(
    cache: &PagedKvCache,
    layer: usize,
    query: &Queries<'_>,
    tables: &[BlockTable],
    ctx: &[usize],
    u: f64,
) -> (Vec<f64>, Vec<f64>) {
    let Queries {
        q,
        num_heads,
        scale,
    } = *query;
    use engine_core::codec::Domain;
    let codec = cache.codec().clone();
    let (dk, dv) = (codec.head_dim_k(), codec.head_dim_v());
    let kvh = cache.layout().num_kv_heads;
    let group = num_heads / kvh;
    let bs = cache.block_size();
    let mut out = vec![0f64; ctx.len() * num_heads * dv];
    let mut bounds = vec![0f64; ctx.len() * num_heads];
    let (mut kb, mut vb) = (vec![0f32; dk], vec![0f32; dv]);
    for (s, &n) in ctx.iter().enumerate() {
        for kh in 0..kvh {
            let qs: Vec<Vec<f64>> = (0..group)
                .map(|j| {
                    let h = kh * group + j;
                    let mut v: Vec<f64> = q[(s * num_heads + h) * dk..][..dk]
                        .iter()
                        .map(|&x| x as f64)
                        .collect();
                    if codec.k_domain() == Domain::Hadamard {
                        wht_f64(&mut v);
                    }
                    v
                })
                .collect();
            let mut scores = vec![vec![0f64; n]; group];
            let mut abs_scores = vec![vec![0f64; n]; group];
            let mut vals = vec![0f64; n * dv];
            for t in 0..n {
                let slot = tables[s].slot(t, bs);
                let (kd, km) = cache.k_entry(layer, slot, kh);
                codec.decode_k(kd, km, &mut kb);
                let (vd, vm) = cache.v_entry(layer, slot, kh);
                codec.decode_v(vd, vm, &mut vb);
                vals[t * dv..(t + 1) * dv]
                    .iter_mut()
                    .zip(&vb)
                    .for_each(|(o, &x)| *o = x as f64);
                for j in 0..group {
                    let dot: f64 = qs[j].iter().zip(&kb).map(|(a, &b)| a * b as f64).sum();
                    scores[j][t] = dot * scale as f64;
                    let abs: f64 = qs[j]
                        .iter()
                        .zip(&kb)
                        .map(|(a, &b)| (a * b as f64).abs())
                        .sum();
                    abs_scores[j][t] = abs * scale as f64;
                }
            }
            for j in 0..group {
                let m = scores[j].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores[j].iter().map(|x| (x - m).exp()).collect();
                let l: f64 = w.iter().sum();
                let o = &mut out[(s * num_heads + kh * group + j) * dv..][..dv];
                for t in 0..n {
                    for d in 0..dv {
                        o[d] += w[t] * vals[t * dv + d];
                    }
                }
                o.iter_mut().for_each(|v| *v /= l);
                let (mut e_s, mut e_v) = (0f64, 0f64);
                for t in 0..n {
                    let v = &vals[t * dv..(t + 1) * dv];
                    let dist = v
                        .iter()
                        .zip(o.iter())
                        .map(|(a, b)| (a - b).powi(2))
                        .sum::<f64>();
                    let norm = v.iter().map(|a| a * a).sum::<f64>();
                    let pt = w[t] / l;
                    e_s += pt * abs_scores[j][t] * dist.sqrt();
                    e_v += pt * norm.sqrt();
                }
                let o_norm = o.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-300);
                bounds[s * num_heads + kh * group + j] = 2.0 * u * (e_s + e_v) / o_norm;
                if codec.v_domain() == Domain::Hadamard {
                    wht_f64(o);
                }
            }
        }
    }
    (out, bounds)
}

/// Panics with every failure collected over the cases of one test.
fn assert_no_failures(failures: Vec<String>) {
    if !failures.is_empty() {
        let n = failures.len();
        let shown: Vec<String> = failures.into_iter().take(12).collect();
        panic!(
            "{n} (sequence, head) outputs beyond tolerance:\n{}",
            shown.join("\n")
        );
    }
}

/// Unit roundoff of the kernel's tensor-core operands: f16 (2^-11), bf16 for a bf16 policy-0
/// cache (2^-8).
fn tolerance(c: &Case) -> f64 {
    if c.kind == GpuCodec::FLOAT && c.dtype == KvDtype::Bf16 {
        2f64.powi(-8)
    } else {
        2f64.powi(-11)
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn decode_matches_the_cpu_reference() {
    let g = gpu();
    let ctx = [1, 17, 64, 100, 1000, 3001];
    let mut failures = Vec::new();
    for (heads, kvh, d) in [(32, 8, 128), (9, 3, 64)] {
        for c in all_cases(d, KvDtype::F16, 2, kvh, 64) {
            failures.extend(run_decode_case(&g, &c, heads, &ctx, tolerance(&c)).1);
        }
        for kind in [GpuCodec::FLOAT, GpuCodec::PT_INT8, GpuCodec::TURBO_QUANT] {
            let c = case(kind, false, d, KvDtype::Bf16, 2, kvh, 64);
            failures.extend(run_decode_case(&g, &c, heads, &ctx, tolerance(&c)).1);
        }
    }
    // Other GQA groups (1, 2, 8) and a block size of 16.
    for (heads, kvh) in [(4, 4), (8, 4), (16, 2)] {
        let int4r_lm2u = GpuCodec::from_kernel_name("k:pt_int4r+v:lm2u").expect("a GPU codec");
        for kind in [
            GpuCodec::FLOAT,
            GpuCodec::PT_INT4,
            GpuCodec::TM_INT4,
            GpuCodec::TURBO_QUANT,
            int4r_lm2u,
            GpuCodec::from_kernel_name("k:lm4+v:lm4").expect("a GPU codec"),
        ] {
            let c = case(kind, false, 128, KvDtype::F16, 1, kvh, 16);
            failures.extend(run_decode_case(&g, &c, heads, &[5, 33, 250], tolerance(&c)).1);
        }
    }
    assert_no_failures(failures);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn decode_long_context_uses_many_splits() {
    let g = gpu();
    let mut failures = Vec::new();
    for c in all_cases(128, KvDtype::F16, 1, 8, 64) {
        failures.extend(run_decode_case(&g, &c, 32, &[32768 - 5], tolerance(&c)).1);
    }
    assert_no_failures(failures);
}

/// The CUDA model runner against the CPU model.
#[path = "gpu/model.rs"]
mod model;

/// The recent window's kernels against the f16 cache.
#[path = "gpu/window.rs"]
mod window;
