//! Run one batched matmul shape repeatedly, for `perf stat -e cycles:u` comparisons
//! (user-mode cycles are far less sensitive to other load on a shared machine than wall
//! time):
//!
//! ```text
//! cargo build --release -p flea-quant --example matmul_cycles
//! perf stat -e cycles:u,instructions:u target/release/examples/matmul_cycles Q5_0 [ISA] [REPS] [TOKENS] [mv|mm] [ROWS] [COLS]
//! ```
//! `ISA` is `scalar`, `avx2` or `avx512` (default: best available); shape 1024 x 4096 x
//! TOKENS (default 32; 1 times the one-token kernel). `mv` times `matvec` instead (one
//! token, the multi-row kernels: the path decode takes). Two more arguments set the shape
//! (ROWS COLS, default 1024 4096).

use flea_quant::*;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ty = GgmlType::ALL
        .into_iter()
        .find(|t| Some(t.name()) == args.get(1).map(|s| s.as_str()))
        .expect("usage: matmul_cycles TYPE [scalar|avx2|avx512] [REPS]");
    let isa = match args.get(2).map(|s| s.as_str()) {
        Some("scalar") => Isa::Scalar,
        Some("avx2") => Isa::Avx2,
        Some("avx512") => Isa::Avx512,
        _ => best_isa(),
    };
    let reps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(50);
    let tokens: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(32);
    let rows: usize = args.get(6).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let cols: usize = args.get(7).and_then(|s| s.parse().ok()).unwrap_or(4096);
    let mut seed = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let wb = row_bytes(ty, cols);
    let mut w: Vec<u8> = (0..wb * rows).map(|_| next() as u8).collect();
    // Sane f16 scales: rewrite every block from its dequantized-free random bytes by
    // setting the f16 fields to 0.01.
    let fields: &[usize] = match ty {
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        _ => &[0],
    };
    for blk in w.chunks_exact_mut(ty.type_size()) {
        for &o in fields {
            blk[o..o + 2].copy_from_slice(&f32_to_f16(0.01).to_le_bytes());
        }
    }
    let fmt = vec_dot_type(ty).unwrap();
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
    let mv = args.get(5).is_some_and(|s| s == "mv");
    let ab = act_row_bytes(fmt, cols);
    let t = std::time::Instant::now();
    for _ in 0..reps {
        if mv {
            for (tok, o) in out.chunks_exact_mut(rows).enumerate() {
                matvec_isa(isa, ty, cols, &w, &acts[tok * ab..][..ab], o);
            }
        } else {
            matmul_isa(isa, ty, cols, &w, &acts, tokens, &mut out);
        }
    }
    let s = t.elapsed().as_secs_f64();
    let macs = (rows * cols * tokens * reps) as f64;
    println!(
        "{ty} {isa:?}: {:.4} ms per matmul, {:.1} GMAC/s wall (checksum {})",
        s * 1e3 / reps as f64,
        macs / s / 1e9,
        out.iter().sum::<f32>()
    );
}
