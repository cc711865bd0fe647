//! Password hashing on a fixed set of threads, each with its own argon2 memory.
//!
//! argon2id with the crate's defaults needs 19 MiB per hash. Hashing on tokio's blocking pool
//! let a burst of logins run one hash per request at once (100 concurrent logins: 1.4 GB
//! resident, kept by the allocator afterwards). Here at most one hash per thread runs — one
//! thread per core, since a hash keeps a core busy — and each thread hands argon2 the same
//! buffer every time (`hash_password_into_with_memory`), so the memory is allocated once and
//! stays flat whatever the load. Requests queue; a queue that is too long is refused at once
//! rather than growing without bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::oneshot;

use crate::error::{Error, Kind, Result};

/// Largest argon2 memory a stored hash may ask for (its `m` parameter, in KiB): hashes are
/// ours, but a corrupted or hostile record must not make a thread allocate gigabytes.
const MAX_M_COST_KIB: u32 = 256 * 1024;

enum Job {
    Hash {
        password: String,
        reply: oneshot::Sender<Result<String>>,
    },
    Verify {
        password: String,
        hash: String,
        reply: oneshot::Sender<bool>,
    },
}

/// The hashing threads and their queue. Cheap to share (`Arc`).
pub struct PasswordPool {
    jobs: Mutex<std_mpsc::Sender<Job>>,
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    threads: usize,
}

impl PasswordPool {
    /// `threads` hashing threads (at least one); at most `max_queued` requests wait.
    pub fn new(threads: usize, max_queued: usize) -> std::io::Result<PasswordPool> {
        let threads = threads.max(1);
        let (tx, rx) = std_mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let queued = Arc::new(AtomicUsize::new(0));
        for n in 0..threads {
            let rx = rx.clone();
            let queued = queued.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{n}"))
                .spawn(move || worker(&rx, &queued))?;
        }
        Ok(PasswordPool {
            jobs: Mutex::new(tx),
            queued,
            max_queued: max_queued.max(threads),
            threads,
        })
    }

    /// One thread per core.
    pub fn per_core() -> std::io::Result<PasswordPool> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        PasswordPool::new(cores, 1024)
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    fn submit(&self, job: Job) -> Result<()> {
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(busy());
        }
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job);
        if sent.is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::internal("the password hashing threads are gone"));
        }
        Ok(())
    }

    /// argon2id (the crate's defaults: m=19 MiB, t=2, p=1) as a PHC string.
    pub async fn hash(&self, password: &str) -> Result<String> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Hash {
            password: password.to_string(),
            reply,
        })?;
        rx.await
            .map_err(|_| Error::internal("a password hashing thread stopped"))?
    }

    /// Whether `password` matches the PHC string `hash` (false for a malformed hash).
    pub async fn verify(&self, password: &str, hash: &str) -> Result<bool> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Verify {
            password: password.to_string(),
            hash: hash.to_string(),
            reply,
        })?;
        rx.await
            .map_err(|_| Error::internal("a password hashing thread stopped"))
    }
}

fn busy() -> Error {
    Error {
        retry_after: Some(2),
        ..Error::new(
            Kind::Unavailable,
            "busy",
            "too many sign-ins are being checked right now; try again in a moment",
        )
    }
}

fn worker(rx: &Mutex<std_mpsc::Receiver<Job>>, queued: &AtomicUsize) {
    // A hash keeps its core busy for tens of milliseconds; at a lower priority the threads
    // that answer requests (and `/health`) still get the cores at once during a burst.
    // SAFETY: setpriority on this thread's own id; failure only leaves the priority as it is.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
    }
    let mut memory: Vec<Block> = Vec::new();
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        match job {
            Job::Hash { password, reply } => {
                let result = hash_with(&mut memory, password.as_bytes());
                let _ = reply.send(result);
            }
            Job::Verify {
                password,
                hash,
                reply,
            } => {
                let ok = verify_with(&mut memory, password.as_bytes(), &hash);
                let _ = reply.send(ok);
            }
        }
        queued.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The first `n` blocks of the thread's buffer, grown (once) when a hash needs more.
fn blocks(memory: &mut Vec<Block>, n: usize) -> &mut [Block] {
    if memory.len() < n {
        memory.resize(n, Block::default());
    }
    &mut memory[..n]
}

pub fn hash_with(memory: &mut Vec<Block>, password: &[u8]) -> Result<String> {
    let fail = |e: &dyn std::fmt::Display| Error::internal(format!("hashing a password: {e}"));
    let params = Params::default();
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    let mut salt_buf = [0u8; 64];
    let salt_bytes = salt
        .as_salt()
        .decode_b64(&mut salt_buf)
        .map_err(|e| fail(&e))?;
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    argon
        .hash_password_into_with_memory(
            password,
            salt_bytes,
            &mut out,
            blocks(memory, params.block_count()),
        )
        .map_err(|e| fail(&e))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(|e| fail(&e))?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(|e| fail(&e))?),
    };
    Ok(phc.to_string())
}

pub fn verify_with(memory: &mut Vec<Block>, password: &[u8], hash: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let (Ok(algorithm), Some(salt), Some(expected)) = (
        Algorithm::try_from(parsed.algorithm),
        parsed.salt,
        parsed.hash,
    ) else {
        return false;
    };
    let version = match parsed.version.map(Version::try_from).transpose() {
        Ok(v) => v.unwrap_or_default(),
        Err(_) => return false,
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    if params.m_cost() > MAX_M_COST_KIB {
        return false;
    }
    let mut salt_buf = [0u8; 64];
    let Ok(salt_bytes) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let mut out = vec![0u8; expected.len()];
    let argon = Argon2::new(algorithm, version, params.clone());
    if argon
        .hash_password_into_with_memory(
            password,
            salt_bytes,
            &mut out,
            blocks(memory, params.block_count()),
        )
        .is_err()
    {
        return false;
    }
    // `Output`'s equality is constant-time.
    Output::new(&out).is_ok_and(|computed| computed == expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordVerifier;

    #[test]
    fn our_hashes_are_the_crates_argon2id_both_ways() {
        let mut mem = Vec::new();
        let h = hash_with(&mut mem, b"correct horse").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        // The crate verifies ours…
        let parsed = PasswordHash::new(&h).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .is_ok()
        );
        // …and we verify the crate's (hashes stored by earlier versions).
        use argon2::PasswordHasher;
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        let theirs = Argon2::default()
            .hash_password(b"battery staple", &salt)
            .unwrap()
            .to_string();
        assert!(verify_with(&mut mem, b"battery staple", &theirs));
        assert!(!verify_with(&mut mem, b"battery stapler", &theirs));
        assert!(verify_with(&mut mem, b"correct horse", &h));
        assert!(!verify_with(&mut mem, b"wrong horse", &h));
        assert!(!verify_with(&mut mem, b"x", "not a hash"));
        assert!(
            !verify_with(
                &mut mem,
                b"x",
                "$argon2id$v=19$m=4000000,t=1,p=1$c2FsdHNhbHQ$aGFzaA"
            ),
            "absurd memory is refused, not allocated"
        );
        assert_eq!(mem.len(), Params::DEFAULT_M_COST as usize, "one buffer");
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_at_once() {
        let pool = PasswordPool::new(1, 2).unwrap();
        let pool = Arc::new(pool);
        let mut handles = Vec::new();
        for _ in 0..12 {
            let pool = pool.clone();
            handles.push(tokio::spawn(async move { pool.hash("password1").await }));
        }
        let mut busy = 0;
        let mut ok = 0;
        for h in handles {
            match h.await.unwrap() {
                Ok(_) => ok += 1,
                Err(e) if e.code == "busy" => busy += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(ok >= 2 && busy >= 1, "ok {ok}, busy {busy}");
        assert_eq!(ok + busy, 12);
    }
}
