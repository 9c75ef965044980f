// Stand-alone harness: does a one-token mat-vec lose bandwidth when each warp reads from
// several weight streams far apart in memory? Plain reads (no arithmetic beyond a checksum)
// with the load pattern of flea's one-token kernels (crates/flea-cuda/src/kernels.cu):
//   q6 soa      the resident Q6_K layout (staging.rs `repack_q6k`): all blocks' ql | all qh |
//               all scales | all d, so a warp reads four streams up to 57 MB apart;
//   q6 pairsoa  the same fields grouped per pair of rows (ql | qh | scales | d of 108 blocks,
//               22680 bytes a pair): one stream;
//   q4 zmajor   Q4_K gate and up rows (2880 bytes each) as flea launches them: blockIdx.z picks
//               the matrix, so gate's blocks run before up's (one stream at a time);
//   q4 paired   warps 0-1 of a block read gate rows, warps 2-3 the same up rows (two streams
//               39.8 MB apart, the layout of the GLU epilogue tried 2026-11-28);
//   q4 pairedoff  the same with up moved by 8 MB + 2304 bytes (not a multiple of 32 KiB);
//   q4 hdronce  zmajor, but one lane of each 8 loads the block's 16-byte header (and shares it
//               by shuffles) instead of all 8 loading it;
//   q4 safill   zmajor, each block first copying 6480 bytes of int8 activations (5120 quants,
//               sums, scales) into shared memory by cp.async after its first weight loads, as
//               flea's `mmvqs_*` do, and passing a block barrier before using them;
//   q4 sadot    safill with dot products on them (dp4a of the quants against the shared
//               activations, a float scale a block): roughly flea's one-token Q4_K kernel;
//   q4 safill rN  safill with each warp taking N rows one after another (one fill per 4N rows);
//   copy pair   a device-to-device copy of the same bytes (what flea's floor measures).
//   q4 flat     zmajor grids reading the same bytes as distinct consecutive 16-byte words
//               (no header re-read): what a layout without shared headers could stream at.
// Each launch reads a fresh copy of the weights (16 copies rotate), so L2 serves none of it.
// Numbers: docs/BENCHMARKS.md ("the small launches folded into the mat-vecs' last blocks").
//   nvcc -O3 -std=c++17 -arch=sm_90 -o stream_layout scripts/gpu_stream_layout.cu && ./stream_layout
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>
#include "gpu_check.h"
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

// Q6_K, one warp per row, 8 lanes per 256-block, 3 steps of loads in flight (as Q6Steps).
// PAIR = 0: tensor-wide fields; 1: fields per pair of rows.
template <int PAIR>
__global__ void __launch_bounds__(128) q6_read(const u8* __restrict__ W, int rows, int nb,
                                               u32* out) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * 4 + warp;
    if (row >= rows) return;
    const long long NB = (long long)rows * nb;
    const u8 *ql, *qh, *sc;
    const u16* d;
    long long b0;
    if (PAIR) {
        const u8* g = W + (long long)(row >> 1) * (2 * nb) * 210;
        ql = g;
        qh = g + 2 * nb * 128;
        sc = g + 2 * nb * 192;
        d = (const u16*)(g + 2 * nb * 208);
        b0 = (long long)(row & 1) * nb;
    } else {
        ql = W;
        qh = W + NB * 128;
        sc = W + NB * 192;
        d = (const u16*)(W + NB * 208);
        b0 = (long long)row * nb;
    }
    const int p = lane & 7, n = p >> 2, l0 = 8 * (p & 3);
    u32 acc = 0;
    for (int blk = lane >> 3; blk < nb; blk += 12) {
        uint2 a[3], b[3], h[3], s[3];
        u16 dd[3];
#pragma unroll
        for (int k = 0; k < 3; k++) {
            const int bk = blk + 4 * k;
            if (bk < nb) {
                const long long B = b0 + bk;
                a[k] = __ldg((const uint2*)(ql + B * 128 + 64 * n + l0));
                b[k] = __ldg((const uint2*)(ql + B * 128 + 64 * n + 32 + l0));
                h[k] = __ldg((const uint2*)(qh + B * 64 + 32 * n + l0));
                s[k] = __ldg((const uint2*)(sc + B * 16 + 8 * n));
                dd[k] = __ldg(d + B);
            } else {
                a[k] = b[k] = h[k] = s[k] = make_uint2(0, 0);
                dd[k] = 0;
            }
        }
#pragma unroll
        for (int k = 0; k < 3; k++)
            acc += a[k].x ^ a[k].y ^ b[k].x ^ b[k].y ^ h[k].x ^ h[k].y ^ s[k].x ^ s[k].y ^ dd[k];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[row] = acc;
}

// The block's 6480 bytes of int8 activations into shared memory by cp.async, then the block
// barrier (each thread passes it once, from whichever iteration: non-aligned), as flea's
// `sa_fill` / `sa_wait`. Returns true (the caller's "filled").
__device__ __forceinline__ bool sa_fill_wait(u8* sa, const u8* __restrict__ act) {
    const u32 base = (u32)__cvta_generic_to_shared(sa);
    for (int c = threadIdx.x; c < 6480 / 16; c += 128)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(base + 16 * c),
                     "l"(act + 16 * c) : "memory");
    asm volatile("cp.async.commit_group;" ::: "memory");
    asm volatile("cp.async.wait_all;" ::: "memory");
    asm volatile("barrier.sync 0;" ::: "memory");
    return true;
}

// A lane's two steps of Q4_K loads (blocks blk and blk + 4 of the row at wr): the block's
// 16-byte header (if `header`, else zeros) and its 16 quant bytes of part p.
__device__ __forceinline__ void q4_steps(const u8* __restrict__ wr, int blk, int nb, int p,
                                         bool header, uint4 (&hd)[2], uint4 (&qs)[2]) {
#pragma unroll
    for (int k = 0; k < 2; k++) {
        const int bk = blk + 4 * k;
        const bool in = bk < nb;
        hd[k] = in && header ? __ldg((const uint4*)(wr + bk * 144)) : make_uint4(0, 0, 0, 0);
        qs[k] = in ? __ldg((const uint4*)(wr + bk * 144 + 16 + 16 * p)) : make_uint4(0, 0, 0, 0);
    }
}

// Q4_K rows of nb 144-byte blocks, one warp per row, 8 lanes per block (a 16-byte header and
// 16 bytes of quants each), 2 steps in flight. MODE 0: blockIdx.z picks gate (A) or up (B),
// 4 rows a block; MODE 1: warps 0-1 read A rows 2b, 2b+1, warps 2-3 the same B rows.
// MODE 2: as 0 with the header loaded by one lane of 8; MODE 3: as 0, flat 16-byte words;
// MODE 5: as 0 with the shared-activation fill (`act`, 6480 bytes) and dot products on it
// (the fill alone: q4_safill_rows).
template <int MODE>
__global__ void __launch_bounds__(128) q4_read(const u8* __restrict__ A, const u8* __restrict__ B,
                                               int rows, int nb, u32* out,
                                               const u8* __restrict__ act = nullptr) {
    extern __shared__ __align__(16) u8 sa[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int row;
    const u8* M;
    if (MODE != 1) {
        row = blockIdx.x * 4 + warp;
        M = blockIdx.z ? B : A;
    } else {
        row = blockIdx.x * 2 + (warp & 1);
        M = warp >= 2 ? B : A;
    }
    if (row >= rows) return;
    const u8* wr = M + (long long)row * nb * 144;
    const int p = lane & 7;
    u32 acc = 0;
    float facc = 0.f;
    bool filled = MODE != 5;
    if (MODE == 3) {
        // nb * 9 words of 16 bytes a row, 2 steps of 32 lanes in flight.
        const int words = nb * 9;
        for (int w = lane; w < words; w += 64) {
            const uint4 x = __ldg((const uint4*)(wr + 16 * w));
            const uint4 y = w + 32 < words ? __ldg((const uint4*)(wr + 16 * (w + 32)))
                                           : make_uint4(0, 0, 0, 0);
            acc += x.x ^ x.w ^ y.x ^ y.w ^ x.y ^ y.z;
        }
    } else {
        for (int blk = lane >> 3; blk < nb; blk += 8) {
            uint4 hd[2], qs[2];
            q4_steps(wr, blk, nb, p, MODE != 2 || p == 0, hd, qs);
            if (!filled) filled = sa_fill_wait(sa, act);
            if (MODE == 5) {
#pragma unroll
                for (int k = 0; k < 2; k++) {
                    const int bk = blk + 4 * k;
                    const uint4 a0 = *(const uint4*)(sa + ((bk * 256 + 16 * p) % 5120));
                    const uint4 a1 = *(const uint4*)(sa + ((bk * 256 + 128 + 16 * p) % 5120));
                    const int lo = __dp4a((int)(qs[k].x & 0x0f0f0f0fu), (int)a0.x,
                                   __dp4a((int)(qs[k].y & 0x0f0f0f0fu), (int)a0.y,
                                   __dp4a((int)(qs[k].z & 0x0f0f0f0fu), (int)a0.z,
                                   __dp4a((int)(qs[k].w & 0x0f0f0f0fu), (int)a0.w, 0))));
                    const int hi = __dp4a((int)((qs[k].x >> 4) & 0x0f0f0f0fu), (int)a1.x,
                                   __dp4a((int)((qs[k].y >> 4) & 0x0f0f0f0fu), (int)a1.y,
                                   __dp4a((int)((qs[k].z >> 4) & 0x0f0f0f0fu), (int)a1.z,
                                   __dp4a((int)((qs[k].w >> 4) & 0x0f0f0f0fu), (int)a1.w, 0))));
                    const float sd = ((const float*)(sa + 5120 + 1280))[bk % 20];
                    facc += sd * (float)(lo * (int)(hd[k].y & 0x3f) + hi * (int)((hd[k].y >> 8) & 0x3f)) -
                            (float)(hd[k].z & 0xff) * (float)((const int*)(sa + 5120))[(bk * 16 + p) % 320];
                }
            } else {
#pragma unroll
                for (int k = 0; k < 2; k++) {
                    if (MODE == 2) {
                        const int src = lane & ~7;
                        hd[k].x = __shfl_sync(0xffffffffu, hd[k].x, src);
                        hd[k].w = __shfl_sync(0xffffffffu, hd[k].w, src);
                    }
                    acc += hd[k].x ^ hd[k].w ^ qs[k].x ^ qs[k].y ^ qs[k].z ^ qs[k].w;
                }
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        acc += __shfl_xor_sync(0xffffffffu, acc, o);
        facc += __shfl_xor_sync(0xffffffffu, facc, o);
    }
    if (lane == 0) out[(MODE != 1 ? blockIdx.z * rows : 0) + row] ^= acc ^ __float_as_uint(facc);
}

// MODE 0 with the shared-activation fill, each warp taking rows row, row + 4 * gridDim.x, ...
// (grid rows / 4: one row a warp, "safill"; rows / (4 N): N rows one after another, one fill
// per block for 4 N rows, "safill rN").
__global__ void __launch_bounds__(128) q4_safill_rows(const u8* __restrict__ A,
                                                      const u8* __restrict__ B, int rows, int nb,
                                                      u32* out, const u8* __restrict__ act) {
    extern __shared__ __align__(16) u8 sa[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, p = lane & 7;
    const u8* M = blockIdx.z ? B : A;
    bool filled = false;
    for (int row = blockIdx.x * 4 + warp; row < rows; row += 4 * gridDim.x) {
        const u8* wr = M + (long long)row * nb * 144;
        u32 acc = 0;
        for (int blk = lane >> 3; blk < nb; blk += 8) {
            uint4 hd[2], qs[2];
            q4_steps(wr, blk, nb, p, true, hd, qs);
            if (!filled) filled = sa_fill_wait(sa, act);
            acc += ((const u32*)sa)[(blk * 64 + p) & 1023];
#pragma unroll
            for (int k = 0; k < 2; k++)
                acc += hd[k].x ^ hd[k].w ^ qs[k].x ^ qs[k].y ^ qs[k].z ^ qs[k].w;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) out[blockIdx.z * rows + row] ^= acc;
    }
}

int main() {
    const int copies = 16, iters = 48;
    u32* out;
    CK(cudaMalloc(&out, 1 << 20));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);

    // 13b ffn_down: 5120 rows x 54 Q6_K blocks (210 bytes each).
    {
        const int rows = 5120, nb = 54;
        const size_t bytes = (size_t)rows * nb * 210;
        u8* W;
        CK(cudaMalloc(&W, bytes * copies));
        CK(cudaMemset(W, 0x5a, bytes * copies));
        for (int pass = 0; pass < 2; pass++)
            for (int layout = 0; layout < 2; layout++) {
                CK(cudaEventRecord(e0));
                for (int i = 0; i < iters; i++) {
                    const u8* w = W + (size_t)(i % copies) * bytes;
                    if (layout == 0)
                        q6_read<0><<<rows / 4, 128>>>(w, rows, nb, out);
                    else
                        q6_read<1><<<rows / 4, 128>>>(w, rows, nb, out);
                }
                CK(cudaEventRecord(e1));
                CK(cudaEventSynchronize(e1));
                float ms;
                CK(cudaEventElapsedTime(&ms, e0, e1));
                const double us = 1e3 * ms / iters;
                printf("pass %d q6 %-8s %7.2f us  %.2f TB/s\n", pass, layout ? "pairsoa" : "soa", us,
                       bytes / us / 1e6);
            }
        CK(cudaFree(W));
    }
    // 13b gate and up: 13824 rows x 20 Q4_K blocks each.
    {
        const int rows = 13824, nb = 20;
        const size_t one = (size_t)rows * nb * 144, shift = (8u << 20) + 2304;
        const size_t stride = 2 * one + shift;
        u8* W;
        CK(cudaMalloc(&W, stride * copies));
        CK(cudaMemset(W, 0x33, stride * copies));
        const char* names[10] = {"zmajor",  "paired",   "pairedoff", "hdronce",  "flat",
                                 "safill",  "sadot",    "safill r2", "safill r4", "safill r8"};
        u8* act;
        CK(cudaMalloc(&act, 8192));
        CK(cudaMemset(act, 0x11, 8192));
        for (int pass = 0; pass < 2; pass++)
            for (int mode = 0; mode < 10; mode++) {
                CK(cudaEventRecord(e0));
                for (int i = 0; i < iters; i++) {
                    const u8* a = W + (size_t)(i % copies) * stride;
                    const u8* b = a + one + (mode == 2 ? shift : 0);
                    const dim3 zg(rows / 4, 1, 2);
                    if (mode == 0)
                        q4_read<0><<<zg, 128>>>(a, b, rows, nb, out);
                    else if (mode == 3)
                        q4_read<2><<<zg, 128>>>(a, b, rows, nb, out);
                    else if (mode == 4)
                        q4_read<3><<<zg, 128>>>(a, b, rows, nb, out);
                    else if (mode == 6)
                        q4_read<5><<<zg, 128, 6480>>>(a, b, rows, nb, out, act);
                    else if (mode == 5 || mode >= 7) {
                        const int rpw = mode == 5 ? 1 : 1 << (mode - 6);
                        const dim3 g(rows / (4 * rpw), 1, 2);
                        q4_safill_rows<<<g, 128, 6480>>>(a, b, rows, nb, out, act);
                    }
                    else
                        q4_read<1><<<rows / 2, 128>>>(a, b, rows, nb, out);
                }
                CK(cudaEventRecord(e1));
                CK(cudaEventSynchronize(e1));
                float ms;
                CK(cudaEventElapsedTime(&ms, e0, e1));
                const double us = 1e3 * ms / iters;
                printf("pass %d q4 %-9s %7.2f us  %.2f TB/s\n", pass, names[mode], us,
                       2 * one / us / 1e6);
            }
        // The floor's measure: a device-to-device copy of the pair (read + write bytes).
        for (int pass = 0; pass < 2; pass++) {
            CK(cudaEventRecord(e0));
            for (int i = 0; i < iters; i++) {
                const u8* a = W + (size_t)(i % copies) * stride;
                u8* dst = W + (size_t)((i + copies / 2) % copies) * stride;
                CK(cudaMemcpyAsync(dst, a, 2 * one, cudaMemcpyDeviceToDevice));
            }
            CK(cudaEventRecord(e1));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            const double us = 1e3 * ms / iters;
            printf("pass %d copy pair   %7.2f us  %.2f TB/s (read + write)\n", pass, us,
                   4 * one / us / 1e6);
        }
        CK(cudaFree(W));
    }
    CK(cudaGetLastError());
    return 0;
}
