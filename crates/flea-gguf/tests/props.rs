//! Hostile-input properties: truncations and random corruption never panic, and whatever
//! parses is internally consistent.

mod common;

use common::*;
use flea_gguf::GgufHeader;
use proptest::prelude::*;

/// Parse, and if it succeeds, exercise everything a caller might touch and check the
/// invariants the reader promises.
fn parse_and_check(bytes: &[u8]) -> bool {
    let Ok(h) = GgufHeader::parse(bytes, bytes.len() as u64) else {
        return false;
    };
    assert!(h.alignment.is_power_of_two());
    assert_eq!(h.data_offset % h.alignment, 0);
    let mut names = std::collections::HashSet::new();
    for t in &h.tensors {
        assert!(names.insert(t.name.as_str()), "duplicate name parsed");
        assert!(t.end() <= bytes.len() as u64);
        assert!(t.offset >= h.data_offset);
        assert_eq!((t.offset - h.data_offset) % h.alignment, 0);
        assert!((1..=4).contains(&t.dims.len()));
        assert!(bytes.get(t.offset as usize..t.end() as usize).is_some());
        let _ = t.n_elements();
    }
    for (k, _) in &h.metadata {
        let _ = h.get_u32(k);
        let _ = h.get_f32(k);
        let _ = h.get_str_array(k);
        let _ = h.get_i32_array(k);
    }
    for l in 0..h.n_layers() + 2 {
        if let Some(v) = h.layer_view(l) {
            assert!(v.start <= v.end && v.bytes <= v.end - v.start);
        }
    }
    true
}

#[test]
fn truncation_at_every_position_is_an_error() {
    let (bytes, _) = small_file();
    assert!(parse_and_check(&bytes));
    for n in 0..bytes.len() {
        let prefix = &bytes[..n];
        match GgufHeader::parse(prefix, n as u64) {
            Ok(_) => panic!("prefix of {n} of {} bytes parsed", bytes.len()),
            Err(e) => assert!(!e.to_string().contains('\n')),
        }
    }
}

#[test]
fn truncated_sample_writer_files_are_errors() {
    // The bigger sample (every value type, nested arrays), truncated before its last
    // tensor ends.
    for (v, a) in [(3, 32), (2, 64)] {
        let bytes = write(&sample_writer(v, a));
        let h = GgufHeader::parse(&bytes, bytes.len() as u64).unwrap();
        let end = h.tensors.iter().map(|t| t.end()).max().unwrap() as usize;
        for n in 0..end {
            assert!(
                GgufHeader::parse(&bytes[..n], n as u64).is_err(),
                "prefix {n}"
            );
        }
    }
}

/// A region index (header, metadata, tensor infos, padding, data) and a position in it.
fn region_and_pos() -> impl Strategy<Value = (usize, prop::sample::Index)> {
    (0usize..5, any::<prop::sample::Index>())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn bit_flip_in_any_region_never_panics((region, idx) in region_and_pos(), bit in 0u8..8) {
        let (mut bytes, regions) = small_file();
        let (s, e) = regions[region];
        let pos = s + idx.index(e - s);
        bytes[pos] ^= 1 << bit;
        let ok = parse_and_check(&bytes);
        // Flips in the data section and the padding are invisible to the parser.
        if region >= 3 {
            prop_assert!(ok);
        }
    }

    #[test]
    fn byte_overwrite_in_any_region_never_panics(
        (region, idx) in region_and_pos(),
        value in prop_oneof![Just(0u8), Just(0xff), Just(0x80), Just(0x7f), any::<u8>()],
    ) {
        let (mut bytes, regions) = small_file();
        let (s, e) = regions[region];
        bytes[s + idx.index(e - s)] = value;
        parse_and_check(&bytes);
    }

    #[test]
    fn multi_byte_corruption_never_panics(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let (mut bytes, _) = small_file();
        for (i, v) in edits {
            let p = i.index(bytes.len());
            bytes[p] = v;
        }
        if do_cut {
            let n = cut.index(bytes.len() + 1);
            bytes.truncate(n);
        }
        parse_and_check(&bytes);
    }

    #[test]
    fn u64_fields_set_to_extremes_never_panic(
        idx in any::<prop::sample::Index>(),
        value in prop_oneof![
            Just(u64::MAX), Just(u64::MAX - 1), Just(1u64 << 63), Just(1u64 << 32),
            Just(0u64), Just(1u64), any::<u64>(),
        ],
    ) {
        // Overwrite 8 bytes anywhere in the header part: hits counts, lengths, dims and
        // offsets with huge values.
        let (mut bytes, regions) = small_file();
        let header_end = regions[2].1;
        let p = idx.index(header_end - 7);
        bytes[p..p + 8].copy_from_slice(&value.to_le_bytes());
        parse_and_check(&bytes);
    }

    #[test]
    fn random_bytes_after_valid_prefix_never_panic(
        tail in prop::collection::vec(any::<u8>(), 0..512),
        version in prop_oneof![Just(2u32), Just(3u32)],
        n_tensors in 0u64..4,
        n_kv in 0u64..4,
    ) {
        let mut r = Raw::header(version, n_tensors, n_kv);
        r.bytes(&tail);
        parse_and_check(&r.0);
    }
}
