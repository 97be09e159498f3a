//! Every cluster with its VMs and attachments as `cluster list --json` and `vm list --json`
//! print them, without a record per VM.
//!
//! At 100,000 VMs, loading [`Cluster`](crate::model::Cluster)s spends most of its time
//! on four owned `String`s per VM. A [`Listing`] keeps all of its text in one buffer and
//! its records as spans into it; serialising it gives the same JSON, byte for byte, as
//! serialising the `Cluster`s (`vm list`: the `(cluster, Vm)` pairs).
use crate::model::{Mac, OverlayNet, Role};
use serde::{Serialize, Serializer};
use std::fmt::Write;
use std::net::Ipv4Addr;

/// Where a string lies in a [`Listing`]'s text.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    start: usize,
    end: usize,
}

/// Clusters by name, each with its VMs (by id) and attachments (by id).
#[derive(Debug, Default)]
pub struct Listing {
    text: String,
    pub(crate) clusters: Vec<ClusterRow>,
}

/// A cluster of a [`Listing`]; field for field a [`Cluster`](crate::model::Cluster).
#[derive(Debug)]
pub(crate) struct ClusterRow {
    pub id: i64,
    pub name: Span,
    pub origin: Span,
    pub overlay_net: OverlayNet,
    pub state: Span,
    pub community: Span,
    pub secret_ref: Span,
    pub supernode: Span,
    pub vms: Vec<VmRow>,
    pub attachments: Vec<AttachmentRow>,
}

/// A VM of a [`Listing`]; field for field a [`Vm`](crate::model::Vm).
#[derive(Debug)]
pub(crate) struct VmRow {
    pub name: Span,
    pub role: Role,
    pub site: Span,
    pub host: Span,
    pub memory_mb: u64,
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub state: Span,
}

/// An attachment of a [`Listing`]; field for field an
/// [`Attachment`](crate::model::Attachment).
#[derive(Debug)]
pub(crate) struct AttachmentRow {
    pub site: Span,
    pub host: Span,
    pub tap: Span,
    pub bridge: Span,
    pub edge_name: Span,
}

impl Listing {
    /// Copies `s` into the text.
    pub(crate) fn put(&mut self, s: &str) -> Span {
        let start = self.text.len();
        self.text.push_str(s);
        Span {
            start,
            end: self.text.len(),
        }
    }

    fn str(&self, s: Span) -> &str {
        &self.text[s.start..s.end]
    }

    /// How many clusters it holds.
    pub fn len(&self) -> usize {
        self.clusters.len()
    }

    /// Whether it holds no cluster.
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }

    /// Every VM with its cluster's name, as `vm list --json` prints them: serialises
    /// like a `Vec<(String, Vm)>`.
    pub fn vms(&self) -> VmsOfListing<'_> {
        VmsOfListing(self)
    }

    /// Every VM, borrowed, with its cluster's name (clusters by name, VMs by id).
    pub fn vm_views(&self) -> impl Iterator<Item = (&str, VmView<'_>)> {
        self.clusters.iter().flat_map(move |c| {
            let name = self.str(c.name);
            c.vms.iter().map(move |v| (name, v.view(self)))
        })
    }
}

/// Serialises like a `Vec<Cluster>`.
impl Serialize for Listing {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.clusters.iter().map(|c| c.view(self)))
    }
}

impl Listing {
    /// The text of `vm list`: a header and a line per VM.
    pub fn vm_table(&self) -> String {
        let line = |s: &mut String, f: [&str; 8]| {
            let _ = writeln!(
                s,
                "{:<12} {:<12} {:<9} {:<6} {:<10} {:<18} {:<15} {}",
                f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7]
            );
        };
        let mut s = String::new();
        line(
            &mut s,
            [
                "CLUSTER", "VM", "ROLE", "SITE", "HOST", "MAC", "IP", "STATE",
            ],
        );
        for (c, v) in self.vm_views() {
            let (mac, ip) = (v.mac.to_string(), v.ip.to_string());
            line(
                &mut s,
                [
                    c,
                    v.name,
                    v.role.as_str(),
                    v.site,
                    v.host,
                    &mac,
                    &ip,
                    v.state,
                ],
            );
        }
        s
    }
}

/// See [`Listing::vms`].
pub struct VmsOfListing<'a>(&'a Listing);

impl Serialize for VmsOfListing<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.vm_views())
    }
}

/// A row of a [`Listing`] and the borrowed record it serialises as.
trait View {
    /// The record, its fields named and ordered as in the model's type.
    type Of<'a>: Serialize
    where
        Self: 'a;
    fn view<'a>(&'a self, l: &'a Listing) -> Self::Of<'a>;
}

/// Rows of one kind, serialised as a sequence of their views.
struct Rows<'a, T> {
    listing: &'a Listing,
    rows: &'a [T],
}

impl<T: View> Serialize for Rows<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.rows.iter().map(|r| r.view(self.listing)))
    }
}

#[derive(Serialize)]
struct ClusterView<'a> {
    id: i64,
    name: &'a str,
    origin: &'a str,
    overlay_net: OverlayNet,
    state: &'a str,
    overlay: OverlayView<'a>,
    vms: Rows<'a, VmRow>,
    attachments: Rows<'a, AttachmentRow>,
}

#[derive(Serialize)]
struct OverlayView<'a> {
    community: &'a str,
    secret_ref: &'a str,
    supernode: &'a str,
}

/// A VM of a [`Listing`], borrowed; field for field a [`Vm`](crate::model::Vm).
#[derive(Debug, Serialize)]
pub struct VmView<'a> {
    pub name: &'a str,
    pub role: Role,
    pub site: &'a str,
    pub host: &'a str,
    pub memory_mb: u64,
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub state: &'a str,
}

#[derive(Serialize)]
struct AttachmentView<'a> {
    site: &'a str,
    host: &'a str,
    tap: &'a str,
    bridge: &'a str,
    edge_name: &'a str,
}

impl View for ClusterRow {
    type Of<'a> = ClusterView<'a>;
    fn view<'a>(&'a self, l: &'a Listing) -> ClusterView<'a> {
        ClusterView {
            id: self.id,
            name: l.str(self.name),
            origin: l.str(self.origin),
            overlay_net: self.overlay_net,
            state: l.str(self.state),
            overlay: OverlayView {
                community: l.str(self.community),
                secret_ref: l.str(self.secret_ref),
                supernode: l.str(self.supernode),
            },
            vms: Rows {
                listing: l,
                rows: &self.vms,
            },
            attachments: Rows {
                listing: l,
                rows: &self.attachments,
            },
        }
    }
}

impl View for VmRow {
    type Of<'a> = VmView<'a>;
    fn view<'a>(&'a self, l: &'a Listing) -> VmView<'a> {
        VmView {
            name: l.str(self.name),
            role: self.role,
            site: l.str(self.site),
            host: l.str(self.host),
            memory_mb: self.memory_mb,
            mac: self.mac,
            ip: self.ip,
            state: l.str(self.state),
        }
    }
}

impl View for AttachmentRow {
    type Of<'a> = AttachmentView<'a>;
    fn view<'a>(&'a self, l: &'a Listing) -> AttachmentView<'a> {
        AttachmentView {
            site: l.str(self.site),
            host: l.str(self.host),
            tap: l.str(self.tap),
            bridge: l.str(self.bridge),
            edge_name: l.str(self.edge_name),
        }
    }
}
