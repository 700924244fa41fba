//! ragd-pipe: fine-tune the embedding models behind a local RAG system on your own documents.
//!
//! A YAML recipe (`recipe`) compiles into a DAG of stages (`plan`), each cached under a content
//! hash (`cache`) and run by the executor (`exec`). Stages (`stages`) call the engines: the
//! sentence-embedding model (`model`), LLM backends (`llm`), search indexes (`index`), metrics
//! (`eval`) and the model registry (`registry`). Only `cli` and `output` touch the terminal.

pub mod cache;
pub mod eval;
pub mod index;
pub mod model;
pub mod recipe;
pub mod stages;

#[cfg(test)]
pub(crate) mod testutil;
