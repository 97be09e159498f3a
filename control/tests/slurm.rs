//! Slurm in a virtual cluster, in the three-site network-namespace lab (A public, B and
//! C behind NAT): `cluster create --stack slurm --start`, then through `cluster exec`
//! and `cluster submit` on the frontend: every compute idle in `sinfo`, `srun` on every
//! node, a job array with output from each site; a stopped compute is marked down and
//! not waited for; bad input gets one clear line; destroy leaves no daemon. Needs root
//! and Debian's slurm-wlm and munge (.ci/setup-deps); otherwise prints that it was
//! skipped.
mod common;

use common::slurm::{
    assert_idle, assert_srun_everywhere, can_run, compute_names, daemons_under, finish, ok, srun,
};
use control::demo::pick_overlay;
use lab::sites::SiteLab;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[test]
fn slurm_runs_jobs_across_three_sites() {
    let name = "slurm_runs_jobs_across_three_sites";
    if !can_run(name, "needs root for network namespaces") {
        return;
    }
    let t0 = Instant::now();
    let mvc = PathBuf::from(env!("CARGO_BIN_EXE_mvc"));
    let overlay = pick_overlay(&mvc, "auto");
    let mut sl = SiteLab::new(&mvc, &overlay, 8, 8).expect("lab");
    sl.add_sites().expect("site add");
    let run = || {
        // Bad input first: a cluster that does not run takes no job.
        sl.ctl(&[
            "cluster",
            "create",
            "idle",
            "--sites",
            "A",
            "--computes",
            "1",
            "--memory",
            "64",
            "--frontend-memory",
            "64",
            "--stack",
            "slurm",
        ])
        .expect("create without start");
        let o = sl
            .ctl_output(&[
                "cluster", "submit", "idle", "--", "sbatch", "--wrap", "true",
            ])
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("is not running"), "{err}");
        sl.ctl(&["cluster", "destroy", "idle"])
            .expect("destroy idle");

        let cl = sl
            .ctl_json(&[
                "cluster",
                "create",
                "s",
                "--sites",
                "A:B:C",
                "--computes",
                "1:2:1",
                "--memory",
                "128",
                "--frontend-memory",
                "128",
                "--stack",
                "slurm",
                "--start",
            ])
            .expect("cluster create --stack slurm --start");
        let computes = compute_names(&cl);
        assert_eq!(computes.len(), 4);
        eprintln!(
            "cluster with Slurm up after {:.1} s",
            t0.elapsed().as_secs_f64()
        );

        // sinfo: every compute idle (create --start waited for it).
        assert_idle(&sl, &computes);
        let topo = ok(&sl, &["scontrol", "show", "topology"]);
        assert!(topo.contains("SwitchName=site-B"), "{topo}");

        // srun on every node: each answers with its own name.
        assert_srun_everywhere(&sl, &computes, "");

        // The tree topology keeps a 2-node job within one site: B's two computes (s-c2,
        // s-c3), not the first two nodes by name (s-c1 at A, s-c2 at B).
        let (code, s, err) = srun(&sl, &["-N", "2", "hostname"]);
        assert_eq!(code, 0, "srun -N 2: {s}{err}");
        let names: BTreeSet<String> = s.lines().map(str::to_string).collect();
        let want: BTreeSet<String> = ["s-c2", "s-c3"].iter().map(|s| s.to_string()).collect();
        assert_eq!(names, want, "{s}");

        // A job array of 6 tasks, one node each: output from every site.
        let o = sl
            .ctl(&[
                "cluster",
                "submit",
                "s",
                "--json",
                "--",
                "sbatch",
                "--array=1-6",
                "-N",
                "1",
                "-o",
                "arr-%a.out",
                "--wrap",
                "echo task $SLURM_ARRAY_TASK_ID on $(hostname)",
            ])
            .expect("submit");
        let o: serde_json::Value = serde_json::from_str(&o).expect("submit --json");
        let job = o["job_id"].as_u64().expect("job id");
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let q = ok(&sl, &["squeue", "-h", "-j", &job.to_string()]);
            if q.trim().is_empty() {
                break;
            }
            assert!(Instant::now() < end, "job array still queued: {q}");
            std::thread::sleep(Duration::from_millis(500));
        }
        let out = ok(&sl, &["sh", "-c", "cat arr-*.out"]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 6, "{out}");
        for c in &computes {
            assert!(
                lines.iter().any(|l| l.ends_with(&format!(" on {c}"))),
                "{c}: {out}"
            );
        }

        // Too large: more nodes than the cluster has is refused at once, not queued.
        let o = sl
            .ctl_output(&["cluster", "submit", "s", "--", "-N", "5", "--wrap", "true"])
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(err.contains("submission failed"), "{err}");

        // A compute stopped: marked down at once; jobs run on the others without
        // waiting for it.
        let gone = computes.iter().find(|c| c.ends_with("c4")).unwrap().clone();
        sl.ctl(&["vm", "stop", &gone]).expect("vm stop");
        let s = ok(&sl, &["sinfo", "-h", "-N", "-o", "%N %t"]);
        assert!(
            s.lines().any(|l| l.starts_with(&format!("{gone} down"))),
            "{s}"
        );
        let t = Instant::now();
        let (code, s, err) = srun(&sl, &["-N", "3", "hostname"]);
        assert_eq!(code, 0, "srun -N 3: {s}{err}");
        assert!(!s.contains(&gone), "{s}");
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "srun waited {:?}",
            t.elapsed()
        );

        // Started again: its agent starts its daemons, and it returns to service.
        sl.ctl(&["vm", "start", &gone]).expect("vm start");
        let end = Instant::now() + Duration::from_secs(40);
        loop {
            let s = ok(&sl, &["sinfo", "-h", "-N", "-o", "%N %t"]);
            if s.lines().any(|l| l == format!("{gone} idle")) {
                break;
            }
            assert!(Instant::now() < end, "{gone} not back: {s}");
            std::thread::sleep(Duration::from_millis(500));
        }

        // A command past its timeout is ended, with status 124.
        let t = Instant::now();
        let o = sl
            .ctl_output(&[
                "cluster",
                "exec",
                "s",
                "--timeout",
                "1",
                "--",
                "sleep",
                "30",
            ])
            .unwrap();
        assert_eq!(o.status.code(), Some(124));
        assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());

        // munged and slurmctld on the frontend, munged and slurmd on each compute.
        let dirs: Vec<PathBuf> = sl.agents.values().map(|a| a.state.clone()).collect();
        assert_eq!(daemons_under(&dirs).len(), 10, "{:?}", daemons_under(&dirs));

        // B's agent killed (SIGKILL) while Slurm runs, one of its slurmds dies while
        // it is down, and it is started again: the running daemons are adopted, the
        // dead one started again, none runs twice, every node is idle and takes jobs.
        let pids = |v: Vec<(i32, String)>| v.into_iter().map(|x| x.0).collect::<BTreeSet<_>>();
        let before = pids(daemons_under(&dirs));
        sl.kill_agent("B");
        let b_state = sl.agents["B"].state.clone();
        let (victim, _) = daemons_under(&[b_state])
            .into_iter()
            .find(|(_, c)| c.starts_with("slurmd "))
            .expect("a slurmd at B");
        let _ = lab::sys::kill(victim as u32, libc::SIGKILL);
        sl.restart_agent("B").expect("agent B restart");
        let end = Instant::now() + Duration::from_secs(40);
        loop {
            let s = ok(&sl, &["sinfo", "-h", "-N", "-o", "%N %t"]);
            let idle = s.lines().filter(|l| l.ends_with(" idle")).count();
            if idle == computes.len() && daemons_under(&dirs).len() == 10 {
                break;
            }
            assert!(
                Instant::now() < end,
                "not back after the agent restart: {s}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let after = pids(daemons_under(&dirs));
        assert_eq!(after.len(), 10, "{:?}", daemons_under(&dirs));
        assert_eq!(before.difference(&after).count(), 1, "{before:?} {after:?}");
        assert!(!after.contains(&victim));
        assert_srun_everywhere(&sl, &computes, "after the agent restart: ");

        // Destroy: no munged or slurm daemon of the cluster left at any site.
        sl.ctl(&["cluster", "destroy", "s"]).expect("destroy");
        let left = daemons_under(&dirs);
        assert!(left.is_empty(), "{left:?}");
        for d in &dirs {
            let slurm_dirs: Vec<String> = std::fs::read_dir(d.join("run"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".slurm"))
                .collect();
            assert!(slurm_dirs.is_empty(), "{slurm_dirs:?}");
            let keys = std::fs::read_dir(d.join("secrets")).unwrap().count();
            assert_eq!(keys, 0, "{}", d.display());
        }
        assert!(sl.leftover_vm_namespaces().is_empty());
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
    finish(name, t0, &sl, r, || {});
}

/// `mvc ARGS` with a store and key in `dir` (no agent needed).
fn mvc_in(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_mvc"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env("MVC_DB", dir.join("controller.db"))
        .env("MVC_KEY", dir.join("user.key"))
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn stack_commands_refuse_bad_input_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    assert!(mvc_in(dir.path(), &["key", "gen"]).status.success());
    let cases: [(&[&str], i32, &str); 6] = [
        (
            &["cluster", "exec", "k", "--timeout", "0", "--", "true"],
            2,
            "timeout",
        ),
        (
            &["cluster", "exec", "k", "--timeout", "3601", "--", "true"],
            2,
            "timeout",
        ),
        (&["cluster", "exec", "k"], 2, "required"),
        (&["cluster", "stack", "k", "pbs"], 2, "pbs"),
        (
            &["cluster", "submit", "k", "--", "--wrap", "true"],
            1,
            "'k'",
        ),
        (&["cluster", "exec", "k", "--", "sinfo"], 1, "'k'"),
    ];
    for (args, code, want) in cases {
        let o = mvc_in(dir.path(), args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(want),
            "{args:?}: {err}"
        );
        assert!(o.stdout.is_empty(), "{args:?}");
    }
}
