//! What a GGUF file says about text: its byte-level BPE tokenizer (rebuilt from
//! `tokenizer.ggml.*`, since no `tokenizer.json` ships with it) and its chat template.

use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::LlmError;

/// llama.cpp's token types (`llama_token_type`): control tokens are the chat markers.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The text side of a GGUF model.
pub struct GgufText {
    pub tokenizer: Tokenizer,
    /// Each token's bytes; None for control tokens, which are never text.
    pub token_bytes: Vec<Option<Vec<u8>>>,
    pub bos: Option<String>,
    pub eos_id: u32,
    pub eos: String,
    /// The Jinja chat template, if the file has one.
    pub chat_template: Option<String>,
}

fn bad(path: &Path, message: impl Into<String>) -> LlmError {
    LlmError::BadModel {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn metadata<'a>(content: &'a Content, path: &Path, key: &str) -> Result<&'a Value, LlmError> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| bad(path, format!("no `{key}` in the metadata")))
}

fn strings(content: &Content, path: &Path, key: &str) -> Result<Vec<String>, LlmError> {
    metadata(content, path, key)?
        .to_vec()
        .and_then(|values| values.iter().map(|v| v.to_string().cloned()).collect())
        .map_err(|e| bad(path, format!("`{key}`: {e}")))
}

/// GPT-2's map from bytes to the printable characters byte-level BPE vocabularies are written in.
/// Qwen2's pre-tokenizer split (its `tokenizer.json`'s, as llama.cpp's `qwen2` pre-tokenizer
/// runs it: no NFC normalisation first).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level_chars() -> [char; 256] {
    let mut chars = ['\0'; 256];
    let mut next = 256u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        chars[usize::from(byte)] = if printable {
            char::from(byte)
        } else {
            let c = char::from_u32(next).unwrap_or('\0');
            next += 1;
            c
        };
    }
    chars
}

impl GgufText {
    /// Reads the tokenizer and template of a `gpt2`-model (byte-level BPE) GGUF file.
    pub fn from_gguf(content: &Content, path: &Path) -> Result<Self, LlmError> {
        let model = metadata(content, path, "tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| bad(path, e.to_string()))?;
        if model != "gpt2" {
            return Err(bad(
                path,
                format!("tokenizer model `{model}` is not supported (only byte-level BPE, `gpt2`)"),
            ));
        }
        // How text is split before BPE, as llama.cpp's `tokenizer.ggml.pre` names it.
        let pre = content
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map_or("default", String::as_str);
        let byte_level = ByteLevel::new(false, false, true);
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "default" | "gpt2" => byte_level.into(),
            // SmolLM: every digit on its own, then GPT-2's split.
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            // Qwen2: GPT-4's split with single digits.
            "qwen2" => {
                let split = Split::new(
                    SplitPattern::Regex(QWEN2_SPLIT.to_owned()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
                // Bytes to characters only: GPT-2's own split would undo the one above.
                let to_chars = ByteLevel::new(false, false, false);
                Sequence::new(vec![split.into(), to_chars.into()]).into()
            }
            other => {
                return Err(bad(
                    path,
                    format!("pre-tokenizer `{other}` is not supported (gpt2, smollm, qwen2)"),
                ));
            }
        };
        let tokens = strings(content, path, "tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings(content, path, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|merge| match merge.split_once(' ') {
                Some((a, b)) => Ok((a.to_owned(), b.to_owned())),
                None => Err(bad(path, format!("merge `{merge}` is not two tokens"))),
            })
            .collect::<Result<_, _>>()?;
        let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .and_then(|values| values.iter().map(Value::to_i32).collect())
                .map_err(|e| bad(path, format!("`tokenizer.ggml.token_type`: {e}")))?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(bad(path, "token types and tokens differ in number"));
        }
        let id = |key: &str| -> Result<Option<u32>, LlmError> {
            content
                .metadata
                .get(key)
                .map(|v| v.to_u32().map_err(|e| bad(path, format!("`{key}`: {e}"))))
                .transpose()
        };
        let eos_id = id("tokenizer.ggml.eos_token_id")?
            .ok_or_else(|| bad(path, "no `tokenizer.ggml.eos_token_id`"))?;
        let bos_id = id("tokenizer.ggml.bos_token_id")?;
        let name_of = |id: u32| {
            tokens
                .get(id as usize)
                .cloned()
                .ok_or_else(|| bad(path, format!("token id {id} is beyond the vocabulary")))
        };
        let eos = name_of(eos_id)?;
        let bos = bos_id.map(name_of).transpose()?;

        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .map(|(token, t)| AddedToken::from(token.clone(), *t == TOKEN_TYPE_CONTROL))
            .collect();
        tokenizer
            .add_special_tokens(special)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?;

        let chars = byte_level_chars();
        let byte_of: std::collections::HashMap<char, u8> = chars
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let token_bytes = tokens
            .iter()
            .zip(&types)
            .map(|(token, &t)| {
                if t == TOKEN_TYPE_CONTROL {
                    return None;
                }
                // A user-defined token is plain text; a normal one is in byte-level characters.
                if t == TOKEN_TYPE_USER_DEFINED {
                    return Some(token.as_bytes().to_vec());
                }
                token.chars().map(|c| byte_of.get(&c).copied()).collect()
            })
            .collect();
        let chat_template = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        Ok(Self {
            tokenizer,
            token_bytes,
            bos,
            eos_id,
            eos,
            chat_template,
        })
    }

    /// Token ids of `text`, special tokens written in it (`<|im_start|>`) included.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, LlmError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| LlmError::Tokenizer(e.to_string()))
    }
}

/// Renders chat messages with a model's Jinja template, as Hugging Face's `apply_chat_template`
/// does (Python string methods included, through minijinja's pycompat).
pub fn render_chat(
    template: &str,
    messages: &[(&str, &str)],
    bos: Option<&str>,
    eos: &str,
) -> Result<String, LlmError> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| LlmError::Template(e.to_string()))?;
    let messages: Vec<minijinja::Value> = messages
        .iter()
        .map(|(role, content)| minijinja::context! { role => role, content => content })
        .collect();
    env.get_template("chat")
        .and_then(|t| {
            t.render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => bos.unwrap_or_default(),
                eos_token => eos,
            })
        })
        .map_err(|e| LlmError::Template(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(path: &Path) -> GgufText {
        let mut file = std::fs::File::open(path).expect("open the GGUF");
        let content = Content::read(&mut file).expect("read the GGUF");
        GgufText::from_gguf(&content, path).expect("a byte-level BPE tokenizer")
    }

    fn smollm2() -> GgufText {
        text_of(&crate::testutil::smollm2_gguf())
    }

    /// Qwen2's pre-tokenizer (GPT-4's split, single digits): the truth is llama.cpp's
    /// tokenizer (node-llama-cpp 3.22.1, `model.tokenize(text, true)`) for the real file.
    #[test]
    fn qwen2_token_ids_match_llama_cpp() {
        let Some(path) = crate::testutil::qwen2_gguf() else {
            return;
        };
        let text = text_of(&path);
        let cases: &[(&str, &[u32])] = &[
            ("Hello world", &[9707, 1879]),
            (
                "Snapshots are kept for 30 days, aren't they?",
                &[
                    61871, 27634, 525, 8604, 369, 220, 18, 15, 2849, 11, 7629, 944, 807, 30,
                ],
            ),
            (
                "Größe café — naïve 東京 🙂",
                &[
                    6464, 78940, 51950, 1959, 94880, 586, 60596, 109, 46553, 27484,
                ],
            ),
            (
                r#"{"queries": ["How do I restore a snapshot?"]}"#,
                &[
                    4913, 42835, 788, 4383, 4340, 653, 358, 14952, 264, 16295, 30, 92446,
                ],
            ),
            (
                "<|im_start|>user\nhi<|im_end|>\n",
                &[151644, 872, 198, 6023, 151645, 198],
            ),
            (
                "  two  spaces\n\nnewlines\t tab 12345",
                &[
                    220, 1378, 220, 12621, 271, 931, 7969, 197, 5651, 220, 16, 17, 18, 19, 20,
                ],
            ),
            (
                "Ａｍｅｌｉｅ e\u{301} it's IT'S",
                &[
                    133054, 138125, 144115, 144433, 144155, 144115, 384, 53839, 432, 594, 8700,
                    13272,
                ],
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(text.encode(input).expect("encodes"), *expected, "{input:?}");
        }
        assert_eq!((text.eos_id, text.eos.as_str()), (151645, "<|im_end|>"));
    }

    /// The truth is llama.cpp's own tokenizer for this file: the `context` token ids that Ollama
    /// (0.5.4, serving this very GGUF as `smollm2:135m`) returned for each text sent with the
    /// template `{{ .Prompt }}`, the generated token removed.
    #[test]
    fn token_ids_match_llama_cpp() {
        let text = smollm2();
        let cases: &[(&str, &[u32])] = &[
            ("Hello world", &[19556, 905]),
            (
                "Snapshots are kept for 30 days, aren't they?",
                &[
                    24222, 512, 28885, 359, 5454, 327, 216, 35, 32, 2009, 28, 4775, 982, 502, 47,
                ],
            ),
            (
                "Größe café — naïve 東京 🙂",
                &[
                    27302, 7466, 34878, 85, 37366, 1841, 15486, 46494, 17097, 247, 126, 16736, 122,
                    47526,
                ],
            ),
            (
                r#"{"queries": ["How do I restore a snapshot?"]}"#,
                &[
                    39428, 44143, 1799, 9523, 2020, 536, 339, 9691, 253, 25552, 47, 3222, 109,
                ],
            ),
            (
                "<|im_start|>user\nhi<|im_end|>\n",
                &[1, 4093, 198, 6004, 2, 198],
            ),
            (
                "  two  spaces\n\nnewlines\t tab 12345",
                &[
                    216, 827, 216, 5600, 198, 198, 2241, 5110, 197, 10147, 216, 33, 34, 35, 36, 37,
                ],
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(text.encode(input).expect("encodes"), *expected, "{input:?}");
        }
        assert_eq!((text.eos_id, text.eos.as_str()), (2, "<|im_end|>"));
        // Token bytes round-trip the text (the decoder constrained decoding relies on).
        let ids = text.encode("Größe café 🙂 {\"a\": 1}").expect("encodes");
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| text.token_bytes[id as usize].clone().unwrap_or_default())
            .collect();
        assert_eq!(String::from_utf8_lossy(&bytes), "Größe café 🙂 {\"a\": 1}");
        assert!(text.token_bytes[2].is_none(), "control tokens are not text");
    }

    #[test]
    fn renders_the_files_chat_template() {
        let text = smollm2();
        let template = text
            .chat_template
            .as_deref()
            .expect("SmolLM2 ships a template");
        let rendered = render_chat(
            template,
            &[("system", "Be brief."), ("user", "Hi?")],
            text.bos.as_deref(),
            &text.eos,
        )
        .expect("renders");
        assert_eq!(
            rendered,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        );
        // Without a system message the template adds its own.
        let rendered = render_chat(template, &[("user", "Hi?")], None, "</s>").expect("renders");
        assert!(rendered.starts_with("<|im_start|>system\nYou are a helpful AI assistant"));
    }

    #[test]
    fn python_string_methods_work_in_templates() {
        let rendered = render_chat(
            "{% for m in messages %}{{ m['content'].strip().upper() }}{% endfor %}",
            &[("user", "  hi  ")],
            None,
            "",
        )
        .expect("pycompat renders .strip() and .upper()");
        assert_eq!(rendered, "HI");
    }
}
