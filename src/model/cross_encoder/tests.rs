//! Against transformers itself, on the real all-MiniLM-L6-v2: `tests/fixtures/model/
//! all-MiniLM-L6-v2.cross-encoder.json` holds the logits `BertForSequenceClassification` (eval
//! mode) computed for eight pairs with the seeded head in the `.head.safetensors` beside it.

use std::ops::ControlFlow;

use candle_core::Device;
use serde::Deserialize;

use super::*;
use crate::model::train::rerank::{RerankConfig, RerankExample, RerankTrainer};
use crate::model::train::rerank_loss::RerankLoss;
use crate::model::train::save::{TrainingMetadata, save_cross_encoder};
use crate::testutil::minilm_dir;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model")
        .join(name)
}

#[derive(Deserialize)]
struct Reference {
    pairs: Vec<ReferencePair>,
}

#[derive(Deserialize)]
struct ReferencePair {
    query: String,
    passage: String,
    input_ids: Vec<u32>,
    token_type_ids: Vec<u32>,
    logit: f32,
}

fn reference() -> Reference {
    let path = fixture("all-MiniLM-L6-v2.cross-encoder.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("parses")
}

/// MiniLM's encoder with the fixture's classifier, as the reference was computed (128 tokens).
fn reference_model() -> CrossEncoder {
    let options = LoadOptions {
        seed: 0,
        max_seq_length: Some(128),
    };
    let model = CrossEncoder::load(&minilm_dir(), &Device::Cpu, options).expect("MiniLM loads");
    let head = candle_core::safetensors::load(
        fixture("all-MiniLM-L6-v2.cross-encoder.head.safetensors"),
        &Device::Cpu,
    )
    .expect("head tensors");
    let vars = model.named_vars();
    for name in [CLASSIFIER_WEIGHT, CLASSIFIER_BIAS] {
        vars[name]
            .set(&head[name].to_dtype(DType::F32).expect("f32"))
            .expect("same shape");
    }
    model
}

fn pairs(reference: &Reference) -> Vec<(&str, &str)> {
    reference
        .pairs
        .iter()
        .map(|p| (p.query.as_str(), p.passage.as_str()))
        .collect()
}

/// Measured: within 8e-7 of PyTorch on every pair (asserted at 1e-4, the bound).
#[test]
fn reproduces_pytorch_logits_and_token_ids() {
    let reference = reference();
    let model = reference_model();
    assert_eq!(model.origin(), HeadOrigin::Seeded(0));
    assert_eq!(model.max_seq_length(), 128);
    let pairs = pairs(&reference);
    let ids = model.pair_ids(&pairs).expect("tokenizes");
    for (item, ids) in reference.pairs.iter().zip(&ids) {
        assert_eq!(ids.ids, item.input_ids, "ids of {:?}", item.query);
        assert_eq!(
            ids.type_ids, item.token_type_ids,
            "types of {:?}",
            item.query
        );
    }
    // Batches of 3 over 8 pairs of mixed lengths: sorting and padding are both exercised.
    let mut reported = Vec::new();
    let logits = model
        .score(&pairs, 3, &mut |n| reported.push(n))
        .expect("scores");
    assert_eq!(reported, [3, 6, 8]);
    for (item, logit) in reference.pairs.iter().zip(&logits) {
        assert!(
            (logit - item.logit).abs() <= 1e-4,
            "{:?}: {logit}, pytorch {}",
            item.query,
            item.logit
        );
    }
    // The forward with a graph (training path, dropout off) agrees with scoring.
    let rows: Vec<&PairIds> = ids.iter().collect();
    let tracked = model
        .forward(&model.batch(&rows).expect("batch"), false)
        .and_then(|t| t.to_vec1::<f32>().during(|| "values".to_owned()))
        .expect("forward");
    for (a, b) in tracked.iter().zip(&logits) {
        assert!((a - b).abs() < 1e-5, "{a} against {b}");
    }
}

fn metadata() -> TrainingMetadata {
    TrainingMetadata {
        base_model: "sentence-transformers/all-MiniLM-L6-v2".to_owned(),
        data_hash: "0".repeat(64),
        examples: 0,
        loss: RerankLoss::Listwise.name().to_owned(),
        matryoshka_dims: None,
        hyperparameters: serde_json::json!({}),
        steps: 0,
        final_loss: None,
        train_seconds: 0.,
        peak_rss_bytes: None,
        device: "cpu".to_owned(),
        tool_version: env!("CARGO_PKG_VERSION").to_owned(),
        extra: serde_json::Map::new(),
    }
}

/// The folder holds `BertForSequenceClassification`'s names and config keys, and our loader reads
/// it back to the same scores with the head recognised as loaded.
#[test]
fn saves_under_transformers_names_and_loads_back() {
    let reference = reference();
    let model = reference_model();
    let dir = tempfile::tempdir().expect("temp dir");
    save_cross_encoder(&model, dir.path(), &metadata(), Some("name: t\n")).expect("saves");

    let tensors =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)
            .expect("weights");
    for name in [
        POOLER_WEIGHT,
        POOLER_BIAS,
        CLASSIFIER_WEIGHT,
        CLASSIFIER_BIAS,
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight",
        "bert.encoder.layer.5.output.LayerNorm.bias",
    ] {
        assert!(tensors.contains_key(name), "`{name}` is saved");
    }
    assert!(
        tensors
            .keys()
            .all(|name| name.starts_with(ENCODER_PREFIX) || name.starts_with("classifier.")),
        "every name is BertForSequenceClassification's: {:?}",
        tensors.keys().collect::<Vec<_>>()
    );
    assert_eq!(tensors[CLASSIFIER_WEIGHT].dims(), [1, 384]);
    assert_eq!(tensors.len(), 5 + 16 * 6 + 4);

    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(name)).expect("file"))
            .expect("json")
    };
    let config = read("config.json");
    assert_eq!(config["num_labels"], 1);
    assert_eq!(config["id2label"], serde_json::json!({"0": "LABEL_0"}));
    assert_eq!(
        config["architectures"],
        serde_json::json!(["BertForSequenceClassification"])
    );
    assert_eq!(config["hidden_size"], 384);
    assert_eq!(read("tokenizer_config.json")["model_max_length"], 128);
    assert_eq!(read("training_metadata.json")["loss"], metadata().loss);
    let card = std::fs::read_to_string(dir.path().join("README.md")).expect("card");
    assert!(
        card.contains("CrossEncoder(") && card.contains("name: t"),
        "{card}"
    );

    let loaded = CrossEncoder::load(dir.path(), &Device::Cpu, LoadOptions::default())
        .expect("our folder loads");
    assert_eq!(loaded.origin(), HeadOrigin::Loaded);
    assert_eq!(loaded.max_seq_length(), 128, "from tokenizer_config.json");
    let pairs = pairs(&reference);
    let before = model.score(&pairs, 8, &mut |_| {}).expect("scores");
    let after = loaded.score(&pairs, 8, &mut |_| {}).expect("scores");
    assert_eq!(before, after);
}

/// A plain encoder gets a seeded head: the same seed, the same head; another seed, another.
#[test]
fn a_seeded_head_depends_only_on_its_seed() {
    let load = |seed| {
        let options = LoadOptions {
            seed,
            max_seq_length: None,
        };
        let model = CrossEncoder::load(&minilm_dir(), &Device::Cpu, options).expect("loads");
        let weight = model.named_vars()[CLASSIFIER_WEIGHT]
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("values");
        (model.max_seq_length(), weight)
    };
    let (length, first) = load(7);
    assert_eq!(length, 256, "sentence_bert_config.json's limit");
    assert_eq!(first, load(7).1);
    assert_ne!(first, load(8).1);
    // N(0, 0.02²): 384 draws have a standard deviation near 0.02.
    let sd = (first.iter().map(|v| v * v).sum::<f32>() / first.len() as f32).sqrt();
    assert!((0.015..0.025).contains(&sd), "{sd}");
}

/// A few steps on two queries move each positive above its negatives in the held-out score,
/// and every parameter (the token-type table and the head included) receives a gradient.
#[test]
fn training_ranks_positives_first_and_keeps_the_best_weights() {
    let model =
        CrossEncoder::load(&minilm_dir(), &Device::Cpu, LoadOptions::default()).expect("loads");
    let group = |query: &str, positive: &str, negatives: &[&str]| {
        let mut pairs = vec![(query, positive)];
        pairs.extend(negatives.iter().map(|n| (query, *n)));
        let mut ids = model.pair_ids(&pairs).expect("tokenizes").into_iter();
        RerankExample {
            positive: ids.next().expect("the positive"),
            negatives: ids.collect(),
        }
    };
    let examples = vec![
        group(
            "how do I reverse a list",
            "Use list.reverse() to reverse a list in place.",
            &[
                "The tide gauge records water levels.",
                "Tuples are immutable.",
            ],
        ),
        group(
            "what is a hash table",
            "A dictionary maps hashable keys to values using a hash table.",
            &[
                "Perl supports lookahead assertions.",
                "The bridge opened in 1937.",
            ],
        ),
    ];
    let config = RerankConfig {
        epochs: 8,
        batch_size: 2,
        mini_batch_size: 1,
        learning_rate: 1e-4,
        warmup_ratio: 0.,
        dropout: false,
        eval_every: Some(2),
        patience: None,
        loss: RerankLoss::Listwise,
        ..RerankConfig::default()
    };
    let mut trainer = RerankTrainer::new(&model, config).expect("trainer");
    let mut losses = Vec::new();
    let outcome = trainer
        .run(&examples, &examples, &mut |step, _| {
            losses.push(step.loss);
            ControlFlow::Continue(())
        })
        .expect("trains");
    assert_eq!(outcome.steps_run, 8);
    assert_eq!(outcome.evals.len(), 5, "before training and every 2 steps");
    assert!(losses.last() < losses.first(), "the loss falls: {losses:?}");
    let best = outcome.best.expect("a best evaluation");
    assert_eq!(best.mrr, 1.0, "{:?}", outcome.evals);
    let now = crate::model::train::rerank::group_mrr(&model, &examples, 4).expect("scores");
    assert_eq!(now, best.mrr, "the best weights are the ones kept");
}
