//! Exact (erf) GELU and its derivative, elementwise. The forward runs as the epilogue of the
//! intermediate layer's product (`linear_gelu`), on each block while it is in cache; the backward
//! is one parallel pass.

use std::mem::MaybeUninit;

use super::math::{erf, exp};
use super::{CHUNK, filled, multiversion};

/// `1 / sqrt(2)` and `1 / sqrt(2 pi)`.
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + erf(v * FRAC_1_SQRT_2))
}

multiversion! {
    /// GELU of every element of `rows`, in place.
    pub(super) fn rows_in_place(rows: &mut [&mut [f32]]) {
        for row in rows.iter_mut() {
            for v in row.iter_mut() {
                *v = gelu(*v);
            }
        }
    }
}

multiversion! {
    /// GELU of every element of `values`, in place (the epilogue of bf16 products).
    pub(crate) fn in_place(values: &mut [f32]) {
        for v in values.iter_mut() {
            *v = gelu(*v);
        }
    }
}

multiversion! {
    /// GELU of `rows` into `out`, row by row; writes every element of `out` where the rows are
    /// as long.
    pub(super) fn rows_into(rows: &[&[f32]], out: &mut [&mut [MaybeUninit<f32>]]) {
        for (row, out) in rows.iter().zip(out.iter_mut()) {
            for (o, &v) in out.iter_mut().zip(row.iter()) {
                o.write(gelu(v));
            }
        }
    }
}

multiversion! {
    /// `grad * (Φ(x) + x φ(x))`, into every element of `out` (as long as `x` and `grad`).
    fn backward_chunk(x: &[f32], grad: &[f32], out: &mut [MaybeUninit<f32>]) {
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(grad) {
            let cdf = 0.5 * (1.0 + erf(v * FRAC_1_SQRT_2));
            let pdf = FRAC_1_SQRT_2PI * exp(-0.5 * v * v);
            o.write(g * (cdf + v * pdf));
        }
    }
}

/// The gradient of GELU's input `x` given its output's, `grad` (as long).
pub(super) fn backward(x: &[f32], grad: &[f32]) -> Vec<f32> {
    let len = x.len().min(grad.len());
    // SAFETY: chunk `i` of the output is as long as chunk `i` of `x` and `grad`, filled from them.
    unsafe {
        filled(len, CHUNK, |i, out| {
            let range = i * CHUNK..i * CHUNK + out.len();
            backward_chunk(&x[range.clone()], &grad[range], out)
        })
    }
}
