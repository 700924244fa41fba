//! Our BERT sentence encoder as llama.cpp's `bert` architecture, and back.
//!
//! [`export_bert`] writes what llama.cpp's converter (`convert_hf_to_gguf.py`, class
//! `BertModel`) writes for a sentence-transformers BERT folder, at llama.cpp commit
//! [`CONVERTER_COMMIT`] (`conversion/bert.py`, `conversion/base.py`, `gguf-py/gguf/vocab.py`):
//!
//! | key | value |
//! |---|---|
//! | `general.architecture`, `general.type` | `bert`, `model` |
//! | `general.name`, `general.size_label` | the model's name; parameters written, as `23M` |
//! | `bert.block_count`, `bert.context_length`, `bert.embedding_length`, `bert.feed_forward_length`, `bert.attention.head_count` | u32 from `config.json` |
//! | `bert.attention.layer_norm_epsilon` | f32 |
//! | `general.file_type` | 0 (f32), 1 (f16), 7 (q8_0) |
//! | `bert.attention.causal`, `bert.pooling_type` | false; 1 mean, 2 cls, 3 last token (`1_Pooling/config.json`) |
//! | `general.quantization_version` | 2 |
//! | `tokenizer.ggml.token_type_count` | `type_vocab_size` |
//! | `tokenizer.ggml.model`, `tokenizer.ggml.pre` | `bert`; the pre-tokenizer named by the hash of the converter's check text |
//! | `tokenizer.ggml.tokens`, `tokenizer.ggml.token_type` | the WordPiece vocabulary in "phantom space" form (`##ing` → `ing`, `word` → `▁word`, control tokens unchanged); i32 types |
//! | `tokenizer.ggml.{bos,eos,unknown,seperator,padding,mask}_token_id`, `tokenizer.ggml.add_{bos,eos,sep}_token` | from `tokenizer_config.json`, `tokenizer.json`'s post-processor and `config.json`, as gguf-py's `SpecialVocab` reads them |
//!
//! Tensors are renamed (`encoder.layer.3.attention.self.query.weight` → `blk.3.attn_q.weight`,
//! …), the pooler is dropped, and each gets the converter's type: 1-D tensors, norms,
//! `position_embd` and `token_types` stay f32; the other matrices take the file's type (q8_0
//! falls back to f16 for a row length that is not a multiple of 32).
//!
//! What the converter would write and we do not: `general.basename`, `general.finetune`,
//! `general.license`, `general.tags` and the other model-card fields its `Metadata` class guesses
//! from the README's front matter and the folder name; they do not affect loading.
//!
//! [`import_bert`] reads such a file back into a sentence-transformers folder: the tensors renamed
//! back and dequantised to f32, `config.json` from the `bert.*` keys, a WordPiece `tokenizer.json`
//! from the vocabulary (lower-casing, as llama.cpp's WordPiece tokenizer does), the pooling from
//! `bert.pooling_type`, and L2 normalisation (Ollama's `/api/embed` normalises too).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Digest;
use tokenizers::Tokenizer;

use super::file::GgufWriter;
use crate::model::bert::Bert;
use crate::model::error::{CandleContext, ModelError};
use crate::model::pooling::{Pooling, PoolingMode, SentenceModules};

/// The llama.cpp commit whose `convert_hf_to_gguf.py` this module follows.
pub const CONVERTER_COMMIT: &str = "00bd27a621f92be9a99d24d7c5117a263b9b3c01";

/// The type of a GGUF file's matrices (`--outtype` of llama.cpp's converter).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum GgufType {
    /// 32-bit floats: exactly our weights, twice the size of f16.
    #[serde(rename = "f32")]
    F32,
    /// 16-bit floats: what llama.cpp's converter writes by default.
    #[default]
    #[serde(rename = "f16")]
    F16,
    /// 8-bit blocks of 32 with an f16 scale: half of f16's size.
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl GgufType {
    pub const ALL: [Self; 3] = [Self::F32, Self::F16, Self::Q8_0];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
        }
    }

    /// llama.cpp's `llama_ftype`, written as `general.file_type`.
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
        }
    }

    fn matrix_dtype(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Q8_0 => GgmlDType::Q8_0,
        }
    }
}

impl std::fmt::Display for GgufType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for GgufType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s.to_ascii_lowercase())
            .ok_or_else(|| format!("`{s}` is not a GGUF type (f32, f16, q8_0)"))
    }
}

/// What [`export_bert`] wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportedGguf {
    pub path: PathBuf,
    pub gguf_type: GgufType,
    pub tensors: usize,
    pub parameters: u64,
    pub bytes: u64,
    /// `bert.pooling_type` as a word: `mean`, `cls` or `last`.
    pub pooling: String,
    /// `tokenizer.ggml.pre`.
    pub tokenizer_pre: String,
}

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// Our checkpoint names of the embedding tensors and their GGUF names (gguf-py's
/// `tensor_mapping.py`, BERT rows).
const GLOBAL_TENSORS: [(&str, &str); 4] = [
    ("embeddings.word_embeddings", "token_embd"),
    ("embeddings.token_type_embeddings", "token_types"),
    ("embeddings.position_embeddings", "position_embd"),
    ("embeddings.LayerNorm", "token_embd_norm"),
];

/// The same for each layer `encoder.layer.{i}.` ↔ `blk.{i}.`.
const LAYER_TENSORS: [(&str, &str); 8] = [
    ("attention.self.query", "attn_q"),
    ("attention.self.key", "attn_k"),
    ("attention.self.value", "attn_v"),
    ("attention.output.dense", "attn_output"),
    ("attention.output.LayerNorm", "attn_output_norm"),
    ("intermediate.dense", "ffn_up"),
    ("output.dense", "ffn_down"),
    ("output.LayerNorm", "layer_output_norm"),
];

/// The GGUF name of one of our parameters (`….weight` or `….bias`).
pub(crate) fn gguf_tensor_name(name: &str) -> Option<String> {
    let (stem, suffix) = name.rsplit_once('.')?;
    if let Some((_, gguf)) = GLOBAL_TENSORS.iter().find(|(ours, _)| *ours == stem) {
        return Some(format!("{gguf}.{suffix}"));
    }
    let rest = stem.strip_prefix("encoder.layer.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, gguf) = LAYER_TENSORS.iter().find(|(ours, _)| *ours == part)?;
    Some(format!("blk.{layer}.{gguf}.{suffix}"))
}

/// The inverse of [`gguf_tensor_name`].
pub(crate) fn hf_tensor_name(name: &str) -> Option<String> {
    let (stem, suffix) = name.rsplit_once('.')?;
    if let Some((ours, _)) = GLOBAL_TENSORS.iter().find(|(_, gguf)| *gguf == stem) {
        return Some(format!("{ours}.{suffix}"));
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (ours, _) = LAYER_TENSORS.iter().find(|(_, gguf)| *gguf == part)?;
    Some(format!("encoder.layer.{layer}.{ours}.{suffix}"))
}

/// The type the converter gives a tensor (`ModelBase.prepare_tensors`): f32 for vectors, norms,
/// position and token-type embeddings; the file's type for the other matrices, falling back to
/// f16 when a row does not split into quantisation blocks.
fn tensor_dtype(gguf_name: &str, dims: &[usize], gguf_type: GgufType) -> GgmlDType {
    let always_f32 = dims.len() <= 1
        || gguf_name.ends_with("_norm.weight")
        || gguf_name == "position_embd.weight"
        || gguf_name == "token_types.weight"
        || !gguf_name.ends_with(".weight");
    if always_f32 {
        return GgmlDType::F32;
    }
    let dtype = gguf_type.matrix_dtype();
    let row = dims.last().copied().unwrap_or(0);
    if row.is_multiple_of(dtype.block_size()) {
        dtype
    } else {
        GgmlDType::F16
    }
}

/// gguf-py's `size_label`: the parameter count with two significant digits at least (`23M`).
fn size_label(parameters: u64) -> String {
    let count = parameters as f64;
    let (scaled, suffix) = if count > 1e12 {
        (count * 1e-12, "T")
    } else if count > 1e9 {
        (count * 1e-9, "B")
    } else if count > 1e6 {
        (count * 1e-6, "M")
    } else {
        (count * 1e-3, "K")
    };
    let digits = format!("{}", scaled.round() as u64).len();
    let decimals = 2usize.saturating_sub(digits);
    format!("{scaled:.decimals$}{suffix}")
}

fn gguf_error(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Gguf {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Why the model in `model_dir` cannot become a GGUF file, if it cannot: llama.cpp's `bert`
/// architecture has no relative-position bias, so an MPNet model would embed differently there.
pub fn not_exportable(model_dir: &Path) -> Result<Option<String>, ModelError> {
    let modules = SentenceModules::read(model_dir)?;
    let config: serde_json::Value =
        crate::model::config_file::read_json(&modules.transformer_dir.join("config.json"))?;
    Ok(match config["model_type"].as_str() {
        Some("mpnet") => Some(
            "an MPNet model: llama.cpp's `bert` architecture has no relative-position bias"
                .to_owned(),
        ),
        _ => None,
    })
}

/// Writes the sentence-transformers BERT folder `model_dir` as a GGUF file `out` of type
/// `gguf_type`, named `name` inside. The file appears whole or not at all (written beside `out`,
/// then renamed).
pub fn export_bert(
    model_dir: &Path,
    out: &Path,
    gguf_type: GgufType,
    name: &str,
) -> Result<ExportedGguf, ModelError> {
    let modules = SentenceModules::read(model_dir)?;
    let (pooling_type, pooling) = llama_pooling(&modules.pooling, model_dir)?;
    let dir = &modules.transformer_dir;
    let bert = Bert::load(dir, &Device::Cpu)?;
    let config = bert.config().clone();
    if config.is_mpnet() {
        return Err(ModelError::UnsupportedConfig {
            path: dir.join("config.json"),
            key: "model_type".to_owned(),
            value: "mpnet".to_owned(),
            supported: "`bert`: the GGUF is llama.cpp's `bert` architecture, which has no \
                        relative-position bias"
                .to_owned(),
        });
    }
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer =
        Tokenizer::from_file(&tokenizer_path).map_err(|source| ModelError::Tokenizer {
            path: tokenizer_path.clone(),
            source,
        })?;

    let mut tensors = Vec::new();
    for (name, var) in bert.named_vars() {
        let gguf_name = gguf_tensor_name(&name)
            .ok_or_else(|| gguf_error(dir, format!("no GGUF name for tensor `{name}`")))?;
        let tensor = var.as_detached_tensor();
        let dtype = tensor_dtype(&gguf_name, tensor.dims(), gguf_type);
        let quantized = QTensor::quantize(&tensor, dtype)
            .during(|| format!("converting `{name}` to {dtype:?}"))?;
        tensors.push((gguf_name, quantized));
    }
    let parameters: u64 = tensors
        .iter()
        .map(|(_, t)| t.shape().elem_count() as u64)
        .sum();

    let u32_of = |n: usize| Value::U32(u32::try_from(n).unwrap_or(u32::MAX));
    let mut writer = GgufWriter::new("bert");
    writer.add("general.type", Value::String("model".to_owned()));
    writer.add("general.name", Value::String(name.to_owned()));
    writer.add("general.size_label", Value::String(size_label(parameters)));
    writer.add("bert.block_count", u32_of(config.num_hidden_layers));
    writer.add(
        "bert.context_length",
        u32_of(config.max_position_embeddings),
    );
    writer.add("bert.embedding_length", u32_of(config.hidden_size));
    writer.add("bert.feed_forward_length", u32_of(config.intermediate_size));
    writer.add(
        "bert.attention.head_count",
        u32_of(config.num_attention_heads),
    );
    writer.add(
        "bert.attention.layer_norm_epsilon",
        Value::F32(config.layer_norm_eps as f32),
    );
    writer.add("general.file_type", Value::U32(gguf_type.file_type()));
    writer.add("bert.attention.causal", Value::Bool(false));
    writer.add("bert.pooling_type", Value::U32(pooling_type));
    writer.add("general.quantization_version", Value::U32(2));
    writer.add(
        "tokenizer.ggml.token_type_count",
        u32_of(config.type_vocab_size),
    );
    let tokenizer_pre = tokenizer_pre(&tokenizer, &tokenizer_path)?;
    let (tokens, types) = vocabulary(&tokenizer, config.vocab_size, &tokenizer_path)?;
    writer.add("tokenizer.ggml.model", Value::String("bert".to_owned()));
    writer.add("tokenizer.ggml.pre", Value::String(tokenizer_pre.clone()));
    writer.add(
        "tokenizer.ggml.tokens",
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    );
    writer.add(
        "tokenizer.ggml.token_type",
        Value::Array(types.into_iter().map(Value::I32).collect()),
    );
    let special = SpecialVocab::read(dir, config.vocab_size)?;
    for (kind, id) in &special.ids {
        if let Some(key) = special_id_key(kind) {
            writer.add(key, Value::U32(*id));
        }
    }
    for (kind, add) in &special.add {
        if matches!(*kind, "bos" | "eos" | "sep") {
            writer.add(
                format!("tokenizer.ggml.add_{kind}_token"),
                Value::Bool(*add),
            );
        }
    }
    for (gguf_name, tensor) in tensors {
        writer.add_tensor(gguf_name, tensor);
    }

    let tensor_count = writer.tensors().len();
    let bytes = write_atomically(out, &writer)?;
    Ok(ExportedGguf {
        path: out.to_owned(),
        gguf_type,
        tensors: tensor_count,
        parameters,
        bytes,
        pooling: pooling.to_owned(),
        tokenizer_pre,
    })
}

fn write_atomically(out: &Path, writer: &GgufWriter) -> Result<u64, ModelError> {
    let parent = match out.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    fs_err::create_dir_all(parent)?;
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let partial = parent.join(format!(".{file_name}.{}.partial", std::process::id()));
    let written = (|| {
        let file = fs_err::File::create(&partial)?;
        let mut buffered = std::io::BufWriter::new(file);
        writer
            .write(&mut buffered)
            .map_err(|message| gguf_error(&partial, message))?;
        let file = buffered
            .into_inner()
            .map_err(|e| ModelError::Io(e.into_error()))?;
        file.sync_all()?;
        fs_err::rename(&partial, out)?;
        Ok::<_, ModelError>(fs_err::metadata(out)?.len())
    })();
    if written.is_err() {
        let _ = fs_err::remove_file(&partial);
    }
    written
}

/// `bert.pooling_type` for our pooling, as the converter's `_try_set_pooling_type` picks it
/// (mean, else cls, else last token). Unlike the converter, a pooling that concatenates modes
/// llama.cpp cannot run (mean and max, …) is refused rather than silently reduced to one.
fn llama_pooling(pooling: &Pooling, model_dir: &Path) -> Result<(u32, &'static str), ModelError> {
    match pooling.modes() {
        [PoolingMode::Mean] => Ok((1, "mean")),
        [PoolingMode::Cls] => Ok((2, "cls")),
        [PoolingMode::LastToken] => Ok((3, "last")),
        modes => Err(ModelError::UnsupportedConfig {
            path: model_dir.join("1_Pooling/config.json"),
            key: "pooling_mode_*".to_owned(),
            value: format!("{modes:?}"),
            supported: "exactly one of mean, cls or last token (what llama.cpp pools by)"
                .to_owned(),
        }),
    }
}

/// The check text of the converter's `get_vocab_base_pre`: its tokens' hash names the
/// pre-tokenizer.
const CHECK_TEXT: &str = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u{200d}🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL";

/// The WordPiece entries of the converter's hash table (the last match wins there, as here).
/// `0876d13b…` is the `bert-base-uncased` vocabulary of bge-small-en-v1.5, jina-v2-en and
/// all-MiniLM-L6-v2.
const KNOWN_PRE_TOKENIZERS: [(&str, &str); 2] = [
    (
        "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f",
        "jina-v2-en",
    ),
    (
        "8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7",
        "bert-bge-large",
    ),
];

/// `tokenizer.ggml.pre`: the name the converter gives the hash of the check text's token ids
/// (Python's `str(list)` of them). For a vocabulary it does not know the converter stops; we
/// write `default`, which llama.cpp's WordPiece tokenizer ignores anyway.
fn tokenizer_pre(tokenizer: &Tokenizer, path: &Path) -> Result<String, ModelError> {
    let hash = check_text_hash(tokenizer, path)?;
    Ok(KNOWN_PRE_TOKENIZERS
        .iter()
        .rev()
        .find(|(known, _)| *known == hash)
        .map_or("default", |(_, name)| name)
        .to_owned())
}

pub(crate) fn check_text_hash(tokenizer: &Tokenizer, path: &Path) -> Result<String, ModelError> {
    let mut plain = tokenizer.clone();
    plain.with_padding(None);
    plain
        .with_truncation(None)
        .map_err(|source| ModelError::Tokenizer {
            path: path.to_owned(),
            source,
        })?;
    let encoding = plain
        .encode(CHECK_TEXT, true)
        .map_err(|source| ModelError::Tokenize { source })?;
    let ids: Vec<String> = encoding.get_ids().iter().map(u32::to_string).collect();
    let text = format!("[{}]", ids.join(", "));
    Ok(format!("{:x}", sha2::Sha256::digest(text.as_bytes())))
}

/// The converter's `does_token_look_special`, for added tokens not flagged special.
fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<｜") && token.ends_with("｜>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

/// Tokens `0..vocab_size` in phantom-space form with their llama.cpp types (`get_vocab_base`
/// then `BertModel.set_vocab`).
fn vocabulary(
    tokenizer: &Tokenizer,
    vocab_size: usize,
    path: &Path,
) -> Result<(Vec<String>, Vec<i32>), ModelError> {
    let vocab = tokenizer.get_vocab(true);
    let mut by_id: Vec<Option<&str>> = vec![None; vocab_size];
    for (token, &id) in &vocab {
        let slot = by_id.get_mut(id as usize).ok_or_else(|| {
            gguf_error(
                path,
                format!("token `{token}` has id {id}, past `vocab_size` {vocab_size}"),
            )
        })?;
        *slot = Some(token.as_str());
    }
    let added = tokenizer.get_added_tokens_decoder();
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for (id, token) in by_id.into_iter().enumerate() {
        let (token, kind) = match token {
            None => (format!("[PAD{id}]"), TOKEN_UNUSED),
            Some(token) => match added.get(&(id as u32)) {
                Some(added) if added.special || looks_special(token) => {
                    (token.to_owned(), TOKEN_CONTROL)
                }
                Some(_) => (token.replace('\u{2581}', " "), TOKEN_USER_DEFINED),
                None => (token.to_owned(), TOKEN_NORMAL),
            },
        };
        tokens.push(phantom(&token, kind));
        types.push(kind);
    }
    Ok((tokens, types))
}

/// `BertModel.set_vocab`'s phantom-space form: llama.cpp's WordPiece marks word starts, not
/// continuations.
fn phantom(token: &str, kind: i32) -> String {
    if kind == TOKEN_CONTROL {
        token.to_owned()
    } else if let Some(rest) = token.strip_prefix("##") {
        rest.to_owned()
    } else {
        format!("\u{2581}{token}")
    }
}

/// The inverse of [`phantom`].
fn unphantom(token: &str, kind: i32) -> String {
    if kind == TOKEN_CONTROL {
        token.to_owned()
    } else if let Some(rest) = token.strip_prefix('\u{2581}') {
        rest.to_owned()
    } else {
        format!("##{token}")
    }
}

/// gguf-py's key for a special token kind; `cls` has none at the pinned commit (it folded into
/// `bos`), so its id is not written.
fn special_id_key(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "bos" => "tokenizer.ggml.bos_token_id",
        "eos" => "tokenizer.ggml.eos_token_id",
        "unk" => "tokenizer.ggml.unknown_token_id",
        "sep" => "tokenizer.ggml.seperator_token_id",
        "pad" => "tokenizer.ggml.padding_token_id",
        "mask" => "tokenizer.ggml.mask_token_id",
        _ => return None,
    })
}

/// The special tokens as gguf-py's `SpecialVocab` finds them, for WordPiece models: ids by kind
/// and whether each is added, both in the order it records them.
#[derive(Debug, Default, PartialEq)]
struct SpecialVocab {
    ids: Vec<(&'static str, u32)>,
    add: Vec<(&'static str, bool)>,
}

const SPECIAL_KINDS: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

impl SpecialVocab {
    fn read(dir: &Path, n_vocab: usize) -> Result<Self, ModelError> {
        let read = |name: &str| -> Result<Option<serde_json::Value>, ModelError> {
            let path = dir.join(name);
            if !path.is_file() {
                return Ok(None);
            }
            serde_json::from_str(&fs_err::read_to_string(&path)?)
                .map(Some)
                .map_err(|e| gguf_error(&path, e.to_string()))
        };
        let tokenizer = read("tokenizer.json")?;
        let mut config = read("tokenizer_config.json")?.filter(serde_json::Value::is_object);
        let model_config = read("config.json")?;
        let mut vocab = Self::default();
        if let Some(tokenizer) = &tokenizer {
            vocab.read_post_processor(tokenizer, config.as_mut());
            if let Some(config) = &config {
                vocab.read_config(tokenizer, config, n_vocab);
            }
        }
        if let Some(model_config) = &model_config {
            for kind in SPECIAL_KINDS {
                if let Some(id) = model_config[format!("{kind}_token_id")].as_u64() {
                    vocab.set_id(kind, id, n_vocab);
                }
            }
        }
        Ok(vocab)
    }

    fn set_id(&mut self, kind: &'static str, id: u64, n_vocab: usize) {
        if (id as usize) < n_vocab && !self.ids.iter().any(|(k, _)| *k == kind) {
            self.ids.push((kind, id as u32));
        }
    }

    fn set_add(&mut self, kind: &'static str, add: bool) {
        match self.add.iter_mut().find(|(k, _)| *k == kind) {
            Some(entry) => entry.1 = add,
            None => self.add.push((kind, add)),
        }
    }

    /// `bos`/`eos` default to `cls`/`sep`, then a `TemplateProcessing` post-processor says which
    /// are added (the single template's first and last special tokens, the pair template's
    /// separator).
    fn read_post_processor(
        &mut self,
        tokenizer: &serde_json::Value,
        mut config: Option<&mut serde_json::Value>,
    ) {
        let text = |config: &Option<&mut serde_json::Value>, key: &str| {
            config
                .as_ref()
                .and_then(|c| c[key].as_str())
                .map(str::to_owned)
        };
        let mut bos = text(&config, "bos_token");
        let cls = text(&config, "cls_token");
        let mut eos = text(&config, "eos_token");
        let sep = text(&config, "sep_token");
        if let Some(config) = config.as_deref_mut() {
            if bos.is_none() && cls.is_some() {
                config["bos_token"] = cls.clone().into();
                bos.clone_from(&cls);
            }
            if eos.is_none() && sep.is_some() {
                config["eos_token"] = sep.clone().into();
                eos.clone_from(&sep);
            }
        }
        let processor = &tokenizer["post_processor"];
        let processors = match processor["processors"].as_array() {
            Some(list) => list.clone(),
            None => vec![processor.clone()],
        };
        let special = |item: &serde_json::Value| {
            item["SpecialToken"]["id"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        for processor in processors {
            match processor["type"].as_str() {
                Some("RobertaProcessing") => {
                    for kind in ["bos", "eos", "sep"] {
                        self.set_add(kind, true);
                    }
                }
                Some("TemplateProcessing") => {
                    let empty = Vec::new();
                    let single = processor["single"].as_array().unwrap_or(&empty);
                    let pair = processor["pair"].as_array().unwrap_or(&empty);
                    let mut first = None;
                    let mut last = None;
                    if single.len() > 1 {
                        first = special(&single[0]);
                        if let Some(first) = &first {
                            if config.is_none() {
                                bos = Some(first.clone());
                            }
                            let added = Some(first) == bos.as_ref() || Some(first) == cls.as_ref();
                            self.set_add("bos", added);
                        }
                        last = single.last().and_then(special);
                        if let Some(last) = &last {
                            // gguf-py also records a replaced `eos` as `eot`/`eom`, which a
                            // WordPiece model never has.
                            match config.as_deref_mut() {
                                None => eos = Some(last.clone()),
                                Some(config) if Some(last) != eos.as_ref() => {
                                    config["eos_token"] = last.clone().into();
                                    eos = Some(last.clone());
                                }
                                Some(_) => {}
                            }
                            self.set_add("eos", Some(last) == eos.as_ref());
                        }
                    }
                    if !pair.is_empty() {
                        let start = usize::from(first.is_some() && special(&pair[0]) == first);
                        let stop = if last.is_some() && pair.last().and_then(special) == last {
                            pair.len() - 1
                        } else {
                            pair.len()
                        };
                        let middle = pair.get(start..stop).unwrap_or_default();
                        let sequence = |item: &serde_json::Value| {
                            item["Sequence"]["id"].as_str().map(str::to_owned)
                        };
                        let is_a_b = middle.first().and_then(sequence).as_deref() == Some("A")
                            && middle.last().and_then(sequence).as_deref() == Some("B");
                        if is_a_b && middle.len() > 2 {
                            let inner = &middle[1..middle.len() - 1];
                            let separator =
                                |t: &Option<String>| t.is_some() && (*t == sep || *t == eos);
                            let mut add_sep =
                                separator(&inner.first().and_then(special)) && last.is_none();
                            if inner.len() == 2 && separator(&inner.get(1).and_then(special)) {
                                add_sep = true;
                            }
                            self.set_add("sep", add_sep);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// `add_<kind>_token` flags and `<kind>_token` contents of `tokenizer_config.json`, each
    /// content looked up among `tokenizer.json`'s added tokens.
    fn read_config(
        &mut self,
        tokenizer: &serde_json::Value,
        config: &serde_json::Value,
        n_vocab: usize,
    ) {
        let empty = Vec::new();
        let added = tokenizer["added_tokens"].as_array().unwrap_or(&empty);
        for kind in SPECIAL_KINDS {
            if let Some(add) = config[format!("add_{kind}_token")].as_bool() {
                self.set_add(kind, add);
            }
            let entry = &config[format!("{kind}_token")];
            let Some(content) = entry.as_str().or_else(|| entry["content"].as_str()) else {
                continue;
            };
            if let Some(id) = added
                .iter()
                .find(|t| t["content"].as_str() == Some(content))
                .and_then(|t| t["id"].as_u64())
            {
                self.set_id(kind, id, n_vocab);
            }
        }
    }
}

/// What [`import_bert`] read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportedGguf {
    pub dir: PathBuf,
    pub name: Option<String>,
    pub gguf_type: Option<GgufType>,
    pub pooling: String,
    pub vocab_size: usize,
}

/// Writes the `bert` GGUF file `gguf` as a sentence-transformers folder `out` (created; it must
/// not exist, so a caller can write to a temporary folder and rename it into place).
pub fn import_bert(gguf: &Path, out: &Path) -> Result<ImportedGguf, ModelError> {
    let mut file = fs_err::File::open(gguf)?;
    let content =
        Content::read(&mut file).map_err(|e| gguf_error(gguf, format!("not a GGUF file: {e}")))?;
    let meta = Metadata {
        content: &content,
        path: gguf,
    };
    let architecture = meta.string("general.architecture")?;
    if architecture != "bert" {
        return Err(gguf_error(
            gguf,
            format!("architecture `{architecture}` is not `bert`, the only one imported"),
        ));
    }
    let tokenizer_model = meta.string("tokenizer.ggml.model")?;
    if tokenizer_model != "bert" {
        return Err(gguf_error(
            gguf,
            format!("tokenizer `{tokenizer_model}` is not WordPiece (`bert`)"),
        ));
    }
    let tokens = meta.array("tokenizer.ggml.tokens", |v| v.to_string().cloned())?;
    let types = meta.array("tokenizer.ggml.token_type", Value::to_i32)?;
    if types.len() != tokens.len() {
        return Err(gguf_error(gguf, "token types and tokens differ in number"));
    }
    let vocab: Vec<String> = tokens
        .iter()
        .zip(&types)
        .map(|(token, &kind)| unphantom(token, kind))
        .collect();
    let pooling = match meta.u32("bert.pooling_type")? {
        1 => PoolingMode::Mean,
        2 => PoolingMode::Cls,
        3 => PoolingMode::LastToken,
        other => {
            return Err(gguf_error(
                gguf,
                format!("`bert.pooling_type` {other} is not mean (1), cls (2) or last (3)"),
            ));
        }
    };
    let token_type_count = match meta.optional_u32("tokenizer.ggml.token_type_count")? {
        Some(n) => n,
        // Files from converters before 2024-06 keep it under the architecture.
        None => meta.optional_u32("bert.token_type_count")?.unwrap_or(2),
    };
    let hidden = meta.u32("bert.embedding_length")? as usize;
    let context = meta.u32("bert.context_length")? as usize;
    let special = |key: &str, default: u32| -> Result<u32, ModelError> {
        Ok(meta.optional_u32(key)?.unwrap_or(default))
    };
    let pad = special("tokenizer.ggml.padding_token_id", 0)?;
    let unk = special("tokenizer.ggml.unknown_token_id", 100)?;
    let cls = match meta.optional_u32("tokenizer.ggml.cls_token_id")? {
        Some(id) => id,
        None => special("tokenizer.ggml.bos_token_id", 101)?,
    };
    let sep = special("tokenizer.ggml.seperator_token_id", 102)?;
    let mask = special("tokenizer.ggml.mask_token_id", 103)?;
    let token_at = |id: u32| {
        vocab.get(id as usize).cloned().ok_or_else(|| {
            gguf_error(
                gguf,
                format!("special token id {id} is past the vocabulary"),
            )
        })
    };

    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let ours = hf_tensor_name(name)
            .ok_or_else(|| gguf_error(gguf, format!("tensor `{name}` is not a BERT tensor")))?;
        let tensor = content
            .tensor(&mut file, name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .during(|| format!("reading tensor `{name}` of `{}`", gguf.display()))?;
        tensors.push((ours, tensor));
    }
    let gguf_type = meta
        .optional_u32("general.file_type")?
        .and_then(|t| GgufType::ALL.into_iter().find(|g| g.file_type() == t));

    fs_err::create_dir_all(out.join("1_Pooling"))?;
    fs_err::create_dir_all(out.join("2_Normalize"))?;
    let config = json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": vocab.len(),
        "hidden_size": hidden,
        "num_hidden_layers": meta.u32("bert.block_count")?,
        "num_attention_heads": meta.u32("bert.attention.head_count")?,
        "intermediate_size": meta.u32("bert.feed_forward_length")?,
        "hidden_act": "gelu",
        "max_position_embeddings": context,
        "type_vocab_size": token_type_count,
        "layer_norm_eps": meta.f32("bert.attention.layer_norm_epsilon")?,
        "pad_token_id": pad,
        "position_embedding_type": "absolute",
    });
    write_json(&out.join("config.json"), &config)?;
    safetensors::serialize_to_file(
        tensors.iter().map(|(name, t)| (name.as_str(), t)),
        Some(std::collections::HashMap::from([(
            "format".to_owned(),
            "pt".to_owned(),
        )])),
        &out.join("model.safetensors"),
    )
    .map_err(|e| gguf_error(&out.join("model.safetensors"), e.to_string()))?;

    let specials = [
        ("pad_token", token_at(pad)?),
        ("unk_token", token_at(unk)?),
        ("cls_token", token_at(cls)?),
        ("sep_token", token_at(sep)?),
        ("mask_token", token_at(mask)?),
    ];
    write_json(
        &out.join("tokenizer.json"),
        &wordpiece_tokenizer_json(
            &vocab,
            &types,
            &token_at(cls)?,
            cls,
            &token_at(sep)?,
            sep,
            &token_at(unk)?,
        ),
    )?;
    let mut tokenizer_config: serde_json::Map<String, serde_json::Value> = specials
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone().into()))
        .collect();
    tokenizer_config.insert("do_lower_case".to_owned(), true.into());
    tokenizer_config.insert("model_max_length".to_owned(), context.into());
    tokenizer_config.insert("tokenizer_class".to_owned(), "BertTokenizer".into());
    write_json(
        &out.join("tokenizer_config.json"),
        &serde_json::Value::Object(tokenizer_config),
    )?;
    let special_map: serde_json::Map<String, serde_json::Value> = specials
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone().into()))
        .collect();
    write_json(
        &out.join("special_tokens_map.json"),
        &serde_json::Value::Object(special_map),
    )?;
    fs_err::write(out.join("vocab.txt"), vocab.join("\n") + "\n")?;

    let modules = json!([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]);
    write_json(&out.join("modules.json"), &modules)?;
    write_json(
        &out.join("1_Pooling/config.json"),
        &crate::model::train::save::pooling_config(&Pooling::new(vec![pooling], true), hidden),
    )?;
    write_json(
        &out.join("sentence_bert_config.json"),
        &json!({"max_seq_length": context, "do_lower_case": false}),
    )?;
    write_json(
        &out.join("config_sentence_transformers.json"),
        &json!({"prompts": {}, "default_prompt_name": null, "similarity_fn_name": "cosine"}),
    )?;
    Ok(ImportedGguf {
        dir: out.to_owned(),
        name: meta.optional_string("general.name"),
        gguf_type,
        pooling: match pooling {
            PoolingMode::Cls => "cls",
            PoolingMode::LastToken => "last",
            _ => "mean",
        }
        .to_owned(),
        vocab_size: vocab.len(),
    })
}

/// A WordPiece `tokenizer.json` as Hugging Face's `BertTokenizerFast` writes one: BERT's
/// normaliser (lower-casing, accents stripped with it) and pre-tokenizer, `[CLS] $A [SEP]`,
/// control tokens as special added tokens.
fn wordpiece_tokenizer_json(
    vocab: &[String],
    types: &[i32],
    cls: &str,
    cls_id: u32,
    sep: &str,
    sep_id: u32,
    unk: &str,
) -> serde_json::Value {
    let added: Vec<serde_json::Value> = vocab
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, kind))| **kind == TOKEN_CONTROL)
        .map(|(id, (token, _))| {
            json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let model_vocab: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), id.into()))
        .collect();
    let special = |id: &str| json!({"SpecialToken": {"id": id, "type_id": 0}});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                       "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special(cls), {"Sequence": {"id": "A", "type_id": 0}}, special(sep)],
            "pair": [special(cls), {"Sequence": {"id": "A", "type_id": 0}}, special(sep),
                     {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": sep, "type_id": 1}}],
            "special_tokens": {
                cls: {"id": cls, "ids": [cls_id], "tokens": [cls]},
                sep: {"id": sep, "ids": [sep_id], "tokens": [sep]},
            },
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": unk, "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": model_vocab},
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), ModelError> {
    let text = serde_json::to_vec_pretty(value).map_err(|e| gguf_error(path, e.to_string()))?;
    fs_err::write(path, text)?;
    Ok(())
}

/// Typed reads of a GGUF file's metadata, each failure naming the key and the file.
struct Metadata<'a> {
    content: &'a Content,
    path: &'a Path,
}

impl Metadata<'_> {
    fn get(&self, key: &str) -> Result<&Value, ModelError> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| gguf_error(self.path, format!("no `{key}` in the metadata")))
    }

    fn typed<T>(
        &self,
        key: &str,
        read: impl FnOnce(&Value) -> candle_core::Result<T>,
    ) -> Result<T, ModelError> {
        read(self.get(key)?).map_err(|e| gguf_error(self.path, format!("`{key}`: {e}")))
    }

    fn string(&self, key: &str) -> Result<String, ModelError> {
        self.typed(key, |v| v.to_string().cloned())
    }

    fn optional_string(&self, key: &str) -> Option<String> {
        self.content
            .metadata
            .get(key)
            .and_then(|v| v.to_string().ok().cloned())
    }

    fn u32(&self, key: &str) -> Result<u32, ModelError> {
        self.typed(key, Value::to_u32)
    }

    fn optional_u32(&self, key: &str) -> Result<Option<u32>, ModelError> {
        match self.content.metadata.get(key) {
            Some(_) => self.u32(key).map(Some),
            None => Ok(None),
        }
    }

    fn f32(&self, key: &str) -> Result<f32, ModelError> {
        self.typed(key, Value::to_f32)
    }

    fn array<T>(
        &self,
        key: &str,
        each: impl Fn(&Value) -> candle_core::Result<T>,
    ) -> Result<Vec<T>, ModelError> {
        self.typed(key, |v| v.to_vec()?.iter().map(&each).collect())
    }
}

/// The metadata of a GGUF file as JSON (arrays longer than `max_array` summarised by their length
/// and first items), for tests and `models show`.
pub fn metadata_json(content: &Content, max_array: usize) -> BTreeMap<String, serde_json::Value> {
    fn value_json(value: &Value, max_array: usize) -> serde_json::Value {
        match value {
            Value::U8(v) => json!(v),
            Value::I8(v) => json!(v),
            Value::U16(v) => json!(v),
            Value::I16(v) => json!(v),
            Value::U32(v) => json!(v),
            Value::I32(v) => json!(v),
            Value::U64(v) => json!(v),
            Value::I64(v) => json!(v),
            Value::F32(v) => json!(v),
            Value::F64(v) => json!(v),
            Value::Bool(v) => json!(v),
            Value::String(v) => json!(v),
            Value::Array(items) if items.len() > max_array => json!({
                "len": items.len(),
                "first": items.iter().take(max_array).map(|v| value_json(v, max_array)).collect::<Vec<_>>(),
            }),
            Value::Array(items) => {
                json!(
                    items
                        .iter()
                        .map(|v| value_json(v, max_array))
                        .collect::<Vec<_>>()
                )
            }
        }
    }
    content
        .metadata
        .iter()
        .map(|(key, value)| (key.clone(), value_json(value, max_array)))
        .collect()
}

#[cfg(test)]
mod tests {
    //! Against all-MiniLM-L6-v2: field by field with what llama.cpp's converter writes for it
    //! (`tests/fixtures/gguf/`, derived from the converter's source), and back through import.

    use candle_core::quantized::gguf_file::Content;

    use super::*;
    use crate::model::encoder::SentenceEncoder;
    use crate::model::ollama::cosine;
    use crate::testutil::minilm_dir;

    /// MiniLM (BERT) exports; MPNet, whose relative-position bias llama.cpp's `bert` lacks,
    /// says why it cannot (register then skips the GGUF with that reason).
    #[test]
    fn only_bert_models_are_exportable() {
        assert_eq!(not_exportable(&minilm_dir()).expect("reads"), None);
        let why = not_exportable(&crate::testutil::mpnet_dir()).expect("reads");
        assert!(why.is_some_and(|w| w.contains("MPNet")));
    }

    fn converter_fixture() -> serde_json::Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gguf/all-MiniLM-L6-v2.converter-f16.json");
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
    }

    fn read(path: &Path) -> (Content, fs_err::File) {
        let mut file = fs_err::File::open(path).expect("open");
        let content = Content::read(&mut file).expect("candle reads our GGUF");
        (content, file)
    }

    /// The ggml type name and ggml dims (innermost first) of each tensor.
    fn tensor_table(content: &Content) -> BTreeMap<String, (String, Vec<usize>)> {
        content
            .tensor_infos
            .iter()
            .map(|(name, info)| {
                let mut dims = info.shape.dims().to_vec();
                dims.reverse();
                (name.clone(), (format!("{:?}", info.ggml_dtype), dims))
            })
            .collect()
    }

    fn export(gguf_type: GgufType, dir: &Path) -> ExportedGguf {
        let path = dir.join(format!("minilm-{gguf_type}.gguf"));
        export_bert(&minilm_dir(), &path, gguf_type, "minilm").expect("exports")
    }

    #[test]
    fn f16_export_matches_the_converter_field_by_field() {
        let dir = tempfile::tempdir().expect("temp dir");
        let exported = export(GgufType::F16, dir.path());
        let expected = converter_fixture();
        let bytes = std::fs::read(&exported.path).expect("read");
        assert_eq!(
            u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")),
            3,
            "GGUF version"
        );
        let (content, _) = read(&exported.path);
        let ours = metadata_json(&content, 4);
        let mut differences = Vec::new();
        for (key, want) in expected["metadata"].as_object().expect("metadata") {
            let got = ours.get(key).cloned().unwrap_or(serde_json::Value::Null);
            let same = match (want.as_f64(), got.as_f64()) {
                // f32 in the file, a decimal in the fixture.
                (Some(a), Some(b)) if want.is_f64() => ((a - b) / a).abs() < 1e-6,
                _ => *want == got,
            };
            if !same {
                differences.push(format!("{key}: converter {want}, ours {got}"));
            }
        }
        let compared: Vec<&String> = expected["metadata"]
            .as_object()
            .expect("metadata")
            .keys()
            .collect();
        let arrays = ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type"];
        for key in ours.keys() {
            let known = compared.contains(&key) || arrays.contains(&key.as_str());
            if !known && key != "general.name" {
                differences.push(format!("{key}: ours only"));
            }
        }
        assert!(differences.is_empty(), "{differences:#?}");
        assert_eq!(ours["general.name"], "minilm");

        let tokens: Vec<String> = content.metadata["tokenizer.ggml.tokens"]
            .to_vec()
            .expect("array")
            .iter()
            .map(|v| v.to_string().expect("string").clone())
            .collect();
        let types: Vec<i32> = content.metadata["tokenizer.ggml.token_type"]
            .to_vec()
            .expect("array")
            .iter()
            .map(|v| v.to_i32().expect("i32"))
            .collect();
        assert_eq!(tokens.len() as u64, expected["tokens"]["count"]);
        assert_eq!(types.len(), tokens.len());
        for (id, want) in expected["tokens"]["samples"].as_object().expect("samples") {
            let id: usize = id.parse().expect("id");
            assert_eq!(tokens[id], want[0], "token {id}");
            assert_eq!(i64::from(types[id]), want[1], "type of token {id}");
        }

        let tensors = tensor_table(&content);
        assert_eq!(tensors.len() as u64, expected["tensors"]["count"]);
        assert_eq!(exported.parameters, expected["tensors"]["parameters"]);
        for (name, want) in expected["tensors"]["samples"].as_object().expect("samples") {
            let (dtype, dims) = tensors.get(name).unwrap_or_else(|| panic!("no `{name}`"));
            assert_eq!(dtype, want[0].as_str().expect("type"), "type of `{name}`");
            let want_dims: Vec<usize> = serde_json::from_value(want[1].clone()).expect("dims");
            assert_eq!(dims, &want_dims, "dims of `{name}`");
        }
        for name in expected["tensors"]["absent"].as_array().expect("absent") {
            let name = name.as_str().expect("name");
            assert!(!tensors.keys().any(|t| t.contains(name)), "{name}");
        }
    }

    #[test]
    fn q8_0_quantises_the_matrices_the_converter_quantises() {
        let dir = tempfile::tempdir().expect("temp dir");
        let exported = export(GgufType::Q8_0, dir.path());
        let (content, _) = read(&exported.path);
        assert_eq!(
            content.metadata["general.file_type"].to_u32().expect("u32"),
            7
        );
        let tensors = tensor_table(&content);
        for (name, (dtype, dims)) in &tensors {
            let want = if dims.len() == 1
                || name.ends_with("_norm.weight")
                || name == "position_embd.weight"
                || name == "token_types.weight"
            {
                "F32"
            } else {
                "Q8_0"
            };
            assert_eq!(dtype, want, "{name}");
        }
        let f16 = export(GgufType::F16, dir.path());
        assert!(
            exported.bytes * 10 < f16.bytes * 6,
            "q8_0 {} bytes against f16 {}",
            exported.bytes,
            f16.bytes
        );
    }

    #[test]
    fn the_check_text_hash_names_minilm_s_vocabulary_as_the_converter_does() {
        let path = minilm_dir().join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).expect("tokenizer");
        assert_eq!(
            check_text_hash(&tokenizer, &path).expect("hash"),
            KNOWN_PRE_TOKENIZERS[0].0
        );
    }

    #[test]
    fn special_tokens_follow_gguf_py_special_vocab() {
        let vocab = SpecialVocab::read(&minilm_dir(), 30522).expect("reads");
        assert_eq!(
            vocab.ids,
            [
                ("bos", 101),
                ("eos", 102),
                ("unk", 100),
                ("sep", 102),
                ("pad", 0),
                ("cls", 101),
                ("mask", 103)
            ]
        );
        assert_eq!(vocab.add, [("bos", true), ("eos", true), ("sep", false)]);
    }

    #[test]
    fn tensor_names_map_both_ways() {
        for name in [
            "embeddings.word_embeddings.weight",
            "embeddings.LayerNorm.bias",
            "encoder.layer.11.attention.output.LayerNorm.weight",
            "encoder.layer.0.output.dense.bias",
        ] {
            let gguf = gguf_tensor_name(name).expect("maps");
            assert_eq!(hf_tensor_name(&gguf).as_deref(), Some(name));
        }
        assert_eq!(
            gguf_tensor_name("encoder.layer.3.intermediate.dense.weight").as_deref(),
            Some("blk.3.ffn_up.weight")
        );
        assert_eq!(gguf_tensor_name("pooler.dense.weight"), None);
    }

    #[test]
    fn phantom_space_round_trips() {
        for (token, kind) in [
            ("the", TOKEN_NORMAL),
            ("##s", TOKEN_NORMAL),
            ("##", TOKEN_NORMAL),
            ("[CLS]", TOKEN_CONTROL),
            ("[unused0]", TOKEN_NORMAL),
        ] {
            assert_eq!(unphantom(&phantom(token, kind), kind), token);
        }
        assert_eq!(size_label(22_565_376), "23M");
        assert_eq!(size_label(109_482_240), "109M");
        assert_eq!(size_label(1_500_000_000), "1.5B");
    }

    #[test]
    fn a_pooling_llama_cpp_cannot_run_is_refused() {
        let pooling = Pooling::new(vec![PoolingMode::Mean, PoolingMode::Max], true);
        let error = llama_pooling(&pooling, Path::new("m")).expect_err("mean + max");
        assert!(error.to_string().contains("pooling_mode_*"), "{error}");
        assert_eq!(
            llama_pooling(&Pooling::new(vec![PoolingMode::Cls], true), Path::new("m"))
                .expect("cls")
                .0,
            2
        );
    }

    /// Export then import gives back our encoder: the same token ids, and embeddings equal up to
    /// the file's rounding (f32: float noise; f16: half-precision weights).
    #[test]
    fn import_gives_back_the_exported_encoder() {
        let dir = tempfile::tempdir().expect("temp dir");
        let original = SentenceEncoder::load(&minilm_dir(), &Device::Cpu).expect("loads");
        let texts = crate::model::ollama::PROBE_TEXTS;
        let want = original.encode(&texts, 4, &mut |_| {}).expect("encodes");
        let want_ids = original
            .sentence_tokenizer()
            .token_ids(&texts)
            .expect("ids");
        for (gguf_type, floor) in [(GgufType::F32, 0.999_999), (GgufType::F16, 0.9999)] {
            let exported = export(gguf_type, dir.path());
            let folder = dir.path().join(format!("imported-{gguf_type}"));
            let imported = import_bert(&exported.path, &folder).expect("imports");
            assert_eq!(imported.gguf_type, Some(gguf_type));
            assert_eq!(imported.vocab_size, 30522);
            assert_eq!(imported.pooling, "mean");
            let encoder = SentenceEncoder::load(&folder, &Device::Cpu).expect("imported loads");
            assert_eq!(
                encoder.sentence_tokenizer().token_ids(&texts).expect("ids"),
                want_ids,
                "{gguf_type}: token ids"
            );
            let got = encoder.encode(&texts, 4, &mut |_| {}).expect("encodes");
            for (i, text) in texts.iter().enumerate() {
                let c = cosine(got.row(i), want.row(i));
                assert!(c >= floor, "{gguf_type} `{text}`: cosine {c}");
            }
        }
    }

    /// Issue 13: llama.cpp's own code (node-llama-cpp's prebuilt build, found through
    /// `RAGD_TEST_NODE_LLAMA_CPP`: a folder holding `node_modules/node-llama-cpp`) loads our f16
    /// and q8_0 files, tokenizes the probe texts into our ids, and embeds them like our encoder.
    #[test]
    #[allow(
        clippy::print_stderr,
        reason = "a skipped test says so visibly; figures are printed"
    )]
    fn llama_cpp_loads_our_gguf_and_embeds_like_our_encoder() {
        let Some(modules) = std::env::var_os("RAGD_TEST_NODE_LLAMA_CPP") else {
            eprintln!("skipped: RAGD_TEST_NODE_LLAMA_CPP is not set (see .ci/run)");
            return;
        };
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_cpp/embed.mjs");
        let dir = tempfile::tempdir().expect("temp dir");
        let mut texts = crate::model::ollama::PROBE_TEXTS.to_vec();
        // Longer than the probe texts, which stay under 32 tokens for the development Ollama.
        texts.push(
            "Snapshots are copy-on-write: restoring one rolls the volume back to the moment it \
             was taken, and anything written since is lost unless you snapshot it first, so take \
             one before every upgrade and keep the last three.",
        );
        let original = SentenceEncoder::load(&minilm_dir(), &Device::Cpu).expect("loads");
        let want = original.encode(&texts, 4, &mut |_| {}).expect("encodes");
        let want_ids = original
            .sentence_tokenizer()
            .token_ids(&texts)
            .expect("ids");
        assert!(want_ids.last().is_some_and(|ids| ids.len() > 40));
        for (gguf_type, floor) in [(GgufType::F16, 0.99), (GgufType::Q8_0, 0.99)] {
            let exported = export(gguf_type, dir.path());
            let mut child = std::process::Command::new("node")
                .arg(&script)
                .arg(&exported.path)
                .env("RAGD_TEST_NODE_LLAMA_CPP", &modules)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("node runs");
            {
                use std::io::Write;
                let mut stdin = child.stdin.take().expect("stdin");
                stdin
                    .write_all(serde_json::to_string(&texts).expect("json").as_bytes())
                    .expect("write texts");
            }
            let output = child.wait_with_output().expect("node finishes");
            assert!(
                output.status.success(),
                "node-llama-cpp failed on {gguf_type}"
            );
            let results: Vec<serde_json::Value> =
                serde_json::from_slice(&output.stdout).expect("JSON from the script");
            let mut worst = f64::INFINITY;
            for (i, result) in results.iter().enumerate() {
                let ids: Vec<u32> = serde_json::from_value(result["ids"].clone()).expect("ids");
                // node-llama-cpp's `tokenize` leaves out [CLS] and [SEP]; its embedding adds them.
                assert_eq!(
                    ids,
                    want_ids[i][1..want_ids[i].len() - 1],
                    "llama.cpp's tokens of `{}`",
                    texts[i]
                );
                let embedding: Vec<f32> =
                    serde_json::from_value(result["embedding"].clone()).expect("embedding");
                let c = cosine(&embedding, want.row(i));
                worst = worst.min(c);
                assert!(c >= floor, "{gguf_type} `{}`: cosine {c}", texts[i]);
            }
            eprintln!("llama.cpp, {gguf_type}: least cosine with our encoder {worst:.6}");
        }
    }
}
