//! A short, seeded run of the fuzz entry points in `pgmux::fuzzing`: valid inputs, random
//! mutations of them, and random bytes. Each entry point must return without panicking;
//! a panic fails the test with the input that caused it. Long runs use `cargo fuzz` (see
//! README, "Fuzzing"); this run is bounded in count and time and repeats exactly.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::message::frontend;

/// xorshift64*: a fixed seed, so every run tries the same inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.below(max + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// A copy of `seed` with a few random edits: flipped, inserted, removed or
    /// duplicated bytes, or a cut.
    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut out = seed.to_vec();
        for _ in 0..1 + self.below(4) {
            let at = self.below(out.len() + 1);
            match self.below(5) {
                0 if !out.is_empty() => {
                    let i = self.below(out.len());
                    out[i] ^= 1 << self.below(8);
                }
                1 => out.insert(at, self.next() as u8),
                2 if at < out.len() => {
                    out.remove(at);
                }
                3 if at < out.len() => {
                    let end = (at + 1 + self.below(16)).min(out.len());
                    let piece = out[at..end].to_vec();
                    out.splice(at..at, piece);
                }
                _ => out.truncate(at),
            }
        }
        out
    }
}

/// Runs `entry` on `seeds`, their mutations and random bytes, at most `count` times
/// and for at most `limit`.
fn fuzz(name: &str, entry: fn(&[u8]), seeds: &[Vec<u8>], count: usize, limit: Duration) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
    let start = Instant::now();
    let mut runs = 0;
    for seed in seeds {
        entry(seed);
        runs += 1;
    }
    while runs < count && start.elapsed() < limit {
        let input = if rng.below(4) == 0 || seeds.is_empty() {
            rng.bytes(256)
        } else {
            let seed = &seeds[rng.below(seeds.len())];
            rng.mutate(seed)
        };
        let result = std::panic::catch_unwind(|| entry(&input));
        assert!(result.is_ok(), "{name} panicked on input {input:02x?}");
        runs += 1;
    }
    assert!(runs >= seeds.len(), "{name}: no input ran");
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn frontend_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for sql in [
        "SELECT 1",
        "BEGIN READ ONLY",
        "SET search_path = a, b",
        "DEALLOCATE ALL",
        "DISCARD ALL",
        "SELECT * FROM t WHERE id = $1 FOR UPDATE",
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
        "start transaction isolation level serializable, read only",
    ] {
        let mut buf = BytesMut::new();
        frontend::query(sql, &mut buf).unwrap();
        seeds.push(buf.to_vec());
        let mut buf = BytesMut::new();
        frontend::parse("s1", sql, std::iter::empty(), &mut buf).unwrap();
        frontend::describe(b'S', "s1", &mut buf).unwrap();
        frontend::sync(&mut buf);
        frontend::close(b'S', "s1", &mut buf).unwrap();
        frontend::sync(&mut buf);
        seeds.push(buf.to_vec());
    }
    seeds
}

#[test]
fn startup_packets() {
    let mut startup = Vec::new();
    startup.extend_from_slice(&196608i32.to_be_bytes());
    for part in ["user", "app", "database", "db", "options", "-c a=b --c-d=e"] {
        startup.extend_from_slice(part.as_bytes());
        startup.push(0);
    }
    startup.push(0);
    let seeds = vec![
        startup,
        80877103i32.to_be_bytes().to_vec(),
        80877104i32.to_be_bytes().to_vec(),
        [
            80877102i32.to_be_bytes(),
            7i32.to_be_bytes(),
            9i32.to_be_bytes(),
        ]
        .concat(),
        [196609i32.to_be_bytes().as_slice(), b"_pq_.x\0y\0\0"].concat(),
    ];
    fuzz(
        "startup",
        pgmux::fuzzing::startup_packet,
        &seeds,
        20_000,
        Duration::from_secs(2),
    );
}

#[test]
fn scram_exchanges() {
    let seeds = vec![
        b"\x00n,,n=,r=abcdefghijklmnopqrstuvwx\xffc=biws,r=abcdefghijklmnopqrstuvwxyz,p=AAAA"
            .to_vec(),
        b"\x01y,,n=,r=nonce\xffc=eSws,r=nonce1234,p=".to_vec(),
        b"\x02p=tls-server-end-point,,n=,r=nonce\xffc=cD10bHMtc2VydmVyLWVuZC1wb2ludCws,r=x,p=Zg=="
            .to_vec(),
        b"\x00n,a=someone,n=user,r=\xff".to_vec(),
    ];
    fuzz(
        "scram",
        pgmux::fuzzing::scram_exchange,
        &seeds,
        5_000,
        Duration::from_secs(2),
    );
}

#[test]
fn frontend_message_streams() {
    fuzz(
        "frontend",
        pgmux::fuzzing::frontend_messages,
        &frontend_seeds(),
        5_000,
        Duration::from_secs(3),
    );
}

#[test]
fn relay_conversations() {
    let ready = message(b'Z', b"I");
    let in_tx = message(b'Z', b"T");
    let complete = message(b'C', b"SELECT 1\0");
    let row = message(b'D', &[0, 1, 0, 0, 0, 1, b'1']);
    let error = message(b'E', b"SERROR\0C25006\0Mread-only\0\0");
    let mut seeds = Vec::new();
    for client in frontend_seeds() {
        for server in [
            [complete.clone(), ready.clone()].concat(),
            [
                b"1".to_vec(),
                vec![0, 0, 0, 4],
                b"t".to_vec(),
                vec![0, 0, 0, 6, 0, 0],
                ready.clone(),
            ]
            .concat(),
            [row.clone(), complete.clone(), in_tx.clone()].concat(),
            [error.clone(), ready.clone()].concat(),
        ] {
            seeds.push([client.clone(), vec![0xff, 0xff], server].concat());
        }
    }
    fuzz(
        "relay",
        pgmux::fuzzing::relay_conversation,
        &seeds,
        400,
        Duration::from_secs(6),
    );
}
