//! Integer decode mat-vec ("mmvq", kernels.cu): for the weight types that carry most of a
//! quantized model's bytes (Q4_K, Q5_K, Q6_K, Q8_0, Q4_0, Q5_0, Q4_1, Q5_1), activations are
//! quantized once per matmul group to int8 on the CPU's grid (`act_q8k` for K-quants,
//! `act_q8_0` for the others: Q8_0, plus Q8_1's block sums), and each weight block is read
//! with wide loads and multiplied with `__dp4a`, one float scale per sub-block. The integers
//! are the CPU's; only the order of the float sums differs. F16 / BF16 weights get the same
//! structure with 16-byte weight loads against f32 activations rounded as the CPU rounds
//! them. Other types (F32, Q2_K, Q3_K) keep the dequantizing `matvec_*` kernels.
//!
//! Kernels per type: `mmvq_*` (one token, one warp per row: decode), `mmvq2_*` (one token, two
//! rows per warp, sharing each activation load; FLEA_CUDA_MMVQ_ROWS=2 or `set_mmvq_rows(2)`)
//! and `mmvq8_*` (up to 8 tokens per weight load); `mmvqs_*` is `mmvq_*` with the block's
//! activations copied into shared memory first (the K-quants and Q4_0, the default where the
//! row fits 48 KiB; FLEA_CUDA_FUSE_OFF=mmvq_sa turns it off), and `mmvqr_*` the same with
//! two rows a warp in sequence (Q6_K; FLEA_CUDA_FUSE_OFF=mmvq_sa_rows gives Q6_K `mmvqs_*`,
//! the same bits; resident Q6_K as `mmvqr4_*`, 4 steps of loads in flight). `mmvqw4_*` /
//! `mmvqw5_*` keep a whole Q4_K row of 4096 / 5120 columns in flight
//! (FLEA_CUDA_FUSE_OFF=mmvq_whole_row, mmvq_q6_steps: the older kernels). Set FLEA_CUDA_NO_MMVQ=1 (or
//! `set_mmvq(false)`) to use `matvec_*` for every type (A/B comparisons).

use crate::{be, CudaBackend};
use cudarc::driver::{CudaSlice, LaunchConfig};
use flea_gguf::GgmlType;
use flea_model::weights::Weight;
use flea_model::Result;

/// Weight types with an mmvq kernel, as the kernels' name suffixes.
const SUFFIXES: [&str; 11] = [
    "q4_k", "q5_k", "q6_k", "q8_0", "q4_0", "q5_0", "q4_1", "q5_1", "f16", "bf16", "q6_k_soa",
];

/// Kernels of this module, loaded with the others: the activation quantizers, and per type
/// `mmvq_*` (one token, one row per warp), `mmvq2_*` (one token, two rows per warp) and
/// `mmvq8_*` (up to [`MAX_TOKENS`] tokens); `mmvqs_*` and `mmvqr_*` (one token, activations in
/// shared memory; one row a warp, or two in sequence).
pub(crate) fn kernel_names() -> Vec<String> {
    let mut v = vec![
        "act_q8k".to_string(),
        "act_q8_0".to_string(),
        MIXED.2.to_string(),
        MIXED_Q8_0.2.to_string(),
    ];
    for pre in ["mmvq", "mmvq2", "mmvq8"] {
        v.extend(SUFFIXES.iter().map(|s| format!("{pre}_{s}")));
    }
    v.extend(SA_SUFFIXES.iter().map(|s| format!("mmvqs_{s}")));
    v.extend(SA_ROWS_SUFFIXES.iter().map(|s| format!("mmvqr_{s}")));
    for steps in WHOLE_ROW_STEPS {
        v.extend(
            WHOLE_ROW_SUFFIXES
                .iter()
                .map(|s| format!("mmvqw{steps}_{s}")),
        );
    }
    v.push("mmvqx4_q4_k_q6_k_soa".to_string());
    v.push("mmvqr4_q6_k_soa".to_string());
    v.extend(mmq_kernel_names());
    v
}

/// The tensor-core kernels `mmq_<type>_<tiles>`.
pub(crate) fn mmq_kernel_names() -> Vec<String> {
    let mut v = Vec::new();
    for s in MMQ_SUFFIXES {
        v.extend(MMQ_TILES.iter().map(|t| format!("mmq_{s}_{t}")));
    }
    v
}

/// Dynamic shared memory of an `mmq_*` block for weights of type `ty`: two chunk buffers
/// (kernels.cu `mmq_chunk_bytes`: per token the quants of a chunk's super-blocks padded to
/// [`mmq_row_bytes`], their 16 sums a super-block and one scale).
fn mmq_smem_bytes(tiles: usize, ty: GgmlType) -> usize {
    let cw = mmq_chunk_width(ty);
    2 * tiles * 8 * (mmq_row_bytes(ty) + 16 * cw * 4 + cw * 4)
}

/// Super-blocks in one chunk of columns of an `mmq_*` kernel (kernels.cu `K::CW`: MMQ_KP
/// times the type's MMQ_CSB_*).
fn mmq_chunk_width(ty: GgmlType) -> usize {
    MMQ_KP
        * if ty == GgmlType::Q4_K {
            MMQ_CSB_Q4K
        } else {
            MMQ_CSB_Q6K
        }
}

/// A token's padded row of quants in an `mmq_*` chunk buffer (kernels.cu `MmqQ4K::QS`,
/// `MmqQ6K::QS`: the chunk's bytes plus 32 or 16, so that the mma operands' shared-memory
/// loads hit distinct banks).
fn mmq_row_bytes(ty: GgmlType) -> usize {
    mmq_chunk_width(ty) * 256 + if ty == GgmlType::Q4_K { 32 } else { 16 }
}

/// Weight types with a tensor-core `mmq_*` kernel: Q4_K_M's two, Q4_K and Q6_K (GGML's layout
/// for streamed weights, the repacked one for resident ones; the same sums).
const MMQ_SUFFIXES: [&str; 3] = ["q4_k", "q6_k", "q6_k_soa"];
/// Tiles of 8 tokens one `mmq_*` block takes (kernels `mmq_<type>_<tiles>`).
const MMQ_TILES: [usize; 3] = [1, 2, 4];
/// kernels.cu `MMQ_RG` and `MMQ_KP`: an `mmq_*` block's warps are MMQ_RG groups of 16 rows
/// times MMQ_KP super-blocks of each chunk of columns. 8 x 1 (128 rows, every warp over all
/// the columns) against the earlier 2 x 4: a 13b's gate/up at 32 tokens 107.5 -> 79.7 us a
/// call, its Q4_K 5120-wide matrices 32.4 -> 30.0 (H200, scripts/gpu_mmq.cu,
/// docs/BENCHMARKS.md): a row block's four warps each had only a quarter of the columns, so
/// the per-segment set-up, barriers and hand-over of partial sums were paid every 5 steps.
const MMQ_RG: usize = 8;
const MMQ_KP: usize = 1;
/// kernels.cu `MMQ_CSB_Q4K` / `MMQ_CSB_Q6K`: super-blocks each warp takes from a chunk of
/// columns (one activation fill and block barrier a chunk), per weight type.
const MMQ_CSB_Q4K: usize = 2;
const MMQ_CSB_Q6K: usize = 1;
// kernels.cu mmq_fill copies at most 4 super-blocks a chunk (two 16-byte pieces a lane).
const _: () = assert!(MMQ_KP * MMQ_CSB_Q4K <= 4 && MMQ_KP * MMQ_CSB_Q6K <= 4);
/// Rows of one `mmq_*` block and its threads.
const MMQ_BLOCK_ROWS: usize = 16 * MMQ_RG;
const MMQ_BLOCK_THREADS: u32 = (32 * MMQ_RG * MMQ_KP) as u32;
/// `mmq_*` blocks an SM holds at once (kernels.cu `MMQ_MINB`, the launch bounds' minimum).
const MMQ_BLOCKS_PER_SM: usize = 2;
/// Floats of one block's slot of partial sums: its rows times its most tokens, 8 a tile
/// (kernels.cu `FR` * 32).
const MMQ_SLOT_FLOATS: usize = MMQ_BLOCK_ROWS * 8 * MMQ_TILES[MMQ_TILES.len() - 1];
/// Most tokens a matmul gives the `mmq_*` kernels: one block's 32 (four tiles). Above, the
/// cuBLAS GEMM on the dequantized weight, which reads the weight once for the whole batch and
/// costs about the same from 8 to 64 rows; the kernels would read it once per 32 tokens. H200,
/// a 13b's 504-token prompt in passes of 32 / 64 rows: 1857 / 2293 tok/s with them, 1281 /
/// 2404 with cuBLAS (docs/BENCHMARKS.md).
pub(crate) const MMQ_MAX_TOKENS: usize = 32;
/// Fewest tokens that take the `mmq_*` kernels by default: two rows go faster through
/// `mmvq8_*` (H200, a 13b's prompt in 2-row passes: 302 vs 283 tok/s; 3 rows: 386 vs 417,
/// 4: 448 vs 531; docs/BENCHMARKS.md).
const MMQ_MIN_DEFAULT: usize = 3;

/// Types (kernel suffixes) with a shared-activation one-token kernel `mmvqs_*`: the K-quants
/// (Q8_K activations), the mixed q/k/v kernel and Q4_0 (Q8_0 activations). Q8_0, Q4_1 and Q5_1
/// rows measured slower with it (docs/BENCHMARKS.md), Q5_0 no different within the noise.
const SA_SUFFIXES: [&str; 6] = ["q4_k", "q5_k", "q6_k", "q6_k_soa", "q4_k_q6_k_soa", "q4_0"];
/// Types whose shared-activation kernel takes two rows a warp in sequence (`mmvqr_*`, one fill
/// per 8 rows): Q6_K, the FFN down projection's type in Q4_K_M, whose 13824-wide fill is the
/// largest. Q4_K and the mixed q/k/v kernel measured slower that way (docs/BENCHMARKS.md).
const SA_ROWS_SUFFIXES: [&str; 2] = ["q6_k", "q6_k_soa"];
/// Q4_K rows of 4 or 5 warp steps (4096 or 5120 columns) with the whole row's loads in
/// flight at once (`mmvqw<steps>_*`; FLEA_CUDA_FUSE_OFF=mmvq_whole_row turns it off).
const WHOLE_ROW_STEPS: [usize; 2] = [4, 5];
const WHOLE_ROW_SUFFIXES: [&str; 2] = ["q4_k", "q4_k_q6_k_soa"];

/// The `mmvqw_*` kernel's steps for a shared-activation kernel `suffix` on rows of `cols`:
/// Q4_K's warp step is 4 blocks of 256 columns.
fn whole_row_steps(suffix: &str, cols: usize) -> Option<usize> {
    let steps = cols / 1024;
    (WHOLE_ROW_SUFFIXES.contains(&suffix)
        && cols.is_multiple_of(1024)
        && WHOLE_ROW_STEPS.contains(&steps))
    .then_some(steps)
}
/// Shared memory one `mmvqs_*` block may take without the opt-in attribute.
const SA_MAX_BYTES: usize = 48 * 1024;

/// Shared memory of a `mmvqs_*` block for `cols` int8 activations of `fmt` (Q8K or Q8_0):
/// quants, sums (of 16 or of a 32-block), scales (kernels.cu, `sa_fill`).
pub(crate) fn sa_bytes(cols: usize, fmt: ActFmt) -> usize {
    let sums = if fmt == ActFmt::Q8K {
        cols / 16
    } else {
        cols / 32
    };
    cols + 4 * sums + 4 * (cols / fmt.block())
}

/// Tokens one `mmvq8_*` thread block multiplies with each weight load. Up to this many
/// tokens, matmuls use these kernels even when cuBLAS is there: reading the weight once beats
/// dequantizing it to f16 for a GEMM (and the sums are the CPU's integers). Not beyond: 16
/// and 32 rows as two and four 8-token groups were slower than cuBLAS (H200, a 13b served to
/// 16 / 32 clients: 587 vs 655 and 638 vs 1252 tok/s; docs/BENCHMARKS.md). Q4_K and Q6_K
/// weights take the tensor-core `mmq_*` kernels from 2 rows instead (faster at 4 and 8 rows
/// too: a 13b's prompt in passes of 8 rows 940 vs 559 tok/s).
pub(crate) const MAX_TOKENS: usize = 8;

/// The grid activations are quantized to (the CPU's vec-dot format of the weight type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ActFmt {
    /// 256-element blocks, f32 scale, sums of 16 (`act_q8k`).
    Q8K,
    /// 32-element blocks, f16-rounded scale, Q8_1's f16-rounded d*sum (`act_q8_0`).
    Q8_0,
    /// f32 rounded to f16 / bf16 (`act_round` modes 3 / 4), for F16 / BF16 weights.
    F16,
    BF16,
}

impl ActFmt {
    pub(crate) fn block(self) -> usize {
        match self {
            ActFmt::Q8K => 256,
            ActFmt::Q8_0 => 32,
            ActFmt::F16 | ActFmt::BF16 => 8,
        }
    }
}

/// The fast kernel for a weight type, the byte alignment its weight pointer needs (Q4_K and
/// Q5_K blocks and F16 / BF16 rows are read as 16-byte words; Q6_K's quants as aligned 8-byte
/// words around each 2-aligned segment, which must not start before the tensor; the others,
/// whose blocks may be only 2-aligned, as 2-byte words), and its activation format.
pub(crate) fn kernel_for(ty: GgmlType) -> Option<(&'static str, u64, ActFmt)> {
    Some(match ty {
        GgmlType::Q4_K => ("mmvq_q4_k", 16, ActFmt::Q8K),
        GgmlType::Q5_K => ("mmvq_q5_k", 16, ActFmt::Q8K),
        GgmlType::Q6_K => ("mmvq_q6_k", 8, ActFmt::Q8K),
        GgmlType::Q8_0 => ("mmvq_q8_0", 2, ActFmt::Q8_0),
        GgmlType::Q4_0 => ("mmvq_q4_0", 2, ActFmt::Q8_0),
        GgmlType::Q5_0 => ("mmvq_q5_0", 2, ActFmt::Q8_0),
        GgmlType::Q4_1 => ("mmvq_q4_1", 2, ActFmt::Q8_0),
        GgmlType::Q5_1 => ("mmvq_q5_1", 2, ActFmt::Q8_0),
        GgmlType::F16 => ("mmvq_f16", 16, ActFmt::F16),
        GgmlType::BF16 => ("mmvq_bf16", 16, ActFmt::BF16),
        _ => return None,
    })
}

/// Most matrices one mmvq launch computes (the kernels' W0..W2).
pub(crate) const MAX_JOBS: usize = 3;

/// kernels.cu `MmqJobs`: the matrices of one `mmq_*` launch (unused entries zero).
#[repr(C)]
struct MmqJobsArg {
    w: [u64; 3],
    y: [u64; 3],
    nb: [i64; 3],
    rows: [i32; 3],
    count: i32,
}

/// One matrix of a grouped mmvq launch: weight at `wp` (`rows` rows), output at `out`.
/// `second`: a resident Q6_K matrix in a launch with Q4_K ones ([`MIXED`]); such jobs come
/// after the group's Q4_K ones.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MmvqJob {
    pub wp: u64,
    pub rows: usize,
    pub out: u64,
    pub second: bool,
}

/// How a later job joins a group led by another: as one of the lead's own kind, as a
/// [`MmvqJob::second`] one (after those), or not at all.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Joins {
    Same,
    Second,
    No,
}

/// Jobs that share a launch: each job not yet in `done` (bit i: job i; at most 64 jobs) with
/// a kernel leads a group, which takes the later jobs that join it ([`Joins::Same`] ones
/// first, then [`Joins::Second`] ones), at most `most` (≤ [`MAX_JOBS`]) in all. Returns the
/// groups in order, each as (index, second) pairs; marks every grouped job in `done`.
pub(crate) fn launch_groups<K>(
    kernels: &[Option<K>],
    most: usize,
    done: &mut u64,
    joins: impl Fn(&K, &K) -> Joins,
) -> Vec<Vec<(usize, bool)>> {
    let most = most.clamp(1, MAX_JOBS);
    let mut groups = Vec::new();
    for (i, lead) in kernels.iter().enumerate().take(64) {
        let Some(lead) = lead else { continue };
        if *done & (1 << i) != 0 {
            continue;
        }
        *done |= 1 << i;
        let mut group = vec![(i, false)];
        for kind in [Joins::Same, Joins::Second] {
            for (j, other) in kernels.iter().enumerate().take(64).skip(i + 1) {
                let Some(other) = other else { continue };
                if group.len() < most && *done & (1 << j) == 0 && joins(lead, other) == kind {
                    group.push((j, kind == Joins::Second));
                    *done |= 1 << j;
                }
            }
        }
        groups.push(group);
    }
    groups
}

/// The one-token kernel for Q4_K matrices and resident (repacked) Q6_K ones on the same
/// input in one launch (Q4_K_M's q/k and v): the kernels it joins.
pub(crate) const MIXED: (&str, &str, &str) = ("mmvq_q4_k", "mmvq_q6_k_soa", "mmvq_q4_k_q6_k_soa");
/// The same for Q5_0 and Q8_0 (Q4_K_M's q/k and v where rows are not whole 256-blocks and
/// fall back to those types: Gemma-3-270M, Qwen2.5-0.5B).
pub(crate) const MIXED_Q8_0: (&str, &str, &str) = ("mmvq_q5_0", "mmvq_q8_0", "mmvq_q5_0_q8_0");

/// Every mixed kernel as (first type's kernel, second type's, the mixed one).
const MIXED_KERNELS: [(&str, &str, &str); 2] = [MIXED, MIXED_Q8_0];

/// The mixed kernel for a launch led by `first` with matrices of `second` (None: no such pair).
pub(crate) fn mixed_kernel(first: &str, second: &str) -> Option<&'static str> {
    MIXED_KERNELS
        .iter()
        .find(|m| m.0 == first && m.1 == second)
        .map(|m| m.2)
}

/// Device scratch of the int8 activations, one buffer per format (a matmul group may use
/// both, e.g. Q4_K and Q8_0 weights on the same input).
#[derive(Default)]
pub(crate) struct ActScratch {
    q8k: Option<CudaSlice<u8>>,
    q8_0: Option<CudaSlice<u8>>,
    half: Option<CudaSlice<u8>>,
    /// `mmq_*` row blocks split between blocks: two slots of partial sums a block, and one
    /// arrival counter a row block (zero between launches).
    mmq_part: Option<CudaSlice<f32>>,
    mmq_arrivals: Option<CudaSlice<u32>>,
}

/// Which formats already hold the current matmul group's input.
#[derive(Default)]
pub(crate) struct Quantized {
    q8k: bool,
    q8_0: bool,
    /// F16 or BF16: the one rounding the shared `half` buffer holds.
    half: Option<ActFmt>,
}

/// Matmuls that had an mmvq kernel but fell back to `matvec_*` because the weight's bytes were
/// not aligned for it (a performance bug to look for, not an error).
static MISALIGNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// 0: not decided yet (read FLEA_CUDA_NO_MMVQ), 1: on, 2: off.
static STATE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Rows per warp of the one-token kernels: 0 not decided yet (read FLEA_CUDA_MMVQ_ROWS,
/// default 1), else 1 (`mmvq_*`) or 2 (`mmvq2_*`).
static ROWS_PER_WARP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// `mmq_*` launches made (process-wide), for tests that must know the kernels ran.
static MMQ_LAUNCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The `mmq_*` kernels: 0 not decided yet (read FLEA_CUDA_NO_MMQ), 1 on, 2 off.
static MMQ_STATE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
/// Fewest tokens a matmul gives the `mmq_*` kernels (below: `mmvq*`); 0: not decided yet
/// (FLEA_CUDA_MMQ_MIN, default [`MMQ_MIN_DEFAULT`]).
static MMQ_MIN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How an `mmq_*` launch splits its work between blocks (kernels.cu, `mmq_unit_start`).
/// The units shared out are (row block, chunk of columns) pairs: [`CudaBackend::mmq_unit_shape`]
/// gives their size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmqGrid {
    /// One block a row block, each over all the columns.
    RowBlocks,
    /// This many blocks an SM (at most the units), the units shared out evenly: a row block
    /// may be split between blocks.
    PerSm(usize),
    /// Exactly this many blocks (at most the units), shared out the same way; for tests.
    Fixed(usize),
}

/// The split of `mmq_*` launches; None: not decided yet (FLEA_CUDA_MMQ_GRID: `rows`, `sm:K`
/// or a block count; default two blocks an SM, as many as the kernels' launch bounds hold).
static MMQ_GRID: std::sync::Mutex<Option<MmqGrid>> = std::sync::Mutex::new(None);

fn mmq_grid_setting() -> MmqGrid {
    let mut g = MMQ_GRID.lock().unwrap_or_else(|e| e.into_inner());
    *g.get_or_insert_with(|| {
        let v = std::env::var("FLEA_CUDA_MMQ_GRID").unwrap_or_default();
        if v == "rows" {
            MmqGrid::RowBlocks
        } else if let Some(k) = v.strip_prefix("sm:").and_then(|k| k.parse().ok()) {
            MmqGrid::PerSm(k)
        } else if let Ok(b) = v.parse() {
            MmqGrid::Fixed(b)
        } else {
            MmqGrid::PerSm(MMQ_BLOCKS_PER_SM)
        }
    })
}

/// Blocks of an `mmq_*` launch with `blocks` row blocks of `chunks` chunks each on `sms` SMs.
fn mmq_grid(grid: MmqGrid, blocks: usize, chunks: usize, sms: usize) -> usize {
    let units = blocks * chunks;
    let split = match grid {
        MmqGrid::PerSm(k) if k > 0 && sms > 0 => (k * sms).min(units),
        MmqGrid::Fixed(b) if b > 0 => b.min(units),
        _ => blocks,
    };
    // The kernel's unit arithmetic is 32-bit: (u + 1) * grid must stay below 2^32.
    if split.saturating_mul(units) > u32::MAX as usize {
        blocks
    } else {
        split
    }
}

/// kernels.cu `mmq_unit_start`: the first unit (row block * chunks + chunk) of block `b` of
/// `grid` sharing `units`.
#[cfg(test)]
fn mmq_unit_start(b: usize, units: usize, grid: usize) -> usize {
    b * units / grid
}

/// kernels.cu `mmq_block_of`: the block of `grid` whose units hold unit `u`.
#[cfg(test)]
fn mmq_block_of(u: usize, units: usize, grid: usize) -> usize {
    ((u + 1) * grid - 1) / units
}

fn mmq_enabled() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    match MMQ_STATE.load(Relaxed) {
        0 => {
            let on = std::env::var_os("FLEA_CUDA_NO_MMQ").is_none();
            MMQ_STATE.store(if on { 1 } else { 2 }, Relaxed);
            on
        }
        s => s == 1,
    }
}

/// Most rows whose matmuls of weights of `types` never reach cuBLAS: the few-token kernels'
/// limit, or the `mmq_*` kernels' where they take every row count above it (`mmq_on`) and
/// every one of the types. The
/// GEMM warm-up starts above it (warming shapes that never run only costs start-up time).
pub(crate) fn own_kernel_rows_max(
    mmq_on: bool,
    types: impl IntoIterator<Item = GgmlType>,
) -> usize {
    let mut types = types.into_iter().peekable();
    let any = types.peek().is_some();
    if mmq_on && any && types.all(|t| matches!(t, GgmlType::Q4_K | GgmlType::Q6_K)) {
        MMQ_MAX_TOKENS
    } else {
        MAX_TOKENS
    }
}

fn mmq_min_tokens() -> usize {
    use std::sync::atomic::Ordering::Relaxed;
    match MMQ_MIN.load(Relaxed) {
        0 => {
            let m = std::env::var("FLEA_CUDA_MMQ_MIN")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(MMQ_MIN_DEFAULT)
                .max(2);
            MMQ_MIN.store(m, Relaxed);
            m
        }
        m => m,
    }
}

/// Most tokens whose matmuls may read Q8_K activations (`mmvq8_*`, or `mmq_*` when on): up to
/// this many, norms and GLUs quantize their output as they write it.
pub(crate) fn q8k_tokens_max() -> usize {
    if mmq_enabled() {
        MMQ_MAX_TOKENS
    } else {
        MAX_TOKENS
    }
}

/// Tiles of 8 tokens per `mmq_*` block for `n` tokens: the fewest that hold them, at most 4
/// (more tokens take more blocks along the grid's y).
fn mmq_tiles(n: usize) -> usize {
    MMQ_TILES
        .iter()
        .copied()
        .find(|&t| n <= 8 * t)
        .unwrap_or(MMQ_TILES[MMQ_TILES.len() - 1])
}

pub(crate) fn rows_per_warp() -> usize {
    use std::sync::atomic::Ordering::Relaxed;
    match ROWS_PER_WARP.load(Relaxed) {
        0 => {
            let r = match std::env::var("FLEA_CUDA_MMVQ_ROWS").as_deref() {
                Ok("2") => 2,
                _ => 1,
            };
            ROWS_PER_WARP.store(r, Relaxed);
            r as usize
        }
        r => r as usize,
    }
}

pub(crate) fn enabled() -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    match STATE.load(Relaxed) {
        0 => {
            let on = std::env::var_os("FLEA_CUDA_NO_MMVQ").is_none();
            STATE.store(if on { 1 } else { 2 }, Relaxed);
            on
        }
        s => s == 1,
    }
}

/// Byte offsets of the activation scratch for `total` elements (a multiple of `block`):
/// quants (i8, `total`), block scales (f32, total/block) at `d_off`, at `s_off` Q8_K's sums of
/// 16 quants (i32, total/16) or Q8_1's block sums (f32, total/32); `bytes` in all. Each part
/// starts 256-aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ActLayout {
    pub d_off: usize,
    pub s_off: usize,
    pub bytes: usize,
}

pub(crate) fn act_layout(total: usize, block: usize) -> ActLayout {
    let up = |v: usize| v.div_ceil(256) * 256;
    let d_off = up(total);
    let s_off = d_off + up(total / block * 4);
    ActLayout {
        d_off,
        s_off,
        bytes: s_off + up(total / 16 * 4),
    }
}

impl CudaBackend {
    /// Matmuls (process-wide) that fell back from an int8 kernel to the dequantizing matvec
    /// because their weight was not aligned for it; should stay 0.
    pub fn mmvq_misaligned(&self) -> u64 {
        MISALIGNED.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Use the mmvq kernels where they apply (default, unless FLEA_CUDA_NO_MMVQ is set) or
    /// the dequantizing matvec everywhere (A/B comparisons). Process-wide.
    pub fn set_mmvq(&self, on: bool) {
        STATE.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
    }

    /// Rows per warp of the one-token mmvq kernels: 1 (default; FLEA_CUDA_MMVQ_ROWS=2 sets 2)
    /// or 2 (each activation load serves two rows; half as many warps). Process-wide; other
    /// values are taken as 1.
    pub fn set_mmvq_rows(&self, rows_per_warp: usize) {
        let r = if rows_per_warp == 2 { 2 } else { 1 };
        ROWS_PER_WARP.store(r, std::sync::atomic::Ordering::Relaxed);
    }

    /// Use the tensor-core `mmq_*` kernels for 2..=32 tokens where they apply (default,
    /// unless FLEA_CUDA_NO_MMQ is set), and from how many tokens on (at least 2, by default 3;
    /// FLEA_CUDA_MMQ_MIN). Process-wide; for A/B comparisons and tests.
    pub fn set_mmq(&self, on: bool, min_tokens: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        MMQ_STATE.store(if on { 1 } else { 2 }, Relaxed);
        MMQ_MIN.store(min_tokens.max(2), Relaxed);
    }

    /// Whether the `mmq_*` kernels are on, and from how many tokens (see [`Self::set_mmq`]).
    pub fn mmq_settings(&self) -> (bool, usize) {
        (mmq_enabled(), mmq_min_tokens())
    }

    /// Whether few-token matmuls of Q4_K / Q6_K weights take the `mmq_*` kernels here: the
    /// int8 kernels and these on, and their shared memory opted into (only on sm_80+, which
    /// has int8 `mma.sync`).
    pub fn mmq_on(&self) -> bool {
        enabled() && mmq_enabled() && self.mmq_smem_room > 0
    }

    /// How `mmq_*` launches split their work between blocks (process-wide; for A/B
    /// comparisons and tests: results differ only in the float summation order).
    pub fn set_mmq_grid(&self, grid: MmqGrid) {
        *MMQ_GRID.lock().unwrap_or_else(|e| e.into_inner()) = Some(grid);
    }

    /// The unit of work an `mmq_*` launch shares out for weights of type `ty`: (rows of a row
    /// block, super-blocks of a chunk of columns).
    pub fn mmq_unit_shape(&self, ty: GgmlType) -> (usize, usize) {
        (MMQ_BLOCK_ROWS, mmq_chunk_width(ty))
    }

    /// The split `mmq_*` launches use now (see [`Self::set_mmq_grid`]).
    pub fn mmq_grid(&self) -> MmqGrid {
        mmq_grid_setting()
    }

    /// `mmq_*` launches made so far (process-wide).
    pub fn mmq_launches(&self) -> u64 {
        MMQ_LAUNCHES.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The `mmq_*` kernel for `w` at `wp` with `n` tokens, its tiles of 8 tokens and the
    /// shared memory its block takes, or None (another path) where they are off
    /// ([`Self::mmq_on`]), for other types, token counts outside the kernels' range, or weights
    /// not aligned for their loads.
    pub(crate) fn mmq_kernel(
        &self,
        n: usize,
        w: &Weight,
        wp: u64,
    ) -> Option<(String, usize, usize)> {
        if !self.mmq_on()
            || n < mmq_min_tokens()
            || n > MMQ_MAX_TOKENS
            || !w.cols.is_multiple_of(256)
            || w.rows == 0
            // The kernels index activations with 32-bit element offsets (kernels.cu mmq_fill).
            || n.saturating_mul(w.cols) > i32::MAX as usize
        {
            return None;
        }
        // Q4_K: 16-byte header and 8-byte quant loads (rows of 144-byte blocks keep a 16-aligned
        // start 16-aligned); repacked Q6_K: 4- and 8-byte loads from its 8-aligned fields;
        // GGML's Q6_K: 2-byte loads (its 210-byte blocks are 2-aligned).
        // (Padded token rows in shared memory: kernels.cu MmqQ4K::QS, MmqQ6K::QS.)
        let suffix = match w.ty {
            GgmlType::Q4_K if wp.is_multiple_of(16) => "q4_k",
            GgmlType::Q6_K if self.is_repacked(wp) => {
                if !wp.is_multiple_of(8) {
                    return None;
                }
                "q6_k_soa"
            }
            GgmlType::Q6_K if wp.is_multiple_of(2) => "q6_k",
            _ => return None,
        };
        let tiles = mmq_tiles(n);
        let smem = mmq_smem_bytes(tiles, w.ty);
        (smem <= self.mmq_smem_room).then(|| (format!("mmq_{suffix}_{tiles}"), tiles, smem))
    }

    /// `out[t] (+)= w . x[t]` for t < n with an `mmq_*` kernel when [`Self::mmq_kernel`] has
    /// one; returns false (nothing launched) otherwise. `x` is quantized to Q8_K into
    /// `scratch` unless `quantized` says this matmul group already did so.
    #[allow(clippy::too_many_arguments)] // the matmul's operands and its group's scratch
    pub(crate) fn try_mmq(
        &self,
        n: usize,
        w: &Weight,
        wp: u64,
        x: u64,
        out: u64,
        acc: bool,
        scratch: &mut ActScratch,
        quantized: &mut Quantized,
    ) -> Result<bool> {
        let Some(kernel) = self.mmq_kernel(n, w, wp) else {
            return Ok(false);
        };
        let job = MmvqJob {
            wp,
            rows: w.rows,
            out,
            second: false,
        };
        self.launch_mmq(n, w, &[job], &kernel, x, acc, scratch, quantized)?;
        Ok(true)
    }

    /// One launch of the `mmq_*` kernel (name, tiles, shared memory) for up to [`MAX_JOBS`]
    /// matrices of `like`'s type and width on the same `n` activation rows at `x`, each one
    /// [`Self::mmq_kernel`] gave this kernel.
    #[allow(clippy::too_many_arguments)] // the group's operands and its scratch
    pub(crate) fn launch_mmq(
        &self,
        n: usize,
        like: &Weight,
        jobs: &[MmvqJob],
        (name, tiles, smem): &(String, usize, usize),
        x: u64,
        acc: bool,
        scratch: &mut ActScratch,
        quantized: &mut Quantized,
    ) -> Result<()> {
        if jobs.is_empty() || jobs.len() > MAX_JOBS {
            return Err(be(format!("mmq: {} matrices in one launch", jobs.len())));
        }
        let (xqp, xdp, xsp) =
            self.quantize_int8(ActFmt::Q8K, n * like.cols, x, scratch, quantized)?;
        let blocks: usize = jobs.iter().map(|j| j.rows.div_ceil(MMQ_BLOCK_ROWS)).sum();
        let groups = n.div_ceil(8 * tiles);
        let chunks = (like.cols / 256).div_ceil(mmq_chunk_width(like.ty));
        let grid = mmq_grid(mmq_grid_setting(), blocks, chunks, self.sms);
        // Partial sums and arrival counters, only touched where a row block is split.
        let (part, arrivals) = if grid == blocks {
            (0u64, 0u64)
        } else {
            (
                self.grow(&mut scratch.mmq_part, 2 * grid * MMQ_SLOT_FLOATS)?,
                self.grow(&mut scratch.mmq_arrivals, groups * blocks)?,
            )
        };
        let cfg = LaunchConfig {
            grid_dim: (grid as u32, groups as u32, 1),
            block_dim: (MMQ_BLOCK_THREADS, 1, 1),
            shared_mem_bytes: *smem as u32,
        };
        let mut arg = MmqJobsArg {
            w: [0; 3],
            y: [0; 3],
            // The repacked layout addresses its fields by the tensor's block count.
            nb: [0; 3],
            rows: [0; 3],
            count: jobs.len() as i32,
        };
        for (i, j) in jobs.iter().enumerate() {
            arg.w[i] = j.wp;
            arg.y[i] = j.out;
            arg.nb[i] = (j.rows * (like.cols / 256)) as i64;
            arg.rows[i] = j.rows as i32;
        }
        let (cols_i, rb, n_i, acc_i) = (
            like.cols as i32,
            like.row_bytes() as i64,
            n as i32,
            acc as i32,
        );
        // MMQ_ARGS in order: each job's weight holds rows * row_bytes bytes of the checked type
        // and width (check_weight, mmq_kernel), its out n * rows f32 (the callers'
        // check_matmul), the Q8_K scratch n * cols quants with their scales and sums
        // (quantize_int8).
        launch!(self, name, cfg; arg, xqp, xdp, xsp, cols_i, rb, n_i, acc_i, part, arrivals)?;
        MMQ_LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The int8 kernel and activation format for `w` at device address `wp` with `n` tokens,
    /// or None (use another path) when its type has none, the kernels are off, or its bytes
    /// are not aligned for it.
    pub(crate) fn mmvq_kernel(
        &self,
        n: usize,
        w: &Weight,
        wp: u64,
    ) -> Option<(&'static str, ActFmt)> {
        let (name, align, fmt) = kernel_for(w.ty)?;
        // n == 0 keeps the old path's behaviour (nothing here launches an empty grid).
        if !enabled() || n == 0 {
            return None;
        }
        // Row starts need the blocks' alignment; Q6_K's blocks need 2, its tensor start 8.
        let row_align = if w.ty == GgmlType::Q6_K { 2 } else { align };
        if !wp.is_multiple_of(align) || !(w.row_bytes() as u64).is_multiple_of(row_align) {
            MISALIGNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return None;
        }
        if w.ty == GgmlType::Q6_K && self.is_repacked(wp) {
            return Some(("mmvq_q6_k_soa", fmt));
        }
        Some((name, fmt))
    }

    /// `out[t] = w . x[t]` (with `acc`: `out[t] += w . x[t]`) for t < n with the fast
    /// kernel, when `w`'s type has one and its bytes are aligned for it. Returns false
    /// (nothing launched) otherwise. `x` is quantized into `scratch` unless `quantized` says
    /// this matmul group already did so.
    #[allow(clippy::too_many_arguments)] // the matmul's operands and its group's scratch
    pub(crate) fn try_mmvq(
        &self,
        n: usize,
        w: &Weight,
        wp: u64,
        x: u64,
        out: u64,
        acc: bool,
        scratch: &mut ActScratch,
        quantized: &mut Quantized,
    ) -> Result<bool> {
        let Some(kernel) = self.mmvq_kernel(n, w, wp) else {
            return Ok(false);
        };
        let job = MmvqJob {
            wp,
            rows: w.rows,
            out,
            second: false,
        };
        self.launch_mmvq(n, w, &[job], kernel, x, acc, scratch, quantized)?;
        Ok(true)
    }

    /// One launch of `kernel` for up to [`MAX_JOBS`] matrices of `like`'s type and width on
    /// the same `n` activation rows at `x` (each job checked by [`Self::mmvq_kernel`]).
    #[allow(clippy::too_many_arguments)] // the group's operands and its scratch
    pub(crate) fn launch_mmvq(
        &self,
        n: usize,
        like: &Weight,
        jobs: &[MmvqJob],
        (name, fmt): (&'static str, ActFmt),
        x: u64,
        acc: bool,
        scratch: &mut ActScratch,
        quantized: &mut Quantized,
    ) -> Result<()> {
        let (Some(first), true) = (jobs.first(), jobs.len() <= MAX_JOBS) else {
            return Err(be(format!("mmvq: {} matrices in one launch", jobs.len())));
        };
        let total = n * like.cols;
        let (xqp, xdp, xsp) = if let ActFmt::F16 | ActFmt::BF16 = fmt {
            let base = self.grow(&mut scratch.half, total * 4)?;
            if quantized.half != Some(fmt) {
                let mode = if fmt == ActFmt::F16 { 3 } else { 4 };
                self.round_acts(x, total, mode, base, 0)?;
                quantized.half = Some(fmt);
            }
            // Only xq (the rounded f32) is read; xd / xs are unused valid pointers.
            (base, base, base)
        } else {
            self.quantize_int8(fmt, total, x, scratch, quantized)?
        };
        // Jobs before z2 are of `like`'s type; the rest (if any) are the mixed kernel's
        // second type.
        let z2 = jobs.iter().position(|j| j.second).unwrap_or(jobs.len());
        let mixed = z2 < jobs.len();
        let mixed_name = MIXED_KERNELS.iter().find(|m| m.0 == name).map(|m| m.2);
        let one = match (mixed, mixed_name) {
            (false, _) => name,
            (true, Some(m)) if n == 1 && rows_per_warp() == 1 => m,
            _ => {
                return Err(be(format!(
                    "mmvq: {name} cannot share a launch with other types"
                )))
            }
        };
        // One token: the kernel reading its int8 activations from shared memory where they
        // fit there (and FLEA_CUDA_FUSE_OFF does not name `mmvq_sa`); Some(its type suffix).
        let shared_suffix = if n == 1
            && rows_per_warp() == 1
            && !self.fusions_off.mmvq_sa
            && matches!(fmt, ActFmt::Q8K | ActFmt::Q8_0)
            && like.cols.is_multiple_of(fmt.block())
            && sa_bytes(like.cols, fmt) <= SA_MAX_BYTES
        {
            one.strip_prefix("mmvq_")
                .filter(|suffix| SA_SUFFIXES.contains(suffix))
        } else {
            None
        };
        // Each 128-thread block has 4 warps of `rows_per_block / 4` rows (mmvqr_: one after the
        // other, the second gridDim.x * 4 rows on).
        let (kname, rows_per_block, groups) = match (shared_suffix, n, rows_per_warp()) {
            (Some(suffix), ..)
                if !self.fusions_off.mmvq_sa_rows && SA_ROWS_SUFFIXES.contains(&suffix) =>
            {
                // Resident Q6_K: 4 steps of loads in flight (FLEA_CUDA_FUSE_OFF=mmvq_q6_steps: 3).
                if suffix == "q6_k_soa" && !self.fusions_off.mmvq_q6_steps {
                    (format!("mmvqr4_{suffix}"), 8, 1)
                } else {
                    (format!("mmvqr_{suffix}"), 8, 1)
                }
            }
            (Some(suffix), ..) => match whole_row_steps(suffix, like.cols) {
                Some(steps) if !self.fusions_off.mmvq_whole_row => {
                    if suffix == MIXED.2.trim_start_matches("mmvq_")
                        && steps == 4
                        && !self.fusions_off.mmvq_q6_steps
                    {
                        (format!("mmvqx4_{suffix}"), 4, 1)
                    } else {
                        (format!("mmvqw{steps}_{suffix}"), 4, 1)
                    }
                }
                _ => (format!("mmvqs_{suffix}"), 4, 1),
            },
            (None, 1, 2) => (name.replacen("mmvq_", "mmvq2_", 1), 8, 1),
            (None, 1, _) => (one.to_string(), 4, 1),
            (None, ..) => (
                name.replacen("mmvq_", "mmvq8_", 1),
                4,
                n.div_ceil(MAX_TOKENS),
            ),
        };
        // Unused slots repeat the first job; blockIdx.z never reaches them.
        let job = |i: usize| jobs.get(i).unwrap_or(first);
        let most_rows = jobs.iter().map(|j| j.rows).max().unwrap_or(0);
        let cfg = LaunchConfig {
            grid_dim: (
                most_rows.div_ceil(rows_per_block) as u32,
                groups as u32,
                jobs.len() as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: if shared_suffix.is_some() {
                sa_bytes(like.cols, fmt) as u32
            } else {
                0
            },
        };
        let (w0, w1, w2) = (job(0).wp, job(1).wp, job(2).wp);
        let (y0, y1, y2) = (job(0).out, job(1).out, job(2).out);
        let (r0, r1, r2) = (job(0).rows as i32, job(1).rows as i32, job(2).rows as i32);
        let (cols_i, rb, n_i, acc_i, z2_i) = (
            like.cols as i32,
            like.row_bytes() as i64,
            n as i32,
            acc as i32,
            z2 as i32,
        );
        // The parameters are MMVQ_ARGS in order; each job's wp holds rows*row_bytes bytes of
        // `like`'s type and width (check_weight, same type and width checked by the caller),
        // its out holds n*rows f32 (check_rows); the activation scratch was sized and filled
        // above.
        launch!(self, &kname, cfg; w0, w1, w2, xqp, xdp, xsp, y0, y1, y2, r0, r1, r2, cols_i, rb, n_i, acc_i, z2_i)
    }

    /// The int8 scratch of `fmt` (Q8K or Q8_0) for `total` activations (grown if needed):
    /// (quants, scales, sums).
    pub(crate) fn int8_scratch(
        &self,
        scratch: &mut ActScratch,
        total: usize,
        fmt: ActFmt,
    ) -> Result<(u64, u64, u64)> {
        let lay = act_layout(total, fmt.block());
        let buf = if fmt == ActFmt::Q8K {
            &mut scratch.q8k
        } else {
            &mut scratch.q8_0
        };
        let base = self.grow(buf, lay.bytes)?;
        Ok((base, base + lay.d_off as u64, base + lay.s_off as u64))
    }

    /// Quantize `total` activations at `x` to the int8 format `fmt` (Q8K or Q8_0) in its
    /// scratch buffer, unless already done for this group; returns the (quants, scales, sums)
    /// device pointers.
    fn quantize_int8(
        &self,
        fmt: ActFmt,
        total: usize,
        x: u64,
        scratch: &mut ActScratch,
        quantized: &mut Quantized,
    ) -> Result<(u64, u64, u64)> {
        let lay = act_layout(total, fmt.block());
        let (buf, done, qname) = match fmt {
            ActFmt::Q8K => (&mut scratch.q8k, &mut quantized.q8k, "act_q8k"),
            _ => (&mut scratch.q8_0, &mut quantized.q8_0, "act_q8_0"),
        };
        let base = self.grow(buf, lay.bytes)?;
        let (xqp, xdp, xsp) = (base, base + lay.d_off as u64, base + lay.s_off as u64);
        // A norm, attention or GLU launch may have quantized exactly these values into this
        // scratch already (and nothing ran since).
        if !*done && self.prequantized(x, total, base) {
            *done = true;
        }
        if !*done {
            let nblk = (total / fmt.block()) as i64;
            let cfg = LaunchConfig {
                grid_dim: ((total / fmt.block()).div_ceil(4) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // x holds `total` f32 (checked by matmuls); the scratch holds lay.bytes.
            launch!(self, qname, cfg; x, xqp, xdp, xsp, nblk)?;
            *done = true;
        }
        Ok((xqp, xdp, xsp))
    }
}

/// Rust mirrors of the kernels' per-lane arithmetic (same lane split, bit tricks and integer
/// sums as kernels.cu), checked against flea-quant's reference dots: they pin down the index
/// and bit math that only a GPU could otherwise exercise.
#[cfg(test)]
mod tests {
    use super::*;

    fn dp4a(a: u32, b: u32, c: i32) -> i32 {
        let mut s = c;
        for k in 0..4 {
            s += ((a >> (8 * k)) as u8 as i8 as i32) * ((b >> (8 * k)) as u8 as i8 as i32);
        }
        s
    }
    fn word(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }
    fn h2f(h: u16) -> f32 {
        flea_quant::f16_to_f32(h)
    }

    /// The shared-activation layout (kernels.cu `sa_fill`: quants, then cols / XS sums, then
    /// cols / QK scales, 4 bytes each) and the widest rows of the presets (70B's 28672-wide
    /// ffn_down) inside one block's default shared memory.
    #[test]
    fn shared_activation_bytes() {
        assert_eq!(sa_bytes(5120, ActFmt::Q8K), 5120 + 4 * 320 + 4 * 20);
        assert_eq!(sa_bytes(4096, ActFmt::Q8_0), 4096 + 4 * 128 + 4 * 128);
        assert!(sa_bytes(28672, ActFmt::Q8K) <= SA_MAX_BYTES);
        assert!(sa_bytes(28672, ActFmt::Q8_0) <= SA_MAX_BYTES);
    }

    /// act_q8k's quants as stored: element 64j + 32s + 16h + i (i < 16) at 128s + 32j + 16h + i,
    /// written the kernel's way (lane = 8 elements, one 8-byte store at `st`).
    fn stored_quants(q: &[i8]) -> Vec<i8> {
        let mut out = vec![0i8; 256];
        for lane in 0..32 {
            let st = 128 * ((lane >> 2) & 1)
                + 32 * (lane >> 3)
                + 16 * ((lane >> 1) & 1)
                + 8 * (lane & 1);
            out[st..st + 8].copy_from_slice(&q[8 * lane..8 * lane + 8]);
        }
        out
    }

    /// act_q8k's sums as stored: group g = 4a + 2b + c at 4a + 2c + b.
    fn stored_sums(sums: &[i32]) -> Vec<i32> {
        let mut out = vec![0; 16];
        for (g, &s) in sums.iter().enumerate() {
            out[(g & 12) | ((g & 1) << 1) | ((g >> 1) & 1)] = s;
        }
        out
    }

    /// act_q8k: (quants, d, sums of 16 in element order) of one 256-element block, lane by
    /// lane.
    fn act_q8k(x: &[f32]) -> (Vec<i8>, f32, Vec<i32>) {
        let (mut amax, mut mx, mut first) = (0f32, 0f32, 1usize << 30);
        let mut lanes = Vec::new();
        for lane in 0..32 {
            let (mut a, mut m, mut f) = (0f32, 0f32, 1usize << 30);
            for i in 0..8 {
                let v = x[lane * 8 + i];
                if v.abs() > a {
                    a = v.abs();
                    m = v;
                    f = lane * 8 + i;
                }
            }
            lanes.push((a, m, f));
        }
        // The butterfly's result equals the max of |v| with the smallest index on ties.
        for &(a, m, f) in &lanes {
            if a > amax || (a == amax && f < first) {
                amax = a;
                mx = m;
                first = f;
            }
        }
        let mut q = vec![0i8; 256];
        let mut d = 0f32;
        if amax != 0.0 {
            let iscale = -127.0f32 / mx;
            d = 1.0 / iscale;
            for (qi, &v) in q.iter_mut().zip(x) {
                *qi = (iscale * v).round_ties_even().min(127.0) as i8;
            }
        }
        let sums = q
            .chunks(16)
            .map(|c| c.iter().map(|&v| v as i32).sum())
            .collect();
        (q, d, sums)
    }

    fn q8(q: &[i8], off: usize) -> u32 {
        u32::from_le_bytes([
            q[off] as u8,
            q[off + 1] as u8,
            q[off + 2] as u8,
            q[off + 3] as u8,
        ])
    }

    /// Q4K::dot for one block and lane part p.
    fn q4k_lane(b: &[u8], p: usize, q: &[i8], yd: f32, xs: &[i32]) -> f32 {
        let j = p >> 1;
        let (y, z, w) = (word(b, 4), word(b, 8), word(b, 12));
        let scale_min = |s: usize| -> (i32, i32) {
            let sh = 8 * (s & 3);
            let (by, bz, bw) = ((y >> sh) & 0xff, (z >> sh) & 0xff, (w >> sh) & 0xff);
            if s < 4 {
                ((by & 63) as i32, (bz & 63) as i32)
            } else {
                (
                    ((bw & 15) | ((by >> 6) << 4)) as i32,
                    ((bw >> 4) | ((bz >> 6) << 4)) as i32,
                )
            }
        };
        let (mut dlo, mut dhi) = (0, 0);
        for k in 0..4 {
            let qw = word(b, 16 + 16 * p + 4 * k);
            let a = 16 * p + 4 * k;
            dlo = dp4a(qw & 0x0f0f0f0f, q8(q, a), dlo);
            dhi = dp4a((qw >> 4) & 0x0f0f0f0f, q8(q, a + 128), dhi);
        }
        let (sc0, m0) = scale_min(2 * j);
        let (sc1, m1) = scale_min(2 * j + 1);
        let (slo, shi) = (xs[2 * p], xs[2 * p + 1]);
        let d = h2f(u16::from_le_bytes([b[0], b[1]])) * yd;
        let dmin = h2f(u16::from_le_bytes([b[2], b[3]])) * yd;
        d * (sc0 * dlo + sc1 * dhi) as f32 - dmin * (m0 * slo + m1 * shi) as f32
    }

    /// Q6K::dot for one block and lane part p.
    fn q6k_lane(b: &[u8], p: usize, q: &[i8], yd: f32) -> f32 {
        let (n, l0) = (p >> 2, 8 * (p & 3));
        let g = if l0 >= 16 { 8 } else { 0 };
        let ql = 64 * n + l0;
        let qh = 128 + 32 * n + l0;
        let (a0, a1, b0, b1) = (
            word(b, ql),
            word(b, ql + 4),
            word(b, ql + 32),
            word(b, ql + 36),
        );
        let (h0, h1) = (word(b, qh), word(b, qh + 4));
        let q6 = |lo4: u32, hi2: u32| ((lo4 | (hi2 << 4)).wrapping_add(0x60606060)) ^ 0x80808080;
        let (m4, m2) = (0x0f0f0f0fu32, 0x03030303u32);
        // Stored offsets of c = 0..3: a, a + 128, a + 32, a + 160.
        let a = 64 * n + l0;
        let dd = |w0: u32, w1: u32, c: usize| {
            let o = a + [0, 128, 32, 160][c];
            dp4a(w0, q8(q, o), dp4a(w1, q8(q, o + 4), 0))
        };
        let d0 = dd(q6(a0 & m4, h0 & m2), q6(a1 & m4, h1 & m2), 0);
        let d1 = dd(q6(b0 & m4, (h0 >> 2) & m2), q6(b1 & m4, (h1 >> 2) & m2), 1);
        let d2 = dd(
            q6((a0 >> 4) & m4, (h0 >> 4) & m2),
            q6((a1 >> 4) & m4, (h1 >> 4) & m2),
            2,
        );
        let d3 = dd(
            q6((b0 >> 4) & m4, (h0 >> 6) & m2),
            q6((b1 >> 4) & m4, (h1 >> 6) & m2),
            3,
        );
        let s = 192 + 8 * n;
        let (s01, s23) = (
            u16::from_le_bytes([b[s], b[s + 1]]) as u32
                | (u16::from_le_bytes([b[s + 2], b[s + 3]]) as u32) << 16,
            word(b, s + 4),
        );
        let sc = |w: u32, sh: u32| ((w >> sh) & 0xff) as u8 as i8 as i32;
        let isum = sc(s01, g) * d0 + sc(s01, 16 + g) * d1 + sc(s23, g) * d2 + sc(s23, 16 + g) * d3;
        (h2f(u16::from_le_bytes([b[208], b[209]])) * yd) * isum as f32
    }

    /// Q5K::dot for one block and lane part p.
    fn q5k_lane(b: &[u8], p: usize, q: &[i8], yd: f32, xs: &[i32]) -> f32 {
        let (j, h) = (p >> 1, p & 1);
        let (y, z, w) = (word(b, 4), word(b, 8), word(b, 12));
        let scale_min = |s: usize| -> (i32, i32) {
            let sh = 8 * (s & 3);
            let (by, bz, bw) = ((y >> sh) & 0xff, (z >> sh) & 0xff, (w >> sh) & 0xff);
            if s < 4 {
                ((by & 63) as i32, (bz & 63) as i32)
            } else {
                (
                    ((bw & 15) | ((by >> 6) << 4)) as i32,
                    ((bw >> 4) | ((bz >> 6) << 4)) as i32,
                )
            }
        };
        let (mut dlo, mut dhi) = (0, 0);
        for k in 0..4 {
            let qw = word(b, 48 + 16 * p + 4 * k);
            let hw = word(b, 16 + 16 * h + 4 * k);
            let blo = ((hw >> (2 * j)) & 0x01010101) << 4;
            let bhi = ((hw >> (2 * j + 1)) & 0x01010101) << 4;
            let a = 16 * p + 4 * k;
            dlo = dp4a((qw & 0x0f0f0f0f) | blo, q8(q, a), dlo);
            dhi = dp4a(((qw >> 4) & 0x0f0f0f0f) | bhi, q8(q, a + 128), dhi);
        }
        let (sc0, m0) = scale_min(2 * j);
        let (sc1, m1) = scale_min(2 * j + 1);
        let (slo, shi) = (xs[2 * p], xs[2 * p + 1]);
        let d = h2f(u16::from_le_bytes([b[0], b[1]])) * yd;
        let dmin = h2f(u16::from_le_bytes([b[2], b[3]])) * yd;
        d * (sc0 * dlo + sc1 * dhi) as f32 - dmin * (m0 * slo + m1 * shi) as f32
    }

    /// act_q8_0 for one 32-element block: (quants, f16-rounded scale, f16-rounded d*sum).
    fn act_q8_0(x: &[f32]) -> (Vec<i8>, f32, f32) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let q: Vec<i8> = x
            .iter()
            .map(|&v| (v * id).round_ties_even() as i32 as i8)
            .collect();
        let sum: i32 = q.iter().map(|&v| v as i32).sum();
        let s = h2f(flea_quant::f32_to_f16(sum as f32 * d));
        (q, h2f(flea_quant::f32_to_f16(d)), s)
    }

    fn bits4_to_bytes(qh: u32, k: usize) -> u32 {
        ((((qh >> k) & 0xf).wrapping_mul(0x00204081)) & 0x01010101) << 4
    }

    /// Q50::dot (five = None) and Q41_51::dot (five = Some(with qh)) for one block, lane p.
    fn legacy_lane(ty: GgmlType, b: &[u8], p: usize, q: &[i8], yd: f32, ys: f32) -> f32 {
        let (qs, qh, dm) = match ty {
            GgmlType::Q5_0 => (6, word(b, 2), None),
            GgmlType::Q4_1 => (4, 0, Some(u16::from_le_bytes([b[2], b[3]]))),
            _ => (8, word(b, 4), Some(u16::from_le_bytes([b[2], b[3]]))),
        };
        let five = ty != GgmlType::Q4_1;
        let (q0, q1, m4) = (word(b, qs + 8 * p), word(b, qs + 4 + 8 * p), 0x0f0f0f0fu32);
        let k = 8 * p;
        let mut v = [q0 & m4, q1 & m4, (q0 >> 4) & m4, (q1 >> 4) & m4];
        if five {
            for (i, off) in [0, 4, 16, 20].into_iter().enumerate() {
                v[i] |= bits4_to_bytes(qh, k + off);
            }
        }
        if ty == GgmlType::Q5_0 {
            for x in &mut v {
                *x = x.wrapping_add(0x70707070) ^ 0x80808080;
            }
        }
        let a = 8 * p;
        let mut s = dp4a(v[0], q8(q, a), dp4a(v[1], q8(q, a + 4), 0));
        s = dp4a(v[2], q8(q, a + 16), dp4a(v[3], q8(q, a + 20), s));
        let mut r = s as f32 * (h2f(u16::from_le_bytes([b[0], b[1]])) * yd);
        if let (Some(m), 0) = (dm, p) {
            r += h2f(m) * ys;
        }
        r
    }

    /// Q80::dot for one block and lane part p (0..4).
    fn q80_lane(b: &[u8], p: usize, q: &[i8], yd: f32) -> f32 {
        let s = dp4a(
            word(b, 2 + 8 * p),
            q8(q, 8 * p),
            dp4a(word(b, 6 + 8 * p), q8(q, 8 * p + 4), 0),
        );
        s as f32 * (h2f(u16::from_le_bytes([b[0], b[1]])) * yd)
    }

    /// Q40::dot for one block and lane part p (0..2).
    fn q40_lane(b: &[u8], p: usize, q: &[i8], yd: f32) -> f32 {
        let q4 = |nib: u32| nib.wrapping_add(0x78787878) ^ 0x80808080;
        let (q0, q1, m4) = (word(b, 2 + 8 * p), word(b, 6 + 8 * p), 0x0f0f0f0fu32);
        let a = 8 * p;
        let mut s = dp4a(q4(q0 & m4), q8(q, a), dp4a(q4(q1 & m4), q8(q, a + 4), 0));
        s = dp4a(
            q4((q0 >> 4) & m4),
            q8(q, a + 16),
            dp4a(q4((q1 >> 4) & m4), q8(q, a + 20), s),
        );
        s as f32 * (h2f(u16::from_le_bytes([b[0], b[1]])) * yd)
    }

    /// ld8_a2: 8 bytes at a 2-aligned offset from two 8-aligned 8-byte loads.
    fn ld8_a2(mem: &[u8], a: usize) -> (u32, u32) {
        let base = a & !7;
        let w = |o: usize| word(mem, base + o);
        let m = a & 7;
        let (x0, x1, x2) = if m >= 4 {
            (w(4), w(8), w(12))
        } else {
            (w(0), w(4), w(8))
        };
        let sh = ((m & 3) * 8) as u32;
        let funnel = |lo: u32, hi: u32| ((((hi as u64) << 32) | lo as u64) >> sh) as u32;
        (funnel(x0, x1), funnel(x1, x2))
    }

    #[test]
    fn ld8_a2_reads_the_8_bytes_at_every_even_offset() {
        let mem: Vec<u8> = (0..64u8).map(|v| v.wrapping_mul(37) ^ 0x5a).collect();
        for a in (0..40).step_by(2) {
            assert_eq!(
                ld8_a2(&mem, a),
                (word(&mem, a), word(&mem, a + 4)),
                "offset {a}"
            );
        }
    }

    /// Deterministic pseudo-random bytes (xorshift64*).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545F4914F6CDD1D)
        }
        fn f32(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    fn acts(rng: &mut Rng, n: usize) -> Vec<f32> {
        // Mixed magnitudes, exact ties of |max| with both signs, and an all-zero block.
        let mut x: Vec<f32> = (0..n).map(|i| rng.f32() * (1 + i % 7) as f32).collect();
        x[3] = 9.0;
        x[200] = -9.0;
        x[256 + 17] = -12.5;
        x[256 + 18] = 12.5;
        for v in &mut x[512..768] {
            *v = 0.0;
        }
        x
    }

    /// The kernel's quants, scales and sums equal flea-quant's Q8_K bytes.
    #[test]
    fn act_q8k_matches_cpu_quantizer() {
        let mut rng = Rng(0x9e3779b97f4a7c15);
        let x = acts(&mut rng, 1024);
        let mut cpu = Vec::new();
        flea_quant::quantize_activations(GgmlType::Q8_K, &x, &mut cpu).unwrap();
        for (blk, c) in x.chunks(256).zip(cpu.chunks(292)) {
            let (q, d, sums) = act_q8k(blk);
            assert_eq!(d.to_le_bytes(), c[0..4], "scale");
            let cq: Vec<i8> = c[4..260].iter().map(|&v| v as i8).collect();
            assert_eq!(q, cq, "quants");
            for (g, &s) in sums.iter().enumerate() {
                assert_eq!(
                    s as i16,
                    i16::from_le_bytes([c[260 + 2 * g], c[261 + 2 * g]])
                );
            }
        }
    }

    /// The kernel's Q8_0 quants and scales equal flea-quant's Q8_0 bytes.
    #[test]
    fn act_q8_0_matches_cpu_quantizer() {
        let mut rng = Rng(0x51ed_2701_9e37_79b9);
        let mut x = acts(&mut rng, 1024);
        // Exact halves, where roundf (away from zero) and rint (to even) differ.
        for (i, v) in x[64..96].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 0.5;
        }
        // amax 127, so x * 127/amax is x itself: exact halves that round to even (2.5 -> 2),
        // where the `roundf(x / d)` of llama.cpp's reference and CUDA quantizers gives 3.
        for (i, v) in x[96..128].iter_mut().enumerate() {
            *v = if i == 0 {
                127.0
            } else {
                (i as f32 - 16.0) + 0.5
            };
        }
        let mut cpu = Vec::new();
        flea_quant::quantize_activations(GgmlType::Q8_0, &x, &mut cpu).unwrap();
        for (blk, c) in x.chunks(32).zip(cpu.chunks(34)) {
            let (q, d, _) = act_q8_0(blk);
            assert_eq!(d, h2f(u16::from_le_bytes([c[0], c[1]])), "scale");
            let cq: Vec<i8> = c[2..34].iter().map(|&v| v as i8).collect();
            assert_eq!(q, cq, "quants");
        }
    }

    fn check_type(ty: GgmlType, block_bytes: usize, f16_at: &[usize]) {
        let mut rng = Rng(0x1234_5678_9abc_def1 ^ block_bytes as u64);
        let (qk, lanes, afmt) = match ty {
            GgmlType::Q8_0 => (32, 4, GgmlType::Q8_0),
            GgmlType::Q4_0 | GgmlType::Q5_0 => (32, 2, GgmlType::Q8_0),
            GgmlType::Q4_1 | GgmlType::Q5_1 => (32, 2, GgmlType::Q8_1),
            _ => (256, 8, GgmlType::Q8_K),
        };
        let cols = 256 * 6;
        let nb = cols / qk;
        let x = acts(&mut rng, cols);
        let mut act = Vec::new();
        flea_quant::quantize_activations(afmt, &x, &mut act).unwrap();
        for _row in 0..8 {
            let mut w: Vec<u8> = (0..block_bytes * nb).map(|_| rng.next() as u8).collect();
            for b in 0..nb {
                for &o in f16_at {
                    let h = flea_quant::f32_to_f16(rng.f32() * 0.01 + 0.02);
                    w[b * block_bytes + o..b * block_bytes + o + 2]
                        .copy_from_slice(&h.to_le_bytes());
                }
            }
            let want = flea_quant::vec_dot(ty, cols, &w, &act);
            let (mut got, mut mag) = (0f32, 0f32);
            for b in 0..nb {
                let xb = &x[qk * b..qk * (b + 1)];
                let (q, d, sums, ys) = if qk == 256 {
                    let (q, d, sums) = act_q8k(xb);
                    (stored_quants(&q), d, stored_sums(&sums), 0.0)
                } else {
                    let (q, d, ys) = act_q8_0(xb);
                    (q, d, Vec::new(), ys)
                };
                let blk = &w[b * block_bytes..(b + 1) * block_bytes];
                for p in 0..lanes {
                    let v = match ty {
                        GgmlType::Q4_K => q4k_lane(blk, p, &q, d, &sums),
                        GgmlType::Q5_K => q5k_lane(blk, p, &q, d, &sums),
                        GgmlType::Q6_K => q6k_lane(blk, p, &q, d),
                        GgmlType::Q8_0 => q80_lane(blk, p, &q, d),
                        GgmlType::Q4_0 => q40_lane(blk, p, &q, d),
                        _ => legacy_lane(ty, blk, p, &q, d, ys),
                    };
                    got += v;
                    mag += v.abs();
                }
            }
            assert!(
                (got - want).abs() <= 1e-5 * mag.max(1e-30),
                "{ty}: lanes {got} vs cpu {want} (magnitude {mag})"
            );
        }
    }

    /// One warp's `mma.sync` with int8 operands as the PTX ISA lays out its fragments (lane
    /// = 4g + q): A reg r holds row g + 8(r & 1), k 4q + 16(r >> 1) + i (k = 16: regs 0, 1
    /// only); B reg r holds k 4q + 16r + i of column g; C c holds row g + 8(c >> 1), column
    /// 2q + (c & 1). `ua` / `ub`: unsigned bytes.
    fn mma(k: usize, a: &[[u32; 4]; 32], b: &[[u32; 2]; 32], ua: bool, ub: bool) -> [[i32; 4]; 32] {
        let byte = |w: u32, i: usize, u: bool| -> i32 {
            let v = (w >> (8 * i)) as u8;
            if u {
                v as i32
            } else {
                v as i8 as i32
            }
        };
        let (mut am, mut bm) = ([[0i32; 32]; 16], [[0i32; 8]; 32]);
        for lane in 0..32 {
            let (g, q) = (lane / 4, lane % 4);
            for r in 0..k / 8 {
                for i in 0..4 {
                    am[g + 8 * (r & 1)][4 * q + 16 * (r >> 1) + i] = byte(a[lane][r], i, ua);
                }
            }
            for r in 0..k / 16 {
                for i in 0..4 {
                    bm[4 * q + 16 * r + i][g] = byte(b[lane][r], i, ub);
                }
            }
        }
        let mut c = [[0i32; 4]; 32];
        for (lane, cl) in c.iter_mut().enumerate() {
            let (g, q) = (lane / 4, lane % 4);
            for (e, v) in cl.iter_mut().enumerate() {
                let (m, n) = (g + 8 * (e >> 1), 2 * q + (e & 1));
                *v = (0..k).map(|kk| am[m][kk] * bm[kk][n]).sum();
            }
        }
        c
    }

    /// kernels.cu `MmqQ4K::dot` / `MmqQ6K::dot` for one warp — 16 rows of `w` (row_bytes
    /// `rb`) against 8 tokens, super-block by super-block, lanes' registers built as the
    /// kernels build them and multiplied by [`mma`] — against flea-quant's dot of each row
    /// and token: pins the fragment, nibble and scale index math that only a GPU runs.
    #[allow(clippy::needless_range_loop)] // indices spelled as the kernel's (sb, lane, e)
    fn check_mmq(ty: GgmlType) {
        let mut rng = Rng(0x6d6d_7121 ^ ty as u64);
        let (bb, f16_at): (usize, &[usize]) = match ty {
            GgmlType::Q4_K => (144, &[0, 2]),
            _ => (210, &[208]),
        };
        let nb = 3;
        let cols = 256 * nb;
        let rb = bb * nb;
        let mut w: Vec<u8> = (0..16 * rb).map(|_| rng.next() as u8).collect();
        for blk in 0..16 * nb {
            for &o in f16_at {
                let h = flea_quant::f32_to_f16(rng.f32() * 0.01 + 0.02);
                w[blk * bb + o..blk * bb + o + 2].copy_from_slice(&h.to_le_bytes());
            }
        }
        // Token t's activations: act_q8k's stored quants, scales and sums per super-block.
        let mut toks = Vec::new();
        let mut cpu = Vec::new();
        for _ in 0..8 {
            let x = acts(&mut rng, cols);
            let mut a = Vec::new();
            flea_quant::quantize_activations(GgmlType::Q8_K, &x, &mut a).unwrap();
            cpu.push(a);
            toks.push(
                x.chunks(256)
                    .map(|xb| {
                        let (q, d, sums) = act_q8k(xb);
                        (stored_quants(&q), d, stored_sums(&sums))
                    })
                    .collect::<Vec<_>>(),
            );
        }
        let u64_at = |p: usize| (word(&w, p), word(&w, p + 4));
        // Each lane's sums and the sum of their terms' magnitudes (the float tolerance's scale).
        let (mut acc, mut mag) = ([[0f32; 4]; 32], [[0f32; 4]; 32]);
        for sb in 0..nb {
            let blk = |row: usize| row * rb + sb * bb;
            let mut isum = [[0i32; 4]; 32];
            if ty == GgmlType::Q4_K {
                // Sub-blocks 2j, 2j + 1: lane q's qs bytes 32j + 8q .. +8 of rows g, g + 8.
                let (m4, m6, m2h) = (0x0f0f_0f0fu32, 0x3f3f_3f3fu32, 0x3030_3030u32);
                let sc = |row: usize| {
                    let (y, z, ww) = (
                        word(&w, blk(row) + 4),
                        word(&w, blk(row) + 8),
                        word(&w, blk(row) + 12),
                    );
                    (
                        [y & m6, (ww & m4) | ((y >> 2) & m2h)],
                        [z & m6, ((ww >> 4) & m4) | ((z >> 2) & m2h)],
                    )
                };
                for j in 0..4 {
                    for half in 0..2 {
                        let mut a = [[0u32; 4]; 32];
                        let mut b = [[0u32; 2]; 32];
                        for lane in 0..32 {
                            let (g, q) = (lane / 4, lane % 4);
                            let (la, ha) = u64_at(blk(g) + 16 + 32 * j + 8 * q);
                            let (lb, hb) = u64_at(blk(g + 8) + 16 + 32 * j + 8 * q);
                            let sh = 4 * half as u32;
                            a[lane] = [
                                (la >> sh) & m4,
                                (lb >> sh) & m4,
                                (ha >> sh) & m4,
                                (hb >> sh) & m4,
                            ];
                            let xq = &toks[g][sb].0;
                            let o = 128 * half + 32 * j + 8 * q;
                            b[lane] = [q8(xq, o), q8(xq, o + 4)];
                        }
                        let c = mma(32, &a, &b, false, false);
                        let s = 2 * j + half;
                        for lane in 0..32 {
                            let g = lane / 4;
                            for e in 0..4 {
                                let row = g + 8 * (e >> 1);
                                let (scw, _) = sc(row);
                                let scale = (scw[s / 4] >> (8 * (s % 4))) & 0xff;
                                isum[lane][e] += c[lane][e] * scale as i32;
                            }
                        }
                    }
                }
                // The mins' mma: k = sub-block, sums split into low (u8) and high (s8) bytes.
                let mut a = [[0u32; 4]; 32];
                let (mut blo, mut bhi) = ([[0u32; 2]; 32], [[0u32; 2]; 32]);
                for lane in 0..32 {
                    let (g, q) = (lane / 4, lane % 4);
                    if q < 2 {
                        a[lane][0] = sc(g).1[q];
                        a[lane][1] = sc(g + 8).1[q];
                        let u = &toks[g][sb].2[8 * q..8 * q + 8];
                        // Sub-block 4q + i: stored 16-groups 4(i / 2) + i % 2 and that + 2.
                        let s: Vec<u32> = (0..4)
                            .map(|i| (u[4 * (i / 2) + i % 2] + u[4 * (i / 2) + i % 2 + 2]) as u32)
                            .collect();
                        blo[lane][0] =
                            u32::from_le_bytes([s[0] as u8, s[1] as u8, s[2] as u8, s[3] as u8]);
                        bhi[lane][0] = u32::from_le_bytes([
                            (s[0] >> 8) as u8,
                            (s[1] >> 8) as u8,
                            (s[2] >> 8) as u8,
                            (s[3] >> 8) as u8,
                        ]);
                    }
                }
                let (clo, chi) = (
                    mma(16, &a, &blo, true, true),
                    mma(16, &a, &bhi, true, false),
                );
                for lane in 0..32 {
                    let (g, q) = (lane / 4, lane % 4);
                    for e in 0..4 {
                        let row = g + 8 * (e >> 1);
                        let msum = clo[lane][e] + chi[lane][e] * 256;
                        let d = h2f(u16::from_le_bytes([w[blk(row)], w[blk(row) + 1]]));
                        let dmin = h2f(u16::from_le_bytes([w[blk(row) + 2], w[blk(row) + 3]]));
                        let dx = toks[2 * q + (e & 1)][sb].1;
                        let term = dx * (d * isum[lane][e] as f32 - dmin * msum as f32);
                        acc[lane][e] += term;
                        mag[lane][e] += term.abs();
                    }
                }
            } else {
                let (m4, m2) = (0x0f0f_0f0fu32, 0x0303_0303u32);
                let q6 =
                    |lo: u32, hi: u32| ((lo | (hi << 4)).wrapping_add(0x6060_6060)) ^ 0x8080_8080;
                for nn in 0..2 {
                    for c4 in 0..4 {
                        for h in 0..2 {
                            let g16 = 8 * nn + 2 * c4 + h;
                            let mut a = [[0u32; 4]; 32];
                            let mut b = [[0u32; 2]; 32];
                            for lane in 0..32 {
                                let (g, q) = (lane / 4, lane % 4);
                                for (r, row) in [g, g + 8].into_iter().enumerate() {
                                    let ql = word(
                                        &w,
                                        blk(row) + 64 * nn + 32 * (c4 & 1) + 16 * h + 4 * q,
                                    );
                                    let qh = word(&w, blk(row) + 128 + 32 * nn + 16 * h + 4 * q);
                                    a[lane][r] =
                                        q6((ql >> (4 * (c4 >> 1))) & m4, (qh >> (2 * c4)) & m2);
                                }
                                let o = 128 * (c4 & 1) + 64 * nn + 32 * (c4 >> 1) + 16 * h + 4 * q;
                                b[lane][0] = q8(&toks[g][sb].0, o);
                            }
                            let c = mma(16, &a, &b, false, false);
                            for lane in 0..32 {
                                let g = lane / 4;
                                for e in 0..4 {
                                    let row = g + 8 * (e >> 1);
                                    isum[lane][e] +=
                                        c[lane][e] * (w[blk(row) + 192 + g16] as i8 as i32);
                                }
                            }
                        }
                    }
                }
                for lane in 0..32 {
                    let (g, q) = (lane / 4, lane % 4);
                    for e in 0..4 {
                        let row = g + 8 * (e >> 1);
                        let d = h2f(u16::from_le_bytes([w[blk(row) + 208], w[blk(row) + 209]]));
                        let term = toks[2 * q + (e & 1)][sb].1 * (d * isum[lane][e] as f32);
                        acc[lane][e] += term;
                        mag[lane][e] += term.abs();
                    }
                }
            }
        }
        for lane in 0..32 {
            let (g, q) = (lane / 4, lane % 4);
            for e in 0..4 {
                let (row, tok) = (g + 8 * (e >> 1), 2 * q + (e & 1));
                let want = flea_quant::vec_dot(ty, cols, &w[row * rb..(row + 1) * rb], &cpu[tok]);
                let got = acc[lane][e];
                assert!(
                    (got - want).abs() <= 1e-5 * mag[lane][e].max(1e-30),
                    "{ty} row {row} token {tok}: mma mirror {got} vs cpu {want}"
                );
            }
        }
    }

    #[test]
    fn mmq_q4k_fragment_math_matches_cpu_dot() {
        check_mmq(GgmlType::Q4_K);
    }

    #[test]
    fn mmq_q6k_fragment_math_matches_cpu_dot() {
        check_mmq(GgmlType::Q6_K);
    }

    #[test]
    fn q4k_lane_math_matches_cpu_dot() {
        check_type(GgmlType::Q4_K, 144, &[0, 2]);
    }

    #[test]
    fn q6k_lane_math_matches_cpu_dot() {
        check_type(GgmlType::Q6_K, 210, &[208]);
    }

    #[test]
    fn q5k_lane_math_matches_cpu_dot() {
        check_type(GgmlType::Q5_K, 176, &[0, 2]);
    }

    #[test]
    fn q8_0_lane_math_matches_cpu_dot() {
        check_type(GgmlType::Q8_0, 34, &[0]);
    }

    #[test]
    fn q4_0_lane_math_matches_cpu_dot() {
        check_type(GgmlType::Q4_0, 18, &[0]);
    }

    #[test]
    fn q5_0_lane_math_matches_cpu_dot() {
        check_type(GgmlType::Q5_0, 22, &[0]);
    }

    #[test]
    fn q4_1_lane_math_matches_cpu_dot() {
        check_type(GgmlType::Q4_1, 20, &[0, 2]);
    }

    #[test]
    fn q5_1_lane_math_matches_cpu_dot() {
        check_type(GgmlType::Q5_1, 24, &[0, 2]);
    }

    /// The Q8_1 block sum the kernels use equals flea-quant's.
    #[test]
    fn act_q8_1_sum_matches_cpu_quantizer() {
        let mut rng = Rng(0x0bad_cafe_f00d_d00d);
        let x = acts(&mut rng, 1024);
        let mut cpu = Vec::new();
        flea_quant::quantize_activations(GgmlType::Q8_1, &x, &mut cpu).unwrap();
        for (blk, c) in x.chunks(32).zip(cpu.chunks(36)) {
            let (q, d, s) = act_q8_0(blk);
            assert_eq!(d, h2f(u16::from_le_bytes([c[0], c[1]])), "scale");
            assert_eq!(s, h2f(u16::from_le_bytes([c[2], c[3]])), "sum");
            let cq: Vec<i8> = c[4..36].iter().map(|&v| v as i8).collect();
            assert_eq!(q, cq, "quants");
        }
    }

    /// The kernel source compiles with NVRTC and lib.rs's options (no GPU needed: NVRTC is a
    /// plain library). Skips when libnvrtc is not found, unless FLEA_REQUIRE_NVRTC is set
    /// (scripts/test.sh installs NVRTC from pip and sets it).
    #[test]
    fn kernels_compile_with_nvrtc() {
        if !crate::libraries().nvrtc {
            assert!(
                std::env::var_os("FLEA_REQUIRE_NVRTC").is_none(),
                "FLEA_REQUIRE_NVRTC is set but libnvrtc was not found"
            );
            println!("SKIP: no libnvrtc");
            return;
        }
        let cubin = crate::nvrtc_compile(crate::KERNELS, "sm_90").unwrap();
        assert!(!cubin.is_empty());
    }

    #[test]
    fn mmq_split_covers_each_unit_once_and_meets_in_block_order() {
        // The kernels' stream-K split, walked as each block walks it (mmq_impl): every unit
        // once; a split row block's segments in the slots the last block reads, in block
        // order; never more than two partial slots a block.
        for blocks in 1..=9 {
            for chunks in 1..=7 {
                let units = blocks * chunks;
                for want in 1..=units + 2 {
                    let grid = mmq_grid(MmqGrid::Fixed(want), blocks, chunks, 132);
                    assert!(grid >= 1 && grid <= units);
                    let mut covered = vec![0; units];
                    let mut written: Vec<Vec<(usize, usize)>> = vec![Vec::new(); blocks];
                    let mut slots = std::collections::HashSet::new();
                    for b in 0..grid {
                        let (mut u, end) = (
                            mmq_unit_start(b, units, grid),
                            mmq_unit_start(b + 1, units, grid),
                        );
                        let mut first = true;
                        while u < end {
                            let (blk, c0) = (u / chunks, u % chunks);
                            let c1 = chunks.min(c0 + (end - u));
                            for c in c0..c1 {
                                covered[blk * chunks + c] += 1;
                            }
                            if c0 != 0 || c1 != chunks {
                                let slot = 2 * b + usize::from(!first);
                                assert!(slots.insert(slot), "slot {slot} written twice");
                                written[blk].push((b, slot));
                            }
                            u += c1 - c0;
                            first = false;
                        }
                    }
                    assert!(covered.iter().all(|&c| c == 1), "{blocks} {chunks} {grid}");
                    for (blk, segs) in written.iter().enumerate() {
                        let bf = mmq_block_of(blk * chunks, units, grid);
                        let bl = mmq_block_of(blk * chunks + chunks - 1, units, grid);
                        if segs.is_empty() {
                            assert_eq!(bf, bl);
                            continue;
                        }
                        let read: Vec<(usize, usize)> = (bf..=bl)
                            .map(|bb| {
                                let own = mmq_unit_start(bb, units, grid) >= blk * chunks;
                                (bb, 2 * bb + usize::from(!own))
                            })
                            .collect();
                        assert_eq!(segs, &read, "{blocks} {chunks} {grid} {blk}");
                    }
                }
            }
        }
        // One block a row block is the plain launch; per SM caps at the units.
        assert_eq!(mmq_grid(MmqGrid::RowBlocks, 160, 5, 132), 160);
        assert_eq!(mmq_grid(MmqGrid::PerSm(2), 160, 5, 132), 264);
        assert_eq!(mmq_grid(MmqGrid::PerSm(2), 3, 2, 132), 6);
        assert_eq!(mmq_grid(MmqGrid::PerSm(2), 160, 5, 0), 160);
        // The kernel's 32-bit unit arithmetic: a split whose grid * units passes 2^32 falls
        // back to a block a row block (never met by real shapes: 13b gate/up is 4320 * 264).
        assert_eq!(mmq_grid(MmqGrid::Fixed(70_000), 40_000, 2, 132), 40_000);
        assert_eq!(mmq_grid(MmqGrid::Fixed(50_000), 40_000, 2, 132), 50_000);
    }

    /// Q4_K_M's two types skip the GEMM warm-up up to the mmq kernels' limit; any other type,
    /// or the kernels off, keeps it down to the few-token kernels' limit.
    #[test]
    fn gemm_warm_up_starts_above_the_rows_our_kernels_take() {
        use GgmlType::*;
        assert_eq!(
            own_kernel_rows_max(true, [Q4_K, Q6_K, Q4_K]),
            MMQ_MAX_TOKENS
        );
        assert_eq!(own_kernel_rows_max(false, [Q4_K, Q6_K]), MAX_TOKENS);
        assert_eq!(own_kernel_rows_max(true, [Q4_K, Q8_0]), MAX_TOKENS);
        assert_eq!(own_kernel_rows_max(true, []), MAX_TOKENS);
    }

    /// The host's `mmq_*` geometry is the kernels': the defaults of kernels.cu's `MMQ_RG`,
    /// `MMQ_KP` and `MMQ_CSB_*` (a harness may override them; flea never does).
    #[test]
    fn mmq_geometry_matches_the_kernel_source() {
        let default_of = |name: &str| -> usize {
            let src = crate::KERNELS;
            let at = src
                .find(&format!("#define {name} "))
                .unwrap_or_else(|| panic!("{name} not defined in kernels.cu"));
            src[at..]
                .lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name}: no number"))
        };
        assert_eq!(default_of("MMQ_RG"), MMQ_RG);
        assert_eq!(default_of("MMQ_KP"), MMQ_KP);
        assert_eq!(default_of("MMQ_CSB_Q4K"), MMQ_CSB_Q4K);
        assert_eq!(default_of("MMQ_CSB_Q6K"), MMQ_CSB_Q6K);
    }

    /// The tensor-core kernels' token tiles (the fewest 8-token tiles that hold n, one block
    /// up to the host's limit) and shared memory: two chunk buffers under an sm_80+ opt-in,
    /// large enough for the partial sums of the warps that hand theirs over (kernels.cu
    /// `mmq_impl`), and every routed kernel name loaded at start.
    #[test]
    fn mmq_tiles_shared_memory_and_names() {
        let tiles: Vec<usize> = [2, 8, 9, 16, 17, 32]
            .iter()
            .map(|&n| mmq_tiles(n))
            .collect();
        assert_eq!(tiles, [1, 1, 2, 2, 4, 4]);
        assert!(MMQ_MAX_TOKENS <= 8 * MMQ_TILES[MMQ_TILES.len() - 1]);
        for &t in &MMQ_TILES {
            for ty in [GgmlType::Q4_K, GgmlType::Q6_K] {
                let smem = mmq_smem_bytes(t, ty);
                assert!(smem <= 99 * 1024, "{t} tiles: {smem} bytes");
                // The partial sums the warps of kp > 0 hand over through the buffers.
                let partials = (MMQ_KP - 1) * MMQ_RG * t * 4 * 32 * 4;
                assert!(partials <= smem);
            }
        }
        let cw = MMQ_KP * MMQ_CSB_Q4K;
        assert_eq!(
            mmq_smem_bytes(4, GgmlType::Q4_K),
            2 * 32 * (cw * 256 + 32 + 16 * cw * 4 + cw * 4)
        );
        let names = kernel_names();
        for s in MMQ_SUFFIXES {
            for t in MMQ_TILES {
                assert!(names.contains(&format!("mmq_{s}_{t}")), "mmq_{s}_{t}");
            }
        }
    }

    #[test]
    fn mixed_kernels_pair_a_first_type_with_its_second() {
        assert_eq!(
            mixed_kernel("mmvq_q4_k", "mmvq_q6_k_soa"),
            Some("mmvq_q4_k_q6_k_soa")
        );
        assert_eq!(
            mixed_kernel("mmvq_q5_0", "mmvq_q8_0"),
            Some("mmvq_q5_0_q8_0")
        );
        // The second type never leads, and other pairs do not mix.
        assert_eq!(mixed_kernel("mmvq_q8_0", "mmvq_q5_0"), None);
        assert_eq!(mixed_kernel("mmvq_q4_k", "mmvq_q8_0"), None);
    }

    #[test]
    fn launch_groups_take_later_jobs_of_the_same_kernel_then_the_second_type() {
        // Kernels by letter; 'b' joins an 'a' group as the second type.
        let ks = [
            Some('a'),
            Some('c'),
            None,
            Some('b'),
            Some('a'),
            Some('a'),
            Some('c'),
        ];
        let joins = |lead: &char, other: &char| match (lead, other) {
            (l, o) if l == o => Joins::Same,
            ('a', 'b') => Joins::Second,
            _ => Joins::No,
        };
        let mut done = 0u64;
        let groups = launch_groups(&ks, MAX_JOBS, &mut done, joins);
        assert_eq!(
            groups,
            vec![
                vec![(0, false), (4, false), (5, false)],
                vec![(1, false), (6, false)],
                vec![(3, false)],
            ]
        );
        assert_eq!(done, 0b111_1011);
        // Two a group: the second type waits for room; jobs already done stay out.
        let mut done = 1 << 5;
        let groups = launch_groups(&ks, 2, &mut done, joins);
        assert_eq!(
            groups,
            vec![
                vec![(0, false), (4, false)],
                vec![(1, false), (6, false)],
                vec![(3, false)],
            ]
        );
        let mut done = 0u64;
        let groups = launch_groups(&ks[..4], 3, &mut done, joins);
        assert_eq!(groups, vec![vec![(0, false), (3, true)], vec![(1, false)]]);
        // One a group: every job alone.
        let mut done = 0u64;
        assert_eq!(launch_groups(&ks, 1, &mut done, joins).len(), 6);
    }

    #[test]
    fn whole_row_kernels_for_rows_of_four_or_five_q4_k_steps() {
        assert_eq!(whole_row_steps("q4_k", 5120), Some(5));
        assert_eq!(whole_row_steps("q4_k_q6_k_soa", 4096), Some(4));
        assert_eq!(whole_row_steps("q4_k", 8192), None);
        assert_eq!(whole_row_steps("q4_k", 3072), None);
        assert_eq!(whole_row_steps("q4_k", 4608), None);
        assert_eq!(whole_row_steps("q6_k_soa", 5120), None);
        for steps in WHOLE_ROW_STEPS {
            for suffix in WHOLE_ROW_SUFFIXES {
                let name = format!("mmvqw{steps}_{suffix}");
                assert!(kernel_names().contains(&name), "{name}");
            }
        }
    }

    /// Every kernel the host may launch is in the list loaded at start.
    #[test]
    fn routed_kernels_are_loaded() {
        let names = kernel_names();
        for ty in [
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q5_0,
            GgmlType::Q4_1,
            GgmlType::Q5_1,
            GgmlType::F16,
            GgmlType::BF16,
        ] {
            let (name, _, _) = kernel_for(ty).unwrap();
            for pre in ["mmvq_", "mmvq2_", "mmvq8_"] {
                let k = name.replacen("mmvq_", pre, 1);
                assert!(names.contains(&k), "{k} not loaded");
            }
        }
        assert!(kernel_for(GgmlType::Q2_K).is_none() && kernel_for(GgmlType::F32).is_none());
    }

    #[test]
    fn act_layout_parts_are_aligned_and_disjoint() {
        for block in [32usize, 256] {
            for total in [256usize, 512, 4096, 5 * 5120, 13824] {
                let l = act_layout(total, block);
                assert!(l.d_off >= total && l.d_off.is_multiple_of(256));
                assert!(l.s_off >= l.d_off + total / block * 4 && l.s_off.is_multiple_of(256));
                assert!(l.bytes >= l.s_off + total / 16 * 4);
            }
        }
    }
}
