//! Several endpoints as one backend: each call goes to the endpoint with the most free slots
//! (round-robin among equals), at most `concurrency` calls in flight per endpoint, so a GPU box
//! and a laptop serving the same model share the work by their speed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};

use super::{LlmBackend, LlmError, Request};

struct Member {
    backend: Box<dyn LlmBackend>,
    limit: usize,
}

pub struct EndpointPool {
    members: Vec<Member>,
    /// Calls in flight per member.
    in_flight: Mutex<Vec<usize>>,
    freed: Condvar,
    turn: AtomicUsize,
}

impl EndpointPool {
    /// A pool of `(backend, calls in flight allowed)`.
    pub fn new(members: Vec<(Box<dyn LlmBackend>, usize)>) -> Self {
        let members: Vec<Member> = members
            .into_iter()
            .map(|(backend, limit)| Member {
                backend,
                limit: limit.max(1),
            })
            .collect();
        Self {
            in_flight: Mutex::new(vec![0; members.len()]),
            members,
            freed: Condvar::new(),
            turn: AtomicUsize::new(0),
        }
    }

    /// Waits for a free slot and takes it on the least loaded member.
    fn acquire(&self) -> usize {
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            let start = self.turn.fetch_add(1, Ordering::Relaxed);
            let n = self.members.len();
            // The most free slots wins; among equals, the first from this call's turn.
            let mut free: Option<(usize, usize)> = None;
            for i in (0..n).map(|k| (start + k) % n) {
                let slots = self.members[i].limit - in_flight[i];
                if slots > 0 && free.is_none_or(|(_, best)| slots > best) {
                    free = Some((i, slots));
                }
            }
            if let Some((i, _)) = free {
                in_flight[i] += 1;
                return i;
            }
            in_flight = self
                .freed
                .wait(in_flight)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn release(&self, i: usize) {
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        in_flight[i] -= 1;
        self.freed.notify_one();
    }
}

impl LlmBackend for EndpointPool {
    fn name(&self) -> &'static str {
        self.members.first().map_or("pool", |m| m.backend.name())
    }

    /// One identity when every endpoint serves the same model, else all of them.
    fn identity(&self) -> String {
        let mut identities: Vec<String> =
            self.members.iter().map(|m| m.backend.identity()).collect();
        identities.sort();
        identities.dedup();
        identities.join(" + ")
    }

    fn concurrency(&self) -> usize {
        self.members.iter().map(|m| m.limit).sum()
    }

    fn complete(&self, request: &Request) -> Result<String, LlmError> {
        if self.members.is_empty() {
            return Err(LlmError::Unsupported(
                "no endpoint is configured".to_owned(),
            ));
        }
        let i = self.acquire();
        let answer = self.members[i].backend.complete(request);
        self.release(i);
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    /// Counts its calls and the most it saw at once.
    struct Counting {
        calls: Arc<AtomicUsize>,
        now: AtomicUsize,
        peak: Arc<AtomicUsize>,
    }

    impl LlmBackend for Counting {
        fn name(&self) -> &'static str {
            "ollama"
        }
        fn identity(&self) -> String {
            "same model".to_owned()
        }
        fn concurrency(&self) -> usize {
            1
        }
        fn complete(&self, _: &Request) -> Result<String, LlmError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(5));
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok("{}".to_owned())
        }
    }

    #[test]
    fn spreads_calls_and_bounds_each_endpoint() {
        let counters: Vec<(Arc<AtomicUsize>, Arc<AtomicUsize>)> = (0..2)
            .map(|_| (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))))
            .collect();
        let pool = EndpointPool::new(
            counters
                .iter()
                .map(|(calls, peak)| {
                    let backend: Box<dyn LlmBackend> = Box::new(Counting {
                        calls: calls.clone(),
                        now: AtomicUsize::new(0),
                        peak: peak.clone(),
                    });
                    (backend, 2)
                })
                .collect(),
        );
        assert_eq!(pool.concurrency(), 4);
        assert_eq!(pool.identity(), "same model");
        let request = Request {
            system: None,
            prompt: "p".into(),
            json_schema: None,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            max_tokens: 16,
        };
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..5 {
                        pool.complete(&request).expect("fake answers");
                    }
                });
            }
        });
        for (calls, peak) in &counters {
            let calls = calls.load(Ordering::SeqCst);
            assert!(calls >= 10, "each endpoint takes a share: {calls} of 40");
            assert!(
                peak.load(Ordering::SeqCst) <= 2,
                "at most 2 in flight per endpoint"
            );
        }
    }
}
