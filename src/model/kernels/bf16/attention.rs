//! Self-attention for inference with both of its products in bf16 (`vdpbf16ps`, the linear
//! layers' AVX-512 BF16 kernel): the scores `q · kᵀ` from queries and keys rounded to bf16, the
//! context `p · v` from probabilities and values rounded to bf16, each sum in f32. Part of the
//! bf16 encoding (`encode_precision: bf16`), where the f32 products took a tenth of the time
//! (perf, MiniLM at 128 tokens) at twice the instructions of bf16's. Softmax stays f32 and
//! writes the probabilities as bf16, ready for the second product.
//!
//! Per (sequence, head) task: keys packed as [`super::pack_vnni`] lays out weights `[seq, d]`,
//! values as the layout of `vᵀ` (`[d, seq]`), queries and probabilities as rows padded to 32.

use std::arch::x86_64::*;
use std::cell::RefCell;

use rayon::prelude::*;

use super::{BLOCK_K, Out, dot_pairs};
use crate::model::kernels::fused::{exp, max};

/// One task's buffers, reused across calls; `u32` holds a pair of bf16 (the even `k` in the low
/// half, as `vdpbf16ps` reads them). Per head of the task, one after another:
#[derive(Default)]
struct Scratch {
    /// queries, `seq` rows of `d_pad` bf16;
    queries: Vec<u16>,
    /// keys in VNNI blocks of `[n = seq, k = d]`;
    keys: Vec<u32>,
    /// values in VNNI blocks of `vᵀ`, `[n = d, k = seq]`.
    values: Vec<u32>,
    /// One key rounded, `d_pad` bf16.
    key: Vec<u16>,
    /// Scores, `seq` rows of `seq`.
    scores: Vec<f32>,
    /// Probabilities, `seq` rows of `seq_pad` bf16.
    probs: Vec<u16>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Sizes of one call.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub batch: usize,
    pub seq: usize,
    pub hidden: usize,
    pub heads: usize,
}

/// Whether this CPU runs [`context`]: AVX-512 BF16 (AMX CPUs have it too).
pub(crate) fn available() -> bool {
    dot_pairs::available()
}

/// The attention context `[batch, seq, hidden]` of `qkv` (`[batch, seq, 3 * hidden]`: queries,
/// keys and values side by side): per head `softmax(q · kᵀ * scale + position_bias + mask) · v`.
/// `mask` is `[batch, seq]` (0 where attended, very negative where padded), `position_bias`
/// `[heads, seq, seq]`.
///
/// # Panics
/// Where [`available`] is false, or the slices are not of `dims`.
pub(crate) fn context(
    qkv: &[f32],
    mask: &[f32],
    position_bias: Option<&[f32]>,
    dims: Dims,
    scale: f32,
) -> Vec<f32> {
    let Dims {
        batch,
        seq,
        hidden,
        heads,
    } = dims;
    assert!(available(), "bf16 attention needs AVX-512 BF16");
    assert!(
        hidden % heads == 0 && qkv.len() == batch * seq * 3 * hidden && mask.len() == batch * seq,
        "bf16 attention: qkv of {} and mask of {} values for {batch} x {seq} x {hidden}",
        qkv.len(),
        mask.len()
    );
    if let Some(bias) = position_bias {
        assert_eq!(
            bias.len(),
            heads * seq * seq,
            "a position bias is [heads, seq, seq]"
        );
    }
    // A task per sequence where there are enough of them to share, as its operands are read
    // in one pass over its rows: per (sequence, head), each row's few cache lines lie
    // `3 * hidden` apart, a stride the hardware prefetchers miss (loading them took a third of
    // a head's time outside its products).
    let heads_per_task = if batch >= 2 * rayon::current_num_threads() {
        heads
    } else {
        1
    };
    let tasks_per_sequence = heads / heads_per_task;
    let mut context: Vec<f32> = Vec::with_capacity(batch * seq * hidden);
    let out = Out(context.as_mut_ptr());
    (0..batch * tasks_per_sequence)
        .into_par_iter()
        .for_each(|task| {
            let (b, first) = (
                task / tasks_per_sequence,
                task % tasks_per_sequence * heads_per_task,
            );
            SCRATCH.with_borrow_mut(|scratch| {
                // SAFETY: AVX-512 BF16 is available (asserted); the slices hold `dims`
                // (asserted); this task alone writes its heads' columns of its sequence's rows.
                unsafe {
                    some_heads(
                        scratch,
                        (qkv, &mask[b * seq..(b + 1) * seq], position_bias),
                        dims,
                        (b, first..first + heads_per_task),
                        scale,
                        out.ptr(),
                    );
                }
            });
        });
    // SAFETY: the tasks, one per sequence or (sequence, head), wrote every element.
    unsafe { context.set_len(batch * seq * hidden) };
    context
}

/// The context of heads `heads` of sequence `b` into their columns of `out`.
///
/// # Safety
/// AVX-512 BF16 must be available; `qkv` holds `dims`, `mask` this sequence's `seq` values, a
/// position bias `[heads, seq, seq]`; `out` holds `[batch, seq, hidden]`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,avx512bf16")]
unsafe fn some_heads(
    scratch: &mut Scratch,
    (qkv, mask, position_bias): (&[f32], &[f32], Option<&[f32]>),
    dims: Dims,
    (b, heads): (usize, std::ops::Range<usize>),
    scale: f32,
    out: *mut f32,
) {
    let Dims { seq, hidden, .. } = dims;
    let d = hidden / dims.heads;
    let (d_pad, seq_pad) = (d.next_multiple_of(BLOCK_K), seq.next_multiple_of(BLOCK_K));
    let (query_len, keys_len, values_len) = (
        seq * d_pad,
        seq_pad * d_pad / 2,
        2 * d.div_ceil(32) * seq_pad * 16 / 2,
    );
    let Scratch {
        queries,
        keys,
        values,
        key,
        scores,
        probs,
    } = scratch;
    queries.resize(heads.len() * query_len, 0);
    keys.resize(heads.len() * keys_len, 0);
    values.resize(heads.len() * values_len, 0);
    key.resize(d_pad, 0);
    scores.resize(seq * seq, 0.);
    probs.resize(seq * seq_pad, 0);

    // The operands of every head, reading the sequence's rows in order, two at a time (a pair
    // of values is a `k` pair of `vᵀ`); rows past `seq` are zeros.
    let row = |i: usize, part: usize, head: usize| {
        let at = (b * seq + i) * 3 * hidden + part * hidden + head * d;
        (i < seq).then(|| &qkv[at..at + d])
    };
    for pair in 0..seq_pad / 2 {
        for (slot, head) in heads.clone().enumerate() {
            for i in [2 * pair, 2 * pair + 1] {
                if let Some(q) = row(i, 0, head) {
                    let query = &mut queries[slot * query_len + i * d_pad..][..d_pad];
                    // SAFETY: AVX-512 BF16 is available (the caller's promise); `query` holds
                    // `d_pad >= d`.
                    unsafe { dot_pairs::round_row(q, query) };
                    query[d..].fill(0);
                }
                pack_key(
                    &mut keys[slot * keys_len..][..keys_len],
                    key,
                    i,
                    row(i, 1, head),
                );
            }
            let values = &mut values[slot * values_len..][..values_len];
            pack_value_pair(
                values,
                pair,
                d,
                [row(2 * pair, 2, head), row(2 * pair + 1, 2, head)],
            );
        }
    }

    for (slot, head) in heads.enumerate() {
        // SAFETY: `queries` holds `seq` rows of `d_pad` for each head, `keys` the VNNI blocks of
        // `[seq_pad, d_pad]`, `scores` `seq` rows of `seq`.
        unsafe {
            dot_pairs::product(
                queries[slot * query_len..].as_ptr(),
                d_pad,
                seq,
                keys[slot * keys_len..].as_ptr().cast(),
                seq,
                scores.as_mut_ptr(),
                seq,
            );
        }
        let bias = position_bias.map(|bias| &bias[head * seq * seq..(head + 1) * seq * seq]);
        for (i, (scores, probs)) in scores
            .chunks_exact_mut(seq)
            .zip(probs.chunks_exact_mut(seq_pad))
            .enumerate()
        {
            softmax_row(
                scores,
                scale,
                mask,
                bias.map(|bias| &bias[i * seq..][..seq]),
                probs,
            );
        }
        // SAFETY: `probs` holds `seq` rows of `seq_pad` (zeros past `seq`), `values` the VNNI
        // blocks of `[d, seq_pad]`; the head's `d` columns of the sequence's rows (stride
        // `hidden`) are within `out`.
        unsafe {
            dot_pairs::product(
                probs.as_ptr(),
                seq_pad,
                seq,
                values[slot * values_len..].as_ptr().cast(),
                d,
                out.add(b * seq * hidden + head * d),
                hidden,
            );
        }
    }
}

/// Key `i` (`d` values, or zeros where `None`) into the VNNI blocks of `[n = seq, k = d]`: per 16
/// keys, per 32 `k`, 16 pairs of the 16 keys. `rounded` holds `d_pad` bf16.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,avx512bf16")]
fn pack_key(keys: &mut [u32], rounded: &mut [u16], i: usize, key: Option<&[f32]>) {
    match key {
        Some(key) => {
            // SAFETY: AVX-512 BF16 is available (this function's features); `rounded` holds
            // `d_pad >= d` values.
            unsafe { dot_pairs::round_row(key, rounded) };
            rounded[key.len()..].fill(0);
        }
        None => rounded.fill(0),
    }
    let pairs = rounded.len() / 2;
    let block = &mut keys[(i / 16) * pairs * 16..][..pairs * 16];
    for p in 0..pairs {
        let pair = u32::from(rounded[2 * p]) | (u32::from(rounded[2 * p + 1]) << 16);
        block[(p / 16) * 256 + (p % 16) * 16 + i % 16] = pair;
    }
}

/// Rows `2 pair` and `2 pair + 1` of the values (`d` each, or zeros where `None`) into the VNNI
/// blocks of `vᵀ` (`[n = d, k = seq]`): per 16 columns of `v`, per 32 rows, 16 pairs of rows
/// side by side.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,avx512bf16")]
fn pack_value_pair(values: &mut [u32], pair: usize, d: usize, rows: [Option<&[f32]>; 2]) {
    let groups = 2 * d.div_ceil(32);
    let pairs = values.len() / groups / 16;
    for (group, block) in values.chunks_exact_mut(pairs * 16).enumerate() {
        let columns = d.saturating_sub(16 * group).min(16);
        let lanes = ((1u32 << columns) - 1) as u16;
        let widen = |row: Option<&[f32]>| {
            let v = match row {
                // SAFETY: the masked lanes are the group's columns of the row, within it.
                Some(row) if columns > 0 => unsafe {
                    _mm512_maskz_loadu_ps(lanes, row.as_ptr().add(16 * group))
                },
                _ => _mm512_setzero_ps(),
            };
            // SAFETY: bf16 bits are 16-bit integers.
            let bits: __m256i = unsafe { std::mem::transmute(_mm512_cvtneps_pbh(v)) };
            _mm512_cvtepu16_epi32(bits)
        };
        let (even, odd) = (widen(rows[0]), widen(rows[1]));
        let both = _mm512_or_si512(even, _mm512_slli_epi32::<16>(odd));
        // SAFETY: the pair's 16 values are within the block.
        unsafe { _mm512_storeu_si512(block[pair * 16..][..16].as_mut_ptr().cast(), both) };
    }
}

/// Probabilities of one row of scores, `softmax(scores * scale + bias + mask)`, rounded to bf16
/// into `probs` (`seq_pad`, a multiple of 16: zeros past `seq`); the exponentials stay in
/// `scores`.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,avx512bf16")]
fn softmax_row(
    scores: &mut [f32],
    scale: f32,
    mask: &[f32],
    bias: Option<&[f32]>,
    probs: &mut [u16],
) {
    match bias {
        Some(bias) => {
            for ((v, &m), &b) in scores.iter_mut().zip(mask).zip(bias) {
                *v = *v * scale + b + m;
            }
        }
        None => {
            for (v, &m) in scores.iter_mut().zip(mask) {
                *v = *v * scale + m;
            }
        }
    }
    let top = max(scores);
    let mut lanes = [0f32; 16];
    let mut chunks = scores.chunks_exact_mut(16);
    for chunk in &mut chunks {
        for (sum, v) in lanes.iter_mut().zip(chunk) {
            *v = exp(*v - top);
            *sum += *v;
        }
    }
    let mut total = 0f32;
    for v in chunks.into_remainder() {
        *v = exp(*v - top);
        total += *v;
    }
    let inv = _mm512_set1_ps(1.0 / (lanes.iter().sum::<f32>() + total));
    // Normalised and rounded in one pass, 16 at a time (the last masked), zeros after.
    for (c, out) in probs.chunks_exact_mut(16).enumerate() {
        let count = scores.len().saturating_sub(16 * c).min(16);
        let lanes = ((1u32 << count) - 1) as u16;
        let v = if count > 0 {
            // SAFETY: the masked lanes are within `scores`.
            unsafe { _mm512_maskz_loadu_ps(lanes, scores.as_ptr().add(16 * c)) }
        } else {
            _mm512_setzero_ps()
        };
        // SAFETY: bf16 bits are 16-bit integers; `out` holds 16.
        unsafe {
            let bits: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_mul_ps(v, inv)));
            _mm256_storeu_si256(out.as_mut_ptr().cast(), bits);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn round(v: f32) -> f64 {
        f64::from(half::bf16::from_f32(v).to_f32())
    }

    /// Each context value within bf16 rounding of the probabilities of an f64 attention over the
    /// bf16-rounded queries, keys and values: `|out - exact| <= 2^-8 Σ p |v| + 1e-5`, for
    /// ragged shapes (sequences off 16 and 32, head widths 32 and 64 and off them), padding
    /// masked and a position bias.
    #[test]
    #[allow(clippy::print_stderr)] // says why it did not run
    fn context_matches_f64_over_the_rounded_operands() {
        if !available() {
            eprintln!("skipped: no AVX-512 BF16 on this CPU");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for (batch, seq, heads, d, with_bias) in [
            (2, 7, 2, 32, false),
            (5, 45, 3, 32, true),
            (2, 128, 12, 32, false),
            (1, 70, 2, 64, true),
            (2, 33, 2, 24, false),
        ] {
            let hidden = heads * d;
            let qkv: Vec<f32> = (0..batch * seq * 3 * hidden)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            // The last few positions of the second sequence are padding.
            let mask: Vec<f32> = (0..batch * seq)
                .map(|i| if i >= 2 * seq - seq / 4 { f32::MIN } else { 0. })
                .collect();
            let bias: Option<Vec<f32>> = with_bias.then(|| {
                (0..heads * seq * seq)
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect()
            });
            let scale = 1. / (d as f32).sqrt();
            let dims = Dims {
                batch,
                seq,
                hidden,
                heads,
            };
            let out = context(&qkv, &mask, bias.as_deref(), dims, scale);
            let at = |b: usize, i: usize, part: usize, h: usize, j: usize| {
                round(qkv[(b * seq + i) * 3 * hidden + part * hidden + h * d + j])
            };
            for b in 0..batch {
                for h in 0..heads {
                    for i in 0..seq {
                        let logits: Vec<f64> = (0..seq)
                            .map(|j| {
                                let dot: f64 =
                                    (0..d).map(|x| at(b, i, 0, h, x) * at(b, j, 1, h, x)).sum();
                                let bias = bias
                                    .as_ref()
                                    .map_or(0., |bias| f64::from(bias[(h * seq + i) * seq + j]));
                                dot * f64::from(scale) + bias + f64::from(mask[b * seq + j])
                            })
                            .collect();
                        let top = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
                        let total: f64 = e.iter().sum();
                        for x in 0..d {
                            let (mut exact, mut magnitude) = (0f64, 0f64);
                            for (j, e) in e.iter().enumerate() {
                                let (p, v) = (e / total, at(b, j, 2, h, x));
                                exact += p * v;
                                magnitude += p * v.abs();
                            }
                            let got = f64::from(out[(b * seq + i) * hidden + h * d + x]);
                            assert!(
                                (got - exact).abs() <= magnitude / 256. + 1e-5,
                                "({batch}, {seq}, {heads}, {d}) at b {b} head {h} row {i} column {x}: {got} vs {exact}"
                            );
                        }
                    }
                }
            }
        }
    }
}
