//! Float kernels with the exact arithmetic of llama.cpp's x86 CPU backend (AVX-512 build),
//! so that flea's activations can be bit-identical to llama.cpp's:
//!
//! * [`expf`]: ggml's `ggml_v_expf` (a polynomial, not libm's `expf`), used by its softmax
//!   and SiLU;
//! * [`swiglu`]: `ggml_vec_swiglu_f32` (16-element chunks through `ggml_v_silu`, the tail
//!   through libm);
//! * [`softmax_exp`]: the exponentials and the sum of `ggml_vec_soft_max_f32`;
//! * [`fma_f16`]: one step of the F16 matmul's (tinyBLAS) fused lane accumulation;
//! * [`round_to_f16_scaled`]: the attention's probabilities as the F16 V × KQ matmul sees them.
//!
//! Every path (scalar, AVX2, AVX-512) gives the same bits: the operations are the same per
//! element, only the number of elements per instruction differs.

use crate::float::f16_to_f32;
use crate::{best_isa, Isa};

const R: f32 = f32::from_bits(0x4b40_0000); // 0x1.8p23: rounds to an integer
const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b);
const LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
const LN2_HI: f32 = f32::from_bits(0x3f31_7200);
const C5: f32 = f32::from_bits(0x3c07_2010);
const C4: f32 = f32::from_bits(0x3d2b_9f17);
const C3: f32 = f32::from_bits(0x3e2a_af33);
const C2: f32 = f32::from_bits(0x3eff_fedb);
const C1: f32 = f32::from_bits(0x3f7f_fff6);

/// `j * 2^n` for an integral `n` with |n| ≤ 192, rounded once (as `vscalefps`).
#[inline(always)]
fn scalef(j: f32, n: f32) -> f32 {
    if (-126.0..=127.0).contains(&n) {
        j * f32::from_bits(((n as i32 + 127) as u32) << 23)
    } else {
        // The exact product in f64, then one rounding (to a subnormal or infinity).
        (j as f64 * 2f64.powi(n as i32)) as f32
    }
}

/// ggml's `ggml_v_expf` for one element (its AVX-512 form: the same fused operations).
#[inline(always)]
pub fn expf(x: f32) -> f32 {
    let z = x.mul_add(LOG2E, R);
    let n = z - R;
    let b = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let u = b * b;
    let j = C5
        .mul_add(b, C4)
        .mul_add(u, C3.mul_add(b, C2))
        .mul_add(u, C1.mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    scalef(j, n)
}

/// [`expf`] compiled with FMA instructions (`mul_add` is otherwise a libm call).
///
/// # Safety
/// The CPU must have FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn expf_fma(x: f32) -> f32 {
    expf(x)
}

/// [`expf`] on 16 lanes: per lane the same fused operations, and `vscalefps` for the scaling
/// (one rounding, as [`scalef`]), so every lane has [`expf`]'s bits.
///
/// # Safety
/// The CPU must have AVX-512F (with FMA).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn expf_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let c = _mm512_set1_ps;
    let z = _mm512_fmadd_ps(x, c(LOG2E), c(R));
    let n = _mm512_sub_ps(z, c(R));
    // fnmadd(n, c, a) = fma(-n, c, a), as expf's (-n).mul_add.
    let b = _mm512_fnmadd_ps(n, c(LN2_LO), _mm512_fnmadd_ps(n, c(LN2_HI), x));
    let u = _mm512_mul_ps(b, b);
    let j = _mm512_fmadd_ps(
        _mm512_fmadd_ps(
            _mm512_fmadd_ps(c(C5), b, c(C4)),
            u,
            _mm512_fmadd_ps(c(C3), b, c(C2)),
        ),
        u,
        _mm512_fmadd_ps(c(C1), b, c(1.0)),
    );
    let res = _mm512_scalef_ps(j, n);
    let out_of_range = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), c(192.0));
    if out_of_range == 0 {
        return res;
    }
    let below = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, _mm512_setzero_ps());
    let saturated = _mm512_mask_blend_ps(below, c(f32::INFINITY), _mm512_setzero_ps());
    _mm512_mask_blend_ps(out_of_range, res, saturated)
}

/// `x[i] = expf(x[i] - max)` over whole 16-element chunks on AVX-512, the rest one at a
/// time (each element on its own: the same bits either way).
///
/// # Safety
/// The CPU must have AVX-512F (with FMA).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn exp_shifted_avx512(x: &mut [f32], max: f32) {
    use std::arch::x86_64::*;
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        // SAFETY: c holds 16 f32; unaligned load and store.
        unsafe {
            let v = _mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), _mm512_set1_ps(max));
            _mm512_storeu_ps(c.as_mut_ptr(), expf_avx512(v));
        }
    }
    for v in chunks.into_remainder() {
        *v = expf(*v - max);
    }
}

/// [`swiglu`]'s whole chunks of 16 on AVX-512: `g / (1 + expf(0 - g)) * u` per lane.
///
/// # Safety
/// The CPU must have AVX-512F (with FMA); the three slices hold at least `n16` elements, a
/// multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn swiglu_avx512(gate: &[f32], up: &[f32], out: &mut [f32], n16: usize) {
    use std::arch::x86_64::*;
    for i in (0..n16).step_by(16) {
        // SAFETY: i + 16 <= n16 <= every slice's length (the caller's contract).
        unsafe {
            let g = _mm512_loadu_ps(gate.as_ptr().add(i));
            let e = expf_avx512(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0), e));
            let r = _mm512_mul_ps(silu, _mm512_loadu_ps(up.as_ptr().add(i)));
            _mm512_storeu_ps(out.as_mut_ptr().add(i), r);
        }
    }
}

/// `x[i] = f16(x[i] * scale)` read back as f32 (round to nearest even, as
/// [`crate::f32_to_f16`]): the probabilities llama.cpp's F16 V × KQ matmul sees.
pub fn round_to_f16_scaled(x: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if best_isa() == Isa::Avx512 {
        // SAFETY: AVX-512F (with F16C) detected.
        unsafe { round_to_f16_scaled_avx512(x, scale) };
        return;
    }
    for v in x.iter_mut() {
        *v = f16_to_f32(crate::f32_to_f16(*v * scale));
    }
}

/// # Safety
/// The CPU must have AVX-512F (with F16C).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
unsafe fn round_to_f16_scaled_avx512(x: &mut [f32], scale: f32) {
    use std::arch::x86_64::*;
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        // SAFETY: c holds 16 f32; unaligned load and store.
        unsafe {
            let v = _mm512_mul_ps(_mm512_loadu_ps(c.as_ptr()), _mm512_set1_ps(scale));
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm512_storeu_ps(c.as_mut_ptr(), _mm512_cvtph_ps(h));
        }
    }
    for v in chunks.into_remainder() {
        *v = f16_to_f32(crate::f32_to_f16(*v * scale));
    }
}

/// ggml's `ggml_v_silu`: `x / (1 + expf(0 - x))`.
#[inline(always)]
fn silu(x: f32, exp: impl Fn(f32) -> f32) -> f32 {
    x / (1.0 + exp(0.0 - x))
}

fn fma_available() -> bool {
    best_isa() != Isa::Scalar
}

/// `out[i] = silu(gate[i]) * up[i]`, as `ggml_vec_swiglu_f32`: whole chunks of 16 with
/// [`expf`], the rest with libm's `expf` (as ggml's scalar tail). Lengths must match.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = out.len().min(gate.len()).min(up.len());
    let n16 = n / 16 * 16;
    #[cfg(target_arch = "x86_64")]
    if best_isa() == Isa::Avx512 {
        // SAFETY: AVX-512F (with FMA) detected; n16 <= every slice's length.
        unsafe { swiglu_avx512(gate, up, out, n16) };
        for i in n16..n {
            out[i] = silu(gate[i], f32::exp) * up[i];
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if fma_available() {
        for i in 0..n16 {
            // SAFETY: FMA is part of every non-scalar Isa (checked by fma_available).
            out[i] = silu(gate[i], |v| unsafe { expf_fma(v) }) * up[i];
        }
        for i in n16..n {
            out[i] = silu(gate[i], f32::exp) * up[i];
        }
        return;
    }
    for i in 0..n16 {
        out[i] = silu(gate[i], expf) * up[i];
    }
    for i in n16..n {
        out[i] = silu(gate[i], f32::exp) * up[i];
    }
}

/// `_mm512_reduce_add_ps`'s tree over 16 values.
#[inline(always)]
pub fn reduce16(v: &[f32; 16]) -> f32 {
    let t: [f32; 8] = std::array::from_fn(|i| v[8 + i] + v[i]);
    let u: [f32; 4] = std::array::from_fn(|i| t[4 + i] + t[i]);
    (u[0] + u[2]) + (u[1] + u[3])
}

/// The softmax numerators and denominator of `ggml_vec_soft_max_f32` (AVX-512 build) for
/// one row of scores: `x[i] = expf(x[i] - max)` and the sum of the results, taken as
/// ggml takes it over its full row of cache positions — per aligned chunk of 16 positions
/// the tree sum of the chunk in f32 (masked positions are 0), each chunk then added in f64.
/// `x[0]` belongs to cache position `first`.
pub fn softmax_exp(x: &mut [f32], first: usize, max: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if best_isa() == Isa::Avx512 {
        // SAFETY: AVX-512F (with FMA) detected.
        unsafe { exp_shifted_avx512(x, max) };
        return chunk_sum(x, first);
    }
    #[cfg(target_arch = "x86_64")]
    if fma_available() {
        for v in x.iter_mut() {
            // SAFETY: FMA is part of every non-scalar Isa (checked by fma_available).
            *v = unsafe { expf_fma(*v - max) };
        }
        return chunk_sum(x, first);
    }
    for v in x.iter_mut() {
        *v = expf(*v - max);
    }
    chunk_sum(x, first)
}

fn chunk_sum(x: &[f32], first: usize) -> f64 {
    let mut sum = 0.0f64;
    let mut pos = first;
    let mut i = 0;
    while i < x.len() {
        // Positions pos .. the end of pos's chunk.
        let off = pos % 16;
        let take = (16 - off).min(x.len() - i);
        let mut c = [0f32; 16];
        c[off..off + take].copy_from_slice(&x[i..i + take]);
        sum += reduce16(&c) as f64;
        i += take;
        pos += take;
    }
    sum
}

/// Combine 64 lane sums as `ggml_vec_dot_f16` (AVX-512 build) does: its four 16-lane
/// accumulators (lanes j % 64, by 16) are added (0 + 2) + (1 + 3), then the 16 lanes as
/// `_mm512_reduce_add_ps`.
#[inline(always)]
pub fn reduce64(a: &[f32; 64]) -> f32 {
    let v: [f32; 16] = std::array::from_fn(|l| (a[l] + a[32 + l]) + (a[16 + l] + a[48 + l]));
    reduce16(&v)
}

/// The lane sums of a `nl × width` block of lane accumulators (`lanes[l * width + d]`, lane
/// l of output d), tree-summed per column in place as [`reduce64`] (`nl` = 64) or
/// [`reduce16`] (`nl` = 16) sums one column: both trees are repeated halvings (row l plus
/// row l + half), so whole rows are added at once, vectorised, with the same pairings.
/// The sums end in row 0 (`lanes[..width]`). False (nothing done) unless `nl` is 16 or 64
/// and `lanes.len() == nl * width`.
pub fn fold_lanes(lanes: &mut [f32], width: usize, nl: usize) -> bool {
    if !(nl == 16 || nl == 64) || Some(lanes.len()) != nl.checked_mul(width) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if best_isa() == Isa::Avx512 {
        // SAFETY: AVX-512F detected; the sizes were checked above.
        unsafe { fold_lanes_avx512(lanes, width, nl) };
        return true;
    }
    fold_lanes_impl(lanes, width, nl);
    true
}

/// [`fold_lanes_impl`] compiled for AVX-512 (the row additions vectorise 16 wide).
///
/// # Safety
/// AVX-512F available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fold_lanes_avx512(lanes: &mut [f32], width: usize, nl: usize) {
    fold_lanes_impl(lanes, width, nl)
}

#[inline(always)]
fn fold_lanes_impl(lanes: &mut [f32], width: usize, nl: usize) {
    let mut half = nl / 2;
    while half >= 1 {
        let (lo, hi) = lanes.split_at_mut(half * width);
        for (a, b) in lo.iter_mut().zip(&hi[..half * width]) {
            *a += *b;
        }
        half /= 2;
    }
}

/// F16 dot product in the order of `ggml_vec_dot_f16` (what llama.cpp's F16 matmul runs
/// for a batch of one token, instead of tinyBLAS): element i into lane i % 64 by fused
/// multiply-adds over whole 64-element steps, [`reduce64`], then the leftover products
/// (rounded to f32) added in f64. `a.len()` must equal `b.len()` (else None).
pub fn dot_f16_vec(a: &[u16], b: &[u16]) -> Option<f32> {
    if a.len() != b.len() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    if best_isa() == Isa::Avx512 {
        // SAFETY: AVX-512F (with F16C and FMA) detected; lengths equal.
        return Some(unsafe { dot_f16_vec_avx512(a, b) });
    }
    #[cfg(target_arch = "x86_64")]
    if fma_available() {
        // SAFETY: FMA and F16C are part of every non-scalar Isa (checked); lengths equal.
        return Some(unsafe { dot_f16_vec_fma(a, b) });
    }
    Some(dot_f16_vec_impl(a, b))
}

/// [`dot_f16_vec_impl`] with four 16-lane accumulators, as ggml holds them.
///
/// # Safety
/// AVX-512F, F16C and FMA available; `a.len() == b.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c,fma")]
unsafe fn dot_f16_vec_avx512(a: &[u16], b: &[u16]) -> f32 {
    use std::arch::x86_64::*;
    let np = a.len() / 64 * 64;
    let mut acc = [_mm512_setzero_ps(); 4];
    for i in (0..np).step_by(64) {
        for (j, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + 16j + 16 ≤ np ≤ both lengths; unaligned loads.
            unsafe {
                let ld = |p: *const u16| _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()));
                let (x, y) = (
                    ld(a.as_ptr().add(i + 16 * j)),
                    ld(b.as_ptr().add(i + 16 * j)),
                );
                *acc = _mm512_fmadd_ps(x, y, *acc);
            }
        }
    }
    let mut sum = reduce_acc4(acc) as f64;
    for (&x, &y) in a[np..].iter().zip(&b[np..]) {
        sum += (f16_to_f32(x) * f16_to_f32(y)) as f64;
    }
    sum as f32
}

/// One head's attention scores for a batch of one token, in `ggml_vec_dot_f16`'s order:
/// `out[i]` = [`dot_f16_vec`]`(q, keys[(first + i) * stride ..][..q.len()])` for each i <
/// `out.len()` (the same bits), with q converted once for all keys. False (nothing done)
/// unless every key lies inside `keys`. `vals` (may be empty) is the head's values at the
/// same positions and stride: each position's row is requested into L2 as its key is
/// read, for the V·P product that follows (it reads them in another order).
pub fn scores_f16_vec(
    q: &[u16],
    keys: &[u16],
    vals: &[u16],
    stride: usize,
    first: usize,
    out: &mut [f32],
) -> bool {
    let hd = q.len();
    if !rows_inside(keys.len(), stride, first, out.len(), hd) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if best_isa() == Isa::Avx512 && hd.is_multiple_of(64) && hd <= 256 {
        let warm = rows_inside(vals.len(), stride, first, out.len(), hd).then_some(vals);
        // SAFETY: AVX-512F (F16C, FMA) detected; every key lies inside `keys` (checked).
        unsafe { scores_avx512(q, keys, warm, stride, first, out) };
        return true;
    }
    for (i, o) in out.iter_mut().enumerate() {
        let k0 = (first + i) * stride;
        *o = dot_f16_vec(q, &keys[k0..k0 + hd]).unwrap_or(0.0);
    }
    true
}

/// Rows `first .. first + n` of `width` elements at `stride` lie inside `len` elements.
fn rows_inside(len: usize, stride: usize, first: usize, n: usize, width: usize) -> bool {
    if n == 0 {
        return true;
    }
    (first + n - 1)
        .checked_mul(stride)
        .and_then(|s| s.checked_add(width))
        .is_some_and(|end| end <= len)
}

/// # Safety
/// AVX-512F, F16C and FMA available; `q.len()` a multiple of 64, at most 256; every key
/// `(first + i) * stride .. + q.len()` inside `keys`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c,fma")]
unsafe fn scores_avx512(
    q: &[u16],
    keys: &[u16],
    vals: Option<&[u16]>,
    stride: usize,
    first: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let hd = q.len();
    let mut qf = [_mm512_setzero_ps(); 16];
    for (c, qf) in qf.iter_mut().enumerate().take(hd / 16) {
        // SAFETY: 16c + 16 <= hd = q.len().
        *qf = unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(q.as_ptr().add(16 * c).cast())) };
    }
    // Cache rows lie `stride` elements apart (several KiB): the hardware prefetchers do
    // not follow such a stride across pages, and one key's four lines per step leave the
    // core waiting on memory. So the key PREFETCH_ROWS ahead is requested now (a prefetch
    // never faults: addresses past the cache are harmless).
    const PREFETCH_ROWS: usize = 8;
    for (i, o) in out.iter_mut().enumerate() {
        // SAFETY: key (first + i) lies inside `keys` (caller).
        let k = unsafe { keys.as_ptr().add((first + i) * stride) };
        let ahead = k.wrapping_add(PREFETCH_ROWS * stride) as *const i8;
        for line in 0..(2 * hd).div_ceil(64) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
        }
        if let Some(v) = vals {
            let row = v.as_ptr().wrapping_add((first + i) * stride) as *const i8;
            for line in 0..(2 * hd).div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(64 * line));
            }
        }
        let mut acc = [_mm512_setzero_ps(); 4];
        for step in 0..hd / 64 {
            for (j, acc) in acc.iter_mut().enumerate() {
                let c = 4 * step + j;
                // SAFETY: 16c + 16 <= hd: inside the key.
                let x = unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(k.add(16 * c).cast())) };
                *acc = _mm512_fmadd_ps(x, qf[c], *acc);
            }
        }
        *o = reduce_acc4(acc);
    }
}

/// [`reduce64`] of four 16-lane accumulators (lanes 16j..16j+16 in `acc[j]`), in registers:
/// (acc0 + acc2) + (acc1 + acc3), then [`reduce16`]'s halvings (lane i with lane i + 8,
/// then i + 4, then (0 + 2) + (1 + 3)).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,f16c,fma")]
fn reduce_acc4(acc: [std::arch::x86_64::__m512; 4]) -> f32 {
    use std::arch::x86_64::*;
    let v = _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]));
    // The upper 8 floats through the 64-bit extract (AVX-512F; the f32 one needs DQ).
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let t = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
    let u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
    let w = _mm_add_ps(u, _mm_movehl_ps(u, u));
    _mm_cvtss_f32(_mm_add_ss(w, _mm_shuffle_ps::<0b01>(w, w)))
}

/// One head's V·probabilities as lane accumulators, the way llama.cpp's F16 matmul sums
/// over cache positions: position j (from `first`) goes to lane `j % nl`, and each lane of
/// each output element is a chain of fused multiply-adds in position order, as repeated
/// [`fma_f16`] calls make it: `lanes[l * hd + d]` = the chain over j ≡ l of
/// `f16(vals[j * stride + d]) · probs[j - first]`, zero for a lane no position reaches
/// (`hd = lanes.len() / nl`; fold with [`fold_lanes`] afterwards). Here each lane's chain
/// stays in registers instead of going through memory at every position. False (nothing
/// done) on inconsistent sizes.
pub fn pv_lanes_f16(
    probs: &[f32],
    vals: &[u16],
    stride: usize,
    first: usize,
    nl: usize,
    lanes: &mut [f32],
) -> bool {
    if nl == 0 || !lanes.len().is_multiple_of(nl) {
        return false;
    }
    let hd = lanes.len() / nl;
    if !rows_inside(vals.len(), stride, first, probs.len(), hd) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if best_isa() == Isa::Avx512 && hd.is_multiple_of(16) {
        // SAFETY: AVX-512F (F16C, FMA) detected; every value row lies inside `vals`
        // (checked) and lanes holds nl rows of hd.
        unsafe { pv_lanes_avx512(probs, vals, stride, first, nl, lanes) };
        return true;
    }
    lanes.iter_mut().for_each(|x| *x = 0.0);
    for (i, &pj) in probs.iter().enumerate() {
        let j = first + i;
        let l = j % nl;
        fma_f16(
            pj,
            &vals[j * stride..j * stride + hd],
            &mut lanes[l * hd..(l + 1) * hd],
        );
    }
    true
}

/// # Safety
/// AVX-512F, F16C and FMA available; `lanes.len() = nl * hd` with hd a multiple of 16;
/// every row `j * stride .. + hd` for j in first .. first + probs.len() inside `vals`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c,fma")]
unsafe fn pv_lanes_avx512(
    probs: &[f32],
    vals: &[u16],
    stride: usize,
    first: usize,
    nl: usize,
    lanes: &mut [f32],
) {
    let hd = lanes.len() / nl;
    for l in 0..nl {
        // The first position of lane l at or after `first`.
        let j0 = first + (l + nl - first % nl) % nl;
        let mut d0 = 0;
        while d0 < hd {
            let w = (hd - d0).min(128) / 16;
            let dst = &mut lanes[l * hd + d0..l * hd + d0 + 16 * w];
            let chain = PvChain {
                probs,
                vals,
                stride,
                first,
                j0,
                nl,
                d0,
            };
            // SAFETY (each arm): as this function's contract; columns d0 .. d0 + 16w lie
            // inside every value row, and dst holds 16w floats.
            unsafe {
                match w {
                    8 => chain.run::<8>(dst),
                    7 => chain.run::<7>(dst),
                    6 => chain.run::<6>(dst),
                    5 => chain.run::<5>(dst),
                    4 => chain.run::<4>(dst),
                    3 => chain.run::<3>(dst),
                    2 => chain.run::<2>(dst),
                    _ => chain.run::<1>(dst),
                }
            }
            d0 += 16 * w;
        }
    }
}

/// One lane's chains over a range of columns (see [`pv_lanes_avx512`]).
#[cfg(target_arch = "x86_64")]
struct PvChain<'a> {
    probs: &'a [f32],
    vals: &'a [u16],
    stride: usize,
    first: usize,
    /// The lane's first position.
    j0: usize,
    nl: usize,
    /// The first column.
    d0: usize,
}

#[cfg(target_arch = "x86_64")]
impl PvChain<'_> {
    /// Positions j0, j0 + nl, … (< first + probs.len()) over 16·R columns from d0,
    /// accumulated in R registers, then stored to `dst` (16·R floats).
    ///
    /// # Safety
    /// AVX-512F, F16C and FMA available; `dst.len() == 16 * R`; columns d0 .. d0 + 16R of
    /// every row j lie inside `vals`.
    #[inline]
    #[target_feature(enable = "avx512f,f16c,fma")]
    unsafe fn run<const R: usize>(&self, dst: &mut [f32]) {
        use std::arch::x86_64::*;
        let mut acc = [_mm512_setzero_ps(); R];
        let mut j = self.j0;
        let end = self.first + self.probs.len();
        while j < end {
            let pv = _mm512_set1_ps(self.probs[j - self.first]);
            // SAFETY: row j, columns d0 .. d0 + 16R, lies inside `vals` (caller).
            let row = unsafe { self.vals.as_ptr().add(j * self.stride + self.d0) };
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                let x = unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(row.add(16 * r).cast())) };
                *acc = _mm512_fmadd_ps(x, pv, *acc);
            }
            j += self.nl;
        }
        for (r, acc) in acc.into_iter().enumerate() {
            // SAFETY: dst holds 16R floats (caller).
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(16 * r), acc) };
        }
    }
}

/// [`dot_f16_vec_impl`] compiled with FMA instructions.
///
/// # Safety
/// The CPU must have FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,f16c")]
unsafe fn dot_f16_vec_fma(a: &[u16], b: &[u16]) -> f32 {
    dot_f16_vec_impl(a, b)
}

#[inline(always)]
fn dot_f16_vec_impl(a: &[u16], b: &[u16]) -> f32 {
    let np = a.len() / 64 * 64;
    let mut acc = [0.0f32; 64];
    for (ca, cb) in a[..np].chunks_exact(64).zip(b[..np].chunks_exact(64)) {
        for l in 0..64 {
            acc[l] = f16_to_f32(ca[l]).mul_add(f16_to_f32(cb[l]), acc[l]);
        }
    }
    let mut sum = reduce64(&acc) as f64;
    for (&x, &y) in a[np..].iter().zip(&b[np..]) {
        sum += (f16_to_f32(x) * f16_to_f32(y)) as f64;
    }
    sum as f32
}

/// `acc[i] = fma(f16 v[i], p, acc[i])`: one position's step of the F16 matmul's lane
/// accumulation (llama.cpp's V·softmax product). False (nothing done) unless the lengths
/// match.
pub fn fma_f16(p: f32, v: &[u16], acc: &mut [f32]) -> bool {
    if v.len() != acc.len() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if best_isa() == Isa::Avx512 {
        // SAFETY: AVX-512F (and F16C, FMA with it) detected; lengths checked above.
        unsafe { fma_f16_avx512(p, v, acc) };
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    if fma_available() {
        // SAFETY: AVX2, FMA and F16C detected; lengths checked above.
        unsafe { fma_f16_avx2(p, v, acc) };
        return true;
    }
    for (a, &x) in acc.iter_mut().zip(v) {
        *a = f16_to_f32(x).mul_add(p, *a);
    }
    true
}

/// # Safety
/// AVX-512F, F16C and FMA available; `v.len() == acc.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c,fma")]
unsafe fn fma_f16_avx512(p: f32, v: &[u16], acc: &mut [f32]) {
    use std::arch::x86_64::*;
    let pv = _mm512_set1_ps(p);
    let n16 = v.len() / 16 * 16;
    for i in (0..n16).step_by(16) {
        // SAFETY: i + 16 ≤ n16 ≤ both lengths; unaligned loads and stores.
        unsafe {
            let x = _mm512_cvtph_ps(_mm256_loadu_si256(v.as_ptr().add(i).cast()));
            let a = _mm512_loadu_ps(acc.as_ptr().add(i));
            _mm512_storeu_ps(acc.as_mut_ptr().add(i), _mm512_fmadd_ps(x, pv, a));
        }
    }
    for (a, &x) in acc[n16..].iter_mut().zip(&v[n16..]) {
        *a = f16_to_f32(x).mul_add(p, *a);
    }
}

/// # Safety
/// AVX2, F16C and FMA available; `v.len() == acc.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn fma_f16_avx2(p: f32, v: &[u16], acc: &mut [f32]) {
    use std::arch::x86_64::*;
    let pv = _mm256_set1_ps(p);
    let n8 = v.len() / 8 * 8;
    for i in (0..n8).step_by(8) {
        // SAFETY: i + 8 ≤ n8 ≤ both lengths; unaligned loads and stores.
        unsafe {
            let x = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i).cast()));
            let a = _mm256_loadu_ps(acc.as_ptr().add(i));
            _mm256_storeu_ps(acc.as_mut_ptr().add(i), _mm256_fmadd_ps(x, pv, a));
        }
    }
    for (a, &x) in acc[n8..].iter_mut().zip(&v[n8..]) {
        *a = f16_to_f32(x).mul_add(p, *a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expf_is_close_to_exp_and_saturates_like_ggml() {
        // Normal results (ggml's polynomial is within 2 ulp there).
        for i in -1740..=1760 {
            let x = i as f32 * 0.05;
            let (got, want) = (expf(x) as f64, (x as f64).exp());
            assert!((got - want).abs() <= 4e-7 * want, "{x}: {got} vs {want}");
        }
        assert_eq!(expf(f32::NEG_INFINITY), 0.0);
        assert_eq!(expf(-200.0), 0.0);
        assert_eq!(expf(200.0), f32::INFINITY);
        // Subnormal results round once.
        assert!(expf(-100.0) > 0.0 && expf(-100.0) < f32::MIN_POSITIVE);
    }

    #[test]
    fn fma_and_fused_paths_agree() {
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 700.0) * 0.173).collect();
        for &x in &xs {
            #[cfg(target_arch = "x86_64")]
            if fma_available() {
                // SAFETY: FMA available (checked).
                assert_eq!(unsafe { expf_fma(x) }.to_bits(), expf(x).to_bits(), "{x}");
            }
        }
        let v: Vec<u16> = xs.iter().map(|&x| crate::f32_to_f16(x * 0.01)).collect();
        let mut a: Vec<f32> = xs.iter().map(|&x| x * 0.3).collect();
        let want: Vec<f32> = a
            .iter()
            .zip(&v)
            .map(|(&a, &x)| f16_to_f32(x).mul_add(0.37, a))
            .collect();
        assert!(fma_f16(0.37, &v, &mut a));
        assert!(a.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    /// Scores, SwiGLU inputs and probabilities of every range: normal, subnormal and
    /// saturated exponentials, ties of the f16 rounding, infinities.
    fn awkward_values() -> Vec<f32> {
        let mut xs: Vec<f32> = (0..4000).map(|i| (i as f32 - 3000.0) * 0.0731).collect();
        xs.extend([
            0.0,
            -0.0,
            f32::NEG_INFINITY,
            f32::INFINITY,
            -87.5,
            -103.9,
            -150.0,
            88.7,
            89.0,
            1e-30,
            -1e-30,
            f32::MIN_POSITIVE,
            // f16 ties and their neighbours (1 + 2^-11, 2^-24 ± ulp, 65504 + 16).
            f32::from_bits(0x3f80_1000),
            f32::from_bits(0x3f80_3000),
            f32::from_bits(0x3380_0000),
            f32::from_bits(0x3380_0001),
            65520.0,
        ]);
        xs
    }

    #[test]
    fn avx512_exp_swiglu_and_f16_rounding_have_the_scalar_bits() {
        let xs = awkward_values();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for max in [0.0f32, 3.5, -2.0] {
            let mut got = xs.clone();
            let sum = softmax_exp(&mut got, 5, max);
            let want: Vec<f32> = xs.iter().map(|&x| expf(x - max)).collect();
            assert_eq!(bits(&got), bits(&want), "max {max}");
            assert_eq!(sum.to_bits(), chunk_sum(&want, 5).to_bits());
        }
        let up: Vec<f32> = xs.iter().map(|&x| (x * 0.37).sin()).collect();
        let mut got = vec![0f32; xs.len()];
        swiglu(&xs, &up, &mut got);
        let n16 = xs.len() / 16 * 16;
        let want: Vec<f32> = (0..xs.len())
            .map(|i| {
                let e = if i < n16 { expf } else { f32::exp };
                silu(xs[i], e) * up[i]
            })
            .collect();
        assert_eq!(bits(&got), bits(&want));
        for scale in [1.0f32, 0.37, 1e-3] {
            let mut got = xs.clone();
            round_to_f16_scaled(&mut got, scale);
            let want: Vec<f32> = xs
                .iter()
                .map(|&x| f16_to_f32(crate::f32_to_f16(x * scale)))
                .collect();
            assert_eq!(bits(&got), bits(&want), "scale {scale}");
        }
    }

    #[test]
    fn dot_f16_vec_paths_agree() {
        for n in [16usize, 64, 100, 128, 256, 1000] {
            let a: Vec<u16> = (0..n)
                .map(|i| crate::f32_to_f16((i as f32 * 0.37).sin()))
                .collect();
            let b: Vec<u16> = (0..n)
                .map(|i| crate::f32_to_f16((i as f32 * 0.11).cos() * 3.0))
                .collect();
            let want = dot_f16_vec_impl(&a, &b);
            let got = dot_f16_vec(&a, &b).unwrap_or(f32::NAN);
            assert_eq!(got.to_bits(), want.to_bits(), "n {n}");
        }
        assert_eq!(dot_f16_vec(&[0; 3], &[0; 4]), None);
    }

    #[test]
    fn fold_lanes_sums_each_column_as_reduce64_and_reduce16() {
        for (nl, width) in [(64usize, 128usize), (64, 72), (16, 64), (16, 5)] {
            let lanes: Vec<f32> = (0..nl * width)
                // Mixed signs and magnitudes, so that the order of the additions shows.
                .map(|i| (i as f32 * 0.7311).sin() * 10f32.powi(i as i32 % 7 - 3))
                .collect();
            let want: Vec<f32> = (0..width)
                .map(|d| {
                    if nl == 64 {
                        reduce64(&std::array::from_fn(|l| lanes[l * width + d]))
                    } else {
                        reduce16(&std::array::from_fn(|l| lanes[l * width + d]))
                    }
                })
                .collect();
            let mut got = lanes.clone();
            assert!(fold_lanes(&mut got, width, nl));
            for d in 0..width {
                assert_eq!(
                    got[d].to_bits(),
                    want[d].to_bits(),
                    "nl {nl} width {width} d {d}"
                );
            }
            let mut generic = lanes.clone();
            fold_lanes_impl(&mut generic, width, nl);
            assert!(generic[..width].iter().all(|v| v.is_finite()));
            assert_eq!(generic[..width], got[..width]);
        }
        assert!(!fold_lanes(&mut [0.0; 32], 1, 32));
        assert!(!fold_lanes(&mut [0.0; 63], 1, 64));
    }

    /// A head's keys / values in a cache of `n` rows `stride` wide, the head at column `off`.
    fn cache(n: usize, stride: usize, seed: usize) -> Vec<u16> {
        (0..n * stride)
            .map(|i| crate::f32_to_f16(((i * 7919 + seed) % 2003) as f32 / 1001.0 - 1.0))
            .collect()
    }

    #[test]
    fn head_scores_equal_per_key_dots() {
        for hd in [64usize, 128, 256, 80] {
            let (stride, off, n) = (3 * hd + 16, hd + 16, 150);
            let c = cache(n, stride, hd);
            let q: Vec<u16> = (0..hd)
                .map(|i| crate::f32_to_f16((i as f32 * 0.37).sin() * 2.0))
                .collect();
            for first in [0usize, 5, 64] {
                let mut got = vec![f32::NAN; n - first];
                assert!(scores_f16_vec(
                    &q,
                    &c[off..],
                    &c[off..],
                    stride,
                    first,
                    &mut got
                ));
                for (i, g) in got.iter().enumerate() {
                    let k0 = off + (first + i) * stride;
                    let want = dot_f16_vec(&q, &c[k0..k0 + hd]).unwrap_or(f32::NAN);
                    assert_eq!(g.to_bits(), want.to_bits(), "hd {hd} first {first} key {i}");
                }
            }
            // A key past the end is refused.
            let mut too_many = vec![0.0; n + 1];
            assert!(!scores_f16_vec(
                &q,
                &c[off..],
                &[],
                stride,
                0,
                &mut too_many
            ));
        }
    }

    #[test]
    fn head_lanes_equal_fma_steps() {
        for (hd, nl) in [
            (128usize, 64usize),
            (64, 16),
            (256, 64),
            (144, 16),
            (40, 16),
        ] {
            let (stride, off, n) = (2 * hd + 8, hd + 8, 200);
            let c = cache(n, stride, nl + hd);
            for first in [0usize, 3, 70] {
                let probs: Vec<f32> = (first..n)
                    .map(|j| crate::f16_to_f32(crate::f32_to_f16(1.0 / (1 + j % 13) as f32)))
                    .collect();
                let mut want = vec![0.0f32; nl * hd];
                for (i, &p) in probs.iter().enumerate() {
                    let j = first + i;
                    let (l, r) = (j % nl, off + j * stride);
                    assert!(fma_f16(p, &c[r..r + hd], &mut want[l * hd..(l + 1) * hd]));
                }
                let mut got = vec![f32::NAN; nl * hd];
                assert!(pv_lanes_f16(&probs, &c[off..], stride, first, nl, &mut got));
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "hd {hd} nl {nl} first {first}");
            }
            let mut lanes = vec![0.0f32; nl * hd];
            assert!(!pv_lanes_f16(
                &[0.0; 201],
                &c[off..],
                stride,
                0,
                nl,
                &mut lanes
            ));
        }
    }

    #[test]
    fn softmax_sum_goes_by_aligned_chunks() {
        let mut x = vec![0.0f32; 20];
        // Positions 14..34: chunks 14..16, 16..32, 32..34.
        let s = softmax_exp(&mut x, 14, 0.0);
        assert_eq!(s, 20.0);
        assert!(x.iter().all(|&v| v == 1.0));
    }
}
