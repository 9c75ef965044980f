//! Checks against real model files from the model cache (`flea_gguf::models_dir()`).
//! A missing file is a skip, unless `FLEA_REQUIRE_MODELS=1`, when it is a failure.

use flea_gguf::{model_or_skip, model_path, GgmlType, GgufFile};

#[test]
fn smollm2_135m_q4_1() {
    let Some(path) = model_or_skip("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    let h = &f.header;
    assert_eq!(h.n_layers(), 30);
    assert_eq!(h.get_str("general.architecture").unwrap(), Some("llama"));
    assert_eq!(h.get_u32("llama.embedding_length").unwrap(), Some(576));
    assert_eq!(h.get_u32("llama.block_count").unwrap(), Some(30));
    assert!(h.tensor("output.weight").is_none());
    let emb = h.tensor("token_embd.weight").unwrap();
    assert_eq!(emb.ty, GgmlType::Q8_0);
    assert_eq!(emb.dims, vec![576, 49152]);
    assert_eq!(emb.size, 576 / 32 * 34 * 49152);
    assert_eq!(f.tensor_data(emb).len() as u64, emb.size);
    assert_eq!(
        f.tensor_data_by_name("token_embd.weight").unwrap().len() as u64,
        emb.size
    );

    let tokens = h.get_str_array("tokenizer.ggml.tokens").unwrap().unwrap();
    assert_eq!(tokens.len(), 49152);
    assert!(h.get_str("llama.embedding_length").is_err());

    // Every layer has the same tensor set and the views tile the layer data.
    let first = h.layer_view(0).unwrap();
    for l in 0..30 {
        let v = h.layer_view(l).unwrap();
        assert_eq!(v.tensors.len(), first.tensors.len());
        assert!(v.bytes <= v.end - v.start);
        for &i in &v.tensors {
            assert!(h.tensors[i].name.starts_with(&format!("blk.{l}.")));
        }
    }
    assert!(h.layer_view(30).is_none());
    for t in &h.tensors {
        assert_eq!(t.offset % h.alignment, 0);
        assert!(t.end() <= h.file_size);
    }
}

#[test]
fn other_cached_models_parse() {
    // Not required: parse whatever other models are present, to exercise more writers.
    for name in [
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        "gemma-3-270m.Q4_K_M.gguf",
    ] {
        let path = model_path(name);
        if !path.exists() {
            eprintln!("skipping: {} not found", path.display());
            continue;
        }
        let f = GgufFile::open(&path).unwrap();
        let h = &f.header;
        let arch = h.get_str("general.architecture").unwrap().unwrap();
        let blocks = h.get_u32(&format!("{arch}.block_count")).unwrap().unwrap();
        assert_eq!(h.n_layers(), blocks as usize, "{name}");
        let tokens = h.get_str_array("tokenizer.ggml.tokens").unwrap().unwrap();
        assert!(tokens.len() > 1000, "{name}");
        for t in &h.tensors {
            assert_eq!(f.tensor_data(t).len() as u64, t.size);
        }
    }
}
