//! AVX2 + FMA + F16C kernels for every weight type.
//!
//! All kernels share the [`DotFn`] contract: `w` and `a` point to a full weight row and a
//! full activation row of `n` elements, and the CPU has AVX2, FMA and F16C (checked by
//! `detect()` before any of these is handed out). They compute the same integer block dots
//! as the scalar kernels; only the float accumulation order differs.

use std::arch::x86_64::*;

use crate::{DotFn, GgmlType};

pub(crate) fn kernel(weight: GgmlType) -> Option<DotFn> {
    use GgmlType::*;
    Some(match weight {
        F32 => dot_f32,
        F16 => dot_f16,
        BF16 => dot_bf16,
        Q4_0 => dot_q4_0,
        Q4_1 => dot_q4_1,
        Q5_0 => dot_q5_0,
        Q5_1 => dot_q5_1,
        Q8_0 => dot_q8_0,
        Q2_K => dot_q2_k,
        Q3_K => dot_q3_k,
        Q4_K => dot_q4_k,
        Q5_K => dot_q5_k,
        Q6_K => dot_q6_k,
        _ => return None,
    })
}

// ---- helpers (inlined into the kernels, which enable the same features) ----

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Sum of 8 i32 lanes (exact, wrapping like the SIMD adds).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
    _mm_cvtsi128_si32(s)
}

/// The f16 at `p`, converted and broadcast to 8 f32 lanes.
///
/// A broadcast load has no input register, unlike `_mm_cvtsi32_si128`, which LLVM turns
/// into a `vpinsrw` into some live register: that false dependency on the accumulator
/// made the 32-element kernels 4x slower.
///
/// # Safety
/// `p` must be valid for 2 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn ld_f16x8(p: *const u8) -> __m256 {
    // SAFETY: caller guarantees 2 readable bytes.
    let h = unsafe { (p as *const i16).read_unaligned() };
    _mm256_cvtph_ps(_mm_set1_epi16(h))
}

/// The f16 at `p` as f32.
///
/// # Safety
/// `p` must be valid for 2 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn ld_f16(p: *const u8) -> f32 {
    // SAFETY: caller guarantees 2 readable bytes.
    let h = unsafe { (p as *const i16).read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(h)))
}

/// # Safety
/// `p` must be valid for 4 bytes.
#[inline(always)]
pub(crate) unsafe fn ld_f32(p: *const u8) -> f32 {
    // SAFETY: caller guarantees 4 readable bytes.
    unsafe { (p as *const f32).read_unaligned() }
}

/// # Safety
/// `p` must be valid for 32 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn ld256(p: *const u8) -> __m256i {
    // SAFETY: caller guarantees 32 readable bytes; loadu has no alignment requirement.
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

/// 16 bytes of packed nibbles → 32 bytes: low nibbles first, then high nibbles (the order
/// of ggml's 32-element blocks).
///
/// # Safety
/// `p` must be valid for 16 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn nibbles32(p: *const u8) -> __m256i {
    // SAFETY: caller guarantees 16 readable bytes.
    let t = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let b = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    _mm256_and_si256(b, _mm256_set1_epi8(0x0f))
}

/// Expand the 32 bits of `bits` into 32 bytes: 0xFF where the bit is set, else 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn bits_to_bytes(bits: u32) -> __m256i {
    // Byte i takes byte i/8 of `bits`, then tests bit i%8.
    let shuf = _mm256_set_epi64x(
        0x0303_0303_0303_0303,
        0x0202_0202_0202_0202,
        0x0101_0101_0101_0101,
        0,
    );
    let b = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), shuf);
    let m = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(b, m), m)
}

/// Unsigned bytes × signed bytes, summed in groups of 4 into 8 i32 (no overflow for
/// |u| <= 128, |s| <= 127).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_u8i8(u: __m256i, s: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
}

/// Signed × signed bytes via the sign trick: |x| · (y with x's sign).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_i8i8(x: __m256i, y: __m256i) -> __m256i {
    dot_u8i8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

// ---- float types ----

/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f32(n: usize, w: *const u8, a: *const u8) -> f32 {
    let (w, a) = (w as *const f32, a as *const f32);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (whole body): every index is < n and both rows hold n f32 (DotFn contract).
    unsafe {
        while i + 32 <= n {
            for (k, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(w.add(i + 8 * k));
                let y = _mm256_loadu_ps(a.add(i + 8 * k));
                *acc = _mm256_fmadd_ps(x, y, *acc);
            }
            i += 32;
        }
        let mut s = hsum_ps(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ));
        while i < n {
            s += w.add(i).read_unaligned() * a.add(i).read_unaligned();
            i += 1;
        }
        s
    }
}

/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (whole body): every element index is < n and both rows hold n f16.
    unsafe {
        while i + 32 <= n {
            for (k, acc) in acc.iter_mut().enumerate() {
                let off = 2 * (i + 8 * k);
                let x = _mm256_cvtph_ps(_mm_loadu_si128(w.add(off) as *const __m128i));
                let y = _mm256_cvtph_ps(_mm_loadu_si128(a.add(off) as *const __m128i));
                *acc = _mm256_fmadd_ps(x, y, *acc);
            }
            i += 32;
        }
        let mut s = hsum_ps(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ));
        while i < n {
            s += ld_f16(w.add(2 * i)) * ld_f16(a.add(2 * i));
            i += 1;
        }
        s
    }
}

/// 8 bf16 at `p` → 8 f32 (bf16 is the top half of an f32).
///
/// # Safety
/// `p` must be valid for 16 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ld_bf16x8(p: *const u8) -> __m256 {
    // SAFETY: caller guarantees 16 readable bytes.
    let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
}

/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_bf16(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (whole body): every element index is < n and both rows hold n bf16.
    unsafe {
        while i + 32 <= n {
            for (k, acc) in acc.iter_mut().enumerate() {
                let off = 2 * (i + 8 * k);
                *acc = _mm256_fmadd_ps(ld_bf16x8(w.add(off)), ld_bf16x8(a.add(off)), *acc);
            }
            i += 32;
        }
        let mut s = hsum_ps(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        ));
        while i < n {
            let x = crate::bf16_to_f32((w.add(2 * i) as *const u16).read_unaligned());
            let y = crate::bf16_to_f32((a.add(2 * i) as *const u16).read_unaligned());
            s += x * y;
            i += 1;
        }
        s
    }
}

// ---- legacy 32-element blocks ----

/// Drive a 32-element-block kernel over a row in the order of ggml's x86 kernels (its
/// `ggml_vec_dot_q{4,5,8}_0_q8_0` and llamafile's tinyBLAS for these types): one block
/// per step into one accumulator, `acc = fma(dx*dy, lanes, acc)`, then the tree sum of
/// the 8 lanes. `$blk(x, y)` returns the block's scale product (all lanes) and its 8
/// integer lane sums (lane j: elements 4j..4j+4). In the `min` form it also returns a
/// vector whose lane 1 holds the block's Q8_1 min term m * s (see [`dm_pair`]); those are
/// summed separately.
macro_rules! legacy_dot {
    ($n:expr, $w:expr, $a:expr, $wbytes:expr, $abytes:expr, $blk:expr) => {{
        let (n, w, a) = ($n, $w, $a);
        let mut acc = _mm256_setzero_ps();
        // SAFETY (loop): block b < n/32 lies inside both rows (DotFn contract).
        unsafe {
            for b in 0..n / 32 {
                let (d, p) = $blk(w.add($wbytes * b), a.add($abytes * b));
                acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc);
            }
        }
        hsum_ps(acc)
    }};
    (min $n:expr, $w:expr, $a:expr, $wbytes:expr, $abytes:expr, $blk:expr) => {{
        let (n, w, a) = ($n, $w, $a);
        let nb = n / 32;
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut ms0 = _mm256_setzero_ps();
        let mut ms1 = _mm256_setzero_ps();
        let mut b = 0;
        // SAFETY (loop): blocks b, b+1 < n/32 lie inside both rows (DotFn contract).
        unsafe {
            while b + 2 <= nb {
                let (d0, p0, m0) = $blk(w.add($wbytes * b), a.add($abytes * b));
                let (d1, p1, m1) = $blk(w.add($wbytes * (b + 1)), a.add($abytes * (b + 1)));
                acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(p0), acc0);
                acc1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(p1), acc1);
                ms0 = _mm256_add_ps(ms0, m0);
                ms1 = _mm256_add_ps(ms1, m1);
                b += 2;
            }
            if b < nb {
                let (d0, p0, m0) = $blk(w.add($wbytes * b), a.add($abytes * b));
                acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(p0), acc0);
                ms0 = _mm256_add_ps(ms0, m0);
            }
        }
        let ms = _mm256_castps256_ps128(_mm256_add_ps(ms0, ms1));
        hsum_ps(_mm256_add_ps(acc0, acc1)) + _mm_cvtss_f32(_mm_movehdup_ps(ms))
    }};
}

/// Four rows at once of a `legacy_dot!` kernel (rows `ws` bytes apart, one activation
/// row): each row keeps its own accumulator and block order, so every row's bits equal
/// the one-row kernel's; the four independent chains hide the FMA latency that one
/// accumulator per row would expose.
macro_rules! legacy_rows {
    ($n:expr, $w:expr, $ws:expr, $a:expr, $out:expr, $wbytes:expr, $abytes:expr, $blk:expr) => {{
        let (n, w, ws, a, out) = ($n, $w, $ws, $a, $out);
        let mut acc = [_mm256_setzero_ps(); 4];
        // SAFETY (whole body): block b < n/32 lies inside the activation row and each of the
        // four weight rows; out holds four f32 (RowsFn contract).
        unsafe {
            for b in 0..n / 32 {
                let y = a.add($abytes * b);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let (d, p) = $blk(w.add(r * ws + $wbytes * b), y);
                    *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), *acc);
                }
            }
            for (r, acc) in acc.into_iter().enumerate() {
                *out.add(r) = hsum_ps(acc);
            }
        }
    }};
}

/// Scales of a block `x` against an activation block `y`, both starting with an f16 d.
/// One 4-byte broadcast and conversion each (a 4-byte broadcast load needs no shuffle
/// port, unlike a 2-byte one) gives [dx, u, dx, u, ...] * [dy, v, dy, v, ...]. Returns dx*dy
/// in all lanes, and the product vector: for Q4_1/Q5_1 × Q8_1, u = m and v = s, so its odd
/// lanes hold the min term m*s. For other formats the odd lanes are junk and unused.
///
/// # Safety
/// Both pointers must be valid for 4 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dm_pair(x: *const u8, y: *const u8) -> (__m256, __m256) {
    // SAFETY: caller guarantees 4 readable bytes at each pointer.
    let (hx, hy) = unsafe { (ld_u32(x), ld_u32(y)) };
    let fx = _mm256_cvtph_ps(_mm_set1_epi32(hx as i32));
    let fy = _mm256_cvtph_ps(_mm_set1_epi32(hy as i32));
    let prod = _mm256_mul_ps(fx, fy);
    (_mm256_permute_ps::<0>(prod), prod)
}

/// Drive a kernel that handles two 32-element blocks per 256-bit vector: `$pair(x, y)`
/// covers blocks b and b+1 and returns their scale products `[d_b; 4] ++ [d_b+1; 4]` and
/// 8 i32 partial sums (lanes 0..4 from block b, 4..8 from b+1). Two pairs per step into two
/// accumulators; an odd last block goes through `$blk` (as in `legacy_dot!`).
macro_rules! legacy_dot_pairs {
    ($n:expr, $w:expr, $a:expr, $wbytes:expr, $abytes:expr, $pair:expr, $blk:expr) => {{
        let (n, w, a) = ($n, $w, $a);
        let nb = n / 32;
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut b = 0;
        // SAFETY (loop): every block index used is < n/32, so inside both rows.
        unsafe {
            while b + 4 <= nb {
                let (d0, p0) = $pair(w.add($wbytes * b), a.add($abytes * b));
                let (d1, p1) = $pair(w.add($wbytes * (b + 2)), a.add($abytes * (b + 2)));
                acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(p0), acc0);
                acc1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(p1), acc1);
                b += 4;
            }
            if b + 2 <= nb {
                let (d0, p0) = $pair(w.add($wbytes * b), a.add($abytes * b));
                acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(p0), acc0);
                b += 2;
            }
            if b < nb {
                let (d1, p1) = $blk(w.add($wbytes * b), a.add($abytes * b));
                acc1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(p1), acc1);
            }
        }
        hsum_ps(_mm256_add_ps(acc0, acc1))
    }};
    (min $n:expr, $w:expr, $a:expr, $wbytes:expr, $abytes:expr, $pair:expr, $blk:expr) => {{
        // As above; `$pair` also returns the `d_pair2` product vector (m*s in lanes 1 and
        // 5) and `$blk` the `dm_pair` one (m*s in lane 1, and repeated).
        let (n, w, a) = ($n, $w, $a);
        let nb = n / 32;
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut ms0 = _mm256_setzero_ps();
        let mut ms1 = _mm256_setzero_ps();
        let mut tail = 0.0f32;
        let mut b = 0;
        // SAFETY (loop): every block index used is < n/32, so inside both rows.
        unsafe {
            while b + 4 <= nb {
                let (d0, p0, m0) = $pair(w.add($wbytes * b), a.add($abytes * b));
                let (d1, p1, m1) = $pair(w.add($wbytes * (b + 2)), a.add($abytes * (b + 2)));
                acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(p0), acc0);
                acc1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(p1), acc1);
                ms0 = _mm256_add_ps(ms0, m0);
                ms1 = _mm256_add_ps(ms1, m1);
                b += 4;
            }
            if b + 2 <= nb {
                let (d0, p0, m0) = $pair(w.add($wbytes * b), a.add($abytes * b));
                acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(p0), acc0);
                ms0 = _mm256_add_ps(ms0, m0);
                b += 2;
            }
            if b < nb {
                let (d1, p1, m1) = $blk(w.add($wbytes * b), a.add($abytes * b));
                acc1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(p1), acc1);
                tail = _mm256_cvtss_f32(_mm256_permute_ps::<1>(m1));
            }
        }
        let ms = _mm256_add_ps(ms0, ms1);
        // Lanes 1 and 5: one 128-bit add, then lane 1.
        let ms = _mm_add_ps(_mm256_castps256_ps128(ms), _mm256_extractf128_ps::<1>(ms));
        hsum_ps(_mm256_add_ps(acc0, acc1)) + (_mm_cvtss_f32(_mm_movehdup_ps(ms)) + tail)
    }};
}

/// Scale products of two consecutive blocks: `[dx0*dy0; 4] ++ [dx1*dy1; 4]`, where each
/// block starts with its f16 d and blocks are `wb` / `ab` bytes apart. Also returns the raw
/// product vector: for Q4_1/Q5_1 × Q8_1 its lanes 1 and 5 hold the blocks' m*s terms (see
/// [`dm_pair`]).
///
/// # Safety
/// `x`, `x + wb`, `y`, `y + ab` must each be valid for 4 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn d_pair2(x: *const u8, y: *const u8, wb: usize, ab: usize) -> (__m256, __m256) {
    // SAFETY: caller guarantees the four 4-byte reads.
    let (x0, x1, y0, y1) = unsafe { (ld_u32(x), ld_u32(x.add(wb)), ld_u32(y), ld_u32(y.add(ab))) };
    // [d0, junk] twice, then [d1, junk] twice (16-bit lanes); junk lanes are dropped below.
    let hx = _mm_blend_epi32::<0b1100>(_mm_set1_epi32(x0 as i32), _mm_set1_epi32(x1 as i32));
    let hy = _mm_blend_epi32::<0b1100>(_mm_set1_epi32(y0 as i32), _mm_set1_epi32(y1 as i32));
    let prod = _mm256_mul_ps(_mm256_cvtph_ps(hx), _mm256_cvtph_ps(hy));
    (_mm256_moveldup_ps(prod), prod)
}

/// 16 bytes at `lo` and 16 at `hi` as one vector `[*lo | *hi]`.
///
/// # Safety
/// Both pointers must be valid for 16 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn ld2x128(lo: *const u8, hi: *const u8) -> __m256i {
    // SAFETY: caller guarantees 16 readable bytes at each pointer.
    unsafe { _mm256_loadu2_m128i(hi as *const __m128i, lo as *const __m128i) }
}

/// One block of `dot_q4_0`: the scale product (all lanes) and the 8 integer lane sums.
///
/// # Safety
/// `x` and `y` must point at whole blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn blk_q4_0(x: *const u8, y: *const u8) -> (__m256, __m256i) {
    // SAFETY: called only from dot_q4_0 (same features) on whole blocks.
    unsafe {
        let d = dm_pair(x, y).0;
        let qx = _mm256_sub_epi8(nibbles32(x.add(2)), _mm256_set1_epi8(8));
        (d, dot_i8i8(qx, ld256(y.add(2))))
    }
}

/// Four rows of `dot_q4_0` against one activation row (the same bits per row).
///
/// # Safety
/// [`RowsFn`](crate::RowsFn) contract.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rows_q4_0(n: usize, w: *const u8, ws: usize, a: *const u8, out: *mut f32) {
    legacy_rows!(n, w, ws, a, out, 18, 34, blk_q4_0)
}

/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_0(n: usize, w: *const u8, a: *const u8) -> f32 {
    legacy_dot!(n, w, a, 18, 34, blk_q4_0)
}

/// One Q4_1 block against a Q8_1 block: dx*dy (all lanes), the 8 integer lane sums, and
/// the converted scale pairs `[dx, mx, ..]`, `[dy, sy, ..]` (lane 1 of their fused product
/// is the block's step of ggml's `summs = fma(m, s, summs)` chain).
///
/// # Safety
/// `x` and `y` must point at whole blocks (20 / 36 bytes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn blk_q4_1(x: *const u8, y: *const u8) -> (__m256, __m256i, __m256, __m256) {
    // SAFETY: whole blocks (caller); 4-byte broadcast loads need no shuffle (see dm_pair).
    unsafe {
        let fx = _mm256_cvtph_ps(_mm_set1_epi32(ld_u32(x) as i32));
        let fy = _mm256_cvtph_ps(_mm_set1_epi32(ld_u32(y) as i32));
        let d = _mm256_permute_ps::<0>(_mm256_mul_ps(fx, fy));
        (d, dot_u8i8(nibbles32(x.add(4)), ld256(y.add(4))), fx, fy)
    }
}

/// `n` rows (1 ≤ R ≤ 4) of Q4_1 in ggml's order (see `legacy::vec_dot_q4_1`): per row one
/// 8-lane accumulator and one fused min chain (lane 1 of `ms`).
macro_rules! q4_1_rows {
    ($R:expr, $n:expr, $w:expr, $ws:expr, $a:expr, $out:expr, $blk:expr) => {{
        let (n, w, ws, a, out) = ($n, $w, $ws, $a, $out);
        let mut acc = [_mm256_setzero_ps(); $R];
        let mut ms = [_mm256_setzero_ps(); $R];
        // SAFETY (whole body): block b < n/32 lies inside the activation row and each
        // weight row; out holds R f32 (DotFn / RowsFn contract).
        unsafe {
            for b in 0..n / 32 {
                let y = a.add(36 * b);
                for r in 0..$R {
                    let (d, p, fx, fy) = $blk(w.add(r * ws + 20 * b), y);
                    acc[r] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[r]);
                    ms[r] = _mm256_fmadd_ps(fx, fy, ms[r]);
                }
            }
            for r in 0..$R {
                let summs = _mm_cvtss_f32(_mm_movehdup_ps(_mm256_castps256_ps128(ms[r])));
                *out.add(r) = hsum_ps(acc[r]) + summs;
            }
        }
    }};
}

/// In ggml's order (see `legacy::vec_dot_q4_1`): one block per step into one 8-lane
/// accumulator, the min terms in their own fused chain.
///
/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_1(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut out = 0.0f32;
    q4_1_rows!(1, n, w, 0, a, &mut out as *mut f32, blk_q4_1);
    out
}

/// Four rows of [`dot_q4_1`] (the same bits per row).
///
/// # Safety
/// [`RowsFn`](crate::RowsFn) contract.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rows_q4_1(n: usize, w: *const u8, ws: usize, a: *const u8, out: *mut f32) {
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
        _ => return None,
    })
}

/// One block of `dot_q5_0`: the scale product (all lanes) and the 8 integer lane sums.
///
/// # Safety
/// `x` and `y` must point at whole blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn blk_q5_0(x: *const u8, y: *const u8) -> (__m256, __m256i) {
    // SAFETY: called only from dot_q5_0 (same features) on whole blocks.
    unsafe {
        let d = dm_pair(x, y).0;
        let qh = ld_u32(x.add(2));
        // value - 16 == nibble | 0xF0 (as i8) when the 5th bit is clear, else nibble.
        let hi = _mm256_andnot_si256(bits_to_bytes(qh), _mm256_set1_epi8(0xF0u8 as i8));
        let qx = _mm256_or_si256(nibbles32(x.add(6)), hi);
        (d, dot_i8i8(qx, ld256(y.add(2))))
    }
}

/// Four rows of `dot_q5_0` against one activation row (the same bits per row).
///
/// # Safety
/// [`RowsFn`](crate::RowsFn) contract.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rows_q5_0(n: usize, w: *const u8, ws: usize, a: *const u8, out: *mut f32) {
    legacy_rows!(n, w, ws, a, out, 22, 34, blk_q5_0)
}

/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_0(n: usize, w: *const u8, a: *const u8) -> f32 {
    legacy_dot!(n, w, a, 22, 34, blk_q5_0)
}

/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_1(n: usize, w: *const u8, a: *const u8) -> f32 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn blk(x: *const u8, y: *const u8) -> (__m256, __m256i, __m256) {
        // SAFETY: called only from dot_q5_1 (same features) on whole blocks.
        unsafe {
            let (d, ms) = dm_pair(x, y);
            let qh = ld_u32(x.add(4));
            let hi = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
            let qx = _mm256_or_si256(nibbles32(x.add(8)), hi);
            (d, dot_u8i8(qx, ld256(y.add(4))), ms)
        }
    }
    /// Blocks b and b+1 side by side (see `dot_q4_0` and `dot_q5_0`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pair(x: *const u8, y: *const u8) -> (__m256, __m256i, __m256) {
        // SAFETY: called only from dot_q5_1 on two whole consecutive blocks.
        unsafe {
            let (d, ms) = d_pair2(x, y, 24, 36);
            let m4 = _mm256_set1_epi8(0x0f);
            let b4 = _mm256_set1_epi8(0x10);
            let (h0, h1) = (ld_u32(x.add(4)), ld_u32(x.add(28)));
            let hb_lo = bits_to_bytes((h0 & 0xffff) | (h1 << 16));
            let hb_hi = bits_to_bytes((h0 >> 16) | (h1 & 0xffff_0000));
            let q = ld2x128(x.add(8), x.add(32));
            let lo = _mm256_or_si256(_mm256_and_si256(q, m4), _mm256_and_si256(hb_lo, b4));
            let hi = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(q, 4), m4),
                _mm256_and_si256(hb_hi, b4),
            );
            let pa = _mm256_maddubs_epi16(lo, ld2x128(y.add(4), y.add(40)));
            let pb = _mm256_maddubs_epi16(hi, ld2x128(y.add(20), y.add(56)));
            // |products| <= 31*127*2 per i16, so the sum of two fits.
            let p = _mm256_madd_epi16(_mm256_add_epi16(pa, pb), _mm256_set1_epi16(1));
            (d, p, ms)
        }
    }
    legacy_dot_pairs!(min n, w, a, 24, 36, pair, blk)
}

/// One block of `dot_q8_0`: the scale product (all lanes) and the 8 integer lane sums.
///
/// # Safety
/// `x` and `y` must point at whole blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn blk_q8_0(x: *const u8, y: *const u8) -> (__m256, __m256i) {
    // SAFETY: called only from dot_q8_0 (same features) on whole blocks.
    unsafe {
        let d = dm_pair(x, y).0;
        (d, dot_i8i8(ld256(x.add(2)), ld256(y.add(2))))
    }
}

/// Four rows of `dot_q8_0` against one activation row (the same bits per row).
///
/// # Safety
/// [`RowsFn`](crate::RowsFn) contract.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rows_q8_0(n: usize, w: *const u8, ws: usize, a: *const u8, out: *mut f32) {
    legacy_rows!(n, w, ws, a, out, 34, 34, blk_q8_0)
}

/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q8_0(n: usize, w: *const u8, a: *const u8) -> f32 {
    legacy_dot!(n, w, a, 34, 34, blk_q8_0)
}

// ---- K-quants (activations Q8_K: d f32 @0, qs i8[256] @4, bsums i16[16] @260) ----

/// From 16 i16 scales `s16` (0..=7 in the low 128-bit lane, 8..=15 in the high one), the
/// vector [s[k]; 8] ++ [s[k+1]; 8] for k = 8*h + 2*j: the scales of the two 16-element
/// groups covered by one 32-byte quant vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn scale_pair(s16: __m256i, h: usize, j: usize) -> __m256i {
    let lane = if h == 0 {
        _mm256_permute2x128_si256(s16, s16, 0x00)
    } else {
        _mm256_permute2x128_si256(s16, s16, 0x11)
    };
    let (b0, b1) = (4 * j as i16, 4 * j as i16 + 2);
    let ctrl = _mm256_set_m128i(
        _mm_set1_epi16(b1 | ((b1 + 1) << 8)),
        _mm_set1_epi16(b0 | ((b0 + 1) << 8)),
    );
    _mm256_shuffle_epi8(lane, ctrl)
}

/// i16 number `k` (0..8) of `v8` (8 i16 in both 128-bit lanes), broadcast to all 16 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn bcast_i16(v8: __m256i, k: usize) -> __m256i {
    let b = 2 * k as i16;
    _mm256_shuffle_epi8(v8, _mm256_set1_epi16(b | ((b + 1) << 8)))
}

/// bsums[i] * s[i] for 16 groups, pairwise summed into 8 i32 lanes (`s` given as 16 i16).
/// Kept as a vector: the lanes are summed with everything else at the end.
///
/// # Safety
/// `y` must point to a Q8_K block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn bsums_madd(y: *const u8, s: __m256i) -> __m256i {
    // SAFETY: a Q8_K block has 32 bytes of bsums at offset 260.
    let b = unsafe { ld256(y.add(260)) };
    _mm256_madd_epi16(b, s)
}

/// # Safety
/// `p` must be valid for 4 bytes.
#[inline(always)]
pub(crate) unsafe fn ld_u32(p: *const u8) -> u32 {
    // SAFETY: caller guarantees 4 readable bytes.
    unsafe { (p as *const u32).read_unaligned() }
}

/// Q3_K's 16 six-bit scales, minus 32, as i8 (same unpacking as `kquants::q3k_scales`,
/// done on 32-bit words).
///
/// # Safety
/// `p` must be valid for 12 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q3k_scales_v(p: *const u8) -> __m128i {
    // SAFETY: caller guarantees 12 readable bytes.
    let (a0, a1, t) = unsafe { (ld_u32(p), ld_u32(p.add(4)), ld_u32(p.add(8))) };
    const LO: u32 = 0x0f0f_0f0f;
    const HI: u32 = 0x0303_0303;
    let s0 = (a0 & LO) | ((t & HI) << 4);
    let s1 = (a1 & LO) | (((t >> 2) & HI) << 4);
    let s2 = ((a0 >> 4) & LO) | (((t >> 4) & HI) << 4);
    let s3 = ((a1 >> 4) & LO) | (((t >> 6) & HI) << 4);
    let v = _mm_set_epi32(s3 as i32, s2 as i32, s1 as i32, s0 as i32);
    _mm_sub_epi8(v, _mm_set1_epi8(32))
}

/// Q4_K/Q5_K's packed 12 bytes → 8 scales (bytes 0..8) and 8 mins (bytes 8..16), each
/// 0..=63 (same unpacking as `kquants::scale_min_k4`, done on 32-bit words).
///
/// # Safety
/// `p` must be valid for 12 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn k4_scales_mins_v(p: *const u8) -> __m128i {
    // SAFETY: caller guarantees 12 readable bytes.
    let (u0, u1, u2) = unsafe { (ld_u32(p), ld_u32(p.add(4)), ld_u32(p.add(8))) };
    const M6: u32 = 0x3f3f_3f3f;
    const M4: u32 = 0x0f0f_0f0f;
    const M2: u32 = 0x0303_0303;
    let sc_lo = u0 & M6;
    let sc_hi = (u2 & M4) | (((u0 >> 6) & M2) << 4);
    let mn_lo = u1 & M6;
    let mn_hi = ((u2 >> 4) & M4) | (((u1 >> 6) & M2) << 4);
    _mm_set_epi32(mn_hi as i32, mn_lo as i32, sc_hi as i32, sc_lo as i32)
}

/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q2_k(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut mins = _mm256_setzero_ps();
    let m3 = _mm256_set1_epi8(3);
    let m4 = _mm_set1_epi8(0x0f);
    // SAFETY (whole body): super-block b < n/256 lies inside both rows (DotFn contract).
    unsafe {
        for b in 0..n / 256 {
            let (x, y) = (w.add(84 * b), a.add(292 * b));
            let yd = _mm256_set1_ps(ld_f32(y));
            let sc = _mm_loadu_si128(x as *const __m128i);
            // Mins: high nibbles of the 16 scale bytes, against the bsums.
            let m16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc, 4), m4));
            let dmin = _mm256_mul_ps(yd, ld_f16x8(x.add(82)));
            mins = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(bsums_madd(y, m16)), mins);
            let s16 = _mm256_cvtepu8_epi16(_mm_and_si128(sc, m4));
            let mut sumi = _mm256_setzero_si256();
            for h in 0..2 {
                let qs = ld256(x.add(16 + 32 * h));
                for j in 0..4 {
                    let q =
                        _mm256_and_si256(_mm256_srl_epi16(qs, _mm_cvtsi32_si128(2 * j as i32)), m3);
                    let p = _mm256_maddubs_epi16(q, ld256(y.add(4 + 128 * h + 32 * j)));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scale_pair(s16, h, j)));
                }
            }
            let d = _mm256_mul_ps(yd, ld_f16x8(x.add(80)));
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    hsum_ps(_mm256_sub_ps(acc, mins))
}

/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q3_k(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let m3 = _mm256_set1_epi8(3);
    let one = _mm256_set1_epi8(1);
    // SAFETY (whole body): super-block b < n/256 lies inside both rows (DotFn contract).
    unsafe {
        for b in 0..n / 256 {
            let (x, y) = (w.add(110 * b), a.add(292 * b));
            let s16 = _mm256_cvtepi8_epi16(q3k_scales_v(x.add(96)));
            // Quants are used as u = low2 + 4*hbit in 0..=7; value = u - 4, so subtract
            // 4 * Σ scale * bsum afterwards.
            let offset = _mm256_slli_epi32(bsums_madd(y, s16), 2);
            let mut hm = ld256(x);
            let mut sumi = _mm256_setzero_si256();
            for h in 0..2 {
                let qs = ld256(x.add(32 + 32 * h));
                for j in 0..4 {
                    let lo =
                        _mm256_and_si256(_mm256_srl_epi16(qs, _mm_cvtsi32_si128(2 * j as i32)), m3);
                    let hb = _mm256_and_si256(hm, one);
                    hm = _mm256_srli_epi16(hm, 1);
                    let q = _mm256_or_si256(lo, _mm256_slli_epi16(hb, 2));
                    let p = _mm256_maddubs_epi16(q, ld256(y.add(4 + 128 * h + 32 * j)));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scale_pair(s16, h, j)));
                }
            }
            let sumi = _mm256_sub_epi32(sumi, offset);
            let d = _mm256_mul_ps(ld_f16x8(x.add(108)), _mm256_set1_ps(ld_f32(y)));
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    hsum_ps(acc)
}

/// Shared Q4_K/Q5_K kernel; `HIGH` selects Q5_K (5th bit from qh).
///
/// # Safety
/// [`DotFn`] contract.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q45_k<const HIGH: bool>(n: usize, w: *const u8, a: *const u8) -> f32 {
    let bytes = if HIGH { 176 } else { 144 };
    let qs_off = if HIGH { 48 } else { 16 };
    let mut acc = _mm256_setzero_ps();
    let mut mins = _mm256_setzero_ps();
    let m4 = _mm256_set1_epi8(0x0f);
    let one = _mm256_set1_epi8(1);
    // SAFETY (whole body): super-block b < n/256 lies inside both rows (DotFn contract).
    unsafe {
        for b in 0..n / 256 {
            let (x, y) = (w.add(bytes * b), a.add(292 * b));
            let yd = _mm256_set1_ps(ld_f32(y));
            let sm = k4_scales_mins_v(x.add(4));
            // Each min covers two 16-element bsums: repeat every byte, widen to i16.
            let m16 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm));
            let dmin = _mm256_mul_ps(yd, ld_f16x8(x.add(2)));
            mins = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(bsums_madd(y, m16)), mins);
            let s8 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
            let mut qh = if HIGH {
                ld256(x.add(16))
            } else {
                _mm256_setzero_si256()
            };
            let mut sumi = _mm256_setzero_si256();
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
                let pl = _mm256_maddubs_epi16(lo, ld256(y.add(4 + 64 * j)));
                let ph = _mm256_maddubs_epi16(hi, ld256(y.add(36 + 64 * j)));
                let pl = _mm256_madd_epi16(pl, bcast_i16(s8, 2 * j));
                let ph = _mm256_madd_epi16(ph, bcast_i16(s8, 2 * j + 1));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
            }
            let d = _mm256_mul_ps(yd, ld_f16x8(x));
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    hsum_ps(_mm256_sub_ps(acc, mins))
}

/// Per 64 elements of a Q4_K × Q8_K super-block: Σ scale · q · y (exact), and the 8 lanes
/// Σ min · bsum of each 32 elements (`kquants::q4k_pairs`).
///
/// # Safety
/// `x` and `y` must point at whole blocks (144 / 292 bytes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_pairs(x: *const u8, y: *const u8) -> ([i32; 4], __m256i) {
    let m4 = _mm256_set1_epi8(0x0f);
    // SAFETY: x and y are whole blocks (caller).
    unsafe {
        let sm = k4_scales_mins_v(x.add(4));
        // Each min covers two 16-element bsums: repeat every byte, widen to i16.
        let m16 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm));
        let mins = bsums_madd(y, m16);
        let s8 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
        let mut is = [0i32; 4];
        for (j, i) in is.iter_mut().enumerate() {
            let qs = ld256(x.add(16 + 32 * j));
            let lo = _mm256_and_si256(qs, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(qs, 4), m4);
            let pl = _mm256_maddubs_epi16(lo, ld256(y.add(4 + 64 * j)));
            let ph = _mm256_maddubs_epi16(hi, ld256(y.add(36 + 64 * j)));
            let pl = _mm256_madd_epi16(pl, bcast_i16(s8, 2 * j));
            let ph = _mm256_madd_epi16(ph, bcast_i16(s8, 2 * j + 1));
            *i = hsum_epi32(_mm256_add_epi32(pl, ph));
        }
        (is, mins)
    }
}

/// In the order of llama.cpp's repacked Q4_K gemv (`kquants::vec_dot_q4_k`).
///
/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_k(n: usize, w: *const u8, a: *const u8) -> f32 {
    let (mut acc, mut accm) = (0.0f32, 0.0f32);
    // SAFETY (whole body): super-block b < n/256 lies inside both rows (DotFn contract).
    unsafe {
        for b in 0..n / 256 {
            let (x, y) = (w.add(144 * b), a.add(292 * b));
            let (is, mins) = q4k_pairs(x, y);
            let yd = ld_f32(y);
            let i: i32 = is.iter().sum();
            acc = (i as f32).mul_add(ld_f16(x) * yd, acc);
            accm = (hsum_epi32(mins) as f32).mul_add(ld_f16(x.add(2)) * yd, accm);
        }
    }
    acc - accm
}

/// In the order of llama.cpp's repacked Q4_K gemm (`kquants::vec_dot_q4_k_gemm`).
///
/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q4_k_gemm(n: usize, w: *const u8, a: *const u8) -> f32 {
    let (mut acc, mut accm) = (0.0f32, 0.0f32);
    // SAFETY (whole body): super-block b < n/256 lies inside both rows (DotFn contract).
    unsafe {
        for b in 0..n / 256 {
            let (x, y) = (w.add(144 * b), a.add(292 * b));
            let (is, mins) = q4k_pairs(x, y);
            let mut ml = [0i32; 8];
            _mm256_storeu_si256(ml.as_mut_ptr() as *mut __m256i, mins);
            let yd = ld_f32(y);
            let (d, dmin) = (ld_f16(x) * yd, ld_f16(x.add(2)) * yd);
            for (j, &i) in is.iter().enumerate() {
                acc = (i as f32).mul_add(d, acc);
                accm = ((ml[2 * j] + ml[2 * j + 1]) as f32).mul_add(dmin, accm);
            }
        }
    }
    acc - accm
}

/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_k(n: usize, w: *const u8, a: *const u8) -> f32 {
    // SAFETY: same contract, same features.
    unsafe { dot_q45_k::<true>(n, w, a) }
}

/// One Q6_K × Q8_K super-block's 8 integer lanes, in ggml's AVX2 grouping
/// (`kquants::vec_dot_q6_k`).
///
/// # Safety
/// `x` and `y` must point at whole blocks (210 / 292 bytes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_sumi(x: *const u8, y: *const u8) -> __m256i {
    let m4 = _mm256_set1_epi8(0x0f);
    let m3 = _mm256_set1_epi8(3);
    // SAFETY: x and y are whole blocks (caller).
    unsafe {
        let s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.add(192) as *const __m128i));
        // Quants are used +32 (0..=63); subtract 32 * Σ scale * bsum afterwards.
        let offset = _mm256_slli_epi32(bsums_madd(y, s16), 5);
        let mut sumi = _mm256_setzero_si256();
        for h in 0..2 {
            let ql0 = ld256(x.add(64 * h));
            let ql1 = ld256(x.add(64 * h + 32));
            let qh = ld256(x.add(128 + 32 * h));
            let q = [
                _mm256_or_si256(
                    _mm256_and_si256(ql0, m4),
                    _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(ql1, m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m3), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m3), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                    _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m3), 4),
                ),
            ];
            for (k, q) in q.into_iter().enumerate() {
                let p = _mm256_maddubs_epi16(q, ld256(y.add(4 + 128 * h + 32 * k)));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scale_pair(s16, h, k)));
            }
        }
        _mm256_sub_epi32(sumi, offset)
    }
}

/// In the order of ggml's x86 `ggml_vec_dot_q6_K_q8_K` (`kquants::vec_dot_q6_k`).
///
/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q6_k(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    // SAFETY (whole body): super-block b < n/256 lies inside both rows (DotFn contract).
    unsafe {
        for b in 0..n / 256 {
            let (x, y) = (w.add(210 * b), a.add(292 * b));
            let sumi = q6k_sumi(x, y);
            let d = _mm256_mul_ps(ld_f16x8(x.add(208)), _mm256_set1_ps(ld_f32(y)));
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    hsum_ps(acc)
}

/// In the order of llama.cpp's tiled K-quant matmul (`kquants::vec_dot_q6_k_tiled`).
///
/// # Safety
/// [`DotFn`] contract.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_q6_k_tiled(n: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = 0.0f32;
    // SAFETY (whole body): super-block b < n/256 lies inside both rows (DotFn contract).
    unsafe {
        for b in 0..n / 256 {
            let (x, y) = (w.add(210 * b), a.add(292 * b));
            let s = hsum_epi32(q6k_sumi(x, y));
            acc = (s as f32 * ld_f16(x.add(208))).mul_add(ld_f32(y), acc);
        }
    }
    acc
}
