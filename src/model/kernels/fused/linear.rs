//! `x @ weight^T + bias` as one product that starts from the bias, and its backward as
//! two gemms reading the transposed operands in place plus the bias gradient as a parallel
//! column sum (autograd's `broadcast_add` backward reduces `[rows, out]` along its strided axis,
//! which cost more than the matmul for the 384 -> 1536 layer).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::{CHUNK, Epilogue, Operand, Product, Read, input, matmul, matmul_then, multiversion};

multiversion! {
    /// Adds each row of `rows` (rows of `sums.len()` elements) into `sums`.
    fn add_rows(rows: &[f32], sums: &mut [f32]) {
        for row in rows.chunks_exact(sums.len()) {
            for (s, &v) in sums.iter_mut().zip(row) {
                *s += v;
            }
        }
    }
}

/// Sums of the columns of a row-major `[_, width]` matrix.
///
/// Each task's sums are collected in order and added in that order, so the result depends on
/// the data alone. rayon's `reduce` pairs partial sums in whatever tree work stealing made, which
/// changed the last bits of the bias gradients from run to run (same seed, other weights).
pub(super) fn column_sums(data: &[f32], width: usize) -> Vec<f32> {
    let task = (CHUNK / width.max(1)).max(1) * width;
    let partial: Vec<Vec<f32>> = data
        .par_chunks(task)
        .map(|rows| {
            let mut sums = vec![0f32; width];
            add_rows(rows, &mut sums);
            sums
        })
        .collect();
    let mut sums = vec![0f32; width];
    for part in &partial {
        add_rows(part, &mut sums);
    }
    sums
}

/// Over a 2-D `x` `[rows, in]`, `weight` `[out, in]`, `bias` `[out]`.
struct Linear;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let operands = Operands::new(self.name(), (sx, lx), (sw, lw), (sb, lb))?;
        let (rows, _, out) = operands.shape;
        let mut y: Vec<f32> = Vec::with_capacity(rows * out);
        // SAFETY: `y` has room for `[rows, out]`, which the product writes before `set_len`.
        unsafe {
            operands.forward_into(y.as_mut_ptr(), Epilogue::None);
            y.set_len(rows * out);
        }
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        backward_op(self.name(), [x, w, bias], grad, |_| Ok(None))
    }
}

/// A linear layer op's inputs, a 2-D `x` `[rows, in]`, `weight` `[out, in]` and `bias` `[out]`,
/// with `shape` `(rows, in, out)` checked against them.
pub(super) struct Operands<'a> {
    x: &'a [f32],
    w: &'a [f32],
    bias: &'a [f32],
    pub(super) shape: (usize, usize, usize),
}

impl<'a> Operands<'a> {
    pub(super) fn new(
        op: &str,
        (sx, lx): (&'a CpuStorage, &Layout),
        (sw, lw): (&'a CpuStorage, &Layout),
        (sb, lb): (&'a CpuStorage, &Layout),
    ) -> Result<Self> {
        let (x, w, bias) = (input(sx, lx, op)?, input(sw, lw, op)?, input(sb, lb, op)?);
        let (rows, inp) = lx.shape().dims2()?;
        let (out, w_inp) = lw.shape().dims2()?;
        if w_inp != inp || bias.len() != out {
            bail!(
                "fused linear: x {:?}, weight {:?}, bias {}",
                lx.dims(),
                lw.dims(),
                bias.len()
            );
        }
        Ok(Self {
            x,
            w,
            bias,
            shape: (rows, inp, out),
        })
    }

    /// Over slices already checked to hold `shape` `(rows, in, out)`'s elements.
    pub(super) fn of_slices(
        x: &'a [f32],
        w: &'a [f32],
        bias: &'a [f32],
        shape: (usize, usize, usize),
    ) -> Result<Self> {
        let (rows, inp, out) = shape;
        if x.len() != rows * inp || w.len() != out * inp || bias.len() != out {
            bail!(
                "fused linear: x {}, weight {}, bias {} for [{rows}, {inp}] -> {out}",
                x.len(),
                w.len(),
                bias.len()
            );
        }
        Ok(Self { x, w, bias, shape })
    }

    /// `dst = x @ w^T + bias` (`[rows, out]`, row-major), then `epilogue` on each block.
    ///
    /// # Safety
    /// `dst`, and the buffer of a `GeluInto` epilogue, must be valid for `rows * out` writes that
    /// no one else makes.
    pub(super) unsafe fn forward_into(&self, dst: *mut f32, epilogue: Epilogue) {
        let (rows, inp, out) = self.shape;
        let product = Product {
            shape: (rows, out, inp),
            dst,
            dst_strides: (out as isize, 1),
            bias: Some(self.bias),
            lhs: Operand {
                ptr: self.x.as_ptr(),
                rows: inp as isize,
                cols: 1,
            },
            // `w` read as `w^T`.
            rhs: Operand {
                ptr: self.w.as_ptr(),
                rows: 1,
                cols: inp as isize,
            },
            scale: 1.0,
            parallel: true,
        };
        // SAFETY: the operands' sizes were checked in `new`; `dst` is the caller's.
        unsafe { matmul_then(product, epilogue) };
    }
}

/// A linear layer op's backward over `[x, weight, bias]` given the output's gradient `grad`:
/// `through` may turn that gradient into the product's first (an activation's backward; `None`
/// keeps it), then the layer's three gradients.
pub(super) fn backward_op(
    op: &str,
    [x, w, bias]: [&Tensor; 3],
    grad: &Tensor,
    through: impl FnOnce(&[f32]) -> Result<Option<Vec<f32>>>,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    let (read_x, read_w, read_grad) = (Read::new(x), Read::new(w), Read::new(&grad));
    let (x_data, w_data, g) = (read_x.slice(op)?, read_w.slice(op)?, read_grad.slice(op)?);
    let through = through(g)?;
    let g = through.as_deref().unwrap_or(g);
    let grads = backward(x_data, w_data, g, x.dims2()?, w.dim(0)?)?;
    let device = x.device();
    Ok((
        Some(Tensor::from_vec(grads.x, x.shape(), device)?),
        Some(Tensor::from_vec(grads.weight, w.shape(), device)?),
        Some(Tensor::from_vec(grads.bias, bias.shape(), device)?),
    ))
}

/// The gradients of a linear layer's input, weight and bias.
struct Gradients {
    x: Vec<f32>,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// The gradients of `x @ w^T + bias` for `x` `[rows, inp]`, `w` `[out, inp]` given the output's,
/// `g` `[rows, out]`.
fn backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    (rows, inp): (usize, usize),
    out: usize,
) -> Result<Gradients> {
    let mut weight = vec![0f32; out * inp];
    let mut bias = vec![0f32; out];
    let x = backward_into(x, w, g, (rows, inp), out, (&mut weight, &mut bias))?;
    Ok(Gradients { x, weight, bias })
}

/// As [`backward`], writing the weight and bias gradients into `grad_w` (`[out, inp]`) and
/// `grad_bias` (`[out]`) and returning the input's: two products reading the transposed operands
/// in place, and column sums.
pub(super) fn backward_into(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    (rows, inp): (usize, usize),
    out: usize,
    (grad_w, grad_bias): (&mut [f32], &mut [f32]),
) -> Result<Vec<f32>> {
    if x.len() != rows * inp
        || w.len() != out * inp
        || g.len() != rows * out
        || grad_w.len() != out * inp
        || grad_bias.len() != out
    {
        bail!(
            "fused linear backward: x {}, weight {}, gradient {}, weight gradient {}, bias gradient {} for [{rows}, {inp}] -> {out}",
            x.len(),
            w.len(),
            g.len(),
            grad_w.len(),
            grad_bias.len()
        );
    }
    // The input's product writes every element, so its buffer skips zeroing.
    let mut grad_x: Vec<f32> = Vec::with_capacity(rows * inp);
    // SAFETY: grad_x `[rows, inp]` = g `[rows, out]` · w `[out, inp]`; grad_w `[out, inp]`
    // = g^T `[out, rows]` · x `[rows, inp]`; the sizes were checked above, every buffer has the
    // capacity its strides reach, and the first product writes all of grad_x before `set_len`.
    unsafe {
        matmul(
            (rows, inp, out),
            grad_x.as_mut_ptr(),
            (inp as isize, 1),
            None,
            Operand {
                ptr: g.as_ptr(),
                rows: out as isize,
                cols: 1,
            },
            Operand {
                ptr: w.as_ptr(),
                rows: inp as isize,
                cols: 1,
            },
            1.0,
            true,
        );
        matmul(
            (out, inp, rows),
            grad_w.as_mut_ptr(),
            (inp as isize, 1),
            None,
            Operand {
                ptr: g.as_ptr(),
                rows: 1,
                cols: out as isize,
            },
            Operand {
                ptr: x.as_ptr(),
                rows: inp as isize,
                cols: 1,
            },
            1.0,
            true,
        );
        grad_x.set_len(rows * inp);
    }
    grad_bias.copy_from_slice(&column_sums(g, out));
    Ok(grad_x)
}

/// Runs `op` (a linear layer's) over `x` with any number of leading dimensions, flattened to rows.
pub(super) fn apply(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    op: impl CustomOp3 + Send + Sync + 'static,
) -> Result<Tensor> {
    let (out_features, in_features) = weight.dims2()?;
    let rows = x.elem_count() / in_features.max(1);
    let mut out_dims = x.dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out_features;
    }
    x.contiguous()?
        .reshape((rows, in_features))?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?
        .reshape(out_dims)
}

pub(in crate::model::kernels) fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<Tensor> {
    apply(x, weight, bias, Linear)
}
