//! AVX2 activation quantizers, byte-identical to the scalar reference ones (same f32
//! operations in the same order per element; only the max-abs search and packing are
//! vectorized). Activations are quantized once per matmul on the caller's thread, so this
//! matters next to the (multi-threaded) dot products. Each returns true (done), so the
//! dispatcher can fall back to scalar for formats without a SIMD version.

use std::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn abs_ps(v: __m256) -> __m256 {
    _mm256_andnot_ps(_mm256_set1_ps(-0.0), v)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hmax_ps(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    _mm_cvtsi128_si32(s)
}

/// Four vectors of 8 i32 (each in -128..=127) → 32 i8 in element order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pack32(q: [__m256i; 4]) -> __m256i {
    let a = _mm256_packs_epi32(q[0], q[1]);
    let b = _mm256_packs_epi32(q[2], q[3]);
    // packs works within 128-bit lanes: restore element order of the 4-byte groups.
    _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(a, b),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
    )
}

/// Q8_0 (`with_sum` = false, 34-byte blocks) or Q8_1 (36-byte blocks), as
/// `legacy::quantize_q8_0` / `quantize_q8_1`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `x.len()` must be a multiple of 32.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8_0(x: &[f32], out: &mut Vec<u8>, with_sum: bool) -> bool {
    let bs = if with_sum { 36 } else { 34 };
    let nb = x.len() / 32;
    out.resize(nb * bs, 0);
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    for b in 0..nb {
        // SAFETY: block b < x.len()/32 lies inside x, and out was sized to nb blocks.
        unsafe {
            let p = src.add(32 * b);
            let o = dst.add(bs * b);
            let v = [0, 8, 16, 24].map(|k| _mm256_loadu_ps(p.add(k)));
            let m = _mm256_max_ps(
                _mm256_max_ps(abs_ps(v[0]), abs_ps(v[1])),
                _mm256_max_ps(abs_ps(v[2]), abs_ps(v[3])),
            );
            let amax = hmax_ps(m);
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            let q = v.map(|v| {
                _mm256_cvtps_epi32(_mm256_round_ps::<
                    { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                >(_mm256_mul_ps(v, id)))
            });
            (o as *mut u16).write_unaligned(crate::f32_to_f16(d));
            let qo = if with_sum {
                let s = hsum_epi32(_mm256_add_epi32(
                    _mm256_add_epi32(q[0], q[1]),
                    _mm256_add_epi32(q[2], q[3]),
                ));
                (o.add(2) as *mut u16).write_unaligned(crate::f32_to_f16(s as f32 * d));
                o.add(4)
            } else {
                o.add(2)
            };
            _mm256_storeu_si256(qo as *mut __m256i, pack32(q));
        }
    }
    true
}

/// Q8_K, as `kquants::quantize_q8_k` (ggml's sign convention and round-half-even).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `x.len()` must be a multiple of 256.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8_k(x: &[f32], out: &mut Vec<u8>) -> bool {
    let nb = x.len() / 256;
    out.resize(nb * 292, 0);
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    for b in 0..nb {
        // SAFETY: block b < x.len()/256 lies inside x, and out was sized to nb blocks.
        unsafe {
            let p = src.add(256 * b);
            let o = dst.add(292 * b);
            let mut m = _mm256_setzero_ps();
            for k in 0..32 {
                m = _mm256_max_ps(m, abs_ps(_mm256_loadu_ps(p.add(8 * k))));
            }
            let amax = hmax_ps(m);
            if amax == 0.0 {
                std::ptr::write_bytes(o, 0, 292);
                continue;
            }
            // The scale comes from the first element of largest magnitude, with its sign.
            let am = _mm256_set1_ps(amax);
            let mut max = 0.0f32;
            for k in 0..32 {
                let v = abs_ps(_mm256_loadu_ps(p.add(8 * k)));
                let mask = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(v, am));
                if mask != 0 {
                    max = *p.add(8 * k + mask.trailing_zeros() as usize);
                    break;
                }
            }
            let iscale = -127.0f32 / max;
            let is = _mm256_set1_ps(iscale);
            let lim = _mm256_set1_epi32(127);
            for g in 0..8 {
                let q = [0, 1, 2, 3].map(|k| {
                    let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(32 * g + 8 * k)), is);
                    let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                    _mm256_min_epi32(_mm256_cvtps_epi32(r), lim)
                });
                _mm256_storeu_si256(o.add(4 + 32 * g) as *mut __m256i, pack32(q));
                let s0 = hsum_epi32(_mm256_add_epi32(q[0], q[1])) as i16;
                let s1 = hsum_epi32(_mm256_add_epi32(q[2], q[3])) as i16;
                (o.add(260 + 4 * g) as *mut i16).write_unaligned(s0);
                (o.add(262 + 4 * g) as *mut i16).write_unaligned(s1);
            }
            (o as *mut f32).write_unaligned(1.0 / iscale);
        }
    }
    true
}

/// F16 activations (round to nearest even, like the scalar path).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_f16(x: &[f32], out: &mut Vec<u8>) -> bool {
    out.resize(x.len() * 2, 0);
    let n8 = x.len() / 8 * 8;
    let (src, dst) = (x.as_ptr(), out.as_mut_ptr());
    for i in (0..n8).step_by(8) {
        // SAFETY: i + 8 <= x.len(), and out holds 2 bytes per element.
        unsafe {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(src.add(i)));
            _mm_storeu_si128(dst.add(2 * i) as *mut __m128i, h);
        }
    }
    for i in n8..x.len() {
        out[2 * i..2 * i + 2].copy_from_slice(&crate::f32_to_f16(x[i]).to_le_bytes());
    }
    true
}
