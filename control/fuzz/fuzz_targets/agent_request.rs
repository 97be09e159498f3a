//! Whatever bytes arrive as a request envelope: parse, verify, parse the body. Must
//! never panic; only a correctly signed request from an authorised key may pass.
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
    let _ = serde_json::from_slice::<Body>(data);
    let _ = std::str::from_utf8(data).map(|s| s.parse::<control::model::Mac>());
    if let Ok(env) = serde_json::from_slice::<Envelope>(data) {
        // Random bytes cannot carry a valid signature of the authorised key.
        assert!(v.check(&[0u8; 32], &env, env.ts).is_err());
        let _ = serde_json::from_str::<Body>(&env.body);
    }
});
