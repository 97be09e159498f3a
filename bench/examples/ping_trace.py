#!/usr/bin/env python3
"""Per-stage times of the pings that `ping_trace` recorded (see ping_trace.rs).

    python3 bench/examples/ping_trace.py OUT_DIR

For each ping (a 98-byte frame sent by `ping`), the events that follow it within 5 ms are
matched in order: the wake-up and context switch of each edge thread (sched_waking ->
sched_switch to it), each edge's first packet hand-off (net_dev_queue) after it runs, and
the wake-up of `ping` for the reply. Prints the median and spread of each stage (TAP
datapath: on XDP the frames take other hand-offs and only the counts apply) and how many
thread wake-ups one ping caused, per edge and per process name (other jobs' included).
"""
import re
import statistics
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

LINE = re.compile(r"^\s*(?P<comm>.+?)\s+(?P<pid>\d+)\s+\[(?P<cpu>\d+)\]\s+(?P<ts>\d+\.\d+):\s+(?P<ev>[\w:]+):\s*(?P<rest>.*)$")


def events(data):
    out = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,tid,cpu,time,event,trace"],
                         capture_output=True, text=True, check=True).stdout
    for l in out.splitlines():
        m = LINE.match(l)
        if m:
            yield (float(m["ts"]) * 1e6, m["comm"].strip(), int(m["pid"]), int(m["cpu"]), m["ev"], m["rest"])


def field(rest, name):
    m = re.search(rf"\b{name}=(\S+)", rest)
    return m.group(1) if m else None


def analyse(data, pids):
    evs = list(events(data))
    edge_pids = {pids["edge_a"]: "A", pids["edge_b"]: "B"}
    # Thread ids of the edges: every tid whose waking names an edge pid's process is hard to
    # know from tracepoints, so the forwarder is the tid that sends the UDP datagrams (its
    # main thread, one forwarder thread by default).
    # A ping's frame is queued twice in ping's own context (the VM's interface, then the
    # site bridge's port): the first of each burst starts the ping.
    starts, last = [], -1e12
    for i, e in enumerate(evs):
        if e[4] == "net:net_dev_queue" and e[1] == "ping" and "len=98" in e[5]:
            if e[0] - last > 2000:
                starts.append(i)
            last = e[0]
    stages = defaultdict(list)
    wakes = Counter()
    for si in starts:
        t0 = evs[si][0]
        seq = []
        woken_by = Counter()
        for e in evs[si:]:
            if e[0] - t0 > 5000:
                break
            seq.append(e)
        # Wake-ups in this window, by woken comm (sched_waking: pid= is the wakee).
        for e in seq:
            if e[4] == "sched:sched_waking":
                pid = int(field(e[5], "pid") or 0)
                c = f"edge {edge_pids[pid]}" if pid in edge_pids else field(e[5], "comm")
                woken_by[c] += 1
        wakes.update({k: v for k, v in woken_by.items()})
        for e in seq:
            if e[4] == "syscalls:sys_exit_io_uring_enter" and e[2] in edge_pids:
                wakes[f"io_uring_enter returns, edge {edge_pids[e[2]]}"] += 1
        wakes["pings"] += 1
        marks = {"sent": t0}
        # Walk the window: the k-th wake-up and run of each edge, then ping's wake-up.
        order = []
        for e in seq:
            ts, comm, tid, cpu, ev, rest = e
            if ev == "sched:sched_waking":
                pid = int(field(rest, "pid") or 0)
                if pid in edge_pids:
                    order.append(("wake", edge_pids[pid], ts, int(field(rest, "target_cpu") or -1), cpu))
                elif field(rest, "comm") == "ping":
                    order.append(("wake", "ping", ts, -1, cpu))
                elif (field(rest, "comm") or "").startswith("napi/"):
                    order.append(("wake", "napi", ts, -1, cpu))
            elif ev == "sched:sched_switch":
                npid = int(field(rest, "next_pid") or 0)
                if npid in edge_pids:
                    order.append(("run", edge_pids[npid], ts, cpu, cpu))
                elif field(rest, "next_comm") == "ping":
                    order.append(("run", "ping", ts, cpu, cpu))
                elif (field(rest, "next_comm") or "").startswith("napi/"):
                    order.append(("run", "napi", ts, cpu, cpu))
            elif ev == "net:net_dev_queue" and tid in edge_pids:
                order.append(("xmit", edge_pids[tid], ts, cpu, cpu))
            elif ev == "syscalls:sys_exit_io_uring_enter" and tid in edge_pids:
                order.append(("exit", edge_pids[tid], ts, cpu, cpu))
            elif ev == "syscalls:sys_enter_io_uring_enter" and tid in edge_pids:
                order.append(("enter", edge_pids[tid], ts, cpu, cpu))
        # Expected: wake B, run B, xmit B, wake A, run A, xmit A (TAP write ... UDP send),
        # wake B, run B, xmit B (TAP write), wake ping, run ping.
        want = [("wake", "B"), ("run", "B"), ("xmit", "B"), ("wake", "A"), ("run", "A"), ("xmit", "A"),
                ("wake", "B"), ("run", "B"), ("xmit", "B"), ("wake", "ping"), ("run", "ping")]
        got = []
        j = 0
        for o in order:
            if j < len(want) and (o[0], o[1]) == want[j]:
                got.append(o)
                j += 1
            elif j < len(want) and want[j][0] == "wake" and (o[0], o[1]) == ("xmit", want[j][1]):
                # The thread was already running (polling): no wake-up, no switch.
                got.append(("wake", o[1], o[2], -1, o[4]))
                got.append(("run", o[1], o[2], -1, o[4]))
                got.append(o)
                j += 3
        if j < len(want):
            stages["incomplete"].append(1)
            continue
        # Inside each edge's turn: from being switched in to the return of io_uring_enter
        # (the completion's task work: the read or receive itself), and from there to the
        # next io_uring_enter (the edge's own code: reap, open or seal, queue the output).
        for k, (run_i, who) in enumerate([(1, "B"), (4, "A"), (7, "B")]):
            t_run = got[run_i][2]
            t_exit = next((o[2] for o in order if o[0] == "exit" and o[1] == who and o[2] >= t_run), None)
            t_enter = next((o[2] for o in order if o[0] == "enter" and o[1] == who and t_exit is not None and o[2] >= t_exit), None)
            if t_exit is not None and t_enter is not None and t_enter <= got[run_i + 1][2]:
                stages[f"  turn {k + 1} ({who}): kernel return after switch-in"].append(t_exit - t_run)
                stages[f"  turn {k + 1} ({who}): edge user space"].append(t_enter - t_exit)
        names = ["ping -> B woken", "B woken -> runs", "B runs -> sends", "B sends -> A woken",
                 "A woken -> runs", "A runs -> first xmit", "A xmit -> B woken (reply)",
                 "B woken -> runs (reply)", "B runs -> TAP write", "B write -> ping woken",
                 "ping woken -> runs"]
        prev = t0
        for n, g in zip(names, got):
            stages[n].append(g[2] - prev)
            prev = g[2]
        stages["total (sent -> ping runs)"].append(prev - t0)
        stages["three edge wake-ups (woken -> runs)"].append(
            (got[1][2] - got[0][2]) + (got[4][2] - got[3][2]) + (got[7][2] - got[6][2]))
        for k, g in zip(["B woken on the other CPU (share)", "A woken on the other CPU (share)", "B woken on the other CPU, reply (share)"], [got[0], got[3], got[6]]):
            stages[k].append(1 if g[3] >= 0 and g[3] != g[4] else 0)
    return stages, wakes


def main():
    d = Path(sys.argv[1])
    pids = dict(l.split() for l in (d / "pids").read_text().splitlines())
    pids = {k: int(v) for k, v in pids.items()}
    for name in ["overlay", "raw"]:
        data = d / f"{name}.data"
        if not data.exists():
            continue
        rtts = [float(x) for x in (d / f"{name}.ping").read_text().split()]
        print(f"== {name}: {len(rtts)} pings, RTT median {statistics.median(rtts) * 1000:.0f} us")
        stages, wakes = analyse(data, pids)
        n = wakes.pop("pings", 0)
        if name == "overlay":
            print(f"   pings matched: {len(stages.get('total (sent -> ping runs)', []))}, incomplete {len(stages.get('incomplete', []))}")
            print("   | stage | median us | p10-p90 us |")
            print("   |---|---:|---:|")
            for k, v in stages.items():
                if k == "incomplete" or not v:
                    continue
                v = sorted(v)
                p = lambda q: v[min(len(v) - 1, int(q * len(v)))]
                print(f"   | {k} | {statistics.median(v):.1f} | {p(0.1):.1f}-{p(0.9):.1f} |")
        # The path's own threads first (other jobs' wake-ups can outnumber them).
        own = lambda k: k == "ping" or k.startswith(("edge ", "io_uring_enter", "napi/"))
        ranked = [kv for kv in wakes.most_common() if own(kv[0])]
        ranked += [kv for kv in wakes.most_common() if not own(kv[0])][:8]
        print(f"   within 5 ms of each ping (per ping): " + ", ".join(
            f"{k} {v / max(n, 1):.2f}" for k, v in ranked))


if __name__ == "__main__":
    main()
