//! Decode mat-vec throughput per weight type on one CUDA device: the mmvq kernels (one and two
//! rows per warp, `set_mmvq_rows`) against the dequantizing matvec (`set_mmvq(false)`), on the
//! matrix shapes of a 13B llama (and the output head), one token, weights resident. Each
//! timing is `reps` back-to-back `Backend::matmul` calls (activation quantization included)
//! between two synchronizations; GB/s counts weight bytes only. Weights are random bytes with
//! sane f16 scales (speed does not depend on the values).
//!
//! Also prints each mmvq result's relative difference from the matvec's: both round
//! activations as the CPU does, so ~1e-6 is expected (Q4_1 ~1e-4: the matvec kernel applies
//! its min without rounding Q8_1's block sum to f16, as the CPU and mmvq do).
//!
//! usage: mmvq_bench [REPS]    (cargo build --release -p flea-cuda --example mmvq_bench)
use flea_cuda::CudaBackend;
use flea_gguf::GgmlType;
use flea_model::backend::Backend;
use flea_model::weights::Weight;
use std::time::Instant;

/// f16 fields (byte offsets inside a block) that must hold finite scales.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q4_1 | GgmlType::Q5_1 => &[0, 2],
        GgmlType::Q6_K => &[208],
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => &[0],
        _ => &[],
    }
}

fn weight_bytes(ty: GgmlType, rows: usize, cols: usize, seed: &mut u64) -> Vec<u8> {
    let mut next = || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    };
    let n = rows * cols / ty.block_size() * ty.type_size();
    let mut d: Vec<u8> = (0..n).map(|_| next() as u8).collect();
    let small = flea_quant::f32_to_f16(0.01).to_le_bytes();
    if ty == GgmlType::F16 {
        for c in d.chunks_exact_mut(2) {
            c.copy_from_slice(&flea_quant::f32_to_f16((next() % 1000) as f32 * 1e-4).to_le_bytes());
        }
    } else if ty == GgmlType::BF16 {
        for c in d.chunks_exact_mut(2) {
            c.copy_from_slice(
                &flea_quant::f32_to_bf16((next() % 1000) as f32 * 1e-4).to_le_bytes(),
            );
        }
    }
    for blk in d.chunks_exact_mut(ty.type_size()) {
        for &o in f16_fields(ty) {
            blk[o..o + 2].copy_from_slice(&small);
        }
    }
    d
}

fn time_matmul(
    cuda: &CudaBackend,
    w: &Weight,
    x: &flea_cuda::CudaAct,
    out: &mut flea_cuda::CudaAct,
    reps: usize,
) -> (f64, Vec<f32>) {
    // Warm-up: uploads the weight (kernels were loaded at start).
    for _ in 0..3 {
        cuda.matmul(1, w, x, out).expect("matmul");
    }
    cuda.synchronize().expect("sync");
    let t = Instant::now();
    for _ in 0..reps {
        cuda.matmul(1, w, x, out).expect("matmul");
    }
    cuda.synchronize().expect("sync");
    let secs = t.elapsed().as_secs_f64() / reps as f64;
    (secs, cuda.read(1, out).expect("read"))
}

/// ||a - b|| / ||b||.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += ((x - y) as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let cuda = match CudaBackend::new(0) {
        Ok(c) => c,
        Err(e) => {
            println!("SKIP: no CUDA device ({e})");
            return;
        }
    };
    println!("device: {}  reps: {reps}", cuda.name());
    println!("GB/s = weight bytes / time per matmul; err = ||mmvq - matvec|| / ||matvec||");
    let shapes = [
        (5120usize, 5120usize, "attn q/k/v/o"),
        (13824, 5120, "ffn gate/up"),
        (5120, 13824, "ffn down"),
        (32000, 5120, "output"),
    ];
    let types = [
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q5_K,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q4_1,
        GgmlType::F16,
    ];
    println!(
        "{:<5} {:>5}x{:<5} {:<12} {:>7} {:>8} {:>7} {:>7} {:>7} {:>8} {:>8}",
        "type",
        "rows",
        "cols",
        "tensor",
        "MB",
        "1row us",
        "GB/s",
        "2row",
        "old",
        "err 1row",
        "err 2row"
    );
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for ty in types {
        for &(rows, cols, what) in &shapes {
            let data = weight_bytes(ty, rows, cols, &mut seed);
            let w = Weight {
                ty,
                rows,
                cols,
                data: &data,
            };
            let x = cuda.alloc_act(1, cols).expect("alloc");
            let xs: Vec<f32> = (0..cols)
                .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
                .collect();
            cuda.upload(&x, &xs).expect("upload");
            let mut out = cuda.alloc_act(1, rows).expect("alloc");
            cuda.set_mmvq(true);
            cuda.set_mmvq_rows(1);
            let (t1, y1) = time_matmul(&cuda, &w, &x, &mut out, reps);
            cuda.set_mmvq_rows(2);
            let (t2, y2) = time_matmul(&cuda, &w, &x, &mut out, reps);
            cuda.set_mmvq_rows(1);
            cuda.set_mmvq(false);
            let (t_old, y_old) = time_matmul(&cuda, &w, &x, &mut out, reps);
            cuda.set_mmvq(true);
            let mb = data.len() as f64 / 1e6;
            let gbs = |t: f64| mb / 1e3 / t;
            println!(
                "{:<5} {:>5}x{:<5} {:<12} {:>7.1} {:>8.1} {:>7.0} {:>7.0} {:>7.0} {:>8.1e} {:>8.1e}",
                ty.to_string(),
                rows,
                cols,
                what,
                mb,
                t1 * 1e6,
                gbs(t1),
                gbs(t2),
                gbs(t_old),
                rel_err(&y1, &y_old),
                rel_err(&y2, &y_old)
            );
            cuda.clear_weights();
        }
    }
    println!("mmvq fallbacks for alignment: {}", cuda.mmvq_misaligned());
}
