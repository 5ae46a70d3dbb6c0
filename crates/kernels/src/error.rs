//! The one error type of `linattn-kernels`: every public function returns it,
//! and each variant says which kernel or argument and what was expected.

use std::fmt;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong between validating a call and running it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No CUDA driver library (libcuda) could be loaded on this machine.
    #[error("no CUDA driver found (libcuda could not be loaded); use the CPU emulator or reference instead")]
    NoDriver,
    /// A driver is present but there is no (such) CUDA device.
    #[error("no CUDA device {ordinal}: {reason}")]
    NoDevice {
        /// The device ordinal asked for.
        ordinal: usize,
        /// What the driver said.
        reason: String,
    },
    /// The device code was not compiled into this build.
    #[error("CUDA kernels were not built into linattn-kernels: {reason}")]
    KernelsNotBuilt {
        /// Why (from the build script).
        reason: &'static str,
    },
    /// The kernel exists in the sources but not in the loaded module (or not for this dtype).
    #[error("kernel `{kernel}` is not available: {reason}")]
    KernelMissing {
        /// The kernel's symbol name.
        kernel: String,
        /// Why it could not be found.
        reason: String,
    },
    /// The emulator was asked for but the crate was built without the `emulator` feature.
    #[error(
        "the CPU emulator is not compiled in: enable the `emulator` feature of linattn-kernels"
    )]
    EmulatorNotBuilt,
    /// An argument failed validation.
    #[error("{kernel}: invalid argument `{arg}`: {problem}")]
    InvalidArgument {
        /// The operation being validated.
        kernel: &'static str,
        /// The argument at fault.
        arg: &'static str,
        /// What was expected and what was found.
        problem: String,
    },
    /// The CUDA driver returned an error.
    #[error("CUDA driver error in {context}: {message}")]
    Driver {
        /// What was being done.
        context: String,
        /// The driver's message.
        message: String,
    },
    /// The GPU's compute capability is below what the kernels need.
    #[error("CUDA device {ordinal} ({name}) has compute capability {}.{}; linattn needs {}.{} or newer", compute_capability.0, compute_capability.1, minimum.0, minimum.1)]
    UnsupportedDevice {
        /// The device ordinal.
        ordinal: usize,
        /// The device's name.
        name: String,
        /// Its compute capability (major, minor).
        compute_capability: (i32, i32),
        /// The oldest supported capability.
        minimum: (i32, i32),
    },
    /// A launch asks for more dynamic shared memory than the executor allows
    /// it (the device's opt-in limit less the kernel's static shared memory
    /// on a GPU; the smallest supported opt-in, 99 KiB, on the emulator).
    #[error("{kernel}: {bytes} bytes of dynamic shared memory exceed the {limit} bytes {device} allows this kernel")]
    SharedMemory {
        /// The kernel's symbol.
        kernel: String,
        /// Dynamic shared memory the plan asks for.
        bytes: u32,
        /// The most the executor allows.
        limit: u32,
        /// The executor (GPU name and architecture, or the emulator).
        device: String,
    },
    /// A kernel launch failed, at launch or (with `LINATTN_SYNC_LAUNCHES=1`,
    /// which synchronises after every launch) while running.
    #[error("kernel `{kernel}` (grid {grid:?}, block {block:?}, {shared_bytes} B dynamic shared memory) failed {stage}: {message}")]
    Launch {
        /// The kernel's symbol.
        kernel: String,
        /// Grid in blocks.
        grid: [u32; 3],
        /// Block in threads.
        block: [u32; 3],
        /// Dynamic shared memory per block.
        shared_bytes: u32,
        /// "at launch" or "while running".
        stage: &'static str,
        /// The driver's message.
        message: String,
    },
    /// The CPU emulator reported an error (a deadlock, a race, a bad launch).
    #[error("CPU emulator: {0}")]
    Emulator(String),
}

impl Error {
    pub(crate) fn invalid(
        kernel: &'static str,
        arg: &'static str,
        problem: impl fmt::Display,
    ) -> Self {
        Error::InvalidArgument {
            kernel,
            arg,
            problem: problem.to_string(),
        }
    }

    pub(crate) fn driver(context: impl fmt::Display, err: impl fmt::Display) -> Self {
        Error::Driver {
            context: context.to_string(),
            message: err.to_string(),
        }
    }
}
