//! Training on a byte text: a train/validation split, seeded random
//! batches, next-byte cross-entropy and candle-nn's AdamW.

use candle_core::{Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use linattn_reference::testing::Rng;

use crate::config::{Config, VOCAB};
use crate::error::{ModelError, Result};
use crate::model::Model;

/// nats -> bits.
const LN_2: f64 = std::f64::consts::LN_2;

/// A text split into a training part (the first `1 - val_fraction` of its
/// bytes) and a validation part (the rest), cut into windows of `seq_len`
/// input bytes, each with its `seq_len` next-byte targets.
#[derive(Debug, Clone)]
pub struct TextData {
    train: Vec<u8>,
    val: Vec<u8>,
    seq_len: usize,
}

impl TextData {
    /// Splits `text`.
    ///
    /// Errors ([`ModelError::InvalidInput`]): an empty text, `seq_len` 0,
    /// `val_fraction` outside `(0, 1)`, or a text too short for one window
    /// (`seq_len + 1` bytes) in each part.
    pub fn new(text: &[u8], seq_len: usize, val_fraction: f64) -> Result<Self> {
        const F: &str = "TextData::new";
        let bad = |detail: String| ModelError::InvalidInput { func: F, detail };
        if text.is_empty() {
            return Err(bad(
                "the text is empty; expected some bytes to train on".into()
            ));
        }
        if seq_len == 0 {
            return Err(bad("seq_len is 0; expected at least 1".into()));
        }
        if !(val_fraction > 0.0 && val_fraction < 1.0) {
            return Err(bad(format!(
                "val_fraction {val_fraction}; expected a number in (0, 1)"
            )));
        }
        let cut = ((text.len() as f64) * (1.0 - val_fraction)).round() as usize;
        let (train, val) = text.split_at(cut.min(text.len()));
        let need = seq_len + 1;
        if train.len() < need || val.len() < need {
            let total = (need as f64 / val_fraction.min(1.0 - val_fraction)).ceil() as usize;
            return Err(bad(format!(
                "the text has {} bytes: {} for training and {} for validation; one sequence of \
                 seq_len {seq_len} needs {need} bytes in each, so the text needs about {total} \
                 bytes (or a smaller seq_len)",
                text.len(),
                train.len(),
                val.len()
            )));
        }
        Ok(TextData {
            train: train.to_vec(),
            val: val.to_vec(),
            seq_len,
        })
    }

    /// Bytes of the training part.
    pub fn train_bytes(&self) -> &[u8] {
        &self.train
    }

    /// Bytes of the validation part.
    pub fn val_bytes(&self) -> &[u8] {
        &self.val
    }

    /// Input bytes per window.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// `batch` training windows at offsets drawn from `rng`: inputs and
    /// targets, both `[batch, seq_len]` u32 on `device`. The same RNG state
    /// gives the same batch.
    pub fn train_batch(&self, rng: &mut Rng, batch: usize, device: &Device) -> Result<Batch> {
        let last = self.train.len() - self.seq_len - 1;
        let offsets: Vec<usize> = (0..batch.max(1)).map(|_| rng.range(0, last)).collect();
        windows(&self.train, &offsets, self.seq_len, device)
    }

    /// The validation part as consecutive, non-overlapping windows (at most
    /// `max_windows`, evenly spread), in batches of at most `batch`.
    pub fn val_batches(
        &self,
        batch: usize,
        max_windows: usize,
        device: &Device,
    ) -> Result<Vec<Batch>> {
        let count = (self.val.len() - 1) / self.seq_len;
        let take = count.min(max_windows.max(1));
        let offsets: Vec<usize> = (0..take)
            .map(|i| (i * count / take) * self.seq_len)
            .collect();
        offsets
            .chunks(batch.max(1))
            .map(|o| windows(&self.val, o, self.seq_len, device))
            .collect()
    }
}

/// Inputs and next-byte targets, `[B, N]` u32 each.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids.
    pub inputs: Tensor,
    /// The byte after each input.
    pub targets: Tensor,
}

fn windows(text: &[u8], offsets: &[usize], n: usize, device: &Device) -> Result<Batch> {
    let mut inputs = Vec::with_capacity(offsets.len() * n);
    let mut targets = Vec::with_capacity(offsets.len() * n);
    for &o in offsets {
        inputs.extend(text[o..o + n].iter().map(|&b| b as u32));
        targets.extend(text[o + 1..o + n + 1].iter().map(|&b| b as u32));
    }
    let shape = (offsets.len(), n);
    Ok(Batch {
        inputs: Tensor::from_vec(inputs, shape, device)?,
        targets: Tensor::from_vec(targets, shape, device)?,
    })
}

/// Mean next-byte cross-entropy of `model` on `batch`, in nats (a scalar
/// tensor, differentiable in the weights).
pub fn loss(model: &Model, batch: &Batch) -> Result<Tensor> {
    let logits = model.forward(&batch.inputs)?;
    let logits = logits.reshape(((), VOCAB))?;
    Ok(candle_nn::loss::cross_entropy(
        &logits,
        &batch.targets.flatten_all()?,
    )?)
}

/// A model whose weights are candle training variables, and AdamW over them.
pub struct Trainer {
    model: Model,
    // Owns the variables the model's tensors are.
    _vars: VarMap,
    opt: AdamW,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", self.model.config())
            .field("lr", &self.opt.learning_rate())
            .finish()
    }
}

impl Trainer {
    /// Makes `model`'s weights trainable (copies, on its device) and sets up
    /// AdamW with learning rate `lr` (betas 0.9, 0.999; weight decay 0.01,
    /// candle-nn's defaults).
    ///
    /// Errors: [`ModelError::InvalidInput`] for a `lr` that is not finite and
    /// positive.
    pub fn new(model: &Model, lr: f64) -> Result<Self> {
        if !(lr.is_finite() && lr > 0.0) {
            return Err(ModelError::InvalidInput {
                func: "Trainer::new",
                detail: format!("learning rate {lr}; expected a finite number > 0"),
            });
        }
        let vars = VarMap::new();
        {
            let mut data = vars.data().lock().map_err(|_| ModelError::InvalidInput {
                func: "Trainer::new",
                detail: "the variable map's lock is poisoned".into(),
            })?;
            for (name, t) in model.tensors() {
                data.insert(name.clone(), candle_core::Var::from_tensor(t)?);
            }
        }
        let device = model.device().clone();
        let config: Config = *model.config();
        let model = Model::from_var_builder(
            config,
            VarBuilder::from_varmap(&vars, candle_core::DType::F32, &device),
        )?;
        let opt = AdamW::new(
            vars.all_vars(),
            ParamsAdamW {
                lr,
                ..ParamsAdamW::default()
            },
        )?;
        Ok(Trainer {
            model,
            _vars: vars,
            opt,
        })
    }

    /// One AdamW step on `batch`; returns the loss before the step, in bits
    /// per byte.
    pub fn step(&mut self, batch: &Batch) -> Result<f64> {
        let l = loss(&self.model, batch)?;
        let value = l.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(ModelError::InvalidInput {
                func: "Trainer::step",
                detail: format!("the loss is {value}; lower the learning rate"),
            });
        }
        self.opt.backward_step(&l)?;
        Ok(value / LN_2)
    }

    /// Mean loss over `batches` in bits per byte (no update).
    pub fn evaluate(&self, batches: &[Batch]) -> Result<f64> {
        evaluate(&self.model, batches)
    }

    /// The model being trained (its weights are the current variables).
    pub fn model(&self) -> &Model {
        &self.model
    }
}

/// Mean loss of `model` over `batches` in bits per byte, weighted by tokens.
pub fn evaluate(model: &Model, batches: &[Batch]) -> Result<f64> {
    let (mut sum, mut count) = (0.0f64, 0usize);
    for b in batches {
        let n = b.targets.elem_count();
        sum += loss(model, b)?.to_scalar::<f32>()? as f64 * n as f64;
        count += n;
    }
    if count == 0 {
        return Err(ModelError::InvalidInput {
            func: "evaluate",
            detail: "no batches; expected at least one".into(),
        });
    }
    Ok(sum / count as f64 / LN_2)
}
