//! The `local` backend: a GGUF model (`llama` or `qwen2` architecture: SmolLM2, Qwen2.5) run
//! in-process by our batched decoder ([`super::transformer`]), with seeded temperature/top-p
//! sampling and JSON-schema constrained decoding ([`super::grammar`]) per sequence.
//!
//! Continuous batching: callers' requests (from [`super::complete_all`]'s workers, one per slot)
//! queue for one engine thread, which keeps up to `batch` sequences in flight. Each step is one
//! forward pass over every sequence's new tokens (whole prompts for those just admitted, one
//! token for the others); a finished sequence's answer goes back to its caller at once (who
//! journals it) and its slot takes the next prompt. Reading every weight once per step for the
//! whole batch is what makes it fast: a step for one sequence costs nearly what it costs for 32.
//!
//! A sequence's tokens do not depend on what else is in the batch (see the transformer), so the
//! answers are the same however requests arrive.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use candle_core::quantized::gguf_file::Content;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::gguf::{GgufText, render_chat};
use super::grammar::{JsonGrammar, MatchState};
use super::transformer::{KvCache, Segment, Transformer};
use super::{LlmBackend, LlmError, Request};
use crate::model::kernels::{exp, multiversion};

/// Tokens whose logit is this far (after temperature) below the best have under e^-30 of its
/// probability: they are never sampled and need no grammar check.
const NEGLIGIBLE_LOGIT_GAP: f32 = 30.0;

/// Prompt tokens admitted into one step at most (one prompt may exceed it alone), so sequences
/// already decoding are not held up long by a wave of new prompts.
const PREFILL_TOKENS_PER_STEP: usize = 4096;

/// How long a waking engine waits for more requests before its first step, so a batch of
/// callers starting together share it.
const GATHER: Duration = Duration::from_millis(20);

pub struct LocalBackend {
    identity: String,
    text: Arc<GgufText>,
    template: String,
    batch: usize,
    context: usize,
    engine: &'static str,
    /// The model until the engine thread takes it, on the first call.
    model: Mutex<Option<Transformer>>,
    queue: OnceLock<Mutex<mpsc::Sender<Job>>>,
    grammars: Mutex<HashMap<String, Arc<JsonGrammar>>>,
    /// Checked between steps, so Ctrl-C does not wait for answers being written.
    cancel: Arc<AtomicBool>,
}

/// One request on its way to the engine, with where its answer goes.
struct Job {
    prompt: Vec<u32>,
    request: Request,
    grammar: Option<Arc<JsonGrammar>>,
    reply: mpsc::Sender<Result<String, LlmError>>,
}

/// A sequence in flight.
struct Sequence {
    job: Job,
    cache: KvCache,
    rng: rand_chacha::ChaCha8Rng,
    state: Option<MatchState>,
    answer: Vec<u8>,
    /// Tokens to feed in the next step: the prompt, then each chosen token.
    feed: Vec<u32>,
    chosen: usize,
}

fn bad(path: &Path, message: impl Into<String>) -> LlmError {
    LlmError::BadModel {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl LocalBackend {
    /// Loads a GGUF model to decode up to `batch` sequences together, on the CPU whatever the
    /// recipe's accelerator (the decoder has CPU kernels only; a GPU serves through Ollama).
    pub fn load(path: &Path, batch: usize) -> Result<Self, LlmError> {
        let mut file = std::fs::File::open(path).map_err(|e| bad(path, e.to_string()))?;
        let content =
            Content::read(&mut file).map_err(|e| bad(path, format!("not a GGUF file: {e}")))?;
        let text = GgufText::from_gguf(&content, path)?;
        let template = text
            .chat_template
            .clone()
            .ok_or_else(|| bad(path, "has no `tokenizer.chat_template`"))?;
        let model = Transformer::load(&content, &mut file, path)?;
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_mmap_rayon(path)
            .map_err(|e| bad(path, e.to_string()))?;
        let engine = model.engine();
        Ok(Self {
            // The decoder's arithmetic decides the answers too: a new engine or its CPU path
            // must not reuse another's cached answers.
            identity: format!(
                "gguf blake3:{} (batched decoder v1, {engine})",
                hasher.finalize().to_hex()
            ),
            text: Arc::new(text),
            template,
            batch: batch.max(1),
            context: model.config.context,
            engine,
            model: Mutex::new(Some(model)),
            queue: OnceLock::new(),
            grammars: Mutex::new(HashMap::new()),
            cancel: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Stops calls in progress with [`LlmError::Cancelled`] once `flag` is set.
    pub fn with_cancel(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = flag;
        self
    }

    /// What multiplies the weights on this machine.
    pub fn engine(&self) -> &'static str {
        self.engine
    }

    /// Token ids of the chat prompt for `request`.
    pub fn prompt_ids(&self, request: &Request) -> Result<Vec<u32>, LlmError> {
        let mut messages = Vec::new();
        if let Some(system) = &request.system {
            messages.push(("system", system.as_str()));
        }
        messages.push(("user", request.prompt.as_str()));
        let rendered = render_chat(
            &self.template,
            &messages,
            self.text.bos.as_deref(),
            &self.text.eos,
        )?;
        self.text.encode(&rendered)
    }

    /// Tokens of `text` under the model's tokenizer (0 where it cannot be encoded).
    pub fn count_tokens(&self, text: &str) -> usize {
        self.text.encode(text).map_or(0, |ids| ids.len())
    }

    fn grammar(&self, schema: &serde_json::Value) -> Result<Arc<JsonGrammar>, LlmError> {
        let key = schema.to_string();
        let mut grammars = self.grammars.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(grammar) = grammars.get(&key) {
            return Ok(grammar.clone());
        }
        let grammar = Arc::new(JsonGrammar::compile(schema)?);
        grammars.insert(key, grammar.clone());
        Ok(grammar)
    }

    /// The engine's queue, starting the engine thread on first use.
    fn queue(&self) -> mpsc::Sender<Job> {
        let queue = self.queue.get_or_init(|| {
            let (sender, jobs) = mpsc::channel();
            let model = self
                .model
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(model) = model {
                let engine = Engine {
                    model,
                    text: self.text.clone(),
                    batch: self.batch,
                    cancel: self.cancel.clone(),
                };
                std::thread::Builder::new()
                    .name("ragd-llm".to_owned())
                    .spawn(move || engine.serve(&jobs))
                    .ok();
            }
            Mutex::new(sender)
        });
        queue.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// The engine thread's state.
struct Engine {
    model: Transformer,
    text: Arc<GgufText>,
    batch: usize,
    cancel: Arc<AtomicBool>,
}

impl Engine {
    /// Answers jobs until every sender is gone.
    fn serve(&self, jobs: &mpsc::Receiver<Job>) {
        let mut waiting: VecDeque<Job> = VecDeque::new();
        let mut running: Vec<Sequence> = Vec::new();
        loop {
            if running.is_empty() && waiting.is_empty() {
                let Ok(job) = jobs.recv() else { return };
                waiting.push_back(job);
                while waiting.len() < self.batch {
                    let Ok(job) = jobs.recv_timeout(GATHER) else {
                        break;
                    };
                    waiting.push_back(job);
                }
            }
            waiting.extend(jobs.try_iter());
            if self.cancel.load(Ordering::Relaxed) {
                for job in waiting.drain(..).chain(running.drain(..).map(|s| s.job)) {
                    job.reply.send(Err(LlmError::Cancelled)).ok();
                }
                continue;
            }
            let mut budget = PREFILL_TOKENS_PER_STEP;
            while running.len() < self.batch {
                let Some(job) = waiting.front() else { break };
                if job.prompt.len() > budget && budget < PREFILL_TOKENS_PER_STEP {
                    break;
                }
                budget = budget.saturating_sub(job.prompt.len());
                let job = waiting.pop_front().expect("the front job was just seen");
                running.push(self.start(job));
            }
            let logits = {
                let mut segments: Vec<Segment> = running
                    .iter_mut()
                    .map(|s| Segment {
                        cache: &mut s.cache,
                        tokens: &s.feed,
                    })
                    .collect();
                self.model.forward(&mut segments)
            };
            let finished: Vec<Option<Result<String, LlmError>>> = running
                .par_iter_mut()
                .zip(logits)
                .map(|(sequence, logits)| sequence.advance(&logits, &self.text))
                .collect();
            let mut kept = Vec::with_capacity(running.len());
            for (sequence, outcome) in running.drain(..).zip(finished) {
                match outcome {
                    Some(answer) => {
                        // A caller that gave up (cancelled) no longer listens.
                        sequence.job.reply.send(answer).ok();
                    }
                    None => kept.push(sequence),
                }
            }
            running = kept;
        }
    }

    fn start(&self, job: Job) -> Sequence {
        let capacity = job.prompt.len() + job.request.max_tokens as usize;
        Sequence {
            cache: self.model.new_cache(capacity),
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(job.request.seed),
            state: job.grammar.as_ref().map(|g| g.start()),
            answer: Vec::new(),
            feed: job.prompt.clone(),
            chosen: 0,
            job,
        }
    }
}

impl Sequence {
    /// Chooses the next token from `logits`; the answer once the sequence is done.
    fn advance(&mut self, logits: &[f32], text: &GgufText) -> Option<Result<String, LlmError>> {
        let request = &self.job.request;
        let grammar = &self.job.grammar;
        let state = self.state;
        // Tokens left after this one: a constrained answer must still be able to close.
        let left = (request.max_tokens as usize).saturating_sub(self.chosen + 1);
        let allowed = |id: u32| -> Option<Option<MatchState>> {
            let bytes = text.token_bytes.get(id as usize)?;
            match (grammar, state) {
                (Some(grammar), Some(state)) => {
                    let next = grammar.advance(state, bytes.as_deref()?)?;
                    (grammar.bytes_to_complete(&next) <= left).then_some(Some(next))
                }
                _ => Some(None),
            }
        };
        let done = |answer: &[u8]| Some(Ok(String::from_utf8_lossy(answer).into_owned()));
        let Some((next, next_state)) = choose(
            logits,
            request.temperature,
            request.top_p,
            &allowed,
            &mut self.rng,
        ) else {
            return done(&self.answer);
        };
        let Some(Some(bytes)) = text.token_bytes.get(next as usize) else {
            // A control token (end of turn) ends an unconstrained answer.
            return done(&self.answer);
        };
        self.answer.extend_from_slice(bytes);
        self.state = next_state.or(self.state);
        self.chosen += 1;
        if self.state.is_some_and(|s| s.is_complete())
            || next == text.eos_id
            || self.chosen >= request.max_tokens as usize
        {
            return done(&self.answer);
        }
        self.feed = vec![next];
        None
    }
}

/// Candidates sorted at first: the nucleus of a sampled step almost always lies among them.
const FIRST_CANDIDATES: usize = 64;

multiversion! {
    /// `Σ e^((l - max) / scale)` over the logits, vectorised.
    fn exp_sum(logits: &[f32], max: f32, scale: f32) -> f64 {
        let mut lanes = [0f32; 16];
        let chunks = logits.chunks_exact(16);
        let tail: f32 = chunks.remainder().iter().map(|&l| exp((l - max) / scale)).sum();
        for chunk in chunks {
            for l in 0..16 {
                lanes[l] += exp((chunk[l] - max) / scale);
            }
        }
        f64::from(lanes.iter().sum::<f32>() + tail)
    }
}

/// Picks the next token among those `allowed` accepts (returning the grammar state after it):
/// greedy at temperature 0, else a seeded draw from the top-p nucleus of the allowed tokens.
///
/// Tokens are tried from the most probable down and the scan stops as soon as the allowed mass
/// found covers `top_p` of what the allowed tokens can at most hold (1 minus the disallowed mass
/// seen), so a grammar check touches a handful of tokens per step, not the whole vocabulary; and
/// only the best [`FIRST_CANDIDATES`] are sorted unless the scan goes past them.
fn choose<S>(
    logits: &[f32],
    temperature: f64,
    top_p: f64,
    allowed: &dyn Fn(u32) -> Option<S>,
    rng: &mut impl Rng,
) -> Option<(u32, S)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let scale = if temperature > 0.0 {
        temperature as f32
    } else {
        1.0
    };
    let mut order: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| (max - logits[i as usize]) / scale < NEGLIGIBLE_LOGIT_GAP)
        .collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    let sorted_head = FIRST_CANDIDATES.min(order.len());
    if sorted_head < order.len() {
        order.select_nth_unstable_by(sorted_head, by_logit);
    }
    order[..sorted_head].sort_unstable_by(by_logit);
    let mut rest_sorted = false;
    let mut candidates = (0..order.len()).map(|i| {
        if i == sorted_head && !rest_sorted {
            rest_sorted = true;
            order[sorted_head..].sort_unstable_by(by_logit);
        }
        order[i]
    });
    if temperature <= 0.0 {
        return candidates
            .find_map(|id| allowed(id).map(|s| (id, s)))
            .or_else(|| best_allowed(logits, allowed));
    }
    let weight = |id: u32| f64::from(exp((logits[id as usize] - max) / scale));
    let total = exp_sum(logits, max, scale);
    let mut nucleus = Vec::new();
    let (mut kept, mut refused) = (0.0, 0.0);
    for id in candidates.by_ref() {
        let p = weight(id) / total;
        match allowed(id) {
            Some(state) => {
                kept += p;
                nucleus.push((id, state, p));
                if kept >= top_p * (1.0 - refused) {
                    break;
                }
            }
            None => refused += p,
        }
    }
    if nucleus.is_empty() {
        return best_allowed(logits, allowed);
    }
    let mut draw = rng.random::<f64>() * kept;
    let last = nucleus.len() - 1;
    for (i, (id, state, p)) in nucleus.into_iter().enumerate() {
        draw -= p;
        if draw <= 0.0 || i == last {
            return Some((id, state));
        }
    }
    None
}

/// The most probable allowed token over the whole vocabulary: the fallback when the model puts
/// all its mass on tokens the grammar refuses.
fn best_allowed<S>(logits: &[f32], allowed: &dyn Fn(u32) -> Option<S>) -> Option<(u32, S)> {
    let mut best: Option<(u32, S, f32)> = None;
    for (id, &logit) in logits.iter().enumerate() {
        if best.as_ref().is_some_and(|(_, _, b)| *b >= logit) {
            continue;
        }
        if let Some(state) = allowed(id as u32) {
            best = Some((id as u32, state, logit));
        }
    }
    best.map(|(id, state, _)| (id, state))
}

impl LlmBackend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn concurrency(&self) -> usize {
        self.batch
    }

    fn complete(&self, request: &Request) -> Result<String, LlmError> {
        let prompt = self.prompt_ids(request)?;
        let budget = request.max_tokens as usize;
        if prompt.len() + budget > self.context {
            return Err(LlmError::Unsupported(format!(
                "the prompt has {} tokens; with max_tokens {budget} it exceeds the local model's {}-token window",
                prompt.len(),
                self.context
            )));
        }
        let grammar = request
            .json_schema
            .as_ref()
            .map(|schema| self.grammar(schema))
            .transpose()?;
        let (reply, answer) = mpsc::channel();
        let job = Job {
            prompt,
            request: request.clone(),
            grammar,
            reply,
        };
        let stopped = || LlmError::Unsupported("the local LLM engine stopped".to_owned());
        self.queue().send(job).map_err(|_| stopped())?;
        answer.recv().map_err(|_| stopped())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(schema: Option<serde_json::Value>) -> Request {
        Request {
            system: Some("You write the search queries people type to find documents.".to_owned()),
            prompt: "Passage:\n\"\"\"\nSnapshots are kept for thirty days. Remote repositories are pruned every Sunday; local ones every night.\n\"\"\"\n\nWrite 2 different questions a user could type into a search box that this passage answers. Answer in JSON: {\"queries\": [\"...\"]}".to_owned(),
            json_schema: schema,
            temperature: 0.7,
            top_p: 0.95,
            seed: 7,
            max_tokens: 96,
        }
    }

    /// Sends `requests` from one thread each, so the engine decodes them in one batch.
    fn answer_together(backend: &LocalBackend, requests: &[Request]) -> Vec<String> {
        std::thread::scope(|scope| {
            let calls: Vec<_> = requests
                .iter()
                .map(|request| scope.spawn(move || backend.complete(request).expect("answers")))
                .collect();
            calls
                .into_iter()
                .map(|c| c.join().expect("no panic"))
                .collect()
        })
    }

    #[test]
    #[allow(
        clippy::print_stderr,
        reason = "the answer and its time are the test's figures"
    )]
    fn smollm2_answers_schema_valid_json_reproducibly() {
        let backend =
            LocalBackend::load(&crate::testutil::smollm2_gguf(), 1).expect("SmolLM2 loads");
        assert!(backend.identity().starts_with("gguf blake3:"));
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"queries": {
                "type": "array",
                "items": {"type": "string", "minLength": 8, "maxLength": 120},
                "minItems": 1, "maxItems": 2
            }},
            "required": ["queries"]
        });
        let started = std::time::Instant::now();
        let answer = backend
            .complete(&request(Some(schema.clone())))
            .expect("generates");
        let seconds = started.elapsed().as_secs_f64();
        let parsed: serde_json::Value =
            serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"));
        let queries = parsed["queries"].as_array().expect("an array of queries");
        assert!((1..=2).contains(&queries.len()), "{answer}");
        for query in queries {
            let query = query.as_str().expect("strings");
            assert!((8..=120).contains(&query.chars().count()), "{query}");
        }
        // The same seed gives the same answer.
        assert_eq!(
            backend.complete(&request(Some(schema))).expect("again"),
            answer
        );
        eprintln!("local answer in {seconds:.2}s: {answer}");
    }

    /// The real Qwen2.5 instruct GGUF (qwen2: q/k/v biases, its own pre-tokenizer and chat
    /// template) loads and writes schema-valid queries, batched as query-gen sends them.
    #[test]
    #[allow(clippy::print_stderr, reason = "the answers are the test's figures")]
    fn qwen2_instruct_answers_schema_valid_json() {
        let Some(path) = crate::testutil::qwen2_gguf() else {
            return;
        };
        let backend = LocalBackend::load(&path, 4).expect("Qwen2.5 loads");
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"queries": {
                "type": "array",
                "items": {"type": "string", "minLength": 8, "maxLength": 120},
                "minItems": 1, "maxItems": 2
            }},
            "required": ["queries"]
        });
        let requests: Vec<Request> = (0..4)
            .map(|seed| Request {
                seed,
                ..request(Some(schema.clone()))
            })
            .collect();
        for answer in &answer_together(&backend, &requests) {
            let parsed: serde_json::Value =
                serde_json::from_str(answer).unwrap_or_else(|e| panic!("{e}: {answer}"));
            let queries = parsed["queries"].as_array().expect("an array of queries");
            assert!(!queries.is_empty(), "{answer}");
            eprintln!("qwen2: {answer}");
        }
    }

    /// With a budget far below what the model would write, constrained answers still close:
    /// every one parses, whatever the seed.
    #[test]
    fn constrained_answers_close_within_a_tight_budget() {
        let backend = LocalBackend::load(&crate::testutil::smollm2_gguf(), 8).expect("loads");
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"queries": {
                "type": "array",
                "items": {"type": "string", "minLength": 8, "maxLength": 200},
                "minItems": 1, "maxItems": 3
            }},
            "required": ["queries"]
        });
        let requests: Vec<Request> = (0..8)
            .map(|seed| Request {
                seed,
                max_tokens: 24,
                ..request(Some(schema.clone()))
            })
            .collect();
        for answer in answer_together(&backend, &requests) {
            let parsed: serde_json::Value =
                serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"));
            assert!(
                parsed["queries"].as_array().is_some_and(|q| !q.is_empty()),
                "{answer}"
            );
        }
    }

    /// Six different requests (temperature 0 and sampled, with and without a schema) answered
    /// one at a time and all together in one batch: the same answers, bit for bit.
    #[test]
    fn batched_answers_equal_unbatched_ones() {
        let path = crate::testutil::smollm2_gguf();
        let passages = [
            "Snapshots are kept for thirty days. Remote repositories are pruned every Sunday.",
            "The agent retries a failed upload three times, waiting twice as long each time.",
            "Set `TIDE_HOME` to move the configuration folder; the default is ~/.tide.",
        ];
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"queries": {"type": "array", "items": {"type": "string", "minLength": 8, "maxLength": 120}, "minItems": 1, "maxItems": 2}},
            "required": ["queries"]
        });
        let requests: Vec<Request> = passages
            .iter()
            .enumerate()
            .flat_map(|(i, passage)| {
                let base = Request {
                    prompt: format!("{passage}\n\nWrite 2 questions a user could ask that the text above answers."),
                    seed: i as u64,
                    temperature: 0.0,
                    max_tokens: 48,
                    ..request(None)
                };
                [
                    base.clone(),
                    Request {
                        temperature: 0.7,
                        json_schema: Some(schema.clone()),
                        ..base
                    },
                ]
            })
            .collect();
        let alone = LocalBackend::load(&path, 1).expect("loads");
        let one_by_one: Vec<String> = requests
            .iter()
            .map(|r| alone.complete(r).expect("answers"))
            .collect();
        let batched = LocalBackend::load(&path, requests.len()).expect("loads");
        assert_eq!(one_by_one, answer_together(&batched, &requests));
        assert!(one_by_one.iter().all(|a| !a.is_empty()), "{one_by_one:?}");
    }

    #[test]
    fn choose_respects_the_filter_and_the_seed() {
        let logits = [0.0, 5.0, 4.9, -1.0];
        let only_odd = |id: u32| (id % 2 == 1).then_some(());
        // Greedy: the best allowed token.
        assert_eq!(
            choose(
                &logits,
                0.0,
                1.0,
                &|id| (id != 1).then_some(()),
                &mut rand_chacha::ChaCha8Rng::seed_from_u64(1)
            )
            .map(|c| c.0),
            Some(2)
        );
        // Sampling never returns a refused token, and is reproducible.
        let draws = |seed| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            (0..50)
                .map(|_| choose(&logits, 1.0, 0.9, &only_odd, &mut rng).map(|c| c.0))
                .collect::<Vec<_>>()
        };
        assert!(draws(3).iter().all(|d| matches!(d, Some(1 | 3))));
        assert_eq!(draws(3), draws(3));
        // Nothing allowed at all: no token.
        assert!(
            choose(
                &logits,
                1.0,
                0.9,
                &|_| None::<()>,
                &mut rand_chacha::ChaCha8Rng::seed_from_u64(1)
            )
            .is_none()
        );
    }
}
