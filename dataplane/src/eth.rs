//! Checked view of an Ethernet frame: only the fields the edge switches on.

/// Ethernet header length.
pub const ETH_HDR_LEN: usize = 14;

pub use mac::Mac;

/// Destination and source MAC of a frame, or `None` when it is shorter than a header.
pub fn macs(frame: &[u8]) -> Option<(Mac, Mac)> {
    if frame.len() < ETH_HDR_LEN {
        return None;
    }
    let mut d = [0u8; 6];
    let mut s = [0u8; 6];
    d.copy_from_slice(&frame[0..6]);
    s.copy_from_slice(&frame[6..12]);
    Some((Mac(d), Mac(s)))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parses() {
        let mut f = [0u8; 14];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        let (d, s) = macs(&f).unwrap();
        assert!(d.is_group());
        assert!(!s.is_group());
        assert_eq!(s.to_string(), "02:00:00:00:00:01");
        assert!(macs(&f[..13]).is_none());
    }
}
