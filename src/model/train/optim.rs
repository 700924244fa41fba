//! AdamW with decoupled weight decay as `torch.optim.AdamW` computes it, the learning-rate
//! schedule (linear warmup, then linear decay) and gradient-norm clipping.
//!
//! Written here rather than taken from `candle_nn::AdamW`, which decays every parameter: the
//! usual fine-tuning recipe (Hugging Face's Trainer, so sentence-transformers) exempts biases and
//! LayerNorm weights. On the CPU in f32 the update runs in place in fused passes over each parameter;
//! elsewhere it is tensor ops, so it runs on whatever device holds the model.

use candle_core::{CpuStorage, DType, Device, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// AdamW's hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults, with the 0.01 decay sentence-transformers trains with.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Whether weight decay applies to the parameter named `name` (a checkpoint name): not to
/// biases and LayerNorm parameters, as Hugging Face's `get_decay_parameter_names` decides.
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("LayerNorm"))
}

/// One parameter under optimisation, with its first and second moment estimates.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub var: Var,
    pub decay: bool,
    pub m: Tensor,
    pub v: Tensor,
}

impl Param {
    pub fn new(name: String, var: Var, decay: bool) -> Result<Self> {
        // Two allocations: the fused update writes each moment in place.
        let m = var.zeros_like()?.detach();
        let v = var.zeros_like()?.detach();
        Ok(Self {
            name,
            var,
            decay,
            m,
            v,
        })
    }
}

/// AdamW over a set of parameters.
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub params: Vec<Param>,
    /// Updates done so far (PyTorch's `state["step"]`), for bias correction.
    pub steps: u64,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: Vec<Param>) -> Self {
        Self {
            config,
            params,
            steps: 0,
        }
    }

    /// One update with learning rate `lr`; `grads[i]` is the gradient of `params[i]`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            candle_core::bail!(
                "{} gradients for {} parameters",
                grads.len(),
                self.params.len()
            );
        }
        self.steps += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let t = self.steps as i32;
        let correction1 = 1. - beta1.powi(t);
        let correction2_sqrt = (1. - beta2.powi(t)).sqrt();
        let step = Step {
            beta1,
            beta2,
            eps,
            lr,
            step_size: lr / correction1,
            correction2_sqrt,
        };
        for (param, grad) in self.params.iter_mut().zip(grads) {
            let decay = if param.decay { weight_decay } else { 0. };
            let fused = matches!(param.var.device(), Device::Cpu)
                && [param.var.as_tensor(), &param.m, &param.v]
                    .iter()
                    .all(|t| t.dtype() == DType::F32 && t.is_contiguous());
            if fused {
                step.fused(param, grad, decay)?;
            } else {
                step.tensors(param, grad, decay)?;
            }
        }
        Ok(())
    }
}

/// The constants of one update.
struct Step {
    beta1: f64,
    beta2: f64,
    eps: f64,
    lr: f64,
    /// `lr / (1 - beta1^t)`.
    step_size: f64,
    /// `sqrt(1 - beta2^t)`.
    correction2_sqrt: f64,
}

impl Step {
    /// torch's update as tensor ops:
    /// `p *= 1 - lr·wd; m = b1·m + (1-b1)·g; v = b2·v + (1-b2)·g²;
    /// p -= step_size · m / (sqrt(v) / sqrt(1-b2^t) + eps)`.
    fn tensors(&self, param: &mut Param, grad: &Tensor, decay: f64) -> Result<()> {
        let grad = grad.to_dtype(param.m.dtype())?;
        param.m = ((&param.m * self.beta1)? + (&grad * (1. - self.beta1))?)?;
        param.v = ((&param.v * self.beta2)? + (grad.sqr()? * (1. - self.beta2))?)?;
        let mut value = param.var.as_detached_tensor();
        if decay != 0. {
            value = (value * (1. - self.lr * decay))?;
        }
        let denom = ((param.v.sqrt()? / self.correction2_sqrt)? + self.eps)?;
        let update = ((&param.m / denom)? * self.step_size)?;
        param.var.set(&(value - update)?)
    }

    /// The same update over f32 slices on the CPU, in place: three parallel passes (each
    /// moment, then the parameter) that neither allocate nor copy, where a dozen tensor ops
    /// would each allocate and stream the parameter through memory.
    fn fused(&self, param: &mut Param, grad: &Tensor, decay: f64) -> Result<()> {
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        param.m.inplace_op2(
            &grad,
            &MomentUpdate {
                beta: b1,
                squared: false,
            },
        )?;
        param.v.inplace_op2(
            &grad,
            &MomentUpdate {
                beta: b2,
                squared: true,
            },
        )?;
        let update = ParamUpdate {
            keep: (1. - self.lr * decay) as f32,
            step_size: self.step_size as f32,
            correction2_sqrt: self.correction2_sqrt as f32,
            eps: self.eps as f32,
        };
        param
            .var
            .as_tensor()
            .inplace_op3(&param.m, &param.v, &update)
    }
}

/// Elements per rayon task in the fused update: enough that scheduling costs nothing.
const UPDATE_CHUNK: usize = 1 << 14;

/// The contiguous f32 elements of a CPU storage under `layout`.
fn elements<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("the fused AdamW update takes contiguous f32 tensors"),
    }
}

/// As [`elements`], writable.
fn elements_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&mut data[start..end]),
        _ => candle_core::bail!("the fused AdamW update takes contiguous f32 tensors"),
    }
}

/// `moment = beta * moment + (1 - beta) * grad` (or `grad²`: the second moment), in place.
struct MomentUpdate {
    beta: f32,
    squared: bool,
}

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (moment, grad) = (elements_mut(s1, l1)?, elements(s2, l2)?);
        if moment.len() != grad.len() {
            candle_core::bail!(
                "a moment of {} for a gradient of {}",
                moment.len(),
                grad.len()
            );
        }
        let beta = self.beta;
        moment
            .par_chunks_mut(UPDATE_CHUNK)
            .zip(grad.par_chunks(UPDATE_CHUNK))
            .for_each(|(moment, grad)| {
                if self.squared {
                    for (m, &g) in moment.iter_mut().zip(grad) {
                        *m = beta * *m + (1. - beta) * g * g;
                    }
                } else {
                    for (m, &g) in moment.iter_mut().zip(grad) {
                        *m = beta * *m + (1. - beta) * g;
                    }
                }
            });
        Ok(())
    }
}

/// `p = p * keep - step_size * m / (sqrt(v) / correction2_sqrt + eps)`, in place.
struct ParamUpdate {
    keep: f32,
    step_size: f32,
    correction2_sqrt: f32,
    eps: f32,
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let value = elements_mut(s1, l1)?;
        let (m, v) = (elements(s2, l2)?, elements(s3, l3)?);
        if m.len() != value.len() || v.len() != value.len() {
            candle_core::bail!(
                "moments of {} and {} for {} values",
                m.len(),
                v.len(),
                value.len()
            );
        }
        let Self {
            keep,
            step_size,
            correction2_sqrt,
            eps,
        } = *self;
        value
            .par_chunks_mut(UPDATE_CHUNK)
            .zip(m.par_chunks(UPDATE_CHUNK).zip(v.par_chunks(UPDATE_CHUNK)))
            .for_each(|(value, (m, v))| {
                for ((p, &m), &v) in value.iter_mut().zip(m).zip(v) {
                    *p = *p * keep - step_size * m / (v.sqrt() / correction2_sqrt + eps);
                }
            });
        Ok(())
    }
}

/// The learning rate at each optimiser step: linear warmup over the first
/// `ceil(warmup_ratio × total)` steps up to `peak`, then linear decay from `peak` at the first
/// step after warmup to `peak / (total − warmup)` at the last, so every step learns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub peak: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    pub fn new(peak: f64, warmup_ratio: f64, total_steps: u64) -> Self {
        let warmup_steps = (warmup_ratio * total_steps as f64).ceil() as u64;
        Self {
            peak,
            warmup_steps: warmup_steps.min(total_steps),
            total_steps,
        }
    }

    /// The rate of step `step` (1-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step <= self.warmup_steps {
            self.peak * step as f64 / self.warmup_steps as f64
        } else {
            let left = (self.total_steps + 1).saturating_sub(step) as f64;
            self.peak * left / (self.total_steps - self.warmup_steps).max(1) as f64
        }
    }
}

/// The L2 norm of all gradients together, summed in f64.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0.;
    for grad in grads {
        sum += match squared_sum_on_cpu(grad) {
            Some(sum) => sum,
            None => grad
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?,
        };
    }
    Ok(sum.sqrt())
}

/// `Σ g²` of a contiguous f32 CPU tensor in one parallel pass (the tensor-op way copies it to
/// f64 twice); `None` for any other tensor.
fn squared_sum_on_cpu(grad: &Tensor) -> Option<f64> {
    let (storage, layout) = grad.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let values = elements(cpu, layout).ok()?;
    // Per-chunk sums collected in order, then added in order: the same norm on every run.
    let sums: Vec<f64> = values
        .par_chunks(UPDATE_CHUNK)
        .map(|chunk| chunk.iter().map(|&g| f64::from(g) * f64::from(g)).sum())
        .collect();
    Some(sums.iter().sum())
}

/// Scales `grads` so their global norm is at most `max_norm`, as `torch.nn.utils.clip_grad_norm_`
/// (factor `max_norm / (norm + 1e-6)`, never above 1).
pub fn clip(grads: Vec<Tensor>, norm: f64, max_norm: f64) -> Result<Vec<Tensor>> {
    let factor = max_norm / (norm + 1e-6);
    if factor >= 1. {
        return Ok(grads);
    }
    grads.into_iter().map(|g| g * factor).collect()
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn no_decay_on_biases_and_layer_norms() {
        assert!(decays("encoder.layer.0.attention.self.query.weight"));
        assert!(decays("embeddings.word_embeddings.weight"));
        assert!(!decays("encoder.layer.0.attention.self.query.bias"));
        assert!(!decays("encoder.layer.3.output.LayerNorm.weight"));
        assert!(!decays("embeddings.LayerNorm.bias"));
    }

    #[test]
    fn schedule_warms_up_then_decays_linearly() {
        let schedule = Schedule::new(1e-3, 0.25, 8);
        assert_eq!(schedule.warmup_steps, 2);
        let rates: Vec<f64> = (1..=8).map(|s| schedule.lr(s) * 1e3).collect();
        let want = [0.5, 1., 1., 5. / 6., 4. / 6., 3. / 6., 2. / 6., 1. / 6.];
        for (got, want) in rates.iter().zip(want) {
            assert!((got - want).abs() < 1e-12, "{rates:?}");
        }
        let flat = Schedule::new(2e-5, 0., 1);
        assert_eq!(flat.lr(1), 2e-5);
    }

    /// Two updates against torch.optim.AdamW's formulas written out in f64, with decay on one
    /// parameter and not the other: in f64 (the tensor-op update) and f32 (the fused CPU pass).
    #[test]
    fn adamw_matches_torch_formulas() {
        for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
            adamw_matches_torch_formulas_in(dtype, tolerance);
        }
    }

    fn adamw_matches_torch_formulas_in(dtype: DType, tolerance: f64) {
        let start = [[0.5f64, -1.5], [2.0, 0.25]];
        let grads_seq = [[[0.1f64, -0.2], [0.3, 0.0]], [[-0.05, 0.4], [0.2, -0.1]]];
        let config = AdamWConfig {
            beta1: 0.8,
            beta2: 0.99,
            eps: 1e-6,
            weight_decay: 0.1,
        };
        let lr = 0.01;
        let params = (0..2)
            .map(|i| {
                let t = Tensor::new(&start[i], &Device::Cpu)
                    .and_then(|t| t.to_dtype(dtype))
                    .expect("tensor");
                Param::new(format!("p{i}"), Var::from_tensor(&t).expect("var"), i == 0)
                    .expect("param")
            })
            .collect();
        let mut adam = AdamW::new(config, params);
        let mut want = start;
        let mut m = [[0f64; 2]; 2];
        let mut v = [[0f64; 2]; 2];
        for (step, grads) in grads_seq.iter().enumerate() {
            let t = step as i32 + 1;
            for p in 0..2 {
                for j in 0..2 {
                    let g = grads[p][j];
                    m[p][j] = 0.8 * m[p][j] + 0.2 * g;
                    v[p][j] = 0.99 * v[p][j] + 0.01 * g * g;
                    if p == 0 {
                        want[p][j] *= 1. - lr * 0.1;
                    }
                    let denom = v[p][j].sqrt() / (1. - 0.99f64.powi(t)).sqrt() + 1e-6;
                    want[p][j] -= lr / (1. - 0.8f64.powi(t)) * m[p][j] / denom;
                }
            }
            let tensors: Vec<Tensor> = grads
                .iter()
                .map(|g| {
                    Tensor::new(g, &Device::Cpu)
                        .and_then(|t| t.to_dtype(dtype))
                        .expect("grad")
                })
                .collect();
            adam.step(&tensors, lr).expect("step");
        }
        for (p, param) in adam.params.iter().enumerate() {
            let got = param
                .var
                .to_dtype(DType::F64)
                .and_then(|t| t.to_vec1::<f64>())
                .expect("values");
            for j in 0..2 {
                assert!(
                    (got[j] - want[p][j]).abs() < tolerance,
                    "{dtype:?}: {got:?} vs {:?}",
                    want[p]
                );
            }
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let grads = vec![
            Tensor::new(&[3f64, 0.], &Device::Cpu).expect("t"),
            Tensor::new(&[4f64], &Device::Cpu).expect("t"),
        ];
        let norm = global_norm(&grads).expect("norm");
        assert!((norm - 5.).abs() < 1e-12);
        let clipped = clip(grads.clone(), norm, 1.).expect("clip");
        assert!((global_norm(&clipped).expect("norm") - 1.).abs() < 1e-6);
        let kept = clip(grads, norm, 10.).expect("clip");
        assert!((global_norm(&kept).expect("norm") - 5.).abs() < 1e-12);
    }

    /// f32 CPU gradients take the one-pass sum: over several chunks it matches an f64 sum, and a
    /// transposed (non-contiguous) gradient takes the tensor ops.
    #[test]
    fn the_norm_of_f32_gradients_matches_an_f64_sum() {
        let values: Vec<f32> = (0..3 * UPDATE_CHUNK + 7)
            .map(|i| ((i * 37 % 101) as f32 - 50.) / 7.)
            .collect();
        let want: f64 = values.iter().map(|&v| f64::from(v).powi(2)).sum();
        let long = Tensor::new(values.as_slice(), &Device::Cpu).expect("t");
        let square = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu)
            .and_then(|t| t.t())
            .expect("t");
        assert!(!square.is_contiguous());
        let norm = global_norm(&[long, square]).expect("norm");
        assert!((norm - (want + 30.).sqrt()).abs() < 1e-9 * norm, "{norm}");
    }
}
