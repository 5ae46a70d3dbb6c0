//! `linattn train`: the other half of the paper on this machine. A linear
//! and a softmax transformer (same sizes, same seed, same batches) learn to
//! predict the next byte of a text with AdamW; the train and validation
//! losses in bits per byte go into a table and one SVG plot, each trained
//! model's generation speed is measured as in `linattn demo`, and the
//! weights are saved as safetensors for `linattn generate --weights`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use linattn_model::{
    select_backend, AttentionKind, BackendChoice, Config, Model, Sampling, TextData, Trainer,
};
use linattn_reference::testing::Rng;

use crate::chart;
use crate::demo::{models_line, timeline, Timeline};
use crate::generate::printable;

/// The default training text: the project's own documentation, compiled
/// into the binary so `linattn train` needs no file and no download.
pub const DEFAULT_TEXT: [&str; 8] = [
    include_str!("../README.md"),
    include_str!("../docs/linear-attention.md"),
    include_str!("../docs/model.md"),
    include_str!("../docs/kernels.md"),
    include_str!("../docs/candle.md"),
    include_str!("../docs/emulator.md"),
    include_str!("../docs/development.md"),
    include_str!("../docs/benchmarks.md"),
];

/// [`DEFAULT_TEXT`] as one byte string.
pub fn default_text() -> Vec<u8> {
    DEFAULT_TEXT.join("\n").into_bytes()
}

/// Settings of a training run.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The text to learn; [`default_text`] when `None`.
    pub text: Option<PathBuf>,
    /// The attention kinds to train, in order.
    pub kinds: Vec<AttentionKind>,
    /// Model sizes; the attention kind is set per run.
    pub config: Config,
    /// AdamW steps per model.
    pub steps: usize,
    /// Bytes per training sequence.
    pub seq_len: usize,
    /// Sequences per step.
    pub batch: usize,
    /// AdamW learning rate (constant).
    pub lr: f64,
    /// Output directory: checkpoints and the plot.
    pub out: PathBuf,
    /// Seed of the weights and of the batch order (the same for every kind).
    pub seed: u64,
    /// Where to run.
    pub backend: BackendChoice,
    /// Validation every this many steps (and after the last).
    pub eval_every: usize,
    /// Validation windows per evaluation (at most; spread over the split).
    pub eval_windows: usize,
    /// Share of the text held out for validation (its end).
    pub val_fraction: f64,
    /// Tokens generated to time each trained model.
    pub gen_tokens: usize,
    /// Show progress bars (stderr, only when it is a terminal).
    pub progress: bool,
}

impl Default for TrainOptions {
    /// Sized for about five minutes on two CPU cores (release build).
    fn default() -> Self {
        TrainOptions {
            text: None,
            kinds: AttentionKind::ALL.to_vec(),
            config: Config {
                d_model: 64,
                heads: 4,
                layers: 2,
                mlp: 256,
                ..Config::default()
            },
            steps: 300,
            seq_len: 64,
            batch: 16,
            lr: 3e-3,
            out: PathBuf::from("linattn-train"),
            seed: 0,
            backend: BackendChoice::Auto,
            eval_every: 50,
            eval_windows: 64,
            val_fraction: 0.1,
            gen_tokens: 512,
            progress: true,
        }
    }
}

/// The curves and results of one model.
#[derive(Debug, Clone)]
pub struct Run {
    /// Which attention.
    pub kind: AttentionKind,
    /// (step, mean training loss in bits per byte since the previous point).
    pub train: Vec<(usize, f64)>,
    /// (step, validation loss in bits per byte).
    pub val: Vec<(usize, f64)>,
    /// Training throughput, tokens per second (validation excluded).
    pub tokens_per_s: f64,
    /// Where the weights were saved.
    pub checkpoint: PathBuf,
    /// Decode times of the trained model.
    pub generation: Timeline,
    /// A sample from the trained model.
    pub sample: Vec<u8>,
}

impl Run {
    /// The last validation loss.
    pub fn final_val(&self) -> f64 {
        self.val.last().map_or(f64::NAN, |p| p.1)
    }

    /// The first validation loss (the untrained model).
    pub fn initial_val(&self) -> f64 {
        self.val.first().map_or(f64::NAN, |p| p.1)
    }
}

/// What a training run produced.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// The backend used and why.
    pub backend: String,
    /// One entry per attention kind.
    pub runs: Vec<Run>,
    /// The loss plot.
    pub svg: PathBuf,
}

fn check(opts: &TrainOptions) -> Result<()> {
    anyhow::ensure!(!opts.kinds.is_empty(), "no attention kind to train");
    anyhow::ensure!(opts.steps >= 1, "--steps must be at least 1");
    anyhow::ensure!(opts.batch >= 1, "--batch must be at least 1");
    anyhow::ensure!(opts.eval_every >= 1, "--eval-every must be at least 1");
    anyhow::ensure!(
        opts.gen_tokens >= 1,
        "the generation timing needs at least 1 token"
    );
    opts.config.validate()?;
    Ok(())
}

/// Trains every kind of `opts.kinds`, prints progress and the table to
/// `out`, writes the checkpoints and the plot into `opts.out`.
pub fn run(opts: &TrainOptions, out: &mut impl Write) -> Result<TrainReport> {
    check(opts)?;
    let text = match &opts.text {
        Some(p) => std::fs::read(p).with_context(|| format!("reading the text {}", p.display()))?,
        None => default_text(),
    };
    let what = match &opts.text {
        Some(p) => p.display().to_string(),
        None => "the project's docs (built in)".into(),
    };
    let data = TextData::new(&text, opts.seq_len, opts.val_fraction)
        .with_context(|| format!("preparing the text {what}"))?;
    let selection = select_backend(opts.backend)?;
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating the output directory {}", opts.out.display()))?;
    writeln!(out, "backend: {}", selection.reason)?;
    writeln!(
        out,
        "text: {what}: {} bytes ({} train, {} validation)",
        text.len(),
        data.train_bytes().len(),
        data.val_bytes().len()
    )?;
    writeln!(out, "{}", models_line(&opts.config, opts.seed))?;
    writeln!(
        out,
        "training: {} steps of {} x {} bytes, AdamW lr {}, validation every {} steps",
        opts.steps, opts.batch, opts.seq_len, opts.lr, opts.eval_every
    )?;
    out.flush()?;
    let device = selection.device.clone();
    let val = data.val_batches(opts.batch, opts.eval_windows, &device)?;
    let prompt = sample_prompt(data.val_bytes());
    let mut runs = Vec::new();
    for &kind in &opts.kinds {
        let model = Model::random_on(opts.config.with_attention(kind), opts.seed, &device)?;
        let mut trainer = Trainer::new(&model, opts.lr)?;
        // The same seed for every kind: the same batches in the same order.
        let mut rng = Rng::new(opts.seed ^ 0xda7a);
        let bar = progress_bar(opts.progress, opts.steps, kind);
        let mut train = Vec::new();
        let mut val_curve = vec![(0, trainer.evaluate(&val)?)];
        let (mut sum, mut count) = (0.0, 0usize);
        let mut busy = 0.0f64;
        for step in 1..=opts.steps {
            let batch = data.train_batch(&mut rng, opts.batch, &device)?;
            let t0 = Instant::now();
            let bpb = trainer
                .step(&batch)
                .with_context(|| format!("{kind} attention, step {step}"))?;
            busy += t0.elapsed().as_secs_f64();
            sum += bpb;
            count += 1;
            let tokens_per_s = (step * opts.batch * opts.seq_len) as f64 / busy.max(1e-9);
            if step % opts.eval_every == 0 || step == opts.steps {
                train.push((step, sum / count as f64));
                (sum, count) = (0.0, 0);
                val_curve.push((step, trainer.evaluate(&val)?));
            }
            bar.set_position(step as u64);
            bar.set_message(format!(
                "loss {bpb:.3} bits/byte, val {:.3}, {tokens_per_s:.0} tokens/s",
                val_curve.last().map_or(f64::NAN, |p| p.1)
            ));
        }
        bar.finish_and_clear();
        let tokens_per_s = (opts.steps * opts.batch * opts.seq_len) as f64 / busy.max(1e-9);
        let trained = trainer.model();
        let checkpoint = opts.out.join(format!("{kind}.safetensors"));
        trained
            .save(&checkpoint)
            .with_context(|| format!("saving {}", checkpoint.display()))?;
        let generation = timeline(trained, &prompt, opts.gen_tokens, opts.seed)?;
        let sample = trained.generate(&prompt, 120, Sampling::Temperature(0.8), opts.seed)?;
        let run = Run {
            kind,
            train,
            val: val_curve,
            tokens_per_s,
            checkpoint,
            generation,
            sample,
        };
        writeln!(
            out,
            "{kind}: validation {:.3} -> {:.3} bits/byte in {} steps ({:.0} tokens/s); saved {}",
            run.initial_val(),
            run.final_val(),
            opts.steps,
            run.tokens_per_s,
            run.checkpoint.display()
        )?;
        out.flush()?;
        runs.push(run);
    }
    print_table(out, &runs, &prompt)?;
    let svg = opts.out.join("loss.svg");
    let title = format!(
        "Bits per byte while training ({}; d_model {}, {} layers, {} x {} bytes per step)",
        selection.short(),
        opts.config.d_model,
        opts.config.layers,
        opts.batch,
        opts.seq_len
    );
    plot(&svg, &title, &runs).with_context(|| format!("writing the plot to {}", svg.display()))?;
    writeln!(out, "\nplot written to {}", svg.display())?;
    if let Some(r) = runs.first() {
        writeln!(
            out,
            "sample: linattn generate --weights {} --prompt {:?}",
            r.checkpoint.display(),
            String::from_utf8_lossy(&prompt)
        )?;
    }
    Ok(TrainReport {
        backend: selection.reason,
        runs,
        svg,
    })
}

/// The first line start of the validation text (its very start if it has
/// no newline), up to 24 bytes cut at a word boundary: the prompt of the
/// samples and of the generation timing.
fn sample_prompt(val: &[u8]) -> Vec<u8> {
    let start = val
        .iter()
        .position(|&b| b == b'\n')
        .map_or(0, |i| i + 1)
        .min(val.len().saturating_sub(1));
    let val = &val[start..];
    let head = &val[..val.len().min(24)];
    let cut = head
        .iter()
        .rposition(|&b| b == b' ')
        .filter(|&i| i > 0)
        .unwrap_or(head.len());
    head[..cut].to_vec()
}

fn progress_bar(show: bool, steps: usize, kind: AttentionKind) -> ProgressBar {
    let bar = if show {
        ProgressBar::new(steps as u64)
    } else {
        ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::hidden())
    };
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{kind:>7} [{{bar:30}}] {{pos}}/{{len}} steps, {{elapsed}}, {{msg}}"
        ))
        .expect("static template")
        .progress_chars("=> "),
    );
    bar
}

fn print_table(out: &mut impl Write, runs: &[Run], prompt: &[u8]) -> Result<()> {
    writeln!(
        out,
        "\nbits per byte (lower is better) and generation speed:"
    )?;
    writeln!(
        out,
        "{:>9}  {:>10}  {:>10}  {:>9}  {:>14}  {:>18}",
        "attention", "train bpb", "val bpb", "val start", "train tokens/s", "gen ms/token (med)"
    )?;
    for r in runs {
        let gen = &r.generation;
        let lo = gen.positions.first().copied().unwrap_or(0);
        let hi = gen.positions.last().map_or(lo, |p| p + 1);
        writeln!(
            out,
            "{:>9}  {:>10.3}  {:>10.3}  {:>9.3}  {:>14.0}  {:>18.3}",
            r.kind.as_str(),
            r.train.last().map_or(f64::NAN, |p| p.1),
            r.final_val(),
            r.initial_val(),
            r.tokens_per_s,
            gen.median_ms(lo, hi).unwrap_or(f64::NAN)
        )?;
    }
    writeln!(out, "\nsamples (temperature 0.8):")?;
    for r in runs {
        writeln!(
            out,
            "  {}: {}{}",
            r.kind,
            printable(prompt),
            printable(&r.sample).replace('\n', " ")
        )?;
    }
    Ok(())
}

/// Writes the plot: train and validation bits per byte against the step,
/// one colour per attention kind (train light, validation dark).
pub fn plot(path: &Path, title: &str, runs: &[Run]) -> Result<()> {
    use plotters::style::RGBColor;

    let x_max = runs
        .iter()
        .flat_map(|r| r.val.iter().map(|p| p.0))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let points = || runs.iter().flat_map(|r| r.train.iter().chain(&r.val));
    let y_max = points().map(|p| p.1).fold(0.0f64, f64::max).max(1e-3) * 1.05;
    let y_min = points()
        .map(|p| p.1)
        .fold(f64::INFINITY, f64::min)
        .min(y_max)
        * 0.9;
    let mut lines = Vec::new();
    for r in runs {
        let (light, dark) = match r.kind {
            AttentionKind::Linear => (RGBColor(158, 202, 225), RGBColor(31, 119, 180)),
            AttentionKind::Softmax => (RGBColor(252, 174, 145), RGBColor(214, 39, 40)),
        };
        let line = |data: &[(usize, f64)], colour, label| chart::Line {
            points: data.iter().map(|&(s, y)| (s as f64, y)).collect(),
            colour,
            label,
        };
        lines.push(line(
            &r.train,
            light,
            format!("{} attention, train", r.kind),
        ));
        lines.push(line(
            &r.val,
            dark,
            format!("{} attention, validation ({:.3})", r.kind, r.final_val()),
        ));
    }
    let axes = chart::Axes {
        title,
        x_desc: "training step",
        y_desc: "loss (bits per byte)",
        x: 0.0..x_max,
        y: y_min..y_max,
        y_decimals: 2,
        legend: plotters::chart::SeriesLabelPosition::UpperRight,
    };
    chart::write_svg(path, axes, lines)
}
