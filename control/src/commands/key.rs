//! `mvc key`: the user's Ed25519 key.
use crate::{default_key_path, load_user_key, print};
use anyhow::{bail, Result};
use clap::Subcommand;
use control::agent::{self};
use control::auth::SigningKey;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Make a new key (refuses to overwrite unless --force) and print its public half.
    Gen {
        /// Where to write it (default: --key, or ~/.config/mvc/user.key).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overwrite an existing key.
        #[arg(long)]
        force: bool,
    },
    /// Print the public key of --key.
    Show,
}

/// Run `mvc key CMD`.
pub fn run(k: KeyCmd, key: &Option<PathBuf>, json: bool) -> Result<()> {
    match k {
        KeyCmd::Gen { out, force } => {
            let path = out.or_else(|| key.clone()).unwrap_or_else(default_key_path);
            if path.exists() && !force {
                bail!("{} exists; pass --force to replace it", path.display());
            }
            let k = SigningKey::generate()?;
            agent::write_private(&path, &k.to_file_text())?;
            let v = serde_json::json!({"key_file": path, "public_key": k.public_hex()});
            print(json, &v, |_| format!("{}\n", k.public_hex()))
        }
        KeyCmd::Show => {
            let k = load_user_key(key)?;
            let v = serde_json::json!({"public_key": k.public_hex()});
            print(json, &v, |_| format!("{}\n", k.public_hex()))
        }
    }
}
