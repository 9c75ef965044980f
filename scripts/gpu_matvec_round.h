// The decode mat-vec of the kernel-boundary harnesses (scripts/gpu_dep_wait.cu,
// scripts/gpu_tagged_wait.cu), and their random weights: one warp a row, a round of S steps of 512 bytes (lane `lane`
// holds 16 bytes of each), a plain dp4a dot against int8 activations in shared memory (flea's
// Q4_K / Q6_K arithmetic is not modelled; its bytes per row are).
#pragma once
#include <algorithm>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>
#include "gpu_check.h"

__device__ __forceinline__ int warp_sum_i(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
// The round's loads: 16 bytes a step, steps 32 lanes apart (idx0: the first in 16-byte units).
template <int S>
__device__ __forceinline__ void round_load(uint4 (&w)[S], const unsigned char* wr, int idx0,
                                           int n16) {
#pragma unroll
    for (int s = 0; s < S; s++)
        if (idx0 + 32 * s < n16) w[s] = __ldg(((const uint4*)wr) + idx0 + 32 * s);
}
// The round's dot against the activations in shared memory (na 16-byte words, repeated).
template <int S>
__device__ __forceinline__ int round_dot(const uint4 (&w)[S], int idx0, int n16,
                                         const signed char* sa, int na, int acc) {
#pragma unroll
    for (int s = 0; s < S; s++)
        if (idx0 + 32 * s < n16) {
            const int4 a = ((const int4*)sa)[(idx0 + 32 * s) % na];
            acc = __dp4a((int)w[s].x, a.x, acc);
            acc = __dp4a((int)w[s].y, a.y, acc);
            acc = __dp4a((int)w[s].z, a.z, acc);
            acc = __dp4a((int)w[s].w, a.w, acc);
        }
    return acc;
}

// A small kernel's end (128 threads): the block's sum of the threads' `sum`, and the block's
// share of the n_out int8 outputs made from it. red: 4 ints of shared memory.
__device__ __forceinline__ void small_outputs(int sum, signed char* out, int n_out, int* red) {
    sum = warp_sum_i(sum);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = sum;
    __syncthreads();
    const int tot = red[0] + red[1] + red[2] + red[3];
    const int per = (n_out + gridDim.x - 1) / gridDim.x;
    for (int i = threadIdx.x; i < per; i += 128) {
        const int e = blockIdx.x * per + i;
        if (e < n_out) out[e] = (signed char)((tot >> 4) + i);
    }
}

// Host side: every mat-vec step (a Step with mv, rows and rb) its own slice of one device
// buffer of random bytes, so that nothing repeats within a token (L2 serves none of it); its
// offsets into *W, the weight bytes in all. Also kv_bytes of the same random bytes at *kv
// (the attention's K/V rows).
template <class Step>
std::vector<long long> random_weights(const std::vector<Step>& steps, unsigned char** W,
                                      long long* wbytes, unsigned char** kv, long long kv_bytes) {
    std::vector<long long> woff(steps.size(), 0);
    long long total = 0;
    for (size_t i = 0; i < steps.size(); i++)
        if (steps[i].mv) {
            woff[i] = total;
            total += (long long)steps[i].rows * steps[i].rb;
            total = (total + 255) / 256 * 256;
        }
    CK(cudaMalloc(W, total));
    CK(cudaMalloc(kv, kv_bytes));
    std::vector<unsigned char> h(1 << 24);
    for (auto& b : h) b = (unsigned char)rand();
    for (long long o = 0; o < total; o += (long long)h.size())
        CK(cudaMemcpy(*W + o, h.data(), std::min<long long>(h.size(), total - o),
                      cudaMemcpyHostToDevice));
    CK(cudaMemcpy(*kv, h.data(), std::min<long long>(h.size(), kv_bytes), cudaMemcpyHostToDevice));
    *wbytes = total;
    return woff;
}

// A token's graph launched reps + 2 times (the first two not counted): ms each, ascending.
inline std::vector<float> graph_times_ms(cudaGraph_t g, cudaStream_t st, int reps) {
    cudaGraphExec_t ge;
    CK(cudaGraphInstantiate(&ge, g, 0));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    std::vector<float> ms;
    for (int r = 0; r < reps + 2; r++) {
        CK(cudaEventRecord(e0, st));
        CK(cudaGraphLaunch(ge, st));
        CK(cudaEventRecord(e1, st));
        CK(cudaStreamSynchronize(st));
        float t;
        CK(cudaEventElapsedTime(&t, e0, e1));
        if (r >= 2) ms.push_back(t);
    }
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    CK(cudaGraphExecDestroy(ge));
    std::sort(ms.begin(), ms.end());
    return ms;
}
