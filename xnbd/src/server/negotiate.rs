//! Negotiation: fixed newstyle option haggling and STARTTLS, up to the session the
//! transmission phase serves.

use std::io;
use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use super::{discard, Server, ServerError, Session, BASE_ALLOCATION_ID, PREFERRED_BLOCK};
use crate::conn::Conn;
use crate::proto::{self, info as infot, opt, rep, ClientOption, InfoItem, OptionReply};

/// TLS policy.
#[derive(Clone)]
pub struct Tls {
    /// Acceptor built from the certificate and key.
    pub acceptor: TlsAcceptor,
    /// Refuse everything but STARTTLS and ABORT before TLS is up.
    pub required: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("required", &self.required)
            .finish()
    }
}

/// Build a TLS acceptor from PEM files (ring provider).
pub fn load_tls(cert: &Path, key: &Path) -> Result<TlsAcceptor, ServerError> {
    let certs = {
        let mut r = io::BufReader::new(std::fs::File::open(cert)?);
        rustls_pemfile::certs(&mut r).collect::<Result<Vec<_>, _>>()?
    };
    if certs.is_empty() {
        return Err(ServerError::Tls(format!(
            "no certificate in {}",
            cert.display()
        )));
    }
    let key = {
        let mut r = io::BufReader::new(std::fs::File::open(key)?);
        rustls_pemfile::private_key(&mut r)?
            .ok_or_else(|| ServerError::Tls(format!("no private key in {}", key.display())))?
    };
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ServerError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| ServerError::Tls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

impl Server {
    pub(super) async fn negotiate(
        &self,
        conn: Box<dyn Conn>,
    ) -> Result<Option<(Box<dyn Conn>, Session)>, ServerError> {
        let mut conn = conn;
        conn.write_all(&proto::encode_greeting(
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
        ))
        .await?;
        conn.flush().await?;
        let cflags = conn.read_u32().await?;
        if cflags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
            return Err(ServerError::Protocol(format!(
                "unknown client flags {cflags:#x}"
            )));
        }
        let fixed = cflags & proto::FLAG_C_FIXED_NEWSTYLE != 0;
        let no_zeroes = cflags & proto::FLAG_C_NO_ZEROES != 0;
        let mut tls_up = false;
        let mut structured = false;
        let mut meta: Option<String> = None; // export name base:allocation was set for
        loop {
            let mut h = [0u8; proto::OPTION_HEADER_LEN];
            conn.read_exact(&mut h).await?;
            let (code, len) =
                proto::parse_option_header(&h).map_err(|e| ServerError::Protocol(e.to_string()))?;
            if len > proto::MAX_OPTION_LEN {
                discard(&mut conn, u64::from(len)).await?;
                if !fixed || !refuse(&mut conn, code, rep::ERR_TOO_BIG, "option too long").await? {
                    return Ok(None);
                }
                continue;
            }
            let mut data = vec![0u8; len as usize];
            conn.read_exact(&mut data).await?;
            let tls_required = self.tls.as_ref().is_some_and(|t| t.required) && !tls_up;
            if tls_required && code != opt::STARTTLS && code != opt::ABORT {
                if !refuse(&mut conn, code, rep::ERR_TLS_REQD, "TLS required").await? {
                    return Ok(None);
                }
                continue;
            }
            let o = match ClientOption::parse(code, &data) {
                Ok(o) => o,
                Err(e) => {
                    if !refuse(&mut conn, code, rep::ERR_INVALID, &e.to_string()).await? {
                        return Ok(None);
                    }
                    continue;
                }
            };
            match o {
                ClientOption::ExportName(name) => {
                    let Some(export) = self.find(&name) else {
                        return Ok(None);
                    };
                    conn.write_all(&proto::encode_export_name_reply(
                        export.backend.size(),
                        export.flags(),
                        no_zeroes,
                    ))
                    .await?;
                    conn.flush().await?;
                    let base_alloc = meta.as_deref() == Some(export.name.as_str()) && structured;
                    return Ok(Some((
                        conn,
                        Session {
                            export,
                            structured,
                            base_alloc,
                            min_block: 1,
                            max_payload: self.max_payload(),
                        },
                    )));
                }
                ClientOption::Abort => {
                    let _ = send(&mut conn, OptionReply::ack(code)).await;
                    return Ok(None);
                }
                ClientOption::List => {
                    for e in &self.exports {
                        send(&mut conn, OptionReply::server(&e.name, &e.description)).await?;
                    }
                    send(&mut conn, OptionReply::ack(code)).await?;
                }
                ClientOption::StartTls => {
                    let Some(tls) = &self.tls else {
                        send(
                            &mut conn,
                            OptionReply::error(code, rep::ERR_UNSUP, "TLS not configured"),
                        )
                        .await?;
                        continue;
                    };
                    if tls_up {
                        send(
                            &mut conn,
                            OptionReply::error(code, rep::ERR_INVALID, "TLS already active"),
                        )
                        .await?;
                        continue;
                    }
                    send(&mut conn, OptionReply::ack(code)).await?;
                    let s = tls
                        .acceptor
                        .accept(conn)
                        .await
                        .map_err(|e| ServerError::Tls(e.to_string()))?;
                    conn = Box::new(s);
                    tls_up = true;
                    // Everything negotiated in clear text is forgotten.
                    structured = false;
                    meta = None;
                }
                ClientOption::StructuredReply => {
                    structured = true;
                    send(&mut conn, OptionReply::ack(code)).await?;
                }
                ClientOption::Info(req) | ClientOption::Go(req) => {
                    let Some(export) = self.find(&req.name) else {
                        send(
                            &mut conn,
                            OptionReply::error(code, rep::ERR_UNKNOWN, "no such export"),
                        )
                        .await?;
                        continue;
                    };
                    let asked_bs = req.infos.contains(&infot::BLOCK_SIZE);
                    if self.min_block > 1 && !asked_bs {
                        send(
                            &mut conn,
                            OptionReply::error(
                                code,
                                rep::ERR_BLOCK_SIZE_REQD,
                                "block size constraints apply",
                            ),
                        )
                        .await?;
                        continue;
                    }
                    send(
                        &mut conn,
                        OptionReply::info(
                            code,
                            &InfoItem::Export {
                                size: export.backend.size(),
                                flags: export.flags(),
                            },
                        ),
                    )
                    .await?;
                    if req.infos.contains(&infot::NAME) {
                        send(
                            &mut conn,
                            OptionReply::info(code, &InfoItem::Name(export.name.clone())),
                        )
                        .await?;
                    }
                    if req.infos.contains(&infot::DESCRIPTION) {
                        send(
                            &mut conn,
                            OptionReply::info(
                                code,
                                &InfoItem::Description(export.description.clone()),
                            ),
                        )
                        .await?;
                    }
                    send(
                        &mut conn,
                        OptionReply::info(
                            code,
                            &InfoItem::BlockSize {
                                min: self.min_block,
                                preferred: PREFERRED_BLOCK.max(self.min_block),
                                max: self.max_payload(),
                            },
                        ),
                    )
                    .await?;
                    send(&mut conn, OptionReply::ack(code)).await?;
                    if code == opt::GO {
                        let base_alloc = structured
                            && meta.as_deref().is_some_and(|m| {
                                self.find(m).is_some_and(|e| Arc::ptr_eq(&e, &export))
                            });
                        return Ok(Some((
                            conn,
                            Session {
                                export,
                                structured,
                                base_alloc,
                                min_block: if asked_bs { self.min_block } else { 1 },
                                max_payload: self.max_payload(),
                            },
                        )));
                    }
                }
                ClientOption::ListMetaContext(q) | ClientOption::SetMetaContext(q) => {
                    let set = code == opt::SET_META_CONTEXT;
                    if !structured {
                        send(
                            &mut conn,
                            OptionReply::error(
                                code,
                                rep::ERR_INVALID,
                                "structured replies not negotiated",
                            ),
                        )
                        .await?;
                        continue;
                    }
                    if self.find(&q.export).is_none() {
                        send(
                            &mut conn,
                            OptionReply::error(code, rep::ERR_UNKNOWN, "no such export"),
                        )
                        .await?;
                        continue;
                    }
                    let matched = if set {
                        q.queries.iter().any(|s| s == proto::BASE_ALLOCATION)
                    } else {
                        q.queries.is_empty()
                            || q.queries
                                .iter()
                                .any(|s| s == "base:" || s == proto::BASE_ALLOCATION)
                    };
                    if matched {
                        let id = if set { BASE_ALLOCATION_ID } else { 0 };
                        send(
                            &mut conn,
                            OptionReply::meta_context(code, id, proto::BASE_ALLOCATION),
                        )
                        .await?;
                    }
                    if set {
                        meta = matched.then(|| q.export.clone());
                    }
                    send(&mut conn, OptionReply::ack(code)).await?;
                }
                ClientOption::Unknown(_) => {
                    send(
                        &mut conn,
                        OptionReply::error(code, rep::ERR_UNSUP, "option not supported"),
                    )
                    .await?;
                }
            }
        }
    }
}

async fn send(conn: &mut Box<dyn Conn>, r: OptionReply) -> io::Result<()> {
    conn.write_all(&r.encode()).await?;
    conn.flush().await
}

/// Answer option `code` with the error `reply_type`. `false` when it cannot be answered:
/// `NBD_OPT_EXPORT_NAME` has no error reply, so the connection has to end instead.
async fn refuse(
    conn: &mut Box<dyn Conn>,
    code: u32,
    reply_type: u32,
    msg: &str,
) -> io::Result<bool> {
    if code == opt::EXPORT_NAME {
        return Ok(false);
    }
    send(conn, OptionReply::error(code, reply_type, msg)).await?;
    Ok(true)
}
