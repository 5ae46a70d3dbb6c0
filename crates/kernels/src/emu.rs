//! The CPU executor: the same `.cu` sources compiled with the host C++
//! compiler (by build.rs through `linattn-emulator`) and run on fibers.

use crate::params::KernelParams;
use crate::plan::{Executor, LaunchPlan};
use crate::{Error, Result};

/// Runs launch plans on the CPU. Memory is host memory.
#[derive(Debug)]
pub struct Emulator {
    _private: (),
}

impl Emulator {
    /// The emulator over this crate's kernels.
    pub fn new() -> Result<Self> {
        Ok(Emulator { _private: () })
    }
}

impl Executor for Emulator {
    unsafe fn launch<P: KernelParams>(&self, plan: &LaunchPlan<P>) -> Result<()> {
        Err(Error::Emulator(format!(
            "{}: the emulator runtime is not wired up yet",
            plan.kernel
        )))
    }
}
