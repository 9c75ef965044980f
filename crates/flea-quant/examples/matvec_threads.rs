//! Multi-threaded one-token matvec rate over a matrix larger than the caches: how many
//! bytes of weights per second the CPU multiplies through at batch 1 (the hybrid's CPU
//! side), next to a plain read of the same buffer (the memory's ceiling):
//!
//! ```text
//! cargo run --release -p flea-quant --example matvec_threads -- TYPE THREADS [MIB] [COLS]
//! ```
//! `TYPE` is a GGML type name or `read`; default 2048 MiB of rows of 5120 columns.

use flea_quant::*;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: matvec_threads TYPE|read THREADS [MIB] [COLS]";
    let name = args.get(1).expect(usage).as_str();
    let threads: usize = args.get(2).and_then(|s| s.parse().ok()).expect(usage);
    let mib: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2048);
    let cols: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(5120);
    let ty = GgmlType::ALL.into_iter().find(|t| t.name() == name);
    let wb = ty.map_or(8 * cols, |t| row_bytes(t, cols));
    // Whole groups of 8 rows per thread chunk.
    let rows = (mib << 20) / wb / 8 * 8;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut w = vec![0u8; rows * wb];
    for c in w.chunks_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        c.copy_from_slice(&seed.to_le_bytes()[..c.len()]);
    }
    if let Some(t) = ty {
        let fields: &[usize] = match t {
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
            GgmlType::Q6_K => &[208],
            _ => &[0],
        };
        for blk in w.chunks_exact_mut(t.type_size()) {
            for &o in fields {
                blk[o..o + 2].copy_from_slice(&f32_to_f16(0.01).to_le_bytes());
            }
        }
    }
    let x: Vec<f32> = (0..cols)
        .map(|j| ((j * 7919) % 113) as f32 / 113.0 - 0.5)
        .collect();
    let mut act = Vec::new();
    if let Some(t) = ty {
        quantize_activations(vec_dot_type(t).unwrap(), &x, &mut act).unwrap();
    }
    let mut out = vec![0f32; rows];
    let per = rows.div_ceil(threads).div_ceil(8) * 8;
    let pass = |out: &mut [f32]| {
        std::thread::scope(|s| {
            for (i, o) in out.chunks_mut(per).enumerate() {
                let wr = &w[i * per * wb..][..o.len() * wb];
                let act = &act;
                s.spawn(move || match ty {
                    Some(t) => matvec(t, cols, wr, act, o),
                    None => {
                        let mut acc = 0u64;
                        for c in wr.chunks_exact(8) {
                            acc = acc.wrapping_add(u64::from_le_bytes(c.try_into().unwrap()));
                        }
                        o[0] = acc as f32;
                    }
                });
            }
        })
    };
    pass(&mut out);
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed().as_secs_f64() < 2.0 {
        pass(&mut out);
        n += 1;
    }
    let s = t.elapsed().as_secs_f64() / n as f64;
    println!(
        "{name} threads {threads}: {:.1} GB/s ({} MiB, {:.2} ms per pass, checksum {})",
        (rows * wb) as f64 / s / 1e9,
        (rows * wb) >> 20,
        s * 1e3,
        out.iter().sum::<f32>()
    );
}
