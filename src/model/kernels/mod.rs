//! The seam for fused kernels: every op of the BERT forward pass that a fused CPU kernel (with its
//! own backward, through candle's `CustomOp*::bwd`) will replace goes through a function here, and
//! the model code calls only these functions for them.
//!
//! Today each function runs a composition of differentiable candle ops (`reference`; `attention`
//! composes the other kernels). That implementation stays when the fused kernels arrive: it is what the fused kernels are tested
//! against, and what CUDA and Metal keep running. candle's own fused ops
//! (`candle_nn::ops::layer_norm`, `softmax_last_dim`) cannot replace it because they are registered
//! without a backward: training through them silently yields zero gradients. Where no gradient
//! can flow (inference: no input tracked by autograd) and the tensors are f32, `layer_norm` and
//! `masked_softmax` do use them, as they make one parallel pass where the composition makes six
//! serial ones (LayerNorm over `[4096, 384]`: 3 ms against 17 ms on the 2-core dev box).
//!
//! Shapes are chosen to suit fusion: attention takes `[batch, heads, seq, head_dim]` tensors and
//! an additive mask bias `[batch, 1, 1, seq]`, and dropout takes a seed rather than a mask, so a
//! fused kernel can draw its mask inline instead of reading a materialised one.

mod reference;

use candle_core::{DType, Result, Tensor};

/// Dropout of one tensor: zero each element with probability `p`, scale the rest by `1 / (1 - p)`.
///
/// The mask is a pure function of `seed` (and the tensor's element count), so a run is reproducible
/// from the model's dropout seed alone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

/// `x @ weight^T + bias` over the last dimension of `x` (`weight` is `[out, in]` as PyTorch stores
/// it), any number of leading dimensions.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    reference::linear(x, weight, bias)
}

/// Whether candle's forward-only fused kernels may run on `inputs`: no gradient can flow through
/// them (nothing tracked), they are f32 (those kernels accumulate in f32, which would cost an f64
/// caller its precision) and contiguous (which those kernels require).
fn forward_only(inputs: &[&Tensor]) -> bool {
    inputs
        .iter()
        .all(|t| !t.track_op() && t.dtype() == DType::F32 && t.is_contiguous())
}

/// LayerNorm over the last dimension with biased variance, as `torch.nn.LayerNorm`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    if forward_only(&[x, gamma, beta]) {
        candle_nn::ops::layer_norm(x, gamma, beta, eps as f32)
    } else {
        reference::layer_norm(x, gamma, beta, eps)
    }
}

/// BERT's exact GELU, `x * Φ(x)` with the error function (not the tanh approximation).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    reference::gelu(x)
}

/// `softmax(scores * scale + mask_bias)` over the last dimension; `mask_bias` broadcasts to
/// `scores` (`[batch, 1, 1, seq]` against `[batch, heads, seq, seq]`).
pub fn masked_softmax(scores: &Tensor, mask_bias: &Tensor, scale: f64) -> Result<Tensor> {
    if forward_only(&[scores, mask_bias]) {
        candle_nn::ops::softmax_last_dim(&reference::masked_logits(scores, mask_bias, scale)?)
    } else {
        reference::masked_softmax(scores, mask_bias, scale)
    }
}

/// Scaled dot-product attention: `dropout(masked_softmax(q @ k^T, mask_bias, scale)) @ v`, with
/// `q`, `k`, `v` as `[batch, heads, seq, head_dim]` and the result in the same layout.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask_bias: &Tensor,
    scale: f64,
    probs_dropout: Option<Dropout>,
) -> Result<Tensor> {
    // Scaling `q` touches `seq x head_dim` values per row where scaling the scores would touch
    // `seq x seq` (4x fewer at 128 tokens and 32-wide heads).
    let scores = (q * scale)?.matmul(&k.t()?)?;
    let mut probs = masked_softmax(&scores, mask_bias, 1.)?;
    if let Some(params) = probs_dropout {
        probs = dropout(&probs, params)?;
    }
    probs.matmul(v)
}

/// Applies [`Dropout`] to `x`.
pub fn dropout(x: &Tensor, dropout: Dropout) -> Result<Tensor> {
    reference::dropout(x, dropout)
}

#[cfg(test)]
mod tests {
    //! Each kernel against a naive scalar loop in f64 on random inputs, at several shapes, in f64
    //! (tolerance 1e-10: only rounding differs) and f32 (tolerance 1e-5), with inputs tracked by
    //! autograd (the reference compositions run) and untracked (f32 may take candle's fused
    //! forward-only kernels).

    use candle_core::{DType, Device, Tensor, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::{self as kernels, Dropout};

    fn random(rng: &mut ChaCha8Rng, n: usize, range: f64) -> Vec<f64> {
        (0..n).map(|_| rng.random_range(-range..range)).collect()
    }

    /// Every combination of dtype and whether inputs are tracked.
    const MODES: [(DType, bool); 4] = [
        (DType::F64, false),
        (DType::F64, true),
        (DType::F32, false),
        (DType::F32, true),
    ];

    fn tensor(data: &[f64], dims: &[usize], (dtype, tracked): (DType, bool)) -> Tensor {
        let t = Tensor::from_slice(data, dims, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("the test builds a tensor of the right size");
        if tracked {
            Var::from_tensor(&t).expect("a var").into_inner()
        } else {
            t
        }
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all()
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.to_vec1::<f64>())
            .expect("a kernel output converts to f64")
    }

    fn tolerance(dtype: DType) -> f64 {
        if dtype == DType::F64 { 1e-10 } else { 1e-5 }
    }

    fn assert_close(got: &[f64], want: &[f64], dtype: DType, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: element count");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let err = (g - w).abs() / w.abs().max(1.);
            assert!(err <= tolerance(dtype), "{what}[{i}]: got {g}, want {w}");
        }
    }

    /// erf by its Maclaurin series, accurate to ~1e-13 on the |x| <= 3.5 the tests use.
    fn erf(x: f64) -> f64 {
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2. / std::f64::consts::PI.sqrt()
    }

    /// Random additive mask biases `[batch, 1, 1, seq]`: each row keeps a random prefix (at least
    /// one token), the rest is `f32::MIN` like the model's padding mask.
    fn mask_bias(rng: &mut ChaCha8Rng, batch: usize, seq: usize) -> Vec<f64> {
        let mut bias = vec![0.; batch * seq];
        for row in bias.chunks_mut(seq) {
            let keep = rng.random_range(1..=seq);
            for b in &mut row[keep..] {
                *b = f64::from(f32::MIN);
            }
        }
        bias
    }

    fn naive_softmax_rows(logits: &mut [f64], width: usize) {
        for row in logits.chunks_mut(width) {
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
            for v in row.iter_mut() {
                *v = (*v - max).exp() / sum;
            }
        }
    }

    #[test]
    fn linear_matches_naive() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for mode in MODES {
            let dtype = mode.0;
            for (lead, inp, out) in [(vec![3], 5, 4), (vec![2, 3], 7, 6), (vec![2, 2, 3], 16, 9)] {
                let rows: usize = lead.iter().product();
                let x = random(&mut rng, rows * inp, 1.);
                let w = random(&mut rng, out * inp, 1.);
                let b = random(&mut rng, out, 1.);
                let mut want = vec![0.; rows * out];
                for r in 0..rows {
                    for o in 0..out {
                        want[r * out + o] = b[o]
                            + (0..inp)
                                .map(|i| x[r * inp + i] * w[o * inp + i])
                                .sum::<f64>();
                    }
                }
                let x_dims = [lead.as_slice(), &[inp]].concat();
                let got = kernels::linear(
                    &tensor(&x, &x_dims, mode),
                    &tensor(&w, &[out, inp], mode),
                    &tensor(&b, &[out], mode),
                )
                .expect("linear runs");
                assert_eq!(got.dims(), [lead.as_slice(), &[out]].concat());
                assert_close(&values(&got), &want, dtype, "linear");
            }
        }
    }

    #[test]
    fn layer_norm_matches_naive() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for mode in MODES {
            let dtype = mode.0;
            for dims in [vec![3, 8], vec![2, 5, 16], vec![1, 3, 2, 33]] {
                let width = *dims.last().expect("non-empty dims");
                let n: usize = dims.iter().product();
                let x: Vec<f64> = random(&mut rng, n, 2.).iter().map(|v| v + 0.5).collect();
                let gamma = random(&mut rng, width, 1.5);
                let beta = random(&mut rng, width, 1.);
                let eps = 1e-12;
                let mut want = vec![0.; n];
                for (row, out) in x.chunks(width).zip(want.chunks_mut(width)) {
                    let mean = row.iter().sum::<f64>() / width as f64;
                    let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / width as f64;
                    for i in 0..width {
                        out[i] = (row[i] - mean) / (var + eps).sqrt() * gamma[i] + beta[i];
                    }
                }
                let got = kernels::layer_norm(
                    &tensor(&x, &dims, mode),
                    &tensor(&gamma, &[width], mode),
                    &tensor(&beta, &[width], mode),
                    eps,
                )
                .expect("layer_norm runs");
                assert_close(&values(&got), &want, dtype, "layer_norm");
            }
        }
    }

    #[test]
    fn gelu_matches_naive_erf_gelu() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for mode in MODES {
            let dtype = mode.0;
            for dims in [vec![7], vec![4, 9], vec![2, 3, 17]] {
                let n: usize = dims.iter().product();
                let x = random(&mut rng, n, 3.5);
                let want: Vec<f64> = x
                    .iter()
                    .map(|v| 0.5 * v * (1. + erf(v / std::f64::consts::SQRT_2)))
                    .collect();
                let got = kernels::gelu(&tensor(&x, &dims, mode)).expect("gelu runs");
                assert_close(&values(&got), &want, dtype, "gelu");
            }
        }
    }

    #[test]
    fn masked_softmax_matches_naive() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for mode in MODES {
            let dtype = mode.0;
            for (batch, heads, seq) in [(2, 3, 5), (1, 2, 7), (3, 1, 4)] {
                let n = batch * heads * seq * seq;
                let scores = random(&mut rng, n, 6.);
                let bias = mask_bias(&mut rng, batch, seq);
                let scale = 0.37;
                let mut want = scores.clone();
                for (i, v) in want.iter_mut().enumerate() {
                    let b = i / (heads * seq * seq);
                    *v = *v * scale + bias[b * seq + i % seq];
                }
                naive_softmax_rows(&mut want, seq);
                let got = kernels::masked_softmax(
                    &tensor(&scores, &[batch, heads, seq, seq], mode),
                    &tensor(&bias, &[batch, 1, 1, seq], mode),
                    scale,
                )
                .expect("masked_softmax runs");
                assert_close(&values(&got), &want, dtype, "masked_softmax");
            }
        }
    }

    /// Naive attention; `keep[b, h, i, j]` multiplies the probabilities (dropout), all ones without.
    #[allow(clippy::too_many_arguments)]
    fn naive_attention(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        bias: &[f64],
        keep: &[f64],
        (batch, heads, seq, dim): (usize, usize, usize, usize),
        scale: f64,
    ) -> Vec<f64> {
        let mut out = vec![0.; batch * heads * seq * dim];
        for b in 0..batch {
            for h in 0..heads {
                let base = (b * heads + h) * seq;
                let mut probs = vec![0.; seq * seq];
                for i in 0..seq {
                    for j in 0..seq {
                        let dot: f64 = (0..dim)
                            .map(|d| q[(base + i) * dim + d] * k[(base + j) * dim + d])
                            .sum();
                        probs[i * seq + j] = dot * scale + bias[b * seq + j];
                    }
                }
                naive_softmax_rows(&mut probs, seq);
                for i in 0..seq {
                    for d in 0..dim {
                        out[(base + i) * dim + d] = (0..seq)
                            .map(|j| {
                                probs[i * seq + j]
                                    * keep[(base + i) * seq + j]
                                    * v[(base + j) * dim + d]
                            })
                            .sum();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_naive_with_and_without_dropout() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for mode in MODES {
            let dtype = mode.0;
            for shape @ (batch, heads, seq, dim) in [(2, 3, 5, 4), (1, 2, 9, 8), (3, 1, 4, 16)] {
                let n = batch * heads * seq * dim;
                let (q, k, v) = (
                    random(&mut rng, n, 1.),
                    random(&mut rng, n, 1.),
                    random(&mut rng, n, 1.),
                );
                let bias = mask_bias(&mut rng, batch, seq);
                let scale = 1. / (dim as f64).sqrt();
                let dims = [batch, heads, seq, dim];
                let run = |dropout| {
                    kernels::attention(
                        &tensor(&q, &dims, mode),
                        &tensor(&k, &dims, mode),
                        &tensor(&v, &dims, mode),
                        &tensor(&bias, &[batch, 1, 1, seq], mode),
                        scale,
                        dropout,
                    )
                    .expect("attention runs")
                };
                let ones = vec![1.; batch * heads * seq * seq];
                let want = naive_attention(&q, &k, &v, &bias, &ones, shape, scale);
                assert_close(&values(&run(None)), &want, dtype, "attention");

                // With dropout, the mask is the one `dropout` draws for the same seed and shape.
                let params = Dropout { p: 0.3, seed: 99 };
                let keep =
                    kernels::dropout(&tensor(&ones, &[batch, heads, seq, seq], mode), params)
                        .expect("dropout runs");
                let want = naive_attention(&q, &k, &v, &bias, &values(&keep), shape, scale);
                assert_close(
                    &values(&run(Some(params))),
                    &want,
                    dtype,
                    "attention+dropout",
                );
            }
        }
    }

    #[test]
    fn dropout_drops_at_rate_p_scales_the_rest_and_is_seeded() {
        let x = Tensor::ones((64, 1000), DType::F32, &Device::Cpu).expect("ones");
        let params = Dropout { p: 0.1, seed: 7 };
        let dropped = values(&kernels::dropout(&x, params).expect("dropout runs"));
        let zeros = dropped.iter().filter(|v| **v == 0.).count();
        let rate = zeros as f64 / dropped.len() as f64;
        // 64k Bernoulli(0.1) draws: the standard deviation of the rate is ~0.0012.
        assert!((rate - 0.1).abs() < 0.006, "drop rate {rate}");
        let kept_scale = 1. / 0.9f32;
        assert!(
            dropped
                .iter()
                .all(|v| *v == 0. || (*v as f32 - kept_scale).abs() < 1e-6)
        );
        let again = values(&kernels::dropout(&x, params).expect("dropout runs"));
        assert_eq!(dropped, again, "the same seed gives the same mask");
        let other = values(&kernels::dropout(&x, Dropout { p: 0.1, seed: 8 }).expect("runs"));
        assert_ne!(dropped, other, "another seed gives another mask");
        let none = values(&kernels::dropout(&x, Dropout { p: 0., seed: 7 }).expect("runs"));
        assert!(none.iter().all(|v| *v == 1.));
    }
}
