//! Unquantized element types: F32, F16 (IEEE half) and BF16 (bfloat16), plus the
//! little-endian field readers the block formats share.

/// Read a little-endian IEEE half at `b[off..off + 2]` as f32.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[off], b[off + 1]]))
}

/// Read a little-endian f32 at `b[off..off + 4]`.
#[inline(always)]
pub(crate) fn f32_at(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Read a little-endian i16 at `b[off..off + 2]`.
#[inline(always)]
pub(crate) fn i16_at(b: &[u8], off: usize) -> i16 {
    i16::from_le_bytes([b[off], b[off + 1]])
}

/// Exact IEEE half → f32 conversion.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

/// f32 → IEEE half, round to nearest even (what ggml's FP32_TO_FP16 and F16C do).
#[inline(always)]
pub fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// bfloat16 → f32: bf16 is the top half of an f32, so this is exact.
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f32 → bfloat16, round to nearest even; NaN stays a (quiet) NaN. Same rule as ggml.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

pub(crate) fn dequant_f32(src: &[u8], dst: &mut [f32]) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

pub(crate) fn dequant_f16(src: &[u8], dst: &mut [f32]) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
    }
}

pub(crate) fn dequant_bf16(src: &[u8], dst: &mut [f32]) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
    }
}

pub(crate) fn quantize_f32(x: &[f32], out: &mut Vec<u8>) {
    out.reserve(x.len() * 4);
    for v in x {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

pub(crate) fn quantize_f16(x: &[f32], out: &mut Vec<u8>) {
    out.reserve(x.len() * 2);
    for v in x {
        out.extend_from_slice(&f32_to_f16(*v).to_le_bytes());
    }
}

pub(crate) fn quantize_bf16(x: &[f32], out: &mut Vec<u8>) {
    out.reserve(x.len() * 2);
    for v in x {
        out.extend_from_slice(&f32_to_bf16(*v).to_le_bytes());
    }
}

// Scalar dots accumulate in f64 like ggml's generic (non-SIMD) code (`ggml_float`).

pub(crate) fn vec_dot_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut s = 0.0f64;
    for i in 0..n {
        s += (f32_at(w, 4 * i) * f32_at(a, 4 * i)) as f64;
    }
    s as f32
}

pub(crate) fn vec_dot_f16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut s = 0.0f64;
    for i in 0..n {
        s += (f16_at(w, 2 * i) * f16_at(a, 2 * i)) as f64;
    }
    s as f32
}

pub(crate) fn vec_dot_bf16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut s = 0.0f64;
    for i in 0..n {
        let x = bf16_to_f32(u16::from_le_bytes([w[2 * i], w[2 * i + 1]]));
        let y = bf16_to_f32(u16::from_le_bytes([a[2 * i], a[2 * i + 1]]));
        s += (x * y) as f64;
    }
    s as f32
}
