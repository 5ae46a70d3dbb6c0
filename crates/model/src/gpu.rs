//! The device-resident model: every step of the forward on a
//! [`linattn_kernels::Device`]. Weights, activations, linear-attention states
//! and KV caches live in device memory; only the token ids go up and the
//! logits come back.
//!
//! - Embedding + positions, LayerNorm, bias + GELU and residual adds:
//!   `model_ops.cu` (`linattn_kernels::ops::model_ops`).
//! - Attention: the project's linear-attention kernels (causal forward with
//!   final states for the prefill, the decode-step kernel per token) or the
//!   softmax baseline (`softmax_attention.cu`, prefill plus KV-cache decode).
//! - Projections: cuBLAS SGEMM through cudarc on a GPU; when the device is
//!   the CPU emulator (host memory) the CPU model's own GEMM, so the same
//!   code path runs in `cargo test` without a GPU.

use std::fmt;

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use linattn_kernels::ops::model_ops::{add_residual, bias_gelu, embed_positions, layer_norm, Rows};
use linattn_kernels::ops::softmax::{
    softmax_decode_step, softmax_prefill, CacheShape, SoftmaxShape,
};
use linattn_kernels::{causal_forward, AttentionOptions, AttentionShape, Qkv, StateIo, StateMut};
use linattn_kernels::{decode_step, DecodeShape};
use linattn_kernels::{Buffer, Device};
use linattn_reference::testing::Rng;

use crate::attention::AttentionSpec;
use crate::config::{AttentionKind, Config, VOCAB};
use crate::error::{ModelError, Result};
use crate::generate::Sampling;
use crate::kernels::KernelAttention;
use crate::math::{project, LN_EPS};
use crate::model::Model;

/// Smallest KV-cache capacity in tokens; a prefill reserves the prompt length
/// rounded up to a power of two, and a full cache doubles.
const KV_MIN_CAPACITY: usize = 16;

struct Blas(CudaBlas);

impl fmt::Debug for Blas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("cuBLAS handle")
    }
}

#[derive(Debug)]
struct Weight {
    w: Buffer<f32>,
    d_in: usize,
    d_out: usize,
}

#[derive(Debug)]
struct GpuBlock {
    norm1: (Buffer<f32>, Buffer<f32>),
    q: Weight,
    k: Weight,
    v: Weight,
    out: Weight,
    norm2: (Buffer<f32>, Buffer<f32>),
    fc1: Weight,
    fc1_b: Buffer<f32>,
    fc2: Weight,
    fc2_b: Buffer<f32>,
}

/// A [`Model`] uploaded to a [`Device`], running its whole forward there.
///
/// Same logits as the CPU model (to f32 rounding): `tests/gpu_path_emulator.rs`
/// checks prefill and decode against [`Model::prefill`]/[`Model::decode`] on
/// the CPU emulator, for linear and softmax attention.
#[derive(Debug)]
pub struct GpuModel {
    device: Device,
    config: Config,
    blas: Option<Blas>,
    embed: Buffer<f32>,
    blocks: Vec<GpuBlock>,
    norm_f: (Buffer<f32>, Buffer<f32>),
    head: Weight,
}

/// Per-block decode state of a [`GpuModel`], in device memory.
#[derive(Debug)]
enum GpuCache {
    /// fp32 (S, z) per head.
    Linear { s: Buffer<f32>, z: Buffer<f32> },
    /// Keys and values, token-major `[capacity, heads, d_head]`.
    Softmax {
        k: Buffer<f32>,
        v: Buffer<f32>,
        capacity: usize,
    },
}

/// The decode state of a sequence on a [`GpuModel`]: one device cache per
/// block and the position of the next token.
#[derive(Debug)]
pub struct GpuSession {
    caches: Vec<GpuCache>,
    position: usize,
}

impl GpuSession {
    /// Tokens processed so far (the position the next token gets).
    pub fn position(&self) -> usize {
        self.position
    }
}

/// A cuBLAS handle on `stream`, or why there is none; a missing library is
/// an error, not a panic (cudarc's dynamic loader panics when the library
/// cannot be opened). [`crate::gpu_device`] probes it too, so `auto` falls
/// back to the CPU on a GPU machine without cuBLAS.
pub(crate) fn open_cublas(
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
) -> std::result::Result<CudaBlas, String> {
    // SAFETY: only tries to dlopen the cuBLAS library.
    let present = std::panic::catch_unwind(|| unsafe { cudarc::cublas::sys::is_culib_present() })
        .unwrap_or(false);
    if !present {
        return Err(
            "cuBLAS could not be loaded (libcublas not found); the GPU model path needs it for the projections".into(),
        );
    }
    let stream = stream.clone();
    match std::panic::catch_unwind(move || CudaBlas::new(stream)) {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => Err(format!("cuBLAS could not be initialised ({e})")),
        Err(_) => Err("cuBLAS could not be loaded".into()),
    }
}

fn in_block(layer: usize, e: ModelError) -> ModelError {
    ModelError::InBlock {
        layer,
        source: Box::new(e),
    }
}

impl GpuModel {
    /// Uploads `model`'s weights to `device`. On a GPU this also creates the
    /// cuBLAS handle (cuBLAS is loaded at run time; a missing library is a
    /// [`ModelError::BackendUnavailable`]).
    pub fn new(model: &Model, device: Device) -> Result<Self> {
        let blas = match &device {
            Device::Gpu(g) => Some(Blas(open_cublas(g.stream()).map_err(|reason| {
                ModelError::BackendUnavailable {
                    backend: "gpu".into(),
                    reason,
                }
            })?)),
            #[allow(unreachable_patterns)]
            _ => None,
        };
        let up = |x: &[f32]| -> Result<Buffer<f32>> { Ok(device.upload(x)?) };
        let weight = |l: &crate::math::Linear| -> Result<Weight> {
            Ok(Weight {
                w: up(&l.w)?,
                d_in: l.d_in,
                d_out: l.d_out,
            })
        };
        let bias = |l: &crate::math::Linear| -> Result<Buffer<f32>> {
            match &l.b {
                Some(b) => up(b),
                None => Err(ModelError::InvalidInput {
                    func: "GpuModel::new",
                    detail: "an MLP layer has no bias".into(),
                }),
            }
        };
        let mut blocks = Vec::with_capacity(model.blocks.len());
        for b in &model.blocks {
            blocks.push(GpuBlock {
                norm1: (up(&b.norm1.gain)?, up(&b.norm1.bias)?),
                q: weight(&b.q)?,
                k: weight(&b.k)?,
                v: weight(&b.v)?,
                out: weight(&b.out)?,
                norm2: (up(&b.norm2.gain)?, up(&b.norm2.bias)?),
                fc1: weight(&b.fc1)?,
                fc1_b: bias(&b.fc1)?,
                fc2: weight(&b.fc2)?,
                fc2_b: bias(&b.fc2)?,
            });
        }
        Ok(GpuModel {
            config: model.config,
            blas,
            embed: up(&model.embed)?,
            blocks,
            norm_f: (up(&model.norm_f.gain)?, up(&model.norm_f.bias)?),
            head: weight(&model.head)?,
            device,
        })
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A short description for logs.
    pub fn describe(&self) -> String {
        let proj = if self.blas.is_some() {
            "cuBLAS"
        } else {
            "CPU GEMM"
        };
        format!(
            "{} (device-resident model, {proj} projections)",
            self.device.describe()
        )
    }

    /// Logits `[tokens.len(), 256]` of the parallel causal forward.
    pub fn forward(&self, tokens: &[u8]) -> Result<Vec<f32>> {
        Ok(self.prefill(tokens)?.0)
    }

    /// The parallel causal forward over a prompt: its logits `[n, 256]` and
    /// the session that continues it with [`GpuModel::decode`].
    pub fn prefill(&self, tokens: &[u8]) -> Result<(Vec<f32>, GpuSession)> {
        if tokens.is_empty() {
            return Err(ModelError::InvalidInput {
                func: "GpuModel::prefill",
                detail: "no tokens; expected a prompt of at least one byte".into(),
            });
        }
        let n = tokens.len();
        let mut x = self.embed(tokens, 0)?;
        let mut caches = Vec::with_capacity(self.blocks.len());
        for (i, b) in self.blocks.iter().enumerate() {
            let cache = self
                .block(b, &mut x, n, None, 0)
                .map_err(|e| in_block(i, e))?;
            caches.push(cache.ok_or_else(|| {
                in_block(
                    i,
                    ModelError::InvalidInput {
                        func: "GpuModel::prefill",
                        detail: "attention returned no cache".into(),
                    },
                )
            })?);
        }
        let logits = self.logits(&x, n)?;
        Ok((
            logits,
            GpuSession {
                caches,
                position: n,
            },
        ))
    }

    /// Feeds one more token through every block; returns its 256 logits.
    pub fn decode(&self, session: &mut GpuSession, token: u8) -> Result<Vec<f32>> {
        if session.caches.len() != self.blocks.len() {
            return Err(ModelError::InvalidInput {
                func: "GpuModel::decode",
                detail: format!(
                    "the session has {} block caches; this model has {} blocks",
                    session.caches.len(),
                    self.blocks.len()
                ),
            });
        }
        let pos = session.position;
        let mut x = self.embed(&[token], pos)?;
        for (i, (b, cache)) in self.blocks.iter().zip(&mut session.caches).enumerate() {
            self.block(b, &mut x, 1, Some(cache), pos)
                .map_err(|e| in_block(i, e))?;
        }
        session.position += 1;
        self.logits(&x, 1)
    }

    /// Prefills `prompt`, then samples and feeds back `max_tokens` tokens
    /// (the device counterpart of [`Model::generate`]); returns the new bytes.
    pub fn generate(
        self,
        prompt: &[u8],
        max_tokens: usize,
        sampling: Sampling,
        seed: u64,
    ) -> Result<Vec<u8>> {
        let mut g = GpuGenerator::new(self, prompt, sampling, seed)?;
        (0..max_tokens).map(|_| g.next_token()).collect()
    }

    fn zeros(&self, n: usize) -> Result<Buffer<f32>> {
        Ok(self.device.upload(&vec![0.0f32; n])?)
    }

    fn embed(&self, tokens: &[u8], start: usize) -> Result<Buffer<f32>> {
        let d = self.config.d_model;
        let mut x = self.zeros(tokens.len() * d)?;
        let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
        embed_positions(&self.device, &ids, &self.embed, VOCAB, &mut x, d, start)?;
        Ok(x)
    }

    /// `out[..n * d_out] = x[n, d_in] W^T`.
    fn project(&self, x: &Buffer<f32>, n: usize, w: &Weight, out: &mut Buffer<f32>) -> Result<()> {
        let (k, m) = (w.d_in, w.d_out);
        if x.len() < n * k || out.len() < n * m || w.w.len() != m * k {
            return Err(ModelError::InvalidInput {
                func: "GpuModel::project",
                detail: format!(
                    "buffers of {}, {}, {} elements for a [{n} x {k}] x [{m} x {k}]^T product",
                    x.len(),
                    w.w.len(),
                    out.len()
                ),
            });
        }
        match (x, &w.w, out, &self.blas) {
            (Buffer::Host(x), Buffer::Host(wh), Buffer::Host(o), _) => {
                project(wh, k, m, x, n, o);
                Ok(())
            }
            (Buffer::Cuda(x), Buffer::Cuda(wc), Buffer::Cuda(o), Some(blas)) => {
                // Row-major out[n, m] = x[n, k] W^T is column-major
                // out^T[m, n] = (W^T)^T x^T: A = W^T (k x m, ld k) transposed,
                // B = x^T (k x n, ld k), C = out^T (m x n, ld m).
                let int = |v: usize| i32::try_from(v).ok();
                let (Some(mi), Some(ni), Some(ki)) = (int(m), int(n), int(k)) else {
                    return Err(ModelError::InvalidInput {
                        func: "GpuModel::project",
                        detail: format!(
                            "[{n} x {k}] x [{m} x {k}]^T exceeds cuBLAS's 32-bit sizes"
                        ),
                    });
                };
                let cfg = GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_T,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: mi,
                    n: ni,
                    k: ki,
                    alpha: 1.0f32,
                    lda: ki,
                    ldb: ki,
                    beta: 0.0f32,
                    ldc: mi,
                };
                // SAFETY: all three are device memory of this model's stream,
                // and the lengths were checked above against m, n, k.
                unsafe { blas.0.gemm(cfg, wc, x, o) }.map_err(|e| {
                    ModelError::Kernels(linattn_kernels::Error::Driver {
                        context: "cublasSgemm".into(),
                        message: e.to_string(),
                    })
                })
            }
            _ => Err(ModelError::InvalidInput {
                func: "GpuModel::project",
                detail: "buffers on different kinds of memory (or no cuBLAS handle)".into(),
            }),
        }
    }

    /// One block over `n` rows of `x`. `cache` is None for a prefill (the
    /// new cache is returned) and the block's cache for a decode step at
    /// position `pos` (n = 1).
    fn block(
        &self,
        b: &GpuBlock,
        x: &mut Buffer<f32>,
        n: usize,
        cache: Option<&mut GpuCache>,
        pos: usize,
    ) -> Result<Option<GpuCache>> {
        let (d, f) = (self.config.d_model, self.config.mlp);
        let (heads, dh) = (self.config.heads, self.config.head_dim());
        let rows = Rows::new(n, d);
        let dev = &self.device;
        let mut h = self.zeros(n * d)?;
        layer_norm(dev, x, &mut h, &b.norm1.0, &b.norm1.1, &rows, LN_EPS)?;
        let mut q = self.zeros(n * d)?;
        self.project(&h, n, &b.q, &mut q)?;
        let mut o = self.zeros(n * d)?;
        let new_cache = match (self.config.attention, cache) {
            (AttentionKind::Linear, None) => {
                let (mut k, mut v) = (self.zeros(n * d)?, self.zeros(n * d)?);
                self.project(&h, n, &b.k, &mut k)?;
                self.project(&h, n, &b.v, &mut v)?;
                let mut s = self.zeros(heads * dh * dh)?;
                let mut z = self.zeros(heads * dh)?;
                causal_forward(
                    dev,
                    Qkv {
                        q: &q,
                        k: &k,
                        v: &v,
                    },
                    &mut o,
                    &AttentionShape::bnhd(1, heads, n, dh, dh),
                    None,
                    &self.linear_options(),
                    StateIo::final_only(StateMut {
                        s: &mut s,
                        z: &mut z,
                    }),
                )?;
                Some(GpuCache::Linear { s, z })
            }
            (AttentionKind::Linear, Some(GpuCache::Linear { s, z })) => {
                let (mut k, mut v) = (self.zeros(d)?, self.zeros(d)?);
                self.project(&h, 1, &b.k, &mut k)?;
                self.project(&h, 1, &b.v, &mut v)?;
                decode_step(
                    dev,
                    Qkv {
                        q: &q,
                        k: &k,
                        v: &v,
                    },
                    &mut o,
                    s,
                    z,
                    &DecodeShape::contiguous(1, heads, dh, dh),
                    &self.linear_options(),
                )?;
                None
            }
            (AttentionKind::Softmax, None) => {
                // The prompt's keys and values are the cache's first n tokens.
                let capacity = n.next_power_of_two().max(KV_MIN_CAPACITY);
                let (mut k, mut v) = (self.zeros(capacity * d)?, self.zeros(capacity * d)?);
                self.project(&h, n, &b.k, &mut k)?;
                self.project(&h, n, &b.v, &mut v)?;
                softmax_prefill(
                    dev,
                    &q,
                    &k,
                    &v,
                    &mut o,
                    &SoftmaxShape::bnhd(1, heads, n, dh, dh),
                    true,
                    None,
                )?;
                Some(GpuCache::Softmax { k, v, capacity })
            }
            (
                AttentionKind::Softmax,
                Some(GpuCache::Softmax {
                    k: kc,
                    v: vc,
                    capacity,
                }),
            ) => {
                if pos >= *capacity {
                    let grown = (*capacity * 2).max(pos + 1);
                    *kc = self.grow(kc, pos * d, grown * d)?;
                    *vc = self.grow(vc, pos * d, grown * d)?;
                    *capacity = grown;
                }
                let (mut k, mut v) = (self.zeros(d)?, self.zeros(d)?);
                self.project(&h, 1, &b.k, &mut k)?;
                self.project(&h, 1, &b.v, &mut v)?;
                let shape = CacheShape {
                    batch: 1,
                    heads,
                    d: dh,
                    capacity: *capacity,
                };
                softmax_decode_step(dev, &q, &k, &v, &mut o, kc, vc, &shape, pos, None)?;
                None
            }
            (kind, Some(_)) => {
                return Err(ModelError::InvalidInput {
                    func: "GpuModel::decode",
                    detail: format!("the cache does not belong to {kind} attention"),
                })
            }
        };
        self.project(&o, n, &b.out, &mut h)?;
        add_residual(dev, x, &h, None, &rows)?;
        layer_norm(dev, x, &mut h, &b.norm2.0, &b.norm2.1, &rows, LN_EPS)?;
        let mut u = self.zeros(n * f)?;
        self.project(&h, n, &b.fc1, &mut u)?;
        bias_gelu(dev, &mut u, &b.fc1_b, &Rows::new(n, f))?;
        self.project(&u, n, &b.fc2, &mut h)?;
        add_residual(dev, x, &h, Some(&b.fc2_b), &rows)?;
        Ok(new_cache)
    }

    /// A longer copy of a cache buffer whose first `used` elements matter.
    fn grow(&self, buf: &Buffer<f32>, used: usize, len: usize) -> Result<Buffer<f32>> {
        let mut host = self.device.download(buf)?;
        host.truncate(used);
        host.resize(len, 0.0);
        Ok(self.device.upload(&host)?)
    }

    fn linear_options(&self) -> AttentionOptions {
        KernelAttention::options(&AttentionSpec {
            kind: self.config.attention,
            heads: self.config.heads,
            head_dim: self.config.head_dim(),
            feature_map: self.config.feature_map,
        })
    }

    fn logits(&self, x: &Buffer<f32>, n: usize) -> Result<Vec<f32>> {
        let d = self.config.d_model;
        let mut h = self.zeros(n * d)?;
        layer_norm(
            &self.device,
            x,
            &mut h,
            &self.norm_f.0,
            &self.norm_f.1,
            &Rows::new(n, d),
            LN_EPS,
        )?;
        let mut out = self.zeros(n * VOCAB)?;
        self.project(&h, n, &self.head, &mut out)?;
        Ok(self.device.download(&out)?)
    }
}

/// Token-by-token generation on a [`GpuModel`], the device counterpart of
/// [`crate::Generator`]: same sampling, same RNG stream for the same seed.
#[derive(Debug)]
pub struct GpuGenerator {
    model: GpuModel,
    session: GpuSession,
    logits: Vec<f32>,
    pending: Option<u8>,
    sampling: Sampling,
    rng: Rng,
}

impl GpuGenerator {
    /// Prefills `prompt` (at least one byte) on `model`.
    pub fn new(model: GpuModel, prompt: &[u8], sampling: Sampling, seed: u64) -> Result<Self> {
        sampling.check()?;
        let (logits, session) = model.prefill(prompt)?;
        let last = logits[logits.len() - VOCAB..].to_vec();
        Ok(GpuGenerator {
            model,
            session,
            logits: last,
            pending: None,
            sampling,
            rng: Rng::new(seed),
        })
    }

    /// Decodes the previous token (if any) and samples the next one.
    pub fn next_token(&mut self) -> Result<u8> {
        if let Some(t) = self.pending.take() {
            self.logits = self.model.decode(&mut self.session, t)?;
        }
        let t = self.sampling.sample(&self.logits, &mut self.rng)?;
        self.pending = Some(t);
        Ok(t)
    }

    /// Tokens the model has processed (prompt plus decoded ones).
    pub fn position(&self) -> usize {
        self.session.position()
    }
}
