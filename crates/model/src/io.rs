//! Weights in safetensors: saved as f32 with the config in `__metadata__`,
//! loaded through candle (`candle_core::safetensors`) with every name, shape
//! and dtype validated first, so the error names the tensor at fault.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use safetensors::{tensor::TensorView, Dtype, SafeTensorError, SafeTensors};

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::model::{tensor_specs, Model};

fn format_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Format(e.to_string())
}

impl Model {
    /// The weights as a safetensors file image: every tensor in f32 and the
    /// config in `__metadata__` (so [`Model::load`] needs nothing else).
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let mut data = Vec::new();
        for (name, t) in self.tensors() {
            let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            data.push((name.as_str(), t.dims().to_vec(), bytes));
        }
        let views = data
            .iter()
            .map(|(name, shape, b)| {
                TensorView::new(Dtype::F32, shape.clone(), b).map(|v| (*name, v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(format_err)?;
        safetensors::serialize(views, Some(self.config().to_metadata())).map_err(format_err)
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
    /// metadata; files of earlier linattn versions use the same names and
    /// format) onto the CPU, or any safetensors file with the same tensor
    /// names when `config` is given (which then overrides the metadata).
    pub fn load(path: impl AsRef<Path>, config: Option<Config>) -> Result<Self> {
        Self::load_on(path, config, &Device::Cpu)
    }

    /// [`Model::load`] onto `device`.
    pub fn load_on(
        path: impl AsRef<Path>,
        config: Option<Config>,
        device: &Device,
    ) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            action: "reading",
            path: path.into(),
            source,
        })?;
        Self::from_safetensors(&bytes, config, device)
    }

    /// [`Model::load_on`] from an in-memory file image.
    ///
    /// Every tensor the config needs must be present with exactly its shape
    /// (dtype F32, F16, BF16 or F64, converted to f32; finite values), and no
    /// other tensor may be present; the error names the first offender.
    pub fn from_safetensors(bytes: &[u8], config: Option<Config>, device: &Device) -> Result<Self> {
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
        for (name, shape, _) in tensor_specs(&config) {
            let view = st.tensor(&name).map_err(|e| match e {
                SafeTensorError::TensorNotFound(_) => ModelError::MissingTensor {
                    name: name.clone(),
                    expected: shape.clone(),
                },
                e => format_err(e),
            })?;
            if view.shape() != shape.as_slice() {
                return Err(ModelError::TensorShape {
                    name,
                    expected: shape,
                    found: view.shape().to_vec(),
                });
            }
            if !matches!(
                view.dtype(),
                Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64
            ) {
                return Err(ModelError::TensorDtype {
                    name,
                    dtype: format!("{:?}", view.dtype()),
                });
            }
            seen.insert(name);
        }
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
        // Names, shapes and dtypes are right: candle reads the data.
        let loaded = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?;
        let mut map = HashMap::new();
        for (name, t) in loaded {
            let t = t.to_dtype(DType::F32)?;
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            if let Some(index) = v.iter().position(|x| !x.is_finite()) {
                return Err(ModelError::NonFinite { name, index });
            }
            map.insert(name, t.to_device(device)?);
        }
        Self::from_var_builder(config, VarBuilder::from_tensors(map, DType::F32, device))
    }
}
