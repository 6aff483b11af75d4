//! N-gram (prompt lookup) drafts for speculative decoding: a sequence's next tokens are
//! guessed by finding the most recent earlier place where its last few tokens occurred and
//! copying what followed, as vLLM's `ngram` and LMDeploy's prompt-lookup proposers do. It costs
//! no model and pays off on text that repeats its context (code edits, quoting, summaries).

/// Longest suffix tried first; shorter ones down to [`MIN_NGRAM`] are tried after it.
pub const MAX_NGRAM: usize = 3;
/// Shortest suffix that may propose a draft.
pub const MIN_NGRAM: usize = 1;

/// `k` draft tokens for `tokens` (prompt + generated so far): for `n` from [`MAX_NGRAM`] down
/// to [`MIN_NGRAM`], the tokens that followed the most recent earlier occurrence of the last
/// `n` tokens. Empty when no suffix occurred before.
pub fn propose(tokens: &[u32], k: usize) -> Vec<u32> {
    let len = tokens.len();
    if k == 0 {
        return Vec::new();
    }
    for n in (MIN_NGRAM..=MAX_NGRAM).rev() {
        if n >= len {
            continue;
        }
        let tail = &tokens[len - n..];
        // Starts before `len - n`, so the match is earlier than the suffix itself and at
        // least one token follows it.
        if let Some(i) = (0..len - n).rev().find(|&i| &tokens[i..i + n] == tail) {
            // Copy what followed; past the end of the context, keep copying from the draft
            // itself (an overlapping copy, as in LZ77), so a repeating pattern whose last
            // occurrence is close to the end still yields `k` tokens.
            let from = i + n;
            let mut draft = Vec::with_capacity(k);
            for j in from..from + k {
                let t = if j < len { tokens[j] } else { draft[j - len] };
                draft.push(t);
            }
            return draft;
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_suffix_and_its_most_recent_match_win() {
        // Suffix [1, 2, 3] occurs at 0 (followed by 9) and at 5 (followed by 7, 8).
        let t = [1, 2, 3, 9, 0, 1, 2, 3, 7, 8, 5, 1, 2, 3];
        assert_eq!(propose(&t, 2), vec![7, 8]);
        assert_eq!(propose(&t, 5), vec![7, 8, 5, 1, 2]);
    }

    #[test]
    fn shorter_suffixes_are_tried_when_longer_ones_never_occurred() {
        // [4, 5, 6] and [5, 6] are new; [6] occurred at 1, followed by 7, 8.
        let t = [0, 6, 7, 8, 4, 5, 6];
        assert_eq!(propose(&t, 3), vec![7, 8, 4]);
    }

    #[test]
    fn a_match_near_the_end_continues_its_own_pattern() {
        // [3, 3, 3] last occurred at 2, with one token after it; the copy goes on from there.
        assert_eq!(propose(&[3, 3, 3, 3, 3, 3], 4), vec![3, 3, 3, 3]);
        // [1, 2] last occurred at 2; period 2.
        assert_eq!(propose(&[0, 9, 1, 2, 1, 2], 5), vec![1, 2, 1, 2, 1]);
    }

    #[test]
    fn nothing_is_proposed_without_an_earlier_occurrence() {
        assert!(propose(&[1, 2, 3, 4], 4).is_empty());
        assert!(propose(&[1], 4).is_empty());
        assert!(propose(&[], 4).is_empty());
        assert!(propose(&[1, 1], 0).is_empty());
    }
}
