//! Model-level properties: prefill + decode equals the parallel forward for
//! both attention kinds, weights round-trip through safetensors, checkpoints
//! of the earlier hand-written model load and reproduce its logits, bad files
//! are rejected with the tensor named, generation is reproducible.

use candle_core::Device;
use linattn_model::{AttentionKind, Cache, Config, FeatureMap, Model, ModelError, Sampling, VOCAB};
use linattn_reference::testing::{rel_l2_error, test_seed, Rng};
use safetensors::{tensor::TensorView, Dtype};

fn small(attention: AttentionKind, feature_map: FeatureMap) -> Config {
    Config {
        d_model: 48,
        heads: 4,
        layers: 2,
        mlp: 96,
        attention,
        feature_map,
    }
}

fn random_bytes(rng: &mut Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.range(0, 255) as u8).collect()
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Every weight as (name, f32 values).
fn weights(m: &Model) -> Vec<(String, Vec<f32>)> {
    m.tensors()
        .iter()
        .map(|(n, t)| (n.clone(), t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

/// Logits of the parallel forward over all of `tokens` against a prefill of
/// `k` tokens followed by `n - k` decode steps.
fn check_prefill_decode(config: Config, seed: u64) {
    let model = Model::random(config, seed).unwrap();
    let mut rng = Rng::new(seed ^ 0x5eed);
    let n = 40;
    let tokens = random_bytes(&mut rng, n);
    let full = model.forward_tokens(&tokens).unwrap();
    assert_eq!(full.len(), n * VOCAB);
    assert!(full.iter().all(|x| x.is_finite()));
    // Logits vary: a model that ignored its input would pass trivially.
    assert!(rel_l2_error(&f64s(&full[..VOCAB]), &f64s(&full[VOCAB..2 * VOCAB])) > 0.1);
    for k in [1, 2, 7, 23, n - 1, n] {
        let (pre, mut session) = model.prefill(&tokens[..k]).unwrap();
        assert_eq!(session.position(), k);
        let mut got = pre;
        for &t in &tokens[k..] {
            got.extend(model.decode(&mut session, t).unwrap());
        }
        assert_eq!(session.position(), n);
        let err = rel_l2_error(&f64s(&got), &f64s(&full));
        assert!(err < 2e-6, "{config}: k = {k}: rel error {err}");
        // Each decoded row on its own, so one bad token cannot hide.
        for i in k..n {
            let row = |x: &[f32]| f64s(&x[i * VOCAB..(i + 1) * VOCAB]);
            let e = rel_l2_error(&row(&got), &row(&full));
            assert!(e < 1e-5, "{config}: k = {k}, token {i}: rel error {e}");
        }
    }
}

#[test]
fn linear_prefill_then_decode_equals_parallel_forward() {
    let seed = test_seed();
    for fm in [FeatureMap::EluPlusOne, FeatureMap::Relu] {
        check_prefill_decode(small(AttentionKind::Linear, fm), seed);
    }
}

#[test]
fn softmax_prefill_then_kv_cache_decode_equals_parallel_forward() {
    check_prefill_decode(
        small(AttentionKind::Softmax, FeatureMap::EluPlusOne),
        test_seed(),
    );
}

#[test]
fn linear_state_is_constant_size_and_kv_cache_grows() {
    for kind in AttentionKind::ALL {
        let model = Model::random(small(kind, FeatureMap::EluPlusOne), 3).unwrap();
        let (h, dh) = (model.config().heads, model.config().head_dim());
        let (_, mut s) = model.prefill(b"abc").unwrap();
        let before: usize = s.caches().iter().map(|c| c.floats()).sum();
        for t in b"defgh" {
            model.decode(&mut s, *t).unwrap();
        }
        let after: usize = s.caches().iter().map(|c| c.floats()).sum();
        match kind {
            AttentionKind::Linear => {
                assert!(matches!(s.caches()[0], Cache::Linear(_)));
                // Per block: H states of D x M + D floats.
                assert_eq!(before, 2 * h * (dh * dh + dh));
                assert_eq!(after, before);
            }
            AttentionKind::Softmax => {
                assert_eq!(before, 2 * 2 * 3 * 48);
                assert_eq!(after, 2 * 2 * 8 * 48);
            }
        }
    }
}

#[test]
fn random_init_is_deterministic_per_seed() {
    let c = small(AttentionKind::Linear, FeatureMap::EluPlusOne);
    let a = Model::random(c, 11).unwrap();
    assert_eq!(weights(&a), weights(&Model::random(c, 11).unwrap()));
    let b = Model::random(c, 12).unwrap();
    assert_ne!(weights(&a), weights(&b));
    assert_ne!(
        a.forward_tokens(b"xy").unwrap(),
        b.forward_tokens(b"xy").unwrap()
    );
}

#[test]
fn save_then_load_gives_identical_logits() {
    let tokens = b"The state is the whole history.";
    for kind in AttentionKind::ALL {
        let config = small(kind, FeatureMap::Relu);
        let model = Model::random(config, test_seed()).unwrap();
        let path = std::env::temp_dir().join(format!(
            "linattn-model-test-{}-{kind}.safetensors",
            std::process::id()
        ));
        model.save(&path).unwrap();
        let loaded = Model::load(&path, None);
        std::fs::remove_file(&path).ok();
        let loaded = loaded.unwrap();
        assert_eq!(loaded.config(), &config, "config travels in the metadata");
        let (a, b) = (
            model.forward_tokens(tokens).unwrap(),
            loaded.forward_tokens(tokens).unwrap(),
        );
        assert!(a.iter().all(|x| x.is_finite()));
        // Bit-identical: f32 is stored exactly.
        let (ab, bb): (Vec<u32>, Vec<u32>) = (
            a.iter().map(|x| x.to_bits()).collect(),
            b.iter().map(|x| x.to_bits()).collect(),
        );
        assert_eq!(ab, bb, "{kind}");
        assert_eq!(weights(&loaded), weights(&model));
    }
}

/// A safetensors image of `model`'s tensors after `edit` (which may drop,
/// reshape, retype or add entries).
fn edited_file(
    model: &Model,
    edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>),
    with_metadata: bool,
) -> Vec<u8> {
    let mut entries: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = model
        .tensors()
        .iter()
        .map(|(name, t)| {
            let data: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            (name.clone(), Dtype::F32, t.dims().to_vec(), bytes)
        })
        .collect();
    edit(&mut entries);
    let views: Vec<(String, TensorView)> = entries
        .iter()
        .map(|(n, dt, s, b)| (n.clone(), TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    let meta = with_metadata.then(|| model.config().to_metadata());
    safetensors::serialize(views, meta).unwrap()
}

#[test]
fn missing_misshaped_or_unexpected_tensors_are_named() {
    let config = small(AttentionKind::Linear, FeatureMap::EluPlusOne);
    let model = Model::random(config, 1).unwrap();
    let target = "blocks.1.attn.k.weight";

    let bytes = edited_file(&model, |e| e.retain(|(n, ..)| n != target), true);
    let err = Model::from_safetensors(&bytes, None, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, ModelError::MissingTensor { name, .. } if name == target),
        "{err:?}"
    );
    assert!(err.to_string().contains(target), "{err}");

    let bytes = edited_file(
        &model,
        |e| {
            let t = e
                .iter_mut()
                .find(|(n, ..)| n == "blocks.0.mlp.fc1.bias")
                .unwrap();
            t.2 = vec![config.mlp / 2, 2]; // same element count, wrong shape
        },
        true,
    );
    let err = Model::from_safetensors(&bytes, None, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, ModelError::TensorShape { name, found, .. }
            if name == "blocks.0.mlp.fc1.bias" && found == &vec![config.mlp / 2, 2]),
        "{err:?}"
    );
    assert!(
        msg.contains("blocks.0.mlp.fc1.bias") && msg.contains("[96]"),
        "{msg}"
    );

    let bytes = edited_file(
        &model,
        |e| {
            e.push((
                "blocks.2.norm1.weight".into(),
                Dtype::F32,
                vec![1],
                vec![0; 4],
            ))
        },
        true,
    );
    let err = Model::from_safetensors(&bytes, None, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("blocks.2.norm1.weight"), "{err}");

    let bytes = edited_file(
        &model,
        |e| {
            let t = e.iter_mut().find(|(n, ..)| n == "head.weight").unwrap();
            t.1 = Dtype::I32;
        },
        true,
    );
    let err = Model::from_safetensors(&bytes, None, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, ModelError::TensorDtype { name, .. } if name == "head.weight"),
        "{err:?}"
    );

    let bytes = edited_file(
        &model,
        |e| {
            let t = e.iter_mut().find(|(n, ..)| n == "norm_f.bias").unwrap();
            t.3[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        },
        true,
    );
    let err = Model::from_safetensors(&bytes, None, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, ModelError::NonFinite { name, index: 2 } if name == "norm_f.bias"),
        "{err:?}"
    );
}

#[test]
fn metadata_and_container_errors_are_clear() {
    let config = small(AttentionKind::Softmax, FeatureMap::EluPlusOne);
    let model = Model::random(config, 2).unwrap();
    // No metadata: an explicit config is needed, and then loading works.
    let bytes = edited_file(&model, |_| {}, false);
    let err = Model::from_safetensors(&bytes, None, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("__metadata__"), "{err}");
    let loaded = Model::from_safetensors(&bytes, Some(config), &Device::Cpu).unwrap();
    assert_eq!(
        loaded.forward_tokens(b"ok").unwrap(),
        model.forward_tokens(b"ok").unwrap()
    );
    // A config that disagrees with the file names the first mismatch.
    let wider = Config { mlp: 128, ..config };
    let err = Model::from_safetensors(&bytes, Some(wider), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("blocks.0.mlp.fc1.weight"), "{err}");
    // Garbage and missing files.
    assert!(matches!(
        Model::from_safetensors(b"not a safetensors file", None, &Device::Cpu),
        Err(ModelError::Format(_))
    ));
    let err = Model::load("/nonexistent/dir/w.safetensors", None).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/dir/w.safetensors"),
        "{err}"
    );
}

#[test]
fn half_precision_files_load_within_tolerance() {
    let config = small(AttentionKind::Linear, FeatureMap::EluPlusOne);
    let model = Model::random(config, 9).unwrap();
    let tokens = b"half precision weights";
    let want = f64s(&model.forward_tokens(tokens).unwrap());
    for dt in [Dtype::F16, Dtype::BF16] {
        let bytes = edited_file(
            &model,
            |e| {
                for (_, d, _, b) in e.iter_mut() {
                    let xs: Vec<f32> = b
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    *b = match dt {
                        Dtype::F16 => xs
                            .iter()
                            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                            .collect(),
                        _ => xs
                            .iter()
                            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                            .collect(),
                    };
                    *d = dt;
                }
            },
            true,
        );
        let loaded = Model::from_safetensors(&bytes, None, &Device::Cpu).unwrap();
        let got = f64s(&loaded.forward_tokens(tokens).unwrap());
        let err = rel_l2_error(&got, &want);
        // Rounding the weights changes the logits, but by little.
        assert!(err > 0.0 && err < 1e-2, "{dt:?}: rel error {err}");
    }
}

#[test]
fn bad_configs_and_inputs_are_errors() {
    let bad = Config {
        d_model: 30,
        heads: 4,
        ..Config::default()
    };
    let err = Model::random(bad, 0).unwrap_err();
    assert!(err.to_string().contains("heads"), "{err}");
    let zero = Config {
        layers: 0,
        ..Config::default()
    };
    assert!(Model::random(zero, 0).is_err());
    let model = Model::random(small(AttentionKind::Linear, FeatureMap::Relu), 0).unwrap();
    assert!(model.prefill(b"").is_err());
    assert!(model
        .generate(b"x", 2, Sampling::Temperature(-1.0), 0)
        .is_err());
    // A session from a model with a different depth is rejected.
    let deeper = Model::random(
        Config {
            layers: 3,
            ..*model.config()
        },
        0,
    )
    .unwrap();
    let (_, mut s) = deeper.prefill(b"ab").unwrap();
    assert!(model.decode(&mut s, b'c').is_err());
}

#[test]
fn greedy_generation_follows_the_parallel_forward() {
    for kind in AttentionKind::ALL {
        let model = Model::random(small(kind, FeatureMap::EluPlusOne), 21).unwrap();
        let prompt = b"abc";
        let out = model.generate(prompt, 12, Sampling::Greedy, 0).unwrap();
        let all: Vec<u8> = prompt.iter().chain(&out).copied().collect();
        let logits = model.forward_tokens(&all).unwrap();
        for (i, &t) in out.iter().enumerate() {
            let pos = prompt.len() - 1 + i;
            let row = &logits[pos * VOCAB..(pos + 1) * VOCAB];
            // The sampled token's logit is the row's max (up to rounding).
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert!(row[t as usize] >= max - 1e-4, "{kind}: token {i}");
        }
        // Temperature sampling: reproducible per seed, different across seeds.
        let s = |seed| {
            model
                .generate(prompt, 32, Sampling::Temperature(1.0), seed)
                .unwrap()
        };
        assert_eq!(s(5), s(5));
        assert_ne!(s(5), s(6));
    }
}

/// Checkpoints written by the earlier hand-written model (commit bc2cefe,
/// `tests/fixtures/README.md`) load and give the logits it recorded.
#[test]
fn old_checkpoints_load_and_reproduce_their_logits() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for kind in AttentionKind::ALL {
        let model = Model::load(dir.join(format!("v0-{kind}.safetensors")), None).unwrap();
        assert_eq!(model.config().attention, kind);
        assert_eq!(model.config().d_model, 8);
        let rec = candle_core::safetensors::load(
            dir.join(format!("v0-{kind}-logits.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let tokens: Vec<u8> = rec["tokens"].to_vec1().unwrap();
        let want: Vec<f32> = rec["logits"].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(want.len(), tokens.len() * VOCAB);
        let forward = model.forward_tokens(&tokens).unwrap();
        let (prefill, _) = model.prefill(&tokens).unwrap();
        for (what, got) in [("forward", &forward), ("prefill", &prefill)] {
            for i in 0..tokens.len() {
                let row = |x: &[f32]| f64s(&x[i * VOCAB..(i + 1) * VOCAB]);
                let e = rel_l2_error(&row(got), &row(&want));
                assert!(e < 1e-5, "{kind} {what}: token {i}: rel error {e}");
            }
        }
    }
}
