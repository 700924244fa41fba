//! MPNet against sentence-transformers on the real all-mpnet-base-v2 (the reference in
//! `tests/fixtures/model/all-mpnet-base-v2.embeddings.json` was produced by sentence-transformers
//! 6.3.0 / torch CPU fp32), and the backward pass of a tiny random MPNet against central
//! differences, as for BERT.

use std::path::Path;

use candle_core::{DType, Device};
use serde::Deserialize;

use super::relative_position_bucket;
use crate::model::bert::tests::{check_gradients, loss, random_checkpoint};
use crate::model::bert::{Bert, BertConfig};
use crate::model::encoder::{EncodePrecision, SentenceEncoder};
use crate::testutil::mpnet_dir;

/// A tiny MPNet's `config.json`. Eight buckets: distances from 2 on already fall in the
/// logarithmic buckets, so a 7-token batch exercises both kinds.
const TINY_CONFIG: &str = r#"{
    "architectures": ["MPNetForMaskedLM"], "model_type": "mpnet", "vocab_size": 50,
    "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 32, "max_position_embeddings": 26, "hidden_act": "gelu",
    "layer_norm_eps": 1e-05, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "relative_attention_num_buckets": 8
}"#;

pub(crate) fn tiny_mpnet(dtype: DType) -> Bert {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.json");
    std::fs::write(&path, TINY_CONFIG).expect("write config");
    let config = BertConfig::from_file(&path).expect("the tiny config parses");
    let checkpoint = random_checkpoint(&config, 7);
    Bert::from_checkpoint(config, checkpoint, dtype, &Device::Cpu).expect("tiny mpnet builds")
}

/// Buckets worked out by hand from transformers' formula (32 buckets, max distance 128): exact
/// up to 7 either side, then `8 + floor(ln(n / 8) / ln(16) * 8)`, capped at 15; keys after the
/// query (positive distance) take the upper half.
#[test]
fn relative_positions_fall_in_transformers_buckets() {
    for (relative, bucket) in [
        (0, 0),
        (-1, 1),
        (-7, 7),
        (-8, 8),
        (-15, 9),
        (-16, 10),
        (-32, 12),
        (-64, 14),
        (-127, 15),
        (-5000, 15),
        (1, 17),
        (7, 23),
        (16, 26),
        (20, 26),
        (32, 28),
        (128, 31),
    ] {
        assert_eq!(
            relative_position_bucket(relative, 32),
            bucket,
            "distance {relative}"
        );
    }
}

#[test]
fn a_tiny_mpnet_has_mpnet_names_and_no_token_types() {
    let mpnet = tiny_mpnet(DType::F32);
    let vars = mpnet.named_vars();
    // Embeddings: words, positions, LayerNorm (2); 16 per layer; the relative bias table.
    assert_eq!(vars.len(), 4 + 2 * 16 + 1);
    assert!(vars.contains_key("encoder.layer.1.attention.attn.o.weight"));
    assert!(vars.contains_key("encoder.relative_attention_bias.weight"));
    assert!(!vars.contains_key("embeddings.token_type_embeddings.weight"));
    assert_eq!(mpnet.config().max_sequence_length(), 24);
}

#[test]
fn every_mpnet_parameter_gets_a_finite_nonzero_gradient() {
    let mpnet = tiny_mpnet(DType::F32);
    mpnet.reseed_dropout(5);
    let grads = loss(&mpnet, true).backward().expect("backward");
    for (name, var) in mpnet.named_vars() {
        let values = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("`{name}` got no gradient"))
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("gradient values");
        assert!(values.iter().all(|v| v.is_finite()), "`{name}`");
        let largest = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        // As in BERT, the key bias's exact gradient is zero (softmax ignores a row shift).
        let floor = if name.ends_with("attn.k.bias") {
            0.
        } else {
            1e-6
        };
        assert!(largest > floor, "`{name}` has a vanishing gradient");
    }
}

/// The relative-position bias table among the checked parameters: its gradient reaches it
/// through every layer's attention and the bucket lookup.
#[test]
fn mpnet_gradients_match_central_differences() {
    let checked = check_gradients(
        &tiny_mpnet(DType::F64),
        &[
            "encoder.relative_attention_bias.weight",
            "embeddings.word_embeddings.weight",
            "embeddings.position_embeddings.weight",
            "embeddings.LayerNorm.bias",
            "encoder.layer.0.attention.attn.q.weight",
            "encoder.layer.0.attention.attn.k.weight",
            "encoder.layer.0.attention.attn.v.bias",
            "encoder.layer.0.attention.attn.o.weight",
            "encoder.layer.0.attention.LayerNorm.weight",
            "encoder.layer.1.intermediate.dense.weight",
            "encoder.layer.1.output.dense.bias",
            "encoder.layer.1.output.LayerNorm.weight",
        ],
    );
    assert_eq!(checked, 36);
}

#[derive(Deserialize)]
struct EmbeddingsReference {
    max_seq_length: usize,
    items: Vec<ReferenceItem>,
}

#[derive(Deserialize)]
struct ReferenceItem {
    text: String,
    input_ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// sentence-transformers' token ids and fp32 embeddings of twelve texts.
fn reference() -> EmbeddingsReference {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model/all-mpnet-base-v2.embeddings.json");
    let text = std::fs::read_to_string(&path).expect("the mpnet fixture");
    serde_json::from_str(&text).expect("fixture parses")
}

/// Twelve texts, one of 384 tokens (every relative-position bucket), the empty one and unicode
/// among them: the same token ids as sentence-transformers and embeddings at cosine >= 0.9999.
#[test]
fn matches_sentence_transformers_token_ids_and_embeddings() {
    let reference = reference();
    let encoder = SentenceEncoder::load(&mpnet_dir(), &Device::Cpu).expect("mpnet loads");
    assert_eq!(encoder.dim(), 768);
    assert_eq!(encoder.max_seq_length(), reference.max_seq_length);

    let texts: Vec<&str> = reference.items.iter().map(|i| i.text.as_str()).collect();
    let ids = encoder
        .sentence_tokenizer()
        .token_ids(&texts)
        .expect("tokenizes");
    for (item, ids) in reference.items.iter().zip(&ids) {
        assert_eq!(ids, &item.input_ids, "token ids of {:?}", item.text);
    }
    let embeddings = encoder.encode(&texts, 5, &mut |_| {}).expect("encodes");
    for (i, item) in reference.items.iter().enumerate() {
        let similarity = cosine(embeddings.row(i), &item.embedding);
        assert!(
            similarity >= 0.9999,
            "cosine {similarity} for {:?}",
            item.text
        );
        let worst = embeddings
            .row(i)
            .iter()
            .zip(&item.embedding)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-5,
            "component off by {worst} for {:?}",
            item.text
        );
    }
}

/// MPNet (its relative-position bias, 768 wide) encoding in bf16 against sentence-transformers'
/// fp32 embeddings of the same twelve texts: each within cosine 0.9999.
#[test]
fn bf16_encoding_stays_within_cosine_0_9999_of_fp32() {
    let reference = reference();
    let encoder = SentenceEncoder::load(&mpnet_dir(), &Device::Cpu)
        .and_then(|encoder| encoder.with_precision(EncodePrecision::Bf16))
        .expect("mpnet loads and packs");
    let texts: Vec<&str> = reference.items.iter().map(|i| i.text.as_str()).collect();
    let embeddings = encoder.encode(&texts, 5, &mut |_| {}).expect("encodes");
    for (i, item) in reference.items.iter().enumerate() {
        let similarity = cosine(embeddings.row(i), &item.embedding);
        assert!(
            similarity >= 0.9999,
            "bf16 ({}) cosine {similarity} for {:?}",
            encoder.bert().bf16_engine().unwrap_or("none"),
            item.text
        );
    }
}
