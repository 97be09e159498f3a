//! Controller -> agent requests and the agent's replies (JSON inside the signed
//! [`crate::auth::Envelope`], inside the encrypted [`crate::channel`]).
//!
//! Version: [`PROTO_VERSION`] travels in every envelope body; an agent refuses a
//! version it does not know. Unknown `op`s fail to parse and are refused with the
//! parse error.
//!
//! Version 2: the agent names everything at its site. `reserve` answers with the
//! bridge, TAP, supernode port and per-VM local names it allocated ([`ReserveData`]),
//! and the reservation holds only for a lease until `confirm`; `start_overlay` no
//! longer carries device names or a port; `info` lists the caller's reservations.
use crate::model::{HostInfo, Mac, Role};
use serde::{Deserialize, Serialize};

/// Version of the request set.
pub const PROTO_VERSION: u32 = 2;

/// The body of a signed request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Body {
    /// [`PROTO_VERSION`].
    pub proto: u32,
    /// What to do.
    pub req: Request,
}

/// One VM slot to reserve.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SlotReq {
    /// VM name.
    pub name: String,
    /// Host it goes on.
    pub host: String,
    /// Memory in MiB.
    pub memory_mb: u64,
}

/// DHCP service the frontend VM runs on the overlay.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DhcpService {
    /// The frontend's own address (`198.19.N.1`).
    pub address: String,
    /// Prefix length (24).
    pub prefix: u8,
    /// First and last address of the dynamic range.
    pub range: (String, String),
    /// Fixed leases: MAC, address, host name.
    pub hosts: Vec<(Mac, String, String)>,
}

/// Everything a driver needs to start a VM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmSpec {
    /// Cluster name.
    pub cluster: String,
    /// VM name (also its host name).
    pub name: String,
    /// Frontend or compute.
    pub role: Role,
    /// Host within the site.
    pub host: String,
    /// The VM's MAC.
    pub mac: Mac,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// Bridge the VM's NIC joins (the agent replaces it with the cluster's bridge).
    pub bridge: String,
    /// For the frontend: the DHCP service to run.
    pub dhcp: Option<DhcpService>,
    /// Name of the VM's namespace, files and disk at its site, unique there (set by
    /// the agent from its store; what a controller sends is ignored).
    #[serde(default)]
    pub local_name: String,
    /// Host-side NIC device (veth or TAP) of the VM (set by the agent, like
    /// `local_name`).
    #[serde(default)]
    pub nic: String,
    /// The cluster runs the Slurm stack: a guest that carries no software of its own
    /// (the qemu driver's built guest) boots with Slurm's compute side.
    #[serde(default)]
    pub stack: bool,
}

impl VmSpec {
    /// The name the VM's namespace and files use at its site: `local_name` when set.
    pub fn local(&self) -> &str {
        if self.local_name.is_empty() {
            &self.name
        } else {
            &self.local_name
        }
    }
}

/// Requests an agent serves.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Site name, hosts with free capacity, driver, VMs here.
    Info,
    /// Reserve VM slots for a cluster, all or none. The agent allocates the
    /// cluster's bridge, TAP, supernode port and local names ([`ReserveData`]); the
    /// reservation lapses after its lease unless confirmed.
    Reserve {
        /// Cluster name.
        cluster: String,
        /// The slots.
        slots: Vec<SlotReq>,
        /// Whether the cluster's supernode runs here (the origin site).
        #[serde(default)]
        supernode: bool,
    },
    /// Keep a reservation for good (the controller recorded it).
    Confirm {
        /// Cluster name.
        cluster: String,
    },
    /// Stop everything of a cluster here and free its slots.
    Release {
        /// Cluster name.
        cluster: String,
    },
    /// Start (idempotently) the cluster's bridge and edge here, and its supernode when
    /// it was reserved with one; device names and port come from the reservation.
    StartOverlay {
        /// Cluster name.
        cluster: String,
        /// Community name.
        community: String,
        /// Community secret (hex); written to a 0600 file, passed by path.
        secret: String,
        /// Supernode the edge registers with.
        supernode: String,
        /// Edge name in the community.
        edge_name: String,
    },
    /// Start a reserved VM.
    StartVm {
        /// What to start.
        spec: VmSpec,
    },
    /// Stop a VM (its slot stays reserved).
    StopVm {
        /// Cluster name.
        cluster: String,
        /// VM name.
        vm: String,
    },
    /// The IPv4 address a VM holds on its overlay NIC (from DHCP for computes).
    VmAddress {
        /// Cluster name.
        cluster: String,
        /// VM name.
        vm: String,
    },
    /// Ping addresses from inside a VM over the overlay; median RTT in ms.
    Ping {
        /// Cluster name.
        cluster: String,
        /// VM to ping from.
        vm: String,
        /// Overlay addresses.
        targets: Vec<String>,
    },

    // Live migration (control/src/migrate.rs). New in version 2 agents that have it; an
    // agent without it refuses the unknown op.
    /// One step of moving a running VM between two sites.
    Migrate {
        /// Cluster name.
        cluster: String,
        /// VM name.
        vm: String,
        /// What to do.
        step: crate::migrate::MigrateStep,
    },

    // The cluster stack (control/src/stack.rs). An agent without it refuses the
    // unknown op.
    /// Run the cluster's Slurm here: keep the munge key and node list, start munged
    /// and slurmctld (frontend) or slurmd (computes) in the cluster's running VMs
    /// here and in those started later, rewrite their configuration when it changed.
    Stack {
        /// Cluster name.
        cluster: String,
        /// Key and nodes.
        stack: crate::stack::SlurmStack,
    },
    /// Run a command inside a VM and return its exit status and (bounded) output.
    Exec {
        /// Cluster name.
        cluster: String,
        /// VM name.
        vm: String,
        /// The command.
        exec: crate::stack::ExecReq,
    },
}

/// The agent's answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Reply {
    /// Whether the request was done.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Result data.
    #[serde(default)]
    pub data: serde_json::Value,
}

/// Reply data of [`Request::Reserve`]: what the agent allocated for the cluster.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReserveData {
    /// Bridge the cluster's VMs and edge join here.
    pub bridge: String,
    /// TAP device of the cluster's edge here.
    pub tap: String,
    /// UDP port of the cluster's supernode here (when asked for).
    pub supernode_port: Option<u16>,
    /// Seconds the reservation holds without [`Request::Confirm`].
    pub lease_secs: u64,
    /// VM name -> its local name here (namespace, files).
    pub local_names: Vec<(String, String)>,
}

/// One of the caller's reservations at an agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReservationView {
    /// Cluster name.
    pub cluster: String,
    /// Whether the controller confirmed it.
    pub confirmed: bool,
    /// Seconds until an unconfirmed reservation lapses.
    pub expires_in: Option<u64>,
    /// Bridge here.
    pub bridge: String,
    /// Edge TAP here.
    pub tap: String,
    /// Supernode port here.
    pub supernode_port: Option<u16>,
}

/// A VM as the agent sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentVm {
    /// Cluster.
    pub cluster: String,
    /// VM name.
    pub name: String,
    /// Host.
    pub host: String,
    /// `reserved`, `running`, `stopped`.
    pub state: String,
    /// How to reach it on this machine (`netns:<name>` or `qemu:<pid>`).
    #[serde(default)]
    pub handle: Option<String>,
}

/// Reply data of [`Request::Info`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InfoData {
    /// Site name the agent serves.
    pub site: String,
    /// VM driver in use.
    pub driver: String,
    /// Hosts with free capacity.
    pub hosts: Vec<HostInfo>,
    /// VMs of all clusters here (only the caller's are listed in full).
    pub vms: Vec<AgentVm>,
    /// Overlay processes of the caller's clusters: cluster -> running.
    pub overlays: Vec<(String, bool)>,
    /// `mvc edge status --json` of the caller's clusters' edges here (cluster, status).
    #[serde(default)]
    pub edges: Vec<(String, serde_json::Value)>,
    /// The caller's reservations here.
    #[serde(default)]
    pub reservations: Vec<ReservationView>,
    /// The agent's clock (Unix seconds) when it answered, for `mvc doctor`'s clock skew
    /// check; absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<u64>,
}

/// A name the agent may put into file names, namespace names and `ip` arguments:
/// ASCII letters, digits and `-`, not starting with `-`, at most `max` bytes.
pub fn safe_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && !s.starts_with('-')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

pub(crate) fn check_name(what: &str, s: &str, max: usize) -> Result<(), String> {
    if safe_name(s, max) {
        Ok(())
    } else {
        Err(format!(
            "{what} {} is not a valid name (letters, digits, '-', at most {max})",
            crate::validate::quote(s)
        ))
    }
}

pub(crate) fn check_host(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "host {} is not a valid host name",
            crate::validate::quote(s)
        ))
    }
}

fn check_ip(what: &str, s: &str) -> Result<(), String> {
    s.parse::<std::net::Ipv4Addr>().map(|_| ()).map_err(|_| {
        format!(
            "{what} {} is not an IPv4 address",
            crate::validate::quote(s)
        )
    })
}

/// Most memory one VM may ask for (MiB).
pub const MAX_VM_MEMORY_MB: u64 = 1 << 20;
/// Most slots or DHCP hosts in one request.
pub const MAX_ITEMS: usize = 256;

impl Request {
    /// Check every field an agent will use in a command line, file or namespace name.
    /// The agent refuses a request that fails, before doing anything.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Request::Info => Ok(()),
            Request::Reserve { cluster, slots, .. } => {
                check_name("cluster", cluster, 24)?;
                if slots.is_empty() || slots.len() > MAX_ITEMS {
                    return Err(format!("1 to {MAX_ITEMS} slots per reservation"));
                }
                for s in slots {
                    check_name("VM", &s.name, 40)?;
                    check_host(&s.host)?;
                    if s.memory_mb == 0 || s.memory_mb > MAX_VM_MEMORY_MB {
                        return Err(format!("VM {} asks for {} MiB", s.name, s.memory_mb));
                    }
                }
                Ok(())
            }
            Request::Release { cluster } | Request::Confirm { cluster } => {
                check_name("cluster", cluster, 24)
            }
            Request::StartOverlay {
                cluster,
                community,
                secret,
                supernode,
                edge_name,
            } => {
                check_name("cluster", cluster, 24)?;
                check_name("community", community, 32)?;
                check_name("edge name", edge_name, 63)?;
                if secret.len() < 32 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err("the community secret must be at least 32 hex digits".into());
                }
                supernode.parse::<std::net::SocketAddrV4>().map_err(|_| {
                    format!(
                        "supernode {} is not ip:port",
                        crate::validate::quote(supernode)
                    )
                })?;
                Ok(())
            }
            Request::StartVm { spec } => {
                check_name("cluster", &spec.cluster, 24)?;
                check_name("VM", &spec.name, 40)?;
                check_host(&spec.host)?;
                if !spec.bridge.is_empty() {
                    check_name("bridge", &spec.bridge, 15)?;
                }
                if spec.memory_mb == 0 || spec.memory_mb > MAX_VM_MEMORY_MB {
                    return Err(format!("VM {} asks for {} MiB", spec.name, spec.memory_mb));
                }
                if let Some(d) = &spec.dhcp {
                    check_ip("DHCP address", &d.address)?;
                    check_ip("DHCP range start", &d.range.0)?;
                    check_ip("DHCP range end", &d.range.1)?;
                    if !(8..=30).contains(&d.prefix) {
                        return Err(format!("DHCP prefix /{}", d.prefix));
                    }
                    if d.hosts.len() > MAX_ITEMS {
                        return Err(format!("at most {MAX_ITEMS} DHCP hosts"));
                    }
                    for (_, ip, name) in &d.hosts {
                        check_ip("DHCP host address", ip)?;
                        check_name("DHCP host name", name, 40)?;
                    }
                }
                Ok(())
            }
            Request::StopVm { cluster, vm } | Request::VmAddress { cluster, vm } => {
                check_name("cluster", cluster, 24)?;
                check_name("VM", vm, 40)
            }
            Request::Ping {
                cluster,
                vm,
                targets,
            } => {
                check_name("cluster", cluster, 24)?;
                check_name("VM", vm, 40)?;
                if targets.len() > 64 {
                    return Err("at most 64 ping targets".into());
                }
                targets.iter().try_for_each(|t| check_ip("ping target", t))
            }
            Request::Migrate { cluster, vm, step } => {
                check_name("cluster", cluster, 24)?;
                check_name("VM", vm, 40)?;
                step.validate()
            }
            Request::Stack { cluster, stack } => {
                check_name("cluster", cluster, 24)?;
                stack.validate()
            }
            Request::Exec { cluster, vm, exec } => {
                check_name("cluster", cluster, 24)?;
                check_name("VM", vm, 40)?;
                exec.validate()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_fields_are_refused() {
        let bad = [
            Request::Release {
                cluster: "../../etc".into(),
            },
            Request::Release {
                cluster: "-force".into(),
            },
            Request::StopVm {
                cluster: "k".into(),
                vm: "a b".into(),
            },
            Request::StartOverlay {
                cluster: "k".into(),
                community: "c".into(),
                secret: "short".into(),
                supernode: "198.18.1.2:7701".into(),
                edge_name: "e".into(),
            },
            Request::StartOverlay {
                cluster: "k".into(),
                community: "c".into(),
                secret: "0".repeat(64),
                supernode: "198.18.1.2".into(),
                edge_name: "e".into(),
            },
            Request::Confirm {
                cluster: "a/b".into(),
            },
            Request::Ping {
                cluster: "k".into(),
                vm: "v".into(),
                targets: vec!["198.19.1.1; reboot".into()],
            },
            Request::Reserve {
                cluster: "k".into(),
                slots: vec![],
                supernode: false,
            },
        ];
        for r in bad {
            assert!(r.validate().is_err(), "{r:?}");
        }
        let good = Request::StartOverlay {
            cluster: "k".into(),
            community: "mvc0011aabb".into(),
            secret: "0a".repeat(32),
            supernode: "198.18.1.2:7701".into(),
            edge_name: "A-a-h0-0".into(),
        };
        assert!(good.validate().is_ok());
    }

    #[test]
    fn requests_round_trip() {
        let reqs = vec![
            Request::Info,
            Request::Reserve {
                cluster: "k".into(),
                slots: vec![SlotReq {
                    name: "k-c1".into(),
                    host: "h0".into(),
                    memory_mb: 256,
                }],
                supernode: true,
            },
            Request::Confirm {
                cluster: "k".into(),
            },
            Request::StartVm {
                spec: VmSpec {
                    cluster: "k".into(),
                    name: "k-fe".into(),
                    role: Role::Frontend,
                    host: "h0".into(),
                    mac: Mac([2, 0, 0, 0, 0, 1]),
                    memory_mb: 512,
                    bridge: "mvb1".into(),
                    dhcp: Some(DhcpService {
                        address: "198.19.1.1".into(),
                        prefix: 24,
                        range: ("198.19.1.10".into(), "198.19.1.250".into()),
                        hosts: vec![(Mac([2, 0, 0, 0, 0, 2]), "198.19.1.10".into(), "k-c1".into())],
                    }),
                    local_name: String::new(),
                    nic: String::new(),
                    stack: false,
                },
            },
        ];
        for r in reqs {
            let b = Body {
                proto: PROTO_VERSION,
                req: r,
            };
            let s = serde_json::to_string(&b).unwrap();
            assert_eq!(serde_json::from_str::<Body>(&s).unwrap(), b);
        }
        assert!(serde_json::from_str::<Body>(r#"{"proto":2,"req":{"op":"format_disk"}}"#).is_err());
    }
}
