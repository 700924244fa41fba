//! GGUF, the file format of llama.cpp and Ollama: our BERT sentence encoder written as
//! llama.cpp's `bert` architecture (what its `convert_hf_to_gguf.py` writes) in f32, f16 or
//! q8_0, and such a file read back into a sentence-transformers folder to fine-tune.
//!
//! `file` writes the container (GGUF v3); candle's `gguf_file::Content` reads it. `bert` maps
//! our checkpoint, tokenizer and pooling to the `bert.*` and `tokenizer.ggml.*` keys and tensor
//! names and back.

mod bert;
mod file;

pub use bert::{
    CONVERTER_COMMIT, ExportedGguf, GgufType, ImportedGguf, export_bert, import_bert,
    metadata_json, not_exportable,
};
