//! Unit tests on small hand-built vocabularies.

use super::*;

fn bpe_vocab(pre: &str, extra_tokens: &[(&str, i32)], merges: &[&str]) -> Tokenizer {
    // All 256 byte characters, then the merge results, then extra (special) tokens.
    let table = bpe::byte_to_char_table();
    let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    let mut types = vec![1; 256];
    for m in merges {
        let t = m.replacen(' ', "", 1);
        if !tokens.contains(&t) {
            tokens.push(t);
            types.push(1);
        }
    }
    for (t, ty) in extra_tokens {
        tokens.push(t.to_string());
        types.push(*ty);
    }
    let eos = tokens
        .iter()
        .position(|t| t == "<|endoftext|>")
        .map(|i| i as u32);
    Tokenizer::from_parts(VocabParts {
        model: "gpt2".into(),
        pre: Some(pre.into()),
        tokens,
        token_types: Some(types),
        merges: merges.iter().map(|s| s.to_string()).collect(),
        bos: eos,
        eos,
        ..Default::default()
    })
    .expect("valid test vocab")
}

fn text_of(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&i| tok.token_text(i).unwrap_or("?").to_string())
        .collect()
}

#[test]
fn bpe_merges_and_roundtrip() {
    let tok = bpe_vocab(
        "gpt-2",
        &[("<|endoftext|>", 3)],
        &["Ġ w", "h e", "l l", "he ll", "hell o", "Ġw o"],
    );
    let ids = tok.encode("hello wo", false, false);
    assert_eq!(text_of(&tok, &ids), ["hello", "Ġwo"]);
    assert_eq!(tok.decode(&ids), "hello wo");
    // Non-ASCII goes through the byte mapping and back.
    let s = "héllo 😀\n";
    assert_eq!(tok.decode(&tok.encode(s, false, false)), s);
}

#[test]
fn bpe_special_tokens() {
    let tok = bpe_vocab(
        "smollm",
        &[("<|endoftext|>", 3), ("<|im_start|>", 3)],
        &["h e"],
    );
    let eot = tok.token_id("<|endoftext|>").unwrap();
    let ids = tok.encode("he<|endoftext|>", false, true);
    assert_eq!(text_of(&tok, &ids), ["he", "<|endoftext|>"]);
    let ids = tok.encode("he<|endoftext|>", false, false);
    assert!(!ids.contains(&eot));
    assert_eq!(tok.decode(&ids), "he<|endoftext|>");
    assert!(tok.is_eog(eot));
    assert_eq!(tok.eot(), Some(eot));
    // add_bos defaults to false for gpt2 vocabularies other than llama3.
    assert_eq!(tok.encode("", true, true), Vec::<u32>::new());
    assert_eq!(tok.token_bytes(eot), b"<|endoftext|>");
}

#[test]
fn llama3_ignore_merges_and_bos() {
    // "abc" is a token but no merge chain builds it: llama3 still emits it whole.
    let mut tok = bpe_vocab("llama-bpe", &[("<|endoftext|>", 3), ("abc", 1)], &["a b"]);
    assert_eq!(text_of(&tok, &tok.encode("abc", false, false)), ["abc"]);
    assert!(tok.add_bos());
    tok.ignore_merges = false;
    assert_eq!(text_of(&tok, &tok.encode("abc", false, false)), ["ab", "c"]);
}

fn spm_vocab(add_space_prefix: bool) -> Tokenizer {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0, 0.0, 0.0];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (t, s) in [
        ("▁", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("▁h", -3.0),
        ("he", -4.0),
        ("ll", -3.5),
        ("▁he", -5.0),
        ("▁hell", -6.0),
        ("▁hello", -7.0),
        ("<tag>", 0.0),
    ] {
        tokens.push(t.into());
        types.push(if t == "<tag>" { 4 } else { 1 });
        scores.push(s);
    }
    Tokenizer::from_parts(VocabParts {
        model: "llama".into(),
        tokens,
        scores: Some(scores),
        token_types: Some(types),
        add_space_prefix: Some(add_space_prefix),
        ..Default::default()
    })
    .expect("valid test vocab")
}

#[test]
fn spm_merges_by_score_with_byte_fallback() {
    let tok = spm_vocab(true);
    assert_eq!(tok.bos(), Some(1));
    let ids = tok.encode("hello", true, false);
    assert_eq!(text_of(&tok, &ids), ["<s>", "▁hello"]);
    // 'x' is unknown: spelled with byte tokens; "é" takes two.
    let ids = tok.encode("hx é", false, false);
    assert_eq!(
        text_of(&tok, &ids),
        ["▁h", "<0x78>", "▁", "<0xC3>", "<0xA9>"]
    );
    assert_eq!(tok.decode(&ids), " hx é");
    // User-defined tokens are split out even without parse_special, and the text after
    // a special token gets the space prefix again.
    let ids = tok.encode("he<tag>lo", false, false);
    assert_eq!(text_of(&tok, &ids), ["▁he", "<tag>", "▁", "l", "o"]);
    let no_prefix = spm_vocab(false);
    let ids = no_prefix.encode("hello", false, false);
    assert_eq!(text_of(&no_prefix, &ids), ["he", "ll", "o"]);
}

#[test]
fn metadata_errors_do_not_panic() {
    let base = VocabParts {
        model: "gpt2".into(),
        tokens: vec!["a".into(), "b".into()],
        merges: vec!["a b".into()],
        ..Default::default()
    };
    let err = |p: VocabParts| Tokenizer::from_parts(p).err().map(|e| e.to_string());
    assert!(err(VocabParts {
        model: "t5".into(),
        ..base.clone()
    })
    .unwrap()
    .contains("unsupported tokenizer model"));
    assert!(err(VocabParts {
        pre: Some("nope".into()),
        ..base.clone()
    })
    .unwrap()
    .contains("unsupported pre-tokenizer"));
    assert!(err(VocabParts {
        tokens: vec![],
        ..base.clone()
    })
    .is_some());
    assert!(err(VocabParts {
        tokens: vec!["a".into(), "a".into()],
        ..base.clone()
    })
    .is_some());
    assert!(err(VocabParts {
        token_types: Some(vec![1]),
        ..base.clone()
    })
    .is_some());
    assert!(err(VocabParts {
        scores: Some(vec![]),
        ..base.clone()
    })
    .is_some());
    assert!(err(VocabParts {
        merges: vec![],
        ..base.clone()
    })
    .is_some());
    // add_bos without a usable bos id (out of range ids fall back to disabled defaults).
    assert!(err(VocabParts {
        add_bos: Some(true),
        bos: Some(99),
        ..base.clone()
    })
    .is_some());
    let tok = Tokenizer::from_parts(base).unwrap();
    assert_eq!(tok.bos(), None);
    assert!(tok.token_bytes(1000).is_empty());
    assert_eq!(tok.token_text(1000), None);
}

#[test]
fn utf8_stream_holds_back_partial_sequences() {
    let mut s = Utf8Stream::default();
    let euro = "€".as_bytes(); // 3 bytes
    assert_eq!(s.push(b"a"), "a");
    assert_eq!(s.push(&euro[..1]), "");
    assert_eq!(s.push(&euro[1..2]), "");
    assert_eq!(s.push(&euro[2..]), "€");
    let emoji = "😀".as_bytes();
    assert_eq!(s.push(&[b'x', emoji[0], emoji[1]]), "x");
    assert_eq!(s.push(&[emoji[2], emoji[3], b'y']), "😀y");
    // Invalid bytes are replaced right away; a trailing partial one waits for finish().
    assert_eq!(s.push(&[0xFF, b'z', 0xE2, 0x82]), "\u{FFFD}z");
    assert_eq!(s.finish(), "\u{FFFD}");
    assert_eq!(s.finish(), "");
}

/// Tiny deterministic generator so the robustness test needs no extra dependency.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn string(&mut self, max: usize) -> String {
        const PIECES: &[&str] = &[
            "a", "b", "ab", " ", "Ġ", "▁", "<", ">", "<0x", "<0x4", "<0x41>", "<0xZZ>", "'", "s",
            "\n", "é", "中", "😀", "1", "<|", "|>", "\u{301}", "  ", "\t",
        ];
        (0..self.below(max + 1))
            .map(|_| PIECES[self.below(PIECES.len())])
            .collect()
    }
}

/// Arbitrary (often nonsensical) metadata must give a tokenizer or an error, never a
/// panic, and whatever tokenizer comes out must handle arbitrary text.
#[test]
fn random_metadata_never_panics() {
    let mut rng = Lcg(42);
    let mut built = 0;
    for round in 0..300 {
        let n = 1 + rng.below(40);
        let mut tokens: Vec<String> = (0..n).map(|_| rng.string(4)).collect();
        tokens.sort();
        tokens.dedup(); // duplicates are an error; keep most rounds past that check
        if rng.below(10) == 0 {
            tokens.push(tokens[0].clone());
        }
        let n = tokens.len();
        let id = |rng: &mut Lcg| (rng.below(3) > 0).then(|| rng.below(n + 3) as u32);
        let parts = VocabParts {
            model: ["gpt2", "llama", "bert"][rng.below(3)].into(),
            pre: [
                None,
                Some("qwen2"),
                Some("smollm"),
                Some("llama3"),
                Some("default"),
            ][rng.below(5)]
            .map(str::to_string),
            scores: (rng.below(2) == 0).then(|| {
                (0..n + rng.below(2))
                    .map(|i| if i % 7 == 3 { f32::NAN } else { -(i as f32) })
                    .collect()
            }),
            token_types: (rng.below(2) == 0)
                .then(|| (0..n).map(|_| rng.below(9) as i32 - 1).collect()),
            merges: (0..rng.below(20)).map(|_| rng.string(3)).collect(),
            bos: id(&mut rng),
            eos: id(&mut rng),
            eot: id(&mut rng),
            unk: id(&mut rng),
            fim_pad: id(&mut rng),
            add_bos: [None, Some(true), Some(false)][rng.below(3)],
            add_eos: [None, Some(true), Some(false)][rng.below(3)],
            add_space_prefix: [None, Some(true), Some(false)][rng.below(3)],
            tokens,
            ..Default::default()
        };
        let Ok(tok) = Tokenizer::from_parts(parts) else {
            continue;
        };
        built += 1;
        for _ in 0..5 {
            let text = rng.string(30);
            for (a, b) in [(false, false), (true, true), (true, false), (false, true)] {
                let ids = tok.encode(&text, a, b);
                assert!(
                    ids.iter().all(|&i| (i as usize) < tok.n_vocab()),
                    "round {round}"
                );
                let _ = tok.decode(&ids);
            }
        }
        for i in 0..tok.n_vocab() as u32 + 2 {
            let _ = tok.token_bytes(i);
            let _ = tok.is_eog(i);
        }
    }
    assert!(built > 50, "only {built} random vocabularies were accepted");
}

#[test]
fn tokenizer_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Tokenizer>();
    check::<Utf8Stream>();
}
