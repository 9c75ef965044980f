//! Random tensor data: a fast seeded PRNG and per-type block generators.
//!
//! Quantized blocks are random bytes (valid for every type: any bit pattern of the quant
//! fields decodes) whose scale fields are then overwritten so that the decoded weights have
//! zero mean and a chosen standard deviation `sigma`. Zero mean matters: a systematic
//! per-row bias would feed a growing common component into the residual stream and make
//! logits degenerate after a few dozen layers. Means are cancelled either by a random sign
//! per block / sub-block (types without a min field) or by a min equal to the quant
//! midpoint (types with one).

use flea_gguf::GgmlType;
use flea_quant::{f16_to_f32, f32_to_bf16, f32_to_f16};

/// wyrand: one multiply per 64 random bits, statistically fine for synthetic weights.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(splitmix(seed))
    }

    #[inline(always)]
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0).wrapping_mul(u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db));
        ((t >> 64) ^ t) as u64
    }

    /// Uniform in [0, 1).
    #[inline]
    pub(crate) fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rem = chunks.into_remainder();
        if !rem.is_empty() {
            let v = self.next_u64().to_le_bytes();
            rem.copy_from_slice(&v[..rem.len()]);
        }
    }
}

pub(crate) fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of one chunk of one tensor: independent of how chunks are spread over
/// threads, so output bytes depend only on the seed.
pub(crate) fn stream_seed(seed: u64, tensor: usize, chunk: usize) -> u64 {
    splitmix(seed ^ splitmix((tensor as u64) << 32 ^ chunk as u64 ^ 0x5eed))
}

/// Standard deviation of a quant uniform over `levels` values.
fn level_std(levels: f32) -> f32 {
    ((levels * levels - 1.0) / 12.0).sqrt()
}

/// RMS of a sub-block scale uniform over `lo..lo+n`.
fn scale_rms(lo: u32, n: u32) -> f32 {
    let s: f64 = (lo..lo + n).map(|k| f64::from(k * k)).sum();
    (s / f64::from(n)).sqrt() as f32
}

fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

/// 256 (d, m) f16 pairs for the 32-element types: |d| jittered ±25% around `d0`, random
/// sign; m = `mid` * -d (computed from the rounded d so the mean stays zero).
fn legacy_table(d0: f32, mid: f32) -> [(u16, u16); 256] {
    let mut t = [(0u16, 0u16); 256];
    for (i, e) in t.iter_mut().enumerate() {
        let jitter = 0.75 + 0.5 * ((i & 127) as f32 / 127.0);
        let sign = if i & 128 != 0 { -1.0 } else { 1.0 };
        let d = f32_to_f16(sign * d0 * jitter);
        let m = f32_to_f16(-mid * f16_to_f32(d));
        *e = (d, m);
    }
    t
}

/// Fill `buf` (whole blocks of `ty`) with random data of element std `sigma`.
pub(crate) fn fill_matrix(ty: GgmlType, sigma: f32, rng: &mut Rng, buf: &mut [u8]) {
    use GgmlType::*;
    match ty {
        F32 | F16 | BF16 => fill_float(ty, sigma, rng, buf),
        Q4_0 | Q5_0 | Q8_0 | Q4_1 | Q5_1 => {
            rng.fill(buf);
            let (levels, has_min) = match ty {
                Q4_0 => (16.0, false),
                Q5_0 => (32.0, false),
                Q8_0 => (256.0, false),
                Q4_1 => (16.0, true),
                _ => (32.0, true),
            };
            // Jitter of ±25% raises the RMS by ~1%: ignore.
            let d0 = sigma / level_std(levels);
            // Types without a min centre at 0 already (q - levels/2) up to -d/2, which the
            // random sign of d cancels; with a min, m = -d * (levels - 1) / 2.
            let table = legacy_table(d0, if has_min { (levels - 1.0) / 2.0 } else { 0.0 });
            for b in buf.chunks_exact_mut(ty.type_size()) {
                let (d, m) = table[b[0] as usize];
                put_u16(b, 0, d);
                if has_min {
                    put_u16(b, 2, m);
                }
            }
        }
        Q2_K => {
            // value = d*sc*q - dmin*m with sc = m in 8..16 and dmin = 1.5 d: centred q.
            let d = f32_to_f16(sigma / (scale_rms(8, 8) * level_std(4.0)));
            let dmin = f32_to_f16(1.5 * f16_to_f32(d));
            let table = header_table(rng, |r| {
                let mut h = [0u8; 20];
                for (i, x) in h[..16].iter_mut().enumerate() {
                    let sc = 8 + ((r >> (3 * i)) & 7) as u8;
                    *x = sc | (sc << 4);
                }
                let sign = if r >> 63 != 0 { 0x8000 } else { 0 };
                h[16..18].copy_from_slice(&(d ^ sign).to_le_bytes());
                h[18..20].copy_from_slice(&(dmin ^ sign).to_le_bytes());
                h
            });
            rng.fill(buf);
            for b in buf.chunks_exact_mut(84) {
                let h = &table[pick(b)];
                b[..16].copy_from_slice(&h[..16]);
                b[80..84].copy_from_slice(&h[16..]);
            }
        }
        Q3_K => {
            // 16 signed 6-bit scales ±(16..32): random signs centre the (-4..3) quants.
            let d = f32_to_f16(sigma / (scale_rms(16, 16) * level_std(8.0)));
            let table = header_table(rng, |r| {
                let mut h = [0u8; 14];
                for i in 0..16 {
                    let mag = 16 + ((r >> (4 * i)) & 15) as i32;
                    let s = if (splitmix(r) >> i) & 1 != 0 {
                        -mag
                    } else {
                        mag
                    };
                    let v = (s + 32) as u8;
                    let (lo, hi) = (v & 15, v >> 4);
                    if i < 8 {
                        h[i] |= lo;
                    } else {
                        h[i - 8] |= lo << 4;
                    }
                    h[8 + i % 4] |= hi << (2 * (i / 4));
                }
                h[12..14].copy_from_slice(&d.to_le_bytes());
                h
            });
            rng.fill(buf);
            for b in buf.chunks_exact_mut(110) {
                let h = &table[pick(&b[96..])];
                b[96..110].copy_from_slice(h);
            }
        }
        Q4_K | Q5_K => {
            // 8 sub-blocks, sc = m in 32..64, dmin = d * (levels-1)/2: centred q.
            let levels = if ty == Q4_K { 16.0 } else { 32.0 };
            let d = f32_to_f16(sigma / (scale_rms(32, 32) * level_std(levels)));
            let dmin = f32_to_f16((levels - 1.0) / 2.0 * f16_to_f32(d));
            let table = header_table(rng, |r| {
                let mut h = [0u8; 16];
                let mut s = [0u8; 8];
                for (j, x) in s.iter_mut().enumerate() {
                    *x = 32 + ((r >> (5 * j)) & 31) as u8;
                }
                // Inverse of ggml's get_scale_min_k4 with scale == min.
                for j in 0..4 {
                    let hi = (s[j + 4] >> 4) << 6;
                    h[4 + j] = (s[j] & 63) | hi;
                    h[8 + j] = (s[j] & 63) | hi;
                    h[12 + j] = (s[j + 4] & 15) | ((s[j + 4] & 15) << 4);
                }
                let sign = if r >> 63 != 0 { 0x8000 } else { 0 };
                h[0..2].copy_from_slice(&(d ^ sign).to_le_bytes());
                h[2..4].copy_from_slice(&(dmin ^ sign).to_le_bytes());
                h
            });
            rng.fill(buf);
            for b in buf.chunks_exact_mut(ty.type_size()) {
                let h = &table[pick(b)];
                b[..16].copy_from_slice(h);
            }
        }
        Q6_K => {
            // 16 signed 8-bit scales ±(16..32): random signs centre the (-32..31) quants.
            let d = f32_to_f16(sigma / (scale_rms(16, 16) * level_std(64.0)));
            let table = header_table(rng, |r| {
                let mut h = [0u8; 18];
                for (i, x) in h[..16].iter_mut().enumerate() {
                    let mag = 16 + ((r >> (4 * i)) & 15) as i8;
                    let s = if (splitmix(r) >> i) & 1 != 0 {
                        -mag
                    } else {
                        mag
                    };
                    *x = s as u8;
                }
                h[16..18].copy_from_slice(&d.to_le_bytes());
                h
            });
            rng.fill(buf);
            for b in buf.chunks_exact_mut(210) {
                let h = &table[pick(&b[192..])];
                b[192..210].copy_from_slice(h);
            }
        }
        // The mixes never pick other types.
        other => unreachable!("no generator for {other}"),
    }
}

/// Header variants per chunk (a power of two): drawing a block's scale fields from a
/// ready-made table costs a copy instead of bit packing, which keeps generation well ahead
/// of the disk. 1024 distinct scale patterns per MiB is plenty of variety.
const HEADERS: usize = 1024;

/// `HEADERS` block headers made by `make` from random bits.
fn header_table<const N: usize>(rng: &mut Rng, make: impl Fn(u64) -> [u8; N]) -> Vec<[u8; N]> {
    (0..HEADERS).map(|_| make(rng.next_u64())).collect()
}

/// A table index from the (random, about to be overwritten) first two bytes of `b`.
#[inline(always)]
fn pick(b: &[u8]) -> usize {
    usize::from(u16::from_le_bytes([b[0], b[1]])) & (HEADERS - 1)
}

/// F32/F16/BF16: uniform in ±sqrt(3)·sigma, through a 4096-entry table of ready-made
/// element encodings so that each element costs a table lookup.
fn fill_float(ty: GgmlType, sigma: f32, rng: &mut Rng, buf: &mut [u8]) {
    let a = 3f32.sqrt() * sigma;
    let val = |k: usize| ((k as f32 + 0.5) / 2048.0 - 1.0) * a;
    if ty == GgmlType::F32 {
        let table: Vec<[u8; 4]> = (0..4096).map(|k| val(k).to_le_bytes()).collect();
        let mut chunks = buf.chunks_exact_mut(16);
        for c in &mut chunks {
            let r = rng.next_u64();
            for (i, e) in c.chunks_exact_mut(4).enumerate() {
                e.copy_from_slice(&table[((r >> (16 * i)) & 4095) as usize]);
            }
        }
        for e in chunks.into_remainder().chunks_exact_mut(4) {
            e.copy_from_slice(&table[(rng.next_u64() & 4095) as usize]);
        }
    } else {
        let conv: fn(f32) -> u16 = if ty == GgmlType::F16 {
            f32_to_f16
        } else {
            f32_to_bf16
        };
        let table: Vec<u16> = (0..4096).map(|k| conv(val(k))).collect();
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            let r = rng.next_u64();
            let mut out = [0u8; 8];
            for i in 0..4 {
                let v = table[((r >> (16 * i)) & 4095) as usize];
                out[2 * i..2 * i + 2].copy_from_slice(&v.to_le_bytes());
            }
            c.copy_from_slice(&out);
        }
        for e in chunks.into_remainder().chunks_exact_mut(2) {
            e.copy_from_slice(&table[(rng.next_u64() & 4095) as usize].to_le_bytes());
        }
    }
}

/// An F32 vector `center + uniform(±spread)`: norm weights (center 1) and biases (0).
pub(crate) fn fill_vector(center: f32, spread: f32, rng: &mut Rng, buf: &mut [u8]) {
    for e in buf.chunks_exact_mut(4) {
        let v = center + spread * (2.0 * rng.unit() - 1.0);
        e.copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every generator decodes to finite values with mean ~0 and std ~sigma.
    #[test]
    fn decoded_statistics() {
        use GgmlType::*;
        let sigma = 1.0 / 64.0;
        for ty in [
            F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
        ] {
            let n = 256 * 512;
            let mut buf = vec![0u8; n / ty.block_size() * ty.type_size()];
            fill_matrix(ty, sigma, &mut Rng::new(7), &mut buf);
            let mut x = vec![0f32; n];
            flea_quant::dequantize(ty, &buf, &mut x).unwrap();
            assert!(x.iter().all(|v| v.is_finite()), "{ty}");
            let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
            let var = x
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n as f64;
            let std = var.sqrt() as f32;
            assert!(
                (std / sigma - 1.0).abs() < 0.1,
                "{ty}: std {std} vs {sigma}"
            );
            assert!(mean.abs() < 0.02 * f64::from(sigma), "{ty}: mean {mean}");
        }
    }
}
