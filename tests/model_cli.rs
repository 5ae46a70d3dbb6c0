//! `linattn demo` and `linattn generate`, through the library entry points
//! and the binary, at toy sizes (timings are not asserted: CI machines are
//! noisy; the shapes of the outputs are).

use std::path::PathBuf;
use std::process::Command;

use linattn::demo::{self, DemoOptions};
use linattn::generate::{self, printable, GenerateOptions};
use linattn_model::{AttentionKind, BackendChoice, Config, Model};

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("linattn-{}-{name}", std::process::id()))
}

fn toy() -> Config {
    Config {
        d_model: 16,
        heads: 2,
        layers: 1,
        mlp: 32,
        ..Config::default()
    }
}

#[test]
fn demo_writes_table_and_svg() {
    let svg = tmp("demo.svg");
    let opts = DemoOptions {
        // Not a multiple of the demo's 32-token turns: the last turn is short.
        tokens: 100,
        config: toy(),
        backend: BackendChoice::Cpu,
        out: svg.clone(),
        rows: 4,
        progress: false,
        ..DemoOptions::default()
    };
    let mut text = Vec::new();
    let report = demo::run(&opts, &mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    let plot = std::fs::read_to_string(&svg);
    std::fs::remove_file(&svg).ok();
    let plot = plot.unwrap();

    for t in [&report.linear, &report.softmax] {
        assert_eq!(t.seconds.len(), 100);
        assert!(t.seconds.iter().all(|s| s.is_finite() && *s > 0.0));
        // Positions run on from the prompt, one per decoded token.
        let p0 = opts.prompt.len();
        assert_eq!(t.positions, (p0..p0 + 100).collect::<Vec<_>>());
    }
    assert_eq!(report.linear.kind, AttentionKind::Linear);
    assert_eq!(report.softmax.kind, AttentionKind::Softmax);
    assert_eq!(report.rows.len(), 4);
    assert_eq!(report.rows[0].from, opts.prompt.len());
    assert_eq!(report.rows[3].to, opts.prompt.len() + 100);
    for r in &report.rows {
        assert!(r.linear_ms > 0.0 && r.softmax_ms > 0.0 && r.speedup().is_finite());
    }
    assert!(text.contains("backend: CPU"), "{text}");
    assert!(
        text.contains("speedup") && text.contains("tokens/s"),
        "{text}"
    );
    assert!(text.contains(&svg.display().to_string()), "{text}");
    assert!(plot.starts_with("<svg") && plot.contains("</svg>"));
    assert!(plot.contains("linear attention") && plot.contains("softmax attention"));
}

#[test]
fn demo_rejects_bad_options() {
    let mut sink = Vec::new();
    let opts = DemoOptions {
        tokens: 1,
        progress: false,
        ..DemoOptions::default()
    };
    assert!(demo::run(&opts, &mut sink).is_err());
    let opts = DemoOptions {
        config: Config { heads: 3, ..toy() },
        progress: false,
        ..DemoOptions::default()
    };
    let err = demo::run(&opts, &mut sink).unwrap_err().to_string();
    assert!(err.contains("heads"), "{err}");
}

#[test]
fn generate_from_saved_weights_is_reproducible() {
    let weights = tmp("gen.safetensors");
    Model::random(toy().with_attention(AttentionKind::Softmax), 4)
        .unwrap()
        .save(&weights)
        .unwrap();
    let opts = GenerateOptions {
        prompt: "abc".into(),
        weights: Some(weights.clone()),
        config: Config::default(), // ignored: the file carries its config
        tokens: 20,
        temperature: 0.7,
        seed: 3,
        backend: BackendChoice::Cpu,
    };
    let (mut o1, mut o2) = (Vec::new(), Vec::new());
    let a = generate::run(&opts, &mut o1);
    let b = generate::run(&opts, &mut o2);
    std::fs::remove_file(&weights).ok();
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.bytes.len(), 20);
    assert_eq!(a.bytes, b.bytes);
    assert!(a.tokens_per_second() > 0.0);
    let text = String::from_utf8(o1).unwrap();
    assert!(text.contains("softmax attention, d_model 16"), "{text}");
    assert!(text.contains("tokens/s"), "{text}");
    assert!(
        text.contains(&format!("abc{}", printable(&a.bytes))),
        "{text}"
    );
}

#[test]
fn printable_escapes_control_bytes() {
    assert_eq!(printable(b"a\nb\tc"), "a\nb\tc");
    assert_eq!(printable(&[b'x', 0x07, 0x1b]), "x\\u{7}\\u{1b}");
    assert_eq!(printable(&[0xff]), "\u{fffd}");
}

fn linattn(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_linattn"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn cli_demo_and_generate_run_and_backends_match_the_machine() {
    let svg = tmp("cli.svg");
    let svg_s = svg.display().to_string();
    let (ok, text) = linattn(&[
        "demo",
        "-n",
        "40",
        "--d-model",
        "16",
        "--heads",
        "2",
        "--layers",
        "1",
        "--backend",
        "cpu",
        "--rows",
        "2",
        "--no-progress",
        "-o",
        &svg_s,
    ]);
    let exists = svg.exists();
    std::fs::remove_file(&svg).ok();
    assert!(ok && exists, "{text}");
    assert!(
        text.contains("d_model 16, 2 heads, 1 layers, MLP 64"),
        "{text}"
    );

    // What this machine offers, as the library sees it: the CLI must agree.
    let gpu = linattn_model::gpu_device().map(drop);
    let generate = |backend: &str| {
        linattn(&[
            "generate",
            "--prompt",
            "hi",
            "-n",
            "5",
            "--d-model",
            "16",
            "--heads",
            "2",
            "--backend",
            backend,
        ])
    };
    // `auto` always runs: on the GPU when it is usable (cuBLAS included),
    // else on the CPU, saying why.
    let (ok, text) = generate("auto");
    assert!(ok && text.contains("5 tokens in"), "{text}");
    match &gpu {
        Ok(()) => assert!(text.contains("backend: GPU"), "{text}"),
        Err(why) => assert!(
            text.contains(&format!("backend: CPU (GPU not used: {why})")),
            "{text}"
        ),
    }
    // `gpu` runs there when it can; otherwise it is a clear error naming
    // the reason, not a fallback.
    let (ok, text) = generate("gpu");
    match &gpu {
        Ok(()) => assert!(
            ok && text.contains("5 tokens in") && text.contains("backend: GPU"),
            "{text}"
        ),
        Err(why) => assert!(
            !ok && text.contains("backend `gpu` is unavailable") && text.contains(why.as_str()),
            "{text}"
        ),
    }
    let (ok, text) = linattn(&["demo", "--backend", "tpu"]);
    assert!(!ok && text.contains("tpu"), "{text}");
}

#[test]
fn cli_train_writes_checkpoints_plot_and_generates_from_them() {
    let dir = tmp("train");
    let text = tmp("train.txt");
    let body: String = "a linear transformer is an rnn. ".repeat(40);
    std::fs::write(&text, &body).unwrap();
    let (dir_s, text_s) = (dir.display().to_string(), text.display().to_string());
    let (ok, out) = linattn(&[
        "train",
        "--text",
        &text_s,
        "--steps",
        "4",
        "--seq-len",
        "16",
        "--batch",
        "2",
        "--d-model",
        "16",
        "--heads",
        "2",
        "--layers",
        "1",
        "--backend",
        "cpu",
        "--no-progress",
        "--out",
        &dir_s,
    ]);
    let files = ["linear.safetensors", "softmax.safetensors", "loss.svg"].map(|f| dir.join(f));
    let present = files.iter().map(|f| f.exists()).collect::<Vec<_>>();
    let svg = std::fs::read_to_string(&files[2]).unwrap_or_default();
    let weights = files[0].display().to_string();
    let (gen_ok, gen) = linattn(&[
        "generate",
        "--weights",
        &weights,
        "--prompt",
        "a line",
        "-n",
        "8",
        "--backend",
        "cpu",
    ]);
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_file(&text).ok();
    assert!(ok, "{out}");
    assert_eq!(present, [true; 3], "{out}");
    for want in [
        "backend: CPU",
        &format!("{} bytes", body.len()),
        "bits per byte",
        "val bpb",
        "gen ms/token",
        "plot written to",
    ] {
        assert!(out.contains(want), "missing `{want}`:\n{out}");
    }
    // One table row per kind, with finite numbers.
    for kind in ["linear", "softmax"] {
        let row = out
            .lines()
            .find(|l| l.trim_start().starts_with(kind) && !l.contains(':'))
            .unwrap_or_else(|| panic!("no table row for {kind}:\n{out}"));
        let nums: Vec<f64> = row
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(nums.len(), 5, "{row}");
        assert!(nums.iter().all(|x| x.is_finite() && *x > 0.0), "{row}");
    }
    assert!(svg.starts_with("<svg") && svg.contains("</svg>"));
    for label in [
        "linear attention, train",
        "linear attention, validation",
        "softmax attention, train",
        "softmax attention, validation",
    ] {
        assert!(svg.contains(label), "plot lacks `{label}`");
    }
    assert!(gen_ok && gen.contains("8 tokens in"), "{gen}");
    assert!(gen.contains("linear attention, d_model 16"), "{gen}");
}

#[test]
fn cli_train_rejects_bad_texts_and_settings() {
    let empty = tmp("empty.txt");
    let short = tmp("short.txt");
    std::fs::write(&empty, "").unwrap();
    std::fs::write(&short, "too short for a sequence").unwrap();
    let run = |text: &PathBuf, extra: &[&str]| {
        let t = text.display().to_string();
        let out = tmp("bad-out").display().to_string();
        let mut args = vec!["train", "--text", &t, "--no-progress", "--out", &out];
        args.extend_from_slice(extra);
        linattn(&args)
    };
    let cases = [
        run(&empty, &[]),
        run(&short, &["--seq-len", "64"]),
        run(&short, &["--seq-len", "0"]),
        run(&tmp("no-such-file.txt"), &[]),
    ];
    std::fs::remove_file(&empty).ok();
    std::fs::remove_file(&short).ok();
    let wants = [
        "the text is empty",
        "seq_len 64 needs 65 bytes",
        "seq_len is 0",
        "no-such-file.txt",
    ];
    for ((ok, text), want) in cases.iter().zip(wants) {
        assert!(!ok, "{text}");
        assert!(
            text.contains("error:") && text.contains(want),
            "`{want}`: {text}"
        );
        assert!(!text.contains("panicked"), "{text}");
    }
}
