//! The DHCP storm of `bench broadcast`, on one site's segment without an overlay: every
//! client asks at the same moment, and with an address per client (the hosts file a
//! cluster's frontend keeps) each gets its own address from its first DISCOVER, without
//! a NAK. These are the counts `bench broadcast` reports per site: with one dynamic pool
//! and `--no-ping`, dnsmasq offers one address to several clients whose requests are in
//! flight at once and refuses all but the first, which across the WAN at 64 VMs per site
//! made 13 DISCOVERs per lease (docs/BENCH.md); on one fast segment too few are in
//! flight at once for that to show.

use std::net::Ipv4Addr;
use std::time::Duration;

use lab::{dhcp, Lab, Topology};

#[test]
fn dhcp_storm_with_an_address_per_client_takes_one_discover_and_no_nak_each() {
    let name = "dhcp_storm_with_an_address_per_client_takes_one_discover_and_no_nak_each";
    if !lab::is_root() {
        lab::skip(name, "needs root (network namespaces)");
        return;
    }
    let l = Lab::new("ld").unwrap();
    let mut t = Topology::new(&l).unwrap();
    t.add_site(&l, "a", false, 16).unwrap();
    let vms = &t.site("a").vms;
    let first = u32::from(Ipv4Addr::new(198, 19, 200, 10));
    let hosts: Vec<(&str, Ipv4Addr)> = vms
        .iter()
        .zip(first..)
        .map(|(v, a)| (v.mac.as_str(), Ipv4Addr::from(a)))
        .collect();
    let opt = dhcp::hosts_file(&l, &hosts).unwrap();
    let server = dhcp::Dnsmasq::start(
        &l,
        &vms[0].ns,
        Ipv4Addr::new(198, 19, 200, 10),
        Ipv4Addr::new(198, 19, 200, 250),
        &["--no-ping", &opt],
    )
    .unwrap();
    let leases: Vec<_> = std::thread::scope(|sc| {
        let hs: Vec<_> = vms[1..]
            .iter()
            .map(|v| {
                let l = &l;
                sc.spawn(move || {
                    l.in_ns(&v.ns, || {
                        dhcp::obtain_lease("eth0", &v.mac, Duration::from_secs(20))
                    })
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((v, want), r) in vms.iter().zip(&hosts).skip(1).zip(leases) {
        let lease = r
            .unwrap()
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", v.ns, l.log(&server.proc)));
        assert_eq!(lease.addr, want.1, "{}: {lease:?}", v.ns);
        assert_eq!((lease.discovers, lease.naks), (1, 0), "{}: {lease:?}", v.ns);
    }
}
