//! AdamW as one pass over each parameter's f32 elements: candle_nn's `AdamW` runs about ten
//! tensor ops per parameter, each allocating and sweeping a full-size temporary (for MiniLM's
//! 22.7M parameters, about half a second a step on two cores); this reads the parameter, its
//! gradient and both moments once and writes them once, in parallel chunks.
//!
//! Same update and hyper-parameters as `candle_nn::AdamW` (decoupled weight decay, bias-corrected
//! moments); parameters that are not f32 on the CPU are handed to a `candle_nn::AdamW`.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use rayon::prelude::*;

use super::fused::{CHUNK, Read, multiversion};

/// A parameter with its moments.
struct Slot {
    var: Var,
    first_moment: Vec<f32>,
    second_moment: Vec<f32>,
}

/// The per-step constants of the update.
#[derive(Clone, Copy)]
struct Step {
    beta1: f32,
    beta2: f32,
    /// `1 - beta`, rounded from f64 as candle_nn's do (`1 - 0.999f32` is 1.3e-5 off).
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    /// `1 / (1 - beta^t)`, the bias corrections.
    scale_m: f32,
    scale_v: f32,
    lr: f32,
    decay: f32,
    eps: f32,
}

multiversion! {
    fn update_chunk(theta: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], step: Step) {
        for (((t, &g), m), v) in theta.iter_mut().zip(grad).zip(m.iter_mut()).zip(v.iter_mut()) {
            *m = step.beta1 * *m + step.one_minus_beta1 * g;
            *v = step.beta2 * *v + step.one_minus_beta2 * (g * g);
            let adjusted = (*m * step.scale_m) / ((*v * step.scale_v).sqrt() + step.eps);
            *t = *t * step.decay - step.lr * adjusted;
        }
    }
}

/// AdamW over f32 CPU parameters in one fused pass each (see the module docs).
pub struct FusedAdamW {
    slots: Vec<Slot>,
    /// Parameters the fused pass does not take (other devices or dtypes).
    others: Option<AdamW>,
    step_t: i32,
    params: ParamsAdamW,
}

impl Optimizer for FusedAdamW {
    type Config = ParamsAdamW;

    fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let (fused, others): (Vec<Var>, Vec<Var>) = vars
            .into_iter()
            .filter(|var| var.dtype().is_float())
            .partition(|var| var.dtype() == DType::F32 && matches!(var.device(), Device::Cpu));
        let slots = fused
            .into_iter()
            .map(|var| {
                let n = var.elem_count();
                Slot {
                    var,
                    first_moment: vec![0.; n],
                    second_moment: vec![0.; n],
                }
            })
            .collect();
        let others = if others.is_empty() {
            None
        } else {
            Some(AdamW::new(others, params.clone())?)
        };
        Ok(Self {
            slots,
            others,
            step_t: 0,
            params,
        })
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let p = &self.params;
        let step = Step {
            beta1: p.beta1 as f32,
            beta2: p.beta2 as f32,
            one_minus_beta1: (1. - p.beta1) as f32,
            one_minus_beta2: (1. - p.beta2) as f32,
            scale_m: (1. / (1. - p.beta1.powi(self.step_t))) as f32,
            scale_v: (1. / (1. - p.beta2.powi(self.step_t))) as f32,
            lr: p.lr as f32,
            decay: (1. - p.lr * p.weight_decay) as f32,
            eps: p.eps as f32,
        };
        for slot in &mut self.slots {
            let Some(grad) = grads.get(&slot.var) else {
                continue;
            };
            let grad = grad.contiguous()?;
            let theta = {
                let (read_theta, read_grad) = (Read::new(slot.var.as_tensor()), Read::new(&grad));
                let mut theta = read_theta.slice("adamw")?.to_vec();
                let g = read_grad.slice("adamw")?;
                theta
                    .par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .zip(slot.first_moment.par_chunks_mut(CHUNK))
                    .zip(slot.second_moment.par_chunks_mut(CHUNK))
                    .for_each(|(((t, g), m), v)| update_chunk(t, g, m, v, step));
                theta
            };
            // The read locks are released: `set` takes the parameter's write lock.
            slot.var.set(&Tensor::from_vec(
                theta,
                slot.var.shape(),
                slot.var.device(),
            )?)?;
        }
        if let Some(others) = &mut self.others {
            others.step(grads)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
        if let Some(others) = &mut self.others {
            others.set_learning_rate(lr);
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::FusedAdamW;

    /// Three steps of both optimisers on the same random parameters (one f32 of an odd size
    /// spanning several chunks, one small, one f64 that goes to candle_nn's) and gradients: the
    /// parameters agree to 1e-6 of their magnitude plus 1e-3 of a full step (`lr`): f32 rounding
    /// in a different order, amplified where a moment is a near-cancelling sum.
    #[test]
    fn matches_candle_nn_adamw() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut random = |dims: &[usize], dtype: DType| {
            let n: usize = dims.iter().product();
            let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            Tensor::from_vec(data, dims, &Device::Cpu)
                .and_then(|t| t.to_dtype(dtype))
                .expect("random")
        };
        let shapes: [(&[usize], DType); 3] = [
            (&[70_001], DType::F32),
            (&[3, 5], DType::F32),
            (&[4], DType::F64),
        ];
        let initial: Vec<Tensor> = shapes.iter().map(|(d, t)| random(d, *t)).collect();
        let vars = |_: ()| -> Vec<Var> {
            initial
                .iter()
                .map(|t| Var::from_tensor(t).expect("var"))
                .collect()
        };
        let (fused_vars, plain_vars) = (vars(()), vars(()));
        let params = ParamsAdamW {
            lr: 0.01,
            weight_decay: 0.1,
            ..ParamsAdamW::default()
        };
        let mut fused = FusedAdamW::new(fused_vars.clone(), params.clone()).expect("fused");
        let mut plain = AdamW::new(plain_vars.clone(), params).expect("plain");
        for _ in 0..3 {
            let probes: Vec<Tensor> = shapes.iter().map(|(d, t)| random(d, *t)).collect();
            let loss = |vars: &[Var]| {
                vars.iter()
                    .zip(&probes)
                    .map(|(v, p)| (v.as_tensor().sqr()? * p)?.sum_all()?.to_dtype(DType::F32))
                    .reduce(|a, b| a? + b?)
                    .expect("three terms")
                    .and_then(|l| l.backward())
                    .expect("backward")
            };
            fused.step(&loss(&fused_vars)).expect("fused step");
            plain.step(&loss(&plain_vars)).expect("plain step");
        }
        let values = |v: &Tensor| {
            v.flatten_all()
                .and_then(|t| t.to_dtype(DType::F64))
                .and_then(|t| t.to_vec1::<f64>())
                .expect("values")
        };
        for ((f, p), start) in fused_vars.iter().zip(&plain_vars).zip(&initial) {
            let (f, p, start) = (values(f.as_tensor()), values(p.as_tensor()), values(start));
            let moved = f
                .iter()
                .zip(&start)
                .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(moved > 1e-3, "the parameters moved (by {moved})");
            for (a, b) in f.iter().zip(&p) {
                assert!((a - b).abs() <= 1e-6 * b.abs() + 1e-5, "{a} vs {b}");
            }
        }
    }
}
