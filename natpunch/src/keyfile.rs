//! The identity key file: where a peer keeps the seed of its Ed25519
//! [`Identity`], and how it is created on first use.
//!
//! The file is one line, `natpunch-ed25519-v1 <64 hex digits of the seed>`,
//! so that a person can tell what it is, back it up or move it, and so that
//! a later key type or layout gets a new prefix instead of being misread.
//!
//! Why it is this careful:
//! - **Whoever reads the file is the peer**: the rendezvous server accepts a
//!   peer ID only with a signature by its key. So, like OpenSSH with private
//!   keys, we refuse a file that group or others can access (any bit of
//!   `0o077`) instead of warning, and tell the user the `chmod` that fixes it.
//! - **Creation is atomic and never overwrites**: the line is written and
//!   synced to a fresh temporary file (`O_CREAT|O_EXCL`, mode 0600), which is
//!   then hard-linked to the final name; `link(2)` fails if the name exists.
//!   A crash leaves no half-written key, and two processes starting at once
//!   end up with the same key (the loser loads the winner's). On file
//!   systems without hard links we fall back to `O_EXCL` on the final name.
//! - **Errors never carry key material**: [`MalformedReason`] names what is
//!   wrong (and where), not what the file contains. Buffers holding the seed
//!   are wiped on drop.
//!
//! Fatal vs retryable: every [`KeyFileError`] is fatal for the caller's
//! start-up; none is fixed by retrying without user action, except
//! [`KeyFileError::Random`], which only a broken OS produces.

use std::ffi::{OsStr, OsString};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use data_encoding::{HEXLOWER, HEXLOWER_PERMISSIVE};
use natpunch_proto::identity::Identity;
use zeroize::Zeroizing;

/// Environment variable naming the key file; it overrides the XDG location
/// (handy for running several peers on one machine and in tests).
pub const KEY_PATH_ENV: &str = "NATPUNCH_KEY";
/// First word of the key line: the key type and file layout version.
pub const KEY_FILE_PREFIX: &str = "natpunch-ed25519-v1";
/// Bytes in an Ed25519 seed (RFC 8032 §5.1.5).
const SEED_LEN: usize = 32;
/// Hex digits of the seed in the file.
const SEED_HEX_LEN: usize = 2 * SEED_LEN;
/// The whole file as we write it: prefix, space, hex, newline (85 bytes).
const LINE_LEN: usize = KEY_FILE_PREFIX.len() + 1 + SEED_HEX_LEN + 1;
/// Most bytes we read from a key file. A key line is 85 bytes; anything
/// much longer is not a key file, and is neither read whole nor kept.
const MAX_FILE_LEN: usize = 1024;
/// Mode of a new key file: owner read/write only, as OpenSSH writes keys.
const FILE_MODE: u32 = 0o600;
/// Mode of directories we create for the key file: owner only, so the
/// file name and its siblings (temporary files) are private too.
const DIR_MODE: u32 = 0o700;
/// Permission bits that must be clear on an existing key file: any access
/// by group or others (OpenSSH refuses private keys the same way).
const FORBIDDEN_MODE_BITS: u32 = 0o077;

/// Why the key file could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    #[error("key file {} does not exist", path.display())]
    NotFound { path: PathBuf },
    #[error("cannot read key file {}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot create directory {} for the key file", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot write key file {}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("the OS gave no randomness for a new key")]
    Random { source: getrandom::Error },
    #[error(
        "key file {p} can be accessed by group or others (mode {mode:03o}); \
         run `chmod 600 {p}`",
        p = path.display()
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {} is not a natpunch key: {reason}", path.display())]
    Malformed {
        path: PathBuf,
        reason: MalformedReason,
    },
}

/// What is wrong with a key file's contents. Never includes the contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MalformedReason {
    #[error("it is not a regular file")]
    NotARegularFile,
    #[error("it is empty")]
    Empty,
    #[error("it is longer than {max} bytes", max = MAX_FILE_LEN)]
    TooLong,
    #[error("it has more than one line")]
    ExtraLines,
    #[error("it does not start with `{KEY_FILE_PREFIX} `")]
    WrongPrefix,
    #[error("the key has {len} characters, expected {SEED_HEX_LEN} hex digits")]
    WrongHexLength { len: usize },
    #[error("key character {position} is not a hex digit")]
    NotHex { position: usize },
}

/// Where the key lives unless the user says otherwise: `$NATPUNCH_KEY`,
/// else `$XDG_CONFIG_HOME/natpunch/key`, else `$HOME/.config/natpunch/key`
/// (XDG Base Directory spec; an empty or relative `XDG_CONFIG_HOME` is
/// ignored, as the spec requires). `None` when none of them is set.
pub fn default_key_path() -> Option<PathBuf> {
    key_path_from(|name| std::env::var_os(name))
}

fn key_path_from(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let var = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(path) = var(KEY_PATH_ENV) {
        return Some(path);
    }
    if let Some(config) = var("XDG_CONFIG_HOME").filter(|p| p.is_absolute()) {
        return Some(config.join("natpunch").join("key"));
    }
    var("HOME").map(|home| home.join(".config").join("natpunch").join("key"))
}

/// Loads the identity at `path`, creating a new random one (and the missing
/// parent directories) if there is no file. The `bool` is `true` when the
/// key was created by this call.
pub fn load_or_create(path: &Path) -> Result<(Identity, bool), KeyFileError> {
    match load(path) {
        Ok(identity) => Ok((identity, false)),
        Err(KeyFileError::NotFound { .. }) => match create(path)? {
            Some(identity) => {
                tracing::info!(
                    path = %path.display(),
                    peer_id = %identity.peer_id(),
                    "created a new identity key"
                );
                Ok((identity, true))
            }
            // Another process created it between our load and our link.
            None => Ok((load(path)?, false)),
        },
        Err(e) => Err(e),
    }
}

/// Loads the identity at `path`; never creates anything.
pub fn load(path: &Path) -> Result<Identity, KeyFileError> {
    let read_err = |source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    };
    let malformed = |reason| KeyFileError::Malformed {
        path: path.to_owned(),
        reason,
    };
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(KeyFileError::NotFound {
                path: path.to_owned(),
            })
        }
        Err(e) => return Err(read_err(e)),
    };
    // Checked on the open file, so the file we read is the file we checked.
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(malformed(MalformedReason::NotARegularFile));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & FORBIDDEN_MODE_BITS != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    // One byte more than allowed, to tell "exactly full" from "too long".
    let mut buf = Zeroizing::new([0u8; MAX_FILE_LEN + 1]);
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_err(e)),
        }
    }
    if len > MAX_FILE_LEN {
        return Err(malformed(MalformedReason::TooLong));
    }
    let seed = parse(&buf[..len]).map_err(malformed)?;
    Ok(Identity::from_seed(*seed))
}

/// Parses the file contents: one line, with or without its final newline.
fn parse(contents: &[u8]) -> Result<Zeroizing<[u8; SEED_LEN]>, MalformedReason> {
    if contents.is_empty() {
        return Err(MalformedReason::Empty);
    }
    let line = contents.strip_suffix(b"\n").unwrap_or(contents);
    if line.contains(&b'\n') {
        return Err(MalformedReason::ExtraLines);
    }
    let hex = line
        .strip_prefix(KEY_FILE_PREFIX.as_bytes())
        .and_then(|rest| rest.strip_prefix(b" "))
        .ok_or(MalformedReason::WrongPrefix)?;
    if hex.len() != SEED_HEX_LEN {
        return Err(MalformedReason::WrongHexLength { len: hex.len() });
    }
    let mut seed = Zeroizing::new([0u8; SEED_LEN]);
    HEXLOWER_PERMISSIVE
        .decode_mut(hex, &mut *seed)
        .map_err(|partial| MalformedReason::NotHex {
            position: partial.error.position,
        })?;
    Ok(seed)
}

/// The file contents for `seed`.
fn render(seed: &[u8; SEED_LEN]) -> Zeroizing<[u8; LINE_LEN]> {
    let mut line = Zeroizing::new([0u8; LINE_LEN]);
    let (prefix, rest) = line.split_at_mut(KEY_FILE_PREFIX.len());
    prefix.copy_from_slice(KEY_FILE_PREFIX.as_bytes());
    rest[0] = b' ';
    // Lengths are constants pinned by the `render_parse_round_trip` test.
    HEXLOWER.encode_mut(seed, &mut rest[1..=SEED_HEX_LEN]);
    rest[SEED_HEX_LEN + 1] = b'\n';
    line
}

/// Creates a new key at `path`. `None` if a file appeared there meanwhile
/// (it is left untouched).
fn create(path: &Path) -> Result<Option<Identity>, KeyFileError> {
    let write_err = |source| KeyFileError::Write {
        path: path.to_owned(),
        source,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(parent)
        .map_err(|source| KeyFileError::CreateDir {
            path: parent.to_owned(),
            source,
        })?;

    let mut seed = Zeroizing::new([0u8; SEED_LEN]);
    getrandom::fill(&mut *seed).map_err(|source| KeyFileError::Random { source })?;
    let line = render(&seed);

    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|source| KeyFileError::Random { source })?;
    let mut tmp_name = OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_else(|| OsStr::new("key")));
    tmp_name.push(format!(".tmp-{:016x}", u64::from_le_bytes(nonce)));
    let tmp = parent.join(tmp_name);

    write_new(&tmp, &line[..]).map_err(write_err)?;
    let linked = fs::hard_link(&tmp, path);
    // The temporary name is only a staging area; a leftover is harmless
    // (mode 0600 in our 0700 directory), so a failure here is not fatal.
    if let Err(e) = fs::remove_file(&tmp) {
        tracing::warn!(path = %tmp.display(), error = %e, "cannot remove temporary key file");
    }
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(None),
        Err(e) => {
            tracing::debug!(error = %e, "hard link failed; creating the key file in place");
            match write_new(path, &line[..]) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(None),
                Err(e) => return Err(write_err(e)),
            }
        }
    }
    // Make the new directory entry durable; best effort, as not every
    // platform lets a directory be opened and synced.
    if let Ok(dir) = File::open(parent) {
        let _ = dir.sync_all();
    }
    Ok(Some(Identity::from_seed(*seed)))
}

/// Writes `contents` to a file that must not exist yet, mode 0600, synced.
/// Removes the file again if writing fails.
fn write_new(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    if written.is_err() {
        let _ = fs::remove_file(path);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "natpunch-keyfile-{}-{}-{name}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn write_with_mode(path: &Path, contents: &[u8], mode: u32) {
        fs::write(path, contents).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    const SEED_HEX: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";

    #[test]
    fn create_then_load_gives_the_same_identity() {
        let dir = TempDir::new("create");
        let path = dir.0.join("key");
        let (created, was_created) = load_or_create(&path).unwrap();
        assert!(was_created);
        let (again, was_created) = load_or_create(&path).unwrap();
        assert!(!was_created);
        assert_eq!(created.peer_id(), again.peer_id());
        assert_eq!(load(&path).unwrap().peer_id(), created.peer_id());

        let contents = fs::read_to_string(&path).unwrap();
        let hex: String = created.seed().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(contents, format!("{KEY_FILE_PREFIX} {hex}\n"));
        assert_eq!(mode(&path), FILE_MODE);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 1);
    }

    #[test]
    fn missing_parent_directories_are_created_private() {
        let dir = TempDir::new("parents");
        let path = dir.0.join("a").join("b").join("key");
        let (_, created) = load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(mode(&path), FILE_MODE);
        // Umask can only clear bits of 0700.
        assert_eq!(mode(&dir.0.join("a")) & !DIR_MODE, 0);
        assert_eq!(mode(&dir.0.join("a").join("b")) & !DIR_MODE, 0);
    }

    #[test]
    fn two_creations_do_not_clobber() {
        let dir = TempDir::new("race");
        let path = dir.0.join("key");
        let first = create(&path).unwrap().unwrap();
        assert!(create(&path).unwrap().is_none());
        assert_eq!(load(&path).unwrap().peer_id(), first.peer_id());
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 1);
    }

    #[test]
    fn load_reads_a_known_key() {
        let dir = TempDir::new("known");
        let path = dir.0.join("key");
        // Upper-case hex and a missing final newline are accepted.
        let line = format!("{KEY_FILE_PREFIX} {}", SEED_HEX.to_uppercase());
        write_with_mode(&path, line.as_bytes(), 0o600);
        let id = load(&path).unwrap();
        assert_eq!(
            id.peer_id().to_string(),
            "25njqamcweflpvkl73j4szahhihoc4xt3ktcgjnpaingr5yhkenexmq"
        );
        // 0400 is fine too.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(load(&path).is_ok());
    }

    #[test]
    fn group_or_other_access_is_refused() {
        let dir = TempDir::new("perms");
        let path = dir.0.join("key");
        let line = format!("{KEY_FILE_PREFIX} {SEED_HEX}\n");
        for bad in [0o644, 0o640, 0o604, 0o660, 0o610] {
            write_with_mode(&path, line.as_bytes(), bad);
            let err = load_or_create(&path).unwrap_err();
            assert!(
                matches!(&err, KeyFileError::Permissions { mode, .. } if *mode == bad),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("chmod 600 {}", path.display())),
                "{msg}"
            );
            assert!(!msg.contains(SEED_HEX));
        }
    }

    #[test]
    fn malformed_contents_are_refused() {
        let dir = TempDir::new("malformed");
        let path = dir.0.join("key");
        let good = format!("{KEY_FILE_PREFIX} {SEED_HEX}");
        let cases: Vec<(Vec<u8>, MalformedReason)> = vec![
            (b"".to_vec(), MalformedReason::Empty),
            (b"garbage\n".to_vec(), MalformedReason::WrongPrefix),
            (vec![0xff; 40], MalformedReason::WrongPrefix),
            (
                format!("natpunch-ed25519-v2 {SEED_HEX}\n").into_bytes(),
                MalformedReason::WrongPrefix,
            ),
            (
                format!("{KEY_FILE_PREFIX}{SEED_HEX}\n").into_bytes(),
                MalformedReason::WrongPrefix,
            ),
            (
                format!("{KEY_FILE_PREFIX} {}\n", &SEED_HEX[..63]).into_bytes(),
                MalformedReason::WrongHexLength { len: 63 },
            ),
            (
                format!("{KEY_FILE_PREFIX} {SEED_HEX}00\n").into_bytes(),
                MalformedReason::WrongHexLength { len: 66 },
            ),
            (
                format!("{KEY_FILE_PREFIX} \n").into_bytes(),
                MalformedReason::WrongHexLength { len: 0 },
            ),
            (
                format!("{good}\r\n").into_bytes(),
                MalformedReason::WrongHexLength { len: 65 },
            ),
            (
                format!("{KEY_FILE_PREFIX} {}g\n", &SEED_HEX[..63]).into_bytes(),
                MalformedReason::NotHex { position: 63 },
            ),
            (
                format!("{good}\n\n").into_bytes(),
                MalformedReason::ExtraLines,
            ),
            (
                format!("{good}\n{good}\n").into_bytes(),
                MalformedReason::ExtraLines,
            ),
            (vec![b'a'; MAX_FILE_LEN + 1], MalformedReason::TooLong),
        ];
        for (contents, reason) in cases {
            write_with_mode(&path, &contents, 0o600);
            let err = load_or_create(&path).unwrap_err();
            assert!(
                matches!(&err, KeyFileError::Malformed { reason: r, .. } if *r == reason),
                "{:?}: {err:?}",
                String::from_utf8_lossy(&contents)
            );
            // The key is never echoed, in Display or Debug.
            assert!(!err.to_string().contains(&SEED_HEX[..16]));
            assert!(!format!("{err:?}").contains(&SEED_HEX[..16]));
            // And the file was not replaced.
            assert_eq!(fs::read(&path).unwrap(), contents);
        }
    }

    #[test]
    fn a_directory_is_not_a_key() {
        let dir = TempDir::new("dir");
        let err = load(&dir.0).unwrap_err();
        assert!(
            matches!(
                &err,
                KeyFileError::Malformed {
                    reason: MalformedReason::NotARegularFile,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn load_does_not_create() {
        let dir = TempDir::new("nocreate");
        let path = dir.0.join("sub").join("key");
        assert!(matches!(load(&path), Err(KeyFileError::NotFound { .. })));
        assert!(!dir.0.join("sub").exists());
    }

    #[test]
    fn render_parse_round_trip() {
        let seed = [0xa5; SEED_LEN];
        let line = render(&seed);
        assert_eq!(line.len(), 85);
        assert_eq!(*parse(&line[..]).unwrap(), seed);
    }

    #[test]
    fn default_path_precedence() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let all = env(&[
            ("NATPUNCH_KEY", "/k/key"),
            ("XDG_CONFIG_HOME", "/xdg"),
            ("HOME", "/home/u"),
        ]);
        assert_eq!(key_path_from(all), Some(PathBuf::from("/k/key")));
        let xdg = env(&[("XDG_CONFIG_HOME", "/xdg"), ("HOME", "/home/u")]);
        assert_eq!(key_path_from(xdg), Some(PathBuf::from("/xdg/natpunch/key")));
        let home = env(&[("HOME", "/home/u")]);
        assert_eq!(
            key_path_from(home),
            Some(PathBuf::from("/home/u/.config/natpunch/key"))
        );
        // Empty values count as unset; a relative XDG_CONFIG_HOME is invalid.
        let empty = env(&[
            ("NATPUNCH_KEY", ""),
            ("XDG_CONFIG_HOME", "rel"),
            ("HOME", "/home/u"),
        ]);
        assert_eq!(
            key_path_from(empty),
            Some(PathBuf::from("/home/u/.config/natpunch/key"))
        );
        assert_eq!(key_path_from(env(&[])), None);
    }
}
