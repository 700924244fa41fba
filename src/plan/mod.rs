//! Planning: from a recipe to a DAG of stages (`Dag`), then to keys and what is cached (`Plan`).
//!
//! Each stage input resolves to the nearest stage before it in the canonical chain that produces
//! the artifact (or to the sections its `from:` names). Keys follow from inputs, not outputs, so
//! the whole plan, cached or not, is known before anything runs.

pub mod dirty;
pub mod estimate;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;

pub use dirty::DirtyReason;

use crate::cache::digest::{DigestMemo, list_files};
use crate::cache::error::CacheError;
use crate::cache::key::{ExternalDigest, KeyRecord};
use crate::cache::lock::LockFile;
use crate::cache::store::{Manifest, Store, Verification};
use crate::recipe::{Problem, ProblemKind, Recipe, RecipeError};
use crate::stages::{Artifact, External, Input, Stage, StageEnv, StageError, StageSpec};

/// The stages of a recipe and which stage feeds which.
pub struct Dag {
    /// In execution order (topological, ties in canonical order).
    pub nodes: Vec<DagNode>,
}

pub struct DagNode {
    pub spec: &'static StageSpec,
    pub stage: Arc<dyn Stage>,
    /// Artifact → index (into `nodes`) of the stage producing it.
    pub inputs: BTreeMap<Artifact, usize>,
}

impl Dag {
    /// Resolves every stage's inputs; missing inputs and cycles are located recipe problems.
    pub fn build(recipe: &Recipe) -> Result<Self, RecipeError> {
        let edges = resolve_inputs(recipe)?;
        let order = execution_order(recipe, &edges)?;
        let position: BTreeMap<usize, usize> = order
            .iter()
            .enumerate()
            .map(|(new, &old)| (old, new))
            .collect();
        let nodes = order
            .iter()
            .map(|&i| DagNode {
                spec: recipe.stages[i].spec,
                stage: recipe.stages[i].stage.clone(),
                inputs: edges[i]
                    .iter()
                    .map(|(&artifact, producer)| (artifact, position[producer]))
                    .collect(),
            })
            .collect();
        Ok(Self { nodes })
    }
}

/// Per section of the recipe (in its order), the section producing each artifact it reads: the
/// nearest before it, or one its `from:` lists. Every problem is reported at once.
fn resolve_inputs(recipe: &Recipe) -> Result<Vec<BTreeMap<Artifact, usize>>, RecipeError> {
    let mut problems: Vec<Problem> = Vec::new();
    let count = recipe.stages.len();
    let mut edges: Vec<BTreeMap<Artifact, usize>> = vec![BTreeMap::new(); count];
    for (i, entry) in recipe.stages.iter().enumerate() {
        // Where the `n`th name of this section's `from:` list is written.
        let from_entry = |n: usize| {
            [
                entry.spec.section.to_owned(),
                "from".to_owned(),
                n.to_string(),
            ]
        };
        let from_positions = entry.from.as_ref().map(|names| {
            names
                .iter()
                .enumerate()
                .filter_map(|(n, name)| {
                    let position = recipe.stages.iter().position(|s| s.spec.is_named(name));
                    if position.is_none() {
                        problems.push(recipe.problem(
                            ProblemKind::MissingInput,
                            &from_entry(n),
                            format!(
                                "`{}.from` names `{name}`, which is not a section of this recipe",
                                entry.spec.section
                            ),
                            "no such section",
                            None,
                        ));
                    }
                    position.map(|p| (n, p))
                })
                .collect::<Vec<_>>()
        });
        for input in entry.stage.inputs() {
            let producer = match &from_positions {
                Some(listed) => listed
                    .iter()
                    .map(|&(_, p)| p)
                    .find(|&p| recipe.stages[p].spec.produces == input.artifact),
                None => (0..i)
                    .rev()
                    .find(|&p| recipe.stages[p].spec.produces == input.artifact),
            };
            match producer {
                Some(p) => {
                    edges[i].insert(input.artifact, p);
                }
                None if input.required => {
                    problems.push(missing_input(recipe, i, &input, from_positions.is_some()))
                }
                None => {}
            }
        }
        if let Some(listed) = &from_positions {
            let needed: Vec<Artifact> = entry.stage.inputs().iter().map(|i| i.artifact).collect();
            for &(n, p) in listed {
                if !needed.contains(&recipe.stages[p].spec.produces) {
                    problems.push(recipe.problem(
                        ProblemKind::MissingInput,
                        &from_entry(n),
                        format!(
                            "`{}` produces {}, which stage `{}` does not read",
                            recipe.stages[p].spec.section,
                            recipe.stages[p].spec.produces.name(),
                            entry.spec.kind
                        ),
                        "not an input of this stage",
                        None,
                    ));
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(RecipeError::invalid(recipe.path.clone(), problems));
    }
    Ok(edges)
}

/// The problem of stage `i` missing its required `input`: which sections could supply it, or
/// which section to add.
fn missing_input(recipe: &Recipe, i: usize, input: &Input, has_from: bool) -> Problem {
    let entry = &recipe.stages[i];
    // Sections of this recipe that produce it, left out of `from:`.
    let present: Vec<String> = recipe
        .stages
        .iter()
        .filter(|s| s.spec.produces == input.artifact)
        .map(|s| format!("`{}`", s.spec.section))
        .collect();
    let (message, mut help) = if has_from && !present.is_empty() {
        (
            format!(
                "stage `{}` needs {}, which none of the sections in its `from:` produces",
                entry.spec.kind,
                input.artifact.name()
            ),
            format!(
                "add {} to `{}.from`",
                present.join(" or "),
                entry.spec.section
            ),
        )
    } else {
        let producers: Vec<String> = crate::stages::REGISTRY
            .iter()
            .filter(|s| s.produces == input.artifact)
            .map(|s| format!("`{}:`", s.section))
            .collect();
        (
            format!(
                "stage `{}` needs {}, which no stage of this recipe produces",
                entry.spec.kind,
                input.artifact.name()
            ),
            format!("add a {} section", producers.join(" or ")),
        )
    };
    if let Some(key) = input.instead {
        help.push_str(&format!(", or set `{}.{key}`", entry.spec.section));
    }
    recipe.problem(
        ProblemKind::MissingInput,
        &[entry.spec.section.to_owned()],
        message,
        format!("needs {}", input.artifact.name()),
        Some(help),
    )
}

/// The order stages run in (topological, ties in canonical order); a cycle of `from:` lists is
/// a problem located at the list that closes it.
fn execution_order(
    recipe: &Recipe,
    edges: &[BTreeMap<Artifact, usize>],
) -> Result<Vec<usize>, RecipeError> {
    let count = recipe.stages.len();
    let section_path = |i: usize| vec![recipe.stages[i].spec.section.to_owned()];
    let mut graph: DiGraph<usize, Artifact> = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..count).map(|i| graph.add_node(i)).collect();
    for (consumer, inputs) in edges.iter().enumerate() {
        for (&artifact, &producer) in inputs {
            graph.add_edge(nodes[producer], nodes[consumer], artifact);
        }
    }
    match stable_toposort(&graph, count) {
        Some(order) => Ok(order),
        None => {
            let cycle = petgraph::algo::kosaraju_scc(&graph)
                .into_iter()
                .find(|scc| scc.len() > 1)
                .unwrap_or_default();
            let mut members: Vec<usize> = cycle.iter().map(|n| graph[*n]).collect();
            members.sort_unstable();
            let names: Vec<String> = members
                .iter()
                .map(|&i| format!("`{}`", recipe.stages[i].spec.kind))
                .collect();
            let at = members
                .iter()
                .copied()
                .find(|&i| recipe.stages[i].from.is_some())
                .unwrap_or(members.first().copied().unwrap_or(0));
            let mut path = section_path(at);
            path.push("from".to_owned());
            Err(RecipeError::invalid(
                    recipe.path.clone(),
                    vec![recipe.problem(
                        ProblemKind::Cycle,
                        &path,
                        format!("stages {} read each other's output in a cycle", names.join(", ")),
                        "this closes the cycle",
                        Some("a stage can only read from stages that do not depend on it; fix the `from:` lists".to_owned()),
                    )],
                ))
        }
    }
}

/// Kahn's algorithm taking the lowest index first, so independent stages keep canonical order.
/// `None` when there is a cycle.
fn stable_toposort(graph: &DiGraph<usize, Artifact>, count: usize) -> Option<Vec<usize>> {
    let mut indegree = vec![0usize; count];
    for edge in graph.edge_indices() {
        let (_, to) = graph.edge_endpoints(edge)?;
        indegree[graph[to]] += 1;
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..count).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(count);
    while let Some(&i) = ready.iter().next() {
        ready.remove(&i);
        order.push(i);
        for neighbor in graph.neighbors(NodeIndex::new(i)) {
            let j = graph[neighbor];
            indegree[j] -= 1;
            if indegree[j] == 0 {
                ready.insert(j);
            }
        }
    }
    (order.len() == count).then_some(order)
}

/// A planned stage: its key, what went into it, and whether it must run.
pub struct PlannedStage {
    pub spec: &'static StageSpec,
    pub stage: Arc<dyn Stage>,
    pub inputs: BTreeMap<Artifact, usize>,
    pub record: KeyRecord,
    pub key: String,
    pub status: Status,
    /// Why the stage's inputs could not be resolved (a server that does not answer), when they
    /// could not: its key is then unknown (empty), and so are its dependents'. Planning goes on,
    /// so that `plan`, `status` and runs of other stages still work; running this stage fails.
    pub unresolved: Option<Arc<StageError>>,
    /// A whole artifact under the key that runs only because an upstream stage runs first
    /// ([`DirtyReason::UpstreamRuns`]): the executor keeps it if every input comes out with the
    /// digest it was computed from (early cutoff).
    pub reusable: Option<Box<Manifest>>,
}

impl PlannedStage {
    /// Whether `reusable` was computed from exactly the upstream outputs `current` gives
    /// (artifact name → output digest, for every input).
    pub fn reusable_with(&self, current: &BTreeMap<String, String>) -> Option<&Manifest> {
        self.reusable
            .as_deref()
            .filter(|manifest| !current.is_empty() && manifest.consumed == *current)
    }
}

/// The name of an artifact in keys, records and manifests (`training-data`).
pub fn artifact_name(artifact: Artifact) -> String {
    serde_json::to_value(artifact)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Whether a stage's artifact can be used as it is.
#[derive(Debug, Clone)]
pub enum Status {
    Cached(Box<Manifest>),
    Run(Vec<DirtyReason>),
}

impl Status {
    pub fn is_cached(&self) -> bool {
        matches!(self, Self::Cached(_))
    }
}

/// Everything `plan`, `status` and `run` need to know before running anything.
pub struct Plan {
    pub stages: Vec<PlannedStage>,
}

/// Why planning failed.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("stage `{stage}`: cannot resolve its inputs")]
    External {
        stage: String,
        #[source]
        source: Arc<StageError>,
    },
    #[error("stage `{stage}`: cannot hash `{}`", path.display())]
    Hash {
        stage: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// How the planner treats the cache.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Stage kinds forced to run.
    pub force: Vec<String>,
    pub force_all: bool,
}

impl Plan {
    /// Keys every stage and checks the store. `memo` speeds hashing; `lock` explains changes.
    pub fn build(
        dag: Dag,
        store: &Store,
        memo: &mut DigestMemo,
        lock: &LockFile,
        env_for: &dyn Fn(&'static str) -> StageEnv,
        options: &PlanOptions,
    ) -> Result<Self, PlanError> {
        let mut stages: Vec<PlannedStage> = Vec::with_capacity(dag.nodes.len());
        for node in dag.nodes {
            let kind = node.spec.kind;
            let env = env_for(kind);
            let upstream_unresolved = node
                .inputs
                .values()
                .find_map(|&p| stages[p].unresolved.as_ref().map(|e| (p, e.clone())));
            let resolved = match upstream_unresolved {
                Some((producer, error)) => Err((
                    format!("upstream `{}` is unresolved", stages[producer].spec.kind),
                    error,
                )),
                None => node
                    .stage
                    .externals(&env)
                    .map_err(|error| (crate::error_chain(&error), Arc::new(error))),
            };
            let externals = match resolved {
                Ok(externals) => externals,
                Err((detail, error)) => {
                    stages.push(PlannedStage {
                        spec: node.spec,
                        stage: node.stage.clone(),
                        inputs: node.inputs,
                        record: KeyRecord::new(
                            kind,
                            node.stage.version(),
                            &node.stage.params(),
                            BTreeMap::new(),
                            BTreeMap::new(),
                        ),
                        key: String::new(),
                        status: Status::Run(vec![DirtyReason::IdentityUnknown { detail }]),
                        unresolved: Some(error),
                        reusable: None,
                    });
                    continue;
                }
            };
            let mut digests = BTreeMap::new();
            for external in externals {
                let (label, digest) = digest_external(kind, external, memo)?;
                digests.insert(label, digest);
            }
            let upstream = node
                .inputs
                .iter()
                .map(|(&artifact, &producer)| {
                    (artifact_name(artifact), stages[producer].key.clone())
                })
                .collect();
            let record = KeyRecord::new(
                kind,
                node.stage.version(),
                &node.stage.params(),
                upstream,
                digests,
            );
            let key = record.key();
            let forced = options.force_all || options.force.iter().any(|f| node.spec.is_named(f));
            let status = match store.verify(&key, memo) {
                _ if forced => Status::Run(vec![DirtyReason::Forced]),
                Verification::Valid(manifest) => {
                    match node.stage.effect_missing(&store.artifact_dir(&key)) {
                        Some(detail) => Status::Run(vec![DirtyReason::EffectMissing { detail }]),
                        None => Status::Cached(Box::new(manifest)),
                    }
                }
                Verification::Corrupt { reason } => {
                    Status::Run(vec![DirtyReason::ArtifactCorrupt { detail: reason }])
                }
                Verification::Missing => Status::Run(why_missing(
                    store,
                    lock,
                    kind,
                    node.spec.section,
                    &record,
                    &key,
                )),
            };
            let (status, reusable) = match status {
                Status::Cached(manifest) => upstream_check(&stages, &node.inputs, manifest),
                other => (other, None),
            };
            stages.push(PlannedStage {
                spec: node.spec,
                stage: node.stage,
                inputs: node.inputs,
                record,
                key,
                status,
                unresolved: None,
                reusable,
            });
        }
        Ok(Self { stages })
    }
}

/// Whether a whole artifact was computed from the upstream artifacts there now. Keys name
/// upstream keys, not bytes, so this is what catches an upstream stage that reran under its key
/// and produced other bytes. An upstream stage that is about to run makes the artifact a
/// candidate for early cutoff instead (`reusable`). A manifest from before digests were recorded
/// names none, and is trusted by its key.
fn upstream_check(
    stages: &[PlannedStage],
    inputs: &BTreeMap<Artifact, usize>,
    manifest: Box<Manifest>,
) -> (Status, Option<Box<Manifest>>) {
    let mut reasons = Vec::new();
    let mut stale = false;
    for (&artifact, &producer) in inputs {
        let name = artifact_name(artifact);
        match &stages[producer].status {
            Status::Run(_) => reasons.push(DirtyReason::UpstreamRuns {
                artifact: name,
                stage: stages[producer].spec.kind.to_owned(),
            }),
            Status::Cached(upstream) => {
                if manifest
                    .consumed
                    .get(&name)
                    .is_some_and(|consumed| *consumed != upstream.digest)
                {
                    stale = true;
                    reasons.push(DirtyReason::UpstreamOutput { artifact: name });
                }
            }
        }
    }
    match (reasons.is_empty(), stale) {
        (true, _) => (Status::Cached(manifest), None),
        (false, true) => (Status::Run(reasons), None),
        (false, false) => (Status::Run(reasons), Some(manifest)),
    }
}

/// How a stage's key compares with the one the lock recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum SinceLock {
    /// The lock has no entry for the stage.
    NotLocked,
    InSync,
    /// What changed since the locked run (empty when the records show no difference).
    Changed(Vec<DirtyReason>),
}

/// Compares a stage's key record with what the lock (and, for per-file detail, the workdir's
/// record of the locked key) says ran last: `plan`, `run` and `status` give the same reasons.
pub fn since_lock(
    store: &Store,
    lock: &LockFile,
    kind: &str,
    section: &str,
    record: &KeyRecord,
    key: &str,
) -> SinceLock {
    let Some(locked) = lock.stages.get(kind) else {
        return SinceLock::NotLocked;
    };
    if locked.key == key {
        return SinceLock::InSync;
    }
    let previous = store
        .load_record(&locked.key)
        .unwrap_or_else(|| locked.record.clone());
    SinceLock::Changed(dirty::explain(&previous, record, section))
}

/// Reasons for a stage whose artifact is not in the store, from [`since_lock`].
fn why_missing(
    store: &Store,
    lock: &LockFile,
    kind: &str,
    section: &str,
    record: &KeyRecord,
    key: &str,
) -> Vec<DirtyReason> {
    match since_lock(store, lock, kind, section, record, key) {
        SinceLock::InSync => vec![DirtyReason::NotInStore],
        SinceLock::Changed(reasons) if !reasons.is_empty() => reasons,
        SinceLock::NotLocked | SinceLock::Changed(_) => vec![DirtyReason::NeverRun],
    }
}

/// What stands for the digest of an input file that could not be read, followed by the error
/// kind (`PermissionDenied`).
const UNREADABLE: &str = "unreadable: ";

/// Hashes one external input.
fn digest_external(
    stage: &str,
    external: External,
    memo: &mut DigestMemo,
) -> Result<(String, ExternalDigest), PlanError> {
    let hash_error = |path: PathBuf| {
        let stage = stage.to_owned();
        move |source| PlanError::Hash {
            stage,
            path,
            source,
        }
    };
    match external {
        External::Identity { label, value } => Ok((label, ExternalDigest::of_identity(&value))),
        External::Files { label, root, files } => {
            // A file that cannot be read (no permission, an I/O error) enters the key as such,
            // so it changes the key once readable; the stage reading the files decides what it
            // means (chunk skips and counts it). Failing the plan here stopped `plan`, `status`
            // and `run` over one bad document that the chunk stage would have skipped anyway.
            let absolute: Vec<PathBuf> = files.iter().map(|f| root.join(f)).collect();
            let digests = memo.try_digest_all(&absolute);
            let map = files
                .iter()
                .map(|f| f.to_string_lossy().into_owned())
                .zip(digests.into_iter().map(|d| match d {
                    Ok(d) => d.blake3,
                    Err(e) => format!("{UNREADABLE}{:?}", e.kind()),
                }))
                .collect();
            Ok((label, ExternalDigest::of_files("files", map, None)))
        }
        External::Model {
            label,
            reference,
            path,
        } => {
            let (root, files) = if path.is_dir() {
                let files = list_files(&path).map_err(hash_error(path.clone()))?;
                (path.clone(), files)
            } else {
                let name = path.file_name().map(PathBuf::from).unwrap_or_default();
                (
                    path.parent().map(PathBuf::from).unwrap_or_default(),
                    vec![name],
                )
            };
            let absolute: Vec<PathBuf> = files.iter().map(|f| root.join(f)).collect();
            let digests = memo.digest_all(&absolute).map_err(hash_error(path))?;
            let map = files
                .iter()
                .map(|f| f.to_string_lossy().into_owned())
                .zip(digests.into_iter().map(|d| d.blake3))
                .collect();
            Ok((
                label,
                ExternalDigest::of_files("model", map, Some(reference)),
            ))
        }
    }
}

/// A plan entry as `plan --json` and the run log show it.
#[derive(Debug, Clone, Serialize)]
pub struct PlanEntry {
    pub stage: String,
    pub key: String,
    pub inputs: Vec<String>,
    pub cached: bool,
    pub reasons: Vec<DirtyReason>,
}

impl Plan {
    /// Index of the stage `name` names ([`StageSpec::is_named`]).
    pub fn find(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.spec.is_named(name))
    }

    /// `index` and every stage it transitively reads from, in plan order.
    pub fn ancestors(&self, index: usize) -> Vec<usize> {
        let mut found = vec![index];
        let mut next = 0;
        while next < found.len() {
            for &producer in self.stages[found[next]].inputs.values() {
                if !found.contains(&producer) {
                    found.push(producer);
                }
            }
            next += 1;
        }
        found.sort_unstable();
        found
    }

    pub fn entries(&self) -> Vec<PlanEntry> {
        self.stages
            .iter()
            .map(|s| PlanEntry {
                stage: s.spec.kind.to_owned(),
                key: s.key.clone(),
                inputs: s
                    .inputs
                    .values()
                    .map(|&p| self.stages[p].spec.kind.to_owned())
                    .collect(),
                cached: s.status.is_cached(),
                reasons: match &s.status {
                    Status::Cached(_) => Vec::new(),
                    Status::Run(reasons) => reasons.clone(),
                },
            })
            .collect()
    }
}
