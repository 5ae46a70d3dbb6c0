//! Model configuration: sizes, attention kind and feature map.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use linattn_candle::FeatureMap;

use crate::error::{ModelError, Result};

/// Byte-level vocabulary: every token is one byte, so no tokenizer files.
pub const VOCAB: usize = 256;

/// Which attention every block uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AttentionKind {
    /// Causal linear attention (the paper's): constant cost per decoded token.
    #[default]
    Linear,
    /// Causal softmax attention with a KV cache: the baseline, whose cost per
    /// decoded token grows with the position.
    Softmax,
}

impl AttentionKind {
    /// Both kinds.
    pub const ALL: [AttentionKind; 2] = [AttentionKind::Linear, AttentionKind::Softmax];

    /// The name used on the command line and in weight files.
    pub fn as_str(self) -> &'static str {
        match self {
            AttentionKind::Linear => "linear",
            AttentionKind::Softmax => "softmax",
        }
    }
}

impl fmt::Display for AttentionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AttentionKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "linear" => Ok(AttentionKind::Linear),
            "softmax" => Ok(AttentionKind::Softmax),
            other => Err(format!(
                "unknown attention kind `{other}`; expected `linear` or `softmax`"
            )),
        }
    }
}

/// The name of a feature map as written in configs: `elu+1`, `relu`, `identity`.
pub fn feature_map_name(fm: FeatureMap) -> &'static str {
    match fm {
        FeatureMap::EluPlusOne => "elu+1",
        FeatureMap::Relu => "relu",
        FeatureMap::Identity => "identity",
    }
}

/// Parses [`feature_map_name`]'s names (also `elu`, `elu_plus_one`).
pub fn parse_feature_map(s: &str) -> std::result::Result<FeatureMap, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "elu+1" | "elu" | "elu_plus_one" | "elu-plus-one" => Ok(FeatureMap::EluPlusOne),
        "relu" => Ok(FeatureMap::Relu),
        "identity" => Ok(FeatureMap::Identity),
        other => Err(format!(
            "unknown feature map `{other}`; expected `elu+1`, `relu` or `identity`"
        )),
    }
}

/// Sizes and choices of a [`crate::Model`].
///
/// The vocabulary is fixed at [`VOCAB`] bytes and positions are sinusoidal, so
/// a model has no maximum length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Width of the residual stream.
    pub d_model: usize,
    /// Attention heads; must divide `d_model`.
    pub heads: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Hidden width of each block's MLP.
    pub mlp: usize,
    /// Linear attention or the softmax baseline.
    pub attention: AttentionKind,
    /// phi for linear attention (ignored by softmax attention).
    pub feature_map: FeatureMap,
}

impl Default for Config {
    /// A small model: d_model 128, 4 heads, 2 layers, MLP 512, linear attention.
    fn default() -> Self {
        Config {
            d_model: 128,
            heads: 4,
            layers: 2,
            mlp: 512,
            attention: AttentionKind::Linear,
            feature_map: FeatureMap::EluPlusOne,
        }
    }
}

/// Key of the metadata entry that marks a linattn weight file.
const FORMAT_KEY: &str = "format";
/// Its value.
const FORMAT: &str = "linattn-model";

impl Config {
    /// Per-head size, `d_model / heads`.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.heads.max(1)
    }

    /// The same config with another attention kind.
    pub fn with_attention(self, attention: AttentionKind) -> Self {
        Config { attention, ..self }
    }

    /// Checks that every size is at least 1 and `heads` divides `d_model`.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, detail: String| Err(ModelError::InvalidConfig { field, detail });
        for (field, v) in [
            ("d_model", self.d_model),
            ("heads", self.heads),
            ("layers", self.layers),
            ("mlp", self.mlp),
        ] {
            if v == 0 {
                return bad(field, "is 0; expected at least 1".into());
            }
            // Far beyond any CPU demo; keeps size arithmetic from overflowing.
            if v > 1 << 16 {
                return bad(field, format!("is {v}; expected at most 65536"));
            }
        }
        if self.d_model % self.heads != 0 {
            return bad(
                "heads",
                format!(
                    "is {}, which does not divide d_model = {}",
                    self.heads, self.d_model
                ),
            );
        }
        Ok(())
    }

    /// Number of parameters.
    pub fn parameter_count(&self) -> usize {
        let (d, f) = (self.d_model, self.mlp);
        let block = 4 * d + 4 * d * d + f * d + f + d * f + d;
        2 * VOCAB * d + self.layers * block + 2 * d
    }

    /// The config as safetensors `__metadata__` entries.
    pub fn to_metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert(FORMAT_KEY.into(), FORMAT.into());
        m.insert("vocab".into(), VOCAB.to_string());
        m.insert("d_model".into(), self.d_model.to_string());
        m.insert("heads".into(), self.heads.to_string());
        m.insert("layers".into(), self.layers.to_string());
        m.insert("mlp".into(), self.mlp.to_string());
        m.insert("attention".into(), self.attention.to_string());
        m.insert(
            "feature_map".into(),
            feature_map_name(self.feature_map).into(),
        );
        m
    }

    /// Reads a config written by [`Config::to_metadata`], validated.
    pub fn from_metadata(m: &HashMap<String, String>) -> Result<Self> {
        let get = |key: &str| {
            m.get(key).ok_or_else(|| ModelError::Metadata {
                key: key.into(),
                detail: "is missing; pass the config explicitly for files not written by linattn"
                    .into(),
            })
        };
        let bad = |key: &str, detail: String| ModelError::Metadata {
            key: key.into(),
            detail,
        };
        let format = get(FORMAT_KEY)?;
        if format != FORMAT {
            return Err(bad(
                FORMAT_KEY,
                format!("is `{format}`; expected `{FORMAT}`"),
            ));
        }
        let num = |key: &str| -> Result<usize> {
            let v = get(key)?;
            v.parse()
                .map_err(|_| bad(key, format!("is `{v}`; expected a non-negative integer")))
        };
        let vocab = num("vocab")?;
        if vocab != VOCAB {
            return Err(bad(
                "vocab",
                format!("is {vocab}; expected {VOCAB} (byte tokens)"),
            ));
        }
        let config = Config {
            d_model: num("d_model")?,
            heads: num("heads")?,
            layers: num("layers")?,
            mlp: num("mlp")?,
            attention: get("attention")?.parse().map_err(|e| bad("attention", e))?,
            feature_map: parse_feature_map(get("feature_map")?)
                .map_err(|e| bad("feature_map", e))?,
        };
        config.validate()?;
        Ok(config)
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} attention, d_model {}, {} heads, {} layers, MLP {}",
            self.attention, self.d_model, self.heads, self.layers, self.mlp
        )?;
        if self.attention == AttentionKind::Linear {
            write!(f, ", phi = {}", feature_map_name(self.feature_map))?;
        }
        Ok(())
    }
}
