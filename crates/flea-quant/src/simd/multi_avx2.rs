//! AVX2 kernels that dot one weight row with 4 activation rows at once, for batched
//! matmul (prompt processing). Unpacking the weight block (nibbles, scales) is the costly
//! part of a quantized dot; doing it once for 4 tokens saves about a third of the work.
//!
//! Q4_0, Q5_0 and Q8_0 give the single-row kernels' bits (one accumulator per token, one
//! block per step: llama.cpp's order); Q5_1 and Q5_K equal them up to summation order.

use std::arch::x86_64::*;

use super::avx2::{
    bcast_i16, bits_to_bytes, bsums_madd, dot_u8i8, hsum_ps, k4_scales_mins_v, ld256, ld_f16x8,
    ld_f32, ld_u32, nibbles32,
};
use crate::GgmlType;

/// Tokens per call.
pub(crate) const T: usize = 4;

/// `(n, weight row, first activation row, activation row stride in bytes, out, out stride
/// in f32s)`: writes `out[t * out_stride]` = dot(weight row, activation row t) for t < 4.
///
/// Unsafe to call: the weight row must hold `n` elements, the 4 activation rows `n`
/// elements each at the given stride, `out` 4 f32 at the given stride, and the CPU must
/// have AVX2/FMA/F16C.
pub(crate) type Dot4Fn = unsafe fn(usize, *const u8, *const u8, usize, *mut f32, usize);

pub(crate) fn kernel(weight: GgmlType) -> Option<Dot4Fn> {
    use GgmlType::*;
    Some(match weight {
        Q4_0 => dot4_q4_0,
        Q8_0 => dot4_q8_0,
        Q5_0 => dot4_q5_0,
        Q5_1 => dot4_q5_1,
        Q5_K => dot4_q5_k,
        _ => return None,
    })
}

/// f16 at the start of `p` in lane 0 (other lanes junk) — see `avx2::dm_pair`.
///
/// # Safety
/// `p` must be valid for 4 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_lane0(p: *const u8) -> __m256 {
    // SAFETY: caller guarantees 4 readable bytes.
    _mm256_cvtph_ps(_mm_set1_epi32(unsafe { ld_u32(p) } as i32))
}

/// # Safety
/// [`Dot4Fn`] contract.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store(acc: [__m256; T], out: *mut f32, os: usize) {
    for (t, a) in acc.into_iter().enumerate() {
        // SAFETY: out holds T results at stride os.
        unsafe { *out.add(t * os) = hsum_ps(a) };
    }
}

/// # Safety
/// [`Dot4Fn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_q4_0(n: usize, w: *const u8, a: *const u8, st: usize, out: *mut f32, os: usize) {
    let mut acc = [_mm256_setzero_ps(); T];
    // SAFETY (whole body): block b < n/32 lies inside the weight row and every activation
    // row (Dot4Fn contract).
    unsafe {
        for b in 0..n / 32 {
            let x = w.add(18 * b);
            let dx = f16_lane0(x);
            let qx = _mm256_sub_epi8(nibbles32(x.add(2)), _mm256_set1_epi8(8));
            let ax = _mm256_sign_epi8(qx, qx);
            for (t, acc) in acc.iter_mut().enumerate() {
                let y = a.add(t * st + 34 * b);
                let d = _mm256_permute_ps::<0>(_mm256_mul_ps(dx, f16_lane0(y)));
                let p = dot_u8i8(ax, _mm256_sign_epi8(ld256(y.add(2)), qx));
                *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), *acc);
            }
        }
        store(acc, out, os);
    }
}

/// # Safety
/// [`Dot4Fn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_q8_0(n: usize, w: *const u8, a: *const u8, st: usize, out: *mut f32, os: usize) {
    let mut acc = [_mm256_setzero_ps(); T];
    // SAFETY (whole body): block b < n/32 lies inside the weight row and every activation
    // row (Dot4Fn contract).
    unsafe {
        for b in 0..n / 32 {
            let x = w.add(34 * b);
            let dx = f16_lane0(x);
            let qx = ld256(x.add(2));
            let ax = _mm256_sign_epi8(qx, qx);
            for (t, acc) in acc.iter_mut().enumerate() {
                let y = a.add(t * st + 34 * b);
                let d = _mm256_permute_ps::<0>(_mm256_mul_ps(dx, f16_lane0(y)));
                let p = dot_u8i8(ax, _mm256_sign_epi8(ld256(y.add(2)), qx));
                *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), *acc);
            }
        }
        store(acc, out, os);
    }
}

/// Shared Q5_0 / Q4_1 / Q5_1 kernel (`K`: 0, 1, 2). Only Q5_0 and Q5_1 use it: Q4_1 must
/// keep llama.cpp's separate fused min chain, which the lane-1 trick below does not.
///
/// Q5_0 quants are unpacked once per block to signed bytes (-16..=15) and used with the
/// sign trick, like `dot4_q4_0`. Q4_1 / Q5_1 quants are unsigned (0..=15 / 0..=31) and go
/// straight into `maddubs`; their per-block m·s term is added to lane 1 of the token's
/// accumulator (the s of the Q8_1 block placed in lane 1 of a zero vector, times m), so
/// the final horizontal sum includes it.
///
/// # Safety
/// [`Dot4Fn`] contract.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_legacy<const K: u8>(
    n: usize,
    w: *const u8,
    a: *const u8,
    st: usize,
    out: *mut f32,
    os: usize,
) {
    // (weight block bytes, qs offset, qh offset or 0, has min)
    let (wbytes, qs_off, qh_off, min) = match K {
        0 => (22, 6, 2, false),
        1 => (20, 4, 0, true),
        _ => (24, 8, 4, true),
    };
    let abytes = if min { 36 } else { 34 };
    let mut acc = [_mm256_setzero_ps(); T];
    let f0 = _mm256_set1_epi8(0xF0u8 as i8);
    let b4 = _mm256_set1_epi8(0x10);
    // SAFETY (whole body): block b < n/32 lies inside the weight row and every activation
    // row; out holds T results at stride os (Dot4Fn contract).
    unsafe {
        for b in 0..n / 32 {
            let x = w.add(wbytes * b);
            let dx = ld_f16x8(x);
            let nib = nibbles32(x.add(qs_off));
            if !min {
                // value - 16 == nibble | 0xF0 (as i8) when the 5th bit is clear, else nibble.
                let hb = bits_to_bytes(ld_u32(x.add(qh_off)));
                let qx = _mm256_or_si256(nib, _mm256_andnot_si256(hb, f0));
                let ax = _mm256_sign_epi8(qx, qx);
                for (t, acc) in acc.iter_mut().enumerate() {
                    let y = a.add(t * st + abytes * b);
                    let d = _mm256_mul_ps(dx, ld_f16x8(y));
                    let p = dot_u8i8(ax, _mm256_sign_epi8(ld256(y.add(2)), qx));
                    *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), *acc);
                }
            } else {
                let qx = if qh_off != 0 {
                    let hb = bits_to_bytes(ld_u32(x.add(qh_off)));
                    _mm256_or_si256(nib, _mm256_and_si256(hb, b4))
                } else {
                    nib
                };
                let mx = ld_f16x8(x.add(2));
                for (t, acc) in acc.iter_mut().enumerate() {
                    let y = a.add(t * st + abytes * b);
                    let d = _mm256_mul_ps(dx, ld_f16x8(y));
                    let p = dot_u8i8(qx, ld256(y.add(4)));
                    *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), *acc);
                    let sy = _mm256_blend_ps::<0b10>(_mm256_setzero_ps(), ld_f16x8(y.add(2)));
                    *acc = _mm256_fmadd_ps(mx, sy, *acc);
                }
            }
        }
        store(acc, out, os);
    }
}

/// # Safety
/// [`Dot4Fn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_q5_0(n: usize, w: *const u8, a: *const u8, st: usize, out: *mut f32, os: usize) {
    // SAFETY: same contract, same features.
    unsafe { dot4_legacy::<0>(n, w, a, st, out, os) }
}

/// # Safety
/// [`Dot4Fn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_q5_1(n: usize, w: *const u8, a: *const u8, st: usize, out: *mut f32, os: usize) {
    // SAFETY: same contract, same features.
    unsafe { dot4_legacy::<2>(n, w, a, st, out, os) }
}

/// Shared Q4_K / Q5_K (`HIGH`: 5th bit from qh) kernel.
///
/// # Safety
/// [`Dot4Fn`] contract.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_q45_k<const HIGH: bool>(
    n: usize,
    w: *const u8,
    a: *const u8,
    st: usize,
    out: *mut f32,
    os: usize,
) {
    let bytes = if HIGH { 176 } else { 144 };
    let qs_off = if HIGH { 48 } else { 16 };
    let mut acc = [_mm256_setzero_ps(); T];
    let m4 = _mm256_set1_epi8(0x0f);
    let one = _mm256_set1_epi8(1);
    // SAFETY (whole body): super-block b < n/256 lies inside the weight row and every
    // activation row (Dot4Fn contract).
    unsafe {
        for b in 0..n / 256 {
            let x = w.add(bytes * b);
            let sm = k4_scales_mins_v(x.add(4));
            let m16 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm));
            let s8 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
            let mut qh = if HIGH {
                ld256(x.add(16))
            } else {
                _mm256_setzero_si256()
            };
            let mut sumi = [_mm256_setzero_si256(); T];
            for j in 0..4 {
                let qs = ld256(x.add(qs_off + 32 * j));
                let mut lo = _mm256_and_si256(qs, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16(qs, 4), m4);
                if HIGH {
                    let h0 = _mm256_and_si256(qh, one);
                    let h1 = _mm256_and_si256(_mm256_srli_epi16(qh, 1), one);
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(h0, 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(h1, 4));
                    qh = _mm256_srli_epi16(qh, 2);
                }
                let (sl, sh) = (bcast_i16(s8, 2 * j), bcast_i16(s8, 2 * j + 1));
                for (t, s) in sumi.iter_mut().enumerate() {
                    let y = a.add(t * st + 292 * b);
                    let pl = _mm256_maddubs_epi16(lo, ld256(y.add(4 + 64 * j)));
                    let ph = _mm256_maddubs_epi16(hi, ld256(y.add(36 + 64 * j)));
                    let p = _mm256_add_epi32(_mm256_madd_epi16(pl, sl), _mm256_madd_epi16(ph, sh));
                    *s = _mm256_add_epi32(*s, p);
                }
            }
            let (dx, dmx) = (ld_f16x8(x), ld_f16x8(x.add(2)));
            for (t, acc) in acc.iter_mut().enumerate() {
                let y = a.add(t * st + 292 * b);
                let yd = _mm256_set1_ps(ld_f32(y));
                let mins = _mm256_cvtepi32_ps(bsums_madd(y, m16));
                *acc = _mm256_fmadd_ps(_mm256_mul_ps(yd, dx), _mm256_cvtepi32_ps(sumi[t]), *acc);
                *acc = _mm256_fnmadd_ps(_mm256_mul_ps(yd, dmx), mins, *acc);
            }
        }
        store(acc, out, os);
    }
}

/// # Safety
/// [`Dot4Fn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_q5_k(n: usize, w: *const u8, a: *const u8, st: usize, out: *mut f32, os: usize) {
    // SAFETY: same contract, same features.
    unsafe { dot4_q45_k::<true>(n, w, a, st, out, os) }
}
