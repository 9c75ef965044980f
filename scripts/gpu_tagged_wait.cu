// Stand-alone harness: can a resident decode token's kernel boundaries be crossed faster than
// by programmatic dependent launch's grid-wide wait, without the per-block fences that made a
// counter per launch dearer still (scripts/gpu_dep_wait.cu, mode 1: 4.1-4.2 ms against 3.38)?
//
// The token is modelled as in gpu_dep_wait.cu (a 13B: 40 layers x 8 launches — norm, q/k/v
// mat-vec, attention, output mat-vec, norm, gate/up mat-vec, GLU, down mat-vec; one warp a
// row of the real row sizes, 8.1 GB of random weights, the row's first round loaded before
// the wait, dp4a against int8 activations in shared memory), as one CUDA graph. How a kernel
// learns that its inputs are there (mode):
//   0  griddepcontrol.wait, then launch_dependents (flea's pdl_enter);
//   4  tagged data: every kernel calls launch_dependents at its start and never waits for the
//      grid before it. A mat-vec writes each output as one 64-bit word (value, tag) with a
//      relaxed store, no fence: a reader spins on the words it needs until their tag is this
//      step's. A small kernel's block writes its outputs, passes a block barrier, and thread 0
//      publishes a flag with a release store; a mat-vec block's threads spin on the small
//      kernel's flags with acquire loads, pass a block barrier, then copy the activations.
//      Tags are (token epoch << 10 | step), the epoch bumped by a one-thread launch first in
//      the graph that triggers no dependent (so every later launch sees it).
//   6  the mat-vecs wait on the small kernels' flags, the small kernels for the grid;
//   7  the small kernels read tagged words, the mat-vecs wait for the grid;
//   8  as 7, but a small kernel lets the next launch start only after it has read its inputs
//      (where flea's pdl_enter lets it: after the wait), so only the wait itself differs;
//   2  no wait at all: outputs wrong; the bound for any wait.
// Untagged, mat-vecs write 32-bit words (flea's f32 outputs); tagged, 64-bit ones. The small
// kernels read the words they need with 16-byte loads, all in flight at once (the norm: the whole 5120-row output in each of its 20 blocks; the
// attention: a head's q, k and v, 384 words, in each of 160 blocks; the GLU: its 512 gate/up
// words in each of 54 blocks) and write int8 activations.
// Prints ms per token, TB/s of weights, a checksum of the last mat-vec's output (mode 4 must
// equal mode 0), and how many spins gave up (must be 0).
// Measured (H200, 2026-11-29 20:35-20:40 UTC, docs/BENCHMARKS.md), ms a token, medians of 20,
// at most 8 / 6 / 12 mat-vec blocks an SM: mode 0 3.33-3.35 / 3.50-3.55 / 3.12-3.13; mode 7
// 3.53 / 3.99-4.00 / 4.67-4.69; mode 8 3.52 / 4.00; no wait 2.72 / 2.86 / 2.44. Modes 4 and 6
// (flags) were measured only in a first form of this harness whose small kernels read their
// words one load at a time: no better than mode 0 there. Every tagged form loses to the
// grid-wide wait; the outputs of modes 0, 4, 6, 7 and 8 are equal.
//   nvcc -O3 -std=c++17 -arch=sm_90 -o tagged_wait scripts/gpu_tagged_wait.cu
// (nvcc builds it without a GPU too, e.g. from pip: nvidia-cuda-nvcc, nvidia-nvvm,
// nvidia-cuda-runtime and nvidia-cuda-crt, all 13.0.*, with -I/-L at their include and lib.)
//   ./tagged_wait [layers=40] [most mat-vec blocks an SM, 0: no limit] [modes=042, any of 024678]
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
typedef unsigned long long u64;

// Spins allowed before a wait gives up (and counts it): a limit on every loop.
#define SPIN_MAX (1u << 24)
__device__ u32 g_spin_overrun;

struct Sync {
    const u32* epoch;  // this token's epoch (bumped by the graph's first launch)
    u32 step;          // this launch's index in the token
    u32* flags;        // small kernels: one flag a block
    const u32* pflags; // mat-vecs: the small kernel before's flags
    int npflags;       // how many
    int mode;
};
__device__ __forceinline__ u32 tag_of(const Sync& s, u32 step) {
    return (__ldcg(s.epoch) << 10) | (step & 1023u);
}
__device__ __forceinline__ u32 ld_acquire(const u32* p) {
    u32 v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void st_release(u32* p, u32 v) {
    asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_relaxed64(u64* p, u64 v) {
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ void wait_grid() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
}
__device__ __forceinline__ void launch_next() {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
// Modes 6 / 7: one boundary tagged, the other waited for — 6: mat-vecs wait on the small
// kernels' flags, the small kernels for the grid; 7: the small kernels read tagged words, the
// mat-vecs wait for the grid.
__device__ __forceinline__ bool tagged_words(const Sync& s) {
    return s.mode == 4 || s.mode == 7 || s.mode == 8;
}
__device__ __forceinline__ bool flagged(const Sync& s) { return s.mode == 4 || s.mode == 6; }
// Mode 0: the grid before has ended; modes 2 / 4: nothing yet (the data says when).
__device__ __forceinline__ void enter(const Sync& s, bool small) {
    if (s.mode == 0 || (s.mode == 6 && small) || ((s.mode == 7 || s.mode == 8) && !small))
        wait_grid();
    // Mode 8: a small kernel lets the next launch start only once it has its inputs.
    if (!(s.mode == 8 && small)) launch_next();
}
// Mode 4, a mat-vec block: every flag of the small kernel before carries its step's tag.
__device__ __forceinline__ void wait_flags(const Sync& s) {
    if (!flagged(s) || s.pflags == nullptr) return;
    const u32 want = tag_of(s, s.step - 1);
    for (int f = threadIdx.x; f < s.npflags; f += blockDim.x) {
        u32 n = 0;
        while (ld_acquire(s.pflags + f) != want && n < SPIN_MAX) {
            __nanosleep(64);
            n++;
        }
        if (n == SPIN_MAX) atomicAdd(&g_spin_overrun, 1u);
    }
    __syncthreads();
}
// Two tagged words (value, tag) as one 16-byte relaxed load; settle_v2 reloads until both
// carry `want`.
__device__ __forceinline__ uint4 ld_relaxed_v2(const uint4* p) {
    u64 a, b;
    asm volatile("ld.relaxed.gpu.global.v2.u64 {%0, %1}, [%2];" : "=l"(a), "=l"(b) : "l"(p)
                 : "memory");
    return make_uint4((u32)a, (u32)(a >> 32), (u32)b, (u32)(b >> 32));
}
__device__ __forceinline__ void settle_v2(const uint4* p, uint4& v, u32 want) {
    u32 n = 0;
    while ((v.y != want || v.w != want) && n < SPIN_MAX) {
        __nanosleep(32);
        v = ld_relaxed_v2(p);
        n++;
    }
    if (n == SPIN_MAX) atomicAdd(&g_spin_overrun, 1u);
}

// One warp a row of rb bytes, grid = rows / 4; activations: n_in int8 copied to shared
// memory after the wait; the row's first round loaded before it.
template <int S>
__global__ void __launch_bounds__(128) matvec(const u8* __restrict__ W, const i8* in, u64* out,
                                              int rows, int rb, int n_in, Sync s) {
    __shared__ __align__(16) i8 sa[16384];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * 4 + warp;
    const u8* wr = W + (long long)min(row, rows - 1) * rb;
    const int n16 = rb / 16, na = n_in / 16;
    uint4 w[S];
    round_load<S>(w, wr, lane, n16);
    enter(s, false);
    wait_flags(s);
    for (int c = threadIdx.x; c < n_in / 16; c += blockDim.x)
        ((int4*)sa)[c] = __ldcg(((const int4*)in) + c);
    __syncthreads();
    int acc = 0;
    for (int o = lane; o < n16; o += 32 * S) {
        if (o != lane) round_load<S>(w, wr, o, n16);
        acc = round_dot<S>(w, o, n16, sa, na, acc);
    }
    acc = warp_sum_i(acc);
    if (lane == 0 && row < rows) {
        if (tagged_words(s))
            st_relaxed64(out + row, ((u64)tag_of(s, s.step) << 32) | (u32)acc);
        else
            ((u32*)out)[row] = (u32)acc;  // untagged: a 32-bit word, as flea's f32 outputs
    }
}

// A small kernel: block b reads n_rd words of the mat-vec output before it, from b * stride
// (mod the rows there), sums them, and writes its share of the n_out int8 outputs. pre:
// bytes each block reads before the wait (the attention's K/V rows), from kv.
__global__ void __launch_bounds__(128) small(const u64* in, int in_rows, int n_rd, int stride,
                                             i8* out, int n_out, const u8* __restrict__ kv,
                                             int pre, Sync s) {
    __shared__ int red[4];
    int pacc = 0;
    for (int o = threadIdx.x; o < pre / 16; o += 128) {
        const uint4 w = __ldg(((const uint4*)(kv + (long long)blockIdx.x * pre)) + o);
        pacc += (int)(w.x ^ w.y ^ w.z ^ w.w) & 1;
    }
    enter(s, true);
    const u32 want = s.step > 0 ? tag_of(s, s.step - 1) : 0;
    int sum = pacc;
    // Every 16-byte vector of the block's words in flight at once (4 untagged 32-bit words or
    // 2 tagged 64-bit ones a vector), then each checked (tagged: waited for, reloading).
    constexpr int RB = 24;
    const bool tg = tagged_words(s);
    const int wpv = tg ? 2 : 4, nv = n_rd / wpv;
    const long long first =
        (long long)blockIdx.x * stride % (in_rows - n_rd + 1) / 4 * 4;  // words, 16-aligned
    const uint4* base = (const uint4*)((const u8*)in + first * (tg ? 8 : 4));
    if (in != nullptr)
        for (int v0 = threadIdx.x; v0 < nv; v0 += 128 * RB) {
            uint4 buf[RB];
#pragma unroll
            for (int k = 0; k < RB; k++)
                if (v0 + 128 * k < nv) buf[k] = tg ? ld_relaxed_v2(base + v0 + 128 * k)
                                                   : __ldcg(base + v0 + 128 * k);
#pragma unroll
            for (int k = 0; k < RB; k++)
                if (v0 + 128 * k < nv) {
                    if (tg) settle_v2(base + v0 + 128 * k, buf[k], want);
                    sum += (int)(buf[k].x & 0xff) + (int)(buf[k].z & 0xff);
                    if (!tg) sum += (int)(buf[k].y & 0xff) + (int)(buf[k].w & 0xff);
                }
        }
    if (s.mode == 8) launch_next();
    small_outputs(sum, out, n_out, red);
    if (flagged(s)) {
        __syncthreads();  // the block's outputs before its flag (cumulative through the barrier)
        if (threadIdx.x == 0) st_release(s.flags + blockIdx.x, tag_of(s, s.step));
    }
}

__global__ void bump_epoch(u32* epoch) { *epoch += 1; }

struct Step {
    bool mv;
    int rows, rb, n_in;            // mat-vec
    int blocks, n_out, pre, n_rd, stride;  // small
};

int main(int argc, char** argv) {
    const int layers = argc > 1 ? atoi(argv[1]) : 40;
    const int reps = 20;
    const int H = 5120, F = 13824;
    // 13B shapes, as gpu_dep_wait.cu.
    std::vector<Step> layer = {
        {false, 0, 0, 0, 20, H, 0, H, 0},                            // attention norm: whole row
        {true, 3 * H, (2 * 2880 + 4200) / 3 / 16 * 16, H, 0, 0, 0, 0, 0},  // q/k/v
        {false, 0, 0, 0, 160, H, 65536, 384, 128},                   // attention: a head's q/k/v
        {true, H, 2880, H, 0, 0, 0, 0, 0},                           // output
        {false, 0, 0, 0, 20, H, 0, H, 0},                            // FFN norm
        {true, 2 * F, 2880, H, 0, 0, 0, 0, 0},                       // gate/up
        {false, 0, 0, 0, 54, F, 0, 512, 256},                        // GLU: its gate/up share
        {true, H, 11344, F, 0, 0, 0, 0, 0},                          // down
    };
    std::vector<Step> steps;
    for (int l = 0; l < layers; l++) steps.insert(steps.end(), layer.begin(), layer.end());
    const int n = (int)steps.size();
    if (n + 1 > 1023) {
        fprintf(stderr, "too many steps for the tag's 10 bits\n");
        return 1;
    }
    u8 *W, *kv;
    long long wbytes = 0;
    const std::vector<long long> woff = random_weights(steps, &W, &wbytes, &kv, 160LL * 65536);
    // Each step its own output buffer, so a stale word is always an older tag.
    std::vector<u64*> mv_out(n, nullptr);
    std::vector<i8*> sm_out(n, nullptr);
    for (int i = 0; i < n; i++) {
        if (steps[i].mv) {
            CK(cudaMalloc(&mv_out[i], steps[i].rows * sizeof(u64)));
            CK(cudaMemset(mv_out[i], 0, steps[i].rows * sizeof(u64)));
        } else {
            CK(cudaMalloc(&sm_out[i], 16384));
            CK(cudaMemset(sm_out[i], 1, 16384));
        }
    }
    u32 *flags, *epoch;
    CK(cudaMalloc(&flags, (size_t)n * 256 * sizeof(u32)));
    CK(cudaMemset(flags, 0, (size_t)n * 256 * sizeof(u32)));
    CK(cudaMalloc(&epoch, sizeof(u32)));
    CK(cudaMemset(epoch, 0, sizeof(u32)));
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    printf("%d layers, %d launches, %.3f GB of weights per token\n", layers, n, wbytes / 1e9);
    const int S = 6;
    const int limit = argc > 2 ? atoi(argv[2]) : 0;
    const int dyn = limit > 0 ? 228 * 1024 / limit - 16384 - 1024 : 0;
    if (limit > 0) printf("mat-vec blocks at most %d an SM (%d bytes of padding)\n", limit, dyn);
    const char* modes = argc > 3 ? argv[3] : "042";
    const int last_mv = n - 1;  // the token ends with a down mat-vec
    for (const char* mc = modes; *mc; mc++) {
        const int mode = *mc - '0';
        if (mode != 0 && mode != 2 && mode != 4 && mode != 6 && mode != 7 && mode != 8) continue;
        cudaGraph_t g;
        CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
        bump_epoch<<<1, 1, 0, st>>>(epoch);
        for (int i = 0; i < n; i++) {
            const Step& s = steps[i];
            cudaLaunchConfig_t cfg = {};
            cudaLaunchAttribute at[1];
            at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
            at[0].val.programmaticStreamSerializationAllowed = 1;
            cfg.attrs = at;
            cfg.numAttrs = 1;  // after bump_epoch (no trigger): it ends first in every mode
            cfg.blockDim = dim3(128);
            cfg.stream = st;
            const int prev = (i + n - 1) % n;  // the token's first norm reads the last down's
            Sync sy{epoch, (u32)i, flags + (size_t)i * 256, i > 0 ? flags + (size_t)prev * 256 : nullptr,
                    i > 0 ? steps[prev].blocks : 0, mode};
            if (s.mv) {
                cfg.gridDim = dim3((s.rows + 3) / 4);
                cfg.dynamicSmemBytes = dyn;
                CK(cudaLaunchKernelEx(&cfg, matvec<S>, (const u8*)(W + woff[i]),
                                      (const i8*)sm_out[prev], mv_out[i], s.rows, s.rb, s.n_in, sy));
            } else {
                cfg.gridDim = dim3(s.blocks);
                // The first norm of the token reads the previous token's last output: nothing
                // to wait for inside this token (tags would be last token's).
                const u64* in = i > 0 ? mv_out[prev] : nullptr;
                const int in_rows = i > 0 ? steps[prev].rows : 1;
                CK(cudaLaunchKernelEx(&cfg, small, in, in_rows, s.n_rd, s.stride, sm_out[i],
                                      s.n_out, (const u8*)kv, s.pre, sy));
            }
        }
        CK(cudaStreamEndCapture(st, &g));
        const std::vector<float> ms = graph_times_ms(g, st, reps);
        const float med = ms[ms.size() / 2];
        // The last mat-vec's values (the low word of a tagged one).
        const bool tg = mode == 4 || mode == 7 || mode == 8;
        std::vector<u64> h(steps[last_mv].rows);
        CK(cudaMemcpy(h.data(), mv_out[last_mv], h.size() * (tg ? 8 : 4), cudaMemcpyDeviceToHost));
        u64 sum = 0;
        for (size_t k = 0; k < h.size(); k++)
            sum = sum * 1000003u + (tg ? (u32)h[k] : ((const u32*)h.data())[k]);
        u32 over = 0;
        CK(cudaMemcpyFromSymbol(&over, g_spin_overrun, sizeof(u32)));
        const char* name = mode == 0   ? "griddepcontrol.wait"
                           : mode == 4 ? "tagged data, flags"
                           : mode == 6 ? "flags only"
                           : mode == 7 ? "tagged words only"
                           : mode == 8 ? "tagged, trigger after"
                                       : "no wait (bound)";
        printf("%-22s median %.3f ms a token (min %.3f, max %.3f), %.2f TB/s of weights, "
               "%.2f us a launch beyond the bytes at 3.97 TB/s; last output %016llx; spins given up %u\n",
               name, med, ms.front(), ms.back(), wbytes / (med * 1e-3) / 1e12,
               (med * 1e-3 - wbytes / 3.97e12) / n * 1e6, sum, over);
        CK(cudaGraphDestroy(g));
    }
    return 0;
}
