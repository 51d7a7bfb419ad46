//! CRIU's image-streamer protocol, as CRIU 4.2 speaks it (`criu/img-streamer.c`,
//! `images/img-streamer.proto`), seen from the streamer's side.
//!
//! CRIU connects to a UNIX stream socket in the images directory: `streamer-capture.sock`
//! for `criu dump --stream`, `streamer-serve.sock` for `criu restore --stream`. For every
//! image it opens it sends a request: a native-endian `u32` length, then an
//! `img_streamer_request_entry` naming the file. On restore the streamer answers with a
//! `u32` length and an `img_streamer_reply_entry` saying whether the file exists. Then (on
//! dump always, on restore only for a file that exists) CRIU creates a pipe and passes one
//! end over the socket with `SCM_RIGHTS`, attached to a single dummy byte: the read end on
//! dump (CRIU writes the image into it), the write end on restore (CRIU reads the image from
//! it). CRIU closes the socket once it opens no more images.

use std::io::{self, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use prost::Message;

/// Socket CRIU connects to for `criu dump --stream`.
pub const CAPTURE_SOCKET: &str = "streamer-capture.sock";
/// Socket CRIU connects to for `criu restore --stream`.
pub const SERVE_SOCKET: &str = "streamer-serve.sock";

/// Longest request accepted: a file name is at most 255 bytes, so anything near this is
/// not CRIU talking.
const MAX_MESSAGE: u32 = 4096;

/// `img_streamer_request_entry`: the image CRIU is about to send or wants to read.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct RequestEntry {
    #[prost(string, required, tag = "1")]
    pub filename: String,
}

/// `img_streamer_reply_entry`: whether the requested image exists (restore only).
#[derive(Clone, PartialEq, Message)]
pub(crate) struct ReplyEntry {
    #[prost(bool, required, tag = "1")]
    pub exists: bool,
}

fn invalid(detail: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, detail)
}

/// Reads the next request; `None` when CRIU closed the socket between requests (it opens
/// no more images). The name is checked to be one path component.
pub(crate) fn read_request(sock: &mut UnixStream) -> io::Result<Option<String>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match sock.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_ne_bytes(len);
    if len > MAX_MESSAGE {
        return Err(invalid(format!(
            "image-streamer request of {len} bytes is not from CRIU"
        )));
    }
    let mut body = vec![0u8; usize::try_from(len).expect("small length fits usize")];
    sock.read_exact(&mut body)?;
    let request = RequestEntry::decode(body.as_slice())
        .map_err(|e| invalid(format!("image-streamer request does not decode: {e}")))?;
    check_file_name(&request.filename).map_err(invalid)?;
    Ok(Some(request.filename))
}

/// Checks that an image name from CRIU is a plain file name inside the images directory.
pub(crate) fn check_file_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > 255
        || name.contains(['/', '\0'])
    {
        return Err(format!("image name {name:?} is not one path component"));
    }
    Ok(())
}

/// Writes one length-prefixed message.
fn write_message(sock: &mut UnixStream, message: &impl Message) -> io::Result<()> {
    let body = message.encode_to_vec();
    let len = u32::try_from(body.len()).expect("tiny message");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&body);
    sock.write_all(&out)
}

/// Tells CRIU whether the image it asked for exists.
pub(crate) fn write_reply(sock: &mut UnixStream, exists: bool) -> io::Result<()> {
    write_message(sock, &ReplyEntry { exists })
}

/// Receives the pipe end CRIU passes after a request.
pub(crate) fn recv_pipe(sock: &UnixStream) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(passed) = cmsg {
            fds.extend(passed);
        }
    }
    let bytes = msg.bytes;
    let mut owned = Vec::with_capacity(fds.len());
    for fd in fds {
        // SAFETY: SCM_RIGHTS installed this descriptor in this process for us alone; owning
        // it closes it, including any beyond the one we use.
        owned.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let mut owned = owned.into_iter();
    match (bytes, owned.next(), owned.next()) {
        (_, Some(fd), None) => Ok(fd),
        (0, None, _) => Err(io::ErrorKind::UnexpectedEof.into()),
        (_, None, _) => Err(invalid("CRIU sent no pipe with its image request".into())),
        (_, Some(_), Some(_)) => Err(invalid(
            "CRIU sent more than one descriptor with an image request".into(),
        )),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use nix::sys::socket::{sendmsg, ControlMessage};
    use std::io::IoSlice;
    use std::os::fd::AsFd;

    /// Sends what CRIU's `img_streamer_open` sends for `name`.
    pub(crate) fn send_request(sock: &mut UnixStream, name: &str) {
        write_message(
            sock,
            &RequestEntry {
                filename: name.into(),
            },
        )
        .unwrap();
    }

    /// Passes `fd` with one dummy byte, as CRIU's `send_fd` does.
    pub(crate) fn send_fd(sock: &UnixStream, fd: impl AsFd) {
        let raw = [fd.as_fd().as_raw_fd()];
        let iov = [IoSlice::new(&[0u8])];
        sendmsg::<()>(
            sock.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
    }

    #[test]
    fn a_request_and_its_pipe_arrive_apart() {
        let (mut criu, mut streamer) = UnixStream::pair().unwrap();
        let (read_end, mut write_end) = std::io::pipe().unwrap();
        send_request(&mut criu, "pages-1.img");
        send_fd(&criu, &read_end);
        send_request(&mut criu, "core-7.img");
        assert_eq!(
            read_request(&mut streamer).unwrap().as_deref(),
            Some("pages-1.img")
        );
        let got = recv_pipe(&streamer).unwrap();
        assert_eq!(
            read_request(&mut streamer).unwrap().as_deref(),
            Some("core-7.img")
        );
        drop(read_end);
        write_end.write_all(b"image").unwrap();
        drop(write_end);
        let mut text = String::new();
        std::fs::File::from(got).read_to_string(&mut text).unwrap();
        assert_eq!(text, "image");
        drop(criu);
        assert_eq!(read_request(&mut streamer).unwrap(), None);
    }

    #[test]
    fn the_reply_is_the_length_prefixed_entry() {
        let (mut streamer, mut criu) = UnixStream::pair().unwrap();
        write_reply(&mut streamer, true).unwrap();
        let mut buf = [0u8; 6];
        criu.read_exact(&mut buf).unwrap();
        // len 2, then field 1 varint 1.
        assert_eq!(buf, [2, 0, 0, 0, 0x08, 0x01]);
    }

    #[test]
    fn bad_names_and_oversized_requests_are_refused() {
        for bad in ["", "..", "../etc/passwd", "a/b", "a\0b"] {
            let (mut criu, mut streamer) = UnixStream::pair().unwrap();
            send_request(&mut criu, bad);
            let err = read_request(&mut streamer).unwrap_err();
            assert!(err.to_string().contains("path component"), "{bad:?}: {err}");
        }
        let (mut criu, mut streamer) = UnixStream::pair().unwrap();
        criu.write_all(&(1u32 << 20).to_ne_bytes()).unwrap();
        let err = read_request(&mut streamer).unwrap_err();
        assert!(err.to_string().contains("not from CRIU"), "{err}");
    }

    #[test]
    fn a_request_without_a_pipe_is_an_error() {
        let (mut criu, streamer) = UnixStream::pair().unwrap();
        criu.write_all(&[0]).unwrap();
        let err = recv_pipe(&streamer).unwrap_err();
        assert!(err.to_string().contains("no pipe"), "{err}");
    }
}
