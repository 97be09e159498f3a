//! What the Slurm tests share: `cluster exec` and `srun` on the frontend of cluster
//! `s`, the Slurm daemons of the agents' VMs, and their logs on failure.
use lab::sites::SiteLab;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

/// Whether the Slurm test `name` can run here: root (`root_for` says what for) and the
/// Slurm and munge tools; otherwise it prints that it was skipped.
pub fn can_run(name: &str, root_for: &str) -> bool {
    if !lab::is_root() {
        lab::skip(name, root_for);
        return false;
    }
    for tool in ["slurmctld", "slurmd", "munged", "srun"] {
        if !have(tool) {
            lab::skip(
                name,
                &format!("{tool} missing (.ci/setup-deps installs slurm-wlm, munge)"),
            );
            return false;
        }
    }
    true
}

/// The end of a Slurm test whose body ended with `r`: should it have failed, prints the
/// lab's logs, the Slurm logs and what `more_logs` prints, then passes the failure on.
/// Prints the test's time either way.
pub fn finish(
    name: &str,
    t0: Instant,
    sl: &SiteLab,
    r: std::thread::Result<()>,
    more_logs: impl FnOnce(),
) {
    if r.is_err() {
        sl.dump_logs();
        slurm_logs(sl);
        more_logs();
    }
    eprintln!("{name}: {:.1} s", t0.elapsed().as_secs_f64());
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}

/// The names of the computes in the answer of `cluster create`.
pub fn compute_names(cluster: &serde_json::Value) -> BTreeSet<String> {
    cluster["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["role"] == "compute")
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

/// Asserts that `sinfo` lists exactly `computes` idle.
pub fn assert_idle(sl: &SiteLab, computes: &BTreeSet<String>) {
    let s = ok(sl, &["sinfo", "-h", "-N", "-o", "%N %t"]);
    let idle: BTreeSet<String> = s
        .lines()
        .filter(|l| l.ends_with(" idle"))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(&idle, computes, "{s}");
}

/// Asserts that `srun -N <computes> hostname` answers from each of `computes` (`when`
/// goes before the failure message).
pub fn assert_srun_everywhere(sl: &SiteLab, computes: &BTreeSet<String>, when: &str) {
    let n = computes.len().to_string();
    let (code, s, err) = srun(sl, &["-N", &n, "hostname"]);
    let names: BTreeSet<String> = s.lines().map(str::to_string).collect();
    assert_eq!(&names, computes, "{when}{code} {s} {err}");
}

/// `mvc cluster exec s -- ARGS` on the frontend: (exit status, stdout, stderr).
pub fn exec(sl: &SiteLab, args: &[&str]) -> (i32, String, String) {
    cluster_exec(sl, &["--timeout", "60"], args)
}

/// `mvc cluster exec s --vm VM --timeout SECS -- ARGS`: (exit status, stdout, stderr).
pub fn exec_in(sl: &SiteLab, vm: &str, timeout: &str, args: &[&str]) -> (i32, String, String) {
    cluster_exec(sl, &["--vm", vm, "--timeout", timeout], args)
}

fn cluster_exec(sl: &SiteLab, options: &[&str], args: &[&str]) -> (i32, String, String) {
    let mut a = vec!["cluster", "exec", "s"];
    a.extend_from_slice(options);
    a.push("--");
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
