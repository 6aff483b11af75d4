//! The recent window's kernels (`kvq_window_keep` writing the rings, `kvq_decode_recent`
//! attending over them and over the pass's own rows) against the plain f16 cache: a window
//! that covers every token leaves the codec's bytes unread, so any codec's output must be the
//! f16 cache's (rotated sides included: the window is in the model domain); a shorter window
//! over an f16 cache reads the same values split between the kernels.

use engine_core::cache::RecentWindow;
use kernels::window::{RecentPart, WindowRings, WindowStep};

use super::*;

/// One layout shape for every case.
const D: usize = 128;
const KV_HEADS: usize = 2;
const HEADS: usize = 8;
const LAYERS: usize = 2;
const BLOCK: usize = 16;

/// A cache of `c`'s codec holding `k`/`v` (model domain) at positions `0..ctx[s]` of each
/// sequence, in consecutive blocks; returns it and the block tables.
fn filled_cache(
    g: &Arc<GpuContext>,
    c: &Case,
    ctx: &[usize],
    (k, v): (&[Vec<f32>], &[Vec<f32>]),
) -> (GpuCache, Vec<BlockTable>) {
    let per_seq = ctx.iter().map(|&n| n.div_ceil(BLOCK)).max().unwrap();
    let mut gc = GpuCache::new(
        g,
        c.layout.clone(),
        c.codec.as_ref(),
        c.dtype,
        per_seq * ctx.len(),
    )
    .expect("gpu cache");
    let tables: Vec<BlockTable> = (0..ctx.len())
        .map(|s| BlockTable {
            blocks: (0..per_seq as u32)
                .map(|b| s as u32 * per_seq as u32 + b)
                .collect(),
            num_tokens: 0,
        })
        .collect();
    for (s, &n) in ctx.iter().enumerate() {
        let slots: Vec<i32> = (0..n).map(|t| tables[s].slot(t, BLOCK) as i32).collect();
        let (kd, vd, sd) = (upload(g, &k[s]), upload(g, &v[s]), upload(g, &slots));
        gc.store(LAYERS - 1, &kd, &vd, &sd, n).expect("store");
    }
    (gc, tables)
}

/// Decodes the rows of this pass (positions `ctx[s] - fresh[s] ..` of each sequence) over
/// `cache`, with the window when `window` holds the rings and the pass's K/V rows.
#[allow(clippy::too_many_arguments)]
fn decode_rows(
    g: &Arc<GpuContext>,
    cache: &GpuCache,
    tables: &[BlockTable],
    ctx: &[usize],
    fresh: &[usize],
    q: &CudaSlice<f32>,
    window: Option<(&WindowRings, &WindowStep, &CudaSlice<f32>, &CudaSlice<f32>)>,
) -> Vec<f32> {
    let max_blocks = tables[0].blocks.len();
    let (mut bt, mut lens) = (Vec::new(), Vec::new());
    for (s, (&n, &f)) in ctx.iter().zip(fresh).enumerate() {
        for pos in n - f..n {
            bt.extend(tables[s].blocks.iter().map(|&b| b as i32));
            lens.push(pos as i32 + 1);
        }
    }
    if let Some((_, step, _, _)) = window {
        lens.clone_from(&step.codec_context);
    }
    let rows = lens.len();
    let (btd, lend) = (upload(g, &bt), upload(g, &lens));
    let attend = window.map(|(_, step, _, _)| upload(g, &step.attend));
    let attend_view = attend.as_ref().map(|a| a.slice(..));
    let mut out = upload(g, &vec![f32::NAN; rows * HEADS * D]);
    decode_attention(
        cache,
        LAYERS - 1,
        &DecodeBatch {
            q,
            block_tables: &btd,
            max_blocks,
            context_lens: &lend,
            batch: rows,
            max_context: lens.iter().copied().max().unwrap_or(0) as usize,
            num_heads: HEADS,
            scale: 1.0 / (D as f32).sqrt(),
            recent: window
                .zip(attend_view.as_ref())
                .map(|((rings, _, k_new, v_new), rows)| RecentPart {
                    rings,
                    k_new,
                    v_new,
                    rows,
                }),
        },
        &mut out,
        &mut DecodeWorkspace::default(),
    )
    .expect("gpu decode");
    g.synchronize().expect("decode ran");
    download(g, &out)
}

/// Rows of positions `range` of every sequence, concatenated.
fn rows_of(x: &[Vec<f32>], ranges: &[std::ops::Range<usize>], width: usize) -> Vec<f32> {
    x.iter()
        .zip(ranges)
        .flat_map(|(s, r)| s[r.start * width..r.end * width].iter().copied())
        .collect()
}

/// Worst relative L2 error of `c` with a window of `n` tokens against the f16 cache without
/// one, over the rows of a pass whose earlier positions went through the rings.
fn window_case(g: &Arc<GpuContext>, c: &Case, n: usize, ctx: &[usize], fresh: &[usize]) -> f64 {
    let seed = fresh_seed(&format!("gpu window {} n {n} ctx {ctx:?}", c.label));
    let mut r = rng(seed);
    let width = KV_HEADS * D;
    // Plain Gaussian rows: a mild softmax, so the two paths' roundings (the codec's splits take
    // the query at the dtype, the window in f32) stay at the dtype's size instead of picking
    // different winners among near-equal large scores, while a wrong token, ring slot or
    // rotation still moves the output by its whole size.
    let k: Vec<Vec<f32>> = ctx.iter().map(|&t| gaussian(&mut r, t * width)).collect();
    let v: Vec<Vec<f32>> = ctx.iter().map(|&t| gaussian(&mut r, t * width)).collect();
    let f16 = case(GpuCodec::FLOAT, false, D, c.dtype, LAYERS, KV_HEADS, BLOCK);
    let (reference_cache, tables) = filled_cache(g, &f16, ctx, (&k, &v));
    let (cache, _) = filled_cache(g, c, ctx, (&k, &v));

    // The earlier pass: positions 0 .. ctx - fresh of each sequence go into the rings.
    let mut rings = WindowRings::new(&cache, n, ctx.len()).expect("rings");
    let windows: Vec<RecentWindow> = (0..ctx.len())
        .map(|s| RecentWindow::new(n, LAYERS, KV_HEADS, (D, D), c.dtype).with_device_slot(s))
        .collect();
    let earlier: Vec<_> = ctx.iter().zip(fresh).map(|(&t, &f)| 0..t - f).collect();
    let mut step = WindowStep::default();
    let mut first_row = 0;
    for (s, range) in earlier.iter().enumerate() {
        step.push_chunk((0, range.len(), first_row), Some(&windows[s]), Some(&rings))
            .expect("earlier rows");
        first_row += range.len();
    }
    if first_row > 0 {
        let (kd, vd) = (
            upload(g, &rows_of(&k, &earlier, width)),
            upload(g, &rows_of(&v, &earlier, width)),
        );
        let keep = upload(g, &step.keep);
        rings
            .keep(
                &cache,
                LAYERS - 1,
                HEADS / KV_HEADS,
                (&kd, &vd),
                &keep.slice(..),
                first_row,
            )
            .expect("keep");
    }

    // This pass: the fresh positions, their K/V rows read by the window from the pass itself.
    let current: Vec<_> = ctx.iter().zip(fresh).map(|(&t, &f)| t - f..t).collect();
    let mut step = WindowStep::default();
    let mut first_row = 0;
    for (s, range) in current.iter().enumerate() {
        step.push_chunk(
            (range.start, range.len(), first_row),
            Some(&windows[s]),
            Some(&rings),
        )
        .expect("pass rows");
        first_row += range.len();
    }
    let (kd, vd) = (
        upload(g, &rows_of(&k, &current, width)),
        upload(g, &rows_of(&v, &current, width)),
    );
    let q = upload(g, &gaussian(&mut r, first_row * HEADS * D));
    let got = decode_rows(
        g,
        &cache,
        &tables,
        ctx,
        fresh,
        &q,
        Some((&rings, &step, &kd, &vd)),
    );
    let want = decode_rows(g, &reference_cache, &tables, ctx, fresh, &q, None);
    let mut worst = 0f64;
    for (row, (a, b)) in got.chunks_exact(D).zip(want.chunks_exact(D)).enumerate() {
        assert!(
            a.iter().all(|x| x.is_finite()),
            "{}: row {row} not finite (seed {seed})",
            c.label
        );
        let (mut e2, mut n2) = (0f64, 0f64);
        for (&x, &y) in a.iter().zip(b) {
            e2 += (x as f64 - y as f64).powi(2);
            n2 += (y as f64).powi(2);
        }
        worst = worst.max((e2 / n2.max(1e-30)).sqrt());
    }
    eprintln!(
        "window {:<44} n {n:>3} ctx {ctx:?} fresh {fresh:?}: worst rel L2 vs the f16 cache {worst:.2e} (seed {seed})",
        c.label
    );
    worst
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn recent_window_reads_what_the_f16_cache_holds() {
    let g = gpu();
    let ctx = [5, 40, 120, 64];
    let fresh = [5, 1, 30, 64];
    let mut failures = Vec::new();
    // The codec's splits round the query and the attention weights to the dtype, the window
    // keeps them in f32: a few units of the dtype's rounding (2^-11 f16, 2^-8 bf16).
    let tolerance = 4e-3;
    for dtype in [KvDtype::F16, KvDtype::Bf16] {
        for kind in [
            GpuCodec::FLOAT,
            GpuCodec::PT_INT4,
            GpuCodec::TURBO_QUANT,
            GpuCodec::from_kernel_name("k:pt_int8r+v:pt_int4r").expect("a GPU pairing"),
            GpuCodec::from_kernel_name("k:lm4+v:lm2u").expect("a GPU pairing"),
        ] {
            let c = case(kind, false, D, dtype, LAYERS, KV_HEADS, BLOCK);
            // A window over every token: the codec is never read.
            let mut cases = vec![(128, window_case(&g, &c, 128, &ctx, &fresh))];
            if kind == GpuCodec::FLOAT {
                // Shorter windows split an f16 cache's tokens between the two kernels.
                for n in [1, 16] {
                    cases.push((n, window_case(&g, &c, n, &ctx, &fresh)));
                }
            }
            for (n, worst) in cases {
                let bound = if dtype == KvDtype::Bf16 {
                    8.0 * tolerance
                } else {
                    tolerance
                };
                if worst.is_nan() || worst > bound {
                    failures.push(format!("{} window {n}: {worst:.2e} > {bound:.0e}", c.label));
                }
            }
        }
    }
    assert_no_failures(failures);
}
