//! The reranker's losses, over the logits of one query's group: its positive first, then its
//! mined negatives.
//!
//! - Binary cross-entropy (sentence-transformers' `BinaryCrossEntropyLoss`, the classic
//!   cross-encoder objective): every (query, passage) pair is labelled 1 (positive) or 0
//!   (negative), averaged over pairs; the logit goes through a sigmoid, computed stably as
//!   `max(x, 0) − x·y + ln(1 + e^−|x|)`.
//! - Listwise softmax (sentence-transformers' `CrossEntropyLoss` with one positive, the loss of
//!   FlagEmbedding's rerankers): the cross-entropy of picking the positive among its group,
//!   `logsumexp(group) − group[0]`, averaged over queries.
//!
//! Each returns the *sum* of its terms divided by a caller-given count, so a batch computed in
//! parts adds up to the loss of the whole batch (and so do the parts' gradients).

use candle_core::{Result, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which loss trains the reranker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RerankLoss {
    /// Binary cross-entropy per (query, passage) pair.
    Bce,
    /// Softmax cross-entropy over one positive and its negatives.
    #[default]
    Listwise,
}

impl RerankLoss {
    /// A name for logs and model cards.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bce => "BinaryCrossEntropyLoss",
            Self::Listwise => {
                "ListwiseSoftmaxLoss (cross-entropy of the positive among its negatives)"
            }
        }
    }

    /// The loss terms of `groups` (each a `[1 + negatives]` tensor of logits, positive first),
    /// summed and divided by `denominator`: the number of pairs (BCE) or queries (listwise) of
    /// the whole batch, see [`RerankLoss::denominator`].
    pub fn loss(self, groups: &[Tensor], denominator: usize) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for group in groups {
            let term = match self {
                Self::Bce => bce_sum(group)?,
                Self::Listwise => listwise_term(group)?,
            };
            total = Some(match total {
                Some(sum) => (sum + term)?,
                None => term,
            });
        }
        match total {
            Some(total) => total / denominator.max(1) as f64,
            None => candle_core::bail!("a loss over no groups"),
        }
    }

    /// What the batch's loss is averaged over, given each group's size.
    pub fn denominator(self, group_sizes: impl Iterator<Item = usize>) -> usize {
        match self {
            Self::Bce => group_sizes.sum(),
            Self::Listwise => group_sizes.count(),
        }
    }
}

/// `Σ max(x, 0) − x·y + ln(1 + e^−|x|)` over a group, `y` = 1 for the first logit, else 0.
fn bce_sum(group: &Tensor) -> Result<Tensor> {
    let n = group.dim(0)?;
    let mut labels = vec![0f32; n];
    if let Some(first) = labels.first_mut() {
        *first = 1.;
    }
    let labels = Tensor::from_vec(labels, n, group.device())?.to_dtype(group.dtype())?;
    let softplus_tail = group.abs()?.neg()?.exp()?.affine(1., 1.)?.log()?;
    (group.relu()? - (group * labels)?)?
        .add(&softplus_tail)?
        .sum_all()
}

/// `logsumexp(group) − group[0]`, shifted by the (constant) maximum for stability.
fn listwise_term(group: &Tensor) -> Result<Tensor> {
    let max = group.max_keepdim(0)?.detach();
    let log_sum_exp = group
        .broadcast_sub(&max)?
        .exp()?
        .sum_all()?
        .log()?
        .add(&max.squeeze(0)?)?;
    log_sum_exp - group.get(0)?
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;

    fn logits(values: &[f32]) -> Tensor {
        Tensor::from_slice(values, values.len(), &Device::Cpu).expect("tensor")
    }

    fn value(t: &Tensor) -> f64 {
        f64::from(
            t.to_dtype(DType::F32)
                .and_then(|t| t.to_scalar::<f32>())
                .expect("scalar"),
        )
    }

    /// By hand: softplus(−0) = ln 2 = 0.693147; softplus(2) = 2 + ln(1 + e^−2) = 2.126928;
    /// softplus(−1) = ln(1 + e^−1) = 0.313262; softplus(−3) = 0.048587. Two groups, five pairs:
    /// (0.693147 + 2.126928 + 0.313262 + 0.048587 + 0.693147) / 5 = 0.775014.
    #[test]
    fn binary_cross_entropy_matches_hand_values() {
        let groups = [logits(&[0., 2., -1.]), logits(&[3., 0.])];
        let sizes = groups.iter().map(|g| g.dim(0).expect("dim"));
        let denominator = RerankLoss::Bce.denominator(sizes);
        assert_eq!(denominator, 5);
        let loss = RerankLoss::Bce.loss(&groups, denominator).expect("loss");
        assert!((value(&loss) - 0.775014).abs() < 1e-5, "{}", value(&loss));
        // Large logits stay finite: softplus(−(−100)) = 100 exactly.
        let loss = RerankLoss::Bce.loss(&[logits(&[-100.])], 1).expect("loss");
        assert!((value(&loss) - 100.).abs() < 1e-4, "{}", value(&loss));
    }

    /// By hand: group [2, 0, −1]: ln(e² + 1 + e^−1) − 2 = ln(1 + e^−2 + e^−3) = 0.169846;
    /// group [−1, 1]: ln(e^−1 + e) + 1 = ln(1 + e²) = 2.126928. Mean over two queries: 1.148387.
    #[test]
    fn listwise_softmax_matches_hand_values() {
        let groups = [logits(&[2., 0., -1.]), logits(&[-1., 1.])];
        let denominator = RerankLoss::Listwise.denominator(groups.iter().map(|_| 0));
        assert_eq!(denominator, 2);
        let loss = RerankLoss::Listwise
            .loss(&groups, denominator)
            .expect("loss");
        assert!((value(&loss) - 1.148387).abs() < 1e-5, "{}", value(&loss));
        // Shift invariance, and no overflow at large logits.
        let loss = RerankLoss::Listwise
            .loss(&[logits(&[1002., 1000., 999.])], 1)
            .expect("loss");
        assert!((value(&loss) - 0.169846).abs() < 1e-4, "{}", value(&loss));
    }

    /// The listwise gradient is softmax − one-hot: for [2, 0, −1] the softmax is
    /// (0.843795, 0.114195, 0.042010), so the gradient is (−0.156205, 0.114195, 0.042010). BCE's
    /// is (sigmoid(x) − y) / pairs.
    #[test]
    fn gradients_are_softmax_minus_target_and_sigmoid_minus_label() {
        let var = Var::from_tensor(&logits(&[2., 0., -1.])).expect("var");
        let loss = RerankLoss::Listwise
            .loss(&[var.as_tensor().clone()], 1)
            .expect("loss");
        let grad = loss.backward().expect("backward");
        let got = grad
            .get(var.as_tensor())
            .expect("a gradient")
            .to_vec1::<f32>()
            .expect("values");
        for (g, want) in got.iter().zip([-0.156205, 0.114195, 0.042010]) {
            assert!((g - want).abs() < 1e-5, "{got:?}");
        }
        let loss = RerankLoss::Bce
            .loss(&[var.as_tensor().clone()], 3)
            .expect("loss");
        let grad = loss.backward().expect("backward");
        let got = grad
            .get(var.as_tensor())
            .expect("a gradient")
            .to_vec1::<f32>()
            .expect("values");
        // sigmoid(2) − 1 = −0.119203, sigmoid(0) = 0.5, sigmoid(−1) = 0.268941; each / 3.
        for (g, want) in got.iter().zip([-0.039734, 0.166667, 0.089647]) {
            assert!((g - want).abs() < 1e-5, "{got:?}");
        }
    }
}
