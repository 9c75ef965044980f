//! Splitting raw text around special tokens (llama.cpp's `tokenizer_st_partition`).
//!
//! llama.cpp takes the special tokens longest first and, for each one in turn, cuts every
//! still-raw fragment at its non-overlapping occurrences, left to right. So a longer token
//! always wins over a shorter one anywhere in the text, not just at the same position.
//! We get the same result without one full-text search per token (Gemma has thousands):
//! find all occurrences with a trie, then accept them in (priority, position) order unless
//! they overlap something already accepted.

/// A piece of the input: raw text (byte range) or an already-decided token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fragment {
    Text(usize, usize),
    Token(u32),
}

#[derive(Default)]
struct Node {
    edges: Vec<(u8, u32)>,
    /// Index into `Specials::tokens` of the token ending here.
    term: Option<u32>,
}

pub(crate) struct Special {
    pub id: u32,
    pub len: usize,
    /// Control and unknown tokens are only matched when parse_special is on; user-defined
    /// tokens always are.
    pub needs_parse_special: bool,
}

#[derive(Default)]
pub(crate) struct Specials {
    /// In priority order: longer text first, then lower id.
    tokens: Vec<Special>,
    nodes: Vec<Node>,
    first_byte: Vec<bool>,
}

impl Specials {
    /// `items`: (id, text, needs_parse_special). Empty texts are ignored.
    pub(crate) fn new(mut items: Vec<(u32, &str, bool)>) -> Specials {
        items.retain(|(_, t, _)| !t.is_empty());
        items.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        let mut s = Specials {
            tokens: Vec::with_capacity(items.len()),
            nodes: vec![Node::default()],
            first_byte: vec![false; 256],
        };
        for (prio, (id, text, needs)) in items.into_iter().enumerate() {
            s.tokens.push(Special {
                id,
                len: text.len(),
                needs_parse_special: needs,
            });
            let mut node = 0usize;
            for &b in text.as_bytes() {
                node = match s.nodes[node].edges.binary_search_by_key(&b, |e| e.0) {
                    Ok(i) => s.nodes[node].edges[i].1 as usize,
                    Err(i) => {
                        let new = s.nodes.len();
                        s.nodes.push(Node::default());
                        s.nodes[node].edges.insert(i, (b, new as u32));
                        new
                    }
                };
            }
            // Duplicate texts cannot happen in a valid vocabulary; keep the first anyway.
            if s.nodes[node].term.is_none() {
                s.nodes[node].term = Some(prio as u32);
            }
            s.first_byte[usize::from(text.as_bytes()[0])] = true;
        }
        s
    }

    pub(crate) fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let bytes = text.as_bytes();
        // (priority, start) of every occurrence of every eligible special token, found in
        // increasing start order.
        let mut occ: Vec<(u32, usize)> = Vec::new();
        for start in 0..bytes.len() {
            if !self.first_byte[usize::from(bytes[start])] {
                continue;
            }
            let mut node = 0usize;
            for &b in &bytes[start..] {
                let edges = &self.nodes[node].edges;
                match edges.binary_search_by_key(&b, |e| e.0) {
                    Ok(i) => node = edges[i].1 as usize,
                    Err(_) => break,
                }
                if let Some(prio) = self.nodes[node].term {
                    let tok = &self.tokens[prio as usize];
                    if parse_special || !tok.needs_parse_special {
                        occ.push((prio, start));
                    }
                }
            }
        }
        if occ.is_empty() {
            return if text.is_empty() {
                Vec::new()
            } else {
                vec![Fragment::Text(0, bytes.len())]
            };
        }
        // Counting sort by priority; stable, so each priority keeps increasing starts.
        // (Whitespace runs in Gemma's vocabulary make this list large: ~30 per byte.)
        let mut first = vec![0u32; self.tokens.len() + 1];
        for &(prio, _) in &occ {
            first[prio as usize + 1] += 1;
        }
        for i in 1..first.len() {
            first[i] += first[i - 1];
        }
        let mut sorted = vec![(0u32, 0usize); occ.len()];
        for &(prio, start) in &occ {
            let slot = &mut first[prio as usize];
            sorted[*slot as usize] = (prio, start);
            *slot += 1;
        }
        let mut taken = vec![false; bytes.len()];
        let mut accepted: Vec<(usize, usize, u32)> = Vec::new();
        for (prio, start) in sorted {
            let tok = &self.tokens[prio as usize];
            let span = start..start + tok.len;
            if taken[span.clone()].iter().any(|&t| t) {
                continue;
            }
            taken[span].iter_mut().for_each(|t| *t = true);
            accepted.push((start, tok.len, tok.id));
        }
        accepted.sort_unstable();
        let mut out = Vec::with_capacity(accepted.len() * 2 + 1);
        let mut pos = 0;
        for (start, len, id) in accepted {
            if start > pos {
                out.push(Fragment::Text(pos, start));
            }
            out.push(Fragment::Token(id));
            pos = start + len;
        }
        if pos < bytes.len() {
            out.push(Fragment::Text(pos, bytes.len()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Fragment::*;

    #[test]
    fn longest_token_wins_globally() {
        // "<a>" occurs at 0, but the longer "a><a" is taken first and blocks it.
        let s = Specials::new(vec![(1, "<a>", true), (2, "a><a", true)]);
        assert_eq!(
            s.partition("<a><a>", true),
            [Text(0, 1), Token(2), Text(5, 6)]
        );
        assert_eq!(s.partition("x<a>y", false), [Text(0, 5)]);
        assert_eq!(
            s.partition("x<a>y", true),
            [Text(0, 1), Token(1), Text(4, 5)]
        );
    }

    #[test]
    fn user_defined_always_and_repeats() {
        let s = Specials::new(vec![(7, "  ", false), (8, "   ", false)]);
        // 7 spaces: the 3-space token takes 0..3 and 3..6, the last space stays text.
        assert_eq!(
            s.partition("       ", false),
            [Token(8), Token(8), Text(6, 7)]
        );
        assert_eq!(s.partition("", true), []);
    }
}
