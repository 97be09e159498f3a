//! Slurm with a compute that is a qemu guest: site A (netns) runs the frontend and a
//! compute, site C (behind NAT) runs its agent with `--driver qemu`, so its compute
//! boots the built guest with Slurm's compute side (munged, slurmd). The agent hands
//! the guest its munge key and `slurm.conf` through the guest agent and starts the
//! daemons there; `sinfo` lists both computes idle, `srun -N 2 hostname` answers from
//! both, `cluster exec --vm` runs commands in the guest (exit status, timeout). C's
//! agent killed and started again leaves the guest's daemons as they run; the guest
//! stopped is marked down, started again it is idle again. Needs root,
//! qemu, Slurm and munge (.ci/setup-deps); otherwise prints that it was skipped.
mod common;

use common::slurm::{
    assert_idle, assert_srun_everywhere, can_run, compute_names, exec_in, finish, ok,
};
use common::{alive_pid, compute_at, qemu_lab_at_c, wait_until};
use std::time::{Duration, Instant};

#[test]
fn slurm_runs_jobs_on_a_qemu_compute() {
    let name = "slurm_runs_jobs_on_a_qemu_compute";
    if !can_run(name, "needs root for network namespaces and TAPs") {
        return;
    }
    let t0 = Instant::now();
    let (mut sl, c_state, _procs) = qemu_lab_at_c();
    let run = || {
        let cl = sl
            .ctl_json(&[
                "cluster",
                "create",
                "s",
                "--sites",
                "A:C",
                "--computes",
                "1:1",
                "--memory",
                "256",
                "--frontend-memory",
                "128",
                "--stack",
                "slurm",
                "--start",
                "--lease-timeout",
                "150",
            ])
            .expect("cluster create --stack slurm --start");
        eprintln!(
            "cluster with Slurm and a qemu compute up after {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        let qvm = compute_at(&cl, "C")["name"].as_str().unwrap().to_string();
        let computes = compute_names(&cl);
        assert_eq!(computes.len(), 2);

        // The guest booted the Slurm guest, and its slurmd registered.
        assert_idle(&sl, &computes);
        assert_srun_everywhere(&sl, &computes, "");

        // exec in the guest, through its guest agent.
        let (code, out, err) = exec_in(&sl, &qvm, "30", &["hostname"]);
        assert_eq!((code, out.trim()), (0, qvm.as_str()), "{err}");
        let (code, out, _) = exec_in(
            &sl,
            &qvm,
            "30",
            &["sh", "-c", "pidof slurmd munged | wc -w; exit 3"],
        );
        assert_eq!((code, out.trim()), (3, "2"));
        let t = Instant::now();
        let (code, _, _) = exec_in(&sl, &qvm, "1", &["sleep", "30"]);
        assert_eq!(code, 124);
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());

        // C's agent killed and started again: the guest and its daemons run on, once.
        let (_, before, _) = exec_in(&sl, &qvm, "30", &["pidof", "slurmd"]);
        sl.kill_agent("C");
        sl.restart_agent("C").expect("agent C restart");
        std::thread::sleep(Duration::from_secs(2));
        let (code, after, err) = exec_in(&sl, &qvm, "30", &["pidof", "slurmd"]);
        assert_eq!((code, after.trim()), (0, before.trim()), "{err}");
        let s = ok(&sl, &["sinfo", "-h", "-N", "-o", "%N %t"]);
        assert!(s.lines().any(|l| l == format!("{qvm} idle")), "{s}");

        // Stopped, the guest's node is marked down; started again, the guest boots, its
        // agent hands it the files as soon as its guest agent answers, and it is idle.
        sl.ctl(&["vm", "stop", &qvm]).expect("vm stop");
        let s = ok(&sl, &["sinfo", "-h", "-N", "-o", "%N %t"]);
        assert!(
            s.lines().any(|l| l.starts_with(&format!("{qvm} down"))),
            "{s}"
        );
        let t = Instant::now();
        sl.ctl(&["vm", "start", &qvm]).expect("vm start");
        let back = wait_until(Duration::from_secs(150), Duration::from_secs(1), || {
            ok(&sl, &["sinfo", "-h", "-N", "-o", "%N %t"])
                .lines()
                .any(|l| l == format!("{qvm} idle"))
        });
        assert!(back, "{qvm} not idle after vm start");
        eprintln!(
            "{qvm} idle {:.1} s after vm start",
            t.elapsed().as_secs_f64()
        );

        // Destroy: the guest, and so its daemons, and its qemu and xnbd are gone.
        sl.ctl(&["cluster", "destroy", "s"]).expect("destroy");
        for e in std::fs::read_dir(c_state.join("run")).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".qemu.pid") || n.ends_with(".xnbd.pid") {
                assert!(alive_pid(&e.path(), &c_state).is_none(), "{n} still runs");
            }
        }
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
    finish(name, t0, &sl, r, || {
        for e in std::fs::read_dir(c_state.join("run"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().ends_with(".console.log") {
                let t = std::fs::read(e.path()).unwrap_or_default();
                let tail = String::from_utf8_lossy(&t[t.len().saturating_sub(3000)..]);
                eprintln!("---- {}\n{tail}", e.path().display());
            }
        }
    });
}
