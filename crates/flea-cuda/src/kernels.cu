// flea CUDA kernels, compiled at run time with NVRTC (no headers needed).
//
// Weight formats are GGML's (see crates/flea-quant/src/legacy.rs and kquants.rs). Every
// format is read in "units" of 8 consecutive elements: within a block, unit u covers
// elements 8u..8u+7, which always share one sub-block scale.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;

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

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
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
template <> __device__ __forceinline__ void deq8<TY_Q6_K>(const u8* b, int u, float* y) {
    int e = u * 8;
    int n = e >> 7, r = e & 127, quarter = r >> 5, l = r & 31;
    const u8* ql = b + n * 64 + l + (quarter & 1) * 32;
    const u8* qh = b + 128 + n * 32 + l;
    int lsh = (quarter >> 1) * 4;
    int hsh = quarter * 2;
    float dl = ldh(b + 208) * (float)((const i8*)(b + 192))[e >> 4];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int q = (((ql[i] >> lsh) & 15) | (((qh[i] >> hsh) & 3) << 4)) - 32;
        y[i] = dl * (float)q;
    }
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
    u32 p[4];
#pragma unroll
    for (int i = 0; i < 4; i++) p[i] = (u32)f2h(w[2 * i]) | ((u32)f2h(w[2 * i + 1]) << 16);
    *(uint4*)(out + idx * 8) = make_uint4(p[0], p[1], p[2], p[3]);
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
    float4* o = (float4*)(out + idx * 8);
    o[0] = make_float4(w[0], w[1], w[2], w[3]);
    o[1] = make_float4(w[4], w[5], w[6], w[7]);
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
                      long long row_bytes) {                                                   \
        matvec_impl<T>(W, x, y, rows, cols, row_bytes);                                        \
    }                                                                                          \
    extern "C" __global__ void deq_f16_##name(const u8* W, u16* out, int rows, int cols,       \
                                              long long row_bytes) {                           \
        deq_f16_impl<T>(W, out, rows, cols, row_bytes);                                        \
    }                                                                                          \
    extern "C" __global__ void deq_f32_##name(const u8* W, float* out, int rows, int cols,     \
                                              long long row_bytes) {                           \
        deq_f32_impl<T>(W, out, rows, cols, row_bytes);                                        \
    }                                                                                          \
    extern "C" __global__ void embed_##name(const u8* W, const int* tokens, float* out, int n, \
                                            int cols, long long row_bytes, float scale) {      \
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

// Round activations the way the CPU backend quantizes them for its dot products (so both
// backends see the same inputs), writing f32 (yf) and/or f16 (yh, may be null).
// mode 1: Q8_0/Q8_1 blocks of 32 (d = amax/127 as f16, q = roundf(x/d));
// mode 2: Q8_K blocks of 256 (iscale = -127/max, q = min(127, rint(iscale*x)), d = 1/iscale);
// mode 3: round to f16; mode 4: round to bf16; mode 0: copy.
// One warp per 32 (mode 1, 0, 3, 4) or 256 (mode 2) elements; grid.x * 4 warps.
extern "C" __global__ void act_round(const float* __restrict__ x, float* __restrict__ yf,
                                     u16* __restrict__ yh, long long n, int mode) {
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
        // Warp arg-max of |v| keeping the first index on ties (as the CPU's scan does).
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float a2 = __shfl_xor_sync(0xffffffff, amax, o);
            float m2 = __shfl_xor_sync(0xffffffff, mx, o);
            int f2 = __shfl_xor_sync(0xffffffff, first, o);
            if (a2 > amax || (a2 == amax && f2 < first)) { amax = a2; mx = m2; first = f2; }
        }
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
        float id = d != 0.f ? 1.f / d : 0.f;
        r = roundf(v * id) * h2f(f2h(d));
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

extern "C" __global__ void add_bias(float* x, const float* b, int width, long long total) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) x[i] += b[i % width];
}

extern "C" __global__ void add(float* x, const float* y, long long total) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) x[i] += y[i];
}

// act 0: SwiGLU, 1: GeGLU (tanh approximation on f16-rounded input, result rounded to f16, as
// the CPU backend's table does).
extern "C" __global__ void glu(const float* gate, const float* up, float* out, long long total,
                               int act) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    float g = gate[i];
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
    out[i] = a * up[i];
}

// RoPE: one thread per rotated pair. theta_i = pos * theta_scale^i by repeated multiplication.
// Row t of the batch is at position rowpos[t] of its sequence.
extern "C" __global__ void rope(float* x, int n, int n_heads, int hd, int nd, const int* rowpos,
                                float theta_scale, int neox) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    int half = nd / 2;
    long long total = (long long)n * n_heads * half;
    if (idx >= total) return;
    int i = (int)(idx % half);
    long long th = idx / half;
    int t = (int)(th / n_heads);
    float theta = (float)rowpos[t];
    for (int k = 0; k < i; k++) theta *= theta_scale;
    float c = cosf(theta), s = sinf(theta);
    float* head = x + th * hd;
    int a = neox ? i : 2 * i;
    int b = neox ? i + half : 2 * i + 1;
    float x0 = head[a], x1 = head[b];
    head[a] = x0 * c - x1 * s;
    head[b] = x0 * s + x1 * c;
}

// Store n rows of k and v (f32) into the f16 cache at element offset off.
// Row t of k/v goes to cache row kvrow[t] (its sequence slot's base + its position).
extern "C" __global__ void kv_store(const float* k, const float* v, u16* kc, u16* vc,
                                    long long total, const int* kvrow, int kvd) {
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

// Device-to-device bandwidth probe helper: y = x (float4 copy).
extern "C" __global__ void copy_f4(const float4* x, float4* y, long long n4) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (; i < n4; i += stride) y[i] = x[i];
}
