//! BERT's intermediate layer, `gelu(x @ weight^T + bias)`, as one op: GELU runs as the product's
//! epilogue on each block while it is in cache, instead of a pass over the `[rows, 1536]`
//! activation; with no gradient wanted it overwrites the product in place. In training the op
//! keeps the product (GELU's input) for its backward, which turns the output gradient into the
//! product's in one pass and then runs the linear layer's backward: the graph holds one node
//! where the composition holds two, so autograd allocates and sums one gradient of that size
//! instead of two.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};

use super::linear::{Operands, apply, backward_op};
use super::{Epilogue, SharedMut, gelu};

/// Over a 2-D `x` `[rows, in]`, `weight` `[out, in]`, `bias` `[out]`.
struct LinearGelu {
    /// The product `x @ weight^T + bias` of the forward pass, kept for the backward when
    /// gradients are wanted (`None` inside until the forward ran, and without gradients).
    product: Option<Mutex<Vec<f32>>>,
}

impl CustomOp3 for LinearGelu {
    fn name(&self) -> &'static str {
        "fused-linear-gelu"
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
        match &self.product {
            None => {
                // SAFETY: `y` has room for `[rows, out]`, which the product writes (then GELU
                // overwrites) before `set_len`.
                unsafe {
                    operands.forward_into(y.as_mut_ptr(), Epilogue::Gelu);
                    y.set_len(rows * out);
                }
            }
            Some(kept) => {
                let mut product = kept.lock().map_err(|_| poisoned())?;
                product.clear();
                product.reserve(rows * out);
                let into = Epilogue::GeluInto(SharedMut(y.as_mut_ptr()));
                // SAFETY: both buffers have room for `[rows, out]`: the product writes every
                // element of `product`, and the epilogue every element of `y`, before `set_len`.
                unsafe {
                    operands.forward_into(product.as_mut_ptr(), into);
                    product.set_len(rows * out);
                    y.set_len(rows * out);
                }
            }
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
        let Some(kept) = &self.product else {
            bail!("fused linear+gelu: backward of a forward run without gradients");
        };
        let product = kept.lock().map_err(|_| poisoned())?;
        backward_op(self.name(), [x, w, bias], grad, |g| {
            if product.len() != g.len() {
                bail!(
                    "fused linear+gelu: {} gradients for a product of {}",
                    g.len(),
                    product.len()
                );
            }
            Ok(Some(gelu::backward(&product, g)))
        })
    }
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("fused linear+gelu: a thread panicked holding the product".into())
}

pub(in crate::model::kernels) fn linear_gelu(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<Tensor> {
    let wants_gradient = [x, weight, bias].iter().any(|t| t.track_op());
    let op = LinearGelu {
        product: wants_gradient.then(|| Mutex::new(Vec::new())),
    };
    apply(x, weight, bias, op)
}
