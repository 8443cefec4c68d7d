//! Which burn backend a command runs on. CPU (flex) is always compiled; GPU backends come with
//! cargo features so the default build stays lean.

pub use dipole_train::config::Backend as BackendKind;

/// The cargo feature that builds `kind` in.
pub fn feature(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Cpu => "(always built)",
        BackendKind::Ndarray => "ndarray",
        BackendKind::Wgpu => "wgpu",
        BackendKind::Vulkan => "vulkan",
        BackendKind::Metal => "metal",
        BackendKind::Cuda => "cuda",
    }
}

/// What a GPU backend needs from the machine, for the error when it cannot start.
#[cfg_attr(not(any(feature = "wgpu", feature = "vulkan", feature = "metal", feature = "cuda")), allow(dead_code))]
fn needs(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::Cuda => "an NVIDIA GPU with its driver (libcuda.so) and NVRTC (libnvrtc.so) on the library path",
        BackendKind::Wgpu | BackendKind::Vulkan | BackendKind::Metal => "a GPU adapter that wgpu can open (Vulkan, Metal or DX12 drivers)",
        BackendKind::Cpu | BackendKind::Ndarray => "nothing",
    }
}

/// Runs one tiny computation on `device` so a backend that cannot start (no driver, no adapter)
/// is an error naming it and what it needs, instead of a panic deep inside its runtime.
#[cfg_attr(not(any(feature = "wgpu", feature = "vulkan", feature = "metal", feature = "cuda")), allow(dead_code))]
pub fn probe<B: burn::tensor::backend::Backend>(kind: BackendKind, device: &B::Device) -> anyhow::Result<()> {
    starts(kind, || {
        burn::tensor::Tensor::<B, 1>::ones([1], device).sum().into_data();
    })
}

/// `first_use` run with its panic (the GPU runtimes' way of saying a library or adapter is
/// missing) caught and returned as an error naming the backend, quietly (no backtrace).
#[cfg_attr(not(any(test, feature = "wgpu", feature = "vulkan", feature = "metal", feature = "cuda")), allow(dead_code))]
fn starts(kind: BackendKind, first_use: impl FnOnce()) -> anyhow::Result<()> {
    thread_local!(static PROBING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    static QUIET_WHILE_PROBING: std::sync::Once = std::sync::Once::new();
    // one hook for the process, silent only on a thread that is probing
    QUIET_WHILE_PROBING.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !PROBING.with(|p| p.get()) {
                default(info);
            }
        }));
    });
    PROBING.with(|p| p.set(true));
    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(first_use));
    PROBING.with(|p| p.set(false));
    started.map_err(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown failure".into());
        anyhow::anyhow!("backend {kind:?} cannot start on this machine: {why} (it needs {})", needs(kind))
    })
}

/// Calls `$run::<Backend>(&device, args..)` for the chosen backend (a GPU backend probed first, see
/// [`probe`]), or fails with the cargo feature that would compile it in.
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
            BackendKind::Wgpu => {
                let device = Default::default();
                $crate::backend::probe::<burn::backend::Wgpu>(BackendKind::Wgpu, &device)?;
                $run::<burn::backend::Wgpu>(&device, $($arg),*)
            }
            #[cfg(feature = "vulkan")]
            BackendKind::Vulkan => {
                let device = Default::default();
                $crate::backend::probe::<burn::backend::Vulkan>(BackendKind::Vulkan, &device)?;
                $run::<burn::backend::Vulkan>(&device, $($arg),*)
            }
            #[cfg(feature = "metal")]
            BackendKind::Metal => {
                let device = Default::default();
                $crate::backend::probe::<burn::backend::Metal>(BackendKind::Metal, &device)?;
                $run::<burn::backend::Metal>(&device, $($arg),*)
            }
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => {
                let device = Default::default();
                $crate::backend::probe::<burn::backend::Cuda>(BackendKind::Cuda, &device)?;
                $run::<burn::backend::Cuda>(&device, $($arg),*)
            }
            other => Err(anyhow::anyhow!(
                "backend {:?} is not compiled into this binary; rebuild with `--features {}`",
                other,
                $crate::backend::feature(other)
            )),
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_that_starts_passes_the_probe() {
        probe::<burn::backend::Flex>(BackendKind::Cpu, &Default::default()).unwrap();
    }

    #[test]
    fn a_backend_whose_runtime_panics_is_an_error_naming_it() {
        let err = starts(BackendKind::Cuda, || panic!("Unable to dynamically load the \"cuda\" shared library")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "backend Cuda cannot start on this machine: Unable to dynamically load the \"cuda\" shared library (it needs an NVIDIA GPU with its driver (libcuda.so) and NVRTC (libnvrtc.so) on the library path)"
        );
    }
}
