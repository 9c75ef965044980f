//! Writer → reader round trips, getters, layer views, and writer validation.

mod common;

use common::*;
use flea_gguf::{GgmlType, GgufError, GgufFile, GgufHeader, GgufWriter, MetaValue};

fn temp_path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("flea-gguf-test-{}-{tag}.gguf", std::process::id()))
}

fn check_round_trip(version: u32, alignment: u64) {
    let w = sample_writer(version, alignment);
    let bytes = write(&w);
    let h = GgufHeader::parse(&bytes, bytes.len() as u64).unwrap();
    assert_eq!(h.version, version);
    assert_eq!(h.alignment, alignment);
    assert_eq!(h.file_size, bytes.len() as u64);
    assert_eq!(h.data_offset % alignment, 0);

    // Metadata: exactly what was added, in order, plus general.alignment if not default.
    let mut want = every_value_type();
    if alignment != 32 {
        want.push(("general.alignment".into(), MetaValue::U32(alignment as u32)));
    }
    assert_eq!(h.metadata, want);

    // Tensors: names, dims, types, sizes, data, and the writer's own layout.
    assert_eq!(h.tensors, w.layout().unwrap());
    let specs = sample_tensor_specs();
    assert_eq!(h.tensors.len(), specs.len());
    for (i, ((name, dims, ty), t)) in specs.iter().zip(&h.tensors).enumerate() {
        assert_eq!(&t.name, name);
        assert_eq!(&t.dims, dims);
        assert_eq!(t.ty, *ty);
        assert_eq!(t.offset % alignment, 0);
        let data = &bytes[t.offset as usize..t.end() as usize];
        assert_eq!(data, &pattern(t.size as usize, i as u8)[..]);
    }

    // The same through a real file and mmap.
    let path = temp_path(&format!("rt-{version}-{alignment}"));
    w.write_file(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.bytes(), &bytes[..]);
    assert_eq!(f.header.metadata, h.metadata);
    for (i, t) in f.header.tensors.iter().enumerate() {
        assert_eq!(f.tensor_data(t), &pattern(t.size as usize, i as u8)[..]);
        assert_eq!(f.tensor_data_by_name(&t.name).unwrap(), f.tensor_data(t));
    }
    drop(f);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn round_trip_v3_default_alignment() {
    check_round_trip(3, 32);
}

#[test]
fn round_trip_v2() {
    check_round_trip(2, 32);
}

#[test]
fn round_trip_other_alignments() {
    for a in [1, 8, 64, 4096] {
        check_round_trip(3, a);
    }
    check_round_trip(2, 16);
}

#[test]
fn empty_file_round_trip() {
    let w = GgufWriter::new(3, 32);
    let bytes = write(&w);
    let h = GgufHeader::parse(&bytes, bytes.len() as u64).unwrap();
    assert!(h.metadata.is_empty() && h.tensors.is_empty());
    assert_eq!(h.n_layers(), 0);
    assert!(h.layer_view(0).is_none());
}

#[test]
fn alignment_metadata_of_any_integer_type_is_accepted() {
    let mut w = GgufWriter::new(3, 64);
    w.add_meta("general.alignment", MetaValue::U64(64));
    w.add_tensor("a", &[3], GgmlType::F32, vec![0; 12]).unwrap();
    w.add_tensor("b", &[3], GgmlType::F32, vec![1; 12]).unwrap();
    let bytes = write(&w);
    let h = GgufHeader::parse(&bytes, bytes.len() as u64).unwrap();
    assert_eq!(h.alignment, 64);
    assert_eq!(h.metadata.len(), 1);
    assert_eq!(h.tensors[1].offset - h.tensors[0].offset, 64);
}

#[test]
fn deferred_tensors_are_filled_by_callback() {
    let mut w = GgufWriter::new(3, 32);
    w.add_meta("general.architecture", "llama".into());
    w.add_tensor("a", &[4], GgmlType::F32, pattern(16, 9))
        .unwrap();
    assert_eq!(
        w.add_tensor_deferred("b", &[64, 3], GgmlType::Q4_1)
            .unwrap(),
        120
    );
    w.add_tensor_deferred("c", &[2], GgmlType::F16).unwrap();
    assert_eq!(w.n_tensors(), 3);

    // write_to refuses deferred tensors.
    let err = w.write_to(Vec::new()).unwrap_err();
    assert!(matches!(err, GgufError::Invalid(_)), "{err}");
    assert!(err.to_string().contains("'b'"), "{err}");

    let mut calls = Vec::new();
    let mut out = Vec::new();
    w.write_with(&mut out, |i, buf| {
        assert!(buf.iter().all(|&b| b == 0));
        calls.push((i, buf.len()));
        buf.copy_from_slice(&pattern(buf.len(), i as u8));
        Ok(())
    })
    .unwrap();
    assert_eq!(calls, vec![(1, 120), (2, 4)]);
    let h = GgufHeader::parse(&out, out.len() as u64).unwrap();
    for (i, t) in h.tensors.iter().enumerate() {
        let want = pattern(t.size as usize, if i == 0 { 9 } else { i as u8 });
        assert_eq!(&out[t.offset as usize..t.end() as usize], &want[..]);
    }

    // A callback error aborts the write.
    let err = w
        .write_with(Vec::new(), |_, _| Err(GgufError::Invalid("no".into())))
        .unwrap_err();
    assert!(matches!(err, GgufError::Invalid(_)));

    // Streaming to a file.
    let path = temp_path("deferred");
    w.write_file_with(&path, |_, buf| {
        buf.fill(7);
        Ok(())
    })
    .unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert!(f.tensor_data_by_name("b").unwrap().iter().all(|&b| b == 7));
    drop(f);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn writer_rejects_invalid_input() {
    let mut w = GgufWriter::new(3, 32);
    let inv = |r: flea_gguf::Result<()>| match r {
        Err(GgufError::Invalid(m)) => m,
        other => panic!("expected Invalid, got {other:?}"),
    };
    // Row length not a multiple of the block size.
    let m = inv(w.add_tensor("x", &[33], GgmlType::Q8_0, vec![0; 34]));
    assert!(m.contains("block size"), "{m}");
    // Wrong data length.
    let m = inv(w.add_tensor("x", &[32], GgmlType::Q8_0, vec![0; 33]));
    assert!(m.contains("34"), "{m}");
    // No dims, too many dims, zero dim, overflow.
    inv(w.add_tensor("x", &[], GgmlType::F32, vec![]));
    inv(w.add_tensor("x", &[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4]));
    inv(w.add_tensor("x", &[4, 0], GgmlType::F32, vec![]));
    inv(w
        .add_tensor_deferred("x", &[u64::MAX / 2, 4], GgmlType::F32)
        .map(drop));
    // Duplicate names.
    w.add_tensor("x", &[1], GgmlType::F32, vec![0; 4]).unwrap();
    let m = inv(w.add_tensor("x", &[1], GgmlType::F32, vec![0; 4]));
    assert!(m.contains("duplicate"), "{m}");

    // Bad version or alignment fails at write time.
    for (v, a) in [(1, 32), (4, 32), (3, 0), (3, 48), (3, 1 << 33)] {
        let w = GgufWriter::new(v, a);
        inv(w.write_to(Vec::new()));
    }
    // Heterogeneous array.
    let mut w = GgufWriter::new(3, 32);
    w.add_meta(
        "a",
        MetaValue::Array(vec![MetaValue::U8(1), MetaValue::I8(1)]),
    );
    let m = inv(w.write_to(Vec::new()));
    assert!(m.contains("'a'") && m.contains("homogeneous"), "{m}");
    // general.alignment disagreeing with the writer.
    let mut w = GgufWriter::new(3, 32);
    w.add_meta("general.alignment", MetaValue::U32(64));
    inv(w.write_to(Vec::new()));
}

#[test]
fn add_meta_replaces_existing_key() {
    let mut w = GgufWriter::new(3, 32);
    w.add_meta("a", MetaValue::U32(1));
    w.add_meta("b", MetaValue::U32(2));
    w.add_meta("a", MetaValue::U32(3));
    let bytes = write(&w);
    let h = GgufHeader::parse(&bytes, bytes.len() as u64).unwrap();
    assert_eq!(
        h.metadata,
        vec![
            ("a".into(), MetaValue::U32(3)),
            ("b".into(), MetaValue::U32(2))
        ]
    );
}

#[test]
fn getters() {
    let bytes = write(&sample_writer(3, 32));
    let h = GgufHeader::parse(&bytes, bytes.len() as u64).unwrap();
    let is_meta_err = |r: Result<(), GgufError>| matches!(r, Err(GgufError::Metadata { .. }));

    assert_eq!(h.get("t.u8"), Some(&MetaValue::U8(200)));
    assert_eq!(h.get("missing"), None);
    // get_u32 takes any integer type that fits.
    assert_eq!(h.get_u32("t.u8").unwrap(), Some(200));
    assert_eq!(h.get_u32("t.u16").unwrap(), Some(60000));
    assert_eq!(h.get_u32("t.u32").unwrap(), Some(4_000_000_000));
    assert_eq!(h.get_u32("missing").unwrap(), None);
    assert!(is_meta_err(h.get_u32("t.i8").map(drop))); // negative
    assert!(is_meta_err(h.get_u32("t.u64").map(drop))); // too big
    assert!(is_meta_err(h.get_u32("t.f32").map(drop)));
    assert!(is_meta_err(h.get_u32("t.string").map(drop)));
    assert_eq!(h.get_u64("t.u64").unwrap(), Some(u64::MAX));
    assert!(is_meta_err(h.get_u64("t.i64").map(drop)));
    assert_eq!(h.get_i32("t.i16").unwrap(), Some(-30000));
    // get_f32 takes f32 and f64.
    assert_eq!(h.get_f32("t.f32").unwrap(), Some(3.5));
    assert_eq!(h.get_f32("t.f64").unwrap(), Some(f32::NEG_INFINITY));
    assert!(is_meta_err(h.get_f32("t.u32").map(drop)));
    assert_eq!(h.get_bool("t.bool").unwrap(), Some(true));
    assert_eq!(h.get_bool("t.bool_false").unwrap(), Some(false));
    assert!(is_meta_err(h.get_bool("t.u8").map(drop)));
    assert_eq!(h.get_str("t.string").unwrap(), Some("héllo ▁world"));
    assert!(is_meta_err(h.get_str("t.arr_str").map(drop)));
    assert_eq!(h.get_array("t.arr_u8").unwrap().unwrap().len(), 3);
    assert!(is_meta_err(h.get_array("t.u8").map(drop)));
    // Typed arrays.
    assert_eq!(
        h.get_str_array("t.arr_str").unwrap().unwrap(),
        vec!["a", "", "日本"]
    );
    assert!(is_meta_err(h.get_str_array("t.arr_u8").map(drop)));
    assert!(is_meta_err(h.get_str_array("t.string").map(drop)));
    assert_eq!(
        h.get_f32_array("t.arr_f32").unwrap().unwrap(),
        vec![0.25, -2.0]
    );
    assert_eq!(h.get_f32_array("t.arr_f64").unwrap().unwrap(), vec![0.5]);
    assert!(is_meta_err(h.get_f32_array("t.arr_i32").map(drop)));
    assert_eq!(
        h.get_i32_array("t.arr_i32").unwrap().unwrap(),
        vec![-1, 0, 7]
    );
    assert_eq!(h.get_i32_array("t.arr_u8").unwrap().unwrap(), vec![1, 2, 3]);
    assert!(is_meta_err(h.get_i32_array("t.arr_u64").map(drop))); // 1<<40 too big
    assert_eq!(h.get_u32_array("t.arr_u8").unwrap().unwrap(), vec![1, 2, 3]);
    assert!(h.get_i32_array("t.arr_empty").unwrap().unwrap().is_empty());
    assert_eq!(h.get_str_array("missing").unwrap(), None);

    // Error messages name the key and element.
    let e = h.get_i32_array("t.arr_u64").unwrap_err().to_string();
    assert!(e.contains("t.arr_u64") && e.contains("element 1"), "{e}");
    assert!(!e.contains('\n'));
}

#[test]
fn tensors_and_layers() {
    let bytes = write(&sample_writer(3, 32));
    let h = GgufHeader::parse(&bytes, bytes.len() as u64).unwrap();
    assert_eq!(h.n_layers(), 2);
    let t = h.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(t.ty, GgmlType::Q4_0);
    assert_eq!(t.n_elements(), 128);
    assert_eq!(t.size, 2 * 2 * 18);
    assert!(h.tensor("nope").is_none());
    assert!(matches!(
        h.require_tensor("nope"),
        Err(GgufError::MissingTensor(_))
    ));

    let v0 = h.layer_view(0).unwrap();
    assert_eq!(v0.layer, 0);
    assert_eq!(v0.tensors, vec![1, 2]);
    assert_eq!(v0.start, h.tensors[1].offset);
    assert_eq!(v0.end, h.tensors[2].end());
    assert_eq!(v0.bytes, h.tensors[1].size + h.tensors[2].size);
    let v1 = h.layer_view(1).unwrap();
    assert_eq!(v1.tensors, vec![3, 4]);
    assert!(h.layer_view(2).is_none());

    // Layers need not be contiguous: n_layers counts distinct indices.
    let mut w = GgufWriter::new(3, 32);
    for name in [
        "blk.0.a", "blk.5.a", "blk.5.b", "blkx.1.a", "blk.7", "blk.x.a",
    ] {
        w.add_tensor(name, &[1], GgmlType::F32, vec![0; 4]).unwrap();
    }
    let bytes = write(&w);
    let h = GgufHeader::parse(&bytes, bytes.len() as u64).unwrap();
    assert_eq!(h.n_layers(), 2);
    assert_eq!(h.layer_view(5).unwrap().tensors, vec![1, 2]);
}

#[test]
fn open_errors() {
    let path = temp_path("does-not-exist");
    let err = GgufFile::open(&path).unwrap_err();
    assert!(matches!(err, GgufError::Io { .. }));
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );

    let path = temp_path("empty");
    std::fs::write(&path, b"").unwrap();
    let err = GgufFile::open(&path).unwrap_err();
    assert!(matches!(err, GgufError::Truncated(_)), "{err}");
    std::fs::remove_file(&path).unwrap();

    let path = temp_path("not-gguf");
    std::fs::write(&path, b"PK\x03\x04 this is a zip").unwrap();
    let err = GgufFile::open(&path).unwrap_err();
    assert!(matches!(err, GgufError::BadMagic(_)), "{err}");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn tensor_data_of_foreign_info_is_empty_not_panic() {
    let path = temp_path("foreign");
    sample_writer(3, 32).write_file(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let mut t = f.header.tensors[0].clone();
    t.offset = u64::MAX - 1;
    assert!(f.tensor_data(&t).is_empty());
    t.offset = f.header.file_size;
    t.size = 1;
    assert!(f.tensor_data(&t).is_empty());
    drop(f);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn parse_from_header_prefix() {
    // A prefix holding the whole header parses; tensor extents are checked against the
    // stated file size.
    let bytes = write(&sample_writer(3, 32));
    let h = GgufHeader::parse(&bytes, bytes.len() as u64).unwrap();
    let prefix = &bytes[..h.data_offset as usize];
    let h2 = GgufHeader::parse(prefix, bytes.len() as u64).unwrap();
    assert_eq!(h2.tensors, h.tensors);
    let err = GgufHeader::parse(prefix, prefix.len() as u64).unwrap_err();
    assert!(matches!(err, GgufError::Truncated(_)), "{err}");
}
