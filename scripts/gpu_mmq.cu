// Stand-alone harness for the few-token tensor-core matmuls (`mmq_*`, kernels.cu): flea's own
// kernels (the file is included, not restated) on random Q4_K weights and Q8_K activations
// made by flea's `act_q8k`, timed per launch with events over rotating weight copies (so L2
// serves none of it), beside a plain read of the same bytes. Shapes are a 13B's: Q4_K q/k/o
// (5120 x 5120), gate/up (2 x 13824 x 5120, one launch), 5120 x 13824; repacked Q6_K v and
// down. Numbers: docs/BENCHMARKS.md ("every warp over all the columns of its rows").
//   nvcc -O3 -std=c++17 -arch=sm_90 -Iscripts -o mmq scripts/gpu_mmq.cu && ./mmq   (table)
//   ./mmq prof     (a few launches of each kernel, for Nsight Compute)
// Variants of the launch: the grid (one block a row block, or K blocks an SM sharing the
// (row block, chunk) units, as mmvq.rs `mmq_grid`), tokens 8 / 16 / 32. Other kernel
// geometries are builds with -DMMQ_RG=.. -DMMQ_KP=.. -DMMQ_CSB_Q4K=.. -DMMQ_CSB_Q6K=..
// -DMMQ_AHEAD=.. -DMMQ_MINB=..; MMQ_DUMP=PREFIX writes each shape's outputs (one block a row
// block) so that two builds' can be compared (the same integers: equal to float rounding).
#include "../crates/flea-cuda/src/kernels.cu"
#include "gpu_check.h"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

static u16 host_f2h(float f) {
    // Positive normal values only (the scales below): round to nearest.
    u32 b;
    memcpy(&b, &f, 4);
    const int e = (int)((b >> 23) & 0xff) - 127 + 15;
    const u32 m = (b >> 13) & 0x3ff;
    const u32 r = (b >> 12) & 1;
    return (u16)(((u32)e << 10) + m + r);
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static u32 next_u32() {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (u32)(rng >> 16);
}
static float next_unit() { return (float)(next_u32() & 0xffffff) / 16777216.f; }

// rows x cols of Q4_K (144-byte blocks): random quants and 6-bit scales, d and dmin ~1e-3.
static std::vector<u8> make_q4k(int rows, int cols) {
    const size_t nb = (size_t)rows * (cols / 256);
    std::vector<u8> h(nb * 144);
    for (size_t b = 0; b < nb; b++) {
        u8* p = h.data() + b * 144;
        const u16 d = host_f2h(0.5e-3f + 1e-3f * next_unit());
        const u16 dm = host_f2h(0.5e-3f + 1e-3f * next_unit());
        memcpy(p, &d, 2);
        memcpy(p + 2, &dm, 2);
        for (int i = 4; i < 144; i++) p[i] = (u8)next_u32();
    }
    return h;
}

__global__ void plain_read(const uint4* __restrict__ p, size_t n, unsigned* out) {
    u32 acc = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const uint4 v = __ldg(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) out[0] = acc; // keeps the loads
}

struct Shape {
    const char* name;
    int rows, cols, jobs;
    bool q6; // Q6_K in the repacked layout of resident weights, else Q4_K
};

// rows x cols of Q6_K in the repacked (structure-of-arrays) layout: random quants and scales,
// d ~1e-3 (kernels.cu MmqQ6K: ql, qh, scales, d of every block, field after field).
static std::vector<u8> make_q6k_soa(int rows, int cols) {
    const size_t nb = (size_t)rows * (cols / 256);
    std::vector<u8> h(nb * 210);
    for (size_t i = 0; i < nb * 208; i++) h[i] = (u8)next_u32();
    for (size_t b = 0; b < nb; b++) {
        const u16 d = host_f2h(0.5e-3f + 1e-3f * next_unit());
        memcpy(h.data() + nb * 208 + 2 * b, &d, 2);
    }
    return h;
}

typedef void (*MmqFn)(const MmqJobs, const i8*, const float*, const int*, int, long long, int,
                      int, float*, unsigned*);

static float median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

int main(int argc, char** argv) {
    const bool prof = argc > 1 && std::string(argv[1]) == "prof";
    int sms = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const Shape shapes[] = {{"q/k/o 5120x5120", 5120, 5120, 1, false},
                            {"gate/up 2x13824x5120", 13824, 5120, 2, false},
                            {"13824-wide 5120x13824", 5120, 13824, 1, false},
                            {"Q6_K v 5120x5120", 5120, 5120, 1, true},
                            {"Q6_K down 5120x13824", 5120, 13824, 1, true}};
    const int COPIES = 6; // 6 x 80 MB rotating: far past the 60 MB L2
    const int NMAX = 32, CMAX = 13824;
    // Activations: random floats quantised by flea's act_q8k.
    float* x;
    i8* xq;
    float* xd;
    int* xs;
    CK(cudaMalloc(&x, (size_t)NMAX * CMAX * 4));
    CK(cudaMalloc(&xq, (size_t)NMAX * CMAX));
    CK(cudaMalloc(&xd, (size_t)NMAX * CMAX / 256 * 4));
    CK(cudaMalloc(&xs, (size_t)NMAX * CMAX / 16 * 4));
    {
        std::vector<float> hx((size_t)NMAX * CMAX);
        for (auto& v : hx) v = 2.f * next_unit() - 1.f;
        CK(cudaMemcpy(x, hx.data(), hx.size() * 4, cudaMemcpyHostToDevice));
    }
    float *y, *part;
    unsigned *arrivals, *sink;
    CK(cudaMalloc(&y, (size_t)NMAX * 2 * 13824 * 4));
    CK(cudaMalloc(&part, (size_t)2 * 4 * sms * MMQ_RG * 512 * 4));
    CK(cudaMalloc(&arrivals, 4096 * 4));
    CK(cudaMemset(arrivals, 0, 4096 * 4));
    CK(cudaMalloc(&sink, 4));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    MmqFn fns4[3] = {mmq_q4_k_1, mmq_q4_k_2, mmq_q4_k_4};
    MmqFn fns6[3] = {mmq_q6_k_soa_1, mmq_q6_k_soa_2, mmq_q6_k_soa_4};
    for (int i = 0; i < 3; i++) {
        CK(cudaFuncSetAttribute(fns4[i], cudaFuncAttributeMaxDynamicSharedMemorySize, 200000));
        CK(cudaFuncSetAttribute(fns6[i], cudaFuncAttributeMaxDynamicSharedMemorySize, 200000));
    }
    printf("MMQ_RG %d MMQ_KP %d MMQ_CSB_Q4K %d MMQ_CSB_Q6K %d MMQ_AHEAD %d MMQ_MINB %d\n", MMQ_RG,
           MMQ_KP, MMQ_CSB_Q4K, MMQ_CSB_Q6K, MMQ_AHEAD, MMQ_MINB);
    printf("%-24s %3s %-8s %9s %8s %9s\n", "shape", "n", "grid", "us/call", "TB/s", "plain us");
    for (const Shape& s : shapes) {
        MmqFn* fns = s.q6 ? fns6 : fns4;
        const int bb = s.q6 ? 210 : 144;
        const size_t mbytes = (size_t)s.rows * (s.cols / 256) * bb;
        const size_t sbytes = mbytes * s.jobs;
        std::vector<u8*> w(COPIES * s.jobs);
        for (auto& p : w) {
            CK(cudaMalloc(&p, mbytes));
            std::vector<u8> h = s.q6 ? make_q6k_soa(s.rows, s.cols) : make_q4k(s.rows, s.cols);
            CK(cudaMemcpy(p, h.data(), mbytes, cudaMemcpyHostToDevice));
        }
        // Plain read of the launch's bytes (the first matrix's, times jobs) over the copies.
        std::vector<float> pt;
        for (int r = 0; r < 30; r++) {
            CK(cudaEventRecord(e0));
            for (int j = 0; j < s.jobs; j++)
                plain_read<<<sms * 8, 256>>>((const uint4*)w[(r % COPIES) * s.jobs + j],
                                             mbytes / 16, sink);
            CK(cudaEventRecord(e1));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            pt.push_back(ms * 1000.f);
        }
        const float plain = median(pt);
        for (int n : {8, 16, 32}) {
            const int tiles = n <= 8 ? 1 : (n <= 16 ? 2 : 4);
            const int fi = tiles == 1 ? 0 : (tiles == 2 ? 1 : 2);
            const long long nblk = (long long)n * s.cols / 256;
            act_q8k<<<(unsigned)((nblk + 3) / 4), 128>>>(x, xq, xd, xs, nblk);
            CK(cudaGetLastError());
            const int blocks = s.jobs * ((s.rows + 16 * MMQ_RG - 1) / (16 * MMQ_RG));
            const int cw = s.q6 ? (int)MmqQ6K::CW : (int)MmqQ4K::CW;
            const int chunks = (s.cols / 256 + cw - 1) / cw;
            const int units = blocks * chunks;
            const int qs = s.q6 ? (int)MmqQ6K::QS : (int)MmqQ4K::QS;
            const int smem = 2 * tiles * 8 * (qs + 16 * cw * 4 + cw * 4);
            // "sm:B" is the default (B = MMQ_MINB blocks an SM, as mmvq.rs launches).
            const int grids[] = {blocks, std::min(units, sms), std::min(units, MMQ_MINB * sms),
                                 std::min(units, 4 * sms)};
            const char* gnames[] = {"rows", "sm:1", "sm:B", "sm:4"};
            for (int gi = 0; gi < 4; gi++) {
                if (prof && gi != 2) continue;
                const int G = grids[gi];
                auto launch = [&](MmqFn f, int copy, float* out, int sm) {
                    MmqJobs jb;
                    memset(&jb, 0, sizeof jb);
                    jb.count = s.jobs;
                    for (int j = 0; j < s.jobs; j++) {
                        jb.W[j] = w[copy * s.jobs + j];
                        jb.y[j] = out + (size_t)j * n * s.rows;
                        jb.NB[j] = (long long)s.rows * (s.cols / 256);
                        jb.rows[j] = s.rows;
                    }
                    f<<<dim3(G, 1), MMQ_RG * MMQ_KP * 32, sm>>>(jb, xq, xd, xs, s.cols,
                                                (long long)(s.cols / 256) * bb, n, 0, part,
                                                arrivals);
                };
                std::vector<float> t;
                const int reps = prof ? 3 : 40;
                for (int r = 0; r < reps; r++) {
                    CK(cudaEventRecord(e0));
                    launch(fns[fi], r % COPIES, y, smem);
                    CK(cudaEventRecord(e1));
                    CK(cudaEventSynchronize(e1));
                    CK(cudaGetLastError());
                    float ms;
                    CK(cudaEventElapsedTime(&ms, e0, e1));
                    t.push_back(ms * 1000.f);
                }
                const float us = median(t);
                if (gi == 0 && getenv("MMQ_DUMP")) {
                    // The outputs of copy 0, for comparing builds of other geometries.
                    launch(fns[fi], 0, y, smem);
                    CK(cudaDeviceSynchronize());
                    const size_t m = (size_t)n * s.jobs * s.rows;
                    std::vector<float> a(m);
                    CK(cudaMemcpy(a.data(), y, m * 4, cudaMemcpyDeviceToHost));
                    const std::string path = std::string(getenv("MMQ_DUMP")) +
                                             (s.q6 ? ".q6." : ".q4.") + std::to_string(s.cols) +
                                             "." + std::to_string(s.jobs) + "." +
                                             std::to_string(n);
                    FILE* fp = fopen(path.c_str(), "wb");
                    if (fp) {
                        fwrite(a.data(), 4, m, fp);
                        fclose(fp);
                    }
                }
                printf("%-24s %3d %-8s %9.2f %8.2f %9.2f\n", s.name, n, gnames[gi], us,
                       sbytes / (us * 1e-6) / 1e12, plain);
            }
        }
        for (auto p : w) CK(cudaFree(p));
    }
    return 0;
}
