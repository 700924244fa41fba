//! The sentence-embedding engine: model references and files (`hub`), the trainable BERT encoder
//! (`bert`, on the fused-kernel seam `kernels`), its benchmark (`bench`), weights on disk (`checkpoint`), tokenization
//! (`tokenize`), pooling (`pooling`), the assembled encoder (`encoder`) and device choice
//! (`device`). Stages (train, mine, evaluate) call it; it knows nothing about recipes or the
//! terminal.

pub mod bench;
pub mod bert;
pub mod checkpoint;
mod config_file;
pub mod device;
pub mod encoder;
pub mod error;
pub mod hub;
pub mod kernels;
pub mod pooling;
pub mod tokenize;
pub mod train;
