//! Self-attention straight from the fused `[batch, seq, 3 * hidden]` projection to the context
//! `[batch, seq, hidden]`: no head split or merge copies (the gemms read each head's columns
//! with the row stride of the packed tensor). One rayon task per (sequence, head) computes the
//! scaled scores, the masked softmax and dropout in place in an `seq x seq` buffer, then the
//! context. The backward pass recomputes the probabilities (one small gemm, cheaper than keeping
//! `[batch, heads, seq, seq]` alive between passes) and writes the query, key and value gradients
//! into their columns of one `[batch, seq, 3 * hidden]` gradient.
//!
//! MPNet adds a relative-position bias `[heads, seq, seq]` to every sequence's scaled scores
//! ([`PositionBiasedAttention`], a `CustomOp3`); its gradient is the score gradient summed over
//! the batch. BERT has none and keeps the two-input op.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::math::{exp, max, sum_by, sum_zip_by};
use super::{Operand, Read, SharedMut, input, matmul, multiversion};
use crate::model::kernels::{Dropout, KeepRule};

thread_local! {
    /// Each thread's `seq x seq` buffers, reused across heads and calls: every use writes all
    /// of a buffer before reading it.
    static SCRATCH: RefCell<[Vec<f32>; 4]> = const { RefCell::new([const { Vec::new() }; 4]) };
}

/// Runs `f` on four of this thread's scratch buffers of `len` elements.
fn with_scratch<R>(len: usize, f: impl FnOnce([&mut [f32]; 4]) -> R) -> R {
    SCRATCH.with_borrow_mut(|buffers| {
        let [a, b, c, d] = buffers;
        for buffer in [&mut *a, &mut *b, &mut *c, &mut *d] {
            buffer.resize(len, 0.);
        }
        f([a.as_mut_slice(), b, c, d])
    })
}

#[derive(Clone, Copy)]
pub(super) struct Attention {
    heads: usize,
    scale: f32,
    keep: Option<KeepRule>,
}

/// Sizes of one call: batch, sequence length, hidden size, head width.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub(super) batch: usize,
    pub(super) seq: usize,
    pub(super) hidden: usize,
    head_dim: usize,
}

multiversion! {
    /// Turns the scaled scores of one head (`seq` rows of `seq`) into probabilities, in place:
    /// add the mask bias, subtract the row maximum, exponentiate, normalise.
    fn softmax_rows(scores: &mut [f32], mask_bias: &[f32]) {
        let seq = mask_bias.len();
        for row in scores.chunks_exact_mut(seq) {
            for (v, &m) in row.iter_mut().zip(mask_bias) {
                *v += m;
            }
            let top = max(row);
            for v in row.iter_mut() {
                *v = exp(*v - top);
            }
            let inv = 1.0 / sum_by(row, |v| v);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

multiversion! {
    /// `target += addend`, element by element.
    pub(super) fn add_assign(target: &mut [f32], addend: &[f32]) {
        for (t, &a) in target.iter_mut().zip(addend) {
            *t += a;
        }
    }
}

multiversion! {
    /// `out = probs * keep_scale(first + i)`: the dropout of the probabilities of one head, whose
    /// elements are numbered from `first` in the `[batch, heads, seq, seq]` layout.
    fn apply_keep(probs: &[f32], out: &mut [f32], first: u64, keep: KeepRule) {
        for (i, (o, &p)) in out.iter_mut().zip(probs).enumerate() {
            *o = p * keep.scale(first + i as u64);
        }
    }
}

multiversion! {
    /// Softmax backward for one head, in place in `grad` (the probabilities' gradient, after
    /// dropout's): `ds = p * (dp - Σ_j p dp)`.
    fn softmax_backward_rows(probs: &[f32], grad: &mut [f32], seq: usize) {
        for (p, g) in probs.chunks_exact(seq).zip(grad.chunks_exact_mut(seq)) {
            let dot = sum_zip_by(p, g, |a, b| a * b);
            for (g, &p) in g.iter_mut().zip(p) {
                *g = p * (*g - dot);
            }
        }
    }
}

impl Attention {
    /// The probabilities of head `head` of sequence `b` into `probs` (`seq x seq`), with the
    /// head's rows of the position bias (`[heads, seq, seq]`) added to the scaled scores.
    ///
    /// # Safety
    /// `qkv` must hold `[batch, seq, 3 * hidden]` elements for `dims`, and `position_bias`,
    /// when given, `[heads, seq, seq]`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn probabilities(
        &self,
        qkv: &[f32],
        mask: &[f32],
        position_bias: Option<&[f32]>,
        dims: Dims,
        b: usize,
        head: usize,
        probs: &mut [f32],
    ) {
        let Dims {
            seq,
            hidden,
            head_dim,
            ..
        } = dims;
        let packed = 3 * hidden as isize;
        let base = b * seq * 3 * hidden + head * head_dim;
        // SAFETY: q and k of this head lie inside `qkv`; `probs` is `seq x seq`.
        unsafe {
            matmul(
                (seq, seq, head_dim),
                probs.as_mut_ptr(),
                (seq as isize, 1),
                None,
                Operand {
                    ptr: qkv.as_ptr().add(base),
                    rows: packed,
                    cols: 1,
                },
                Operand {
                    ptr: qkv.as_ptr().add(base + hidden),
                    rows: 1,
                    cols: packed,
                },
                self.scale,
                false,
            );
        }
        if let Some(bias) = position_bias {
            add_assign(probs, &bias[head * seq * seq..(head + 1) * seq * seq]);
        }
        softmax_rows(probs, &mask[b * seq..(b + 1) * seq]);
    }

    /// Index of the first probability of (`b`, `head`) in `[batch, heads, seq, seq]`.
    fn first_index(&self, dims: Dims, b: usize, head: usize) -> u64 {
        ((b * self.heads + head) * dims.seq * dims.seq) as u64
    }

    fn dims(&self, qkv: &Layout, mask: &Layout, position_bias: Option<&Layout>) -> Result<Dims> {
        let (batch, seq, packed) = qkv.shape().dims3()?;
        let hidden = packed / 3;
        if packed % 3 != 0 || hidden % self.heads != 0 || mask.shape().dims() != [batch, seq] {
            bail!(
                "fused attention: qkv {:?} is not [batch, seq, 3 x {} heads x head_dim], or mask {:?} not [batch, seq]",
                qkv.dims(),
                self.heads,
                mask.dims()
            );
        }
        if let Some(bias) = position_bias
            && bias.shape().dims() != [self.heads, seq, seq]
        {
            bail!(
                "fused attention: position bias {:?} is not [{} heads, {seq}, {seq}]",
                bias.dims(),
                self.heads
            );
        }
        self.dims_of(batch, seq, hidden)
    }
}

impl Attention {
    const NAME: &'static str = "fused-attention";

    /// The forward pass over contiguous inputs whose shapes `dims` was checked against.
    fn forward(
        &self,
        qkv: &[f32],
        mask: &[f32],
        position_bias: Option<&[f32]>,
        dims: Dims,
    ) -> (CpuStorage, Shape) {
        let context = self.context(qkv, mask, position_bias, dims);
        let Dims {
            batch, seq, hidden, ..
        } = dims;
        (CpuStorage::F32(context), Shape::from((batch, seq, hidden)))
    }

    /// The context `[batch, seq, hidden]` of one call, as a row-major buffer.
    pub(super) fn context(
        &self,
        qkv: &[f32],
        mask: &[f32],
        position_bias: Option<&[f32]>,
        dims: Dims,
    ) -> Vec<f32> {
        let Dims {
            batch,
            seq,
            hidden,
            head_dim,
        } = dims;
        // Every task writes its head's columns of its sequence's rows: all of it, unzeroed.
        let mut context: Vec<f32> = Vec::with_capacity(batch * seq * hidden);
        let out = SharedMut(context.as_mut_ptr());
        (0..batch * self.heads).into_par_iter().for_each(|task| {
            let (b, head) = (task / self.heads, task % self.heads);
            with_scratch(seq * seq, |[probs, dropped, ..]| {
                // SAFETY: `dims` was checked against both inputs' shapes.
                unsafe { self.probabilities(qkv, mask, position_bias, dims, b, head, probs) };
                let probs: &[f32] = match self.keep {
                    Some(keep) => {
                        apply_keep(probs, dropped, self.first_index(dims, b, head), keep);
                        dropped
                    }
                    None => probs,
                };
                let packed = 3 * hidden as isize;
                let v = b * seq * 3 * hidden + 2 * hidden + head * head_dim;
                // SAFETY: each task writes only its head's columns of its sequence's rows.
                unsafe {
                    matmul(
                        (seq, head_dim, seq),
                        out.ptr().add(b * seq * hidden + head * head_dim),
                        (hidden as isize, 1),
                        None,
                        Operand {
                            ptr: probs.as_ptr(),
                            rows: seq as isize,
                            cols: 1,
                        },
                        Operand {
                            ptr: qkv.as_ptr().add(v),
                            rows: packed,
                            cols: 1,
                        },
                        1.0,
                        false,
                    );
                }
            });
        });
        // SAFETY: the tasks, one per (sequence, head), wrote every element.
        unsafe { context.set_len(batch * seq * hidden) };
        context
    }

    /// The gradients of the query/key/value projection, the mask bias and the position bias
    /// (the last two only when autograd tracks them).
    fn backward(
        &self,
        qkv: &Tensor,
        mask: &Tensor,
        position_bias: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; 3]> {
        let grad = grad.contiguous()?;
        let (read_qkv, read_mask, read_grad) = (Read::new(qkv), Read::new(mask), Read::new(&grad));
        let read_bias = position_bias.map(Read::new);
        let qkv_data = read_qkv.slice(Self::NAME)?;
        let mask_data = read_mask.slice(Self::NAME)?;
        let bias_data = read_bias
            .as_ref()
            .map(|r| r.slice(Self::NAME))
            .transpose()?;
        let g = read_grad.slice(Self::NAME)?;
        let dims = self.dims(
            qkv.layout(),
            mask.layout(),
            position_bias.map(Tensor::layout),
        )?;
        let mask_tracked = mask.track_op();
        let bias_tracked = position_bias.is_some_and(Tensor::track_op);
        let (grad_qkv, grad_mask_per_head, grad_bias_per_sequence) = self.gradients(
            (qkv_data, mask_data, bias_data),
            g,
            dims,
            (mask_tracked, bias_tracked),
        );
        let Dims { batch, seq, .. } = dims;
        let grad_mask = if mask_tracked {
            let per_head =
                Tensor::from_vec(grad_mask_per_head, (batch, self.heads, seq), qkv.device())?;
            Some(per_head.sum(1)?.reshape(mask.shape())?)
        } else {
            None
        };
        let grad_bias = if bias_tracked {
            let per_sequence = Tensor::from_vec(
                grad_bias_per_sequence,
                (batch, self.heads, seq, seq),
                qkv.device(),
            )?;
            Some(per_sequence.sum(0)?)
        } else {
            None
        };
        Ok([
            Some(Tensor::from_vec(grad_qkv, qkv.shape(), qkv.device())?),
            grad_mask,
            grad_bias,
        ])
    }

    /// The gradients of one call: of `qkv` (all of it), and per head of the mask bias and per
    /// sequence of the position bias, each only when `tracked` (else empty).
    pub(super) fn gradients(
        &self,
        (qkv_data, mask_data, bias_data): (&[f32], &[f32], Option<&[f32]>),
        g: &[f32],
        dims: Dims,
        (mask_tracked, bias_tracked): (bool, bool),
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let Dims {
            batch,
            seq,
            hidden,
            head_dim,
        } = dims;
        // Every task writes its head's q, k and v columns of its sequence's rows: all of it.
        let mut grad_qkv: Vec<f32> = Vec::with_capacity(qkv_data.len());
        let out = SharedMut(grad_qkv.as_mut_ptr());
        // The mask bias is a constant in the model; its gradient (the score gradients summed over
        // heads and query rows) is only computed when something asks for it.
        let mut grad_mask_per_head = vec![
            0f32;
            if mask_tracked {
                batch * self.heads * seq
            } else {
                0
            }
        ];
        let mask_out = SharedMut(grad_mask_per_head.as_mut_ptr());
        // The position bias is a parameter (MPNet's relative attention bias, via its buckets):
        // each task keeps its score gradients, summed over the batch afterwards.
        let mut grad_bias_per_sequence = vec![
            0f32;
            if bias_tracked {
                batch * self.heads * seq * seq
            } else {
                0
            }
        ];
        let bias_out = SharedMut(grad_bias_per_sequence.as_mut_ptr());
        (0..batch * self.heads).into_par_iter().for_each(|task| {
            let (b, head) = (task / self.heads, task % self.heads);
            with_scratch(seq * seq, |[probs, dropped, grad_used, grad_probs]| {
                // SAFETY: `dims` was checked against both inputs' shapes.
                unsafe { self.probabilities(qkv_data, mask_data, bias_data, dims, b, head, probs) };
                let first = self.first_index(dims, b, head);
                let used: &[f32] = match self.keep {
                    Some(keep) => {
                        apply_keep(probs, dropped, first, keep);
                        dropped
                    }
                    None => probs,
                };
                let packed = 3 * hidden as isize;
                let row = b * seq * 3 * hidden + head * head_dim;
                let (q, k, v) = (row, row + hidden, row + 2 * hidden);
                let grad_out = Operand {
                    ptr: g[b * seq * hidden + head * head_dim..].as_ptr(),
                    rows: hidden as isize,
                    cols: 1,
                };
                // SAFETY: all reads stay inside this head's columns of `qkv` and `grad`; each task
                // writes only its own head's q, k and v columns of `grad_qkv`.
                unsafe {
                    // dV = P_used^T · dO
                    matmul(
                        (seq, head_dim, seq),
                        out.ptr().add(v),
                        (packed, 1),
                        None,
                        Operand {
                            ptr: used.as_ptr(),
                            rows: 1,
                            cols: seq as isize,
                        },
                        grad_out,
                        1.0,
                        false,
                    );
                    // dP_used = dO · V^T (dP itself without dropout)
                    let target = if self.keep.is_some() {
                        grad_used.as_mut_ptr()
                    } else {
                        grad_probs.as_mut_ptr()
                    };
                    matmul(
                        (seq, seq, head_dim),
                        target,
                        (seq as isize, 1),
                        None,
                        grad_out,
                        Operand {
                            ptr: qkv_data.as_ptr().add(v),
                            rows: 1,
                            cols: packed,
                        },
                        1.0,
                        false,
                    );
                }
                if let Some(keep) = self.keep {
                    // dP = dP_used through the dropout mask.
                    apply_keep(grad_used, grad_probs, first, keep);
                }
                softmax_backward_rows(probs, grad_probs, seq);
                if mask_tracked {
                    // SAFETY: each task writes only its own row of `grad_mask_per_head`.
                    let sums = unsafe {
                        std::slice::from_raw_parts_mut(mask_out.ptr().add(task * seq), seq)
                    };
                    for row in grad_probs.chunks_exact(seq) {
                        sums.iter_mut().zip(row).for_each(|(s, g)| *s += g);
                    }
                }
                if bias_tracked {
                    // SAFETY: each task writes only its own `seq x seq` block.
                    let block = unsafe {
                        std::slice::from_raw_parts_mut(
                            bias_out.ptr().add(task * seq * seq),
                            seq * seq,
                        )
                    };
                    block.copy_from_slice(grad_probs);
                }
                // SAFETY: as above.
                unsafe {
                    // dQ = scale · dS · K
                    matmul(
                        (seq, head_dim, seq),
                        out.ptr().add(q),
                        (packed, 1),
                        None,
                        Operand {
                            ptr: grad_probs.as_ptr(),
                            rows: seq as isize,
                            cols: 1,
                        },
                        Operand {
                            ptr: qkv_data.as_ptr().add(k),
                            rows: packed,
                            cols: 1,
                        },
                        self.scale,
                        false,
                    );
                    // dK = scale · dS^T · Q
                    matmul(
                        (seq, head_dim, seq),
                        out.ptr().add(k),
                        (packed, 1),
                        None,
                        Operand {
                            ptr: grad_probs.as_ptr(),
                            rows: 1,
                            cols: seq as isize,
                        },
                        Operand {
                            ptr: qkv_data.as_ptr().add(q),
                            rows: packed,
                            cols: 1,
                        },
                        self.scale,
                        false,
                    );
                }
            });
        });
        // SAFETY: the tasks, one per (sequence, head), wrote every element.
        unsafe { grad_qkv.set_len(qkv_data.len()) };
        (grad_qkv, grad_mask_per_head, grad_bias_per_sequence)
    }
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(
        &self,
        s_qkv: &CpuStorage,
        l_qkv: &Layout,
        s_mask: &CpuStorage,
        l_mask: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let qkv = input(s_qkv, l_qkv, Self::NAME)?;
        let mask = input(s_mask, l_mask, Self::NAME)?;
        let dims = self.dims(l_qkv, l_mask, None)?;
        Ok(self.forward(qkv, mask, None, dims))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        mask: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [grad_qkv, grad_mask, _] = self.backward(qkv, mask, None, grad)?;
        Ok((grad_qkv, grad_mask))
    }
}

/// [`Attention`] with a relative-position bias `[heads, seq, seq]` as its third input.
struct PositionBiasedAttention(Attention);

impl CustomOp3 for PositionBiasedAttention {
    fn name(&self) -> &'static str {
        "fused-attention-position-bias"
    }

    fn cpu_fwd(
        &self,
        s_qkv: &CpuStorage,
        l_qkv: &Layout,
        s_mask: &CpuStorage,
        l_mask: &Layout,
        s_bias: &CpuStorage,
        l_bias: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let qkv = input(s_qkv, l_qkv, self.name())?;
        let mask = input(s_mask, l_mask, self.name())?;
        let bias = input(s_bias, l_bias, self.name())?;
        let dims = self.0.dims(l_qkv, l_mask, Some(l_bias))?;
        Ok(self.0.forward(qkv, mask, Some(bias), dims))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        mask: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [grad_qkv, grad_mask, grad_bias] = self.0.backward(qkv, mask, Some(bias), grad)?;
        Ok((grad_qkv, grad_mask, grad_bias))
    }
}

impl Attention {
    pub(super) fn new(heads: usize, scale: f64, probs_dropout: Option<Dropout>) -> Self {
        Self {
            heads,
            scale: scale as f32,
            keep: probs_dropout.filter(|d| d.p > 0.).map(KeepRule::new),
        }
    }

    /// The sizes of a call over `batch` sequences of `seq` tokens, `hidden` wide.
    pub(super) fn dims_of(&self, batch: usize, seq: usize, hidden: usize) -> Result<Dims> {
        if self.heads == 0 || !hidden.is_multiple_of(self.heads) {
            bail!(
                "fused attention: {hidden} features do not split into {} heads",
                self.heads
            );
        }
        Ok(Dims {
            batch,
            seq,
            hidden,
            head_dim: hidden / self.heads,
        })
    }
}

/// See [`crate::model::kernels::attention`]; `mask_bias` is `[batch, seq]` here.
pub(in crate::model::kernels) fn attention(
    qkv: &Tensor,
    mask_bias: &Tensor,
    position_bias: Option<&Tensor>,
    heads: usize,
    scale: f64,
    probs_dropout: Option<Dropout>,
) -> Result<Tensor> {
    let op = Attention::new(heads, scale, probs_dropout);
    let (qkv, mask_bias) = (qkv.contiguous()?, mask_bias.contiguous()?);
    match position_bias {
        None => qkv.apply_op2(&mask_bias, op),
        Some(bias) => qkv.apply_op3(&mask_bias, &bias.contiguous()?, PositionBiasedAttention(op)),
    }
}
