//! A qemu compute running Slurm moved to another site: sites B and C run their agents
//! with `--driver qemu`, site A (netns) the frontend and a compute; each site has one
//! compute, and C's (a qemu guest with munged and slurmd) moves to B with `mvc vm
//! migrate`. Afterwards `sinfo` shows every compute idle, `scontrol show topology`
//! puts it under B's switch beside B's own compute (C's switch is gone), `srun -N 3
//! hostname` answers from all three, the guest's slurmd
//! is the same process as before the move (live migration keeps the guest running; its
//! agent at B reached it on B's socket and rewrote its files), and nothing of the VM is
//! left at C. Then A's compute is stopped and the guest moves back to C: the stopped
//! compute's node is not waited for, the guest is under C's switch again, and B keeps
//! nothing of it. Needs root, qemu, Slurm and munge (.ci/setup-deps); otherwise prints that
//! it was skipped.
mod common;

use common::slurm::{compute_names, exec_in, have, ok, slurm_logs, srun};
use common::{
    alive_pid, compute_at, mvc_and_xnbd, overlay_under_test, prepare_qemu_guest, VmProcs,
};
use control::demo::SiteLab;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// The VM's local name at the site where it runs now.
fn local_of(sl: &SiteLab, vm: &str) -> String {
    let handles = sl.vm_handles("s").expect("handles");
    handles[vm].rsplit(':').next().unwrap().to_string()
}

/// The files of run and disk directories of the agent whose state is `state` that
/// belong to the VM with local name `local`, and its qemu or xnbd processes alive.
fn left_of(state: &Path, local: &str) -> Vec<String> {
    let mut left = Vec::new();
    for dir in ["run", "disks"] {
        for e in std::fs::read_dir(state.join(dir))
            .into_iter()
            .flatten()
            .flatten()
        {
            let n = e.file_name().to_string_lossy().into_owned();
            if !n.starts_with(&format!("{local}.")) {
                continue;
            }
            if n.ends_with(".pid") && alive_pid(&e.path(), state).is_some() {
                left.push(format!("{n} (running)"));
            } else {
                left.push(n);
            }
        }
    }
    left
}

/// `mvc vm migrate s VM --to SITE`, asserted to succeed: its JSON answer (phase
/// `done` asserted) and its progress lines.
fn migrate(sl: &SiteLab, vm: &str, to: &str) -> (serde_json::Value, String) {
    let o = sl
        .ctl_output(&["vm", "migrate", "s", vm, "--to", to, "--json"])
        .expect("vm migrate");
    let progress = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "vm migrate: {progress}");
    let mig: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(mig["phase"], "done", "{mig}");
    (mig, progress)
}

/// The nodes `scontrol show topology` on the frontend places under switch `switch`
/// (its host list expanded by `scontrol show hostnames`); empty when there is no such
/// switch.
fn switch_nodes(sl: &SiteLab, switch: &str) -> BTreeSet<String> {
    let topology = ok(sl, &["scontrol", "show", "topology"]);
    let Some(list) = topology
        .lines()
        .find(|l| l.starts_with(&format!("SwitchName={switch} ")))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("Nodes=")))
    else {
        return BTreeSet::new();
    };
    ok(sl, &["scontrol", "show", "hostnames", list])
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn slurm_qemu_compute_migrates_to_another_site() {
    let name = "slurm_qemu_compute_migrates_to_another_site";
    if !lab::is_root() {
        lab::skip(name, "needs root for network namespaces and TAPs");
        return;
    }
    for tool in ["slurmctld", "slurmd", "munged", "srun"] {
        if !have(tool) {
            lab::skip(
                name,
                &format!("{tool} missing (.ci/setup-deps installs slurm-wlm, munge)"),
            );
            return;
        }
    }
    let t0 = Instant::now();
    let (mvc, xnbd) = mvc_and_xnbd();
    let cache = prepare_qemu_guest(&mvc);
    let overlay = overlay_under_test(&mvc);
    let qemu_args = lab::sites::qemu_agent_args(&cache, &xnbd, 64);
    let mut extra = BTreeMap::new();
    extra.insert("B".to_string(), qemu_args.clone());
    extra.insert("C".to_string(), qemu_args);
    let sl = SiteLab::with_agent_args(&mvc, &overlay, 8, 8, &extra).expect("lab");
    let b_state = sl.agents["B"].state.clone();
    let c_state = sl.agents["C"].state.clone();
    let _procs_b = VmProcs(b_state.join("run"));
    let _procs_c = VmProcs(c_state.join("run"));
    sl.add_sites().expect("site add");
    let run = || {
        let cl = sl
            .ctl_json(&[
                "cluster",
                "create",
                "s",
                "--sites",
                "A:B:C",
                "--computes",
                "1:1:1",
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
            "cluster with Slurm and a qemu compute at C up after {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        let qvm = compute_at(&cl, "C")["name"].as_str().unwrap().to_string();
        let computes = compute_names(&cl);
        assert_eq!(computes.len(), 3);
        let idle = || -> BTreeSet<String> {
            ok(&sl, &["sinfo", "-h", "-N", "-o", "%N %t"])
                .lines()
                .filter(|l| l.ends_with(" idle"))
                .map(|l| l.split_whitespace().next().unwrap().to_string())
                .collect()
        };
        assert_eq!(idle(), computes);
        let bvm = compute_at(&cl, "B")["name"].as_str().unwrap().to_string();
        assert_eq!(switch_nodes(&sl, "site-C"), BTreeSet::from([qvm.clone()]));
        let (code, before, err) = exec_in(&sl, &qvm, "30", &["pidof", "slurmd"]);
        assert_eq!(code, 0, "{err}");
        let clocal = local_of(&sl, &qvm);

        let t = Instant::now();
        let (mig, progress) = migrate(&sl, &qvm, "B");
        eprintln!(
            "migrated C -> B in {:.1} s (Slurm reconfigured within): {mig}",
            t.elapsed().as_secs_f64()
        );
        // The controller sent the stack again and waited for every node idle.
        assert!(
            progress.contains("Slurm in s: all 3 computes idle") && !progress.contains("warning"),
            "{progress}"
        );
        assert_eq!(mig["phase"], "done", "{mig}");

        // `vm migrate` returns once slurmctld re-read the configuration and every node
        // is idle again (or warns): idle now, under B's switch.
        assert_eq!(idle(), computes);
        assert_eq!(
            switch_nodes(&sl, "site-B"),
            BTreeSet::from([bvm.clone(), qvm.clone()])
        );
        assert_eq!(switch_nodes(&sl, "site-C"), BTreeSet::new());
        let (code, s, err) = srun(&sl, &["-N", "3", "hostname"]);
        let names: BTreeSet<String> = s.lines().map(str::to_string).collect();
        assert_eq!(names, computes, "{code} {s} {err}");
        // The guest ran on through the move: the same slurmd, reached through the
        // guest agent's socket at B, with the rewritten topology.
        let (code, after, err) = exec_in(&sl, &qvm, "30", &["pidof", "slurmd"]);
        assert_eq!((code, after.trim()), (0, before.trim()), "{err}");
        let (code, conf, err) = exec_in(&sl, &qvm, "30", &["cat", "/mvc/topology.conf"]);
        assert_eq!(code, 0, "{err}");
        assert!(
            conf.lines()
                .any(|l| l.starts_with("SwitchName=site-B ") && l.contains(&qvm)),
            "{conf}"
        );
        // Nothing of it left at C: no files, no qemu, no disk proxy.
        let left = left_of(&c_state, &clocal);
        assert!(left.is_empty(), "left at C: {left:?}");

        // A compute stopped (its node down) is not waited for: the move back to C
        // reconfigures Slurm and returns once the two running computes are idle.
        let avm = compute_at(&cl, "A")["name"].as_str().unwrap().to_string();
        sl.ctl(&["vm", "stop", &avm]).expect("vm stop");
        let blocal = local_of(&sl, &qvm);
        let t = Instant::now();
        let (mig, progress) = migrate(&sl, &qvm, "C");
        let took = t.elapsed();
        eprintln!(
            "migrated B -> C, {avm} stopped, in {:.1} s: {mig}",
            took.as_secs_f64()
        );
        assert!(
            progress.contains("Slurm in s: all 2 running computes idle (1 stopped")
                && !progress.contains("warning"),
            "{progress}"
        );
        assert!(took < Duration::from_secs(40), "{took:?}");
        assert_eq!(idle(), BTreeSet::from([bvm.clone(), qvm.clone()]));
        assert_eq!(switch_nodes(&sl, "site-B"), BTreeSet::from([bvm.clone()]));
        assert_eq!(switch_nodes(&sl, "site-C"), BTreeSet::from([qvm.clone()]));
        let (code, s, err) = srun(&sl, &["-N", "2", "hostname"]);
        let names: BTreeSet<String> = s.lines().map(str::to_string).collect();
        assert_eq!(
            names,
            BTreeSet::from([bvm.clone(), qvm.clone()]),
            "{code} {s} {err}"
        );
        let (code, again, err) = exec_in(&sl, &qvm, "30", &["pidof", "slurmd"]);
        assert_eq!((code, again.trim()), (0, before.trim()), "{err}");
        let left = left_of(&b_state, &blocal);
        assert!(left.is_empty(), "left at B: {left:?}");

        sl.ctl(&["cluster", "destroy", "s"]).expect("destroy");
        let running = running_vm_procs(&b_state);
        assert!(running.is_empty(), "still running at B: {running:?}");
    };
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
    if r.is_err() {
        sl.dump_logs();
        slurm_logs(&sl);
        for state in [&b_state, &c_state] {
            for e in std::fs::read_dir(state.join("run"))
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
        }
    }
    eprintln!("{name}: {:.1} s", t0.elapsed().as_secs_f64());
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}

/// The qemu and xnbd pid files in `state`'s run directory whose process still runs.
fn running_vm_procs(state: &Path) -> Vec<String> {
    std::fs::read_dir(state.join("run"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (n.ends_with(".qemu.pid") || n.ends_with(".xnbd.pid"))
                && alive_pid(&e.path(), state).is_some()
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}
