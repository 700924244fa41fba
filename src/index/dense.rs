//! Exact nearest-neighbour search over L2-normalised embeddings, where cosine similarity is the
//! dot product.
//!
//! Queries are scored a block at a time: a block of queries times a block of documents is one
//! matrix multiply (candle's CPU matmul, which runs the `gemm` crate's SIMD kernels on the rayon
//! pool), and each query keeps its `k` best in a bounded heap while the document blocks stream
//! past. Memory is therefore [`QUERY_BLOCK`] × [`DOC_BLOCK`] scores however many queries and
//! documents there are; the full queries × documents matrix never exists.
//!
//! The search is exact on purpose: an approximate index (HNSW, IVF) has to win back its build
//! time, and mining hard negatives wants the true neighbours. 10,000 queries against 10,000
//! chunks of 384 dimensions, top 100, cost 2.1 CPU-seconds here (2.4 to 4.8 s wall on the shared
//! 2-core box, see `search_speed`). Building an HNSW graph over those chunks (M = 16,
//! ef_construction = 200) takes on the order of 10⁷ scattered distance computations, a fifth of
//! the exact search's 10⁸ but without the matrix multiply's cache blocking and SIMD, so by
//! estimate it costs about as much as the exact search it would replace; it would pay only
//! from hundreds of thousands of chunks, more than this tool indexes.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::top_k::TopK;
use super::{Hit, IndexError, OnProgress};

/// Queries per matrix multiply.
const QUERY_BLOCK: usize = 256;

/// Documents per matrix multiply: a 256 × 8192 block of scores is 8 MiB.
const DOC_BLOCK: usize = 8192;

/// How far from 1 an embedding's L2 norm may be. Embeddings normalised in f32 land within
/// 1e-6; bf16 round trips within about 1e-2.
const NORM_TOLERANCE: f32 = 2e-2;

/// An exact cosine-similarity index over row-major, L2-normalised document embeddings.
#[derive(Debug)]
pub struct DenseIndex {
    dim: usize,
    len: usize,
    /// The documents as an `n × dim` tensor on the CPU.
    docs: Tensor,
}

impl DenseIndex {
    /// Takes `n × dim` embeddings, row-major. Every row must be finite with unit L2 norm (within
    /// [`NORM_TOLERANCE`]): a stray unnormalised row would silently outrank the rest.
    pub fn new(dim: usize, data: Vec<f32>) -> Result<Self, IndexError> {
        let len = check_unit_rows("document embeddings", &data, dim)?;
        let docs = Tensor::from_vec(data, (len, dim), &Device::Cpu).map_err(IndexError::Matmul)?;
        Ok(Self { dim, len, docs })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of indexed documents.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `k` most similar documents to each of the `m × dim` row-major `queries` (also
    /// normalised), best first; equal scores rank by document position. `on_progress` hears
    /// how many queries finished after each block.
    pub fn search_batch(
        &self,
        queries: &[f32],
        k: usize,
        on_progress: OnProgress<'_>,
    ) -> Result<Vec<Vec<Hit>>, IndexError> {
        let num_queries = check_unit_rows("query embeddings", queries, self.dim)?;
        let k = k.min(self.len);
        if k == 0 {
            on_progress(num_queries);
            return Ok(vec![Vec::new(); num_queries]);
        }
        let mut results = Vec::with_capacity(num_queries);
        for block in queries.chunks(QUERY_BLOCK * self.dim) {
            let rows = block.len() / self.dim;
            let block = Tensor::from_slice(block, (rows, self.dim), &Device::Cpu)
                .map_err(IndexError::Matmul)?;
            let mut best: Vec<TopK> = (0..rows).map(|_| TopK::new(k)).collect();
            for start in (0..self.len).step_by(DOC_BLOCK) {
                let width = DOC_BLOCK.min(self.len - start);
                let scores = self
                    .docs
                    .narrow(0, start, width)
                    .and_then(|docs| block.matmul(&docs.t()?))
                    .and_then(|scores| scores.flatten_all()?.to_vec1::<f32>())
                    .map_err(IndexError::Matmul)?;
                best.par_iter_mut()
                    .zip(scores.par_chunks(width))
                    .for_each(|(best, row)| best.offer_row(start, row));
            }
            results.extend(best.into_iter().map(TopK::into_hits));
            on_progress(rows);
        }
        Ok(results)
    }
}

/// Keeps the first `new_dim` components of each `dim`-wide row and rescales them to unit norm:
/// how a Matryoshka-trained model is used at a smaller size.
pub fn truncate_and_normalize(
    data: &[f32],
    dim: usize,
    new_dim: usize,
) -> Result<Vec<f32>, IndexError> {
    if dim == 0 {
        return Err(IndexError::ZeroDimension);
    }
    if new_dim == 0 || new_dim > dim {
        return Err(IndexError::BadTruncation {
            dim,
            requested: new_dim,
        });
    }
    if !data.len().is_multiple_of(dim) {
        return Err(IndexError::RaggedMatrix {
            what: "embeddings",
            len: data.len(),
            dim,
        });
    }
    let mut out = Vec::with_capacity(data.len() / dim * new_dim);
    for (row, values) in data.chunks_exact(dim).enumerate() {
        let prefix = &values[..new_dim];
        let norm = prefix.iter().map(|x| x * x).sum::<f32>().sqrt();
        if !norm.is_finite() || norm == 0.0 {
            return Err(IndexError::NotNormalizable { row, dim: new_dim });
        }
        out.extend(prefix.iter().map(|x| x / norm));
    }
    Ok(out)
}

/// Checks that `data` is whole rows of `dim` finite values with unit norm; returns the row count.
fn check_unit_rows(what: &'static str, data: &[f32], dim: usize) -> Result<usize, IndexError> {
    if dim == 0 {
        return Err(IndexError::ZeroDimension);
    }
    if !data.len().is_multiple_of(dim) {
        return Err(IndexError::RaggedMatrix {
            what,
            len: data.len(),
            dim,
        });
    }
    data.par_chunks_exact(dim)
        .enumerate()
        .try_for_each(|(row, values)| {
            if values.iter().any(|x| !x.is_finite()) {
                return Err(IndexError::NotFinite { row });
            }
            let norm = values.iter().map(|x| x * x).sum::<f32>().sqrt();
            if (norm - 1.0).abs() > NORM_TOLERANCE {
                return Err(IndexError::NotNormalized { row, norm });
            }
            Ok(())
        })?;
    Ok(data.len() / dim)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn random_unit_rows(rng: &mut ChaCha8Rng, rows: usize, dim: usize) -> Vec<f32> {
        let mut data: Vec<f32> = (0..rows * dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        for row in data.chunks_exact_mut(dim) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= norm);
        }
        data
    }

    /// Scores every pair in f64 and sorts: the slow, obviously right answer.
    fn brute_force(docs: &[f32], queries: &[f32], dim: usize, k: usize) -> Vec<Vec<(usize, f64)>> {
        queries
            .chunks_exact(dim)
            .map(|query| {
                let mut scored: Vec<(usize, f64)> = docs
                    .chunks_exact(dim)
                    .enumerate()
                    .map(|(doc, values)| {
                        let dot = values
                            .iter()
                            .zip(query)
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum();
                        (doc, dot)
                    })
                    .collect();
                scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                scored.truncate(k);
                scored
            })
            .collect()
    }

    #[test]
    fn matches_brute_force_across_blocks() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let dim = 24;
        // More documents than one block and more queries than one block, neither a multiple.
        let (num_docs, num_queries, k) = (DOC_BLOCK + 1_000, QUERY_BLOCK + 45, 7);
        let docs = random_unit_rows(&mut rng, num_docs, dim);
        let queries = random_unit_rows(&mut rng, num_queries, dim);
        let index = DenseIndex::new(dim, docs.clone()).expect("the embeddings are valid");
        let hits = index
            .search_batch(&queries, k, &|_| {})
            .expect("the batch search succeeds");
        let expected = brute_force(&docs, &queries, dim, k);
        assert_eq!(hits.len(), num_queries);
        for (got, want) in hits.iter().zip(&expected) {
            assert_eq!(got.len(), k);
            for (hit, (doc, score)) in got.iter().zip(want) {
                // f32 accumulation may swap neighbours closer than its rounding; none are here.
                assert_eq!(hit.doc, *doc, "{got:?} vs {want:?}");
                assert!((f64::from(hit.score) - score).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn ties_rank_by_position() {
        let dim = 2;
        let docs = vec![
            0.6, 0.8, // 0
            1.0, 0.0, // 1: best
            0.6, 0.8, // 2
            0.0, 1.0, // 3
            0.6, 0.8, // 4
        ];
        let index = DenseIndex::new(dim, docs).expect("the embeddings are valid");
        let hits = index
            .search_batch(&[1.0, 0.0], 3, &|_| {})
            .expect("the batch search succeeds");
        let docs: Vec<usize> = hits[0].iter().map(|hit| hit.doc).collect();
        assert_eq!(docs, [1, 0, 2]);
        assert_eq!(hits[0][1].score, hits[0][2].score);
    }

    #[test]
    fn k_beyond_the_corpus_and_zero() {
        let index = DenseIndex::new(2, vec![1.0, 0.0, 0.0, 1.0]).expect("the embeddings are valid");
        let hits = index
            .search_batch(&[0.0, 1.0], 10, &|_| {})
            .expect("the batch search succeeds");
        assert_eq!(
            hits[0].iter().map(|hit| hit.doc).collect::<Vec<_>>(),
            [1, 0]
        );
        let none = index
            .search_batch(&[0.0, 1.0, 1.0, 0.0], 0, &|_| {})
            .expect("the batch search succeeds");
        assert_eq!(none, vec![Vec::<Hit>::new(), Vec::new()]);
        let empty = DenseIndex::new(2, Vec::new()).expect("the embeddings are valid");
        assert_eq!(
            empty
                .search_batch(&[1.0, 0.0], 3, &|_| {})
                .expect("the batch search succeeds"),
            [vec![]]
        );
    }

    #[test]
    fn rejects_bad_embeddings() {
        assert!(matches!(
            DenseIndex::new(3, vec![1.0, 0.0]),
            Err(IndexError::RaggedMatrix { len: 2, dim: 3, .. })
        ));
        assert!(matches!(
            DenseIndex::new(2, vec![1.0, 0.0, 3.0, 4.0]),
            Err(IndexError::NotNormalized { row: 1, .. })
        ));
        assert!(matches!(
            DenseIndex::new(2, vec![f32::NAN, 1.0]),
            Err(IndexError::NotFinite { row: 0 })
        ));
        assert!(matches!(
            DenseIndex::new(0, vec![]),
            Err(IndexError::ZeroDimension)
        ));
        let index = DenseIndex::new(2, vec![1.0, 0.0]).expect("the embeddings are valid");
        assert!(matches!(
            index.search_batch(&[2.0, 0.0], 1, &|_| {}),
            Err(IndexError::NotNormalized { row: 0, .. })
        ));
    }

    #[test]
    fn truncation_renormalises_the_prefix() {
        let data = [0.6, 0.0, 0.8, 0.0, 0.6, 0.8];
        let truncated = truncate_and_normalize(&data, 3, 2).expect("the truncation is valid");
        assert_eq!(truncated, [1.0, 0.0, 0.0, 1.0]);
        // Row 1's prefix was all zeros before: that is an error, not a NaN.
        let error = truncate_and_normalize(&[1.0, 0.0, 0.0, 0.0, 0.0, 1.0], 3, 2)
            .expect_err("the truncation fails");
        assert!(matches!(
            error,
            IndexError::NotNormalizable { row: 1, dim: 2 }
        ));
        assert!(matches!(
            truncate_and_normalize(&data, 3, 4),
            Err(IndexError::BadTruncation { .. })
        ));
    }

    /// `cargo test --release --lib index::dense::tests::search_speed -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a check"]
    #[allow(clippy::print_stderr)]
    fn search_speed() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (n, dim, k) = (10_000, 384, 100);
        let docs = random_unit_rows(&mut rng, n, dim);
        let queries = random_unit_rows(&mut rng, n, dim);
        let index = DenseIndex::new(dim, docs).expect("the embeddings are valid");
        let started = std::time::Instant::now();
        let hits = index
            .search_batch(&queries, k, &|_| {})
            .expect("the batch search succeeds");
        eprintln!(
            "dense: {n} queries x {n} docs x {dim} dims, top-{k}: {:?} on {} threads",
            started.elapsed(),
            rayon::current_num_threads()
        );
        assert_eq!(hits.len(), n);
    }
}
