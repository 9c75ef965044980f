// Stand-alone harness: what the wait at a kernel boundary costs in a resident decode token,
// and what changes it. A 13B token's launch sequence is modelled as flea's CUDA backend
// launches it (40 layers x 8 kernels: norm, q/k/v mat-vec, attention, output mat-vec, norm,
// gate/up mat-vec, GLU, down mat-vec; 128-thread blocks, one warp per row, programmatic
// dependent launch, recorded as one CUDA graph), each kernel reading what the previous one
// wrote. Weights: random bytes, 8.1 GB in all (L2 serves none of it); the mat-vec's dot is a
// plain dp4a over the row's bytes against the activations in shared memory (flea's Q4_K /
// Q6_K arithmetic is not modelled; its bytes per row are); the small kernels only read the
// previous output and write theirs (the attention also reads 64 KB a block before the wait).
// Prints ms per token and TB/s of weights. Modes (how a kernel waits for its predecessor):
//   0  griddepcontrol.wait at the start, then launch_dependents (flea's pdl_enter)
//   1  a counter per launch: each block adds 1 at its end (after a fence); the next kernel's
//      thread 0 spins until the count reaches the grid size, then launch_dependents
//   2  no wait at all (outputs wrong; the bound for any wait)
//   3  as 0, but the small kernels call launch_dependents before their wait (outputs not
//      checked here; in flea this gave wrong results)
// Mat-vec variants: 0 flea's shape (weights prefetched into L2 before the wait), 1 the first
// round of the row loaded into registers before the wait, 2/3 persistent rows (4/8 blocks an
// SM, the next row's loads before the current row's dots), 4/5/6 persistent rows taken from a
// ticket counter (4/6/8 blocks an SM; V2 and V3 are one kernel, matvec_p), 7/8/9 the block's
// 4 rows copied into shared memory by bulk (TMA) copies before the wait, in 4 / 8 / 1 pieces
// a row, each piece completing on its own mbarrier (matvec_tma; its outputs checked against
// V0's).
//   nvcc -O3 -std=c++17 -arch=sm_90 -o dep_wait scripts/gpu_dep_wait.cu
//   ./dep_wait [layers=40] [most mat-vec blocks an SM, 0: no limit] [variants=01] [modes=032]
//              [L2 lookahead "SMALL/MV/TAIL[/LINES],..." (argv[5], below; default none)]
// Measured (H200, 2026-11-28 22:14-22:55, docs/BENCHMARKS.md): variant 0 mode 0 3.38-3.39 ms
// (flea's own 13b token: 3.39 ms); mode 1 4.1-4.2 ms; mode 2 2.72 ms; variant 1 3.15-3.18 ms
// with no limit or 12 blocks an SM, 3.34 with 8, 3.50 with 6 (variant 0: 3.52 with 6);
// variants 2-6 slower than 0 with the wait. (2026-11-29 00:20) V7 4.20-4.22 ms, V8 5.11, V9
// 3.37 (no wait: 3.72-3.73, 4.56, 2.82; V1 2.48-2.49): bulk copies of a few hundred bytes each
// are slow, and a row's dots waiting for the whole row lose to registers. (2026-11-29 01:57-01:59,
// V1, lookahead) bulk L2 prefetches of 4-32 MB: 4.4-11.8 ms against 3.13-3.14; per-line
// prefetches, 1-2 MB from the small kernels: 3.13-3.14 (6 blocks an SM: 3.47-3.48 against 3.50),
// more or from the mat-vecs: slower. The memory system is not what a boundary leaves idle.
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <cuda_runtime.h>
#include "gpu_check.h"
#include "gpu_matvec_round.h"
typedef unsigned char u8;
typedef signed char i8;
typedef unsigned int u32;

// Spins allowed before a counter wait gives up (and flags it): a limit on the loop.
#define SPIN_MAX (1u << 26)
__device__ u32 g_spin_overrun;

__device__ __forceinline__ void dep_wait(int mode, const u32* prev, u32 target) {
    // Mode 3, the small kernels: let the next kernel launch first, then wait (the mat-vecs
    // wait first, as mode 0).
    if (mode == 3) {
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
        asm volatile("griddepcontrol.wait;" ::: "memory");
        return;
    }
    if (mode == 0) asm volatile("griddepcontrol.wait;" ::: "memory");
    if (mode == 1) {
        if (threadIdx.x == 0 && prev != nullptr) {
            u32 v = 0, n = 0;
            for (; n < SPIN_MAX; n++) {
                asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(prev) : "memory");
                if (v >= target) break;
            }
            if (n == SPIN_MAX) atomicAdd(&g_spin_overrun, 1);
        }
        __syncthreads();
    }
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
// Every thread of the block calls this after its last write.
__device__ __forceinline__ void dep_signal(int mode, u32* cnt) {
    if (mode != 1) return;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(cnt, 1u);
    }
}

struct Dep {
    u32* cnt;      // this launch's counter
    const u32* prev;  // the previous launch's (null for the first)
    u32 target;    // the previous launch's blocks
    u32* reset;    // the counter of two launches back, zeroed once its readers have passed
    int mode;
};
__device__ __forceinline__ void dep_enter(const Dep& d, bool small = false) {
    dep_wait(d.mode == 3 && !small ? 0 : d.mode, d.prev, d.target);
    if (d.mode == 1 && d.reset != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *d.reset = 0;
}

// L2 lookahead: a range of weights a later kernel will read, prefetched into L2 by bulk
// prefetches (`cp.async.bulk.prefetch.L2`, fire and forget) issued before the wait, so that
// the memory system fills the time a kernel boundary or a small kernel leaves it idle.
// Blocks [first, first + count) issue it, 64 KB a prefetch, spread over their threads.
// lines: instead, one `prefetch.global.L2` per 128-byte line.
struct Ahead {
    const u8* p;
    u32 bytes;
    int lines;
};
__device__ __forceinline__ void l2_ahead(const Ahead& a, int first, int count) {
    const int b = (int)blockIdx.x - first;
    if (a.bytes == 0 || b < 0 || b >= count) return;
    if (a.lines) {
        for (u32 o = ((u32)b * blockDim.x + threadIdx.x) * 128; o < a.bytes;
             o += (u32)count * blockDim.x * 128)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(a.p + o));
        return;
    }
    const u32 chunk = 65536, n = (a.bytes + chunk - 1) / chunk;
    for (u32 c = (u32)b * blockDim.x + threadIdx.x; c < n; c += (u32)count * blockDim.x) {
        const u32 off = c * chunk, len = min(chunk, a.bytes - off) / 16 * 16;
        if (len > 0)
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a.p + off), "r"(len)
                         : "memory");
    }
}

__device__ __forceinline__ void fill_sa(i8* sa, const i8* in, int n_in) {
    for (int c = threadIdx.x; c < n_in / 16; c += blockDim.x)
        ((int4*)sa)[c] = __ldcg(((const int4*)in) + c);
    __syncthreads();
}

// V0 / V1: one warp per row of rb bytes (rb % 16 == 0), grid = rows / 4, S steps of 512 bytes
// a round; activations: n_in int8 (n_in % 16 == 0, <= 16384) copied to shared memory first.
// EARLY (V1): the first round's loads are issued before the wait (weights never change).
template <int S, bool EARLY>
__global__ void __launch_bounds__(128) matvec(const u8* __restrict__ W, const i8* in, i8* out,
                                              int rows, int rb, int n_in, Dep dep, Ahead ah,
                                              int ah_tail) {
    __shared__ __align__(16) i8 sa[16384];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * 4 + warp;
    const u8* wr = W + (long long)min(row, rows - 1) * rb;
    const int n16 = rb / 16, na = n_in / 16;
    uint4 w[S];
    if (EARLY)
        round_load<S>(w, wr, lane, n16);
    else
        for (int o = lane * 128; o < rb; o += 32 * 128)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(wr + o));
    // ah_tail > 0: the last ah_tail blocks (dispatched as the grid's tail begins) issue the
    // lookahead; 0: every block at its start.
    if (ah_tail > 0) l2_ahead(ah, (int)gridDim.x - ah_tail, ah_tail);
    else l2_ahead(ah, 0, gridDim.x);
    dep_enter(dep);
    fill_sa(sa, in, n_in);
    int acc = 0;
    for (int o = lane; o < n16; o += 32 * S) {
        if (!EARLY || o != lane) round_load<S>(w, wr, o, n16);
        acc = round_dot<S>(w, o, n16, sa, na, acc);
    }
    acc = warp_sum_i(acc);
    if (lane == 0 && row < rows) out[row] = (i8)(acc >> 8);
    dep_signal(dep.mode, dep.cnt);
}

// V2 / V3: persistent rows. grid = SMs x blocks an SM (or fewer); a warp's work is a sequence
// of (row, round) units, the next unit's loads issued before the current one's dots (two
// register buffers), the first unit's before the wait. V2 (ticket null): warp g takes rows g,
// g + all warps, ... V3: each warp's first two rows are fixed the same way and every further
// row comes from atomicAdd on `ticket` (zeroed before the launch), asked for one row ahead so
// that its latency hides behind a row's loads and dots: warps that start late (their SM still
// busy with the previous kernel) take fewer rows, as V0's later blocks do.
template <int S>
__global__ void __launch_bounds__(128) matvec_p(const u8* __restrict__ W, const i8* in, i8* out,
                                                int rows, int rb, int n_in, Dep dep, u32* ticket) {
    __shared__ __align__(16) i8 sa[16384];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int nwarps = gridDim.x * 4;
    const int n16 = rb / 16, na = n_in / 16;
    const int rounds = (n16 + 32 * S - 1) / (32 * S);
    int row = blockIdx.x * 4 + warp, k = 0;
    int nxt = row + nwarps;
    uint4 b0[S], b1[S];
    if (row < rows) round_load<S>(b0, W + (long long)row * rb, lane, n16);
    dep_enter(dep);
    // V3: the row after `nxt`, lane 0's ticket, read by the others when the row it follows
    // starts.
    u32 pend = 0;
    if (ticket != nullptr && lane == 0 && nxt < rows) pend = atomicAdd(ticket, 1u);
    fill_sa(sa, in, n_in);
    int acc = 0;
    // One unit: dots of `cur` (row, k), loads of the next unit into `nx`.
    auto unit = [&](const uint4 (&cur)[S], uint4 (&nx)[S]) {
        int nrow = row, nk = k + 1;
        if (nk == rounds) {
            nk = 0;
            nrow = nxt;
        }
        if (nrow < rows) round_load<S>(nx, W + (long long)nrow * rb, nk * 32 * S + lane, n16);
        acc = round_dot<S>(cur, k * 32 * S + lane, n16, sa, na, acc);
        if (k == rounds - 1) {
            acc = warp_sum_i(acc);
            if (lane == 0) out[row] = (i8)(acc >> 8);
            acc = 0;
            // nrow (== nxt) starts now; the one after it:
            int after = nxt + nwarps;
            if (ticket != nullptr) {
                after = nxt < rows ? 2 * nwarps + (int)__shfl_sync(0xffffffff, pend, 0) : rows;
                if (lane == 0 && after < rows) pend = atomicAdd(ticket, 1u);
            }
            nxt = after;
        }
        row = nrow;
        k = nk;
    };
    // At most every row, `rounds` units each: the loop's limit.
    const int max_units = rows * rounds + 2;
    for (int u = 0; u < max_units && row < rows; u += 2) {
        unit(b0, b1);
        if (row >= rows) break;
        unit(b1, b0);
    }
    dep_signal(dep.mode, dep.cnt);
}

// V7: the block's 4 rows copied into shared memory by bulk (TMA) copies issued BEFORE the
// wait, in NCH pieces (piece c = the c-th share of every row), each completing on its own
// mbarrier, so that a warp's dots start as the first piece lands. Registers stay few (more
// blocks resident while the previous kernel runs) and every byte of the block is in flight
// before the wait, not one round. Shared memory: the rows (4 * rb), then the activations.
__device__ __forceinline__ u32 smem_u32(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}
template <int NCH>
__global__ void __launch_bounds__(128) matvec_tma(const u8* __restrict__ W, const i8* in, i8* out,
                                                  int rows, int rb, int n_in, Dep dep) {
    extern __shared__ __align__(128) u8 dyn_sm[];
    __shared__ __align__(8) unsigned long long bars[NCH];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = blockIdx.x * 4;
    const int nr = min(4, rows - row0);
    const int rbp = (rb + 127) / 128 * 128;  // each row's place in shared memory
    i8* sa = (i8*)(dyn_sm + 4 * rbp);
    auto piece = [&](int c) { return c == NCH ? rb : (int)((long long)rb * c / NCH) / 16 * 16; };
    if (threadIdx.x == 0) {
        for (int c = 0; c < NCH; c++)
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(&bars[c])));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (int c = 0; c < NCH; c++) {
            const int a = piece(c), b = piece(c + 1);
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(
                             smem_u32(&bars[c])),
                         "r"((b - a) * nr)
                         : "memory");
            for (int r = 0; r < nr; r++)
                asm volatile(
                    "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], "
                    "%2, [%3];" ::"r"(smem_u32(dyn_sm + r * rbp + a)),
                    "l"(W + (long long)(row0 + r) * rb + a), "r"(b - a), "r"(smem_u32(&bars[c]))
                    : "memory");
        }
    }
    __syncthreads();  // the barriers' initialisation before anyone waits on them
    dep_enter(dep);
    fill_sa(sa, in, n_in);
    const int na = n_in / 16;
    int acc = 0;
    const u8* wr = dyn_sm + warp * rbp;
    for (int c = 0; c < NCH; c++) {
        asm volatile(
            "{ .reg .pred p; W%=: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], 0; @!p bra W%=; }" ::"r"(
                smem_u32(&bars[c]))
            : "memory");
        const int a = piece(c) / 16, b = piece(c + 1) / 16;
        for (int o = a + lane; o < b; o += 32) {
            const uint4 w = ((const uint4*)wr)[o];
            const int4 x = ((const int4*)sa)[o % na];
            acc = __dp4a((int)w.x, x.x, acc);
            acc = __dp4a((int)w.y, x.y, acc);
            acc = __dp4a((int)w.z, x.z, acc);
            acc = __dp4a((int)w.w, x.w, acc);
        }
    }
    acc = warp_sum_i(acc);
    if (lane == 0 && warp < nr) out[row0 + warp] = (i8)(acc >> 8);
    dep_signal(dep.mode, dep.cnt);
}

// A small kernel: every block reads the whole input (n_in bytes) and sums it, then writes its
// share of the n_out outputs (the norm reads the whole row in every block; GLU and the
// attention write a share). pre: bytes each block reads before the wait (the attention's
// K/V rows), from kv.
__global__ void __launch_bounds__(128) small(const i8* in, i8* out, int n_in, int n_out,
                                             const u8* __restrict__ kv, int pre, Dep dep, Ahead ah) {
    __shared__ int red[4];
    l2_ahead(ah, 0, gridDim.x);
    int pacc = 0;
    for (int o = threadIdx.x; o < pre / 16; o += 128) {
        const uint4 w = __ldg(((const uint4*)(kv + (long long)blockIdx.x * pre)) + o);
        pacc += (int)(w.x ^ w.y ^ w.z ^ w.w) & 1;
    }
    dep_enter(dep, true);
    int s = pacc;
    for (int c = threadIdx.x; c < n_in / 4; c += 128) {
        const int v = __ldcg(((const int*)in) + c);
        s += (v & 0xff) + ((v >> 8) & 0xff);
    }
    small_outputs(s, out, n_out, red);
    dep_signal(dep.mode, dep.cnt);
}

struct Step {
    bool mv;
    int rows, rb, n_in;  // mat-vec
    int blocks, n_out, pre;  // small
};

int main(int argc, char** argv) {
    const int layers = argc > 1 ? atoi(argv[1]) : 40;
    const int reps = 20;
    // 13B shapes: width 5120, FFN 13824; row bytes of Q4_K (2880 for 5120 columns), Q6_K
    // (4200 for 5120, 11340 for 13824); q/k/v as one launch of 15360 rows at their mean size.
    const int H = 5120, F = 13824;
    std::vector<Step> layer = {
        {false, 0, 0, 0, 20, H, 0},                                // attention norm
        {true, 3 * H, (2 * 2880 + 4200) / 3 / 16 * 16, H, 0, 0, 0},  // q/k/v
        {false, 0, 0, 0, 160, H, 65536},                           // attention (K/V before the wait)
        {true, H, 2880, H, 0, 0, 0},                               // output
        {false, 0, 0, 0, 20, H, 0},                                // FFN norm
        {true, 2 * F, 2880, H, 0, 0, 0},                           // gate/up
        {false, 0, 0, 0, 54, F, 0},                                // GLU
        {true, H, 11344, F, 0, 0, 0},                              // down (Q6_K 11340, 16-aligned)
    };
    std::vector<Step> steps;
    for (int l = 0; l < layers; l++) steps.insert(steps.end(), layer.begin(), layer.end());
    const int n = (int)steps.size();
    // Weights of each mat-vec: own buffer slice, so nothing repeats within a token.
    u8 *W, *kv;
    long long wbytes = 0;
    const std::vector<long long> woff = random_weights(steps, &W, &wbytes, &kv, 160LL * 65536);
    i8* act[2];
    for (auto& a : act) {
        CK(cudaMalloc(&a, 2 * 16384 * 2));
        CK(cudaMemset(a, 1, 2 * 16384 * 2));
    }
    u32* cnt;
    CK(cudaMalloc(&cnt, n * sizeof(u32)));
    u32* tickets;
    CK(cudaMalloc(&tickets, n * sizeof(u32)));
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    printf("%d layers, %d launches, %.3f GB of weights per token\n", layers, n, wbytes / 1e9);
    int sms = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    // Variants: 0 = flea's shape (V0), 1 = first round before the wait (V1), 2 / 3 = persistent
    // rows with 4 / 8 blocks an SM (V2); each with the small kernels and without them, each
    // with mode 0 (griddepcontrol.wait) and mode 2 (no wait: the bound). Mode 1 (counters)
    // measured 4.1-4.2 ms against 3.34 for mode 0 (2026-11-28 22:20, H200): not repeated.
    const int S = 6;
    // argv[2]: at most this many mat-vec blocks an SM (padding their shared memory; 0: no
    // limit), to model flea's register-bound occupancy (78-88 registers: 6 blocks).
    const int limit = argc > 2 ? atoi(argv[2]) : 0;
    const int dyn = limit > 0 ? 228 * 1024 / limit - 16384 - 1024 : 0;
    if (limit > 0) printf("mat-vec blocks at most %d an SM (%d bytes of padding)\n", limit, dyn);
    const char* variants = argc > 3 ? argv[3] : "01";
    CK(cudaFuncSetAttribute(matvec_tma<4>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    CK(cudaFuncSetAttribute(matvec_tma<8>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    CK(cudaFuncSetAttribute(matvec_tma<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    const char* modes = argc > 4 ? argv[4] : "032";
    // argv[5]: L2 lookahead configurations, "SMALL/MV/TAIL[/LINES],...": MB of the next
    // mat-vec's weights each small kernel prefetches, MB each mat-vec prefetches of the next
    // one, how many of the mat-vec's last blocks issue it (0: every block), and 1 for a
    // prefetch a 128-byte line instead of 64 KB bulk prefetches.
    struct Look {
        int small_mb, mv_mb, tail, lines;
    };
    std::vector<Look> looks;
    for (const char* c = argc > 5 ? argv[5] : "0/0/0"; *c;) {
        Look lk{0, 0, 0, 0};
        if (sscanf(c, "%d/%d/%d/%d", &lk.small_mb, &lk.mv_mb, &lk.tail, &lk.lines) < 3) break;
        looks.push_back(lk);
        while (*c && *c != ',') c++;
        if (*c == ',') c++;
    }
    for (int smalls : {1, 0}) {
        for (const char* vc = variants; *vc >= '0' && *vc <= '9'; vc++) {
            const int v = *vc - '0';
            if (limit > 0 && v >= 2 && v <= 6) continue;  // the persistent grids set their own size
          for (const Look& lk : looks) {
            if (v > 1 && (lk.small_mb || lk.mv_mb)) continue;  // lookahead: V0 / V1 only
            for (const char* mc = modes; *mc >= '0' && *mc <= '3'; mc++) {
                const int mode = *mc - '0';
                if (mode == 3 && !smalls) continue;
                cudaGraph_t g;
                CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
                CK(cudaMemsetAsync(cnt, 0, n * sizeof(u32), st));
                CK(cudaMemsetAsync(tickets, 0, n * sizeof(u32), st));
                int prev_blocks = 0, launched = 0, prev_i = -1, prev2_i = -1;
                for (int i = 0; i < n; i++) {
                    const Step& s = steps[i];
                    if (!s.mv && !smalls) continue;
                    cudaLaunchConfig_t cfg = {};
                    cudaLaunchAttribute at[1];
                    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
                    at[0].val.programmaticStreamSerializationAllowed = 1;
                    cfg.attrs = at;
                    cfg.numAttrs = launched > 0 ? 1 : 0;  // the first follows the memset fully
                    cfg.blockDim = dim3(128);
                    cfg.stream = st;
                    int blocks = s.mv ? (s.rows + 3) / 4 : s.blocks;
                    const int bps[] = {0, 0, 4, 8, 4, 6, 8};
                    if (s.mv && v >= 2 && v <= 6) blocks = std::min(blocks, sms * bps[v]);
                    if (s.mv) cfg.dynamicSmemBytes = dyn;
                    if (s.mv && v >= 7) {
                        const int need = 4 * ((s.rb + 127) / 128 * 128) + s.n_in;
                        cfg.dynamicSmemBytes = std::max(need, dyn + 16384 - 0);
                    }
                    cfg.gridDim = dim3(blocks);
                    Dep d{cnt + i, prev_i >= 0 ? cnt + prev_i : nullptr, (u32)prev_blocks,
                          prev2_i >= 0 ? cnt + prev2_i : nullptr, mode};
                    const i8* in = act[i & 1];
                    i8* out = act[(i + 1) & 1];
                    const u8* w = W + woff[i];
                    // The next mat-vec this graph launches after step i, and how much of its
                    // weights step i prefetches into L2.
                    Ahead ah{nullptr, 0, 0};
                    for (int j = i + 1; j < n; j++)
                        if (steps[j].mv) {
                            const long long mb = s.mv ? lk.mv_mb : lk.small_mb;
                            ah = {W + woff[j], (u32)std::min<long long>(mb << 20, (long long)steps[j].rows * steps[j].rb), lk.lines};
                            break;
                        }
                    if (s.mv) {
                        if (v == 0) CK(cudaLaunchKernelEx(&cfg, matvec<S, false>, w, in, out, s.rows, s.rb, s.n_in, d, ah, lk.tail));
                        else if (v == 1) CK(cudaLaunchKernelEx(&cfg, matvec<S, true>, w, in, out, s.rows, s.rb, s.n_in, d, ah, lk.tail));
                        else if (v == 7) CK(cudaLaunchKernelEx(&cfg, matvec_tma<4>, w, in, out, s.rows, s.rb, s.n_in, d));
                        else if (v == 8) CK(cudaLaunchKernelEx(&cfg, matvec_tma<8>, w, in, out, s.rows, s.rb, s.n_in, d));
                        else if (v == 9) CK(cudaLaunchKernelEx(&cfg, matvec_tma<1>, w, in, out, s.rows, s.rb, s.n_in, d));
                        else CK(cudaLaunchKernelEx(&cfg, matvec_p<S>, w, in, out, s.rows, s.rb, s.n_in, d,
                                                   v <= 3 ? (u32*)nullptr : tickets + i));
                    } else {
                        CK(cudaLaunchKernelEx(&cfg, small, in, out, H, s.n_out, (const u8*)kv, s.pre, d, ah));
                    }
                    prev_blocks = blocks;
                    prev2_i = prev_i;
                    prev_i = i;
                    launched++;
                }
                CK(cudaStreamEndCapture(st, &g));
                const std::vector<float> ms = graph_times_ms(g, st, reps);
                const float med = ms[ms.size() / 2];
                const char* names[] = {"V0 flea's shape", "V1 first round before the wait",
                                       "V2 persistent, 4 blocks/SM", "V2 persistent, 8 blocks/SM",
                                       "V3 ticket rows, 4 blocks/SM", "V3 ticket rows, 6 blocks/SM",
                                       "V3 ticket rows, 8 blocks/SM",
                                       "V7 rows by bulk copies before the wait, 4 pieces",
                                       "V8 rows by bulk copies before the wait, 8 pieces",
                                       "V9 rows by bulk copies before the wait, 1 piece"};
                printf("L2 ahead (%s) small %2d MB, mat-vec %2d MB (%s) | ",
                       lk.lines ? "lines" : "bulk", lk.small_mb, lk.mv_mb,
                       lk.tail > 0 ? "its last blocks" : "every block");
                printf("%-32s %-14s %-20s median %.3f ms a token (min %.3f, max %.3f), %.2f TB/s of weights, %.2f us a launch beyond the bytes at 3.97 TB/s\n",
                       names[v], smalls ? "all kernels" : "mat-vecs only",
                       mode == 0   ? "griddepcontrol.wait"
                       : mode == 1 ? "counter wait"
                       : mode == 3 ? "small ones trigger first"
                                   : "no wait (bound)",
                       med, ms.front(),
                       ms.back(), wbytes / (med * 1e-3) / 1e12,
                       (med * 1e-3 - wbytes / 3.97e12) / launched * 1e6);
                if (mode == 1) {
                    u32 over = 0;
                    CK(cudaMemcpyFromSymbol(&over, g_spin_overrun, sizeof(u32)));
                    printf("  counter waits that gave up: %u\n", over);
                }
                CK(cudaGraphDestroy(g));
            }
          }
        }
    }
    // Outputs of V0 and V2 agree (the same sums in another order of rounds? no: the same
    // order; int adds are exact), checked on one matrix.
    {
        const Step& s = steps[7];
        i8 *o0, *o2;
        CK(cudaMalloc(&o0, s.rows));
        CK(cudaMalloc(&o2, s.rows));
        Dep d{cnt, nullptr, 0, nullptr, 2};
        matvec<S, false><<<(s.rows + 3) / 4, 128>>>(W + woff[7], act[0], o0, s.rows, s.rb, s.n_in, d,
                                                    Ahead{nullptr, 0, 0}, 0);
        CK(cudaMemset(tickets, 0, sizeof(u32)));
        matvec_p<S><<<sms * 4, 128>>>(W + woff[7], act[0], o2, s.rows, s.rb, s.n_in, d, tickets);
        CK(cudaDeviceSynchronize());
        std::vector<i8> h0(s.rows), h2(s.rows);
        CK(cudaMemcpy(h0.data(), o0, s.rows, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(h2.data(), o2, s.rows, cudaMemcpyDeviceToHost));
        int diff = 0;
        for (int i = 0; i < s.rows; i++) diff += h0[i] != h2[i];
        printf("V0 vs V3 outputs of the down matrix: %d of %d rows differ\n", diff, s.rows);
        matvec_tma<4><<<(s.rows + 3) / 4, 128, 4 * ((s.rb + 127) / 128 * 128) + s.n_in>>>(
            W + woff[7], act[0], o2, s.rows, s.rb, s.n_in, d);
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(h2.data(), o2, s.rows, cudaMemcpyDeviceToHost));
        diff = 0;
        for (int i = 0; i < s.rows; i++) diff += h0[i] != h2[i];
        printf("V0 vs V7 outputs of the down matrix: %d of %d rows differ\n", diff, s.rows);
    }
    return 0;
}
