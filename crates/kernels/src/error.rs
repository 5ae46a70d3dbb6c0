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
