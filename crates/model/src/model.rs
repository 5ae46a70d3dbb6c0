//! The transformer: weights, the parallel forward (prefill) and the
//! token-by-token decode, one code path over any [`AttentionBackend`].

use linattn_reference::testing::Rng;

use crate::attention::{AttentionBackend, AttentionSpec};
use crate::config::{Config, VOCAB};
use crate::error::{ModelError, Result};
use crate::math::{add_position, gelu, LayerNorm, Linear};

/// How [`Model::random`] draws a tensor: `mean + std * N(0, 1)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Init {
    pub mean: f64,
    pub std: f64,
}

/// One pre-norm block: `x += attn(norm1(x)); x += mlp(norm2(x))`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Block {
    pub norm1: LayerNorm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub out: Linear,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
}

/// A decoder-only transformer over byte tokens.
///
/// Token embedding plus sinusoidal positions, `layers` pre-norm blocks
/// (LayerNorm, causal attention, residual, LayerNorm, GELU MLP, residual), a
/// final LayerNorm and an output projection to [`VOCAB`] logits. Weights are
/// f32; see `docs/model.md` for the tensor names.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub(crate) config: Config,
    pub(crate) embed: Vec<f32>,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm_f: LayerNorm,
    pub(crate) head: Linear,
}

/// The decode state of a sequence: one backend cache per block and the
/// position of the next token.
#[derive(Debug, Clone)]
pub struct Session<C> {
    caches: Vec<C>,
    position: usize,
}

impl<C> Session<C> {
    /// Tokens processed so far (the position the next token gets).
    pub fn position(&self) -> usize {
        self.position
    }

    /// The per-block caches.
    pub fn caches(&self) -> &[C] {
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

impl Model {
    /// A model with deterministic random weights: the same `config` and
    /// `seed` give bit-identical weights on every platform.
    pub fn random(config: Config, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = Rng::new(seed);
        Self::build(config, |_, shape, init| {
            let n: usize = shape.iter().product();
            Ok((0..n)
                .map(|_| (init.mean + init.std * rng.normal()) as f32)
                .collect())
        })
    }

    /// Assembles a model, asking `take(name, shape, init)` for each tensor in
    /// [`tensor_specs`] order; `take` returns exactly `shape.product()` values.
    pub(crate) fn build(
        config: Config,
        mut take: impl FnMut(&str, &[usize], Init) -> Result<Vec<f32>>,
    ) -> Result<Self> {
        config.validate()?;
        let mut tensors = tensor_specs(&config)
            .into_iter()
            .map(|(name, shape, init)| {
                let data = take(&name, &shape, init)?;
                let want: usize = shape.iter().product();
                if data.len() != want {
                    return Err(ModelError::TensorShape {
                        name,
                        expected: shape,
                        found: vec![data.len()],
                    });
                }
                Ok((data, shape))
            });
        let mut next = || -> Result<(Vec<f32>, Vec<usize>)> {
            tensors.next().unwrap_or_else(|| {
                Err(ModelError::InvalidInput {
                    func: "Model::build",
                    detail: "tensor list shorter than the model".into(),
                })
            })
        };
        let embed = next()?.0;
        let mut blocks = Vec::with_capacity(config.layers);
        for _ in 0..config.layers {
            let norm1 = norm(&mut next)?;
            let q = linear(&mut next, false)?;
            let k = linear(&mut next, false)?;
            let v = linear(&mut next, false)?;
            let out = linear(&mut next, false)?;
            let norm2 = norm(&mut next)?;
            let fc1 = linear(&mut next, true)?;
            let fc2 = linear(&mut next, true)?;
            blocks.push(Block {
                norm1,
                q,
                k,
                v,
                out,
                norm2,
                fc1,
                fc2,
            });
        }
        let norm_f = norm(&mut next)?;
        let head = linear(&mut next, false)?;
        Ok(Model {
            config,
            embed,
            blocks,
            norm_f,
            head,
        })
    }

    /// Every tensor as (name, shape, data), in the order of the weight file
    /// specification (`docs/model.md`).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        let mut data: Vec<&[f32]> = vec![&self.embed];
        fn lin(l: &Linear) -> Vec<&[f32]> {
            let mut v: Vec<&[f32]> = vec![&l.w];
            v.extend(l.b.as_deref());
            v
        }
        for b in &self.blocks {
            data.extend([&b.norm1.gain[..], &b.norm1.bias[..]]);
            for l in [&b.q, &b.k, &b.v, &b.out] {
                data.extend(lin(l));
            }
            data.extend([&b.norm2.gain[..], &b.norm2.bias[..]]);
            data.extend(lin(&b.fc1));
            data.extend(lin(&b.fc2));
        }
        data.extend([&self.norm_f.gain[..], &self.norm_f.bias[..]]);
        data.extend(lin(&self.head));
        tensor_specs(&self.config)
            .into_iter()
            .zip(data)
            .map(|((name, shape, _), d)| (name, shape, d))
            .collect()
    }

    /// The model's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// What each block's attention call looks like.
    pub fn attention_spec(&self) -> AttentionSpec {
        AttentionSpec {
            kind: self.config.attention,
            heads: self.config.heads,
            head_dim: self.config.head_dim(),
            feature_map: self.config.feature_map,
        }
    }

    /// Logits `[tokens.len(), 256]` (row-major) of the parallel causal forward.
    pub fn forward<B: AttentionBackend>(&self, backend: &B, tokens: &[u8]) -> Result<Vec<f32>> {
        Ok(self.prefill(backend, tokens)?.0)
    }

    /// The parallel causal forward over a prompt: its logits `[n, 256]` and
    /// the [`Session`] that continues it with [`Model::decode`].
    pub fn prefill<B: AttentionBackend>(
        &self,
        backend: &B,
        tokens: &[u8],
    ) -> Result<(Vec<f32>, Session<B::Cache>)> {
        if tokens.is_empty() {
            return Err(ModelError::InvalidInput {
                func: "Model::prefill",
                detail: "no tokens; expected a prompt of at least one byte".into(),
            });
        }
        let spec = self.attention_spec();
        let n = tokens.len();
        let mut x = self.embed_tokens(tokens, 0);
        let mut caches = Vec::with_capacity(self.blocks.len());
        for (i, block) in self.blocks.iter().enumerate() {
            self.block_forward(block, &mut x, n, |q, k, v| {
                let (o, cache) = backend.prefill(&spec, q, k, v)?;
                caches.push(cache);
                Ok(o)
            })
            .map_err(|e| in_block(i, e))?;
        }
        let logits = self.logits(&x, n);
        Ok((
            logits,
            Session {
                caches,
                position: n,
            },
        ))
    }

    /// Feeds one more token through every block in RNN mode (linear) or
    /// against the KV cache (softmax); returns its 256 logits.
    pub fn decode<B: AttentionBackend>(
        &self,
        backend: &B,
        session: &mut Session<B::Cache>,
        token: u8,
    ) -> Result<Vec<f32>> {
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
        let spec = self.attention_spec();
        let mut x = self.embed_tokens(&[token], session.position);
        for (i, (block, cache)) in self.blocks.iter().zip(&mut session.caches).enumerate() {
            self.block_forward(block, &mut x, 1, |q, k, v| {
                backend.decode_step(&spec, cache, q, k, v)
            })
            .map_err(|e| in_block(i, e))?;
        }
        session.position += 1;
        Ok(self.logits(&x, 1))
    }

    fn embed_tokens(&self, tokens: &[u8], start: usize) -> Vec<f32> {
        let d = self.config.d_model;
        let mut x = Vec::with_capacity(tokens.len() * d);
        for (i, &t) in tokens.iter().enumerate() {
            let row = &self.embed[t as usize * d..(t as usize + 1) * d];
            x.extend_from_slice(row);
            add_position(&mut x[i * d..], start + i);
        }
        x
    }

    /// `x += attn(norm1(x)); x += fc2(gelu(fc1(norm2(x))))` over n rows.
    fn block_forward(
        &self,
        b: &Block,
        x: &mut [f32],
        n: usize,
        attn: impl FnOnce(&[f32], &[f32], &[f32]) -> Result<Vec<f32>>,
    ) -> Result<()> {
        let (d, f) = (self.config.d_model, self.config.mlp);
        let mut h = vec![0.0f32; n * d];
        b.norm1.forward(x, &mut h);
        let (mut q, mut k, mut v) = (vec![0.0f32; n * d], vec![0.0f32; n * d], vec![0.0; n * d]);
        b.q.forward(&h, n, &mut q);
        b.k.forward(&h, n, &mut k);
        b.v.forward(&h, n, &mut v);
        let o = attn(&q, &k, &v)?;
        if o.len() != n * d {
            return Err(ModelError::InvalidInput {
                func: "AttentionBackend",
                detail: format!("returned {} elements; expected {}", o.len(), n * d),
            });
        }
        b.out.forward(&o, n, &mut h);
        x.iter_mut().zip(&h).for_each(|(x, y)| *x += y);
        b.norm2.forward(x, &mut h);
        let mut u = vec![0.0f32; n * f];
        b.fc1.forward(&h, n, &mut u);
        u.iter_mut().for_each(|u| *u = gelu(*u));
        b.fc2.forward(&u, n, &mut h);
        x.iter_mut().zip(&h).for_each(|(x, y)| *x += y);
        Ok(())
    }

    fn logits(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut h = vec![0.0f32; n * self.config.d_model];
        self.norm_f.forward(x, &mut h);
        let mut out = vec![0.0f32; n * VOCAB];
        self.head.forward(&h, n, &mut out);
        out
    }
}

fn norm(next: &mut impl FnMut() -> Result<(Vec<f32>, Vec<usize>)>) -> Result<LayerNorm> {
    let gain = next()?.0;
    let bias = next()?.0;
    Ok(LayerNorm { gain, bias })
}

fn linear(next: &mut impl FnMut() -> Result<(Vec<f32>, Vec<usize>)>, bias: bool) -> Result<Linear> {
    let (w, shape) = next()?;
    let b = if bias { Some(next()?.0) } else { None };
    Ok(Linear {
        w,
        b,
        d_in: shape[1],
        d_out: shape[0],
    })
}

fn in_block(layer: usize, e: ModelError) -> ModelError {
    ModelError::InBlock {
        layer,
        source: Box::new(e),
    }
}
