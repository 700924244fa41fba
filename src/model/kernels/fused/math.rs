//! Branch-free f32 math that the compiler vectorises (no libm calls in the loops): `exp`, `erf`
//! and lane-split reductions. All `#[inline(always)]`, so each multiversioned kernel gets them at
//! its own vector width. Polynomials use `mul_add`, one FMA instruction per term in the AVX2 and
//! AVX-512 builds (the portable build, for CPUs without FMA, calls libm's `fmaf` instead).

/// `e^x` to ~2 ulp (Cephes `expf`: range reduction by `ln 2`, degree-6 polynomial); exactly 0
/// below -87 (so masked attention scores get exactly zero probability) and `e^88` above 88.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let clamped = x.clamp(-87.0, 88.0);
    let n = (clamped * std::f32::consts::LOG2_E + 0.5).floor();
    let r = n.mul_add(2.121_944_4e-4, n.mul_add(-0.693_359_4, clamped));
    let p: f32 = 1.987_569_1e-4;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let y = (p * r).mul_add(r, r) + 1.0;
    // 2^n from the bits of `n + 127` read as an integer: adding 2^23 puts that integer (2..=254
    // here) in the low mantissa bits. An `as` cast would be a saturating conversion, which
    // the compiler does one lane at a time.
    let biased = (n + (127.0 + 8_388_608.0)).to_bits() & 0x7F_FFFF;
    let scale = f32::from_bits(biased << 23);
    if x < -87.0 { 0.0 } else { y * scale }
}

/// The error function to within 4e-7: Eigen's rational approximation on `[-4, 4]` (beyond which
/// `erf` is ±1 in f32).
#[inline(always)]
pub(super) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p: f32 = -2.726_142_3e-10;
    let p = p.mul_add(x2, 2.770_681_4e-8);
    let p = p.mul_add(x2, -2.101_024e-6);
    let p = p.mul_add(x2, -5.692_506_4e-5);
    let p = p.mul_add(x2, -7.349_906_3e-4);
    let p = p.mul_add(x2, -2.954_600_2e-3);
    let p = p.mul_add(x2, -1.609_603_3e-2);
    let q: f32 = -1.456_607_2e-5;
    let q = q.mul_add(x2, -2.133_740_6e-4);
    let q = q.mul_add(x2, -1.682_827e-3);
    let q = q.mul_add(x2, -7.373_329_2e-3);
    let q = q.mul_add(x2, -1.426_473_9e-2);
    x * p / q
}

/// Lanes of the split accumulators: one AVX-512 register of f32.
const LANES: usize = 16;

/// `Σ f(x_i)`, accumulated in [`LANES`] independent sums so the loop vectorises (a single running
/// sum would fix the order of additions and keep it scalar).
#[inline(always)]
pub(super) fn sum_by(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// `Σ f(a_i, b_i)`, split like [`sum_by`].
#[inline(always)]
pub(super) fn sum_zip_by(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    for (ca, cb) in a_chunks.zip(b_chunks) {
        for ((acc, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *acc += f(x, y);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// The largest element (`-inf` for none), split like [`sum_by`].
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = a.max(v);
        }
    }
    acc.iter().copied().fold(rest, f32::max)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// erf by its Maclaurin series (accurate to ~1e-13 on |x| <= 3.5), then 1 beyond.
    fn erf64(x: f64) -> f64 {
        if x.abs() > 5.5 {
            return x.signum();
        }
        let mut term = x;
        let mut sum = x;
        for n in 1..400 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2. / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn exp_and_erf_are_accurate_to_a_few_ulp() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..20_000 {
            let x: f32 = rng.random_range(-87.0..88.0);
            let want = f64::from(x).exp();
            let got = f64::from(super::exp(x));
            assert!(
                (got - want).abs() <= 3e-7 * want,
                "exp({x}) = {got}, want {want}"
            );
            let x: f32 = rng.random_range(-4.5..4.5);
            let want = erf64(f64::from(x));
            let got = f64::from(super::erf(x));
            // Largest error seen: 3.3e-7 (6 ulp of 1), near the clamp at ±4.
            assert!((got - want).abs() <= 4e-7, "erf({x}) = {got}, want {want}");
        }
        assert_eq!(super::exp(-87.5), 0.);
        assert_eq!(super::exp(f32::MIN), 0.);
        assert_eq!(super::exp(0.), 1.);
    }

    #[test]
    fn split_reductions_match_sequential_ones() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for n in [0, 1, 15, 16, 17, 100, 384] {
            let x: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0..3.0)).collect();
            let y: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0..3.0)).collect();
            let sum: f64 = x.iter().map(|v| f64::from(*v)).sum();
            assert!((f64::from(super::sum_by(&x, |v| v)) - sum).abs() < 1e-4);
            let dot: f64 = x.iter().zip(&y).map(|(a, b)| f64::from(a * b)).sum();
            assert!((f64::from(super::sum_zip_by(&x, &y, |a, b| a * b)) - dot).abs() < 1e-4);
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(super::max(&x), max);
        }
    }
}
