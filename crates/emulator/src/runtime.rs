//! The scheduler: one OS thread runs a block's CUDA threads as fibers; blocks are
//! spread over worker threads.

use std::alloc::{alloc, dealloc, Layout};
use std::ffi::{c_char, c_void, CStr};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use corosensei::stack::{DefaultStack, Stack};
use corosensei::{Coroutine, CoroutineResult, Yielder};

use crate::ffi::{self, op, Callbacks, ThreadCtx};
use crate::EmuError;

type Co = Coroutine<(), (), (), DefaultStack>;
type KernelEntry = unsafe extern "C" fn(*const c_void);
type SetCtx = unsafe extern "C" fn(*mut ThreadCtx);

/// Stacks are expensive to map and fault in; keep them across launches.
static STACK_POOL: Mutex<Vec<DefaultStack>> = Mutex::new(Vec::new());

fn stack_size() -> usize {
    std::env::var("LINATTN_EMU_STACK_KB")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&kb| kb >= 16)
        .map_or(256 * 1024, |kb| kb * 1024)
}

/// Number of worker threads: `LINATTN_EMU_THREADS` or the available parallelism.
pub(crate) fn worker_count() -> usize {
    std::env::var("LINATTN_EMU_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum St {
    Runnable,
    Barrier,
    Warp,
    Exited,
    Failed,
}

/// Per CUDA thread. `ctx` must stay the first field: the callbacks cast the
/// `ThreadCtx*` they receive back to the `Fiber`.
#[repr(C)]
struct Fiber {
    ctx: ThreadCtx,
    yielder: *const Yielder<(), ()>,
    block: *mut BlockRt,
    state: St,
    bar_kind: u32,
    pred: u32,
    w_op: u32,
    w_mask: u32,
    w_val: u64,
    w_arg: i32,
    w_width: i32,
    result: u64,
}

enum Fault {
    Message(String),
    SharedLimit { static_bytes: usize },
}

/// State shared by the fibers of the block being run.
struct BlockRt {
    arena: *mut u8,
    limit: usize,
    dyn_bytes: usize,
    /// Where the dynamic region starts in the arena (its alignment: see `Launch`).
    dyn_offset: usize,
    static_top: usize,
    statics: Vec<(usize, usize)>,
    /// Lanes of each warp that exist and have not exited.
    alive: Vec<u32>,
    fault: Option<(u32, Fault)>,
}

static CALLBACKS: Callbacks = Callbacks {
    syncthreads: cb_syncthreads,
    warp_op: cb_warp_op,
    static_shared: cb_static_shared,
    fail: cb_fail,
    active_mask: cb_active_mask,
};

#[inline]
unsafe fn suspend(f: *mut Fiber) {
    // SAFETY: the yielder belongs to the coroutine running this fiber, which is the
    // one executing right now.
    unsafe { (*(*f).yielder).suspend(()) }
}

unsafe fn fail_fiber(f: *mut Fiber, fault: Fault) -> ! {
    unsafe {
        let block = (*f).block;
        if (*block).fault.is_none() {
            (*block).fault = Some(((*f).ctx.linear_tid, fault));
        }
        (*f).state = St::Failed;
        loop {
            // The scheduler never resumes a failed fiber; it resets it.
            suspend(f);
        }
    }
}

unsafe extern "C" fn cb_syncthreads(ctx: *mut ThreadCtx, kind: u32, pred: u32) -> u32 {
    let f = ctx as *mut Fiber;
    unsafe {
        (*f).bar_kind = kind;
        (*f).pred = pred;
        (*f).state = St::Barrier;
        suspend(f);
        (*f).result as u32
    }
}

unsafe extern "C" fn cb_warp_op(
    ctx: *mut ThreadCtx,
    opc: u32,
    mask: u32,
    val: u64,
    arg: i32,
    width: i32,
) -> u64 {
    let f = ctx as *mut Fiber;
    unsafe {
        (*f).w_op = opc;
        (*f).w_mask = mask;
        (*f).w_val = val;
        (*f).w_arg = arg;
        (*f).w_width = width;
        (*f).state = St::Warp;
        suspend(f);
        (*f).result
    }
}

unsafe extern "C" fn cb_static_shared(
    ctx: *mut ThreadCtx,
    key: *const c_void,
    size: u64,
    align: u64,
) -> *mut c_void {
    let f = ctx as *mut Fiber;
    unsafe {
        let b = &mut *(*f).block;
        let key = key as usize;
        if let Some(&(_, off)) = b.statics.iter().find(|(k, _)| *k == key) {
            return b.arena.add(off).cast();
        }
        let align = (align.max(16) as usize).next_power_of_two();
        let size = size as usize;
        let off = b.static_top.div_ceil(align) * align;
        let end = off.saturating_add(size);
        // Bytes in use count from the dynamic base (the offset before it is padding).
        if end - b.dyn_offset > b.limit {
            let static_bytes = end - b.dyn_offset - b.dyn_bytes;
            fail_fiber(f, Fault::SharedLimit { static_bytes });
        }
        // Poison: unwritten shared memory reads as NaN (all-ones bytes).
        ptr::write_bytes(b.arena.add(off), 0xFF, size);
        b.statics.push((key, off));
        b.static_top = end;
        b.arena.add(off).cast()
    }
}

unsafe extern "C" fn cb_fail(ctx: *mut ThreadCtx, msg: *const c_char) {
    let f = ctx as *mut Fiber;
    unsafe {
        let text = if msg.is_null() {
            "device code reported a fault".to_string()
        } else {
            CStr::from_ptr(msg).to_string_lossy().into_owned()
        };
        fail_fiber(f, Fault::Message(text));
    }
}

unsafe extern "C" fn cb_active_mask(ctx: *mut ThreadCtx) -> u32 {
    let f = ctx as *mut Fiber;
    unsafe {
        let b = &*(*f).block;
        b.alive.get((*f).ctx.warp as usize).copied().unwrap_or(0)
    }
}

/// Everything about one launch that the workers need. Raw pointers are only read.
pub(crate) struct Launch<'a> {
    pub kernel: &'a str,
    pub entry: KernelEntry,
    pub set_ctx: SetCtx,
    pub unpoison: Option<unsafe extern "C" fn(*mut c_void, u64)>,
    pub params: *const c_void,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dyn_bytes: usize,
    /// Offset of the dynamic shared memory base in the (page-aligned) arena: the
    /// kernel's `extern __shared__` alignment N (at least 16), so the base is
    /// N-aligned and not 2N-aligned, the least a GPU guarantees.
    pub dyn_offset: usize,
    pub limit: usize,
}

// SAFETY: the params buffer is read-only during the launch and outlives it; the
// function pointers are plain C functions.
unsafe impl Send for Launch<'_> {}
unsafe impl Sync for Launch<'_> {}

impl Launch<'_> {
    pub fn threads(&self) -> usize {
        self.block.iter().map(|&d| d as usize).product()
    }
    pub fn blocks(&self) -> usize {
        self.grid.iter().map(|&d| d as usize).product()
    }
    pub fn block_index(&self, linear: usize) -> [u32; 3] {
        let gx = self.grid[0] as usize;
        let gy = self.grid[1] as usize;
        [
            (linear % gx) as u32,
            ((linear / gx) % gy) as u32,
            (linear / (gx * gy)) as u32,
        ]
    }
}

struct Arena {
    ptr: *mut u8,
    layout: Layout,
}

impl Drop for Arena {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: allocated in Worker::new with this layout.
            unsafe { dealloc(self.ptr, self.layout) }
        }
    }
}

/// Runs blocks on the current OS thread.
pub(crate) struct Worker {
    fibers: Vec<Fiber>,
    cos: Vec<Option<Co>>,
    stacks: Vec<DefaultStack>,
    _arena: Arena,
    scratch: Vec<f32>,
    block: Box<BlockRt>,
    exist: Vec<u32>,
    waiting: Vec<u32>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let stacks = std::mem::take(&mut self.stacks);
        if let Ok(mut pool) = STACK_POOL.lock() {
            pool.extend(stacks);
        }
    }
}

impl Worker {
    pub fn new(launch: &Launch<'_>) -> Result<Worker, EmuError> {
        let n = launch.threads();
        let warps = n.div_ceil(32);
        let size = stack_size();
        let mut stacks: Vec<DefaultStack> = {
            let mut pool = STACK_POOL.lock().unwrap_or_else(|e| e.into_inner());
            let keep = pool.len().saturating_sub(n);
            pool.split_off(keep)
        };
        while stacks.len() < n {
            let s = DefaultStack::new(size).map_err(|e| {
                EmuError::Resource(format!("cannot map a {size}-byte fiber stack: {e}"))
            })?;
            stacks.push(s);
        }
        let arena_align = (2 * launch.dyn_offset).max(4096);
        let arena_size = launch
            .limit
            .checked_add(launch.dyn_offset)
            .ok_or_else(|| EmuError::Resource("shared memory arena size overflows".into()))?;
        let layout = Layout::from_size_align(arena_size.max(16), arena_align)
            .map_err(|e| EmuError::Resource(format!("shared memory arena: {e}")))?;
        // SAFETY: layout has non-zero size.
        let arena_ptr = unsafe { alloc(layout) };
        if arena_ptr.is_null() {
            return Err(EmuError::Resource(
                "cannot allocate the shared memory arena".into(),
            ));
        }
        let arena = Arena {
            ptr: arena_ptr,
            layout,
        };
        let mut block = Box::new(BlockRt {
            arena: arena_ptr,
            limit: launch.limit,
            dyn_bytes: launch.dyn_bytes,
            dyn_offset: launch.dyn_offset,
            static_top: 0,
            statics: Vec::new(),
            alive: vec![0; warps],
            fault: None,
        });
        let block_ptr: *mut BlockRt = &mut *block;
        let mut scratch = vec![0f32; warps * ffi::WARP_SCRATCH_FLOATS];
        let scratch_ptr = scratch.as_mut_ptr();
        // SAFETY: dyn_offset < arena_size.
        let dyn_base = unsafe { arena_ptr.add(launch.dyn_offset) };
        // Validated against the shared limit (227 KiB at most by default).
        let dyn_shared_bytes = u32::try_from(launch.dyn_bytes).unwrap_or(u32::MAX);
        let [bx, by, bz] = launch.block;
        let mut fibers = Vec::with_capacity(n);
        for t in 0..n {
            let x = t % bx as usize;
            let y = (t / bx as usize) % by as usize;
            let z = t / (bx as usize * by as usize);
            let warp = t / 32;
            fibers.push(Fiber {
                ctx: ThreadCtx {
                    thread_idx: [x as u32, y as u32, z as u32],
                    block_idx: [0; 3],
                    block_dim: [bx, by, bz],
                    grid_dim: launch.grid,
                    linear_tid: t as u32,
                    lane: (t % 32) as u32,
                    warp: warp as u32,
                    dyn_shared_bytes,
                    dyn_shared: dyn_base,
                    // SAFETY: in bounds of `scratch`.
                    warp_scratch: unsafe { scratch_ptr.add(warp * ffi::WARP_SCRATCH_FLOATS) },
                    cb: &CALLBACKS,
                    rt: ptr::null_mut(),
                },
                yielder: ptr::null(),
                block: block_ptr,
                state: St::Exited,
                bar_kind: 0,
                pred: 0,
                w_op: 0,
                w_mask: 0,
                w_val: 0,
                w_arg: 0,
                w_width: 32,
                result: 0,
            });
        }
        let mut exist = vec![0u32; warps];
        for (w, e) in exist.iter_mut().enumerate() {
            let lanes = (n - w * 32).min(32);
            *e = if lanes == 32 {
                u32::MAX
            } else {
                (1u32 << lanes) - 1
            };
        }
        let mut cos = Vec::with_capacity(n);
        cos.resize_with(n, || None);
        Ok(Worker {
            fibers,
            cos,
            stacks,
            _arena: arena,
            scratch,
            block,
            exist,
            waiting: vec![0; warps],
        })
    }

    /// Runs one block to completion. `reverse` resumes runnable fibers in reverse
    /// thread order within every phase.
    pub fn run_block(
        &mut self,
        launch: &Launch<'_>,
        linear: usize,
        reverse: bool,
    ) -> Result<(), EmuError> {
        let n = self.fibers.len();
        let bidx = launch.block_index(linear);
        // Reset block state.
        {
            let b = &mut *self.block;
            b.statics.clear();
            b.static_top = launch.dyn_offset + launch.dyn_bytes;
            b.fault = None;
            b.alive.copy_from_slice(&self.exist);
            // SAFETY: dyn_offset + dyn_bytes <= dyn_offset + limit = arena size
            // (dyn_bytes <= limit is validated by the launch).
            unsafe { ptr::write_bytes(b.arena.add(launch.dyn_offset), 0xFF, launch.dyn_bytes) };
        }
        self.waiting.iter_mut().for_each(|w| *w = 0);
        self.scratch.iter_mut().for_each(|v| *v = f32::NAN);
        let fibers = self.fibers.as_mut_ptr();
        for t in 0..n {
            // SAFETY: t < n; the fiber vector is never resized while fibers run.
            let f = unsafe { fibers.add(t) };
            unsafe {
                (*f).ctx.block_idx = bidx;
                (*f).state = St::Runnable;
                (*f).yielder = ptr::null();
            }
            let stack = match self.stacks.pop() {
                Some(s) => s,
                None => DefaultStack::new(stack_size())
                    .map_err(|e| EmuError::Resource(format!("cannot map a fiber stack: {e}")))?,
            };
            let entry = launch.entry;
            let params = launch.params;
            let fp = f as usize;
            // SAFETY: the closure only captures plain values; the fiber and params
            // outlive the coroutine, which is finished or reset before this returns.
            let co = unsafe {
                Co::with_stack_unchecked(stack, move |y: &Yielder<(), ()>, ()| {
                    let f = fp as *mut Fiber;
                    (*f).yielder = y as *const _;
                    entry(params);
                })
            };
            self.cos[t] = Some(co);
        }
        let result = self.schedule(launch, bidx, reverse);
        // Release coroutines; abandoned ones are reset without unwinding (C++ frames
        // must never be unwound by Rust).
        for slot in self.cos.iter_mut() {
            if let Some(mut co) = slot.take() {
                if !co.done() {
                    // SAFETY: the suspended frames are C++ kernel code and our
                    // callbacks, which hold no values that need dropping.
                    unsafe { co.force_reset() };
                    let stack = co.into_stack();
                    if let Some(unpoison) = launch.unpoison {
                        let lo = stack.limit().get();
                        let hi = stack.base().get();
                        // SAFETY: the stack's own mapping; nothing runs on it now.
                        unsafe { unpoison(lo as *mut c_void, (hi - lo) as u64) };
                    }
                    self.stacks.push(stack);
                    continue;
                }
                self.stacks.push(co.into_stack());
            }
        }
        // SAFETY: plain C function.
        unsafe { (launch.set_ctx)(ptr::null_mut()) };
        result
    }

    fn schedule(
        &mut self,
        launch: &Launch<'_>,
        bidx: [u32; 3],
        reverse: bool,
    ) -> Result<(), EmuError> {
        let n = self.fibers.len();
        let fibers = self.fibers.as_mut_ptr();
        let mut n_bar = 0usize;
        let mut n_warp = 0usize;
        let mut n_exit = 0usize;
        loop {
            for k in 0..n {
                let t = if reverse { n - 1 - k } else { k };
                // SAFETY: t < n.
                let f = unsafe { fibers.add(t) };
                if unsafe { (*f).state } != St::Runnable {
                    continue;
                }
                let Some(co) = self.cos[t].as_mut() else {
                    continue;
                };
                // SAFETY: set_ctx is a plain C function; ctx lives as long as the fiber.
                unsafe { (launch.set_ctx)(&mut (*f).ctx) };
                match co.resume(()) {
                    CoroutineResult::Return(()) => {
                        unsafe { (*f).state = St::Exited };
                        n_exit += 1;
                        self.block.alive[t / 32] &= !(1u32 << (t % 32));
                    }
                    CoroutineResult::Yield(()) => match unsafe { (*f).state } {
                        St::Barrier => n_bar += 1,
                        St::Warp => {
                            n_warp += 1;
                            self.waiting[t / 32] |= 1u32 << (t % 32);
                        }
                        St::Failed => return Err(self.fault_error(launch, bidx)),
                        St::Runnable | St::Exited => {
                            unsafe { (*f).state = St::Runnable };
                        }
                    },
                }
            }
            if n_warp > 0 {
                let released = self.release_warps(launch, bidx)?;
                if released > 0 {
                    n_warp -= released;
                    continue;
                }
            }
            if n_exit == n {
                return Ok(());
            }
            if n_bar > 0 && n_bar + n_exit == n {
                if n_exit > 0 {
                    return Err(EmuError::DivergentBarrier {
                        kernel: launch.kernel.to_string(),
                        block: bidx,
                        detail: format!(
                            "{n_exit} thread(s) exited (first: {}) while {n_bar} thread(s) wait at __syncthreads(); \
                             every thread of the block must reach each __syncthreads()",
                            self.first_thread(St::Exited)
                        ),
                    });
                }
                let mut count = 0u32;
                let mut all = true;
                let mut any = false;
                for t in 0..n {
                    let p = unsafe { (*fibers.add(t)).pred };
                    count += p;
                    all &= p != 0;
                    any |= p != 0;
                }
                for t in 0..n {
                    let f = unsafe { fibers.add(t) };
                    unsafe {
                        (*f).result = match (*f).bar_kind {
                            ffi::BAR_COUNT => count as u64,
                            ffi::BAR_AND => all as u64,
                            ffi::BAR_OR => any as u64,
                            _ => 0,
                        };
                        (*f).state = St::Runnable;
                    }
                }
                n_bar = 0;
                continue;
            }
            return Err(self.stuck_error(launch, bidx, n_bar, n_exit));
        }
    }

    fn first_thread(&self, st: St) -> String {
        self.fibers
            .iter()
            .find(|f| f.state == st)
            .map(|f| {
                format!(
                    "thread ({}, {}, {})",
                    f.ctx.thread_idx[0], f.ctx.thread_idx[1], f.ctx.thread_idx[2]
                )
            })
            .unwrap_or_else(|| "none".into())
    }

    fn fault_error(&mut self, launch: &Launch<'_>, bidx: [u32; 3]) -> EmuError {
        let (tid, fault) = self
            .block
            .fault
            .take()
            .unwrap_or((0, Fault::Message("unknown fault".into())));
        match fault {
            Fault::SharedLimit { static_bytes } => EmuError::SharedMemoryLimit {
                kernel: launch.kernel.to_string(),
                block: bidx,
                static_bytes,
                dynamic_bytes: launch.dyn_bytes,
                limit: launch.limit,
            },
            Fault::Message(message) => {
                let f = &self.fibers[tid as usize % self.fibers.len().max(1)];
                EmuError::DeviceFault {
                    kernel: launch.kernel.to_string(),
                    block: bidx,
                    thread: f.ctx.thread_idx,
                    message,
                }
            }
        }
    }

    fn stuck_error(
        &self,
        launch: &Launch<'_>,
        bidx: [u32; 3],
        n_bar: usize,
        n_exit: usize,
    ) -> EmuError {
        let mut parts = Vec::new();
        if n_bar > 0 {
            parts.push(format!(
                "{n_bar} thread(s) wait at __syncthreads() (first: {})",
                self.first_thread(St::Barrier)
            ));
        }
        if n_exit > 0 {
            parts.push(format!("{n_exit} thread(s) exited"));
        }
        for (w, &waiting) in self.waiting.iter().enumerate() {
            if waiting == 0 {
                continue;
            }
            let l = waiting.trailing_zeros() as usize;
            let f = &self.fibers[w * 32 + l];
            let mask = f.w_mask & self.exist[w];
            let missing = mask & !waiting;
            parts.push(format!(
                "warp {w}: lanes {waiting:#010x} wait at {} (mask {:#010x}) for lanes {missing:#010x}",
                op::name(f.w_op),
                f.w_mask
            ));
        }
        let detail = parts.join("; ");
        if n_bar > 0 {
            EmuError::DivergentBarrier {
                kernel: launch.kernel.to_string(),
                block: bidx,
                detail,
            }
        } else {
            EmuError::Deadlock {
                kernel: launch.kernel.to_string(),
                block: bidx,
                detail,
            }
        }
    }

    /// Releases every warp group whose named lanes have all arrived. Returns how many
    /// fibers became runnable.
    fn release_warps(&mut self, launch: &Launch<'_>, bidx: [u32; 3]) -> Result<usize, EmuError> {
        let fibers = self.fibers.as_mut_ptr();
        let mut released = 0usize;
        for w in 0..self.waiting.len() {
            let mut pending = self.waiting[w];
            let exist = self.exist[w];
            let exited = exist & !self.block.alive[w];
            while pending != 0 {
                let l = pending.trailing_zeros() as usize;
                let f0 = unsafe { &*fibers.add(w * 32 + l) };
                let raw_mask = f0.w_mask;
                let mask = raw_mask & exist;
                let err = |detail: String| EmuError::WarpCollective {
                    kernel: launch.kernel.to_string(),
                    block: bidx,
                    detail,
                };
                if mask & (1u32 << l) == 0 {
                    return Err(err(format!(
                        "lane {l} of warp {w} calls {} with mask {raw_mask:#010x}, which does not include the calling lane",
                        op::name(f0.w_op)
                    )));
                }
                if mask & exited != 0 {
                    return Err(err(format!(
                        "warp {w}: {} with mask {raw_mask:#010x} names lanes {:#010x} that have exited",
                        op::name(f0.w_op),
                        mask & exited
                    )));
                }
                let mut group = 0u32;
                let mut bits = self.waiting[w];
                while bits != 0 {
                    let x = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    if unsafe { (*fibers.add(w * 32 + x)).w_mask } == raw_mask {
                        group |= 1u32 << x;
                    }
                }
                pending &= !group;
                if group != mask {
                    continue;
                }
                let opc = f0.w_op;
                let mut bits = group;
                while bits != 0 {
                    let x = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let fx = unsafe { &*fibers.add(w * 32 + x) };
                    if fx.w_op != opc {
                        return Err(err(format!(
                            "warp {w}: lanes named in mask {raw_mask:#010x} wait at different collectives: lane {l} at {}, lane {x} at {}",
                            op::name(opc),
                            op::name(fx.w_op)
                        )));
                    }
                }
                // SAFETY: the lanes of `group` are distinct fibers of this warp.
                unsafe { compute_warp_op(fibers.add(w * 32), group, opc) }.map_err(err)?;
                self.waiting[w] &= !group;
                released += group.count_ones() as usize;
            }
        }
        Ok(released)
    }
}

/// Computes the results of a released warp collective. `base` is lane 0's fiber.
unsafe fn compute_warp_op(base: *mut Fiber, group: u32, opc: u32) -> Result<(), String> {
    let lane = |x: u32| unsafe { &mut *base.add(x as usize) };
    let lanes = || (0..32u32).filter(move |x| group & (1u32 << x) != 0);
    match opc {
        op::SYNC => {
            for x in lanes() {
                lane(x).result = 0;
            }
        }
        op::SHFL_IDX | op::SHFL_UP | op::SHFL_DOWN | op::SHFL_XOR => {
            let mut src_vals = [0u64; 32];
            for x in lanes() {
                src_vals[x as usize] = lane(x).w_val;
            }
            for x in lanes() {
                let f = lane(x);
                let w = f.w_width;
                if !(1..=32).contains(&w) || (w & (w - 1)) != 0 {
                    return Err(format!(
                        "lane {x}: shuffle width {w} is not a power of two in 1..=32"
                    ));
                }
                let w = w as u32;
                let min_lane = x & !(w - 1);
                let max_lane = min_lane + w - 1;
                let b = f.w_arg as u32;
                let (src, valid) = match opc {
                    op::SHFL_IDX => (min_lane | (b & (w - 1)), true),
                    op::SHFL_UP => {
                        let j = x as i64 - b as i64;
                        (j.max(0) as u32, j >= min_lane as i64)
                    }
                    op::SHFL_DOWN => {
                        let j = x as u64 + b as u64;
                        (j.min(31) as u32, j <= max_lane as u64)
                    }
                    _ => {
                        let j = x ^ (b & 31);
                        (j, j <= max_lane)
                    }
                };
                f.result = if valid && group & (1u32 << src) != 0 {
                    src_vals[src as usize]
                } else {
                    f.w_val
                };
            }
        }
        op::BALLOT | op::ANY | op::ALL => {
            let mut ballot = 0u32;
            for x in lanes() {
                if lane(x).w_val != 0 {
                    ballot |= 1u32 << x;
                }
            }
            let r = match opc {
                op::BALLOT => ballot as u64,
                op::ANY => (ballot != 0) as u64,
                _ => (ballot == group) as u64,
            };
            for x in lanes() {
                lane(x).result = r;
            }
        }
        op::REDUCE_ADD..=op::REDUCE_XOR => {
            let vals: Vec<u32> = lanes().map(|x| lane(x).w_val as u32).collect();
            let r = match opc {
                op::REDUCE_ADD => vals.iter().fold(0u32, |a, &v| a.wrapping_add(v)),
                op::REDUCE_MIN_U => vals.iter().copied().min().unwrap_or(0),
                op::REDUCE_MAX_U => vals.iter().copied().max().unwrap_or(0),
                op::REDUCE_MIN_I => vals.iter().map(|&v| v as i32).min().unwrap_or(0) as u32,
                op::REDUCE_MAX_I => vals.iter().map(|&v| v as i32).max().unwrap_or(0) as u32,
                op::REDUCE_AND => vals.iter().fold(u32::MAX, |a, &v| a & v),
                op::REDUCE_OR => vals.iter().fold(0, |a, &v| a | v),
                _ => vals.iter().fold(0, |a, &v| a ^ v),
            };
            for x in lanes() {
                lane(x).result = r as u64;
            }
        }
        op::MATCH_ANY | op::MATCH_ALL => {
            let mut vals = [0u64; 32];
            for x in lanes() {
                vals[x as usize] = lane(x).w_val;
            }
            let all_equal =
                lanes().all(|x| vals[x as usize] == vals[group.trailing_zeros() as usize]);
            for x in lanes() {
                let same = lanes()
                    .filter(|&y| vals[y as usize] == vals[x as usize])
                    .fold(0u32, |m, y| m | (1 << y));
                lane(x).result = if opc == op::MATCH_ANY {
                    same as u64
                } else if all_equal {
                    group as u64
                } else {
                    0
                };
            }
        }
        other => return Err(format!("unknown warp collective op {other}")),
    }
    for x in lanes() {
        lane(x).state = St::Runnable;
    }
    Ok(())
}

/// Runs blocks `range` of a launch over `workers` OS threads. Returns the error of the
/// lowest-numbered failing block.
pub(crate) fn run_grid(
    launch: &Launch<'_>,
    range: std::ops::Range<usize>,
    workers: usize,
    reverse: bool,
) -> Result<(), EmuError> {
    let nblocks = range.len();
    let workers = workers.clamp(1, nblocks.max(1));
    if workers == 1 {
        let mut w = Worker::new(launch)?;
        for b in range {
            w.run_block(launch, b, reverse)?;
        }
        return Ok(());
    }
    let next = AtomicUsize::new(range.start);
    let stop = AtomicBool::new(false);
    let first_err: Mutex<Option<(usize, EmuError)>> = Mutex::new(None);
    let record = |b: usize, e: EmuError| {
        let mut g = first_err.lock().unwrap_or_else(|p| p.into_inner());
        if g.as_ref().is_none_or(|(eb, _)| b < *eb) {
            *g = Some((b, e));
        }
        stop.store(true, Ordering::Relaxed);
    };
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let mut w = match Worker::new(launch) {
                    Ok(w) => w,
                    Err(e) => {
                        record(usize::MAX, e);
                        return;
                    }
                };
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    if b >= range.end {
                        return;
                    }
                    if let Err(e) = w.run_block(launch, b, reverse) {
                        record(b, e);
                        return;
                    }
                }
            });
        }
    });
    match first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}
