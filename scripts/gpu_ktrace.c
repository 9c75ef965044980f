// Kernel timeline of any CUDA program, CUDA graphs included: a CUPTI injection library (the
// driver loads it when CUDA_INJECTION64_PATH names it) that writes every kernel's start and
// end (ns), name, grid, block, registers, shared memory and cluster size as CSV lines to the
// file KTRACE_OUT names (/tmp/ktrace.csv by default) at exit. Kernels are traced as they run
// (CONCURRENT_KERNEL records: nothing is serialised; a 13b token took 3% longer traced).
// scripts/ktrace_report.py turns the CSV into per-kernel durations and each kernel's share of
// a decode token. The lent GPU machine has no Nsight Systems; this is its stand-in.
//
// Build (here, no GPU needed; CUPTI headers from the nvidia-cuda-cupti wheel, CUDA headers
// from the nvidia-cuda-nvcc one):
//   gcc -shared -fPIC -O2 -I$CUPTI/include -I$CUDA/include scripts/gpu_ktrace.c \
//       -o carry/ktrace.so -L$CUPTI/lib -l:libcupti.so.13
// Use (there): KTRACE_OUT=/tmp/kt.csv CUDA_INJECTION64_PATH=$PWD/carry/ktrace.so flea run ...
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define BUF (16 << 20)
static FILE* out;
static void CUPTIAPI req(uint8_t** b, size_t* size, size_t* max) {
    *b = (uint8_t*)aligned_alloc(8, BUF);
    *size = BUF;
    *max = 0;
}
static void CUPTIAPI done(CUcontext c, uint32_t s, uint8_t* b, size_t size, size_t valid) {
    CUpti_Activity* r = NULL;
    while (cuptiActivityGetNextRecord(b, valid, &r) == CUPTI_SUCCESS) {
        if (r->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || r->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
            CUpti_ActivityKernel10* k = (CUpti_ActivityKernel10*)r;
            if (out)
                fprintf(out, "%llu,%llu,%s,%d,%d,%d,%d,%u,%d,%u\n", (unsigned long long)k->start,
                        (unsigned long long)k->end, k->name, k->gridX, k->gridY, k->gridZ,
                        k->blockX, (unsigned)k->registersPerThread,
                        k->staticSharedMemory + k->dynamicSharedMemory, k->clusterX);
        }
    }
    size_t dropped = 0;
    cuptiActivityGetNumDroppedRecords(c, s, &dropped);
    if (dropped && out) fprintf(out, "#dropped %zu\n", dropped);
    free(b);
}
static void fin(void) {
    cuptiActivityFlushAll(1);
    if (out) fclose(out);
}
int InitializeInjection(void) {
    const char* p = getenv("KTRACE_OUT");
    out = fopen(p ? p : "/tmp/ktrace.csv", "w");
    cuptiActivityRegisterCallbacks(req, done);
    CUptiResult e = cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    if (e != CUPTI_SUCCESS) fprintf(stderr, "ktrace: enable failed %d\n", (int)e);
    atexit(fin);
    return 1;
}
