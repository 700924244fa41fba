//! The seam for fused kernels: every op of the BERT forward pass that has a fused CPU kernel
//! goes through a function here, and the model code calls only these functions for them.
//!
//! Two implementations ([`Implementation`]): `fused` (the default on the CPU) runs each op as one
//! custom op with its own backward (`fused`); `reference` runs compositions of differentiable
//! candle ops (`reference`), which the fused kernels are tested against and which CUDA, Metal and
//! non-f32 tensors always run. candle's own fused ops (`candle_nn::ops::layer_norm`,
//! `softmax_last_dim`) cannot stand in for either in training: they are registered without a
//! backward, so training through them silently yields zero gradients. The reference path does
//! use them where no gradient can flow (no input tracked by autograd, f32), as they make one
//! parallel pass where the composition makes six serial ones.
//!
//! Shapes are chosen to suit fusion: attention takes the packed `[batch, seq, 3 * hidden]` output
//! of one query/key/value projection and returns `[batch, seq, hidden]`, so no head split or merge
//! is materialised, and dropout takes a seed rather than a mask ([`KeepRule`]), so a kernel draws
//! its mask inline and its backward redraws it instead of storing it.
//!
//! The optimiser's fused update lives with the optimiser (`model::train::optim`).

pub mod bf16;
mod fused;
pub mod peak;
mod reference;

#[cfg(target_arch = "x86_64")]
pub(crate) use fused::has_avx512;
pub(crate) use fused::{exp, multiversion};

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{DType, Device, Result, Tensor};

/// Which kernels the seam runs on the CPU for f32 tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Implementation {
    /// One custom op per seam function, with its own backward; vectorised and multi-threaded.
    Fused,
    /// Compositions of differentiable candle ops (what GPUs and non-f32 tensors always run).
    Reference,
}

impl Implementation {
    /// The choice of the `RAGD_KERNELS` environment variable: `reference` selects
    /// [`Implementation::Reference`], anything else (or nothing) [`Implementation::Fused`].
    pub fn from_env() -> Self {
        match std::env::var("RAGD_KERNELS") {
            Ok(value) if value.eq_ignore_ascii_case("reference") => Self::Reference,
            _ => Self::Fused,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fused => "fused",
            Self::Reference => "reference",
        }
    }
}

/// The process-wide choice: 0 until first read (then `RAGD_KERNELS`), else 1 + the variant.
static SELECTED: AtomicU8 = AtomicU8::new(0);

/// The implementation the seam runs (see [`set_implementation`]).
pub fn implementation() -> Implementation {
    match SELECTED.load(Ordering::Relaxed) {
        1 => Implementation::Fused,
        2 => Implementation::Reference,
        _ => {
            let chosen = Implementation::from_env();
            set_implementation(chosen);
            chosen
        }
    }
}

/// Overrides `RAGD_KERNELS` for the rest of the process (benchmarks compare both).
pub fn set_implementation(implementation: Implementation) {
    let code = match implementation {
        Implementation::Fused => 1,
        Implementation::Reference => 2,
    };
    SELECTED.store(code, Ordering::Relaxed);
}

/// What multiplies f32 matrices on the CPU under the selected implementation: with fused kernels
/// AMX tiles where the CPU has them (`RAGD_MATMUL` overrides), else f32 gemm.
pub fn matmul_engine() -> &'static str {
    match implementation() {
        Implementation::Fused => fused::MatmulEngine::selected().name(),
        Implementation::Reference => "f32 (candle matmul)",
    }
}

/// Whether the matrix products run on the vector FMA units whose peak [`peak`] measures, not on
/// AMX tiles.
pub fn matmul_on_vector_units() -> bool {
    implementation() == Implementation::Reference
        || fused::MatmulEngine::selected() == fused::MatmulEngine::F32
}

/// Whether the fused kernels take these inputs: selected, on the CPU, f32.
fn fused_applies(inputs: &[&Tensor]) -> bool {
    implementation() == Implementation::Fused
        && inputs
            .iter()
            .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
}

/// Dropout of one tensor: zero each element with probability `p`, scale the rest by `1 / (1 - p)`.
///
/// The mask is a pure function of `seed` and each element's index ([`KeepRule`]), so a run is
/// reproducible from the model's dropout seed alone, and both implementations draw the same one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

/// The dropout mask as a function: element `i` is kept when the top 32 bits of
/// SplitMix64(`seed`, `i`) reach `p * 2^32`. A counter-based draw lets any thread produce any
/// element's mask value, and the backward pass redraw it, with no state and no stored mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct KeepRule {
    seed: u64,
    threshold: u64,
    kept_scale: f32,
}

impl KeepRule {
    pub(crate) fn new(dropout: Dropout) -> Self {
        let p = f64::from(dropout.p.clamp(0., 1.));
        Self {
            seed: dropout.seed,
            threshold: (p * 4_294_967_296.0) as u64,
            kept_scale: if p >= 1. { 0. } else { (1. / (1. - p)) as f32 },
        }
    }

    /// `1 / (1 - p)` if element `index` is kept, else 0.
    #[inline(always)]
    pub(crate) fn scale(&self, index: u64) -> f32 {
        let mut z = self
            .seed
            .wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        if (z >> 32) >= self.threshold {
            self.kept_scale
        } else {
            0.
        }
    }
}

/// `x @ weight^T + bias` over the last dimension of `x` (`weight` is `[out, in]` as PyTorch stores
/// it), any number of leading dimensions.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if fused_applies(&[x, weight, bias]) {
        fused::linear(x, weight, bias)
    } else {
        reference::linear(x, weight, bias)
    }
}

/// `x` contiguous, with the number of its rows of `k` features, for a product packed in bf16
/// (`what`, for the error): `x` must be an f32 CPU tensor.
fn bf16_input(x: &Tensor, k: usize, what: &str) -> Result<(Tensor, usize)> {
    let x = x.contiguous()?;
    if x.dtype() != DType::F32 || !x.device().is_cpu() || x.dims().last() != Some(&k) {
        candle_core::bail!(
            "a bf16 {what} takes f32 CPU inputs of {k} features, not {:?} {:?} on {:?}",
            x.dtype(),
            x.dims(),
            x.device()
        );
    }
    let rows = x.elem_count() / k;
    Ok((x, rows))
}

/// [`linear`] for inference on a layer packed in bf16, plus `residual` (shaped as the output):
/// `x` must be an f32 CPU tensor; no gradient flows.
pub fn linear_bf16(
    x: &Tensor,
    layer: &bf16::Bf16Linear,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (x, rows) = bf16_input(x, layer.weights().in_features(), "linear layer")?;
    let residual = residual.map(Tensor::contiguous).transpose()?;
    let mut shape = x.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = layer.weights().out_features();
    }
    if let Some(residual) = &residual
        && (residual.dims() != shape.as_slice() || residual.dtype() != DType::F32)
    {
        candle_core::bail!(
            "a bf16 linear layer's residual is {:?} {:?}, not its f32 output's {shape:?}",
            residual.dtype(),
            residual.dims()
        );
    }
    let out = {
        let read = fused::Read::new(&x);
        let skip = residual.as_ref().map(fused::Read::new);
        let skip = skip.as_ref().map(|s| s.slice("linear-bf16")).transpose()?;
        layer.forward(read.slice("linear-bf16")?, rows, skip, false)
    };
    Tensor::from_vec(out, shape, x.device())
}

/// `x + gelu(x @ w1^T + b1) @ w2^T + b2` for inference, an encoder layer's feed-forward block
/// before its LayerNorm, with `intermediate` (`w1`, `b1`) and `output` (`w2`, `b2`) packed in
/// bf16 ([`bf16::Bf16Linear::feed_forward`]): `x` must be an f32 CPU tensor; no gradient flows.
pub fn feed_forward_bf16(
    x: &Tensor,
    intermediate: &bf16::Bf16Linear,
    output: &bf16::Bf16Linear,
) -> Result<Tensor> {
    let k = intermediate.weights().in_features();
    let (x, rows) = bf16_input(x, k, "feed-forward block")?;
    let out = {
        let read = fused::Read::new(&x);
        intermediate.feed_forward(output, read.slice("feed-forward-bf16")?, rows)
    };
    Tensor::from_vec(out, x.shape(), x.device())
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
    if fused_applies(&[x, gamma, beta]) {
        fused::layer_norm(x, gamma, beta, eps)
    } else if forward_only(&[x, gamma, beta]) {
        candle_nn::ops::layer_norm(x, gamma, beta, eps as f32)
    } else {
        reference::layer_norm(x, gamma, beta, eps)
    }
}

/// BERT's intermediate layer: `gelu(x @ weight^T + bias)` with the exact GELU, `x * Φ(x)` with
/// the error function (not the tanh approximation). Fused, GELU runs inside the product.
pub fn linear_gelu(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if fused_applies(&[x, weight, bias]) {
        fused::linear_gelu(x, weight, bias)
    } else {
        reference::gelu(&reference::linear(x, weight, bias)?)
    }
}

/// `softmax(scores * scale + mask_bias)` over the last dimension; `mask_bias` broadcasts to
/// `scores` (`[batch, 1, 1, seq]` against `[batch, heads, seq, seq]`). The fused implementation
/// has this inside [`attention`].
pub fn masked_softmax(scores: &Tensor, mask_bias: &Tensor, scale: f64) -> Result<Tensor> {
    if forward_only(&[scores, mask_bias]) {
        candle_nn::ops::softmax_last_dim(&reference::masked_logits(scores, mask_bias, scale)?)
    } else {
        reference::masked_softmax(scores, mask_bias, scale)
    }
}

/// Multi-head scaled dot-product attention over `qkv`, the `[batch, seq, 3 * hidden]` output of
/// the query, key and value projections side by side: per head,
/// `dropout(softmax(q @ k^T * scale + position_bias + mask_bias)) @ v`, heads merged back into
/// `[batch, seq, hidden]`. `mask_bias` is `[batch, 1, 1, seq]`; `position_bias`, when given, is
/// `[heads, seq, seq]`, the same for every sequence (MPNet's relative positions) and
/// differentiable. The dropout mask numbers the probabilities in `[batch, heads, seq, seq]`
/// order.
pub fn attention(
    qkv: &Tensor,
    mask_bias: &Tensor,
    position_bias: Option<&Tensor>,
    heads: usize,
    scale: f64,
    probs_dropout: Option<Dropout>,
) -> Result<Tensor> {
    let fused = match position_bias {
        None => fused_applies(&[qkv, mask_bias]),
        Some(bias) => fused_applies(&[qkv, mask_bias, bias]),
    };
    if fused {
        let (batch, seq, _) = qkv.dims3()?;
        fused::attention(
            qkv,
            &mask_bias.reshape((batch, seq))?,
            position_bias,
            heads,
            scale,
            probs_dropout,
        )
    } else {
        reference::attention(qkv, mask_bias, position_bias, heads, scale, probs_dropout)
    }
}

/// [`attention`] for inference (no dropout, no gradient) in the bf16 encoding: both products
/// in bf16 where the CPU multiplies bf16 itself (`bf16::attention`), else [`attention`] in f32.
pub fn attention_bf16(
    qkv: &Tensor,
    mask_bias: &Tensor,
    position_bias: Option<&Tensor>,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    #[cfg(target_arch = "x86_64")]
    if bf16::attention::available() {
        let (batch, seq, packed) = qkv.dims3()?;
        let inputs = [Some(qkv), Some(mask_bias), position_bias]
            .into_iter()
            .flatten()
            .map(Tensor::contiguous)
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Tensor> = inputs.iter().collect();
        if forward_only(&refs) && refs.iter().all(|t| t.device().is_cpu()) && packed % 3 == 0 {
            let reads: Vec<fused::Read<'_>> = inputs.iter().map(fused::Read::new).collect();
            let slices = reads
                .iter()
                .map(|r| r.slice("attention-bf16"))
                .collect::<Result<Vec<_>>>()?;
            let hidden = packed / 3;
            let dims = bf16::attention::Dims {
                batch,
                seq,
                hidden,
                heads,
            };
            if hidden % heads != 0 || slices[1].len() != batch * seq {
                candle_core::bail!(
                    "bf16 attention: qkv {:?} is not [batch, seq, 3 x {heads} heads x head_dim], or mask {:?} not [batch, 1, 1, seq]",
                    qkv.dims(),
                    mask_bias.dims()
                );
            }
            if let Some(bias) = position_bias
                && bias.dims() != [heads, seq, seq]
            {
                candle_core::bail!(
                    "bf16 attention: position bias {:?} is not [{heads} heads, {seq}, {seq}]",
                    bias.dims()
                );
            }
            let context = bf16::attention::context(
                slices[0],
                slices[1],
                slices.get(2).copied(),
                dims,
                scale as f32,
            );
            return Tensor::from_vec(context, (batch, seq, hidden), qkv.device());
        }
    }
    attention(qkv, mask_bias, position_bias, heads, scale, None)
}

/// Applies [`Dropout`] to `x`.
pub fn dropout(x: &Tensor, dropout: Dropout) -> Result<Tensor> {
    if dropout.p <= 0. {
        Ok(x.clone())
    } else if fused_applies(&[x]) {
        fused::dropout(x, dropout)
    } else {
        reference::dropout(x, dropout)
    }
}

/// A linear layer's parameters: `weight` `[out, in]` as PyTorch stores it, `bias` `[out]`.
#[derive(Clone, Copy)]
pub struct LinearParams<'a> {
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
}

/// A LayerNorm's gain and bias.
#[derive(Clone, Copy)]
pub struct NormParams<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
}

/// The parameters of one BERT encoder layer.
#[derive(Clone, Copy)]
pub struct LayerParams<'a> {
    pub query: LinearParams<'a>,
    pub key: LinearParams<'a>,
    pub value: LinearParams<'a>,
    pub attention_output: LinearParams<'a>,
    pub attention_norm: NormParams<'a>,
    pub intermediate: LinearParams<'a>,
    pub output: LinearParams<'a>,
    pub output_norm: NormParams<'a>,
}

/// Attention heads, the scale of the scores, and LayerNorm's epsilon.
#[derive(Debug, Clone, Copy)]
pub struct LayerShape {
    pub heads: usize,
    pub scale: f64,
    pub eps: f64,
}

/// The dropouts of one encoder layer, `None` where none applies: on the attention
/// probabilities, and on each half's output before its residual add.
#[derive(Debug, Clone, Copy, Default)]
pub struct LayerDropouts {
    pub probs: Option<Dropout>,
    pub attention_output: Option<Dropout>,
    pub output: Option<Dropout>,
}

/// One BERT encoder layer: attention over the query/key/value projection, the attention output
/// layer, dropout, the residual and LayerNorm; then GELU's intermediate layer, the output layer,
/// dropout, the residual and LayerNorm. `mask_bias` and `position_bias` as [`attention`] takes
/// them.
///
/// Where gradients are wanted and the fused kernels apply (no position bias), the layer is one
/// op whose backward writes each gradient once ([`fused`]'s `bert_layer`); otherwise the kernels
/// above, composed.
pub fn bert_layer(
    x: &Tensor,
    params: &LayerParams<'_>,
    mask_bias: &Tensor,
    position_bias: Option<&Tensor>,
    shape: LayerShape,
    dropouts: LayerDropouts,
) -> Result<Tensor> {
    let tensors = params.tensors();
    if fuses_layer(x, &tensors, mask_bias, position_bias) {
        let (batch, seq, _) = x.dims3()?;
        let flat = tensors
            .iter()
            .map(|t| t.flatten_all())
            .collect::<Result<Vec<_>>>()?;
        fused::bert_layer(
            x,
            &Tensor::cat(&flat, 0)?,
            &mask_bias.reshape((batch, seq))?,
            (shape.heads, shape.scale, shape.eps),
            params.intermediate.weight.dim(0)?,
            dropouts,
        )
    } else {
        composed_bert_layer(x, params, mask_bias, position_bias, shape, dropouts)
    }
}

/// Whether [`bert_layer`] runs as one op, given its parameters' tensors: in training (something
/// wants a gradient), on the fused kernels, with no position bias.
fn fuses_layer(
    x: &Tensor,
    params: &[&Tensor],
    mask_bias: &Tensor,
    position_bias: Option<&Tensor>,
) -> bool {
    let wants_gradient = x.track_op() || params.iter().any(|t| t.track_op());
    let mut inputs = vec![x, mask_bias];
    inputs.extend(params);
    wants_gradient && position_bias.is_none() && fused_applies(&inputs)
}

impl LayerParams<'_> {
    /// Every tensor, in the order the fused layer's flat parameters have them: the query, key
    /// and value weights (one `[3 hidden, hidden]` matrix), their biases, then each layer's
    /// weight and bias and each LayerNorm's gain and bias in the order they apply.
    fn tensors(&self) -> [&Tensor; 16] {
        let (q, k, v) = (&self.query, &self.key, &self.value);
        [
            q.weight,
            k.weight,
            v.weight,
            q.bias,
            k.bias,
            v.bias,
            self.attention_output.weight,
            self.attention_output.bias,
            self.attention_norm.gamma,
            self.attention_norm.beta,
            self.intermediate.weight,
            self.intermediate.bias,
            self.output.weight,
            self.output.bias,
            self.output_norm.gamma,
            self.output_norm.beta,
        ]
    }
}

/// [`bert_layer`] as the composition of the seam's kernels.
fn composed_bert_layer(
    x: &Tensor,
    params: &LayerParams<'_>,
    mask_bias: &Tensor,
    position_bias: Option<&Tensor>,
    shape: LayerShape,
    dropouts: LayerDropouts,
) -> Result<Tensor> {
    // One projection for queries, keys and values: their weights side by side (`cat` is
    // differentiable, so each checkpoint weight keeps its own `Var` and name), and the packed
    // `[batch, seq, 3 * hidden]` output is what the attention kernel reads.
    let (q, k, v) = (&params.query, &params.key, &params.value);
    let qkv_weight = Tensor::cat(&[q.weight, k.weight, v.weight], 0)?;
    let qkv_bias = Tensor::cat(&[q.bias, k.bias, v.bias], 0)?;
    let qkv = linear(x, &qkv_weight, &qkv_bias)?;
    let context = attention(
        &qkv,
        mask_bias,
        position_bias,
        shape.heads,
        shape.scale,
        dropouts.probs,
    )?;
    let maybe_dropout = |x: Tensor, d: Option<Dropout>| match d {
        Some(d) => dropout(&x, d),
        None => Ok(x),
    };
    let out = &params.attention_output;
    let attended = linear(&context, out.weight, out.bias)?;
    let attended = (maybe_dropout(attended, dropouts.attention_output)? + x)?;
    let norm = &params.attention_norm;
    let attended = layer_norm(&attended, norm.gamma, norm.beta, shape.eps)?;
    let (inter, out) = (&params.intermediate, &params.output);
    let inner = linear_gelu(&attended, inter.weight, inter.bias)?;
    let output = linear(&inner, out.weight, out.bias)?;
    let output = (maybe_dropout(output, dropouts.output)? + &attended)?;
    let norm = &params.output_norm;
    layer_norm(&output, norm.gamma, norm.beta, shape.eps)
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

    /// Training takes the fused layer (on the fused kernels); inference and a position bias
    /// take the composition.
    #[test]
    fn only_training_without_a_position_bias_takes_the_fused_layer() {
        use super::{LayerParams, LinearParams, NormParams};
        let device = Device::Cpu;
        let zeros = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &device).expect("zeros");
        let (weight, bias) = (zeros(&[4, 4]), zeros(&[4]));
        let (inner, inner_bias, outer) = (zeros(&[8, 4]), zeros(&[8]), zeros(&[4, 8]));
        let var = Var::from_tensor(&weight).expect("a var");
        /// A layer whose query weight is `query`, every other parameter one of the zeros.
        fn layer<'a>(
            query: &'a Tensor,
            [square, bias, inner, inner_bias, outer]: [&'a Tensor; 5],
        ) -> LayerParams<'a> {
            let linear = |weight| LinearParams { weight, bias };
            let norm = NormParams {
                gamma: bias,
                beta: bias,
            };
            LayerParams {
                query: linear(query),
                key: linear(square),
                value: linear(square),
                attention_output: linear(square),
                attention_norm: norm,
                intermediate: LinearParams {
                    weight: inner,
                    bias: inner_bias,
                },
                output: linear(outer),
                output_norm: norm,
            }
        }
        let rest = [&weight, &bias, &inner, &inner_bias, &outer];
        let (x, mask, position) = (zeros(&[1, 2, 4]), zeros(&[1, 1, 1, 2]), zeros(&[2, 2, 2]));
        let fused = kernels::implementation() == kernels::Implementation::Fused;
        let (training, inference) = (layer(var.as_tensor(), rest), layer(&weight, rest));
        let (training, inference) = (training.tensors(), inference.tensors());
        assert_eq!(super::fuses_layer(&x, &training, &mask, None), fused);
        assert!(!super::fuses_layer(&x, &training, &mask, Some(&position)));
        assert!(!super::fuses_layer(&x, &inference, &mask, None));
    }

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
    fn linear_gelu_matches_naive_erf_gelu() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for mode in MODES {
            let dtype = mode.0;
            for (rows, inp, out) in [(3, 5, 4), (6, 7, 9), (2, 16, 17)] {
                // |pre-activation| <= 16 * 0.25 + 0.5, so erf's argument stays within 3.5.
                let x = random(&mut rng, rows * inp, 0.5);
                let w = random(&mut rng, out * inp, 0.5);
                let b = random(&mut rng, out, 0.5);
                let mut want = vec![0.; rows * out];
                for r in 0..rows {
                    for o in 0..out {
                        let v = b[o]
                            + (0..inp)
                                .map(|i| x[r * inp + i] * w[o * inp + i])
                                .sum::<f64>();
                        want[r * out + o] = 0.5 * v * (1. + erf(v / std::f64::consts::SQRT_2));
                    }
                }
                let got = kernels::linear_gelu(
                    &tensor(&x, &[rows, inp], mode),
                    &tensor(&w, &[out, inp], mode),
                    &tensor(&b, &[out], mode),
                )
                .expect("linear_gelu runs");
                assert_close(&values(&got), &want, dtype, "linear_gelu");
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
                let hidden = heads * dim;
                // Pack q, k, v (`[batch, heads, seq, dim]`) side by side as `[batch, seq, 3 * hidden]`
                // and read the result (`[batch, seq, hidden]`) back in the naive layout.
                let mut qkv = vec![0.; 3 * n];
                for (part, values) in [&q, &k, &v].into_iter().enumerate() {
                    for (i, value) in values.iter().enumerate() {
                        let (bh, rest) = (i / (seq * dim), i % (seq * dim));
                        let (b, h, t, d) = (bh / heads, bh % heads, rest / dim, rest % dim);
                        qkv[(b * seq + t) * 3 * hidden + part * hidden + h * dim + d] = *value;
                    }
                }
                let unpack = |context: Vec<f64>| {
                    let mut out = vec![0.; n];
                    for (i, value) in context.into_iter().enumerate() {
                        let (bt, col) = (i / hidden, i % hidden);
                        let (b, t, h, d) = (bt / seq, bt % seq, col / dim, col % dim);
                        out[((b * heads + h) * seq + t) * dim + d] = value;
                    }
                    out
                };
                let run = |dropout| {
                    let context = kernels::attention(
                        &tensor(&qkv, &[batch, seq, 3 * hidden], mode),
                        &tensor(&bias, &[batch, 1, 1, seq], mode),
                        None,
                        heads,
                        scale,
                        dropout,
                    )
                    .expect("attention runs");
                    assert_eq!(context.dims(), [batch, seq, hidden]);
                    unpack(values(&context))
                };
                let ones = vec![1.; batch * heads * seq * seq];
                let want = naive_attention(&q, &k, &v, &bias, &ones, shape, scale);
                assert_close(&run(None), &want, dtype, "attention");

                // With dropout, the mask is the one `dropout` draws for the same seed and shape.
                let params = Dropout { p: 0.3, seed: 99 };
                let keep =
                    kernels::dropout(&tensor(&ones, &[batch, heads, seq, seq], mode), params)
                        .expect("dropout runs");
                let want = naive_attention(&q, &k, &v, &bias, &values(&keep), shape, scale);
                assert_close(&run(Some(params)), &want, dtype, "attention+dropout");
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
