// Stand-alone benchmark: cuBLAS settings for flea's prompt GEMMs. out (n x m) = X (n x k) . W^T
// with W m x k row-major F16 and X F16, for the layer shapes of the synthetic 13b and 7b at a
// 504-token prompt (and one at 512): flea's call (cublasGemmEx, F16 x F16 -> F32, FP32
// accumulation), F16 output, FP16 accumulation, cuBLASLt's first 8 heuristic algorithms with a
// 64 MiB workspace, and the call with an explicit workspace; a device copy of W's bytes for
// scale. Each timed over 20 calls after 3 warm-up calls. Numbers: docs/BENCHMARKS.md ("cuBLAS
// warmed up before the first prompt").
//   nvcc -O2 -std=c++17 -arch=sm_90 -o gemm_shapes scripts/gpu_gemm_shapes.cu -lcublasLt -lcublas
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x) do { auto e = (x); if (e != 0) { printf("err %d at %s:%d\n", (int)e, __FILE__, __LINE__); exit(1);} } while (0)

__global__ void fill(half* p, size_t n, unsigned s) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    for (; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ s;
        p[i] = __float2half(((h >> 8) & 0xffff) / 65536.f - 0.5f);
    }
}

int main() {
    cublasHandle_t h;
    CK(cublasCreate(&h));
    cudaStream_t st;
    CK(cudaStreamCreate(&st));
    CK(cublasSetStream(h, st));
    cublasLtHandle_t lt;
    CK(cublasLtCreate(&lt));
    size_t wsz = 64 << 20;
    void* ws;
    CK(cudaMalloc(&ws, wsz));
    struct S { int m, n, k; };
    std::vector<S> shapes = {{5120, 504, 5120}, {15360, 504, 5120}, {13824, 504, 5120}, {27648, 504, 5120}, {5120, 504, 13824},
                             {4096, 504, 4096}, {11008, 504, 4096}, {4096, 504, 11008}, {5120, 512, 5120}};
    half *W, *X, *Yh;
    float* Y;
    size_t maxw = 27648ull * 13824, maxx = 512ull * 13824, maxy = 512ull * 27648;
    CK(cudaMalloc(&W, maxw * 2));
    CK(cudaMalloc(&X, maxx * 2));
    CK(cudaMalloc(&Y, maxy * 4));
    CK(cudaMalloc(&Yh, maxy * 2));
    fill<<<1024, 256>>>(W, maxw, 1);
    fill<<<1024, 256>>>(X, maxx, 2);
    CK(cudaDeviceSynchronize());
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    const float one = 1.f, zero = 0.f;
    const __half oneh = __float2half(1.f), zeroh = __float2half(0.f);
    auto timeit = [&](auto&& f) {
        for (int i = 0; i < 3; i++) f();
        cudaEventRecord(a, st);
        const int R = 20;
        for (int i = 0; i < R; i++) f();
        cudaEventRecord(b, st);
        cudaEventSynchronize(b);
        float ms;
        cudaEventElapsedTime(&ms, a, b);
        return ms * 1000.f / R;
    };
    for (auto s : shapes) {
        double fl = 2.0 * s.m * s.n * s.k;
        auto rep = [&](const char* name, float us) {
            printf("m=%5d n=%4d k=%5d %-34s %8.1f us %6.0f TFLOPS\n", s.m, s.n, s.k, name, us, fl / us / 1e6);
        };
        // flea's current call
        rep("gemmex f16->f32 c32f (flea)", timeit([&] {
                CK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, s.m, s.n, s.k, &one, W, CUDA_R_16F, s.k, X, CUDA_R_16F, s.k,
                                &zero, Y, CUDA_R_32F, s.m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            }));
        rep("gemmex f16->f16 c32f", timeit([&] {
                CK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, s.m, s.n, s.k, &one, W, CUDA_R_16F, s.k, X, CUDA_R_16F, s.k,
                                &zero, Yh, CUDA_R_16F, s.m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            }));
        rep("gemmex f16->f16 c16f", timeit([&] {
                CK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, s.m, s.n, s.k, &oneh, W, CUDA_R_16F, s.k, X, CUDA_R_16F, s.k,
                                &zeroh, Yh, CUDA_R_16F, s.m, CUBLAS_COMPUTE_16F, CUBLAS_GEMM_DEFAULT));
            }));
        // cuBLASLt with a workspace and the heuristic's top algorithms, f16 in, f32 out
        cublasLtMatmulDesc_t op;
        CK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
        CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
        CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
        cublasLtMatrixLayout_t la, lb, lc;
        CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16F, s.k, s.m, s.k));
        CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16F, s.k, s.n, s.k));
        CK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, s.m, s.n, s.m));
        cublasLtMatmulPreference_t pref;
        CK(cublasLtMatmulPreferenceCreate(&pref));
        CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsz, sizeof wsz));
        cublasLtMatmulHeuristicResult_t res[8];
        int got = 0;
        CK(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 8, res, &got));
        for (int i = 0; i < got; i++) {
            char nm[64];
            snprintf(nm, sizeof nm, "lt f16->f32 heur#%d ws=%zuK", i, res[i].workspaceSize >> 10);
            rep(nm, timeit([&] {
                    CK(cublasLtMatmul(lt, op, &one, W, la, X, lb, &zero, Y, lc, Y, lc, &res[i].algo, ws, wsz, st));
                }));
        }
        cublasLtMatmulPreferenceDestroy(pref);
        cublasLtMatrixLayoutDestroy(la);
        cublasLtMatrixLayoutDestroy(lb);
        cublasLtMatrixLayoutDestroy(lc);
        cublasLtMatmulDescDestroy(op);
        // GemmEx again with an explicit 64 MiB workspace
        CK(cublasSetWorkspace(h, ws, wsz));
        rep("gemmex f16->f32 c32f +ws64M", timeit([&] {
                CK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, s.m, s.n, s.k, &one, W, CUDA_R_16F, s.k, X, CUDA_R_16F, s.k,
                                &zero, Y, CUDA_R_32F, s.m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
            }));
        CK(cublasSetWorkspace(h, nullptr, 0));
        // a pure f16 copy of the weight (what dequant writes) for a bandwidth reference
        float us = timeit([&] { CK(cudaMemcpyAsync(Yh, W, (size_t)s.m * s.k * 2 < maxy * 2 ? (size_t)s.m * s.k * 2 : maxy * 2, cudaMemcpyDeviceToDevice, st)); });
        printf("m=%5d n=%4d k=%5d %-34s %8.1f us\n", s.m, s.n, s.k, "d2d copy of W's f16 bytes", us);
    }
    return 0;
}
