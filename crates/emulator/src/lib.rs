//! Runs linattn's CUDA sources on the CPU.
//!
//! The same `cuda/*.cu` files that nvcc compiles for the GPU are compiled with the
//! host C++ compiler against a header (`include/linattn_emu.h`) that maps CUDA's
//! built-ins onto this crate's runtime:
//!
//! * every CUDA thread of a block is a fiber (a [`corosensei`] coroutine); a block's
//!   fibers run on one OS thread and switch only inside `__syncthreads()`, warp
//!   collectives (`__shfl*_sync`, `__ballot_sync`, `__syncwarp`, ...) and `wmma`
//!   calls. Blocks are spread over `LINATTN_EMU_THREADS` worker threads (default: the
//!   available parallelism);
//! * `__shared__` declarations are rewritten by the [`build`] helper into per-block
//!   storage, filled with `0xFF` bytes (NaN) at block start, so reads of unwritten
//!   shared memory show up in results;
//! * a barrier that not every thread reaches is reported as an [`EmuError`] naming
//!   the kernel and block instead of hanging, and [`Module::launch_checked`] runs a
//!   launch under two thread schedules to catch missing barriers;
//! * what a GPU rejects or leaves undefined is an error here too: blocks beyond the
//!   kernel's `__launch_bounds__` ([`EmuError::LaunchBounds`]), shared memory beyond
//!   the module's limit, wmma pointers not 32-byte aligned or `ldm` not a multiple
//!   of 16 bytes, and a dynamic shared memory base aligned only as far as the
//!   kernel's `extern __shared__ __align__(N)` declares (at least 16 bytes); the
//!   fast intrinsics (`__fdividef`, `__expf`, `__logf`, `__powf`, ...) follow their
//!   documented approximate construction, not the exact host functions.
//!
//! A kernels crate compiles its sources from its `build.rs` with
//! [`build::Build`], then wraps the generated module descriptor in a [`Module`]:
//!
//! ```ignore
//! // build.rs
//! let report = linattn_emulator::build::Build::new("linattn_kernels")
//!     .sources(["../../cuda/scan.cu"])
//!     .include_dir("../../cuda/include")
//!     .compile()?;
//! // report.module_symbol == "linattn_kernels_emu_module"
//! ```
//!
//! The crate's own test kernels (feature `test-kernels`, on for its tests) show a
//! launch end to end:
//!
//! ```
//! # #[cfg(feature = "test-kernels")] {
//! use linattn_emulator::{test_kernels, LaunchConfig};
//!
//! #[repr(C)]
//! struct SumParams { input: *const f32, output: *mut f32, n: u32 }
//!
//! let input: Vec<f32> = (0..1000).map(|i| i as f32).collect();
//! let mut output = vec![0f32; 4];
//! let p = SumParams { input: input.as_ptr(), output: output.as_mut_ptr(), n: 1000 };
//! let module = test_kernels::module();
//! let cfg = LaunchConfig::new([4, 1, 1], [256, 1, 1], 0);
//! // SAFETY: the params match the kernel's struct and the buffers outlive the launch.
//! unsafe { module.launch_params("emu_test_block_sum", &cfg, &p) }.unwrap();
//! let total: f32 = output.iter().sum();
//! assert_eq!(total, 499_500.0);
//! # }
//! ```

#![deny(missing_docs)]

pub mod build;
#[doc(hidden)]
pub mod ffi;
mod runtime;

use std::ffi::{c_void, CStr};

use ffi::{RawModule, ThreadCtx};
use runtime::{run_grid, worker_count, Launch, Worker};

/// Default per-block shared memory limit: 227 KiB, as on Hopper.
pub const DEFAULT_SHARED_LIMIT: usize = 227 * 1024;

/// An error from an emulated launch. Every variant raised while running names the
/// kernel, and those tied to a block name the block (`blockIdx` as `[x, y, z]`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmuError {
    /// The module pointer is null or does not come from this emulator version.
    #[error("invalid emulator module: {0}")]
    BadModule(String),
    /// No kernel of that name is registered.
    #[error("kernel `{kernel}` is not in emulator module `{module}`")]
    UnknownKernel {
        /// Requested kernel.
        kernel: String,
        /// The module's library name.
        module: String,
    },
    /// The params buffer does not have the size of the kernel's params struct.
    #[error("kernel `{kernel}`: params are {got} bytes but the kernel's params struct is {expected} bytes")]
    ParamsSize {
        /// Kernel name.
        kernel: String,
        /// `sizeof` of the params struct as compiled.
        expected: usize,
        /// Bytes passed.
        got: usize,
    },
    /// The launch configuration is one CUDA would reject.
    #[error("kernel `{kernel}`: invalid launch configuration: {reason}")]
    InvalidLaunch {
        /// Kernel name.
        kernel: String,
        /// What is wrong.
        reason: String,
    },
    /// The block has more threads than the kernel's `__launch_bounds__` allows (on a
    /// GPU the launch fails with `CUDA_ERROR_INVALID_VALUE`).
    #[error(
        "kernel `{kernel}`: block {block:?} has {threads} threads but the kernel's __launch_bounds__ allows \
         at most {max_threads}"
    )]
    LaunchBounds {
        /// Kernel name.
        kernel: String,
        /// `blockDim` of the launch.
        block: [u32; 3],
        /// Threads per block of the launch.
        threads: u64,
        /// maxThreadsPerBlock from `__launch_bounds__` (1024 without the attribute).
        max_threads: u32,
    },
    /// Static plus dynamic shared memory exceeds the module's limit.
    #[error(
        "kernel `{kernel}` block {block:?}: shared memory (static {static_bytes} + dynamic {dynamic_bytes} bytes) \
         exceeds the limit of {limit} bytes"
    )]
    SharedMemoryLimit {
        /// Kernel name.
        kernel: String,
        /// Block index.
        block: [u32; 3],
        /// Static shared bytes requested so far (including alignment).
        static_bytes: usize,
        /// Dynamic shared bytes of the launch.
        dynamic_bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// Some threads wait at `__syncthreads()` while others exited or wait at a warp
    /// collective.
    #[error("kernel `{kernel}` block {block:?}: divergent barrier: {detail}")]
    DivergentBarrier {
        /// Kernel name.
        kernel: String,
        /// Block index.
        block: [u32; 3],
        /// Which threads wait where.
        detail: String,
    },
    /// No thread can make progress (warp collectives waiting for each other).
    #[error("kernel `{kernel}` block {block:?}: deadlock: {detail}")]
    Deadlock {
        /// Kernel name.
        kernel: String,
        /// Block index.
        block: [u32; 3],
        /// Which threads wait where.
        detail: String,
    },
    /// A warp collective whose mask names exited lanes, excludes the caller, or whose
    /// lanes wait at different collectives.
    #[error("kernel `{kernel}` block {block:?}: bad warp collective: {detail}")]
    WarpCollective {
        /// Kernel name.
        kernel: String,
        /// Block index.
        block: [u32; 3],
        /// What went wrong.
        detail: String,
    },
    /// Device code reported a fault (`__trap()`, an invalid shuffle width, ...).
    #[error("kernel `{kernel}` block {block:?} thread {thread:?}: {message}")]
    DeviceFault {
        /// Kernel name.
        kernel: String,
        /// Block index.
        block: [u32; 3],
        /// `threadIdx` of the faulting thread.
        thread: [u32; 3],
        /// The fault.
        message: String,
    },
    /// [`Module::launch_checked`]: the outputs differ between two thread schedules.
    #[error(
        "kernel `{kernel}` block {block:?}: results depend on the thread schedule: a missing __syncthreads or a race \
         (output region {region}, first differing byte {first_index})"
    )]
    ScheduleDependent {
        /// Kernel name.
        kernel: String,
        /// The first block whose outputs depend on the schedule of its threads.
        block: [u32; 3],
        /// Index into the `outputs` slice.
        region: usize,
        /// Byte offset of the first difference within that region.
        first_index: usize,
    },
    /// [`Module::launch_checked`]: the outputs differ between two schedules, but no
    /// single block reproduces it: blocks interact through global memory.
    #[error(
        "kernel `{kernel}`: results depend on the schedule of blocks, not of threads within one block \
         (output region {region}, first differing byte {first_index})"
    )]
    CrossBlockDependence {
        /// Kernel name.
        kernel: String,
        /// Index into the `outputs` slice.
        region: usize,
        /// Byte offset of the first difference.
        first_index: usize,
    },
    /// The `outputs` passed to [`Module::launch_checked`] are unusable.
    #[error("kernel `{kernel}`: bad output region {region}: {reason}")]
    BadOutputs {
        /// Kernel name.
        kernel: String,
        /// Index into the `outputs` slice.
        region: usize,
        /// What is wrong.
        reason: String,
    },
    /// The runtime could not get memory or fiber stacks.
    #[error("emulator resources: {0}")]
    Resource(String),
}

/// Grid, block and dynamic shared memory of a launch, as in `<<<grid, block, shared>>>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    /// `gridDim`.
    pub grid: [u32; 3],
    /// `blockDim`.
    pub block: [u32; 3],
    /// Dynamic shared memory bytes (`extern __shared__`).
    pub shared_bytes: usize,
}

impl LaunchConfig {
    /// A configuration from its parts.
    pub fn new(grid: [u32; 3], block: [u32; 3], shared_bytes: usize) -> Self {
        LaunchConfig {
            grid,
            block,
            shared_bytes,
        }
    }

    /// A one-dimensional grid of one-dimensional blocks without dynamic shared memory.
    pub fn linear(blocks: u32, threads: u32) -> Self {
        LaunchConfig::new([blocks, 1, 1], [threads, 1, 1], 0)
    }

    /// Checks the configuration like the CUDA driver does.
    pub fn validate(&self, kernel: &str, shared_limit: usize) -> Result<(), EmuError> {
        let bad = |reason: String| {
            Err(EmuError::InvalidLaunch {
                kernel: kernel.to_string(),
                reason,
            })
        };
        let [bx, by, bz] = self.block;
        let [gx, gy, gz] = self.grid;
        if bx == 0 || by == 0 || bz == 0 {
            return bad(format!(
                "block dimensions {:?} must all be positive",
                self.block
            ));
        }
        if bx > 1024 || by > 1024 || bz > 64 {
            return bad(format!(
                "block dimensions {:?} exceed the maximum (1024, 1024, 64)",
                self.block
            ));
        }
        let threads = bx as u64 * by as u64 * bz as u64;
        if threads > 1024 {
            return bad(format!(
                "block {:?} has {threads} threads; at most 1024 are allowed",
                self.block
            ));
        }
        if gx == 0 || gy == 0 || gz == 0 {
            return bad(format!(
                "grid dimensions {:?} must all be positive",
                self.grid
            ));
        }
        if gx > i32::MAX as u32 || gy > 65535 || gz > 65535 {
            return bad(format!(
                "grid dimensions {:?} exceed the maximum (2147483647, 65535, 65535)",
                self.grid
            ));
        }
        if self.shared_bytes > shared_limit {
            return bad(format!(
                "{} bytes of dynamic shared memory exceed the limit of {shared_limit} bytes",
                self.shared_bytes
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct KernelInfo {
    name: String,
    entry: unsafe extern "C" fn(*const c_void),
    params_size: usize,
    params_align: usize,
    max_threads: u32,
    /// Alignment of the dynamic shared memory base: the largest `__align__` on the
    /// kernel's `extern __shared__` declarations, at least 16.
    dyn_align: usize,
}

/// The dynamic shared memory base is aligned to at least this many bytes.
const MIN_DYN_ALIGN: usize = 16;
/// The largest `__align__` accepted on `extern __shared__` declarations.
const MAX_DYN_ALIGN: usize = 1 << 16;

/// A library of emulated kernels: the descriptor that the build helper generates
/// (`extern "C" const LinattnEmuModule* <lib>_emu_module(void)`), checked and indexed.
#[derive(Debug, Clone)]
pub struct Module {
    lib_name: String,
    set_ctx: unsafe extern "C" fn(*mut ThreadCtx),
    unpoison: Option<unsafe extern "C" fn(*mut c_void, u64)>,
    kernels: Vec<KernelInfo>,
    shared_limit: usize,
}

/// Params copied into a buffer aligned for the kernel's params struct.
struct ParamsBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Drop for ParamsBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

impl Module {
    /// Wraps the pointer returned by a generated `<lib>_emu_module()` function.
    ///
    /// # Safety
    /// `ptr` must be null or point to a descriptor that lives for the rest of the
    /// program (the generated one is static). Its magic number and ABI version are
    /// checked.
    pub unsafe fn from_raw(ptr: *const c_void) -> Result<Module, EmuError> {
        if ptr.is_null() {
            return Err(EmuError::BadModule("null module pointer".into()));
        }
        // SAFETY: caller guarantees a valid, static descriptor.
        let raw = unsafe { &*(ptr as *const RawModule) };
        if raw.magic != ffi::MAGIC {
            return Err(EmuError::BadModule(format!("bad magic {:#x}", raw.magic)));
        }
        if raw.abi_version != ffi::ABI_VERSION
            || raw.thread_ctx_size as usize != std::mem::size_of::<ThreadCtx>()
        {
            return Err(EmuError::BadModule(format!(
                "module built for emulator ABI {} (context {} bytes), runtime is ABI {} ({} bytes); rebuild it",
                raw.abi_version,
                raw.thread_ctx_size,
                ffi::ABI_VERSION,
                std::mem::size_of::<ThreadCtx>()
            )));
        }
        let set_ctx = raw
            .set_ctx
            .ok_or_else(|| EmuError::BadModule("module has no set_ctx".into()))?;
        let lib_name = if raw.lib_name.is_null() {
            String::new()
        } else {
            // SAFETY: generated string literal.
            unsafe { CStr::from_ptr(raw.lib_name) }
                .to_string_lossy()
                .into_owned()
        };
        let mut kernels = Vec::with_capacity(raw.num_kernels as usize);
        for i in 0..raw.num_kernels as usize {
            // SAFETY: the table has num_kernels entries.
            let k = unsafe { &*raw.kernels.add(i) };
            let entry = k
                .entry
                .ok_or_else(|| EmuError::BadModule(format!("kernel #{i} has no entry point")))?;
            if k.name.is_null() {
                return Err(EmuError::BadModule(format!("kernel #{i} has no name")));
            }
            // SAFETY: generated string literal.
            let name = unsafe { CStr::from_ptr(k.name) }
                .to_string_lossy()
                .into_owned();
            if k.max_threads == 0 {
                return Err(EmuError::BadModule(format!(
                    "kernel `{name}`: __launch_bounds__ must name a positive thread count"
                )));
            }
            let dyn_align = k.dyn_align.max(MIN_DYN_ALIGN as u64);
            if !dyn_align.is_power_of_two() || dyn_align > MAX_DYN_ALIGN as u64 {
                return Err(EmuError::BadModule(format!(
                    "kernel `{name}`: extern __shared__ alignment {} is not a power of two up to {MAX_DYN_ALIGN}",
                    k.dyn_align
                )));
            }
            kernels.push(KernelInfo {
                name,
                entry,
                params_size: k.params_size as usize,
                params_align: (k.params_align as usize).max(1),
                max_threads: k.max_threads.min(1024) as u32,
                dyn_align: dyn_align as usize,
            });
        }
        Ok(Module {
            lib_name,
            set_ctx,
            unpoison: raw.unpoison,
            kernels,
            shared_limit: DEFAULT_SHARED_LIMIT,
        })
    }

    /// The library name the module was built under.
    pub fn lib_name(&self) -> &str {
        &self.lib_name
    }

    /// Names of the registered kernels, in source order.
    pub fn kernel_names(&self) -> Vec<&str> {
        self.kernels.iter().map(|k| k.name.as_str()).collect()
    }

    /// Whether a kernel of that name is registered.
    pub fn has_kernel(&self, name: &str) -> bool {
        self.kernels.iter().any(|k| k.name == name)
    }

    /// `sizeof` of the kernel's params struct as compiled, if the kernel exists.
    pub fn params_size(&self, name: &str) -> Option<usize> {
        self.kernels
            .iter()
            .find(|k| k.name == name)
            .map(|k| k.params_size)
    }

    /// The most threads per block the kernel accepts: the first argument of its
    /// `__launch_bounds__`, or 1024 (CUDA's limit) without the attribute. `None` if
    /// the kernel does not exist.
    pub fn max_threads(&self, name: &str) -> Option<u32> {
        self.kernels
            .iter()
            .find(|k| k.name == name)
            .map(|k| k.max_threads)
    }

    /// Alignment in bytes of the kernel's dynamic shared memory base: the largest
    /// `__align__(N)` on the `extern __shared__` declarations in its body, at least
    /// 16. The base is aligned to exactly that (never to more), as the least a GPU
    /// guarantees. `None` if the kernel does not exist.
    pub fn dyn_shared_align(&self, name: &str) -> Option<usize> {
        self.kernels
            .iter()
            .find(|k| k.name == name)
            .map(|k| k.dyn_align)
    }

    /// The per-block shared memory limit (static + dynamic), default
    /// [`DEFAULT_SHARED_LIMIT`].
    pub fn shared_limit(&self) -> usize {
        self.shared_limit
    }

    /// Sets the per-block shared memory limit.
    pub fn with_shared_limit(mut self, bytes: usize) -> Self {
        self.shared_limit = bytes;
        self
    }

    fn kernel(&self, name: &str) -> Result<&KernelInfo, EmuError> {
        self.kernels
            .iter()
            .find(|k| k.name == name)
            .ok_or_else(|| EmuError::UnknownKernel {
                kernel: name.to_string(),
                module: self.lib_name.clone(),
            })
    }

    fn prepare(
        &self,
        kernel: &str,
        cfg: &LaunchConfig,
        params: *const u8,
        params_len: usize,
    ) -> Result<(&KernelInfo, ParamsBuf), EmuError> {
        let k = self.kernel(kernel)?;
        if params_len != k.params_size {
            return Err(EmuError::ParamsSize {
                kernel: kernel.to_string(),
                expected: k.params_size,
                got: params_len,
            });
        }
        if params.is_null() && params_len > 0 {
            return Err(EmuError::InvalidLaunch {
                kernel: kernel.to_string(),
                reason: "null params pointer".into(),
            });
        }
        cfg.validate(kernel, self.shared_limit)?;
        let threads = cfg.block.iter().map(|&d| d as u64).product::<u64>();
        if threads > k.max_threads as u64 {
            return Err(EmuError::LaunchBounds {
                kernel: kernel.to_string(),
                block: cfg.block,
                threads,
                max_threads: k.max_threads,
            });
        }
        let layout = std::alloc::Layout::from_size_align(params_len.max(1), k.params_align.max(16))
            .map_err(|e| EmuError::Resource(format!("params buffer: {e}")))?;
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            return Err(EmuError::Resource(
                "cannot allocate the params buffer".into(),
            ));
        }
        if params_len > 0 {
            // SAFETY: caller promised `params` points to `params_len` readable bytes.
            unsafe { std::ptr::copy_nonoverlapping(params, ptr, params_len) };
        }
        Ok((k, ParamsBuf { ptr, layout }))
    }

    fn launch_desc<'a>(
        &self,
        k: &'a KernelInfo,
        cfg: &LaunchConfig,
        buf: &ParamsBuf,
    ) -> Launch<'a> {
        Launch {
            kernel: &k.name,
            entry: k.entry,
            set_ctx: self.set_ctx,
            unpoison: self.unpoison,
            params: buf.ptr as *const c_void,
            grid: cfg.grid,
            block: cfg.block,
            dyn_bytes: cfg.shared_bytes,
            dyn_offset: k.dyn_align,
            limit: self.shared_limit,
        }
    }

    /// Runs a kernel over the whole grid and waits for it.
    ///
    /// `params` points to the kernel's params struct (`params_len` must equal its
    /// `sizeof`, which the generated table records); it is copied before the launch.
    ///
    /// # Safety
    /// `params` must point to `params_len` readable bytes laid out as the kernel's
    /// params struct, and every pointer inside it must be valid for what the kernel
    /// does with it: the kernel is arbitrary C++.
    pub unsafe fn launch(
        &self,
        kernel: &str,
        cfg: &LaunchConfig,
        params: *const u8,
        params_len: usize,
    ) -> Result<(), EmuError> {
        let (k, buf) = self.prepare(kernel, cfg, params, params_len)?;
        let launch = self.launch_desc(k, cfg, &buf);
        let blocks = launch.blocks();
        run_grid(&launch, 0..blocks, worker_count(), false)
    }

    /// [`Module::launch`] with a typed params struct.
    ///
    /// # Safety
    /// As for [`Module::launch`]: `P` must be the kernel's params struct (`#[repr(C)]`,
    /// same layout) and its pointers valid for the kernel.
    pub unsafe fn launch_params<P>(
        &self,
        kernel: &str,
        cfg: &LaunchConfig,
        params: &P,
    ) -> Result<(), EmuError> {
        // SAFETY: forwarded to the caller.
        unsafe {
            self.launch(
                kernel,
                cfg,
                (params as *const P).cast(),
                std::mem::size_of::<P>(),
            )
        }
    }

    /// Runs a kernel twice over the same inputs, once resuming the threads of every
    /// block in forward order and once in reverse order within every phase, and
    /// compares the `outputs` regions bitwise. A difference means the results depend
    /// on the thread schedule (a missing `__syncthreads()` or a race); the launch is
    /// then replayed block by block to name the first block whose outputs depend on it.
    ///
    /// The regions are snapshotted before the first run and restored before each
    /// replay. Both runs use one worker thread and run the blocks in order. On
    /// success the outputs hold the result of a run; on error they are unspecified.
    ///
    /// # Safety
    /// As for [`Module::launch`]; in addition every `(ptr, len)` in `outputs` must be
    /// valid for reads and writes of `len` bytes and must not be read or written by
    /// anyone else during the call.
    pub unsafe fn launch_checked(
        &self,
        kernel: &str,
        cfg: &LaunchConfig,
        params: *const u8,
        params_len: usize,
        outputs: &[(*mut u8, usize)],
    ) -> Result<(), EmuError> {
        let (k, buf) = self.prepare(kernel, cfg, params, params_len)?;
        for (i, &(p, len)) in outputs.iter().enumerate() {
            if p.is_null() && len > 0 {
                return Err(EmuError::BadOutputs {
                    kernel: kernel.to_string(),
                    region: i,
                    reason: "null pointer".into(),
                });
            }
        }
        let launch = self.launch_desc(k, cfg, &buf);
        let blocks = launch.blocks();
        // SAFETY (all helpers below): the caller guarantees the regions are valid.
        let snapshot = |out: &[(*mut u8, usize)]| -> Vec<Vec<u8>> {
            out.iter()
                .map(|&(p, len)| {
                    if len == 0 {
                        Vec::new()
                    } else {
                        unsafe { std::slice::from_raw_parts(p, len) }.to_vec()
                    }
                })
                .collect()
        };
        let restore = |out: &[(*mut u8, usize)], snap: &[Vec<u8>]| {
            for (&(p, len), s) in out.iter().zip(snap) {
                if len > 0 {
                    unsafe { std::ptr::copy_nonoverlapping(s.as_ptr(), p, len) };
                }
            }
        };
        let diff = |a: &[Vec<u8>], b: &[Vec<u8>]| -> Option<(usize, usize)> {
            a.iter()
                .zip(b)
                .enumerate()
                .find_map(|(r, (x, y))| x.iter().zip(y).position(|(u, v)| u != v).map(|i| (r, i)))
        };
        let initial = snapshot(outputs);
        let mut worker = Worker::new(&launch)?;
        for b in 0..blocks {
            worker.run_block(&launch, b, false)?;
        }
        let forward = snapshot(outputs);
        restore(outputs, &initial);
        for b in 0..blocks {
            worker.run_block(&launch, b, true)?;
        }
        let backward = snapshot(outputs);
        let Some((region, first_index)) = diff(&forward, &backward) else {
            return Ok(());
        };
        // Replay block by block (forward order of blocks) to find the culprit.
        restore(outputs, &initial);
        for b in 0..blocks {
            let before = snapshot(outputs);
            worker.run_block(&launch, b, false)?;
            let f = snapshot(outputs);
            restore(outputs, &before);
            worker.run_block(&launch, b, true)?;
            let r = snapshot(outputs);
            if let Some((region, first_index)) = diff(&f, &r) {
                return Err(EmuError::ScheduleDependent {
                    kernel: kernel.to_string(),
                    block: launch.block_index(b),
                    region,
                    first_index,
                });
            }
        }
        Err(EmuError::CrossBlockDependence {
            kernel: kernel.to_string(),
            region,
            first_index,
        })
    }
}

/// The crate's own test kernels (`tests/cuda/*.cu`), compiled when the
/// `test-kernels` feature is on (the crate's tests turn it on).
#[cfg(feature = "test-kernels")]
pub mod test_kernels {
    use super::Module;

    extern "C" {
        fn linattn_emu_test_kernels_emu_module() -> *const std::ffi::c_void;
    }

    /// The test kernel module.
    pub fn module() -> Module {
        // SAFETY: the generated function returns a static descriptor.
        unsafe { Module::from_raw(linattn_emu_test_kernels_emu_module()) }
            .unwrap_or_else(|e| panic!("test kernel module: {e}"))
    }
}
