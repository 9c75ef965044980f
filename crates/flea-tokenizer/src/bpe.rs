//! Byte-level BPE (llama.cpp's `llm_tokenizer_bpe_session`): per word, repeatedly merge the
//! adjacent pair with the lowest merge rank (leftmost first on ties).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// GPT-2's reversible byte → printable-character table.
pub(crate) fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next_extra = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let cp = if printable {
            b as u32
        } else {
            let cp = next_extra;
            next_extra += 1;
            cp
        };
        // All values are below 0x144, hence valid chars.
        *slot = char::from_u32(cp).unwrap_or('\u{FFFD}');
    }
    table
}

/// Merge ranks keyed by the merged text, so a lookup needs no allocation: the two
/// adjacent symbols of a word are always one contiguous slice of it.
#[derive(Default)]
pub(crate) struct Merges {
    /// concatenation -> (byte length of the left part, rank) of its first merge entry
    first: HashMap<Box<str>, (u32, u32)>,
    /// further entries for concatenations that split in more than one way ("a bc" / "ab c")
    extra: HashMap<Box<str>, Vec<(u32, u32)>>,
}

impl Merges {
    /// `merges[i]` is "left right" with rank `i`. Like llama.cpp, the separator is the first
    /// space after the first byte, and a repeated pair keeps its first rank.
    pub(crate) fn new<'a>(merges: impl Iterator<Item = &'a str>) -> Merges {
        let mut m = Merges::default();
        for (rank, line) in merges.enumerate() {
            // Byte search: the first character may be multi-byte (e.g. "Ġ t").
            let sep = line.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1);
            let Some(sep) = sep else {
                continue; // llama.cpp records an ("", "") pair that can never match
            };
            let (Some(left), Some(right)) = (line.get(..sep), line.get(sep + 1..)) else {
                continue;
            };
            if left.is_empty() || right.is_empty() {
                continue;
            }
            let concat: Box<str> = format!("{left}{right}").into();
            let entry = (left.len() as u32, rank as u32);
            match m.first.get(&concat) {
                None => {
                    m.first.insert(concat, entry);
                }
                Some(&(l, _)) if l == entry.0 => {}
                Some(_) => {
                    let v = m.extra.entry(concat).or_default();
                    if !v.iter().any(|&(l, _)| l == entry.0) {
                        v.push(entry);
                    }
                }
            }
        }
        m
    }

    fn rank(&self, concat: &str, left_len: usize) -> Option<u32> {
        let &(l, r) = self.first.get(concat)?;
        if l as usize == left_len {
            return Some(r);
        }
        self.extra
            .get(concat)?
            .iter()
            .find(|&&(l, _)| l as usize == left_len)
            .map(|&(_, r)| r)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.first.len() + self.extra.values().map(Vec::len).sum::<usize>()
    }
}

#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
}

const NIL: usize = usize::MAX;

/// Split one byte-mapped word into symbols and merge them; returns the surviving pieces
/// as byte ranges of `word`, in order.
pub(crate) fn merge_word(merges: &Merges, word: &str, out: &mut Vec<(usize, usize)>) {
    let mut syms: Vec<Sym> = Vec::with_capacity(word.len());
    for (i, (start, ch)) in word.char_indices().enumerate() {
        syms.push(Sym {
            start,
            len: ch.len_utf8(),
            prev: if i == 0 { NIL } else { i - 1 },
            next: i + 1,
        });
    }
    if let Some(last) = syms.last_mut() {
        last.next = NIL;
    }
    // (rank, left, right, merged byte size); min-heap on rank then left index.
    let mut heap: BinaryHeap<Reverse<(u32, usize, usize, usize)>> = BinaryHeap::new();
    let push = |heap: &mut BinaryHeap<_>, syms: &[Sym], l: usize, r: usize| {
        if l == NIL || r == NIL {
            return;
        }
        let (a, b) = (syms[l], syms[r]);
        let size = a.len + b.len;
        if let Some(text) = word.get(a.start..a.start + size) {
            if let Some(rank) = merges.rank(text, a.len) {
                heap.push(Reverse((rank, l, r, size)));
            }
        }
    };
    for i in 1..syms.len() {
        push(&mut heap, &syms, i - 1, i);
    }
    while let Some(Reverse((_, l, r, size))) = heap.pop() {
        let (a, b) = (syms[l], syms[r]);
        // A pair is stale once either side changed; both only ever grow, so sizes tell.
        if a.len == 0 || b.len == 0 || a.len + b.len != size {
            continue;
        }
        syms[l].len = size;
        syms[r].len = 0;
        syms[l].next = b.next;
        if b.next != NIL {
            syms[b.next].prev = l;
        }
        push(&mut heap, &syms, a.prev, l);
        push(&mut heap, &syms, l, b.next);
    }
    out.extend(
        syms.iter()
            .filter(|s| s.len > 0)
            .map(|s| (s.start, s.start + s.len)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_gpt2() {
        let t = byte_to_char_table();
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[0xAD], 'Ń');
        let mut seen: Vec<char> = t.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
    }

    fn pieces(m: &Merges, w: &str) -> Vec<String> {
        let mut out = Vec::new();
        merge_word(m, w, &mut out);
        out.into_iter().map(|(a, b)| w[a..b].to_string()).collect()
    }

    #[test]
    fn lowest_rank_first() {
        let m = Merges::new(["b c", "a b", "a bc", "ab c"].into_iter());
        // "b c" (rank 0) wins over "a b" (rank 1), then "a bc" (rank 2).
        assert_eq!(pieces(&m, "abc"), ["abc"]);
        let m = Merges::new(["a b", "b c"].into_iter());
        assert_eq!(pieces(&m, "abc"), ["ab", "c"]);
        // leftmost on equal ranks
        let m = Merges::new(["a a"].into_iter());
        assert_eq!(pieces(&m, "aaa"), ["aa", "a"]);
        assert_eq!(pieces(&m, "aaaa"), ["aa", "aa"]);
    }

    #[test]
    fn bad_merge_lines_are_ignored() {
        let m = Merges::new(["nospace", " x", "", "a b"].into_iter());
        assert_eq!(m.len(), 1);
        assert_eq!(pieces(&m, "ab"), ["ab"]);
    }
}
