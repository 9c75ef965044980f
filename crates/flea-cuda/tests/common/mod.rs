//! What the GPU test files share.

use flea_cuda::CudaBackend;

/// The GPU tests of one test binary run one at a time, though the harness runs tests on
/// parallel threads: some settings and counters are process-wide (`set_mmq`, `set_mmq_grid`,
/// `mmq_launches`; `chunked_gemm_matches_one_pass` turns the `mmq_*` kernels off for a moment,
/// and a test counting their launches failed so, H200, 2026-11-29), and a backend created on
/// one thread (cudarc synchronizes the context when it makes its first stream) can end
/// another's pass recording as a CUDA graph: the pass then runs without one, as it should,
/// but `chained_greedy_decode_matches_the_host_loop_on_gpu` counts recordings and failed so
/// (H200, 2026-11-29: "tiny-qwen2: a recording failed", 2 of ~50 runs).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Device 0 with the lock that keeps the other GPU tests out (held while the guard lives),
/// or None after printing SKIP (no CUDA device here: the test passes without running).
pub fn gpu() -> Option<(std::sync::MutexGuard<'static, ()>, CudaBackend)> {
    // A failed test poisons the lock; the next one still runs.
    let serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    match CudaBackend::new(0) {
        Ok(b) => Some((serial, b)),
        Err(e) => {
            println!("SKIP: no CUDA device ({e})");
            None
        }
    }
}
