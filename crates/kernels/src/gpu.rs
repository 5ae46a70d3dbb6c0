//! The CUDA executor: a device context, a stream, and a lazily loaded,
//! cached registry of the embedded fatbin modules.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};

use crate::embedded::{embedded_module, BuildStatus, BUILD_STATUS};
use crate::ops::forward::tiling::SHARED_BUDGET_BYTES;
use crate::params::KernelParams;
use crate::plan::{Executor, LaunchPlan};
use crate::target::{check_compute_capability, Target};
use crate::{Error, Result};

/// Dynamic shared memory a launch may use without opting in (48 KiB).
const STATIC_SMEM_LIMIT: u32 = 48 * 1024;

/// The debug switch: with `LINATTN_SYNC_LAUNCHES=1` every launch is
/// followed by a stream synchronisation, so a fault is reported by the
/// launch that caused it ([`Error::Launch`] naming the kernel, grid, block
/// and shared memory) instead of by some later, unrelated call. Read once,
/// when a [`Gpu`] is opened.
pub const SYNC_LAUNCHES_ENV: &str = "LINATTN_SYNC_LAUNCHES";

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
pub(crate) fn guarded<T>(context: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
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
    target: Target,
    sync_launches: bool,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, Loaded>>,
}

/// A loaded kernel and the dynamic shared memory its attribute allows (set
/// once, at load, before any launch can see the function).
#[derive(Clone)]
struct Loaded {
    func: CudaFunction,
    max_dynamic_shared: u32,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("info", &self.info)
            .field("target", &self.target)
            .field("sync_launches", &self.sync_launches)
            .finish_non_exhaustive()
    }
}

impl Gpu {
    /// Opens device `ordinal` with a fresh stream, reads its [`Target`]
    /// (SMs, shared memory, limits per SM) and whether
    /// [`SYNC_LAUNCHES_ENV`] is set.
    ///
    /// Errors: [`Error::NoDriver`] without libcuda, [`Error::NoDevice`] when the
    /// driver has no such device, [`Error::UnsupportedDevice`] below compute
    /// capability 8.0 (every launch would fail). Never panics.
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
            Self::on(ctx, stream)
        })
    }

    /// The executor over `ctx` launching on `stream`: reads what the driver
    /// says of the device, refuses it below compute capability 8.0, reads
    /// its [`Target`] and [`SYNC_LAUNCHES_ENV`]. Both constructors end here.
    fn on(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<Self> {
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
        check_compute_capability(info.ordinal, &info.name, info.compute_capability)?;
        let target = read_target(&ctx, info.compute_capability)?;
        Ok(Gpu {
            ctx,
            stream,
            info,
            target,
            sync_launches: std::env::var(SYNC_LAUNCHES_ENV).is_ok_and(|v| v == "1"),
            modules: Mutex::default(),
            functions: Mutex::default(),
        })
    }

    /// An executor on an existing stream, such as another engine's (candle's
    /// `CudaDevice::cuda_stream()`): every launch goes to that stream, ordered
    /// with the engine's own work on it, and memory the engine allocated on
    /// that stream can be passed in directly.
    ///
    /// Errors: [`Error::NoDriver`] without libcuda, [`Error::Driver`] when
    /// the device cannot be queried, [`Error::UnsupportedDevice`] below
    /// compute capability 8.0. Never panics.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        if !driver_present() {
            return Err(Error::NoDriver);
        }
        guarded("wrapping a stream", || {
            let ctx = stream.context().clone();
            Self::on(ctx, stream)
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

    /// The device's properties as the schedule policies see them.
    pub fn target(&self) -> Target {
        self.target
    }

    /// This executor with [`SYNC_LAUNCHES_ENV`]'s switch set to `on`,
    /// whatever the environment said when it was opened (for a program, or
    /// a test, that wants it without touching the process environment).
    pub fn with_sync_launches(mut self, on: bool) -> Self {
        self.sync_launches = on;
        self
    }

    /// Whether every launch is followed by a synchronisation
    /// ([`SYNC_LAUNCHES_ENV`], read when this `Gpu` was opened).
    pub fn syncs_launches(&self) -> bool {
        self.sync_launches
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

    /// Loads `kernel` once and sets its dynamic shared memory attribute
    /// once, to what any plan can ask ([`SHARED_BUDGET_BYTES`]) within the
    /// device's opt-in less the kernel's static shared memory. The lock is
    /// held until the attribute is set, so no launch sees the function
    /// before; launches never set attributes, so two threads launching the
    /// same kernel with different shared sizes cannot race.
    fn loaded(&self, module: &'static str, kernel: &'static str) -> Result<Loaded> {
        let mut functions = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = functions.get(kernel) {
            return Ok(l.clone());
        }
        let m = self.module(module)?;
        let func = guarded("cuModuleGetFunction", || {
            m.load_function(kernel).map_err(|e| Error::KernelMissing {
                kernel: kernel.to_string(),
                reason: e.to_string(),
            })
        })?;
        let static_shared = guarded(kernel, || {
            func.get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                .map_err(|e| {
                    Error::driver(format!("{kernel}: reading its static shared memory"), e)
                })
        })?;
        let room = self
            .target
            .shared_per_block_optin
            .saturating_sub(static_shared.max(0) as u32);
        let max_dynamic_shared = room.min(SHARED_BUDGET_BYTES as u32);
        if static_shared.max(0) as u32 + max_dynamic_shared > STATIC_SMEM_LIMIT {
            // Above 48 KiB of static plus dynamic shared memory a kernel
            // must opt in.
            guarded(kernel, || {
                func.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    max_dynamic_shared as i32,
                )
                .map_err(|e| {
                    Error::driver(
                        format!(
                            "{kernel}: allowing {max_dynamic_shared} bytes of dynamic shared memory on {}",
                            self.info.name
                        ),
                        e,
                    )
                })
            })?;
        }
        let l = Loaded {
            func,
            max_dynamic_shared,
        };
        functions.insert(kernel, l.clone());
        Ok(l)
    }
}

/// Reads the [`Target`] of the context's device.
fn read_target(ctx: &Arc<CudaContext>, cc: (i32, i32)) -> Result<Target> {
    use CUdevice_attribute as A;
    let get = |a: A, what: &str| -> Result<u32> {
        ctx.attribute(a)
            .map(|v| v.max(0) as u32)
            .map_err(|e| Error::driver(format!("cuDeviceGetAttribute ({what})"), e))
    };
    Ok(Target {
        compute_capability: (cc.0.max(0) as u32, cc.1.max(0) as u32),
        sms: get(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "SM count")?,
        shared_per_block_optin: get(
            A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            "opt-in shared memory per block",
        )?,
        shared_per_sm: get(
            A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
            "shared memory per SM",
        )?,
        reserved_shared_per_block: get(
            A::CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK,
            "reserved shared memory per block",
        )?,
        max_threads_per_sm: get(
            A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR,
            "threads per SM",
        )?,
        regs_per_sm: get(
            A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR,
            "registers per SM",
        )?,
        max_blocks_per_sm: get(
            A::CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR,
            "blocks per SM",
        )?,
    })
}

impl Executor for Gpu {
    fn target(&self) -> Target {
        self.target
    }

    unsafe fn launch<P: KernelParams>(&self, plan: &LaunchPlan<P>) -> Result<()> {
        let loaded = self.loaded(plan.module, plan.kernel)?;
        if plan.shared_bytes > loaded.max_dynamic_shared {
            return Err(Error::SharedMemory {
                kernel: plan.kernel.to_string(),
                bytes: plan.shared_bytes,
                limit: loaded.max_dynamic_shared,
                device: format!("{} ({})", self.info.name, self.target.arch()),
            });
        }
        let failed = |stage: &'static str, message: String| Error::Launch {
            kernel: plan.kernel.to_string(),
            grid: plan.grid,
            block: plan.block,
            shared_bytes: plan.shared_bytes,
            stage,
            message,
        };
        let cfg = LaunchConfig {
            grid_dim: (plan.grid[0], plan.grid[1], plan.grid[2]),
            block_dim: (plan.block[0], plan.block[1], plan.block[2]),
            shared_mem_bytes: plan.shared_bytes,
        };
        guarded(plan.kernel, || {
            let mut builder = self.stream.launch_builder(&loaded.func);
            builder.arg(&plan.params);
            // SAFETY: the caller guarantees the params' addresses (trait contract).
            unsafe { builder.launch(cfg) }
                .map(|_| ())
                .map_err(|e| failed("at launch", e.to_string()))
        })?;
        if self.sync_launches {
            guarded(plan.kernel, || {
                self.stream.synchronize().map_err(|e| {
                    failed(
                        "while running (LINATTN_SYNC_LAUNCHES=1 synchronised after it)",
                        e.to_string(),
                    )
                })
            })?;
        }
        Ok(())
    }
}
