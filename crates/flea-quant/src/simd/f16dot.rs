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

#[cfg(test)]
mod tests {
    use crate::{dot_f16_isa, f32_to_f16, isa_available, Isa};

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
        // (2048 + 1) first in f32, then + 1: exact here, so just a sanity check of the sum.
        assert_eq!(dot_f16_isa(Isa::Scalar, &a, &b), Some(2050.0));
        assert_eq!(dot_f16_isa(Isa::Scalar, &a[..15], &b[..15]), None);
    }
}
