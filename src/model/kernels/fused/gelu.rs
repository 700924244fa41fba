//! Exact (erf) GELU and its derivative, elementwise over chunks in parallel.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::math::{erf, exp};
use super::{CHUNK, Read, filled, input, multiversion};

/// `1 / sqrt(2)` and `1 / sqrt(2 pi)`.
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

multiversion! {
    /// Writes every element of `out` (as long as `x`).
    fn forward_chunk(x: &[f32], out: &mut [MaybeUninit<f32>]) {
        for (o, &v) in out.iter_mut().zip(x) {
            o.write(0.5 * v * (1.0 + erf(v * FRAC_1_SQRT_2)));
        }
    }
}

multiversion! {
    /// `grad * (Φ(x) + x φ(x))`, into every element of `out` (as long as `x` and `grad`).
    fn backward_chunk(x: &[f32], grad: &[f32], out: &mut [MaybeUninit<f32>]) {
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(grad) {
            let cdf = 0.5 * (1.0 + erf(v * FRAC_1_SQRT_2));
            let pdf = FRAC_1_SQRT_2PI * exp(-0.5 * v * v);
            o.write(g * (cdf + v * pdf));
        }
    }
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input(storage, layout, self.name())?;
        // SAFETY: chunk `i` of the output is as long as chunk `i` of `x`, and filled from it.
        let out = unsafe {
            filled(x.len(), CHUNK, |i, out| {
                forward_chunk(&x[i * CHUNK..i * CHUNK + out.len()], out)
            })
        };
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (read_x, read_grad) = (Read::new(x), Read::new(&grad));
        let (x, g) = (read_x.slice(self.name())?, read_grad.slice(self.name())?);
        if g.len() != x.len() {
            candle_core::bail!("fused gelu: {} gradients for {} inputs", g.len(), x.len());
        }
        // SAFETY: chunk `i` of the output is as long as chunk `i` of `x` and `g`, filled from them.
        let out = unsafe {
            filled(x.len(), CHUNK, |i, out| {
                let range = i * CHUNK..i * CHUNK + out.len();
                backward_chunk(&x[range.clone()], &g[range], out)
            })
        };
        Ok(Some(Tensor::from_vec(out, grad.shape(), grad.device())?))
    }
}

pub(in crate::model::kernels) fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}
