//! GGML tensor types: dequantization, activation quantization and dot products.
//!
//! Like llama.cpp's CPU backend, a quantized weight row is multiplied with activations that
//! were first rounded to the weight type's "vec-dot" format (Q8_0, Q8_1 or Q8_K; F16 for F16
//! weights, BF16 for BF16, F32 for F32). Doing the same makes our results match llama.cpp
//! closely and is also the fast path (integer dot products).
//!
//! Typical use for one matrix-vector product:
//! ```ignore
//! let fmt = vec_dot_type(w_ty)?;
//! let mut act = Vec::new();
//! quantize_activations(fmt, &x, &mut act)?;   // once per input vector
//! matvec(w_ty, n_cols, w_bytes, &act, &mut out); // or vec_dot per row
//! ```
//!
//! Block layouts are documented in the [`legacy`] (32-element blocks) and [`kquants`]
//! (256-element super-blocks) modules.

pub use flea_gguf::GgmlType;

mod float;
pub mod ggml_math;
pub mod kquants;
pub mod legacy;
mod simd;

pub use float::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("tensor type {0} is not supported")]
    Unsupported(GgmlType),
    #[error("{ty}: {n} elements is not a whole number of {block}-element blocks")]
    PartialBlock {
        ty: GgmlType,
        n: usize,
        block: usize,
    },
    #[error("{ty}: expected {expected} bytes, got {got}")]
    Size {
        ty: GgmlType,
        expected: usize,
        got: usize,
    },
    #[error("instruction set {0:?} is not available on this CPU")]
    IsaUnavailable(Isa),
}

pub type Result<T> = std::result::Result<T, QuantError>;

/// The weight types whose rows this crate can dequantize and dot.
pub const SUPPORTED: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

pub fn is_supported(ty: GgmlType) -> bool {
    SUPPORTED.contains(&ty)
}

/// The format activations are converted to before a dot product with a row of `weight`
/// (llama.cpp's `vec_dot_type`): F32→F32, F16→F16, BF16→BF16, Q4_0/Q5_0/Q8_0→Q8_0,
/// Q4_1/Q5_1→Q8_1, K-quants→Q8_K.
pub fn vec_dot_type(weight: GgmlType) -> Result<GgmlType> {
    use GgmlType::*;
    Ok(match weight {
        F32 => F32,
        F16 => F16,
        BF16 => BF16,
        Q4_0 | Q5_0 | Q8_0 => Q8_0,
        Q4_1 | Q5_1 => Q8_1,
        Q2_K | Q3_K | Q4_K | Q5_K | Q6_K => Q8_K,
        other => return Err(QuantError::Unsupported(other)),
    })
}

/// Bytes of `n` elements of `ty` (`n` a whole number of blocks).
#[inline]
pub fn row_bytes(ty: GgmlType, n: usize) -> usize {
    debug_assert_eq!(n % ty.block_size(), 0);
    n / ty.block_size() * ty.type_size()
}

/// Bytes of one activation row of `n` elements in format `fmt` (a `vec_dot_type`).
#[inline]
pub fn act_row_bytes(fmt: GgmlType, n: usize) -> usize {
    row_bytes(fmt, n)
}

/// Checked byte size of `n` elements of `ty`.
fn checked_bytes(ty: GgmlType, n: usize) -> Result<usize> {
    let block = ty.block_size();
    if !n.is_multiple_of(block) {
        return Err(QuantError::PartialBlock { ty, n, block });
    }
    (n / block)
        .checked_mul(ty.type_size())
        .ok_or(QuantError::Size {
            ty,
            expected: usize::MAX,
            got: 0,
        })
}

fn check_len(ty: GgmlType, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        return Err(QuantError::Size { ty, expected, got });
    }
    Ok(())
}

/// Dequantize `dst.len()` elements from `src` (whole blocks of `ty`).
///
/// `src` must hold exactly the bytes of `dst.len()` elements. Besides the 13 weight types,
/// the activation formats Q8_1 and Q8_K are accepted (handy for tests and debugging).
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    use GgmlType::*;
    let f: fn(&[u8], &mut [f32]) = match ty {
        F32 => float::dequant_f32,
        F16 => float::dequant_f16,
        BF16 => float::dequant_bf16,
        Q4_0 => legacy::dequant_q4_0,
        Q4_1 => legacy::dequant_q4_1,
        Q5_0 => legacy::dequant_q5_0,
        Q5_1 => legacy::dequant_q5_1,
        Q8_0 => legacy::dequant_q8_0,
        Q8_1 => legacy::dequant_q8_1,
        Q2_K => kquants::dequant_q2_k,
        Q3_K => kquants::dequant_q3_k,
        Q4_K => kquants::dequant_q4_k,
        Q5_K => kquants::dequant_q5_k,
        Q6_K => kquants::dequant_q6_k,
        Q8_K => kquants::dequant_q8_k,
        other => return Err(QuantError::Unsupported(other)),
    };
    let expected = checked_bytes(ty, dst.len())?;
    check_len(ty, expected, src.len())?;
    f(src, dst);
    Ok(())
}

/// Convert f32 activations to `fmt` (one of F32, F16, BF16, Q8_0, Q8_1, Q8_K), appending to
/// `out` after clearing it. `x.len()` must be a whole number of `fmt` blocks.
///
/// Rounding follows the quantizers llama.cpp's x86 CPU backend runs: Q8_0/Q8_1 use
/// round-half-even of `x * (127/amax)` (ggml's AVX2 `quantize_row_q8_0`, not the `_ref`
/// one); Q8_K uses ggml's sign convention (see [`kquants`]) and round-half-even
/// `nearest_int`.
pub fn quantize_activations(fmt: GgmlType, x: &[f32], out: &mut Vec<u8>) -> Result<()> {
    quantize_activations_isa(best_isa(), fmt, x, out)
}

/// [`quantize_activations`] with an explicit instruction set. Every path produces the same
/// bytes (the SIMD quantizers repeat the reference's f32 operations exactly); this entry
/// exists so tests can check that.
pub fn quantize_activations_isa(
    isa: Isa,
    fmt: GgmlType,
    x: &[f32],
    out: &mut Vec<u8>,
) -> Result<()> {
    use GgmlType::*;
    let f: fn(&[f32], &mut Vec<u8>) = match fmt {
        F32 => float::quantize_f32,
        F16 => float::quantize_f16,
        BF16 => float::quantize_bf16,
        Q8_0 => legacy::quantize_q8_0,
        Q8_1 => legacy::quantize_q8_1,
        Q8_K => kquants::quantize_q8_k,
        other => return Err(QuantError::Unsupported(other)),
    };
    checked_bytes(fmt, x.len())?;
    if !isa_available(isa) {
        return Err(QuantError::IsaUnavailable(isa));
    }
    out.clear();
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar {
        use simd::quantize_avx2 as q;
        // SAFETY: AVX2/FMA/F16C are implied by `isa` (checked available above); the
        // length is a whole number of blocks (checked above).
        let done = unsafe {
            match fmt {
                Q8_0 => q::quantize_q8_0(x, out, false),
                Q8_1 => q::quantize_q8_0(x, out, true),
                Q8_K => q::quantize_q8_k(x, out),
                F16 => q::quantize_f16(x, out),
                _ => false,
            }
        };
        if done {
            return Ok(());
        }
    }
    f(x, out);
    Ok(())
}

/// Which instruction set the dot products use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL/VNNI (plus everything `Avx2` needs). Types without a dedicated
    /// AVX-512 kernel use their AVX2 kernel.
    Avx512,
}

/// Whether this CPU can run `isa` (detected once).
pub fn isa_available(isa: Isa) -> bool {
    match isa {
        Isa::Scalar => true,
        Isa::Avx2 => matches!(detect(), Isa::Avx2 | Isa::Avx512),
        Isa::Avx512 => detect() == Isa::Avx512,
    }
}

fn detect() -> Isa {
    static DETECTED: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(simd::detect)
}

/// The best instruction set this CPU supports (detected once, at run time).
///
/// The environment variable `FLEA_QUANT_ISA` (`scalar`, `avx2`, `avx512`) can lower it, for
/// benchmarking and for reproducing results of an older CPU.
pub fn best_isa() -> Isa {
    static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| {
        usable_isa(match std::env::var("FLEA_QUANT_ISA").as_deref() {
            Ok("scalar") => Isa::Scalar,
            Ok("avx2") => Isa::Avx2,
            _ => Isa::Avx512,
        })
    })
}

/// `isa`, or the best one this CPU has below it.
fn usable_isa(isa: Isa) -> Isa {
    let rank = |i: Isa| match i {
        Isa::Scalar => 0,
        Isa::Avx2 => 1,
        Isa::Avx512 => 2,
    };
    let have = detect();
    if rank(isa) < rank(have) {
        isa
    } else {
        have
    }
}

/// Dot product of two F16 rows (as bits) in the order of llama.cpp's CPU F16 matmul: 16
/// lanes of fused multiply-adds, then a tree sum of the lanes (simd/f16dot.rs). The same bits
/// on every instruction set. None unless the rows have one length, a multiple of 16.
pub fn dot_f16(a: &[u16], b: &[u16]) -> Option<f32> {
    dot_f16_isa(best_isa(), a, b)
}

/// [`dot_f16`] with a chosen instruction set (falls back to the best one available below it).
pub fn dot_f16_isa(isa: Isa, a: &[u16], b: &[u16]) -> Option<f32> {
    use simd::f16dot;
    if a.len() != b.len() || !a.len().is_multiple_of(f16dot::LANES) {
        return None;
    }
    Some(match usable_isa(isa) {
        // SAFETY: AVX-512F (with F16C, FMA) detected; lengths checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { f16dot::dot_avx512(a, b) },
        // SAFETY: AVX2, FMA and F16C detected; lengths checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { f16dot::dot_avx2(a, b) },
        _ => f16dot::dot_scalar(a, b),
    })
}

/// [`dot_f16`] of `q` with four rows at once: the same four values (bits) as four calls,
/// faster where AVX-512 runs the four chains side by side. None unless every row has q's
/// length, a multiple of 16.
pub fn dot_f16_x4(q: &[u16], k: [&[u16]; 4]) -> Option<[f32; 4]> {
    dot_f16_x4_isa(best_isa(), q, k)
}

/// [`dot_f16_x4`] with a chosen instruction set (falls back to the best one available below
/// it).
pub fn dot_f16_x4_isa(isa: Isa, q: &[u16], k: [&[u16]; 4]) -> Option<[f32; 4]> {
    if k.iter().any(|r| r.len() != q.len()) || !q.len().is_multiple_of(simd::f16dot::LANES) {
        return None;
    }
    match usable_isa(isa) {
        // SAFETY: AVX-512F (with F16C, FMA) detected; lengths checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Some(unsafe { simd::f16dot::dot4_avx512(q, k) }),
        other => {
            let mut out = [0f32; 4];
            for (o, row) in out.iter_mut().zip(k) {
                *o = dot_f16_isa(other, row, q)?;
            }
            Some(out)
        }
    }
}

/// A row-dot kernel: `(n, weight row ptr, activation row ptr) -> f32`.
///
/// Unsafe to call: the pointers must be valid for the row sizes of `n` elements (weight
/// type / its vec-dot type), and the CPU must support the kernel's instruction set.
pub(crate) type DotFn = unsafe fn(usize, *const u8, *const u8) -> f32;

/// A four-row kernel: `(n, first weight row, weight row stride in bytes, activation row,
/// out)` writes `out[r]` = dot(weight row r, activation row) for r < 4, with the same bits
/// as the type's [`DotFn`] (several rows only interleave independent chains).
///
/// Unsafe to call: the four weight rows and the activation row must hold `n` elements,
/// `out` four f32, and the CPU must support the kernel's instruction set.
pub(crate) type RowsFn = unsafe fn(usize, *const u8, usize, *const u8, *mut f32);

/// The four-row kernel for `weight` on `isa`, where there is one.
fn rows_kernel(isa: Isa, weight: GgmlType) -> Option<RowsFn> {
    match isa {
        Isa::Scalar => None,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => simd::avx512::rows_kernel(weight),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => simd::avx2::rows_kernel(weight),
        #[cfg(not(target_arch = "x86_64"))]
        _ => None,
    }
}

/// The kernel for `weight` on `isa` (which the caller has verified is available).
fn kernel(isa: Isa, weight: GgmlType) -> Option<DotFn> {
    match isa {
        Isa::Scalar => simd::scalar_kernel(weight),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => simd::avx512::kernel(weight)
            .or_else(|| simd::avx2::kernel(weight))
            .or_else(|| simd::scalar_kernel(weight)),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => simd::avx2::kernel(weight).or_else(|| simd::scalar_kernel(weight)),
        #[cfg(not(target_arch = "x86_64"))]
        _ => simd::scalar_kernel(weight),
    }
}

/// Where llama.cpp's CPU matmul of `n_tokens` tokens sums in another order than its
/// one-token kernel: the kernel in that order and the number of leading tokens it covers.
/// Q6_K: the tiled K-quant matmul (ggml-cpu/tiled) from 8 tokens on, for all of them.
/// Q4_K (repacked into 8-row groups): the 4-token gemm for the whole groups of 4 tokens,
/// the gemv (the one-token order) for the rest.
fn batch_kernel(isa: Isa, weight: GgmlType, n_tokens: usize) -> Option<(DotFn, usize)> {
    let scalar = isa == Isa::Scalar || cfg!(not(target_arch = "x86_64"));
    match weight {
        GgmlType::Q6_K if n_tokens >= 8 => {
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx512 {
                return Some((simd::avx512::dot_q6_k_tiled as DotFn, n_tokens));
            }
            #[cfg(target_arch = "x86_64")]
            if !scalar {
                return Some((simd::avx2::dot_q6_k_tiled as DotFn, n_tokens));
            }
            Some((simd::scalar_kernel_tiled(weight)?, n_tokens))
        }
        GgmlType::Q4_K if n_tokens >= 4 => {
            let split = n_tokens - n_tokens % 4;
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx512 {
                return Some((simd::avx512::dot_q4_k_gemm as DotFn, split));
            }
            #[cfg(target_arch = "x86_64")]
            if !scalar {
                return Some((simd::avx2::dot_q4_k_gemm as DotFn, split));
            }
            Some((simd::scalar_kernel_tiled(weight)?, split))
        }
        _ => None,
    }
}

/// The 4-token kernel in the order of [`batch_kernel`]'s, where there is one.
#[cfg(target_arch = "x86_64")]
fn batch_kernel4(isa: Isa, weight: GgmlType) -> Option<simd::multi_avx2::Dot4Fn> {
    match (isa, weight) {
        (Isa::Avx512, GgmlType::Q6_K) => Some(simd::avx512::dot4_q6_k_tiled),
        (Isa::Avx512, GgmlType::Q4_K) => Some(simd::avx512::dot4_q4_k_gemm),
        _ => None,
    }
}

/// [`kernel`] for `best_isa()`, looked up once per type (the hot path skips the dispatch).
#[inline]
fn best_kernel(weight: GgmlType) -> Option<DotFn> {
    static TABLE: std::sync::OnceLock<[Option<DotFn>; GgmlType::ALL.len()]> =
        std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| GgmlType::ALL.map(|t| kernel(best_isa(), t)));
    // Fieldless enum: `as usize` is its position in declaration order, which ALL follows.
    table.get(weight as usize).copied().flatten()
}

#[cold]
#[inline(never)]
fn unsupported(weight: GgmlType) -> ! {
    panic!("flea-quant: tensor type {weight} is not supported by vec_dot")
}

#[cold]
#[inline(never)]
fn bad_sizes(weight: GgmlType, n: usize, w: usize, a: usize) -> ! {
    panic!("flea-quant: vec_dot {weight} n={n}: row of {w} bytes / activations of {a} bytes are too short")
}

/// Byte sizes (weight row, activation row) of `n` elements of `weight`.
#[inline(always)]
fn sizes(weight: GgmlType, n: usize) -> (usize, usize) {
    let fmt = vec_dot_type(weight).unwrap_or_else(|_| unsupported(weight));
    (row_bytes(weight, n), row_bytes(fmt, n))
}

/// Dot product of one weight row (`n` elements of type `weight`) with activations already in
/// `vec_dot_type(weight)` format. Uses `best_isa()`.
///
/// Callers guarantee the slice sizes (checked with debug assertions on the hot path; the
/// checked entry is [`vec_dot_checked`]). Panics on an unsupported type. The slices'
/// lengths are still compared once (two integer compares) so that a caller bug can never
/// read out of bounds: this function is safe. For many rows prefer [`matvec`], which does
/// that once for the whole matrix.
#[inline]
pub fn vec_dot(weight: GgmlType, n: usize, w_row: &[u8], act: &[u8]) -> f32 {
    debug_assert_eq!(n % weight.block_size(), 0);
    let k = best_kernel(weight).unwrap_or_else(|| unsupported(weight));
    let (wb, ab) = sizes(weight, n);
    if w_row.len() < wb || act.len() < ab {
        bad_sizes(weight, n, w_row.len(), act.len());
    }
    // SAFETY: the kernel comes from best_isa(), which only returns instruction sets that
    // run-time detection found; both slices were just checked to hold n elements' bytes.
    unsafe { k(n, w_row.as_ptr(), act.as_ptr()) }
}

/// As [`vec_dot`] with an explicit instruction set (tests compare every path to Scalar)
/// and size checks.
pub fn vec_dot_checked(
    isa: Isa,
    weight: GgmlType,
    n: usize,
    w_row: &[u8],
    act: &[u8],
) -> Result<f32> {
    let fmt = vec_dot_type(weight)?;
    if !isa_available(isa) {
        return Err(QuantError::IsaUnavailable(isa));
    }
    let k = kernel(isa, weight).ok_or(QuantError::Unsupported(weight))?;
    check_len(weight, checked_bytes(weight, n)?, w_row.len())?;
    check_len(fmt, checked_bytes(fmt, n)?, act.len())?;
    // SAFETY: `isa` is available on this CPU (checked above) and both slices hold exactly
    // the bytes of n elements (checked above).
    Ok(unsafe { k(n, w_row.as_ptr(), act.as_ptr()) })
}

/// `out[r] = dot(weight row r, act)` for `r in 0..out.len()`, serially (callers split rows
/// across threads by slicing `w_rows` and `out`). `w_rows` holds `out.len()` rows of
/// `n_cols` elements back to back; `act` is one activation row in `vec_dot_type(weight)`.
///
/// Panics if the type is unsupported or the slices are too short.
pub fn matvec(weight: GgmlType, n_cols: usize, w_rows: &[u8], act: &[u8], out: &mut [f32]) {
    matvec_isa(best_isa(), weight, n_cols, w_rows, act, out)
}

/// [`matvec`] with an explicit instruction set (panics if this CPU lacks it).
pub fn matvec_isa(
    isa: Isa,
    weight: GgmlType,
    n_cols: usize,
    w_rows: &[u8],
    act: &[u8],
    out: &mut [f32],
) {
    assert!(isa_available(isa), "instruction set {isa:?} not available");
    assert_eq!(n_cols % weight.block_size(), 0, "{weight}: partial block");
    let k = kernel(isa, weight).unwrap_or_else(|| unsupported(weight));
    let (wb, ab) = sizes(weight, n_cols);
    assert!(
        wb.checked_mul(out.len()).is_some_and(|need| w_rows.len() >= need) && act.len() >= ab,
        "matvec {weight}: {} rows of {n_cols} need {} weight bytes (got {}) and {ab} activation bytes (got {})",
        out.len(),
        wb * out.len(),
        w_rows.len(),
        act.len()
    );
    let w = w_rows.as_ptr();
    let a = act.as_ptr();
    let mut r0 = 0;
    #[cfg(target_arch = "x86_64")]
    if let (Isa::Avx512, Some(k8)) = (isa, simd::avx512::rows8_kernel(weight)) {
        // The eight-row kernel gathers the rows' headers with i32 offsets up to 7 rows.
        if wb.checked_mul(7).is_some_and(|o| o <= i32::MAX as usize) {
            while r0 + 8 <= out.len() {
                // SAFETY: isa is Avx512 (asserted available); rows r0..r0+8 lie inside
                // w_rows, act holds a full row and out[r0..r0+8] exists (asserted above /
                // loop bound); 7 * wb fits in i32 (checked).
                unsafe { k8(n_cols, w.add(r0 * wb), wb, a, out.as_mut_ptr().add(r0)) };
                r0 += 8;
            }
        }
    }
    if let Some(k4) = rows_kernel(isa, weight) {
        while r0 + 4 <= out.len() {
            // SAFETY: isa available (asserted); rows r0..r0+4 lie inside w_rows, act holds
            // a full row and out[r0..r0+4] exists (asserted above / loop bound).
            unsafe { k4(n_cols, w.add(r0 * wb), wb, a, out.as_mut_ptr().add(r0)) };
            r0 += 4;
        }
    }
    for (r, o) in out.iter_mut().enumerate().skip(r0) {
        // SAFETY: isa available (asserted); row r lies inside w_rows and act holds a full
        // row (both asserted above).
        *o = unsafe { k(n_cols, w.add(r * wb), a) };
    }
}

/// Batched product: `out[t * rows + r] = dot(weight row r, activation row t)`, where
/// `rows = w_rows.len() / row_bytes(weight, n_cols)` and `acts` holds `n_tokens` activation
/// rows (each `act_row_bytes(vec_dot_type(weight), n_cols)` bytes) back to back.
///
/// Rows are processed in cache-sized tiles so each weight row is fetched from memory once
/// and reused, from cache, for every token. With AVX2, one weight row is dotted with 4
/// tokens at a time, unpacking its blocks once (Q4_0, Q5_0, Q5_1, Q8_0, Q5_K); Q4_1 goes
/// four rows at a time. With AVX-512, Q4_0, Q4_1, Q5_0 and Q8_0 use 8-row x 4-token tiles,
/// Q5_1 2-row x 4-token tiles, Q4_K and Q6_K 4-token kernels; one token (`matvec`) takes
/// eight rows at a time for Q4_0, Q4_1, Q5_0, Q8_0 and Q4_K, four for Q6_K (two per vector).
///
/// For Q4_0, Q4_1, Q5_0, Q8_0, Q4_K and Q6_K every path sums in llama.cpp's x86 order,
/// including its batch rules: the results equal [`vec_dot`]'s bit for bit, except Q6_K
/// from 8 tokens on (llama.cpp's tiled matmul order) and Q4_K for each whole group of 4
/// tokens (its repacked gemm order). Other types equal [`vec_dot`] up to summation order.
///
/// Panics if the type is unsupported or the slices are too short.
pub fn matmul(
    weight: GgmlType,
    n_cols: usize,
    w_rows: &[u8],
    acts: &[u8],
    n_tokens: usize,
    out: &mut [f32],
) {
    matmul_isa(best_isa(), weight, n_cols, w_rows, acts, n_tokens, out)
}

/// [`matmul`] with an explicit instruction set (panics if this CPU lacks it).
pub fn matmul_isa(
    isa: Isa,
    weight: GgmlType,
    n_cols: usize,
    w_rows: &[u8],
    acts: &[u8],
    n_tokens: usize,
    out: &mut [f32],
) {
    assert!(isa_available(isa), "instruction set {isa:?} not available");
    assert_eq!(n_cols % weight.block_size(), 0, "{weight}: partial block");
    // llama.cpp's kernels for some K-quants depend on the batch: tokens before `split` go
    // through `k_main`, the rest through `k`.
    let k = kernel(isa, weight).unwrap_or_else(|| unsupported(weight));
    let batch = batch_kernel(isa, weight, n_tokens);
    let (k_main, split) = batch.unwrap_or((k, n_tokens));
    // The four-row kernels have `k`'s order: only where no batch kernel replaces it.
    #[cfg(target_arch = "x86_64")]
    let rows_k = rows_kernel(isa, weight).filter(|_| batch.is_none());
    #[cfg(target_arch = "x86_64")]
    let k4 = match (isa, batch) {
        (Isa::Scalar, _) => None,
        // Tokens before `split` only (whole groups of 4: split is a multiple of 4).
        (_, Some(_)) => batch_kernel4(isa, weight),
        (_, None) => simd::multi_avx2::kernel(weight),
    };
    let (wb, ab) = sizes(weight, n_cols);
    if wb == 0 || n_tokens == 0 {
        return;
    }
    let rows = w_rows.len() / wb;
    // Checked so that a huge n_tokens cannot wrap around and pass the size check.
    let (Some(_), Some(_)) = (ab.checked_mul(n_tokens), rows.checked_mul(n_tokens)) else {
        panic!("matmul {weight}: size overflow");
    };
    assert!(
        acts.len() >= ab * n_tokens && out.len() >= rows * n_tokens,
        "matmul {weight}: {n_tokens} tokens x {rows} rows need {} activation bytes (got {}) and {} outputs (got {})",
        ab * n_tokens,
        acts.len(),
        rows * n_tokens,
        out.len()
    );
    // ~128 KiB of weights and ~128 KiB of activations per tile: both stay in L2. Whole
    // multi-row / multi-token kernel steps per tile (up to 8 rows, 4 tokens), so that only
    // the matrix edges take the narrower kernels.
    const TILE: usize = 128 * 1024;
    let row_tile = ((TILE / wb) & !7).max(8);
    let tok_tile = ((TILE / ab.max(1)) & !3).max(4);
    #[cfg(target_arch = "x86_64")]
    let packed = if isa == Isa::Avx512 {
        simd::avx512::packed_kernel(weight)
    } else {
        None
    };
    #[cfg(target_arch = "x86_64")]
    let mut scratch = Vec::new();
    let w = w_rows.as_ptr();
    let a = acts.as_ptr();
    let o = out.as_mut_ptr();
    // Row r x tokens t0..t1 with the 4-token kernel, then the single-token one.
    let rest = |r: usize, t0: usize, t1: usize| {
        // Cheap next to the dot products; makes the pointer arithmetic below sound.
        assert!(r < rows && t1 <= n_tokens);
        let wr = w.wrapping_add(r * wb);
        #[allow(unused_mut)]
        let mut t = t0;
        #[cfg(target_arch = "x86_64")]
        if let Some(k4) = k4 {
            while t + simd::multi_avx2::T <= t1.min(split) {
                // SAFETY: the kernel's ISA is available (asserted; AVX-512 kernels only
                // when isa is Avx512, AVX2 ones for Avx2 or Avx512); row r and tokens
                // t..t+4 lie inside the slices checked above (asserted); outputs
                // t*rows + r .. (t+3)*rows + r are < rows * n_tokens <= out.len().
                unsafe { k4(n_cols, wr, a.add(t * ab), ab, o.add(t * rows + r), rows) };
                t += simd::multi_avx2::T;
            }
        }
        for t in t..t1 {
            // SAFETY: isa available (asserted); r < rows and t < n_tokens (asserted), whose
            // byte ranges were checked above.
            let k = if t < split { k_main } else { k };
            // SAFETY: as above; `k_main` has the same contract and instruction set as `k`.
            unsafe { *o.add(t * rows + r) = k(n_cols, wr, a.add(t * ab)) };
        }
    };
    for r0 in (0..rows).step_by(row_tile) {
        let r1 = (r0 + row_tile).min(rows);
        for t0 in (0..n_tokens).step_by(tok_tile) {
            let t1 = (t0 + tok_tile).min(n_tokens);
            #[cfg(target_arch = "x86_64")]
            if let Some((pack, ptile, tile_r)) = packed {
                use simd::avx512::{packed_bytes, TILE_T};
                let pb = packed_bytes(n_cols);
                let mut t = t0;
                while t + TILE_T <= t1 {
                    // Allocated once per call, and only when a whole tile of tokens exists.
                    scratch.resize(pb * TILE_T, 0u8);
                    let p = scratch.as_mut_ptr();
                    for j in 0..TILE_T {
                        // SAFETY: isa is Avx512 (asserted available); token t+j < n_tokens
                        // lies inside acts (checked above); scratch holds TILE_T packed
                        // rows of pb bytes.
                        unsafe { pack(n_cols, a.add((t + j) * ab), p.add(j * pb)) };
                    }
                    let mut r = r0;
                    while r + tile_r <= r1 {
                        // SAFETY: isa is Avx512; rows r..r+tile_r lie inside w_rows, the
                        // packed rows inside scratch, and outputs (t+TILE_T-1)*rows +
                        // r+tile_r-1 < rows * n_tokens <= out.len() (checked above).
                        unsafe {
                            ptile(n_cols, w.add(r * wb), wb, p, pb, o.add(t * rows + r), rows)
                        };
                        r += tile_r;
                    }
                    // An odd last row, then tokens that make no whole tile: 4-token
                    // and single-token kernels.
                    for r in r..r1 {
                        rest(r, t, t + TILE_T);
                    }
                    t += TILE_T;
                }
                for r in r0..r1 {
                    rest(r, t, t1);
                }
                continue;
            }
            #[cfg(target_arch = "x86_64")]
            if let (true, Some(kr)) = (k4.is_none() || t1 - t0 < simd::multi_avx2::T, rows_k) {
                // Four rows per call, token by token (types without a 4-token kernel, or
                // fewer tokens than it takes).
                for t in t0..t1 {
                    let mut r = r0;
                    while r + 4 <= r1 {
                        // SAFETY: isa available (asserted; rows_k comes from it); rows
                        // r..r+4 < rows and token t < n_tokens lie inside the slices
                        // checked above, and outputs t*rows + r .. +4 inside out.
                        unsafe {
                            kr(
                                n_cols,
                                w.add(r * wb),
                                wb,
                                a.add(t * ab),
                                o.add(t * rows + r),
                            )
                        };
                        r += 4;
                    }
                    for r in r..r1 {
                        rest(r, t, t + 1);
                    }
                }
                continue;
            }
            for r in r0..r1 {
                rest(r, t0, t1);
            }
        }
    }
}
