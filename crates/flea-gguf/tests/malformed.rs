//! Hand-made malformed files, each with the error kind it must give. Every message must
//! be a single line.

mod common;

use common::*;
use flea_gguf::{GgufError, GgufHeader};

/// Parse and return the error, checking its message is one line.
fn err(r: &Raw) -> GgufError {
    let e = r.parse().expect_err("malformed input parsed");
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "multi-line message: {msg}");
    e
}

fn truncated(e: GgufError) -> String {
    match e {
        GgufError::Truncated(m) => m,
        other => panic!("expected Truncated, got {other:?}"),
    }
}

fn malformed(e: GgufError) -> String {
    match e {
        GgufError::Malformed(m) => m,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

/// A valid file with one F32 tensor of `n` elements at relative offset 0.
fn one_tensor(name: &str, dims: &[u64], ty: u32, offset: u64, data: usize) -> Raw {
    let mut r = Raw::header(3, 1, 0);
    r.tensor(name, dims, ty, offset).pad(32).zeros(data);
    r
}

#[test]
fn baseline_is_valid() {
    let h = one_tensor("w", &[4, 2], 0, 0, 32).parse().unwrap();
    assert_eq!(h.tensors[0].size, 32);
    assert_eq!(h.data_offset, 96);
}

#[test]
fn bad_magic() {
    let mut r = Raw::default();
    r.bytes(b"GGML").u32(3).u64(0).u64(0);
    assert!(matches!(err(&r), GgufError::BadMagic(m) if &m == b"GGML"));
    let e = err(&r).to_string();
    assert!(e.contains("not a GGUF file"), "{e}");
}

#[test]
fn bad_versions() {
    for v in [0, 1, 4, 0x0300_0000] {
        let r = Raw::header(v, 0, 0);
        assert!(matches!(err(&r), GgufError::BadVersion(x) if x == v));
    }
}

#[test]
fn truncated_header() {
    for n in 0..24 {
        let mut r = Raw::header(3, 0, 0);
        r.0.truncate(n);
        truncated(err(&r));
    }
}

#[test]
fn truncated_in_metadata() {
    let mut r = Raw::header(3, 0, 2);
    r.kv_u32("a", 1).str("second.key").u32(4).bytes(&[1, 2]);
    let m = truncated(err(&r));
    assert!(m.contains("metadata kv 1 of 2 ('second.key')"), "{m}");
    assert!(m.contains("past end of file"), "{m}");
}

#[test]
fn truncated_in_tensor_infos() {
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[4], 0, 0)
        .str("blk.3.attn_q.weight")
        .u32(2)
        .u64(4);
    let m = truncated(err(&r));
    assert!(
        m.contains("tensor info 1 of 2 ('blk.3.attn_q.weight')"),
        "{m}"
    );
}

#[test]
fn truncated_in_data() {
    let r = one_tensor("w", &[4, 2], 0, 0, 31);
    let m = truncated(err(&r));
    assert!(m.contains("'w'") && m.contains("past end of file"), "{m}");
}

#[test]
fn metadata_count_too_large() {
    for n in [2, 1000, u64::MAX / 13, u64::MAX] {
        let mut r = Raw::header(3, 0, n);
        r.kv_u32("a", 1);
        let m = malformed(err(&r));
        assert!(m.contains("metadata entries"), "{m}");
    }
}

#[test]
fn tensor_count_too_large() {
    for n in [1, 1 << 20, u64::MAX] {
        let mut r = Raw::header(3, n, 0);
        r.zeros(23);
        malformed(err(&r));
    }
    // Plausible against the whole file, but not against what the metadata leaves.
    let mut r = Raw::header(3, 3, 1);
    r.str("k").u32(8).str(&"x".repeat(100)).zeros(40);
    let m = malformed(err(&r));
    assert!(m.contains("follow the metadata"), "{m}");
}

#[test]
fn string_length_beyond_file() {
    // Key length.
    let mut r = Raw::header(3, 0, 1);
    r.u64(u64::MAX).zeros(16);
    let m = truncated(err(&r));
    assert!(m.contains("string of 18446744073709551615 bytes"), "{m}");
    // String value length.
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(8).u64(1 << 40).bytes(b"abc");
    let m = truncated(err(&r));
    assert!(m.contains("('k')"), "{m}");
    // Tensor name length.
    let mut r = Raw::header(3, 1, 0);
    r.u64(100).zeros(30);
    truncated(err(&r));
}

#[test]
fn array_count_beyond_file() {
    for (elem_ty, count) in [(0u32, 100u64), (8, 1 << 40), (9, u64::MAX), (12, 3)] {
        let mut r = Raw::header(3, 0, 1);
        r.str("arr").u32(9).u32(elem_ty).u64(count).zeros(20);
        let m = truncated(err(&r));
        assert!(m.contains("('arr')") && m.contains("needs at least"), "{m}");
    }
}

#[test]
fn bad_value_types() {
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(13).u32(0);
    let m = malformed(err(&r));
    assert!(m.contains("unknown metadata value type 13"), "{m}");
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(9).u32(99).u64(0).zeros(4);
    malformed(err(&r));
    // Bool other than 0/1.
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(7).u8(2).zeros(12);
    malformed(err(&r));
}

#[test]
fn bad_utf8() {
    let mut r = Raw::header(3, 0, 1);
    r.u64(2).bytes(&[0xff, 0xfe]).u32(4).u32(0);
    let m = malformed(err(&r));
    assert!(m.contains("UTF-8"), "{m}");
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(8).u64(3).bytes(&[b'a', 0xc3, b'(']);
    let m = malformed(err(&r));
    assert!(m.contains("('k')") && m.contains("UTF-8"), "{m}");
    let mut r = Raw::header(3, 1, 0);
    r.u64(1)
        .u8(0x80)
        .u32(1)
        .u64(4)
        .u32(0)
        .u64(0)
        .pad(32)
        .zeros(16);
    malformed(err(&r));
}

#[test]
fn deeply_nested_arrays() {
    // 10000 levels of one-element arrays: must be an error, not a stack overflow.
    let mut r = Raw::header(3, 0, 1);
    r.str("deep").u32(9);
    for _ in 0..10_000 {
        r.u32(9).u64(1);
    }
    r.u32(0).u64(0);
    let m = malformed(err(&r));
    assert!(m.contains("nested"), "{m}");
}

#[test]
fn tensor_offset_out_of_range() {
    let r = one_tensor("w", &[4], 0, 1 << 40, 64);
    let m = truncated(err(&r));
    assert!(m.contains("'w'"), "{m}");
    let r = one_tensor("w", &[4], 0, u64::MAX - 31, 64);
    err(&r);
}

#[test]
fn tensor_offset_misaligned() {
    let r = one_tensor("w", &[4], 0, 8, 64);
    let m = malformed(err(&r));
    assert!(m.contains("not a multiple of the alignment 32"), "{m}");
}

#[test]
fn unknown_tensor_type() {
    for id in [4u32, 5, 31, 36, 40, u32::MAX] {
        let r = one_tensor("blk.0.w", &[32], id, 0, 1024);
        match err(&r) {
            GgufError::UnknownType { tensor, id: got } => {
                assert_eq!(tensor, "blk.0.w");
                assert_eq!(got, id);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn bad_dims() {
    // n_dims 0 and > 4.
    let r = one_tensor("w", &[], 0, 0, 32);
    malformed(err(&r));
    let r = one_tensor("w", &[1, 1, 1, 1, 1], 0, 0, 32);
    let m = malformed(err(&r));
    assert!(m.contains("n_dims is 5"), "{m}");
    let mut r = Raw::header(3, 1, 0);
    r.str("w").u32(u32::MAX).zeros(64);
    malformed(err(&r));
    // Zero dim.
    let r = one_tensor("w", &[4, 0], 0, 0, 32);
    let m = malformed(err(&r));
    assert!(m.contains("zero dimension"), "{m}");
    // Row not a whole number of blocks (Q8_0 has 32-element blocks).
    let r = one_tensor("w", &[33], 8, 0, 64);
    let m = malformed(err(&r));
    assert!(m.contains("block size"), "{m}");
}

#[test]
fn dims_product_overflow() {
    let r = one_tensor("w", &[1 << 32, 1 << 32, 2], 0, 0, 32);
    let m = malformed(err(&r));
    assert!(m.contains("overflows"), "{m}");
    let r = one_tensor("w", &[u64::MAX], 0, 0, 32);
    malformed(err(&r));
    // Elements overflow even though bytes might not (sub-byte type).
    let r = one_tensor("w", &[1 << 40, 1 << 24], 2, 0, 32);
    malformed(err(&r));
}

#[test]
fn duplicate_tensor_names() {
    let mut r = Raw::header(3, 2, 0);
    r.tensor("w", &[8], 0, 0)
        .tensor("w", &[8], 0, 32)
        .pad(32)
        .zeros(64);
    let m = malformed(err(&r));
    assert!(m.contains("duplicate tensor name 'w'"), "{m}");
}

#[test]
fn duplicate_metadata_keys() {
    let mut r = Raw::header(3, 0, 2);
    r.kv_u32("k", 1).kv_u32("k", 2);
    let m = malformed(err(&r));
    assert!(m.contains("duplicate metadata key 'k'"), "{m}");
}

#[test]
fn bad_alignment() {
    for a in [0u32, 3, 48, 100] {
        let mut r = Raw::header(3, 1, 1);
        r.kv_u32("general.alignment", a)
            .tensor("w", &[8], 0, 0)
            .pad(32)
            .zeros(32);
        match err(&r) {
            GgufError::Metadata { key, problem } => {
                assert_eq!(key, "general.alignment");
                assert!(problem.contains("power of two"), "{problem}");
            }
            other => panic!("{other:?}"),
        }
    }
    // Wrong type.
    let mut r = Raw::header(3, 0, 1);
    r.str("general.alignment").u32(8).str("32");
    assert!(matches!(err(&r), GgufError::Metadata { .. }));
}

#[test]
fn other_alignment_is_honoured() {
    // With alignment 64 the data section starts at 64, and offset 32 is misaligned.
    let mut r = Raw::header(3, 1, 1);
    r.kv_u32("general.alignment", 64)
        .tensor("w", &[8], 0, 0)
        .pad(64)
        .zeros(32);
    let h = r.parse().unwrap();
    assert_eq!(h.alignment, 64);
    assert_eq!(h.data_offset % 64, 0);
    let mut r = Raw::header(3, 1, 1);
    r.kv_u32("general.alignment", 64)
        .tensor("w", &[8], 0, 32)
        .pad(64)
        .zeros(96);
    malformed(err(&r));
}

#[test]
fn example_message_shape() {
    let mut r = Raw::header(3, 290, 0);
    // Long names make the 12 first infos big enough that the tensor count is plausible.
    for i in 0..12 {
        r.tensor(&format!("t{i:x<600}"), &[8], 0, 0);
    }
    r.str("blk.3.attn_q.weight").u32(2).u64(1);
    let n = r.0.len() as u64;
    let m = err(&r).to_string();
    assert!(
        m.starts_with("truncated file: tensor info 12 of 290 ('blk.3.attn_q.weight') ends at byte"),
        "{m}"
    );
    assert!(m.ends_with(&format!("past end of file ({n} bytes)")), "{m}");
}

#[test]
fn file_size_larger_than_bytes() {
    // Claiming a bigger file than the bytes given must not read past the slice.
    let mut r = Raw::header(3, 0, 1);
    r.str("abc").u32(4).u8(1);
    let e = GgufHeader::parse(&r.0, 1 << 40).unwrap_err();
    assert!(e.to_string().contains("bytes given"), "{e}");
}

#[test]
fn overlapping_tensors() {
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[16], 0, 0)
        .tensor("b", &[8], 0, 32)
        .pad(32)
        .zeros(64);
    let m = malformed(err(&r));
    assert!(
        m.contains("'b'") && m.contains("overlaps tensor 'a'"),
        "{m}"
    );
    // Out of file order but disjoint is fine.
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[8], 0, 32)
        .tensor("b", &[8], 0, 0)
        .pad(32)
        .zeros(64);
    let h = r.parse().unwrap();
    assert!(h.tensors[0].offset > h.tensors[1].offset);
}
