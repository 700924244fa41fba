//! Inference products `x · wᵀ` against a bf16 weight matrix packed once, on AMX tiles: one bf16
//! product per f32 product (the weights come from 4- to 8-bit GGUF files, so bf16 loses nothing
//! of them; activations round to bf16, as in any bf16 inference), f32 accumulation.
//!
//! Unlike [`super::amx`], which packs both operands of every call (training products change
//! every step), the weights are packed once at load into the "VNNI" tiles the instruction reads
//! (`bf16::pack_vnni`). A call packs only the activations.
//!
//! Each output element is the same sequence of tile products over `k` whatever the number of
//! rows and wherever a row falls in a tile, so a row's result does not depend on the rows beside
//! it: a sequence decodes the same alone or in a batch.

use std::arch::asm;

use rayon::prelude::*;

use super::SharedMut;
use super::amx::{CONFIG, TileBlock, store_accumulators, zero_accumulators};

/// bf16 per tile row and rows per tile.
const TILE_K: usize = 32;
const TILE_ROWS: usize = 16;
const TILE_ELEMS: usize = TILE_K * TILE_ROWS;
/// Rows of activations per task: 256 rows of a 1536-wide input are 768 KiB packed, in L2.
const BLOCK_ROWS: usize = 256;
/// Column pairs of tiles (32 columns) per task.
const TASK_COLUMN_PAIRS: usize = 4;

/// `v` rounded to the nearest bf16 (ties to even), as bits.
fn bf16_bits(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

/// Rows `row0..row0 + 32` of `x` (`[m, k]`) as two tiles per 32 `k`: `[tile pair][k block][tile]`.
fn pack_rows(x: &[f32], m: usize, k: usize, row0: usize, out: &mut [u16]) {
    let k_blocks = k.div_ceil(TILE_K);
    for half in 0..2 {
        for r in 0..TILE_ROWS {
            let row = row0 + half * TILE_ROWS + r;
            for kb in 0..k_blocks {
                let at = (half * k_blocks + kb) * TILE_ELEMS + r * TILE_K;
                let dst = &mut out[at..at + TILE_K];
                if row >= m {
                    dst.fill(0);
                    continue;
                }
                let src = &x[row * k + kb * TILE_K..row * k + k.min((kb + 1) * TILE_K)];
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = bf16_bits(v);
                }
                dst[src.len()..].fill(0);
            }
        }
    }
}

/// Adds to the accumulators the products of two tiles of rows (`lhs`) and two tiles of columns
/// (`rhs0`, `rhs1`) over `k_blocks` blocks of `k`.
///
/// # Safety
/// The tile configuration must be loaded; `lhs` must hold `2 * k_blocks` tiles, each `rhs`
/// `k_blocks`.
#[inline]
unsafe fn products(lhs: *const u16, rhs0: *const u16, rhs1: *const u16, k_blocks: usize) {
    let second = k_blocks * TILE_ELEMS;
    for kb in 0..k_blocks {
        let at = kb * TILE_ELEMS;
        // SAFETY: by the caller; each load reads one whole tile within the packed operands.
        unsafe {
            asm!(
                "tileloadd tmm4, [{a0} + {stride}*1]",
                "tileloadd tmm6, [{b0} + {stride}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {stride}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {stride}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) lhs.add(at),
                a1 = in(reg) lhs.add(second + at),
                b0 = in(reg) rhs0.add(at),
                b1 = in(reg) rhs1.add(at),
                stride = in(reg) 64usize,
                options(nostack),
            );
        }
    }
}

/// `out = x · wᵀ` for `x` `[m, k]` and `w` packed by `bf16::pack_vnni` from `[n, k]`; `out` is
/// `[m, n]`, only written.
///
/// # Safety
/// [`super::amx::available`] must have returned true; `packed` must come from `bf16::pack_vnni`
/// with the same `n` and `k`.
pub(in crate::model::kernels) unsafe fn matmul(
    x: &[f32],
    packed: &[u16],
    (m, n, k): (usize, usize, usize),
    out: &mut [f32],
) {
    let k_blocks = k.div_ceil(TILE_K);
    let (row_pairs, column_pairs) = (m.div_ceil(32), n.div_ceil(32));
    let mut packed_rows = vec![0u16; row_pairs * 2 * k_blocks * TILE_ELEMS];
    packed_rows
        .par_chunks_mut(2 * k_blocks * TILE_ELEMS)
        .enumerate()
        .for_each(|(pair, dst)| pack_rows(x, m, k, 32 * pair, dst));
    let block_pairs = BLOCK_ROWS / 32;
    let row_blocks = row_pairs.div_ceil(block_pairs);
    let column_tasks = column_pairs.div_ceil(TASK_COLUMN_PAIRS);
    let dst = SharedMut(out.as_mut_ptr());
    let (packed_rows, pair_len) = (&packed_rows, 2 * k_blocks * TILE_ELEMS);
    (0..row_blocks * column_tasks)
        .into_par_iter()
        .for_each(|task| {
            let (block, columns) = (task / column_tasks, task % column_tasks);
            let pairs = block * block_pairs..((block + 1) * block_pairs).min(row_pairs);
            let column_range =
                columns * TASK_COLUMN_PAIRS..((columns + 1) * TASK_COLUMN_PAIRS).min(column_pairs);
            let mut c = [0f32; 1024];
            // SAFETY: AMX is available (the caller's promise); the configuration is static.
            unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack)) };
            for cp in column_range {
                for rp in pairs.clone() {
                    // SAFETY: the configuration is loaded; the packed offsets are whole tiles
                    // within both buffers; `c` is a 32 × 32 block.
                    unsafe {
                        zero_accumulators();
                        let rhs = packed.as_ptr().add(2 * cp * k_blocks * TILE_ELEMS);
                        products(
                            packed_rows.as_ptr().add(rp * pair_len),
                            rhs,
                            rhs.add(k_blocks * TILE_ELEMS),
                            k_blocks,
                        );
                        store_accumulators(TileBlock {
                            ptr: c.as_mut_ptr(),
                            row_bytes: 32 * 4,
                        });
                    }
                    let (i, j) = (32 * rp, 32 * cp);
                    let cols = 32.min(n - j);
                    for r in 0..32.min(m - i) {
                        // SAFETY: row `i + r`, columns `j..j + cols` of `out`, which only this
                        // task writes (tasks own disjoint blocks of rows and columns).
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                c.as_ptr().add(32 * r),
                                dst.ptr().add((i + r) * n + j),
                                cols,
                            );
                        }
                    }
                }
            }
            // SAFETY: releases this thread's tile state; no tile is live.
            unsafe { asm!("tilerelease", options(nostack)) };
        });
}
