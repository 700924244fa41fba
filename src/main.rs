use clap::Parser;

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    ragd_pipe::run(ragd_pipe::cli::Cli::parse())
}

/// glibc hands buffers over its mmap threshold straight back to the kernel when freed (and trims
/// the heap's top), so every training step's activations, tens of MB each, were mapped, zeroed by
/// the kernel page by page and unmapped again: 105 million page faults in one pyfaq run, and 45%
/// of a training step (4.0 s to 2.1 s measured here). Keeping freed memory in the heap for reuse
/// does not raise the peak. One arena per core keeps the reuse across rayon's threads.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let arenas = i32::try_from(cores).unwrap_or(i32::MAX);
    // SAFETY: mallopt sets allocator parameters only; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
