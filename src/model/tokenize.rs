//! Text to token ids exactly as sentence-transformers' `Transformer.tokenize` produces them.
//!
//! A model's `tokenizer.json` often carries settings for a different use (all-MiniLM-L6-v2's pads
//! every input to a fixed 128 tokens and truncates at 128, where sentence-transformers truncates
//! at its `max_seq_length` of 256). Those are replaced: truncation at `max_seq_length` from
//! `sentence_bert_config.json`, padding to the longest input of a batch, on the right.
//! sentence-transformers also strips surrounding whitespace and, with `do_lower_case`, lowercases
//! before tokenizing
//! (<https://github.com/UKPLab/sentence-transformers/blob/01d5ae387b49838059bb9323ea93e7cbed1c4862/sentence_transformers/models/Transformer.py>);
//! so does [`SentenceTokenizer::token_ids`].

use std::path::Path;

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::Deserialize;
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::model::config_file::read_json;
use crate::model::error::{CandleContext, ModelError};
use crate::model::prompts::{Prompts, TextRole};

/// The `max_seq_length` sentence-transformers falls back to without `sentence_bert_config.json`.
const DEFAULT_MAX_SEQ_LENGTH: usize = 512;

/// `sentence_bert_config.json`.
#[derive(Debug, Default, Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
    #[serde(default)]
    do_lower_case: bool,
}

/// A model's tokenizer with sentence-transformers' truncation, padding and text preparation.
#[derive(Debug, Clone)]
pub struct SentenceTokenizer {
    tokenizer: Tokenizer,
    max_seq_length: usize,
    do_lower_case: bool,
    pad_id: u32,
    /// Prepended to texts before tokenizing (none unless [`Self::with_prompts`]).
    prompts: Prompts,
}

/// Token ids and attention mask of a batch, padded on the right to its longest input.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, seq]`, u32.
    pub input_ids: Tensor,
    /// `[batch, seq]`, u32: 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
}

/// A (query, passage) pair as one sequence, `[CLS] query [SEP] passage [SEP]`, with each
/// token's segment (0 for the query part, 1 for the passage part).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PairIds {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl PairIds {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// A [`Batch`] of pairs, with their segments.
#[derive(Debug, Clone)]
pub struct PairBatch {
    pub batch: Batch,
    /// `[batch, seq]`, u32; 0 on padding.
    pub token_type_ids: Tensor,
}

impl SentenceTokenizer {
    /// Loads `dir/tokenizer.json` and `dir/sentence_bert_config.json` (optional), capping
    /// `max_seq_length` at the model's `max_position_embeddings`. `pad_token_id` (from the model
    /// config) pads when `tokenizer.json` has no padding settings of its own.
    pub fn load(
        dir: &Path,
        max_position_embeddings: usize,
        pad_token_id: u32,
    ) -> Result<Self, ModelError> {
        let st_config_path = dir.join("sentence_bert_config.json");
        let st_config: SentenceBertConfig = if st_config_path.is_file() {
            read_json(&st_config_path)?
        } else {
            SentenceBertConfig::default()
        };
        let max_seq_length = st_config
            .max_seq_length
            .unwrap_or(DEFAULT_MAX_SEQ_LENGTH)
            .min(max_position_embeddings);
        if max_seq_length < 2 {
            return Err(ModelError::BadConfig {
                path: st_config_path,
                key: "max_seq_length".to_owned(),
                message: format!("{max_seq_length} leaves no room for a token"),
            });
        }

        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ModelError::MissingFile { path });
        }
        let mut tokenizer =
            Tokenizer::from_file(&path).map_err(|source| ModelError::Tokenizer {
                path: path.clone(),
                source,
            })?;
        let padding = match tokenizer.get_padding() {
            Some(own) => PaddingParams {
                strategy: PaddingStrategy::BatchLongest,
                direction: PaddingDirection::Right,
                pad_to_multiple_of: None,
                ..own.clone()
            },
            None => PaddingParams {
                pad_id: pad_token_id,
                pad_token: tokenizer
                    .id_to_token(pad_token_id)
                    .unwrap_or_else(|| "[PAD]".to_owned()),
                ..PaddingParams::default()
            },
        };
        let pad_id = padding.pad_id;
        tokenizer.with_padding(Some(padding));
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_seq_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|source| ModelError::Tokenizer {
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            tokenizer,
            max_seq_length,
            do_lower_case: st_config.do_lower_case,
            pad_id,
            prompts: Prompts::default(),
        })
    }

    /// This tokenizer prepending `prompts` ([`Self::token_ids`], [`Self::token_ids_as`]).
    #[must_use]
    pub fn with_prompts(self, prompts: Prompts) -> Self {
        Self { prompts, ..self }
    }

    pub fn prompts(&self) -> &Prompts {
        &self.prompts
    }

    /// The tokenizer, set to truncate at [`Self::max_seq_length`] and, in `encode_batch`, pad to
    /// the batch's longest input.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// The ids of each text with special tokens, truncated, unpadded (tokenized in parallel),
    /// after the default prompt, if the model has one.
    pub fn token_ids(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, ModelError> {
        self.prompted_ids(texts, self.prompts.default_prompt())
    }

    /// [`Self::token_ids`] of texts in `role`, after that role's prompt.
    pub fn token_ids_as(
        &self,
        texts: &[&str],
        role: TextRole,
    ) -> Result<Vec<Vec<u32>>, ModelError> {
        self.prompted_ids(texts, self.prompts.for_role(role))
    }

    /// The ids of `prompt` + each text; sentence-transformers strips the joined text.
    fn prompted_ids(&self, texts: &[&str], prompt: &str) -> Result<Vec<Vec<u32>>, ModelError> {
        texts
            .par_iter()
            .map(|text| {
                let joined;
                let text = if prompt.is_empty() {
                    text.trim()
                } else {
                    joined = format!("{prompt}{text}");
                    joined.trim()
                };
                let encoding = if self.do_lower_case {
                    self.tokenizer.encode(text.to_lowercase(), true)
                } else {
                    self.tokenizer.encode(text, true)
                }
                .map_err(|source| ModelError::Tokenize { source })?;
                Ok(encoding.get_ids().to_vec())
            })
            .collect()
    }

    /// This tokenizer truncating at `max_seq_length` instead (capped as [`Self::load`] caps it by
    /// the `max_position_embeddings` the caller passes).
    pub fn with_max_seq_length(
        &self,
        max_seq_length: usize,
        max_position_embeddings: usize,
    ) -> Result<Self, ModelError> {
        let max_seq_length = max_seq_length.min(max_position_embeddings);
        let mut tokenizer = self.tokenizer.clone();
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_seq_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|source| ModelError::Tokenize { source })?;
        Ok(Self {
            tokenizer,
            max_seq_length,
            ..self.clone()
        })
    }

    /// Each (query, passage) as one sequence with segments, as transformers' tokenizer encodes a
    /// pair for `BertForSequenceClassification` and sentence-transformers' `CrossEncoder` calls
    /// it: both texts stripped, truncated together longest first to [`Self::max_seq_length`].
    pub fn pair_ids(&self, pairs: &[(&str, &str)]) -> Result<Vec<PairIds>, ModelError> {
        pairs
            .par_iter()
            .map(|(query, passage)| {
                let (query, passage) = (query.trim(), passage.trim());
                let encoding = if self.do_lower_case {
                    self.tokenizer
                        .encode((query.to_lowercase(), passage.to_lowercase()), true)
                } else {
                    self.tokenizer.encode((query, passage), true)
                }
                .map_err(|source| ModelError::Tokenize { source })?;
                Ok(PairIds {
                    ids: encoding.get_ids().to_vec(),
                    type_ids: encoding.get_type_ids().to_vec(),
                })
            })
            .collect()
    }

    /// Pads `pairs` to the longest and puts them on `device`.
    pub fn batch_pairs(
        &self,
        pairs: &[&PairIds],
        device: &Device,
    ) -> Result<PairBatch, ModelError> {
        let sequences: Vec<&[u32]> = pairs.iter().map(|p| p.ids.as_slice()).collect();
        let batch = self.batch(&sequences, device)?;
        let seq = sequences.iter().map(|ids| ids.len()).max().unwrap_or(0);
        let mut types = vec![0u32; pairs.len() * seq];
        for (row, pair) in pairs.iter().enumerate() {
            types[row * seq..row * seq + pair.type_ids.len()].copy_from_slice(&pair.type_ids);
        }
        let token_type_ids = Tensor::from_vec(types, (pairs.len(), seq), device)
            .during(|| "building a batch's token types".to_owned())?;
        Ok(PairBatch {
            batch,
            token_type_ids,
        })
    }

    /// Pads `sequences` to the longest and puts them on `device`.
    pub fn batch(&self, sequences: &[&[u32]], device: &Device) -> Result<Batch, ModelError> {
        let seq = sequences.iter().map(|ids| ids.len()).max().unwrap_or(0);
        let mut input_ids = vec![self.pad_id; sequences.len() * seq];
        let mut attention_mask = vec![0u32; sequences.len() * seq];
        for (row, ids) in sequences.iter().enumerate() {
            input_ids[row * seq..row * seq + ids.len()].copy_from_slice(ids);
            attention_mask[row * seq..row * seq + ids.len()].fill(1);
        }
        let shape = (sequences.len(), seq);
        Ok(Batch {
            input_ids: Tensor::from_vec(input_ids, shape, device)
                .during(|| "building a batch of token ids".to_owned())?,
            attention_mask: Tensor::from_vec(attention_mask, shape, device)
                .during(|| "building a batch's attention mask".to_owned())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::minilm_dir;

    /// A folder with MiniLM's tokenizer and, if given, a `sentence_bert_config.json`.
    fn folder(st_config: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::copy(
            minilm_dir().join("tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .expect("copy tokenizer");
        if let Some(text) = st_config {
            std::fs::write(dir.path().join("sentence_bert_config.json"), text).expect("write");
        }
        dir
    }

    #[test]
    fn max_seq_length_defaults_to_512_capped_by_positions() {
        let dir = folder(None);
        let uncapped = SentenceTokenizer::load(dir.path(), 4096, 0).expect("loads");
        assert_eq!(uncapped.max_seq_length(), 512);
        let capped = SentenceTokenizer::load(dir.path(), 40, 0).expect("loads");
        assert_eq!(capped.max_seq_length(), 40);
        let long = "word ".repeat(100);
        let ids = capped.token_ids(&[long.as_str()]).expect("tokenizes");
        assert_eq!(ids[0].len(), 40);
        assert_eq!(
            ids[0].last(),
            Some(&102),
            "truncation keeps the closing [SEP]"
        );

        let dir = folder(Some(r#"{"max_seq_length": 300, "do_lower_case": false}"#));
        let configured = SentenceTokenizer::load(dir.path(), 512, 0).expect("loads");
        assert_eq!(configured.max_seq_length(), 300);
    }

    #[test]
    fn strips_like_sentence_transformers_and_pads_batches_on_the_right() {
        let dir = folder(Some(r#"{"max_seq_length": 256, "do_lower_case": true}"#));
        let tokenizer = SentenceTokenizer::load(dir.path(), 512, 0).expect("loads");
        let ids = tokenizer
            .token_ids(&["  Hello world \n", "hello world", "x"])
            .expect("tokenizes");
        assert_eq!(ids[0], ids[1]);
        assert_eq!(ids[1], [101, 7592, 2088, 102]);
        let rows: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let batch = tokenizer.batch(&rows[1..], &Device::Cpu).expect("batch");
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().expect("ids"),
            [vec![101, 7592, 2088, 102], vec![101, 1060, 102, 0]]
        );
        assert_eq!(
            batch.attention_mask.to_vec2::<u32>().expect("mask"),
            [vec![1, 1, 1, 1], vec![1, 1, 1, 0]]
        );
    }

    #[test]
    fn a_missing_tokenizer_is_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let error = SentenceTokenizer::load(dir.path(), 512, 0).expect_err("no tokenizer");
        assert!(error.to_string().contains("tokenizer.json"), "{error}");
    }
}
