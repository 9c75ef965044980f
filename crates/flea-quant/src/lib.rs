//! GGML tensor types: dequantization, activation quantization and dot products.
//!
//! INTERFACE SKELETON — the bodies are being written; signatures are the contract other
//! crates code against.
//!
//! Like llama.cpp's CPU backend, a quantized weight row is multiplied with activations that
//! were first rounded to the weight type's "vec-dot" format (Q8_0, Q8_1 or Q8_K; F16 for F16
//! weights, BF16 for BF16, F32 for F32). Doing the same makes our results match llama.cpp
//! closely and is also the fast path (integer dot products).

pub use flea_gguf::GgmlType;

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
pub fn vec_dot_type(_weight: GgmlType) -> Result<GgmlType> {
    todo!()
}

/// Dequantize `dst.len()` elements from `src` (whole blocks of `ty`).
pub fn dequantize(_ty: GgmlType, _src: &[u8], _dst: &mut [f32]) -> Result<()> {
    todo!()
}

/// Convert f32 activations to `fmt` (one of F32, F16, BF16, Q8_0, Q8_1, Q8_K), appending to
/// `out` after clearing it. `x.len()` must be a whole number of `fmt` blocks.
pub fn quantize_activations(_fmt: GgmlType, _x: &[f32], _out: &mut Vec<u8>) -> Result<()> {
    todo!()
}

/// Which instruction set the dot products use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

/// The best instruction set this CPU supports (detected once, at run time).
pub fn best_isa() -> Isa {
    todo!()
}

/// Dot product of one weight row (`n` elements of type `weight`) with activations already in
/// `vec_dot_type(weight)` format. Uses `best_isa()`.
///
/// Callers guarantee the slice sizes (checked with debug assertions on the hot path; the
/// checked entry is [`vec_dot_checked`]).
pub fn vec_dot(_weight: GgmlType, _n: usize, _w_row: &[u8], _act: &[u8]) -> f32 {
    todo!()
}

/// As [`vec_dot`] with an explicit instruction set (tests compare every path to Scalar)
/// and size checks.
pub fn vec_dot_checked(
    _isa: Isa,
    _weight: GgmlType,
    _n: usize,
    _w_row: &[u8],
    _act: &[u8],
) -> Result<f32> {
    todo!()
}
