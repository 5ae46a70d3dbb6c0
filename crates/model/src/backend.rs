//! Choosing where the model runs: `auto`, `cpu` or `gpu`, with the choice
//! and its reason spelled out for the user.

use std::fmt;
use std::str::FromStr;

use std::sync::Arc;

use linattn_kernels::{BuildStatus, Device, Gpu};

use crate::attention::CpuAttention;
use crate::error::{ModelError, Result};

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// The GPU if a driver, a device and a GPU backend are present, else the CPU.
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// The GPU; an error if it cannot be used.
    Gpu,
}

impl FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(BackendChoice::Auto),
            "cpu" => Ok(BackendChoice::Cpu),
            "gpu" | "cuda" => Ok(BackendChoice::Gpu),
            other => Err(format!(
                "unknown backend `{other}`; expected `auto`, `cpu` or `gpu`"
            )),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Cpu => "cpu",
            BackendChoice::Gpu => "gpu",
        })
    }
}

/// A backend ready to run the model.
#[derive(Debug, Clone)]
pub enum Backend {
    /// [`CpuAttention`] plus CPU projections.
    Cpu(CpuAttention),
    /// The device-resident model on this GPU ([`crate::GpuModel`]: the
    /// project's kernels, cuBLAS projections).
    Gpu(Device),
}

/// The outcome of [`select_backend`]: the backend and a sentence saying why.
#[derive(Debug, Clone)]
pub struct Selection {
    /// The backend to use.
    pub backend: Backend,
    /// Why it was chosen, for printing ("CPU: no CUDA driver found").
    pub reason: String,
}

/// The GPU for [`crate::GpuModel`], or why there is none: checked in order,
/// a driver, a device, kernels built for it (nvcc at build time), opening
/// it, and cuBLAS (loaded at run time for the projections: a GPU machine
/// without it runs the model on the CPU under `auto`).
pub fn gpu_device() -> std::result::Result<Device, String> {
    if !linattn_kernels::driver_present() {
        return Err("no CUDA driver found (libcuda could not be loaded)".into());
    }
    match linattn_kernels::device_count() {
        Err(e) => return Err(format!("the CUDA driver reports no usable device ({e})")),
        Ok(0) => return Err("the CUDA driver reports 0 devices".into()),
        Ok(_) => {}
    }
    if let BuildStatus::NotBuilt(why) = linattn_kernels::build_status() {
        return Err(format!(
            "a CUDA device is present but this build has no kernels ({why})"
        ));
    }
    let gpu = Gpu::new(0).map_err(|e| format!("the GPU could not be opened ({e})"))?;
    crate::gpu::open_cublas(gpu.stream()).map_err(|why| format!("a GPU is present but {why}"))?;
    Ok(Device::Gpu(Arc::new(gpu)))
}

/// Why the GPU cannot run the model on this machine and build (see
/// [`gpu_device`]); "none" when it can.
pub fn gpu_unavailable_reason() -> String {
    gpu_device()
        .err()
        .unwrap_or_else(|| "none (a GPU is available)".into())
}

/// Resolves a [`BackendChoice`]: `auto` falls back to the CPU with the
/// reason, `gpu` fails with [`ModelError::BackendUnavailable`] when the GPU
/// cannot be used, `cpu` always succeeds.
pub fn select_backend(choice: BackendChoice) -> Result<Selection> {
    let cpu = |reason: String| Selection {
        backend: Backend::Cpu(CpuAttention),
        reason,
    };
    let gpu = |d: Device, why: &str| Selection {
        reason: format!(
            "GPU: {} ({why}; device-resident model: linattn kernels, cuBLAS projections)",
            d.describe()
        ),
        backend: Backend::Gpu(d),
    };
    match choice {
        BackendChoice::Cpu => Ok(cpu("CPU (requested with --backend cpu)".into())),
        BackendChoice::Auto => Ok(match gpu_device() {
            Ok(d) => gpu(d, "found by --backend auto"),
            Err(why) => cpu(format!("CPU (GPU not used: {why})")),
        }),
        BackendChoice::Gpu => match gpu_device() {
            Ok(d) => Ok(gpu(d, "requested with --backend gpu")),
            Err(reason) => Err(ModelError::BackendUnavailable {
                backend: "gpu".into(),
                reason,
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse() {
        assert_eq!("CPU".parse::<BackendChoice>(), Ok(BackendChoice::Cpu));
        assert_eq!("gpu".parse::<BackendChoice>(), Ok(BackendChoice::Gpu));
        assert_eq!("auto".parse::<BackendChoice>(), Ok(BackendChoice::Auto));
        assert!("tpu".parse::<BackendChoice>().unwrap_err().contains("tpu"));
    }

    #[test]
    fn cpu_and_auto_always_resolve() {
        let s = select_backend(BackendChoice::Cpu).unwrap();
        assert!(matches!(s.backend, Backend::Cpu(_)));
        let auto = select_backend(BackendChoice::Auto).unwrap();
        match gpu_device() {
            // With a usable GPU, auto and gpu pick it.
            Ok(_) => {
                assert!(matches!(auto.backend, Backend::Gpu(_)), "{}", auto.reason);
                assert!(auto.reason.starts_with("GPU"), "{}", auto.reason);
                assert!(select_backend(BackendChoice::Gpu).is_ok());
            }
            // Without one, auto is the CPU with the reason and `gpu` is a
            // clear error naming it, never a panic.
            Err(why) => {
                assert!(matches!(auto.backend, Backend::Cpu(_)));
                assert!(auto.reason.starts_with("CPU") && auto.reason.contains(&why));
                let e = select_backend(BackendChoice::Gpu).unwrap_err().to_string();
                assert!(
                    e.contains("backend `gpu` is unavailable") && e.contains(&why),
                    "{e}"
                );
                assert_eq!(gpu_unavailable_reason(), why);
            }
        }
    }
}
