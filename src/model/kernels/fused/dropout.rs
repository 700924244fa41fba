//! Dropout with its mask drawn inline from the seed (see [`super::super::keep_scale`]): nothing
//! is materialised, and the backward pass redraws the same mask.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::{CHUNK, Read, filled, input, multiversion};
use crate::model::kernels::{Dropout, KeepRule};

/// `x_i * keep_scale(i)` for every element of `x`.
fn apply(x: &[f32], rule: KeepRule) -> Vec<f32> {
    multiversion! {
        /// Writes every element of `out` (as long as `x`).
        fn apply_chunk(x: &[f32], out: &mut [MaybeUninit<f32>], first: u64, rule: KeepRule) {
            for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
                o.write(v * rule.scale(first + i as u64));
            }
        }
    }
    // SAFETY: chunk `c` of the output is as long as chunk `c` of `x`, and filled from it.
    unsafe {
        filled(x.len(), CHUNK, |c, out| {
            let first = c * CHUNK;
            apply_chunk(&x[first..first + out.len()], out, first as u64, rule)
        })
    }
}

/// `grad` through the dropout `rule` draws (the forward pass's mask, drawn again); `grad`
/// itself where there is none.
pub(super) fn redraw(grad: &[f32], rule: Option<KeepRule>) -> Cow<'_, [f32]> {
    match rule {
        Some(rule) => Cow::Owned(apply(grad, rule)),
        None => Cow::Borrowed(grad),
    }
}

struct DropoutOp(KeepRule);

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input(storage, layout, self.name())?;
        Ok((CpuStorage::F32(apply(x, self.0)), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let read = Read::new(&grad);
        let g = read.slice(self.name())?;
        Ok(Some(Tensor::from_vec(
            apply(g, self.0),
            grad.shape(),
            grad.device(),
        )?))
    }
}

pub(in crate::model::kernels) fn dropout(x: &Tensor, params: Dropout) -> Result<Tensor> {
    x.contiguous()?.apply_op1(DropoutOp(KeepRule::new(params)))
}
