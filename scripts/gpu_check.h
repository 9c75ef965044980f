// CK(call): a CUDA runtime call checked; on an error, its message and line, and exit(1).
// Shared by the stand-alone harnesses scripts/gpu_*.cu (each compiled alone with nvcc).
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>
#define CK(x)                                                                                  \
    do {                                                                                       \
        cudaError_t e = (x);                                                                   \
        if (e != cudaSuccess) {                                                                \
            printf("CUDA %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__);           \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)
