//! Is a difference between two systems beyond noise? A paired comparison over the same queries
//! for one metric.
//!
//! Three views of the per-query differences `d = candidate − baseline`:
//!
//! - a **paired bootstrap** percentile interval of the mean difference: resample queries with
//!   replacement, take the mean of `d`, and read the interval off the sorted means (linear
//!   interpolation between order statistics, numpy's default);
//! - a two-sided **paired permutation test** (sign flipping, Fisher's randomisation test): under
//!   "no difference" each `d` is as likely to be negated, so p is the share of sign patterns
//!   whose |Σ ±d| reaches the observed |Σ d|. Queries with `d = 0` carry no sign and are left out;
//!   when the remaining `2^m` patterns are no more than the configured permutations, all are
//!   enumerated and p is exact, otherwise they are sampled and p = (1 + hits) / (1 + draws),
//!   which never reports an impossible 0 (Phipson & Smyth 2010);
//! - a two-sided **sign test** on wins and losses, ties dropped, which ignores magnitudes and so
//!   cannot be swayed by a few queries with large changes.
//!
//! The verdict needs the interval to exclude 0 and the permutation p to be below alpha: an
//! interval alone can be optimistic on few queries, a p-value alone says nothing of the size.
//!
//! Random draws come from ChaCha8 seeded from the configuration, split into fixed blocks of draws
//! that each get their own stream, so results are the same on every machine and thread count.

use std::fmt::Write as _;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::EvalError;

/// Draws per random stream: the unit of parallel work.
const DRAWS_PER_STREAM: usize = 1024;

/// Sums this close to the observed one, relative to Σ|d|, count as equal: the same sum reached
/// by different sign patterns may differ in its last bits.
const RELATIVE_TIE_TOLERANCE: f64 = 1e-9;

/// How the comparisons are computed. Stored in the report so a reader can reproduce them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairedTestConfig {
    /// Bootstrap resamples for confidence intervals.
    pub resamples: usize,
    /// Random sign patterns for the permutation test when exact enumeration would take more.
    pub permutations: usize,
    /// Confidence level of the intervals.
    pub confidence: f64,
    /// Significance level of the verdict.
    pub alpha: f64,
    /// Seed of every random draw.
    pub seed: u64,
}

impl Default for PairedTestConfig {
    fn default() -> Self {
        Self {
            resamples: 10_000,
            permutations: 10_000,
            confidence: 0.95,
            alpha: 0.05,
            seed: 0x5EED,
        }
    }
}

impl PairedTestConfig {
    fn check(&self) -> Result<(), EvalError> {
        let bad = |name, value: f64, why| Err(EvalError::BadSetting { name, value, why });
        if self.resamples == 0 {
            return bad("resamples", 0.0, "needs at least one resample");
        }
        if self.permutations == 0 {
            return bad("permutations", 0.0, "needs at least one permutation");
        }
        if !(self.confidence > 0.0 && self.confidence < 1.0) {
            return bad(
                "confidence",
                self.confidence,
                "must lie strictly between 0 and 1",
            );
        }
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            return bad("alpha", self.alpha, "must lie strictly between 0 and 1");
        }
        Ok(())
    }
}

/// Whether the candidate differs from the baseline beyond noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Better,
    Worse,
    NoDifference,
}

/// A confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
    /// Confidence level, e.g. 0.95.
    pub level: f64,
}

/// The sign-flip permutation test.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PermutationTest {
    pub p_value: f64,
    /// True when every sign pattern was enumerated.
    pub exact: bool,
    /// Sign patterns evaluated.
    pub patterns: u64,
}

/// The sign test over queries.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SignTest {
    /// Queries where the candidate scores higher.
    pub wins: usize,
    /// Queries where it scores lower.
    pub losses: usize,
    /// Queries where both score the same; left out of the test.
    pub ties: usize,
    pub p_value: f64,
}

/// Two systems compared on one metric over the same queries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairedComparison {
    pub queries: usize,
    pub baseline_mean: f64,
    pub candidate_mean: f64,
    /// Candidate minus baseline.
    pub mean_difference: f64,
    /// Paired bootstrap interval of the mean difference.
    pub interval: Interval,
    pub permutation: PermutationTest,
    pub sign_test: SignTest,
    pub verdict: Verdict,
}

impl PairedComparison {
    /// The comparison in plain words: "fine-tuned beats base on nDCG@10 by +0.041 (95% CI
    /// +0.018 to +0.066, p = 0.002): better beyond noise".
    pub fn sentence(&self, candidate: &str, baseline: &str, metric: &str) -> String {
        let evidence = format!(
            "{}% CI {:+.3} to {:+.3}, {}",
            format_percent(self.interval.level),
            self.interval.low,
            self.interval.high,
            format_p(self.permutation.p_value)
        );
        let difference = self.mean_difference;
        let mut sentence = match self.verdict {
            Verdict::Better => {
                format!("{candidate} beats {baseline} on {metric} by {difference:+.3}")
            }
            Verdict::Worse => {
                format!("{candidate} trails {baseline} on {metric} by {difference:+.3}")
            }
            Verdict::NoDifference if difference == 0.0 => {
                format!("{candidate} and {baseline} score the same on {metric}")
            }
            Verdict::NoDifference => {
                format!("{candidate} differs from {baseline} on {metric} by {difference:+.3}")
            }
        };
        let verdict = match self.verdict {
            Verdict::Better => "better beyond noise",
            Verdict::Worse => "worse beyond noise",
            Verdict::NoDifference => "no difference beyond noise",
        };
        write!(sentence, " ({evidence}): {verdict}").expect("writing to a String cannot fail");
        sentence
    }
}

/// "p = 0.002", or "p < 0.001" below what three decimals show.
pub fn format_p(p: f64) -> String {
    if p < 0.001 {
        "p < 0.001".to_owned()
    } else {
        format!("p = {p:.3}")
    }
}

/// A setting as a person wrote it: 0.050000000000000044 (1 − 0.95 in floating point) → "0.05".
pub(crate) fn format_setting(value: f64) -> String {
    let text = format!("{value:.6}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text.is_empty() || text == "-" {
        "0".to_owned()
    } else {
        text.to_owned()
    }
}

/// 0.95 → "95", 0.975 → "97.5".
pub(crate) fn format_percent(level: f64) -> String {
    let percent = format!("{:.1}", level * 100.0);
    percent.trim_end_matches(".0").to_owned()
}

/// Compares `candidate` with `baseline`, both one metric's values on the same queries in the
/// same order.
pub fn compare_paired(
    baseline: &[f64],
    candidate: &[f64],
    config: &PairedTestConfig,
) -> Result<PairedComparison, EvalError> {
    config.check()?;
    if baseline.len() != candidate.len() {
        return Err(EvalError::LengthMismatch {
            baseline: "baseline".to_owned(),
            baseline_len: baseline.len(),
            candidate: "candidate".to_owned(),
            candidate_len: candidate.len(),
        });
    }
    check_finite("baseline", baseline)?;
    check_finite("candidate", candidate)?;
    if baseline.is_empty() {
        return Err(EvalError::NoQueries);
    }
    let differences: Vec<f64> = candidate.iter().zip(baseline).map(|(c, b)| c - b).collect();
    let mean_difference = mean(&differences);
    let interval = bootstrap_interval(&differences, config);
    let permutation = permutation_test(&differences, config);
    let sign_test = sign_test(&differences);
    let beyond_noise = permutation.p_value < config.alpha;
    let verdict = if beyond_noise && interval.low > 0.0 {
        Verdict::Better
    } else if beyond_noise && interval.high < 0.0 {
        Verdict::Worse
    } else {
        Verdict::NoDifference
    };
    Ok(PairedComparison {
        queries: baseline.len(),
        baseline_mean: mean(baseline),
        candidate_mean: mean(candidate),
        mean_difference,
        interval,
        permutation,
        sign_test,
        verdict,
    })
}

/// Bootstrap percentile interval of the mean of `values` (one system's metric over queries):
/// the whiskers on a bar chart.
pub fn bootstrap_mean_interval(
    values: &[f64],
    config: &PairedTestConfig,
) -> Result<Interval, EvalError> {
    config.check()?;
    check_finite("values", values)?;
    if values.is_empty() {
        return Err(EvalError::NoQueries);
    }
    Ok(bootstrap_interval(values, config))
}

fn check_finite(what: &str, values: &[f64]) -> Result<(), EvalError> {
    match values.iter().position(|value| !value.is_finite()) {
        Some(index) => Err(EvalError::NotFinite {
            what: what.to_owned(),
            index,
        }),
        None => Ok(()),
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// The random stream for block `block` of a test: independent of thread scheduling.
fn stream(seed: u64, block: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(block as u64);
    rng
}

fn bootstrap_interval(values: &[f64], config: &PairedTestConfig) -> Interval {
    let n = values.len();
    let blocks = config.resamples.div_ceil(DRAWS_PER_STREAM);
    let mut means: Vec<f64> = (0..blocks)
        .into_par_iter()
        .flat_map_iter(|block| {
            let mut rng = stream(config.seed, block);
            let draws = DRAWS_PER_STREAM.min(config.resamples - block * DRAWS_PER_STREAM);
            (0..draws)
                .map(|_| {
                    let sum: f64 = (0..n).map(|_| values[rng.random_range(0..n)]).sum();
                    sum / n as f64
                })
                .collect::<Vec<_>>()
        })
        .collect();
    means.sort_unstable_by(f64::total_cmp);
    let tail = (1.0 - config.confidence) / 2.0;
    Interval {
        low: percentile(&means, tail),
        high: percentile(&means, 1.0 - tail),
        level: config.confidence,
    }
}

/// Linear interpolation between the order statistics of `sorted` (numpy's default, "type 7").
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let position = q * (sorted.len() - 1) as f64;
    let below = position.floor() as usize;
    let above = (below + 1).min(sorted.len() - 1);
    let weight = position - below as f64;
    sorted[below] + weight * (sorted[above] - sorted[below])
}

fn permutation_test(differences: &[f64], config: &PairedTestConfig) -> PermutationTest {
    let nonzero: Vec<f64> = differences.iter().copied().filter(|d| *d != 0.0).collect();
    let observed = nonzero.iter().sum::<f64>().abs();
    let scale: f64 = nonzero.iter().map(|d| d.abs()).sum();
    let threshold = observed - RELATIVE_TIE_TOLERANCE * scale;
    let reaches = |sum: f64| sum.abs() >= threshold;

    let m = nonzero.len();
    let all_patterns = u32::try_from(m).ok().and_then(|m| 1u64.checked_shl(m));
    if let Some(patterns) = all_patterns.filter(|p| *p <= config.permutations as u64) {
        let hits = (0..patterns)
            .into_par_iter()
            .filter(|mask| reaches(flipped_sum(&nonzero, |i| mask >> i & 1 == 1)))
            .count();
        return PermutationTest {
            p_value: hits as f64 / patterns as f64,
            exact: true,
            patterns,
        };
    }

    let blocks = config.permutations.div_ceil(DRAWS_PER_STREAM);
    let hits: usize = (0..blocks)
        .into_par_iter()
        .map(|block| {
            let mut rng = stream(config.seed, block);
            let draws = DRAWS_PER_STREAM.min(config.permutations - block * DRAWS_PER_STREAM);
            let mut bits = vec![0u64; m.div_ceil(64)];
            (0..draws)
                .filter(|_| {
                    bits.iter_mut().for_each(|word| *word = rng.next_u64());
                    reaches(flipped_sum(&nonzero, |i| bits[i / 64] >> (i % 64) & 1 == 1))
                })
                .count()
        })
        .sum();
    PermutationTest {
        p_value: (1 + hits) as f64 / (1 + config.permutations) as f64,
        exact: false,
        patterns: config.permutations as u64,
    }
}

/// Σ ±d, negating `d[i]` where `flip(i)`.
fn flipped_sum(values: &[f64], flip: impl Fn(usize) -> bool) -> f64 {
    values
        .iter()
        .enumerate()
        .map(|(i, d)| if flip(i) { -d } else { *d })
        .sum()
}

fn sign_test(differences: &[f64]) -> SignTest {
    let wins = differences.iter().filter(|d| **d > 0.0).count();
    let losses = differences.iter().filter(|d| **d < 0.0).count();
    let ties = differences.len() - wins - losses;
    SignTest {
        wins,
        losses,
        ties,
        p_value: two_sided_binomial_p(wins.min(losses), wins + losses),
    }
}

/// P(X ≤ k or X ≥ n − k) for X ~ Binomial(n, ½), k ≤ n/2: twice the lower tail, capped at 1.
/// Terms are built in log space so large `n` neither overflows the binomial coefficient nor
/// underflows 2⁻ⁿ before it is multiplied in.
fn two_sided_binomial_p(k: usize, n: usize) -> f64 {
    if n == 0 {
        return 1.0;
    }
    let mut log_term = -(n as f64) * std::f64::consts::LN_2;
    let mut tail = log_term.exp();
    for i in 0..k {
        log_term += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
        tail += log_term.exp();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PairedTestConfig {
        PairedTestConfig::default()
    }

    // Reference values below were computed once with a plain-Python script (integer arithmetic
    // on the values × 100 or × 1000, exact fractions; no numpy): the permutation p-values by
    // counting every sign pattern, the sign tests from `math.comb`, and the bootstrap quantiles
    // by enumerating all 6⁶ resamples of dataset C.

    /// 14 queries, 13 nonzero differences: 2¹³ = 8,192 patterns, enumerated exactly.
    const BASE_A: [f64; 14] = [
        0.50, 0.63, 1.00, 0.00, 0.43, 0.39, 1.00, 0.61, 0.33, 0.50, 0.79, 0.25, 0.10, 0.92,
    ];
    const CAND_A: [f64; 14] = [
        0.63, 0.60, 0.95, 0.50, 0.39, 0.50, 1.00, 1.00, 0.43, 0.61, 0.72, 0.33, 0.31, 0.90,
    ];

    /// 20 differences, 18 nonzero: 262,144 patterns, sampled.
    const DIFF_B: [f64; 20] = [
        0.112, -0.040, 0.231, 0.000, 0.075, -0.150, 0.310, 0.022, -0.018, 0.140, 0.060, -0.095,
        0.205, 0.011, -0.067, 0.180, 0.000, 0.044, -0.120, 0.098,
    ];

    #[test]
    fn exact_permutation_and_sign_test_match_the_reference() {
        let result = compare_paired(&BASE_A, &CAND_A, &config()).expect("valid input");
        assert!((result.mean_difference - 0.101_428_571_428_571_42).abs() < 1e-12);
        assert!(result.permutation.exact);
        assert_eq!(result.permutation.patterns, 8192);
        assert_eq!(result.permutation.p_value, 63.0 / 2048.0);
        assert_eq!(
            (
                result.sign_test.wins,
                result.sign_test.losses,
                result.sign_test.ties
            ),
            (8, 5, 1)
        );
        assert!((result.sign_test.p_value - 0.581_054_687_5).abs() < 1e-12);
        assert_eq!(result.verdict, Verdict::Better);
    }

    #[test]
    fn sampled_permutation_p_is_close_to_the_exact_one() {
        let baseline = [0.0; 20];
        let settings = PairedTestConfig {
            permutations: 200_000,
            ..config()
        };
        let result = compare_paired(&baseline, &DIFF_B, &settings).expect("valid input");
        assert!(!result.permutation.exact);
        // Exact: 10753 / 131072 = 0.08204. The sampling error at 200,000 draws is 0.0006.
        let exact = 10_753.0 / 131_072.0;
        assert!(
            (result.permutation.p_value - exact).abs() < 0.003,
            "{}",
            result.permutation.p_value
        );
        assert!((result.sign_test.p_value - 0.237_884_521_484_375).abs() < 1e-12);
        // p > 0.05: not beyond noise, whatever the interval says.
        assert_eq!(result.verdict, Verdict::NoDifference);
    }

    #[test]
    fn bootstrap_interval_matches_the_exact_bootstrap_distribution() {
        let values = [0.30, -0.10, 0.45, 0.05, 0.20, -0.25];
        let settings = PairedTestConfig {
            resamples: 200_000,
            ..config()
        };
        let interval = bootstrap_mean_interval(&values, &settings).expect("valid input");
        // Exact 2.5% and 97.5% quantiles of the mean over all 46,656 resamples: -0.0833 and
        // 0.2917; the distribution's atoms lie 1/120 apart there, and the estimate may land
        // on a neighbour.
        assert!((interval.low - -0.083_333).abs() < 0.0125, "{interval:?}");
        assert!((interval.high - 0.291_667).abs() < 0.0125, "{interval:?}");
    }

    #[test]
    fn identical_systems_show_no_difference() {
        let result = compare_paired(&BASE_A, &BASE_A, &config()).expect("valid input");
        assert_eq!(result.mean_difference, 0.0);
        assert_eq!((result.interval.low, result.interval.high), (0.0, 0.0));
        assert_eq!(result.permutation.p_value, 1.0);
        assert_eq!(result.sign_test.p_value, 1.0);
        assert_eq!(result.verdict, Verdict::NoDifference);
        assert_eq!(
            result.sentence("fine-tuned", "base", "nDCG@10"),
            "fine-tuned and base score the same on nDCG@10 (95% CI +0.000 to +0.000, p = 1.000): \
             no difference beyond noise"
        );
    }

    #[test]
    fn better_on_every_query_is_better_and_the_reverse_worse() {
        let baseline: Vec<f64> = (0..40).map(|i| f64::from(i) / 80.0).collect();
        let candidate: Vec<f64> = baseline.iter().map(|b| b + 0.05).collect();
        let better = compare_paired(&baseline, &candidate, &config()).expect("valid input");
        assert_eq!(better.verdict, Verdict::Better);
        assert_eq!(better.sign_test.wins, 40);
        assert!(better.interval.low > 0.049 && better.interval.high < 0.051);
        assert!(better.permutation.p_value < 0.001);
        assert_eq!(
            better.sentence("fine-tuned", "base", "nDCG@10"),
            "fine-tuned beats base on nDCG@10 by +0.050 (95% CI +0.050 to +0.050, p < 0.001): \
             better beyond noise"
        );
        let worse = compare_paired(&candidate, &baseline, &config()).expect("valid input");
        assert_eq!(worse.verdict, Verdict::Worse);
        assert!(
            worse
                .sentence("fine-tuned", "base", "MRR@10")
                .ends_with("worse beyond noise")
        );
    }

    #[test]
    fn seeded_and_independent_of_threads() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a one-thread pool");
        let baseline = [0.0; 20];
        let single = pool.install(|| compare_paired(&baseline, &DIFF_B, &config()));
        let many = compare_paired(&baseline, &DIFF_B, &config());
        assert_eq!(single.expect("valid input"), many.expect("valid input"));
        let reseeded = PairedTestConfig {
            seed: 1,
            ..config()
        };
        let other = compare_paired(&baseline, &DIFF_B, &reseeded).expect("valid input");
        assert_ne!(
            other.interval,
            compare_paired(&baseline, &DIFF_B, &config())
                .expect("valid input")
                .interval
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            compare_paired(&[0.1], &[0.1, 0.2], &config()),
            Err(EvalError::LengthMismatch { .. })
        ));
        assert!(matches!(
            compare_paired(&[], &[], &config()),
            Err(EvalError::NoQueries)
        ));
        assert!(matches!(
            compare_paired(&[0.1, f64::NAN], &[0.1, 0.2], &config()),
            Err(EvalError::NotFinite { index: 1, .. })
        ));
        let bad = PairedTestConfig {
            confidence: 1.0,
            ..config()
        };
        assert!(matches!(
            compare_paired(&[0.1], &[0.2], &bad),
            Err(EvalError::BadSetting {
                name: "confidence",
                ..
            })
        ));
    }

    #[test]
    fn binomial_tails() {
        // n = 10, k = 2: 2 · (1 + 10 + 45) / 1024.
        assert!((two_sided_binomial_p(2, 10) - 112.0 / 1024.0).abs() < 1e-15);
        assert_eq!(two_sided_binomial_p(5, 10), 1.0);
        // 2⁻²⁰⁰⁰ underflows on its own, the tail does not: 2.1112304670079334e-11 from exact
        // integer arithmetic in Python.
        let p = two_sided_binomial_p(850, 2000);
        assert!((p / 2.111_230_467_007_933_4e-11 - 1.0).abs() < 1e-9, "{p}");
    }

    /// `cargo test --release --lib eval::stats::tests::comparison_speed -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a check"]
    #[allow(clippy::print_stderr)]
    fn comparison_speed() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let baseline: Vec<f64> = (0..200).map(|_| rng.random_range(0.0..1.0)).collect();
        let candidate: Vec<f64> = baseline
            .iter()
            .map(|b| (b + rng.random_range(-0.1..0.15)).clamp(0.0, 1.0))
            .collect();
        let started = std::time::Instant::now();
        let result = compare_paired(&baseline, &candidate, &config()).expect("valid input");
        eprintln!(
            "paired comparison over 200 queries, B = 10,000 resamples + 10,000 permutations: {:?}",
            started.elapsed()
        );
        let started = std::time::Instant::now();
        bootstrap_mean_interval(&baseline, &config()).expect("valid input");
        eprintln!(
            "bootstrap B = 10,000 over 200 queries: {:?}",
            started.elapsed()
        );
        assert_eq!(result.queries, 200);
    }
}
