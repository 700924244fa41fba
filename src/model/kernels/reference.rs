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

/// `scores * scale + mask_bias`, skipping the scaling pass when `scale` is 1.
pub(super) fn masked_logits(scores: &Tensor, mask_bias: &Tensor, scale: f64) -> Result<Tensor> {
    if scale == 1. {
        scores.broadcast_add(mask_bias)
    } else {
        scores.affine(scale, 0.)?.broadcast_add(mask_bias)
    }
}

pub(super) fn masked_softmax(scores: &Tensor, mask_bias: &Tensor, scale: f64) -> Result<Tensor> {
    let logits = masked_logits(scores, mask_bias, scale)?;
    // Subtracting the row maximum keeps `exp` finite. The maximum is detached: softmax does not
    // change when a constant is subtracted from a row, so its gradient through the maximum is
    // exactly zero and computing it would be wasted work.
    let row_max = logits.max_keepdim(D::Minus1)?.detach();
    let exp = logits.broadcast_sub(&row_max)?.exp()?;
    let row_sum = exp.sum_keepdim(D::Minus1)?;
    exp.broadcast_div(&row_sum)
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
