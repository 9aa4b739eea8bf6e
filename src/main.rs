//! The `gopush` binary: parse the command line and hand off to [`gopush::cli`].

// jemalloc rather than glibc malloc: a proxy allocates and frees small buffers per message on
// every thread; measured in benches/FINDINGS.md ("The allocator").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    gopush::cli::main()
}
