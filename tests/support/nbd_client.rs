//! A minimal synchronous NBD client for tests that must know exactly which writes were
//! acknowledged (the crash tests). One request at a time per connection; fixed newstyle with
//! `NBD_OPT_EXPORT_NAME` and simple replies, like the Linux kernel client.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_EXPORT_NAME: u32 = 1;
const FLAG_FIXED_NEWSTYLE: u32 = 1;
const FLAG_NO_ZEROES: u32 = 2;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_FLAG_FUA: u16 = 1;

pub struct Client {
    stream: TcpStream,
    pub size: u64,
    pub flags: u16,
    next_handle: u64,
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Client {
    pub fn connect(addr: SocketAddr, export: &str) -> io::Result<Client> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_nodelay(true)?;
        let mut greet = [0u8; 18];
        stream.read_exact(&mut greet)?;
        if be64(&greet[0..8]) != NBDMAGIC || be64(&greet[8..16]) != IHAVEOPT {
            return Err(bad("not an NBD newstyle server".into()));
        }
        stream.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        stream.write_all(&opt)?;
        let mut info = [0u8; 10];
        stream.read_exact(&mut info)?;
        Ok(Client {
            stream,
            size: be64(&info[0..8]),
            flags: u16::from_be_bytes([info[8], info[9]]),
            next_handle: 1,
        })
    }

    fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut req = Vec::with_capacity(28 + payload.len());
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&flags.to_be_bytes());
        req.extend_from_slice(&cmd.to_be_bytes());
        req.extend_from_slice(&handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(payload);
        self.stream.write_all(&req)?;
        Ok(handle)
    }

    fn reply(&mut self, handle: u64) -> io::Result<()> {
        let mut rep = [0u8; 16];
        self.stream.read_exact(&mut rep)?;
        let magic = u32::from_be_bytes(rep[0..4].try_into().unwrap());
        let error = u32::from_be_bytes(rep[4..8].try_into().unwrap());
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(bad(format!("bad reply magic {magic:#x}")));
        }
        if be64(&rep[8..16]) != handle {
            return Err(bad("reply for another handle".into()));
        }
        if error != 0 {
            return Err(io::Error::other(format!("server error {error}")));
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let h = self.request(
            CMD_WRITE,
            if fua { CMD_FLAG_FUA } else { 0 },
            offset,
            data.len() as u32,
            data,
        )?;
        self.reply(h)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let h = self.request(CMD_READ, 0, offset, len, &[])?;
        self.reply(h)?;
        let mut buf = vec![0u8; len as usize];
        self.stream.read_exact(&mut buf)?;
        Ok(buf)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        let h = self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        self.reply(h)
    }

    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0, &[]);
    }
}
