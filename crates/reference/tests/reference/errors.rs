//! Bad input returns a clear error, never a panic.

use linattn_reference::{
    causal_linear_attention, causal_linear_attention_with, decode_step, softmax_attention,
    varlen_causal_linear_attention, Form, KvCache, Layout, LinearAttentionOptions, ReferenceError,
    State, Tensor, View,
};

fn zeros(l: &Layout) -> Vec<f64> {
    vec![0.0; l.required_len().unwrap()]
}

fn err_of<T: std::fmt::Debug>(r: Result<T, ReferenceError>) -> ReferenceError {
    r.expect_err("expected an error")
}

#[test]
fn mismatched_shapes_name_the_argument() {
    let o = LinearAttentionOptions::default();
    let lq = Layout::bhnd(1, 2, 5, 4);
    let q = zeros(&lq);
    let qv = View::new(&q, lq).unwrap();
    for (bad_k, bad_v, arg) in [
        (Layout::bhnd(1, 2, 6, 4), Layout::bhnd(1, 2, 5, 3), "k"),
        (Layout::bhnd(1, 2, 5, 3), Layout::bhnd(1, 2, 5, 3), "k"),
        (Layout::bhnd(1, 2, 5, 4), Layout::bhnd(2, 2, 5, 3), "v"),
        (Layout::bhnd(1, 2, 5, 4), Layout::bhnd(1, 1, 5, 3), "v"),
    ] {
        let (k, v) = (zeros(&bad_k), zeros(&bad_v));
        let e = err_of(causal_linear_attention(
            qv,
            View::new(&k, bad_k).unwrap(),
            View::new(&v, bad_v).unwrap(),
            &o,
            None,
        ));
        assert!(
            matches!(e, ReferenceError::ShapeMismatch { arg, func: "causal_linear_attention", .. } if arg == arg),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("causal_linear_attention") && msg.contains(&format!("`{arg}`")),
            "{msg}"
        );
        let e = err_of(softmax_attention(
            qv,
            View::new(&k, bad_k).unwrap(),
            View::new(&v, bad_v).unwrap(),
            true,
            None,
        ));
        assert!(matches!(e, ReferenceError::ShapeMismatch { .. }), "{e}");
    }
}

#[test]
fn overlapping_strides_are_rejected() {
    let base = Layout::bnhd(2, 3, 4, 5);
    let bad = [
        Layout {
            head_stride: 4,
            ..base
        }, // rows of adjacent heads share an element
        Layout {
            token_stride: 0,
            ..base
        }, // every token aliases token 0
        Layout {
            batch_stride: 15,
            ..base
        }, // batch 1 starts inside batch 0
        Layout {
            head_stride: 5,
            token_stride: 5,
            ..base
        }, // head 1 == token 1
    ];
    for l in bad {
        let e = err_of(l.validate());
        assert!(
            matches!(e, ReferenceError::OverlappingStrides { .. }),
            "{l:?}: {e}"
        );
        let data = vec![0.0f64; 10_000];
        assert!(matches!(
            err_of(View::new(&data, l)),
            ReferenceError::OverlappingStrides { .. }
        ));
    }
    // Interleaved but disjoint strides that do not nest are accepted.
    let ok = Layout {
        batch: 1,
        heads: 2,
        tokens: 3,
        dim: 1,
        batch_stride: 0,
        token_stride: 2,
        head_stride: 3,
    };
    assert_eq!(ok.validate(), Ok(8));
    // A zero stride on an axis of extent 1 is fine (broadcast of a single row).
    let one = Layout {
        batch_stride: 0,
        ..Layout::bhnd(1, 2, 3, 4)
    };
    assert!(one.validate().is_ok());
}

#[test]
fn overflowing_strides_are_rejected() {
    let l = Layout {
        batch: 3,
        batch_stride: usize::MAX / 2 + 1,
        ..Layout::bhnd(3, 1, 1, 1)
    };
    assert!(matches!(
        err_of(l.validate()),
        ReferenceError::StrideOverflow { .. }
    ));
    let huge = Layout::bhnd(usize::MAX / 4, 8, 8, 8);
    assert!(matches!(
        err_of(huge.validate()),
        ReferenceError::StrideOverflow { .. }
    ));
    assert_eq!(huge.required_len(), None);
    assert!(Tensor::<f64>::zeros(huge).is_err());
}

#[test]
fn zero_sized_dims_are_rejected_but_empty_sequences_are_not() {
    for (l, dim) in [
        (Layout::bhnd(0, 1, 1, 1), "batch"),
        (Layout::bhnd(1, 0, 1, 1), "heads"),
        (Layout::bhnd(1, 1, 1, 0), "dim"),
    ] {
        let e = err_of(View::new(&[0.0f64; 4], l));
        assert_eq!(
            e,
            ReferenceError::ZeroSized {
                func: "View::new",
                arg: "layout",
                dim
            }
        );
    }
    // N = 0: empty output, state passes through.
    let (lq, lv) = (Layout::bhnd(1, 1, 0, 2), Layout::bhnd(1, 1, 0, 3));
    let init = vec![State {
        d: 2,
        m: 3,
        s: vec![1.0; 6],
        z: vec![2.0; 2],
    }];
    let (out, fin) = causal_linear_attention(
        View::new(&[], lq).unwrap(),
        View::new(&[], lq).unwrap(),
        View::new(&[], lv).unwrap(),
        &LinearAttentionOptions::default(),
        Some(&init),
    )
    .unwrap();
    assert!(out.data().is_empty());
    assert_eq!(fin, init);
    assert!(matches!(
        err_of(KvCache::<f64>::new(1, 1, 0, 1)),
        ReferenceError::ZeroSized { .. }
    ));
}

#[test]
fn short_buffers_are_rejected() {
    let l = Layout::bnhd(1, 2, 3, 4);
    let e = err_of(View::new(&[0.0f64; 23], l));
    assert_eq!(
        e,
        ReferenceError::BufferTooShort {
            func: "View::new",
            arg: "layout",
            len: 23,
            required: 24
        }
    );
    assert!(e.to_string().contains("expected at least 24"));
    let t = Tensor::zeros(Layout::bhnd(1, 2, 3, 4)).unwrap();
    let mut out = vec![0.0f64; 10];
    assert!(matches!(
        err_of(t.write_into(&mut out, &l)),
        ReferenceError::BufferTooShort { arg: "out", .. }
    ));
    assert!(matches!(
        err_of(t.to_layout(&Layout::bnhd(1, 2, 3, 5))),
        ReferenceError::ShapeMismatch { .. }
    ));
}

#[test]
fn bad_offsets_are_rejected() {
    let l = Layout::packed(6, 1, 2);
    let x = zeros(&l);
    let v = View::new(&x, l).unwrap();
    let o = LinearAttentionOptions::default();
    for cu in [&[0, 4, 3, 6][..], &[1, 6], &[0, 5], &[0, 7], &[0], &[]] {
        let e = err_of(varlen_causal_linear_attention(v, v, v, cu, &o, None));
        assert!(
            matches!(
                e,
                ReferenceError::InvalidOffsets {
                    arg: "cu_seqlens",
                    ..
                }
            ),
            "{cu:?}: {e}"
        );
    }
    // Wrong number of initial states for 2 sequences x 1 head.
    let init = State::zeros_vec(1, 2, 2);
    let e = err_of(varlen_causal_linear_attention(
        v,
        v,
        v,
        &[0, 3, 6],
        &o,
        Some(&init),
    ));
    assert!(
        matches!(e, ReferenceError::ShapeMismatch { arg: "initial", .. }),
        "{e}"
    );
    // Varlen needs batch 1.
    let lb = Layout::bnhd(2, 1, 3, 2);
    let e = err_of(varlen_causal_linear_attention(
        View::new(&x, lb).unwrap(),
        View::new(&x, lb).unwrap(),
        View::new(&x, lb).unwrap(),
        &[0, 3],
        &o,
        None,
    ));
    assert!(
        matches!(e, ReferenceError::ShapeMismatch { arg: "q", .. }),
        "{e}"
    );
}

#[test]
fn bad_options_and_states_are_rejected() {
    let l = Layout::bhnd(1, 1, 3, 2);
    let x = zeros(&l);
    let v = View::new(&x, l).unwrap();
    let o = LinearAttentionOptions::default();
    let e = err_of(causal_linear_attention_with(
        Form::Chunked { chunk: 0 },
        v,
        v,
        v,
        &o,
        None,
    ));
    assert!(matches!(
        e,
        ReferenceError::InvalidValue { arg: "form", .. }
    ));
    for bad in [
        LinearAttentionOptions { eps: f64::NAN, ..o },
        LinearAttentionOptions { eps: -1.0, ..o },
        LinearAttentionOptions {
            scale: f64::INFINITY,
            ..o
        },
    ] {
        assert!(matches!(
            err_of(causal_linear_attention(v, v, v, &bad, None)),
            ReferenceError::InvalidValue { .. }
        ));
    }
    let wrong = vec![State {
        d: 2,
        m: 2,
        s: vec![0.0; 3],
        z: vec![0.0; 2],
    }];
    assert!(matches!(
        err_of(causal_linear_attention(v, v, v, &o, Some(&wrong))),
        ReferenceError::ShapeMismatch { arg: "initial", .. }
    ));
    let mut st = State::<f64>::zeros(2, 3);
    let e = err_of(decode_step(&mut st, &[0.0; 2], &[0.0; 3], &[0.0; 3], &o));
    assert!(
        matches!(
            e,
            ReferenceError::ShapeMismatch {
                func: "decode_step",
                arg: "k",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        st,
        State::zeros(2, 3),
        "a rejected step must not touch the state"
    );
    let cache = KvCache::<f64>::new(1, 2, 2, 2).unwrap();
    assert!(matches!(
        err_of(cache.attend(v, None)),
        ReferenceError::ShapeMismatch { .. }
    ));
}
