//! A small blocking NBD client: fixed newstyle handshake with `NBD_OPT_GO`, then simple-reply
//! READ and WRITE, one request at a time.
//!
//! `twinctl demo --failover` needs a client whose every acknowledged write it knows exactly,
//! and must work where no NBD tools are installed, so it speaks the protocol itself (constants
//! from `twinblock_nbd::proto`). One request in flight per connection keeps "acknowledged"
//! unambiguous: when the connection dies, at most one write is in doubt. Blocking sockets with
//! timeouts suit a measurement loop run on its own thread.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use thiserror::Error;
use twinblock_nbd::proto::{
    IHAVEOPT, NBD_CMD_READ, NBD_CMD_WRITE, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE, NBD_INFO_EXPORT, NBD_MAGIC, NBD_OPT_GO, NBD_REP_ACK, NBD_REP_INFO,
    NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC, OPTION_REPLY_MAGIC,
};

/// Option reply types with this bit set are errors (the NBD protocol's NBD_REP_FLAG_ERROR).
const NBD_REP_ERR_BIT: u32 = 1 << 31;
/// Longest option reply payload accepted during the handshake.
const MAX_OPTION_REPLY_BYTES: u32 = 64 << 10;

#[derive(Debug, Error)]
pub enum NbdClientError {
    #[error("NBD connection to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("NBD server at {addr} broke the protocol: {what}")]
    Protocol { addr: SocketAddr, what: String },
    #[error("NBD server at {addr} refused export `{export}` (option reply {code:#x})")]
    Refused {
        addr: SocketAddr,
        export: String,
        code: u32,
    },
    #[error("NBD server at {addr} answered {command} at offset {offset} with error {errno}")]
    Command {
        addr: SocketAddr,
        command: &'static str,
        offset: u64,
        errno: u32,
    },
}

/// One connection to one export.
pub struct NbdClient {
    addr: SocketAddr,
    stream: TcpStream,
    size: u64,
    next_cookie: u64,
}

impl NbdClient {
    /// Connects (within `timeout`), negotiates `export`, and sets `timeout` as the read and
    /// write timeout of every later request.
    pub fn connect(
        addr: SocketAddr,
        export: &str,
        timeout: Duration,
    ) -> Result<NbdClient, NbdClientError> {
        let io = |source| NbdClientError::Io { addr, source };
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        let mut c = NbdClient {
            addr,
            stream,
            size: 0,
            next_cookie: 1,
        };
        c.handshake(export)?;
        Ok(c)
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn io(&self, source: std::io::Error) -> NbdClientError {
        NbdClientError::Io {
            addr: self.addr,
            source,
        }
    }

    fn protocol(&self, what: impl Into<String>) -> NbdClientError {
        NbdClientError::Protocol {
            addr: self.addr,
            what: what.into(),
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), NbdClientError> {
        self.stream.read_exact(buf).map_err(|e| self.io(e))
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<(), NbdClientError> {
        self.stream.write_all(buf).map_err(|e| self.io(e))
    }

    fn read_u64(&mut self) -> Result<u64, NbdClientError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    fn read_u32(&mut self) -> Result<u32, NbdClientError> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn handshake(&mut self, export: &str) -> Result<(), NbdClientError> {
        if self.read_u64()? != NBD_MAGIC || self.read_u64()? != IHAVEOPT {
            return Err(self.protocol("no fixed newstyle greeting"));
        }
        let mut flags = [0u8; 2];
        self.read_exact(&mut flags)?;
        if u16::from_be_bytes(flags) & NBD_FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.protocol("server does not offer fixed newstyle"));
        }
        self.write_all(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes())?;
        // NBD_OPT_GO: export name, then no information requests.
        let name = export.as_bytes();
        let mut opt = Vec::with_capacity(16 + 4 + name.len() + 2);
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        let len =
            u32::try_from(4 + name.len() + 2).map_err(|_| self.protocol("export name too long"))?;
        opt.extend_from_slice(&len.to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name);
        opt.extend_from_slice(&0u16.to_be_bytes());
        self.write_all(&opt)?;
        loop {
            if self.read_u64()? != OPTION_REPLY_MAGIC {
                return Err(self.protocol("bad option reply magic"));
            }
            let _option = self.read_u32()?;
            let kind = self.read_u32()?;
            let len = self.read_u32()?;
            if len > MAX_OPTION_REPLY_BYTES {
                return Err(self.protocol(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            self.read_exact(&mut data)?;
            match kind {
                NBD_REP_ACK => break,
                // NBD_INFO_EXPORT: type, size (u64), transmission flags (u16).
                NBD_REP_INFO
                    if data.len() >= 12
                        && u16::from_be_bytes([data[0], data[1]]) == NBD_INFO_EXPORT =>
                {
                    let mut s = [0u8; 8];
                    s.copy_from_slice(&data[2..10]);
                    self.size = u64::from_be_bytes(s);
                }
                k if k & NBD_REP_ERR_BIT != 0 => {
                    return Err(NbdClientError::Refused {
                        addr: self.addr,
                        export: export.to_string(),
                        code: k,
                    })
                }
                _ => {}
            }
        }
        if self.size == 0 {
            return Err(self.protocol("no export size in the NBD_OPT_GO replies"));
        }
        Ok(())
    }

    /// Sends one request and reads its simple reply; `read_into` receives a READ's data.
    fn request(
        &mut self,
        command: u16,
        offset: u64,
        payload: &[u8],
        read_into: Option<&mut [u8]>,
        length: u32,
    ) -> Result<(), NbdClientError> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut req = Vec::with_capacity(28 + payload.len());
        req.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&command.to_be_bytes());
        req.extend_from_slice(&cookie.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&length.to_be_bytes());
        req.extend_from_slice(payload);
        self.write_all(&req)?;
        if self.read_u32()? != NBD_SIMPLE_REPLY_MAGIC {
            return Err(self.protocol("bad reply magic"));
        }
        let errno = self.read_u32()?;
        if self.read_u64()? != cookie {
            return Err(self.protocol("reply to a request never sent"));
        }
        if errno != 0 {
            return Err(NbdClientError::Command {
                addr: self.addr,
                command: if command == NBD_CMD_READ {
                    "READ"
                } else {
                    "WRITE"
                },
                offset,
                errno,
            });
        }
        if let Some(buf) = read_into {
            self.read_exact(buf)?;
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdClientError> {
        let len = u32::try_from(data.len()).map_err(|_| self.protocol("write too large"))?;
        self.request(NBD_CMD_WRITE, offset, data, None, len)
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdClientError> {
        let len = u32::try_from(buf.len()).map_err(|_| self.protocol("read too large"))?;
        self.request(NBD_CMD_READ, offset, &[], Some(buf), len)
    }
}
