//! `unimic bench tokenizer`: not built yet; its issue replaces this module.

/// Arguments (none yet).
#[derive(clap::Args)]
pub struct Args {}

/// Refuses: this command does not exist yet.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`unimic bench tokenizer` is not available in this build yet")
}
