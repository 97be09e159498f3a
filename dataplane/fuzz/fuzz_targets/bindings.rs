#![no_main]
//! Control messages (Bindings, Bindings6, Groups): decode, and re-encode what decodes to
//! the same bytes; the same bytes as a frame: ARP, neighbour discovery (and the replies
//! written for what parses), IGMP/MLD reports and DHCP acknowledgements.
use dataplane::eth::Mac;
use dataplane::l2::{
    dhcp_way, parse_arp, parse_dhcp_ack, parse_nd, parse_reports, write_arp_reply, write_na,
    Control, DhcpWay, ARP_FRAME_LEN, NA_FRAME_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Control::decode(data) {
        let mut buf = vec![0u8; data.len()];
        let n = m.encode(&mut buf).expect("re-encodes");
        assert_eq!(&buf[..n], data);
    }
    let owner = Mac([2, 0, 0, 0, 0, 1]);
    if let Some(a) = parse_arp(data) {
        let mut buf = [0u8; ARP_FRAME_LEN];
        let n = write_arp_reply(&a, owner, &mut buf).expect("fits");
        let r = parse_arp(&buf[..n]).expect("the reply parses");
        assert_eq!((r.spa, r.tpa), (a.tpa, a.spa));
    }
    if let Some(nd) = parse_nd(data) {
        let mut buf = [0u8; NA_FRAME_LEN];
        let n = write_na(&nd, Mac([2, 0, 0, 0, 0, 2]), owner, &mut buf).expect("fits");
        let r = parse_nd(&buf[..n]).expect("the advertisement parses");
        assert_eq!((r.target, r.lladdr), (nd.target, Some(owner)));
    }
    let mut n = 0;
    parse_reports(data, 64, |r| {
        assert!(r.group.is_group());
        n += 1;
    });
    assert!(n <= 64);
    if let Some(a) = parse_dhcp_ack(data) {
        assert!(!a.client.is_group());
        assert_eq!(dhcp_way(data), Some(DhcpWay::FromServer(a.client)));
    }
});
