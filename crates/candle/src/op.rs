//! The candle custom op and its glue: which three tensors it takes, where the
//! final state goes, and how the backward maps back onto the inputs.
//!
//! candle custom ops take at most three inputs. Without an initial state the
//! op is `(q, k, v)`, read in place. With one, it is `(q, kv, state)`: `kv`
//! is `cat([k, v], -1)` and `state` is `cat([S.flatten(), z.flatten()])`
//! (1-D f32, `S` first); candle's `cat` is differentiable, so the
//! gradients the op returns for `kv` and `state` flow back to k, v, S0 and
//! z0. That costs one copy of k and v, only when a state is given. The final
//! state is a second output candle's op API has no room for: the forward
//! leaves it in a slot the caller reads right after, detached.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};
use half::{bf16, f16};

use crate::cpu::{self, Elem, Geometry, GradOut, Strides, Unit};
use crate::{last_dim_contiguous, AttentionOptions, Error, QkvLayout, Result, State};

/// Dense (a [`QkvLayout`]) or packed varlen `[total_tokens, H, dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Dense(QkvLayout),
    Varlen,
}

/// One validated call.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub name: &'static str,
    pub causal: bool,
    pub opts: AttentionOptions,
    pub kind: Kind,
    pub heads: usize,
    pub d: usize,
    pub m: usize,
    /// Per sequence: first token and length.
    pub seqs: Vec<(usize, usize)>,
}

impl Spec {
    pub fn geometry(&self) -> Geometry {
        Geometry {
            heads: self.heads,
            d: self.d,
            m: self.m,
            seqs: self.seqs.clone(),
        }
    }

    pub fn units(&self) -> usize {
        self.seqs.len() * self.heads
    }

    /// The leading dims of the states: (B or num_seqs, H).
    pub fn state_dims(&self) -> (usize, usize) {
        (self.seqs.len(), self.heads)
    }

    pub fn tokens(&self) -> usize {
        match self.kind {
            Kind::Dense(_) => self.seqs.first().map_or(0, |s| s.1),
            Kind::Varlen => self.seqs.last().map_or(0, |s| s.0 + s.1),
        }
    }

    /// The dims of a q/k/v-like tensor with last dim `dim`.
    pub fn dims(&self, dim: usize) -> Vec<usize> {
        let (b, h, n) = (self.seqs.len(), self.heads, self.tokens());
        match self.kind {
            Kind::Dense(QkvLayout::Bhnd) => vec![b, h, n, dim],
            Kind::Dense(QkvLayout::Bnhd) => vec![b, n, h, dim],
            Kind::Varlen => vec![n, h, dim],
        }
    }

    /// (batch, token, head) strides of a tensor of this kind, from candle's layout.
    pub fn strides(&self, l: &Layout) -> Strides {
        let s = l.stride();
        let start = l.start_offset();
        match self.kind {
            Kind::Dense(QkvLayout::Bhnd) => Strides {
                start,
                batch: s[0],
                head: s[1],
                token: s[2],
            },
            Kind::Dense(QkvLayout::Bnhd) => Strides {
                start,
                batch: s[0],
                token: s[1],
                head: s[2],
            },
            Kind::Varlen => Strides {
                start,
                batch: 0,
                token: s[0],
                head: s[1],
            },
        }
    }

    /// Strides of a contiguous tensor of this kind with last dim `dim`.
    pub fn contiguous(&self, dim: usize) -> Strides {
        let l = Layout::contiguous(self.dims(dim));
        self.strides(&l)
    }
}

/// Where the forward leaves the final state (S, z) for the caller.
type FinalSlot = Arc<Mutex<Option<(Storage, Storage)>>>;

pub(crate) struct AttnOp {
    pub spec: Spec,
    /// Inputs are `(q, kv, state)` rather than `(q, k, v)`.
    pub packed: bool,
    pub final_slot: Option<FinalSlot>,
}

fn op_err(
    name: &'static str,
    arg: &'static str,
    problem: impl std::fmt::Display,
) -> candle_core::Error {
    candle_core::Error::wrap(crate::invalid(name, arg, problem))
}

/// The initial states `S [U, D, M]`, `z [U, D]` from the packed 1-D
/// `[S ; z]` tensor (or zeros).
fn unpack_state(
    spec: &Spec,
    packed: Option<(&[f32], &Layout)>,
) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    let (u, d, m) = (spec.units(), spec.d, spec.m);
    match packed {
        None => Ok((vec![0f32; u * d * m], vec![0f32; u * d])),
        Some((x, l)) => {
            if !l.is_contiguous() || x.len() < l.start_offset() + u * d * (m + 1) {
                return Err(op_err(
                    spec.name,
                    "initial",
                    "the packed state is not a contiguous [S ; z]",
                ));
            }
            let x = &x[l.start_offset()..];
            Ok((
                x[..u * d * m].to_vec(),
                x[u * d * m..u * d * (m + 1)].to_vec(),
            ))
        }
    }
}

/// Gradients of one call: dq, dk, dv like q, k, v (contiguous), dS0
/// `[U * D * M]`, dz0 `[U * D]`.
pub(crate) type Grads = (Tensor, Tensor, Tensor, Tensor, Tensor);

impl AttnOp {
    /// Strides of (q, k, v) from the op's input layouts.
    fn input_strides(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> (Strides, Strides, Strides) {
        let qs = self.spec.strides(l1);
        let ks = self.spec.strides(l2);
        let vs = if self.packed {
            Strides {
                start: ks.start + self.spec.d,
                ..ks
            }
        } else {
            self.spec.strides(l3)
        };
        (qs, ks, vs)
    }

    #[allow(clippy::too_many_arguments)]
    fn cpu_fwd_t<T: Elem + candle_core::WithDType>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let spec = &self.spec;
        let geo = spec.geometry();
        let (qs, ks, vs) = self.input_strides(l1, l2, l3);
        let v = if self.packed {
            s2.as_slice::<T>()?
        } else {
            s3.as_slice::<T>()?
        };
        let x = Unit {
            q: s1.as_slice::<T>()?,
            k: s2.as_slice::<T>()?,
            v,
            qs,
            ks,
            vs,
            geo: &geo,
        };
        let init = if self.packed {
            Some((s3.as_slice::<f32>()?, l3))
        } else {
            None
        };
        let (mut s, mut z) = unpack_state(spec, init)?;
        let dims = spec.dims(spec.m);
        let mut o = vec![T::from_f32(f32::NAN); dims.iter().product()];
        cpu::forward(
            &x,
            spec.causal,
            &spec.opts,
            &mut o,
            spec.contiguous(spec.m),
            &mut s,
            &mut z,
        );
        if let Some(slot) = &self.final_slot {
            let mut g = slot
                .lock()
                .map_err(|_| op_err(spec.name, "final_state", "poisoned slot"))?;
            *g = Some((
                Storage::Cpu(CpuStorage::F32(s)),
                Storage::Cpu(CpuStorage::F32(z)),
            ));
        }
        Ok((T::to_cpu_storage_owned(o), Shape::from(dims)))
    }

    /// CPU backward on (q, k, v) views and the packed initial state.
    fn cpu_bwd_t<T: Elem + candle_core::WithDType>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        state: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<Grads> {
        let spec = &self.spec;
        let geo = spec.geometry();
        let (g1, l1) = q.storage_and_layout();
        let (g2, l2) = k.storage_and_layout();
        let (g3, l3) = v.storage_and_layout();
        let (gg, lg) = grad.storage_and_layout();
        // Borrow the CPU slices without copying.
        let (Storage::Cpu(c1), Storage::Cpu(c2), Storage::Cpu(c3), Storage::Cpu(cg)) =
            (&*g1, &*g2, &*g3, &*gg)
        else {
            return Err(crate::invalid(
                spec.name,
                "grad",
                "the CPU backward got a non-CPU tensor",
            ));
        };
        let x = Unit {
            q: c1.as_slice::<T>()?,
            k: c2.as_slice::<T>()?,
            v: c3.as_slice::<T>()?,
            qs: spec.strides(l1),
            ks: spec.strides(l2),
            vs: spec.strides(l3),
            geo: &geo,
        };
        let (mut s0, mut z0) = match state {
            Some(st) => {
                let (gs, ls) = st.storage_and_layout();
                let Storage::Cpu(cs) = &*gs else {
                    return Err(crate::invalid(
                        spec.name,
                        "initial",
                        "the CPU backward got a non-CPU state",
                    ));
                };
                unpack_state(spec, Some((cs.as_slice::<f32>()?, ls)))?
            }
            None => unpack_state(spec, None)?,
        };
        let (dqd, dvd) = (spec.dims(spec.d), spec.dims(spec.m));
        let nan = T::from_f32(f32::NAN);
        let mut dq = vec![nan; dqd.iter().product()];
        let mut dk = vec![nan; dqd.iter().product()];
        let mut dv = vec![nan; dvd.iter().product()];
        let out = GradOut {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
            dqs: spec.contiguous(spec.d),
            dks: spec.contiguous(spec.d),
            dvs: spec.contiguous(spec.m),
        };
        cpu::backward(
            &x,
            cg.as_slice::<T>()?,
            spec.strides(lg),
            spec.causal,
            &spec.opts,
            out,
            &mut s0,
            &mut z0,
        );
        let dev = candle_core::Device::Cpu;
        let (ns, nz) = (s0.len(), z0.len());
        Ok((
            Tensor::from_vec(dq, dqd.clone(), &dev)?,
            Tensor::from_vec(dk, dqd, &dev)?,
            Tensor::from_vec(dv, dvd, &dev)?,
            Tensor::from_vec(s0, ns, &dev)?,
            Tensor::from_vec(z0, nz, &dev)?,
        ))
    }
}

impl CustomOp3 for AttnOp {
    fn name(&self) -> &'static str {
        "linattn-linear-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match s1 {
            CpuStorage::F32(_) => self.cpu_fwd_t::<f32>(s1, l1, s2, l2, s3, l3),
            CpuStorage::F16(_) => self.cpu_fwd_t::<f16>(s1, l1, s2, l2, s3, l3),
            CpuStorage::BF16(_) => self.cpu_fwd_t::<bf16>(s1, l1, s2, l2, s3, l3),
            other => Err(candle_core::Error::wrap(Error::UnsupportedDType {
                op: self.spec.name,
                arg: "q",
                dtype: other.dtype(),
                supported: crate::QKV_DTYPES,
            })),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::forward(self, s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = last_dim_contiguous(grad_res).map_err(candle_core::Error::wrap)?;
        let spec = &self.spec;
        let (k, v, state) = if self.packed {
            let last = a2.rank() - 1;
            (
                a2.narrow(last, 0, spec.d)?,
                a2.narrow(last, spec.d, spec.m)?,
                Some(a3),
            )
        } else {
            (a2.clone(), a3.clone(), None)
        };
        let r = match (a1.device(), a1.dtype()) {
            (candle_core::Device::Cpu, candle_core::DType::F32) => {
                self.cpu_bwd_t::<f32>(a1, &k, &v, state, &grad)
            }
            (candle_core::Device::Cpu, candle_core::DType::F16) => {
                self.cpu_bwd_t::<f16>(a1, &k, &v, state, &grad)
            }
            (candle_core::Device::Cpu, candle_core::DType::BF16) => {
                self.cpu_bwd_t::<bf16>(a1, &k, &v, state, &grad)
            }
            #[cfg(feature = "cuda")]
            (candle_core::Device::Cuda(_), _) => {
                crate::cuda::backward(self, a1, &k, &v, state, &grad)
            }
            (dev, dtype) => Err(crate::invalid(
                spec.name,
                "q",
                format!("no backward for {dtype:?} on {:?}", dev.location()),
            )),
        };
        let (dq, dk, dv, ds0, dz0) = r.map_err(candle_core::Error::wrap)?;
        if !self.packed {
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let last = dk.rank() - 1;
        let dkv = Tensor::cat(&[&dk, &dv], last)?;
        let dst = Tensor::cat(&[&ds0, &dz0], 0)?;
        Ok((Some(dq), Some(dkv), Some(dst)))
    }
}

/// Runs the op: `(q, k, v)` without a state, `(q, kv, state)` with one.
/// `initial`: `None` = no final state wanted; `Some(x)` = final state wanted,
/// starting from `x` (zeros when `None`).
pub(crate) fn apply(
    spec: Spec,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    initial: Option<Option<&State>>,
) -> Result<(Tensor, Option<State>)> {
    if spec.tokens() == 0 {
        return without_tokens(&spec, v, initial);
    }
    let q = last_dim_contiguous(q)?;
    let k = last_dim_contiguous(k)?;
    let v = last_dim_contiguous(v)?;
    let slot: Option<FinalSlot> = initial.map(|_| Arc::new(Mutex::new(None)));
    let (u1, u2) = spec.state_dims();
    let (d, m, name) = (spec.d, spec.m, spec.name);
    let o = match initial.flatten() {
        Some(st) => {
            let last = k.rank() - 1;
            let kv = Tensor::cat(&[&k, &v], last)?;
            let packed = Tensor::cat(&[&st.s.flatten_all()?, &st.z.flatten_all()?], 0)?;
            let op = AttnOp {
                spec,
                packed: true,
                final_slot: slot.clone(),
            };
            q.apply_op3(&kv, &packed, op)?
        }
        None => {
            let op = AttnOp {
                spec,
                packed: false,
                final_slot: slot.clone(),
            };
            q.apply_op3(&k, &v, op)?
        }
    };
    let Some(slot) = slot else {
        return Ok((o, None));
    };
    let taken = slot.lock().ok().and_then(|mut g| g.take());
    let (s, z) = taken
        .ok_or_else(|| crate::invalid(name, "final_state", "the forward left no final state"))?;
    let s = Tensor::from_storage(s, (u1, u2, d, m), BackpropOp::none(), false);
    let z = Tensor::from_storage(z, (u1, u2, d), BackpropOp::none(), false);
    Ok((o, Some(State { s, z })))
}

/// A call with no tokens at all (a varlen batch whose sequences are all
/// empty; dense calls reject N = 0): nothing to compute, and nothing to
/// allocate, on every device alike. On CUDA, making a 0-element tensor
/// (candle's `zeros`, `cat`, `contiguous`, a dtype cast) asks the driver for
/// 0 bytes, which `cuMemAllocAsync` refuses, so none is made: o is v's own
/// empty `[0, H, M]` view, detached (it has no elements to take a gradient
/// through), and each final state is its initial one (an empty sequence
/// passes its state through), copied so that it never shares storage with
/// a `Var` an optimiser updates in place, or zeros.
fn without_tokens(
    spec: &Spec,
    v: &Tensor,
    initial: Option<Option<&State>>,
) -> Result<(Tensor, Option<State>)> {
    let o = v.detach();
    let Some(initial) = initial else {
        return Ok((o, None));
    };
    let (u1, u2) = spec.state_dims();
    let fin = match initial {
        Some(st) => State {
            s: st.s.copy()?.detach(),
            z: st.z.copy()?.detach(),
        },
        None => State::zeros(u1, u2, spec.d, spec.m, v.device())?,
    };
    Ok((o, Some(fin)))
}

/// The decode step on either device.
pub(crate) fn decode(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    state: &State,
    opts: &AttentionOptions,
    (b, h, d, m): (usize, usize, usize, usize),
) -> Result<(Tensor, State)> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(_) = q.device() {
        return crate::cuda::decode(q, k, v, state, opts, (b, h, d, m));
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let mut s = state.s.flatten_all()?.to_vec1::<f32>()?;
    let mut z = state.z.flatten_all()?.to_vec1::<f32>()?;
    #[allow(clippy::too_many_arguments)]
    fn run<T: Elem + candle_core::WithDType>(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        d: usize,
        m: usize,
        opts: &AttentionOptions,
        s: &mut [f32],
        z: &mut [f32],
        units: usize,
    ) -> Result<Tensor> {
        let (q, k, v) = (
            q.flatten_all()?.to_vec1::<T>()?,
            k.flatten_all()?.to_vec1::<T>()?,
            v.flatten_all()?.to_vec1::<T>()?,
        );
        let mut o = vec![T::from_f32(f32::NAN); units * m];
        cpu::decode(&q, &k, &v, d, m, opts, s, z, &mut o);
        Ok(Tensor::from_vec(o, units * m, &candle_core::Device::Cpu)?)
    }
    let units = b * h;
    let o = match q.dtype() {
        candle_core::DType::F32 => run::<f32>(&q, &k, &v, d, m, opts, &mut s, &mut z, units)?,
        candle_core::DType::F16 => run::<f16>(&q, &k, &v, d, m, opts, &mut s, &mut z, units)?,
        _ => run::<bf16>(&q, &k, &v, d, m, opts, &mut s, &mut z, units)?,
    };
    let dev = candle_core::Device::Cpu;
    Ok((
        o.reshape((b, h, m))?,
        State {
            s: Tensor::from_vec(s, (b, h, d, m), &dev)?,
            z: Tensor::from_vec(z, (b, h, d), &dev)?,
        },
    ))
}
