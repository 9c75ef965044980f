//! Codepoint classes as llama.cpp's tokenizer sees them.
//!
//! llama.cpp classifies every codepoint into one coarse general-category class and keeps a
//! separate "whitespace" flag (Unicode `White_Space`). Its pre-tokenizers only look at these,
//! so matching them exactly is what makes our splits identical.

use crate::unicode_tables::CLASS_RANGES;

pub(crate) const UNDEFINED: u8 = 1;
pub(crate) const NUMBER: u8 = 2;
pub(crate) const LETTER: u8 = 4;
pub(crate) const PUNCTUATION: u8 = 32;

/// The class bit of a codepoint (one of the constants above, or separator/mark/symbol/control).
pub(crate) fn class(cp: u32) -> u8 {
    // ASCII is by far the most common input: answer it without the search.
    if cp < 0x80 {
        let c = cp as u8;
        return match c {
            b'0'..=b'9' => NUMBER,
            b'A'..=b'Z' | b'a'..=b'z' => LETTER,
            b' ' => 8,
            b'$' | b'+' | b'<' | b'=' | b'>' | b'^' | b'`' | b'|' | b'~' => 64,
            0x21..=0x7e => PUNCTUATION,
            _ => 128,
        };
    }
    if cp >= 0x110000 {
        return UNDEFINED;
    }
    // Last range whose start is <= cp; index 0 starts at 0 so the search never underflows.
    let idx = CLASS_RANGES.partition_point(|&(start, _)| start <= cp);
    CLASS_RANGES
        .get(idx.wrapping_sub(1))
        .map_or(UNDEFINED, |&(_, c)| c)
}

/// Unicode `White_Space` (what llama.cpp's `is_whitespace` flag holds).
pub(crate) fn is_whitespace(cp: u32) -> bool {
    matches!(
        cp,
        0x09..=0x0D
            | 0x20
            | 0x85
            | 0xA0
            | 0x1680
            | 0x2000..=0x200A
            | 0x2028
            | 0x2029
            | 0x202F
            | 0x205F
            | 0x3000
    )
}

/// Flags of one codepoint, precomputed once per encode so the splitters stay branch-light.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub(crate) struct Flags {
    pub class: u8,
    pub ws: bool,
}

impl Flags {
    pub fn of(cp: u32) -> Flags {
        Flags {
            class: class(cp),
            ws: is_whitespace(cp),
        }
    }
    pub fn letter(self) -> bool {
        self.class == LETTER
    }
    pub fn number(self) -> bool {
        self.class == NUMBER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_fast_path_agrees_with_table() {
        for cp in 0u32..0x80 {
            let idx = CLASS_RANGES.partition_point(|&(start, _)| start <= cp);
            assert_eq!(class(cp), CLASS_RANGES[idx - 1].1, "cp {cp:#x}");
        }
    }

    #[test]
    fn some_classes() {
        assert_eq!(class('é' as u32), LETTER);
        assert_eq!(class('中' as u32), LETTER);
        assert_eq!(class('٣' as u32), NUMBER);
        assert_eq!(class('。' as u32), PUNCTUATION);
        assert_eq!(class(0x378), UNDEFINED);
        assert!(is_whitespace(0x3000));
        assert!(!is_whitespace(0x1C));
    }
}
