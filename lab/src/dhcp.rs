//! A minimal DHCP client (DISCOVER, OFFER, REQUEST, ACK with the broadcast flag), enough to
//! check that a DHCP server's leases reach a VM across the overlay. It changes no address
//! and no system file: it only reports the lease.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::{Error, Lab, Proc, Result};

const MAGIC: [u8; 4] = [99, 130, 83, 99];
const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const ACK: u8 = 5;
const NAK: u8 = 6;

/// A lease obtained by [`obtain_lease`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The address leased.
    pub addr: Ipv4Addr,
    /// The server's identifier (its address).
    pub server: Ipv4Addr,
    /// Lease time in seconds, when given.
    pub lease_secs: Option<u32>,
    /// DISCOVERs the client sent (1 when the first offer was taken).
    pub discovers: u32,
    /// NAKs it got (an offered address that went to another client first).
    pub naks: u32,
}

/// Builds a client message (`DISCOVER` or `REQUEST`).
pub fn build(msg: u8, xid: u32, mac: [u8; 6], req: Option<(Ipv4Addr, Ipv4Addr)>) -> Vec<u8> {
    let mut p = vec![0u8; 236];
    p[0] = 1; // BOOTREQUEST
    p[1] = 1; // Ethernet
    p[2] = 6;
    p[4..8].copy_from_slice(&xid.to_be_bytes());
    p[10..12].copy_from_slice(&0x8000u16.to_be_bytes()); // broadcast replies
    p[28..34].copy_from_slice(&mac);
    p.extend_from_slice(&MAGIC);
    p.extend_from_slice(&[53, 1, msg]);
    if let Some((addr, server)) = req {
        p.extend_from_slice(&[50, 4]);
        p.extend_from_slice(&addr.octets());
        p.extend_from_slice(&[54, 4]);
        p.extend_from_slice(&server.octets());
    }
    p.extend_from_slice(&[55, 3, 1, 3, 51]);
    p.push(255);
    p.resize(300, 0);
    p
}

/// A server reply, parsed: (message type, your-address, server id, lease time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// DHCP message type (option 53).
    pub msg: u8,
    /// `yiaddr`.
    pub yiaddr: Ipv4Addr,
    /// Option 54.
    pub server: Option<Ipv4Addr>,
    /// Option 51.
    pub lease_secs: Option<u32>,
}

/// Parses a server reply for transaction `xid` and hardware address `mac`; None when it is
/// not one (wrong op, xid, address, magic or malformed options).
pub fn parse(p: &[u8], xid: u32, mac: [u8; 6]) -> Option<Reply> {
    if p.len() < 240 || p[0] != 2 || p[4..8] != xid.to_be_bytes() || p[28..34] != mac {
        return None;
    }
    if p[236..240] != MAGIC {
        return None;
    }
    let yiaddr = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let (mut msg, mut server, mut lease_secs) = (None, None, None);
    let mut i = 240;
    while i < p.len() {
        let code = p[i];
        if code == 255 {
            break;
        }
        if code == 0 {
            i += 1;
            continue;
        }
        let len = usize::from(*p.get(i + 1)?);
        let v = p.get(i + 2..i + 2 + len)?;
        match (code, len) {
            (53, 1) => msg = Some(v[0]),
            (54, 4) => server = Some(Ipv4Addr::new(v[0], v[1], v[2], v[3])),
            (51, 4) => lease_secs = Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]])),
            _ => {}
        }
        i += 2 + len;
    }
    Some(Reply {
        msg: msg?,
        yiaddr,
        server,
        lease_secs,
    })
}

fn parse_mac(mac: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = mac
        .split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    bytes.try_into().map_err(|_| Error::Parse {
        what: "MAC address".into(),
        detail: mac.into(),
    })
}

/// Writes a dnsmasq hosts file giving each `(MAC, address)` pair its own address, as a
/// cluster's frontend does for the nodes it knows, into the lab's directory; returns the
/// option that names it (for `extra` of [`Dnsmasq::start`]). Without it, dnsmasq with
/// `--no-ping` picks an address by hashing the client's MAC and walking to the next one
/// not leased, keeps no record of what it offered, and so offers the same address to
/// every client whose walk ends there: when many ask at once, all but the first are
/// refused it (NAK, "address in use") and start again.
pub fn hosts_file(lab: &Lab, hosts: &[(&str, Ipv4Addr)]) -> Result<String> {
    let path = lab.dir().join("dnsmasq.hosts");
    let mut s = String::new();
    for (mac, ip) in hosts {
        s.push_str(&format!("{mac},{ip}\n"));
    }
    std::fs::write(&path, s)?;
    Ok(format!("--dhcp-hostsfile={}", path.display()))
}

/// A dnsmasq DHCP server in a lab namespace, from [`Dnsmasq::start`].
pub struct Dnsmasq {
    /// The dnsmasq process (stop it with [`Lab::stop`]; teardown ends it too).
    pub proc: Proc,
    /// Its lease file.
    pub leases: PathBuf,
}

impl Dnsmasq {
    /// Starts dnsmasq as a DHCP server only (no DNS) on `eth0` of namespace `ns`, leasing
    /// `first` to `last` (netmask 255.255.0.0, 10 minutes), with `extra` options appended,
    /// and waits (at most 5 s) until it listens on port 67. One server per lab: its lease
    /// and pid files are `dnsmasq.leases` and `dnsmasq.pid` in the lab's directory.
    pub fn start(
        lab: &Lab,
        ns: &str,
        first: Ipv4Addr,
        last: Ipv4Addr,
        extra: &[&str],
    ) -> Result<Dnsmasq> {
        let leases = lab.dir().join("dnsmasq.leases");
        let pid = lab.dir().join("dnsmasq.pid");
        let range = format!("--dhcp-range={first},{last},255.255.0.0,10m");
        let leasefile = format!("--dhcp-leasefile={}", leases.display());
        let pidfile = format!("--pid-file={}", pid.display());
        let mut argv = vec![
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--port=0",
            "--user=root",
            "--interface=eth0",
            "--except-interface=lo",
            "--bind-interfaces",
            &range,
            &leasefile,
            &pidfile,
            "--log-facility=-",
        ];
        argv.extend_from_slice(extra);
        let proc = lab.spawn(ns, "dnsmasq", &argv)?;
        lab.wait_until("dnsmasq listening", Duration::from_secs(5), || {
            lab.exec(ns, &["ss", "-Hlun", "sport = :67"])
                .is_ok_and(|o| !o.stdout.trim().is_empty())
        })?;
        Ok(Dnsmasq { proc, leases })
    }
}

/// Obtains a lease on `ifname` (with hardware address `mac`) of the current network
/// namespace, retrying DISCOVER each second until `limit` passes. Run it inside a VM
/// namespace with [`crate::Lab::in_ns`].
pub fn obtain_lease(ifname: &str, mac: &str, limit: Duration) -> Result<Lease> {
    let mac = parse_mac(mac)?;
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68))?;
    sock.set_broadcast(true)?;
    crate::sys::bind_to_device(sock.as_raw_fd(), ifname)?;
    sock.set_read_timeout(Some(Duration::from_millis(300)))?;
    let xid: u32 = rand::random();
    let dst = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
    let start = Instant::now();
    let mut buf = [0u8; 1500];
    let mut offer: Option<Reply> = None;
    let mut last_sent: Option<Instant> = None;
    let (mut discovers, mut naks) = (0u32, 0u32);
    while start.elapsed() < limit {
        if last_sent.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            let msg = match offer {
                None => build(DISCOVER, xid, mac, None),
                Some(o) => build(
                    REQUEST,
                    xid,
                    mac,
                    Some((o.yiaddr, o.server.unwrap_or(Ipv4Addr::UNSPECIFIED))),
                ),
            };
            sock.send_to(&msg, dst)?;
            if offer.is_none() {
                discovers += 1;
            }
            last_sent = Some(Instant::now());
        }
        let n = match sock.recv_from(&mut buf) {
            Ok((n, _)) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e.into()),
        };
        let Some(r) = parse(&buf[..n], xid, mac) else {
            continue;
        };
        match (r.msg, offer) {
            (OFFER, None) if r.server.is_some() => {
                offer = Some(r);
                last_sent = None;
            }
            (ACK, Some(o)) => {
                return Ok(Lease {
                    addr: r.yiaddr,
                    server: r.server.or(o.server).unwrap_or(Ipv4Addr::UNSPECIFIED),
                    lease_secs: r.lease_secs,
                    discovers,
                    naks,
                })
            }
            (NAK, Some(_)) => {
                naks += 1;
                offer = None;
                last_sent = None;
            }
            _ => {}
        }
    }
    Err(Error::Timeout {
        what: format!("DHCP lease on {ifname}"),
        secs: limit.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_carries_address_and_server() {
        let mac = [2, 0, 0, 0, 0, 1];
        let p = build(
            REQUEST,
            7,
            mac,
            Some((
                Ipv4Addr::new(198, 19, 200, 10),
                Ipv4Addr::new(198, 19, 1, 11),
            )),
        );
        assert_eq!(p.len(), 300);
        assert_eq!(&p[236..240], &MAGIC);
        assert_eq!(&p[240..243], &[53, 1, REQUEST]);
        assert_eq!(&p[243..249], &[50, 4, 198, 19, 200, 10]);
    }

    #[test]
    fn parses_a_reply_and_rejects_others() {
        let mac = [2, 0, 0, 0, 0, 1];
        let mut p = build(OFFER, 9, mac, None);
        p[0] = 2;
        p[16..20].copy_from_slice(&[198, 19, 200, 12]);
        // options: type OFFER, server id, lease time, end
        p.truncate(240);
        p.extend_from_slice(&[53, 1, OFFER, 54, 4, 198, 19, 1, 11, 51, 4, 0, 0, 1, 44, 255]);
        let r = parse(&p, 9, mac).unwrap();
        assert_eq!(r.msg, OFFER);
        assert_eq!(r.yiaddr, Ipv4Addr::new(198, 19, 200, 12));
        assert_eq!(r.server, Some(Ipv4Addr::new(198, 19, 1, 11)));
        assert_eq!(r.lease_secs, Some(300));
        assert!(parse(&p, 10, mac).is_none());
        assert!(parse(&p, 9, [0; 6]).is_none());
        // an option running past the end
        let mut bad = p[..240].to_vec();
        bad.extend_from_slice(&[53, 9, 1]);
        assert!(parse(&bad, 9, mac).is_none());
        for n in 0..p.len() {
            let _ = parse(&p[..n], 9, mac);
        }
    }
}
