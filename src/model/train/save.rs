//! Writing a trained model as a folder sentence-transformers loads unchanged: the transformer at
//! the root (`config.json`, `model.safetensors`, tokenizer files), `modules.json`,
//! `1_Pooling/config.json` (and a `2_Normalize` module when the model normalises),
//! `sentence_bert_config.json`, `config_sentence_transformers.json`, a `README.md` model card and
//! `training_metadata.json`; and a trained cross-encoder as a folder sentence-transformers'
//! `CrossEncoder` loads unchanged ([`save_cross_encoder`]).

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::error::TrainError;
use crate::model::bert::Bert;
use crate::model::cross_encoder::CrossEncoder;
use crate::model::pooling::{Pooling, PoolingMode, SentenceModules};

/// The weights file written.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// What the model card and registry read about the training.
pub const METADATA_FILE: &str = "training_metadata.json";

/// Tokenizer files copied from the base model's transformer folder when it has them.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
];

/// `training_metadata.json`: what was trained from what, how, and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingMetadata {
    /// The base model reference, as the recipe gave it.
    pub base_model: String,
    /// blake3 of the training data file(s).
    pub data_hash: String,
    pub examples: usize,
    pub loss: String,
    pub matryoshka_dims: Option<Vec<usize>>,
    pub hyperparameters: serde_json::Value,
    pub steps: u64,
    pub final_loss: Option<f64>,
    pub train_seconds: f64,
    pub peak_rss_bytes: Option<u64>,
    pub device: String,
    pub tool_version: String,
    /// Provenance the caller adds (recipe hash, upstream cache keys).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Writes `bert` with `pooling` into `out` (created if needed) as a sentence-transformers folder,
/// taking the tokenizer and configs from `base_dir` (the model trained from), truncating inputs at
/// `max_seq_length`. `recipe`, the text of the recipe that trained it, goes into the model card.
pub fn save_model(
    bert: &Bert,
    pooling: &Pooling,
    base_dir: &Path,
    max_seq_length: usize,
    out: &Path,
    metadata: &TrainingMetadata,
    recipe: Option<&str>,
) -> Result<(), TrainError> {
    let base = SentenceModules::read(base_dir)?.transformer_dir;
    fs_err::create_dir_all(out)?;
    fs_err::copy(base.join("config.json"), out.join("config.json"))?;
    for name in TOKENIZER_FILES {
        let from = base.join(name);
        if from.is_file() {
            fs_err::copy(&from, out.join(name))?;
        }
    }
    write_weights(bert, &out.join(WEIGHTS_FILE))?;

    let mut modules = vec![
        json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
        json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}),
    ];
    if pooling.normalize() {
        modules.push(json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}));
        fs_err::create_dir_all(out.join("2_Normalize"))?;
    }
    write_json(&out.join("modules.json"), &json!(modules))?;
    fs_err::create_dir_all(out.join("1_Pooling"))?;
    write_json(
        &out.join("1_Pooling/config.json"),
        &pooling_config(pooling, bert.config().hidden_size),
    )?;

    let mut st_config = read_object(&base.join("sentence_bert_config.json"))?;
    st_config.insert("max_seq_length".to_owned(), json!(max_seq_length));
    st_config.entry("do_lower_case").or_insert(json!(false));
    write_json(&out.join("sentence_bert_config.json"), &json!(st_config))?;

    let mut st_meta = read_object(&base_dir.join("config_sentence_transformers.json"))?;
    st_meta.entry("prompts").or_insert(json!({}));
    st_meta.entry("default_prompt_name").or_insert(json!(null));
    st_meta
        .entry("similarity_fn_name")
        .or_insert(json!("cosine"));
    write_json(
        &out.join("config_sentence_transformers.json"),
        &json!(st_meta),
    )?;

    write_json(&out.join(METADATA_FILE), &serde_json::to_value(metadata)?)?;
    write_card(
        out,
        model_card(metadata, bert, pooling, max_seq_length),
        recipe,
    )?;
    Ok(())
}

/// Every parameter and every extra tensor of the checkpoint, in their dtypes.
fn write_weights(bert: &Bert, path: &Path) -> Result<(), TrainError> {
    let mut tensors: Vec<(String, candle_core::Tensor)> = bert
        .named_vars()
        .into_iter()
        .map(|(name, var)| (name, var.as_detached_tensor()))
        .collect();
    tensors.extend(
        bert.extra_tensors()
            .iter()
            .map(|(name, tensor)| (name.clone(), tensor.clone())),
    );
    write_tensors(&tensors, path)
}

/// `tensors` as a safetensors file with the `{"format": "pt"}` metadata transformers expects of
/// a PyTorch-saved file.
fn write_tensors(tensors: &[(String, candle_core::Tensor)], path: &Path) -> Result<(), TrainError> {
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(
        tensors.iter().map(|(name, t)| (name.as_str(), t)),
        Some(metadata),
        path,
    )
    .map_err(|e| TrainError::BadFile {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    give_usual_mode(path)?;
    Ok(())
}

/// safetensors writes through a temporary file, which is created 0600 whatever the umask
/// (safetensors#782): give the weights the mode any new file in their folder gets, so whoever
/// may read the model folder reads every file of it.
#[cfg(unix)]
fn give_usual_mode(path: &Path) -> Result<(), TrainError> {
    let probe = path.with_extension("mode-probe");
    fs_err::File::create(&probe)?;
    let permissions = fs_err::metadata(&probe)?.permissions();
    fs_err::remove_file(&probe)?;
    fs_err::set_permissions(path, permissions)?;
    Ok(())
}

#[cfg(not(unix))]
fn give_usual_mode(_path: &Path) -> Result<(), TrainError> {
    Ok(())
}

/// Writes `model` into `out` (created if needed) as a `BertForSequenceClassification` folder that
/// sentence-transformers' `CrossEncoder` (and transformers) load unchanged: `config.json` (the
/// encoder's, with the architecture, `num_labels` and the label maps), `model.safetensors` (names
/// in [`crate::model::cross_encoder`]), the tokenizer files with `model_max_length` set to the
/// model's truncation, a `README.md` model card and `training_metadata.json`.
pub fn save_cross_encoder(
    model: &CrossEncoder,
    out: &Path,
    metadata: &TrainingMetadata,
    recipe: Option<&str>,
) -> Result<(), TrainError> {
    let base = model.transformer_dir();
    fs_err::create_dir_all(out)?;
    let mut config = read_object(&base.join("config.json"))?;
    config.insert(
        "architectures".to_owned(),
        json!(["BertForSequenceClassification"]),
    );
    config.insert("num_labels".to_owned(), json!(1));
    config.insert("id2label".to_owned(), json!({"0": "LABEL_0"}));
    config.insert("label2id".to_owned(), json!({"LABEL_0": 0}));
    write_json(&out.join("config.json"), &json!(config))?;
    for name in TOKENIZER_FILES {
        let from = base.join(name);
        if from.is_file() && name != "tokenizer_config.json" {
            fs_err::copy(&from, out.join(name))?;
        }
    }
    let mut tokenizer_config = read_object(&base.join("tokenizer_config.json"))?;
    tokenizer_config.insert("model_max_length".to_owned(), json!(model.max_seq_length()));
    write_json(&out.join("tokenizer_config.json"), &json!(tokenizer_config))?;
    write_tensors(&model.tensors(), &out.join(WEIGHTS_FILE))?;
    write_json(&out.join(METADATA_FILE), &serde_json::to_value(metadata)?)?;
    write_card(
        out,
        cross_encoder_card(metadata, model.max_seq_length()),
        recipe,
    )?;
    Ok(())
}

fn cross_encoder_card(meta: &TrainingMetadata, max_seq_length: usize) -> String {
    let hyper = serde_json::to_string_pretty(&meta.hyperparameters).unwrap_or_default();
    let final_loss = meta
        .final_loss
        .map_or_else(|| "n/a".to_owned(), |l| format!("{l:.4}"));
    format!(
        "---\nlibrary_name: sentence-transformers\npipeline_tag: text-ranking\nbase_model: {base}\ntags:\n- sentence-transformers\n- cross-encoder\n- reranker\n- ragd-pipe\n---\n\n\
         # Reranker fine-tuned from {base}\n\n\
         A cross-encoder (`BertForSequenceClassification`, one relevance logit) trained by ragd-pipe \
         {version} on {examples} queries with their positive and mined negative passages (data \
         blake3 `{hash}`). It reads `[CLS] query [SEP] passage [SEP]`, truncated to {max_seq_length} \
         tokens, and reorders a retriever's top results.\n\n\
         - Loss: {loss}\n- Steps: {steps}, final loss {final_loss}, {seconds:.0} s on {device}\n\n\
         ## Usage\n\n```python\nfrom sentence_transformers import CrossEncoder\n\n\
         model = CrossEncoder(\"path/to/this/folder\")\n\
         scores = model.predict([(\"How do I restore a snapshot?\", \"Snapshots are restored with ...\")])\n```\n\n\
         ## Hyperparameters\n\n```json\n{hyper}\n```\n",
        base = meta.base_model,
        version = meta.tool_version,
        examples = meta.examples,
        hash = meta.data_hash,
        loss = meta.loss,
        steps = meta.steps,
        seconds = meta.train_seconds,
        device = meta.device,
    )
}

pub(crate) fn pooling_config(pooling: &Pooling, hidden_size: usize) -> serde_json::Value {
    let on = |mode| pooling.modes().contains(&mode);
    json!({
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": on(PoolingMode::Cls),
        "pooling_mode_mean_tokens": on(PoolingMode::Mean),
        "pooling_mode_max_tokens": on(PoolingMode::Max),
        "pooling_mode_mean_sqrt_len_tokens": on(PoolingMode::MeanSqrtLen),
        "pooling_mode_weightedmean_tokens": on(PoolingMode::WeightedMean),
        "pooling_mode_lasttoken": on(PoolingMode::LastToken),
        "include_prompt": true,
    })
}

fn model_card(
    meta: &TrainingMetadata,
    bert: &Bert,
    pooling: &Pooling,
    max_seq_length: usize,
) -> String {
    let dim = pooling.output_dim(bert.config().hidden_size);
    let hyper = serde_json::to_string_pretty(&meta.hyperparameters).unwrap_or_default();
    let final_loss = meta
        .final_loss
        .map_or_else(|| "n/a".to_owned(), |l| format!("{l:.4}"));
    let matryoshka = meta.matryoshka_dims.as_ref().map_or_else(
        || "no".to_owned(),
        |dims| format!("{dims:?} (truncate embeddings to any of these and renormalise)"),
    );
    format!(
        "---\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity\nbase_model: {base}\ntags:\n- sentence-transformers\n- sentence-similarity\n- ragd-pipe\n---\n\n\
         # Fine-tuned {base}\n\n\
         A sentence-transformers model fine-tuned from `{base}` by ragd-pipe {version} on {examples} \
         (query, passage) training examples (data blake3 `{hash}`).\n\n\
         - Embedding dimension: {dim}; maximum sequence length: {max_seq_length} tokens\n\
         - Loss: {loss}\n- Matryoshka dimensions: {matryoshka}\n\
         - Steps: {steps}, final loss {final_loss}, {seconds:.0} s on {device}\n\n\
         ## Usage\n\n```python\nfrom sentence_transformers import SentenceTransformer\n\n\
         model = SentenceTransformer(\"path/to/this/folder\")\nembeddings = model.encode([\"How do I restore a snapshot?\"])\n```\n\n\
         ## Hyperparameters\n\n```json\n{hyper}\n```\n",
        base = meta.base_model,
        version = meta.tool_version,
        examples = meta.examples,
        hash = meta.data_hash,
        loss = meta.loss,
        steps = meta.steps,
        seconds = meta.train_seconds,
        device = meta.device,
    )
}

/// Writes `README.md` into `out`: `card`, then the recipe that trained the model, if given.
fn write_card(out: &Path, mut card: String, recipe: Option<&str>) -> Result<(), TrainError> {
    if let Some(recipe) = recipe {
        card.push_str(&format!(
            "\n## Recipe\n\n```yaml\n{}\n```\n",
            recipe.trim_end()
        ));
    }
    fs_err::write(out.join("README.md"), card)?;
    Ok(())
}

fn read_object(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>, TrainError> {
    if !path.is_file() {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_str(&fs_err::read_to_string(path)?)? {
        serde_json::Value::Object(map) => Ok(map),
        _ => Err(TrainError::BadFile {
            path: path.to_owned(),
            message: "not a JSON object".to_owned(),
        }),
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), TrainError> {
    fs_err::write(path, serde_json::to_vec_pretty(value)?)?;
    Ok(())
}
