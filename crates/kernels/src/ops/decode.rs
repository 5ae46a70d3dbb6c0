//! `decode_step.cu`: one new token for every (batch, head), the fp32 state
//! updated in place: `S += phi(k) v^T; z += phi(k); o = s phi(q)^T S /
//! (s phi(q)^T z + eps)`. This is "RNN mode": O(D M) per token whatever the
//! position, and it continues a causal prefill exactly (the prefill's final
//! state is this kernel's state).

use super::attention::{AttentionOptions, Qkv};
use super::checks::{self, byte_range, MAX_GRID_X};
use super::forward::tiling::THREADS;
use super::memory::{Addrs, DeviceRead, DeviceWrite, Memory};
use crate::dtype::{DType, Element};
use crate::params::LinattnDecodeParams;
use crate::plan::{Executor, LaunchPlan};
use crate::{Error, Result};

const KERNEL: &str = "decode_step";

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
        checks::span([self.batch, self.heads, 1], [s.batch, s.head, 0], dim)
    }

    /// Checks the shape against buffer lengths (`usize::MAX` when unknown):
    /// q, k, v, o, then S and z.
    pub fn validate(&self, opts: &AttentionOptions, lens: [usize; 6]) -> Result<()> {
        opts.check(KERNEL)?;
        checks::dim(KERNEL, "d", self.d)?;
        checks::dim(KERNEL, "m", self.m)?;
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
            checks::holds(KERNEL, arg, lens[i], need)?;
        }
        // Output rows must not overlap (o is written by many blocks).
        let axes = [(self.batch, self.o.batch), (self.heads, self.o.head)];
        if !checks::rows_disjoint(&axes, self.m) {
            return Err(Error::invalid(
                KERNEL,
                "o",
                format!(
                    "output strides {:?} make rows of {} elements overlap",
                    self.o, self.m
                ),
            ));
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

/// One decode step: reads q, k, v, writes o, and advances the `batch *
/// heads` states (`state_s`, `state_z`, fp32) in place.
///
/// `exec` is a [`crate::Device`] (memory: [`crate::Buffer`]s) or a
/// [`crate::Gpu`] (cudarc slices or views). Errors:
/// [`crate::Error::InvalidArgument`] naming the argument for a bad shape,
/// option or length, or memory of another device.
pub fn decode_step<E, T, B, O, S, Z>(
    exec: &E,
    x: Qkv<'_, B>,
    o: &mut O,
    state_s: &mut S,
    state_z: &mut Z,
    shape: &DecodeShape,
    opts: &AttentionOptions,
) -> Result<()>
where
    E: Memory,
    T: Element,
    B: DeviceRead<T, E>,
    O: DeviceWrite<T, E>,
    S: DeviceWrite<f32, E>,
    Z: DeviceWrite<f32, E>,
{
    shape.validate(
        opts,
        [
            x.q.elems(),
            x.k.elems(),
            x.v.elems(),
            o.elems(),
            state_s.elems(),
            state_z.elems(),
        ],
    )?;
    let mut a = Addrs::new(exec, KERNEL);
    let raw = RawDecode {
        q: a.read(x.q, "q")?,
        k: a.read(x.k, "k")?,
        v: a.read(x.v, "v")?,
        o: a.write(o, "o")?,
        state_s: a.write(state_s, "state_s")?,
        state_z: a.write(state_z, "state_z")?,
    };
    // SAFETY: every address is memory of `exec`, validated against the shape.
    unsafe { launch(exec, T::DTYPE, shape, opts, &raw) }
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
    checks::non_null(
        KERNEL,
        &[
            ("q", p.q),
            ("k", p.k),
            ("v", p.v),
            ("o", p.o),
            ("state_s", p.state_s),
            ("state_z", p.state_z),
        ],
    )?;
    let es = dtype.size();
    let bytes = |p: u64, s, dim| byte_range(p, shape.span(s, dim).unwrap_or(usize::MAX), es);
    let inputs = [
        ("q", bytes(p.q, &shape.q, shape.d)),
        ("k", bytes(p.k, &shape.k, shape.d)),
        ("v", bytes(p.v, &shape.v, shape.m)),
    ];
    let outputs = [
        ("o", bytes(p.o, &shape.o, shape.m)),
        (
            "state_s",
            byte_range(p.state_s, shape.states() * shape.d * shape.m, 4),
        ),
        (
            "state_z",
            byte_range(p.state_z, shape.states() * shape.d, 4),
        ),
    ];
    checks::outputs_disjoint(KERNEL, &inputs, &outputs)?;
    // SAFETY: forwarded to the caller.
    unsafe { launch(exec, dtype, shape, opts, p) }
}

/// Both paths' launch, naming what it writes.
///
/// # Safety
/// `p` valid for `exec` and `shape` (validated by the caller).
unsafe fn launch<E: Executor>(
    exec: &E,
    dtype: DType,
    shape: &DecodeShape,
    opts: &AttentionOptions,
    p: &RawDecode,
) -> Result<()> {
    // SAFETY: forwarded.
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
