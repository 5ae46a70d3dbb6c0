//! The tiling and schedule policies and the launch plans, for tests,
//! benches and tools that check or measure them. Not part of the API:
//! names and signatures follow the kernels.
#![doc(hidden)]

/// The forward's tiling, schedule policy and plan steps.
pub mod forward {
    pub use crate::ops::forward::plan::{
        base_params, call_schedule, kernel_name, plan, scan_launch, walk_launch, ForwardPlan,
        Launch,
    };
    pub use crate::ops::forward::tiling::*;
}

/// The backward's passes, tiling, policies and plan steps.
pub mod backward {
    pub use crate::ops::backward::plan::{
        base_params, kernel_name, layout, plan, BackwardLaunch, Layout, Steps,
    };
    pub use crate::ops::backward::tiling::*;
}
