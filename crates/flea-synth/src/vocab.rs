//! A synthetic gpt2-style byte-level BPE vocabulary of any size.
//!
//! Ids 0..256 are the 256 byte tokens (in gpt2's byte→unicode spelling, ordered by byte
//! value), then merged tokens, then the two control tokens `<s>` (bos) and `</s>` (eos).
//! Merges grow words a letter at a time ("Ġ t" → "Ġt", "Ġt h" → "Ġth", ...) in rough
//! English letter-frequency order, so real text gets multi-byte tokens; every merge "A B"
//! names two tokens that already exist and yields A+B, which is new.

use std::collections::HashSet;

/// GGUF token types (llama.cpp's `llama_token_type`).
pub(crate) const TOKEN_NORMAL: i32 = 1;
pub(crate) const TOKEN_CONTROL: i32 = 3;

pub(crate) struct Vocab {
    pub tokens: Vec<String>,
    pub token_type: Vec<i32>,
    pub merges: Vec<String>,
    pub bos: u32,
    pub eos: u32,
}

/// gpt2's reversible byte → printable char mapping: printable Latin-1 bytes map to
/// themselves, the rest to U+0100.. in byte order (space becomes 'Ġ', '\n' 'Ċ').
pub(crate) fn byte_to_char(b: u8) -> char {
    let printable = |c: u32| (0x21..=0x7e).contains(&c) || (0xa1..=0xac).contains(&c) || c >= 0xae;
    if printable(u32::from(b)) {
        return char::from(b);
    }
    let n = (0..u32::from(b)).filter(|&c| !printable(c)).count() as u32;
    char::from_u32(256 + n).unwrap_or('?')
}

/// Build a vocabulary of exactly `n_vocab` tokens (at least 259: bytes, one merge, bos,
/// eos; the caller checks).
pub(crate) fn build(n_vocab: usize) -> Vocab {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_to_char(b).to_string()).collect();
    let mut seen: HashSet<String> = tokens.iter().cloned().collect();
    let n_merged = n_vocab.saturating_sub(256 + 2);
    let mut merges = Vec::with_capacity(n_merged);

    let letters: Vec<String> = "etaoinsrhldcumfpgwybvkxjqz"
        .chars()
        .map(String::from)
        .collect();
    let space = byte_to_char(b' ').to_string();
    // Level 1 (the stems to extend): the space marker and single letters.
    let mut frontier: Vec<String> = std::iter::once(space).chain(letters.clone()).collect();
    'outer: while merges.len() < n_merged {
        let mut next = Vec::new();
        for stem in &frontier {
            for l in &letters {
                if merges.len() >= n_merged {
                    break 'outer;
                }
                let t = format!("{stem}{l}");
                if seen.insert(t.clone()) {
                    merges.push(format!("{stem} {l}"));
                    tokens.push(t.clone());
                    next.push(t);
                }
            }
        }
        frontier = next;
    }
    let bos = tokens.len() as u32;
    tokens.push("<s>".into());
    tokens.push("</s>".into());
    let mut token_type = vec![TOKEN_NORMAL; tokens.len()];
    token_type[bos as usize] = TOKEN_CONTROL;
    token_type[bos as usize + 1] = TOKEN_CONTROL;
    Vocab {
        tokens,
        token_type,
        merges,
        bos,
        eos: bos + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_matches_gpt2() {
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(byte_to_char(0), 'Ā');
        let all: HashSet<char> = (0..=255u8).map(byte_to_char).collect();
        assert_eq!(all.len(), 256);
    }

    #[test]
    fn merges_are_well_formed() {
        for n in [259, 1024, 32000] {
            let v = build(n);
            assert_eq!(v.tokens.len(), n);
            let set: HashSet<&str> = v.tokens.iter().map(String::as_str).collect();
            assert_eq!(set.len(), n, "duplicate tokens");
            let pos: std::collections::HashMap<&str, usize> = v
                .tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.as_str(), i))
                .collect();
            for (i, m) in v.merges.iter().enumerate() {
                let (a, b) = m.split_once(' ').unwrap();
                // Parts exist before the merge that uses them; the result is token 256+i.
                assert!(pos[a] < 256 + i && pos[b] < 256 + i, "{m}");
                assert_eq!(v.tokens[256 + i], format!("{a}{b}"));
            }
        }
    }
}
