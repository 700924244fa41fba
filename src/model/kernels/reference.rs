//! The reference kernels: compositions of candle ops that all have a backward pass, so autograd
//! differentiates through them. Each one avoids needless copies (no `contiguous()` it does not
//! need, no materialised broadcasts); speed beyond that is the fused kernels' job.

use candle_core::{D, DType, Result, Tensor};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Dropout;

pub(super) fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (out_features, in_features) = weight.dims2()?;
    let mut out_dims = x.dims().to_vec();
    let rows = x.elem_count() / in_features.max(1);
    // One 2-D matmul over all leading dimensions: `weight.t()` is a stride swap the gemm reads
    // directly, where `broadcast_matmul` would materialise the weight once per batch entry.
    let y = x
        .reshape((rows, in_features))?
        .matmul(&weight.t()?)?
        .broadcast_add(bias)?;
    if let Some(last) = out_dims.last_mut() {
        *last = out_features;
    }
    y.reshape(out_dims)
}

pub(super) fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_std = (variance + eps)?.sqrt()?.recip()?;
    centred
        .broadcast_mul(&inv_std)?
        .broadcast_mul(gamma)?
        .broadcast_add(beta)
}

pub(super) fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

pub(super) fn masked_softmax(scores: &Tensor, mask_bias: &Tensor, scale: f64) -> Result<Tensor> {
    let logits = scores.affine(scale, 0.)?.broadcast_add(mask_bias)?;
    // Subtracting the row maximum keeps `exp` finite. The maximum is detached: softmax does not
    // change when a constant is subtracted from a row, so its gradient through the maximum is
    // exactly zero and computing it would be wasted work.
    let row_max = logits.max_keepdim(D::Minus1)?.detach();
    let exp = logits.broadcast_sub(&row_max)?.exp()?;
    let row_sum = exp.sum_keepdim(D::Minus1)?;
    exp.broadcast_div(&row_sum)
}

pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask_bias: &Tensor,
    scale: f64,
    dropout_params: Option<Dropout>,
) -> Result<Tensor> {
    let scores = q.matmul(&k.t()?)?;
    let mut probs = masked_softmax(&scores, mask_bias, scale)?;
    if let Some(params) = dropout_params {
        probs = dropout(&probs, params)?;
    }
    probs.matmul(v)
}

pub(super) fn dropout(x: &Tensor, params: Dropout) -> Result<Tensor> {
    if params.p <= 0. {
        return Ok(x.clone());
    }
    if params.p >= 1. {
        return x.zeros_like();
    }
    // An element is dropped when a uniform u32 falls below `p * 2^32`: integer compares keep mask
    // generation cheap next to the matmuls (a float draw per element costs more than the compare).
    let threshold = (f64::from(params.p) * 4_294_967_296.0) as u64;
    let keep_scale = 1. / (1. - params.p);
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            if u64::from(rng.next_u32()) < threshold {
                0.
            } else {
                keep_scale
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
    let mask = if x.dtype() == DType::F32 {
        mask
    } else {
        mask.to_dtype(x.dtype())?
    };
    x.mul(&mask)
}

#[cfg(test)]
mod tests {
    //! Each kernel against a naive scalar loop in f64 on random inputs, at several shapes, in f64
    //! (tolerance 1e-10: only rounding differs) and f32 (tolerance 1e-5).

    use candle_core::{DType, Device, Tensor};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::super::{self as kernels, Dropout};

    fn random(rng: &mut ChaCha8Rng, n: usize, range: f64) -> Vec<f64> {
        (0..n).map(|_| rng.random_range(-range..range)).collect()
    }

    fn tensor(data: &[f64], dims: &[usize], dtype: DType) -> Tensor {
        Tensor::from_slice(data, dims, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("the test builds a tensor of the right size")
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
        for dtype in [DType::F64, DType::F32] {
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
                    &tensor(&x, &x_dims, dtype),
                    &tensor(&w, &[out, inp], dtype),
                    &tensor(&b, &[out], dtype),
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
        for dtype in [DType::F64, DType::F32] {
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
                    &tensor(&x, &dims, dtype),
                    &tensor(&gamma, &[width], dtype),
                    &tensor(&beta, &[width], dtype),
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
        for dtype in [DType::F64, DType::F32] {
            for dims in [vec![7], vec![4, 9], vec![2, 3, 17]] {
                let n: usize = dims.iter().product();
                let x = random(&mut rng, n, 3.5);
                let want: Vec<f64> = x
                    .iter()
                    .map(|v| 0.5 * v * (1. + erf(v / std::f64::consts::SQRT_2)))
                    .collect();
                let got = kernels::gelu(&tensor(&x, &dims, dtype)).expect("gelu runs");
                assert_close(&values(&got), &want, dtype, "gelu");
            }
        }
    }

    #[test]
    fn masked_softmax_matches_naive() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for dtype in [DType::F64, DType::F32] {
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
                    &tensor(&scores, &[batch, heads, seq, seq], dtype),
                    &tensor(&bias, &[batch, 1, 1, seq], dtype),
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
        for dtype in [DType::F64, DType::F32] {
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
                        &tensor(&q, &dims, dtype),
                        &tensor(&k, &dims, dtype),
                        &tensor(&v, &dims, dtype),
                        &tensor(&bias, &[batch, 1, 1, seq], dtype),
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
                    kernels::dropout(&tensor(&ones, &[batch, heads, seq, seq], dtype), params)
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
