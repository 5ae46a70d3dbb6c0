//! The transformer on candle: weights, the parallel forward (training and
//! prefill) and the token-by-token decode.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::kv_cache::KvCache;
use candle_nn::{Linear, VarBuilder};
use linattn_candle::{AttentionOptions, QkvLayout, State};
use linattn_reference::testing::Rng;

use crate::config::{AttentionKind, Config, VOCAB};
use crate::error::{ModelError, Result};

/// LayerNorm epsilon of every norm in the model (PyTorch's default).
pub const LN_EPS: f32 = 1e-5;

/// First capacity (tokens) of a softmax block's KV cache; it grows by as much
/// again whenever it is full (candle-nn's `KvCache`).
const KV_CHUNK: usize = 512;

/// How [`Model::random`] draws a tensor: `mean + std * N(0, 1)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Init {
    pub mean: f64,
    pub std: f64,
}

/// Which candle ops the forward uses. candle-nn's fused LayerNorm and
/// last-dimension softmax are faster but have no backward, so the forward
/// that training differentiates uses their composite forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Train,
    Infer,
}

#[derive(Debug, Clone)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        Ok(match mode {
            Mode::Train => candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, LN_EPS)?,
            Mode::Infer => candle_nn::ops::layer_norm(x, &self.weight, &self.bias, LN_EPS)?,
        })
    }
}

/// One pre-norm block: `x += out(attn(norm1(x))); x += fc2(gelu(fc1(norm2(x))))`.
#[derive(Debug, Clone)]
struct Block {
    norm1: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
}

/// A decoder-only transformer over byte tokens, on a candle [`Device`].
///
/// Token embedding plus sinusoidal positions, `layers` pre-norm blocks
/// (LayerNorm, causal attention, residual, LayerNorm, GELU MLP, residual), a
/// final LayerNorm and an output projection to [`VOCAB`] logits. Weights are
/// f32 tensors; see `docs/model.md` for the tensor names.
#[derive(Debug, Clone)]
pub struct Model {
    config: Config,
    device: Device,
    /// Every weight by name, in [`tensor_specs`] order.
    named: Vec<(String, Tensor)>,
    embed: Tensor,
    blocks: Vec<Block>,
    norm_f: Norm,
    head: Linear,
}

/// The decode cache of one block.
#[derive(Debug, Clone)]
pub enum Cache {
    /// Linear attention's fp32 state, `S [1, H, dh, dh]` and `z [1, H, dh]`:
    /// its size does not depend on the position.
    Linear(State),
    /// Softmax attention's keys and values, `[1, H, T, dh]` each: one more
    /// token per step.
    Softmax(KvCache),
}

impl Cache {
    /// Floats the cache holds for the tokens seen so far (shows constant vs
    /// growing memory).
    pub fn floats(&self) -> usize {
        match self {
            Cache::Linear(s) => s.s.elem_count() + s.z.elem_count(),
            Cache::Softmax(kv) => {
                let per_token = kv
                    .k_cache()
                    .all_data()
                    .as_ref()
                    .map_or(0, |t| t.elem_count() / kv.k_cache().max_seq_len().max(1));
                2 * kv.current_seq_len() * per_token
            }
        }
    }
}

/// The decode state of a sequence: one [`Cache`] per block and the position
/// of the next token.
#[derive(Debug, Clone)]
pub struct Session {
    caches: Vec<Cache>,
    position: usize,
}

impl Session {
    /// Tokens processed so far (the position the next token gets).
    pub fn position(&self) -> usize {
        self.position
    }

    /// The per-block caches.
    pub fn caches(&self) -> &[Cache] {
        &self.caches
    }
}

/// Names and shapes of every tensor, in a fixed order, with how to draw it.
pub(crate) fn tensor_specs(c: &Config) -> Vec<(String, Vec<usize>, Init)> {
    let (d, f) = (c.d_model, c.mlp);
    let fan = |n: usize| 1.0 / (n as f64).sqrt();
    // Residual branches are scaled down so the stream stays O(1) with depth.
    let resid = 1.0 / ((2 * c.layers) as f64).sqrt();
    let normal = |std| Init { mean: 0.0, std };
    // Gains and biases get a small random part so every tensor matters in
    // save/load tests (identical logits prove each one round-trips).
    let gain = Init {
        mean: 1.0,
        std: 0.05,
    };
    let bias = normal(0.05);
    let mut v = vec![("embed.weight".to_string(), vec![VOCAB, d], normal(1.0))];
    for i in 0..c.layers {
        let p = |s: &str| format!("blocks.{i}.{s}");
        v.push((p("norm1.weight"), vec![d], gain));
        v.push((p("norm1.bias"), vec![d], bias));
        v.push((p("attn.q.weight"), vec![d, d], normal(fan(d))));
        v.push((p("attn.k.weight"), vec![d, d], normal(fan(d))));
        v.push((p("attn.v.weight"), vec![d, d], normal(fan(d))));
        v.push((p("attn.out.weight"), vec![d, d], normal(fan(d) * resid)));
        v.push((p("norm2.weight"), vec![d], gain));
        v.push((p("norm2.bias"), vec![d], bias));
        v.push((p("mlp.fc1.weight"), vec![f, d], normal(fan(d))));
        v.push((p("mlp.fc1.bias"), vec![f], bias));
        v.push((p("mlp.fc2.weight"), vec![d, f], normal(fan(f) * resid)));
        v.push((p("mlp.fc2.bias"), vec![d], bias));
    }
    v.push(("norm_f.weight".into(), vec![d], gain));
    v.push(("norm_f.bias".into(), vec![d], bias));
    v.push(("head.weight".into(), vec![VOCAB, d], normal(fan(d))));
    v
}

/// Sinusoidal encodings of positions `start..start + n` as `[n, d]` f32:
/// `pe[p, 2i] = sin(p / 10000^(2i/d))`, `pe[p, 2i+1] = cos(same)` (Vaswani
/// et al. 2017), computed in f64 so far positions keep their precision.
pub fn positions(start: usize, n: usize, d: usize, device: &Device) -> Result<Tensor> {
    let mut pe = Vec::with_capacity(n * d);
    for pos in start..start + n {
        for j in 0..d {
            let freq = 10000f64.powf(-((j / 2 * 2) as f64) / d as f64);
            let angle = pos as f64 * freq;
            pe.push(if j % 2 == 0 { angle.sin() } else { angle.cos() } as f32);
        }
    }
    Ok(Tensor::from_vec(pe, (n, d), device)?)
}

fn in_block(layer: usize, e: ModelError) -> ModelError {
    ModelError::InBlock {
        layer,
        source: Box::new(e),
    }
}

impl Model {
    /// A model with deterministic random weights on the CPU: the same
    /// `config` and `seed` give bit-identical weights on every platform.
    pub fn random(config: Config, seed: u64) -> Result<Self> {
        Self::random_on(config, seed, &Device::Cpu)
    }

    /// [`Model::random`] on `device`.
    pub fn random_on(config: Config, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut rng = Rng::new(seed);
        let mut map = HashMap::new();
        for (name, shape, init) in tensor_specs(&config) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|_| (init.mean + init.std * rng.normal()) as f32)
                .collect();
            map.insert(name, Tensor::from_vec(data, shape, device)?);
        }
        Self::from_var_builder(config, VarBuilder::from_tensors(map, DType::F32, device))
    }

    /// Assembles a model from a candle [`VarBuilder`] holding every tensor of
    /// the configuration (names and shapes as in `docs/model.md`, f32). A `VarBuilder`
    /// over a `VarMap` gives a model whose weights are training variables.
    pub fn from_var_builder(config: Config, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let device = vb.device().clone();
        let mut named = Vec::new();
        for (name, shape, _) in tensor_specs(&config) {
            let t = vb.get(shape.clone(), &name).map_err(|e| {
                if vb.contains_tensor(&name) {
                    ModelError::Format(format!("tensor `{name}`: {e}"))
                } else {
                    ModelError::MissingTensor {
                        name: name.clone(),
                        expected: shape.clone(),
                    }
                }
            })?;
            named.push((name, t));
        }
        let get = |name: &str| -> Tensor {
            // Present: every name of tensor_specs was fetched above.
            named
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.clone())
                .expect("tensor fetched above")
        };
        let norm = |p: &str| Norm {
            weight: get(&format!("{p}.weight")),
            bias: get(&format!("{p}.bias")),
        };
        let lin = |p: &str, bias: bool| {
            Linear::new(
                get(&format!("{p}.weight")),
                bias.then(|| get(&format!("{p}.bias"))),
            )
        };
        let blocks = (0..config.layers)
            .map(|i| {
                let p = |s: &str| format!("blocks.{i}.{s}");
                Block {
                    norm1: norm(&p("norm1")),
                    q: lin(&p("attn.q"), false),
                    k: lin(&p("attn.k"), false),
                    v: lin(&p("attn.v"), false),
                    out: lin(&p("attn.out"), false),
                    norm2: norm(&p("norm2")),
                    fc1: lin(&p("mlp.fc1"), true),
                    fc2: lin(&p("mlp.fc2"), true),
                }
            })
            .collect();
        let embed = get("embed.weight");
        let norm_f = norm("norm_f");
        let head = lin("head", false);
        Ok(Model {
            config,
            device,
            named,
            embed,
            blocks,
            norm_f,
            head,
        })
    }

    /// Every tensor as (name, tensor), in the order of the weight file
    /// specification (`docs/model.md`).
    pub fn tensors(&self) -> &[(String, Tensor)] {
        &self.named
    }

    /// The model's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn attention_options(&self) -> AttentionOptions {
        AttentionOptions {
            feature_map: self.config.feature_map,
            ..AttentionOptions::default()
        }
    }

    /// Token ids as a `[rows, cols]` u32 tensor on the model's device.
    fn ids(&self, tokens: &[u8], rows: usize) -> Result<Tensor> {
        let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
        Ok(Tensor::from_vec(
            ids,
            (rows, tokens.len() / rows.max(1)),
            &self.device,
        )?)
    }

    /// `embed[tokens] + positions`, `[B, N, d]`, for `[B, N]` u32 ids
    /// starting at position `start`.
    fn embed(&self, ids: &Tensor, start: usize) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        let d = self.config.d_model;
        let x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, n, d))?;
        Ok(x.broadcast_add(&positions(start, n, d, &self.device)?)?)
    }

    fn check_ids(&self, func: &'static str, ids: &Tensor) -> Result<(usize, usize)> {
        let bad = |detail: String| ModelError::InvalidInput { func, detail };
        let (b, n) = ids
            .dims2()
            .map_err(|_| bad(format!("ids of shape {:?}; expected [B, N]", ids.dims())))?;
        if b == 0 || n == 0 {
            return Err(bad(format!(
                "ids of shape {:?}; expected at least one token",
                ids.dims()
            )));
        }
        if ids.dtype() != DType::U32 {
            return Err(bad(format!("ids of dtype {:?}; expected U32", ids.dtype())));
        }
        Ok((b, n))
    }

    /// Logits `[B, N, 256]` of the parallel causal forward over `[B, N]`
    /// u32 token ids (values below 256), differentiable in every weight:
    /// what training calls.
    ///
    /// Errors: [`ModelError::InvalidInput`] for ids of the wrong rank, dtype
    /// or an empty dimension.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, n) = self.check_ids("Model::forward", ids)?;
        let mut x = self.embed(ids, 0)?;
        for (i, block) in self.blocks.iter().enumerate() {
            x = self
                .block_parallel(block, &x, b, n, Mode::Train, None)
                .map_err(|e| in_block(i, e))?;
        }
        self.logits(&x, Mode::Train)
    }

    /// Logits of one sequence as `[n * 256]` f32 (row-major), by
    /// [`Model::forward`].
    pub fn forward_tokens(&self, tokens: &[u8]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(empty_prompt("Model::forward_tokens"));
        }
        let logits = self.forward(&self.ids(tokens, 1)?)?;
        Ok(logits.flatten_all()?.to_vec1()?)
    }

    /// The parallel causal forward over a prompt (at least one byte): its
    /// logits `[n * 256]` and the [`Session`] that continues it with
    /// [`Model::decode`].
    pub fn prefill(&self, tokens: &[u8]) -> Result<(Vec<f32>, Session)> {
        if tokens.is_empty() {
            return Err(empty_prompt("Model::prefill"));
        }
        let n = tokens.len();
        let mut x = self.embed(&self.ids(tokens, 1)?, 0)?;
        let mut caches = Vec::with_capacity(self.blocks.len());
        for (i, block) in self.blocks.iter().enumerate() {
            x = self
                .block_parallel(block, &x, 1, n, Mode::Infer, Some(&mut caches))
                .map_err(|e| in_block(i, e))?;
        }
        let logits = self.logits(&x, Mode::Infer)?.flatten_all()?.to_vec1()?;
        Ok((
            logits,
            Session {
                caches,
                position: n,
            },
        ))
    }

    /// Feeds one more token through every block: a state update of linear
    /// attention (constant cost) or one more row in the KV cache of softmax
    /// attention; returns its 256 logits.
    pub fn decode(&self, session: &mut Session, token: u8) -> Result<Vec<f32>> {
        if session.caches.len() != self.blocks.len() {
            return Err(ModelError::InvalidInput {
                func: "Model::decode",
                detail: format!(
                    "the session has {} block caches; this model has {} blocks",
                    session.caches.len(),
                    self.blocks.len()
                ),
            });
        }
        let d = self.config.d_model;
        let ids = Tensor::from_vec(vec![token as u32], 1, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?.add(&positions(
            session.position,
            1,
            d,
            &self.device,
        )?)?;
        for (i, (block, cache)) in self.blocks.iter().zip(&mut session.caches).enumerate() {
            x = self
                .block_decode(block, &x, cache)
                .map_err(|e| in_block(i, e))?;
        }
        session.position += 1;
        Ok(self.logits(&x, Mode::Infer)?.flatten_all()?.to_vec1()?)
    }

    fn logits(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        Ok(self.head.forward(&self.norm_f.forward(x, mode)?)?)
    }

    /// The MLP half of a block: `x + fc2(gelu(fc1(norm2(x))))`.
    fn mlp(&self, b: &Block, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let h = b.norm2.forward(x, mode)?;
        let u = b.fc1.forward(&h)?.gelu()?;
        Ok((x + b.fc2.forward(&u)?)?)
    }

    /// One block over `[B, N, d]`; with `caches`, pushes this block's decode
    /// cache (B = 1).
    fn block_parallel(
        &self,
        b: &Block,
        x: &Tensor,
        batch: usize,
        n: usize,
        mode: Mode,
        caches: Option<&mut Vec<Cache>>,
    ) -> Result<Tensor> {
        let (h, dh) = (self.config.heads, self.config.head_dim());
        let hx = b.norm1.forward(x, mode)?;
        let split =
            |l: &Linear| -> Result<Tensor> { Ok(l.forward(&hx)?.reshape((batch, n, h, dh))?) };
        let (q, k, v) = (split(&b.q)?, split(&b.k)?, split(&b.v)?);
        let o = match self.config.attention {
            AttentionKind::Linear => {
                let opts = self.attention_options();
                match caches {
                    None => {
                        linattn_candle::linear_attention(&q, &k, &v, QkvLayout::Bnhd, true, &opts)?
                    }
                    Some(c) => {
                        let (o, state) = linattn_candle::linear_attention_with_state(
                            &q,
                            &k,
                            &v,
                            QkvLayout::Bnhd,
                            true,
                            &opts,
                            None,
                        )?;
                        c.push(Cache::Linear(state));
                        o
                    }
                }
            }
            AttentionKind::Softmax => {
                // [B, H, N, dh], the layout of the scores' matmuls.
                let t = |x: Tensor| -> Result<Tensor> { Ok(x.transpose(1, 2)?.contiguous()?) };
                let (q, k, v) = (t(q)?, t(k)?, t(v)?);
                let o = softmax_attention(&q, &k, &v, n, mode, &self.device)?;
                if let Some(c) = caches {
                    let mut kv = KvCache::new(2, n.max(KV_CHUNK));
                    kv.append(&k, &v)?;
                    c.push(Cache::Softmax(kv));
                }
                o.transpose(1, 2)?
            }
        };
        let o = o.reshape((batch, n, h * dh))?;
        let x = (x + b.out.forward(&o)?)?;
        self.mlp(b, &x, mode)
    }

    /// One block over one token `[1, d]`, advancing its cache.
    fn block_decode(&self, b: &Block, x: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let (h, dh) = (self.config.heads, self.config.head_dim());
        let hx = b.norm1.forward(x, Mode::Infer)?;
        let (q, k, v) = (b.q.forward(&hx)?, b.k.forward(&hx)?, b.v.forward(&hx)?);
        let o = match (self.config.attention, cache) {
            (AttentionKind::Linear, Cache::Linear(state)) => {
                let r = |x: Tensor| x.reshape((1, h, dh));
                let (o, next) = linattn_candle::decode_step(
                    &r(q)?,
                    &r(k)?,
                    &r(v)?,
                    state,
                    &self.attention_options(),
                )?;
                *state = next;
                o
            }
            (AttentionKind::Softmax, Cache::Softmax(kv)) => {
                // One token: [1, d] is [1, H, 1, dh] in memory.
                let r = |x: Tensor| x.reshape((1, h, 1, dh));
                let (k_all, v_all) = kv.append(&r(k)?.contiguous()?, &r(v)?.contiguous()?)?;
                let scale = 1.0 / (dh as f64).sqrt();
                let s = (r(q)?.matmul(&k_all.t()?)? * scale)?;
                candle_nn::ops::softmax_last_dim(&s)?.matmul(&v_all)?
            }
            (kind, _) => {
                return Err(ModelError::InvalidInput {
                    func: "Model::decode",
                    detail: format!("the session's cache does not belong to {kind} attention"),
                })
            }
        };
        let x = (x + b.out.forward(&o.reshape((1, h * dh))?)?)?;
        self.mlp(b, &x, Mode::Infer)
    }
}

/// Causal softmax attention over `[B, H, N, dh]`:
/// `softmax(q k^T / sqrt(dh) + mask) v`, mask `-inf` above the diagonal.
fn softmax_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    n: usize,
    mode: Mode,
    device: &Device,
) -> Result<Tensor> {
    let dh = q.dim(D::Minus1)?;
    let mask: Vec<f32> = (0..n * n)
        .map(|i| {
            if i % n > i / n {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (n, n), device)?;
    let s = (q.matmul(&k.t()?)? * (1.0 / (dh as f64).sqrt()))?.broadcast_add(&mask)?;
    let p = match mode {
        Mode::Train => candle_nn::ops::softmax(&s, D::Minus1)?,
        Mode::Infer => candle_nn::ops::softmax_last_dim(&s)?,
    };
    Ok(p.matmul(v)?)
}

fn empty_prompt(func: &'static str) -> ModelError {
    ModelError::InvalidInput {
        func,
        detail: "no tokens; expected a prompt of at least one byte".into(),
    }
}
