//! Reading a model's weights from disk: `model.safetensors` (memory-mapped) or PyTorch's
//! `pytorch_model.bin`.
//!
//! `pytorch_model.bin` is a zip archive holding a pickle (`archive/data.pkl`) that names each
//! tensor's storage file (`archive/data/<key>`). candle's `candle_core::pickle` interprets only the
//! opcodes that build a state dict and never runs Python code, unlike `torch.load` without
//! `weights_only`; archives from before PyTorch 1.6 (not zip files) are not supported by it.
//! What it would allocate is checked first ([`pickle_guard`]): it copies memoised objects and
//! trusts declared lengths.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::model::error::{CandleContext, ModelError};
use crate::model::pickle_guard;

/// The weight files tried in a model folder, in order of preference.
pub const WEIGHT_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

/// The tensors of one weight file, by the name the file gives them, in the file's dtypes.
#[derive(Debug)]
pub struct Checkpoint {
    /// Where the tensors came from, for error messages.
    pub path: PathBuf,
    pub tensors: BTreeMap<String, Tensor>,
}

impl Checkpoint {
    /// Reads the first of [`WEIGHT_FILES`] that exists in `dir`.
    pub fn read_dir(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let path = WEIGHT_FILES
            .iter()
            .map(|name| dir.join(name))
            .find(|path| path.is_file())
            .ok_or_else(|| ModelError::MissingWeights {
                dir: dir.to_owned(),
            })?;
        Self::read(&path, device)
    }

    /// Reads a `.safetensors` file, or anything else as a PyTorch zip archive.
    pub fn read(path: &Path, device: &Device) -> Result<Self, ModelError> {
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path: path.to_owned(),
            });
        }
        let during = || format!("reading weights from `{}`", path.display());
        let is_safetensors = path.extension().is_some_and(|ext| ext == "safetensors");
        let tensors = if is_safetensors {
            // SAFETY: the map is read-only and lives only while the tensors are copied out below;
            // like every mmap-based loader (candle's, PyTorch's) this assumes no other process
            // truncates the file meanwhile.
            let file =
                unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.during(during)?;
            file.tensors()
                .into_iter()
                .map(|(name, _)| {
                    let tensor = file.load(&name, device).during(during)?;
                    Ok((name, tensor))
                })
                .collect::<Result<BTreeMap<_, _>, ModelError>>()?
        } else {
            let refused = |source| ModelError::UnsafeWeights {
                path: path.to_owned(),
                source,
            };
            let sizes = pickle_guard::check_archive(path).map_err(refused)?;
            let file = candle_core::pickle::PthTensors::new(path, None).during(during)?;
            let mut tensors = BTreeMap::new();
            for (name, info) in file.tensor_infos() {
                pickle_guard::check_tensor(
                    &sizes,
                    name,
                    &info.path,
                    info.layout.start_offset(),
                    info.layout.shape().elem_count(),
                    info.dtype.size_in_bytes(),
                )
                .map_err(refused)?;
            }
            for name in file.tensor_infos().keys() {
                if let Some(tensor) = file.get(name).during(during)? {
                    tensors.insert(name.clone(), tensor.to_device(device).during(during)?);
                }
            }
            tensors
        };
        Ok(Self {
            path: path.to_owned(),
            tensors,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::DType;

    use super::*;
    use crate::model::bert::Bert;
    use crate::model::bert::tests::{random_checkpoint, tiny_config};

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model/tiny-bert-pt")
    }

    /// The value `make_tiny_bert_pt.py` stores at `element` of the `tensor`-th name.
    fn fixture_value(tensor: usize, element: usize) -> f32 {
        (((element * 7919 + tensor * 104729) % 1000) as f64 / 1000. - 0.5) as f32
    }

    /// The fixture is a hand-built PyTorch zip archive (see `make_tiny_bert_pt.py`): this proves
    /// candle's reader maps every storage to the right tensor with the right shape and values,
    /// and keeps non-parameter tensors (int64 `position_ids`, the pooler).
    #[test]
    fn reads_a_pytorch_zip_checkpoint() {
        let bert = Bert::load(&fixture_dir(), &Device::Cpu).expect("the .bin model loads");
        let vars = bert.vars().data().lock().expect("lock");
        let extra = bert.extra_tensors();
        let mut names: Vec<&String> = vars
            .keys()
            .chain(extra.keys().filter(|name| name.starts_with("pooler.")))
            .collect();
        names.sort();
        assert_eq!(names.len(), 5 + 2 * 16 + 2);
        for (index, name) in names.into_iter().enumerate() {
            let tensor = vars
                .get(name)
                .map(|var| var.as_tensor().clone())
                .or_else(|| extra.get(name).cloned())
                .expect("listed above");
            let values = tensor
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("f32 values");
            for (element, value) in values.iter().enumerate() {
                assert_eq!(*value, fixture_value(index, element), "`{name}`[{element}]");
            }
        }
        let positions = extra
            .get("embeddings.position_ids")
            .expect("the buffer is kept");
        assert_eq!(positions.dtype(), DType::I64);
        assert_eq!(
            positions
                .flatten_all()
                .and_then(|t| t.to_vec1::<i64>())
                .expect("ids"),
            (0..24).collect::<Vec<i64>>()
        );
    }

    #[test]
    fn r18_4_a_pickle_of_repeated_memo_references_is_refused() {
        use std::io::Write;

        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("pytorch_model.bin");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).expect("create"));
        zip.start_file("archive/data.pkl", zip::write::SimpleFileOptions::default())
            .expect("entry");
        // 10^8 tuples for candle's reader (gigabytes), in 198 bytes.
        zip.write_all(&crate::model::pickle_guard::tests::memo_bomb(8))
            .expect("write");
        zip.finish().expect("finish");
        let started = std::time::Instant::now();
        let error = Checkpoint::read(&path, &Device::Cpu).expect_err("refused");
        assert!(
            matches!(&error, ModelError::UnsafeWeights { .. }),
            "{error}"
        );
        assert!(started.elapsed().as_secs() < 5);
        // The real fixture passes the check.
        Checkpoint::read_dir(&fixture_dir(), &Device::Cpu).expect("reads");
    }

    #[test]
    fn reads_half_precision_safetensors_and_converts_to_f32() {
        let config = tiny_config();
        let Checkpoint { tensors, .. } = random_checkpoint(&config, 4);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("model.safetensors");
        let halves: HashMap<String, Tensor> = tensors
            .iter()
            .enumerate()
            .map(|(i, (name, t))| {
                let dtype = if i % 2 == 0 { DType::F16 } else { DType::BF16 };
                (name.clone(), t.to_dtype(dtype).expect("to half"))
            })
            .collect();
        candle_core::safetensors::save(&halves, &path).expect("save");

        let checkpoint = Checkpoint::read_dir(dir.path(), &Device::Cpu).expect("reads");
        assert_eq!(checkpoint.path, path);
        for (name, tensor) in &checkpoint.tensors {
            assert_eq!(
                tensor.dtype(),
                halves[name].dtype(),
                "`{name}` keeps its dtype on read"
            );
        }
        let bert = Bert::from_checkpoint(config, checkpoint, DType::F32, &Device::Cpu)
            .expect("half precision converts");
        for (name, var) in bert.vars().data().lock().expect("lock").iter() {
            assert_eq!(var.dtype(), DType::F32);
            let want = halves[name]
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .expect("values");
            let got = var
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("values");
            assert_eq!(got, want, "`{name}`");
        }
    }

    #[test]
    fn a_folder_without_weights_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let error = Checkpoint::read_dir(dir.path(), &Device::Cpu).expect_err("no weights");
        assert!(
            matches!(error, ModelError::MissingWeights { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("model.safetensors"), "{error}");
    }
}
