use clap::Parser;

fn main() -> std::process::ExitCode {
    ragd_pipe::run(ragd_pipe::cli::Cli::parse())
}
