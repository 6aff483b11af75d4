//! What a kernel is specialised for (codec, dtype, head dims, GQA group) and the flattened
//! cache layout the kernels address bytes with. Pure data: builds without CUDA.

use engine_core::cache::{CacheLayout, LayerPlacement, RegionLayout};
use engine_core::codec::KvCodec;
use engine_core::KvDtype;

use crate::nvrtc::KernelSource;
use crate::KernelError;

const COMMON: &str = include_str!("cuda/common.cuh");
const STORE: &str = include_str!("cuda/store.cu");
/// The decode module: the codec's split-K attention and merge, and the recent window's partial.
const DECODE: &str = concat!(
    include_str!("cuda/decode.cu"),
    "\n",
    include_str!("cuda/recent.cu")
);
const MODEL: &str = include_str!("cuda/model.cu");

/// How one side (K or V) of a cache entry is stored, as the kernels read and write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SideKernel {
    /// Values in the model dtype (policy 0).
    Float,
    /// PyTorch-engine affine int8 (scale, zero point per token and head).
    PtInt8,
    /// PyTorch-engine affine int4, half-split nibbles.
    PtInt4,
    /// TurboMind int8 (scale, min; arithmetic rounded to the model dtype).
    TmInt8,
    /// TurboMind int4, 8-element interleaved nibbles.
    TmInt4,
    /// TurboQuant's K: 3-bit Lloyd–Max index + residual sign (Hadamard domain). K only.
    Tq3s,
    /// 2-bit Lloyd–Max index and the vector's norm (policy 42's V; Hadamard domain). V only.
    Lm2,
    /// [`SideKernel::Lm2`] with the norm chosen so that ⟨x̂, x⟩ = ‖x‖² (same bytes to decode).
    Lm2u,
    /// 4-bit Lloyd–Max index (sequential nibbles) and the vector's norm; K or V.
    Lm4,
    /// [`SideKernel::Lm4`] with the un-shrunk norm.
    Lm4u,
}

impl SideKernel {
    /// Bits per element of the packed codes (metadata apart).
    pub fn code_bits(self) -> usize {
        match self {
            SideKernel::Float => 16,
            SideKernel::PtInt8 | SideKernel::TmInt8 => 8,
            SideKernel::PtInt4
            | SideKernel::TmInt4
            | SideKernel::Tq3s
            | SideKernel::Lm4
            | SideKernel::Lm4u => 4,
            SideKernel::Lm2 | SideKernel::Lm2u => 2,
        }
    }

    /// Bytes of metadata per token and head (f16/bf16 values), 0 for a float side.
    pub fn meta_bytes(self) -> usize {
        match self {
            SideKernel::Float => 0,
            SideKernel::Lm2 | SideKernel::Lm2u | SideKernel::Lm4 | SideKernel::Lm4u => 2,
            _ => 4,
        }
    }

    /// Lloyd–Max and TurboQuant sides live in the Hadamard domain by construction.
    fn always_rotated(self) -> bool {
        matches!(
            self,
            SideKernel::Tq3s
                | SideKernel::Lm2
                | SideKernel::Lm2u
                | SideKernel::Lm4
                | SideKernel::Lm4u
        )
    }

    /// `SIDE_*` in the CUDA sources.
    fn id(self) -> u32 {
        match self {
            SideKernel::Float => 0,
            SideKernel::PtInt8 => 1,
            SideKernel::PtInt4 => 2,
            SideKernel::TmInt8 => 3,
            SideKernel::TmInt4 => 4,
            SideKernel::Tq3s => 5,
            SideKernel::Lm2 => 6,
            SideKernel::Lm2u => 7,
            SideKernel::Lm4 => 8,
            SideKernel::Lm4u => 9,
        }
    }
}

/// One side's kernel: its storage and whether it is stored in the Hadamard domain (the query
/// is then rotated for K, the output rotated back for V).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GpuSide {
    pub kind: SideKernel,
    pub rotated: bool,
}

impl GpuSide {
    const NAMES: [(&'static str, SideKernel, bool); 12] = [
        ("float", SideKernel::Float, false),
        ("pt_int8", SideKernel::PtInt8, false),
        ("pt_int8r", SideKernel::PtInt8, true),
        ("pt_int4", SideKernel::PtInt4, false),
        ("pt_int4r", SideKernel::PtInt4, true),
        ("tm_int8", SideKernel::TmInt8, false),
        ("tm_int4", SideKernel::TmInt4, false),
        ("tq3s", SideKernel::Tq3s, true),
        ("lm2", SideKernel::Lm2, true),
        ("lm2u", SideKernel::Lm2u, true),
        ("lm4", SideKernel::Lm4, true),
        ("lm4u", SideKernel::Lm4u, true),
    ];

    pub const fn plain(kind: SideKernel) -> Self {
        Self {
            kind,
            rotated: false,
        }
    }

    /// The side's name in a kernel family name (`pt_int4r` = rotated PyTorch int4).
    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, k, r)| *k == self.kind && *r == (self.rotated || k.always_rotated()))
            .map_or("?", |(n, _, _)| n)
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|&(_, kind, rotated)| Self { kind, rotated })
    }
}

/// The kernels of a codec: its K side and its V side. Codecs name theirs through
/// [`KvCodec::gpu_kernel`]: a built-in family (`pt_int8`, `turbo_quant`, …) or
/// `k:<side>+v:<side>` with the side names of [`GpuSide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GpuCodec {
    pub k: GpuSide,
    pub v: GpuSide,
}

impl GpuCodec {
    const fn same(kind: SideKernel) -> Self {
        Self {
            k: GpuSide::plain(kind),
            v: GpuSide::plain(kind),
        }
    }
    /// Policy 0: values in the model dtype.
    pub const FLOAT: Self = Self::same(SideKernel::Float);
    /// Policy 8, PyTorch-engine semantics.
    pub const PT_INT8: Self = Self::same(SideKernel::PtInt8);
    /// Policy 4, PyTorch-engine semantics (half-split nibbles).
    pub const PT_INT4: Self = Self::same(SideKernel::PtInt4);
    /// Policy 8, TurboMind semantics.
    pub const TM_INT8: Self = Self::same(SideKernel::TmInt8);
    /// Policy 4, TurboMind semantics (8-element interleaved nibbles).
    pub const TM_INT4: Self = Self::same(SideKernel::TmInt4);
    /// Policy 42, TurboQuant (Hadamard domain, K 3-bit + sign, V 2-bit).
    pub const TURBO_QUANT: Self = Self {
        k: GpuSide {
            kind: SideKernel::Tq3s,
            rotated: true,
        },
        v: GpuSide {
            kind: SideKernel::Lm2,
            rotated: true,
        },
    };

    /// The built-in policies' kernels, with their family names.
    pub const BUILT_IN: [(&'static str, GpuCodec); 6] = [
        ("float", Self::FLOAT),
        ("pt_int8", Self::PT_INT8),
        ("pt_int4", Self::PT_INT4),
        ("tm_int8", Self::TM_INT8),
        ("tm_int4", Self::TM_INT4),
        ("turbo_quant", Self::TURBO_QUANT),
    ];

    /// The separate-side (`[cache] k/v/rotate`) combinations the compile check builds besides
    /// the built-ins: the rotated integer sides, the 2-bit V under rotated int4 K and the 4-bit
    /// Lloyd–Max sides.
    pub const SIDE_EXAMPLES: [&'static str; 6] = [
        "k:pt_int8r+v:pt_int8r",
        "k:pt_int8r+v:pt_int4r",
        "k:pt_int4r+v:pt_int4r",
        "k:pt_int4r+v:lm2u",
        "k:lm4+v:lm4",
        "k:lm4+v:lm2u",
    ];

    /// Every kernel family the compile check builds.
    pub fn compile_set() -> Vec<GpuCodec> {
        Self::BUILT_IN
            .iter()
            .map(|&(_, c)| c)
            .chain(
                Self::SIDE_EXAMPLES
                    .iter()
                    .filter_map(|n| Self::from_kernel_name(n)),
            )
            .collect()
    }

    /// The family name: a built-in's, else `k:<side>+v:<side>`.
    pub fn kernel_name(self) -> String {
        match Self::BUILT_IN.iter().find(|(_, c)| *c == self) {
            Some((n, _)) => (*n).to_string(),
            None => format!("k:{}+v:{}", self.k.name(), self.v.name()),
        }
    }

    /// Parses a family name; `None` for a name, or a side on the wrong side (a TurboQuant K
    /// as V, a 2-bit V as K), that no kernel implements.
    pub fn from_kernel_name(name: &str) -> Option<Self> {
        if let Some((_, c)) = Self::BUILT_IN.iter().find(|(n, _)| *n == name) {
            return Some(*c);
        }
        let (k, v) = name.strip_prefix("k:")?.split_once("+v:")?;
        let (k, v) = (GpuSide::from_name(k)?, GpuSide::from_name(v)?);
        let k_ok = !matches!(k.kind, SideKernel::Lm2 | SideKernel::Lm2u);
        let v_ok = v.kind != SideKernel::Tq3s;
        (k_ok && v_ok).then_some(Self { k, v })
    }

    /// The GPU codec of `codec`, or an error that names it.
    pub fn of(codec: &dyn KvCodec) -> Result<Self, KernelError> {
        codec
            .gpu_kernel()
            .as_deref()
            .and_then(Self::from_kernel_name)
            .ok_or_else(|| {
                KernelError::Unsupported(format!(
                    "codec \"{}\" has no GPU kernel (GPU codecs: policies 0, 8, 4, 42, and [cache] \
                     sides fp16, int8, int4 (rotated or not), lm4/lm4u, K tq3s, V lm2/lm2u)",
                    codec.name()
                ))
            })
    }

    /// Both sides store values in the model dtype.
    pub fn is_float(self) -> bool {
        self.k.kind == SideKernel::Float && self.v.kind == SideKernel::Float
    }

    /// The `-D` macros that select the sides in the CUDA sources.
    fn defines(self) -> [String; 4] {
        let rot = |s: GpuSide| u32::from(s.rotated || s.kind.always_rotated());
        [
            format!("-DKVQ_KS={}", self.k.kind.id()),
            format!("-DKVQ_VS={}", self.v.kind.id()),
            format!("-DKVQ_KROT={}", rot(self.k)),
            format!("-DKVQ_VROT={}", rot(self.v)),
        ]
    }
}

/// One compiled variant of the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Specialization {
    pub codec: GpuCodec,
    pub dtype: KvDtype,
    pub head_dim_k: usize,
    pub head_dim_v: usize,
    /// Query heads per KV head (decode only; 1 for the store kernel).
    pub group: usize,
}

/// The kernel sources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelKind {
    /// `kvq_store_kv`: quantize-and-store of new tokens.
    Store,
    /// `kvq_decode_split` + `kvq_decode_reduce`: split-K paged decode attention.
    Decode,
    /// The model's dense ops around the GEMMs (`model.cu`); codec-independent.
    Model,
}

impl KernelKind {
    /// The codec-specialised kinds (every codec × shape compiles them).
    pub const ALL: [KernelKind; 2] = [KernelKind::Store, KernelKind::Decode];

    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Store => "store",
            KernelKind::Decode => "decode",
            KernelKind::Model => "model",
        }
    }

    fn body(self) -> &'static str {
        match self {
            KernelKind::Store => STORE,
            KernelKind::Decode => DECODE,
            KernelKind::Model => MODEL,
        }
    }
}

/// Launch shape of the decode kernel for one specialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeTuning {
    /// Resident CTAs per multiprocessor (`KVQ_CTAS`, the `__launch_bounds__` minimum).
    pub ctas_per_sm: usize,
    /// 16-token tiles per pipeline step (`KVQ_TPI`).
    pub tiles_per_step: usize,
}

/// The entry points of `model.cu`.
pub const MODEL_ENTRIES: [&str; 7] = [
    "kvq_embed",
    "kvq_add_rmsnorm",
    "kvq_add",
    "kvq_rope",
    "kvq_silu_mul",
    "kvq_to_f16",
    "kvq_argmax",
];

/// Largest GQA group the decode kernel takes (two tiles of four heads).
pub const MAX_GROUP: usize = 8;
/// Head dims the decode kernel is built for.
pub const DECODE_HEAD_DIMS: [usize; 2] = [64, 128];
/// Largest head dim the store kernel takes.
pub const MAX_STORE_HEAD_DIM: usize = 1024;

impl Specialization {
    /// The specialization the codec-independent model kernels (`KernelKind::Model`) are
    /// compiled and cached under.
    pub const MODEL: Specialization = Specialization {
        codec: GpuCodec::FLOAT,
        dtype: KvDtype::F16,
        head_dim_k: 64,
        head_dim_v: 64,
        group: 1,
    };

    /// The source and `-D` options of `kind` for this specialization.
    pub fn source(&self, kind: KernelKind) -> KernelSource {
        let dtype = match self.dtype {
            KvDtype::Bf16 => 1,
            _ => 0,
        };
        let group = if kind == KernelKind::Decode {
            self.group
        } else {
            1
        };
        let mut src = KernelSource::new(
            format!(
                "{}_{}_{:?}_k{}_v{}_g{}",
                kind.name(),
                self.codec.kernel_name().replace(':', "-").replace('+', "_"),
                self.dtype,
                self.head_dim_k,
                self.head_dim_v,
                group
            )
            .to_lowercase(),
            format!("{COMMON}\n{}", kind.body()),
        );
        src.options = self.codec.defines().to_vec();
        src.options.extend([
            format!("-DKVQ_DTYPE={dtype}"),
            format!("-DKVQ_DK={}", self.head_dim_k),
            format!("-DKVQ_DV={}", self.head_dim_v),
            format!("-DKVQ_G={group}"),
        ]);
        if kind == KernelKind::Decode {
            let t = self.decode_tuning();
            src.options.push(format!("-DKVQ_CTAS={}", t.ctas_per_sm));
            src.options.push(format!("-DKVQ_TPI={}", t.tiles_per_step));
        }
        src
    }

    /// Occupancy and pipeline depth of the decode kernel: as many resident CTAs as the
    /// registers of two in-flight steps allow without spilling (`ptxas -v`, sm_90), and the
    /// step length that measured fastest on an H200 (kernels/README.md).
    pub fn decode_tuning(&self) -> DecodeTuning {
        let wide = self.head_dim_k >= 128;
        // The widest side sets the register budget.
        let bits = self
            .codec
            .k
            .kind
            .code_bits()
            .max(self.codec.v.kind.code_bits());
        let (ctas_per_sm, tiles_per_step) = match bits {
            16 => (2, if wide { 1 } else { 2 }),
            8 => (if wide { 2 } else { 3 }, 2),
            _ => (4, if wide { 1 } else { 2 }),
        };
        DecodeTuning {
            ctas_per_sm,
            tiles_per_step,
        }
    }

    /// Checks what the store kernel needs.
    pub fn check_store(&self) -> Result<(), KernelError> {
        self.check_common()?;
        for (side, d) in [("K", self.head_dim_k), ("V", self.head_dim_v)] {
            if d == 0 || d > MAX_STORE_HEAD_DIM {
                return Err(KernelError::Unsupported(format!(
                    "{side} head dim {d}: the store kernel takes 1..={MAX_STORE_HEAD_DIM}"
                )));
            }
        }
        Ok(())
    }

    /// Checks what the decode kernel needs.
    pub fn check_decode(&self) -> Result<(), KernelError> {
        self.check_common()?;
        for (side, d) in [("K", self.head_dim_k), ("V", self.head_dim_v)] {
            if !DECODE_HEAD_DIMS.contains(&d) {
                return Err(KernelError::Unsupported(format!(
                    "{side} head dim {d}: the decode kernel is built for head dims {DECODE_HEAD_DIMS:?}"
                )));
            }
        }
        if self.group == 0 || self.group > MAX_GROUP {
            return Err(KernelError::Unsupported(format!(
                "{} query heads per KV head: the decode kernel takes 1..={MAX_GROUP}",
                self.group
            )));
        }
        Ok(())
    }

    fn check_common(&self) -> Result<(), KernelError> {
        if self.dtype == KvDtype::F32 {
            return Err(KernelError::Unsupported(
                "an f32 cache: the GPU kernels store f16 or bf16 (set dtype = \"float16\" or \"bfloat16\")".into(),
            ));
        }
        let (dk, dv) = (self.head_dim_k, self.head_dim_v);
        let fits = |side: GpuSide, d: usize| match side.kind {
            SideKernel::Float | SideKernel::PtInt8 | SideKernel::TmInt8 => {
                !side.rotated || d.is_power_of_two()
            }
            SideKernel::PtInt4 => d % 2 == 0 && (!side.rotated || d.is_power_of_two()),
            SideKernel::TmInt4 => d % 8 == 0,
            SideKernel::Tq3s
            | SideKernel::Lm2
            | SideKernel::Lm2u
            | SideKernel::Lm4
            | SideKernel::Lm4u => d.is_power_of_two() && d >= 4,
        };
        let ok = fits(self.codec.k, dk) && fits(self.codec.v, dv);
        if !ok {
            return Err(KernelError::Unsupported(format!(
                "head dims {dk}/{dv} do not fit codec {}",
                self.codec.kernel_name()
            )));
        }
        let float_side =
            self.codec.k.kind == SideKernel::Float || self.codec.v.kind == SideKernel::Float;
        if self.dtype == KvDtype::Bf16 && float_side && !self.codec.is_float() {
            return Err(KernelError::Unsupported(format!(
                "codec {} in bf16: a bf16 fp16-side next to a quantized side has no kernel \
                 (the products take one operand type); use float16, or quantize both sides",
                self.codec.kernel_name()
            )));
        }
        Ok(())
    }
}

/// One region of a block, as the kernels take it (`struct Region` in common.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionParams {
    pub offset: i64,
    pub head_stride: i64,
    pub token_stride: i64,
}

/// The cache layout as the kernels take it (`struct CacheParams` in common.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheParams {
    pub kd: RegionParams,
    pub vd: RegionParams,
    pub km: RegionParams,
    pub vm: RegionParams,
    pub layer_bytes: i64,
    pub num_blocks: i64,
    pub num_layers: i64,
    pub block_size: i64,
    pub layer_major: i64,
}

#[cfg(feature = "cuda")]
// SAFETY: plain `repr(C)` integers, the same fields in the same order as the CUDA struct.
unsafe impl cudarc::driver::DeviceRepr for CacheParams {}

impl CacheParams {
    pub fn new(layout: &CacheLayout, num_blocks: usize) -> Self {
        let r = |r: &RegionLayout| RegionParams {
            offset: r.offset as i64,
            head_stride: r.head_stride as i64,
            token_stride: r.token_stride as i64,
        };
        Self {
            kd: r(&layout.k_data),
            vd: r(&layout.v_data),
            km: r(&layout.k_meta),
            vm: r(&layout.v_meta),
            layer_bytes: layout.layer_bytes as i64,
            num_blocks: num_blocks as i64,
            num_layers: layout.num_layers as i64,
            block_size: layout.block_size as i64,
            layer_major: (layout.placement == LayerPlacement::LayerMajor) as i64,
        }
    }
}

/// Checks that the decode kernel's vector loads are aligned in `layout`: every K row piece the
/// kernel reads with one load starts on a multiple of its width.
pub fn check_decode_layout(spec: &Specialization, layout: &CacheLayout) -> Result<(), KernelError> {
    if layout.block_size < 16 || !layout.block_size.is_power_of_two() {
        return Err(KernelError::Unsupported(format!(
            "block size {}: the decode kernel reads 16-token tiles and needs a power-of-two block size of at least 16",
            layout.block_size
        )));
    }
    if layout.layer_bytes > i32::MAX as usize {
        return Err(KernelError::Unsupported(format!(
            "{} bytes per layer and block: the decode kernel addresses inside a block with 32-bit offsets",
            layout.layer_bytes
        )));
    }
    let (k, v) = (spec.codec.k.kind, spec.codec.v.kind);
    let kp = (spec.head_dim_k * k.code_bits() / 32).min(16);
    let vp = (spec.head_dim_v * v.code_bits() / 64).min(16);
    let (meta, vmeta) = (k.meta_bytes().max(1), v.meta_bytes().max(1));
    let checks = [
        ("K data", &layout.k_data, kp),
        ("V data", &layout.v_data, vp),
        ("K metadata", &layout.k_meta, meta),
        ("V metadata", &layout.v_meta, vmeta),
    ];
    for (what, r, align) in checks {
        for v in [r.offset, r.head_stride, r.token_stride, layout.layer_bytes] {
            if v % align != 0 {
                return Err(KernelError::Unsupported(format!(
                    "{what} region of this layout is not {align}-byte aligned ({r:?}, layer bytes {})",
                    layout.layer_bytes
                )));
            }
        }
    }
    Ok(())
}

/// The specialisations the NVRTC compile check builds: every codec with each cache dtype at
/// head dim 128, and at SmolLM2's shape (64, group 3) in f16.
pub fn compile_check_set() -> Vec<Specialization> {
    let mut v = Vec::new();
    for codec in GpuCodec::compile_set() {
        for dtype in [KvDtype::F16, KvDtype::Bf16] {
            v.push(Specialization {
                codec,
                dtype,
                head_dim_k: 128,
                head_dim_v: 128,
                group: 4,
            });
        }
        v.push(Specialization {
            codec,
            dtype: KvDtype::F16,
            head_dim_k: 64,
            head_dim_v: 64,
            group: 3,
        });
    }
    v
}

/// Fewest tokens a split gets: enough work per CTA to amortise its set-up and merge.
const MIN_SPLIT_TOKENS: usize = 512;

/// Most cache blocks one split may span: the decode kernel stages the split's block-table
/// entries in shared memory (`DEC_MAX_BLOCKS` in decode.cu).
pub const MAX_SPLIT_BLOCKS: usize = 512;

/// How the context was split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlan {
    pub splits: usize,
    pub tokens_per_split: usize,
}

/// Chooses the split-K grid: enough CTAs for about four waves of the GPU (`ctas_per_sm`
/// resident per multiprocessor), every split a multiple of 16 tokens and at least
/// [`MIN_SPLIT_TOKENS`] long.
pub fn plan_splits(
    sm_count: usize,
    ctas_per_sm: usize,
    batch: usize,
    kv_heads: usize,
    max_context: usize,
    block_size: usize,
) -> DecodePlan {
    let base = (batch * kv_heads).max(1);
    // About four waves of resident CTAs: small per-CTA work hides the tail of the last wave.
    let target = 4 * ctas_per_sm.max(1) * sm_count.max(1);
    let most = max_context.div_ceil(MIN_SPLIT_TOKENS).max(1);
    // A split starts on a 16-token boundary, so it touches at most len / block_size + 2 blocks.
    let longest = ((MAX_SPLIT_BLOCKS - 2) * block_size.max(16)) / 16 * 16;
    let fewest = max_context.div_ceil(longest).max(1);
    let splits = target.div_ceil(base).clamp(1, most).max(fewest);
    let tokens_per_split = max_context.div_ceil(splits).div_ceil(16).max(1) * 16;
    DecodePlan {
        splits: max_context.div_ceil(tokens_per_split).max(1),
        tokens_per_split,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine_core::codec::SideBytes;

    #[test]
    fn names_round_trip() {
        for c in GpuCodec::compile_set() {
            assert_eq!(GpuCodec::from_kernel_name(&c.kernel_name()), Some(c));
        }
        assert_eq!(GpuCodec::compile_set().len(), 12);
        assert_eq!(
            GpuCodec::from_kernel_name("k:tq3s+v:lm2"),
            Some(GpuCodec::TURBO_QUANT)
        );
        assert_eq!(GpuCodec::TURBO_QUANT.kernel_name(), "turbo_quant");
        let mixed = GpuCodec::from_kernel_name("k:pt_int8r+v:pt_int4r").unwrap();
        assert!(mixed.k.rotated && mixed.v.rotated);
        assert_eq!(mixed.v.kind, SideKernel::PtInt4);
        for bad in [
            "fp8",
            "k:lm2+v:lm2",
            "k:pt_int4+v:tq3s",
            "k:pt_int4",
            "k:int4+v:int4",
        ] {
            assert_eq!(GpuCodec::from_kernel_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn params_follow_the_layout() {
        let s = |d, m| SideBytes { data: d, meta: m };
        let l = CacheLayout::token_major(s(64, 4), s(32, 2), 2, 8, 64, 256);
        let p = CacheParams::new(&l, 10);
        assert_eq!(p.vd.offset as usize, l.v_data.offset);
        assert_eq!(p.km.token_stride as usize, l.k_meta.token_stride);
        assert_eq!(p.layer_major, 1);
        assert_eq!(p.num_blocks, 10);
        assert_eq!(std::mem::size_of::<CacheParams>(), 4 * 24 + 5 * 8);
    }

    #[test]
    fn decode_refuses_what_it_cannot_run() {
        let spec = |codec, dk, g| Specialization {
            codec,
            dtype: KvDtype::F16,
            head_dim_k: dk,
            head_dim_v: dk,
            group: g,
        };
        assert!(spec(GpuCodec::PT_INT4, 128, 4).check_decode().is_ok());
        assert!(spec(GpuCodec::PT_INT4, 96, 4).check_decode().is_err());
        assert!(spec(GpuCodec::FLOAT, 128, 9).check_decode().is_err());
        let mut f32 = spec(GpuCodec::FLOAT, 64, 1);
        f32.dtype = KvDtype::F32;
        assert!(matches!(
            f32.check_store(),
            Err(KernelError::Unsupported(_))
        ));
    }

    #[test]
    fn decode_source_carries_its_tuning() {
        for codec in GpuCodec::compile_set() {
            for dk in DECODE_HEAD_DIMS {
                let spec = Specialization {
                    codec,
                    dtype: KvDtype::F16,
                    head_dim_k: dk,
                    head_dim_v: dk,
                    group: 4,
                };
                let t = spec.decode_tuning();
                assert!((1..=4).contains(&t.ctas_per_sm) && (1..=4).contains(&t.tiles_per_step));
                let opts = spec.source(KernelKind::Decode).options;
                assert!(opts.contains(&format!("-DKVQ_CTAS={}", t.ctas_per_sm)));
                assert!(opts.contains(&format!("-DKVQ_TPI={}", t.tiles_per_step)));
                let store = spec.source(KernelKind::Store).options;
                assert!(!store.iter().any(|o| o.starts_with("-DKVQ_CTAS")));
            }
        }
    }

    #[test]
    fn splits_cover_the_context_in_16_token_steps() {
        for (b, h, ctx) in [
            (32, 8, 32768),
            (1, 8, 32768),
            (32, 3, 32768),
            (3, 2, 17),
            (1, 1, 1),
        ] {
            for bs in [16, 64] {
                let p = plan_splits(132, 2, b, h, ctx, bs);
                assert_eq!(p.tokens_per_split % 16, 0);
                assert!(p.splits * p.tokens_per_split >= ctx);
                assert!((p.splits - 1) * p.tokens_per_split < ctx, "{p:?}");
            }
        }
        // Batch 1 at long context spreads over the whole GPU.
        assert!(plan_splits(132, 2, 1, 8, 32768, 64).splits * 8 >= 2 * 132);
        // A split never spans more blocks than the kernel stages, wherever it starts.
        for (b, ctx, bs) in [(64, 1 << 20, 16), (256, 1 << 18, 16), (64, 1 << 20, 64)] {
            let p = plan_splits(132, 4, b, 8, ctx, bs);
            assert!(
                p.tokens_per_split / bs + 2 <= MAX_SPLIT_BLOCKS,
                "{p:?} bs {bs}"
            );
        }
    }
}
