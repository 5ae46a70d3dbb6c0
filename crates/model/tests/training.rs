//! Training: whole-model gradients against finite differences, a few AdamW
//! steps lower the loss, and bad texts or settings are typed errors.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use linattn_model::{
    loss, AttentionKind, Config, FeatureMap, Model, ModelError, TextData, Trainer,
};
use linattn_reference::testing::Rng;

fn tiny(kind: AttentionKind) -> Config {
    Config {
        d_model: 8,
        heads: 2,
        layers: 2,
        mlp: 16,
        attention: kind,
        feature_map: FeatureMap::EluPlusOne,
    }
}

/// The model `model` with weight `name` replaced by `w`.
fn with_weight(model: &Model, name: &str, w: &Tensor) -> Model {
    let mut map: HashMap<String, Tensor> = model
        .tensors()
        .iter()
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    map.insert(name.to_string(), w.clone());
    Model::from_var_builder(
        *model.config(),
        VarBuilder::from_tensors(map, DType::F32, &Device::Cpu),
    )
    .unwrap()
}

/// Whole-model gradient check, in f32 (the linear-attention op runs in f32
/// on the CPU; f64 is not among its dtypes): for every tensor, the
/// directional derivative of the loss along a random unit direction u from
/// backprop, `grad . u`, against the central difference
/// `(L(w + h u) - L(w - h u)) / 2h`.
///
/// Threshold: with h = 1e-2 the truncation error is O(h^2 |L'''|) ~ 1e-4,
/// and f32 rounding of a loss near ln 256 ~ 5.5 (about 1e-6 after the
/// reductions) contributes ~1e-6 / h = 1e-4: an absolute error near 2e-4,
/// so |grad . u - fd| <= 2e-3 + 2e-2 |fd| leaves a margin of ~10 while a
/// missing gradient path (an op without backward), a wrong sign or a wrong
/// factor of 2 fails by orders of magnitude.
fn check_gradients(kind: AttentionKind, seed: u64) {
    let model = Model::random(tiny(kind), seed).unwrap();
    // Trainable copy: backprop gives d loss / d weight for every var.
    let vars = VarMap::new();
    for (n, t) in model.tensors() {
        vars.data()
            .lock()
            .unwrap()
            .insert(n.clone(), Var::from_tensor(t).unwrap());
    }
    let trainable = Model::from_var_builder(
        *model.config(),
        VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let text: Vec<u8> = b"gradients flow through every block of the model; "
        .iter()
        .cycle()
        .take(400)
        .copied()
        .collect();
    let data = TextData::new(&text, 7, 0.5).unwrap();
    let mut rng = Rng::new(seed);
    let batch = data.train_batch(&mut rng, 3, &Device::Cpu).unwrap();
    let grads = loss(&trainable, &batch).unwrap().backward().unwrap();
    let h = 1e-2f64;
    let mut dirs = Rng::new(seed ^ 0xd1);
    for (name, t) in trainable.tensors() {
        let g = grads
            .get(t)
            .unwrap_or_else(|| panic!("{kind}: no gradient reaches `{name}`"));
        let u: Vec<f32> = (0..t.elem_count()).map(|_| dirs.normal() as f32).collect();
        let u = Tensor::from_vec(u, t.dims(), &Device::Cpu).unwrap();
        let norm = u.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
        let u = u.broadcast_div(&norm).unwrap();
        let analytic = (g * &u)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let at = |s: f64| -> f64 {
            let w = (t + (&u * s).unwrap()).unwrap();
            loss(&with_weight(&model, name, &w), &batch)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        assert!(
            (analytic - fd).abs() <= 2e-3 + 2e-2 * fd.abs(),
            "{kind}, seed {seed}, `{name}`: backprop {analytic:.6}, finite difference {fd:.6}"
        );
    }
}

#[test]
fn linear_model_gradients_match_finite_differences() {
    for seed in 0..3 {
        check_gradients(AttentionKind::Linear, seed);
    }
}

#[test]
fn softmax_model_gradients_match_finite_differences() {
    for seed in 0..3 {
        check_gradients(AttentionKind::Softmax, seed);
    }
}

#[test]
fn a_few_adamw_steps_lower_the_loss() {
    let text: Vec<u8> = b"the cat sat on the mat. the dog sat on the log. "
        .iter()
        .cycle()
        .take(2000)
        .copied()
        .collect();
    let data = TextData::new(&text, 16, 0.2).unwrap();
    let val = data.val_batches(8, 16, &Device::Cpu).unwrap();
    for kind in AttentionKind::ALL {
        let model = Model::random(tiny(kind), 1).unwrap();
        let mut trainer = Trainer::new(&model, 1e-2).unwrap();
        let before = trainer.evaluate(&val).unwrap();
        let mut rng = Rng::new(7);
        let mut first = None;
        for _ in 0..30 {
            let b = data.train_batch(&mut rng, 8, &Device::Cpu).unwrap();
            let l = trainer.step(&b).unwrap();
            first.get_or_insert(l);
        }
        let after = trainer.evaluate(&val).unwrap();
        // An untrained byte model sits near 8 bits per byte; this text has
        // few distinct bytes, which 30 steps learn.
        assert!(before > 6.0, "{kind}: {before}");
        assert!(
            after < before - 2.0,
            "{kind}: validation {before:.3} -> {after:.3} bits/byte"
        );
        assert!(first.unwrap() > after + 2.0, "{kind}");
        // The trained weights are the trainer's model's; the original is untouched.
        assert_eq!(
            linattn_model::evaluate(&model, &val).unwrap().to_bits(),
            before.to_bits()
        );
    }
}

#[test]
fn training_from_the_same_seed_is_reproducible() {
    let text: Vec<u8> = (0..600u32)
        .map(|i| b"abcdefgh"[(i * i % 7) as usize])
        .collect();
    let data = TextData::new(&text, 8, 0.25).unwrap();
    let run = || {
        let model = Model::random(tiny(AttentionKind::Linear), 3).unwrap();
        let mut trainer = Trainer::new(&model, 5e-3).unwrap();
        let mut rng = Rng::new(11);
        (0..5)
            .map(|_| {
                let b = data.train_batch(&mut rng, 4, &Device::Cpu).unwrap();
                trainer.step(&b).unwrap().to_bits()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

#[test]
fn bad_texts_and_settings_are_typed_errors() {
    let msg = |r: Result<TextData, ModelError>| match r {
        Err(e @ ModelError::InvalidInput { .. }) => e.to_string(),
        other => panic!("expected InvalidInput, got {other:?}"),
    };
    let m = msg(TextData::new(b"", 8, 0.1));
    assert!(m.contains("empty"), "{m}");
    let m = msg(TextData::new(b"some text here", 0, 0.1));
    assert!(m.contains("seq_len is 0"), "{m}");
    // 40 bytes: 36 / 4 after the split; a window of 16 needs 17 in each.
    let m = msg(TextData::new(&[b'a'; 40], 16, 0.1));
    assert!(
        m.contains("40 bytes") && m.contains("seq_len 16") && m.contains("17 bytes"),
        "{m}"
    );
    let m = msg(TextData::new(&[b'a'; 400], 16, 1.5));
    assert!(m.contains("val_fraction"), "{m}");
    let model = Model::random(tiny(AttentionKind::Softmax), 0).unwrap();
    for lr in [0.0, -1.0, f64::NAN] {
        let e = Trainer::new(&model, lr).unwrap_err().to_string();
        assert!(e.contains("learning rate"), "{e}");
    }
    // Ids the model cannot take.
    let f = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let e = model.forward(&f).unwrap_err().to_string();
    assert!(e.contains("U32"), "{e}");
    let e = model
        .forward(&Tensor::zeros(3, DType::U32, &Device::Cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("[B, N]"), "{e}");
}
