//! Choosing where the model runs: `auto`, `cpu` or `gpu`, with the choice
//! and its reason spelled out for the user.

use std::fmt;
use std::str::FromStr;

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
}

/// The outcome of [`select_backend`]: the backend and a sentence saying why.
#[derive(Debug, Clone)]
pub struct Selection {
    /// The backend to use.
    pub backend: Backend,
    /// Why it was chosen, for printing ("CPU: no CUDA driver found").
    pub reason: String,
}

/// Why the CLI does not run the model on the GPU on this machine and build.
///
/// Checked in order: a driver, a device, then the CLI itself. The model has
/// a device-resident GPU path ([`crate::GpuModel`]: the project's kernels
/// plus cuBLAS projections), but the CLI's generation loop and demo are
/// written over [`crate::AttentionBackend`] and do not drive it yet, so a
/// machine with a GPU still gets the last reason (library users call
/// `GpuModel` directly).
pub fn gpu_unavailable_reason() -> String {
    if !linattn_kernels::driver_present() {
        return "no CUDA driver found (libcuda could not be loaded)".into();
    }
    match linattn_kernels::device_count() {
        Err(e) => format!("the CUDA driver reports no usable device ({e})"),
        Ok(0) => "the CUDA driver reports 0 devices".into(),
        Ok(n) => format!(
            "{n} CUDA device(s) found, but the CLI does not drive the GPU model path \
             (linattn_model::GpuModel) yet; use --backend cpu"
        ),
    }
}

/// Resolves a [`BackendChoice`]: `auto` falls back to the CPU with the
/// reason, `gpu` fails with [`ModelError::BackendUnavailable`] when the GPU
/// cannot be used, `cpu` always succeeds.
pub fn select_backend(choice: BackendChoice) -> Result<Selection> {
    let cpu = |reason: String| Selection {
        backend: Backend::Cpu(CpuAttention),
        reason,
    };
    match choice {
        BackendChoice::Cpu => Ok(cpu("CPU (requested with --backend cpu)".into())),
        BackendChoice::Auto => Ok(cpu(format!(
            "CPU (GPU not used: {})",
            gpu_unavailable_reason()
        ))),
        BackendChoice::Gpu => Err(ModelError::BackendUnavailable {
            backend: "gpu".into(),
            reason: gpu_unavailable_reason(),
        }),
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
        for c in [BackendChoice::Cpu, BackendChoice::Auto] {
            let s = select_backend(c).unwrap();
            assert!(matches!(s.backend, Backend::Cpu(_)));
            assert!(s.reason.starts_with("CPU"), "{}", s.reason);
        }
        // No GPU backend in this build: `gpu` is a clear error, never a panic.
        let e = select_backend(BackendChoice::Gpu).unwrap_err().to_string();
        assert!(e.contains("backend `gpu` is unavailable"), "{e}");
    }
}
