//! The "legacy" 32-element block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q8_1: scalar
//! dequantization, activation quantization and reference dot products.
//!
//! Byte layouts (little-endian, no padding), 32 elements per block:
//! * Q4_0 (18 B): `d: f16, qs: [u8; 16]`; element j is `(qs[j] & 15) - 8`, element j+16 is
//!   `(qs[j] >> 4) - 8`, times d.
//! * Q4_1 (20 B): `d: f16, m: f16, qs: [u8; 16]`; nibbles as Q4_0 without the -8, `q*d + m`.
//! * Q5_0 (22 B): `d: f16, qh: u32, qs: [u8; 16]`; bit j of qh is the 5th bit of element j,
//!   minus 16, times d.
//! * Q5_1 (24 B): `d: f16, m: f16, qh: u32, qs: [u8; 16]`; as Q5_0 without the -16, plus m.
//! * Q8_0 (34 B): `d: f16, qs: [i8; 32]`.
//! * Q8_1 (36 B): `d: f16, s: f16, qs: [i8; 32]`; s = d * sum(qs), used by Q4_1/Q5_1 dots
//!   to apply the weight's min without touching the quants.

use crate::float::f16_at;
use crate::float::f32_to_f16;

pub(crate) const QK: usize = 32;

#[inline(always)]
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

pub(crate) fn dequant_q4_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for j in 0..16 {
            let q = b[2 + j];
            y[j] = ((q & 15) as i32 - 8) as f32 * d;
            y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

pub(crate) fn dequant_q4_1(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(20).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        for j in 0..16 {
            let q = b[4 + j];
            y[j] = (q & 15) as f32 * d + m;
            y[j + 16] = (q >> 4) as f32 * d + m;
        }
    }
}

/// The 5-bit values (0..=31) of a Q5_0/Q5_1 block.
#[inline(always)]
fn q5_values(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut v = [0u8; 32];
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        v[j] = (qs[j] & 15) | h0;
        v[j + 16] = (qs[j] >> 4) | h1;
    }
    v
}

pub(crate) fn dequant_q5_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(22).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        let v = q5_values(u32_at(b, 2), &b[6..22]);
        for j in 0..32 {
            y[j] = (v[j] as i32 - 16) as f32 * d;
        }
    }
}

pub(crate) fn dequant_q5_1(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(24).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let v = q5_values(u32_at(b, 4), &b[8..24]);
        for j in 0..32 {
            y[j] = v[j] as f32 * d + m;
        }
    }
}

pub(crate) fn dequant_q8_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for j in 0..32 {
            y[j] = (b[2 + j] as i8) as f32 * d;
        }
    }
}

pub(crate) fn dequant_q8_1(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(36).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for j in 0..32 {
            y[j] = (b[4 + j] as i8) as f32 * d;
        }
    }
}

/// ggml's x86 `quantize_row_q8_0` (what llama.cpp's CPU backend runs, not the `_ref` one):
/// d = amax/127 (stored as f16), q = round-half-even(x * (127/amax)). The reference code's
/// `1/d` and round-half-away differ from it by one step on some elements, which is enough
/// to move a logit. The quants use the f32 scale, not the f16-rounded d, like ggml.
pub(crate) fn quantize_q8_0(x: &[f32], out: &mut Vec<u8>) {
    out.reserve(x.len() / QK * 34);
    for blk in x.chunks_exact(QK) {
        let amax = blk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
        for &v in blk {
            out.push((v * id).round_ties_even() as i8 as u8);
        }
    }
}

/// ggml's x86 `quantize_row_q8_1`: as [`quantize_q8_0`], plus s = d * sum(q) stored as f16.
pub(crate) fn quantize_q8_1(x: &[f32], out: &mut Vec<u8>) {
    out.reserve(x.len() / QK * 36);
    for blk in x.chunks_exact(QK) {
        let amax = blk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut q = [0i8; QK];
        let mut sum = 0i32;
        for (qi, &v) in q.iter_mut().zip(blk) {
            *qi = (v * id).round_ties_even() as i8;
            sum += *qi as i32;
        }
        out.extend_from_slice(&f32_to_f16(d).to_le_bytes());
        out.extend_from_slice(&f32_to_f16(sum as f32 * d).to_le_bytes());
        out.extend(q.iter().map(|&v| v as u8));
    }
}

// Scalar dots: integer dot per block, then scaled, accumulated in f32 like ggml's generic code.

/// In the order of ggml's x86 kernels (see [`dot_lanes`]).
pub(crate) fn vec_dot_q4_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    dot_lanes(
        w.chunks_exact(18)
            .zip(a.chunks_exact(34))
            .take(n / QK)
            .map(|(x, y)| {
                let p = std::array::from_fn(|e| {
                    let q = if e < 16 {
                        x[2 + e] & 15
                    } else {
                        x[2 + e - 16] >> 4
                    };
                    (q as i32 - 8) * (y[2 + e] as i8 as i32)
                });
                (f16_at(x, 0) * f16_at(y, 0), p)
            }),
    )
}

/// ggml's x86 order for the 32-element formats without a min (its AVX2
/// `ggml_vec_dot_q{4,5,8}_0_q8_0` and llamafile's tinyBLAS, which agree): 8 lanes, lane j
/// the integer dot of elements 4j..4j+4; per block `acc = fma(dx*dy, lane, acc)`; then the
/// lanes' tree sum. `blocks` yields each block's dx*dy and its 32 element products.
fn dot_lanes(blocks: impl Iterator<Item = (f32, [i32; 32])>) -> f32 {
    let mut acc = [0.0f32; 8];
    for (d, p) in blocks {
        for (j, l) in acc.iter_mut().enumerate() {
            let s: i32 = p[4 * j..4 * j + 4].iter().sum();
            *l = d.mul_add(s as f32, *l);
        }
    }
    hsum8(acc)
}

/// In the order of ggml's x86 `ggml_vec_dot_q4_1_q8_1` (what llama.cpp's CPU backend runs
/// for every batch size), so that the bits match: 8 lanes, lane j < 4 holding the integer
/// dot of elements 4j..4j+4 and lane j >= 4 of elements 16+4(j-4)..; per block each lane
/// does `acc = fma(dx*dy, lane, acc)`; the min terms run in their own fused chain
/// `summs = fma(m, s, summs)`; the result is the lanes' tree sum plus `summs`.
pub(crate) fn vec_dot_q4_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut summs = 0.0f32;
    for (x, y) in w.chunks_exact(20).zip(a.chunks_exact(36)).take(n / QK) {
        summs = f16_at(x, 2).mul_add(f16_at(y, 2), summs);
        let d = f16_at(x, 0) * f16_at(y, 0);
        for (j, l) in acc.iter_mut().enumerate() {
            let mut sumi = 0i32;
            for e in 4 * j..4 * j + 4 {
                // Element e of the block: e < 16 is a low nibble, else a high one.
                let q = if e < 16 {
                    x[4 + e] & 15
                } else {
                    x[4 + e - 16] >> 4
                };
                sumi += q as i32 * (y[4 + e] as i8 as i32);
            }
            *l = d.mul_add(sumi as f32, *l);
        }
    }
    hsum8(acc) + summs
}

/// ggml's `hsum_float_8`: upper half plus lower half, then the same fold twice.
#[inline(always)]
pub(crate) fn hsum8(a: [f32; 8]) -> f32 {
    let r = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (r[0] + r[2]) + (r[1] + r[3])
}

pub(crate) fn vec_dot_q5_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    dot_lanes(
        w.chunks_exact(22)
            .zip(a.chunks_exact(34))
            .take(n / QK)
            .map(|(x, y)| {
                let v = q5_values(u32_at(x, 2), &x[6..22]);
                let p = std::array::from_fn(|e| (v[e] as i32 - 16) * (y[2 + e] as i8 as i32));
                (f16_at(x, 0) * f16_at(y, 0), p)
            }),
    )
}

pub(crate) fn vec_dot_q5_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(24).zip(a.chunks_exact(36)).take(n / QK) {
        let v = q5_values(u32_at(x, 4), &x[8..24]);
        let mut sumi = 0i32;
        for j in 0..32 {
            sumi += v[j] as i32 * (y[4 + j] as i8 as i32);
        }
        sumf += sumi as f32 * (f16_at(x, 0) * f16_at(y, 0)) + f16_at(x, 2) * f16_at(y, 2);
    }
    sumf
}

pub(crate) fn vec_dot_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    dot_lanes(
        w.chunks_exact(34)
            .zip(a.chunks_exact(34))
            .take(n / QK)
            .map(|(x, y)| {
                let p = std::array::from_fn(|e| (x[2 + e] as i8 as i32) * (y[2 + e] as i8 as i32));
                (f16_at(x, 0) * f16_at(y, 0), p)
            }),
    )
}
