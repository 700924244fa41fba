//! Against PyTorch on the real all-MiniLM-L6-v2: one MultipleNegativesRankingLoss + AdamW step
//! (`tests/fixtures/model/all-MiniLM-L6-v2.mnrl-step.json`, from sentence-transformers 6.2.0 /
//! torch 2.15 CPU fp32), and the saved result loaded back.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use serde::Deserialize;

use super::save::{TrainingMetadata, save_model};
use super::{AdamWConfig, TokenizedExample, TrainConfig, TrainModel, Trainer};
use crate::model::encoder::SentenceEncoder;
use crate::testutil::minilm_dir;

#[derive(Deserialize)]
struct StepReference {
    pairs: Vec<(String, String)>,
    loss: f64,
    grad_norms: BTreeMap<String, f64>,
    adamw: AdamWReference,
    probe_after_one_step: Probe,
}

#[derive(Deserialize)]
struct AdamWReference {
    lr: f64,
    weight_decay: f64,
    betas: (f64, f64),
    eps: f64,
}

#[derive(Deserialize)]
struct Probe {
    text: String,
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

fn metadata() -> TrainingMetadata {
    TrainingMetadata {
        base_model: "sentence-transformers/all-MiniLM-L6-v2".to_owned(),
        data_hash: "0".repeat(64),
        examples: 4,
        loss: "MultipleNegativesRankingLoss".to_owned(),
        matryoshka_dims: None,
        hyperparameters: serde_json::json!({"learning_rate": 2e-5}),
        steps: 1,
        final_loss: Some(0.1),
        train_seconds: 1.,
        peak_rss_bytes: Some(1),
        device: "cpu".to_owned(),
        tool_version: env!("CARGO_PKG_VERSION").to_owned(),
        extra: serde_json::Map::new(),
    }
}

fn tensor_names(path: &Path) -> (Vec<(String, Vec<usize>)>, Option<String>) {
    let bytes = std::fs::read(path).expect("weights");
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("safetensors");
    let mut names: Vec<(String, Vec<usize>)> = header
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.shape.clone()))
        .collect();
    names.sort();
    let format = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("format").cloned());
    (names, format)
}

/// Loss (rel. 1e-3), the listed gradient norms (rel. 1e-2) and the probe embedding after the
/// step (cosine ≥ 0.9999) against PyTorch; every parameter gets a non-zero gradient; the saved
/// folder holds every original tensor and reloads to the same embeddings.
#[test]
fn one_step_matches_pytorch_and_the_saved_model_reloads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model/all-MiniLM-L6-v2.mnrl-step.json");
    let reference: StepReference =
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("parses");
    let base = minilm_dir();
    let encoder = SentenceEncoder::load(&base, &Device::Cpu).expect("MiniLM loads");
    let tokenizer = encoder.sentence_tokenizer();
    let examples: Vec<TokenizedExample> = reference
        .pairs
        .iter()
        .enumerate()
        .map(|(i, (query, passage))| {
            let ids = tokenizer
                .token_ids(&[query.as_str(), passage.as_str()])
                .expect("tokenizes");
            TokenizedExample {
                anchor: ids[0].clone(),
                positive: ids[1].clone(),
                positive_id: i.to_string(),
                negatives: Vec::new(),
                extra_positives: Vec::new(),
                teacher_margins: Vec::new(),
            }
        })
        .collect();
    let config = TrainConfig {
        batch_size: examples.len(),
        learning_rate: reference.adamw.lr,
        adamw: AdamWConfig {
            beta1: reference.adamw.betas.0,
            beta2: reference.adamw.betas.1,
            eps: reference.adamw.eps,
            weight_decay: reference.adamw.weight_decay,
        },
        decay_all: true,
        dropout: false,
        max_grad_norm: None,
        ..TrainConfig::default()
    };
    let model = TrainModel {
        bert: encoder.bert(),
        pooling: encoder.pooling(),
    };
    let mut trainer = Trainer::new(model, config).expect("trainer");
    let batch: Vec<&TokenizedExample> = examples.iter().collect();
    let (loss, grads) = trainer.gradients(&batch, 1).expect("gradients");
    assert!(
        (loss - reference.loss).abs() <= 1e-3 * reference.loss,
        "loss {loss}, pytorch {}",
        reference.loss
    );
    for (param, grad) in trainer.params().iter().zip(&grads) {
        let norm = f64::from(
            grad.sqr()
                .and_then(|g| g.sum_all())
                .and_then(|g| g.sqrt())
                .and_then(|g| g.to_scalar::<f32>())
                .expect("norm"),
        );
        assert!(
            norm > 0. && norm.is_finite(),
            "`{}` gradient norm {norm}",
            param.name
        );
        if let Some(want) = reference.grad_norms.get(&param.name) {
            assert!(
                (norm - want).abs() <= 1e-2 * want,
                "`{}` gradient norm {norm}, pytorch {want}",
                param.name
            );
        }
    }
    assert!(
        reference
            .grad_norms
            .keys()
            .all(|name| trainer.params().iter().any(|p| &p.name == name))
    );
    trainer.apply(grads, reference.adamw.lr, 1).expect("step");

    let texts = [
        reference.probe_after_one_step.text.as_str(),
        "Open the file and iterate.",
    ];
    let trained = encoder.encode(&texts, 8, &mut |_| {}).expect("encodes");
    let similarity = cosine(trained.row(0), &reference.probe_after_one_step.embedding);
    assert!(similarity >= 0.9999, "probe cosine {similarity}");

    let out = tempfile::tempdir().expect("temp dir");
    save_model(
        encoder.bert(),
        encoder.pooling(),
        &base,
        encoder.max_seq_length(),
        out.path(),
        &metadata(),
        Some("name: parity\n"),
    )
    .expect("saves");
    let card = std::fs::read_to_string(out.path().join("README.md")).expect("model card");
    assert!(
        card.contains("base_model: sentence-transformers/all-MiniLM-L6-v2"),
        "{card}"
    );
    assert!(card.contains("name: parity"), "{card}");
    let (original, _) = tensor_names(&base.join("model.safetensors"));
    let (saved, format) = tensor_names(&out.path().join("model.safetensors"));
    assert_eq!(
        saved, original,
        "the saved file holds exactly the original tensors"
    );
    assert_eq!(format.as_deref(), Some("pt"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |name: &str| {
            std::fs::metadata(out.path().join(name))
                .expect("saved file")
                .permissions()
                .mode()
        };
        assert_eq!(
            mode("model.safetensors"),
            mode("config.json"),
            "the weights are as readable as the rest of the folder"
        );
    }
    for name in [
        "config.json",
        "tokenizer.json",
        "vocab.txt",
        "modules.json",
        "1_Pooling/config.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
        "README.md",
        "training_metadata.json",
    ] {
        assert!(out.path().join(name).is_file(), "`{name}` is missing");
    }
    // Every legacy flag, as llama.cpp's converter and older sentence-transformers read them
    // (the converter fails on a missing `pooling_mode_mean_tokens`; issue 13).
    let pooling: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("1_Pooling/config.json")).expect("pooling"),
    )
    .expect("JSON");
    for flag in [
        "pooling_mode_cls_token",
        "pooling_mode_mean_tokens",
        "pooling_mode_max_tokens",
        "pooling_mode_mean_sqrt_len_tokens",
        "pooling_mode_weightedmean_tokens",
        "pooling_mode_lasttoken",
    ] {
        assert!(pooling[flag].is_boolean(), "`{flag}` in {pooling}");
    }
    assert_eq!(pooling["pooling_mode_mean_tokens"], true);
    let reloaded = SentenceEncoder::load(out.path(), &Device::Cpu).expect("the saved model loads");
    assert_eq!(reloaded.max_seq_length(), encoder.max_seq_length());
    assert_eq!(reloaded.pooling(), encoder.pooling());
    let again = reloaded.encode(&texts, 8, &mut |_| {}).expect("encodes");
    assert_eq!(again.as_slice(), trained.as_slice());
}
