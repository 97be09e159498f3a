//! The boot files of the qemu driver's guest: a Linux kernel and an initramfs built at
//! run time, so a VM boots in seconds even under TCG and needs no disk image.
//!
//! - Kernel: the host's (`/boot/vmlinuz-$(uname -r)` with its `/lib/modules`) when there
//!   is one, otherwise Debian's cloud kernel, fetched once with `apt-get download` and
//!   unpacked with `dpkg-deb -x` (never installed) into the cache directory.
//! - Initramfs (cpio, newc): busybox-static, the virtio modules (`virtio_pci`,
//!   `virtio_net`, `virtio_blk` and what they depend on, unless built in) and a small
//!   `/init` that loads them, writes a boot marker to the first sector of `/dev/vda`
//!   (the disk xnbd serves), gets its address with `udhcpc` from the cluster frontend
//!   and then keeps a shell on the serial console. Lines starting with `MVC-` on the
//!   console report its state (`MVC-LEASE <ip>`, `MVC-DISK ...`); the driver reads them
//!   from the console log and runs `ping` through the console.
//! - The guest agent `mvc-guest` (`src/bin/mvc-guest.rs`, with the shared libraries it
//!   loads), started by `/init` on the virtio-serial port [`GUEST_AGENT_PORT`]: the
//!   agent runs commands in the guest through it (`cluster exec`, Slurm's set-up).
//! - With [`GuestOptions::slurm`] (a cluster with the Slurm stack): this machine's
//!   munged, slurmd and slurmstepd, Slurm's plugins and every shared library they
//!   load, as `ldd` resolves them here, at the same paths, plus `/etc/passwd`,
//!   `/etc/group` and `/etc/nsswitch.conf` for root. The agent sends the munge key
//!   and `slurm.conf` through the guest agent and starts the daemons the same way.
//!
//! Built files are cached under the cache directory, keyed by kernel release and the
//! content of every file in the archive, so repeated starts only reuse them and a
//! plain guest stays small. A guest agent built with debug information goes in
//! stripped (`strip`, else `objcopy --strip-all`; as it is when neither is there).
//! When an archive is made, the older archives of the same kind (plain, Slurm) go
//! ([`prune`]): qemu reads the archive once, at its start, so only one named on a
//! running process's command line is in use; one handed out in the last
//! [`KEEP_USED`] stays too (another agent sharing the cache may be about to start a
//! VM with it; handing one out renews its time).
use super::DriverError;
use crate::process::run;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a guest boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootFiles {
    /// Kernel image (`-kernel`).
    pub kernel: PathBuf,
    /// Initramfs (`-initrd`).
    pub initrd: PathBuf,
}

/// The guest's `/init` (busybox sh).
pub const INIT: &str = r#"#!/bin/sh
# /init of an mvc qemu guest (built by mvc agent; see control/src/driver/guest.rs).
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules); do
  insmod "/lib/modules/$m.ko" || echo "MVC-ERROR insmod $m"
done
name=$(sed -n 's/.*mvc\.name=\([^ ]*\).*/\1/p' /proc/cmdline)
hostname "${name:-guest}"
if [ -x /usr/sbin/slurmd ]; then
  # slurmd looks for a cgroup hierarchy at start: the named systemd one (v1).
  mount -t tmpfs cgroup /sys/fs/cgroup && mkdir -p /sys/fs/cgroup/systemd &&
    mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd || echo "MVC-ERROR cgroup"
  mkdir -p /run/munge /var/log/munge /var/lib/munge /mvc/home
fi
if [ -x /bin/mvc-guest ]; then
  /bin/mvc-guest >/tmp/mvc-guest.log 2>&1 &
fi
ip link set lo up
n=0
while ! ip link show eth0 >/dev/null 2>&1 && [ $n -lt 20 ]; do sleep 1; n=$((n+1)); done
ip link set eth0 up || echo "MVC-ERROR no eth0"
if [ -b /dev/vda ]; then
  prev=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -d '\000' | head -n 1)
  boot=$(echo "$prev" | sed -n 's/^MVC-DISK .* boot \([0-9][0-9]*\)$/\1/p')
  boot=$(( ${boot:-0} + 1 ))
  printf 'MVC-DISK %s boot %s\n' "$name" "$boot" | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null
  sync
  echo "MVC-DISK written boot $boot"
else
  echo "MVC-DISK none"
fi
udhcpc -f -i eth0 -s /etc/udhcpc.script -t 5 -T 2 -A 1 -x "hostname:$name" >/dev/null 2>&1 &
echo "MVC-READY"
# A shell on the console; this one, pid 1, reaps the orphans daemons leave.
while :; do /bin/sh; done
"#;

/// The guest's DHCP client script: applies the lease and reports it on the console.
pub const UDHCPC: &str = r#"#!/bin/sh
case "$1" in
  deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up; echo "MVC-LEASE none" > /dev/console ;;
  bound|renew) ip -4 addr flush dev "$interface"; ip addr add "$ip/${mask:-24}" dev "$interface"; echo "MVC-LEASE $ip" > /dev/console ;;
esac
exit 0
"#;

/// Modules the guest needs (with their dependencies, unless built in):
/// `virtio_console` carries the guest agent's virtio-serial port.
pub const MODULES: &[&str] = &["virtio_pci", "virtio_net", "virtio_blk", "virtio_console"];

/// Name of the virtio-serial port the guest agent (`mvc-guest`) serves.
pub const GUEST_AGENT_PORT: &str = "org.mvc.guest.0";

/// The guest's users and name service: root for the daemons and jobs.
const PASSWD: &str = "root:x:0:0:root:/mvc/home:/bin/sh\n";
const GROUP: &str = "root:x:0:\n";
const NSSWITCH: &str = "passwd: files\ngroup: files\nshadow: files\nhosts: files\n";
const HOSTS: &str = "127.0.0.1 localhost\n";

/// What a guest carries besides busybox and its modules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestOptions {
    /// The guest agent binary (`mvc-guest`), when there is one.
    pub agent: Option<PathBuf>,
    /// Slurm's compute side: munged, slurmd, slurmstepd, Slurm's plugins and the
    /// shared libraries of all of them.
    pub slurm: bool,
}

impl GuestOptions {
    /// The guest agent next to the running binary (or `/usr/bin/mvc-guest`); Slurm
    /// when `slurm`.
    pub fn new(slurm: bool) -> GuestOptions {
        let agent = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("mvc-guest")))
            .into_iter()
            .chain([PathBuf::from("/usr/bin/mvc-guest")])
            .find(|p| p.is_file());
        GuestOptions { agent, slurm }
    }
}

/// The libraries `ldd` names in its output (`name => /path (addr)` and the loader's
/// own `/path (addr)` line); `Err` with the names it could not find.
pub fn parse_ldd(out: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    let mut missing = Vec::new();
    for l in out.lines() {
        let l = l.trim();
        if l.contains("not found") {
            missing.push(l.split_whitespace().next().unwrap_or(l).to_string());
        } else if let Some((_, r)) = l.split_once("=>") {
            if let Some(p) = r.split_whitespace().next().filter(|p| p.starts_with('/')) {
                libs.push(PathBuf::from(p));
            }
        } else if let Some(p) = l.split_whitespace().next().filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    if missing.is_empty() {
        Ok(libs)
    } else {
        Err(missing.join(", "))
    }
}

/// The shared libraries `file` loads (as `ldd` resolves them on this machine).
fn libs_of(file: &Path) -> Result<Vec<PathBuf>, DriverError> {
    let s = file.display().to_string();
    let out = std::process::Command::new("ldd")
        .arg(&s)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| cfg_err(format!("ldd {s}: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("not a dynamic executable") || !out.status.success() {
        return Ok(Vec::new());
    }
    parse_ldd(&text).map_err(|m| cfg_err(format!("{s} needs {m}, not on this machine")))
}

/// Slurm's compute side as guest paths: munged, slurmd, slurmstepd, the shared
/// libraries they load, and every plugin of Slurm's plugin directory that loads no
/// library beyond those (the ones that would pull in HDF5, Lua, Kafka, ... stay out:
/// the guest runs the plugins `slurm.conf` names, all among these).
fn slurm_files() -> Result<Vec<PathBuf>, DriverError> {
    let bins: Vec<PathBuf> = ["munged", "slurmd", "slurmstepd"]
        .iter()
        .map(|b| {
            ["/usr/sbin", "/usr/bin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(b))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    cfg_err(format!(
                        "{b} is not installed here: a guest with Slurm carries this machine's (install the Debian packages slurmd, munge)"
                    ))
                })
        })
        .collect::<Result<_, _>>()?;
    let mut base = std::collections::BTreeSet::new();
    for b in &bins {
        base.extend(libs_of(b)?);
    }
    let plugin_dir = base
        .iter()
        .find(|p| p.file_name().is_some_and(|n| n == "libslurmfull.so"))
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .ok_or_else(|| cfg_err("slurmd loads no libslurmfull.so: no plugin directory".into()))?;
    let mut plugins: Vec<PathBuf> = std::fs::read_dir(&plugin_dir)
        .map_err(|e| cfg_err(format!("{}: {e}", plugin_dir.display())))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "so"))
        .collect();
    plugins.sort();
    let mut files: Vec<PathBuf> = bins;
    for p in plugins {
        let Ok(libs) = libs_of(&p) else { continue };
        if libs
            .iter()
            .all(|l| base.contains(l) || l.starts_with(&plugin_dir))
        {
            files.push(p);
        }
    }
    files.extend(base);
    files.sort();
    files.dedup();
    Ok(files)
}

/// The files `opts` adds, as (guest path, bytes, mode), read now.
fn extra_files(opts: &GuestOptions) -> Result<Vec<(String, Vec<u8>, u32)>, DriverError> {
    let mut out = Vec::new();
    let read = |p: &Path| std::fs::read(p).map_err(|e| cfg_err(format!("{}: {e}", p.display())));
    let mut hosts = Vec::new();
    if let Some(a) = &opts.agent {
        out.push(("bin/mvc-guest".to_string(), agent_bytes(a)?, 0o755));
        hosts.extend(libs_of(a)?);
    }
    if opts.slurm {
        hosts.extend(slurm_files()?);
        for (name, text) in [
            ("etc/passwd", PASSWD),
            ("etc/group", GROUP),
            ("etc/nsswitch.conf", NSSWITCH),
            ("etc/hosts", HOSTS),
        ] {
            out.push((name.to_string(), text.as_bytes().to_vec(), 0o644));
        }
    }
    hosts.sort();
    hosts.dedup();
    for h in hosts {
        let name = h.display().to_string().trim_start_matches('/').to_string();
        out.push((name, read(&h)?, 0o755));
    }
    Ok(out)
}

/// The guest agent's bytes: stripped when it carries debug information and a `strip` or
/// `objcopy` is here (a debug build is ten times the size of the stripped one), as
/// it is otherwise.
fn agent_bytes(a: &Path) -> Result<Vec<u8>, DriverError> {
    let bytes = std::fs::read(a).map_err(|e| cfg_err(format!("{}: {e}", a.display())))?;
    if !has_debug_sections(&bytes) {
        return Ok(bytes);
    }
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = std::env::temp_dir().join(format!("mvc-guest.{}.{n}.stripped", std::process::id()));
    let (src, dst) = (a.as_os_str(), tmp.as_os_str());
    let tools: [(&str, Vec<&std::ffi::OsStr>); 2] = [
        ("strip", vec!["-o".as_ref(), dst, src]),
        ("objcopy", vec!["--strip-all".as_ref(), src, dst]),
    ];
    for (tool, args) in tools {
        let ok = std::process::Command::new(tool)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let stripped = std::fs::read(&tmp);
        let _ = std::fs::remove_file(&tmp);
        if let (true, Ok(b)) = (ok, stripped) {
            return Ok(b);
        }
    }
    tracing::info!(agent = %a.display(), "no strip or objcopy here: the guest agent goes in with its debug information");
    Ok(bytes)
}

/// True when the ELF64 little-endian file has debug information (a `.debug_info` or
/// `.debug_line` section).
pub fn has_debug_sections(b: &[u8]) -> bool {
    if b.len() < 0x40 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| {
        b.get(o..o + 2)
            .map(|t| usize::from(u16::from_le_bytes([t[0], t[1]])))
    };
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]) as usize)
    };
    let u64_at = |o: usize| {
        let t = b.get(o..o + 8)?;
        let mut x = [0u8; 8];
        x.copy_from_slice(t);
        usize::try_from(u64::from_le_bytes(x)).ok()
    };
    let (Some(shoff), Some(entsize), Some(num), Some(strndx)) =
        (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e))
    else {
        return false;
    };
    // Section header `i`: its name's offset in the name table, its file offset.
    let header = |i: usize| shoff.checked_add(i.checked_mul(entsize)?);
    let Some(names) = header(strndx).and_then(|h| u64_at(h + 0x18)) else {
        return false;
    };
    (0..num).any(|i| {
        let Some(name) = header(i)
            .and_then(&u32_at)
            .and_then(|off| names.checked_add(off))
        else {
            return false;
        };
        // Not `.debug_gdb_scripts`: an allocated section that stripping keeps.
        b.get(name..)
            .is_some_and(|n| n.starts_with(b".debug_info\0") || n.starts_with(b".debug_line\0"))
    })
}

/// The Debian package whose dependency names the current cloud kernel.
pub const KERNEL_META: &str = "linux-image-cloud-amd64";

/// Kernel image and module tree of one release.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// `vmlinuz`.
    pub image: PathBuf,
    /// `/lib/modules/<release>`.
    pub modules: PathBuf,
    /// Release string.
    pub release: String,
}

fn cfg_err(msg: String) -> DriverError {
    DriverError::Config(msg)
}

/// The host's kernel when it is in /boot with its modules.
fn host_kernel() -> Option<Kernel> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let release = release.trim().to_string();
    let image = PathBuf::from(format!("/boot/vmlinuz-{release}"));
    let modules = PathBuf::from(format!("/lib/modules/{release}"));
    // vmlinuz is 0600 on Debian: being able to read it is part of "usable".
    (std::fs::File::open(&image).is_ok() && modules.join("kernel").is_dir()).then_some(Kernel {
        image,
        modules,
        release,
    })
}

/// A kernel already unpacked under `dir` (`<pkg>/boot/vmlinuz-*`).
fn cached_kernel(dir: &Path) -> Option<Kernel> {
    let mut found: Vec<Kernel> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let root = e.path();
            let boot = std::fs::read_dir(root.join("boot")).ok()?;
            boot.flatten().find_map(|b| {
                let n = b.file_name().to_string_lossy().into_owned();
                let release = n.strip_prefix("vmlinuz-")?.to_string();
                let modules = root.join("lib/modules").join(&release);
                modules.is_dir().then(|| Kernel {
                    image: b.path(),
                    modules,
                    release,
                })
            })
        })
        .collect();
    found.sort_by(|a, b| a.release.cmp(&b.release));
    found.pop()
}

/// Find a kernel: the host's, one cached under `cache/kernel`, or Debian's cloud kernel
/// fetched into the cache (`fetch` allows the download).
pub fn kernel(cache: &Path, fetch: bool) -> Result<Kernel, DriverError> {
    if let Some(k) = host_kernel() {
        return Ok(k);
    }
    let dir = cache.join("kernel");
    if let Some(k) = cached_kernel(&dir) {
        return Ok(k);
    }
    if !fetch {
        return Err(cfg_err(format!(
            "no guest kernel: none in /boot for this host and none cached in {} (run `mvc agent qemu-prepare --cache {}` where Debian's archive is reachable, or pass --qemu-kernel)",
            dir.display(),
            cache.display()
        )));
    }
    let deps = run("apt-cache", &["depends", KERNEL_META])?;
    let pkg = parse_kernel_dep(&deps).ok_or_else(|| {
        cfg_err(format!(
            "`apt-cache depends {KERNEL_META}` names no kernel package (run apt-get update)"
        ))
    })?;
    let dl = dir.join(format!("{pkg}.download"));
    let _ = std::fs::remove_dir_all(&dl);
    std::fs::create_dir_all(&dl).map_err(|e| cfg_err(format!("{}: {e}", dl.display())))?;
    let download = || {
        std::process::Command::new("apt-get")
            .args(["download", "-q", &pkg])
            .current_dir(&dl)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| cfg_err(format!("apt-get download {pkg}: {e}")))
    };
    let mut out = download()?;
    if !out.status.success() {
        // Stale package lists name a version the archive no longer has: refresh once.
        tracing::warn!(
            pkg,
            "apt-get download failed; running apt-get update and retrying"
        );
        let _ = run("apt-get", &["update", "-q"]);
        out = download()?;
    }
    if !out.status.success() {
        return Err(DriverError::Command {
            cmd: format!("apt-get download {pkg}"),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let deb = std::fs::read_dir(&dl)
        .map_err(|e| cfg_err(format!("{}: {e}", dl.display())))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| cfg_err(format!("apt-get download {pkg} left no .deb")))?;
    let tmp = dir.join(format!("{pkg}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    run(
        "dpkg-deb",
        &["-x", &deb.display().to_string(), &tmp.display().to_string()],
    )?;
    let fin = dir.join(&pkg);
    std::fs::rename(&tmp, &fin).map_err(|e| cfg_err(format!("{}: {e}", fin.display())))?;
    let _ = std::fs::remove_dir_all(&dl);
    cached_kernel(&dir).ok_or_else(|| cfg_err(format!("{pkg} holds no vmlinuz")))
}

/// The kernel package named by `apt-cache depends` output.
pub fn parse_kernel_dep(out: &str) -> Option<String> {
    out.lines().find_map(|l| {
        let p = l.trim().strip_prefix("Depends:")?.trim();
        (p.starts_with("linux-image-") && !p.contains(' ')).then(|| p.to_string())
    })
}

/// The `depends=` list from a module's `.modinfo` section.
pub fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(i) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[i + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Module name of a file (`virtio-net.ko.xz` -> `virtio_net`).
fn module_name(file: &str) -> Option<String> {
    let stem = file.split(".ko").next()?;
    (file.contains(".ko")).then(|| stem.replace('-', "_"))
}

fn index_modules(dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            index_modules(&p, out);
        } else if let Some(n) = module_name(&e.file_name().to_string_lossy()) {
            out.entry(n).or_insert(p);
        }
    }
}

/// Uncompressed bytes of a module file (`.ko`, `.ko.xz`, `.ko.zst`).
fn read_module(p: &Path) -> Result<Vec<u8>, DriverError> {
    let s = p.display().to_string();
    let tool = match p.extension().and_then(|x| x.to_str()) {
        Some("xz") => Some("xz"),
        Some("zst") => Some("zstd"),
        Some("gz") => Some("gzip"),
        _ => None,
    };
    match tool {
        None => std::fs::read(p).map_err(|e| cfg_err(format!("{s}: {e}"))),
        Some(t) => {
            let out = std::process::Command::new(t)
                .args(["-dc", &s])
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| cfg_err(format!("{t} -dc {s}: {e}")))?;
            if !out.status.success() {
                return Err(cfg_err(format!("{t} -dc {s} failed")));
            }
            Ok(out.stdout)
        }
    }
}

/// The modules to load for `wanted`, dependencies first, as (name, bytes). Built-in
/// modules (listed in `modules.builtin`) are left out.
pub fn module_closure(
    modules_dir: &Path,
    wanted: &[&str],
) -> Result<Vec<(String, Vec<u8>)>, DriverError> {
    let builtin: Vec<String> = std::fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next().and_then(module_name))
        .collect();
    let mut index = BTreeMap::new();
    index_modules(&modules_dir.join("kernel"), &mut index);
    let mut order: Vec<(String, Vec<u8>)> = Vec::new();
    // Depth-first, dependencies before dependants; `visiting` breaks cycles.
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        builtin: &[String],
        visiting: &mut Vec<String>,
        order: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<(), DriverError> {
        if builtin.iter().any(|b| b == name)
            || order.iter().any(|(n, _)| n == name)
            || visiting.iter().any(|v| v == name)
        {
            return Ok(());
        }
        let path = index.get(name).ok_or_else(|| {
            cfg_err(format!(
                "kernel module {name} is neither built in nor in the module tree"
            ))
        })?;
        let bytes = read_module(path)?;
        visiting.push(name.to_string());
        for d in modinfo_depends(&bytes) {
            visit(&d, index, builtin, visiting, order)?;
        }
        visiting.pop();
        order.push((name.to_string(), bytes));
        Ok(())
    }
    let mut visiting = Vec::new();
    for w in wanted {
        visit(w, &index, &builtin, &mut visiting, &mut order)?;
    }
    Ok(order)
}

/// A cpio archive in the `newc` format (what the kernel unpacks as initramfs).
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn header(&mut self, name: &str, mode: u32, size: usize, rdev: (u32, u32)) {
        self.ino += 1;
        let namesize = name.len() + 1;
        let h = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, 1, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0
        );
        self.buf.extend_from_slice(h.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    /// A directory.
    pub fn dir(&mut self, name: &str) {
        self.header(name, 0o040_755, 0, (0, 0));
    }

    /// A character device node (the kernel opens `/dev/console` for init before any
    /// devtmpfs is mounted).
    pub fn chardev(&mut self, name: &str, major: u32, minor: u32) {
        self.header(name, 0o020_600, 0, (major, minor));
    }

    /// A regular file with `mode` permission bits.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.header(name, 0o100_000 | (mode & 0o7777), data.len(), (0, 0));
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.header("TRAILER!!!", 0, 0, (0, 0));
        while self.buf.len() % 512 != 0 {
            self.buf.push(0);
        }
        self.buf
    }
}

/// True when the ELF file has no program interpreter (statically linked).
pub fn is_static_elf(b: &[u8]) -> bool {
    // ELF64 little endian: e_phoff at 0x20, e_phentsize at 0x36, e_phnum at 0x38.
    if b.len() < 0x40 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let mut o8 = [0u8; 8];
    o8.copy_from_slice(&b[0x20..0x28]);
    let Ok(phoff) = usize::try_from(u64::from_le_bytes(o8)) else {
        return false;
    };
    let (entsize, num) = (u16_at(0x36), u16_at(0x38));
    (0..num).all(|i| {
        let o = phoff.saturating_add(i.saturating_mul(entsize));
        match b.get(o..o + 4) {
            Some(t) => u32::from_le_bytes([t[0], t[1], t[2], t[3]]) != 3, // PT_INTERP
            None => false,
        }
    })
}

/// A statically linked busybox (Debian's busybox-static puts it at /bin/busybox).
pub fn static_busybox() -> Result<Vec<u8>, DriverError> {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        if let Ok(b) = std::fs::read(p) {
            if is_static_elf(&b) {
                return Ok(b);
            }
        }
    }
    Err(cfg_err(
        "no statically linked busybox (install the Debian package busybox-static)".into(),
    ))
}

/// FNV-1a, for cache keys.
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Build (or reuse from the cache) the initramfs for kernel `k` carrying what `opts`
/// adds; the cache key covers the content of every file, so a plain guest and one
/// with Slurm are two files.
pub fn initramfs(cache: &Path, k: &Kernel, opts: &GuestOptions) -> Result<PathBuf, DriverError> {
    let busybox = static_busybox()?;
    let extra = extra_files(opts)?;
    let mut parts: Vec<&[u8]> = vec![
        k.release.as_bytes(),
        INIT.as_bytes(),
        UDHCPC.as_bytes(),
        &busybox,
    ];
    for (name, bytes, _) in &extra {
        parts.push(name.as_bytes());
        parts.push(bytes);
    }
    let key = fnv(&parts);
    let kind = if opts.slurm { "slurm" } else { "plain" };
    let out = cache.join(format!("initramfs-{}-{kind}-{key:016x}.cpio", k.release));
    if out.exists() {
        mark_used(&out);
        return Ok(out);
    }
    let mods = module_closure(&k.modules, MODULES)?;
    let mut c = Cpio::default();
    for d in [
        "bin",
        "dev",
        "etc",
        "lib",
        "lib/modules",
        "proc",
        "sys",
        "tmp",
        "root",
    ] {
        c.dir(d);
    }
    c.chardev("dev/console", 5, 1);
    c.file("bin/busybox", 0o755, &busybox);
    c.file("bin/sh", 0o755, &busybox);
    c.file("init", 0o755, INIT.as_bytes());
    c.file("etc/udhcpc.script", 0o755, UDHCPC.as_bytes());
    let mut list = String::new();
    for (name, bytes) in &mods {
        c.file(&format!("lib/modules/{name}.ko"), 0o644, bytes);
        list.push_str(name);
        list.push('\n');
    }
    c.file("etc/modules", 0o644, list.as_bytes());
    let mut dirs: std::collections::BTreeSet<String> = ["bin", "etc", "lib", "tmp", "root"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for (name, bytes, mode) in &extra {
        let mut d = String::new();
        let parents: Vec<&str> = name.split('/').collect();
        for part in &parents[..parents.len() - 1] {
            if !d.is_empty() {
                d.push('/');
            }
            d.push_str(part);
            if dirs.insert(d.clone()) {
                c.dir(&d);
            }
        }
        c.file(name, *mode, bytes);
    }
    std::fs::create_dir_all(cache).map_err(|e| cfg_err(format!("{}: {e}", cache.display())))?;
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, c.finish())
        .and_then(|_| std::fs::rename(&tmp, &out))
        .map_err(|e| cfg_err(format!("{}: {e}", out.display())))?;
    tracing::info!(initramfs = %out.display(), modules = ?mods.iter().map(|m| &m.0).collect::<Vec<_>>(), "guest initramfs built");
    let gone = prune(cache, &out, std::time::SystemTime::now());
    if !gone.is_empty() {
        tracing::info!(removed = ?gone, "older guest initramfs archives removed");
    }
    Ok(out)
}

/// How long an archive handed out stays, whatever is built after it.
pub const KEEP_USED: std::time::Duration = std::time::Duration::from_secs(3600);

/// Note that `archive` was handed out now (its modification time), so that [`prune`]
/// leaves it for [`KEEP_USED`].
pub fn mark_used(archive: &Path) {
    let _ = std::fs::File::options()
        .write(true)
        .open(archive)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
}

/// The kind of an archive from its name (`initramfs-<release>-<kind>-<key>.cpio`):
/// `Some("")` for one named before kinds were (`initramfs-<release>-<key>.cpio`),
/// `None` for a file that is no archive.
fn archive_kind(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("initramfs-")?.strip_suffix(".cpio")?;
    let (rest, key) = rest.rsplit_once('-')?;
    if key.len() != 16 || !key.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(match rest.rsplit_once('-') {
        Some((_, k @ ("plain" | "slurm"))) => k,
        _ => "",
    })
}

/// Whether a running process names `path`'s file on its command line (qemu's
/// `-initrd`).
fn named_by_a_process(path: &Path) -> bool {
    let Some(file) = path.file_name() else {
        return false;
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return true;
    };
    procs.flatten().any(|p| {
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            return false;
        };
        cmdline.split(|&b| b == 0).any(|arg| {
            use std::os::unix::ffi::OsStrExt;
            Path::new(std::ffi::OsStr::from_bytes(arg)).file_name() == Some(file)
        })
    })
}

/// Remove the archives in `cache` older than `current` of its kind (and those named
/// before kinds were), but not one a running process names nor one handed out within
/// [`KEEP_USED`] of `now`; what went.
pub fn prune(cache: &Path, current: &Path, now: std::time::SystemTime) -> Vec<PathBuf> {
    let Some(kind) = current
        .file_name()
        .and_then(|n| archive_kind(&n.to_string_lossy()).map(str::to_string))
    else {
        return Vec::new();
    };
    let Ok(dir) = std::fs::read_dir(cache) else {
        return Vec::new();
    };
    let mut gone = Vec::new();
    for e in dir.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let same_kind = archive_kind(&name).is_some_and(|k| k == kind || k.is_empty());
        let recent = e
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| now.duration_since(t).unwrap_or_default() < KEEP_USED)
            .unwrap_or(true);
        if p == current || !same_kind || recent || named_by_a_process(&p) {
            continue;
        }
        if std::fs::remove_file(&p).is_ok() {
            gone.push(p);
        }
    }
    gone
}

/// Kernel and initramfs for guests (with the guest agent when it is found), from the
/// cache when present (`fetch`: allow the kernel download).
pub fn prepare(cache: &Path, fetch: bool) -> Result<BootFiles, DriverError> {
    prepare_with(cache, fetch, &GuestOptions::new(false))
}

/// [`prepare`] for a guest carrying what `opts` adds.
pub fn prepare_with(
    cache: &Path,
    fetch: bool,
    opts: &GuestOptions,
) -> Result<BootFiles, DriverError> {
    let k = kernel(cache, fetch)?;
    let initrd = initramfs(cache, &k, opts)?;
    Ok(BootFiles {
        kernel: k.image,
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn kernel_dep_parsed() {
        let o = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-57-cloud-amd64\n";
        assert_eq!(
            parse_kernel_dep(o).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64")
        );
        assert_eq!(parse_kernel_dep("  Depends: <foo>\n"), None);
        assert_eq!(parse_kernel_dep(""), None);
    }

    #[test]
    fn module_names_and_depends() {
        assert_eq!(module_name("virtio_net.ko").as_deref(), Some("virtio_net"));
        assert_eq!(
            module_name("virtio-blk.ko.xz").as_deref(),
            Some("virtio_blk")
        );
        assert_eq!(module_name("modules.order"), None);
        let ko = b"\x7fELF....\0license=GPL\0depends=virtio,virtio_ring\0intree=Y\0";
        assert_eq!(modinfo_depends(ko), vec!["virtio", "virtio_ring"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert!(modinfo_depends(b"nothing").is_empty());
    }

    #[test]
    fn closure_orders_dependencies_first() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("kernel/drivers");
        std::fs::create_dir_all(&k).unwrap();
        std::fs::write(k.join("a.ko"), b"\0depends=b,c\0").unwrap();
        std::fs::write(k.join("b.ko"), b"\0depends=c\0").unwrap();
        std::fs::write(k.join("c.ko"), b"\0depends=\0").unwrap();
        std::fs::write(k.join("loop1.ko"), b"\0depends=loop2\0").unwrap();
        std::fs::write(k.join("loop2.ko"), b"\0depends=loop1\0").unwrap();
        std::fs::write(d.path().join("modules.builtin"), "kernel/x/d.ko\n").unwrap();
        let names = |v: Vec<(String, Vec<u8>)>| v.into_iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(
            names(module_closure(d.path(), &["a", "d"]).unwrap()),
            ["c", "b", "a"]
        );
        assert_eq!(
            names(module_closure(d.path(), &["loop1"]).unwrap()),
            ["loop2", "loop1"]
        );
        let e = module_closure(d.path(), &["missing"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn cpio_newc_layout() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", 0o755, b"#!/bin/sh\n");
        let a = c.finish();
        assert_eq!(a.len() % 512, 0);
        assert!(a.starts_with(b"070701"));
        // Second header: after the first (110 bytes + "bin\0", padded to 4).
        let second = 112 + 4;
        assert_eq!(&a[second..second + 6], b"070701");
        let mode = std::str::from_utf8(&a[second + 14..second + 22]).unwrap();
        assert_eq!(u32::from_str_radix(mode, 16).unwrap(), 0o100_755);
        let size = std::str::from_utf8(&a[second + 54..second + 62]).unwrap();
        assert_eq!(usize::from_str_radix(size, 16).unwrap(), 10);
        assert!(a.windows(10).any(|w| w == b"TRAILER!!!"));
        // When cpio(1) is there, it lists what we wrote.
        if let Ok(mut ch) = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        {
            use std::io::Write;
            ch.stdin.take().unwrap().write_all(&a).unwrap();
            let out = ch.wait_with_output().unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), "bin\ninit\n");
        }
    }

    #[test]
    fn ldd_output_parsed() {
        let o = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                 \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f70)\n\
                 \t/lib64/ld-linux-x86-64.so.2 (0x00007f71)\n";
        assert_eq!(
            parse_ldd(o).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        let e = parse_ldd("\tlibhdf5.so.103 => not found\n").unwrap_err();
        assert_eq!(e, "libhdf5.so.103");
    }

    #[test]
    fn debug_info_found_and_stripped() {
        assert!(!has_debug_sections(b"not an elf"));
        assert!(!has_debug_sections(&[]));
        let mut hostile = std::fs::read("/bin/sh").unwrap_or_default();
        if hostile.len() > 0x40 {
            // Section headers beyond the end of the file.
            hostile[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
            assert!(!has_debug_sections(&hostile));
        }
        // This test binary is a debug build.
        let me = std::env::current_exe().unwrap();
        assert!(has_debug_sections(&std::fs::read(&me).unwrap()));
        let got = agent_bytes(&me).unwrap();
        let stripper = ["strip", "objcopy"].iter().any(|t| {
            std::process::Command::new(t)
                .arg("--version")
                .output()
                .is_ok()
        });
        if stripper {
            assert!(!has_debug_sections(&got));
            assert!(is_elf(&got));
        } else {
            eprintln!("no strip or objcopy here: the agent goes in as it is");
        }
    }

    fn is_elf(b: &[u8]) -> bool {
        b.starts_with(b"\x7fELF")
    }

    #[test]
    fn archive_names_have_kinds() {
        let r = "6.1.0-57-cloud-amd64";
        let k = "0123456789abcdef";
        assert_eq!(
            archive_kind(&format!("initramfs-{r}-plain-{k}.cpio")),
            Some("plain")
        );
        assert_eq!(
            archive_kind(&format!("initramfs-{r}-slurm-{k}.cpio")),
            Some("slurm")
        );
        assert_eq!(archive_kind(&format!("initramfs-{r}-{k}.cpio")), Some(""));
        assert_eq!(archive_kind(&format!("initramfs-{r}-plain-{k}.tmp")), None);
        assert_eq!(archive_kind("initramfs-x-plain-123.cpio"), None);
        assert_eq!(archive_kind("kernel"), None);
    }

    #[test]
    fn prune_keeps_current_other_kinds_recent_and_running_archives() {
        let d = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        let hours_ago = now - Duration::from_secs(2 * 3600);
        let file = |name: &str, used: std::time::SystemTime| {
            let p = d.path().join(name);
            std::fs::write(&p, b"x").unwrap();
            std::fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(used)
                .unwrap();
            p
        };
        let r = "6.1.0-57-cloud-amd64";
        let current = file(&format!("initramfs-{r}-plain-000000000000000a.cpio"), now);
        let old = file(
            &format!("initramfs-{r}-plain-000000000000000b.cpio"),
            hours_ago,
        );
        let legacy = file(&format!("initramfs-{r}-000000000000000c.cpio"), hours_ago);
        let recent = file(
            &format!("initramfs-{r}-plain-000000000000000d.cpio"),
            now - Duration::from_secs(60),
        );
        let slurm = file(
            &format!("initramfs-{r}-slurm-000000000000000e.cpio"),
            hours_ago,
        );
        let running = file(
            &format!("initramfs-{r}-plain-000000000000000f.cpio"),
            hours_ago,
        );
        let other = file("kernel.tmp", hours_ago);
        // A process naming `running` on its command line, as qemu's `-initrd` does.
        let mut vm = std::process::Command::new("sh")
            .args(["-c", "sleep 30; true", "-initrd"])
            .arg(&running)
            .spawn()
            .unwrap();
        // Until the child has exec'd, its command line is still this test's.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !named_by_a_process(&running) {
            assert!(std::time::Instant::now() < deadline, "sh never started");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut gone = prune(d.path(), &current, now);
        let _ = vm.kill();
        let _ = vm.wait();
        gone.sort();
        assert_eq!(gone, [legacy, old]);
        for kept in [&current, &recent, &slurm, &running, &other] {
            assert!(kept.exists(), "{} removed", kept.display());
        }
        // Once nothing names it, the old one goes too; handing one out renews it.
        mark_used(&recent);
        let later = now + KEEP_USED - Duration::from_secs(10);
        assert_eq!(prune(d.path(), &current, later), [running]);
        assert!(recent.exists());
    }

    #[test]
    fn static_elf_detected() {
        assert!(!is_static_elf(b"not an elf"));
        assert!(!is_static_elf(&[]));
        if let Ok(sh) = std::fs::read("/bin/sh") {
            // Debian's dash is dynamically linked.
            assert!(!is_static_elf(&sh));
        }
    }
}
