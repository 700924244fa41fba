//! `x @ weight^T + bias` as one product that starts from the bias, and its backward as
//! two gemms reading the transposed operands in place plus the bias gradient as a parallel
//! column sum (autograd's `broadcast_add` backward reduces `[rows, out]` along its strided axis,
//! which cost more than the matmul for the 384 -> 1536 layer).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::{CHUNK, Operand, Read, input, matmul, multiversion};

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
fn column_sums(data: &[f32], width: usize) -> Vec<f32> {
    let task = (CHUNK / width.max(1)).max(1) * width;
    data.par_chunks(task)
        .map(|rows| {
            let mut sums = vec![0f32; width];
            add_rows(rows, &mut sums);
            sums
        })
        .reduce(
            || vec![0f32; width],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
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
        let x = input(sx, lx, self.name())?;
        let w = input(sw, lw, self.name())?;
        let bias = input(sb, lb, self.name())?;
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
        let mut y: Vec<f32> = Vec::with_capacity(rows * out);
        // SAFETY: `y` is `[rows, out]`, `x` `[rows, inp]`, `w` `[out, inp]` read as `w^T`; the
        // product writes every element of `y` (starting from the bias) before `set_len`.
        unsafe {
            matmul(
                (rows, out, inp),
                y.as_mut_ptr(),
                (out as isize, 1),
                Some(bias),
                Operand {
                    ptr: x.as_ptr(),
                    rows: inp as isize,
                    cols: 1,
                },
                Operand {
                    ptr: w.as_ptr(),
                    rows: 1,
                    cols: inp as isize,
                },
                1.0,
                true,
            );
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
        let grad = grad.contiguous()?;
        let (read_x, read_w, read_grad) = (Read::new(x), Read::new(w), Read::new(&grad));
        let (x_data, w_data) = (read_x.slice(self.name())?, read_w.slice(self.name())?);
        let g = read_grad.slice(self.name())?;
        let (rows, inp) = x.dims2()?;
        let out = w.dim(0)?;
        // Both products write every element, so the buffers skip zeroing.
        let mut grad_x: Vec<f32> = Vec::with_capacity(rows * inp);
        let mut grad_w: Vec<f32> = Vec::with_capacity(out * inp);
        // SAFETY: grad_x `[rows, inp]` = grad `[rows, out]` · w `[out, inp]`; grad_w `[out, inp]`
        // = grad^T `[out, rows]` · x `[rows, inp]`; every buffer has the capacity its strides
        // reach, and each product writes all of it before `set_len`.
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
                    ptr: w_data.as_ptr(),
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
                    ptr: x_data.as_ptr(),
                    rows: inp as isize,
                    cols: 1,
                },
                1.0,
                true,
            );
            grad_x.set_len(rows * inp);
            grad_w.set_len(out * inp);
        }
        let grad_bias = column_sums(g, out);
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(grad_x, (rows, inp), device)?),
            Some(Tensor::from_vec(grad_w, (out, inp), device)?),
            Some(Tensor::from_vec(grad_bias, bias.shape(), device)?),
        ))
    }
}

pub(in crate::model::kernels) fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<Tensor> {
    let (out_features, in_features) = weight.dims2()?;
    let rows = x.elem_count() / in_features.max(1);
    let mut out_dims = x.dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out_features;
    }
    x.contiguous()?
        .reshape((rows, in_features))?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Linear)?
        .reshape(out_dims)
}
