//! The response cache and the concurrent runner every LLM-calling stage goes through.
//!
//! Every answer is keyed by the blake3 of (backend, model identity, request: prompt, options,
//! schema) and appended to a JSONL journal the moment it arrives (flushed at once, fsync'd about
//! once a second, a torn last line ignored on load; see [`crate::cache::journal`]). A run killed
//! after 9,000 of 10,000 calls therefore redoes none of them, and a changed recipe only pays
//! for requests it has not asked before.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{LlmBackend, LlmError, Request};
use crate::cache::journal::Journal;

/// One journaled answer.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    key: String,
    answer: String,
}

/// Answers by request key, backed by an append-only journal.
pub struct ResponseCache {
    path: PathBuf,
    answers: Mutex<HashMap<String, String>>,
    journal: Mutex<Journal<Entry>>,
}

impl ResponseCache {
    /// Opens (creating) the cache at `path` and loads the answers already in it.
    pub fn open(path: &Path) -> Result<Self, LlmError> {
        let cache_error = |source| LlmError::Cache {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            fs_err::create_dir_all(dir).map_err(cache_error)?;
        }
        let (journal, entries) = Journal::<Entry>::open(path).map_err(cache_error)?;
        let answers = entries.into_iter().map(|e| (e.key, e.answer)).collect();
        Ok(Self {
            path: path.to_path_buf(),
            answers: Mutex::new(answers),
            journal: Mutex::new(journal),
        })
    }

    /// The key of `request` sent to `backend`.
    pub fn key(backend: &dyn LlmBackend, request: &Request) -> String {
        let mut hasher = blake3::Hasher::new();
        for part in [backend.name(), &backend.identity()] {
            hasher.update(part.as_bytes());
            hasher.update(&[0]);
        }
        // Serializing a Request cannot fail (no maps with non-string keys); an empty string
        // would still key it by backend alone, never a wrong answer across prompts.
        hasher.update(
            serde_json::to_string(request)
                .unwrap_or_default()
                .as_bytes(),
        );
        hasher.finalize().to_hex().to_string()
    }

    fn get(&self, key: &str) -> Option<String> {
        self.answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    fn put(&self, key: String, answer: String) -> Result<(), LlmError> {
        let entry = Entry { key, answer };
        self.journal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .append(&entry)
            .map_err(|source| LlmError::Cache {
                path: self.path.clone(),
                source,
            })?;
        self.answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(entry.key, entry.answer);
        Ok(())
    }

    /// Answers held.
    pub fn len(&self) -> usize {
        self.answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a batch of requests cost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CallStats {
    pub requests: usize,
    /// Answered from the cache.
    pub cached: usize,
    /// Answered by the backend in this run.
    pub calls: usize,
    /// Seconds spent calling.
    pub seconds: f64,
}

impl CallStats {
    pub fn calls_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.calls as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Answers every request, from the cache where it can and otherwise from `backend` with
/// `backend.concurrency()` calls in flight, journaling each answer as it arrives.
///
/// `on_progress` sees the running figures after each answer. The first call that fails after
/// the backend's retries stops the batch and is returned (answers so far stay cached); so does
/// `cancel`, as [`LlmError::Cancelled`], once the calls in flight have finished.
pub fn complete_all(
    backend: &dyn LlmBackend,
    cache: &ResponseCache,
    requests: &[Request],
    cancel: &AtomicBool,
    on_progress: &(dyn Fn(&CallStats) + Sync),
) -> Result<(Vec<String>, CallStats), LlmError> {
    let keys: Vec<String> = requests
        .iter()
        .map(|r| ResponseCache::key(backend, r))
        .collect();
    // One call per distinct missing key, for the first request that has it.
    let mut seen = std::collections::HashSet::new();
    let pending: Vec<usize> = (0..requests.len())
        .filter(|&i| cache.get(&keys[i]).is_none() && seen.insert(keys[i].clone()))
        .collect();
    let stats = Mutex::new(CallStats {
        requests: requests.len(),
        cached: requests.len() - pending.len(),
        ..CallStats::default()
    });
    on_progress(&stats.lock().unwrap_or_else(PoisonError::into_inner));
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<LlmError>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let workers = backend.concurrency().clamp(1, pending.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) && !cancel.load(Ordering::Relaxed) {
                    let Some(&i) = pending.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        break;
                    };
                    let outcome = backend
                        .complete(&requests[i])
                        .and_then(|answer| cache.put(keys[i].clone(), answer));
                    if let Err(error) = outcome {
                        stop.store(true, Ordering::Relaxed);
                        failure
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get_or_insert(error);
                        break;
                    }
                    let mut stats = stats.lock().unwrap_or_else(PoisonError::into_inner);
                    stats.calls += 1;
                    stats.seconds = started.elapsed().as_secs_f64();
                    on_progress(&stats);
                }
            });
        }
    });
    if let Some(error) = failure.into_inner().unwrap_or_else(PoisonError::into_inner) {
        return Err(error);
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(LlmError::Cancelled);
    }
    let answers = keys
        .iter()
        .map(|key| cache.get(key).ok_or(LlmError::Cancelled))
        .collect::<Result<Vec<_>, _>>()?;
    let mut stats = stats.into_inner().unwrap_or_else(PoisonError::into_inner);
    stats.seconds = started.elapsed().as_secs_f64();
    Ok((answers, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers with the prompt reversed, counting calls; cancels the batch after `cancel_after`.
    struct Echo<'a> {
        calls: AtomicUsize,
        cancel_after: Option<(usize, &'a AtomicBool)>,
        fail_on: Option<&'a str>,
    }

    impl LlmBackend for Echo<'_> {
        fn name(&self) -> &'static str {
            "ollama"
        }
        fn identity(&self) -> String {
            "echo".to_owned()
        }
        fn concurrency(&self) -> usize {
            3
        }
        fn complete(&self, request: &Request) -> Result<String, LlmError> {
            if self.fail_on == Some(request.prompt.as_str()) {
                return Err(LlmError::Http {
                    url: "http://127.0.0.1:9".to_owned(),
                    message: "connection refused".to_owned(),
                });
            }
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if let Some((after, cancel)) = self.cancel_after
                && n >= after
            {
                cancel.store(true, Ordering::SeqCst);
            }
            Ok(request.prompt.chars().rev().collect())
        }
    }

    fn requests(n: usize) -> Vec<Request> {
        (0..n)
            .map(|i| Request {
                system: Some("s".to_owned()),
                prompt: format!("prompt {i}"),
                json_schema: None,
                temperature: 0.7,
                top_p: 0.9,
                seed: 1,
                max_tokens: 64,
            })
            .collect()
    }

    #[test]
    fn a_rerun_after_an_interruption_repeats_no_call() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("llm/responses.jsonl");
        let requests = requests(40);
        let cancel = AtomicBool::new(false);
        let first = Echo {
            calls: AtomicUsize::new(0),
            cancel_after: Some((15, &cancel)),
            fail_on: None,
        };
        {
            let cache = ResponseCache::open(&path).expect("open");
            let outcome = complete_all(&first, &cache, &requests, &cancel, &|_| {});
            assert!(matches!(outcome, Err(LlmError::Cancelled)));
        }
        let made = first.calls.load(Ordering::SeqCst);
        assert!((15..40).contains(&made), "stopped early: {made}");

        // The rerun (a new process: the cache reopened from disk) calls only what is missing.
        let never_cancel = AtomicBool::new(false);
        let second = Echo {
            calls: AtomicUsize::new(0),
            cancel_after: None,
            fail_on: None,
        };
        let cache = ResponseCache::open(&path).expect("reopen");
        assert_eq!(cache.len(), made);
        let (answers, stats) =
            complete_all(&second, &cache, &requests, &never_cancel, &|_| {}).expect("completes");
        assert_eq!(second.calls.load(Ordering::SeqCst), 40 - made);
        assert_eq!((stats.cached, stats.calls), (made, 40 - made));
        assert_eq!(answers[7], "7 tpmorp");

        // A third run is all cache.
        let third = Echo {
            calls: AtomicUsize::new(0),
            cancel_after: None,
            fail_on: None,
        };
        complete_all(&third, &cache, &requests, &never_cancel, &|_| {}).expect("completes");
        assert_eq!(third.calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_failing_server_stops_the_batch_and_keeps_what_was_answered() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("responses.jsonl");
        let cancel = AtomicBool::new(false);
        let backend = Echo {
            calls: AtomicUsize::new(0),
            cancel_after: None,
            fail_on: Some("prompt 20"),
        };
        let cache = ResponseCache::open(&path).expect("open");
        let error = complete_all(&backend, &cache, &requests(40), &cancel, &|_| {})
            .expect_err("the server fails");
        assert!(error.to_string().contains("connection refused"), "{error}");
        let answered = backend.calls.load(Ordering::SeqCst);
        assert!(answered >= 1);
        drop(cache);
        assert_eq!(ResponseCache::open(&path).expect("reopen").len(), answered);
    }

    #[test]
    fn keys_change_with_every_option() {
        let backend = Echo {
            calls: AtomicUsize::new(0),
            cancel_after: None,
            fail_on: None,
        };
        let base = requests(1).remove(0);
        let key = ResponseCache::key(&backend, &base);
        let mut seeded = base.clone();
        seeded.seed = 2;
        let mut schema = base.clone();
        schema.json_schema = Some(serde_json::json!({"type": "boolean"}));
        assert_ne!(key, ResponseCache::key(&backend, &seeded));
        assert_ne!(key, ResponseCache::key(&backend, &schema));
        assert_eq!(key, ResponseCache::key(&backend, &base));
    }
}
