//! The 48-bit Ethernet address, one type for the overlay and the controller.
//!
//! `dataplane` learns and switches on it (`eth::Mac`: group bit, table keys); `control`
//! allocates it (`02:<controller id>:<counter>`), stores it as an integer and sends it
//! to agents as `aa:bb:cc:dd:ee:ff`. It is a crate of its own so that both can use it
//! without `control` linking the overlay engine.
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A 48-bit Ethernet address. Displayed (and debug-printed, and serialised) as
/// `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The MAC of allocation `counter` under controller prefix `controller_id`:
    /// `02:<id>:<counter as 32 bits>`. The `02` first octet marks it locally
    /// administered and unicast, so it never collides with a vendor-assigned address.
    pub fn from_counter(controller_id: u8, counter: u32) -> Mac {
        let c = counter.to_be_bytes();
        Mac([0x02, controller_id, c[0], c[1], c[2], c[3]])
    }

    /// The 48 bits as an integer.
    pub fn as_u64(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    }

    /// Inverse of [`Mac::as_u64`]; the top 16 bits are ignored.
    pub fn from_u64(v: u64) -> Mac {
        let b = v.to_be_bytes();
        Mac([b[2], b[3], b[4], b[5], b[6], b[7]])
    }

    /// Broadcast or multicast (group bit set).
    pub fn is_group(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// Locally administered unicast (bit 1 set, bit 0 clear in the first octet).
    pub fn is_local_unicast(&self) -> bool {
        self.0[0] & 0x03 == 0x02
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Digits into a buffer and one write: listings print 100,000 of these.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b':'; 17];
        for (i, b) in self.0.iter().enumerate() {
            out[3 * i] = HEX[usize::from(b >> 4)];
            out[3 * i + 1] = HEX[usize::from(b & 0x0f)];
        }
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

/// As text (`aa:bb:cc:dd:ee:ff`), written straight into the output.
impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A string that is not `aa:bb:cc:dd:ee:ff` (shown quoted, control characters escaped,
/// at most 80 characters).
#[derive(Debug, thiserror::Error)]
#[error("not a MAC address (want aa:bb:cc:dd:ee:ff): '{}'", shown(.0))]
pub struct BadMac(pub String);

fn shown(s: &str) -> String {
    s.chars().flat_map(char::escape_default).take(80).collect()
}

impl FromStr for Mac {
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Mac, BadMac> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(|| BadMac(s.into()))?;
            if p.len() != 2 {
                return Err(BadMac(s.into()));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| BadMac(s.into()))?;
        }
        if parts.next().is_some() {
            return Err(BadMac(s.into()));
        }
        Ok(Mac(out))
    }
}

impl TryFrom<String> for Mac {
    type Error = BadMac;
    fn try_from(s: String) -> Result<Mac, BadMac> {
        s.parse()
    }
}

impl From<Mac> for String {
    fn from(m: Mac) -> String {
        m.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let m = Mac::from_counter(0x5a, 0x0102_0304);
        assert_eq!(m.to_string(), "02:5a:01:02:03:04");
        assert_eq!(format!("{m:?}"), "02:5a:01:02:03:04");
        assert_eq!(m.to_string().parse::<Mac>().unwrap(), m);
        assert_eq!(Mac::from_u64(m.as_u64()), m);
        assert!(m.is_local_unicast());
        assert!(!m.is_group());
        assert!(Mac([0xff; 6]).is_group());
        assert_eq!(
            Mac([0xff, 0xa0, 0x0b, 0x9c, 0x10, 0]).to_string(),
            "ff:a0:0b:9c:10:00"
        );
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, "\"02:5a:01:02:03:04\"");
        assert_eq!(serde_json::from_str::<Mac>(&j).unwrap(), m);
    }

    #[test]
    fn refuses_what_is_not_six_hex_octets() {
        for bad in [
            "02:5a:01:02:03",
            "02:5a:01:02:03:04:05",
            "zz:5a:01:02:03:04",
            "2:5a:01:02:03:04",
            "",
            "02:5a:01:02:03:0\u{e9}",
        ] {
            let e = bad.parse::<Mac>().unwrap_err().to_string();
            assert!(e.starts_with("not a MAC address"), "{bad}: {e}");
        }
        assert!(serde_json::from_str::<Mac>("\"nope\"").is_err());
    }
}
