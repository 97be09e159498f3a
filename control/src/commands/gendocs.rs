//! `mvc gen-docs`: writes shell completions and man pages made from the clap definitions,
//! for the Debian package (packaging/build-deb) and for installs by hand.
use anyhow::{Context, Result};
use clap::Args;
use clap_complete::Shell;
use std::path::{Path, PathBuf};

/// Options of `mvc gen-docs`.
#[derive(Args)]
pub struct GenDocsArgs {
    /// Directory to write `completions/` (bash, zsh, fish) and `man/` (section 1) into.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// Writes the completions and one man page per command and subcommand
/// (`mvc.1`, `mvc-edge.1`, `mvc-agent-run.1`, ...).
pub fn run(a: GenDocsArgs, mut cmd: clap::Command) -> Result<()> {
    let comp = a.out.join("completions");
    let man = a.out.join("man");
    for d in [&comp, &man] {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    for sh in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(sh, &mut cmd, "mvc", &comp)
            .with_context(|| format!("write {sh} completions into {}", comp.display()))?;
    }
    cmd.build();
    write_man(&cmd, "mvc", &man)
}

fn write_man(cmd: &clap::Command, name: &str, dir: &Path) -> Result<()> {
    if cmd.is_hide_set() {
        return Ok(());
    }
    let page = cmd.clone().display_name(name.to_string());
    let mut text = Vec::new();
    clap_mangen::Man::new(page).render(&mut text)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write_man(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}
