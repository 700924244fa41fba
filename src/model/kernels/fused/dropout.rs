//! Dropout with its mask drawn inline from the seed (see [`super::super::keep_scale`]): nothing
//! is materialised, and the backward pass redraws the same mask.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{CHUNK, Read, input, multiversion};
use crate::model::kernels::{Dropout, KeepRule};

/// `out_i = x_i * keep_scale(i)`, element indices starting at `first`.
fn apply(x: &[f32], out: &mut [f32], first: usize, rule: KeepRule) {
    multiversion! {
        fn apply_chunk(x: &[f32], out: &mut [f32], first: usize, rule: KeepRule) {
            for (i, (o, v)) in out.iter_mut().zip(x).enumerate() {
                *o = v * rule.scale((first + i) as u64);
            }
        }
    }
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (out, x))| apply_chunk(x, out, first + c * CHUNK, rule));
}

struct DropoutOp(KeepRule);

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "fused-dropout"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = input(storage, layout, self.name())?;
        let mut out = vec![0f32; x.len()];
        apply(x, &mut out, 0, self.0);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let read = Read::new(&grad);
        let g = read.slice(self.name())?;
        let mut out = vec![0f32; g.len()];
        apply(g, &mut out, 0, self.0);
        Ok(Some(Tensor::from_vec(out, grad.shape(), grad.device())?))
    }
}

pub(in crate::model::kernels) fn dropout(x: &Tensor, params: Dropout) -> Result<Tensor> {
    x.contiguous()?.apply_op1(DropoutOp(KeepRule::new(params)))
}
