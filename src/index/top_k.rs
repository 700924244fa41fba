//! The `k` best of many scored documents, shared by both indexes so they rank and break ties
//! the same way: higher score first, then lower position.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use super::Hit;

/// A scored document ordered by quality: higher score first, then lower position.
#[derive(Debug, Clone, Copy)]
struct Ranked {
    score: f32,
    doc: usize,
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.doc.cmp(&self.doc))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ranked {}

/// The `k` best documents offered so far, which must be offered in ascending position: a
/// min-heap whose top is the worst kept. Because positions ascend, a later document with an
/// equal score never displaces a kept one, so once the heap is full only a strictly higher
/// score gets in and the hot loop is a single float comparison.
pub(super) struct TopK {
    k: usize,
    heap: BinaryHeap<Reverse<Ranked>>,
    /// The worst kept score once the heap is full, else −∞.
    threshold: f32,
}

impl TopK {
    pub(super) fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
            threshold: f32::NEG_INFINITY,
        }
    }

    /// Offers document `doc`, which must come after every document offered before.
    #[inline]
    pub(super) fn offer(&mut self, doc: usize, score: f32) {
        if self.heap.len() < self.k {
            self.heap.push(Reverse(Ranked { score, doc }));
            if self.heap.len() == self.k {
                self.threshold = self.worst_score();
            }
        } else if score > self.threshold {
            // Replacing the top through `PeekMut` sifts it down once on drop.
            if let Some(mut worst) = self.heap.peek_mut() {
                *worst = Reverse(Ranked { score, doc });
            }
            self.threshold = self.worst_score();
        }
    }

    /// Offers the scores of documents `first_doc..first_doc + row.len()`.
    pub(super) fn offer_row(&mut self, first_doc: usize, row: &[f32]) {
        for (doc, &score) in (first_doc..).zip(row) {
            self.offer(doc, score);
        }
    }

    fn worst_score(&self) -> f32 {
        self.heap
            .peek()
            .map_or(f32::NEG_INFINITY, |Reverse(worst)| worst.score)
    }

    /// The kept documents, best first.
    pub(super) fn into_hits(self) -> Vec<Hit> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|Reverse(Ranked { score, doc })| Hit { doc, score })
            .collect()
    }
}

/// Keeps the `k` best of `hits` (any order, distinct documents), best first: a linear-time
/// selection, then a sort of the `k` kept. For BM25, whose candidates arrive unordered and
/// number thousands per query, this beat sorting them by position for [`TopK`].
pub(super) fn select_best(hits: &mut Vec<Hit>, k: usize) {
    let better_first = |a: &Hit, b: &Hit| {
        let rank = |hit: &Hit| Ranked {
            score: hit.score,
            doc: hit.doc,
        };
        rank(b).cmp(&rank(a))
    };
    if k == 0 {
        hits.clear();
        return;
    }
    if hits.len() > k {
        hits.select_nth_unstable_by(k - 1, better_first);
        hits.truncate(k);
    }
    hits.sort_unstable_by(better_first);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_best_and_breaks_ties_by_position() {
        let mut top = TopK::new(3);
        top.offer_row(0, &[0.5, 0.9, 0.5, 0.1, 0.9, 0.5, 0.7]);
        let hits: Vec<(usize, f32)> = top.into_hits().iter().map(|h| (h.doc, h.score)).collect();
        assert_eq!(hits, [(1, 0.9), (4, 0.9), (6, 0.7)]);
        let mut top = TopK::new(2);
        top.offer_row(10, &[0.5, 0.5, 0.5]);
        let hits: Vec<usize> = top.into_hits().iter().map(|h| h.doc).collect();
        assert_eq!(hits, [10, 11]);
    }

    #[test]
    fn selection_agrees_with_the_heap() {
        let scores = [0.5, 0.9, 0.5, 0.1, 0.9, 0.5, 0.7, 0.5];
        for k in 0..=scores.len() + 1 {
            let mut top = TopK::new(k);
            top.offer_row(0, &scores);
            let mut hits: Vec<Hit> = scores
                .iter()
                .enumerate()
                .rev()
                .map(|(doc, &score)| Hit { doc, score })
                .collect();
            select_best(&mut hits, k);
            assert_eq!(hits, top.into_hits(), "k = {k}");
        }
    }
}
