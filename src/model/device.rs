//! Which accelerator runs the model: choosing a candle device, and a report of what this build and
//! machine offer (`doctor`).

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::model::error::ModelError;

/// The accelerator a recipe asks for. `auto` picks the best device compiled in (cargo features
/// `cuda`, `metal`) and present, else the CPU.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    #[default]
    Auto,
    Cpu,
    Cuda,
    Metal,
}

/// A candle device and how to describe it to the user (`cpu (2 threads, avx512f, matmul AMX
/// bf16x3)`, `cuda:0`).
#[derive(Debug, Clone)]
pub struct SelectedDevice {
    pub device: Device,
    pub description: String,
}

/// Opens the device `accelerator` asks for. `Auto` tries CUDA, then Metal, among the backends this
/// build has, and falls back to the CPU, saying in the description why. Naming a backend this build
/// lacks is an error that names the cargo feature to enable, not a silent CPU run.
pub fn select(accelerator: Accelerator) -> Result<SelectedDevice, ModelError> {
    match accelerator {
        Accelerator::Cpu => Ok(cpu("")),
        Accelerator::Cuda => cuda(),
        Accelerator::Metal => metal(),
        Accelerator::Auto => {
            let mut skipped = Vec::new();
            for backend in GPU_BACKENDS.iter().filter(|backend| backend.compiled) {
                match (backend.open)() {
                    Ok(selected) => return Ok(selected),
                    Err(error) => skipped.push(format!("{} unavailable: {error}", backend.name)),
                }
            }
            let why = if skipped.is_empty() {
                "no gpu backend compiled in".to_owned()
            } else {
                skipped.join("; ")
            };
            Ok(cpu(&format!("; {why}")))
        }
    }
}

/// A GPU backend: its name, whether this build has it, and how to open its first device.
struct GpuBackend {
    name: &'static str,
    compiled: bool,
    open: fn() -> Result<SelectedDevice, ModelError>,
}

/// In the order `auto` tries them.
const GPU_BACKENDS: [GpuBackend; 2] = [
    GpuBackend {
        name: "cuda",
        compiled: cfg!(feature = "cuda"),
        open: cuda,
    },
    GpuBackend {
        name: "metal",
        compiled: cfg!(feature = "metal"),
        open: metal,
    },
];

fn cpu(note: &str) -> SelectedDevice {
    let simd = cpu_features()
        .into_iter()
        .filter(|(_, present)| *present)
        .map(|(name, _)| name)
        .find(|name| ["avx512f", "avx2", "neon"].contains(name))
        .unwrap_or("no simd");
    SelectedDevice {
        device: Device::Cpu,
        description: format!(
            "cpu ({} threads, {simd}, matmul {}{note})",
            cpu_threads(),
            crate::model::kernels::matmul_engine()
        ),
    }
}

fn cuda() -> Result<SelectedDevice, ModelError> {
    if !cfg!(feature = "cuda") {
        return Err(ModelError::NotCompiled {
            accelerator: "cuda",
            feature: "cuda",
        });
    }
    let device = Device::new_cuda(0).map_err(|source| ModelError::DeviceUnavailable {
        accelerator: "cuda",
        source,
    })?;
    Ok(SelectedDevice {
        device,
        description: "cuda:0".to_owned(),
    })
}

fn metal() -> Result<SelectedDevice, ModelError> {
    if !cfg!(feature = "metal") {
        return Err(ModelError::NotCompiled {
            accelerator: "metal",
            feature: "metal",
        });
    }
    let device = Device::new_metal(0).map_err(|source| ModelError::DeviceUnavailable {
        accelerator: "metal",
        source,
    })?;
    Ok(SelectedDevice {
        device,
        description: "metal:0".to_owned(),
    })
}

/// The threads candle's CPU kernels (its matmuls) use: `RAYON_NUM_THREADS`, else the physical
/// cores.
fn cpu_threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// What `ragd-pipe doctor` shows about where models can run.
#[derive(Debug, Clone, Serialize)]
pub struct DoctorReport {
    /// Backends this build has: always `cpu`, plus `cuda`/`metal` when built with those features.
    pub compiled_backends: Vec<&'static str>,
    /// Each compiled GPU backend's first device and whether it opened.
    pub devices: Vec<DeviceProbe>,
    /// The device `accelerator: auto` picks.
    pub auto: String,
    /// SIMD features of this CPU that matter to the kernels, and whether each is present.
    pub cpu_features: Vec<(&'static str, bool)>,
    /// Threads the CPU kernels use.
    pub cpu_threads: usize,
}

/// One GPU backend's device 0, probed.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceProbe {
    /// The backend: `cuda` or `metal`.
    pub name: &'static str,
    /// `None` when the device opened, else why not.
    pub error: Option<String>,
}

/// Probes the devices and the CPU; opens (and drops) each compiled GPU backend's device 0.
pub fn doctor() -> DoctorReport {
    let mut compiled_backends = vec!["cpu"];
    let mut devices = Vec::new();
    for backend in GPU_BACKENDS.iter().filter(|backend| backend.compiled) {
        compiled_backends.push(backend.name);
        devices.push(DeviceProbe {
            name: backend.name,
            error: (backend.open)().err().map(|error| error.to_string()),
        });
    }
    let auto = match select(Accelerator::Auto) {
        Ok(selected) => selected.description,
        Err(error) => error.to_string(),
    };
    DoctorReport {
        compiled_backends,
        devices,
        auto,
        cpu_features: cpu_features(),
        cpu_threads: cpu_threads(),
    }
}

/// SIMD features in order of preference for the kernels (best first).
fn cpu_features() -> Vec<(&'static str, bool)> {
    #[cfg(target_arch = "x86_64")]
    {
        vec![
            ("avx512f", is_x86_feature_detected!("avx512f")),
            ("avx512bw", is_x86_feature_detected!("avx512bw")),
            ("avx512vl", is_x86_feature_detected!("avx512vl")),
            ("avx512bf16", is_x86_feature_detected!("avx512bf16")),
            ("avx512vnni", is_x86_feature_detected!("avx512vnni")),
            ("avx2", is_x86_feature_detected!("avx2")),
            ("fma", is_x86_feature_detected!("fma")),
            ("f16c", is_x86_feature_detected!("f16c")),
        ]
    }
    #[cfg(target_arch = "aarch64")]
    {
        vec![("neon", std::arch::is_aarch64_feature_detected!("neon"))]
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_available() {
        let selected = select(Accelerator::Cpu).expect("the cpu always opens");
        assert!(selected.device.is_cpu());
        assert!(
            selected.description.starts_with("cpu ("),
            "{}",
            selected.description
        );
    }

    #[test]
    fn auto_picks_a_device_and_says_which() {
        let selected = select(Accelerator::Auto).expect("auto falls back to the cpu");
        if !cfg!(any(feature = "cuda", feature = "metal")) {
            assert!(selected.device.is_cpu());
            assert!(
                selected.description.contains("no gpu backend compiled in"),
                "{}",
                selected.description
            );
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_names_the_feature() {
        let error = select(Accelerator::Cuda).expect_err("this build has no cuda");
        assert!(
            matches!(
                error,
                ModelError::NotCompiled {
                    feature: "cuda",
                    ..
                }
            ),
            "{error}"
        );
        assert!(error.to_string().contains("--features cuda"), "{error}");
    }

    #[cfg(not(feature = "metal"))]
    #[test]
    fn metal_without_the_feature_names_the_feature() {
        let error = select(Accelerator::Metal).expect_err("this build has no metal");
        assert!(error.to_string().contains("--features metal"), "{error}");
    }

    #[test]
    fn doctor_reports_backends_cpu_and_threads() {
        let report = doctor();
        assert_eq!(report.compiled_backends[0], "cpu");
        assert_eq!(report.devices.len(), report.compiled_backends.len() - 1);
        assert!(report.cpu_threads >= 1);
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = report
                .cpu_features
                .iter()
                .find(|(name, _)| *name == "avx2")
                .map(|(_, present)| *present);
            assert_eq!(avx2, Some(is_x86_feature_detected!("avx2")));
        }
        assert!(!report.auto.is_empty());
    }
}
