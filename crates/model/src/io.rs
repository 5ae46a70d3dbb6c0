//! Weights in safetensors: save as f32 with the config in `__metadata__`,
//! load with every name, shape and dtype validated.

use std::collections::HashSet;
use std::path::Path;

use safetensors::{tensor::TensorView, Dtype, SafeTensorError, SafeTensors};

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::model::Model;

fn format_err(e: SafeTensorError) -> ModelError {
    ModelError::Format(e.to_string())
}

/// Decodes little-endian elements of a supported dtype to f32.
fn to_f32(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>> {
    let b = view.data();
    let out: Vec<f32> = match view.dtype() {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F64 => b
            .chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                f64::from_le_bytes(a) as f32
            })
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(ModelError::TensorDtype {
                name: name.into(),
                dtype: format!("{other:?}"),
            })
        }
    };
    if let Some(index) = out.iter().position(|x| !x.is_finite()) {
        return Err(ModelError::NonFinite {
            name: name.into(),
            index,
        });
    }
    Ok(out)
}

impl Model {
    /// The weights as a safetensors file image: every tensor in f32 and the
    /// config in `__metadata__` (so [`Model::load`] needs nothing else).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let tensors = self.tensors();
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, d)| d.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, shape, _), b)| {
                TensorView::new(Dtype::F32, shape.clone(), b).map(|v| (name.as_str(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(format_err)?;
        safetensors::serialize(views, Some(self.config.to_metadata())).map_err(format_err)
    }

    /// Writes [`Model::to_safetensors`] to `path`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_safetensors()?;
        std::fs::write(path, bytes).map_err(|source| ModelError::Io {
            action: "writing",
            path: path.into(),
            source,
        })
    }

    /// Loads a weight file written by [`Model::save`] (config from its
    /// metadata), or any safetensors file with the same tensor names when
    /// `config` is given (which then overrides the metadata).
    pub fn load(path: impl AsRef<Path>, config: Option<Config>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            action: "reading",
            path: path.into(),
            source,
        })?;
        Self::from_safetensors(&bytes, config)
    }

    /// [`Model::load`] from an in-memory file image.
    ///
    /// Every tensor the config needs must be present with exactly its shape
    /// (dtype F32, F16, BF16 or F64, converted to f32; finite values), and no
    /// other tensor may be present; the error names the first offender.
    pub fn from_safetensors(bytes: &[u8], config: Option<Config>) -> Result<Self> {
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(format_err)?;
        let config = match config {
            Some(c) => c,
            None => match meta.metadata() {
                Some(m) => Config::from_metadata(m)?,
                None => return Err(ModelError::Metadata {
                    key: "__metadata__".into(),
                    detail:
                        "is missing; pass the config explicitly for files not written by linattn"
                            .into(),
                }),
            },
        };
        config.validate()?;
        let st = SafeTensors::deserialize(bytes).map_err(format_err)?;
        let mut seen = HashSet::new();
        let model = Model::build(config, |name, shape, _| {
            let view = st.tensor(name).map_err(|e| match e {
                SafeTensorError::TensorNotFound(_) => ModelError::MissingTensor {
                    name: name.into(),
                    expected: shape.to_vec(),
                },
                e => format_err(e),
            })?;
            if view.shape() != shape {
                return Err(ModelError::TensorShape {
                    name: name.into(),
                    expected: shape.to_vec(),
                    found: view.shape().to_vec(),
                });
            }
            seen.insert(name.to_string());
            to_f32(name, &view)
        })?;
        let mut extra: Vec<&str> = st
            .names()
            .into_iter()
            .filter(|n| !seen.contains(*n))
            .collect();
        extra.sort_unstable();
        if let Some(name) = extra.first() {
            return Err(ModelError::UnexpectedTensor {
                name: (*name).into(),
            });
        }
        Ok(model)
    }
}
