//! NBD wire format: fixed newstyle handshake, options and option replies, requests, simple
//! and structured replies.
//!
//! Pure code: it parses caller-supplied byte slices and encodes into `Vec<u8>`, never touches
//! a socket. Every length that comes from the peer is checked against the buffer and a maximum
//! before it is used. Constants follow the NBD protocol document (`doc/proto.md` of the
//! reference implementation).

use thiserror::Error;

/// `NBDMAGIC`, first word of the server greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, second word of the greeting and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server may omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub mod tflag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Rotational medium.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see one consistent export (flush on one covers all).
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_RESIZE` supported.
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `NBD_CMD_CACHE` supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option codes.
pub mod opt {
    /// Select an export and end negotiation (no reply on error: disconnect).
    pub const EXPORT_NAME: u32 = 1;
    /// End negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Old, withdrawn.
    pub const PEEK_EXPORT: u32 = 4;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Information about an export.
    pub const INFO: u32 = 6;
    /// Information about an export, then enter transmission.
    pub const GO: u32 = 7;
    /// Negotiate structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Extended headers (not supported here).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// Success.
    pub const ACK: u32 = 1;
    /// An export in a `NBD_OPT_LIST` answer.
    pub const SERVER: u32 = 2;
    /// An information item for `NBD_OPT_INFO`/`NBD_OPT_GO`.
    pub const INFO: u32 = 3;
    /// A metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Error bit.
    pub const FLAG_ERROR: u32 = 1 << 31;
    /// Option not supported.
    pub const ERR_UNSUP: u32 = FLAG_ERROR | 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = FLAG_ERROR | 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = FLAG_ERROR | 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = FLAG_ERROR | 4;
    /// TLS required first.
    pub const ERR_TLS_REQD: u32 = FLAG_ERROR | 5;
    /// Unknown export.
    pub const ERR_UNKNOWN: u32 = FLAG_ERROR | 6;
    /// Server shutting down.
    pub const ERR_SHUTDOWN: u32 = FLAG_ERROR | 7;
    /// Block size information must be requested.
    pub const ERR_BLOCK_SIZE_REQD: u32 = FLAG_ERROR | 8;
    /// Option payload too big.
    pub const ERR_TOO_BIG: u32 = FLAG_ERROR | 9;
}

/// Information types in `NBD_REP_INFO` and `NBD_OPT_INFO`/`GO` requests.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Commands.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim (discard).
    pub const TRIM: u16 = 4;
    /// Cache (prefetch).
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
    /// Resize.
    pub const RESIZE: u16 = 8;
}

/// Command flags.
pub mod cflag {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes must allocate.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment the read reply.
    pub const DF: u16 = 1 << 2;
    /// One block status descriptor only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Fail write zeroes if it would be slow.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// Last chunk of the reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// No payload.
    pub const NONE: u16 = 0;
    /// Offset + data.
    pub const OFFSET_DATA: u16 = 1;
    /// Offset + length of zeroes.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// Error bit in the type.
    pub const ERROR_BIT: u16 = 1 << 15;
    /// Error.
    pub const ERROR: u16 = ERROR_BIT | 1;
    /// Error at an offset.
    pub const ERROR_OFFSET: u16 = ERROR_BIT | 2;
}

/// Transmission error values (errno-like, fixed by the protocol).
pub mod err {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` status flag: hole (unallocated).
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` status flag: reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// Name of the allocation metadata context.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Longest string (export name, description, error message, query) accepted.
pub const MAX_STRING: usize = 4096;
/// Longest option payload read into memory; longer ones are discarded and answered
/// with `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Most metadata queries accepted in one option.
pub const MAX_QUERIES: u32 = 128;
/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Size of an option header.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Size of the server greeting.
pub const GREETING_LEN: usize = 18;

/// What can go wrong when decoding a message.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    /// A magic number did not match.
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    /// The buffer ended before the message did.
    #[error("message truncated")]
    Truncated,
    /// Bytes left over after the message.
    #[error("trailing bytes in message")]
    Trailing,
    /// A string or list longer than allowed.
    #[error("field too long")]
    TooLong,
    /// A string was not UTF-8 or contained NUL.
    #[error("invalid string")]
    BadString,
}

/// A checked cursor over a byte slice: each read checks the remaining length first.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Start reading `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    /// Take `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.buf.len() < n {
            return Err(CodecError::Truncated);
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }
    /// Big-endian u16.
    pub fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    /// Big-endian u32.
    pub fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    /// Big-endian u64.
    pub fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    /// A string of `len` bytes (checked against [`MAX_STRING`]).
    pub fn string(&mut self, len: usize) -> Result<String, CodecError> {
        if len > MAX_STRING {
            return Err(CodecError::TooLong);
        }
        let b = self.bytes(len)?;
        let s = std::str::from_utf8(b).map_err(|_| CodecError::BadString)?;
        if s.contains('\0') {
            return Err(CodecError::BadString);
        }
        Ok(s.to_owned())
    }
    /// A string preceded by its u32 length.
    pub fn string32(&mut self) -> Result<String, CodecError> {
        let len = self.u32()? as usize;
        self.string(len)
    }
    /// Fail if anything is left.
    pub fn finish(&self) -> Result<(), CodecError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Trailing)
        }
    }
    /// The rest of the buffer.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

fn put_string32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The server's first message.
pub fn encode_greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Parse the server greeting; returns the handshake flags.
pub fn parse_greeting(b: &[u8]) -> Result<u16, CodecError> {
    let mut r = Reader::new(b);
    let m = r.u64()?;
    if m != NBDMAGIC {
        return Err(CodecError::BadMagic(m));
    }
    let m = r.u64()?;
    if m != IHAVEOPT {
        return Err(CodecError::BadMagic(m));
    }
    let f = r.u16()?;
    r.finish()?;
    Ok(f)
}

/// Parse an option header: returns (option code, payload length).
pub fn parse_option_header(b: &[u8]) -> Result<(u32, u32), CodecError> {
    let mut r = Reader::new(b);
    let m = r.u64()?;
    if m != IHAVEOPT {
        return Err(CodecError::BadMagic(m));
    }
    let code = r.u32()?;
    let len = r.u32()?;
    r.finish()?;
    Ok((code, len))
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: String,
    /// Information types requested.
    pub infos: Vec<u16>,
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaQuery {
    /// Export name.
    pub export: String,
    /// Context queries.
    pub queries: Vec<String>,
}

/// A client option, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`.
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaQuery),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaQuery),
    /// Anything else (answered with `NBD_REP_ERR_UNSUP`).
    Unknown(u32),
}

impl ClientOption {
    /// Decode option `code` with payload `data`.
    pub fn parse(code: u32, data: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(data);
        let o = match code {
            opt::EXPORT_NAME => {
                let n = r.remaining();
                ClientOption::ExportName(r.string(n)?)
            }
            opt::ABORT => ClientOption::Abort,
            opt::LIST => ClientOption::List,
            opt::STARTTLS => ClientOption::StartTls,
            opt::STRUCTURED_REPLY => ClientOption::StructuredReply,
            opt::INFO | opt::GO => {
                let name = r.string32()?;
                let n = r.u16()?;
                let mut infos = Vec::with_capacity(usize::from(n).min(64));
                for _ in 0..n {
                    infos.push(r.u16()?);
                }
                let req = InfoRequest { name, infos };
                if code == opt::INFO {
                    ClientOption::Info(req)
                } else {
                    ClientOption::Go(req)
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let export = r.string32()?;
                let n = r.u32()?;
                if n > MAX_QUERIES {
                    return Err(CodecError::TooLong);
                }
                let mut queries = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    queries.push(r.string32()?);
                }
                let q = MetaQuery { export, queries };
                if code == opt::LIST_META_CONTEXT {
                    ClientOption::ListMetaContext(q)
                } else {
                    ClientOption::SetMetaContext(q)
                }
            }
            other => return Ok(ClientOption::Unknown(other)),
        };
        r.finish()?;
        Ok(o)
    }

    /// Option code.
    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => opt::EXPORT_NAME,
            ClientOption::Abort => opt::ABORT,
            ClientOption::List => opt::LIST,
            ClientOption::StartTls => opt::STARTTLS,
            ClientOption::Info(_) => opt::INFO,
            ClientOption::Go(_) => opt::GO,
            ClientOption::StructuredReply => opt::STRUCTURED_REPLY,
            ClientOption::ListMetaContext(_) => opt::LIST_META_CONTEXT,
            ClientOption::SetMetaContext(_) => opt::SET_META_CONTEXT,
            ClientOption::Unknown(c) => *c,
        }
    }

    /// Encode header and payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            ClientOption::ExportName(n) => p.extend_from_slice(n.as_bytes()),
            ClientOption::Info(q) | ClientOption::Go(q) => {
                put_string32(&mut p, &q.name);
                p.extend_from_slice(&(q.infos.len() as u16).to_be_bytes());
                for i in &q.infos {
                    p.extend_from_slice(&i.to_be_bytes());
                }
            }
            ClientOption::ListMetaContext(q) | ClientOption::SetMetaContext(q) => {
                put_string32(&mut p, &q.export);
                p.extend_from_slice(&(q.queries.len() as u32).to_be_bytes());
                for s in &q.queries {
                    put_string32(&mut p, s);
                }
            }
            _ => {}
        }
        let mut out = Vec::with_capacity(OPTION_HEADER_LEN + p.len());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&self.code().to_be_bytes());
        out.extend_from_slice(&(p.len() as u32).to_be_bytes());
        out.extend_from_slice(&p);
        out
    }
}

/// An option reply, header fields plus raw payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    /// The option being answered.
    pub option: u32,
    /// Reply type (`rep::*`).
    pub reply_type: u32,
    /// Payload.
    pub data: Vec<u8>,
}

impl OptionReply {
    /// `NBD_REP_ACK`.
    pub fn ack(option: u32) -> Self {
        Self {
            option,
            reply_type: rep::ACK,
            data: Vec::new(),
        }
    }
    /// An error reply with a message.
    pub fn error(option: u32, reply_type: u32, msg: &str) -> Self {
        Self {
            option,
            reply_type,
            data: msg.as_bytes()[..msg.len().min(MAX_STRING)].to_vec(),
        }
    }
    /// `NBD_REP_SERVER` for `NBD_OPT_LIST`.
    pub fn server(name: &str, description: &str) -> Self {
        let mut data = Vec::new();
        put_string32(&mut data, name);
        data.extend_from_slice(description.as_bytes());
        Self {
            option: opt::LIST,
            reply_type: rep::SERVER,
            data,
        }
    }
    /// `NBD_REP_INFO` carrying `item`.
    pub fn info(option: u32, item: &InfoItem) -> Self {
        Self {
            option,
            reply_type: rep::INFO,
            data: item.encode(),
        }
    }
    /// `NBD_REP_META_CONTEXT`.
    pub fn meta_context(option: u32, id: u32, name: &str) -> Self {
        let mut data = id.to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        Self {
            option,
            reply_type: rep::META_CONTEXT,
            data,
        }
    }
    /// Encode header and payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + self.data.len());
        out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.option.to_be_bytes());
        out.extend_from_slice(&self.reply_type.to_be_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.data);
        out
    }
    /// Parse a reply header: (option, type, payload length).
    pub fn parse_header(b: &[u8]) -> Result<(u32, u32, u32), CodecError> {
        let mut r = Reader::new(b);
        let m = r.u64()?;
        if m != OPT_REPLY_MAGIC {
            return Err(CodecError::BadMagic(m));
        }
        let o = r.u32()?;
        let t = r.u32()?;
        let l = r.u32()?;
        r.finish()?;
        Ok((o, t, l))
    }
    /// Parse a whole reply (header and payload).
    pub fn parse(b: &[u8]) -> Result<Self, CodecError> {
        if b.len() < OPTION_REPLY_HEADER_LEN {
            return Err(CodecError::Truncated);
        }
        let (h, data) = b.split_at(OPTION_REPLY_HEADER_LEN);
        let (option, reply_type, len) = Self::parse_header(h)?;
        if data.len() != len as usize {
            return Err(if data.len() < len as usize {
                CodecError::Truncated
            } else {
                CodecError::Trailing
            });
        }
        Ok(Self {
            option,
            reply_type,
            data: data.to_vec(),
        })
    }
}

/// An information item in `NBD_REP_INFO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoItem {
    /// `NBD_INFO_EXPORT`.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload size.
        max: u32,
    },
    /// Unknown type (ignored by clients).
    Unknown(u16),
}

impl InfoItem {
    /// Encode as the payload of `NBD_REP_INFO`.
    pub fn encode(&self) -> Vec<u8> {
        let mut d = Vec::new();
        match self {
            InfoItem::Export { size, flags } => {
                d.extend_from_slice(&info::EXPORT.to_be_bytes());
                d.extend_from_slice(&size.to_be_bytes());
                d.extend_from_slice(&flags.to_be_bytes());
            }
            InfoItem::Name(n) => {
                d.extend_from_slice(&info::NAME.to_be_bytes());
                d.extend_from_slice(n.as_bytes());
            }
            InfoItem::Description(n) => {
                d.extend_from_slice(&info::DESCRIPTION.to_be_bytes());
                d.extend_from_slice(n.as_bytes());
            }
            InfoItem::BlockSize {
                min,
                preferred,
                max,
            } => {
                d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
                d.extend_from_slice(&min.to_be_bytes());
                d.extend_from_slice(&preferred.to_be_bytes());
                d.extend_from_slice(&max.to_be_bytes());
            }
            InfoItem::Unknown(t) => d.extend_from_slice(&t.to_be_bytes()),
        }
        d
    }
    /// Decode the payload of `NBD_REP_INFO`.
    pub fn parse(b: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(b);
        let t = r.u16()?;
        let item = match t {
            info::EXPORT => InfoItem::Export {
                size: r.u64()?,
                flags: r.u16()?,
            },
            info::NAME => {
                let n = r.remaining();
                InfoItem::Name(r.string(n)?)
            }
            info::DESCRIPTION => {
                let n = r.remaining();
                InfoItem::Description(r.string(n)?)
            }
            info::BLOCK_SIZE => InfoItem::BlockSize {
                min: r.u32()?,
                preferred: r.u32()?,
                max: r.u32()?,
            },
            other => {
                r.rest();
                InfoItem::Unknown(other)
            }
        };
        r.finish()?;
        Ok(item)
    }
}

/// Reply to `NBD_OPT_EXPORT_NAME`: size, flags and (unless no-zeroes) 124 zero bytes.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`cflag::*`).
    pub flags: u16,
    /// Command (`cmd::*`).
    pub typ: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

impl Request {
    /// Decode a 28-byte header.
    pub fn parse(b: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(b);
        let m = r.u32()?;
        if m != REQUEST_MAGIC {
            return Err(CodecError::BadMagic(u64::from(m)));
        }
        let req = Request {
            flags: r.u16()?,
            typ: r.u16()?,
            cookie: r.u64()?,
            offset: r.u64()?,
            length: r.u32()?,
        };
        r.finish()?;
        Ok(req)
    }
    /// Encode a 28-byte header.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0 or an `err::*` value.
    pub error: u32,
    /// Cookie of the request.
    pub cookie: u64,
}

impl SimpleReply {
    /// Encode a 16-byte header.
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b
    }
    /// Decode a 16-byte header.
    pub fn parse(b: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(b);
        let m = r.u32()?;
        if m != SIMPLE_REPLY_MAGIC {
            return Err(CodecError::BadMagic(u64::from(m)));
        }
        let rep = SimpleReply {
            error: r.u32()?,
            cookie: r.u64()?,
        };
        r.finish()?;
        Ok(rep)
    }
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `chunk::FLAG_DONE` or 0.
    pub flags: u16,
    /// Chunk type (`chunk::*`).
    pub typ: u16,
    /// Cookie of the request.
    pub cookie: u64,
    /// Payload length.
    pub length: u32,
}

impl ChunkHeader {
    /// Encode a 20-byte header.
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut b = [0u8; CHUNK_HEADER_LEN];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }
    /// Decode a 20-byte header.
    pub fn parse(b: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(b);
        let m = r.u32()?;
        if m != STRUCTURED_REPLY_MAGIC {
            return Err(CodecError::BadMagic(u64::from(m)));
        }
        let h = ChunkHeader {
            flags: r.u16()?,
            typ: r.u16()?,
            cookie: r.u64()?,
            length: r.u32()?,
        };
        r.finish()?;
        Ok(h)
    }
}

/// A decoded structured reply chunk payload (`OFFSET_DATA` keeps only the offset; the data
/// follows in the caller's buffer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: offset and data.
    OffsetData {
        /// Offset of the data.
        offset: u64,
        /// The data.
        data: Vec<u8>,
    },
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    OffsetHole {
        /// Offset of the hole.
        offset: u64,
        /// Length of the hole.
        length: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    BlockStatus {
        /// Context id.
        context: u32,
        /// (length, flags) descriptors.
        extents: Vec<(u32, u32)>,
    },
    /// `NBD_REPLY_TYPE_ERROR`.
    Error {
        /// Error value.
        error: u32,
        /// Message.
        message: String,
    },
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    ErrorOffset {
        /// Error value.
        error: u32,
        /// Message.
        message: String,
        /// Offset.
        offset: u64,
    },
    /// Unknown type.
    Unknown(u16),
}

impl Chunk {
    /// Decode the payload of a chunk of type `typ`.
    pub fn parse(typ: u16, b: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(b);
        let c = match typ {
            chunk::NONE => Chunk::None,
            chunk::OFFSET_DATA => Chunk::OffsetData {
                offset: r.u64()?,
                data: r.rest().to_vec(),
            },
            chunk::OFFSET_HOLE => Chunk::OffsetHole {
                offset: r.u64()?,
                length: r.u32()?,
            },
            chunk::BLOCK_STATUS => {
                let context = r.u32()?;
                if r.remaining() == 0 || r.remaining() % 8 != 0 {
                    return Err(CodecError::Truncated);
                }
                let mut extents = Vec::with_capacity(r.remaining() / 8);
                while r.remaining() > 0 {
                    extents.push((r.u32()?, r.u32()?));
                }
                Chunk::BlockStatus { context, extents }
            }
            chunk::ERROR | chunk::ERROR_OFFSET => {
                let error = r.u32()?;
                let mlen = r.u16()?;
                let message = r.string(usize::from(mlen))?;
                if typ == chunk::ERROR {
                    Chunk::Error { error, message }
                } else {
                    Chunk::ErrorOffset {
                        error,
                        message,
                        offset: r.u64()?,
                    }
                }
            }
            other => {
                r.rest();
                Chunk::Unknown(other)
            }
        };
        r.finish()?;
        Ok(c)
    }

    /// Chunk type.
    pub fn typ(&self) -> u16 {
        match self {
            Chunk::None => chunk::NONE,
            Chunk::OffsetData { .. } => chunk::OFFSET_DATA,
            Chunk::OffsetHole { .. } => chunk::OFFSET_HOLE,
            Chunk::BlockStatus { .. } => chunk::BLOCK_STATUS,
            Chunk::Error { .. } => chunk::ERROR,
            Chunk::ErrorOffset { .. } => chunk::ERROR_OFFSET,
            Chunk::Unknown(t) => *t,
        }
    }

    /// Encode header (with `flags`, `cookie`) and payload.
    pub fn encode(&self, flags: u16, cookie: u64) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Chunk::None | Chunk::Unknown(_) => {}
            Chunk::OffsetData { offset, data } => {
                p.extend_from_slice(&offset.to_be_bytes());
                p.extend_from_slice(data);
            }
            Chunk::OffsetHole { offset, length } => {
                p.extend_from_slice(&offset.to_be_bytes());
                p.extend_from_slice(&length.to_be_bytes());
            }
            Chunk::BlockStatus { context, extents } => {
                p.extend_from_slice(&context.to_be_bytes());
                for (l, f) in extents {
                    p.extend_from_slice(&l.to_be_bytes());
                    p.extend_from_slice(&f.to_be_bytes());
                }
            }
            Chunk::Error { error, message } | Chunk::ErrorOffset { error, message, .. } => {
                let m = &message.as_bytes()[..message.len().min(MAX_STRING)];
                p.extend_from_slice(&error.to_be_bytes());
                p.extend_from_slice(&(m.len() as u16).to_be_bytes());
                p.extend_from_slice(m);
                if let Chunk::ErrorOffset { offset, .. } = self {
                    p.extend_from_slice(&offset.to_be_bytes());
                }
            }
        }
        let h = ChunkHeader {
            flags,
            typ: self.typ(),
            cookie,
            length: p.len() as u32,
        };
        let mut out = h.encode().to_vec();
        out.extend_from_slice(&p);
        out
    }
}

/// Header of an `OFFSET_DATA` chunk whose `len` data bytes the caller appends itself
/// (avoids copying read buffers).
pub fn encode_offset_data_header(flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let h = ChunkHeader {
        flags,
        typ: chunk::OFFSET_DATA,
        cookie,
        length: len + 8,
    };
    let mut out = h.encode().to_vec();
    out.extend_from_slice(&offset.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt_roundtrip(o: ClientOption) {
        let b = o.encode();
        let (code, len) = parse_option_header(&b[..OPTION_HEADER_LEN]).unwrap();
        assert_eq!(len as usize, b.len() - OPTION_HEADER_LEN);
        let back = ClientOption::parse(code, &b[OPTION_HEADER_LEN..]).unwrap();
        assert_eq!(back, o);
    }

    #[test]
    fn options_roundtrip() {
        opt_roundtrip(ClientOption::ExportName("disk".into()));
        opt_roundtrip(ClientOption::ExportName(String::new()));
        opt_roundtrip(ClientOption::Abort);
        opt_roundtrip(ClientOption::List);
        opt_roundtrip(ClientOption::StartTls);
        opt_roundtrip(ClientOption::StructuredReply);
        opt_roundtrip(ClientOption::Go(InfoRequest {
            name: "a".into(),
            infos: vec![info::BLOCK_SIZE, info::NAME],
        }));
        opt_roundtrip(ClientOption::Info(InfoRequest {
            name: String::new(),
            infos: vec![],
        }));
        opt_roundtrip(ClientOption::SetMetaContext(MetaQuery {
            export: "x".into(),
            queries: vec![BASE_ALLOCATION.into(), "qemu:dirty".into()],
        }));
        opt_roundtrip(ClientOption::ListMetaContext(MetaQuery {
            export: String::new(),
            queries: vec![],
        }));
        opt_roundtrip(ClientOption::Unknown(99));
    }

    #[test]
    fn malformed_options_are_errors() {
        // GO whose name length runs past the payload.
        let mut p = 10u32.to_be_bytes().to_vec();
        p.extend_from_slice(b"abc");
        assert_eq!(ClientOption::parse(opt::GO, &p), Err(CodecError::Truncated));
        // Trailing bytes after an ABORT.
        assert_eq!(
            ClientOption::parse(opt::ABORT, &[1]),
            Err(CodecError::Trailing)
        );
        // NUL inside a name.
        assert_eq!(
            ClientOption::parse(opt::EXPORT_NAME, b"a\0b"),
            Err(CodecError::BadString)
        );
        // Too many queries.
        let mut p = 0u32.to_be_bytes().to_vec();
        p.extend_from_slice(&(MAX_QUERIES + 1).to_be_bytes());
        assert_eq!(
            ClientOption::parse(opt::SET_META_CONTEXT, &p),
            Err(CodecError::TooLong)
        );
        assert!(parse_option_header(&[0u8; 16]).is_err());
    }

    #[test]
    fn option_replies_roundtrip() {
        for r in [
            OptionReply::ack(opt::GO),
            OptionReply::error(opt::GO, rep::ERR_UNKNOWN, "no such export"),
            OptionReply::server("disk", "a disk"),
            OptionReply::info(
                opt::GO,
                &InfoItem::Export {
                    size: 1 << 40,
                    flags: tflag::HAS_FLAGS | tflag::SEND_FLUSH,
                },
            ),
            OptionReply::meta_context(opt::SET_META_CONTEXT, 1, BASE_ALLOCATION),
        ] {
            assert_eq!(OptionReply::parse(&r.encode()).unwrap(), r);
        }
        for i in [
            InfoItem::Export { size: 5, flags: 3 },
            InfoItem::Name("n".into()),
            InfoItem::Description("d".into()),
            InfoItem::BlockSize {
                min: 1,
                preferred: 4096,
                max: 1 << 25,
            },
        ] {
            assert_eq!(InfoItem::parse(&i.encode()).unwrap(), i);
        }
    }

    #[test]
    fn greeting_and_export_name_reply() {
        let g = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(parse_greeting(&g).unwrap(), 3);
        assert_eq!(encode_export_name_reply(1, 1, false).len(), 134);
        assert_eq!(encode_export_name_reply(1, 1, true).len(), 10);
    }

    #[test]
    fn requests_and_replies_roundtrip() {
        let r = Request {
            flags: cflag::FUA,
            typ: cmd::WRITE,
            cookie: 0xdead_beef_0123,
            offset: 1 << 33,
            length: 4096,
        };
        assert_eq!(Request::parse(&r.encode()).unwrap(), r);
        let s = SimpleReply {
            error: err::EIO,
            cookie: 7,
        };
        assert_eq!(SimpleReply::parse(&s.encode()).unwrap(), s);
        let mut bad = r.encode();
        bad[0] ^= 1;
        assert!(matches!(Request::parse(&bad), Err(CodecError::BadMagic(_))));
    }

    #[test]
    fn chunks_roundtrip() {
        for c in [
            Chunk::None,
            Chunk::OffsetData {
                offset: 512,
                data: vec![1, 2, 3],
            },
            Chunk::OffsetHole {
                offset: 0,
                length: 4096,
            },
            Chunk::BlockStatus {
                context: 1,
                extents: vec![(4096, 0), (8192, STATE_HOLE | STATE_ZERO)],
            },
            Chunk::Error {
                error: err::EINVAL,
                message: "out of range".into(),
            },
            Chunk::ErrorOffset {
                error: err::EIO,
                message: String::new(),
                offset: 99,
            },
        ] {
            let b = c.encode(chunk::FLAG_DONE, 42);
            let h = ChunkHeader::parse(&b[..CHUNK_HEADER_LEN]).unwrap();
            assert_eq!(h.cookie, 42);
            assert_eq!(h.flags, chunk::FLAG_DONE);
            assert_eq!(h.length as usize, b.len() - CHUNK_HEADER_LEN);
            assert_eq!(Chunk::parse(h.typ, &b[CHUNK_HEADER_LEN..]).unwrap(), c);
        }
        let mut h = encode_offset_data_header(0, 1, 4096, 3);
        h.extend_from_slice(&[9, 9, 9]);
        let ch = ChunkHeader::parse(&h[..CHUNK_HEADER_LEN]).unwrap();
        assert_eq!(
            Chunk::parse(ch.typ, &h[CHUNK_HEADER_LEN..]).unwrap(),
            Chunk::OffsetData {
                offset: 4096,
                data: vec![9, 9, 9]
            }
        );
        // A block status chunk without descriptors is invalid.
        assert!(Chunk::parse(chunk::BLOCK_STATUS, &1u32.to_be_bytes()).is_err());
    }
}
