//! `decode_step.cu`: one new token for every (batch, head), the fp32 state
//! updated in place: `S += phi(k) v^T; z += phi(k); o = s phi(q)^T S /
//! (s phi(q)^T z + eps)`. This is "RNN mode": O(D M) per token whatever the
//! position, and it continues a causal prefill exactly (the prefill's final
//! state is this kernel's state).

use cudarc::driver::{DevicePtr, DevicePtrMut};

use crate::dtype::{DType, Element};
use crate::ops::forward::{AttentionOptions, MAX_DIM, THREADS};
use crate::params::LinattnDecodeParams;
use crate::plan::{Executor, LaunchPlan};
use crate::{Buffer, Device, Error, Gpu, Result};

const KERNEL: &str = "decode_step";
const MAX_GRID_X: usize = i32::MAX as usize;

/// Element strides of one `[batch, heads, dim]` tensor (the last dim contiguous).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RowStrides {
    /// Elements between consecutive batch entries.
    pub batch: usize,
    /// Elements between consecutive heads.
    pub head: usize,
}

impl RowStrides {
    /// Contiguous `[B, H, dim]`.
    pub fn contiguous(heads: usize, dim: usize) -> Self {
        RowStrides {
            batch: heads * dim,
            head: dim,
        }
    }
}

/// One decode step's shapes: q, k are `d` wide, v, o `m` wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DecodeShape {
    /// Sequences.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Key size D (1..=256).
    pub d: usize,
    /// Value size M (1..=256).
    pub m: usize,
    /// Strides of q.
    pub q: RowStrides,
    /// Strides of k.
    pub k: RowStrides,
    /// Strides of v.
    pub v: RowStrides,
    /// Strides of o.
    pub o: RowStrides,
}

impl DecodeShape {
    /// Contiguous `[B, H, dim]` for all four tensors.
    pub fn contiguous(batch: usize, heads: usize, d: usize, m: usize) -> Self {
        let (qk, vo) = (
            RowStrides::contiguous(heads, d),
            RowStrides::contiguous(heads, m),
        );
        DecodeShape {
            batch,
            heads,
            d,
            m,
            q: qk,
            k: qk,
            v: vo,
            o: vo,
        }
    }

    /// Number of states, `batch * heads`.
    pub fn states(&self) -> usize {
        self.batch * self.heads
    }

    fn span(&self, s: &RowStrides, dim: usize) -> Option<usize> {
        (self.batch - 1)
            .checked_mul(s.batch)?
            .checked_add((self.heads - 1).checked_mul(s.head)?)?
            .checked_add(dim)
            .filter(|&n| n <= i64::MAX as usize)
    }

    /// Checks the shape against buffer lengths (`usize::MAX` when unknown):
    /// q, k, v, o, then S and z.
    pub fn validate(&self, opts: &AttentionOptions, lens: [usize; 6]) -> Result<()> {
        opts.check(KERNEL)?;
        for (arg, v) in [("d", self.d), ("m", self.m)] {
            if v == 0 || v > MAX_DIM {
                return Err(Error::invalid(
                    KERNEL,
                    arg,
                    format!("{arg} = {v}; supported sizes are 1..={MAX_DIM}"),
                ));
            }
        }
        if self.batch == 0 || self.heads == 0 {
            return Err(Error::invalid(
                KERNEL,
                "shape",
                "batch and heads must be at least 1",
            ));
        }
        let states = self
            .batch
            .checked_mul(self.heads)
            .filter(|&n| n <= MAX_GRID_X)
            .ok_or_else(|| {
                Error::invalid(KERNEL, "shape", "batch x heads exceeds the grid limit")
            })?;
        for (i, (arg, s, dim)) in [
            ("q", &self.q, self.d),
            ("k", &self.k, self.d),
            ("v", &self.v, self.m),
            ("o", &self.o, self.m),
        ]
        .into_iter()
        .enumerate()
        {
            let need = self.span(s, dim).ok_or_else(|| {
                Error::invalid(KERNEL, arg, "the tensor's extent overflows 64-bit indexing")
            })?;
            if lens[i] < need {
                return Err(Error::invalid(
                    KERNEL,
                    arg,
                    format!(
                        "buffer holds {} elements, the shape and strides need {need}",
                        lens[i]
                    ),
                ));
            }
        }
        // Output rows must not overlap (o is written by many blocks).
        let mut axes = [(self.batch, self.o.batch), (self.heads, self.o.head)];
        axes.sort_by_key(|&(_, s)| s);
        let mut reach = self.m;
        for (n, s) in axes.into_iter().filter(|&(n, _)| n > 1) {
            if s < reach {
                return Err(Error::invalid(
                    KERNEL,
                    "o",
                    format!(
                        "output strides {:?} make rows of {} elements overlap",
                        self.o, self.m
                    ),
                ));
            }
            reach = reach.saturating_add((n - 1).saturating_mul(s));
        }
        let s_need = states
            .checked_mul(self.d * self.m)
            .filter(|&n| n <= i64::MAX as usize)
            .ok_or_else(|| {
                Error::invalid(KERNEL, "state", "state size overflows 64-bit indexing")
            })?;
        let z_need = states * self.d;
        if lens[4] < s_need || lens[5] < z_need {
            return Err(Error::invalid(
                KERNEL,
                "state",
                format!(
                    "expected S of {s_need} and z of {z_need} fp32 elements ({states} states of d = {}, m = {}), found {} and {}",
                    self.d, self.m, lens[4], lens[5]
                ),
            ));
        }
        Ok(())
    }
}

/// The kernel symbol for a dtype.
pub fn kernel_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "decode_step_f32",
        DType::F16 => "decode_step_f16",
        DType::Bf16 => "decode_step_bf16",
    }
}

/// Device addresses of one decode step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawDecode {
    /// q (`dtype`).
    pub q: u64,
    /// k.
    pub k: u64,
    /// v.
    pub v: u64,
    /// o (written).
    pub o: u64,
    /// fp32 S (read and written in place).
    pub state_s: u64,
    /// fp32 z (read and written in place).
    pub state_z: u64,
}

/// What a decode step writes: o and the state (for the emulator's schedule check).
fn write_regions(dtype: DType, shape: &DecodeShape, p: &RawDecode) -> Vec<(u64, usize)> {
    let o = shape.span(&shape.o, shape.m).unwrap_or(0) * dtype.size();
    vec![
        (p.o, o),
        (p.state_s, shape.states() * shape.d * shape.m * 4),
        (p.state_z, shape.states() * shape.d * 4),
    ]
}

/// Builds the launch: one 256-thread block per (batch, head).
pub fn plan(
    dtype: DType,
    shape: &DecodeShape,
    opts: &AttentionOptions,
    p: &RawDecode,
) -> LaunchPlan<LinattnDecodeParams> {
    LaunchPlan {
        module: KERNEL,
        kernel: kernel_name(dtype),
        grid: [shape.states() as u32, 1, 1],
        block: [THREADS, 1, 1],
        shared_bytes: 0,
        params: LinattnDecodeParams {
            q: p.q,
            k: p.k,
            v: p.v,
            o: p.o,
            state_s: p.state_s,
            state_z: p.state_z,
            batch: shape.batch as i64,
            heads: shape.heads as i64,
            d: shape.d as i64,
            m: shape.m as i64,
            q_batch_stride: shape.q.batch as i64,
            q_head_stride: shape.q.head as i64,
            k_batch_stride: shape.k.batch as i64,
            k_head_stride: shape.k.head as i64,
            v_batch_stride: shape.v.batch as i64,
            v_head_stride: shape.v.head as i64,
            o_batch_stride: shape.o.batch as i64,
            o_head_stride: shape.o.head as i64,
            feature_map: opts.feature_map.to_c(),
            normalize: opts.normalize as i32,
            eps: opts.eps,
            scale: opts.scale,
        },
    }
}

/// One decode step on a [`Device`]: reads q, k, v, writes o, and advances
/// the `batch * heads` states (`state_s`, `state_z`) in place.
pub fn decode_step<T: Element>(
    dev: &Device,
    x: crate::ops::forward::Qkv<'_, Buffer<T>>,
    o: &mut Buffer<T>,
    state_s: &mut Buffer<f32>,
    state_z: &mut Buffer<f32>,
    shape: &DecodeShape,
    opts: &AttentionOptions,
) -> Result<()> {
    shape.validate(
        opts,
        [
            x.q.len(),
            x.k.len(),
            x.v.len(),
            o.len(),
            state_s.len(),
            state_z.len(),
        ],
    )?;
    let (q, _g1) = x.q.read_ptr(dev, KERNEL, "q")?;
    let (k, _g2) = x.k.read_ptr(dev, KERNEL, "k")?;
    let (v, _g3) = x.v.read_ptr(dev, KERNEL, "v")?;
    let (op, _g4) = o.write_ptr(dev, KERNEL, "o")?;
    let (ss, _g5) = state_s.write_ptr(dev, KERNEL, "state_s")?;
    let (sz, _g6) = state_z.write_ptr(dev, KERNEL, "state_z")?;
    let raw = RawDecode {
        q,
        k,
        v,
        o: op,
        state_s: ss,
        state_z: sz,
    };
    // SAFETY: every buffer belongs to `dev` and was validated.
    unsafe {
        dev.launch_writing(
            &plan(T::DTYPE, shape, opts, &raw),
            &write_regions(T::DTYPE, shape, &raw),
        )
    }
}

/// [`decode_step`] on cudarc memory, on `gpu`'s stream.
pub fn decode_step_cuda<T: Element, B: DevicePtr<T>>(
    gpu: &Gpu,
    x: crate::ops::forward::Qkv<'_, B>,
    o: &mut impl DevicePtrMut<T>,
    state_s: &mut impl DevicePtrMut<f32>,
    state_z: &mut impl DevicePtrMut<f32>,
    shape: &DecodeShape,
    opts: &AttentionOptions,
) -> Result<()> {
    shape.validate(
        opts,
        [
            x.q.len(),
            x.k.len(),
            x.v.len(),
            o.len(),
            state_s.len(),
            state_z.len(),
        ],
    )?;
    let st = gpu.stream();
    let (q, _g1) = x.q.device_ptr(st);
    let (k, _g2) = x.k.device_ptr(st);
    let (v, _g3) = x.v.device_ptr(st);
    let (op, _g4) = o.device_ptr_mut(st);
    let (ss, _g5) = state_s.device_ptr_mut(st);
    let (sz, _g6) = state_z.device_ptr_mut(st);
    let raw = RawDecode {
        q,
        k,
        v,
        o: op,
        state_s: ss,
        state_z: sz,
    };
    // SAFETY: cudarc memory of this context; lengths validated.
    unsafe { gpu.launch(&plan(T::DTYPE, shape, opts, &raw)) }
}

/// [`decode_step`] on raw device addresses.
///
/// # Safety
/// q, k, v (read) and o (written) must cover `shape` with its strides in
/// `dtype` elements; `state_s` and `state_z` must hold `batch * heads * d * m`
/// and `batch * heads * d` fp32 elements (read and written); all in memory the
/// executor can reach and valid until the launch completes. o must not
/// overlap the inputs or the state (checked by address range).
pub unsafe fn decode_step_raw<E: Executor>(
    exec: &E,
    dtype: DType,
    p: &RawDecode,
    shape: &DecodeShape,
    opts: &AttentionOptions,
) -> Result<()> {
    shape.validate(opts, [usize::MAX; 6])?;
    for (arg, v) in [
        ("q", p.q),
        ("k", p.k),
        ("v", p.v),
        ("o", p.o),
        ("state_s", p.state_s),
        ("state_z", p.state_z),
    ] {
        if v == 0 {
            return Err(Error::invalid(KERNEL, arg, "null pointer"));
        }
    }
    let es = dtype.size() as u64;
    let range = |ptr: u64, elems: usize, size: u64| (ptr, ptr.saturating_add(elems as u64 * size));
    let span = |s: &RowStrides, dim| shape.span(s, dim).unwrap_or(usize::MAX);
    let o = range(p.o, span(&shape.o, shape.m), es);
    let s = range(p.state_s, shape.states() * shape.d * shape.m, 4);
    let z = range(p.state_z, shape.states() * shape.d, 4);
    let others = [
        ("q", range(p.q, span(&shape.q, shape.d), es)),
        ("k", range(p.k, span(&shape.k, shape.d), es)),
        ("v", range(p.v, span(&shape.v, shape.m), es)),
    ];
    let hit = |a: (u64, u64), b: (u64, u64)| a.0 < b.1 && b.0 < a.1;
    for (arg, r) in others.iter().chain([("state_s", s), ("state_z", z)].iter()) {
        if hit(o, *r) {
            return Err(Error::invalid(
                KERNEL,
                "o",
                format!("output overlaps `{arg}`"),
            ));
        }
    }
    for (arg, r) in others.iter().chain([("state_z", z)].iter()) {
        if hit(s, *r) {
            return Err(Error::invalid(
                KERNEL,
                "state_s",
                format!("the state overlaps `{arg}`"),
            ));
        }
    }
    for (arg, r) in others.iter() {
        if hit(z, *r) {
            return Err(Error::invalid(
                KERNEL,
                "state_z",
                format!("the state overlaps `{arg}`"),
            ));
        }
    }
    // SAFETY: forwarded to the caller.
    unsafe {
        exec.launch_writing(
            &plan(dtype, shape, opts, p),
            &write_regions(dtype, shape, p),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_has_one_block_per_state() {
        let s = DecodeShape::contiguous(3, 5, 17, 256);
        let p = plan(
            DType::Bf16,
            &s,
            &AttentionOptions::default(),
            &RawDecode::default(),
        );
        assert_eq!(p.grid, [15, 1, 1]);
        assert_eq!(p.block, [256, 1, 1]);
        assert_eq!(p.kernel, "decode_step_bf16");
        assert_eq!((p.params.d, p.params.m), (17, 256));
    }

    #[test]
    fn validation() {
        let s = DecodeShape::contiguous(2, 3, 4, 5);
        let o = AttentionOptions::default();
        let ok = [24, 24, 30, 30, 120, 24];
        assert!(s.validate(&o, ok).is_ok());
        let mut l = ok;
        l[4] = 119;
        assert!(s.validate(&o, l).unwrap_err().to_string().contains("state"));
        let mut l = ok;
        l[2] = 29;
        assert!(s.validate(&o, l).unwrap_err().to_string().contains("`v`"));
        let mut bad = s;
        bad.o.head = 4;
        assert!(bad
            .validate(&o, ok)
            .unwrap_err()
            .to_string()
            .contains("overlap"));
        let big = DecodeShape::contiguous(1, 1, 300, 4);
        assert!(big
            .validate(&o, [usize::MAX; 6])
            .unwrap_err()
            .to_string()
            .contains("1..=256"));
        let nan = AttentionOptions {
            scale: f32::NAN,
            ..o
        };
        assert!(s.validate(&nan, ok).is_err());
    }

    #[test]
    fn raw_rejects_aliasing() {
        let s = DecodeShape::contiguous(1, 1, 2, 2);
        let o = AttentionOptions::default();
        let p = RawDecode {
            q: 100,
            k: 200,
            v: 300,
            o: 400,
            state_s: 500,
            state_z: 600,
        };
        struct NoExec;
        impl Executor for NoExec {
            fn target(&self) -> crate::Target {
                crate::Target::H200
            }
            unsafe fn launch<P: crate::params::KernelParams>(
                &self,
                _: &LaunchPlan<P>,
            ) -> Result<()> {
                Ok(())
            }
        }
        // SAFETY: NoExec touches no memory.
        unsafe {
            assert!(decode_step_raw(&NoExec, DType::F32, &p, &s, &o).is_ok());
            let e = decode_step_raw(&NoExec, DType::F32, &RawDecode { o: 504, ..p }, &s, &o);
            assert!(e.unwrap_err().to_string().contains("overlaps"));
            let e = decode_step_raw(&NoExec, DType::F32, &RawDecode { q: 0, ..p }, &s, &o);
            assert!(e.unwrap_err().to_string().contains("null"));
        }
    }
}
