//! What a batch of writes saves: µs per 4 KiB write through `LogStore`, 32 writes one by
//! one (`write_at` each) against one `write_many` of the same 32, into the page cache (no
//! sync inside the timing; one after each run). Run in release mode on the file system
//! the store will use (not tmpfs):
//!
//! ```text
//! cargo run --release -p strata-store --example batchbench -- DIR [ROUNDS] [REPEATS]
//! ```
//! Each repeat opens a fresh store in DIR/batchbench (removed afterwards) and prints one
//! line per mode: mode, writes, µs per write.

use std::time::Instant;
use strata_io::sim::SimRng;
use strata_io::{BlockVolume, Store, VolumeId};
use strata_store::store::LogStore;

/// Writes per batch.
const BATCH: usize = 32;
const BLOCK: usize = 4096;
/// The volume's size: the writes land at random blocks of it.
const VOLUME_BYTES: u64 = 1 << 30;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        eprintln!("usage: batchbench DIR [ROUNDS] [REPEATS]");
        std::process::exit(2);
    };
    let number = |i: usize, default: usize| args.get(i).map_or(default, |a| a.parse().unwrap());
    let (rounds, repeats) = (number(1, 2000), number(2, 3));
    let path = std::path::Path::new(dir).join("batchbench");
    for repeat in 0..repeats {
        for batched in [false, true] {
            let _ = std::fs::remove_dir_all(&path);
            let store = LogStore::open(&path).expect("open the store");
            let volume = store.create_volume(VolumeId(1), VOLUME_BYTES).expect("create");
            let micros = run(&*volume, rounds, batched, repeat as u64);
            let mode = if batched { "write_many" } else { "one_by_one" };
            println!("{mode} {} {micros:.2}", rounds * BATCH);
            // Written back before the next run, so that it does not pay for this one's.
            store.sync().expect("sync");
            drop(volume);
            drop(store);
        }
    }
    let _ = std::fs::remove_dir_all(&path);
}

/// Writes `rounds` rounds of 32 blocks at random places; returns µs per write.
fn run(volume: &dyn BlockVolume, rounds: usize, batched: bool, seed: u64) -> f64 {
    let mut rng = SimRng::new(seed);
    let data: Vec<Vec<u8>> = (0..BATCH).map(|i| vec![i as u8 + 1; BLOCK]).collect();
    let blocks = VOLUME_BYTES / BLOCK as u64;
    let started = Instant::now();
    for _ in 0..rounds {
        let writes: Vec<(u64, &[u8])> =
            data.iter().map(|d| (rng.below(blocks) * BLOCK as u64, &d[..])).collect();
        if batched {
            volume.write_many(&writes).expect("write_many");
        } else {
            for (offset, d) in &writes {
                volume.write_at(d, *offset).expect("write_at");
            }
        }
    }
    started.elapsed().as_secs_f64() * 1e6 / (rounds * BATCH) as f64
}
