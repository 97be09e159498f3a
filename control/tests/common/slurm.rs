//! What the Slurm tests share: `cluster exec` and `srun` on the frontend of cluster
//! `s`, the Slurm daemons of the agents' VMs, and their logs on failure.
use lab::sites::SiteLab;
use std::path::PathBuf;

/// `mvc cluster exec s -- ARGS` on the frontend: (exit status, stdout, stderr).
pub fn exec(sl: &SiteLab, args: &[&str]) -> (i32, String, String) {
    let mut a = vec!["cluster", "exec", "s", "--timeout", "60", "--"];
    a.extend_from_slice(args);
    let o = sl.ctl_output(&a).expect("mvc cluster exec");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

pub fn ok(sl: &SiteLab, args: &[&str]) -> String {
    let (code, out, err) = exec(sl, args);
    assert_eq!(code, 0, "{args:?}: {out}{err}");
    out
}

/// `srun ARGS` in the frontend VM. Slurm 22.05's srun sometimes fails to read the I/O
/// set-up message its tasks' step daemons send back (`io_init_msg_unpack: unpack error`,
/// every task's output lost, exit status 0); seen once in a few dozen runs, on a loaded
/// machine. Such a run is repeated (at most 3 tries); any other failure is not.
pub fn srun(sl: &SiteLab, args: &[&str]) -> (i32, String, String) {
    let argv: Vec<&str> = std::iter::once("srun")
        .chain(args.iter().copied())
        .collect();
    let mut tries = 0;
    loop {
        tries += 1;
        let (code, out, err) = exec(sl, &argv);
        if tries < 3 && err.contains("io_init_msg_unpack") {
            eprintln!("srun {args:?}: I/O set-up failed (try {tries}), again: {err}");
            std::thread::sleep(std::time::Duration::from_secs(1));
            continue;
        }
        return (code, out, err);
    }
}

/// The pids of processes whose command line names a path under one of `dirs`.
pub fn daemons_under(dirs: &[PathBuf]) -> Vec<(i32, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let c = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let c = String::from_utf8_lossy(&c).replace('\0', " ");
        let prog = c.split_whitespace().next().unwrap_or("");
        let prog = prog.rsplit('/').next().unwrap_or(prog);
        let named = dirs.iter().any(|d| c.contains(&d.display().to_string()));
        if named && ["munged", "slurmctld", "slurmd"].contains(&prog) {
            v.push((pid, c));
        }
    }
    v
}

pub fn have(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The last lines of every VM's Slurm and munge logs (on failure).
pub fn slurm_logs(sl: &SiteLab) {
    for a in sl.agents.values() {
        let Ok(rd) = std::fs::read_dir(a.state.join("run")) else {
            continue;
        };
        for d in rd
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "slurm"))
        {
            for f in ["slurmctld.log", "slurmd.log", "munged.out"] {
                let Ok(t) = std::fs::read_to_string(d.path().join(f)) else {
                    continue;
                };
                let lines: Vec<&str> = t.lines().collect();
                eprintln!("---- {}/{f}", d.path().display());
                for l in &lines[lines.len().saturating_sub(15)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}
