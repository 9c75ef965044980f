//! AVX-512 (F + BW + VL + VNNI) kernels for Q4_0, Q4_1, Q5_0 and Q8_0, packed tiles for
//! Q5_1, and for Q4_K and Q6_K kernels that keep llama.cpp's summation order per row (one
//! token: eight Q4_K rows at a time, Q6_K rows two per vector; batches: 4 tokens). Other
//! types use their AVX2 kernel.
//!
//! Same [`DotFn`] contract as the AVX2 kernels; `detect()` only reports `Isa::Avx512` when
//! all these features and the AVX2 set are present. The 32-element formats use 256-bit
//! VNNI `vpdpbusd` (u8 × i8, summed in groups of 4 into i32 without saturation), one block
//! per step in llama.cpp's order (its AVX-512 VNNI build runs the same instructions).

use std::arch::x86_64::*;

use super::avx2::{
    bsums_madd, dm_pair, hsum_epi32, hsum_ps, k4_scales_mins_v, ld256, ld2x128, ld_f16, ld_f32,
    ld_u32, nibbles32,
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
        _ => return None,
    })
}

// The 32-element formats stay 256 bits wide: their 18/34-byte blocks need several shuffles
// to pack two per 512-bit vector, and 512-bit ALU ops only issue on two ports, so a
// 512-bit version measured slower. What pays off is VNNI: `vpdpbusd` replaces the
// maddubs + madd pair (and for Q4_0 the -8 bias).

/// One block of `dot_q4_0`: the scale product (all lanes) and the 8 integer lane sums.
///
/// # Safety
/// `x` and `y` must point at whole blocks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn blk_q4_0(x: *const u8, y: *const u8) -> (__m256, __m256i) {
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

/// Four rows of a 32-element format with unsigned quants and a fixed bias (Q4_0: 8,
/// Q5_0: 16) against one activation row, each row with the same bits as its one-row dot
/// (the same integer sums, scale product and fused accumulation); the activation's half of
/// the work, -bias·Σy and its scale, is done once for the four rows. `$quants(x)` gives a
/// block's 32 unsigned quants.
macro_rules! biased_rows {
    ($n:expr, $w:expr, $ws:expr, $a:expr, $out:expr, $bytes:expr, $bias:expr, $quants:path) => {{
        let (n, w, ws, a, out) = ($n, $w, $ws, $a, $out);
        let mut acc = [_mm256_setzero_ps(); 4];
        let z = _mm256_setzero_si256();
        // SAFETY (whole body): block b < n/32 lies inside the activation row and each of
        // the four weight rows; out holds four f32 (RowsFn contract).
        unsafe {
            for b in 0..n / 32 {
                let y = a.add(34 * b);
                let q8 = ld256(y.add(2));
                let neg = _mm256_sub_epi32(z, _mm256_dpbusd_epi32(z, _mm256_set1_epi8($bias), q8));
                let fy = _mm256_cvtph_ps(_mm_set1_epi32(ld_u32(y) as i32));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = w.add(r * ws + $bytes * b);
                    let fx = _mm256_cvtph_ps(_mm_set1_epi32(ld_u32(x) as i32));
                    let d = _mm256_permute_ps::<0>(_mm256_mul_ps(fx, fy));
                    let p = _mm256_dpbusd_epi32(neg, $quants(x), q8);
                    *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), *acc);
                }
            }
            for (r, acc) in acc.into_iter().enumerate() {
                *out.add(r) = hsum_ps(acc);
            }
        }
    }};
}

/// A Q4_0 block's 32 unsigned quants (0..=15).
///
/// # Safety
/// `x` must point at a whole 18-byte block.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4_0_quants(x: *const u8) -> __m256i {
    // SAFETY: the nibbles are bytes 2..18 of the block.
    unsafe { nibbles32(x.add(2)) }
}

/// Four rows of `dot_q4_0` (see `biased_rows!`).
///
/// # Safety
/// [`RowsFn`](crate::RowsFn) contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn rows_q4_0(n: usize, w: *const u8, ws: usize, a: *const u8, out: *mut f32) {
    biased_rows!(n, w, ws, a, out, 18, 8, q4_0_quants)
}

/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q4_0(n: usize, w: *const u8, a: *const u8) -> f32 {
    legacy_dot!(n, w, a, 18, 34, blk_q4_0)
}

/// One Q4_1 block as `avx2::blk_q4_1`, the integer sums with VNNI.
///
/// # Safety
/// `x` and `y` must point at whole blocks (20 / 36 bytes).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn blk_q4_1(x: *const u8, y: *const u8) -> (__m256, __m256i, __m256, __m256) {
    // SAFETY: whole blocks (caller).
    unsafe {
        let fx = _mm256_cvtph_ps(_mm_set1_epi32(ld_u32(x) as i32));
        let fy = _mm256_cvtph_ps(_mm_set1_epi32(ld_u32(y) as i32));
        let d = _mm256_permute_ps::<0>(_mm256_mul_ps(fx, fy));
        let z = _mm256_setzero_si256();
        let p = _mm256_dpbusd_epi32(z, nibbles32(x.add(4)), ld256(y.add(4)));
        (d, p, fx, fy)
    }
}

/// In ggml's order (see `legacy::vec_dot_q4_1`), as ggml's AVX-512 VNNI build runs it.
///
/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q4_1(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut out = 0.0f32;
    q4_1_rows!(1, n, w, 0, a, &mut out as *mut f32, blk_q4_1);
    out
}

/// Four rows of [`dot_q4_1`] (the same bits per row).
///
/// # Safety
/// [`RowsFn`](crate::RowsFn) contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn rows_q4_1(n: usize, w: *const u8, ws: usize, a: *const u8, out: *mut f32) {
    q4_1_rows!(4, n, w, ws, a, out, blk_q4_1)
}

/// The four-row kernels (`RowsFn`), where a type has one.
pub(crate) fn rows_kernel(weight: GgmlType) -> Option<crate::RowsFn> {
    use GgmlType::*;
    Some(match weight {
        Q4_0 => rows_q4_0,
        Q4_1 => rows_q4_1,
        Q5_0 => rows_q5_0,
        Q8_0 => rows_q8_0,
        Q6_K => rows_q6_k,
        _ => return None,
    })
}

/// The eight-row kernels (the [`RowsFn`](crate::RowsFn) signature, eight rows: see
/// [`rows8`]), where a type has one.
pub(crate) fn rows8_kernel(weight: GgmlType) -> Option<crate::RowsFn> {
    use GgmlType::*;
    Some(match weight {
        Q4_0 => rows8_q4_0,
        Q4_1 => rows8_q4_1,
        Q5_0 => rows8_q5_0,
        Q8_0 => rows8_q8_0,
        Q4_K => rows8_q4_k,
        _ => return None,
    })
}

/// Eight rows of a 32-element format against one activation row (decode), each row with
/// the bits of its one-row kernel.
///
/// Those kernels spend most of their instructions on work whose order does not matter:
/// unpacking quants, converting f16 scales, broadcasting the scale product. Here two rows
/// share each 512-bit vector (row 2k in lanes 0..8, row 2k+1 in lanes 8..16), so the
/// integer dot, its conversion and the fused accumulation of both rows are one
/// instruction each, lane for lane the same operations as the 8-lane one-row kernel, block
/// after block. The eight rows' f16 headers come in with one gather per block and are
/// converted and multiplied by the activation's at once (d_x·d_y: the same single
/// rounding); each row pair takes its two products with one permute. Q4_1's min terms,
/// one fused chain per row, run as one chain per lane (lane 2r+1 = row r).
///
/// The integers per lane are the one-row kernel's (exact sums, freely reordered): Q4_0 /
/// Q5_0 start from -bias·Σy; Q8_0's signed quants go in +128 (unsigned, as `vpdpbusd`
/// wants) from -128·Σy.
///
/// # Safety
/// [`RowsFn`](crate::RowsFn) contract for eight rows (eight weight rows `ws` bytes
/// apart, `out` holds eight f32), and `7 * ws` fits in an i32 (the gather's offsets).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn rows8<const K: u8>(n: usize, w: *const u8, ws: usize, a: *const u8, out: *mut f32) {
    let (wbytes, qs_off, qh_off, bias, min) = legacy_params(K);
    let (abytes, y_off) = if min { (36, 4) } else { (34, 2) };
    let ws32 = ws as i32;
    let gidx = _mm256_mullo_epi32(
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        _mm256_set1_epi32(ws32),
    );
    // Product lanes 4k and 4k+2 (rows 2k and 2k+1), each over one 256-bit half.
    let perm: [__m512i; 4] = std::array::from_fn(|k| {
        join(
            _mm256_set1_epi32(4 * k as i32),
            _mm256_set1_epi32(4 * k as i32 + 2),
        )
    });
    let m4 = _mm512_set1_epi8(0x0f);
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut ms = _mm512_setzero_ps();
    // SAFETY (whole body): block b < n/32 lies inside the activation row and each of the
    // eight weight rows, whose offsets from the first fit in i32 (caller); out holds
    // eight f32.
    unsafe {
        let nb = n / 32;
        // The headers one block ahead: the gather waits for every row's line, and the
        // block's other work should not wait behind it (the last block gathers itself
        // again).
        let gather = |b: usize| _mm256_i32gather_epi32::<1>(w.add(wbytes * b) as *const i32, gidx);
        let mut h_next = if nb > 0 {
            gather(0)
        } else {
            _mm256_setzero_si256()
        };
        for b in 0..nb {
            let h = h_next;
            h_next = gather((b + 1).min(nb - 1));
            // The next eight rows (the caller's next call), a block's worth of them per
            // block here: else the first gather of that call waits for all of its lines
            // from L3 or memory. A prefetch past the matrix is harmless (it never faults).
            prefetch_lines(w.wrapping_add(8 * ws + 8 * wbytes * b), 8 * wbytes);
            let y = a.add(abytes * b);
            let yq = _mm512_broadcast_i64x4(ld256(y.add(y_off)));
            // [dy, sy] (Q8_1) or [dy, junk] (Q8_0), repeated.
            let fy = _mm512_cvtph_ps(_mm256_set1_epi32(ld_u32(y) as i32));
            let start = if bias != 0 {
                let z = _mm512_setzero_si512();
                _mm512_sub_epi32(z, _mm512_dpbusd_epi32(z, _mm512_set1_epi8(bias as i8), yq))
            } else {
                _mm512_setzero_si512()
            };
            let xb = w.add(wbytes * b);
            // Lanes 2r / 2r+1: row r's d and its m (Q4_1) or the next two bytes (junk).
            let fx = _mm512_cvtph_ps(h);
            let p = _mm512_mul_ps(fx, fy);
            if min {
                ms = _mm512_fmadd_ps(fx, fy, ms);
            }
            for (k, acc) in acc.iter_mut().enumerate() {
                let x0 = xb.add(2 * k * ws);
                let x1 = x0.add(ws);
                let q = pair_quants::<K>(x0, x1, qs_off, qh_off, m4);
                let s = _mm512_dpbusd_epi32(start, q, yq);
                let d = _mm512_permutexvar_ps(perm[k], p);
                *acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), *acc);
            }
        }
        let mut m = [0f32; 16];
        _mm512_storeu_ps(m.as_mut_ptr(), ms);
        for (k, acc) in acc.into_iter().enumerate() {
            let (lo, hi) = halves_ps(acc);
            let (mut r0, mut r1) = (hsum_ps(lo), hsum_ps(hi));
            if min {
                r0 += m[4 * k + 1];
                r1 += m[4 * k + 3];
            }
            *out.add(2 * k) = r0;
            *out.add(2 * k + 1) = r1;
        }
    }
}

/// # Safety
/// [`rows8`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn rows8_q4_0(n: usize, w: *const u8, ws: usize, a: *const u8, out: *mut f32) {
    // SAFETY: same contract, same features.
    unsafe { rows8::<L_Q4_0>(n, w, ws, a, out) }
}

/// # Safety
/// [`rows8`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn rows8_q4_1(n: usize, w: *const u8, ws: usize, a: *const u8, out: *mut f32) {
    // SAFETY: same contract, same features.
    unsafe { rows8::<L_Q4_1>(n, w, ws, a, out) }
}

/// # Safety
/// [`rows8`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn rows8_q5_0(n: usize, w: *const u8, ws: usize, a: *const u8, out: *mut f32) {
    // SAFETY: same contract, same features.
    unsafe { rows8::<L_Q5_0>(n, w, ws, a, out) }
}

/// # Safety
/// [`rows8`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn rows8_q8_0(n: usize, w: *const u8, ws: usize, a: *const u8, out: *mut f32) {
    // SAFETY: same contract, same features.
    unsafe { rows8::<L_Q8_0>(n, w, ws, a, out) }
}

/// A Q5_0 block's 32 unsigned 5-bit quants (0..=31): the nibbles, plus 16 where the block's
/// high-bit word has the element's bit set. The word goes straight into a mask register
/// (one masked add instead of the AVX2 shuffle/compare expansion: the same integers).
///
/// # Safety
/// `x` must point at a whole 22-byte block.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q5_0_quants(x: *const u8) -> __m256i {
    // SAFETY: x points at a whole block: the high bits at 2..6, the nibbles at 6..22.
    unsafe {
        let nib = nibbles32(x.add(6));
        _mm256_mask_add_epi8(nib, ld_u32(x.add(2)), nib, _mm256_set1_epi8(16))
    }
}

/// One block of `dot_q5_0`: the scale product (all lanes) and the 8 integer lane sums.
///
/// # Safety
/// `x` and `y` must point at whole blocks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn blk_q5_0(x: *const u8, y: *const u8) -> (__m256, __m256i) {
    // SAFETY: x and y point at whole blocks (22 / 34 bytes).
    unsafe {
        let d = dm_pair(x, y).0;
        let q = q5_0_quants(x);
        let q8 = ld256(y.add(2));
        let z = _mm256_setzero_si256();
        let p = _mm256_dpbusd_epi32(z, q, q8);
        let o = _mm256_dpbusd_epi32(z, _mm256_set1_epi8(16), q8);
        (d, _mm256_sub_epi32(p, o))
    }
}

/// Four rows of `dot_q5_0` (see `biased_rows!`).
///
/// # Safety
/// [`RowsFn`](crate::RowsFn) contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn rows_q5_0(n: usize, w: *const u8, ws: usize, a: *const u8, out: *mut f32) {
    biased_rows!(n, w, ws, a, out, 22, 16, q5_0_quants)
}

/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q5_0(n: usize, w: *const u8, a: *const u8) -> f32 {
    // The 5-bit values (0..=31) are unsigned, as `vpdpbusd` wants; the -16 bias comes off as
    // Σ 16 * y, like Q4_0's -8.
    legacy_dot!(n, w, a, 22, 34, blk_q5_0)
}

/// One block of `dot_q8_0`: the scale product (all lanes) and the 8 integer lane sums.
///
/// # Safety
/// `x` and `y` must point at whole blocks.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn blk_q8_0(x: *const u8, y: *const u8) -> (__m256, __m256i) {
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

/// Four rows of `dot_q8_0` against one activation row (the same bits per row).
///
/// # Safety
/// [`RowsFn`](crate::RowsFn) contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn rows_q8_0(n: usize, w: *const u8, ws: usize, a: *const u8, out: *mut f32) {
    legacy_rows!(n, w, ws, a, out, 34, 34, blk_q8_0)
}

/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q8_0(n: usize, w: *const u8, a: *const u8) -> f32 {
    legacy_dot!(n, w, a, 34, 34, blk_q8_0)
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

/// The quants of one block of two rows (`x0` in the low half, `x1` in the high half) as the
/// unsigned bytes `vpdpbusd` takes: Q8_0's i8 + 128 (from -128·Σy: the same integers as
/// |x|·sign(y, x)), or the nibbles (each row's 16 bytes twice, the second copy shifted
/// down: low nibbles for elements 0..16, then high for 16..32) plus 16 where Q5's high-bit
/// word has the element's bit.
///
/// # Safety
/// `x0` and `x1` must point at whole blocks of the layout `K` (quants at `qs_off`, high
/// bits at `qh_off` when nonzero).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn pair_quants<const K: u8>(
    x0: *const u8,
    x1: *const u8,
    qs_off: usize,
    qh_off: usize,
    m4: __m512i,
) -> __m512i {
    // SAFETY: whole blocks (caller).
    unsafe {
        if K == L_Q8_0 {
            let v = join(ld256(x0.add(qs_off)), ld256(x1.add(qs_off)));
            return _mm512_xor_si512(v, _mm512_set1_epi8(-128));
        }
        let bc = |p: *const u8| _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
        let v = join(bc(x0.add(qs_off)), bc(x1.add(qs_off)));
        let v = _mm512_mask_srli_epi16::<4>(v, 0xFF00_FF00, v);
        let q = _mm512_and_si512(v, m4);
        if qh_off != 0 {
            let h = ld_u32(x0.add(qh_off)) as u64 | (ld_u32(x1.add(qh_off)) as u64) << 32;
            _mm512_mask_add_epi8(q, h, q, _mm512_set1_epi8(16))
        } else {
            q
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

/// The packing and tile kernels for `weight`, where it has them, and the tile's rows
/// (its tokens: always `TILE_T`).
pub(crate) fn packed_kernel(weight: GgmlType) -> Option<(PackFn, PTileFn, usize)> {
    use GgmlType::*;
    Some(match weight {
        // Q4_0, Q4_1, Q5_0 and Q8_0 in llama.cpp's order (`ztile`): one block per step.
        Q4_0 => (pack_raw::<34>, ztile_q4_0, 2 * ZTILE_P),
        Q4_1 => (pack_raw::<36>, ztile_q4_1, 2 * ZTILE_P),
        Q5_0 => (pack_raw::<34>, ztile_q5_0, 2 * ZTILE_P),
        Q8_0 => (pack_raw::<34>, ztile_q8_0, 2 * ZTILE_P),
        Q5_1 => (pack::<L_Q5_1>, ptile_q5_1, TILE_R),
        _ => return None,
    })
}

/// "Packing" for [`ztile`]: the activation row as it is (`AB`-byte Q8_0 / Q8_1 blocks),
/// which fits in `packed_bytes(n)`.
///
/// # Safety
/// [`PackFn`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn pack_raw<const AB: usize>(n: usize, y: *const u8, dst: *mut u8) {
    // SAFETY: the row holds n/32 blocks of AB bytes, and dst packed_bytes(n) ≥ that many.
    unsafe { std::ptr::copy_nonoverlapping(y, dst, n / 32 * AB) };
}

/// Row pairs per [`ztile`] (Q4_1 with 2 measured no faster, though its min chains
/// double the accumulators).
const ZTILE_P: usize = 4;

/// A `2P` × `TILE_T` tile of the 32-element formats in llama.cpp's order: for every
/// (row, token) exactly the operations of the one-row kernel (`legacy::vec_dot_*`), per
/// block `acc = fma(dx*dy, lanes, acc)` (and for Q4_1 the fused min chain in lane 1 of
/// `ms`), then the lanes' tree sum. Two rows share each 512-bit vector (as in [`rows8`]:
/// row 2k in lanes 0..8, row 2k+1 in 8..16), so the scale product, the integer dot, its
/// conversion and the fused accumulation are one instruction per row pair and token; the
/// tokens' block preparation (their scale, the -bias·Σy start) is shared by `2P` rows.
/// `K` selects the format; activations are raw rows (`pack_raw`).
///
/// # Safety
/// [`PTileFn`] contract with `2P` rows.
#[inline]
#[allow(clippy::needless_range_loop)] // k and t index several arrays at once
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn ztile<const K: u8, const P: usize>(
    n: usize,
    w: *const u8,
    ws: usize,
    p: *const u8,
    ps: usize,
    out: *mut f32,
    os: usize,
) {
    let (wbytes, qs_off, qh_off, bias, min) = legacy_params(K);
    let abytes = if min { 36 } else { 34 };
    let z = _mm512_setzero_si512();
    let m4 = _mm512_set1_epi8(0x0f);
    let mut acc = [[_mm512_setzero_ps(); TILE_T]; P];
    let mut ms = [[_mm512_setzero_ps(); TILE_T]; P];
    // SAFETY (whole body): block b < n/32 lies inside every weight row of the tile and
    // every activation row (PTileFn contract; raw rows from pack_raw).
    unsafe {
        for b in 0..n / 32 {
            // The next tile's rows, as in `rows8` (harmless past the matrix).
            prefetch_lines(
                w.wrapping_add(2 * P * ws + 2 * P * wbytes * b),
                2 * P * wbytes,
            );
            let mut fx = [_mm512_setzero_ps(); P];
            let mut dx = [_mm512_setzero_ps(); P];
            let mut qx = [z; P];
            for k in 0..P {
                let x0 = w.add(2 * k * ws + wbytes * b);
                let x1 = x0.add(ws);
                // [d, m or junk] of each row, repeated over its half.
                let h = _mm256_set_m128i(
                    _mm_set1_epi32(ld_u32(x1) as i32),
                    _mm_set1_epi32(ld_u32(x0) as i32),
                );
                fx[k] = _mm512_cvtph_ps(h);
                dx[k] = _mm512_permute_ps::<0>(fx[k]);
                qx[k] = pair_quants::<K>(x0, x1, qs_off, qh_off, m4);
            }
            for t in 0..TILE_T {
                let y = p.add(t * ps + abytes * b);
                let fy = _mm512_cvtph_ps(_mm256_set1_epi32(ld_u32(y) as i32));
                let dy = _mm512_permute_ps::<0>(fy);
                let yq = _mm512_broadcast_i64x4(ld256(y.add(abytes - 32)));
                // -bias · Σ y: the unsigned quants' offset (none for Q4_1).
                let start = if bias != 0 {
                    _mm512_sub_epi32(z, _mm512_dpbusd_epi32(z, _mm512_set1_epi8(bias as i8), yq))
                } else {
                    z
                };
                for k in 0..P {
                    let d = _mm512_mul_ps(dx[k], dy);
                    let s = _mm512_dpbusd_epi32(start, qx[k], yq);
                    acc[k][t] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s), acc[k][t]);
                    if min {
                        ms[k][t] = _mm512_fmadd_ps(fx[k], fy, ms[k][t]);
                    }
                }
            }
        }
        for k in 0..P {
            for t in 0..TILE_T {
                let (a0, a1) = halves_ps(acc[k][t]);
                let (mut v0, mut v1) = (hsum_ps(a0), hsum_ps(a1));
                if min {
                    let lane1 =
                        |v: __m256| _mm_cvtss_f32(_mm_movehdup_ps(_mm256_castps256_ps128(v)));
                    let (m0, m1) = halves_ps(ms[k][t]);
                    v0 += lane1(m0);
                    v1 += lane1(m1);
                }
                // SAFETY: out holds 2P x TILE_T results at these offsets.
                *out.add(t * os + 2 * k) = v0;
                *out.add(t * os + 2 * k + 1) = v1;
            }
        }
    }
}

macro_rules! ztile_fn {
    ($name:ident, $k:expr, $p:expr) => {
        /// # Safety
        /// [`PTileFn`] contract with `2 * $p` rows.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
        unsafe fn $name(
            n: usize,
            w: *const u8,
            ws: usize,
            p: *const u8,
            ps: usize,
            out: *mut f32,
            os: usize,
        ) {
            // SAFETY: same contract, same features.
            unsafe { ztile::<{ $k }, { $p }>(n, w, ws, p, ps, out, os) }
        }
    };
}
ztile_fn!(ztile_q4_0, L_Q4_0, ZTILE_P);
ztile_fn!(ztile_q4_1, L_Q4_1, ZTILE_P);
ztile_fn!(ztile_q5_0, L_Q5_0, ZTILE_P);
ztile_fn!(ztile_q8_0, L_Q8_0, ZTILE_P);

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

/// `[a | b]` as one 512-bit vector.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn join(a: __m256i, b: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b)
}

/// Q4_K × Q8_K per 64 elements j: Σ scale · q · y as 16 i32 lanes (their sum is exact),
/// 64 elements per 512-bit step; and the 8 lanes of Σ min · bsum (`avx2::q4k_pairs`).
///
/// # Safety
/// `x` and `y` must point at whole blocks (144 / 292 bytes).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4k_parts(x: *const u8, y: *const u8) -> ([__m512i; 4], __m256i) {
    let m4 = _mm512_set1_epi8(0x0f);
    // SAFETY: whole blocks (caller).
    unsafe {
        let sm = k4_scales_mins_v(x.add(4));
        let m16 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm));
        let mins = bsums_madd(y, m16);
        // 8 scales as i16 in the low 128 bits (the permutes below read only those).
        let s = _mm512_castsi128_si512(_mm_cvtepu8_epi16(sm));
        let parts = std::array::from_fn(|j| {
            // 32 bytes of nibbles = elements 64j..64j+64: low nibbles, then high.
            let qb = _mm512_broadcast_i64x4(ld256(x.add(16 + 32 * j)));
            let qb = _mm512_mask_srli_epi16::<4>(qb, 0xFFFF_0000, qb);
            let q = _mm512_and_si512(qb, m4);
            let yv = _mm512_loadu_si512(y.add(4 + 64 * j) as *const __m512i);
            let p = _mm512_maddubs_epi16(q, yv);
            let (i0, i1) = (2 * j as i16, 2 * j as i16 + 1);
            let sc =
                _mm512_permutexvar_epi16(join(_mm256_set1_epi16(i0), _mm256_set1_epi16(i1)), s);
            _mm512_madd_epi16(p, sc)
        });
        (parts, mins)
    }
}

/// In the order of llama.cpp's repacked Q4_K gemv (`kquants::vec_dot_q4_k`).
///
/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_q4_k(n: usize, w: *const u8, a: *const u8) -> f32 {
    let (mut acc, mut accm) = (0.0f32, 0.0f32);
    // SAFETY (whole body): super-block b < n/256 lies inside both rows (DotFn contract).
    unsafe {
        for b in 0..n / 256 {
            let (x, y) = (w.add(144 * b), a.add(292 * b));
            let (p, mins) = q4k_parts(x, y);
            let sum = _mm512_add_epi32(_mm512_add_epi32(p[0], p[1]), _mm512_add_epi32(p[2], p[3]));
            let i = _mm512_reduce_add_epi32(sum);
            let yd = ld_f32(y);
            acc = (i as f32).mul_add(ld_f16(x) * yd, acc);
            accm = (hsum_epi32(mins) as f32).mul_add(ld_f16(x.add(2)) * yd, accm);
        }
    }
    acc - accm
}

/// Eight rows of [`dot_q4_k`] (one token), row r's chains in lane r.
///
/// The one-row kernel ends each super-block with two horizontal integer sums and two
/// scalar fused multiply-adds, about as much work as the block's dot product itself. Here
/// the eight rows' integer sums (exact, so any order) fold into one 8-lane vector each for
/// the scales and the mins, the rows' f16 headers come in with one gather, and both
/// accumulations are one 8-lane fused multiply-add: lane r does row r's scalar
/// operations (`fma(Σ, d·dy, acc)`, one rounding for `d·dy`), so each row keeps its bits.
/// The activation's quants and bsums are loaded once per super-block for all eight rows.
///
/// # Safety
/// [`rows8`] contract (eight rows `ws` bytes apart, `out` holds eight f32, `7 * ws` fits
/// in an i32).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn rows8_q4_k(n: usize, w: *const u8, ws: usize, a: *const u8, out: *mut f32) {
    let m4 = _mm512_set1_epi8(0x0f);
    let gidx = _mm256_mullo_epi32(
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        _mm256_set1_epi32(ws as i32),
    );
    // 64 bytes of quants (sub-blocks 2i and 2i+1 of 64 elements) give their four
    // 32-element groups as two vectors: low nibbles (groups 4i, 4i+2) and high nibbles
    // (4i+1, 4i+3). The scale index of each i16 product lane, per vector.
    let sidx: [__m512i; 4] = std::array::from_fn(|v| {
        let g = 4 * (v / 2) as i16 + (v % 2) as i16;
        join(_mm256_set1_epi16(g), _mm256_set1_epi16(g + 2))
    });
    let (mut acc, mut accm) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    // SAFETY (whole body): super-block b < n/256 lies inside the activation row and each
    // of the eight weight rows, whose offsets from the first fit in i32 (caller); out
    // holds eight f32.
    unsafe {
        for b in 0..n / 256 {
            // The next eight rows (the caller's next call; contiguous), a super-block's
            // share of them per super-block, as `rows8` does: from memory, the hardware
            // prefetcher alone keeps too few of eight rows' lines in flight.
            prefetch_lines(w.wrapping_add(8 * ws + 8 * 144 * b), 8 * 144);
            let y = a.add(292 * b);
            // The activation's quants in the same group order, once for all eight rows.
            let yv: [__m512i; 4] = std::array::from_fn(|v| {
                let g = 4 * (v / 2) + v % 2;
                join(ld256(y.add(4 + 32 * g)), ld256(y.add(4 + 32 * (g + 2))))
            });
            let bsums = ld256(y.add(260));
            let xb = w.add(144 * b);
            let mut sums = [_mm256_setzero_si256(); 8];
            let mut mins = [_mm256_setzero_si256(); 8];
            for r in 0..8 {
                let x = xb.add(r * ws);
                let sm = k4_scales_mins_v(x.add(4));
                mins[r] = _mm256_madd_epi16(bsums, _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm)));
                let s = _mm512_castsi128_si512(_mm_cvtepu8_epi16(sm));
                let mut t = _mm512_setzero_si512();
                for i in 0..2 {
                    let qb = _mm512_loadu_si512(x.add(16 + 64 * i) as *const __m512i);
                    let q = [
                        _mm512_and_si512(qb, m4),
                        _mm512_and_si512(_mm512_srli_epi16::<4>(qb), m4),
                    ];
                    for (h, q) in q.into_iter().enumerate() {
                        let p = _mm512_maddubs_epi16(q, yv[2 * i + h]);
                        let sc = _mm512_permutexvar_epi16(sidx[2 * i + h], s);
                        t = _mm512_dpwssd_epi32(t, p, sc);
                    }
                }
                sums[r] =
                    _mm256_add_epi32(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64::<1>(t));
            }
            // Each row's header [d, dmin] (two f16) as one i32 per lane, from lines the
            // loop above has just read.
            let h = _mm256_i32gather_epi32::<1>(xb as *const i32, gidx);
            let d = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_and_si256(
                h,
                _mm256_set1_epi32(0xffff),
            )));
            let dmin = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_srli_epi32::<16>(h)));
            let yd = _mm256_set1_ps(ld_f32(y));
            let is = _mm256_cvtepi32_ps(sum8_lanes(sums));
            let ms = _mm256_cvtepi32_ps(sum8_lanes(mins));
            acc = _mm256_fmadd_ps(is, _mm256_mul_ps(d, yd), acc);
            accm = _mm256_fmadd_ps(ms, _mm256_mul_ps(dmin, yd), accm);
        }
        _mm256_storeu_ps(out, _mm256_sub_ps(acc, accm));
    }
}

/// Lane r = the sum of `v[r]`'s eight i32 lanes (exact; any order).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn sum8_lanes(v: [__m256i; 8]) -> __m256i {
    // Within each 128-bit half: [v0, v1, v2, v3] partial sums, then the halves added.
    let a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    let b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    _mm256_add_epi32(
        _mm256_permute2x128_si256::<0x20>(a, b),
        _mm256_permute2x128_si256::<0x31>(a, b),
    )
}

/// In the order of llama.cpp's repacked Q4_K gemm (`kquants::vec_dot_q4_k_gemm`).
///
/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_k_gemm(n: usize, w: *const u8, a: *const u8) -> f32 {
    let (mut acc, mut accm) = (0.0f32, 0.0f32);
    // SAFETY (whole body): super-block b < n/256 lies inside both rows (DotFn contract).
    unsafe {
        for b in 0..n / 256 {
            let (x, y) = (w.add(144 * b), a.add(292 * b));
            let (p, mins) = q4k_parts(x, y);
            let mut ml = [0i32; 8];
            _mm256_storeu_si256(ml.as_mut_ptr() as *mut __m256i, mins);
            let yd = ld_f32(y);
            let (d, dmin) = (ld_f16(x) * yd, ld_f16(x.add(2)) * yd);
            for (j, i) in reduce4_epi32(p).into_iter().enumerate() {
                acc = (i as f32).mul_add(d, acc);
                accm = ((ml[2 * j] + ml[2 * j + 1]) as f32).mul_add(dmin, accm);
            }
        }
    }
    acc - accm
}

// ---- 4-token kernels for batched matmul (see `multi_avx2`), in llama.cpp's batch orders ----

use super::multi_avx2::T;

/// Four tokens of [`dot_q4_k_gemm`] (the same bits per token), unpacking the weight row once.
///
/// # Safety
/// [`Dot4Fn`](super::multi_avx2::Dot4Fn) contract, and the CPU has the AVX-512 set above.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn dot4_q4_k_gemm(
    n: usize,
    w: *const u8,
    a: *const u8,
    st: usize,
    out: *mut f32,
    os: usize,
) {
    let mut acc = [0.0f32; T];
    let mut accm = [0.0f32; T];
    let m4 = _mm512_set1_epi8(0x0f);
    // SAFETY (whole body): super-block b < n/256 lies inside the weight row and every
    // activation row; out holds T results at stride os (Dot4Fn contract).
    unsafe {
        for b in 0..n / 256 {
            let x = w.add(144 * b);
            let sm = k4_scales_mins_v(x.add(4));
            let m16 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm));
            let s = _mm512_castsi128_si512(_mm_cvtepu8_epi16(sm));
            let (dx, dmx) = (ld_f16(x), ld_f16(x.add(2)));
            let mut ml = [[0i32; 8]; T];
            for (t, ml) in ml.iter_mut().enumerate() {
                let mins = bsums_madd(a.add(t * st + 292 * b), m16);
                _mm256_storeu_si256(ml.as_mut_ptr() as *mut __m256i, mins);
            }
            let mut parts = [[_mm512_setzero_si512(); 4]; T];
            for j in 0..4 {
                let qb = _mm512_broadcast_i64x4(ld256(x.add(16 + 32 * j)));
                let qb = _mm512_mask_srli_epi16::<4>(qb, 0xFFFF_0000, qb);
                let q = _mm512_and_si512(qb, m4);
                let (i0, i1) = (2 * j as i16, 2 * j as i16 + 1);
                let sc =
                    _mm512_permutexvar_epi16(join(_mm256_set1_epi16(i0), _mm256_set1_epi16(i1)), s);
                for (t, parts) in parts.iter_mut().enumerate() {
                    let y = a.add(t * st + 292 * b);
                    let yv = _mm512_loadu_si512(y.add(4 + 64 * j) as *const __m512i);
                    parts[j] = _mm512_madd_epi16(_mm512_maddubs_epi16(q, yv), sc);
                }
            }
            for t in 0..T {
                let yd = ld_f32(a.add(t * st + 292 * b));
                for (j, i) in reduce4_epi32(parts[t]).into_iter().enumerate() {
                    acc[t] = (i as f32).mul_add(dx * yd, acc[t]);
                    let mj = ml[t][2 * j] + ml[t][2 * j + 1];
                    accm[t] = (mj as f32).mul_add(dmx * yd, accm[t]);
                }
            }
        }
        for t in 0..T {
            *out.add(t * os) = acc[t] - accm[t];
        }
    }
}

/// The lane sums of four vectors of 16 i32 (exact), folded together.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn reduce4_epi32(v: [__m512i; 4]) -> [i32; 4] {
    let h = v.map(|v| {
        let s = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v));
        _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s))
    });
    let ab = _mm_hadd_epi32(h[0], h[1]);
    let cd = _mm_hadd_epi32(h[2], h[3]);
    let r = _mm_hadd_epi32(ab, cd);
    let mut out = [0i32; 4];
    // SAFETY: out holds four i32; one unaligned 16-byte store.
    unsafe { _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, r) };
    out
}

/// Q6_K × Q8_K: the exact integer sum of one super-block (64 elements per 512-bit step).
///
/// # Safety
/// `x` and `y` must point at whole blocks (210 / 292 bytes).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q6k_sum(x: *const u8, y: *const u8, s16: __m256i) -> i32 {
    let m4 = _mm512_set1_epi8(0x0f);
    let m3 = _mm512_set1_epi8(3);
    // SAFETY: whole blocks (caller).
    unsafe {
        // Quants are used +32 (0..=63); subtract 32 * Σ scale * bsum afterwards.
        let offset = _mm256_slli_epi32(bsums_madd(y, s16), 5);
        let s = _mm512_castsi256_si512(s16);
        let idx4 = |base: i16| {
            join(
                _mm256_set_m128i(_mm_set1_epi16(base + 1), _mm_set1_epi16(base)),
                _mm256_set_m128i(_mm_set1_epi16(base + 3), _mm_set1_epi16(base + 2)),
            )
        };
        let mut sumi = _mm512_setzero_si512();
        for h in 0..2 {
            let ld = |p: *const u8| _mm512_loadu_si512(p as *const __m512i);
            // ql[64h..64h+64]: low nibbles = elements 128h+0..64, high = +64..128; qh bits
            // 0-1 / 2-3 go with the first / second 32 low nibbles, bits 4-5 / 6-7 with the
            // high ones: the upper copy shifted by 2 lines them up.
            let ql = ld(x.add(64 * h));
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
            let pa = _mm512_maddubs_epi16(qa, ld(y.add(4 + 128 * h)));
            let pb = _mm512_maddubs_epi16(qb, ld(y.add(68 + 128 * h)));
            let base = 8 * h as i16;
            let sa = _mm512_permutexvar_epi16(idx4(base), s);
            let sb = _mm512_permutexvar_epi16(idx4(base + 4), s);
            sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(pa, sa));
            sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(pb, sb));
        }
        _mm512_reduce_add_epi32(sumi) - hsum_epi32(offset)
    }
}

/// In the order of llama.cpp's tiled K-quant matmul (`kquants::vec_dot_q6_k_tiled`).
///
/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn dot_q6_k_tiled(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = 0.0f32;
    // SAFETY (whole body): super-block b < n/256 lies inside both rows (DotFn contract).
    unsafe {
        for b in 0..n / 256 {
            let (x, y) = (w.add(210 * b), a.add(292 * b));
            let s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.add(192) as *const __m128i));
            let s = q6k_sum(x, y, s16);
            acc = (s as f32 * ld_f16(x.add(208))).mul_add(ld_f32(y), acc);
        }
    }
    acc
}

/// Four tokens of [`dot_q6_k_tiled`] (the same bits per token).
///
/// # Safety
/// [`Dot4Fn`](super::multi_avx2::Dot4Fn) contract, and the CPU has the AVX-512 set above.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn dot4_q6_k_tiled(
    n: usize,
    w: *const u8,
    a: *const u8,
    st: usize,
    out: *mut f32,
    os: usize,
) {
    let mut acc = [0.0f32; T];
    // SAFETY (whole body): super-block b < n/256 lies inside the weight row and every
    // activation row; out holds T results at stride os (Dot4Fn contract).
    unsafe {
        for b in 0..n / 256 {
            let x = w.add(210 * b);
            let s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.add(192) as *const __m128i));
            let dx = ld_f16(x.add(208));
            for (t, acc) in acc.iter_mut().enumerate() {
                let y = a.add(t * st + 292 * b);
                let s = q6k_sum(x, y, s16);
                *acc = (s as f32 * dx).mul_add(ld_f32(y), *acc);
            }
        }
        for (t, acc) in acc.into_iter().enumerate() {
            *out.add(t * os) = acc;
        }
    }
}

// ---- Q6_K one-token rows: two rows per 512-bit vector, in the AVX2 kernel's order ----

/// Two Q6_K rows' `avx2::q6k_sumi` at once: row `xa` in the low 256 bits, row `xb` in the
/// high ones. Every step is the AVX2 kernel's, lane for lane (byte and word operations stay
/// within 128-bit lanes; the one cross-lane step, the scale lane broadcast, stays within
/// each row's half), so each half holds exactly that row's 8 lane sums.
///
/// # Safety
/// `xa`, `xb` and `y` must point at whole blocks (210 / 210 / 292 bytes).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q6k_sumi2(xa: *const u8, xb: *const u8, y: *const u8) -> __m512i {
    let m4 = _mm512_set1_epi8(0x0f);
    let m3 = _mm512_set1_epi8(3);
    // SAFETY: whole blocks (caller).
    unsafe {
        let pair = |off: usize| join(ld256(xa.add(off)), ld256(xb.add(off)));
        let s16 = join(
            _mm256_cvtepi8_epi16(_mm_loadu_si128(xa.add(192) as *const __m128i)),
            _mm256_cvtepi8_epi16(_mm_loadu_si128(xb.add(192) as *const __m128i)),
        );
        // Quants are used +32 (0..=63); subtract 32 * Σ scale * bsum afterwards.
        let bsums = _mm512_broadcast_i64x4(ld256(y.add(260)));
        let offset = _mm512_slli_epi32::<5>(_mm512_madd_epi16(bsums, s16));
        let mut sumi = _mm512_setzero_si512();
        for h in 0..2 {
            let ql0 = pair(64 * h);
            let ql1 = pair(64 * h + 32);
            let qh = pair(128 + 32 * h);
            let q = [
                _mm512_or_si512(
                    _mm512_and_si512(ql0, m4),
                    _mm512_slli_epi16::<4>(_mm512_and_si512(qh, m3)),
                ),
                _mm512_or_si512(
                    _mm512_and_si512(ql1, m4),
                    _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srli_epi16::<2>(qh), m3)),
                ),
                _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ql0), m4),
                    _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srli_epi16::<4>(qh), m3)),
                ),
                _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ql1), m4),
                    _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srli_epi16::<6>(qh), m3)),
                ),
            ];
            // avx2::scale_pair per half: the half's 128-bit lane h of its scales in both of
            // its lanes, then the i16 pairs 4k, 4k+1 (low lane) / 4k+2, 4k+3 (high lane).
            let lane = if h == 0 {
                _mm512_shuffle_i64x2::<0xA0>(s16, s16)
            } else {
                _mm512_shuffle_i64x2::<0xF5>(s16, s16)
            };
            for (k, q) in q.into_iter().enumerate() {
                let yv = _mm512_broadcast_i64x4(ld256(y.add(4 + 128 * h + 32 * k)));
                let p = _mm512_maddubs_epi16(q, yv);
                let (b0, b1) = (4 * k as i16, 4 * k as i16 + 2);
                let c = _mm256_set_m128i(
                    _mm_set1_epi16(b1 | ((b1 + 1) << 8)),
                    _mm_set1_epi16(b0 | ((b0 + 1) << 8)),
                );
                let sc = _mm512_shuffle_epi8(lane, _mm512_broadcast_i64x4(c));
                sumi = _mm512_add_epi32(sumi, _mm512_madd_epi16(p, sc));
            }
        }
        _mm512_sub_epi32(sumi, offset)
    }
}

/// Two rows of `avx2::dot_q6_k` (llama.cpp's one-token Q6_K order): row 2k's 8-lane float
/// accumulator in the low half, row 2k+1's in the high half, each updated exactly as there.
///
/// # Safety
/// [`DotFn`] contract for both rows `wa`, `wb`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot2_q6_k(
    n: usize,
    wa: *const u8,
    wb: *const u8,
    a: *const u8,
    pf: *const u8,
) -> (f32, f32) {
    let mut acc = _mm512_setzero_ps();
    // SAFETY (whole body): super-block b < n/256 lies inside both rows and the activations.
    unsafe {
        for b in 0..n / 256 {
            // 420 bytes of the caller's next rows per super-block (a prefetch never
            // faults, so `pf` may point past the matrix).
            prefetch_lines(pf.wrapping_add(420 * b), 420);
            let (xa, xb, y) = (wa.add(210 * b), wb.add(210 * b), a.add(292 * b));
            let sumi = q6k_sumi2(xa, xb, y);
            // [d_a; 8] ++ [d_b; 8], each times y's d: the AVX2 kernel's one rounding.
            let dx = _mm512_castps_si512(join_ps(
                _mm256_cvtph_ps(_mm_set1_epi16((xa.add(208) as *const i16).read_unaligned())),
                _mm256_cvtph_ps(_mm_set1_epi16((xb.add(208) as *const i16).read_unaligned())),
            ));
            let d = _mm512_mul_ps(_mm512_castsi512_ps(dx), _mm512_set1_ps(ld_f32(y)));
            acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi), acc);
        }
    }
    let (lo, hi) = halves_ps(acc);
    (hsum_ps(lo), hsum_ps(hi))
}

/// Two 8-float halves as one 512-bit vector (AVX-512F only: the f32x8 insert needs DQ).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn join_ps(lo: __m256, hi: __m256) -> __m512 {
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(
        _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
        _mm256_castps_pd(hi),
    ))
}

/// The two 8-float halves of a 512-bit vector (the f32x8 extract needs DQ: through f64x4).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn halves_ps(v: __m512) -> (__m256, __m256) {
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    (_mm512_castps512_ps256(v), hi)
}

/// Prefetch (into L1) the lines of `bytes` bytes from `p`: the rows a multi-row kernel's
/// caller takes next, a share per block, since from memory the hardware prefetcher alone
/// keeps too few of several rows' lines in flight. A prefetch never faults, so `p` may
/// point past the matrix.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn prefetch_lines(p: *const u8, bytes: usize) {
    for i in 0..bytes.div_ceil(64) {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * i) as *const i8);
    }
}

/// Four rows of Q6_K one-token dots ([`crate::RowsFn`]), two per 512-bit vector; the same
/// bits as `avx2::dot_q6_k` per row.
///
/// # Safety
/// [`crate::RowsFn`] contract, and the CPU has the AVX-512 set above.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn rows_q6_k(n: usize, w: *const u8, ws: usize, a: *const u8, out: *mut f32) {
    // SAFETY: rows 0..4 at stride ws and out[0..4] exist (RowsFn contract).
    unsafe {
        // The next four rows (contiguous, the caller's next call), half per pair: from
        // memory the hardware prefetcher alone keeps too few lines in flight.
        let next = w.wrapping_add(4 * ws);
        for p in 0..2 {
            let pf = next.wrapping_add(p * 2 * ws);
            let (r0, r1) = dot2_q6_k(n, w.add(2 * p * ws), w.add((2 * p + 1) * ws), a, pf);
            *out.add(2 * p) = r0;
            *out.add(2 * p + 1) = r1;
        }
    }
}
