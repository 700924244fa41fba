//! LayerNorm over the last dimension: one pass per row forward; backward recomputes each row's
//! mean and inverse deviation (cheaper than storing them: the op has one output) and produces
//! the input, gain and bias gradients in one pass, the latter two summed per task then across.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::math::{sum_by, sum_zip_by};
use super::{CHUNK, Read, filled, input, multiversion};
use crate::model::kernels::KeepRule;

/// Mean and `1 / sqrt(var + eps)` of a row (biased variance, two passes for accuracy).
#[inline(always)]
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = sum_by(row, |v| v) / n;
    let var = sum_by(row, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

multiversion! {
    /// Writes every element of `out` (as long as `x`, whole rows).
    fn forward_rows(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
        let width = gamma.len();
        for (row, out) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
            let (mean, inv_std) = moments(row, eps);
            for (((o, &v), &g), &b) in out.iter_mut().zip(row).zip(gamma).zip(beta) {
                o.write((v - mean) * inv_std * g + b);
            }
        }
    }
}

multiversion! {
    /// Writes the input gradient of each row into `grad_x` and adds the gain and bias gradients
    /// into `grad_gamma` and `grad_beta`.
    fn backward_rows(
        x: &[f32],
        gamma: &[f32],
        grad: &[f32],
        eps: f32,
        grad_x: &mut [f32],
        grad_gamma: &mut [f32],
        grad_beta: &mut [f32],
    ) {
        let width = gamma.len();
        let n = width as f32;
        for ((row, g), gx) in x.chunks_exact(width).zip(grad.chunks_exact(width)).zip(grad_x.chunks_exact_mut(width)) {
            let (mean, inv_std) = moments(row, eps);
            // With xhat = (x - mean) * inv_std and gg = grad * gamma:
            // dx = inv_std * (gg - mean(gg) - xhat * mean(gg * xhat)). `gx` holds gg first.
            for ((o, &gr), &ga) in gx.iter_mut().zip(g).zip(gamma) {
                *o = gr * ga;
            }
            let mean_gg = sum_by(gx, |v| v) / n;
            let mean_gg_xhat = sum_zip_by(gx, row, |gg, v| gg * (v - mean)) * inv_std / n;
            for (((o, &v), &gr), (dg, db)) in gx
                .iter_mut()
                .zip(row)
                .zip(g)
                .zip(grad_gamma.iter_mut().zip(grad_beta.iter_mut()))
            {
                let xhat = (v - mean) * inv_std;
                *dg += gr * xhat;
                *db += gr;
                *o = inv_std * (*o - mean_gg - xhat * mean_gg_xhat);
            }
        }
    }
}

struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = input(sx, lx, self.name())?;
        let gamma = input(sg, lg, self.name())?;
        let beta = input(sb, lb, self.name())?;
        let width = gamma.len();
        if width == 0 || x.len() % width != 0 || beta.len() != width {
            bail!(
                "fused layer norm: x {:?}, gamma {width}, beta {}",
                lx.dims(),
                beta.len()
            );
        }
        let task = rows_per_task(width) * width;
        // SAFETY: chunk `i` of the output is chunk `i` of `x`, whole rows, and filled from it.
        let out = unsafe {
            filled(x.len(), task, |i, out| {
                let x = &x[i * task..i * task + out.len()];
                forward_rows(x, gamma, beta, self.eps, out)
            })
        };
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (read_x, read_gamma, read_grad) = (Read::new(x), Read::new(gamma), Read::new(&grad));
        let x_data = read_x.slice(self.name())?;
        let gamma_data = read_gamma.slice(self.name())?;
        let g = read_grad.slice(self.name())?;
        let (grad_x, grad_gamma, grad_beta) = gradients(x_data, gamma_data, g, self.eps);
        let width = gamma_data.len();
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(grad_x, x.shape(), device)?),
            Some(Tensor::from_vec(grad_gamma, width, device)?),
            Some(Tensor::from_vec(grad_beta, width, device)?),
        ))
    }
}

/// Rows per rayon task: about [`CHUNK`] elements.
fn rows_per_task(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
}

/// The gradients of LayerNorm's input, gain and bias for input `x` (whole rows of
/// `gamma.len()`) given the output's, `grad`.
pub(super) fn gradients(
    x: &[f32],
    gamma: &[f32],
    grad: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let width = gamma.len();
    let task = rows_per_task(width) * width;
    let mut grad_x = vec![0f32; x.len()];
    // Each task's sums are added in task order, not in rayon's `reduce` tree, whose shape
    // (and so the rounding) followed work stealing: same seed, different weights.
    let partial: Vec<(Vec<f32>, Vec<f32>)> = grad_x
        .par_chunks_mut(task)
        .zip(x.par_chunks(task).zip(grad.par_chunks(task)))
        .map(|(gx, (x, g))| {
            let mut sums = (vec![0f32; width], vec![0f32; width]);
            backward_rows(x, gamma, g, eps, gx, &mut sums.0, &mut sums.1);
            sums
        })
        .collect();
    let (mut grad_gamma, mut grad_beta) = (vec![0f32; width], vec![0f32; width]);
    for (gamma_part, beta_part) in &partial {
        grad_gamma
            .iter_mut()
            .zip(gamma_part)
            .for_each(|(a, b)| *a += b);
        grad_beta
            .iter_mut()
            .zip(beta_part)
            .for_each(|(a, b)| *a += b);
    }
    (grad_x, grad_gamma, grad_beta)
}

multiversion! {
    /// Rows of `sum = a * keep + residual` (dropout of `a`, numbered from `first`, then the
    /// residual added) into `sum`, and their LayerNorm into `out`: both written whole. `row`
    /// is scratch of one row.
    #[allow(clippy::too_many_arguments)]
    fn residual_rows(
        a: &[f32],
        residual: &[f32],
        keep: Option<KeepRule>,
        first: u64,
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        row: &mut [f32],
        sum: &mut [MaybeUninit<f32>],
        out: &mut [MaybeUninit<f32>],
    ) {
        let width = gamma.len();
        let rows = a.chunks_exact(width).zip(residual.chunks_exact(width));
        let outputs = sum.chunks_exact_mut(width).zip(out.chunks_exact_mut(width));
        for (r, ((a, residual), (sum, out))) in rows.zip(outputs).enumerate() {
            let first = first + (r * width) as u64;
            match keep {
                Some(keep) => {
                    for (i, ((s, &v), &x)) in row.iter_mut().zip(a).zip(residual).enumerate() {
                        *s = v * keep.scale(first + i as u64) + x;
                    }
                }
                None => {
                    for ((s, &v), &x) in row.iter_mut().zip(a).zip(residual) {
                        *s = v + x;
                    }
                }
            }
            let (mean, inv_std) = moments(row, eps);
            let outputs = out.iter_mut().zip(sum.iter_mut());
            for (((o, s), &v), (&g, &b)) in outputs.zip(&*row).zip(gamma.iter().zip(beta)) {
                s.write(v);
                o.write((v - mean) * inv_std * g + b);
            }
        }
    }
}

/// `layer_norm(dropout(a) + residual)` over rows of `gamma.len()`, as BERT closes each half of
/// a layer: returns the sum (LayerNorm's input, which its backward reads) and the output.
/// Element `i` of `a` keeps or drops as [`KeepRule::scale`]`(i)` says, as the dropout kernel's.
pub(super) fn residual_forward(
    a: &[f32],
    residual: &[f32],
    keep: Option<KeepRule>,
    (gamma, beta): (&[f32], &[f32]),
    eps: f32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let width = gamma.len();
    if width == 0
        || !a.len().is_multiple_of(width)
        || residual.len() != a.len()
        || beta.len() != width
    {
        bail!(
            "fused residual layer norm: {} and {} elements, gamma {width}, beta {}",
            a.len(),
            residual.len(),
            beta.len()
        );
    }
    let task = rows_per_task(width) * width;
    let (mut sum, mut out) = (Vec::with_capacity(a.len()), Vec::with_capacity(a.len()));
    sum.spare_capacity_mut()[..a.len()]
        .par_chunks_mut(task)
        .zip(out.spare_capacity_mut()[..a.len()].par_chunks_mut(task))
        .enumerate()
        .for_each(|(i, (sum, out))| {
            let range = i * task..i * task + sum.len();
            let mut row = vec![0f32; width];
            residual_rows(
                &a[range.clone()],
                &residual[range],
                keep,
                (i * task) as u64,
                gamma,
                beta,
                eps,
                &mut row,
                sum,
                out,
            );
        });
    // SAFETY: the chunks cover every element, and `residual_rows` writes each of both buffers.
    unsafe {
        sum.set_len(a.len());
        out.set_len(a.len());
    }
    Ok((sum, out))
}

pub(in crate::model::kernels) fn layer_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}
