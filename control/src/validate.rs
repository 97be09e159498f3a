//! Checks of what a user types, made where it enters (the command line, and the
//! controller's operations for callers that skip the command line), so that a bad value
//! is refused with one clear line before any agent is asked or anything is recorded.
//!
//! The rules (docs/CONTROLLER.md, "Names and counts"):
//!
//! - cluster and site names: 1 to [`NAME_MAX`] ASCII letters, digits and `-`, not
//!   starting with `-` ([`crate::proto::safe_name`], the rule the agents apply too).
//!   They become parts of VM names, host names given by DHCP, namespace and file names.
//! - VM names (`<cluster>-fe`, `<cluster>-c<N>`): the same characters, at most
//!   [`VM_NAME_MAX`].
//! - host names (`mvc agent run --host NAME:...`, `mvc agent authorize --hosts`): 1 to
//!   [`HOST_NAME_MAX`] ASCII letters, digits, `-`, `.` and `_`, not starting with `-`
//!   or `.`.
//! - counts (`--computes A:B:C`): one count per site, each at most
//!   [`crate::proto::MAX_ITEMS`], at least one compute in all.
//! - memory sizes: 1 MiB to [`crate::proto::MAX_VM_MEMORY_MB`].
use crate::agent::HostSpec;
use crate::controller::CreateArgs;
use crate::proto::{safe_name, MAX_ITEMS, MAX_VM_MEMORY_MB};

/// Longest cluster or site name.
pub const NAME_MAX: usize = 24;
/// Longest VM name.
pub const VM_NAME_MAX: usize = 40;
/// Longest host name.
pub const HOST_NAME_MAX: usize = 63;
/// Most vCPUs one host may announce.
pub const MAX_HOST_VCPUS: u32 = 4096;

/// A value a user typed that cannot be used; the message says why and what is wanted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// Result of the checks.
pub type Result<T> = std::result::Result<T, Invalid>;

/// `s` quoted for a message (`'s'`), with quotes, backslashes and control characters
/// escaped and at most 80 characters shown: for echoing values that failed a check.
pub fn quote(s: &str) -> String {
    let shown: String = s.chars().flat_map(char::escape_default).take(80).collect();
    format!("'{shown}'")
}

fn check_name(what: &str, s: &str, max: usize) -> Result<String> {
    if safe_name(s, max) {
        Ok(s.to_string())
    } else {
        Err(Invalid(format!(
            "{what} name {}: use 1 to {max} letters, digits and '-', not starting with '-'",
            quote(s)
        )))
    }
}

/// A cluster name.
pub fn cluster_name(s: &str) -> Result<String> {
    check_name("cluster", s, NAME_MAX)
}

/// A site name.
pub fn site_name(s: &str) -> Result<String> {
    check_name("site", s, NAME_MAX)
}

/// A VM name.
pub fn vm_name(s: &str) -> Result<String> {
    check_name("VM", s, VM_NAME_MAX)
}

/// Whether `s` is a usable host name.
pub fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= HOST_NAME_MAX
        && !s.starts_with(['-', '.'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// A host name.
pub fn host_name(s: &str) -> Result<String> {
    if is_host_name(s) {
        Ok(s.to_string())
    } else {
        Err(Invalid(format!(
            "host name {}: use 1 to {HOST_NAME_MAX} letters, digits, '-', '.' and '_', \
             not starting with '-' or '.'",
            quote(s)
        )))
    }
}

fn number<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
    what: &str,
    s: &str,
    min: T,
    max: T,
) -> Result<T> {
    match s.trim().parse::<T>() {
        Ok(v) if v >= min && v <= max => Ok(v),
        _ => Err(Invalid(format!(
            "{what} {}: want a whole number from {min} to {max}",
            quote(s)
        ))),
    }
}

/// `NAME:VCPUS:MEMORY_MB:MAX_VMS` of `mvc agent run --host`.
pub fn host_spec(s: &str) -> Result<HostSpec> {
    let p: Vec<&str> = s.split(':').collect();
    let [name, vcpus, mem, max] = p[..] else {
        return Err(Invalid(format!(
            "host {}: want NAME:VCPUS:MEMORY_MB:MAX_VMS, e.g. node1:16:65536:8",
            quote(s)
        )));
    };
    Ok(HostSpec {
        name: host_name(name)?,
        vcpus: number("vCPUs of host", vcpus, 1, MAX_HOST_VCPUS)?,
        memory_mb: number("memory (MiB) of host", mem, 1, MAX_VM_MEMORY_MB * 64)?,
        max_vms: number("VM count of host", max, 1, MAX_ITEMS as u32)?,
    })
}

/// The `,`-separated host list of `mvc agent authorize --hosts`, or `*`.
pub fn host_list(s: &str) -> Result<Vec<String>> {
    let v: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| {
            if h == "*" {
                Ok(h.to_string())
            } else {
                host_name(h)
            }
        })
        .collect::<Result<_>>()?;
    if v.is_empty() {
        return Err(Invalid(format!(
            "hosts {}: want host names separated by ',', or '*'",
            quote(s)
        )));
    }
    Ok(v)
}

/// The `:`-separated site list of `mvc cluster create --sites`.
pub fn site_list(s: &str) -> Result<Vec<String>> {
    let v: Vec<String> = s.split(':').map(site_name).collect::<Result<_>>()?;
    let mut uniq = v.clone();
    uniq.sort();
    uniq.dedup();
    if uniq.len() != v.len() {
        return Err(Invalid(format!(
            "sites {}: a site is named twice",
            quote(s)
        )));
    }
    Ok(v)
}

/// The `:`-separated counts of `--computes`, one per site.
pub fn counts(s: &str) -> Result<Vec<u32>> {
    s.split(':')
        .map(|x| number("compute count", x, 0, MAX_ITEMS as u32))
        .collect()
}

/// A memory size in MiB of one VM.
pub fn memory_mb(s: &str) -> Result<u64> {
    number("memory (MiB)", s, 1, MAX_VM_MEMORY_MB)
}

/// A whole number of seconds to wait, 1 s to a day.
pub fn seconds(s: &str) -> Result<u64> {
    number("seconds", s, 1, 86_400)
}

/// MPI slots per node.
pub fn slots(s: &str) -> Result<u32> {
    number("slots", s, 1, 1024)
}

/// An agent address `HOST:PORT` (the host may be a name).
pub fn agent_addr(s: &str) -> Result<String> {
    let bad = || {
        Invalid(format!(
            "agent address {}: want IP:PORT or HOST:PORT, e.g. 198.18.1.2:7000",
            quote(s)
        ))
    };
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(s.to_string());
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    if !is_host_name(host) || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(s.to_string())
}

/// A local address to listen on, `IP:PORT`.
pub fn listen_addr(s: &str) -> Result<String> {
    s.parse::<std::net::SocketAddr>()
        .map(|_| s.to_string())
        .map_err(|_| {
            Invalid(format!(
                "listen address {}: want IP:PORT, e.g. 0.0.0.0:7000",
                quote(s)
            ))
        })
}

/// A public key as `mvc key show` and `mvc agent init` print it (64 hex digits).
pub fn public_key(s: &str) -> Result<String> {
    let t = s.trim();
    crate::auth::parse_public(t)
        .map(|_| t.to_string())
        .map_err(|_| {
            Invalid(format!(
                "key {}: want the 64 hex digits that `mvc key show` or `mvc agent init` print",
                quote(s)
            ))
        })
}

/// The namespace-name prefix of netns VMs (`mvc agent run --ns-prefix`).
pub fn ns_prefix(s: &str) -> Result<String> {
    if safe_name(s, 16) {
        Ok(s.to_string())
    } else {
        Err(Invalid(format!(
            "namespace prefix {}: use 1 to 16 letters, digits and '-', not starting with '-'",
            quote(s)
        )))
    }
}

/// Everything of a cluster request that can be judged without asking a site.
pub fn create_args(a: &CreateArgs) -> Result<()> {
    cluster_request(
        &a.name,
        &a.sites,
        &a.computes,
        a.memory_mb,
        a.frontend_memory_mb,
    )
}

/// [`create_args`], field by field.
pub fn cluster_request(
    name: &str,
    sites: &[String],
    computes: &[u32],
    memory_mb: u64,
    frontend_memory_mb: u64,
) -> Result<()> {
    cluster_name(name)?;
    if sites.is_empty() || sites.len() != computes.len() {
        return Err(Invalid(format!(
            "--sites names {} site(s) but --computes gives {} count(s)",
            sites.len(),
            computes.len()
        )));
    }
    site_list(&sites.join(":"))?;
    let total: u64 = computes.iter().map(|&c| u64::from(c)).sum();
    if total == 0 {
        return Err(Invalid(
            "--computes: a cluster needs at least one compute".into(),
        ));
    }
    if total + 1 > MAX_ITEMS as u64 {
        return Err(Invalid(format!(
            "--computes: {total} computes and a frontend exceed {MAX_ITEMS} VMs"
        )));
    }
    for (what, m) in [
        ("--memory", memory_mb),
        ("--frontend-memory", frontend_memory_mb),
    ] {
        if m == 0 || m > MAX_VM_MEMORY_MB {
            return Err(Invalid(format!(
                "{what} {m}: want 1 to {MAX_VM_MEMORY_MB} MiB"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_charset() {
        assert!(cluster_name("vc1").is_ok());
        assert!(cluster_name("a-b-3").is_ok());
        for bad in ["", "-x", "a b", "a_b", "é", "x/y", &"a".repeat(25)] {
            let e = cluster_name(bad).unwrap_err().0;
            assert!(e.starts_with("cluster name '"), "{e}");
            assert!(!e.contains('\n'));
        }
        assert!(site_name("A").is_ok());
        assert!(vm_name(&"v".repeat(40)).is_ok());
        assert!(vm_name(&"v".repeat(41)).is_err());
    }

    #[test]
    fn host_specs_are_checked_field_by_field() {
        let h = host_spec("node1.example:16:65536:8").unwrap();
        assert_eq!(
            (h.name.as_str(), h.vcpus, h.memory_mb, h.max_vms),
            ("node1.example", 16, 65536, 8)
        );
        let e = host_spec("bad host!:2:1024:2").unwrap_err().0;
        assert_eq!(
            e,
            "host name 'bad host!': use 1 to 63 letters, digits, '-', '.' and '_', not starting with '-' or '.'"
        );
        for bad in [
            "h:0:1024:2",
            "h:2:0:2",
            "h:2:1024:0",
            "h:2:1024",
            "h:x:1:1",
            ".h:1:1:1",
        ] {
            assert!(host_spec(bad).is_err(), "{bad}");
        }
        // Control characters are shown escaped, on one line.
        let e = host_spec("a\nb:1:1:1").unwrap_err().0;
        assert!(e.contains("'a\\nb'"), "{e}");
    }

    #[test]
    fn counts_and_create_args() {
        assert_eq!(counts("3:2:2").unwrap(), vec![3, 2, 2]);
        assert!(counts("3:-1:2").is_err());
        assert!(counts("3::2").is_err());
        assert!(counts("99999999999").is_err());
        let mut sites: Vec<String> = vec!["A".into(), "B".into(), "C".into()];
        let check = |sites: &[String], computes: &[u32], mem: u64| {
            cluster_request("vc1", sites, computes, mem, 1024)
        };
        let e = check(&sites, &[0, 0, 0], 512).unwrap_err().0;
        assert!(e.contains("at least one compute"), "{e}");
        assert!(check(&sites, &[1, 0, 0], 512).is_ok());
        assert!(check(&sites, &[256, 0, 0], 512).is_err());
        assert!(check(&sites, &[1, 0], 512).is_err());
        assert!(check(&sites, &[1, 1, 1], 0).is_err());
        assert!(cluster_request("-x", &sites, &[1, 1, 1], 512, 512).is_err());
        sites[2] = "A".into();
        let e = check(&sites, &[1, 1, 1], 512).unwrap_err().0;
        assert!(e.contains("named twice"), "{e}");
    }

    #[test]
    fn addresses_and_keys() {
        assert!(agent_addr("198.18.1.2:7000").is_ok());
        assert!(agent_addr("frontend.site-b:7000").is_ok());
        assert!(agent_addr("198.18.1.2").is_err());
        assert!(agent_addr("host:0").is_err());
        assert!(agent_addr("bad host:7000").is_err());
        assert!(listen_addr("0.0.0.0:7000").is_ok());
        assert!(listen_addr("localhost:7000").is_err());
        assert!(public_key(&"ab".repeat(32)).is_ok());
        assert!(public_key("abc").is_err());
        assert_eq!(host_list("*").unwrap(), vec!["*"]);
        assert_eq!(host_list("a, b").unwrap(), vec!["a", "b"]);
        assert!(host_list("a,b c").is_err());
        assert!(host_list(",").is_err());
    }
}
