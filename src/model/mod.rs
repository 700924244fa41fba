//! The sentence-embedding engine: model references and files (`hub`), the trainable BERT encoder,
//! pooling, losses, optimiser, training loop and the sentence-transformers output format. Stages
//! (train, mine, evaluate) call it; it knows nothing about recipes or the terminal.

pub mod device;
pub mod error;
pub mod hub;
