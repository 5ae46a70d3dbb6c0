//! Attention on `linattn-kernels`: the causal forward kernel for the prefill
//! and the decode-step kernel for each new token, on any
//! [`linattn_kernels::Device`] (a GPU, or the CPU emulator running the same
//! `.cu` sources). The (S, z) states stay in device memory between steps.

use linattn_kernels::{causal_forward, AttentionOptions, AttentionShape, Qkv, StateIo, StateMut};
use linattn_kernels::{decode_step, DecodeShape};
use linattn_kernels::{Buffer, DType, Device, Element};
use linattn_reference::FeatureMap;

use crate::attention::{AttentionBackend, AttentionSpec};
use crate::config::AttentionKind;
use crate::error::{ModelError, Result};

/// Linear attention through the project's CUDA kernels on a [`Device`].
///
/// q, k and v are uploaded in `dtype` (f32, f16 or bf16; the kernels keep
/// their states and accumulate in f32) and the output comes back as f32;
/// projections, norms and the MLP stay on the CPU. This backend runs linear
/// attention only: a softmax model is rejected with
/// [`ModelError::BackendUnavailable`] (use [`crate::CpuAttention`], or
/// [`crate::GpuModel`], which has the softmax kernels).
#[derive(Debug, Clone)]
pub struct KernelAttention {
    device: Device,
    dtype: DType,
}

/// Per-block decode state of [`KernelAttention`]: the fp32 `S` (`heads * d *
/// d`) and `z` (`heads * d`) in device memory.
#[derive(Debug)]
pub struct KernelCache {
    s: Buffer<f32>,
    z: Buffer<f32>,
}

impl KernelCache {
    /// Copies the states back to the host as (S, z).
    pub fn download(&self, device: &Device) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((device.download(&self.s)?, device.download(&self.z)?))
    }
}

impl KernelAttention {
    /// Kernels on `device`, with q, k, v in f32.
    pub fn new(device: Device) -> Self {
        Self::with_dtype(device, DType::F32)
    }

    /// Kernels on `device`, with q, k, v stored as `dtype`.
    pub fn with_dtype(device: Device, dtype: DType) -> Self {
        KernelAttention { device, dtype }
    }

    /// The device the kernels run on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub(crate) fn options(spec: &AttentionSpec) -> AttentionOptions {
        let o = spec.linear_options();
        AttentionOptions {
            feature_map: match o.feature_map {
                FeatureMap::EluPlusOne => linattn_kernels::FeatureMap::EluPlusOne,
                FeatureMap::Relu => linattn_kernels::FeatureMap::Relu,
                FeatureMap::Identity => linattn_kernels::FeatureMap::Identity,
            },
            normalize: o.normalize,
            eps: o.eps as f32,
            scale: o.scale as f32,
            ..AttentionOptions::default()
        }
    }

    fn check_kind(spec: &AttentionSpec) -> Result<()> {
        if spec.kind != AttentionKind::Linear {
            return Err(ModelError::BackendUnavailable {
                backend: "kernels".into(),
                reason: format!(
                    "{} attention has no kernel in KernelAttention; use the CPU backend or GpuModel",
                    spec.kind
                ),
            });
        }
        Ok(())
    }

    fn upload<T: Element>(&self, x: &[f32]) -> Result<Buffer<T>> {
        let v: Vec<T> = x.iter().map(|&a| T::from_f64(a as f64)).collect();
        Ok(self.device.upload(&v)?)
    }

    fn download<T: Element>(&self, b: &Buffer<T>) -> Result<Vec<f32>> {
        Ok(self
            .device
            .download(b)?
            .into_iter()
            .map(|a| a.to_f64() as f32)
            .collect())
    }

    fn prefill_as<T: Element>(
        &self,
        spec: &AttentionSpec,
        n: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<(Vec<f32>, KernelCache)> {
        let (h, dh) = (spec.heads, spec.head_dim);
        let (qb, kb, vb) = (
            self.upload::<T>(q)?,
            self.upload::<T>(k)?,
            self.upload::<T>(v)?,
        );
        let mut ob = self.upload::<T>(&vec![0.0; q.len()])?;
        let mut s = self.device.upload(&vec![0.0f32; h * dh * dh])?;
        let mut z = self.device.upload(&vec![0.0f32; h * dh])?;
        causal_forward(
            &self.device,
            Qkv {
                q: &qb,
                k: &kb,
                v: &vb,
            },
            &mut ob,
            &AttentionShape::bnhd(1, h, n, dh, dh),
            None,
            &Self::options(spec),
            StateIo::final_only(StateMut {
                s: &mut s,
                z: &mut z,
            }),
        )?;
        Ok((self.download(&ob)?, KernelCache { s, z }))
    }

    fn decode_as<T: Element>(
        &self,
        spec: &AttentionSpec,
        cache: &mut KernelCache,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<Vec<f32>> {
        let (h, dh) = (spec.heads, spec.head_dim);
        let (qb, kb, vb) = (
            self.upload::<T>(q)?,
            self.upload::<T>(k)?,
            self.upload::<T>(v)?,
        );
        let mut ob = self.upload::<T>(&vec![0.0; q.len()])?;
        decode_step(
            &self.device,
            Qkv {
                q: &qb,
                k: &kb,
                v: &vb,
            },
            &mut ob,
            &mut cache.s,
            &mut cache.z,
            &DecodeShape::contiguous(1, h, dh, dh),
            &Self::options(spec),
        )?;
        self.download(&ob)
    }
}

impl AttentionBackend for KernelAttention {
    type Cache = KernelCache;

    fn name(&self) -> String {
        format!(
            "linattn kernels on {} ({:?} q/k/v), CPU projections",
            self.device.describe(),
            self.dtype
        )
    }

    fn prefill(
        &self,
        spec: &AttentionSpec,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<(Vec<f32>, KernelCache)> {
        Self::check_kind(spec)?;
        let n = spec.tokens("KernelAttention::prefill", q, k, v)?;
        match self.dtype {
            DType::F32 => self.prefill_as::<f32>(spec, n, q, k, v),
            DType::F16 => self.prefill_as::<half::f16>(spec, n, q, k, v),
            DType::Bf16 => self.prefill_as::<half::bf16>(spec, n, q, k, v),
        }
    }

    fn decode_step(
        &self,
        spec: &AttentionSpec,
        cache: &mut KernelCache,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<Vec<f32>> {
        const F: &str = "KernelAttention::decode_step";
        Self::check_kind(spec)?;
        if spec.tokens(F, q, k, v)? != 1 {
            return Err(ModelError::InvalidInput {
                func: F,
                detail: format!("got {} elements; expected one token", q.len()),
            });
        }
        match self.dtype {
            DType::F32 => self.decode_as::<f32>(spec, cache, q, k, v),
            DType::F16 => self.decode_as::<half::f16>(spec, cache, q, k, v),
            DType::Bf16 => self.decode_as::<half::bf16>(spec, cache, q, k, v),
        }
    }
}
