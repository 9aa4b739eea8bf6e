//! The `gopush` binary: parse the command line and hand off to [`gopush::cli`].

fn main() -> std::process::ExitCode {
    gopush::cli::main()
}
