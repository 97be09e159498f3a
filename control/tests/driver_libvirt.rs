//! The libvirt VM driver in the three-site lab: site C (behind NAT) runs its agent with
//! `--driver libvirt`, so its compute is a libvirt domain (TCG or KVM) booting the
//! qemu driver's guest, on the cluster bridge with the allocated MAC, its disk an NBD
//! network disk served by `xnbd serve`. The domain must get its DHCP lease from the
//! frontend at site A over the overlay, answer ping from site B's VM and ping the other
//! sites itself (`cluster topology`), refuse `vm migrate` to a site of another driver
//! and run on, write its boot marker through xnbd into its disk
//! image, and boot from that disk again after `vm stop` (domain destroyed and undefined,
//! TAP gone) and `vm start`; `cluster destroy` leaves no domain, disk, socket or TAP; a
//! restarted agent removes a domain of its own that its store does not name and leaves
//! other domains alone.
//!
//! A site is a network namespace here, and libvirtd puts a domain's TAP on a bridge of
//! its own namespace: so the test runs a libvirtd (and virtlogd) of its own inside site
//! C's namespace (`common::libvirtd`). Live migration between two libvirt sites is
//! `vm_migrate_libvirt.rs`. Needs root; otherwise prints that it was skipped.
mod common;

use common::libvirtd::{libvirt_agent_args, libvirt_lab, Libvirtd};
use common::{compute_at, create_1_1_1, links, wait_until};
use lab::sites::SiteLab;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Waits (up to 20 s) until the first sector of `img` holds `want` (the guest writes
/// `MVC-DISK <name> boot <n>` there at every boot).
fn wait_marker(img: &Path, want: &str) {
    let marker = || {
        let b = std::fs::read(img).unwrap_or_default();
        String::from_utf8_lossy(&b[..b.len().min(512)])
            .trim_end_matches('\0')
            .trim()
            .to_string()
    };
    wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        marker() == want
    });
    assert_eq!(marker(), want, "boot marker in {}", img.display());
}

/// A domain that boots nothing, with the driver's metadata naming `owner`.
fn bare_domain(name: &str, owner: &str) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name>\
         <metadata><mvc:vm xmlns:mvc='{}' owner='{owner}' cluster='x' vm='x'/></metadata>\
         <memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os></domain>",
        control::driver::LIBVIRT_METADATA_NS
    )
}

#[test]
fn libvirt_domain_at_nated_site_gets_lease_pings_and_leaves_nothing() {
    let name = "libvirt_domain_at_nated_site_gets_lease_pings_and_leaves_nothing";
    let Some((mvc, xnbd, cache, overlay, lab, topo)) = libvirt_lab(name, "mvcl") else {
        return;
    };
    let c_ns = topo.sites[2].frontend.clone();
    let sock_dir = PathBuf::from(format!("/run/mvc/{}", lab.prefix()));
    let t0 = Instant::now();
    let lv = Libvirtd::start(&c_ns, &lab.dir().join("libvirt"), &sock_dir);
    eprintln!(
        "libvirtd up in site C's namespace in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let mut extra = BTreeMap::new();
    extra.insert(
        "C".to_string(),
        libvirt_agent_args(&lv, &cache, &xnbd, 64, false),
    );
    let mut sl = SiteLab::start(lab, topo, &mvc, &overlay, 8, 8, &extra).expect("site lab");
    let c_state = sl.agents["C"].state.clone();
    let prefix = format!("{}C-", sl.vm_prefix);
    sl.add_sites().expect("site add");

    let t0 = Instant::now();
    let cl = create_1_1_1(&sl, "l", 256, 150);
    eprintln!(
        "cluster with a libvirt domain at C started and leased in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(cl["state"], "running");
    let vms = cl["vms"].as_array().unwrap();
    let (lvm, bvm) = (compute_at(&cl, "C"), compute_at(&cl, "B"));
    let lname = lvm["name"].as_str().unwrap().to_string();
    let lip: std::net::Ipv4Addr = lvm["ip"].as_str().unwrap().parse().unwrap();
    let lmac = lvm["mac"].as_str().unwrap().to_string();
    let fe = vms.iter().find(|v| v["role"] == "frontend").unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();

    // The lease came from the frontend's dnsmasq at A, over the overlay.
    let leases = std::fs::read_to_string(sl.vm_file("A", &fe, "leases").expect("lease file"))
        .expect("frontend lease file");
    assert!(
        leases.contains(&lmac) && leases.contains(&lip.to_string()),
        "{lname} ({lmac}) not in frontend leases:\n{leases}"
    );

    // One domain, named with the agent's prefix, running, with the MAC on the cluster
    // bridge and the NBD disk.
    let doms = lv.domains();
    assert_eq!(doms.len(), 1, "{doms:?}");
    let dom = doms[0].clone();
    assert!(dom.starts_with(&prefix), "{dom} lacks prefix {prefix}");
    assert_eq!(lv.virsh(&["domstate", &dom]).unwrap().trim(), "running");
    let xml = lv.virsh(&["dumpxml", &dom]).unwrap();
    for want in [
        format!("<mac address='{lmac}'/>"),
        "<source bridge='mvb".to_string(),
        "protocol='nbd'".to_string(),
        format!("owner=\"{}\"", c_state.display()),
    ] {
        assert!(xml.contains(&want), "{want} not in the domain XML:\n{xml}");
    }
    let tap_list = links(&c_ns, "mvq");
    assert_eq!(tap_list.len(), 1, "{tap_list:?}");
    let master = lab::run(&["ip", "-n", &c_ns, "-o", "link", "show", &tap_list[0]]).unwrap();
    assert!(master.stdout.contains("master mvb"), "{}", master.stdout);

    // Site B's VM reaches it over the overlay, and it pings the other sites.
    let b_ns = sl
        .vm_ns("l", bvm["name"].as_str().unwrap())
        .expect("B's VM namespace");
    lab::wait_ping(&sl.lab, &b_ns, lip, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("B's VM -> libvirt domain {lip}: {e}"));
    eprintln!(
        "B's VM pinged the domain at {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let topo = sl
        .ctl_json(&["cluster", "topology", "l"])
        .expect("topology");
    let rtts = topo["rtt_ms"].as_array().unwrap();
    assert_eq!(rtts.len(), 6, "{topo}");
    assert!(
        rtts.iter()
            .all(|r| r["ms"].as_f64().is_some_and(|ms| ms > 0.0)),
        "{rtts:?}"
    );

    eprintln!("topology measured at {:.1} s", t0.elapsed().as_secs_f64());

    // A libvirt domain moves only to another libvirt site: B (netns) refuses it before
    // anything is made, and the domain runs on where it was.
    let e = sl
        .ctl(&["vm", "migrate", "l", &lname, "--to", "B"])
        .expect_err("vm migrate of a libvirt domain to a netns site")
        .to_string();
    assert!(e.contains("only between sites of the same driver"), "{e}");
    assert_eq!(lv.domains(), vec![dom.clone()]);
    assert_eq!(lv.virsh(&["domstate", &dom]).unwrap().trim(), "running");
    // The record says it failed and why, not a stale `prepare`.
    let recorded = sl.ctl_json(&["vm", "migrations"]).expect("migrations");
    let text = recorded.to_string();
    assert!(
        text.contains("\"phase\":\"failed\"") && text.contains("same driver"),
        "{recorded}"
    );

    // Its disk is the NBD export of xnbd: the guest's boot marker is in the image.
    let handles = sl.vm_handles("l").expect("handles");
    let local = handles[&lname].rsplit(':').next().unwrap().to_string();
    let img = c_state.join("disks").join(format!("{local}.img"));
    wait_marker(&img, &format!("MVC-DISK {lname} boot 1"));

    // vm stop: the domain is destroyed and undefined, its TAP gone, the disk kept;
    // vm start defines and boots it again from that disk.
    let st = sl.ctl_json(&["vm", "stop", &lname]).expect("vm stop");
    assert_eq!(st["state"], "stopped");
    assert!(lv.domains().is_empty(), "{:?}", lv.domains());
    assert!(links(&c_ns, "mvq").is_empty(), "{:?}", links(&c_ns, "mvq"));
    assert!(img.exists());
    sl.ctl_json(&["vm", "start", &lname]).expect("vm start");
    assert_eq!(lv.virsh(&["domstate", &dom]).unwrap().trim(), "running");
    lab::wait_ping(&sl.lab, &b_ns, lip, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("B's VM -> libvirt domain {lip} after restart: {e}"));
    wait_marker(&img, &format!("MVC-DISK {lname} boot 2"));
    eprintln!(
        "stopped and started again at {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // Destroy: no domain, disk, socket or TAP left at C.
    sl.ctl(&["cluster", "destroy", "l"]).expect("destroy");
    eprintln!("destroyed at {:.1} s", t0.elapsed().as_secs_f64());
    assert!(lv.domains().is_empty(), "{:?}", lv.domains());
    assert!(links(&c_ns, "mvq").is_empty(), "{:?}", links(&c_ns, "mvq"));
    let disks: Vec<_> = std::fs::read_dir(c_state.join("disks"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(disks.is_empty(), "disks left: {disks:?}");
    let socks: Vec<_> = std::fs::read_dir(&sock_dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        socks.is_empty(),
        "left in {}: {socks:?}",
        sock_dir.display()
    );

    // A domain of this agent its store does not name goes at the agent's start; one
    // of another owner stays.
    let stray = format!("{prefix}c99-stray");
    let other = format!("{prefix}c98-other");
    for (d, owner) in [
        (&stray, c_state.display().to_string()),
        (&other, "/elsewhere".to_string()),
    ] {
        let f = sl.lab.dir().join(format!("{d}.xml"));
        std::fs::write(&f, bare_domain(d, &owner)).unwrap();
        lv.virsh(&["define", &f.display().to_string()])
            .unwrap_or_else(|| panic!("virsh define {d}"));
    }
    eprintln!("strays defined at {:.1} s", t0.elapsed().as_secs_f64());
    sl.stop_agent("C");
    eprintln!("agent stopped at {:.1} s", t0.elapsed().as_secs_f64());
    sl.restart_agent("C").expect("agent C restart");
    eprintln!("agent restarted at {:.1} s", t0.elapsed().as_secs_f64());
    let left = lv.domains();
    assert!(!left.contains(&stray), "{left:?}");
    assert!(left.contains(&other), "{left:?}");
}
