//! The agent's side of live migration ([`crate::migrate`]): the steps the controller
//! asks for, and the tunnels the other agent opens.
use super::{AgentCore, Refusal, Slot};
use crate::auth::Authorization;
use crate::channel::{Channel, ChannelError};
use crate::migrate::{
    open_tunnel, qmp, relay, xnbd_ctl, IncomingDisk, LibvirtIncoming, MigrateStep, TunnelHello,
    TunnelKind, MIRROR_JOB,
};
use crate::proto::VmSpec;
use crate::validate::quote;
use serde::{Deserialize, Serialize};
use std::net::TcpStream;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// qemu's own default memory bandwidth, used when the controller asks for none.
const DEFAULT_RATE: u64 = 128 << 20;

/// What a destination keeps of a migration whose disk is still being copied.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct IncomingRecord {
    token: String,
    origin: String,
    origin_key: String,
}

/// A migration this agent takes part in, by the VM's local name.
pub(super) struct Migration {
    token: String,
    /// The kinds of tunnel the other agent may open to us, and where each goes.
    accepts: Vec<(TunnelKind, PathBuf)>,
    /// Destination: the disk comes by mirror before the memory (no proxy).
    precopy: bool,
    /// Origin: a disk mirror runs (`Abort` then ends it).
    mirror: bool,
    /// Destination (the VM comes here).
    incoming: bool,
    /// Ends the relay listener this side runs (set when the migration ends).
    stop: Arc<AtomicBool>,
    /// Origin: whether the memory was sent (`Abort` then resumes the VM).
    sent: bool,
    /// Origin, netns driver: the VM's state was taken over by the destination (bytes
    /// sent, ms its NIC was down).
    moved: Option<(u64, u64)>,
    /// Origin, libvirt driver: the `virsh migrate` that moves the domain.
    virsh: Option<std::process::Child>,
    /// Origin, libvirt driver: the downtime limit still to be set once the job runs.
    downtime_ms: Option<u64>,
    /// Origin, libvirt driver: memory processed and total, as last seen.
    ram: (u64, u64),
}

impl Drop for Migration {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(c) = &mut self.virsh {
            // Ended by `Abort` first; reaped here.
            if !matches!(c.try_wait(), Ok(Some(_))) {
                crate::process::stop_child(c);
            }
        }
    }
}

/// Accept local connections on `sock` (until `stop`, or `once` after the first) and
/// relay each through a new tunnel to the agent at `addr`.
fn relay_listener(
    sock: PathBuf,
    addr: String,
    key: String,
    token: String,
    kind: TunnelKind,
    once: bool,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let _ = std::fs::remove_file(&sock);
    let l = UnixListener::bind(&sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("migrate-relay".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let (addr, key, token) = (addr.clone(), key.clone(), token.clone());
                        std::thread::spawn(move || match open_tunnel(&addr, &key, &token, kind) {
                            Ok(ch) => {
                                let (out, back) = relay(ch, s);
                                tracing::info!(?kind, out, back, "migration tunnel ended");
                            }
                            Err(e) => {
                                tracing::warn!(?kind, error = %e, "migration tunnel not opened")
                            }
                        });
                        if once {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "migration relay accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
            let _ = std::fs::remove_file(&sock);
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// End the `--precopy-disk` mirror in the origin qemu: cancelled once in step
/// (`force` off) it completes with a copy as of that moment, as qemu documents; then
/// its target node is removed.
fn end_mirror(qsock: &std::path::Path, force: bool) -> Result<(), String> {
    qmp(
        qsock,
        "block-job-cancel",
        serde_json::json!({ "device": MIRROR_JOB, "force": force }),
    )?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = qmp(qsock, "query-block-jobs", serde_json::Value::Null)?;
        let running = jobs
            .as_array()
            .is_some_and(|j| j.iter().any(|j| j["device"] == MIRROR_JOB));
        if !running {
            break;
        }
        if Instant::now() > deadline {
            return Err("the disk mirror did not end within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = qmp(
        qsock,
        "blockdev-del",
        serde_json::json!({ "node-name": MIRROR_JOB }),
    );
    Ok(())
}

/// Serve a tunnel the other agent opened (`hello` was its first frame): connect it to
/// the local socket its token and kind name, or refuse.
pub(super) fn serve_tunnel(
    core: &Mutex<AgentCore>,
    mut ch: Channel<TcpStream>,
    hello: TunnelHello,
) -> Result<(), ChannelError> {
    let target = {
        let c = core.lock().unwrap_or_else(|p| p.into_inner());
        c.migrations
            .values()
            .filter(|m| same_token(&m.token, &hello.tunnel))
            .find_map(|m| m.accepts.iter().find(|(k, _)| *k == hello.kind))
            .map(|(_, t)| t.clone())
    };
    let Some(target) = target else {
        tracing::info!(kind = ?hello.kind, "migration tunnel refused: unknown token");
        return ch.send(b"unknown migration");
    };
    let local = match UnixStream::connect(&target) {
        Ok(s) => s,
        Err(e) => return ch.send(format!("{}: {e}", target.display()).as_bytes()),
    };
    ch.send(b"ok")?;
    let (out, back) = relay(ch, local);
    tracing::info!(kind = ?hello.kind, out, back, "migration tunnel ended");
    Ok(())
}

/// Token comparison whose time does not depend on where the strings differ.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl AgentCore {
    fn local_of(&self, n: u32, vm: &str) -> Option<Slot> {
        self.state
            .clusters
            .get(&n)
            .and_then(|c| c.slots.iter().find(|s| s.name == vm))
            .cloned()
    }

    /// The slot of `vm` and the stop flag of the migration this agent offered for it under
    /// `token` (the origin's steps act only on a migration it offered).
    fn offered(&self, n: u32, vm: &str, token: &str) -> Result<(Slot, Arc<AtomicBool>), String> {
        let slot = self
            .local_of(n, vm)
            .ok_or_else(|| format!("no VM {} here", quote(vm)))?;
        match self.migrations.get(&slot.local) {
            Some(m) if m.token == token => {
                let stop = m.stop.clone();
                Ok((slot, stop))
            }
            _ => Err("no such migration offered here".into()),
        }
    }

    fn mig_file(&self, local: &str, ext: &str) -> PathBuf {
        self.run_dir().join(format!("{local}.{ext}"))
    }

    /// The NBD socket of a VM's disk server (or its migration proxy).
    fn disk_sock(&mut self, local: &str) -> PathBuf {
        match self.driver.as_libvirt() {
            Some(lv) => lv.disk_socket(local),
            None => self.mig_file(local, "nbd"),
        }
    }

    /// Status, libvirt driver. Origin: the `virsh migrate` and its job, in the shape of
    /// qemu's `query-migrate`; destination: whether the domain runs here, and its disk
    /// proxy.
    fn status_libvirt(
        &mut self,
        slot: &Slot,
        incoming: bool,
    ) -> Result<serde_json::Value, Refusal> {
        if incoming || slot.state == "migrating" {
            let disk = self.proxy_status(slot)?;
            let run = match self
                .driver
                .as_libvirt()
                .and_then(|lv| lv.domain_state(&slot.local))
            {
                Some(s) if s == "running" => "running",
                _ => "inmigrate",
            };
            return Ok(serde_json::json!({ "run": { "status": run }, "disk": disk }));
        }
        let log = self.mig_file(&slot.local, "virsh.log");
        let Some(lv) = self.driver.as_libvirt() else {
            return Err("not a libvirt site".into());
        };
        let Some(m) = self.migrations.get_mut(&slot.local) else {
            return Err("no migration of this VM here".into());
        };
        let exited = match &mut m.virsh {
            None => {
                return Ok(serde_json::json!({
                    "status": "setup", "ram": { "transferred": 0, "total": 0 }
                }))
            }
            Some(c) => c.try_wait().map_err(|e| e.to_string())?,
        };
        match exited {
            None => {
                if let Some(ms) = m.downtime_ms {
                    if lv.set_max_downtime(&slot.local, ms) {
                        m.downtime_ms = None;
                    }
                }
                let Some((done, total, remaining, bps)) = lv.job_info(&slot.local) else {
                    return Ok(serde_json::json!({
                        "status": "setup", "ram": { "transferred": 0, "total": 0 }
                    }));
                };
                m.ram = (done, total);
                Ok(serde_json::json!({
                    "status": "active",
                    "ram": {
                        "transferred": done, "total": total, "remaining": remaining,
                        "mbps": bps as f64 * 8.0 / 1e6,
                    },
                }))
            }
            Some(st) if st.success() => Ok(serde_json::json!({
                "status": "completed",
                "ram": { "transferred": m.ram.0, "total": m.ram.1, "remaining": 0 },
            })),
            Some(st) => {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let why = text
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
                    .to_string();
                Ok(serde_json::json!({
                    "status": "failed",
                    "error-desc": format!("virsh migrate exited with {st}: {why}"),
                }))
            }
        }
    }

    /// Abort at the origin, libvirt driver: the migration job is cancelled (libvirt
    /// then resumes the domain here and removes the destination's), and a domain left
    /// paused is resumed.
    fn resume_libvirt(&mut self, slot: &Slot, m: Option<Migration>) {
        let Some(lv) = self.driver.as_libvirt() else {
            return;
        };
        if let Some(mut m) = m {
            if let Some(c) = &mut m.virsh {
                if matches!(c.try_wait(), Ok(None)) {
                    lv.abort_job(&slot.local);
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
        if lv.domain_state(&slot.local).as_deref() == Some("paused") {
            lv.resume(&slot.local);
        }
    }

    /// One migration step for `vm` of `cluster`.
    pub(super) fn migrate_step(
        &mut self,
        authz: &Authorization,
        cluster: &str,
        vm: &str,
        step: MigrateStep,
    ) -> Result<serde_json::Value, Refusal> {
        let kind = self.driver.kind();
        if !matches!(kind, "qemu" | "netns" | "libvirt") {
            return Err(format!(
                "live migration needs the qemu, libvirt or netns driver (this site runs {kind})"
            ));
        }
        let n = self.confirmed(&authz.key, cluster)?;
        match step {
            MigrateStep::Offer { token } => {
                let slot = self
                    .local_of(n, vm)
                    .filter(|s| s.handle.is_some() && s.state == "running")
                    .ok_or_else(|| format!("VM {} is not running here", quote(vm)))?;
                let target = self.disk_sock(&slot.local);
                let domain = match self.driver.as_libvirt() {
                    Some(lv) => Some(lv.origin_domain(&slot.local).map_err(|e| e.to_string())?),
                    None => None,
                };
                if kind == "netns" {
                    // A light VM's disk gets its server for the move.
                    self.serve_netns_disk(&slot)?;
                }
                let disk_size = std::fs::metadata(
                    self.cfg
                        .state_dir
                        .join("disks")
                        .join(format!("{}.img", slot.local)),
                )
                .map(|m| m.len())
                .map_err(|e| format!("the disk of {}: {e}", quote(vm)))?;
                self.migrations.insert(
                    slot.local.clone(),
                    Migration {
                        token,
                        accepts: vec![(TunnelKind::Nbd, target)],
                        precopy: false,
                        mirror: false,
                        incoming: false,
                        stop: Arc::default(),
                        sent: false,
                        moved: None,
                        virsh: None,
                        downtime_ms: None,
                        ram: (0, 0),
                    },
                );
                Ok(serde_json::json!({
                    "disk_size": disk_size, "driver": kind, "domain": domain
                }))
            }
            MigrateStep::Prepare {
                token,
                host,
                memory_mb,
                mac,
                origin,
                origin_key,
                precopy_disk_size,
                disk_rate,
                origin_driver,
                origin_domain,
            } => {
                let theirs = origin_driver.as_deref().unwrap_or("qemu");
                if theirs != kind {
                    return Err(format!(
                        "{} runs on the {theirs} driver at its site and this site runs {kind}: \
                         a VM moves only between sites of the same driver",
                        quote(vm)
                    ));
                }
                // libvirt: what the origin's libvirtd will be let into, checked before
                // anything is made.
                let libvirt = match self.driver.as_libvirt() {
                    None => None,
                    Some(lv) => {
                        if !lv.accepts_migrations() {
                            return Err(format!(
                                "this site's agent does not accept libvirt migrations (its \
                                 admin runs it without --libvirt-accept-migrations); {} stays \
                                 where it is",
                                quote(vm)
                            ));
                        }
                        if precopy_disk_size.is_some() {
                            return Err("--precopy-disk is not built for libvirt domains: \
                                        their disk follows through the proxy"
                                .into());
                        }
                        let sock = lv.daemon_socket().ok_or_else(|| {
                            "this site's libvirt URI names no local libvirtd socket to \
                             migrate into"
                                .to_string()
                        })?;
                        let origin = origin_domain
                            .ok_or_else(|| "the origin did not name its domain".to_string())?;
                        Some((sock, origin))
                    }
                };
                if self.local_of(n, vm).is_some() {
                    return Err(format!("VM {} already has a slot here", quote(vm)));
                }
                let h = self
                    .hosts()
                    .into_iter()
                    .find(|h| h.name == host)
                    .ok_or_else(|| format!("no host {} at this site", quote(&host)))?;
                if h.free_vms == 0 || h.free_memory_mb < memory_mb {
                    return Err(format!(
                        "host {} lacks capacity: asked 1 VM / {memory_mb} MiB, free {} VMs / {} MiB",
                        quote(&host),
                        h.free_vms,
                        h.free_memory_mb
                    ));
                }
                let held = self.slots_held_by(&authz.key);
                authz
                    .check_reserve(held, 1, [host.as_str()])
                    .map_err(|e| e.to_string())?;
                let c = &self.state.clusters[&n];
                if c.overlay.is_none() {
                    return Err(format!(
                        "overlay of {} is not up here; start the cluster",
                        quote(cluster)
                    ));
                }
                let nic = (0..)
                    .map(|i| format!("mvq{n}-{i}"))
                    .find(|x| !c.slots.iter().any(|s| &s.nic == x) && !super::link_exists(x))
                    .unwrap_or_default();
                let slot = Slot {
                    name: vm.into(),
                    host: host.clone(),
                    memory_mb,
                    state: "migrating".into(),
                    handle: None,
                    local: format!("c{n}-{vm}"),
                    nic,
                    incoming: precopy_disk_size.is_none().then(|| IncomingRecord {
                        token: token.clone(),
                        origin: origin.clone(),
                        origin_key: origin_key.clone(),
                    }),
                };
                let spec = VmSpec {
                    cluster: cluster.into(),
                    name: vm.into(),
                    role: crate::model::Role::Compute,
                    host,
                    mac,
                    memory_mb,
                    bridge: c.bridge.clone(),
                    dhcp: None,
                    local_name: slot.local.clone(),
                    nic: slot.nic.clone(),
                    stack: c.stack.is_some(),
                };
                // Intent first: the slot (and so its names) is saved before anything runs.
                if let Some(c) = self.state.clusters.get_mut(&n) {
                    c.slots.push(slot.clone());
                }
                self.save_one(n).map_err(|e| e.to_string())?;
                let stop = Arc::new(AtomicBool::new(false));
                let source = self.mig_file(&slot.local, "src");
                let incoming = self.mig_file(&slot.local, "min");
                let ctl = self.mig_file(&slot.local, "xnbd.ctl");
                let mut accepts = match &libvirt {
                    Some((sock, _)) => vec![(TunnelKind::Libvirt, sock.clone())],
                    None => vec![(TunnelKind::Ram, incoming.clone())],
                };
                if precopy_disk_size.is_some() {
                    // The origin mirrors into this side's disk server.
                    accepts.push((TunnelKind::Nbd, self.mig_file(&slot.local, "nbd")));
                }
                self.migrations.insert(
                    slot.local.clone(),
                    Migration {
                        token: token.clone(),
                        accepts,
                        precopy: precopy_disk_size.is_some(),
                        mirror: false,
                        incoming: true,
                        stop: stop.clone(),
                        sent: false,
                        moved: None,
                        virsh: None,
                        downtime_ms: None,
                        ram: (0, 0),
                    },
                );
                let mut answer = serde_json::json!("waiting for memory");
                let started = match precopy_disk_size {
                    Some(size) => self
                        .driver
                        .start_incoming(&spec, IncomingDisk::Mirror { size }, &incoming)
                        .map_err(|e| e.to_string()),
                    None => relay_listener(
                        source.clone(),
                        origin,
                        origin_key,
                        token.clone(),
                        TunnelKind::Nbd,
                        false,
                        stop,
                    )
                    .and_then(|()| {
                        match (&libvirt, self.driver.as_libvirt()) {
                            (Some((_, origin)), Some(lv)) => {
                                let (r, xml, dname) = lv
                                    .start_incoming_domain(&spec, origin, &source, &ctl, disk_rate)
                                    .map_err(|e| e.to_string())?;
                                let key = super::load_key(&self.cfg.state_dir)
                                    .map_err(|e| e.to_string())?;
                                let sig = key.sign(&LibvirtIncoming::signed(&token, &dname, &xml));
                                let inc = LibvirtIncoming {
                                    xml,
                                    dname,
                                    sig: crate::model::hex(&sig),
                                };
                                answer = serde_json::json!({
                                    "state": "waiting for memory", "libvirt": inc
                                });
                                Ok(r)
                            }
                            _ => self
                                .driver
                                .start_incoming(
                                    &spec,
                                    IncomingDisk::Proxy {
                                        source: &source,
                                        ctl: &ctl,
                                        rate: disk_rate,
                                    },
                                    &incoming,
                                )
                                .map_err(|e| e.to_string()),
                        }
                    }),
                };
                match started {
                    Ok(r) => {
                        if let Some(s) = self
                            .state
                            .clusters
                            .get_mut(&n)
                            .and_then(|c| c.slots.iter_mut().find(|s| s.name == vm))
                        {
                            s.handle = Some(r.handle.clone());
                        }
                        self.running.insert(slot.local.clone(), r);
                        self.save_one(n).map_err(|e| e.to_string())?;
                        Ok(answer)
                    }
                    Err(e) => {
                        self.drop_incoming(n, vm);
                        Err(format!("starting the incoming VM: {e}"))
                    }
                }
            }
            MigrateStep::Mirror {
                token,
                dest,
                dest_key,
            } => {
                let (slot, stop) = self.offered(n, vm, &token)?;
                let sock = self.mig_file(&slot.local, "mir");
                relay_listener(
                    sock.clone(),
                    dest,
                    dest_key,
                    token,
                    TunnelKind::Nbd,
                    true,
                    stop,
                )?;
                let qsock = self.mig_file(&slot.local, "qmp");
                qmp(
                    &qsock,
                    "blockdev-add",
                    serde_json::json!({
                        "driver": "nbd",
                        "node-name": MIRROR_JOB,
                        "server": { "type": "unix", "path": sock.display().to_string() },
                        "export": vm,
                    }),
                )?;
                if let Some(m) = self.migrations.get_mut(&slot.local) {
                    m.mirror = true;
                }
                qmp(
                    &qsock,
                    "blockdev-mirror",
                    serde_json::json!({
                        "job-id": MIRROR_JOB,
                        "device": "disk0",
                        "target": MIRROR_JOB,
                        "sync": "full",
                    }),
                )?;
                Ok(serde_json::json!("mirroring"))
            }
            MigrateStep::MirrorEnd => {
                let slot = self
                    .local_of(n, vm)
                    .ok_or_else(|| format!("no VM {} here", quote(vm)))?;
                let qsock = self.mig_file(&slot.local, "qmp");
                end_mirror(&qsock, false)?;
                if let Some(m) = self.migrations.get_mut(&slot.local) {
                    m.mirror = false;
                }
                Ok(serde_json::json!("mirrored"))
            }
            MigrateStep::Send {
                token,
                dest,
                dest_key,
                downtime_ms,
                rate,
                libvirt,
            } => {
                let (slot, stop) = self.offered(n, vm, &token)?;
                let sock = self.mig_file(&slot.local, "mig");
                if kind == "netns" {
                    return self.send_netns(&slot, sock, dest, dest_key, token, stop);
                }
                if kind == "libvirt" {
                    let inc = libvirt
                        .filter(|l| l.verify(&token, &dest_key))
                        .ok_or_else(|| {
                            "the destination's domain is missing or not signed by its agent"
                                .to_string()
                        })?;
                    let lvd = self.mig_file(&slot.local, "lvd");
                    relay_listener(
                        lvd.clone(),
                        dest,
                        dest_key,
                        token,
                        TunnelKind::Libvirt,
                        false,
                        stop,
                    )?;
                    let log = self.mig_file(&slot.local, "virsh.log");
                    let child = self
                        .driver
                        .as_libvirt()
                        .ok_or("not a libvirt site")?
                        .migrate_out(&slot.local, &inc.xml, &inc.dname, &lvd, rate, &log)
                        .map_err(|e| e.to_string())?;
                    if let Some(m) = self.migrations.get_mut(&slot.local) {
                        m.sent = true;
                        m.virsh = Some(child);
                        m.downtime_ms = Some(downtime_ms);
                    }
                    return Ok(serde_json::json!("sending"));
                }
                relay_listener(
                    sock.clone(),
                    dest,
                    dest_key,
                    token,
                    TunnelKind::Ram,
                    true,
                    stop,
                )?;
                let qsock = self.mig_file(&slot.local, "qmp");
                // Always both: qemu keeps parameters from one migration to the next.
                let params = serde_json::json!({
                    "downtime-limit": downtime_ms,
                    "max-bandwidth": if rate > 0 { rate } else { DEFAULT_RATE },
                });
                qmp(&qsock, "migrate-set-parameters", params)?;
                qmp(
                    &qsock,
                    "migrate",
                    serde_json::json!({ "uri": format!("unix:{}", sock.display()) }),
                )?;
                if let Some(m) = self.migrations.get_mut(&slot.local) {
                    m.sent = true;
                }
                Ok(serde_json::json!("sending"))
            }
            MigrateStep::Status => {
                let slot = self
                    .local_of(n, vm)
                    .ok_or_else(|| format!("no VM {} here", quote(vm)))?;
                let qsock = self.mig_file(&slot.local, "qmp");
                let incoming = self
                    .migrations
                    .get(&slot.local)
                    .map(|m| (m.incoming, m.precopy));
                if kind == "netns" {
                    return self.status_netns(&slot, incoming.is_some_and(|(i, _)| i));
                }
                if kind == "libvirt" {
                    return self.status_libvirt(&slot, incoming.is_some_and(|(i, _)| i));
                }
                if slot.state == "migrating" || incoming.is_some_and(|(ram, _)| ram) {
                    // Disk first: a VM still `inmigrate` after it ran nothing before it.
                    let disk = if incoming.is_some_and(|(_, pre)| pre) {
                        serde_json::Value::Null
                    } else {
                        self.proxy_status(&slot)?
                    };
                    let run = qmp(&qsock, "query-status", serde_json::Value::Null)?;
                    Ok(serde_json::json!({ "run": run, "disk": disk }))
                } else {
                    let mut v = qmp(&qsock, "query-migrate", serde_json::Value::Null)?;
                    v["jobs"] = qmp(&qsock, "query-block-jobs", serde_json::Value::Null)?;
                    Ok(v)
                }
            }
            MigrateStep::Finish => {
                let slot = self
                    .local_of(n, vm)
                    .ok_or_else(|| format!("no VM {} here", quote(vm)))?;
                if kind == "netns" {
                    return self.finish_netns(n, &slot);
                }
                let mut answer = serde_json::json!("running");
                if let Some(lv) = self.driver.as_libvirt() {
                    // libvirt resumed the domain here (its qemu announces the MAC itself
                    // after an incoming migration).
                    let st = lv.domain_state(&slot.local).unwrap_or_default();
                    if st != "running" {
                        return Err(format!("the incoming domain is {st:?} (not running yet)"));
                    }
                    answer = serde_json::json!({
                        "state": "running", "downtime_ms": lv.incoming_downtime_ms(&slot.local)
                    });
                }
                let qsock = self.mig_file(&slot.local, "qmp");
                let precopy = self.migrations.get(&slot.local).is_some_and(|m| m.precopy);
                let mut run = if kind == "libvirt" {
                    serde_json::json!({ "status": "running" })
                } else {
                    qmp(&qsock, "query-status", serde_json::Value::Null)?
                };
                if precopy && run["status"] == "paused" {
                    // The mirror completed (the controller ended it first): run.
                    qmp(&qsock, "cont", serde_json::Value::Null)?;
                    run = qmp(&qsock, "query-status", serde_json::Value::Null)?;
                }
                if run["status"] != "running" {
                    return Err(format!(
                        "the incoming VM is {} (not running yet)",
                        run["status"]
                    ));
                }
                // Tell the network at once where the MAC is now.
                if kind == "libvirt" {
                    // (libvirt's qemu does so itself.)
                } else if let Err(e) = qmp(
                    &qsock,
                    "announce-self",
                    serde_json::json!({
                        "initial": 50, "max": 550, "rounds": 5, "step": 100
                    }),
                ) {
                    tracing::warn!(error = %e, "announce-self");
                }
                if !precopy {
                    xnbd_ctl(
                        &self.mig_file(&slot.local, "xnbd.ctl"),
                        serde_json::json!({"cmd": "cache-all"}),
                    )?;
                }
                if let Some(s) = self
                    .state
                    .clusters
                    .get_mut(&n)
                    .and_then(|c| c.slots.iter_mut().find(|s| s.name == vm))
                {
                    s.state = "running".into();
                }
                self.save_one(n).map_err(|e| e.to_string())?;
                Ok(answer)
            }
            MigrateStep::Done => {
                let slot = self
                    .local_of(n, vm)
                    .ok_or_else(|| format!("no VM {} here", quote(vm)))?;
                if !self.migrations.get(&slot.local).is_some_and(|m| m.precopy) {
                    let st = xnbd_ctl(
                        &self.mig_file(&slot.local, "xnbd.ctl"),
                        serde_json::json!({"cmd": "status"}),
                    )?;
                    if st["mode"] != "target" {
                        return Err("the disk is not all here yet".into());
                    }
                }
                if kind == "netns" {
                    // A light VM's disk is a plain file again: its proxy goes.
                    let f = crate::driver::netns_files(&self.run_dir(), &slot.local);
                    crate::process::kill_pidfile(&f.pid, &f.nbd.display().to_string());
                }
                self.migrations.remove(&slot.local);
                if let Some(s) = self
                    .state
                    .clusters
                    .get_mut(&n)
                    .and_then(|c| c.slots.iter_mut().find(|s| s.name == vm))
                {
                    s.incoming = None;
                }
                self.save_one(n).map_err(|e| e.to_string())?;
                Ok(serde_json::json!("done"))
            }
            MigrateStep::Release => {
                let slot = self
                    .local_of(n, vm)
                    .ok_or_else(|| format!("no VM {} here", quote(vm)))?;
                self.migrations.remove(&slot.local);
                self.stop_vm(n, vm);
                let mut log = Vec::new();
                self.clean_vm(&slot, true, false, &mut log);
                if let Some(c) = self.state.clusters.get_mut(&n) {
                    c.slots.retain(|s| s.name != vm);
                }
                self.save_one(n).map_err(|e| e.to_string())?;
                Ok(serde_json::json!("released"))
            }
            MigrateStep::Abort => {
                let Some(slot) = self.local_of(n, vm) else {
                    return Ok(serde_json::json!("nothing here"));
                };
                if slot.state == "migrating" {
                    self.drop_incoming(n, vm);
                    return Ok(serde_json::json!("removed"));
                }
                let m = self.migrations.remove(&slot.local);
                if kind == "libvirt" {
                    self.resume_libvirt(&slot, m);
                    return Ok(serde_json::json!("resumed"));
                }
                if kind == "netns" {
                    self.resume_netns(&slot, m.as_ref().is_some_and(|m| m.sent));
                    return Ok(serde_json::json!("resumed"));
                }
                if m.as_ref().is_some_and(|m| m.mirror) {
                    let qsock = self.mig_file(&slot.local, "qmp");
                    if let Err(e) = end_mirror(&qsock, true) {
                        tracing::warn!(error = %e, "ending the disk mirror");
                    }
                }
                if m.is_some_and(|m| m.sent) {
                    let qsock = self.mig_file(&slot.local, "qmp");
                    let _ = qmp(&qsock, "migrate_cancel", serde_json::Value::Null);
                    // A migration cancelled after it stopped the VM leaves it paused.
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while Instant::now() < deadline {
                        let st = qmp(&qsock, "query-status", serde_json::Value::Null)?;
                        if st["status"] == "running" {
                            break;
                        }
                        if st["status"] != "paused"
                            && st["status"] != "postmigrate"
                            && st["status"] != "finish-migrate"
                        {
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                        let _ = qmp(&qsock, "cont", serde_json::Value::Null);
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                Ok(serde_json::json!("resumed"))
            }
        }
    }

    /// The status of an incoming VM's disk proxy. After the switchover the VM runs on
    /// the proxy: one that died is started again with the same command line, resumes
    /// from its bitmap (no block fetched again) and goes on copying.
    fn proxy_status(&mut self, slot: &Slot) -> Result<serde_json::Value, String> {
        let ctl = self.mig_file(&slot.local, "xnbd.ctl");
        let status = serde_json::json!({"cmd": "status"});
        match xnbd_ctl(&ctl, status.clone()) {
            Ok(v) => Ok(v),
            Err(e) => {
                let pid = self.mig_file(&slot.local, "xnbd.pid");
                let mark = self.disk_sock(&slot.local).display().to_string();
                if slot.state != "running" || crate::process::pidfile_alive(&pid, &mark) {
                    return Err(e);
                }
                self.restart_proxy(slot)?;
                xnbd_ctl(&ctl, status)
            }
        }
    }

    /// Once a second (the agent's housekeeping): the disk proxy of every VM that runs
    /// here after its switchover and whose disk still follows is started again if it
    /// died, whether or not a `vm migrate` asks for the status meanwhile.
    pub fn check_disk_proxies(&mut self) {
        let locals: Vec<String> = self
            .migrations
            .iter()
            .filter(|(_, m)| m.incoming && !m.precopy)
            .map(|(l, _)| l.clone())
            .collect();
        for local in locals {
            let Some(slot) = self
                .state
                .clusters
                .values()
                .flat_map(|c| c.slots.iter())
                .find(|s| s.local == local && s.state == "running")
                .cloned()
            else {
                continue;
            };
            let pid = self.mig_file(&local, "xnbd.pid");
            let mark = self.disk_sock(&local).display().to_string();
            if !crate::process::pidfile_alive(&pid, &mark) {
                if let Err(e) = self.restart_proxy(&slot) {
                    tracing::warn!(vm = %local, error = %e, "disk proxy not started again");
                }
            }
        }
    }

    /// Start a dead disk proxy again from its saved command line (`run/<vm>.xnbd.args`).
    fn restart_proxy(&mut self, slot: &Slot) -> Result<(), String> {
        let args = self.mig_file(&slot.local, "xnbd.args");
        let argv: Vec<String> = std::fs::read_to_string(&args)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .filter(|a: &Vec<String>| a.len() > 1 && a[1] == "proxy")
            .ok_or_else(|| format!("the disk proxy died and {} is unusable", args.display()))?;
        let log = self.mig_file(&slot.local, "xnbd.log");
        let a: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
        let child = crate::process::spawn(&argv[0], &a, &[], &log).map_err(|e| e.to_string())?;
        let _ = std::fs::write(
            self.mig_file(&slot.local, "xnbd.pid"),
            child.id().to_string(),
        );
        tracing::warn!(vm = %slot.local, pid = child.id(), "disk proxy died: started again from its bitmap");
        if let Some(r) = self.running.get_mut(&slot.local) {
            r.children.push(child);
        }
        let ctl = self.mig_file(&slot.local, "xnbd.ctl");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Started with --no-background like the first: the copy goes on on request.
            match xnbd_ctl(&ctl, serde_json::json!({"cmd": "cache-all"})) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("the restarted disk proxy does not answer: {e}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Origin, netns driver: serve the VM's disk file for the destination's proxy.
    fn serve_netns_disk(&mut self, slot: &Slot) -> Result<(), String> {
        let f = crate::driver::netns_files(&self.run_dir(), &slot.local);
        let disk = self
            .cfg
            .state_dir
            .join("disks")
            .join(format!("{}.img", slot.local));
        if !disk.exists() {
            // A VM started before light VMs had disks gets an empty one.
            std::fs::create_dir_all(disk.parent().unwrap_or(&self.cfg.state_dir))
                .and_then(|()| std::fs::File::create(&disk))
                .and_then(|d| d.set_len(crate::driver::NETNS_DISK_BYTES))
                .map_err(|e| format!("{}: {e}", disk.display()))?;
        }
        let nbd = f.nbd.display().to_string();
        crate::process::kill_pidfile(&f.pid, &nbd);
        let export = format!("{}={}", slot.name, disk.display());
        let xnbd = crate::driver::netns_xnbd_bin().display().to_string();
        let mut child = crate::process::spawn(
            &xnbd,
            &["serve", "--export", &export, "--unix", &nbd],
            &[],
            &f.log,
        )
        .map_err(|e| e.to_string())?;
        let _ = std::fs::write(&f.pid, child.id().to_string());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f.nbd.exists() {
            if !matches!(child.try_wait(), Ok(None)) || Instant::now() > deadline {
                crate::process::stop_child(&mut child);
                return Err(format!(
                    "xnbd serve of the disk did not start; see {}",
                    f.log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        match self.running.get_mut(&slot.local) {
            Some(r) => r.children.push(child),
            // Stopped with the VM by its mark otherwise (`clean_vm`).
            None => drop(child),
        }
        Ok(())
    }

    /// Origin, netns driver: take the VM's NIC down, send its state through the `ram`
    /// tunnel and wait for the destination to have applied it (the VM then answers
    /// there); on failure the NIC comes up here again.
    fn send_netns(
        &mut self,
        slot: &Slot,
        sock: PathBuf,
        dest: String,
        dest_key: String,
        token: String,
        stop: Arc<AtomicBool>,
    ) -> Result<serde_json::Value, Refusal> {
        use std::io::{BufRead, BufReader, Read, Write};
        let ns = slot
            .handle
            .as_deref()
            .and_then(|h| h.strip_prefix("netns:"))
            .ok_or_else(|| format!("VM {} is not running here", quote(&slot.name)))?
            .to_string();
        let out = crate::process::run(
            "ip",
            &["-n", &ns, "-4", "-o", "addr", "show", "dev", "eth0"],
        )
        .map_err(|e| e.to_string())?;
        let addrs: Vec<String> = out
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                w.find(|x| *x == "inet")?;
                w.next().map(str::to_string)
            })
            .collect();
        if addrs.is_empty() {
            return Err(format!("VM {} has no address yet", quote(&slot.name)));
        }
        let state = crate::migrate::NetnsState { addrs };
        let mut line = serde_json::to_string(&state).map_err(|e| e.to_string())?;
        crate::migrate::NetnsState::parse(&line)?;
        line.push('\n');
        relay_listener(
            sock.clone(),
            dest,
            dest_key,
            token,
            TunnelKind::Ram,
            true,
            stop,
        )?;
        let t0 = Instant::now();
        let link = |state: &str| {
            crate::process::run("ip", &["-n", &ns, "link", "set", "eth0", state])
                .map_err(|e| e.to_string())
        };
        link("down")?;
        let sent = (|| -> Result<(), String> {
            let err = |e: std::io::Error| format!("sending the VM's state: {e}");
            let mut c = UnixStream::connect(&sock).map_err(err)?;
            c.set_read_timeout(Some(Duration::from_secs(20)))
                .map_err(err)?;
            c.write_all(line.as_bytes()).map_err(err)?;
            let mut answer = String::new();
            BufReader::new(c)
                .take(4096)
                .read_line(&mut answer)
                .map_err(err)?;
            if answer.trim() != "ok" {
                return Err(format!(
                    "the destination did not take the VM's state: {}",
                    answer.trim()
                ));
            }
            Ok(())
        })();
        let down_ms = t0.elapsed().as_millis() as u64;
        if let Err(e) = sent {
            let _ = link("up");
            return Err(e);
        }
        if let Some(m) = self.migrations.get_mut(&slot.local) {
            m.sent = true;
            m.moved = Some((line.len() as u64, down_ms));
        }
        Ok(serde_json::json!("sent"))
    }

    /// Status, netns driver. Origin: whether the state went (qemu's `query-migrate`
    /// shape); destination: whether it runs here, and its disk proxy.
    fn status_netns(&mut self, slot: &Slot, incoming: bool) -> Result<serde_json::Value, Refusal> {
        if !incoming && slot.state != "migrating" {
            let moved = self.migrations.get(&slot.local).and_then(|m| m.moved);
            return Ok(match moved {
                Some((bytes, down)) => serde_json::json!({
                    "status": "completed",
                    "ram": { "transferred": bytes, "total": bytes, "remaining": 0 },
                    "downtime": down,
                    "jobs": [],
                }),
                None => serde_json::json!({
                    "status": "setup", "ram": { "transferred": 0, "total": 0 }, "jobs": [],
                }),
            });
        }
        let disk = self.proxy_status(slot)?;
        let f = crate::driver::netns_files(&self.run_dir(), &slot.local);
        let run = if f.moved.exists() {
            "running"
        } else {
            "inmigrate"
        };
        Ok(serde_json::json!({ "run": { "status": run }, "disk": disk }))
    }

    /// Finish, netns driver: the VM's DHCP client starts, the background copy too.
    fn finish_netns(&mut self, n: u32, slot: &Slot) -> Result<serde_json::Value, Refusal> {
        let f = crate::driver::netns_files(&self.run_dir(), &slot.local);
        if !f.moved.exists() {
            return Err("the incoming VM is not running yet".into());
        }
        if slot.state == "migrating" {
            if let Some(r) = self.running.get_mut(&slot.local) {
                self.driver
                    .finish_incoming(r, &slot.name)
                    .map_err(|e| e.to_string())?;
            }
        }
        xnbd_ctl(
            &self.mig_file(&slot.local, "xnbd.ctl"),
            serde_json::json!({"cmd": "cache-all"}),
        )?;
        if let Some(s) = self
            .state
            .clusters
            .get_mut(&n)
            .and_then(|c| c.slots.iter_mut().find(|s| s.name == slot.name))
        {
            s.state = "running".into();
        }
        self.save_one(n).map_err(|e| e.to_string())?;
        Ok(serde_json::json!("running"))
    }

    /// Abort at the origin, netns driver: the disk server goes; a VM whose NIC went
    /// down for the send has it up again.
    fn resume_netns(&mut self, slot: &Slot, sent: bool) {
        let f = crate::driver::netns_files(&self.run_dir(), &slot.local);
        crate::process::kill_pidfile(&f.pid, &f.nbd.display().to_string());
        if let Some(ns) = slot
            .handle
            .as_deref()
            .and_then(|h| h.strip_prefix("netns:"))
        {
            if sent {
                let _ = crate::process::run("ip", &["-n", ns, "link", "set", "eth0", "up"]);
            }
        }
    }

    /// At start: relay again to the origin for every adopted VM whose disk was still
    /// being copied, so its proxy (which outlived the agent) reconnects and finishes.
    pub(super) fn resume_migrations(&mut self) {
        let pending: Vec<(Slot, IncomingRecord)> = self
            .state
            .clusters
            .values()
            .flat_map(|c| c.slots.iter())
            .filter(|s| s.state == "running")
            .filter(|s| s.handle.as_deref().is_some_and(|h| self.driver.alive(h)))
            .filter_map(|s| s.incoming.clone().map(|r| (s.clone(), r)))
            .collect();
        for (slot, r) in pending {
            let stop = Arc::new(AtomicBool::new(false));
            let source = self.mig_file(&slot.local, "src");
            match relay_listener(
                source,
                r.origin.clone(),
                r.origin_key.clone(),
                r.token.clone(),
                TunnelKind::Nbd,
                false,
                stop.clone(),
            ) {
                Ok(()) => {
                    tracing::info!(vm = %slot.local, origin = %r.origin, "disk copy of a migrated VM resumed");
                    self.migrations.insert(
                        slot.local.clone(),
                        Migration {
                            token: r.token,
                            accepts: Vec::new(),
                            precopy: false,
                            mirror: false,
                            incoming: true,
                            stop,
                            sent: false,
                            moved: None,
                            virsh: None,
                            downtime_ms: None,
                            ram: (0, 0),
                        },
                    );
                }
                Err(e) => tracing::warn!(vm = %slot.local, error = %e, "disk copy not resumed"),
            }
        }
    }

    /// Remove an incoming VM that never took over: its processes, NIC, files, cache
    /// and slot.
    fn drop_incoming(&mut self, n: u32, vm: &str) {
        let Some(slot) = self.local_of(n, vm) else {
            return;
        };
        self.migrations.remove(&slot.local);
        self.stop_vm(n, vm);
        let mut log = Vec::new();
        self.clean_vm(&slot, true, false, &mut log);
        if let Some(c) = self.state.clusters.get_mut(&n) {
            c.slots.retain(|s| s.name != vm);
        }
        let _ = self.save_one(n);
    }
}
