//! The server name a TLS client asks for, read from its ClientHello without taking the
//! bytes off the socket: so that a connection can still be passed through whole to a
//! backend (`tls_passthrough`) or terminated here. Only the first TLS record is read (a
//! ClientHello fits in one: 16 KiB); anything else is "no name".
use std::time::Duration;

use tokio::net::TcpStream;

/// A TLS record header: content type, version, length.
const RECORD_HEADER: usize = 5;
const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const SERVER_NAME: u16 = 0;
const HOST_NAME: u8 = 0;
/// The first peek's size: a typical ClientHello is well under it.
const FIRST_PEEK: usize = 2048;

/// What the bytes seen so far tell.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// The first record is not all there yet: this many bytes are needed.
    Need(usize),
    /// The name asked for, lower case; none if the hello names none or is not one.
    Name(Option<String>),
}

/// Big-endian reads that fail instead of panicking on short input.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        let b = self.take(3)?;
        Some(usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
    /// A vector with a `len_bytes`-byte length in front.
    fn vec(&mut self, len_bytes: usize) -> Option<Reader<'a>> {
        let len = match len_bytes {
            1 => usize::from(self.u8()?),
            2 => usize::from(self.u16()?),
            _ => self.u24()?,
        };
        Some(Reader(self.take(len)?))
    }
}

fn parse(buf: &[u8]) -> Parsed {
    if buf.len() < RECORD_HEADER {
        return Parsed::Need(RECORD_HEADER);
    }
    if buf[0] != HANDSHAKE || buf[1] != 3 {
        return Parsed::Name(None);
    }
    let len = RECORD_HEADER + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf.len() < len {
        return Parsed::Need(len);
    }
    Parsed::Name(hello_name(&buf[RECORD_HEADER..len]))
}

/// The host name in a ClientHello handshake message (as much as the record holds).
fn hello_name(record: &[u8]) -> Option<String> {
    let mut r = Reader(record);
    if r.u8()? != CLIENT_HELLO {
        return None;
    }
    // A hello longer than the record is not read on into the next one.
    let mut hello = r.vec(3)?;
    hello.take(2 + 32)?; // version, random
    hello.vec(1)?; // session id
    hello.vec(2)?; // cipher suites
    hello.vec(1)?; // compression methods
    let mut extensions = hello.vec(2)?;
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let mut data = extensions.vec(2)?;
        if kind != SERVER_NAME {
            continue;
        }
        let mut names = data.vec(2)?;
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let name = names.vec(2)?.0;
            if name_type == HOST_NAME {
                let name = std::str::from_utf8(name).ok()?;
                return Some(name.trim_end_matches('.').to_ascii_lowercase());
            }
        }
        return None;
    }
    None
}

/// The name the client on `stream` asks for, peeked (left on the socket) within
/// `within`; none if it sends no TLS, names nothing, or takes too long.
pub(crate) async fn peek_server_name(stream: &TcpStream, within: Duration) -> Option<String> {
    // Most hellos fit; a larger one (post-quantum key shares) grows it to its record.
    let mut buf = vec![0u8; FIRST_PEEK];
    let peeked = tokio::time::timeout(within, async {
        loop {
            let n = stream.peek(&mut buf).await.ok()?;
            match parse(&buf[..n]) {
                Parsed::Name(name) => return name,
                // Closed.
                Parsed::Need(_) if n == 0 => return None,
                Parsed::Need(len) if len > buf.len() => buf.resize(len, 0),
                // peek answers at once while any byte is there: wait for the rest.
                Parsed::Need(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    });
    peeked.await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello record naming `name` (or none), with a few other extensions.
    fn hello(name: Option<&str>) -> Vec<u8> {
        padded_hello(name, 0)
    }

    /// `hello`, made `pad` bytes longer by a padding extension before the name.
    fn padded_hello(name: Option<&str>, pad: u16) -> Vec<u8> {
        let mut ext = Vec::new();
        // supported_versions, before the name.
        ext.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
        if pad > 0 {
            ext.extend_from_slice(&21u16.to_be_bytes());
            ext.extend_from_slice(&pad.to_be_bytes());
            ext.extend(std::iter::repeat_n(0, usize::from(pad)));
        }
        if let Some(name) = name {
            let n = name.len() as u16;
            ext.extend_from_slice(&0u16.to_be_bytes());
            ext.extend_from_slice(&(n + 5).to_be_bytes());
            ext.extend_from_slice(&(n + 3).to_be_bytes());
            ext.push(0);
            ext.extend_from_slice(&n.to_be_bytes());
            ext.extend_from_slice(name.as_bytes());
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[0]); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut handshake = vec![1];
        handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&body);
        let mut record = vec![22, 3, 1];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    #[test]
    fn reads_the_name_once_the_first_record_is_whole() {
        let record = hello(Some("DB.Example.com."));
        assert_eq!(parse(&record), Parsed::Name(Some("db.example.com".into())));
        assert_eq!(parse(&record[..3]), Parsed::Need(5));
        assert_eq!(parse(&record[..20]), Parsed::Need(record.len()));
        assert_eq!(parse(&hello(None)), Parsed::Name(None));
    }

    #[test]
    fn what_is_no_client_hello_names_nothing_and_never_panics() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Parsed::Name(None));
        let record = hello(Some("a.example.com"));
        // Every truncation of the hello inside a whole record, and every byte flipped.
        for cut in RECORD_HEADER..record.len() {
            let mut short = record[..cut].to_vec();
            let len = (cut - RECORD_HEADER) as u16;
            short[3..5].copy_from_slice(&len.to_be_bytes());
            let _ = parse(&short);
        }
        for i in 0..record.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bad = record.clone();
                bad[i] ^= flip;
                let _ = parse(&bad);
            }
        }
    }

    #[tokio::test]
    async fn a_hello_larger_than_the_first_peek_is_read_whole_off_a_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for pad in [0, 6000] {
            let record = padded_hello(Some("big.example.com"), pad);
            assert_eq!(record.len() > FIRST_PEEK, pad > 0);
            let client = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut c = TcpStream::connect(addr).await.unwrap();
                // In two parts, as a slow client would.
                c.write_all(&record[..50]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                c.write_all(&record[50..]).await.unwrap();
                c
            });
            let (server, _) = listener.accept().await.unwrap();
            let name = peek_server_name(&server, Duration::from_secs(5)).await;
            assert_eq!(name.as_deref(), Some("big.example.com"), "pad {pad}");
            drop(client.await.unwrap());
        }
    }
}
