//! Model-level properties: prefill + decode equals the parallel forward for
//! both attention kinds, weights round-trip through safetensors, bad files
//! are rejected with the tensor named, generation is reproducible.

use linattn_model::{
    AttentionKind, Config, CpuAttention, CpuCache, FeatureMap, Model, ModelError, Sampling, VOCAB,
};
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

/// Logits of the parallel forward over all of `tokens` against a prefill of
/// `k` tokens followed by `n - k` decode steps.
fn check_prefill_decode(config: Config, seed: u64) {
    let model = Model::random(config, seed).unwrap();
    let cpu = CpuAttention;
    let mut rng = Rng::new(seed ^ 0x5eed);
    let n = 40;
    let tokens = random_bytes(&mut rng, n);
    let full = model.forward(&cpu, &tokens).unwrap();
    assert_eq!(full.len(), n * VOCAB);
    assert!(full.iter().all(|x| x.is_finite()));
    // Logits vary: a model that ignored its input would pass trivially.
    assert!(rel_l2_error(&f64s(&full[..VOCAB]), &f64s(&full[VOCAB..2 * VOCAB])) > 0.1);
    for k in [1, 2, 7, 23, n - 1, n] {
        let (pre, mut session) = model.prefill(&cpu, &tokens[..k]).unwrap();
        assert_eq!(session.position(), k);
        let mut got = pre;
        for &t in &tokens[k..] {
            got.extend(model.decode(&cpu, &mut session, t).unwrap());
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
    let cpu = CpuAttention;
    for kind in AttentionKind::ALL {
        let model = Model::random(small(kind, FeatureMap::EluPlusOne), 3).unwrap();
        let spec = model.attention_spec();
        let (_, mut s) = model.prefill(&cpu, b"abc").unwrap();
        let before: usize = s.caches().iter().map(|c| c.floats(&spec)).sum();
        for t in b"defgh" {
            model.decode(&cpu, &mut s, *t).unwrap();
        }
        let after: usize = s.caches().iter().map(|c| c.floats(&spec)).sum();
        match kind {
            AttentionKind::Linear => {
                assert!(matches!(s.caches()[0], CpuCache::Linear(_)));
                // Per block: H states of D x M + D floats.
                let (h, dh) = (spec.heads, spec.head_dim);
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
    assert_eq!(a, Model::random(c, 11).unwrap());
    let b = Model::random(c, 12).unwrap();
    assert_ne!(a, b);
    let cpu = CpuAttention;
    assert_ne!(
        a.forward(&cpu, b"xy").unwrap(),
        b.forward(&cpu, b"xy").unwrap()
    );
}

#[test]
fn save_then_load_gives_identical_logits() {
    let cpu = CpuAttention;
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
            model.forward(&cpu, tokens).unwrap(),
            loaded.forward(&cpu, tokens).unwrap(),
        );
        assert!(a.iter().all(|x| x.is_finite()));
        // Bit-identical: f32 is stored exactly.
        let (ab, bb): (Vec<u32>, Vec<u32>) = (
            a.iter().map(|x| x.to_bits()).collect(),
            b.iter().map(|x| x.to_bits()).collect(),
        );
        assert_eq!(ab, bb, "{kind}");
        assert_eq!(loaded, model);
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
        .into_iter()
        .map(|(name, shape, data)| {
            let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            (name, Dtype::F32, shape, bytes)
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
    let err = Model::from_safetensors(&bytes, None).unwrap_err();
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
    let err = Model::from_safetensors(&bytes, None).unwrap_err();
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
    let err = Model::from_safetensors(&bytes, None).unwrap_err();
    assert!(err.to_string().contains("blocks.2.norm1.weight"), "{err}");

    let bytes = edited_file(
        &model,
        |e| {
            let t = e.iter_mut().find(|(n, ..)| n == "head.weight").unwrap();
            t.1 = Dtype::I32;
        },
        true,
    );
    let err = Model::from_safetensors(&bytes, None).unwrap_err();
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
    let err = Model::from_safetensors(&bytes, None).unwrap_err();
    assert!(
        matches!(&err, ModelError::NonFinite { name, index: 2 } if name == "norm_f.bias"),
        "{err:?}"
    );
}

#[test]
fn metadata_and_container_errors_are_clear() {
    let config = small(AttentionKind::Softmax, FeatureMap::EluPlusOne);
    let model = Model::random(config, 2).unwrap();
    let cpu = CpuAttention;
    // No metadata: an explicit config is needed, and then loading works.
    let bytes = edited_file(&model, |_| {}, false);
    let err = Model::from_safetensors(&bytes, None).unwrap_err();
    assert!(err.to_string().contains("__metadata__"), "{err}");
    let loaded = Model::from_safetensors(&bytes, Some(config)).unwrap();
    assert_eq!(
        loaded.forward(&cpu, b"ok").unwrap(),
        model.forward(&cpu, b"ok").unwrap()
    );
    // A config that disagrees with the file names the first mismatch.
    let wider = Config { mlp: 128, ..config };
    let err = Model::from_safetensors(&bytes, Some(wider)).unwrap_err();
    assert!(err.to_string().contains("blocks.0.mlp.fc1.weight"), "{err}");
    // Garbage and missing files.
    assert!(matches!(
        Model::from_safetensors(b"not a safetensors file", None),
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
    let cpu = CpuAttention;
    let tokens = b"half precision weights";
    let want = f64s(&model.forward(&cpu, tokens).unwrap());
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
        let loaded = Model::from_safetensors(&bytes, None).unwrap();
        let got = f64s(&loaded.forward(&cpu, tokens).unwrap());
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
    let cpu = CpuAttention;
    assert!(model.prefill(&cpu, b"").is_err());
    assert!(model
        .generate(&cpu, b"x", 2, Sampling::Temperature(-1.0), 0)
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
    let (_, mut s) = deeper.prefill(&cpu, b"ab").unwrap();
    assert!(model.decode(&cpu, &mut s, b'c').is_err());
}

#[test]
fn greedy_generation_follows_the_parallel_forward() {
    let cpu = CpuAttention;
    for kind in AttentionKind::ALL {
        let model = Model::random(small(kind, FeatureMap::EluPlusOne), 21).unwrap();
        let prompt = b"abc";
        let out = model
            .generate(&cpu, prompt, 12, Sampling::Greedy, 0)
            .unwrap();
        let all: Vec<u8> = prompt.iter().chain(&out).copied().collect();
        let logits = model.forward(&cpu, &all).unwrap();
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
                .generate(&cpu, prompt, 32, Sampling::Temperature(1.0), seed)
                .unwrap()
        };
        assert_eq!(s(5), s(5));
        assert_ne!(s(5), s(6));
    }
}
