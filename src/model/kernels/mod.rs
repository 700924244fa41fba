//! The seam for fused kernels: every op of the BERT forward pass that a fused CPU kernel (with its
//! own backward, through candle's `CustomOp*::bwd`) will replace goes through a function here, and
//! the model code calls only these functions for them.
//!
//! Today each function runs [`reference`], a composition of differentiable candle ops. That
//! implementation stays when the fused kernels arrive: it is what the fused kernels are tested
//! against, and what CUDA and Metal keep running. candle's own fused ops (`candle_nn::LayerNorm`,
//! `candle_nn::ops::softmax_last_dim`) were rejected because they are registered without a
//! backward, so training through them silently yields zero gradients.
//!
//! Shapes are chosen to suit fusion: attention takes `[batch, heads, seq, head_dim]` tensors and
//! an additive mask bias `[batch, 1, 1, seq]`, and dropout takes a seed rather than a mask, so a
//! fused kernel can draw its mask inline instead of reading a materialised one.

mod reference;

use candle_core::{Result, Tensor};

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

/// LayerNorm over the last dimension with biased variance, as `torch.nn.LayerNorm`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    reference::layer_norm(x, gamma, beta, eps)
}

/// BERT's exact GELU, `x * Φ(x)` with the error function (not the tanh approximation).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    reference::gelu(x)
}

/// `softmax(scores * scale + mask_bias)` over the last dimension; `mask_bias` broadcasts to
/// `scores` (`[batch, 1, 1, seq]` against `[batch, heads, seq, seq]`).
pub fn masked_softmax(scores: &Tensor, mask_bias: &Tensor, scale: f64) -> Result<Tensor> {
    reference::masked_softmax(scores, mask_bias, scale)
}

/// Scaled dot-product attention: `dropout(masked_softmax(q @ k^T, mask_bias, scale)) @ v`, with
/// `q`, `k`, `v` as `[batch, heads, seq, head_dim]` and the result in the same layout.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask_bias: &Tensor,
    scale: f64,
    dropout: Option<Dropout>,
) -> Result<Tensor> {
    reference::attention(q, k, v, mask_bias, scale, dropout)
}

/// Applies [`Dropout`] to `x`.
pub fn dropout(x: &Tensor, dropout: Dropout) -> Result<Tensor> {
    reference::dropout(x, dropout)
}
