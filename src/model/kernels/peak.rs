//! The CPU's f32 multiply-add peak, measured: every thread of the pool runs independent chains of
//! vector fused multiply-adds (no memory traffic, no dependency stalls) at once, which is the most
//! f32 arithmetic the cores can do. `bench encoder` divides the model's work by it, so a figure
//! says how far from the hardware it is, and whether a goal such as "1.3x a peer" fits under it.
//!
//! The vector width is the widest the matrix products use: AVX-512 where the kernels run on it,
//! else AVX2 with FMA, NEON on aarch64; on other CPUs there is no figure.

use std::time::Instant;

/// Independent accumulators per thread: enough to cover an FMA's latency on two ports.
const CHAINS: usize = 12;

/// The vector instruction set measured and its f32 lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VectorUnit {
    Avx512,
    Avx2,
    Neon,
}

impl VectorUnit {
    /// The widest unit the kernels use on this CPU, if any has a measurement here.
    pub fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            if super::has_avx512() {
                return Some(Self::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Some(Self::Avx2);
            }
            None
        }
        #[cfg(target_arch = "aarch64")]
        {
            Some(Self::Neon)
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            None
        }
    }

    /// f32 lanes of one vector.
    pub fn lanes(self) -> u64 {
        match self {
            Self::Avx512 => 16,
            Self::Avx2 => 8,
            Self::Neon => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512 => "AVX-512",
            Self::Avx2 => "AVX2 FMA",
            Self::Neon => "NEON",
        }
    }
}

/// The measured peak of one run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct FmaPeak {
    /// f32 floating-point operations per second (a multiply-add counts two), all threads.
    pub flops: f64,
    pub threads: usize,
    #[serde(serialize_with = "unit_name")]
    pub unit: VectorUnit,
}

fn unit_name<S: serde::Serializer>(unit: &VectorUnit, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(unit.name())
}

/// Measures the peak over `iterations` rounds of `CHAINS` vector FMAs on every thread of rayon's
/// global pool (the one the kernels run on), all at once; the best of `repeats` runs, as clocks
/// ramp up. `None` on a CPU without a measured unit.
pub fn measure(iterations: u64, repeats: usize) -> Option<FmaPeak> {
    let unit = VectorUnit::detect()?;
    let threads = rayon::current_num_threads();
    let mut best: f64 = 0.;
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        let lanes: u64 = rayon::broadcast(|_| run(unit, iterations))
            .into_iter()
            .sum();
        let seconds = start.elapsed().as_secs_f64();
        best = best.max(2. * lanes as f64 / seconds);
    }
    Some(FmaPeak {
        flops: best,
        threads,
        unit,
    })
}

/// Runs the chains on this thread; the lane-FMAs done. `black_box` keeps the result, so the
/// loop cannot be optimised away.
fn run(unit: VectorUnit, iterations: u64) -> u64 {
    std::hint::black_box(chains(unit, iterations));
    unit.lanes() * CHAINS as u64 * iterations
}

/// The sum over chains and lanes after `iterations` rounds.
fn chains(unit: VectorUnit, iterations: u64) -> f32 {
    match unit {
        // SAFETY: `detect` found the features each function is compiled for.
        #[cfg(target_arch = "x86_64")]
        VectorUnit::Avx512 => unsafe { x86::chains_avx512(iterations) },
        #[cfg(target_arch = "x86_64")]
        VectorUnit::Avx2 => unsafe { x86::chains_avx2(iterations) },
        #[cfg(target_arch = "aarch64")]
        VectorUnit::Neon => unsafe { arm::chains_neon(iterations) },
        #[allow(unreachable_patterns)]
        _ => 0.,
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::CHAINS;

    /// `a = a * x + y` on `CHAINS` independent accumulators; the lanes' sum at the end.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn chains_avx2(iterations: u64) -> f32 {
        let (x, y) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut acc = [_mm256_setzero_ps(); CHAINS];
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm256_set1_ps(i as f32);
        }
        for _ in 0..iterations {
            for a in &mut acc {
                *a = _mm256_fmadd_ps(*a, x, y);
            }
        }
        let mut total = _mm256_setzero_ps();
        for a in acc {
            total = _mm256_add_ps(total, a);
        }
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
        lanes.iter().sum()
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn chains_avx512(iterations: u64) -> f32 {
        let (x, y) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm512_set1_ps(i as f32);
        }
        for _ in 0..iterations {
            for a in &mut acc {
                *a = _mm512_fmadd_ps(*a, x, y);
            }
        }
        let mut total = _mm512_setzero_ps();
        for a in acc {
            total = _mm512_add_ps(total, a);
        }
        _mm512_reduce_add_ps(total)
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    use super::CHAINS;

    #[target_feature(enable = "neon")]
    pub(super) unsafe fn chains_neon(iterations: u64) -> f32 {
        let (x, y) = (vdupq_n_f32(0.999_999), vdupq_n_f32(1e-7));
        let mut acc = [vdupq_n_f32(0.); CHAINS];
        for (i, a) in acc.iter_mut().enumerate() {
            *a = vdupq_n_f32(i as f32);
        }
        for _ in 0..iterations {
            for a in &mut acc {
                *a = vfmaq_f32(y, *a, x);
            }
        }
        acc.iter().map(|&a| vaddvq_f32(a)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a CPU with a vector unit the figure is positive, counts every thread, and is not
    /// absurd: at most 2 FMA ports x 16 lanes x 2 flops a cycle at 6 GHz per thread. The floor
    /// is low: debug builds call each intrinsic, and other tests share the cores.
    #[test]
    fn measures_a_plausible_peak_where_the_cpu_has_a_unit() {
        let Some(unit) = VectorUnit::detect() else {
            assert!(measure(1000, 1).is_none());
            return;
        };
        let peak = measure(200_000, 2).expect("a unit was detected");
        assert_eq!(peak.unit, unit);
        assert_eq!(peak.threads, rayon::current_num_threads());
        let per_thread = peak.flops / peak.threads as f64;
        assert!(
            (1e8..=2. * 16. * 2. * 6e9).contains(&per_thread),
            "{per_thread:e} flop/s per thread"
        );
    }

    /// The vector chains compute the scalar recurrence `a = a * x + y` from `a = chain index`:
    /// the loop ran, on every chain and lane.
    #[test]
    fn the_chains_compute_the_recurrence() {
        let Some(unit) = VectorUnit::detect() else {
            return;
        };
        let iterations = 1000;
        let sum = chains(unit, iterations);
        let expected: f32 = (0..CHAINS)
            .map(|i| (0..iterations).fold(i as f32, |a, _| a.mul_add(0.999_999, 1e-7)))
            .sum::<f32>()
            * unit.lanes() as f32;
        assert!(
            (sum - expected).abs() <= 1e-4 * expected,
            "{sum} against {expected}"
        );
    }
}
