//! Integration tests: the real `ragd-pipe` binary on temporary projects.

mod util;

mod caching;
mod cli;
mod diagnostics;
mod getting_started;
mod guide;
mod layering;
mod llm;
mod ollama;
mod pipeline;
mod regressions;
mod rerank;
mod train;
mod ui_api;
mod ui_browser;
mod ui_server;
