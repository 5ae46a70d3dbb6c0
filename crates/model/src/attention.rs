//! The attention op behind a small trait, so one model code path runs on any
//! backend, and its CPU implementation over `linattn-reference`.

use linattn_reference::{
    causal_linear_attention, decode, softmax_attention, FeatureMap, KvCache, Layout,
    LinearAttentionOptions, State, View,
};

use crate::config::AttentionKind;
use crate::error::{ModelError, Result};

/// What one block's attention call is: kind, head count and size, feature map.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionSpec {
    /// Linear or softmax.
    pub kind: AttentionKind,
    /// Number of heads H.
    pub heads: usize,
    /// Per-head size (queries, keys and values all use it).
    pub head_dim: usize,
    /// phi, for linear attention.
    pub feature_map: FeatureMap,
}

impl AttentionSpec {
    /// Options of linear attention used by the model: the spec's feature map,
    /// normalised, eps 1e-6, scale 1 (the paper's choices).
    pub fn linear_options(&self) -> LinearAttentionOptions {
        LinearAttentionOptions {
            feature_map: self.feature_map,
            ..LinearAttentionOptions::default()
        }
    }

    /// Elements per token of q, k, v and o: `heads * head_dim`.
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Checks that q, k, v hold the same whole number of tokens; returns it.
    pub fn tokens(&self, func: &'static str, q: &[f32], k: &[f32], v: &[f32]) -> Result<usize> {
        let w = self.width();
        if w == 0 || q.len() % w != 0 || k.len() != q.len() || v.len() != q.len() {
            return Err(ModelError::InvalidInput {
                func,
                detail: format!(
                    "q, k, v have {}, {}, {} elements; expected the same multiple of heads * head_dim = {w}",
                    q.len(),
                    k.len(),
                    v.len()
                ),
            });
        }
        Ok(q.len() / w)
    }
}

/// Causal attention for a single sequence, in two phases: a parallel prefill
/// over the prompt that returns the decode cache, then one token at a time.
///
/// All buffers are f32, token-major `[tokens, heads, head_dim]` (what the
/// projections produce and consume). Implementations: [`CpuAttention`]
/// (the reference crate); a kernel-backed one over `linattn_kernels::Device`
/// joins it once the forward attention kernels exist.
pub trait AttentionBackend {
    /// Per-block decode state: the (S, z) states of linear attention or the
    /// KV cache of softmax attention.
    type Cache;

    /// A short description for logs ("CPU (reference)").
    fn name(&self) -> String;

    /// Causal attention over `n` tokens; returns the output `[n, heads,
    /// head_dim]` and the cache that continues after the last token.
    fn prefill(
        &self,
        spec: &AttentionSpec,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<(Vec<f32>, Self::Cache)>;

    /// One more token (`[heads, head_dim]` each): updates `cache` and returns
    /// the token's output, equal to what a prefill including it would give.
    fn decode_step(
        &self,
        spec: &AttentionSpec,
        cache: &mut Self::Cache,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<Vec<f32>>;
}

/// The CPU backend: `linattn-reference`'s recurrent causal linear attention
/// and its softmax attention with a [`KvCache`], in f32.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuAttention;

/// Decode state of [`CpuAttention`] for one block.
#[derive(Debug, Clone, PartialEq)]
pub enum CpuCache {
    /// One (S, z) state per head: size independent of the position.
    Linear(Vec<State<f32>>),
    /// Every past key and value: grows by one token per step.
    Softmax(KvCache<f32>),
}

impl CpuCache {
    /// Floats held by the cache (shows constant vs growing memory).
    pub fn floats(&self, spec: &AttentionSpec) -> usize {
        match self {
            CpuCache::Linear(s) => s.iter().map(|s| s.s.len() + s.z.len()).sum(),
            CpuCache::Softmax(c) => 2 * c.len() * spec.width(),
        }
    }
}

fn views<'a>(
    spec: &AttentionSpec,
    n: usize,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
) -> Result<[View<'a, f32>; 3]> {
    let l = Layout::bnhd(1, spec.heads, n, spec.head_dim);
    Ok([View::new(q, l)?, View::new(k, l)?, View::new(v, l)?])
}

impl AttentionBackend for CpuAttention {
    type Cache = CpuCache;

    fn name(&self) -> String {
        "CPU (linattn-reference attention, matrixmultiply projections)".into()
    }

    fn prefill(
        &self,
        spec: &AttentionSpec,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<(Vec<f32>, CpuCache)> {
        let n = spec.tokens("CpuAttention::prefill", q, k, v)?;
        let [qv, kv, vv] = views(spec, n, q, k, v)?;
        let token_major = Layout::bnhd(1, spec.heads, n, spec.head_dim);
        match spec.kind {
            AttentionKind::Linear => {
                let (o, states) =
                    causal_linear_attention(qv, kv, vv, &spec.linear_options(), None)?;
                Ok((o.to_layout(&token_major)?, CpuCache::Linear(states)))
            }
            AttentionKind::Softmax => {
                let o = softmax_attention(qv, kv, vv, true, None)?;
                let mut cache = KvCache::new(1, spec.heads, spec.head_dim, spec.head_dim)?;
                cache.append(kv, vv)?;
                Ok((o.to_layout(&token_major)?, CpuCache::Softmax(cache)))
            }
        }
    }

    fn decode_step(
        &self,
        spec: &AttentionSpec,
        cache: &mut CpuCache,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Result<Vec<f32>> {
        const F: &str = "CpuAttention::decode_step";
        let n = spec.tokens(F, q, k, v)?;
        if n != 1 {
            return Err(ModelError::InvalidInput {
                func: F,
                detail: format!("got {n} tokens; expected exactly 1"),
            });
        }
        let [qv, kv, vv] = views(spec, 1, q, k, v)?;
        // [1, H, 1, dh] is the same buffer as token-major [1, H, dh].
        let o = match (spec.kind, cache) {
            (AttentionKind::Linear, CpuCache::Linear(states)) => {
                decode(states, qv, kv, vv, &spec.linear_options())?
            }
            (AttentionKind::Softmax, CpuCache::Softmax(kvc)) => kvc.step(qv, kv, vv, None)?,
            (kind, _) => {
                return Err(ModelError::InvalidInput {
                    func: F,
                    detail: format!("the cache does not belong to {kind} attention"),
                })
            }
        };
        Ok(o.into_vec())
    }
}
