//! Which burn backend a command runs on. CPU (flex) is always compiled; GPU backends come with
//! cargo features so the default build stays lean.

use clap::ValueEnum;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// burn's pure-Rust CPU backend (flex).
    Cpu,
    /// burn's ndarray CPU backend (feature `ndarray`), kept for comparison.
    Ndarray,
    /// wgpu: Vulkan, Metal or DX12, whichever the machine has (feature `wgpu`).
    Wgpu,
    /// wgpu restricted to Vulkan (feature `vulkan`).
    Vulkan,
    /// wgpu restricted to Metal (feature `metal`).
    Metal,
    /// CUDA through cubecl, kernels compiled at run time by NVRTC (feature `cuda`).
    Cuda,
}

impl BackendKind {
    pub fn feature(self) -> &'static str {
        match self {
            BackendKind::Cpu => "(always built)",
            BackendKind::Ndarray => "ndarray",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Vulkan => "vulkan",
            BackendKind::Metal => "metal",
            BackendKind::Cuda => "cuda",
        }
    }
}

/// Calls `$run::<Backend>(&device, args..)` for the chosen backend, or fails with the cargo feature
/// that would compile it in.
#[macro_export]
macro_rules! with_backend {
    ($kind:expr, $run:ident ( $($arg:expr),* $(,)? )) => {{
        use $crate::backend::BackendKind;
        #[allow(unreachable_patterns)]
        match $kind {
            BackendKind::Cpu => $run::<burn::backend::Flex>(&Default::default(), $($arg),*),
            #[cfg(feature = "ndarray")]
            BackendKind::Ndarray => $run::<burn::backend::NdArray>(&Default::default(), $($arg),*),
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => $run::<burn::backend::Wgpu>(&Default::default(), $($arg),*),
            #[cfg(feature = "vulkan")]
            BackendKind::Vulkan => $run::<burn::backend::Vulkan>(&Default::default(), $($arg),*),
            #[cfg(feature = "metal")]
            BackendKind::Metal => $run::<burn::backend::Metal>(&Default::default(), $($arg),*),
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => $run::<burn::backend::Cuda>(&Default::default(), $($arg),*),
            other => Err(anyhow::anyhow!(
                "backend {:?} is not compiled into this binary; rebuild with `--features {}`",
                other,
                other.feature()
            )),
        }
    }};
}
