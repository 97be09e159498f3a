//! Records shared by the controller store, the agent protocol and the commands.
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

pub use mac::{BadMac, Mac};

/// What a VM is in its cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The cluster's frontend: DHCP server of the overlay, MPI launch node.
    Frontend,
    /// A compute node: takes its address from the frontend by DHCP.
    Compute,
}

impl Role {
    /// Lower-case name as stored.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Frontend => "frontend",
            Role::Compute => "compute",
        }
    }
    /// Parse the stored name.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "frontend" => Some(Role::Frontend),
            "compute" => Some(Role::Compute),
            _ => None,
        }
    }
}

/// A registered site: its frontend runs `mvc agent`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    /// Store id.
    pub id: i64,
    /// Unique short name (`A`, `tokyo`, ...).
    pub name: String,
    /// Where the agent listens (`ip:port`).
    pub agent_addr: String,
    /// The agent's Ed25519 public key (hex), pinned at `site add`.
    pub agent_key: String,
}

/// A VM host of a site with its capacity as last reported by the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Host name, unique within its site.
    pub name: String,
    /// CPU count.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// Most VMs the site admin lets run there.
    pub max_vms: u32,
    /// VM slots still free.
    pub free_vms: u32,
    /// Memory still free in MiB.
    pub free_memory_mb: u64,
}

/// One VM of a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    /// Globally unique VM name (`<cluster>-fe`, `<cluster>-c3`).
    pub name: String,
    /// Frontend or compute.
    pub role: Role,
    /// Site name.
    pub site: String,
    /// Host name within the site.
    pub host: String,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// Allocated MAC (unique across sites and clusters).
    pub mac: Mac,
    /// Overlay address the frontend's DHCP server hands out for this MAC.
    pub ip: Ipv4Addr,
    /// `defined`, `running`, `stopped`, `unreachable`.
    pub state: String,
}

/// The overlay of a cluster: one community, one secret, a supernode on the origin
/// frontend, one edge per VM host in use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overlay {
    /// Community name (unique per cluster).
    pub community: String,
    /// Where the secret lives (`file:/path`), never the secret itself.
    pub secret_ref: String,
    /// Supernode address edges register with (`ip:port`).
    pub supernode: String,
}

/// One edge attaching a VM host's bridge to the overlay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Site name.
    pub site: String,
    /// Host name within the site.
    pub host: String,
    /// TAP device of the edge on that host.
    pub tap: String,
    /// Bridge the TAP and the VMs are enslaved to.
    pub bridge: String,
    /// Edge name in the community.
    pub edge_name: String,
}

/// A cluster with everything that belongs to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    /// Store id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// Site holding the frontend VM and the supernode.
    pub origin: String,
    /// The cluster's overlay network (its own L2 segment: other clusters, of this
    /// user or another, may use the same addresses).
    pub overlay_net: OverlayNet,
    /// `defined`, `running`, `stopped`.
    pub state: String,
    /// Overlay parameters.
    pub overlay: Overlay,
    /// Frontend first, then computes in creation order.
    pub vms: Vec<Vm>,
    /// Edges, one per VM host in use.
    pub attachments: Vec<Attachment>,
}

impl Cluster {
    /// The frontend VM.
    pub fn frontend(&self) -> Option<&Vm> {
        self.vms.iter().find(|v| v.role == Role::Frontend)
    }
    /// Overlay address of the frontend.
    pub fn frontend_ip(&self) -> Ipv4Addr {
        self.overlay_net.host(1).unwrap_or(self.overlay_net.addr)
    }
}

/// An IPv4 network `a.b.c.d/len` (the address is the network's first address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OverlayNet {
    /// First address.
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
}

/// Shortest prefix an overlay network may have (the frontend's dnsmasq serves it).
pub const MIN_OVERLAY_PREFIX: u8 = 16;
/// Longest prefix an overlay network may have (room for a frontend and some computes).
pub const MAX_OVERLAY_PREFIX: u8 = 27;

impl OverlayNet {
    /// Netmask as a 32-bit integer.
    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix.min(32)))
        }
    }

    /// Number of addresses.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// Whether `ip` lies in the network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix) == u32::from(self.addr)
    }

    /// Whether the two networks share an address.
    pub fn overlaps(&self, o: &OverlayNet) -> bool {
        self.contains(o.addr) || o.contains(self.addr)
    }

    /// Address number `i` of the network, `None` past the broadcast address less one.
    pub fn host(&self, i: u64) -> Option<Ipv4Addr> {
        (i >= 1 && i + 1 < self.size()).then(|| Ipv4Addr::from(u32::from(self.addr) + i as u32))
    }

    /// The `n`-th subnet of length `prefix` inside this network.
    pub fn subnet(&self, prefix: u8, n: u64) -> Option<OverlayNet> {
        if prefix < self.prefix || prefix > 32 {
            return None;
        }
        let step = 1u64 << (32 - u32::from(prefix));
        let off = n.checked_mul(step)?;
        (off < self.size()).then(|| OverlayNet {
            addr: Ipv4Addr::from(u32::from(self.addr) + off as u32),
            prefix,
        })
    }

    /// Most VMs (frontend included) a cluster on this network can hold: the frontend
    /// is address 1, computes 10 upward, the broadcast address stays free.
    pub fn max_vms(&self) -> usize {
        (self.size().saturating_sub(11) + 1) as usize
    }
}

impl fmt::Display for OverlayNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A string that is not a usable overlay network.
#[derive(Debug, thiserror::Error)]
#[error("overlay network {}: {}", crate::validate::quote(.0), .1)]
pub struct BadNet(pub String, pub &'static str);

impl FromStr for OverlayNet {
    type Err = BadNet;
    fn from_str(s: &str) -> Result<OverlayNet, BadNet> {
        let (a, p) = s
            .split_once('/')
            .ok_or(BadNet(s.into(), "want a.b.c.d/len"))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| BadNet(s.into(), "bad address"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| BadNet(s.into(), "bad prefix length"))?;
        if prefix > 32 {
            return Err(BadNet(s.into(), "prefix longer than 32"));
        }
        if u32::from(addr) & !Self::mask(prefix) != 0 {
            return Err(BadNet(
                s.into(),
                "host bits set (give the network's first address)",
            ));
        }
        Ok(OverlayNet { addr, prefix })
    }
}

impl TryFrom<String> for OverlayNet {
    type Error = BadNet;
    fn try_from(s: String) -> Result<OverlayNet, BadNet> {
        s.parse()
    }
}

impl From<OverlayNet> for String {
    fn from(n: OverlayNet) -> String {
        n.to_string()
    }
}

/// Overlay address of VM number `index` (0 = frontend) in the cluster network `net`:
/// the frontend is address 1, computes 10 upward.
pub fn vm_ip(net: &OverlayNet, index: usize) -> Option<Ipv4Addr> {
    if index == 0 {
        return net.host(1);
    }
    net.host(9u64.checked_add(index as u64)?)
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes of a hex string, `None` when it is not hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        assert_eq!(unhex(&hex(&[0, 1, 0xfe])).unwrap(), vec![0, 1, 0xfe]);
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
    }

    #[test]
    fn vm_ips() {
        let n: OverlayNet = "198.19.3.0/24".parse().unwrap();
        assert_eq!(vm_ip(&n, 0).unwrap().to_string(), "198.19.3.1");
        assert_eq!(vm_ip(&n, 1).unwrap().to_string(), "198.19.3.10");
        assert_eq!(vm_ip(&n, 245).unwrap().to_string(), "198.19.3.254");
        assert!(vm_ip(&n, 246).is_none());
        assert_eq!(n.max_vms(), 246);
    }

    #[test]
    fn overlay_nets() {
        let pool: OverlayNet = "198.19.0.0/16".parse().unwrap();
        let n: OverlayNet = "198.19.5.0/24".parse().unwrap();
        assert!(pool.overlaps(&n) && n.overlaps(&pool));
        assert!(pool.contains("198.19.200.1".parse().unwrap()));
        assert!(!pool.contains("198.18.1.2".parse().unwrap()));
        assert_eq!(pool.subnet(24, 5), Some(n));
        assert_eq!(pool.subnet(24, 256), None);
        assert_eq!(n.to_string().parse::<OverlayNet>().unwrap(), n);
        for bad in ["198.19.5.1/24", "198.19.5.0", "198.19.5.0/33", "x/24"] {
            assert!(bad.parse::<OverlayNet>().is_err(), "{bad}");
        }
    }
}
