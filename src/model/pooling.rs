//! How token states become one sentence vector, as sentence-transformers configures it:
//! `modules.json` lists the modules (transformer, pooling, normalize) and `1_Pooling/config.json`
//! the pooling modes.
//!
//! Every mode is built from differentiable candle ops because training pools too. The modes port
//! sentence-transformers' `Pooling.forward`
//! (<https://github.com/UKPLab/sentence-transformers/blob/01d5ae387b49838059bb9323ea93e7cbed1c4862/sentence_transformers/models/Pooling.py>),
//! including its constants (`-1e9` for padding under max pooling, `1e-9` as the smallest token
//! count), and `Normalize` as `torch.nn.functional.normalize` (norm floor `1e-12`).

use std::path::{Path, PathBuf};

use candle_core::{D, DType, Tensor};
use serde::Deserialize;

use crate::model::config_file::read_json;
use crate::model::error::{CandleContext, ModelError};

/// One pooling mode; several listed modes are concatenated in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    /// The first token (`[CLS]`).
    Cls,
    /// The element-wise maximum over real tokens.
    Max,
    /// The mean over real tokens.
    Mean,
    /// The sum over real tokens divided by the square root of their count.
    MeanSqrtLen,
    /// The mean weighted by position (1, 2, …), favouring later tokens.
    WeightedMean,
    /// The last real token (decoder-style embedders).
    LastToken,
}

/// The pooling of a sentence-transformers model, with its `Normalize` module folded in.
#[derive(Debug, Clone, PartialEq)]
pub struct Pooling {
    modes: Vec<PoolingMode>,
    normalize: bool,
    /// `word_embedding_dimension` of the pooling config, when there is one.
    expected_hidden_size: Option<usize>,
}

/// `1_Pooling/config.json`. Unknown keys are refused: a mode this port does not know about must
/// not be silently skipped.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolingConfig {
    word_embedding_dimension: usize,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
    /// Only `true` (the default) is supported: prompts are not part of this model's inputs.
    #[serde(default = "default_include_prompt")]
    include_prompt: bool,
}

fn default_include_prompt() -> bool {
    true
}

/// One entry of `modules.json`.
#[derive(Debug, Deserialize)]
struct ModuleEntry {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

const TRANSFORMER: &str = "sentence_transformers.models.Transformer";
const POOLING: &str = "sentence_transformers.models.Pooling";
const NORMALIZE: &str = "sentence_transformers.models.Normalize";

/// What a model folder's `modules.json` says: where the transformer's files are and how its token
/// states are pooled.
#[derive(Debug, Clone, PartialEq)]
pub struct SentenceModules {
    /// The folder of `config.json`, the weights and the tokenizer (the model folder itself, or a
    /// subfolder such as `0_Transformer/` in older layouts).
    pub transformer_dir: PathBuf,
    pub pooling: Pooling,
}

impl SentenceModules {
    /// Reads `dir/modules.json`. Without one, `dir` is a plain Hugging Face model, pooled by mean
    /// without normalisation, as sentence-transformers does when it loads such a folder. A module
    /// other than transformer, pooling and normalize (e.g. `Dense`) is an error, not skipped.
    pub fn read(dir: &Path) -> Result<Self, ModelError> {
        let modules_path = dir.join("modules.json");
        if !modules_path.is_file() {
            return Ok(Self {
                transformer_dir: dir.to_owned(),
                pooling: Pooling::new(vec![PoolingMode::Mean], false),
            });
        }
        let entries: Vec<ModuleEntry> = read_json(&modules_path)?;
        let mut transformer_dir = None;
        let mut pooling = None;
        let mut normalize = false;
        for entry in entries {
            let out_of_order = match entry.kind.as_str() {
                TRANSFORMER if transformer_dir.is_none() => {
                    transformer_dir = Some(dir.join(&entry.path));
                    false
                }
                POOLING if transformer_dir.is_some() && pooling.is_none() => {
                    pooling = Some(Pooling::from_config(
                        &dir.join(&entry.path).join("config.json"),
                    )?);
                    false
                }
                NORMALIZE if pooling.is_some() => {
                    normalize = true;
                    false
                }
                _ => true,
            };
            if out_of_order {
                return Err(ModelError::UnsupportedModule {
                    path: modules_path,
                    module: entry.kind,
                });
            }
        }
        let (Some(transformer_dir), Some(mut pooling)) = (transformer_dir, pooling) else {
            return Err(ModelError::BadConfig {
                path: modules_path,
                key: ".".to_owned(),
                message: format!("needs a `{TRANSFORMER}` and a `{POOLING}` module"),
            });
        };
        pooling.normalize = normalize;
        Ok(Self {
            transformer_dir,
            pooling,
        })
    }
}

impl Pooling {
    /// Pooling by `modes` (concatenated in [`PoolingMode`] order), then L2 normalisation if
    /// `normalize`.
    pub fn new(mut modes: Vec<PoolingMode>, normalize: bool) -> Self {
        modes.sort_by_key(|mode| *mode as u8);
        modes.dedup();
        Self {
            modes,
            normalize,
            expected_hidden_size: None,
        }
    }

    /// Reads a sentence-transformers pooling `config.json` (normalisation off).
    pub fn from_config(path: &Path) -> Result<Self, ModelError> {
        let config: PoolingConfig = read_json(path)?;
        if !config.include_prompt {
            return Err(ModelError::UnsupportedConfig {
                path: path.to_owned(),
                key: "include_prompt".to_owned(),
                value: "false".to_owned(),
                supported: "`true`".to_owned(),
            });
        }
        let modes: Vec<PoolingMode> = [
            (config.pooling_mode_cls_token, PoolingMode::Cls),
            (config.pooling_mode_max_tokens, PoolingMode::Max),
            (config.pooling_mode_mean_tokens, PoolingMode::Mean),
            (
                config.pooling_mode_mean_sqrt_len_tokens,
                PoolingMode::MeanSqrtLen,
            ),
            (
                config.pooling_mode_weightedmean_tokens,
                PoolingMode::WeightedMean,
            ),
            (config.pooling_mode_lasttoken, PoolingMode::LastToken),
        ]
        .into_iter()
        .filter_map(|(on, mode)| on.then_some(mode))
        .collect();
        if modes.is_empty() {
            return Err(ModelError::BadConfig {
                path: path.to_owned(),
                key: ".".to_owned(),
                message: "no `pooling_mode_*` is true".to_owned(),
            });
        }
        Ok(Self {
            expected_hidden_size: Some(config.word_embedding_dimension),
            ..Self::new(modes, false)
        })
    }

    pub fn modes(&self) -> &[PoolingMode] {
        &self.modes
    }

    pub fn normalize(&self) -> bool {
        self.normalize
    }

    /// The hidden size the pooling config was written for, if it names one.
    pub fn expected_hidden_size(&self) -> Option<usize> {
        self.expected_hidden_size
    }

    /// The sentence embedding's dimension for token states of `hidden_size`.
    pub fn output_dim(&self, hidden_size: usize) -> usize {
        hidden_size * self.modes.len()
    }

    /// Pools `hidden` (`[batch, seq, hidden]`) under `attention_mask` (`[batch, seq]`, 1 for tokens
    /// and 0 for right padding, any dtype) into `[batch, output_dim]`. Differentiable.
    pub fn forward(&self, hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor, ModelError> {
        self.pool(hidden, attention_mask)
            .during(|| "pooling token states".to_owned())
    }

    fn pool(&self, hidden: &Tensor, attention_mask: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, seq, width) = hidden.dims3()?;
        let mask = attention_mask.to_dtype(hidden.dtype())?.unsqueeze(2)?; // [batch, seq, 1]
        let token_count = || mask.sum(1)?.clamp(1e-9, f64::INFINITY); // [batch, 1]
        let masked = hidden.broadcast_mul(&mask)?;
        let mut parts = Vec::with_capacity(self.modes.len());
        for mode in &self.modes {
            parts.push(match mode {
                PoolingMode::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
                PoolingMode::Max => {
                    // Padding becomes -1e9 (`masked` is exact at real tokens: x * 1 + 0).
                    let padding = mask.affine(1e9, -1e9)?;
                    masked.broadcast_add(&padding)?.max(1)?
                }
                PoolingMode::Mean => masked.sum(1)?.broadcast_div(&token_count()?)?,
                PoolingMode::MeanSqrtLen => {
                    masked.sum(1)?.broadcast_div(&token_count()?.sqrt()?)?
                }
                PoolingMode::WeightedMean => {
                    let positions = Tensor::arange(1u32, seq as u32 + 1, hidden.device())?
                        .to_dtype(hidden.dtype())?
                        .reshape((1, seq, 1))?;
                    let weights = mask.broadcast_mul(&positions)?;
                    let total = weights.sum(1)?.clamp(1e-9, f64::INFINITY)?;
                    hidden
                        .broadcast_mul(&weights)?
                        .sum(1)?
                        .broadcast_div(&total)?
                }
                PoolingMode::LastToken => {
                    // Right padding: the last real token is at (token count - 1). A row without
                    // tokens takes position 0, which `masked` has zeroed, as upstream does.
                    let lengths = attention_mask
                        .to_dtype(DType::F32)?
                        .sum(1)?
                        .to_vec1::<f32>()?;
                    let rows: Vec<u32> = lengths
                        .iter()
                        .enumerate()
                        .map(|(b, len)| (b * seq + (*len as usize).saturating_sub(1)) as u32)
                        .collect();
                    let rows = Tensor::from_vec(rows, batch, hidden.device())?;
                    masked
                        .reshape((batch * seq, width))?
                        .index_select(&rows, 0)?
                }
            });
        }
        let pooled = Tensor::cat(&parts, 1)?;
        if !self.normalize {
            return Ok(pooled);
        }
        let norm = pooled
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12, f64::INFINITY)?;
        pooled.broadcast_div(&norm)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    const BATCH: usize = 3;
    const SEQ: usize = 5;
    const WIDTH: usize = 4;
    /// Real tokens per row; the rest is padding.
    const LENGTHS: [usize; BATCH] = [5, 3, 1];

    fn random_hidden(seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..BATCH * SEQ * WIDTH)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect()
    }

    fn mask() -> Tensor {
        let mask: Vec<u32> = LENGTHS
            .iter()
            .flat_map(|&len| (0..SEQ).map(move |t| u32::from(t < len)))
            .collect();
        Tensor::from_vec(mask, (BATCH, SEQ), &Device::Cpu).expect("mask")
    }

    /// One mode of one row, by loops over the row's real tokens.
    fn naive(mode: PoolingMode, hidden: &[f64], row: usize) -> Vec<f64> {
        let len = LENGTHS[row];
        let at = |t: usize, d: usize| hidden[(row * SEQ + t) * WIDTH + d];
        (0..WIDTH)
            .map(|d| match mode {
                PoolingMode::Cls => at(0, d),
                PoolingMode::Max => (0..len).map(|t| at(t, d)).fold(f64::MIN, f64::max),
                PoolingMode::Mean => (0..len).map(|t| at(t, d)).sum::<f64>() / len as f64,
                PoolingMode::MeanSqrtLen => {
                    (0..len).map(|t| at(t, d)).sum::<f64>() / (len as f64).sqrt()
                }
                PoolingMode::WeightedMean => {
                    let weights: f64 = (1..=len).map(|w| w as f64).sum();
                    (0..len).map(|t| at(t, d) * (t + 1) as f64).sum::<f64>() / weights
                }
                PoolingMode::LastToken => at(len - 1, d),
            })
            .collect()
    }

    const ALL_MODES: [PoolingMode; 6] = [
        PoolingMode::Cls,
        PoolingMode::Max,
        PoolingMode::Mean,
        PoolingMode::MeanSqrtLen,
        PoolingMode::WeightedMean,
        PoolingMode::LastToken,
    ];

    #[test]
    fn each_mode_and_their_concatenation_match_naive_pooling() {
        let hidden = random_hidden(1);
        let tensor = Tensor::from_slice(&hidden, (BATCH, SEQ, WIDTH), &Device::Cpu).expect("t");
        let mut cases: Vec<Vec<PoolingMode>> = ALL_MODES.iter().map(|m| vec![*m]).collect();
        cases.push(vec![PoolingMode::Mean, PoolingMode::Cls, PoolingMode::Max]);
        for normalize in [false, true] {
            for modes in &cases {
                let pooling = Pooling::new(modes.clone(), normalize);
                let got = pooling
                    .forward(&tensor, &mask())
                    .and_then(|t| t.to_vec2::<f64>().during(String::new))
                    .expect("pooling runs");
                assert_eq!(got[0].len(), pooling.output_dim(WIDTH));
                for (row, got) in got.iter().enumerate() {
                    // Concatenated in canonical order, whatever order `new` was given.
                    let mut want: Vec<f64> = pooling
                        .modes()
                        .iter()
                        .flat_map(|mode| naive(*mode, &hidden, row))
                        .collect();
                    if normalize {
                        let norm = want.iter().map(|v| v * v).sum::<f64>().sqrt();
                        want.iter_mut().for_each(|v| *v /= norm);
                    }
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() < 1e-12,
                            "{modes:?} row {row}: {got:?} vs {want:?}"
                        );
                    }
                }
            }
        }
    }

    /// Every mode's backward, against central differences on the token states.
    #[test]
    fn pooling_gradients_match_central_differences() {
        let hidden = random_hidden(2);
        let var = Var::from_slice(&hidden, (BATCH, SEQ, WIDTH), &Device::Cpu).expect("var");
        let pooling = Pooling::new(ALL_MODES.to_vec(), true);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let directions: Vec<f64> = (0..BATCH * pooling.output_dim(WIDTH))
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let directions =
            Tensor::from_vec(directions, (BATCH, pooling.output_dim(WIDTH)), &Device::Cpu)
                .expect("directions");
        let loss = |states: &Tensor| {
            pooling
                .forward(states, &mask())
                .and_then(|p| {
                    (p * &directions)
                        .and_then(|t| t.sum_all())
                        .during(String::new)
                })
                .expect("loss")
        };
        let grad = loss(var.as_tensor())
            .backward()
            .expect("backward")
            .get(var.as_tensor())
            .and_then(|g| g.flatten_all().ok()?.to_vec1::<f64>().ok())
            .expect("a gradient");
        for (index, analytic) in grad.iter().enumerate() {
            let at = |delta: f64| {
                let mut values = hidden.clone();
                values[index] += delta;
                let states =
                    Tensor::from_vec(values, (BATCH, SEQ, WIDTH), &Device::Cpu).expect("perturbed");
                loss(&states).to_scalar::<f64>().expect("scalar")
            };
            let numeric = (at(1e-6) - at(-1e-6)) / 2e-6;
            assert!(
                (analytic - numeric).abs() < 1e-7,
                "d/dhidden[{index}]: analytic {analytic}, numeric {numeric}"
            );
        }
        let padded_row_2 = (WIDTH..SEQ * WIDTH).map(|i| 2 * SEQ * WIDTH + i);
        assert!(
            padded_row_2.clone().all(|i| grad[i] == 0.),
            "padding gets no gradient"
        );
    }

    fn write(dir: &Path, name: &str, text: &str) {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }

    const MODULES: &str = r#"[
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    ]"#;
    const CLS_POOLING: &str = r#"{"word_embedding_dimension": 8, "pooling_mode_cls_token": true,
        "pooling_mode_mean_tokens": false, "pooling_mode_max_tokens": false,
        "pooling_mode_mean_sqrt_len_tokens": false}"#;

    #[test]
    fn reads_modules_json_and_the_pooling_config() {
        let dir = tempfile::tempdir().expect("temp dir");
        write(dir.path(), "modules.json", MODULES);
        write(dir.path(), "1_Pooling/config.json", CLS_POOLING);
        let modules = SentenceModules::read(dir.path()).expect("reads");
        assert_eq!(modules.transformer_dir, dir.path().join(""));
        assert_eq!(modules.pooling.modes(), [PoolingMode::Cls]);
        assert!(modules.pooling.normalize());
        assert_eq!(modules.pooling.expected_hidden_size(), Some(8));

        // Older layout: the transformer in a subfolder, no Normalize.
        let old = r#"[
            {"path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
            {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
        ]"#;
        write(dir.path(), "modules.json", old);
        let modules = SentenceModules::read(dir.path()).expect("reads");
        assert_eq!(modules.transformer_dir, dir.path().join("0_Transformer"));
        assert!(!modules.pooling.normalize());
    }

    #[test]
    fn a_folder_without_modules_json_pools_by_mean() {
        let dir = tempfile::tempdir().expect("temp dir");
        let modules = SentenceModules::read(dir.path()).expect("reads");
        assert_eq!(modules.transformer_dir, dir.path());
        assert_eq!(
            modules.pooling,
            Pooling::new(vec![PoolingMode::Mean], false)
        );
    }

    #[test]
    fn refuses_modules_and_settings_it_cannot_honour() {
        let dir = tempfile::tempdir().expect("temp dir");
        write(dir.path(), "1_Pooling/config.json", CLS_POOLING);
        let dense = MODULES.replace(
            "sentence_transformers.models.Normalize",
            "sentence_transformers.models.Dense",
        );
        write(dir.path(), "modules.json", &dense);
        let error = SentenceModules::read(dir.path()).expect_err("Dense is not supported");
        assert!(
            matches!(&error, ModelError::UnsupportedModule { module, .. } if module.ends_with("Dense")),
            "{error}"
        );

        write(dir.path(), "modules.json", MODULES);
        let unknown = CLS_POOLING.replace("}", r#", "pooling_mode_something_new": true}"#);
        write(dir.path(), "1_Pooling/config.json", &unknown);
        let error = SentenceModules::read(dir.path()).expect_err("an unknown mode");
        assert!(
            error.to_string().contains("pooling_mode_something_new"),
            "{error}"
        );

        let no_prompt = CLS_POOLING.replace("}", r#", "include_prompt": false}"#);
        write(dir.path(), "1_Pooling/config.json", &no_prompt);
        let error = SentenceModules::read(dir.path()).expect_err("include_prompt false");
        assert!(error.to_string().contains("`include_prompt`"), "{error}");
    }

    #[test]
    fn pooling_keeps_the_token_states_dtype() {
        let hidden = Tensor::zeros((BATCH, SEQ, WIDTH), DType::F32, &Device::Cpu).expect("t");
        let pooled = Pooling::new(vec![PoolingMode::Mean], false)
            .forward(&hidden, &mask())
            .expect("pools");
        assert_eq!(pooled.dtype(), DType::F32);
        assert_eq!(pooled.dims(), [BATCH, WIDTH]);
    }
}
