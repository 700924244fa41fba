//! The ranking losses: MultipleNegativesRankingLoss (optionally symmetric) and its Matryoshka
//! wrapper, as sentence-transformers defines them
//! (<https://github.com/UKPLab/sentence-transformers/blob/v3.0.1/sentence_transformers/losses/MultipleNegativesRankingLoss.py>,
//! `MultipleNegativesSymmetricRankingLoss.py`, `MatryoshkaLoss.py`).
//!
//! Candidates are the batch's positives (row `i` is anchor `i`'s answer) followed by any hard
//! negatives, which every anchor sees as extra wrong answers. Scores are cosine similarities
//! times `scale`; the loss is the cross-entropy of picking the right candidate. An anchor with
//! several right answers ([`BatchLabels::targets`]) averages the log-probability of each
//! (SupCon's `L_out`, Khosla et al. 2020), which is the plain cross-entropy for one. The
//! cross-entropy runs in f64: at a loss near 2e-4 (a well-trained model on easy pairs) the f32
//! `log_sum_exp - diagonal` loses most of its digits to cancellation.

use candle_core::{D, DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

/// Which ranking loss a run minimises.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    /// Cosine similarities are multiplied by this before the softmax (sentence-transformers: 20).
    pub scale: f64,
    /// Also rank the anchors for each positive (sentence-transformers'
    /// MultipleNegativesSymmetricRankingLoss), averaging both directions.
    pub symmetric: bool,
    /// Matryoshka: the loss is summed over embeddings truncated to each of these dimensions
    /// (renormalised by the cosine); `None` trains the full embedding only.
    pub matryoshka_dims: Option<Vec<usize>>,
    /// GISTEmbed's guide: a frozen model (the base) scores each anchor's candidates, and those
    /// it scores at or above the anchor's positive minus this margin are left out of the loss as
    /// likely false negatives. `None` trains without a guide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guide_margin: Option<f64>,
    /// MarginMSE distillation (Hofstätter et al. 2020): this weight times the mean squared
    /// difference between the student's margin `scale·(cos(q, positive) − cos(q, negative))` and
    /// a teacher's (a cross-encoder's logit difference, [`BatchLabels::margins`]) is added to the
    /// ranking loss. `None` trains without a teacher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill_weight: Option<f64>,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            scale: 20.,
            symmetric: false,
            matryoshka_dims: None,
            guide_margin: None,
            distill_weight: None,
        }
    }
}

impl LossConfig {
    /// A name for logs and model cards.
    pub fn name(&self) -> String {
        let base = if self.symmetric {
            "MultipleNegativesSymmetricRankingLoss"
        } else {
            "MultipleNegativesRankingLoss"
        };
        let base = match self.guide_margin {
            Some(margin) => format!("GISTEmbed-guided {base} (margin {margin})"),
            None => base.to_owned(),
        };
        let base = match self.distill_weight {
            Some(weight) => format!("{base} + {weight} × MarginMSE from a cross-encoder"),
            None => base,
        };
        match &self.matryoshka_dims {
            Some(dims) => format!("MatryoshkaLoss({base}, dims {dims:?})"),
            None => base,
        }
    }

    /// The scalar loss of `anchors` (`[n, dim]`) against `candidates` (`[n + k, dim]`: the `n`
    /// positives, then `k` hard negatives). Differentiable with respect to both.
    pub fn loss(&self, anchors: &Tensor, candidates: &Tensor) -> Result<Tensor> {
        self.labelled_loss(anchors, candidates, &BatchLabels::default())
    }

    /// [`Self::loss`] with what `labels` says of the candidates: masked ones left out of each
    /// anchor's softmax, several right answers per anchor. The symmetric loss's other direction
    /// (positives picking their anchor) sees neither.
    pub fn labelled_loss(
        &self,
        anchors: &Tensor,
        candidates: &Tensor,
        labels: &BatchLabels,
    ) -> Result<Tensor> {
        match &self.matryoshka_dims {
            None => self.ranking_loss(anchors, candidates, labels),
            Some(dims) => {
                let mut total: Option<Tensor> = None;
                for &dim in dims {
                    let loss = self.ranking_loss(
                        &anchors.narrow(1, 0, dim)?,
                        &candidates.narrow(1, 0, dim)?,
                        labels,
                    )?;
                    total = Some(match total {
                        Some(sum) => (sum + loss)?,
                        None => loss,
                    });
                }
                match total {
                    Some(total) => Ok(total),
                    None => candle_core::bail!("matryoshka_dims is empty"),
                }
            }
        }
    }

    fn ranking_loss(
        &self,
        anchors: &Tensor,
        candidates: &Tensor,
        labels: &BatchLabels,
    ) -> Result<Tensor> {
        let n = anchors.dim(0)?;
        let scores = unit_rows(anchors)?
            .matmul(&unit_rows(candidates)?.t()?)?
            .to_dtype(DType::F64)?
            .affine(self.scale, 0.)?;
        let masked = match &labels.mask {
            Some(mask) => (&scores + mask.to_dtype(DType::F64)?)?,
            None => scores.clone(),
        };
        let mut forward = match &labels.targets {
            Some(targets) => cross_entropy_on_targets(&masked, targets)?,
            None => cross_entropy_on_diagonal(&masked)?,
        };
        if let (Some(weight), Some(margins)) = (self.distill_weight, &labels.margins) {
            forward = (forward + (margins.mean_squared_error(&scores)? * weight)?)?;
        }
        if !self.symmetric {
            return Ok(forward);
        }
        // Each positive picks its anchor among the batch's anchors (negatives take no part).
        let backward = cross_entropy_on_diagonal(&scores.narrow(1, 0, n)?.t()?)?;
        (forward + backward)? * 0.5
    }
}

/// What a batch says of its candidates beyond "anchor `i`'s answer is candidate `i`".
#[derive(Debug, Clone, Default)]
pub struct BatchLabels {
    /// From the guide ([`guide_mask`], `[n, n + k]`): candidates left out of each anchor's
    /// softmax.
    pub mask: Option<Tensor>,
    /// From [`targets`] (`[n, n + k]`, f64): each anchor's right answers, weighted to sum to 1.
    /// `None`: candidate `i` only.
    pub targets: Option<Tensor>,
    /// A teacher's margins between anchors' positives and their own negatives, for
    /// [`LossConfig::distill_weight`].
    pub margins: Option<TeacherMargins>,
}

/// A teacher's margin for (anchor, its positive, one of its negatives) triples, by the
/// positions of the two scores in the flattened `[n, n + k]` score matrix.
#[derive(Debug, Clone)]
pub struct TeacherMargins {
    positive: Tensor,
    negative: Tensor,
    target: Tensor,
}

impl TeacherMargins {
    /// `triples`: (anchor row, negative's candidate column, the teacher's margin); `width`: the
    /// candidates. The anchor's positive is candidate `row`.
    pub fn new(triples: &[(usize, usize, f32)], width: usize, device: &Device) -> Result<Self> {
        let index = |column: &dyn Fn(&(usize, usize, f32)) -> usize| -> Result<Tensor> {
            let positions = triples
                .iter()
                .map(|t| u32::try_from(t.0 * width + column(t)))
                .collect::<std::result::Result<Vec<u32>, _>>()
                .map_err(candle_core::Error::wrap)?;
            Tensor::new(positions, device)
        };
        if let Some(beyond) = triples.iter().find(|t| t.1 >= width || t.0 >= width) {
            candle_core::bail!("margin triple {beyond:?} is outside {width} candidates");
        }
        Ok(Self {
            positive: index(&|t| t.0)?,
            negative: index(&|t| t.1)?,
            target: Tensor::new(
                triples.iter().map(|t| f64::from(t.2)).collect::<Vec<_>>(),
                device,
            )?,
        })
    }

    /// Mean over triples of `(scores[row, row] − scores[row, negative] − teacher)²`.
    fn mean_squared_error(&self, scores: &Tensor) -> Result<Tensor> {
        let flat = scores.flatten_all()?;
        let student =
            (flat.index_select(&self.positive, 0)? - flat.index_select(&self.negative, 0)?)?;
        (student - &self.target)?.sqr()?.mean_all()
    }
}

/// The weights of [`BatchLabels::targets`]: anchor `i`'s own candidate `i` and the candidates
/// `extra[i]` lists, equal shares each; `[extra.len(), width]`.
pub fn targets(extra: &[Vec<usize>], width: usize, device: &Device) -> Result<Tensor> {
    let n = extra.len();
    let mut weights = vec![0f64; n * width];
    for (i, more) in extra.iter().enumerate() {
        let mut columns = vec![i];
        columns.extend(more.iter().copied().filter(|&j| j != i));
        columns.sort_unstable();
        columns.dedup();
        if let Some(&beyond) = columns.iter().find(|&&j| j >= width) {
            candle_core::bail!("anchor {i}'s positive {beyond} is not among {width} candidates");
        }
        let share = 1.0 / columns.len() as f64;
        for j in columns {
            weights[i * width + j] = share;
        }
    }
    Tensor::from_vec(weights, (n, width), device)
}

/// What a masked candidate's score becomes: far enough below any scaled cosine that its
/// softmax weight is 0, finite so no gradient turns into NaN.
const MASKED: f64 = -1e4;

/// GISTEmbed's mask from a guide's embeddings of the anchors (`[n, dim]`) and candidates
/// (`[n + k, dim]`): [`MASKED`] where the guide scores a candidate other than the anchor's own
/// positive at or above that positive minus `margin` (a duplicate of the positive, a near-paraphrase,
/// an unlabelled answer), 0 elsewhere; `[n, n + k]`, f64.
/// Candidates `extra` lists as further right answers of an anchor are never masked.
pub fn guide_mask(
    anchors: &Tensor,
    candidates: &Tensor,
    margin: f64,
    extra: &[Vec<usize>],
) -> Result<Tensor> {
    let n = anchors.dim(0)?;
    let sims = unit_rows(&anchors.to_dtype(DType::F64)?)?
        .matmul(&unit_rows(&candidates.to_dtype(DType::F64)?)?.t()?)?;
    let rows = sims.to_vec2::<f64>()?;
    let width = rows.first().map_or(0, Vec::len);
    let mut mask = vec![0f64; n * width];
    for (i, row) in rows.iter().enumerate() {
        let threshold = row[i] - margin;
        for (j, &sim) in row.iter().enumerate() {
            let right_answer = j == i || extra.get(i).is_some_and(|more| more.contains(&j));
            if !right_answer && sim >= threshold {
                mask[i * width + j] = MASKED;
            }
        }
    }
    Tensor::from_vec(mask, (n, width), anchors.device())
}

/// Rows scaled to unit length (the norm floored at 1e-12, as `torch.nn.functional.normalize`).
fn unit_rows(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    x.broadcast_div(&norm)
}

/// Mean over rows `i` of `-log softmax(scores[i])[i]`.
fn cross_entropy_on_diagonal(scores: &Tensor) -> Result<Tensor> {
    let (n, _) = scores.dims2()?;
    let log_sum_exp = log_sum_exp(scores)?;
    let eye = Tensor::eye(n, scores.dtype(), scores.device())?;
    let diagonal = (scores.narrow(1, 0, n)? * eye)?.sum_keepdim(D::Minus1)?;
    (log_sum_exp - diagonal)?.mean_all()
}

/// Mean over rows `i` of `-Σ_j targets[i][j] · log softmax(scores[i])[j]`: with weights summing
/// to 1 per row, the mean log-probability of the row's right answers.
fn cross_entropy_on_targets(scores: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let picked = (scores * targets.to_dtype(scores.dtype())?)?.sum_keepdim(D::Minus1)?;
    (log_sum_exp(scores)? - picked)?.mean_all()
}

/// `log Σ_j exp(scores[i][j])` per row, shifted by the row's maximum so nothing overflows.
fn log_sum_exp(scores: &Tensor) -> Result<Tensor> {
    let max = scores.max_keepdim(D::Minus1)?.detach();
    scores
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .broadcast_add(&max)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn matrix(rows: &[&[f64]]) -> Tensor {
        let width = rows[0].len();
        let data: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(data, (rows.len(), width), &Device::Cpu).expect("matrix")
    }

    fn value(t: &Tensor) -> f64 {
        t.to_scalar::<f64>().expect("scalar")
    }

    fn cosine(a: &[f64], b: &[f64]) -> f64 {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        dot / (norm(a) * norm(b))
    }

    /// The cross-entropy written out with plain floats.
    fn naive(anchors: &[&[f64]], candidates: &[&[f64]], scale: f64) -> f64 {
        let mut total = 0.;
        for (i, a) in anchors.iter().enumerate() {
            let logits: Vec<f64> = candidates.iter().map(|c| scale * cosine(a, c)).collect();
            let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
            total += lse - logits[i];
        }
        total / anchors.len() as f64
    }

    const ANCHORS: [&[f64]; 3] = [
        &[1., 0.2, 0.1, 0.],
        &[0., 1., 0.3, 0.2],
        &[0.3, 0.1, 1., 0.5],
    ];
    const CANDIDATES: [&[f64]; 4] = [
        &[0.9, 0.1, 0., 0.3],
        &[0.2, 0.8, 0.1, -0.4],
        &[0.1, 0.3, 0.9, 0.2],
        &[0.5, 0.5, 0.5, 0.5],
    ];

    #[test]
    fn ranking_loss_is_cross_entropy_over_scaled_cosines_with_negatives() {
        let config = LossConfig {
            scale: 7.,
            ..LossConfig::default()
        };
        let loss = config
            .loss(&matrix(&ANCHORS), &matrix(&CANDIDATES))
            .expect("loss");
        let want = naive(&ANCHORS, &CANDIDATES, 7.);
        assert!(
            (value(&loss) - want).abs() < 1e-12,
            "{} vs {want}",
            value(&loss)
        );

        // Symmetric: the mean of anchors→candidates and positives→anchors.
        let symmetric = LossConfig {
            scale: 7.,
            symmetric: true,
            ..LossConfig::default()
        };
        let loss = symmetric
            .loss(&matrix(&ANCHORS), &matrix(&CANDIDATES))
            .expect("loss");
        let backward = naive(&CANDIDATES[..3], &ANCHORS, 7.);
        let want_symmetric = (want + backward) / 2.;
        assert!((value(&loss) - want_symmetric).abs() < 1e-12);
    }

    #[test]
    fn matryoshka_sums_the_loss_at_each_truncated_dimension() {
        let config = LossConfig {
            scale: 20.,
            symmetric: false,
            matryoshka_dims: Some(vec![4, 2]),
            guide_margin: None,
            distill_weight: None,
        };
        let loss = config
            .loss(&matrix(&ANCHORS), &matrix(&CANDIDATES))
            .expect("loss");
        let truncate = |rows: &[&[f64]]| rows.iter().map(|r| r[..2].to_vec()).collect::<Vec<_>>();
        let (a2, c2) = (truncate(&ANCHORS), truncate(&CANDIDATES));
        let a2: Vec<&[f64]> = a2.iter().map(Vec::as_slice).collect();
        let c2: Vec<&[f64]> = c2.iter().map(Vec::as_slice).collect();
        let want = naive(&ANCHORS, &CANDIDATES, 20.) + naive(&a2, &c2, 20.);
        assert!(
            (value(&loss) - want).abs() < 1e-10,
            "{} vs {want}",
            value(&loss)
        );
    }

    #[test]
    fn the_guide_masks_a_duplicate_positive_and_the_loss_ignores_it() {
        // Anchor 1's positive repeats anchor 0's: in-batch, each is a "wrong" answer to the
        // other's anchor though it is the right one.
        let candidates: [&[f64]; 4] = [CANDIDATES[0], CANDIDATES[0], CANDIDATES[2], CANDIDATES[3]];
        let anchors: [&[f64]; 3] = [ANCHORS[0], ANCHORS[0], ANCHORS[2]];
        let mask = guide_mask(&matrix(&anchors), &matrix(&candidates), 0.0, &[]).expect("mask");
        let rows = mask.to_vec2::<f64>().expect("rows");
        assert_eq!(rows[0][1], MASKED, "{rows:?}");
        assert_eq!(rows[1][0], MASKED, "{rows:?}");
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(row[i], 0.0, "a positive is never masked: {rows:?}");
        }
        // Anchor 2 against its own positive: nothing scores above it, nothing is masked.
        assert!(rows[2].iter().all(|&m| m == 0.0), "{rows:?}");

        // The masked loss is the loss without the masked candidates.
        let config = LossConfig {
            scale: 7.,
            ..LossConfig::default()
        };
        let masked = config
            .labelled_loss(
                &matrix(&anchors),
                &matrix(&candidates),
                &BatchLabels {
                    mask: Some(mask),
                    ..BatchLabels::default()
                },
            )
            .expect("loss");
        let without = |i: usize| -> f64 {
            let kept: Vec<&[f64]> = candidates
                .iter()
                .enumerate()
                .filter(|(j, _)| rows[i][*j] == 0.0)
                .map(|(_, c)| *c)
                .collect();
            let own = kept
                .iter()
                .position(|c| std::ptr::eq(*c, candidates[i]))
                .expect("the positive is kept");
            let logits: Vec<f64> = kept.iter().map(|c| 7. * cosine(anchors[i], c)).collect();
            logits.iter().map(|l| l.exp()).sum::<f64>().ln() - logits[own]
        };
        let want = (0..3).map(without).sum::<f64>() / 3.;
        assert!(
            (value(&masked) - want).abs() < 1e-9,
            "{} vs {want}",
            value(&masked)
        );
        let unmasked = config
            .loss(&matrix(&anchors), &matrix(&candidates))
            .expect("loss");
        assert!(value(&unmasked) > value(&masked) + 0.1);
    }

    #[test]
    fn several_positives_average_their_log_probabilities() {
        // Anchor 0 has candidates 0 and 3 as answers; anchors 1 and 2 their own only.
        let extra = vec![vec![3], vec![], vec![]];
        let labels = BatchLabels {
            mask: None,
            targets: Some(targets(&extra, 4, &Device::Cpu).expect("targets")),
            margins: None,
        };
        let config = LossConfig {
            scale: 7.,
            ..LossConfig::default()
        };
        let loss = config
            .labelled_loss(&matrix(&ANCHORS), &matrix(&CANDIDATES), &labels)
            .expect("loss");
        let row = |i: usize, answers: &[usize]| -> f64 {
            let logits: Vec<f64> = CANDIDATES
                .iter()
                .map(|c| 7. * cosine(ANCHORS[i], c))
                .collect();
            let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
            answers.iter().map(|&j| lse - logits[j]).sum::<f64>() / answers.len() as f64
        };
        let want = (row(0, &[0, 3]) + row(1, &[1]) + row(2, &[2])) / 3.;
        assert!(
            (value(&loss) - want).abs() < 1e-12,
            "{} vs {want}",
            value(&loss)
        );
        // One answer each: the plain loss.
        let single = BatchLabels {
            mask: None,
            targets: Some(targets(&[vec![], vec![], vec![]], 4, &Device::Cpu).expect("targets")),
            margins: None,
        };
        let plain = config
            .loss(&matrix(&ANCHORS), &matrix(&CANDIDATES))
            .expect("loss");
        let labelled = config
            .labelled_loss(&matrix(&ANCHORS), &matrix(&CANDIDATES), &single)
            .expect("loss");
        assert!((value(&plain) - value(&labelled)).abs() < 1e-12);
        // A column beyond the candidates is refused.
        assert!(targets(&[vec![4]], 4, &Device::Cpu).is_err());
    }

    #[test]
    fn margin_mse_adds_the_weighted_squared_margin_error() {
        // Anchor 0 against its negative candidate 3 (teacher margin 2.5), anchor 2 against
        // candidate 1 (teacher margin -1.0).
        let triples = [(0, 3, 2.5f32), (2, 1, -1.0)];
        let labels = BatchLabels {
            margins: Some(TeacherMargins::new(&triples, 4, &Device::Cpu).expect("margins")),
            ..BatchLabels::default()
        };
        let config = LossConfig {
            scale: 7.,
            distill_weight: Some(0.5),
            ..LossConfig::default()
        };
        let loss = config
            .labelled_loss(&matrix(&ANCHORS), &matrix(&CANDIDATES), &labels)
            .expect("loss");
        let student = |i: usize, j: usize| {
            7. * (cosine(ANCHORS[i], CANDIDATES[i]) - cosine(ANCHORS[i], CANDIDATES[j]))
        };
        let mse = ((student(0, 3) - 2.5).powi(2) + (student(2, 1) + 1.0).powi(2)) / 2.;
        let want = naive(&ANCHORS, &CANDIDATES, 7.) + 0.5 * mse;
        assert!(
            (value(&loss) - want).abs() < 1e-9,
            "{} vs {want}",
            value(&loss)
        );
        assert!(TeacherMargins::new(&[(0, 4, 1.0)], 4, &Device::Cpu).is_err());
    }

    #[test]
    fn the_guide_never_masks_an_anchors_other_answers() {
        // Candidate 3 is as close to anchor 0 as its own positive: a duplicate answer.
        let candidates: [&[f64]; 4] = [CANDIDATES[0], CANDIDATES[1], CANDIDATES[2], CANDIDATES[0]];
        let plain = guide_mask(&matrix(&ANCHORS), &matrix(&candidates), 0.0, &[]).expect("mask");
        assert_eq!(plain.to_vec2::<f64>().expect("rows")[0][3], MASKED);
        let extra = vec![vec![3], vec![], vec![]];
        let spared =
            guide_mask(&matrix(&ANCHORS), &matrix(&candidates), 0.0, &extra).expect("mask");
        assert_eq!(spared.to_vec2::<f64>().expect("rows")[0][3], 0.0);
    }

    #[test]
    fn gradients_reach_anchors_and_every_candidate() {
        let anchors = Var::from_tensor(&matrix(&ANCHORS)).expect("var");
        let candidates = Var::from_tensor(&matrix(&CANDIDATES)).expect("var");
        let loss = LossConfig::default()
            .loss(anchors.as_tensor(), candidates.as_tensor())
            .expect("loss");
        let grads = loss.backward().expect("backward");
        for var in [&anchors, &candidates] {
            let grad = grads.get(var.as_tensor()).expect("a gradient");
            for row in grad.to_vec2::<f64>().expect("rows") {
                assert!(row.iter().any(|g| g.abs() > 1e-6), "a row got no gradient");
            }
        }
    }
}
