//! `mvc cluster stack|exec|submit`: Slurm in a cluster, and commands on its frontend
//! through the agent (see `control/src/stack.rs`).
use crate::print;
use anyhow::Result;
use clap::Args;
use control::controller::Controller;
use control::stack::{ExecOutput, StackKind, EXEC_TIMEOUT_MAX};
use control::validate;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// `mvc cluster stack NAME slurm`.
#[derive(Args)]
pub struct StackArgs {
    /// Cluster name.
    #[arg(value_parser = validate::cluster_name)]
    pub name: String,
    /// The stack.
    pub kind: StackKind,
    /// Seconds to wait until every compute is idle in Slurm.
    #[arg(long, default_value_t = 60, value_parser = validate::seconds)]
    pub wait: u64,
}

/// `mvc cluster exec NAME -- CMD...`.
#[derive(Args)]
pub struct ExecArgs {
    /// Cluster name.
    #[arg(value_parser = validate::cluster_name)]
    pub name: String,
    /// Run in this VM of the cluster instead of the frontend.
    #[arg(long, value_parser = validate::vm_name)]
    pub vm: Option<String>,
    /// Seconds before the command is killed (at most 3600).
    #[arg(long, default_value_t = 60, value_parser = timeout_arg)]
    pub timeout: u64,
    /// Feed this file to the command's standard input (at most 1 MiB).
    #[arg(long)]
    pub stdin_file: Option<PathBuf>,
    /// The command and its arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub cmd: Vec<String>,
}

/// `mvc cluster submit NAME -- sbatch ...`.
#[derive(Args)]
pub struct SubmitArgs {
    /// Cluster name.
    #[arg(value_parser = validate::cluster_name)]
    pub name: String,
    /// Seconds `sbatch` may take.
    #[arg(long, default_value_t = 60, value_parser = timeout_arg)]
    pub timeout: u64,
    /// Feed this file to sbatch's standard input (a job script, at most 1 MiB).
    #[arg(long)]
    pub stdin_file: Option<PathBuf>,
    /// `sbatch` and its arguments (after `--`; `sbatch` itself may be left out).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

fn timeout_arg(s: &str) -> std::result::Result<u64, String> {
    match s.parse::<u64>() {
        Ok(t) if (1..=EXEC_TIMEOUT_MAX).contains(&t) => Ok(t),
        _ => Err(format!("a timeout is 1 to {EXEC_TIMEOUT_MAX} seconds")),
    }
}

fn read_stdin_file(p: &Option<PathBuf>) -> Result<String> {
    let Some(p) = p else {
        return Ok(String::new());
    };
    let b = std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    if b.len() > control::stack::EXEC_STDIN_MAX {
        return Err(validate::Invalid(format!(
            "{} is over {} bytes",
            p.display(),
            control::stack::EXEC_STDIN_MAX
        ))
        .into());
    }
    String::from_utf8(b).map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", p.display()))
}

/// Print what the command wrote and leave with its exit status.
fn finish(json: bool, out: &ExecOutput, extra: serde_json::Value) -> Result<()> {
    if json {
        let mut v = serde_json::to_value(out)?;
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        print(true, &v, |_| String::new())?;
    } else {
        print!("{}", out.stdout);
        eprint!("{}", out.stderr);
        if out.dropped > 0 {
            eprintln!(
                "mvc: {} bytes of output dropped past the bound",
                out.dropped
            );
        }
        if out.timed_out {
            eprintln!("mvc: the command was killed at its timeout");
        }
    }
    let _ = std::io::stdout().flush();
    match out.code {
        Some(0) => Ok(()),
        Some(c) => std::process::exit(c),
        None => std::process::exit(if out.timed_out { 124 } else { 137 }),
    }
}

/// `mvc cluster stack`.
pub fn stack(c: &mut Controller, a: StackArgs, json: bool) -> Result<()> {
    c.stack_enable(&a.name, a.kind, Duration::from_secs(a.wait))?;
    let v = serde_json::json!({"cluster": a.name, "stack": "slurm"});
    print(json, &v, |_| format!("cluster {}: Slurm enabled\n", a.name))
}

/// `mvc cluster exec`.
pub fn exec(c: &mut Controller, a: ExecArgs, json: bool) -> Result<()> {
    let stdin = read_stdin_file(&a.stdin_file)?;
    let out = c.cluster_exec(&a.name, a.vm.as_deref(), &a.cmd, &stdin, a.timeout)?;
    finish(json, &out, serde_json::json!({}))
}

/// `mvc cluster submit`.
pub fn submit(c: &mut Controller, a: SubmitArgs, json: bool) -> Result<()> {
    let stdin = read_stdin_file(&a.stdin_file)?;
    let (job, out) = c.cluster_submit(&a.name, &a.args, &stdin, a.timeout)?;
    finish(json, &out, serde_json::json!({ "job_id": job }))
}
