//! In-process proxy against an in-process xnbd source: many concurrent unaligned writes
//! and reads race the background copy and each other's on-demand fetches; every read sees
//! the latest write or the source's bytes, and the final image is exactly the model.

use std::sync::Arc;
use std::time::{Duration, Instant};

use xnbd::backend::Backend;
use xnbd::client::Addr;
use xnbd::proxy::{Proxy, ProxyConfig};
use xnbd::server::{self, Export, Listen, Server};
use xnbd::storage::Storage;

const SIZE: usize = 8 << 20;
const TASKS: usize = 8;
const OPS: usize = 150;

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_race_background_copy() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    let mut seed = 0x1234_5678_9abc_def1u64;
    let original: Vec<u8> = (0..SIZE).map(|_| xorshift(&mut seed) as u8).collect();
    std::fs::write(&src, &original).unwrap();

    let ssock = d.path().join("src.sock");
    let source = Arc::new(Server::new(
        vec![Arc::new(Export {
            name: String::new(),
            description: String::new(),
            backend: Backend::File(Arc::new(Storage::open(&src, true).unwrap())),
            read_only: true,
        })],
        None,
        1,
        Default::default(),
        Default::default(),
    ));
    let tasks = server::start(source, &[Listen::Unix(ssock.clone())])
        .await
        .unwrap();

    let proxy = Proxy::start(ProxyConfig {
        source: Addr::Unix(ssock.clone()),
        export_name: String::new(),
        tls: None,
        cache: d.path().join("cache.img"),
        bitmap: d.path().join("cache.bitmap"),
        block_size: 4096,
        rate: 16 << 20,
        background: true,
        background_chunk: 64 << 10,
        background_depth: 4,
        source_timeout: Duration::from_secs(10),
        readahead: 32 << 10,
        readahead_max: 256 << 10,
        background_yield: true,
        demand_split: true,
        source_connections: 4,
    })
    .await
    .unwrap();

    // Each task owns a 1 MiB region for its writes and keeps a model of it.
    let region = SIZE / TASKS;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let p = proxy.clone();
        let base = t * region;
        let mut model = original[base..base + region].to_vec();
        handles.push(tokio::spawn(async move {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1);
            for i in 0..OPS {
                let off = (xorshift(&mut x) as usize) % region;
                let len = 1 + (xorshift(&mut x) as usize) % (region - off).min(20_000);
                let abs = (base + off) as u64;
                match i % 3 {
                    0 => {
                        let data: Vec<u8> = (0..len).map(|_| xorshift(&mut x) as u8).collect();
                        model[off..off + len].copy_from_slice(&data);
                        p.write(abs, data, i % 7 == 0).await.unwrap();
                    }
                    1 => {
                        p.write_zeroes(abs, len as u64, i % 2 == 0, false)
                            .await
                            .unwrap();
                        model[off..off + len].fill(0);
                    }
                    _ => {
                        let got = p.read(abs, vec![0u8; len], 0).await.unwrap();
                        assert_eq!(got, model[off..off + len], "task {t} op {i} at {abs}+{len}");
                    }
                }
            }
            model
        }));
    }
    let mut expected = Vec::with_capacity(SIZE);
    for h in handles {
        expected.extend_from_slice(&h.await.unwrap());
    }
    proxy.set_rate(0);
    proxy.cache_all();
    let end = Instant::now() + Duration::from_secs(60);
    while proxy.status().cached_blocks < proxy.status().total_blocks {
        assert!(
            Instant::now() < end,
            "copy did not finish: {:?}",
            proxy.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = proxy.status();
    // Every block became local exactly once: fetched, or written whole without a fetch.
    assert_eq!(
        st.fetched_blocks + st.written_blocks,
        st.total_blocks,
        "{st:?}"
    );
    proxy.flush().await.unwrap();
    let cache = std::fs::read(d.path().join("cache.img")).unwrap();
    assert!(cache == expected, "final image differs from the model");
    for t in tasks {
        t.abort();
    }
}
