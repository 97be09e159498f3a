//! Controller -> agent requests and the agent's replies (JSON inside the signed
//! [`crate::auth::Envelope`], inside the encrypted [`crate::channel`]).
//!
//! Version: [`PROTO_VERSION`] travels in every envelope body; an agent refuses a
//! version it does not know. Unknown `op`s fail to parse and are refused with the
//! parse error.
use crate::model::{HostInfo, Mac, Role};
use serde::{Deserialize, Serialize};

/// Version of the request set.
pub const PROTO_VERSION: u32 = 1;

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
    /// Bridge the VM's NIC joins.
    pub bridge: String,
    /// For the frontend: the DHCP service to run.
    pub dhcp: Option<DhcpService>,
}

/// Requests an agent serves.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Site name, hosts with free capacity, driver, VMs here.
    Info,
    /// Reserve VM slots for a cluster, all or none.
    Reserve {
        /// Cluster name.
        cluster: String,
        /// The slots.
        slots: Vec<SlotReq>,
    },
    /// Stop everything of a cluster here and free its slots.
    Release {
        /// Cluster name.
        cluster: String,
    },
    /// Start (idempotently) the cluster's bridge and edge here, and its supernode when
    /// `supernode_port` is set.
    StartOverlay {
        /// Cluster name.
        cluster: String,
        /// Community name.
        community: String,
        /// Community secret (hex); written to a 0600 file, passed by path.
        secret: String,
        /// Supernode the edge registers with.
        supernode: String,
        /// Run the supernode here, listening on this UDP port.
        supernode_port: Option<u16>,
        /// TAP device name of the edge.
        tap: String,
        /// Bridge name.
        bridge: String,
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(serde_json::from_str::<Body>(r#"{"proto":1,"req":{"op":"format_disk"}}"#).is_err());
    }
}
