//! Weight matrices kept in bf16 for inference products `x · wᵀ` (the local LLM's linear layers).
//!
//! GGUF weights are 4- to 8-bit: widened to bf16 they are exact to 2^-9, at half the memory of
//! f32, and each matrix is laid out once at load for the engine that multiplies it, the best the
//! CPU has (chosen at run time):
//! - AMX tiles (`fused::amx_packed`): 16 × 16 × 32 products per instruction;
//! - AVX-512 BF16 (`vdpbf16ps`, Cooper Lake, Sapphire Rapids, Zen 4): 16 columns × 2 `k` per
//!   instruction, 8 rows × 32 columns per register-blocked step; activations rounded to bf16;
//! - AVX2 + FMA (every x86-64 since Haswell and Zen): panels of 16 columns whose bf16 pairs
//!   widen in two instructions, 6 rows × 16 columns of f32 FMA per register-blocked step;
//!   activations stay f32;
//! - anything else: rows of bf16 that a vectorised f32 loop widens as it goes.
//!
//! The first two share one layout, "VNNI" ([`pack_vnni`]): per 16 output columns, each pair of
//! `k` holds 16 columns × 2 values side by side, 64 bytes, as AMX tiles and `vdpbf16ps` read them.
//!
//! Either way a row of the output depends only on its own row of `x`: no reduction order changes
//! with the number of rows, so batched and unbatched inference agree bit for bit.

use rayon::prelude::*;

use super::fused::multiversion;

#[cfg(target_arch = "x86_64")]
pub(crate) mod attention;

/// What multiplies bf16 weights, the best this CPU has, chosen at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// AMX tiles.
    #[cfg(target_arch = "x86_64")]
    Tiles,
    /// AVX-512 BF16 dot products.
    #[cfg(target_arch = "x86_64")]
    Pairs,
    /// bf16 widened to f32 in registers, AVX2 FMA.
    #[cfg(target_arch = "x86_64")]
    Panels,
    /// bf16 widened by a vectorised f32 loop.
    Rows,
}

impl Engine {
    /// The engine [`Bf16Weights::new`] packs for on this CPU.
    pub fn here() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if super::fused::amx_available() {
                return Self::Tiles;
            } else if dot_pairs::available() {
                return Self::Pairs;
            } else if fma_panels::available() {
                return Self::Panels;
            }
        }
        Self::Rows
    }

    pub fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Tiles => "AMX bf16",
            #[cfg(target_arch = "x86_64")]
            Self::Pairs => "AVX-512 BF16",
            #[cfg(target_arch = "x86_64")]
            Self::Panels => "bf16 panels (AVX2 FMA)",
            Self::Rows => "bf16 rows (f32 vector loop)",
        }
    }

    /// Whether the CPU multiplies bf16 itself, at twice the f32 FMA's work an instruction or
    /// more; the other engines widen bf16 to f32 first and are no faster than f32.
    pub fn multiplies_bf16(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Tiles | Self::Pairs => true,
            _ => false,
        }
    }
}

/// A `[out, in]` weight matrix in bf16, packed for this CPU's engine.
pub struct Bf16Weights {
    out_features: usize,
    in_features: usize,
    layout: Layout,
}

/// What each output gets after the product, in this order: a bias (`out_features` values), a
/// residual (`[rows, out_features]`, an encoder's skip connection), the exact GELU. The default
/// is nothing (the LLM's projections).
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub residual: Option<&'a [f32]>,
    pub gelu: bool,
}

enum Layout {
    /// [`pack_vnni`], multiplied on AMX tiles.
    #[cfg(target_arch = "x86_64")]
    Tiles(Vec<u16>),
    /// [`pack_vnni`], multiplied by AVX-512 BF16 dot products.
    #[cfg(target_arch = "x86_64")]
    Pairs(Vec<u16>),
    /// [`fma_panels::pack`], multiplied by AVX2 FMA.
    #[cfg(target_arch = "x86_64")]
    Panels(Vec<u32>),
    /// Row-major bf16 bits.
    Rows(Vec<u16>),
}

/// `k` per VNNI block (16 pairs) and values per block of 16 columns.
const BLOCK_K: usize = 32;
const BLOCK_ELEMS: usize = BLOCK_K * 16;

/// `w` (`[n, k]` row-major, as a linear layer stores `[out, in]`) in VNNI blocks: per group of
/// 16 output columns (`n` padded to 32 with zeros), per 32 `k` (padded with zeros), 16 rows of
/// `k` pair `2r, 2r + 1` for each of the 16 columns, interleaved: `[group][k block][pair][column][2]`.
pub(crate) fn pack_vnni(w: &[f32], n: usize, k: usize) -> Vec<u16> {
    let (k_blocks, groups) = (k.div_ceil(BLOCK_K), 2 * n.div_ceil(32));
    let mut packed = vec![0u16; groups * k_blocks * BLOCK_ELEMS];
    packed
        .par_chunks_mut(k_blocks * BLOCK_ELEMS)
        .enumerate()
        .for_each(|(group, out)| {
            for c in 0..16 {
                let col = group * 16 + c;
                if col >= n {
                    break;
                }
                for (kk, &v) in w[col * k..(col + 1) * k].iter().enumerate() {
                    let (kb, within) = (kk / BLOCK_K, kk % BLOCK_K);
                    out[kb * BLOCK_ELEMS + (within / 2) * 32 + c * 2 + within % 2] =
                        half::bf16::from_f32(v).to_bits();
                }
            }
        });
    packed
}

/// Output columns per task of the portable kernel: their widened weights stay in L2.
const PORTABLE_COLUMNS: usize = 16;

multiversion! {
    /// `Σ a·b` over lanes of 16 in a fixed order (so the result never depends on the caller).
    pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut lanes = [0f32; 16];
        let (a_chunks, b_chunks) = (a.chunks_exact(16), b.chunks_exact(16));
        let tail: f32 = a_chunks
            .remainder()
            .iter()
            .zip(b_chunks.remainder())
            .map(|(x, y)| x * y)
            .sum();
        for (x, y) in a_chunks.zip(b_chunks) {
            for l in 0..16 {
                lanes[l] += x[l] * y[l];
            }
        }
        lanes.iter().sum::<f32>() + tail
    }
}

multiversion! {
    /// Widens bf16 bits to f32.
    fn widen(bits: &[u16], out: &mut [f32]) {
        for (o, &b) in out.iter_mut().zip(bits) {
            *o = f32::from_bits(u32::from(b) << 16);
        }
    }
}

impl Bf16Weights {
    /// Packs `w`, `[out_features, in_features]` row-major, for [`Engine::here`].
    pub fn new(w: &[f32], out_features: usize, in_features: usize) -> Self {
        assert_eq!(
            w.len(),
            out_features * in_features,
            "a weight matrix holds out x in values"
        );
        let layout = match Engine::here() {
            #[cfg(target_arch = "x86_64")]
            Engine::Tiles => Layout::Tiles(pack_vnni(w, out_features, in_features)),
            #[cfg(target_arch = "x86_64")]
            Engine::Pairs => Layout::Pairs(pack_vnni(w, out_features, in_features)),
            #[cfg(target_arch = "x86_64")]
            Engine::Panels => Layout::Panels(fma_panels::pack(w, out_features, in_features)),
            Engine::Rows => Layout::Rows(
                w.par_iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect(),
            ),
        };
        Self {
            out_features,
            in_features,
            layout,
        }
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// What multiplies, in words.
    pub fn engine(&self) -> &'static str {
        self.engine_kind().name()
    }

    fn engine_kind(&self) -> Engine {
        match self.layout {
            #[cfg(target_arch = "x86_64")]
            Layout::Tiles(_) => Engine::Tiles,
            #[cfg(target_arch = "x86_64")]
            Layout::Pairs(_) => Engine::Pairs,
            #[cfg(target_arch = "x86_64")]
            Layout::Panels(_) => Engine::Panels,
            Layout::Rows(_) => Engine::Rows,
        }
    }

    /// `x · wᵀ` for `x` `[rows, in_features]`: `[rows, out_features]`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        self.forward_then(x, rows, Epilogue::default())
    }

    /// [`Self::forward`], then `epilogue` on each output.
    pub fn forward_then(&self, x: &[f32], rows: usize, epilogue: Epilogue<'_>) -> Vec<f32> {
        let (n, k) = (self.out_features, self.in_features);
        assert_eq!(x.len(), rows * k, "x holds rows x in_features values");
        if let Some(bias) = epilogue.bias {
            assert_eq!(bias.len(), n, "a bias holds out_features values");
        }
        if let Some(residual) = epilogue.residual {
            assert_eq!(
                residual.len(),
                rows * n,
                "a residual holds rows x out_features values"
            );
        }
        if rows == 0 {
            return Vec::new();
        }
        let mut out = match &self.layout {
            #[cfg(target_arch = "x86_64")]
            Layout::Pairs(packed) => {
                // The kernel applies the epilogue to each block while it is in registers and
                // cache, and writes every output: no zero-filled buffer first.
                let mut out = Vec::with_capacity(rows * n);
                // SAFETY: pairs are packed only where AVX-512 BF16 is available, for this `n`,
                // `k`; the kernel writes all `rows * n` outputs before `set_len`.
                unsafe {
                    dot_pairs::matmul(x, packed, (rows, n, k), out.as_mut_ptr(), epilogue);
                    out.set_len(rows * n);
                }
                return out;
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: tiles are packed only where AMX is available, by `pack_weights` for this
            // `n` and `k`.
            Layout::Tiles(packed) => unsafe {
                let mut out = vec![0f32; rows * n];
                super::fused::amx_packed::matmul(x, packed, (rows, n, k), &mut out);
                out
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: panels are packed only where AVX2 and FMA are available, for this `n`, `k`.
            Layout::Panels(packed) => unsafe {
                let mut out = vec![0f32; rows * n];
                fma_panels::matmul(x, packed, (rows, n, k), &mut out);
                out
            },
            Layout::Rows(bits) => rows_product(bits, x, (rows, n, k)),
        };
        if epilogue.bias.is_some() || epilogue.residual.is_some() || epilogue.gelu {
            out.par_chunks_mut(n.max(1))
                .enumerate()
                .for_each(|(r, row)| {
                    if let Some(bias) = epilogue.bias {
                        row.iter_mut().zip(bias).for_each(|(o, &b)| *o += b);
                    }
                    if let Some(residual) = epilogue.residual {
                        let skip = &residual[r * n..(r + 1) * n];
                        row.iter_mut().zip(skip).for_each(|(o, &s)| *o += s);
                    }
                    if epilogue.gelu {
                        super::fused::gelu_in_place(row);
                    }
                });
        }
        out
    }
}

/// `x · wᵀ` for `w` as row-major bf16 `bits`, widened block by block (the portable engine).
fn rows_product(bits: &[u16], x: &[f32], (rows, n, k): (usize, usize, usize)) -> Vec<f32> {
    let columns: Vec<Vec<f32>> = bits
        .par_chunks(PORTABLE_COLUMNS * k)
        .map(|block| {
            // The block's columns widened once; each activation row is then read once per
            // block (from L1) rather than once per column.
            let mut widened = vec![0f32; block.len()];
            widen(block, &mut widened);
            let mut results = vec![0f32; block.len() / k * rows];
            for (r, xr) in x.chunks_exact(k).enumerate() {
                for (c, column) in widened.chunks_exact(k).enumerate() {
                    results[c * rows + r] = dot(xr, column);
                }
            }
            results
        })
        .collect();
    let mut out = vec![0f32; rows * n];
    for (task, results) in columns.iter().enumerate() {
        for (c, column) in results.chunks_exact(rows).enumerate() {
            let j = task * PORTABLE_COLUMNS + c;
            for (r, &v) in column.iter().enumerate() {
                out[r * n + j] = v;
            }
        }
    }
    out
}

/// A dense layer `x · wᵀ + b` with its weight packed in bf16: an encoder's linear layer frozen
/// for inference (the bias stays f32).
pub struct Bf16Linear {
    weights: Bf16Weights,
    bias: Vec<f32>,
}

impl Bf16Linear {
    /// Packs `weight` (`[out, in]` row-major) and keeps `bias` (`out` values).
    pub fn new(weight: &[f32], bias: Vec<f32>, out_features: usize, in_features: usize) -> Self {
        assert_eq!(bias.len(), out_features, "a bias holds out_features values");
        Self {
            weights: Bf16Weights::new(weight, out_features, in_features),
            bias,
        }
    }

    pub fn weights(&self) -> &Bf16Weights {
        &self.weights
    }

    /// `x · wᵀ + b` for `x` `[rows, in_features]`, plus `residual` (`[rows, out_features]`)
    /// if given, then the exact GELU if `gelu`.
    pub fn forward(
        &self,
        x: &[f32],
        rows: usize,
        residual: Option<&[f32]>,
        gelu: bool,
    ) -> Vec<f32> {
        let epilogue = Epilogue {
            bias: Some(&self.bias),
            residual,
            gelu,
        };
        self.weights.forward_then(x, rows, epilogue)
    }

    /// An encoder layer's feed-forward block before its LayerNorm,
    /// `x + gelu(x · w1ᵀ + b1) · w2ᵀ + b2`, with `self` the intermediate layer (`w1`, `b1`) and
    /// `output` the second (`w2`, `b2`), for `x` `[rows, in_features]`. Where both multiply by
    /// AVX-512 BF16 the GELU output, the widest activation, goes from one product to the next
    /// in bf16, rounded as the second product would round it: the same outputs without an f32
    /// copy and a rounding pass between them.
    pub fn feed_forward(&self, output: &Bf16Linear, x: &[f32], rows: usize) -> Vec<f32> {
        let (hidden, inner) = (self.weights.in_features, self.weights.out_features);
        assert!(
            output.weights.in_features == inner && output.weights.out_features == hidden,
            "a feed-forward block maps {hidden} features to {inner} and back, not {} to {}",
            output.weights.in_features,
            output.weights.out_features
        );
        assert_eq!(x.len(), rows * hidden, "x holds rows x in_features values");
        #[cfg(target_arch = "x86_64")]
        if let (Layout::Pairs(first), Layout::Pairs(second)) =
            (&self.weights.layout, &output.weights.layout)
        {
            let inner_pad = inner.next_multiple_of(BLOCK_K);
            // Columns past `inner` are read by the second product as `k` padding: zeros.
            let mut activated = if inner_pad == inner {
                Vec::with_capacity(rows * inner_pad)
            } else {
                vec![0u16; rows * inner_pad]
            };
            let mut out = Vec::with_capacity(rows * hidden);
            let first_epilogue = Epilogue {
                bias: Some(&self.bias),
                residual: None,
                gelu: true,
            };
            let second_epilogue = Epilogue {
                bias: Some(&output.bias),
                residual: Some(x),
                gelu: false,
            };
            // SAFETY: pairs are packed only where AVX-512 BF16 is available, for these shapes;
            // the first product writes the first `inner` columns of every row of `activated`
            // (the rest zeros), the second all `rows * hidden` outputs, before each `set_len`.
            unsafe {
                let xs = dot_pairs::rounded(x, rows, hidden);
                let into = dot_pairs::Dest::Bf16(activated.as_mut_ptr());
                let shape = (rows, inner, hidden);
                dot_pairs::matmul_rounded(&xs, first, shape, into, inner_pad, first_epilogue);
                activated.set_len(rows * inner_pad);
                let into = dot_pairs::Dest::F32(out.as_mut_ptr());
                let shape = (rows, hidden, inner);
                dot_pairs::matmul_rounded(&activated, second, shape, into, hidden, second_epilogue);
                out.set_len(rows * hidden);
            }
            return out;
        }
        let activated = self.forward(x, rows, None, true);
        output.forward(&activated, rows, Some(x), false)
    }
}

/// A raw output pointer shared by tasks writing disjoint blocks.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint elements; the buffer outlives the parallel section.
#[cfg(target_arch = "x86_64")]
unsafe impl Send for Out {}
// SAFETY: as above.
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for Out {}

#[cfg(target_arch = "x86_64")]
impl Out {
    /// The pointer (a method, so closures capture the `Send` wrapper, not its field).
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// The AVX-512 BF16 engine.
#[cfg(target_arch = "x86_64")]
mod dot_pairs {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{BLOCK_ELEMS, BLOCK_K, Out};

    /// Rows per register-blocked step (8 rows × 2 column vectors: 16 accumulators).
    const ROWS: usize = 8;
    /// Rows of activations per task (their bf16 copy stays in L2 while the task's weights pass).
    const BLOCK_ROWS: usize = 256;
    /// Groups of 32 columns per task.
    const TASK_COLUMN_PAIRS: usize = 4;

    pub(super) fn available() -> bool {
        super::super::has_avx512() && std::arch::is_x86_feature_detected!("avx512bf16")
    }

    /// The epilogue of one block: pointers at its first row and column (`bias` at its column).
    #[derive(Clone, Copy)]
    struct Then {
        bias: Option<*const f32>,
        residual: Option<*const f32>,
        gelu: bool,
    }

    /// Where a block's outputs go: f32, or rounded to bf16 as the next product's input (a
    /// feed-forward block's GELU output: no rounding pass and half the bytes between them).
    #[derive(Clone, Copy)]
    pub(super) enum Dest {
        F32(*mut f32),
        Bf16(*mut u16),
    }
    // SAFETY: tasks given one destination write disjoint elements of it; the buffer outlives
    // the parallel section (as `Out`).
    unsafe impl Send for Dest {}
    // SAFETY: as above.
    unsafe impl Sync for Dest {}

    impl Dest {
        /// `count` elements further on.
        ///
        /// # Safety
        /// As `pointer::add`.
        unsafe fn add(self, count: usize) -> Self {
            // SAFETY: the caller's promise.
            unsafe {
                match self {
                    Self::F32(p) => Self::F32(p.add(count)),
                    Self::Bf16(p) => Self::Bf16(p.add(count)),
                }
            }
        }
    }

    /// `out` rows `rows` (at most [`ROWS`]) × columns `32 cp .. 32 cp + 32`, over every `k`:
    /// each output is its lane's `vdpbf16ps` sum over the `k` pairs in order, from the bias if
    /// one is given, plus the residual, then GELU if asked.
    ///
    /// # Safety
    /// The CPU must have AVX-512 BF16; `xs` rows hold `k_pad` bf16 each; `weights` holds the
    /// two 16-column groups of `cp`; `out` and the residual (row stride `n`) have room for the
    /// rows and `cols` columns written, and a bias for the `cols` columns.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn block<const R: usize>(
        xs: *const u16,
        k_pad: usize,
        weights: *const u16,
        k_blocks: usize,
        out: Dest,
        (n, cols): (usize, usize),
        then: Then,
    ) {
        let mask = |half: usize| {
            let count = cols.saturating_sub(16 * half).min(16);
            ((1u32 << count) - 1) as u16
        };
        // The bias (of these columns) is where the sums start.
        let start = |half: usize| match then.bias {
            // SAFETY: the masked lanes are columns within the bias, by the caller (no lane of a
            // second half past `cols`: the pointer is not even formed).
            Some(bias) if mask(half) != 0 => unsafe {
                _mm512_maskz_loadu_ps(mask(half), bias.add(16 * half))
            },
            _ => _mm512_setzero_ps(),
        };
        let mut acc = [[start(0), start(1)]; R];
        let second = k_blocks * BLOCK_ELEMS;
        for pair in 0..k_blocks * BLOCK_K / 2 {
            let at = (pair / 16) * BLOCK_ELEMS + (pair % 16) * 32;
            // SAFETY: both groups hold every pair's 64 bytes; each row holds `k_pad` values.
            unsafe {
                let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(weights.add(at).cast()));
                let w1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(weights.add(second + at).cast()));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = xs.add(r * k_pad + 2 * pair).cast::<i32>().read_unaligned();
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(x));
                    acc[0] = _mm512_dpbf16_ps(acc[0], x, w0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], x, w1);
                }
            }
        }
        if let Some(skip) = then.residual {
            for (r, acc) in acc.iter_mut().enumerate() {
                for (half, v) in acc.iter_mut().enumerate() {
                    if mask(half) == 0 {
                        break;
                    }
                    // SAFETY: the masked columns of row `r` are within the residual, by the
                    // caller (no pointer past `cols` is formed).
                    *v = unsafe {
                        _mm512_add_ps(
                            *v,
                            _mm512_maskz_loadu_ps(mask(half), skip.add(r * n + 16 * half)),
                        )
                    };
                }
            }
        }
        if then.gelu {
            // GELU on a copy in full vectors: reading `out` back after its masked stores would
            // wait for them to retire (a masked store does not forward to a load); that made
            // bf16 encoding 6% slower.
            let mut tile = [[0f32; 32]; R];
            for (row, acc) in tile.iter_mut().zip(&acc) {
                // SAFETY: each half is 16 values of the row's 32.
                unsafe {
                    _mm512_storeu_ps(row.as_mut_ptr(), acc[0]);
                    _mm512_storeu_ps(row.as_mut_ptr().add(16), acc[1]);
                }
            }
            super::super::fused::gelu_in_place(tile.as_flattened_mut());
            for (row, acc) in tile.iter().zip(acc.iter_mut()) {
                // SAFETY: as above.
                unsafe {
                    acc[0] = _mm512_loadu_ps(row.as_ptr());
                    acc[1] = _mm512_loadu_ps(row.as_ptr().add(16));
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (half, &v) in acc.iter().enumerate() {
                if mask(half) == 0 {
                    break;
                }
                // SAFETY: the masked columns of row `r` are within `out`, by the caller.
                unsafe {
                    match out.add(r * n + 16 * half) {
                        Dest::F32(p) => _mm512_mask_storeu_ps(p, mask(half), v),
                        Dest::Bf16(p) => {
                            let bits: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                            _mm256_mask_storeu_epi16(p.cast(), mask(half), bits);
                        }
                    }
                };
            }
        }
    }

    /// `src` rounded to bf16 (to nearest even, as `half` rounds; subnormals become zero) into
    /// the start of `dst`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 BF16; `dst` is at least as long as `src`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn round_row(src: &[f32], dst: &mut [u16]) {
        let chunks = src.len() / 16;
        for c in 0..chunks {
            // SAFETY: 16 values from `16 c` are within both slices.
            unsafe {
                let v = _mm512_loadu_ps(src.as_ptr().add(16 * c));
                let bits: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_storeu_si256(dst.as_mut_ptr().add(16 * c).cast(), bits);
            }
        }
        for (d, &v) in dst[16 * chunks..].iter_mut().zip(&src[16 * chunks..]) {
            *d = half::bf16::from_f32(v).to_bits();
        }
    }

    /// Rows `rows` of the outputs in the `cols` (at most 32) columns of one column pair, each
    /// block of rows by [`block`]: `xs` holds rows of `k_pad` bf16 from row 0, `weights` the
    /// pair's two 16-column groups; `out` and `then.residual` point at row 0 of the pair's first
    /// column (row stride `n`), `then.bias` at that column.
    ///
    /// # Safety
    /// As [`block`], for every row in `rows`.
    unsafe fn column_pair(
        xs: *const u16,
        k_pad: usize,
        rows: std::ops::Range<usize>,
        weights: *const u16,
        out: Dest,
        (n, cols): (usize, usize),
        then: Then,
    ) {
        let k_blocks = k_pad / BLOCK_K;
        let mut r = rows.start;
        while r < rows.end {
            // SAFETY: row `r` onwards is within every operand, by the caller.
            unsafe {
                let (xr, o) = (xs.add(r * k_pad), out.add(r * n));
                let then = Then {
                    residual: then.residual.map(|s| s.add(r * n)),
                    ..then
                };
                let shape = (n, cols);
                r += match rows.end - r {
                    ROWS.. => {
                        block::<ROWS>(xr, k_pad, weights, k_blocks, o, shape, then);
                        ROWS
                    }
                    4..=7 => {
                        block::<4>(xr, k_pad, weights, k_blocks, o, shape, then);
                        4
                    }
                    2..=3 => {
                        block::<2>(xr, k_pad, weights, k_blocks, o, shape, then);
                        2
                    }
                    _ => {
                        block::<1>(xr, k_pad, weights, k_blocks, o, shape, then);
                        1
                    }
                };
            }
        }
    }

    /// `out = xs · wᵀ` in the calling thread, no epilogue: `xs` holds `m` rows of `k_pad` bf16
    /// (zeros past `k`), `packed` the VNNI blocks of `w` (`[n, k_pad]`, as [`super::pack_vnni`]
    /// lays them out); the first `n` columns of `m` rows of `out` (row stride `stride`) are
    /// written.
    ///
    /// # Safety
    /// [`available`] must hold; the operands hold what is described.
    pub(super) unsafe fn product(
        xs: *const u16,
        k_pad: usize,
        m: usize,
        packed: *const u16,
        n: usize,
        out: *mut f32,
        stride: usize,
    ) {
        let k_blocks = k_pad / BLOCK_K;
        let then = Then {
            bias: None,
            residual: None,
            gelu: false,
        };
        for cp in 0..n.div_ceil(32) {
            // SAFETY: the column pair's blocks, rows and columns are within the operands, by
            // the caller.
            unsafe {
                column_pair(
                    xs,
                    k_pad,
                    0..m,
                    packed.add(2 * cp * k_blocks * BLOCK_ELEMS),
                    Dest::F32(out.add(32 * cp)),
                    (stride, 32.min(n - 32 * cp)),
                    then,
                );
            }
        }
    }

    /// `x` (`[m, k]`) rounded to bf16, rows padded with zeros to `k_pad`, a multiple of 32.
    ///
    /// # Safety
    /// [`available`] must hold.
    pub(super) unsafe fn rounded(x: &[f32], m: usize, k: usize) -> Vec<u16> {
        let k_pad = k.next_multiple_of(BLOCK_K);
        let mut xs = Vec::with_capacity(m * k_pad);
        xs.spare_capacity_mut()[..m * k_pad]
            .par_chunks_mut(k_pad)
            .zip(x.par_chunks(k))
            .for_each(|(dst, src)| {
                // SAFETY: `u16` has no invalid bit patterns; the row is written in full below.
                let dst: &mut [u16] = unsafe { std::mem::transmute(dst) };
                // SAFETY: AVX-512 BF16 is available (the caller's promise); `k_pad >= k`.
                unsafe { round_row(src, dst) };
                dst[k..].fill(0);
            });
        // SAFETY: every row was written in full.
        unsafe { xs.set_len(m * k_pad) };
        xs
    }

    /// `out = x · wᵀ` for `x` `[m, k]` and `w` packed by [`super::pack_vnni`] from `[n, k]`,
    /// then `epilogue`; every output is written.
    ///
    /// # Safety
    /// [`available`] must hold; `packed` must come from `pack_vnni` with this `n` and `k`; `out`
    /// has room for `m * n` values; a bias holds `n`.
    pub(super) unsafe fn matmul(
        x: &[f32],
        packed: &[u16],
        (m, n, k): (usize, usize, usize),
        out: *mut f32,
        epilogue: super::Epilogue<'_>,
    ) {
        // SAFETY: the caller's promises.
        unsafe {
            let xs = rounded(x, m, k);
            matmul_rounded(&xs, packed, (m, n, k), Dest::F32(out), n, epilogue);
        }
    }

    /// `out = xs · wᵀ` for `xs` from [`rounded`] (`[m, k]`) and `w` packed by
    /// [`super::pack_vnni`] from `[n, k]`, then `epilogue`; every output in the first `n`
    /// columns of `m` rows of stride `stride` is written.
    ///
    /// # Safety
    /// [`available`] must hold; `packed` must come from `pack_vnni` with this `n` and `k`; `out`
    /// has room for `m` rows of `stride >= n`; a bias holds `n`, a residual `m` rows of
    /// `stride`.
    pub(super) unsafe fn matmul_rounded(
        xs: &[u16],
        packed: &[u16],
        (m, n, k): (usize, usize, usize),
        out: Dest,
        stride: usize,
        epilogue: super::Epilogue<'_>,
    ) {
        let k_blocks = k.div_ceil(BLOCK_K);
        let k_pad = k_blocks * BLOCK_K;
        debug_assert_eq!(xs.len(), m * k_pad);
        let bias = epilogue.bias.map(|b| Out(b.as_ptr().cast_mut()));
        let residual = epilogue.residual.map(|r| Out(r.as_ptr().cast_mut()));
        let gelu = epilogue.gelu;
        let column_pairs = n.div_ceil(32);
        let (row_blocks, column_tasks) = (
            m.div_ceil(BLOCK_ROWS),
            column_pairs.div_ceil(TASK_COLUMN_PAIRS),
        );
        (0..row_blocks * column_tasks)
            .into_par_iter()
            .for_each(|task| {
                let (rb, ct) = (task / column_tasks, task % column_tasks);
                let rows = rb * BLOCK_ROWS..((rb + 1) * BLOCK_ROWS).min(m);
                for cp in ct * TASK_COLUMN_PAIRS..((ct + 1) * TASK_COLUMN_PAIRS).min(column_pairs) {
                    let then = Then {
                        bias: bias.map(|b| b.ptr().cast_const().wrapping_add(32 * cp)),
                        residual: residual.map(|s| s.ptr().cast_const().wrapping_add(32 * cp)),
                        gelu,
                    };
                    // SAFETY: AVX-512 BF16 is available (the caller's promise); these rows of
                    // `xs` and `out`, the columns of `cp`, all within bounds; this task alone
                    // writes them.
                    unsafe {
                        column_pair(
                            xs.as_ptr(),
                            k_pad,
                            rows.clone(),
                            packed[2 * cp * k_blocks * BLOCK_ELEMS..].as_ptr(),
                            out.add(32 * cp),
                            (stride, 32.min(n - 32 * cp)),
                            then,
                        );
                    }
                }
            });
    }
}

/// The AVX2 FMA engine: f32 arithmetic on bf16 weights, widened in registers.
#[cfg(target_arch = "x86_64")]
mod fma_panels {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::Out;

    /// Columns per panel: two vectors of 8 f32.
    const COLUMNS: usize = 16;
    /// Rows per register-blocked step (6 rows × 2 column vectors: 12 accumulators of 16).
    const ROWS: usize = 6;
    /// Rows of activations per task (they stay in L2 while the task's panels pass).
    const BLOCK_ROWS: usize = 96;
    /// Panels per task.
    const TASK_PANELS: usize = 4;

    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }

    /// `w` (`[n, k]` row-major) in panels of 16 columns (`n` padded with zeros): per panel, per
    /// `k`, 8 words whose low halves are columns 0..8 and high halves columns 8..16, in bf16 —
    /// a shift and a mask widen them to two vectors of f32.
    pub(super) fn pack(w: &[f32], n: usize, k: usize) -> Vec<u32> {
        let mut packed = vec![0u32; n.div_ceil(COLUMNS) * k * 8];
        packed
            .par_chunks_mut(k * 8)
            .enumerate()
            .for_each(|(panel, out)| {
                for c in 0..COLUMNS {
                    let col = panel * COLUMNS + c;
                    if col >= n {
                        break;
                    }
                    let shift = if c < 8 { 0 } else { 16 };
                    for (kk, &v) in w[col * k..(col + 1) * k].iter().enumerate() {
                        out[kk * 8 + c % 8] |=
                            u32::from(half::bf16::from_f32(v).to_bits()) << shift;
                    }
                }
            });
        packed
    }

    /// `out` rows `0..R` × the panel's `cols` columns (at most 16), over every `k`: each output
    /// is its lane's FMA sum over `k` in order, whatever `R` is.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `x` holds `R` rows of `k`; `panel` holds `k × 8` words;
    /// `out` has room for `R` rows of stride `n` and `cols` columns.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block<const R: usize>(
        x: *const f32,
        k: usize,
        panel: *const u32,
        out: *mut f32,
        n: usize,
        cols: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        for kk in 0..k {
            // SAFETY: the panel holds `k × 8` words, each row `k` values (the caller's promise).
            unsafe {
                let words = _mm256_loadu_si256(panel.add(kk * 8).cast());
                let w0 = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(words));
                let w1 = _mm256_castsi256_ps(_mm256_and_si256(words, high));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*x.add(r * k + kk));
                    acc[0] = _mm256_fmadd_ps(xv, w0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(xv, w1, acc[1]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let mut lanes = [0f32; COLUMNS];
            // SAFETY: `lanes` holds 16 values; `cols` columns of row `r` are within `out`.
            unsafe {
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8), acc[1]);
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), out.add(r * n), cols);
            }
        }
    }

    /// `out = x · wᵀ` for `x` `[m, k]` and `w` packed by [`pack`] from `[n, k]`.
    ///
    /// # Safety
    /// [`available`] must hold; `packed` must come from [`pack`] with this `n` and `k`.
    pub(super) unsafe fn matmul(
        x: &[f32],
        packed: &[u32],
        (m, n, k): (usize, usize, usize),
        out: &mut [f32],
    ) {
        let panels = n.div_ceil(COLUMNS);
        let (row_blocks, panel_tasks) = (m.div_ceil(BLOCK_ROWS), panels.div_ceil(TASK_PANELS));
        let dst = Out(out.as_mut_ptr());
        (0..row_blocks * panel_tasks)
            .into_par_iter()
            .for_each(|task| {
                let (rb, pt) = (task / panel_tasks, task % panel_tasks);
                let rows = rb * BLOCK_ROWS..((rb + 1) * BLOCK_ROWS).min(m);
                for p in pt * TASK_PANELS..((pt + 1) * TASK_PANELS).min(panels) {
                    let cols = COLUMNS.min(n - COLUMNS * p);
                    let panel = packed[p * k * 8..].as_ptr();
                    let mut r = rows.start;
                    while r < rows.end {
                        // SAFETY: AVX2 and FMA are available (the caller's promise); rows `r..`
                        // of `x` and `out`, the columns of panel `p`, all within bounds; this
                        // task alone writes them.
                        unsafe {
                            let (xr, o) =
                                (x.as_ptr().add(r * k), dst.ptr().add(r * n + COLUMNS * p));
                            r += match rows.end - r {
                                ROWS.. => {
                                    block::<ROWS>(xr, k, panel, o, n, cols);
                                    ROWS
                                }
                                5 => {
                                    block::<5>(xr, k, panel, o, n, cols);
                                    5
                                }
                                4 => {
                                    block::<4>(xr, k, panel, o, n, cols);
                                    4
                                }
                                3 => {
                                    block::<3>(xr, k, panel, o, n, cols);
                                    3
                                }
                                2 => {
                                    block::<2>(xr, k, panel, o, n, cols);
                                    2
                                }
                                _ => {
                                    block::<1>(xr, k, panel, o, n, cols);
                                    1
                                }
                            };
                        }
                    }
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn random(len: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// Every engine this CPU runs: the one [`Bf16Weights::new`] picks, the AVX2 panels where
    /// available, and the portable rows.
    fn every_engine(w: &[f32], n: usize, k: usize) -> Vec<Bf16Weights> {
        let engine = |layout| Bf16Weights {
            out_features: n,
            in_features: k,
            layout,
        };
        let mut engines = vec![Bf16Weights::new(w, n, k)];
        #[cfg(target_arch = "x86_64")]
        if fma_panels::available() && !matches!(engines[0].layout, Layout::Panels(_)) {
            engines.push(engine(Layout::Panels(fma_panels::pack(w, n, k))));
        }
        let rows = w.iter().map(|&v| half::bf16::from_f32(v).to_bits());
        engines.push(engine(Layout::Rows(rows.collect())));
        engines
    }

    /// Whether an engine rounds activations to bf16 (the others multiply them in f32).
    fn rounds_activations(weights: &Bf16Weights) -> bool {
        weights.engine_kind().multiplies_bf16()
    }

    /// Each output within bf16 rounding of an f64 product of the bf16-rounded operands, for
    /// ragged shapes (rows and columns off tile sizes, `k` off 32), in every engine this CPU runs.
    #[test]
    fn products_match_f64_of_the_rounded_operands() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let round = |v: f32| half::bf16::from_f32(v).to_f32();
        for (m, n, k) in [
            (1, 1, 1),
            (5, 17, 33),
            (33, 70, 96),
            (40, 100, 577),
            (103, 40, 64),
        ] {
            let (x, w) = (random(m * k, &mut rng), random(n * k, &mut rng));
            for weights in every_engine(&w, n, k) {
                let out = weights.forward(&x, m);
                for i in 0..m {
                    for j in 0..n {
                        let (mut exact, mut magnitude) = (0f64, 0f64);
                        for kk in 0..k {
                            let xr = if rounds_activations(&weights) {
                                round(x[i * k + kk])
                            } else {
                                x[i * k + kk]
                            };
                            let term = f64::from(xr) * f64::from(round(w[j * k + kk]));
                            exact += term;
                            magnitude += term.abs();
                        }
                        let error = (f64::from(out[i * n + j]) - exact).abs();
                        assert!(
                            error <= 1e-5 * magnitude.max(1.0),
                            "{} ({m}, {n}, {k}) at ({i}, {j}): {} vs {exact}",
                            weights.engine(),
                            out[i * n + j]
                        );
                    }
                }
            }
        }
    }

    /// A bias as the epilogue gives what adding it after the product gives (to f32 rounding:
    /// the AVX-512 BF16 kernel starts its sums from the bias); a residual then adds to exactly
    /// those sums, and GELU gives the GELU kernel's values of them.
    #[test]
    fn the_epilogue_adds_the_bias_then_gelu() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (m, n, k) in [(3, 40, 33), (19, 70, 96)] {
            let (x, w, bias) = (
                random(m * k, &mut rng),
                random(n * k, &mut rng),
                random(n, &mut rng),
            );
            for weights in every_engine(&w, n, k) {
                let engine = weights.engine();
                let plain = weights.forward(&x, m);
                let with_bias = Epilogue {
                    bias: Some(&bias),
                    ..Epilogue::default()
                };
                let biased = weights.forward_then(&x, m, with_bias);
                for (i, (&p, &b)) in plain.iter().zip(&biased).enumerate() {
                    let want = p + bias[i % n];
                    assert!(
                        (b - want).abs() <= 1e-5 * want.abs().max(1.),
                        "{engine} at {i}"
                    );
                }
                let mut want = biased.clone();
                super::super::fused::gelu_in_place(&mut want);
                let with_gelu = Epilogue {
                    gelu: true,
                    ..with_bias
                };
                let activated = weights.forward_then(&x, m, with_gelu);
                assert_eq!(activated, want, "{engine}");
                let residual = random(m * n, &mut rng);
                let with_residual = Epilogue {
                    residual: Some(&residual),
                    ..with_bias
                };
                let added = weights.forward_then(&x, m, with_residual);
                let sums: Vec<f32> = biased.iter().zip(&residual).map(|(b, s)| b + s).collect();
                assert_eq!(added, sums, "{engine} residual");
            }
        }
    }

    /// The feed-forward block gives the bits of its two products one after the other (the GELU
    /// output handed over in bf16 is what the second product rounds it to), for widths off 32.
    #[test]
    fn the_feed_forward_block_is_its_two_products() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        for (rows, hidden, inner) in [(19, 40, 70), (300, 64, 256)] {
            let x = random(rows * hidden, &mut rng);
            let intermediate = Bf16Linear::new(
                &random(inner * hidden, &mut rng),
                random(inner, &mut rng),
                inner,
                hidden,
            );
            let output = Bf16Linear::new(
                &random(hidden * inner, &mut rng),
                random(hidden, &mut rng),
                hidden,
                inner,
            );
            let activated = intermediate.forward(&x, rows, None, true);
            let want = output.forward(&activated, rows, Some(&x), false);
            let got = intermediate.feed_forward(&output, &x, rows);
            assert_eq!(
                got,
                want,
                "{} ({rows}, {hidden}, {inner})",
                output.weights().engine()
            );
        }
    }

    /// A row's output is the same bits alone and among others, at any position, in every engine.
    #[test]
    fn a_row_does_not_depend_on_the_rows_beside_it() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (n, k) = (96, 300);
        let x = random(45 * k, &mut rng);
        for weights in every_engine(&random(n * k, &mut rng), n, k) {
            let all = weights.forward(&x, 45);
            for row in [0, 17, 44] {
                let alone = weights.forward(&x[row * k..(row + 1) * k], 1);
                assert_eq!(
                    alone,
                    all[row * n..(row + 1) * n],
                    "{} row {row}",
                    weights.engine()
                );
            }
        }
    }
}
