//! The CUDA path: the project's kernels on candle's own stream, reading
//! candle's device memory at each layout's start offset.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape, Storage, Tensor};
use half::{bf16, f16};
use linattn_kernels::{decode_step, DecodeShape};
use linattn_kernels::{AttentionShape, Qkv, StateIo, StateMut, StateRef, Strides as KStrides};
use linattn_kernels::{BackwardInputs, BackwardStates, Grads as KGrads, Kind as KKind};
use linattn_kernels::{Buffer, Element, Gpu};

use crate::cpu::Strides;
use crate::op::{AttnOp, Grads, Kind, Spec};
use crate::{AttentionOptions, Error, Result, State};

/// One kernels executor per (context, stream) of candle (modules load once
/// per pair). The stream handle alone is not a key: candle opens every
/// device on the per-thread stream, whose handle is the same constant on
/// every device, so a second GPU would get the first one's executor. The
/// cache holds the stream and its context, so neither address is reused
/// while cached.
fn executor(dev: &CudaDevice) -> Result<Arc<Gpu>> {
    /// Executors by (context, stream) address.
    type Executors = Mutex<HashMap<(usize, usize), Arc<Gpu>>>;
    static CACHE: OnceLock<Executors> = OnceLock::new();
    let stream = dev.cuda_stream();
    let key = (
        stream.context().cu_ctx() as usize,
        stream.cu_stream() as usize,
    );
    let cache = CACHE.get_or_init(Mutex::default);
    let mut map = cache
        .lock()
        .map_err(|_| crate::invalid("linattn-candle", "device", "executor cache poisoned"))?;
    if let Some(g) = map.get(&key) {
        return Ok(g.clone());
    }
    let g = Arc::new(Gpu::from_stream(stream)?);
    map.insert(key, g.clone());
    Ok(g)
}

/// `len` zeros on candle's stream (the executor's), allocated through the
/// kernels crate, which never asks the driver for 0 bytes
/// (`cuMemAllocAsync(0)` is refused): `len` 0 gives an empty slice backed
/// by one element. Every buffer this module makes comes from here, so no
/// shape reaching it can make an allocation fail for being empty.
fn zeros<T: Element>(gpu: &Arc<Gpu>, len: usize) -> Result<CudaSlice<T>> {
    match linattn_kernels::Device::Gpu(gpu.clone()).alloc_zeros::<T>(len)? {
        Buffer::Cuda(s) => Ok(s),
        Buffer::Host(_) => Err(crate::invalid(
            "linattn-candle",
            "device",
            "a GPU executor gave a host buffer",
        )),
    }
}

/// `x` from element `at` on, empty when `at` is past its end (an empty
/// tensor's storage; `slice` would panic there).
fn tail<T>(x: &CudaSlice<T>, at: usize) -> CudaView<'_, T> {
    x.slice(at.min(x.len())..)
}

/// Elements `at..at + n` of `x`, or a typed error naming `arg` when the
/// storage is shorter.
fn span<'a, T>(
    x: &'a CudaSlice<T>,
    at: usize,
    n: usize,
    arg: &'static str,
) -> Result<CudaView<'a, T>> {
    x.try_slice(at..at + n).ok_or_else(|| {
        crate::invalid(
            "linattn-candle",
            arg,
            format!(
                "storage of {} elements has no {n} from element {at}",
                x.len()
            ),
        )
    })
}

/// The initial state `(S, z)` from the packed 1-D `[S ; z]` at `at`.
fn packed_state(
    x: &CudaSlice<f32>,
    at: usize,
    (u, d, m): (usize, usize, usize),
) -> Result<(CudaView<'_, f32>, CudaView<'_, f32>)> {
    Ok((
        span(x, at, u * d * m, "initial")?,
        span(x, at + u * d * m, u * d, "initial")?,
    ))
}

fn kstrides(s: Strides) -> KStrides {
    KStrides {
        batch: s.batch,
        token: s.token,
        head: s.head,
    }
}

/// The kernels' shape of a call: strides of q, k, v from the inputs, o contiguous.
fn shape(spec: &Spec, qs: Strides, ks: Strides, vs: Strides) -> AttentionShape {
    let (batch, tokens) = match spec.kind {
        Kind::Dense(_) => (spec.seqs.len(), spec.seqs.first().map_or(0, |s| s.1)),
        Kind::Varlen => (1, spec.seqs.last().map_or(0, |s| s.0 + s.1)),
    };
    AttentionShape {
        batch,
        heads: spec.heads,
        tokens,
        d: spec.d,
        m: spec.m,
        q: kstrides(qs),
        k: kstrides(ks),
        v: kstrides(vs),
        o: kstrides(spec.contiguous(spec.m)),
    }
}

fn cu_seqlens(spec: &Spec) -> Option<Vec<usize>> {
    match spec.kind {
        Kind::Dense(_) => None,
        Kind::Varlen => {
            let mut cu = vec![0];
            cu.extend(spec.seqs.iter().map(|s| s.0 + s.1));
            Some(cu)
        }
    }
}

fn wrap(e: impl Into<Error>) -> candle_core::Error {
    candle_core::Error::wrap(e.into())
}

#[allow(clippy::too_many_arguments)]
fn forward_t<T: CudaDType + Element + DeviceRepr>(
    op: &AttnOp,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let spec = &op.spec;
    let dev = s1.device.clone();
    let gpu = executor(&dev).map_err(wrap)?;
    let q: CudaView<T> = tail(s1.as_cuda_slice::<T>()?, l1.start_offset());
    let (qs, ks) = (spec.strides(l1), spec.strides(l2));
    let k: CudaView<T> = tail(s2.as_cuda_slice::<T>()?, l2.start_offset());
    let (v, vs) = if op.packed {
        (
            tail(s2.as_cuda_slice::<T>()?, l2.start_offset() + spec.d),
            Strides { start: 0, ..ks },
        )
    } else {
        (
            tail(s3.as_cuda_slice::<T>()?, l3.start_offset()),
            spec.strides(l3),
        )
    };
    let sh = shape(spec, qs, ks, vs);
    let cu = cu_seqlens(spec);
    let dims = spec.dims(spec.m);
    let mut o = zeros::<T>(&gpu, dims.iter().product()).map_err(wrap)?;
    let (u, d, m) = (spec.units(), spec.d, spec.m);
    let mut fs: CudaSlice<f32> = zeros(&gpu, u * d * m).map_err(wrap)?;
    let mut fz: CudaSlice<f32> = zeros(&gpu, u * d).map_err(wrap)?;
    let init: Option<(CudaView<f32>, CudaView<f32>)> = if op.packed {
        Some(packed_state(s3.as_cuda_slice::<f32>()?, l3.start_offset(), (u, d, m)).map_err(wrap)?)
    } else {
        None
    };
    let states = StateIo {
        initial: init.as_ref().map(|(s, z)| StateRef { s, z }),
        final_state: Some(StateMut {
            s: &mut fs,
            z: &mut fz,
        }),
    };
    let x = Qkv {
        q: &q,
        k: &k,
        v: &v,
    };
    let kind = if spec.causal {
        KKind::Causal
    } else {
        KKind::NonCausal
    };
    let r = linattn_kernels::forward(
        kind,
        &*gpu,
        x,
        &mut o,
        &sh,
        cu.as_deref(),
        &spec.opts,
        states,
    );
    r.map_err(wrap)?;
    if let Some(slot) = &op.final_slot {
        let mut g = slot
            .lock()
            .map_err(|_| wrap(crate::invalid(spec.name, "final_state", "poisoned slot")))?;
        *g = Some((
            Storage::Cuda(CudaStorage::wrap_cuda_slice(fs, dev.clone())),
            Storage::Cuda(CudaStorage::wrap_cuda_slice(fz, dev.clone())),
        ));
    }
    Ok((CudaStorage::wrap_cuda_slice(o, dev), Shape::from(dims)))
}

/// The op's CUDA forward: q, k, v read in place.
pub(crate) fn forward(
    op: &AttnOp,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    match s1.dtype() {
        DType::F32 => forward_t::<f32>(op, s1, l1, s2, l2, s3, l3),
        DType::F16 => forward_t::<f16>(op, s1, l1, s2, l2, s3, l3),
        DType::BF16 => forward_t::<bf16>(op, s1, l1, s2, l2, s3, l3),
        other => Err(wrap(Error::UnsupportedDType {
            op: op.spec.name,
            arg: "q",
            dtype: other,
            supported: crate::QKV_DTYPES,
        })),
    }
}

fn cuda_ref(g: &Storage) -> Result<&CudaStorage> {
    match g {
        Storage::Cuda(c) => Ok(c),
        _ => Err(crate::invalid(
            "linattn-candle",
            "q",
            "the CUDA path got a non-CUDA tensor",
        )),
    }
}

fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    Ok(tail(s.as_cuda_slice::<T>()?, l.start_offset()))
}

fn backward_t<T: CudaDType + Element + DeviceRepr>(
    op: &AttnOp,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    state: Option<&Tensor>,
    grad: &Tensor,
) -> Result<Grads> {
    let spec = &op.spec;
    // The backward kernels write each gradient with its primal's strides:
    // contiguous primals make contiguous gradients (a copy only when a
    // primal is a strided view).
    let (q, k, v, grad) = (
        q.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
        grad.contiguous()?,
    );
    let ((gq, lq), (gk, lk), (gvv, lv), (gg, lg)) = (
        q.storage_and_layout(),
        k.storage_and_layout(),
        v.storage_and_layout(),
        grad.storage_and_layout(),
    );
    let (sq, sk, sv, sg) = (
        cuda_ref(&gq)?,
        cuda_ref(&gk)?,
        cuda_ref(&gvv)?,
        cuda_ref(&gg)?,
    );
    let dev = sq.device.clone();
    let gpu = executor(&dev)?;
    let (qv, kv, vv, gv) = (
        view::<T>(sq, lq)?,
        view::<T>(sk, lk)?,
        view::<T>(sv, lv)?,
        view::<T>(sg, lg)?,
    );
    let sh = shape(
        spec,
        spec.contiguous(spec.d),
        spec.contiguous(spec.d),
        spec.contiguous(spec.m),
    );
    let cu = cu_seqlens(spec);
    let (qn, vn) = (
        spec.dims(spec.d).iter().product::<usize>(),
        spec.dims(spec.m).iter().product::<usize>(),
    );
    let (u, d, m) = (spec.units(), spec.d, spec.m);
    let mut dq = zeros::<T>(&gpu, qn)?;
    let mut dk = zeros::<T>(&gpu, qn)?;
    let mut dv = zeros::<T>(&gpu, vn)?;
    let mut ds = zeros::<f32>(&gpu, u * d * m)?;
    let mut dz = zeros::<f32>(&gpu, u * d)?;
    let st = state.map(|t| t.contiguous()).transpose()?;
    let st_guard = st.as_ref().map(|t| t.storage_and_layout());
    let init = match &st_guard {
        Some((g, l)) => Some(packed_state(
            cuda_ref(g)?.as_cuda_slice::<f32>()?,
            l.start_offset(),
            (u, d, m),
        )?),
        None => None,
    };
    let states = BackwardStates {
        initial: init.as_ref().map(|(s, z)| StateRef { s, z }),
        d_final: None,
        d_initial: Some(StateMut {
            s: &mut ds,
            z: &mut dz,
        }),
    };
    let x = BackwardInputs {
        q: &qv,
        k: &kv,
        v: &vv,
        d_o: &gv,
    };
    let g = KGrads {
        dq: &mut dq,
        dk: &mut dk,
        dv: &mut dv,
    };
    let kind = if spec.causal {
        KKind::Causal
    } else {
        KKind::NonCausal
    };
    linattn_kernels::backward(kind, &*gpu, x, g, &sh, cu.as_deref(), &spec.opts, states)?;
    let t = |s: Storage, dims: Vec<usize>| Tensor::from_storage(s, dims, BackpropOp::none(), false);
    let c = |x: CudaSlice<T>| Storage::Cuda(CudaStorage::wrap_cuda_slice(x, dev.clone()));
    let f = |x: CudaSlice<f32>| Storage::Cuda(CudaStorage::wrap_cuda_slice(x, dev.clone()));
    Ok((
        t(c(dq), spec.dims(d)),
        t(c(dk), spec.dims(d)),
        t(c(dv), spec.dims(m)),
        t(f(ds), vec![u * d * m]),
        t(f(dz), vec![u * d]),
    ))
}

/// The op's CUDA backward.
pub(crate) fn backward(
    op: &AttnOp,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    state: Option<&Tensor>,
    grad: &Tensor,
) -> Result<Grads> {
    match q.dtype() {
        DType::F32 => backward_t::<f32>(op, q, k, v, state, grad),
        DType::F16 => backward_t::<f16>(op, q, k, v, state, grad),
        DType::BF16 => backward_t::<bf16>(op, q, k, v, state, grad),
        other => Err(Error::UnsupportedDType {
            op: op.spec.name,
            arg: "q",
            dtype: other,
            supported: crate::QKV_DTYPES,
        }),
    }
}

fn decode_t<T: CudaDType + Element + DeviceRepr>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    state: &State,
    opts: &AttentionOptions,
    (b, h, d, m): (usize, usize, usize, usize),
) -> Result<(Tensor, State)> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (st_s, st_z) = (state.s.contiguous()?, state.z.contiguous()?);
    let ((gq, lq), (gk, lk), (gv, lv)) = (
        q.storage_and_layout(),
        k.storage_and_layout(),
        v.storage_and_layout(),
    );
    let ((gs, ls), (gz, lz)) = (st_s.storage_and_layout(), st_z.storage_and_layout());
    let (sq, sk, sv) = (cuda_ref(&gq)?, cuda_ref(&gk)?, cuda_ref(&gv)?);
    let (ss, sz) = (cuda_ref(&gs)?, cuda_ref(&gz)?);
    let dev = sq.device.clone();
    let gpu = executor(&dev)?;
    let stream = dev.cuda_stream();
    // The new state starts as a copy of the old one (see `decode_step`).
    let ds = |s: &CudaStorage, l: &Layout, n: usize| -> Result<CudaSlice<f32>> {
        let x = span(s.as_cuda_slice::<f32>()?, l.start_offset(), n, "state")?;
        stream.clone_dtod(&x).map_err(|e| {
            Error::Kernels(linattn_kernels::Error::Driver {
                context: "copying the state".into(),
                message: e.to_string(),
            })
        })
    };
    let mut s = ds(ss, ls, b * h * d * m)?;
    let mut z = ds(sz, lz, b * h * d)?;
    let mut o = zeros::<T>(&gpu, b * h * m)?;
    let x = Qkv {
        q: &view::<T>(sq, lq)?,
        k: &view::<T>(sk, lk)?,
        v: &view::<T>(sv, lv)?,
    };
    decode_step(
        &*gpu,
        x,
        &mut o,
        &mut s,
        &mut z,
        &DecodeShape::contiguous(b, h, d, m),
        opts,
    )?;
    let t =
        |st: Storage, dims: Vec<usize>| Tensor::from_storage(st, dims, BackpropOp::none(), false);
    Ok((
        t(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(o, dev.clone())),
            vec![b, h, m],
        ),
        State {
            s: t(
                Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())),
                vec![b, h, d, m],
            ),
            z: t(
                Storage::Cuda(CudaStorage::wrap_cuda_slice(z, dev.clone())),
                vec![b, h, d],
            ),
        },
    ))
}

/// The decode step on CUDA.
pub(crate) fn decode(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    state: &State,
    opts: &AttentionOptions,
    dims: (usize, usize, usize, usize),
) -> Result<(Tensor, State)> {
    match q.dtype() {
        DType::F32 => decode_t::<f32>(q, k, v, state, opts, dims),
        DType::F16 => decode_t::<f16>(q, k, v, state, opts, dims),
        DType::BF16 => decode_t::<bf16>(q, k, v, state, opts, dims),
        other => Err(Error::UnsupportedDType {
            op: "decode_step",
            arg: "q",
            dtype: other,
            supported: crate::QKV_DTYPES,
        }),
    }
}
