//! f32 matrix products on Intel AMX tiles (Sapphire Rapids and later), whose bf16 multiply-add
//! runs an order of magnitude faster than AVX-512 f32 FMA on the same core.
//!
//! AMX multiplies bf16 and accumulates in f32. For f32 accuracy each operand is split into its
//! bf16 rounding `hi` and the bf16 rounding of what is left, `lo` (`v = hi + lo` to 2^-17
//! relative), and the product is `hi·hi + hi·lo + lo·hi` in f32 tiles (the "bf16x3" scheme):
//! within a few 1e-6 of an f32 gemm, relative to `Σ|a·b|` (one bf16 product alone is off by
//! ~1e-3, which breaks the parity tests' 2e-6 on embedding components).
//!
//! Layout, as the tile instructions want it: the left operand in tiles of 16 rows × 32 k, the
//! right one in "VNNI" tiles of 16 k-pairs × 16 columns × 2. A task packs a block of the left
//! operand's rows into L2 and sweeps it across the packed right operand, 32 × 32 outputs (2 × 2
//! tiles) at a time; `k` is cut into chunks of [`CHUNK_K`] so both packed blocks stay in cache.
//! The packers are AVX-512: every CPU with AMX has it.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::{Epilogue, Operand, SharedMut};

/// Parts each packed operand holds: `hi` then `lo`.
const PARTS: usize = 2;

/// bf16 per tile row (64 bytes) and rows per tile.
const TILE_K: usize = 32;
const TILE_ROWS: usize = 16;
const TILE_ELEMS: usize = TILE_K * TILE_ROWS;
/// `k` per chunk: a 256-row block of the left operand is then 256 KiB per part, in L2.
const CHUNK_K: usize = 512;
/// Rows (in pairs of tiles) a task packs at most; more tasks than threads balance the load.
const BLOCK_PAIRS: usize = 8;

/// Whether this CPU has AMX with bf16 and the kernel lets this process use it (Linux hands
/// out the 8 KiB tile state only on request, `arch_prctl(ARCH_REQ_XCOMP_PERM)`).
pub(super) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let leaf7 = __cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
        if !(amx_bf16 && amx_tile && super::has_avx512()) {
            return false;
        }
        request_tile_state()
    })
}

#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a request for a permission; it reads and writes no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// The bf16 (rounded to nearest even) of each lane of `v` and of what it leaves over, each as
/// 32-bit lanes holding the bf16 bits in their low half.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn split(v: __m512) -> (__m512i, __m512i) {
    let round = |v: __m512| {
        let bits = _mm512_castps_si512(v);
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
        let rounded = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), odd);
        _mm512_srli_epi32::<16>(rounded)
    };
    let hi = round(v);
    let rest = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32::<16>(hi)));
    (hi, round(rest))
}

/// 32-bit lanes `even | odd << 16`: the k-pairs a VNNI tile row holds.
#[inline]
#[target_feature(enable = "avx512f")]
fn pair(even: __m512i, odd: __m512i) -> __m512i {
    _mm512_or_si512(even, _mm512_slli_epi32::<16>(odd))
}

/// 32 bf16 from two vectors of 16 lanes (the low halves of their 32-bit lanes), in order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn narrow(first: __m512i, second: __m512i) -> __m512i {
    let low = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(first));
    _mm512_inserti64x4::<1>(low, _mm512_cvtepi32_epi16(second))
}

/// Up to 16 floats from `count` consecutive ones at `ptr`, zeros beyond.
///
/// # Safety
/// `ptr` must be valid for `count.min(16)` reads.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load(ptr: *const f32, count: usize) -> __m512 {
    if count >= 16 {
        // SAFETY: 16 valid reads, by the caller.
        unsafe { _mm512_loadu_ps(ptr) }
    } else if count == 0 {
        _mm512_setzero_ps()
    } else {
        // SAFETY: the mask reads only the `count` valid elements.
        unsafe { _mm512_maskz_loadu_ps(((1u32 << count) - 1) as u16, ptr) }
    }
}

/// 16 floats from `count` elements at `ptr` with stride `step`, zeros beyond.
///
/// # Safety
/// `ptr` must be valid for the `count.min(16)` reads its stride reaches.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_strided(ptr: *const f32, step: isize, count: usize) -> __m512 {
    if step == 1 {
        // SAFETY: as the caller promises.
        return unsafe { load(ptr, count) };
    }
    let mut lanes = [0f32; 16];
    for (i, lane) in lanes.iter_mut().enumerate().take(count) {
        // SAFETY: as the caller promises.
        *lane = unsafe { *ptr.offset(i as isize * step) };
    }
    // SAFETY: `lanes` holds 16 floats.
    unsafe { _mm512_loadu_ps(lanes.as_ptr()) }
}

/// `count` (at most 16) elements of `operand` from `(row, col)` on, `step` apart, zeros beyond;
/// with `count == 0` nothing is read, so the position may lie past the operand's end.
///
/// # Safety
/// The `count` elements must lie within the operand.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_line(
    operand: Operand,
    (row, col): (usize, usize),
    step: isize,
    count: usize,
) -> __m512 {
    if count == 0 {
        return _mm512_setzero_ps();
    }
    // SAFETY: as the caller promises.
    unsafe {
        let start = operand
            .ptr
            .offset(row as isize * operand.rows + col as isize * operand.cols);
        load_strided(start, step, count)
    }
}

/// The `k` range one packing covers: `blocks` tile-widths from `start` of a `total`-long axis.
#[derive(Clone, Copy)]
struct KRange {
    start: usize,
    blocks: usize,
    total: usize,
}

impl KRange {
    /// Elements of one part of one packed tile column or tile row.
    fn part_len(self) -> usize {
        self.blocks * TILE_ELEMS
    }

    /// Valid `k` from `kk` on (0 past the end).
    fn left(self, kk: usize) -> usize {
        self.total.saturating_sub(kk)
    }
}

/// Packs rows `row0..row0 + 16 * tiles` of `a` (`[m, k]`) over `ks` as tiles
/// `[tile][part][kb][16 rows][32 k]`; rows past `m` and `k` past the end are zeros.
///
/// # Safety
/// `a` must be valid for every element `[m, k]` its strides reach; `out` must hold
/// `tiles * PARTS * ks.part_len()` elements.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_lhs(out: &mut [u16], a: Operand, m: usize, row0: usize, tiles: usize, ks: KRange) {
    let part_len = ks.part_len();
    let out = out.as_mut_ptr();
    if a.cols == 1 {
        // Rows contiguous along k: 32 k of a row are one tile row.
        for t in 0..tiles {
            for r in 0..TILE_ROWS {
                let row = row0 + t * TILE_ROWS + r;
                for kb in 0..ks.blocks {
                    let kk = ks.start + kb * TILE_K;
                    let (v0, v1) = if row < m {
                        let left = ks.left(kk);
                        // SAFETY: `row < m`; the loads stop at `k`.
                        unsafe {
                            let src = a.ptr.offset(row as isize * a.rows).add(kk);
                            (load(src, left), load(src.add(16), left.saturating_sub(16)))
                        }
                    } else {
                        (_mm512_setzero_ps(), _mm512_setzero_ps())
                    };
                    let ((h0, l0), (h1, l1)) = (split(v0), split(v1));
                    let at = t * PARTS * part_len + kb * TILE_ELEMS + r * TILE_K;
                    // SAFETY: `at + part_len + 32` is within `out`, by the caller's size.
                    unsafe {
                        _mm512_storeu_si512(out.add(at).cast(), narrow(h0, h1));
                        _mm512_storeu_si512(out.add(at + part_len).cast(), narrow(l0, l1));
                    }
                }
            }
        }
        return;
    }
    // Otherwise (the transposed case has rows contiguous): 16 rows of two consecutive k at a
    // time make one vector of pairs per k-pair; a tile's 16 such vectors, transposed, are its 16
    // rows.
    for t in 0..tiles {
        let first = row0 + t * TILE_ROWS;
        let rows = m.saturating_sub(first).min(TILE_ROWS);
        let column = |kk: usize| {
            let count = if kk < ks.total { rows } else { 0 };
            // SAFETY: rows `first..first + rows` at column `kk < k` are within `[m, k]`.
            unsafe { load_line(a, (first, kk), a.rows, count) }
        };
        for kb in 0..ks.blocks {
            let mut hi = [_mm512_setzero_si512(); 16];
            let mut lo = [_mm512_setzero_si512(); 16];
            for p in 0..TILE_K / 2 {
                let kk = ks.start + kb * TILE_K + 2 * p;
                let ((h0, l0), (h1, l1)) = (split(column(kk)), split(column(kk + 1)));
                hi[p] = pair(h0, h1);
                lo[p] = pair(l0, l1);
            }
            let at = t * PARTS * part_len + kb * TILE_ELEMS;
            for (vectors, offset) in [(&mut hi, at), (&mut lo, at + part_len)] {
                transpose(vectors);
                for (r, row) in vectors.iter().enumerate() {
                    // SAFETY: row `r` of this tile, 64 bytes within `out`.
                    unsafe { _mm512_storeu_si512(out.add(offset + r * TILE_K).cast(), *row) };
                }
            }
        }
    }
}

/// Transposes a 16 × 16 matrix of 32-bit lanes held as 16 row vectors, in place.
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose(rows: &mut [__m512i; 16]) {
    let r = *rows;
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        let b = 4 * i;
        u[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
        u[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
        u[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
        u[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
    }
    for half in 0..2 {
        let b = 8 * half;
        for i in 0..4 {
            t[b + i] = _mm512_shuffle_i32x4::<0x88>(u[b + i], u[b + i + 4]);
            t[b + i + 4] = _mm512_shuffle_i32x4::<0xdd>(u[b + i], u[b + i + 4]);
        }
    }
    for i in 0..8 {
        rows[i] = _mm512_shuffle_i32x4::<0x88>(t[i], t[i + 8]);
        rows[i + 8] = _mm512_shuffle_i32x4::<0xdd>(t[i], t[i + 8]);
    }
}

/// Packs columns `col0..col0 + 16` of `b` (`[k, n]`) over `ks` as one VNNI tile column
/// `[part][kb][16 k-pairs][16 columns][2]`; columns past `n` and `k` past the end are zeros.
///
/// # Safety
/// `b` must be valid for every element `[k, n]` its strides reach; `out` must hold
/// `PARTS * ks.part_len()` elements.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_rhs(out: &mut [u16], b: Operand, n: usize, col0: usize, ks: KRange) {
    let part_len = ks.part_len();
    let out = out.as_mut_ptr();
    let cols = n.saturating_sub(col0).min(TILE_ROWS);
    if b.rows == 1 {
        // Columns contiguous along k (a transposed weight): 32 k of a column are 16 pairs,
        // scattered one per tile row.
        let lanes = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32((TILE_ROWS * 4) as i32),
        );
        for c in 0..TILE_ROWS {
            for kb in 0..ks.blocks {
                let kk = ks.start + kb * TILE_K;
                let (v0, v1) = if c < cols {
                    let left = ks.left(kk);
                    // SAFETY: column `col0 + c < n`; the loads stop at `k`.
                    unsafe {
                        let src = b.ptr.offset((col0 + c) as isize * b.cols).add(kk);
                        (load(src, left), load(src.add(16), left.saturating_sub(16)))
                    }
                } else {
                    (_mm512_setzero_ps(), _mm512_setzero_ps())
                };
                let ((h0, l0), (h1, l1)) = (split(v0), split(v1));
                let at = kb * TILE_ELEMS + c * 2;
                // SAFETY: lane `i` writes pair `i` of column `c`, within `out`.
                unsafe {
                    let hi = out.add(at).cast::<u8>();
                    _mm512_i32scatter_epi32::<1>(hi.cast(), lanes, narrow(h0, h1));
                    let lo = out.add(at + part_len).cast::<u8>();
                    _mm512_i32scatter_epi32::<1>(lo.cast(), lanes, narrow(l0, l1));
                }
            }
        }
        return;
    }
    // Otherwise (rows contiguous along n): two consecutive rows of 16 columns make a tile row.
    let row = |kk: usize| {
        let count = if kk < ks.total { cols } else { 0 };
        // SAFETY: columns `col0..col0 + cols` of row `kk < k` are within `[k, n]`.
        unsafe { load_line(b, (kk, col0), b.cols, count) }
    };
    for kb in 0..ks.blocks {
        for p in 0..TILE_K / 2 {
            let kk = ks.start + kb * TILE_K + 2 * p;
            let ((h0, l0), (h1, l1)) = (split(row(kk)), split(row(kk + 1)));
            let at = kb * TILE_ELEMS + p * 2 * TILE_ROWS;
            // SAFETY: one 64-byte tile row within `out`.
            unsafe {
                _mm512_storeu_si512(out.add(at).cast(), pair(h0, h1));
                _mm512_storeu_si512(out.add(at + part_len).cast(), pair(l0, l1));
            }
        }
    }
}

/// Tile configuration (palette 1): eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
pub(super) struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

pub(super) static CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// A 32 × 32 f32 block in memory for the accumulator tiles 0-3 (its four 16 × 16 quarters):
/// row `i` at `ptr + i * row_bytes` bytes (0 repeats one row: a bias), columns contiguous.
#[derive(Clone, Copy)]
pub(super) struct TileBlock {
    pub(super) ptr: *mut f32,
    pub(super) row_bytes: usize,
}

impl TileBlock {
    /// The quarter `(r, c)`'s first element.
    ///
    /// # Safety
    /// The block must lie within one allocation.
    unsafe fn quarter(self, r: usize, c: usize) -> *mut f32 {
        // SAFETY: by the caller.
        unsafe { self.ptr.byte_add(r * 16 * self.row_bytes).add(16 * c) }
    }
}

/// Sets the accumulators to zero.
///
/// # Safety
/// The tile configuration must be loaded.
#[inline]
pub(super) unsafe fn zero_accumulators() {
    // SAFETY: by the caller.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack)
        );
    }
}

/// Loads the accumulators from `block`.
///
/// # Safety
/// The tile configuration must be loaded; `block` must be valid for 32 × 32 reads.
#[inline]
unsafe fn load_accumulators(block: TileBlock) {
    // SAFETY: by the caller.
    unsafe {
        asm!(
            "tileloadd tmm0, [{c0} + {stride}*1]",
            "tileloadd tmm1, [{c1} + {stride}*1]",
            "tileloadd tmm2, [{c2} + {stride}*1]",
            "tileloadd tmm3, [{c3} + {stride}*1]",
            c0 = in(reg) block.quarter(0, 0),
            c1 = in(reg) block.quarter(0, 1),
            c2 = in(reg) block.quarter(1, 0),
            c3 = in(reg) block.quarter(1, 1),
            stride = in(reg) block.row_bytes,
            options(nostack),
        );
    }
}

/// Stores the accumulators into `block`.
///
/// # Safety
/// The tile configuration must be loaded; `block` must be valid for 32 × 32 writes that no one
/// else makes meanwhile.
#[inline]
pub(super) unsafe fn store_accumulators(block: TileBlock) {
    // SAFETY: by the caller.
    unsafe {
        asm!(
            "tilestored [{c0} + {stride}*1], tmm0",
            "tilestored [{c1} + {stride}*1], tmm1",
            "tilestored [{c2} + {stride}*1], tmm2",
            "tilestored [{c3} + {stride}*1], tmm3",
            c0 = in(reg) block.quarter(0, 0),
            c1 = in(reg) block.quarter(0, 1),
            c2 = in(reg) block.quarter(1, 0),
            c3 = in(reg) block.quarter(1, 1),
            stride = in(reg) block.row_bytes,
            options(nostack),
        );
    }
}

/// Adds to the accumulators the product of two packed tile rows of `lhs` and two packed tile
/// columns of `rhs` over `blocks` k-blocks, as `lo·hi + hi·hi + hi·lo` of their parts. Tiles
/// 4-5 hold `lhs` tiles, 6-7 `rhs` tiles.
///
/// A tile load costs about three products on Sapphire Rapids (and tiles are not renamed), so
/// the order matters: each step swaps only one side, 8 loads for 12 products where three
/// separate passes take 12.
///
/// # Safety
/// The tile configuration must be loaded; `lhs`, `rhs` must hold `2 * PARTS * part_len`.
#[inline]
unsafe fn products(lhs: *const u16, rhs: *const u16, part_len: usize, blocks: usize) {
    let tile_len = PARTS * part_len;
    // SAFETY: the caller loaded the configuration; every load stays within the packed tiles.
    unsafe {
        // Per k-block, lo·hi, then hi·hi (reloading only lhs), then hi·lo (reloading only rhs).
        let (a_hi0, b_hi0) = (lhs, rhs);
        let (a_lo0, b_lo0) = (lhs.add(part_len), rhs.add(part_len));
        for kb in 0..blocks {
            let at = kb * TILE_ELEMS;
            asm!(
                "tileloadd tmm4, [{alo0} + {stride}*1]",
                "tileloadd tmm6, [{bhi0} + {stride}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{bhi1} + {stride}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{alo1} + {stride}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm4, [{ahi0} + {stride}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{ahi1} + {stride}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm6, [{blo0} + {stride}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tileloadd tmm7, [{blo1} + {stride}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm3, tmm5, tmm7",
                ahi0 = in(reg) a_hi0.add(at),
                ahi1 = in(reg) a_hi0.add(tile_len + at),
                alo0 = in(reg) a_lo0.add(at),
                alo1 = in(reg) a_lo0.add(tile_len + at),
                bhi0 = in(reg) b_hi0.add(at),
                bhi1 = in(reg) b_hi0.add(tile_len + at),
                blo0 = in(reg) b_lo0.add(at),
                blo1 = in(reg) b_lo0.add(tile_len + at),
                stride = in(reg) 64usize,
                options(nostack),
            );
        }
    }
}

/// Where a block of results goes: `rows × cols` (at most 32 × 32) at `dst` with its strides.
struct Block {
    dst: *mut f32,
    strides: (isize, isize),
    rows: usize,
    cols: usize,
}

/// What a block of results is added to.
#[derive(Clone, Copy)]
enum Base<'a> {
    /// Nothing: the block's old contents are overwritten.
    Zero,
    /// The block's contents (what earlier chunks of `k` wrote).
    Dst,
    /// Each column's bias, from the block's first column on.
    Bias(&'a [f32]),
}

/// `dst = base + scale * c` over `block`.
///
/// # Safety
/// `block.dst` must be valid for every element its strides and sizes reach.
#[target_feature(enable = "avx512f")]
unsafe fn write_block(c: &[f32; 1024], block: Block, scale: f32, base: Base) {
    let (dst_rows, dst_cols) = block.strides;
    let factor = _mm512_set1_ps(scale);
    for i in 0..block.rows {
        // SAFETY: row `i` is within the block.
        let row = unsafe { block.dst.offset(i as isize * dst_rows) };
        if dst_cols != 1 {
            for j in 0..block.cols {
                let v = scale * c[i * 32 + j];
                // SAFETY: column `j` is within the block.
                unsafe {
                    let p = row.offset(j as isize * dst_cols);
                    *p = match base {
                        Base::Zero => v,
                        Base::Dst => *p + v,
                        Base::Bias(bias) => bias[j] + v,
                    };
                }
            }
            continue;
        }
        for half in 0..2 {
            let count = block.cols.saturating_sub(16 * half).min(16);
            if count == 0 {
                break;
            }
            let mask = ((1u32 << count) - 1) as u16;
            let from = &c[i * 32 + 16 * half..i * 32 + 16 * half + 16];
            // SAFETY: `from` holds 16 floats; the masks touch only the block's columns (and
            // the bias's, which holds at least as many).
            unsafe {
                let v = _mm512_mul_ps(factor, _mm512_loadu_ps(from.as_ptr()));
                let p = row.add(16 * half);
                let v = match base {
                    Base::Zero => v,
                    Base::Dst => _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p)),
                    Base::Bias(bias) => {
                        _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias.as_ptr().add(16 * half)))
                    }
                };
                _mm512_mask_storeu_ps(p, mask, v);
            }
        }
    }
}

thread_local! {
    /// Each thread's packed block of the left operand, reused across calls.
    static PACKED_LHS: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// `dst = bias + scale * lhs · rhs`, then `epilogue` on each block, as [`super::matmul_then`], on
/// AMX tiles.
///
/// # Safety
/// As [`super::matmul_then`]; and [`available`] must have returned true.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_strides: (isize, isize),
    bias: Option<&[f32]>,
    lhs: Operand,
    rhs: Operand,
    scale: f32,
    parallel: bool,
    epilogue: Epilogue,
) {
    let (m_pairs, n_pairs) = (m.div_ceil(32), n.div_ceil(32));
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let tasks = threads.max(m_pairs.div_ceil(BLOCK_PAIRS)).min(m_pairs);
    let block_pairs = m_pairs.div_ceil(tasks);
    let tasks = m_pairs.div_ceil(block_pairs);
    let dst = SharedMut(dst);
    let mut packed_rhs = Vec::new();
    for start in (0..k).step_by(CHUNK_K) {
        let ks = KRange {
            start,
            blocks: CHUNK_K.min(k - start).div_ceil(TILE_K),
            total: k,
        };
        let tile_len = PARTS * ks.part_len();
        packed_rhs.resize(2 * n_pairs * tile_len, 0);
        let pack = |(t, out): (usize, &mut [u16])| {
            // SAFETY: `rhs` is valid by the caller; `out` is one tile column.
            unsafe { pack_rhs(out, rhs, n, t * TILE_ROWS, ks) }
        };
        if parallel {
            packed_rhs
                .par_chunks_mut(tile_len)
                .enumerate()
                .for_each(pack);
        } else {
            packed_rhs.chunks_mut(tile_len).enumerate().for_each(pack);
        }
        let packed_rhs = &packed_rhs;
        // The epilogue runs once a block is complete, after the last chunk.
        let last = start + CHUNK_K >= k;
        // Later chunks add to what the first wrote.
        let base = |j: usize| match bias {
            _ if start > 0 => Base::Dst,
            Some(bias) => Base::Bias(&bias[j..]),
            None => Base::Zero,
        };
        let task = |block: usize| {
            let first_pair = block * block_pairs;
            let pairs = block_pairs.min(m_pairs - first_pair);
            PACKED_LHS.with_borrow_mut(|packed_lhs| {
                packed_lhs.resize(2 * pairs * tile_len, 0);
                let row0 = first_pair * 32;
                // SAFETY: `lhs` is valid by the caller; `packed_lhs` is 2 * pairs tiles.
                unsafe { pack_lhs(packed_lhs, lhs, m, row0, 2 * pairs, ks) };
                let mut c = [0f32; 1024];
                // SAFETY: AMX is available (the caller checked); the configuration is static.
                unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack)) };
                for np in 0..n_pairs {
                    for mp in 0..pairs {
                        let (i, j) = (row0 + 32 * mp, 32 * np);
                        // Whole blocks of a row-major output, unscaled, go straight between
                        // the accumulators and `dst` (a bias as a row repeated by stride 0).
                        let direct = scale == 1.0
                            && dst_strides.1 == 1
                            && dst_strides.0 > 0
                            && i + 32 <= m
                            && j + 32 <= n;
                        // SAFETY: the configuration is loaded; both packed offsets start whole
                        // pairs of packed tiles; each block is within `dst`, which no other
                        // task writes (tasks own disjoint rows), and a direct one is whole,
                        // as is its bias (`n` long).
                        unsafe {
                            let out = dst
                                .ptr()
                                .offset(i as isize * dst_strides.0 + j as isize * dst_strides.1);
                            let lhs = packed_lhs.as_ptr().add(2 * mp * tile_len);
                            let rhs = packed_rhs.as_ptr().add(2 * np * tile_len);
                            if direct {
                                let block = TileBlock {
                                    ptr: out,
                                    row_bytes: dst_strides.0 as usize * 4,
                                };
                                match base(j) {
                                    Base::Zero => zero_accumulators(),
                                    Base::Dst => load_accumulators(block),
                                    Base::Bias(bias) => load_accumulators(TileBlock {
                                        ptr: bias.as_ptr().cast_mut(),
                                        row_bytes: 0,
                                    }),
                                }
                                products(lhs, rhs, ks.part_len(), ks.blocks);
                                store_accumulators(block);
                                if last {
                                    epilogue.finish(
                                        dst.ptr(),
                                        dst_strides.0 as usize,
                                        (i, j),
                                        (32, 32),
                                    );
                                }
                                continue;
                            }
                            zero_accumulators();
                            products(lhs, rhs, ks.part_len(), ks.blocks);
                            store_accumulators(TileBlock {
                                ptr: c.as_mut_ptr(),
                                row_bytes: 32 * 4,
                            });
                            let (rows, cols) = (32.min(m - i), 32.min(n - j));
                            let block = Block {
                                dst: out,
                                strides: dst_strides,
                                rows,
                                cols,
                            };
                            write_block(&c, block, scale, base(j));
                            if last {
                                epilogue.finish(
                                    dst.ptr(),
                                    dst_strides.0 as usize,
                                    (i, j),
                                    (rows, cols),
                                );
                            }
                        }
                    }
                }
                // SAFETY: releases this thread's tile state; no tile is live.
                unsafe { asm!("tilerelease", options(nostack)) };
            });
        };
        if parallel {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::super::{Epilogue, Operand};
    use super::{available, matmul};

    /// The three layouts of a linear layer's products over `x [r, i]`, `w [o, i]`, `g [r, o]`:
    /// `x · wᵀ`, `g · w`, `gᵀ · x`. Returns (m, n, k, lhs data, rhs data, strides of each).
    #[allow(clippy::type_complexity)]
    fn layout(
        which: usize,
        (r, i, o): (usize, usize, usize),
        rng: &mut ChaCha8Rng,
    ) -> (usize, usize, usize, Vec<f32>, Vec<f32>, [(isize, isize); 2]) {
        let mut random =
            |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let (ri, oi, ro) = (i as isize, i as isize, o as isize);
        match which {
            0 => (r, o, i, random(r * i), random(o * i), [(ri, 1), (1, oi)]),
            1 => (r, i, o, random(r * o), random(o * i), [(ro, 1), (oi, 1)]),
            _ => (o, i, r, random(r * o), random(r * i), [(1, ro), (ri, 1)]),
        }
    }

    /// Each layout at shapes with ragged edges, `k` over several chunks, accumulating and
    /// scaled, against an f64 loop: the error relative to `Σ|a·b|` stays within 4e-6 (f32 itself: ~1e-7).
    #[test]
    #[allow(clippy::print_stderr)] // says why it did not run
    fn products_match_f64_in_every_layout() {
        if !available() {
            eprintln!("skipped: this CPU (or OS) offers no AMX tiles");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for which in 0..3 {
            let shapes = [(70, 65, 100), (33, 200, 17), (96, 40, 1100), (1030, 48, 64)];
            for (case, shape) in shapes.into_iter().enumerate() {
                let (m, n, k, a, b, [sa, sb]) = layout(which, shape, &mut rng);
                let lhs = Operand {
                    ptr: a.as_ptr(),
                    rows: sa.0,
                    cols: sa.1,
                };
                let rhs = Operand {
                    ptr: b.as_ptr(),
                    rows: sb.0,
                    cols: sb.1,
                };
                // Every other shape starts from a bias; `c`'s old contents must never leak in.
                let bias: Vec<f32> = (0..n).map(|v| (v % 7) as f32 - 3.).collect();
                let bias = (case % 2 == 0).then_some(bias.as_slice());
                // The last shape is scaled, which takes the path through a buffer for every block.
                let scale = if case == 3 { 0.5 } else { 1.0 };
                let mut c = vec![f32::NAN; m * n];
                // SAFETY: the operands and `c` have exactly the sizes their strides reach.
                unsafe {
                    matmul(
                        (m, n, k),
                        c.as_mut_ptr(),
                        (n as isize, 1),
                        bias,
                        lhs,
                        rhs,
                        scale,
                        true,
                        Epilogue::None,
                    );
                }
                let mut worst = 0f64;
                for row in 0..m {
                    for col in 0..n {
                        let (mut sum, mut magnitude) = (0f64, 0f64);
                        for t in 0..k {
                            let x =
                                f64::from(a[(row as isize * sa.0 + t as isize * sa.1) as usize]);
                            let y =
                                f64::from(b[(t as isize * sb.0 + col as isize * sb.1) as usize]);
                            sum += x * y;
                            magnitude += (x * y).abs();
                        }
                        let base = bias.map_or(0., |bias| f64::from(bias[col]));
                        let want = base + f64::from(scale) * sum;
                        let err = (f64::from(c[row * n + col]) - want).abs()
                            / (f64::from(scale) * magnitude);
                        worst = worst.max(err);
                    }
                }
                // Dropping `lo·lo` and rounding each `lo` cost up to ~1.1e-5 per term in theory.
                assert!(
                    worst <= 8e-6,
                    "layout {which} {m}x{n}x{k}: error {worst:e} relative to sum |a b|"
                );
            }
        }
    }
}
