//! Helpers shared by the limit and TLS tests: a raw NBD client generic over its stream (so the
//! same client runs over plaintext and, after STARTTLS, over TLS), a test PKI made at test time
//! (no private key is committed), a log capture, and the skip-or-fail rule for external tools.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use twinblock_nbd::proto::*;

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A raw NBD client on any stream.
pub struct Raw<S> {
    pub s: S,
}

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

impl OptReply {
    pub fn message(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// What `NBD_OPT_GO` reported.
#[derive(Debug, Default)]
pub struct GoInfo {
    pub size: u64,
    pub flags: u16,
    pub block: Option<(u32, u32, u32)>,
}

pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    /// Reads the greeting and sends fixed-newstyle + no-zeroes client flags.
    pub async fn start(mut s: S) -> Raw<S> {
        let mut greet = [0u8; 18];
        tokio::time::timeout(TIMEOUT, s.read_exact(&mut greet))
            .await
            .expect("greeting in time")
            .expect("greeting");
        assert_eq!(&greet[0..8], &NBD_MAGIC.to_be_bytes());
        s.write_u32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
            .await
            .unwrap();
        Raw { s }
    }

    pub async fn option(&mut self, option: u32, data: &[u8]) {
        let h = OptionHeader {
            option,
            len: data.len() as u32,
        };
        self.s.write_all(&h.encode()).await.unwrap();
        self.s.write_all(data).await.unwrap();
        self.s.flush().await.unwrap();
    }

    pub async fn option_reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        tokio::time::timeout(TIMEOUT, self.s.read_exact(&mut h))
            .await
            .expect("option reply in time")
            .expect("option reply");
        assert_eq!(&h[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).await.unwrap();
        OptReply {
            option: u32::from_be_bytes(h[8..12].try_into().unwrap()),
            kind: u32::from_be_bytes(h[12..16].try_into().unwrap()),
            data,
        }
    }

    /// Sends GO (asking for block sizes); `Ok` with what it reported, or the final error reply.
    pub async fn go(&mut self, name: &str) -> Result<GoInfo, OptReply> {
        self.option(NBD_OPT_GO, &info_data(name, &[NBD_INFO_BLOCK_SIZE]))
            .await;
        let mut info = GoInfo::default();
        loop {
            let r = self.option_reply().await;
            match r.kind {
                NBD_REP_INFO => {
                    let d = &r.data;
                    match u16::from_be_bytes([d[0], d[1]]) {
                        NBD_INFO_EXPORT => {
                            info.size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                            info.flags = u16::from_be_bytes([d[10], d[11]]);
                        }
                        NBD_INFO_BLOCK_SIZE => {
                            let at = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
                            info.block = Some((at(2), at(6), at(10)));
                        }
                        _ => {}
                    }
                }
                NBD_REP_ACK => return Ok(info),
                _ => return Err(r),
            }
        }
    }

    /// `NBD_OPT_LIST`: the export names.
    pub async fn list(&mut self) -> Result<Vec<String>, OptReply> {
        self.option(NBD_OPT_LIST, &[]).await;
        let mut names = Vec::new();
        loop {
            let r = self.option_reply().await;
            match r.kind {
                NBD_REP_SERVER => {
                    let n = u32::from_be_bytes(r.data[0..4].try_into().unwrap()) as usize;
                    names.push(String::from_utf8(r.data[4..4 + n].to_vec()).unwrap());
                }
                NBD_REP_ACK => return Ok(names),
                _ => return Err(r),
            }
        }
    }

    pub async fn request(
        &mut self,
        command: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let h = RequestHeader {
            flags: 0,
            command,
            cookie,
            offset,
            len,
        };
        self.s.write_all(&h.encode()).await.unwrap();
        self.s.write_all(payload).await.unwrap();
        self.s.flush().await.unwrap();
    }

    /// A simple reply: (error, cookie, data); `data_len` bytes follow a successful read.
    pub async fn simple(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        tokio::time::timeout(TIMEOUT, self.s.read_exact(&mut h))
            .await
            .expect("reply in time")
            .expect("reply");
        assert_eq!(&h[0..4], &NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let mut data = vec![0u8; if err == 0 { data_len } else { 0 }];
        tokio::time::timeout(TIMEOUT, self.s.read_exact(&mut data))
            .await
            .expect("payload in time")
            .unwrap();
        (err, u64::from_be_bytes(h[8..16].try_into().unwrap()), data)
    }

    /// A structured reply chunk: (flags, type, cookie, payload).
    pub async fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut h = [0u8; 20];
        tokio::time::timeout(TIMEOUT, self.s.read_exact(&mut h))
            .await
            .expect("chunk in time")
            .expect("chunk");
        assert_eq!(&h[0..4], &NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        self.s.read_exact(&mut payload).await.unwrap();
        (
            u16::from_be_bytes([h[4], h[5]]),
            u16::from_be_bytes([h[6], h[7]]),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            payload,
        )
    }

    /// True once the server has closed its side.
    pub async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(TIMEOUT, self.s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// A CA, a server certificate for `localhost` / `127.0.0.1`, and a client certificate whose
/// subject common name is `client_name`, all made now.
pub struct TestPki {
    pub ca_cert_pem: String,
    pub ca_der: rustls::pki_types::CertificateDer<'static>,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

impl TestPki {
    pub fn generate(client_name: &str) -> TestPki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "twinblock test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let mut sp =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        sp.distinguished_name.push(DnType::CommonName, "localhost");
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        sp.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let server_cert = sp.signed_by(&server_key, &ca_cert, &ca_key).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
        cp.distinguished_name.push(DnType::CommonName, client_name);
        cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        cp.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let client_cert = cp.signed_by(&client_key, &ca_cert, &ca_key).unwrap();

        TestPki {
            ca_cert_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
        }
    }

    /// Writes the files in the layout libnbd and qemu expect for a client
    /// (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`), plus the server's
    /// `server-cert.pem` and `server-key.pem`.
    pub fn write_to(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, text) in [
            ("ca-cert.pem", &self.ca_cert_pem),
            ("server-cert.pem", &self.server_cert_pem),
            ("server-key.pem", &self.server_key_pem),
            ("client-cert.pem", &self.client_cert_pem),
            ("client-key.pem", &self.client_key_pem),
        ] {
            let mut f = std::fs::File::create(dir.join(name)).unwrap();
            f.write_all(text.as_bytes()).unwrap();
        }
    }
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "twinblock-nbd-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Log lines written while the returned guard is alive on this thread (tests run the server on
/// a current-thread runtime, so its tasks log here too).
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let sink = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.text().lines().filter(|l| l.contains(needle)).count()
    }
}

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether an external tool is installed. Missing: the test prints why it is skipped, except
/// under CI (`CI` set), where a missing tool fails the test.
pub fn require_tool(name: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("{name} is not installed, and CI is set: install it (see .ci/run)");
        }
        eprintln!("SKIPPED: {name} is not installed");
    }
    found
}
