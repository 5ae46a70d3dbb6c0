//! What a GPU offers the schedule policies: SM count, shared memory per
//! block and per SM, threads, registers and blocks per SM, compute
//! capability. A [`Gpu`](crate::Gpu) reads it from the driver; the emulator
//! reports a chosen [`Target`] (default [`Target::H200`]); the policies
//! take it as a plain argument, so they are unit-tested for every
//! architecture without a GPU.
//!
//! Only the *schedule* (walk or split, how many partitions) depends on the
//! target. The *tiling* (chunk, value tile, shared memory per block) never
//! does: every plan fits [`SHARED_BUDGET_BYTES`](crate::ops::tuning::forward::SHARED_BUDGET_BYTES),
//! the smallest per-block opt-in of the supported architectures
//! ([`MIN_SHARED_PER_BLOCK_OPTIN`]), so the emulator runs exactly the
//! blocks every GPU runs.

use crate::{Error, Result};

/// The oldest compute capability the kernels support (tensor-core `mma`
/// on bf16, `cp.async`, 163+ KiB opt-in shared memory): sm_80.
pub const MIN_COMPUTE_CAPABILITY: (u32, u32) = (8, 0);

/// The smallest per-block opt-in shared memory among the architectures the
/// build targets by default (sm_80/86/89/90): sm_86 and sm_89 grant 99 KiB.
/// Every plan must fit it; the emulator enforces it on every launch.
pub const MIN_SHARED_PER_BLOCK_OPTIN: u32 = 99 * 1024;

/// The granularity in which an SM hands out shared memory (sm_80+).
const SHARED_ALLOC_UNIT: u32 = 128;
/// Registers are allocated per warp in units of 256 (8 per thread).
const REG_ALLOC_UNIT_PER_WARP: u32 = 256;

/// The properties of one GPU (or the GPU the emulator stands in for) that
/// the schedule policies use. All sizes in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target {
    /// Compute capability (major, minor).
    pub compute_capability: (u32, u32),
    /// Streaming multiprocessors.
    pub sms: u32,
    /// Largest dynamic + static shared memory one block may opt in to
    /// (`CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`).
    pub shared_per_block_optin: u32,
    /// Shared memory of one SM (`..._MAX_SHARED_MEMORY_PER_MULTIPROCESSOR`).
    pub shared_per_sm: u32,
    /// Shared memory the driver reserves per resident block
    /// (`..._RESERVED_SHARED_MEMORY_PER_BLOCK`, 1 KiB on sm_80+).
    pub reserved_shared_per_block: u32,
    /// Resident threads per SM (2048 on sm_80/90, 1536 on sm_86/89).
    pub max_threads_per_sm: u32,
    /// 32-bit registers per SM (65,536).
    pub regs_per_sm: u32,
    /// Resident blocks per SM (32 on sm_80/90, 16 on sm_86, 24 on sm_89).
    pub max_blocks_per_sm: u32,
}

/// What one kernel launch asks of an SM, for [`Target::blocks_per_sm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelFootprint {
    /// Threads per block.
    pub threads: u32,
    /// Dynamic + static shared memory per block in bytes.
    pub shared_bytes: u32,
    /// Registers per thread (at most; ptxas may use fewer).
    pub regs_per_thread: u32,
}

impl KernelFootprint {
    /// A kernel compiled with `__launch_bounds__(max_threads, min_blocks)`:
    /// ptxas caps its registers at `65536 / (max_threads * min_blocks)`
    /// (rounded down to the allocation unit of 8, at most 255), launched
    /// with `threads` threads and `shared_bytes` of shared memory. The
    /// walk kernels use every register the bound allows (ptxas reports
    /// 122-128 of 128), so the cap is what they hold.
    pub const fn with_launch_bounds(
        max_threads: u32,
        min_blocks: u32,
        threads: u32,
        shared_bytes: u32,
    ) -> Self {
        let cap = match 65_536u32.checked_div(max_threads * min_blocks) {
            Some(c) => c,
            None => 255,
        };
        let cap = if cap > 255 { 255 } else { cap };
        KernelFootprint {
            threads,
            shared_bytes,
            regs_per_thread: cap / 8 * 8,
        }
    }
}

impl Target {
    /// An sm_80 GPU (A100: 164 KiB per SM, 163 KiB per block) with `sms` SMs.
    pub const fn sm80(sms: u32) -> Self {
        Target {
            compute_capability: (8, 0),
            sms,
            shared_per_block_optin: 163 * 1024,
            shared_per_sm: 164 * 1024,
            reserved_shared_per_block: 1024,
            max_threads_per_sm: 2048,
            regs_per_sm: 65_536,
            max_blocks_per_sm: 32,
        }
    }

    /// An sm_86 GPU (A40, RTX 30xx: 100 KiB per SM, 99 KiB per block).
    pub const fn sm86(sms: u32) -> Self {
        Target {
            compute_capability: (8, 6),
            sms,
            shared_per_block_optin: 99 * 1024,
            shared_per_sm: 100 * 1024,
            reserved_shared_per_block: 1024,
            max_threads_per_sm: 1536,
            regs_per_sm: 65_536,
            max_blocks_per_sm: 16,
        }
    }

    /// An sm_89 GPU (L40S, RTX 40xx: 100 KiB per SM, 99 KiB per block).
    pub const fn sm89(sms: u32) -> Self {
        Target {
            compute_capability: (8, 9),
            max_blocks_per_sm: 24,
            ..Target::sm86(sms)
        }
    }

    /// An sm_90 GPU (H100/H200: 228 KiB per SM, 227 KiB per block).
    pub const fn sm90(sms: u32) -> Self {
        Target {
            compute_capability: (9, 0),
            sms,
            shared_per_block_optin: 227 * 1024,
            shared_per_sm: 228 * 1024,
            reserved_shared_per_block: 1024,
            max_threads_per_sm: 2048,
            regs_per_sm: 65_536,
            max_blocks_per_sm: 32,
        }
    }

    /// H200 (sm_90, 132 SMs): the emulator's default target.
    pub const H200: Target = Target::sm90(132);
    /// H100 SXM (sm_90, 132 SMs).
    pub const H100_SXM: Target = Target::sm90(132);
    /// H100 PCIe (sm_90, 114 SMs).
    pub const H100_PCIE: Target = Target::sm90(114);
    /// A100 (sm_80, 108 SMs).
    pub const A100: Target = Target::sm80(108);
    /// A40 (sm_86, 84 SMs).
    pub const A40: Target = Target::sm86(84);
    /// L40S (sm_89, 142 SMs).
    pub const L40S: Target = Target::sm89(142);

    /// One representative of each architecture the build targets by
    /// default (`LINATTN_CUDA_ARCHS` = 80;86;89;90).
    pub const SUPPORTED: [Target; 4] = [Target::A100, Target::A40, Target::L40S, Target::H200];

    /// `sm_XY`, for messages and tables.
    pub fn arch(&self) -> String {
        format!(
            "sm_{}{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }

    /// How many blocks of `k` one SM holds at once: the minimum over shared
    /// memory (each block takes its bytes plus the driver's reserved 1 KiB,
    /// in 128-byte units), registers (allocated per warp, 256 at a time),
    /// threads and the per-SM block limit. 0 when a block cannot run at
    /// all (more shared memory than the per-block opt-in, more threads or
    /// registers than an SM has).
    pub fn blocks_per_sm(&self, k: &KernelFootprint) -> u32 {
        if k.threads == 0 || k.shared_bytes > self.shared_per_block_optin {
            return 0;
        }
        let per_block =
            (k.shared_bytes + self.reserved_shared_per_block).next_multiple_of(SHARED_ALLOC_UNIT);
        let by_shared = self.shared_per_sm / per_block;
        let warps = k.threads.div_ceil(32);
        let by_threads = self.max_threads_per_sm / (warps * 32);
        let regs_per_warp = (k.regs_per_thread * 32).next_multiple_of(REG_ALLOC_UNIT_PER_WARP);
        let by_regs = self
            .regs_per_sm
            .checked_div(regs_per_warp)
            .map_or(u32::MAX, |w| w / warps);
        by_shared
            .min(by_threads)
            .min(by_regs)
            .min(self.max_blocks_per_sm)
    }

    /// Blocks of `k` the whole GPU holds at once (`sms * blocks_per_sm`):
    /// one "wave". The schedule policies compare grids against it.
    pub fn resident_blocks(&self, k: &KernelFootprint) -> usize {
        self.sms as usize * self.blocks_per_sm(k) as usize
    }
}

/// Whether a GPU of compute capability `cc` can run these kernels; the error
/// names the device (`ordinal`, `name`), its capability and the minimum.
pub fn check_compute_capability(ordinal: usize, name: &str, cc: (i32, i32)) -> Result<()> {
    let (min_major, min_minor) = MIN_COMPUTE_CAPABILITY;
    let ok = cc.0 > min_major as i32 || (cc.0 == min_major as i32 && cc.1 >= min_minor as i32);
    if ok {
        return Ok(());
    }
    Err(Error::UnsupportedDevice {
        ordinal,
        name: name.to_string(),
        compute_capability: cc,
        minimum: (min_major as i32, min_minor as i32),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walk kernels' footprint at bf16 D = M = 128 (98,176 B, as the
    /// forward plan sizes it) fits twice per SM only on sm_90.
    #[test]
    fn blocks_per_sm_by_architecture() {
        let walk = KernelFootprint::with_launch_bounds(256, 2, 256, 98_176);
        assert_eq!(walk.regs_per_thread, 128);
        assert_eq!(Target::H200.blocks_per_sm(&walk), 2);
        assert_eq!(Target::A100.blocks_per_sm(&walk), 1);
        assert_eq!(Target::A40.blocks_per_sm(&walk), 1);
        assert_eq!(Target::L40S.blocks_per_sm(&walk), 1);
        assert_eq!(Target::H200.resident_blocks(&walk), 264);
        assert_eq!(Target::A100.resident_blocks(&walk), 108);
        // Shared memory decides: 2 * (b + 1024) <= 167,936 on sm_80 holds
        // up to b = 82,944; one byte more (rounded up to 128) leaves one.
        let at = |b| KernelFootprint::with_launch_bounds(256, 2, 256, b);
        assert_eq!(Target::A100.blocks_per_sm(&at(82_944)), 2);
        assert_eq!(Target::A100.blocks_per_sm(&at(82_945)), 1);
        // Registers decide for small blocks: 128 per thread, 256 threads.
        assert_eq!(Target::H200.blocks_per_sm(&at(0)), 2);
        // Threads decide for register-light kernels: 1536 / 256 on sm_86.
        let light = KernelFootprint {
            threads: 256,
            shared_bytes: 0,
            regs_per_thread: 32,
        };
        assert_eq!(Target::A40.blocks_per_sm(&light), 6);
        assert_eq!(Target::H200.blocks_per_sm(&light), 8);
        // The whole-head backward walks, __launch_bounds__(512, 1): one.
        let whole = KernelFootprint::with_launch_bounds(512, 1, 512, 60_000);
        for t in Target::SUPPORTED {
            assert_eq!(t.blocks_per_sm(&whole), 1, "{}", t.arch());
        }
        // Past the per-block opt-in, nothing runs.
        assert_eq!(Target::A40.blocks_per_sm(&at(99 * 1024 + 1)), 0);
        assert_eq!(Target::H200.blocks_per_sm(&at(99 * 1024 + 1)), 2);
    }

    #[test]
    fn the_smallest_opt_in_is_99_kib() {
        let min = Target::SUPPORTED
            .iter()
            .map(|t| t.shared_per_block_optin)
            .min();
        assert_eq!(min, Some(MIN_SHARED_PER_BLOCK_OPTIN));
        assert_eq!(
            MIN_SHARED_PER_BLOCK_OPTIN as usize,
            crate::ops::tuning::forward::SHARED_BUDGET_BYTES
        );
    }

    #[test]
    fn compute_capability_below_8_0_is_refused() {
        for ok in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)] {
            assert!(check_compute_capability(0, "x", ok).is_ok(), "{ok:?}");
        }
        for bad in [(7, 5), (7, 0), (6, 1), (3, 5)] {
            match check_compute_capability(1, "Tesla T4", bad) {
                Err(e @ Error::UnsupportedDevice { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains("Tesla T4"), "{msg}");
                    assert!(msg.contains(&format!("{}.{}", bad.0, bad.1)), "{msg}");
                    assert!(msg.contains("8.0"), "{msg}");
                }
                other => panic!("{bad:?}: expected UnsupportedDevice, got {other:?}"),
            }
        }
    }
}
