//! F16 · F16 dot products in the order of llama.cpp's CPU F16 matmul (tinyBLAS with 16-lane
//! AVX-512 vectors, as in the reference build): lane `l` accumulates `a[l + 16i] · b[l + 16i]`
//! with fused multiply-adds from zero, then the 16 lanes are added as a tree (8 pairs, 4,
//! 2, 1 — the order of `_mm512_reduce_add_ps`). Every path below gives the same bits.

use crate::float::f16_to_f32 as f16_bits_to_f32;

/// Lanes of the accumulator (one AVX-512 register of f32).
pub(crate) const LANES: usize = 16;

/// The tree sum of the 16 lanes, as `_mm512_reduce_add_ps` does it.
fn reduce(l: &[f32; LANES]) -> f32 {
    let mut t8 = [0f32; 8];
    for i in 0..8 {
        t8[i] = l[8 + i] + l[i];
    }
    let mut t4 = [0f32; 4];
    for i in 0..4 {
        t4[i] = t8[4 + i] + t8[i];
    }
    (t4[0] + t4[2]) + (t4[1] + t4[3])
}

/// Reference: `a.len() == b.len()`, a multiple of 16 (checked by the caller).
pub(crate) fn dot_scalar(a: &[u16], b: &[u16]) -> f32 {
    let mut acc = [0f32; LANES];
    for (ca, cb) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] = f16_bits_to_f32(ca[l]).mul_add(f16_bits_to_f32(cb[l]), acc[l]);
        }
    }
    reduce(&acc)
}

/// # Safety
/// The CPU has AVX2, FMA and F16C; `a.len() == b.len()`, a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_avx2(a: &[u16], b: &[u16]) -> f32 {
    use std::arch::x86_64::*;
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for (ca, cb) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        // SAFETY: each chunk holds 16 u16 = two 16-byte loads; unaligned loads.
        unsafe {
            let ld = |p: *const u16| _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
            lo = _mm256_fmadd_ps(ld(ca.as_ptr()), ld(cb.as_ptr()), lo);
            hi = _mm256_fmadd_ps(ld(ca.as_ptr().add(8)), ld(cb.as_ptr().add(8)), hi);
        }
    }
    let mut l = [0f32; LANES];
    // SAFETY: l holds 16 f32, two unaligned 8-float stores.
    unsafe {
        _mm256_storeu_ps(l.as_mut_ptr(), lo);
        _mm256_storeu_ps(l.as_mut_ptr().add(8), hi);
    }
    reduce(&l)
}

/// # Safety
/// The CPU has AVX-512F (and F16C); `a.len() == b.len()`, a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c,fma")]
pub(crate) unsafe fn dot_avx512(a: &[u16], b: &[u16]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm512_setzero_ps();
    for (ca, cb) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        // SAFETY: each chunk holds 16 u16 = one unaligned 32-byte load.
        unsafe {
            let ld = |p: *const u16| _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()));
            acc = _mm512_fmadd_ps(ld(ca.as_ptr()), ld(cb.as_ptr()), acc);
        }
    }
    let mut l = [0f32; LANES];
    // SAFETY: l holds 16 f32, one unaligned store.
    unsafe { _mm512_storeu_ps(l.as_mut_ptr(), acc) };
    reduce(&l)
}

/// `_mm512_reduce_add_ps`'s tree (as [`reduce`]) in vector registers: the high 8 lanes onto
/// the low 8, then the high 4 onto the low 4, then (0 + 2) + (1 + 3). Additions commute
/// exactly, so the operands' order within each sum does not matter.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn reduce_avx512(v: std::arch::x86_64::__m512) -> f32 {
    use std::arch::x86_64::*;
    let lo8 = _mm512_castps512_ps256(v);
    let hi8 = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    let t8 = _mm256_add_ps(lo8, hi8);
    let t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
    // [t4[0] + t4[2], t4[1] + t4[3], ..]
    let t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
    _mm_cvtss_f32(_mm_add_ss(t2, _mm_shuffle_ps(t2, t2, 1)))
}

/// [`dot_avx512`] of `q` with each of four rows at once (four independent chains, q's chunk
/// converted once for all four): the same bits as four calls.
///
/// # Safety
/// The CPU has AVX-512F (and F16C); every row has `q.len()` elements, a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c,fma")]
pub(crate) unsafe fn dot4_avx512(q: &[u16], k: [&[u16]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 4];
    for c in (0..q.len() / LANES).map(|c| c * LANES) {
        // SAFETY: every row holds q.len() u16 (the caller's contract): chunk c is one
        // unaligned 32-byte load in each.
        unsafe {
            let ld = |p: *const u16| _mm512_cvtph_ps(_mm256_loadu_si256(p.add(c).cast()));
            let qv = ld(q.as_ptr());
            for (a, row) in acc.iter_mut().zip(k) {
                *a = _mm512_fmadd_ps(ld(row.as_ptr()), qv, *a);
            }
        }
    }
    // SAFETY: AVX-512F, as this function's.
    acc.map(|a| unsafe { reduce_avx512(a) })
}

#[cfg(test)]
mod tests {
    use crate::{dot_f16_isa, dot_f16_x4_isa, f32_to_f16, isa_available, Isa};

    #[test]
    fn every_isa_gives_the_same_bits_and_the_order_is_the_lanes() {
        let mut state = 0x2545f4914f6cdd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            f32_to_f16(((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0)
        };
        for n in [16usize, 64, 80, 128, 256] {
            for _ in 0..50 {
                let a: Vec<u16> = (0..n).map(|_| next()).collect();
                let b: Vec<u16> = (0..n).map(|_| next()).collect();
                let want = dot_f16_isa(Isa::Scalar, &a, &b).unwrap();
                for isa in [Isa::Avx2, Isa::Avx512] {
                    if isa_available(isa) {
                        let got = dot_f16_isa(isa, &a, &b).unwrap();
                        assert_eq!(got.to_bits(), want.to_bits(), "{isa:?} n {n}");
                    }
                }
                // Close to the exact sum (the order only moves the last bits).
                let exact: f64 = a
                    .iter()
                    .zip(&b)
                    .map(|(&x, &y)| crate::f16_to_f32(x) as f64 * crate::f16_to_f32(y) as f64)
                    .sum();
                assert!((want as f64 - exact).abs() <= 1e-5 * (1.0 + exact.abs()) * n as f64);
            }
        }
        // Lanes first, then the tree: 1 in lane 0 and lane 8 add before lane 1.
        let one = f32_to_f16(1.0);
        let big = f32_to_f16(2048.0);
        let mut a = vec![0u16; 16];
        let mut b = vec![one; 16];
        a[0] = big;
        a[8] = one;
        a[1] = one;
        b[1] = one;
        // Four rows at once: each the one-row dot's bits, on every instruction set.
        for n in [16usize, 64, 128, 256] {
            for _ in 0..20 {
                let q: Vec<u16> = (0..n).map(|_| next()).collect();
                let rows: Vec<Vec<u16>> =
                    (0..4).map(|_| (0..n).map(|_| next()).collect()).collect();
                let k = [&rows[0][..], &rows[1][..], &rows[2][..], &rows[3][..]];
                for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
                    let got = dot_f16_x4_isa(isa, &q, k).unwrap();
                    for (g, row) in got.iter().zip(k) {
                        let want = dot_f16_isa(Isa::Scalar, row, &q).unwrap();
                        assert_eq!(g.to_bits(), want.to_bits(), "{isa:?} n {n}");
                    }
                }
            }
        }
        let short = [0u16; 15];
        assert_eq!(dot_f16_x4_isa(Isa::Avx512, &a, [&a, &a, &a, &short]), None);
        assert_eq!(dot_f16_x4_isa(Isa::Avx512, &a[..15], [&short; 4]), None);
        // (2048 + 1) first in f32, then + 1: exact here, so just a sanity check of the sum.
        assert_eq!(dot_f16_isa(Isa::Scalar, &a, &b), Some(2050.0));
        assert_eq!(dot_f16_isa(Isa::Scalar, &a[..15], &b[..15]), None);
    }
}
