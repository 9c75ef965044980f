//! AVX-512 (F + BW + VL + VNNI) kernels for the hottest types: Q4_0, Q4_1, Q5_0, Q8_0, Q4_K
//! and Q6_K. Other types use their AVX2 kernel.
//!
//! Same [`DotFn`] contract as the AVX2 kernels; `detect()` only reports `Isa::Avx512` when
//! all these features and the AVX2 set are present. The 32-element formats use 256-bit
//! VNNI `vpdpbusd` (u8 × i8, summed in groups of 4 into i32 without saturation); Q4_K and
//! Q6_K process 64 elements per 512-bit vector.

use std::arch::x86_64::*;

use super::avx2::{
    bits_to_bytes, bsums_madd, dm_pair, hsum_ps, k4_scales_mins_v, ld256, ld2x128, ld_f16,
    ld_f16x8, ld_f32, ld_u32, nibbles32,
};
use crate::{DotFn, GgmlType};

pub(crate) fn kernel(weight: GgmlType) -> Option<DotFn> {
    use GgmlType::*;
    Some(match weight {
        Q4_0 => dot_q4_0,
        Q4_1 => dot_q4_1,
        Q5_0 => dot_q5_0,
        Q8_0 => dot_q8_0,
        Q4_K => dot_q4_k,
        Q6_K => dot_q6_k,
        _ => return None,
    })
}

/// `[a | b]` as one 512-bit vector.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn join(a: __m256i, b: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b)
}

/// # Safety
/// `p` must be valid for 64 bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn ld512(p: *const u8) -> __m512i {
    // SAFETY: caller guarantees 64 readable bytes; loadu has no alignment requirement.
    unsafe { _mm512_loadu_si512(p as *const __m512i) }
}

// The 32-element formats stay 256 bits wide: their 18/34-byte blocks need several shuffles
// to pack two per 512-bit vector, and 512-bit ALU ops only issue on two ports, so a
// 512-bit version measured slower. What pays off is VNNI: `vpdpbusd` replaces the
// maddubs + madd pair (and for Q4_0 the -8 bias).

/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q4_0(n: usize, w: *const u8, a: *const u8) -> f32 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn blk(x: *const u8, y: *const u8) -> (__m256, __m256i) {
        // SAFETY: x and y point at whole blocks (18 / 34 bytes).
        unsafe {
            let d = dm_pair(x, y).0;
            let q8 = ld256(y.add(2));
            // Σ (q - 8) * y = Σ q * y - Σ 8 * y (q unsigned, as vpdpbusd wants).
            let z = _mm256_setzero_si256();
            let p = _mm256_dpbusd_epi32(z, nibbles32(x.add(2)), q8);
            let o = _mm256_dpbusd_epi32(z, _mm256_set1_epi8(8), q8);
            (d, _mm256_sub_epi32(p, o))
        }
    }
    legacy_dot!(n, w, a, 18, 34, blk)
}

/// In ggml's order (see `legacy::vec_dot_q4_1`), as ggml's AVX-512 VNNI build runs it.
///
/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q4_1(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0.0f32;
    // SAFETY: every block b < n/32 lies inside both rows (DotFn contract).
    unsafe {
        for b in 0..n / 32 {
            let (x, y) = (w.add(20 * b), a.add(36 * b));
            summs = ld_f16(x.add(2)).mul_add(ld_f16(y.add(2)), summs);
            let d = _mm256_set1_ps(ld_f16(x) * ld_f16(y));
            let z = _mm256_setzero_si256();
            let p = _mm256_dpbusd_epi32(z, nibbles32(x.add(4)), ld256(y.add(4)));
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc);
        }
    }
    hsum_ps(acc) + summs
}

/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q5_0(n: usize, w: *const u8, a: *const u8) -> f32 {
    // The 5-bit values (0..=31) are unsigned, as `vpdpbusd` wants; the -16 bias comes off as
    // Σ 16 * y, like Q4_0's -8.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn blk(x: *const u8, y: *const u8) -> (__m256, __m256i) {
        // SAFETY: x and y point at whole blocks (22 / 34 bytes).
        unsafe {
            let d = dm_pair(x, y).0;
            let hb = _mm256_and_si256(bits_to_bytes(ld_u32(x.add(2))), _mm256_set1_epi8(0x10));
            let q = _mm256_or_si256(nibbles32(x.add(6)), hb);
            let q8 = ld256(y.add(2));
            let z = _mm256_setzero_si256();
            let p = _mm256_dpbusd_epi32(z, q, q8);
            let o = _mm256_dpbusd_epi32(z, _mm256_set1_epi8(16), q8);
            (d, _mm256_sub_epi32(p, o))
        }
    }
    legacy_dot!(n, w, a, 22, 34, blk)
}

/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q8_0(n: usize, w: *const u8, a: *const u8) -> f32 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn blk(x: *const u8, y: *const u8) -> (__m256, __m256i) {
        // SAFETY: x and y point at whole 34-byte blocks.
        unsafe {
            let d = dm_pair(x, y).0;
            let (qx, qy) = (ld256(x.add(2)), ld256(y.add(2)));
            // |x| · (y with x's sign): unsigned × signed for vpdpbusd.
            let p = _mm256_dpbusd_epi32(
                _mm256_setzero_si256(),
                _mm256_sign_epi8(qx, qx),
                _mm256_sign_epi8(qy, qx),
            );
            (d, p)
        }
    }
    legacy_dot!(n, w, a, 34, 34, blk)
}

/// 16-bit lane index vector for `_mm512_permutexvar_epi16`: lanes 0..16 take `i0`, lanes
/// 16..32 take `i1`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn idx2(i0: i16, i1: i16) -> __m512i {
    join(_mm256_set1_epi16(i0), _mm256_set1_epi16(i1))
}

/// 16-bit lane index vector: 128-bit lane k (8 i16) takes index `base + k`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn idx4(base: i16) -> __m512i {
    join(
        _mm256_set_m128i(_mm_set1_epi16(base + 1), _mm_set1_epi16(base)),
        _mm256_set_m128i(_mm_set1_epi16(base + 3), _mm_set1_epi16(base + 2)),
    )
}

/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q4_k(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let mut mins = _mm256_setzero_ps();
    let m4 = _mm512_set1_epi8(0x0f);
    // SAFETY (whole body): super-block b < n/256 lies inside both rows (DotFn contract).
    unsafe {
        for b in 0..n / 256 {
            let (x, y) = (w.add(144 * b), a.add(292 * b));
            let yd = _mm256_set1_ps(ld_f32(y));
            let sm = k4_scales_mins_v(x.add(4));
            let m16 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm));
            let dmin = _mm256_mul_ps(yd, ld_f16x8(x.add(2)));
            mins = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(bsums_madd(y, m16)), mins);
            // 8 scales as i16 in the low 128 bits (the permutes below read only those).
            let s = _mm512_castsi128_si512(_mm_cvtepu8_epi16(sm));
            let mut sumi = _mm512_setzero_si512();
            for j in 0..4 {
                // 32 bytes of nibbles = elements 64j..64j+64: low nibbles, then high.
                let qb = _mm512_broadcast_i64x4(ld256(x.add(16 + 32 * j)));
                let qb = _mm512_mask_srli_epi16::<4>(qb, 0xFFFF_0000, qb);
                let q = _mm512_and_si512(qb, m4);
                let p = _mm512_maddubs_epi16(q, ld512(y.add(4 + 64 * j)));
                let sc = _mm512_permutexvar_epi16(idx2(2 * j as i16, 2 * j as i16 + 1), s);
                sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(p, sc));
            }
            let d = _mm512_set1_ps(ld_f32(y) * _mm256_cvtss_f32(ld_f16x8(x)));
            acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi), acc);
        }
    }
    _mm512_reduce_add_ps(acc) - hsum_ps(mins)
}

/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q6_k(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let m4 = _mm512_set1_epi8(0x0f);
    let m3 = _mm512_set1_epi8(3);
    // SAFETY (whole body): super-block b < n/256 lies inside both rows (DotFn contract).
    unsafe {
        for b in 0..n / 256 {
            let (x, y) = (w.add(210 * b), a.add(292 * b));
            let s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.add(192) as *const __m128i));
            // Quants are used +32 (0..=63); subtract 32 * Σ scale * bsum afterwards.
            let offset = _mm256_slli_epi32(bsums_madd(y, s16), 5);
            // The permutes below read only the low 16 lanes.
            let s = _mm512_castsi256_si512(s16);
            let mut sumi = _mm512_setzero_si512();
            for h in 0..2 {
                // ql[64h..64h+64]: low nibbles = elements 128h+0..64, high = +64..128.
                let ql = ld512(x.add(64 * h));
                // qh bits 0-1 / 2-3 go with the first / second 32 low nibbles; bits 4-5 /
                // 6-7 with the high nibbles: shift the upper copy by 2 to line them up.
                let qh = _mm512_broadcast_i64x4(ld256(x.add(128 + 32 * h)));
                let qh = _mm512_mask_srli_epi16::<2>(qh, 0xFFFF_0000, qh);
                let qa = _mm512_or_si512(
                    _mm512_and_si512(ql, m4),
                    _mm512_slli_epi16::<4>(_mm512_and_si512(qh, m3)),
                );
                let qb = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4),
                    _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srli_epi16::<4>(qh), m3)),
                );
                let pa = _mm512_maddubs_epi16(qa, ld512(y.add(4 + 128 * h)));
                let pb = _mm512_maddubs_epi16(qb, ld512(y.add(68 + 128 * h)));
                let base = 8 * h as i16;
                let sa = _mm512_permutexvar_epi16(idx4(base), s);
                let sb = _mm512_permutexvar_epi16(idx4(base + 4), s);
                sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(pa, sa));
                sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(pb, sb));
            }
            let sumi = _mm512_sub_epi32(sumi, _mm512_zextsi256_si512(offset));
            let d = _mm512_set1_ps(ld_f32(y) * _mm256_cvtss_f32(ld_f16x8(x.add(208))));
            acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi), acc);
        }
    }
    _mm512_reduce_add_ps(acc)
}

// ---- 4-token kernels for batched matmul (see `multi_avx2`) ----

use super::multi_avx2::{Dot4Fn, T};

pub(crate) fn kernel4(weight: GgmlType) -> Option<Dot4Fn> {
    use GgmlType::*;
    Some(match weight {
        Q4_K => dot4_q4_k,
        Q6_K => dot4_q6_k,
        _ => return None,
    })
}

/// # Safety
/// [`Dot4Fn`] contract, and the CPU has the AVX-512 set above.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot4_q4_k(n: usize, w: *const u8, a: *const u8, st: usize, out: *mut f32, os: usize) {
    let mut acc = [_mm512_setzero_ps(); T];
    let mut mins = [_mm256_setzero_ps(); T];
    let m4 = _mm512_set1_epi8(0x0f);
    // SAFETY (whole body): super-block b < n/256 lies inside the weight row and every
    // activation row; out holds T results at stride os (Dot4Fn contract).
    unsafe {
        for b in 0..n / 256 {
            let x = w.add(144 * b);
            let sm = k4_scales_mins_v(x.add(4));
            let m16 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm));
            let s = _mm512_castsi128_si512(_mm_cvtepu8_epi16(sm));
            let mut sumi = [_mm512_setzero_si512(); T];
            for j in 0..4 {
                let qb = _mm512_broadcast_i64x4(ld256(x.add(16 + 32 * j)));
                let qb = _mm512_mask_srli_epi16::<4>(qb, 0xFFFF_0000, qb);
                let q = _mm512_and_si512(qb, m4);
                let sc = _mm512_permutexvar_epi16(idx2(2 * j as i16, 2 * j as i16 + 1), s);
                for (t, si) in sumi.iter_mut().enumerate() {
                    let y = a.add(t * st + 292 * b);
                    let p = _mm512_maddubs_epi16(q, ld512(y.add(4 + 64 * j)));
                    *si = _mm512_add_epi32(*si, _mm512_madd_epi16(p, sc));
                }
            }
            let (dx, dmx) = (ld_f16x8(x), ld_f16x8(x.add(2)));
            for t in 0..T {
                let y = a.add(t * st + 292 * b);
                let yd = _mm256_set1_ps(ld_f32(y));
                let mm = _mm256_cvtepi32_ps(bsums_madd(y, m16));
                mins[t] = _mm256_fmadd_ps(_mm256_mul_ps(yd, dmx), mm, mins[t]);
                let d = _mm512_set1_ps(ld_f32(y) * _mm256_cvtss_f32(dx));
                acc[t] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi[t]), acc[t]);
            }
        }
        for t in 0..T {
            *out.add(t * os) = _mm512_reduce_add_ps(acc[t]) - hsum_ps(mins[t]);
        }
    }
}

/// # Safety
/// [`Dot4Fn`] contract, and the CPU has the AVX-512 set above.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot4_q6_k(n: usize, w: *const u8, a: *const u8, st: usize, out: *mut f32, os: usize) {
    let mut acc = [_mm512_setzero_ps(); T];
    let m4 = _mm512_set1_epi8(0x0f);
    let m3 = _mm512_set1_epi8(3);
    // SAFETY (whole body): super-block b < n/256 lies inside the weight row and every
    // activation row; out holds T results at stride os (Dot4Fn contract).
    unsafe {
        for b in 0..n / 256 {
            let x = w.add(210 * b);
            let s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.add(192) as *const __m128i));
            let s = _mm512_castsi256_si512(s16);
            let mut sumi = [_mm512_setzero_si512(); T];
            for h in 0..2 {
                let ql = ld512(x.add(64 * h));
                let qh = _mm512_broadcast_i64x4(ld256(x.add(128 + 32 * h)));
                let qh = _mm512_mask_srli_epi16::<2>(qh, 0xFFFF_0000, qh);
                let qa = _mm512_or_si512(
                    _mm512_and_si512(ql, m4),
                    _mm512_slli_epi16::<4>(_mm512_and_si512(qh, m3)),
                );
                let qb = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4),
                    _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srli_epi16::<4>(qh), m3)),
                );
                let base = 8 * h as i16;
                let sa = _mm512_permutexvar_epi16(idx4(base), s);
                let sb = _mm512_permutexvar_epi16(idx4(base + 4), s);
                for (t, si) in sumi.iter_mut().enumerate() {
                    let y = a.add(t * st + 292 * b + 128 * h);
                    let pa = _mm512_madd_epi16(_mm512_maddubs_epi16(qa, ld512(y.add(4))), sa);
                    let pb = _mm512_madd_epi16(_mm512_maddubs_epi16(qb, ld512(y.add(68))), sb);
                    *si = _mm512_add_epi32(*si, _mm512_add_epi32(pa, pb));
                }
            }
            let dx = _mm256_cvtss_f32(ld_f16x8(x.add(208)));
            for t in 0..T {
                let y = a.add(t * st + 292 * b);
                // Quants were used +32: subtract 32 * Σ scale * bsum.
                let off = _mm256_slli_epi32(bsums_madd(y, s16), 5);
                let si = _mm512_sub_epi32(sumi[t], _mm512_zextsi256_si512(off));
                let d = _mm512_set1_ps(ld_f32(y) * dx);
                acc[t] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(si), acc[t]);
            }
        }
        for (t, a) in acc.into_iter().enumerate() {
            *out.add(t * os) = _mm512_reduce_add_ps(a);
        }
    }
}

// ---- 2-row x 4-token tiles for batched matmul of the 32-element formats ----
//
// For these formats the per-block scale work (an f16 d per block on each side)
// dominates, so reusing only the weight unpacking (as `multi_avx2` does) gains little.
// A tile of R weight rows x T tokens prepares each block once per row and once per token,
// and the R*T inner products are two vpdpbusd + scale. AVX-512VL gives 32 vector
// registers, enough to keep the 8 accumulators and all operands in registers.

/// Rows per tile.
pub(crate) const TILE_R: usize = 2;
/// Tokens per tile.
pub(crate) const TILE_T: usize = 4;

/// # Safety
/// [`PTileFn`] contract.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_store(acc: [[__m256; TILE_T]; TILE_R], out: *mut f32, os: usize) {
    for (r, row) in acc.iter().enumerate() {
        for (t, a) in row.iter().enumerate() {
            // SAFETY: out holds TILE_R x TILE_T results at these offsets.
            unsafe { *out.add(t * os + r) = hsum_ps(*a) };
        }
    }
}

/// Formats of the packed-activation tiles below.
const L_Q4_0: u8 = 0;
const L_Q5_0: u8 = 1;
const L_Q4_1: u8 = 2;
const L_Q5_1: u8 = 3;
const L_Q8_0: u8 = 4;

// ---- tiles on packed activations ----
//
// In a 2-row x 4-token tile of these formats, preparing the tokens' blocks (loading the
// two halves of two blocks, converting their f16 scales, the bias or min term) costs as
// much as the inner products. That work does not depend on the weight rows, so `matmul`
// does it once per token and row tile ([`PackFn`]) and the tile kernel ([`PTileFn`]) only
// loads it.
//
// Q8_0 weights too: their i8 quants + 128 are unsigned, and the bias is 128.
//
// Packed layout, one 128-byte unit per pair of blocks (b, b+1), b even:
//   0..32   elements 0..16 of block b, then of block b+1 (i8)
//   32..64  elements 16..32 of block b, then of block b+1
//   64..96  8 f32: [d_b; 4] ++ [d_b+1; 4]
//   96..128 Q8_0 (Q4_0/Q5_0): 8 i32, -bias * Σ y over the lanes' bytes; Q8_1 (Q4_1/Q5_1):
//           8 f32, s_b in lane 1, s_b+1 in lane 5, 0 elsewhere.
//
// The weight quants are unpacked the same way, as unsigned bytes u (0..=15 or 0..=31), so
// one `vpdpbusd` pair per row x token sums u·y for 64 elements into lanes 0..4 (block b)
// and 4..8 (block b+1), matching the scale vector. Q4_0 / Q5_0 store u - 8 / u - 16: the
// sum Σ (u - bias)·y = Σ u·y - bias·Σ y starts from the packed -bias·Σ y. Q4_1 / Q5_1
// add m·s per block: one more FMA of [m_b; 4] ++ [m_b+1; 4] with the packed s vector puts
// it into lanes 1 and 5, and the final horizontal sum takes it along.
// An odd last block fills the lower halves of a unit; its upper halves are zero.

/// Bytes of one token's packed activations of `n` elements.
pub(crate) fn packed_bytes(n: usize) -> usize {
    n.div_ceil(64) * 128
}

/// `(n, activation row, dst)`: packs one activation row of `n` elements into
/// `packed_bytes(n)` bytes at `dst`.
///
/// Unsafe to call: the row must hold `n` elements, `dst` must be valid for
/// `packed_bytes(n)` bytes, and the CPU must have the AVX-512 set of this module.
pub(crate) type PackFn = unsafe fn(usize, *const u8, *mut u8);

/// `(n, weight rows, weight row stride, packed activations, packed stride, out, out
/// stride)`: writes `out[t * out_stride + r]` = dot(weight row r, activation row t) for
/// r < TILE_R, t < TILE_T, the activation rows packed by the matching [`PackFn`] (`packed
/// stride` bytes apart; weight stride in bytes, out stride in f32s).
///
/// Unsafe to call: all weight rows must hold `n` elements and all packed rows
/// `packed_bytes(n)` bytes at the given strides, `out` must hold the outputs, and the CPU
/// must have the AVX-512 set of this module.
pub(crate) type PTileFn = unsafe fn(usize, *const u8, usize, *const u8, usize, *mut f32, usize);

/// The packing and tile kernels for `weight`, where it has them.
pub(crate) fn packed_kernel(weight: GgmlType) -> Option<(PackFn, PTileFn)> {
    use GgmlType::*;
    Some(match weight {
        // Q4_0, Q4_1, Q5_0 and Q8_0 have no tile here: the tiles sum two blocks per lane,
        // which is not llama.cpp's order (their 4-token AVX2 kernels are).
        Q5_1 => (pack::<L_Q5_1>, ptile_q5_1),
        _ => return None,
    })
}

/// (weight block bytes, qs offset, qh offset or 0, bias, has min) of format `k`.
const fn legacy_params(k: u8) -> (usize, usize, usize, u8, bool) {
    match k {
        L_Q4_0 => (18, 2, 0, 8, false),
        L_Q5_0 => (22, 6, 2, 16, false),
        L_Q8_0 => (34, 2, 0, 128, false),
        L_Q4_1 => (20, 4, 0, 0, true),
        _ => (24, 8, 4, 0, true),
    }
}

/// `[f16 at p; 4] ++ [f16 at p + step; 4]` as 8 f32.
///
/// # Safety
/// `p` and `p + step` must be valid for 4 bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn f16_pair(p: *const u8, step: usize) -> __m256 {
    // SAFETY: caller guarantees 4 readable bytes at p and at p + step.
    let (h0, h1) = unsafe { (ld_u32(p), ld_u32(p.add(step))) };
    // [h0 as 2 f16; 2] ++ [h1; 2]: the f16 wanted is in the even 16-bit lanes.
    let h = _mm_blend_epi32::<0b1100>(_mm_set1_epi32(h0 as i32), _mm_set1_epi32(h1 as i32));
    _mm256_moveldup_ps(_mm256_cvtph_ps(h))
}

/// `[f16 at p; 4] ++ [0; 4]` as 8 f32.
///
/// # Safety
/// `p` must be valid for 2 bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn f16_one(p: *const u8) -> __m256 {
    // SAFETY: caller guarantees 2 readable bytes.
    let h = unsafe { (p as *const i16).read_unaligned() };
    _mm256_zextps128_ps256(_mm_cvtph_ps(_mm_set1_epi16(h)))
}

/// 16 bytes at `p`, upper 128 bits zero.
///
/// # Safety
/// `p` must be valid for 16 bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn ld128z(p: *const u8) -> __m256i {
    // SAFETY: caller guarantees 16 readable bytes.
    _mm256_zextsi128_si256(unsafe { _mm_loadu_si128(p as *const __m128i) })
}

/// # Safety
/// [`PackFn`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn pack<const K: u8>(n: usize, y: *const u8, dst: *mut u8) {
    let (_, _, _, bias, min) = legacy_params(K);
    let abytes = if min { 36 } else { 34 };
    let nb = n / 32;
    let z = _mm256_setzero_si256();
    let vbias = _mm256_set1_epi8(bias as i8);
    // SAFETY (whole body): blocks b (< nb) and b+1 (only when < nb) lie inside the
    // activation row; unit i < nb.div_ceil(2) lies inside dst (PackFn contract).
    unsafe {
        for i in 0..nb.div_ceil(2) {
            let y0 = y.add(2 * i * abytes);
            let q0 = y0.add(abytes - 32);
            let (ya, yb, dy) = if 2 * i + 1 < nb {
                (
                    ld2x128(q0, q0.add(abytes)),
                    ld2x128(q0.add(16), q0.add(abytes + 16)),
                    f16_pair(y0, abytes),
                )
            } else {
                (ld128z(q0), ld128z(q0.add(16)), f16_one(y0))
            };
            let last = if min {
                let s = if 2 * i + 1 < nb {
                    f16_pair(y0.add(2), abytes)
                } else {
                    f16_one(y0.add(2))
                };
                _mm256_castps_si256(_mm256_maskz_mov_ps(0b0010_0010, s))
            } else {
                let o = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(z, vbias, ya), vbias, yb);
                _mm256_sub_epi32(z, o)
            };
            let o = dst.add(128 * i) as *mut __m256i;
            _mm256_storeu_si256(o, ya);
            _mm256_storeu_si256(o.add(1), yb);
            _mm256_storeu_si256(o.add(2), _mm256_castps_si256(dy));
            _mm256_storeu_si256(o.add(3), last);
        }
    }
}

/// Tile kernel on packed activations; `K` selects the format (packed layout above).
///
/// # Safety
/// [`PTileFn`] contract.
#[inline]
#[allow(clippy::needless_range_loop)] // r and t index several arrays at once
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn ptile<const K: u8>(
    n: usize,
    w: *const u8,
    ws: usize,
    p: *const u8,
    ps: usize,
    out: *mut f32,
    os: usize,
) {
    let (wbytes, qs_off, qh_off, _, min) = legacy_params(K);
    let five = qh_off != 0;
    let nb = n / 32;
    let mut acc = [[_mm256_setzero_ps(); TILE_T]; TILE_R];
    let z = _mm256_setzero_si256();
    let m4 = _mm256_set1_epi8(0x0f);
    let b4 = _mm256_set1_epi8(16);
    let flip = _mm256_set1_epi8(0x80u8 as i8);
    // SAFETY (whole body): blocks b (< nb) and b+1 (only when < nb) lie inside every
    // weight row of the tile, and unit i < nb.div_ceil(2) inside every packed row
    // (PTileFn contract).
    unsafe {
        for i in 0..nb.div_ceil(2) {
            let pair = 2 * i + 1 < nb;
            let mut lo = [z; TILE_R];
            let mut hi = [z; TILE_R];
            let mut dx = [_mm256_setzero_ps(); TILE_R];
            let mut mx = [_mm256_setzero_ps(); TILE_R];
            for r in 0..TILE_R {
                let x = w.add(r * ws + 2 * i * wbytes);
                if K == L_Q8_0 {
                    // i8 quants + 128 = unsigned, halves as for the activations.
                    let (q0, q1) = (x.add(qs_off), x.add(wbytes + qs_off));
                    let (a, b) = if pair {
                        (ld2x128(q0, q1), ld2x128(q0.add(16), q1.add(16)))
                    } else {
                        (ld128z(q0), ld128z(q0.add(16)))
                    };
                    lo[r] = _mm256_xor_si256(a, flip);
                    hi[r] = _mm256_xor_si256(b, flip);
                } else {
                    let q = if pair {
                        ld2x128(x.add(qs_off), x.add(wbytes + qs_off))
                    } else {
                        ld128z(x.add(qs_off))
                    };
                    lo[r] = _mm256_and_si256(q, m4);
                    hi[r] = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                }
                if five {
                    let h0 = ld_u32(x.add(qh_off));
                    let h1 = if pair {
                        ld_u32(x.add(wbytes + qh_off))
                    } else {
                        0
                    };
                    let kl = _cvtu32_mask32((h0 & 0xffff) | (h1 << 16));
                    let kh = _cvtu32_mask32((h0 >> 16) | (h1 & 0xffff_0000));
                    lo[r] = _mm256_mask_add_epi8(lo[r], kl, lo[r], b4);
                    hi[r] = _mm256_mask_add_epi8(hi[r], kh, hi[r], b4);
                }
                dx[r] = if pair {
                    f16_pair(x, wbytes)
                } else {
                    f16_one(x)
                };
                if min {
                    mx[r] = if pair {
                        f16_pair(x.add(2), wbytes)
                    } else {
                        f16_one(x.add(2))
                    };
                }
            }
            for t in 0..TILE_T {
                let u = p.add(t * ps + 128 * i);
                let (ya, yb) = (ld256(u), ld256(u.add(32)));
                let dy = _mm256_loadu_ps(u.add(64) as *const f32);
                let last = ld256(u.add(96));
                let start = if min { z } else { last };
                for r in 0..TILE_R {
                    let s = _mm256_dpbusd_epi32(start, lo[r], ya);
                    let s = _mm256_dpbusd_epi32(s, hi[r], yb);
                    let d = _mm256_mul_ps(dx[r], dy);
                    acc[r][t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc[r][t]);
                    if min {
                        let sy = _mm256_castsi256_ps(last);
                        acc[r][t] = _mm256_fmadd_ps(mx[r], sy, acc[r][t]);
                    }
                }
            }
        }
        tile_store(acc, out, os);
    }
}

/// # Safety
/// [`PTileFn`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn ptile_q5_1(
    n: usize,
    w: *const u8,
    ws: usize,
    p: *const u8,
    ps: usize,
    out: *mut f32,
    os: usize,
) {
    // SAFETY: same contract, same features.
    unsafe { ptile::<L_Q5_1>(n, w, ws, p, ps, out, os) }
}
