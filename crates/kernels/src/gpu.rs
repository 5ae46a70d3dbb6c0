//! The CUDA executor: a device context, a stream, and a lazily loaded,
//! cached registry of the embedded fatbin modules.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};

use crate::embedded::{embedded_module, BuildStatus, BUILD_STATUS};
use crate::params::KernelParams;
use crate::plan::{Executor, LaunchPlan};
use crate::{Error, Result};

/// Dynamic shared memory a launch may use without opting in (48 KiB).
const STATIC_SMEM_LIMIT: u32 = 48 * 1024;

/// What the driver reports about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name.
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Total device memory in bytes.
    pub total_memory: usize,
}

/// Runs a driver call, turning cudarc's panics (it panics when a symbol or
/// library is missing) into errors: linking this crate must never abort a host.
fn guarded<T>(context: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::driver(context, msg))
        }
    }
}

/// The names the CUDA driver library goes by (the loader's search path finds it).
const DRIVER_LIBRARY_NAMES: &[&str] = if cfg!(windows) {
    &["nvcuda.dll"]
} else if cfg!(target_os = "macos") {
    &["libcuda.dylib"]
} else {
    &["libcuda.so.1", "libcuda.so"]
};

/// Whether libcuda can be loaded and exports `cuInit`. Cheap (probed once,
/// then cached); never panics.
///
/// The probe opens the library itself rather than asking cudarc, so it
/// answers the same whichever linking mode cargo unified cudarc to: this
/// crate asks for `fallback-dynamic-loading`, but a crate beside it (candle's
/// `cuda` feature) may ask for `dynamic-linking`, and then cudarc's own
/// `is_culib_present` does not exist. No cudarc driver call is made before
/// this returns true.
pub fn driver_present() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PRESENT.get_or_init(|| DRIVER_LIBRARY_NAMES.iter().any(|name| probe_library(name)))
}

/// Whether `name` loads and exports `cuInit`.
fn probe_library(name: &str) -> bool {
    catch_unwind(|| {
        // SAFETY: loading libcuda runs only its initialisers, which the driver
        // allows from any thread; the symbol is looked up, never called.
        unsafe {
            libloading::Library::new(name)
                .map(|lib| {
                    lib.get::<unsafe extern "C" fn(u32) -> i32>(b"cuInit\0")
                        .is_ok()
                })
                .unwrap_or(false)
        }
    })
    .unwrap_or(false)
}

/// Number of CUDA devices, or why there are none.
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(Error::NoDriver);
    }
    guarded("cuDeviceGetCount", || {
        CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .map_err(|e| Error::NoDevice {
                ordinal: 0,
                reason: e.to_string(),
            })
    })
}

/// One CUDA device with its own stream: the GPU executor.
///
/// Modules are loaded on first use and cached, as are functions.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Gpu {
    /// Opens device `ordinal` with a fresh stream.
    ///
    /// Errors: [`Error::NoDriver`] without libcuda, [`Error::NoDevice`] when the
    /// driver has no such device. Never panics.
    pub fn new(ordinal: usize) -> Result<Self> {
        let count = device_count().map_err(|e| match e {
            Error::NoDevice { reason, .. } => Error::NoDevice { ordinal, reason },
            other => other,
        })?;
        if ordinal >= count {
            return Err(Error::NoDevice {
                ordinal,
                reason: format!("the driver reports {count} device(s)"),
            });
        }
        guarded("opening the device", || {
            let ctx = CudaContext::new(ordinal).map_err(|e| Error::NoDevice {
                ordinal,
                reason: e.to_string(),
            })?;
            let stream = ctx
                .new_stream()
                .map_err(|e| Error::driver("cuStreamCreate", e))?;
            let info = DeviceInfo {
                ordinal,
                name: ctx
                    .name()
                    .map_err(|e| Error::driver("cuDeviceGetName", e))?,
                compute_capability: ctx
                    .compute_capability()
                    .map_err(|e| Error::driver("compute capability", e))?,
                total_memory: ctx
                    .total_mem()
                    .map_err(|e| Error::driver("cuDeviceTotalMem", e))?,
            };
            Ok(Gpu {
                ctx,
                stream,
                info,
                modules: Mutex::default(),
                functions: Mutex::default(),
            })
        })
    }

    /// An executor on an existing stream, such as another engine's (candle's
    /// `CudaDevice::cuda_stream()`): every launch goes to that stream, ordered
    /// with the engine's own work on it, and memory the engine allocated on
    /// that stream can be passed in directly.
    ///
    /// Errors: [`Error::NoDriver`] without libcuda, [`Error::Driver`] when
    /// the device cannot be queried. Never panics.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        if !driver_present() {
            return Err(Error::NoDriver);
        }
        guarded("wrapping a stream", || {
            let ctx = stream.context().clone();
            let info = DeviceInfo {
                ordinal: ctx.ordinal(),
                name: ctx
                    .name()
                    .map_err(|e| Error::driver("cuDeviceGetName", e))?,
                compute_capability: ctx
                    .compute_capability()
                    .map_err(|e| Error::driver("compute capability", e))?,
                total_memory: ctx
                    .total_mem()
                    .map_err(|e| Error::driver("cuDeviceTotalMem", e))?,
            };
            Ok(Gpu {
                ctx,
                stream,
                info,
                modules: Mutex::default(),
                functions: Mutex::default(),
            })
        })
    }

    /// The context, for allocating memory with cudarc.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launch of this executor goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// What the driver says about this device.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Blocks until all work on the stream is done, surfacing asynchronous errors.
    pub fn synchronize(&self) -> Result<()> {
        guarded("cuStreamSynchronize", || {
            self.stream
                .synchronize()
                .map_err(|e| Error::driver("cuStreamSynchronize", e))
        })
    }

    fn module(&self, name: &'static str) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = modules.get(name) {
            return Ok(m.clone());
        }
        let image = match BUILD_STATUS {
            BuildStatus::NotBuilt(reason) => return Err(Error::KernelsNotBuilt { reason }),
            BuildStatus::Built { .. } => {
                embedded_module(name).ok_or_else(|| Error::KernelMissing {
                    kernel: name.to_string(),
                    reason: "no such module was compiled (is the .cu file in cuda/?)".into(),
                })?
            }
        };
        let module = guarded("cuModuleLoadData", || {
            self.ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))
                .map_err(|e| {
                    Error::driver(
                        format!(
                            "loading module `{name}` (built for {})",
                            BUILD_STATUS.archs_string()
                        ),
                        e,
                    )
                })
        })?;
        modules.insert(name, module.clone());
        Ok(module)
    }

    /// The function `kernel` of `module`, loaded on first use.
    pub(crate) fn function(
        &self,
        module: &'static str,
        kernel: &'static str,
    ) -> Result<CudaFunction> {
        if let Some(f) = self
            .functions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(kernel)
        {
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f = guarded("cuModuleGetFunction", || {
            m.load_function(kernel).map_err(|e| Error::KernelMissing {
                kernel: kernel.to_string(),
                reason: e.to_string(),
            })
        })?;
        self.functions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(kernel, f.clone());
        Ok(f)
    }
}

impl Executor for Gpu {
    unsafe fn launch<P: KernelParams>(&self, plan: &LaunchPlan<P>) -> Result<()> {
        let func = self.function(plan.module, plan.kernel)?;
        if plan.shared_bytes > STATIC_SMEM_LIMIT {
            // Above 48 KiB a kernel must opt in to dynamic shared memory; the
            // driver rejects the launch otherwise. Cheap, so set it every time
            // rather than tracking per-function state.
            guarded(plan.kernel, || {
                func.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    plan.shared_bytes as i32,
                )
                .map_err(|e| {
                    Error::driver(
                        format!(
                            "{}: allowing {} bytes of dynamic shared memory on {}",
                            plan.kernel, plan.shared_bytes, self.info.name
                        ),
                        e,
                    )
                })
            })?;
        }
        let cfg = LaunchConfig {
            grid_dim: (plan.grid[0], plan.grid[1], plan.grid[2]),
            block_dim: (plan.block[0], plan.block[1], plan.block[2]),
            shared_mem_bytes: plan.shared_bytes,
        };
        guarded(plan.kernel, || {
            let mut builder = self.stream.launch_builder(&func);
            builder.arg(&plan.params);
            // SAFETY: the caller guarantees the params' addresses (trait contract).
            unsafe { builder.launch(cfg) }
                .map(|_| ())
                .map_err(|e| Error::driver(format!("launching {}", plan.kernel), e))
        })
    }
}
