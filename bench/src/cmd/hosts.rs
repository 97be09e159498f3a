//! `bench overlay --layout hosts`: two hosts on one bridge, the edge's TAP device as each
//! host's own interface (no VM bridge behind it), and a supernode on a third host of the
//! same bridge. The measured pair is host b -> host a: iperf3 and ping to a's TAP address
//! (198.19.60.1) over the overlay, and to a's underlay address (198.18.60.1) for the raw
//! reference paired in the same run. "Relayed" drops UDP between a and b on b, so their
//! datagrams go through the supernode. Userspace WireGuard peers (boringtun, gotatun) run
//! on the same two hosts, directly.
//!
//! This is the shape where the edge's own cost shows most: no bridge, veth pair or NAT in
//! front of the overlay, so raw TCP runs at what the kernel's loopback-like veth path gives.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Context;
use bench::peers::{HostEnd, Peer};
use lab::overlay::{Edge, EdgeOpts, Mvc, Supernode, COMMUNITY, SECRET, SUPERNODE_PORT};
use lab::{Lab, Site};

use super::overlay::{Args, Ctx, Results};

/// The third octet of the layout's networks: underlay 198.18.60.0/24, TAPs 198.19.60.0/24.
const NET: u8 = 60;
/// The TAP device each host's edge attaches to (its address is the host's overlay address).
const TAP: &str = "mvc0";
/// Systems this layout runs.
pub const SYSTEMS: [&str; 4] = ["raw", "mvc", "boringtun", "gotatun"];

/// The hosts: `a` (server), `b` (client) and `s` (supernode), one bridge between them.
pub struct Hosts {
    a: HostEnd,
    b: HostEnd,
    s: HostEnd,
}

/// Host `i`'s underlay address.
fn underlay(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, NET, i)
}

/// Host `i`'s overlay address (on its TAP).
fn overlay(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, NET, i)
}

impl Hosts {
    /// A switch namespace with bridge `br0`, and hosts a (1), b (2) and s (3) on it.
    pub fn build(lab: &Lab) -> anyhow::Result<Hosts> {
        let sw = lab.add_ns("sw")?;
        lab.bridge(&sw, "br0")?;
        let mut ends = Vec::new();
        for (name, i) in [("a", 1u8), ("b", 2), ("s", 3)] {
            let ns = lab.add_ns(&format!("h{name}"))?;
            let port = format!("p{name}");
            lab.veth(&sw, &port, &ns, "eth0")?;
            lab.enslave(&sw, &port, "br0")?;
            lab.addr(&ns, "eth0", underlay(i), 24)?;
            ends.push(HostEnd {
                ns,
                ip: underlay(i),
            });
        }
        let s = ends.pop().context("three hosts")?;
        let b = ends.pop().context("three hosts")?;
        let a = ends.pop().context("three hosts")?;
        Ok(Hosts { a, b, s })
    }

    /// The measurement context: b -> a, raw reference to a's underlay address.
    fn ctx<'a>(&self, lab: &'a Lab, args: &'a Args, perf: bool) -> Ctx<'a> {
        Ctx {
            lab,
            args,
            delay: 0,
            perf,
            client: self.b.ns.clone(),
            server: self.a.ns.clone(),
            raw_dst: self.a.ip,
        }
    }

    /// Drops UDP between a and b (on b, both ways); returns the rules for [`Self::unblock`].
    fn block_direct(&self, lab: &Lab) -> anyhow::Result<Vec<Vec<String>>> {
        let a = self.a.ip.to_string();
        let rules: Vec<Vec<String>> = [
            ["OUTPUT", "-d", a.as_str(), "-p", "udp", "-j", "DROP"],
            ["INPUT", "-s", a.as_str(), "-p", "udp", "-j", "DROP"],
        ]
        .iter()
        .map(|r| r.iter().map(|s| s.to_string()).collect())
        .collect();
        for r in &rules {
            let mut args = vec!["-I"];
            args.extend(r.iter().map(String::as_str));
            lab.iptables(&self.b.ns, &args)?;
        }
        Ok(rules)
    }

    fn unblock(&self, lab: &Lab, rules: &[Vec<String>]) -> anyhow::Result<()> {
        for r in rules {
            let mut args = vec!["-D"];
            args.extend(r.iter().map(String::as_str));
            lab.iptables(&self.b.ns, &args)?;
        }
        Ok(())
    }
}

/// A site of the lab's shape for host `h`, so that `Mvc::edge` can start an edge there.
fn site(h: &HostEnd, name: &str, idx: u8) -> Site {
    Site {
        idx,
        name: name.into(),
        frontend: h.ns.clone(),
        router: None,
        frontend_ip: h.ip,
        public_ip: h.ip,
        tap: TAP.into(),
        bridge: String::new(),
        vms: Vec::new(),
        wan: None,
    }
}

/// A supernode on host s and an edge on a and b, each on a fresh TAP holding the host's
/// overlay address.
struct Cluster {
    supernode: Supernode,
    a: Edge,
    b: Edge,
}

impl Cluster {
    fn start(
        lab: &Lab,
        h: &Hosts,
        mvc: &Mvc,
        cipher: &str,
        datapath: Option<&str>,
        relay: &str,
    ) -> anyhow::Result<Cluster> {
        let sn_addr = SocketAddrV4::new(h.s.ip, SUPERNODE_PORT);
        let kernel: &[&str] = if relay == "kernel" {
            &["--xdp-relay", "eth0"]
        } else {
            &[]
        };
        let supernode = mvc.supernode_with(lab, &h.s.ns, sn_addr, "supernode", kernel)?;
        let mut edges = Vec::new();
        for (end, name, i) in [(&h.a, "a", 1u8), (&h.b, "b", 2)] {
            let st = site(end, name, i);
            // A fresh device: offloads an earlier edge set must not reach the next one.
            let _ = lab.ip(&end.ns, &["link", "del", TAP]);
            lab.tap(&end.ns, TAP)?;
            lab.addr(&end.ns, TAP, overlay(i), 24)?;
            let mut o = EdgeOpts::new(&st, COMMUNITY, SECRET, &[sn_addr]);
            o.cipher = Some(cipher.into());
            o.datapath = datapath.map(str::to_string);
            match mvc.edge(lab, &st, &o) {
                Ok(e) => edges.push(e),
                Err(err) => {
                    for e in &edges {
                        lab.stop(&e.proc);
                    }
                    lab.stop(&supernode.proc);
                    return Err(err.into());
                }
            }
        }
        let b = edges.pop().context("two edges")?;
        let a = edges.pop().context("two edges")?;
        Ok(Cluster { supernode, a, b })
    }

    fn pids(&self) -> Vec<u32> {
        vec![self.a.proc.pid, self.b.proc.pid, self.supernode.proc.pid]
    }

    fn stop(&self, lab: &Lab) {
        lab.stop(&self.a.proc);
        lab.stop(&self.b.proc);
        lab.stop(&self.supernode.proc);
    }
}

/// Runs the configurations of `args` in the two-host layout.
pub(super) fn run_all(
    lab: &Lab,
    h: &Hosts,
    args: &Args,
    mvc: Option<&Mvc>,
    perf: bool,
    out: &mut Results,
) -> anyhow::Result<()> {
    let ctx = h.ctx(lab, args, perf);
    let has = |s: &str| args.systems.iter().any(|x| x == s);
    if has("raw") {
        ctx.raw_row(out)?;
    }
    if let Some(mvc) = mvc {
        if args.datapath.iter().any(|d| d == "xdp") {
            eprintln!("note: the hosts have no VM bridge: the xdp datapath is not measured");
        }
        for dp in args.datapath.iter().filter(|d| *d != "xdp") {
            for cipher in &args.ciphers {
                for path in &args.paths {
                    let relays: &[String] = if path == "relayed" { &args.relay } else { &[] };
                    if relays.is_empty() {
                        measure_mvc(&ctx, h, mvc, (dp, cipher, path, "user"), out)?;
                    }
                    for relay in relays {
                        measure_mvc(&ctx, h, mvc, (dp, cipher, path, relay), out)?;
                    }
                }
            }
        }
    }
    for peer in [Peer::Boringtun, Peer::Gotatun]
        .into_iter()
        .filter(|p| has(p.name()))
    {
        let label = peer.label();
        let (running, dst) = peer
            .start_pair(lab, &h.a, &h.b)
            .with_context(|| format!("starting {label}"))?;
        let res = ctx.peer_row(&running, &label, 1420, dst, out);
        running.release(lab);
        // A peer that fails on the loaded machine (iperf3 cannot connect through it in
        // time) loses its own row, not the rows measured before it.
        if let Err(e) = res {
            eprintln!("note: {label} left out of the table: {e:#}");
        }
    }
    Ok(())
}

/// mvc's row for (datapath, cipher, path, relay: user or kernel).
fn measure_mvc(
    ctx: &Ctx,
    h: &Hosts,
    mvc: &Mvc,
    (dp, cipher, path, relay): (&str, &str, &str, &str),
    out: &mut Results,
) -> anyhow::Result<()> {
    let lab = ctx.lab;
    let rules = if path == "relayed" {
        Some(h.block_direct(lab)?)
    } else {
        None
    };
    let c = Cluster::start(lab, h, mvc, cipher, Some(dp), relay);
    let system = if relay == "kernel" {
        "mvc kernel relay"
    } else {
        "mvc"
    };
    let res = c
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .and_then(|c| {
            if relay == "kernel" {
                // The relay must be in the kernel, or the row would measure the socket.
                let st = mvc.supernode_status(lab, &c.supernode)?;
                anyhow::ensure!(
                    st["xdp_relay"].is_object(),
                    "the supernode's kernel relay did not attach: {}",
                    lab.log(&c.supernode.proc)
                );
            }
            ctx.mvc_row(
                system,
                mvc,
                &c.b,
                "a",
                cipher,
                path,
                overlay(1),
                &c.pids(),
                out,
            )
        });
    if let Ok(c) = &c {
        c.stop(lab);
    }
    if let Some(r) = rules {
        h.unblock(lab, &r)?;
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_stay_in_the_lab_range() {
        for i in 1..=3 {
            assert_eq!(underlay(i).octets()[..2], [198, 18]);
            assert_eq!(overlay(i).octets()[..2], [198, 19]);
        }
    }
}
