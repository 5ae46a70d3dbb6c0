//! Integration tests of linattn-reference (one binary, several modules, to
//! keep link time down). Randomised tests print their seed; replay a failure
//! with `LINATTN_TEST_SEED=<seed>`.

mod common;
mod errors;
mod forms;
mod grads;
mod props;
mod softmax;
