//! Kernel selection: scalar reference kernels and the x86-64 SIMD ones.

use crate::{float, kquants, legacy, row_bytes, vec_dot_type, DotFn, GgmlType, Isa};

#[cfg(target_arch = "x86_64")]
#[macro_use]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
pub(crate) mod f16dot;
#[cfg(target_arch = "x86_64")]
pub(crate) mod multi_avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod quantize_avx2;

/// Run-time CPU feature detection (called once; the result is cached by the caller).
pub(crate) fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        if avx512 {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

/// Wrap a safe slice-based scalar dot as a pointer-based [`DotFn`].
macro_rules! scalar {
    ($ty:expr, $f:path) => {{
        unsafe fn k(n: usize, w: *const u8, a: *const u8) -> f32 {
            let (wb, ab) = (row_bytes($ty, n), row_bytes(vec_dot_type($ty).unwrap(), n));
            // SAFETY: the DotFn contract: w and a are valid for the row sizes of n elements.
            let (w, a) = unsafe {
                (
                    std::slice::from_raw_parts(w, wb),
                    std::slice::from_raw_parts(a, ab),
                )
            };
            $f(n, w, a)
        }
        Some(k as DotFn)
    }};
}

pub(crate) fn scalar_kernel(weight: GgmlType) -> Option<DotFn> {
    use GgmlType::*;
    match weight {
        F32 => scalar!(F32, float::vec_dot_f32),
        F16 => scalar!(F16, float::vec_dot_f16),
        BF16 => scalar!(BF16, float::vec_dot_bf16),
        Q4_0 => scalar!(Q4_0, legacy::vec_dot_q4_0),
        Q4_1 => scalar!(Q4_1, legacy::vec_dot_q4_1),
        Q5_0 => scalar!(Q5_0, legacy::vec_dot_q5_0),
        Q5_1 => scalar!(Q5_1, legacy::vec_dot_q5_1),
        Q8_0 => scalar!(Q8_0, legacy::vec_dot_q8_0),
        Q2_K => scalar!(Q2_K, kquants::vec_dot_q2_k),
        Q3_K => scalar!(Q3_K, kquants::vec_dot_q3_k),
        Q4_K => scalar!(Q4_K, kquants::vec_dot_q4_k),
        Q5_K => scalar!(Q5_K, kquants::vec_dot_q5_k),
        Q6_K => scalar!(Q6_K, kquants::vec_dot_q6_k),
        _ => None,
    }
}

/// Scalar kernels in the order of llama.cpp's tiled K-quant matmul (see `tiled_kernel`).
pub(crate) fn scalar_kernel_tiled(weight: GgmlType) -> Option<DotFn> {
    match weight {
        GgmlType::Q6_K => scalar!(GgmlType::Q6_K, kquants::vec_dot_q6_k_tiled),
        GgmlType::Q4_K => scalar!(GgmlType::Q4_K, kquants::vec_dot_q4_k_gemm),
        _ => None,
    }
}
