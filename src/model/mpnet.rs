//! What MPNet (`sentence-transformers/all-mpnet-base-v2`'s architecture) changes in the BERT
//! encoder of [`crate::model::bert`], which runs both.
//!
//! Ported from Hugging Face transformers' `MPNetModel`
//! (<https://github.com/huggingface/transformers/blob/v4.44.2/src/transformers/models/mpnet/modeling_mpnet.py>).
//! Per layer the computation is BERT's (post-LayerNorm residuals, exact GELU); it differs in
//! - the checkpoint names (`attention.attn.q`/`k`/`v`/`o`, `attention.LayerNorm`), see
//!   [`layer_names`];
//! - no token-type embeddings, and positions numbered from `pad_token_id + 1` as RoBERTa does
//!   (`create_position_ids_from_input_ids`): real tokens, always first under right padding,
//!   get `pad + 1, pad + 2, …`, so `max_position_embeddings - pad - 1` tokens fit. (A literal
//!   pad token inside a text would shift the positions after it there; the tokenizer never
//!   produces one from text);
//! - a relative-position bias added to every layer's attention scores: the query-key distance
//!   put in one of `relative_attention_num_buckets` log-spaced buckets
//!   ([`relative_position_bucket`]), one learned scalar per bucket and head
//!   (`encoder.relative_attention_bias.weight`), shared by all layers ([`position_bias`]).
//!
//! The bias enters the attention kernel as a `[heads, seq, seq]` input
//! ([`crate::model::kernels::attention`]); its gradient flows back through the bucket lookup
//! (`index_select`) to the table, so training updates it like any weight.

use candle_core::{Result, Tensor};

use crate::model::bert::LayerNames;

/// Distances up to this share the outer buckets (transformers' `max_distance`).
const MAX_DISTANCE: i64 = 128;

/// MPNet's checkpoint names of layer `i`'s parameters.
pub(crate) fn layer_names(i: usize) -> LayerNames {
    let name = |part: &str| format!("encoder.layer.{i}.{part}");
    LayerNames {
        query: name("attention.attn.q"),
        key: name("attention.attn.k"),
        value: name("attention.attn.v"),
        attention_output: name("attention.attn.o"),
        attention_norm: name("attention.LayerNorm"),
        intermediate: name("intermediate.dense"),
        output: name("output.dense"),
        output_norm: name("output.LayerNorm"),
    }
}

/// The name of the relative-position bias table, `[buckets, heads]`.
pub(crate) const RELATIVE_ATTENTION_BIAS: &str = "encoder.relative_attention_bias.weight";

/// The bucket of a key `relative` positions after the query (negative: before), as
/// `MPNetEncoder.relative_position_bucket`: half the buckets for keys before the query,
/// half for keys after; within each half, exact distances below a quarter of the buckets, then
/// logarithmically wider ones up to [`MAX_DISTANCE`], the last holding everything further.
/// The logarithm is taken in f32 and truncated, as there, so the boundaries fall where they do
/// in PyTorch.
pub(crate) fn relative_position_bucket(relative: i64, num_buckets: usize) -> u32 {
    let half = (num_buckets / 2) as i64;
    let n = -relative;
    let base = if n < 0 { half } else { 0 };
    let n = n.abs();
    let max_exact = half / 2;
    let within = if n < max_exact {
        n
    } else {
        let ratio = (n as f32 / max_exact as f32).ln()
            / ((MAX_DISTANCE as f64 / max_exact as f64).ln() as f32)
            * (half - max_exact) as f32;
        (max_exact + ratio as i64).min(half - 1)
    };
    (base + within) as u32
}

/// The attention bias `[heads, seq, seq]` of a sequence of `seq` tokens from `table`
/// (`[buckets, heads]`): entry `[h, i, j]` is `table[bucket(j - i), h]`. Positions are
/// counted from 0 whatever the padding, as `compute_position_bias` does without
/// `position_ids`.
pub(crate) fn position_bias(table: &Tensor, seq: usize) -> Result<Tensor> {
    let (num_buckets, heads) = table.dims2()?;
    let buckets: Vec<u32> = (0..seq as i64)
        .flat_map(|i| (0..seq as i64).map(move |j| relative_position_bucket(j - i, num_buckets)))
        .collect();
    let buckets = Tensor::from_vec(buckets, seq * seq, table.device())?;
    table
        .index_select(&buckets, 0)?
        .t()?
        .reshape((heads, seq, seq))
}

#[cfg(test)]
pub(crate) mod tests;
