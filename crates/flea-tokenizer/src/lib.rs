//! llama.cpp-compatible tokenizers built from GGUF metadata.
//!
//! Two vocabulary types are supported, as llama.cpp implements them:
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE with merge ranks, after a
//!   pre-tokenizer chosen by `tokenizer.ggml.pre` (see [`PreTokenizer`]);
//! - `tokenizer.ggml.model = "llama"`: SentencePiece-style BPE over token scores with
//!   `<0xXX>` byte fallback (not a Unigram/Viterbi model).
//!
//! The goal is token-for-token identity with llama.cpp's `llama_tokenize` (commit
//! 0c1e57098), quirks included: its Unicode 15.1 codepoint classes, its hand-written and
//! `std::regex` pre-tokenizer semantics, its longest-first special-token partition, and
//! its BOS/EOS/EOG rules. `tests/llama_cpp_fixtures.rs` checks this against ids produced
//! by llama.cpp itself (`scripts/gen_token_fixtures.py`).
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let gguf = flea_gguf::GgufFile::open(std::path::Path::new("model.gguf"))?;
//! let tok = flea_tokenizer::Tokenizer::from_gguf(&gguf.header)?;
//! let ids = tok.encode("<|im_start|>user\nHi<|im_end|>", true, true);
//! let mut stream = flea_tokenizer::Utf8Stream::default();
//! for &id in &ids {
//!     print!("{}", stream.push(&tok.token_bytes(id)));
//! }
//! print!("{}", stream.finish());
//! # Ok(())
//! # }
//! ```
//!
//! Known differences from llama.cpp, none visible in the fixtures:
//! - when a vocabulary has several end-of-turn-looking tokens and no `eot_token_id`,
//!   llama.cpp's [`Tokenizer::eot`] pick depends on hash-map order; we take the lowest id
//!   (the end-of-generation set, [`Tokenizer::is_eog`], is identical);
//! - special tokens of equal length that overlap in the text are prioritised by id
//!   (llama.cpp: the order of an unstable sort);
//! - the per-model-name lstrip/rstrip attributes llama.cpp hard-codes (Phi-3, some BERTs)
//!   are not applied.

mod bpe;
mod pretok;
mod special;
mod spm;
mod unicode;
mod unicode_tables;

use std::collections::HashMap;

use flea_gguf::{GgufHeader, MetaValue};

pub use pretok::PreTokenizer;
use special::{Fragment, Specials};
use unicode::Flags;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer metadata: {0}")]
    Metadata(String),
    #[error("unsupported tokenizer model '{0}'")]
    UnsupportedModel(String),
    #[error("unsupported pre-tokenizer '{0}'")]
    UnsupportedPre(String),
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// The vocabulary algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    /// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`).
    Bpe,
    /// SentencePiece BPE (`tokenizer.ggml.model = "llama"`).
    Spm,
}

/// GGUF `tokenizer.ggml.token_type` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Undefined = 0,
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

// Token attributes, a bit set like llama.cpp's `llama_token_attr` (a token can gain
// CONTROL on top of its file type, e.g. an "<|im_end|>" stored as normal).
const ATTR_UNKNOWN: u8 = 1 << 0;
const ATTR_UNUSED: u8 = 1 << 1;
const ATTR_NORMAL: u8 = 1 << 2;
const ATTR_CONTROL: u8 = 1 << 3;
const ATTR_USER_DEFINED: u8 = 1 << 4;
const ATTR_BYTE: u8 = 1 << 5;

/// Everything a tokenizer is built from, as found in GGUF metadata. `from_gguf` fills it
/// from the file; tests and tools can fill it by hand.
#[derive(Clone, Debug, Default)]
pub struct VocabParts {
    /// `tokenizer.ggml.model`: "gpt2" or "llama".
    pub model: String,
    /// `tokenizer.ggml.pre` (BPE only; absent means llama.cpp's "default").
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// Per-token scores (SPM merge priority); missing means all 0.
    pub scores: Option<Vec<f32>>,
    /// Raw `tokenizer.ggml.token_type` values; missing means all normal.
    pub token_types: Option<Vec<i32>>,
    /// "left right" merge rules, rank = index (BPE).
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub sep: Option<u32>,
    pub pad: Option<u32>,
    pub mask: Option<u32>,
    pub fim_pre: Option<u32>,
    pub fim_suf: Option<u32>,
    pub fim_mid: Option<u32>,
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub add_space_prefix: Option<bool>,
}

/// Special token ids resolved the way llama.cpp resolves them.
#[derive(Clone, Copy, Debug, Default)]
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
}

pub struct Tokenizer {
    kind: VocabKind,
    pre: PreTokenizer,
    /// Llama-3 style: a word that is itself a token skips the merges.
    ignore_merges: bool,
    tokens: Vec<Box<str>>,
    scores: Vec<f32>,
    attrs: Vec<u8>,
    token_to_id: HashMap<Box<str>, u32>,
    merges: bpe::Merges,
    specials: Specials,
    ids: SpecialIds,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    /// Sorted end-of-generation ids.
    eog: Vec<u32>,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
    /// Token for each byte value used when a piece has no token of its own.
    byte_tokens: [Option<u32>; 256],
}

impl Tokenizer {
    pub fn from_gguf(h: &GgufHeader) -> Result<Tokenizer> {
        Tokenizer::from_parts(VocabParts::from_gguf(h)?)
    }

    /// Build from already-extracted metadata (what `from_gguf` does after reading keys).
    pub fn from_parts(p: VocabParts) -> Result<Tokenizer> {
        let n = p.tokens.len();
        if n == 0 {
            return Err(meta("tokenizer.ggml.tokens is empty"));
        }
        if u32::try_from(n).is_err() {
            return Err(meta("tokenizer.ggml.tokens has more than 2^32 entries"));
        }
        let kind = match p.model.as_str() {
            "gpt2" => VocabKind::Bpe,
            "llama" => VocabKind::Spm,
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };

        // Per-model defaults, then the file's flags (llama_vocab::impl::load).
        let mut add_bos = kind == VocabKind::Spm;
        let mut ignore_merges = false;
        let pre = match kind {
            VocabKind::Spm => PreTokenizer::Default,
            VocabKind::Bpe => {
                let (pre, llama3) = pre_from_name(p.pre.as_deref())?;
                if llama3 {
                    ignore_merges = true;
                    add_bos = true;
                }
                pre
            }
        };
        if kind == VocabKind::Bpe && p.merges.is_empty() {
            return Err(meta("tokenizer.ggml.merges is missing or empty"));
        }
        let add_space_prefix = p.add_space_prefix.unwrap_or(kind == VocabKind::Spm);
        let add_bos = p.add_bos.unwrap_or(add_bos);
        let add_eos = p.add_eos.unwrap_or(false);

        if let Some(s) = &p.scores {
            if s.len() < n {
                return Err(meta(format!(
                    "tokenizer.ggml.scores has {} entries for {n} tokens",
                    s.len()
                )));
            }
        }
        if let Some(t) = &p.token_types {
            if t.len() < n {
                return Err(meta(format!(
                    "tokenizer.ggml.token_type has {} entries for {n} tokens",
                    t.len()
                )));
            }
        }

        let mut tokens: Vec<Box<str>> = Vec::with_capacity(n);
        let mut token_to_id: HashMap<Box<str>, u32> = HashMap::with_capacity(n);
        for (i, t) in p.tokens.into_iter().enumerate() {
            // llama.cpp renames empty tokens so that they stay unique and unmatchable.
            let t: Box<str> = if t.is_empty() {
                format!("[EMPTY_{i}]").into()
            } else {
                t.into()
            };
            if let Some(prev) = token_to_id.insert(t.clone(), i as u32) {
                return Err(meta(format!(
                    "duplicate token {t:?} in vocabulary (ids {prev} and {i})"
                )));
            }
            tokens.push(t);
        }
        let scores: Vec<f32> = match p.scores {
            Some(mut s) => {
                s.truncate(n);
                s
            }
            None => vec![0.0; n],
        };
        let mut attrs: Vec<u8> = match &p.token_types {
            Some(t) => t[..n]
                .iter()
                .map(|&ty| match ty {
                    1 => ATTR_NORMAL,
                    2 => ATTR_UNKNOWN,
                    3 => ATTR_CONTROL,
                    4 => ATTR_USER_DEFINED,
                    5 => ATTR_UNUSED,
                    6 => ATTR_BYTE,
                    _ => 0,
                })
                .collect(),
            None => vec![ATTR_NORMAL; n],
        };

        // Special ids: built-in defaults (disabled when out of range), then the file's
        // values when they are in range.
        let in_range = |id: Option<u32>| id.filter(|&i| (i as usize) < n);
        let pick = |file: Option<u32>, default: Option<u32>| {
            let default = in_range(default);
            match file {
                Some(v) if (v as usize) < n => Some(v),
                _ => default,
            }
        };
        let (def_bos, def_eos, def_unk) = match kind {
            VocabKind::Spm => (Some(1), Some(2), Some(0)),
            VocabKind::Bpe => (Some(11), Some(11), None),
        };
        let mut ids = SpecialIds {
            bos: pick(p.bos, def_bos),
            eos: pick(p.eos, def_eos),
            eot: pick(p.eot, None),
            eom: pick(p.eom, None),
            unk: pick(p.unk, def_unk),
            pad: pick(p.pad, None),
        };
        let mut fim = [
            pick(p.fim_pre, None),
            pick(p.fim_suf, None),
            pick(p.fim_mid, None),
            pick(p.fim_pad, None),
            pick(p.fim_rep, None),
            pick(p.fim_sep, None),
        ];
        if add_bos && ids.bos.is_none() {
            return Err(meta("add_bos_token is true, but bos_token_id is not set"));
        }
        if add_eos && ids.eos.is_none() {
            return Err(meta("add_eos_token is true, but eos_token_id is not set"));
        }

        let find = |texts: &[&str]| -> Option<u32> {
            // llama.cpp walks a hash map here, so which of several candidates it picks is
            // unspecified; we take the lowest id. Only eot()/fim ids depend on this choice.
            texts
                .iter()
                .filter_map(|t| token_to_id.get(*t).copied())
                .min()
        };
        let mark_control = |id: u32, attrs: &mut [u8]| {
            if let Some(a) = attrs.get_mut(id as usize) {
                *a |= ATTR_CONTROL;
            }
        };
        // Text-based detection of turn/FIM tokens. llama.cpp makes the detected FIM tokens
        // control tokens; EOT/EOM candidates are all promoted with the EOG list below.
        if ids.eot.is_none() {
            ids.eot = find(EOT_TEXTS);
        }
        if ids.eom.is_none() {
            ids.eom = find(&["<|eom_id|>"]);
        }
        for (slot, texts) in fim.iter_mut().zip(FIM_TEXTS) {
            if slot.is_none() {
                *slot = find(texts);
                if let Some(id) = *slot {
                    mark_control(id, &mut attrs);
                }
            }
        }

        let mut eog: Vec<u32> = Vec::new();
        eog.extend(fim[3..].iter().flatten());
        for t in EOG_TEXTS {
            if let Some(&id) = token_to_id.get(*t) {
                eog.push(id);
                mark_control(id, &mut attrs);
            }
        }
        // gpt-oss: these are always rendered, whatever the file says.
        for t in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(&id) = token_to_id.get(t) {
                attrs[id as usize] = ATTR_USER_DEFINED;
            }
        }
        eog.extend([ids.eos, ids.eot, ids.eom].into_iter().flatten());
        eog.sort_unstable();
        eog.dedup();
        let has = |eog: &[u32], t: &str| {
            token_to_id
                .get(t)
                .is_some_and(|id| eog.binary_search(id).is_ok())
        };
        // o200k_harmony / solar-open: "<|end|>" ends a message, not the generation.
        if has(&eog, "<|end|>")
            && ((has(&eog, "<|return|>") && (has(&eog, "<|call|>") || has(&eog, "<|calls|>")))
                || ((has(&eog, "<|call|>") || has(&eog, "<|calls|>")) && has(&eog, "<|flush|>")))
        {
            if let Some(&id) = token_to_id.get("<|end|>") {
                eog.retain(|&e| e != id);
                attrs[id as usize] = ATTR_USER_DEFINED;
            }
        }
        // gemma4 / paddleocr: "</s>" is not an end token next to "<|tool_response>".
        if has(&eog, "<|tool_response>") && has(&eog, "</s>") {
            if let Some(&id) = token_to_id.get("</s>") {
                eog.retain(|&e| e != id);
                attrs[id as usize] = ATTR_NORMAL;
            }
        }

        let specials = Specials::new(
            attrs
                .iter()
                .enumerate()
                .filter(|(_, &a)| a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0)
                .map(|(i, &a)| {
                    (
                        i as u32,
                        &*tokens[i],
                        a & (ATTR_CONTROL | ATTR_UNKNOWN) != 0,
                    )
                })
                .collect(),
        );

        let merges = match kind {
            VocabKind::Bpe => bpe::Merges::new(p.merges.iter().map(String::as_str)),
            VocabKind::Spm => bpe::Merges::default(),
        };
        let byte_to_char = bpe::byte_to_char_table();
        let char_to_byte = byte_to_char
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = match kind {
                // SPM: "<0xXX>", else the byte itself as a one-byte token.
                VocabKind::Spm => token_to_id
                    .get(format!("<0x{b:02X}>").as_str())
                    .or_else(|| {
                        std::str::from_utf8(&[b as u8])
                            .ok()
                            .and_then(|s| token_to_id.get(s))
                    })
                    .copied(),
                // BPE: llama.cpp looks up each raw byte of the unmergeable piece as a
                // one-byte token; only ASCII bytes can be valid one-byte strings.
                VocabKind::Bpe => std::str::from_utf8(&[b as u8])
                    .ok()
                    .and_then(|s| token_to_id.get(s))
                    .copied(),
            };
        }

        Ok(Tokenizer {
            kind,
            pre,
            ignore_merges,
            tokens,
            scores,
            attrs,
            token_to_id,
            merges,
            specials,
            ids,
            add_bos,
            add_eos,
            add_space_prefix,
            eog,
            byte_to_char,
            char_to_byte,
            byte_tokens,
        })
    }

    /// llama.cpp's `llama_tokenize(text, add_special, parse_special)`.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.ids.bos);
        }
        let frags = self.specials.partition(text, parse_special);
        match self.kind {
            VocabKind::Spm => {
                // A space is prefixed to the text at the start and after every special token.
                let mut prev_special = true;
                for f in frags {
                    match f {
                        Fragment::Text(a, b) => {
                            let mut s = String::with_capacity((b - a) * 3 + 3);
                            if self.add_space_prefix && prev_special {
                                s.push('\u{2581}');
                            }
                            for ch in text[a..b].chars() {
                                s.push(if ch == ' ' { '\u{2581}' } else { ch });
                            }
                            self.spm_encode(&s, &mut out);
                            prev_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                    }
                }
            }
            VocabKind::Bpe => {
                for f in frags {
                    match f {
                        Fragment::Text(a, b) => self.bpe_encode(&text[a..b], &mut out),
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.ids.eos);
        }
        out
    }

    fn spm_encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut pieces = Vec::new();
        spm::merge(text, &self.token_to_id, &self.scores, &mut pieces);
        for (a, b) in pieces {
            let piece = &text[a..b];
            match self.token_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => self.push_bytes(piece, out),
            }
        }
    }

    fn bpe_encode(&self, text: &str, out: &mut Vec<u32>) {
        let cps: Vec<u32> = text.chars().map(u32::from).collect();
        let flags: Vec<Flags> = cps.iter().map(|&c| Flags::of(c)).collect();
        // Byte offset of every char boundary, to turn codepoint counts into slices.
        let mut offsets: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
        offsets.push(text.len());
        let mut word = String::new();
        let mut pieces = Vec::new();
        let mut char_pos = 0;
        for len in pretok::split(self.pre, &cps, &flags) {
            let (Some(&start), Some(&end)) = (offsets.get(char_pos), offsets.get(char_pos + len))
            else {
                break; // cannot happen: the splitter covers the text exactly
            };
            char_pos += len;
            word.clear();
            word.extend(
                text.as_bytes()[start..end]
                    .iter()
                    .map(|&b| self.byte_to_char[usize::from(b)]),
            );
            if self.ignore_merges {
                if let Some(&id) = self.token_to_id.get(word.as_str()) {
                    out.push(id);
                    continue;
                }
            }
            pieces.clear();
            bpe::merge_word(&self.merges, &word, &mut pieces);
            for &(a, b) in &pieces {
                let piece = &word[a..b];
                match self.token_to_id.get(piece) {
                    Some(&id) => out.push(id),
                    None => self.push_bytes(piece, out),
                }
            }
        }
    }

    fn push_bytes(&self, piece: &str, out: &mut Vec<u32>) {
        for &b in piece.as_bytes() {
            match self.byte_tokens[usize::from(b)] {
                Some(id) => out.push(id),
                // SPM vocabularies always have byte tokens; if one is missing llama.cpp
                // fails, we fall back to <unk> (BPE silently drops the byte, as llama.cpp).
                None if self.kind == VocabKind::Spm => out.extend(self.ids.unk),
                None => {}
            }
        }
    }

    /// The bytes this token stands for when printed (llama.cpp's `token_to_piece` with
    /// special tokens rendered).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let (Some(text), Some(&attr)) = (self.tokens.get(id as usize), self.attrs.get(id as usize))
        else {
            return Vec::new();
        };
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED) != 0 {
            return text.as_bytes().to_vec();
        }
        if attr & ATTR_NORMAL != 0 {
            return match self.kind {
                VocabKind::Spm => text.replace('\u{2581}', " ").into_bytes(),
                VocabKind::Bpe => self.unmap_bytes(text),
            };
        }
        if attr & ATTR_BYTE != 0 {
            return vec![byte_token_value(text)];
        }
        Vec::new()
    }

    /// Undo the GPT-2 byte → char mapping. Characters outside the table are spelled the
    /// way llama.cpp does it ("[UNK_BYTE_0x..]").
    fn unmap_bytes(&self, text: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len());
        for ch in text.chars() {
            match self.char_to_byte.get(&ch) {
                Some(&b) => out.push(b),
                None => {
                    out.extend_from_slice(b"[UNK_BYTE_0x");
                    let mut buf = [0u8; 4];
                    for b in ch.encode_utf8(&mut buf).bytes() {
                        out.extend_from_slice(format!("{b:02x}").as_bytes());
                    }
                    out.extend_from_slice(text.as_bytes());
                    out.push(b']');
                }
            }
        }
        out
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend(self.token_bytes(id));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }
    pub fn bos(&self) -> Option<u32> {
        self.ids.bos
    }
    pub fn eos(&self) -> Option<u32> {
        self.ids.eos
    }
    /// End-of-turn token (from metadata, or detected by text like llama.cpp).
    pub fn eot(&self) -> Option<u32> {
        self.ids.eot
    }
    pub fn unk(&self) -> Option<u32> {
        self.ids.unk
    }
    pub fn pad(&self) -> Option<u32> {
        self.ids.pad
    }
    /// End-of-generation tokens (eos, eot, im_end, end_of_turn ...).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }
    /// All end-of-generation ids, sorted.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(|t| &**t)
    }
    /// The id of the token with exactly this (stored) text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }
    /// Control, user-defined or unknown token (what `parse_special` matches in text).
    pub fn is_special(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|a| a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0)
    }
    /// Control token (rendered only on request, e.g. `<|im_start|>`, `<bos>`).
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|a| a & ATTR_CONTROL != 0)
    }
    pub fn kind(&self) -> VocabKind {
        self.kind
    }
    /// The BPE pre-tokenizer in use (`Default` for SentencePiece vocabularies).
    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre
    }
    /// Whether `encode(.., add_special = true, ..)` prepends BOS / appends EOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }
    pub fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }
}

/// Value of a `<0xXX>` byte token (llama.cpp parses the two hex digits after "<0x").
fn byte_token_value(text: &str) -> u8 {
    text.get(3..5)
        .and_then(|h| u8::from_str_radix(h, 16).ok())
        .or_else(|| text.get(3..4).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .unwrap_or(0)
}

const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

const FIM_TEXTS: [&[&str]; 6] = [
    &[
        "<|fim_prefix|>",
        "<fim-prefix>",
        "<fim_prefix>",
        "<｜fim▁begin｜>",
        "<PRE>",
        "▁<PRE>",
        "<|code_prefix|>",
        "<|prefix|>",
    ],
    &[
        "<|fim_suffix|>",
        "<fim-suffix>",
        "<fim_suffix>",
        "<｜fim▁hole｜>",
        "<SUF>",
        "▁<SUF>",
        "<|code_suffix|>",
        "<|suffix|>",
    ],
    &[
        "<|fim_middle|>",
        "<fim-middle>",
        "<fim_middle>",
        "<｜fim▁end｜>",
        "<MID>",
        "▁<MID>",
        "<|code_middle|>",
        "<|middle|>",
    ],
    &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    &[
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
    ],
    &["<|file_sep|>"],
];

const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// `tokenizer.ggml.pre` → pre-tokenizer, and whether it is a Llama-3 name (which also
/// turns on ignore_merges and add_bos in llama.cpp).
fn pre_from_name(name: Option<&str>) -> Result<(PreTokenizer, bool)> {
    use PreTokenizer::*;
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        return Ok((Default, false));
    };
    Ok(match name {
        "default" => (Default, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" => (Llama3, true),
        "dbrx" | "smaug-bpe" => (Llama3, false),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling"
        | "exaone4" => (Gpt2, false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (Smollm, false)
        }
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "hunyuan" | "megrez" => (Qwen2, false),
        other => return Err(TokenizerError::UnsupportedPre(other.to_string())),
    })
}

fn meta(msg: impl Into<String>) -> TokenizerError {
    TokenizerError::Metadata(msg.into())
}

impl VocabParts {
    /// Read the `tokenizer.ggml.*` keys of a GGUF header.
    pub fn from_gguf(h: &GgufHeader) -> Result<VocabParts> {
        parts_from_gguf(h)
    }
}

fn parts_from_gguf(h: &GgufHeader) -> Result<VocabParts> {
    let gerr = |key: &str, e: flea_gguf::GgufError| meta(format!("{key}: {e}"));
    let get_str = |key: &str| -> Result<Option<String>> {
        h.get_str(key)
            .map(|o| o.map(str::to_string))
            .map_err(|e| gerr(key, e))
    };
    let get_u32 = |key: &str| h.get_u32(key).map_err(|e| gerr(key, e));
    let get_bool = |key: &str| h.get_bool(key).map_err(|e| gerr(key, e));
    let get_array = |key: &str| h.get_array(key).map_err(|e| gerr(key, e));

    let model =
        get_str("tokenizer.ggml.model")?.ok_or_else(|| meta("tokenizer.ggml.model is missing"))?;
    let tokens = match get_array("tokenizer.ggml.tokens")? {
        None => return Err(meta("tokenizer.ggml.tokens is missing")),
        Some(arr) => arr
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                MetaValue::String(s) => Ok(s.clone()),
                _ => Err(meta(format!("tokenizer.ggml.tokens[{i}] is not a string"))),
            })
            .collect::<Result<Vec<_>>>()?,
    };
    let scores = match get_array("tokenizer.ggml.scores")? {
        None => None,
        Some(arr) => Some(
            arr.iter()
                .enumerate()
                .map(|(i, v)| match v {
                    MetaValue::F32(x) => Ok(*x),
                    MetaValue::I32(x) => Ok(*x as f32),
                    _ => Err(meta(format!("tokenizer.ggml.scores[{i}] is not f32/i32"))),
                })
                .collect::<Result<Vec<_>>>()?,
        ),
    };
    let token_types = match get_array("tokenizer.ggml.token_type")? {
        None => None,
        Some(arr) => Some(
            arr.iter()
                .enumerate()
                .map(|(i, v)| match v {
                    MetaValue::I32(x) => Ok(*x),
                    _ => Err(meta(format!(
                        "tokenizer.ggml.token_type[{i}] is not an i32"
                    ))),
                })
                .collect::<Result<Vec<_>>>()?,
        ),
    };
    let merges = match get_array("tokenizer.ggml.merges")? {
        None => Vec::new(),
        Some(arr) => arr
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                MetaValue::String(s) => Ok(s.clone()),
                _ => Err(meta(format!("tokenizer.ggml.merges[{i}] is not a string"))),
            })
            .collect::<Result<Vec<_>>>()?,
    };
    let k = |name: &str| format!("tokenizer.ggml.{name}");
    let id = |name: &str| get_u32(&k(name));
    // The deprecated prefix/suffix/middle keys are read after the fim_* ones and win,
    // unless out of range (llama.cpp then keeps the earlier value).
    let n_tokens = tokens.len();
    let or_later = |a: Option<u32>, b: Option<u32>| b.filter(|&v| (v as usize) < n_tokens).or(a);
    Ok(VocabParts {
        model,
        pre: get_str("tokenizer.ggml.pre")?,
        tokens,
        scores,
        token_types,
        merges,
        bos: id("bos_token_id")?,
        eos: id("eos_token_id")?,
        eot: id("eot_token_id")?,
        eom: id("eom_token_id")?,
        unk: id("unknown_token_id")?,
        sep: id("seperator_token_id")?,
        pad: id("padding_token_id")?,
        mask: id("mask_token_id")?,
        fim_pre: or_later(id("fim_pre_token_id")?, id("prefix_token_id")?),
        fim_suf: or_later(id("fim_suf_token_id")?, id("suffix_token_id")?),
        fim_mid: or_later(id("fim_mid_token_id")?, id("middle_token_id")?),
        fim_pad: id("fim_pad_token_id")?,
        fim_rep: id("fim_rep_token_id")?,
        fim_sep: id("fim_sep_token_id")?,
        add_bos: get_bool(&k("add_bos_token"))?,
        add_eos: get_bool(&k("add_eos_token"))?,
        add_space_prefix: get_bool(&k("add_space_prefix"))?,
    })
}

/// Turns a stream of token byte pieces into valid UTF-8 text, holding back an incomplete
/// trailing sequence until the next piece completes it.
#[derive(Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    pub fn push(&mut self, piece: &[u8]) -> String {
        self.pending.extend_from_slice(piece);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        // Definitely invalid bytes: replace them and go on.
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            rest = after.get(bad..).unwrap_or(&[]);
                        }
                        // A sequence cut short at the end: wait for more bytes.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }

    /// Whatever is left, with invalid bytes replaced.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests;
