//! A whole BERT encoder layer as one op for training: attention, the two residual halves with
//! their dropout and LayerNorm, and the feed-forward block, forward and backward over buffers the
//! op owns.
//!
//! Composed from the seam's kernels, a layer is a dozen autograd nodes, and candle gives each
//! node's gradient a zeroed tensor of its size that it then adds the gradient onto (two passes
//! through memory per node, about 6% of a training step), plus a pass for each dropout and
//! residual add. As one node, the layer's backward writes each activation gradient once and
//! the parameters' straight into one flat buffer; its parameters arrive as one flat tensor
//! (their `cat`, whose backward hands each `Var` its slice).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};

use super::attention::{Attention, Dims, add_assign};
use super::linear::{Operands, backward_into};
use super::{Epilogue, Read, SharedMut, dropout, gelu, input, layer_norm};
use crate::model::kernels::{KeepRule, LayerDropouts};

/// The sizes of the layer's parameters, `hidden` wide with `inter` intermediate features.
#[derive(Clone, Copy)]
struct Offsets {
    hidden: usize,
    inter: usize,
}

impl Offsets {
    /// The parameters in order, with their element counts: queries', keys' and values' weights
    /// (one `[3 hidden, hidden]` matrix), their biases, the attention output's weight and bias,
    /// its LayerNorm's gain and bias, the intermediate weight and bias, the output's, and the
    /// output LayerNorm's gain and bias.
    fn sizes(self) -> [usize; 12] {
        let (h, i) = (self.hidden, self.inter);
        [3 * h * h, 3 * h, h * h, h, h, h, i * h, i, h * i, h, h, h]
    }

    fn total(self) -> usize {
        self.sizes().iter().sum()
    }

    /// The parameters, parts of `flat` (of [`Offsets::total`] elements).
    fn params(self, flat: &[f32]) -> Parts<&[f32]> {
        let mut rest = flat;
        Parts::in_order(self.sizes().map(|size| {
            let (part, tail) = rest.split_at(size);
            rest = tail;
            part
        }))
    }

    /// Their gradients, parts of `flat` (of [`Offsets::total`] elements).
    fn grads(self, flat: &mut [f32]) -> Parts<&mut [f32]> {
        let mut rest = flat;
        Parts::in_order(self.sizes().map(|size| {
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(size);
            rest = tail;
            part
        }))
    }
}

/// The layer's parameters (or their gradients) by name: each linear layer's weight and bias,
/// each LayerNorm's gain and bias.
struct Parts<S> {
    qkv: (S, S),
    attention_out: (S, S),
    attention_norm: (S, S),
    intermediate: (S, S),
    output: (S, S),
    output_norm: (S, S),
}

impl<S> Parts<S> {
    /// From the parts in the order of [`Offsets::sizes`].
    fn in_order([a, b, c, d, e, f, g, h, i, j, k, l]: [S; 12]) -> Self {
        Self {
            qkv: (a, b),
            attention_out: (c, d),
            attention_norm: (e, f),
            intermediate: (g, h),
            output: (i, j),
            output_norm: (k, l),
        }
    }
}

/// The forward pass's activations that the backward reads.
struct Saved {
    /// Queries, keys and values `[rows, 3 hidden]`.
    qkv: Vec<f32>,
    /// Attention's output, the attention output layer's input.
    context: Vec<f32>,
    /// The attention half's residual sum, its LayerNorm's input.
    attention_sum: Vec<f32>,
    /// That LayerNorm's output: the intermediate layer's input and the second residual.
    attended: Vec<f32>,
    /// The intermediate product before GELU, and after.
    product: Vec<f32>,
    activated: Vec<f32>,
    /// The feed-forward half's residual sum, the output LayerNorm's input.
    output_sum: Vec<f32>,
}

/// Over `x` `[batch, seq, hidden]`, the flat parameters and the mask bias `[batch, seq]`.
struct BertLayer {
    attention: Attention,
    inter: usize,
    eps: f32,
    attention_output: Option<KeepRule>,
    output: Option<KeepRule>,
    /// The forward pass leaves its activations here for the backward.
    saved: Mutex<Option<Saved>>,
}

impl BertLayer {
    const NAME: &'static str = "fused-bert-layer";

    fn offsets(&self, hidden: usize) -> Offsets {
        Offsets {
            hidden,
            inter: self.inter,
        }
    }

    /// The layer's sizes from `x`'s and the parameters' layouts, checked against each other.
    fn dims(&self, x: &Layout, params: usize, mask: &Layout) -> Result<Dims> {
        let (batch, seq, hidden) = x.shape().dims3()?;
        let offsets = self.offsets(hidden);
        if params != offsets.total() || mask.shape().dims() != [batch, seq] {
            bail!(
                "fused BERT layer: x {:?}, {params} parameters (want {} for {hidden} wide, {} inner), mask {:?}",
                x.dims(),
                offsets.total(),
                self.inter,
                mask.dims()
            );
        }
        self.attention.dims_of(batch, seq, hidden)
    }

    fn forward(&self, x: &[f32], params: &[f32], mask: &[f32], dims: Dims) -> Result<Vec<f32>> {
        let hidden = dims.hidden;
        let rows = dims.batch * dims.seq;
        let p = self.offsets(hidden).params(params);
        let qkv = product(x, p.qkv, (rows, hidden, 3 * hidden))?;
        let context = self.attention.context(&qkv, mask, None, dims);
        let attention_out = product(&context, p.attention_out, (rows, hidden, hidden))?;
        let (attention_sum, attended) = layer_norm::residual_forward(
            &attention_out,
            x,
            self.attention_output,
            p.attention_norm,
            self.eps,
        )?;
        drop(attention_out);
        let (product, activated) =
            product_gelu(&attended, p.intermediate, (rows, hidden, self.inter))?;
        let output = self::product(&activated, p.output, (rows, self.inter, hidden))?;
        let (output_sum, out) =
            layer_norm::residual_forward(&output, &attended, self.output, p.output_norm, self.eps)?;
        *self.saved.lock().map_err(|_| poisoned())? = Some(Saved {
            qkv,
            context,
            attention_sum,
            attended,
            product,
            activated,
            output_sum,
        });
        Ok(out)
    }

    /// The gradients given the output's, `grad` (the mask's only when `mask_tracked`).
    fn backward(
        &self,
        (x, params, mask): (&[f32], &[f32], &[f32]),
        grad: &[f32],
        dims: Dims,
        mask_tracked: bool,
    ) -> Result<LayerGradients> {
        let saved = self.saved.lock().map_err(|_| poisoned())?;
        let Some(saved) = saved.as_ref() else {
            bail!("fused BERT layer: backward before the forward pass");
        };
        let hidden = dims.hidden;
        let rows = dims.batch * dims.seq;
        let offsets = self.offsets(hidden);
        let p = offsets.params(params);
        let mut grads = vec![0f32; params.len()];
        let g = offsets.grads(&mut grads);

        // The output LayerNorm, then its dropout; its residual input is `attended`.
        let output_sum = norm_backward(
            &saved.output_sum,
            p.output_norm.0,
            grad,
            self.eps,
            g.output_norm,
        );
        let output = dropout::redraw(&output_sum, self.output);
        let activated = backward_into(
            &saved.activated,
            p.output.0,
            &output,
            (rows, self.inter),
            hidden,
            g.output,
        )?;
        drop(output);
        let product = gelu::backward(&saved.product, &activated);
        drop(activated);
        let mut attended = backward_into(
            &saved.attended,
            p.intermediate.0,
            &product,
            (rows, hidden),
            self.inter,
            g.intermediate,
        )?;
        drop(product);
        add_assign(&mut attended, &output_sum);
        drop(output_sum);

        // The attention half: its LayerNorm and dropout, the output layer, attention, and the
        // query/key/value projection; its residual input is `x`.
        let attention_sum = norm_backward(
            &saved.attention_sum,
            p.attention_norm.0,
            &attended,
            self.eps,
            g.attention_norm,
        );
        drop(attended);
        let attention_out = dropout::redraw(&attention_sum, self.attention_output);
        let context = backward_into(
            &saved.context,
            p.attention_out.0,
            &attention_out,
            (rows, hidden),
            hidden,
            g.attention_out,
        )?;
        drop(attention_out);
        let (qkv, mask_per_head, _) = self.attention.gradients(
            (&saved.qkv, mask, None),
            &context,
            dims,
            (mask_tracked, false),
        );
        drop(context);
        let mut input = backward_into(x, p.qkv.0, &qkv, (rows, hidden), 3 * hidden, g.qkv)?;
        add_assign(&mut input, &attention_sum);
        // The mask bias is a constant in the model; its gradient (the score gradients summed
        // over heads and query rows) only where something tracks it.
        let mask = mask_tracked.then(|| {
            // Per head `[batch, heads, seq]`: each sequence's heads summed.
            let per_sequence = mask_per_head.len() / dims.batch.max(1);
            let mut sums = vec![0f32; dims.batch * dims.seq];
            for (sum, heads) in sums
                .chunks_mut(dims.seq)
                .zip(mask_per_head.chunks(per_sequence))
            {
                for head in heads.chunks(dims.seq) {
                    add_assign(sum, head);
                }
            }
            sums
        });
        Ok(LayerGradients {
            input,
            params: grads,
            mask,
        })
    }
}

/// The gradients of the layer's three inputs.
struct LayerGradients {
    input: Vec<f32>,
    params: Vec<f32>,
    mask: Option<Vec<f32>>,
}

/// `x @ w^T + bias` for `x` `[rows, in]` and `w` `[out, in]`: `shape` is `(rows, in, out)`.
fn product(
    x: &[f32],
    (w, bias): (&[f32], &[f32]),
    shape: (usize, usize, usize),
) -> Result<Vec<f32>> {
    let operands = Operands::of_slices(x, w, bias, shape)?;
    let len = shape.0 * shape.2;
    let mut y: Vec<f32> = Vec::with_capacity(len);
    // SAFETY: `y` has room for `[rows, out]`, which the product writes before `set_len`.
    unsafe {
        operands.forward_into(y.as_mut_ptr(), Epilogue::None);
        y.set_len(len);
    }
    Ok(y)
}

/// The intermediate layer: the product (GELU's input, which its backward reads) and its GELU.
fn product_gelu(
    x: &[f32],
    (w, bias): (&[f32], &[f32]),
    shape: (usize, usize, usize),
) -> Result<(Vec<f32>, Vec<f32>)> {
    let operands = Operands::of_slices(x, w, bias, shape)?;
    let len = shape.0 * shape.2;
    let mut activated: Vec<f32> = Vec::with_capacity(len);
    let mut product: Vec<f32> = Vec::with_capacity(len);
    let into = Epilogue::GeluInto(SharedMut(activated.as_mut_ptr()));
    // SAFETY: both buffers have room for `[rows, out]`: the product writes every element of
    // `product`, and the epilogue every element of `activated`, before `set_len`.
    unsafe {
        operands.forward_into(product.as_mut_ptr(), into);
        product.set_len(len);
        activated.set_len(len);
    }
    Ok((product, activated))
}

/// LayerNorm's backward: the input's gradient, with the gain's and bias's written into `grads`.
fn norm_backward(
    x: &[f32],
    gamma: &[f32],
    grad: &[f32],
    eps: f32,
    (grad_gamma, grad_beta): (&mut [f32], &mut [f32]),
) -> Vec<f32> {
    let (grad_x, gamma_part, beta_part) = layer_norm::gradients(x, gamma, grad, eps);
    grad_gamma.copy_from_slice(&gamma_part);
    grad_beta.copy_from_slice(&beta_part);
    grad_x
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("fused BERT layer: a thread panicked holding its activations".into())
}

impl CustomOp3 for BertLayer {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sp: &CpuStorage,
        lp: &Layout,
        sm: &CpuStorage,
        lm: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, params, mask) = (
            input(sx, lx, Self::NAME)?,
            input(sp, lp, Self::NAME)?,
            input(sm, lm, Self::NAME)?,
        );
        let dims = self.dims(lx, params.len(), lm)?;
        let out = self.forward(x, params, mask, dims)?;
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        mask: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (read_x, read_params, read_mask, read_grad) = (
            Read::new(x),
            Read::new(params),
            Read::new(mask),
            Read::new(&grad),
        );
        let dims = self.dims(x.layout(), params.elem_count(), mask.layout())?;
        let grads = self.backward(
            (
                read_x.slice(Self::NAME)?,
                read_params.slice(Self::NAME)?,
                read_mask.slice(Self::NAME)?,
            ),
            read_grad.slice(Self::NAME)?,
            dims,
            mask.track_op(),
        )?;
        let mask_grad = grads
            .mask
            .map(|sums| Tensor::from_vec(sums, mask.shape(), mask.device()))
            .transpose()?;
        Ok((
            Some(Tensor::from_vec(grads.input, x.shape(), x.device())?),
            Some(Tensor::from_vec(
                grads.params,
                params.shape(),
                params.device(),
            )?),
            mask_grad,
        ))
    }
}

/// One BERT layer over `x` `[batch, seq, hidden]` given its parameters flattened in the order of
/// [`Offsets::sizes`], the mask bias `[batch, seq]`, the intermediate width and the dropouts. For
/// training: the op keeps its activations for the backward (inference takes the composed
/// kernels, which keep nothing).
pub(in crate::model::kernels) fn bert_layer(
    x: &Tensor,
    params: &Tensor,
    mask_bias: &Tensor,
    (heads, scale, eps): (usize, f64, f64),
    inter: usize,
    dropouts: LayerDropouts,
) -> Result<Tensor> {
    let keep =
        |d: Option<crate::model::kernels::Dropout>| d.filter(|d| d.p > 0.).map(KeepRule::new);
    let op = BertLayer {
        attention: Attention::new(heads, scale, dropouts.probs),
        inter,
        eps: eps as f32,
        attention_output: keep(dropouts.attention_output),
        output: keep(dropouts.output),
        saved: Mutex::new(None),
    };
    x.contiguous()?
        .apply_op3(&params.contiguous()?, &mask_bias.contiguous()?, op)
}
