//! Single-thread matvec throughput (weight bytes streamed per second) on a 4096x4096 matrix.
//! Ignored by default; run with
//! `cargo test -p flea-quant --release --test bench -- --ignored --nocapture`.

use flea_quant::*;
use std::time::Instant;

#[test]
#[ignore]
fn matvec_throughput() {
    let (rows, cols) = (4096usize, 4096usize);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let x: Vec<f32> = (0..cols)
        .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    let isas: Vec<Isa> = [Isa::Scalar, Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|&i| isa_available(i))
        .collect();
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::F16,
    ] {
        let wb = row_bytes(ty, cols);
        let mut w: Vec<u8> = (0..wb * rows).map(|_| next() as u8).collect();
        // Keep f16 scale fields finite: small positive halves at every block's d/dmin.
        let fields: &[usize] = match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            GgmlType::Q6_K => &[208],
            GgmlType::Q2_K => &[80, 82],
            GgmlType::Q3_K => &[108],
            _ => &[],
        };
        if ty == GgmlType::F16 {
            for c in w.chunks_exact_mut(2) {
                c.copy_from_slice(&f32_to_f16((c[0] as f32 - 128.0) / 128.0).to_le_bytes());
            }
        }
        for blk in w.chunks_exact_mut(ty.type_size()) {
            for &o in fields {
                blk[o..o + 2].copy_from_slice(&f32_to_f16(0.01).to_le_bytes());
            }
        }
        let mut act = Vec::new();
        quantize_activations(vec_dot_type(ty).unwrap(), &x, &mut act).unwrap();
        let mut out = vec![0f32; rows];
        let mut line = format!("{:>5} ({:5.1} MB):", ty.name(), w.len() as f64 / 1e6);
        for &isa in &isas {
            let mut best = f64::MAX;
            for _ in 0..if isa == Isa::Scalar { 2 } else { 25 } {
                let t = Instant::now();
                matvec_isa(isa, ty, cols, &w, &act, &mut out);
                best = best.min(t.elapsed().as_secs_f64());
            }
            line += &format!(
                "  {isa:?} {:6.2} GB/s ({:.2} ms)",
                w.len() as f64 / best / 1e9,
                best * 1e3
            );
        }
        println!("{line}");
    }
}

#[test]
#[ignore]
fn quantize_throughput() {
    let n = 4096 * 4;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let mut out = Vec::with_capacity(n * 2);
    for fmt in [
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q8_K,
        GgmlType::F16,
    ] {
        let mut best = f64::MAX;
        for _ in 0..50 {
            let t = Instant::now();
            quantize_activations(fmt, &x, &mut out).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "quantize {:>5}: {:6.2} ns/element",
            fmt.name(),
            best * 1e9 / n as f64
        );
    }
}

#[test]
#[ignore]
fn matmul_throughput() {
    let (rows, cols, tokens) = (1024usize, 4096usize, 32usize);
    let mut seed = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ] {
        let wb = row_bytes(ty, cols);
        let mut w: Vec<u8> = (0..wb * rows).map(|_| next() as u8).collect();
        let fields: &[usize] = match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            _ => &[208],
        };
        for blk in w.chunks_exact_mut(ty.type_size()) {
            for &o in fields {
                blk[o..o + 2].copy_from_slice(&f32_to_f16(0.01).to_le_bytes());
            }
        }
        let fmt = vec_dot_type(ty).unwrap();
        let ab = act_row_bytes(fmt, cols);
        let mut acts = Vec::new();
        for _ in 0..tokens {
            let x: Vec<f32> = (0..cols)
                .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
                .collect();
            let mut a = Vec::new();
            quantize_activations(fmt, &x, &mut a).unwrap();
            acts.extend_from_slice(&a);
        }
        let mut out = vec![0f32; rows * tokens];
        let (mut t_mm, mut t_mv) = (f64::MAX, f64::MAX);
        for _ in 0..10 {
            let t = Instant::now();
            matmul(ty, cols, &w, &acts, tokens, &mut out);
            t_mm = t_mm.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for (tk, o) in out.chunks_exact_mut(rows).enumerate() {
                matvec(ty, cols, &w, &acts[tk * ab..(tk + 1) * ab], o);
            }
            t_mv = t_mv.min(t.elapsed().as_secs_f64());
        }
        let macs = (rows * cols * tokens) as f64;
        println!(
            "{:>5} {rows}x{cols} x {tokens} tokens: matmul {:6.2} ms ({:5.1} GMAC/s), matvec per token {:6.2} ms ({:5.1} GMAC/s)",
            ty.name(),
            t_mm * 1e3,
            macs / t_mm / 1e9,
            t_mv * 1e3,
            macs / t_mv / 1e9
        );
    }
}
