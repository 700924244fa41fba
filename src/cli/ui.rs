//! `ragd-pipe ui`: the dashboard in a browser.

use std::path::PathBuf;

use clap::Args;

use super::Failure;
use crate::output::Printer;
use crate::registry;
use crate::ui::{self, UiOptions};

#[derive(Debug, Args)]
pub struct UiArgs {
    /// The project folder: its recipes (`*.yaml`, `recipes/*.yaml`) are offered, and the
    /// dashboard keeps its queue and uploads in `.ragd-ui/` inside it.
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// The port (0 picks a free one).
    #[arg(long, default_value_t = 8417)]
    pub port: u16,
    /// The address to bind; anything but loopback requires `--token`.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// A secret every request must carry (open the printed address once; a cookie keeps it).
    #[arg(long, env = "RAGD_UI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The largest upload accepted, in MiB.
    #[arg(long, default_value_t = 64)]
    pub max_upload_mib: usize,
}

pub(super) fn execute(args: &UiArgs, printer: &Printer) -> Result<(), Failure> {
    let registry_failure = |e: registry::RegistryError| {
        Failure::report(miette::miette!("{}", crate::error_chain(&e)), 2)
    };
    let options = UiOptions {
        dir: args.dir.clone(),
        host: args.host.clone(),
        port: args.port,
        token: args.token.clone().filter(|t| !t.is_empty()),
        max_upload_bytes: args.max_upload_mib.saturating_mul(1024 * 1024),
        // The registry runs register into: `$RAGD_HOME/models`, else `~/.ragd/models`.
        registry: registry::default_root().map_err(registry_failure)?,
        ragd_home: registry::default_ragd_home().map_err(registry_failure)?,
    };
    let token = options.token.clone();
    let runtime = super::runtime()?;
    let served = runtime.block_on(ui::serve(options, |address| {
        let query = token.map(|t| format!("?token={t}")).unwrap_or_default();
        printer.status(&format!(
            "dashboard on http://{address}/{query} (Ctrl-C stops it; a run in progress keeps its journals)"
        ));
    }));
    runtime.shutdown_background();
    served.map_err(|e| {
        let code = match e {
            ui::UiError::TokenRequired { .. } | ui::UiError::NotAFolder { .. } => 1,
            _ => 2,
        };
        Failure::new(e, code)
    })
}
