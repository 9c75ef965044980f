//! Fuzz the GGUF header parser: it must never panic, and whatever it accepts must be
//! self-consistent (every tensor inside the input, layer views well-formed).
#![no_main]

use flea_gguf::GgufHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = GgufHeader::parse(data, data.len() as u64) else {
        return;
    };
    for (key, value) in &h.metadata {
        let _ = h.get(key);
        let _ = h.get_u32(key);
        let _ = h.get_u64(key);
        let _ = h.get_f32(key);
        let _ = h.get_bool(key);
        let _ = h.get_str(key);
        let _ = h.get_str_array(key);
        let _ = h.get_f32_array(key);
        let _ = h.get_i32_array(key);
        let _ = value.type_name();
    }
    for t in &h.tensors {
        assert!(data.get(t.offset as usize..t.end() as usize).is_some());
        assert!(h.tensor(&t.name).is_some());
        let _ = t.n_elements();
        if let Some(l) = t.layer() {
            let v = h.layer_view(l).expect("layer of a tensor has a view");
            assert!(v.start <= v.end && v.bytes <= v.end - v.start);
        }
    }
    let _ = h.n_layers();
});
