//! The supernode's XDP program on its underlay interface (`mvc supernode
//! --xdp-relay IFACE`): relays sealed Data datagrams between validated edges
//! without a trip through userspace, and drops datagrams for the supernode's
//! port that fail the cheap checks before they reach the socket.
//!
//! The program (`mvc_relay` in `dataplane-ebpf`) reads a hash map of validated
//! edges, community id ‖ edge id -> IPv4 address ‖ port, which [`XdpRelay::sync`]
//! keeps equal to the supernode core's registrations (IPv4 ones; an edge
//! registered over IPv6 is relayed by userspace). A Relay whose source edge is
//! in the map but whose datagram comes from another address is dropped, as the
//! userspace relay does (`relay_src_mismatch`): only the address that answered
//! the supernode's cookie can make it send anything. Relays and broadcasts from
//! such unvalidated sources (an edge the supernode does not hold after a
//! restart, an edge behind a new NAT mapping) still reach userspace within the
//! limits of its register prompts (one per source address per 100 ms, a budget
//! per 100 ms per CPU), so that the sender is prompted to register at once;
//! past them they are dropped in the kernel. Next-hop MACs come from
//! the kernel's FIB and neighbour table (`bpf_fib_lookup`); without a
//! neighbour entry, or when the route leaves through another interface, the
//! datagram goes to userspace, whose send resolves the neighbour for the next
//! one.
//!
//! The same checks and relay also run as a TC classifier on the interface's
//! ingress ([`HookMode::Tc`], program `mvc_relay_tc`, same maps): it sees
//! the socket buffer, so UDP GSO batches are relayed whole with their
//! checksums updated by the kernel's helpers. Auto takes it on veth, where
//! native XDP makes the peer segment every batch and generic XDP hands
//! batches to userspace.
//!
//! Cleanup is the kernel's in both hooks: the program hangs off a bpf_link
//! (XDP link, or tcx link for TC) owned by the process and is detached when
//! the [`XdpRelay`] is dropped or the process dies, kill -9 included; no
//! clsact qdisc or netlink filter is made that could be left behind. A start
//! on an interface whose ingress already holds `mvc_relay_tc` (another
//! supernode still running there) is refused rather than attached twice.
//! See docs/XDP.md ("Supernode relay in XDP").

use std::collections::HashMap as StdHashMap;
use std::net::{IpAddr, SocketAddr};

use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    Ebpf,
};
use dataplane_ebpf_common::{
    relay_config, relay_dest, relay_key, RelayCounter, RELAY_CONFIG_MAP, RELAY_DEST_LEN,
    RELAY_EDGES_MAP, RELAY_FLAG_COMPLETE, RELAY_KEY_LEN, RELAY_MAX_EDGES, RELAY_PROGRAM_NAME,
    RELAY_STATS_MAP, RELAY_TC_PROGRAM_NAME,
};

use super::{attach_hook, availability, tc_programs, Error, Hook, HookMode, HookPrograms, PROGRAM};
use crate::wire::{CommunityId, EdgeId};

type Key = [u8; RELAY_KEY_LEN];
type Dest = [u8; RELAY_DEST_LEN];

/// Kernel ids of the `mvc_relay_tc` programs attached to the tc ingress of
/// `iface` (tcx links), in the current network namespace.
pub fn relay_tc_programs(iface: &str) -> Result<Vec<u32>, Error> {
    tc_programs(iface, RELAY_TC_PROGRAM_NAME)
}

/// The attached relay program and the maps userspace keeps.
pub struct XdpRelay {
    // Field order: the maps and the program go with `ebpf`; the link is
    // owned by the program inside it.
    edges: HashMap<MapData, Key, Dest>,
    config: Array<MapData, [u8; 8]>,
    stats: PerCpuArray<MapData, u64>,
    /// Owns the program and, through it, the bpf_link that keeps it attached.
    _ebpf: Ebpf,
    iface: String,
    hook: Hook,
    prog_id: u32,
    listen: ([u8; 4], u16),
    installed: StdHashMap<Key, Dest>,
    complete: bool,
    sync_errors: u64,
}

impl std::fmt::Debug for XdpRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpRelay")
            .field("iface", &self.iface)
            .field("hook", &self.hook)
            .field("prog_id", &self.prog_id)
            .field("edges", &self.installed.len())
            .finish_non_exhaustive()
    }
}

fn map_err(what: &str) -> impl Fn(MapError) -> Error + '_ {
    move |e| Error::Load(format!("{what}: {e}"))
}

impl XdpRelay {
    /// Loads the relay program and attaches it to `iface` for a supernode
    /// listening on `listen` (IPv4; 0.0.0.0 for any address), in the hook
    /// `mode` asks for ([`super::HOOK_AUTO_RULE`] for `Auto`).
    pub fn attach(iface: &str, listen: SocketAddr, mode: HookMode) -> Result<Self, Error> {
        availability()?;
        let object = PROGRAM.ok_or_else(|| Error::NotBuilt(String::new()))?;
        let IpAddr::V4(ip) = listen.ip() else {
            return Err(Error::Load(
                "the XDP relay handles IPv4 only; the supernode listens on IPv6".into(),
            ));
        };
        let mut ebpf = Ebpf::load(object).map_err(|e| Error::Load(e.to_string()))?;
        let (hook, prog_id) = attach_hook(
            &mut ebpf,
            iface,
            mode,
            HookPrograms {
                xdp: RELAY_PROGRAM_NAME,
                tc: RELAY_TC_PROGRAM_NAME,
                what: "XDP relay",
            },
        )?;
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| Error::Load(format!("no map {name}")))
        };
        let edges: HashMap<MapData, Key, Dest> =
            HashMap::try_from(take(&mut ebpf, RELAY_EDGES_MAP)?).map_err(map_err("edges map"))?;
        let config: Array<MapData, [u8; 8]> =
            Array::try_from(take(&mut ebpf, RELAY_CONFIG_MAP)?).map_err(map_err("config map"))?;
        let stats: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(take(&mut ebpf, RELAY_STATS_MAP)?)
                .map_err(map_err("stats map"))?;
        let mut r = Self {
            edges,
            config,
            stats,
            _ebpf: ebpf,
            iface: iface.to_owned(),
            hook,
            prog_id,
            listen: (ip.octets(), listen.port()),
            installed: StdHashMap::new(),
            complete: true,
            sync_errors: 0,
        };
        r.write_config()?;
        Ok(r)
    }

    fn write_config(&mut self) -> Result<(), Error> {
        let flags = if self.complete {
            RELAY_FLAG_COMPLETE
        } else {
            0
        };
        let (ip, port) = self.listen;
        self.config
            .set(0, relay_config(ip, port, flags), 0)
            .map_err(map_err("config map"))
    }

    /// Makes the map hold exactly `edges` (community, id, observed address);
    /// IPv6 ones are left out. An edge the map has no room for is relayed by
    /// userspace, and the program then passes unknown source edges to
    /// userspace instead of dropping them.
    pub fn sync<'a>(
        &mut self,
        edges: impl Iterator<Item = (&'a CommunityId, &'a EdgeId, SocketAddr)>,
    ) {
        let mut want: StdHashMap<Key, Dest> = StdHashMap::new();
        for (c, id, addr) in edges {
            if let SocketAddr::V4(a) = addr {
                want.insert(relay_key(c, id), relay_dest(a.ip().octets(), a.port()));
            }
        }
        let gone: Vec<Key> = self
            .installed
            .keys()
            .filter(|k| !want.contains_key(*k))
            .copied()
            .collect();
        for k in gone {
            // Already gone is fine; anything else leaves a stale entry that
            // only relays to an address that registered before.
            if self.edges.remove(&k).is_err() {
                self.sync_errors += 1;
            }
            self.installed.remove(&k);
        }
        let mut complete = true;
        for (k, v) in want {
            if self.installed.get(&k) == Some(&v) {
                continue;
            }
            if self.installed.len() >= RELAY_MAX_EDGES as usize && !self.installed.contains_key(&k)
            {
                complete = false;
                continue;
            }
            match self.edges.insert(k, v, 0) {
                Ok(()) => {
                    self.installed.insert(k, v);
                }
                Err(_) => {
                    self.sync_errors += 1;
                    complete = false;
                }
            }
        }
        if complete != self.complete {
            self.complete = complete;
            if !complete {
                tracing::warn!(
                    iface = %self.iface,
                    "XDP relay map is full: further edges are relayed by userspace"
                );
            }
            if self.write_config().is_err() {
                self.sync_errors += 1;
            }
        }
    }

    /// Edges in the map.
    pub fn edges(&self) -> usize {
        self.installed.len()
    }

    /// Interface the program runs on.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// The hook it runs in.
    pub fn hook(&self) -> Hook {
        self.hook
    }

    /// Kernel id of the program (`bpftool prog show id N`).
    pub fn prog_id(&self) -> u32 {
        self.prog_id
    }

    /// The program's counters (summed over CPUs), by [`RelayCounter::name`],
    /// and the map updates that failed.
    pub fn counters(&self) -> (Vec<(&'static str, u64)>, u64) {
        let v = RelayCounter::ALL
            .iter()
            .map(|c| {
                let n = self
                    .stats
                    .get(&(*c as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (c.name(), n)
            })
            .collect();
        (v, self.sync_errors)
    }
}

#[cfg(test)]
mod tests {
    use dataplane_ebpf_common::{
        wire as w, RelayCounter, RELAY_PROMPTS_PER_SLOT, RELAY_PROMPT_SLOT_NS,
    };

    use crate::supernode::SupernodeConfig;
    use crate::wire::{self, MsgType, Register};

    /// Counters are dropped or passed as their names say (the programs' verdicts
    /// follow `is_drop`).
    #[test]
    fn relay_counters_drop_only_the_drops() {
        for (i, c) in RelayCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            let passes = matches!(
                c,
                RelayCounter::Relayed
                    | RelayCounter::RelayedBytes
                    | RelayCounter::Passed
                    | RelayCounter::PassedNoRoute
                    | RelayCounter::PassedUnknownSource
                    | RelayCounter::PassedMixedBatch
            );
            assert_eq!(c.is_drop(), !passes, "{}", c.name());
        }
    }

    /// The program's view of the wire format is the codec's.
    #[test]
    fn program_wire_constants_match_the_codec() {
        assert_eq!(w::VERSION, wire::VERSION);
        assert_eq!(w::TYPE_REGISTER, MsgType::Register as u8);
        assert_eq!(w::TYPE_RELAY, MsgType::Relay as u8);
        assert_eq!(w::TYPE_BCAST, MsgType::Bcast as u8);
        assert_eq!(w::TYPE_DATA, MsgType::Data as u8);
        assert_eq!(w::RELAY_HDR_LEN, wire::RELAY_HDR_LEN);
        assert_eq!(w::BCAST_MIN_LEN, wire::BCAST_FIXED_LEN);
        assert_eq!(w::TRANSPORT_HDR_LEN, wire::TRANSPORT_HDR_LEN);
        let shortest = Register {
            cookie: [0; wire::COOKIE_LEN],
            community: [1; 16],
            edge_key: [2; 32],
            seq: 1,
            known: 0,
            name: String::new(),
            local_addrs: Vec::new(),
        };
        let mut buf = [0u8; 512];
        let n = shortest.encode_unsigned(&mut buf).unwrap() + wire::SIG_LEN;
        assert_eq!(w::REGISTER_MIN_LEN, n);
        // The relay header's fields lie where the program reads them.
        let h = wire::RelayHdr {
            community: [3; 16],
            src: [4; 8],
            dst: [5; 8],
        };
        h.write(&mut buf).unwrap();
        assert_eq!(&buf[w::COMMUNITY_AT..w::COMMUNITY_AT + 16], &[3; 16]);
        assert_eq!(&buf[w::SRC_AT..w::SRC_AT + 8], &[4; 8]);
        assert_eq!(&buf[w::DST_AT..w::DST_AT + 8], &[5; 8]);
        // Every Relay and Bcast the program passes on from an unvalidated source
        // is long enough for the supernode to answer with a prompt, and the
        // program's limits on them are the prompts' own.
        assert!(wire::COOKIE_MSG_LEN <= w::RELAY_MIN_LEN.min(w::BCAST_MIN_LEN));
        assert_eq!(
            RELAY_PROMPTS_PER_SLOT,
            u64::from(SupernodeConfig::default().prompts_per_s.div_ceil(10))
        );
        assert_eq!(RELAY_PROMPT_SLOT_NS, 100_000_000);
        // A relay of RELAY_MIN_LEN bytes decodes; one byte less does not.
        assert!(wire::RelayHdr::decode(&buf[..w::RELAY_MIN_LEN]).is_ok());
        assert!(wire::RelayHdr::decode(&buf[..w::RELAY_MIN_LEN - 1]).is_err());
    }
}
