//! The CUDA backend of flea.
//!
//! * Libraries are loaded at run time (cudarc `dynamic-loading`): the crate builds and its
//!   tests run on machines without CUDA; [`CudaBackend::new`] then returns an error.
//! * Kernels (`kernels.cu`) are compiled once per process with NVRTC for the device's
//!   architecture and cached on disk by source hash (`~/.cache/flea/cuda/<hash>-sm_XX.cubin`).
//! * Under the streaming executor (`UnitStaging`, `staging.rs`) weights live in device memory
//!   the executor placed them in — resident copies and a ring of slots filled on a copy
//!   stream — and weight views resolve to them by address. Used directly (a plain
//!   `Session`), weights are uploaded on first use and cached by host slice (pointer,
//!   length): the model's mmap is stable for its life.
//! * Activations are f32 device buffers; the KV cache is F16.
//! * Matmuls: up to 8 tokens → wide-load kernels (`mmvq.rs`; int8 `__dp4a` on activations
//!   quantized like the CPU's for Q4_K Q5_K Q6_K Q8_0 Q4_0 Q5_0 Q4_1 Q5_1, f32 FMA for F16
//!   and BF16); for other types a warp-per-row matvec that dequantizes on the fly; more
//!   tokens → the weight is dequantized to F16 into a scratch buffer and multiplied with
//!   cuBLAS (F16 × F16 → F32). Activations are rounded the way the CPU backend quantizes them
//!   for its dot products (Q8_0 / Q8_K / F16 / BF16), so both backends compute the same
//!   function up to summation order.

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use flea_gguf::GgmlType;
use flea_model::backend::{AttnParams, Backend, KvShape, QkvBias, RopeParams, Row};
use flea_model::config::{FfnActivation, RopeStyle};
use flea_model::weights::Weight;
use flea_model::{ModelError, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Launches kernel `name` on the compute stream with the listed arguments (profile marks
/// and the error check included). Defined before the modules so mmvq.rs can use it.
macro_rules! launch {
    // With launch attributes of the caller's (`launch_with`) instead of the default ones.
    ($s:expr, $name:expr, $cfg:expr, $attrs:expr; $($arg:ident),*) => {{
        let name: &str = $name;
        let mut params = [$( &$arg as *const _ as *mut std::ffi::c_void ),*];
        // SAFETY: as in the arm below (the callers check the buffers; params are locals).
        unsafe { $s.launch_with(name, $cfg, $attrs, &mut params) }
    }};
    ($s:expr, $name:expr, $cfg:expr; $($arg:ident),*) => {{
        let name: &str = $name;
        let mut params = [$( &$arg as *const _ as *mut std::ffi::c_void ),*];
        // SAFETY: every caller checks its buffers' shapes against the kernel's indexing
        // (check_rows, the weight's byte count) before launching; `params` points at
        // locals of the kernel's parameter types, alive for the call.
        unsafe { $s.launch_kernel(name, $cfg, &mut params) }
    }};
}

mod chain;
mod fused;
mod gaps;
mod graph;
pub use graph::GraphCounts;
mod mmvq;
pub use mmvq::MmqGrid;
pub mod probe;
mod profile;
pub use profile::{KernelTime, ProfileReport};
mod staging;
pub use staging::CudaStaged;

const KERNELS: &str = include_str!("kernels.cu");

/// Every kernel of kernels.cu the backend loads at start (a launch of any other name fails).
fn kernel_names() -> Vec<String> {
    let mut names: Vec<String> = PLAIN_KERNELS.iter().map(|s| s.to_string()).collect();
    names.extend(mmvq::kernel_names());
    for s in TYPE_SUFFIXES {
        for k in ["matvec", "deq_f16", "deq_f32", "embed"] {
            names.push(format!("{k}_{s}"));
        }
    }
    names
}

/// A CUDA setup or runtime failure, as one line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct CudaError(pub String);

fn be(msg: impl Into<String>) -> ModelError {
    ModelError::Backend(msg.into())
}

/// Which CUDA libraries can be loaded here (checked without touching cudarc's panicking
/// loaders).
#[derive(Clone, Copy, Debug)]
pub struct Libraries {
    pub driver: bool,
    pub nvrtc: bool,
    pub cublas: bool,
}

/// Probe libcuda, libnvrtc and libcublas with dlopen.
pub fn libraries() -> Libraries {
    // SAFETY: these only try to dlopen the candidate library names.
    unsafe {
        Libraries {
            driver: cudarc::driver::sys::is_culib_present(),
            nvrtc: cudarc::nvrtc::sys::is_culib_present(),
            cublas: cudarc::cublas::sys::is_culib_present(),
        }
    }
}

/// Number of CUDA devices (0 when the driver is missing or fails to initialise).
pub fn device_count() -> usize {
    if !libraries().driver {
        return 0;
    }
    CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .unwrap_or(0)
}

/// Kernel names suffix per weight type, and how activations are rounded for it.
fn type_info(ty: GgmlType) -> Option<(&'static str, i32)> {
    use GgmlType::*;
    Some(match ty {
        F32 => ("f32", 0),
        F16 => ("f16", 3),
        BF16 => ("bf16", 4),
        Q4_0 => ("q4_0", 1),
        Q4_1 => ("q4_1", 1),
        Q5_0 => ("q5_0", 1),
        Q5_1 => ("q5_1", 1),
        Q8_0 => ("q8_0", 1),
        Q2_K => ("q2_k", 2),
        Q3_K => ("q3_k", 2),
        Q4_K => ("q4_k", 2),
        Q5_K => ("q5_k", 2),
        Q6_K => ("q6_k", 2),
        _ => return None,
    })
}

const TYPE_SUFFIXES: [&str; 13] = [
    "f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k",
    "q6_k",
];
const PLAIN_KERNELS: [&str; 53] = [
    "act_round",
    "argmax_slot",
    "topk_part",
    "topk_slot",
    "vocab_gather",
    "vocab_max",
    "vocab_mass",
    "vocab_top_p_gather",
    "vocab_top_p",
    "vocab_tiles",
    "vocab_pick",
    "attn_cluster",
    "attn_cluster_v16",
    "attn_cluster_v36",
    "attn_cluster_v64",
    "attn_cluster_h256",
    "attn_cluster_v16_h256",
    "attn_cluster_v36_h256",
    "attn_cluster_v64_h256",
    "attn_cluster16_v64",
    "attn_stream16",
    "fd_decode",
    "deq_f16_q6_k_soa",
    "deq_f32_q6_k_soa",
    "rms_norm",
    "rms_norm4",
    "rms_norm4_add",
    "rms_norm_q8k",
    "rms_norm_q8_0",
    "attn_split_scores",
    "attn_split_pv",
    "attn_split_fused",
    "attn_split_fused8",
    "attn_rows",
    "add_bias",
    "add",
    "glu",
    "glu_q8k",
    "glu_q8_0",
    "rope",
    "rope_qk",
    "kv_store",
    "rope_kv",
    "head_norm_rope_kv",
    "attention",
    "attention_tiled",
    "attention_tiled_long",
    "attention_smem",
    "attention_mma_h64",
    "attention_mma_h128",
    "attention_mma_h256",
    "copy_f4",
    "store_i32x4",
];

/// Weight types the CUDA backend can multiply with.
pub fn supported_types() -> Vec<GgmlType> {
    use GgmlType::*;
    vec![
        F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
    ]
}

/// An activation matrix in device memory: `rows` × `width` f32.
pub struct CudaAct {
    buf: CudaSlice<f32>,
    ptr: u64,
    pub rows: usize,
    pub width: usize,
}

/// Device memory from the driver's own allocator (cuMemAlloc), outside the stream-ordered
/// pool: freed, it goes back to the driver at once, where the pool would keep a block as
/// long as any allocation carved from it lives (a shared KV cache frees every other
/// layer's buffers, and the room they leave must hold resident weights).
struct DriverAlloc {
    ptr: u64,
    ctx: Arc<CudaContext>,
}

impl DriverAlloc {
    /// `bytes` of zeros.
    fn zeroed(
        ctx: &Arc<CudaContext>,
        bytes: usize,
    ) -> std::result::Result<Self, cudarc::driver::DriverError> {
        ctx.bind_to_thread()?;
        // SAFETY: a fresh allocation of `bytes` (at least 1), cleared before anyone reads it.
        let ptr = unsafe { cudarc::driver::result::malloc_sync(bytes.max(1)) }?;
        let a = DriverAlloc {
            ptr,
            ctx: Arc::clone(ctx),
        };
        // SAFETY: ptr holds bytes.max(1) bytes.
        unsafe { cudarc::driver::result::memset_d8_sync(ptr, 0, bytes.max(1)) }?;
        Ok(a)
    }
}

impl Drop for DriverAlloc {
    fn drop(&mut self) {
        // Work queued on the buffer finishes first (a cache goes rarely: at the end of a
        // run, or when layers start sharing one).
        let _ = self.ctx.synchronize();
        // SAFETY: ptr came from malloc_sync, is freed once, and nothing queued uses it now.
        let _ = self
            .ctx
            .bind_to_thread()
            .and_then(|_| unsafe { cudarc::driver::result::free_sync(self.ptr) });
    }
}

/// The F16 K and V caches, one buffer per layer, [sequence slot][position][kv_dim]; layers
/// given `share_kv_layers` point at the first shared layer's buffers and own none.
pub struct CudaKv {
    pub shape: KvShape,
    _k: Vec<Option<DriverAlloc>>,
    _v: Vec<Option<DriverAlloc>>,
    kp: Vec<u64>,
    vp: Vec<u64>,
}

#[derive(Default)]
struct Scratch {
    /// Dequantized F16 (fast) or F32 (precise) weight for cuBLAS.
    wh: Option<CudaSlice<u16>>,
    wf: Option<CudaSlice<f32>>,
    /// Rounded activations, f32 (matvec) and f16 (GEMM).
    xr: Option<CudaSlice<f32>>,
    xh: Option<CudaSlice<u16>>,
    /// Int8 activations for the mmvq kernels.
    xq: mmvq::ActScratch,
    tokens: Option<CudaSlice<i32>>,
    /// Embedding rows of one batch (under the executor).
    emb: Option<CudaSlice<u8>>,
    /// Per-row positions and cache base rows (sequence slot × n_ctx) of the batch.
    rowpos: Option<CudaSlice<i32>>,
    rowbase: Option<CudaSlice<i32>>,
    /// Cache row each row of k/v is stored to.
    rowkv: Option<CudaSlice<i32>>,
    /// Tile starts of `attention_tiled` (RowBuf::Tiles).
    rowtiles: Option<CudaSlice<i32>>,
    /// Split attention's scores, chunk stats and partial outputs (at most ATTN_SPLIT_MAX_BYTES).
    attn_split: Option<CudaSlice<f32>>,
    /// Split attention's finished-chunk counter per (row, head): zero between launches.
    attn_done: Option<CudaSlice<i32>>,
    /// What each of rowpos / rowbase / rowkv / rowtiles holds now: every layer of a pass
    /// uses the same rows, so they are uploaded once per pass, not before every kernel (a
    /// pageable upload stalls the host and breaks the queue of launches).
    rows_on_device: [Vec<i32>; 4],
}

/// Which per-row buffer of the scratch an upload fills.
#[derive(Clone, Copy)]
enum RowBuf {
    Pos,
    Base,
    Kv,
    /// First row of each tile of `attention_tiled`, then the row count.
    Tiles,
}

/// Uploaded host slices: (address, length) → (content fingerprint, device copy).
type DeviceCache<T> = HashMap<(usize, usize), (u64, CudaSlice<T>)>;

/// Host memory the GPU reads directly (mapped, pinned): small activations handed over from
/// the CPU travel through it by a kernel's loads, not by the copy engine, whose queue may
/// hold hundreds of megabytes of streamed units.
struct Handover {
    host: usize,
    dev: u64,
    bytes: usize,
    /// Recorded after the kernel that reads the buffer; waited for before it is rewritten.
    read: cudarc::driver::CudaEvent,
}

const HANDOVER_BYTES: usize = 4 << 20;

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if let Some(line) = self.gaps.as_ref().and_then(|g| g.report()) {
            eprintln!("{line}");
        }
        if std::env::var_os("FLEA_CUDA_WAIT").is_some() {
            let n = self.reads.load(Ordering::Relaxed);
            let ms = self.read_wait_ns.load(Ordering::Relaxed) as f64 * 1e-6;
            eprintln!(
                "cuda: the host waited {ms:.1} ms for results in {n} reads ({:.3} ms each)",
                ms / n.max(1) as f64
            );
            let g = self.graph_counts();
            eprintln!(
                "cuda: {} decode passes launched as graphs ({} instantiated, {} recordings failed)",
                g.launched, g.instantiated, g.failed
            );
        }
        if let Some(t) = self.fused_trace.as_ref().and_then(|t| t.lock().ok()) {
            eprint!("{}", t.report());
        }
        // Graph executables go while the context is sure to be alive.
        if let Ok(g) = self.pass_graphs.get_mut() {
            *g = graph::PassGraphs::default();
        }
        if let Some(h) = self.handover.get_mut().ok().and_then(|h| h.take()) {
            let _ = h.read.synchronize();
            // SAFETY: h.host came from malloc_host and no kernel reads it any more.
            let _ = unsafe { cudarc::driver::result::free_host(h.host as *mut _) };
        }
    }
}

/// The CUDA backend. See the crate docs.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: Option<cudarc::cublas::CudaBlas>,
    funcs: HashMap<String, CudaFunction>,
    weights: Mutex<DeviceCache<u8>>,
    /// Host ranges the executor has placed in device memory (see staging.rs), and how many
    /// times they changed.
    mappings: Mutex<Vec<staging::Mapping>>,
    map_generation: AtomicU64,
    resident: Mutex<Vec<CudaSlice<u8>>>,
    /// Device addresses of resident Q6_K weights stored in the repacked layout (Q6KS in
    /// kernels.cu, `staging::repack_q6k`).
    repacked: Mutex<std::collections::HashSet<u64>>,
    ring: Mutex<Option<staging::DeviceRing>>,
    /// Set once an executor places units: every weight must then be mapped.
    staging: std::sync::atomic::AtomicBool,
    /// Mapped pinned host memory through which `write` hands the hidden state over.
    handover: Mutex<Option<Handover>>,
    /// A chained greedy decode's token slots (chain.rs), made on first use.
    token_slots: Mutex<Option<chain::TokenSlots>>,
    /// Page-locked staging of a pass's row positions (chain.rs), made on first use.
    small_uploads: Mutex<Option<chain::SmallUploads>>,
    /// Host-to-device copies of streamed units, beside the compute stream.
    copy_stream: Arc<CudaStream>,
    vectors: Mutex<DeviceCache<f32>>,
    scratch: Mutex<Scratch>,
    ordinal: usize,
    device_name: String,
    cc: (i32, i32),
    sync_each: bool,
    /// Programmatic dependent launch: sm_90 or later, unless FLEA_CUDA_PDL=0.
    pdl: bool,
    /// Fused decode kernels (norm + Q8_K quantisation, RoPE of q and k in one launch, mat-vec
    /// adding into the residual); FLEA_CUDA_FUSE=0 turns them off for comparisons.
    fusion: std::sync::atomic::AtomicBool,
    /// Single fusions turned off for A/B comparisons (FLEA_CUDA_FUSE_OFF, see `FusionsOff`).
    fusions_off: FusionsOff,
    /// Most blocks of `attn_split_fused` (one chunk per block) and `attn_split_fused8` (up to
    /// ATTN_MAX_CPB) resident at once on this device, and the numbers the launches assume
    /// (at most those; tests lower them).
    fused_attention_cap: [usize; 2],
    /// Most keys one `attention_tiled` tile may see (its shared memory per block, opted in
    /// at start; 0: never used).
    tiled_attention_max_span: usize,
    /// The same for `attention_tiled_long`'s chunks (0: not on this device).
    tiled_attention_long_room: usize,
    /// Whether prompts may take the tensor-core attention (`attention_mma_h*`: sm_80+, each
    /// kernel's shared memory opted in; tests turn it off to check the other kernels), and
    /// its launches so far.
    mma_attention_fits: bool,
    mma_attention: std::sync::atomic::AtomicBool,
    mma_attention_calls: AtomicU64,
    /// Dynamic shared memory `attn_cluster` may use per block (opted in at start; 0 before
    /// sm_90 or if the opt-in fails: never used).
    cluster_attention_room: usize,
    /// The same for the 256-dim kernels (`attn_cluster*_h256`).
    cluster_attention_room_h256: usize,
    /// Dynamic shared memory `attn_cluster16_v64` may use per block where the device runs its
    /// 16-block clusters (0: it does not). Decode takes it only with the streaming kernel off
    /// (FLEA_CUDA_ATTN_STREAM): from ATTN_CLUSTER_MAX_KEYS + 1 keys to
    /// ATTN_WIDE_CLUSTER_MAX_KEYS, then the split attention.
    wide_cluster_room: usize,
    /// Keys from which a decode row takes the 16-block clusters (ATTN_CLUSTER_MAX_KEYS + 1;
    /// tests lower it).
    wide_cluster_from: AtomicUsize,
    /// Dynamic shared memory `attn_stream16` may use per block where the device runs its
    /// 16-block clusters (0: it does not), the keys from which a decode row takes it as set
    /// at start (FLEA_CUDA_ATTN_STREAM, `keys_setting`), and as now (tests set it).
    stream_attention_room: usize,
    stream_attention_default: usize,
    stream_attention_from: AtomicUsize,
    /// The keys from which a batch of decode rows takes `attn_rows` (one block a (head,
    /// row)) instead of the split attention, as set at start (FLEA_CUDA_ATTN_ROWS,
    /// `keys_setting`) and as now (tests set it).
    rows_attention_default: usize,
    rows_attention_from: AtomicUsize,
    /// The fewest blocks (rows × heads) a batch's grid has for `attn_rows`
    /// (ATTN_ROWS_MIN_BLOCKS_PER_SM an SM; tests lower it), and its launches so far (tests
    /// check it was taken).
    rows_attention_min_blocks: AtomicUsize,
    rows_attention_calls: AtomicU64,
    /// `attn_cluster_v*` (V in registers, K alone in shared memory) instead of `attn_cluster`
    /// where its keys fit: on unless FLEA_CUDA_ATTN_VREG=off (attention_vreg_setting).
    cluster_attention_vreg: std::sync::atomic::AtomicBool,
    /// How the `attn_cluster_v*` kernels' shared-memory carve-out is chosen.
    cluster_attention_vreg_mode: AttnVreg,
    /// The carve-out (percent) last set on the `attn_cluster_v*` kernels (-1: none yet).
    cluster_attention_carveout: std::sync::atomic::AtomicI32,
    /// The SM's shared-memory facts the carve-out follows from (None: a query failed).
    sm_shared: Option<SmShared>,
    /// Dynamic shared memory every `mmq_*` kernel was opted into (0: not on this device).
    pub(crate) mmq_smem_room: usize,
    /// Whether single decode rows may take `attn_cluster` (tests turn it off to check the
    /// split kernels too), and its launches so far (tests check it was taken).
    cluster_attention: std::sync::atomic::AtomicBool,
    cluster_attention_calls: AtomicU64,
    /// `output_feeds`'s hint for the next norm, attention or GLU: the int8 format the
    /// matmul reading its output wants (FEEDS_*), taken by that step or cleared by a matmul.
    feeds: AtomicU8,
    /// Whether norms, attention and GLU quantise their outputs to Q8_0 for Q8_0-type
    /// mat-vecs (on unless FLEA_CUDA_FUSE_OFF names `q8_0`; tests compare both).
    q8_0_fusion: std::sync::atomic::AtomicBool,
    /// Launches that left a Q8_0 quantisation for the next mat-vec (norm, attention, GLU).
    q8_0_fused: AtomicU64,
    fused_attention_blocks: [AtomicUsize; 2],
    /// Counts launches (and host writes into activations): a fused norm's quantisation is
    /// reused only if nothing ran between it and the mat-vec.
    launch_serial: AtomicU64,
    /// What the last rms_norm_q8k left in the Q8_K scratch.
    prequant: Mutex<Option<Prequant>>,
    /// Most weight elements one cuBLAS pass dequantizes (the scratch the planner reserved:
    /// set by `scratch_bytes`); larger matrices go in row chunks. 0: no limit.
    gemm_cap: AtomicUsize,
    /// FLEA_CUDA_ATTN=single: one block per (head, row) even for decode (for comparisons).
    single_block_attention: bool,
    /// The fused resident decode (fused.rs): off unless FLEA_CUDA_FUSED_DECODE=1; whether
    /// this device can run it (sm_90+, its shared memory opted in, one block per SM
    /// resident); its tables for the current model; the SM count (its grid).
    fused_decode: std::sync::atomic::AtomicBool,
    fused_decode_fits: bool,
    fused: Mutex<Option<fused::FusedDecode>>,
    sms: usize,
    /// Decode steps run through the fused decode (tests check it was taken).
    fused_steps: AtomicU64,
    /// FLEA_CUDA_FUSED_TRACE: per-phase times of the fused decode, printed at exit.
    fused_trace: Option<Mutex<fused::FusedTrace>>,
    /// Per-kernel timing events (FLEA_CUDA_PROFILE), None when off.
    profile: Option<Mutex<profile::KernelProfile>>,
    precise_gemm: std::sync::atomic::AtomicBool,
    uploaded: AtomicU64,
    kernel_cache: String,
    /// Reads of results (`read`) and the nanoseconds the host spent blocked in them: near
    /// zero means the GPU waits for the host's launches, not the other way round.
    reads: AtomicU64,
    read_wait_ns: AtomicU64,
    /// FLEA_CUDA_GAPS=1: the idle time between decode passes (gaps.rs).
    gaps: Option<gaps::PassGaps>,
    /// Whether chained decode passes are recorded and launched as CUDA graphs
    /// (FLEA_CUDA_GRAPH=0 turns it off), and their state (graph.rs).
    pass_graphs_on: std::sync::atomic::AtomicBool,
    pass_graphs: Mutex<graph::PassGraphs>,
}

fn dptr<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (p, _sync) = s.device_ptr(stream);
    p
}

/// Dynamic shared memory a block of `f` may opt into: the device's opt-in limit less the
/// kernel's static shared memory (0 if a query fails).
fn dynamic_smem_room(ctx: &CudaContext, f: &CudaFunction) -> i32 {
    use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
    let optin = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .unwrap_or(0);
    let fixed = f
        .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
        .unwrap_or(i32::MAX);
    optin.saturating_sub(fixed).max(0)
}

/// Opts `f` into the device's largest dynamic shared memory per block and returns it in
/// bytes (0 if a query or the opt-in fails).
fn opt_in_all(ctx: &CudaContext, f: &CudaFunction) -> usize {
    use cudarc::driver::sys::CUfunction_attribute;
    let dynamic = dynamic_smem_room(ctx, f);
    let set = f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        dynamic,
    );
    match set {
        Ok(()) => dynamic as usize,
        Err(_) => 0,
    }
}

/// Opts `attention_tiled` into the device's largest shared memory per block and returns the
/// keys per tile that leaves room for (0 if a query or the opt-in fails: never used).
fn tiled_attention_opt_in(ctx: &CudaContext, f: &CudaFunction) -> usize {
    opt_in_all(ctx, f) / (ATTN_TQ * 4)
}

/// FNV-1a, stable across Rust versions (names the on-disk kernel cache).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// A cheap content fingerprint of a weight: 64 bytes at the start, the middle and the end
/// (hashing 192 bytes per lookup costs nothing beside the matmul).
fn fingerprint(d: &[u8]) -> u64 {
    let n = d.len();
    let k = n.min(64);
    let mid = n / 2;
    let a = fnv1a(&d[..k]);
    let b = fnv1a(&d[mid.saturating_sub(32)..(mid + 32).min(n)]);
    let c = fnv1a(&d[n - k..]);
    a ^ b.rotate_left(21) ^ c.rotate_left(42)
}

fn cache_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("FLEA_CUDA_CACHE") {
        return d.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("flea").join("cuda")
}

/// Compile `src` for `sm_{arch}` with NVRTC and return the CUBIN.
fn nvrtc_compile(src: &str, arch: &str) -> std::result::Result<Vec<u8>, CudaError> {
    use cudarc::nvrtc::{result, sys};
    use std::ffi::{CStr, CString};
    let csrc = CString::new(src).map_err(|_| CudaError("kernel source has a NUL".into()))?;
    let name = CString::new("flea_kernels.cu").unwrap();
    let prog = result::create_program(&csrc, Some(&name))
        .map_err(|e| CudaError(format!("nvrtc create program: {e:?}")))?;
    let opts = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "-lineinfo".to_string(),
    ];
    // SAFETY: prog is a live program until destroyed below.
    let res = unsafe { result::compile_program(prog, &opts) };
    let out = match res {
        Err(e) => {
            let log = unsafe { result::get_program_log(prog) }
                .map(|l| {
                    unsafe { CStr::from_ptr(l.as_ptr()) }
                        .to_string_lossy()
                        .into_owned()
                })
                .unwrap_or_default();
            Err(CudaError(format!("nvrtc compile ({arch}): {e:?}\n{log}")))
        }
        Ok(()) => unsafe {
            let mut size = 0usize;
            sys::nvrtcGetCUBINSize(prog, &mut size)
                .result()
                .map_err(|e| CudaError(format!("nvrtc cubin size: {e:?}")))?;
            let mut buf = vec![0u8; size];
            sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _)
                .result()
                .map_err(|e| CudaError(format!("nvrtc cubin: {e:?}")))?;
            Ok(buf)
        },
    };
    let _ = unsafe { result::destroy_program(prog) };
    out
}

/// The kernels' CUBIN for `arch`, from the disk cache or freshly compiled (then cached).
fn kernels_cubin(arch: &str) -> std::result::Result<(Vec<u8>, String), CudaError> {
    let hash = fnv1a(KERNELS.as_bytes());
    let dir = cache_dir();
    let path = dir.join(format!("{hash:016x}-{arch}.cubin"));
    if let Ok(bytes) = std::fs::read(&path) {
        if !bytes.is_empty() {
            return Ok((bytes, format!("cached {}", path.display())));
        }
    }
    let t = std::time::Instant::now();
    let cubin = nvrtc_compile(KERNELS, arch)?;
    let took = t.elapsed().as_secs_f64();
    let note = if std::fs::create_dir_all(&dir).is_ok() {
        let tmp = dir.join(format!(".{hash:016x}-{arch}.{}.tmp", std::process::id()));
        if std::fs::write(&tmp, &cubin).is_ok() && std::fs::rename(&tmp, &path).is_ok() {
            format!("compiled in {took:.1} s, cached at {}", path.display())
        } else {
            format!("compiled in {took:.1} s (cache not writable)")
        }
    } else {
        format!("compiled in {took:.1} s (no cache dir)")
    };
    Ok((cubin, note))
}

impl CudaBackend {
    /// Open device `ordinal`: check the libraries, create the context, compile or load the
    /// kernels. Errors are one line ("no CUDA driver (libcuda.so.1 not found)", ...).
    pub fn new(ordinal: usize) -> std::result::Result<CudaBackend, CudaError> {
        let libs = libraries();
        if !libs.driver {
            return Err(CudaError("no CUDA driver (libcuda.so.1 not found)".into()));
        }
        if !libs.nvrtc {
            return Err(CudaError(
                "no NVRTC (libnvrtc.so.13 / libnvrtc.so not found)".into(),
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| CudaError(format!("CUDA driver failed to initialise: {e:?}")))?
            .max(0) as usize;
        if count == 0 {
            return Err(CudaError("no CUDA device (driver found, 0 devices)".into()));
        }
        if ordinal >= count {
            return Err(CudaError(format!(
                "no CUDA device {ordinal} (found {count})"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| CudaError(format!("CUDA device {ordinal}: {e:?}")))?;
        // Kernels run in order on one compute stream; the only other stream copies units into
        // device slots, ordered against compute by explicit events (staging.rs). No
        // per-buffer event tracking is needed.
        // SAFETY: nothing has been allocated on this context by us yet; buffers shared by
        // the two streams (device slots) are ordered by our own events.
        unsafe { ctx.disable_event_tracking() };
        // Non-blocking streams: the legacy default stream would serialise copy and compute.
        let stream = ctx
            .new_stream()
            .map_err(|e| CudaError(format!("creating the compute stream: {e:?}")))?;
        let copy_stream = ctx
            .new_stream()
            .map_err(|e| CudaError(format!("creating the copy stream: {e:?}")))?;
        let device_name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let cc = ctx
            .compute_capability()
            .map_err(|e| CudaError(format!("compute capability: {e:?}")))?;
        let arch = format!("sm_{}{}", cc.0, cc.1);
        let (cubin, kernel_cache) = kernels_cubin(&arch)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(|e| CudaError(format!("loading kernels ({arch}): {e:?}")))?;
        let mut funcs = HashMap::new();
        for n in kernel_names() {
            let f = module
                .load_function(&n)
                .map_err(|e| CudaError(format!("kernel {n}: {e:?}")))?;
            funcs.insert(n, f);
        }
        // Blocks of each one-launch split attention kernel the device holds at once (their
        // blocks wait for each other, so a grid must fit; 0 if a query fails: never used).
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .unwrap_or(0)
            .max(0) as usize;
        let resident = |name: &str| {
            let per_sm = funcs.get(name).map_or(0, |f| {
                f.occupancy_max_active_blocks_per_multiprocessor(128, 0, None)
                    .unwrap_or(0)
            });
            per_sm as usize * sms
        };
        let fused_attention_cap = [resident("attn_split_fused"), resident("attn_split_fused8")];
        let fused_decode_fits = cc.0 >= 9
            && sms > 0
            && funcs
                .get("fd_decode")
                .is_some_and(|f| fused::opt_in(&ctx, f));
        let tiled_attention_max_span = funcs
            .get("attention_tiled")
            .map_or(0, |f| tiled_attention_opt_in(&ctx, f));
        let tiled_attention_long_room = funcs
            .get("attention_tiled_long")
            .map_or(0, |f| tiled_attention_opt_in(&ctx, f));
        let mma_attention_fits = cc.0 >= 8
            && ATTN_MMA_HEADS.iter().all(|&hd| {
                funcs
                    .get(mma_attention_kernel(hd))
                    .is_some_and(|f| opt_in_all(&ctx, f) >= mma_attention_smem(hd))
            });
        // The few-token tensor-core kernels take up to ~85 KB of shared memory (mmvq.rs).
        let mmq_smem_room = if cc.0 >= 8 {
            mmvq::mmq_kernel_names()
                .iter()
                .map(|n| funcs.get(n).map_or(0, |f| opt_in_all(&ctx, f)))
                .min()
                .unwrap_or(0)
        } else {
            0
        };
        let cluster_room = |kernels: &[&str; 4]| {
            if cc.0 >= 9 {
                kernels
                    .iter()
                    .map(|n| funcs.get(*n).map_or(0, |f| opt_in_all(&ctx, f)))
                    .min()
                    .unwrap_or(0)
            } else {
                0
            }
        };
        let cluster_attention_room = cluster_room(&ATTN_CLUSTER_KERNELS);
        let cluster_attention_room_h256 = cluster_room(&ATTN_CLUSTER_KERNELS_H256);
        let wide_cluster_room = match funcs.get(ATTN_WIDE_CLUSTER_KERNEL) {
            Some(f) if cluster_attention_room > 0 => {
                wide_cluster_opt_in(&ctx, &stream, f, cluster_attention_vreg_smem(256, 128))
            }
            _ => 0,
        };
        // The streaming kernel is checked at its largest use (ATTN_STREAM_MAX_KEYS keys a
        // block) and then never given more.
        let stream_attention_room = match funcs.get(ATTN_STREAM_KERNEL) {
            Some(f) if cluster_attention_room > 0 => {
                let most = stream_attention_smem(ATTN_STREAM_MAX_KEYS);
                if wide_cluster_opt_in(&ctx, &stream, f, most) >= most {
                    most
                } else {
                    0
                }
            }
            _ => 0,
        };
        let keys_from = |name: &str, default| {
            keys_setting(name, std::env::var(name).as_deref().unwrap_or(""), default)
        };
        let stream_attention_default = keys_from("FLEA_CUDA_ATTN_STREAM", ATTN_STREAM_FROM)?;
        let rows_attention_default = keys_from("FLEA_CUDA_ATTN_ROWS", ATTN_ROWS_FROM)?;
        let cluster_attention_vreg_mode = attention_vreg_setting(
            std::env::var("FLEA_CUDA_ATTN_VREG")
                .as_deref()
                .unwrap_or(""),
        )?;
        let cluster_attention_vreg = cluster_attention_vreg_mode != AttnVreg::Off;
        let sm_shared = {
            use cudarc::driver::sys::CUdevice_attribute as A;
            let get = |a| ctx.attribute(a).ok().and_then(|v| usize::try_from(v).ok());
            match (
                get(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR),
                get(A::CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK),
                get(A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR),
            ) {
                (Some(per_sm), Some(reserved), Some(threads)) if per_sm > 0 => Some(SmShared {
                    per_sm,
                    reserved,
                    threads,
                }),
                _ => None,
            }
        };
        let blas = if libs.cublas && std::env::var_os("FLEA_CUDA_NO_CUBLAS").is_none() {
            Some(
                cudarc::cublas::CudaBlas::new(stream.clone())
                    .map_err(|e| CudaError(format!("cuBLAS init: {e:?}")))?,
            )
        } else {
            None
        };
        let fusions_off = FusionsOff::from_env();
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            funcs,
            weights: Mutex::new(HashMap::new()),
            mappings: Mutex::new(Vec::new()),
            map_generation: AtomicU64::new(0),
            resident: Mutex::new(Vec::new()),
            repacked: Mutex::new(std::collections::HashSet::new()),
            ring: Mutex::new(None),
            staging: std::sync::atomic::AtomicBool::new(false),
            handover: Mutex::new(None),
            token_slots: Mutex::new(None),
            small_uploads: Mutex::new(None),
            copy_stream,
            vectors: Mutex::new(HashMap::new()),
            scratch: Mutex::new(Scratch::default()),
            ordinal,
            device_name,
            cc,
            sync_each: std::env::var_os("FLEA_CUDA_SYNC").is_some(),
            pdl: cc.0 >= 9 && std::env::var("FLEA_CUDA_PDL").as_deref() != Ok("0"),
            single_block_attention: std::env::var("FLEA_CUDA_ATTN").as_deref() == Ok("single"),
            fusion: std::sync::atomic::AtomicBool::new(
                std::env::var("FLEA_CUDA_FUSE").as_deref() != Ok("0"),
            ),
            fusions_off,
            fused_attention_cap,
            tiled_attention_max_span,
            tiled_attention_long_room,
            mma_attention_fits,
            mma_attention: std::sync::atomic::AtomicBool::new(!fusions_off.attn_mma),
            mma_attention_calls: AtomicU64::new(0),
            cluster_attention_room,
            cluster_attention_room_h256,
            wide_cluster_room,
            wide_cluster_from: AtomicUsize::new(ATTN_CLUSTER_MAX_KEYS + 1),
            stream_attention_room,
            stream_attention_default,
            stream_attention_from: AtomicUsize::new(stream_attention_default),
            rows_attention_default,
            rows_attention_from: AtomicUsize::new(rows_attention_default),
            rows_attention_min_blocks: AtomicUsize::new(ATTN_ROWS_MIN_BLOCKS_PER_SM * sms),
            rows_attention_calls: AtomicU64::new(0),
            cluster_attention_vreg: std::sync::atomic::AtomicBool::new(cluster_attention_vreg),
            cluster_attention_vreg_mode,
            cluster_attention_carveout: std::sync::atomic::AtomicI32::new(-1),
            sm_shared,
            mmq_smem_room,
            cluster_attention: std::sync::atomic::AtomicBool::new(true),
            cluster_attention_calls: AtomicU64::new(0),
            feeds: AtomicU8::new(FEEDS_NONE),
            q8_0_fusion: std::sync::atomic::AtomicBool::new(!fusions_off.q8_0),
            q8_0_fused: AtomicU64::new(0),
            fused_attention_blocks: fused_attention_cap.map(AtomicUsize::new),
            fused_decode: std::sync::atomic::AtomicBool::new(
                std::env::var("FLEA_CUDA_FUSED_DECODE").as_deref() == Ok("1"),
            ),
            fused_decode_fits,
            fused: Mutex::new(None),
            sms,
            fused_steps: AtomicU64::new(0),
            fused_trace: std::env::var_os("FLEA_CUDA_FUSED_TRACE")
                .is_some_and(|v| v != "0")
                .then(|| Mutex::new(fused::FusedTrace::default())),
            launch_serial: AtomicU64::new(0),
            prequant: Mutex::new(None),
            gemm_cap: AtomicUsize::new(0),
            profile: std::env::var_os("FLEA_CUDA_PROFILE")
                .is_some_and(|v| v != "0")
                .then(|| Mutex::new(profile::KernelProfile::default())),
            precise_gemm: std::sync::atomic::AtomicBool::new(
                std::env::var("FLEA_CUDA_GEMM").as_deref() == Ok("f32"),
            ),
            uploaded: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            read_wait_ns: AtomicU64::new(0),
            gaps: gaps::PassGaps::from_env(),
            pass_graphs_on: std::sync::atomic::AtomicBool::new(
                std::env::var("FLEA_CUDA_GRAPH").as_deref() != Ok("0"),
            ),
            pass_graphs: Mutex::new(graph::PassGraphs::default()),
            kernel_cache,
        })
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }
    /// Whether prompts use cuBLAS (else the batched matvec kernel).
    pub fn has_cublas(&self) -> bool {
        self.blas.is_some()
    }
    /// Where the kernels came from (compiled / cached path).
    pub fn kernel_cache(&self) -> &str {
        &self.kernel_cache
    }
    /// Prompt GEMMs in F32 (weights dequantized to f32, FP32 cuBLAS: matches the CPU to
    /// rounding) instead of the default F16 × F16 → F32 (faster, ~1e-3 relative per matmul).
    /// Also set by FLEA_CUDA_GEMM=f32.
    pub fn set_precise_gemm(&self, on: bool) {
        self.precise_gemm.store(on, Ordering::Relaxed);
    }
    pub fn precise_gemm(&self) -> bool {
        self.precise_gemm.load(Ordering::Relaxed)
    }
    /// Bytes of weights uploaded so far.
    pub fn uploaded_bytes(&self) -> u64 {
        self.uploaded.load(Ordering::Relaxed)
    }
    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> std::result::Result<(usize, usize), CudaError> {
        self.ctx
            .mem_get_info()
            .map_err(|e| CudaError(format!("mem info: {e:?}")))
    }
    /// Make this context current on the calling thread.
    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| be(format!("binding the CUDA context: {e:?}")))
    }

    /// Wait for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.copy_stream
            .synchronize()
            .map_err(|e| be(format!("device error: {e:?}")))?;
        self.stream
            .synchronize()
            .map_err(|e| be(format!("device error: {e:?}")))
    }

    /// Copy host values into the first rows of an activation buffer (tests, tools).
    pub fn upload(&self, x: &CudaAct, data: &[f32]) -> Result<()> {
        if data.len() > x.rows * x.width {
            return Err(be("upload: more values than the buffer holds"));
        }
        if data.is_empty() {
            return Ok(());
        }
        // New activation values: no earlier fused quantisation describes them any more.
        self.launch_serial.fetch_add(1, Ordering::Relaxed);
        // SAFETY: x.ptr is a live device allocation of at least data.len() f32.
        unsafe { cudarc::driver::result::memcpy_htod_async(x.ptr, data, self.stream.cu_stream()) }
            .map_err(|e| be(format!("upload: {e:?}")))?;
        self.synchronize()
    }

    /// Upload a weight now (normally done on first use).
    pub fn preload(&self, w: &Weight) -> Result<()> {
        self.weight_ptr(w).map(|_| ())
    }

    /// Measure device memory bandwidth with a device-to-device copy of `bytes` (counting read
    /// and write), best of `reps`. Returns bytes per second.
    pub fn measure_copy_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64> {
        let n = bytes / 4;
        let src = self
            .stream
            .alloc_zeros::<f32>(n)
            .map_err(|e| be(format!("alloc: {e:?}")))?;
        let mut dst = self
            .stream
            .alloc_zeros::<f32>(n)
            .map_err(|e| be(format!("alloc: {e:?}")))?;
        let mut best = f64::MAX;
        for _ in 0..reps.max(1) + 1 {
            self.synchronize()?;
            let t = std::time::Instant::now();
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(|e| be(format!("dtod: {e:?}")))?;
            self.synchronize()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(2.0 * (n * 4) as f64 / best)
    }

    /// Measure pinned host-to-device copy bandwidth with `bytes`-sized copies, best of
    /// `reps`. Returns bytes per second.
    pub fn measure_h2d_bandwidth(&self, bytes: usize, reps: usize) -> Result<f64> {
        use flea_model::backend::UnitStaging;
        // Page-aligned, as the executor's staging buffers are.
        let bytes = bytes.max(4096).next_multiple_of(4096);
        let mut raw = vec![0u8; bytes + 4096];
        let off = raw.as_ptr().align_offset(4096);
        let host = &mut raw[off..off + bytes];
        self.pin(host)?;
        let result = (|| {
            let mut dev = unsafe { self.stream.alloc::<u8>(host.len()) }
                .map_err(|e| be(format!("alloc: {e:?}")))?;
            let mut best = f64::MAX;
            for _ in 0..reps.max(1) + 1 {
                self.synchronize()?;
                let t = std::time::Instant::now();
                self.stream
                    .memcpy_htod(&*host, &mut dev)
                    .map_err(|e| be(format!("htod: {e:?}")))?;
                self.synchronize()?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            Ok(host.len() as f64 / best)
        })();
        self.unpin(host.as_ptr() as usize, host.len());
        result
    }

    /// Device memory the backend allocates for itself beside activations when evaluating
    /// batches of up to `batch` tokens of `model`: the dequantized weight and rounded
    /// inputs of a cuBLAS GEMM, embedding rows, token ids, and an allowance for cuBLAS's
    /// workspace. The GEMM scratch holds the largest layer matrix; from now on a larger one
    /// (the output matrix, for all-position logits, when the vocabulary outgrows the
    /// layers) is multiplied in row chunks of that size instead of needing its own room.
    pub fn scratch_bytes(&self, model: &flea_model::Model, batch: usize) -> u64 {
        let lay = &model.layout;
        let mut max_elems = 0usize;
        let mut max_cols = lay.output.cols;
        for l in &lay.layers {
            for t in l.matrices() {
                max_elems = max_elems.max(t.rows * t.cols);
                max_cols = max_cols.max(t.cols);
            }
        }
        // At least a few rows of the output matrix per pass.
        max_elems = max_elems.max(64 * lay.output.cols);
        self.gemm_cap.store(max_elems, Ordering::Relaxed);
        let emb = lay.token_embd.size / lay.token_embd.rows.max(1);
        let gemm = if batch > 1 {
            // The weight dequantized to F32 (precise mode) or F16, inputs as f32 and f16.
            let per_elem = if self.precise_gemm() { 4 } else { 2 };
            per_elem * max_elems + 6 * batch * max_cols
        } else {
            0
        };
        (gemm + batch * emb + 4 * batch + (64 << 20)) as u64
    }

    /// Run one cuBLAS GEMM of every layer-matrix shape of `model` for batches of `batch`,
    /// `batch / 2`, … above the rows our own kernels take (8, or 32 where every layer matrix
    /// is Q4_K / Q6_K and the `mmq_*` kernels are on), on zeroed temporary buffers that
    /// are freed again. cuBLAS picks its kernel per shape on the first call and the driver
    /// loads that kernel's module on first use (lazy loading): tens of milliseconds that
    /// otherwise land inside the first prompt. Returns the milliseconds spent; 0 without
    /// cuBLAS, for batches our kernels take, or when the device has no room for the
    /// temporary buffers (then the first prompt pays as before), or with FLEA_CUDA_WARMUP=0
    /// (for comparisons).
    pub fn warm_up_gemms(&self, model: &flea_model::Model, batch: usize) -> Result<f64> {
        let Some(blas) = self.blas.as_ref() else {
            return Ok(0.0);
        };
        let types = model
            .layout
            .layers
            .iter()
            .flat_map(|l| l.matrices().map(|m| m.ty));
        // The mmq kernels cover 9..=32 rows only if they start right above the mat-vecs'.
        let mmq_from_mat_vecs = self.mmq_on() && self.mmq_settings().1 <= mmvq::MAX_TOKENS + 1;
        let own_max = mmvq::own_kernel_rows_max(mmq_from_mat_vecs, types);
        if batch <= own_max || std::env::var("FLEA_CUDA_WARMUP").as_deref() == Ok("0") {
            return Ok(0.0);
        }
        let t = std::time::Instant::now();
        let mut shapes = std::collections::BTreeSet::new();
        for l in &model.layout.layers {
            for m in l.matrices() {
                shapes.insert((m.rows, m.cols));
            }
        }
        let max_elems = shapes.iter().map(|&(r, c)| r * c).max().unwrap_or(0);
        let max_rows = shapes.iter().map(|&(r, _)| r).max().unwrap_or(0);
        let max_cols = shapes.iter().map(|&(_, c)| c).max().unwrap_or(0);
        if max_elems == 0 {
            return Ok(0.0);
        }
        let precise = self.precise_gemm();
        let elem = if precise { 4 } else { 2 };
        // Weights and inputs as raw bytes: their values do not matter, only the shapes.
        let alloc = |bytes: usize| self.stream.alloc_zeros::<u8>(bytes).ok();
        let (Some(w), Some(x), Some(out)) = (
            alloc(elem * max_elems),
            alloc(elem * batch * max_cols),
            alloc(4 * batch * max_rows),
        ) else {
            return Ok(0.0);
        };
        let (wp, xp, op) = (
            dptr(&w, &self.stream),
            dptr(&x, &self.stream),
            dptr(&out, &self.stream),
        );
        let mut n = batch;
        while n > own_max {
            for &(rows, cols) in &shapes {
                gemm(blas, (rows, n, cols), rows, wp, xp, op, precise)?;
            }
            n /= 2;
        }
        self.synchronize()?;
        drop((w, x, out));
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }

    /// `write` through the mapped handover buffer: the CPU stores the values, a kernel on
    /// the compute stream loads them over PCIe.
    fn write_mapped(&self, data: &[f32], x: &CudaAct) -> Result<()> {
        let mut guard = self.handover.lock().unwrap();
        if guard.is_none() {
            // SAFETY: a plain pinned, device-mapped host allocation; freed in Drop.
            let host = unsafe {
                cudarc::driver::result::malloc_host(
                    HANDOVER_BYTES,
                    cudarc::driver::sys::CU_MEMHOSTALLOC_DEVICEMAP,
                )
            }
            .map_err(|e| be(format!("mapped host buffer: {e:?}")))?;
            let mut dev = 0u64;
            // SAFETY: host is a live mapped allocation of this context.
            unsafe {
                cudarc::driver::sys::cuMemHostGetDevicePointer_v2(&mut dev, host, 0).result()
            }
            .map_err(|e| be(format!("mapped host buffer address: {e:?}")))?;
            let read = self
                .ctx
                .new_event(None)
                .map_err(|e| be(format!("event: {e:?}")))?;
            *guard = Some(Handover {
                host: host as usize,
                dev,
                bytes: HANDOVER_BYTES,
                read,
            });
        }
        let h = guard.as_ref().ok_or_else(|| be("no handover buffer"))?;
        if data.len() * 4 > h.bytes {
            return Err(be("write: handover buffer too small"));
        }
        // The previous hand-over's kernel must have read the buffer before it is rewritten.
        h.read
            .synchronize()
            .map_err(|e| be(format!("handover wait: {e:?}")))?;
        // SAFETY: h.host holds h.bytes ≥ data.len()*4 bytes, 4-aligned, and no kernel is
        // reading it (waited above).
        unsafe { std::slice::from_raw_parts_mut(h.host as *mut f32, data.len()) }
            .copy_from_slice(data);
        let n4 = (data.len() / 4) as i64;
        let cfg = Self::launch_1d(data.len() / 4);
        let (src, dst) = (h.dev, x.ptr);
        {
            let f = self.func("copy_f4")?;
            let mut b = self.stream.launch_builder(f);
            b.arg(&src).arg(&dst).arg(&n4);
            // SAFETY: src is the mapped buffer holding n4 float4s, dst an activation buffer
            // of at least as many (checked by the caller).
            unsafe { b.launch(cfg) }.map_err(|e| be(format!("kernel copy_f4: {e:?}")))?;
            self.after_launch("copy_f4")?;
        }
        h.read
            .record(&self.stream)
            .map_err(|e| be(format!("handover record: {e:?}")))
    }

    /// The kernel `name`, looked up just before its launch (so the profile's start mark
    /// goes here).
    fn func(&self, name: &str) -> Result<&CudaFunction> {
        let f = self
            .funcs
            .get(name)
            .ok_or_else(|| be(format!("kernel {name} not loaded")))?;
        if let Some(p) = &self.profile {
            p.lock()
                .map_err(|_| be("profile lock poisoned"))?
                .before(&self.ctx, &self.stream)
                .map_err(be)?;
        }
        Ok(f)
    }

    /// With FLEA_CUDA_PROFILE set: what each kernel took on the GPU since the last report
    /// (waits for the stream). None when profiling is off.
    pub fn profile_report(&self) -> Result<Option<ProfileReport>> {
        let Some(p) = &self.profile else {
            return Ok(None);
        };
        let r = p
            .lock()
            .map_err(|_| be("profile lock poisoned"))?
            .report()
            .map_err(be)?;
        Ok(Some(r))
    }

    /// Most weight elements one cuBLAS pass dequantizes (0: no limit); `scratch_bytes` sets
    /// it to what it reserves. Tests compare chunked passes with whole ones.
    pub fn set_gemm_cap(&self, elems: usize) {
        self.gemm_cap.store(elems, Ordering::Relaxed);
    }

    /// Fused decode kernels on or off (default on; FLEA_CUDA_FUSE=0). Results are the same
    /// either way, bit for bit; only the number of launches differs.
    pub fn set_fusion(&self, on: bool) {
        self.fusion.store(on, Ordering::Relaxed);
    }
    fn fusion(&self) -> bool {
        self.fusion.load(Ordering::Relaxed)
    }

    /// Where a kernel producing `n` rows of `width` values (in groups of `group`) may also
    /// quantise them for the int8 mat-vec that follows (decode-sized batches, whole rows of
    /// whole blocks of `fmt`, fusion and mmvq on; Q8_0 unless `set_q8_0_fusion(false)`): the
    /// scratch's (quants, scales, sums).
    fn fused_int8_scratch(
        &self,
        n: usize,
        group: usize,
        width: usize,
        fmt: mmvq::ActFmt,
    ) -> Result<Option<(u64, u64, u64)>> {
        let q8_0 = fmt == mmvq::ActFmt::Q8_0;
        if !(self.fusion()
            && (!q8_0 || self.q8_0_fusion.load(Ordering::Relaxed))
            && matches!(fmt, mmvq::ActFmt::Q8K | mmvq::ActFmt::Q8_0)
            && group == width
            && width.is_multiple_of(fmt.block())
            && n <= mmvq::q8k_tokens_max()
            && mmvq::enabled())
        {
            return Ok(None);
        }
        let mut sc = self
            .scratch
            .lock()
            .map_err(|_| be("scratch lock poisoned"))?;
        if q8_0 {
            self.q8_0_fused.fetch_add(1, Ordering::Relaxed);
        }
        self.int8_scratch(&mut sc.xq, n * width, fmt).map(Some)
    }

    /// `fused_int8_scratch` for Q8_K.
    fn fused_q8k_scratch(
        &self,
        n: usize,
        group: usize,
        width: usize,
    ) -> Result<Option<(u64, u64, u64)>> {
        self.fused_int8_scratch(n, group, width, mmvq::ActFmt::Q8K)
    }

    /// Let decode norms, attention and GLU quantise their outputs to Q8_0 for the Q8_0-type
    /// mat-vec reading them (the default), or leave that to `act_q8_0` launches: the same bits.
    pub fn set_q8_0_fusion(&self, on: bool) {
        self.q8_0_fusion.store(on, Ordering::Relaxed);
    }

    /// How many norm, attention and GLU launches so far quantised their outputs to Q8_0.
    pub fn q8_0_fused_launches(&self) -> u64 {
        self.q8_0_fused.load(Ordering::Relaxed)
    }

    /// The int8 format `output_feeds` said the next step's output is read in (taking it).
    fn take_feeds(&self) -> u8 {
        self.feeds.swap(FEEDS_NONE, Ordering::Relaxed)
    }

    /// Record that the launch just made left the Q8_K quantisation of the `total` values at
    /// `x` in the scratch at `base` (valid until the next launch or upload).
    fn note_prequant(&self, x: u64, total: usize, base: u64) -> Result<()> {
        let p = Prequant {
            x,
            total,
            base,
            serial: self.launch_serial.load(Ordering::Relaxed),
        };
        *self
            .prequant
            .lock()
            .map_err(|_| be("prequant lock poisoned"))? = Some(p);
        Ok(())
    }

    /// Whether the Q8_K (or Q8_0) scratch at `base` holds the quantisation of the `total`
    /// values at `x`, written by a norm, attention or GLU launch with no launch or activation
    /// upload since.
    pub(crate) fn prequantized(&self, x: u64, total: usize, base: u64) -> bool {
        let serial = self.launch_serial.load(Ordering::Relaxed);
        self.prequant.lock().is_ok_and(|p| {
            p.as_ref().is_some_and(|p| {
                p.x == x && p.total == total && p.base == base && p.serial == serial
            })
        })
    }

    /// Launch kernel `name` on the compute stream. With programmatic dependent launch (sm_90
    /// and later, unless FLEA_CUDA_PDL=0) the kernel may start while the previous one still
    /// runs: every kernel in kernels.cu waits for it in `pdl_enter()` before touching shared
    /// memory, and the mat-vecs prefetch their weights before that wait.
    ///
    /// # Safety
    /// `params` must point at one value of each of the kernel's parameter types, in order,
    /// and the buffers they address must be large enough for `cfg`'s grid.
    pub(crate) unsafe fn launch_kernel(
        &self,
        name: &str,
        cfg: LaunchConfig,
        params: &mut [*mut std::ffi::c_void],
    ) -> Result<()> {
        // No heap allocation per launch: the one optional attribute as a slice.
        let mut pdl = self.pdl_attr();
        // SAFETY: the caller's contract.
        unsafe { self.launch_with(name, cfg, pdl.as_mut_slice(), params) }
    }

    /// The programmatic-dependent-launch attribute, if this backend launches that way.
    fn pdl_attr(&self) -> Option<cudarc::driver::sys::CUlaunchAttribute> {
        use cudarc::driver::sys;
        self.pdl.then_some(sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value: sys::CUlaunchAttributeValue {
                programmaticStreamSerializationAllowed: 1,
            },
        })
    }

    /// `launch_kernel` with the caller's launch attributes (none, or any the driver takes
    /// together).
    ///
    /// # Safety
    /// As `launch_kernel`.
    pub(crate) unsafe fn launch_with(
        &self,
        name: &str,
        cfg: LaunchConfig,
        attrs: &mut [cudarc::driver::sys::CUlaunchAttribute],
        params: &mut [*mut std::ffi::c_void],
    ) -> Result<()> {
        use cudarc::driver::sys;
        let f = self.func(name)?;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: if attrs.is_empty() {
                std::ptr::null_mut()
            } else {
                attrs.as_mut_ptr()
            },
            numAttrs: attrs.len() as u32,
        };
        self.bind()?;
        // SAFETY: the caller's contract covers the parameters; `config` and `attrs` live
        // through the call, and the function belongs to this context's module.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
            .result()
        }
        .map_err(|e| be(format!("kernel {name}: {e:?}")))?;
        self.after_launch(name)
    }

    /// The most blocks of the one-launch split attention taken as resident at once: at most
    /// (and by default) the device's occupancy for it × its SMs, since its blocks wait for
    /// each other. Tests lower it to exercise several chunks per block (0: the two-launch
    /// kernels).
    pub fn set_fused_attention_blocks(&self, blocks: usize) {
        for (assumed, cap) in self
            .fused_attention_blocks
            .iter()
            .zip(self.fused_attention_cap)
        {
            assumed.store(blocks.min(cap), Ordering::Relaxed);
        }
    }

    /// Let single decode rows take the cluster attention (`attn_cluster`, the default where the
    /// device has clusters) or keep them on the split kernels.
    pub fn set_cluster_attention(&self, on: bool) {
        self.cluster_attention.store(on, Ordering::Relaxed);
    }

    /// Let prompts take the tensor-core attention (`attention_mma_h*`, the default where the
    /// device has it) or keep them on the f32 tiled kernels; returns the previous setting.
    pub fn set_mma_attention(&self, on: bool) -> bool {
        self.mma_attention.swap(on, Ordering::Relaxed)
    }

    /// Whether prompts of 64-, 128- and 256-dim heads take the tensor-core attention now
    /// (the device runs it, and neither it nor the tiled kernels are turned off), and its
    /// launches so far.
    pub fn has_mma_attention(&self) -> bool {
        self.mma_attention_fits
            && self.mma_attention.load(Ordering::Relaxed)
            && !self.fusions_off.attn_tiled
            && !self.single_block_attention
    }
    pub fn mma_attention_calls(&self) -> u64 {
        self.mma_attention_calls.load(Ordering::Relaxed)
    }

    /// Let the cluster attention hold V in registers (`attn_cluster_v*`, on by default) or keep
    /// it on `attn_cluster`; both add the same terms in the same order.
    pub fn set_cluster_attention_vreg(&self, on: bool) {
        self.cluster_attention_vreg.store(on, Ordering::Relaxed);
    }

    /// Sets the `attn_cluster_v*` kernels' preferred shared-memory carve-out (FLEA_CUDA_ATTN_VREG's
    /// percent, or by default the configuration of the mat-vecs beside them, which read `cols`
    /// columns), when it changes. Not a stream operation: allowed while a graph is captured.
    fn set_cluster_attention_carveout(&self, cols: usize) -> Result<()> {
        let percent = match (self.cluster_attention_vreg_mode, self.sm_shared) {
            (AttnVreg::Percent(p), _) => p,
            (AttnVreg::FollowMatVecs, Some(sm)) => matvec_carveout_percent(cols, sm),
            _ => return Ok(()),
        };
        if self
            .cluster_attention_carveout
            .swap(percent, Ordering::Relaxed)
            == percent
        {
            return Ok(());
        }
        // Not `attn_cluster16_v64`: in the mat-vecs' configuration one of its blocks fits an SM
        // where its registers allow two, so a 13b's 20 clusters took 2.4 waves (Nsight
        // Compute, H200, 2026-11-29); the driver's own choice fits two.
        for n in ATTN_CLUSTER_KERNELS[1..]
            .iter()
            .chain(&ATTN_CLUSTER_KERNELS_H256[1..])
        {
            if let Some(f) = self.funcs.get(*n) {
                f.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                    percent,
                )
                .map_err(|e| {
                    // Not set: the next launch tries again.
                    self.cluster_attention_carveout.store(-1, Ordering::Relaxed);
                    be(format!("carve-out of {n}: {e:?}"))
                })?;
            }
        }
        Ok(())
    }

    /// The keys from which a decode row takes the 16-block clusters (`attn_cluster16_v64`)
    /// where the device runs them: ATTN_CLUSTER_MAX_KEYS + 1 by default (None); tests lower it.
    pub fn set_wide_cluster_from(&self, keys: Option<usize>) {
        let keys = keys.unwrap_or(ATTN_CLUSTER_MAX_KEYS + 1);
        self.wide_cluster_from.store(keys, Ordering::Relaxed);
    }

    /// Whether this device runs the 16-block attention clusters.
    pub fn has_wide_cluster_attention(&self) -> bool {
        self.wide_cluster_room > 0
    }

    /// The keys from which a decode row takes the streaming cluster attention
    /// (`attn_stream16`) where the device runs it, or (None) the start's setting again
    /// (FLEA_CUDA_ATTN_STREAM's, by default ATTN_STREAM_FROM); tests change it.
    pub fn set_stream_attention_from(&self, keys: Option<usize>) {
        let keys = keys.unwrap_or(self.stream_attention_default);
        self.stream_attention_from.store(keys, Ordering::Relaxed);
    }

    /// The keys from which a batch of decode rows takes `attn_rows` instead of the split
    /// attention, or (None) the start's setting again (FLEA_CUDA_ATTN_ROWS's, by default
    /// ATTN_ROWS_FROM); tests change it.
    pub fn set_rows_attention_from(&self, keys: Option<usize>) {
        let keys = keys.unwrap_or(self.rows_attention_default);
        self.rows_attention_from.store(keys, Ordering::Relaxed);
    }

    /// The fewest blocks (rows × heads) a batch's grid has for `attn_rows`, or (None)
    /// ATTN_ROWS_MIN_BLOCKS_PER_SM an SM again; tests change it.
    pub fn set_rows_attention_min_blocks(&self, blocks: Option<usize>) {
        let blocks = blocks.unwrap_or(ATTN_ROWS_MIN_BLOCKS_PER_SM * self.sms);
        self.rows_attention_min_blocks
            .store(blocks, Ordering::Relaxed);
    }

    /// Whether this device runs the streaming cluster attention.
    pub fn has_stream_attention(&self) -> bool {
        self.stream_attention_room > 0
    }

    /// Launches of the cluster attention so far.
    pub fn cluster_attention_calls(&self) -> u64 {
        self.cluster_attention_calls.load(Ordering::Relaxed)
    }

    /// Launches of `attn_rows` (a batch's decode attention, one block a (head, row)) so far.
    pub fn rows_attention_calls(&self) -> u64 {
        self.rows_attention_calls.load(Ordering::Relaxed)
    }

    /// Whether this device can run the cluster attention at all (sm_90+, its shared memory
    /// opted in).
    pub fn has_cluster_attention(&self) -> bool {
        self.cluster_attention_room > 0
    }

    /// Whether the weight at device address `wp` is a resident Q6_K tensor in the repacked
    /// layout.
    pub(crate) fn is_repacked(&self, wp: u64) -> bool {
        self.repacked.lock().is_ok_and(|r| r.contains(&wp))
    }

    fn lock_pass_graphs(&self) -> Result<std::sync::MutexGuard<'_, graph::PassGraphs>> {
        self.pass_graphs
            .lock()
            .map_err(|_| be("pass graphs lock poisoned"))
    }

    /// Whether a chained pass is being recorded as a graph (graph.rs).
    fn recording(&self) -> bool {
        self.pass_graphs.lock().is_ok_and(|g| g.recording())
    }

    /// A launch group's lead weight and kernel, and its jobs (weight pointer, rows, output),
    /// from the kernels' (kernel, weight pointer) list.
    fn group_jobs<'a, 'w, K>(
        group: &[(usize, bool)],
        kernels: &'a [Option<(K, u64)>],
        jobs: &[(&'a Weight<'w>, &mut CudaAct)],
    ) -> Result<(&'a Weight<'w>, &'a K, Vec<mmvq::MmvqJob>)> {
        let lead = group
            .first()
            .map(|g| g.0)
            .ok_or_else(|| be("empty matmul group"))?;
        let (Some((w, _)), Some(Some((kernel, _)))) = (jobs.get(lead), kernels.get(lead)) else {
            return Err(be(format!("matmul group: no job {lead}")));
        };
        let g = group
            .iter()
            .map(|&(j, second)| match (kernels.get(j), jobs.get(j)) {
                (Some(Some((_, wp))), Some((w, out))) => Ok(mmvq::MmvqJob {
                    wp: *wp,
                    rows: w.rows,
                    out: out.ptr,
                    second,
                }),
                _ => Err(be(format!("matmul group: no job {j}"))),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((w, kernel, g))
    }

    /// `argmax_slot` (greedy) or `topk_slot` / the vocabulary kernels (sampled) over
    /// columns `col0..col0 + width` of the logits row at `xp` (of `n_vocab`), into `slot`
    /// (a chained decode's, or a batch row's: `chain::TokenSlots`); the last chunk marks it.
    fn pick_into_slot(
        &self,
        xp: u64,
        col0: usize,
        width: usize,
        n_vocab: usize,
        slot: usize,
        pick: &flea_model::sampling::SlotPick,
    ) -> Result<()> {
        use flea_model::sampling::SlotPick;
        if width == 0 || col0 + width > n_vocab || slot >= chain::ALL_SLOTS {
            return Err(be(format!(
                "pick_into_slot: slot {slot}, columns {col0}+{width} of {n_vocab}"
            )));
        }
        let last = col0 + width == n_vocab;
        let mut guard = self
            .token_slots
            .lock()
            .map_err(|_| be("token slots lock poisoned"))?;
        if guard.is_none() {
            *guard = Some(chain::TokenSlots::new(&self.ctx, &self.stream).map_err(be)?);
        }
        let ts = guard.as_mut().ok_or_else(|| be("no token slots"))?;
        let tok_dev = dptr(&ts.dev, &self.stream) + 4 * slot as u64;
        let tok_host = ts.host_dev_ptr(slot);
        let (w, c0) = (width as i32, col0 as i32);
        let (first, last_i) = (i32::from(col0 == 0), i32::from(last));
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        match *pick {
            SlotPick::Greedy => {
                let best = dptr(&ts.best, &self.stream);
                // A block a 4096 logits, up to one an SM (their maxima meet by atomics).
                let cfg = LaunchConfig {
                    grid_dim: (width.div_ceil(4096).clamp(1, self.sms.max(1)) as u32, 1, 1),
                    ..cfg
                };
                launch!(self, "argmax_slot", cfg; xp, w, c0, best, first, last_i, tok_dev, tok_host)?;
            }
            SlotPick::Sample(how, r) => {
                if !(1..=chain::TOP_K_MAX).contains(&how.top_k) {
                    return Err(be(format!(
                        "pick_to_slot: top-k {} (1 to {})",
                        how.top_k,
                        chain::TOP_K_MAX
                    )));
                }
                let cands = dptr(&ts.candidates, &self.stream);
                let k = how.top_k as i32;
                let (temp, top_p, min_p) = (how.temperature, how.top_p, how.min_p);
                // A long chunk first in parts, a block each (their k best), so that the one
                // block of topk_slot scans at most TOPK_PARTS_MAX * k keys.
                let parts = chain::topk_parts(width);
                let parts_ptr = dptr(&ts.topk_parts, &self.stream);
                if parts > 0 {
                    let per = width.div_ceil(parts) as i32;
                    let part_cfg = LaunchConfig {
                        grid_dim: (parts as u32, 1, 1),
                        ..cfg
                    };
                    launch!(self, "topk_part", part_cfg; xp, w, c0, per, k, parts_ptr)?;
                }
                let nparts = parts as i32;
                launch!(self, "topk_slot", cfg;
                    xp, w, c0, cands, k, first, last_i, temp, top_p, min_p, r, tok_dev, tok_host,
                    parts_ptr, nparts)?;
            }
            SlotPick::Vocab(how, r) => {
                self.vocab_to_slot(ts, xp, col0, width, n_vocab, &how, r, tok_dev, tok_host)?;
            }
        }
        if last {
            if let Some(g) = &self.gaps {
                g.pass_end(&self.ctx, &self.stream).map_err(be)?;
            }
            let mut graphs = self.lock_pass_graphs()?;
            if graphs.recording() {
                // Marked after the graph's launch (end_pass_recording).
                graphs.marks.push(slot);
            } else {
                ts.mark_written(slot, &self.stream).map_err(be)?;
            }
        }
        Ok(())
    }

    /// `pick_to_slot` for whole-vocabulary sampling (kernels.cu `vocab_*`): the logits
    /// `col0..col0 + width` at `xp`; a head in chunks is gathered first, the last chunk
    /// samples.
    #[allow(clippy::too_many_arguments)]
    fn vocab_to_slot(
        &self,
        ts: &mut chain::TokenSlots,
        xp: u64,
        col0: usize,
        width: usize,
        n_vocab: usize,
        how: &flea_model::sampling::VocabSampling,
        r: f64,
        tok_dev: u64,
        tok_host: u64,
    ) -> Result<()> {
        if !self.slot_samples_vocab(how) || n_vocab > chain::VOCAB_MAX || how.temperature <= 0.0 {
            return Err(be(format!(
                "pick_to_slot: whole-vocabulary sampling of {n_vocab} logits with {how:?} \
                 (at most {} logits, a temperature above 0)",
                chain::VOCAB_MAX
            )));
        }
        let threads = 256u32;
        let grid =
            |n: usize, per_block: usize, most: usize| (n.div_ceil(per_block).clamp(1, most)) as u32;
        let src = if col0 == 0 && width == n_vocab {
            xp
        } else {
            if ts.vocab_stash.as_ref().is_none_or(|v| v.len() < n_vocab) {
                self.check_not_recording("the vocabulary's gathering buffer")?;
                ts.vocab_stash = Some(
                    self.stream
                        .alloc_zeros::<f32>(n_vocab)
                        .map_err(|e| be(format!("vocabulary gathering buffer: {e:?}")))?,
                );
            }
            let stash = ts
                .vocab_stash
                .as_ref()
                .map(|v| dptr(v, &self.stream))
                .ok_or_else(|| be("no vocabulary gathering buffer"))?;
            let cfg = LaunchConfig {
                grid_dim: (grid(width, threads as usize, 1024), 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            let (w, c0) = (width as i32, col0 as i32);
            launch!(self, "vocab_gather", cfg; xp, w, c0, stash)?;
            if col0 + width < n_vocab {
                return Ok(());
            }
            stash
        };
        let top_p = how.top_p < 1.0;
        if top_p && ts.vocab_mass.as_ref().is_none_or(|v| v.len() < 3 * n_vocab) {
            self.check_not_recording("top-p's mass buffer")?;
            ts.vocab_mass = Some(
                self.stream
                    .alloc_zeros::<u64>(3 * n_vocab)
                    .map_err(|e| be(format!("top-p's mass buffer: {e:?}")))?,
            );
        }
        let n = n_vocab as i32;
        let parts_ptr = dptr(&ts.vocab_parts, &self.stream);
        let tiles_ptr = dptr(&ts.vocab_tiles, &self.stream);
        let topp_ptr = dptr(&ts.vocab_top_p, &self.stream);
        let parts = grid(n_vocab, 8 * threads as usize, chain::VOCAB_PARTS);
        let cfg = LaunchConfig {
            grid_dim: (parts, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // With top-p, vocab_max also clears the histogram vocab_mass adds into and the
        // candidates' count.
        let zero_n = if top_p { chain::TOP_P_WORDS as i32 } else { 0 };
        launch!(self, "vocab_max", cfg; src, n, parts_ptr, topp_ptr, zero_n)?;
        let parts = parts as i32;
        // The lowest key top-p keeps (0: everything), at `keep_ptr` (null without top-p).
        let keep_ptr = if top_p {
            let mass_ptr = ts
                .vocab_mass
                .as_ref()
                .map(|v| dptr(v, &self.stream))
                .ok_or_else(|| be("no top-p mass buffer"))?;
            launch!(self, "vocab_mass", cfg; src, n, parts_ptr, parts, mass_ptr, topp_ptr)?;
            let p = how.top_p;
            // The first level's candidates listed by many blocks (256 threads: the kernel's
            // bins a thread), so that the one-block select walks them instead of the
            // vocabulary (Gemma 3's 262144 logits: one block took 207 us a call).
            let list_ptr = mass_ptr + 8 * n_vocab as u64;
            let count_ptr = topp_ptr + 8 * (chain::TOP_P_KEEP as u64 + 1);
            launch!(self, "vocab_top_p_gather", cfg;
                src, n, parts_ptr, parts, p, mass_ptr, topp_ptr, list_ptr, count_ptr)?;
            let one_block = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (1024, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(self, "vocab_top_p", one_block; parts_ptr, parts, p, list_ptr, count_ptr, topp_ptr)?;
            topp_ptr + 8 * chain::TOP_P_KEEP as u64
        } else {
            0u64
        };
        let (t, ln_min_p) = (how.temperature, how.ln_min_p());
        let warps = threads as usize / 32;
        let cfg = LaunchConfig {
            grid_dim: (grid(n_vocab, 1024 * warps, usize::MAX), 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "vocab_tiles", cfg; src, n, parts_ptr, parts, t, ln_min_p, keep_ptr, tiles_ptr)?;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "vocab_pick", cfg;
            src, n, parts_ptr, parts, t, ln_min_p, keep_ptr, tiles_ptr, r, tok_dev, tok_host)
    }

    /// Fails while a pass is recorded: `what` would allocate or copy from host memory, which
    /// a graph cannot replay (the executor then runs the pass unrecorded).
    fn check_not_recording(&self, what: &str) -> Result<()> {
        if self.recording() {
            return Err(be(format!("{what} inside a recorded pass")));
        }
        Ok(())
    }

    /// Chained decode passes recorded as CUDA graphs (default on; FLEA_CUDA_GRAPH=0 off).
    pub fn set_pass_graphs(&self, on: bool) {
        self.pass_graphs_on.store(on, Ordering::Relaxed);
    }

    /// What the recorded passes did so far.
    pub fn graph_counts(&self) -> GraphCounts {
        self.pass_graphs
            .lock()
            .map(|g| g.counts)
            .unwrap_or_default()
    }

    fn after_launch(&self, name: &str) -> Result<()> {
        self.launch_serial.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = &self.profile {
            p.lock()
                .map_err(|_| be("profile lock poisoned"))?
                .after(name, &self.ctx, &self.stream)
                .map_err(be)?;
        }
        if self.sync_each {
            self.stream
                .synchronize()
                .map_err(|e| be(format!("kernel {name} failed: {e:?}")))?;
        }
        Ok(())
    }

    /// Forget every uploaded weight (frees device memory). Needed only when a backend
    /// outlives a model; lookups also check a content fingerprint, so a new model mapped at
    /// a recycled address is not mistaken for the old one.
    pub fn clear_weights(&self) {
        self.weights.lock().unwrap().clear();
        self.vectors.lock().unwrap().clear();
        self.note_remap();
    }

    /// Device pointer of a weight's bytes, uploading them on first use.
    fn weight_ptr(&self, w: &Weight) -> Result<u64> {
        if let Some(p) = self.mapped(w.data.as_ptr() as usize, w.data.len()) {
            return Ok(p);
        }
        if self.staging_active() {
            return Err(be(format!(
                "a {}x{} {} weight is not in device memory (not staged by the executor)",
                w.rows, w.cols, w.ty
            )));
        }
        let key = (w.data.as_ptr() as usize, w.data.len());
        let fp = fingerprint(w.data);
        let mut cache = self.weights.lock().unwrap();
        if let Some((f, s)) = cache.get(&key) {
            if *f == fp {
                return Ok(dptr(s, &self.stream));
            }
        }
        self.check_not_recording("a weight upload")?;
        let s = self.stream.clone_htod(w.data).map_err(|e| {
            be(format!(
                "uploading a {} weight ({} bytes): {e:?}",
                w.ty,
                w.data.len()
            ))
        })?;
        self.uploaded
            .fetch_add(w.data.len() as u64, Ordering::Relaxed);
        let p = dptr(&s, &self.stream);
        cache.insert(key, (fp, s));
        Ok(p)
    }

    /// Device pointer of a vector weight (norm, bias) as f32.
    fn vector_ptr(&self, w: &Weight) -> Result<(u64, usize)> {
        // A norm or bias inside a placed unit: F32 is used where it lies (other types are
        // dequantized from the host copy below, which for a placed unit is the file mapping).
        if w.ty == GgmlType::F32 {
            if let Some(p) = self.mapped(w.data.as_ptr() as usize, w.data.len()) {
                return Ok((p, w.rows * w.cols));
            }
        }
        let key = (w.data.as_ptr() as usize, w.data.len());
        let fp = fingerprint(w.data);
        let mut cache = self.vectors.lock().unwrap();
        if let Some((f, s)) = cache.get(&key) {
            if *f == fp {
                return Ok((dptr(s, &self.stream), s.len()));
            }
        }
        self.check_not_recording("a vector upload")?;
        let mut v = vec![0.0f32; w.rows * w.cols];
        flea_quant::dequantize(w.ty, w.data, &mut v)?;
        let s = self
            .stream
            .clone_htod(&v)
            .map_err(|e| be(format!("uploading a vector: {e:?}")))?;
        let p = dptr(&s, &self.stream);
        cache.insert(key, (fp, s));
        Ok((p, v.len()))
    }

    fn grow<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        slot: &mut Option<CudaSlice<T>>,
        n: usize,
    ) -> Result<u64> {
        if slot.as_ref().is_none_or(|s| s.len() < n) {
            self.check_not_recording("a scratch buffer grows")?;
            *slot = None;
            let s = self
                .stream
                .alloc_zeros::<T>(n.max(1))
                .map_err(|e| be(format!("scratch alloc of {n} elements: {e:?}")))?;
            *slot = Some(s);
        }
        Ok(dptr(slot.as_ref().unwrap(), &self.stream))
    }

    /// Upload per-row i32s into a scratch buffer; returns its device address.
    fn upload_rows(&self, which: RowBuf, data: &[i32]) -> Result<u64> {
        let mut sc = self
            .scratch
            .lock()
            .map_err(|_| be("scratch lock poisoned"))?;
        let sc = &mut *sc;
        let (buf, held) = match which {
            RowBuf::Pos => (&mut sc.rowpos, &mut sc.rows_on_device[0]),
            RowBuf::Base => (&mut sc.rowbase, &mut sc.rows_on_device[1]),
            RowBuf::Kv => (&mut sc.rowkv, &mut sc.rows_on_device[2]),
            RowBuf::Tiles => (&mut sc.rowtiles, &mut sc.rows_on_device[3]),
        };
        let grown = buf.as_ref().is_none_or(|b| b.len() < data.len());
        let ptr = self.grow(buf, data.len())?;
        if !grown && held.as_slice() == data {
            return Ok(ptr);
        }
        held.clear();
        if self.recording() {
            // A recorded pass carries its rows as kernel arguments: a copy from host memory
            // would replay the bytes the slot held when it was recorded.
            if data.len() > 4 {
                return Err(be(format!("a recorded pass uploads {} rows", data.len())));
            }
            let v = |i: usize| data.get(i).copied().unwrap_or(0);
            let (v0, v1, v2, v3) = (v(0), v(1), v(2), v(3));
            let n = data.len() as i32;
            let cfg = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (32, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(self, "store_i32x4", cfg; ptr, n, v0, v1, v2, v3)?;
        } else if std::mem::size_of_val(data) <= chain::SmallUploads::SLOT_BYTES {
            // A decode pass's rows: from page-locked memory, so the host never waits here
            // for the work queued before (chain.rs).
            let mut up = self
                .small_uploads
                .lock()
                .map_err(|_| be("upload staging lock poisoned"))?;
            if up.is_none() {
                *up = Some(chain::SmallUploads::new(&self.ctx).map_err(be)?);
            }
            if let Some(up) = up.as_mut() {
                // grow() made the buffer at ptr at least data.len() long.
                up.upload(data, ptr, &self.stream).map_err(be)?;
            }
        } else if let Some(dst) = buf.as_mut() {
            let mut view = dst.slice_mut(0..data.len());
            self.stream
                .memcpy_htod(data, &mut view)
                .map_err(|e| be(format!("uploading row positions: {e:?}")))?;
        }
        held.extend_from_slice(data);
        Ok(ptr)
    }

    /// Checks an attention call's shapes; its layer's cache and each row's cache row.
    #[allow(clippy::too_many_arguments)] // the attention's buffers, as `attention` takes them
    fn attention_cache(
        &self,
        n: usize,
        q: &CudaAct,
        k: &CudaAct,
        v: &CudaAct,
        kv: &CudaKv,
        p: &AttnParams,
        out: &CudaAct,
    ) -> Result<LayerCache> {
        let hd = p.head_dim;
        let kvd = p.n_head_kv * hd;
        let shape = kv.shape;
        p.check_fits(n, &shape)?;
        for a in [q, k, v] {
            check_rows(a, n, "attention")?;
        }
        check_rows(out, n, "attention")?;
        if k.width != kvd
            || v.width != kvd
            || q.width != p.n_head * hd
            || out.width != q.width
            || kvd != shape.n_head_kv * shape.head_dim
            || p.n_head_kv == 0
            || !p.n_head.is_multiple_of(p.n_head_kv)
        {
            return Err(be("attention: shape mismatch"));
        }
        if hd > 256 {
            return Err(be(format!("attention: head_dim {hd} > 256 not supported")));
        }
        let (Some(&kc), Some(&vc)) = (kv.kp.get(p.layer), kv.vp.get(p.layer)) else {
            return Err(be(format!("attention: no cache for layer {}", p.layer)));
        };
        // check_fits bounded every row by the cache shape, which alloc_kv keeps within i32.
        let kvrow = p
            .rows
            .iter()
            .map(|r| (r.seq * shape.n_ctx + r.pos) as i32)
            .collect();
        Ok(LayerCache {
            kc,
            vc,
            n_ctx: shape.n_ctx,
            kvrow,
        })
    }

    /// Attention of the `n` rows of q over the layer's cache, their own k and v already
    /// stored in it.
    fn attend(
        &self,
        n: usize,
        q: &CudaAct,
        cache: &LayerCache,
        p: &AttnParams,
        out: &mut CudaAct,
    ) -> Result<()> {
        let (kc, vc) = (cache.kc, cache.vc);
        let hd = p.head_dim;
        let pos: Vec<i32> = p.rows.iter().map(|r| r.pos as i32).collect();
        let posp = self.upload_rows(RowBuf::Pos, &pos)?;
        let basep = self.upload_bases(p, cache.n_ctx)?;
        let max_keys = max_keys(p);
        let window = window_arg(p);
        // FLEA_CUDA_ATTN=single keeps every batch on the one-block-per-row kernels.
        if n >= ATTN_TILED_MIN_ROWS && !self.fusions_off.attn_tiled && !self.single_block_attention
        {
            if let Some(tiles) = (self.has_mma_attention() && ATTN_MMA_HEADS.contains(&hd))
                .then(|| attention_tiles(p, ATTN_MMA_TQ, ATTN_MMA_MIN_FILL))
                .flatten()
            {
                return self.attention_mma(&tiles, p, q, (kc, vc), ((posp, basep), window), out);
            }
            if let Some(tiled) = attention_tiles(p, ATTN_TQ, ATTN_TILED_MIN_FILL) {
                let chunk = tiled_attention_chunk(
                    p.head_dim,
                    tiled.span,
                    self.tiled_attention_max_span,
                    self.tiled_attention_long_room,
                );
                if tiled.span <= self.tiled_attention_max_span || chunk.is_some() {
                    let rows = ((posp, basep), window, chunk);
                    return self.attention_tiled(&tiled, p, q, (kc, vc), rows, out);
                }
            }
        }
        if let Some(plan) = self.cluster_attention_fits(n, p, max_keys) {
            let rows = ((posp, basep), window, plan);
            return self.attention_cluster(p, q, (kc, vc), rows, None, out);
        }
        if !self.single_block_attention
            && takes_rows_attention(
                (n, p.n_head, hd, max_keys),
                self.rows_attention_from.load(Ordering::Relaxed),
                self.rows_attention_min_blocks.load(Ordering::Relaxed),
            )
        {
            return self.attention_rows(p, q, (kc, vc), (posp, basep), window, max_keys, out);
        }
        if let Some(split) = AttnSplit::plan(n, p.n_head, hd, max_keys, self.single_block_attention)
        {
            return self.attention_split(
                &split,
                p,
                q,
                (kc, vc, cache.n_ctx),
                (posp, basep),
                window,
                out,
            );
        }
        let smem = max_keys * 4;
        let use_smem = smem <= 44 * 1024;
        let cfg = LaunchConfig {
            grid_dim: (p.n_head as u32, n as u32, 1),
            block_dim: (if use_smem { 256 } else { 128 }, 1, 1),
            shared_mem_bytes: if use_smem { smem as u32 } else { 0 },
        };
        let kname = if use_smem {
            "attention_smem"
        } else {
            "attention"
        };
        let (qp, op) = (q.ptr, out.ptr);
        let AttnArgs(nh, group, hdi, kvdi, scale) = AttnArgs::of(p);
        launch!(self, kname, cfg; qp, kc, vc, op, nh, group, hdi, kvdi, posp, basep, window, scale)
    }

    /// Prompt attention in tiles of rows that share their K/V loads (`attention_tiled`; with
    /// `chunk`, `attention_tiled_long` over the keys in chunks of that many).
    fn attention_tiled(
        &self,
        t: &AttnTiles,
        p: &AttnParams,
        q: &CudaAct,
        (kc, vc): (u64, u64),
        ((posp, basep), window, chunk): ((u64, u64), i32, Option<usize>),
        out: &mut CudaAct,
    ) -> Result<()> {
        let tilesp = self.upload_rows(RowBuf::Tiles, &t.starts)?;
        // Scores of a tile's rows: its whole span, or a chunk of it.
        let (kname, keys) = match chunk {
            Some(c) => ("attention_tiled_long", c),
            None => ("attention_tiled", t.span),
        };
        let cfg = LaunchConfig {
            grid_dim: (p.n_head as u32, (t.starts.len() - 1) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: (ATTN_TQ * keys * 4) as u32,
        };
        let (qp, op, keys) = (q.ptr, out.ptr, keys as i32);
        let AttnArgs(nh, group, hdi, kvdi, scale) = AttnArgs::of(p);
        launch!(self, kname, cfg; qp, kc, vc, op, nh, group, hdi, kvdi, posp, basep, tilesp, window, scale, keys)
    }

    /// Prompt attention on tensor cores (`attention_mma_h*`): a block of 4 warps per head and
    /// tile of up to ATTN_MMA_TQ rows, two passes over the keys in chunks (each row's maximum
    /// and sum, then the probabilities times V).
    fn attention_mma(
        &self,
        t: &AttnTiles,
        p: &AttnParams,
        q: &CudaAct,
        (kc, vc): (u64, u64),
        ((posp, basep), window): ((u64, u64), i32),
        out: &mut CudaAct,
    ) -> Result<()> {
        let tilesp = self.upload_rows(RowBuf::Tiles, &t.starts)?;
        let cfg = LaunchConfig {
            grid_dim: (p.n_head as u32, (t.starts.len() - 1) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: mma_attention_smem(p.head_dim) as u32,
        };
        let kname = mma_attention_kernel(p.head_dim);
        let (qp, op) = (q.ptr, out.ptr);
        let AttnArgs(nh, group, _, kvdi, scale) = AttnArgs::of(p);
        self.mma_attention_calls.fetch_add(1, Ordering::Relaxed);
        launch!(self, kname, cfg; qp, kc, vc, op, nh, group, kvdi, posp, basep, tilesp, window, scale)
    }

    /// Whether q's and k's RoPE share everything but the head count (as the forward pass
    /// builds them), so one launch can rotate both.
    fn rope_pair_fits(pq: &RopeParams, pk: &RopeParams) -> bool {
        pq.head_dim == pk.head_dim
            && pq.rope_dims == pk.rope_dims
            && pq.base == pk.base
            && pq.style == pk.style
            && pq.rows == pk.rows
    }

    /// Each row's first cache row (its sequence's slot), uploaded for the attention kernels.
    fn upload_bases(&self, p: &AttnParams, n_ctx: usize) -> Result<u64> {
        let base: Vec<i32> = p.rows.iter().map(|r| (r.seq * n_ctx) as i32).collect();
        self.upload_rows(RowBuf::Base, &base)
    }

    /// Keys per block of `attn_cluster` for this batch (a single decode row, 64- or 128-dim
    /// heads, at most ATTN_CLUSTER_MAX_KEYS keys, its shared memory
    /// within the opted-in room), or None: the split kernels take it.
    fn cluster_attention_fits(
        &self,
        n: usize,
        p: &AttnParams,
        max_keys: usize,
    ) -> Option<ClusterPlan> {
        let on = self.fusion()
            && self.cluster_attention.load(Ordering::Relaxed)
            && !self.fusions_off.attn_cluster
            && !self.single_block_attention;
        if !on || n != 1 || p.rows.len() != 1 {
            return None;
        }
        // The 16-block clusters hold V in registers: only with those kernels on.
        let wide = if self.cluster_attention_vreg.load(Ordering::Relaxed) {
            self.wide_cluster_room
        } else {
            0
        };
        let wide_from = self.wide_cluster_from.load(Ordering::Relaxed);
        let stream = (
            self.stream_attention_room,
            self.stream_attention_from.load(Ordering::Relaxed),
        );
        let room = if p.head_dim > 128 {
            self.cluster_attention_room_h256
        } else {
            self.cluster_attention_room
        };
        let hpc = self.cluster_attention_heads(p.head_dim);
        cluster_attention_plan(p, max_keys, room, (wide, wide_from), stream, hpc)
    }

    /// Heads a decode-attention cluster covers: 256 / hd (a Q8_K block of the output) where
    /// the next mat-vec reads Q8_K, else one, so that each head has all the cluster's blocks
    /// (Qwen2.5's 14 and SmolLM2's 9 heads of 64 dims: 8 or 16 blocks a head instead of 2 or
    /// 4). Read from the `output_feeds` hint the attention takes next (not taken here).
    fn cluster_attention_heads(&self, hd: usize) -> usize {
        let q8_0 = self.feeds.load(Ordering::Relaxed) == FEEDS_Q8_0;
        if hd >= 256 || (q8_0 && !self.fusions_off.attn_heads) {
            1
        } else {
            256 / hd.max(1)
        }
    }

    /// Whether `rope_kv` (RoPE and the cache store in one launch) takes this RoPE: q's and k's
    /// parameters those of the attention, rotated dims even and within the head.
    fn rope_kv_fits(&self, pq: &RopeParams, pk: &RopeParams, p: &AttnParams) -> bool {
        let (hd, nd) = (pq.head_dim, pq.rope_dims);
        self.fusion()
            && !self.fusions_off.rope_kv
            && Self::rope_pair_fits(pq, pk)
            && pq.rows == p.rows
            && hd == p.head_dim
            && pq.n_heads == p.n_head
            && pk.n_heads == p.n_head_kv
            && nd > 0
            && nd <= hd
            && nd.is_multiple_of(2)
    }

    /// RoPE, the cache store and the attention of a decode row in one cluster launch (with
    /// `bias`, q's, k's and v's biases added first), where it applies: Ok(false), having done
    /// nothing, where not.
    #[allow(clippy::too_many_arguments)] // rope_attention's arguments and the biases
    fn cluster_rope_attention(
        &self,
        n: usize,
        q: &CudaAct,
        k: &CudaAct,
        v: &CudaAct,
        kv: &mut CudaKv,
        (pq, pk): (&RopeParams, &RopeParams),
        p: &AttnParams,
        bias: Option<QkvBias<'_>>,
        out: &mut CudaAct,
    ) -> Result<bool> {
        // The 256-dim kernels take rows rotated and stored by the launches before.
        if !self.rope_kv_fits(pq, pk, p) || p.head_dim > 128 {
            return Ok(false);
        }
        let Some(plan) = self.cluster_attention_fits(n, p, max_keys(p)) else {
            return Ok(false);
        };
        let cache = self.attention_cache(n, q, k, v, kv, p, out)?;
        // The biases' device addresses, each as wide as its projection (0: none).
        let mut bias_ptrs = [0u64; 3];
        if let Some(b) = bias {
            for (ptr, (w, act)) in bias_ptrs.iter_mut().zip([(b.q, q), (b.k, k), (b.v, v)]) {
                let (bp, len) = self.vector_ptr(w)?;
                if len != act.width {
                    return Err(be("rope_attention_biased: bias width mismatch"));
                }
                *ptr = bp;
            }
        }
        // The cluster attention rotates q and the new k and stores the new K/V row itself.
        let (theta_scale, neox, posp) = self.rope_args(pq)?;
        let basep = self.upload_bases(p, cache.n_ctx)?;
        let window = window_arg(p);
        let rope = ClusterRope {
            k: k.ptr,
            v: v.ptr,
            nd: pq.rope_dims as i32,
            theta_scale,
            neox,
            bias: (bias_ptrs[0], bias_ptrs[1], bias_ptrs[2]),
        };
        let rows = ((posp, basep), window, plan);
        self.attention_cluster(p, q, (cache.kc, cache.vc), rows, Some(rope), out)?;
        Ok(true)
    }

    /// Decode attention of one row in thread-block clusters (`attn_cluster`): a cluster per
    /// 256 outputs, each head split over its blocks by key range; the output quantised to
    /// Q8_K for the next mat-vec by the kernel.
    #[allow(clippy::too_many_arguments)] // the attention's inputs, spelled out
    fn attention_cluster(
        &self,
        p: &AttnParams,
        q: &CudaAct,
        (kc, vc): (u64, u64),
        ((posp, basep), window, plan): ((u64, u64), i32, ClusterPlan),
        rope: Option<ClusterRope>,
        out: &mut CudaAct,
    ) -> Result<()> {
        let width = out.width;
        // The outputs quantised for the output projection: to Q8_0 where its type reads that
        // (output_feeds; heads past n_head are not written), else to Q8_K for whole clusters.
        let fmt = if self.take_feeds() == FEEDS_Q8_0 && !self.fusions_off.attn_q8_0 {
            mmvq::ActFmt::Q8_0
        } else {
            mmvq::ActFmt::Q8K
        };
        let ClusterPlan {
            kps_max,
            blocks,
            stream,
            hpc,
        } = plan;
        // Q8_K blocks are 256 outputs: a cluster of fewer leaves the quantising to the
        // mat-vec's own launch.
        let whole_q8k = hpc * p.head_dim == 256;
        let quant = if self.fusions_off.attn_q8k || (fmt == mmvq::ActFmt::Q8K && !whole_q8k) {
            None
        } else {
            self.fused_int8_scratch(1, width, width, fmt)?
        };
        let q8_0 = i32::from(quant.is_some() && fmt == mmvq::ActFmt::Q8_0);
        // The kernel's invariants: a cluster's blocks split evenly over its heads, and its
        // outputs whole Q8_0 blocks (32 outputs).
        if hpc == 0 || !blocks.is_multiple_of(hpc) || !(hpc * p.head_dim).is_multiple_of(32) {
            return Err(be(format!(
                "attention_cluster: {hpc} heads of {} in clusters of {blocks}",
                p.head_dim
            )));
        }
        // The last cluster may hold phantom heads past n_head (see AtcPart in kernels.cu).
        let clusters = p.n_head.div_ceil(hpc);
        let vreg = if stream {
            None
        } else if blocks == ATTN_WIDE_CLUSTER_BLOCKS {
            Some(ATTN_WIDE_CLUSTER_KERNEL)
        } else if self.cluster_attention_vreg.load(Ordering::Relaxed) {
            cluster_attention_vreg_kernel(kps_max, p.head_dim)
        } else {
            None
        };
        if vreg.is_some() {
            self.set_cluster_attention_carveout(p.n_head * p.head_dim)?;
        }
        let (kernel, smem) = match (stream, vreg) {
            (true, _) => (ATTN_STREAM_KERNEL, stream_attention_smem(kps_max)),
            (false, Some(name)) => (name, cluster_attention_vreg_smem(kps_max, p.head_dim)),
            (false, None) => (
                cluster_attention_kernels(p.head_dim)[0],
                cluster_attention_smem(kps_max, p.head_dim),
            ),
        };
        let cfg = LaunchConfig {
            grid_dim: ((clusters * blocks) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let cluster = cluster_dim_attr(blocks);
        let mut both = [cluster, self.pdl_attr().unwrap_or(cluster)];
        let attrs = &mut both[..1 + usize::from(self.pdl)];
        let AttnArgs(_, group, hdi, kvdi, scale) = AttnArgs::of(p);
        let (qp, op, kps, nh) = (q.ptr, out.ptr, kps_max as i32, p.n_head as i32);
        let hpc = hpc as i32;
        let (xq, xd, xs) = quant.unwrap_or((0, 0, 0));
        // Without RoPE nd = 0: k and v are never read (any valid pointer).
        let ClusterRope {
            k: kp,
            v: vp,
            nd,
            theta_scale,
            neox,
            bias: (bq, bk, bv),
        } = rope.unwrap_or(ClusterRope {
            k: qp,
            v: qp,
            nd: 0,
            theta_scale: 1.0,
            neox: 0,
            bias: (0, 0, 0),
        });
        // q holds n_head * hd f32 (k and v n_head_kv * hd with RoPE), the caches every row
        // the window reaches (attention_cache checked the row), out width f32, the Q8_K
        // scratch width values; the grid is whole clusters and the shared memory within the
        // opted-in room (cluster_attention_fits).
        launch!(self, kernel, cfg, attrs; qp, kc, vc, group, hdi, kvdi, posp, basep, window, scale, kps, op, xq, xd, xs, kp, vp, nd, theta_scale, neox, nh, bq, bk, bv, q8_0, hpc)?;
        self.cluster_attention_calls.fetch_add(1, Ordering::Relaxed);
        match quant {
            Some((xq, ..)) => self.note_prequant(op, width, xq),
            None => Ok(()),
        }
    }

    /// A batch's decode attention with one block a (head, row) over all of the row's keys
    /// (`attn_rows` in kernels.cu; `rows_attention_fits` checked the shape).
    #[allow(clippy::too_many_arguments)] // the attention's inputs, spelled out
    fn attention_rows(
        &self,
        p: &AttnParams,
        q: &CudaAct,
        (kc, vc): (u64, u64),
        (posp, basep): (u64, u64),
        window: i32,
        max_keys: usize,
        out: &mut CudaAct,
    ) -> Result<()> {
        let n = p.rows.len();
        let width = out.width;
        // Output rows feeding an int8 mat-vec are quantised as each 256-block's last head
        // is written (whole heads per 256-block: 256 % hd == 0).
        let q8k = if !self.fusions_off.attn_q8k {
            self.fused_q8k_scratch(n, width, width)?
        } else {
            None
        };
        let done = {
            let mut sc = self
                .scratch
                .lock()
                .map_err(|_| be("scratch lock poisoned"))?;
            self.grow(&mut sc.attn_done, (n * width).div_ceil(256))?
        };
        let cfg = LaunchConfig {
            grid_dim: (p.n_head as u32, n as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: (max_keys * 4) as u32,
        };
        let (qp, op) = (q.ptr, out.ptr);
        let AttnArgs(nh, group, hdi, kvdi, scale) = AttnArgs::of(p);
        let (xq, xd, xs) = q8k.unwrap_or((0, 0, 0));
        launch!(self, "attn_rows", cfg; qp, kc, vc, nh, group, hdi, kvdi, posp, basep, window, scale, op, done, xq, xd, xs)?;
        self.rows_attention_calls.fetch_add(1, Ordering::Relaxed);
        match q8k {
            Some((xq, ..)) => self.note_prequant(op, n * width, xq),
            None => Ok(()),
        }
    }

    /// Attention split over the keys (see `attn_split_*` in kernels.cu): scores and chunk
    /// stats, then probabilities times V per chunk, the last chunk of each head adding all
    /// the chunks in order.
    #[allow(clippy::too_many_arguments)] // the attention's inputs, spelled out
    fn attention_split(
        &self,
        s: &AttnSplit,
        p: &AttnParams,
        q: &CudaAct,
        (kc, vc, n_ctx): (u64, u64, usize),
        (posp, basep): (u64, u64),
        window: i32,
        out: &mut CudaAct,
    ) -> Result<()> {
        // Output rows feeding an int8 mat-vec are quantised by the P.V kernel as each
        // 256-block's last head is written (whole heads per 256-block only).
        let width = out.width;
        let q8k = if 256 % s.hd == 0 && !self.fusions_off.attn_q8k {
            self.fused_q8k_scratch(s.rows, width, width)?
        } else {
            None
        };
        // Counters: one per (row, head), one per 256-block of the output, then the one-
        // launch kernels' arrivals, one per (row, head).
        let arrivals_at = s.rows * p.n_head + (s.rows * width).div_ceil(256);
        let (base, done) = {
            let mut sc = self
                .scratch
                .lock()
                .map_err(|_| be("scratch lock poisoned"))?;
            // Room for the cache's whole context at once (within the limit), so that a decode
            // step one key longer than the last does not reallocate the buffer inside a pass
            // being recorded as a CUDA graph (which makes the recording fail).
            let whole = AttnSplit {
                maxk: s.maxk.max(n_ctx),
                maxc: s.maxc.max(n_ctx.div_ceil(ATTN_CHUNK)),
                ..*s
            };
            let floats = if whole.floats() * 4 <= ATTN_SPLIT_MAX_BYTES {
                whole.floats()
            } else {
                s.floats()
            };
            let base = self.grow(&mut sc.attn_split, floats)?;
            (
                base,
                self.grow(&mut sc.attn_done, arrivals_at + s.rows * p.n_head)?,
            )
        };
        let arrived = done + 4 * arrivals_at as u64;
        let (scores, stats, part) = (
            base,
            base + 4 * s.scores_floats() as u64,
            base + 4 * (s.scores_floats() + s.stats_floats()) as u64,
        );
        let grid = (p.n_head as u32, s.rows as u32, s.maxc as u32);
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (qp, maxk, maxc) = (q.ptr, s.maxk as i32, s.maxc as i32);
        let AttnArgs(nh, group, hdi, kvdi, scale) = AttnArgs::of(p);
        let op = out.ptr;
        let (xq, xd, xs) = q8k.unwrap_or((0, 0, 0));
        // The one-launch kernels' blocks wait for each other: the whole grid must be
        // resident. One chunk per block where that fits, else up to ATTN_MAX_CPB.
        let [cap1, cap8] = self
            .fused_attention_blocks
            .each_ref()
            .map(|c| c.load(Ordering::Relaxed));
        let fits = |cpb: usize, cap: usize| s.rows * p.n_head * s.maxc.div_ceil(cpb) <= cap;
        let one_launch = if fits(1, cap1) {
            Some(("attn_split_fused", 1))
        } else {
            (2..=ATTN_MAX_CPB)
                .find(|&c| fits(c, cap8))
                .map(|c| ("attn_split_fused8", c))
        };
        if let (true, Some((kname, cpb))) =
            (self.fusion() && !self.fusions_off.attn_one, one_launch)
        {
            let cfg = LaunchConfig {
                grid_dim: (grid.0, grid.1, s.maxc.div_ceil(cpb) as u32),
                ..cfg
            };
            let cpbi = cpb as i32;
            launch!(self, kname, cfg; qp, kc, vc, stats, part, nh, group, hdi, kvdi, posp, basep, window, scale, maxc, cpbi, op, done, arrived, xq, xd, xs)?;
        } else {
            launch!(self, "attn_split_scores", cfg; qp, kc, scores, stats, nh, group, hdi, kvdi, posp, basep, window, scale, maxk, maxc)?;
            launch!(self, "attn_split_pv", cfg; vc, scores, stats, part, nh, group, hdi, kvdi, posp, basep, window, maxk, maxc, op, done, xq, xd, xs)?;
        }
        match q8k {
            Some((xq, ..)) => self.note_prequant(op, s.rows * width, xq),
            None => Ok(()),
        }
    }

    fn check_weight(w: &Weight) -> Result<()> {
        if type_info(w.ty).is_none() {
            return Err(be(format!(
                "CUDA backend: unsupported weight type {} (supported: F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K)",
                w.ty
            )));
        }
        let want = w.rows * w.row_bytes();
        if w.data.len() != want
            || !w.cols.is_multiple_of(w.ty.block_size())
            || !w.cols.is_multiple_of(8)
        {
            return Err(be(format!(
                "weight {}x{} {} has {} bytes, expected {want}",
                w.rows,
                w.cols,
                w.ty,
                w.data.len()
            )));
        }
        Ok(())
    }

    /// Round `n*cols` activations at `x` for weight type mode into scratch; f32 and/or f16.
    fn round_acts(&self, x: u64, total: usize, mode: i32, yf: u64, yh: u64) -> Result<()> {
        let blk = if mode == 2 { 256 } else { 32 };
        let nblk = total.div_ceil(blk);
        let cfg = LaunchConfig {
            grid_dim: (nblk.div_ceil(4) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let n = total as i64;
        let f = self.func("act_round")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&x).arg(&yf).arg(&yh).arg(&n).arg(&mode);
        unsafe { b.launch(cfg) }.map_err(|e| be(format!("kernel act_round: {e:?}")))?;
        self.after_launch("act_round")
    }

    /// The rope kernels' shared arguments: the frequency ratio, the NeoX flag and the rows'
    /// positions on the device.
    fn rope_args(&self, p: &RopeParams) -> Result<(f32, i32, u64)> {
        let theta_scale = p.base.powf(-2.0 / p.rope_dims as f32);
        let neox = matches!(p.style, RopeStyle::Neox) as i32;
        let pos: Vec<i32> = p.rows.iter().map(|r| r.pos as i32).collect();
        Ok((theta_scale, neox, self.upload_rows(RowBuf::Pos, &pos)?))
    }

    /// `f` on the token slots of a chained decode, which `pick_to_slot` made.
    fn with_token_slots<R>(
        &self,
        what: &str,
        f: impl FnOnce(&chain::TokenSlots) -> Result<R>,
    ) -> Result<R> {
        let guard = self
            .token_slots
            .lock()
            .map_err(|_| be("token slots lock poisoned"))?;
        let ts = guard
            .as_ref()
            .ok_or_else(|| be(format!("{what}: no token was put in a slot")))?;
        f(ts)
    }

    /// The embedding kernel for `n` rows: `wp` the table on the device, `tp` its `n` token
    /// ids there (checked below the table's rows by the caller).
    fn launch_embed(
        &self,
        table: &Weight,
        wp: u64,
        tp: u64,
        n: usize,
        scale: f32,
        out: &CudaAct,
    ) -> Result<()> {
        let (suffix, _) = type_info(table.ty).ok_or_else(|| be("embed: unsupported type"))?;
        let units = n * table.cols / 8;
        let cfg = Self::launch_1d(units);
        let (op, n_i, cols, rb) = (
            out.ptr,
            n as i32,
            table.cols as i32,
            table.row_bytes() as i64,
        );
        launch!(self, &format!("embed_{suffix}"), cfg; wp, tp, op, n_i, cols, rb, scale)?;
        match &self.gaps {
            Some(g) => g.embed_end(&self.ctx, &self.stream, n).map_err(be),
            None => Ok(()),
        }
    }

    /// One thread per element, 256 per block.
    fn launch_1d(total: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (total.div_ceil(256).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// The Q8_K scratch at `base` holds the quantisation of `total` f32 at `x`, written when the
/// launch counter stood at `serial`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Prequant {
    x: u64,
    total: usize,
    base: u64,
    serial: u64,
}

/// Fusions that FLEA_CUDA_FUSE_OFF (a comma-separated list of these names) turns off one by
/// one, for measuring each (all of them compute the same bits as the separate launches):
/// `rope_kv` (RoPE and the cache store in one launch), `norm_add` (Gemma 3's post-norm and
/// residual add in one launch), `head_norm` (Gemma 3's q/k head norms with `rope_kv`'s work), `attn_bias` (Qwen2's q/k/v biases added
/// by the decode cluster attention instead of three `add_bias` launches), `q8_0` (a decode
/// norm, attention or GLU quantising its output to Q8_0 for the Q8_0-type mat-vec reading
/// it, instead of an `act_q8_0` launch; `attn_q8_0`: all but the attention), `attn_q8k` (the split attention
/// quantises its output for the next mat-vec), `attn_one` (the split attention's two halves
/// in one launch), `mixed` (Q4_K and Q6_K matrices of one input in one mat-vec launch);
/// `attn_tiled` (prompt rows in tiles sharing their K/V loads), `attn_cluster` (a decode
/// row's attention in thread-block clusters) and `mmvq_sa` (one-token mat-vecs reading their
/// int8 activations from shared memory; a Q6_K row's last steps are added as one group) and
/// `mmvq_whole_row` (Q4_K rows of 4096 or 5120 columns with all their loads in flight; their
/// steps added as one group) and `mmvq_q6_steps` (resident Q6_K rows with 4 steps of loads in
/// flight, not 3) change the summation order; `mmvq_sa_rows` (Q6_K's shared-activation kernel taking two
/// rows a warp in sequence) and `mmq_group` (matrices of one tensor-core kernel and input in
/// one launch) do not; `attn_heads` (a decode-attention cluster per head where the output
/// projection reads Q8_0, instead of 256 / hd heads) splits a head's keys over other blocks,
/// so its sums differ.
#[derive(Clone, Copy, Debug, Default)]
struct FusionsOff {
    rope_kv: bool,
    attn_bias: bool,
    q8_0: bool,
    attn_q8_0: bool,
    attn_q8k: bool,
    attn_one: bool,
    mixed: bool,
    attn_tiled: bool,
    attn_mma: bool,
    attn_cluster: bool,
    norm_add: bool,
    head_norm: bool,
    pub(crate) mmvq_sa: bool,
    pub(crate) mmvq_sa_rows: bool,
    pub(crate) mmvq_whole_row: bool,
    pub(crate) mmvq_q6_steps: bool,
    mmq_group: bool,
    attn_heads: bool,
}

impl FusionsOff {
    fn from_env() -> Self {
        let v = std::env::var("FLEA_CUDA_FUSE_OFF").unwrap_or_default();
        let has = |name: &str| v.split(',').any(|s| s.trim() == name);
        FusionsOff {
            rope_kv: has("rope_kv"),
            attn_bias: has("attn_bias"),
            q8_0: has("q8_0"),
            attn_q8_0: has("attn_q8_0"),
            attn_q8k: has("attn_q8k"),
            attn_one: has("attn_one"),
            mixed: has("mixed"),
            attn_tiled: has("attn_tiled"),
            attn_mma: has("attn_mma"),
            attn_cluster: has("attn_cluster"),
            norm_add: has("norm_add"),
            head_norm: has("head_norm"),
            mmvq_sa: has("mmvq_sa"),
            mmvq_sa_rows: has("mmvq_sa_rows"),
            mmvq_whole_row: has("mmvq_whole_row"),
            mmvq_q6_steps: has("mmvq_q6_steps"),
            mmq_group: has("mmq_group"),
            attn_heads: has("attn_heads"),
        }
    }
}

/// One layer's cache as an attention call sees it: the K and V arrays' device addresses, the
/// positions per sequence slot, and each row's cache row.
struct LayerCache {
    kc: u64,
    vc: u64,
    n_ctx: usize,
    kvrow: Vec<i32>,
}

/// The attention kernels' shape arguments: heads, heads per KV head, head size, KV row
/// width, score scale (all within i32: `attention_cache` checked the shapes).
struct AttnArgs(i32, i32, i32, i32, f32);

/// Most keys any row of the batch sees.
fn max_keys(p: &AttnParams) -> usize {
    let last = p.rows.iter().map(|r: &Row| r.pos + 1).max().unwrap_or(1);
    match p.window {
        Some(w) => last.min(w.max(1)),
        None => last,
    }
}

/// The attention kernels' window argument: its size, or 0 for none.
fn window_arg(p: &AttnParams) -> i32 {
    p.window.map_or(0, |w| w.max(1) as i32)
}

/// What `attn_cluster` needs to do rope_kv's work too: the row's unrotated k and its v, the
/// rotated dims (0: none, q already rotated and the row stored), the angle step and style.
#[derive(Clone, Copy)]
struct ClusterRope {
    k: u64,
    v: u64,
    nd: i32,
    theta_scale: f32,
    neox: i32,
    /// The q, k and v biases' device addresses (0: none), as wide as q, k and v.
    bias: (u64, u64, u64),
}

/// A decode row's cluster attention: blocks a cluster (ATTN_CLUSTER_BLOCKS, or
/// ATTN_WIDE_CLUSTER_BLOCKS for `attn_cluster16_v64` and `attn_stream16`), keys a block at
/// most, and whether the K/V rows stream through shared memory (`attn_stream16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ClusterPlan {
    kps_max: usize,
    blocks: usize,
    stream: bool,
    /// Heads a cluster (`cluster_attention_heads`).
    hpc: usize,
}

/// `output_feeds`'s hints (CudaBackend::feeds): none, Q8_K or Q8_0 activations.
const FEEDS_NONE: u8 = 0;
const FEEDS_Q8K: u8 = 1;
const FEEDS_Q8_0: u8 = 2;

/// The cluster attention for a decode row seeing `max_keys` keys, or None where it does not
/// apply: heads of 64 or 128 dims (a cluster covers a Q8_K block of the output, 256 / hd
/// heads; the last one's heads past n_head are phantoms), whole kv-head groups, and then from `stream.1` keys the streaming 16-block clusters with
/// their shared memory within `stream.0` (0: not on this device), else either 8-block clusters
/// up to ATTN_CLUSTER_MAX_KEYS keys with the block's shared memory within `room` (0: no
/// clusters on this device), or from `wide.1` keys up to ATTN_WIDE_CLUSTER_MAX_KEYS 16-block
/// clusters with V in registers (at most 64 keys a thread) within `wide.0` (0: not on this
/// device).
fn cluster_attention_plan(
    p: &AttnParams,
    max_keys: usize,
    room: usize,
    wide: (usize, usize),
    stream: (usize, usize),
    hpc: usize,
) -> Option<ClusterPlan> {
    let hd = p.head_dim;
    if !(hd == 64 || hd == 128 || hd == 256)
        || p.n_head == 0
        || p.n_head_kv == 0
        || !p.n_head.is_multiple_of(p.n_head_kv)
        || !(hpc == 1 || hpc * hd == 256)
    {
        return None;
    }
    // A cluster holds hpc heads, each over blocks / hpc blocks.
    let plan = |blocks: usize| ClusterPlan {
        kps_max: max_keys.div_ceil(blocks / hpc).max(1),
        blocks,
        stream: false,
        hpc,
    };
    let w = plan(ATTN_WIDE_CLUSTER_BLOCKS);
    let (stream_room, stream_from) = stream;
    // The 16-block and streaming kernels take heads of up to 128 dims.
    if max_keys >= stream_from
        && stream_room > 0
        && hd <= 128
        && stream_attention_smem(w.kps_max) <= stream_room
    {
        return Some(ClusterPlan { stream: true, ..w });
    }
    let (wide_room, wide_from) = wide;
    if max_keys >= wide_from
        && hd <= 128
        && max_keys <= ATTN_WIDE_CLUSTER_MAX_KEYS
        && cluster_attention_vreg_kernel(w.kps_max, hd).is_some()
        && cluster_attention_vreg_smem(w.kps_max, hd) <= wide_room
    {
        return Some(w);
    }
    let c = plan(ATTN_CLUSTER_BLOCKS);
    (max_keys <= ATTN_CLUSTER_MAX_KEYS && cluster_attention_smem(c.kps_max, hd) <= room)
        .then_some(c)
}

/// The launch attribute for clusters of `blocks` blocks along x.
fn cluster_dim_attr(blocks: usize) -> cudarc::driver::sys::CUlaunchAttribute {
    use cudarc::driver::sys;
    sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION,
        pad: [0; 4],
        value: sys::CUlaunchAttributeValue {
            clusterDim: sys::CUlaunchAttributeValue_union__bindgen_ty_1 {
                x: blocks as u32,
                y: 1,
                z: 1,
            },
        },
    }
}

/// Opts a 16-block cluster kernel (`attn_cluster16_v64`, `attn_stream16`) into 16-block
/// clusters (a non-portable size) and the device's largest shared memory per block, and
/// returns that room in bytes if the driver can place at least one such cluster of blocks of
/// `smem` dynamic bytes (its largest use) at once, else 0.
fn wide_cluster_opt_in(
    ctx: &CudaContext,
    stream: &CudaStream,
    f: &CudaFunction,
    smem: usize,
) -> usize {
    use cudarc::driver::sys;
    let room = opt_in_all(ctx, f);
    let allowed = f.set_attribute(
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
        1,
    );
    if room < smem || allowed.is_err() {
        return 0;
    }
    let mut cluster = [cluster_dim_attr(ATTN_WIDE_CLUSTER_BLOCKS)];
    let config = sys::CUlaunchConfig {
        gridDimX: ATTN_WIDE_CLUSTER_BLOCKS as u32,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: 128,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem as u32,
        hStream: stream.cu_stream(),
        attrs: cluster.as_mut_ptr(),
        numAttrs: 1,
    };
    let mut clusters: std::ffi::c_int = 0;
    // SAFETY: `config` and its one attribute live through the call, the function belongs to
    // this context's module, and the context is current (its module was just loaded).
    let counted =
        unsafe { sys::cuOccupancyMaxActiveClusters(&mut clusters, f.cu_function(), &config) };
    if counted == sys::CUresult::CUDA_SUCCESS && clusters > 0 {
        room
    } else {
        0
    }
}

/// The decode cluster attention kernels: K and V rows staged in shared memory, then V in
/// registers for up to 16 / 36 / 64 keys a thread (`attn_cluster_v*`).
const ATTN_CLUSTER_KERNELS: [&str; 4] = [
    "attn_cluster",
    "attn_cluster_v16",
    "attn_cluster_v36",
    "attn_cluster_v64",
];

/// The same for 256-dim heads (Gemma 3; `_h256`: larger exchange buffers, no fused RoPE).
const ATTN_CLUSTER_KERNELS_H256: [&str; 4] = [
    "attn_cluster_h256",
    "attn_cluster_v16_h256",
    "attn_cluster_v36_h256",
    "attn_cluster_v64_h256",
];

/// The cluster attention kernels for heads of `hd` dims (64, 128 or 256).
fn cluster_attention_kernels(hd: usize) -> &'static [&'static str; 4] {
    if hd > 128 {
        &ATTN_CLUSTER_KERNELS_H256
    } else {
        &ATTN_CLUSTER_KERNELS
    }
}

/// The `attn_cluster_v*` kernel that holds a block's `kps_max` keys' V words in registers
/// (a thread takes every G-th key, G = 512 / hd), or None if more than 64 keys a thread.
fn cluster_attention_vreg_kernel(kps_max: usize, hd: usize) -> Option<&'static str> {
    let per_thread = kps_max.div_ceil(512 / hd);
    [(16, 1), (36, 2), (64, 3)]
        .iter()
        .find(|(most, _)| per_thread <= *most)
        .map(|&(_, i)| cluster_attention_kernels(hd)[i])
}

/// FLEA_CUDA_ATTN_VREG: whether the decode cluster attention holds V in registers
/// (`attn_cluster_v*`) and the shared-memory carve-out it prefers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AttnVreg {
    /// `attn_cluster` only (`off` or `0`).
    Off,
    /// The configuration of the mat-vecs it runs between (empty or `on`, the default):
    /// matvec_carveout_percent.
    FollowMatVecs,
    /// This carve-out in percent (1..=100).
    Percent(i32),
}

fn attention_vreg_setting(value: &str) -> std::result::Result<AttnVreg, CudaError> {
    match value.trim() {
        "" | "on" => Ok(AttnVreg::FollowMatVecs),
        "off" | "0" => Ok(AttnVreg::Off),
        v => match v.parse::<i32>() {
            Ok(p) if (1..=100).contains(&p) => Ok(AttnVreg::Percent(p)),
            _ => Err(CudaError(format!(
                "FLEA_CUDA_ATTN_VREG={v}: expected on, off or a carve-out percent 1-100"
            ))),
        },
    }
}

/// An SM's shared memory and threads (device attributes).
#[derive(Clone, Copy, Debug)]
struct SmShared {
    /// Shared memory an SM has at most (the largest configuration), bytes.
    per_sm: usize,
    /// Shared memory the system reserves in each block, bytes.
    reserved: usize,
    /// Threads an SM holds at most.
    threads: usize,
}

/// The carve-out (percent of the SM's shared memory, rounded up) that puts the SM in the
/// configuration a one-token mat-vec of `cols` Q8_K columns gets on its own: as many
/// 128-thread blocks as the SM holds threads for, each with its activations (`sa_bytes`) and
/// the reserved part. That is what Nsight Compute showed (H200: 4096 columns 100 KB, 5120
/// columns 132 KB), and the attention between such mat-vecs is fastest in the same one, so
/// that no SM has to change configuration around it (H200, 2026-11-29: 13b 314 tok/s at 57%
/// against 301 for `attn_cluster`, 311 at 100%, 310 at 35%; 7b 513 at 35% against 504, 501 at
/// 57%, 492 at 100%; docs/BENCHMARKS.md).
fn matvec_carveout_percent(cols: usize, sm: SmShared) -> i32 {
    let blocks = sm.threads / 128;
    let need = blocks * (mmvq::sa_bytes(cols, mmvq::ActFmt::Q8K) + sm.reserved);
    i32::try_from((need * 100).div_ceil(sm.per_sm).clamp(1, 100)).unwrap_or(100)
}

/// Dynamic shared memory of an `attn_cluster_v*` block: K rows (f16), then scores.
fn cluster_attention_vreg_smem(kps_max: usize, hd: usize) -> usize {
    kps_max * hd * 2 + kps_max * 4
}

/// Dynamic shared memory of an `attn_cluster` block: K and V rows (f16), then scores.
fn cluster_attention_smem(kps_max: usize, hd: usize) -> usize {
    kps_max * hd * 2 * 2 + kps_max * 4
}

/// Whether `attn_rows` takes heads of `hd` dims over `max_keys` keys: 64-, 128- and 256-dim
/// heads (its lanes' 8-dim chunks, four a lane; whole heads a Q8_K block) and the scores'
/// shared memory.
fn rows_attention_fits(hd: usize, max_keys: usize) -> bool {
    matches!(hd, 64 | 128 | 256) && max_keys <= ATTN_ROWS_MAX_KEYS
}

/// Whether a batch of `n` rows of `n_head` heads of `hd` dims over at most `max_keys` keys
/// takes `attn_rows`: several rows, from `from` keys on, a shape it fits, and at least
/// `min_blocks` (row, head) blocks (else the split attention).
fn takes_rows_attention(
    (n, n_head, hd, max_keys): (usize, usize, usize, usize),
    from: usize,
    min_blocks: usize,
) -> bool {
    n > 1 && max_keys >= from && rows_attention_fits(hd, max_keys) && n * n_head >= min_blocks
}

/// Dynamic shared memory of an `attn_stream16` block: its ring of K/V tiles, then scores.
fn stream_attention_smem(kps_max: usize) -> usize {
    ATTN_STREAM_RING + kps_max * 4
}

/// A setting of the keys from which an attention kernel takes over (FLEA_CUDA_ATTN_STREAM:
/// a decode row's `attn_stream16`; FLEA_CUDA_ATTN_ROWS: a batch's `attn_rows`), from the
/// environment variable `name`'s value: empty or `on`, `default`; `off`, never; a number,
/// from that many keys.
fn keys_setting(name: &str, value: &str, default: usize) -> std::result::Result<usize, CudaError> {
    match value.trim() {
        "" | "on" => Ok(default),
        "off" => Ok(usize::MAX),
        v => v.parse::<usize>().map_err(|_| {
            CudaError(format!(
                "{name}={v}: expected on, off or the keys to start from"
            ))
        }),
    }
}

impl AttnArgs {
    fn of(p: &AttnParams) -> AttnArgs {
        AttnArgs(
            p.n_head as i32,
            (p.n_head / p.n_head_kv.max(1)) as i32,
            p.head_dim as i32,
            (p.n_head_kv * p.head_dim) as i32,
            p.scale,
        )
    }
}

/// Rows per tile of `attention_tiled` (ATT_TQ in kernels.cu), and the fewest rows a batch
/// has for it (fewer rows: the split attention spreads them over more blocks).
const ATTN_TQ: usize = 16;
const ATTN_TILED_MIN_ROWS: usize = 32;
/// Fewest rows per tile on average for `attention_tiled`: a batch of mostly one-row
/// sequences (concurrent decodes) shares no loads and goes to the split attention.
const ATTN_TILED_MIN_FILL: usize = 8;

/// Tiles of `attention_tiled`: up to ATTN_TQ consecutive rows of one sequence each; `starts`
/// holds each tile's first row, then the row count. `span`: the most keys (cache positions)
/// one tile's rows see together, the shared memory each block takes per row.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AttnTiles {
    starts: Vec<i32>,
    span: usize,
}

/// Keys a chunk of `attention_tiled_long` for tiles of `hd`-dim heads seeing `span` keys where
/// `attention_tiled` holds scores for `max_span` and the long kernel for `long_room` (None: the
/// whole span fits, not even one key tile does, or heads under ATTN_LONG_MIN_HD dims). Chunks
/// of at most ATTN_LONG_CHUNK keys leave room for 3 blocks an SM.
fn tiled_attention_chunk(
    hd: usize,
    span: usize,
    max_span: usize,
    long_room: usize,
) -> Option<usize> {
    let chunk = ATTN_LONG_CHUNK.min(long_room / 32 * 32);
    (hd >= ATTN_LONG_MIN_HD && span > max_span && chunk > 0).then_some(chunk)
}
const ATTN_LONG_CHUNK: usize = 512;
/// 3990-token prompts on an H200 (docs/BENCHMARKS.md): a 13B (128-dim heads) 1198 -> 1804
/// tok/s, Gemma 3's shape (256) the same, Qwen2.5's (64, 7 heads a kv head) 11900 -> 10820:
/// 64-dim heads keep the one-row kernels.
const ATTN_LONG_MIN_HD: usize = 128;

/// Rows per tile of the tensor-core prompt attention (AMMA_TQ in kernels.cu: 4 warps of 16
/// rows), the fewest rows a tile holds on average for it, and the head sizes it takes.
const ATTN_MMA_TQ: usize = 64;
const ATTN_MMA_MIN_FILL: usize = 16;
const ATTN_MMA_HEADS: [usize; 3] = [64, 128, 256];

/// The kernel of `hd`-dim heads (one of ATTN_MMA_HEADS; "" for others, which no name has).
fn mma_attention_kernel(hd: usize) -> &'static str {
    match hd {
        64 => "attention_mma_h64",
        128 => "attention_mma_h128",
        256 => "attention_mma_h256",
        _ => "",
    }
}

/// Dynamic shared memory of `attention_mma_h{hd}` (kernels.cu `Amma`): the tile's q and two
/// stages of K and V chunks (32 keys at 256 dims, else 64), rows padded by 8 halves.
fn mma_attention_smem(hd: usize) -> usize {
    let keys = if hd >= 256 { 32 } else { 64 };
    (ATTN_MMA_TQ + 4 * keys) * (hd + 8) * 2
}

/// The tiles of a batch, up to `tq` consecutive rows of one sequence each, or None where the
/// tiled kernels do not apply: a head size other than 32, 64, 128 or 256, or tiles holding
/// fewer than `min_fill` rows on average.
fn attention_tiles(p: &AttnParams, tq: usize, min_fill: usize) -> Option<AttnTiles> {
    if ![32, 64, 128, 256].contains(&p.head_dim) || p.rows.is_empty() {
        return None;
    }
    let lo = |r: &Row| p.window.map_or(0, |w| (r.pos + 1).saturating_sub(w.max(1)));
    let mut starts = Vec::with_capacity(p.rows.len() / tq + 2);
    let mut span = 0;
    let mut start = 0;
    while start < p.rows.len() {
        let seq = p.rows[start].seq;
        let len = p.rows[start..]
            .iter()
            .take(tq)
            .take_while(|r| r.seq == seq)
            .count();
        let tile = &p.rows[start..start + len];
        let first = tile.iter().map(lo).min()?;
        let last = tile.iter().map(|r| r.pos).max()?;
        span = span.max(last + 1 - first);
        starts.push(i32::try_from(start).ok()?);
        start += len;
    }
    let tiles = starts.len();
    starts.push(i32::try_from(p.rows.len()).ok()?);
    let filled = tiles * min_fill <= p.rows.len();
    filled.then_some(AttnTiles { starts, span })
}

/// Keys per block of the split attention (ATT_CHUNK in kernels.cu).
const ATTN_CHUNK: usize = 64;
/// Blocks per cluster of `attn_cluster` (ATC_CS in kernels.cu) and the most keys it takes:
/// 1024 keys of 128-dim heads over 4 blocks is 132 KB of K, V and scores per block.
/// Threads of an `rms_norm4` block for rows of `g4` float4s (at most 4 a thread); the kernels
/// that fuse its work (`rms_norm_q8k`, `rms_norm4_add`, `head_norm_rope_kv`) sum a row with
/// as many, so their sums are its bits.
fn rms_norm4_threads(g4: usize) -> usize {
    g4.div_ceil(4).next_multiple_of(32).clamp(32, 1024)
}

/// Largest head `head_norm_rope_kv` takes (kernels.cu HNR_MAX: its shared row).
const HEAD_NORM_ROPE_MAX: usize = 512;
const ATTN_CLUSTER_BLOCKS: usize = 8;
const ATTN_CLUSTER_MAX_KEYS: usize = 1024;
/// The 16-block clusters past it (`attn_cluster16_v64`): 8 blocks of up to 256 keys for a
/// 128-dim head.
const ATTN_WIDE_CLUSTER_BLOCKS: usize = 16;
const ATTN_WIDE_CLUSTER_MAX_KEYS: usize = 2048;
const ATTN_WIDE_CLUSTER_KERNEL: &str = "attn_cluster16_v64";
/// The streaming 16-block clusters (`attn_stream16`): its ring of ATS_ST stages of ATS_STAGE
/// bytes (kernels.cu), the keys from which decode takes it by default, and the most keys a
/// block takes (its scores' shared memory; 64k keys of a 128-dim head). It starts past the
/// 576 keys `attn_cluster_v36` holds (36 V words a thread, 64- and 128-dim heads alike), where
/// the 8-block clusters would need `attn_cluster_v64`'s 247 registers: H200, 2026-11-29, at
/// 631-694 keys the 13b ran 293.6 -> 292.2 tok/s with it and the 7b 448.1 -> 492.6, at
/// 883-946 keys 272.7 -> 283.4 and 422.9 -> 479.7, while at 505-568 keys the 8-block kernel
/// was ~8% faster for both (docs/BENCHMARKS.md).
const ATTN_STREAM_KERNEL: &str = "attn_stream16";
const ATTN_STREAM_RING: usize = 6 * 8192;
const ATTN_STREAM_FROM: usize = 577;
const ATTN_STREAM_MAX_KEYS: usize = 8192;
/// Most chunks one block of the one-launch split attention takes (ATT_MAX_CPB).
const ATTN_MAX_CPB: usize = 8;
/// The split attention's scratch stays within this (part of the arena's fixed scratch
/// allowance); bigger batches use the one-block-per-row kernels.
const ATTN_SPLIT_MAX_BYTES: usize = 16 << 20;
/// `attn_rows` (a batch's decode attention, one block a (head, row)): the keys from which a
/// batch takes it by default, the most (its scores' dynamic shared memory, 4 bytes a key,
/// within the 48 KB a block has without opting in, beside its ~3.2 KB of static), and the fewest
/// blocks an SM its grid has (fewer (row, head) pairs leave SMs idle where the split
/// attention spreads each over its 64-key chunks). H200, 2026-11-30, a 13b served to 8 / 16 /
/// 32 clients (320-1280 blocks): +5 / +3 / +2% at ~80 keys, +17 / +6 / +10% at ~870, against
/// the split attention; 2 clients (80 blocks) at ~870 keys -1% (docs/BENCHMARKS.md).
const ATTN_ROWS_FROM: usize = 0;
const ATTN_ROWS_MAX_KEYS: usize = 11 << 10;
// The scores beside the kernel's ~3.2 KB of static shared memory stay within 48 KB.
const _: () = assert!(ATTN_ROWS_MAX_KEYS * 4 + 3200 <= 48 << 10);
const ATTN_ROWS_MIN_BLOCKS_PER_SM: usize = 2;

/// Shape of one split attention launch: `rows` rows × heads × `maxc` chunks of keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AttnSplit {
    rows: usize,
    n_head: usize,
    hd: usize,
    /// Score slots per (row, head): the most keys any row sees.
    maxk: usize,
    maxc: usize,
}

impl AttnSplit {
    /// The split shape, or None where the one-block kernels apply: head dims the 8-byte
    /// loads cannot take, scratch past the limit, or `single` asked for.
    fn plan(rows: usize, n_head: usize, hd: usize, max_keys: usize, single: bool) -> Option<Self> {
        if single || hd == 0 || !hd.is_multiple_of(4) || hd > 256 || rows == 0 || max_keys == 0 {
            return None;
        }
        let s = AttnSplit {
            rows,
            n_head,
            hd,
            maxk: max_keys,
            maxc: max_keys.div_ceil(ATTN_CHUNK),
        };
        (s.floats() * 4 <= ATTN_SPLIT_MAX_BYTES).then_some(s)
    }
    fn scores_floats(&self) -> usize {
        self.rows * self.n_head * self.maxk
    }
    fn stats_floats(&self) -> usize {
        self.rows * self.n_head * self.maxc * 2
    }
    fn floats(&self) -> usize {
        self.scores_floats() + self.stats_floats() + self.rows * self.n_head * self.maxc * self.hd
    }
}

/// `out = w · x` over `n` rows fits: a weight the kernels take, both buffers `n` rows deep
/// and as wide as the weight's columns and rows.
fn check_matmul(n: usize, w: &Weight, x: &CudaAct, out: &CudaAct) -> Result<()> {
    CudaBackend::check_weight(w)?;
    check_rows(x, n, "matmul")?;
    check_rows(out, n, "matmul")?;
    if x.width != w.cols || out.width != w.rows {
        return Err(be(format!(
            "matmul: {}x{} weight with input width {} and output width {}",
            w.rows, w.cols, x.width, out.width
        )));
    }
    Ok(())
}

fn check_rows(a: &CudaAct, n: usize, what: &str) -> Result<()> {
    if n > a.rows {
        return Err(be(format!(
            "{what}: activation buffer holds {} rows, {n} needed",
            a.rows
        )));
    }
    Ok(())
}

impl Backend for CudaBackend {
    type Act = CudaAct;
    type Kv = CudaKv;

    fn name(&self) -> String {
        format!(
            "cuda:{} ({}, sm_{}{}{})",
            self.ordinal,
            self.device_name,
            self.cc.0,
            self.cc.1,
            if self.blas.is_some() { ", cuBLAS" } else { "" }
        )
    }

    fn alloc_act(&self, rows: usize, width: usize) -> Result<CudaAct> {
        self.check_not_recording("an activation allocation")?;
        let buf = self
            .stream
            .alloc_zeros::<f32>((rows * width).max(1))
            .map_err(|e| be(format!("alloc {rows}x{width} activations: {e:?}")))?;
        let ptr = dptr(&buf, &self.stream);
        Ok(CudaAct {
            buf,
            ptr,
            rows,
            width,
        })
    }

    fn alloc_kv(&self, shape: KvShape) -> Result<CudaKv> {
        // Every layer its own cache: nothing shared.
        self.alloc_kv_shared(shape, &[])?
            .ok_or_else(|| be("alloc KV cache: no cache"))
    }

    fn embed(&self, table: &Weight, tokens: &[u32], scale: f32, out: &mut CudaAct) -> Result<()> {
        Self::check_weight(table)?;
        self.check_not_recording("an embedding of host tokens")?;
        let n = tokens.len();
        check_rows(out, n, "embed")?;
        if out.width != table.cols {
            return Err(be("embed: width mismatch"));
        }
        if let Some(g) = &self.gaps {
            g.embed_begin(n).map_err(be)?;
        }
        let mut toks = Vec::with_capacity(n);
        for &t in tokens {
            if t as usize >= table.rows {
                return Err(ModelError::Input(format!(
                    "token id {t} out of range (vocab {})",
                    table.rows
                )));
            }
            toks.push(t as i32);
        }
        let mut sc = self.scratch.lock().unwrap();
        // The executor hands over just this batch's rows, read from the file each pass:
        // copied every call, never cached.
        let wp = match self.mapped(table.data.as_ptr() as usize, table.data.len()) {
            Some(p) => p,
            None if self.staging_active() => {
                let p = self.grow(&mut sc.emb, table.data.len())?;
                let dst = sc.emb.as_mut().unwrap();
                self.stream
                    .memcpy_htod(table.data, &mut dst.slice_mut(0..table.data.len()))
                    .map_err(|e| be(format!("uploading embedding rows: {e:?}")))?;
                p
            }
            None => {
                drop(sc);
                let p = self.weight_ptr(table)?;
                sc = self.scratch.lock().unwrap();
                p
            }
        };
        let tp = self.grow(&mut sc.tokens, n)?;
        {
            let dst = sc.tokens.as_mut().unwrap();
            let mut view = dst.slice_mut(0..n);
            self.stream
                .memcpy_htod(&toks, &mut view)
                .map_err(|e| be(format!("uploading tokens: {e:?}")))?;
        }
        drop(sc);
        self.launch_embed(table, wp, tp, n, scale, out)
    }

    fn rms_norm(
        &self,
        n: usize,
        x: &CudaAct,
        w: &Weight,
        eps: f32,
        out: &mut CudaAct,
    ) -> Result<()> {
        let (wp, g) = self.vector_ptr(w)?;
        check_rows(x, n, "rms_norm")?;
        check_rows(out, n, "rms_norm")?;
        let total = n * x.width;
        if g == 0 || !x.width.is_multiple_of(g) || out.width != x.width {
            return Err(be("rms_norm: width mismatch"));
        }
        let groups = total / g;
        // Rows of float4s up to 4 per thread of a 1024-thread block: the vector kernel.
        let g4 = g / 4;
        if g.is_multiple_of(4) && g4 <= 4 * 1024 {
            let threads = rms_norm4_threads(g4);
            let cfg = LaunchConfig {
                grid_dim: (groups as u32, 1, 1),
                block_dim: (threads as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let (xp, op, g4i) = (x.ptr, out.ptr, g4 as i32);
            // Decode rows feeding int8 mat-vecs: quantise them in the same launch, to Q8_0
            // where the matmul reading them says so (output_feeds), else to Q8_K.
            let q8_0 = if self.take_feeds() == FEEDS_Q8_0 {
                self.fused_int8_scratch(n, g, x.width, mmvq::ActFmt::Q8_0)?
            } else {
                None
            };
            if let Some((xq, xd, xs)) = q8_0 {
                // One block per 256-element chunk of each row, as rms_norm_q8k, and a warp per
                // 32-block of its share (64 threads quantising Qwen2.5's 28 blocks two at a
                // time made the launch 10.9 us, slower than rms_norm4 and act_q8_0 apart; H200).
                let parts = if g.is_multiple_of(256) { g / 256 } else { 1 };
                let warps = (g / 32).div_ceil(parts).min(32);
                let cfg = LaunchConfig {
                    grid_dim: (groups as u32, parts as u32, 1),
                    block_dim: (threads.max(32 * warps) as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                // The row's sum over rms_norm4's `threads` (the same bits as that kernel).
                let nt = threads as i32;
                launch!(self, "rms_norm_q8_0", cfg; xp, wp, op, g4i, eps, xq, xd, xs, nt)?;
                return self.note_prequant(out.ptr, total, xq);
            }
            if let Some((xq, xd, xs)) = self.fused_q8k_scratch(n, g, x.width)? {
                // One block per 256-element chunk of each row (see the kernel).
                let cfg = LaunchConfig {
                    grid_dim: (groups as u32, (g / 256) as u32, 1),
                    ..cfg
                };
                launch!(self, "rms_norm_q8k", cfg; xp, wp, op, g4i, eps, xq, xd, xs)?;
                return self.note_prequant(out.ptr, total, xq);
            }
            return launch!(self, "rms_norm4", cfg; xp, wp, op, g4i, eps);
        }
        let cfg = LaunchConfig {
            grid_dim: (groups as u32, 1, 1),
            block_dim: (if g >= 256 { 256 } else { 64 }, 1, 1),
            shared_mem_bytes: 0,
        };
        let (xp, op, gi) = (x.ptr, out.ptr, g as i32);
        launch!(self, "rms_norm", cfg; xp, wp, op, gi, eps)
    }

    fn matmul(&self, n: usize, w: &Weight, x: &CudaAct, out: &mut CudaAct) -> Result<()> {
        self.matmuls(n, x, &mut [(w, out)])
    }

    fn output_feeds(&self, w: &Weight) {
        let feeds = match mmvq::kernel_for(w.ty) {
            Some((_, _, mmvq::ActFmt::Q8_0)) => FEEDS_Q8_0,
            Some((_, _, mmvq::ActFmt::Q8K)) => FEEDS_Q8K,
            _ => FEEDS_NONE,
        };
        self.feeds.store(feeds, Ordering::Relaxed);
    }

    fn matmuls(&self, n: usize, x: &CudaAct, jobs: &mut [(&Weight, &mut CudaAct)]) -> Result<()> {
        // A hint for a step that did not take it is stale now.
        self.feeds.store(FEEDS_NONE, Ordering::Relaxed);
        check_rows(x, n, "matmul")?;
        for (w, out) in jobs.iter() {
            check_matmul(n, w, x, out)?;
        }
        let cols = x.width;
        let total = n * cols;
        let use_blas = n > 1 && self.blas.is_some();
        let mut sc = self.scratch.lock().unwrap();
        // Rounded input per mode, computed once for all jobs.
        let mut done_mode: Option<i32> = None;
        let mut quantized = mmvq::Quantized::default();
        // mmvq kernels (mmvq.rs) for decode, few tokens, or any n without cuBLAS; jobs of
        // one weight type share a launch (q/k/v, gate/up). Bit i of `by_mmvq`: job i is done.
        let mut by_mmvq = 0u64;
        // Tensor-core int8 kernels for 3..=32 tokens (mmvq.rs, `mmq_*`): each weight read
        // once for all of them, where a GEMM would first dequantize it.
        // Jobs of one kernel share a launch (q/k/v, gate/up), as the mmvq ones below.
        if self.mmq_on() && (self.mmq_settings().1..=mmvq::MMQ_MAX_TOKENS).contains(&n) {
            let most = if self.fusions_off.mmq_group {
                1
            } else {
                mmvq::MAX_JOBS
            };
            let mut kernels = Vec::with_capacity(jobs.len().min(64));
            for (w, _) in jobs.iter().take(64) {
                let wp = self.weight_ptr(w)?;
                kernels.push(self.mmq_kernel(n, w, wp).map(|k| (k, wp)));
            }
            let same = |a: &((String, usize, usize), u64), b: &((String, usize, usize), u64)| {
                if a.0 == b.0 {
                    mmvq::Joins::Same
                } else {
                    mmvq::Joins::No
                }
            };
            for group in mmvq::launch_groups(&kernels, most, &mut by_mmvq, same) {
                let (w, kernel, g) = Self::group_jobs(&group, &kernels, jobs)?;
                self.launch_mmq(n, w, &g, kernel, x.ptr, false, &mut sc.xq, &mut quantized)?;
            }
        }
        if !use_blas || n <= mmvq::MAX_TOKENS {
            let mut kernels = Vec::with_capacity(jobs.len().min(64));
            for (i, (w, _)) in jobs.iter().take(64).enumerate() {
                kernels.push(if by_mmvq & (1 << i) != 0 {
                    None
                } else {
                    let wp = self.weight_ptr(w)?;
                    self.mmvq_kernel(n, w, wp).map(|k| (k, wp))
                });
            }
            // Decode: resident Q6_K matrices join Q4_K ones, Q8_0 ones Q5_0 ones, in a mixed
            // kernel (one launch for Q4_K_M's q, k and v).
            let mixes =
                n == 1 && self.fusion() && !self.fusions_off.mixed && mmvq::rows_per_warp() == 1;
            type Mmvq = ((&'static str, mmvq::ActFmt), u64);
            let joins = |a: &Mmvq, b: &Mmvq| {
                if a.0 == b.0 {
                    mmvq::Joins::Same
                } else if mixes && a.0 .1 == b.0 .1 && mmvq::mixed_kernel(a.0 .0, b.0 .0).is_some()
                {
                    mmvq::Joins::Second
                } else {
                    mmvq::Joins::No
                }
            };
            for group in mmvq::launch_groups(&kernels, mmvq::MAX_JOBS, &mut by_mmvq, joins) {
                let (w, kernel, g) = Self::group_jobs(&group, &kernels, jobs)?;
                self.launch_mmvq(n, w, &g, *kernel, x.ptr, false, &mut sc.xq, &mut quantized)?;
            }
        }
        for (i, (w, out)) in jobs.iter_mut().enumerate() {
            if i < 64 && by_mmvq & (1 << i) != 0 {
                continue;
            }
            // check_matmul above rejected unsupported types; an error rather than a panic anyway.
            let (suffix, mode) =
                type_info(w.ty).ok_or_else(|| be(format!("matmul: unsupported type {}", w.ty)))?;
            let wp = self.weight_ptr(w)?;
            let repacked = self.is_repacked(wp);
            let suffix = if repacked { "q6_k_soa" } else { suffix };
            if use_blas {
                // cuBLAS on the weight dequantized to F32 (precise mode) or F16, with the
                // inputs rounded as the CPU rounds them and stored in the same precision.
                let precise = self.precise_gemm();
                let xin = if precise {
                    self.grow(&mut sc.xr, total)?
                } else {
                    self.grow(&mut sc.xh, total)?
                };
                if done_mode != Some(mode) {
                    let (yf, yh) = if precise { (xin, 0) } else { (0, xin) };
                    self.round_acts(x.ptr, total, mode, yf, yh)?;
                    done_mode = Some(mode);
                }
                // Row chunks that fit the scratch the planner reserved (see scratch_bytes).
                let cap = self.gemm_cap.load(Ordering::Relaxed);
                let chunk = if cap >= w.cols && w.rows * w.cols > cap {
                    cap / w.cols
                } else {
                    w.rows
                };
                let wbuf = if precise {
                    self.grow(&mut sc.wf, chunk * w.cols)?
                } else {
                    self.grow(&mut sc.wh, chunk * w.cols)?
                };
                let name = format!("deq_{}_{suffix}", if precise { "f32" } else { "f16" });
                let blas = self.blas.as_ref().ok_or_else(|| be("no cuBLAS handle"))?;
                let rb = w.row_bytes();
                let mut r0 = 0;
                while r0 < w.rows {
                    let rows = chunk.min(w.rows - r0);
                    let cfg = Self::launch_1d(rows * w.cols / 8);
                    let (rows_i, cols_i, rb_i) = (rows as i32, w.cols as i32, rb as i64);
                    if repacked {
                        // The repacked layout addresses blocks tensor-wide: the kernel takes
                        // the chunk's first row and the tensor's row count.
                        let (r0_i, all_i) = (r0 as i32, w.rows as i32);
                        launch!(self, &name, cfg; wp, wbuf, rows_i, cols_i, rb_i, r0_i, all_i)?;
                    } else {
                        let wr = wp + (r0 * rb) as u64;
                        launch!(self, &name, cfg; wr, wbuf, rows_i, cols_i, rb_i)?;
                    }
                    let out_r0 = out.ptr + 4 * r0 as u64;
                    gemm(blas, (rows, n, w.cols), w.rows, wbuf, xin, out_r0, precise)?;
                    self.after_launch("cublasGemmEx")?;
                    r0 += rows;
                }
            } else if repacked {
                return Err(be(
                    "a repacked Q6_K weight needs the mmvq kernels (FLEA_CUDA_NO_MMVQ was set after loading)",
                ));
            } else {
                let xin = if mode == 0 {
                    x.ptr
                } else {
                    let xr = self.grow(&mut sc.xr, total)?;
                    if done_mode != Some(mode) {
                        self.round_acts(x.ptr, total, mode, xr, 0)?;
                        done_mode = Some(mode);
                    }
                    xr
                };
                let cfg = LaunchConfig {
                    grid_dim: (w.rows.div_ceil(4) as u32, n as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                };
                let (op, rows_i, cols_i, rb) =
                    (out.ptr, w.rows as i32, w.cols as i32, w.row_bytes() as i64);
                launch!(self, &format!("matvec_{suffix}"), cfg; wp, xin, op, rows_i, cols_i, rb)?;
            }
        }
        Ok(())
    }

    fn add_bias(&self, n: usize, x: &mut CudaAct, b: &Weight) -> Result<()> {
        let (bp, len) = self.vector_ptr(b)?;
        check_rows(x, n, "add_bias")?;
        if len != x.width {
            return Err(be("add_bias: width mismatch"));
        }
        let total = n * x.width;
        let cfg = Self::launch_1d(total);
        let (xp, wi, ti) = (x.ptr, x.width as i32, total as i64);
        launch!(self, "add_bias", cfg; xp, bp, wi, ti)
    }

    fn rope(&self, n: usize, x: &mut CudaAct, p: &RopeParams) -> Result<()> {
        let hd = p.head_dim;
        let nd = p.rope_dims;
        check_rows(x, n, "rope")?;
        if x.width != p.n_heads * hd || nd > hd || !nd.is_multiple_of(2) {
            return Err(be("rope: shape mismatch"));
        }
        if nd == 0 {
            return Ok(());
        }
        if p.rows.len() != n {
            return Err(be("rope: row count mismatch"));
        }
        let (theta_scale, neox, posp) = self.rope_args(p)?;
        let cfg = Self::launch_1d(n * p.n_heads * nd / 2);
        let (xp, ni, nh, hdi, ndi) = (x.ptr, n as i32, p.n_heads as i32, hd as i32, nd as i32);
        launch!(self, "rope", cfg; xp, ni, nh, hdi, ndi, posp, theta_scale, neox)
    }

    fn rope_qk(
        &self,
        n: usize,
        q: &mut CudaAct,
        k: &mut CudaAct,
        pq: &RopeParams,
        pk: &RopeParams,
    ) -> Result<()> {
        // One launch when both share everything but the head count; otherwise one each.
        let (hd, nd) = (pq.head_dim, pq.rope_dims);
        if !self.fusion()
            || !Self::rope_pair_fits(pq, pk)
            || nd == 0
            || nd > hd
            || !nd.is_multiple_of(2)
        {
            self.rope(n, q, pq)?;
            return self.rope(n, k, pk);
        }
        check_rows(q, n, "rope")?;
        check_rows(k, n, "rope")?;
        if q.width != pq.n_heads * hd || k.width != pk.n_heads * hd || pq.rows.len() != n {
            return Err(be("rope: shape mismatch"));
        }
        let (theta_scale, neox, posp) = self.rope_args(pq)?;
        let cfg = Self::launch_1d(n * (pq.n_heads + pk.n_heads) * nd / 2);
        let (qp, kp, ni, nq, nk, hdi, ndi) = (
            q.ptr,
            k.ptr,
            n as i32,
            pq.n_heads as i32,
            pk.n_heads as i32,
            hd as i32,
            nd as i32,
        );
        launch!(self, "rope_qk", cfg; qp, kp, ni, nq, nk, hdi, ndi, posp, theta_scale, neox)
    }

    fn matmul_residual(
        &self,
        segments: &[usize],
        w: &Weight,
        x: &CudaAct,
        residual: &mut CudaAct,
        scratch: &mut CudaAct,
    ) -> Result<()> {
        self.feeds.store(FEEDS_NONE, Ordering::Relaxed);
        let n: usize = segments.iter().sum();
        let use_blas = n > 1 && self.blas.is_some();
        // The int8 kernels add their dot products into the residual stream themselves
        // (the same f32 addition the add kernel would make, one launch less).
        if self.fusion() && (!use_blas || n <= mmvq::MMQ_MAX_TOKENS) {
            check_matmul(n, w, x, residual)?;
            let wp = self.weight_ptr(w)?;
            let mut sc = self
                .scratch
                .lock()
                .map_err(|_| be("scratch lock poisoned"))?;
            let mut quantized = mmvq::Quantized::default();
            let (xp, rp) = (x.ptr, residual.ptr);
            if self.try_mmq(n, w, wp, xp, rp, true, &mut sc.xq, &mut quantized)? {
                return Ok(());
            }
            if (!use_blas || n <= mmvq::MAX_TOKENS)
                && self.try_mmvq(
                    n,
                    w,
                    wp,
                    x.ptr,
                    residual.ptr,
                    true,
                    &mut sc.xq,
                    &mut quantized,
                )?
            {
                return Ok(());
            }
        }
        self.matmuls(n, x, &mut [(w, scratch)])?;
        self.add(n, residual, scratch)
    }

    fn attention(
        &self,
        n: usize,
        q: &CudaAct,
        k: &CudaAct,
        v: &CudaAct,
        kv: &mut CudaKv,
        p: &AttnParams,
        out: &mut CudaAct,
    ) -> Result<()> {
        let cache = self.attention_cache(n, q, k, v, kv, p, out)?;
        let kvrowp = self.upload_rows(RowBuf::Kv, &cache.kvrow)?;
        let kvd = p.n_head_kv * p.head_dim;
        let total = n * kvd;
        let cfg = Self::launch_1d(total);
        let (kp, vp, kc, vc, ti, kvdi) =
            (k.ptr, v.ptr, cache.kc, cache.vc, total as i64, kvd as i32);
        launch!(self, "kv_store", cfg; kp, vp, kc, vc, ti, kvrowp, kvdi)?;
        self.attend(n, q, &cache, p, out)
    }

    fn rope_attention(
        &self,
        n: usize,
        q: &mut CudaAct,
        k: &mut CudaAct,
        v: &CudaAct,
        kv: &mut CudaKv,
        (pq, pk): (&RopeParams, &RopeParams),
        p: &AttnParams,
        out: &mut CudaAct,
    ) -> Result<()> {
        if self.cluster_rope_attention(n, q, k, v, kv, (pq, pk), p, None, out)? {
            return Ok(());
        }
        let (hd, nd) = (pq.head_dim, pq.rope_dims);
        if !self.rope_kv_fits(pq, pk, p) {
            self.rope_qk(n, q, k, pq, pk)?;
            return self.attention(n, q, k, v, kv, p, out);
        }
        let cache = self.attention_cache(n, q, k, v, kv, p, out)?;
        let kvrowp = self.upload_rows(RowBuf::Kv, &cache.kvrow)?;
        let (theta_scale, neox, posp) = self.rope_args(pq)?;
        let (nq, nk) = (pq.n_heads, pk.n_heads);
        let threads = n * (nq + nk) * nd / 2 + n * nk * (hd - nd) + n * nk * hd;
        let cfg = Self::launch_1d(threads);
        let (qp, kp, vp, kc, vc) = (q.ptr, k.ptr, v.ptr, cache.kc, cache.vc);
        let (ni, nqi, nki, hdi, ndi) = (n as i32, nq as i32, nk as i32, hd as i32, nd as i32);
        launch!(self, "rope_kv", cfg; qp, kp, vp, kc, vc, ni, nqi, nki, hdi, ndi, posp, theta_scale, neox, kvrowp)?;
        self.attend(n, q, &cache, p, out)
    }

    /// The head norms, RoPE and the cache store in one launch (`head_norm_rope_kv`, in place
    /// on q and k), then the attention, where it applies (fused, `rope_kv` would take the
    /// RoPE, heads of at most HNR_MAX dims); else the default's steps.
    fn head_norm_rope_attention(
        &self,
        n: usize,
        (q, k, k_spare): (&mut CudaAct, &mut CudaAct, &mut CudaAct),
        v: &CudaAct,
        kv: &mut CudaKv,
        (qn, kn, eps): (&Weight, &Weight, f32),
        (pq, pk): (&RopeParams, &RopeParams),
        p: &AttnParams,
        out: &mut CudaAct,
    ) -> Result<()> {
        let hd = p.head_dim;
        if self.fusions_off.head_norm
            || !self.rope_kv_fits(pq, pk, p)
            || hd > HEAD_NORM_ROPE_MAX
            || !hd.is_multiple_of(4)
            || qn.rows * qn.cols != hd
            || kn.rows * kn.cols != hd
        {
            let norms = (qn, kn, eps);
            return flea_model::backend::head_norm_rope_attention_steps(
                self,
                n,
                (q, k, k_spare),
                v,
                kv,
                norms,
                (pq, pk),
                p,
                out,
            );
        }
        let (qnp, _) = self.vector_ptr(qn)?;
        let (knp, _) = self.vector_ptr(kn)?;
        let cache = self.attention_cache(n, q, k, v, kv, p, out)?;
        let kvrowp = self.upload_rows(RowBuf::Kv, &cache.kvrow)?;
        let (theta_scale, neox, posp) = self.rope_args(pq)?;
        let (nq, nk, nd) = (pq.n_heads, pk.n_heads, pq.rope_dims);
        // rms_norm4's threads for a head-sized row (the same sums), a block per head, then
        // blocks storing v.
        let threads = rms_norm4_threads(hd / 4);
        let heads = n * (nq + nk);
        let v_blocks = (n * nk * hd).div_ceil(threads).min(1024);
        let cfg = LaunchConfig {
            grid_dim: ((heads + v_blocks) as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (qp, kp, vp, kc, vc) = (q.ptr, k.ptr, v.ptr, cache.kc, cache.vc);
        let (ni, nqi, nki, hdi, ndi) = (n as i32, nq as i32, nk as i32, hd as i32, nd as i32);
        launch!(self, "head_norm_rope_kv", cfg; qp, kp, vp, kc, vc, qnp, knp, ni, nqi, nki, hdi, ndi, posp, theta_scale, neox, kvrowp, eps)?;
        self.attend(n, q, &cache, p, out)
    }

    /// Rows are not scaled here (`scale_rows` is the default's no): the attention scales
    /// q·k, so Gemma 3's step is `rope_attention` (RoPE and the cache store in one launch).
    fn rope_attention_scaled(
        &self,
        n: usize,
        q: &mut CudaAct,
        k: &mut CudaAct,
        v: &CudaAct,
        kv: &mut CudaKv,
        ropes: (&RopeParams, &RopeParams),
        p: &AttnParams,
        out: &mut CudaAct,
    ) -> Result<()> {
        self.rope_attention(n, q, k, v, kv, ropes, p, out)
    }

    fn rope_attention_biased(
        &self,
        n: usize,
        q: &mut CudaAct,
        k: &mut CudaAct,
        v: &mut CudaAct,
        kv: &mut CudaKv,
        ropes: (&RopeParams, &RopeParams),
        p: &AttnParams,
        bias: QkvBias<'_>,
        out: &mut CudaAct,
    ) -> Result<()> {
        if !self.fusions_off.attn_bias
            && self.cluster_rope_attention(n, q, k, v, kv, ropes, p, Some(bias), out)?
        {
            return Ok(());
        }
        self.add_bias(n, q, bias.q)?;
        self.add_bias(n, k, bias.k)?;
        self.add_bias(n, v, bias.v)?;
        self.rope_attention(n, q, k, v, kv, ropes, p, out)
    }

    fn fuses_decode(&self) -> bool {
        self.fused_decode.load(Ordering::Relaxed) && self.fused_decode_fits && self.fusion()
    }

    fn decode_layers(
        &self,
        cfg: &flea_model::ModelConfig,
        layers: &[flea_model::weights::LayerWeights],
        row: Row,
        kv: &mut CudaKv,
        acts: flea_model::backend::LayerActs<'_, CudaAct>,
    ) -> Result<bool> {
        self.decode_layers_fused(cfg, layers, row, kv, acts)
    }

    fn glu(
        &self,
        n: usize,
        gate: &CudaAct,
        up: &CudaAct,
        act: FfnActivation,
        out: &mut CudaAct,
    ) -> Result<()> {
        for a in [gate, up] {
            check_rows(a, n, "glu")?;
        }
        check_rows(out, n, "glu")?;
        if gate.width != up.width || gate.width != out.width {
            return Err(be("glu: shape mismatch"));
        }
        let total = n * gate.width;
        let cfg = Self::launch_1d(total);
        let a: i32 = match act {
            FfnActivation::SwiGlu => 0,
            FfnActivation::GeGlu => 1,
        };
        let (gp, upp, op, ti) = (gate.ptr, up.ptr, out.ptr, total as i64);
        // Decode rows feeding the int8 ffn_down mat-vec: quantise them in the same launch
        // (as rms_norm_q8k does for the norms), to Q8_0 where its type reads that.
        // (kernel, values a quantisation block, scratch); a warp per block.
        let q8_0 = if self.take_feeds() == FEEDS_Q8_0 {
            self.fused_int8_scratch(n, gate.width, gate.width, mmvq::ActFmt::Q8_0)?
                .map(|sc| ("glu_q8_0", 32, sc))
        } else {
            None
        };
        let fused = match q8_0 {
            Some(f) => Some(f),
            None => self
                .fused_q8k_scratch(n, gate.width, gate.width)?
                .map(|sc| ("glu_q8k", 256, sc)),
        };
        if let Some((kname, block, (xq, xd, xs))) = fused {
            let nblk = total / block;
            let cfg = LaunchConfig {
                grid_dim: (nblk.div_ceil(4) as u32, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let nb = nblk as i64;
            launch!(self, kname, cfg; gp, upp, op, a, xq, xd, xs, nb)?;
            return self.note_prequant(out.ptr, total, xq);
        }
        launch!(self, "glu", cfg; gp, upp, op, ti, a)
    }

    fn rms_norm_add(
        &self,
        n: usize,
        y: &CudaAct,
        w: &Weight,
        eps: f32,
        x: &mut CudaAct,
        out: &mut CudaAct,
    ) -> Result<()> {
        let g = w.rows * w.cols;
        check_rows(y, n, "rms_norm_add")?;
        check_rows(x, n, "rms_norm_add")?;
        check_rows(out, n, "rms_norm_add")?;
        let width = y.width;
        let g4 = g / 4;
        // One row per block as rms_norm4 (whole rows only; the same threads, so the same
        // sums), else the two launches.
        if g != width
            || x.width != width
            || out.width != width
            || !g.is_multiple_of(4)
            || g4 > 4 * 1024
            || self.fusions_off.norm_add
        {
            self.rms_norm(n, y, w, eps, out)?;
            return self.add(n, x, out);
        }
        let (wp, _) = self.vector_ptr(w)?;
        let threads = rms_norm4_threads(g4);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (yp, op, g4i, xp) = (y.ptr, out.ptr, g4 as i32, x.ptr);
        launch!(self, "rms_norm4_add", cfg; yp, wp, op, g4i, eps, xp)
    }

    fn add(&self, n: usize, x: &mut CudaAct, y: &CudaAct) -> Result<()> {
        check_rows(x, n, "add")?;
        check_rows(y, n, "add")?;
        if x.width != y.width {
            return Err(be("add: shape mismatch"));
        }
        let total = n * x.width;
        let cfg = Self::launch_1d(total);
        let (xp, yp, ti) = (x.ptr, y.ptr, total as i64);
        launch!(self, "add", cfg; xp, yp, ti)
    }

    fn copy_rows_to(
        &self,
        src: &CudaAct,
        src_row: usize,
        n: usize,
        dst: &mut CudaAct,
        dst_row: usize,
    ) -> Result<()> {
        let w = src.width;
        if dst.width != w {
            return Err(be("copy_rows_to: width mismatch"));
        }
        check_rows(src, src_row + n, "copy_rows_to")?;
        check_rows(dst, dst_row + n, "copy_rows_to")?;
        if n == 0 {
            return Ok(());
        }
        let s = src.buf.slice(src_row * w..(src_row + n) * w);
        let mut d = dst.buf.slice_mut(dst_row * w..(dst_row + n) * w);
        self.stream
            .memcpy_dtod(&s, &mut d)
            .map_err(|e| be(format!("copy_rows_to: {e:?}")))?;
        self.after_launch("copy_rows_to")
    }

    fn copy_rows(&self, src: &CudaAct, src_row: usize, n: usize, dst: &mut CudaAct) -> Result<()> {
        let w = src.width;
        if dst.width != w {
            return Err(be("copy_rows: width mismatch"));
        }
        check_rows(src, src_row + n, "copy_rows")?;
        check_rows(dst, n, "copy_rows")?;
        if n == 0 {
            return Ok(());
        }
        let s = src.buf.slice(src_row * w..(src_row + n) * w);
        let mut d = dst.buf.slice_mut(0..n * w);
        self.stream
            .memcpy_dtod(&s, &mut d)
            .map_err(|e| be(format!("copy_rows: {e:?}")))?;
        self.after_launch("copy_rows")
    }

    fn read(&self, n: usize, x: &CudaAct) -> Result<Vec<f32>> {
        check_rows(x, n, "read")?;
        let mut v = vec![0.0f32; n * x.width];
        self.read_into(n, x, &mut v)?;
        Ok(v)
    }

    fn read_into(&self, n: usize, x: &CudaAct, v: &mut [f32]) -> Result<()> {
        check_rows(x, n, "read")?;
        let len = n * x.width;
        if v.len() != len {
            return Err(be(format!(
                "read_into: {len} values for a slice of {}",
                v.len()
            )));
        }
        if len == 0 {
            return Ok(());
        }
        let s = x.buf.slice(0..len);
        let t = std::time::Instant::now();
        if let Some(g) = &self.gaps {
            g.pass_end(&self.ctx, &self.stream).map_err(be)?;
        }
        self.stream
            .memcpy_dtoh(&s, v)
            .map_err(|e| be(format!("device error (read): {e:?}")))?;
        // Only the compute stream: copies of units queued ahead keep running.
        self.stream
            .synchronize()
            .map_err(|e| be(format!("device error: {e:?}")))?;
        if let Some(g) = &self.gaps {
            g.after_read().map_err(be)?;
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.read_wait_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn write(&self, data: &[f32], x: &mut CudaAct) -> Result<()> {
        if data.len() > x.rows * x.width || !data.len().is_multiple_of(x.width.max(1)) {
            return Err(be("write: not whole rows of the buffer"));
        }
        if data.is_empty() {
            return Ok(());
        }
        self.check_not_recording("a write from the host")?;
        self.launch_serial.fetch_add(1, Ordering::Relaxed);
        if data.len().is_multiple_of(4) && data.len() * 4 <= HANDOVER_BYTES {
            return self.write_mapped(data, x);
        }
        let mut dst = x.buf.slice_mut(0..data.len());
        // From pageable memory the driver stages the bytes before returning, so `data` may
        // be dropped right after; ordered before later kernels on the compute stream.
        self.stream
            .memcpy_htod(data, &mut dst)
            .map_err(|e| be(format!("write: {e:?}")))
    }

    fn token_slots(&self) -> usize {
        chain::TOKEN_SLOTS
    }

    fn slot_top_k_max(&self) -> usize {
        chain::TOP_K_MAX
    }

    fn slot_samples_vocab(&self, _how: &flea_model::sampling::VocabSampling) -> bool {
        true
    }

    // One chunk of a token's logits into a chained decode's slot (`pick_into_slot` checks
    // the columns).
    fn pick_to_slot(
        &self,
        logits: &CudaAct,
        col0: usize,
        width: usize,
        n_vocab: usize,
        slot: usize,
        pick: &flea_model::sampling::SlotPick,
    ) -> Result<()> {
        check_rows(logits, 1, "pick_to_slot")?;
        if width > logits.width || slot >= chain::TOKEN_SLOTS {
            return Err(be(format!(
                "pick_to_slot: slot {slot} of {}, {width} columns from a row of {}",
                chain::TOKEN_SLOTS,
                logits.width
            )));
        }
        self.pick_into_slot(logits.ptr, col0, width, n_vocab, slot, pick)
    }

    // Each row's token into a slot of its own (after the chain's), then the tokens read once
    // the last is written: the logits stay on the device.
    fn pick_rows(
        &self,
        logits: &CudaAct,
        picks: &[flea_model::sampling::SlotPick],
    ) -> Result<Vec<u32>> {
        check_rows(logits, picks.len(), "pick_rows")?;
        if picks.len() > chain::ROW_SLOTS {
            return Err(be(format!(
                "pick_rows: {} rows (at most {})",
                picks.len(),
                chain::ROW_SLOTS
            )));
        }
        let (width, row_bytes) = (logits.width, 4 * logits.width as u64);
        for (i, pick) in picks.iter().enumerate() {
            let xp = logits.ptr + i as u64 * row_bytes;
            self.pick_into_slot(xp, 0, width, width, chain::TOKEN_SLOTS + i, pick)?;
        }
        let t = std::time::Instant::now();
        let tokens = self.with_token_slots("pick_rows", |ts| {
            (0..picks.len())
                .map(|i| ts.read(chain::TOKEN_SLOTS + i).map_err(be))
                .collect::<Result<Vec<u32>>>()
        })?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.read_wait_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(tokens)
    }
    fn embed_from_slot(
        &self,
        table: &Weight,
        slot: usize,
        scale: f32,
        out: &mut CudaAct,
    ) -> Result<()> {
        Self::check_weight(table)?;
        check_rows(out, 1, "embed_from_slot")?;
        if out.width != table.cols || slot >= chain::TOKEN_SLOTS {
            return Err(be(format!(
                "embed_from_slot: slot {slot}, width {} for a table of {} columns",
                out.width, table.cols
            )));
        }
        if let Some(g) = &self.gaps {
            g.embed_begin(1).map_err(be)?;
        }
        let wp = self
            .mapped(table.data.as_ptr() as usize, table.data.len())
            .ok_or_else(|| be("embed_from_slot: the embedding table is not in device memory"))?;
        let tp = self.with_token_slots("embed_from_slot", |ts| {
            Ok(dptr(&ts.dev, &self.stream) + 4 * slot as u64)
        })?;
        // (Tokens from the argmax are below the vocabulary, which the table's rows cover:
        // the executor checked that before chaining.)
        self.launch_embed(table, wp, tp, 1, scale, out)
    }

    fn begin_pass_recording(&self) -> Result<bool> {
        // Recording leaves out the per-launch events of the profile and the gap probe, and
        // the fused decode uploads its tables.
        if !self.pass_graphs_on.load(Ordering::Relaxed)
            || self.profile.is_some()
            || self.gaps.is_some()
            || self.sync_each
            || self.fused_decode.load(Ordering::Relaxed)
        {
            return Ok(false);
        }
        let mut g = self.lock_pass_graphs()?;
        if g.gave_up() {
            return Ok(false);
        }
        self.bind()?;
        g.begin(self.stream.cu_stream()).map_err(be)?;
        Ok(true)
    }

    fn end_pass_recording(&self, run: bool) -> Result<bool> {
        // (The graphs' lock is let go before the token slots' and the scratch's are taken:
        // those are held while `recording()` is asked.)
        let (launched, marks, gave_up, failed) = {
            let mut g = self.lock_pass_graphs()?;
            let launched = g.end(self.stream.cu_stream(), run).map_err(be)?;
            (
                launched,
                std::mem::take(&mut g.marks),
                g.gave_up(),
                g.counts.failed,
            )
        };
        if launched {
            self.launch_serial.fetch_add(1, Ordering::Relaxed);
            self.with_token_slots("end_pass_recording", |ts| {
                for &slot in &marks {
                    ts.mark_written(slot, &self.stream).map_err(be)?;
                }
                Ok(())
            })?;
            return Ok(true);
        }
        // The rows recorded as uploaded never reached the device.
        self.scratch
            .lock()
            .map_err(|_| be("scratch lock poisoned"))?
            .rows_on_device
            .iter_mut()
            .for_each(Vec::clear);
        if gave_up {
            eprintln!("flea: CUDA graphs off for this run ({failed} recorded passes failed)");
        }
        Ok(false)
    }

    fn slot_token(&self, slot: usize) -> Result<u32> {
        let t = std::time::Instant::now();
        let token = self.with_token_slots("slot_token", |ts| ts.read(slot).map_err(be))?;
        if let Some(g) = &self.gaps {
            g.after_read().map_err(be)?;
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.read_wait_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(token)
    }

    fn kv_rows(
        &self,
        kv: &CudaKv,
        layer: usize,
        pos0: usize,
        n: usize,
    ) -> Result<(Vec<u16>, Vec<u16>)> {
        if n > kv.shape.n_ctx {
            return Err(be(format!(
                "kv_rows: layer {layer} rows {pos0}+{n} out of range"
            )));
        }
        let len = n * self.kv_dim(kv);
        let (mut k, mut v) = (vec![0u16; len], vec![0u16; len]);
        self.kv_rows_into(kv, layer, pos0, &mut k, &mut v)?;
        Ok((k, v))
    }

    fn kv_dim(&self, kv: &CudaKv) -> usize {
        kv.shape.n_head_kv * kv.shape.head_dim
    }

    fn kv_rows_into(
        &self,
        kv: &CudaKv,
        layer: usize,
        pos0: usize,
        k: &mut [u16],
        v: &mut [u16],
    ) -> Result<()> {
        // SAFETY: the copy is waited for before k and v are given back.
        unsafe { self.kv_rows_into_queued(kv, layer, pos0, k, v) }?;
        self.stream
            .synchronize()
            .map_err(|e| be(format!("kv_rows_into: {e:?}")))
    }

    unsafe fn kv_rows_into_queued(
        &self,
        kv: &CudaKv,
        layer: usize,
        pos0: usize,
        k: &mut [u16],
        v: &mut [u16],
    ) -> Result<()> {
        let kvd = self.kv_dim(kv).max(1);
        let n = k.len() / kvd;
        if layer >= kv.kp.len()
            || k.len() != v.len()
            || n * kvd != k.len()
            || pos0 + n > kv.shape.n_ctx
        {
            return Err(be(format!(
                "kv_rows_into: layer {layer} rows {pos0}+{n} out of range"
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let off = (pos0 * kvd * 2) as u64;
        // SAFETY: kp/vp[layer] hold n_ctx*kvd u16 and rows pos0..pos0+n lie inside (checked);
        // k and v hold n*kvd u16 each and stay untouched until the stream has passed the
        // copies (the caller's contract).
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                k,
                kv.kp[layer] + off,
                self.stream.cu_stream(),
            )
            .and_then(|_| {
                cudarc::driver::result::memcpy_dtoh_async(
                    v,
                    kv.vp[layer] + off,
                    self.stream.cu_stream(),
                )
            })
        }
        .map_err(|e| be(format!("kv_rows_into: {e:?}")))
    }

    fn alloc_kv_shared(&self, shape: KvShape, shared: &[bool]) -> Result<Option<CudaKv>> {
        self.check_not_recording("a cache allocation")?;
        // Cache rows are addressed with i32 on the device.
        if shape.n_seq * shape.n_ctx > i32::MAX as usize {
            return Err(be("KV cache: too many sequence slots × positions"));
        }
        let per_layer = shape.n_seq * shape.n_ctx * shape.n_head_kv * shape.head_dim;
        let first = (0..shape.n_layers).find(|&l| shared.get(l) == Some(&true));
        let (mut k, mut v) = (Vec::new(), Vec::new());
        let (mut kp, mut vp) = (Vec::new(), Vec::new());
        for l in 0..shape.n_layers {
            // The shared layers after the first alias its buffers: never allocated whole.
            let own = first.is_none_or(|f| l <= f || shared.get(l) != Some(&true));
            for (side, ptrs) in [(&mut k, &mut kp), (&mut v, &mut vp)] {
                if own {
                    let a = DriverAlloc::zeroed(&self.ctx, per_layer * 2)
                        .map_err(|e| be(format!("alloc KV cache: {e:?}")))?;
                    ptrs.push(a.ptr);
                    side.push(Some(a));
                } else {
                    let f = first.unwrap_or(0);
                    let p = *ptrs
                        .get(f)
                        .ok_or_else(|| be("alloc KV cache: shared layer before its first"))?;
                    ptrs.push(p);
                    side.push(None);
                }
            }
        }
        Ok(Some(CudaKv {
            shape,
            kp,
            vp,
            _k: k,
            _v: v,
        }))
    }

    fn share_kv_layers(&self, kv: &mut CudaKv, shared: &[bool]) -> Result<bool> {
        self.check_not_recording("sharing KV caches")?;
        let n = kv.kp.len();
        let Some(first) = (0..n).find(|&l| shared.get(l) == Some(&true)) else {
            return Ok(false);
        };
        // Work queued on the buffers given back finishes before they go.
        self.stream
            .synchronize()
            .map_err(|e| be(format!("share_kv_layers: {e:?}")))?;
        for l in first + 1..n {
            if shared.get(l) == Some(&true) {
                kv.kp[l] = kv.kp[first];
                kv.vp[l] = kv.vp[first];
                kv._k[l] = None;
                kv._v[l] = None;
            }
        }
        Ok(true)
    }

    fn set_kv_rows(
        &self,
        kv: &mut CudaKv,
        layer: usize,
        pos0: usize,
        k: &[u16],
        v: &[u16],
    ) -> Result<()> {
        // SAFETY: the copy is waited for before k and v are given back (a page-locked
        // source would otherwise still be read after the return).
        unsafe { self.set_kv_rows_queued(kv, layer, pos0, k, v) }?;
        self.stream
            .synchronize()
            .map_err(|e| be(format!("set_kv_rows: {e:?}")))
    }

    unsafe fn set_kv_rows_queued(
        &self,
        kv: &mut CudaKv,
        layer: usize,
        pos0: usize,
        k: &[u16],
        v: &[u16],
    ) -> Result<()> {
        let kvd = kv.shape.n_head_kv * kv.shape.head_dim;
        if layer >= kv.kp.len()
            || k.len() != v.len()
            || !k.len().is_multiple_of(kvd.max(1))
            || pos0 * kvd + k.len() > kv.shape.n_ctx * kvd
        {
            return Err(be(format!("set_kv_rows: layer {layer} rows out of range")));
        }
        if k.is_empty() {
            return Ok(());
        }
        let off = (pos0 * kvd * 2) as u64;
        // SAFETY: rows pos0.. lie inside kp/vp[layer] (checked); pageable sources are staged
        // by the driver before return, page-locked ones stay unchanged until the stream has
        // passed the copies (the caller's contract).
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                kv.kp[layer] + off,
                k,
                self.stream.cu_stream(),
            )
            .and_then(|_| {
                cudarc::driver::result::memcpy_htod_async(
                    kv.vp[layer] + off,
                    v,
                    self.stream.cu_stream(),
                )
            })
        }
        .map_err(|e| be(format!("set_kv_rows: {e:?}")))
    }
}

/// out (n × m, row-major) = X (n × k) · Wᵀ, W m × k row-major, W and X F16 (or F32 when
/// `f32`), f32 out, FP32 accumulation.
fn gemm(
    blas: &cudarc::cublas::CudaBlas,
    (m, n, k): (usize, usize, usize),
    ldc: usize,
    w: u64,
    x: u64,
    out: u64,
    f32: bool,
) -> Result<()> {
    use cudarc::cublas::sys;
    let ab = if f32 {
        sys::cudaDataType::CUDA_R_32F
    } else {
        sys::cudaDataType::CUDA_R_16F
    };
    use std::ffi::c_void;
    let alpha = 1.0f32;
    let beta = 0.0f32;
    // Column-major view: C (m × n, ldc ≥ m: rows of a larger output) = op(A) B with A = W
    // seen as k × m (lda k), transposed, and B = X seen as k × n (ldb k).
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            sys::cublasOperation_t::CUBLAS_OP_T,
            sys::cublasOperation_t::CUBLAS_OP_N,
            m as i32,
            n as i32,
            k as i32,
            &alpha as *const f32 as *const c_void,
            w as *const c_void,
            ab,
            k as i32,
            x as *const c_void,
            ab,
            k as i32,
            &beta as *const f32 as *const c_void,
            out as *mut c_void,
            sys::cudaDataType::CUDA_R_32F,
            ldc as i32,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| be(format!("cublasGemmEx ({m}x{k} · {k}x{n}): {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel kernels.cu spells out by name (not made by a macro's `##`) is loaded at
    /// start, so that no launch of it can fail with "not loaded".
    #[test]
    fn every_named_kernel_is_loaded() {
        let loaded = kernel_names();
        let mut checked = 0;
        for (i, _) in KERNELS.match_indices("extern \"C\" __global__") {
            let head = &KERNELS[i..];
            let head = &head[..head.find('{').unwrap_or(head.len())];
            // The name: the first identifier before a '(' that is not the launch bounds.
            let name = head
                .split('(')
                .filter_map(|part| part.split_whitespace().last())
                .find(|word| !word.contains("__launch_bounds__") && !word.contains("LB"))
                .unwrap_or("");
            if name.is_empty() || name.contains('#') || name.contains("__global__") {
                continue;
            }
            assert!(
                loaded.iter().any(|n| n == name),
                "kernel {name} is not loaded"
            );
            checked += 1;
        }
        assert!(checked > 40, "only {checked} kernels found");
    }

    #[test]
    fn cluster_attention_plan_bounds() {
        let params = |n_head, n_head_kv, head_dim| AttnParams {
            layer: 0,
            rows: &[],
            n_head,
            n_head_kv,
            head_dim,
            window: None,
            scale: 1.0,
        };
        let room = 227 * 1024;
        let no_wide = (0, ATTN_CLUSTER_MAX_KEYS + 1);
        let wide = (room - 4 * 1024, ATTN_CLUSTER_MAX_KEYS + 1);
        let plan = |kps_max, blocks, hpc| {
            Some(ClusterPlan {
                kps_max,
                blocks,
                stream: false,
                hpc,
            })
        };
        // Heads a cluster where the output is quantised to Q8_K: 256 / hd (one 256-dim head).
        let q8k = |hd: usize| (256 / hd).max(1);
        let plan_q8k = |p: &AttnParams, keys, room, wide, stream| {
            cluster_attention_plan(p, keys, room, wide, stream, q8k(p.head_dim))
        };
        let off = (0, ATTN_STREAM_FROM);
        // 13B shape, 568 keys: 2 heads a cluster, 4 blocks a head of 142 keys (73 KB).
        for w in [no_wide, wide] {
            assert_eq!(
                plan_q8k(&params(40, 40, 128), 568, room, w, off),
                plan(142, 8, q8k(128))
            );
        }
        assert_eq!(cluster_attention_smem(142, 128), 142 * 516);
        // 256-dim heads (Gemma 3): a head a cluster over its 8 blocks, never the 16-block or
        // streaming kernels (128-dim heads only), and none past the 8-block limit.
        let every = (room - 4 * 1024, 0);
        assert_eq!(
            plan_q8k(&params(4, 1, 256), 505, room, every, (room, 0)),
            plan(64, 8, q8k(256))
        );
        assert!(plan_q8k(&params(4, 1, 256), 1025, room, every, (room, 0)).is_none());
        assert_eq!(cluster_attention_kernels(256)[0], "attn_cluster_h256");
        assert_eq!(
            cluster_attention_vreg_kernel(64, 256),
            Some("attn_cluster_v36_h256")
        );
        // 64-dim heads: 4 heads a cluster, 2 blocks a head; GQA groups whole.
        assert_eq!(
            plan_q8k(&params(8, 2, 64), 3, room, no_wide, off),
            plan(2, 8, q8k(64))
        );
        // The largest 8-block case fits the opt-in room of an H100/H200.
        let big = plan_q8k(&params(64, 8, 128), ATTN_CLUSTER_MAX_KEYS, room, wide, off);
        assert_eq!(big, plan(256, 8, q8k(128)));
        // Past it, 16-block clusters where the device runs them: 8 blocks a 128-dim head
        // (4 a 64-dim one) of at most 256 (512) keys, 64 a thread.
        assert_eq!(
            plan_q8k(&params(40, 40, 128), 1025, room, wide, off),
            plan(129, 16, q8k(128))
        );
        assert_eq!(
            plan_q8k(&params(40, 40, 128), 2048, room, wide, off),
            plan(256, 16, q8k(128))
        );
        assert_eq!(
            plan_q8k(&params(8, 2, 64), 2048, room, wide, off),
            plan(512, 16, q8k(64))
        );
        assert!(plan_q8k(&params(40, 40, 128), 2049, room, wide, off).is_none());
        // Tests lower the threshold: 16-block clusters at any length.
        assert_eq!(
            plan_q8k(&params(40, 40, 128), 20, room, (wide.0, 0), off),
            plan(3, 16, q8k(128))
        );
        // Heads not filling the last cluster (SmolLM2's 9 of 64 dims, Qwen2.5's 14, three of
        // 128): the same plan, the last cluster's extra heads phantoms.
        assert_eq!(
            plan_q8k(&params(9, 3, 64), 504, room, wide, off),
            plan(252, 8, q8k(64))
        );
        assert_eq!(
            plan_q8k(&params(14, 2, 64), 100, room, wide, off),
            plan(50, 8, q8k(64))
        );
        assert_eq!(
            plan_q8k(&params(3, 3, 128), 100, room, wide, off),
            plan(25, 8, q8k(128))
        );
        // Out of range: head size, context, no room.
        assert!(plan_q8k(&params(4, 1, 80), 100, room, wide, off).is_none());
        assert!(plan_q8k(&params(2, 1, 512), 100, room, wide, off).is_none());
        assert!(plan_q8k(&params(0, 1, 64), 100, room, wide, off).is_none());
        assert!(plan_q8k(&params(8, 3, 128), 100, room, wide, off).is_none());
        assert!(plan_q8k(&params(40, 40, 128), 1025, room, no_wide, off).is_none());
        assert!(plan_q8k(&params(40, 40, 128), 568, 0, no_wide, off).is_none());
        assert!(plan_q8k(&params(40, 40, 128), 1024, 64 * 1024, no_wide, off).is_none());
        assert!(plan_q8k(&params(40, 40, 128), 2048, room, (60 * 1024, 0), off).is_none());
        // The streaming clusters from their threshold (and never past their room): 8 blocks a
        // 128-dim head, 4 a 64-dim one; below it the other kernels as before.
        let most = stream_attention_smem(ATTN_STREAM_MAX_KEYS);
        let stream = (most, ATTN_STREAM_FROM);
        let streamed = |kps_max, hpc| {
            Some(ClusterPlan {
                kps_max,
                blocks: 16,
                stream: true,
                hpc,
            })
        };
        assert_eq!(
            plan_q8k(&params(40, 40, 128), 576, room, wide, stream),
            plan(144, 8, q8k(128))
        );
        assert_eq!(
            plan_q8k(&params(40, 40, 128), 577, room, wide, stream),
            streamed(73, q8k(128))
        );
        assert_eq!(
            plan_q8k(&params(8, 2, 64), 576, room, wide, stream),
            plan(288, 8, q8k(64))
        );
        assert_eq!(
            cluster_attention_vreg_kernel(144, 128),
            Some("attn_cluster_v36")
        );
        assert_eq!(
            cluster_attention_vreg_kernel(288, 64),
            Some("attn_cluster_v36")
        );
        assert_eq!(
            plan_q8k(&params(40, 40, 128), 2049, room, wide, stream),
            streamed(257, q8k(128))
        );
        assert_eq!(
            plan_q8k(&params(8, 2, 64), 4096, room, no_wide, stream),
            streamed(1024, q8k(64))
        );
        assert_eq!(
            plan_q8k(&params(40, 40, 128), 8 * 8192, room, wide, stream),
            streamed(8192, q8k(128))
        );
        assert!(plan_q8k(&params(40, 40, 128), 8 * 8192 + 1, room, wide, stream).is_none());
        assert_eq!(
            plan_q8k(&params(40, 40, 128), 20, room, wide, (most, 0)),
            streamed(3, q8k(128))
        );
        assert_eq!(
            plan_q8k(&params(3, 3, 128), 4096, room, wide, stream),
            streamed(512, q8k(128))
        );
        assert_eq!(stream_attention_smem(512), 6 * 8192 + 2048);
        // A head a cluster where the output projection reads Q8_0 (Qwen2.5's 14 heads of 64
        // dims): all the cluster's blocks on one head's keys.
        let one = |p: &AttnParams, keys, wide, stream| {
            cluster_attention_plan(p, keys, room, wide, stream, 1)
        };
        assert_eq!(one(&params(14, 2, 64), 568, wide, off), plan(71, 8, 1));
        assert_eq!(one(&params(14, 2, 64), 568, wide, stream), plan(71, 8, 1));
        assert_eq!(
            one(&params(14, 2, 64), 4000, wide, stream),
            streamed(250, 1)
        );
        assert_eq!(one(&params(9, 3, 64), 1500, wide, off), plan(94, 16, 1));
        // Never a part of a Q8_K block's heads, nor more heads than a Q8_K block.
        assert!(cluster_attention_plan(&params(14, 2, 64), 568, room, wide, off, 2).is_none());
        assert!(cluster_attention_plan(&params(14, 2, 64), 568, room, wide, off, 8).is_none());
    }

    #[test]
    fn rows_attention_takes_whole_lane_chunks_and_bounded_keys() {
        for hd in [64, 128, 256] {
            assert!(rows_attention_fits(hd, 1));
            assert!(rows_attention_fits(hd, ATTN_ROWS_MAX_KEYS));
            assert!(!rows_attention_fits(hd, ATTN_ROWS_MAX_KEYS + 1));
        }
        for hd in [32, 80, 96, 192, 512] {
            assert!(!rows_attention_fits(hd, 100), "{hd}");
        }
    }

    #[test]
    fn batches_that_fill_the_device_take_rows_attention() {
        // A 13B's 40 heads of 128 dims on 132 SMs, at two blocks an SM.
        let (from, min) = (ATTN_ROWS_FROM, ATTN_ROWS_MIN_BLOCKS_PER_SM * 132);
        assert!(takes_rows_attention((32, 40, 128, 900), from, min));
        assert!(takes_rows_attention((7, 40, 128, 80), from, min));
        // Too few (row, head) blocks, one row (the cluster kernels' case), a head size or
        // a length it does not take, FLEA_CUDA_ATTN_ROWS=off or a threshold not reached.
        assert!(!takes_rows_attention((6, 40, 128, 900), from, min));
        assert!(!takes_rows_attention((1, 40, 128, 900), from, 0));
        assert!(!takes_rows_attention((32, 40, 80, 900), from, min));
        assert!(!takes_rows_attention(
            (32, 40, 128, ATTN_ROWS_MAX_KEYS + 1),
            from,
            min
        ));
        assert!(!takes_rows_attention((32, 40, 128, 900), usize::MAX, min));
        assert!(!takes_rows_attention((32, 40, 128, 900), 1024, min));
        assert!(takes_rows_attention((32, 40, 128, 1024), 1024, min));
    }

    #[test]
    fn keys_settings() {
        let ok = |v: &str| keys_setting("FLEA_CUDA_ATTN_STREAM", v, ATTN_STREAM_FROM).ok();
        assert_eq!(ok(""), Some(ATTN_STREAM_FROM));
        assert_eq!(ok("on"), Some(ATTN_STREAM_FROM));
        assert_eq!(ok("off"), Some(usize::MAX));
        assert_eq!(ok(" 1025 "), Some(1025));
        assert_eq!(ok("0"), Some(0));
        assert!(ok("-3").is_none());
        assert!(ok("fast").is_none());
        let err = keys_setting("FLEA_CUDA_ATTN_ROWS", "many", ATTN_ROWS_FROM).unwrap_err();
        assert!(err.0.contains("FLEA_CUDA_ATTN_ROWS=many"), "{}", err.0);
    }

    #[test]
    fn attention_vreg_settings() {
        let ok = |v: &str| attention_vreg_setting(v).ok();
        assert_eq!(ok(""), Some(AttnVreg::FollowMatVecs));
        assert_eq!(ok("on"), Some(AttnVreg::FollowMatVecs));
        assert_eq!(ok("off"), Some(AttnVreg::Off));
        assert_eq!(ok("0"), Some(AttnVreg::Off));
        assert_eq!(ok("100"), Some(AttnVreg::Percent(100)));
        assert!(attention_vreg_setting("101").is_err());
        assert!(attention_vreg_setting("-5").is_err());
        assert!(attention_vreg_setting("yes").is_err());
    }

    #[test]
    fn matvec_carveouts() {
        // sm_90: 228 KB, 1 KB reserved a block, 2048 threads. A 4096-wide mat-vec's 16
        // blocks need 97 KB (the 100 KB configuration), a 5120-wide one's 117 KB (132 KB):
        // percentages whose share of 228 KB lands within those configurations.
        let sm = SmShared {
            per_sm: 228 * 1024,
            reserved: 1024,
            threads: 2048,
        };
        assert_eq!(matvec_carveout_percent(4096, sm), 43);
        assert_eq!(matvec_carveout_percent(5120, sm), 52);
        for (cols, config_kb) in [(4096usize, 100usize), (5120, 132)] {
            let got = matvec_carveout_percent(cols, sm) as usize * 228 * 1024 / 100;
            assert!(got <= config_kb * 1024 && got > (config_kb - 33) * 1024);
        }
        // Never past 100.
        assert_eq!(matvec_carveout_percent(1 << 20, sm), 100);
    }

    #[test]
    fn cluster_attention_vreg_bounds() {
        // 128-dim heads: a thread takes every 4th key of its block.
        assert_eq!(
            cluster_attention_vreg_kernel(64, 128),
            Some("attn_cluster_v16")
        );
        assert_eq!(
            cluster_attention_vreg_kernel(65, 128),
            Some("attn_cluster_v36")
        );
        assert_eq!(
            cluster_attention_vreg_kernel(142, 128),
            Some("attn_cluster_v36")
        );
        assert_eq!(
            cluster_attention_vreg_kernel(256, 128),
            Some("attn_cluster_v64")
        );
        // 64-dim heads: every 8th.
        assert_eq!(
            cluster_attention_vreg_kernel(128, 64),
            Some("attn_cluster_v16")
        );
        assert_eq!(
            cluster_attention_vreg_kernel(512, 64),
            Some("attn_cluster_v64")
        );
        assert_eq!(cluster_attention_vreg_kernel(513, 64), None);
    }

    #[test]
    fn split_attention_plan() {
        // Decode row, 530 keys, 128-dim heads: 9 chunks of 64.
        let s = AttnSplit::plan(1, 32, 128, 530, false).unwrap();
        assert_eq!((s.maxk, s.maxc), (530, 9));
        assert_eq!(s.floats(), 32 * 530 + 32 * 9 * 2 + 32 * 9 * 128);
        // Forced off, odd head sizes, too big, empty: the one-block kernels.
        assert!(AttnSplit::plan(1, 32, 128, 530, true).is_none());
        assert!(AttnSplit::plan(1, 32, 66, 530, false).is_none());
        assert!(AttnSplit::plan(1, 32, 512, 530, false).is_none());
        assert!(AttnSplit::plan(512, 32, 128, 4096, false).is_none());
        assert!(AttnSplit::plan(0, 32, 128, 10, false).is_none());
        // The scratch bound holds at the edge.
        let big = AttnSplit::plan(64, 8, 128, 2048, false).unwrap();
        assert!(big.floats() * 4 <= ATTN_SPLIT_MAX_BYTES);
    }

    #[test]
    fn attention_tiles_follow_sequences() {
        let params = |rows: &'static [Row], head_dim, window| AttnParams {
            layer: 0,
            rows,
            n_head: 4,
            n_head_kv: 4,
            head_dim,
            window,
            scale: 1.0,
        };
        // A 40-row prompt: tiles of 16, 16, 8; the last sees positions 0..=39.
        let prompt: &'static [Row] = Row::consecutive(0, 0, 40).leak();
        let t = attention_tiles(&params(prompt, 128, None), ATTN_TQ, ATTN_TILED_MIN_FILL).unwrap();
        assert_eq!((t.starts, t.span), (vec![0, 16, 32, 40], 40));
        // The tensor-core kernel's tiles of 64: one tile; a 150-row prompt: 64, 64, 22.
        let t = attention_tiles(&params(prompt, 128, None), ATTN_MMA_TQ, ATTN_MMA_MIN_FILL);
        assert_eq!(t.map(|t| (t.starts, t.span)), Some((vec![0, 40], 40)));
        let long: &'static [Row] = Row::consecutive(0, 0, 150).leak();
        let t = attention_tiles(&params(long, 64, Some(10)), ATTN_MMA_TQ, ATTN_MMA_MIN_FILL);
        assert_eq!(
            t.map(|t| (t.starts, t.span)),
            Some((vec![0, 64, 128, 150], 73))
        );
        // A window of 10: a tile of 16 rows sees 16 + 10 - 1 keys at most.
        let t =
            attention_tiles(&params(prompt, 64, Some(10)), ATTN_TQ, ATTN_TILED_MIN_FILL).unwrap();
        assert_eq!(t.span, 25);
        // Two sequences in one batch (20 rows at 100.., then 20 at 0..): no tile mixes them.
        let mut two = Row::consecutive(0, 100, 20);
        two.extend(Row::consecutive(1, 0, 20));
        let two: &'static [Row] = two.leak();
        let t = attention_tiles(&params(two, 32, None), ATTN_TQ, ATTN_TILED_MIN_FILL).unwrap();
        assert_eq!((t.starts, t.span), (vec![0, 16, 20, 36, 40], 120));
        // One row per sequence (a batch of decodes): tiles of one row share nothing.
        let decodes: &'static [Row] = (0..40)
            .map(|seq| Row { seq, pos: 90 })
            .collect::<Vec<_>>()
            .leak();
        assert!(
            attention_tiles(&params(decodes, 128, None), ATTN_TQ, ATTN_TILED_MIN_FILL).is_none()
        );
        // Head sizes the kernels do not take: None.
        assert!(attention_tiles(&params(prompt, 80, None), ATTN_TQ, ATTN_TILED_MIN_FILL).is_none());
        // Spans past the shared memory's keys: chunks of at most 512 keys (whole key tiles).
        assert_eq!(tiled_attention_chunk(128, 120, 119, 119), Some(96));
        assert_eq!(tiled_attention_chunk(128, 120, 120, 120), None);
        assert_eq!(tiled_attention_chunk(256, 4000, 3100, 3090), Some(512));
        assert_eq!(tiled_attention_chunk(128, 4000, 3100, 31), None);
        assert_eq!(tiled_attention_chunk(64, 4000, 3100, 3090), None);
        assert!(attention_tiles(&params(&[], 128, None), ATTN_TQ, ATTN_TILED_MIN_FILL).is_none());
        // Tiles of 64 need 16 rows each on average: two sequences of 20 rows fill two, 40
        // one-row sequences none.
        let t = attention_tiles(&params(two, 64, None), ATTN_MMA_TQ, ATTN_MMA_MIN_FILL);
        assert_eq!(t.map(|t| t.starts), Some(vec![0, 20, 40]));
        assert!(
            attention_tiles(&params(decodes, 64, None), ATTN_MMA_TQ, ATTN_MMA_MIN_FILL).is_none()
        );
        assert_eq!(mma_attention_smem(128), 87040);
        assert_eq!(mma_attention_smem(256), 101376);
    }
}
