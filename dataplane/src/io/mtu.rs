//! The sizes an edge derives from its MTUs: the overlay MTU (frames of the VMs) and the
//! underlay MTU (datagrams between edges). Every event loop takes them from here.

use crate::edge::HEADROOM;
use crate::wire::{TAG_LEN, TRANSPORT_HDR_LEN};

/// IPv4 and UDP headers in front of each datagram on the underlay.
pub const UDP_IPV4_OVERHEAD: usize = 20 + 8;
/// Ethernet header with one VLAN tag, in front of an overlay MTU's worth of payload.
const ETH_VLAN_HDR: usize = 14 + 4;
/// Room in a packet buffer beyond the frame: relay and transport headers, the AEAD tag,
/// a broadcast's destination list.
const BUF_SLACK: usize = 1024;

/// Size of the pooled packet buffers for an overlay of `mtu` bytes.
pub fn packet_buf_size(mtu: u32) -> usize {
    mtu as usize + ETH_VLAN_HDR + BUF_SLACK
}

/// Largest UDP payload on the underlay: one datagram, or one segment of a GSO send.
pub fn udp_payload(underlay_mtu: usize) -> usize {
    underlay_mtu.saturating_sub(UDP_IPV4_OVERHEAD)
}

/// Largest frame a TSO super-frame from the VMs is cut into, so that each segment fits
/// one datagram once sealed (transport header and AEAD tag) and with a relay header.
pub fn max_segment_frame(underlay_mtu: usize) -> usize {
    udp_payload(underlay_mtu).saturating_sub(HEADROOM + TRANSPORT_HDR_LEN + TAG_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_for_common_mtus() {
        assert_eq!(packet_buf_size(1500), 2542);
        assert_eq!(udp_payload(1500), 1472);
        // 1472 - 36 (relay header) - 16 - 16.
        assert_eq!(max_segment_frame(1500), 1404);
        // A sealed, relayed segment of the largest size fills the datagram exactly.
        let sealed = max_segment_frame(9000) + HEADROOM + TRANSPORT_HDR_LEN + TAG_LEN;
        assert_eq!(sealed, udp_payload(9000));
        assert_eq!(udp_payload(20), 0);
        assert_eq!(max_segment_frame(60), 0);
    }
}
