//! The C ABI shared with `include/linattn_emu.h`. Keep the two in sync.

use std::ffi::{c_char, c_void};

/// `LINATTN_EMU_MAGIC` ("LEMU").
pub const MAGIC: u32 = 0x4C45_4D55;
/// `LINATTN_EMU_ABI_VERSION`.
pub const ABI_VERSION: u32 = 3;

/// Barrier kinds passed to `syncthreads`.
pub const BAR_PLAIN: u32 = 0;
pub const BAR_COUNT: u32 = 1;
pub const BAR_AND: u32 = 2;
pub const BAR_OR: u32 = 3;

/// Warp collective op codes (`LinattnEmuWarpOp`).
pub mod op {
    pub const SYNC: u32 = 0;
    pub const SHFL_IDX: u32 = 1;
    pub const SHFL_UP: u32 = 2;
    pub const SHFL_DOWN: u32 = 3;
    pub const SHFL_XOR: u32 = 4;
    pub const BALLOT: u32 = 5;
    pub const ANY: u32 = 6;
    pub const ALL: u32 = 7;
    pub const REDUCE_ADD: u32 = 8;
    pub const REDUCE_MIN_U: u32 = 9;
    pub const REDUCE_MAX_U: u32 = 10;
    pub const REDUCE_MIN_I: u32 = 11;
    pub const REDUCE_MAX_I: u32 = 12;
    pub const REDUCE_AND: u32 = 13;
    pub const REDUCE_OR: u32 = 14;
    pub const REDUCE_XOR: u32 = 15;
    pub const MATCH_ANY: u32 = 16;
    pub const MATCH_ALL: u32 = 17;

    pub fn name(op: u32) -> &'static str {
        match op {
            SYNC => "__syncwarp/wmma",
            SHFL_IDX => "__shfl_sync",
            SHFL_UP => "__shfl_up_sync",
            SHFL_DOWN => "__shfl_down_sync",
            SHFL_XOR => "__shfl_xor_sync",
            BALLOT => "__ballot_sync",
            ANY => "__any_sync",
            ALL => "__all_sync",
            REDUCE_ADD..=REDUCE_XOR => "__reduce_*_sync",
            MATCH_ANY => "__match_any_sync",
            MATCH_ALL => "__match_all_sync",
            _ => "unknown warp collective",
        }
    }
}

/// Floats of wmma scratch per warp (A, B and C tiles of 16x16).
pub const WARP_SCRATCH_FLOATS: usize = 3 * 256;

#[repr(C)]
pub struct Callbacks {
    pub syncthreads: unsafe extern "C" fn(*mut ThreadCtx, u32, u32) -> u32,
    pub warp_op: unsafe extern "C" fn(*mut ThreadCtx, u32, u32, u64, i32, i32) -> u64,
    pub static_shared: unsafe extern "C" fn(*mut ThreadCtx, *const c_void, u64, u64) -> *mut c_void,
    pub fail: unsafe extern "C" fn(*mut ThreadCtx, *const c_char),
    pub active_mask: unsafe extern "C" fn(*mut ThreadCtx) -> u32,
}

#[repr(C)]
pub struct ThreadCtx {
    pub thread_idx: [u32; 3],
    pub block_idx: [u32; 3],
    pub block_dim: [u32; 3],
    pub grid_dim: [u32; 3],
    pub linear_tid: u32,
    pub lane: u32,
    pub warp: u32,
    /// The launch's dynamic shared memory bytes (`<<<.., .., shared>>>`).
    pub dyn_shared_bytes: u32,
    pub dyn_shared: *mut u8,
    pub warp_scratch: *mut f32,
    pub cb: *const Callbacks,
    pub rt: *mut c_void,
}

#[repr(C)]
pub struct RawKernel {
    pub name: *const c_char,
    pub entry: Option<unsafe extern "C" fn(*const c_void)>,
    pub params_size: u64,
    pub params_align: u64,
    /// First argument of the kernel's `__launch_bounds__`, or 1024 without one.
    pub max_threads: u64,
    /// Largest `__align__` on the `extern __shared__` declarations in the
    /// kernel's body (0 without one).
    pub dyn_align: u64,
}

#[repr(C)]
pub struct RawModule {
    pub magic: u32,
    pub abi_version: u32,
    pub thread_ctx_size: u32,
    pub num_kernels: u32,
    pub kernels: *const RawKernel,
    pub set_ctx: Option<unsafe extern "C" fn(*mut ThreadCtx)>,
    pub lib_name: *const c_char,
    pub unpoison: Option<unsafe extern "C" fn(*mut c_void, u64)>,
}
