//! flea-quant correctness tests: reference dequantization fixtures (from the `gguf` Python
//! package), activation quantization, and every dot-product path against the scalar one.

use flea_quant::*;

/// Small deterministic PRNG (xorshift64*), so the tests need no extra crates.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        // Box-Muller.
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn ty_by_name(name: &str) -> GgmlType {
    GgmlType::ALL
        .into_iter()
        .find(|t| t.name() == name)
        .unwrap()
}

#[test]
fn dequantize_matches_gguf_reference() {
    let doc: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/dequant.json")).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    let mut seen = Vec::new();
    for c in cases {
        let ty = ty_by_name(c["type"].as_str().unwrap());
        let n = c["n"].as_u64().unwrap() as usize;
        let data = hex(c["data"].as_str().unwrap());
        let exp: Vec<f32> = hex(c["expected_f32le"].as_str().unwrap())
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(exp.len(), n);
        let mut got = vec![0f32; n];
        dequantize(ty, &data, &mut got).unwrap();
        // Bit-exact: we apply the same f32 operations in the same order as the reference
        // (e.g. `(d * sc) * q - dmin * m` for Q4_K).
        for (i, (a, b)) in got.iter().zip(&exp).enumerate() {
            assert!(
                a.to_bits() == b.to_bits(),
                "{ty} element {i} (block {}): got {a}, reference {b}",
                i / ty.block_size()
            );
        }
        seen.push(ty);
    }
    for ty in SUPPORTED {
        assert!(seen.contains(&ty), "no fixture for {ty}");
    }
}

/// f16 bytes of a random "sane" scale: magnitude in [2^-12, 2), random sign.
fn sane_half(r: &mut Rng, positive: bool) -> [u8; 2] {
    let mag = 2f32.powf(r.uniform() * 13.0 - 12.0);
    let v = if positive || r.next_u64() & 1 == 0 {
        mag
    } else {
        -mag
    };
    f32_to_f16(v).to_le_bytes()
}

fn f16_fields(ty: GgmlType) -> &'static [usize] {
    use GgmlType::*;
    match ty {
        Q4_0 | Q5_0 | Q8_0 => &[0],
        Q4_1 | Q5_1 | Q4_K | Q5_K => &[0, 2],
        Q2_K => &[80, 82],
        Q3_K => &[108],
        Q6_K => &[208],
        _ => &[],
    }
}

/// A random weight row of `n` elements: random quant bytes, sane scales.
fn random_row(r: &mut Rng, ty: GgmlType, n: usize) -> Vec<u8> {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            let x: Vec<f32> = (0..n).map(|_| r.normal()).collect();
            let mut out = Vec::new();
            quantize_activations(ty, &x, &mut out).unwrap();
            out
        }
        _ => {
            let mut b: Vec<u8> = (0..row_bytes(ty, n)).map(|_| r.next_u64() as u8).collect();
            for blk in b.chunks_exact_mut(ty.type_size()) {
                for &off in f16_fields(ty) {
                    blk[off..off + 2].copy_from_slice(&sane_half(r, false));
                }
            }
            b
        }
    }
}

fn random_acts(r: &mut Rng, n: usize) -> Vec<f32> {
    // Mostly normal with a few outliers, like real activations.
    (0..n)
        .map(|i| r.normal() * if i % 97 == 3 { 20.0 } else { 1.0 })
        .collect()
}

fn deq(ty: GgmlType, b: &[u8], n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    dequantize(ty, b, &mut v).unwrap();
    v
}

#[test]
fn q8_round_trips() {
    let mut r = Rng(1);
    for fmt in [GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8_K] {
        for _ in 0..20 {
            let n = 512;
            let x = random_acts(&mut r, n);
            let mut q = Vec::new();
            quantize_activations(fmt, &x, &mut q).unwrap();
            assert_eq!(q.len(), act_row_bytes(fmt, n));
            let y = deq(fmt, &q, n);
            for (xb, yb) in x.chunks(fmt.block_size()).zip(y.chunks(fmt.block_size())) {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                // Half a step, plus the f16 rounding of d for Q8_0/Q8_1 (up to 2^-11 of amax).
                let tol = amax / 127.0 * 0.5 + amax * 1e-3;
                for (a, b) in xb.iter().zip(yb) {
                    assert!((a - b).abs() <= tol, "{fmt}: {a} vs {b} (tol {tol})");
                }
            }
        }
    }
    // Float formats.
    let x = random_acts(&mut r, 64);
    for fmt in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        let mut q = Vec::new();
        quantize_activations(fmt, &x, &mut q).unwrap();
        let y = deq(fmt, &q, 64);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= a.abs() * 4e-3, "{fmt}: {a} vs {b}");
        }
    }
}

#[test]
fn q8_1_sum_term() {
    let mut r = Rng(2);
    let x = random_acts(&mut r, 64);
    let mut q = Vec::new();
    quantize_activations(GgmlType::Q8_1, &x, &mut q).unwrap();
    for blk in q.chunks_exact(36) {
        let d = f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
        let s = f16_to_f32(u16::from_le_bytes([blk[2], blk[3]]));
        let sum: i32 = blk[4..].iter().map(|&v| v as i8 as i32).sum();
        // ggml computes s from the f32 d; allow for d's own f16 rounding.
        assert!((s - sum as f32 * d).abs() <= (sum as f32 * d).abs() * 2e-3 + 1e-6);
    }
}

#[test]
fn q8_k_sign_convention() {
    // Largest magnitude is positive: ggml stores d < 0 and negated quants.
    let mut x = vec![0.5f32; 256];
    x[7] = 2.0;
    x[9] = -1.0;
    let mut q = Vec::new();
    quantize_activations(GgmlType::Q8_K, &x, &mut q).unwrap();
    let d = f32::from_le_bytes(q[0..4].try_into().unwrap());
    assert!(d < 0.0, "d = {d}");
    assert!((d + 2.0 / 127.0).abs() < 1e-7);
    assert_eq!(q[4 + 7] as i8, -127);
    assert_eq!(q[4 + 9] as i8, 64); // nearest_int(63.5) = 64 (ties to even)
    assert_eq!(q[4] as i8, -32); // nearest_int(-31.75)
                                 // bsums are sums of each 16 quants.
    let qs: Vec<i32> = q[4..260].iter().map(|&v| v as i8 as i32).collect();
    for j in 0..16 {
        let b = i16::from_le_bytes([q[260 + 2 * j], q[261 + 2 * j]]) as i32;
        assert_eq!(b, qs[j * 16..j * 16 + 16].iter().sum::<i32>());
    }
    // Largest magnitude negative: d > 0.
    x[7] = -2.0;
    quantize_activations(GgmlType::Q8_K, &x, &mut q).unwrap();
    let d = f32::from_le_bytes(q[0..4].try_into().unwrap());
    assert!(d > 0.0);
    assert_eq!(q[4 + 7] as i8, -127);
    // All zero: d = 0, quants 0.
    quantize_activations(GgmlType::Q8_K, &[0.0; 256], &mut q).unwrap();
    assert!(q.iter().all(|&b| b == 0));
    assert_eq!(q.len(), 292);
}

#[test]
fn q8_0_rounding_matches_ggml_x86() {
    // amax = 127 -> 127/amax = 1, q = round-half-even(x), as ggml's AVX2 quantize_row_q8_0
    // (the `_ref` quantizer would round halves away from zero: 3 and -3).
    let mut x = vec![0f32; 32];
    x[0] = 127.0;
    x[1] = 2.5;
    x[2] = -2.5;
    x[3] = 0.49;
    x[4] = 3.5;
    let mut q = Vec::new();
    for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
        if !isa_available(isa) {
            continue;
        }
        quantize_activations_isa(isa, GgmlType::Q8_0, &x, &mut q).unwrap();
        assert_eq!(&q[..2], &f32_to_f16(1.0).to_le_bytes());
        assert_eq!(q[2] as i8, 127);
        assert_eq!(q[3] as i8, 2, "{isa:?}");
        assert_eq!(q[4] as i8, -2, "{isa:?}");
        assert_eq!(q[5] as i8, 0);
        assert_eq!(q[6] as i8, 4, "{isa:?}");
    }
}

/// Σ|w_i * a_i| over the dequantized values: the scale of rounding errors in a dot.
fn abs_dot(w: &[f32], a: &[f32]) -> f64 {
    w.iter()
        .zip(a)
        .map(|(x, y)| (*x as f64 * *y as f64).abs())
        .sum()
}

#[test]
fn scalar_vec_dot_matches_dequantized_dot() {
    let mut r = Rng(3);
    for ty in SUPPORTED {
        let fmt = vec_dot_type(ty).unwrap();
        for blocks in [1usize, 2, 3, 8] {
            let n = blocks * ty.block_size().max(32);
            let n = if ty.block_size() == 256 {
                blocks * 256
            } else {
                n
            };
            for _ in 0..10 {
                let w = random_row(&mut r, ty, n);
                let x = random_acts(&mut r, n);
                let mut a = Vec::new();
                quantize_activations(fmt, &x, &mut a).unwrap();
                let wf = deq(ty, &w, n);
                let af = deq(fmt, &a, n);
                let exact: f64 = wf.iter().zip(&af).map(|(p, q)| *p as f64 * *q as f64).sum();
                let got = vec_dot_checked(Isa::Scalar, ty, n, &w, &a).unwrap() as f64;
                // Q8_1's s is rounded to f16, so Q4_1/Q5_1 carry ~2^-11 relative error in
                // the min term; the rest is f32 accumulation.
                let tol = abs_dot(&wf, &af) * 1e-3 + 1e-4;
                assert!(
                    (got - exact).abs() <= tol,
                    "{ty} n={n}: vec_dot {got} vs dequantized {exact} (tol {tol})"
                );
            }
        }
    }
}

fn available_isas() -> Vec<Isa> {
    [Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|&i| isa_available(i))
        .collect()
}

#[test]
fn simd_paths_equal_scalar() {
    let mut r = Rng(4);
    let isas = available_isas();
    eprintln!("testing ISAs {isas:?} (best {:?})", best_isa());
    for ty in SUPPORTED {
        let fmt = vec_dot_type(ty).unwrap();
        let bs = if ty.block_size() == 256 { 256 } else { 32 };
        for blocks in [1usize, 2, 3, 4, 5, 7, 8, 16, 33] {
            let n = blocks * bs;
            for _ in 0..20 {
                let w = random_row(&mut r, ty, n);
                let x = random_acts(&mut r, n);
                let mut a = Vec::new();
                quantize_activations(fmt, &x, &mut a).unwrap();
                let s = vec_dot_checked(Isa::Scalar, ty, n, &w, &a).unwrap();
                let tol = abs_dot(&deq(ty, &w, n), &deq(fmt, &a, n)) * 1e-5 + 1e-6;
                for &isa in &isas {
                    let v = vec_dot_checked(isa, ty, n, &w, &a).unwrap();
                    assert!(
                        ((v - s) as f64).abs() <= tol,
                        "{ty} {isa:?} n={n}: {v} vs scalar {s} (tol {tol})"
                    );
                }
                // The unchecked entry agrees with its checked twin.
                let best = vec_dot_checked(best_isa(), ty, n, &w, &a).unwrap();
                assert_eq!(vec_dot(ty, n, &w, &a).to_bits(), best.to_bits());
            }
        }
    }
}

#[test]
fn matvec_and_matmul_equal_vec_dot() {
    let mut r = Rng(5);
    for ty in SUPPORTED {
        let fmt = vec_dot_type(ty).unwrap();
        let n = 512;
        let rows = 37;
        let wb = row_bytes(ty, n);
        let ab = act_row_bytes(fmt, n);
        let w: Vec<u8> = (0..rows).flat_map(|_| random_row(&mut r, ty, n)).collect();
        for tokens in [1usize, 3, 4, 5, 9] {
            let mut acts = Vec::new();
            let mut xs = Vec::new();
            for _ in 0..tokens {
                let mut a = Vec::new();
                let x = random_acts(&mut r, n);
                quantize_activations(fmt, &x, &mut a).unwrap();
                acts.extend_from_slice(&a);
                xs.push(deq(fmt, &a, n));
            }
            let mut mm = vec![0f32; rows * tokens];
            matmul(ty, n, &w, &acts, tokens, &mut mm);
            // Every instruction set's batched kernels agree with the scalar path.
            let mut ms = vec![0f32; rows * tokens];
            matmul_isa(Isa::Scalar, ty, n, &w, &acts, tokens, &mut ms);
            for isa in available_isas() {
                let mut mi = vec![0f32; rows * tokens];
                matmul_isa(isa, ty, n, &w, &acts, tokens, &mut mi);
                for t in 0..tokens {
                    for row in 0..rows {
                        let tol = abs_dot(&deq(ty, &w[row * wb..(row + 1) * wb], n), &xs[t]) * 1e-5
                            + 1e-6;
                        let (g, e) = (mi[t * rows + row], ms[t * rows + row]);
                        assert!(
                            ((g - e) as f64).abs() <= tol,
                            "{ty} {isa:?} matmul token {t}/{tokens} row {row}: {g} vs scalar {e}"
                        );
                    }
                }
            }
            for t in 0..tokens {
                let a = &acts[t * ab..(t + 1) * ab];
                let mut mv = vec![0f32; rows];
                matvec(ty, n, &w, a, &mut mv);
                for row in 0..rows {
                    let wr = &w[row * wb..(row + 1) * wb];
                    let d = vec_dot(ty, n, wr, a);
                    // matvec runs the very same kernel: bit-identical.
                    assert_eq!(mv[row].to_bits(), d.to_bits(), "{ty} matvec row {row}");
                    // matmul may use 4-token kernels: equal up to summation order.
                    let tol = abs_dot(&deq(ty, wr, n), &xs[t]) * 1e-5 + 1e-6;
                    let got = mm[t * rows + row];
                    assert!(
                        ((got - d) as f64).abs() <= tol,
                        "{ty} matmul token {t}/{tokens} row {row}: {got} vs {d}"
                    );
                }
            }
        }
    }
}

/// Every batched kernel (multi-token, multi-row tiles, and their leftovers) against the
/// scalar per-row `vec_dot`, for many block counts, row counts and token counts 1..=9.
#[test]
fn matmul_kernels_equal_scalar_for_all_shapes() {
    let mut r = Rng(11);
    let isas = available_isas();
    for ty in SUPPORTED {
        let fmt = vec_dot_type(ty).unwrap();
        let bs = if ty.block_size() == 256 { 256 } else { 32 };
        for blocks in [1usize, 2, 3, 5, 8, 13] {
            let n = blocks * bs;
            let wb = row_bytes(ty, n);
            let ab = act_row_bytes(fmt, n);
            for rows in [1usize, 2, 3, 5] {
                let w: Vec<u8> = (0..rows).flat_map(|_| random_row(&mut r, ty, n)).collect();
                let tokens = 9;
                let mut acts = Vec::new();
                let mut xs = Vec::new();
                for _ in 0..tokens {
                    let mut a = Vec::new();
                    quantize_activations(fmt, &random_acts(&mut r, n), &mut a).unwrap();
                    xs.push(deq(fmt, &a, n));
                    acts.extend_from_slice(&a);
                }
                let wf: Vec<Vec<f32>> = (0..rows)
                    .map(|row| deq(ty, &w[row * wb..(row + 1) * wb], n))
                    .collect();
                for nt in 1..=tokens {
                    for &isa in &isas {
                        let mut out = vec![f32::NAN; rows * nt];
                        matmul_isa(isa, ty, n, &w, &acts[..nt * ab], nt, &mut out);
                        for t in 0..nt {
                            let a = &acts[t * ab..(t + 1) * ab];
                            for row in 0..rows {
                                let wr = &w[row * wb..(row + 1) * wb];
                                let e = vec_dot_checked(Isa::Scalar, ty, n, wr, a).unwrap();
                                let g = out[t * rows + row];
                                let tol = abs_dot(&wf[row], &xs[t]) * 1e-5 + 1e-6;
                                assert!(
                                    ((g - e) as f64).abs() <= tol,
                                    "{ty} {isa:?} n={n} rows={rows} tokens={nt} t={t} row={row}: {g} vs scalar {e}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn unsupported_types_are_errors() {
    for ty in [
        GgmlType::IQ2_XXS,
        GgmlType::IQ4_NL,
        GgmlType::MXFP4,
        GgmlType::I8,
    ] {
        let e = vec_dot_type(ty).unwrap_err();
        assert!(e.to_string().contains(ty.name()), "{e}");
        let e = dequantize(ty, &[0u8; 66], &mut [0f32; 256]).unwrap_err();
        assert!(e.to_string().contains(ty.name()), "{e}");
        assert!(vec_dot_checked(Isa::Scalar, ty, 256, &[], &[]).is_err());
        assert!(!is_supported(ty));
    }
    let mut out = Vec::new();
    assert!(quantize_activations(GgmlType::Q4_0, &[0.0; 32], &mut out).is_err());
}

#[test]
fn size_errors_not_panics() {
    let mut dst = [0f32; 32];
    assert!(matches!(
        dequantize(GgmlType::Q4_0, &[0u8; 17], &mut dst),
        Err(QuantError::Size {
            expected: 18,
            got: 17,
            ..
        })
    ));
    assert!(matches!(
        dequantize(GgmlType::Q4_K, &[0u8; 144], &mut dst),
        Err(QuantError::PartialBlock { block: 256, .. })
    ));
    let mut out = Vec::new();
    assert!(matches!(
        quantize_activations(GgmlType::Q8_K, &[0.0; 100], &mut out),
        Err(QuantError::PartialBlock { .. })
    ));
    assert!(vec_dot_checked(Isa::Scalar, GgmlType::Q8_0, 32, &[0u8; 34], &[0u8; 33]).is_err());
    assert!(vec_dot_checked(Isa::Scalar, GgmlType::Q8_0, 32, &[0u8; 35], &[0u8; 34]).is_err());
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Model-file bytes of any length never make dequantize panic: either the sizes
        /// match and it succeeds, or it returns an error.
        #[test]
        fn dequantize_never_panics(
            ti in 0usize..GgmlType::ALL.len(),
            bytes in proptest::collection::vec(any::<u8>(), 0..700),
            n in 0usize..600,
        ) {
            let ty = GgmlType::ALL[ti];
            let mut dst = vec![0f32; n];
            let r = dequantize(ty, &bytes, &mut dst);
            let ok = is_supported(ty) || matches!(ty, GgmlType::Q8_1 | GgmlType::Q8_K);
            let fits = n % ty.block_size() == 0
                && bytes.len() == n / ty.block_size() * ty.type_size();
            prop_assert_eq!(r.is_ok(), ok && fits);
        }

        #[test]
        fn vec_dot_checked_never_panics(
            ti in 0usize..SUPPORTED.len(),
            wlen in 0usize..600,
            alen in 0usize..600,
            n in 0usize..600,
        ) {
            let ty = SUPPORTED[ti];
            let (w, a) = (vec![0u8; wlen], vec![0u8; alen]);
            let r = vec_dot_checked(best_isa(), ty, n, &w, &a);
            let fmt = vec_dot_type(ty).unwrap();
            let fits = n % ty.block_size() == 0
                && wlen == row_bytes(ty, n)
                && alen == act_row_bytes(fmt, n);
            prop_assert_eq!(r.is_ok(), fits);
        }

        /// Q8_0 / Q8_K quantization error stays within half a quantization step.
        #[test]
        fn q8_error_bound(x in proptest::collection::vec(-1e3f32..1e3, 256)) {
            for fmt in [GgmlType::Q8_0, GgmlType::Q8_K] {
                let mut q = Vec::new();
                quantize_activations(fmt, &x, &mut q).unwrap();
                let y = deq(fmt, &q, 256);
                for (xb, yb) in x.chunks(fmt.block_size()).zip(y.chunks(fmt.block_size())) {
                    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let tol = amax / 127.0 * 0.5 + amax * 1e-3 + 1e-30;
                    for (a, b) in xb.iter().zip(yb) {
                        prop_assert!((a - b).abs() <= tol, "{} {} vs {}", fmt, a, b);
                    }
                }
            }
        }
    }
}

#[test]
fn simd_quantizers_match_scalar_bytes() {
    let mut r = Rng(6);
    let mut inputs: Vec<Vec<f32>> = (0..40).map(|_| random_acts(&mut r, 1024)).collect();
    // Ties: amax 127 makes d = 1, so x.5 values hit roundf's halfway case.
    inputs.push(
        (0..1024)
            .map(|i| (i % 255) as f32 - 127.0 + 0.5 * (i % 2) as f32)
            .collect(),
    );
    inputs.push(
        (0..1024)
            .map(|i| ((i % 255) as f32 - 127.0) * 0.5)
            .collect(),
    );
    // All zero, and blocks where +amax and -amax both occur (first one decides the sign).
    inputs.push(vec![0.0; 1024]);
    inputs.push(
        (0..1024)
            .map(|i| {
                if i % 3 == 0 {
                    3.0
                } else if i % 3 == 1 {
                    -3.0
                } else {
                    1.0
                }
            })
            .collect(),
    );
    inputs.push(
        (0..1024)
            .map(|i| {
                if i % 3 == 0 {
                    -3.0
                } else if i % 3 == 1 {
                    3.0
                } else {
                    1.0
                }
            })
            .collect(),
    );
    // Tiny and large magnitudes.
    inputs.push((0..1024).map(|i| (i as f32 - 512.0) * 1e-30).collect());
    inputs.push((0..1024).map(|i| (i as f32 - 512.0) * 1e3).collect());
    for isa in available_isas() {
        for x in &inputs {
            for fmt in [
                GgmlType::Q8_0,
                GgmlType::Q8_1,
                GgmlType::Q8_K,
                GgmlType::F16,
                GgmlType::BF16,
                GgmlType::F32,
            ] {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                quantize_activations_isa(Isa::Scalar, fmt, x, &mut a).unwrap();
                quantize_activations_isa(isa, fmt, x, &mut b).unwrap();
                assert!(
                    a == b,
                    "{fmt} {isa:?}: SIMD quantization differs from scalar"
                );
            }
        }
    }
}

#[test]
fn ggml_type_all_is_in_declaration_order() {
    // best_kernel() indexes a table by `ty as usize`; that relies on ALL following the
    // enum's declaration order.
    for (i, t) in GgmlType::ALL.iter().enumerate() {
        assert_eq!(*t as usize, i, "{t}");
    }
}

/// The types whose kernels follow llama.cpp's x86 summation order are bit-identical on
/// every instruction set and in every batched path: matvec, the four-row and tile
/// kernels, the 4-token kernels. Batched results follow llama.cpp's batch rules: Q6_K sums
/// in its tiled order from 8 tokens on, Q4_K in its 4-token gemm order for whole groups of
/// 4 tokens (the rest as one token).
#[test]
fn llama_cpp_ordered_types_are_bit_identical_everywhere() {
    let mut r = Rng(13);
    let ordered = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];
    for ty in ordered {
        let fmt = vec_dot_type(ty).unwrap();
        let n = if ty.block_size() == 256 { 512 } else { 160 };
        let wb = row_bytes(ty, n);
        let ab = act_row_bytes(fmt, n);
        let rows = 11;
        let w: Vec<u8> = (0..rows).flat_map(|_| random_row(&mut r, ty, n)).collect();
        for tokens in [1usize, 2, 3, 4, 5, 8, 9, 13] {
            let mut acts = Vec::new();
            for _ in 0..tokens {
                let mut a = Vec::new();
                quantize_activations(fmt, &random_acts(&mut r, n), &mut a).unwrap();
                acts.extend_from_slice(&a);
            }
            let mut want = vec![0f32; rows * tokens];
            matmul_isa(Isa::Scalar, ty, n, &w, &acts, tokens, &mut want);
            for isa in available_isas() {
                let mut got = vec![f32::NAN; rows * tokens];
                matmul_isa(isa, ty, n, &w, &acts, tokens, &mut got);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        e.to_bits(),
                        "{ty} {isa:?} tokens {tokens} #{i}"
                    );
                }
                for t in 0..tokens {
                    let a = &acts[t * ab..(t + 1) * ab];
                    let mut mv = vec![f32::NAN; rows];
                    matvec_isa(isa, ty, n, &w, a, &mut mv);
                    for row in 0..rows {
                        let one =
                            vec_dot_checked(Isa::Scalar, ty, n, &w[row * wb..][..wb], a).unwrap();
                        assert_eq!(mv[row].to_bits(), one.to_bits(), "{ty} {isa:?} matvec");
                        // Batched = one-token order, except where llama.cpp's batch
                        // kernels sum otherwise.
                        let batched = match ty {
                            GgmlType::Q6_K => tokens >= 8,
                            GgmlType::Q4_K => t < tokens - tokens % 4,
                            _ => false,
                        };
                        if !batched {
                            let b = want[t * rows + row];
                            assert_eq!(b.to_bits(), one.to_bits(), "{ty} tokens {tokens} t {t}");
                        }
                    }
                }
            }
        }
    }
}

/// matvec (the decode path: eight-, four- and one-row kernels) equals the scalar one-row
/// dot bit for bit on every instruction set, for row counts that leave every kind of tail
/// and block counts from 1 up.
#[test]
fn matvec_row_tails_are_bit_identical() {
    let mut r = Rng(29);
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let fmt = vec_dot_type(ty).unwrap();
        for nb in [1usize, 2, 3, 7, 18, 28] {
            let n = ty.block_size() * nb;
            let wb = row_bytes(ty, n);
            let rows = 27;
            let w: Vec<u8> = (0..rows).flat_map(|_| random_row(&mut r, ty, n)).collect();
            let mut a = Vec::new();
            quantize_activations(fmt, &random_acts(&mut r, n), &mut a).unwrap();
            let want: Vec<f32> = (0..rows)
                .map(|row| vec_dot_checked(Isa::Scalar, ty, n, &w[row * wb..][..wb], &a).unwrap())
                .collect();
            for isa in available_isas() {
                for m in 1..=rows {
                    // Every start row too: the kernels read rows from the slice's start.
                    let s = (rows - m) / 2;
                    let mut got = vec![f32::NAN; m];
                    matvec_isa(isa, ty, n, &w[s * wb..(s + m) * wb], &a, &mut got);
                    for (i, g) in got.iter().enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            want[s + i].to_bits(),
                            "{ty} {isa:?} {nb} blocks, {m} rows from {s}: row {i}"
                        );
                    }
                }
            }
        }
    }
}

/// matmul (the prompt path: 8-row × 4-token tiles, then the narrower kernels at the
/// edges) equals the scalar one-row dot bit for bit, for row counts around the tile sizes.
#[test]
fn matmul_row_tails_are_bit_identical() {
    let mut r = Rng(31);
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
    ] {
        let fmt = vec_dot_type(ty).unwrap();
        for nb in [1usize, 3, 28] {
            let n = 32 * nb;
            let (wb, ab) = (row_bytes(ty, n), act_row_bytes(fmt, n));
            let rows = 21;
            let w: Vec<u8> = (0..rows).flat_map(|_| random_row(&mut r, ty, n)).collect();
            let tokens = 9;
            let mut acts = Vec::new();
            for _ in 0..tokens {
                let mut a = Vec::new();
                quantize_activations(fmt, &random_acts(&mut r, n), &mut a).unwrap();
                acts.extend_from_slice(&a);
            }
            for isa in available_isas() {
                for m in [1usize, 4, 7, 8, 9, 15, 16, 17, 21] {
                    let mut got = vec![f32::NAN; m * tokens];
                    matmul_isa(isa, ty, n, &w[..m * wb], &acts, tokens, &mut got);
                    for t in 0..tokens {
                        for row in 0..m {
                            let a = &acts[t * ab..(t + 1) * ab];
                            let want = vec_dot_checked(Isa::Scalar, ty, n, &w[row * wb..][..wb], a)
                                .unwrap();
                            assert_eq!(
                                got[t * m + row].to_bits(),
                                want.to_bits(),
                                "{ty} {isa:?} {nb} blocks, {m} rows: token {t} row {row}"
                            );
                        }
                    }
                }
            }
        }
    }
}
