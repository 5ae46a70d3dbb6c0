//! Launch plans: the plain-Rust description of one kernel launch (which
//! kernel, grid, block, dynamic shared memory, and its params struct from
//! `params.h`). Plans are built and unit-tested without a GPU; an executor
//! (the CUDA stream or the CPU emulator) runs them.

use crate::params::KernelParams;

/// One kernel launch, ready for an executor.
#[derive(Debug, Clone, Copy)]
pub struct LaunchPlan<P: KernelParams> {
    /// The `.cu` module (file stem) holding the kernel.
    pub module: &'static str,
    /// The kernel's `extern "C"` symbol.
    pub kernel: &'static str,
    /// Grid size in blocks (x, y, z).
    pub grid: [u32; 3],
    /// Block size in threads (x, y, z).
    pub block: [u32; 3],
    /// Dynamic shared memory per block in bytes.
    pub shared_bytes: u32,
    /// The kernel's single argument.
    pub params: P,
}

impl<P: KernelParams> LaunchPlan<P> {
    /// Threads per block.
    pub fn threads_per_block(&self) -> u64 {
        self.block.iter().map(|&b| b as u64).product()
    }

    /// Total blocks in the grid.
    pub fn blocks(&self) -> u64 {
        self.grid.iter().map(|&g| g as u64).product()
    }
}

/// Runs launch plans. Implemented by [`crate::Gpu`] (a CUDA stream) and, with
/// the `emulator` feature, by `Emulator` (the CPU).
pub trait Executor {
    /// The GPU the schedule policies plan for: the device's own properties
    /// on a [`crate::Gpu`], the chosen stand-in on the emulator.
    fn target(&self) -> crate::Target;

    /// Enqueue (GPU) or run to completion (emulator) one launch.
    ///
    /// # Safety
    /// The device addresses inside `plan.params` must be valid for this
    /// executor (device memory of its context, or host memory for the
    /// emulator) and cover every element the kernel touches, as the op's
    /// validation guarantees for the safe entry points.
    unsafe fn launch<P: KernelParams>(&self, plan: &LaunchPlan<P>) -> crate::Result<()>;

    /// [`Executor::launch`], also naming the memory the kernel writes as
    /// `(address, bytes)` regions. The emulator's schedule check uses them to
    /// run the launch under two thread orders and compare the results (a
    /// missing barrier shows up as a difference); the GPU ignores them.
    ///
    /// # Safety
    /// As for [`Executor::launch`]; the regions must be valid for reads and
    /// writes and cover everything the kernel writes.
    unsafe fn launch_writing<P: KernelParams>(
        &self,
        plan: &LaunchPlan<P>,
        writes: &[(u64, usize)],
    ) -> crate::Result<()> {
        let _ = writes;
        // SAFETY: forwarded contract.
        unsafe { self.launch(plan) }
    }
}

/// Ceil-division for grid sizes.
pub(crate) fn div_ceil_u64(a: u64, b: u64) -> u64 {
    a.div_ceil(b)
}
