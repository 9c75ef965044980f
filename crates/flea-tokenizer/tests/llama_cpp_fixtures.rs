//! Token ids must be identical to llama.cpp's for every fixture case
//! (tests/fixtures/tokens/*.json, made by scripts/gen_token_fixtures.py).
//!
//! The GGUF files live in `${FLEA_MODELS:-$HOME/.cache/flea/models}`. A missing model is a
//! skip (with a note) unless `FLEA_REQUIRE_MODELS=1`. `FLEA_TOKEN_FIXTURES=<dir>` checks
//! fixtures from another directory instead.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use flea_gguf::GgufFile;
use flea_tokenizer::{Tokenizer, VocabParts};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    model: String,
    /// Byte size of the model file the fixture was made from (a cheap identity check).
    size: Option<u64>,
    /// Set for variant fixtures: llama.cpp ran this vocabulary with these metadata keys
    /// replaced.
    overrides: Option<BTreeMap<String, serde_json::Value>>,
    /// llama.cpp's view of the vocabulary (absent in ad-hoc fixture sets).
    vocab: Option<VocabInfo>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct VocabInfo {
    n_tokens: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    eog_ids: Vec<u32>,
    control_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    add_special: bool,
    parse_special: bool,
    ids: Vec<u32>,
    /// llama.cpp's token_to_piece(special) spelling of `ids`, when it differs from `text`.
    detok_hex: Option<String>,
}

fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FLEA_MODELS") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    PathBuf::from(home).join(".cache/flea/models")
}

fn require_models() -> bool {
    std::env::var("FLEA_REQUIRE_MODELS").is_ok_and(|v| v == "1")
}

fn fixture(stem: &str) -> Fixture {
    // FLEA_TOKEN_FIXTURES points at another directory of fixtures in the same format
    // (e.g. a larger differential-fuzzing corpus made with gen_token_fixtures.py --out).
    let dir = std::env::var_os("FLEA_TOKEN_FIXTURES").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokens"),
        PathBuf::from,
    );
    let path = dir.join(format!("{stem}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The tokenizer of `file`, or None (skip) when the model is absent.
fn load(file: &str) -> Option<Tokenizer> {
    load_with(file, None, None)
}

fn load_with(
    file: &str,
    overrides: Option<&BTreeMap<String, serde_json::Value>>,
    size: Option<u64>,
) -> Option<Tokenizer> {
    let path = models_dir().join(file);
    if !path.exists() {
        assert!(
            !require_models(),
            "FLEA_REQUIRE_MODELS=1 but {} is missing",
            path.display()
        );
        eprintln!("SKIP: {} not found", path.display());
        return None;
    }
    if let (Some(want), Ok(meta)) = (size, std::fs::metadata(&path)) {
        assert_eq!(
            meta.len(),
            want,
            "{} is not the file the fixtures were made from (regenerate them with \
             scripts/gen_token_fixtures.py)",
            path.display()
        );
    }
    let t0 = Instant::now();
    let gguf = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut parts =
        VocabParts::from_gguf(&gguf.header).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for (key, value) in overrides.into_iter().flatten() {
        let flag = || {
            value
                .as_bool()
                .unwrap_or_else(|| panic!("{key}: not a bool"))
        };
        match key.as_str() {
            "tokenizer.ggml.pre" => parts.pre = value.as_str().map(str::to_string),
            "tokenizer.ggml.add_bos_token" => parts.add_bos = Some(flag()),
            "tokenizer.ggml.add_eos_token" => parts.add_eos = Some(flag()),
            "tokenizer.ggml.add_space_prefix" => parts.add_space_prefix = Some(flag()),
            other => panic!("fixture overrides unsupported key {other}"),
        }
    }
    let tok = Tokenizer::from_parts(parts).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    eprintln!("{file}: loaded in {:?}", t0.elapsed());
    Some(tok)
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

fn check_model(stem: &str) {
    let fx = fixture(stem);
    let Some(tok) = load_with(&fx.model, fx.overrides.as_ref(), fx.size) else {
        return;
    };
    if let Some(v) = &fx.vocab {
        assert_eq!(tok.n_vocab(), v.n_tokens, "n_vocab");
        assert_eq!(tok.bos(), v.bos, "bos");
        assert_eq!(tok.eos(), v.eos, "eos");
        assert_eq!(tok.pad(), v.pad, "pad");
        assert_eq!(tok.add_bos(), v.add_bos, "add_bos");
        assert_eq!(tok.add_eos(), v.add_eos, "add_eos");
        assert_eq!(tok.eog_ids(), v.eog_ids, "end-of-generation ids");
        let control: Vec<u32> = (0..tok.n_vocab() as u32)
            .filter(|&id| tok.is_control(id))
            .collect();
        assert_eq!(control, v.control_ids, "control token ids");
        // With several EOT-looking tokens llama.cpp's pick depends on hash-map order; we
        // only require ours to be one of them (every one of them is an EOG token).
        if tok.eot() != v.eot {
            eprintln!("note: eot {:?} (llama.cpp picked {:?})", tok.eot(), v.eot);
        }
        assert_eq!(tok.eot().is_some(), v.eot.is_some(), "eot presence");
        assert!(tok.eot().is_none_or(|e| tok.is_eog(e)));
    }
    let mut id_failures = Vec::new();
    let mut detok_failures = Vec::new();
    let mut roundtrips = 0;
    for (i, c) in fx.cases.iter().enumerate() {
        let ids = tok.encode(&c.text, c.add_special, c.parse_special);
        if ids != c.ids {
            id_failures.push(format!(
                "case {i} {:?} add_special={} parse_special={}\n   llama.cpp: {:?}\n   flea:      {:?}",
                c.text, c.add_special, c.parse_special, c.ids, ids
            ));
        }
        if !c.add_special {
            let want = match &c.detok_hex {
                Some(h) => hex(h),
                None => c.text.as_bytes().to_vec(),
            };
            let got: Vec<u8> = c.ids.iter().flat_map(|&id| tok.token_bytes(id)).collect();
            if got != want {
                detok_failures.push(format!("case {i} {:?}: pieces {:?}", c.text, got));
            }
            // Where llama.cpp round-trips the text, so must we.
            if c.detok_hex.is_none() {
                let back = tok.decode(&ids);
                if back != c.text {
                    detok_failures.push(format!(
                        "case {i} {:?}: decode(encode(text)) = {back:?}",
                        c.text
                    ));
                }
                roundtrips += 1;
            }
        }
    }
    eprintln!(
        "{}{}: {} cases checked, {} id mismatches, {} detokenization mismatches, {} round-trips",
        fx.model,
        fx.overrides
            .as_ref()
            .map(|o| format!(" with {o:?}"))
            .unwrap_or_default(),
        fx.cases.len(),
        id_failures.len(),
        detok_failures.len(),
        roundtrips
    );
    for f in id_failures.iter().chain(&detok_failures).take(15) {
        eprintln!("{f}");
    }
    assert!(id_failures.is_empty() && detok_failures.is_empty());
}

#[test]
fn smollm2_matches_llama_cpp() {
    check_model("SmolLM2-135M-Instruct.Q4_1");
}

#[test]
fn qwen25_coder_matches_llama_cpp() {
    check_model("Qwen2.5-Coder-0.5B-Instruct.Q4_K_M");
}

#[test]
fn gemma3_matches_llama_cpp() {
    check_model("gemma-3-270m.Q4_K_M");
}

// Configurations that none of the three models uses, on the same vocabularies.

#[test]
fn gpt2_pre_on_smollm2_vocab_matches_llama_cpp() {
    check_model("SmolLM2-135M-Instruct.Q4_1.pre-gpt-2");
}

#[test]
fn default_pre_on_smollm2_vocab_matches_llama_cpp() {
    check_model("SmolLM2-135M-Instruct.Q4_1.pre-default");
}

#[test]
fn llama3_pre_on_qwen_vocab_matches_llama_cpp() {
    check_model("Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.pre-llama-bpe");
}

#[test]
fn gpt2_pre_on_qwen_vocab_matches_llama_cpp() {
    check_model("Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.pre-gpt-2");
}

#[test]
fn bpe_add_bos_eos_matches_llama_cpp() {
    check_model("SmolLM2-135M-Instruct.Q4_1.add-bos-eos");
}

#[test]
fn spm_space_prefix_and_eos_matches_llama_cpp() {
    check_model("gemma-3-270m.Q4_K_M.space-prefix");
}

/// ~10 kB of mixed text must tokenize in well under 50 ms (no quadratic behaviour).
#[test]
fn ten_kilobytes_is_fast() {
    let mut text = String::new();
    let parts = [
        "The quick brown fox jumps over the lazy dog. ",
        "fn main() { println!(\"{}\", 1 + 2); }\n",
        "你好，世界！ 1234567890 ",
        "<|im_start|>user\n<start_of_turn> <bos>\t\t  ",
        "😀👨‍👩‍👧‍👦 naïve café ",
    ];
    let mut i = 0;
    while text.len() < 10_000 {
        text.push_str(parts[i % parts.len()]);
        i += 1;
    }
    let long_word = "a".repeat(10_000);
    let spaces = " ".repeat(10_000);
    for file in [
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        "gemma-3-270m.Q4_K_M.gguf",
    ] {
        let Some(tok) = load(file) else {
            continue;
        };
        for (what, t) in [
            ("mixed", &text),
            ("one word", &long_word),
            ("spaces", &spaces),
        ] {
            for parse_special in [false, true] {
                let t0 = Instant::now();
                let ids = tok.encode(t, true, parse_special);
                let dt = t0.elapsed();
                eprintln!(
                    "{file}: {what} {} bytes (parse_special={parse_special}) -> {} ids in {dt:?}",
                    t.len(),
                    ids.len()
                );
                // Generous bound: the machine running tests may be heavily shared.
                assert!(dt.as_millis() < 500, "{file}: {what} took {dt:?}");
            }
        }
    }
}
