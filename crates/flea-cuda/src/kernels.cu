// flea CUDA kernels, compiled at run time with NVRTC (no headers needed).
//
// Weight formats are GGML's (see crates/flea-quant/src/legacy.rs and kquants.rs). Every
// format is read in "units" of 8 consecutive elements: within a block, unit u covers
// elements 8u..8u+7, which always share one sub-block scale.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define TY_F32 0
#define TY_F16 1
#define TY_BF16 2
#define TY_Q4_0 3
#define TY_Q4_1 4
#define TY_Q5_0 5
#define TY_Q5_1 6
#define TY_Q8_0 7
#define TY_Q2_K 8
#define TY_Q3_K 9
#define TY_Q4_K 10
#define TY_Q5_K 11
#define TY_Q6_K 12

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("{cvt.f32.f16 %0, %1;}" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("{cvt.rn.f16.f32 %0, %1;}" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float(((u32)h) << 16); }
__device__ __forceinline__ float round_bf16(float f) {
    u32 b = __float_as_uint(f);
    if ((b & 0x7fffffff) > 0x7f800000) return f; // NaN
    b += 0x7fff + ((b >> 16) & 1);
    return __uint_as_float(b & 0xffff0000u);
}
__device__ __forceinline__ float ldh(const u8* p) { return h2f((u16)p[0] | ((u16)p[1] << 8)); }

// Programmatic dependent launch (sm_90+; the host launches with the attribute): a kernel may
// start while the one before it in the stream still runs. Every kernel calls pdl_enter()
// before it reads what an earlier kernel wrote or writes anything: it waits there until the
// previous kernel has finished and its writes are visible, then lets the next kernel start
// its own blocks early. Without the attribute (or before sm_90) both are no-ops.
__device__ __forceinline__ void pdl_enter() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
// Warp arg-max of |value|: every lane ends with the largest magnitude (amax), its signed
// value (mx) and its index (first), the smallest index on ties (as the CPU's scan keeps the
// first).
__device__ __forceinline__ void warp_argmax_abs(float& amax, float& mx, int& first) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float a2 = __shfl_xor_sync(0xffffffff, amax, o);
        const float m2 = __shfl_xor_sync(0xffffffff, mx, o);
        const int f2 = __shfl_xor_sync(0xffffffff, first, o);
        if (a2 > amax || (a2 == amax && f2 < first)) { amax = a2; mx = m2; first = f2; }
    }
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Elements per block and bytes per block of each type (F32/F16/BF16 use 8-element "blocks").
template <int T> struct Fmt;
template <> struct Fmt<TY_F32> { enum { BS = 8, BB = 32 }; };
template <> struct Fmt<TY_F16> { enum { BS = 8, BB = 16 }; };
template <> struct Fmt<TY_BF16> { enum { BS = 8, BB = 16 }; };
template <> struct Fmt<TY_Q4_0> { enum { BS = 32, BB = 18 }; };
template <> struct Fmt<TY_Q4_1> { enum { BS = 32, BB = 20 }; };
template <> struct Fmt<TY_Q5_0> { enum { BS = 32, BB = 22 }; };
template <> struct Fmt<TY_Q5_1> { enum { BS = 32, BB = 24 }; };
template <> struct Fmt<TY_Q8_0> { enum { BS = 32, BB = 34 }; };
template <> struct Fmt<TY_Q2_K> { enum { BS = 256, BB = 84 }; };
template <> struct Fmt<TY_Q3_K> { enum { BS = 256, BB = 110 }; };
template <> struct Fmt<TY_Q4_K> { enum { BS = 256, BB = 144 }; };
template <> struct Fmt<TY_Q5_K> { enum { BS = 256, BB = 176 }; };
template <> struct Fmt<TY_Q6_K> { enum { BS = 256, BB = 210 }; };

__device__ __forceinline__ void scale_min_k4(int j, const u8* q, int* sc, int* m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Dequantize unit u (elements 8u..8u+7) of the block at b into y.
template <int T> __device__ __forceinline__ void deq8(const u8* b, int u, float* y);

template <> __device__ __forceinline__ void deq8<TY_F32>(const u8* b, int u, float* y) {
    const float* f = (const float*)b;
#pragma unroll
    for (int i = 0; i < 8; i++) y[i] = f[i];
}
template <> __device__ __forceinline__ void deq8<TY_F16>(const u8* b, int u, float* y) {
    const u16* h = (const u16*)b;
#pragma unroll
    for (int i = 0; i < 8; i++) y[i] = h2f(h[i]);
}
template <> __device__ __forceinline__ void deq8<TY_BF16>(const u8* b, int u, float* y) {
    const u16* h = (const u16*)b;
#pragma unroll
    for (int i = 0; i < 8; i++) y[i] = bf2f(h[i]);
}
template <> __device__ __forceinline__ void deq8<TY_Q4_0>(const u8* b, int u, float* y) {
    float d = ldh(b);
    const u8* qs = b + 2 + (u & 1) * 8;
    int sh = (u >> 1) * 4;
#pragma unroll
    for (int i = 0; i < 8; i++) y[i] = (float)(((qs[i] >> sh) & 15) - 8) * d;
}
template <> __device__ __forceinline__ void deq8<TY_Q4_1>(const u8* b, int u, float* y) {
    float d = ldh(b), m = ldh(b + 2);
    const u8* qs = b + 4 + (u & 1) * 8;
    int sh = (u >> 1) * 4;
#pragma unroll
    for (int i = 0; i < 8; i++) y[i] = (float)((qs[i] >> sh) & 15) * d + m;
}
__device__ __forceinline__ u32 ld_u32(const u8* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}
template <> __device__ __forceinline__ void deq8<TY_Q5_0>(const u8* b, int u, float* y) {
    float d = ldh(b);
    u32 qh = ld_u32(b + 2);
    int j0 = (u & 1) * 8;
    const u8* qs = b + 6 + j0;
    int hi = u >> 1;
    int sh = hi * 4;
    int hb = j0 + hi * 16;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int v = ((qs[i] >> sh) & 15) | (((qh >> (hb + i)) & 1) << 4);
        y[i] = (float)(v - 16) * d;
    }
}
template <> __device__ __forceinline__ void deq8<TY_Q5_1>(const u8* b, int u, float* y) {
    float d = ldh(b), m = ldh(b + 2);
    u32 qh = ld_u32(b + 4);
    int j0 = (u & 1) * 8;
    const u8* qs = b + 8 + j0;
    int hi = u >> 1;
    int sh = hi * 4;
    int hb = j0 + hi * 16;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int v = ((qs[i] >> sh) & 15) | (((qh >> (hb + i)) & 1) << 4);
        y[i] = (float)v * d + m;
    }
}
template <> __device__ __forceinline__ void deq8<TY_Q8_0>(const u8* b, int u, float* y) {
    float d = ldh(b);
    const i8* qs = (const i8*)(b + 2 + u * 8);
#pragma unroll
    for (int i = 0; i < 8; i++) y[i] = (float)qs[i] * d;
}
template <> __device__ __forceinline__ void deq8<TY_Q2_K>(const u8* b, int u, float* y) {
    int e = u * 8;
    int n = e >> 7, j = (e & 127) >> 5, l = e & 31;
    int sc = b[e >> 4];
    float d = ldh(b + 80), dmin = ldh(b + 82);
    float dl = d * (float)(sc & 15), ml = dmin * (float)(sc >> 4);
    const u8* qs = b + 16 + n * 32 + l;
#pragma unroll
    for (int i = 0; i < 8; i++) y[i] = dl * (float)((qs[i] >> (2 * j)) & 3) - ml;
}
template <> __device__ __forceinline__ void deq8<TY_Q3_K>(const u8* b, int u, float* y) {
    int e = u * 8;
    int n = e >> 7, j = (e & 127) >> 5, l = e & 31;
    const u8* s = b + 96;
    int is = e >> 4;
    int lo = is < 8 ? (s[is] & 15) : (s[is - 8] >> 4);
    int hs = (s[8 + (is & 3)] >> (2 * (is >> 2))) & 3;
    int sc = (lo | (hs << 4)) - 32;
    float dl = ldh(b + 108) * (float)sc;
    const u8* hm = b + l;
    const u8* qs = b + 32 + n * 32 + l;
    int m = 1 << (n * 4 + j);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int q = ((qs[i] >> (2 * j)) & 3) - ((hm[i] & m) ? 0 : 4);
        y[i] = dl * (float)q;
    }
}
template <> __device__ __forceinline__ void deq8<TY_Q4_K>(const u8* b, int u, float* y) {
    int e = u * 8;
    int j = e >> 6, w = e & 63, l = w & 31, sh = (w >> 5) * 4;
    int sc, m;
    scale_min_k4(e >> 5, b + 4, &sc, &m);
    float d1 = ldh(b) * (float)sc, m1 = ldh(b + 2) * (float)m;
    // qs at 16 + j*32 + l: 8-byte aligned when the block is (blocks are 144 B, rows start
    // 16-aligned in GGUF files, so read two words).
    const u8* qs = b + 16 + j * 32 + l;
#pragma unroll
    for (int i = 0; i < 8; i++) y[i] = d1 * (float)((qs[i] >> sh) & 15) - m1;
}
template <> __device__ __forceinline__ void deq8<TY_Q5_K>(const u8* b, int u, float* y) {
    int e = u * 8;
    int j = e >> 6, w = e & 63, l = w & 31, hi = w >> 5, sh = hi * 4;
    int sc, m;
    scale_min_k4(e >> 5, b + 4, &sc, &m);
    float d1 = ldh(b) * (float)sc, m1 = ldh(b + 2) * (float)m;
    const u8* qh = b + 16 + l;
    const u8* qs = b + 48 + j * 32 + l;
    int hs = 2 * j + hi;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int q = ((qs[i] >> sh) & 15) | (((qh[i] >> hs) & 1) << 4);
        y[i] = d1 * (float)q - m1;
    }
}
// Unit u of a Q6_K block whose fields lie at ql (128 B), qh (64 B), sc (16 B) and d (2 B):
// contiguous in GGML's block, or in the repacked layout of resident weights (Q6KS below).
__device__ __forceinline__ void q6k_deq8(const u8* qlb, const u8* qhb, const u8* scb,
                                         const u8* db, int u, float* y) {
    int e = u * 8;
    int n = e >> 7, r = e & 127, quarter = r >> 5, l = r & 31;
    const u8* ql = qlb + n * 64 + l + (quarter & 1) * 32;
    const u8* qh = qhb + n * 32 + l;
    int lsh = (quarter >> 1) * 4;
    int hsh = quarter * 2;
    float dl = ldh(db) * (float)((const i8*)scb)[e >> 4];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int q = (((ql[i] >> lsh) & 15) | (((qh[i] >> hsh) & 3) << 4)) - 32;
        y[i] = dl * (float)q;
    }
}
template <> __device__ __forceinline__ void deq8<TY_Q6_K>(const u8* b, int u, float* y) {
    q6k_deq8(b, b + 128, b + 192, b + 208, u, y);
}

// y[t][row] = W[row] . x[t]: one warp per row, lanes stride over the row's 8-element units.
// grid = (ceil(rows/4), n), block = 128.
template <int T>
__device__ void matvec_impl(const u8* __restrict__ W, const float* __restrict__ x,
                            float* __restrict__ y, int rows, int cols, long long row_bytes) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * 4 + warp;
    const int t = blockIdx.y;
    if (row >= rows) return;
    const u8* wr = W + (long long)row * row_bytes;
    const float* xr = x + (long long)t * cols;
    const int upb = Fmt<T>::BS / 8;
    const int units = cols / 8;
    float acc = 0.f;
    int u = lane;
    // Four units in flight per lane (straight-line loads), then the remainder.
    for (; u + 96 < units; u += 128) {
        float w[4][8];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            int uu = u + 32 * k;
            int blk = uu / upb, sub = uu - blk * upb;
            deq8<T>(wr + (long long)blk * Fmt<T>::BB, sub, w[k]);
        }
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const float4* xv = (const float4*)(xr + (u + 32 * k) * 8);
            float4 a = xv[0], c = xv[1];
            acc += w[k][0] * a.x + w[k][1] * a.y + w[k][2] * a.z + w[k][3] * a.w;
            acc += w[k][4] * c.x + w[k][5] * c.y + w[k][6] * c.z + w[k][7] * c.w;
        }
    }
    for (; u < units; u += 32) {
        int blk = u / upb, sub = u - blk * upb;
        float w[8];
        deq8<T>(wr + (long long)blk * Fmt<T>::BB, sub, w);
        const float4* xv = (const float4*)(xr + u * 8);
        float4 a = xv[0], c = xv[1];
        acc += w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w;
        acc += w[4] * c.x + w[5] * c.y + w[6] * c.z + w[7] * c.w;
    }
    acc = warp_sum(acc);
    if (lane == 0) y[(long long)t * rows + row] = acc;
}

// Unit idx's 8 dequantized values to the f16 / f32 matrix a GEMM reads.
__device__ __forceinline__ void store8_f16(u16* out, long long idx, const float* w) {
    u32 p[4];
#pragma unroll
    for (int i = 0; i < 4; i++) p[i] = (u32)f2h(w[2 * i]) | ((u32)f2h(w[2 * i + 1]) << 16);
    *(uint4*)(out + idx * 8) = make_uint4(p[0], p[1], p[2], p[3]);
}
__device__ __forceinline__ void store8_f32(float* out, long long idx, const float* w) {
    float4* o = (float4*)(out + idx * 8);
    o[0] = make_float4(w[0], w[1], w[2], w[3]);
    o[1] = make_float4(w[4], w[5], w[6], w[7]);
}

// Dequantize a whole matrix to f16 (for cuBLAS). One thread per unit.
template <int T>
__device__ void deq_f16_impl(const u8* __restrict__ W, u16* __restrict__ out, int rows, int cols,
                             long long row_bytes) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int units = cols / 8;
    if (idx >= (long long)rows * units) return;
    int row = (int)(idx / units), u = (int)(idx - (long long)row * units);
    const int upb = Fmt<T>::BS / 8;
    int blk = u / upb, sub = u - blk * upb;
    float w[8];
    deq8<T>(W + (long long)row * row_bytes + (long long)blk * Fmt<T>::BB, sub, w);
    store8_f16(out, idx, w);
}

// Dequantize a whole matrix to f32 (for the precise cuBLAS path). One thread per unit.
template <int T>
__device__ void deq_f32_impl(const u8* __restrict__ W, float* __restrict__ out, int rows, int cols,
                             long long row_bytes) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int units = cols / 8;
    if (idx >= (long long)rows * units) return;
    int row = (int)(idx / units), u = (int)(idx - (long long)row * units);
    const int upb = Fmt<T>::BS / 8;
    int blk = u / upb, sub = u - blk * upb;
    float w[8];
    deq8<T>(W + (long long)row * row_bytes + (long long)blk * Fmt<T>::BB, sub, w);
    store8_f32(out, idx, w);
}

// out[t] = table[tokens[t]] * scale. One thread per unit.
template <int T>
__device__ void embed_impl(const u8* __restrict__ W, const int* __restrict__ tokens,
                           float* __restrict__ out, int n, int cols, long long row_bytes,
                           float scale) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int units = cols / 8;
    if (idx >= (long long)n * units) return;
    int t = (int)(idx / units), u = (int)(idx - (long long)t * units);
    const int upb = Fmt<T>::BS / 8;
    int blk = u / upb, sub = u - blk * upb;
    float w[8];
    deq8<T>(W + (long long)tokens[t] * row_bytes + (long long)blk * Fmt<T>::BB, sub, w);
#pragma unroll
    for (int i = 0; i < 8; i++) out[idx * 8 + i] = w[i] * scale;
}

#define INSTANTIATE(name, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(128)                                          \
        matvec_##name(const u8* W, const float* x, float* y, int rows, int cols,               \
                      long long row_bytes) { pdl_enter(); \
        matvec_impl<T>(W, x, y, rows, cols, row_bytes);                                        \
    }                                                                                          \
    extern "C" __global__ void deq_f16_##name(const u8* W, u16* out, int rows, int cols,       \
                                              long long row_bytes) { pdl_enter(); \
        deq_f16_impl<T>(W, out, rows, cols, row_bytes);                                        \
    }                                                                                          \
    extern "C" __global__ void deq_f32_##name(const u8* W, float* out, int rows, int cols,     \
                                              long long row_bytes) { pdl_enter(); \
        deq_f32_impl<T>(W, out, rows, cols, row_bytes);                                        \
    }                                                                                          \
    extern "C" __global__ void embed_##name(const u8* W, const int* tokens, float* out, int n, \
                                            int cols, long long row_bytes, float scale) { pdl_enter(); \
        embed_impl<T>(W, tokens, out, n, cols, row_bytes, scale);                              \
    }

INSTANTIATE(f32, TY_F32)
INSTANTIATE(f16, TY_F16)
INSTANTIATE(bf16, TY_BF16)
INSTANTIATE(q4_0, TY_Q4_0)
INSTANTIATE(q4_1, TY_Q4_1)
INSTANTIATE(q5_0, TY_Q5_0)
INSTANTIATE(q5_1, TY_Q5_1)
INSTANTIATE(q8_0, TY_Q8_0)
INSTANTIATE(q2_k, TY_Q2_K)
INSTANTIATE(q3_k, TY_Q3_K)
INSTANTIATE(q4_k, TY_Q4_K)
INSTANTIATE(q5_k, TY_Q5_K)
INSTANTIATE(q6_k, TY_Q6_K)

// Q6_K in the repacked layout of resident weights (Q6KS): the same values as deq8<TY_Q6_K>,
// for the prompt GEMM. One thread per 8-element unit, as deq_f16_impl / deq_f32_impl.
// Rows row0 .. row0 + rows of a tensor of `all` rows (a GEMM may take it in row chunks);
// idx counts units from the chunk's start.
__device__ __forceinline__ bool q6ks_unit(const u8* W, int rows, int cols, int row0, int all,
                                          long long idx, float* w) {
    const int units = cols / 8;
    if (idx >= (long long)rows * units) return false;
    const int row = (int)(idx / units), u = (int)(idx - (long long)row * units);
    const int nb = cols / 256;
    const long long NB = (long long)all * nb, B = (long long)(row0 + row) * nb + u / 32;
    q6k_deq8(W + B * 128, W + NB * 128 + B * 64, W + NB * 192 + B * 16, W + NB * 208 + B * 2,
             u % 32, w);
    return true;
}
extern "C" __global__ void deq_f16_q6_k_soa(const u8* W, u16* out, int rows, int cols,
                                            long long row_bytes, int row0, int all) {
    pdl_enter();
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    float w[8];
    if (q6ks_unit(W, rows, cols, row0, all, idx, w)) store8_f16(out, idx, w);
}
extern "C" __global__ void deq_f32_q6_k_soa(const u8* W, float* out, int rows, int cols,
                                            long long row_bytes, int row0, int all) {
    pdl_enter();
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    float w[8];
    if (q6ks_unit(W, rows, cols, row0, all, idx, w)) store8_f32(out, idx, w);
}

// Round activations the way the CPU backend quantizes them for its dot products (so both
// backends see the same inputs), writing f32 (yf) and/or f16 (yh, may be null).
// mode 1: Q8_0/Q8_1 blocks of 32 (d = amax/127 as f16, q = rint(x * 127/amax));
// mode 2: Q8_K blocks of 256 (iscale = -127/max, q = min(127, rint(iscale*x)), d = 1/iscale);
// mode 3: round to f16; mode 4: round to bf16; mode 0: copy.
// One warp per 32 (mode 1, 0, 3, 4) or 256 (mode 2) elements; grid.x * 4 warps.
// Greedy sampling kept on the device (a chained decode): the first index of the largest of
// x[0..width), the logits col0.. of the vocabulary; NaN and -inf never win (as the host's
// argmax). Each value becomes (order-preserving bits << 32 | ~index), so one unsigned maximum
// picks the largest value and, among equal ones, the lowest index — in any order of
// comparisons, so the grid's blocks meet by atomicMax in best[1], and the last block to count
// itself in best[2] (after a fence) takes the launch's maximum and resets both for the next.
// best[0] carries the largest across the chunks of one token; the last chunk writes the token
// to the device slot (the next pass embeds from it) and to mapped host memory (the host reads
// it after an event). One block took 60 us a call over Qwen2.5's 151936 logits (H200).
extern "C" __global__ void __launch_bounds__(1024)
    argmax_slot(const float* __restrict__ x, int width, int col0, unsigned long long* best,
                int first, int last, int* tok_dev, volatile int* tok_host) {
    pdl_enter();
    unsigned long long b = 0;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < width; i += gridDim.x * blockDim.x) {
        float v = x[i];
        if (v >= -3.40282347e+38f) {  // false for NaN and -inf
            unsigned int u = __float_as_uint(v == 0.0f ? 0.0f : v);  // -0 ties with +0
            u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
            unsigned long long k =
                ((unsigned long long)u << 32) | (unsigned long long)(~(unsigned int)(col0 + i));
            b = k > b ? k : b;
        }
    }
    __shared__ unsigned long long warp_best[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        unsigned long long other = __shfl_xor_sync(0xffffffff, b, o);
        b = other > b ? other : b;
    }
    if ((threadIdx.x & 31) == 0) warp_best[threadIdx.x >> 5] = b;
    __syncthreads();
    if (threadIdx.x >= 32) return;
    b = threadIdx.x < (blockDim.x >> 5) ? warp_best[threadIdx.x] : 0ull;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        unsigned long long other = __shfl_xor_sync(0xffffffff, b, o);
        b = other > b ? other : b;
    }
    if (threadIdx.x != 0) return;
    if (gridDim.x > 1) {
        atomicMax(&best[1], b);
        __threadfence();
        if (atomicAdd(&best[2], 1ull) != gridDim.x - 1) return;
        // Every other block's atomicMax came before its count: best[1] holds them all.
        b = atomicExch(&best[1], 0ull);
        best[2] = 0;
    }
    if (!first) b = best[0] > b ? best[0] : b;
    if (!last) {
        best[0] = b;
        return;
    }
    int t = b ? (int)~(unsigned int)(b & 0xffffffffull) : 0;  // nothing above -inf: 0
    *tok_dev = t;
    *tok_host = t;
    __threadfence_system();
}

// Top-k sampling into a token slot (a chained decode; sampling.rs `choose_from_top` on the
// host is the reference). Each logit becomes the same 64-bit key as argmax_slot's but without
// folding -0 into +0 (the host ranks by f32::total_cmp, then the lower id): all keys differ.
// cands[0..64) holds the best keys so far across the chunks of one token, best first, and
// cands[64] their count.
//
// A chunk goes in batches of TOPK_BATCH keys a thread. A batch's bar is the lowest of the
// 64 keys that are the two best of each warp's share (so at least 64 keys of the batch reach
// it: no key below it can be among the k best) and, once the list is full, its k-th key.
// Keys at the bar or above go to a pool with the list; each pooled key counts the keys above
// it, and the k best land in order. A pool that would overflow (keys nearly all alike) is
// taken one tile of the batch at a time instead. The last chunk then repeats the host's
// arithmetic in double precision (exp of the differences to the best, sums in order, the
// divisions spread over threads): top-p, min-p, temperature, and the host's uniform draw r.
#define TOPK_SLOT_MAX 64
#define TOPK_BATCH 8
#define TOPK_POOL 2048
__device__ __forceinline__ unsigned long long topk_key(float v, unsigned int id) {
    unsigned int u = __float_as_uint(v);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)u << 32) | (unsigned long long)(~id);
}
__device__ __forceinline__ float topk_logit(unsigned long long key) {
    unsigned int u = (unsigned int)(key >> 32);
    return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}
// Merge the pool (pool[0..pool_n), the list's keys first) into list[0..k): every thread ranks
// its pooled keys against all of them. Ends with a barrier.
__device__ __forceinline__ void topk_rank(unsigned long long* list, const unsigned long long* pool,
                                          int m, int k, int* list_n) {
    for (int j = threadIdx.x; j < m; j += blockDim.x) {
        const unsigned long long v = pool[j];
        int rank = 0;
        for (int q = 0; q < m; q++) rank += pool[q] > v;
        if (rank < k) list[rank] = v;
    }
    __syncthreads();
    if (threadIdx.x == 0) *list_n = min(m, k);
    __syncthreads();
}
// Keys key_at(0 .. n) (0: none) merged into list[0 .. list_n), the k best, best first: the
// batches described above. Every thread of the block calls it; ends with a barrier.
template <class KeyAt>
__device__ __forceinline__ void topk_scan(int n, const KeyAt& key_at, int k,
                                          unsigned long long* list, unsigned long long* pool,
                                          unsigned long long* warp_second, int& list_n,
                                          int& pool_n) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    for (int base = 0; base < n; base += TOPK_BATCH * blockDim.x) {
        unsigned long long keys[TOPK_BATCH];
        unsigned long long b1 = 0ull, b2 = 0ull;  // this thread's two best (0: none)
#pragma unroll
        for (int u = 0; u < TOPK_BATCH; u++) {
            const int i = base + u * blockDim.x + tid;
            keys[u] = i < n ? key_at(i) : 0ull;
            const unsigned long long v = keys[u];
            if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) { b2 = v; }
        }
        // The warp's two best.
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const unsigned long long o1 = __shfl_xor_sync(0xffffffff, b1, o);
            const unsigned long long o2 = __shfl_xor_sync(0xffffffff, b2, o);
            const unsigned long long hi = b1 > o1 ? b1 : o1, lo = b1 > o1 ? o1 : b1;
            const unsigned long long sec = b1 > o1 ? (b2 > o1 ? b2 : o1) : (o2 > b1 ? o2 : b1);
            b1 = hi;
            b2 = sec;
            (void)lo;
        }
        if (lane == 0) warp_second[warp] = b2;
        if (tid == 0) pool_n = list_n;
        __syncthreads();
        // The bar: the lowest warp's second best (every warp's two best are at or above it);
        // a key of 0 (no such key) makes every present key pass.
        unsigned long long bar = ~0ull;
        for (int w = 0; w < warps; w++) bar = min(bar, warp_second[w]);
        if (warps * 2 < k) bar = 0ull;
        const int held = list_n;
        const bool full = held >= k;
        const unsigned long long kth = full ? list[k - 1] : 0ull;
        int mine = 0;
#pragma unroll
        for (int u = 0; u < TOPK_BATCH; u++)
            mine += keys[u] != 0ull && keys[u] >= bar && (!full || keys[u] > kth);
        const int hits = __syncthreads_count(mine > 0) > 0 ? 1 : 0;
        if (!hits) continue;
        if (tid < held) pool[tid] = list[tid];
        int at = mine ? atomicAdd(&pool_n, mine) : 0;
        __syncthreads();
        const int m = pool_n;
        if (m <= TOPK_POOL) {
#pragma unroll
            for (int u = 0; u < TOPK_BATCH; u++)
                if (keys[u] != 0ull && keys[u] >= bar && (!full || keys[u] > kth)) pool[at++] = keys[u];
            __syncthreads();
            topk_rank(list, pool, m, k, &list_n);
            continue;
        }
        // Too many alike: one tile at a time (each adds at most blockDim.x keys).
        __syncthreads();
#pragma unroll
        for (int u = 0; u < TOPK_BATCH; u++) {
            const unsigned long long key = keys[u];
            const bool hit = key != 0ull && (list_n < k || key > list[k - 1]);
            if (__syncthreads_count(hit) == 0) continue;
            const int h = list_n;
            if (tid < h) pool[tid] = list[tid];
            if (tid == 0) pool_n = h;
            __syncthreads();
            if (hit) pool[atomicAdd(&pool_n, 1)] = key;
            __syncthreads();
            topk_rank(list, pool, pool_n, k, &list_n);
        }
    }
}
// Stage one of a sampled token over a long row: block b takes logits [b per, (b + 1) per) of
// x[0 .. width) and writes its k best keys (best first, 0 past its count) to
// parts[b TOPK_SLOT_MAX ..]. The k best of the row are among them (keys differ), so
// topk_slot over the parts finds the same list as over the row: 1 block over a 262144-logit
// row took ~165 us, a fifth of a Gemma 3 270M token.
extern "C" __global__ void __launch_bounds__(1024)
    topk_part(const float* __restrict__ x, int width, int col0, int per, int k,
              unsigned long long* __restrict__ parts) {
    pdl_enter();
    __shared__ unsigned long long list[TOPK_SLOT_MAX];
    __shared__ unsigned long long pool[TOPK_POOL];
    __shared__ unsigned long long warp_second[32];
    __shared__ int list_n, pool_n;
    if (k < 1) k = 1;
    if (k > TOPK_SLOT_MAX) k = TOPK_SLOT_MAX;
    if (threadIdx.x == 0) list_n = 0;
    __syncthreads();
    const int i0 = blockIdx.x * per, n = max(0, min(width - i0, per));
    const float* xb = x + i0;
    const unsigned int id0 = (unsigned int)(col0 + i0);
    topk_scan(
        n, [&](int i) { return topk_key(xb[i], id0 + (unsigned int)i); }, k, list, pool,
        warp_second, list_n, pool_n);
    const int t = threadIdx.x;
    if (t < TOPK_SLOT_MAX)
        parts[(long long)blockIdx.x * TOPK_SLOT_MAX + t] = t < list_n ? list[t] : 0ull;
}
// A chunk's logits, or (nparts > 0) the keys topk_part left in parts, into cands; the last
// chunk chooses the token.
extern "C" __global__ void __launch_bounds__(1024)
    topk_slot(const float* __restrict__ x, int width, int col0, unsigned long long* cands,
              int k, int first, int last, float temp, float top_p, float min_p, double r,
              int* tok_dev, volatile int* tok_host, const unsigned long long* __restrict__ parts,
              int nparts) {
    pdl_enter();
    __shared__ unsigned long long list[TOPK_SLOT_MAX];
    __shared__ unsigned long long pool[TOPK_POOL];
    __shared__ unsigned long long warp_second[32];
    __shared__ int list_n, pool_n;
    const int tid = threadIdx.x;
    if (k < 1) k = 1;
    if (k > TOPK_SLOT_MAX) k = TOPK_SLOT_MAX;
    if (tid == 0) list_n = first ? 0 : min((int)cands[TOPK_SLOT_MAX], k);
    __syncthreads();
    if (tid < list_n) list[tid] = cands[tid];
    __syncthreads();
    if (nparts > 0) {
        // A part's k-th key is a floor for the row's k best (that part alone has k keys at or
        // above it): keys below the highest such floor never enter the pool, which otherwise
        // takes most of the parts' keys (sorted runs defeat the batch's bar).
        __shared__ unsigned long long floor_key;
        if (tid == 0) floor_key = 0ull;
        __syncthreads();
        if (tid < nparts) atomicMax(&floor_key, parts[(long long)tid * TOPK_SLOT_MAX + k - 1]);
        __syncthreads();
        const unsigned long long fl = floor_key;
        topk_scan(
            nparts * TOPK_SLOT_MAX,
            [&](int i) {
                const unsigned long long key = parts[i];
                return key >= fl ? key : 0ull;
            },
            k, list, pool, warp_second, list_n, pool_n);
    }
    else
        topk_scan(
            width, [&](int i) { return topk_key(x[i], (unsigned int)(col0 + i)); }, k, list,
            pool, warp_second, list_n, pool_n);
    const int n = list_n;
    if (!last) {
        if (tid < n) cands[tid] = list[tid];
        if (tid == 0) cands[TOPK_SLOT_MAX] = (unsigned long long)n;
        return;
    }
    // The host's choose_from_top: e_raw for top-p and min-p, e_hot for the draw; each step's
    // sum by thread 0 in order, its divisions by the candidates' threads.
    __shared__ double e_raw[TOPK_SLOT_MAX], e_hot[TOPK_SLOT_MAX], p[TOPK_SLOT_MAX];
    __shared__ double sum;
    __shared__ int nn;
    if (tid < n) {
        const float l = topk_logit(list[tid]), l0 = topk_logit(list[0]);
        e_raw[tid] = exp((double)l - (double)l0);
        e_hot[tid] = exp((double)(l / temp) - (double)(l0 / temp));
    }
    if (tid == 0) nn = n;
    __syncthreads();
    for (int step = 0; step < 3; step++) {
        const double* e = step == 2 ? e_hot : e_raw;
        const bool wanted = step == 0 ? top_p < 1.0f : step == 1 ? min_p > 0.0f : true;
        if (!wanted || n == 0) continue;  // uniform: kernel arguments
        if (tid == 0) {
            double s = 0.0;
            for (int j = 0; j < nn; j++) s += e[j];
            sum = s;
        }
        __syncthreads();
        if (tid < nn) p[tid] = e[tid] / sum;
        __syncthreads();
        if (tid == 0) {
            if (step == 0) {
                double acc = 0.0;
                int keep = nn;
                for (int j = 0; j < nn; j++) {
                    acc += p[j];
                    if (acc >= (double)top_p) { keep = j + 1; break; }
                }
                nn = keep;
            } else if (step == 1) {
                const double thr = p[0] * (double)min_p;
                int keep = 0;
                while (keep < nn && p[keep] >= thr) keep++;
                nn = keep > 0 ? keep : 1;
            } else {
                double acc = 0.0;
                int pick = nn - 1;
                for (int j = 0; j < nn; j++) {
                    acc += p[j];
                    if (r < acc) { pick = j; break; }
                }
                const int t = (int)~(unsigned int)(list[pick] & 0xffffffffull);
                *tok_dev = t;
                *tok_host = t;
                __threadfence_system();
            }
        }
        __syncthreads();
    }
    if (tid == 0 && n == 0) {
        *tok_dev = 0;
        *tok_host = 0;
        __threadfence_system();
    }
}

// Whole-vocabulary sampling into a token slot (a chained decode; sampling.rs `sample_vocab`
// is the reference). Three launches over the vocabulary's logits x[0..n): vocab_max (a
// maximum per block), vocab_tiles (one warp per tile of VOCAB_TILE weights: lane L sums
// segment 32 * tile + L's 32 weights in order, the tile adds the lanes' sums in lane order)
// and vocab_pick (one warp walks the tiles, then the tile's segments, then the segment's
// weights). Every sum is the host's, in the host's order, so only the last bits of exp could
// differ. With top-p, vocab_mass and vocab_top_p run between the first two and find the
// lowest key kept. A head computed in chunks is first gathered (vocab_gather).
#define VOCAB_TILE 1024
#define VOCAB_PARTS 128
#define NEG_INF __int_as_float(0xff800000)
#define VOCAB_MAX_TILES 1024
extern "C" __global__ void vocab_gather(const float* __restrict__ x, int width, int col0,
                                        float* __restrict__ stash) {
    pdl_enter();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < width; i += gridDim.x * blockDim.x)
        stash[col0 + i] = x[i];
}
// The largest of v and x, NaN never taken (as the host's fold with `>`).
__device__ __forceinline__ float vocab_larger(float m, float v) { return v > m ? v : m; }
__device__ __forceinline__ float vocab_warp_max(float m) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = vocab_larger(m, __shfl_xor_sync(0xffffffff, m, o));
    return m;
}
extern "C" __global__ void __launch_bounds__(256)
    vocab_max(const float* __restrict__ x, int n, float* __restrict__ part_max,
              unsigned long long* __restrict__ zero, int zero_n) {
    pdl_enter();
    // Top-p's histogram starts from zero for vocab_mass's atomics (zero_n 0 without top-p).
    if (blockIdx.x == 0)
        for (int i = threadIdx.x; i < zero_n; i += blockDim.x) zero[i] = 0;
    __shared__ float warp_m[8];
    float m = NEG_INF;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        m = vocab_larger(m, x[i]);
    m = vocab_warp_max(m);
    if ((threadIdx.x & 31) == 0) warp_m[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x >= 32) return;
    m = threadIdx.x < (blockDim.x >> 5) ? warp_m[threadIdx.x] : NEG_INF;
    m = vocab_warp_max(m);
    if (threadIdx.x == 0) part_max[blockIdx.x] = m;
}
// The largest logit, from vocab_max's parts (every lane of the warp gets it).
__device__ __forceinline__ float vocab_m(const float* part_max, int parts) {
    float m = NEG_INF;
    for (int j = threadIdx.x & 31; j < parts; j += 32) m = vocab_larger(m, part_max[j]);
    return vocab_warp_max(m);
}
// sampling.rs `candidate_key`: total_cmp's order of the logit, then the lower id.
__device__ __forceinline__ u64 vocab_key(int i, float l) {
    const u32 b = __float_as_uint(l);
    const u32 ordered = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return ((u64)ordered << 32) | (u64)(0xffffffffu - (u32)i);
}
// A token's weight: exp(l / t - m / t) if kept (not NaN; l == m or l - m >= ln(min_p); its
// key at least top-p's lowest kept, 0 without top-p).
__device__ __forceinline__ double vocab_weight(int i, float l, float m, float t, double mt,
                                               double ln_min_p, u64 keep) {
    if (l != l) return 0.0;
    if (!(l == m || __dsub_rn((double)l, (double)m) >= ln_min_p)) return 0.0;
    if (keep != 0 && vocab_key(i, l) < keep) return 0.0;
    return exp(__dsub_rn((double)(l / t), mt));
}
// Segment `seg`'s sum (its weights added in order from 0.0; 0 past the vocabulary).
__device__ __forceinline__ double vocab_segment(const float* x, int n, int seg, float m, float t,
                                                double mt, double ln_min_p, u64 keep) {
    double s = 0.0;
    const int i0 = seg * 32;
    for (int j = 0; j < 32 && i0 + j < n; j++)
        s = __dadd_rn(s, vocab_weight(i0 + j, x[i0 + j], m, t, mt, ln_min_p, keep));
    return s;
}

// Top-p (sampling.rs `top_p_key`, `top_p_mass`): each token's integer mass
// floor(exp(l - m) * 2^32); the lowest key whose prefix (keys in descending order) reaches
// ceil(top_p * total). Integer sums are exact in any order, so a radix select over the keys
// (11, 11, 10 bits of the logit, then 11, 11, 10 of the id; a level only while the chosen
// digit holds more than one token) finds the host's key. `topp` holds the level-one
// histogram (masses [0, TOPP_BINS), counts [TOPP_BINS, 2 TOPP_BINS)) and then the key.
#define TOPP_BINS 2048
#define TOPP_KEEP (2 * TOPP_BINS)
// The warp's inclusive prefix sum of v in lane order (integers: exact in any order).
__device__ __forceinline__ u64 warp_incl_sum(u64 v, int lane) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u64 up = __shfl_up_sync(0xffffffff, v, o);
        if (lane >= o) v += up;
    }
    return v;
}
extern "C" __global__ void __launch_bounds__(256)
    vocab_mass(const float* __restrict__ x, int n, const float* __restrict__ part_max, int parts,
               u64* __restrict__ mass, u64* __restrict__ topp) {
    pdl_enter();
    __shared__ u64 bin_mass[TOPP_BINS];
    __shared__ u32 bin_count[TOPP_BINS];
    for (int b = threadIdx.x; b < TOPP_BINS; b += blockDim.x) {
        bin_mass[b] = 0;
        bin_count[b] = 0;
    }
    __syncthreads();
    const float m = vocab_m(part_max, parts);
    const bool finite = isfinite(m);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float l = x[i];
        u64 q = 0;
        if (l == l) {
            // As the host: f64 difference, exp, times 2^32 (exact), truncated.
            if (finite) q = (u64)(exp(__dsub_rn((double)l, (double)m)) * 4294967296.0);
            const int b = (int)(vocab_key(i, l) >> 53);
            atomicAdd(&bin_mass[b], q);
            atomicAdd(&bin_count[b], 1u);
        }
        mass[i] = q;
    }
    __syncthreads();
    for (int b = threadIdx.x; b < TOPP_BINS; b += blockDim.x)
        if (bin_count[b] != 0) {
            atomicAdd(&topp[b], bin_mass[b]);
            atomicAdd(&topp[TOPP_BINS + b], (u64)bin_count[b]);
        }
}
// Top-p's candidates: the tokens in the first level's chosen digit d0 (the largest digit
// whose tokens' mass from the top reaches ceil(top_p * total): vocab_top_p's level-one choice,
// made again here by every block from the same integers), as (key, mass) pairs appended to
// `list` (2 * n u64) in any order, their number in *list_n (zeroed by vocab_max). vocab_top_p's
// later levels then walk these instead of the whole vocabulary: they only count integer masses
// and pick maxima, so the order does not change their result. blockDim 256: thread t holds
// bins 2047 - 8t down to 2040 - 8t. Nothing when the largest logit is not finite (vocab_top_p
// keeps everything then).
extern "C" __global__ void __launch_bounds__(256)
    vocab_top_p_gather(const float* __restrict__ x, int n, const float* __restrict__ part_max,
                       int parts, float top_p, const u64* __restrict__ mass,
                       const u64* __restrict__ topp, u64* __restrict__ list, u32* list_n) {
    pdl_enter();
    __shared__ u64 warp_sums[8];
    __shared__ int pick;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (!isfinite(vocab_m(part_max, parts))) return;
    if (tid == 0) pick = -1;
    u64 bm[8], own = 0;
    u32 bc[8];
#pragma unroll
    for (int k = 0; k < 8; k++) {
        const int b = TOPP_BINS - 1 - 8 * tid - k;
        bm[k] = topp[b];
        bc[k] = (u32)topp[TOPP_BINS + b];
        own += bm[k];
    }
    const u64 incl = warp_incl_sum(own, lane);
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    u64 run = incl - own, total = 0;
    for (int w = 0; w < 8; w++) {
        if (w < warp) run += warp_sums[w];
        total += warp_sums[w];
    }
    const u64 goal = (u64)ceil(__dmul_rn((double)top_p, __ull2double_rn(total)));
#pragma unroll
    for (int k = 0; k < 8; k++) {
        run += bm[k];
        if (bc[k] != 0 && run >= goal) {
            atomicMax(&pick, TOPP_BINS - 1 - 8 * tid - k);
            break;
        }
    }
    __syncthreads();
    const int d0 = pick;
    if (d0 < 0) return;
    for (int i = blockIdx.x * blockDim.x + tid; i < n; i += gridDim.x * blockDim.x) {
        const float l = x[i];
        if (l != l) continue;
        const u64 k = vocab_key(i, l);
        if ((int)(k >> 53) != d0) continue;
        const u32 j = atomicAdd(list_n, 1u);
        list[2 * (u64)j] = k;
        list[2 * (u64)j + 1] = mass[i];
    }
}
// One block of 1024 threads. Level by level: the largest digit d with tokens whose mass
// from the top (acc, the digits above, plus d's own) reaches the goal; after the first level
// only vocab_top_p_gather's candidates (list, *list_n of them) are walked.
extern "C" __global__ void __launch_bounds__(1024)
    vocab_top_p(const float* __restrict__ part_max, int parts, float top_p,
                const u64* __restrict__ list, const u32* __restrict__ list_n,
                u64* __restrict__ topp) {
    pdl_enter();
    __shared__ u64 bin_mass[TOPP_BINS];
    __shared__ u32 bin_count[TOPP_BINS];
    __shared__ u64 warp_sums[32];
    __shared__ int pick;
    __shared__ u64 found, above;
    __shared__ u32 above_count;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float m = vocab_m(part_max, parts);
    for (int b = tid; b < TOPP_BINS; b += 1024) {
        bin_mass[b] = topp[b];
        bin_count[b] = (u32)topp[TOPP_BINS + b];
    }
    u64 goal = 0, acc = 0, prefix = 0, keep = 0;
    int shift = 53;
    const int shifts[6] = {53, 42, 32, 21, 10, 0};
    // The host returns argmax's token when m is not finite: keep everything then.
    const bool finite = isfinite(m);
    for (int level = 0; level < 6 && finite; level++) {
        if (tid == 0) pick = -1;
        __syncthreads();
        // Thread t holds bins hi = 2047 - 2t and hi - 1: exclusive prefix of the pairs'
        // sums from the top (integers: any order gives the same sums).
        const int hi = TOPP_BINS - 1 - 2 * tid;
        const u64 a = bin_mass[hi], b = bin_mass[hi - 1];
        const u64 incl = warp_incl_sum(a + b, lane);
        if (lane == 31) warp_sums[warp] = incl;
        __syncthreads();
        u64 before = incl - a - b;
        for (int w = 0; w < warp; w++) before += warp_sums[w];
        if (level == 0) {
            u64 total = 0;
            for (int w = 0; w < 32; w++) total += warp_sums[w];
            goal = (u64)ceil(__dmul_rn((double)top_p, __ull2double_rn(total)));
        }
        if (bin_count[hi] != 0 && acc + before + a >= goal) atomicMax(&pick, hi);
        else if (bin_count[hi - 1] != 0 && acc + before + a + b >= goal) atomicMax(&pick, hi - 1);
        __syncthreads();
        const int d = pick;
        if (d < 0) break; // not reachable: the bucket chosen above holds the goal
        // The thread holding d hands over the mass of the digits above it and d's count.
        if (d == hi) {
            above = before;
            above_count = bin_count[hi];
        } else if (d == hi - 1) {
            above = before + a;
            above_count = bin_count[hi - 1];
        }
        __syncthreads();
        const u32 count = above_count;
        acc += above;
        prefix = (prefix << (level == 0 ? 0 : shifts[level - 1] - shift)) | (u64)d;
        if (shift == 0) {
            keep = prefix;
            break;
        }
        const int next = shifts[level + 1];
        const u64 digit_mask = (1ull << (shift - next)) - 1;
        __syncthreads();
        for (int b2 = tid; b2 < TOPP_BINS; b2 += 1024) {
            bin_mass[b2] = 0;
            bin_count[b2] = 0;
        }
        if (tid == 0) found = 0;
        __syncthreads();
        // Every candidate has the first level's digit (the walk at level 0 is the gather's).
        const u32 candidates = *list_n;
        for (u32 j = tid; j < candidates; j += 1024) {
            const u64 k = list[2 * (u64)j];
            if ((k >> shift) != prefix) continue;
            if (count == 1) {
                found = k;
            } else {
                const int bin = (int)((k >> next) & digit_mask);
                atomicAdd(&bin_mass[bin], list[2 * (u64)j + 1]);
                atomicAdd(&bin_count[bin], 1u);
            }
        }
        __syncthreads();
        if (count == 1) {
            keep = found;
            break;
        }
        shift = next;
    }
    if (tid == 0) topp[TOPP_KEEP] = keep;
}
// The tile's sum: the lanes' segment sums added in lane order (every lane gets it).
__device__ __forceinline__ double vocab_lanes_sum(double s) {
    double sum = 0.0;
    for (int l = 0; l < 32; l++) sum = __dadd_rn(sum, __shfl_sync(0xffffffff, s, l));
    return sum;
}
extern "C" __global__ void __launch_bounds__(256)
    vocab_tiles(const float* __restrict__ x, int n, const float* __restrict__ part_max, int parts,
                float t, double ln_min_p, const u64* __restrict__ keep_key,
                double* __restrict__ tile_sums) {
    pdl_enter();
    const float m = vocab_m(part_max, parts);
    const u64 keep = keep_key ? *keep_key : 0;
    const double mt = (double)(m / t);
    const int tile = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (tile * VOCAB_TILE >= n) return;
    const double s = vocab_segment(x, n, tile * 32 + lane, m, t, mt, ln_min_p, keep);
    const double sum = vocab_lanes_sum(s);
    if (lane == 0) tile_sums[tile] = sum;
}
// The host's `walk` by lane 0 over v (one value a lane, `count` of them): the first index
// where the running sum passes `target` and what is left of it, else the last with weight
// and +inf. The result in every lane.
__device__ __forceinline__ int vocab_walk_lanes(double v, int count, double& target) {
    int pick = -1, last = 0;
    double acc = 0.0, left = 0.0;
    for (int l = 0; l < count; l++) {
        const double x = __shfl_sync(0xffffffff, v, l);
        if (pick < 0) {
            const double next = __dadd_rn(acc, x);
            if (target < next) {
                pick = l;
                left = __dsub_rn(target, acc);
            }
            acc = next;
        }
        if (x > 0.0) last = l;
    }
    if (pick < 0) {
        pick = last;
        left = __longlong_as_double(0x7ff0000000000000ll);
    }
    target = left;
    return pick;
}
extern "C" __global__ void __launch_bounds__(32)
    vocab_pick(const float* __restrict__ x, int n, const float* __restrict__ part_max, int parts,
               float t, double ln_min_p, const u64* __restrict__ keep_key,
               const double* __restrict__ tile_sums, double r, int* tok_dev,
               volatile int* tok_host) {
    pdl_enter();
    const u64 keep = keep_key ? *keep_key : 0;
    const int lane = threadIdx.x;
    const float m = vocab_m(part_max, parts);
    const float mtf = m / t;
    int token = 0;
    if (!isfinite(m) || !isfinite(mtf)) {
        // The host's argmax: the first index holding the largest; 0 if nothing beats -inf.
        if (m > NEG_INF)
            for (int base = 0; base < n; base += 32) {
                const unsigned hit = __ballot_sync(0xffffffff, base + lane < n && x[base + lane] == m);
                if (hit) {
                    token = base + __ffs(hit) - 1;
                    break;
                }
            }
    } else {
        const double mt = (double)mtf;
        const int tiles = (n + VOCAB_TILE - 1) / VOCAB_TILE;
        // The total, then the tile: tile sums 32 at a time through the lanes.
        double total = 0.0;
        for (int j = 0; j < tiles; j++) total = __dadd_rn(total, tile_sums[j]);
        double target = __dmul_rn(r, total);
        int tile = -1, last = 0;
        double acc = 0.0;
        for (int j = 0; j < tiles && tile < 0; j++) {
            const double v = tile_sums[j];
            const double next = __dadd_rn(acc, v);
            if (target < next) {
                tile = j;
                target = __dsub_rn(target, acc);
            }
            acc = next;
        }
        if (tile < 0) {
            for (int j = 0; j < tiles; j++)
                if (tile_sums[j] > 0.0) last = j;
            tile = last;
            target = __longlong_as_double(0x7ff0000000000000ll);
        }
        const int segs = min(32, (n + 31) / 32 - tile * 32);
        const double s = lane < segs
                             ? vocab_segment(x, n, tile * 32 + lane, m, t, mt, ln_min_p, keep)
                             : 0.0;
        const int seg = tile * 32 + vocab_walk_lanes(s, segs, target);
        const int i = seg * 32 + lane;
        const double w = i < n ? vocab_weight(i, x[i], m, t, mt, ln_min_p, keep) : 0.0;
        token = seg * 32 + vocab_walk_lanes(w, min(32, n - seg * 32), target);
    }
    if (lane == 0) {
        *tok_dev = token;
        *tok_host = token;
        __threadfence_system();
    }
}


extern "C" __global__ void act_round(const float* __restrict__ x, float* __restrict__ yf,
                                     u16* __restrict__ yh, long long n, int mode) {
    pdl_enter();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    long long blk = (long long)blockIdx.x * 4 + warp;
    if (mode == 2) {
        long long base = blk * 256;
        if (base >= n) return;
        float v[8];
        float amax = 0.f, mx = 0.f;
        int first = 1 << 30;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int e = i * 32 + lane;
            v[i] = x[base + e];
            if (fabsf(v[i]) > amax) { amax = fabsf(v[i]); mx = v[i]; first = e; }
        }
        warp_argmax_abs(amax, mx, first);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float r = 0.f;
            if (amax != 0.f) {
                float iscale = -127.f / mx;
                float q = fminf(127.f, rintf(iscale * v[i]));
                r = q * (1.f / iscale);
            }
            long long e = base + i * 32 + lane;
            if (yf) yf[e] = r;
            if (yh) yh[e] = f2h(r);
        }
        return;
    }
    long long e = blk * 32 + lane;
    if (blk * 32 >= n) return;
    float v = e < n ? x[e] : 0.f;
    float r = v;
    if (mode == 1) {
        float amax = warp_max(fabsf(v));
        float d = amax / 127.f;
        float id = amax != 0.f ? 127.f / amax : 0.f;
        r = rintf(v * id) * h2f(f2h(d));
    } else if (mode == 3) {
        r = h2f(f2h(v));
    } else if (mode == 4) {
        r = round_bf16(v);
    }
    if (e < n) {
        if (yf) yf[e] = r;
        if (yh) yh[e] = f2h(r);
    }
}

// RMS norm of each group of g values: out = x / sqrt(mean(x^2) + eps) * w. One block per group.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ out, int g, float eps) {
    pdl_enter();
    const float* xr = x + (long long)blockIdx.x * g;
    float* o = out + (long long)blockIdx.x * g;
    float ss = 0.f;
    for (int i = threadIdx.x; i < g; i += blockDim.x) ss += xr[i] * xr[i];
    __shared__ float red[32];
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.f;
        v = warp_sum(v);
        if (threadIdx.x == 0) red[0] = v;
    }
    __syncthreads();
    float inv = 1.f / sqrtf(red[0] / (float)g + eps);
    for (int i = threadIdx.x; i < g; i += blockDim.x) o[i] = xr[i] * inv * w[i];
}

// As rms_norm for g % 4 == 0 and g <= 16 * blockDim.x: 16-byte loads, each thread keeps its
// (at most 4) float4s in registers, so the row is read once and every load is in flight at
// the same time (the plain kernel's strided loop is latency-bound on one 4096-wide row).
// Writes only the float4s of 256-element chunks `part`, `part + nparts`, ... of the row (all of
// them with nparts = 1); the sum of squares always covers the whole row in the same order.
// The norm weight's float4s a thread of rms_norm4_row writes, loaded before pdl_enter: norm
// weights are uploaded before any launch that reads them and never written by kernels.
// The row is held by the block's first `nt` threads (a multiple of 32; blockDim.x unless the
// block has more threads for other work): the same split, so the same sums, as rms_norm4.
__device__ __forceinline__ void rms_norm4_weights(const float4* __restrict__ w, int g4,
                                                  int part, int nparts, float4 (&ww)[4],
                                                  int nt) {
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const int i = threadIdx.x + k * nt;
        ww[k] = (int)threadIdx.x < nt && i < g4 && (i >> 6) % nparts == part
                    ? w[i]
                    : make_float4(0.f, 0.f, 0.f, 0.f);
    }
}

// res (may be null): each written float4 also added into res's row (rms_norm4_add).
// row: the row of x / out / res this block takes (-1: blockIdx.x).
__device__ __forceinline__ void rms_norm4_row(const float4* __restrict__ x,
                                              const float4 (&ww)[4], float4* out, int g4,
                                              float eps, int part, int nparts, int nt,
                                              float4* res = nullptr, long long row = -1) {
    if (row < 0) row = blockIdx.x;
    const float4* xr = x + row * g4;
    float4* o = out + row * g4;
    const bool holds = (int)threadIdx.x < nt;
    float4 v[4];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const int i = threadIdx.x + k * nt;
        v[k] = holds && i < g4 ? xr[i] : make_float4(0.f, 0.f, 0.f, 0.f);
        ss += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
    }
    __shared__ float red[32];
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float r = (int)threadIdx.x < (nt >> 5) ? red[threadIdx.x] : 0.f;
        r = warp_sum(r);
        if (threadIdx.x == 0) red[0] = r;
    }
    __syncthreads();
    const float inv = 1.f / sqrtf(red[0] / (float)(4 * g4) + eps);
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const int i = threadIdx.x + k * nt;
        if (holds && i < g4 && (i >> 6) % nparts == part) {
            const float4 y = make_float4(v[k].x * inv * ww[k].x, v[k].y * inv * ww[k].y,
                                         v[k].z * inv * ww[k].z, v[k].w * inv * ww[k].w);
            o[i] = y;
            if (res != nullptr) {
                float4* r = res + row * g4 + i;
                const float4 a = *r;
                *r = make_float4(a.x + y.x, a.y + y.y, a.z + y.z, a.w + y.w);
            }
        }
    }
}

extern "C" __global__ void rms_norm4(const float4* __restrict__ x, const float4* __restrict__ w,
                                     float4* __restrict__ out, int g4, float eps) {
    float4 ww[4];
    rms_norm4_weights(w, g4, 0, 1, ww, blockDim.x);
    pdl_enter();
    rms_norm4_row(x, ww, out, g4, eps, 0, 1, blockDim.x);
}

// rms_norm4, then its output added into res (Gemma 3's post-norms before the residual add:
// out = norm(x) * w, res += out, with add's arithmetic), in one launch.
extern "C" __global__ void rms_norm4_add(const float4* __restrict__ x,
                                         const float4* __restrict__ w, float4* __restrict__ out,
                                         int g4, float eps, float4* res) {
    float4 ww[4];
    rms_norm4_weights(w, g4, 0, 1, ww, blockDim.x);
    pdl_enter();
    rms_norm4_row(x, ww, out, g4, eps, 0, 1, blockDim.x, res);
}

extern "C" __global__ void add_bias(float* x, const float* b, int width, long long total) {
    pdl_enter();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) x[i] += b[i % width];
}

extern "C" __global__ void add(float* x, const float* y, long long total) {
    pdl_enter();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) x[i] += y[i];
}

// act 0: SwiGLU, 1: GeGLU (tanh approximation on f16-rounded input, result rounded to f16, as
// the CPU backend's table does).
__device__ __forceinline__ float glu_one(float g, float u, int act) {
    float a;
    if (act == 0) {
        a = g / (1.f + expf(-g));
    } else if (g <= -10.f) {
        a = 0.f;
    } else if (g >= 10.f) {
        a = g;
    } else {
        float xh = h2f(f2h(g));
        float t = tanhf(0.7978846f * xh * (1.f + 0.044715f * xh * xh));
        a = h2f(f2h(0.5f * xh * (1.f + t)));
    }
    return a * u;
}

extern "C" __global__ void glu(const float* gate, const float* up, float* out, long long total,
                               int act) {
    pdl_enter();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    out[i] = glu_one(gate[i], up[i], act);
}

// RoPE: one thread per rotated pair. theta_i = pos * theta_scale^i by repeated multiplication.
// Row t of the batch is at position rowpos[t] of its sequence.
// Pair idx: its elements' offsets in x (ea, eb) and its angle's cos and sin. Reads only the
// positions (uploaded before the token's first launch), so kernels compute it before
// pdl_enter, while the previous kernel still runs.
struct RopeAt {
    long long ea, eb;
    float c, s;
};
__device__ __forceinline__ RopeAt rope_at(int n_heads, int hd, int nd, const int* rowpos,
                                          float theta_scale, int neox, long long idx) {
    const int half = nd / 2;
    const int i = (int)(idx % half);
    const long long th = idx / half;
    const int t = (int)(th / n_heads);
    float theta = (float)rowpos[t];
    for (int k = 0; k < i; k++) theta *= theta_scale;
    RopeAt r;
    r.c = cosf(theta);
    r.s = sinf(theta);
    r.ea = th * hd + (neox ? i : 2 * i);
    r.eb = th * hd + (neox ? i + half : 2 * i + 1);
    return r;
}
__device__ __forceinline__ void rope_apply(float* x, const RopeAt& r) {
    const float x0 = x[r.ea], x1 = x[r.eb];
    x[r.ea] = x0 * r.c - x1 * r.s;
    x[r.eb] = x0 * r.s + x1 * r.c;
}

extern "C" __global__ void rope(float* x, int n, int n_heads, int hd, int nd, const int* rowpos,
                                float theta_scale, int neox) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = (long long)n * n_heads * (nd / 2);
    if (idx >= total) return;
    const RopeAt r = rope_at(n_heads, hd, nd, rowpos, theta_scale, neox, idx);
    pdl_enter();
    rope_apply(x, r);
}

// RoPE of q (nq heads) and k (nk heads) of the same rows in one launch: the first n*nq*nd/2
// threads rotate q's pairs, the rest k's.
extern "C" __global__ void rope_qk(float* q, float* k, int n, int nq, int nk, int hd, int nd,
                                   const int* rowpos, float theta_scale, int neox) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long tq = (long long)n * nq * (nd / 2), tk = (long long)n * nk * (nd / 2);
    if (idx >= tq + tk) return;
    const bool isq = idx < tq;
    const RopeAt r = isq ? rope_at(nq, hd, nd, rowpos, theta_scale, neox, idx)
                         : rope_at(nk, hd, nd, rowpos, theta_scale, neox, idx - tq);
    pdl_enter();
    rope_apply(isq ? q : k, r);
}

// Store n rows of k and v (f32) into the f16 cache at element offset off.
// Row t of k/v goes to cache row kvrow[t] (its sequence slot's base + its position).
extern "C" __global__ void kv_store(const float* k, const float* v, u16* kc, u16* vc,
                                    long long total, const int* kvrow, int kvd) {
    pdl_enter();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    long long t = i / kvd, d = i - t * kvd;
    long long dst = (long long)kvrow[t] * kvd + d;
    kc[dst] = f2h(k[i]);
    vc[dst] = f2h(v[i]);
}

// Causal attention over the f16 cache, one block (4 warps) per (head, token). Row t sees its
// own sequence's cache rows rowbase[t] + 0..=rowpos[t] (within the window). Two passes:
// max and sum of the scores, then probabilities rounded to f16 (as the CPU does) times V.
// hd <= 256.
#define ATT_WARPS 4
#define NEG_INF __int_as_float(0xff800000)
extern "C" __global__ void __launch_bounds__(128)
    attention(const float* __restrict__ q, const u16* __restrict__ kc, const u16* __restrict__ vc,
              float* __restrict__ out, int n_head, int group, int hd, int kvd,
              const int* __restrict__ rowpos, const int* __restrict__ rowbase, int window,
              float scale) {
    pdl_enter();
    const int h = blockIdx.x, t = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kh = h / group;
    const int pos = rowpos[t];
    kc += (long long)rowbase[t] * kvd;
    vc += (long long)rowbase[t] * kvd;
    const int lo = window > 0 ? max(0, pos + 1 - window) : 0;
    const int qd = n_head * hd;
    const int per = (hd + 31) / 32;
    __shared__ float red_m[ATT_WARPS], red_s[ATT_WARPS];
    __shared__ float acc_s[ATT_WARPS][256];

    float qv[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int d = lane + 32 * i;
        qv[i] = (i < per && d < hd) ? h2f(f2h(q[(long long)t * qd + h * hd + d])) : 0.f;
    }
    // Pass 1: running max and sum per warp.
    float m = NEG_INF, s = 0.f;
    for (int j = lo + warp; j <= pos; j += ATT_WARPS) {
        const u16* kr = kc + (long long)j * kvd + kh * hd;
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int d = lane + 32 * i;
            if (i < per && d < hd) dot += qv[i] * h2f(kr[d]);
        }
        float sc = warp_sum(dot) * scale;
        float nm = fmaxf(m, sc);
        s = s * expf(m - nm) + expf(sc - nm);
        m = nm;
    }
    if (lane == 0) { red_m[warp] = m; red_s[warp] = s; }
    __syncthreads();
    float gm = NEG_INF;
    for (int w = 0; w < ATT_WARPS; w++) gm = fmaxf(gm, red_m[w]);
    float gs = 0.f;
    for (int w = 0; w < ATT_WARPS; w++)
        if (red_m[w] > NEG_INF) gs += red_s[w] * expf(red_m[w] - gm);
    const float inv = 1.f / gs;
    // Pass 2: weighted sum of V.
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) acc[i] = 0.f;
    for (int j = lo + warp; j <= pos; j += ATT_WARPS) {
        const u16* kr = kc + (long long)j * kvd + kh * hd;
        const u16* vr = vc + (long long)j * kvd + kh * hd;
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int d = lane + 32 * i;
            if (i < per && d < hd) dot += qv[i] * h2f(kr[d]);
        }
        float sc = warp_sum(dot) * scale;
        float p = h2f(f2h(expf(sc - gm) * inv));
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int d = lane + 32 * i;
            if (i < per && d < hd) acc[i] += p * h2f(vr[d]);
        }
    }
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int d = lane + 32 * i;
        if (i < per && d < hd) acc_s[warp][d] = acc[i];
    }
    __syncthreads();
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float v = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) v += acc_s[w][d];
        out[(long long)t * qd + h * hd + d] = v;
    }
}

// As `attention`, with the scores of the visible keys in dynamic shared memory. 256 threads:
// each warp scores 4 keys at a time; for P.V the threads form G = 256/hd32 groups (hd32 =
// hd rounded up to 32), group g walks keys g, g+G, ... eight at a time (independent loads),
// thread owns one dim; the groups' partial sums are added in shared memory.
#define ATT2_THREADS 256
#define ATT2_WARPS 8
extern "C" __global__ void __launch_bounds__(ATT2_THREADS)
    attention_smem(const float* __restrict__ q, const u16* __restrict__ kc,
                   const u16* __restrict__ vc, float* __restrict__ out, int n_head, int group,
                   int hd, int kvd, const int* __restrict__ rowpos,
                   const int* __restrict__ rowbase, int window, float scale) {
    pdl_enter();
    extern __shared__ float sc[];
    __shared__ float red[ATT2_WARPS];
    __shared__ float qs[256];
    __shared__ float part[ATT2_THREADS];
    const int h = blockIdx.x, t = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kh = h / group;
    const int pos = rowpos[t];
    kc += (long long)rowbase[t] * kvd;
    vc += (long long)rowbase[t] * kvd;
    const int lo = window > 0 ? max(0, pos + 1 - window) : 0;
    const int nk = pos + 1 - lo;
    const int qd = n_head * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x)
        qs[d] = h2f(f2h(q[(long long)t * qd + h * hd + d]));
    __syncthreads();
    const u16* kbase = kc + (long long)lo * kvd + kh * hd;
    for (int j0 = warp * 4; j0 < nk; j0 += ATT2_WARPS * 4) {
        float dot[4] = {0.f, 0.f, 0.f, 0.f};
        for (int d = lane; d < hd; d += 32) {
            float qv = qs[d];
#pragma unroll
            for (int k = 0; k < 4; k++)
                if (j0 + k < nk) dot[k] += qv * h2f(kbase[(long long)(j0 + k) * kvd + d]);
        }
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float v = warp_sum(dot[k]);
            if (lane == 0 && j0 + k < nk) sc[j0 + k] = v * scale;
        }
    }
    __syncthreads();
    float m = NEG_INF;
    for (int j = threadIdx.x; j < nk; j += blockDim.x) m = fmaxf(m, sc[j]);
    m = warp_max(m);
    if (lane == 0) red[warp] = m;
    __syncthreads();
    m = red[0];
    for (int w = 1; w < ATT2_WARPS; w++) m = fmaxf(m, red[w]);
    __syncthreads();
    float s = 0.f;
    for (int j = threadIdx.x; j < nk; j += blockDim.x) {
        float e = expf(sc[j] - m);
        sc[j] = e;
        s += e;
    }
    s = warp_sum(s);
    if (lane == 0) red[warp] = s;
    __syncthreads();
    float tot = 0.f;
    for (int w = 0; w < ATT2_WARPS; w++) tot += red[w];
    const float inv = 1.f / tot;
    // Probabilities rounded to f16, as the CPU does.
    for (int j = threadIdx.x; j < nk; j += blockDim.x) sc[j] = h2f(f2h(sc[j] * inv));
    __syncthreads();
    const int hd32 = (hd + 31) & ~31;
    const int G = ATT2_THREADS / hd32;
    const int g = threadIdx.x / hd32, d = threadIdx.x - g * hd32;
    const u16* vbase = vc + (long long)lo * kvd + kh * hd;
    float acc = 0.f;
    if (g < G && d < hd) {
        float a[8];
#pragma unroll
        for (int k = 0; k < 8; k++) a[k] = 0.f;
        int j = g;
        for (; j + 7 * G < nk; j += 8 * G) {
#pragma unroll
            for (int k = 0; k < 8; k++)
                a[k] += sc[j + k * G] * h2f(vbase[(long long)(j + k * G) * kvd + d]);
        }
        for (; j < nk; j += G) a[0] += sc[j] * h2f(vbase[(long long)j * kvd + d]);
        acc = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x < hd) {
        float v = 0.f;
        for (int gg = 0; gg < G; gg++) v += part[gg * hd32 + threadIdx.x];
        out[(long long)t * qd + h * hd + threadIdx.x] = v;
    }
}

// Causal attention for prompts: one block of 256 threads per (head, tile of up to ATT_TQ
// consecutive rows of one sequence: rows tiles[y] .. tiles[y + 1]). Every K and V row the
// tile sees is read once for all its rows, staged through shared memory, instead of once per
// row as in attention_smem (which re-reads the whole visible cache for each of a prompt's
// rows). Per row the same steps as attention_smem: q rounded to f16, scores in f32, max and
// sum of exp over the row's keys, probabilities rounded to f16 times V (sums in another
// order). hd in {32, 64, 128, 256}; dynamic shared memory ATT_TQ x span floats, span = the
// most keys a tile's rows see together (both checked by the host).
#define ATT_TQ 16
#define ATT_TK 32
// A K or V tile (key rows kk = 0 .. jn, hd f16 each) moves global -> registers -> shared in
// two steps, so that the next tile's loads are in flight while the block computes on the
// current one (one load per thread and step used to wait out a round trip each, up to 8 per
// tile). Thread i holds 8-byte pieces i, i + 256, ... (AttTile::N of them: a 32 x 256 tile).
// kt's rows are padded to 129 words (lanes reading one word of 32 different rows hit 32
// banks), so the pieces go in as two words. hd % 4 == 0: the pieces are 8-byte aligned.
struct AttTile {
    enum { N = ATT_TK * 256 / 4 / 256 };
    uint2 v[N];
};
// f(k, kk, w2) for each of this thread's pieces k of a tile of jn rows: piece w2 of row kk.
template <class F> __device__ __forceinline__ void att_tile_pieces(int jn, int hd, F f) {
    const int hq = hd >> 2, total = jn * hq;
#pragma unroll
    for (int k = 0; k < AttTile::N; k++) {
        const int i = threadIdx.x + k * 256;
        if (i < total) {
            const int kk = i / hq;
            f(k, kk, i - kk * hq);
        }
    }
}
__device__ __forceinline__ void att_tile_fetch(AttTile& t, const u16* __restrict__ rows, int jn,
                                               int hd, int kvd) {
    att_tile_pieces(jn, hd, [&](int k, int kk, int w2) {
        t.v[k] = *(const uint2*)(rows + (long long)kk * kvd + 4 * w2);
    });
}
__device__ __forceinline__ void att_tile_store(u32 (*kt)[129], const AttTile& t, int jn, int hd) {
    att_tile_pieces(jn, hd, [&](int k, int kk, int w2) {
        kt[kk][2 * w2] = t.v[k].x;
        kt[kk][2 * w2 + 1] = t.v[k].y;
    });
}
// One step of a tile loop over keys j0 .. j0 + ATT_TK of rows (K or V of the tile's kv head):
// the fetched tile goes into kt once every thread is done with the previous one, then the
// next tile's loads go out (they arrive while the block computes on this one). Returns the
// keys in this tile.
__device__ __forceinline__ int att_tile_step(u32 (*kt)[129], AttTile& next,
                                             const u16* __restrict__ rows, int j0, int nkeys,
                                             int hd, int kvd) {
    const int jn = min(ATT_TK, nkeys - j0);
    __syncthreads();
    att_tile_store(kt, next, jn, hd);
    __syncthreads();
    if (j0 + ATT_TK < nkeys)
        att_tile_fetch(next, rows + (long long)(j0 + ATT_TK) * kvd,
                       min(ATT_TK, nkeys - j0 - ATT_TK), hd, kvd);
    return jn;
}
// The tile's q rows rounded to f16 (as the CPU rounds them), rows past the tile 0.
__device__ __forceinline__ void att_tile_load_q(float (*qs)[256], const float* __restrict__ q,
                                                int t0, int rows, int qd, int h, int hd) {
    for (int i = threadIdx.x; i < ATT_TQ * hd; i += blockDim.x) {
        const int r = i / hd, d = i - r * hd;
        qs[r][d] = r < rows ? h2f(f2h(q[(long long)(t0 + r) * qd + h * hd + d])) : 0.f;
    }
}
// Scores of the n keys at krows (their first tile already fetched into `next`) for the warp's
// rows r0 and r1, scaled, into sc[r * stride + key]: lane kk takes the tile's key kk. Keys
// outside a row's range are scored too (the callers mask them).
__device__ __forceinline__ void att_tile_scores(u32 (*kt)[129], AttTile& next,
                                                const u16* __restrict__ krows, int n,
                                                const float (*qs)[256], int r0, int rows,
                                                float* sc, int stride, float scale, int hd,
                                                int kvd) {
    const int lane = threadIdx.x & 31, hw = hd / 2, r1 = r0 + 1;
    for (int j0 = 0; j0 < n; j0 += ATT_TK) {
        const int jn = att_tile_step(kt, next, krows, j0, n, hd, kvd);
        if (lane < jn && r0 < rows) {
            float d0 = 0.f, d1 = 0.f;
            for (int w = 0; w < hw; w++) {
                const u32 kw = kt[lane][w];
                const float k0 = h2f((u16)(kw & 0xffff)), k1 = h2f((u16)(kw >> 16));
                d0 += qs[r0][2 * w] * k0 + qs[r0][2 * w + 1] * k1;
                d1 += qs[r1][2 * w] * k0 + qs[r1][2 * w + 1] * k1;
            }
            sc[r0 * stride + j0 + lane] = d0 * scale;
            if (r1 < rows) sc[r1 * stride + j0 + lane] = d1 * scale;
        }
    }
}
// The key range [lo, hi] (cache positions) of each of a tile's `tq` rows into rlo / rhi, rows
// past the tile's `rows` empty, and the tile's union [klo, khi]. The positions are uploaded
// before the pass's first launch: read before the dependent-launch wait.
__device__ __forceinline__ void att_tile_keys(const int* __restrict__ rowpos, int t0, int rows,
                                              int window, int tq, int* rlo, int* rhi, int& klo,
                                              int& khi) {
    if (threadIdx.x < tq) {
        int lo = 1 << 30, hi = -1;
        if (threadIdx.x < rows) {
            hi = rowpos[t0 + threadIdx.x];
            lo = window > 0 ? max(0, hi + 1 - window) : 0;
        }
        rlo[threadIdx.x] = lo;
        rhi[threadIdx.x] = hi;
    }
    __syncthreads();
    klo = 1 << 30;
    khi = -1;
    for (int r = 0; r < rows; r++) {
        klo = min(klo, rlo[r]);
        khi = max(khi, rhi[r]);
    }
}
extern "C" __global__ void __launch_bounds__(256)
    attention_tiled(const float* __restrict__ q, const u16* __restrict__ kc,
                    const u16* __restrict__ vc, float* __restrict__ out, int n_head, int group,
                    int hd, int kvd, const int* __restrict__ rowpos,
                    const int* __restrict__ rowbase, const int* __restrict__ tiles, int window,
                    float scale, int span) {
    extern __shared__ float sc[];
    __shared__ float qs[ATT_TQ][256];
    __shared__ u32 kt[ATT_TK][129];
    __shared__ int rlo[ATT_TQ], rhi[ATT_TQ];
    const int h = blockIdx.x, t0 = tiles[blockIdx.y], rows = tiles[blockIdx.y + 1] - t0;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int klo, khi;
    att_tile_keys(rowpos, t0, rows, window, ATT_TQ, rlo, rhi, klo, khi);
    const int kh = h / group, qd = n_head * hd;
    const long long base = ((long long)rowbase[t0] + klo) * kvd + kh * hd;
    const int nkeys = khi - klo + 1;
    pdl_enter();
    // The first K tile's loads go out together with q's.
    AttTile next;
    if (nkeys > 0) att_tile_fetch(next, kc + base, min(ATT_TK, nkeys), hd, kvd);
    att_tile_load_q(qs, q, t0, rows, qd, h, hd);
    // Scores: warp w takes rows 2w and 2w + 1; keys outside a row's range are zeroed below.
    const int r0 = 2 * warp, r1 = r0 + 1;
    att_tile_scores(kt, next, kc + base, nkeys, qs, r0, rows, sc, span, scale, hd, kvd);
    // The first V tile's loads go out now, to arrive during the softmax.
    if (nkeys > 0) att_tile_fetch(next, vc + base, min(ATT_TK, nkeys), hd, kvd);
    // Each warp's rows (scored by its own lanes): max and sum of exp over the row's own
    // keys, then f16 probabilities (0 for keys the row does not see: no mask in P.V).
    __syncwarp();
    for (int r = r0; r <= r1 && r < rows; r++) {
        float* srow = sc + r * span;
        const int a = rlo[r] - klo, b = rhi[r] - klo;
        float m = NEG_INF;
        for (int j = a + lane; j <= b; j += 32) m = fmaxf(m, srow[j]);
        m = warp_max(m);
        float l = 0.f;
        for (int j = a + lane; j <= b; j += 32) l += expf(srow[j] - m);
        l = warp_sum(l);
        const float inv = 1.f / l;
        for (int j = lane; j < nkeys; j += 32)
            srow[j] = j >= a && j <= b ? h2f(f2h(expf(srow[j] - m) * inv)) : 0.f;
    }
    // P.V: thread (g, d) owns dim d of rows g*rt .. +rt, adding keys in order.
    const int G = blockDim.x / hd, rt = ATT_TQ / G;
    const int g = tid / hd, d = tid - g * hd;
    float acc[ATT_TQ];
#pragma unroll
    for (int i = 0; i < ATT_TQ; i++) acc[i] = 0.f;
    for (int j0 = 0; j0 < nkeys; j0 += ATT_TK) {
        const int jn = att_tile_step(kt, next, vc + base, j0, nkeys, hd, kvd);
        const float* p = sc + (g * rt) * span + j0;
        for (int kk = 0; kk < jn; kk++) {
            const u32 vw = kt[kk][d >> 1];
            const float v = h2f((u16)((d & 1) ? (vw >> 16) : (vw & 0xffff)));
#pragma unroll
            for (int i = 0; i < ATT_TQ; i++)
                if (i < rt) acc[i] += p[i * span + kk] * v;
        }
    }
#pragma unroll
    for (int i = 0; i < ATT_TQ; i++) {
        const int r = g * rt + i;
        if (i < rt && r < rows) out[(long long)(t0 + r) * qd + h * hd + d] = acc[i];
    }
}

// Prompt attention of tiles whose keys do not fit attention_tiled's scores (`span` > the
// shared memory's keys for ATT_TQ rows: prompts past ~3k tokens, which took one block a row,
// ~0.08 s a 13B layer at 4k tokens): attention_tiled's tiles, K/V tile loads, scores and P.V,
// but over the keys in chunks of `chunk` with a running softmax. Each row keeps its maximum m
// and sum l (in its warp's registers); a chunk's probabilities are exp(s - m_new) rounded to
// f16, the row's P.V sums are scaled by exp(m_old - m_new) before the chunk is added, and the
// output is the sums divided by l at the end (the CPU normalises first: last-bit
// differences).
extern "C" __global__ void __launch_bounds__(256)
    attention_tiled_long(const float* __restrict__ q, const u16* __restrict__ kc,
                         const u16* __restrict__ vc, float* __restrict__ out, int n_head,
                         int group, int hd, int kvd, const int* __restrict__ rowpos,
                         const int* __restrict__ rowbase, const int* __restrict__ tiles,
                         int window, float scale, int chunk) {
    extern __shared__ float sc[];
    __shared__ float qs[ATT_TQ][256];
    __shared__ u32 kt[ATT_TK][129];
    __shared__ int rlo[ATT_TQ], rhi[ATT_TQ];
    __shared__ float rscale[ATT_TQ], rsum[ATT_TQ];
    const int h = blockIdx.x, t0 = tiles[blockIdx.y], rows = tiles[blockIdx.y + 1] - t0;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    if (tid < ATT_TQ) {
        rscale[tid] = 1.f;
        rsum[tid] = 1.f;
    }
    int klo, khi;
    att_tile_keys(rowpos, t0, rows, window, ATT_TQ, rlo, rhi, klo, khi);
    const int kh = h / group, qd = n_head * hd;
    const long long base = ((long long)rowbase[t0] + klo) * kvd + kh * hd;
    const int nkeys = khi - klo + 1;
    pdl_enter();
    AttTile next;
    att_tile_load_q(qs, q, t0, rows, qd, h, hd);
    const int r0 = 2 * warp, r1 = r0 + 1;
    // The warp's rows' running maximum and sum (the same in every lane).
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    const int G = blockDim.x / hd, rt = ATT_TQ / G;
    const int g = tid / hd, d = tid - g * hd;
    const int mine = max(0, min(rt, rows - g * rt));
    float acc[ATT_TQ];
#pragma unroll
    for (int i = 0; i < ATT_TQ; i++) acc[i] = 0.f;
    for (int c0 = 0; c0 < nkeys; c0 += chunk) {
        const int cn = min(chunk, nkeys - c0);
        const long long cb = base + (long long)c0 * kvd;
        att_tile_fetch(next, kc + cb, min(ATT_TK, cn), hd, kvd);
        att_tile_scores(kt, next, kc + cb, cn, qs, r0, rows, sc, chunk, scale, hd, kvd);
        att_tile_fetch(next, vc + cb, min(ATT_TK, cn), hd, kvd);
        __syncwarp();
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const int r = r0 + k;
            if (r >= rows) break;
            float* srow = sc + r * chunk;
            // The row's keys in this chunk: [a, b] (empty when b < a).
            const int a = max(0, rlo[r] - klo - c0), b = min(cn - 1, rhi[r] - klo - c0);
            float mc = NEG_INF;
            for (int j = a + lane; j <= b; j += 32) mc = fmaxf(mc, srow[j]);
            mc = warp_max(mc);
            const float mn = fmaxf(m[k], mc);
            // (Nothing seen yet: the sums are 0 and any factor leaves them so.)
            const float alpha = m[k] == NEG_INF ? 1.f : expf(m[k] - mn);
            float ls = 0.f;
            for (int j = lane; j < cn; j += 32) {
                const float pj = j >= a && j <= b ? h2f(f2h(expf(srow[j] - mn))) : 0.f;
                srow[j] = pj;
                ls += pj;
            }
            ls = warp_sum(ls);
            l[k] = l[k] * alpha + ls;
            m[k] = mn;
            if (lane == 0) rscale[r] = alpha;
        }
        // P.V of the chunk, the row's sums first scaled to its new maximum (att_tile_step's
        // barrier makes the probabilities and factors visible).
        for (int j0 = 0; j0 < cn; j0 += ATT_TK) {
            const int jn = att_tile_step(kt, next, vc + cb, j0, cn, hd, kvd);
            if (j0 == 0) {
#pragma unroll
                for (int i = 0; i < ATT_TQ; i++)
                    if (i < mine) acc[i] *= rscale[g * rt + i];
            }
            const float* p = sc + (g * rt) * chunk + j0;
            for (int kk = 0; kk < jn; kk++) {
                const u32 vw = kt[kk][d >> 1];
                const float v = h2f((u16)((d & 1) ? (vw >> 16) : (vw & 0xffff)));
#pragma unroll
                for (int i = 0; i < ATT_TQ; i++)
                    if (i < mine) acc[i] += p[i * chunk + kk] * v;
            }
        }
    }
    if (lane == 0) {
        if (r0 < rows) rsum[r0] = l[0];
        if (r1 < rows) rsum[r1] = l[1];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < ATT_TQ; i++) {
        const int r = g * rt + i;
        if (i < mine) out[(long long)(t0 + r) * qd + h * hd + d] = acc[i] / rsum[r];
    }
}

// Q8_0 quantization of activations, as the CPU's quantize_q8_0 (see act_q8_0).
// One warp's block `blk`, lane = element with value v (the norm and the GLU quantise the
// values they computed the same way: the same bits).
__device__ __forceinline__ void q8_0_block(float v, i8* __restrict__ xq, float* __restrict__ xd,
                                           int* __restrict__ xs, long long blk, int lane) {
    const float amax = warp_max(fabsf(v));
    const float d = amax / 127.f;
    const float id = amax != 0.f ? 127.f / amax : 0.f;
    const int q = (int)rintf(v * id);
    xq[blk * 32 + lane] = (i8)q;
    int sum = q;  // shuffles, not __reduce_add_sync: that needs sm_80
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    if (lane == 0) {
        xd[blk] = h2f(f2h(d));
        xs[blk] = __float_as_int(h2f(f2h((float)sum * d)));
    }
}
// Q8_0 of 8 consecutive values a lane, four lanes a block (lane l: elements 8l .. 8l + 7 of
// the warp's 256, block b0 + l / 4): act_q8_0's arithmetic (the maximum and the integer sum
// are exact in any order), for the decode attention's outputs. Every lane takes part in the
// shuffles; only lanes with `keep` store.
__device__ __forceinline__ void q8_0_vals(const float (&v)[8], i8* __restrict__ xq,
                                          float* __restrict__ xd, int* __restrict__ xs,
                                          long long b0, int lane, bool keep) {
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 8; i++) amax = fmaxf(amax, fabsf(v[i]));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, 2));
    const float d = amax / 127.f;
    const float id = amax != 0.f ? 127.f / amax : 0.f;
    int sum = 0;
    unsigned int w[2] = {0u, 0u};
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int q = (int)rintf(v[i] * id);
        sum += q;
        w[i >> 2] |= (unsigned int)(q & 0xff) << (8 * (i & 3));
    }
    sum += __shfl_xor_sync(0xffffffff, sum, 1);
    sum += __shfl_xor_sync(0xffffffff, sum, 2);
    if (!keep) return;
    const long long blk = b0 + (lane >> 2);
    *(uint2*)(xq + blk * 32 + (lane & 3) * 8) = make_uint2(w[0], w[1]);
    if ((lane & 3) == 0) {
        xd[blk] = h2f(f2h(d));
        xs[blk] = __float_as_int(h2f(f2h((float)sum * d)));
    }
}

// Q8_K quantization of activations, as the CPU's quantize_q8_k: per 256-element block the
// element of largest magnitude (first on ties) gives iscale = -127/max, q = min(127,
// rint(iscale*x)), d = 1/iscale. Lane owns elements 8*lane .. 8*lane+7; output layout: see
// the mat-vec section below.
// One warp quantizes block `blk` (256 values from x + 256*blk). x is read with plain loads
// (rms_norm_q8k calls this on values its own block has just written), or from L2 with
// FROM_L2 (values other blocks of the same launch wrote).
// q8k_vals: the same from the lane's 8 values (elements 8 * lane ..) already in registers.
__device__ __forceinline__ void q8k_vals(const float (&v)[8], i8* __restrict__ xq,
                                         float* __restrict__ xd, int* __restrict__ xs,
                                         long long blk, int lane);
template <bool FROM_L2 = false>
__device__ __forceinline__ void q8k_block(const float* x, i8* __restrict__ xq,
                                          float* __restrict__ xd, int* __restrict__ xs,
                                          long long blk, int lane) {
    const float* xb = x + blk * 256 + lane * 8;
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = FROM_L2 ? __ldcg(xb + i) : xb[i];
    q8k_vals(v, xq, xd, xs, blk, lane);
}
__device__ __forceinline__ void q8k_vals(const float (&v)[8], i8* __restrict__ xq,
                                         float* __restrict__ xd, int* __restrict__ xs,
                                         long long blk, int lane) {
    float amax = 0.f, mx = 0.f;
    int first = 1 << 30;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        // Strict '>' keeps the first of equal magnitudes within the lane (elements ascend).
        if (fabsf(v[i]) > amax) { amax = fabsf(v[i]); mx = v[i]; first = lane * 8 + i; }
    }
    warp_argmax_abs(amax, mx, first);
    u32 packed[2] = {0u, 0u};
    int sum = 0;
    float d = 0.f;
    if (amax != 0.f) {
        const float iscale = -127.f / mx;
        d = 1.f / iscale;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int q = (int)fminf(127.f, rintf(iscale * v[i]));
            sum += q;
            packed[i >> 2] |= ((u32)q & 0xffu) << (8 * (i & 3));
        }
    }
    // Elements 8*lane .. +8: j = lane >> 3, s = (lane >> 2) & 1, h = (lane >> 1) & 1, then the
    // lane's half of the 16 (see the scratch layout in the mat-vec section below).
    const int st =
        128 * ((lane >> 2) & 1) + 32 * (lane >> 3) + 16 * ((lane >> 1) & 1) + 8 * (lane & 1);
    *(uint2*)(xq + blk * 256 + st) = make_uint2(packed[0], packed[1]);
    // Sums of 16: lanes 2g and 2g+1 hold group g, stored at g with bits 0 and 1 swapped.
    sum += __shfl_xor_sync(0xffffffff, sum, 1);
    const int g = lane >> 1;
    if ((lane & 1) == 0) xs[blk * 16 + ((g & 12) | ((g & 1) << 1) | ((g >> 1) & 1))] = sum;
    if (lane == 0) xd[blk] = d;
}

// Decode attention split over the keys ("flash decoding"), for few rows: one block of 128
// threads per (head, row, chunk of ATT_CHUNK keys), so a 500-key context keeps ~10x more SMs
// busy than one block per (head, row). Two launches keep the CPU's arithmetic (scores,
// global max, probabilities rounded to f16, P.V) and a fixed summation order (atomics only
// count, never sum: results do not change from run to run); attn_split_fused* below do the
// same in one launch where the device holds the whole grid:
//   attn_split_scores: scores of the chunk (16-byte K loads), the chunk's max and sum of exp;
//   attn_split_pv:     global max and sum from all chunks' stats, f16 probabilities, the
//                      chunk's partial P.V; the last chunk block of a (row, head) to finish
//                      (a counter in `done`, left at 0 again for the next launch) adds the
//                      partials of the chunks in chunk order.
// hd % 4 == 0 and hd <= 256 (checked by the host). Scratch strides: `maxk` keys and `maxc`
// chunks per (row, head).
#define ATT_CHUNK 64
__device__ __forceinline__ void att_window(const int* rowpos, int t, int window, int* lo, int* nk) {
    const int pos = rowpos[t];
    *lo = window > 0 ? max(0, pos + 1 - window) : 0;
    *nk = pos + 1 - *lo;
}
__device__ __forceinline__ float4 h4f(uint2 raw) {
    return make_float4(h2f((u16)(raw.x & 0xffff)), h2f((u16)(raw.x >> 16)),
                       h2f((u16)(raw.y & 0xffff)), h2f((u16)(raw.y >> 16)));
}

// Pull `len` cache rows (hd f16 each, kvd apart) toward L2, one 128-byte line per thread and
// step. Called before pdl_enter: the rows were written at least one launch earlier (or by
// the launch just before, still running), and a prefetch into L2, the coherent level, only
// brings lines closer: the loads after the wait still see every write.
__device__ __forceinline__ void prefetch_rows(const u16* rows, int len, int kvd, int hd) {
    const int lines = (hd * 2 + 127) / 128;
    for (int i = threadIdx.x; i < len * lines; i += blockDim.x)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(rows + (long long)(i / lines) * kvd +
                                                      (i % lines) * 64));
}

// The split kernels read the rows' positions before pdl_enter: they were uploaded before
// this token's first launch (a copy the stream finishes before any later kernel starts).
// Each block handles chunk c of the keys of head h of row t: keys j0 .. j0 + len of the
// window [lo, lo + nk) of its sequence's cache rows.
struct AttChunk {
    int h, t, c, lo, nk, j0, len, nch;
};
// Chunk c of this block's (head, row), or false if it lies past the row's keys.
__device__ __forceinline__ bool att_chunk(const int* rowpos, int window, int c, AttChunk& a) {
    a.h = blockIdx.x;
    a.t = blockIdx.y;
    a.c = c;
    att_window(rowpos, a.t, window, &a.lo, &a.nk);
    a.j0 = a.c * ATT_CHUNK;
    a.len = min(ATT_CHUNK, a.nk - a.j0);
    a.nch = (a.nk + ATT_CHUNK - 1) / ATT_CHUNK;
    return a.j0 < a.nk;
}
// The chunk's first cache row of the head's kv head (K or V array at `cache`).
__device__ __forceinline__ const u16* att_rows(const u16* cache, const int* rowbase,
                                               const AttChunk& a, int group, int hd, int kvd) {
    return cache + ((long long)rowbase[a.t] + a.lo + a.j0) * kvd + (a.h / group) * hd;
}

// The block's chunk (false: past its row's keys) and the chunk's K rows (kc non-null) and V
// rows (vc non-null), prefetched into L2; then the dependent-launch wait.
__device__ __forceinline__ bool att_begin(const int* rowpos, const int* rowbase, int window,
                                          int group, int hd, int kvd, const u16* kc,
                                          const u16* vc, AttChunk& a, const u16*& kb,
                                          const u16*& vb) {
    if (!att_chunk(rowpos, window, blockIdx.z, a)) return false;
    if (kc) {
        kb = att_rows(kc, rowbase, a, group, hd, kvd);
        prefetch_rows(kb, a.len, kvd, hd);
    }
    if (vc) {
        vb = att_rows(vc, rowbase, a, group, hd, kvd);
        prefetch_rows(vb, a.len, kvd, hd);
    }
    pdl_enter();
    return true;
}

// The chunk's max and sum of exp, where the P.V side reads them (att_total).
__device__ __forceinline__ void att_publish(float* stats, long long th, int maxc,
                                            const AttChunk& a, float m, float l) {
    float* st = stats + (th * maxc + a.c) * 2;
    st[0] = m;
    st[1] = l;
}

// A 4-warp block's max (m) and sum of exp(score - m) (l) of the scores sm[0 .. len), the same
// in every thread (red: 4 floats of scratch). Every thread of the block calls it.
__device__ __forceinline__ void att_block_stats(const float* sm, int len, float* red, float& m,
                                                float& l) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    m = NEG_INF;
    for (int j = threadIdx.x; j < len; j += blockDim.x) m = fmaxf(m, sm[j]);
    m = warp_max(m);
    if (lane == 0) red[warp] = m;
    __syncthreads();
    m = fmaxf(fmaxf(red[0], red[1]), fmaxf(red[2], red[3]));
    __syncthreads();
    l = 0.f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) l += expf(sm[j] - m);
    l = warp_sum(l);
    if (lane == 0) red[warp] = l;
    __syncthreads();
    l = (red[0] + red[1]) + (red[2] + red[3]);
}

// Scores of the chunk's keys (scaled) into sm[0 .. len); returns the chunk's max (m) and sum of
// exp(score - m) (l), the same in every thread. Each warp scores its ATT_CHUNK / 4 keys with
// all their loads in flight at once (a decode step is latency-bound here); lane l reads dims
// 4l..4l+3 (+128, ...) of q and of the keys. q is rounded to f16, as the CPU's dot with the
// f16 cache does.
__device__ __forceinline__ void att_chunk_scores(const float* __restrict__ qrow,
                                                 const u16* __restrict__ kb, int kvd, int hd,
                                                 int len, float scale, float* sm, float* red,
                                                 float& m, float& l) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    {
        constexpr int KW = ATT_CHUNK / 4;
        const int jj = warp * KW;
        float dot[KW];
#pragma unroll
        for (int k = 0; k < KW; k++) dot[k] = 0.f;
        for (int d = lane * 4; d < hd; d += 128) {
            const float4 q4 = *(const float4*)(qrow + d);
            const float4 qv = make_float4(h2f(f2h(q4.x)), h2f(f2h(q4.y)), h2f(f2h(q4.z)),
                                          h2f(f2h(q4.w)));
            uint2 raw[KW];
            // Keys past the chunk re-read its last key (no branch; their scores are dropped).
#pragma unroll
            for (int k = 0; k < KW; k++)
                raw[k] = *(const uint2*)(kb + (long long)min(jj + k, len - 1) * kvd + d);
#pragma unroll
            for (int k = 0; k < KW; k++) {
                const float4 kv = h4f(raw[k]);
                dot[k] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
            }
        }
#pragma unroll
        for (int k = 0; k < KW; k++) {
            const float v = warp_sum(dot[k]);
            if (lane == 0 && jj + k < len) sm[jj + k] = v * scale;
        }
    }
    __syncthreads();
    att_block_stats(sm, len, red, m, l);
}

// The chunks' stats of one (row, head) at st (max, sum of exp per chunk), combined in chunk
// order (every block the same): the global max and the total. L2 loads: other blocks of
// this launch may have written them. Unrolled so that the loads go out together.
__device__ __forceinline__ void att_total(const float* st, int nch, float& m, float& tot) {
    m = NEG_INF;
#pragma unroll 8
    for (int i = 0; i < nch; i++) m = fmaxf(m, __ldcg(st + 2 * i));
    tot = 0.f;
#pragma unroll 8
    for (int i = 0; i < nch; i++) tot += __ldcg(st + 2 * i + 1) * expf(__ldcg(st + 2 * i) - m);
}

// a += p * v, per component (the P.V step of the decode attentions).
__device__ __forceinline__ void att_axpy(float4& a, float p, const float4 v) {
    a.x += p * v.x;
    a.y += p * v.y;
    a.z += p * v.z;
    a.w += p * v.w;
}
// Thread i < q4 of a P.V block whose G groups of q4 threads left their sums in acc4: the sum of
// dims 4i .. 4i + 3 over the groups, in group order.
__device__ __forceinline__ float4 att_groups_sum(const float4* acc4, int q4, int G) {
    float4 sum = acc4[threadIdx.x];
    for (int gg = 1; gg < G; gg++) {
        const float4 o = acc4[gg * q4 + threadIdx.x];
        sum.x += o.x;
        sum.y += o.y;
        sum.z += o.z;
        sum.w += o.w;
    }
    return sum;
}

// Head th's output (hd values at out + th * hd) is written, by every thread of the block
// before the call: count the head in its 256-block (the counter at counters[block], left at 0
// again); the block of the 256-block's last head to count quantises it to Q8_K. Every
// thread of the block calls it.
__device__ __forceinline__ void att_q8k_last_head(const float* out, i8* __restrict__ xq,
                                                  float* __restrict__ xd, int* __restrict__ xs,
                                                  int* counters, long long th, int hd) {
    __shared__ int last_head;
    __threadfence();
    __syncthreads();
    const long long qblk = th * hd / 256;
    if (threadIdx.x == 0) {
        int* cnt = counters + qblk;
        last_head = atomicAdd(cnt, 1) == 256 / hd - 1;
        if (last_head) *cnt = 0;
    }
    __syncthreads();
    if (last_head && threadIdx.x < 32) {
        __threadfence();
        q8k_block<true>(out, xq, xd, xs, qblk, threadIdx.x);
    }
}

// The chunk's probabilities (scores s[0 .. len), rounded to f16 as the CPU does) times its V
// rows into part; the last chunk block of the (row, head) to finish (a counter in `done`,
// left at 0 again) adds all chunks' partials in chunk order into out and, with xq, quantises
// each 256-block of the output to Q8_K once its last head is written (a second counter per
// 256-block, after the (row, head) ones). Returns whether this block was that last one.
__device__ __forceinline__ bool att_chunk_pv(const float* s, float m, float tot,
                                             const u16* __restrict__ vrows, int kvd, int hd,
                                             int n_head, int maxc, const AttChunk& a,
                                             float* part, float* __restrict__ out, int* done,
                                             i8* __restrict__ xq, float* __restrict__ xd,
                                             int* __restrict__ xs) {
    __shared__ float p[ATT_CHUNK];
    __shared__ float4 acc4[128];
    __shared__ int last;
    const float inv = 1.f / tot;
    for (int j = threadIdx.x; j < a.len; j += blockDim.x) p[j] = h2f(f2h(expf(s[j] - m) * inv));
    __syncthreads();
    // Thread i: dims 4*(i % q4)..+3 of keys i / q4, + G, + 2G, ... (q4 = hd/4, G = 128/q4).
    const int q4 = hd >> 2;
    const int G = 128 / q4;
    const int g = threadIdx.x / q4, d = (threadIdx.x - g * q4) * 4;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (g < G) {
        const u16* vb = vrows + d;
        // Keys g, g + G, ... in order; the loads of 8 of them in flight before their sums.
        for (int j8 = g; j8 < a.len; j8 += 8 * G) {
            uint2 raw[8];
#pragma unroll
            for (int k = 0; k < 8; k++)
                raw[k] = *(const uint2*)(vb + (long long)min(j8 + k * G, a.len - 1) * kvd);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                if (j8 + k * G < a.len) att_axpy(acc, p[j8 + k * G], h4f(raw[k]));
            }
        }
    }
    acc4[threadIdx.x] = acc;
    __syncthreads();
    // Group 0 adds the other groups' sums in group order.
    const long long th = (long long)a.t * n_head + a.h;
    if (threadIdx.x < q4 && g == 0) {
        const float4 sum = att_groups_sum(acc4, q4, G);
        float* dst = part + (th * maxc + a.c) * hd + 4 * threadIdx.x;
        dst[0] = sum.x;
        dst[1] = sum.y;
        dst[2] = sum.z;
        dst[3] = sum.w;
    }
    // Publish the partial, then count the chunk; the block that counts last adds them all.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int* cnt = done + th;
        last = atomicAdd(cnt, 1) == a.nch - 1;
        if (last) *cnt = 0;
    }
    __syncthreads();
    if (!last) return false;
    __threadfence();
    const float* src = part + th * maxc * hd;
    for (int dd = threadIdx.x; dd < hd; dd += blockDim.x) {
        float v = 0.f;
        // L2 loads: other blocks wrote these; this SM's L1 must not answer.
#pragma unroll 8
        for (int i = 0; i < a.nch; i++) v += __ldcg(src + (long long)i * hd + dd);
        out[th * hd + dd] = v;
    }
    if (xq != nullptr)
        att_q8k_last_head(out, xq, xd, xs, done + (long long)gridDim.y * n_head, th, hd);
    return true;
}

extern "C" __global__ void __launch_bounds__(128)
    attn_split_scores(const float* __restrict__ q, const u16* __restrict__ kc,
                      float* __restrict__ scores, float* __restrict__ stats, int n_head,
                      int group, int hd, int kvd, const int* __restrict__ rowpos,
                      const int* __restrict__ rowbase, int window, float scale, int maxk,
                      int maxc) {
    __shared__ float sm[ATT_CHUNK];
    __shared__ float red[4];
    AttChunk a;
    const u16 *kb = nullptr, *vb = nullptr;
    if (!att_begin(rowpos, rowbase, window, group, hd, kvd, kc, nullptr, a, kb, vb)) return;
    const long long th = (long long)a.t * n_head + a.h;
    float m, l;
    att_chunk_scores(q + th * hd, kb, kvd, hd, a.len, scale, sm, red, m, l);
    float* srow = scores + th * maxk + a.j0;
    for (int j = threadIdx.x; j < a.len; j += blockDim.x) srow[j] = sm[j];
    if (threadIdx.x == 0) att_publish(stats, th, maxc, a, m, l);
}

// xq/xd/xs: null, or the Q8_K scratch of the int8 mat-vec the output feeds (256 % hd == 0
// and whole 256-blocks per row, checked by the host; see att_chunk_pv).
extern "C" __global__ void __launch_bounds__(128)
    attn_split_pv(const u16* __restrict__ vc, const float* __restrict__ scores,
                  const float* __restrict__ stats, float* part, int n_head, int group, int hd,
                  int kvd, const int* __restrict__ rowpos, const int* __restrict__ rowbase,
                  int window, int maxk, int maxc, float* __restrict__ out, int* done,
                  i8* __restrict__ xq, float* __restrict__ xd, int* __restrict__ xs) {
    AttChunk a;
    const u16 *kb = nullptr, *vrows = nullptr;
    if (!att_begin(rowpos, rowbase, window, group, hd, kvd, nullptr, vc, a, kb, vrows)) return;
    const long long th = (long long)a.t * n_head + a.h;
    float m, tot;
    att_total(stats + th * maxc * 2, a.nch, m, tot);
    att_chunk_pv(scores + th * maxk + a.j0, m, tot, vrows, kvd, hd, n_head, maxc, a, part, out,
                 done, xq, xd, xs);
}

// Both halves in one launch, for grids the device holds at once (the host checks the block
// count against the occupancy): each block takes `cpb` consecutive chunks of its (row, head)
// (at most ATT_MAX_CPB; more chunks per block fit longer contexts into the grid), scores
// them, publishes their stats and counts them in `arrived` (one counter per (row, head)),
// waits until every chunk of its (row, head) is counted, then computes each chunk's P.V from
// the scores it kept in shared memory, as attn_split_pv would (the same arithmetic, so the
// same bits). The block that adds the partials resets the (row, head)'s counter: every block
// of it has passed the wait by then. The wait is bounded: past ~1 s it traps (a launch
// error) instead of hanging.
#define ATT_MAX_CPB 8
#define ATT_FUSED_ARGS                                                                          \
    const float* __restrict__ q, const u16* __restrict__ kc, const u16* __restrict__ vc,       \
        float* __restrict__ stats, float* part, int n_head, int group, int hd, int kvd,        \
        const int* __restrict__ rowpos, const int* __restrict__ rowbase, int window,           \
        float scale, int maxc, int cpb, float* __restrict__ out, int* done, int* arrived,      \
        i8* __restrict__ xq, float* __restrict__ xd, int* __restrict__ xs
// CPB: the most chunks per block this instance takes (cpb <= CPB).
template <int CPB> __device__ __forceinline__ void att_fused(ATT_FUSED_ARGS) {
    __shared__ float sm[CPB][ATT_CHUNK];
    __shared__ float red[4];
    const int c0 = blockIdx.z * cpb;
    AttChunk a;
    if (!att_chunk(rowpos, window, c0, a)) return;
    const int mine = min(min(cpb, CPB), a.nch - c0);
    for (int i = 0; i < CPB && i < mine; i++) {
        att_chunk(rowpos, window, c0 + i, a);
        prefetch_rows(att_rows(kc, rowbase, a, group, hd, kvd), a.len, kvd, hd);
        prefetch_rows(att_rows(vc, rowbase, a, group, hd, kvd), a.len, kvd, hd);
    }
    pdl_enter();
    const long long th = (long long)a.t * n_head + a.h;
    float m, l;
    for (int i = 0; i < CPB && i < mine; i++) {
        att_chunk(rowpos, window, c0 + i, a);
        const u16* kb = att_rows(kc, rowbase, a, group, hd, kvd);
        att_chunk_scores(q + th * hd, kb, kvd, hd, a.len, scale, sm[i], red, m, l);
        if (threadIdx.x == 0) att_publish(stats, th, maxc, a, m, l);
    }
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(arrived + th, mine);
        for (long long spin = 0; atomicAdd(arrived + th, 0) < a.nch; spin++) {
            if (spin > (1ll << 24)) asm volatile("trap;");
#if __CUDA_ARCH__ >= 700
            __nanosleep(64);
#endif
        }
        __threadfence();
    }
    __syncthreads();
    float tot;
    att_total(stats + th * maxc * 2, a.nch, m, tot);
    bool added = false;
    for (int i = 0; i < CPB && i < mine; i++) {
        att_chunk(rowpos, window, c0 + i, a);
        const u16* vrows = att_rows(vc, rowbase, a, group, hd, kvd);
        added |= att_chunk_pv(sm[i], m, tot, vrows, kvd, hd, n_head, maxc, a, part, out, done,
                              xq, xd, xs);
    }
    if (added && threadIdx.x == 0) arrived[th] = 0;
}
// One chunk per block (cpb = 1; fewer registers, more blocks resident), and up to
// ATT_MAX_CPB for contexts whose one-chunk grid the device cannot hold.
extern "C" __global__ void __launch_bounds__(128) attn_split_fused(ATT_FUSED_ARGS) {
    att_fused<1>(q, kc, vc, stats, part, n_head, group, hd, kvd, rowpos, rowbase, window, scale,
                 maxc, cpb, out, done, arrived, xq, xd, xs);
}
extern "C" __global__ void __launch_bounds__(128, 6) attn_split_fused8(ATT_FUSED_ARGS) {
    att_fused<ATT_MAX_CPB>(q, kc, vc, stats, part, n_head, group, hd, kvd, rowpos, rowbase,
                           window, scale, maxc, cpb, out, done, arrived, xq, xd, xs);
}

// Lane `sub` (of LK = hd / 32 a key) of q's 16-byte chunks sub, sub + LK, sub + 2 LK, sub + 3 LK
// (8 dims each), rounded to f16 as the CPU's dot with the f16 cache does.
__device__ __forceinline__ void atc_q(const float* qsrc, int sub, int LK, float (&qd)[32]) {
#pragma unroll
    for (int c = 0; c < 4; c++)
#pragma unroll
        for (int i = 0; i < 8; i++) qd[8 * c + i] = h2f(f2h(qsrc[(sub + c * LK) * 8 + i]));
}
// The lane's part of a key's dot with q (w: its four 8-dim chunks of the f16 row), the LK
// partial sums added by xor-shuffles (every lane of the key gets the dot).
__device__ __forceinline__ float atc_dot(const uint4 (&w)[4], const float (&qd)[32], int LK) {
    float dc[4];
#pragma unroll
    for (int c = 0; c < 4; c++) {
        const float4 k0 = h4f(make_uint2(w[c].x, w[c].y)), k1 = h4f(make_uint2(w[c].z, w[c].w));
        const float* qc = qd + 8 * c;
        dc[c] = qc[0] * k0.x + qc[1] * k0.y + qc[2] * k0.z + qc[3] * k0.w + qc[4] * k1.x +
                qc[5] * k1.y + qc[6] * k1.z + qc[7] * k1.w;
    }
    float acc = (dc[0] + dc[1]) + (dc[2] + dc[3]);
    for (int o = 1; o < LK; o <<= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
    return acc;
}
// A key's score times `scale` (every lane of the key's LK gets it): lane `sub` takes its four
// 8-dim chunks of the f16 row kr.
__device__ __forceinline__ float atc_score(const u16* kr, const float (&qd)[32], int sub, int LK,
                                           float scale) {
    uint4 w[4];
#pragma unroll
    for (int c = 0; c < 4; c++) w[c] = *(const uint4*)(kr + (sub + c * LK) * 8);
    return atc_dot(w, qd, LK) * scale;
}
// Decode attention of a batch of rows that fills the device (`attn_rows`; the host takes it
// where rows x heads make two blocks an SM, at any length): one block per (head, row) over
// all of the row's keys, so no block waits for another and no scores, stats or
// partials go through global memory (the split kernels above read K and V in chunks of 64
// keys, ~20 blocks a (row, head) at 1k keys, each with its own set-up, block reductions and
// counters: a 13b's 32-row served step at ~900 keys spent 9.6 of its 20 ms there, ~0.6 of
// its K/V bytes' floor; docs/BENCHMARKS.md). The same arithmetic as the split kernels (q
// rounded to f16, scores in f32, the global max and sum of exp, probabilities rounded to f16,
// P.V in f32) in a fixed order, so results do not change from run to run. Scores: LK = hd / 32
// lanes a key (atc_score's layout), ARW_U rounds of the block's keys with their 16-byte loads
// in flight together; P.V: thread i takes dims 4 (i % q4) .. + 3 of keys i / q4, + G, ...,
// ARW_V keys' loads in flight. The scores live in dynamic shared memory (4 bytes a key; the
// host bounds the keys). With xq, the output's 256-blocks are quantised to Q8_K by the last
// head of each to finish (a counter per 256-block in `done`, left at 0 again), as
// att_chunk_pv does. hd 64, 128 or 256 (host-checked).
#define ARW_U 4
#define ARW_V 16
extern "C" __global__ void __launch_bounds__(128)
    attn_rows(const float* __restrict__ q, const u16* __restrict__ kc,
              const u16* __restrict__ vc, int n_head, int group, int hd, int kvd,
              const int* __restrict__ rowpos, const int* __restrict__ rowbase, int window,
              float scale, float* __restrict__ out, int* done, i8* __restrict__ xq,
              float* __restrict__ xd, int* __restrict__ xs) {
    extern __shared__ float arw_sc[];
    __shared__ float red[4];
    __shared__ float4 acc4[128];
    const int h = blockIdx.x, t = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int lo, nk;
    att_window(rowpos, t, window, &lo, &nk);
    const long long r0 = (long long)rowbase[t] + lo;
    const u16* kb = kc + r0 * kvd + (h / group) * hd;
    const u16* vb = vc + r0 * kvd + (h / group) * hd;
    // The first keys toward L2 while the previous kernel ends (rows of earlier tokens; the
    // newest, stored by the launch just before, is read only after the wait).
    prefetch_rows(kb, min(nk, ATT_CHUNK), kvd, hd);
    pdl_enter();
    const long long th = (long long)t * n_head + h;
    // Scores: each warp kpw keys a round, lane `sub` of key `kl` its four 8-dim chunks.
    const int LK = hd >> 5, sub = lane % LK, kl = lane / LK, kpw = 32 / LK;
    float qd[32];
    atc_q(q + th * hd, sub, LK, qd);
    // The loop runs alike in every lane of a warp (the shuffles need them all): j0 is the
    // warp's first key of the round, lane kl's key j0 + kl.
    const int step = 4 * kpw;
    for (int j0 = warp * kpw; j0 < nk; j0 += ARW_U * step) {
        uint4 w[ARW_U][4];
        // Keys past the row re-read its last key (no branch; their scores are dropped).
#pragma unroll
        for (int u = 0; u < ARW_U; u++) {
            const u16* kr = kb + (long long)min(j0 + kl + u * step, nk - 1) * kvd;
#pragma unroll
            for (int c = 0; c < 4; c++) w[u][c] = *(const uint4*)(kr + (sub + c * LK) * 8);
        }
#pragma unroll
        for (int u = 0; u < ARW_U; u++) {
            const float s = atc_dot(w[u], qd, LK) * scale;
            const int key = j0 + kl + u * step;
            if (sub == 0 && key < nk) arw_sc[key] = s;
        }
    }
    __syncthreads();
    float m, tot;
    att_block_stats(arw_sc, nk, red, m, tot);
    const float inv = 1.f / tot;
    for (int j = threadIdx.x; j < nk; j += blockDim.x)
        arw_sc[j] = h2f(f2h(expf(arw_sc[j] - m) * inv));
    __syncthreads();
    // P.V, keys g, g + G, ... in order, ARW_V loads in flight; four sums (key k of a round
    // into sum k % 4), added at the end.
    const int q4 = hd >> 2, G = 128 / q4, g = threadIdx.x / q4, d4 = (threadIdx.x - g * q4) * 4;
    float4 a[4];
#pragma unroll
    for (int i = 0; i < 4; i++) a[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int j = g; j < nk; j += ARW_V * G) {
        uint2 raw[ARW_V];
#pragma unroll
        for (int k = 0; k < ARW_V; k++)
            raw[k] = *(const uint2*)(vb + (long long)min(j + k * G, nk - 1) * kvd + d4);
#pragma unroll
        for (int k = 0; k < ARW_V; k++)
            if (j + k * G < nk) att_axpy(a[k & 3], arw_sc[j + k * G], h4f(raw[k]));
    }
    float4 sum = a[0];
#pragma unroll
    for (int i = 1; i < 4; i++) {
        sum.x += a[i].x;
        sum.y += a[i].y;
        sum.z += a[i].z;
        sum.w += a[i].w;
    }
    acc4[threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.x < q4) {
        const float4 o = att_groups_sum(acc4, q4, G);
        float* dst = out + th * hd + 4 * threadIdx.x;
        dst[0] = o.x;
        dst[1] = o.y;
        dst[2] = o.z;
        dst[3] = o.w;
    }
    if (xq != nullptr) att_q8k_last_head(out, xq, xd, xs, done, th, hd);
}

// RoPE of q and k as rope_qk, and the rotated k and the v of each row stored into the f16
// cache as kv_store does, in one launch (decode: saves a launch per layer; the same values).
// Threads: q's pairs | k's pairs (rotated, written back and stored) | k's unrotated dims
// (nd < hd) | v's elements. Row t goes to cache row kvrow[t].
extern "C" __global__ void rope_kv(float* q, float* k, const float* __restrict__ v,
                                   u16* __restrict__ kc, u16* __restrict__ vc, int n, int nq,
                                   int nk, int hd, int nd, const int* rowpos, float theta_scale,
                                   int neox, const int* __restrict__ kvrow) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int half = nd / 2, kvd = nk * hd;
    const long long tq = (long long)n * nq * half, tk = (long long)n * nk * half;
    const long long tu = (long long)n * nk * (hd - nd), tv = (long long)n * kvd;
    // Angles and cache rows (positions and rows uploaded before the token's first launch)
    // before the wait; the activations after it.
    if (idx < tq) {
        const RopeAt r = rope_at(nq, hd, nd, rowpos, theta_scale, neox, idx);
        pdl_enter();
        rope_apply(q, r);
        return;
    }
    idx -= tq;
    if (idx < tk) {
        const RopeAt r = rope_at(nk, hd, nd, rowpos, theta_scale, neox, idx);
        const long long t = r.ea / kvd, row = (long long)kvrow[t] * kvd - t * kvd;
        pdl_enter();
        rope_apply(k, r);
        kc[row + r.ea] = f2h(k[r.ea]);
        kc[row + r.eb] = f2h(k[r.eb]);
        return;
    }
    idx -= tk;
    if (idx < tu) {
        const long long th = idx / (hd - nd);
        const long long e = th * hd + nd + (idx - th * (hd - nd));
        const long long t = e / kvd, dst = (long long)kvrow[t] * kvd + e - t * kvd;
        pdl_enter();
        kc[dst] = f2h(k[e]);
        return;
    }
    idx -= tu;
    if (idx < tv) {
        const long long t = idx / kvd, dst = (long long)kvrow[t] * kvd + idx - t * kvd;
        pdl_enter();
        vc[dst] = f2h(v[idx]);
    }
}

// Gemma 3's per-head RMS norms of q and k, their RoPE and the cache store of the new k and v
// rows, in one launch (decode; the steps rms_norm4 x2 and rope_kv would take, the same bits):
// block b < n * (nq + nk) takes one head of q or k, normalises it with rms_norm4's threads and
// sums (blockDim.x is rms_norm4's thread count for a head; the head's normed values pass
// through shared memory), rotates its pairs as rope_apply does and writes them back in place
// (k's also into the cache, row kvrow[t]); the blocks after store v. hd <= HNR_MAX, hd % 4 == 0,
// nd even and <= hd (checked by the host).
#define HNR_MAX 512
extern "C" __global__ void head_norm_rope_kv(float* q, float* k, const float* __restrict__ v,
                                             u16* __restrict__ kc, u16* __restrict__ vc,
                                             const float4* __restrict__ qn,
                                             const float4* __restrict__ kn, int n, int nq,
                                             int nk, int hd, int nd, const int* rowpos,
                                             float theta_scale, int neox,
                                             const int* __restrict__ kvrow, float eps) {
    __shared__ __align__(16) float y[HNR_MAX];
    const long long heads = (long long)n * (nq + nk), b = blockIdx.x;
    const int kvd = nk * hd, g4 = hd / 4, nt = blockDim.x;
    if (b < heads) {
        const int t = (int)(b / (nq + nk)), hh = (int)(b % (nq + nk));
        const bool is_q = hh < nq;
        float* x = is_q ? q + ((long long)t * nq + hh) * hd
                        : k + ((long long)t * nk + (hh - nq)) * hd;
        float4 ww[4];
        rms_norm4_weights(is_q ? qn : kn, g4, 0, 1, ww, nt);
        pdl_enter();
        rms_norm4_row((const float4*)x, ww, (float4*)y, g4, eps, 0, 1, nt, nullptr, 0);
        __syncthreads();
        const int half = nd / 2;
        const long long crow = (long long)kvrow[t] * kvd + (long long)(hh - nq) * hd;
        for (int i = threadIdx.x; i < half; i += nt) {
            // rope_at's angle and rope_apply's rotation.
            float theta = (float)rowpos[t];
            for (int j = 0; j < i; j++) theta *= theta_scale;
            const float c = cosf(theta), sn = sinf(theta);
            const int ea = neox ? i : 2 * i, eb = neox ? i + half : 2 * i + 1;
            const float x0 = y[ea], x1 = y[eb];
            x[ea] = x0 * c - x1 * sn;
            x[eb] = x0 * sn + x1 * c;
            if (!is_q) {
                kc[crow + ea] = f2h(x[ea]);
                kc[crow + eb] = f2h(x[eb]);
            }
        }
        for (int d = nd + threadIdx.x; d < hd; d += nt) {
            x[d] = y[d];
            if (!is_q) kc[crow + d] = f2h(y[d]);
        }
        return;
    }
    pdl_enter();
    const long long total = (long long)n * kvd, stride = (gridDim.x - heads) * nt;
    for (long long idx = (b - heads) * nt + threadIdx.x; idx < total; idx += stride) {
        const long long t = idx / kvd;
        vc[(long long)kvrow[t] * kvd + idx - t * kvd] = f2h(v[idx]);
    }
}

// Device-to-device bandwidth probe helper: y = x (float4 copy).
extern "C" __global__ void copy_f4(const float4* x, float4* y, long long n4) {
    pdl_enter();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (; i < n4; i += stride) y[i] = x[i];
}

// ---------------------------------------------------------------------------------------------
// Integer decode mat-vec ("mmvq"): activations quantized once per matmul group to int8 on the
// CPU's grid (act_q8k: Q8_K, act_q8_0: Q8_0), weights read with wide loads and multiplied with
// __dp4a, one float scale per sub-block. Same integers as the CPU's dots; only the float
// summation order differs.
//
// Activation scratch for n tokens of `cols` (a multiple of the block size QK):
//   xq: i8 [n*cols] quants (act_q8k: within a 256-block, element e = 64j + 32s + 16h + i,
//   i < 16, is stored at 128s + 32j + 16h + i, so that each 16-byte load of a Q4_K/Q5_K lane
//   and each 8-byte load of a Q6_K lane reads one 128-byte line per block, not two); xd: f32
//   [n*cols/QK] block scales; xs: act_q8k writes i32
//   [n*cols/16] sums of each 16 consecutive quants (Q8_K's bsums; within a 256-block, group
//   g = 4a + 2b + c is stored at 4a + 2c + b, so that the two groups a Q4_K/Q5_K lane needs,
//   4j + h and 4j + 2 + h, are adjacent at 4j + 2h), act_q8_0 f32 [n*cols/32]
//   Q8_1 block sums (as int bits). F16 / BF16 weights read f32 activations from xq instead.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ int dp4a(int a, int b, int c) { return __dp4a(a, b, c); }
// Unsigned bytes of a times signed bytes of b, plus c.
__device__ __forceinline__ int dp4a_us(u32 a, int b, int c) {
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
// The two signed 16-bit halves of a times bytes 0 and 1 of b (unsigned), plus c.
__device__ __forceinline__ int dp2a_lo(int a, u32 b, int c) {
    int d;
    asm("dp2a.lo.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// 4 bytes from a 2-byte aligned address (Q6_K / Q4_0 / Q8_0 blocks are only 2-aligned).
__device__ __forceinline__ int ld_a2(const u8* p) {
    const u16* h = (const u16*)p;
    return (int)((u32)__ldg(h) | ((u32)__ldg(h + 1) << 16));
}

// 8 bytes at a 2-byte aligned address as two words, from two 8-byte aligned loads and funnel
// shifts (half the load instructions of four u16 loads). Reads [p & ~7, (p & ~7) + 16): the
// caller makes sure that stays inside the weight.
__device__ __forceinline__ void ld8_a2(const u8* p, int& r0, int& r1) {
    const unsigned long long a = (unsigned long long)p;
    const uint2* q = (const uint2*)(a & ~7ull);
    const uint2 w0 = __ldg(q), w1 = __ldg(q + 1);
    const int m = (int)(a & 7);  // 0, 2, 4 or 6
    const u32 x0 = m >= 4 ? w0.y : w0.x;
    const u32 x1 = m >= 4 ? w1.x : w0.y;
    const u32 x2 = m >= 4 ? w1.y : w1.x;
    const u32 sh = (u32)(m & 3) * 8;  // 0 or 16
    r0 = (int)__funnelshift_r(x0, x1, sh);
    r1 = (int)__funnelshift_r(x1, x2, sh);
}

// Q8_K quantization of nblk 256-blocks: one warp per block, grid.x * 4 warps.
extern "C" __global__ void __launch_bounds__(128)
    act_q8k(const float* __restrict__ x, i8* __restrict__ xq, float* __restrict__ xd,
            int* __restrict__ xs, long long nblk) {
    pdl_enter();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long blk = (long long)blockIdx.x * 4 + warp;
    if (blk >= nblk) return;
    q8k_block(x, xq, xd, xs, blk, lane);
}

// glu followed by act_q8k of its output, in one launch (decode: the output feeds the int8
// ffn_down mat-vec, which would quantise it next). One warp per 256-block as act_q8k; each
// lane computes the 8 values it then quantises (q8k_block reads back only its own writes).
extern "C" __global__ void __launch_bounds__(128)
    glu_q8k(const float* __restrict__ gate, const float* __restrict__ up, float* out, int act,
            i8* __restrict__ xq, float* __restrict__ xd, int* __restrict__ xs, long long nblk) {
    pdl_enter();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long blk = (long long)blockIdx.x * 4 + warp;
    if (blk >= nblk) return;
    const long long e = blk * 256 + lane * 8;
#pragma unroll
    for (int i = 0; i < 8; i++) out[e + i] = glu_one(gate[e + i], up[e + i], act);
    q8k_block(out, xq, xd, xs, blk, lane);
}

// glu followed by act_q8_0 of its output, in one launch (decode: the output feeds a Q8_0-type
// ffn_down mat-vec: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0). One warp per 32-block, lane = element.
extern "C" __global__ void __launch_bounds__(128)
    glu_q8_0(const float* __restrict__ gate, const float* __restrict__ up, float* out, int act,
             i8* __restrict__ xq, float* __restrict__ xd, int* __restrict__ xs, long long nblk) {
    pdl_enter();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long blk = (long long)blockIdx.x * 4 + warp;
    if (blk >= nblk) return;
    const long long e = blk * 32 + lane;
    const float v = glu_one(gate[e], up[e], act);
    out[e] = v;
    q8_0_block(v, xq, xd, xs, blk, lane);
}

// rms_norm4 followed by act_q8k of the normalised row, in one launch (decode: the norm's
// output feeds int8 mat-vecs, which would quantise it next). Row r's 256-blocks are blocks
// r*g/256 .. of the Q8_K scratch, as act_q8k over all rows would number them. g % 256 == 0.
// grid = (rows, parts): block (r, p) sums the squares of the whole row r itself (same threads,
// same order in every block, so the same bits) and normalises and quantises only the 256-blocks
// p, p + parts, ...: one decode row spreads over `parts` SMs instead of waiting on one.
extern "C" __global__ void rms_norm_q8k(const float4* __restrict__ x, const float4* __restrict__ w,
                                        float4* out, int g4, float eps, i8* __restrict__ xq,
                                        float* __restrict__ xd, int* __restrict__ xs) {
    float4 ww[4];
    rms_norm4_weights(w, g4, blockIdx.y, gridDim.y, ww, blockDim.x);
    pdl_enter();
    rms_norm4_row(x, ww, out, g4, eps, blockIdx.y, gridDim.y, blockDim.x);
    // The block's writes are visible to all its threads after the barrier.
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const int per_row = g4 / 64;
    for (int b = blockIdx.y + warp * gridDim.y; b < per_row; b += nw * gridDim.y)
        q8k_block((const float*)out, xq, xd, xs, (long long)blockIdx.x * per_row + b, lane);
}

// rms_norm4 followed by act_q8_0 of the normalised row (decode rows feeding Q8_0-type
// mat-vecs), in one launch: as rms_norm_q8k, block (r, p) writes and quantises the 32-blocks
// of the row's 256-element chunks p, p + parts, ... (parts = 1 where g % 256 != 0). g % 32 == 0.
// The row is held by the first nt threads, rms_norm4's launch (the same sums, so the same
// bits); the block may have more, a warp per 32-block to quantise.
extern "C" __global__ void rms_norm_q8_0(const float4* __restrict__ x,
                                         const float4* __restrict__ w, float4* out, int g4,
                                         float eps, i8* __restrict__ xq, float* __restrict__ xd,
                                         int* __restrict__ xs, int nt) {
    float4 ww[4];
    rms_norm4_weights(w, g4, blockIdx.y, gridDim.y, ww, nt);
    pdl_enter();
    rms_norm4_row(x, ww, out, g4, eps, blockIdx.y, gridDim.y, nt);
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const int per_row = g4 / 8;
    const float* o = (const float*)out + (long long)blockIdx.x * per_row * 32;
    for (int b = warp; b < per_row; b += nw)
        if ((b >> 3) % gridDim.y == blockIdx.y)
            q8_0_block(o[b * 32 + lane], xq, xd, xs, (long long)blockIdx.x * per_row + b, lane);
}

// Q4_K block, 144 bytes; 16-aligned when the row start is (144 = 9*16; the host checks the
// tensor pointer):
//   [0,2) d f16 | [2,4) dmin f16 | [4,16) scales: 8 (6-bit scale, 6-bit min) pairs, packed as
//   in scale_min_k4 | [16,144) qs: for j in 0..4 and l in 0..32, qs[32j + l] holds element
//   64j + l in its low nibble and element 64j + 32 + l in its high nibble.
//   Value = d*sc_s*q - dmin*m_s, sub-block s = element / 32.
// Lane mapping: 8 lanes per block, part p (0..8): j = p >> 1, h = p & 1. The lane loads the
// header (16 B) and qs[32j + 16h .. +16) (16 B), covering elements 64j + 16h + i (sub-block
// 2j, Q8_K 16-group 4j + h) and 64j + 32 + 16h + i (sub-block 2j + 1, 16-group 4j + 2 + h),
// i in 0..16.
// A Q4_K lane's part of a block (header hdr, its 16 quant bytes qs: low nibbles in sub-block
// 2j, high nibbles in 2j + 1) against its activations (alo, ahi) and their two 16-sums: the
// high nibbles are multiplied in place (q & 0xf0 = 16 * nibble, unsigned bytes; the sum divided
// by 16 after, exactly); the two 6-bit scales and mins come out of the header as byte pairs
// (masks by lane, no branch: lanes of one warp have j both below and above 2) and meet the
// two sums in one dp2a each (|dlo|, |dhi| <= 16 * 15 * 128 and |16-sum| <= 16 * 128 fit 16
// bits). The integers are those of `scale_min` and the sums of products, so the value is too.
__device__ __forceinline__ float q4k_lane_dot(uint4 hdr, uint4 qs, int4 alo, int4 ahi, int2 sums,
                                              float yd, int j) {
    const u32 q[4] = {qs.x, qs.y, qs.z, qs.w};
    const int al[4] = {alo.x, alo.y, alo.z, alo.w}, ah[4] = {ahi.x, ahi.y, ahi.z, ahi.w};
    int lo = 0, hi16 = 0;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        lo = dp4a((int)(q[k] & 0x0f0f0f0fu), al[k], lo);
        hi16 = dp4a_us(q[k] & 0xf0f0f0f0u, ah[k], hi16);
    }
    // Sub-blocks 2j and 2j + 1: bytes 2(j & 1) and 2(j & 1) + 1 of the scale words; 6 bits of
    // y (scales) and z (mins) below sub-block 4, else 4 bits of w and the top 2 of y / z.
    const int sh = 16 * (j & 1);
    const u32 Y = hdr.y >> sh, Z = hdr.z >> sh, W = hdr.w >> sh;
    const bool hi = j >= 2;
    const u32 my = hi ? 0u : 0x3f3fu, mw = hi ? 0x0f0fu : 0u, my2 = hi ? 0x3030u : 0u;
    const u32 S = (Y & my) | (W & mw) | ((Y >> 2) & my2);
    const u32 M = (Z & my) | ((W >> 4) & mw) | ((Z >> 2) & my2);
    const int isum = dp2a_lo((int)__byte_perm((u32)lo, (u32)(hi16 >> 4), 0x5410), S, 0);
    const int msum = dp2a_lo((int)__byte_perm((u32)sums.x, (u32)sums.y, 0x5410), M, 0);
    const float d = h2f((u16)(hdr.x & 0xffff)) * yd;
    const float dmin = h2f((u16)(hdr.x >> 16)) * yd;
    return d * (float)isum - dmin * (float)msum;
}

struct Q4KRaw {
    uint4 hdr, qs;
};
struct Q4K {
    enum { LPB = 8, QK = 256, XS = 16, XB = 1 };
    __device__ static __forceinline__ void load(const u8* __restrict__ wr, int blk, int p,
                                                Q4KRaw& r) {
        const uint4* b = (const uint4*)(wr + (long long)blk * 144);
        r.hdr = __ldg(b);
        r.qs = __ldg(b + 1 + p);  // 16 + 16p = 16 + 32j + 16h
    }
    // Scale and min of sub-block s from the three scale words y (bytes 0..3), z (4..7),
    // w (8..11).
    __device__ static __forceinline__ void scale_min(int s, u32 y, u32 z, u32 w, int& sc,
                                                     int& m) {
        const int sh = 8 * (s & 3);
        const int by = (y >> sh) & 0xff, bz = (z >> sh) & 0xff, bw = (w >> sh) & 0xff;
        if (s < 4) {
            sc = by & 63;
            m = bz & 63;
        } else {
            sc = (bw & 15) | ((by >> 6) << 4);
            m = (bw >> 4) | ((bz >> 6) << 4);
        }
    }
    __device__ static __forceinline__ float dot(const Q4KRaw& r, int blk, int p,
                                                const i8* __restrict__ xq,
                                                const float* __restrict__ xd,
                                                const int* __restrict__ xs) {
        // Elements 64j + 16h + i and 64j + 32 + 16h + i are stored at 16p + i and 128 + 16p + i.
        const i8* a = xq + blk * 256 + 16 * p;
        const int4 alo = *(const int4*)a;
        const int4 ahi = *(const int4*)(a + 128);
        const int2 sums = *(const int2*)(xs + blk * 16 + 2 * p);  // groups 4j + h, 4j + 2 + h
        return q4k_lane_dot(r.hdr, r.qs, alo, ahi, sums, xd[blk], p >> 1);
    }
};

// Q6_K block, 210 bytes; only 2-aligned (210 = 2*105), so quants are read with ld8_a2 and
// scales and d as u16:
//   [0,128) ql | [128,192) qh | [192,208) scales i8, one per 16 elements | [208,210) d f16.
//   For half n (0..2), c (0..4), l (0..32): element 128n + 32c + l has low 4 bits
//   (ql[64n + 32(c & 1) + l] >> 4(c >> 1)) & 15, high 2 bits (qh[32n + l] >> 2c) & 3;
//   value = d * scale[element / 16] * (q - 32).
// Lane mapping: 8 lanes per block, part p (0..8): n = p >> 2, l0 = 8(p & 3). The lane loads
// ql[64n + l0 .. +8] (A), ql[64n + 32 + l0 .. +8] (B), qh[32n + l0 .. +8] (H) and covers, for
// each c, the 8 elements 128n + 32c + l0 + i (16-group 8n + 2c + (l0 >= 16)), 32 in all.
struct Q6KRaw {
    int a0, a1, b0, b1, h0, h1;
    int sc01, sc23;  // the 4 scales' u16 words (byte select below)
    u16 d;
};
struct Q6K {
    enum { LPB = 8, QK = 256, XS = 16, XB = 1 };
    __device__ static __forceinline__ void load(const u8* __restrict__ wr, int blk, int p,
                                                Q6KRaw& r) {
        const u8* b = wr + (long long)blk * 210;
        const int n = p >> 2, l0 = 8 * (p & 3);
        const u8* ql = b + 64 * n + l0;
        const u8* qh = b + 128 + 32 * n + l0;
        // ld8_a2 reads up to 6 bytes before and 8 after each 8-byte segment: the segments
        // end by byte 192 of the 210-byte block, and the tensor start is 8-aligned (host
        // check), so the first block's reads start at the tensor.
        ld8_a2(ql, r.a0, r.a1);
        ld8_a2(ql + 32, r.b0, r.b1);
        ld8_a2(qh, r.h0, r.h1);
        // Scales 8n + 2c + g (g = l0 >= 16) for c = 0..3: bytes 192 + 8n + g + {0, 2, 4, 6}.
        // Load the u16 words at 192 + 8n + {0, 2} and {4, 6}; byte g of each word is ours.
        const u8* s = b + 192 + 8 * n;
        r.sc01 = ld_a2(s);
        r.sc23 = ld_a2(s + 4);
        r.d = __ldg((const u16*)(b + 208));
    }
    __device__ static __forceinline__ int q6(u32 lo4, u32 hi2) {
        // lo4 bytes in 0..15, hi2 bytes in 0..3: q in 0..63 per byte; (q + 0x60) ^ 0x80 is
        // q - 32 as a signed byte, with no carry between bytes (q + 0x60 <= 0x9f).
        const u32 q = lo4 | (hi2 << 4);
        return (int)((q + 0x60606060u) ^ 0x80808080u);
    }
    __device__ static __forceinline__ float dot(const Q6KRaw& r, int blk, int p,
                                                const i8* __restrict__ xq,
                                                const float* __restrict__ xd,
                                                const int* __restrict__ xs) {
        const int n = p >> 2, l0 = 8 * (p & 3);
        const int g = l0 >= 16 ? 8 : 0;  // bit offset of our scale byte in each u16
        // Element 128n + 32c + l0 + i is stored at 128(c & 1) + 64n + 32(c >> 1) + l0 + i.
        const i8* a = xq + blk * 256 + 64 * n + l0;
        const int2 a0 = *(const int2*)a;
        const int2 a1 = *(const int2*)(a + 128);
        const int2 a2 = *(const int2*)(a + 32);
        const int2 a3 = *(const int2*)(a + 160);
        const float yd = xd[blk];
        const u32 A0 = r.a0, A1 = r.a1, B0 = r.b0, B1 = r.b1, H0 = r.h0, H1 = r.h1;
        const u32 M4 = 0x0f0f0f0fu, M2 = 0x03030303u;
        int d0 = dp4a(q6(A0 & M4, H0 & M2), a0.x, dp4a(q6(A1 & M4, H1 & M2), a0.y, 0));
        int d1 = dp4a(q6(B0 & M4, (H0 >> 2) & M2), a1.x,
                      dp4a(q6(B1 & M4, (H1 >> 2) & M2), a1.y, 0));
        int d2 = dp4a(q6((A0 >> 4) & M4, (H0 >> 4) & M2), a2.x,
                      dp4a(q6((A1 >> 4) & M4, (H1 >> 4) & M2), a2.y, 0));
        int d3 = dp4a(q6((B0 >> 4) & M4, (H0 >> 6) & M2), a3.x,
                      dp4a(q6((B1 >> 4) & M4, (H1 >> 6) & M2), a3.y, 0));
        const u32 s01 = (u32)r.sc01, s23 = (u32)r.sc23;
        const int sc0 = (int)(i8)((s01 >> g) & 0xff);
        const int sc1 = (int)(i8)((s01 >> (16 + g)) & 0xff);
        const int sc2 = (int)(i8)((s23 >> g) & 0xff);
        const int sc3 = (int)(i8)((s23 >> (16 + g)) & 0xff);
        const int isum = sc0 * d0 + sc1 * d1 + sc2 * d2 + sc3 * d3;
        return (h2f(r.d) * yd) * (float)isum;
    }
};

// Q6_K repacked for resident weights (staging.rs, `repack_q6k`): a tensor of NB blocks is
// stored as all blocks' ql (128 B each) | all qh (64 B) | all scales (16 B) | all d (2 B) —
// the same bytes, each field aligned, so a lane's quants come in three 8-byte loads instead
// of six unaligned ones. Same lane mapping and arithmetic as Q6K, so the same bits.
struct Q6KS {
    enum { LPB = 8, QK = 256, XS = 16, XB = 1 };
    // B: the block's index in the tensor (row * blocks per row + block).
    __device__ static __forceinline__ void load(const u8* __restrict__ W, long long NB,
                                                long long B, int p, Q6KRaw& r) {
        load_fields<true>(W, W + NB * 128, W + NB * 192, (const u16*)(W + NB * 208), B, p, r);
    }
    // Block B's lane part from the repacked fields (ql 128, qh 64, scales 16 bytes a block;
    // d); GLOBAL: read-only global loads, else plain ones (the fused decode's shared-memory
    // ring holds ql | qh | scales of a chunk).
    template <bool GLOBAL>
    __device__ static __forceinline__ void load_fields(const u8* ql, const u8* qh, const u8* sc,
                                                       const u16* d, long long B, int p,
                                                       Q6KRaw& r) {
        const int n = p >> 2, l0 = 8 * (p & 3);
        const uint2* pa = (const uint2*)(ql + B * 128 + 64 * n + l0);
        const uint2* pb = (const uint2*)(ql + B * 128 + 64 * n + 32 + l0);
        const uint2* ph = (const uint2*)(qh + B * 64 + 32 * n + l0);
        const uint2* ps = (const uint2*)(sc + B * 16 + 8 * n);
        const uint2 a = GLOBAL ? __ldg(pa) : *pa, b = GLOBAL ? __ldg(pb) : *pb;
        const uint2 h = GLOBAL ? __ldg(ph) : *ph, s = GLOBAL ? __ldg(ps) : *ps;
        r.a0 = (int)a.x;
        r.a1 = (int)a.y;
        r.b0 = (int)b.x;
        r.b1 = (int)b.y;
        r.h0 = (int)h.x;
        r.h1 = (int)h.y;
        r.sc01 = (int)s.x;
        r.sc23 = (int)s.y;
        r.d = __ldg(d + B);
    }
    __device__ static __forceinline__ float dot(const Q6KRaw& r, int blk, int p,
                                                const i8* __restrict__ xq,
                                                const float* __restrict__ xd,
                                                const int* __restrict__ xs) {
        return Q6K::dot(r, blk, p, xq, xd, xs);
    }
};
// Kernels reading a repacked layout address blocks by tensor-wide index (see mmvq_impl).
template <class K> struct Repacked { enum { v = 0 }; };
template <> struct Repacked<Q6KS> { enum { v = 1 }; };

// Q5_K block, 176 bytes; 16-aligned when the row start is (176 = 11*16):
//   [0,16) as Q4_K (d, dmin, scales) | [16,48) qh: bit 2j of qh[l] is the 5th bit of element
//   64j + l, bit 2j+1 that of element 64j + 32 + l | [48,176) qs, laid out as Q4_K's.
// Lane mapping as Q4K (part p = 2j + h); the lane also loads qh[16h .. +16).
struct Q5KRaw {
    uint4 hdr, qh, qs;
};
struct Q5K {
    enum { LPB = 8, QK = 256, XS = 16, XB = 1 };
    __device__ static __forceinline__ void load(const u8* __restrict__ wr, int blk, int p,
                                                Q5KRaw& r) {
        const uint4* b = (const uint4*)(wr + (long long)blk * 176);
        r.hdr = __ldg(b);
        r.qh = __ldg(b + 1 + (p & 1));  // 16 + 16h
        r.qs = __ldg(b + 3 + p);        // 48 + 32j + 16h
    }
    __device__ static __forceinline__ float dot(const Q5KRaw& r, int blk, int p,
                                                const i8* __restrict__ xq,
                                                const float* __restrict__ xd,
                                                const int* __restrict__ xs) {
        const int j = p >> 1;  // p = 2j + h
        // Elements 64j + 16h + i and 64j + 32 + 16h + i are stored at 16p + i and 128 + 16p + i.
        const i8* a = xq + blk * 256 + 16 * p;
        const int4 alo = *(const int4*)a;
        const int4 ahi = *(const int4*)(a + 128);
        const int2 sums = *(const int2*)(xs + blk * 16 + 2 * p);  // groups 4j + h, 4j + 2 + h
        const int slo = sums.x, shi = sums.y;
        const float yd = xd[blk];
        const u32 q[4] = {r.qs.x, r.qs.y, r.qs.z, r.qs.w};
        const u32 qh[4] = {r.qh.x, r.qh.y, r.qh.z, r.qh.w};
        const int al[4] = {alo.x, alo.y, alo.z, alo.w};
        const int ah[4] = {ahi.x, ahi.y, ahi.z, ahi.w};
        int dlo = 0, dhi = 0;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const u32 blo = ((qh[k] >> (2 * j)) & 0x01010101u) << 4;
            const u32 bhi = ((qh[k] >> (2 * j + 1)) & 0x01010101u) << 4;
            dlo = dp4a((int)((q[k] & 0x0f0f0f0fu) | blo), al[k], dlo);
            dhi = dp4a((int)(((q[k] >> 4) & 0x0f0f0f0fu) | bhi), ah[k], dhi);
        }
        int sc0, m0, sc1, m1;
        Q4K::scale_min(2 * j, r.hdr.y, r.hdr.z, r.hdr.w, sc0, m0);
        Q4K::scale_min(2 * j + 1, r.hdr.y, r.hdr.z, r.hdr.w, sc1, m1);
        const float d = h2f((u16)(r.hdr.x & 0xffff)) * yd;
        const float dmin = h2f((u16)(r.hdr.x >> 16)) * yd;
        return d * (float)(sc0 * dlo + sc1 * dhi) - dmin * (float)(m0 * slo + m1 * shi);
    }
};

// Q8_0 block, 34 bytes (2-aligned): [0,2) d f16 | [2,34) qs i8; value = d*q. Activations on
// the Q8_0 grid (act_q8_0). 4 lanes per block, lane p reads qs[8p .. +8) as u16 pairs.
struct Q80Raw {
    int q0, q1;
    u16 d;
};
struct Q80 {
    enum { LPB = 4, QK = 32, XS = 32, XB = 1 };
    __device__ static __forceinline__ void load(const u8* __restrict__ wr, int blk, int p,
                                                Q80Raw& r) {
        const u8* b = wr + (long long)blk * 34;
        r.q0 = ld_a2(b + 2 + 8 * p);
        r.q1 = ld_a2(b + 6 + 8 * p);
        r.d = __ldg((const u16*)b);
    }
    __device__ static __forceinline__ float dot(const Q80Raw& r, int blk, int p,
                                                const i8* __restrict__ xq,
                                                const float* __restrict__ xd,
                                                const int* __restrict__ xs) {
        const int2 a = *(const int2*)(xq + blk * 32 + 8 * p);
        const int s = dp4a(r.q0, a.x, dp4a(r.q1, a.y, 0));
        return (float)s * (h2f(r.d) * xd[blk]);
    }
};

// Q4_0 block, 18 bytes (2-aligned): [0,2) d f16 | [2,18) qs: qs[l] holds element l in its low
// nibble and element 16 + l in its high nibble; value = d*(q - 8). Q8_0 activations. 2 lanes
// per block, lane p reads qs[8p .. +8) (elements 8p + i and 16 + 8p + i).
struct Q40Raw {
    int q0, q1;
    u16 d;
};
struct Q40 {
    enum { LPB = 2, QK = 32, XS = 32, XB = 1 };
    __device__ static __forceinline__ void load(const u8* __restrict__ wr, int blk, int p,
                                                Q40Raw& r) {
        const u8* b = wr + (long long)blk * 18;
        r.q0 = ld_a2(b + 2 + 8 * p);
        r.q1 = ld_a2(b + 6 + 8 * p);
        r.d = __ldg((const u16*)b);
    }
    // Nibbles q in 0..15 to signed bytes q - 8: (q + 0x78) ^ 0x80, no carry (q + 0x78 <= 0x87).
    __device__ static __forceinline__ int q4(u32 nib) {
        return (int)((nib + 0x78787878u) ^ 0x80808080u);
    }
    __device__ static __forceinline__ float dot(const Q40Raw& r, int blk, int p,
                                                const i8* __restrict__ xq,
                                                const float* __restrict__ xd,
                                                const int* __restrict__ xs) {
        const i8* a = xq + blk * 32 + 8 * p;
        const int2 alo = *(const int2*)a;
        const int2 ahi = *(const int2*)(a + 16);
        const u32 q0 = (u32)r.q0, q1 = (u32)r.q1, M4 = 0x0f0f0f0fu;
        int s = dp4a(q4(q0 & M4), alo.x, dp4a(q4(q1 & M4), alo.y, 0));
        s = dp4a(q4((q0 >> 4) & M4), ahi.x, dp4a(q4((q1 >> 4) & M4), ahi.y, s));
        return (float)s * (h2f(r.d) * xd[blk]);
    }
};

// 4 bits of qh starting at bit k, spread to bit 4 of each byte: the 5th bits of 4 quants.
// x * 0x00204081 places copies of the 4 bits at bit offsets 0, 7, 14 and 21 (no overlap).
__device__ __forceinline__ u32 bits4_to_bytes(u32 qh, int k) {
    return ((((qh >> k) & 0xfu) * 0x00204081u) & 0x01010101u) << 4;
}

// Q5_0 block, 22 bytes (2-aligned): [0,2) d f16 | [2,6) qh u32 | [6,22) qs: element l (0..16)
// = low nibble of qs[l] | bit l of qh << 4, element 16 + l = high nibble | bit 16 + l << 4;
// value = d*(q - 16). Q8_0 activations. 2 lanes per block, lane p: elements 8p + i, 16 + 8p + i.
struct Q50Raw {
    int q0, q1, qh;
    u16 d;
};
struct Q50 {
    enum { LPB = 2, QK = 32, XS = 32, XB = 1 };
    __device__ static __forceinline__ void load(const u8* __restrict__ wr, int blk, int p,
                                                Q50Raw& r) {
        const u8* b = wr + (long long)blk * 22;
        r.q0 = ld_a2(b + 6 + 8 * p);
        r.q1 = ld_a2(b + 10 + 8 * p);
        r.qh = ld_a2(b + 2);
        r.d = __ldg((const u16*)b);
    }
    // q in 0..31 to signed bytes q - 16: (q + 0x70) ^ 0x80, no carry (q + 0x70 <= 0x8f).
    __device__ static __forceinline__ int q5(u32 nib, u32 hi) {
        return (int)(((nib | hi) + 0x70707070u) ^ 0x80808080u);
    }
    __device__ static __forceinline__ float dot(const Q50Raw& r, int blk, int p,
                                                const i8* __restrict__ xq,
                                                const float* __restrict__ xd,
                                                const int* __restrict__ xs) {
        const i8* a = xq + blk * 32 + 8 * p;
        const int2 alo = *(const int2*)a;
        const int2 ahi = *(const int2*)(a + 16);
        const u32 q0 = (u32)r.q0, q1 = (u32)r.q1, qh = (u32)r.qh, M4 = 0x0f0f0f0fu;
        const int k = 8 * p;
        int s = dp4a(q5(q0 & M4, bits4_to_bytes(qh, k)), alo.x,
                     dp4a(q5(q1 & M4, bits4_to_bytes(qh, k + 4)), alo.y, 0));
        s = dp4a(q5((q0 >> 4) & M4, bits4_to_bytes(qh, k + 16)), ahi.x,
                 dp4a(q5((q1 >> 4) & M4, bits4_to_bytes(qh, k + 20)), ahi.y, s));
        return (float)s * (h2f(r.d) * xd[blk]);
    }
};

// Q4_1 block, 20 bytes: [0,2) d f16 | [2,4) m f16 | [4,20) qs as Q4_0's; value = d*q + m.
// Q5_1 block, 24 bytes: [0,2) d | [2,4) m | [4,8) qh | [8,24) qs as Q5_0's; value = d*q + m.
// Q8_1 activations: the Q8_0 quants and scale, plus s = f16(d * sum of the block's quants)
// (xs, as f32 bits). The CPU's dot is sumi*(d*d_a) + m*s, so the lane with p == 0 adds m*s.
// Read as u16 pairs like the others (only 2-alignment is assumed). 2 lanes per block.
template <bool FIVE> struct Q51Raw {
    int q0, q1, qh;
    u32 dm;
};
template <bool FIVE> struct Q41_51 {
    enum { LPB = 2, QK = 32, XS = 32, XB = 1 };
    __device__ static __forceinline__ void load(const u8* __restrict__ wr, int blk, int p,
                                                Q51Raw<FIVE>& r) {
        const u8* b = wr + (long long)blk * (FIVE ? 24 : 20);
        const int qs = FIVE ? 8 : 4;
        r.q0 = ld_a2(b + qs + 8 * p);
        r.q1 = ld_a2(b + qs + 4 + 8 * p);
        r.qh = FIVE ? ld_a2(b + 4) : 0;
        r.dm = (u32)ld_a2(b);
    }
    __device__ static __forceinline__ float dot(const Q51Raw<FIVE>& r, int blk, int p,
                                                const i8* __restrict__ xq,
                                                const float* __restrict__ xd,
                                                const int* __restrict__ xs) {
        const i8* a = xq + blk * 32 + 8 * p;
        const int2 alo = *(const int2*)a;
        const int2 ahi = *(const int2*)(a + 16);
        const u32 q0 = (u32)r.q0, q1 = (u32)r.q1, qh = (u32)r.qh, M4 = 0x0f0f0f0fu;
        const int k = 8 * p;
        u32 l0 = q0 & M4, l1 = q1 & M4, h0 = (q0 >> 4) & M4, h1 = (q1 >> 4) & M4;
        if (FIVE) {
            l0 |= bits4_to_bytes(qh, k);
            l1 |= bits4_to_bytes(qh, k + 4);
            h0 |= bits4_to_bytes(qh, k + 16);
            h1 |= bits4_to_bytes(qh, k + 20);
        }
        int s = dp4a((int)l0, alo.x, dp4a((int)l1, alo.y, 0));
        s = dp4a((int)h0, ahi.x, dp4a((int)h1, ahi.y, s));
        float v = (float)s * (h2f((u16)(r.dm & 0xffff)) * xd[blk]);
        if (p == 0) v += h2f((u16)(r.dm >> 16)) * __int_as_float(xs[blk]);
        return v;
    }
};
typedef Q41_51<false> Q41;
typedef Q41_51<true> Q51;
typedef Q51Raw<false> Q41Raw;
typedef Q51Raw<true> Q51RawT;

// F16 / BF16 weights: "blocks" of 8 elements, 16 bytes (16-aligned when the row start is:
// rows are 2*cols bytes with cols a multiple of 8). Activations are f32 already rounded to
// f16 / bf16 by act_round (modes 3 / 4), as the CPU rounds them; XB = 4 bytes per element.
// One lane per block: a 16-byte weight load and two float4 activation loads.
struct HalfRaw {
    uint4 w;
};
template <bool BF> struct Half8 {
    enum { LPB = 1, QK = 8, XS = 16, XB = 4 };
    __device__ static __forceinline__ void load(const u8* __restrict__ wr, int blk, int p,
                                                HalfRaw& r) {
        r.w = __ldg((const uint4*)(wr + (long long)blk * 16));
    }
    __device__ static __forceinline__ float cvt(u32 h) { return BF ? bf2f((u16)h) : h2f((u16)h); }
    __device__ static __forceinline__ float dot(const HalfRaw& r, int blk, int p,
                                                const i8* __restrict__ xq,
                                                const float* __restrict__ xd,
                                                const int* __restrict__ xs) {
        const float4* a = (const float4*)xq + 2 * blk;
        const float4 a0 = a[0], a1 = a[1];
        float s = cvt(r.w.x & 0xffff) * a0.x;
        s = fmaf(cvt(r.w.x >> 16), a0.y, s);
        s = fmaf(cvt(r.w.y & 0xffff), a0.z, s);
        s = fmaf(cvt(r.w.y >> 16), a0.w, s);
        s = fmaf(cvt(r.w.z & 0xffff), a1.x, s);
        s = fmaf(cvt(r.w.z >> 16), a1.y, s);
        s = fmaf(cvt(r.w.w & 0xffff), a1.z, s);
        s = fmaf(cvt(r.w.w >> 16), a1.w, s);
        return s;
    }
};
typedef Half8<false> F16K;
typedef Half8<true> BF16K;

// Q8_0 quantization of activations, as the CPU's quantize_q8_0 (ggml's x86 one): per 32
// elements d = amax/127, q = round-half-even(x * (127/amax)) (0 when amax == 0); the scale is
// stored as the f16-rounded d, in f32; xs[blk]
// gets Q8_1's s = f16(d * sum of q), as f32 bits. One warp per block, lane = element; grid.x * 4
// warps cover nblk blocks.
extern "C" __global__ void __launch_bounds__(128)
    act_q8_0(const float* __restrict__ x, i8* __restrict__ xq, float* __restrict__ xd,
             int* __restrict__ xs, long long nblk) {
    pdl_enter();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long blk = (long long)blockIdx.x * 4 + warp;
    if (blk >= nblk) return;
    q8_0_block(x[blk * 32 + lane], xq, xd, xs, blk, lane);
}

// y[t][row] = W[row] . x[t] with int8 activations: one warp per NR rows (4 warps per
// 128-thread block), K::LPB lanes per weight block of K::QK elements, 32 / LPB blocks per warp
// step, two steps' loads in flight before their dots. Each block of threads handles tokens
// t0 = blockIdx.y * NT .. t0 + NT (those < n), reusing each weight load for all of them.
// grid = (ceil(rows / (4 * NR)), ceil(n / NT)). The activation row t starts at xq + t*cols*XB (XB:
// bytes per activation, 1 for int8, 4 for the f32 of F16/BF16), xd + t*(cols/QK),
// xs + t*(cols/XS) (XS = 16: Q8_K's sums of 16; 32: Q8_1's block sums).
// Block blk of a row: at wr (raw layouts) or at tensor-wide index row_blk0 + blk of NB
// (repacked ones).
template <class K, class Raw>
__device__ __forceinline__ void load_block(const u8* __restrict__ W, const u8* __restrict__ wr,
                                           long long row_blk0, long long NB, int blk, int p,
                                           Raw& raw) {
    if constexpr (Repacked<K>::v)
        K::load(W, NB, row_blk0 + blk, p, raw);
    else
        K::load(wr, blk, p, raw);
}

// Weight steps each warp of a one-token kernel keeps in flight: 3 for Q6_K (both layouts,
// so that streamed and resident weights sum in the same order; a 13824-wide ffn_down row is
// 7 rounds of 2), 2 for the others and for every several-token kernel (registers).
template <class K> struct Q6Steps { enum { v = 2 }; };
template <> struct Q6Steps<Q6K> { enum { v = 3 }; };
template <> struct Q6Steps<Q6KS> { enum { v = 3 }; };

// Shared activations (SA, one token of int8 activations: Q8_K or Q8_0/Q8_1): the block first
// copies the token's quants, sums and scales into shared memory (cp.async, so the copy and
// the first weight loads are in flight together) and its warps read them there, instead of
// each warp re-reading them through L1, which the weight stream keeps evicting, from L2 (the
// mat-vecs ran at ~74% of L2 throughput). Layout: quants [cols) | ns sums (i32 or f32 bits) |
// nd scales (f32), ns = cols / K::XS, nd = cols / K::QK (the host's sa_bytes). Each thread
// passes one barrier, right before its first dot (or after its loops if it has none): the
// non-aligned barrier, since lanes of a warp may reach it from different iterations.
__device__ __forceinline__ void sa_fill(u8* sa, const i8* xq, const float* xd, const int* xs,
                                        int cols, int ns, int nd) {
#if __CUDA_ARCH__ >= 800
    const int nthr = blockDim.x;
    const u32 base = (u32)__cvta_generic_to_shared(sa);
    for (int c = threadIdx.x; c < cols / 16; c += nthr)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(base + 16 * c),
                     "l"(xq + 16 * c) : "memory");
    const u32 sbase = base + cols, dbase = sbase + 4 * ns;
    // cols % 32 == 0, so the sums start 16-aligned; 16-byte copies where they fill whole words.
    if (ns % 4 == 0)
        for (int c = threadIdx.x; c < ns / 4; c += nthr)
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sbase + 16 * c),
                         "l"(xs + 4 * c) : "memory");
    else
        for (int c = threadIdx.x; c < ns; c += nthr)
            asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(sbase + 4 * c),
                         "l"(xs + c) : "memory");
    for (int c = threadIdx.x; c < nd; c += nthr)
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dbase + 4 * c), "l"(xd + c)
                     : "memory");
    asm volatile("cp.async.commit_group;" ::: "memory");
#else
    int* ss = (int*)(sa + cols);
    float* sd = (float*)(sa + cols + 4 * ns);
    for (int c = threadIdx.x; c < cols / 4; c += blockDim.x) ((int*)sa)[c] = ((const int*)xq)[c];
    for (int c = threadIdx.x; c < ns; c += blockDim.x) ss[c] = xs[c];
    for (int c = threadIdx.x; c < nd; c += blockDim.x) sd[c] = xd[c];
#endif
}
// The parts of the shared activations in sa_fill's layout.
struct SaParts {
    const i8* q;
    const int* s;
    const float* d;
};
// After a one-token mat-vec's early weight loads: the dependent-launch wait, then the block's
// fill of its shared activations (each thread passes the fill's barrier later, in sa_wait).
template <class K>
__device__ __forceinline__ SaParts sa_enter(const i8* __restrict__ xq,
                                            const float* __restrict__ xd,
                                            const int* __restrict__ xs, int cols) {
    pdl_enter();
    extern __shared__ __align__(16) u8 sa_buf[];
    const int ns = cols / K::XS, nd = cols / K::QK;
    sa_fill(sa_buf, xq, xd, xs, cols, ns, nd);
    return {(const i8*)sa_buf, (const int*)(sa_buf + cols), (const float*)(sa_buf + cols + 4 * ns)};
}
__device__ __forceinline__ void sa_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
#if __CUDA_ARCH__ >= 700
    asm volatile("barrier.sync 0;" ::: "memory");
#else
    __syncthreads();
#endif
}

// SO: the steps of loads in flight a round, if not the type's default (mmvqw_*).
template <class K, class Raw, int NT, int NR, bool SA = false, int RS = 1, int SO = 0>
__device__ __forceinline__ void mmvq_impl(const u8* __restrict__ W, const i8* __restrict__ xq,
                                          const float* __restrict__ xd,
                                          const int* __restrict__ xs, float* __restrict__ y,
                                          int rows, int cols, long long row_bytes, int n,
                                          int accumulate) {
    static_assert(!SA || (NT == 1 && K::XB == 1), "shared activations: one token, int8");
    static_assert(RS == 1 || SA, "rows in sequence: the shared-activation kernels only");
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // NR rows per warp share each activation load (the compiler sees the same addresses).
    // With RS > 1 the warp then takes the rows gridDim.x * 4 * NR further on, RS times: one
    // shared-activation fill for RS times the rows.
    int row0 = (blockIdx.x * 4 + warp) * NR;
    const int row_stride = gridDim.x * 4 * NR;
    const int t0 = blockIdx.y * NT;
    // With SA every warp helps fill and passes the barrier, rows or not.
    if (!SA && row0 >= rows) return;
    const int nt = min(NT, n - t0);
    const int nb = cols / K::QK;
    // Raw layouts: wr[r] is row r's bytes. Repacked ones: blocks are found by tensor-wide
    // index (rowi[r] * nb + blk of NB); wr[r] is the row's first field, for the prefetch.
    const long long NB = (long long)rows * nb;
    // (The first row's pointers and prefetch keep their own spelling of this: row_len there
    // changes the repacked Q6_K kernels' SASS, which were measured as they are.)
    const long long row_len = Repacked<K>::v ? (long long)nb * 128 : row_bytes;
    const u8* wr[NR];
    long long rowi[NR];
#pragma unroll
    for (int r = 0; r < NR; r++) {
        rowi[r] = min(row0 + r, rows - 1);
        wr[r] = Repacked<K>::v ? W + rowi[r] * nb * 128 : W + rowi[r] * row_bytes;
    }
    const int step = 32 / K::LPB;
    const int p = lane % K::LPB;
    constexpr int S = SO ? SO : (NT == 1 ? (int)Q6Steps<K>::v : 2);
    // Weights are never written by kernels (a streamed slot's copy is waited for before the
    // launch): with shared activations the first round of this warp's first row is loaded
    // into registers now, while the previous kernel (which writes our activations) may still
    // be running, so that after the wait only the activations are fetched. What that buys
    // depends on how many blocks are resident early: a dependent-launch harness
    // (scripts/gpu_dep_wait.cu) put it at -7% of a 13b token with 12 blocks an SM and -0.6%
    // with 6, where these 70-90-register kernels are (measured here: 13b +0.7%; the 13b's
    // whole rows now take mmvq_q4k_whole_row, 8 blocks an SM). The rows'
    // start is still pulled toward L2 where that round is not the whole row, or without
    // shared activations.
    Raw raw[S][NR];
    bool early = false;
    if constexpr (SA) {
        const int blk = lane / K::LPB;
        if (row0 < rows) {
#pragma unroll
            for (int r = 0; r < NR; r++)
#pragma unroll
                for (int k = 0; k < S; k++)
                    if (blk + k * step < nb)
                        load_block<K>(W, wr[r], rowi[r] * nb, NB, blk + k * step, p, raw[k][r]);
        }
        early = true;
    }
#pragma unroll
    for (int r = 0; r < NR; r++)
        if (row0 < rows &&
            (long long)lane * 128 < (Repacked<K>::v ? (long long)nb * 128 : row_bytes) &&
            (!SA || nb > S * step))
            asm volatile("prefetch.global.L2 [%0];" ::"l"(wr[r] + lane * 128));
#pragma unroll
    for (int s = 1; s < RS; s++)
#pragma unroll
        for (int r = 0; r < NR; r++) {
            const int row = row0 + s * row_stride;
            if (row < rows && (long long)lane * 128 < row_len)
                asm volatile("prefetch.global.L2 [%0];" ::"l"(
                    W + min(row + r, rows - 1) * row_len + lane * 128));
        }
    if constexpr (SA) {
        const SaParts sa = sa_enter<K>(xq, xd, xs, cols);
        if (row0 >= rows) {
            sa_wait();
            return;
        }
        xq = sa.q;
        xs = sa.s;
        xd = sa.d;
    } else {
        pdl_enter();
    }
    // SA: each thread passes the fill's barrier once, in its warp's first row.
    bool filled = false;
    for (int s = 0; s < RS; s++) {
        if (s > 0) {
            // (The early round was the first row's; lanes with no block in it never used it.)
            early = false;
            row0 += row_stride;
            if (row0 >= rows) break;
#pragma unroll
            for (int r = 0; r < NR; r++) {
                rowi[r] = min(row0 + r, rows - 1);
                wr[r] = W + rowi[r] * row_len;
            }
        }
        // One token: the residual this warp adds into, loaded now so that its latency hides
        // behind the dot products instead of following them.
        float prior[NR];
#pragma unroll
        for (int r = 0; r < NR; r++)
            prior[r] = NT == 1 && accumulate && lane == 0 && nt > 0 && row0 + r < rows
                           ? y[(long long)t0 * rows + row0 + r]
                           : 0.f;
        float acc[NT][NR];
#pragma unroll
        for (int t = 0; t < NT; t++)
#pragma unroll
            for (int r = 0; r < NR; r++) acc[t][r] = 0.f;
        int blk = lane / K::LPB;
        if constexpr (SA) {
            // S steps' loads in flight (those inside the row), then their dots, added up in
            // step order; one round for a row of at most S steps.
            for (; blk < nb; blk += S * step) {
                if (!early) {
#pragma unroll
                    for (int r = 0; r < NR; r++)
#pragma unroll
                        for (int k = 0; k < S; k++)
                            if (blk + k * step < nb)
                                load_block<K>(W, wr[r], rowi[r] * nb, NB, blk + k * step, p,
                                              raw[k][r]);
                }
                early = false;
                if (!filled) {
                    sa_wait();
                    filled = true;
                }
#pragma unroll
                for (int r = 0; r < NR; r++) {
                    float d = K::dot(raw[0][r], blk, p, xq, xd, xs);
#pragma unroll
                    for (int k = 1; k < S; k++)
                        if (blk + k * step < nb)
                            d += K::dot(raw[k][r], blk + k * step, p, xq, xd, xs);
                    acc[0][r] += d;
                }
            }
            // Lanes with no block in this row pass the barrier before the row's warp shuffles
            // (their warp's other lanes may be waiting at it).
            if (!filled) {
                sa_wait();
                filled = true;
            }
        } else {
            // S steps' loads in flight, then their dots, added up in step order.
            for (; blk + (S - 1) * step < nb; blk += S * step) {
                Raw raw[S][NR];
#pragma unroll
                for (int r = 0; r < NR; r++)
#pragma unroll
                    for (int k = 0; k < S; k++)
                        load_block<K>(W, wr[r], rowi[r] * nb, NB, blk + k * step, p, raw[k][r]);
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    if (t < nt) {
                        const long long tt = t0 + t;
                        const i8* xqt = xq + tt * cols * K::XB;
                        const float* xdt = xd + tt * (cols / K::QK);
                        const int* xst = xs + tt * (cols / K::XS);
#pragma unroll
                        for (int r = 0; r < NR; r++) {
                            float d = K::dot(raw[0][r], blk, p, xqt, xdt, xst);
#pragma unroll
                            for (int k = 1; k < S; k++)
                                d += K::dot(raw[k][r], blk + k * step, p, xqt, xdt, xst);
                            acc[t][r] += d;
                        }
                    }
                }
            }
            for (; blk < nb; blk += step) {
                Raw r0[NR];
#pragma unroll
                for (int r = 0; r < NR; r++)
                    load_block<K>(W, wr[r], rowi[r] * nb, NB, blk, p, r0[r]);
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    if (t < nt) {
                        const long long tt = t0 + t;
#pragma unroll
                        for (int r = 0; r < NR; r++)
                            acc[t][r] += K::dot(r0[r], blk, p, xq + tt * cols * K::XB,
                                                xd + tt * (cols / K::QK), xs + tt * (cols / K::XS));
                    }
                }
            }
        }
#pragma unroll
        for (int t = 0; t < NT; t++)
#pragma unroll
            for (int r = 0; r < NR; r++) {
                const float v = warp_sum(acc[t][r]);
                if (lane == 0 && t < nt && row0 + r < rows) {
                    // accumulate: add into y (the residual stream), no separate add kernel.
                    float* yo = y + (long long)(t0 + t) * rows + row0 + r;
                    *yo = accumulate ? (NT == 1 ? prior[r] : *yo) + v : v;
                }
            }
    }
}

// mmvq_<type>: one token, one row per warp (decode); mmvq2_<type>: one token, two rows per
// warp (half the activation loads per weight byte, half the warps; the host picks one, see
// mmvq.rs); mmvq8_<type>: up to 8 tokens, one row per warp.
// LB: the decode kernel's launch bounds.
#define LB_DEFAULT __launch_bounds__(128)
// Up to three matrices of one type and width on the same activations per launch (q/k/v,
// gate/up): blockIdx.z picks the matrix; fewer launches, and one larger grid streams better
// than three small ones. Each output row is computed exactly as in a launch of its own.
#define MMVQ_ARGS                                                                              \
    const u8* __restrict__ W0, const u8* __restrict__ W1, const u8* __restrict__ W2,           \
        const i8* __restrict__ xq, const float* __restrict__ xd, const int* __restrict__ xs,   \
        float* __restrict__ y0, float* __restrict__ y1, float* __restrict__ y2, int rows0,     \
        int rows1, int rows2, int cols, long long row_bytes, int n, int accumulate, int z2
#define MMVQ_PICK                                                                              \
    const int z = blockIdx.z;                                                                  \
    const u8* W = z == 0 ? W0 : (z == 1 ? W1 : W2);                                            \
    float* y = z == 0 ? y0 : (z == 1 ? y1 : y2);                                               \
    const int rows = z == 0 ? rows0 : (z == 1 ? rows1 : rows2);
#define MMVQ(name, K, Raw, LB)                                                                 \
    extern "C" __global__ void LB mmvq_##name(MMVQ_ARGS) {                                     \
        MMVQ_PICK                                                                              \
        mmvq_impl<K, Raw, 1, 1>(W, xq, xd, xs, y, rows, cols, row_bytes, n, accumulate);       \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(128) mmvq2_##name(MMVQ_ARGS) {                \
        MMVQ_PICK                                                                              \
        mmvq_impl<K, Raw, 1, 2>(W, xq, xd, xs, y, rows, cols, row_bytes, n, accumulate);       \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(128) mmvq8_##name(MMVQ_ARGS) {                \
        MMVQ_PICK                                                                              \
        mmvq_impl<K, Raw, 8, 1>(W, xq, xd, xs, y, rows, cols, row_bytes, n, accumulate);       \
    }

// Matrices of two types on the same Q8_K activations in one launch (decode: Q4_K_M's q/k
// with its Q6_K v): blockIdx.z < z2 picks a Q4_K matrix, the rest are resident Q6_K ones
// (repacked; row_bytes is the Q4_K rows'). Every row is computed as its own type's kernel
// computes it. Single-type kernels ignore z2.
// SA: shared activations; S4 / S6: the Q4_K / Q6_K rows' steps of loads in flight a round
// (0: the type's default).
#define MMVQ_FWD                                                                               \
    W0, W1, W2, xq, xd, xs, y0, y1, y2, rows0, rows1, rows2, cols, row_bytes, n, accumulate, z2
// One token, shared activations, a Q4_K row of exactly S warp steps (4S blocks, S * 1024
// columns: the host's whole_row_steps) with all its loads in flight at once, before the
// dependent-launch wait: mmvq_impl<Q4K, Q4KRaw, 1, 1, true, 1, S>'s loads, sums and order (so
// the same bits) without its generality (row sequences, several rows or tokens, repacked
// layouts, 64-bit block indices), which cost 14 registers: 64 a thread instead of 78 for
// S = 5 (NVRTC 13, sm_90), 8 blocks an SM instead of 6, so more of the next mat-vec's rows are
// loaded while the kernel before it ends. H200: 13b 296 -> 300 tok/s; the 7b's 4096-wide rows
// (S = 4: 54 instead of 72 registers, 9 blocks an SM) lost 0.5% this way, so they keep
// mmvq_impl; headers shared between a block's lanes by shuffles or through shared memory (48
// registers) were slower for both (docs/BENCHMARKS.md).
template <int S>
__device__ __forceinline__ void mmvq_q4k_whole_row(const u8* __restrict__ W,
                                                   const i8* __restrict__ xq,
                                                   const float* __restrict__ xd,
                                                   const int* __restrict__ xs,
                                                   float* __restrict__ y, int rows, int cols,
                                                   long long row_bytes, int accumulate) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * 4 + warp;
    const int nb = cols / 256;
    const int p = lane & 7, blk0 = lane >> 3;  // Q4K's lane part and first block
    const u8* wr = W + (long long)min(row, rows - 1) * row_bytes;
    // The weights are never written by kernels: loaded before the dependent-launch wait.
    Q4KRaw raw[S];
    if (row < rows) {
#pragma unroll
        for (int k = 0; k < S; k++)
            if (blk0 + 4 * k < nb) Q4K::load(wr, blk0 + 4 * k, p, raw[k]);
    }
    const SaParts sa = sa_enter<Q4K>(xq, xd, xs, cols);
    // Every warp helps fill and passes the barrier once, rows or not.
    if (row >= rows) {
        sa_wait();
        return;
    }
    // The residual this warp adds into, loaded now so its latency hides behind the dots.
    const float prior = accumulate && lane == 0 ? y[row] : 0.f;
    sa_wait();
    float d = 0.f;
#pragma unroll
    for (int k = 0; k < S; k++) {
        const int blk = blk0 + 4 * k;
        if (blk < nb) {
            const float v = Q4K::dot(raw[k], blk, p, sa.q, sa.d, sa.s);
            d = k == 0 ? v : d + v;
        }
    }
    const float v = warp_sum(0.f + d);
    if (lane == 0) y[row] = accumulate ? prior + v : v;
}

// One token's Q4_K rows with S steps a round (0: the default): whole 5120-wide rows (S = 5,
// shared activations) through the lean kernel, the rest through mmvq_impl.
template <bool SA, int S>
__device__ __forceinline__ void mmvq_q4k(const u8* __restrict__ W, const i8* __restrict__ xq,
                                         const float* __restrict__ xd,
                                         const int* __restrict__ xs, float* __restrict__ y,
                                         int rows, int cols, long long row_bytes, int n,
                                         int accumulate) {
    if constexpr (SA && S == 5)
        mmvq_q4k_whole_row<S>(W, xq, xd, xs, y, rows, cols, row_bytes, accumulate);
    else
        mmvq_impl<Q4K, Q4KRaw, 1, 1, SA, 1, S>(W, xq, xd, xs, y, rows, cols, row_bytes, n,
                                               accumulate);
}

template <bool SA, int S4 = 0, int S6 = 0>
__device__ __forceinline__ void mmvq_mixed(MMVQ_ARGS) {
    MMVQ_PICK
    if (z < z2)
        mmvq_q4k<SA, S4>(W, xq, xd, xs, y, rows, cols, row_bytes, n, accumulate);
    else
        mmvq_impl<Q6KS, Q6KRaw, 1, 1, SA, 1, S6>(W, xq, xd, xs, y, rows, cols, row_bytes, n,
                                                 accumulate);
}
extern "C" __global__ void __launch_bounds__(128) mmvq_q4_k_q6_k_soa(MMVQ_ARGS) {
    mmvq_mixed<false>(MMVQ_FWD);
}

// Q5_0 q/k with a Q8_0 v on the same Q8_0 activations in one launch (decode of the Q4_K_M
// files whose rows are not whole 256-blocks: Gemma-3-270M's 640-wide ones, Qwen2.5-0.5B's
// 896): blockIdx.z < z2 picks a Q5_0 matrix (rows of row_bytes), the rest Q8_0 ones (rows of
// cols / 32 blocks of 34 bytes); each row as mmvq_q5_0 / mmvq_q8_0 compute it.
extern "C" __global__ void __launch_bounds__(128) mmvq_q5_0_q8_0(MMVQ_ARGS) {
    MMVQ_PICK
    if (z < z2)
        mmvq_impl<Q50, Q50Raw, 1, 1>(W, xq, xd, xs, y, rows, cols, row_bytes, n, accumulate);
    else
        mmvq_impl<Q80, Q80Raw, 1, 1>(W, xq, xd, xs, y, rows, cols, (long long)(cols / 32) * 34,
                                     n, accumulate);
}

// One token with shared activations (see sa_fill): mmvqs_<type>, for the types where it
// measured faster (docs/BENCHMARKS.md: Q8_0, Q4_1 and Q5_1 rows were 2.5-8% slower with it).
#define MMVQ_SA(name, K, Raw)                                                                  \
    extern "C" __global__ void __launch_bounds__(128) mmvqs_##name(MMVQ_ARGS) {                \
        MMVQ_PICK                                                                              \
        mmvq_impl<K, Raw, 1, 1, true>(W, xq, xd, xs, y, rows, cols, row_bytes, n, accumulate); \
    }
MMVQ_SA(q4_k, Q4K, Q4KRaw)
MMVQ_SA(q5_k, Q5K, Q5KRaw)
MMVQ_SA(q6_k, Q6K, Q6KRaw)
MMVQ_SA(q6_k_soa, Q6KS, Q6KRaw)
MMVQ_SA(q4_0, Q40, Q40Raw)
// mmvqr_<type>: mmvqs_ with each warp taking two rows in sequence, so one shared-activation
// fill serves 8 rows. For Q6_K only: its widest use, the FFN's down projection (13824 columns,
// a 17.5 KB fill), went 29.2 -> 27.9 us a call on an H100 (the 13b token +0.6%, at the edge of
// the noise), while Q4_K's matrices and the mixed q/k/v launch were slower this way
// (docs/BENCHMARKS.md).
#define MMVQ_SA_ROWS(name, K, Raw)                                                             \
    extern "C" __global__ void __launch_bounds__(128) mmvqr_##name(MMVQ_ARGS) {                \
        MMVQ_PICK                                                                              \
        mmvq_impl<K, Raw, 1, 1, true, 2>(W, xq, xd, xs, y, rows, cols, row_bytes, n,           \
                                         accumulate);                                          \
    }
MMVQ_SA_ROWS(q6_k, Q6K, Q6KRaw)
MMVQ_SA_ROWS(q6_k_soa, Q6KS, Q6KRaw)
extern "C" __global__ void __launch_bounds__(128) mmvqs_q4_k_q6_k_soa(MMVQ_ARGS) {
    mmvq_mixed<true>(MMVQ_FWD);
}

// mmvqw<S>_q4_k and mmvqw<S>_q4_k_q6_k_soa: the Q4_K rows of S warp steps (S * 1024 columns)
// with all S steps' loads in flight in one round instead of 2 a round. A 13b's 5120-wide
// rows (S = 5) went 289 -> 294 tok/s on an H200 (docs/BENCHMARKS.md); at 80 registers a
// block fewer blocks fit an SM, which the 7b's S = 4 measures. The Q6_K rows of the mixed
// kernel keep their own steps. S = 5 through the leaner mmvq_q4k_whole_row (see mmvq_q4k).
#define MMVQ_WHOLE_ROW(S)                                                                      \
    extern "C" __global__ void __launch_bounds__(128) mmvqw##S##_q4_k(MMVQ_ARGS) {             \
        MMVQ_PICK                                                                              \
        mmvq_q4k<true, S>(W, xq, xd, xs, y, rows, cols, row_bytes, n, accumulate);             \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(128) mmvqw##S##_q4_k_q6_k_soa(MMVQ_ARGS) {    \
        mmvq_mixed<true, S>(MMVQ_FWD);                                                         \
    }
MMVQ_WHOLE_ROW(4)
MMVQ_WHOLE_ROW(5)
// Resident Q6_K rows with 4 steps of loads in flight instead of 3: in the mixed q/k/v kernel
// of 4096-wide rows (mmvqx4_: all of a v row's loads at once, as the Q4_K rows) and the
// down projection's two-rows kernel (mmvqr4_). H200: 7b 497.4-498.0 -> 502.7-502.8 tok/s,
// 13b (down only) within its noise; 5 steps measured no better (docs/BENCHMARKS.md).
extern "C" __global__ void __launch_bounds__(128) mmvqx4_q4_k_q6_k_soa(MMVQ_ARGS) {
    mmvq_mixed<true, 4, 4>(MMVQ_FWD);
}
extern "C" __global__ void __launch_bounds__(128) mmvqr4_q6_k_soa(MMVQ_ARGS) {
    MMVQ_PICK
    mmvq_impl<Q6KS, Q6KRaw, 1, 1, true, 2, 4>(W, xq, xd, xs, y, rows, cols, row_bytes, n,
                                              accumulate);
}

// All with their natural register counts (sm_90: 30-56 for mmvq_*, no spills): a bound of
// 10 resident blocks spills Q4_K/Q5_K/Q6_K, a bound of 1 lets the compiler take more.
MMVQ(q4_k, Q4K, Q4KRaw, LB_DEFAULT)
MMVQ(q5_k, Q5K, Q5KRaw, LB_DEFAULT)
MMVQ(q6_k, Q6K, Q6KRaw, LB_DEFAULT)
MMVQ(q6_k_soa, Q6KS, Q6KRaw, LB_DEFAULT)
MMVQ(q8_0, Q80, Q80Raw, LB_DEFAULT)
MMVQ(q4_0, Q40, Q40Raw, LB_DEFAULT)
MMVQ(q5_0, Q50, Q50Raw, LB_DEFAULT)
MMVQ(q4_1, Q41, Q41Raw, LB_DEFAULT)
MMVQ(q5_1, Q51, Q51RawT, LB_DEFAULT)
MMVQ(f16, F16K, HalfRaw, LB_DEFAULT)
MMVQ(bf16, BF16K, HalfRaw, LB_DEFAULT)

// ---------------------------------------------------------------------------------------------
// Tensor-core int8 matmul for a few tokens ("mmq", sm_80+): batched decode steps and short
// prompt passes, 2..32 activation rows (the host's limit; a launch takes more in groups of 32
// along the grid's y), against Q4_K or Q6_K weights (both Q6_K layouts). The same integers as
// the CPU's dots (Q8_K activations from act_q8k, weights' quants and 6-bit / 8-bit scales),
// formed with mma.sync instead of dp4a, so each weight byte is read once for up to 32 tokens
// where mmvq8_* (compute-bound at ~0.7 TB/s for 8 tokens) or a dequantize-then-GEMM pass would
// run. Only the float summation order differs. Measured (H200, docs/BENCHMARKS.md) it is not
// at the weight stream's floor either: a 13b's gate/up at ~1.8 TB/s of weights for 8 tokens,
// ~1.6 for 16, ~1.25 for 32 (scripts/gpu_mmq.cu), with few instructions issued per cycle
// (one super-block of weights a warp in flight, a block barrier per chunk, ~750
// instructions a warp per super-block at 32 tokens).
//
// Shape: a block of MMQ_RG * MMQ_KP warps takes 16 * MMQ_RG rows and NT8 * 8 tokens
// (blockIdx.y picks the token group) at a time: runs of (row block, chunk) units, shared out
// evenly over the grid (stream-K, mmq_impl), of up to three matrices on the same
// activations. The columns go by in chunks of MMQ_KP super-blocks (256 columns each); warp
// (rg, kp) takes rows 16 rg .. +16 of the block and super-block kp of each chunk. With
// MMQ_KP = 1 every warp runs over all the columns of its rows: a row block's set-up, barriers
// and fix-up come once per 20+ super-blocks instead of once per 5 (2 x 4 warps before:
// 20-26% slower on a 13b's big matrices at 16-32 tokens). The chunk's
// activations (the block's tokens' quants, 16-sums and scales) are copied into shared memory
// with cp.async while the previous chunk is multiplied (the mma operands then come from there,
// not from L1, which the weight stream would evict); each warp keeps its next super-block's
// weights in registers (and the MMQ_AHEAD after it pulled toward L2, none by default), the
// first loads made before the dependent-launch wait (weights never depend on an earlier
// kernel). The MMQ_KP partial sums meet in shared memory and are added in kp order: a row's
// value does not depend on timing.
//
// mma fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 / m16n8k32 with integer type"),
// lane = 4 g + q: A rows g and g + 8; B column (token) g; C rows g, g + 8, columns 2q, 2q + 1.
// Any permutation of k applied to A and B alike leaves the product unchanged; lane q gets the
// k that make its loads contiguous:
//   Q4_K sub-block (32 elements, one scale): k 4q..4q+3 <-> elements 8q..8q+3, k 16+4q..
//   16+4q+3 <-> elements 8q+4..8q+7 (one 8-byte load of weights, one of activations).
//   Q6_K 16-group (one scale): k 4q..4q+3 <-> elements 4q..4q+3 of the group.
// ---------------------------------------------------------------------------------------------
// (A harness may set other values; mmvq.rs's MMQ_BLOCK_ROWS and shared-memory sizes follow
// these.)
#ifndef MMQ_RG
#define MMQ_RG 8
#endif
#ifndef MMQ_KP
#define MMQ_KP 1
#endif
// MMQ_CSB_*: super-blocks each warp takes from a chunk of columns, per weight type (a chunk,
// K::CW = MMQ_KP * CSB super-blocks, is one activation fill and block barrier). H200,
// scripts/gpu_mmq.cu (2026-11-30), against 1: Q4_K at 2 a 13b's gate/up at 32 tokens 75.6 ->
// 63.8 us, at 8-16 -5%; Q6_K at 2 +4-10% at 8-16 tokens, so it stays at 1; 4 slower for both
// at 32 tokens.
#ifndef MMQ_CSB_Q4K
#define MMQ_CSB_Q4K 2
#endif
#ifndef MMQ_CSB_Q6K
#define MMQ_CSB_Q6K 1
#endif
// MMQ_AHEAD: super-blocks after the one in registers pulled toward L2 first. 0: none -- with
// every warp over all its columns, 3 ahead (the earlier default) against none: a 13b's gate/up
// at 8 tokens 55.8 -> 44.0 us, at 32 78.4 -> 74.4; 1 and 2 in between (H200,
// scripts/gpu_mmq.cu, 2026-11-30).
#ifndef MMQ_AHEAD
#define MMQ_AHEAD 0
#endif
#ifndef MMQ_MINB
#define MMQ_MINB 2 // blocks an SM (launch bounds: at most 128 registers a thread)
#endif
// Up to three matrices of one type and width on the same activations (q/k/v, gate/up) in
// one launch: their row blocks follow each other in the work's order.
struct MmqJobs {
    const u8* W[3];
    float* y[3];
    long long NB[3]; // blocks of each tensor (the repacked Q6_K layout addresses by them)
    int rows[3];
    int count;
};
// Field f of job j (by value: indexing the parameter's arrays would copy them to the stack).
#define mmq_pick(f, j) ((j) == 0 ? jobs.f[0] : ((j) == 1 ? jobs.f[1] : jobs.f[2]))
#define MMQ_ARGS                                                                               \
    const MmqJobs jobs, const i8* __restrict__ xq, const float* __restrict__ xd,              \
        const int* __restrict__ xs, int cols, long long row_bytes, int n, int accumulate,      \
        float* __restrict__ part, unsigned* __restrict__ arrivals

// c = a . b (16 x 8 of int32) for one 16 x 32 block of signed bytes a and 32 x 8 of b.
__device__ __forceinline__ void mma_s8_k32(int (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                           u32 b1) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%10, %10, %10, %10};"
        : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(0));
#else
    __trap();
#endif
}
// 16 x 16 bytes times 16 x 8, with the operand types TYPES ("s8.s8": Q6_K's 16-element
// groups; "u8.u8" / "u8.s8": Q4_K's 6-bit mins against a sum's low / high byte).
#define MMA_K16(TYPES, c, a0, a1, b0)                                                          \
    asm("mma.sync.aligned.m16n8k16.row.col.s32." TYPES ".s32 {%0, %1, %2, %3}, {%4, %5}, "      \
        "{%6}, {%7, %7, %7, %7};"                                                              \
        : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])                                       \
        : "r"(a0), "r"(a1), "r"(b0), "r"(0))
__device__ __forceinline__ void mma_s8_k16(int (&c)[4], u32 a0, u32 a1, u32 b0) {
#if __CUDA_ARCH__ >= 800
    MMA_K16("s8.s8", c, a0, a1, b0);
#else
    __trap();
#endif
}
// Unsigned bytes a times unsigned (U) or signed bytes b.
template <bool U>
__device__ __forceinline__ void mma_u8_k16(int (&c)[4], u32 a0, u32 a1, u32 b0) {
#if __CUDA_ARCH__ >= 800
    if constexpr (U)
        MMA_K16("u8.u8", c, a0, a1, b0);
    else
        MMA_K16("u8.s8", c, a0, a1, b0);
#else
    __trap();
#endif
}

// Streamed weight words: read once, so not kept in L1 (which holds nothing else of use here).
__device__ __forceinline__ uint4 ldw16(const void* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}
__device__ __forceinline__ uint2 ldw8(const void* p) {
    uint2 v;
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}
__device__ __forceinline__ u32 ldw4(const void* p) {
    u32 v;
    asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ u32 ldw4_a2(const u8* p) {
    u16 lo, hi;
    asm("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(lo) : "l"(p));
    asm("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(hi) : "l"(p + 2));
    return (u32)lo | ((u32)hi << 16);
}

// cp.async copies into shared memory (sm_80+), grouped per chunk.
// cp.async of 16 / 4 bytes to shared address s (the shared window's, 32 bits).
__device__ __forceinline__ void cp_async16_s(u32 s, const void* gmem) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
#endif
}
__device__ __forceinline__ void cp_async4_s(u32 s, const void* gmem) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(s), "l"(gmem) : "memory");
#endif
}
// The same to a generic pointer into shared memory.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    cp_async16_s((u32)__cvta_generic_to_shared(smem), gmem);
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
    cp_async4_s((u32)__cvta_generic_to_shared(smem), gmem);
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 0;" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// Prompt attention on tensor cores (sm_80+; mma.sync with f16 operands and f32 sums): a block
// of 4 warps per (head, tile of up to AMMA_TQ consecutive rows of one sequence), warp w the
// tile's rows 16w .. 16w + 15. The tile's keys go by in chunks of KB, chunk c + 1 copied into
// shared memory (cp.async) while chunk c is used, twice: the first pass reads K alone and
// keeps each row's running maximum m and sum l of exp(s - m) (f32, as the CPU sums them); the
// second forms the scores again and adds P.V with P = exp(s - m) / l rounded to f16, as the
// CPU rounds its probabilities, so that the result differs from the CPU's only by the order
// of sums (and __expf's last bits, which move an f16 rounding only for values within ~1e-6
// of a rounding boundary). One pass with unnormalised f16 probabilities divided by l at the
// end, as FlashAttention does, took ~0.6 of the time but rounded P differently from the
// CPU: a BF16-weight model's logits drifted past the parity tests' 5e-3. q is rounded to f16
// as the other kernels and the CPU do; scores are q.K^T times scale, masked per row (causal,
// window).
//
// Fragments (PTX ISA, mma.m16n8k16 with .f16 A/B and .f32 C), lane = 4 g + t: A rows g and
// g + 8, k 2t..2t+1 and 2t+8..2t+9; B k 2t..2t+1 and 2t+8..2t+9, column g; C rows g, g + 8,
// columns 2t, 2t + 1. q (rows x dims) is A of S, K (keys x dims, as the cache holds it) read
// by ldmatrix is B of S, the probabilities are A of P.V in the registers that held S, V read
// by ldmatrix.trans is B of P.V. Shared rows are padded by 16 bytes so that the 8 rows an
// ldmatrix reads hit distinct banks.
// ---------------------------------------------------------------------------------------------
#define AMMA_TQ 64
#define AMMA_WARPS 4
__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], const u16* p) {
#if __CUDA_ARCH__ >= 800
    const u32 s = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(u32 (&r)[4], const u16* p) {
#if __CUDA_ARCH__ >= 800
    const u32 s = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
#endif
}
// c += a.b for a 16 x 16 f16 A, 16 x 8 f16 B, 16 x 8 f32 C.
__device__ __forceinline__ void mma_f16_k16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}
__device__ __forceinline__ void cp_async_wait_one() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 1;" ::: "memory");
#endif
}
__device__ __forceinline__ u32 pack_f16(float lo, float hi) {
    return (u32)f2h(lo) | ((u32)f2h(hi) << 16);
}
// Keys of a chunk per head size (the shared memory of two stages of K and V and the tile's q:
// 46 KB at 64 dims, 87 KB at 128, 101 KB at 256 with 32-key chunks) and the padded row.
template <int HD> struct Amma {
    enum { KB = HD >= 256 ? 32 : 64, LD = HD + 8 };
    enum { SMEM = (AMMA_TQ + 4 * KB) * LD * 2 };
};
// K rows c0 .. c0 + KB of the tile's keys (n in all) into one stage, and V's where vs is set;
// rows past n are zeros (their probabilities are 0, and 0 times a stale NaN would not be).
template <int HD>
__device__ __forceinline__ void amma_fetch(u16* ks, u16* vs, const u16* __restrict__ kc,
                                           const u16* __restrict__ vc, long long base, int kvd,
                                           int c0, int n) {
    enum { KB = Amma<HD>::KB, LD = Amma<HD>::LD, P = HD / 8 };
    for (int i = threadIdx.x; i < KB * P; i += AMMA_WARPS * 32) {
        const int key = i / P, col = (i - key * P) * 8;
        u16* kd = ks + key * LD + col;
        if (c0 + key < n) {
            const long long off = base + (long long)(c0 + key) * kvd + col;
            cp_async16(kd, kc + off);
            if (vs) cp_async16(vs + key * LD + col, vc + off);
        } else {
            *(uint4*)kd = make_uint4(0, 0, 0, 0);
            if (vs) *(uint4*)(vs + key * LD + col) = make_uint4(0, 0, 0, 0);
        }
    }
    cp_async_commit();
}
template <int HD>
__device__ __forceinline__ void attention_mma_impl(
    const float* __restrict__ q, const u16* __restrict__ kc, const u16* __restrict__ vc,
    float* __restrict__ out, int n_head, int group, int kvd, const int* __restrict__ rowpos,
    const int* __restrict__ rowbase, const int* __restrict__ tiles, int window, float scale) {
    enum { KB = Amma<HD>::KB, LD = Amma<HD>::LD, NT = KB / 8, DT = HD / 8 };
    extern __shared__ __align__(16) u16 amma_smem[];
    u16* qs = amma_smem;                  // AMMA_TQ x LD
    u16* ks = qs + AMMA_TQ * LD;          // 2 stages of KB x LD
    u16* vs = ks + 2 * KB * LD;           // 2 stages of KB x LD
    __shared__ int rlo[AMMA_TQ], rhi[AMMA_TQ];
    // The last tiles of a prompt see the most keys: they start first, so that the short ones
    // fill the last wave.
    const int y = gridDim.y - 1 - blockIdx.y;
    const int h = blockIdx.x, t0 = tiles[y], rows = tiles[y + 1] - t0;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    int klo, khi;
    att_tile_keys(rowpos, t0, rows, window, AMMA_TQ, rlo, rhi, klo, khi);
    // This warp's rows g and g + 8, their keys [a, b] relative to klo, and the keys any of
    // the warp's 16 rows sees.
    const int rg = 16 * warp + g;
    const int a0 = rlo[rg] - klo, b0 = rhi[rg] - klo;
    const int a1 = rlo[rg + 8] - klo, b1 = rhi[rg + 8] - klo;
    int wa = 1 << 30, wb = -1;
    for (int r = 16 * warp; r < 16 * warp + 16 && r < rows; r++) {
        wa = min(wa, rlo[r] - klo);
        wb = max(wb, rhi[r] - klo);
    }
    const int kh = h / group, qd = n_head * HD;
    const int nkeys = khi - klo + 1;
    const long long base = ((long long)rowbase[t0] + klo) * kvd + kh * HD;
    pdl_enter();
    const int nch = nkeys > 0 ? (nkeys + KB - 1) / KB : 0;
    if (nch > 0) amma_fetch<HD>(ks, nullptr, kc, vc, base, kvd, 0, nkeys);
    for (int i = tid; i < AMMA_TQ * HD / 2; i += AMMA_WARPS * 32) {
        const int r = i / (HD / 2), d = 2 * (i - r * (HD / 2));
        u32 v = 0;
        if (r < rows) {
            const float2 x = *(const float2*)(q + (long long)(t0 + r) * qd + h * HD + d);
            v = pack_f16(x.x, x.y);
        }
        *(u32*)(qs + r * LD + d) = v;
    }
    float o[DT][4];
#pragma unroll
    for (int i = 0; i < DT; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    // Rows g and g + 8: the maximum (-inf: nothing seen; 0 stands in for it, every term being
    // 0), this lane's share of the sum, then the sum's inverse.
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
    for (int pass = 0; pass < 2; pass++) {
        for (int c = 0; c < nch; c++) {
            const int st = c & 1;
            if (c + 1 < nch) {
                amma_fetch<HD>(ks + (st ^ 1) * KB * LD, pass ? vs + (st ^ 1) * KB * LD : nullptr,
                               kc, vc, base, kvd, (c + 1) * KB, nkeys);
                cp_async_wait_one();
            } else {
                cp_async_wait_all();
            }
            __syncthreads();
            const int c0 = c * KB;
            if (c0 <= wb && c0 + KB > wa) {
                const u16* kst = ks + st * KB * LD;
                float s[NT][4];
#pragma unroll
                for (int i = 0; i < NT; i++) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
                for (int kk = 0; kk < HD / 16; kk++) {
                    u32 af[4];
                    ldsm_x4(af, qs + (16 * warp + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
                    for (int np = 0; np < NT / 2; np++) {
                        u32 bf[4];
                        ldsm_x4(bf, kst + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * LD +
                                        kk * 16 + ((lane >> 3) & 1) * 8);
                        mma_f16_k16(s[2 * np], af, bf[0], bf[1]);
                        mma_f16_k16(s[2 * np + 1], af, bf[2], bf[3]);
                    }
                }
                // Scaled and masked.
#pragma unroll
                for (int i = 0; i < NT; i++) {
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int j = c0 + i * 8 + 2 * t + e;
                        s[i][e] = j >= a0 && j <= b0 ? s[i][e] * scale : NEG_INF;
                        s[i][2 + e] = j >= a1 && j <= b1 ? s[i][2 + e] * scale : NEG_INF;
                    }
                }
                if (pass == 0) {
                    float x0 = NEG_INF, x1 = NEG_INF;
#pragma unroll
                    for (int i = 0; i < NT; i++) {
                        x0 = fmaxf(x0, fmaxf(s[i][0], s[i][1]));
                        x1 = fmaxf(x1, fmaxf(s[i][2], s[i][3]));
                    }
                    x0 = fmaxf(x0, __shfl_xor_sync(0xffffffff, x0, 1));
                    x0 = fmaxf(x0, __shfl_xor_sync(0xffffffff, x0, 2));
                    x1 = fmaxf(x1, __shfl_xor_sync(0xffffffff, x1, 1));
                    x1 = fmaxf(x1, __shfl_xor_sync(0xffffffff, x1, 2));
                    const float n0 = fmaxf(m0, x0), n1 = fmaxf(m1, x1);
                    const float z0 = n0 == NEG_INF ? 0.f : n0, z1 = n1 == NEG_INF ? 0.f : n1;
                    float p0 = 0.f, p1 = 0.f;
#pragma unroll
                    for (int i = 0; i < NT; i++) {
                        p0 += __expf(s[i][0] - z0) + __expf(s[i][1] - z0);
                        p1 += __expf(s[i][2] - z1) + __expf(s[i][3] - z1);
                    }
                    l0 = l0 * __expf(m0 - z0) + p0;
                    l1 = l1 * __expf(m1 - z1) + p1;
                    m0 = n0;
                    m1 = n1;
                } else {
                    const float z0 = m0 == NEG_INF ? 0.f : m0, z1 = m1 == NEG_INF ? 0.f : m1;
                    u32 pf[NT][2];
#pragma unroll
                    for (int i = 0; i < NT; i++) {
                        pf[i][0] =
                            pack_f16(__expf(s[i][0] - z0) * l0, __expf(s[i][1] - z0) * l0);
                        pf[i][1] =
                            pack_f16(__expf(s[i][2] - z1) * l1, __expf(s[i][3] - z1) * l1);
                    }
                    const u16* vst = vs + st * KB * LD;
#pragma unroll
                    for (int kk = 0; kk < KB / 16; kk++) {
                        const u32 af[4] = {pf[2 * kk][0], pf[2 * kk][1], pf[2 * kk + 1][0],
                                           pf[2 * kk + 1][1]};
#pragma unroll
                        for (int dp = 0; dp < HD / 16; dp++) {
                            u32 bf[4];
                            ldsm_x4_trans(bf, vst + (kk * 16 + (lane & 15)) * LD + dp * 16 +
                                                  (lane >> 4) * 8);
                            mma_f16_k16(o[2 * dp], af, bf[0], bf[1]);
                            mma_f16_k16(o[2 * dp + 1], af, bf[2], bf[3]);
                        }
                    }
                }
            }
            __syncthreads();
        }
        if (pass == 0) {
            // The rows' sums over their 4 lanes, then their inverses (the CPU's factor).
            l0 += __shfl_xor_sync(0xffffffff, l0, 1);
            l0 += __shfl_xor_sync(0xffffffff, l0, 2);
            l1 += __shfl_xor_sync(0xffffffff, l1, 1);
            l1 += __shfl_xor_sync(0xffffffff, l1, 2);
            l0 = l0 > 0.f ? 1.f / l0 : 0.f;
            l1 = l1 > 0.f ? 1.f / l1 : 0.f;
            if (nch > 0) amma_fetch<HD>(ks, vs, kc, vc, base, kvd, 0, nkeys);
        }
    }
#pragma unroll
    for (int i = 0; i < DT; i++) {
        const int d = h * HD + i * 8 + 2 * t;
        if (rg < rows)
            *(float2*)(out + (long long)(t0 + rg) * qd + d) = make_float2(o[i][0], o[i][1]);
        if (rg + 8 < rows)
            *(float2*)(out + (long long)(t0 + rg + 8) * qd + d) = make_float2(o[i][2], o[i][3]);
    }
}
#define ATTENTION_MMA(HD)                                                                      \
    extern "C" __global__ void __launch_bounds__(AMMA_WARPS * 32) attention_mma_h##HD(         \
        const float* __restrict__ q, const u16* __restrict__ kc, const u16* __restrict__ vc,    \
        float* __restrict__ out, int n_head, int group, int kvd,                               \
        const int* __restrict__ rowpos, const int* __restrict__ rowbase,                       \
        const int* __restrict__ tiles, int window, float scale) {                              \
        attention_mma_impl<HD>(q, kc, vc, out, n_head, group, kvd, rowpos, rowbase, tiles,     \
                               window, scale);                                                 \
    }
ATTENTION_MMA(64)
ATTENTION_MMA(128)
ATTENTION_MMA(256)

// One chunk of a block's activations in shared memory, token-major: token i's quants of the
// chunk's CW super-blocks at q + i * QS (act_q8k's order within each super-block; QS
// pads the chunk's bytes so that the lanes of one B-fragment load hit distinct banks), its
// 16-sums at s + i * 16 * CW, its scales at d + i * CW.
template <int QS>
struct MmqChunk {
    const i8* q;
    const int* s;
    const float* d;
};
template <int NT8, int QS, int CW>
__host__ __device__ constexpr int mmq_chunk_bytes() {
    return NT8 * 8 * (QS + 16 * CW * 4 + CW * 4);
}

// isum += an mma's C fragment times its rows' scales: sa for row g (c0, c1), sb for g + 8.
__device__ __forceinline__ void mmq_add_scaled(int (&isum)[4], const int (&c)[4], int sa,
                                               int sb) {
    isum[0] += c[0] * sa;
    isum[1] += c[1] * sa;
    isum[2] += c[2] * sb;
    isum[3] += c[3] * sb;
}

// One super-block (256 columns) of a warp's 16 rows, as loaded: rows g (a) and g + 8 (b).
struct MmqQ4KRaw {
    uint4 ha, hb;       // d, dmin, the 12 scale bytes
    uint2 qa[4], qb[4]; // qs[32j + 8q .. +8] for j = 0..3
};
struct MmqQ4K {
    // A chunk's super-blocks; a token's padded row of them (half-warps' 8-byte loads at
    // 32 g + 8 q: 16 distinct bank pairs).
    enum { CW = MMQ_KP * MMQ_CSB_Q4K, QS = CW * 256 + 32 };
    __device__ static __forceinline__ void load(const u8* __restrict__ W, long long NB,
                                                long long row_bytes, int ra, int rb, int nb,
                                                int sb, int q, MmqQ4KRaw& r) {
        const u8* a = W + (long long)ra * row_bytes + (long long)sb * 144;
        const u8* b = W + (long long)rb * row_bytes + (long long)sb * 144;
        r.ha = ldw16(a);
        r.hb = ldw16(b);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            r.qa[j] = ldw8(a + 16 + 32 * j + 8 * q);
            r.qb[j] = ldw8(b + 16 + 32 * j + 8 * q);
        }
    }
    // Pull super-block sb of the warp's 16 rows (first row r0) toward L2: a 144-byte block
    // starting 16-aligned spans at most two 128-byte lines, so its first and last byte name them.
    __device__ static __forceinline__ void prefetch(const u8* __restrict__ W, long long NB,
                                                    long long row_bytes, int r0, int rows,
                                                    int nb, int sb, int lane) {
        const int r = min(r0 + (lane & 15), rows - 1);
        const u8* p = W + (long long)r * row_bytes + (long long)sb * 144 + (lane >> 4) * 143;
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
    }
    // acc[t][i] += super-block kp of the chunk for rows (g, g + 8) and tile t's tokens
    // (2q, 2q + 1).
    template <int NT8>
    __device__ static __forceinline__ void dot(const MmqQ4KRaw& r, const MmqChunk<QS>& x,
                                               int kp, int g, int q, float (&acc)[NT8][4]) {
        const u32 M4 = 0x0f0f0f0fu, M6 = 0x3f3f3f3fu, M2H = 0x30303030u;
        // Scales (sc) and mins (m) of sub-blocks 0..3 and 4..7, one byte each (scale_min_k4).
        const u32 sca_lo = r.ha.y & M6, sca_hi = (r.ha.w & M4) | ((r.ha.y >> 2) & M2H);
        const u32 scb_lo = r.hb.y & M6, scb_hi = (r.hb.w & M4) | ((r.hb.y >> 2) & M2H);
        const u32 ma_lo = r.ha.z & M6, ma_hi = ((r.ha.w >> 4) & M4) | ((r.ha.z >> 2) & M2H);
        const u32 mb_lo = r.hb.z & M6, mb_hi = ((r.hb.w >> 4) & M4) | ((r.hb.z >> 2) & M2H);
        int isum[NT8][4];
#pragma unroll
        for (int t = 0; t < NT8; t++)
#pragma unroll
            for (int i = 0; i < 4; i++) isum[t][i] = 0;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            // Sub-blocks 2j (low nibbles) and 2j + 1 (high nibbles).
            const u32 la = r.qa[j].x, ha = r.qa[j].y, lb = r.qb[j].x, hb = r.qb[j].y;
            const u32 wsa = j < 2 ? sca_lo : sca_hi, wsb = j < 2 ? scb_lo : scb_hi;
            const int sh = 16 * (j & 1);
            const int sa0 = (wsa >> sh) & 0xff, sa1 = (wsa >> (sh + 8)) & 0xff;
            const int sb0 = (wsb >> sh) & 0xff, sb1 = (wsb >> (sh + 8)) & 0xff;
#pragma unroll
            for (int t = 0; t < NT8; t++) {
                // Sub-block 2j of the activations is stored at 32j, 2j + 1 at 128 + 32j.
                const i8* xt = x.q + (8 * t + g) * QS + kp * 256 + 32 * j + 8 * q;
                const uint2 x0 = *(const uint2*)xt;
                const uint2 x1 = *(const uint2*)(xt + 128);
                int c[4];
                mma_s8_k32(c, la & M4, lb & M4, ha & M4, hb & M4, x0.x, x0.y);
                mmq_add_scaled(isum[t], c, sa0, sb0);
                mma_s8_k32(c, (la >> 4) & M4, (lb >> 4) & M4, (ha >> 4) & M4, (hb >> 4) & M4,
                           x1.x, x1.y);
                mmq_add_scaled(isum[t], c, sa1, sb1);
            }
        }
        // The mins' part, sum over sub-blocks s of m_s * (sum of the token's 32 quants of s),
        // as one more mma: k = s (0..7, lanes q = 0, 1; k 8..15 zero), the sums split into a
        // low unsigned and a high signed byte (|sum| <= 32 * 128 fits 16 bits).
        const u32 mA0 = q == 0 ? ma_lo : (q == 1 ? ma_hi : 0u);
        const u32 mA1 = q == 0 ? mb_lo : (q == 1 ? mb_hi : 0u);
        const float da = h2f((u16)(r.ha.x & 0xffff)), dmina = h2f((u16)(r.ha.x >> 16));
        const float db = h2f((u16)(r.hb.x & 0xffff)), dminb = h2f((u16)(r.hb.x >> 16));
#pragma unroll
        for (int t = 0; t < NT8; t++) {
            u32 lo = 0, hi = 0;
            if (q < 2) {
                // The token's 16-sums of this super-block from 8q on: sub-block s = 2j + h is
                // groups 4j + h and 4j + 2 + h (act_q8k's order).
                const int* st = x.s + (8 * t + g) * 16 * CW + kp * 16 + 8 * q;
                const int4 u0 = *(const int4*)st;
                const int4 u1 = *(const int4*)(st + 4);
                const u32 s0 = (u32)(u0.x + u0.z), s1 = (u32)(u0.y + u0.w);
                const u32 s2 = (u32)(u1.x + u1.z), s3 = (u32)(u1.y + u1.w);
                lo = __byte_perm(__byte_perm(s0, s1, 0x0040), __byte_perm(s2, s3, 0x0040),
                                 0x5410);
                hi = __byte_perm(__byte_perm(s0, s1, 0x0051), __byte_perm(s2, s3, 0x0051),
                                 0x5410);
            }
            int clo[4], chi[4];
            mma_u8_k16<true>(clo, mA0, mA1, lo);
            mma_u8_k16<false>(chi, mA0, mA1, hi);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int msum = clo[i] + chi[i] * 256;
                const float d = i < 2 ? da : db, dmin = i < 2 ? dmina : dminb;
                const float dx = x.d[(8 * t + 2 * q + (i & 1)) * CW + kp];
                acc[t][i] += dx * (d * (float)isum[t][i] - dmin * (float)msum);
            }
        }
    }
};

// Q6_K: the repacked layout of resident weights (Q6KS: block B = row * nb + sb has ql at
// 128 B, qh at NB * 128 + 64 B, scales at NB * 192 + 16 B, d at NB * 208 + 2 B), or GGML's
// own (MmqQ6KPlain below). Element 128n + 32c + 16h + l (l < 16): low 4 bits in
// ql[64n + 32(c & 1) + 16h + l] >> 4(c >> 1), high 2 in qh[32n + 16h + l] >> 2c; 16-group
// G = 8n + 2c + h; stored by act_q8k at 128(c & 1) + 64n + 32(c >> 1) + 16h + l.
struct MmqQ6KRaw {
    u32 la[8], lb[8]; // ql[16i + 4q .. +4], i = 4n + 2(c & 1) + h
    u32 ha[4], hb[4]; // qh[16i + 4q .. +4], i = 2n + h
    uint2 sa[2], sb[2];
    u16 da, db;
};
struct MmqQ6K {
    // A chunk's super-blocks; a token's padded row (a warp's 4-byte loads at g * QS + 4q:
    // 32 distinct banks).
    enum { CW = MMQ_KP * MMQ_CSB_Q6K, QS = CW * 256 + 16 };
    __device__ static __forceinline__ void load_row(const u8* __restrict__ W, long long NB,
                                                    long long B, int q, u32 (&l)[8],
                                                    u32 (&h)[4], uint2 (&s)[2], u16& d) {
        const u8* ql = W + B * 128 + 4 * q;
        const u8* qh = W + NB * 128 + B * 64 + 4 * q;
#pragma unroll
        for (int i = 0; i < 8; i++) l[i] = ldw4(ql + 16 * i);
#pragma unroll
        for (int i = 0; i < 4; i++) h[i] = ldw4(qh + 16 * i);
        const u8* sc = W + NB * 192 + B * 16;
        s[0] = ldw8(sc);
        s[1] = ldw8(sc + 8);
        d = __ldg((const u16*)(W + NB * 208) + B);
    }
    __device__ static __forceinline__ void load(const u8* __restrict__ W, long long NB,
                                                long long row_bytes, int ra, int rb, int nb,
                                                int sb, int q, MmqQ6KRaw& r) {
        load_row(W, NB, (long long)ra * nb + sb, q, r.la, r.ha, r.sa, r.da);
        load_row(W, NB, (long long)rb * nb + sb, q, r.lb, r.hb, r.sb, r.db);
    }
    // ql (128 B) of 16 rows by lanes 0..15, qh (64 B) by lanes 16..31.
    __device__ static __forceinline__ void prefetch(const u8* __restrict__ W, long long NB,
                                                    long long row_bytes, int r0, int rows,
                                                    int nb, int sb, int lane) {
        const long long B = (long long)min(r0 + (lane & 15), rows - 1) * nb + sb;
        const u8* p = lane < 16 ? W + B * 128 : W + NB * 128 + B * 64;
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
    }
    // GGML's own layout (streamed weights): the same fields inside each 210-byte block,
    // which is only 2-aligned, read two bytes at a time; the same values, so the same sums as
    // the repacked layout's (a streamed layer equals its resident self bit for bit).
    __device__ static __forceinline__ void load_plain_row(const u8* __restrict__ b, int q,
                                                          u32 (&l)[8], u32 (&h)[4],
                                                          uint2 (&s)[2], u16& d) {
#pragma unroll
        for (int i = 0; i < 8; i++) l[i] = ldw4_a2(b + 4 * q + 16 * i);
#pragma unroll
        for (int i = 0; i < 4; i++) h[i] = ldw4_a2(b + 128 + 4 * q + 16 * i);
        s[0] = make_uint2(ldw4_a2(b + 192), ldw4_a2(b + 196));
        s[1] = make_uint2(ldw4_a2(b + 200), ldw4_a2(b + 204));
        d = __ldg((const u16*)(b + 208));
    }
    __device__ static __forceinline__ int scale(const uint2 (&s)[2], int G) {
        const u32 w = G < 4 ? s[0].x : (G < 8 ? s[0].y : (G < 12 ? s[1].x : s[1].y));
        return (int)(i8)((w >> (8 * (G & 3))) & 0xff);
    }
    template <int NT8>
    __device__ static __forceinline__ void dot(const MmqQ6KRaw& r, const MmqChunk<QS>& x,
                                               int kp, int g, int q, float (&acc)[NT8][4]) {
        const u32 M4 = 0x0f0f0f0fu, M2 = 0x03030303u;
        int isum[NT8][4];
#pragma unroll
        for (int t = 0; t < NT8; t++)
#pragma unroll
            for (int i = 0; i < 4; i++) isum[t][i] = 0;
#pragma unroll
        for (int nn = 0; nn < 2; nn++)
#pragma unroll
            for (int c = 0; c < 4; c++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int li = 4 * nn + 2 * (c & 1) + h, hi = 2 * nn + h;
                    const int s4 = 4 * (c >> 1), s2 = 2 * c;
                    const u32 a0 = (u32)Q6K::q6((r.la[li] >> s4) & M4, (r.ha[hi] >> s2) & M2);
                    const u32 a1 = (u32)Q6K::q6((r.lb[li] >> s4) & M4, (r.hb[hi] >> s2) & M2);
                    const int G = 8 * nn + 2 * c + h;
                    const int sca = scale(r.sa, G), scb = scale(r.sb, G);
                    const int off =
                        kp * 256 + 128 * (c & 1) + 64 * nn + 32 * (c >> 1) + 16 * h + 4 * q;
#pragma unroll
                    for (int t = 0; t < NT8; t++) {
                        int cc[4];
                        mma_s8_k16(cc, a0, a1, *(const u32*)(x.q + (8 * t + g) * QS + off));
                        mmq_add_scaled(isum[t], cc, sca, scb);
                    }
                }
        const float da = h2f(r.da), db = h2f(r.db);
#pragma unroll
        for (int t = 0; t < NT8; t++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                acc[t][i] += x.d[(8 * t + 2 * q + (i & 1)) * CW + kp] *
                             ((i < 2 ? da : db) * (float)isum[t][i]);
    }
};
struct MmqQ6KPlain : MmqQ6K {
    __device__ static __forceinline__ void load(const u8* __restrict__ W, long long NB,
                                                long long row_bytes, int ra, int rb, int nb,
                                                int sb, int q, MmqQ6KRaw& r) {
        load_plain_row(W + (long long)ra * row_bytes + (long long)sb * 210, q, r.la, r.ha, r.sa,
                       r.da);
        load_plain_row(W + (long long)rb * row_bytes + (long long)sb * 210, q, r.lb, r.hb, r.sb,
                       r.db);
    }
    // A 210-byte block spans at most three 128-byte lines: bytes 0, 105 and 209 name them.
    __device__ static __forceinline__ void prefetch(const u8* __restrict__ W, long long NB,
                                                    long long row_bytes, int r0, int rows,
                                                    int nb, int sb, int lane) {
        const int r = min(r0 + (lane & 15), rows - 1);
        const u8* b = W + (long long)r * row_bytes + (long long)sb * 210;
        asm volatile("prefetch.global.L2 [%0];" ::"l"(b + (lane < 16 ? 0 : 105)));
        if (lane < 16) asm volatile("prefetch.global.L2 [%0];" ::"l"(b + 209));
    }
};

// Copy chunk c (super-blocks CW c ..) of tokens t0 .. t0 + NT8 * 8 (those < n) into the
// shared buffer `buf` (layout MmqChunk), as cp.async work of the whole block: warp w takes
// tokens w, w + 8, ..., each lane the token's 16-byte pieces lane and lane + 32 of its quants
// (16 a super-block) and piece lane of its sums (4 a super-block), lanes 16 .. 16 + CW its
// scales. Pieces of super-blocks past the row are skipped. (A flat numbering of the block's
// pieces cost a division and ~35 dependent instructions a piece, and the special-register
// reads the compiler re-made inside the loop; this is a few adds.)
template <int NT8, int QS, int CW>
__device__ __forceinline__ void mmq_fill(u8* buf, const i8* __restrict__ xq,
                                         const float* __restrict__ xd,
                                         const int* __restrict__ xs, int cols, int nb, int t0,
                                         int n, int c) {
    const int nt = min(NT8 * 8, n - t0);
    const int sb0 = c * CW, nsb = min(CW, nb - sb0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // Shared addresses in the shared window (32 bits), global ones as 32-bit element offsets
    // (mmq_kernel keeps n * cols below 2^31): the loop is a few adds.
    const u32 sb = (u32)__cvta_generic_to_shared(buf);
    const u32 s_sums = sb + NT8 * 8 * QS, s_d = sb + NT8 * 8 * (QS + 16 * CW * 4);
    const int nq = nsb * 16, ns = nsb * 4;
    const bool q0 = lane < nq, q1 = lane + 32 < nq, sum = lane < ns;
    const bool scale = !sum && lane >= 16 && lane - 16 < nsb;
    const int stride = blockDim.x >> 5;
    for (int tok = warp; tok < nt; tok += stride) {
        const int row = t0 + tok;
        const i8* sq = xq + (row * cols + sb0 * 256 + 16 * lane);
        const u32 dq = sb + tok * QS + 16 * lane;
        if (q0) cp_async16_s(dq, sq);
        if (q1) cp_async16_s(dq + 512, sq + 512);
        if (sum)
            cp_async16_s(s_sums + tok * 16 * CW * 4 + 16 * lane,
                         xs + (row * (cols / 16) + sb0 * 16 + 4 * lane));
        else if (scale)
            cp_async4_s(s_d + (tok * CW + lane - 16) * 4, xd + (row * nb + sb0 + lane - 16));
    }
    cp_async_commit();
}

// Stream-K split of the work (rows in blocks of 16 MMQ_RG, columns in chunks of K::CW
// super-blocks; unit u = row block * chunks + chunk): block b of G takes units
// [start(b), start(b + 1)). With G = the row blocks each block takes one whole row block (the
// plain launch); the host picks G = a multiple of the SMs, so that small matrices (40 row
// blocks of a 5120-row projection on 132 SMs) keep every SM busy for the same time. mmvq.rs mirrors these two.
// 32-bit arithmetic (the host keeps units * G below 2^32): a 64-bit division is a called
// routine of ~80 dependent instructions, which sat before a block's first weight loads.
__device__ __forceinline__ int mmq_unit_start(int b, int units, int G) {
    return (int)((unsigned)b * (unsigned)units / (unsigned)G);
}
// The block whose units hold unit u: the last b with start(b) <= u (never an empty block).
__device__ __forceinline__ int mmq_block_of(int u, int units, int G) {
    return (int)(((unsigned)(u + 1) * (unsigned)G - 1u) / (unsigned)units);
}

// acc += the block's rows' dot products over chunks c0 .. c1 of row block `blk`, as warp
// (rg, kp)'s share (see the section comment). `first`: the block's first segment, which makes
// its first weight loads before the dependent-launch wait (weights never depend on an earlier
// kernel) and then waits.
template <class K, class Raw, int NT8>
__device__ __forceinline__ void mmq_segment(const u8* __restrict__ W, long long NB,
                                            const i8* __restrict__ xq,
                                            const float* __restrict__ xd,
                                            const int* __restrict__ xs, int rows, int cols,
                                            long long row_bytes, int n, int blk, int c0, int c1,
                                            bool first, float (&acc)[NT8][4]) {
    extern __shared__ __align__(16) u8 mmq_smem[];
    constexpr int QS = K::QS, CW = K::CW, CSB = CW / MMQ_KP;
    constexpr int CB = mmq_chunk_bytes<NT8, QS, CW>();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kp = warp % MMQ_KP, rg = warp / MMQ_KP;
    const int g = lane >> 2, q = lane & 3;
    const int r0 = (blk * MMQ_RG + rg) * 16;
    // Rows past the matrix read its last row; their sums are never written. So do tokens past
    // n (their shared rows are never filled; each C column depends on its own B column only).
    const int ra = min(r0 + g, rows - 1), rb = min(r0 + g + 8, rows - 1);
    const int nb = cols / 256;
    const int t0 = blockIdx.y * NT8 * 8;
    Raw cur;
    // Warp kp takes super-blocks kp, kp + MMQ_KP, ... of each chunk of CW.
    const int sb0 = c0 * CW + kp, sb_end = min(nb, c1 * CW);
    if (sb0 < nb) K::load(W, NB, row_bytes, ra, rb, nb, sb0, q, cur);
#pragma unroll
    for (int a = 1; a <= MMQ_AHEAD; a++)
        if (sb0 + a * MMQ_KP < nb)
            K::prefetch(W, NB, row_bytes, r0, rows, nb, sb0 + a * MMQ_KP, lane);
    if (first) pdl_enter();
    mmq_fill<NT8, QS, CW>(mmq_smem, xq, xd, xs, cols, nb, t0, n, c0);
    for (int c = c0; c < c1; c++) {
        cp_async_wait_all();
        // Chunk c is in place for every thread; everyone is done with the other buffer.
        __syncthreads();
        if (c + 1 < c1)
            mmq_fill<NT8, QS, CW>(mmq_smem + ((c + 1 - c0) & 1) * CB, xq, xd, xs, cols, nb, t0,
                                  n, c + 1);
        const u8* buf = mmq_smem + ((c - c0) & 1) * CB;
        const MmqChunk<QS> x{(const i8*)buf, (const int*)(buf + NT8 * 8 * QS),
                             (const float*)(buf + NT8 * 8 * (QS + 16 * CW * 4))};
#pragma unroll 1
        for (int i = 0; i < CSB; i++) {
            const int s = kp + MMQ_KP * i, sb = c * CW + s; // s: place in the chunk
            if (sb >= nb) break;
            Raw next;
            const bool more = sb + MMQ_KP < sb_end;
            if (more) K::load(W, NB, row_bytes, ra, rb, nb, sb + MMQ_KP, q, next);
            if (MMQ_AHEAD > 0 && sb + (MMQ_AHEAD + 1) * MMQ_KP < nb)
                K::prefetch(W, NB, row_bytes, r0, rows, nb, sb + (MMQ_AHEAD + 1) * MMQ_KP, lane);
            K::template dot<NT8>(cur, x, s, g, q, acc);
            if (more) cur = next;
        }
    }
}

// y[t][row] (+)= W[row] . x[t] for the block's units; see the section comment. Dynamic shared
// memory: two chunk buffers (mmq_chunk_bytes), reused for the warps' partial sums. A row
// block split between blocks meets in `part` (two slots of MMQ_RG * NT8 * 128 floats a block:
// its first segment's and its last's; the segments between are whole row blocks) and the
// block that arrives last (`arrivals`, one counter a row block and token group, zero between
// launches) adds the segments in block order: a row's value does not depend on timing.
template <class K, class Raw, int NT8>
__device__ __forceinline__ void mmq_impl(MMQ_ARGS) {
    extern __shared__ __align__(16) u8 mmq_smem[];
    __shared__ int mmq_last;
    constexpr int FR = MMQ_RG * NT8 * 4; // floats a lane of the kp == 0 warps holds
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kp = warp % MMQ_KP, rg = warp / MMQ_KP;
    const int g = lane >> 2, q = lane & 3;
    constexpr int BR = 16 * MMQ_RG; // rows a row block
    const int nb = cols / 256, chunks = (nb + K::CW - 1) / K::CW;
    int blocks = 0;
#pragma unroll
    for (int j = 0; j < 3; j++)
        if (j < jobs.count) blocks += (jobs.rows[j] + BR - 1) / BR;
    const int units = blocks * chunks;
    const int G = gridDim.x, b = blockIdx.x;
    // One row block a block (G == blocks) needs no division: its first loads go out sooner.
    const bool whole = G == blocks;
    const int u_begin = whole ? b * chunks : mmq_unit_start(b, units, G);
    const int u_end = whole ? u_begin + chunks : mmq_unit_start(b + 1, units, G);
    const int t0 = blockIdx.y * NT8 * 8;
    bool first = true;
    for (int u = u_begin; u < u_end;) {
        // Row block gb of the launch is row block blk of matrix j.
        const int gb = whole ? b : u / chunks, c0 = u - gb * chunks,
                  c1 = min(chunks, c0 + (u_end - u));
        int j = 0, blk = gb;
        while (j + 1 < jobs.count && blk >= (mmq_pick(rows, j) + BR - 1) / BR) {
            blk -= (mmq_pick(rows, j) + BR - 1) / BR;
            j++;
        }
        const int rows = mmq_pick(rows, j);
        float acc[NT8][4];
#pragma unroll
        for (int t = 0; t < NT8; t++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[t][i] = 0.f;
        mmq_segment<K, Raw, NT8>(mmq_pick(W, j), mmq_pick(NB, j), xq, xd, xs, rows,
                                 cols, row_bytes, n, blk, c0, c1, first, acc);
        // The partial sums of warps kp > 0 through the (now idle) chunk buffers, added in kp
        // order by the kp == 0 warps (none with one warp over all the columns: MMQ_KP == 1).
        float* wpart = (float*)mmq_smem; // [MMQ_KP - 1][MMQ_RG][NT8 * 4][32]
        if (MMQ_KP > 1) __syncthreads();
        if (kp > 0) {
#pragma unroll
            for (int t = 0; t < NT8; t++)
#pragma unroll
                for (int i = 0; i < 4; i++)
                    wpart[(((kp - 1) * MMQ_RG + rg) * NT8 * 4 + 4 * t + i) * 32 + lane] =
                        acc[t][i];
        }
        if (MMQ_KP > 1) __syncthreads();
        if (kp == 0) {
#pragma unroll
            for (int t = 0; t < NT8; t++)
#pragma unroll
                for (int i = 0; i < 4; i++)
#pragma unroll
                    for (int k = 0; k < MMQ_KP - 1; k++)
                        acc[t][i] += wpart[((k * MMQ_RG + rg) * NT8 * 4 + 4 * t + i) * 32 + lane];
        }
        bool write = kp == 0;
        if (c0 != 0 || c1 != chunks) {
            // A share of the row block: leave it in this block's slot; the last to arrive adds.
            const int slot = 2 * b + (first ? 0 : 1);
            if (kp == 0) {
#pragma unroll
                for (int t = 0; t < NT8; t++)
#pragma unroll
                    for (int i = 0; i < 4; i++)
                        part[((long long)slot * FR + rg * NT8 * 4 + 4 * t + i) * 32 + lane] =
                            acc[t][i];
                __threadfence();
            }
            const int bf = mmq_block_of(gb * chunks, units, G);
            const int bl = mmq_block_of(gb * chunks + chunks - 1, units, G);
            __syncthreads();
            if (threadIdx.x == 0) {
                unsigned* arrived = arrivals + (long long)blockIdx.y * blocks + gb;
                const unsigned seen = atomicAdd(arrived, 1u);
                mmq_last = seen == (unsigned)(bl - bf);
                if (mmq_last) *arrived = 0u; // every segment is in: ready for the next launch
            }
            __syncthreads();
            write = write && mmq_last;
            if (write) {
                __threadfence();
#pragma unroll
                for (int t = 0; t < NT8; t++)
#pragma unroll
                    for (int i = 0; i < 4; i++) acc[t][i] = 0.f;
                for (int bb = bf; bb <= bl; bb++) {
                    // Block bb's share of this row block is its first segment when it starts
                    // inside the row block, else its last.
                    const int sl =
                        2 * bb + (mmq_unit_start(bb, units, G) >= gb * chunks ? 0 : 1);
#pragma unroll
                    for (int t = 0; t < NT8; t++)
#pragma unroll
                        for (int i = 0; i < 4; i++)
                            acc[t][i] += __ldcg(
                                part + ((long long)sl * FR + rg * NT8 * 4 + 4 * t + i) * 32 +
                                lane);
                }
            }
        }
        if (write) {
            const int r0 = (blk * MMQ_RG + rg) * 16;
#pragma unroll
            for (int t = 0; t < NT8; t++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int row = r0 + g + (i < 2 ? 0 : 8), tok = t0 + 8 * t + 2 * q + (i & 1);
                    if (row < rows && tok < n) {
                        float* p = mmq_pick(y, j) + (long long)tok * rows + row;
                        *p = accumulate ? *p + acc[t][i] : acc[t][i];
                    }
                }
        }
        u += c1 - c0;
        first = false;
        // The next segment's fill reuses the buffers just read.
        __syncthreads();
    }
}

// Two blocks an SM (at most 128 registers a thread; 4 tiles spill a few words): one block an
// SM with the registers it wants was slower (H200: 16 rows 26.4 -> 26.5 us a Q4_K call,
// Q6_K 51.6 -> 63.0; 32 rows 39.6 -> 50.1 and 76.1 -> 85.7).
#define MMQ(name, K, Raw, NT8)                                                                 \
    extern "C" __global__ void __launch_bounds__(MMQ_RG * MMQ_KP * 32, MMQ_MINB)              \
        mmq_##name##_##NT8(MMQ_ARGS) {                                                         \
        mmq_impl<K, Raw, NT8>(jobs, xq, xd, xs, cols, row_bytes, n, accumulate, part,          \
                              arrivals);                                                       \
    }
MMQ(q4_k, MmqQ4K, MmqQ4KRaw, 1)
MMQ(q4_k, MmqQ4K, MmqQ4KRaw, 2)
MMQ(q4_k, MmqQ4K, MmqQ4KRaw, 4)
MMQ(q6_k_soa, MmqQ6K, MmqQ6KRaw, 1)
MMQ(q6_k_soa, MmqQ6K, MmqQ6KRaw, 2)
MMQ(q6_k_soa, MmqQ6K, MmqQ6KRaw, 4)
MMQ(q6_k, MmqQ6KPlain, MmqQ6KRaw, 1)
MMQ(q6_k, MmqQ6KPlain, MmqQ6KRaw, 2)
MMQ(q6_k, MmqQ6KPlain, MmqQ6KRaw, 4)

// ---------------------------------------------------------------------------------------------
// Fused resident decode: every layer of one token in ONE launch (fd_decode).
//
// Why: a token of a resident 13B is ~280 launches; each mat-vec's start and tail and each
// small kernel between them leave device memory idle (a stand-alone harness,
// scripts/gpu_matvec_layers.cu, reads the same bytes at 2.6 ms as launches and at 2.0 ms —
// the device-copy floor — as one persistent stream). Here one block per SM stays resident
// for the whole token:
//   * a producer warp streams the block's share of every weight matrix of every layer, in
//     order, into a FD_STAGES-deep shared-memory ring by bulk (TMA) copies. Weights do not
//     depend on activations, so it runs ahead through everything below;
//   * FD_NW consumer warps do the layer's work phase by phase; a grid barrier (a counter in
//     global memory) separates phases whose inputs other blocks write.
// Phases of a layer: [rms norm + Q8_K of x, per block into shared memory] q/k/v mat-vecs |
// attention, a head per block (RoPE of q and of k at the new position, k/v stored into the
// f16 cache, softmax, P.V) | [Q8_K of the attention output] output mat-vec into x | [norm of
// x] gate/up mat-vecs | [GLU + Q8_K] down mat-vec into x. Five barriers per layer.
// Matrices: Q4_K rows, or resident Q6_K in the repacked layout (ql | qh | scales in the
// ring, d read from global memory). Chunk g of the token's chunks (C rows of one matrix)
// belongs to block g % gridDim.x; a chunk is C * WPR tasks (WPR slices of each row) taken by
// the consumer warps in turn; a row's slices are added in slice order by the warp finishing
// its last one. The host (lib.rs, `FusedDecode`) checks every shape and builds the tables.
// sm_90+ (bulk copies, mbarriers); a trap instead of a hang if a wait runs past ~1 s.
// ---------------------------------------------------------------------------------------------
#define FD_NW 16
#define FD_STAGES 4
#define FD_STAGE_BYTES (46 * 1024)
#define FD_XMAX 16384
#define FD_MAXC 16
#define FD_MAXW 8
#define FD_TRACE 15
#define FD_NORM_MAX 8192
// Shared memory: ring | Q8_K activations (quants, scales, sums) | row partials and their
// counters | reduction | attention scratch (q, new k, reductions, scores) | mbarriers.
#define FD_OFF_XQ (FD_STAGES * FD_STAGE_BYTES)
#define FD_OFF_XD (FD_OFF_XQ + FD_XMAX)
#define FD_OFF_XS (FD_OFF_XD + FD_XMAX / 256 * 4)
#define FD_OFF_PART (FD_OFF_XS + FD_XMAX / 16 * 4)
#define FD_OFF_RCNT (FD_OFF_PART + FD_STAGES * FD_MAXC * FD_MAXW * 4)
#define FD_OFF_RED (FD_OFF_RCNT + FD_STAGES * FD_MAXC * 4)
#define FD_OFF_ATT (FD_OFF_RED + 32 * 4)
#define FD_ATT_KEYS 3840
#define FD_ATT_FLOATS (320 + FD_ATT_KEYS)
#define FD_OFF_MBAR (FD_OFF_ATT + FD_ATT_FLOATS * 4)
#define FD_SMEM (FD_OFF_MBAR + 2 * FD_STAGES * 8)

struct FdMat {
    const u8* w;     // Q4_K rows, or Q6_K repacked (ql | qh | scales | d)
    float* y;        // output, rows wide
    int ty;          // 0: Q4_K, 1: Q6_K repacked
    int rows, cols;  // cols % 256 == 0
    int crows;       // rows per chunk (power of two <= FD_MAXC)
    int lwpr;        // log2 of the slices per row
    int chunk0, nch; // first chunk of the token's sequence, and how many
    int accumulate;  // add into y (the residual stream)
};
struct FdLayer {
    const float* attn_norm;
    const float* ffn_norm;
    u16* kc;  // this layer's K / V cache (f16, [row][kvd])
    u16* vc;
    int mat0; // its q, k, v, output, gate, up, down matrices: mat0 .. mat0 + 6
};
struct FdArgs {
    const FdMat* mats;
    const FdLayer* layers;
    int n_layers, n_mats;
    float *x, *q, *k, *v, *att, *gate, *up;
    unsigned* gbar;               // grid barrier counter, zero at launch
    unsigned long long* trace;    // null, or FD_TRACE timestamps per layer (block 0, FLEA_CUDA_FUSED_TRACE)
    int n_embd, n_ff, n_head, n_head_kv, hd, act;
    int kv_base, pos;             // the sequence's first cache row; this token's position
    float theta_scale, eps, attn_scale;
    int neox;
};

#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ u32 fd_smem(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ bool fd_try_wait(u32 bar, u32 parity) {
    u32 done;
    asm volatile(
        "{.reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0,1,0,p;}"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    return done != 0;
}
// Consumers wait without sleeping (the data is usually there); the producer sleeps a little
// between tries (its spinning would take issue slots from the consumers of its scheduler).
__device__ __forceinline__ void fd_wait(u32 bar, u32 parity, bool sleep) {
    for (long long spin = 0; !fd_try_wait(bar, parity); spin++) {
        if (sleep && spin > 4) __nanosleep(128);
        if (spin > (1ll << 26)) asm volatile("trap;");
    }
}
// Weights are read once per token: their bulk copies mark the lines first to evict from L2,
// so that they do not push out the KV-cache rows attention prefetched (evict_last).
__device__ __forceinline__ unsigned long long fd_evict_first() {
    unsigned long long pol;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    return pol;
}
__device__ __forceinline__ void fd_bulk(u32 dst, const void* src, u32 bytes, u32 bar,
                                        unsigned long long pol) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(dst),
        "l"(src), "r"(bytes), "r"(bar), "l"(pol)
        : "memory");
}
// The K and V rows of positions 0 .. pos - 1 that this block's heads attend over, toward L2
// (evict_last), at the start of a layer: the attention phase then waits on L2, not on a
// device memory busy with the weight stream.
__device__ __forceinline__ void fd_prefetch_kv(const FdArgs& A, const FdLayer& L) {
    const int hd = A.hd, kvd = A.n_head_kv * hd, group = A.n_head / A.n_head_kv;
    const int lines = hd * 2 / 128; // 128-byte lines per row and head (1 or 2)
    for (int h = blockIdx.x; h < A.n_head; h += gridDim.x) {
        const int kvh = h / group;
        const long long base = (long long)A.kv_base * kvd + kvh * hd;
        for (int i = threadIdx.x; i < A.pos * lines; i += FD_NW * 32) {
            const long long off = base + (long long)(i / lines) * kvd + (i % lines) * 64;
            asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(L.kc + off));
            asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(L.vc + off));
        }
    }
}
__device__ __forceinline__ void fd_prefetch(const void* src, u32 bytes) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
}
// The matrix holding chunk g, searching on from matrix m (n_mats: past the last).
__device__ __forceinline__ int fd_mat_of(const FdArgs& A, int m, int g) {
    while (m < A.n_mats && g >= A.mats[m].chunk0 + A.mats[m].nch) m++;
    return m;
}
// Where chunk g of matrix M lies: Q4_K rows are one range; repacked Q6_K rows three (their
// ql, qh and scales; d is read from global memory), laid out in that order in the ring.
struct FdPieces {
    const u8* src[3];
    u32 bytes[3];
    int n;
    u32 total;
};
__device__ __forceinline__ FdPieces fd_chunk(const FdMat& M, int g) {
    const int nb = M.cols / 256;
    const long long row0 = (long long)(g - M.chunk0) * M.crows;
    const int nr = (int)min((long long)M.crows, M.rows - row0);
    FdPieces P;
    if (M.ty == 0) {
        P.n = 1;
        P.src[0] = M.w + row0 * nb * 144;
        P.bytes[0] = (u32)(nr * nb * 144);
    } else {
        const long long NB = (long long)M.rows * nb, B0 = row0 * nb;
        const u32 nbk = (u32)(nr * nb);
        P.n = 3;
        P.src[0] = M.w + B0 * 128;
        P.bytes[0] = nbk * 128;
        P.src[1] = M.w + NB * 128 + B0 * 64;
        P.bytes[1] = nbk * 64;
        P.src[2] = M.w + NB * 192 + B0 * 16;
        P.bytes[2] = nbk * 16;
    }
    P.total = 0;
    for (int i = 0; i < P.n; i++) P.total += P.bytes[i];
    return P;
}
__device__ __forceinline__ void fd_sync() { asm volatile("bar.sync 1, %0;" ::"n"(FD_NW * 32) : "memory"); }
// Grid barrier number `idx` (0, 1, ...) among the consumers of every block.
__device__ __forceinline__ void fd_grid_sync(unsigned* gbar, unsigned idx) {
    fd_sync();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(gbar, 1u);
        const unsigned target = (idx + 1) * gridDim.x;
        for (long long spin = 0;; spin++) {
            unsigned v;
            asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(v) : "l"(gbar) : "memory");
            if (v >= target) break;
            if (spin > 8) __nanosleep(32);
            if (spin > (1ll << 25)) asm volatile("trap;");
        }
        __threadfence();
    }
    fd_sync();
}

// Q4_K from the ring: the launch kernels' lane mapping and q4k_lane_dot.
__device__ __forceinline__ float fd_q4k_dot(const u8* wr, int blk, int p, const i8* xq,
                                            const float* xd, const int* xs) {
    const uint4* b = (const uint4*)(wr + blk * 144);
    const i8* a = xq + blk * 256 + 16 * p;
    return q4k_lane_dot(b[0], b[1 + p], *(const int4*)a, *(const int4*)(a + 128),
                        *(const int2*)(xs + blk * 16 + 2 * p), xd[blk], p >> 1);
}
// Q6_K repacked from the ring (ql | qh | scales of the chunk's nbk blocks; d from global dg).
__device__ __forceinline__ void fd_q6_load(const u8* st, const u16* dg, int nbk, int B, int p,
                                           Q6KRaw& r) {
    Q6KS::load_fields<false>(st, st + nbk * 128, st + nbk * 192, dg, B, p, r);
}

// RMS norm of x (n values, written by other blocks: L2 loads) times w, quantised to Q8_K into
// shared memory; every block computes all of it (cheaper than another barrier).
__device__ void fd_norm_q8k(const float* x, const float* __restrict__ w, int n, float eps,
                            i8* sxq, float* sxd, int* sxs, float* red) {
    // Warp w takes 256-blocks w, w + FD_NW (n <= FD_NORM_MAX, host-checked): its x and w
    // values are loaded in one round and kept for the quantisation after the block's sum.
    constexpr int R = FD_NORM_MAX / 256 / FD_NW;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nblk = n / 256;
    float4 xv[R][2], wv[R][2];
    float ss = 0.f;
#pragma unroll
    for (int u = 0; u < R; u++) {
        const int blk = warp + u * FD_NW, e = blk * 256 + lane * 8;
        const bool ok = blk < nblk;
        const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
        xv[u][0] = ok ? __ldcg((const float4*)(x + e)) : z;
        xv[u][1] = ok ? __ldcg((const float4*)(x + e + 4)) : z;
        wv[u][0] = ok ? __ldg((const float4*)(w + e)) : z;
        wv[u][1] = ok ? __ldg((const float4*)(w + e + 4)) : z;
    }
#pragma unroll
    for (int u = 0; u < R; u++)
#pragma unroll
        for (int k = 0; k < 2; k++)
            ss += xv[u][k].x * xv[u][k].x + xv[u][k].y * xv[u][k].y + xv[u][k].z * xv[u][k].z +
                  xv[u][k].w * xv[u][k].w;
    ss = warp_sum(ss);
    if (lane == 0) red[warp] = ss;
    fd_sync();
    float tot = 0.f;
#pragma unroll
    for (int i = 0; i < FD_NW; i++) tot += red[i];
    const float inv = 1.f / sqrtf(tot / (float)n + eps);
#pragma unroll
    for (int u = 0; u < R; u++) {
        const int blk = warp + u * FD_NW;
        if (blk >= nblk) break;
        const float4 x0 = xv[u][0], x1 = xv[u][1], w0 = wv[u][0], w1 = wv[u][1];
        const float v[8] = {x0.x * inv * w0.x, x0.y * inv * w0.y, x0.z * inv * w0.z,
                            x0.w * inv * w0.w, x1.x * inv * w1.x, x1.y * inv * w1.y,
                            x1.z * inv * w1.z, x1.w * inv * w1.w};
        q8k_vals(v, sxq, sxd, sxs, blk, lane);
    }
    fd_sync();
}

// GLU of gate and up (n values, other blocks': L2 loads), quantised to Q8_K in shared memory.
__device__ void fd_glu_q8k(const float* gate, const float* up, int n, int act, i8* sxq,
                           float* sxd, int* sxs) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // Two 256-blocks per warp and round: their loads in flight together.
    for (int b0 = warp; b0 < n / 256; b0 += 2 * FD_NW) {
        float4 gv[2][2], uv[2][2];
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int blk = b0 + u * FD_NW, e = blk * 256 + lane * 8;
            const bool ok = blk < n / 256;
            const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
            gv[u][0] = ok ? __ldcg((const float4*)(gate + e)) : z;
            gv[u][1] = ok ? __ldcg((const float4*)(gate + e + 4)) : z;
            uv[u][0] = ok ? __ldcg((const float4*)(up + e)) : z;
            uv[u][1] = ok ? __ldcg((const float4*)(up + e + 4)) : z;
        }
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const int blk = b0 + u * FD_NW;
            if (blk >= n / 256) break;
            const float4 g0 = gv[u][0], g1 = gv[u][1], u0 = uv[u][0], u1 = uv[u][1];
            const float v[8] = {glu_one(g0.x, u0.x, act), glu_one(g0.y, u0.y, act),
                                glu_one(g0.z, u0.z, act), glu_one(g0.w, u0.w, act),
                                glu_one(g1.x, u1.x, act), glu_one(g1.y, u1.y, act),
                                glu_one(g1.z, u1.z, act), glu_one(g1.w, u1.w, act)};
            q8k_vals(v, sxq, sxd, sxs, blk, lane);
        }
    }
    fd_sync();
}

// The consumers' side of matrices m0 .. m1 (one phase: the same activations in shared
// memory). g: this block's next chunk of the token; it: its ring position; tw: the warp's next
// task, counted from the current chunk's first.
__device__ void fd_matvecs(const FdArgs& A, int m0, int m1, u8* ring, const i8* sxq,
                           const float* sxd, const int* sxs, float* part, int* rcnt, u32 full0,
                           u32 empty0, int& g, u32& it, int& tw) {
    const int lane = threadIdx.x & 31, p = lane & 7;
    for (int m = m0; m < m1; m++) {
        const FdMat M = A.mats[m];
        const int nb = M.cols / 256, C = M.crows, WPR = 1 << M.lwpr, T = C * WPR;
        const int stp = 4 * WPR, gend = M.chunk0 + M.nch;
        for (; g < gend; g += gridDim.x, it++) {
            const int s = (int)(it % FD_STAGES);
            fd_wait(full0 + 8 * s, (it / FD_STAGES) & 1, false);
            const int row0 = (g - M.chunk0) * C, nr = min(C, M.rows - row0);
            const u8* st = ring + s * FD_STAGE_BYTES;
            for (; tw < T; tw += FD_NW) {
                const int r = tw >> M.lwpr, k = tw & (WPR - 1);
                if (r >= nr) continue;
                float acc = 0.f;
                int blk = (lane >> 3) + 4 * k;
                if (M.ty == 0) {
                    const u8* wr = st + r * nb * 144;
                    for (; blk < nb; blk += stp) acc += fd_q4k_dot(wr, blk, p, sxq, sxd, sxs);
                } else {
                    const int nbk = nr * nb, B = r * nb;
                    const u16* dg = (const u16*)(M.w + (long long)M.rows * nb * 208) + (long long)row0 * nb;
                    for (; blk + 2 * stp < nb; blk += 3 * stp) {
                        Q6KRaw q[3];
#pragma unroll
                        for (int u = 0; u < 3; u++) fd_q6_load(st, dg, nbk, B + blk + u * stp, p, q[u]);
#pragma unroll
                        for (int u = 0; u < 3; u++) acc += Q6K::dot(q[u], blk + u * stp, p, sxq, sxd, sxs);
                    }
                    for (; blk < nb; blk += stp) {
                        Q6KRaw q0;
                        fd_q6_load(st, dg, nbk, B + blk, p, q0);
                        acc += Q6K::dot(q0, blk, p, sxq, sxd, sxs);
                    }
                }
                const float v = warp_sum(acc);
                if (lane == 0) {
                    float tot = v;
                    bool out = WPR == 1;
                    if (!out) {
                        float* pr = part + (s * FD_MAXC + r) * FD_MAXW;
                        pr[k] = v;
                        __threadfence_block();
                        if (atomicAdd(rcnt + s * FD_MAXC + r, 1) == WPR - 1) {
                            __threadfence_block();
                            tot = pr[0];
                            for (int q = 1; q < WPR; q++) tot += pr[q];
                            rcnt[s * FD_MAXC + r] = 0;
                            out = true;
                        }
                    }
                    if (out) {
                        float* yo = M.y + row0 + r;
                        *yo = M.accumulate ? __ldcg(yo) + tot : tot;
                    }
                }
            }
            tw -= T;
            __syncwarp();
            if (lane == 0)
                asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(empty0 + 8 * s) : "memory");
        }
    }
}

// The rotated pair i of a head's row x (hd values; RoPE as rope_at / rope_apply).
__device__ __forceinline__ void fd_rope_pair(const float* x, float* out, int i, int hd, int pos,
                                             float theta_scale, int neox) {
    const int half = hd / 2;
    float theta = (float)pos;
    for (int k = 0; k < i; k++) theta *= theta_scale;
    const float c = cosf(theta), s = sinf(theta);
    const int ea = neox ? i : 2 * i, eb = neox ? i + half : 2 * i + 1;
    const float x0 = __ldcg(x + ea), x1 = __ldcg(x + eb);
    out[ea] = x0 * c - x1 * s;
    out[eb] = x0 * s + x1 * c;
}

// One head's attention for the new position, by one block (heads h = blockIdx.x, + grid):
// warp 0 rotates q (rounded to f16, as the cache's dot does), warp 1 rotates k (rounded to
// f16, as the cache holds it) and stores k and v into the cache. Scores: lane = key (keys warp * 32 + lane + 512 r), the K row's loads 8 at a time
// in flight, kept in shared memory; block max and total (in warp order); probabilities
// rounded to f16 as the CPU does; P.V with the keys split over the warps in order (lane: hd/32
// dims, 16 keys' loads in flight), the warps' partials added in warp order into att.
// at: shared scratch (FD_ATT_FLOATS); part: FD_NW * hd floats of shared scratch.
template <int DPL>
__device__ __forceinline__ void fd_pv_keys(const u16* vb, int kvd, int len, const float* pj,
                                           float (&acc)[4]) {
    for (int jb = 0; jb < len; jb += 16) {
        uint2 raw[16];
#pragma unroll
        for (int u = 0; u < 16; u++) {
            raw[u] = make_uint2(0u, 0u);
            if (jb + u < len) {
                const u16* p = vb + (long long)(jb + u) * kvd;
                if (DPL == 4) raw[u] = __ldcg((const uint2*)p);
                else raw[u].x = __ldcg((const unsigned int*)p);
            }
        }
#pragma unroll
        for (int u = 0; u < 16; u++) {
            if (jb + u < len) {
                const float pv = pj[jb + u];
                acc[0] += pv * h2f((u16)(raw[u].x & 0xffff));
                acc[1] += pv * h2f((u16)(raw[u].x >> 16));
                if (DPL == 4) {
                    acc[2] += pv * h2f((u16)(raw[u].y & 0xffff));
                    acc[3] += pv * h2f((u16)(raw[u].y >> 16));
                }
            }
        }
    }
}
__device__ void fd_attention(const FdArgs& A, const FdLayer& L, float* at, float* part) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int hd = A.hd, kvd = A.n_head_kv * hd, group = A.n_head / A.n_head_kv;
    const int nk = A.pos + 1, dpl = hd / 32;
    float* qs = at;
    float* ks = at + 128;
    float* red = at + 256;
    float* sc = at + 320;
    for (int h = blockIdx.x; h < A.n_head; h += gridDim.x) {
        const int kvh = h / group;
        if (warp == 0) {
            for (int i = lane; i < hd / 2; i += 32)
                fd_rope_pair(A.q + h * hd, qs, i, hd, A.pos, A.theta_scale, A.neox);
            __syncwarp();
            for (int d = lane; d < hd; d += 32) qs[d] = h2f(f2h(qs[d]));
        } else if (warp == 1) {
            for (int i = lane; i < hd / 2; i += 32)
                fd_rope_pair(A.k + kvh * hd, ks, i, hd, A.pos, A.theta_scale, A.neox);
            __syncwarp();
            for (int d = lane; d < hd; d += 32) {
                const u16 kh = f2h(ks[d]);
                ks[d] = h2f(kh);
                // Every head of a kv group stores the same row: each block's P.V below then
                // reads its own store of v (another head's block may not have run yet).
                const long long row = (long long)(A.kv_base + A.pos) * kvd + kvh * hd + d;
                L.kc[row] = kh;
                L.vc[row] = f2h(__ldcg(A.v + kvh * hd + d));
            }
        }
        fd_sync();
        float m = NEG_INF;
        for (int j0 = warp * 32; j0 < nk; j0 += FD_NW * 32) {
            const int j = j0 + lane;
            if (j >= nk) continue;
            float dot = 0.f;
            if (j == A.pos) {
                for (int d = 0; d < hd; d++) dot += qs[d] * ks[d];
            } else {
                const uint4* kr = (const uint4*)(L.kc + (long long)(A.kv_base + j) * kvd + kvh * hd);
                for (int r0 = 0; r0 < hd / 8; r0 += 8) {
                    uint4 raw[8];
#pragma unroll
                    for (int u = 0; u < 8; u++) raw[u] = __ldcg(kr + r0 + u);
#pragma unroll
                    for (int u = 0; u < 8; u++) {
                        const float* qd = qs + (r0 + u) * 8;
                        const float4 a = h4f(make_uint2(raw[u].x, raw[u].y));
                        const float4 b = h4f(make_uint2(raw[u].z, raw[u].w));
                        dot += qd[0] * a.x + qd[1] * a.y + qd[2] * a.z + qd[3] * a.w;
                        dot += qd[4] * b.x + qd[5] * b.y + qd[6] * b.z + qd[7] * b.w;
                    }
                }
            }
            dot *= A.attn_scale;
            sc[j] = dot;
            m = fmaxf(m, dot);
        }
        m = warp_max(m);
        if (lane == 0) red[warp] = m;
        fd_sync();
        m = red[0];
#pragma unroll
        for (int i = 1; i < FD_NW; i++) m = fmaxf(m, red[i]);
        float l = 0.f;
        for (int j = warp * 32 + lane; j < nk; j += FD_NW * 32) l += expf(sc[j] - m);
        l = warp_sum(l);
        if (lane == 0) red[32 + warp] = l;
        fd_sync();
        float tot = 0.f;
#pragma unroll
        for (int i = 0; i < FD_NW; i++) tot += red[32 + i];
        const float inv = 1.f / tot;
        for (int j = warp * 32 + lane; j < nk; j += FD_NW * 32) sc[j] = h2f(f2h(expf(sc[j] - m) * inv));
        fd_sync();
        // Keys [k0, k0 + len) for this warp.
        const int per = (nk + FD_NW - 1) / FD_NW, k0 = min(nk, warp * per), len = min(nk, k0 + per) - k0;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        const u16* vb = L.vc + (long long)(A.kv_base + k0) * kvd + kvh * hd + lane * dpl;
        if (dpl == 4) fd_pv_keys<4>(vb, kvd, len, sc + k0, acc);
        else fd_pv_keys<2>(vb, kvd, len, sc + k0, acc);
        for (int e = 0; e < dpl; e++) part[warp * hd + lane * dpl + e] = acc[e];
        fd_sync();
        for (int d = threadIdx.x; d < hd; d += FD_NW * 32) {
            float v = part[d];
#pragma unroll
            for (int w = 1; w < FD_NW; w++) v += part[w * hd + d];
            A.att[h * hd + d] = v;
        }
        fd_sync();
    }
}

// The attention output (qd values, other blocks': L2 loads) to Q8_K in shared memory.
__device__ void fd_vec_q8k(const float* x, int n, i8* sxq, float* sxd, int* sxs) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int blk = warp; blk < n / 256; blk += FD_NW) {
        const int e = blk * 256 + lane * 8;
        const float4 x0 = __ldcg((const float4*)(x + e)), x1 = __ldcg((const float4*)(x + e + 4));
        const float v[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
        q8k_vals(v, sxq, sxd, sxs, blk, lane);
    }
    fd_sync();
}
#endif

extern "C" __global__ void __launch_bounds__((FD_NW + 1) * 32, 1) fd_decode(const FdArgs A) {
#if __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) u8 fsm[];
    u8* ring = fsm;
    i8* sxq = (i8*)(fsm + FD_OFF_XQ);
    float* sxd = (float*)(fsm + FD_OFF_XD);
    int* sxs = (int*)(fsm + FD_OFF_XS);
    float* part = (float*)(fsm + FD_OFF_PART);
    int* rcnt = (int*)(fsm + FD_OFF_RCNT);
    float* red = (float*)(fsm + FD_OFF_RED);
    float* att = (float*)(fsm + FD_OFF_ATT);
    unsigned long long* mbar = (unsigned long long*)(fsm + FD_OFF_MBAR);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 full0 = fd_smem(mbar), empty0 = fd_smem(mbar + FD_STAGES);
    for (int i = threadIdx.x; i < FD_STAGES * FD_MAXC; i += blockDim.x) rcnt[i] = 0;
    if (threadIdx.x == 0) {
        for (int s = 0; s < FD_STAGES; s++) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(full0 + 8 * s));
            asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(empty0 + 8 * s), "r"(FD_NW));
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    // Launched without dependent launch: the previous kernel (the embedding) is done.
    if (warp == FD_NW) {
        // Producer: every chunk of this block, in order; a stage is refilled once all
        // consumer warps have arrived on its `empty` barrier.
        if (lane != 0) return;
        const FdMat last = A.mats[A.n_mats - 1];
        const int total = last.chunk0 + last.nch;
        const unsigned long long pol = fd_evict_first();
        int m = 0;
        u32 it = 0;
        for (int g = blockIdx.x; g < total; g += gridDim.x, it++) {
            m = fd_mat_of(A, m, g);
            const int s = (int)(it % FD_STAGES);
            fd_wait(empty0 + 8 * s, ((it / FD_STAGES) & 1) ^ 1, true);
            // Pull the chunk FD_STAGES places further on toward L2 now: while the consumers
            // are in a phase without mat-vecs the ring fills in a few microseconds; the
            // prefetched chunks keep device memory busy beyond that.
            const int ga = g + FD_STAGES * gridDim.x;
            const int ma = fd_mat_of(A, m, ga);
            if (ma < A.n_mats) {
                const FdPieces P = fd_chunk(A.mats[ma], ga);
                for (int i = 0; i < P.n; i++) fd_prefetch(P.src[i], P.bytes[i]);
            }
            const FdPieces C = fd_chunk(A.mats[m], g);
            u32 dst = fd_smem(ring + s * FD_STAGE_BYTES);
            const u32 fb = full0 + 8 * s;
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(fb), "r"(C.total) : "memory");
            for (int i = 0; i < C.n; i++) {
                fd_bulk(dst, C.src[i], C.bytes[i], fb, pol);
                dst += C.bytes[i];
            }
        }
        return;
    }
    int g = blockIdx.x, tw = warp;
    u32 it = 0, bar = 0;
    // With a trace buffer, block 0 stamps the global timer between steps (FD_TRACE per layer).
    unsigned long long* trace = blockIdx.x == 0 && threadIdx.x == 0 ? A.trace : nullptr;
#define FD_STAMP(k)                                                                           \
    if (trace) {                                                                              \
        unsigned long long t;                                                                 \
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));                                  \
        trace[il * FD_TRACE + (k)] = t;                                                              \
    }
    for (int il = 0; il < A.n_layers; il++) {
        const FdLayer L = A.layers[il];
        FD_STAMP(0)
        fd_prefetch_kv(A, L);
        fd_norm_q8k(A.x, L.attn_norm, A.n_embd, A.eps, sxq, sxd, sxs, red);
        FD_STAMP(1)
        fd_matvecs(A, L.mat0, L.mat0 + 3, ring, sxq, sxd, sxs, part, rcnt, full0, empty0, g, it, tw);
        FD_STAMP(2)
        fd_grid_sync(A.gbar, bar++);
        FD_STAMP(3)
        fd_attention(A, L, att, (float*)sxq);
        FD_STAMP(4)
        fd_grid_sync(A.gbar, bar++);
        FD_STAMP(5)
        fd_vec_q8k(A.att, A.n_head * A.hd, sxq, sxd, sxs);
        FD_STAMP(6)
        fd_matvecs(A, L.mat0 + 3, L.mat0 + 4, ring, sxq, sxd, sxs, part, rcnt, full0, empty0, g, it, tw);
        FD_STAMP(7)
        fd_grid_sync(A.gbar, bar++);
        FD_STAMP(8)
        fd_norm_q8k(A.x, L.ffn_norm, A.n_embd, A.eps, sxq, sxd, sxs, red);
        FD_STAMP(9)
        fd_matvecs(A, L.mat0 + 4, L.mat0 + 6, ring, sxq, sxd, sxs, part, rcnt, full0, empty0, g, it, tw);
        FD_STAMP(10)
        fd_grid_sync(A.gbar, bar++);
        FD_STAMP(11)
        fd_glu_q8k(A.gate, A.up, A.n_ff, A.act, sxq, sxd, sxs);
        FD_STAMP(12)
        fd_matvecs(A, L.mat0 + 6, L.mat0 + 7, ring, sxq, sxd, sxs, part, rcnt, full0, empty0, g, it, tw);
        FD_STAMP(13)
        fd_grid_sync(A.gbar, bar++);
        FD_STAMP(14)
    }
#undef FD_STAMP
#endif
}

// Decode attention of a batch of ONE row as thread-block clusters (sm_90+). A cluster of
// CS blocks (ATC_CS = 8; 16 in `attn_cluster16_v64`, for 1025-2048 keys) covers HB = hpc
// heads (256 / hd, one Q8_K block of the output, where the output is quantised to Q8_K;
// else one head, so that a head has more blocks), each head split over S = CS / HB
// blocks by key range, so the split attention's exchanges through
// global memory (chunk stats, a spin until every chunk of the head has published, partials
// added by the last block to count, a second counter for the quantisation: ~10 dependent
// round trips) become two exchanges through the blocks' shared memory: each block sends its
// max and sum to its head's blocks, and its P.V partial to block 0, by asynchronous stores
// (st.async) that complete on the receiver's own mbarrier. (Cluster barriers did the same
// 1 us slower a call, 3% of a 13b token: their release is a GPU-wide memory fence.)
// Every K and V row but the newest was stored by an earlier token's launches, so the block's
// rows are bulk-copied into its shared memory BEFORE the dependent-launch wait; after it only
// q and the newest row (stored by the launch just before) are read. Arithmetic as the split
// kernels' (q rounded to f16, each block's max and sum of exp, the head's max and total from
// its blocks' in block order, probabilities rounded to f16, P.V per block, the blocks'
// partials added in block order) but for the order within a key's dot product (hd / 32 lanes
// a key, each with four 8-dim chains: one warp scores 8 or 16 keys at once instead of one
// key's 32 lanes meeting in 5 shuffles; 3.7 -> 1.9 us of a 13b call at 504 keys) and within a
// thread's P.V (four keys' loads in flight, four sums); then block 0 of the cluster quantises
// the 256 outputs to Q8_K (xq non-null; to Q8_0 with q8_0). hd 64 or 128 (host-checked); `kps_max` keys per
// block at most (the dynamic shared memory: K and V rows, then the scores).
// With nd > 0 the kernel also does rope_kv's work for the row, so that it follows the q/k/v
// mat-vec directly (one launch less, and its rows load while that mat-vec ends): q and the
// newest k are read unrotated (k and v from knew / vnew), rotated as rope_at / rope_apply
// do (angles before the wait), and the newest K/V row stored into the cache by one block of
// its kv head (the others use their own copy; hence kc / vc are not const); q and k are not
// written back.
#define ATC_CS 8
#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ u32 atc_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
// The address of this block's shared `p` in block `rank` of the cluster.
__device__ __forceinline__ u32 atc_map(const void* p, u32 rank) {
    u32 a;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(a) : "r"(fd_smem(p)), "r"(rank));
    return a;
}
// Asynchronous stores into another block's shared memory (a: mapa address), counted as
// bytes on the receiver's mbarrier (bar: mapa address of it).
__device__ __forceinline__ void atc_send2(u32 a, float x, float y, u32 bar) {
    asm volatile(
        "st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [%0], {%1, %2}, [%3];" ::"r"(
            a),
        "f"(x), "f"(y), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void atc_send4(u32 a, float4 v, u32 bar) {
    asm volatile(
        "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, "
        "[%5];" ::"r"(a),
        "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "r"(bar)
        : "memory");
}
#endif
// VK > 0 (`attn_cluster_v*`): only the K rows are staged in shared memory; thread t's V
// words of keys g, g + G, ... (g = t / (hd / 4), G = 512 / hd, at most VK of them) are loaded
// into registers before the dependent-launch wait, the newest row's from `vnew_s`. The block
// then needs less shared memory (~45 KB at 142 keys instead of 73), so that it may
// run in the mat-vecs' shared-memory configuration and start beside the q/k/v mat-vec's last
// blocks (docs/BENCHMARKS.md, "where a resident decode token goes now").
#define ATC_ARGS                                                                              \
    const float *__restrict__ q, u16 *kc, u16 *vc, int group, int hd, int kvd,                \
        const int *__restrict__ rowpos, const int *__restrict__ rowbase, int window,          \
        float scale, int kps_max, float *__restrict__ out, i8 *__restrict__ xq,               \
        float *__restrict__ xd, int *__restrict__ xs, const float *__restrict__ knew,          \
        const float *__restrict__ vnew, int nd, float theta_scale, int neox, int n_head,       \
        const float *__restrict__ bq, const float *__restrict__ bk, const float *__restrict__ bv, \
        int q8_0, int hpc
#if __CUDA_ARCH__ >= 900
// What a block of a decode-attention cluster (CS blocks) covers: head h (hi of the cluster's
// hpc), keys j0 .. j0 + len of its window (split of S = CS / hpc blocks a head), of
// which `nold` were stored by earlier tokens; its kv head's cache rows start at r0, column col.
// Where n_head is not a whole number of clusters (SmolLM2's 9 heads, Qwen2.5's 14), the last
// cluster's heads past n_head are phantoms: their blocks attend with the last real head (so
// that every block joins the cluster's exchanges alike) and `real` is false: they store
// nothing into the cache and their outputs are not written.
struct AtcPart {
    int S, cluster, hi, split, h, len, nold, col;
    bool newest, real;
    u32 rank;
    long long r0;
};
template <int CS>
__device__ __forceinline__ AtcPart atc_part(const int* rowpos, const int* rowbase, int window,
                                            int hd, int group, int n_head, int hpc) {
    AtcPart a;
    const int hb = hpc;
    a.S = CS / hb;
    a.rank = atc_rank();
    a.cluster = blockIdx.x / CS;
    a.hi = (int)a.rank / a.S;
    a.split = (int)a.rank % a.S;
    a.h = a.cluster * hb + a.hi;
    a.real = a.h < n_head;
    a.h = min(a.h, n_head - 1);
    int lo, nk;
    att_window(rowpos, 0, window, &lo, &nk);
    const int kps = (nk + a.S - 1) / a.S;
    const int j0 = min(nk, a.split * kps);
    a.len = min(nk, j0 + kps) - j0;
    a.newest = a.len > 0 && j0 + a.len == nk;
    a.nold = a.newest ? a.len - 1 : a.len;
    a.r0 = (long long)rowbase[0] + lo + j0;
    a.col = (a.h / group) * hd;
    return a;
}
// Thread 0: the exchange mbarriers (xbar[0]: the head's S stats; xbar[1], block 0 only: the
// cluster's CS partials of hd floats) and, with `bulk`, the bulk copies' barrier at `b`
// expecting `copies` bytes (maybe 0); the barriers' initialisation fenced for the cluster.
__device__ __forceinline__ void atc_init_barriers(unsigned long long* xbar, const AtcPart& a,
                                                  int CS, int hd, bool bulk, u32 b, u32 copies) {
    if (threadIdx.x != 0) return;
    if (bulk) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(b));
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(fd_smem(&xbar[0])));
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(fd_smem(&xbar[1])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(
                     fd_smem(&xbar[0])),
                 "r"((u32)a.S * 8u)
                 : "memory");
    if (a.rank == 0)
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(
                         fd_smem(&xbar[1])),
                     "r"((u32)CS * (u32)hd * 4u)
                     : "memory");
    if (bulk)
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(copies)
                     : "memory");
}
// RoPE: thread t's dim is element ea (x0 * c - x1 * s) or eb (x0 * s + x1 * c) of pair i
// (pa, pb), as rope_at / rope_apply compute them; dims past nd stay (computed before the wait:
// the row's position was uploaded before the token's first launch).
struct AtcRope {
    int pa, pb;
    float rc, rs;
};
__device__ __forceinline__ AtcRope atc_rope(const int* rowpos, int nd, float theta_scale,
                                            int neox) {
    const int t = threadIdx.x, half = nd / 2;
    AtcRope r{t, t, 1.f, 0.f};
    if (t < nd) {
        const int i = neox ? t % half : t / 2;
        r.pa = neox ? i : 2 * i;
        r.pb = neox ? i + half : 2 * i + 1;
        float theta = (float)rowpos[0];
        for (int k = 0; k < i; k++) theta *= theta_scale;
        r.rc = cosf(theta);
        r.rs = sinf(theta);
    }
    return r;
}
// After the dependent-launch wait. With nd > 0: q of head h and the newest k rotated (q into
// qs), the newest K/V row as f16 into kdst / vdst (shared) and, by one block of its kv head,
// into the cache (the others use their own copy); with biases (Qwen2's; bq non-null) each
// of q, k, v plus its bias first, the f32 addition add_bias would make. With nd == 0 (q rotated and the row stored
// by the launch just before): the newest row from the cache into kdst / vdst. kdst / vdst:
// hd halves each, written only where the block has the newest key.
__device__ __forceinline__ void atc_newest(const AtcPart& a, const AtcRope& r, int nd, int hd,
                                           int group, int kvd, const int* rowpos,
                                           const int* rowbase, const float* q,
                                           const float* knew, const float* vnew, u16* kc, u16* vc,
                                           float* qs, float* ks, u16* kdst, u16* vdst,
                                           const float* bq, const float* bk, const float* bv) {
    const int t = threadIdx.x, warp = t >> 5, lane = t & 31;
    if (nd > 0) {
        const int kvh = a.h / group;
        const long long iq = (long long)a.h * hd + t, ik = (long long)kvh * hd + t;
        if (t < hd) {
            qs[t] = bq != nullptr ? q[iq] + bq[iq] : q[iq];
            if (a.newest) ks[t] = bq != nullptr ? knew[ik] + bk[ik] : knew[ik];
        }
        __syncthreads();
        const auto rotated = [&](const float* x) {
            const float x0 = x[r.pa], x1 = x[r.pb];
            return t >= nd ? x0 : t == r.pa ? x0 * r.rc - x1 * r.rs : x0 * r.rs + x1 * r.rc;
        };
        float qr = 0.f;
        if (t < hd) {
            qr = rotated(qs);
            if (a.newest) {
                const u16 kh = f2h(rotated(ks));
                const u16 vh = f2h(bq != nullptr ? vnew[ik] + bv[ik] : vnew[ik]);
                kdst[t] = kh;
                vdst[t] = vh;
                if (a.real && a.h % group == 0) {
                    const long long row = ((long long)rowbase[0] + rowpos[0]) * kvd + a.col + t;
                    kc[row] = kh;
                    vc[row] = vh;
                }
            }
        }
        __syncthreads();
        if (t < hd) qs[t] = qr;
        __syncthreads();
    }
    if (nd == 0 && a.newest && warp == 0) {
        for (int d = lane * 4; d < hd; d += 128) {
            const long long rn = (a.r0 + a.len - 1) * kvd + a.col + d;
            *(uint2*)(kdst + d) = __ldcg((const uint2*)(kc + rn));
            *(uint2*)(vdst + d) = __ldcg((const uint2*)(vc + rn));
        }
    }
}
// The block's scores sc[0 .. len) become its probabilities: its max and sum of exp go to the
// head's S blocks (thread c sends to block c, slot `split`), the head's max and total are
// formed from them in block order (the same in each block), then exp(s - M) / total rounded
// to f16. Ends with a barrier.
template <int CS>
__device__ __forceinline__ void atc_softmax(float* sc, const AtcPart& a, float* red,
                                            float2* stats_in, unsigned long long* xbar) {
    float m, l;
    att_block_stats(sc, a.len, red, m, l);
    if (threadIdx.x < a.S) {
        const u32 to = (u32)(a.hi * a.S + threadIdx.x);
        atc_send2(atc_map(&stats_in[a.split], to), m, l, atc_map(&xbar[0], to));
    }
    fd_wait(fd_smem(&xbar[0]), 0, false);
    float M = NEG_INF, tot = 0.f;
#pragma unroll
    for (int c = 0; c < CS; c++)
        if (c < a.S) M = fmaxf(M, stats_in[c].x);
#pragma unroll
    for (int c = 0; c < CS; c++) {
        const float2 st = c < a.S ? stats_in[c] : make_float2(0.f, 0.f);
        if (st.y > 0.f) tot += st.y * expf(st.x - M);
    }
    const float inv = 1.f / tot;
    for (int j = threadIdx.x; j < a.len; j += blockDim.x) sc[j] = h2f(f2h(expf(sc[j] - M) * inv));
    __syncthreads();
}
// The thread's four P.V sums added, the block's groups summed and sent to block 0 (its slot
// `rank`); block 0 then adds its heads' partials in block order into the cluster's hpc * hd
// outputs (lane l elements 8l .. 8l + 7, head 8l / hd; lanes past them idle), stores those of
// real heads (`width` = n_head * hd outputs in all) and quantises them to Q8_K (xq non-null:
// the host passes it only for whole clusters of 256 outputs) or, with q8_0, those of real
// heads to Q8_0. No block reads
// another's shared memory, and every block a send goes to waits for it before it leaves: no
// barrier at the end.
template <int CS>
__device__ __forceinline__ void atc_finish(float4 acc, const float4& a1, const float4& a2,
                                           const float4& a3, const AtcPart& a, int hd,
                                           float4* acc4, float* parts_in,
                                           unsigned long long* xbar, float* out, i8* xq,
                                           float* xd, int* xs, int width, int q8_0, int hpc) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int q4 = hd >> 2, G = 128 / q4;
    acc = make_float4((acc.x + a1.x) + (a2.x + a3.x), (acc.y + a1.y) + (a2.y + a3.y),
                      (acc.z + a1.z) + (a2.z + a3.z), (acc.w + a1.w) + (a2.w + a3.w));
    acc4[threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x < q4)
        atc_send4(atc_map(parts_in + a.rank * hd + 4 * threadIdx.x, 0),
                  att_groups_sum(acc4, q4, G), atc_map(&xbar[1], 0));
    if (a.rank == 0 && warp == 0) {
        fd_wait(fd_smem(&xbar[1]), 0, false);
        const int ho = hpc * hd, e = 8 * lane, hh = e / hd, dd = e % hd;
        const bool live = e < ho;
        float v[8];
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = 0.f;
#pragma unroll
        for (int c = 0; c < CS; c++) {
            if (c < a.S && live) {
                const float* pc = parts_in + (hh * a.S + c) * hd + dd;
                const float4 x0 = *(const float4*)pc, x1 = *(const float4*)(pc + 4);
                v[0] += x0.x;
                v[1] += x0.y;
                v[2] += x0.z;
                v[3] += x0.w;
                v[4] += x1.x;
                v[5] += x1.y;
                v[6] += x1.z;
                v[7] += x1.w;
            }
        }
        // (hd is a multiple of 8: a lane's 8 outputs are all of one head.)
        const bool keep = live && a.cluster * ho + e < width;
        float* o = out + (long long)a.cluster * ho + e;
        if (keep) {
            *(float4*)o = make_float4(v[0], v[1], v[2], v[3]);
            *(float4*)(o + 4) = make_float4(v[4], v[5], v[6], v[7]);
        }
        // (ho is a multiple of 32: Q8_0 blocks never straddle two clusters.)
        if (xq != nullptr && q8_0)
            q8_0_vals(v, xq, xd, xs, (long long)a.cluster * (ho / 32), lane, keep);
        else if (xq != nullptr && ho == 256)
            q8k_vals(v, xq, xd, xs, a.cluster, lane);
    }
}
// One quad of a thread's P.V keys j, j + G, j + 2G, j + 3G (j < len): into the four sums
// while the whole quad is below len, else each key below len into acc, in key order — the
// order of attn_cluster's loops. vrow(key): the key's V row, at this thread's dims.
template <class VRow>
__device__ __forceinline__ void atc_pv_quad(int j, int G, int len, const float* p,
                                            const VRow& vrow, float4& acc, float4& a1,
                                            float4& a2, float4& a3) {
    if (j + 3 * G < len) {
        const uint2 v0 = vrow(j), v1 = vrow(j + G), v2 = vrow(j + 2 * G), v3 = vrow(j + 3 * G);
        att_axpy(acc, p[j], h4f(v0));
        att_axpy(a1, p[j + G], h4f(v1));
        att_axpy(a2, p[j + 2 * G], h4f(v2));
        att_axpy(a3, p[j + 3 * G], h4f(v3));
    } else {
        for (int k = j; k < len; k += G) att_axpy(acc, p[k], h4f(vrow(k)));
    }
}
#endif
// HDM: the largest head size the instance takes (128; 256 for Gemma 3's heads, without the
// fused RoPE: nd must be 0 there).
template <int VK, int CS, int HDM = 128>
__device__ __forceinline__ void attn_cluster_impl(ATC_ARGS) {
#if __CUDA_ARCH__ >= 900
    extern __shared__ __align__(16) unsigned char atc_dyn[];
    __shared__ __align__(8) unsigned long long bar;
    __shared__ float red[4];
    __shared__ float4 acc4[128];
    __shared__ __align__(16) float qs[128];
    __shared__ float ks[128];
    // What other blocks send here, and the mbarriers it arrives on ([0]: the head's stats,
    // by split; [1], block 0 only: every block's partial, by rank).
    __shared__ __align__(8) unsigned long long xbar[2];
    __shared__ __align__(8) float2 stats_in[CS];
    __shared__ __align__(16) float parts_in[CS * HDM];
    __shared__ __align__(16) u16 vnew_s[VK > 0 ? HDM : 1];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const AtcPart a = atc_part<CS>(rowpos, rowbase, window, hd, group, n_head, hpc);
    const int len = a.len, nold = a.nold;
    u16* Ks = (u16*)atc_dyn;
    u16* Vs = Ks + (long long)kps_max * hd;  // VK > 0: not there (sc follows Ks)
    float* sc = (float*)(VK > 0 ? Vs : Vs + (long long)kps_max * hd);
    const long long r0 = a.r0;
    const int col = a.col;
    const u32 rb = (u32)hd * 2, b = fd_smem(&bar);
    atc_init_barriers(xbar, a, CS, hd, true, b, (VK > 0 ? 1u : 2u) * (u32)nold * rb);
    __syncthreads();
    // Every block's mbarriers are initialised before any block sends to them (the wait is
    // before the dependent-launch wait, so it overlaps the previous kernel).
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    // One bulk copy per row (16-byte cp.async per thread measured the same); VK > 0: K only.
    for (int j = threadIdx.x; j < (VK > 0 ? 1 : 2) * nold; j += blockDim.x) {
        const int key = VK > 0 ? j : j >> 1;
        const bool is_v = VK > 0 ? false : (j & 1) != 0;
        const u16* src = (is_v ? vc : kc) + (r0 + key) * kvd + col;
        u16* dst = (is_v ? Vs : Ks) + key * hd;
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                fd_smem(dst)),
            "l"(src), "r"(rb), "r"(b)
            : "memory");
    }
    // VK > 0: this thread's V words of the old keys (P.V's layout, below), in flight across
    // the wait (an earlier token's launches stored them; the host sized VK >= its keys).
    uint2 vreg[VK > 0 ? VK : 1];
    if (VK > 0) {
        const int vq4 = hd >> 2, vG = 128 / vq4, vg = threadIdx.x / vq4;
        const int vd4 = (threadIdx.x - vg * vq4) * 4;
#pragma unroll
        for (int i = 0; i < VK; i++) {
            const int j = vg + vG * i;
            vreg[i] = j < nold ? __ldcg((const uint2*)(vc + (r0 + j) * kvd + col + vd4))
                               : make_uint2(0u, 0u);
        }
    }
    const AtcRope rope = atc_rope(rowpos, nd, theta_scale, neox);
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
    pdl_enter();
    // The newest row goes where its key's K and V are read: row len - 1 of Ks (and Vs, or
    // vnew_s with V in registers).
    atc_newest(a, rope, nd, hd, group, kvd, rowpos, rowbase, q, knew, vnew, kc, vc, qs, ks,
               Ks + (len - 1) * hd, VK > 0 ? vnew_s : Vs + (len - 1) * hd, bq, bk, bv);
    fd_wait(b, 0, false);
    __syncthreads();
    // Scores: LK = hd / 32 lanes per key; a warp scores 32 / LK keys at a time.
    const int LK = hd >> 5, sub = lane % LK, kl = lane / LK, kpw = 32 / LK;
    float qd[32];
    atc_q(nd > 0 ? qs : q + (long long)a.h * hd, sub, LK, qd);
    for (int jw = warp * kpw; jw < len; jw += 4 * kpw) {
        const int key = jw + kl;
        const float s = atc_score(Ks + min(key, len - 1) * hd, qd, sub, LK, scale);
        if (sub == 0 && key < len) sc[key] = s;
    }
    __syncthreads();
    atc_softmax<CS>(sc, a, red, stats_in, xbar);
    // P.V: thread i takes dims 4 * (i % q4) .. + 3 of keys i / q4, + G, ... (q4 = hd / 4).
    const int q4 = hd >> 2, G = 128 / q4, g = threadIdx.x / q4, d4 = (threadIdx.x - g * q4) * 4;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    // Four keys' loads in flight and four sums, added at the end.
    float4 a1 = acc, a2 = acc, a3 = acc;
    int j = g;
    if (VK > 0) {
        // The loops below' sums, in their order: key g + G * i into sum i % 4 while its whole
        // group of four is below len, the rest into acc; the newest key's V from vnew_s.
#pragma unroll
        for (int i = 0; i < VK; i++) {
            const int key = g + G * i;
            if (key < len) {
                const bool quad = g + G * ((i & ~3) + 3) < len;
                const uint2 raw = key < nold ? vreg[i] : *(const uint2*)(vnew_s + d4);
                const float pk = sc[key];
                const float4 vk = h4f(raw);
                if ((i & 3) == 0 || !quad)
                    att_axpy(acc, pk, vk);
                else if ((i & 3) == 1)
                    att_axpy(a1, pk, vk);
                else if ((i & 3) == 2)
                    att_axpy(a2, pk, vk);
                else
                    att_axpy(a3, pk, vk);
            }
        }
        j = len;  // nothing left for the loop below
    }
    const auto vrow = [&](int key) { return *(const uint2*)(Vs + key * hd + d4); };
    for (; j < len; j += 4 * G) atc_pv_quad(j, G, len, sc, vrow, acc, a1, a2, a3);
    atc_finish<CS>(acc, a1, a2, a3, a, hd, acc4, parts_in, xbar, out, xq, xd, xs, n_head * hd, q8_0, hpc);
#else
    asm volatile("trap;");
#endif
}
#define ATC_PARAMS                                                                            \
    q, kc, vc, group, hd, kvd, rowpos, rowbase, window, scale, kps_max, out, xq, xd, xs, knew, \
        vnew, nd, theta_scale, neox, n_head, bq, bk, bv, q8_0, hpc
extern "C" __global__ void __launch_bounds__(128) attn_cluster(ATC_ARGS) {
    attn_cluster_impl<0, ATC_CS>(ATC_PARAMS);
}
// V in registers: up to 16 / 36 / 64 keys a thread (G = 4 for 128-dim heads: 64 / 144 / 256
// keys a block).
extern "C" __global__ void __launch_bounds__(128) attn_cluster_v16(ATC_ARGS) {
    attn_cluster_impl<16, ATC_CS>(ATC_PARAMS);
}
extern "C" __global__ void __launch_bounds__(128) attn_cluster_v36(ATC_ARGS) {
    attn_cluster_impl<36, ATC_CS>(ATC_PARAMS);
}
extern "C" __global__ void __launch_bounds__(128) attn_cluster_v64(ATC_ARGS) {
    attn_cluster_impl<64, ATC_CS>(ATC_PARAMS);
}
// 256-dim heads (Gemma 3), a head a cluster, without the fused RoPE (nd = 0: q rotated and
// the row stored by the launches before).
extern "C" __global__ void __launch_bounds__(128) attn_cluster_h256(ATC_ARGS) {
    attn_cluster_impl<0, ATC_CS, 256>(ATC_PARAMS);
}
extern "C" __global__ void __launch_bounds__(128) attn_cluster_v16_h256(ATC_ARGS) {
    attn_cluster_impl<16, ATC_CS, 256>(ATC_PARAMS);
}
extern "C" __global__ void __launch_bounds__(128) attn_cluster_v36_h256(ATC_ARGS) {
    attn_cluster_impl<36, ATC_CS, 256>(ATC_PARAMS);
}
extern "C" __global__ void __launch_bounds__(128) attn_cluster_v64_h256(ATC_ARGS) {
    attn_cluster_impl<64, ATC_CS, 256>(ATC_PARAMS);
}
// Past 1024 keys: clusters of 16 blocks (a non-portable size, opted in by the host), so a
// 128-dim head is split over 8 blocks of up to 256 keys (2048 keys), V in registers.
extern "C" __global__ void __launch_bounds__(128) attn_cluster16_v64(ATC_ARGS) {
    attn_cluster_impl<64, 16>(ATC_PARAMS);
}

// Decode attention at any length (`attn_stream16`): attn_cluster16_v64's clusters, split,
// exchanges and sums (so the same bits where both apply), but the block's K rows and then its
// V rows stream through a ring of ATS_ST stages of ATS_STAGE bytes (32 keys of a 128-dim head,
// 64 of a 64-dim one) by 16-byte cp.async, ATS_ST - 1 tiles ahead of the one being used, the
// first ones issued before the dependent-launch wait (rows of earlier tokens only; the newest
// row comes from knew_s / vnew_s). So its shared memory is the ring and the scores (4 bytes a
// key) at any context, and its registers attn_cluster's without V: its blocks fit one wave (a
// 13b's 320 at 3 an SM) where attn_cluster16_v64's 247 registers allowed 2 an SM (2.4 waves
// past 1024 keys) and past 2048 keys, where no register-held kernel applies and the split
// attention took ~77 us a layer of a 13b at 4k keys (docs/BENCHMARKS.md). The V tiles load
// while the block exchanges its stats. Decode takes it past the 576 keys attn_cluster_v36
// holds (ATTN_STREAM_FROM, lib.rs); at 505-568 keys the 8-block kernels with V in registers
// were ~8% faster a token.
template <int CS, int ATS_ST, int ATS_STAGE>
__device__ __forceinline__ void attn_stream_impl(ATC_ARGS) {
#if __CUDA_ARCH__ >= 900
    extern __shared__ __align__(16) unsigned char atc_dyn[];
    __shared__ float red[4];
    __shared__ float4 acc4[128];
    __shared__ __align__(16) float qs[128];
    __shared__ float ks[128];
    __shared__ __align__(8) unsigned long long xbar[2];
    __shared__ __align__(8) float2 stats_in[CS];
    __shared__ __align__(16) float parts_in[CS * 128];
    __shared__ __align__(16) u16 knew_s[128];
    __shared__ __align__(16) u16 vnew_s[128];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const AtcPart a = atc_part<CS>(rowpos, rowbase, window, hd, group, n_head, hpc);
    const int len = a.len, nold = a.nold;
    u16* ring = (u16*)atc_dyn;
    float* sc = (float*)(atc_dyn + ATS_ST * ATS_STAGE);
    // Keys a tile (a power of two, at least 32); tiles of K over [0, len), then as many of V.
    const int tk = ATS_STAGE / (hd * 2), nt = (len + tk - 1) / tk;
    atc_init_barriers(xbar, a, CS, hd, false, 0u, 0u);
    __syncthreads();
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    // Tile u's cached rows (< nold) into stage u % ATS_ST, 16 bytes a thread at a time; one
    // commit group per tile, empty past the last, so that the wait below counts alike.
    const int cpr = hd / 8;  // 16-byte pieces a row
    const auto issue = [&](int u) {
        if (u < 2 * nt) {
            const bool is_v = u >= nt;
            const int t0 = (is_v ? u - nt : u) * tk, rows = min(tk, nold - t0);
            const u16* src = (is_v ? vc : kc) + (a.r0 + t0) * kvd + a.col;
            const u32 dst = fd_smem(ring + (u % ATS_ST) * (ATS_STAGE / 2));
            for (int c = threadIdx.x; c < rows * cpr; c += blockDim.x) {
                const int r = c / cpr, e = (c - r * cpr) * 8;
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst + (r * hd + e) * 2),
                             "l"(src + (long long)r * kvd + e)
                             : "memory");
            }
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    for (int u = 0; u < ATS_ST - 1; u++) issue(u);
    const AtcRope rope = atc_rope(rowpos, nd, theta_scale, neox);
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
    pdl_enter();
    atc_newest(a, rope, nd, hd, group, kvd, rowpos, rowbase, q, knew, vnew, kc, vc, qs, ks, knew_s,
               vnew_s, bq, bk, bv);
    const int LK = hd >> 5, sub = lane % LK, kl = lane / LK, kpw = 32 / LK;
    float qd[32];
    atc_q(nd > 0 ? qs : q + (long long)a.h * hd, sub, LK, qd);
    // Tile u: once this thread's copies of it landed (ATS_ST - 2 later groups may be pending)
    // and every thread's (the barrier, which also frees the stage the next issue reuses).
    const auto next_tile = [&](int u) {
        asm volatile("cp.async.wait_group %0;" ::"n"(ATS_ST - 2) : "memory");
        __syncthreads();
        issue(u + ATS_ST - 1);
        return ring + (u % ATS_ST) * (ATS_STAGE / 2);
    };
    // Scores: rounds of the 4 warps' 32 / LK keys each (tk is a multiple of 4 * kpw).
    for (int u = 0; u < nt; u++) {
        const u16* kt = next_tile(u);
        const int kt0 = u * tk;
        for (int kk = warp * kpw + kl; kk < tk; kk += 4 * kpw) {
            const int key = kt0 + kk;
            const u16* kr = key < nold ? kt + kk * hd : knew_s;
            const float s = atc_score(kr, qd, sub, LK, scale);
            if (sub == 0 && key < len) sc[key] = s;
        }
    }
    __syncthreads();
    atc_softmax<CS>(sc, a, red, stats_in, xbar);
    // P.V: thread i takes dims 4 * (i % q4) .. + 3 of keys i / q4, + G, ... in quads of keys
    // (a tile holds whole quads: tk is a multiple of 4G).
    const int q4 = hd >> 2, G = 128 / q4, g = threadIdx.x / q4, d4 = (threadIdx.x - g * q4) * 4;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    float4 a1 = acc, a2 = acc, a3 = acc;
    for (int u = 0; u < nt; u++) {
        const u16* vt = next_tile(nt + u);
        const int kt0 = u * tk;
        const auto vrow = [&](int key) {
            return *(const uint2*)((key < nold ? vt + (key - kt0) * hd : vnew_s) + d4);
        };
        for (int j = kt0 + g; j < min(len, kt0 + tk); j += 4 * G)
            atc_pv_quad(j, G, len, sc, vrow, acc, a1, a2, a3);
    }
    atc_finish<CS>(acc, a1, a2, a3, a, hd, acc4, parts_in, xbar, out, xq, xd, xs, n_head * hd, q8_0, hpc);
#else
    asm volatile("trap;");
#endif
}
// Six stages of 8 KB (H200, 2026-11-29, 4k keys: 13b 205 / 219 / 229 tok/s with 3 / 4 / 6
// stages, 197 with 4 of 16 KB; more than 6 would leave 2 blocks an SM, not 3).
extern "C" __global__ void __launch_bounds__(128) attn_stream16(ATC_ARGS) {
    attn_stream_impl<16, 6, 8192>(ATC_PARAMS);
}

// A recorded decode pass (graph.rs) writes its few row positions with this kernel, the values
// in its arguments: a graph replays arguments it is given anew each pass, where a copy from
// host memory would replay whatever the recorded source address holds.
extern "C" __global__ void store_i32x4(int* dst, int n, int v0, int v1, int v2, int v3) {
    pdl_enter();
    const int t = threadIdx.x;
    if (t < n) dst[t] = t == 0 ? v0 : t == 1 ? v1 : t == 2 ? v2 : v3;
}
