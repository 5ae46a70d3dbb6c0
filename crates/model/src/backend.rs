//! Choosing where the model runs: `auto`, `cpu` or `gpu`, with the choice
//! and its reason spelled out for the user.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::{ModelError, Result};

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// The GPU if this build has CUDA support and a device is present, else the CPU.
    #[default]
    Auto,
    /// The CPU.
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

/// The outcome of [`select_backend`]: the candle device and a sentence
/// saying why it was chosen.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Where the model's tensors go.
    pub device: Device,
    /// Why, for printing ("CPU (GPU not used: ...)").
    pub reason: String,
}

impl Selection {
    /// "CPU" or "GPU".
    pub fn short(&self) -> &'static str {
        if self.device.is_cuda() {
            "GPU"
        } else {
            "CPU"
        }
    }
}

/// The CUDA device 0 for the model, or why there is none: the build must
/// have the `cuda` feature (candle's CUDA backend and `linattn-candle`'s
/// kernels), and candle must open a device.
pub fn gpu_device() -> std::result::Result<Device, String> {
    if !cfg!(feature = "cuda") {
        return Err(
            "this build has no CUDA support (build with `--features cuda` to run on a GPU)".into(),
        );
    }
    if !candle_core::utils::cuda_is_available() {
        return Err("this build has no CUDA support".into());
    }
    Device::new_cuda(0).map_err(|e| format!("no usable CUDA device ({e})"))
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
        device: Device::Cpu,
        reason,
    };
    let gpu = |device: Device, why: &str| Selection {
        reason: format!(
            "GPU: CUDA device 0 ({why}; candle's CUDA backend, linattn kernels on candle's stream)"
        ),
        device,
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
        assert!(s.device.is_cpu() && s.short() == "CPU");
        let auto = select_backend(BackendChoice::Auto).unwrap();
        match gpu_device() {
            Ok(_) => {
                assert!(auto.device.is_cuda(), "{}", auto.reason);
                assert!(auto.reason.starts_with("GPU"), "{}", auto.reason);
                assert!(select_backend(BackendChoice::Gpu).is_ok());
            }
            Err(why) => {
                assert!(auto.device.is_cpu());
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
