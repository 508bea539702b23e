//! Transmission-phase replies: what a finished request hands to the connection's writer task,
//! and how it is laid out on the wire.
//!
//! Without negotiated structured replies every reply is a simple reply (the Linux kernel client
//! never negotiates them). With them, reads answer with one `OFFSET_DATA` chunk (or an error
//! chunk), block status with one `BLOCK_STATUS` chunk, errors with `ERROR`/`ERROR_OFFSET`
//! chunks carrying a message, and payload-less successes with a simple reply, which the spec
//! allows for every command but `READ`.

use std::borrow::Cow;

use bytes::{BufMut, BytesMut};
use tokio::sync::OwnedSemaphorePermit;

use crate::proto::*;
use crate::readdata::ReadData;

/// One extent of `base:allocation`, already clipped to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusDescriptor {
    pub length: u32,
    pub flags: u32,
}

#[derive(Debug)]
pub enum ReplyBody {
    /// Success without payload.
    Done,
    /// Read data for `[offset, offset + data.len())`, in one or several shared buffers.
    Data { offset: u64, data: ReadData },
    /// A failed request. `offset` marks where a read failed (`ERROR_OFFSET`), when known.
    Error {
        errno: u32,
        offset: Option<u64>,
        message: Cow<'static, str>,
    },
    BlockStatus {
        context_id: u32,
        descriptors: Vec<StatusDescriptor>,
    },
}

/// A reply on its way to the writer. Holding `permit` keeps the request's bytes counted
/// against the connection's in-flight budget until the reply has been written.
#[derive(Debug)]
pub struct Reply {
    pub cookie: u64,
    /// The command this answers: `READ` errors must be structured when structured replies are on.
    pub command: u16,
    pub body: ReplyBody,
    pub permit: Option<OwnedSemaphorePermit>,
}

/// Encodes everything but the read payload into `head`, and returns the payload (if any) so the
/// writer can hand its pieces to the socket without another copy.
pub fn encode<'r>(reply: &'r Reply, structured: bool, head: &mut BytesMut) -> Option<&'r ReadData> {
    match &reply.body {
        ReplyBody::Done => {
            if structured && reply.command == NBD_CMD_READ {
                put_structured_header(
                    head,
                    NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_TYPE_NONE,
                    reply.cookie,
                    0,
                );
            } else {
                put_simple_reply(head, 0, reply.cookie);
            }
            None
        }
        ReplyBody::Data { offset, data } => {
            if structured {
                put_structured_header(
                    head,
                    NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_TYPE_OFFSET_DATA,
                    reply.cookie,
                    8 + data.len() as u32,
                );
                head.put_u64(*offset);
            } else {
                put_simple_reply(head, 0, reply.cookie);
            }
            Some(data)
        }
        ReplyBody::Error {
            errno,
            offset,
            message,
        } => {
            if !structured {
                put_simple_reply(head, *errno, reply.cookie);
                return None;
            }
            match offset {
                Some(off) => {
                    let msg = truncate_str(message, MAX_STRING_BYTES);
                    put_structured_header(
                        head,
                        NBD_REPLY_FLAG_DONE,
                        NBD_REPLY_TYPE_ERROR_OFFSET,
                        reply.cookie,
                        6 + msg.len() as u32 + 8,
                    );
                    head.put_u32(*errno);
                    head.put_u16(msg.len() as u16);
                    head.put_slice(msg.as_bytes());
                    head.put_u64(*off);
                }
                None => put_structured_error(head, reply.cookie, *errno, message),
            }
            None
        }
        ReplyBody::BlockStatus {
            context_id,
            descriptors,
        } => {
            // Block status only exists with structured replies; the request validator refuses it
            // otherwise, so this branch always has `structured` set.
            debug_assert!(structured);
            put_structured_header(
                head,
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_BLOCK_STATUS,
                reply.cookie,
                4 + 8 * descriptors.len() as u32,
            );
            head.put_u32(*context_id);
            for d in descriptors {
                head.put_u32(d.length);
                head.put_u32(d.flags);
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn reply(command: u16, body: ReplyBody) -> Reply {
        Reply {
            cookie: 0x1122_3344_5566_7788,
            command,
            body,
            permit: None,
        }
    }

    #[test]
    fn simple_read_reply_is_header_then_data() {
        let mut head = BytesMut::new();
        let r = reply(
            NBD_CMD_READ,
            ReplyBody::Data {
                offset: 512,
                data: Bytes::from_static(b"abcd").into(),
            },
        );
        let payload = encode(&r, false, &mut head).unwrap();
        assert_eq!(head.len(), SIMPLE_REPLY_HEADER_BYTES);
        assert_eq!(&head[0..4], &NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&head[4..8], &[0, 0, 0, 0]);
        assert_eq!(&head[8..16], &0x1122_3344_5566_7788u64.to_be_bytes());
        assert_eq!(&payload.to_contiguous()[..], b"abcd");
    }

    #[test]
    fn structured_read_reply_is_one_final_offset_data_chunk() {
        let mut head = BytesMut::new();
        let r = reply(
            NBD_CMD_READ,
            ReplyBody::Data {
                offset: 512,
                data: Bytes::from_static(b"abcd").into(),
            },
        );
        encode(&r, true, &mut head).unwrap();
        assert_eq!(&head[0..4], &NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&head[4..6], &NBD_REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&head[6..8], &NBD_REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&head[16..20], &12u32.to_be_bytes());
        assert_eq!(&head[20..28], &512u64.to_be_bytes());
    }

    #[test]
    fn structured_read_reply_length_counts_every_piece() {
        let mut head = BytesMut::new();
        let r = reply(
            NBD_CMD_READ,
            ReplyBody::Data {
                offset: 0,
                data: ReadData::Pieces(vec![
                    Bytes::from(vec![1u8; 4096]),
                    Bytes::from(vec![2u8; 100]),
                ]),
            },
        );
        let payload = encode(&r, true, &mut head).unwrap();
        assert_eq!(&head[16..20], &(8u32 + 4196).to_be_bytes());
        assert_eq!(head.len(), STRUCTURED_REPLY_HEADER_BYTES + 8);
        assert_eq!(
            payload.pieces().len(),
            2,
            "the pieces are handed over, not joined"
        );
    }

    #[test]
    fn simple_error_reply_carries_errno_and_no_payload() {
        let mut head = BytesMut::new();
        let r = reply(
            NBD_CMD_WRITE,
            ReplyBody::Error {
                errno: NBD_ENOSPC,
                offset: None,
                message: "past end".into(),
            },
        );
        assert!(encode(&r, false, &mut head).is_none());
        assert_eq!(head.len(), SIMPLE_REPLY_HEADER_BYTES);
        assert_eq!(&head[4..8], &NBD_ENOSPC.to_be_bytes());
    }

    #[test]
    fn structured_read_error_with_offset_uses_error_offset_chunk() {
        let mut head = BytesMut::new();
        let r = reply(
            NBD_CMD_READ,
            ReplyBody::Error {
                errno: NBD_EIO,
                offset: Some(4096),
                message: "x".into(),
            },
        );
        encode(&r, true, &mut head);
        assert_eq!(&head[6..8], &NBD_REPLY_TYPE_ERROR_OFFSET.to_be_bytes());
        assert_eq!(&head[16..20], &(6u32 + 1 + 8).to_be_bytes());
        assert_eq!(&head[head.len() - 8..], &4096u64.to_be_bytes());
    }

    #[test]
    fn structured_success_without_payload_uses_none_chunk_for_read_only() {
        let mut head = BytesMut::new();
        encode(&reply(NBD_CMD_READ, ReplyBody::Done), true, &mut head);
        assert_eq!(&head[6..8], &NBD_REPLY_TYPE_NONE.to_be_bytes());
        head.clear();
        encode(&reply(NBD_CMD_FLUSH, ReplyBody::Done), true, &mut head);
        assert_eq!(&head[0..4], &NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    }

    #[test]
    fn block_status_chunk_lists_descriptors() {
        let mut head = BytesMut::new();
        let r = reply(
            NBD_CMD_BLOCK_STATUS,
            ReplyBody::BlockStatus {
                context_id: 1,
                descriptors: vec![
                    StatusDescriptor {
                        length: 4096,
                        flags: 3,
                    },
                    StatusDescriptor {
                        length: 512,
                        flags: 0,
                    },
                ],
            },
        );
        encode(&r, true, &mut head);
        assert_eq!(&head[6..8], &NBD_REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
        assert_eq!(&head[16..20], &20u32.to_be_bytes());
        assert_eq!(head.len(), STRUCTURED_REPLY_HEADER_BYTES + 20);
        assert_eq!(&head[24..28], &4096u32.to_be_bytes());
        assert_eq!(&head[28..32], &3u32.to_be_bytes());
    }
}
