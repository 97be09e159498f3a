//! Whatever bytes arrive as a request envelope: parse, verify, parse and validate the
//! body (live migration steps included); a migration tunnel's first frame; and whatever
//! an agent answers (reservation, info) or a user gives as an overlay network. Must never panic; only a correctly signed request from an
//! authorised key may pass.
#![no_main]
use control::auth::{Authorization, Envelope, SigningKey, Verifier};
use control::proto::Body;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn key() -> &'static SigningKey {
    static K: OnceLock<SigningKey> = OnceLock::new();
    K.get_or_init(|| SigningKey::generate().expect("key"))
}

fuzz_target!(|data: &[u8]| {
    let k = key();
    let mut v = Verifier::new(vec![Authorization {
        key: k.public_hex(),
        comment: String::new(),
        may_create_clusters: true,
        max_vms: 4,
        hosts: vec!["*".into()],
    }]);
    if let Ok(b) = serde_json::from_slice::<Body>(data) {
        let _ = b.req.validate();
    }
    // Replies a controller reads back from an agent (protocol version 2).
    let _ = serde_json::from_slice::<control::proto::ReserveData>(data);
    let _ = serde_json::from_slice::<control::proto::InfoData>(data);
    // The first frame of a live migration's tunnel between agents, and the progress
    // record `mvc vm migrations` reads.
    let _ = control::migrate::TunnelHello::parse(data);
    let _ = serde_json::from_slice::<control::migrate::MigrationView>(data);
    // A libvirt origin's domain (`offer`'s answer) and a libvirt destination's signed
    // domain (`prepare`'s answer): checked before use; random bytes never verify.
    if let Ok(d) = serde_json::from_slice::<control::migrate::LibvirtDomain>(data) {
        let _ = d.validate();
    }
    if let Ok(l) = serde_json::from_slice::<control::migrate::LibvirtIncoming>(data) {
        if l.validate().is_ok() {
            assert!(!l.verify(&"ab".repeat(32), &k.public_hex()));
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        // A light VM's state, sent through the `ram` tunnel.
        let _ = control::migrate::NetnsState::parse(s);
        let _ = s.parse::<control::model::Mac>();
        if let Ok(n) = s.parse::<control::model::OverlayNet>() {
            let _ = (n.size(), n.max_vms(), n.host(1), n.subnet(24, 3));
        }
    }
    if let Ok(env) = serde_json::from_slice::<Envelope>(data) {
        // Random bytes cannot carry a valid signature of the authorised key.
        assert!(v.check(&[0u8; 32], &env, env.ts).is_err());
        let _ = serde_json::from_str::<Body>(&env.body);
    }
});
