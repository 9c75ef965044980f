//! Shared helpers for the integration tests: sample files built with the writer, and a
//! raw byte builder for hand-made (malformed) files.
#![allow(dead_code)]

use flea_gguf::{GgmlType, GgufHeader, GgufWriter, MetaValue};

/// Deterministic pseudo-random bytes.
pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// One value of every type, including nested and empty arrays.
pub fn every_value_type() -> Vec<(String, MetaValue)> {
    use MetaValue::*;
    let v = vec![
        ("t.u8", U8(200)),
        ("t.i8", I8(-100)),
        ("t.u16", U16(60000)),
        ("t.i16", I16(-30000)),
        ("t.u32", U32(4_000_000_000)),
        ("t.i32", I32(-2_000_000_000)),
        ("t.f32", F32(3.5)),
        ("t.bool", Bool(true)),
        ("t.bool_false", Bool(false)),
        ("t.string", String("héllo ▁world".into())),
        ("t.empty_string", String("".into())),
        ("t.u64", U64(u64::MAX)),
        ("t.i64", I64(i64::MIN)),
        ("t.f64", F64(-1e300)),
        ("t.arr_u8", Array(vec![U8(1), U8(2), U8(3)])),
        ("t.arr_i32", Array(vec![I32(-1), I32(0), I32(7)])),
        ("t.arr_f32", Array(vec![F32(0.25), F32(-2.0)])),
        ("t.arr_f64", Array(vec![F64(0.5)])),
        ("t.arr_bool", Array(vec![Bool(false), Bool(true)])),
        (
            "t.arr_str",
            Array(vec![
                String("a".into()),
                String("".into()),
                String("日本".into()),
            ]),
        ),
        ("t.arr_u64", Array(vec![U64(1), U64(1 << 40)])),
        ("t.arr_empty", Array(vec![])),
        (
            "t.arr_nested",
            Array(vec![
                Array(vec![U16(1), U16(2)]),
                Array(vec![String("x".into())]),
                Array(vec![]),
                Array(vec![Array(vec![I8(-1)]), Array(vec![])]),
            ]),
        ),
        ("general.name", String("test".into())),
    ];
    v.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// (name, dims, type) of the sample tensors, several types and ranks.
pub fn sample_tensor_specs() -> Vec<(&'static str, Vec<u64>, GgmlType)> {
    vec![
        ("token_embd.weight", vec![32, 4], GgmlType::Q8_0),
        ("blk.0.attn_q.weight", vec![64, 2], GgmlType::Q4_0),
        ("blk.0.attn_norm.weight", vec![7], GgmlType::F32),
        ("blk.1.ffn_up.weight", vec![256, 1, 1], GgmlType::Q4_K),
        ("blk.1.attn_norm.weight", vec![5, 3], GgmlType::F16),
        ("output_norm.weight", vec![3, 2, 2, 1], GgmlType::I32),
    ]
}

/// A writer holding every value type and the sample tensors.
pub fn sample_writer(version: u32, alignment: u64) -> GgufWriter {
    let mut w = GgufWriter::new(version, alignment);
    for (k, v) in every_value_type() {
        w.add_meta(&k, v);
    }
    for (i, (name, dims, ty)) in sample_tensor_specs().into_iter().enumerate() {
        let size = ty.row_bytes(dims[0]).unwrap() * dims[1..].iter().product::<u64>();
        w.add_tensor(name, &dims, ty, pattern(size as usize, i as u8))
            .unwrap();
    }
    w
}

pub fn write(w: &GgufWriter) -> Vec<u8> {
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    out
}

/// A small valid file with a few metadata entries and two tensors, whose last tensor
/// ends exactly at the end of the file (so every strict prefix is invalid).
/// Returns the bytes and the region boundaries [header, metadata, tensor infos, padding,
/// data] as (start, end) pairs.
pub fn small_file() -> (Vec<u8>, [(usize, usize); 5]) {
    let mut w = GgufWriter::new(3, 32);
    w.add_meta("general.architecture", MetaValue::String("llama".into()));
    w.add_meta("llama.block_count", MetaValue::U32(1));
    w.add_meta(
        "tokenizer.ggml.tokens",
        MetaValue::Array(vec![
            MetaValue::String("<s>".into()),
            MetaValue::String("a".into()),
        ]),
    );
    w.add_meta("t.f32", MetaValue::F32(1.5));
    w.add_meta(
        "t.nested",
        MetaValue::Array(vec![MetaValue::Array(vec![MetaValue::I16(3)])]),
    );
    w.add_tensor(
        "blk.0.attn_q.weight",
        &[32, 2],
        GgmlType::Q8_0,
        pattern(68, 1),
    )
    .unwrap();
    w.add_tensor("output_norm.weight", &[8], GgmlType::F32, pattern(32, 2))
        .unwrap();
    let bytes = write(&w);
    let h = GgufHeader::parse(&bytes, bytes.len() as u64).unwrap();
    let last = h.tensors.last().unwrap();
    assert_eq!(
        last.end(),
        bytes.len() as u64,
        "sample must end at its last tensor"
    );
    let meta_end = 24
        + h.metadata
            .iter()
            .map(|(k, v)| 8 + k.len() + 4 + encoded_len(v))
            .sum::<usize>();
    let infos_end = meta_end
        + h.tensors
            .iter()
            .map(|t| 8 + t.name.len() + 4 + 8 * t.dims.len() + 4 + 8)
            .sum::<usize>();
    let data = h.data_offset as usize;
    assert!(infos_end < data, "sample needs some padding");
    (
        bytes.clone(),
        [
            (0, 24),
            (24, meta_end),
            (meta_end, infos_end),
            (infos_end, data),
            (data, bytes.len()),
        ],
    )
}

/// Encoded size of a value body (without its type id).
pub fn encoded_len(v: &MetaValue) -> usize {
    use MetaValue::*;
    match v {
        U8(_) | I8(_) | Bool(_) => 1,
        U16(_) | I16(_) => 2,
        U32(_) | I32(_) | F32(_) => 4,
        U64(_) | I64(_) | F64(_) => 8,
        String(s) => 8 + s.len(),
        Array(a) => 12 + a.iter().map(encoded_len).sum::<usize>(),
    }
}

/// Builds raw GGUF bytes by hand, for malformed files the writer refuses to produce.
#[derive(Default)]
pub struct Raw(pub Vec<u8>);

impl Raw {
    /// Magic, version and the two counts.
    pub fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        let mut r = Raw::default();
        r.bytes(b"GGUF").u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Raw {
        self.0.extend_from_slice(b);
        self
    }
    pub fn u8(&mut self, v: u8) -> &mut Raw {
        self.bytes(&[v])
    }
    pub fn u32(&mut self, v: u32) -> &mut Raw {
        self.bytes(&v.to_le_bytes())
    }
    pub fn u64(&mut self, v: u64) -> &mut Raw {
        self.bytes(&v.to_le_bytes())
    }
    pub fn str(&mut self, s: &str) -> &mut Raw {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    /// A uint32 KV.
    pub fn kv_u32(&mut self, key: &str, v: u32) -> &mut Raw {
        self.str(key).u32(4).u32(v)
    }
    /// A tensor info.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Raw {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Zero padding up to a multiple of `a`.
    pub fn pad(&mut self, a: usize) -> &mut Raw {
        while !self.0.len().is_multiple_of(a) {
            self.0.push(0);
        }
        self
    }
    pub fn zeros(&mut self, n: usize) -> &mut Raw {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    pub fn parse(&self) -> flea_gguf::Result<GgufHeader> {
        GgufHeader::parse(&self.0, self.0.len() as u64)
    }
}
