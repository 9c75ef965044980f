//! Link speeds of one GPU for `flea probe`: host↔device copies from pinned and pageable
//! memory, device memory bandwidth, and the quantized mat-vec kernel's weight throughput.
//!
//! Every figure is the best of a few timed repetitions after one untimed warm-up, in bytes
//! per second. Nothing here runs without a driver: [`probe_gpu`] returns an error instead.

use crate::{CudaBackend, CudaError};
use cudarc::driver::CudaContext;
use flea_gguf::GgmlType;
use flea_model::backend::Backend;
use flea_model::weights::Weight;
use std::time::Instant;

/// What [`probe_gpu`] measured on one device.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GpuLinks {
    pub ordinal: usize,
    pub name: String,
    pub total_memory_bytes: usize,
    /// Bytes per copy.
    pub copy_bytes: usize,
    pub pinned_h2d_bps: f64,
    pub pinned_d2h_bps: f64,
    pub pageable_h2d_bps: f64,
    pub pageable_d2h_bps: f64,
    /// Device-to-device copy, counting the read and the write.
    pub device_copy_bps: f64,
    /// Single-token mat-vec over a Q4_K matrix: weight bytes read per second.
    pub q4k_matvec_weight_bps: f64,
    /// The mat-vec's matrix: rows x cols.
    pub q4k_matvec_shape: (usize, usize),
}

fn ce(what: &str, e: impl std::fmt::Debug) -> CudaError {
    CudaError(format!("{what}: {e:?}"))
}

/// Best seconds of `reps` timed calls of `f` after one warm-up call.
fn best_of(reps: usize, mut f: impl FnMut() -> Result<(), CudaError>) -> Result<f64, CudaError> {
    f()?;
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best.max(1e-9))
}

/// Measure GPU `ordinal` with copies of `copy_bytes` (64 MiB or more gives steady numbers).
pub fn probe_gpu(ordinal: usize, copy_bytes: usize, reps: usize) -> Result<GpuLinks, CudaError> {
    if !crate::libraries().driver {
        return Err(CudaError("no CUDA driver (libcuda) on this machine".into()));
    }
    let ctx = CudaContext::new(ordinal).map_err(|e| ce("CUDA context", e))?;
    let stream = ctx.default_stream();
    let name = ctx.name().map_err(|e| ce("device name", e))?;
    let total = ctx.total_mem().map_err(|e| ce("device memory", e))?;
    let n = copy_bytes.max(1 << 20);

    let mut dev = stream
        .alloc_zeros::<u8>(n)
        .map_err(|e| ce("device alloc", e))?;
    let mut dev2 = stream
        .alloc_zeros::<u8>(n)
        .map_err(|e| ce("device alloc", e))?;
    // SAFETY: page-locked host memory of n bytes; it is written (memset by the copy from the
    // zeroed device buffer) before anything reads it as data, and only its bytes are copied.
    let mut pinned = unsafe { ctx.alloc_pinned_with_flags::<u8>(n, 0) }
        .map_err(|e| ce("pinned host alloc", e))?;
    stream
        .memcpy_dtoh(&dev, &mut pinned)
        .map_err(|e| ce("memcpy", e))?;
    let mut pageable = vec![1u8; n];
    let sync = |s: &std::sync::Arc<cudarc::driver::CudaStream>| {
        s.synchronize().map_err(|e| ce("synchronize", e))
    };

    let pinned_h2d = best_of(reps, || {
        stream
            .memcpy_htod(&pinned, &mut dev)
            .map_err(|e| ce("memcpy", e))?;
        sync(&stream)
    })?;
    let pinned_d2h = best_of(reps, || {
        stream
            .memcpy_dtoh(&dev, &mut pinned)
            .map_err(|e| ce("memcpy", e))?;
        sync(&stream)
    })?;
    let pageable_h2d = best_of(reps, || {
        stream
            .memcpy_htod(&pageable, &mut dev)
            .map_err(|e| ce("memcpy", e))?;
        sync(&stream)
    })?;
    let pageable_d2h = best_of(reps, || {
        stream
            .memcpy_dtoh(&dev, &mut pageable)
            .map_err(|e| ce("memcpy", e))?;
        sync(&stream)
    })?;
    let dtod = best_of(reps, || {
        stream
            .memcpy_dtod(&dev, &mut dev2)
            .map_err(|e| ce("memcpy", e))?;
        sync(&stream)
    })?;
    drop((dev, dev2, pinned, pageable));

    // The mat-vec kernel flea decodes with, on a 7B-sized FFN matrix of zero blocks (valid
    // Q4_K; the speed does not depend on the values).
    let (rows, cols) = (11008usize, 4096usize);
    let ty = GgmlType::Q4_K;
    let bytes = rows * cols / ty.block_size() * ty.type_size();
    let data = vec![0u8; bytes];
    let w = Weight {
        ty,
        rows,
        cols,
        data: &data,
    };
    let be = CudaBackend::new(ordinal)?;
    be.preload(&w).map_err(|e| ce("upload", e))?;
    let x = be.alloc_act(1, cols).map_err(|e| ce("alloc", e))?;
    let mut out = be.alloc_act(1, rows).map_err(|e| ce("alloc", e))?;
    const CALLS: usize = 20;
    let matvec = best_of(reps, || {
        for _ in 0..CALLS {
            be.matmul(1, &w, &x, &mut out)
                .map_err(|e| ce("matvec", e))?;
        }
        be.synchronize().map_err(|e| ce("synchronize", e))
    })?;
    be.clear_weights();

    let bps = |b: usize, s: f64| b as f64 / s;
    Ok(GpuLinks {
        ordinal,
        name,
        total_memory_bytes: total,
        copy_bytes: n,
        pinned_h2d_bps: bps(n, pinned_h2d),
        pinned_d2h_bps: bps(n, pinned_d2h),
        pageable_h2d_bps: bps(n, pageable_h2d),
        pageable_d2h_bps: bps(n, pageable_d2h),
        device_copy_bps: bps(2 * n, dtod),
        q4k_matvec_weight_bps: bps(bytes * CALLS, matvec),
        q4k_matvec_shape: (rows, cols),
    })
}
