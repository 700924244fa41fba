//! The reference kernels: compositions of candle ops that all have a backward pass, so autograd
//! differentiates through them. Each one avoids needless copies (no `contiguous()` it does not
//! need, no materialised broadcasts); speed beyond that is the fused kernels' job.

use candle_core::{D, DType, Result, Tensor};

use super::{Dropout, KeepRule};

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

/// See [`super::attention`]: splits the heads out of `qkv`, composes the softmax and matmuls
/// per head, merges the heads back.
pub(super) fn attention(
    qkv: &Tensor,
    mask_bias: &Tensor,
    position_bias: Option<&Tensor>,
    heads: usize,
    scale: f64,
    probs_dropout: Option<Dropout>,
) -> Result<Tensor> {
    let (batch, seq, packed) = qkv.dims3()?;
    let hidden = packed / 3;
    let head_dim = hidden / heads.max(1);
    let split_heads = |part: usize| {
        qkv.narrow(2, part * hidden, hidden)?
            .reshape((batch, seq, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (split_heads(0)?, split_heads(1)?, split_heads(2)?);
    // Scaling `q` touches `seq x head_dim` values per row where scaling the scores would touch
    // `seq x seq` (4x fewer at 128 tokens and 32-wide heads).
    let mut scores = (q * scale)?.matmul(&k.t()?)?;
    if let Some(bias) = position_bias {
        scores = scores.broadcast_add(bias)?;
    }
    let mut probs = super::masked_softmax(&scores, mask_bias, 1.)?;
    if let Some(params) = probs_dropout.filter(|d| d.p > 0.) {
        probs = dropout(&probs, params)?;
    }
    probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((batch, seq, hidden))
}

pub(super) fn dropout(x: &Tensor, params: Dropout) -> Result<Tensor> {
    let rule = KeepRule::new(params);
    let mask: Vec<f32> = (0..x.elem_count() as u64).map(|i| rule.scale(i)).collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
    let mask = if x.dtype() == DType::F32 {
        mask
    } else {
        mask.to_dtype(x.dtype())?
    };
    x.mul(&mask)
}
