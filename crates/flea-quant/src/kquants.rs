//! K-quants (256-element super-blocks): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K weights and the Q8_K
//! activation format. Scalar dequantization, Q8_K quantization and reference dots.
//!
//! Byte layouts (little-endian, no padding):
//! * Q2_K (84 B): `scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16`. 16 sub-blocks of 16;
//!   sub-block scale = `d * (scales[i] & 15)`, min = `dmin * (scales[i] >> 4)`; 2-bit quants.
//! * Q3_K (110 B): `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`. 16 sub-blocks
//!   of 16 with 6-bit signed scales (stored +32); quant = 2 low bits - (high bit clear ? 4 : 0).
//! * Q4_K (144 B): `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`. 8 sub-blocks of 32
//!   with 6-bit scales and mins packed in 12 bytes; value = d*sc*q - dmin*m.
//! * Q5_K (176 B): `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`; as
//!   Q4_K with a 5th bit from qh.
//! * Q6_K (210 B): `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`. 16 sub-blocks of
//!   16; quant = 4 low bits from ql | 2 high bits from qh, minus 32.
//! * Q8_K (292 B): `d: f32, qs: [i8; 256], bsums: [i16; 16]` (bsums = sums of each 16 qs,
//!   which lets dots apply weight mins/offsets without touching the quants).

use crate::float::{f16_at, f32_at, i16_at};

pub(crate) const QK_K: usize = 256;

/// ggml's `nearest_int`: round to nearest, ties to even, via the 1.5*2^23 trick.
/// Valid for |x| < 2^22, which holds for every caller (|x| <= 127).
#[inline(always)]
pub(crate) fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// The (scale, min) pair `j` (0..8) of Q4_K/Q5_K's packed 12-byte scales.
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q3_K's 16 signed sub-block scales (already minus 32) from its 12 packed bytes.
#[inline(always)]
pub(crate) fn q3k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let lo = if i < 8 { s[i] & 15 } else { s[i - 8] >> 4 };
        let hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = (lo | (hi << 4)) as i8 - 32;
    }
    out
}

/// Q2_K's 2-bit quants (0..=3) in element order.
#[inline(always)]
fn q2k_quants(qs: &[u8]) -> [u8; QK_K] {
    let mut v = [0u8; QK_K];
    for n in 0..2 {
        for j in 0..4 {
            for l in 0..32 {
                v[n * 128 + j * 32 + l] = (qs[n * 32 + l] >> (2 * j)) & 3;
            }
        }
    }
    v
}

/// Q3_K's signed quants (-4..=3) in element order.
#[inline(always)]
fn q3k_quants(hmask: &[u8], qs: &[u8]) -> [i8; QK_K] {
    let mut v = [0i8; QK_K];
    for n in 0..2 {
        for j in 0..4 {
            let m = 1u8 << (n * 4 + j);
            for l in 0..32 {
                let lo = ((qs[n * 32 + l] >> (2 * j)) & 3) as i8;
                v[n * 128 + j * 32 + l] = lo - if hmask[l] & m != 0 { 0 } else { 4 };
            }
        }
    }
    v
}

/// Q4_K (qh = None) or Q5_K quants (0..=15 / 0..=31) in element order.
#[inline(always)]
fn q45k_quants(qs: &[u8], qh: Option<&[u8]>) -> [u8; QK_K] {
    let mut v = [0u8; QK_K];
    for j in 0..4 {
        for l in 0..32 {
            let q = qs[j * 32 + l];
            let (mut lo, mut hi) = (q & 15, q >> 4);
            if let Some(h) = qh {
                lo |= ((h[l] >> (2 * j)) & 1) << 4;
                hi |= ((h[l] >> (2 * j + 1)) & 1) << 4;
            }
            v[j * 64 + l] = lo;
            v[j * 64 + 32 + l] = hi;
        }
    }
    v
}

/// Q6_K's signed quants (-32..=31) in element order.
#[inline(always)]
fn q6k_quants(ql: &[u8], qh: &[u8]) -> [i8; QK_K] {
    let mut v = [0i8; QK_K];
    for n in 0..2 {
        let (ql, qh) = (&ql[n * 64..], &qh[n * 32..]);
        let y = &mut v[n * 128..];
        for l in 0..32 {
            y[l] = ((ql[l] & 15) | ((qh[l] & 3) << 4)) as i8 - 32;
            y[l + 32] = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            y[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            y[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    v
}

pub(crate) fn dequant_q2_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(84).zip(dst.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
        let q = q2k_quants(&b[16..80]);
        for (i, (yy, qq)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let sc = b[i];
            let dl = d * (sc & 15) as f32;
            let ml = dmin * (sc >> 4) as f32;
            for (o, &v) in yy.iter_mut().zip(qq) {
                *o = dl * v as f32 - ml;
            }
        }
    }
}

pub(crate) fn dequant_q3_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(110).zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 108);
        let sc = q3k_scales(&b[96..108]);
        let q = q3k_quants(&b[0..32], &b[32..96]);
        for (i, (yy, qq)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let dl = d * sc[i] as f32;
            for (o, &v) in yy.iter_mut().zip(qq) {
                *o = dl * v as f32;
            }
        }
    }
}

fn dequant_q45k(b: &[u8], qh: Option<&[u8]>, qs: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let q = q45k_quants(qs, qh);
    for (i, (yy, qq)) in y.chunks_exact_mut(32).zip(q.chunks_exact(32)).enumerate() {
        let (sc, m) = scale_min_k4(i, scales);
        let d1 = d * sc as f32;
        let m1 = dmin * m as f32;
        for (o, &v) in yy.iter_mut().zip(qq) {
            *o = d1 * v as f32 - m1;
        }
    }
}

pub(crate) fn dequant_q4_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(144).zip(dst.chunks_exact_mut(QK_K)) {
        dequant_q45k(b, None, &b[16..144], y);
    }
}

pub(crate) fn dequant_q5_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(176).zip(dst.chunks_exact_mut(QK_K)) {
        dequant_q45k(b, Some(&b[16..48]), &b[48..176], y);
    }
}

pub(crate) fn dequant_q6_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(210).zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_at(b, 208);
        let q = q6k_quants(&b[0..128], &b[128..192]);
        for (i, (yy, qq)) in y.chunks_exact_mut(16).zip(q.chunks_exact(16)).enumerate() {
            let dl = d * (b[192 + i] as i8) as f32;
            for (o, &v) in yy.iter_mut().zip(qq) {
                *o = dl * v as f32;
            }
        }
    }
}

pub(crate) fn dequant_q8_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(292).zip(dst.chunks_exact_mut(QK_K)) {
        let d = f32_at(b, 0);
        for (o, &q) in y.iter_mut().zip(&b[4..260]) {
            *o = (q as i8) as f32 * d;
        }
    }
}

/// ggml's `quantize_row_q8_K_ref`. The scale comes from the element of largest magnitude
/// *with its sign*: iscale = -127/max, so d = 1/iscale is negative when that element is
/// positive and the stored quants are the negated values. q = min(127, nearest_int(iscale*x)).
pub(crate) fn quantize_q8_k(x: &[f32], out: &mut Vec<u8>) {
    out.reserve(x.len() / QK_K * 292);
    for blk in x.chunks_exact(QK_K) {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in blk {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            out.extend_from_slice(&0.0f32.to_le_bytes());
            out.extend(std::iter::repeat_n(0u8, 256 + 32));
            continue;
        }
        let iscale = -127.0f32 / max;
        let mut q = [0i8; QK_K];
        for (qi, &v) in q.iter_mut().zip(blk) {
            *qi = nearest_int(iscale * v).min(127) as i8;
        }
        out.extend_from_slice(&(1.0 / iscale).to_le_bytes());
        out.extend(q.iter().map(|&v| v as u8));
        for c in q.chunks_exact(16) {
            let s: i32 = c.iter().map(|&v| v as i32).sum();
            out.extend_from_slice(&(s as i16).to_le_bytes());
        }
    }
}

#[inline(always)]
fn q8k_parts(y: &[u8]) -> (f32, &[u8], [i16; 16]) {
    let mut bs = [0i16; 16];
    for (i, b) in bs.iter_mut().enumerate() {
        *b = i16_at(y, 260 + 2 * i);
    }
    (f32_at(y, 0), &y[4..260], bs)
}

/// Σ q8 * q over one 16-element group.
#[inline(always)]
fn dot16<T: Copy + Into<i32>>(q: &[T], q8: &[u8]) -> i32 {
    q.iter()
        .zip(q8)
        .map(|(&a, &b)| a.into() * (b as i8 as i32))
        .sum()
}

pub(crate) fn vec_dot_q2_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(84).zip(a.chunks_exact(292)).take(n / QK_K) {
        let (yd, q8, bsums) = q8k_parts(y);
        let q = q2k_quants(&x[16..80]);
        let (mut isum, mut summs) = (0i32, 0i32);
        for i in 0..16 {
            let sc = x[i];
            summs += bsums[i] as i32 * (sc >> 4) as i32;
            isum += (sc & 15) as i32 * dot16(&q[i * 16..i * 16 + 16], &q8[i * 16..]);
        }
        let dall = yd * f16_at(x, 80);
        let dmin = yd * f16_at(x, 82);
        sumf += dall * isum as f32 - dmin * summs as f32;
    }
    sumf
}

pub(crate) fn vec_dot_q3_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(110).zip(a.chunks_exact(292)).take(n / QK_K) {
        let (yd, q8, _) = q8k_parts(y);
        let sc = q3k_scales(&x[96..108]);
        let q = q3k_quants(&x[0..32], &x[32..96]);
        let mut isum = 0i32;
        for i in 0..16 {
            isum += sc[i] as i32 * dot16(&q[i * 16..i * 16 + 16], &q8[i * 16..]);
        }
        sumf += f16_at(x, 108) * yd * isum as f32;
    }
    sumf
}

fn vec_dot_q45k(x: &[u8], qh: Option<&[u8]>, qs: &[u8], y: &[u8]) -> f32 {
    let (yd, q8, bsums) = q8k_parts(y);
    let q = q45k_quants(qs, qh);
    let (mut isum, mut summs) = (0i32, 0i32);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &x[4..16]);
        summs += (bsums[2 * j] as i32 + bsums[2 * j + 1] as i32) * m as i32;
        isum += sc as i32 * dot16(&q[j * 32..j * 32 + 32], &q8[j * 32..]);
    }
    let d = yd * f16_at(x, 0);
    let dmin = yd * f16_at(x, 2);
    d * isum as f32 - dmin * summs as f32
}

/// In the order of llama.cpp's x86 kernel for Q4_K, which it repacks into 8-row groups
/// (REPACK, `ggml_gemv_q4_K_8x8_q8_K`; also what it runs for the last `n % 4` tokens of a
/// batch): per super-block `acc = fma(f32(Σ scale·q·y), dx*dy, acc)` and
/// `accm = fma(f32(Σ min·bsum), dmin*dy, accm)`, then `acc - accm`.
pub(crate) fn vec_dot_q4_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let (mut acc, mut accm) = (0.0f32, 0.0f32);
    for (x, y) in w.chunks_exact(144).zip(a.chunks_exact(292)).take(n / QK_K) {
        let (i, m) = q4k_pairs(x, y);
        let yd = f32_at(y, 0);
        let (i, m): (i32, i32) = (i.iter().sum(), m.iter().sum());
        acc = (i as f32).mul_add(f16_at(x, 0) * yd, acc);
        accm = (m as f32).mul_add(f16_at(x, 2) * yd, accm);
    }
    acc - accm
}

/// As [`vec_dot_q4_k`] in the order of `ggml_gemm_q4_K_8x8_q8_K` (llama.cpp's kernel for
/// each whole group of 4 tokens of a batch): the fused accumulations go per 64 elements.
pub(crate) fn vec_dot_q4_k_gemm(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let (mut acc, mut accm) = (0.0f32, 0.0f32);
    for (x, y) in w.chunks_exact(144).zip(a.chunks_exact(292)).take(n / QK_K) {
        let (i, m) = q4k_pairs(x, y);
        let yd = f32_at(y, 0);
        for (&i, &m) in i.iter().zip(&m) {
            acc = (i as f32).mul_add(f16_at(x, 0) * yd, acc);
            accm = (m as f32).mul_add(f16_at(x, 2) * yd, accm);
        }
    }
    acc - accm
}

/// Per 64 elements of a Q4_K × Q8_K super-block: Σ scale · q · y and Σ min · bsum (exact).
fn q4k_pairs(x: &[u8], y: &[u8]) -> ([i32; 4], [i32; 4]) {
    let (_, q8, bsums) = q8k_parts(y);
    let q = q45k_quants(&x[16..144], None);
    let mut is = [0i32; 4];
    let mut ms = [0i32; 4];
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &x[4..16]);
        ms[j / 2] += (bsums[2 * j] as i32 + bsums[2 * j + 1] as i32) * m as i32;
        is[j / 2] += sc as i32 * dot16(&q[j * 32..j * 32 + 32], &q8[j * 32..]);
    }
    (is, ms)
}

pub(crate) fn vec_dot_q5_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(176).zip(a.chunks_exact(292)).take(n / QK_K) {
        sumf += vec_dot_q45k(x, Some(&x[16..48]), &x[48..176], y);
    }
    sumf
}

/// In the order of ggml's x86 `ggml_vec_dot_q6_K_q8_K` (llama.cpp's kernel for batches of
/// fewer than 8 tokens): per super-block 8 integer lanes — lane m takes the elements e with
/// `e % 32 / 4 == m`, times their scale, with quants 0..=63, minus 32 · (bsums · scales)
/// of groups 2m and 2m+1 — then `acc = fma(dx*dy, lane, acc)`, then the lanes' tree sum.
pub(crate) fn vec_dot_q6_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (x, y) in w.chunks_exact(210).zip(a.chunks_exact(292)).take(n / QK_K) {
        let lanes = q6k_lanes(x, y);
        let d = f32_at(y, 0) * f16_at(x, 208);
        for (l, &v) in acc.iter_mut().zip(&lanes) {
            *l = d.mul_add(v as f32, *l);
        }
    }
    crate::legacy::hsum8(acc)
}

/// The 8 integer lanes of one Q6_K × Q8_K super-block in ggml's AVX2 grouping (see
/// [`vec_dot_q6_k`]); their sum is the exact integer dot Σ scale · (q - 32) · y.
fn q6k_lanes(x: &[u8], y: &[u8]) -> [i32; 8] {
    let (_, q8, bsums) = q8k_parts(y);
    let q = q6k_quants(&x[0..128], &x[128..192]);
    let sc = |i: usize| (x[192 + i] as i8) as i32;
    std::array::from_fn(|m| {
        let mut v = 0i32;
        for c in 0..8 {
            for e in 32 * c + 4 * m..32 * c + 4 * m + 4 {
                v += sc(e / 16) * (q[e] as i32 + 32) * (q8[e] as i8 as i32);
            }
        }
        v - 32 * (bsums[2 * m] as i32 * sc(2 * m) + bsums[2 * m + 1] as i32 * sc(2 * m + 1))
    })
}

/// In the order of llama.cpp's tiled K-quant matmul (ggml-cpu/tiled, what it runs for
/// batches of 8 or more tokens): per super-block the exact integer dot s, then
/// `acc = fma(f32(s) * dx, dy, acc)` (gcc fuses its multiply and add).
pub(crate) fn vec_dot_q6_k_tiled(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = 0.0f32;
    for (x, y) in w.chunks_exact(210).zip(a.chunks_exact(292)).take(n / QK_K) {
        let s: i32 = q6k_lanes(x, y).iter().sum();
        acc = (s as f32 * f16_at(x, 208)).mul_add(f32_at(y, 0), acc);
    }
    acc
}
