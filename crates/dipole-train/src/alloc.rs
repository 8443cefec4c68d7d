//! The process allocator, tuned for training. glibc's malloc serves every block above its mmap
//! threshold (128 KiB at first) straight from the kernel and returns it on free, so a step's
//! tensors (megabytes each, all freed by the next step) are page-faulted in and zeroed again every
//! step, at a large cost in kernel time. Raising the thresholds keeps freed blocks in the heap for the
//! next step (measured in docs/benchmarks.md). `cargo xtask` calls this first thing; a program using
//! the library can too.
//!
//! It also keeps every thread on one arena: a sharded step (`train.batch_shards`) allocates on
//! several threads, and with an arena per thread each arena holds its own high-water mark, nearly
//! doubling peak memory; one arena keeps the unsharded peak at the same speed (tensor-sized allocations are too few for the shared lock to matter).

/// Raises glibc's mmap and trim thresholds and keeps one arena. Returns whether the allocator took the settings
/// (false on other C libraries and platforms, where nothing is changed).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_ARENA_MAX: i32 = -8;
        // 32 MiB is the largest mmap threshold glibc accepts on 64-bit targets; larger blocks (a
        // vocabulary-sized logits tensor) still come from mmap.
        // SAFETY: mallopt only changes allocator parameters; it is called with valid options.
        unsafe { mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, i32::MAX) == 1 && mallopt(M_TOP_PAD, 64 << 20) == 1 && mallopt(M_ARENA_MAX, 1) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_takes_the_settings() {
        let took = super::keep_freed_memory();
        assert_eq!(took, cfg!(all(target_os = "linux", target_env = "gnu")));
    }
}
