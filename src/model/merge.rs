//! Weight merging with the base (LM-Cocktail style): a fine-tuned model's parameters
//! interpolated with its base's, `α·fine-tuned + (1−α)·base`, tensor by tensor. `α = 1` is the
//! fine-tuned model, `α = 0` the base; in between, the model keeps what fine-tuning taught and
//! forgets less of what the base knew. No retraining: the arithmetic costs one pass over the
//! weights, so a caller can try several `α` and keep the best.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

use crate::model::error::{CandleContext, ModelError};

/// A model whose parameters can be set to any mix of two snapshots: the fine-tuned values it
/// held when the interpolation was made, and a base model's.
pub struct Interpolation {
    /// Each parameter: its name, the variable set in place, the fine-tuned and the base values.
    parameters: Vec<(String, Var, Tensor, Tensor)>,
}

impl Interpolation {
    /// Snapshots `tuned` (the parameters to set, holding the fine-tuned values now) against
    /// `base`, which must have the same names, shapes and dtypes.
    pub fn new(
        tuned: &BTreeMap<String, Var>,
        base: &BTreeMap<String, Var>,
    ) -> Result<Self, ModelError> {
        let mut parameters = Vec::with_capacity(tuned.len());
        for (name, var) in tuned {
            let base = base.get(name).ok_or_else(|| ModelError::InvalidArgument {
                name: "base",
                why: format!("the base model has no parameter `{name}` to merge with"),
            })?;
            if base.dims() != var.dims() {
                return Err(ModelError::ShapeMismatch {
                    name: name.clone(),
                    expected: var.dims().to_vec(),
                    got: base.dims().to_vec(),
                });
            }
            let during = || format!("snapshotting `{name}` to merge");
            let tuned_values = var.as_tensor().copy().during(during)?;
            let base_values = base
                .as_tensor()
                .to_dtype(var.dtype())
                .and_then(|t| t.to_device(var.device()))
                .and_then(|t| t.copy())
                .during(during)?;
            parameters.push((name.clone(), var.clone(), tuned_values, base_values));
        }
        Ok(Self { parameters })
    }

    /// Sets every parameter to `alpha·fine-tuned + (1−alpha)·base`; `alpha` is in `[0, 1]`.
    pub fn apply(&self, alpha: f64) -> Result<(), ModelError> {
        if !(0.0..=1.0).contains(&alpha) {
            return Err(ModelError::InvalidArgument {
                name: "alpha",
                why: format!("{alpha} is not between 0 and 1"),
            });
        }
        for (name, var, tuned, base) in &self.parameters {
            let merged = tuned
                .affine(alpha, 0.0)
                .and_then(|t| t.add(&base.affine(1.0 - alpha, 0.0)?))
                .and_then(|t| var.set(&t))
                .during(|| format!("merging `{name}`"));
            merged?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn vars(values: &[(&str, &[f32])]) -> BTreeMap<String, Var> {
        values
            .iter()
            .map(|(name, v)| {
                let var = Var::from_slice(v, v.len(), &Device::Cpu).expect("a var");
                ((*name).to_owned(), var)
            })
            .collect()
    }

    fn values(vars: &BTreeMap<String, Var>, name: &str) -> Vec<f32> {
        vars[name].as_tensor().to_vec1().expect("a vector")
    }

    #[test]
    fn alpha_mixes_the_snapshots_and_never_compounds() {
        let tuned = vars(&[("w", &[1.0, 2.0]), ("b", &[0.0])]);
        let base = vars(&[("w", &[3.0, 6.0]), ("b", &[4.0])]);
        let merge = Interpolation::new(&tuned, &base).expect("same shapes");
        merge.apply(0.25).expect("merges");
        assert_eq!(values(&tuned, "w"), [2.5, 5.0]);
        assert_eq!(values(&tuned, "b"), [3.0]);
        // A second α starts again from the snapshots, not from the last mix.
        merge.apply(0.25).expect("merges");
        assert_eq!(values(&tuned, "w"), [2.5, 5.0]);
        merge.apply(0.0).expect("merges");
        assert_eq!(values(&tuned, "w"), [3.0, 6.0]);
        merge.apply(1.0).expect("merges");
        assert_eq!(values(&tuned, "w"), [1.0, 2.0]);
        // The base is left alone.
        assert_eq!(values(&base, "w"), [3.0, 6.0]);
        assert!(merge.apply(1.5).is_err());
    }

    #[test]
    fn models_that_differ_are_refused() {
        let tuned = vars(&[("w", &[1.0, 2.0])]);
        let shorter = vars(&[("w", &[1.0])]);
        let other = vars(&[("v", &[1.0, 2.0])]);
        assert!(matches!(
            Interpolation::new(&tuned, &shorter),
            Err(ModelError::ShapeMismatch { .. })
        ));
        assert!(Interpolation::new(&tuned, &other).is_err());
    }
}
