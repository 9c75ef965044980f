//! SentencePiece-style BPE as llama.cpp runs it for `tokenizer.ggml.model = "llama"`:
//! start from single characters and keep merging the adjacent pair whose concatenation is
//! the vocabulary token with the highest score (leftmost first on ties).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    fn cmp(&self, o: &Self) -> Ordering {
        // Max-heap: higher score first, then the smaller left index.
        self.score
            .partial_cmp(&o.score)
            .unwrap_or(Ordering::Equal)
            .then(o.left.cmp(&self.left))
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

/// Merge `text` into pieces; returns byte ranges of `text`. A piece is either a vocabulary
/// token or a single character that the caller must spell with byte tokens.
pub(crate) fn merge(
    text: &str,
    token_to_id: &HashMap<Box<str>, u32>,
    scores: &[f32],
    out: &mut Vec<(usize, usize)>,
) {
    let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
    for (i, (start, ch)) in text.char_indices().enumerate() {
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
    let mut heap = BinaryHeap::new();
    let push = |heap: &mut BinaryHeap<Bigram>, syms: &[Sym], l: usize, r: usize| {
        if l == NIL || r == NIL {
            return;
        }
        let size = syms[l].len + syms[r].len;
        let Some(piece) = text.get(syms[l].start..syms[l].start + size) else {
            return;
        };
        if let Some(&id) = token_to_id.get(piece) {
            let score = scores.get(id as usize).copied().unwrap_or(0.0);
            heap.push(Bigram {
                score,
                left: l,
                right: r,
                size,
            });
        }
    };
    for i in 1..syms.len() {
        push(&mut heap, &syms, i - 1, i);
    }
    while let Some(b) = heap.pop() {
        let (l, r) = (syms[b.left], syms[b.right]);
        // Both sides only ever grow, so a size mismatch means the pair is stale.
        if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
            continue;
        }
        syms[b.left].len = b.size;
        syms[b.right].len = 0;
        syms[b.left].next = r.next;
        if r.next != NIL {
            syms[r.next].prev = b.left;
        }
        push(&mut heap, &syms, l.prev, b.left);
        push(&mut heap, &syms, b.left, r.next);
    }
    out.extend(
        syms.iter()
            .filter(|s| s.len > 0)
            .map(|s| (s.start, s.start + s.len)),
    );
}
