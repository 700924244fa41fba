//! The sentence-embedding engine: model references and files (`hub`), the trainable BERT encoder
//! (`bert`, on the fused-kernel seam `kernels`; MPNet as its variant, `mpnet`), its benchmark (`bench`), weights on disk (`checkpoint`), tokenization
//! (`tokenize`), pooling (`pooling`), the assembled encoder (`encoder`), the cross-encoder
//! reranker on the same BERT (`cross_encoder`), device choice (`device`), GGUF export and import
//! (`gguf`) and Ollama as a home of embedding models (`ollama`). Stages (train, mine, evaluate)
//! call it; it knows nothing about recipes or the
//! terminal.

pub mod bench;
pub mod bert;
pub mod checkpoint;
pub(crate) mod config_file;
pub mod cross_encoder;
pub mod device;
pub mod encoder;
pub mod error;
pub mod gguf;
pub mod hub;
pub mod kernels;
pub mod merge;
pub mod mpnet;
pub mod ollama;
pub mod pickle_guard;
pub mod pooling;
pub mod prompts;
pub mod tokenize;
pub mod train;
