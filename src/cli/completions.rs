//! `ragd-pipe completions`: the shell completion script, generated from the same clap types
//! that parse the command line, so it never falls behind.

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::{Cli, Failure};
use crate::output::Printer;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell. Bash: `ragd-pipe completions bash >
    /// ~/.local/share/bash-completion/completions/ragd-pipe`.
    pub shell: Shell,
}

pub(super) fn execute(args: &CompletionsArgs, printer: &Printer) -> Result<(), Failure> {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "ragd-pipe", &mut script);
    printer.result(&String::from_utf8_lossy(&script));
    Ok(())
}
