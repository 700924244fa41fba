//! Which examples form each batch: a seeded shuffle per epoch, never two examples with the same
//! positive in one batch (the copy would be scored as a wrong answer to its twin's query), and
//! optionally batches of similar length drawn without biasing the order.

use std::collections::{HashSet, VecDeque};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// How batches are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplerConfig {
    pub batch_size: usize,
    pub seed: u64,
    /// Group examples of similar length (less padding): the shuffled order is cut into pools of
    /// this many batches, each pool is sorted by length, the result is cut into batches, and the
    /// batches are shuffled again. `None` keeps the shuffled order.
    pub length_pool_batches: Option<usize>,
}

/// The batches of one epoch, as indices into the examples. Every example is in exactly one batch
/// except a last batch of a single example, which is dropped (it has no in-batch negative).
///
/// `positives[i]` identifies example `i`'s positive; `lengths[i]` is its token count (used only
/// when grouping by length).
pub fn epoch_batches(
    positives: &[&str],
    lengths: &[usize],
    config: SamplerConfig,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let mut rng =
        ChaCha8Rng::seed_from_u64(config.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..positives.len()).collect();
    order.shuffle(&mut rng);
    let batch_size = config.batch_size.max(1);
    match config.length_pool_batches {
        None => without_duplicates(order, positives, batch_size),
        Some(pool_batches) => {
            let mut grouped = Vec::with_capacity(order.len());
            for pool in order.chunks(batch_size.saturating_mul(pool_batches.max(1))) {
                let mut pool = pool.to_vec();
                pool.sort_by_key(|&i| lengths.get(i).copied().unwrap_or(0));
                grouped.extend(pool);
            }
            let mut batches = without_duplicates(grouped, positives, batch_size);
            batches.shuffle(&mut rng);
            batches
        }
    }
}

/// Cuts `order` into batches, deferring an example whose positive is already in the current
/// batch to the next batch that has room for it (sentence-transformers' NoDuplicatesBatchSampler
/// does the same).
fn without_duplicates(order: Vec<usize>, positives: &[&str], batch_size: usize) -> Vec<Vec<usize>> {
    let mut queue: VecDeque<usize> = order.into();
    let mut batches = Vec::new();
    while !queue.is_empty() {
        // Sized from the data: `batch_size` itself is the user's number, possibly huge.
        let mut batch = Vec::with_capacity(batch_size.min(queue.len()));
        let mut seen = HashSet::new();
        let mut deferred = Vec::new();
        while batch.len() < batch_size {
            let Some(i) = queue.pop_front() else { break };
            if seen.insert(positives[i]) {
                batch.push(i);
            } else {
                deferred.push(i);
            }
        }
        for i in deferred.into_iter().rev() {
            queue.push_front(i);
        }
        if batch.len() >= 2 {
            batches.push(batch);
        } else if batch.len() == 1 && queue.is_empty() {
            // A single leftover example: no in-batch negative to learn from.
        } else if batch.len() == 1 {
            // Everything left shares one positive: nothing more can be batched.
            break;
        }
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(batch_size: usize, pool: Option<usize>) -> SamplerConfig {
        SamplerConfig {
            batch_size,
            seed: 7,
            length_pool_batches: pool,
        }
    }

    #[test]
    fn no_batch_holds_a_positive_twice_and_every_example_is_used() {
        // 40 examples over 10 positives: each positive four times.
        let names: Vec<String> = (0..40).map(|i| format!("p{}", i % 10)).collect();
        let positives: Vec<&str> = names.iter().map(String::as_str).collect();
        let lengths = vec![5; 40];
        for pool in [None, Some(2)] {
            let batches = epoch_batches(&positives, &lengths, config(8, pool), 0);
            let mut used: Vec<usize> = batches.iter().flatten().copied().collect();
            used.sort_unstable();
            let before = used.len();
            used.dedup();
            assert_eq!(used.len(), before, "an example is used twice");
            // At most a single leftover example is dropped (no in-batch negative for it).
            assert!(used.len() >= 39, "{} of 40 used ({pool:?})", used.len());
            for batch in &batches {
                let distinct: HashSet<&str> = batch.iter().map(|&i| positives[i]).collect();
                assert_eq!(
                    distinct.len(),
                    batch.len(),
                    "duplicate positive in {batch:?}"
                );
            }
        }
    }

    #[test]
    fn shuffles_by_seed_and_epoch() {
        let names: Vec<String> = (0..50).map(|i| format!("p{i}")).collect();
        let positives: Vec<&str> = names.iter().map(String::as_str).collect();
        let lengths = vec![1; 50];
        let first = epoch_batches(&positives, &lengths, config(4, None), 0);
        assert_eq!(
            first,
            epoch_batches(&positives, &lengths, config(4, None), 0)
        );
        assert_ne!(
            first,
            epoch_batches(&positives, &lengths, config(4, None), 1)
        );
        let other_seed = SamplerConfig {
            seed: 8,
            ..config(4, None)
        };
        assert_ne!(first, epoch_batches(&positives, &lengths, other_seed, 0));
        // 50 = 12 × 4 + 2: the last batch is partial but kept.
        assert_eq!(first.len(), 13);
        assert_ne!(first[0], [0, 1, 2, 3]);
    }

    #[test]
    fn length_pools_make_batches_of_similar_length() {
        let names: Vec<String> = (0..64).map(|i| format!("p{i}")).collect();
        let positives: Vec<&str> = names.iter().map(String::as_str).collect();
        let lengths: Vec<usize> = (0..64).map(|i| (i * 37) % 64).collect();
        let spread = |batches: &[Vec<usize>]| -> usize {
            batches
                .iter()
                .map(|b| {
                    let l: Vec<usize> = b.iter().map(|&i| lengths[i]).collect();
                    l.iter().max().unwrap_or(&0) - l.iter().min().unwrap_or(&0)
                })
                .sum()
        };
        let grouped = epoch_batches(&positives, &lengths, config(4, Some(16)), 0);
        let plain = epoch_batches(&positives, &lengths, config(4, None), 0);
        assert!(
            spread(&grouped) * 4 < spread(&plain),
            "{} vs {}",
            spread(&grouped),
            spread(&plain)
        );
        // The batches themselves are still shuffled: not in order of length.
        let firsts: Vec<usize> = grouped.iter().map(|b| lengths[b[0]]).collect();
        let mut sorted = firsts.clone();
        sorted.sort_unstable();
        assert_ne!(firsts, sorted);
    }

    #[test]
    fn r18_2_a_huge_batch_size_is_sized_from_the_data() {
        let positives = ["a", "b", "c"];
        for pool in [None, Some(50)] {
            let batches = epoch_batches(&positives, &[1, 2, 3], config(usize::MAX, pool), 0);
            assert_eq!(batches.len(), 1);
            assert_eq!(batches[0].len(), 3);
        }
    }

    #[test]
    fn all_one_positive_gives_no_batch() {
        let positives = vec!["same"; 5];
        let batches = epoch_batches(&positives, &[1; 5], config(4, None), 0);
        assert!(batches.is_empty());
    }
}
