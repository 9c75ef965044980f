//! Pre-tokenizers: split text into words before BPE, exactly as llama.cpp does.
//!
//! llama.cpp runs a list of regexes one after another; each one re-splits every piece the
//! previous one produced, and the text between two matches becomes a piece of its own.
//! Some regexes have hand-written matchers there (gpt2, llama3), the others go through
//! `std::regex` on a "collapsed" text where each non-ASCII codepoint is replaced by a byte
//! standing for its class. For the classes our regexes use (letter, number, whitespace)
//! that collapsed view agrees with [`Flags`], so every pass here works on flags.

use crate::unicode::{Flags, PUNCTUATION};

/// The pre-tokenizer families we implement (llama.cpp's `LLAMA_VOCAB_PRE_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// llama.cpp's fallback for BPE files without a known pre-tokenizer name ("default").
    Default,
    /// The GPT-2 regex alone (`gpt-2`, `phi-2`, `olmo`, `mpt`, ...).
    Gpt2,
    /// Every digit on its own, then the GPT-2 regex (`smollm`, `starcoder`, `refact`, ...).
    Smollm,
    /// The Qwen2 regex: single digits, letter runs with one leading non-letter (`qwen2`, ...).
    Qwen2,
    /// The Llama-3 regex: digits in groups of up to three (`llama3`, `llama-bpe`, ...).
    Llama3,
}

struct Text<'a> {
    cps: &'a [u32],
    fl: &'a [Flags],
}

/// Out-of-piece flags: no class at all (llama.cpp's empty `unicode_cpt_flags{}`).
const NONE: Flags = Flags {
    class: 0,
    ws: false,
};

/// Word boundaries (in codepoints) of `cps` under `pre`; returned as piece lengths.
pub(crate) fn split(pre: PreTokenizer, cps: &[u32], fl: &[Flags]) -> Vec<usize> {
    let t = Text { cps, fl };
    let all = if cps.is_empty() {
        Vec::new()
    } else {
        vec![cps.len()]
    };
    match pre {
        PreTokenizer::Gpt2 => pass(&t, &all, gpt2_piece),
        PreTokenizer::Smollm => {
            let p = pass(&t, &all, |t, s, e, out| {
                each_match(s, e, out, |p| t.fl[p].number().then_some(1))
            });
            pass(&t, &p, gpt2_piece)
        }
        PreTokenizer::Qwen2 => pass(&t, &all, qwen2_piece),
        PreTokenizer::Llama3 => pass(&t, &all, llama3_piece),
        PreTokenizer::Default => {
            let p = pass(&t, &all, |t, s, e, out| {
                each_match(s, e, out, |p| {
                    let run = (p..e).take_while(|&q| default_punct(t, q)).count();
                    (run > 0).then_some(run)
                })
            });
            let p = pass(&t, &p, gpt2_piece);
            let p = pass(&t, &p, |t, s, e, out| {
                each_match(s, e, out, |p| {
                    let run = (p..e).take_while(|&q| t.fl[q].number()).count();
                    (run > 0).then_some(run)
                })
            });
            pass(&t, &p, |t, s, e, out| {
                each_match(s, e, out, |p| {
                    let digits = (p..e.min(p + 3))
                        .take_while(|&q| matches!(t.cps[q], 0x30..=0x39))
                        .count();
                    (digits == 3).then_some(3)
                })
            })
        }
    }
}

/// `[\p{P}\$\+<=>\^~\|]` of llama.cpp's default BPE regex.
fn default_punct(t: &Text, p: usize) -> bool {
    t.fl[p].class == PUNCTUATION
        || matches!(
            t.cps[p],
            0x24 | 0x2B | 0x3C | 0x3D | 0x3E | 0x5E | 0x7E | 0x7C
        )
}

/// Apply one splitter to every piece.
fn pass(
    t: &Text,
    pieces: &[usize],
    f: impl Fn(&Text, usize, usize, &mut Vec<usize>),
) -> Vec<usize> {
    let mut out = Vec::with_capacity(pieces.len() * 2);
    let mut start = 0;
    for &len in pieces {
        f(t, start, start + len, &mut out);
        start += len;
    }
    out
}

/// A regex_iterator-style split: `m(p)` gives the length of a match starting at `p`, if
/// any; matches and the gaps between them all become pieces.
fn each_match(s: usize, e: usize, out: &mut Vec<usize>, m: impl Fn(usize) -> Option<usize>) {
    let mut gap_start = s;
    let mut p = s;
    while p < e {
        match m(p) {
            Some(len) => {
                if p > gap_start {
                    out.push(p - gap_start);
                }
                out.push(len);
                p += len;
                gap_start = p;
            }
            None => p += 1,
        }
    }
    if e > gap_start {
        out.push(e - gap_start);
    }
}

fn is_other(f: Flags) -> bool {
    // "[^\s\p{L}\p{N}]" inside the piece (class 0 means past its end).
    !(f.ws || f.letter() || f.number()) && f.class != 0
}

/// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
fn gpt2_piece(t: &Text, s: usize, e: usize, out: &mut Vec<usize>) {
    let fl = |p: usize| if p < e { t.fl[p] } else { NONE };
    let cp = |p: usize| if p < e { t.cps[p] } else { u32::MAX };
    let mut pos = s;
    while pos < e {
        let start = pos;
        let c = cp(pos);
        if c == u32::from(b'\'') && pos + 1 < e {
            let n = cp(pos + 1);
            if [b's', b't', b'm', b'd'].iter().any(|&x| n == u32::from(x)) {
                out.push(2);
                pos += 2;
                continue;
            }
            if pos + 2 < e {
                let pair = (n, cp(pos + 2));
                let r = |a: u8, b: u8| pair == (u32::from(a), u32::from(b));
                if r(b'r', b'e') || r(b'v', b'e') || r(b'l', b'l') {
                    out.push(3);
                    pos += 3;
                    continue;
                }
            }
        }
        let space = c == 0x20;
        let f2 = if space { fl(pos + 1) } else { fl(pos) };
        if f2.letter() || f2.number() || is_other(f2) {
            pos += usize::from(space);
            let same = |f: Flags| {
                if f2.letter() {
                    f.letter()
                } else if f2.number() {
                    f.number()
                } else {
                    is_other(f)
                }
            };
            while same(fl(pos)) {
                pos += 1;
            }
            out.push(pos - start);
            continue;
        }
        let nws = (pos..e).take_while(|&p| t.fl[p].ws).count();
        let len = if nws > 1 && pos + nws < e {
            nws - 1 // \s+(?!\S): leave the last space to prefix the next word
        } else if nws > 0 {
            nws
        } else {
            1
        };
        out.push(len);
        pos += len;
    }
}

/// Llama-3 (llama.cpp's hand-written matcher):
/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
fn llama3_piece(t: &Text, s: usize, e: usize, out: &mut Vec<usize>) {
    let fl = |p: usize| if p < e { t.fl[p] } else { NONE };
    let cp = |p: usize| if p < e { t.cps[p] } else { u32::MAX };
    let lower = |c: u32| {
        if (0x41..=0x5A).contains(&c) {
            c + 0x20
        } else {
            c
        }
    };
    let is_crlf = |c: u32| c == 0x0D || c == 0x0A;
    let mut pos = s;
    let mut prev = s;
    let mut emit = |end: usize, prev: &mut usize| {
        if end > *prev {
            out.push(end - *prev);
        }
        *prev = end;
    };
    while pos < e {
        let c = cp(pos);
        let f = fl(pos);
        if c == u32::from(b'\'') && pos + 1 < e {
            let n = lower(cp(pos + 1));
            if [b's', b't', b'm', b'd'].iter().any(|&x| n == u32::from(x)) {
                pos += 2;
                emit(pos, &mut prev);
                continue;
            }
            if pos + 2 < e {
                let pair = (n, lower(cp(pos + 2)));
                let r = |a: u8, b: u8| pair == (u32::from(a), u32::from(b));
                if r(b'r', b'e') || r(b'v', b'e') || r(b'l', b'l') {
                    pos += 3;
                    emit(pos, &mut prev);
                    continue;
                }
            }
        }
        if !(is_crlf(c) || f.number()) && (f.letter() || fl(pos + 1).letter()) {
            pos += 1;
            while fl(pos).letter() {
                pos += 1;
            }
            emit(pos, &mut prev);
            continue;
        }
        if f.number() {
            let mut ini = pos;
            while fl(pos).number() {
                pos += 1;
                if pos - ini >= 3 {
                    emit(pos, &mut prev);
                    ini = pos;
                }
            }
            emit(pos, &mut prev);
            continue;
        }
        let mut f2 = if c == 0x20 { fl(pos + 1) } else { f };
        // llama.cpp tests the current codepoint's flags here, not f2's, for "inside the piece".
        if !(f2.ws || f2.letter() || f2.number()) && f.class != 0 {
            pos += usize::from(c == 0x20);
            while is_other(f2) {
                pos += 1;
                f2 = fl(pos);
            }
            while is_crlf(cp(pos)) {
                pos += 1;
            }
            emit(pos, &mut prev);
            continue;
        }
        let mut nws = 0;
        let mut last_crlf_end = 0;
        while fl(pos + nws).ws {
            if is_crlf(cp(pos + nws)) {
                last_crlf_end = pos + nws + 1;
            }
            nws += 1;
        }
        if last_crlf_end > 0 {
            pos = last_crlf_end;
        } else if nws > 1 && pos + nws < e {
            pos += nws - 1;
        } else if nws > 0 {
            pos += nws;
        } else {
            pos += 1;
        }
        emit(pos, &mut prev);
    }
}

/// Qwen2, run by llama.cpp through `std::regex` (ECMAScript, leftmost alternative wins):
/// `(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
/// Every codepoint starts some alternative, so there are never gaps between matches.
fn qwen2_piece(t: &Text, s: usize, e: usize, out: &mut Vec<usize>) {
    let mut pos = s;
    while pos < e {
        let len = qwen2_match(t, pos, e);
        out.push(len);
        pos += len;
    }
}

fn qwen2_match(t: &Text, i: usize, e: usize) -> usize {
    let cp = |p: usize| if p < e { t.cps[p] } else { u32::MAX };
    let fl = |p: usize| if p < e { t.fl[p] } else { NONE };
    let is_crlf = |c: u32| c == 0x0D || c == 0x0A;
    let c = cp(i);
    let f = fl(i);

    // '[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]
    if c == u32::from(b'\'') {
        let lower = |c: u32| {
            if (0x41..=0x5A).contains(&c) {
                c + 0x20
            } else {
                c
            }
        };
        let n = lower(cp(i + 1));
        if [b's', b't', b'm', b'd'].iter().any(|&x| n == u32::from(x)) {
            return 2;
        }
        let pair = (n, lower(cp(i + 2)));
        let r = |a: u8, b: u8| pair == (u32::from(a), u32::from(b));
        if r(b'r', b'e') || r(b'v', b'e') || r(b'l', b'l') {
            return 3;
        }
    }
    let letters_from = |p: usize| (p..e).take_while(|&q| t.fl[q].letter()).count();
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if f.letter() {
        return letters_from(i);
    }
    if !is_crlf(c) && !f.number() && fl(i + 1).letter() {
        return 1 + letters_from(i + 1);
    }
    // \p{N}
    if f.number() {
        return 1;
    }
    // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    let j = if c == 0x20 && is_other(fl(i + 1)) {
        i + 1
    } else {
        i
    };
    if is_other(fl(j)) {
        let mut p = j;
        while is_other(fl(p)) {
            p += 1;
        }
        while is_crlf(cp(p)) {
            p += 1;
        }
        return p - i;
    }
    // Whitespace alternatives; here c is whitespace.
    let run = (i..e).take_while(|&q| t.fl[q].ws).count();
    // \s*[\r\n]+ : backtracks to just after the last CR/LF of the run.
    if let Some(k) = (i..i + run).rev().find(|&q| is_crlf(t.cps[q])) {
        return k + 1 - i;
    }
    // \s+(?!\S) then \s+
    if i + run == e || run < 2 {
        run.max(1)
    } else {
        run - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: PreTokenizer, s: &str) -> Vec<String> {
        let cps: Vec<u32> = s.chars().map(u32::from).collect();
        let fl: Vec<Flags> = cps.iter().map(|&c| Flags::of(c)).collect();
        let mut start = 0;
        split(pre, &cps, &fl)
            .into_iter()
            .map(|n| {
                let w: String = s.chars().skip(start).take(n).collect();
                start += n;
                w
            })
            .collect()
    }

    #[test]
    fn gpt2_basic() {
        assert_eq!(
            words(PreTokenizer::Gpt2, "Hello world's  123 !!x\n\n  y  "),
            ["Hello", " world", "'s", " ", " 123", " !!", "x", "\n\n ", " y", "  "]
        );
    }

    #[test]
    fn smollm_digits() {
        assert_eq!(
            words(PreTokenizer::Smollm, "a 1234b"),
            ["a", " ", "1", "2", "3", "4", "b"]
        );
    }

    #[test]
    fn qwen2_basic() {
        assert_eq!(
            words(PreTokenizer::Qwen2, "He's 12 ,.\n\n  foo\t\tBAR'LL  "),
            ["He", "'s", " ", "1", "2", " ,.\n\n", " ", " foo", "\t", "\tBAR", "'LL", "  "]
        );
    }

    #[test]
    fn llama3_digit_groups() {
        assert_eq!(
            words(PreTokenizer::Llama3, "x 1234567 \r\n y"),
            ["x", " ", "123", "456", "7", " \r\n", " y"]
        );
    }

    #[test]
    fn default_passes() {
        assert_eq!(
            words(PreTokenizer::Default, "a+=12345"),
            ["a", "+=", "123", "45"]
        );
    }

    #[test]
    fn empty() {
        assert!(words(PreTokenizer::Qwen2, "").is_empty());
    }
}
