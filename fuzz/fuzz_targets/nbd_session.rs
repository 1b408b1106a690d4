//! A whole NBD session from arbitrary client bytes: the real server (`strata_nbd::serve`)
//! on a loopback port over a real log-structured store, one connection per input that
//! sends the fuzzer's bytes and reads until the server closes. Handshake, options and
//! transmission are all in play (seeds in fuzz/seeds/nbd_session/ reach transmission).
//! The server must never panic, and must always close: a session that does not end
//! within the deadline after its input ended is a failure.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use strata_io::{GroupSync, Store, VolumeId};
use strata_nbd::{Client, Export, ExportProvider, ExportSummary, Options, Refusal};

/// How long the server may take to close a session whose client has sent everything.
const CLOSE_DEADLINE: Duration = Duration::from_secs(5);
const VOLUME_BYTES: u64 = 1 << 20;

struct Provider {
    volume: Arc<dyn strata_io::BlockVolume>,
    group_sync: GroupSync,
}

impl ExportProvider for Provider {
    fn list(&self, _: &Client) -> Vec<ExportSummary> {
        vec![ExportSummary { name: "fuzz".into(), description: "fuzzed".into() }]
    }

    fn open(&self, name: &str, _: &Client) -> Result<Export, Refusal> {
        if name != "fuzz" && name != "ro" {
            return Err(Refusal::Unknown(format!("no export {name:?}")));
        }
        Ok(Export {
            name: name.into(),
            description: "fuzzed".into(),
            volume: self.volume.clone(),
            group_sync: self.group_sync.clone(),
            read_only: name == "ro",
            closed: tokio::sync::watch::channel(false).1,
            attachment: Box::new(()),
        })
    }
}

/// The server's address, started once per process.
fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let dir = std::env::temp_dir().join(format!("strata-fuzz-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&dir);
                let store = strata_store::LogStore::open(&dir).expect("a store");
                let volume = store.create_volume(VolumeId(1), VOLUME_BYTES).expect("a volume");
                let group_sync = GroupSync::spawn(volume.clone());
                let provider = Arc::new(Provider { volume, group_sync });
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                tx.send(listener.local_addr().expect("addr")).expect("send");
                let (_stop, stop) = tokio::sync::watch::channel(false);
                strata_nbd::serve(listener, provider, Options::default(), stop).await;
            });
        });
        rx.recv().expect("the server starts")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut stream = TcpStream::connect(server()).expect("connect");
    stream.set_read_timeout(Some(CLOSE_DEADLINE)).expect("timeout");
    // The server may close early (a refusal): a failed write is part of the game.
    let _ = stream.write_all(data);
    let _ = stream.shutdown(Shutdown::Write);
    let mut sink = [0u8; 64 << 10];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server did not close the session: {e}"),
        }
    }
});
